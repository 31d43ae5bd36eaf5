"""scripts/mitmkeys_admin.py run as a subprocess against a key store in tmp_path."""

import datetime
import json
import os
import pathlib
import re
import sqlite3
import subprocess
import sys
import time

import pytest

from addon import keyformat, schema

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "mitmkeys_admin.py"
CREDENTIAL = "sk-cli-test-credential-4c1f"
CREDENTIAL_ENV = "MITMKEYS_TEST_CREDENTIAL"
SECRET_RE = re.compile(r"vk_[A-Za-z0-9_-]{32,}")

# Without an offset, which the CLI reads as UTC; within the ten years a key may live.
IN_THREE_YEARS = datetime.datetime.fromtimestamp(
    time.time() + 3 * 365 * 86400, datetime.timezone.utc
).replace(microsecond=0, tzinfo=None).isoformat()


class Admin:
    """Runs the admin CLI on one database and keeps every output for the leak check."""

    def __init__(self, database: pathlib.Path) -> None:
        self.database = database
        self.outputs: list[str] = []

    def run(self, *arguments: str, stdin: str = "", credential: str | None = CREDENTIAL) -> subprocess.CompletedProcess:
        environment = {name: value for name, value in os.environ.items() if name != CREDENTIAL_ENV}
        if credential is not None:
            environment[CREDENTIAL_ENV] = credential
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "--db", str(self.database), *arguments],
            input=stdin, capture_output=True, text=True, env=environment, timeout=60,
        )
        self.outputs += [result.stdout, result.stderr]
        return result

    def add_demo_service(self) -> None:
        result = self.run("service", "add", "demo", "http://127.0.0.1:9000", "--credential-env", CREDENTIAL_ENV)
        assert result.returncode == 0, result.stderr

    def create_key(self, *arguments: str) -> str:
        result = self.run("key", "create", "demo", *arguments)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def keys(self) -> dict[str, dict]:
        result = self.run("key", "list", "--json")
        assert result.returncode == 0, result.stderr
        return {key["id"]: key for key in json.loads(result.stdout)}


@pytest.fixture
def admin(tmp_path: pathlib.Path) -> Admin:
    return Admin(tmp_path / "keys.db")


def stored_rows(database: pathlib.Path, table: str, columns: str) -> list[tuple]:
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return connection.execute(f'SELECT {columns} FROM "{table}"').fetchall()
    finally:
        connection.close()


def test_service_add_from_env(admin: Admin) -> None:
    admin.add_demo_service()
    result = admin.run("service", "list", "--json")

    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)
    assert [service["name"] for service in services] == ["demo"]
    assert services[0]["base_url"] == "http://127.0.0.1:9000"
    assert services[0]["credential_header"] == "Authorization"
    assert "credential" not in services[0]
    assert stored_rows(admin.database, schema.Service._meta.table_name, "credential") == [(CREDENTIAL,)]


def test_service_add_from_stdin(admin: Admin) -> None:
    result = admin.run(
        "service", "add", "other", "https://api.example.test/v1", "--credential-stdin", "--header", "x-api-key",
        stdin=CREDENTIAL + "\n", credential=None,
    )

    assert result.returncode == 0, result.stderr
    rows = stored_rows(admin.database, schema.Service._meta.table_name, "name, credential, credential_header")
    # The line break that ends the input is not part of the credential.
    assert rows == [("other", CREDENTIAL, "x-api-key")]


def test_key_create_prints_secret_once(admin: Admin) -> None:
    admin.add_demo_service()
    secret = admin.create_key("--id", "first", "--rate-limit", "5")
    printed_before = len(admin.outputs)

    assert SECRET_RE.fullmatch(secret), f"stdout is not one secret: {secret!r}"
    stored = stored_rows(admin.database, schema.VirtualKey._meta.table_name, "id, secret_hash")
    assert stored == [("first", keyformat.hash_secret(secret))]
    keys = admin.keys()
    assert keys["first"]["source"] == "cli"
    assert keys["first"]["rate_limit"] == 5
    assert keys["first"]["scope"] == "write"
    assert not any(secret in output for output in admin.outputs[printed_before:]), "the secret was printed again"


def test_key_create_options(admin: Admin) -> None:
    admin.add_demo_service()
    admin.create_key("--id", "reader", "--scope", "read", "--expires-at", IN_THREE_YEARS)
    admin.create_key("--id", "once", "--one-shot", "--ttl", "60")
    admin.create_key("--id", "budgeted", "--token-budget", "1000")
    result = admin.run("key", "create", "demo", "--json")

    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert SECRET_RE.fullmatch(created["key"])
    assert created["source"] == "cli"
    keys = admin.keys()
    assert keys["reader"]["scope"] == "read"
    assert keys["reader"]["expires_at"] == IN_THREE_YEARS + "Z"
    assert keys["once"]["one_shot"] is True
    assert keys["budgeted"]["token_budget"] == 1000
    assert created["id"] in keys


def test_key_list_table(admin: Admin) -> None:
    admin.add_demo_service()
    secret = admin.create_key("--id", "listed")
    result = admin.run("key", "list")

    assert result.returncode == 0, result.stderr
    assert "listed" in result.stdout
    assert secret not in result.stdout


def test_key_revoke(admin: Admin) -> None:
    admin.add_demo_service()
    admin.create_key("--id", "doomed")
    first = admin.run("key", "revoke", "doomed")
    revoked_at = admin.keys()["doomed"]["revoked_at"]
    again = admin.run("key", "revoke", "doomed")

    assert first.returncode == 0, first.stderr
    assert revoked_at is not None
    assert again.returncode == 0, again.stderr
    assert admin.keys()["doomed"]["revoked_at"] == revoked_at


def test_service_remove_needs_revoked_keys(admin: Admin) -> None:
    admin.add_demo_service()
    admin.create_key("--id", "live")
    rejected = admin.run("service", "remove", "demo")
    admin.run("key", "revoke", "live")
    removed = admin.run("service", "remove", "demo")

    assert rejected.returncode == 1
    assert "live keys" in rejected.stderr
    assert removed.returncode == 0, removed.stderr
    assert json.loads(admin.run("service", "list", "--json").stdout) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("service", "add", "demo", "ftp://127.0.0.1", "--credential-env", CREDENTIAL_ENV), "BASE_URL"),
        (("service", "add", "bad name", "http://127.0.0.1", "--credential-env", CREDENTIAL_ENV), "NAME"),
        (("service", "add", "demo", "http://127.0.0.1", "--credential-env", "MITMKEYS_TEST_UNSET"), "is not set"),
        (("service", "add", "demo", "http://127.0.0.1", "--credential-env", CREDENTIAL_ENV, "--header", "Host"),
         "--header"),
        (("service", "add", "demo", "http://127.0.0.1", "--credential", CREDENTIAL), "not accepted"),
        (("service", "add", "demo", "http://127.0.0.1"), "--credential-stdin"),
        (("key", "create", "demo", "--ttl", "0"), "--ttl"),
        (("key", "create", "demo", "--ttl", "soon"), "--ttl"),
        (("key", "create", "demo", "--expires-at", "2001-01-01T00:00:00Z"), "in the future"),
        (("key", "create", "demo", "--expires-at", "tomorrow"), "--expires-at"),
        (("key", "create", "demo", "--ttl", "60", "--expires-at", "2099-01-01T00:00:00Z"), "not allowed"),
        (("key", "create", "demo", "--rate-limit", "0"), "--rate-limit"),
        (("key", "create", "demo", "--token-budget", "-1"), "--token-budget"),
        (("key", "create", "demo", "--scope", "admin"), "--scope"),
        (("key", "create", "demo", "--id", "no spaces"), "--id"),
    ],
)
def test_bad_input_exits_2(admin: Admin, arguments: tuple[str, ...], message: str) -> None:
    admin.add_demo_service()
    result = admin.run(*arguments)

    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()[-1]) > 0
    assert result.stdout == ""


def test_empty_stdin_credential_exits_2(admin: Admin) -> None:
    result = admin.run("service", "add", "demo", "http://127.0.0.1", "--credential-stdin", stdin="", credential=None)

    assert result.returncode == 2
    assert "credential must not be empty" in result.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("key", "create", "missing"), "service missing not found"),
        (("key", "revoke", "missing"), "key missing not found"),
        (("service", "remove", "missing"), "service missing not found"),
    ],
)
def test_unknown_names_exit_1(admin: Admin, arguments: tuple[str, ...], message: str) -> None:
    admin.add_demo_service()
    result = admin.run(*arguments)

    assert result.returncode == 1
    assert message in result.stderr


def test_duplicates_exit_1(admin: Admin) -> None:
    admin.add_demo_service()
    admin.create_key("--id", "twin")
    service_again = admin.run("service", "add", "demo", "http://127.0.0.1:9000", "--credential-env", CREDENTIAL_ENV)
    key_again = admin.run("key", "create", "demo", "--id", "twin")

    assert service_again.returncode == 1
    assert "already exists" in service_again.stderr
    assert key_again.returncode == 1
    assert "already exists" in key_again.stderr


def test_missing_database_not_created(admin: Admin) -> None:
    result = admin.run("key", "list")

    assert result.returncode == 1
    assert "does not exist" in result.stderr
    assert not admin.database.exists()


def test_credential_never_printed(admin: Admin) -> None:
    admin.add_demo_service()
    admin.run("service", "add", "other", "http://127.0.0.1:9001", "--credential-stdin", stdin=CREDENTIAL)
    admin.create_key("--id", "shown")
    admin.run("service", "list")
    admin.run("service", "list", "--json")
    admin.run("key", "list")
    admin.run("key", "list", "--json")
    admin.run("key", "create", "demo", "--json")
    admin.run("service", "add", "demo", "http://127.0.0.1:9000", "--credential-env", CREDENTIAL_ENV)
    admin.run("service", "add", "third", "http://127.0.0.1:9002", "--credential", CREDENTIAL)

    leaks = [output for output in admin.outputs if CREDENTIAL in output]
    assert leaks == []
