"""Manage mitmkeys services and virtual keys directly in the key store, without a running proxy.

Input goes through the same checks as the management API (addon/validation.py), so both apply
identical rules. A credential is read from an environment variable or from standard input, never
from the command line, where it would show in shell history and in the process list.
Exit status: 0 on success, 1 when the store rejects the operation (not found, conflict,
unavailable), 2 on invalid input.
"""

import argparse
import getpass
import json
import logging
import os
import pathlib
import sys
from typing import Any

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))

from addon import api, timeutil, validation  # noqa: E402
from addon.store import Conflict, NotFound, Store, StoreUnavailable, sqlite_path  # noqa: E402
from addon.validation import BadInput  # noqa: E402

log = logging.getLogger("mitmkeys_admin")

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
SOURCE = "cli"

# The API field that a validation message starts with, and the argument that sets it here.
ARGUMENT_OF_FIELD = {
    "name": "NAME",
    "base_url": "BASE_URL",
    "credential": "credential",
    "credential_header": "--header",
    "target": "SERVICE",
    "id": "--id",
    "scope": "--scope",
    "ttl_seconds": "--ttl",
    "expires_at": "--expires-at",
    "rate_limit": "--rate-limit",
    "token_budget": "--token-budget",
    "one_shot": "--one-shot",
}


class CommandError(Exception):
    """A failure reported as one line on stderr, with the exit status to use."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def bad_input(problem: BadInput) -> CommandError:
    """Turn a validation message into a CommandError that names the command-line argument."""
    message = str(problem)
    field = message.split(" ", 1)[0].rstrip(":")
    argument = ARGUMENT_OF_FIELD.get(field)
    if argument is None:
        return CommandError(f"invalid input: {message}", EXIT_BAD_INPUT)
    # "base_url: 'x' has no host" already names the field, so the argument replaces it.
    message = message.removeprefix(f"{field}: ")
    return CommandError(f"invalid {argument}: {message}", EXIT_BAD_INPUT)


# -- reading the credential ----------------------------------------------------


def read_credential(arguments: argparse.Namespace) -> str:
    """Return the credential from the named environment variable or from standard input."""
    if arguments.credential_env is not None:
        value = os.environ.get(arguments.credential_env)
        if value is None:
            raise CommandError(
                f"environment variable {arguments.credential_env} is not set. Export it with the credential, or use --credential-stdin",
                EXIT_BAD_INPUT,
            )
        return value
    if sys.stdin.isatty():
        return getpass.getpass("credential (not echoed): ")
    text = sys.stdin.read()
    # One trailing line break, as `echo` or a here-string adds, is not part of the credential.
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


# -- output --------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]], empty_message: str) -> None:
    if not rows:
        print(empty_message)
        return
    columns = list(rows[0])
    cells = [[format_cell(row[column]) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[index]) for line in cells)) for index, column in enumerate(columns)]
    print("  ".join(column.upper().ljust(width) for column, width in zip(columns, widths)).rstrip())
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


# -- commands ------------------------------------------------------------------


def service_add(store: Store, arguments: argparse.Namespace) -> None:
    fields = {
        "name": arguments.name,
        "base_url": arguments.base_url,
        "credential": read_credential(arguments),
        "credential_header": arguments.header,
    }
    try:
        new = validation.parse_new_service(fields)
    except BadInput as problem:
        raise bad_input(problem) from None
    try:
        service = store.create_service(new.name, new.base_url, new.credential, new.credential_header)
    except Conflict:
        raise CommandError(f"service {new.name} already exists", EXIT_FAILED) from None
    log.info("created service %s for %s (credential sent in %s)", service.name, service.base_url, service.credential_header)


def service_list(store: Store, arguments: argparse.Namespace) -> None:
    # service_json leaves the credential out, as the management API does.
    services = [api.service_json(service) for service in store.list_services()]
    if arguments.json:
        print_json(services)
    else:
        print_table(services, "no services")


def service_remove(store: Store, arguments: argparse.Namespace) -> None:
    try:
        store.delete_service(arguments.name)
    except NotFound:
        raise CommandError(f"service {arguments.name} not found", EXIT_FAILED) from None
    except Conflict:
        raise CommandError(
            f"service {arguments.name} has live keys. Revoke them with 'key revoke ID' first", EXIT_FAILED,
        ) from None
    log.info("removed service %s", arguments.name)


def key_create(store: Store, arguments: argparse.Namespace) -> None:
    fields = {
        "target": arguments.service,
        "scope": arguments.scope,
        "ttl_seconds": arguments.ttl,
        "expires_at": arguments.expires_at,
        "rate_limit": arguments.rate_limit,
        "token_budget": arguments.token_budget,
        "one_shot": arguments.one_shot,
        "id": arguments.id,
    }
    try:
        new = validation.parse_new_key(fields, timeutil.now())
    except BadInput as problem:
        raise bad_input(problem) from None
    try:
        key, secret = store.create_key(
            key_id=new.id, target=new.target, scope=new.scope, expires_at=new.expires_at,
            rate_limit=new.rate_limit, one_shot=new.one_shot, source=SOURCE, token_budget=new.token_budget,
        )
    except NotFound:
        raise CommandError(f"service {new.target} not found. Add it with 'service add' first", EXIT_FAILED) from None
    except Conflict:
        raise CommandError(f"key {new.id} already exists. Choose another --id", EXIT_FAILED) from None
    if arguments.json:
        print_json({**api.key_json(key), "key": secret})
        return
    log.info(
        "created key %s for service %s (scope %s, expires %s%s%s%s). Its secret follows and is shown only once:",
        key.id, key.target, key.scope, timeutil.format_rfc3339(key.expires_at),
        f", rate limit {key.rate_limit}/min" if key.rate_limit is not None else "",
        f", token budget {key.token_budget}" if key.token_budget is not None else "",
        ", one-shot" if key.one_shot else "",
    )
    # Only the secret goes to stdout, so that SECRET=$(... key create ...) captures it.
    print(secret, flush=True)


def key_list(store: Store, arguments: argparse.Namespace) -> None:
    keys = [api.key_json(key) for key in store.list_keys()]
    if arguments.json:
        print_json(keys)
    else:
        print_table(keys, "no keys")


def key_revoke(store: Store, arguments: argparse.Namespace) -> None:
    try:
        key = store.get_key(arguments.id)
    except NotFound:
        raise CommandError(f"key {arguments.id} not found", EXIT_FAILED) from None
    if key.revoked_at is not None:
        log.info("key %s was already revoked at %s", key.id, timeutil.format_rfc3339(key.revoked_at))
        return
    store.revoke_key(key.id)
    log.info("revoked key %s", key.id)


# -- arguments -----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mitmkeys_admin.py",
        description=(
            "Manage services and virtual keys in a mitmkeys key store. Works on the database "
            "file directly, also while mitmdump runs on it: changes take effect on the next request."
        ),
        epilog="Exit status: 0 on success, 1 when the operation fails (not found, conflict, "
               "store unavailable), 2 on invalid input.",
    )
    parser.add_argument("--db", default="keys.db",
                        help="key store: a SQLite file path or a sqlite:/// URL, as the keys_db option takes "
                             "(default: keys.db). Only 'service add' creates a missing file.")
    objects = parser.add_subparsers(dest="object", required=True, metavar="{service,key}")

    service = objects.add_parser("service", help="add, list and remove services").add_subparsers(
        dest="action", required=True, metavar="{add,list,remove}")
    add = service.add_parser(
        "add", help="add a service",
        description="Add a service: an upstream base URL and the credential that replaces virtual keys.")
    add.add_argument("name", metavar="NAME", help="service name: 1 to 64 characters of A-Z a-z 0-9 . _ -")
    add.add_argument("base_url", metavar="BASE_URL",
                     help="absolute http:// or https:// URL; requests must go to its scheme, host, port and path prefix")
    # Not required=True, so that a --credential on the command line gets its own message first.
    source = add.add_mutually_exclusive_group()
    source.add_argument("--credential-env", metavar="VAR",
                        help="read the credential from environment variable VAR")
    source.add_argument("--credential-stdin", action="store_true",
                        help="read the credential from standard input (one trailing line break is dropped; "
                             "on a terminal it is prompted for without echo)")
    # Only here to reject a credential on the command line with a message saying why.
    add.add_argument("--credential", help=argparse.SUPPRESS)
    add.add_argument("--header", default=None, metavar="NAME",
                     help="header that carries the credential (default: Authorization, sent as 'Bearer <credential>'; "
                          "any other header gets the bare credential)")
    add.set_defaults(run=service_add, creates_store=True)

    listing = service.add_parser("list", help="list services (never their credentials)")
    listing.add_argument("--json", action="store_true", help="print a JSON array as the management API returns it")
    listing.set_defaults(run=service_list)

    remove = service.add_parser("remove", help="remove a service that no live key targets")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(run=service_remove)

    key = objects.add_parser("key", help="create, list and revoke virtual keys").add_subparsers(
        dest="action", required=True, metavar="{create,list,revoke}")
    create = key.add_parser(
        "create", help="create a virtual key and print its secret once",
        description="Create a virtual key for a service. The secret is printed once to stdout; "
                    "the store keeps only its SHA-256 hash.")
    create.add_argument("service", metavar="SERVICE", help="name of the service the key is valid for")
    create.add_argument("--scope", choices=validation.SCOPES, default=None,
                        help="read allows GET, HEAD and OPTIONS; write allows every method (default: write)")
    expiry = create.add_mutually_exclusive_group()
    expiry.add_argument("--ttl", type=int, default=None, metavar="SECONDS",
                        help=f"lifetime in seconds (default: {validation.DEFAULT_TTL_SECONDS})")
    expiry.add_argument("--expires-at", default=None, metavar="RFC3339",
                        help="expiry time, such as 2030-01-31T12:00:00Z; a time without offset is UTC")
    create.add_argument("--rate-limit", type=int, default=None, metavar="N",
                        help="maximum requests per clock minute (default: no limit)")
    create.add_argument("--token-budget", type=int, default=None, metavar="N",
                        help="total tokens (prompt plus completion) that the key may use over all its requests "
                             "(default: no budget)")
    create.add_argument("--one-shot", action="store_true", help="the key works for one request only")
    create.add_argument("--id", default=None, metavar="ID",
                        help="public key id: 1 to 64 characters of A-Z a-z 0-9 . _ - (default: a random key_... id)")
    create.add_argument("--json", action="store_true",
                        help="print the key record and its secret as JSON, as the management API returns them")
    create.set_defaults(run=key_create)

    listing = key.add_parser("list", help="list virtual keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="print a JSON array as the management API returns it")
    listing.set_defaults(run=key_list)

    revoke = key.add_parser("revoke", help="revoke a virtual key; the next request with it is rejected")
    revoke.add_argument("id", metavar="ID")
    revoke.set_defaults(run=key_revoke)
    return parser


def open_store(database: str, create: bool) -> Store:
    try:
        path = sqlite_path(database)
    except ValueError as error:
        raise CommandError(f"invalid --db {database!r}: {error}", EXIT_BAD_INPUT) from None
    if not create and not os.path.exists(path):
        raise CommandError(
            f"key store {path} does not exist. Pass --db, or create it with 'service add'", EXIT_FAILED,
        )
    store = Store(database)
    try:
        store.open()
    except StoreUnavailable as error:
        raise CommandError(str(error), EXIT_FAILED) from None
    return store


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if getattr(arguments, "credential", None) is not None:
        parser.error(
            "--credential is not accepted because the command line shows in shell history and "
            "in the process list; use --credential-env VAR or --credential-stdin"
        )
    if arguments.run is service_add and arguments.credential_env is None and not arguments.credential_stdin:
        parser.error("service add needs --credential-env VAR or --credential-stdin")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        store = open_store(arguments.db, getattr(arguments, "creates_store", False))
        try:
            arguments.run(store, arguments)
        finally:
            store.close()
    except CommandError as error:
        log.error("error: %s", error)
        return error.status
    except StoreUnavailable as error:
        log.error("error: key store unavailable: %s", error)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
