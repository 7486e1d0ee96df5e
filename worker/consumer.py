"""The consumer loop: batches of message-created records, committed after the database.

The loop drives aiokafka directly instead of through a faust agent. Faust acks an
event when the agent moves past it and commits acked offsets from a background timer;
with batches (``Stream.take``) or agent concurrency it can commit an offset whose
events are not yet in the database (faust-streaming issue 606, still open), and a
crash there loses them. Here the order is explicit: apply in one transaction, send
dead letters and wait for their acks, then commit the offsets.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import aiokafka
import aiokafka.errors
import asyncpg

from worker import apply, faults, kafka, metrics, pipeline, waiting
from worker import settings as settings_module

logger = logging.getLogger(__name__)

RETRY_BACKOFF_MIN_S = 0.5
RETRY_BACKOFF_MAX_S = 30.0
# Lag needs a round trip to the broker; once every few seconds is plenty for a gauge.
LAG_REFRESH_S = 2.0
# Readiness fails once the broker has not answered a lag probe for this long.
BROKER_SILENCE_S = 15.0


class Stopped(Exception):
    """A shutdown interrupted a batch before it was applied; nothing was committed."""


class Consumer:
    def __init__(
        self,
        cfg: settings_module.Settings,
        pipe: pipeline.Pipeline,
        *,
        group_id: str | None = None,
    ) -> None:
        self._cfg = cfg
        self._pipeline = pipe
        self._consumer = aiokafka.AIOKafkaConsumer(
            cfg.messages_topic,
            bootstrap_servers=cfg.kafka_bootstrap_servers,
            group_id=group_id or cfg.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=cfg.batch_size,
            max_poll_interval_ms=cfg.max_poll_interval_ms,
            max_partition_fetch_bytes=kafka.MAX_RECORD_BYTES,
            fetch_max_bytes=64 * 1024 * 1024,
        )
        self.tally = pipeline.Tally()
        # Where the time goes, for the benchmark's profile: waiting for records,
        # applying them (parse + database + dead letters), committing offsets.
        self.seconds = {"fetch": 0.0, "apply": 0.0, "commit": 0.0}
        self.lag: int | None = None
        self.ready = False
        self._broker_answered_at = -math.inf
        self._lag_checked_at = 0.0

    def broker_reachable(self) -> bool:
        """Joined, and the broker answered a recent lag probe."""
        recent = time.monotonic() - self._broker_answered_at < BROKER_SILENCE_S
        return self.ready and recent

    async def run(self, stop: asyncio.Event) -> None:
        await self._consumer.start()
        self.ready = True
        logger.info(
            "consuming %s as group %s",
            self._cfg.messages_topic,
            self._consumer._group_id,
            extra={"action": "consumer_started", "topic": self._cfg.messages_topic},
        )
        try:
            while not stop.is_set():
                fetch_started = time.perf_counter()
                records = await self._next_batch(stop)
                self.seconds["fetch"] += time.perf_counter() - fetch_started
                if records:
                    await self._handle(records, stop)
                await self._refresh_lag()
        except Stopped:
            logger.info(
                "batch abandoned at shutdown", extra={"action": "batch_abandoned"}
            )
        finally:
            self.ready = False
            # Leaves the group at once so the partitions move without waiting for
            # the session timeout.
            await self._consumer.stop()
            logger.info("consumer stopped", extra={"action": "consumer_stopped"})

    async def _next_batch(self, stop: asyncio.Event) -> list[pipeline.Record]:
        deadline = time.monotonic() + self._cfg.batch_wait_ms / 1000
        records: list[pipeline.Record] = []
        while len(records) < self._cfg.batch_size and not stop.is_set():
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            fetched = await self._consumer.getmany(
                timeout_ms=remaining_ms, max_records=self._cfg.batch_size - len(records)
            )
            for messages in fetched.values():
                records.extend(_record(message) for message in messages)
            if remaining_ms == 0:
                break
        return records

    async def _handle(
        self, records: list[pipeline.Record], stop: asyncio.Event
    ) -> None:
        started = time.perf_counter()
        tally = await self._process_with_retry(records, stop)
        faults.point(faults.AFTER_APPLY)
        applied = time.perf_counter()
        await self._commit(records)
        faults.point(faults.AFTER_COMMIT)

        committed = time.perf_counter()
        self.seconds["apply"] += applied - started
        self.seconds["commit"] += committed - applied
        metrics.BATCH_SECONDS.observe(committed - started)
        metrics.count(tally)
        self.tally.add(tally)
        logger.debug(
            "batch of %d: %d applied, %d duplicates, %d dead letters",
            tally.consumed,
            tally.applied,
            tally.duplicates,
            tally.dead_lettered,
            extra={"action": "batch_done", "size": tally.consumed},
        )

    async def _process_with_retry(
        self, records: list[pipeline.Record], stop: asyncio.Event
    ) -> pipeline.Tally:
        backoff_s = RETRY_BACKOFF_MIN_S
        while True:
            try:
                return await self._pipeline.process(records)
            except apply.DATABASE_ERRORS as exc:
                if not apply.is_transient(exc):
                    raise
                metrics.BATCH_RETRIES.inc()
                logger.warning(
                    "batch failed (%s: %s), retrying in %.1fs",
                    type(exc).__name__,
                    exc,
                    backoff_s,
                    extra={"action": "batch_retry", "size": len(records)},
                )
            # Waiting on the stop event lets a shutdown interrupt the backoff; the
            # batch is then abandoned uncommitted and redelivered to whoever is next.
            if await waiting.until_stopped(stop, backoff_s):
                raise Stopped("stopped while retrying a batch")
            backoff_s = min(backoff_s * 2, RETRY_BACKOFF_MAX_S)

    async def _commit(self, records: list[pipeline.Record]) -> None:
        offsets: dict[aiokafka.TopicPartition, int] = {}
        for record in records:
            tp = aiokafka.TopicPartition(record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
        try:
            await self._consumer.commit(offsets)
        except aiokafka.errors.CommitFailedError as exc:
            # A rebalance took the partitions away mid-batch. The rows are in the
            # database; the new owner re-reads the records and finds them applied.
            logger.warning(
                "offset commit refused after a rebalance: %s",
                exc,
                extra={"action": "commit_failed"},
            )

    async def _refresh_lag(self) -> None:
        if time.monotonic() - self._lag_checked_at < LAG_REFRESH_S:
            return
        self._lag_checked_at = time.monotonic()
        assigned = self._consumer.assignment()
        if not assigned:
            return
        try:
            ends = await self._consumer.end_offsets(list(assigned))
            self._broker_answered_at = time.monotonic()
        except aiokafka.errors.KafkaError as exc:
            # Lag is a gauge: a broker that cannot answer now must not stop the
            # batches, which carry on (or fail) on their own.
            logger.warning("lag unknown: %s", exc, extra={"action": "lag_unknown"})
            return
        total = 0
        for tp in assigned:
            committed = await self._consumer.committed(tp) or 0
            lag = max(0, ends[tp] - committed)
            metrics.CONSUMER_LAG.labels(partition=str(tp.partition)).set(lag)
            total += lag
        self.lag = total


def _record(message: aiokafka.ConsumerRecord[bytes, bytes]) -> pipeline.Record:
    return pipeline.Record(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        headers=tuple(message.headers),
        timestamp_ms=message.timestamp,
    )


async def database_ready(pool: asyncpg.Pool) -> bool:
    try:
        await pool.fetchval("SELECT 1")
    except apply.DATABASE_ERRORS:
        return False
    return True
