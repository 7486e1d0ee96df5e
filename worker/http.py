"""The /metrics, /healthz and /readyz endpoints."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import prometheus_client
from aiohttp import web

logger = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[dict[str, bool]]]


def application(ready: ReadyCheck) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=prometheus_client.generate_latest(),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )

    async def healthz(_: web.Request) -> web.Response:
        # Alive means the event loop answers; a crashed loop stops the process.
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        checks = await ready()
        status = 200 if all(checks.values()) else 503
        return web.json_response(
            {"ready": status == 200, "checks": checks}, status=status
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def serve(ready: ReadyCheck, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(application(ready), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    logger.info(
        "serving /metrics, /healthz, /readyz on %s:%d",
        host,
        port,
        extra={"action": "http_started"},
    )
    return runner
