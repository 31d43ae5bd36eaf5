"""End to end: a SQLite write lock held by another process delays only the requests that must write."""

import contextlib
import pathlib
import sqlite3
import threading
import time
from collections.abc import Iterator

import pytest

from tests.e2e_support import Api, Key, Mitmdump, Service, Upstream, error_of, request_through

# How long the test holds the write lock; the proxy waits for such a lock longer than this.
LOCK_HOLD_SECONDS = 2.0


@pytest.fixture
def service(api: Api, upstream: Upstream) -> Service:
    return api.create_service(upstream.base_url)


@contextlib.contextmanager
def write_lock(keys_db: pathlib.Path) -> Iterator[sqlite3.Connection]:
    """Hold a write transaction on keys_db from this process until the block ends or rolls it back."""
    connection = sqlite3.connect(keys_db, isolation_level=None, timeout=10)
    try:
        connection.execute("BEGIN IMMEDIATE")
        yield connection
    finally:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        connection.close()


class TimedRequest(threading.Thread):
    """Sends one request through the proxy on its own thread and records when the response arrived."""

    def __init__(self, proxy: Mitmdump, url: str, key: Key) -> None:
        super().__init__()
        self.proxy = proxy
        self.url = url
        self.key = key
        self.status: int | None = None
        self.error: object = None
        self.answered_at: float | None = None

    def run(self) -> None:
        response = request_through(self.proxy, "GET", self.url, {"X-Virtual-Key": self.key.secret}, timeout=30)
        self.answered_at = time.monotonic()
        self.status = response.status_code
        if response.status_code != 200:
            self.error = error_of(response)


def test_lock_delays_only_one_shot(proxy: Mitmdump, api: Api, service: Service, upstream: Upstream) -> None:
    regular = api.create_key(service.name)
    one_shot = api.create_key(service.name, one_shot=True)

    with write_lock(proxy.keys_db) as connection:
        locked_at = time.monotonic()
        waiting = TimedRequest(proxy, upstream.base_url + "/one-shot", one_shot)
        waiting.start()
        prompt = TimedRequest(proxy, upstream.base_url + "/regular", regular)
        prompt.start()
        no_key = request_through(proxy, "GET", upstream.base_url + "/no-key", {})
        no_key_answered_at = time.monotonic()
        prompt.join(timeout=LOCK_HOLD_SECONDS)

        time.sleep(max(0.0, locked_at + LOCK_HOLD_SECONDS - time.monotonic()))
        released_at = time.monotonic()
        connection.execute("ROLLBACK")
        waiting.join(timeout=30)

    assert prompt.status == 200
    assert prompt.answered_at is not None and prompt.answered_at < released_at, "the regular key waited for the lock"
    assert no_key.status_code == 200
    assert no_key_answered_at < released_at, "a request without a key waited for the lock"
    assert waiting.status == 200, waiting.error
    assert waiting.answered_at is not None and waiting.answered_at > released_at
    (forwarded,) = upstream.received("/one-shot")
    assert forwarded.received_at > released_at
    assert api.get_key(one_shot.id)["used"] is True


def test_lock_held_too_long_fails_closed(proxy: Mitmdump, api: Api, service: Service, upstream: Upstream) -> None:
    one_shot = api.create_key(service.name, one_shot=True)

    # The lock stays until the proxy gives up, however long it waits (the request times out at 30 s).
    with write_lock(proxy.keys_db):
        response = request_through(proxy, "GET", upstream.base_url + "/never", {"X-Virtual-Key": one_shot.secret}, timeout=30)
    after = request_through(proxy, "GET", upstream.base_url + "/after", {"X-Virtual-Key": one_shot.secret})

    assert response.status_code == 503
    assert error_of(response) == "key store unavailable"
    assert upstream.received("/never") == []
    assert after.status_code == 200
