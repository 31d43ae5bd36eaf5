"""Unit tests of the key store: migrations, one-shot use, rate windows and database URLs."""

import asyncio
import sqlite3
import threading

import peewee
import pytest

from addon import schema, timeutil
from addon.records import UsageRecord
from addon.store import Conflict, NotFound, Store, StoreUnavailable, sqlite_path


@pytest.fixture
def store(tmp_path):
    opened = Store(str(tmp_path / "keys.db"))
    opened.open()
    opened.create_service("svc", "http://api.example", "sk-store-test", "Authorization")
    yield opened
    opened.close()


def new_key(store, key_id="k1", **fields):
    values = dict(target="svc", scope="write", expires_at=timeutil.now() + 60, rate_limit=None, one_shot=False, source="api")
    values.update(fields)
    return store.create_key(key_id=key_id, **values)


def test_secret_stored_only_as_hash(store, tmp_path):
    _, secret = new_key(store)
    raw = (tmp_path / "keys.db").read_bytes() + (tmp_path / "keys.db-wal").read_bytes()
    assert secret.encode() not in raw
    assert secret.startswith("vk_")
    assert len(secret) >= 3 + 32


def test_migration_runs_once(tmp_path):
    path = str(tmp_path / "keys.db")
    for _ in range(2):
        store = Store(path)
        store.open()
        store.close()
    rows = sqlite3.connect(path).execute("SELECT version FROM schema_version").fetchall()
    assert rows == [(schema.LATEST_VERSION,)]


def test_newer_schema_refused(tmp_path):
    path = str(tmp_path / "keys.db")
    store = Store(path)
    store.open()
    store.close()
    connection = sqlite3.connect(path)
    connection.execute("UPDATE schema_version SET version = 999")
    connection.commit()
    connection.close()
    with pytest.raises(StoreUnavailable, match="newer than this mitmkeys"):
        Store(path).open()


def test_wal_mode(store, tmp_path):
    mode = sqlite3.connect(str(tmp_path / "keys.db")).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_duplicate_key_id_conflicts(store):
    new_key(store)
    with pytest.raises(Conflict, match="key already exists"):
        new_key(store)


def test_key_for_unknown_service_not_found(store):
    with pytest.raises(NotFound, match="service not found"):
        new_key(store, target="missing")


def test_delete_service_with_live_key_conflicts(store):
    new_key(store)
    with pytest.raises(Conflict):
        store.delete_service("svc")


def test_delete_service_after_revoke(store):
    key, _ = new_key(store)
    store.revoke_key(key.id)
    store.delete_service("svc")
    with pytest.raises(NotFound):
        store.get_service("svc")


def test_one_shot_consumed_by_one_thread(store):
    key, _ = new_key(store, one_shot=True)
    results: list[bool] = []
    barrier = threading.Barrier(20)

    def consume():
        barrier.wait()
        results.append(store._guarded(store.consume_one_shot_now, (store.worker_db, key.id)))

    threads = [threading.Thread(target=consume) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1
    assert results.count(False) == 19


def test_one_shot_consumed_once_across_stores(store, tmp_path):
    key, _ = new_key(store, one_shot=True)
    other = Store(str(tmp_path / "keys.db"))
    other.open()
    try:
        first = asyncio.run(other.run(lambda db: other.consume_one_shot_now(db, key.id)))
        second = asyncio.run(store.run(lambda db: store.consume_one_shot_now(db, key.id)))
    finally:
        other.close()
    assert first is True
    assert second is False


def test_rate_slots_stop_at_limit(store):
    key, _ = new_key(store)

    async def take_four():
        return [await store.run(lambda db: store.take_rate_slot_now(db, key.id, 100, 3)) for _ in range(4)]

    assert asyncio.run(take_four()) == [True, True, True, False]


def test_rate_slot_given_back(store):
    key, _ = new_key(store)

    async def scenario():
        await store.run(lambda db: store.take_rate_slot_now(db, key.id, 100, 1))
        await store.run(lambda db: store.give_back_rate_slot_now(db, key.id, 100))
        return await store.run(lambda db: store.take_rate_slot_now(db, key.id, 100, 1))

    assert asyncio.run(scenario()) is True


def test_locked_write_moves_to_thread(store, tmp_path):
    key, _ = new_key(store, one_shot=True)
    blocker = sqlite3.connect(str(tmp_path / "keys.db"), isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    released = threading.Event()

    def release_soon():
        released.wait(0.3)
        blocker.execute("COMMIT")
        released.set()

    async def scenario():
        thread = threading.Thread(target=release_soon)
        thread.start()
        result = await store.run(lambda db: store.consume_one_shot_now(db, key.id))
        thread.join()
        return result

    assert asyncio.run(scenario()) is True
    assert store.get_key(key.id).used is True


def test_lookup_ignores_write_lock(store, tmp_path):
    _, secret = new_key(store)
    blocker = sqlite3.connect(str(tmp_path / "keys.db"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    blocker.execute("UPDATE service SET updated_at = 0")
    try:
        found = asyncio.run(store.run(lambda db: store.find_key_now(db, secret)))
    finally:
        blocker.execute("ROLLBACK")
    assert found is not None
    assert found.credential == "sk-store-test"


@pytest.mark.parametrize("value, expected", [
    ("keys.db", "keys.db"),
    ("/tmp/keys.db", "/tmp/keys.db"),
    ("sqlite:///keys.db", "keys.db"),
    ("sqlite:////tmp/keys.db", "/tmp/keys.db"),
])
def test_sqlite_path_accepted(value, expected):
    assert sqlite_path(value) == expected


@pytest.mark.parametrize("value, message", [
    ("", "empty"),
    ("postgresql://user@localhost/keys", "PostgreSQL"),
    ("mysql://localhost/keys", "unknown database URL scheme"),
    ("sqlite://host/keys.db", "no host"),
    ("sqlite:///", "names no file"),
])
def test_sqlite_path_rejected(value, message):
    with pytest.raises(ValueError, match=message):
        sqlite_path(value)


def test_upgrade_from_first_schema_keeps_keys(tmp_path):
    path = str(tmp_path / "keys.db")
    database = peewee.SqliteDatabase(path)
    schema.MIGRATIONS[0][2](database)
    database.execute_sql('CREATE TABLE "schema_version" ("id" INTEGER NOT NULL PRIMARY KEY, "version" INTEGER NOT NULL)')
    database.execute_sql('INSERT INTO "schema_version" ("version") VALUES (1)')
    database.execute_sql(
        "INSERT INTO service VALUES ('svc', 'http://api.example', 'sk-old', 'Authorization', 1, 1)"
    )
    database.execute_sql(
        "INSERT INTO virtual_key VALUES ('old-key', 'hash', 'svc', 'read', 4102444800, 5, 0, 0, 'api', 1, NULL)"
    )
    database.close()

    store = Store(path)
    store.open()
    try:
        key = store.get_key("old-key")
        version = sqlite3.connect(path).execute("SELECT version FROM schema_version").fetchone()[0]
    finally:
        store.close()
    assert version == schema.LATEST_VERSION
    assert key.scope == "read"
    assert key.rate_limit == 5
    assert key.tokens_used == 0
    assert key.token_budget is None
    assert key.agent is None


def usage_record(key_id: str, created_at: float) -> UsageRecord:
    return UsageRecord(
        key_id=key_id, service="svc", method="GET", path="/", status=200, latency_ms=1.0,
        request_bytes=0, response_bytes=2, prompt_tokens=None, completion_tokens=None,
        total_tokens=None, metered=False, refused=None, created_at=created_at,
    )


def test_prune_usage_keeps_recent_events(store):
    key, _ = new_key(store)
    now = timeutil.now()
    old = [usage_record(key.id, now - 40 * 86400) for _ in range(7)]
    recent = [usage_record(key.id, now - 60) for _ in range(3)]
    store.record_usage(old + recent, [])

    deleted = store.prune_usage(now - 30 * 86400, batch=2)

    assert deleted == 7
    assert store.usage_page(key.id, None, None, 1, 50).total == 3


def test_prune_reservations_frees_stale_ones(store):
    key, _ = new_key(store, token_budget=100)
    now = timeutil.now()
    stale = asyncio.run(store.run(lambda db: store.reserve_tokens_now(db, key.id, 60, now - 7200)))
    assert stale is not None
    refused = asyncio.run(store.run(lambda db: store.reserve_tokens_now(db, key.id, 60, now)))
    assert refused is None

    assert store.prune_reservations(now - 3600) == 1
    admitted = asyncio.run(store.run(lambda db: store.reserve_tokens_now(db, key.id, 60, now)))
    assert admitted is not None
