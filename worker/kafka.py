"""Kafka plumbing shared by the worker, the relay and the tools."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import aiokafka
import aiokafka.admin
import aiokafka.errors

from worker import events, pipeline
from worker import settings as settings_module

logger = logging.getLogger(__name__)

# Partitions for topics this project creates; the key (conversation id) keeps every
# conversation on one partition, so more partitions only add parallelism.
DEFAULT_PARTITIONS = 4

HEADER_PREFIX = "convstats."
# The largest record value this project's topics accept (several-megabyte messages
# are valid input). Dead letters add headers to a record that may be that large,
# so the dead-letter topic and the producer allow a margin beyond it.
MAX_RECORD_BYTES = 16 * 1024 * 1024
DEAD_LETTER_MARGIN_BYTES = 1024 * 1024
# Records a bulk producer keeps unacknowledged before it waits for the broker.
PRODUCE_WINDOW = 5000


def producer(cfg: settings_module.Settings) -> aiokafka.AIOKafkaProducer:
    # acks=all with idempotence: a retried send neither duplicates nor reorders
    # records of one partition, which per-conversation ordering relies on.
    return aiokafka.AIOKafkaProducer(
        bootstrap_servers=cfg.kafka_bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=256 * 1024,
        max_request_size=MAX_RECORD_BYTES + DEAD_LETTER_MARGIN_BYTES,
        compression_type="gzip",
    )


async def ensure_topics(
    cfg: settings_module.Settings, partitions: int = DEFAULT_PARTITIONS
) -> None:
    """Creates the three topics where missing; existing ones are left as they are."""
    admin = aiokafka.admin.AIOKafkaAdminClient(
        bootstrap_servers=cfg.kafka_bootstrap_servers
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [cfg.messages_topic, cfg.updates_topic, cfg.dead_letter_topic]
        missing = [
            aiokafka.admin.NewTopic(
                name,
                num_partitions=partitions,
                replication_factor=1,
                topic_configs={"max.message.bytes": str(_topic_limit(cfg, name))},
            )
            for name in wanted
            if name not in existing
        ]
        if missing:
            with contextlib.suppress(aiokafka.errors.TopicAlreadyExistsError):
                await admin.create_topics(missing)
            logger.info(
                "created topics %s",
                ", ".join(topic.name for topic in missing),
                extra={"action": "topics_created"},
            )
    finally:
        await admin.close()


def _topic_limit(cfg: settings_module.Settings, topic: str) -> int:
    if topic == cfg.dead_letter_topic:
        return MAX_RECORD_BYTES + DEAD_LETTER_MARGIN_BYTES
    return MAX_RECORD_BYTES


class KafkaDeadLetters:
    """Sends rejected records to the dead-letter topic with their original bytes."""

    def __init__(
        self, cfg: settings_module.Settings, producer: aiokafka.AIOKafkaProducer
    ) -> None:
        self._topic = cfg.dead_letter_topic
        self._producer = producer

    async def send(
        self, rejected: Sequence[tuple[pipeline.Record, events.Rejection]]
    ) -> None:
        now = datetime.datetime.now(datetime.UTC).isoformat()
        futures = []
        for record, rejection in rejected:
            futures.append(
                await self._producer.send(
                    self._topic,
                    value=record.value,
                    key=record.key,
                    headers=list(record.headers)
                    + _dead_letter_headers(record, rejection, now),
                )
            )
            logger.warning(
                "dead-lettered %s[%d]@%d: %s",
                record.topic,
                record.partition,
                record.offset,
                rejection.reason,
                extra={
                    "action": "dead_lettered",
                    "reason": str(rejection.reason),
                    "topic": record.topic,
                    "partition": record.partition,
                    "offset": record.offset,
                },
            )
        for future in futures:
            await future


def _dead_letter_headers(
    record: pipeline.Record, rejection: events.Rejection, now: str
) -> list[tuple[str, bytes]]:
    fields = {
        "reason": str(rejection.reason),
        # Kafka headers are small by convention; a giant detail helps nobody.
        "detail": rejection.detail[:2000],
        "source_topic": record.topic,
        "source_partition": str(record.partition),
        "source_offset": str(record.offset),
        "dead_lettered_at": now,
    }
    return [(HEADER_PREFIX + name, value.encode()) for name, value in fields.items()]


async def topic_partitions(
    cfg: settings_module.Settings, topic: str
) -> list[aiokafka.TopicPartition]:
    """The partitions of ``topic`` as the broker reports them now (none if absent)."""
    admin = aiokafka.admin.AIOKafkaAdminClient(
        bootstrap_servers=cfg.kafka_bootstrap_servers
    )
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return sorted(
        aiokafka.TopicPartition(topic, p["partition"])
        for t in described
        if t["error_code"] == 0
        for p in t["partitions"]
    )


async def group_lag(cfg: settings_module.Settings, group_id: str, topic: str) -> int:
    """Records of ``topic`` that ``group_id`` has not committed yet."""
    tps = await topic_partitions(cfg, topic)
    if not tps:
        return 0
    probe = aiokafka.AIOKafkaConsumer(
        bootstrap_servers=cfg.kafka_bootstrap_servers,
        group_id=group_id,
        enable_auto_commit=False,
    )
    await probe.start()
    try:
        ends = await probe.end_offsets(tps)
        lag = 0
        for tp in tps:
            lag += ends[tp] - (await probe.committed(tp) or 0)
        return lag
    finally:
        await probe.stop()


async def produce(
    cfg: settings_module.Settings,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes]],
    on_sent: Callable[[int], None] | None = None,
) -> int:
    """Sends key/value pairs and waits for every acknowledgement; returns the count."""
    sender = producer(cfg)
    await sender.start()
    sent = 0
    try:
        pending: list[asyncio.Future[Any]] = []
        for key, value in records:
            pending.append(await sender.send(topic, key=key, value=value))
            # Bounded in flight: a corpus of any size streams in constant memory.
            if len(pending) >= PRODUCE_WINDOW:
                sent += await _drain(pending, on_sent)
        sent += await _drain(pending, on_sent)
    finally:
        await sender.stop()
    return sent


async def _drain(
    pending: list[asyncio.Future[Any]], on_sent: Callable[[int], None] | None
) -> int:
    count = len(pending)
    await asyncio.gather(*pending)
    pending.clear()
    if on_sent is not None:
        on_sent(count)
    return count


async def read_all(
    cfg: settings_module.Settings, topic: str
) -> list[aiokafka.ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` up to its end when called, by partition and offset.

    Reads without a consumer group, so inspecting a topic never moves anyone's
    committed offsets.
    """
    tps = await topic_partitions(cfg, topic)
    if not tps:
        return []
    reader = aiokafka.AIOKafkaConsumer(
        bootstrap_servers=cfg.kafka_bootstrap_servers,
        enable_auto_commit=False,
        max_partition_fetch_bytes=MAX_RECORD_BYTES + DEAD_LETTER_MARGIN_BYTES,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await reader.start()
    try:
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        ends = await reader.end_offsets(tps)
        found: list[aiokafka.ConsumerRecord[bytes, bytes]] = []
        while [tp for tp in tps if await reader.position(tp) < ends[tp]]:
            batch = await reader.getmany(timeout_ms=1000)
            for tp, messages in batch.items():
                found.extend(m for m in messages if m.offset < ends[tp])
        return sorted(found, key=lambda r: (r.partition, r.offset))
    finally:
        await reader.stop()
