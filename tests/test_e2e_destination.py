"""End to end: a key is forwarded only to its service's host, port and path prefix."""

import socket
import ssl

import pytest

from tests.e2e_support import (
    Api,
    Key,
    Mitmdump,
    Service,
    Upstream,
    curl,
    error_of,
    raw_proxy_request,
    request_through,
)

WRONG_HOST = "key not valid for this host"


@pytest.fixture
def service(api: Api, upstream: Upstream) -> Service:
    return api.create_service(upstream.base_url)


@pytest.fixture
def key(api: Api, service: Service) -> Key:
    return api.create_key(service.name)


def _host_of(server: Upstream) -> str:
    return f"127.0.0.1:{server.port}"


def test_key_toward_other_port_rejected(proxy: Mitmdump, key: Key, upstream: Upstream, other_upstream: Upstream) -> None:
    response = request_through(proxy, "GET", other_upstream.base_url + "/b", {"X-Virtual-Key": key.secret})

    assert response.status_code == 403
    assert error_of(response) == WRONG_HOST
    assert other_upstream.received() == []
    assert upstream.received() == []


def test_service_host_header_toward_other_rejected(proxy: Mitmdump, key: Key, upstream: Upstream, other_upstream: Upstream) -> None:
    response = raw_proxy_request(
        proxy, "GET", other_upstream.base_url + "/b", [("Host", _host_of(upstream)), ("X-Virtual-Key", key.secret)],
        send_host=False,
    )

    assert response.status == 403
    assert error_of(response) == WRONG_HOST
    assert other_upstream.received() == []
    assert upstream.received() == []


def test_no_host_header_toward_other_rejected(proxy: Mitmdump, key: Key, upstream: Upstream, other_upstream: Upstream) -> None:
    response = raw_proxy_request(
        proxy, "GET", other_upstream.base_url + "/b", [("X-Virtual-Key", key.secret)], send_host=False,
    )

    assert response.status == 403
    assert error_of(response) == WRONG_HOST
    assert other_upstream.received() == []


def test_tunnel_with_service_host_rejected(proxy: Mitmdump, key: Key, upstream: Upstream, other_upstream: Upstream) -> None:
    # CONNECT to the other upstream, then claim the service's host inside the tunnel.
    result = curl(
        proxy, other_upstream.base_url + "/tunnel", "--proxytunnel",
        "--header", f"Host: {_host_of(upstream)}", "--header", f"X-Virtual-Key: {key.secret}",
    )

    assert result.status == 403
    assert '"key not valid for this host"' in result.body
    assert other_upstream.received() == []
    assert upstream.received() == []


def test_other_host_header_rejected(proxy: Mitmdump, key: Key, upstream: Upstream, other_upstream: Upstream) -> None:
    response = raw_proxy_request(
        proxy, "GET", upstream.base_url + "/a", [("Host", _host_of(other_upstream)), ("X-Virtual-Key", key.secret)],
        send_host=False,
    )

    assert response.status == 403
    assert error_of(response) == WRONG_HOST
    assert upstream.received() == []
    assert other_upstream.received() == []


def test_tunnel_to_service_forwards(proxy: Mitmdump, key: Key, service: Service, upstream: Upstream) -> None:
    result = curl(proxy, upstream.base_url + "/tunnel-ok", "--proxytunnel", "--header", f"X-Virtual-Key: {key.secret}")

    assert result.status == 200
    (received,) = upstream.received("/tunnel-ok")
    assert received.header_values("Authorization") == [f"Bearer {service.credential}"]


# -- path prefix --------------------------------------------------------------------------


@pytest.fixture
def prefix_key(api: Api, upstream: Upstream) -> Key:
    service = api.create_service(upstream.base_url + "/v1")
    return api.create_key(service.name)


@pytest.mark.parametrize("path", ["/v1/x", "/v1", "/v1/a/b?q=/v2"])
def test_path_inside_prefix_forwards(proxy: Mitmdump, prefix_key: Key, upstream: Upstream, path: str) -> None:
    response = raw_proxy_request(proxy, "GET", upstream.base_url + path, [("X-Virtual-Key", prefix_key.secret)])

    assert response.status == 200
    assert [request.path for request in upstream.received()] == [path]


@pytest.mark.parametrize("path", [
    "/v2/x",
    "/v1x",
    "/",
    "/v1/../admin",
    "/v1/%2e%2e/admin",
])
def test_path_outside_prefix_rejected(proxy: Mitmdump, prefix_key: Key, upstream: Upstream, path: str) -> None:
    # raw_proxy_request sends the path as written; requests and curl would resolve the dot segments.
    response = raw_proxy_request(proxy, "GET", upstream.base_url + path, [("X-Virtual-Key", prefix_key.secret)])

    assert response.status == 403
    assert error_of(response) == WRONG_HOST
    assert upstream.received() == []


def _get_through_tls_tunnel(proxy: Mitmdump, port: int, server_name: str, secret: str) -> tuple[int, bytes]:
    """CONNECT to localhost:port, speak TLS with this SNI, send one GET with the key; return status and body."""
    with socket.create_connection(("127.0.0.1", proxy.proxy_port), timeout=10) as raw:
        raw.sendall(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        context = ssl.create_default_context(cafile=str(proxy.ca_path))
        context.check_hostname = False
        with context.wrap_socket(raw, server_hostname=server_name) as tunnel:
            tunnel.sendall(
                f"GET /sni HTTP/1.1\r\nHost: localhost:{port}\r\nX-Virtual-Key: {secret}\r\nConnection: close\r\n\r\n".encode()
            )
            answer = b""
            while chunk := tunnel.recv(65536):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("server_name, status", [("localhost", 200), ("other.test", 403)])
def test_tls_server_name_must_match(proxy: Mitmdump, api: Api, tls_upstream: Upstream, server_name: str, status: int) -> None:
    # A TLS front end that routes by SNI would hand the credential to whatever name the client chose.
    service = api.create_service(f"https://localhost:{tls_upstream.port}")
    key = api.create_key(service.name)

    answer_status, body = _get_through_tls_tunnel(proxy, tls_upstream.port, server_name, key.secret)

    assert answer_status == status
    if status == 403:
        assert b"key not valid for this host" in body
        assert tls_upstream.received("/sni") == []
    else:
        assert tls_upstream.received("/sni")[0].header_values("Authorization") == [f"Bearer {service.credential}"]
