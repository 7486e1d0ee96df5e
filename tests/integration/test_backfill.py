"""Backfill from files: the live rules, nothing lost, nothing counted twice."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pathlib
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from tests import support
from tests.conftest import Services, with_database
from worker import backfill
from worker import settings as settings_module

CONVSTATS = pathlib.Path(sys.executable).parent / "convstats"
# Everything but what only says when or how often a row was written.
COMPARED = (
    "id, user_id, title, title_source, mode, status, context_data::text AS context,"
    " last_message_at, message_count, created_at, archived_at"
)


@pytest.fixture
async def live_only(
    services: Services,
    template_database: str,
    settings: settings_module.Settings,
) -> AsyncIterator[settings_module.Settings]:
    """A second database and group on the same topic: the live path alone."""
    name = f"convstats_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(services.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
        yield settings.model_copy(
            update={
                "database_url": with_database(services.database_url, name),
                "consumer_group": settings.consumer_group + "-live-only",
                "updates_topic": settings.updates_topic + "-live-only",
            }
        )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def _write_jsonl(path: pathlib.Path, values: list[dict[str, Any] | bytes]) -> None:
    with path.open("wb") as out:
        for value in values:
            out.write(support.encode(value) + b"\n")


async def _compared_rows(url: str) -> dict[uuid.UUID, dict[str, Any]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(f"SELECT {COMPARED} FROM conversations")
    finally:
        await conn.close()
    return {row["id"]: dict(row) for row in rows}


def _read_rejects(path: pathlib.Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _conversation_events(user: uuid.UUID) -> list[dict[str, Any]]:
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    context = {"context_data": {"market_hours": True}, "mode": "planning"}
    return [
        support.event(
            first, user, seconds=0, content="  Opening\tgap\nplan ", **context
        ),
        support.event(first, user, seconds=10, type="assistant", content="Sure."),
        support.event(first, user, seconds=20, content="Later question", **context),
        support.event(first, user, seconds=30, type="system", content=""),
        support.event(second, user, seconds=5, content="Second conversation"),
        support.event(second, user, seconds=6, type="assistant", content="Hello"),
        support.event(third, user, seconds=7, content="Only live"),
        support.event(third, user, seconds=8, content="x" * 80),
    ]


async def test_backfill_then_live_gives_the_rows_of_live_alone(
    tmp_path: pathlib.Path,
    settings: settings_module.Settings,
    pool: asyncpg.Pool,
    live_only: settings_module.Settings,
) -> None:
    user = uuid.uuid4()
    events = _conversation_events(user)
    # The file lacks the first conversation's earliest messages, so the live events
    # must move created_at back and replace the title the file gave.
    from_file = [events[2], events[3], events[4], events[5]]
    path = tmp_path / "history.jsonl"
    _write_jsonl(path, list(from_file))
    await support.create_users(pool, user)
    other = await asyncpg.connect(live_only.database_url)
    await other.execute("INSERT INTO users (id) VALUES ($1)", user)
    await other.close()
    await support.produce(settings, events)

    summary = await backfill.run(settings, path)
    await support.run_until_drained(settings)
    await support.run_until_drained(live_only)

    assert summary.applied == len(from_file)
    backfilled_then_live = await _compared_rows(settings.database_url)
    live_alone = await _compared_rows(live_only.database_url)
    assert len(live_alone) == 3
    assert backfilled_then_live == live_alone


def _bad_and_good_lines(
    owner: uuid.UUID, stranger: uuid.UUID, conversation: uuid.UUID
) -> list[dict[str, Any] | bytes]:
    first = support.event(conversation, owner, seconds=0, content="First")
    clash = dict(first, content="Same id, other text")
    missing = support.event(conversation, owner)
    del missing["content"]
    return [
        first,  # 1
        b"{not json",  # 2
        missing,  # 3
        dict(support.event(conversation, owner), message_id="nope"),  # 4
        b"   ",  # 5: blank, skipped
        dict(support.event(conversation, owner), created_at="2999-01-01T00:00:00Z"),
        first,  # 7: the same message again
        clash,  # 8
        support.event(uuid.uuid4(), uuid.uuid4()),  # 9: nobody's user
        support.event(conversation, stranger, seconds=9),  # 10: not the owner
        support.event(conversation, owner, seconds=4, content="Second"),  # 11
        b'{"content": "\xff\xfe"}',  # 12
        # 13: valid JSON that jsonb cannot store; the database refuses it alone.
        support.event(
            conversation, owner, seconds=6, context_data={"session_type": "\u0000"}
        ),
    ]


@pytest.mark.parametrize("chunk_rows", [3, 1000])
async def test_backfill_writes_every_refused_line_to_the_rejects_file(
    tmp_path: pathlib.Path,
    settings: settings_module.Settings,
    pool: asyncpg.Pool,
    chunk_rows: int,
) -> None:
    owner, stranger, conversation = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await support.create_users(pool, owner, stranger)
    lines = _bad_and_good_lines(owner, stranger, conversation)
    path = tmp_path / "events.jsonl"
    _write_jsonl(path, lines)

    summary = await backfill.run(settings, path, chunk_rows=chunk_rows)

    rejects = _read_rejects(tmp_path / "events.jsonl.rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (2, "not_json"),
        (3, "missing_field"),
        (4, "invalid_uuid"),
        (6, "timestamp_in_future"),
        (8, "message_id_conflict"),
        (9, "unknown_user"),
        (10, "foreign_user"),
        (12, "not_utf8"),
        (13, "database_error"),
    ]
    for reject in rejects[:-2] + rejects[-1:]:
        assert reject["original"].encode() == support.encode(lines[reject["line"] - 1])
        assert reject["detail"]
    assert "original" not in rejects[-2]
    assert base64.b64decode(rejects[-2]["original_base64"]) == lines[11]
    assert (summary.events, summary.applied, summary.duplicates) == (12, 2, 1)
    assert summary.rejected == 9
    row = await pool.fetchrow(
        "SELECT message_count, title FROM conversations WHERE id = $1", conversation
    )
    assert row is not None
    assert (row["message_count"], row["title"]) == (2, "First")


async def test_a_second_version_loses_to_the_one_already_applied(
    tmp_path: pathlib.Path, settings: settings_module.Settings, pool: asyncpg.Pool
) -> None:
    user, conversation, message_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    applied = support.event(conversation, user, content="B", message_id=message_id)
    other = dict(applied, content="A")
    earlier = tmp_path / "earlier.jsonl"
    _write_jsonl(earlier, [applied])
    both = tmp_path / "both.jsonl"
    _write_jsonl(both, [other, applied, other])
    await support.create_users(pool, user)
    await backfill.run(settings, earlier)

    summary = await backfill.run(settings, both)

    rejects = _read_rejects(tmp_path / "both.jsonl.rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [(1, "message_id_conflict")]
    assert (summary.applied, summary.duplicates) == (0, 2)
    title = await pool.fetchval(
        "SELECT title FROM conversations WHERE id = $1", conversation
    )
    assert title == "B"


async def test_backfill_twice_changes_and_publishes_nothing_the_second_time(
    tmp_path: pathlib.Path, settings: settings_module.Settings, pool: asyncpg.Pool
) -> None:
    user = uuid.uuid4()
    events = _conversation_events(user)
    path = tmp_path / "history.jsonl"
    _write_jsonl(path, list(events))
    await support.create_users(pool, user)
    await backfill.run(settings, path, chunk_rows=3)
    rows_before = await pool.fetch("SELECT * FROM conversations ORDER BY id")
    outbox_before = await pool.fetchval("SELECT count(*) FROM convstats_outbox")

    summary = await backfill.run(settings, path, chunk_rows=3)

    assert (summary.applied, summary.duplicates, summary.rejected) == (0, 8, 0)
    assert summary.conversation_updates == 0
    assert await pool.fetch("SELECT * FROM conversations ORDER BY id") == rows_before
    assert await pool.fetchval("SELECT count(*) FROM convstats_outbox") == outbox_before


async def test_backfill_coalesces_publishing_to_one_outbox_row_per_conversation(
    tmp_path: pathlib.Path, settings: settings_module.Settings, pool: asyncpg.Pool
) -> None:
    user = uuid.uuid4()
    events = _conversation_events(user)
    path = tmp_path / "history.jsonl"
    _write_jsonl(path, list(events))
    await support.create_users(pool, user)

    summary = await backfill.run(settings, path)

    outbox = await pool.fetch(
        "SELECT conversation_id, version FROM convstats_outbox ORDER BY id"
    )
    assert summary.conversation_updates == 3
    assert len(outbox) == 3
    assert {row["conversation_id"] for row in outbox} == {
        uuid.UUID(e["conversation_id"]) for e in events
    }


CSV_TEXT = """\
message_id,conversation_id,user_id,type,content,created_at,mode,context_data
{m1},{c},{u},user,"Gap up, ""big"" one
second line",2024-03-01T09:30:00Z,planning,"{{""market_hours"": true}}"
{m2},{c},{u},assistant,Noted,2024-03-01T10:31:00+01:00,,
{m3},{c},{u},user,Bad context,2024-03-01T09:32:00Z,,{{not json
{m4},{c},{u},user,Too many,2024-03-01T09:33:00Z,,,extra
{m5},{c},{u},robot,Bad type,2024-03-01T09:34:00Z,,
"""


async def test_backfill_reads_csv_with_the_documented_header(
    tmp_path: pathlib.Path, settings: settings_module.Settings, pool: asyncpg.Pool
) -> None:
    user, conversation = uuid.uuid4(), uuid.uuid4()
    ids = {f"m{i}": uuid.uuid4() for i in range(1, 6)}
    path = tmp_path / "history.csv"
    path.write_text(CSV_TEXT.format(c=conversation, u=user, **ids))
    await support.create_users(pool, user)

    summary = await backfill.run(settings, path)

    row = await pool.fetchrow("SELECT * FROM conversations WHERE id = $1", conversation)
    assert row is not None
    assert row["message_count"] == 2
    assert row["title"] == 'Gap up, "big" one second line'
    assert row["mode"] == "planning"
    assert json.loads(row["context_data"]) == {"market_hours": True}
    assert row["last_message_at"].isoformat() == "2024-03-01T09:31:00+00:00"
    rejects = _read_rejects(tmp_path / "history.csv.rejects.jsonl")
    # The first record spans lines 2 and 3, so the later ones start a line late.
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (5, "invalid_context_data"),
        (6, "malformed_csv"),
        (7, "invalid_message_type"),
    ]
    assert rejects[1]["original"].endswith(",,,extra")
    assert summary.applied == 2


async def test_backfill_refuses_a_csv_without_the_header(
    tmp_path: pathlib.Path, settings: settings_module.Settings
) -> None:
    path = tmp_path / "history.csv"
    path.write_text("id,text\n1,hello\n")

    with pytest.raises(backfill.BackfillError, match="lacks message_id"):
        await backfill.run(settings, path)


async def test_backfill_command_prints_a_summary(
    tmp_path: pathlib.Path, database_url: str, pool: asyncpg.Pool
) -> None:
    user = uuid.uuid4()
    path = tmp_path / "history.ndjson"
    _write_jsonl(path, [*_conversation_events(user), b"oops"])
    await support.create_users(pool, user)
    env = {**os.environ, "CONVSTATS_DATABASE_URL": database_url}

    process = await asyncio.create_subprocess_exec(
        str(CONVSTATS),
        "--log-level",
        "WARNING",
        "backfill",
        str(path),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await process.communicate()

    assert process.returncode == 0
    text = " ".join(out.decode().split())
    assert "applied 8 duplicates 0 rejected 1" in text
    assert f"rejects written to {backfill.rejects_path(path)}" in text
    count = await pool.fetchval("SELECT sum(message_count) FROM conversations")
    assert count == 8
