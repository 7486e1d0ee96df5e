"""Loads a file of message-created events straight into PostgreSQL.

Each event is validated exactly as the consumer validates a record
(:func:`worker.events.parse`). Valid events are copied, a chunk at a time, into a
temporary staging table and merged with one set-based INSERT into the ledger, so the
ledger's statement trigger applies the stats once per conversation and chunk, and the
outbox triggers leave one row per changed conversation per chunk for the relay to
publish. Every line that is not applied and not a duplicate goes to a rejects file
beside the input, with its line number, the reason and the line itself: nothing is
dropped silently.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import csv
import dataclasses
import datetime
import gc
import json
import logging
import pathlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import IO, Any, Literal, NamedTuple

import asyncpg

from worker import apply, db, events
from worker import settings as settings_module

logger = logging.getLogger(__name__)

Format = Literal["jsonl", "csv"]

# The CSV header a backfill file must carry; mode and context_data may be left empty.
CSV_COLUMNS = (
    "message_id",
    "conversation_id",
    "user_id",
    "type",
    "content",
    "created_at",
    "mode",
    "context_data",
)
CSV_REQUIRED = CSV_COLUMNS[:6]
REJECTS_SUFFIX = ".rejects.jsonl"

# Rows per transaction: large enough that per-statement costs vanish, small enough
# that a chunk holds conversation locks for well under a second.
DEFAULT_CHUNK_ROWS = 20_000
DEFAULT_SESSIONS = 1
# Parsing hands the event loop back after this many lines, so the statements of the
# chunk being merged go out while the next chunk is parsed.
PARSE_SLICE = 500
MERGE_ATTEMPTS = 5
RETRY_BACKOFF_S = 0.5
# Allocations between young-generation collections while loading; see relaxed_gc.
GC_THRESHOLD = 50_000

STAGING_TABLE = "convstats_backfill_staging"

_OUTCOME_REASONS = {
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
# A CSV row that cannot even be turned into an event; not a reason of the stream.
MALFORMED_CSV = "malformed_csv"


class BackfillError(Exception):
    """The input cannot be read as a whole (unknown format, unusable CSV header)."""


class StagingRow(NamedTuple):
    """A row of the staging table, in its column order."""

    line: int
    message_id: uuid.UUID
    conversation_id: uuid.UUID
    user_id: uuid.UUID
    type: str
    created_at: datetime.datetime
    fingerprint: bytes
    title_candidate: str | None
    mode: str | None
    context_data: str | None


@dataclasses.dataclass(frozen=True)
class Line:
    """One event of the input file."""

    number: int
    # What events.parse reads: the line itself, or a CSV record as JSON.
    value: bytes
    # The item as it stands in the file, for the rejects file.
    original: bytes


@dataclasses.dataclass(frozen=True)
class Reject:
    line: int
    reason: str
    detail: str
    original: bytes

    def to_json(self) -> str:
        entry: dict[str, object] = {
            "line": self.line,
            "reason": self.reason,
            "detail": self.detail,
        }
        try:
            entry["original"] = self.original.decode("utf-8")
        except UnicodeDecodeError:
            entry["original_base64"] = base64.b64encode(self.original).decode()
        return db.dumps(entry)


@dataclasses.dataclass
class Chunk:
    """Parsed lines ready for the staging table, and what parsing already refused."""

    # One version of each message_id per round; a second version of an id goes to
    # the next round, so the database decides which one is first.
    rounds: list[list[StagingRow]] = dataclasses.field(default_factory=list)
    originals: dict[int, bytes] = dataclasses.field(default_factory=dict)
    rejects: list[Reject] = dataclasses.field(default_factory=list)
    duplicates: int = 0
    size_bytes: int = 0
    seconds: float = 0.0

    @property
    def staged(self) -> int:
        return sum(len(rows) for rows in self.rounds)


@dataclasses.dataclass
class Summary:
    path: pathlib.Path
    rejects_path: pathlib.Path
    events: int = 0
    applied: int = 0
    duplicates: int = 0
    conversation_updates: int = 0
    reasons: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    seconds: float = 0.0
    # Wall time in each stage; the stages overlap, so the larger one sets the pace.
    parse_seconds: float = 0.0
    merge_seconds: float = 0.0

    @property
    def rejected(self) -> int:
        return sum(self.reasons.values())

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        out = [
            f"events read            {self.events:>10,}",
            f"  applied              {self.applied:>10,}",
            f"  duplicates           {self.duplicates:>10,}",
            f"  rejected             {self.rejected:>10,}",
        ]
        out += [
            f"    {reason:<19}{count:>10,}"
            for reason, count in self.reasons.most_common()
        ]
        out += [
            f"conversation updates   {self.conversation_updates:>10,}",
            f"seconds                {self.seconds:>10.1f}",
            f"events per second      {self.events_per_s:>10,.0f}",
            f"  parsing {self.parse_seconds:.1f}s, merging {self.merge_seconds:.1f}s "
            "(overlapping)",
        ]
        if self.rejected:
            out.append(f"rejects written to {self.rejects_path}")
        return out


# --- reading the input ---------------------------------------------------------


def detect_format(path: pathlib.Path) -> Format:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise BackfillError(f"cannot tell the format of {path.name}; name it with --format")


def rejects_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + REJECTS_SUFFIX)


def read_jsonl(stream: IO[bytes]) -> Iterator[Line | Reject]:
    for number, raw in enumerate(stream, start=1):
        text = raw.rstrip(b"\r\n")
        # A blank line carries no event; files often end with one.
        if text.strip():
            yield Line(number, text, text)


class _LineRecorder:
    """Feeds csv.reader line by line and keeps the lines of the current record.

    A quoted field may span lines, so a record's original text and first line number
    are only known from what the reader consumed.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self.taken: list[str] = []
        self.line_number = 0

    def __iter__(self) -> _LineRecorder:
        return self

    def __next__(self) -> str:
        line = next(self._stream)
        self.taken.append(line)
        self.line_number += 1
        return line

    def take(self) -> tuple[int, bytes]:
        first = self.line_number - len(self.taken) + 1
        text = "".join(self.taken).rstrip("\r\n")
        self.taken.clear()
        return first, text.encode("utf-8", "surrogateescape")


def read_csv(stream: IO[str]) -> Iterator[Line | Reject]:
    recorder = _LineRecorder(stream)
    reader = csv.reader(recorder)
    header = next(reader, None)
    recorder.take()
    if header is None:
        return
    missing = [name for name in CSV_REQUIRED if name not in header]
    if missing:
        raise BackfillError(
            f"the CSV header lacks {', '.join(missing)}; "
            f"expected {','.join(CSV_COLUMNS)}"
        )

    for fields in reader:
        number, original = recorder.take()
        if not fields:
            continue
        if len(fields) > len(header):
            detail = f"the row has {len(fields)} fields, the header {len(header)}"
            yield Reject(number, MALFORMED_CSV, detail, original)
            continue
        yield _csv_line(number, dict(zip(header, fields, strict=False)), original)


def _csv_line(number: int, row: dict[str, str], original: bytes) -> Line | Reject:
    event: dict[str, Any] = {
        name: value
        for name, value in row.items()
        if name not in ("mode", "context_data")
    }
    # Empty optional columns mean "not given", as an absent JSON field does.
    if row.get("mode"):
        event["mode"] = row["mode"]
    if row.get("context_data"):
        try:
            event["context_data"] = json.loads(row["context_data"])
        except json.JSONDecodeError as exc:
            detail = f"context_data: not JSON ({exc})"
            return Reject(number, events.Reason.INVALID_CONTEXT_DATA, detail, original)

    # surrogateescape gives back the bytes that were not UTF-8, so events.parse
    # rejects them as it would on the stream.
    value = json.dumps(event, ensure_ascii=False).encode("utf-8", "surrogateescape")
    return Line(number, value, original)


@contextlib.contextmanager
def open_lines(path: pathlib.Path, fmt: Format) -> Iterator[Iterator[Line | Reject]]:
    if fmt == "csv":
        with path.open(encoding="utf-8", errors="surrogateescape", newline="") as text:
            yield read_csv(text)
    else:
        with path.open("rb") as raw:
            yield read_jsonl(raw)


def chunked(items: Iterator[Line | Reject], size: int) -> Iterator[list[Line | Reject]]:
    batch: list[Line | Reject] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- validating ----------------------------------------------------------------


async def parse_chunk(
    items: Sequence[Line | Reject], now: datetime.datetime, max_skew_s: float
) -> Chunk:
    """Validates lines as the stream does and sorts the valid ones into rounds."""
    started = time.perf_counter()
    chunk = Chunk()
    parsed: list[tuple[Line, events.Message]] = []
    for index, item in enumerate(items):
        if index % PARSE_SLICE == 0:
            await asyncio.sleep(0)
        chunk.size_bytes += len(item.original) + 1
        if isinstance(item, Reject):
            chunk.rejects.append(item)
            continue

        message = events.parse(item.value, now, max_skew_s)
        if isinstance(message, events.Rejection):
            reject = Reject(item.number, message.reason, message.detail, item.original)
            chunk.rejects.append(reject)
        else:
            parsed.append((item, message))
            chunk.originals[item.number] = item.original

    chunk.rounds, chunk.duplicates = _rounds(parsed)
    chunk.seconds = time.perf_counter() - started
    return chunk


def _rounds(
    parsed: list[tuple[Line, events.Message]],
) -> tuple[list[list[StagingRow]], int]:
    """Rounds of one version per message_id, first lines first; and exact copies.

    As on the stream, a copy of a line is a duplicate, and a different message under
    the same id waits for a later round: an earlier load may already hold either
    version, so only the database can tell which one is the duplicate.
    """
    rounds: list[list[StagingRow]] = []
    duplicates = 0
    pending = parsed
    while pending:
        first: dict[uuid.UUID, bytes] = {}
        rows: list[StagingRow] = []
        later: list[tuple[Line, events.Message]] = []
        for item, message in pending:
            seen = first.get(message.event.message_id)
            if seen is None:
                first[message.event.message_id] = message.fingerprint
                rows.append(_staging_row(item.number, message))
            elif seen == message.fingerprint:
                duplicates += 1
            else:
                later.append((item, message))
        rounds.append(rows)
        pending = later
    return rounds, duplicates


def _staging_row(number: int, message: events.Message) -> StagingRow:
    return StagingRow(number, *apply.message_row(message))


# --- merging -------------------------------------------------------------------


@dataclasses.dataclass
class Merged:
    applied: int = 0
    duplicates: int = 0
    conversation_updates: int = 0
    rejects: list[Reject] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


class Merger:
    """Owns the session that holds the staging table; reconnects when it is lost."""

    def __init__(self, cfg: settings_module.Settings) -> None:
        self._cfg = cfg
        self._conn: asyncpg.Connection | None = None

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def merge(self, chunk: Chunk) -> Merged:
        """Applies a chunk, one transaction per round.

        A row the database refuses is rejected on its own; the others are applied.
        """
        started = time.perf_counter()
        merged = Merged()
        for rows in chunk.rounds:
            await self._merge_isolating(rows, chunk.originals, merged)
        merged.seconds = time.perf_counter() - started
        return merged

    async def _merge_isolating(
        self,
        rows: Sequence[StagingRow],
        originals: dict[int, bytes],
        merged: Merged,
    ) -> None:
        try:
            result = await self._merge_with_retry(rows)
        except asyncpg.PostgresError as exc:
            if not apply.is_data_error(exc):
                raise
            if len(rows) == 1:
                line = rows[0].line
                detail = f"{exc.sqlstate}: {exc}"
                reason = events.Reason.DATABASE_ERROR
                merged.rejects.append(Reject(line, reason, detail, originals[line]))
                return
            middle = len(rows) // 2
            await self._merge_isolating(rows[:middle], originals, merged)
            await self._merge_isolating(rows[middle:], originals, merged)
            return

        _count_outcomes(result, len(rows), originals, merged)

    async def _merge_with_retry(self, rows: Sequence[StagingRow]) -> MergeResult:
        for attempt in range(1, MERGE_ATTEMPTS + 1):
            try:
                return await self._merge_once(rows)
            except apply.DATABASE_ERRORS as exc:
                if not apply.is_transient(exc) or attempt == MERGE_ATTEMPTS:
                    raise
                logger.warning(
                    "chunk merge failed (%s: %s), retrying",
                    type(exc).__name__,
                    exc,
                    extra={"action": "backfill_retry", "attempt": attempt},
                )
                await self.close()
                await asyncio.sleep(RETRY_BACKOFF_S * attempt)
        raise AssertionError("unreachable")

    async def _merge_once(self, rows: Sequence[StagingRow]) -> MergeResult:
        conn = await self._connection()
        queries = db.queries()
        async with conn.transaction():
            await conn.copy_records_to_table(
                STAGING_TABLE, records=rows, columns=StagingRow._fields
            )
            await conn.execute(queries["backfill_check_context"])
            await conn.execute(queries["backfill_lock"])
            await conn.execute(queries["backfill_create_conversations"])
            merged = await conn.fetchrow(queries["backfill_merge"])
            assert merged is not None
            refused = []
            # Every row applied is the usual case of a backfill; then there is
            # nothing to explain.
            if merged["applied"] < len(rows):
                refused = await conn.fetch(queries["backfill_refused"])
        return MergeResult(
            applied=merged["applied"],
            conversations=merged["conversations"],
            refused=[(row["line"], apply.Outcome(row["outcome"])) for row in refused],
        )

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await db.connect(self._cfg)
            # Merges plan above the JIT cost threshold but run in well under a
            # second; compiling them costs more than it saves.
            await self._conn.execute("SET jit = off")
            await self._conn.execute(db.queries()["backfill_staging"])
        return self._conn


@dataclasses.dataclass(frozen=True)
class MergeResult:
    """What one transaction did with the staged rows."""

    applied: int
    conversations: int
    # Lines neither applied nor duplicates, with what the database said.
    refused: list[tuple[int, apply.Outcome]]


def _count_outcomes(
    result: MergeResult,
    staged: int,
    originals: dict[int, bytes],
    merged: Merged,
) -> None:
    merged.applied += result.applied
    merged.duplicates += staged - result.applied - len(result.refused)
    merged.conversation_updates += result.conversations
    for line, outcome in result.refused:
        reason = _OUTCOME_REASONS[outcome]
        detail = _OUTCOME_DETAILS[outcome]
        merged.rejects.append(Reject(line, reason, detail, originals[line]))


# --- the run -------------------------------------------------------------------


@contextlib.contextmanager
def relaxed_gc() -> Iterator[None]:
    # Parsing allocates several objects per event and keeps a chunk of them alive,
    # so the default thresholds run full collections over the same live chunk again
    # and again: about a third of the parse time. Collections still run, less often.
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *previous[1:])
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()


async def run(
    cfg: settings_module.Settings,
    path: pathlib.Path,
    *,
    fmt: Format | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    sessions: int = DEFAULT_SESSIONS,
    on_progress: Callable[[int], None] | None = None,
    clock: Callable[[], datetime.datetime] | None = None,
) -> Summary:
    """Backfills ``path``; ``on_progress`` receives the bytes of each merged chunk."""
    started = time.perf_counter()
    summary = Summary(path=path, rejects_path=rejects_path(path))
    now = (clock or _utc_now)()
    mergers = [Merger(cfg) for _ in range(sessions)]
    logger.info(
        "backfilling %s", path, extra={"action": "backfill_started", "path": str(path)}
    )
    try:
        with (
            open_lines(path, fmt or detect_format(path)) as items,
            summary.rejects_path.open("w", encoding="utf-8") as rejects,
            relaxed_gc(),
        ):
            await _pipeline(
                chunked(items, chunk_rows),
                lambda chunk: parse_chunk(chunk, now, cfg.max_clock_skew_s),
                mergers,
                lambda chunk, merged: _record(
                    summary, rejects, chunk, merged, on_progress
                ),
            )
    finally:
        for merger in mergers:
            await merger.close()

    summary.seconds = time.perf_counter() - started
    logger.info(
        "backfilled %d events from %s: %d applied, %d duplicates, %d rejected",
        summary.events,
        path,
        summary.applied,
        summary.duplicates,
        summary.rejected,
        extra={"action": "backfill_done", "path": str(path)},
    )
    return summary


async def _pipeline(
    batches: Iterator[list[Line | Reject]],
    parse: Callable[[list[Line | Reject]], Awaitable[Chunk]],
    mergers: Sequence[Merger],
    record: Callable[[Chunk, Merged], None],
) -> None:
    # While PostgreSQL merges earlier chunks, this process parses the next one. A
    # session merges one chunk at a time (round robin over the sessions), and
    # chunks are recorded in file order.
    in_flight: collections.deque[tuple[Chunk, asyncio.Task[Merged]]] = (
        collections.deque()
    )
    try:
        for index, batch in enumerate(batches):
            chunk = await parse(batch)
            if len(in_flight) == len(mergers):
                await _record_oldest(in_flight, record)
            merger = mergers[index % len(mergers)]
            in_flight.append((chunk, asyncio.create_task(merger.merge(chunk))))
        while in_flight:
            await _record_oldest(in_flight, record)
    finally:
        # On an error or a cancellation the chunks in flight roll back with their
        # sessions; none of them was recorded as done.
        for _, task in in_flight:
            task.cancel()
        await asyncio.gather(*(task for _, task in in_flight), return_exceptions=True)


async def _record_oldest(
    in_flight: collections.deque[tuple[Chunk, asyncio.Task[Merged]]],
    record: Callable[[Chunk, Merged], None],
) -> None:
    chunk, task = in_flight[0]
    merged = await task
    in_flight.popleft()
    record(chunk, merged)


def _record(
    summary: Summary,
    rejects: IO[str],
    chunk: Chunk,
    merged: Merged,
    on_progress: Callable[[int], None] | None,
) -> None:
    summary.events += chunk.staged + len(chunk.rejects) + chunk.duplicates
    summary.applied += merged.applied
    summary.duplicates += chunk.duplicates + merged.duplicates
    summary.conversation_updates += merged.conversation_updates
    summary.parse_seconds += chunk.seconds
    summary.merge_seconds += merged.seconds
    found = sorted(chunk.rejects + merged.rejects, key=lambda reject: reject.line)
    for reject in found:
        summary.reasons[reject.reason] += 1
        rejects.write(reject.to_json() + "\n")
    rejects.flush()
    if on_progress is not None:
        on_progress(chunk.size_bytes)


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
