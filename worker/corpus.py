"""The chitchat corpus (7,168 real two-person conversations) as message-created events.

The mapping is fixed so anyone can recompute the expected statistics on their own:
the conversation id is the corpus key; messages are numbered 0, 1, 2, ... in corpus
order (turn by turn, message by message); message_id is UUID v5 of that number's
decimal string in the conversation's namespace; the sender of message 0 owns the
conversation and writes the ``user`` messages, the other sender the ``assistant``
ones; created_at is the corpus timestamp in UTC.
"""

from __future__ import annotations

import importlib.resources
import json
import uuid
from collections.abc import Iterator
from typing import Any

import chitchat_dataset

Event = dict[str, Any]


def load() -> dict[str, Any]:
    """The raw corpus: conversation key -> {"messages": [[turn], ...], ...}."""
    # Read the package's file directly: its own loader leaves the file open.
    source = importlib.resources.files(chitchat_dataset) / "dataset.json"
    with source.open("rb") as stream:
        data: dict[str, Any] = json.load(stream)
    return data


def _messages(conversation: dict[str, Any]) -> list[dict[str, str]]:
    return [message for turn in conversation["messages"] for message in turn]


def conversation_events(key: str, conversation: dict[str, Any]) -> Iterator[Event]:
    conversation_id = uuid.UUID(key)
    messages = _messages(conversation)
    if not messages:
        return
    owner = messages[0]["sender"]
    for index, message in enumerate(messages):
        yield {
            "message_id": str(uuid.uuid5(conversation_id, str(index))),
            "conversation_id": str(conversation_id),
            "user_id": owner,
            "type": "user" if message["sender"] == owner else "assistant",
            "content": message["text"],
            "created_at": message["timestamp"],
        }


def events(corpus: dict[str, Any] | None = None) -> Iterator[Event]:
    """Every message of the corpus, conversation by conversation."""
    for key, conversation in (corpus if corpus is not None else load()).items():
        yield from conversation_events(key, conversation)


def owners(corpus: dict[str, Any]) -> set[uuid.UUID]:
    """The users that own the corpus conversations, to create in ``users``."""
    firsts = (_messages(conversation)[:1] for conversation in corpus.values())
    return {uuid.UUID(first[0]["sender"]) for first in firsts if first}
