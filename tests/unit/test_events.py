"""Parsing message-created: every kind of bad input gets its own stable reason."""

from __future__ import annotations

import datetime
import json
import uuid
from typing import Any

import pytest

from tests import support
from worker import events, schemas

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def _valid(**changes: Any) -> dict[str, Any]:
    base = support.event(uuid.uuid4(), uuid.uuid4(), content="Is ES trending?")
    base.update(changes)
    return base


def _parse(value: dict[str, Any] | bytes) -> events.Message | events.Rejection:
    return events.parse(support.encode(value), NOW, max_skew_s=300)


def _reason(value: dict[str, Any] | bytes) -> str:
    parsed = _parse(value)
    assert isinstance(parsed, events.Rejection), parsed
    return str(parsed.reason)


def test_valid_event_parses() -> None:
    parsed = _parse(_valid(mode="psychology", context_data={"market_hours": True}))

    assert isinstance(parsed, events.Message)
    assert parsed.event.mode == "psychology"
    assert parsed.title_candidate == "Is ES trending?"
    assert json.loads(parsed.context_json or "") == {"market_hours": True}


def test_unknown_fields_are_ignored() -> None:
    parsed = _parse(_valid(sentiment="bullish", attachments=[1, 2]))

    assert isinstance(parsed, events.Message)


def test_context_keeps_producer_keys_and_spelling() -> None:
    context = {"last_mode_switch": "2024-01-15T10:30:00Z", "desk": {"id": 7}}

    parsed = _parse(_valid(context_data=context))

    assert isinstance(parsed, events.Message)
    assert json.loads(parsed.context_json or "") == context


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\xff\xfe{}", "not_utf8"),
        (b"{not json", "not_json"),
        (b"", "not_json"),
        (b"[1, 2]", "not_object"),
        (b'"a string"', "not_object"),
        (b"null", "not_object"),
    ],
)
def test_undecodable_values(value: bytes, reason: str) -> None:
    assert _reason(value) == reason


def test_missing_value_is_not_json() -> None:
    parsed = events.parse(None, NOW, max_skew_s=300)

    assert isinstance(parsed, events.Rejection)
    assert parsed.reason == events.Reason.NOT_JSON


@pytest.mark.parametrize(
    "field",
    ["message_id", "conversation_id", "user_id", "type", "content", "created_at"],
)
def test_each_required_field(field: str) -> None:
    value = _valid()
    del value[field]

    assert _reason(value) == "missing_field"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"message_id": "not-a-uuid"}, "invalid_uuid"),
        ({"conversation_id": "1234"}, "invalid_uuid"),
        ({"user_id": "g" * 32}, "invalid_uuid"),
        ({"user_id": 42}, "wrong_type"),
        ({"content": 5}, "wrong_type"),
        ({"content": None}, "wrong_type"),
        ({"type": "bot"}, "invalid_message_type"),
        ({"mode": "scalping"}, "invalid_mode"),
        ({"created_at": "2024-03-01T09:30:00"}, "timestamp_without_offset"),
        ({"created_at": "yesterday"}, "invalid_timestamp"),
        ({"created_at": "2024-13-45T99:00:00Z"}, "invalid_timestamp"),
        ({"created_at": 1709285400}, "wrong_type"),
        ({"created_at": "1709285400"}, "invalid_timestamp"),
        ({"created_at": "2024-03-01T09:30Z"}, "invalid_timestamp"),
        ({"created_at": "2024-02-30T09:30:00Z"}, "invalid_timestamp"),
        ({"created_at": "2024-03-01_09:30:00Z"}, "invalid_timestamp"),
        ({"created_at": "2026-01-01T00:10:00Z"}, "timestamp_in_future"),
        ({"context_data": [1, 2]}, "invalid_context_data"),
        ({"context_data": "{}"}, "invalid_context_data"),
        ({"context_data": {"market_hours": "yes"}}, "invalid_context_data"),
        ({"context_data": {"trading_instruments": "ES"}}, "invalid_context_data"),
        ({"context_data": {"trading_session_id": "x"}}, "invalid_context_data"),
    ],
)
def test_invalid_fields(changes: dict[str, Any], reason: str) -> None:
    assert _reason(_valid(**changes)) == reason


def test_clock_skew_inside_the_limit_is_accepted() -> None:
    parsed = _parse(_valid(created_at="2026-01-01T00:04:59Z"))

    assert isinstance(parsed, events.Message)


@pytest.mark.parametrize(
    "created_at",
    [
        "2024-03-01T09:30:00Z",
        "2024-03-01T11:30:00+02:00",
        "2024-03-01T04:00:00-05:30",
        "2024-03-01T09:30:00.000000+00:00",
        "2024-03-01T09:30:00.000000999Z",
        "2024-03-01t09:30:00z",
    ],
)
def test_any_offset_gives_the_same_instant_and_fingerprint(created_at: str) -> None:
    message_id, conversation_id, user_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    reference = support.event(conversation_id, user_id, message_id=message_id)

    parsed = _parse({**reference, "created_at": created_at})
    expected = _parse(reference)

    assert isinstance(parsed, events.Message)
    assert isinstance(expected, events.Message)
    assert parsed.event.created_at == expected.event.created_at
    assert parsed.fingerprint == expected.fingerprint


def test_fingerprint_tells_other_content_apart() -> None:
    value = _valid()

    first = _parse(value)
    second = _parse({**value, "content": value["content"] + "!"})

    assert isinstance(first, events.Message)
    assert isinstance(second, events.Message)
    assert first.fingerprint != second.fingerprint


@pytest.mark.parametrize(
    "content",
    [
        "nul \u0000 inside",
        "\x07\x1b",
        "",
        "   ",
        "🇫🇷 👍🏽",
        "e\u0301",
        "مرحبا بالعالم",
        "x" * 3_000_000,
    ],
)
def test_hard_text_is_accepted(content: str) -> None:
    parsed = _parse(_valid(content=content))

    assert isinstance(parsed, events.Message)


def test_json_schema_files_match_the_models() -> None:
    for name, text in schemas.generate().items():
        on_disk = (schemas.SCHEMA_DIR / name).read_text()

        assert on_disk == text, f"{name} drifted: run `convstats schemas --write`"
