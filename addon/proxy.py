"""The proxy hooks: check each request's virtual key, swap in the credential, redact it after."""

import asyncio
import json
import logging
import weakref

from mitmproxy import http

from addon import checks, injection, keyformat, timeutil
from addon.checks import Refusal
from addon.settings import API_FLOW, Settings
from addon.store import StoreUnavailable

log = logging.getLogger(__name__)

# flow.metadata entry recording the decision for later hooks and for saved flows.
# It holds the key id, service name and credential header name, never a secret.
DECISION = "mitmkeys"


def refuse(flow: http.HTTPFlow, refusal: Refusal, headers: dict[str, str] | None = None) -> None:
    """Answer the flow from the proxy with the refusal's status and JSON error."""
    body = json.dumps({"error": refusal.error}).encode()
    flow.request.stream = False
    flow.response = http.Response.make(
        refusal.status, body, {"Content-Type": "application/json", **(headers or {})}
    )


class KeyEnforcer:
    """Checks virtual keys on proxied requests and injects service credentials."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Flows that carry an injected credential which has not been redacted yet.
        self._unredacted: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self._pruned_window = 0
        self._background: set[asyncio.Task] = set()

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or flow.metadata.get(API_FLOW):
            return
        config = self.settings.config
        store = self.settings.store
        assert config is not None and store is not None
        request = flow.request

        carriers = keyformat.find_carriers(request.headers.fields, config.key_header)
        if not carriers.header_names:
            if config.strict:
                self._refuse(flow, checks.MISSING_KEY, None)
            return
        if len(carriers.secrets) > 1:
            self._refuse(flow, checks.CONFLICTING_KEYS, None)
            return
        if carriers.malformed:
            self._refuse(flow, checks.INVALID_KEY, None)
            return
        (secret,) = carriers.secrets

        now = timeutil.now()
        try:
            found = await store.run(lambda db: store.find_key_now(db, secret))
        except StoreUnavailable as error:
            log.error("key store unavailable while looking up a key: %s", error)
            self._refuse(flow, checks.STORE_UNAVAILABLE, None)
            return
        key_id = found.key.id if found else None

        refusal = checks.check_key(found, _request_line(request), now)
        if refusal is not None:
            self._refuse(flow, refusal, key_id)
            return
        assert found is not None and found.credential is not None and found.credential_header is not None
        key = found.key

        window = int(now // 60)
        if key.rate_limit is not None and window > self._pruned_window:
            self._prune_rate_windows(window)
        try:
            if key.rate_limit is not None:
                allowed = await store.run(
                    lambda db: store.take_rate_slot_now(db, key.id, window, key.rate_limit)
                )
                if not allowed:
                    self._refuse(flow, checks.RATE_LIMITED, key.id, {"Retry-After": str(checks.retry_after(now))})
                    return

            if key.one_shot:
                consumed = await store.run(lambda db: store.consume_one_shot_now(db, key.id))
                if not consumed:
                    if key.rate_limit is not None:
                        await store.run(lambda db: store.give_back_rate_slot_now(db, key.id, window))
                    self._refuse(flow, checks.KEY_ALREADY_USED, key.id)
                    return
        except StoreUnavailable as error:
            log.error("key store unavailable while recording use of key %s: %s", key.id, error)
            self._refuse(flow, checks.STORE_UNAVAILABLE, key.id)
            return

        injection.inject(request, config.key_header, key.id, found.credential_header, found.credential, key.agent)
        flow.metadata[DECISION] = {
            "key_id": key.id,
            "service": key.target,
            "credential_header": found.credential_header,
        }
        flow.comment = f"mitmkeys: key {key.id}, service {key.target}"
        self._unredacted.add(flow)

    def _prune_rate_windows(self, window: int) -> None:
        """Delete counters of past minutes in the background, once per minute."""
        self._pruned_window = window
        store = self.settings.store
        assert store is not None

        async def prune() -> None:
            try:
                await store.in_thread(store.prune_rate_windows_now, store.worker_db, window - 1)
            except StoreUnavailable as error:
                log.warning("could not prune old rate-limit counters: %s", error)

        task = asyncio.get_running_loop().create_task(prune())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _refuse(self, flow: http.HTTPFlow, refusal: Refusal, key_id: str | None, headers: dict[str, str] | None = None) -> None:
        config = self.settings.config
        assert config is not None
        injection.strip_carriers(flow.request, config.key_header)
        refuse(flow, refusal, headers)
        flow.metadata[DECISION] = {"key_id": key_id, "refused": refusal.error}
        flow.comment = f"mitmkeys: refused ({refusal.error})" + (f", key {key_id}" if key_id else "")
        log.info(
            "refused %s %s://%s:%d: %s (key %s)",
            flow.request.method, flow.request.scheme, flow.request.host, flow.request.port,
            refusal.error, key_id or "-",
        )

    def request(self, flow: http.HTTPFlow) -> None:
        # A streamed request has already sent its headers when this hook runs.
        if flow.request.stream:
            self._redact(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)
        content_type = flow.response.headers.get("content-type", "") if flow.response else ""
        if content_type.lower().startswith("text/event-stream") and not flow.response.stream:
            flow.response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)

    def done(self) -> None:
        # Runs before mitmproxy's save addon writes the flows still in flight at shutdown.
        for flow in list(self._unredacted):
            self._redact(flow)

    def _redact(self, flow: http.HTTPFlow) -> None:
        if flow not in self._unredacted:
            return
        decision = flow.metadata.get(DECISION) or {}
        header = decision.get("credential_header")
        if header:
            injection.redact(flow.request, header)
        self._unredacted.discard(flow)


def _request_line(request: http.Request) -> checks.Request:
    return checks.Request(
        method=request.method,
        scheme=request.scheme,
        host=request.host,
        port=request.port,
        path=request.path,
        host_header=request.host_header,
    )
