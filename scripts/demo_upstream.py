"""A local demo upstream that imitates a small part of an OpenAI-style API, for trying out mitmkeys."""

import argparse
import hmac
import json
import logging
import sys
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("demo_upstream")

DEFAULT_PORT = 9000
DEFAULT_CREDENTIAL = "sk-demo-upstream-secret"
DEFAULT_CHUNK_DELAY = 0.05
MODEL_ID = "demo-model"
MAX_BODY_BYTES = 1024 * 1024
REPLY_TEXT = "Hello from the mitmkeys demo upstream. This reply is canned and ignores your prompt."


def count_tokens(text: str) -> int:
    """Estimate a token count as the number of whitespace-separated words, because the demo has no tokenizer."""
    return len(text.split())


def prompt_text(messages: list) -> str:
    """Join the text content of chat messages, skipping parts that are not text."""
    parts: list[str] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(
                part["text"] for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    return " ".join(parts)


def usage_for(messages: list, reply: str) -> dict[str, int]:
    prompt_tokens = count_tokens(prompt_text(messages))
    completion_tokens = count_tokens(reply)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def models_list(created: int) -> dict:
    return {
        "object": "list",
        "data": [{"id": MODEL_ID, "object": "model", "created": created, "owned_by": "mitmkeys-demo"}],
    }


def chat_completion(model: str, messages: list, created: int) -> dict:
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": REPLY_TEXT},
            "finish_reason": "stop",
        }],
        "usage": usage_for(messages, REPLY_TEXT),
    }


def chat_completion_chunks(model: str, messages: list, created: int) -> list[dict]:
    """Build the stream events of one completion: role, one chunk per word, stop, then usage.

    OpenAI sends the usage chunk only when the request sets stream_options.include_usage.
    This demo always sends it, so that every stream carries a token count.
    """
    completion_id = "chatcmpl-" + uuid.uuid4().hex

    def chunk(delta: dict, finish_reason: str | None) -> dict:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    chunks = [chunk({"role": "assistant", "content": ""}, None)]
    words = REPLY_TEXT.split(" ")
    for index, word in enumerate(words):
        text = word if index == 0 else " " + word
        chunks.append(chunk({"content": text}, None))
    chunks.append(chunk({}, "stop"))

    usage_chunk = chunk({}, None)
    usage_chunk["choices"] = []
    usage_chunk["usage"] = usage_for(messages, REPLY_TEXT)
    chunks.append(usage_chunk)
    return chunks


class BadRequest(Exception):
    """A request body that the demo cannot use; the message is sent to the client."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_chat_request(body: bytes) -> tuple[str, list, bool]:
    """Return (model, messages, stream) from a chat completion body, or raise BadRequest."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")

    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "messages must be a non-empty array")
    model = data.get("model", MODEL_ID)
    if not isinstance(model, str) or not model:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "model must be a non-empty string")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "stream must be true or false")
    return model, messages, stream


class DemoHandler(BaseHTTPRequestHandler):
    """Serves GET /v1/models and POST /v1/chat/completions behind a bearer token."""

    # HTTP/1.1 keeps connections alive for proxies and benchmarks, so every response
    # carries Content-Length or uses chunked transfer encoding.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes. With Nagle's algorithm on, the body would wait
    # for the client's delayed ACK (about 40 ms on Linux) on every request of a kept-alive connection.
    disable_nagle_algorithm = True
    server_version = "mitmkeys-demo-upstream"

    # Set by make_server.
    credential: str = DEFAULT_CREDENTIAL
    chunk_delay: float = DEFAULT_CHUNK_DELAY

    def do_GET(self) -> None:
        if not self._authorized():
            return
        path = self.path.split("?", 1)[0]
        if path == "/v1/models":
            self._send_json(HTTPStatus.OK, models_list(int(time.time())))
        elif path == "/v1/chat/completions":
            self._send_method_not_allowed("POST")
        else:
            self._send_error(HTTPStatus.NOT_FOUND, f"no route for GET {path}", "not_found")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        # The body is read before any reply, so that a kept-alive connection stays in step.
        try:
            body = self._read_body()
        except BadRequest as problem:
            self.close_connection = True
            self._send_error(problem.status, str(problem), "invalid_request_error")
            return
        if not self._authorized():
            return
        if path == "/v1/models":
            self._send_method_not_allowed("GET")
            return
        if path != "/v1/chat/completions":
            self._send_error(HTTPStatus.NOT_FOUND, f"no route for POST {path}", "not_found")
            return

        try:
            model, messages, stream = parse_chat_request(body)
        except BadRequest as problem:
            self._send_error(problem.status, str(problem), "invalid_request_error")
            return
        created = int(time.time())
        if stream:
            self._send_event_stream(chat_completion_chunks(model, messages, created))
        else:
            self._send_json(HTTPStatus.OK, chat_completion(model, messages, created))

    def _authorized(self) -> bool:
        """Check the bearer token, and send a 401 reply when it is missing or wrong.

        The reply never contains the expected credential or the value the client sent.
        """
        scheme, _, token = (self.headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.credential.encode()):
            return True
        log.info("rejected %s %s: missing or invalid bearer token", self.command, self.path.split("?", 1)[0])
        self._send_error(HTTPStatus.UNAUTHORIZED, "missing or invalid bearer token", "invalid_api_key")
        return False

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise BadRequest(HTTPStatus.LENGTH_REQUIRED, "chunked request bodies are not supported; send Content-Length")
        length_text = self.headers.get("Content-Length") or "0"
        if not length_text.isdigit():
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"invalid Content-Length {length_text!r}")
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body is larger than 1 MiB")
        return self.rfile.read(length)

    def _send_json(self, status: HTTPStatus, payload: dict, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, status: HTTPStatus, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        error = {"message": message, "type": "invalid_request_error", "code": code}
        self._send_json(status, {"error": error}, headers)

    def _send_method_not_allowed(self, allowed: str) -> None:
        self._send_error(
            HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command} not allowed; use {allowed}",
            "method_not_allowed", {"Allow": allowed},
        )

    def _send_event_stream(self, chunks: list[dict]) -> None:
        """Send server-sent events with chunked encoding, pausing chunk_delay seconds between them."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = [f"data: {json.dumps(chunk)}\n\n" for chunk in chunks] + ["data: [DONE]\n\n"]
        for index, event in enumerate(events):
            if index and self.chunk_delay:
                time.sleep(self.chunk_delay)
            data = event.encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args) -> None:
        # http.server writes these lines to stderr; here they go to the debug log (shown with --verbose).
        log.debug("%s %s", self.address_string(), format % args)


def make_server(port: int, credential: str, chunk_delay: float) -> ThreadingHTTPServer:
    """Create the demo server bound to 127.0.0.1:port; port 0 picks a free port."""
    handler = type("ConfiguredDemoHandler", (DemoHandler,), {"credential": credential, "chunk_delay": chunk_delay})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    return server


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Serve a demo OpenAI-style API on 127.0.0.1: GET /v1/models and POST /v1/chat/completions "
            "(with \"stream\": true, a text/event-stream response ending in a usage chunk and "
            "data: [DONE]). Every request needs 'Authorization: Bearer <credential>'; others get 401. "
            "Replies are canned, and token counts are word counts."
        ),
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"TCP port to listen on at 127.0.0.1; 0 picks a free port (default: {DEFAULT_PORT})")
    parser.add_argument("--credential", default=DEFAULT_CREDENTIAL,
                        help=f"bearer token that requests must carry (default: {DEFAULT_CREDENTIAL})")
    parser.add_argument("--chunk-delay", type=float, default=DEFAULT_CHUNK_DELAY,
                        help=f"seconds between streamed events (default: {DEFAULT_CHUNK_DELAY})")
    parser.add_argument("--verbose", action="store_true", help="log every request line")
    arguments = parser.parse_args(argv)
    if not 0 <= arguments.port <= 65535:
        parser.error(f"invalid --port {arguments.port}: expected 0 to 65535")
    if not arguments.credential or any(ord(char) < 0x21 or ord(char) == 0x7F for char in arguments.credential):
        parser.error("invalid --credential: it must be non-empty, without spaces or control characters")
    if arguments.chunk_delay < 0:
        parser.error(f"invalid --chunk-delay {arguments.chunk_delay}: expected 0 or more seconds")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    logging.basicConfig(
        level=logging.DEBUG if arguments.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        server = make_server(arguments.port, arguments.credential, arguments.chunk_delay)
    except OSError as error:
        log.error("cannot listen on 127.0.0.1:%d: %s", arguments.port, error)
        return 1
    host, port = server.server_address[:2]
    # Printed, not logged, so that a parent process can read the port when --port is 0.
    print(f"demo upstream listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
