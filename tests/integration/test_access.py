"""worker.access against real PostgreSQL: every call, paging, row security, triggers."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import pathlib
import re
import sys
import typing
import uuid
from typing import Any

import asyncpg
import pytest

from worker import access, cli_conversations, db, events, titles

T0 = datetime.datetime(2024, 3, 1, 9, 30, tzinfo=datetime.UTC)
MODES = typing.get_args(events.Mode)
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")

ACTIVE_INDEX = "idx_conversations_user_active"
MODE_INDEX = "idx_conversations_user_mode"

DOCUMENTED_CONTEXT = {
    "trading_session_id": "8f1c2e4a-3b5d-4c6e-9f7a-1b2c3d4e5f60",
    "market_hours": True,
    "trading_instruments": ["ES", "NQ"],
    "session_type": "live_trading",
    "coaching_focus": ["discipline", "risk_management"],
    "last_mode_switch": "2024-01-15T10:30:00Z",
}


async def _new_user(pool: asyncpg.Pool) -> uuid.UUID:
    user_id = uuid.uuid4()
    await pool.execute("INSERT INTO users (id) VALUES ($1)", user_id)
    return user_id


async def _outbox(pool: asyncpg.Pool, conversation_id: uuid.UUID) -> list[Any]:
    """(version, changed_fields) of the conversation's outbox rows, oldest first."""
    rows = await pool.fetch(
        "SELECT version, changed_fields FROM convstats_outbox"
        " WHERE conversation_id = $1 ORDER BY id",
        conversation_id,
    )
    return [(row["version"], row["changed_fields"]) for row in rows]


async def _apply_user_message(
    pool: asyncpg.Pool,
    conversation: access.Conversation,
    content: str,
    created_at: datetime.datetime,
) -> str:
    """What the worker does with one user message; returns its outcome."""
    row = await pool.fetchrow(
        "SELECT outcome FROM convstats_apply_messages_v1("
        " $1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::timestamptz[],"
        " $6::bytea[], $7::text[], $8::text[], $9::jsonb[])",
        [uuid.uuid4()],
        [conversation.id],
        [conversation.user_id],
        ["user"],
        [created_at],
        [content.encode()],
        [titles.candidate("user", content)],
        [None],
        [None],
    )
    assert row is not None
    return str(row["outcome"])


# --- create ---------------------------------------------------------------------


async def test_create_makes_an_active_untitled_conversation(pool: asyncpg.Pool) -> None:
    user = await _new_user(pool)

    created = await access.create(pool, user)

    assert created.user_id == user
    assert (created.mode, created.status) == ("analysis", "active")
    assert (created.title, created.title_source) == (None, "auto")
    assert (created.message_count, created.version) == (0, 1)
    assert created.context_data == {}
    assert created.archived_at is None
    assert await access.get(pool, user, created.id) == created


async def test_create_keeps_the_persons_title_and_the_context(
    pool: asyncpg.Pool,
) -> None:
    user = await _new_user(pool)
    context = {**DOCUMENTED_CONTEXT, "broker": {"name": "own key", "paper": True}}

    created = await access.create(
        pool,
        user,
        mode="psychology",
        title="  Tilt after\nthe open ",
        context_data=context,
    )

    assert (created.title, created.title_source) == ("Tilt after the open", "user")
    assert created.mode == "psychology"
    assert created.context_data == context


async def test_create_publishes_the_new_conversation(pool: asyncpg.Pool) -> None:
    user = await _new_user(pool)

    created = await access.create(pool, user, title="Morning plan")

    [(version, changed)] = await _outbox(pool, created.id)
    assert version == 1
    assert {"user_id", "title", "title_source", "mode", "status"} <= set(changed)


@pytest.mark.parametrize(
    "arguments",
    [
        {"mode": "chat"},
        {"title": ""},
        {"title": " \n\t "},
        {"title": "x" * 256},
        {"context_data": {"trading_session_id": "not-a-uuid"}},
        {"context_data": {"market_hours": "yes"}},
        {"context_data": {"trading_instruments": "ES"}},
        {"context_data": {"coaching_focus": [1, 2]}},
        {"context_data": {"last_mode_switch": "2024-01-15T10:30:00"}},
        {"context_data": {"size": float("nan")}},
        {"context_data": {"when": datetime.date(2024, 1, 15)}},
        {"context_data": ["ES", "NQ"]},
        {"context_data": {"note": "nul \u0000 inside"}},
    ],
    ids=lambda arguments: repr(arguments)[:40],
)
async def test_create_refuses_invalid_input(
    pool: asyncpg.Pool, arguments: dict[str, Any]
) -> None:
    user = await _new_user(pool)

    with pytest.raises(access.InvalidInputError):
        await access.create(pool, user, **arguments)

    assert await pool.fetchval("SELECT count(*) FROM conversations") == 0


async def test_create_accepts_a_title_of_255_characters(pool: asyncpg.Pool) -> None:
    user = await _new_user(pool)

    created = await access.create(pool, user, title="é" * 255)

    assert created.title == "é" * 255


async def test_create_for_an_unknown_user_is_refused(pool: asyncpg.Pool) -> None:
    stranger = uuid.uuid4()

    with pytest.raises(access.UnknownUserError):
        await access.create(pool, stranger)

    assert await pool.fetchval("SELECT count(*) FROM conversations") == 0


async def test_ids_that_are_not_uuids_are_invalid_input(pool: asyncpg.Pool) -> None:
    user = await _new_user(pool)

    with pytest.raises(access.InvalidInputError):
        await access.get(pool, user, "42")
    with pytest.raises(access.InvalidInputError):
        await access.create(pool, "me")


# --- get ------------------------------------------------------------------------


async def test_get_of_an_unknown_id_is_none(pool: asyncpg.Pool) -> None:
    user = await _new_user(pool)

    found = await access.get(pool, user, uuid.uuid4())

    assert found is None


# --- list -----------------------------------------------------------------------


async def test_list_shows_latest_activity_first(pool: asyncpg.Pool) -> None:
    user = await _new_user(pool)
    first = await access.create(pool, user, title="first")
    second = await access.create(pool, user, title="second")
    third = await access.create(pool, user, title="third")

    await access.rename(pool, user, first.id, "first, renamed last")
    page = await access.list_conversations(pool, user)

    assert [c.id for c in page.conversations] == [first.id, third.id, second.id]
    assert page.next_cursor is None


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, {"analysis/active", "training/active", "analysis/archived"}),
        ({"status": "active"}, {"analysis/active", "training/active"}),
        ({"status": "archived"}, {"analysis/archived"}),
        ({"status": "deleted"}, {"training/deleted"}),
        ({"mode": "analysis"}, {"analysis/active", "analysis/archived"}),
        ({"mode": "training", "status": "deleted"}, {"training/deleted"}),
        ({"mode": "planning"}, set()),
    ],
)
async def test_list_filters_by_status_and_mode(
    pool: asyncpg.Pool, filters: dict[str, str], expected: set[str]
) -> None:
    user = await _new_user(pool)
    for name in ("analysis/active", "training/active", "analysis/archived"):
        await access.create(pool, user, mode=name.split("/")[0], title=name)
    archived = await access.list_conversations(pool, user, mode="analysis")
    await access.archive(pool, user, archived.conversations[0].id)
    deleted = await access.create(pool, user, mode="training", title="training/deleted")
    await access.delete(pool, user, deleted.id)

    page = await access.list_conversations(pool, user, **filters)

    assert {c.title for c in page.conversations} == expected
    assert {f"{c.mode}/{c.status}" for c in page.conversations} == expected


async def test_list_pages_end_with_no_cursor(pool: asyncpg.Pool) -> None:
    user = await _new_user(pool)
    for n in range(5):
        await access.create(pool, user, title=f"c{n}")

    first = await access.list_conversations(pool, user, limit=2)
    second = await access.list_conversations(
        pool, user, limit=2, cursor=first.next_cursor
    )
    third = await access.list_conversations(
        pool, user, limit=2, cursor=second.next_cursor
    )

    assert [len(p.conversations) for p in (first, second, third)] == [2, 2, 1]
    assert first.next_cursor is not None and second.next_cursor is not None
    assert third.next_cursor is None
    titles_seen = [c.title for p in (first, second, third) for c in p.conversations]
    assert titles_seen == ["c4", "c3", "c2", "c1", "c0"]


async def test_a_full_last_page_has_no_cursor(pool: asyncpg.Pool) -> None:
    user = await _new_user(pool)
    for n in range(4):
        await access.create(pool, user, title=f"c{n}")

    first = await access.list_conversations(pool, user, limit=2)
    second = await access.list_conversations(
        pool, user, limit=2, cursor=first.next_cursor
    )

    assert len(second.conversations) == 2
    assert second.next_cursor is None


async def test_list_of_a_user_without_conversations_is_empty(
    pool: asyncpg.Pool,
) -> None:
    user = await _new_user(pool)

    page = await access.list_conversations(pool, user)

    assert page == access.Page([], None)


@pytest.mark.parametrize(
    "arguments",
    [
        {"limit": 0},
        {"limit": access.MAX_PAGE_SIZE + 1},
        {"status": "gone"},
        {"mode": "chat"},
        {"cursor": "not a cursor"},
        {"cursor": "AAAA"},
    ],
)
async def test_list_refuses_invalid_input(
    pool: asyncpg.Pool, arguments: dict[str, Any]
) -> None:
    user = await _new_user(pool)

    with pytest.raises(access.InvalidInputError):
        await access.list_conversations(pool, user, **arguments)


async def _seed_with_ties(pool: asyncpg.Pool, user: uuid.UUID) -> list[Any]:
    """48 active conversations, the modes in turn; a third share one updated_at.

    Inserted directly, so the timestamps are chosen: equal keys are where a paging
    that orders by updated_at alone would skip or repeat rows.
    """
    return await pool.fetch(
        """
        INSERT INTO conversations (user_id, mode, title, updated_at)
        SELECT $1, (ARRAY['analysis', 'psychology', 'training', 'planning'])[n % 4 + 1],
               'seeded ' || n,
               CASE WHEN n % 3 = 0 THEN $2::timestamptz
                    ELSE $2::timestamptz + (n - 24) * interval '1 minute' END
        FROM generate_series(0, 47) AS n
        RETURNING id, mode
        """,
        user,
        T0,
    )


@pytest.mark.parametrize(
    "filters",
    [{}, {"status": "active"}, {"mode": "training"}],
    ids=["all-modes", "active", "by-mode"],
)
async def test_paging_is_stable_while_other_rows_change(
    pool: asyncpg.Pool, filters: dict[str, str]
) -> None:
    """Stable means: walking the pages from the first to the last while other
    writers insert and modify conversations between the fetches, every conversation
    that existed before the walk and was not modified during it appears exactly
    once, in (updated_at, id) descending order, and no conversation appears twice.
    """
    user = await _new_user(pool)
    seeded = await _seed_with_ties(pool, user)
    listed = [r["id"] for r in seeded if filters.get("mode", r["mode"]) == r["mode"]]
    changes = [
        lambda cid: access.rename(pool, user, cid, "renamed during the walk"),
        lambda cid: access.archive(pool, user, cid),
        lambda cid: access.switch_mode(pool, user, cid, "planning"),
        lambda cid: access.delete(pool, user, cid),
    ]
    walked: list[access.Conversation] = []
    modified: set[uuid.UUID] = set()
    cursor = None

    for step in range(100):
        page = await access.list_conversations(
            pool, user, limit=3, cursor=cursor, **filters
        )
        walked.extend(page.conversations)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
        # Between two fetches: a new conversation, a change to one already shown
        # and a change to one not shown yet.
        await access.create(pool, user, mode=filters.get("mode", "analysis"))
        seen = {c.id for c in walked}
        unseen = [cid for cid in listed if cid not in seen | modified]
        for target in [walked[-1].id, *unseen[-1:]]:
            await changes[step % len(changes)](target)
            modified.add(target)

    ids = [c.id for c in walked]
    assert len(ids) == len(set(ids))
    assert set(listed) - modified <= set(ids)
    keys = [(c.updated_at, c.id) for c in walked]
    assert keys == sorted(keys, reverse=True)
    assert len(modified) >= 4


@pytest.mark.parametrize(
    ("filters", "indexes"),
    [
        ({"status": "active"}, {ACTIVE_INDEX}),
        ({"mode": "training"}, {MODE_INDEX}),
        # Both hold these rows in list order; the planner picks by selectivity.
        ({"mode": "training", "status": "active"}, {MODE_INDEX, ACTIVE_INDEX}),
        ({}, {MODE_INDEX}),
        ({"status": "archived"}, {MODE_INDEX}),
    ],
)
@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_each_list_reads_an_index_from_the_cursor_on(
    pool: asyncpg.Pool, filters: dict[str, str], indexes: set[str], plan_cache_mode: str
) -> None:
    """The plan starts the index scan at the cursor and needs no sort.

    Both plans matter: asyncpg prepares every statement, and PostgreSQL moves a
    prepared statement to its generic plan after five runs when that looks no
    dearer. Were the keyset only a filter, a deep page would read every row
    before it.
    """
    user = await _new_user(pool)
    await _seed_with_ties(pool, user)
    statuses = [filters["status"]] if "status" in filters else ["active", "archived"]
    name, extra = access._list_query(tuple(statuses), filters.get("mode"))
    arguments = (user, T0, uuid.uuid4(), 21, *extra)

    async with access.acting_as(pool, user) as conn:
        # A tiny table is cheaper to scan; the question is whether an index *can*
        # serve the list in order.
        await conn.execute("SET LOCAL enable_seqscan = off")
        await conn.execute("SET LOCAL enable_bitmapscan = off")
        await conn.execute(f"SET LOCAL plan_cache_mode = {plan_cache_mode}")
        plan = await _explain_prepared(conn, db.queries()[name], arguments)

    nodes = list(_plan_nodes(plan))
    scans = [n for n in nodes if "Index Name" in n]
    assert len({n["Index Name"] for n in scans}) == 1
    assert {n["Index Name"] for n in scans} <= indexes
    assert all("updated_at" in n["Index Cond"] for n in scans)
    assert "Sort" not in {n["Node Type"] for n in nodes}


async def _explain_prepared(
    conn: asyncpg.Connection, sql: str, arguments: tuple[Any, ...]
) -> dict[str, Any]:
    """The plan of a prepared statement; EXECUTE takes no bind parameters, so the
    (trusted) arguments are written as literals."""
    literals = ", ".join(_literal(argument) for argument in arguments)
    await conn.execute(f"PREPARE access_plan AS {sql}")
    try:
        plan = await conn.fetchval(
            f"EXPLAIN (FORMAT JSON) EXECUTE access_plan({literals})"
        )
    finally:
        await conn.execute("DEALLOCATE access_plan")
    return dict(json.loads(plan)[0]["Plan"])


def _literal(value: object) -> str:
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "ARRAY[" + ", ".join(_literal(item) for item in value) + "]"
    if isinstance(value, datetime.datetime):
        return f"'{value.isoformat()}'"
    return f"'{value}'"


def _plan_nodes(node: dict[str, Any]) -> typing.Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


# --- rename ---------------------------------------------------------------------


async def test_rename_makes_the_title_the_persons(pool: asyncpg.Pool) -> None:
    user = await _new_user(pool)
    created = await access.create(pool, user)

    renamed = await access.rename(pool, user, created.id, "ES opening range")

    assert (renamed.title, renamed.title_source) == ("ES opening range", "user")
    assert renamed.version == 2
    assert (await _outbox(pool, created.id))[-1] == (2, ["title", "title_source"])


async def test_the_worker_never_replaces_a_renamed_title(pool: asyncpg.Pool) -> None:
    user = await _new_user(pool)
    created = await access.create(pool, user)
    await _apply_user_message(pool, created, "What went wrong today?", T0)
    auto = await access.get(pool, user, created.id)

    await access.rename(pool, user, created.id, "Review of Friday")
    # Earlier than every message so far: it would be the auto title if one applied.
    outcome = await _apply_user_message(
        pool, created, "An even earlier question", T0 - datetime.timedelta(hours=1)
    )

    after = await access.get(pool, user, created.id)
    assert auto is not None and auto.title == "What went wrong today?"
    assert outcome == "applied"
    assert after is not None
    assert (after.title, after.title_source) == ("Review of Friday", "user")
    assert after.message_count == 2


async def test_renaming_to_the_same_title_changes_nothing(pool: asyncpg.Pool) -> None:
    user = await _new_user(pool)
    created = await access.create(pool, user, title="Same")

    again = await access.rename(pool, user, created.id, "Same")

    assert again.version == created.version
    assert len(await _outbox(pool, created.id)) == 1


# --- switch mode ----------------------------------------------------------------


async def test_switch_mode_records_when(pool: asyncpg.Pool) -> None:
    user = await _new_user(pool)
    created = await access.create(pool, user, context_data={"market_hours": True})

    switched = await access.switch_mode(pool, user, created.id, "psychology")

    assert switched.mode == "psychology"
    stamp = switched.context_data["last_mode_switch"]
    assert RFC3339_UTC.match(stamp)
    assert datetime.datetime.fromisoformat(stamp) == switched.updated_at
    assert switched.context_data["market_hours"] is True
    assert (await _outbox(pool, created.id))[-1] == (2, ["context_data", "mode"])


async def test_switching_to_the_current_mode_changes_nothing(
    pool: asyncpg.Pool,
) -> None:
    user = await _new_user(pool)
    created = await access.create(pool, user, mode="training")

    same = await access.switch_mode(pool, user, created.id, "training")

    assert same == created
    assert len(await _outbox(pool, created.id)) == 1


async def test_switch_mode_refuses_an_unknown_mode(pool: asyncpg.Pool) -> None:
    user = await _new_user(pool)
    created = await access.create(pool, user)

    with pytest.raises(access.InvalidInputError):
        await access.switch_mode(pool, user, created.id, "chat")

    assert await access.get(pool, user, created.id) == created


# --- archive, unarchive, delete -------------------------------------------------


async def test_archive_workflow(pool: asyncpg.Pool) -> None:
    user = await _new_user(pool)
    created = await access.create(pool, user)

    archived = await access.archive(pool, user, created.id)
    unarchived = await access.unarchive(pool, user, created.id)
    deleted = await access.delete(pool, user, created.id)
    with pytest.raises(access.ConversationDeletedError):
        await access.unarchive(pool, user, created.id)

    assert (archived.status, archived.archived_at) == ("archived", archived.updated_at)
    assert (unarchived.status, unarchived.archived_at) == ("active", None)
    assert deleted.status == "deleted"
    assert await access.get(pool, user, created.id) == deleted
    assert [fields for _, fields in await _outbox(pool, created.id)][1:] == [
        ["archived_at", "status"],
        ["archived_at", "status"],
        ["status"],
    ]


async def test_archiving_twice_changes_nothing(pool: asyncpg.Pool) -> None:
    user = await _new_user(pool)
    created = await access.create(pool, user)
    first = await access.archive(pool, user, created.id)

    second = await access.archive(pool, user, created.id)

    assert second == first
    assert len(await _outbox(pool, created.id)) == 2


@pytest.mark.parametrize(
    "change",
    [
        lambda pool, user, cid: access.archive(pool, user, cid),
        lambda pool, user, cid: access.unarchive(pool, user, cid),
        lambda pool, user, cid: access.rename(pool, user, cid, "after the end"),
        lambda pool, user, cid: access.switch_mode(pool, user, cid, "planning"),
    ],
    ids=["archive", "unarchive", "rename", "switch_mode"],
)
async def test_deleted_is_final(pool: asyncpg.Pool, change: Any) -> None:
    user = await _new_user(pool)
    created = await access.create(pool, user)
    deleted = await access.delete(pool, user, created.id)

    with pytest.raises(access.ConversationDeletedError):
        await change(pool, user, created.id)

    assert await access.get(pool, user, created.id) == deleted


async def test_deleting_twice_changes_nothing(pool: asyncpg.Pool) -> None:
    user = await _new_user(pool)
    created = await access.create(pool, user)
    first = await access.delete(pool, user, created.id)

    second = await access.delete(pool, user, created.id)

    assert second == first
    assert len(await _outbox(pool, created.id)) == 2


@pytest.mark.parametrize(
    "change",
    [
        lambda pool, user, cid: access.rename(pool, user, cid, "x"),
        lambda pool, user, cid: access.switch_mode(pool, user, cid, "planning"),
        lambda pool, user, cid: access.archive(pool, user, cid),
        lambda pool, user, cid: access.unarchive(pool, user, cid),
        lambda pool, user, cid: access.delete(pool, user, cid),
    ],
    ids=["rename", "switch_mode", "archive", "unarchive", "delete"],
)
async def test_changing_an_unknown_id_is_not_found(
    pool: asyncpg.Pool, change: Any
) -> None:
    user = await _new_user(pool)

    with pytest.raises(access.ConversationNotFoundError):
        await change(pool, user, uuid.uuid4())


# --- row-level security ---------------------------------------------------------


async def test_another_user_cannot_read(pool: asyncpg.Pool) -> None:
    owner, intruder = await _new_user(pool), await _new_user(pool)
    created = await access.create(pool, owner, title="private")
    own = await access.create(pool, intruder, title="mine")

    found = await access.get(pool, intruder, created.id)
    listed = [
        await access.list_conversations(pool, intruder, **filters)
        for filters in ({}, {"status": "active"}, {"mode": "analysis"})
    ]

    assert found is None
    for page in listed:
        assert [c.id for c in page.conversations] == [own.id]


@pytest.mark.parametrize(
    ("change", "start_archived"),
    [
        (lambda pool, user, cid: access.rename(pool, user, cid, "hijacked"), False),
        (
            lambda pool, user, cid: access.switch_mode(pool, user, cid, "planning"),
            False,
        ),
        (lambda pool, user, cid: access.archive(pool, user, cid), False),
        (lambda pool, user, cid: access.unarchive(pool, user, cid), True),
        (lambda pool, user, cid: access.delete(pool, user, cid), False),
    ],
    ids=["rename", "switch_mode", "archive", "unarchive", "delete"],
)
async def test_another_user_cannot_change(
    pool: asyncpg.Pool, change: Any, start_archived: bool
) -> None:
    owner, intruder = await _new_user(pool), await _new_user(pool)
    created = await access.create(pool, owner, title="private")
    if start_archived:
        # Otherwise unarchiving would change nothing even for the owner.
        await access.archive(pool, owner, created.id)
    before = await access.get(pool, owner, created.id)
    published = await _outbox(pool, created.id)

    with pytest.raises(access.ConversationNotFoundError):
        await change(pool, intruder, created.id)

    assert await access.get(pool, owner, created.id) == before
    assert await _outbox(pool, created.id) == published


async def test_the_app_role_cannot_write_another_users_rows(
    pool: asyncpg.Pool,
) -> None:
    owner, intruder = await _new_user(pool), await _new_user(pool)
    created = await access.create(pool, owner, title="private")

    async with access.acting_as(pool, intruder) as conn:
        updated = await conn.execute(
            "UPDATE conversations SET title = 'hijacked' WHERE id = $1", created.id
        )
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with access.acting_as(pool, intruder) as conn:
            await conn.execute("INSERT INTO conversations (user_id) VALUES ($1)", owner)

    assert updated == "UPDATE 0"
    assert await access.get(pool, owner, created.id) == created


async def test_the_identity_ends_with_the_call(pool: asyncpg.Pool) -> None:
    user = await _new_user(pool)
    await access.create(pool, user)
    size = pool.get_max_size()

    connections = [await pool.acquire() for _ in range(size)]
    try:
        seen = {
            tuple(
                await conn.fetchrow(
                    "SELECT current_user, current_setting('convstats.user_id', true)"
                )
            )
            for conn in connections
        }
    finally:
        for conn in connections:
            await pool.release(conn)

    assert seen <= {("postgres", ""), ("postgres", None)}


# --- the command line -----------------------------------------------------------


async def _convstats(database_url: str, *args: str) -> tuple[int, str]:
    """Runs the installed command line; returns its exit code and all its output."""
    command = pathlib.Path(sys.executable).parent / "convstats"
    env = {**os.environ, "CONVSTATS_DATABASE_URL": database_url}
    process = await asyncio.create_subprocess_exec(
        str(command),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    return await process.wait(), output.decode()


async def test_cli_lists_a_page_and_the_next_cursor(
    pool: asyncpg.Pool, database_url: str
) -> None:
    user = await _new_user(pool)
    for n in range(3):
        await access.create(pool, user, title=f"Session {n}", mode="training")
    last = await access.create(pool, user, title="Latest session")

    code, output = await _convstats(
        database_url, "conversations", "list", "--user", str(user), "--limit", "2"
    )

    assert code == 0, output
    lines = output.splitlines()
    assert lines[0].split() == [
        "ID",
        "UPDATED",
        "(UTC)",
        "STATUS",
        "MODE",
        "MSGS",
        "TITLE",
    ]
    assert lines[1].startswith(str(last.id))
    assert lines[1].endswith("Latest session")
    assert lines[-1].startswith("next page: --cursor ")


async def test_cli_shows_only_the_users_own(
    pool: asyncpg.Pool, database_url: str
) -> None:
    user = await _new_user(pool)
    created = await access.create(pool, user, title="Latest session")
    show = ("conversations", "show", str(created.id), "--user")

    shown = await _convstats(database_url, *show, str(user))
    refused = await _convstats(database_url, *show, str(uuid.uuid4()))

    assert shown[0] == 0, shown[1]
    assert re.search(r"^title +Latest session$", shown[1], re.MULTILINE)
    assert refused[0] == 1
    assert "has no conversation" in refused[1]


def test_cli_choices_match_the_event_contract() -> None:
    assert cli_conversations.MODES == MODES
    assert typing.get_args(events.Status) == cli_conversations.STATUSES
