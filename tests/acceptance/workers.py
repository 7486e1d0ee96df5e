"""`convstats run` as real processes: started with a test's settings, killed, awaited.

The acceptance tests treat the worker as a supervisor would: a process that may be
killed at any moment and started again, observed only through PostgreSQL and Kafka.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import aiokafka
import asyncpg

from tests import support
from worker import kafka
from worker import settings as settings_module

CONVSTATS = str(pathlib.Path(sys.executable).with_name("convstats"))
POLL_S = 0.2
# Lines of a worker's log shown when a test gives up on it.
LOG_TAIL_LINES = 60
# A process that ignores SIGTERM this long is killed, so no test leaves one behind.
STOP_TIMEOUT_S = 30.0


def environment(
    cfg: settings_module.Settings, fault: str | None = None, log_level: str = "INFO"
) -> dict[str, str]:
    """The process environment that gives a worker exactly ``cfg``."""
    # Inherited CONVSTATS_* variables are dropped: every setting comes from cfg,
    # and a CONVSTATS_FAULT left in a developer's shell would kill every worker.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSTATS_")}
    for name, value in cfg.model_dump().items():
        env[f"CONVSTATS_{name.upper()}"] = str(value)
    env["CONVSTATS_LOG_LEVEL"] = log_level
    if fault is not None:
        env["CONVSTATS_FAULT"] = fault
    return env


class Worker:
    """One `convstats run` process; its output goes to a log file."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log: pathlib.Path):
        self.name = name
        self.proc = proc
        self.log = log

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> int:
        """SIGKILL, as the kernel's OOM killer or a lost node would."""
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout=STOP_TIMEOUT_S)

    async def stop(self) -> int:
        """SIGTERM, as a supervisor stops a worker; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.exited(STOP_TIMEOUT_S)

    async def exited(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name} still running after {timeout_s:.0f}s\n{self.tail()}"
                )
            await asyncio.sleep(POLL_S)
        return self.proc.returncode

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace")
        kept = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log.name} ---\n{kept}"

    def logged(self, action: str) -> bool:
        """Whether the worker logged a record with this ``action`` field."""
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return f"action={action}" in text


class Fleet:
    """Starts workers for one test and makes sure none outlives it."""

    def __init__(self, directory: pathlib.Path) -> None:
        self._directory = directory
        self.started: list[Worker] = []

    def start(
        self,
        cfg: settings_module.Settings,
        *,
        fault: str | None = None,
        log_level: str = "INFO",
    ) -> Worker:
        name = f"worker-{len(self.started) + 1}"
        log = self._directory / f"{name}.log"
        with log.open("wb") as output:
            proc = subprocess.Popen(
                [CONVSTATS, "run"],
                env=environment(cfg, fault, log_level),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        worker = Worker(name, proc, log)
        self.started.append(worker)
        return worker

    def running(self) -> list[Worker]:
        return [w for w in self.started if w.returncode is None]

    def close(self) -> None:
        for worker in self.running():
            worker.kill()

    def tails(self) -> str:
        return "\n".join(worker.tail() for worker in self.started)


async def wait_until(
    condition: Callable[[], Awaitable[bool]],
    *,
    timeout_s: float,
    what: str,
    alive: Iterable[Worker] = (),
    poll_s: float = POLL_S,
) -> None:
    """Polls ``condition``; fails early when one of ``alive`` exits meanwhile."""
    watched = list(alive)
    deadline = time.monotonic() + timeout_s
    while not await condition():
        for worker in watched:
            if worker.returncode is not None:
                raise AssertionError(
                    f"{worker.name} exited with {worker.returncode} while waiting "
                    f"for {what}\n{worker.tail()}"
                )
        if time.monotonic() > deadline:
            tails = "\n".join(worker.tail() for worker in watched)
            raise AssertionError(f"no {what} within {timeout_s:.0f}s\n{tails}")
        await asyncio.sleep(poll_s)


async def wait_consuming(worker: Worker, timeout_s: float = 60.0) -> None:
    """Waits until the worker's consumer has started (its signals are handled)."""

    async def consuming() -> bool:
        return worker.logged("consumer_started")

    await wait_until(
        consuming, timeout_s=timeout_s, what="a started consumer", alive=[worker]
    )


async def drained(cfg: settings_module.Settings, pool: asyncpg.Pool) -> bool:
    """True once every record is committed and every update published."""
    # Offsets first: a batch's rows and outbox rows commit before its offsets, so
    # once the lag is 0 every outbox row it will ever leave is already visible.
    lag = await kafka.group_lag(cfg, cfg.consumer_group, cfg.messages_topic)
    if lag:
        return False
    unpublished: int = await pool.fetchval(
        "SELECT count(*) FROM convstats_outbox WHERE published_at IS NULL"
    )
    return unpublished == 0


async def wait_drained(
    cfg: settings_module.Settings,
    pool: asyncpg.Pool,
    alive: Iterable[Worker],
    timeout_s: float = 120.0,
) -> None:
    await wait_until(
        lambda: drained(cfg, pool),
        timeout_s=timeout_s,
        what="drain (lag 0, outbox published)",
        alive=alive,
    )


async def run_to_drain(
    fleet: Fleet, cfg: settings_module.Settings, pool: asyncpg.Pool
) -> Worker:
    """One worker over everything produced so far, stopped as a supervisor would."""
    worker = fleet.start(cfg)
    await wait_consuming(worker)
    await wait_drained(cfg, pool, [worker])
    status = await worker.stop()
    assert status == 0, worker.tail()
    return worker


async def applied_count(pool: asyncpg.Pool) -> int:
    """Messages in the ledger: each distinct message applied counts once."""
    count: int = await pool.fetchval("SELECT count(*) FROM convstats_applied_messages")
    return count


async def committed_count(cfg: settings_module.Settings) -> int:
    """Records of the messages topic the group has committed, all partitions."""
    tps = await kafka.topic_partitions(cfg, cfg.messages_topic)
    probe = aiokafka.AIOKafkaConsumer(
        bootstrap_servers=cfg.kafka_bootstrap_servers,
        group_id=cfg.consumer_group,
        enable_auto_commit=False,
    )
    await probe.start()
    try:
        return sum([await probe.committed(tp) or 0 for tp in tps])
    finally:
        await probe.stop()


async def trickle(
    cfg: settings_module.Settings,
    values: Sequence[dict[str, Any] | bytes],
    *,
    chunk: int,
    pause_s: float,
) -> None:
    """Produces events (or raw values) a chunk at a time, as a live stream would."""
    producer = kafka.producer(cfg)
    await producer.start()
    try:
        for start in range(0, len(values), chunk):
            sent = [
                await producer.send(
                    cfg.messages_topic, key=_key(value), value=support.encode(value)
                )
                for value in values[start : start + chunk]
            ]
            await asyncio.gather(*sent)
            await asyncio.sleep(pause_s)
    finally:
        await producer.stop()


def _key(value: dict[str, Any] | bytes) -> bytes | None:
    return None if isinstance(value, bytes) else value["conversation_id"].encode()
