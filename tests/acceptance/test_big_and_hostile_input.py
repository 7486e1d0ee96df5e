"""Input as the real world sends it: huge, strange, wrong, and all at once.

Every test goes through real Kafka and PostgreSQL with a worker process; the
expected titles and instants are written out by hand, not recomputed by the code
under test.
"""

from __future__ import annotations

import base64
import collections
import datetime
import random
import urllib.parse
import uuid
from typing import Any

import aiokafka
import asyncpg

from tests import support
from tests.acceptance import expected, workers
from worker import kafka
from worker import settings as settings_module

MEGABYTE = 1024 * 1024
BIG_BYTES = 5 * MEGABYTE
FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466"  # 7 code points
FRANCE = "\U0001f1eb\U0001f1f7"  # a flag: two regional indicators, one character
ZALGO = "a" + "\u0300" * 20  # one character of 21 code points
# The flood: conversations of a few users, each good event followed by a bad record.
FLOOD_OWNERS = 8
FLOOD_CONVERSATIONS = 40
FLOOD_MESSAGES = 15

# Content -> the title it must give. Control characters go, whitespace runs of any
# kind become one space, and the cut counts user-perceived characters within the
# column's 255 code points.
HOSTILE_TITLES: dict[str, str | None] = {
    "\x00\x01Hello\x1b[0m\x00 world\x7f": "Hello[0m world",
    "  שלום\u00a0עולם\n\nمرحبا\u2028بالعالم\t ": "שלום עולם مرحبا بالعالم",
    "e\u0301" * 60: "e\u0301" * 50 + "...",
    FRANCE * 51: FRANCE * 50 + "...",
    "\U0001f1ef\U0001f1f5" + "x" * 49: "\U0001f1ef\U0001f1f5" + "x" * 49,
    "a" * 49 + " " + "b" * 10: "a" * 49 + "...",
    # Fifty families would be 350 code points: as many as fit with the dots.
    FAMILY * 60: FAMILY * 36 + "...",
    ZALGO * 60: ZALGO * 12 + "...",
    "\u0000\u0007\t\u3000\u2028 ": None,
}


async def test_records_of_several_megabytes_are_applied_or_dead_lettered_whole(
    settings: settings_module.Settings, pool: asyncpg.Pool, fleet: workers.Fleet
) -> None:
    owner, conversation_id = uuid.uuid4(), uuid.uuid4()
    await support.create_users(pool, owner)
    # Random text, so that compression cannot shrink it below the size limits.
    text = base64.b64encode(random.Random(1).randbytes(BIG_BYTES * 3 // 4)).decode()
    big = support.encode(support.event(conversation_id, owner, content=text))
    invalid = support.encode(
        support.event(uuid.uuid4(), owner, content=text, type="robot")
    )
    await support.produce(settings, [big, invalid])

    await workers.run_to_drain(fleet, settings, pool)

    rows = await expected.rows(pool)
    letters = await support.read_topic(settings, settings.dead_letter_topic)
    assert len(big) > BIG_BYTES and len(invalid) > BIG_BYTES
    assert set(rows) == {conversation_id}
    assert rows[conversation_id]["message_count"] == 1
    assert rows[conversation_id]["title"] == text[:50] + "..."
    assert [letter.value for letter in letters] == [invalid]
    assert _header(letters[0], "convstats.reason") == b"invalid_message_type"


async def test_hostile_text_titles_as_the_rules_say(
    settings: settings_module.Settings, pool: asyncpg.Pool, fleet: workers.Fleet
) -> None:
    owner = uuid.uuid4()
    await support.create_users(pool, owner)
    conversations = {uuid.uuid4(): content for content in HOSTILE_TITLES}
    events = []
    for conversation_id, content in conversations.items():
        # An earlier assistant message must never title the conversation.
        events.append(support.event(conversation_id, owner, type="assistant"))
        events.append(support.event(conversation_id, owner, seconds=1, content=content))
    await support.produce(settings, events)

    await workers.run_to_drain(fleet, settings, pool)

    rows = await expected.rows(pool)
    updates = expected.last_updates(
        await support.read_topic(settings, settings.updates_topic)
    )
    titles = {
        content: (rows[conversation_id]["title"], updates[conversation_id]["title"])
        for conversation_id, content in conversations.items()
    }
    assert titles == {content: (want, want) for content, want in HOSTILE_TITLES.items()}
    assert {row["message_count"] for row in rows.values()} == {2}


async def test_instants_do_not_depend_on_offsets_or_the_server_time_zone(
    settings: settings_module.Settings, pool: asyncpg.Pool, fleet: workers.Fleet
) -> None:
    owner, conversation_id = uuid.uuid4(), uuid.uuid4()
    await support.create_users(pool, owner)
    database = urllib.parse.urlsplit(settings.database_url).path.lstrip("/")
    await pool.execute(f"ALTER DATABASE \"{database}\" SET timezone = 'Asia/Kolkata'")
    # By text the earliest is 00:30Z and the latest the one at +14:00; by instant
    # they are the leap-day message and the one at 23:30 in California. The title
    # comes from the earliest user message by instant, not by text.
    stamps = {
        "assistant": [
            "2024-03-01T05:29:59.999999+05:30",  # 2024-02-29T23:59:59.999999Z
            "2024-03-01T23:30:00-08:00",  # 2024-03-02T07:30:00Z
        ],
        "user": [
            "2024-03-01T09:00:00+09:00",  # 2024-03-01T00:00:00Z, the title
            "2024-03-01T00:30:00Z",
            "2024-03-02T05:00:00.123456+00:00",
            "2024-03-02T19:15:00+14:00",  # 2024-03-02T05:15:00Z
        ],
    }
    events = [
        {
            **support.event(conversation_id, owner, type=kind, content=stamp),
            "created_at": stamp,
        }
        for kind, kind_stamps in stamps.items()
        for stamp in kind_stamps
    ]
    await support.produce(settings, events)

    await workers.run_to_drain(fleet, settings, pool)

    stored = await _as_the_server_renders(settings.database_url, conversation_id)
    row = (await expected.rows(pool))[conversation_id]
    update = expected.last_updates(
        await support.read_topic(settings, settings.updates_topic)
    )[conversation_id]
    last = datetime.datetime(2024, 3, 2, 7, 30, tzinfo=datetime.UTC)
    first = datetime.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=datetime.UTC)
    assert stored["timezone"] == "Asia/Kolkata"
    assert stored["last_message_at"] == "2024-03-02 13:00:00+05:30"
    assert expected.instant(stored["created_at"]) <= first
    assert (row["last_message_at"], row["message_count"]) == (last, len(events))
    assert row["created_at"] <= first
    assert row["title"] == "2024-03-01T09:00:00+09:00"
    assert update["last_message_at"] == "2024-03-02T07:30:00.000000Z"
    assert expected.instant(update["created_at"]) == row["created_at"]


async def _as_the_server_renders(url: str, conversation_id: uuid.UUID) -> Any:
    # A session without the worker's own SET TIME ZONE: the database default.
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchrow(
            "SELECT current_setting('TimeZone') AS timezone,"
            " last_message_at::text, created_at::text"
            " FROM conversations WHERE id = $1",
            conversation_id,
        )
    finally:
        await conn.close()


# Bad records of every kind the contract rejects, each with the reason it must
# carry in the dead-letter topic. Each takes a valid event of the same conversation.
def _bad_records(good: dict[str, Any]) -> list[tuple[bytes, str]]:
    def spoil(**changes: Any) -> bytes:
        return support.encode({**good, "message_id": str(uuid.uuid4()), **changes})

    missing = {k: v for k, v in good.items() if k != "user_id"}
    return [
        (b"\xff\xfe not utf-8", "not_utf8"),
        (b"{not json", "not_json"),
        (b'{"content": "\\ud800 lone surrogate"}', "not_json"),
        (b"[1, 2, 3]", "not_object"),
        (support.encode(missing), "missing_field"),
        (spoil(message_id="not-a-uuid"), "invalid_uuid"),
        (spoil(type="robot"), "invalid_message_type"),
        (spoil(mode="chaos"), "invalid_mode"),
        (spoil(content=42), "wrong_type"),
        (spoil(created_at="yesterday"), "invalid_timestamp"),
        (spoil(created_at="2024-03-01T10:00:00"), "timestamp_without_offset"),
        (spoil(created_at="2999-01-01T00:00:00Z"), "timestamp_in_future"),
        (spoil(context_data={"market_hours": "yes"}), "invalid_context_data"),
        # The same message_id as the good event, another text: the first one wins.
        (support.encode({**good, "content": "an impostor"}), "message_id_conflict"),
    ]


async def test_a_flood_of_bad_records_does_not_hold_up_the_good_ones(
    settings: settings_module.Settings, pool: asyncpg.Pool, fleet: workers.Fleet
) -> None:
    cfg = settings.model_copy(update={"batch_size": 50})
    owners = [uuid.uuid4() for _ in range(FLOOD_OWNERS)]
    await support.create_users(pool, *owners)
    good, bad, stream = _flood(owners)
    await kafka.ensure_topics(cfg)
    await kafka.produce(cfg, cfg.messages_topic, stream)

    await workers.run_to_drain(fleet, cfg, pool)

    letters = await support.read_topic(cfg, cfg.dead_letter_topic)
    lag = await kafka.group_lag(cfg, cfg.consumer_group, cfg.messages_topic)
    await expected.assert_rows_exact(pool, expected.stats(good))
    assert collections.Counter(
        (letter.value, _header(letter, "convstats.reason").decode())
        for letter in letters
    ) == collections.Counter(bad)
    assert lag == 0


def _flood(
    owners: list[uuid.UUID],
) -> tuple[
    list[dict[str, Any]], list[tuple[bytes, str]], list[tuple[bytes | None, bytes]]
]:
    """Good events, bad records with their reasons, and the stream mixing them.

    Every good event is followed by a bad record of its conversation, and now and
    then by a redelivery of itself, which is neither bad nor counted twice.
    """
    good: list[dict[str, Any]] = []
    bad: list[tuple[bytes, str]] = []
    stream: list[tuple[bytes | None, bytes]] = []
    for c in range(FLOOD_CONVERSATIONS):
        conversation_id, owner = uuid.uuid4(), owners[c % len(owners)]
        key = str(conversation_id).encode()
        for i in range(FLOOD_MESSAGES):
            event = support.event(conversation_id, owner, seconds=i, content=f"m{i}")
            spoilt = _bad_records(event)[(c + i) % len(_bad_records(event))]
            good.append(event)
            bad.append(spoilt)
            stream += [(key, support.encode(event)), (key, spoilt[0])]
            if i % 4 == 0:
                stream.append((key, support.encode(event)))
    return good, bad, stream


def _header(record: aiokafka.ConsumerRecord[bytes, bytes], name: str) -> bytes:
    values: list[bytes] = [value for key, value in record.headers if key == name]
    assert len(values) == 1, (name, record.headers)
    return values[0]


async def test_an_impostor_ahead_of_a_redelivery_is_the_only_conflict(
    settings: settings_module.Settings, pool: asyncpg.Pool, fleet: workers.Fleet
) -> None:
    owner, conversation_id = uuid.uuid4(), uuid.uuid4()
    await support.create_users(pool, owner)
    genuine = support.event(conversation_id, owner, content="genuine")
    impostor = {**genuine, "content": "impostor"}
    await support.produce(settings, [genuine])
    await workers.run_to_drain(fleet, settings, pool)

    # One batch: the impostor first, then a redelivery of the applied message.
    await support.produce(settings, [impostor, genuine])
    await workers.run_to_drain(fleet, settings, pool)

    letters = await support.read_topic(settings, settings.dead_letter_topic)
    row = (await expected.rows(pool))[conversation_id]
    assert [letter.value for letter in letters] == [support.encode(impostor)]
    assert (row["title"], row["message_count"]) == ("genuine", 1)
