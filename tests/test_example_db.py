"""keys.db.example must match the current schema; rebuild it with scripts/build_example_db.py when this fails."""

import pathlib
import shutil
import sqlite3
import time

import pytest

from addon import schema
from addon.store import Store

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "keys.db.example"
REBUILD = "rebuild it with: python scripts/build_example_db.py"
DEMO_KEY_IDS = {"demo-write", "demo-one-shot", "demo-read"}


def open_read_only(path: pathlib.Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def layout(connection: sqlite3.Connection) -> dict[str, dict]:
    """Return each table's columns and indexes, as SQLite reports them, keyed by table name."""
    tables = [
        name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    ]
    result: dict[str, dict] = {}
    for table in tables:
        # table_info rows: (cid, name, type, notnull, dflt_value, pk)
        columns = [row[1:] for row in connection.execute(f'PRAGMA table_info("{table}")')]
        indexes = {}
        # index_list rows: (seq, name, unique, origin, partial)
        for _, index, unique, origin, partial in connection.execute(f'PRAGMA index_list("{table}")'):
            indexed_columns = [row[2] for row in connection.execute(f'PRAGMA index_info("{index}")')]
            indexes[index] = (unique, origin, partial, indexed_columns)
        result[table] = {"columns": columns, "indexes": indexes}
    return result


@pytest.fixture
def example(tmp_path: pathlib.Path) -> sqlite3.Connection:
    """A read-only connection to a copy of keys.db.example, so the committed file is never touched."""
    assert EXAMPLE.is_file(), f"{EXAMPLE} is missing; {REBUILD}"
    copy = tmp_path / "example.db"
    shutil.copyfile(EXAMPLE, copy)
    connection = open_read_only(copy)
    yield connection
    connection.close()


@pytest.fixture
def fresh(tmp_path: pathlib.Path) -> sqlite3.Connection:
    """A read-only connection to a database just created by Store.open()."""
    path = tmp_path / "fresh.db"
    store = Store(str(path))
    store.open()
    store.close()
    connection = open_read_only(path)
    yield connection
    connection.close()


def test_example_schema_version_is_latest(example: sqlite3.Connection) -> None:
    table = schema.SchemaVersion._meta.table_name
    versions = [version for (version,) in example.execute(f'SELECT version FROM "{table}"')]

    assert versions == [schema.LATEST_VERSION], f"keys.db.example has schema versions {versions}; {REBUILD}"


def test_example_layout_matches_fresh_store(example: sqlite3.Connection, fresh: sqlite3.Connection) -> None:
    example_layout = layout(example)
    fresh_layout = layout(fresh)

    assert sorted(example_layout) == sorted(fresh_layout), f"tables differ; {REBUILD}"
    for table, expected in fresh_layout.items():
        assert example_layout[table]["columns"] == expected["columns"], f"columns of {table} differ; {REBUILD}"
        assert example_layout[table]["indexes"] == expected["indexes"], f"indexes of {table} differ; {REBUILD}"


def test_example_has_demo_service(example: sqlite3.Connection) -> None:
    table = schema.Service._meta.table_name
    row = example.execute(
        f'SELECT base_url, credential, credential_header FROM "{table}" WHERE name = ?', ("demo",)
    ).fetchone()

    assert row is not None, f"service 'demo' is missing; {REBUILD}"
    assert row == ("http://127.0.0.1:9000", "sk-demo-upstream-secret", "Authorization")


def test_example_demo_keys_are_live(example: sqlite3.Connection) -> None:
    table = schema.VirtualKey._meta.table_name
    rows = example.execute(
        f'SELECT id, target, scope, one_shot, used, revoked_at, expires_at FROM "{table}"'
    ).fetchall()
    keys = {row[0]: row[1:] for row in rows}
    # Thirty days of warning before the demo keys expire.
    valid_until = time.time() + 30 * 24 * 3600

    assert set(keys) == DEMO_KEY_IDS, f"demo keys differ; {REBUILD}"
    assert keys["demo-write"][:4] == ("demo", "write", 0, 0)
    assert keys["demo-one-shot"][:4] == ("demo", "write", 1, 0)
    assert keys["demo-read"][:4] == ("demo", "read", 0, 0)
    for key_id, (_, _, _, _, revoked_at, expires_at) in keys.items():
        assert revoked_at is None, f"{key_id} is revoked; {REBUILD}"
        assert expires_at > valid_until, f"{key_id} expires within 30 days; {REBUILD}"


def test_example_is_single_file() -> None:
    # Bytes 18 and 19 of the SQLite header are 2 in WAL mode, where rows could sit in a -wal
    # file that is not committed.
    header = EXAMPLE.read_bytes()[:20]

    assert header[:16] == b"SQLite format 3\x00"
    assert (header[18], header[19]) == (1, 1), f"keys.db.example is in WAL mode; {REBUILD}"
    assert not EXAMPLE.with_name(EXAMPLE.name + "-wal").exists()
