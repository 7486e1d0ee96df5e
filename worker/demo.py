"""The end-to-end run on the real chat corpus: load, consume, publish, summarise."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import tqdm

from worker import corpus, db, kafka, migrations, service
from worker import settings as settings_module

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Summary:
    events_produced: int
    events_consumed: int
    applied: int
    duplicates: int
    dead_letters: int
    conversations: int
    updates_published: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events_consumed / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        return [
            f"events produced     {self.events_produced:>10,}",
            f"events consumed     {self.events_consumed:>10,}",
            f"  applied           {self.applied:>10,}",
            f"  duplicates        {self.duplicates:>10,}",
            f"  dead letters      {self.dead_letters:>10,}",
            f"conversations       {self.conversations:>10,}",
            f"updates published   {self.updates_published:>10,}",
            f"seconds             {self.seconds:>10.1f}",
            f"events per second   {self.events_per_s:>10,.0f}",
        ]


async def prepare(cfg: settings_module.Settings, corpus_data: dict[str, Any]) -> None:
    """Migrates the database and creates the users who own the corpus conversations."""
    conn = await db.connect(cfg)
    try:
        await migrations.migrate(conn)
        owners = sorted(corpus.owners(corpus_data))
        await conn.execute(db.queries()["ensure_users"], owners)
    finally:
        await conn.close()
    await kafka.ensure_topics(cfg)


async def load(cfg: settings_module.Settings, corpus_data: dict[str, Any]) -> int:
    events = list(corpus.events(corpus_data))
    with tqdm.tqdm(total=len(events), desc="producing", unit="ev") as bar:
        return await kafka.produce(
            cfg,
            cfg.messages_topic,
            (
                (event["conversation_id"].encode(), db.dumps(event).encode())
                for event in events
            ),
            on_sent=lambda count: _advance(bar, count),
        )


def _advance(bar: tqdm.tqdm[Any], count: int) -> None:
    bar.update(count)


async def consume(
    cfg: settings_module.Settings, expected: int, produced: int = 0
) -> Summary:
    """Runs the worker until the topic is drained and the outbox is empty."""
    started = time.perf_counter()
    async with service.started(cfg) as svc:
        with tqdm.tqdm(total=expected, desc="applying", unit="ev") as bar:

            async def drained(s: service.Service) -> bool:
                bar.update(s.consumer.tally.consumed - bar.n)
                if s.consumer.lag != 0 or not s.relay.leading:
                    return False
                backlog: int = await s.pool.fetchval(db.queries()["outbox_unpublished"])
                return backlog == 0

            await service.run(svc, until=drained, serve_http=False)
        conversations = await svc.pool.fetchval("SELECT count(*) FROM conversations")

    tally = svc.consumer.tally
    return Summary(
        events_produced=produced,
        events_consumed=tally.consumed,
        applied=tally.applied,
        duplicates=tally.duplicates,
        dead_letters=tally.dead_lettered,
        conversations=conversations,
        updates_published=svc.relay.published,
        seconds=time.perf_counter() - started,
    )


async def main(cfg: settings_module.Settings) -> Summary:
    corpus_data = corpus.load()
    await prepare(cfg, corpus_data)
    produced = await load(cfg, corpus_data)
    expected = await kafka.group_lag(cfg, cfg.consumer_group, cfg.messages_topic)
    return await consume(cfg, expected, produced)


def run(cfg: settings_module.Settings) -> Summary:
    return asyncio.run(main(cfg))
