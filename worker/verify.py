"""Recomputes conversation statistics from the ledger and reports what differs.

Run once it answers "is anything off?"; watching, it re-checks on an interval and
keeps the ``convstats_drift_rows`` gauge current, so an alert on that gauge fires as
soon as stored stats and the ledger disagree.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import signal
import time
import uuid

import asyncpg
import prometheus_client

from worker import apply, db, waiting

logger = logging.getLogger(__name__)

# Enough rows to act on; a drift larger than this is reported as "at least".
DEFAULT_LIMIT = 1000

# These live here rather than in worker.metrics because only the watcher sets them:
# exported by the worker too they would read "no drift" forever.
DRIFT_ROWS = prometheus_client.Gauge(
    "convstats_drift_rows", "conversations whose stats differ from the ledger"
)
LAST_CHECK = prometheus_client.Gauge(
    "convstats_verify_last_success_timestamp_seconds",
    "when the last drift check completed (Unix time)",
)


@dataclasses.dataclass(frozen=True)
class Drift:
    conversation_id: uuid.UUID
    field: str
    stored: object
    expected: object


async def drift(pool: asyncpg.Pool, limit: int = DEFAULT_LIMIT) -> list[Drift]:
    rows = await pool.fetch(db.queries()["drift"], limit)
    found = [item for row in rows for item in _differences(row)]
    DRIFT_ROWS.set(len({item.conversation_id for item in found}))
    LAST_CHECK.set(time.time())
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


def conversations(found: list[Drift]) -> int:
    return len({item.conversation_id for item in found})


async def watch(pool: asyncpg.Pool, interval_s: float, stop: asyncio.Event) -> int:
    """Checks every ``interval_s`` until ``stop`` is set; returns the rounds run.

    A round that cannot reach the database is logged and skipped: the watcher is an
    alarm and must outlive an outage. The last-success gauge shows the gap.
    """
    rounds = 0
    logger.info(
        "checking for drift every %.0fs",
        interval_s,
        extra={"action": "verify_watching"},
    )
    while not stop.is_set():
        await _round(pool)
        rounds += 1
        await waiting.until_stopped(stop, interval_s)
    logger.info("drift watch stopped", extra={"action": "verify_stopped"})
    return rounds


async def watch_until_signalled(pool: asyncpg.Pool, interval_s: float) -> int:
    """:func:`watch` until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return await watch(pool, interval_s, stop)


async def _round(pool: asyncpg.Pool) -> None:
    try:
        found = await drift(pool)
    except apply.DATABASE_ERRORS as exc:
        if isinstance(exc, asyncpg.PostgresError) and not apply.is_transient(exc):
            raise
        logger.warning(
            "drift check failed (%s: %s)",
            type(exc).__name__,
            exc,
            extra={"action": "verify_failed"},
        )
        return

    count = conversations(found)
    if count:
        logger.warning(
            "drift in %d conversations",
            count,
            extra={"action": "drift_found", "conversations": count},
        )
    else:
        logger.debug("no drift", extra={"action": "drift_checked"})
