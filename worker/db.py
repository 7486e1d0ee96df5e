"""Connections and the named queries of ``worker/queries/*.sql``."""

from __future__ import annotations

import functools
import json
import pathlib
import re

import asyncpg

from worker import settings as settings_module

_QUERY_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@functools.cache
def queries() -> dict[str, str]:
    """Every named query of the query files, read once per process."""
    found: dict[str, str] = {}
    for path in sorted((pathlib.Path(__file__).parent / "queries").glob("*.sql")):
        parts = _QUERY_HEADER.split(path.read_text())
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in found:
                raise ValueError(f"query {name} is defined twice ({path.name})")
            found[name] = body.strip()
    return found


async def _init_connection(conn: asyncpg.Connection) -> None:
    # A text codec for jsonb, so payloads pass through as the JSON the database
    # built instead of being parsed and dumped again.
    await conn.set_type_codec(
        "jsonb", encoder=lambda v: v, decoder=lambda v: v, schema="pg_catalog"
    )


async def create_pool(
    cfg: settings_module.Settings, *, min_size: int = 1, max_size: int | None = None
) -> asyncpg.Pool:
    timeout_ms = int(cfg.db_statement_timeout_s * 1000)
    pool = await asyncpg.create_pool(
        cfg.database_url,
        min_size=min_size,
        max_size=max_size or cfg.db_pool_size,
        init=_init_connection,
        command_timeout=cfg.db_statement_timeout_s + 5,
        # In server_settings rather than a SET: the pool's RESET ALL on release
        # would undo a SET for the next borrower.
        server_settings={"statement_timeout": str(timeout_ms), "TimeZone": "UTC"},
    )
    assert pool is not None
    return pool


async def connect(cfg: settings_module.Settings) -> asyncpg.Connection:
    conn = await asyncpg.connect(cfg.database_url, server_settings={"TimeZone": "UTC"})
    await _init_connection(conn)
    return conn


def dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
