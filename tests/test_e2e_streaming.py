"""End to end: server-sent events reach the client while the upstream is still sending."""

import time

import pytest

from tests.e2e_support import Api, Key, Mitmdump, Upstream, httpx_client, proxy_session

EVENT_COUNT = 3
# Seconds the upstream waits between events; the client must see the first event long before
# the last one is sent.
EVENT_PAUSE_SECONDS = 1.0
EVENTS_PATH = f"/events?count={EVENT_COUNT}&pause={EVENT_PAUSE_SECONDS}"


@pytest.fixture
def key(api: Api, upstream: Upstream) -> Key:
    service = api.create_service(upstream.base_url)
    return api.create_key(service.name)


def _assert_streamed(upstream: Upstream, first_chunk_at: float, body: bytes) -> None:
    sent = upstream.events_sent()
    assert len(sent) == EVENT_COUNT
    assert first_chunk_at < sent[-1], "the first event reached the client only after the upstream sent the last"
    for index in range(EVENT_COUNT):
        assert f"data: event {index}".encode() in body


def test_events_stream_with_httpx(proxy: Mitmdump, key: Key, upstream: Upstream) -> None:
    with httpx_client(proxy, timeout=20) as client:
        with client.stream("GET", upstream.base_url + EVENTS_PATH, headers={"X-Virtual-Key": key.secret}) as response:
            chunks = response.iter_raw()
            first = next(chunks)
            first_chunk_at = time.monotonic()
            body = first + b"".join(chunks)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    _assert_streamed(upstream, first_chunk_at, body)


def test_events_stream_with_requests(proxy: Mitmdump, key: Key, upstream: Upstream) -> None:
    with proxy_session(proxy) as session:
        response = session.get(
            upstream.base_url + EVENTS_PATH, headers={"Authorization": f"Bearer {key.secret}"}, stream=True, timeout=20,
        )
        with response:
            # chunk_size=None yields each piece as it arrives instead of filling a buffer first.
            chunks = response.iter_content(chunk_size=None)
            first = next(chunks)
            first_chunk_at = time.monotonic()
            body = first + b"".join(chunks)

    assert response.status_code == 200
    _assert_streamed(upstream, first_chunk_at, body)
