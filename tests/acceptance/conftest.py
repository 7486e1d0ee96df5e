"""Fixtures of the acceptance tests: worker processes and a slice of the corpus."""

from __future__ import annotations

import itertools
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.acceptance import workers
from worker import corpus

# Conversations taken from the corpus, from this position on: a different stretch
# than the integration tests read, about 2,400 events.
SLICE_START = 1000
SLICE_CONVERSATIONS = 60


@pytest.fixture
def fleet(tmp_path: pathlib.Path) -> Iterator[workers.Fleet]:
    """Worker processes of one test; whatever still runs at the end is killed."""
    started = workers.Fleet(tmp_path)
    try:
        yield started
    finally:
        started.close()
        # Shown by pytest only when the test failed.
        print(started.tails())


@pytest.fixture(scope="session")
def corpus_slice() -> list[dict[str, Any]]:
    data = corpus.load()
    keys = itertools.islice(data, SLICE_START, SLICE_START + SLICE_CONVERSATIONS)
    return list(corpus.events({key: data[key] for key in keys}))
