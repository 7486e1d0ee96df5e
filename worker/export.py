"""Writes the chat corpus as JSON Lines of message-created events.

The file is what a backfill reads, and what anyone can feed to another tool to
recompute the expected statistics on their own (worker.corpus fixes the mapping).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

from worker import corpus, db


def write_corpus(
    out: IO[str],
    corpus_data: dict[str, Any] | None = None,
    on_conversation: Callable[[], None] | None = None,
) -> int:
    """Writes every corpus message as one line; returns the number of events."""
    data = corpus_data if corpus_data is not None else corpus.load()
    written = 0
    for key, conversation in data.items():
        for event in corpus.conversation_events(key, conversation):
            out.write(db.dumps(event) + "\n")
            written += 1
        if on_conversation is not None:
            on_conversation()
    return written
