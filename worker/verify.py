"""Recomputes conversation statistics from the ledger and reports what differs."""

from __future__ import annotations

import dataclasses
import datetime
import uuid

import asyncpg

from worker import db, metrics

# Enough rows to act on; a drift larger than this is reported as "at least".
DEFAULT_LIMIT = 1000


@dataclasses.dataclass(frozen=True)
class Drift:
    conversation_id: uuid.UUID
    field: str
    stored: object
    expected: object


async def drift(pool: asyncpg.Pool, limit: int = DEFAULT_LIMIT) -> list[Drift]:
    rows = await pool.fetch(db.queries()["drift"], limit)
    found = [item for row in rows for item in _differences(row)]
    metrics.DRIFT_ROWS.set(len({item.conversation_id for item in found}))
    return found


def _differences(row: asyncpg.Record) -> list[Drift]:
    conversation_id = row["conversation_id"]
    found = []
    pairs = (
        ("message_count", row["message_count"], row["expected_message_count"]),
        ("last_message_at", row["last_message_at"], row["expected_last_message_at"]),
        ("title", row["title"], row["expected_title"]),
    )
    for field, stored, expected in pairs:
        if stored != expected:
            found.append(Drift(conversation_id, field, stored, expected))
    first: datetime.datetime | None = row["first_message_at"]
    if first is not None and row["created_at"] > first:
        found.append(Drift(conversation_id, "created_at", row["created_at"], first))
    return found
