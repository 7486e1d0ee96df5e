"""Conversations as one user sees and changes them, under row-level security.

Every call acts for one user: it borrows a pooled connection, opens a transaction,
takes the ``convstats_app`` role and names the user in ``convstats.user_id`` for that
transaction only (see :func:`acting_as`). The row policy then hides every other
user's conversations, so a foreign id reads as missing and changes nothing.

Changes go through the table's triggers like any other writer's: each effective
change bumps ``version`` and leaves a ``conversation-updated`` row in the outbox, and
a call that changes nothing bumps and publishes nothing.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import datetime
import json
import logging
import struct
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final, get_args

import asyncpg
import pydantic

from worker import db, events, titles

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE: Final = 20
# A page is one index range scan; the cap keeps a single call cheap and bounded.
MAX_PAGE_SIZE: Final = 100
# The title column is varchar(255), which counts code points.
MAX_TITLE_CODE_POINTS: Final = 255

# What a list shows when no status is asked for: a deleted conversation is gone for
# its owner, so it shows only when asked for by name.
VISIBLE_STATUSES: Final[tuple[events.Status, ...]] = ("active", "archived")

_MODES: Final = frozenset(get_args(events.Mode))
_STATUSES: Final = frozenset(get_args(events.Status))

# Cursor layout: a format byte, updated_at as microseconds since the Unix epoch
# (PostgreSQL's own resolution, so the key round-trips exactly), then the id.
_CURSOR_FORMAT: Final = 1
_CURSOR = struct.Struct(">Bq16s")
_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MICROSECOND: Final = datetime.timedelta(microseconds=1)
# The first page is the page after a key above every row (see queries/access.sql
# for why it is a value and not NULL).
_BEFORE_ALL: Final = (
    datetime.datetime.max.replace(tzinfo=datetime.UTC),
    uuid.UUID(int=(1 << 128) - 1),
)


class AccessError(Exception):
    """Base of the errors this module raises for a request it will not carry out."""


class InvalidInputError(AccessError, ValueError):
    """An argument breaks the documented rules (mode, title, context, cursor...)."""


class UnknownUserError(AccessError):
    """The user is not in ``users``, so nothing can be created for them."""


class ConversationNotFoundError(AccessError, LookupError):
    """No such conversation among the acting user's own."""


class ConversationDeletedError(AccessError):
    """The conversation is deleted; deletion is final, so it can no longer change."""


@dataclasses.dataclass(frozen=True)
class Conversation:
    id: uuid.UUID
    user_id: uuid.UUID
    title: str | None
    title_source: str
    mode: str
    status: str
    context_data: dict[str, Any]
    last_message_at: datetime.datetime | None
    message_count: int
    version: int
    created_at: datetime.datetime
    updated_at: datetime.datetime
    archived_at: datetime.datetime | None

    @classmethod
    def from_record(cls, row: asyncpg.Record) -> Conversation:
        # jsonb arrives as text (see db._init_connection).
        fields = dict(row.items())
        fields["context_data"] = json.loads(row["context_data"])
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class Page:
    """One page of a list; ``next_cursor`` is None on the last page."""

    conversations: list[Conversation]
    next_cursor: str | None


# --- acting for a user ----------------------------------------------------------


@contextlib.asynccontextmanager
async def acting_as(
    pool: asyncpg.Pool, user_id: uuid.UUID | str
) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
    """A connection in a transaction that sees and changes only this user's rows.

    For queries of other services that this module does not offer; the role and the
    user id end with the transaction.
    """
    user = _uuid(user_id, "user_id")
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(_sql("access_act_as"), str(user))
        yield conn


# --- the calls ------------------------------------------------------------------


async def create(
    pool: asyncpg.Pool,
    user_id: uuid.UUID | str,
    *,
    mode: str = "analysis",
    title: str | None = None,
    context_data: Mapping[str, Any] | None = None,
) -> Conversation:
    """A new active conversation; a title given here is the person's own."""
    user = _uuid(user_id, "user_id")
    args = (_mode(mode), None if title is None else _title(title))
    context_json = _context_json({} if context_data is None else context_data)

    try:
        async with acting_as(pool, user) as conn:
            row = await conn.fetchrow(_sql("access_create"), user, *args, context_json)
    except asyncpg.ForeignKeyViolationError as exc:
        raise UnknownUserError(f"user {user} does not exist") from exc
    except asyncpg.DataError as exc:
        # e.g. a \u0000 escape in the context, which jsonb cannot hold
        raise InvalidInputError(f"context_data: {exc}") from exc

    assert row is not None
    conversation = Conversation.from_record(row)
    _log_change("conversation_created", conversation)
    return conversation


async def get(
    pool: asyncpg.Pool, user_id: uuid.UUID | str, conversation_id: uuid.UUID | str
) -> Conversation | None:
    """The conversation, or None when the user has none with this id."""
    conversation = _uuid(conversation_id, "conversation_id")
    async with acting_as(pool, user_id) as conn:
        row = await conn.fetchrow(_sql("access_get"), conversation)
    return None if row is None else Conversation.from_record(row)


async def list_conversations(
    pool: asyncpg.Pool,
    user_id: uuid.UUID | str,
    *,
    status: str | None = None,
    mode: str | None = None,
    limit: int = DEFAULT_PAGE_SIZE,
    cursor: str | None = None,
) -> Page:
    """A page of the user's conversations, latest activity first.

    ``status`` None lists every status but 'deleted'. Pass ``next_cursor`` of a
    page to get the next one. Paging is stable in this sense: while a client walks
    the pages, every conversation that existed when the walk began and was not
    modified during it appears exactly once, and no conversation appears twice.
    Rows created or modified during the walk move to the top of the list (their
    updated_at is newer than any cursor), so the walk skips them; the next walk
    from the first page sees them.
    """
    user = _uuid(user_id, "user_id")
    statuses = VISIBLE_STATUSES if status is None else (_status(status),)
    query, extra = _list_query(statuses, None if mode is None else _mode(mode))
    after = _BEFORE_ALL if cursor is None else _decode_cursor(cursor)
    size = _page_size(limit)

    # One row more than the page tells whether another page follows.
    async with acting_as(pool, user) as conn:
        rows = await conn.fetch(_sql(query), user, *after, size + 1, *extra)

    page = [Conversation.from_record(row) for row in rows[:size]]
    more = len(rows) > size
    return Page(page, _encode_cursor(page[-1]) if more else None)


async def rename(
    pool: asyncpg.Pool,
    user_id: uuid.UUID | str,
    conversation_id: uuid.UUID | str,
    title: str,
) -> Conversation:
    """Gives the conversation the person's title, which the worker never replaces."""
    conversation = await _change(
        pool, user_id, conversation_id, "access_rename", _title(title)
    )
    _log_change("conversation_renamed", conversation)
    return conversation


async def switch_mode(
    pool: asyncpg.Pool,
    user_id: uuid.UUID | str,
    conversation_id: uuid.UUID | str,
    mode: str,
) -> Conversation:
    """Changes the mode and records when in ``context_data.last_mode_switch``."""
    conversation = await _change(
        pool, user_id, conversation_id, "access_switch_mode", _mode(mode)
    )
    _log_change("conversation_mode_switched", conversation)
    return conversation


async def archive(
    pool: asyncpg.Pool, user_id: uuid.UUID | str, conversation_id: uuid.UUID | str
) -> Conversation:
    return await _set_status(pool, user_id, conversation_id, "archived")


async def unarchive(
    pool: asyncpg.Pool, user_id: uuid.UUID | str, conversation_id: uuid.UUID | str
) -> Conversation:
    return await _set_status(pool, user_id, conversation_id, "active")


async def delete(
    pool: asyncpg.Pool, user_id: uuid.UUID | str, conversation_id: uuid.UUID | str
) -> Conversation:
    """Soft delete: the row stays with status 'deleted', and that is final."""
    return await _set_status(pool, user_id, conversation_id, "deleted")


# --- changes --------------------------------------------------------------------


async def _set_status(
    pool: asyncpg.Pool,
    user_id: uuid.UUID | str,
    conversation_id: uuid.UUID | str,
    status: events.Status,
) -> Conversation:
    try:
        conversation = await _change(
            pool, user_id, conversation_id, "access_set_status", status
        )
    except asyncpg.CheckViolationError as exc:
        # The status is a valid constant, so the only check that can fail here is
        # the guard trigger's, which names no constraint.
        if exc.constraint_name is not None:
            raise
        raise ConversationDeletedError(
            f"conversation {conversation_id} is deleted; deletion is final"
        ) from exc
    _log_change("conversation_status_set", conversation)
    return conversation


async def _change(
    pool: asyncpg.Pool,
    user_id: uuid.UUID | str,
    conversation_id: uuid.UUID | str,
    query: str,
    value: str,
) -> Conversation:
    """Runs an UPDATE ... RETURNING of one value; when it matches no row, says why.

    An UPDATE that matches nothing is a missing or deleted conversation, or a change
    to what the row already holds (switching to its own mode), which is no error.
    """
    conversation = _uuid(conversation_id, "conversation_id")
    async with acting_as(pool, user_id) as conn:
        row = await conn.fetchrow(_sql(query), conversation, value)
        if row is None:
            # Same transaction and snapshot as the UPDATE, so the reason is exact.
            row = await conn.fetchrow(_sql("access_get"), conversation)
            _refuse_unchangeable(conversation, row)
    assert row is not None
    return Conversation.from_record(row)


def _refuse_unchangeable(conversation: uuid.UUID, row: asyncpg.Record | None) -> None:
    if row is None:
        raise ConversationNotFoundError(f"no conversation {conversation}")
    if row["status"] == "deleted":
        raise ConversationDeletedError(
            f"conversation {conversation} is deleted; deletion is final"
        )


def _log_change(action: str, conversation: Conversation) -> None:
    logger.debug(
        "conversation %s is at version %d",
        conversation.id,
        conversation.version,
        extra={
            "action": action,
            "conversation_id": str(conversation.id),
            "user_id": str(conversation.user_id),
        },
    )


# --- lists and cursors ----------------------------------------------------------


def _list_query(
    statuses: tuple[str, ...], mode: str | None
) -> tuple[str, tuple[object, ...]]:
    """The named query whose index serves this filter, and its extra arguments."""
    if mode is not None:
        return "access_list_by_mode", (mode, list(statuses))
    if statuses == ("active",):
        return "access_list_active", ()
    return "access_list_all_modes", (list(statuses),)


def _encode_cursor(last: Conversation) -> str:
    micros = (last.updated_at - _EPOCH) // _MICROSECOND
    raw = _CURSOR.pack(_CURSOR_FORMAT, micros, last.id.bytes)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _decode_cursor(cursor: str) -> tuple[datetime.datetime, uuid.UUID]:
    """The key of the last row of the previous page."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        fmt, micros, id_bytes = _CURSOR.unpack(raw)
        if fmt != _CURSOR_FORMAT:
            raise ValueError(f"unknown cursor format {fmt}")
        return _EPOCH + micros * _MICROSECOND, uuid.UUID(bytes=id_bytes)
    except (binascii.Error, struct.error, ValueError, OverflowError) as exc:
        raise InvalidInputError(f"invalid cursor {cursor!r}") from exc


# --- arguments ------------------------------------------------------------------


def _sql(name: str) -> str:
    return db.queries()[name]


def _uuid(value: uuid.UUID | str, what: str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError) as exc:
        raise InvalidInputError(f"{what} is not a UUID: {value!r}") from exc


def _mode(mode: str) -> str:
    if mode not in _MODES:
        raise InvalidInputError(f"mode must be one of {sorted(_MODES)}, not {mode!r}")
    return mode


def _status(status: str) -> str:
    if status not in _STATUSES:
        raise InvalidInputError(
            f"status must be one of {sorted(_STATUSES)}, not {status!r}"
        )
    return status


def _page_size(limit: int) -> int:
    if isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInputError(f"limit must be 1..{MAX_PAGE_SIZE}, not {limit!r}")
    return limit


def _title(title: str) -> str:
    """A person's title on one line: the same whitespace and control rules as the
    automatic one, but never cut, because cutting what someone typed would surprise.
    """
    clean = titles.normalise(title)
    if not clean:
        raise InvalidInputError("title is empty")
    if len(clean) > MAX_TITLE_CODE_POINTS:
        raise InvalidInputError(
            f"title is {len(clean)} characters, at most {MAX_TITLE_CODE_POINTS}"
        )
    return clean


def _context_json(context_data: Mapping[str, Any]) -> str:
    """The caller's JSON, checked against the documented context schema.

    Validated as JSON rather than as Python objects, because JSON is what is stored
    and what the schema describes (a UUID or a timestamp is a string there). Keys
    the schema does not know are kept as given.
    """
    if not isinstance(context_data, Mapping):
        raise InvalidInputError("context_data must be a JSON object")
    try:
        text = json.dumps(dict(context_data), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"context_data is not JSON: {exc}") from exc

    try:
        events.ContextData.model_validate_json(text)
    except pydantic.ValidationError as exc:
        raise InvalidInputError(f"context_data: {_first_error(exc)}") from exc
    return text


def _first_error(exc: pydantic.ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or "(object)"
    return f"{where}: {error['msg']}"
