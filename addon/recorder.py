"""Writes usage events in batches off the event loop, and prunes old history."""

import asyncio
import logging

from mitmproxy import ctx, exceptions

from addon import timeutil
from addon.records import Settlement, UsageRecord
from addon.settings import Settings
from addon.store import StoreUnavailable

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0
# A reservation this old belongs to a request that never finished (a proxy that crashed
# mid-request); its tokens go back to the budget.
STALE_RESERVATION_SECONDS = 3600
RETENTION_CHECK_SECONDS = 3600


class UsageRecorder:
    """Collects usage events in memory and writes them once a second in one transaction.

    A clean shutdown writes everything still queued. A hard crash (SIGKILL, power loss)
    loses the events of at most the last FLUSH_SECONDS, plus any batch the store could
    not take. Their token reservations are freed after STALE_RESERVATION_SECONDS.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._events: list[UsageRecord] = []
        self._settlements: list[Settlement] = []
        self._tasks: list[asyncio.Task] = []
        self._failed_flushes = 0

    def load(self, loader) -> None:
        loader.add_option(
            "keys_usage_retention_days", int, 30,
            "Days of usage history to keep; older events are deleted hourly. 0 keeps all.",
        )

    def configure(self, updated: set[str]) -> None:
        if "keys_usage_retention_days" in updated and ctx.options.keys_usage_retention_days < 0:
            raise exceptions.OptionsError(
                f"Cannot parse keys_usage_retention_days={ctx.options.keys_usage_retention_days}: "
                "must be 0 (keep all) or a positive number of days"
            )

    def add(self, event: UsageRecord, settlement: Settlement | None) -> None:
        self._events.append(event)
        if settlement is not None:
            self._settlements.append(settlement)

    # Synchronous on purpose: after a script reload mitmproxy calls `running` from a sync context.
    def running(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._flush_forever()), loop.create_task(self._prune_forever())]

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        store = self.settings.store
        if store is None or not (self._events or self._settlements):
            return
        events, settlements = self._events, self._settlements
        self._events, self._settlements = [], []
        try:
            await store.in_thread(store.record_usage, events, settlements)
        except StoreUnavailable as error:
            # Keep the batch for the next try, ahead of newer events.
            self._events[:0] = events
            self._settlements[:0] = settlements
            self._failed_flushes += 1
            if self._failed_flushes == 1 or self._failed_flushes % 60 == 0:
                log.warning(
                    "could not write %d usage events (attempt %d), keeping them queued: %s",
                    len(self._events), self._failed_flushes, error,
                )
        else:
            self._failed_flushes = 0

    async def _prune_forever(self) -> None:
        while True:
            await self.prune()
            await asyncio.sleep(RETENTION_CHECK_SECONDS)

    async def prune(self) -> None:
        store = self.settings.store
        if store is None:
            return
        now = timeutil.now()
        try:
            freed = await store.in_thread(store.prune_reservations, now - STALE_RESERVATION_SECONDS)
            if freed:
                log.warning("freed %d token reservations of requests that never finished", freed)
            days = ctx.options.keys_usage_retention_days
            if days > 0:
                deleted = await store.in_thread(store.prune_usage, now - days * 86400)
                if deleted:
                    log.info("deleted %d usage events older than %d days", deleted, days)
        except StoreUnavailable as error:
            log.warning("could not prune usage history: %s", error)

    def done(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        store = self.settings.store
        if store is None or not (self._events or self._settlements):
            return
        # Shutdown may block: nothing else is served any more, and nothing may be lost.
        try:
            store.record_usage(self._events, self._settlements)
        except Exception as error:  # noqa: BLE001 - report whatever kept the events from disk
            log.error("lost %d usage events at shutdown: %s", len(self._events), error)
        else:
            log.info("wrote %d usage events at shutdown", len(self._events))
        self._events, self._settlements = [], []

