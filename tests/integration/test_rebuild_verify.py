"""Rebuild from the ledger and verify against it, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import socket
import sys
import urllib.request
import uuid
from typing import Any

import asyncpg
import prometheus_client

from tests import support
from worker import pipeline, rebuild, verify
from worker import settings as settings_module

CONVSTATS = pathlib.Path(sys.executable).parent / "convstats"


async def _apply(pool: asyncpg.Pool, values: list[dict[str, Any]]) -> None:
    """Applies events through the live pipeline, without Kafka."""
    pipe = pipeline.Pipeline(pool, support.RecordingDeadLetters(), max_clock_skew_s=300)
    await pipe.process(support.records(values))


async def _two_conversations(pool: asyncpg.Pool) -> tuple[uuid.UUID, uuid.UUID]:
    user = uuid.uuid4()
    first, second = uuid.uuid4(), uuid.uuid4()
    await support.create_users(pool, user)
    await _apply(
        pool,
        [
            support.event(first, user, seconds=0, content="How do I size a position?"),
            support.event(first, user, seconds=5, type="assistant", content="Risk."),
            support.event(first, user, seconds=9, content="And the stop?"),
            support.event(second, user, seconds=3, content="Morning plan"),
        ],
    )
    return first, second


async def _convstats(database_url: str, *args: str) -> tuple[int, str]:
    env = {
        **os.environ,
        "CONVSTATS_DATABASE_URL": database_url,
        "CONVSTATS_LOG_LEVEL": "WARNING",
    }
    process = await asyncio.create_subprocess_exec(
        str(CONVSTATS),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


async def _outbox_mark(pool: asyncpg.Pool) -> int:
    mark: int = await pool.fetchval("SELECT coalesce(max(id), 0) FROM convstats_outbox")
    return mark


async def _outbox_since(pool: asyncpg.Pool, mark: int) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT conversation_id, changed_fields FROM convstats_outbox"
        " WHERE id > $1 ORDER BY id",
        mark,
    )


async def _all_rows(pool: asyncpg.Pool) -> dict[uuid.UUID, dict[str, Any]]:
    rows = await pool.fetch("SELECT * FROM conversations")
    return {row["id"]: dict(row) for row in rows}


async def test_verify_fails_on_drift_and_rebuild_repairs_and_publishes_only_that_row(
    database_url: str, pool: asyncpg.Pool
) -> None:
    tampered, untouched = await _two_conversations(pool)
    # A direct write by another service is itself a change: it gets its own version
    # and outbox row, before the rebuild starts.
    await pool.execute(
        "UPDATE conversations SET message_count = 999 WHERE id = $1", tampered
    )
    untouched_before = (await _all_rows(pool))[untouched]

    verify_code, verify_out = await _convstats(database_url, "verify")
    mark = await _outbox_mark(pool)
    rebuild_code, _ = await _convstats(database_url, "rebuild", "--all")
    published = await _outbox_since(pool, mark)
    verify_again_code, verify_again_out = await _convstats(database_url, "verify")

    assert verify_code == 1
    assert f"{tampered}  message_count: stored 999, ledger says 3" in verify_out
    assert rebuild_code == 0
    assert [(row["conversation_id"], row["changed_fields"]) for row in published] == [
        (tampered, ["message_count"])
    ]
    rows = await _all_rows(pool)
    assert rows[tampered]["message_count"] == 3
    assert rows[untouched] == untouched_before
    assert verify_again_code == 0
    assert "no drift" in verify_again_out


async def test_rebuild_restores_auto_title_and_created_at(
    settings: settings_module.Settings, pool: asyncpg.Pool
) -> None:
    conversation, _ = await _two_conversations(pool)
    expected = (await _all_rows(pool))[conversation]
    async with pool.acquire() as conn, conn.transaction():
        # Said to be automatic, so the guard leaves title_source alone: drift in an
        # auto title, as a faulty bulk tool would leave it.
        await conn.execute("SET LOCAL convstats.auto_title = 'on'")
        await conn.execute(
            "UPDATE conversations SET title = 'wrong', created_at = now(),"
            " last_message_at = NULL WHERE id = $1",
            conversation,
        )

    summary = await rebuild.run(settings, rebuild.Scope(conversation_id=conversation))

    row = (await _all_rows(pool))[conversation]
    assert summary.checked == 1
    assert summary.repaired == 1
    assert summary.complete
    for field in ("title", "title_source", "created_at", "last_message_at"):
        assert row[field] == expected[field], field
    assert row["title"] == "How do I size a position?"


async def test_rebuild_never_replaces_a_persons_title(
    settings: settings_module.Settings, pool: asyncpg.Pool
) -> None:
    conversation, _ = await _two_conversations(pool)
    await pool.execute(
        "UPDATE conversations SET title = 'Sizing', message_count = 0 WHERE id = $1",
        conversation,
    )

    await rebuild.run(settings, rebuild.Scope())

    row = (await _all_rows(pool))[conversation]
    assert row["title"] == "Sizing"
    assert row["title_source"] == "user"
    assert row["message_count"] == 3


async def test_rebuild_of_a_consistent_database_writes_nothing(
    settings: settings_module.Settings, pool: asyncpg.Pool
) -> None:
    await _two_conversations(pool)
    before = await _all_rows(pool)
    mark = await _outbox_mark(pool)

    summary = await rebuild.run(settings, rebuild.Scope(), batch_size=1)

    assert summary.checked == 2
    assert summary.repaired == 0
    assert await _all_rows(pool) == before
    assert await _outbox_since(pool, mark) == []


async def test_rebuild_by_user_resumes_after_the_given_id(
    settings: settings_module.Settings, pool: asyncpg.Pool
) -> None:
    first, second = await _two_conversations(pool)
    low, high = sorted([first, second])
    await pool.execute(
        "UPDATE conversations SET message_count = 50 WHERE id = ANY ($1::uuid[])",
        [low, high],
    )
    user = (await _all_rows(pool))[low]["user_id"]

    summary = await rebuild.run(settings, rebuild.Scope(user_id=user), after=low)

    rows = await _all_rows(pool)
    assert summary.checked == 1
    assert summary.last_id == high
    assert rows[low]["message_count"] == 50
    assert rows[high]["message_count"] != 50


async def test_rebuild_stops_between_batches_and_says_where(
    settings: settings_module.Settings, pool: asyncpg.Pool
) -> None:
    first, second = await _two_conversations(pool)
    stop = asyncio.Event()

    summary = await rebuild.run(
        settings,
        rebuild.Scope(),
        batch_size=1,
        stop=stop,
        on_batch=lambda _: stop.set(),
    )

    assert summary.checked == 1
    assert not summary.complete
    assert summary.last_id == min(first, second)
    assert f"resume with --after {summary.last_id}" in summary.lines()[-1]


async def test_watch_sets_the_drift_gauge_each_round(pool: asyncpg.Pool) -> None:
    conversation, _ = await _two_conversations(pool)
    await pool.execute(
        "UPDATE conversations SET message_count = 7 WHERE id = $1", conversation
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.3, stop.set)

    rounds = await verify.watch(pool, 0.1, stop)

    assert rounds >= 2
    assert prometheus_client.REGISTRY.get_sample_value("convstats_drift_rows") == 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _scrape(port: int, timeout_s: float = 20) -> str:
    deadline = asyncio.get_running_loop().time() + timeout_s
    url = f"http://127.0.0.1:{port}/metrics"
    while True:
        try:
            return await asyncio.to_thread(_get, url)
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body.decode()


async def test_verify_watch_serves_the_gauge_and_exits_on_sigterm(
    database_url: str, pool: asyncpg.Pool
) -> None:
    conversation, _ = await _two_conversations(pool)
    await pool.execute(
        "UPDATE conversations SET message_count = 7 WHERE id = $1", conversation
    )
    port = _free_port()
    env = {**os.environ, "CONVSTATS_DATABASE_URL": database_url}
    process = await asyncio.create_subprocess_exec(
        str(CONVSTATS),
        "verify",
        "--watch",
        "0.2",
        "--metrics-port",
        str(port),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        scraped = await _wait_for_drift(port)
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()

    assert "convstats_drift_rows 1.0" in scraped
    assert "convstats_verify_last_success_timestamp_seconds" in scraped
    assert code == 0


async def _wait_for_drift(port: int, timeout_s: float = 20) -> str:
    # The server starts before the first round; the gauge reads 0 until it ends.
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        scraped = await _scrape(port)
        if "convstats_drift_rows 1.0" in scraped:
            return scraped
        if asyncio.get_running_loop().time() > deadline:
            return scraped
        await asyncio.sleep(0.2)
