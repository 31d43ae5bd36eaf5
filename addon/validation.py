"""Checks of management API input: JSON bodies become typed records or a BadInput naming the field."""

import json
import secrets
from typing import Any, NamedTuple

from addon import destination, keyformat, timeutil

MAX_BODY_BYTES = 1024 * 1024
DEFAULT_TTL_SECONDS = 3600
# Ten years: beyond this a key is no longer short-lived and most likely a typo.
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
SCOPES = ("read", "write")
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Headers that frame or route the request; a credential sent in one would break the request.
_RESERVED_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer",
    "keep-alive", "proxy-connection", "x-virtual-key-id", "x-virtual-key-agent",
})


class BadInput(Exception):
    """Client input that cannot be used; the message names the field and what was expected."""


class NewService(NamedTuple):
    name: str
    base_url: str
    credential: str
    credential_header: str


class NewKey(NamedTuple):
    id: str
    target: str
    scope: str
    expires_at: float
    rate_limit: int | None
    one_shot: bool
    token_budget: int | None = None


class UsageQuery(NamedTuple):
    start: float | None
    end: float | None
    page: int
    per_page: int


DEFAULT_PER_PAGE = 50
MAX_PER_PAGE = 500


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_json(body: bytes) -> Any:
    """Decode a JSON document; raise ValueError naming the problem.

    NaN and Infinity are rejected, and so are documents nested too deeply for the parser.
    """
    if not body.strip():
        raise ValueError("the request body is empty")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as error:
        raise ValueError(f"the request body is not UTF-8: {error}") from None
    except RecursionError:
        raise ValueError("the request body is nested too deeply") from None
    except ValueError as error:
        # JSONDecodeError, a rejected constant, or an integer with too many digits.
        raise ValueError(str(error)) from None


def parse_json_object(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY_BYTES:
        raise BadInput("request body is larger than 1 MiB")
    if not body.strip():
        raise BadInput("request body must be a JSON object")
    try:
        data = load_json(body)
    except ValueError as error:
        raise BadInput(f"request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise BadInput("request body must be a JSON object")
    return data


def _reject_unknown(data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BadInput(f"unknown field {unknown[0]!r}; expected one of: {', '.join(sorted(allowed))}")


def _string(data: dict[str, Any], field: str, *, required: bool) -> str | None:
    value = data.get(field)
    if value is None:
        if required:
            raise BadInput(f"{field} is required")
        return None
    if not isinstance(value, str):
        raise BadInput(f"{field} must be a string")
    return value


# The largest integer a SQLite INTEGER column stores.
MAX_INTEGER = 2**63 - 1


def _integer(data: dict[str, Any], field: str) -> int | None:
    value = data.get(field)
    if value is None:
        return None
    # bool is an int in Python, but true is not a number in JSON.
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(f"{field} must be an integer")
    if value > MAX_INTEGER:
        raise BadInput(f"{field} must be at most {MAX_INTEGER}")
    return value


def check_name(value: str, field: str) -> str:
    if not keyformat.NAME_RE.fullmatch(value):
        raise BadInput(f"{field} must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'")
    return value


def _check_base_url(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput("base_url must be valid Unicode text") from None
    try:
        destination.parse_base_url(value)
    except ValueError as error:
        raise BadInput(f"base_url: {error}") from None
    return value


def _check_credential(value: str) -> str:
    if not value:
        raise BadInput("credential must not be empty")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        raise BadInput("credential must not contain control characters")
    if value != value.strip():
        raise BadInput("credential must not start or end with whitespace")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise BadInput("credential must contain only Latin-1 characters, as header values do") from None
    return value


def _check_credential_header(value: str) -> str:
    if not value or not set(value) <= _TOKEN_CHARS:
        raise BadInput("credential_header must be a non-empty HTTP header name without spaces or control characters")
    if value.lower() in _RESERVED_HEADERS:
        raise BadInput(f"credential_header {value!r} is reserved and cannot carry a credential")
    return value


def parse_new_service(data: dict[str, Any]) -> NewService:
    _reject_unknown(data, {"name", "base_url", "credential", "credential_header"})
    header = _string(data, "credential_header", required=False)
    return NewService(
        name=check_name(_string(data, "name", required=True), "name"),
        base_url=_check_base_url(_string(data, "base_url", required=True)),
        credential=_check_credential(_string(data, "credential", required=True)),
        credential_header=_check_credential_header(header if header is not None else "Authorization"),
    )


def parse_service_changes(data: dict[str, Any]) -> dict[str, str]:
    _reject_unknown(data, {"base_url", "credential", "credential_header"})
    changes: dict[str, str] = {}
    base_url = _string(data, "base_url", required=False)
    if base_url is not None:
        changes["base_url"] = _check_base_url(base_url)
    credential = _string(data, "credential", required=False)
    if credential is not None:
        changes["credential"] = _check_credential(credential)
    header = _string(data, "credential_header", required=False)
    if header is not None:
        changes["credential_header"] = _check_credential_header(header)
    return changes


def parse_ttl(value: Any, field: str = "ttl_seconds", maximum: int = MAX_TTL_SECONDS) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(f"{field} must be an integer")
    if not 0 < value <= maximum:
        raise BadInput(f"{field} must be between 1 and {maximum}")
    return value


def parse_expiry(data: dict[str, Any], now: float) -> float:
    """Return expires_at from `expires_at` (RFC 3339, future) or `ttl_seconds` (default 3600)."""
    expires_text = _string(data, "expires_at", required=False)
    if expires_text is not None and data.get("ttl_seconds") is not None:
        raise BadInput("give expires_at or ttl_seconds, not both")
    if expires_text is not None:
        try:
            expires_at = timeutil.parse_rfc3339(expires_text)
        except ValueError as error:
            raise BadInput(f"expires_at: {error}") from None
        if expires_at <= now:
            raise BadInput("expires_at must be in the future")
        if expires_at > now + MAX_TTL_SECONDS:
            raise BadInput("expires_at must be at most ten years ahead, as ttl_seconds is")
        return expires_at
    ttl = data.get("ttl_seconds")
    return now + (DEFAULT_TTL_SECONDS if ttl is None else parse_ttl(ttl))


def parse_rate_limit(data: dict[str, Any]) -> int | None:
    rate_limit = _integer(data, "rate_limit")
    if rate_limit is not None and rate_limit <= 0:
        raise BadInput("rate_limit must be a positive integer (requests per minute)")
    return rate_limit


def parse_token_budget(data: dict[str, Any]) -> int | None:
    budget = _integer(data, "token_budget")
    if budget is not None and budget <= 0:
        raise BadInput("token_budget must be a positive integer (total tokens)")
    return budget


def parse_scope(data: dict[str, Any]) -> str:
    scope = _string(data, "scope", required=False)
    if scope is None:
        return "write"
    if scope not in SCOPES:
        raise BadInput("scope must be 'read' or 'write'")
    return scope


def parse_one_shot(data: dict[str, Any]) -> bool:
    one_shot = data.get("one_shot", False)
    if one_shot is None:
        return False
    if not isinstance(one_shot, bool):
        raise BadInput("one_shot must be true or false")
    return one_shot


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def parse_new_key(data: dict[str, Any], now: float) -> NewKey:
    _reject_unknown(data, {
        "target", "scope", "expires_at", "ttl_seconds", "rate_limit", "one_shot", "id", "token_budget",
    })
    key_id = _string(data, "id", required=False)
    return NewKey(
        id=check_name(key_id, "id") if key_id is not None else new_key_id(),
        target=check_name(_string(data, "target", required=True), "target"),
        scope=parse_scope(data),
        expires_at=parse_expiry(data, now),
        rate_limit=parse_rate_limit(data),
        one_shot=parse_one_shot(data),
        token_budget=parse_token_budget(data),
    )


def parse_key_changes(data: dict[str, Any], now: float) -> dict[str, Any]:
    """Return the changes of a PUT on a key; null removes a rate limit or budget."""
    for fixed in ("target", "id", "key", "scope", "one_shot"):
        if fixed in data:
            raise BadInput(f"{fixed} cannot be changed; create a new key instead")
    _reject_unknown(data, {"rate_limit", "expires_at", "token_budget"})
    changes: dict[str, Any] = {}
    if "rate_limit" in data:
        changes["rate_limit"] = parse_rate_limit(data)
    if "token_budget" in data:
        changes["token_budget"] = parse_token_budget(data)
    if "expires_at" in data:
        if data["expires_at"] is None:
            raise BadInput("expires_at cannot be removed; every key expires")
        changes["expires_at"] = parse_expiry({"expires_at": data["expires_at"]}, now)
    return changes


def _query_integer(query: dict[str, list[str]], field: str, default: int, maximum: int) -> int:
    values = query.get(field)
    if not values:
        return default
    text = values[-1]
    if not text.isdigit() or not 1 <= int(text) <= maximum:
        raise BadInput(f"{field} must be an integer between 1 and {maximum}")
    return int(text)


def _query_time(query: dict[str, list[str]], field: str) -> float | None:
    values = query.get(field)
    if not values or not values[-1]:
        return None
    try:
        return timeutil.parse_rfc3339(values[-1])
    except ValueError as error:
        raise BadInput(f"{field}: {error}") from None


def parse_usage_query(query: dict[str, list[str]]) -> UsageQuery:
    """Parse from, to (RFC 3339; from inclusive, to exclusive), page and per_page."""
    unknown = sorted(set(query) - {"from", "to", "page", "per_page"})
    if unknown:
        raise BadInput(f"unknown query parameter {unknown[0]!r}; expected from, to, page or per_page")
    start = _query_time(query, "from")
    end = _query_time(query, "to")
    if start is not None and end is not None and end < start:
        raise BadInput("to must not be before from")
    return UsageQuery(
        start=start,
        end=end,
        page=_query_integer(query, "page", 1, 10**9),
        per_page=_query_integer(query, "per_page", DEFAULT_PER_PAGE, MAX_PER_PAGE),
    )
