"""One batch of consumed records, from raw bytes to applied rows and dead letters."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

import asyncpg

from worker import apply, events

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Record:
    """A consumed Kafka record, kept whole so a dead letter carries it unchanged."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int = 0


@dataclasses.dataclass
class Tally:
    """What batches did; added up over a run for the summary and the metrics."""

    consumed: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, other: Tally) -> None:
        self.consumed += other.consumed
        self.applied += other.applied
        self.duplicates += other.duplicates
        self.dead_lettered += other.dead_lettered
        for reason, count in other.reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0) + count


class DeadLetters(Protocol):
    async def send(self, rejected: Sequence[tuple[Record, events.Rejection]]) -> None:
        """Returns once every dead letter is acknowledged by the broker."""


_REJECTED_OUTCOMES = {
    apply.Outcome.CONFLICT: events.Reason.MESSAGE_ID_CONFLICT,
    apply.Outcome.FOREIGN_USER: events.Reason.FOREIGN_USER,
    apply.Outcome.DELETED: events.Reason.CONVERSATION_DELETED,
    apply.Outcome.UNKNOWN_USER: events.Reason.UNKNOWN_USER,
}

_OUTCOME_DETAILS = {
    apply.Outcome.CONFLICT: "message_id already applied with other content or "
    "conversation; the first one wins",
    apply.Outcome.FOREIGN_USER: "the conversation belongs to another user",
    apply.Outcome.DELETED: "the conversation is deleted",
    apply.Outcome.UNKNOWN_USER: "user_id is not in users",
}


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
        """Applies a batch; returns once every record is applied or dead-lettered.

        Only after this returns may the caller commit the batch's offsets.
        """
        tally = Tally(consumed=len(records))
        rejected: list[tuple[Record, events.Rejection]] = []

        unique, duplicates = self._parse_and_combine(records, rejected)
        tally.duplicates += duplicates

        if unique:
            await self._apply(unique, rejected, tally)

        if rejected:
            await self._dead_letters.send(rejected)
        tally.dead_lettered = len(rejected)
        for _, rejection in rejected:
            tally.reasons[rejection.reason] = tally.reasons.get(rejection.reason, 0) + 1
        return tally

    def _parse_and_combine(
        self,
        records: Sequence[Record],
        rejected: list[tuple[Record, events.Rejection]],
    ) -> tuple[dict[uuid.UUID, tuple[Record, events.Message]], int]:
        # Events of one message inside a batch are combined before the database sees
        # them: the earliest record wins, a copy is a duplicate, a different message
        # under the same id is a conflict.
        now = self._clock()
        unique: dict[uuid.UUID, tuple[Record, events.Message]] = {}
        duplicates = 0
        for record in records:
            parsed = events.parse(record.value, now, self._max_clock_skew_s)
            if isinstance(parsed, events.Rejection):
                rejected.append((record, parsed))
                continue

            message_id = parsed.event.message_id
            first = unique.get(message_id)
            if first is None:
                unique[message_id] = (record, parsed)
            elif first[1].fingerprint == parsed.fingerprint:
                duplicates += 1
            else:
                rejected.append((record, _conflict(first[0])))
        return unique, duplicates

    async def _apply(
        self,
        unique: dict[uuid.UUID, tuple[Record, events.Message]],
        rejected: list[tuple[Record, events.Rejection]],
        tally: Tally,
    ) -> None:
        messages = [message for _, message in unique.values()]
        outcomes, failed = await apply.apply_isolating(self._pool, messages)

        for message, error in failed:
            record = unique[message.event.message_id][0]
            rejection = events.Rejection(events.Reason.DATABASE_ERROR, error)
            rejected.append((record, rejection))

        for message_id, outcome in outcomes.items():
            if outcome is apply.Outcome.APPLIED:
                tally.applied += 1
            elif outcome is apply.Outcome.DUPLICATE:
                tally.duplicates += 1
            else:
                rejection = events.Rejection(
                    _REJECTED_OUTCOMES[outcome], _OUTCOME_DETAILS[outcome]
                )
                rejected.append((unique[message_id][0], rejection))


def _conflict(first: Record) -> events.Rejection:
    return events.Rejection(
        events.Reason.MESSAGE_ID_CONFLICT,
        f"message_id already used by another message in this batch at "
        f"{first.topic}[{first.partition}]@{first.offset}; the first one wins",
    )
