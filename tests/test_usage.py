"""Unit tests of token counting: JSON usage objects, request estimates and event streams."""

import gzip
import json
import zlib

import brotli
import pytest

from mitmproxy.net import encoding

from addon import usage
from addon.usage import StreamMeter, Tokens


def sse(*documents) -> bytes:
    lines = [f"data: {json.dumps(document)}\n\n" for document in documents]
    return ("".join(lines) + "data: [DONE]\n\n").encode()


OPENAI_STREAM = sse(
    {"choices": [{"delta": {"content": "Hel"}}]},
    {"choices": [{"delta": {"content": "lo"}}]},
    {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}},
)
ANTHROPIC_STREAM = (
    b"event: message_start\n"
    b'data: {"type": "message_start", "message": {"usage": {"input_tokens": 25, "output_tokens": 1}}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type": "content_block_delta", "delta": {"text": "Hi"}}\n\n'
    b"event: message_delta\n"
    b'data: {"type": "message_delta", "usage": {"output_tokens": 15}}\n\n'
)


def test_openai_usage():
    assert usage.tokens_from_usage({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}) == Tokens(3, 4, 7)


def test_anthropic_usage_adds_cache_tokens():
    counted = usage.tokens_from_usage({
        "input_tokens": 10, "output_tokens": 5,
        "cache_creation_input_tokens": 2, "cache_read_input_tokens": 3,
    })
    assert counted == Tokens(15, 5, None)
    assert usage.total_of(counted) == 20


@pytest.mark.parametrize("value", [None, [], "12", {"prompt_tokens": "3"}, {"other": 1}])
def test_usage_without_counts(value):
    assert usage.tokens_from_usage(value) is None


@pytest.mark.parametrize("body, estimate", [
    (b'{"max_tokens": 100}', 100),
    (b'{"max_completion_tokens": 64}', 64),
    (b'{"max_output_tokens": 32}', 32),
    (b'{"messages": []}', 0),
    (b'{"max_tokens": "lots"}', 0),
    (b"not json", 0),
    (b"[1, 2]", 0),
    (None, 0),
])
def test_estimate_from_request(body, estimate):
    assert usage.estimate_from_request(body) == estimate


def feed(meter: StreamMeter, data: bytes, chunk_size: int) -> bytes:
    passed = b"".join(meter(data[index:index + chunk_size]) for index in range(0, len(data), chunk_size))
    passed += meter(b"")
    return passed


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_stream_usage_split_across_chunks(chunk_size):
    meter = StreamMeter()
    passed = feed(meter, OPENAI_STREAM, chunk_size)
    assert passed == OPENAI_STREAM
    assert meter.tokens == Tokens(11, 7, 18)
    assert meter.wire_bytes == len(OPENAI_STREAM)
    assert meter.finished is True


def test_anthropic_stream_usage():
    meter = StreamMeter()
    feed(meter, ANTHROPIC_STREAM, 13)
    assert meter.tokens == Tokens(25, 15, None)
    assert usage.total_of(meter.tokens) == 40


def test_stream_without_usage_unmetered():
    meter = StreamMeter()
    feed(meter, sse({"choices": [{"delta": {"content": "x"}}]}), 5)
    assert meter.tokens is None


def test_stream_crlf_line_endings():
    meter = StreamMeter()
    feed(meter, OPENAI_STREAM.replace(b"\n", b"\r\n"), 3)
    assert meter.tokens == Tokens(11, 7, 18)


@pytest.mark.parametrize("encoding, compress", [
    ("gzip", gzip.compress),
    ("deflate", zlib.compress),
    ("br", brotli.compress),
    ("zstd", lambda data: encoding.encode(data, "zstd")),
])
def test_compressed_stream_counted(encoding, compress):
    compressed = compress(OPENAI_STREAM)
    meter = StreamMeter(encoding)
    passed = feed(meter, compressed, 9)
    assert passed == compressed
    assert meter.tokens == Tokens(11, 7, 18)


def test_undecodable_stream_passes_through():
    meter = StreamMeter("gzip")
    passed = feed(meter, b"this is not gzip at all", 4)
    assert passed == b"this is not gzip at all"
    assert meter.tokens is None


def test_unknown_encoding_unmetered():
    meter = StreamMeter("compress")
    feed(meter, OPENAI_STREAM, 50)
    assert meter.tokens is None
