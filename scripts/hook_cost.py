"""Measure the CPU time that the mitmkeys hooks add to one proxied request, without any network."""

import argparse
import asyncio
import contextlib
import json
import pathlib
import sys
import tempfile
import time

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))

from mitmproxy import http  # noqa: E402
from mitmproxy.test import taddons, tflow, tutils  # noqa: E402

from addon import timeutil  # noqa: E402
from addon.apiserver import ApiListener  # noqa: E402
from addon.metering import UsageMeter  # noqa: E402
from addon.proxy import KeyEnforcer  # noqa: E402
from addon.recorder import UsageRecorder  # noqa: E402
from addon.settings import Settings  # noqa: E402

RESPONSE_BODY = json.dumps({"object": "list", "data": [{"id": "demo-model"}]}).encode()


def make_flow(secret: str) -> http.HTTPFlow:
    headers = http.Headers([
        (b"Host", b"api.example:8000"), (b"Authorization", f"Bearer {secret}".encode()),
        (b"Accept", b"*/*"), (b"User-Agent", b"hook-cost"),
    ])
    request = tutils.treq(host="api.example", port=8000, path=b"/v1/models", headers=headers, content=b"")
    return tflow.tflow(req=request)


async def call_hook(addons: list, name: str, flow: http.HTTPFlow) -> None:
    for addon in addons:
        hook = getattr(addon, name, None)
        if hook is not None:
            result = hook(flow)
            if asyncio.iscoroutine(result):
                await result


async def measure(count: int) -> None:
    directory = pathlib.Path(tempfile.mkdtemp(prefix="mitmkeys-hook-cost-"))
    settings = Settings()
    recorder = UsageRecorder(settings)
    addons = [ApiListener(settings), KeyEnforcer(settings), UsageMeter(recorder), recorder, settings]
    # Loading opens the default ./keys.db before keys_db is set, so work in the temporary folder.
    with contextlib.chdir(directory), taddons.context(*addons) as tctx:
        tctx.configure(settings, keys_db=str(directory / "keys.db"))
        store = settings.store
        store.create_service("svc", "http://api.example:8000", "sk-hook-cost", "Authorization")
        _, secret = store.create_key(
            key_id="bench", target="svc", scope="write", expires_at=timeutil.now() + 3600,
            rate_limit=None, one_shot=False, source="cli",
        )
        # Flows and responses are built first: mitmproxy builds them for bare mitmdump too.
        flows = [make_flow(secret) for _ in range(count)]
        responses = [http.Response.make(200, RESPONSE_BODY, {"Content-Type": "application/json"}) for _ in range(count)]

        started = time.process_time()
        for flow, response in zip(flows, responses):
            await call_hook(addons, "requestheaders", flow)
            await call_hook(addons, "request", flow)
            flow.response = response
            await call_hook(addons, "responseheaders", flow)
            await call_hook(addons, "response", flow)
        hooks_seconds = time.process_time() - started

        started = time.process_time()
        await recorder.flush()
        flush_seconds = time.process_time() - started
        assert all(flow.metadata.get("mitmkeys", {}).get("key_id") == "bench" for flow in flows)
        settings.done()

    print(f"{count} requests with a valid key, Python {sys.version.split()[0]}")
    print(f"  hooks: {hooks_seconds / count * 1e6:.1f} us of CPU per request")
    print(f"  usage batch write: {flush_seconds / count * 1e6:.1f} us of CPU per request (worker thread)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000, help="requests to run through the hooks (default: 5000)")
    arguments = parser.parse_args()
    if not 1 <= arguments.requests <= 1_000_000:
        parser.error("--requests must be between 1 and 1000000")
    asyncio.run(measure(arguments.requests))


if __name__ == "__main__":
    main()
