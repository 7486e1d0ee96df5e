"""Sleeping that a shutdown can interrupt."""

from __future__ import annotations

import asyncio


async def until_stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Waits up to ``seconds``; True when the wait ended because ``stop`` was set."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True
