"""Applies and rolls back the numbered SQL migrations under ``schema/migrations``.

A migration is a pair of plain SQL files, ``NNNN_name.up.sql`` and
``NNNN_name.down.sql``. This runner is deliberately small: it needs only asyncpg,
which the worker already uses, where the migration libraries that take plain SQL
files bring a second, synchronous driver. It runs each step in its own transaction
and holds an advisory lock, so two processes starting at once apply each step once.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import pathlib
import re

import asyncpg

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = pathlib.Path(
    os.environ.get(
        "CONVSTATS_MIGRATIONS_DIR",
        pathlib.Path(__file__).resolve().parent.parent / "schema" / "migrations",
    )
)

# Any constant works as long as every runner uses the same one.
_LOCK_KEY = 7_301_224_715

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.(up|down)\.sql$")

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS convstats_schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """The migration files are inconsistent or a target version does not exist."""


@dataclasses.dataclass(frozen=True)
class Migration:
    version: int
    name: str
    up_sql: str
    down_sql: str


@dataclasses.dataclass(frozen=True)
class MigrationState:
    migration: Migration
    applied_at: datetime.datetime | None


def discover(directory: pathlib.Path = MIGRATIONS_DIR) -> list[Migration]:
    """Reads every migration pair, ordered by version; a missing half is an error."""
    halves: dict[tuple[int, str], dict[str, str]] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"unexpected file in migrations: {path.name}")
        version, name, direction = int(match[1]), match[2], match[3]
        halves.setdefault((version, name), {})[direction] = path.read_text()

    migrations = []
    for (version, name), sql in sorted(halves.items()):
        if set(sql) != {"up", "down"}:
            raise MigrationError(f"migration {version:04d}_{name} lacks a half")
        migrations.append(Migration(version, name, sql["up"], sql["down"]))

    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migration versions must be 1..n, got {versions}")
    return migrations


async def status(conn: asyncpg.Connection) -> list[MigrationState]:
    await conn.execute(_CREATE_LEDGER)
    applied = {
        row["version"]: row["applied_at"]
        for row in await conn.fetch(
            "SELECT version, applied_at FROM convstats_schema_migrations"
        )
    }
    return [MigrationState(m, applied.get(m.version)) for m in discover()]


async def migrate(conn: asyncpg.Connection, target: int | None = None) -> list[str]:
    """Moves the schema to ``target`` (default: the latest) and says what it did."""
    migrations = discover()
    goal = len(migrations) if target is None else target
    if not 0 <= goal <= len(migrations):
        raise MigrationError(f"no migration {goal}; latest is {len(migrations)}")

    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        return await _migrate_locked(conn, migrations, goal)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


async def _migrate_locked(
    conn: asyncpg.Connection, migrations: list[Migration], goal: int
) -> list[str]:
    # Read the current version only once the lock is held: a process that waited
    # finds the other's work done and does nothing.
    await conn.execute(_CREATE_LEDGER)
    current = await conn.fetchval(
        "SELECT coalesce(max(version), 0) FROM convstats_schema_migrations"
    )

    done = []
    for migration in migrations[current:goal]:
        await _step(conn, migration, up=True)
        done.append(f"applied {migration.version:04d}_{migration.name}")
    for migration in reversed(migrations[goal:current]):
        await _step(conn, migration, up=False)
        done.append(f"rolled back {migration.version:04d}_{migration.name}")
    return done


async def _step(conn: asyncpg.Connection, migration: Migration, *, up: bool) -> None:
    action = "migration_applied" if up else "migration_rolled_back"
    async with conn.transaction():
        if up:
            await conn.execute(migration.up_sql)
            await conn.execute(
                "INSERT INTO convstats_schema_migrations (version, name) "
                "VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
        else:
            await conn.execute(migration.down_sql)
            await conn.execute(
                "DELETE FROM convstats_schema_migrations WHERE version = $1",
                migration.version,
            )
    logger.info(
        "%s %04d_%s",
        "applied" if up else "rolled back",
        migration.version,
        migration.name,
        extra={"action": action, "version": migration.version},
    )
