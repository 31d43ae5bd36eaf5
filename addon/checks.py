"""The per-request checks of a virtual key that need no database write, in their fixed order."""

from functools import lru_cache
from typing import NamedTuple

from addon import destination
from addon.records import KeyLookup

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Refusal(NamedTuple):
    status: int
    error: str


INVALID_KEY = Refusal(401, "invalid key")
CONFLICTING_KEYS = Refusal(401, "conflicting keys")
KEY_REVOKED = Refusal(401, "key revoked")
KEY_EXPIRED = Refusal(401, "key expired")
KEY_ALREADY_USED = Refusal(401, "key already used")
WRONG_HOST = Refusal(403, "key not valid for this host")
INSUFFICIENT_SCOPE = Refusal(403, "insufficient scope")
RATE_LIMITED = Refusal(429, "rate limit exceeded")
BUDGET_EXCEEDED = Refusal(429, "token budget exceeded")
MISSING_KEY = Refusal(401, "missing key")
STORE_UNAVAILABLE = Refusal(503, "key store unavailable")


class Request(NamedTuple):
    """The parts of a request that the checks read: request line, destination and Host."""

    method: str
    scheme: str
    host: str
    port: int
    path: str
    host_header: str | None


@lru_cache(maxsize=1024)
def _upstream(base_url: str) -> destination.Upstream | None:
    # Cached by the URL text itself, so a changed base_url is parsed afresh and never stale.
    try:
        return destination.parse_base_url(base_url)
    except ValueError:
        return None


def check_key(found: KeyLookup | None, request: Request, now: float) -> Refusal | None:
    """Return the first refusal that applies to this key and request, or None to let it on.

    Rate limits and one-shot use are decided afterwards by the store, because they write.
    """
    if found is None:
        return INVALID_KEY
    key = found.key
    if key.revoked_at is not None:
        return KEY_REVOKED
    if now >= key.expires_at:
        return KEY_EXPIRED
    if key.one_shot and key.used:
        return KEY_ALREADY_USED

    upstream = _upstream(found.base_url) if found.base_url is not None else None
    if upstream is None or not destination.goes_to(
        upstream, request.scheme, request.host, request.port, request.path
    ):
        return WRONG_HOST
    if not destination.host_header_agrees(
        request.host_header, request.scheme, request.host, request.port
    ):
        return WRONG_HOST

    if key.scope == "read" and request.method.upper() not in READ_METHODS:
        return INSUFFICIENT_SCOPE
    return None


def retry_after(now: float) -> int:
    """Seconds until the next clock minute, when a rate window opens again."""
    return max(1, 60 - int(now % 60))
