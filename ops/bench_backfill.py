"""Backfill and rebuild throughput on the whole chat corpus, in a database of its own.

    .venv/bin/python ops/bench_backfill.py [--chunk-rows N] [--sessions N] [--keep]

Steps: export the corpus to a temporary JSON Lines file; create and migrate a fresh
database beside the one CONVSTATS_DATABASE_URL names (the local stack by default);
time parsing alone, a plain COPY of the parsed rows into an unindexed table (the
ceiling any backfill could reach), the backfill itself, and a rebuild of every
conversation, first with nothing to repair and then with every row to repair.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import pathlib
import sys
import tempfile
import time
import urllib.parse
import uuid
from typing import Any

import asyncpg

from worker import backfill, corpus, db, export, migrations, rebuild
from worker import settings as settings_module


def _with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


async def _create_database(cfg: settings_module.Settings, name: str) -> str:
    admin = await asyncpg.connect(cfg.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return _with_database(cfg.database_url, name)


async def _drop_database(cfg: settings_module.Settings, name: str) -> None:
    admin = await asyncpg.connect(cfg.database_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _prepare(cfg: settings_module.Settings, data: dict[str, Any]) -> None:
    conn = await db.connect(cfg)
    try:
        await migrations.migrate(conn)
        owners = sorted(corpus.owners(data))
        await conn.execute(db.queries()["ensure_users"], owners)
    finally:
        await conn.close()


async def _parse_only(
    path: pathlib.Path, chunk_rows: int
) -> tuple[float, list[backfill.Chunk]]:
    now = datetime.datetime.now(datetime.UTC)
    chunks = []
    started = time.perf_counter()
    with backfill.open_lines(path, "jsonl") as items, backfill.relaxed_gc():
        for batch in backfill.chunked(items, chunk_rows):
            chunks.append(await backfill.parse_chunk(batch, now, 300.0))
    return time.perf_counter() - started, chunks


async def _copy_ceiling(
    cfg: settings_module.Settings, chunks: list[backfill.Chunk]
) -> float:
    """A plain COPY of the same rows into an unindexed, logged table."""
    conn = await db.connect(cfg)
    try:
        await conn.execute(
            "CREATE TABLE bench_ceiling (line bigint, message_id uuid,"
            " conversation_id uuid, user_id uuid, type text, created_at timestamptz,"
            " fingerprint bytea, title_candidate text, mode text, context_data text)"
        )
        started = time.perf_counter()
        for chunk in chunks:
            async with conn.transaction():
                for rows in chunk.rounds:
                    await conn.copy_records_to_table(
                        "bench_ceiling",
                        records=rows,
                        columns=backfill.StagingRow._fields,
                    )
        elapsed = time.perf_counter() - started
        await conn.execute("DROP TABLE bench_ceiling")
    finally:
        await conn.close()
    return elapsed


async def _rebuilds(cfg: settings_module.Settings) -> tuple[float, float, int]:
    clean = await rebuild.run(cfg, rebuild.Scope())
    conn = await db.connect(cfg)
    try:
        await conn.execute("UPDATE conversations SET message_count = 0")
    finally:
        await conn.close()
    repair = await rebuild.run(cfg, rebuild.Scope())
    return clean.rows_per_s, repair.rows_per_s, repair.repaired


async def main(args: argparse.Namespace) -> None:
    base = settings_module.Settings()
    name = f"convstats_bench_{uuid.uuid4().hex[:10]}"
    data = corpus.load()
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "corpus.jsonl"
        with path.open("w", encoding="utf-8") as out:
            events = export.write_corpus(out, data)
        cfg = base.model_copy(
            update={"database_url": await _create_database(base, name)}
        )
        try:
            await _prepare(cfg, data)
            await _report(cfg, path, events, args)
        finally:
            if args.keep:
                print(f"kept database {name}")
            else:
                await _drop_database(base, name)


async def _report(
    cfg: settings_module.Settings,
    path: pathlib.Path,
    events: int,
    args: argparse.Namespace,
) -> None:
    parse_s, chunks = await _parse_only(path, args.chunk_rows)
    ceiling_s = await _copy_ceiling(cfg, chunks)
    del chunks
    summary = await backfill.run(
        cfg, path, chunk_rows=args.chunk_rows, sessions=args.sessions
    )
    assert summary.applied == events, summary.lines()
    clean_rows_s, repair_rows_s, repaired = await _rebuilds(cfg)

    backfill_rate = events / summary.seconds
    ceiling_rate = events / ceiling_s
    print(f"events                     {events:>10,}")
    print(f"parse only                 {events / parse_s:>10,.0f} events/s")
    print(f"COPY ceiling (unindexed)   {ceiling_rate:>10,.0f} rows/s")
    print(f"backfill                   {backfill_rate:>10,.0f} events/s")
    print(f"  ratio to the ceiling     {backfill_rate / ceiling_rate:>10.2f}")
    print(
        f"  stages: parsing {summary.parse_seconds:.1f}s, merging "
        f"{summary.merge_seconds:.1f}s of {summary.seconds:.1f}s "
        f"({args.sessions} session(s), {args.chunk_rows:,} rows per chunk)"
    )
    print(f"rebuild, nothing to repair {clean_rows_s:>10,.0f} rows/s")
    print(f"rebuild, {repaired:,} repaired {repair_rows_s:>10,.0f} rows/s")


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk-rows", type=int, default=backfill.DEFAULT_CHUNK_ROWS)
    parser.add_argument("--sessions", type=int, default=backfill.DEFAULT_SESSIONS)
    parser.add_argument("--keep", action="store_true", help="keep the database")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(_arguments(sys.argv[1:])))
