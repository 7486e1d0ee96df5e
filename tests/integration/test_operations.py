"""What operators rely on: health and metrics endpoints, a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid

import aiohttp
import asyncpg

from tests import support
from worker import kafka, service
from worker import settings as settings_module


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def test_health_readiness_and_metrics_endpoints(
    settings: settings_module.Settings, pool: asyncpg.Pool
) -> None:
    user = uuid.uuid4()
    await support.create_users(pool, user)
    await support.produce(settings, [support.event(uuid.uuid4(), user)])
    cfg = settings.model_copy(update={"http_port": _free_port()})
    base = f"http://127.0.0.1:{cfg.http_port}"

    async with service.started(cfg) as svc:
        running = asyncio.create_task(service.run(svc))
        while svc.consumer.tally.applied < 1:
            await asyncio.sleep(0.1)
        # Ready once the broker has answered a lag probe, a moment after joining.
        for _ in range(100):
            ready = await _get(base + "/readyz")
            if ready[0] == 200:
                break
            await asyncio.sleep(0.2)
        health = await _get(base + "/healthz")
        metrics = await _get(base + "/metrics")
        svc.stop.set()
        await running

    assert health[0] == 200
    assert ready[0] == 200
    assert '"database": true' in ready[1] and '"kafka": true' in ready[1]
    assert metrics[0] == 200
    assert "convstats_events_applied_total" in metrics[1]
    assert "convstats_outbox_backlog" in metrics[1]


async def test_sigterm_finishes_the_batch_commits_and_stops(
    settings: settings_module.Settings, pool: asyncpg.Pool
) -> None:
    user = uuid.uuid4()
    await support.create_users(pool, user)
    values = [support.event(uuid.uuid4(), user, seconds=i) for i in range(50)]
    await support.produce(settings, values)

    async with service.started(settings) as svc:
        running = asyncio.create_task(service.run(svc, serve_http=False))
        while svc.consumer.tally.applied < len(values):
            await asyncio.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(running, 30)

    assert svc.stop.is_set()
    assert (
        await kafka.group_lag(
            settings, settings.consumer_group, settings.messages_topic
        )
        == 0
    )
