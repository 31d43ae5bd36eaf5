"""Database tables and the ordered, versioned migrations that create and change them."""

import logging
from collections.abc import Callable

import peewee

log = logging.getLogger(__name__)


class BaseModel(peewee.Model):
    class Meta:
        # Bound to a real database by the store when it opens.
        database = None
        legacy_table_names = False


class Service(BaseModel):
    name = peewee.CharField(primary_key=True, max_length=64)
    base_url = peewee.TextField()
    credential = peewee.TextField()
    credential_header = peewee.TextField()
    created_at = peewee.DoubleField()
    updated_at = peewee.DoubleField()


class VirtualKey(BaseModel):
    id = peewee.CharField(primary_key=True, max_length=64)
    secret_hash = peewee.CharField(unique=True, max_length=64)
    # The service name, kept without a foreign key: a deleted service leaves its dead keys
    # behind as history, and they never match a service created later under the same name.
    target = peewee.CharField(max_length=64, index=True)
    scope = peewee.CharField(max_length=8)
    expires_at = peewee.DoubleField()
    rate_limit = peewee.IntegerField(null=True)
    one_shot = peewee.BooleanField(default=False)
    used = peewee.BooleanField(default=False)
    source = peewee.CharField(max_length=8)
    created_at = peewee.DoubleField()
    revoked_at = peewee.DoubleField(null=True)
    # Free-text label of the agent a key was issued to (MCP), sent upstream as X-Virtual-Key-Agent.
    agent = peewee.CharField(max_length=128, null=True)
    token_budget = peewee.IntegerField(null=True)  # total tokens; None = no budget
    tokens_used = peewee.IntegerField(default=0)
    requests = peewee.IntegerField(default=0)  # forwarded requests


class TokenReservation(BaseModel):
    """Tokens held back for one in-flight request of a key with a token budget."""

    key_id = peewee.CharField(max_length=64, index=True)
    tokens = peewee.IntegerField()
    created_at = peewee.DoubleField()


class UsageEvent(BaseModel):
    """One proxied request made with a virtual key, forwarded or refused."""

    key_id = peewee.CharField(max_length=64)
    service = peewee.CharField(max_length=64)
    method = peewee.CharField(max_length=16)
    path = peewee.TextField()  # without the query string
    status = peewee.IntegerField(null=True)  # None when the upstream connection failed
    latency_ms = peewee.DoubleField(null=True)
    request_bytes = peewee.IntegerField()
    response_bytes = peewee.IntegerField()
    prompt_tokens = peewee.IntegerField(null=True)
    completion_tokens = peewee.IntegerField(null=True)
    total_tokens = peewee.IntegerField(null=True)
    metered = peewee.BooleanField()
    refused = peewee.TextField(null=True)  # the refusal's error text
    created_at = peewee.DoubleField()

    class Meta:
        indexes = ((("key_id", "created_at"), False), (("created_at",), False))


class RateWindow(BaseModel):
    """Requests counted for one key in one clock minute."""

    key_id = peewee.CharField(max_length=64)
    window = peewee.IntegerField()  # epoch minute: int(epoch seconds // 60)
    count = peewee.IntegerField()

    class Meta:
        primary_key = peewee.CompositeKey("key_id", "window")


class SchemaVersion(BaseModel):
    version = peewee.IntegerField()


# Migrations spell out their SQL instead of deriving it from the models, so that a model
# changed by a later migration cannot change what an earlier one creates.


def _create_core_tables(db: peewee.Database) -> None:
    db.execute_sql(
        'CREATE TABLE IF NOT EXISTS "service" ("name" VARCHAR(64) NOT NULL PRIMARY KEY, '
        '"base_url" TEXT NOT NULL, "credential" TEXT NOT NULL, "credential_header" TEXT NOT NULL, '
        '"created_at" REAL NOT NULL, "updated_at" REAL NOT NULL)'
    )
    db.execute_sql(
        'CREATE TABLE IF NOT EXISTS "virtual_key" ("id" VARCHAR(64) NOT NULL PRIMARY KEY, '
        '"secret_hash" VARCHAR(64) NOT NULL, "target" VARCHAR(64) NOT NULL, '
        '"scope" VARCHAR(8) NOT NULL, "expires_at" REAL NOT NULL, "rate_limit" INTEGER, '
        '"one_shot" INTEGER NOT NULL, "used" INTEGER NOT NULL, "source" VARCHAR(8) NOT NULL, '
        '"created_at" REAL NOT NULL, "revoked_at" REAL)'
    )
    db.execute_sql('CREATE UNIQUE INDEX IF NOT EXISTS "virtual_key_secret_hash" ON "virtual_key" ("secret_hash")')
    db.execute_sql('CREATE INDEX IF NOT EXISTS "virtual_key_target" ON "virtual_key" ("target")')
    db.execute_sql(
        'CREATE TABLE IF NOT EXISTS "rate_window" ("key_id" VARCHAR(64) NOT NULL, '
        '"window" INTEGER NOT NULL, "count" INTEGER NOT NULL, PRIMARY KEY ("key_id", "window"))'
    )


def _add_agent_label(db: peewee.Database) -> None:
    db.execute_sql('ALTER TABLE "virtual_key" ADD COLUMN "agent" VARCHAR(128)')


def _add_usage_and_budgets(db: peewee.Database) -> None:
    db.execute_sql('ALTER TABLE "virtual_key" ADD COLUMN "token_budget" INTEGER')
    db.execute_sql('ALTER TABLE "virtual_key" ADD COLUMN "tokens_used" INTEGER NOT NULL DEFAULT 0')
    db.execute_sql('ALTER TABLE "virtual_key" ADD COLUMN "requests" INTEGER NOT NULL DEFAULT 0')
    db.execute_sql(
        'CREATE TABLE "token_reservation" ("id" INTEGER NOT NULL PRIMARY KEY, '
        '"key_id" VARCHAR(64) NOT NULL, "tokens" INTEGER NOT NULL, "created_at" REAL NOT NULL)'
    )
    db.execute_sql('CREATE INDEX "token_reservation_key_id" ON "token_reservation" ("key_id")')
    db.execute_sql(
        'CREATE TABLE "usage_event" ("id" INTEGER NOT NULL PRIMARY KEY, '
        '"key_id" VARCHAR(64) NOT NULL, "service" VARCHAR(64) NOT NULL, '
        '"method" VARCHAR(16) NOT NULL, "path" TEXT NOT NULL, "status" INTEGER, '
        '"latency_ms" REAL, "request_bytes" INTEGER NOT NULL, "response_bytes" INTEGER NOT NULL, '
        '"prompt_tokens" INTEGER, "completion_tokens" INTEGER, "total_tokens" INTEGER, '
        '"metered" INTEGER NOT NULL, "refused" TEXT, "created_at" REAL NOT NULL)'
    )
    db.execute_sql('CREATE INDEX "usage_event_key_id_created_at" ON "usage_event" ("key_id", "created_at")')
    db.execute_sql('CREATE INDEX "usage_event_created_at" ON "usage_event" ("created_at")')


# Each migration runs once, in order, inside one transaction with its version bump.
# Migrations only add: a released migration is never edited or removed.
MIGRATIONS: list[tuple[int, str, Callable[[peewee.Database], None]]] = [
    (1, "services, virtual keys and rate windows", _create_core_tables),
    (2, "agent label on virtual keys", _add_agent_label),
    (3, "usage events, token budgets and reservations", _add_usage_and_budgets),
]

MODELS = [Service, VirtualKey, RateWindow, TokenReservation, UsageEvent, SchemaVersion]
LATEST_VERSION = MIGRATIONS[-1][0]


class SchemaError(Exception):
    """The database has a schema that this version of mitmkeys cannot use."""


def migrate(db: peewee.Database) -> int:
    """Bring the schema to LATEST_VERSION and return the version it started at.

    The whole check-and-apply runs in one write transaction, so two processes starting
    on the same file apply each migration once.
    """
    with db.atomic("IMMEDIATE") if isinstance(db, peewee.SqliteDatabase) else db.atomic():
        db.create_tables([SchemaVersion])
        row = SchemaVersion.select().first()
        start = row.version if row else 0
        if start > LATEST_VERSION:
            raise SchemaError(
                f"database schema version {start} is newer than this mitmkeys "
                f"(which knows up to {LATEST_VERSION}); upgrade mitmkeys"
            )
        for version, description, apply in MIGRATIONS:
            if version <= start:
                continue
            log.info("applying schema migration %d: %s", version, description)
            apply(db)
        if row is None:
            SchemaVersion.create(version=LATEST_VERSION)
        elif start != LATEST_VERSION:
            SchemaVersion.update(version=LATEST_VERSION).execute()
    return start
