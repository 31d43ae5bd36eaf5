"""The proxy hooks: check each request's virtual key, swap in the credential, redact it after.

`requestheaders` makes every decision that reads only the request line and headers. The
`request` hook runs once the body is in and before anything is sent. It takes the rate-limit
slot, the token reservation and the one-shot use, and then injects the credential.
"""

import asyncio
import json
import logging
import weakref

from mitmproxy import http

from addon import checks, injection, keyformat, timeutil, usage
from addon.checks import Refusal
from addon.records import KeyLookup
from addon.settings import API_FLOW, Settings
from addon.store import StoreUnavailable

log = logging.getLogger(__name__)

# flow.metadata entry recording the decision for later hooks and for saved flows. It contains
# ids, names and counts (key_id, service, credential_header, reservation_id, estimate,
# refused), never a secret.
DECISION = "mitmkeys"


def refuse(flow: http.HTTPFlow, refusal: Refusal, headers: dict[str, str] | None = None) -> None:
    """Set the flow's response to the refusal's status and JSON error, so nothing is forwarded."""
    body = json.dumps({"error": refusal.error}).encode()
    flow.request.stream = False
    flow.response = http.Response.make(
        refusal.status, body, {"Content-Type": "application/json", **(headers or {})}
    )


class KeyEnforcer:
    """Checks virtual keys on proxied requests and injects service credentials."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Secrets of keys that passed the header checks, waiting for the request hook. Held
        # here and not in flow.metadata, which saved flows contain.
        self._admitted: weakref.WeakKeyDictionary[http.HTTPFlow, str] = weakref.WeakKeyDictionary()
        # Credentials injected into flows, for removing them from whatever the upstream echoes.
        self._credentials: weakref.WeakKeyDictionary[http.HTTPFlow, str] = weakref.WeakKeyDictionary()
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
        if carriers.embedded or keyformat.contains_secret(request.path):
            # Fail closed: a secret in the URL or inside another header would be forwarded.
            _remove_embedded_secrets(request)
            injection.strip_carriers(request, config.key_header)
            self._refuse(flow, checks.INVALID_KEY, detail="a key outside a header of its own")
            return
        if not carriers.header_names:
            if config.strict:
                self._refuse(flow, checks.MISSING_KEY)
            return
        # From here on no secret stays in the flow, whatever the outcome.
        injection.strip_carriers(request, config.key_header)
        if len(carriers.secrets) > 1:
            self._refuse(flow, checks.CONFLICTING_KEYS)
            return
        if carriers.malformed:
            self._refuse(flow, checks.INVALID_KEY)
            return
        (secret,) = carriers.secrets

        if await self._look_up(flow, secret) is None:
            return
        # The body must reach the request hook before anything is sent upstream.
        request.stream = False
        self._admitted[flow] = secret

    async def _look_up(self, flow: http.HTTPFlow, secret: str) -> KeyLookup | None:
        """Find the key and run the read-only checks; refuse the flow and return None if one fails."""
        store = self.settings.store
        assert store is not None
        try:
            found = await store.run(lambda db: store.find_key_now(db, secret))
        except StoreUnavailable as error:
            log.error("key store unavailable while looking up a key: %s", error)
            self._refuse(flow, checks.STORE_UNAVAILABLE)
            return None

        refusal = checks.check_key(found, _request_line(flow), timeutil.now())
        if refusal is not None:
            self._refuse(flow, refusal, found)
            return None
        return found

    async def request(self, flow: http.HTTPFlow) -> None:
        secret = self._admitted.pop(flow, None)
        if secret is None:
            if injection.headers_already_sent(flow.request):
                self._redact(flow)
            return
        if flow.response or flow.error or not flow.live:
            return
        if injection.headers_already_sent(flow.request):
            log.error("killed a request with a virtual key: another addon streamed it before the key was checked")
            flow.kill()
            return
        # Checked again: the key may have been revoked or expired while the body arrived.
        found = await self._look_up(flow, secret)
        if found is None:
            return
        store = self.settings.store
        config = self.settings.config
        assert store is not None and config is not None
        key = found.key
        now = timeutil.now()
        window = int(now // 60)
        decision: dict = {"key_id": key.id, "service": key.target}

        try:
            if key.rate_limit is not None:
                if window > self._pruned_window:
                    self._prune_rate_windows(window)
                allowed = await store.run(lambda db: store.take_rate_slot_now(db, key.id, window, key.rate_limit))
                if not allowed:
                    self._refuse(flow, checks.RATE_LIMITED, found, {"Retry-After": str(checks.retry_after(now))})
                    return

            if key.token_budget is not None:
                estimate = usage.estimate_from_request(flow.request.raw_content)
                reservation = await store.run(lambda db: store.reserve_tokens_now(db, key.id, estimate, now))
                if reservation is None:
                    await self._give_back(found, window, None)
                    self._refuse(flow, checks.BUDGET_EXCEEDED, found)
                    return
                decision.update(reservation_id=reservation, estimate=estimate)

            if key.one_shot:
                consumed = await store.run(lambda db: store.consume_one_shot_now(db, key.id))
                if not consumed:
                    await self._give_back(found, window, decision.get("reservation_id"))
                    self._refuse(flow, checks.KEY_ALREADY_USED, found)
                    return
        except StoreUnavailable as error:
            log.error("key store unavailable while recording use of key %s: %s", key.id, error)
            self._refuse(flow, checks.STORE_UNAVAILABLE, found)
            return

        assert found.credential is not None and found.credential_header is not None
        injection.inject(flow.request, config.key_header, key.id, found.credential_header, found.credential, key.agent)
        self._credentials[flow] = found.credential
        decision["credential_header"] = found.credential_header
        flow.metadata[DECISION] = decision
        flow.comment = f"mitmkeys: key {key.id}, service {key.target}"
        self._unredacted.add(flow)

    async def _give_back(self, found: KeyLookup, window: int, reservation_id: int | None) -> None:
        """Undo the writes of a request refused by a later step, so refusals cost nothing."""
        store = self.settings.store
        assert store is not None
        if found.key.rate_limit is not None:
            await store.run(lambda db: store.give_back_rate_slot_now(db, found.key.id, window))
        if reservation_id is not None:
            await store.run(lambda db: store.release_reservation_now(db, reservation_id))

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

    def _refuse(
        self, flow: http.HTTPFlow, refusal: Refusal, found: KeyLookup | None = None,
        headers: dict[str, str] | None = None, detail: str | None = None,
    ) -> None:
        key_id = found.key.id if found else None
        refuse(flow, refusal, headers)
        flow.metadata[DECISION] = {
            "key_id": key_id, "service": found.key.target if found else None, "refused": refusal.error,
        }
        flow.comment = f"mitmkeys: refused ({refusal.error})" + (f", key {key_id}" if key_id else "")
        log.info(
            "refused %s %s://%s:%d: %s (key %s)%s",
            flow.request.method, flow.request.scheme, flow.request.host, flow.request.port,
            refusal.error, key_id or "-", f": {detail}" if detail else "",
        )

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)
        credential = self._credentials.get(flow)
        if credential and flow.response:
            injection.redact_echo_in_headers(flow.response.headers, credential)

    def response(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)
        credential = self._credentials.pop(flow, None)
        if credential and flow.response and not flow.response.stream:
            if injection.redact_echo_in_body(flow.response, credential):
                log.warning(
                    "removed the credential of service %s that the upstream echoed in its response (key %s)",
                    flow.metadata[DECISION].get("service"), flow.metadata[DECISION].get("key_id"),
                )

    def error(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)

    def done(self) -> None:
        # Runs before mitmproxy's save addon writes the flows still in flight at shutdown.
        for flow in list(self._unredacted):
            self._redact(flow)

    def _redact(self, flow: http.HTTPFlow) -> None:
        if flow not in self._unredacted:
            return
        header = (flow.metadata.get(DECISION) or {}).get("credential_header")
        if header:
            injection.redact(flow.request, header)
        self._unredacted.discard(flow)


def _remove_embedded_secrets(request: http.Request) -> None:
    """Take every secret out of the path and drop the headers that contain one."""
    request.path = keyformat.redact_secrets(request.path)
    request.headers.fields = tuple(
        (name, value) for name, value in request.headers.fields
        if not keyformat.contains_secret(value.decode("latin-1"))
    )


def _request_line(flow: http.HTTPFlow) -> checks.Request:
    request = flow.request
    # For HTTP/2 and HTTP/3 the authority is the :authority pseudo-header, which host_header
    # already returns; for HTTP/1 it is the absolute-form request target.
    is_http1 = not (request.is_http2 or request.is_http3)
    return checks.Request(
        method=request.method,
        scheme=request.scheme,
        host=request.host,
        port=request.port,
        path=request.path,
        host_header=request.host_header,
        target_authority=(request.authority or None) if is_http1 else None,
        sni=flow.server_conn.sni or flow.client_conn.sni,
    )
