"""Unit tests of the MCP endpoint: JSON-RPC handling, transport headers, tools and token routing."""

import asyncio
import json
import logging
import types

import jsonschema
import pytest
from mitmproxy import exceptions
from mcp.shared.version import SUPPORTED_PROTOCOL_VERSIONS as SDK_PROTOCOL_VERSIONS  # the official SDK
from mitmproxy.test import taddons

import addon
from addon import mcp, timeutil
from addon.apiserver import ApiListener
from addon.settings import Config, Settings
from addon.store import Store

ADMIN_TOKEN = "admin-unit-token"
MCP_TOKEN = "mcp-unit-token"
CREDENTIAL = "sk-unit-mcp-credential"
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def make_config(**changes) -> Config:
    values = dict(
        database="unused", admin_token=ADMIN_TOKEN, key_header="X-Virtual-Key", api_host="keys.mitm",
        api_port=0, strict=False, mcp_token=MCP_TOKEN, mcp_max_ttl=3600,
    )
    values.update(changes)
    return Config(**values)


@pytest.fixture
def store(tmp_path):
    opened = Store(str(tmp_path / "keys.db"))
    opened.open()
    yield opened
    opened.close()


@pytest.fixture
def service(store):
    return store.create_service("weather", "http://127.0.0.1:9/v1", CREDENTIAL, "Authorization")


def post(store, message, *, config=None, token=MCP_TOKEN, headers=None, method="POST"):
    """Send one HTTP request to the MCP endpoint. `message` is encoded as JSON unless it is bytes."""
    server = mcp.McpServer(store, config or make_config())
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    authorization = f"Bearer {token}" if token is not None else None
    return server.handle(method, authorization, JSON_HEADERS if headers is None else headers, body)


def request(method, params=None, request_id=1):
    message = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def call_tool(store, name, arguments=None, **options):
    params = {"name": name} if arguments is None else {"name": name, "arguments": arguments}
    reply = post(store, request("tools/call", params), **options)
    assert reply.status == 200
    return reply.body["result"]


def tool_error_text(result):
    assert result["isError"] is True
    return result["content"][0]["text"]


# -- initialize and version negotiation ---------------------------------------------------


@pytest.mark.parametrize("version", mcp.PROTOCOL_VERSIONS)
def test_initialize_echoes_supported_version(store, version):
    params = {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "unit", "version": "1"}}
    reply = post(store, request("initialize", params))

    assert reply.status == 200
    result = reply.body["result"]
    assert reply.body["id"] == 1
    assert result["protocolVersion"] == version
    assert result["serverInfo"] == {"name": "mitmkeys", "version": addon.__version__}
    assert result["capabilities"] == {"tools": {"listChanged": False}}
    assert "list_services" in result["instructions"]


@pytest.mark.parametrize(("requested", "expected"), [
    ("2099-01-01", mcp.LATEST_PROTOCOL_VERSION),
    ("2025-05-01", "2025-03-26"),
    ("2024-01-01", mcp.LATEST_PROTOCOL_VERSION),
    ("draft", mcp.LATEST_PROTOCOL_VERSION),
])
def test_initialize_negotiates_unknown_version(store, requested, expected):
    reply = post(store, request("initialize", {"protocolVersion": requested, "capabilities": {}}))

    assert reply.body["result"]["protocolVersion"] == expected


def test_endpoint_supports_sdk_versions():
    assert set(SDK_PROTOCOL_VERSIONS) <= set(mcp.PROTOCOL_VERSIONS)


@pytest.mark.parametrize("params", [{}, {"protocolVersion": 20250618}, {"protocolVersion": "2025-06-18", "clientInfo": "x"}])
def test_initialize_bad_params(store, params):
    reply = post(store, request("initialize", params))

    assert reply.status == 200
    assert reply.body["id"] == 1
    assert reply.body["error"]["code"] == mcp.INVALID_PARAMS


def test_initialize_ignores_unsupported_version_header(store):
    headers = {**JSON_HEADERS, "MCP-Protocol-Version": "1999-01-01"}
    reply = post(store, request("initialize", {"protocolVersion": "2025-06-18"}), headers=headers)

    assert reply.status == 200
    assert reply.body["result"]["protocolVersion"] == "2025-06-18"


# -- other methods -------------------------------------------------------------------------


def test_ping_returns_empty_result(store):
    reply = post(store, request("ping", request_id="p-1"))

    assert reply.status == 200
    assert reply.body == {"jsonrpc": "2.0", "id": "p-1", "result": {}}


def test_notification_gets_202(store):
    reply = post(store, {"jsonrpc": "2.0", "method": "notifications/initialized"})

    assert reply.status == 202
    assert reply.body is None


def test_unknown_notification_gets_202(store):
    reply = post(store, {"jsonrpc": "2.0", "method": "notifications/unheard-of", "params": {}})

    assert reply.status == 202


def test_client_response_gets_202(store):
    reply = post(store, {"jsonrpc": "2.0", "id": 7, "result": {}})

    assert reply.status == 202


def test_unknown_method_not_found(store):
    reply = post(store, request("resources/list", request_id=41))

    assert reply.status == 200
    assert reply.body["id"] == 41
    assert reply.body["error"]["code"] == mcp.METHOD_NOT_FOUND
    assert "resources/list" in reply.body["error"]["message"]


def test_params_must_be_object(store):
    reply = post(store, request("ping", ["not", "an", "object"]))

    assert reply.body["error"]["code"] == mcp.INVALID_PARAMS


def test_tools_list_rejects_cursor(store):
    reply = post(store, request("tools/list", {"cursor": "page-2"}))

    assert reply.body["error"]["code"] == mcp.INVALID_PARAMS


def test_internal_error_is_logged(store, monkeypatch, caplog):
    def broken():
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store, "list_services", broken)
    with caplog.at_level(logging.ERROR, logger="addon.mcp"):
        result = post(store, request("tools/call", {"name": "list_services"}))

    assert result.status == 200
    assert result.body["error"]["code"] == mcp.INTERNAL_ERROR
    assert "disk on fire" in caplog.text


# -- malformed messages ----------------------------------------------------------------------


def test_parse_error(store):
    reply = post(store, b'{"jsonrpc": "2.0", "id": 1, "method": ')

    assert reply.status == 400
    assert reply.body["id"] is None
    assert reply.body["error"]["code"] == mcp.PARSE_ERROR


@pytest.mark.parametrize("body", [b"", b"\xff\xfe", b'{"jsonrpc": "2.0", "id": NaN, "method": "ping"}'])
def test_undecodable_body_parse_error(store, body):
    reply = post(store, body)

    assert reply.status == 400
    assert reply.body["error"]["code"] == mcp.PARSE_ERROR


@pytest.mark.parametrize("message", [
    {"id": 1, "method": "ping"},
    {"jsonrpc": "1.0", "id": 1, "method": "ping"},
    {"jsonrpc": "2.0", "id": 1, "method": 5},
    {"jsonrpc": "2.0", "id": None, "method": "ping"},
    {"jsonrpc": "2.0", "id": True, "method": "ping"},
    {"jsonrpc": "2.0", "id": 1.5, "method": "ping"},
    {"jsonrpc": "2.0", "id": 1},
    "ping",
    42,
])
def test_invalid_request(store, message):
    reply = post(store, message)

    assert reply.status == 400
    assert reply.body["error"]["code"] == mcp.INVALID_REQUEST


def test_invalid_request_keeps_valid_id(store):
    reply = post(store, {"jsonrpc": "2.0", "id": "abc", "method": 3})

    assert reply.body["id"] == "abc"


# -- batches -------------------------------------------------------------------------------


def test_batch_answered_in_2025_03_26(store):
    headers = {**JSON_HEADERS, "MCP-Protocol-Version": "2025-03-26"}
    batch = [request("ping", request_id=1), {"jsonrpc": "2.0", "method": "notifications/initialized"}, 7, request("ping", request_id=2)]
    reply = post(store, batch, headers=headers)

    assert reply.status == 200
    assert [response.get("id") for response in reply.body] == [1, None, 2]
    assert reply.body[0]["result"] == {}
    assert reply.body[1]["error"]["code"] == mcp.INVALID_REQUEST


def test_batch_assumed_version_without_header(store):
    reply = post(store, [request("ping")])

    assert reply.status == 200
    assert reply.body == [{"jsonrpc": "2.0", "id": 1, "result": {}}]


@pytest.mark.parametrize("version", ["2024-11-05", "2025-06-18", "2025-11-25"])
def test_batch_rejected_in_other_versions(store, version):
    headers = {**JSON_HEADERS, "MCP-Protocol-Version": version}
    reply = post(store, [request("ping")], headers=headers)

    assert reply.status == 400
    assert reply.body["error"]["code"] == mcp.INVALID_REQUEST
    assert version in reply.body["error"]["message"]


def test_empty_batch_invalid(store):
    reply = post(store, [])

    assert reply.status == 400
    assert reply.body["error"]["code"] == mcp.INVALID_REQUEST


def test_batch_of_notifications_gets_202(store):
    reply = post(store, [{"jsonrpc": "2.0", "method": "notifications/initialized"}])

    assert reply.status == 202
    assert reply.body is None


def test_initialize_in_batch_rejected(store):
    reply = post(store, [request("initialize", {"protocolVersion": "2025-03-26"})])

    assert reply.status == 200
    assert reply.body[0]["error"]["code"] == mcp.INVALID_REQUEST


# -- HTTP transport ------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong", ""])
def test_missing_or_wrong_token_401(store, token):
    reply = post(store, request("ping"), token=token)

    assert reply.status == 401
    assert reply.body == {"error": "unauthorized"}
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")


def test_admin_token_accepted(store):
    reply = post(store, request("ping"), token=ADMIN_TOKEN)

    assert reply.status == 200


def test_unset_mcp_token_accepts_no_empty_bearer(store):
    server = mcp.McpServer(store, make_config(mcp_token=""))
    reply = server.handle("POST", "Bearer ", JSON_HEADERS, json.dumps(request("ping")).encode())

    assert reply.status == 401


@pytest.mark.parametrize("method", ["GET", "DELETE", "PUT"])
def test_other_methods_405(store, method):
    reply = post(store, b"", method=method)

    assert reply.status == 405
    assert reply.headers["Allow"] == "POST"


@pytest.mark.parametrize("accept", ["text/event-stream", "application/json;q=0", "text/html, image/png"])
def test_accept_without_json_406(store, accept):
    reply = post(store, request("ping"), headers={"Accept": accept})

    assert reply.status == 406


@pytest.mark.parametrize("accept", ["application/json", "*/*", "application/*;q=0.5", "text/event-stream, application/json"])
def test_accept_with_json_ok(store, accept):
    reply = post(store, request("ping"), headers={"accept": accept})

    assert reply.status == 200


def test_missing_accept_and_content_type_ok(store):
    reply = post(store, request("ping"), headers={})

    assert reply.status == 200


def test_wrong_content_type_415(store):
    reply = post(store, request("ping"), headers={"Content-Type": "text/plain"})

    assert reply.status == 415


def test_content_type_charset_ok(store):
    reply = post(store, request("ping"), headers={"Content-Type": "application/json; charset=utf-8"})

    assert reply.status == 200


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "https://keys.mitm.evil.example"])
def test_foreign_origin_403(store, origin):
    reply = post(store, request("ping"), headers={**JSON_HEADERS, "Origin": origin})

    assert reply.status == 403


@pytest.mark.parametrize("origin", ["http://localhost:6274", "http://127.0.0.1:8081", "http://[::1]:3000", "http://keys.mitm"])
def test_local_origin_allowed(store, origin):
    reply = post(store, request("ping"), headers={**JSON_HEADERS, "Origin": origin})

    assert reply.status == 200


def test_supported_version_header_ok(store):
    reply = post(store, request("ping"), headers={**JSON_HEADERS, "MCP-Protocol-Version": "2025-06-18"})

    assert reply.status == 200


def test_unsupported_version_header_400(store):
    reply = post(store, request("ping"), headers={**JSON_HEADERS, "mcp-protocol-version": "2023-01-01"})

    assert reply.status == 400
    assert "2023-01-01" in reply.body["error"]["message"]


def test_body_over_limit_413(store):
    reply = post(store, b" " * (1024 * 1024 + 1))

    assert reply.status == 413


# -- tools/list and tools/call ---------------------------------------------------------------


def test_tools_list_names_and_schemas(store):
    reply = post(store, request("tools/list"))
    tools = {tool["name"]: tool for tool in reply.body["result"]["tools"]}

    assert set(tools) == {"list_services", "request_key"}
    for tool in tools.values():
        jsonschema.Draft202012Validator.check_schema(tool["inputSchema"])
        jsonschema.Draft202012Validator.check_schema(tool["outputSchema"])
        assert tool["inputSchema"]["type"] == "object"
        assert tool["description"]
    assert tools["request_key"]["inputSchema"]["required"] == ["service_name"]
    assert tools["list_services"]["annotations"]["readOnlyHint"] is True


def test_tools_list_shows_ttl_cap(store):
    reply = post(store, request("tools/list"), config=make_config(mcp_max_ttl=600))
    tools = {tool["name"]: tool for tool in reply.body["result"]["tools"]}
    ttl = tools["request_key"]["inputSchema"]["properties"]["ttl_seconds"]

    assert ttl["default"] == 600
    assert "600" in ttl["description"]


@pytest.mark.parametrize("params", [{}, {"name": 5}, {"name": "request_key", "arguments": ["weather"]}])
def test_tools_call_bad_params(store, params):
    reply = post(store, request("tools/call", params))

    assert reply.body["error"]["code"] == mcp.INVALID_PARAMS


def test_tools_call_unknown_tool(store):
    reply = post(store, request("tools/call", {"name": "delete_everything", "arguments": {}}))

    assert reply.status == 200
    assert reply.body["error"]["code"] == mcp.INVALID_PARAMS
    assert "delete_everything" in reply.body["error"]["message"]


def test_list_services_empty(store):
    result = call_tool(store, "list_services")

    assert result["isError"] is False
    assert result["structuredContent"] == {"services": []}
    assert json.loads(result["content"][0]["text"]) == {"services": []}


def test_list_services_hides_credential(store, service):
    store.create_service("search", "https://127.0.0.1:8443", "sk-other-credential", "x-api-key")
    result = call_tool(store, "list_services", {})

    assert result["structuredContent"] == {"services": [
        {"name": "search", "base_url": "https://127.0.0.1:8443"},
        {"name": "weather", "base_url": "http://127.0.0.1:9/v1"},
    ]}
    encoded = json.dumps(result)
    assert CREDENTIAL not in encoded
    assert "sk-other-credential" not in encoded


def test_list_services_rejects_arguments(store):
    result = call_tool(store, "list_services", {"all": True})

    assert "unknown argument 'all'" in tool_error_text(result)


def test_request_key_creates_mcp_key(store, service):
    before = timeutil.now()
    result = call_tool(store, "request_key", {"service_name": "weather", "one_shot": True, "agent": "planner-bot", "rate_limit": 5, "scope": "read"})

    assert result["isError"] is False
    data = result["structuredContent"]
    assert json.loads(result["content"][0]["text"]) == data
    assert data["virtual_key"].startswith("vk_")
    assert data["one_shot"] is True
    assert data["service_name"] == "weather"
    assert data["ttl_seconds"] == 3600
    jsonschema.validate(data, mcp.McpServer(store, make_config()).tool_definitions()[1]["outputSchema"])

    key = store.get_key(data["id"])
    assert key.source == "mcp"
    assert key.agent == "planner-bot"
    assert key.one_shot is True
    assert key.used is False
    assert key.scope == "read"
    assert key.rate_limit == 5
    assert before + 3600 <= key.expires_at <= timeutil.now() + 3600
    assert timeutil.format_rfc3339(key.expires_at) == data["expires_at"]


def test_request_key_secret_not_logged(store, service, caplog):
    with caplog.at_level(logging.DEBUG):
        result = call_tool(store, "request_key", {"service_name": "weather"})

    secret = result["structuredContent"]["virtual_key"]
    assert result["structuredContent"]["id"] in caplog.text
    assert secret not in caplog.text
    assert MCP_TOKEN not in caplog.text


def test_request_key_defaults(store, service):
    data = call_tool(store, "request_key", {"service_name": "weather"})["structuredContent"]
    key = store.get_key(data["id"])

    assert data["one_shot"] is False
    assert data["agent"] is None
    assert key.scope == "write"
    assert key.rate_limit is None
    assert key.agent is None
    assert key.source == "mcp"


def test_request_key_ttl_over_cap_lowered(store, service):
    result = call_tool(store, "request_key", {"service_name": "weather", "ttl_seconds": 86400}, config=make_config(mcp_max_ttl=600))
    data = result["structuredContent"]
    key = store.get_key(data["id"])

    assert data["ttl_seconds"] == 600
    assert key.expires_at <= timeutil.now() + 600
    assert "lowered from 86400 to the maximum of 600" in result["content"][-1]["text"]


def test_request_key_default_ttl_capped(store, service):
    data = call_tool(store, "request_key", {"service_name": "weather"}, config=make_config(mcp_max_ttl=60))["structuredContent"]

    assert data["ttl_seconds"] == 60


def test_request_key_ttl_under_cap_kept(store, service):
    data = call_tool(store, "request_key", {"service_name": "weather", "ttl_seconds": 120})["structuredContent"]

    assert data["ttl_seconds"] == 120


def test_request_key_unknown_service(store, service):
    result = call_tool(store, "request_key", {"service_name": "nowhere"})

    assert "service 'nowhere' not found" in tool_error_text(result)
    assert store.list_keys() == []


@pytest.mark.parametrize(("arguments", "message"), [
    ({}, "service_name is required"),
    ({"service_name": 7}, "service_name is required and must be a string"),
    ({"service_name": "bad name!"}, "service_name must be"),
    ({"service_name": "weather", "ttl_seconds": 0}, "ttl_seconds must be a positive integer"),
    ({"service_name": "weather", "ttl_seconds": -5}, "ttl_seconds must be a positive integer"),
    ({"service_name": "weather", "ttl_seconds": "60"}, "ttl_seconds must be an integer"),
    ({"service_name": "weather", "ttl_seconds": True}, "ttl_seconds must be an integer"),
    ({"service_name": "weather", "ttl_seconds": 1.5}, "ttl_seconds must be an integer"),
    ({"service_name": "weather", "rate_limit": 0}, "rate_limit must be a positive integer"),
    ({"service_name": "weather", "scope": "admin"}, "scope must be 'read' or 'write'"),
    ({"service_name": "weather", "one_shot": "yes"}, "one_shot must be true or false"),
    ({"service_name": "weather", "agent": ""}, "agent must be 1 to 128 characters"),
    ({"service_name": "weather", "agent": "x" * 129}, "agent must be 1 to 128 characters"),
    ({"service_name": "weather", "agent": "bot\r\nX-Injected: 1"}, "agent must be printable ASCII"),
    ({"service_name": "weather", "agent": "roboter-ü"}, "agent must be printable ASCII"),
    ({"service_name": "weather", "agent": 12}, "agent must be a string"),
    ({"service_name": "weather", "target": "weather"}, "unknown argument 'target'"),
])
def test_request_key_invalid_argument(store, service, arguments, message):
    result = call_tool(store, "request_key", arguments)

    assert message in tool_error_text(result)
    assert store.list_keys() == []


# -- version negotiation helpers ---------------------------------------------------------


def test_negotiate_version_non_string():
    assert mcp.negotiate_version(None) == mcp.LATEST_PROTOCOL_VERSION


# -- routing in the API listener ---------------------------------------------------------


def answer(store, method, uri, token, body=b"", too_large=False, headers=None):
    listener = ApiListener(types.SimpleNamespace(config=make_config(), store=store))
    authorization = f"Bearer {token}" if token is not None else None

    async def scenario():
        return await listener.answer(method, uri, authorization, body, too_large, headers or JSON_HEADERS)

    return asyncio.run(scenario())


@pytest.mark.parametrize(("method", "uri"), [("GET", "/v1/keys"), ("GET", "/v1/services"), ("POST", "/v1/keys"), ("GET", "/mcp/")])
def test_mcp_token_rejected_by_rest_routes(store, service, method, uri):
    reply = answer(store, method, uri, MCP_TOKEN, b'{"target": "weather"}')

    assert reply.status == 401
    assert reply.body == {"error": "unauthorized"}
    assert store.list_keys() == []


@pytest.mark.parametrize("token", [MCP_TOKEN, ADMIN_TOKEN])
def test_mcp_path_routed_to_endpoint(store, token):
    reply = answer(store, "POST", "/mcp", token, json.dumps(request("ping")).encode())

    assert reply.status == 200
    assert reply.body["result"] == {}


def test_mcp_path_with_query_routed(store):
    reply = answer(store, "POST", "/mcp?client=unit", MCP_TOKEN, json.dumps(request("ping")).encode())

    assert reply.status == 200


def test_mcp_too_large_body(store):
    assert answer(store, "POST", "/mcp", MCP_TOKEN, too_large=True).status == 413
    assert answer(store, "POST", "/mcp", "wrong", too_large=True).status == 401
    assert answer(store, "POST", "/v1/keys", MCP_TOKEN, too_large=True).status == 401


# -- options -------------------------------------------------------------------------------


def test_mcp_options_parsed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the test context first opens the default keys.db in the working directory
    monkeypatch.delenv("KEYS_MCP_TOKEN", raising=False)
    settings = Settings()
    with taddons.context(settings) as tctx:
        tctx.configure(settings, keys_db=str(tmp_path / "keys.db"), keys_mcp_token="agents", keys_mcp_max_ttl=120)
        try:
            assert settings.config.mcp_token == "agents"
            assert settings.config.mcp_max_ttl == 120
        finally:
            settings.done()


def test_mcp_token_from_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KEYS_MCP_TOKEN", "from-env")
    settings = Settings()
    with taddons.context(settings) as tctx:
        tctx.configure(settings, keys_db=str(tmp_path / "keys.db"))
        try:
            assert settings.config.mcp_token == "from-env"
            assert settings.config.mcp_max_ttl == 3600
        finally:
            settings.done()


@pytest.mark.parametrize("value", [0, -1, 10 * 365 * 24 * 3600 + 1])
def test_bad_mcp_max_ttl_rejected(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    with taddons.context(settings) as tctx:
        try:
            with pytest.raises(exceptions.OptionsError, match="keys_mcp_max_ttl"):
                tctx.configure(settings, keys_db=str(tmp_path / "keys.db"), keys_mcp_max_ttl=value)
        finally:
            settings.done()
