"""End-to-end tests of usage history, token counting and token budgets through a real mitmdump."""

import concurrent.futures
import gzip
import http.server
import json
import threading
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.e2e_support import LOOPBACK, Api, Mitmdump, error_of, proxy_session

FLUSH_WAIT_SECONDS = 10.0


class _LlmHandler(http.server.BaseHTTPRequestHandler):
    """An LLM-like upstream: each path answers with usage in another shape.

    /openai?tokens=N    JSON with OpenAI-style usage, N total tokens (default 30)
    /anthropic          JSON with Anthropic-style usage (5 in, 7 out)
    /gzip               gzip-encoded JSON with OpenAI-style usage (30 total)
    /stream             an event stream whose usage chunk is split across two writes
    /no-usage-stream    an event stream that never reports usage
    """

    protocol_version = "HTTP/1.1"
    server: "_LlmServer"

    def log_message(self, format: str, *args) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if parts.path == "/openai":
            total = int(query.get("tokens", ["30"])[0])
            time.sleep(float(query.get("delay", ["0"])[0]))
            self._json({"usage": {"prompt_tokens": total // 3, "completion_tokens": total - total // 3, "total_tokens": total}})
        elif parts.path == "/anthropic":
            self._json({"type": "message", "usage": {"input_tokens": 5, "output_tokens": 7}})
        elif parts.path == "/gzip":
            self._json({"usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}}, compress=True)
        elif parts.path == "/stream":
            usage_chunk = b'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}}\n\n'
            self._stream([
                b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n',
                b'data: {"choices": [{"delta": {"content": "lo"}}]}\n\n',
                usage_chunk[:30],
                usage_chunk[30:] + b"data: [DONE]\n\n",
            ])
        elif parts.path == "/no-usage-stream":
            self._stream([b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n', b"data: [DONE]\n\n"])
        else:
            self._json({"error": "no such path"}, status=404)

    do_GET = do_POST

    def _json(self, body: dict, status: int = 200, compress: bool = False) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if compress:
            payload = gzip.compress(payload)
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _stream(self, writes: list[bytes]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for index, data in enumerate(writes):
            if index:
                time.sleep(0.4)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.server.last_write_at = time.monotonic()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _LlmServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    last_write_at = 0.0


@pytest.fixture
def llm() -> Iterator[_LlmServer]:
    server = _LlmServer((LOOPBACK, 0), _LlmHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def llm_url(server: _LlmServer) -> str:
    return f"http://{LOOPBACK}:{server.server_address[1]}"


def usage_of(api: Api, key_id: str, query: str = "") -> dict:
    response = api.call("GET", f"/v1/keys/{key_id}/usage{query}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_events(api: Api, key_id: str, count: int) -> dict:
    """Poll the usage history until `count` events are written; events are flushed in batches."""
    deadline = time.monotonic() + FLUSH_WAIT_SECONDS
    while True:
        body = usage_of(api, key_id)
        if body["total"] >= count or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def post(proxy: Mitmdump, url: str, secret: str, body: dict | None = None):
    with proxy_session(proxy) as session:
        return session.post(url, json=body or {"model": "m", "messages": []}, headers={"X-Virtual-Key": secret}, timeout=20)


def test_json_usage_counted(proxy, api, llm):
    service = api.create_service(llm_url(llm))
    key = api.create_key(service.name)
    for path in ("/openai", "/anthropic", "/gzip"):
        assert post(proxy, llm_url(llm) + path, key.secret).status_code == 200

    body = wait_for_events(api, key.id, 3)
    by_path = {event["path"]: event for event in body["events"]}
    assert by_path["/openai"]["total_tokens"] == 30
    assert by_path["/anthropic"]["prompt_tokens"] == 5
    assert by_path["/anthropic"]["completion_tokens"] == 7
    assert by_path["/anthropic"]["total_tokens"] == 12
    assert by_path["/gzip"]["total_tokens"] == 30
    assert all(event["metered"] for event in body["events"])
    assert body["tokens"] == {"prompt": 10 + 5 + 10, "completion": 20 + 7 + 20, "total": 72}
    record = api.get_key(key.id)
    assert record["tokens_used"] == 72
    assert record["requests"] == 3


def test_event_fields(proxy, api, llm):
    service = api.create_service(llm_url(llm))
    key = api.create_key(service.name)
    assert post(proxy, llm_url(llm) + "/openai?tokens=9", key.secret).status_code == 200

    (event,) = wait_for_events(api, key.id, 1)["events"]
    assert event["path"] == "/openai"
    assert event["method"] == "POST"
    assert event["status"] == 200
    assert event["service"] == service.name
    assert event["latency_ms"] > 0
    assert event["request_bytes"] > 0
    assert event["response_bytes"] > 0
    assert event["refused"] is None
    assert event["time"].endswith("Z")


def test_stream_usage_split_across_writes(proxy, api, llm):
    service = api.create_service(llm_url(llm))
    key = api.create_key(service.name)
    with httpx.Client(proxy=proxy.proxy_url, trust_env=False, timeout=20) as client:
        with client.stream("POST", llm_url(llm) + "/stream", json={"stream": True}, headers={"X-Virtual-Key": key.secret}) as response:
            chunks = response.iter_raw()
            first = next(chunks)
            first_at = time.monotonic()
            rest = b"".join(chunks)

    assert b"Hel" in first
    assert first_at < llm.last_write_at
    assert b"[DONE]" in rest
    (event,) = wait_for_events(api, key.id, 1)["events"]
    assert event["total_tokens"] == 10
    assert event["metered"] is True


def test_stream_without_usage_unmetered(proxy, api, llm):
    service = api.create_service(llm_url(llm))
    key = api.create_key(service.name)
    assert post(proxy, llm_url(llm) + "/no-usage-stream", key.secret).status_code == 200

    (event,) = wait_for_events(api, key.id, 1)["events"]
    assert event["metered"] is False
    assert event["total_tokens"] is None


def test_budget_concurrent_requests(proxy, api, llm):
    service = api.create_service(llm_url(llm))
    key = api.create_key(service.name, token_budget=1000)
    assert post(proxy, llm_url(llm) + "/openai?tokens=900", key.secret).status_code == 200
    wait_for_events(api, key.id, 1)
    assert api.get_key(key.id)["tokens_used"] == 900

    def ask():
        return post(proxy, llm_url(llm) + "/openai?tokens=100&delay=0.5", key.secret, {"max_tokens": 100, "messages": []})

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda _: ask(), range(10)))

    statuses = sorted(response.status_code for response in responses)
    assert statuses.count(200) <= 1
    assert all(error_of(response) == "token budget exceeded" for response in responses if response.status_code == 429)
    assert statuses.count(200) + statuses.count(429) == 10
    wait_for_events(api, key.id, 11)
    record = api.get_key(key.id)
    # Each admitted request used no more than its max_tokens, so the total stays within the budget.
    assert record["tokens_used"] <= 1000
    assert record["tokens_remaining"] == 1000 - record["tokens_used"]


def test_used_up_budget_refused_then_reset(proxy, api, llm):
    service = api.create_service(llm_url(llm))
    key = api.create_key(service.name, token_budget=30)
    assert post(proxy, llm_url(llm) + "/openai?tokens=30", key.secret).status_code == 200
    wait_for_events(api, key.id, 1)

    refused = post(proxy, llm_url(llm) + "/openai", key.secret)
    assert refused.status_code == 429
    assert error_of(refused) == "token budget exceeded"

    reset = api.call("POST", f"/v1/keys/{key.id}/reset-budget")
    assert reset.status_code == 200
    assert reset.json()["tokens_used"] == 0
    assert post(proxy, llm_url(llm) + "/openai", key.secret).status_code == 200


def test_refused_request_recorded(proxy, api, llm):
    service = api.create_service(llm_url(llm))
    key = api.create_key(service.name, scope="read", rate_limit=1)
    refused = post(proxy, llm_url(llm) + "/openai", key.secret)
    assert refused.status_code == 403

    with proxy_session(proxy) as session:
        allowed = session.get(llm_url(llm) + "/anything", headers={"X-Virtual-Key": key.secret}, timeout=10)
    assert allowed.status_code == 404  # the upstream's 404: the rate limit did not count the refusal
    body = wait_for_events(api, key.id, 2)
    reasons = [event["refused"] for event in body["events"]]
    assert "insufficient scope" in reasons
    assert None in reasons
    assert api.get_key(key.id)["requests"] == 1


def test_usage_pagination_and_bounds(proxy, api, llm):
    service = api.create_service(llm_url(llm))
    key = api.create_key(service.name)
    before = time.time()
    for _ in range(5):
        assert post(proxy, llm_url(llm) + "/openai?tokens=3", key.secret).status_code == 200
    wait_for_events(api, key.id, 5)

    first = usage_of(api, key.id, "?per_page=2")
    third = usage_of(api, key.id, "?per_page=2&page=3")
    assert first["total"] == 5
    assert len(first["events"]) == 2
    assert len(third["events"]) == 1
    assert first["tokens"]["total"] == 15
    assert first["events"][0]["time"] >= first["events"][1]["time"]

    future = usage_of(api, key.id, "?from=2999-01-01T00:00:00Z")
    assert future["total"] == 0
    assert future["tokens"]["total"] == 0
    past = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(before - 60))
    assert usage_of(api, key.id, f"?from={past}")["total"] == 5
    assert usage_of(api, key.id, f"?to={past}")["total"] == 0


@pytest.mark.parametrize("query, field", [
    ("?from=yesterday", "from"),
    ("?to=2020-13-01T00:00:00Z", "to"),
    ("?page=0", "page"),
    ("?per_page=501", "per_page"),
    ("?per_page=abc", "per_page"),
    ("?from=2030-01-01T00:00:00Z&to=2020-01-01T00:00:00Z", "to"),
    ("?colour=red", "colour"),
])
def test_usage_bad_query(api, query, field):
    service = api.create_service("http://127.0.0.1:9")
    key = api.create_key(service.name)
    response = api.call("GET", f"/v1/keys/{key.id}/usage{query}")
    assert response.status_code == 400
    assert field in error_of(response)


def test_usage_unknown_key(api):
    response = api.call("GET", "/v1/keys/no-such-key/usage")
    assert response.status_code == 404
    assert error_of(response) == "not found"


def test_events_survive_restart(start_mitmdump, llm, tmp_path):
    first = start_mitmdump()
    api = first.api()
    service = api.create_service(llm_url(llm))
    key = api.create_key(service.name)
    for _ in range(3):
        assert post(first, llm_url(llm) + "/openai?tokens=4", key.secret).status_code == 200
    # Stop at once, most likely before the next batch is written: shutdown must write it.
    assert first.stop() == 0

    second = start_mitmdump()
    body = usage_of(second.api(), key.id)
    assert body["total"] == 3
    assert body["tokens"]["total"] == 12


def test_update_key_fields(api):
    service = api.create_service("http://127.0.0.1:9")
    key = api.create_key(service.name)
    expires_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3 * 365 * 86400))
    response = api.call("PUT", f"/v1/keys/{key.id}", json_body={
        "rate_limit": 7, "token_budget": 500, "expires_at": expires_at,
    })
    assert response.status_code == 200
    body = response.json()
    assert body["rate_limit"] == 7
    assert body["token_budget"] == 500
    assert body["tokens_remaining"] == 500
    assert body["expires_at"] == expires_at

    cleared = api.call("PUT", f"/v1/keys/{key.id}", json_body={"rate_limit": None, "token_budget": None})
    assert cleared.json()["rate_limit"] is None
    assert cleared.json()["token_budget"] is None
    assert cleared.json()["tokens_remaining"] is None


@pytest.mark.parametrize("body, field", [
    ({"target": "other"}, "target"),
    ({"token_budget": 0}, "token_budget"),
    ({"token_budget": "10"}, "token_budget"),
    ({"rate_limit": -1}, "rate_limit"),
    ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
    ({"expires_at": None}, "expires_at"),
    ({"key": "vk_x"}, "key"),
])
def test_update_key_rejects(api, body, field):
    service = api.create_service("http://127.0.0.1:9")
    key = api.create_key(service.name)
    response = api.call("PUT", f"/v1/keys/{key.id}", json_body=body)
    assert response.status_code == 400
    assert field in error_of(response)


def test_update_unknown_key(api):
    assert api.call("PUT", "/v1/keys/missing", json_body={"rate_limit": 1}).status_code == 404
    assert api.call("POST", "/v1/keys/missing/reset-budget").status_code == 404
