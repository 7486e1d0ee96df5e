"""The ``convstats`` command line."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import click

from worker import stack

T = TypeVar("T")

logger = logging.getLogger(__name__)


def _settings() -> Any:
    # Imported late: most commands need only a few modules, and start faster.
    import pydantic

    from worker import settings

    try:
        return settings.Settings()
    except pydantic.ValidationError as exc:
        raise click.ClickException(f"invalid CONVSTATS_ settings:\n{exc}") from exc


class ServiceError(click.ClickException):
    """PostgreSQL or Kafka could not be reached or refused the request."""

    # 2, so that `verify` keeps 1 for "drift found".
    exit_code = 2


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a command's coroutine; a service that cannot be reached is one line."""
    import aiokafka.errors
    import asyncpg

    try:
        return asyncio.run(coro)
    except (
        OSError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        aiokafka.errors.KafkaError,
    ) as exc:
        raise ServiceError(f"{type(exc).__name__}: {exc}") from exc


@click.group()
@click.option(
    "--log-level",
    envvar="CONVSTATS_LOG_LEVEL",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option(
    "--log-format",
    envvar="CONVSTATS_LOG_FORMAT",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"]),
)
def main(log_level: str, log_format: str) -> None:
    """Keeps chat conversation statistics exact from a stream of messages."""
    from worker import logs

    logs.setup(log_level, log_format)


# --- local services -------------------------------------------------------------


@main.group("stack")
def stack_group() -> None:
    """Local PostgreSQL and Kafka for development and tests (no Docker needed)."""


@stack_group.command("up")
def stack_up() -> None:
    """Start both services (installing and formatting on first use)."""
    env = _stack_call(stack.up)
    click.echo(stack.export_lines(env))


@stack_group.command("down")
def stack_down() -> None:
    """Stop both services; their data is kept."""
    _stack_call(stack.down)


@stack_group.command("status")
def stack_status() -> None:
    for service, state in _stack_call(stack.status).items():
        click.echo(f"{service:<12} {state}")


@stack_group.command("env")
def stack_env() -> None:
    """Print export lines for the settings that point at the local services."""
    click.echo(stack.export_lines(_stack_call(stack.env)))


def _stack_call(fn: Any) -> Any:
    try:
        return fn()
    except stack.StackError as exc:
        raise click.ClickException(str(exc)) from exc


def _ensure_services() -> None:
    """Starts the local stack unless the environment names other services."""
    if os.environ.get("CONVSTATS_DATABASE_URL") is None:
        env = _stack_call(stack.up)
        os.environ["CONVSTATS_DATABASE_URL"] = env.database_url
        os.environ["CONVSTATS_KAFKA_BOOTSTRAP_SERVERS"] = env.kafka_bootstrap_servers


# --- schema ---------------------------------------------------------------------


@main.group("migrate", invoke_without_command=True)
@click.pass_context
def migrate_group(ctx: click.Context) -> None:
    """Bring the schema to the latest version (or see: down, status)."""
    if ctx.invoked_subcommand is None:
        _migrate(None)


@migrate_group.command("up")
def migrate_up() -> None:
    """Apply every pending migration."""
    _migrate(None)


@migrate_group.command("down")
@click.argument("version", type=int)
def migrate_down(version: int) -> None:
    """Roll back to VERSION (0 removes everything)."""
    _migrate(version)


@migrate_group.command("status")
def migrate_status() -> None:
    from worker import db, migrations

    async def status() -> list[migrations.MigrationState]:
        conn = await db.connect(_settings())
        try:
            return await migrations.status(conn)
        finally:
            await conn.close()

    for state in _run(status()):
        when = state.applied_at.isoformat() if state.applied_at else "pending"
        m = state.migration
        click.echo(f"{m.version:04d}  {m.name:<28} {when}")


def _migrate(target: int | None) -> None:
    from worker import db, migrations

    async def migrate() -> list[str]:
        conn = await db.connect(_settings())
        try:
            return await migrations.migrate(conn, target)
        finally:
            await conn.close()

    try:
        done = _run(migrate())
    except migrations.MigrationError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("\n".join(done) if done else "schema is up to date")


# --- the worker -----------------------------------------------------------------


@main.command("run")
@click.option("--group", help="Consumer group (default: CONVSTATS_CONSUMER_GROUP).")
def run_command(group: str | None) -> None:
    """Consume message-created and publish conversation-updated until stopped."""
    from worker import service

    async def run() -> None:
        async with service.started(_settings(), group_id=group) as svc:
            await service.run(svc)

    try:
        _run(run())
    except Exception:
        # Exit non-zero so the supervisor restarts the worker: uncommitted work is
        # redelivered, and the restart is visible instead of a silent stall.
        logger.exception("worker failed", extra={"action": "worker_failed"})
        sys.exit(1)


@main.command("demo")
def demo_command() -> None:
    """The whole chat corpus end to end: load, apply, publish, summarise.

    Starts the local stack unless CONVSTATS_DATABASE_URL names a database. Running it
    again replays the corpus: nothing changes and nothing is published.
    """
    _ensure_services()
    from worker import demo

    summary = demo.run(_settings())
    click.echo("\n".join(summary.lines()))


@main.group("dlq")
def dlq_group() -> None:
    """Inspect dead letters and send chosen ones back after a fix."""


@dlq_group.command("list")
@click.option("--reason", help="Only letters with this reason, e.g. not_json.")
def dlq_list(reason: str | None) -> None:
    """One line per dead letter: position, reason, source, detail."""
    from worker import dlq

    letters = dlq.select(_run(dlq.read(_settings())), reason=reason)
    for letter in letters:
        source = (
            f"{letter.meta('source_topic')}[{letter.meta('source_partition')}]"
            f"@{letter.meta('source_offset')}"
        )
        click.echo(
            f"{letter.position:<12} {letter.meta('reason'):<24} {source:<32} "
            f"{letter.meta('detail')[:80]}"
        )
    click.echo(f"{len(letters)} dead letters")


@dlq_group.command("show")
@click.argument("position")
def dlq_show(position: str) -> None:
    """Headers and value of the letter at POSITION (partition:offset)."""
    from worker import dlq

    found = dlq.select(_run(dlq.read(_settings())), positions=[position])
    if not found:
        raise click.ClickException(f"no dead letter at {position}")
    letter = found[0]
    click.echo(f"position  {letter.position}")
    click.echo(f"key       {letter.key!r}")
    for name, value in letter.headers:
        shown = "(null)" if value is None else value.decode("utf-8", "replace")
        click.echo(f"header    {name}: {shown}")
    value = letter.value or b""
    click.echo(f"value     ({len(value):,} bytes)")
    click.echo(value.decode("utf-8", "backslashreplace"))


@dlq_group.command("redrive")
@click.argument("positions", nargs=-1)
@click.option("--reason", help="Every letter with this reason.")
@click.option("--dry-run", is_flag=True, help="Say what would be sent.")
def dlq_redrive(positions: tuple[str, ...], reason: str | None, dry_run: bool) -> None:
    """Send letters (by partition:offset, or --reason) back to their source topic."""
    from worker import dlq

    if not positions and reason is None:
        raise click.UsageError("name positions or a --reason")
    cfg = _settings()
    chosen = dlq.select(_run(dlq.read(cfg)), positions=positions, reason=reason)
    if dry_run:
        click.echo("\n".join(letter.position for letter in chosen))
        click.echo(f"would redrive {len(chosen)} dead letters")
        return
    click.echo(f"redrove {_run(dlq.redrive(cfg, chosen))} dead letters")


@main.command("schemas")
@click.option("--write", is_flag=True, help="Regenerate the files under schema/events.")
def schemas_command(write: bool) -> None:
    """Print (or --write) the JSON Schema of each event type."""
    from worker import schemas

    if write:
        for path in schemas.write():
            click.echo(f"wrote {path}")
        return
    for name, text in schemas.generate().items():
        click.echo(f"# {name}\n{text}")


@main.command("verify")
@click.option(
    "--watch",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Re-check every SECONDS until SIGINT or SIGTERM, keeping the "
    "convstats_drift_rows gauge current.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="With --watch, serve /metrics on this port (0: off).",
)
@click.option(
    "--metrics-host", default="127.0.0.1", show_default=True, help="Address to bind."
)
def verify_command(watch: float | None, metrics_port: int, metrics_host: str) -> None:
    """Recompute every conversation's stats from the ledger; exit 1 on drift."""
    from worker import db, verify

    if metrics_port and watch is None:
        raise click.UsageError("--metrics-port serves the gauge of --watch; add it")
    if watch is not None:
        import prometheus_client

        if metrics_port:
            prometheus_client.start_http_server(metrics_port, addr=metrics_host)

        async def watch_drift() -> None:
            pool = await db.create_pool(_settings(), max_size=2)
            try:
                await verify.watch_until_signalled(pool, watch)
            finally:
                await pool.close()

        _run(watch_drift())
        return

    async def check() -> list[verify.Drift]:
        pool = await db.create_pool(_settings())
        try:
            return await verify.drift(pool)
        finally:
            await pool.close()

    found = _run(check())
    for item in found:
        click.echo(
            f"{item.conversation_id}  {item.field}: stored {item.stored}, "
            f"ledger says {item.expected}"
        )
    if found:
        click.echo(f"drift in {verify.conversations(found)} conversations")
        sys.exit(1)
    click.echo("no drift")


from worker import cli_conversations  # noqa: E402

main.add_command(cli_conversations.conversations)

from worker import cli_history  # noqa: E402

main.add_command(cli_history.replay_command)
main.add_command(cli_history.backfill_command)
main.add_command(cli_history.rebuild_command)
main.add_command(cli_history.export_corpus_command)
