"""End to end: one-shot keys are forwarded exactly once, even under concurrent use."""

import pathlib
import threading
from collections import Counter
from collections.abc import Callable

import pytest

from tests.e2e_support import (
    Api,
    Mitmdump,
    Service,
    Upstream,
    error_of,
    raw_proxy_request,
    request_through,
)

CONCURRENT_USES = 30
SHARED_DB_KEYS = 6
SHARED_DB_USES_PER_PROXY = 4


@pytest.fixture
def service(api: Api, upstream: Upstream) -> Service:
    return api.create_service(upstream.base_url)


def _use_concurrently(requests_to_send: list[Callable[[], tuple[int, object]]]) -> list[tuple[int, object]]:
    """Run the callables on one thread each, released together; return their results in order."""
    barrier = threading.Barrier(len(requests_to_send))
    results: list[tuple[int, object] | None] = [None] * len(requests_to_send)

    def run(index: int, send: Callable[[], tuple[int, object]]) -> None:
        barrier.wait(timeout=30)
        try:
            results[index] = send()
        except Exception as error:  # noqa: BLE001 (the test reports it as a result)
            results[index] = (-1, repr(error))

    threads = [threading.Thread(target=run, args=(index, send)) for index, send in enumerate(requests_to_send)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(not thread.is_alive() for thread in threads), "a request thread did not finish"
    return [result for result in results if result is not None]


def _sender(proxy: Mitmdump, url: str, secret: str) -> Callable[[], tuple[int, object]]:
    def send() -> tuple[int, object]:
        response = raw_proxy_request(proxy, "GET", url, [("X-Virtual-Key", secret)], timeout=30)
        if response.status == 200:
            return response.status, response.json()["path"]
        return response.status, error_of(response)

    return send


def test_one_shot_second_use_rejected(proxy: Mitmdump, api: Api, upstream: Upstream, service: Service) -> None:
    key = api.create_key(service.name, one_shot=True)
    headers = {"X-Virtual-Key": key.secret}

    first = request_through(proxy, "GET", upstream.base_url + "/once", headers)
    second = request_through(proxy, "GET", upstream.base_url + "/once", headers)

    assert first.status_code == 200
    assert second.status_code == 401
    assert error_of(second) == "key already used"
    assert len(upstream.received("/once")) == 1


def test_one_shot_shown_used(proxy: Mitmdump, api: Api, upstream: Upstream, service: Service) -> None:
    key = api.create_key(service.name, one_shot=True)
    assert api.get_key(key.id)["used"] is False

    response = request_through(proxy, "GET", upstream.base_url + "/shown", {"X-Virtual-Key": key.secret})

    assert response.status_code == 200
    record = api.get_key(key.id)
    assert record["one_shot"] is True
    assert record["used"] is True


def test_regular_key_works_three_times(proxy: Mitmdump, api: Api, upstream: Upstream, service: Service) -> None:
    key = api.create_key(service.name)

    statuses = [
        request_through(proxy, "GET", upstream.base_url + "/again", {"X-Virtual-Key": key.secret}).status_code
        for _ in range(3)
    ]

    assert statuses == [200, 200, 200]
    assert len(upstream.received("/again")) == 3
    assert api.get_key(key.id)["used"] is False


def test_one_shot_concurrent_uses(proxy: Mitmdump, api: Api, upstream: Upstream, service: Service) -> None:
    key = api.create_key(service.name, one_shot=True)
    send = _sender(proxy, upstream.base_url + "/slow/race", key.secret)

    results = _use_concurrently([send] * CONCURRENT_USES)

    outcomes = Counter(results)
    assert outcomes[(200, "/slow/race")] == 1, outcomes
    assert outcomes[(401, "key already used")] == CONCURRENT_USES - 1, outcomes
    assert len(upstream.received("/slow/race")) == 1


def test_one_shot_across_two_proxies(
    tmp_path: pathlib.Path, start_mitmdump: Callable[..., Mitmdump], upstream: Upstream,
) -> None:
    keys_db = tmp_path / "shared-keys.db"
    first = start_mitmdump(keys_db=keys_db)
    second = start_mitmdump(keys_db=keys_db)
    service = first.api().create_service(upstream.base_url)
    keys = [first.api().create_key(service.name, one_shot=True) for _ in range(SHARED_DB_KEYS)]

    senders = []
    for key in keys:
        url = f"{upstream.base_url}/shared/{key.id}"
        for proxy in (first, second):
            senders += [_sender(proxy, url, key.secret)] * SHARED_DB_USES_PER_PROXY
    results = _use_concurrently(senders)

    outcomes = Counter(status for status, _ in results)
    assert outcomes[200] == SHARED_DB_KEYS, outcomes
    assert outcomes[401] == len(senders) - SHARED_DB_KEYS, outcomes
    for key in keys:
        forwarded = upstream.received(f"/shared/{key.id}")
        assert len(forwarded) == 1, f"key {key.id} reached the upstream {len(forwarded)} times"
        assert forwarded[0].header_values("X-Virtual-Key-ID") == [key.id]


def test_refused_request_keeps_one_shot(proxy: Mitmdump, api: Api, upstream: Upstream, service: Service, other_upstream: Upstream) -> None:
    key = api.create_key(service.name, scope="read", one_shot=True)
    headers = {"X-Virtual-Key": key.secret}

    write = request_through(proxy, "POST", upstream.base_url + "/keep", headers)
    elsewhere = request_through(proxy, "GET", other_upstream.base_url + "/keep", headers)
    record_after_refusals = api.get_key(key.id)
    read = request_through(proxy, "GET", upstream.base_url + "/keep", headers)
    again = request_through(proxy, "GET", upstream.base_url + "/keep", headers)

    assert write.status_code == 403
    assert error_of(write) == "insufficient scope"
    assert elsewhere.status_code == 403
    assert error_of(elsewhere) == "key not valid for this host"
    assert record_after_refusals["used"] is False
    assert read.status_code == 200
    assert again.status_code == 401
    assert error_of(again) == "key already used"
    assert [request.method for request in upstream.received("/keep")] == ["GET"]
    assert other_upstream.received() == []
