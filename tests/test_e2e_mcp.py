"""End to end: the official MCP Python SDK requests keys from a real mitmdump and uses them through it.

Everything binds to and connects to 127.0.0.1 only. The module's shared `proxy` runs with the MCP
endpoint enabled, and the tests reach that endpoint both on the loopback API port and through the
proxy at keys.mitm.
"""

import asyncio
import json
import pathlib
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import requests
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from mcp.shared.exceptions import McpError
from mcp.types import LATEST_PROTOCOL_VERSION

from tests.e2e_support import ADMIN_TOKEN, Api, Mitmdump, Upstream, parse_rfc3339, proxy_session

MCP_TOKEN = "mcp-" + secrets.token_urlsafe(24)
MAX_TTL_SECONDS = 600
CALL_TIMEOUT_SECONDS = 20.0
# streamablehttp_client is the SDK's older client entry point, which recent 1.x releases (1.30 among
# them) mark as deprecated in favour of streamable_http_client.
pytestmark = pytest.mark.filterwarnings("ignore:Use `streamable_http_client` instead:DeprecationWarning")


def mcp_options(max_ttl: int = MAX_TTL_SECONDS) -> tuple[str, ...]:
    """Return mitmdump arguments that enable the MCP endpoint for MCP_TOKEN, capping TTLs at `max_ttl` seconds."""
    return ("--set", f"keys_mcp_token={MCP_TOKEN}", "--set", f"keys_mcp_max_ttl={max_ttl}")


@pytest.fixture(scope="module")
def proxy_extra_args() -> tuple[str, ...]:
    """Extra mitmdump arguments that enable the MCP endpoint on this module's shared `proxy`."""
    return mcp_options()


# -- the SDK client -------------------------------------------------------------------------


def mcp_urls(proxy: Mitmdump) -> dict[str, tuple[str, str | None]]:
    """Return the endpoint URL and the proxy to use, for the loopback port and through the proxy."""
    return {
        "loopback": (f"{proxy.api_url}/mcp", None),
        "through-proxy": ("http://keys.mitm/mcp", proxy.proxy_url),
    }


def client_factory(via_proxy: str | None):
    """Return an httpx client factory for the SDK that ignores the environment and uses `via_proxy`."""

    def create(headers: dict[str, str] | None = None, timeout: httpx.Timeout | None = None, auth: httpx.Auth | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            headers=headers, timeout=timeout or httpx.Timeout(CALL_TIMEOUT_SECONDS), auth=auth,
            proxy=via_proxy, trust_env=False,
        )

    return create


async def with_session(url: str, via_proxy: str | None, token: str, steps):
    """Open an SDK session to `url`, initialize it and return what `steps(session, initialized)` returns."""
    headers = {"Authorization": f"Bearer {token}"}
    async with streamablehttp_client(url, headers=headers, timeout=CALL_TIMEOUT_SECONDS, httpx_client_factory=client_factory(via_proxy)) as (read, write, _):
        async with ClientSession(read, write) as session:
            initialized = await asyncio.wait_for(session.initialize(), CALL_TIMEOUT_SECONDS)
            return await asyncio.wait_for(steps(session, initialized), CALL_TIMEOUT_SECONDS)


def run_session(url: str, via_proxy: str | None, steps, token: str = MCP_TOKEN):
    return asyncio.run(with_session(url, via_proxy, token, steps))


@pytest.mark.parametrize("endpoint", ["loopback", "through-proxy"])
def test_sdk_one_shot_key_through_proxy(proxy: Mitmdump, api: Api, upstream: Upstream, endpoint: str) -> None:
    url, via_proxy = mcp_urls(proxy)[endpoint]
    service = api.create_service(upstream.base_url)
    service_name, credential = service.name, service.credential
    agent = f"agent-{endpoint}"

    async def steps(session: ClientSession, initialized):
        tools = await session.list_tools()
        services = await session.call_tool("list_services", {})
        issued = await session.call_tool("request_key", {"service_name": service_name, "one_shot": True, "agent": agent})
        return initialized, tools, services, issued

    initialized, tools, services, issued = run_session(url, via_proxy, steps)

    assert initialized.protocolVersion == LATEST_PROTOCOL_VERSION
    assert initialized.serverInfo.name == "mitmkeys"
    assert {tool.name for tool in tools.tools} == {"list_services", "request_key"}
    assert {"name": service_name, "base_url": upstream.base_url} in services.structuredContent["services"]
    assert credential not in services.model_dump_json()
    assert issued.isError is False
    key = issued.structuredContent
    assert key["virtual_key"].startswith("vk_")
    assert key["one_shot"] is True
    assert json.loads(issued.content[0].text) == key

    path = f"/one-shot-{endpoint}"
    with proxy_session(proxy) as session:
        first = session.get(upstream.base_url + path, headers={"X-Virtual-Key": key["virtual_key"]}, timeout=CALL_TIMEOUT_SECONDS)
        second = session.get(upstream.base_url + path, headers={"X-Virtual-Key": key["virtual_key"]}, timeout=CALL_TIMEOUT_SECONDS)

    assert first.status_code == 200
    assert second.status_code == 401
    assert second.json() == {"error": "key already used"}
    (received,) = upstream.received(path)
    assert received.path == path
    assert received.header_values("Authorization") == [f"Bearer {credential}"]
    assert received.header_values("X-Virtual-Key-Agent") == [agent]
    assert received.header_values("X-Virtual-Key-ID") == [key["id"]]

    listed = api.call("GET", "/v1/keys")
    assert listed.status_code == 200
    (record,) = [item for item in listed.json() if item["id"] == key["id"]]
    assert record["source"] == "mcp"
    assert record["one_shot"] is True
    assert record["used"] is True
    assert record["agent"] == agent
    assert record["target"] == service_name

    log_text = proxy.log_text()
    assert key["virtual_key"] not in log_text
    assert MCP_TOKEN not in log_text


def test_sdk_new_client_entry_point(proxy: Mitmdump) -> None:
    streamable_http = pytest.importorskip("mcp.client.streamable_http")
    if not hasattr(streamable_http, "streamable_http_client"):
        pytest.skip("this mcp release has no streamable_http_client")

    async def scenario():
        headers = {"Authorization": f"Bearer {MCP_TOKEN}"}
        async with httpx.AsyncClient(headers=headers, timeout=CALL_TIMEOUT_SECONDS, trust_env=False) as http_client:
            async with streamable_http.streamable_http_client(f"{proxy.api_url}/mcp", http_client=http_client) as (read, write, _):
                async with ClientSession(read, write) as session:
                    initialized = await session.initialize()
                    tools = await session.list_tools()
                    return initialized, tools

    initialized, tools = asyncio.run(asyncio.wait_for(scenario(), CALL_TIMEOUT_SECONDS))

    assert initialized.serverInfo.name == "mitmkeys"
    assert {tool.name for tool in tools.tools} == {"list_services", "request_key"}


def test_sdk_ttl_above_cap_lowered(proxy: Mitmdump, api: Api, upstream: Upstream) -> None:
    url, via_proxy = mcp_urls(proxy)["loopback"]
    service_name = api.create_service(upstream.base_url).name

    async def steps(session: ClientSession, initialized):
        return await session.call_tool("request_key", {"service_name": service_name, "ttl_seconds": 86400})

    before = time.time()
    issued = run_session(url, via_proxy, steps)
    key = issued.structuredContent

    assert issued.isError is False
    assert key["ttl_seconds"] == MAX_TTL_SECONDS
    assert before + MAX_TTL_SECONDS - 1 <= parse_rfc3339(key["expires_at"]) <= time.time() + MAX_TTL_SECONDS + 1
    assert any(f"maximum of {MAX_TTL_SECONDS}" in block.text for block in issued.content)
    record = api.get_key(key["id"])
    assert record["expires_at"] == key["expires_at"]


def test_sdk_tool_errors(proxy: Mitmdump) -> None:
    url, via_proxy = mcp_urls(proxy)["through-proxy"]

    async def steps(session: ClientSession, initialized):
        unknown_service = await session.call_tool("request_key", {"service_name": "no-such-service"})
        bad_scope = await session.call_tool("request_key", {"service_name": "no-such-service", "scope": "root"})
        with pytest.raises(McpError) as unknown_tool:
            await session.call_tool("launch_missiles", {})
        await session.send_ping()
        return unknown_service, bad_scope, unknown_tool.value

    unknown_service, bad_scope, unknown_tool = run_session(url, via_proxy, steps, token=ADMIN_TOKEN)

    assert unknown_service.isError is True
    assert "not found" in unknown_service.content[0].text
    assert bad_scope.isError is True
    assert "scope must be 'read' or 'write'" in bad_scope.content[0].text
    assert unknown_tool.error.code == -32602
    assert "launch_missiles" in unknown_tool.error.message


# -- HTTP level: tokens, methods, malformed JSON-RPC -------------------------------------------


def endpoint_call(proxy: Mitmdump, endpoint: str, method: str, path: str, *, token: str | None, **fields: Any) -> requests.Response:
    """Call the management API on the loopback port or through the proxy at keys.mitm, passing `fields` to Api.call."""
    if endpoint == "loopback":
        api = proxy.api()
    else:
        api = Api("http://keys.mitm", proxy_session(proxy))
    with api.session:
        return api.call(method, path, token=token, timeout=CALL_TIMEOUT_SECONDS, **fields)


ENDPOINTS = ["loopback", "through-proxy"]
PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/keys"), ("GET", "/v1/services"), ("POST", "/v1/keys")])
def test_mcp_token_rejected_by_rest(proxy: Mitmdump, endpoint: str, method: str, path: str) -> None:
    response = endpoint_call(proxy, endpoint, method, path, token=MCP_TOKEN, json_body={"target": "anything"})

    assert response.status_code == 401
    assert response.json() == {"error": "unauthorized"}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_mcp_missing_or_wrong_token(proxy: Mitmdump, endpoint: str, token: str | None) -> None:
    response = endpoint_call(proxy, endpoint, "POST", "/mcp", token=token, json_body=PING)

    assert response.status_code == 401
    assert response.json() == {"error": "unauthorized"}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("token", [MCP_TOKEN, ADMIN_TOKEN])
def test_mcp_accepts_both_tokens(proxy: Mitmdump, endpoint: str, token: str) -> None:
    response = endpoint_call(proxy, endpoint, "POST", "/mcp", token=token, json_body=PING)

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == {"jsonrpc": "2.0", "id": 1, "result": {}}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_mcp_parse_error(proxy: Mitmdump, endpoint: str) -> None:
    response = endpoint_call(proxy, endpoint, "POST", "/mcp", token=MCP_TOKEN, data=b'{"jsonrpc": "2.0", "id": 1,')

    assert response.status_code == 400
    assert response.json()["error"]["code"] == -32700
    assert response.json()["id"] is None


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_mcp_invalid_request(proxy: Mitmdump, endpoint: str) -> None:
    response = endpoint_call(proxy, endpoint, "POST", "/mcp", token=MCP_TOKEN, json_body={"id": 3, "method": "ping"})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == -32600


def test_mcp_unknown_method(proxy: Mitmdump) -> None:
    response = endpoint_call(proxy, "loopback", "POST", "/mcp", token=MCP_TOKEN, json_body={"jsonrpc": "2.0", "id": 9, "method": "prompts/list"})

    assert response.status_code == 200
    assert response.json()["id"] == 9
    assert response.json()["error"]["code"] == -32601


def test_mcp_notification_202(proxy: Mitmdump) -> None:
    response = endpoint_call(proxy, "through-proxy", "POST", "/mcp", token=MCP_TOKEN, json_body={"jsonrpc": "2.0", "method": "notifications/initialized"})

    assert response.status_code == 202
    assert response.content == b""


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_mcp_get_and_delete_405(proxy: Mitmdump, endpoint: str, method: str) -> None:
    response = endpoint_call(proxy, endpoint, method, "/mcp", token=MCP_TOKEN, headers={"Accept": "text/event-stream"})

    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"


def test_mcp_unsupported_version_header(proxy: Mitmdump) -> None:
    response = endpoint_call(proxy, "loopback", "POST", "/mcp", token=MCP_TOKEN, json_body=PING, headers={"MCP-Protocol-Version": "1999-12-31"})

    assert response.status_code == 400
    assert "1999-12-31" in response.json()["error"]["message"]


def test_mcp_batch_refused_in_2025_06_18(proxy: Mitmdump) -> None:
    response = endpoint_call(proxy, "loopback", "POST", "/mcp", token=MCP_TOKEN, json_body=[PING], headers={"MCP-Protocol-Version": "2025-06-18"})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == -32600


def test_mcp_body_over_limit(proxy: Mitmdump) -> None:
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "' + b"x" * (1024 * 1024) + b'"}}'
    response = endpoint_call(proxy, "loopback", "POST", "/mcp", token=MCP_TOKEN, data=body)

    assert response.status_code == 413


def test_bad_mcp_max_ttl_stops_startup(tmp_path: pathlib.Path) -> None:
    process = Mitmdump(tmp_path, tmp_path / "keys.db", mcp_options(max_ttl=0))
    # start() spawns mitmdump a second time after a failed start, so the log contains the output of both runs.
    try:
        with pytest.raises(RuntimeError, match="did not start"):
            process.start()
    finally:
        process.stop()

    assert process.process is not None
    assert process.process.returncode != 0
    assert "keys_mcp_max_ttl=0" in process.log_text()


def test_saved_flows_keep_no_secret(
    tmp_path: pathlib.Path, upstream: Upstream, start_mitmdump: Callable[..., Mitmdump],
) -> None:
    flows_path = tmp_path / "flows.mitm"
    process = start_mitmdump(*mcp_options(), "--set", f"save_stream_file={flows_path}")
    service_name = process.api().create_service(upstream.base_url).name

    async def steps(session: ClientSession, initialized):
        return await session.call_tool("request_key", {"service_name": service_name})

    issued = run_session("http://keys.mitm/mcp", process.proxy_url, steps)
    # mitmproxy's save addon closes, and so flushes, the flow file only when mitmdump stops.
    process.stop()

    secret = issued.structuredContent["virtual_key"]
    saved = flows_path.read_bytes()
    assert b"keys.mitm" in saved or b"/mcp" in saved
    assert secret.encode() not in saved
    assert MCP_TOKEN.encode() not in saved
