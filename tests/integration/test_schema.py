"""The conversations table and its row rules, exercised with plain SQL.

Whoever writes a conversation (the worker, the chat application, an operator with
psql) gets the same rules, so these tests write rows the way any of them would.
"""

from __future__ import annotations

import datetime
import json
import re
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

UTC = datetime.UTC

# The context_data example our schema documentation uses for a live trading session.
CONTEXT_EXAMPLE = {
    "trading_session_id": "uuid",
    "market_hours": True,
    "trading_instruments": ["ES", "NQ"],
    "session_type": "live_trading",
    "coaching_focus": ["discipline", "risk_management"],
    "last_mode_switch": "2024-01-15T10:30:00Z",
}

# What subscribers of conversation-updated rely on finding in every payload.
CONTRACT_FIELDS = {
    "event_id",
    "conversation_id",
    "user_id",
    "version",
    "title",
    "mode",
    "status",
    "message_count",
    "last_message_at",
    "created_at",
    "updated_at",
    "archived_at",
    "changed_fields",
}

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


@pytest.fixture
async def conn(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as connection:
        yield connection


async def new_user(conn: asyncpg.Connection) -> uuid.UUID:
    user_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO users DEFAULT VALUES RETURNING id"
    )
    return user_id


async def new_conversation(conn: asyncpg.Connection, **columns: object) -> uuid.UUID:
    names = ", ".join(columns)
    params = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    conversation_id: uuid.UUID = await conn.fetchval(
        f"INSERT INTO conversations ({names}) VALUES ({params}) RETURNING id",
        *columns.values(),
    )
    return conversation_id


async def outbox_rows(
    conn: asyncpg.Connection, conversation_id: uuid.UUID
) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT version, changed_fields, payload FROM convstats_outbox "
        "WHERE conversation_id = $1 ORDER BY id",
        conversation_id,
    )


async def test_conversation_with_every_field_type_round_trips(
    conn: asyncpg.Connection,
) -> None:
    user_id = await new_user(conn)
    written = {
        "id": uuid.uuid4(),
        "user_id": user_id,
        "title": "ES opening range: why I chased the breakout",
        "title_source": "user",
        "mode": "psychology",
        "status": "archived",
        "context_data": {"coaching_focus": ["patience"], "market_hours": False},
        "last_message_at": datetime.datetime(2024, 1, 15, 14, 31, 5, 250000, UTC),
        "message_count": 2_147_483_647,
        "version": 2**40,
        "created_at": datetime.datetime(2024, 1, 15, 14, 0, tzinfo=UTC),
        "updated_at": datetime.datetime(2024, 1, 15, 14, 32, tzinfo=UTC),
        "archived_at": datetime.datetime(2024, 1, 16, 9, 0, tzinfo=UTC),
    }

    await new_conversation(
        conn, **(written | {"context_data": json.dumps(written["context_data"])})
    )
    row = await conn.fetchrow(
        "SELECT * FROM conversations WHERE id = $1", written["id"]
    )

    read = dict(row) | {"context_data": json.loads(row["context_data"])}
    assert read == written


async def test_a_conversation_gets_the_documented_defaults(
    conn: asyncpg.Connection,
) -> None:
    user_id = await new_user(conn)

    async with conn.transaction():
        conversation_id = await new_conversation(conn, user_id=user_id)
        now = await conn.fetchval("SELECT now()")
    row = await conn.fetchrow(
        "SELECT * FROM conversations WHERE id = $1", conversation_id
    )

    assert (row["mode"], row["status"], row["title_source"]) == (
        "analysis",
        "active",
        "auto",
    )
    assert json.loads(row["context_data"]) == {}
    assert (row["message_count"], row["version"]) == (0, 1)
    assert (row["title"], row["last_message_at"], row["archived_at"]) == (
        None,
        None,
        None,
    )
    assert row["created_at"] == row["updated_at"] == now


async def test_a_conversation_for_an_unknown_user_is_refused(
    conn: asyncpg.Connection,
) -> None:
    stranger = uuid.uuid4()

    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await new_conversation(conn, user_id=stranger)

    assert await conn.fetchval("SELECT count(*) FROM conversations") == 0


async def test_deleting_a_user_deletes_their_conversations_and_ledger_rows(
    conn: asyncpg.Connection,
) -> None:
    leaving, staying = await new_user(conn), await new_user(conn)
    gone = await new_conversation(conn, user_id=leaving)
    kept = await new_conversation(conn, user_id=staying)
    await conn.executemany(
        "INSERT INTO convstats_applied_messages "
        "(message_id, conversation_id, user_id, type, created_at, fingerprint) "
        "VALUES ($1, $2, $3, 'user', now(), '\\x00')",
        [(uuid.uuid4(), gone, leaving), (uuid.uuid4(), kept, staying)],
    )

    await conn.execute("DELETE FROM users WHERE id = $1", leaving)

    conversations = await conn.fetch("SELECT id FROM conversations")
    ledger = await conn.fetch("SELECT conversation_id FROM convstats_applied_messages")
    assert [r["id"] for r in conversations] == [kept]
    assert [r["conversation_id"] for r in ledger] == [kept]


@pytest.mark.parametrize("column", ["mode", "status", "title_source"])
@pytest.mark.parametrize("value", ["", "chat", "ANALYSIS", "Active", "user "])
async def test_an_unknown_mode_status_or_title_source_is_refused(
    conn: asyncpg.Connection, column: str, value: str
) -> None:
    user_id = await new_user(conn)

    with pytest.raises(asyncpg.CheckViolationError):
        await new_conversation(conn, user_id=user_id, **{column: value})

    assert await conn.fetchval("SELECT count(*) FROM conversations") == 0


@pytest.mark.parametrize(
    "column",
    [
        "mode",
        "status",
        "title_source",
        "context_data",
        "message_count",
        "version",
        "created_at",
        "updated_at",
    ],
)
async def test_an_explicit_null_in_a_required_column_is_refused(
    conn: asyncpg.Connection, column: str
) -> None:
    user_id = await new_user(conn)

    with pytest.raises(asyncpg.NotNullViolationError):
        await new_conversation(conn, user_id=user_id, **{column: None})

    assert await conn.fetchval("SELECT count(*) FROM conversations") == 0


@pytest.mark.parametrize(
    ("column", "value"),
    [("message_count", -1), ("context_data", "[]"), ("context_data", '"live"')],
)
async def test_a_negative_count_or_a_non_object_context_is_refused(
    conn: asyncpg.Connection, column: str, value: object
) -> None:
    user_id = await new_user(conn)

    with pytest.raises(asyncpg.CheckViolationError):
        await new_conversation(conn, user_id=user_id, **{column: value})

    assert await conn.fetchval("SELECT count(*) FROM conversations") == 0


async def test_the_valid_modes_and_statuses_are_accepted(
    conn: asyncpg.Connection,
) -> None:
    user_id = await new_user(conn)
    pairs = [
        ("analysis", "active"),
        ("psychology", "archived"),
        ("training", "deleted"),
        ("planning", "active"),
    ]

    for mode, status in pairs:
        await new_conversation(conn, user_id=user_id, mode=mode, status=status)

    stored = await conn.fetch("SELECT mode, status FROM conversations ORDER BY mode")
    assert sorted(pairs) == [(r["mode"], r["status"]) for r in stored]


async def test_the_documented_context_example_round_trips_exactly(
    conn: asyncpg.Connection,
) -> None:
    user_id = await new_user(conn)

    conversation_id = await new_conversation(
        conn, user_id=user_id, context_data=json.dumps(CONTEXT_EXAMPLE)
    )
    stored = await conn.fetchrow(
        "SELECT context_data, "
        "       jsonb_typeof(context_data -> 'market_hours') AS market_hours_type, "
        "       context_data -> 'trading_instruments' ->> 1 AS second_instrument "
        "FROM conversations WHERE id = $1",
        conversation_id,
    )

    assert json.loads(stored["context_data"]) == CONTEXT_EXAMPLE
    assert stored["market_hours_type"] == "boolean"
    assert stored["second_instrument"] == "NQ"


async def test_a_context_containment_query_can_use_the_gin_index(
    conn: asyncpg.Connection,
) -> None:
    user_id = await new_user(conn)
    live = await new_conversation(
        conn, user_id=user_id, context_data=json.dumps(CONTEXT_EXAMPLE)
    )
    for session_type in ("paper_trading", "review"):
        await new_conversation(
            conn,
            user_id=user_id,
            context_data=json.dumps({"session_type": session_type}),
        )
    query = (
        "SELECT id FROM conversations "
        """WHERE context_data @> '{"session_type": "live_trading"}'"""
    )

    async with conn.transaction():
        # On a table of three rows a sequential scan is cheaper and the planner
        # rightly picks it; switching it off shows that the index can serve the
        # query, which is what matters once the table is large.
        await conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + query))
        found = [r["id"] for r in await conn.fetch(query)]

    assert "idx_conversations_context" in plan
    assert found == [live]


async def test_an_effective_update_moves_updated_at_and_bumps_version_once(
    conn: asyncpg.Connection,
) -> None:
    user_id = await new_user(conn)
    long_ago = datetime.datetime(2024, 1, 1, tzinfo=UTC)
    conversation_id = await new_conversation(
        conn, user_id=user_id, created_at=long_ago, updated_at=long_ago
    )

    # A statement of its own is a transaction of its own, so now() is fresh.
    row = await conn.fetchrow(
        "UPDATE conversations SET mode = 'planning' WHERE id = $1 "
        "RETURNING updated_at, version, now() AS now",
        conversation_id,
    )

    assert row["updated_at"] == row["now"] > long_ago
    assert row["version"] == 2


async def test_an_update_that_changes_nothing_moves_nothing_and_publishes_nothing(
    conn: asyncpg.Connection,
) -> None:
    user_id = await new_user(conn)
    long_ago = datetime.datetime(2024, 1, 1, tzinfo=UTC)
    conversation_id = await new_conversation(
        conn, user_id=user_id, title="Risk plan", updated_at=long_ago
    )
    before = await conn.fetchrow(
        "SELECT * FROM conversations WHERE id = $1", conversation_id
    )

    await conn.execute(
        "UPDATE conversations SET title = 'Risk plan', mode = mode, "
        "context_data = '{}' WHERE id = $1",
        conversation_id,
    )

    after = await conn.fetchrow(
        "SELECT * FROM conversations WHERE id = $1", conversation_id
    )
    assert dict(after) == dict(before)
    assert after["updated_at"] == long_ago
    assert len(await outbox_rows(conn, conversation_id)) == 1


async def test_version_cannot_be_set_by_hand(conn: asyncpg.Connection) -> None:
    user_id = await new_user(conn)
    conversation_id = await new_conversation(conn, user_id=user_id)

    stuck = await conn.fetchval(
        "UPDATE conversations SET version = 99 WHERE id = $1 RETURNING version",
        conversation_id,
    )
    moved = await conn.fetchval(
        "UPDATE conversations SET version = 99, mode = 'training' WHERE id = $1 "
        "RETURNING version",
        conversation_id,
    )

    assert (stuck, moved) == (1, 2)


async def test_archiving_sets_archived_at_and_reactivating_clears_it(
    conn: asyncpg.Connection,
) -> None:
    user_id = await new_user(conn)
    conversation_id = await new_conversation(conn, user_id=user_id)

    archived = await conn.fetchrow(
        "UPDATE conversations SET status = 'archived' WHERE id = $1 "
        "RETURNING archived_at, version, now() AS now",
        conversation_id,
    )
    rearchived = await conn.fetchrow(
        "UPDATE conversations SET status = 'archived' WHERE id = $1 "
        "RETURNING archived_at, version",
        conversation_id,
    )
    reactivated = await conn.fetchrow(
        "UPDATE conversations SET status = 'active' WHERE id = $1 "
        "RETURNING archived_at, version",
        conversation_id,
    )

    assert archived["archived_at"] == archived["now"]
    assert tuple(rearchived) == (archived["archived_at"], archived["version"])
    assert tuple(reactivated) == (None, 3)
    outbox = await outbox_rows(conn, conversation_id)
    assert [(r["version"], r["changed_fields"]) for r in outbox[1:]] == [
        (2, ["archived_at", "status"]),
        (3, ["archived_at", "status"]),
    ]


@pytest.mark.parametrize("status", ["active", "archived"])
async def test_deletion_is_final(conn: asyncpg.Connection, status: str) -> None:
    user_id = await new_user(conn)
    conversation_id = await new_conversation(conn, user_id=user_id)
    await conn.execute(
        "UPDATE conversations SET status = 'deleted' WHERE id = $1", conversation_id
    )

    with pytest.raises(asyncpg.CheckViolationError, match="deletion is final"):
        await conn.execute(
            "UPDATE conversations SET status = $2 WHERE id = $1",
            conversation_id,
            status,
        )

    row = await conn.fetchrow(
        "SELECT status, version FROM conversations WHERE id = $1", conversation_id
    )
    assert tuple(row) == ("deleted", 2)
    outbox = await outbox_rows(conn, conversation_id)
    assert [(r["version"], r["changed_fields"]) for r in outbox[1:]] == [
        (2, ["status"])
    ]


async def test_creating_a_conversation_publishes_version_one(
    conn: asyncpg.Connection,
) -> None:
    user_id = await new_user(conn)

    conversation_id = await new_conversation(conn, user_id=user_id, mode="training")

    outbox = await outbox_rows(conn, conversation_id)
    assert len(outbox) == 1
    assert outbox[0]["version"] == 1
    payload = json.loads(outbox[0]["payload"])
    assert (payload["mode"], payload["version"], payload["title"]) == (
        "training",
        1,
        None,
    )
    assert {"user_id", "mode", "status"} <= set(outbox[0]["changed_fields"])


async def test_one_transaction_leaves_one_outbox_row_in_utc_whatever_the_timezone(
    conn: asyncpg.Connection,
) -> None:
    user_id = await new_user(conn)
    conversation_id = uuid.uuid4()
    # Around the New York daylight saving switch, where a local rendering would
    # show a different wall clock and offset.
    first_at = datetime.datetime(2024, 3, 10, 6, 59, 59, 500000, UTC)
    last_at = datetime.datetime(2024, 3, 10, 7, 0, 1, tzinfo=UTC)

    async with conn.transaction():
        await conn.execute("SET LOCAL TIME ZONE 'America/New_York'")
        await new_conversation(conn, id=conversation_id, user_id=user_id)
        await conn.execute(
            "INSERT INTO convstats_applied_messages (message_id, conversation_id, "
            "user_id, type, created_at, fingerprint, title_candidate) "
            "VALUES (gen_random_uuid(), $1, $2, 'user', $3, '\\x00', $5), "
            "       (gen_random_uuid(), $1, $2, 'user', $4, '\\x01', NULL)",
            conversation_id,
            user_id,
            first_at,
            last_at,
            "Sizing after a loss",
        )
        await conn.execute(
            "UPDATE conversations SET status = 'archived' WHERE id = $1",
            conversation_id,
        )

    outbox = await outbox_rows(conn, conversation_id)
    row = await conn.fetchrow(
        "SELECT * FROM conversations WHERE id = $1", conversation_id
    )
    assert len(outbox) == 1
    payload = json.loads(outbox[0]["payload"])
    assert CONTRACT_FIELDS - set(payload) == set()
    assert outbox[0]["version"] == payload["version"] == row["version"] == 3
    assert payload["changed_fields"] == outbox[0]["changed_fields"]
    assert {
        "user_id",
        "status",
        "archived_at",
        "title",
        "message_count",
        "last_message_at",
        "created_at",
    } <= set(payload["changed_fields"])
    assert (payload["conversation_id"], payload["user_id"]) == (
        str(conversation_id),
        str(user_id),
    )
    assert uuid.UUID(payload["event_id"])
    assert (payload["title"], payload["status"], payload["message_count"]) == (
        "Sizing after a loss",
        "archived",
        2,
    )
    assert payload["created_at"] == "2024-03-10T06:59:59.500000Z"
    assert payload["last_message_at"] == "2024-03-10T07:00:01.000000Z"
    for field in ("updated_at", "archived_at"):
        assert RFC3339_UTC.match(payload[field])
        parsed = datetime.datetime.fromisoformat(payload[field])
        assert parsed == row[field]
