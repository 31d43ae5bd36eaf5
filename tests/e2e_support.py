"""Real parts for the end-to-end tests: local upstream servers, a mitmdump process and clients.

Everything binds to and connects to 127.0.0.1 only.
"""

import dataclasses
import datetime
import http.client
import http.server
import ipaddress
import json
import os
import pathlib
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parent.parent
ADDON_SCRIPT = REPOSITORY_ROOT / "addon" / "keys.py"
MITMDUMP = pathlib.Path(sys.executable).with_name("mitmdump")
LOOPBACK = "127.0.0.1"

# Admin token of every mitmdump the tests start; random so that the leak test can search for it.
ADMIN_TOKEN = "admin-" + secrets.token_urlsafe(24)
STARTUP_TIMEOUT_SECONDS = 30.0
SHUTDOWN_TIMEOUT_SECONDS = 15.0
# Seconds that the upstream's /slow endpoint waits before it responds, unless the ?delay= query sets another value.
SLOW_SECONDS = 0.5


def free_port() -> int:
    """Return a loopback TCP port that is free right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def unique_name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def new_credential(prefix: str = "cred") -> str:
    """Return a random upstream credential that is easy to search for in files and logs."""
    return f"{prefix}-{secrets.token_urlsafe(24)}"


def no_proxy_bypass_env() -> dict[str, str]:
    """Return the environment for client subprocesses, with no host exempt from the proxy."""
    env = dict(os.environ)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(name, None)
    env["NO_PROXY"] = ""
    env["no_proxy"] = ""
    return env


# -- upstream servers -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReceivedRequest:
    """One request as the upstream received it."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    received_at: float  # time.monotonic() in the test process

    def header_values(self, name: str) -> list[str]:
        """Return the values of every field named `name`, in any letter case."""
        return [value for field, value in self.headers if field.lower() == name.lower()]


class _UpstreamHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_RecordingServer"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.upstream.record(
            ReceivedRequest(self.command, self.path, tuple(self.headers.items()), time.monotonic())
        )

        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if parts.path.startswith("/events"):
            self._send_events(int(query.get("count", ["3"])[0]), float(query.get("pause", ["1.0"])[0]))
            return
        if parts.path.startswith("/slow"):
            time.sleep(float(query.get("delay", [str(SLOW_SECONDS)])[0]))
        # The body names only the method and path: it never echoes a header, so that no
        # credential can reach a saved flow through a response body.
        self._send_json(200, {"method": self.command, "path": parts.path})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _handle

    def do_HEAD(self) -> None:
        self.server.upstream.record(
            ReceivedRequest(self.command, self.path, tuple(self.headers.items()), time.monotonic())
        )
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _send_events(self, count: int, pause: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for index in range(count):
            if index:
                time.sleep(pause)
            event = f"id: {index}\ndata: event {index}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
            self.server.upstream.record_event_sent(time.monotonic())
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _RecordingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: "Upstream", tls: ssl.SSLContext | None) -> None:
        self.upstream = upstream
        self.tls = tls
        super().__init__((LOOPBACK, 0), _UpstreamHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        if self.tls is not None:
            # The handshake runs on the handler thread, so a slow client never blocks accept().
            connection = self.tls.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        return connection, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Connections that mitmproxy or a client drops mid-request are expected in these tests.
        pass


class Upstream:
    """A threaded HTTP(S) server on 127.0.0.1 that records every request it receives.

    Endpoints: /slow waits (?delay=seconds, default SLOW_SECONDS) and then answers;
    /events sends a text/event-stream of ?count= events with ?pause= seconds between them;
    every other path returns 200 with a JSON body naming the method and path.
    """

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._lock = threading.Condition()
        self._received: list[ReceivedRequest] = []
        self._events_sent: list[float] = []
        self._server = _RecordingServer(self, tls)
        self.port: int = self._server.server_address[1]
        self.scheme = "https" if tls is not None else "http"
        self.base_url = f"{self.scheme}://{LOOPBACK}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"upstream-{self.port}", daemon=True,
        )

    def start(self) -> "Upstream":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def record(self, request: ReceivedRequest) -> None:
        with self._lock:
            self._received.append(request)
            self._lock.notify_all()

    def record_event_sent(self, moment: float) -> None:
        with self._lock:
            self._events_sent.append(moment)

    def received(self, path_prefix: str = "") -> list[ReceivedRequest]:
        """Return the requests received so far whose path starts with `path_prefix`."""
        with self._lock:
            return [request for request in self._received if request.path.startswith(path_prefix)]

    def events_sent(self) -> list[float]:
        """Return the time.monotonic() moments at which /events flushed each event."""
        with self._lock:
            return list(self._events_sent)

    def wait_for_request(self, path_prefix: str, timeout: float = 10.0) -> ReceivedRequest:
        """Block until a request with this path prefix has arrived; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                matching = [request for request in self._received if request.path.startswith(path_prefix)]
                if matching:
                    return matching[0]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no request for {path_prefix!r} reached the upstream in {timeout} s")
                self._lock.wait(remaining)


def write_self_signed_certificate(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Write a self-signed certificate for 127.0.0.1 and its key; return their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    certificate_path = directory / "upstream-cert.pem"
    key_path = directory / "upstream-key.pem"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return certificate_path, key_path


def tls_server_context(directory: pathlib.Path) -> ssl.SSLContext:
    certificate_path, key_path = write_self_signed_certificate(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate_path, key_path)
    return context


# -- mitmdump ------------------------------------------------------------------------------


class Mitmdump:
    """A `mitmdump -s addon/keys.py` subprocess listening on loopback ports of its own.

    Standard output and standard error both go to `log_path`.
    """

    def __init__(self, directory: pathlib.Path, keys_db: pathlib.Path, extra_args: tuple[str, ...] = ()) -> None:
        self.directory = directory
        self.keys_db = keys_db
        self.confdir = directory / "confdir"
        self.log_path = directory / "mitmdump.log"
        self.extra_args = extra_args
        self.proxy_port = 0
        self.api_port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def proxy_url(self) -> str:
        return f"http://{LOOPBACK}:{self.proxy_port}"

    @property
    def ca_path(self) -> pathlib.Path:
        """mitmproxy's CA certificate, which clients trust for HTTPS through the proxy."""
        return self.confdir / "mitmproxy-ca-cert.pem"

    @property
    def api_url(self) -> str:
        """Base URL of the management API on its direct loopback port."""
        return f"http://{LOOPBACK}:{self.api_port}"

    def api(self) -> "Api":
        """Return a client of this process's management API on its direct loopback port."""
        return Api(self.api_url)

    def start(self) -> "Mitmdump":
        # A port picked by free_port() can be taken before mitmdump binds it, so retry once.
        for attempt in range(2):
            self.proxy_port = free_port()
            self.api_port = free_port()
            self._spawn()
            if self._wait_until_ready():
                return self
            self._kill()
        raise RuntimeError(f"mitmdump did not start; its log:\n{self.log_text()}")

    def _spawn(self) -> None:
        command = [
            str(MITMDUMP),
            "-s", str(ADDON_SCRIPT),
            "--listen-host", LOOPBACK,
            "-p", str(self.proxy_port),
            "--set", f"keys_api_port={self.api_port}",
            "--set", f"keys_db={self.keys_db}",
            "--set", f"confdir={self.confdir}",
            "--set", "ssl_insecure=true",
            *self.extra_args,
        ]
        env = no_proxy_bypass_env()
        env["KEYS_ADMIN_TOKEN"] = ADMIN_TOKEN
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=self.directory,
            )

    def _wait_until_ready(self) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        api = self.api()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                api_ready = api.call("GET", "/v1/services").status_code == 200
            except requests.ConnectionError:
                api_ready = False
            if api_ready and self._proxy_accepts() and self.ca_path.exists():
                return True
            time.sleep(0.05)
        return False

    def _proxy_accepts(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.proxy_port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> int | None:
        """Stop mitmdump as Ctrl-C does, so that it shuts down cleanly; return its exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=SHUTDOWN_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self._kill()
            return self.process.returncode

    def _kill(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# -- management API -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Service:
    name: str
    base_url: str
    credential: str
    credential_header: str


@dataclasses.dataclass(frozen=True)
class Key:
    id: str
    secret: str
    record: dict[str, Any]


class Api:
    """A client of the management API at `base_url` that sends the admin token unless `token` is None."""

    def __init__(self, base_url: str, session: requests.Session | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        if session is None:
            session = requests.Session()
            session.trust_env = False
        self.session = session

    def call(
        self, method: str, path: str, *, json_body: Any = None, data: bytes | None = None,
        token: str | None = ADMIN_TOKEN, headers: dict[str, str] | None = None, timeout: float = 10.0,
    ) -> requests.Response:
        """Send one request. Fields in `headers` are added last, so they replace Authorization and Content-Type."""
        request_headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        if data is not None:
            request_headers["Content-Type"] = "application/json"
        request_headers.update(headers or {})
        return self.session.request(
            method, self.base_url + path, json=json_body, data=data, headers=request_headers, timeout=timeout,
        )

    def create_service(
        self, upstream_url: str, *, credential_header: str | None = None, name: str | None = None,
        credential: str | None = None,
    ) -> Service:
        """Create a service with a fresh name and credential; fail the test unless it gets 201."""
        body = {
            "name": name or unique_name("svc"),
            "base_url": upstream_url,
            "credential": credential or new_credential(),
        }
        if credential_header is not None:
            body["credential_header"] = credential_header
        response = self.call("POST", "/v1/services", json_body=body)
        assert response.status_code == 201, response.text
        return Service(body["name"], upstream_url, body["credential"], credential_header or "Authorization")

    def create_key(self, target: str, **fields: Any) -> Key:
        """Create a key for the service `target`; fail the test unless it gets 201."""
        response = self.call("POST", "/v1/keys", json_body={"target": target, **fields})
        assert response.status_code == 201, response.text
        record = response.json()
        return Key(record["id"], record["key"], record)

    def get_key(self, key_id: str) -> dict[str, Any]:
        response = self.call("GET", f"/v1/keys/{key_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def revoke_key(self, key_id: str) -> None:
        response = self.call("DELETE", f"/v1/keys/{key_id}")
        assert response.status_code == 204, response.text


# -- clients through the proxy -------------------------------------------------------------


def proxy_session(proxy: Mitmdump) -> requests.Session:
    """Return a requests session that sends every URL, loopback included, through the proxy.

    trust_env is off, so NO_PROXY in the environment cannot exempt 127.0.0.1.
    """
    session = requests.Session()
    session.trust_env = False
    session.proxies = {"http": proxy.proxy_url, "https": proxy.proxy_url}
    session.verify = str(proxy.ca_path)
    return session


def httpx_client(proxy: Mitmdump, timeout: float = 10.0) -> httpx.Client:
    """Return an httpx client that sends every URL through the proxy and trusts mitmproxy's CA."""
    return httpx.Client(
        proxy=proxy.proxy_url,
        verify=ssl.create_default_context(cafile=str(proxy.ca_path)),
        trust_env=False,
        timeout=timeout,
    )


@dataclasses.dataclass(frozen=True)
class CurlResult:
    status: int
    body: str


def curl(proxy: Mitmdump, url: str, *args: str, timeout: float = 20.0) -> CurlResult:
    """Run curl through the proxy, trusting mitmproxy's CA; extra arguments go before the URL."""
    marker = "\n--status--"
    command = [
        "curl", "--silent", "--show-error",
        "--proxy", proxy.proxy_url, "--noproxy", "",
        "--cacert", str(proxy.ca_path),
        "--max-time", str(timeout),
        "--write-out", marker + "%{http_code}",
        *args, url,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, env=no_proxy_bypass_env(), timeout=timeout + 5)
    assert completed.returncode == 0, f"curl failed ({completed.returncode}): {completed.stderr}"
    body, _, status = completed.stdout.rpartition(marker)
    return CurlResult(int(status), body)


@dataclasses.dataclass(frozen=True)
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        for field, value in self.headers:
            if field.lower() == name.lower():
                return value
        return None


def raw_proxy_request(
    proxy: Mitmdump, method: str, url: str, headers: list[tuple[str, str]], *,
    send_host: bool = True, body: bytes | None = None, timeout: float = 10.0,
) -> RawResponse:
    """Send one request through the proxy with exactly these header fields, in this order.

    Unlike requests or curl, this keeps duplicate fields, their letter case and dot segments in
    the path. A Host field naming the URL's host and port goes first unless `send_host` is false.
    """
    connection = http.client.HTTPConnection(LOOPBACK, proxy.proxy_port, timeout=timeout)
    try:
        connection.putrequest(method, url, skip_host=True, skip_accept_encoding=True)
        if send_host:
            connection.putheader("Host", urlsplit(url).netloc)
        for name, value in headers:
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return RawResponse(response.status, response.getheaders(), response.read())
    finally:
        connection.close()


def request_through(proxy: Mitmdump, method: str, url: str, headers: dict[str, str], timeout: float = 20.0) -> requests.Response:
    """Send one request through the proxy with a fresh requests session."""
    with proxy_session(proxy) as session:
        return session.request(method, url, headers=headers, timeout=timeout)


def error_of(response: requests.Response | httpx.Response | RawResponse) -> Any:
    """Return the `error` field of a JSON error body, or the whole body when it has none."""
    body = response.json()
    return body.get("error", body) if isinstance(body, dict) else body


def rfc3339_utc(epoch: float, *, with_offset: bool = True) -> str:
    moment = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).replace(microsecond=0)
    text = moment.replace(tzinfo=None).isoformat()
    return text + "Z" if with_offset else text


def parse_rfc3339(text: str) -> float:
    """Return the epoch seconds of an RFC 3339 time such as the API's expires_at, "Z" suffix included."""
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
