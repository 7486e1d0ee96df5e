"""The numbered migrations: each down undoes its up, and nothing else is touched.

Every test works on empty databases of its own, made with the admin connection, so
that it sees the migrations run from nothing rather than the shared template.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from tests import conftest
from worker import migrations

PG_DUMP = shutil.which("pg_dump") or "/usr/lib/postgresql/15/bin/pg_dump"

NewDatabase = Callable[[], Awaitable[str]]


@pytest.fixture
async def new_database(services: conftest.Services) -> AsyncIterator[NewDatabase]:
    """Makes empty databases on demand and drops them all afterwards."""
    names: list[str] = []
    admin = await asyncpg.connect(services.database_url)

    async def make() -> str:
        name = f"convstats_migrations_{uuid.uuid4().hex[:12]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        names.append(name)
        return conftest.with_database(services.database_url, name)

    try:
        yield make
    finally:
        for name in names:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


async def migrate(url: str, target: int | None = None) -> list[str]:
    async with connected(url) as conn:
        return await migrations.migrate(conn, target)


async def schema_dump(url: str) -> str:
    assert os.access(PG_DUMP, os.X_OK), f"pg_dump not found (tried {PG_DUMP})"
    process = await asyncio.create_subprocess_exec(
        PG_DUMP,
        "--schema-only",
        "--dbname",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    # Recent pg_dump releases wrap the script in \restrict ... \unrestrict with a
    # random key per run; it guards psql, not the schema, so it is left out.
    return "\n".join(
        line
        for line in out.decode().splitlines()
        if not line.startswith(("\\restrict", "\\unrestrict"))
    )


async def test_up_down_to_zero_and_up_again_leaves_an_identical_schema(
    new_database: NewDatabase,
) -> None:
    straight, round_trip = await new_database(), await new_database()
    await migrate(straight)

    await migrate(round_trip)
    await migrate(round_trip, 0)
    await migrate(round_trip)

    assert await schema_dump(round_trip) == await schema_dump(straight)


async def test_each_down_undoes_exactly_its_up(new_database: NewDatabase) -> None:
    url = await new_database()
    latest = len(migrations.discover())
    differences = []
    async with connected(url) as conn:
        # The ledger is made once and kept by down to 0; have it from the start.
        await migrations.status(conn)

    for version in range(1, latest + 1):
        before = await schema_dump(url)
        await migrate(url, version)
        await migrate(url, version - 1)
        if await schema_dump(url) != before:
            differences.append(version)
        await migrate(url, version)

    assert differences == []


async def test_down_to_zero_leaves_only_the_migrations_ledger(
    new_database: NewDatabase,
) -> None:
    url, untouched = await new_database(), await new_database()
    async with connected(untouched) as conn:
        # Creates the ledger and nothing else: the state down to 0 must reach.
        await migrations.status(conn)
    await migrate(url)

    done = await migrate(url, 0)

    assert len(done) == len(migrations.discover())
    async with connected(url) as conn:
        relations = await conn.fetch(
            "SELECT relname FROM pg_class "
            "WHERE relnamespace = 'public'::regnamespace ORDER BY relname"
        )
        functions = await conn.fetch(
            "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
        )
        triggers = await conn.fetch(
            "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"
        )
        policies = await conn.fetch("SELECT polname FROM pg_policy")
        ledger = await conn.fetchval("SELECT count(*) FROM convstats_schema_migrations")
    assert [r["relname"] for r in relations] == [
        "convstats_schema_migrations",
        "convstats_schema_migrations_pkey",
    ]
    assert (functions, triggers, policies, ledger) == ([], [], [], 0)
    assert await schema_dump(url) == await schema_dump(untouched)


async def test_concurrent_runners_apply_each_step_once(
    new_database: NewDatabase,
) -> None:
    url = await new_database()
    expected = [f"applied {m.version:04d}_{m.name}" for m in migrations.discover()]

    async with connected(url) as first, connected(url) as second:
        done = await asyncio.gather(
            migrations.migrate(first), migrations.migrate(second)
        )

    assert sorted(done, key=len) == [[], expected]
    async with connected(url) as conn:
        versions = await conn.fetch(
            "SELECT version FROM convstats_schema_migrations ORDER BY version"
        )
    assert [r["version"] for r in versions] == list(range(1, len(expected) + 1))


IDENTITY_SERVICE_USERS = """
CREATE TABLE users (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email text NOT NULL UNIQUE,
    display_name text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION update_updated_at_column() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at = now();
    RETURN NEW;
END;
$$;

CREATE TRIGGER update_users_updated_at
    BEFORE UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();

INSERT INTO users (id, email, display_name)
VALUES ('6f1c1a52-5b0e-4d8e-9a3c-2f7d0f3e8b11', 'trader@example.com', 'Trader');
"""

# Everything of the identity service's users table that migrations might disturb.
USERS_FOOTPRINT = """
SELECT
    (SELECT array_agg(attname || ' ' || format_type(atttypid, atttypmod)
                      ORDER BY attnum)
     FROM pg_attribute
     WHERE attrelid = 'users'::regclass AND attnum > 0 AND NOT attisdropped)
        AS columns,
    (SELECT array_agg(tgname || ' -> ' || tgfoid::regproc ORDER BY tgname)
     FROM pg_trigger WHERE tgrelid = 'users'::regclass AND NOT tgisinternal)
        AS triggers,
    (SELECT prosrc FROM pg_proc WHERE proname = 'update_updated_at_column')
        AS their_function,
    obj_description('users'::regclass, 'pg_class') AS comment,
    (SELECT array_agg(email ORDER BY email) FROM users) AS emails
"""


async def test_an_existing_users_table_is_kept_up_and_down(
    new_database: NewDatabase,
) -> None:
    url = await new_database()
    async with connected(url) as conn:
        await conn.execute(IDENTITY_SERVICE_USERS)
        before = dict(await conn.fetchrow(USERS_FOOTPRINT))

    await migrate(url)
    async with connected(url) as conn:
        after_up = dict(await conn.fetchrow(USERS_FOOTPRINT))
        owner = await conn.fetchval(
            "INSERT INTO conversations (user_id) "
            "SELECT id FROM users WHERE email = 'trader@example.com' "
            "RETURNING user_id"
        )
        worker_reads_users = await conn.fetchval(
            "SELECT has_table_privilege('convstats_worker', 'users', 'SELECT')"
        )
    await migrate(url, 0)
    async with connected(url) as conn:
        after_down = dict(await conn.fetchrow(USERS_FOOTPRINT))
        worker_still_reads_users = await conn.fetchval(
            "SELECT has_table_privilege('convstats_worker', 'users', 'SELECT')"
        )

    assert before["columns"] is not None and "email text" in before["columns"]
    assert before["triggers"] == ["update_users_updated_at -> update_updated_at_column"]
    assert after_up == before
    assert after_down == before
    assert owner == uuid.UUID("6f1c1a52-5b0e-4d8e-9a3c-2f7d0f3e8b11")
    assert (worker_reads_users, worker_still_reads_users) == (True, False)


async def test_a_users_table_created_by_the_migrations_goes_on_down(
    new_database: NewDatabase,
) -> None:
    url = await new_database()
    await migrate(url)
    async with connected(url) as conn:
        comment = await conn.fetchval("SELECT obj_description('users'::regclass)")

    await migrate(url, 0)

    async with connected(url) as conn:
        users = await conn.fetchval("SELECT to_regclass('users')")
    assert comment == "convstats: minimal users table"
    assert users is None
