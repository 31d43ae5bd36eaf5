"""Unit tests of the request hook: each check of a virtual key, in mitmproxy's test context."""

import asyncio
import logging
import time

import pytest
from mitmproxy import http

from addon import injection, timeutil
from addon.proxy import DECISION
from tests.unit_support import (
    CREDENTIAL, add_key, add_service, enforcer_context, error_of, make_flow, run_request_hooks,
)


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "keys.db")


def test_good_key_injects_credential(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            key_id, secret = add_key(store)
            flow = make_flow([("X-Virtual-Key", secret)])
            await run_request_hooks(enforcer, flow)
            return flow, key_id

    flow, key_id = run(scenario())
    assert flow.response is None
    assert flow.request.headers["Authorization"] == f"Bearer {CREDENTIAL}"
    assert flow.request.headers["X-Virtual-Key-ID"] == key_id
    assert "X-Virtual-Key" not in flow.request.headers
    assert key_id in flow.comment
    assert "svc" in flow.comment


@pytest.mark.parametrize("header", [
    ("Authorization", "Bearer {secret}"),
    ("authorization", "bEaReR {secret}"),
    ("x-api-key", "{secret}"),
    ("x-goog-api-key", "{secret}"),
])
def test_key_found_in_any_header(db_path, header):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store, header="x-api-key")
            _, secret = add_key(store)
            flow = make_flow([(header[0], header[1].format(secret=secret))])
            await run_request_hooks(enforcer, flow)
            return flow, secret

    flow, secret = run(scenario())
    assert flow.response is None
    assert flow.request.headers["x-api-key"] == CREDENTIAL
    assert all(secret not in value for _, value in flow.request.headers.items(multi=True))


def test_client_copies_of_injected_headers_dropped(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store, header="X-Api-Key")
            key_id, secret = add_key(store)
            flow = make_flow([
                ("X-Virtual-Key", secret),
                ("x-virtual-key-id", "forged"),
                ("X-VIRTUAL-KEY-ID", "forged-too"),
                ("x-api-key", "client-chosen-credential"),
            ])
            await run_request_hooks(enforcer, flow)
            return flow, key_id

    flow, key_id = run(scenario())
    assert flow.request.headers.get_all("X-Virtual-Key-ID") == [key_id]
    assert flow.request.headers.get_all("X-Api-Key") == [CREDENTIAL]


def test_unknown_key_refused(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            flow = make_flow([("X-Virtual-Key", "vk_" + "a" * 40)])
            await run_request_hooks(enforcer, flow)
            return flow

    flow = run(scenario())
    assert error_of(flow) == (401, "invalid key")
    assert "X-Virtual-Key" not in flow.request.headers


def test_malformed_key_header_refused(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, _, _):
            flow = make_flow([("X-Virtual-Key", "not-a-key")])
            await run_request_hooks(enforcer, flow)
            return flow

    assert error_of(run(scenario())) == (401, "invalid key")


def test_conflicting_keys_refused(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            _, first = add_key(store)
            _, second = add_key(store)
            flow = make_flow([("X-Virtual-Key", first), ("Authorization", f"Bearer {second}")])
            await run_request_hooks(enforcer, flow)
            return flow, first, second

    flow, first, second = run(scenario())
    assert error_of(flow) == (401, "conflicting keys")
    headers = str(flow.request.headers)
    assert first not in headers
    assert second not in headers


def test_same_key_twice_accepted(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            _, secret = add_key(store)
            flow = make_flow([("X-Virtual-Key", secret), ("Authorization", f"Bearer {secret}")])
            await run_request_hooks(enforcer, flow)
            return flow

    flow = run(scenario())
    assert flow.response is None
    assert flow.request.headers["Authorization"] == f"Bearer {CREDENTIAL}"


def test_revoked_key_refused(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            key_id, secret = add_key(store)
            store.revoke_key(key_id)
            flow = make_flow([("X-Virtual-Key", secret)])
            await run_request_hooks(enforcer, flow)
            return flow

    assert error_of(run(scenario())) == (401, "key revoked")


def test_expired_key_refused(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            _, secret = add_key(store, expires_at=timeutil.now() - 1)
            flow = make_flow([("X-Virtual-Key", secret)])
            await run_request_hooks(enforcer, flow)
            return flow

    assert error_of(run(scenario())) == (401, "key expired")


def test_revoked_wins_over_expired(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            key_id, secret = add_key(store, expires_at=timeutil.now() - 1)
            store.revoke_key(key_id)
            flow = make_flow([("X-Virtual-Key", secret)])
            await run_request_hooks(enforcer, flow)
            return flow

    assert error_of(run(scenario())) == (401, "key revoked")


def test_one_shot_key_used_once(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            key_id, secret = add_key(store, one_shot=True)
            first = make_flow([("X-Virtual-Key", secret)])
            second = make_flow([("X-Virtual-Key", secret)])
            await run_request_hooks(enforcer, first)
            await run_request_hooks(enforcer, second)
            return first, second, store.get_key(key_id)

    first, second, key = run(scenario())
    assert first.response is None
    assert error_of(second) == (401, "key already used")
    assert key.used is True


def test_refused_request_keeps_one_shot_unused(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            key_id, secret = add_key(store, one_shot=True, scope="read")
            refused = make_flow([("X-Virtual-Key", secret)], method="POST")
            await run_request_hooks(enforcer, refused)
            return refused, store.get_key(key_id)

    refused, key = run(scenario())
    assert error_of(refused) == (403, "insufficient scope")
    assert key.used is False


@pytest.mark.parametrize("host, port, scheme, path, host_header", [
    ("other.example", 8000, "http", "/v1/models", "other.example:8000"),
    ("api.example", 8001, "http", "/v1/models", "api.example:8001"),
    ("api.example", 8000, "https", "/v1/models", "api.example:8000"),
    ("other.example", 8000, "http", "/v1/models", "api.example:8000"),
    ("api.example", 8000, "http", "/v1/models", "other.example:8000"),
    ("api.example", 8000, "http", "/v1/models", "api.example:9999"),
    ("api.example", 8000, "http", "/v2/models", "api.example:8000"),
    ("api.example", 8000, "http", "/v1x", "api.example:8000"),
    ("api.example", 8000, "http", "/v1/../admin", "api.example:8000"),
    ("api.example", 8000, "http", "/v1/%2e%2e/admin", "api.example:8000"),
])
def test_wrong_destination_refused(db_path, host, port, scheme, path, host_header):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store, base_url="http://api.example:8000/v1")
            _, secret = add_key(store)
            flow = make_flow([("X-Virtual-Key", secret)], scheme=scheme, host=host, port=port, path=path, host_header=host_header)
            await run_request_hooks(enforcer, flow)
            return flow

    flow = run(scenario())
    assert error_of(flow) == (403, "key not valid for this host")
    assert CREDENTIAL not in str(flow.request.headers)


@pytest.mark.parametrize("path, host_header", [
    ("/v1", "api.example:8000"),
    ("/v1/", "API.EXAMPLE:8000"),
    ("/v1/chat/completions?x=1", "api.example:8000"),
    ("/v1/models", None),
])
def test_destination_inside_prefix_accepted(db_path, path, host_header):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store, base_url="http://api.example:8000/v1/")
            _, secret = add_key(store)
            flow = make_flow([("X-Virtual-Key", secret)], path=path, host_header=host_header)
            await run_request_hooks(enforcer, flow)
            return flow

    assert run(scenario()).response is None


def test_default_port_in_base_url_matches(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store, base_url="https://api.example")
            _, secret = add_key(store)
            flow = make_flow([("X-Virtual-Key", secret)], scheme="https", port=443, host_header="api.example")
            await run_request_hooks(enforcer, flow)
            return flow

    assert run(scenario()).response is None


@pytest.mark.parametrize("method, refused", [
    ("GET", False), ("HEAD", False), ("OPTIONS", False),
    ("POST", True), ("PUT", True), ("DELETE", True), ("PATCH", True),
])
def test_read_scope_methods(db_path, method, refused):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            _, secret = add_key(store, scope="read")
            flow = make_flow([("X-Virtual-Key", secret)], method=method)
            await run_request_hooks(enforcer, flow)
            return flow

    flow = run(scenario())
    if refused:
        assert error_of(flow) == (403, "insufficient scope")
    else:
        assert flow.response is None


def test_rate_limit_per_minute(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            _, secret = add_key(store, rate_limit=2)
            flows = [make_flow([("X-Virtual-Key", secret)]) for _ in range(3)]
            for flow in flows:
                await run_request_hooks(enforcer, flow)
            return flows

    # The three requests must fall in one clock minute.
    if timeutil.now() % 60 > 58:
        time.sleep(61 - timeutil.now() % 60)
    flows = run(scenario())
    assert flows[0].response is None
    assert flows[1].response is None
    assert error_of(flows[2]) == (429, "rate limit exceeded")
    assert 1 <= int(flows[2].response.headers["Retry-After"]) <= 60


def test_refusals_do_not_count_against_rate_limit(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            _, secret = add_key(store, rate_limit=1, scope="read")
            refused = make_flow([("X-Virtual-Key", secret)], method="POST")
            await run_request_hooks(enforcer, refused)
            allowed = make_flow([("X-Virtual-Key", secret)])
            await run_request_hooks(enforcer, allowed)
            return refused, allowed

    refused, allowed = run(scenario())
    assert error_of(refused) == (403, "insufficient scope")
    assert allowed.response is None


def test_no_key_passes_untouched(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, _, _):
            flow = make_flow([("Authorization", "Bearer sk-client-own"), ("X-Virtual-Key-ID", "kept")])
            before = flow.request.headers.copy()
            await run_request_hooks(enforcer, flow)
            return flow, before

    flow, before = run(scenario())
    assert flow.response is None
    assert flow.request.headers == before
    assert DECISION not in flow.metadata


def test_strict_mode_requires_key(db_path):
    async def scenario():
        with enforcer_context(db_path, keys_strict=True) as (enforcer, _, _):
            flow = make_flow([])
            await run_request_hooks(enforcer, flow)
            return flow

    assert error_of(run(scenario())) == (401, "missing key")


def test_store_unavailable_fails_closed(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            _, secret = add_key(store)
            store._loop_db.execute_sql("DROP TABLE virtual_key")
            flow = make_flow([("X-Virtual-Key", secret)])
            await run_request_hooks(enforcer, flow)
            return flow

    flow = run(scenario())
    assert error_of(flow) == (503, "key store unavailable")
    assert CREDENTIAL not in str(flow.request.headers)


def test_credential_redacted_after_response(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            _, secret = add_key(store)
            flow = make_flow([("X-Virtual-Key", secret)])
            await run_request_hooks(enforcer, flow)
            injected = flow.request.headers["Authorization"]
            flow.response = flow.response or http.Response.make(200)
            enforcer.responseheaders(flow)
            return flow, injected

    flow, injected = run(scenario())
    assert injected == f"Bearer {CREDENTIAL}"
    assert flow.request.headers["Authorization"] == injection.REDACTED


def test_credential_redacted_at_shutdown(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            _, secret = add_key(store)
            flow = make_flow([("X-Virtual-Key", secret)])
            await run_request_hooks(enforcer, flow)
            enforcer.done()
            return flow

    flow = run(scenario())
    assert CREDENTIAL not in str(flow.request.headers)


def test_refusal_logged_without_secret(db_path, caplog):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            key_id, secret = add_key(store, scope="read")
            flow = make_flow([("X-Virtual-Key", secret)], method="DELETE")
            await run_request_hooks(enforcer, flow)
            return key_id, secret

    with caplog.at_level(logging.INFO):
        key_id, secret = run(scenario())
    refusals = [record.getMessage() for record in caplog.records if "refused" in record.getMessage()]
    assert len(refusals) == 1
    assert key_id in refusals[0]
    assert "insufficient scope" in refusals[0]
    assert secret not in caplog.text
    assert CREDENTIAL not in caplog.text


def test_stream_large_bodies_rejected(db_path):
    async def scenario():
        with enforcer_context(db_path) as (_, _, tctx):
            with pytest.raises(Exception, match="stream_large_bodies"):
                tctx.options.update(stream_large_bodies="1m")

    run(scenario())


def test_agent_label_sent_upstream(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            _, labelled = add_key(store, agent="planner-bot", source="mcp")
            _, unlabelled = add_key(store)
            first = make_flow([("X-Virtual-Key", labelled), ("x-virtual-key-agent", "forged")])
            second = make_flow([("X-Virtual-Key", unlabelled), ("X-Virtual-Key-Agent", "forged")])
            await run_request_hooks(enforcer, first)
            await run_request_hooks(enforcer, second)
            return first, second

    first, second = run(scenario())
    assert first.request.headers.get_all("X-Virtual-Key-Agent") == ["planner-bot"]
    assert "X-Virtual-Key-Agent" not in second.request.headers


@pytest.mark.parametrize("authority, refused", [("api.example:8000", False), ("other.example:8000", True)])
def test_http2_authority_must_agree(db_path, authority, refused):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            _, secret = add_key(store)
            flow = make_flow([("X-Virtual-Key", secret)], host_header=None)
            flow.request.http_version = "HTTP/2.0"
            flow.request.authority = authority
            await run_request_hooks(enforcer, flow)
            return flow

    flow = run(scenario())
    assert flow.request.host_header == authority
    if refused:
        assert error_of(flow) == (403, "key not valid for this host")
    else:
        assert flow.response is None


@pytest.mark.parametrize("sni, refused", [("api.example", False), ("API.example.", False), ("other.example", True), (None, False)])
def test_tls_server_name_must_agree(db_path, sni, refused):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store, base_url="https://api.example")
            _, secret = add_key(store)
            flow = make_flow([("X-Virtual-Key", secret)], scheme="https", port=443, host_header="api.example", sni=sni)
            await run_request_hooks(enforcer, flow)
            return flow

    flow = run(scenario())
    if refused:
        assert error_of(flow) == (403, "key not valid for this host")
    else:
        assert flow.response is None


def test_absolute_form_target_must_agree(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            _, secret = add_key(store)
            other = make_flow([("X-Virtual-Key", secret)])
            other.request.authority = "other.example:8000"
            same = make_flow([("X-Virtual-Key", secret)])
            same.request.authority = "api.example:8000"
            for flow in (other, same):
                await run_request_hooks(enforcer, flow)
            return other, same

    other, same = run(scenario())
    assert error_of(other) == (403, "key not valid for this host")
    assert same.response is None
    assert same.request.authority == ""


@pytest.mark.parametrize("scope", ["read", "write"])
def test_trace_refused_for_every_scope(db_path, scope):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            _, secret = add_key(store, scope=scope)
            flow = make_flow([("X-Virtual-Key", secret)], method="TRACE")
            await run_request_hooks(enforcer, flow)
            return flow

    assert error_of(run(scenario())) == (403, "insufficient scope")


def test_revoked_while_body_arrives(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            key_id, secret = add_key(store)
            flow = make_flow([("X-Virtual-Key", secret)])
            await enforcer.requestheaders(flow)
            admitted_after_headers = flow.response is None
            store.revoke_key(key_id)
            await enforcer.request(flow)
            return flow, admitted_after_headers

    flow, admitted_after_headers = run(scenario())
    assert admitted_after_headers is True
    assert error_of(flow) == (401, "key revoked")
    assert CREDENTIAL not in str(flow.request.headers)


def test_underscore_copies_dropped(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            key_id, secret = add_key(store)
            flow = make_flow([
                ("X-Virtual-Key", secret), ("X_Virtual_Key_ID", "forged"), ("x_virtual_key_agent", "forged"),
            ])
            await run_request_hooks(enforcer, flow)
            return flow, key_id

    flow, key_id = run(scenario())
    names = [name.lower() for name, _ in flow.request.headers.items(multi=True)]
    assert "x_virtual_key_id" not in names
    assert "x_virtual_key_agent" not in names
    assert flow.request.headers["X-Virtual-Key-ID"] == key_id


def test_carriers_dropped_from_trailers(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            _, secret = add_key(store)
            flow = make_flow([("X-Virtual-Key", secret)])
            flow.request.trailers = http.Headers([
                (b"x-virtual-key", secret.encode()), (b"x-virtual-key-id", b"forged"), (b"x-checksum", b"kept"),
            ])
            await run_request_hooks(enforcer, flow)
            return flow

    trailers = run(scenario()).request.trailers
    assert list(trailers.keys()) == ["x-checksum"]


def test_echoed_credential_removed_from_response(db_path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            _, secret = add_key(store)
            flow = make_flow([("X-Virtual-Key", secret)])
            await run_request_hooks(enforcer, flow)
            flow.response = http.Response.make(
                200, f"you sent Authorization: Bearer {CREDENTIAL}".encode(), {"X-Echo": f"Bearer {CREDENTIAL}"},
            )
            enforcer.responseheaders(flow)
            enforcer.response(flow)
            return flow

    flow = run(scenario())
    assert CREDENTIAL.encode() not in flow.response.content
    assert CREDENTIAL not in str(flow.response.headers)



def test_strict_mode_turns_raw_tcp_off(db_path):
    async def scenario():
        with enforcer_context(db_path, keys_strict=True) as (_, _, tctx):
            return tctx.options.rawtcp

    assert run(scenario()) is False


@pytest.mark.parametrize("headers, path", [
    ([("Cookie", "session={secret}")], "/v1/models"),
    ([("X-Other", "vk_a, {secret}")], "/v1/models"),
    ([("Authorization", "Token {secret}")], "/v1/models"),
    ([], "/v1/models?key={secret}"),
    ([("X-Virtual-Key", "{secret}")], "/v1/models?key={secret}"),
])
def test_key_outside_own_header_refused(db_path, headers, path):
    async def scenario():
        with enforcer_context(db_path) as (enforcer, store, _):
            add_service(store)
            _, secret = add_key(store)
            flow = make_flow([(name, value.format(secret=secret)) for name, value in headers], path=path.format(secret=secret))
            await run_request_hooks(enforcer, flow)
            return flow, secret

    flow, secret = run(scenario())
    assert error_of(flow) == (401, "invalid key")
    assert secret not in flow.request.path
    assert secret not in str(flow.request.headers)
