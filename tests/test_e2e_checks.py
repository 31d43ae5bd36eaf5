"""End to end: unknown, revoked, expired, conflicting and rate-limited keys, and requests without a key."""

import pathlib
import socket
import threading
import secrets
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from tests.e2e_support import (
    ADMIN_TOKEN,
    Api,
    Mitmdump,
    Service,
    Upstream,
    error_of,
    proxy_session,
    raw_proxy_request,
    request_through,
    rfc3339_utc,
)

T = TypeVar("T")
# A rate-limit scenario that straddles a clock minute is run again, at most this often.
MINUTE_ATTEMPTS = 3


@pytest.fixture
def service(api: Api, upstream: Upstream) -> Service:
    return api.create_service(upstream.base_url)


def _within_one_minute(scenario: Callable[[], T]) -> T:
    """Run `scenario` until one run starts and ends in the same clock minute; return its result.

    Rate limits count per clock minute, so a run that crosses a minute boundary proves nothing.
    """
    for _ in range(MINUTE_ATTEMPTS):
        minute = int(time.time() // 60)
        result = scenario()
        if int(time.time() // 60) == minute:
            return result
    pytest.fail(f"no run of the scenario stayed within one clock minute in {MINUTE_ATTEMPTS} attempts")


def test_unknown_key_rejected(proxy: Mitmdump, service: Service, upstream: Upstream) -> None:
    unknown = "vk_" + secrets.token_urlsafe(32)

    response = request_through(proxy, "GET", upstream.base_url + "/unknown", {"X-Virtual-Key": unknown})

    assert response.status_code == 401
    assert error_of(response) == "invalid key"
    assert upstream.received() == []


def test_revoked_key_rejected_next_request(proxy: Mitmdump, api: Api, service: Service, upstream: Upstream) -> None:
    key = api.create_key(service.name)
    headers = {"X-Virtual-Key": key.secret}

    with proxy_session(proxy) as session:
        before = session.get(upstream.base_url + "/revoke", headers=headers, timeout=10)
        api.revoke_key(key.id)
        after = session.get(upstream.base_url + "/revoke", headers=headers, timeout=10)

    assert before.status_code == 200
    assert after.status_code == 401
    assert error_of(after) == "key revoked"
    assert len(upstream.received("/revoke")) == 1
    assert api.get_key(key.id)["revoked_at"] is not None


def test_expired_key_rejected(proxy: Mitmdump, api: Api, service: Service, upstream: Upstream) -> None:
    expires_at = int(time.time()) + 3
    key = api.create_key(service.name, expires_at=rfc3339_utc(expires_at))
    headers = {"X-Virtual-Key": key.secret}

    before = request_through(proxy, "GET", upstream.base_url + "/expire", headers)
    time.sleep(max(0.0, expires_at - time.time()) + 0.2)
    after = request_through(proxy, "GET", upstream.base_url + "/expire", headers)

    assert before.status_code == 200
    assert after.status_code == 401
    assert error_of(after) == "key expired"
    assert len(upstream.received("/expire")) == 1


def test_revoke_seen_by_other_process(tmp_path: pathlib.Path, start_mitmdump: Callable[..., Mitmdump], upstream: Upstream) -> None:
    keys_db = tmp_path / "shared-keys.db"
    first = start_mitmdump(keys_db=keys_db)
    second = start_mitmdump(keys_db=keys_db)
    service = first.api().create_service(upstream.base_url)
    key = first.api().create_key(service.name)
    headers = {"X-Virtual-Key": key.secret}

    before = request_through(second, "GET", upstream.base_url + "/shared-revoke", headers)
    first.api().revoke_key(key.id)
    after = request_through(second, "GET", upstream.base_url + "/shared-revoke", headers)

    assert before.status_code == 200
    assert after.status_code == 401
    assert error_of(after) == "key revoked"
    assert len(upstream.received("/shared-revoke")) == 1


def test_two_keys_conflict(proxy: Mitmdump, api: Api, service: Service, upstream: Upstream) -> None:
    first = api.create_key(service.name)
    second = api.create_key(service.name)

    response = raw_proxy_request(proxy, "GET", upstream.base_url + "/conflict", [
        ("X-Virtual-Key", first.secret),
        ("Authorization", f"Bearer {second.secret}"),
    ])

    assert response.status == 401
    assert error_of(response) == "conflicting keys"
    assert upstream.received() == []


def test_same_key_twice_forwards(proxy: Mitmdump, api: Api, service: Service, upstream: Upstream) -> None:
    key = api.create_key(service.name)

    response = raw_proxy_request(proxy, "GET", upstream.base_url + "/twice", [
        ("X-Virtual-Key", key.secret),
        ("Authorization", f"Bearer {key.secret}"),
    ])

    assert response.status == 200
    (received,) = upstream.received("/twice")
    assert received.header_values("Authorization") == [f"Bearer {service.credential}"]


def test_rate_limit_third_request(proxy: Mitmdump, api: Api, service: Service, upstream: Upstream) -> None:
    def scenario() -> tuple[list[int], object, str | None, tuple[float, float], str]:
        key = api.create_key(service.name, rate_limit=2)
        path = f"/rate/{key.id}"
        headers = {"X-Virtual-Key": key.secret}
        with proxy_session(proxy) as session:
            responses = [session.get(upstream.base_url + path, headers=headers, timeout=10) for _ in range(2)]
            sent_at = time.time()
            responses.append(session.get(upstream.base_url + path, headers=headers, timeout=10))
            answered_at = time.time()
        statuses = [response.status_code for response in responses]
        return statuses, error_of(responses[2]), responses[2].headers.get("Retry-After"), (sent_at, answered_at), path

    statuses, error, retry_after, (sent_at, answered_at), path = _within_one_minute(scenario)

    assert statuses == [200, 200, 429]
    assert error == "rate limit exceeded"
    assert retry_after is not None
    assert retry_after.isdigit(), retry_after
    # The proxy counts the seconds to the next clock minute at some moment between these two.
    assert 60 - int(answered_at % 60) <= int(retry_after) <= 60 - int(sent_at % 60)
    assert len(upstream.received(path)) == 2


def test_refusals_not_rate_counted(
    proxy: Mitmdump, api: Api, service: Service, upstream: Upstream, other_upstream: Upstream,
) -> None:
    def scenario() -> tuple[list[int], list[int], object, str]:
        key = api.create_key(service.name, scope="read", rate_limit=2)
        path = f"/counted/{key.id}"
        headers = {"X-Virtual-Key": key.secret}
        with proxy_session(proxy) as session:
            refused = [session.post(upstream.base_url + path, headers=headers, timeout=10) for _ in range(3)]
            refused.append(session.get(other_upstream.base_url + path, headers=headers, timeout=10))
            allowed = [session.get(upstream.base_url + path, headers=headers, timeout=10) for _ in range(3)]
        return [r.status_code for r in refused], [r.status_code for r in allowed], error_of(allowed[2]), path

    refused, allowed, error, path = _within_one_minute(scenario)

    assert refused == [403, 403, 403, 403]
    assert allowed == [200, 200, 429]
    assert error == "rate limit exceeded"
    assert [request.method for request in upstream.received(path)] == ["GET", "GET"]


def test_no_key_passes_untouched(proxy: Mitmdump, service: Service, upstream: Upstream) -> None:
    response = raw_proxy_request(proxy, "GET", upstream.base_url + "/plain", [
        ("Authorization", "Basic Y2xpZW50OnNlY3JldA=="),
        ("X-Request-Tag", "tag-2"),
    ])

    assert response.status == 200
    (received,) = upstream.received("/plain")
    assert received.header_values("Authorization") == ["Basic Y2xpZW50OnNlY3JldA=="]
    assert received.header_values("X-Request-Tag") == ["tag-2"]
    assert received.header_values("X-Virtual-Key-ID") == []


# -- keys_strict ----------------------------------------------------------------------------


@pytest.fixture
def strict_proxy(start_mitmdump: Callable[..., Mitmdump]) -> Mitmdump:
    return start_mitmdump("--set", "keys_strict=true")


def test_strict_no_key_rejected(strict_proxy: Mitmdump, upstream: Upstream) -> None:
    response = request_through(strict_proxy, "GET", upstream.base_url + "/strict", {})

    assert response.status_code == 401
    assert error_of(response) == "missing key"
    assert upstream.received() == []


def test_strict_key_forwards(strict_proxy: Mitmdump, upstream: Upstream) -> None:
    api = strict_proxy.api()
    service = api.create_service(upstream.base_url)
    key = api.create_key(service.name)

    response = request_through(strict_proxy, "GET", upstream.base_url + "/strict-ok", {"X-Virtual-Key": key.secret})

    assert response.status_code == 200
    assert len(upstream.received("/strict-ok")) == 1


def test_strict_serves_api_host(strict_proxy: Mitmdump) -> None:
    response = request_through(
        strict_proxy, "GET", "http://keys.mitm/v1/keys", {"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )

    assert response.status_code == 200
    assert response.json() == []


def test_strict_tunnel_not_relayed_raw(strict_proxy: Mitmdump) -> None:
    # A leading empty line made mitmproxy relay this tunnel as raw TCP, unchecked, although
    # upstreams such as Node's http module still read an HTTP request from it. A raw socket
    # plays such an upstream and records whatever bytes reach it.
    received = bytearray()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def record() -> None:
            try:
                peer, _ = listener.accept()
            except TimeoutError:
                return
            with peer:
                peer.settimeout(3)
                try:
                    while chunk := peer.recv(65536):
                        received.extend(chunk)
                except (TimeoutError, ConnectionResetError):
                    pass

        recorder = threading.Thread(target=record)
        recorder.start()
        with socket.create_connection(("127.0.0.1", strict_proxy.proxy_port), timeout=10) as connection:
            target = f"127.0.0.1:{port}"
            connection.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            assert connection.recv(4096).startswith(b"HTTP/1.1 200")
            connection.sendall(f"\r\nGET /raw-tunnel HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            time.sleep(1)
        recorder.join()

    assert b"/raw-tunnel" not in received
