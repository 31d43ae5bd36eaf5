"""Shared set-up for the unit tests: a Settings/KeyEnforcer pair on a temporary store."""

import contextlib
import os
from collections.abc import Iterator

from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from addon import timeutil
from addon.proxy import KeyEnforcer
from addon.settings import Settings
from addon.store import Store

CREDENTIAL = "sk-unit-test-credential"


@contextlib.contextmanager
def enforcer_context(db_path: str, **options) -> Iterator[tuple[KeyEnforcer, Store, taddons.context]]:
    """Load Settings and KeyEnforcer into mitmproxy's test context; must run inside an event loop."""
    settings = Settings()
    enforcer = KeyEnforcer(settings)
    # Loading opens the default ./keys.db before tctx.configure points keys_db elsewhere, so
    # the working directory is the test's own folder meanwhile.
    with contextlib.chdir(os.path.dirname(db_path)), taddons.context(settings, enforcer) as tctx:
        tctx.configure(settings, keys_db=db_path, **options)
        assert settings.store is not None
        try:
            yield enforcer, settings.store, tctx
        finally:
            settings.done()


def add_service(store: Store, name: str = "svc", base_url: str = "http://api.example:8000", header: str = "Authorization") -> None:
    store.create_service(name, base_url, CREDENTIAL, header)


def add_key(store: Store, target: str = "svc", **fields) -> tuple[str, str]:
    """Create a key with sensible defaults; return (id, secret)."""
    values = dict(
        key_id=fields.pop("key_id", f"key-{len(store.list_keys()) + 1}"),
        target=target,
        scope="write",
        expires_at=timeutil.now() + 3600,
        rate_limit=None,
        one_shot=False,
        source="api",
    )
    values.update(fields)
    key, secret = store.create_key(**values)
    return key.id, secret


def make_flow(
    headers: list[tuple[str, str]], method: str = "GET", scheme: str = "http",
    host: str = "api.example", port: int = 8000, path: str = "/v1/models",
    host_header: str | None = "api.example:8000", sni: str | None = None,
) -> http.HTTPFlow:
    fields = [(name.encode(), value.encode()) for name, value in headers]
    if host_header is not None:
        fields.insert(0, (b"Host", host_header.encode()))
    request = tutils.treq(
        method=method.encode(), scheme=scheme.encode(), host=host, port=port,
        path=path.encode(), headers=http.Headers(fields), content=b"",
    )
    flow = tflow.tflow(req=request)
    flow.client_conn.sni = sni
    flow.server_conn.sni = sni
    return flow


def error_of(flow: http.HTTPFlow) -> tuple[int, str] | None:
    if flow.response is None:
        return None
    return flow.response.status_code, flow.response.json()["error"]


async def run_request_hooks(enforcer: KeyEnforcer, flow: http.HTTPFlow) -> None:
    """Run the hooks that mitmproxy runs before a request is sent: headers, then body."""
    await enforcer.requestheaders(flow)
    if flow.response is None:
        await enforcer.request(flow)
