"""The per-request checks of a virtual key that need no database write, in their fixed order."""

from functools import lru_cache
from typing import NamedTuple

from addon import destination
from addon.records import KeyLookup

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Methods that make the upstream reflect the request, injected credential included, back to
# the client. No scope allows them.
REFLECTING_METHODS = frozenset({"TRACE", "TRACK"})


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
    # The authority of an HTTP/1 absolute-form request target, which upstreams prefer to Host.
    target_authority: str | None = None
    # The TLS server name the client asked for, which mitmproxy passes on to the upstream.
    sni: str | None = None


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
    for authority in (request.host_header, request.target_authority):
        if not destination.host_header_agrees(authority, request.scheme, request.host, request.port):
            return WRONG_HOST
    # A name-based TLS front end routes by SNI, so the SNI must name the destination as well.
    if request.scheme == "https" and request.sni and not destination.same_host(request.sni, request.host):
        return WRONG_HOST

    method = request.method.upper()
    if method in REFLECTING_METHODS:
        return INSUFFICIENT_SCOPE
    if key.scope == "read" and method not in READ_METHODS:
        return INSUFFICIENT_SCOPE
    return None


def retry_after(now: float) -> int:
    """Seconds until the next clock minute, when a rate window opens again."""
    return max(1, 60 - int(now % 60))
