"""``convstats conversations``: read one user's conversations as that user sees them.

Everything goes through :mod:`worker.access`, so the row policy applies exactly as
it does for the chat service: another user's conversation reads as missing.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    import asyncpg

    from worker import access

T = TypeVar("T")

# Spelled out rather than read from worker.events, which would import pydantic at
# start-up; tests/integration/test_access.py checks that the two agree.
MODES = ("analysis", "psychology", "training", "planning")
STATUSES = ("active", "archived", "deleted")
# Wide enough for most auto titles (50 characters and "...").
_TITLE_WIDTH = 54
_UNTITLED = "(untitled)"


@click.group()
def conversations() -> None:
    """One user's conversations, read under that user's row-level security."""


@conversations.command("list")
@click.option("--user", "user_id", type=click.UUID, required=True, help="Acting user.")
@click.option(
    "--status",
    type=click.Choice(STATUSES),
    help="Only this status (default: active and archived).",
)
@click.option("--mode", type=click.Choice(MODES), help="Only this mode.")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@click.option("--cursor", help="The cursor printed under the previous page.")
def list_command(
    user_id: uuid.UUID,
    status: str | None,
    mode: str | None,
    limit: int,
    cursor: str | None,
) -> None:
    """A page of the user's conversations, latest activity first."""
    from worker import access

    page = _with_pool(
        lambda pool: access.list_conversations(
            pool, user_id, status=status, mode=mode, limit=limit, cursor=cursor
        )
    )
    if not page.conversations:
        click.echo("no conversations")
        return
    click.echo("\n".join(_table(page.conversations)))
    if page.next_cursor is not None:
        click.echo(f"\nnext page: --cursor {page.next_cursor}")


@conversations.command("show")
@click.argument("conversation_id", type=click.UUID)
@click.option("--user", "user_id", type=click.UUID, required=True, help="Acting user.")
def show_command(conversation_id: uuid.UUID, user_id: uuid.UUID) -> None:
    """Every field of one conversation."""
    from worker import access

    found = _with_pool(lambda pool: access.get(pool, user_id, conversation_id))
    if found is None:
        raise click.ClickException(
            f"user {user_id} has no conversation {conversation_id}"
        )
    click.echo("\n".join(_fields(found)))


def _with_pool(call: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    # Imported late, like the rest of the CLI, so that `convstats --help` and the
    # stack commands work before the database driver is installed.
    from worker import access, db, settings

    async def run() -> T:
        pool = await db.create_pool(settings.Settings(), min_size=1, max_size=2)
        try:
            return await call(pool)
        finally:
            await pool.close()

    try:
        return asyncio.run(run())
    except access.AccessError as exc:
        raise click.ClickException(str(exc)) from exc


def _table(rows: list[access.Conversation]) -> list[str]:
    header = (
        f"{'ID':<36}  {'UPDATED (UTC)':<19}  {'STATUS':<8}  {'MODE':<10}  "
        f"{'MSGS':>6}  TITLE"
    )
    lines = [header]
    for c in rows:
        lines.append(
            f"{c.id!s:<36}  {_when(c.updated_at):<19}  {c.status:<8}  {c.mode:<10}  "
            f"{c.message_count:>6}  {_short(c.title)}"
        )
    return lines


def _fields(c: access.Conversation) -> list[str]:
    values: list[tuple[str, Any]] = [
        ("id", c.id),
        ("user_id", c.user_id),
        ("title", _UNTITLED if c.title is None else c.title),
        ("title_source", c.title_source),
        ("mode", c.mode),
        ("status", c.status),
        ("message_count", c.message_count),
        ("last_message_at", _when(c.last_message_at)),
        ("created_at", _when(c.created_at)),
        ("updated_at", _when(c.updated_at)),
        ("archived_at", _when(c.archived_at)),
        ("version", c.version),
        ("context_data", json.dumps(c.context_data, indent=2, sort_keys=True)),
    ]
    width = max(len(name) for name, _ in values)
    return [f"{name:<{width}}  {value}" for name, value in values]


def _when(at: datetime.datetime | None) -> str:
    if at is None:
        return "-"
    return at.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _short(title: str | None) -> str:
    if title is None:
        return _UNTITLED
    if len(title) <= _TITLE_WIDTH:
        return title
    return title[: _TITLE_WIDTH - 3].rstrip() + "..."
