"""Commands that work on history: replay, backfill, rebuild, export-corpus.

Registered on the ``convstats`` group by worker.cli. Heavy imports stay inside the
commands, as in worker.cli, so the command line starts fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import pathlib
import signal
import sys
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import click

if TYPE_CHECKING:
    from worker import settings as settings_module


def _settings() -> settings_module.Settings:
    from worker import settings

    return settings.Settings()


@contextlib.contextmanager
def _progress(**options: Any) -> Iterator[Any]:
    """A tqdm bar on stderr, with log records printed above it instead of through it."""
    import tqdm
    import tqdm.contrib.logging

    with (
        tqdm.contrib.logging.logging_redirect_tqdm(),
        tqdm.tqdm(file=sys.stderr, dynamic_ncols=True, **options) as bar,
    ):
        yield bar


# --- replay ---------------------------------------------------------------------


def _from_time(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> datetime.datetime | None:
    if value is None:
        return None
    try:
        at = datetime.datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"not an ISO 8601 time: {value}") from exc
    # A time without an offset is taken as UTC, the zone of every stored instant.
    return at if at.tzinfo is not None else at.replace(tzinfo=datetime.UTC)


def _from_offsets(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> dict[int, int] | None:
    from worker import replay

    if value is None:
        return None
    try:
        return replay.parse_offsets(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command("replay")
@click.option(
    "--group",
    help="Consumer group of the replay (default: convstats-replay-<UTC time>). "
    "Given again without a start option, a group resumes where it stopped.",
)
@click.option(
    "--from-beginning", is_flag=True, help="Start at the first record (the default)."
)
@click.option(
    "--from-time",
    callback=_from_time,
    metavar="TIME",
    help="Start at the first record written at or after TIME (ISO 8601; UTC "
    "unless it carries an offset). Kafka record time, not message time.",
)
@click.option(
    "--from-offsets",
    callback=_from_offsets,
    metavar="P:O[,P:O]",
    help="Start partition P at offset O; partitions not named are skipped.",
)
def replay_command(
    group: str | None,
    from_beginning: bool,
    from_time: datetime.datetime | None,
    from_offsets: dict[int, int] | None,
) -> None:
    """Re-apply the messages topic under a separate consumer group.

    Safe beside the live worker: applied messages count once, so only what the
    database lacks changes. Stops at the end offsets taken when it starts.
    """
    from worker import replay

    chosen = [from_beginning, from_time is not None, from_offsets is not None]
    if sum(chosen) > 1:
        raise click.UsageError(
            "give at most one of --from-beginning, --from-time, --from-offsets"
        )
    cfg = _settings()
    start = replay.StartAt(
        beginning=from_beginning, time=from_time, offsets=from_offsets
    )

    async def main() -> replay.Summary:
        plan = await replay.plan(cfg, group or replay.default_group(), start)
        click.echo(f"replaying {plan.total:,} records as group {plan.group}", err=True)
        with _progress(total=plan.total, desc="replaying", unit="ev") as bar:

            def advance(consumed: int) -> None:
                bar.update(min(consumed, plan.total) - bar.n)

            return await replay.run(cfg, plan, on_progress=advance)

    try:
        summary = asyncio.run(main())
    except replay.ReplayError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("\n".join(summary.lines()))
    if not summary.complete:
        sys.exit(1)


# --- backfill -------------------------------------------------------------------


@click.command("backfill")
@click.argument(
    "file",
    type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv"]),
    help="Input format (default: from the file name: .csv, .jsonl or .ndjson).",
)
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=20_000,
    show_default=True,
    help="Events per transaction.",
)
@click.option(
    "--sessions",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Database sessions merging chunks side by side. With more than one, which "
    "of two clashing lines in different chunks wins depends on timing.",
)
def backfill_command(
    file: pathlib.Path, fmt: str | None, chunk_size: int, sessions: int
) -> None:
    """Apply message-created events from FILE (JSON Lines or CSV) in bulk.

    Validation and stats rules are the live ones. Lines that are not applied (and
    are not duplicates) go to FILE.rejects.jsonl with their line number and reason.
    The CSV header is: message_id,conversation_id,user_id,type,content,created_at,
    mode,context_data (context_data as JSON text; mode and context_data may be
    empty).
    """
    from worker import backfill

    cfg = _settings()
    size = file.stat().st_size

    async def main() -> backfill.Summary:
        with _progress(
            total=size, desc="backfilling", unit="B", unit_scale=True
        ) as bar:
            return await backfill.run(
                cfg,
                file,
                fmt=cast("backfill.Format | None", fmt),
                chunk_rows=chunk_size,
                sessions=sessions,
                on_progress=bar.update,
            )

    try:
        summary = asyncio.run(main())
    except backfill.BackfillError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("\n".join(summary.lines()))


# --- rebuild --------------------------------------------------------------------


@click.command("rebuild")
@click.option("--conversation", type=click.UUID, help="Rebuild this conversation.")
@click.option("--user", type=click.UUID, help="Rebuild this user's conversations.")
@click.option("--all", "everything", is_flag=True, help="Rebuild every conversation.")
@click.option(
    "--after",
    type=click.UUID,
    help="Resume: start after this conversation id (logged after every batch).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Conversations per transaction.",
)
def rebuild_command(
    conversation: uuid.UUID | None,
    user: uuid.UUID | None,
    everything: bool,
    after: uuid.UUID | None,
    batch_size: int,
) -> None:
    """Recompute stats and auto titles from the ledger; rewrite rows that differ.

    A title set by a person is kept. Only repaired rows get a new version and are
    published. SIGINT or SIGTERM stops after the current batch.
    """
    from worker import db, rebuild

    if sum([conversation is not None, user is not None, everything]) != 1:
        raise click.UsageError("give exactly one of --conversation, --user, --all")
    cfg = _settings()
    scope = rebuild.Scope(conversation_id=conversation, user_id=user)

    async def main() -> rebuild.Summary:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        conn = await db.connect(cfg)
        try:
            total = await rebuild.count(conn, scope, after or rebuild.START)
        finally:
            await conn.close()
        with _progress(total=total, desc="rebuilding", unit="conv") as bar:
            return await rebuild.run(
                cfg,
                scope,
                after=after,
                batch_size=batch_size,
                stop=stop,
                on_batch=bar.update,
            )

    summary = asyncio.run(main())
    click.echo("\n".join(summary.lines()))
    if not summary.complete:
        sys.exit(1)


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)


# --- export ---------------------------------------------------------------------


@click.command("export-corpus")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True, path_type=pathlib.Path),
    help="File to write (default: standard output).",
)
def export_corpus_command(output: pathlib.Path | None) -> None:
    """Write the chat corpus as JSON Lines of message-created events."""
    from worker import corpus, export

    data = corpus.load()
    if output is None:
        export.write_corpus(sys.stdout, data)
        return

    with (
        output.open("w", encoding="utf-8") as out,
        _progress(total=len(data), desc="exporting", unit="conv") as bar,
    ):
        written = export.write_corpus(out, data, on_conversation=lambda: bar.update(1))
    click.echo(f"wrote {written:,} events to {output}", err=True)
