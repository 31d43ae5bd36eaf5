"""Build keys.db.example: a key store at the current schema with a demo service and demo virtual keys.

The demo service `demo` points at scripts/demo_upstream.py on http://127.0.0.1:9000 with that
server's default credential. Virtual key secrets are random and only their SHA-256 hashes are
stored, so this script prints each secret once. The secrets of the committed keys.db.example are
the ones printed by the run that built it. Run the script again for a copy whose secrets you have.
"""

import argparse
import logging
import os
import pathlib
import sqlite3
import sys
import tempfile

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))

from addon import schema, timeutil, validation  # noqa: E402
from addon.store import Store  # noqa: E402

log = logging.getLogger("build_example_db")

DEFAULT_OUTPUT = REPOSITORY_ROOT / "keys.db.example"
DEMO_SERVICE = validation.parse_new_service({
    "name": "demo",
    "base_url": "http://127.0.0.1:9000",
    "credential": "sk-demo-upstream-secret",
})
# Fixed ids keep the example the same from build to build, apart from secrets and times.
# Every key lives for the longest time-to-live that key creation accepts (ten years).
DEMO_KEYS = [
    {"id": "demo-write", "target": "demo", "scope": "write", "ttl_seconds": validation.MAX_TTL_SECONDS},
    {"id": "demo-one-shot", "target": "demo", "scope": "write", "one_shot": True,
     "ttl_seconds": validation.MAX_TTL_SECONDS},
    {"id": "demo-read", "target": "demo", "scope": "read", "ttl_seconds": validation.MAX_TTL_SECONDS},
]


def fill_store(path: pathlib.Path) -> list[tuple[str, str, str]]:
    """Create the demo service and keys in a new store at `path`, and return (id, description, secret) rows."""
    store = Store(str(path))
    store.open()
    try:
        store.create_service(
            DEMO_SERVICE.name, DEMO_SERVICE.base_url, DEMO_SERVICE.credential, DEMO_SERVICE.credential_header,
        )
        created: list[tuple[str, str, str]] = []
        now = timeutil.now()
        for fields in DEMO_KEYS:
            new = validation.parse_new_key(fields, now)
            key, secret = store.create_key(
                key_id=new.id, target=new.target, scope=new.scope, expires_at=new.expires_at,
                rate_limit=new.rate_limit, one_shot=new.one_shot, source="cli",
            )
            description = f"scope {key.scope}" + (", one-shot" if key.one_shot else "")
            created.append((key.id, description, secret))
        return created
    finally:
        store.close()


def write_single_file(source: pathlib.Path, output: pathlib.Path) -> None:
    """Copy the store at `source` to `output` as one file in rollback-journal mode.

    The store runs in WAL mode, where committed rows may still sit in a -wal file next to the
    database. VACUUM INTO writes a complete, compacted copy whose header selects the rollback
    journal, so the committed file needs no companion files. The copy replaces `output` in one
    rename, and stale -wal and -shm files of the old output are removed because SQLite would
    apply them to the new file.
    """
    partial = output.with_name(output.name + ".partial")
    partial.unlink(missing_ok=True)
    connection = sqlite3.connect(source)
    try:
        connection.execute("VACUUM INTO ?", (str(partial),))
    finally:
        connection.close()

    for suffix in ("-wal", "-shm"):
        stale = output.with_name(output.name + suffix)
        if stale.exists():
            log.warning("removing %s left over from an earlier use of %s", stale, output.name)
            stale.unlink()
    os.replace(partial, output)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Build a key store with the demo service 'demo' (http://127.0.0.1:9000, the default "
            "of scripts/demo_upstream.py) and three demo virtual keys, and print each key's "
            "secret once. An existing file at the output path is replaced."
        ),
    )
    parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT,
                        help=f"database file to write (default: {DEFAULT_OUTPUT})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    output: pathlib.Path = arguments.output
    if not output.parent.is_dir():
        log.error("cannot write %s: folder %s does not exist", output, output.parent)
        return 2

    with tempfile.TemporaryDirectory(prefix="mitmkeys-example-") as folder:
        built = pathlib.Path(folder) / "keys.db"
        keys = fill_store(built)
        write_single_file(built, output)

    print(f"Wrote {output} (schema version {schema.LATEST_VERSION}).")
    print(f"Service {DEMO_SERVICE.name}: {DEMO_SERVICE.base_url} (start scripts/demo_upstream.py)")
    print("Virtual key secrets, shown only now because the database stores only their hashes:")
    width = max(len(key_id) for key_id, _, _ in keys)
    for key_id, description, secret in keys:
        print(f"  {key_id:<{width}}  {secret}  ({description})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
