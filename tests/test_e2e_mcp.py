"""End to end: the official MCP Python SDK requests keys from a real mitmdump and uses them through it.

Everything binds to and connects to 127.0.0.1 only. The fixtures here are self-contained: one
mitmdump with its own database, a loopback upstream that records the headers it receives, and
the MCP endpoint reached both on the loopback API port and through the proxy at keys.mitm.
"""

import asyncio
import datetime
import http.server
import json
import os
import pathlib
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from mcp.shared.exceptions import McpError
from mcp.types import LATEST_PROTOCOL_VERSION

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parent.parent
ADDON_SCRIPT = REPOSITORY_ROOT / "addon" / "keys.py"
MITMDUMP = pathlib.Path(sys.executable).with_name("mitmdump")
LOOPBACK = "127.0.0.1"
ADMIN_TOKEN = "admin-" + secrets.token_urlsafe(24)
MCP_TOKEN = "mcp-" + secrets.token_urlsafe(24)
MAX_TTL_SECONDS = 600
STARTUP_TIMEOUT_SECONDS = 30.0
CALL_TIMEOUT_SECONDS = 20.0
# streamablehttp_client is the SDK's older client entry point, which recent 1.x releases (1.30 among
# them) mark as deprecated in favour of streamable_http_client.
pytestmark = pytest.mark.filterwarnings("ignore:Use `streamable_http_client` instead:DeprecationWarning")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def client_environment() -> dict[str, str]:
    """Return this process's environment without proxy settings, with no host exempt from a proxy."""
    environment = dict(os.environ)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        environment.pop(name, None)
    environment["NO_PROXY"] = ""
    environment["no_proxy"] = ""
    return environment


# -- upstream -------------------------------------------------------------------------------


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        self.server.received.append((self.command, self.path, dict(self.headers.items())))
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


class Upstream:
    """A plain-HTTP server on 127.0.0.1 that records method, path and headers of each request."""

    def __init__(self) -> None:
        self.server = http.server.ThreadingHTTPServer((LOOPBACK, 0), _RecordingHandler)
        self.server.daemon_threads = True
        self.server.received = []
        self.base_url = f"http://{LOOPBACK}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def requests_for(self, path: str) -> list[tuple[str, str, dict[str, str]]]:
        return [request for request in self.server.received if request[1] == path]


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


# -- mitmdump -------------------------------------------------------------------------------


class Mitmdump:
    """A mitmdump process with the mitmkeys addon, its proxy and API on free loopback ports."""

    def __init__(self, directory: pathlib.Path, *extra_args: str, max_ttl: int = MAX_TTL_SECONDS) -> None:
        self.directory = directory
        self.proxy_port = free_port()
        self.api_port = free_port()
        self.log_path = directory / "mitmdump.log"
        self.proxy_url = f"http://{LOOPBACK}:{self.proxy_port}"
        self.api_url = f"http://{LOOPBACK}:{self.api_port}"
        self.command = [
            str(MITMDUMP), "-s", str(ADDON_SCRIPT),
            "--listen-host", LOOPBACK, "-p", str(self.proxy_port),
            "--set", f"confdir={directory / 'confdir'}",
            "--set", f"keys_db={directory / 'keys.db'}",
            "--set", f"keys_api_port={self.api_port}",
            "--set", f"keys_mcp_token={MCP_TOKEN}",
            "--set", f"keys_mcp_max_ttl={max_ttl}",
            *extra_args,
        ]
        self.process: subprocess.Popen | None = None

    def start(self) -> "Mitmdump":
        environment = client_environment()
        environment["KEYS_ADMIN_TOKEN"] = ADMIN_TOKEN
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=environment, cwd=self.directory,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mitmdump exited with {self.process.returncode}:\n{self.log_text()}")
            if self._api_ready() and self._proxy_accepts():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mitmdump did not start in {STARTUP_TIMEOUT_SECONDS} s:\n{self.log_text()}")

    def _api_ready(self) -> bool:
        try:
            return admin_call(self.api_url, "GET", "/v1/services").status_code == 200
        except requests.ConnectionError:
            return False

    def _proxy_accepts(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.proxy_port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Stop mitmdump as Ctrl-C does, and kill it when it does not exit in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def proxy_session(self) -> requests.Session:
        """Return a session that sends every URL, loopback included, through this proxy."""
        session = requests.Session()
        session.trust_env = False
        session.proxies = {"http": self.proxy_url, "https": self.proxy_url}
        return session


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mitmdump]:
    process = Mitmdump(tmp_path_factory.mktemp("mitmdump-mcp")).start()
    yield process
    process.stop()


def admin_call(base_url: str, method: str, path: str, *, token: str | None = ADMIN_TOKEN, **kwargs: Any) -> requests.Response:
    """Call the management API directly, with no proxy, as the admin unless another token is given."""
    headers = kwargs.pop("headers", {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    with requests.Session() as session:
        session.trust_env = False
        return session.request(method, base_url + path, headers=headers, timeout=CALL_TIMEOUT_SECONDS, **kwargs)


def create_service(proxy: Mitmdump, upstream: Upstream) -> tuple[str, str]:
    """Create a service for the upstream with a fresh name and credential, and return both."""
    name = f"svc-{secrets.token_hex(4)}"
    credential = f"cred-{secrets.token_urlsafe(24)}"
    response = admin_call(proxy.api_url, "POST", "/v1/services", json={"name": name, "base_url": upstream.base_url, "credential": credential})
    assert response.status_code == 201, response.text
    return name, credential


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


def parse_utc(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.mark.parametrize("endpoint", ["loopback", "through-proxy"])
def test_sdk_one_shot_key_through_proxy(proxy: Mitmdump, upstream: Upstream, endpoint: str) -> None:
    url, via_proxy = mcp_urls(proxy)[endpoint]
    service_name, credential = create_service(proxy, upstream)
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
    with proxy.proxy_session() as session:
        first = session.get(upstream.base_url + path, headers={"X-Virtual-Key": key["virtual_key"]}, timeout=CALL_TIMEOUT_SECONDS)
        second = session.get(upstream.base_url + path, headers={"X-Virtual-Key": key["virtual_key"]}, timeout=CALL_TIMEOUT_SECONDS)

    assert first.status_code == 200
    assert second.status_code == 401
    assert second.json() == {"error": "key already used"}
    ((_, _, received),) = upstream.requests_for(path)
    assert received["Authorization"] == f"Bearer {credential}"
    assert received["X-Virtual-Key-Agent"] == agent
    assert received["X-Virtual-Key-ID"] == key["id"]

    listed = admin_call(proxy.api_url, "GET", "/v1/keys")
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


def test_sdk_ttl_above_cap_lowered(proxy: Mitmdump, upstream: Upstream) -> None:
    url, via_proxy = mcp_urls(proxy)["loopback"]
    service_name, _ = create_service(proxy, upstream)

    async def steps(session: ClientSession, initialized):
        return await session.call_tool("request_key", {"service_name": service_name, "ttl_seconds": 86400})

    before = time.time()
    issued = run_session(url, via_proxy, steps)
    key = issued.structuredContent

    assert issued.isError is False
    assert key["ttl_seconds"] == MAX_TTL_SECONDS
    assert before + MAX_TTL_SECONDS - 1 <= parse_utc(key["expires_at"]) <= time.time() + MAX_TTL_SECONDS + 1
    assert any(f"maximum of {MAX_TTL_SECONDS}" in block.text for block in issued.content)
    record = admin_call(proxy.api_url, "GET", f"/v1/keys/{key['id']}").json()
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


def endpoint_call(proxy: Mitmdump, endpoint: str, method: str, path: str, *, token: str | None, **kwargs: Any) -> requests.Response:
    """Call the management API on the loopback port, or through the proxy at keys.mitm."""
    if endpoint == "loopback":
        return admin_call(proxy.api_url, method, path, token=token, **kwargs)
    headers = kwargs.pop("headers", {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    with proxy.proxy_session() as session:
        return session.request(method, "http://keys.mitm" + path, headers=headers, timeout=CALL_TIMEOUT_SECONDS, **kwargs)


ENDPOINTS = ["loopback", "through-proxy"]
PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/keys"), ("GET", "/v1/services"), ("POST", "/v1/keys")])
def test_mcp_token_rejected_by_rest(proxy: Mitmdump, endpoint: str, method: str, path: str) -> None:
    response = endpoint_call(proxy, endpoint, method, path, token=MCP_TOKEN, json={"target": "anything"})

    assert response.status_code == 401
    assert response.json() == {"error": "unauthorized"}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_mcp_missing_or_wrong_token(proxy: Mitmdump, endpoint: str, token: str | None) -> None:
    response = endpoint_call(proxy, endpoint, "POST", "/mcp", token=token, json=PING)

    assert response.status_code == 401
    assert response.json() == {"error": "unauthorized"}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("token", [MCP_TOKEN, ADMIN_TOKEN])
def test_mcp_accepts_both_tokens(proxy: Mitmdump, endpoint: str, token: str) -> None:
    response = endpoint_call(proxy, endpoint, "POST", "/mcp", token=token, json=PING)

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == {"jsonrpc": "2.0", "id": 1, "result": {}}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_mcp_parse_error(proxy: Mitmdump, endpoint: str) -> None:
    response = endpoint_call(
        proxy, endpoint, "POST", "/mcp", token=MCP_TOKEN, data=b'{"jsonrpc": "2.0", "id": 1,',
        headers={"Content-Type": "application/json"},
    )

    assert response.status_code == 400
    assert response.json()["error"]["code"] == -32700
    assert response.json()["id"] is None


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_mcp_invalid_request(proxy: Mitmdump, endpoint: str) -> None:
    response = endpoint_call(proxy, endpoint, "POST", "/mcp", token=MCP_TOKEN, json={"id": 3, "method": "ping"})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == -32600


def test_mcp_unknown_method(proxy: Mitmdump) -> None:
    response = endpoint_call(proxy, "loopback", "POST", "/mcp", token=MCP_TOKEN, json={"jsonrpc": "2.0", "id": 9, "method": "prompts/list"})

    assert response.status_code == 200
    assert response.json()["id"] == 9
    assert response.json()["error"]["code"] == -32601


def test_mcp_notification_202(proxy: Mitmdump) -> None:
    response = endpoint_call(proxy, "through-proxy", "POST", "/mcp", token=MCP_TOKEN, json={"jsonrpc": "2.0", "method": "notifications/initialized"})

    assert response.status_code == 202
    assert response.content == b""


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_mcp_get_and_delete_405(proxy: Mitmdump, endpoint: str, method: str) -> None:
    response = endpoint_call(proxy, endpoint, method, "/mcp", token=MCP_TOKEN, headers={"Accept": "text/event-stream"})

    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"


def test_mcp_unsupported_version_header(proxy: Mitmdump) -> None:
    response = endpoint_call(proxy, "loopback", "POST", "/mcp", token=MCP_TOKEN, json=PING, headers={"MCP-Protocol-Version": "1999-12-31"})

    assert response.status_code == 400
    assert "1999-12-31" in response.json()["error"]["message"]


def test_mcp_batch_refused_in_2025_06_18(proxy: Mitmdump) -> None:
    response = endpoint_call(proxy, "loopback", "POST", "/mcp", token=MCP_TOKEN, json=[PING], headers={"MCP-Protocol-Version": "2025-06-18"})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == -32600


def test_mcp_body_over_limit(proxy: Mitmdump) -> None:
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "' + b"x" * (1024 * 1024) + b'"}}'
    response = endpoint_call(proxy, "loopback", "POST", "/mcp", token=MCP_TOKEN, data=body, headers={"Content-Type": "application/json"})

    assert response.status_code == 413


def test_bad_mcp_max_ttl_stops_startup(tmp_path: pathlib.Path) -> None:
    process = Mitmdump(tmp_path, max_ttl=0)
    completed = subprocess.run(
        process.command, capture_output=True, text=True, env=client_environment(), cwd=tmp_path, timeout=STARTUP_TIMEOUT_SECONDS,
    )

    assert completed.returncode != 0
    assert "keys_mcp_max_ttl=0" in completed.stdout + completed.stderr


def test_saved_flows_keep_no_secret(tmp_path: pathlib.Path, upstream: Upstream) -> None:
    flows_path = tmp_path / "flows.mitm"
    process = Mitmdump(tmp_path, "--set", f"save_stream_file={flows_path}").start()
    try:
        service_name, _ = create_service(process, upstream)

        async def steps(session: ClientSession, initialized):
            return await session.call_tool("request_key", {"service_name": service_name})

        issued = run_session("http://keys.mitm/mcp", process.proxy_url, steps)
    finally:
        process.stop()

    secret = issued.structuredContent["virtual_key"]
    saved = flows_path.read_bytes()
    assert b"keys.mitm" in saved or b"/mcp" in saved
    assert secret.encode() not in saved
    assert MCP_TOKEN.encode() not in saved
