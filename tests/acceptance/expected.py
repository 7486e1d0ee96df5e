"""The final state recomputed from the events alone, and checks against it.

Nothing here asks the database how to count: the statistics come straight from
the contract's rules, so a worker that applied an event twice, lost one, or left
the published stream behind the database fails the comparison. Only the title one
message would give comes from worker.titles; the hostile-input tests check that
text against titles written out by hand.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import uuid
from collections.abc import Iterable
from typing import Any

import aiokafka
import asyncpg

from worker import titles


@dataclasses.dataclass(frozen=True)
class Stats:
    user_id: uuid.UUID
    message_count: int
    first_message_at: datetime.datetime
    last_message_at: datetime.datetime
    title: str | None


def instant(text: str) -> datetime.datetime:
    """An RFC 3339 timestamp as an aware instant; its offset no longer matters."""
    return datetime.datetime.fromisoformat(text)


def stats(events: Iterable[dict[str, Any]]) -> dict[uuid.UUID, Stats]:
    """Per conversation, what the rows must say once every event is applied."""
    grouped: dict[uuid.UUID, dict[str, dict[str, Any]]] = {}
    for event in events:
        # A repeated message_id is the same message: it counts once.
        messages = grouped.setdefault(uuid.UUID(event["conversation_id"]), {})
        messages[event["message_id"]] = event
    return {
        conversation_id: _stats(list(messages.values()))
        for conversation_id, messages in grouped.items()
    }


def _stats(messages: list[dict[str, Any]]) -> Stats:
    times = [instant(m["created_at"]) for m in messages]
    candidates = sorted(
        (instant(m["created_at"]), uuid.UUID(m["message_id"]), title)
        for m in messages
        if (title := titles.candidate(m["type"], m["content"])) is not None
    )
    return Stats(
        user_id=uuid.UUID(messages[0]["user_id"]),
        message_count=len(messages),
        first_message_at=min(times),
        last_message_at=max(times),
        title=candidates[0][2] if candidates else None,
    )


async def rows(pool: asyncpg.Pool) -> dict[uuid.UUID, dict[str, Any]]:
    found = await pool.fetch(
        "SELECT id, user_id, title, title_source, mode, status, message_count,"
        " last_message_at, created_at, version FROM conversations"
    )
    return {row["id"]: dict(row) for row in found}


async def assert_rows_exact(
    pool: asyncpg.Pool, expected: dict[uuid.UUID, Stats]
) -> dict[uuid.UUID, dict[str, Any]]:
    """Every conversation as the rules say, every message in the ledger once."""
    found = await rows(pool)
    ledger: int = await pool.fetchval("SELECT count(*) FROM convstats_applied_messages")

    assert set(found) == set(expected)
    wrong = {
        conversation_id: (_observed(found[conversation_id]), _wanted(want))
        for conversation_id, want in expected.items()
        if _observed(found[conversation_id]) != _wanted(want)
    }
    assert not wrong, f"{len(wrong)} conversations differ, e.g. {_first(wrong)}"
    late = [
        conversation_id
        for conversation_id, want in expected.items()
        if found[conversation_id]["created_at"] > want.first_message_at
    ]
    assert not late, f"created after their earliest message: {late}"
    assert ledger == sum(want.message_count for want in expected.values())
    for row in found.values():
        assert row["status"] == "active"
        assert row["mode"] == "analysis"
    return found


def _observed(row: dict[str, Any]) -> tuple[Any, ...]:
    return (
        row["user_id"],
        row["message_count"],
        row["last_message_at"],
        row["title"],
    )


def _wanted(want: Stats) -> tuple[Any, ...]:
    return (want.user_id, want.message_count, want.last_message_at, want.title)


def _first(wrong: dict[uuid.UUID, Any]) -> str:
    conversation_id, (got, want) = next(iter(wrong.items()))
    return f"{conversation_id}: got {got}, want {want}"


def body(record: aiokafka.ConsumerRecord[bytes, bytes]) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(record.value)
    return decoded


def last_updates(
    records: Iterable[aiokafka.ConsumerRecord[bytes, bytes]],
) -> dict[uuid.UUID, dict[str, Any]]:
    """Per conversation, the update at the highest offset of its partition."""
    last: dict[uuid.UUID, dict[str, Any]] = {}
    partition: dict[uuid.UUID, int] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        update = body(record)
        conversation_id = uuid.UUID(update["conversation_id"])
        assert record.key == str(conversation_id).encode()
        # One key, one partition: otherwise "last" would mean nothing.
        assert partition.setdefault(conversation_id, record.partition) == (
            record.partition
        )
        last[conversation_id] = update
    return last


def highest_versions(
    records: Iterable[aiokafka.ConsumerRecord[bytes, bytes]],
) -> dict[uuid.UUID, dict[str, Any]]:
    """What a subscriber keeps: per conversation the highest version seen."""
    kept: dict[uuid.UUID, dict[str, Any]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        update = body(record)
        conversation_id = uuid.UUID(update["conversation_id"])
        if update["version"] > kept.get(conversation_id, {"version": 0})["version"]:
            kept[conversation_id] = update
    return kept


def assert_updates_tell(
    updates: dict[uuid.UUID, dict[str, Any]], found: dict[uuid.UUID, dict[str, Any]]
) -> None:
    """Each conversation's update carries its final version and state."""
    assert set(updates) == set(found)
    stale = {
        conversation_id: (_published(update), _state(found[conversation_id]))
        for conversation_id, update in updates.items()
        if _published(update) != _state(found[conversation_id])
    }
    assert not stale, f"{len(stale)} conversations end stale, e.g. {_first(stale)}"


def _published(update: dict[str, Any]) -> tuple[Any, ...]:
    return (
        update["version"],
        update["message_count"],
        instant(update["last_message_at"]),
        update["title"],
        update["status"],
        uuid.UUID(update["user_id"]),
        instant(update["created_at"]),
    )


def _state(row: dict[str, Any]) -> tuple[Any, ...]:
    return (
        row["version"],
        row["message_count"],
        row["last_message_at"],
        row["title"],
        row["status"],
        row["user_id"],
        row["created_at"],
    )
