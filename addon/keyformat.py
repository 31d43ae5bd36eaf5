"""Virtual key secrets: generation, hashing, and finding them in request headers."""

import hashlib
import re
import secrets
from typing import NamedTuple

SECRET_PREFIX = "vk_"

# 32 random bytes give 43 url-safe characters, above the 32 that a secret must carry.
_SECRET_RANDOM_BYTES = 32
# Matched whole against a header value, and searched for anywhere inside paths and values.
_SECRET_RE = re.compile(r"vk_[A-Za-z0-9_-]{32,}")
_BEARER_RE = re.compile(rf"bearer[ \t]+({_SECRET_RE.pattern})", re.IGNORECASE)
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
REDACTED_SECRET = "vk_[redacted]"


def contains_secret(text: str) -> bool:
    return _SECRET_RE.search(text) is not None


def redact_secrets(text: str) -> str:
    return _SECRET_RE.sub(REDACTED_SECRET, text)


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(_SECRET_RANDOM_BYTES)


def hash_secret(secret: str) -> str:
    """Return the hex SHA-256 of a secret; a 256-bit random secret needs no slow hash."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_in_value(value: str) -> str | None:
    """Return the secret when a header's whole value is `vk_...` or `Bearer vk_...`."""
    stripped = value.strip()
    if _SECRET_RE.fullmatch(stripped):
        return stripped
    bearer = _BEARER_RE.fullmatch(stripped)
    if bearer:
        return bearer.group(1)
    return None


class Carriers(NamedTuple):
    """The key-carrying headers of one request."""

    secrets: frozenset[str]
    header_names: tuple[str, ...]
    # True when the configured key header is present but contains no well-formed secret.
    malformed: bool
    # True when a secret sits inside another header's value (a cookie, a list, "Token vk_..."),
    # where the proxy would neither read nor remove it.
    embedded: bool = False


def find_carriers(fields: tuple[tuple[bytes, bytes], ...], key_header: str) -> Carriers:
    """Find every header that carries a virtual key secret.

    `fields` are raw header fields as mitmproxy keeps them. The configured key header counts
    whatever it holds, so a malformed value there is reported instead of forwarded.
    """
    key_header_lower = key_header.lower().encode()
    found: set[str] = set()
    names: list[str] = []
    malformed = False
    embedded = False
    for raw_name, raw_value in fields:
        value = raw_value.decode("latin-1")
        secret = secret_in_value(value)
        is_key_header = raw_name.lower() == key_header_lower
        if secret is None and not is_key_header:
            embedded = embedded or contains_secret(value)
            continue
        names.append(raw_name.decode("latin-1"))
        if secret is None:
            malformed = True
        else:
            found.add(secret)
    return Carriers(frozenset(found), tuple(names), malformed, embedded)
