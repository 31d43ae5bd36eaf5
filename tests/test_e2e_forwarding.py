"""End to end: a good key through a real mitmdump reaches the upstream with the real credential."""

import ssl

import httpx
import pytest
import requests

from tests.e2e_support import (
    Api,
    Key,
    Mitmdump,
    ReceivedRequest,
    Service,
    Upstream,
    curl,
    httpx_client,
    proxy_session,
    raw_proxy_request,
)


def _assert_no_secret_forwarded(received: ReceivedRequest) -> None:
    for name, value in received.headers:
        assert "vk_" not in value, f"header {name} reached the upstream with a key secret"


@pytest.fixture
def bearer_service(api: Api, upstream: Upstream) -> Service:
    return api.create_service(upstream.base_url)


@pytest.fixture
def api_key_service(api: Api, upstream: Upstream) -> Service:
    return api.create_service(upstream.base_url, credential_header="x-api-key")


def test_key_header_forwards_credential(proxy: Mitmdump, api: Api, upstream: Upstream, bearer_service: Service) -> None:
    key = api.create_key(bearer_service.name)

    with proxy_session(proxy) as session:
        response = session.get(upstream.base_url + "/header", headers={"X-Virtual-Key": key.secret}, timeout=10)

    assert response.status_code == 200
    (received,) = upstream.received("/header")
    assert received.header_values("Authorization") == [f"Bearer {bearer_service.credential}"]
    assert received.header_values("X-Virtual-Key-ID") == [key.id]
    assert received.header_values("X-Virtual-Key") == []
    _assert_no_secret_forwarded(received)


def test_bearer_key_forwards_credential(proxy: Mitmdump, api: Api, upstream: Upstream, bearer_service: Service) -> None:
    key = api.create_key(bearer_service.name)

    with proxy_session(proxy) as session:
        response = session.get(upstream.base_url + "/bearer", headers={"Authorization": f"Bearer {key.secret}"}, timeout=10)

    assert response.status_code == 200
    (received,) = upstream.received("/bearer")
    assert received.header_values("Authorization") == [f"Bearer {bearer_service.credential}"]
    assert received.header_values("X-Virtual-Key-ID") == [key.id]
    _assert_no_secret_forwarded(received)


@pytest.mark.parametrize(("header", "value_format"), [
    ("authorization", "bearer {}"),
    ("Authorization", "BEARER {}"),
    ("api-key", "{}"),
    ("x-goog-api-key", "{}"),
    ("X-Some-Sdk-Key", "{}"),
])
def test_any_header_carries_key(
    proxy: Mitmdump, api: Api, upstream: Upstream, bearer_service: Service, header: str, value_format: str,
) -> None:
    key = api.create_key(bearer_service.name)

    response = raw_proxy_request(proxy, "GET", upstream.base_url + "/carrier", [(header, value_format.format(key.secret))])

    assert response.status == 200
    (received,) = upstream.received("/carrier")
    assert received.header_values("Authorization") == [f"Bearer {bearer_service.credential}"]
    assert received.header_values("X-Virtual-Key-ID") == [key.id]
    _assert_no_secret_forwarded(received)


def test_lowercase_bearer_key_forwards(proxy: Mitmdump, api: Api, upstream: Upstream, bearer_service: Service) -> None:
    key = api.create_key(bearer_service.name)

    with proxy_session(proxy) as session:
        response = session.get(upstream.base_url + "/lower", headers={"authorization": f"bearer {key.secret}"}, timeout=10)

    assert response.status_code == 200
    (received,) = upstream.received("/lower")
    assert received.header_values("Authorization") == [f"Bearer {bearer_service.credential}"]
    _assert_no_secret_forwarded(received)


def test_service_header_key_forwards(proxy: Mitmdump, api: Api, upstream: Upstream, api_key_service: Service) -> None:
    key = api.create_key(api_key_service.name)

    with proxy_session(proxy) as session:
        response = session.get(upstream.base_url + "/own-header", headers={"x-api-key": key.secret}, timeout=10)

    assert response.status_code == 200
    (received,) = upstream.received("/own-header")
    assert received.header_values("x-api-key") == [api_key_service.credential]
    assert received.header_values("X-Virtual-Key-ID") == [key.id]
    assert received.header_values("Authorization") == []
    _assert_no_secret_forwarded(received)


def test_client_key_id_headers_dropped(proxy: Mitmdump, api: Api, upstream: Upstream, bearer_service: Service) -> None:
    key = api.create_key(bearer_service.name)

    response = raw_proxy_request(proxy, "GET", upstream.base_url + "/forged-id", [
        ("x-virtual-key-id", "forged-lower"),
        ("X-VIRTUAL-KEY-ID", "forged-upper"),
        ("X-Virtual-Key", key.secret),
        ("X-Virtual-Key-Id", "forged-mixed"),
    ])

    assert response.status == 200
    (received,) = upstream.received("/forged-id")
    assert received.header_values("X-Virtual-Key-ID") == [key.id]


def test_client_credential_copies_dropped(proxy: Mitmdump, api: Api, upstream: Upstream, api_key_service: Service) -> None:
    key = api.create_key(api_key_service.name)

    response = raw_proxy_request(proxy, "GET", upstream.base_url + "/copies", [
        ("X-API-KEY", "client-upper"),
        ("X-Virtual-Key", key.secret),
        ("x-api-key", "client-lower"),
    ])

    assert response.status == 200
    (received,) = upstream.received("/copies")
    assert received.header_values("x-api-key") == [api_key_service.credential]


def test_client_authorization_replaced(proxy: Mitmdump, api: Api, upstream: Upstream, bearer_service: Service) -> None:
    key = api.create_key(bearer_service.name)

    response = raw_proxy_request(proxy, "GET", upstream.base_url + "/basic", [
        ("authorization", "Basic Y2xpZW50OnNlY3JldA=="),
        ("X-Virtual-Key", key.secret),
    ])

    assert response.status == 200
    (received,) = upstream.received("/basic")
    assert received.header_values("Authorization") == [f"Bearer {bearer_service.credential}"]


def test_other_client_headers_kept(proxy: Mitmdump, api: Api, upstream: Upstream, bearer_service: Service) -> None:
    key = api.create_key(bearer_service.name)

    with proxy_session(proxy) as session:
        response = session.post(
            upstream.base_url + "/kept?q=1", headers={"X-Virtual-Key": key.secret, "X-Request-Tag": "tag-1"},
            json={"prompt": "hello"}, timeout=10,
        )

    assert response.status_code == 200
    (received,) = upstream.received("/kept")
    assert received.method == "POST"
    assert received.path == "/kept?q=1"
    assert received.header_values("X-Request-Tag") == ["tag-1"]


# -- HTTPS upstream ---------------------------------------------------------------------------


@pytest.fixture
def tls_service(api: Api, tls_upstream: Upstream) -> Service:
    return api.create_service(tls_upstream.base_url)


@pytest.fixture
def tls_key(api: Api, tls_service: Service) -> Key:
    return api.create_key(tls_service.name)


def test_https_requests_client(proxy: Mitmdump, tls_upstream: Upstream, tls_service: Service, tls_key: Key) -> None:
    with proxy_session(proxy) as session:
        response = session.get(tls_upstream.base_url + "/tls-requests", headers={"X-Virtual-Key": tls_key.secret}, timeout=10)

    assert response.status_code == 200
    assert response.json() == {"method": "GET", "path": "/tls-requests"}
    (received,) = tls_upstream.received("/tls-requests")
    assert received.header_values("Authorization") == [f"Bearer {tls_service.credential}"]
    assert received.header_values("X-Virtual-Key-ID") == [tls_key.id]
    _assert_no_secret_forwarded(received)


def test_https_httpx_client(proxy: Mitmdump, tls_upstream: Upstream, tls_service: Service, tls_key: Key) -> None:
    with httpx_client(proxy) as client:
        response = client.get(tls_upstream.base_url + "/tls-httpx", headers={"Authorization": f"Bearer {tls_key.secret}"})

    assert response.status_code == 200
    (received,) = tls_upstream.received("/tls-httpx")
    assert received.header_values("Authorization") == [f"Bearer {tls_service.credential}"]
    assert received.header_values("X-Virtual-Key-ID") == [tls_key.id]
    _assert_no_secret_forwarded(received)


def test_https_curl_client(proxy: Mitmdump, tls_upstream: Upstream, tls_service: Service, tls_key: Key) -> None:
    result = curl(proxy, tls_upstream.base_url + "/tls-curl", "--header", f"X-Virtual-Key: {tls_key.secret}")

    assert result.status == 200
    (received,) = tls_upstream.received("/tls-curl")
    assert received.header_values("Authorization") == [f"Bearer {tls_service.credential}"]
    assert received.header_values("X-Virtual-Key-ID") == [tls_key.id]
    _assert_no_secret_forwarded(received)


def test_proxy_environment_routes_clients(
    proxy: Mitmdump, tls_upstream: Upstream, tls_service: Service, tls_key: Key, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Clients configured only by the environment, as SDKs usually are. An empty NO_PROXY keeps
    # 127.0.0.1 from being exempt, so only the proxy can have swapped the key.
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, proxy.proxy_url)
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("no_proxy", "")
    headers = {"X-Virtual-Key": tls_key.secret}

    with requests.Session() as session:
        from_requests = session.get(tls_upstream.base_url + "/env-requests", headers=headers, verify=str(proxy.ca_path), timeout=10)
    with httpx.Client(verify=ssl.create_default_context(cafile=str(proxy.ca_path)), timeout=10) as client:
        from_httpx = client.get(tls_upstream.base_url + "/env-httpx", headers=headers)

    assert from_requests.status_code == 200
    assert from_httpx.status_code == 200
    for path in ("/env-requests", "/env-httpx"):
        (received,) = tls_upstream.received(path)
        assert received.header_values("Authorization") == [f"Bearer {tls_service.credential}"]
