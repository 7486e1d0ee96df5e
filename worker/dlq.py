"""Inspecting dead letters and sending chosen ones back after a fix."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import aiokafka

from worker import kafka
from worker import settings as settings_module


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @property
    def position(self) -> str:
        return f"{self.partition}:{self.offset}"

    def meta(self, name: str) -> str:
        """A header the worker added, such as ``reason`` or ``source_topic``."""
        # The worker appends its headers after the record's own, so the last one
        # of a name is ours even when a producer sent a look-alike.
        for key, value in reversed(self.headers):
            if key == kafka.HEADER_PREFIX + name:
                return (value or b"").decode("utf-8", "replace")
        return ""

    @property
    def original_headers(self) -> list[tuple[str, bytes]]:
        return [
            (k, v) for k, v in self.headers if not k.startswith(kafka.HEADER_PREFIX)
        ]


async def read(cfg: settings_module.Settings) -> list[DeadLetter]:
    return [_letter(r) for r in await kafka.read_all(cfg, cfg.dead_letter_topic)]


def select(
    letters: Iterable[DeadLetter],
    *,
    positions: Iterable[str] = (),
    reason: str | None = None,
) -> list[DeadLetter]:
    wanted = set(positions)
    return [
        letter
        for letter in letters
        if (not wanted or letter.position in wanted)
        and (reason is None or letter.meta("reason") == reason)
    ]


async def redrive(cfg: settings_module.Settings, letters: list[DeadLetter]) -> int:
    """Sends each letter back to the messages topic, as it first arrived.

    Always the configured messages topic, never the source named in the letter's
    headers: a producer could have forged those to write into any topic.
    """
    sender = kafka.producer(cfg)
    await sender.start()
    try:
        for letter in letters:
            # Marks the copy so a second failure can be traced to the first.
            headers = [
                *letter.original_headers,
                ("convstats.redriven_from", letter.position.encode()),
            ]
            await sender.send_and_wait(
                cfg.messages_topic,
                key=letter.key,
                value=letter.value,
                headers=headers,
            )
    finally:
        await sender.stop()
    return len(letters)


def _letter(record: aiokafka.ConsumerRecord[bytes, bytes]) -> DeadLetter:
    return DeadLetter(
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=record.value,
        headers=tuple(record.headers),
    )
