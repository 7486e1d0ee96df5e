"""Re-consumes the messages topic from a chosen position under a group of its own.

A replay runs the worker's own consumer, pipeline and relay (worker.service), so
every record goes through the same validation and the same SQL rules as live
traffic. Those rules make a message count once whatever the number of deliveries,
and lock conversations in id order, so a replay beside the live worker only finds
duplicates where the database is complete and fills in what it lacks.

The start position is written as the replay group's committed offsets before the
consumer joins: Kafka refuses such a commit while the group has members, which keeps
a replay from rewinding a group in use. The end offsets are taken once at the start;
the replay stops when the group has committed them on every partition.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections.abc import Callable

import aiokafka
import aiokafka.admin
import aiokafka.errors
import asyncpg

from worker import db, kafka, service
from worker import settings as settings_module

logger = logging.getLogger(__name__)

GROUP_PREFIX = "convstats-replay-"


class ReplayError(Exception):
    """The replay cannot start as asked."""


@dataclasses.dataclass(frozen=True)
class StartAt:
    """Where a replay begins; with nothing given, where its group left off.

    A group that has committed nothing yet (the default, a new one) starts at the
    beginning of every partition.
    """

    beginning: bool = False
    # Kafka record timestamps (when a record was written), not message times.
    time: datetime.datetime | None = None
    # partition -> offset; partitions left out are not replayed.
    offsets: dict[int, int] | None = None

    @property
    def resumes(self) -> bool:
        return not self.beginning and self.time is None and self.offsets is None


@dataclasses.dataclass(frozen=True)
class Plan:
    group: str
    starts: dict[aiokafka.TopicPartition, int]
    ends: dict[aiokafka.TopicPartition, int]

    @property
    def total(self) -> int:
        return sum(max(0, self.ends[tp] - self.starts[tp]) for tp in self.ends)

    @property
    def pending(self) -> list[aiokafka.TopicPartition]:
        return sorted(tp for tp in self.ends if self.ends[tp] > self.starts[tp])


@dataclasses.dataclass(frozen=True)
class Summary:
    group: str
    events: int
    applied: int
    duplicates: int
    dead_letters: int
    parked: int
    conversations_changed: int
    seconds: float
    complete: bool

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        out = [
            f"events                 {self.events:>10,}",
            f"  applied              {self.applied:>10,}",
            f"  duplicates           {self.duplicates:>10,}",
            f"  dead letters         {self.dead_letters:>10,}",
            f"  parked               {self.parked:>10,}",
            f"conversations changed  {self.conversations_changed:>10,}",
            f"seconds                {self.seconds:>10.1f}",
            f"events per second      {self.events_per_s:>10,.0f}",
        ]
        if not self.complete:
            out.append(
                f"stopped early; resume with: convstats replay --group {self.group}"
            )
        return out


def default_group(now: datetime.datetime | None = None) -> str:
    at = now or datetime.datetime.now(datetime.UTC)
    return GROUP_PREFIX + at.strftime("%Y%m%dT%H%M%SZ")


def parse_offsets(text: str) -> dict[int, int]:
    """Reads ``0:123,1:456`` (partition:offset, comma separated)."""
    offsets: dict[int, int] = {}
    for part in text.split(","):
        partition, sep, offset = part.strip().partition(":")
        if not sep or not partition.isdigit() or not offset.isdigit():
            raise ValueError(f"expected partition:offset, got {part.strip()!r}")
        offsets[int(partition)] = int(offset)
    return offsets


async def plan(cfg: settings_module.Settings, group: str, start: StartAt) -> Plan:
    """Works out the start and end offset of every partition; changes nothing."""
    if group == cfg.consumer_group:
        raise ReplayError(f"{group} is the live worker's group; a replay needs its own")
    tps = await kafka.topic_partitions(cfg, cfg.messages_topic)
    if not tps:
        raise ReplayError(f"topic {cfg.messages_topic} does not exist")

    probe = aiokafka.AIOKafkaConsumer(
        bootstrap_servers=cfg.kafka_bootstrap_servers, enable_auto_commit=False
    )
    await probe.start()
    try:
        firsts = await probe.beginning_offsets(tps)
        ends = await probe.end_offsets(tps)
        wanted = await _wanted(cfg, probe, group, tps, start)
    finally:
        await probe.stop()

    # Retention may have removed the wanted records, and no offset lies past the end.
    starts = {
        tp: min(max(wanted.get(tp, ends[tp]), firsts[tp]), ends[tp]) for tp in tps
    }
    return Plan(group=group, starts=starts, ends=ends)


async def _wanted(
    cfg: settings_module.Settings,
    probe: aiokafka.AIOKafkaConsumer,
    group: str,
    tps: list[aiokafka.TopicPartition],
    start: StartAt,
) -> dict[aiokafka.TopicPartition, int]:
    if start.offsets is not None:
        known = {tp.partition for tp in tps}
        unknown = sorted(set(start.offsets) - known)
        if unknown:
            raise ReplayError(f"{cfg.messages_topic} has no partition {unknown}")
        return {
            tp: start.offsets[tp.partition]
            for tp in tps
            if tp.partition in start.offsets
        }

    if start.time is not None:
        at_ms = int(start.time.timestamp() * 1000)
        found = await probe.offsets_for_times(dict.fromkeys(tps, at_ms))
        # No record at or after the time: that partition has nothing to replay.
        return {tp: hit.offset for tp, hit in found.items() if hit is not None}

    if start.resumes:
        committed = await _committed(cfg, group, tps)
        if committed:
            return {tp: committed.get(tp, 0) for tp in tps}
    return dict.fromkeys(tps, 0)


async def _committed(
    cfg: settings_module.Settings, group: str, tps: list[aiokafka.TopicPartition]
) -> dict[aiokafka.TopicPartition, int]:
    admin = aiokafka.admin.AIOKafkaAdminClient(
        bootstrap_servers=cfg.kafka_bootstrap_servers
    )
    await admin.start()
    try:
        found = await admin.list_consumer_group_offsets(group, partitions=tps)
    finally:
        await admin.close()
    return {tp: meta.offset for tp, meta in found.items() if meta.offset >= 0}


async def seed(cfg: settings_module.Settings, replay: Plan) -> None:
    """Commits the start offsets for the replay group, which must have no members."""
    seeder = aiokafka.AIOKafkaConsumer(
        bootstrap_servers=cfg.kafka_bootstrap_servers,
        group_id=replay.group,
        enable_auto_commit=False,
    )
    await seeder.start()
    try:
        seeder.assign(list(replay.starts))
        await seeder.commit(dict(replay.starts))
    except aiokafka.errors.CommitFailedError as exc:
        raise ReplayError(
            f"group {replay.group} has active members; a replay needs an idle group"
        ) from exc
    finally:
        await seeder.stop()


async def run(
    cfg: settings_module.Settings,
    replay: Plan,
    *,
    on_progress: Callable[[int], None] | None = None,
) -> Summary:
    """Consumes from the plan's starts to its ends, then stops; see the module."""
    if replay.total == 0:
        return Summary(replay.group, 0, 0, 0, 0, 0, 0, 0.0, complete=True)
    await seed(cfg, replay)
    started = time.perf_counter()
    logger.info(
        "replaying %d records of %s as group %s",
        replay.total,
        cfg.messages_topic,
        replay.group,
        extra={"action": "replay_started", "topic": cfg.messages_topic},
    )

    pool = await db.create_pool(cfg, min_size=1, max_size=2)
    try:
        outbox_mark = await _outbox_mark(pool)
        svc, complete = await _consume(cfg, replay, on_progress)
        changed: int = await pool.fetchval(
            db.queries()["replay_conversations_changed"], outbox_mark
        )
    finally:
        await pool.close()

    tally = svc.consumer.tally
    summary = Summary(
        group=replay.group,
        events=tally.consumed,
        applied=tally.applied,
        duplicates=tally.duplicates,
        dead_letters=tally.dead_lettered,
        parked=tally.parked,
        conversations_changed=changed,
        seconds=time.perf_counter() - started,
        complete=complete,
    )
    logger.info(
        "replay %s: %d events, %d applied, %d conversations changed",
        "finished" if complete else "stopped",
        summary.events,
        summary.applied,
        summary.conversations_changed,
        extra={"action": "replay_done", "group": replay.group},
    )
    return summary


async def _outbox_mark(pool: asyncpg.Pool) -> int:
    mark: int = await pool.fetchval(db.queries()["replay_outbox_mark"])
    return mark


async def _consume(
    cfg: settings_module.Settings,
    replay: Plan,
    on_progress: Callable[[int], None] | None,
) -> tuple[service.Service, bool]:
    admin = aiokafka.admin.AIOKafkaAdminClient(
        bootstrap_servers=cfg.kafka_bootstrap_servers
    )
    await admin.start()
    reached = False

    async def done(svc: service.Service) -> bool:
        nonlocal reached
        if on_progress is not None:
            on_progress(svc.consumer.tally.consumed)
        reached = reached or await _at_ends(admin, replay)
        if not reached:
            return False
        # Without a live worker this relay publishes what the replay changed; with
        # one, that worker's relay holds the lock and publishes it.
        if not svc.relay.leading:
            return True
        backlog: int = await svc.pool.fetchval(db.queries()["outbox_unpublished"])
        return backlog == 0

    try:
        async with service.started(cfg, group_id=replay.group) as svc:
            await service.run(svc, until=done, serve_http=False)
    finally:
        await admin.close()
    if on_progress is not None:
        on_progress(svc.consumer.tally.consumed)
    return svc, reached


async def _at_ends(admin: aiokafka.admin.AIOKafkaAdminClient, replay: Plan) -> bool:
    pending = replay.pending
    if not pending:
        return True
    found = await admin.list_consumer_group_offsets(replay.group, partitions=pending)
    return all(tp in found and found[tp].offset >= replay.ends[tp] for tp in pending)
