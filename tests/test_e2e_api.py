"""End to end: the management API, directly on its loopback port and through the proxy at keys.mitm."""

import json
import time
from typing import Any

import pytest

from tests.e2e_support import (
    ADMIN_TOKEN,
    Api,
    Mitmdump,
    Service,
    Upstream,
    error_of,
    httpx_client,
    parse_rfc3339,
    proxy_session,
    request_through,
    rfc3339_utc,
    unique_name,
)

ONE_MIB = 1024 * 1024


@pytest.fixture
def service(api: Api, upstream: Upstream) -> Service:
    return api.create_service(upstream.base_url)


@pytest.fixture
def proxied_api(proxy: Mitmdump) -> Api:
    """The management API through the proxy at its host name keys.mitm."""
    return Api("http://keys.mitm", proxy_session(proxy))


# -- through the proxy -----------------------------------------------------------------------


def test_proxied_api_lists_keys(proxied_api: Api, api: Api, service: Service) -> None:
    key = api.create_key(service.name)

    response = proxied_api.call("GET", "/v1/keys")

    assert response.status_code == 200
    assert key.id in [record["id"] for record in response.json()]


def test_proxied_api_without_token(proxied_api: Api) -> None:
    response = proxied_api.call("GET", "/v1/keys", token=None)

    assert response.status_code == 401
    assert error_of(response) == "unauthorized"


def test_proxied_api_wrong_token(proxied_api: Api) -> None:
    response = proxied_api.call("GET", "/v1/keys", token="not-the-admin-token")

    assert response.status_code == 401
    assert error_of(response) == "unauthorized"


def test_proxied_api_creates_usable_key(proxy: Mitmdump, proxied_api: Api, upstream: Upstream) -> None:
    service = proxied_api.create_service(upstream.base_url)
    key = proxied_api.create_key(service.name)

    response = request_through(proxy, "GET", upstream.base_url + "/made-by-proxied-api", {"X-Virtual-Key": key.secret})

    assert response.status_code == 200
    (received,) = upstream.received("/made-by-proxied-api")
    assert received.header_values("Authorization") == [f"Bearer {service.credential}"]


def test_proxied_api_over_https(proxy: Mitmdump, api: Api, upstream: Upstream) -> None:
    # A POST, so that this test does not also depend on how the proxy handles API calls without a body.
    name = unique_name("svc")
    body = {"name": name, "base_url": upstream.base_url, "credential": "cred-over-https"}

    with httpx_client(proxy) as client:
        response = client.post("https://keys.mitm/v1/services", json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    assert response.status_code == 201
    assert response.json()["name"] == name
    assert api.call("GET", f"/v1/services/{name}").status_code == 200


# -- admin token on the direct port ------------------------------------------------------------

ENDPOINTS = [
    ("POST", "/v1/services"),
    ("GET", "/v1/services"),
    ("GET", "/v1/services/some-service"),
    ("PUT", "/v1/services/some-service"),
    ("DELETE", "/v1/services/some-service"),
    ("POST", "/v1/keys"),
    ("GET", "/v1/keys"),
    ("GET", "/v1/keys/some-key"),
    ("DELETE", "/v1/keys/some-key"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_endpoint_without_token(api: Api, method: str, path: str) -> None:
    response = api.call(method, path, json_body={}, token=None)

    assert response.status_code == 401
    assert error_of(response) == "unauthorized"


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_endpoint_wrong_token(api: Api, method: str, path: str) -> None:
    response = api.call(method, path, json_body={}, token=ADMIN_TOKEN + "x")

    assert response.status_code == 401
    assert error_of(response) == "unauthorized"


# -- services -----------------------------------------------------------------------------------


def _service_body(**changes: Any) -> dict[str, Any]:
    body = {"name": unique_name("svc"), "base_url": "http://127.0.0.1:9/", "credential": "cred-value"}
    body.update(changes)
    return {name: value for name, value in body.items() if value is not ...}


def test_service_listing_hides_credential(api: Api, service: Service) -> None:
    listing = api.call("GET", "/v1/services")
    shown = api.call("GET", f"/v1/services/{service.name}")

    assert listing.status_code == 200
    assert shown.status_code == 200
    assert service.credential not in listing.text
    assert service.credential not in shown.text
    assert "credential" not in shown.json()
    assert shown.json()["base_url"] == service.base_url


@pytest.mark.parametrize(("field", "value"), [
    ("name", 123),
    ("name", "bad name!"),
    ("name", "n" * 65),
    ("name", ...),
    ("base_url", "ftp://127.0.0.1/"),
    ("base_url", "not a url"),
    ("base_url", "http:///no-host"),
    ("base_url", 5),
    ("base_url", ...),
    ("credential", ""),
    ("credential", "line\r\nX-Injected: 1"),
    ("credential", 5),
    ("credential", ...),
    ("credential_header", "Bad Header"),
    ("credential_header", ""),
    ("credential_header", "X-Bad\r\nX-Injected"),
    ("credential_header", ["x-api-key"]),
])
def test_service_bad_field_rejected(api: Api, field: str, value: Any) -> None:
    response = api.call("POST", "/v1/services", json_body=_service_body(**{field: value}))

    assert response.status_code == 400
    assert field in error_of(response)


@pytest.mark.parametrize("body", [b'{"name": ', b"not json", b"[]", b'"text"', b"\xff\xfe"])
def test_service_malformed_json_rejected(api: Api, body: bytes) -> None:
    response = api.call("POST", "/v1/services", data=body)

    assert response.status_code == 400
    assert isinstance(error_of(response), str)


def test_service_duplicate_rejected(api: Api, service: Service) -> None:
    response = api.call("POST", "/v1/services", json_body=_service_body(name=service.name))

    assert response.status_code == 409
    assert error_of(response) == "service already exists"


def test_service_body_over_limit(api: Api) -> None:
    body = json.dumps(_service_body(padding="x" * ONE_MIB)).encode()

    response = api.call("POST", "/v1/services", data=body)

    assert response.status_code == 413


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/services/no-such-service"),
    ("PUT", "/v1/services/no-such-service"),
    ("DELETE", "/v1/services/no-such-service"),
    ("GET", "/v1/keys/no-such-key"),
    ("DELETE", "/v1/keys/no-such-key"),
])
def test_unknown_name_not_found(api: Api, method: str, path: str) -> None:
    body = {"credential": "new-value"} if method == "PUT" else None

    response = api.call(method, path, json_body=body)

    assert response.status_code == 404
    assert error_of(response) == "not found"


@pytest.mark.parametrize(("field", "value"), [
    ("base_url", 5),
    ("base_url", "ftp://127.0.0.1/"),
    ("credential", ""),
    ("credential", "a\nb"),
    ("credential_header", "Bad Header"),
])
def test_service_update_bad_field(api: Api, service: Service, field: str, value: Any) -> None:
    response = api.call("PUT", f"/v1/services/{service.name}", json_body={field: value})

    assert response.status_code == 400
    assert field in error_of(response)


def test_service_update_malformed_json(api: Api, service: Service) -> None:
    response = api.call("PUT", f"/v1/services/{service.name}", data=b'{"credential": ')

    assert response.status_code == 400


def test_service_update_changes_credential(proxy: Mitmdump, api: Api, service: Service, upstream: Upstream) -> None:
    key = api.create_key(service.name)

    response = api.call("PUT", f"/v1/services/{service.name}", json_body={"credential": "rotated-credential"})
    forwarded = request_through(proxy, "GET", upstream.base_url + "/rotated", {"X-Virtual-Key": key.secret})

    assert response.status_code == 200
    assert "rotated-credential" not in response.text
    assert forwarded.status_code == 200
    (received,) = upstream.received("/rotated")
    assert received.header_values("Authorization") == ["Bearer rotated-credential"]


def test_service_delete_with_live_key(api: Api, service: Service) -> None:
    key = api.create_key(service.name)

    refused = api.call("DELETE", f"/v1/services/{service.name}")
    api.revoke_key(key.id)
    deleted = api.call("DELETE", f"/v1/services/{service.name}")

    assert refused.status_code == 409
    assert isinstance(error_of(refused), str)
    assert deleted.status_code == 204
    assert api.call("GET", f"/v1/services/{service.name}").status_code == 404


# -- keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("rate_limit", "5"),
    ("rate_limit", 0),
    ("rate_limit", -1),
    ("rate_limit", 1.5),
    ("rate_limit", True),
    ("one_shot", "yes"),
    ("one_shot", 1),
    ("scope", "admin"),
    ("scope", 1),
    ("ttl_seconds", -1),
    ("ttl_seconds", 0),
    ("ttl_seconds", "60"),
    ("ttl_seconds", 1.5),
    ("expires_at", "tomorrow"),
    ("expires_at", "2030-13-45T99:00:00Z"),
    ("expires_at", 1893456000),
    ("expires_at", "2001-01-01T00:00:00Z"),
    ("id", "bad id!"),
    ("id", 42),
    ("id", "k" * 65),
])
def test_key_bad_field_rejected(api: Api, service: Service, field: str, value: Any) -> None:
    response = api.call("POST", "/v1/keys", json_body={"target": service.name, field: value})

    assert response.status_code == 400
    assert field in error_of(response)


def test_key_past_expiry_rejected(api: Api, service: Service) -> None:
    past = rfc3339_utc(time.time() - 60)

    response = api.call("POST", "/v1/keys", json_body={"target": service.name, "expires_at": past})

    assert response.status_code == 400
    assert "expires_at" in error_of(response)


def test_key_without_target_rejected(api: Api) -> None:
    response = api.call("POST", "/v1/keys", json_body={"scope": "read"})

    assert response.status_code == 400
    assert "target" in error_of(response)


def test_key_unknown_target_rejected(api: Api) -> None:
    response = api.call("POST", "/v1/keys", json_body={"target": "no-such-service"})

    assert response.status_code == 404
    assert error_of(response) == "service not found"


@pytest.mark.parametrize("body", [b'{"target": ', b"[]", b"null", b'{"target": "a",}'])
def test_key_malformed_json_rejected(api: Api, body: bytes) -> None:
    response = api.call("POST", "/v1/keys", data=body)

    assert response.status_code == 400


def test_key_body_over_limit(api: Api, service: Service) -> None:
    body = json.dumps({"target": service.name, "padding": "x" * ONE_MIB}).encode()

    response = api.call("POST", "/v1/keys", data=body)

    assert response.status_code == 413


def test_key_duplicate_id_rejected(api: Api, service: Service) -> None:
    key_id = unique_name("key")
    api.create_key(service.name, id=key_id)

    response = api.call("POST", "/v1/keys", json_body={"target": service.name, "id": key_id})

    assert response.status_code == 409
    assert error_of(response) == "key already exists"


def test_key_record_fields(api: Api, service: Service) -> None:
    response = api.call("POST", "/v1/keys", json_body={"target": service.name, "scope": "read", "rate_limit": 5})

    assert response.status_code == 201
    record = response.json()
    assert record["key"].startswith("vk_")
    assert len(record["key"]) >= 3 + 32
    assert record["target"] == service.name
    assert record["scope"] == "read"
    assert record["rate_limit"] == 5
    assert record["one_shot"] is False
    assert record["used"] is False
    assert record["source"] == "api"
    assert record["revoked_at"] is None
    assert record["created_at"].endswith("Z")


def test_key_secret_shown_once(api: Api, service: Service) -> None:
    key = api.create_key(service.name)

    shown = api.call("GET", f"/v1/keys/{key.id}")
    listing = api.call("GET", "/v1/keys")

    assert "key" not in shown.json()
    assert key.secret not in shown.text
    assert key.secret not in listing.text


def test_key_default_scope_and_ttl(api: Api, service: Service) -> None:
    before = time.time()
    key = api.create_key(service.name)

    assert key.record["scope"] == "write"
    expires_at = parse_rfc3339(key.record["expires_at"])
    assert before + 3600 - 5 <= expires_at <= time.time() + 3600 + 5


def test_expiry_without_offset_is_utc(api: Api, service: Service) -> None:
    moment = int(time.time()) + 86400
    naive = rfc3339_utc(moment, with_offset=False)

    key = api.create_key(service.name, expires_at=naive)

    assert key.record["expires_at"] == naive + "Z"


def test_expiry_with_offset_returned_utc(api: Api, service: Service) -> None:
    moment = int(time.time()) + 86400
    # The same instant written two hours ahead of UTC.
    shifted = rfc3339_utc(moment + 7200, with_offset=False) + "+02:00"

    key = api.create_key(service.name, expires_at=shifted)

    assert key.record["expires_at"] == rfc3339_utc(moment)


@pytest.mark.parametrize("method", ["TRACE", "PROPFIND"])
def test_unknown_method_answered_in_json(api: Api, method: str) -> None:
    response = api.call(method, "/v1/keys")

    assert response.status_code == 405
    assert response.headers["Content-Type"] == "application/json"
    assert error_of(response) == f"method {method} not allowed"
