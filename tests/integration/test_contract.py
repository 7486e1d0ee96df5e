"""Each rule of the event contract, applied through the worker's pipeline.

The database is real; dead letters are recorded in memory, because these tests are
about which events are rejected and why, not about Kafka (the end-to-end tests
cover the dead-letter topic itself).
"""

from __future__ import annotations

import datetime
import json
import uuid
from typing import Any

import asyncpg
import pytest

from tests import support
from worker import parking, pipeline
from worker import settings as settings_module

USER = uuid.UUID("00000000-0000-4000-8000-000000000001")
OTHER_USER = uuid.UUID("00000000-0000-4000-8000-000000000002")


@pytest.fixture
async def dead_letters() -> support.RecordingDeadLetters:
    return support.RecordingDeadLetters()


@pytest.fixture
async def pipe(
    pool: asyncpg.Pool, dead_letters: support.RecordingDeadLetters
) -> pipeline.Pipeline:
    await support.create_users(pool, USER, OTHER_USER)
    return pipeline.Pipeline(pool, dead_letters, max_clock_skew_s=300)


async def _apply(pipe: pipeline.Pipeline, *values: dict[str, Any] | bytes) -> None:
    await pipe.process(support.records(values))


async def _row(pool: asyncpg.Pool, conversation_id: uuid.UUID) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT *, context_data::text AS context FROM conversations WHERE id = $1",
        conversation_id,
    )
    assert row is not None
    return row


async def _outbox_count(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM convstats_outbox")
    return count


async def test_message_count_counts_distinct_messages_of_every_type(
    pipe: pipeline.Pipeline, pool: asyncpg.Pool
) -> None:
    c = uuid.uuid4()
    first = support.event(c, USER, seconds=1)

    await _apply(
        pipe,
        first,
        support.event(c, USER, seconds=2, type="assistant"),
        support.event(c, USER, seconds=3, type="system"),
        first,
    )
    await _apply(pipe, first)

    assert (await _row(pool, c))["message_count"] == 3


async def test_last_message_at_is_the_latest_and_never_moves_back(
    pipe: pipeline.Pipeline, pool: asyncpg.Pool
) -> None:
    c = uuid.uuid4()

    await _apply(pipe, support.event(c, USER, seconds=100))
    await _apply(pipe, support.event(c, USER, seconds=5))

    row = await _row(pool, c)
    assert row["last_message_at"] == support.T0 + datetime.timedelta(seconds=100)


async def test_a_new_conversation_is_created_from_the_event(
    pipe: pipeline.Pipeline, pool: asyncpg.Pool
) -> None:
    c = uuid.uuid4()
    context = {"session_type": "live_trading", "trading_instruments": ["ES", "NQ"]}

    await _apply(pipe, support.event(c, USER, mode="psychology", context_data=context))

    row = await _row(pool, c)
    assert row["user_id"] == USER
    assert row["mode"] == "psychology"
    assert json.loads(row["context"]) == context
    assert row["status"] == "active"
    assert row["created_at"] == support.T0


async def test_mode_and_context_default_when_absent(
    pipe: pipeline.Pipeline, pool: asyncpg.Pool
) -> None:
    c = uuid.uuid4()

    await _apply(pipe, support.event(c, USER))

    row = await _row(pool, c)
    assert row["mode"] == "analysis"
    assert json.loads(row["context"]) == {}


async def test_created_at_moves_back_to_a_late_earlier_message(
    pipe: pipeline.Pipeline, pool: asyncpg.Pool
) -> None:
    c = uuid.uuid4()

    await _apply(pipe, support.event(c, USER, seconds=60))
    await _apply(pipe, support.event(c, USER, seconds=-3600))

    row = await _row(pool, c)
    assert row["created_at"] == support.T0 - datetime.timedelta(hours=1)


async def test_another_users_message_changes_nothing(
    pipe: pipeline.Pipeline,
    pool: asyncpg.Pool,
    dead_letters: support.RecordingDeadLetters,
) -> None:
    c = uuid.uuid4()
    await _apply(pipe, support.event(c, USER, content="mine"))
    before = await _row(pool, c)

    await _apply(pipe, support.event(c, OTHER_USER, seconds=-10, content="theirs"))

    assert await _row(pool, c) == before
    assert dead_letters.reasons() == ["foreign_user"]


async def test_only_user_messages_title_the_conversation(
    pipe: pipeline.Pipeline, pool: asyncpg.Pool
) -> None:
    c = uuid.uuid4()

    await _apply(
        pipe,
        support.event(c, USER, seconds=0, type="system", content="Session started"),
        support.event(c, USER, seconds=1, type="assistant", content="Hi trader"),
        support.event(c, USER, seconds=2, content="Review my NQ short"),
    )

    assert (await _row(pool, c))["title"] == "Review my NQ short"


async def test_title_is_normalised(pipe: pipeline.Pipeline, pool: asyncpg.Pool) -> None:
    c = uuid.uuid4()

    await _apply(
        pipe, support.event(c, USER, content="\n Stop\u0000 loss\t\u3000hit \n")
    )

    assert (await _row(pool, c))["title"] == "Stop loss hit"


async def test_blank_candidates_are_skipped(
    pipe: pipeline.Pipeline, pool: asyncpg.Pool
) -> None:
    c = uuid.uuid4()

    await _apply(
        pipe,
        support.event(c, USER, seconds=0, content=" \u00a0\n"),
        support.event(c, USER, seconds=1, content="\x00\x07"),
        support.event(c, USER, seconds=2, content="Real question"),
    )

    assert (await _row(pool, c))["title"] == "Real question"


async def test_the_earliest_candidate_titles_in_any_arrival_order(
    pipe: pipeline.Pipeline, pool: asyncpg.Pool
) -> None:
    c = uuid.uuid4()

    await _apply(pipe, support.event(c, USER, seconds=30, content="later"))
    await _apply(pipe, support.event(c, USER, seconds=10, content="earliest"))
    await _apply(pipe, support.event(c, USER, seconds=20, content="middle"))

    assert (await _row(pool, c))["title"] == "earliest"


async def test_equal_times_are_ordered_by_message_id(
    pipe: pipeline.Pipeline, pool: asyncpg.Pool
) -> None:
    c = uuid.uuid4()
    low = uuid.UUID("00000000-0000-4000-8000-00000000000a")
    high = uuid.UUID("ffffffff-0000-4000-8000-00000000000a")

    await _apply(pipe, support.event(c, USER, message_id=high, content="high id"))
    await _apply(pipe, support.event(c, USER, message_id=low, content="low id"))

    assert (await _row(pool, c))["title"] == "low id"


async def test_long_title_is_cut_at_fifty_graphemes(
    pipe: pipeline.Pipeline, pool: asyncpg.Pool
) -> None:
    c = uuid.uuid4()
    flag = "\U0001f1fa\U0001f1f8"

    await _apply(pipe, support.event(c, USER, content=flag * 80))

    assert (await _row(pool, c))["title"] == flag * 50 + "..."


async def test_a_persons_title_is_never_replaced(
    pipe: pipeline.Pipeline, pool: asyncpg.Pool
) -> None:
    c = uuid.uuid4()
    await _apply(pipe, support.event(c, USER, seconds=10, content="auto"))
    await pool.execute("UPDATE conversations SET title = 'My ES plan' WHERE id = $1", c)

    await _apply(pipe, support.event(c, USER, seconds=0, content="earlier"))

    row = await _row(pool, c)
    assert (row["title"], row["title_source"]) == ("My ES plan", "user")
    assert row["message_count"] == 2


async def test_each_effective_change_bumps_version_once_and_is_published(
    pipe: pipeline.Pipeline, pool: asyncpg.Pool
) -> None:
    c = uuid.uuid4()
    await _apply(pipe, support.event(c, USER, seconds=0))
    version = (await _row(pool, c))["version"]
    published = await _outbox_count(pool)

    await _apply(
        pipe, support.event(c, USER, seconds=1), support.event(c, USER, seconds=2)
    )

    assert (await _row(pool, c))["version"] == version + 1
    assert await _outbox_count(pool) == published + 1


async def test_a_redelivery_bumps_nothing_and_publishes_nothing(
    pipe: pipeline.Pipeline, pool: asyncpg.Pool
) -> None:
    c = uuid.uuid4()
    events = [support.event(c, USER, seconds=i) for i in range(5)]
    await _apply(pipe, *events)
    before = await _row(pool, c)
    published = await _outbox_count(pool)

    await _apply(pipe, *reversed(events))

    assert await _row(pool, c) == before
    assert await _outbox_count(pool) == published


async def test_same_id_with_other_content_is_a_conflict_and_the_first_wins(
    pipe: pipeline.Pipeline,
    pool: asyncpg.Pool,
    dead_letters: support.RecordingDeadLetters,
) -> None:
    c = uuid.uuid4()
    message_id = uuid.uuid4()
    first = support.event(c, USER, message_id=message_id, content="first")

    await _apply(pipe, first, {**first, "content": "second"})
    await _apply(pipe, {**first, "content": "third"})
    await _apply(pipe, {**first, "conversation_id": str(uuid.uuid4())})

    assert (await _row(pool, c))["title"] == "first"
    assert dead_letters.reasons() == ["message_id_conflict"] * 3


async def test_a_deleted_conversation_takes_no_messages(
    pipe: pipeline.Pipeline,
    pool: asyncpg.Pool,
    dead_letters: support.RecordingDeadLetters,
) -> None:
    c = uuid.uuid4()
    await _apply(pipe, support.event(c, USER))
    await pool.execute("UPDATE conversations SET status = 'deleted' WHERE id = $1", c)
    before = await _row(pool, c)

    await _apply(pipe, support.event(c, USER, seconds=5))

    assert await _row(pool, c) == before
    assert dead_letters.reasons() == ["conversation_deleted"]


async def test_one_failing_event_does_not_fail_its_batch_mates(
    pipe: pipeline.Pipeline,
    pool: asyncpg.Pool,
    dead_letters: support.RecordingDeadLetters,
) -> None:
    # jsonb cannot hold U+0000, so PostgreSQL refuses this one event's context.
    poisoned = support.event(uuid.uuid4(), USER, context_data={"note": "a\u0000b"})
    healthy = [support.event(uuid.uuid4(), USER, seconds=i) for i in range(7)]

    await _apply(pipe, *healthy[:3], poisoned, *healthy[3:])

    count = await pool.fetchval("SELECT count(*) FROM conversations")
    assert count == len(healthy)
    assert dead_letters.reasons() == ["database_error"]
    assert dead_letters.sent[0][0].value == support.encode(poisoned)


async def test_unknown_user_waits_and_is_applied_once_the_user_appears(
    pipe: pipeline.Pipeline,
    pool: asyncpg.Pool,
    settings: settings_module.Settings,
    dead_letters: support.RecordingDeadLetters,
) -> None:
    newcomer, c = uuid.uuid4(), uuid.uuid4()
    other = uuid.uuid4()
    tally = await pipe.process(
        support.records([support.event(c, newcomer), support.event(other, USER)])
    )
    retry = parking.Parking(settings, pool, pipe)

    await support.create_users(pool, newcomer)
    await pool.execute("UPDATE convstats_parked_messages SET next_attempt_at = now()")
    retried = await retry.retry_due()

    assert (tally.parked, tally.applied) == (1, 1)
    assert retried.applied == 1
    assert (await _row(pool, c))["message_count"] == 1
    assert await pool.fetchval("SELECT count(*) FROM convstats_parked_messages") == 0
    assert dead_letters.sent == []


async def test_unknown_user_is_dead_lettered_after_the_wait(
    pipe: pipeline.Pipeline,
    pool: asyncpg.Pool,
    settings: settings_module.Settings,
    dead_letters: support.RecordingDeadLetters,
) -> None:
    value = support.event(uuid.uuid4(), uuid.uuid4())
    await pipe.process(support.records([value]))
    impatient = parking.Parking(
        settings.model_copy(update={"unknown_user_retry_s": 0}), pool, pipe
    )

    await impatient.retry_due()

    assert dead_letters.reasons() == ["unknown_user"]
    assert dead_letters.sent[0][0].value == support.encode(value)
    assert await pool.fetchval("SELECT count(*) FROM convstats_parked_messages") == 0


async def test_a_parked_message_absorbs_its_redelivery_and_refuses_an_impostor(
    pipe: pipeline.Pipeline,
    pool: asyncpg.Pool,
    dead_letters: support.RecordingDeadLetters,
) -> None:
    value = support.event(uuid.uuid4(), uuid.uuid4(), content="waiting")
    await pipe.process(support.records([value]))

    await pipe.process(support.records([value]))
    await pipe.process(support.records([{**value, "content": "impostor"}]))

    assert await pool.fetchval("SELECT count(*) FROM convstats_parked_messages") == 1
    assert dead_letters.reasons() == ["message_id_conflict"]


async def test_a_parked_record_keeps_odd_headers_and_is_applied_later(
    pipe: pipeline.Pipeline,
    pool: asyncpg.Pool,
    settings: settings_module.Settings,
    dead_letters: support.RecordingDeadLetters,
) -> None:
    newcomer, c = uuid.uuid4(), uuid.uuid4()
    headers = (("trace", None), ("na\x00me", b"\x00\xff"))
    record = pipeline.Record(
        topic="t",
        partition=0,
        offset=0,
        key=None,
        value=support.encode(support.event(c, newcomer)),
        headers=headers,
    )
    tally = await pipe.process([record])
    retry = parking.Parking(settings, pool, pipe)
    parked = await pool.fetch("SELECT message_id FROM convstats_parked_messages")
    rows = await pool.fetch(
        "SELECT source_topic, source_partition, source_offset, record_key,"
        " record_value, record_headers::text AS record_headers"
        " FROM convstats_parked_messages"
    )

    await support.create_users(pool, newcomer)
    await pool.execute("UPDATE convstats_parked_messages SET next_attempt_at = now()")
    await retry.retry_due()

    assert tally.parked == 1 and len(parked) == 1
    assert parking._record(rows[0]).headers == headers
    assert (await _row(pool, c))["message_count"] == 1
    assert dead_letters.sent == []


async def test_a_hard_delete_is_published_and_a_comeback_continues_its_versions(
    pipe: pipeline.Pipeline, pool: asyncpg.Pool
) -> None:
    c = uuid.uuid4()
    first = support.event(c, USER, seconds=0)
    await _apply(pipe, first, support.event(c, USER, seconds=1))
    before = (await _row(pool, c))["version"]

    await pool.execute("DELETE FROM conversations WHERE id = $1", c)
    await _apply(pipe, first)

    published = await pool.fetch(
        "SELECT version, event_id, payload->>'status' AS status FROM convstats_outbox"
        " WHERE conversation_id = $1 ORDER BY id",
        c,
    )
    versions = [row["version"] for row in published]
    assert published[-2]["status"] == "deleted"
    assert published[-2]["version"] == before + 1
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert len({row["event_id"] for row in published}) == len(published)
    assert (await _row(pool, c))["message_count"] == 1
