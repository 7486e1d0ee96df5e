"""Bad input reaches the dead-letter topic whole, and the stream moves on."""

from __future__ import annotations

import uuid

import aiokafka
import asyncpg

from tests import support
from worker import dlq, kafka
from worker import settings as settings_module


async def test_bad_records_land_in_the_dead_letter_topic_with_their_bytes(
    settings: settings_module.Settings, pool: asyncpg.Pool
) -> None:
    owner, stranger = uuid.uuid4(), uuid.uuid4()
    await support.create_users(pool, owner, stranger)
    c = uuid.uuid4()
    good = [support.event(c, owner, seconds=i) for i in range(3)]
    bad = {
        b"\xc3\x28 not utf-8": "not_utf8",
        b"{oops": "not_json",
        b"[]": "not_object",
        support.encode({**good[0], "message_id": "nope"}): "invalid_uuid",
        support.encode(support.event(c, stranger, seconds=9)): "foreign_user",
    }
    await kafka.ensure_topics(settings)
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for value in [*map(support.encode, good), *bad]:
            await producer.send_and_wait(
                settings.messages_topic,
                value=value,
                key=str(c).encode(),
                headers=[("trace-id", b"abc-123")],
            )
    finally:
        await producer.stop()

    svc = await support.run_until_drained(settings)

    letters = await support.read_topic(settings, settings.dead_letter_topic)
    assert svc.consumer.tally.applied == len(good)
    assert {r.value: _header(r, "convstats.reason") for r in letters} == {
        value: reason.encode() for value, reason in bad.items()
    }
    for record in letters:
        assert record.key == str(c).encode()
        assert _header(record, "trace-id") == b"abc-123"
        assert _header(record, "convstats.source_topic") == (
            settings.messages_topic.encode()
        )
        assert int(_header(record, "convstats.source_offset")) >= 0
        assert _header(record, "convstats.detail")
        assert _header(record, "convstats.dead_lettered_at")
    row = await pool.fetchrow("SELECT message_count FROM conversations WHERE id=$1", c)
    assert row is not None and row["message_count"] == len(good)
    assert (
        await kafka.group_lag(
            settings, settings.consumer_group, settings.messages_topic
        )
        == 0
    )


def _header(record: aiokafka.ConsumerRecord[bytes, bytes], name: str) -> bytes:
    values = [value for key, value in record.headers if key == name]
    assert len(values) == 1, (name, record.headers)
    return values[0]


async def test_dlq_tools_list_show_and_redrive_after_a_fix(
    settings: settings_module.Settings, pool: asyncpg.Pool
) -> None:
    late_user, c = uuid.uuid4(), uuid.uuid4()
    value = support.event(c, late_user)
    await support.produce(settings, [value, b"garbage"])
    impatient = settings.model_copy(update={"unknown_user_retry_s": 0})
    await support.run_until_drained(impatient)
    letters = await dlq.read(settings)
    assert sorted(letter.meta("reason") for letter in letters) == [
        "not_json",
        "unknown_user",
    ]

    await support.create_users(pool, late_user)
    chosen = dlq.select(letters, reason="unknown_user")
    sent = await dlq.redrive(settings, chosen)
    await support.run_until_drained(settings)

    assert sent == 1
    assert chosen[0].value == support.encode(value)
    count = await pool.fetchval(
        "SELECT message_count FROM conversations WHERE id=$1", c
    )
    assert count == 1
    assert len(await dlq.read(settings)) == 2


def test_forged_worker_headers_never_pass_for_the_workers_own() -> None:
    letter = dlq.DeadLetter(
        partition=0,
        offset=7,
        key=None,
        value=b"FORGED",
        headers=(
            ("convstats.reason", b"unknown_user"),
            ("convstats.source_topic", b"conversation-updated"),
            ("convstats.reason", b"not_json"),
            ("convstats.source_topic", b"message-created"),
        ),
    )

    assert letter.meta("reason") == "not_json"
    assert letter.meta("source_topic") == "message-created"
    assert letter.original_headers == []
