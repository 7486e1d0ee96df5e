"""Fault injection for the crash tests: die at a named point, as ``kill -9`` would.

``CONVSTATS_FAULT=<point>[:<n>]`` makes the process SIGKILL itself the n-th time
(default 1st) it passes ``<point>``. Unset, ``point`` is one dictionary lookup.
The points mark the windows where a naive worker loses or doubles work.
"""

from __future__ import annotations

import os
import signal

AFTER_APPLY = "after_apply"  # batch committed in PostgreSQL, offsets not yet
AFTER_COMMIT = "after_commit"  # offsets committed
AFTER_PUBLISH = "after_publish"  # updates acknowledged by Kafka, outbox not marked
RAISE_IN_APPLY = "raise_in_apply"  # an error the code does not expect

_SPEC = os.environ.get("CONVSTATS_FAULT", "")
_POINT, _, _NTH = _SPEC.partition(":")
_hits = 0


class InjectedFault(RuntimeError):
    """The unexpected error of RAISE_IN_APPLY."""


def point(name: str) -> None:
    global _hits
    if name != _POINT:
        return
    _hits += 1
    if _hits < int(_NTH or "1"):
        return
    if name == RAISE_IN_APPLY:
        raise InjectedFault(f"injected fault at {name}")
    os.kill(os.getpid(), signal.SIGKILL)
