"""PostgreSQL or Kafka restarted, or sessions cut, under a running worker.

An outage of a few seconds is weather, not a reason to exit: the worker waits with
backoff and carries on where it was, and nothing is lost or counted twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import pytest

from tests import conftest, support
from tests.acceptance import expected, workers
from tests.acceptance.private_stack import PrivateStack
from worker import db, migrations
from worker import settings as settings_module

BATCH_SIZE = 50
# Retries the worker must log before the database comes back: enough to see the
# wait grow.
RETRIES_DURING_OUTAGE = 3
OUTAGE_TIMEOUT_S = 60.0
# How long the broker stays stopped while renamed conversations wait for the relay;
# its own start adds about ten seconds more.
KAFKA_OUTAGE_S = 5.0
RENAMED = 5
# The second wave trickles in over about five seconds; the broker stops one second
# into it, so the worker is consuming, applying and publishing when it goes.
TRICKLE_CHUNK = 40
TRICKLE_S = 0.25
STREAM_BEFORE_STOP_S = 1.0
BAD_EVERY = 25
# Every session of the worker is cut this often, this many times, while the
# corpus slice streams in over about as long.
CUT_EVERY_S = 0.1
CUT_ROUNDS = 40
CUT_CHUNK = 60
CUT_TRICKLE_S = 0.1
_RETRY_WAIT = re.compile(r"retrying in ([0-9.]+)s .*action=batch_retry")


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateStack]:
    """A stack of this module's own; its state stays between runs, so only the
    first run pays for initdb and formatting."""
    state_dir = tmp_path_factory.getbasetemp().parent / "convstats-restart-stack"
    services = PrivateStack(state_dir)
    services.up()
    try:
        yield services
    finally:
        services.down()


@pytest.fixture
async def private_settings(
    private: PrivateStack,
) -> AsyncIterator[settings_module.Settings]:
    """Settings naming a fresh database and topics on the private stack."""
    suffix = uuid.uuid4().hex[:10]
    name = f"convstats_test_{suffix}"
    await _admin(private, f'CREATE DATABASE "{name}"')
    try:
        url = conftest.with_database(private.database_url, name)
        conn = await asyncpg.connect(url)
        try:
            await migrations.migrate(conn)
        finally:
            await conn.close()
        yield settings_module.Settings(
            database_url=url,
            kafka_bootstrap_servers=private.kafka_bootstrap_servers,
            messages_topic=f"message-created-{suffix}",
            updates_topic=f"conversation-updated-{suffix}",
            dead_letter_topic=f"message-created-{suffix}.dlq",
            consumer_group=f"convstats-{suffix}",
            batch_size=BATCH_SIZE,
            batch_wait_ms=50,
            relay_poll_interval_s=0.2,
            http_port=0,
            shutdown_timeout_s=10,
        )
    finally:
        await _admin(private, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _admin(private: PrivateStack, sql: str) -> None:
    # A connection per statement: one held across the test would die with the
    # restart.
    admin = await asyncpg.connect(private.database_url)
    try:
        await admin.execute(sql)
    finally:
        await admin.close()


@pytest.fixture
async def private_pool(
    private_settings: settings_module.Settings,
) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(private_settings)
    try:
        yield pool
    finally:
        await pool.close()


def _waves(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    third = len(events) // 3
    return [events[:third], events[third : 2 * third], events[2 * third :]]


async def _start(cfg: settings_module.Settings, fleet: workers.Fleet) -> workers.Worker:
    worker = fleet.start(cfg)
    await workers.wait_consuming(worker)
    return worker


async def _in_thread(action: Callable[[], None]) -> None:
    # A stop or start blocks for seconds; the stream and the log checks go on.
    await asyncio.to_thread(action)


@pytest.mark.slow
async def test_postgresql_restart_is_waited_out(
    private: PrivateStack,
    private_settings: settings_module.Settings,
    private_pool: asyncpg.Pool,
    fleet: workers.Fleet,
    corpus_slice: list[dict[str, Any]],
) -> None:
    cfg, pool = private_settings, private_pool
    before, during, after = _waves(corpus_slice)
    await support.create_users(pool, *{uuid.UUID(e["user_id"]) for e in corpus_slice})
    worker = await _start(cfg, fleet)
    await support.produce(cfg, before)
    await workers.wait_drained(cfg, pool, [worker])

    await _in_thread(private.stop_postgresql)
    try:
        await support.produce(cfg, during)
        await workers.wait_until(
            lambda: _retried(worker, RETRIES_DURING_OUTAGE),
            timeout_s=OUTAGE_TIMEOUT_S,
            what=f"{RETRIES_DURING_OUTAGE} retries",
            alive=[worker],
        )
    finally:
        await _in_thread(private.start_postgresql)
    await support.produce(cfg, after)
    await workers.wait_drained(cfg, pool, [worker])
    status = await worker.stop()

    waits = _retry_waits(worker)
    assert waits[:RETRIES_DURING_OUTAGE] == sorted(waits[:RETRIES_DURING_OUTAGE])
    assert waits[0] < waits[RETRIES_DURING_OUTAGE - 1]
    assert status == 0
    found = await expected.assert_rows_exact(pool, expected.stats(corpus_slice))
    updates = await support.read_topic(cfg, cfg.updates_topic)
    expected.assert_updates_tell(expected.last_updates(updates), found)


async def _retried(worker: workers.Worker, times: int) -> bool:
    return len(_retry_waits(worker)) >= times


def _retry_waits(worker: workers.Worker) -> list[float]:
    text = worker.log.read_text(encoding="utf-8", errors="replace")
    return [float(wait) for wait in _RETRY_WAIT.findall(text)]


@pytest.mark.slow
async def test_kafka_restart_is_waited_out(
    private: PrivateStack,
    private_settings: settings_module.Settings,
    private_pool: asyncpg.Pool,
    fleet: workers.Fleet,
    corpus_slice: list[dict[str, Any]],
) -> None:
    cfg, pool = private_settings, private_pool
    before, during, after = _waves(corpus_slice)
    during_values, bad_during = _with_bad_records(during, "during")
    after_values, bad_after = _with_bad_records(after, "after")
    await support.create_users(pool, *{uuid.UUID(e["user_id"]) for e in corpus_slice})
    worker = await _start(cfg, fleet)
    await support.produce(cfg, before)
    await workers.wait_drained(cfg, pool, [worker])

    # The second wave, dead letters included, flows while the broker goes away and
    # comes back; conversations renamed meanwhile have updates waiting to go out.
    stream = asyncio.create_task(
        workers.trickle(cfg, during_values, chunk=TRICKLE_CHUNK, pause_s=TRICKLE_S)
    )
    await asyncio.sleep(STREAM_BEFORE_STOP_S)
    await _in_thread(private.stop_kafka)
    try:
        renamed = await _rename_some(pool, RENAMED)
        await asyncio.sleep(KAFKA_OUTAGE_S)
    finally:
        await _in_thread(private.start_kafka)
    await stream
    await support.produce(cfg, after_values)
    await workers.wait_drained(cfg, pool, [worker], timeout_s=180)
    status = await worker.stop()

    assert status == 0
    want = expected.stats(corpus_slice)
    for conversation_id, title in renamed.items():
        want[conversation_id] = dataclasses.replace(want[conversation_id], title=title)
    found = await expected.assert_rows_exact(pool, want)
    updates = await support.read_topic(cfg, cfg.updates_topic)
    expected.assert_updates_tell(expected.last_updates(updates), found)
    letters = await support.read_topic(cfg, cfg.dead_letter_topic)
    assert sorted(letter.value for letter in letters) == sorted(bad_during + bad_after)


def _with_bad_records(
    events: list[dict[str, Any]], tag: str
) -> tuple[list[dict[str, Any] | bytes], list[bytes]]:
    """The events with a record that is not JSON after every BAD_EVERY of them."""
    values: list[dict[str, Any] | bytes] = []
    bad: list[bytes] = []
    for i, event in enumerate(events, start=1):
        values.append(event)
        if i % BAD_EVERY == 0:
            bad.append(f"{{not json {tag} {i}".encode())
            values.append(bad[-1])
    return values, bad


async def _rename_some(pool: asyncpg.Pool, count: int) -> dict[uuid.UUID, str]:
    """Renames conversations as another service would, straight in PostgreSQL."""
    rows = await pool.fetch(
        "UPDATE conversations SET title = 'renamed ' || left(id::text, 8)"
        " WHERE id IN (SELECT id FROM conversations ORDER BY id LIMIT $1)"
        " RETURNING id, title",
        count,
    )
    assert len(rows) == count
    return {row["id"]: row["title"] for row in rows}


@pytest.mark.slow
async def test_sessions_cut_by_the_server_are_waited_out(
    private: PrivateStack,
    private_settings: settings_module.Settings,
    private_pool: asyncpg.Pool,
    fleet: workers.Fleet,
    corpus_slice: list[dict[str, Any]],
) -> None:
    cfg, pool = private_settings, private_pool
    await support.create_users(pool, *{uuid.UUID(e["user_id"]) for e in corpus_slice})
    worker = await _start(cfg, fleet)

    stream = asyncio.create_task(
        workers.trickle(cfg, corpus_slice, chunk=CUT_CHUNK, pause_s=CUT_TRICKLE_S)
    )
    cut = await _cut_sessions(private, cfg)
    await stream
    await workers.wait_drained(cfg, pool, [worker])
    status = await worker.stop()

    assert cut >= CUT_ROUNDS
    assert status == 0
    found = await expected.assert_rows_exact(pool, expected.stats(corpus_slice))
    updates = await support.read_topic(cfg, cfg.updates_topic)
    expected.assert_updates_tell(expected.last_updates(updates), found)


async def _cut_sessions(private: PrivateStack, cfg: settings_module.Settings) -> int:
    """Terminates every session on the test's database, as an operator might."""
    database = cfg.database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(private.database_url)
    cut = 0
    try:
        for _ in range(CUT_ROUNDS):
            cut += await admin.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))"
                " FROM pg_stat_activity WHERE datname = $1",
                database,
            )
            await asyncio.sleep(CUT_EVERY_S)
    finally:
        await admin.close()
    return cut
