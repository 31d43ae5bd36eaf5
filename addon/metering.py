"""Turns each proxied request made with a virtual key into a usage event with its token counts."""

import logging
import weakref

from mitmproxy import http

from addon import timeutil, usage
from addon.proxy import DECISION
from addon.records import Settlement, UsageRecord
from addon.recorder import UsageRecorder

log = logging.getLogger(__name__)

# JSON bodies above this size are forwarded but not parsed for usage.
MAX_METERED_BODY_BYTES = 8 * 1024 * 1024


def _is_event_stream(response: http.Response) -> bool:
    return response.headers.get("content-type", "").lower().startswith("text/event-stream")


class UsageMeter:
    """Streams server-sent events through while counting tokens, and records every key's request."""

    def __init__(self, recorder: UsageRecorder) -> None:
        self.recorder = recorder
        self._meters: weakref.WeakKeyDictionary[http.HTTPFlow, usage.StreamMeter] = weakref.WeakKeyDictionary()
        # Forwarded key flows without an event yet, recorded as interrupted at shutdown.
        self._in_flight: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()

    def request(self, flow: http.HTTPFlow) -> None:
        if _forwarded(flow):
            self._in_flight.add(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or response.stream or not _is_event_stream(response):
            return
        # mitmproxy would otherwise hold the whole stream back until it ends.
        if _forwarded(flow):
            meter = usage.StreamMeter(response.headers.get("content-encoding", ""))
            self._meters[flow] = meter
            response.stream = meter
        else:
            response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        decision = flow.metadata.get(DECISION)
        if not decision or not decision.get("key_id"):
            return
        if decision.get("refused"):
            self._record(flow, decision, tokens=None, response_bytes=len(flow.response.raw_content or b""))
            return

        meter = self._meters.pop(flow, None)
        if meter is not None:
            tokens, response_bytes = meter.tokens, meter.wire_bytes
        else:
            tokens, response_bytes = self._tokens_of_body(flow.response), len(flow.response.raw_content or b"")
        self._record(flow, decision, tokens, response_bytes)
        total = usage.total_of(tokens)
        if total is not None:
            flow.comment = f"{flow.comment}, {total} tokens"

    def error(self, flow: http.HTTPFlow) -> None:
        if _forwarded(flow) and flow in self._in_flight:
            self._record_unfinished(flow, interrupted=False)

    def done(self) -> None:
        # Runs before the recorder's final write, so requests cut off by shutdown are kept.
        for flow in list(self._in_flight):
            self._record_unfinished(flow, interrupted=True)

    def _record_unfinished(self, flow: http.HTTPFlow, interrupted: bool) -> None:
        """Record a forwarded request that ended without a complete response."""
        meter = self._meters.pop(flow, None)
        tokens = meter.tokens if meter else None
        response_bytes = meter.wire_bytes if meter else 0
        self._record(flow, flow.metadata[DECISION], tokens, response_bytes, interrupted=interrupted)

    @staticmethod
    def _tokens_of_body(response: http.Response) -> usage.Tokens | None:
        if "json" not in response.headers.get("content-type", "").lower():
            return None
        if len(response.raw_content or b"") > MAX_METERED_BODY_BYTES:
            return None
        try:
            body = response.get_content(strict=True)
        except ValueError:
            log.warning("could not decode a %s response body to count tokens", response.headers.get("content-encoding"))
            return None
        if body is None or len(body) > MAX_METERED_BODY_BYTES:
            return None
        return usage.tokens_from_json_body(body)

    def _record(
        self, flow: http.HTTPFlow, decision: dict, tokens: usage.Tokens | None, response_bytes: int,
        interrupted: bool = False,
    ) -> None:
        self._in_flight.discard(flow)
        response = None if interrupted else flow.response
        refused = decision.get("refused")
        ended = (response.timestamp_end if response and response.timestamp_end else None) or timeutil.now()
        started = flow.request.timestamp_start
        total = usage.total_of(tokens)
        event = UsageRecord(
            key_id=decision["key_id"],
            service=decision.get("service") or "",
            method=flow.request.method,
            path=flow.request.path.split("?", 1)[0],
            status=response.status_code if response else None,
            latency_ms=round((ended - started) * 1000, 3) if started else None,
            request_bytes=len(flow.request.raw_content or b""),
            response_bytes=response_bytes,
            prompt_tokens=tokens.prompt if tokens else None,
            completion_tokens=tokens.completion if tokens else None,
            total_tokens=total,
            metered=tokens is not None,
            refused=refused,
            created_at=started or timeutil.now(),
        )
        settlement = None
        if not refused:
            # An unmetered request is charged its reserved estimate, so that a stream which
            # never reports usage cannot spend a budget for free.
            charge = total if total is not None else int(decision.get("estimate") or 0)
            settlement = Settlement(decision["key_id"], charge, decision.get("reservation_id"))
        self.recorder.add(event, settlement)


def _forwarded(flow: http.HTTPFlow) -> bool:
    decision = flow.metadata.get(DECISION)
    return bool(decision and decision.get("key_id") and not decision.get("refused"))
