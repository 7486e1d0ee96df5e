"""The stats rules as PostgreSQL enforces them, on hand-made messages.

Messages reach the ledger through convstats_apply_messages_v1 (the worker's way) or
through a plain INSERT (any other writer); the conversation must come out the same.
Title candidates are written here as the literal strings the worker would compute.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import uuid
from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest

UTC = datetime.UTC
T0 = datetime.datetime(2024, 1, 15, 14, 30, tzinfo=UTC)

APPLY = """
SELECT message_id, outcome
FROM convstats_apply_messages_v1(
    $1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::timestamptz[],
    $6::bytea[], $7::text[], $8::text[], $9::jsonb[]
)
"""

LEDGER_INSERT = """
INSERT INTO convstats_applied_messages
    (message_id, conversation_id, user_id, type, created_at, fingerprint,
     title_candidate)
SELECT * FROM unnest(
    $1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::timestamptz[],
    $6::bytea[], $7::text[]
)
ON CONFLICT (message_id) DO NOTHING
"""

# The fields that must not depend on the order messages arrive in.
ORDER_FREE = ("message_count", "last_message_at", "title", "created_at")


def at(minutes: float) -> datetime.datetime:
    return T0 + datetime.timedelta(minutes=minutes)


@dataclasses.dataclass(frozen=True)
class Message:
    conversation_id: uuid.UUID
    user_id: uuid.UUID
    created_at: datetime.datetime
    title_candidate: str | None = None
    type: str = "user"
    message_id: uuid.UUID = dataclasses.field(default_factory=uuid.uuid4)
    content: str = ""
    mode: str | None = None
    context_json: str | None = None

    @property
    def fingerprint(self) -> bytes:
        identity = (
            self.message_id,
            self.conversation_id,
            self.user_id,
            self.type,
            self.created_at.isoformat(),
            self.content,
        )
        return hashlib.sha256("\x1f".join(map(str, identity)).encode()).digest()


def ledger_columns(messages: Sequence[Message]) -> list[list[object]]:
    return [
        [m.message_id for m in messages],
        [m.conversation_id for m in messages],
        [m.user_id for m in messages],
        [m.type for m in messages],
        [m.created_at for m in messages],
        [m.fingerprint for m in messages],
        [m.title_candidate for m in messages],
    ]


async def apply(
    conn: asyncpg.Connection, messages: Sequence[Message]
) -> list[tuple[uuid.UUID, str]]:
    rows = await conn.fetch(
        APPLY,
        *ledger_columns(messages),
        [m.mode for m in messages],
        [m.context_json for m in messages],
    )
    return [(r["message_id"], r["outcome"]) for r in rows]


async def insert_into_ledger(
    conn: asyncpg.Connection, messages: Sequence[Message]
) -> None:
    await conn.execute(LEDGER_INSERT, *ledger_columns(messages))


async def conversation(
    conn: asyncpg.Connection, conversation_id: uuid.UUID
) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT * FROM conversations WHERE id = $1", conversation_id
    )
    return row


async def outbox_count(conn: asyncpg.Connection) -> int:
    count: int = await conn.fetchval("SELECT count(*) FROM convstats_outbox")
    return count


async def everything(conn: asyncpg.Connection) -> tuple[object, ...]:
    """Every row the rules could touch, to show that something changed nothing."""
    return (
        [dict(r) for r in await conn.fetch("SELECT * FROM conversations ORDER BY id")],
        [
            dict(r)
            for r in await conn.fetch(
                "SELECT * FROM convstats_applied_messages ORDER BY message_id"
            )
        ],
        await outbox_count(conn),
    )


@pytest.fixture
async def conn(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as connection:
        yield connection


@pytest.fixture
async def user(conn: asyncpg.Connection) -> uuid.UUID:
    user_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO users DEFAULT VALUES RETURNING id"
    )
    return user_id


@pytest.fixture
async def other_user(conn: asyncpg.Connection) -> uuid.UUID:
    user_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO users DEFAULT VALUES RETURNING id"
    )
    return user_id


# --- counting ------------------------------------------------------------------


async def test_message_count_counts_distinct_message_ids(
    conn: asyncpg.Connection, user: uuid.UUID
) -> None:
    conversation_id = uuid.uuid4()
    messages = [
        Message(conversation_id, user, at(0), "Was my stop too tight?"),
        Message(conversation_id, user, at(1), type="assistant"),
        Message(conversation_id, user, at(2), type="system"),
    ]

    outcomes = await apply(conn, messages)

    row = await conversation(conn, conversation_id)
    assert row is not None
    assert sorted(o for _, o in outcomes) == ["applied"] * 3
    assert row["message_count"] == 3
    assert row["last_message_at"] == at(2)
    assert row["user_id"] == user


async def test_a_message_repeated_in_one_call_counts_once(
    conn: asyncpg.Connection, user: uuid.UUID
) -> None:
    conversation_id = uuid.uuid4()
    message = Message(conversation_id, user, at(0), "Entry checklist")

    await apply(conn, [message, message])

    row = await conversation(conn, conversation_id)
    assert row is not None
    assert (row["message_count"], row["version"]) == (1, 2)
    assert await outbox_count(conn) == 1


async def test_a_redelivered_batch_changes_nothing_and_publishes_nothing(
    conn: asyncpg.Connection, user: uuid.UUID
) -> None:
    conversation_id = uuid.uuid4()
    messages = [
        Message(conversation_id, user, at(0), "Scaling out of winners"),
        Message(conversation_id, user, at(3), type="assistant"),
    ]
    await apply(conn, messages)
    before = await everything(conn)

    outcomes = await apply(conn, list(reversed(messages)))

    assert [o for _, o in outcomes] == ["duplicate", "duplicate"]
    assert await everything(conn) == before


async def test_another_writer_inserting_into_the_ledger_gets_the_same_rules(
    conn: asyncpg.Connection, user: uuid.UUID
) -> None:
    conversation_id = await conn.fetchval(
        "INSERT INTO conversations (user_id) VALUES ($1) RETURNING id", user
    )
    first = Message(conversation_id, user, at(0), "Why do I revenge trade?")
    second = Message(conversation_id, user, at(5), type="assistant")
    await insert_into_ledger(conn, [second])
    await insert_into_ledger(conn, [first, second])
    before = await everything(conn)

    await insert_into_ledger(conn, [first])

    row = await conversation(conn, conversation_id)
    assert row is not None
    assert (row["message_count"], row["last_message_at"], row["created_at"]) == (
        2,
        at(5),
        at(0),
    )
    assert row["title"] == "Why do I revenge trade?"
    assert await everything(conn) == before


# --- order does not matter -----------------------------------------------------


async def test_reverse_arrival_order_gives_the_same_conversation(
    conn: asyncpg.Connection, user: uuid.UUID
) -> None:
    forward_id, backward_id = uuid.uuid4(), uuid.uuid4()
    script = [
        (at(0), "system", None),
        (at(1), "user", "How big should my first trade be?"),
        (at(2), "assistant", None),
        (at(2), "user", "And after two losses?"),
        (at(9), "user", "Thanks"),
    ]
    forward = [Message(forward_id, user, t, c, kind) for t, kind, c in script]
    backward = [Message(backward_id, user, t, c, kind) for t, kind, c in script]

    for message in forward:
        await apply(conn, [message])
    for message in reversed(backward):
        await apply(conn, [message])

    rows = [await conversation(conn, c) for c in (forward_id, backward_id)]
    assert rows[0] is not None and rows[1] is not None
    assert [rows[0][f] for f in ORDER_FREE] == [rows[1][f] for f in ORDER_FREE]
    assert [rows[0][f] for f in ORDER_FREE] == [
        5,
        at(9),
        "How big should my first trade be?",
        at(0),
    ]


async def test_a_late_message_never_moves_last_message_at_back(
    conn: asyncpg.Connection, user: uuid.UUID
) -> None:
    conversation_id = uuid.uuid4()
    await apply(conn, [Message(conversation_id, user, at(10), type="assistant")])

    await apply(conn, [Message(conversation_id, user, at(5), type="assistant")])

    row = await conversation(conn, conversation_id)
    assert row is not None
    assert (row["message_count"], row["last_message_at"]) == (2, at(10))


async def test_created_at_moves_back_to_the_earliest_message(
    conn: asyncpg.Connection, user: uuid.UUID
) -> None:
    made_by_app = await conn.fetchval(
        "INSERT INTO conversations (user_id) VALUES ($1) RETURNING id", user
    )
    made_by_worker = uuid.uuid4()
    await apply(conn, [Message(made_by_worker, user, at(10), type="assistant")])

    await apply(
        conn,
        [
            Message(made_by_app, user, at(-60), type="assistant"),
            Message(made_by_worker, user, at(-5), type="assistant"),
        ],
    )

    app_row = await conversation(conn, made_by_app)
    worker_row = await conversation(conn, made_by_worker)
    assert app_row is not None and worker_row is not None
    assert (app_row["created_at"], worker_row["created_at"]) == (at(-60), at(-5))


async def test_a_new_conversation_takes_mode_and_context_from_its_earliest_message(
    conn: asyncpg.Connection, user: uuid.UUID
) -> None:
    conversation_id = uuid.uuid4()
    later = Message(conversation_id, user, at(1), mode="planning")
    earliest = Message(
        conversation_id,
        user,
        at(0),
        mode="training",
        context_json='{"session_type": "replay"}',
    )

    await apply(conn, [later, earliest])

    row = await conversation(conn, conversation_id)
    assert row is not None
    assert (row["mode"], row["context_data"], row["created_at"]) == (
        "training",
        '{"session_type": "replay"}',
        at(0),
    )


# --- the automatic title -------------------------------------------------------


async def test_the_title_comes_from_the_earliest_candidate(
    conn: asyncpg.Connection, user: uuid.UUID
) -> None:
    conversation_id = uuid.uuid4()
    messages = [
        # Earlier, but neither can title: an assistant message, and a user message
        # that was empty once normalised.
        Message(conversation_id, user, at(0), type="assistant"),
        Message(conversation_id, user, at(1), None),
        Message(conversation_id, user, at(3), "Second thought"),
        Message(conversation_id, user, at(2), "First thought"),
    ]

    await apply(conn, messages[2:])
    await apply(conn, messages[:2])

    row = await conversation(conn, conversation_id)
    assert row is not None
    assert (row["title"], row["title_source"]) == ("First thought", "auto")


@pytest.mark.parametrize("low_first", [True, False])
async def test_a_title_tie_on_created_at_goes_to_the_smaller_message_id(
    conn: asyncpg.Connection, user: uuid.UUID, low_first: bool
) -> None:
    conversation_id = uuid.uuid4()
    low = Message(
        conversation_id,
        user,
        at(0),
        "From the smaller id",
        message_id=uuid.UUID("00000000-0000-4000-8000-000000000001"),
    )
    high = Message(
        conversation_id,
        user,
        at(0),
        "From the larger id",
        message_id=uuid.UUID("ffffffff-0000-4000-8000-000000000000"),
    )

    for message in [low, high] if low_first else [high, low]:
        await apply(conn, [message])

    row = await conversation(conn, conversation_id)
    assert row is not None
    assert row["title"] == "From the smaller id"


async def test_a_title_written_by_a_person_belongs_to_them(
    conn: asyncpg.Connection, user: uuid.UUID
) -> None:
    conversation_id = uuid.uuid4()
    await apply(conn, [Message(conversation_id, user, at(5), "Auto title")])

    row = await conn.fetchrow(
        "UPDATE conversations SET title = 'My NQ playbook' WHERE id = $1 "
        "RETURNING title, title_source, version",
        conversation_id,
    )

    assert tuple(row) == ("My NQ playbook", "user", 3)


async def test_messages_never_replace_a_title_set_by_a_person(
    conn: asyncpg.Connection, user: uuid.UUID
) -> None:
    conversation_id = uuid.uuid4()
    await apply(conn, [Message(conversation_id, user, at(5), "Auto title")])
    await conn.execute(
        "UPDATE conversations SET title = 'My NQ playbook' WHERE id = $1",
        conversation_id,
    )

    outcomes = await apply(
        conn, [Message(conversation_id, user, at(0), "An earlier candidate")]
    )

    row = await conversation(conn, conversation_id)
    assert row is not None
    assert [o for _, o in outcomes] == ["applied"]
    assert (row["title"], row["title_source"], row["message_count"]) == (
        "My NQ playbook",
        "user",
        2,
    )


async def test_a_title_given_at_creation_belongs_to_the_person(
    conn: asyncpg.Connection, user: uuid.UUID
) -> None:
    conversation_id = await conn.fetchval(
        "INSERT INTO conversations (user_id, title) "
        "VALUES ($1, 'Pre-market plan') RETURNING id",
        user,
    )

    await apply(conn, [Message(conversation_id, user, at(0), "Good morning")])

    row = await conversation(conn, conversation_id)
    assert row is not None
    assert (row["title"], row["title_source"], row["message_count"]) == (
        "Pre-market plan",
        "user",
        1,
    )


async def test_clearing_a_persons_title_hands_it_back_to_the_automatic_rule(
    conn: asyncpg.Connection, user: uuid.UUID
) -> None:
    conversation_id = uuid.uuid4()
    await apply(
        conn,
        [
            Message(conversation_id, user, at(1), "Later candidate"),
            Message(conversation_id, user, at(0), "Earliest candidate"),
        ],
    )
    await conn.execute(
        "UPDATE conversations SET title = 'My NQ playbook' WHERE id = $1",
        conversation_id,
    )

    await conn.execute(
        "UPDATE conversations SET title = NULL WHERE id = $1", conversation_id
    )

    row = await conversation(conn, conversation_id)
    assert row is not None
    assert (row["title"], row["title_source"]) == ("Earliest candidate", "auto")


async def test_after_the_hand_back_messages_set_the_title_again(
    conn: asyncpg.Connection, user: uuid.UUID
) -> None:
    conversation_id = uuid.uuid4()
    await apply(conn, [Message(conversation_id, user, at(0), "Earliest candidate")])
    await conn.execute(
        "UPDATE conversations SET title = 'My NQ playbook' WHERE id = $1",
        conversation_id,
    )
    await conn.execute(
        "UPDATE conversations SET title = NULL WHERE id = $1", conversation_id
    )

    await apply(
        conn, [Message(conversation_id, user, at(-1), "Even earlier candidate")]
    )

    row = await conversation(conn, conversation_id)
    assert row is not None
    assert (row["title"], row["title_source"]) == ("Even earlier candidate", "auto")


async def test_clearing_the_title_without_candidates_leaves_none(
    conn: asyncpg.Connection, user: uuid.UUID
) -> None:
    conversation_id = await conn.fetchval(
        "INSERT INTO conversations (user_id, title) VALUES ($1, 'Named') RETURNING id",
        user,
    )

    await conn.execute(
        "UPDATE conversations SET title = NULL WHERE id = $1", conversation_id
    )

    row = await conversation(conn, conversation_id)
    assert row is not None
    assert (row["title"], row["title_source"]) == (None, "auto")


# --- outcomes that change nothing ----------------------------------------------


async def test_another_message_reusing_an_id_is_a_conflict(
    conn: asyncpg.Connection, user: uuid.UUID
) -> None:
    conversation_id = uuid.uuid4()
    original = Message(conversation_id, user, at(0), "Original", content="Original")
    await apply(conn, [original])
    before = await everything(conn)
    impostor = dataclasses.replace(original, content="Something else")

    outcomes = await apply(conn, [impostor])

    assert outcomes == [(original.message_id, "conflict")]
    assert await everything(conn) == before


@pytest.mark.parametrize("target_exists", [True, False])
async def test_an_id_reused_in_another_conversation_is_a_conflict(
    conn: asyncpg.Connection, user: uuid.UUID, target_exists: bool
) -> None:
    original = Message(uuid.uuid4(), user, at(0), "Original")
    other_conversation = uuid.uuid4()
    await apply(conn, [original])
    if target_exists:
        await apply(conn, [Message(other_conversation, user, at(1), "Other")])
    before = await everything(conn)
    impostor = dataclasses.replace(original, conversation_id=other_conversation)

    outcomes = await apply(conn, [impostor])

    assert outcomes == [(original.message_id, "conflict")]
    assert await everything(conn) == before


async def test_a_message_for_someone_elses_conversation_changes_nothing(
    conn: asyncpg.Connection, user: uuid.UUID, other_user: uuid.UUID
) -> None:
    conversation_id = uuid.uuid4()
    await apply(conn, [Message(conversation_id, user, at(0), "Mine")])
    before = await everything(conn)
    intruder = Message(conversation_id, other_user, at(-1), "Not yours")

    outcomes = await apply(conn, [intruder])

    assert outcomes == [(intruder.message_id, "foreign_user")]
    assert await everything(conn) == before


async def test_a_message_for_a_deleted_conversation_changes_nothing(
    conn: asyncpg.Connection, user: uuid.UUID
) -> None:
    conversation_id = uuid.uuid4()
    await apply(conn, [Message(conversation_id, user, at(0), "Soon gone")])
    await conn.execute(
        "UPDATE conversations SET status = 'deleted' WHERE id = $1", conversation_id
    )
    before = await everything(conn)
    straggler = Message(conversation_id, user, at(1), "Anyone there?")

    outcomes = await apply(conn, [straggler])

    assert outcomes == [(straggler.message_id, "deleted")]
    assert await everything(conn) == before


async def test_a_message_from_an_unknown_user_changes_nothing(
    conn: asyncpg.Connection, user: uuid.UUID
) -> None:
    await apply(conn, [Message(uuid.uuid4(), user, at(0), "Hello")])
    before = await everything(conn)
    orphan = Message(uuid.uuid4(), uuid.uuid4(), at(1), "Who am I?")

    outcomes = await apply(conn, [orphan])

    assert outcomes == [(orphan.message_id, "unknown_user")]
    assert await everything(conn) == before


async def test_outcomes_in_one_mixed_batch_are_reported_per_message(
    conn: asyncpg.Connection, user: uuid.UUID, other_user: uuid.UUID
) -> None:
    mine = uuid.uuid4()
    seen = Message(mine, user, at(0), "Seen before")
    await apply(conn, [seen])
    fresh = Message(mine, user, at(1), type="assistant")
    foreign = Message(mine, other_user, at(2), "Not yours")
    orphan = Message(uuid.uuid4(), uuid.uuid4(), at(3), "Who am I?")

    outcomes = dict(await apply(conn, [seen, fresh, foreign, orphan]))

    assert outcomes == {
        seen.message_id: "duplicate",
        fresh.message_id: "applied",
        foreign.message_id: "foreign_user",
        orphan.message_id: "unknown_user",
    }
    row = await conversation(conn, mine)
    assert row is not None
    assert (row["message_count"], row["last_message_at"]) == (2, at(1))
