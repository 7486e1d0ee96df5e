"""One batch of consumed records, from raw bytes to applied rows and dead letters."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

import asyncpg

from worker import apply, db, events, faults

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Record:
    """A consumed Kafka record, kept whole so a dead letter carries it unchanged."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    timestamp_ms: int = 0


@dataclasses.dataclass
class Tally:
    """What batches did; added up over a run for the summary and the metrics."""

    consumed: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    parked: int = 0
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, other: Tally) -> None:
        self.consumed += other.consumed
        self.applied += other.applied
        self.duplicates += other.duplicates
        self.dead_lettered += other.dead_lettered
        self.parked += other.parked
        for reason, count in other.reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0) + count


class DeadLetters(Protocol):
    async def send(self, rejected: Sequence[tuple[Record, events.Rejection]]) -> None:
        """Returns once every dead letter is acknowledged by the broker."""


_REJECTED_OUTCOMES = {
    apply.Outcome.CONFLICT: events.Reason.MESSAGE_ID_CONFLICT,
    apply.Outcome.FOREIGN_USER: events.Reason.FOREIGN_USER,
    apply.Outcome.DELETED: events.Reason.CONVERSATION_DELETED,
}

_OUTCOME_DETAILS = {
    apply.Outcome.CONFLICT: "message_id already applied with other content or "
    "conversation; the first one wins",
    apply.Outcome.FOREIGN_USER: "the conversation belongs to another user",
    apply.Outcome.DELETED: "the conversation is deleted",
}

_PARKED_CONFLICT = events.Rejection(
    events.Reason.MESSAGE_ID_CONFLICT,
    "another message with this message_id is already waiting for its user",
)

# A message waiting for its user: the record it came in, parsed.
Waiting = tuple[Record, events.Message]


@dataclasses.dataclass
class Resolution:
    tally: Tally
    rejected: list[tuple[Record, events.Rejection]]
    waiting: list[Waiting]


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Pipeline:
    def __init__(
        self,
        pool: asyncpg.Pool,
        dead_letters: DeadLetters,
        *,
        max_clock_skew_s: float,
        clock: Callable[[], datetime.datetime] = _utc_now,
    ) -> None:
        self._pool = pool
        self._dead_letters = dead_letters
        self._max_clock_skew_s = max_clock_skew_s
        self._clock = clock

    async def process(self, records: Sequence[Record]) -> Tally:
        """Applies a batch; returns once every record is applied, parked or
        dead-lettered. Only then may the caller commit the batch's offsets.
        """
        resolution = await self.resolve(records)
        faults.point(faults.RAISE_IN_APPLY)
        if resolution.waiting:
            refused = await park(self._pool, resolution.waiting)
            resolution.tally.parked = len(resolution.waiting) - len(refused)
            resolution.rejected += refused
        await self.dead_letter(resolution)
        return resolution.tally

    async def resolve(self, records: Sequence[Record]) -> Resolution:
        """Applies what can be applied and sorts out the rest, sending nothing."""
        resolution = Resolution(Tally(consumed=len(records)), [], [])
        pending = self._parse(records, resolution.rejected)
        # A message_id may come with different contents in one batch. Which one is
        # first is the database's to say (an earlier batch may hold either), so each
        # round applies one version per id and the next round the other versions.
        while pending:
            unique, pending, duplicates = _combine(pending)
            resolution.tally.duplicates += duplicates
            await self._apply(unique, resolution)
        return resolution

    async def dead_letter(self, resolution: Resolution) -> None:
        if resolution.rejected:
            await self._dead_letters.send(resolution.rejected)
        tally = resolution.tally
        tally.dead_lettered += len(resolution.rejected)
        for _, rejection in resolution.rejected:
            tally.reasons[rejection.reason] = tally.reasons.get(rejection.reason, 0) + 1

    def _parse(
        self,
        records: Sequence[Record],
        rejected: list[tuple[Record, events.Rejection]],
    ) -> list[tuple[Record, events.Message]]:
        now = self._clock()
        parsed: list[tuple[Record, events.Message]] = []
        for record in records:
            message = events.parse(record.value, now, self._max_clock_skew_s)
            if isinstance(message, events.Rejection):
                rejected.append((record, message))
            else:
                parsed.append((record, message))
        return parsed

    async def _apply(
        self,
        unique: dict[uuid.UUID, tuple[Record, events.Message]],
        resolution: Resolution,
    ) -> None:
        messages = [message for _, message in unique.values()]
        outcomes, failed = await apply.apply_isolating(self._pool, messages)

        for message, error in failed:
            record = unique[message.event.message_id][0]
            rejection = events.Rejection(events.Reason.DATABASE_ERROR, error)
            resolution.rejected.append((record, rejection))

        for message_id, outcome in outcomes.items():
            if outcome is apply.Outcome.APPLIED:
                resolution.tally.applied += 1
            elif outcome is apply.Outcome.DUPLICATE:
                resolution.tally.duplicates += 1
            elif outcome is apply.Outcome.UNKNOWN_USER:
                resolution.waiting.append(unique[message_id])
            else:
                rejection = events.Rejection(
                    _REJECTED_OUTCOMES[outcome], _OUTCOME_DETAILS[outcome]
                )
                resolution.rejected.append((unique[message_id][0], rejection))


async def park(
    pool: asyncpg.Pool, waiting: Sequence[Waiting]
) -> list[tuple[Record, events.Rejection]]:
    """Stores messages whose user does not exist yet, with their original record.

    Returns the ones it could not park: another message already waits under their
    message_id (a redelivery of the parked one is simply absorbed), or the
    database refused to store the record.
    """
    refused = []
    for record, message in waiting:
        try:
            parked = await _park_one(pool, record, message)
        except asyncpg.PostgresError as exc:
            if not apply.is_data_error(exc):
                raise
            # Dead-lettered like any record the database refuses, rather than a
            # worker failing on this record at every restart.
            error = events.Rejection(
                events.Reason.DATABASE_ERROR, f"{exc.sqlstate}: {exc}"
            )
            refused.append((record, error))
            continue
        if parked != message.fingerprint:
            refused.append((record, _PARKED_CONFLICT))
    logger.info(
        "parked %d messages until their users exist",
        len(waiting) - len(refused),
        extra={"action": "messages_parked", "size": len(waiting)},
    )
    return refused


async def _park_one(
    pool: asyncpg.Pool, record: Record, message: events.Message
) -> bytes:
    parked: bytes = await pool.fetchval(
        db.queries()["park"],
        message.event.message_id,
        message.event.conversation_id,
        message.event.user_id,
        record.topic,
        record.partition,
        record.offset,
        record.key,
        record.value,
        _headers_json(record.headers),
        message.fingerprint,
    )
    return parked


def _headers_json(headers: Sequence[tuple[str, bytes | None]]) -> str:
    # Names are base64 too: a header name may hold U+0000, which jsonb refuses.
    return db.dumps([[_b64(name.encode()), _b64(value)] for name, value in headers])


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode()


def _combine(
    parsed: Sequence[tuple[Record, events.Message]],
) -> tuple[
    dict[uuid.UUID, tuple[Record, events.Message]],
    list[tuple[Record, events.Message]],
    int,
]:
    """One version of each message_id, the other versions, and the exact copies.

    The earliest record of an id goes first; a copy of it is a duplicate; a
    different message under the same id waits for a later round.
    """
    unique: dict[uuid.UUID, tuple[Record, events.Message]] = {}
    later: list[tuple[Record, events.Message]] = []
    duplicates = 0
    for record, message in parsed:
        message_id = message.event.message_id
        first = unique.get(message_id)
        if first is None:
            unique[message_id] = (record, message)
        elif first[1].fingerprint == message.fingerprint:
            duplicates += 1
        else:
            later.append((record, message))
    return unique, later, duplicates
