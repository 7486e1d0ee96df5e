"""Replays of the messages topic through real Kafka and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime
import os
import pathlib
import sys
import uuid
from typing import Any

import aiokafka
import asyncpg
import pytest

from tests import support
from worker import replay
from worker import settings as settings_module

CONVSTATS = pathlib.Path(sys.executable).parent / "convstats"


def _events(user: uuid.UUID) -> list[dict[str, Any] | bytes]:
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    return [
        support.event(first, user, seconds=0, content="Plan for the open"),
        support.event(first, user, seconds=4, type="assistant", content="Go on"),
        support.event(second, user, seconds=1, content="Risk question"),
        support.event(second, user, seconds=2, content="Follow-up"),
        support.event(third, user, seconds=3, type="system", content=""),
        b"not an event",
    ]


async def _all_rows(pool: asyncpg.Pool) -> dict[uuid.UUID, dict[str, Any]]:
    rows = await pool.fetch("SELECT * FROM conversations")
    return {row["id"]: dict(row) for row in rows}


async def _published(cfg: settings_module.Settings) -> int:
    return len(await support.read_topic(cfg, cfg.updates_topic))


async def _drained_run(
    settings: settings_module.Settings, pool: asyncpg.Pool
) -> list[dict[str, Any] | bytes]:
    user = uuid.uuid4()
    events = _events(user)
    await support.create_users(pool, user)
    await support.produce(settings, events)
    await support.run_until_drained(settings)
    return events


async def test_replay_after_a_completed_run_changes_and_publishes_nothing(
    settings: settings_module.Settings, pool: asyncpg.Pool
) -> None:
    events = await _drained_run(settings, pool)
    rows_before = await _all_rows(pool)
    published_before = await _published(settings)
    outbox_before = await pool.fetchval("SELECT count(*) FROM convstats_outbox")

    plan = await replay.plan(settings, replay.default_group(), replay.StartAt())
    summary = await replay.run(settings, plan)

    assert plan.total == len(events)
    assert summary.complete
    assert summary.events == len(events)
    assert (summary.applied, summary.duplicates, summary.dead_letters) == (0, 5, 1)
    assert summary.conversations_changed == 0
    assert await _all_rows(pool) == rows_before
    assert await _published(settings) == published_before
    assert await pool.fetchval("SELECT count(*) FROM convstats_outbox") == (
        outbox_before
    )


async def test_replay_restores_a_conversation_the_database_lost(
    settings: settings_module.Settings, pool: asyncpg.Pool
) -> None:
    events = await _drained_run(settings, pool)
    lost = uuid.UUID(events[2]["conversation_id"])  # type: ignore[index]
    before = (await _all_rows(pool))[lost]
    await pool.execute("DELETE FROM conversations WHERE id = $1", lost)
    published_before = await _published(settings)

    plan = await replay.plan(settings, "restore-" + uuid.uuid4().hex, replay.StartAt())
    summary = await replay.run(settings, plan)

    restored = (await _all_rows(pool))[lost]
    assert (summary.applied, summary.conversations_changed) == (2, 1)
    for field in ("message_count", "last_message_at", "title", "created_at"):
        assert restored[field] == before[field], field
    # Nothing else runs here, so the replay's own relay published both changes:
    # the deletion (status deleted) and the restored conversation, which continues
    # the deleted one's versions.
    assert await _published(settings) == published_before + 2
    assert restored["version"] > before["version"] + 1


async def test_replay_start_positions(
    settings: settings_module.Settings, pool: asyncpg.Pool
) -> None:
    user = uuid.uuid4()
    events = _events(user)
    await support.produce(settings, events)
    group = "positions-" + uuid.uuid4().hex
    future = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    past = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)

    beginning = await replay.plan(settings, group, replay.StartAt())
    at_ends = await replay.plan(
        settings,
        group,
        replay.StartAt(
            offsets={tp.partition: end for tp, end in beginning.ends.items()}
        ),
    )
    after_everything = await replay.plan(settings, group, replay.StartAt(time=future))
    since_2000 = await replay.plan(settings, group, replay.StartAt(time=past))
    await replay.seed(settings, at_ends)
    resumed = await replay.plan(settings, group, replay.StartAt())
    rewound = await replay.plan(settings, group, replay.StartAt(beginning=True))

    assert beginning.total == len(events)
    assert at_ends.total == 0
    assert after_everything.total == 0
    assert since_2000.total == len(events)
    assert resumed.starts == at_ends.starts
    assert rewound.total == len(events)


async def test_replay_refuses_what_would_disturb_others(
    settings: settings_module.Settings,
) -> None:
    await support.produce(settings, [b"x"])

    with pytest.raises(replay.ReplayError, match="live worker's group"):
        await replay.plan(settings, settings.consumer_group, replay.StartAt())
    with pytest.raises(replay.ReplayError, match="no partition"):
        await replay.plan(settings, "g", replay.StartAt(offsets={99: 0}))


async def test_seed_refuses_a_group_with_members(
    settings: settings_module.Settings,
) -> None:
    await support.produce(settings, [b"x"])
    group = "busy-" + uuid.uuid4().hex
    plan = await replay.plan(settings, group, replay.StartAt())
    member = aiokafka.AIOKafkaConsumer(
        settings.messages_topic,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=group,
        enable_auto_commit=False,
    )
    await member.start()
    try:
        await member.getmany(timeout_ms=2000)

        with pytest.raises(replay.ReplayError, match="active members"):
            await replay.seed(settings, plan)
    finally:
        await member.stop()


def test_parse_offsets() -> None:
    assert replay.parse_offsets("0:123, 1:456") == {0: 123, 1: 456}
    with pytest.raises(ValueError, match="partition:offset"):
        replay.parse_offsets("0=1")


async def test_replay_command_with_nothing_to_do(
    settings: settings_module.Settings,
) -> None:
    await support.produce(settings, [b"x"])
    env = {
        **os.environ,
        "CONVSTATS_DATABASE_URL": settings.database_url,
        "CONVSTATS_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "CONVSTATS_MESSAGES_TOPIC": settings.messages_topic,
        "CONVSTATS_CONSUMER_GROUP": settings.consumer_group,
    }

    process = await asyncio.create_subprocess_exec(
        str(CONVSTATS),
        "replay",
        "--from-time",
        "2999-01-01T00:00:00",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await process.communicate()

    assert process.returncode == 0
    assert " ".join(out.decode().split()).startswith("events 0 applied 0")
