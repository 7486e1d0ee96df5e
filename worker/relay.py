"""The outbox relay: publishes conversation-updated from the outbox table.

Rows are marked published only after the broker acknowledged them, so a crash in
between re-sends them; the event id is stable, and subscribers drop versions they
already have. Unpublished rows are found by a flag, not by an id watermark: a
transaction that took an id early and commits late is still picked up next round.
"""

from __future__ import annotations

import asyncio
import logging

import aiokafka
import aiokafka.errors
import asyncpg

from worker import apply, db, faults, metrics, waiting
from worker import settings as settings_module

logger = logging.getLogger(__name__)

CHANNEL = "convstats_outbox"
# Purging published rows is housekeeping; once a minute keeps the table small.
PURGE_INTERVAL_S = 60.0
RETRY_BACKOFF_MIN_S = 0.5
RETRY_BACKOFF_MAX_S = 30.0


class Relay:
    def __init__(
        self,
        cfg: settings_module.Settings,
        pool: asyncpg.Pool,
        producer: aiokafka.AIOKafkaProducer,
    ) -> None:
        self._cfg = cfg
        self._pool = pool
        self._producer = producer
        self._wake = asyncio.Event()
        self.published = 0
        self.backlog: int | None = None
        self.leading = False

    async def run(self, stop: asyncio.Event) -> None:
        backoff_s = RETRY_BACKOFF_MIN_S
        while not stop.is_set():
            try:
                await self._session(stop)
            except (*apply.DATABASE_ERRORS, aiokafka.errors.KafkaError) as exc:
                if isinstance(exc, asyncpg.PostgresError) and not apply.is_transient(
                    exc
                ):
                    raise
                logger.warning(
                    "relay interrupted (%s: %s), resuming in %.1fs",
                    type(exc).__name__,
                    exc,
                    backoff_s,
                    extra={"action": "relay_retry"},
                )
                await waiting.until_stopped(stop, backoff_s)
                backoff_s = min(backoff_s * 2, RETRY_BACKOFF_MAX_S)
            else:
                backoff_s = RETRY_BACKOFF_MIN_S

    async def _session(self, stop: asyncio.Event) -> None:
        conn = await db.connect(self._cfg)
        try:
            await self._lead(conn, stop)
            await conn.add_listener(CHANNEL, self._on_notify)
            await self._publish_until(stop, conn)
        finally:
            self.leading = False
            conn.terminate()

    async def _lead(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        # One relay publishes at a time, so a conversation's updates leave in version
        # order; the lock dies with the session, letting a standby take over.
        while not stop.is_set():
            if await conn.fetchval(db.queries()["try_relay_lock"]):
                self.leading = True
                logger.info("relay is publishing", extra={"action": "relay_leading"})
                return
            await waiting.until_stopped(stop, self._cfg.relay_poll_interval_s)

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def _publish_until(
        self, stop: asyncio.Event, conn: asyncpg.Connection
    ) -> None:
        loop = asyncio.get_running_loop()
        purged_at = loop.time()
        while not stop.is_set():
            # Without the session that holds the lock another relay may be leading
            # already; publishing on would interleave versions.
            if conn.is_closed():
                raise ConnectionError("relay lost its database session")
            self._wake.clear()
            sent = await self.publish_once()
            if loop.time() - purged_at > PURGE_INTERVAL_S:
                await self._purge()
                purged_at = loop.time()
            if sent == 0:
                await self._idle(stop)

    async def _idle(self, stop: asyncio.Event) -> None:
        await self._refresh_backlog()
        wake = asyncio.ensure_future(self._wake.wait())
        stopping = asyncio.ensure_future(stop.wait())
        # The poll interval is the fallback when a notification is lost, e.g. while
        # the listening connection was being re-established.
        await asyncio.wait(
            {wake, stopping},
            timeout=self._cfg.relay_poll_interval_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
        wake.cancel()
        stopping.cancel()

    async def publish_once(self) -> int:
        """Publishes one round of unpublished rows; returns the records sent."""
        rows = await self._pool.fetch(
            db.queries()["fetch_unpublished"], self._cfg.relay_batch_size
        )
        if not rows:
            return 0

        # Every row is one committed change and is published on its own: the
        # contract promises each version. Changes made by one transaction were
        # already folded into one row by the outbox trigger.
        futures = [
            await self._producer.send(
                self._cfg.updates_topic,
                key=str(row["conversation_id"]).encode(),
                value=row["payload"].encode(),
                headers=[("convstats.event_id", str(row["event_id"]).encode())],
            )
            for row in rows
        ]
        for future in futures:
            await future
        faults.point(faults.AFTER_PUBLISH)

        await self._pool.execute(
            db.queries()["mark_published"], [row["id"] for row in rows]
        )
        self.published += len(rows)
        metrics.UPDATES_PUBLISHED.inc(len(rows))
        logger.debug(
            "published %d updates",
            len(rows),
            extra={"action": "outbox_published", "size": len(rows)},
        )
        return len(rows)

    async def _refresh_backlog(self) -> None:
        row = await self._pool.fetchrow(db.queries()["outbox_backlog"])
        assert row is not None
        self.backlog = row["backlog"]
        metrics.OUTBOX_BACKLOG.set(row["backlog"])
        metrics.OUTBOX_OLDEST_AGE.set(row["oldest_s"])

    async def _purge(self) -> None:
        await self._pool.execute(
            db.queries()["purge_published"], self._cfg.outbox_retention_s
        )
