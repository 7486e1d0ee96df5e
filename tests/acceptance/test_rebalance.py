"""Workers joining and leaving one consumer group while the stream flows.

A rebalance moves partitions between members; the old owner's batch may still be
in flight when the new owner reads the same records. Both then apply the same
conversations at once, and the conversations are locked in id order so that they
queue instead of deadlocking. The counts stay exact either way.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from tests import support
from tests.acceptance import expected, workers
from worker import kafka
from worker import settings as settings_module

BATCH_SIZE = 50
# The slice trickles in over about twenty seconds, long enough for a member to
# join, take partitions, work on them and leave while records keep coming.
CHUNK = 60
PAUSE_S = 0.5
JOIN_AFTER_S = 3.0
# Batches the third worker applies before it leaves.
THIRD_BATCHES = 5


@pytest.mark.slow
async def test_a_third_worker_joins_and_leaves_mid_stream(
    settings: settings_module.Settings,
    pool: asyncpg.Pool,
    fleet: workers.Fleet,
    corpus_slice: list[dict[str, Any]],
) -> None:
    cfg = settings.model_copy(update={"batch_size": BATCH_SIZE})
    await support.create_users(pool, *{uuid.UUID(e["user_id"]) for e in corpus_slice})
    await kafka.ensure_topics(cfg)
    first, second = fleet.start(cfg), fleet.start(cfg)
    for worker in (first, second):
        await workers.wait_consuming(worker)

    stream = asyncio.create_task(
        workers.trickle(cfg, corpus_slice, chunk=CHUNK, pause_s=PAUSE_S)
    )
    await asyncio.sleep(JOIN_AFTER_S)
    third = fleet.start(cfg, log_level="DEBUG")
    await workers.wait_until(
        lambda: _worked(third, THIRD_BATCHES),
        timeout_s=60,
        what=f"{THIRD_BATCHES} batches on the third worker",
        alive=[first, second, third],
    )
    third_status = await third.stop()
    left_mid_stream = not stream.done()
    await stream
    await workers.wait_drained(cfg, pool, [first, second])
    statuses = [await first.stop(), await second.stop()]

    assert left_mid_stream
    assert third_status == 0
    assert statuses == [0, 0]
    for worker in (first, second, third):
        # A deadlock would surface as a retried batch (SQLSTATE 40P01).
        assert not worker.logged("batch_retry")
        assert not worker.logged("worker_failed")
    found = await expected.assert_rows_exact(pool, expected.stats(corpus_slice))
    updates = await support.read_topic(cfg, cfg.updates_topic)
    expected.assert_updates_tell(expected.last_updates(updates), found)


async def _worked(worker: workers.Worker, batches: int) -> bool:
    text = worker.log.read_text(encoding="utf-8", errors="replace")
    return text.count("action=batch_done") >= batches
