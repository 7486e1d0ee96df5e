"""Runs the worker: consumer, outbox relay and HTTP endpoints in one process.

The side tasks are watched together: when one of them fails, the others stop and
the process exits non-zero, so a supervisor restarts it rather than leaving a
worker that looks alive and does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import aiokafka
import asyncpg

from worker import consumer, db, http, kafka, parking, pipeline, relay
from worker import settings as settings_module

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Service:
    cfg: settings_module.Settings
    pool: asyncpg.Pool
    producer: aiokafka.AIOKafkaProducer
    consumer: consumer.Consumer
    relay: relay.Relay
    parking: parking.Parking
    stop: asyncio.Event

    async def ready(self) -> dict[str, bool]:
        return {
            "database": await consumer.database_ready(self.pool),
            "kafka": self.consumer.broker_reachable(),
        }


@contextlib.asynccontextmanager
async def started(
    cfg: settings_module.Settings, *, group_id: str | None = None
) -> AsyncIterator[Service]:
    """Connects everything the worker needs; closes it all on the way out."""
    await kafka.ensure_topics(cfg)
    pool = await db.create_pool(cfg)
    producer = kafka.producer(cfg)
    await producer.start()
    try:
        pipe = pipeline.Pipeline(
            pool,
            kafka.KafkaDeadLetters(cfg, producer),
            max_clock_skew_s=cfg.max_clock_skew_s,
        )
        yield Service(
            cfg=cfg,
            pool=pool,
            producer=producer,
            consumer=consumer.Consumer(cfg, pipe, group_id=group_id),
            relay=relay.Relay(cfg, pool, producer),
            parking=parking.Parking(cfg, pool, pipe),
            stop=asyncio.Event(),
        )
    finally:
        await producer.stop()
        await _close_pool(pool, cfg.shutdown_timeout_s)


async def run(
    service: Service,
    *,
    until: Callable[[Service], Awaitable[bool]] | None = None,
    serve_http: bool = True,
) -> None:
    """Runs until a signal, a failed task, or ``until`` says the work is done."""
    _handle_signals(service.stop)
    runner = None
    if serve_http and service.cfg.http_port:
        runner = await http.serve(
            service.ready, service.cfg.http_host, service.cfg.http_port
        )

    tasks = [
        asyncio.create_task(service.consumer.run(service.stop), name="consumer"),
        asyncio.create_task(service.relay.run(service.stop), name="relay"),
        asyncio.create_task(service.parking.run(service.stop), name="parking"),
    ]
    if until is not None:
        tasks.append(asyncio.create_task(_watch(service, until), name="until"))
    try:
        await _supervise(service, tasks)
    finally:
        _restore_signals()
        if runner is not None:
            await runner.cleanup()


async def _supervise(service: Service, tasks: list[asyncio.Task[None]]) -> None:
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    service.stop.set()

    # The others get the shutdown timeout to finish their batch and commit it.
    _, late = await asyncio.wait(pending, timeout=service.cfg.shutdown_timeout_s)
    for task in late:
        logger.error(
            "%s did not stop in %.0fs, cancelling it",
            task.get_name(),
            service.cfg.shutdown_timeout_s,
            extra={"action": "shutdown_timeout"},
        )
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)

    for task in done | pending:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def drained(service: Service) -> bool:
    """True once every record is committed, applied or dead-lettered (none parked),
    and every outbox row is published."""
    if service.consumer.lag != 0 or not service.relay.leading:
        return False
    pending: int = await service.pool.fetchval(db.queries()["pending_work"])
    return pending == 0


async def _watch(service: Service, until: Callable[[Service], Awaitable[bool]]) -> None:
    while not service.stop.is_set():
        if await until(service):
            return
        await asyncio.sleep(0.5)


def _handle_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, stop, signum)


def _restore_signals() -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)


def _on_signal(stop: asyncio.Event, signum: int) -> None:
    logger.info(
        "received %s, finishing the current batch",
        signal.Signals(signum).name,
        extra={"action": "shutdown_requested"},
    )
    stop.set()


async def _close_pool(pool: asyncpg.Pool, timeout_s: float) -> None:
    try:
        await asyncio.wait_for(pool.close(), timeout_s)
    except TimeoutError:
        logger.warning(
            "database pool did not close in %.0fs, terminating it",
            timeout_s,
            extra={"action": "pool_close_timeout"},
        )
        pool.terminate()
