"""Row-level security and grants: what the application and worker roles may do.

The tests connect as the superuser that owns the schema and take on a role for one
transaction (SET LOCAL ROLE), exactly as a login role that is a member of it would
be treated. Setup and checks run as the owner, which RLS does not restrict.
"""

from __future__ import annotations

import contextlib
import datetime
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

APPLY_ONE = """
SELECT outcome
FROM convstats_apply_messages_v1(
    ARRAY[$1::uuid], ARRAY[$2::uuid], ARRAY[$3::uuid], ARRAY['user'],
    ARRAY[$4::timestamptz], ARRAY['\\x00'::bytea], ARRAY[$5::text],
    ARRAY[NULL::text], ARRAY[NULL::jsonb]
)
"""


@contextlib.asynccontextmanager
async def acting_as(
    conn: asyncpg.Connection, role: str, user_id: uuid.UUID | str | None = None
) -> AsyncIterator[asyncpg.Connection]:
    """One transaction as ``role``, for ``user_id`` when given."""
    async with conn.transaction():
        await conn.execute(f"SET LOCAL ROLE {role}")
        if user_id is not None:
            await conn.execute(
                "SELECT set_config('convstats.user_id', $1, true)", str(user_id)
            )
        yield conn


@pytest.fixture
async def conn(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as connection:
        yield connection


@pytest.fixture
async def alice(conn: asyncpg.Connection) -> uuid.UUID:
    user_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO users DEFAULT VALUES RETURNING id"
    )
    return user_id


@pytest.fixture
async def bob(conn: asyncpg.Connection) -> uuid.UUID:
    user_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO users DEFAULT VALUES RETURNING id"
    )
    return user_id


async def new_conversation(
    conn: asyncpg.Connection, user_id: uuid.UUID, title: str
) -> uuid.UUID:
    conversation_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO conversations (user_id, title) VALUES ($1, $2) RETURNING id",
        user_id,
        title,
    )
    return conversation_id


async def row_of(
    conn: asyncpg.Connection, conversation_id: uuid.UUID
) -> dict[str, object]:
    return dict(
        await conn.fetchrow(
            "SELECT * FROM conversations WHERE id = $1", conversation_id
        )
    )


# --- the application role ------------------------------------------------------


async def test_the_app_sees_only_the_current_users_conversations(
    conn: asyncpg.Connection, alice: uuid.UUID, bob: uuid.UUID
) -> None:
    alices = {await new_conversation(conn, alice, f"Alice {i}") for i in range(2)}
    await new_conversation(conn, bob, "Bob")

    async with acting_as(conn, "convstats_app", alice):
        seen = {r["id"] for r in await conn.fetch("SELECT id FROM conversations")}

    assert seen == alices


@pytest.mark.parametrize("setting", [None, ""])
async def test_the_app_sees_nothing_when_no_user_is_set(
    conn: asyncpg.Connection, alice: uuid.UUID, setting: str | None
) -> None:
    await new_conversation(conn, alice, "Alice")

    async with acting_as(conn, "convstats_app", setting):
        seen = await conn.fetchval("SELECT count(*) FROM conversations")

    assert seen == 0


async def test_the_app_cannot_update_or_delete_another_users_conversation(
    conn: asyncpg.Connection, alice: uuid.UUID, bob: uuid.UUID
) -> None:
    bobs = await new_conversation(conn, bob, "Bob's plan")
    before = await row_of(conn, bobs)

    async with acting_as(conn, "convstats_app", alice):
        updated = await conn.execute(
            "UPDATE conversations SET title = 'hijacked' WHERE id = $1", bobs
        )
        deleted = await conn.execute("DELETE FROM conversations WHERE id = $1", bobs)

    assert (updated, deleted) == ("UPDATE 0", "DELETE 0")
    assert await row_of(conn, bobs) == before


async def test_the_app_cannot_create_a_conversation_for_another_user(
    conn: asyncpg.Connection, alice: uuid.UUID, bob: uuid.UUID
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level"):
        async with acting_as(conn, "convstats_app", alice):
            await conn.execute("INSERT INTO conversations (user_id) VALUES ($1)", bob)

    assert await conn.fetchval("SELECT count(*) FROM conversations") == 0


async def test_the_app_cannot_hand_its_conversation_to_another_user(
    conn: asyncpg.Connection, alice: uuid.UUID, bob: uuid.UUID
) -> None:
    alices = await new_conversation(conn, alice, "Alice")

    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level"):
        async with acting_as(conn, "convstats_app", alice):
            await conn.execute(
                "UPDATE conversations SET user_id = $2 WHERE id = $1", alices, bob
            )

    assert (await row_of(conn, alices))["user_id"] == alice


async def test_the_app_creates_changes_and_deletes_its_own_conversations(
    conn: asyncpg.Connection, alice: uuid.UUID
) -> None:
    doomed = await new_conversation(conn, alice, "Old idea")

    async with acting_as(conn, "convstats_app", alice):
        created = await conn.fetchval(
            "INSERT INTO conversations (user_id, mode) VALUES ($1, 'planning') "
            "RETURNING id",
            alice,
        )
        renamed = await conn.execute(
            "UPDATE conversations SET title = 'Weekly plan' WHERE id = $1", created
        )
        deleted = await conn.execute("DELETE FROM conversations WHERE id = $1", doomed)

    assert (renamed, deleted) == ("UPDATE 1", "DELETE 1")
    row = await row_of(conn, created)
    assert (row["title"], row["title_source"], row["mode"]) == (
        "Weekly plan",
        "user",
        "planning",
    )
    assert await conn.fetchval("SELECT count(*) FROM conversations") == 1


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO convstats_outbox "
        "(conversation_id, version, event_id, changed_fields, payload) "
        "VALUES (gen_random_uuid(), 99, gen_random_uuid(), '{}', '{}')",
        "UPDATE convstats_outbox SET published_at = now()",
        "DELETE FROM convstats_outbox",
        "SELECT count(*) FROM convstats_outbox",
    ],
)
async def test_the_app_has_no_access_to_the_outbox(
    conn: asyncpg.Connection, alice: uuid.UUID, statement: str
) -> None:
    await new_conversation(conn, alice, "Alice")
    before = [dict(r) for r in await conn.fetch("SELECT * FROM convstats_outbox")]

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with acting_as(conn, "convstats_app", alice):
            await conn.execute(statement)

    after = [dict(r) for r in await conn.fetch("SELECT * FROM convstats_outbox")]
    assert after == before
    assert len(after) == 1


async def test_the_apps_changes_are_published_through_the_outbox_trigger(
    conn: asyncpg.Connection, alice: uuid.UUID
) -> None:
    alices = await new_conversation(conn, alice, "Alice")

    async with acting_as(conn, "convstats_app", alice):
        await conn.execute(
            "UPDATE conversations SET status = 'archived' WHERE id = $1", alices
        )

    outbox = await conn.fetch(
        "SELECT version, changed_fields FROM convstats_outbox "
        "WHERE conversation_id = $1 ORDER BY id",
        alices,
    )
    assert [r["version"] for r in outbox] == [1, 2]
    assert outbox[1]["changed_fields"] == ["archived_at", "status"]


async def test_the_app_clearing_its_title_gets_the_automatic_title_back(
    conn: asyncpg.Connection, alice: uuid.UUID
) -> None:
    alices = uuid.uuid4()
    at = datetime.datetime(2024, 1, 15, 14, 30, tzinfo=datetime.UTC)
    await conn.fetchval(APPLY_ONE, uuid.uuid4(), alices, alice, at, "Gap and go?")
    await conn.execute("UPDATE conversations SET title = 'Mine' WHERE id = $1", alices)

    # The automatic title is read from the ledger, which the app role cannot read.
    async with acting_as(conn, "convstats_app", alice):
        await conn.execute(
            "UPDATE conversations SET title = NULL WHERE id = $1", alices
        )

    row = await row_of(conn, alices)
    assert (row["title"], row["title_source"]) == ("Gap and go?", "auto")


# --- the worker role -----------------------------------------------------------


async def test_the_worker_applies_messages_for_every_user(
    conn: asyncpg.Connection, alice: uuid.UUID, bob: uuid.UUID
) -> None:
    at = datetime.datetime(2024, 1, 15, 14, 30, tzinfo=datetime.UTC)
    alices, bobs = uuid.uuid4(), uuid.uuid4()

    async with acting_as(conn, "convstats_worker"):
        outcomes = [
            await conn.fetchval(APPLY_ONE, uuid.uuid4(), alices, alice, at, "A"),
            await conn.fetchval(APPLY_ONE, uuid.uuid4(), bobs, bob, at, "B"),
            await conn.fetchval(APPLY_ONE, uuid.uuid4(), bobs, bob, at, None),
        ]

    assert outcomes == ["applied"] * 3
    counts = await conn.fetch(
        "SELECT user_id, message_count, title FROM conversations ORDER BY title"
    )
    assert [tuple(r) for r in counts] == [(alice, 1, "A"), (bob, 2, "B")]
    # One transaction: one outbox row per conversation it changed.
    assert await conn.fetchval("SELECT count(*) FROM convstats_outbox") == 2


async def test_the_worker_cannot_delete_conversations(
    conn: asyncpg.Connection, alice: uuid.UUID
) -> None:
    alices = await new_conversation(conn, alice, "Alice")

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with acting_as(conn, "convstats_worker"):
            await conn.execute("DELETE FROM conversations WHERE id = $1", alices)

    assert await conn.fetchval("SELECT count(*) FROM conversations") == 1


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO users DEFAULT VALUES",
        "UPDATE users SET updated_at = now()",
        "DELETE FROM users",
    ],
)
async def test_the_worker_cannot_write_users(
    conn: asyncpg.Connection, alice: uuid.UUID, statement: str
) -> None:
    before = [dict(r) for r in await conn.fetch("SELECT * FROM users")]

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with acting_as(conn, "convstats_worker"):
            await conn.execute(statement)

    assert [dict(r) for r in await conn.fetch("SELECT * FROM users")] == before
    assert before[0]["id"] == alice
