"""Typed records passed between the store, the request checks and the management API."""

from typing import NamedTuple


class ServiceRecord(NamedTuple):
    name: str
    base_url: str
    credential: str
    credential_header: str
    created_at: float
    updated_at: float


class KeyRecord(NamedTuple):
    id: str
    target: str
    scope: str
    expires_at: float
    rate_limit: int | None
    one_shot: bool
    used: bool
    source: str
    created_at: float
    revoked_at: float | None
    agent: str | None = None
    token_budget: int | None = None
    tokens_used: int = 0
    requests: int = 0


class KeyLookup(NamedTuple):
    """A virtual key found by its secret, with its service's upstream details.

    The service fields are None when the key's service no longer exists.
    """

    key: KeyRecord
    base_url: str | None
    credential: str | None
    credential_header: str | None


class UsageRecord(NamedTuple):
    """One request made with a virtual key, as the usage history stores it."""

    key_id: str
    service: str
    method: str
    path: str
    status: int | None
    latency_ms: float | None
    request_bytes: int
    response_bytes: int
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    metered: bool
    refused: str | None
    created_at: float


class Settlement(NamedTuple):
    """Tokens a finished request adds to its key's counters, and the reservation it frees."""

    key_id: str
    tokens: int
    reservation_id: int | None


class UsagePage(NamedTuple):
    events: list[UsageRecord]
    total: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
