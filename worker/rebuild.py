"""Recomputes conversation statistics from the ledger and repairs the rows that differ.

The ledger is the truth: message_count is the number of its rows for a conversation,
last_message_at their latest created_at, created_at is never later than the
earliest, and an automatic title is the earliest candidate. A title a person set is
never touched. Only rows that differ are written, so only they get a new version and
an outbox row (the triggers do that for any writer).

Work goes in batches by conversation id (keyset), one transaction each; the last id
of every batch is logged, and ``after`` resumes from there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable

import asyncpg

from worker import apply, db
from worker import settings as settings_module

logger = logging.getLogger(__name__)

# Conversations per transaction: each batch holds their row locks while the ledger
# is aggregated, which must stay short beside a live worker.
DEFAULT_BATCH_SIZE = 500
BATCH_ATTEMPTS = 5
RETRY_BACKOFF_S = 0.5
# Keyset paging starts below every uuid; PostgreSQL orders uuids bytewise, as the
# integer value orders them here.
START = uuid.UUID(int=0)
PROGRESS_LOG_INTERVAL_S = 10.0


@dataclasses.dataclass(frozen=True)
class Scope:
    """Which conversations to rebuild: one, one user's, or (neither given) all."""

    conversation_id: uuid.UUID | None = None
    user_id: uuid.UUID | None = None

    def describe(self) -> str:
        if self.conversation_id is not None:
            return f"conversation {self.conversation_id}"
        if self.user_id is not None:
            return f"conversations of user {self.user_id}"
        return "all conversations"


@dataclasses.dataclass
class Summary:
    checked: int = 0
    repaired: int = 0
    # The last conversation id done: where a later run resumes.
    last_id: uuid.UUID | None = None
    complete: bool = False
    seconds: float = 0.0
    logged_at: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def rows_per_s(self) -> float:
        return self.checked / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        out = [
            f"conversations checked  {self.checked:>10,}",
            f"  repaired             {self.repaired:>10,}",
            f"seconds                {self.seconds:>10.1f}",
            f"rows per second        {self.rows_per_s:>10,.0f}",
        ]
        if not self.complete and self.last_id is not None:
            out.append(f"stopped early; resume with --after {self.last_id}")
        return out


async def count(conn: asyncpg.Connection, scope: Scope, after: uuid.UUID) -> int:
    """How many conversations the run will check, for a progress bar."""
    queries = db.queries()
    if scope.conversation_id is not None:
        return 1
    if scope.user_id is not None:
        total: int = await conn.fetchval(
            queries["rebuild_count_user"], scope.user_id, after
        )
        return total
    everything: int = await conn.fetchval(queries["rebuild_count_all"], after)
    return everything


async def run(
    cfg: settings_module.Settings,
    scope: Scope,
    *,
    after: uuid.UUID | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stop: asyncio.Event | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Summary:
    """Rebuilds ``scope`` from ``after`` on until done or until ``stop`` is set."""
    started = time.perf_counter()
    summary = Summary(last_id=after)
    conn = await db.connect(cfg)
    # Estimates for a batch scale with the ledger, so the planner reaches for JIT;
    # compiling costs far more than the batch (hundreds of milliseconds each).
    await conn.execute("SET jit = off")
    logger.info("rebuilding %s", scope.describe(), extra={"action": "rebuild_started"})
    try:
        while stop is None or not stop.is_set():
            checked, repaired = await _batch_with_retry(
                conn, scope, summary.last_id or START, batch_size
            )
            if not checked:
                summary.complete = True
                break
            _advance(summary, checked, repaired)
            if on_batch is not None:
                on_batch(len(checked))
            if scope.conversation_id is not None:
                summary.complete = True
                break
    finally:
        await conn.close()

    summary.seconds = time.perf_counter() - started
    logger.info(
        "rebuild %s: %d checked, %d repaired",
        "finished" if summary.complete else "stopped",
        summary.checked,
        summary.repaired,
        extra={"action": "rebuild_done", "resume_after": str(summary.last_id)},
    )
    return summary


def _advance(summary: Summary, checked: list[uuid.UUID], repaired: int) -> None:
    summary.checked += len(checked)
    summary.repaired += repaired
    summary.last_id = checked[-1]

    # Every batch at DEBUG; at INFO often enough that a run killed outright still
    # left a recent resume point in the log.
    now = time.monotonic()
    loud = now - summary.logged_at >= PROGRESS_LOG_INTERVAL_S
    if loud:
        summary.logged_at = now
    logger.log(
        logging.INFO if loud else logging.DEBUG,
        "rebuilt %d conversations through %s (%d repaired so far); "
        "resume with --after %s",
        summary.checked,
        checked[-1],
        summary.repaired,
        checked[-1],
        extra={"action": "rebuild_progress", "resume_after": str(checked[-1])},
    )


async def _batch_with_retry(
    conn: asyncpg.Connection, scope: Scope, after: uuid.UUID, batch_size: int
) -> tuple[list[uuid.UUID], int]:
    for attempt in range(1, BATCH_ATTEMPTS + 1):
        try:
            return await _batch(conn, scope, after, batch_size)
        except asyncpg.PostgresError as exc:
            # A deadlock or serialization failure is the database's way of saying
            # "again"; anything else is a real error.
            if not apply.is_transient(exc) or attempt == BATCH_ATTEMPTS:
                raise
            logger.warning(
                "rebuild batch failed (%s), retrying",
                exc,
                extra={"action": "rebuild_retry", "attempt": attempt},
            )
            await asyncio.sleep(RETRY_BACKOFF_S * attempt)
    raise AssertionError("unreachable")


async def _batch(
    conn: asyncpg.Connection, scope: Scope, after: uuid.UUID, batch_size: int
) -> tuple[list[uuid.UUID], int]:
    queries = db.queries()
    async with conn.transaction():
        # The titles written here are automatic ones; without this the guard
        # trigger would take them for a person's.
        await conn.execute("SET LOCAL convstats.auto_title = 'on'")
        if scope.conversation_id is not None:
            locked = await conn.fetch(
                queries["rebuild_lock_conversation"], scope.conversation_id
            )
        elif scope.user_id is not None:
            locked = await conn.fetch(
                queries["rebuild_lock_user"], scope.user_id, after, batch_size
            )
        else:
            locked = await conn.fetch(queries["rebuild_lock_all"], after, batch_size)

        ids = [row["id"] for row in locked]
        if not ids:
            return [], 0
        repaired = await conn.fetch(queries["rebuild_apply"], ids)
    return ids, len(repaired)
