"""Settings that would let the worker fight itself are refused before it starts."""

from __future__ import annotations

import pydantic
import pytest

from tests.acceptance import workers
from worker import settings as settings_module

POLL_INTERVAL_MS = 300_000


def test_a_statement_timeout_under_half_the_poll_interval_is_accepted() -> None:
    cfg = settings_module.Settings(
        db_statement_timeout_s=149.9, max_poll_interval_ms=POLL_INTERVAL_MS
    )

    assert cfg.db_statement_timeout_s == 149.9


@pytest.mark.parametrize("timeout_s", [150.0, 300.0, 900.0])
def test_a_statement_timeout_near_the_poll_interval_is_refused(
    timeout_s: float,
) -> None:
    with pytest.raises(pydantic.ValidationError) as refused:
        settings_module.Settings(
            db_statement_timeout_s=timeout_s, max_poll_interval_ms=POLL_INTERVAL_MS
        )

    assert "db_statement_timeout_s" in str(refused.value)


async def test_the_worker_refuses_to_start_with_such_settings(
    settings: settings_module.Settings, fleet: workers.Fleet
) -> None:
    # model_copy skips validation, as a hand-edited environment would.
    cfg = settings.model_copy(
        update={"db_statement_timeout_s": 200.0, "max_poll_interval_ms": 300_000}
    )

    worker = fleet.start(cfg)
    status = await worker.exited(60)

    assert status == 1
    assert "db_statement_timeout_s must be under half" in worker.tail()
    assert not worker.logged("consumer_started")
