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


class KeyLookup(NamedTuple):
    """A virtual key found by its secret, with its service's upstream details.

    The service fields are None when the key's service no longer exists.
    """

    key: KeyRecord
    base_url: str | None
    credential: str | None
    credential_header: str | None
