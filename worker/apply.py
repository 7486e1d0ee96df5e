"""Applies validated messages to PostgreSQL through the schema's SQL rules."""

from __future__ import annotations

import datetime
import enum
import logging
import uuid
from collections.abc import Sequence

import asyncpg

from worker import db, events

logger = logging.getLogger(__name__)


class Outcome(enum.StrEnum):
    """What the database made of one message (see convstats_apply_messages_v1)."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    UNKNOWN_USER = "unknown_user"
    FOREIGN_USER = "foreign_user"
    DELETED = "deleted"


# SQLSTATE classes worth retrying as they are: the same statement can succeed later.
_TRANSIENT_CLASSES = (
    "08",  # connection exception
    "40",  # transaction rollback: serialization failure, deadlock
    "53",  # insufficient resources, too many connections
    "57",  # operator intervention: admin shutdown, statement timeout
    "58",  # system error (I/O)
)
# SQLSTATE classes that blame the data: retrying the same rows would fail forever.
_DATA_CLASSES = ("22", "23")


# Everything talking to PostgreSQL can raise; is_transient says which to retry.
DATABASE_ERRORS = (
    asyncpg.PostgresError,
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    # A pooled connection whose session the server cut (a restart) can be caught
    # between the FATAL message and the closed socket; asyncpg then raises this,
    # not an InterfaceError (MagicStack/asyncpg#1069).
    asyncpg.InternalClientError,
)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate)[:2] in _TRANSIENT_CLASSES
    return isinstance(exc, DATABASE_ERRORS)


def is_data_error(exc: BaseException) -> bool:
    return (
        isinstance(exc, asyncpg.PostgresError)
        and str(exc.sqlstate)[:2] in _DATA_CLASSES
    )


async def apply(
    pool: asyncpg.Pool, messages: Sequence[events.Message]
) -> dict[uuid.UUID, Outcome]:
    """Applies distinct messages in one transaction; returns each one's outcome."""
    rows = await pool.fetch(db.queries()["apply_messages"], *_columns(messages))
    return {row["message_id"]: Outcome(row["outcome"]) for row in rows}


async def apply_isolating(
    pool: asyncpg.Pool, messages: Sequence[events.Message]
) -> tuple[dict[uuid.UUID, Outcome], list[tuple[events.Message, str]]]:
    """Like :func:`apply`, but a message the database refuses fails alone.

    On a data error the batch is split in halves until the offending messages stand
    alone; they come back with the database's error, the rest are applied.
    """
    try:
        return await apply(pool, messages), []
    except asyncpg.PostgresError as exc:
        if not is_data_error(exc):
            raise
        if len(messages) == 1:
            return {}, [(messages[0], f"{exc.sqlstate}: {exc}")]
        logger.info(
            "database refused a batch of %d, splitting it",
            len(messages),
            extra={"action": "batch_split", "sqlstate": exc.sqlstate},
        )

    middle = len(messages) // 2
    left, left_failed = await apply_isolating(pool, messages[:middle])
    right, right_failed = await apply_isolating(pool, messages[middle:])
    return left | right, left_failed + right_failed


# message_id, conversation_id, user_id, type, created_at, fingerprint,
# title_candidate, mode, context_data (JSON text)
MessageRow = tuple[
    uuid.UUID,
    uuid.UUID,
    uuid.UUID,
    str,
    datetime.datetime,
    bytes,
    str | None,
    str | None,
    str | None,
]


def message_row(message: events.Message) -> MessageRow:
    """A message as the database takes it, in the order of the apply function."""
    event = message.event
    return (
        event.message_id,
        event.conversation_id,
        event.user_id,
        event.type,
        event.created_at,
        message.fingerprint,
        message.title_candidate,
        event.mode,
        message.context_json,
    )


def _columns(messages: Sequence[events.Message]) -> list[list[object]]:
    # One array per argument of convstats_apply_messages_v1.
    return [list(column) for column in zip(*map(message_row, messages), strict=True)]
