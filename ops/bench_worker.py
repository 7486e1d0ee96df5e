"""Throughput of the worker on the whole chat corpus, Kafka and PostgreSQL local.

Not a test: it prints figures measured in one run, so the ratios compare like with
like on whatever machine runs it.

    .venv/bin/python ops/bench_worker.py [--baseline-events N]

1. ceiling: the topic consumed and parsed, no database;
2. default: the worker as configured by default (batches of 1,000);
3. per-event: the same worker with batch size 1 over the first N events (the whole
   corpus one event per transaction takes too long to wait for; the rate is what
   is compared).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import os
import time
import uuid

import aiokafka
import asyncpg

from worker import corpus, db, demo, events, kafka, migrations, service, stack
from worker import settings as settings_module


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    events: int
    seconds: float
    profile: dict[str, float]

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def _base_settings() -> settings_module.Settings:
    if "CONVSTATS_DATABASE_URL" not in os.environ:
        env = stack.up()
        os.environ["CONVSTATS_DATABASE_URL"] = env.database_url
        os.environ["CONVSTATS_KAFKA_BOOTSTRAP_SERVERS"] = env.kafka_bootstrap_servers
    return settings_module.Settings()


async def _fresh_database(cfg: settings_module.Settings, name: str) -> str:
    admin = await asyncpg.connect(cfg.database_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = cfg.database_url.rsplit("/", 1)[0] + "/" + name
    conn = await asyncpg.connect(url)
    try:
        await migrations.migrate(conn)
    finally:
        await conn.close()
    return url


async def _worker_run(
    cfg: settings_module.Settings, name: str, limit: int, **changes: object
) -> Run:
    url = await _fresh_database(cfg, f"convstats_bench_{name.replace('-', '_')}")
    run_cfg = cfg.model_copy(
        update={
            "database_url": url,
            "consumer_group": f"bench-{name}-{uuid.uuid4().hex[:8]}",
            "updates_topic": f"bench-updates-{uuid.uuid4().hex[:8]}",
            "http_port": 0,
            **changes,
        }
    )
    await demo.prepare(run_cfg, corpus.load())

    async with service.started(run_cfg) as svc:

        async def done(s: service.Service) -> bool:
            if s.consumer.tally.consumed < limit:
                return False
            backlog: int = await s.pool.fetchval(db.queries()["outbox_unpublished"])
            return backlog == 0

        started = time.perf_counter()
        await service.run(svc, until=done, serve_http=False)
        seconds = time.perf_counter() - started
    return Run(name, svc.consumer.tally.consumed, seconds, svc.consumer.seconds)


async def _ceiling(cfg: settings_module.Settings, total: int) -> Run:
    tps = await kafka.topic_partitions(cfg, cfg.messages_topic)
    reader = aiokafka.AIOKafkaConsumer(
        bootstrap_servers=cfg.kafka_bootstrap_servers,
        enable_auto_commit=False,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )
    await reader.start()
    try:
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        now = datetime.datetime.now(datetime.UTC)
        seen = 0
        started = time.perf_counter()
        while seen < total:
            batch = await reader.getmany(timeout_ms=1000, max_records=1000)
            for records in batch.values():
                for record in records:
                    events.parse(record.value, now, cfg.max_clock_skew_s)
                seen += len(records)
        return Run("ceiling", seen, time.perf_counter() - started, {})
    finally:
        await reader.stop()


async def main(baseline_events: int) -> None:
    cfg = _base_settings().model_copy(
        update={"messages_topic": f"bench-messages-{uuid.uuid4().hex[:8]}"}
    )
    data = corpus.load()
    await kafka.ensure_topics(cfg)
    total = await demo.load(cfg, data)

    runs = [
        await _ceiling(cfg, total),
        await _worker_run(cfg, "default", total),
        await _worker_run(cfg, "per-event", baseline_events, batch_size=1),
    ]
    _report(runs)


def _report(runs: list[Run]) -> None:
    ceiling, default, per_event = runs
    print()
    for run in runs:
        profile = ", ".join(f"{k} {v:.1f}s" for k, v in run.profile.items())
        print(
            f"{run.name:<10} {run.events:>8,} events {run.seconds:>7.1f}s "
            f"{run.rate:>9,.0f} events/s  {profile}"
        )
    print(f"default / per-event : {default.rate / per_event.rate:6.1f}x")
    print(f"default / ceiling   : {default.rate / ceiling.rate:6.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-events", type=int, default=20_000)
    asyncio.run(main(parser.parse_args().baseline_events))
