"""Workers killed with SIGKILL at any moment, and errors nobody planned for.

A crash may come between any two steps: after the database committed a batch but
before Kafka has its offsets, after the broker acknowledged an update but before
the outbox row is marked. Whatever the moment, a restarted worker must end with
the exact statistics, and the updates topic must end on each conversation's final
state.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
import uuid
from typing import Any

import aiokafka
import asyncpg
import pytest

from tests import support
from tests.acceptance import expected, workers
from worker import faults
from worker import settings as settings_module

RANDOM_KILLS = 5
# Small batches make many windows to die in; small relay rounds make many sends.
BATCH_SIZE = 50
RELAY_BATCH_SIZE = 20
# How often progress is sampled while waiting for the moment to kill.
SAMPLE_S = 0.005
# A worker killed with SIGKILL stays in its group until its session times out
# (10 s in aiokafka); the next one gets partitions only then.
RESTART_TIMEOUT_S = 60.0
SIGKILLED = -9
# Enough for a handful of batches before and after the failing one.
UNEXPECTED_ERROR_EVENTS = 600


def _crashable(cfg: settings_module.Settings) -> settings_module.Settings:
    return cfg.model_copy(
        update={"batch_size": BATCH_SIZE, "relay_batch_size": RELAY_BATCH_SIZE}
    )


async def _owners_exist(pool: asyncpg.Pool, events: list[dict[str, Any]]) -> None:
    await support.create_users(pool, *{uuid.UUID(e["user_id"]) for e in events})


@pytest.mark.slow
async def test_kill_9_at_random_and_in_each_commit_window_ends_exact(
    settings: settings_module.Settings,
    pool: asyncpg.Pool,
    fleet: workers.Fleet,
    corpus_slice: list[dict[str, Any]],
) -> None:
    cfg = _crashable(settings)
    seed = time.time_ns()
    print(f"kill moments drawn with seed {seed}")
    await _owners_exist(pool, corpus_slice)
    await support.produce(cfg, corpus_slice)

    applied_not_committed = await _die_after_apply(cfg, pool, fleet)
    sent_not_marked, topic_at_kill = await _die_after_publish(cfg, pool, fleet)
    kills = await _kill_at_random(
        cfg, pool, fleet, random.Random(seed), total=len(corpus_slice)
    )
    last = fleet.start(cfg)
    await workers.wait_consuming(last)
    await workers.wait_drained(cfg, pool, [last], timeout_s=RESTART_TIMEOUT_S * 2)
    status = await last.stop()

    assert applied_not_committed > 0
    assert sent_not_marked
    assert kills == [SIGKILLED] * RANDOM_KILLS
    assert status == 0
    found = await expected.assert_rows_exact(pool, expected.stats(corpus_slice))
    updates = await support.read_topic(cfg, cfg.updates_topic)
    expected.assert_updates_tell(expected.last_updates(updates), found)
    expected.assert_updates_tell(expected.highest_versions(updates), found)
    _assert_sent_again(sent_not_marked, topic_at_kill, updates)


async def _die_after_apply(
    cfg: settings_module.Settings, pool: asyncpg.Pool, fleet: workers.Fleet
) -> int:
    """Runs until the third batch is in PostgreSQL, its offsets not yet in Kafka."""
    worker = fleet.start(cfg, fault=f"{faults.AFTER_APPLY}:3")
    assert await worker.exited(RESTART_TIMEOUT_S) == SIGKILLED
    return await workers.applied_count(pool) - await workers.committed_count(cfg)


async def _die_after_publish(
    cfg: settings_module.Settings, pool: asyncpg.Pool, fleet: workers.Fleet
) -> tuple[dict[uuid.UUID, int], set[tuple[int, int]]]:
    """Runs until a relay round is acknowledged by Kafka but not marked published.

    Returns the versions sent but still unpublished in the outbox, by conversation,
    and the (partition, offset) of every update on the topic at that moment.
    """
    worker = fleet.start(cfg, fault=f"{faults.AFTER_PUBLISH}:2")
    assert await worker.exited(RESTART_TIMEOUT_S) == SIGKILLED

    on_topic = await support.read_topic(cfg, cfg.updates_topic)
    unmarked = await pool.fetch(
        "SELECT conversation_id, version, event_id FROM convstats_outbox"
        " WHERE published_at IS NULL"
    )
    sent_ids = {expected.body(record)["event_id"] for record in on_topic}
    sent_not_marked = {
        row["conversation_id"]: row["version"]
        for row in unmarked
        if str(row["event_id"]) in sent_ids
    }
    return sent_not_marked, {(r.partition, r.offset) for r in on_topic}


async def _kill_at_random(
    cfg: settings_module.Settings,
    pool: asyncpg.Pool,
    fleet: workers.Fleet,
    rng: random.Random,
    total: int,
) -> list[int]:
    """Kills one worker after another at random points of the slice's progress."""
    start = await workers.applied_count(pool)
    moments = sorted(rng.sample(range(start + 1, total), RANDOM_KILLS))
    print(f"killing at {moments} of {total} messages applied")
    statuses = []
    for moment in moments:
        worker = fleet.start(cfg)
        await workers.wait_until(
            functools.partial(_reached, pool, moment),
            timeout_s=RESTART_TIMEOUT_S,
            what=f"{moment} messages applied",
            alive=[worker],
            poll_s=SAMPLE_S,
        )
        # A few milliseconds more land the kill anywhere in the batch that follows.
        await asyncio.sleep(rng.uniform(0, 0.02))
        statuses.append(worker.kill())
    return statuses


async def _reached(pool: asyncpg.Pool, applied: int) -> bool:
    return await workers.applied_count(pool) >= applied


def _assert_sent_again(
    sent_not_marked: dict[uuid.UUID, int],
    topic_at_kill: set[tuple[int, int]],
    updates: list[aiokafka.ConsumerRecord[bytes, bytes]],
) -> None:
    """Each update sent but not marked went out again, or a newer one did."""
    resent: dict[uuid.UUID, int] = {}
    for record in updates:
        if (record.partition, record.offset) in topic_at_kill:
            continue
        body = expected.body(record)
        conversation_id = uuid.UUID(body["conversation_id"])
        resent[conversation_id] = max(resent.get(conversation_id, 0), body["version"])
    missing = {
        conversation_id: version
        for conversation_id, version in sent_not_marked.items()
        if resent.get(conversation_id, 0) < version
    }
    assert not missing, f"never sent again after the relay died: {missing}"


async def test_an_unexpected_error_exits_and_a_restart_applies_each_event_once(
    settings: settings_module.Settings,
    pool: asyncpg.Pool,
    fleet: workers.Fleet,
    corpus_slice: list[dict[str, Any]],
) -> None:
    cfg = _crashable(settings)
    events = corpus_slice[:UNEXPECTED_ERROR_EVENTS]
    await _owners_exist(pool, events)
    await support.produce(cfg, events)

    failing = fleet.start(cfg, fault=f"{faults.RAISE_IN_APPLY}:3")
    failed_with = await failing.exited(RESTART_TIMEOUT_S)
    redelivered = await workers.applied_count(pool) - await workers.committed_count(cfg)
    restarted = fleet.start(cfg)
    await workers.wait_consuming(restarted)
    await workers.wait_drained(cfg, pool, [restarted])
    status = await restarted.stop()

    assert failed_with == 1
    assert failing.logged("worker_failed")
    # The failing batch reached the database but not Kafka: it comes back.
    assert redelivered > 0
    assert status == 0
    found = await expected.assert_rows_exact(pool, expected.stats(events))
    updates = await support.read_topic(cfg, cfg.updates_topic)
    expected.assert_updates_tell(expected.last_updates(updates), found)
