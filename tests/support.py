"""Shared test helpers: events, producing, reading topics, running the worker."""

from __future__ import annotations

import asyncio
import datetime
import json
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import aiokafka
import asyncpg

from worker import events, kafka, pipeline, service
from worker import settings as settings_module

T0 = datetime.datetime(2024, 3, 1, 9, 30, tzinfo=datetime.UTC)


def event(
    conversation_id: uuid.UUID,
    user_id: uuid.UUID,
    *,
    seconds: float = 0,
    type: str = "user",
    content: str = "hello",
    message_id: uuid.UUID | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A valid message-created event, ``seconds`` after a fixed instant."""
    return {
        "message_id": str(message_id or uuid.uuid4()),
        "conversation_id": str(conversation_id),
        "user_id": str(user_id),
        "type": type,
        "content": content,
        "created_at": (T0 + datetime.timedelta(seconds=seconds)).isoformat(),
        **extra,
    }


def encode(value: dict[str, Any] | bytes) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


def records(
    values: Iterable[dict[str, Any] | bytes], topic: str = "t"
) -> list[pipeline.Record]:
    return [
        pipeline.Record(topic=topic, partition=0, offset=i, key=None, value=encode(v))
        for i, v in enumerate(values)
    ]


class RecordingDeadLetters:
    """Keeps dead letters in memory, for tests of routing rather than of Kafka."""

    def __init__(self) -> None:
        self.sent: list[tuple[pipeline.Record, events.Rejection]] = []

    async def send(
        self, rejected: Sequence[tuple[pipeline.Record, events.Rejection]]
    ) -> None:
        self.sent.extend(rejected)

    def reasons(self) -> list[str]:
        return [str(rejection.reason) for _, rejection in self.sent]


async def create_users(pool: asyncpg.Pool, *ids: uuid.UUID) -> None:
    await pool.execute(
        "INSERT INTO users (id) SELECT unnest($1::uuid[]) ON CONFLICT DO NOTHING",
        list(ids),
    )


async def produce(
    cfg: settings_module.Settings, values: Iterable[dict[str, Any] | bytes]
) -> None:
    await kafka.ensure_topics(cfg)
    pairs = []
    for value in values:
        key = value.get("conversation_id") if isinstance(value, dict) else None
        pairs.append((str(key).encode() if key else None, encode(value)))
    await kafka.produce(cfg, cfg.messages_topic, pairs)


async def run_until_drained(
    cfg: settings_module.Settings, timeout_s: float = 120
) -> service.Service:
    """Runs the worker until everything produced so far is applied and published."""
    async with service.started(cfg) as svc:
        await asyncio.wait_for(
            service.run(svc, until=service.drained, serve_http=False), timeout_s
        )
    return svc


async def read_topic(
    cfg: settings_module.Settings, topic: str
) -> list[aiokafka.ConsumerRecord[bytes, bytes]]:
    return await kafka.read_all(cfg, topic)


async def conversation_rows(pool: asyncpg.Pool) -> dict[uuid.UUID, dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT id, user_id, title, title_source, mode, status, context_data::text"
        " AS context_data, message_count, last_message_at, created_at, version"
        " FROM conversations"
    )
    return {row["id"]: dict(row) for row in rows}
