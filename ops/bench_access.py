"""Latency of worker.access on a million conversations: a benchmark, not a test.

Builds its own database, convstats_bench_access, next to the one named by
CONVSTATS_DATABASE_URL (default: the local stack), migrates it, seeds 10,000 users
and 1,000,000 conversations, then times each call from the client, one at a time,
and prints p50/p95/p99 with the index each query's plan reads.

    .venv/bin/python ops/bench_access.py [--iterations 2000] [--plans] [--keep]

A hundred "heavy" users own half of the conversations (5,000 each), so that a page
deep in a list exists; the rest are spread over the other 9,900 users.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import os
import random
import statistics
import sys
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from worker import access, db, migrations
from worker import settings as settings_module

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:15432/postgres"
DATABASE = "convstats_bench_access"

USERS = 10_000
CONVERSATIONS = 1_000_000
HEAVY_USERS = 100
PER_HEAVY_USER = 5_000
PAGE_SIZE = 20
# Page 50 of a heavy user's active list starts at row 980 of about 3,500.
DEEP_PAGE = 50
WARMUP = 50
MODES = ("analysis", "psychology", "training", "planning")
# What worker.access passes for the first page: a key above every row.
FIRST_PAGE_KEY = (
    datetime.datetime.max.replace(tzinfo=datetime.UTC),
    uuid.UUID(int=(1 << 128) - 1),
)

# Targets: the product's (create < 100 ms, lookup < 50 ms) and our own aim.
SPEC_CREATE_MS = 100.0
SPEC_LOOKUP_MS = 50.0
AIM_P99_MS = 5.0
# "Deep page ≈ first page": within this ratio of p50s, or this many ms of each other.
DEEP_RATIO = 1.5
DEEP_SLACK_MS = 0.5

# The seeding session skips triggers (session_replication_role is per session,
# nothing is switched off for anyone else): no outbox rows for a million inserts
# nobody will publish. The guard's archived_at rule is therefore written out here.
SEED_SQL = """
SET session_replication_role = replica;
SELECT setseed(0.42);
INSERT INTO users (id)
SELECT md5('bench-user-' || n)::uuid FROM generate_series(0, {users} - 1) AS n;
INSERT INTO conversations (
    user_id, title, mode, status, context_data, last_message_at, message_count,
    created_at, updated_at, archived_at
)
SELECT md5('bench-user-' || s.owner)::uuid,
       'Conversation ' || s.n,
       (ARRAY['analysis', 'psychology', 'training', 'planning'])[1 + s.r_mode],
       s.status,
       CASE WHEN s.n % 10 = 0
            THEN '{{"market_hours": true, "trading_instruments": ["ES", "NQ"]}}'
            ELSE '{{}}' END::jsonb,
       s.updated_at,
       s.message_count,
       s.updated_at - s.age,
       s.updated_at,
       CASE WHEN s.status = 'archived' THEN s.updated_at END
FROM (
    SELECT n,
           CASE WHEN n < {heavy_rows} THEN n % {heavy_users}
                ELSE {heavy_users} + n % ({users} - {heavy_users}) END AS owner,
           floor(random() * 4)::int AS r_mode,
           CASE WHEN r < 0.7 THEN 'active'
                WHEN r < 0.9 THEN 'archived'
                ELSE 'deleted' END AS status,
           now() - random() * interval '365 days' AS updated_at,
           random() * interval '30 days' AS age,
           (random() * 200)::int AS message_count
    FROM (SELECT n, random() AS r FROM generate_series(0, {rows} - 1) AS n) AS g
) AS s;
RESET session_replication_role;
"""


def _with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


def _bench_user(n: int) -> uuid.UUID:
    """The id the seed gives user n: md5 of a fixed text, as PostgreSQL casts it."""
    return uuid.UUID(hashlib.md5(f"bench-user-{n}".encode()).hexdigest())


# --- the database ---------------------------------------------------------------


async def prepare_database(admin_url: str, reuse: bool) -> str:
    url = _with_database(admin_url, DATABASE)
    admin = await asyncpg.connect(admin_url)
    try:
        exists = await admin.fetchval(
            "SELECT true FROM pg_database WHERE datname = $1", DATABASE
        )
        if exists and reuse and await _is_seeded(url):
            print(f"reusing {DATABASE} (already seeded)")
            return url
        await admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await admin.close()

    conn = await asyncpg.connect(url)
    try:
        await migrations.migrate(conn)
        await seed(conn)
    finally:
        await conn.close()
    return url


async def _is_seeded(url: str) -> bool:
    conn = await asyncpg.connect(url)
    try:
        count = await conn.fetchval("SELECT count(*) FROM conversations")
    except asyncpg.UndefinedTableError:
        return False
    finally:
        await conn.close()
    return bool(count >= CONVERSATIONS)


async def seed(conn: asyncpg.Connection) -> None:
    sql = SEED_SQL.format(
        users=USERS,
        rows=CONVERSATIONS,
        heavy_users=HEAVY_USERS,
        heavy_rows=HEAVY_USERS * PER_HEAVY_USER,
    )
    started = time.perf_counter()
    await conn.execute(sql)
    inserted = time.perf_counter()
    await conn.execute("VACUUM (ANALYZE) users, conversations")
    done = time.perf_counter()

    size = await conn.fetchval(
        "SELECT pg_size_pretty(pg_total_relation_size('conversations'))"
    )
    print(
        f"seeded {USERS:,} users and {CONVERSATIONS:,} conversations in "
        f"{inserted - started:.1f} s (+ {done - inserted:.1f} s VACUUM ANALYZE); "
        f"conversations with indexes: {size}"
    )


# --- the calls ------------------------------------------------------------------


Call = Callable[[int], Awaitable[Any]]
Key = tuple[datetime.datetime, uuid.UUID]


async def build_calls(pool: asyncpg.Pool, iterations: int) -> dict[str, Call]:
    """One call per measured operation, each taking the iteration number."""
    rng = random.Random(7)
    heavy = [_bench_user(n) for n in range(HEAVY_USERS)]
    everyone = [_bench_user(n) for n in range(USERS)]
    samples = await pool.fetch(
        "SELECT id, user_id FROM conversations TABLESAMPLE SYSTEM (1) REPEATABLE (7)"
        " LIMIT $1",
        iterations,
    )
    deep = await _deep_cursors(pool, heavy)

    async def create(i: int) -> Any:
        return await access.create(pool, rng.choice(everyone), mode=MODES[i % 4])

    async def get(i: int) -> Any:
        row = samples[i % len(samples)]
        return await access.get(pool, row["user_id"], row["id"])

    async def first_page(i: int) -> Any:
        user = heavy[i % HEAVY_USERS]
        return await access.list_conversations(pool, user, status="active")

    async def deep_page(i: int) -> Any:
        user = heavy[i % HEAVY_USERS]
        return await access.list_conversations(
            pool, user, status="active", cursor=deep[user]
        )

    async def mode_page(i: int) -> Any:
        user = heavy[i % HEAVY_USERS]
        return await access.list_conversations(pool, user, mode=MODES[i % 4])

    async def unfiltered_page(i: int) -> Any:
        return await access.list_conversations(pool, heavy[i % HEAVY_USERS])

    return {
        "create": create,
        "get by id": get,
        "active, first page": first_page,
        f"active, page {DEEP_PAGE}": deep_page,
        "by mode, first page": mode_page,
        "unfiltered, first page": unfiltered_page,
    }


async def _deep_cursors(pool: asyncpg.Pool, users: list[uuid.UUID]) -> dict[Any, str]:
    """The cursor that opens page DEEP_PAGE of each user's active list."""
    return {user: (await _deep_position(pool, user))[0] for user in users}


async def _deep_position(pool: asyncpg.Pool, user: uuid.UUID) -> tuple[str, Key]:
    """The cursor of page DEEP_PAGE and the key it stands for (the last row before)."""
    cursor = None
    for _ in range(DEEP_PAGE - 1):
        page = await access.list_conversations(
            pool, user, status="active", cursor=cursor
        )
        cursor = page.next_cursor
    assert cursor is not None, f"user {user} has fewer than {DEEP_PAGE} pages"
    last = page.conversations[-1]
    return cursor, (last.updated_at, last.id)


async def measure(call: Call, iterations: int) -> list[float]:
    """Milliseconds per call, measured one call at a time after a warm-up."""
    for i in range(WARMUP):
        await call(i)
    timings = []
    for i in range(iterations):
        started = time.perf_counter()
        await call(i)
        timings.append((time.perf_counter() - started) * 1000)
    return timings


# --- plans ----------------------------------------------------------------------


async def plans(url: str, pool: asyncpg.Pool) -> dict[str, tuple[str, str, str]]:
    """Per operation: the index of the custom plan, of the generic plan, and the
    generic plan itself (EXPLAIN ANALYZE), with the arguments the benchmark uses.

    asyncpg prepares every statement, and PostgreSQL switches a prepared statement
    to its generic plan after five runs when that looks no dearer, so both must
    read the right index.
    """
    user = _bench_user(0)
    _, deep_key = await _deep_position(pool, user)
    sample = await pool.fetchrow(
        "SELECT id FROM conversations WHERE user_id = $1 LIMIT 1", user
    )
    assert sample is not None
    visible = ["active", "archived"]
    statements: dict[str, tuple[str, tuple[Any, ...]]] = {
        "create": ("access_create", (user, "analysis", None, "{}")),
        "get by id": ("access_get", (sample["id"],)),
        "active, first page": ("access_list_active", (user, *FIRST_PAGE_KEY, 21)),
        f"active, page {DEEP_PAGE}": (
            "access_list_active",
            (user, *deep_key, 21),
        ),
        "by mode, first page": (
            "access_list_by_mode",
            (user, *FIRST_PAGE_KEY, 21, "training", visible),
        ),
        "unfiltered, first page": (
            "access_list_all_modes",
            (user, *FIRST_PAGE_KEY, 21, visible),
        ),
    }

    # Its own connection: PREPARE outlives a rolled back transaction, and closing
    # the connection is what drops the prepared statements.
    conn = await asyncpg.connect(url)
    try:
        found = {}
        for name, (query, args) in statements.items():
            found[name] = await _explain(conn, user, db.queries()[query], args)
        return found
    finally:
        await conn.close()


async def _explain(
    conn: asyncpg.Connection, user: uuid.UUID, sql: str, args: tuple[Any, ...]
) -> tuple[str, str, str]:
    options = "ANALYZE, BUFFERS, COSTS OFF"
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(db.queries()["access_act_as"], str(user))
        custom = await conn.fetch(f"EXPLAIN ({options}) {sql}", *args)
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await conn.execute(f"PREPARE bench_plan AS {sql}")
        literals = ", ".join(_literal(arg) for arg in args)
        generic = await conn.fetch(
            f"EXPLAIN ({options}) EXECUTE bench_plan({literals})"
        )
        await conn.execute("DEALLOCATE bench_plan")
    finally:
        await transaction.rollback()

    custom_text = "\n".join(row[0] for row in custom)
    generic_text = "\n".join(row[0] for row in generic)
    return _indexes(custom_text), _indexes(generic_text), generic_text


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if value == FIRST_PAGE_KEY[0]:
        return "'infinity'"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "ARRAY[" + ", ".join(_literal(v) for v in value) + "]::text[]"
    if isinstance(value, datetime.datetime):
        value = value.isoformat()
    return "'" + str(value).replace("'", "''") + "'"


def _pages(plan: str) -> str:
    """Buffers touched by the whole plan: the first Buffers line is the root's."""
    for line in plan.splitlines():
        _, found, rest = line.partition("Buffers: shared hit=")
        if found:
            return rest.split()[0]
    return "?"


def _indexes(plan: str) -> str:
    names = []
    for line in plan.splitlines():
        _, found, rest = line.partition(" using ")
        if found and rest.split()[0] not in names:
            names.append(rest.split()[0])
    return ", ".join(names) or "(none: insert)"


# --- report ---------------------------------------------------------------------


def percentiles(timings: list[float]) -> tuple[float, float, float]:
    cuts = statistics.quantiles(timings, n=100, method="inclusive")
    return cuts[49], cuts[94], cuts[98]


def verdict(results: dict[str, tuple[float, float, float]]) -> str:
    create_p99 = results["create"][2]
    lookup_p99 = max(p99 for name, (_, _, p99) in results.items() if name != "create")
    worst_p99 = max(create_p99, lookup_p99)
    first_p50 = results["active, first page"][0]
    deep_p50 = results[f"active, page {DEEP_PAGE}"][0]

    spec = create_p99 < SPEC_CREATE_MS and lookup_p99 < SPEC_LOOKUP_MS
    aim = worst_p99 < AIM_P99_MS
    deep_close = (
        deep_p50 <= first_p50 * DEEP_RATIO or deep_p50 - first_p50 <= DEEP_SLACK_MS
    )
    return (
        f"verdict: spec {'MET' if spec else 'MISSED'} (create p99 {create_p99:.2f} "
        f"< {SPEC_CREATE_MS:g} ms, lookups p99 <= {lookup_p99:.2f} < "
        f"{SPEC_LOOKUP_MS:g} ms); aim {'MET' if aim else 'MISSED'} (worst p99 "
        f"{worst_p99:.2f} vs {AIM_P99_MS:g} ms); deep page "
        f"{'≈' if deep_close else 'SLOWER THAN'} first page (p50 {deep_p50:.2f} vs "
        f"{first_p50:.2f} ms)"
    )


async def main(arguments: argparse.Namespace) -> int:
    admin_url = os.environ.get("CONVSTATS_DATABASE_URL", DEFAULT_ADMIN_URL)
    url = await prepare_database(admin_url, arguments.reuse)
    cfg = settings_module.Settings(database_url=url)
    pool = await db.create_pool(cfg, min_size=1, max_size=2)
    try:
        calls = await build_calls(pool, arguments.iterations)
        results = {}
        for name, call in calls.items():
            results[name] = percentiles(await measure(call, arguments.iterations))
        found = await plans(url, pool)
    finally:
        await pool.close()
        if not arguments.keep:
            await _drop(admin_url)

    _print_report(arguments.iterations, results, found, arguments.plans)
    return 0


def _print_report(
    iterations: int,
    results: dict[str, tuple[float, float, float]],
    found: dict[str, tuple[str, str, str]],
    show_plans: bool,
) -> None:
    print(f"\n{iterations} sequential calls each, milliseconds, client side")
    print(
        f"{'operation':<24} {'p50':>7} {'p95':>7} {'p99':>7} {'pages':>6}  "
        "index (custom plan / generic plan)"
    )
    for name, (p50, p95, p99) in results.items():
        custom, generic, plan = found[name]
        where = custom if custom == generic else f"{custom} / {generic}"
        print(
            f"{name:<24} {p50:>7.2f} {p95:>7.2f} {p99:>7.2f} {_pages(plan):>6}  {where}"
        )
    print("(pages: 8 kB buffers the generic plan touched, from EXPLAIN BUFFERS)")
    print(verdict(results))

    if show_plans:
        for name, (_, _, plan) in found.items():
            print(f"\n--- {name}: generic plan\n{plan}")


async def _drop(admin_url: str) -> None:
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    finally:
        await admin.close()


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--plans", action="store_true", help="print each plan")
    parser.add_argument("--keep", action="store_true", help="keep the database")
    parser.add_argument(
        "--reuse", action="store_true", help="skip seeding if the database is seeded"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(_parse(sys.argv[1:]))))
