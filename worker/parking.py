"""Retries messages parked because their user did not exist yet.

A parked message is applied as soon as its user appears. After the configured wait
it goes to the dead-letter topic with reason ``unknown_user``, its original record
intact, and leaves the table only once the broker has acknowledged it.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging

import asyncpg

from worker import apply, db, events, metrics, pipeline, waiting
from worker import settings as settings_module

logger = logging.getLogger(__name__)

# How often due messages are looked for; each one's own backoff grows to 30 s.
POLL_INTERVAL_S = 1.0
BATCH_SIZE = 500


class Parking:
    def __init__(
        self,
        cfg: settings_module.Settings,
        pool: asyncpg.Pool,
        pipe: pipeline.Pipeline,
    ) -> None:
        self._pool = pool
        self._pipeline = pipe
        self._patience = datetime.timedelta(seconds=cfg.unknown_user_retry_s)
        self.tally = pipeline.Tally()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.retry_due()
            except apply.DATABASE_ERRORS as exc:
                if not apply.is_transient(exc):
                    raise
                logger.warning(
                    "parked retry failed (%s), trying again later",
                    exc,
                    extra={"action": "parked_retry_failed"},
                )
            await waiting.until_stopped(stop, POLL_INTERVAL_S)

    async def retry_due(self) -> pipeline.Tally:
        rows = await self._pool.fetch(db.queries()["due_parked"], BATCH_SIZE)
        if not rows:
            return pipeline.Tally()

        resolution = await self._pipeline.resolve([_record(row) for row in rows])
        still_waiting = self._give_up_on_old(rows, resolution)
        await self._pipeline.dead_letter(resolution)

        waiting_ids = [message.event.message_id for _, message in still_waiting]
        done_ids = [
            row["message_id"] for row in rows if row["message_id"] not in waiting_ids
        ]
        await self._pool.execute(db.queries()["unpark"], done_ids)
        await self._pool.execute(db.queries()["postpone_parked"], waiting_ids)

        resolution.tally.consumed = 0
        self.tally.add(resolution.tally)
        metrics.count(resolution.tally)
        return resolution.tally

    def _give_up_on_old(
        self, rows: list[asyncpg.Record], resolution: pipeline.Resolution
    ) -> list[pipeline.Waiting]:
        parked_at = {row["message_id"]: row["parked_at"] for row in rows}
        now = datetime.datetime.now(datetime.UTC)
        still_waiting = []
        for record, message in resolution.waiting:
            if now - parked_at[message.event.message_id] < self._patience:
                still_waiting.append((record, message))
                continue
            rejection = events.Rejection(
                events.Reason.UNKNOWN_USER,
                f"user {message.event.user_id} did not appear within "
                f"{self._patience.total_seconds():g}s",
            )
            resolution.rejected.append((record, rejection))
        return still_waiting


def _record(row: asyncpg.Record) -> pipeline.Record:
    headers = tuple(
        (
            base64.b64decode(name).decode(),
            None if value is None else base64.b64decode(value),
        )
        for name, value in json.loads(row["record_headers"])
    )
    return pipeline.Record(
        topic=row["source_topic"],
        partition=row["source_partition"],
        offset=row["source_offset"],
        key=row["record_key"],
        value=row["record_value"],
        headers=headers,
    )
