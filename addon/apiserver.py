"""Serves the management API on a loopback listener and routes proxied calls for keys_api_host to it."""

import asyncio
import functools
import json
import logging
from collections.abc import Mapping

import tornado.httpserver
import tornado.netutil
import tornado.web
from mitmproxy import http, tls

from addon import api, destination, injection, mcp, validation
from addon.settings import API_FLOW, Settings
from addon.store import StoreUnavailable

log = logging.getLogger(__name__)


@tornado.web.stream_request_body
class _Handler(tornado.web.RequestHandler):
    """Hands every request to the framework-free ManagementApi."""

    SUPPORTED_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")

    def initialize(self, listener: "ApiListener") -> None:
        self.listener = listener
        self.body = bytearray()
        self.too_large = False

    def prepare(self) -> None:
        declared = self.request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > validation.MAX_BODY_BYTES:
            self.too_large = True

    def data_received(self, chunk: bytes) -> None:
        if self.too_large:
            return
        self.body += chunk
        if len(self.body) > validation.MAX_BODY_BYTES:
            self.too_large = True
            self.body.clear()

    async def _serve(self) -> None:
        reply = await self.listener.answer(
            self.request.method, self.request.uri, self.request.headers.get("Authorization"),
            bytes(self.body), self.too_large, self.request.headers,
        )
        self.set_status(reply.status)
        for name, value in reply.headers.items():
            self.set_header(name, value)
        if reply.body is not None:
            self.set_header("Content-Type", "application/json")
            self.finish(reply.encoded())
        else:
            self.finish()

    get = post = put = delete = patch = head = options = _serve

    def compute_etag(self) -> None:
        return None

    def write_error(self, status_code: int, **kwargs) -> None:
        # Errors raised by tornado itself (an unknown method, a malformed request) get the
        # API's JSON shape instead of tornado's HTML page.
        self.set_header("Content-Type", "application/json")
        reason = self._reason.lower() if self._reason else "error"
        if status_code == 405:
            reason = f"method {self.request.method} not allowed"
        self.finish(json.dumps({"error": reason}).encode())


class ApiListener:
    """Runs the management API listener and sends proxied API calls to it.

    A call through the proxy is redirected to the loopback listener with both bodies streamed.
    The flow therefore keeps neither the request body nor the response, which contains new key
    secrets, and the admin token is removed from the flow once the request has been sent.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._server: tornado.httpserver.HTTPServer | None = None
        self._closing: set[asyncio.Task] = set()
        self.port: int | None = None

    async def answer(
        self, method: str, uri: str, authorization: str | None, body: bytes, too_large: bool,
        headers: Mapping[str, str] | None = None,
    ) -> api.Reply:
        config = self.settings.config
        store = self.settings.store
        if config is None or store is None:
            return api.error(503, "key store unavailable")
        path = uri.split("?", 1)[0]
        if path == mcp.ENDPOINT_PATH:
            # The MCP endpoint also takes keys_mcp_token; the REST routes take the admin token only.
            accepted_tokens = (config.admin_token, config.mcp_token)
            handle = functools.partial(mcp.McpServer(store, config).handle, method, authorization, dict(headers or {}))
        else:
            accepted_tokens = (config.admin_token,)
            handle = functools.partial(api.ManagementApi(store, config.admin_token).handle, method, uri, authorization)
        if too_large and any(api.bearer_token_matches(authorization, token) for token in accepted_tokens):
            return api.error(413, "request body is larger than 1 MiB")
        try:
            return await store.in_thread(handle, b"" if too_large else body)
        except StoreUnavailable as problem:
            log.error("key store unavailable during %s %s: %s", method, path, problem)
            return api.error(503, "key store unavailable")
        except Exception:
            log.exception("management API failed on %s %s", method, path)
            return api.error(500, "internal error; see the proxy log")

    # -- listener lifecycle ------------------------------------------------------

    # Synchronous on purpose: after a script reload mitmproxy calls `running` from a sync context.
    def running(self) -> None:
        self._start()

    def configure(self, updated: set[str]) -> None:
        if "keys_api_port" in updated and self._server is not None:
            self._stop()
            self._start()

    def _start(self) -> None:
        config = self.settings.config
        assert config is not None
        app = tornado.web.Application(
            [(r".*", _Handler, {"listener": self})],
            log_function=_log_request,
        )
        # Tornado's own limit sits above ours, so that oversized bodies get our 413 reply.
        server = tornado.httpserver.HTTPServer(app, max_body_size=64 * validation.MAX_BODY_BYTES, xheaders=False)
        try:
            sockets = tornado.netutil.bind_sockets(config.api_port, address="127.0.0.1")
        except OSError as problem:
            log.error("cannot listen on 127.0.0.1:%d for the management API: %s", config.api_port, problem)
            return
        server.add_sockets(sockets)
        self._server = server
        self.port = sockets[0].getsockname()[1]
        if config.api_port:
            log.info("mitmkeys management API: http://127.0.0.1:%d/ and http://%s/ through the proxy", self.port, config.api_host)
        else:
            log.info(
                "mitmkeys management API: http://%s/ through the proxy, served from 127.0.0.1:%d "
                "(keys_api_port=0 picks a random loopback port)", config.api_host, self.port,
            )

    def _stop(self) -> None:
        if self._server is None:
            return
        server = self._server
        server.stop()
        self._server = None
        self.port = None
        # stop() only closes the listening socket. Open keep-alive connections would go on
        # reaching this listener, whose store is closed after a script reload.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(server.close_all_connections())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def done(self) -> None:
        self._stop()

    # -- calls through the proxy -------------------------------------------------

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        # Nothing listens at keys_api_host, so mitmproxy must not try its TLS first.
        address = data.context.server.address
        if address and self._names_api_host(address[0]):
            data.establish_server_tls_first = False

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # keys_api_host has no DNS entry: accept the tunnel without connecting anywhere.
        if self._is_api_host(flow) and not flow.response:
            flow.response = http.Response.make(200)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or not self._is_api_host(flow):
            return
        flow.metadata[API_FLOW] = True
        flow.comment = "mitmkeys management API"
        # The API reads no virtual key, so none may stay in the flow.
        config = self.settings.config
        assert config is not None
        injection.strip_carriers(flow.request, config.key_header)
        if self.port is None:
            flow.response = http.Response.make(
                503, b'{"error": "management API listener is not running"}', {"Content-Type": "application/json"}
            )
            return
        request = flow.request
        request.scheme = "http"
        request.host = "127.0.0.1"
        request.port = self.port
        request.stream = True

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(API_FLOW) and injection.headers_already_sent(flow.request):
            injection.redact(flow.request, "Authorization")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(API_FLOW) and flow.response:
            injection.redact(flow.request, "Authorization")
            flow.response.stream = True

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(API_FLOW):
            injection.redact(flow.request, "Authorization")

    def _is_api_host(self, flow: http.HTTPFlow) -> bool:
        """Return whether a proxied request is a management API call.

        Calls to the loopback listener itself count too: a client whose proxy settings also
        cover 127.0.0.1 reaches the API port through the proxy, and its flow must be kept as
        bare as a call to keys_api_host.
        """
        host = flow.request.host
        if self._names_api_host(host):
            return True
        return self.port is not None and flow.request.port == self.port and destination.is_local(host)

    def _names_api_host(self, host: str) -> bool:
        config = self.settings.config
        return config is not None and host.lower().rstrip(".") == config.api_host


def _log_request(handler: tornado.web.RequestHandler) -> None:
    # Tornado logs every 4xx as a warning by default; an API refusal is routine, so debug.
    request = handler.request
    log.debug("management API %s %s -> %d", request.method, request.path, handler.get_status())
