"""Service base URLs and the rule that decides whether a request goes to a key's service."""

import functools
import ipaddress
import re
from typing import NamedTuple
from urllib.parse import unquote_to_bytes, urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


class Upstream(NamedTuple):
    """A service's base URL split into what a destination must match."""

    scheme: str
    host: str  # lower case, IPv6 without brackets
    port: int
    path_prefix: str  # "" or "/v1", never with a trailing slash


def parse_base_url(base_url: str) -> Upstream:
    """Split an absolute http(s) URL with a host; raises ValueError saying what is wrong.

    The messages do not repeat the URL, because a rejected URL may carry a password.
    """
    try:
        parts = urlsplit(base_url)
        port = parts.port
    except ValueError as error:
        raise ValueError(f"not a valid URL ({error})") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError("must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("has no host")
    if not _valid_host(parts.hostname):
        raise ValueError("has an invalid host name")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain user information; put the secret in credential")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    if _has_dot_segment(parts.path):
        raise ValueError("must not contain '.' or '..' path segments")
    return Upstream(
        scheme=parts.scheme,
        host=_normalize_host(parts.hostname),
        port=port if port is not None else DEFAULT_PORTS[parts.scheme],
        path_prefix=parts.path.rstrip("/"),
    )


@functools.lru_cache(maxsize=4096)
def _normalize_host(host: str) -> str:
    host = host.strip("[]").rstrip(".").lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


_HOST_NAME_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    return _HOST_NAME_RE.fullmatch(ascii_host.lower()) is not None


def is_local(host: str) -> bool:
    """Return whether a host name or address reaches this machine: loopback, unspecified or localhost."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return address.is_loopback or address.is_unspecified


def same_host(first: str, second: str) -> bool:
    return _normalize_host(first) == _normalize_host(second)


# Upstreams differ in how often they decode a path; three rounds cover %252e-style nesting.
_DECODE_ROUNDS = 3


def _has_dot_segment(path: str) -> bool:
    """Return whether the path could resolve upward, as some upstream might read it.

    The path is decoded until it stops changing, so %2e%2e, ..%2f and %252e%252e count. A
    segment counts as a dot segment also with `;parameters` (Tomcat and Spring strip them)
    and with surrounding blanks or NULs. A path that is not valid UTF-8 after decoding, such
    as overlong %c0%ae, counts too, because some decoders turn it into dots.
    """
    decoded = path
    for _ in range(_DECODE_ROUNDS):
        raw = unquote_to_bytes(decoded)
        try:
            next_round = raw.decode("utf-8")
        except UnicodeDecodeError:
            return True
        if next_round == decoded:
            break
        decoded = next_round
    for segment in decoded.replace("\\", "/").split("/"):
        name = segment.split(";", 1)[0].strip(" \t\x00")
        if name in (".", ".."):
            return True
    return False


def goes_to(upstream: Upstream, scheme: str, host: str, port: int, path: str) -> bool:
    """Return whether a request for scheme://host:port/path stays inside the upstream's base URL."""
    if scheme != upstream.scheme or port != upstream.port:
        return False
    if _normalize_host(host) != upstream.host:
        return False
    if "#" in path:
        # A fragment is never sent by a client; one in the target only hides a path.
        return False
    prefix = upstream.path_prefix
    if not prefix:
        return True
    path_only = path.split("?", 1)[0]
    if _has_dot_segment(path_only):
        return False
    return path_only == prefix or path_only.startswith(prefix + "/")


def host_header_agrees(host_header: str | None, scheme: str, host: str, port: int) -> bool:
    """Return whether the Host or :authority header names the host and port mitmproxy connects to.

    A request without the header agrees: the destination alone decides then.
    """
    if host_header is None:
        return True
    value = host_header.strip()
    if value.startswith("["):
        bracket_end = value.find("]")
        if bracket_end == -1:
            return False
        header_host, rest = value[1:bracket_end], value[bracket_end + 1:]
        if rest and not rest.startswith(":"):
            return False
        header_port_text = rest[1:] if rest else ""
    elif value.count(":") == 1:
        header_host, header_port_text = value.split(":")
    else:
        header_host, header_port_text = value, ""
    if header_port_text:
        if not header_port_text.isdigit():
            return False
        header_port = int(header_port_text)
    else:
        header_port = DEFAULT_PORTS.get(scheme, -1)
    return header_port == port and _normalize_host(header_host) == _normalize_host(host)
