"""The final state depends only on the set of distinct events.

Any permutation and duplication of a generated event set, applied in any batch
split, must give the rows that applying each distinct event once, in time order,
gives. ``updated_at`` and ``version`` are left out of the comparison: they record
when and how many effective changes happened, which depends on the batching.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import support
from worker import pipeline

USERS = [uuid.UUID(int=i + 1) for i in range(2)]
CONVERSATIONS = [uuid.UUID(int=0xC0 + i) for i in range(3)]
CONTENTS = [
    "",
    "   ",
    "\x00",
    "Entry at 4512, stop below VWAP",
    "  padded\n\nquestion  ",
    "\U0001f1fa\U0001f1f8" * 60,
    "e\u0301" * 70,
    "why did I revenge trade again?",
]
COMPARED = (
    "id, user_id, title, title_source, mode, status, context_data::text,"
    " message_count, last_message_at, created_at, archived_at"
)


@st.composite
def event_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    count = draw(st.integers(min_value=1, max_value=14))
    owners = {c: draw(st.sampled_from(USERS)) for c in CONVERSATIONS}
    modes = {c: draw(st.sampled_from([None, "training"])) for c in CONVERSATIONS}
    found = []
    for _ in range(count):
        c = draw(st.sampled_from(CONVERSATIONS))
        extra = {"mode": modes[c]} if modes[c] else {}
        found.append(
            support.event(
                c,
                owners[c],
                # A narrow range makes equal timestamps common, so the message_id
                # tie-break is exercised.
                seconds=draw(st.integers(min_value=0, max_value=4)),
                type=draw(st.sampled_from(["user", "user", "assistant", "system"])),
                content=draw(st.sampled_from(CONTENTS) | st.text(max_size=60)),
                message_id=uuid.UUID(int=draw(st.integers(1, 2**64))),
                **extra,
            )
        )
    return found


@st.composite
def deliveries(
    draw: st.DrawFn,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]:
    distinct = list({e["message_id"]: e for e in draw(event_sets())}.values())
    repeats = draw(st.lists(st.sampled_from(distinct), max_size=len(distinct)))
    delivered = draw(st.permutations(distinct + repeats))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(delivered) - 1)))))
    return distinct, delivered, cuts


async def _reset(pool: asyncpg.Pool) -> None:
    await pool.execute(
        "TRUNCATE conversations, convstats_applied_messages, convstats_outbox"
    )


async def _snapshot(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return list(await pool.fetch(f"SELECT {COMPARED} FROM conversations ORDER BY id"))


def _batches(values: list[dict[str, Any]], cuts: list[int]) -> list[list[Any]]:
    edges = [0, *cuts, len(values)]
    return [values[a:b] for a, b in itertools.pairwise(edges) if a < b]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=deliveries())
async def test_any_order_duplication_and_batching_gives_the_same_rows(
    pool: asyncpg.Pool,
    case: tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]],
) -> None:
    distinct, delivered, cuts = case
    await support.create_users(pool, *USERS)
    pipe = pipeline.Pipeline(pool, support.RecordingDeadLetters(), max_clock_skew_s=0)
    await _reset(pool)
    in_time_order = sorted(distinct, key=lambda e: (e["created_at"], e["message_id"]))
    for value in in_time_order:
        await pipe.process(support.records([value]))
    expected = await _snapshot(pool)
    await _reset(pool)

    for batch in _batches(delivered, cuts):
        await pipe.process(support.records(batch))

    assert await _snapshot(pool) == expected
