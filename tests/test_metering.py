"""Unit tests of token budgets and usage events, through the hooks in mitmproxy's test context."""

import asyncio
import contextlib
import gzip
import json
import os

from mitmproxy import http
from mitmproxy.test import taddons

from addon.metering import UsageMeter
from addon.proxy import KeyEnforcer
from addon.records import Settlement
from addon.recorder import UsageRecorder
from addon.settings import Settings
from tests.unit_support import add_key, add_service, error_of, make_flow, run_request_hooks


@contextlib.contextmanager
def metering_context(db_path):
    settings = Settings()
    enforcer = KeyEnforcer(settings)
    recorder = UsageRecorder(settings)
    meter = UsageMeter(recorder)
    with contextlib.chdir(os.path.dirname(db_path)), taddons.context(settings, enforcer, meter, recorder) as tctx:
        tctx.configure(settings, keys_db=db_path)
        try:
            yield enforcer, meter, recorder, settings.store
        finally:
            settings.done()


def chat_flow(secret: str, max_tokens: int | None = 100) -> http.HTTPFlow:
    flow = make_flow([("X-Virtual-Key", secret), ("Content-Type", "application/json")], method="POST", path="/v1/chat/completions")
    body = {"model": "m", "messages": []}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    flow.request.content = json.dumps(body).encode()
    return flow


def answer(flow: http.HTTPFlow, usage: dict | None, encoding: str | None = None) -> None:
    body = json.dumps({"choices": [], **({"usage": usage} if usage else {})}).encode()
    headers = {"Content-Type": "application/json"}
    if encoding == "gzip":
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    flow.response = http.Response.make(200, b"", headers)
    flow.response.raw_content = body  # already encoded: make() would encode it again


def test_budget_admits_one_of_ten(tmp_path):
    async def scenario():
        with metering_context(str(tmp_path / "keys.db")) as (enforcer, meter, recorder, store):
            add_service(store)
            key_id, secret = add_key(store, token_budget=1000)
            store.record_usage([], [Settlement(key_id, 900, None)])
            flows = [chat_flow(secret) for _ in range(10)]
            await asyncio.gather(*(run_request_hooks(enforcer, flow) for flow in flows))
            return flows

    flows = asyncio.run(scenario())
    forwarded = [flow for flow in flows if flow.response is None]
    refused = [error_of(flow) for flow in flows if flow.response is not None]
    assert len(forwarded) == 1
    assert refused == [(429, "token budget exceeded")] * 9


def test_used_up_budget_refuses_without_estimate(tmp_path):
    async def scenario():
        with metering_context(str(tmp_path / "keys.db")) as (enforcer, meter, recorder, store):
            add_service(store)
            key_id, secret = add_key(store, token_budget=50)
            store.record_usage([], [Settlement(key_id, 50, None)])
            flow = chat_flow(secret, max_tokens=None)
            await run_request_hooks(enforcer, flow)
            return flow

    assert error_of(asyncio.run(scenario())) == (429, "token budget exceeded")


def test_settled_tokens_replace_reservation(tmp_path):
    async def scenario():
        with metering_context(str(tmp_path / "keys.db")) as (enforcer, meter, recorder, store):
            add_service(store)
            key_id, secret = add_key(store, token_budget=1000)
            flow = chat_flow(secret, max_tokens=500)
            await run_request_hooks(enforcer, flow)
            meter.request(flow)
            answer(flow, {"prompt_tokens": 20, "completion_tokens": 30, "total_tokens": 50}, encoding="gzip")
            meter.response(flow)
            await recorder.flush()
            page = store.usage_page(key_id, None, None, 1, 50)
            return store.get_key(key_id), page, flow

    key, page, flow = asyncio.run(scenario())
    assert key.tokens_used == 50
    assert key.requests == 1
    assert page.total == 1
    assert page.events[0].total_tokens == 50
    assert page.events[0].metered is True
    assert page.events[0].path == "/v1/chat/completions"
    assert "50 tokens" in flow.comment


def test_unmetered_response_charges_estimate(tmp_path):
    async def scenario():
        with metering_context(str(tmp_path / "keys.db")) as (enforcer, meter, recorder, store):
            add_service(store)
            key_id, secret = add_key(store, token_budget=1000)
            flow = chat_flow(secret, max_tokens=100)
            await run_request_hooks(enforcer, flow)
            meter.request(flow)
            answer(flow, None)
            meter.response(flow)
            await recorder.flush()
            return store.get_key(key_id), store.usage_page(key_id, None, None, 1, 50)

    key, page = asyncio.run(scenario())
    assert key.tokens_used == 100
    assert page.events[0].metered is False
    assert page.events[0].total_tokens is None


def test_refusal_recorded_with_reason(tmp_path):
    async def scenario():
        with metering_context(str(tmp_path / "keys.db")) as (enforcer, meter, recorder, store):
            add_service(store)
            key_id, secret = add_key(store, scope="read", rate_limit=5, token_budget=100)
            flow = chat_flow(secret, max_tokens=100)
            await run_request_hooks(enforcer, flow)
            meter.response(flow)
            await recorder.flush()
            # The whole budget is still free: the refusal reserved nothing.
            follow_up = chat_flow(secret, max_tokens=100)
            follow_up.request.method = "GET"
            await run_request_hooks(enforcer, follow_up)
            return store.get_key(key_id), store.usage_page(key_id, None, None, 1, 50), follow_up

    key, page, follow_up = asyncio.run(scenario())
    assert page.events[0].refused == "insufficient scope"
    assert page.events[0].status == 403
    assert key.requests == 0
    assert key.tokens_used == 0
    assert follow_up.response is None


def test_queued_events_written_at_shutdown(tmp_path):
    db_path = str(tmp_path / "keys.db")

    async def scenario():
        with metering_context(db_path) as (enforcer, meter, recorder, store):
            add_service(store)
            key_id, secret = add_key(store)
            flow = chat_flow(secret)
            await run_request_hooks(enforcer, flow)
            meter.request(flow)
            answer(flow, {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
            meter.response(flow)
            recorder.done()
            return key_id, store.usage_page(key_id, None, None, 1, 50)

    key_id, page = asyncio.run(scenario())
    assert page.total == 1


def test_interrupted_request_recorded_at_shutdown(tmp_path):
    async def scenario():
        with metering_context(str(tmp_path / "keys.db")) as (enforcer, meter, recorder, store):
            add_service(store)
            key_id, secret = add_key(store, token_budget=1000)
            flow = chat_flow(secret, max_tokens=40)
            await run_request_hooks(enforcer, flow)
            meter.request(flow)
            meter.done()
            recorder.done()
            return store.get_key(key_id), store.usage_page(key_id, None, None, 1, 50)

    key, page = asyncio.run(scenario())
    assert page.total == 1
    assert page.events[0].status is None
    assert key.tokens_used == 40


def test_event_stream_gets_meter(tmp_path):
    async def scenario():
        with metering_context(str(tmp_path / "keys.db")) as (enforcer, meter, recorder, store):
            add_service(store)
            _, secret = add_key(store)
            keyed = chat_flow(secret)
            await run_request_hooks(enforcer, keyed)
            plain = make_flow([])
            for flow in (keyed, plain):
                flow.response = http.Response.make(200, b"", {"Content-Type": "text/event-stream; charset=utf-8"})
                meter.responseheaders(flow)
            return keyed, plain

    keyed, plain = asyncio.run(scenario())
    assert callable(keyed.response.stream)
    assert plain.response.stream is True
