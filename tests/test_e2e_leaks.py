"""End to end: no key secret, credential or admin token reaches saved flows or mitmdump's log."""

import pathlib
import secrets
import threading
from collections.abc import Iterator

import pytest
import requests
from mitmproxy import http, io

from tests.e2e_support import (
    ADMIN_TOKEN,
    Api,
    Mitmdump,
    Upstream,
    new_credential,
    proxy_session,
    raw_proxy_request,
    request_through,
    tls_server_context,
)


class LeakRun:
    """Output of one mitmdump run (flows file and log) and every secret that the run used."""

    def __init__(
        self, flows_path: pathlib.Path, log_text: str, secrets_by_label: dict[str, str],
        forwarded: dict[str, tuple[str, str]],
    ) -> None:
        self.flows_path = flows_path
        self.flows_bytes = flows_path.read_bytes()
        self.log_text = log_text
        self.secrets_by_label = secrets_by_label
        # Path of a forwarded request -> (key id, service name) that its flow comment must name.
        self.forwarded = forwarded


@pytest.fixture(scope="module")
def leak_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LeakRun]:
    """Run the whole scenario once for the module: mitmdump is stopped when the tests read its output."""
    tmp_path = tmp_path_factory.mktemp("leaks")
    upstream = Upstream().start()
    other_upstream = Upstream().start()
    tls_upstream = Upstream(tls_server_context(tmp_path)).start()
    proxy = Mitmdump(tmp_path, tmp_path / "keys.db", ("-w", str(tmp_path / "flows.mitm"), "--set", "flow_detail=4", "--set", "termlog_verbosity=debug"))
    try:
        yield _run_scenario(proxy, upstream, other_upstream, tls_upstream)
    finally:
        proxy.stop()
        for server in (upstream, other_upstream, tls_upstream):
            server.stop()


def _run_scenario(proxy: Mitmdump, upstream: Upstream, other_upstream: Upstream, tls_upstream: Upstream) -> LeakRun:
    flows_path = proxy.directory / "flows.mitm"
    proxy.start()
    direct = proxy.api()
    proxied = Api("http://keys.mitm", proxy_session(proxy))
    # A client whose proxy settings also cover loopback reaches the direct API port as a flow.
    port_through_proxy = Api(f"http://127.0.0.1:{proxy.api_port}", proxy_session(proxy))
    other_spellings = [
        Api(f"http://{host}:{proxy.api_port}", proxy_session(proxy))
        for host in ("[::ffff:127.0.0.1]", "0.0.0.0", "localhost")
    ]
    secrets_by_label = {"admin token": ADMIN_TOKEN}

    # Services and keys made through the proxy, whose flows are saved, and on the direct port.
    bearer = proxied.create_service(upstream.base_url, credential=new_credential("proxied-cred"))
    proxied_key = proxied.create_key(bearer.name)
    port_key = port_through_proxy.create_key(bearer.name)
    spelled_keys = [client.create_key(bearer.name) for client in other_spellings]
    # The API also reads no key, so a key sent to it must not stay in the flow either.
    stray = proxied.call("GET", "/v1/services", headers={"X-Virtual-Key": proxied_key.secret})
    listed = proxied.call("GET", "/v1/keys")
    unauthorized = proxied.call("GET", "/v1/keys", token=None)
    header_service = direct.create_service(upstream.base_url + "/h", credential_header="x-api-key")
    tls_service = direct.create_service(tls_upstream.base_url)
    header_key = direct.create_key(header_service.name)
    tls_key = direct.create_key(tls_service.name)
    one_shot = direct.create_key(bearer.name, one_shot=True)
    revoked = direct.create_key(bearer.name)
    direct.revoke_key(revoked.id)
    read_only = direct.create_key(bearer.name, scope="read")
    unknown = "vk_" + secrets.token_urlsafe(32)
    for service in (bearer, header_service, tls_service):
        secrets_by_label[f"credential of {service.name}"] = service.credential
    for key in (proxied_key, port_key, *spelled_keys, header_key, tls_key, one_shot, revoked, read_only):
        secrets_by_label[f"secret of key {key.id}"] = key.secret
    secrets_by_label["unknown key secret"] = unknown

    # Forwarded requests.
    statuses = {
        "bearer": request_through(proxy, "GET", upstream.base_url + "/good", {"X-Virtual-Key": proxied_key.secret}).status_code,
        "header": request_through(proxy, "POST", upstream.base_url + "/h/good", {"x-api-key": header_key.secret}).status_code,
        "tls": request_through(proxy, "GET", tls_upstream.base_url + "/tls-good", {"Authorization": f"Bearer {tls_key.secret}"}).status_code,
        "one-shot": request_through(proxy, "GET", upstream.base_url + "/once", {"X-Virtual-Key": one_shot.secret}).status_code,
    }
    forwarded = {
        "/good": (proxied_key.id, bearer.name),
        "/h/good": (header_key.id, header_service.name),
        "/tls-good": (tls_key.id, tls_service.name),
    }

    # Refused requests, each carrying a secret.
    statuses["reused one-shot"] = request_through(proxy, "GET", upstream.base_url + "/once", {"X-Virtual-Key": one_shot.secret}).status_code
    statuses["unknown"] = request_through(proxy, "GET", upstream.base_url + "/bad", {"X-Virtual-Key": unknown}).status_code
    statuses["revoked"] = request_through(proxy, "GET", upstream.base_url + "/bad", {"Authorization": f"Bearer {revoked.secret}"}).status_code
    statuses["wrong host"] = request_through(proxy, "GET", other_upstream.base_url + "/bad", {"X-Virtual-Key": proxied_key.secret}).status_code
    statuses["scope"] = request_through(proxy, "DELETE", upstream.base_url + "/bad", {"X-Virtual-Key": read_only.secret}).status_code
    statuses["conflict"] = raw_proxy_request(proxy, "GET", upstream.base_url + "/bad", [
        ("X-Virtual-Key", proxied_key.secret), ("api-key", header_key.secret),
    ]).status

    # A request still in flight when mitmdump stops: its credential is in the flow at that moment.
    in_flight = threading.Thread(target=_send_ignoring_errors, args=(proxy, upstream.base_url + "/slow?delay=5", proxied_key.secret))
    in_flight.start()
    upstream.wait_for_request("/slow")
    proxy.stop()
    in_flight.join(timeout=30)

    # Sanity checks that the scenario ran as planned; the leak checks are in the tests.
    assert listed.status_code == 200
    assert stray.status_code == 200
    assert unauthorized.status_code == 401
    assert statuses == {
        "bearer": 200, "header": 200, "tls": 200, "one-shot": 200, "reused one-shot": 401,
        "unknown": 401, "revoked": 401, "wrong host": 403, "scope": 403, "conflict": 401,
    }
    return LeakRun(flows_path, proxy.log_text(), secrets_by_label, forwarded)


def _send_ignoring_errors(proxy: Mitmdump, url: str, secret: str) -> None:
    try:
        request_through(proxy, "GET", url, {"X-Virtual-Key": secret}, timeout=20)
    except requests.RequestException:
        pass  # mitmdump stops while this request waits for the upstream


def _read_flows(path: pathlib.Path) -> list[http.HTTPFlow]:
    with path.open("rb") as file:
        return [flow for flow in io.FlowReader(file).stream() if isinstance(flow, http.HTTPFlow)]


def test_flows_hold_no_secret(leak_run: LeakRun) -> None:
    assert leak_run.flows_bytes, "mitmdump saved no flows"
    for label, secret in leak_run.secrets_by_label.items():
        assert secret.encode() not in leak_run.flows_bytes, f"the {label} is in the saved flows"


def test_log_holds_no_secret(leak_run: LeakRun) -> None:
    assert "/good" in leak_run.log_text, "flow_detail=4 output is missing from the log"
    for label, secret in leak_run.secrets_by_label.items():
        assert secret not in leak_run.log_text, f"the {label} is in the mitmdump log"


def test_flows_hold_no_key_prefix(leak_run: LeakRun) -> None:
    assert b"vk_" not in leak_run.flows_bytes


def test_in_flight_flow_saved_redacted(leak_run: LeakRun) -> None:
    slow = [flow for flow in _read_flows(leak_run.flows_path) if flow.request.path.startswith("/slow")]

    assert len(slow) == 1, "the flow in flight at shutdown was not saved"
    assert slow[0].response is None
    for name, value in slow[0].request.headers.items():
        for label, secret in leak_run.secrets_by_label.items():
            assert secret not in value, f"header {name} of the in-flight flow holds the {label}"


def test_forwarded_flow_comment(leak_run: LeakRun) -> None:
    flows = {flow.request.path: flow for flow in _read_flows(leak_run.flows_path)}

    for path, (key_id, service) in leak_run.forwarded.items():
        assert path in flows, f"no saved flow for {path}"
        assert key_id in flows[path].comment, f"the comment of {path} does not name key {key_id}"
        assert service in flows[path].comment, f"the comment of {path} does not name service {service}"
