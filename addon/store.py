"""The key store: the only module that talks to the database.

Two kinds of callers use it. The proxy's request hook runs on mitmproxy's event loop and
calls the `*_now` methods through `Store.run`. That first runs a pre-compiled statement on a
connection that fails at once on a lock. Only when another process holds the lock does the
statement move to a worker thread, which may wait. The management API calls the plain
methods from worker threads (`Store.in_thread`).
"""

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import peewee

from addon import keyformat, schema, timeutil
from addon.records import KeyLookup, KeyRecord, ServiceRecord, Settlement, UsagePage, UsageRecord
from addon.schema import RateWindow, Service, TokenReservation, UsageEvent, VirtualKey

log = logging.getLogger(__name__)
# peewee logs every statement with its parameters at DEBUG, credentials included; mitmproxy's
# termlog_verbosity=debug would print them.
logging.getLogger("peewee").setLevel(logging.INFO)

T = TypeVar("T")

# How long a worker thread waits for another process's write lock before the store
# counts as unavailable and the request fails closed.
LOCK_WAIT_SECONDS = 5.0
_WORKER_THREADS = 4


class StoreUnavailable(Exception):
    """The database could not be reached or stayed locked; callers fail closed."""


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


def sqlite_path(database: str) -> str:
    """Return the SQLite file path of a `keys_db` value, a path or a database URL.

    Raises ValueError for other database kinds and for malformed URLs.
    """
    if "://" not in database:
        if not database:
            raise ValueError("the database path is empty")
        return database
    parts = urlsplit(database)
    if parts.scheme in ("postgres", "postgresql"):
        raise ValueError(
            "PostgreSQL is not supported yet; use a SQLite path or a sqlite:/// URL"
        )
    if parts.scheme != "sqlite":
        raise ValueError(f"unknown database URL scheme {parts.scheme!r}; use a path or sqlite:///path")
    if parts.netloc:
        raise ValueError("a sqlite URL has no host: write sqlite:///relative/path or sqlite:////absolute/path")
    path = unquote(parts.path)[1:]  # sqlite:///keys.db -> keys.db, sqlite:////tmp/k.db -> /tmp/k.db
    if not path:
        raise ValueError("the sqlite URL names no file")
    return path


def _is_lock_error(error: Exception) -> bool:
    text = str(error).lower()
    return "locked" in text or "busy" in text


class _Database(peewee.SqliteDatabase):
    """A SQLite database whose connections carry a fixed busy timeout."""

    def __init__(self, path: str, busy_timeout_ms: int, **kwargs: Any) -> None:
        self._busy_timeout_ms = busy_timeout_ms
        super().__init__(
            path,
            pragmas={"journal_mode": "wal", "synchronous": "normal", "foreign_keys": 1},
            **kwargs,
        )

    def _add_conn_hooks(self, conn: sqlite3.Connection) -> None:
        super()._add_conn_hooks(conn)
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")


class Store:
    """Services and virtual keys in one SQLite database (WAL mode).

    NOTE: the peewee models are bound to the store opened last. So a process uses one open
    store at a time, as the addon and the admin CLI do.
    """

    def __init__(self, database: str) -> None:
        self.path = sqlite_path(database)
        # Used only from the event loop thread. Its busy timeout is 0, so it never waits for a lock.
        self._loop_db = _Database(self.path, busy_timeout_ms=0, check_same_thread=False)
        # Used from the worker threads, one connection per thread.
        self.worker_db = _Database(self.path, busy_timeout_ms=int(LOCK_WAIT_SECONDS * 1000))
        self._executor = ThreadPoolExecutor(_WORKER_THREADS, thread_name_prefix="mitmkeys-store")
        self._sql: dict[str, str] = {}

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> None:
        """Create or migrate the schema and prepare the hot-path statements.

        Raises StoreUnavailable when the file cannot be opened or migrated.
        """
        try:
            self.worker_db.bind(schema.MODELS, bind_refs=False, bind_backrefs=False)
            self.worker_db.connect(reuse_if_open=True)
            schema.migrate(self.worker_db)
            self.worker_db.close()
            self._loop_db.connect(reuse_if_open=True)
        except (peewee.OperationalError, peewee.DatabaseError, sqlite3.Error, schema.SchemaError) as error:
            raise StoreUnavailable(f"cannot open key store {self.path!r}: {error}") from error
        self._compile_statements()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._loop_db.close()
        # The calling thread may have used the worker database directly (the final usage write).
        self.worker_db.close()

    def _compile_statements(self) -> None:
        # peewee renders each statement once with placeholder values. The hot path then only
        # binds parameters, because building an ORM query per request costs several times more.
        find = (
            VirtualKey.select(
                VirtualKey.id, VirtualKey.target, VirtualKey.scope, VirtualKey.expires_at,
                VirtualKey.rate_limit, VirtualKey.one_shot, VirtualKey.used, VirtualKey.source,
                VirtualKey.created_at, VirtualKey.revoked_at, VirtualKey.agent,
                VirtualKey.token_budget, Service.base_url, Service.credential, Service.credential_header,
            )
            .join(Service, peewee.JOIN.LEFT_OUTER, on=(Service.name == VirtualKey.target))
            .where(VirtualKey.secret_hash == "")
        )
        consume = VirtualKey.update(used=True).where(
            (VirtualKey.id == "") & (VirtualKey.used == False)  # noqa: E712 (peewee expression)
        )
        take_slot = (
            RateWindow.insert(key_id="", window=0, count=1)
            .on_conflict(
                conflict_target=[RateWindow.key_id, RateWindow.window],
                update={RateWindow.count: RateWindow.count + 1},
                where=(RateWindow.count < 0),
            )
        )
        give_back = RateWindow.update(count=RateWindow.count - 1).where(
            (RateWindow.key_id == "") & (RateWindow.window == 0) & (RateWindow.count > 0)
        )
        prune = RateWindow.delete().where(RateWindow.window < 0)
        insert_usage = UsageEvent.insert(**{field: None for field in UsageRecord._fields})
        for name, query in {
            "find_key": find, "consume_one_shot": consume, "take_rate_slot": take_slot,
            "give_back_rate_slot": give_back, "prune_rate_windows": prune,
            "insert_usage": insert_usage,
        }.items():
            self._sql[name] = query.sql()[0]

    # -- running statements -------------------------------------------------

    async def run(self, operation: Callable[[peewee.Database], T]) -> T:
        """Run a short hot-path operation without stalling the event loop.

        The first try runs inline on a connection that fails at once on a lock. Only when
        another process holds the lock does the operation move to a worker thread, where
        it may wait up to LOCK_WAIT_SECONDS. Raises StoreUnavailable when that also fails.
        """
        try:
            return operation(self._loop_db)
        except (peewee.OperationalError, sqlite3.OperationalError) as error:
            if not _is_lock_error(error):
                raise StoreUnavailable(str(error)) from error
        except (peewee.DatabaseError, sqlite3.Error) as error:
            raise StoreUnavailable(str(error)) from error
        return await self.in_thread(operation, self.worker_db)

    async def in_thread(self, function: Callable[..., T], *args: Any) -> T:
        """Run a blocking store call on a worker thread; database errors become StoreUnavailable."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._guarded, function, args)

    def _guarded(self, function: Callable[..., T], args: tuple) -> T:
        try:
            return function(*args)
        except (peewee.OperationalError, peewee.DatabaseError, sqlite3.Error) as error:
            # IntegrityError is a DatabaseError too, but callers turn it into Conflict
            # before it gets here.
            raise StoreUnavailable(str(error)) from error
        finally:
            # Worker threads outlive the store, so none may keep a connection open.
            self.worker_db.close()

    # -- hot path: called through run() --------------------------------------

    def find_key_now(self, db: peewee.Database, secret: str) -> KeyLookup | None:
        row = db.execute_sql(self._sql["find_key"], (keyformat.hash_secret(secret),)).fetchone()
        if row is None:
            return None
        key = KeyRecord(
            id=row[0], target=row[1], scope=row[2], expires_at=row[3], rate_limit=row[4],
            one_shot=bool(row[5]), used=bool(row[6]), source=row[7], created_at=row[8],
            revoked_at=row[9], agent=row[10], token_budget=row[11],
        )
        return KeyLookup(key, base_url=row[12], credential=row[13], credential_header=row[14])

    def consume_one_shot_now(self, db: peewee.Database, key_id: str) -> bool:
        """Mark a one-shot key used; True only for the one caller whose update changed the row."""
        cursor = db.execute_sql(self._sql["consume_one_shot"], (True, key_id, False))
        return cursor.rowcount == 1

    def take_rate_slot_now(self, db: peewee.Database, key_id: str, window: int, limit: int) -> bool:
        """Count one request in `window` unless `limit` requests are already counted there."""
        cursor = db.execute_sql(self._sql["take_rate_slot"], (key_id, window, 1, 1, limit))
        return cursor.rowcount == 1

    def give_back_rate_slot_now(self, db: peewee.Database, key_id: str, window: int) -> None:
        db.execute_sql(self._sql["give_back_rate_slot"], (1, key_id, window, 0))

    def prune_rate_windows_now(self, db: peewee.Database, before_window: int) -> None:
        db.execute_sql(self._sql["prune_rate_windows"], (before_window,))

    def release_reservation_now(self, db: peewee.Database, reservation_id: int) -> None:
        db.execute_sql(_RELEASE_RESERVATION_SQL, (reservation_id,))

    def reserve_tokens_now(self, db: peewee.Database, key_id: str, tokens: int, now: float) -> int | None:
        """Hold `tokens` of a key's budget for one request; return the reservation id, or None.

        One statement checks and inserts, so concurrent requests from any process cannot both
        take the last tokens. The check admits a request when the spent tokens, the tokens
        held for requests in flight and this estimate fit in the budget. A budget that is
        already used up rejects even a request that names no estimate.
        """
        cursor = db.execute_sql(_RESERVE_TOKENS_SQL, (tokens, now, key_id, tokens))
        return cursor.lastrowid if cursor.rowcount == 1 else None

    # -- management: called from worker threads ------------------------------

    def create_service(self, name: str, base_url: str, credential: str, credential_header: str) -> ServiceRecord:
        moment = timeutil.now()
        try:
            Service.insert(
                name=name, base_url=base_url, credential=credential,
                credential_header=credential_header, created_at=moment, updated_at=moment,
            ).execute()
        except peewee.IntegrityError:
            raise Conflict("service already exists") from None
        return self.get_service(name)

    def list_services(self) -> list[ServiceRecord]:
        return [_service_record(row) for row in Service.select().order_by(Service.name)]

    def get_service(self, name: str) -> ServiceRecord:
        row = Service.get_or_none(Service.name == name)
        if row is None:
            raise NotFound("not found")
        return _service_record(row)

    def update_service(self, name: str, changes: dict[str, str]) -> ServiceRecord:
        if changes:
            updated = (
                Service.update(**changes, updated_at=timeutil.now())
                .where(Service.name == name)
                .execute()
            )
        else:
            updated = Service.select().where(Service.name == name).count()
        if not updated:
            raise NotFound("not found")
        return self.get_service(name)

    def delete_service(self, name: str) -> None:
        """Delete a service; raises Conflict while a live key targets it."""
        with self.worker_db.atomic():
            if Service.get_or_none(Service.name == name) is None:
                raise NotFound("not found")
            moment = timeutil.now()
            live = VirtualKey.select().where(
                (VirtualKey.target == name)
                & VirtualKey.revoked_at.is_null()
                & (VirtualKey.expires_at > moment)
                & ~(VirtualKey.one_shot & VirtualKey.used)
            )
            if live.exists():
                raise Conflict("service has live keys; revoke them first")
            Service.delete().where(Service.name == name).execute()

    def create_key(
        self, *, key_id: str, target: str, scope: str, expires_at: float,
        rate_limit: int | None, one_shot: bool, source: str, agent: str | None = None,
        token_budget: int | None = None,
    ) -> tuple[KeyRecord, str]:
        """Create a virtual key and return it with its secret, which is never stored."""
        secret = keyformat.new_secret()
        with self.worker_db.atomic():
            if Service.get_or_none(Service.name == target) is None:
                raise NotFound("service not found")
            try:
                VirtualKey.insert(
                    id=key_id, secret_hash=keyformat.hash_secret(secret), target=target,
                    scope=scope, expires_at=expires_at, rate_limit=rate_limit,
                    one_shot=one_shot, used=False, source=source,
                    created_at=timeutil.now(), revoked_at=None, agent=agent,
                    token_budget=token_budget, tokens_used=0, requests=0,
                ).execute()
            except peewee.IntegrityError:
                raise Conflict("key already exists") from None
        return self.get_key(key_id), secret

    def list_keys(self) -> list[KeyRecord]:
        query = VirtualKey.select().order_by(VirtualKey.created_at, VirtualKey.id)
        return [_key_record(row) for row in query]

    def get_key(self, key_id: str) -> KeyRecord:
        row = VirtualKey.get_or_none(VirtualKey.id == key_id)
        if row is None:
            raise NotFound("not found")
        return _key_record(row)

    def revoke_key(self, key_id: str) -> None:
        """Revoke a key; revoking it again keeps the first revocation time."""
        with self.worker_db.atomic():
            if VirtualKey.get_or_none(VirtualKey.id == key_id) is None:
                raise NotFound("not found")
            VirtualKey.update(revoked_at=timeutil.now()).where(
                (VirtualKey.id == key_id) & VirtualKey.revoked_at.is_null()
            ).execute()

    def update_key(self, key_id: str, changes: dict[str, Any]) -> KeyRecord:
        """Change rate_limit, expires_at or token_budget of a key."""
        allowed = {"rate_limit", "expires_at", "token_budget"}
        assert set(changes) <= allowed, f"unexpected key changes {set(changes) - allowed}"
        if changes:
            VirtualKey.update(**changes).where(VirtualKey.id == key_id).execute()
        return self.get_key(key_id)

    def reset_budget(self, key_id: str) -> KeyRecord:
        updated = VirtualKey.update(tokens_used=0).where(VirtualKey.id == key_id).execute()
        if not updated:
            raise NotFound("not found")
        return self.get_key(key_id)

    # -- usage history: called from worker threads --------------------------------

    def record_usage(self, events: list[UsageRecord], settlements: list[Settlement]) -> None:
        """Store a batch of usage events and settle finished requests, all in one transaction."""
        # Counters are summed per key first: one UPDATE per key and batch, not per request.
        per_key: dict[str, tuple[int, int]] = {}
        for settlement in settlements:
            requests, tokens = per_key.get(settlement.key_id, (0, 0))
            per_key[settlement.key_id] = (requests + 1, tokens + settlement.tokens)
        reservations = [s.reservation_id for s in settlements if s.reservation_id is not None]

        with self.worker_db.atomic():
            if events:
                # executemany with one prepared statement: building an ORM insert of hundreds
                # of rows holds the GIL long enough to slow the proxy down.
                self.worker_db.cursor().executemany(self._sql["insert_usage"], events)
            for key_id, (requests, tokens) in per_key.items():
                VirtualKey.update(
                    requests=VirtualKey.requests + requests,
                    tokens_used=VirtualKey.tokens_used + tokens,
                ).where(VirtualKey.id == key_id).execute()
            for start in range(0, len(reservations), 500):
                TokenReservation.delete().where(TokenReservation.id.in_(reservations[start:start + 500])).execute()

    def usage_page(self, key_id: str, start: float | None, end: float | None, page: int, per_page: int) -> UsagePage:
        """Return one page of a key's events, newest first, with counts over the whole range."""
        self.get_key(key_id)
        condition = UsageEvent.key_id == key_id
        if start is not None:
            condition &= UsageEvent.created_at >= start
        if end is not None:
            condition &= UsageEvent.created_at < end
        sums = (
            UsageEvent.select(
                peewee.fn.COUNT(UsageEvent.id),
                peewee.fn.COALESCE(peewee.fn.SUM(UsageEvent.prompt_tokens), 0),
                peewee.fn.COALESCE(peewee.fn.SUM(UsageEvent.completion_tokens), 0),
                peewee.fn.COALESCE(peewee.fn.SUM(UsageEvent.total_tokens), 0),
            )
            .where(condition)
            .tuples()
            .get()
        )
        rows = (
            UsageEvent.select()
            .where(condition)
            .order_by(UsageEvent.created_at.desc(), UsageEvent.id.desc())
            .paginate(page, per_page)
        )
        events = [
            UsageRecord(**{field: getattr(row, field) for field in UsageRecord._fields})
            for row in rows
        ]
        return UsagePage(events, total=sums[0], prompt_tokens=sums[1], completion_tokens=sums[2], total_tokens=sums[3])

    def prune_usage(self, before: float, batch: int = 5000) -> int:
        """Delete events older than `before` in small transactions, so no lock is held for long."""
        deleted = 0
        while True:
            oldest = UsageEvent.select(UsageEvent.id).where(UsageEvent.created_at < before).limit(batch)
            count = UsageEvent.delete().where(UsageEvent.id.in_(oldest)).execute()
            deleted += count
            if count < batch:
                return deleted

    def prune_reservations(self, before: float) -> int:
        """Free reservations of requests that never finished, such as those of a crashed proxy."""
        return TokenReservation.delete().where(TokenReservation.created_at < before).execute()


_HELD_TOKENS = 'COALESCE((SELECT SUM("tokens") FROM "token_reservation" WHERE "key_id" = "virtual_key"."id"), 0)'
_RESERVE_TOKENS_SQL = (
    'INSERT INTO "token_reservation" ("key_id", "tokens", "created_at") '
    'SELECT "id", ?, ? FROM "virtual_key" '
    'WHERE "id" = ? AND "token_budget" IS NOT NULL '
    f'AND "tokens_used" + {_HELD_TOKENS} + ? <= "token_budget" '
    f'AND "tokens_used" + {_HELD_TOKENS} < "token_budget"'
)

_RELEASE_RESERVATION_SQL = 'DELETE FROM "token_reservation" WHERE "id" = ?'


def _service_record(row: Service) -> ServiceRecord:
    return ServiceRecord(
        name=row.name, base_url=row.base_url, credential=row.credential,
        credential_header=row.credential_header, created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _key_record(row: VirtualKey) -> KeyRecord:
    return KeyRecord(
        id=row.id, target=row.target, scope=row.scope, expires_at=row.expires_at,
        rate_limit=row.rate_limit, one_shot=bool(row.one_shot), used=bool(row.used),
        source=row.source, created_at=row.created_at, revoked_at=row.revoked_at,
        agent=row.agent, token_budget=row.token_budget, tokens_used=row.tokens_used,
        requests=row.requests,
    )
