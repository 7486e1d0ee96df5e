"""The worker through real Kafka and PostgreSQL on a slice of the chat corpus."""

from __future__ import annotations

import itertools
import json
import uuid
from collections import defaultdict
from typing import Any

import asyncpg
import pytest

from tests import support
from worker import corpus, titles
from worker import settings as settings_module

SLICE = 25


def _expected(events: list[dict[str, Any]]) -> dict[uuid.UUID, dict[str, Any]]:
    """The statistics recomputed straight from the events, without the worker."""
    by_conversation: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_conversation[e["conversation_id"]].append(e)
    expected = {}
    for conversation_id, messages in by_conversation.items():
        candidates = sorted(
            (m["created_at"].replace("Z", "+00:00"), m["message_id"], title)
            for m in messages
            if (title := titles.candidate(m["type"], m["content"])) is not None
        )
        expected[uuid.UUID(conversation_id)] = {
            "message_count": len(messages),
            "last_message_at": max(m["created_at"] for m in messages),
            "title": candidates[0][2] if candidates else None,
        }
    return expected


@pytest.fixture(scope="module")
def corpus_slice() -> list[dict[str, Any]]:
    data = corpus.load()
    keys = list(itertools.islice(data, SLICE))
    return list(corpus.events({key: data[key] for key in keys}))


async def test_corpus_slice_end_to_end(
    settings: settings_module.Settings,
    pool: asyncpg.Pool,
    corpus_slice: list[dict[str, Any]],
) -> None:
    owners = {uuid.UUID(e["user_id"]) for e in corpus_slice}
    await support.create_users(pool, *owners)
    await support.produce(settings, corpus_slice)

    svc = await support.run_until_drained(settings)

    rows = await support.conversation_rows(pool)
    expected = _expected(corpus_slice)
    assert svc.consumer.tally.applied == len(corpus_slice)
    assert set(rows) == set(expected)
    for conversation_id, want in expected.items():
        row = rows[conversation_id]
        assert row["message_count"] == want["message_count"]
        assert (
            row["last_message_at"].strftime("%Y-%m-%dT%H:%M:%SZ")
            == (want["last_message_at"])
        )
        assert row["title"] == want["title"]
        assert row["mode"] == "analysis"
        assert row["status"] == "active"

    updates = await support.read_topic(settings, settings.updates_topic)
    await _assert_updates_tell_the_final_state(updates, rows)


async def _assert_updates_tell_the_final_state(
    updates: list[Any], rows: dict[uuid.UUID, dict[str, Any]]
) -> None:
    last: dict[uuid.UUID, dict[str, Any]] = {}
    for record in updates:
        body = json.loads(record.value)
        conversation_id = uuid.UUID(body["conversation_id"])
        assert record.key == str(conversation_id).encode()
        if conversation_id in last:
            assert body["version"] > last[conversation_id]["version"]
        last[conversation_id] = body

    assert set(last) == set(rows)
    for conversation_id, body in last.items():
        row = rows[conversation_id]
        assert body["version"] == row["version"]
        assert body["message_count"] == row["message_count"]
        assert body["title"] == row["title"]
        assert body["status"] == row["status"]


async def test_second_pass_changes_nothing_and_publishes_nothing(
    settings: settings_module.Settings,
    pool: asyncpg.Pool,
    corpus_slice: list[dict[str, Any]],
) -> None:
    events = corpus_slice[:300]
    await support.create_users(pool, *{uuid.UUID(e["user_id"]) for e in events})
    await support.produce(settings, events)
    await support.run_until_drained(settings)
    rows_before = await support.conversation_rows(pool)
    published_before = len(await support.read_topic(settings, settings.updates_topic))

    await support.produce(settings, events)
    svc = await support.run_until_drained(settings)

    assert svc.consumer.tally.consumed == len(events)
    assert svc.consumer.tally.duplicates == len(events)
    assert svc.consumer.tally.applied == 0
    assert await support.conversation_rows(pool) == rows_before
    assert len(await support.read_topic(settings, settings.updates_topic)) == (
        published_before
    )
