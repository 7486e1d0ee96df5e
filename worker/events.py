"""The event contract: what the worker consumes and what it publishes.

Parsing never raises on bad input: it returns a :class:`Rejection` with a stable,
machine-readable reason, because a bad event goes to the dead-letter topic instead
of stopping the stream.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import json
import re
import uuid
from typing import Annotated, Any, Literal

import pydantic

from worker import titles

MessageType = Literal["user", "assistant", "system"]
Mode = Literal["analysis", "psychology", "training", "planning"]
Status = Literal["active", "archived", "deleted"]


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MICROSECOND = datetime.timedelta(microseconds=1)


class Reason(enum.StrEnum):
    """Why an event went to the dead-letter topic."""

    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    INVALID_UUID = "invalid_uuid"
    INVALID_MESSAGE_TYPE = "invalid_message_type"
    INVALID_MODE = "invalid_mode"
    INVALID_TIMESTAMP = "invalid_timestamp"
    TIMESTAMP_WITHOUT_OFFSET = "timestamp_without_offset"
    TIMESTAMP_IN_FUTURE = "timestamp_in_future"
    INVALID_CONTEXT_DATA = "invalid_context_data"
    FOREIGN_USER = "foreign_user"
    CONVERSATION_DELETED = "conversation_deleted"
    MESSAGE_ID_CONFLICT = "message_id_conflict"
    UNKNOWN_USER = "unknown_user"
    DATABASE_ERROR = "database_error"


# RFC 3339 date-time; the offset is optional here only so that a missing one gets
# its own reason (timestamp_without_offset) from the aware-datetime check.
_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})?"
)


def _rfc3339(value: object) -> object:
    # pydantic alone also takes unix timestamps in strings and times without
    # seconds; the contract does not.
    if not isinstance(value, str):
        return value
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ValueError("not an RFC 3339 timestamp")
    stamp, fraction, offset = match.groups()
    # Python keeps microseconds: finer fractions are cut, not rounded, so that
    # one instant never becomes two.
    micros = (fraction or "0")[:6].ljust(6, "0")
    offset = "+00:00" if offset in ("Z", "z") else offset or ""
    return datetime.datetime.fromisoformat(f"{stamp.upper()}.{micros}{offset}")


def _field(description: str, default: Any = ...) -> Any:
    return pydantic.Field(default, description=description)


class ContextData(pydantic.BaseModel):
    """Trading context attached to a conversation when it is created.

    Every key is optional and unknown keys are kept, so clients can add their own;
    the known keys must have the documented types.
    """

    model_config = pydantic.ConfigDict(extra="allow", strict=True)

    trading_session_id: uuid.UUID | None = None
    market_hours: bool | None = None
    trading_instruments: list[str] | None = None
    session_type: str | None = None
    coaching_focus: list[str] | None = None
    last_mode_switch: pydantic.AwareDatetime | None = None


class MessageCreated(pydantic.BaseModel):
    """A chat message was written. The payload, not the Kafka key, is authoritative."""

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True, strict=True)

    message_id: uuid.UUID = _field("Identity of the message; the key of idempotence.")
    conversation_id: uuid.UUID = _field("The conversation the message belongs to.")
    user_id: uuid.UUID = _field("The user who owns the conversation.")
    type: MessageType = _field("Who wrote it: the trader, the coach, or the system.")
    content: str = _field("The text; may be empty.")
    created_at: Annotated[
        pydantic.AwareDatetime, pydantic.BeforeValidator(_rfc3339)
    ] = _field("When it was written: RFC 3339 with a UTC offset.")
    mode: Mode | None = _field(
        "Used only when the conversation is created; default analysis.", None
    )
    context_data: ContextData | None = _field(
        "Used only when the conversation is created; default {}.", None
    )


class ConversationUpdated(pydantic.BaseModel):
    """A conversation changed; the full state after the change.

    Subscribers keep, per conversation, the highest ``version`` seen and drop
    anything older or equal. ``event_id`` is the same on every re-send of a change.
    """

    model_config = pydantic.ConfigDict(extra="allow")

    event_id: uuid.UUID = _field("The same on every re-send of this change.")
    conversation_id: uuid.UUID = _field("Also the record key.")
    user_id: uuid.UUID = _field("Owner of the conversation.")
    version: int = _field("Strictly increasing per conversation; keep the highest.")
    title: str | None = _field("Auto title or the one a person set; may be null.")
    title_source: Literal["auto", "user"] = _field("Who set the title.")
    mode: Mode = _field("Coaching mode.")
    status: Status = _field("active, archived, or deleted (final).")
    context_data: dict[str, Any] = _field("Trading context of the conversation.")
    message_count: int = _field("Distinct messages applied, all types.")
    last_message_at: datetime.datetime | None = _field("Latest message time, UTC.")
    created_at: datetime.datetime = _field("Never later than the earliest message.")
    updated_at: datetime.datetime = _field("Time of the last effective change.")
    archived_at: datetime.datetime | None = _field("Set while status is archived.")
    changed_fields: list[str] = _field("Fields this change altered.")


@dataclasses.dataclass(frozen=True)
class Rejection:
    reason: Reason
    detail: str


@dataclasses.dataclass(frozen=True)
class Message:
    """A valid event with what the database needs precomputed."""

    event: MessageCreated
    fingerprint: bytes
    title_candidate: str | None
    context_json: str | None


def parse(
    raw: bytes | None, now: datetime.datetime, max_skew_s: float
) -> Message | Rejection:
    """Validates one record value against the contract."""
    if raw is None:
        return Rejection(Reason.NOT_JSON, "empty record value")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection(Reason.NOT_UTF8, str(exc))

    try:
        event = MessageCreated.model_validate_json(text)
    except pydantic.ValidationError as exc:
        return _rejection(exc)

    if event.created_at - now > datetime.timedelta(seconds=max_skew_s):
        return Rejection(
            Reason.TIMESTAMP_IN_FUTURE,
            f"created_at {event.created_at.isoformat()} is more than {max_skew_s:g}s "
            f"ahead of {now.isoformat()}",
        )
    return _message(event, text)


def _message(event: MessageCreated, text: str) -> Message:
    # The model only checks the context; the stored value is the producer's own
    # JSON, so keys and spellings the model does not know survive untouched.
    context_json = None
    if event.context_data is not None:
        context_json = json.dumps(json.loads(text)["context_data"])
    return Message(
        event=event,
        fingerprint=fingerprint(event),
        title_candidate=titles.candidate(event.type, event.content),
        context_json=context_json,
    )


def fingerprint(event: MessageCreated) -> bytes:
    """What makes two deliveries the same message, whatever their JSON spelling."""
    # The instant as whole microseconds: the same moment written with another UTC
    # offset is the same message.
    micros = (event.created_at - _EPOCH) // _MICROSECOND
    head = b"".join(
        (
            event.conversation_id.bytes,
            event.user_id.bytes,
            micros.to_bytes(8, "big", signed=True),
            event.type.encode(),
            b"\x00",
        )
    )
    # surrogatepass: JSON may carry lone surrogates, which are still content.
    body = event.content.encode("utf-8", "surrogatepass")
    return hashlib.sha256(head + body).digest()


def _rejection(exc: pydantic.ValidationError) -> Rejection:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or "(event)"
    detail = f"{where}: {error['msg']}"
    return Rejection(_reason(error["type"], error["loc"]), detail)


def _reason(error_type: str, loc: tuple[int | str, ...]) -> Reason:
    field = loc[0] if loc else None
    if error_type == "json_invalid":
        return Reason.NOT_JSON
    if field is None:
        return Reason.NOT_OBJECT
    if error_type == "missing":
        return Reason.MISSING_FIELD
    if field == "context_data":
        return Reason.INVALID_CONTEXT_DATA
    if error_type == "uuid_parsing":
        return Reason.INVALID_UUID
    if field == "type" and error_type == "literal_error":
        return Reason.INVALID_MESSAGE_TYPE
    if field == "mode" and error_type == "literal_error":
        return Reason.INVALID_MODE
    if field == "created_at":
        if error_type == "timezone_aware":
            return Reason.TIMESTAMP_WITHOUT_OFFSET
        if error_type != "datetime_type":
            return Reason.INVALID_TIMESTAMP
    return Reason.WRONG_TYPE
