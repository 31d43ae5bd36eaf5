"""Token counts read from upstream responses: JSON bodies and server-sent event streams."""

import json
import zlib
from typing import Any, NamedTuple

import brotli

# mitmproxy 11 depends on zstandard; mitmproxy 12.3 replaced it with the standard library's
# compression.zstd (Python 3.14) or its backports.zstd. Each exposes an incremental decoder.
try:
    from compression import zstd as _stdlib_zstd
except ImportError:
    try:
        from backports import zstd as _stdlib_zstd
    except ImportError:
        _stdlib_zstd = None
try:
    import zstandard
except ImportError:
    zstandard = None

_DECODE_ERRORS: tuple[type[Exception], ...] = (zlib.error, brotli.error) + tuple(
    error for error in (
        getattr(_stdlib_zstd, "ZstdError", None), getattr(zstandard, "ZstdError", None),
    ) if error is not None
)

# A request body is read for its max_tokens only up to this size; larger bodies count as
# naming no estimate.
MAX_ESTIMATE_BODY_BYTES = 1024 * 1024
# An event stream line longer than this is dropped instead of buffered without end.
MAX_EVENT_BYTES = 1024 * 1024
_ESTIMATE_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class Tokens(NamedTuple):
    prompt: int | None
    completion: int | None
    total: int | None


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def tokens_from_usage(usage: Any) -> Tokens | None:
    """Read an OpenAI-style or Anthropic-style `usage` object; None when it has no counts.

    Anthropic's cache_creation_input_tokens and cache_read_input_tokens are billed as input,
    so they are added to the prompt count.
    """
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    total = _count(usage.get("total_tokens"))
    if prompt is None and completion is None:
        prompt = _count(usage.get("input_tokens"))
        if prompt is not None:
            for cache_field in ("cache_creation_input_tokens", "cache_read_input_tokens"):
                prompt += _count(usage.get(cache_field)) or 0
        completion = _count(usage.get("output_tokens"))
    if prompt is None and completion is None and total is None:
        return None
    return Tokens(prompt, completion, total)


def _usage_of(document: Any) -> Any:
    if not isinstance(document, dict):
        return None
    if "usage" in document:
        return document["usage"]
    message = document.get("message")  # Anthropic's message_start event
    if isinstance(message, dict):
        return message.get("usage")
    response = document.get("response")  # OpenAI Responses API events
    if isinstance(response, dict):
        return response.get("usage")
    return None


def merge(earlier: Tokens | None, later: Tokens | None) -> Tokens | None:
    """Combine counts reported in parts; a later count of the same kind replaces the earlier."""
    if earlier is None:
        return later
    if later is None:
        return earlier
    return Tokens(
        later.prompt if later.prompt is not None else earlier.prompt,
        later.completion if later.completion is not None else earlier.completion,
        later.total if later.total is not None else earlier.total,
    )


def total_of(tokens: Tokens | None) -> int | None:
    """Return the total count, summed from prompt and completion when the upstream sent no total."""
    if tokens is None:
        return None
    if tokens.total is not None:
        return tokens.total
    return (tokens.prompt or 0) + (tokens.completion or 0)


def tokens_from_json_body(body: bytes) -> Tokens | None:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return tokens_from_usage(_usage_of(document))


def estimate_from_request(body: bytes | None) -> int:
    """Return the token estimate a request names (max_tokens and its variants), or 0."""
    if not body or len(body) > MAX_ESTIMATE_BODY_BYTES:
        return 0
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return 0
    if not isinstance(document, dict):
        return 0
    for field in _ESTIMATE_FIELDS:
        value = _count(document.get(field))
        if value is not None:
            return value
    return 0


class _Decoder:
    """Incremental decoder for one Content-Encoding; raises ValueError for unknown ones."""

    def __init__(self, encoding: str) -> None:
        encoding = encoding.strip().lower()
        self._decompress = None
        if encoding in ("", "identity"):
            self._decompress = lambda data: data
        elif encoding in ("gzip", "x-gzip"):
            self._decompress = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress
        elif encoding == "deflate":
            self._decompress = zlib.decompressobj().decompress
        elif encoding == "br":
            self._decompress = brotli.Decompressor().process
        elif encoding == "zstd" and _stdlib_zstd is not None:
            self._decompress = _stdlib_zstd.ZstdDecompressor().decompress
        elif encoding == "zstd" and zstandard is not None:
            self._decompress = zstandard.ZstdDecompressor().decompressobj().decompress
        else:
            raise ValueError(f"unsupported content encoding {encoding!r}")

    def __call__(self, data: bytes) -> bytes:
        return self._decompress(data)


class StreamMeter:
    """Passes a server-sent event stream through unchanged while reading usage from it.

    mitmproxy calls it with each chunk as it arrives and with b"" at the end. It returns
    every chunk as it came, so the client receives each event without delay.
    """

    def __init__(self, content_encoding: str = "") -> None:
        self.tokens: Tokens | None = None
        self.wire_bytes = 0
        self.finished = False
        self._buffer = b""
        try:
            self._decoder: _Decoder | None = _Decoder(content_encoding)
        except ValueError:
            self._decoder = None

    def __call__(self, chunk: bytes) -> bytes:
        if chunk:
            self.wire_bytes += len(chunk)
            self._feed(chunk)
        else:
            self.finished = True
            self._read_lines(final=True)
        return chunk

    def _feed(self, chunk: bytes) -> None:
        if self._decoder is None:
            return
        try:
            self._buffer += self._decoder(chunk)
        except _DECODE_ERRORS:
            # A stream we cannot decode is passed on but stays unmetered.
            self._decoder = None
            self._buffer = b""
            return
        self._read_lines(final=False)

    def _read_lines(self, final: bool) -> None:
        lines = self._buffer.splitlines(keepends=True)
        self._buffer = b""
        if lines and not final and not lines[-1].endswith((b"\n", b"\r")):
            self._buffer = lines.pop()
            if len(self._buffer) > MAX_EVENT_BYTES:
                self._buffer = b""
        for line in lines:
            self._read_line(line.rstrip(b"\r\n"))

    def _read_line(self, line: bytes) -> None:
        # Usage objects are single JSON documents on one `data:` line in every API we meter,
        # so each line is parsed on its own.
        if not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if not data or data == b"[DONE]" or not data.startswith(b"{"):
            return
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return
        self.tokens = merge(self.tokens, tokens_from_usage(_usage_of(document)))
