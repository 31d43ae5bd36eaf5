"""Unit tests of the shared rules: key format, base URLs, Host agreement, times and API input."""

import pytest

from addon import destination, keyformat, timeutil, validation
from addon.validation import BadInput


def test_new_secret_format():
    secret = keyformat.new_secret()
    assert keyformat.secret_in_value(secret) == secret


@pytest.mark.parametrize("value, found", [
    ("vk_" + "a" * 32, True),
    ("  vk_" + "a" * 32 + " ", True),
    ("Bearer vk_" + "b" * 40, True),
    ("BEARER   vk_" + "b" * 40, True),
    ("vk_" + "a" * 31, False),
    ("prefix vk_" + "a" * 40, False),
    ("Basic vk_" + "a" * 40, False),
    ("vk_" + "a" * 32 + "!", False),
])
def test_secret_in_value(value, found):
    assert (keyformat.secret_in_value(value) is not None) is found


def test_find_carriers_reports_malformed_key_header():
    carriers = keyformat.find_carriers(((b"x-virtual-key", b"nope"),), "X-Virtual-Key")
    assert carriers.malformed is True
    assert carriers.secrets == frozenset()


@pytest.mark.parametrize("url, expected", [
    ("https://API.Example.com", ("https", "api.example.com", 443, "")),
    ("http://127.0.0.1:9000/v1/", ("http", "127.0.0.1", 9000, "/v1")),
    ("http://[::1]:8080/x", ("http", "::1", 8080, "/x")),
])
def test_parse_base_url(url, expected):
    assert tuple(destination.parse_base_url(url)) == expected


@pytest.mark.parametrize("url, message", [
    ("ftp://example.com", "http:// or https://"),
    ("example.com", "http:// or https://"),
    ("http://", "no host"),
    ("http://user:pw@example.com", "user information"),
    ("http://example.com/?q=1", "query"),
    ("http://example.com:99999", "not a valid URL"),
    ("http://example.com/a/../b", "path segments"),
])
def test_parse_base_url_rejects(url, message):
    with pytest.raises(ValueError, match=message):
        destination.parse_base_url(url)


@pytest.mark.parametrize("header, agrees", [
    (None, True),
    ("api.example", True),
    ("api.example:443", True),
    ("API.example.:443", True),
    ("api.example:8443", False),
    ("evil.example", False),
    ("api.example:443:1", False),
    ("api.example:abc", False),
])
def test_host_header_agrees(header, agrees):
    assert destination.host_header_agrees(header, "https", "api.example", 443) is agrees


def test_host_header_ipv6():
    assert destination.host_header_agrees("[::1]:8080", "http", "::1", 8080)
    assert not destination.host_header_agrees("[::1]:8081", "http", "::1", 8080)


@pytest.mark.parametrize("text, epoch", [
    ("2030-01-01T00:00:00Z", 1893456000.0),
    ("2030-01-01T00:00:00z", 1893456000.0),
    ("2030-01-01T01:00:00+01:00", 1893456000.0),
    ("2030-01-01T00:00:00", 1893456000.0),
    ("2030-01-01T00:00:00.500Z", 1893456000.5),
])
def test_parse_rfc3339(text, epoch):
    assert timeutil.parse_rfc3339(text) == epoch


@pytest.mark.parametrize("text", ["tomorrow", "2030-01-01", "2030-13-01T00:00:00Z", ""])
def test_parse_rfc3339_rejects(text):
    with pytest.raises(ValueError):
        timeutil.parse_rfc3339(text)


def test_format_rfc3339():
    assert timeutil.format_rfc3339(1893456000.0) == "2030-01-01T00:00:00Z"
    assert timeutil.format_rfc3339(1893456000.25) == "2030-01-01T00:00:00.250Z"
    assert timeutil.format_rfc3339(None) is None


def test_new_key_defaults():
    key = validation.parse_new_key({"target": "svc"}, now=1000.0)
    assert key.scope == "write"
    assert key.expires_at == 1000.0 + 3600
    assert key.rate_limit is None
    assert key.one_shot is False
    assert key.id.startswith("key_")


@pytest.mark.parametrize("body, field", [
    ({}, "target"),
    ({"target": 5}, "target"),
    ({"target": "svc", "scope": "admin"}, "scope"),
    ({"target": "svc", "rate_limit": "5"}, "rate_limit"),
    ({"target": "svc", "rate_limit": 0}, "rate_limit"),
    ({"target": "svc", "rate_limit": True}, "rate_limit"),
    ({"target": "svc", "one_shot": "yes"}, "one_shot"),
    ({"target": "svc", "ttl_seconds": -1}, "ttl_seconds"),
    ({"target": "svc", "ttl_seconds": 1.5}, "ttl_seconds"),
    ({"target": "svc", "expires_at": "soon"}, "expires_at"),
    ({"target": "svc", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
    ({"target": "svc", "expires_at": "2099-01-01T00:00:00Z", "ttl_seconds": 5}, "expires_at"),
    ({"target": "svc", "id": "has space"}, "id"),
    ({"target": "svc", "colour": "red"}, "colour"),
])
def test_new_key_rejects(body, field):
    with pytest.raises(BadInput, match=field):
        validation.parse_new_key(body, now=timeutil.now())


@pytest.mark.parametrize("body, field", [
    ({"base_url": "http://a", "credential": "c"}, "name"),
    ({"name": "s", "credential": "c"}, "base_url"),
    ({"name": "s", "base_url": "nope", "credential": "c"}, "base_url"),
    ({"name": "s", "base_url": "http://a", "credential": ""}, "credential"),
    ({"name": "s", "base_url": "http://a", "credential": "a\r\nX-Injected: 1"}, "credential"),
    ({"name": "s", "base_url": "http://a", "credential": "c", "credential_header": "X Bad"}, "credential_header"),
    ({"name": "s", "base_url": "http://a", "credential": "c", "credential_header": "Host"}, "credential_header"),
    ({"name": "s/../x", "base_url": "http://a", "credential": "c"}, "name"),
])
def test_new_service_rejects(body, field):
    with pytest.raises(BadInput, match=field):
        validation.parse_new_service(body)


@pytest.mark.parametrize("body, message", [
    (b"{", "not valid JSON"),
    (b"[]", "JSON object"),
    (b"\xff", "not valid JSON"),
    (b"", "JSON object"),
])
def test_parse_json_object_rejects(body, message):
    with pytest.raises(BadInput, match=message):
        validation.parse_json_object(body)


def test_empty_scope_rejected():
    with pytest.raises(BadInput, match="scope"):
        validation.parse_new_key({"target": "svc", "scope": ""}, now=timeutil.now())


def test_base_url_error_hides_password():
    with pytest.raises(BadInput) as raised:
        validation.parse_new_service({"name": "s", "base_url": "https://user:hunter2@api.example", "credential": "c"})
    assert "hunter2" not in str(raised.value)
    assert "user information" in str(raised.value)


@pytest.mark.parametrize("body", [
    b"[" * 200_000 + b"]" * 200_000,
    b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
    b'{"target": "svc", "rate_limit": ' + b"9" * 5000 + b"}",
    b'{"target": "svc", "rate_limit": NaN}',
])
def test_hostile_json_is_bad_input(body):
    with pytest.raises(BadInput, match="not valid JSON"):
        validation.parse_json_object(body)


@pytest.mark.parametrize("field", ["rate_limit", "token_budget"])
def test_huge_integer_rejected(field):
    with pytest.raises(BadInput, match=field):
        validation.parse_new_key({"target": "svc", field: 10**30}, now=timeutil.now())


def test_far_expiry_rejected():
    with pytest.raises(BadInput, match="ten years"):
        validation.parse_new_key({"target": "svc", "expires_at": "9999-12-31T23:59:59-12:00"}, now=timeutil.now())


@pytest.mark.parametrize("url", ["http://%zz/", "http:// /", "http://exa mple.com", "http://\ud800.example/"])
def test_invalid_base_url_host_rejected(url):
    with pytest.raises(BadInput, match="base_url"):
        validation.parse_new_service({"name": "s", "base_url": url, "credential": "c"})


@pytest.mark.parametrize("host, local", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", True), ("::", True), ("localhost", True), ("LOCALHOST.", True),
    ("10.0.0.1", False), ("example.com", False), ("keys.mitm", False),
])
def test_is_local(host, local):
    assert destination.is_local(host) is local
