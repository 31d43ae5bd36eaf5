"""The MCP endpoint: JSON-RPC 2.0 over MCP's Streamable HTTP transport, with tools that issue keys to agents.

Like api.py, it is free of any HTTP server. apiserver passes it the method, headers and body of
every request for /mcp, runs it on a store worker thread and sends back the Reply.

The endpoint keeps no sessions. It issues no Mcp-Session-Id, so it reads the protocol version
of each request from the MCP-Protocol-Version header and assumes 2025-03-26 when the header is
absent, as the Streamable HTTP transport specifies. Every response is a single JSON body, and
the endpoint never opens a server-sent event stream.
"""

import json
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from addon import __version__, timeutil, validation
from addon.api import UNAUTHORIZED, Reply, bearer_token_matches, error
from addon.store import NotFound, Store
from addon.validation import BadInput

if TYPE_CHECKING:
    from addon.settings import Config

log = logging.getLogger(__name__)

ENDPOINT_PATH = "/mcp"
SERVER_NAME = "mitmkeys"

# Released MCP specification versions that this endpoint implements, oldest first.
PROTOCOL_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
LATEST_PROTOCOL_VERSION = PROTOCOL_VERSIONS[-1]
# The version a server assumes for a request without an MCP-Protocol-Version header.
DEFAULT_PROTOCOL_VERSION = "2025-03-26"
# JSON-RPC batches entered MCP in 2025-03-26 and were removed again in 2025-06-18.
BATCH_PROTOCOL_VERSIONS = frozenset({"2025-03-26"})

# JSON-RPC 2.0 error codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# The agent label becomes the X-Virtual-Key-Agent header value and fills the agent column (128 characters).
MAX_AGENT_LENGTH = 128
# Browsers send an Origin header. A request whose Origin names one of these hosts cannot come
# from a DNS rebinding page.
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

_UNAUTHORIZED = UNAUTHORIZED._replace(headers={"WWW-Authenticate": 'Bearer realm="mitmkeys"'})


class RpcError(Exception):
    """A JSON-RPC error, sent to the client as an error response with this code and message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ToolError(Exception):
    """A failed tool call, which the client receives as a tool result with isError true."""


def rpc_error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def rpc_result(request_id: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def transport_error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    """Return an HTTP error whose body is a JSON-RPC error without an id."""
    return Reply(status, rpc_error(None, code, message), headers or {})


def tool_result(data: dict[str, Any], *notes: str) -> dict[str, Any]:
    """Return a tool result with `data` as structured content and as JSON text, then each note as text."""
    content = [{"type": "text", "text": json.dumps(data)}]
    content += [{"type": "text", "text": note} for note in notes]
    return {"content": content, "structuredContent": data, "isError": False}


def tool_error_result(message: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": message}], "isError": True}


def negotiate_version(requested: Any) -> str:
    """Return the newest supported protocol version that is not newer than the requested one.

    A requested version that is older than every supported one, or is not a date, gets the
    latest version. The client then decides whether it can go on.
    """
    if requested in PROTOCOL_VERSIONS:
        return requested
    if isinstance(requested, str) and _looks_like_date(requested):
        # Version names are dates (YYYY-MM-DD), so string order is release order.
        older = [version for version in PROTOCOL_VERSIONS if version < requested]
        if older:
            return older[-1]
    return LATEST_PROTOCOL_VERSION


def _looks_like_date(text: str) -> bool:
    parts = text.split("-")
    return len(parts) == 3 and all(part.isdigit() for part in parts) and [len(part) for part in parts] == [4, 2, 2]


def accepts_json(accept: str | None) -> bool:
    """Return True when an Accept header allows application/json. A missing or empty header allows any type."""
    if accept is None or not accept.strip():
        return True
    for media_range in accept.split(","):
        media_type, *parameters = (part.strip() for part in media_range.split(";"))
        if media_type.lower() not in ("application/json", "application/*", "*/*"):
            continue
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0:
            return True
    return False


def parse_agent(value: Any) -> str | None:
    """Return the agent label or None. Raise BadInput unless the label is header-safe text."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadInput("agent must be a string")
    if not 1 <= len(value) <= MAX_AGENT_LENGTH:
        raise BadInput(f"agent must be 1 to {MAX_AGENT_LENGTH} characters")
    # The label is sent upstream as a header value, where only printable ASCII is portable.
    if any(not 0x20 <= ord(char) <= 0x7E for char in value) or value != value.strip():
        raise BadInput("agent must be printable ASCII without leading or trailing spaces")
    return value


def parse_requested_ttl(value: Any, max_ttl: int) -> int:
    """Return the key lifetime in seconds: the requested one lowered to max_ttl, or the default."""
    if value is None:
        return min(validation.DEFAULT_TTL_SECONDS, max_ttl)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput("ttl_seconds must be an integer")
    if value <= 0:
        raise BadInput("ttl_seconds must be a positive integer")
    return min(value, max_ttl)


def _reject_unknown_arguments(arguments: dict[str, Any], schema: dict[str, Any]) -> None:
    allowed = schema["properties"]
    unknown = sorted(set(arguments) - set(allowed))
    if unknown:
        expected = ", ".join(sorted(allowed)) or "no arguments"
        raise BadInput(f"unknown argument {unknown[0]!r}; expected: {expected}")


class McpServer:
    """The request handler of the MCP endpoint, built per request and run on a worker thread.

    Both the admin token and keys_mcp_token are accepted here, so agents can be given a
    token that reaches this endpoint and none of the REST routes.
    """

    def __init__(self, store: Store, config: "Config") -> None:
        self.store = store
        self.config = config
        self._methods: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
            "initialize": self.initialize,
            "ping": self.ping,
            "tools/list": self.list_tools,
            "tools/call": self.call_tool,
        }
        self._tools: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
            "list_services": self.list_services,
            "request_key": self.request_key,
        }

    # -- HTTP transport ------------------------------------------------------------

    def handle(self, method: str, authorization: str | None, headers: Mapping[str, str], body: bytes) -> Reply:
        """Check the token and transport headers, then process the JSON-RPC message or batch in `body`."""
        caller = self._caller(authorization)
        if caller is None:
            return _UNAUTHORIZED
        if method.upper() != "POST":
            # No server-initiated stream (GET) and no sessions to end (DELETE).
            return transport_error(405, INVALID_REQUEST, f"method {method} not allowed; use POST", {"Allow": "POST"})

        fields = {name.lower(): value for name, value in headers.items()}
        if not self._origin_allowed(fields.get("origin")):
            return transport_error(403, INVALID_REQUEST, "Origin is not a loopback address or the management API host")
        if not accepts_json(fields.get("accept")):
            return transport_error(406, INVALID_REQUEST, "Accept must allow application/json")
        content_type = fields.get("content-type", "application/json").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            return transport_error(415, INVALID_REQUEST, "Content-Type must be application/json")
        if len(body) > validation.MAX_BODY_BYTES:
            return error(413, "request body is larger than 1 MiB")

        try:
            message = _parse_json(body)
        except ValueError as problem:
            return transport_error(400, PARSE_ERROR, f"Parse error: {problem}")

        version = fields.get("mcp-protocol-version", "").strip() or None
        if version is not None and version not in PROTOCOL_VERSIONS and not _is_initialize(message):
            return transport_error(
                400, INVALID_REQUEST,
                f"unsupported MCP-Protocol-Version {version!r}; supported: {', '.join(PROTOCOL_VERSIONS)}",
            )
        version = version if version in PROTOCOL_VERSIONS else DEFAULT_PROTOCOL_VERSION

        if isinstance(message, list):
            return self._answer_batch(message, version, caller)
        return self._answer_single(message, caller)

    def _caller(self, authorization: str | None) -> str | None:
        """Return which token the request carries ("admin" or "mcp"), or None for neither."""
        if bearer_token_matches(authorization, self.config.admin_token):
            return "admin"
        if bearer_token_matches(authorization, self.config.mcp_token):
            return "mcp"
        return None

    def _origin_allowed(self, origin: str | None) -> bool:
        # The transport requires servers to check Origin against DNS rebinding. Clients outside
        # a browser send no Origin.
        if origin is None:
            return True
        try:
            host = urlsplit(origin.strip()).hostname
        except ValueError:
            return False
        return host is not None and (host in _LOOPBACK_HOSTS or host == self.config.api_host)

    def _answer_single(self, message: Any, caller: str) -> Reply:
        try:
            kind = _message_kind(message)
        except RpcError as problem:
            return Reply(400, rpc_error(_valid_id_or_none(message), problem.code, problem.message))
        if kind != "request":
            # Notifications and client responses get no JSON-RPC response. The server sends no
            # requests of its own, so a client response has nothing to match.
            return Reply(202, None)
        return Reply(200, self._answer_request(message, caller, in_batch=False))

    def _answer_batch(self, batch: list[Any], version: str, caller: str) -> Reply:
        if version not in BATCH_PROTOCOL_VERSIONS:
            return transport_error(400, INVALID_REQUEST, f"JSON-RPC batches are not part of MCP protocol version {version}")
        if not batch:
            return transport_error(400, INVALID_REQUEST, "empty JSON-RPC batch")

        responses = []
        for message in batch:
            try:
                kind = _message_kind(message)
            except RpcError as problem:
                responses.append(rpc_error(_valid_id_or_none(message), problem.code, problem.message))
                continue
            if kind == "request":
                responses.append(self._answer_request(message, caller, in_batch=True))
        return Reply(200, responses) if responses else Reply(202, None)

    def _answer_request(self, message: dict[str, Any], caller: str, *, in_batch: bool) -> dict[str, Any]:
        request_id = message["id"]
        method = message["method"]
        params = message.get("params")
        try:
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise RpcError(INVALID_PARAMS, "params must be an object")
            if method == "initialize" and in_batch:
                raise RpcError(INVALID_REQUEST, "initialize must not be part of a JSON-RPC batch")
            handler = self._methods.get(method)
            if handler is None:
                raise RpcError(METHOD_NOT_FOUND, f"Method not found: {method}")
            return rpc_result(request_id, handler(params, caller))
        except RpcError as problem:
            return rpc_error(request_id, problem.code, problem.message)
        except Exception:
            # One failing request must not take the batch or the client's session with it.
            log.exception("MCP %s failed", method)
            return rpc_error(request_id, INTERNAL_ERROR, "internal error; see the proxy log")

    # -- JSON-RPC methods ----------------------------------------------------------

    def initialize(self, params: dict[str, Any], caller: str) -> dict[str, Any]:
        requested = params.get("protocolVersion")
        if not isinstance(requested, str):
            raise RpcError(INVALID_PARAMS, "params.protocolVersion is required and must be a string")
        for field in ("capabilities", "clientInfo"):
            if field in params and not isinstance(params[field], dict):
                raise RpcError(INVALID_PARAMS, f"params.{field} must be an object")
        negotiated = negotiate_version(requested)

        client = params.get("clientInfo") or {}
        # %r keeps line breaks in client-chosen text from forging log lines.
        log.info(
            "MCP client %r %r initialized (requested protocol %r, using %s)",
            str(client.get("name", "unknown"))[:64], str(client.get("version", ""))[:32], requested[:32], negotiated,
        )
        return {
            "protocolVersion": negotiated,
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": SERVER_NAME, "version": __version__},
            "instructions": self._instructions(),
        }

    def ping(self, params: dict[str, Any], caller: str) -> dict[str, Any]:
        return {}

    def list_tools(self, params: dict[str, Any], caller: str) -> dict[str, Any]:
        if params.get("cursor") is not None:
            # Every tool fits on the first page, so no cursor was ever handed out.
            raise RpcError(INVALID_PARAMS, "invalid cursor: the tool list has a single page")
        return {"tools": self.tool_definitions()}

    def call_tool(self, params: dict[str, Any], caller: str) -> dict[str, Any]:
        name = params.get("name")
        if not isinstance(name, str):
            raise RpcError(INVALID_PARAMS, "params.name is required and must be a string")
        tool = self._tools.get(name)
        if tool is None:
            raise RpcError(INVALID_PARAMS, f"Unknown tool: {name}")
        arguments = params.get("arguments")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise RpcError(INVALID_PARAMS, "params.arguments must be an object")

        try:
            return tool(arguments, caller)
        except (BadInput, ToolError) as problem:
            log.info("MCP %s rejected: %s", name, problem)
            return tool_error_result(str(problem))

    # -- tools ---------------------------------------------------------------------

    def tool_definitions(self) -> list[dict[str, Any]]:
        return [
            {
                "name": "list_services",
                "title": "List services",
                "description": (
                    "List the upstream services for which request_key can issue a virtual key: "
                    "each service's name and base_url. Credentials are never shown."
                ),
                "inputSchema": _LIST_SERVICES_INPUT,
                "outputSchema": _LIST_SERVICES_OUTPUT,
                "annotations": {"readOnlyHint": True, "openWorldHint": False},
            },
            {
                "name": "request_key",
                "title": "Request a virtual key",
                "description": (
                    "Issue a short-lived virtual key for one service. Send requests to the service's "
                    f"base_url through the proxy with the key in the {self.config.key_header} header "
                    "(or in place of the API key); the proxy swaps in the real credential. "
                    f"Lifetimes above {self.config.mcp_max_ttl} seconds are lowered to that maximum."
                ),
                "inputSchema": self._request_key_input(),
                "outputSchema": _REQUEST_KEY_OUTPUT,
                "annotations": {
                    "readOnlyHint": False, "destructiveHint": False, "idempotentHint": False, "openWorldHint": False,
                },
            },
        ]

    def list_services(self, arguments: dict[str, Any], caller: str) -> dict[str, Any]:
        _reject_unknown_arguments(arguments, _LIST_SERVICES_INPUT)
        services = [{"name": service.name, "base_url": service.base_url} for service in self.store.list_services()]
        return tool_result({"services": services})

    def request_key(self, arguments: dict[str, Any], caller: str) -> dict[str, Any]:
        _reject_unknown_arguments(arguments, self._request_key_input())
        service_name = arguments.get("service_name")
        if not isinstance(service_name, str):
            raise BadInput("service_name is required and must be a string")
        validation.check_name(service_name, "service_name")
        ttl_seconds = parse_requested_ttl(arguments.get("ttl_seconds"), self.config.mcp_max_ttl)
        scope = validation.parse_scope(arguments)
        rate_limit = validation.parse_rate_limit(arguments)
        one_shot = validation.parse_one_shot(arguments)
        agent = parse_agent(arguments.get("agent"))

        try:
            service = self.store.get_service(service_name)
            key, secret = self.store.create_key(
                key_id=validation.new_key_id(), target=service_name, scope=scope,
                expires_at=timeutil.now() + ttl_seconds, rate_limit=rate_limit, one_shot=one_shot,
                source="mcp", agent=agent,
            )
        except NotFound:
            raise ToolError(f"service {service_name!r} not found; call list_services for the available names") from None
        log.info(
            "MCP created key %s for service %s (agent %s, scope %s, one-shot %s, ttl %d s, %s token)",
            key.id, key.target, agent or "-", scope, one_shot, ttl_seconds, caller,
        )

        data = {
            "virtual_key": secret,
            "id": key.id,
            "service_name": key.target,
            "base_url": service.base_url,
            "key_header": self.config.key_header,
            "scope": key.scope,
            "expires_at": timeutil.format_rfc3339(key.expires_at),
            "ttl_seconds": ttl_seconds,
            "rate_limit": key.rate_limit,
            "one_shot": key.one_shot,
            "agent": key.agent,
        }
        notes = [
            f"Send requests for {service.base_url} through the proxy with the header "
            f"{self.config.key_header}: <virtual_key>. The key expires at {data['expires_at']}"
            + (" and works for one request only." if one_shot else ".")
        ]
        requested_ttl = arguments.get("ttl_seconds")
        if isinstance(requested_ttl, int) and requested_ttl > ttl_seconds:
            notes.append(f"ttl_seconds was lowered from {requested_ttl} to the maximum of {ttl_seconds} (keys_mcp_max_ttl).")
        return tool_result(data, *notes)

    def _request_key_input(self) -> dict[str, Any]:
        max_ttl = self.config.mcp_max_ttl
        return {
            "type": "object",
            "properties": {
                "service_name": {
                    "type": "string", "pattern": r"^[A-Za-z0-9._-]{1,64}$",
                    "description": "Name of the service, as list_services returns it.",
                },
                "ttl_seconds": {
                    "type": "integer", "minimum": 1, "default": min(validation.DEFAULT_TTL_SECONDS, max_ttl),
                    "description": f"Lifetime of the key in seconds. Values above {max_ttl} are lowered to {max_ttl}.",
                },
                "rate_limit": {
                    "type": "integer", "minimum": 1,
                    "description": "Maximum requests per clock minute. Omit it for no limit.",
                },
                "scope": {
                    "type": "string", "enum": list(validation.SCOPES), "default": "write",
                    "description": "read allows GET, HEAD and OPTIONS; write allows every method.",
                },
                "one_shot": {
                    "type": "boolean", "default": False,
                    "description": "When true, the key works for exactly one request.",
                },
                "agent": {
                    "type": "string", "minLength": 1, "maxLength": MAX_AGENT_LENGTH,
                    "description": "Label of the agent that uses the key; sent upstream as X-Virtual-Key-Agent.",
                },
            },
            "required": ["service_name"],
            "additionalProperties": False,
        }

    def _instructions(self) -> str:
        return (
            "mitmkeys issues virtual API keys for the upstream services behind this proxy. Call "
            "list_services to see them, then request_key for the one you need. Send requests to "
            f"the service's base_url through the proxy with the key in the {self.config.key_header} "
            "header, or in place of the API key; the proxy swaps in the real credential, which you "
            "never see. Keys expire after ttl_seconds, and a one_shot key works for one request only."
        )


_LIST_SERVICES_INPUT: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}

_LIST_SERVICES_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "services": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "base_url": {"type": "string"}},
                "required": ["name", "base_url"],
            },
        },
    },
    "required": ["services"],
}

_REQUEST_KEY_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "virtual_key": {"type": "string", "description": "The secret; it is shown only here."},
        "id": {"type": "string"},
        "service_name": {"type": "string"},
        "base_url": {"type": "string"},
        "key_header": {"type": "string"},
        "scope": {"type": "string", "enum": list(validation.SCOPES)},
        "expires_at": {"type": "string", "format": "date-time"},
        "ttl_seconds": {"type": "integer"},
        "rate_limit": {"type": ["integer", "null"]},
        "one_shot": {"type": "boolean"},
        "agent": {"type": ["string", "null"]},
    },
    "required": ["virtual_key", "id", "expires_at", "one_shot"],
}


# -- JSON-RPC message checks -------------------------------------------------------


def _parse_json(body: bytes) -> Any:
    """Return the decoded body. Raise ValueError naming the problem when it is not JSON."""
    return validation.load_json(body)


def _is_request_id(value: Any) -> bool:
    # MCP request ids are strings or integers. JSON-RPC also allows null, but MCP does not.
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _valid_id_or_none(message: Any) -> Any:
    if isinstance(message, dict) and _is_request_id(message.get("id")):
        return message["id"]
    return None


def _message_kind(message: Any) -> str:
    """Return "request", "notification" or "response". Raise RpcError for an invalid message."""
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'Invalid Request: expected a JSON object with "jsonrpc": "2.0"')
    if "method" in message:
        if not isinstance(message["method"], str):
            raise RpcError(INVALID_REQUEST, "Invalid Request: method must be a string")
        if "id" not in message:
            return "notification"
        if not _is_request_id(message["id"]):
            raise RpcError(INVALID_REQUEST, "Invalid Request: id must be a string or an integer")
        return "request"
    if "id" in message and ("result" in message) != ("error" in message):
        return "response"
    raise RpcError(INVALID_REQUEST, "Invalid Request: a message needs a method, or an id with a result or an error")


def _is_initialize(message: Any) -> bool:
    return isinstance(message, dict) and message.get("method") == "initialize"
