"""JSON Schema files for the two event types, generated from the pydantic models.

The files under ``schema/events`` are what other teams read and validate against;
a test fails when they drift from the models, and ``convstats schemas --write``
regenerates them.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Literal

import pydantic

from worker import events

SCHEMA_DIR = pathlib.Path(__file__).resolve().parent.parent / "schema" / "events"

_MODELS: dict[
    str, tuple[type[pydantic.BaseModel], Literal["validation", "serialization"]]
] = {
    "message-created.schema.json": (events.MessageCreated, "validation"),
    "conversation-updated.schema.json": (events.ConversationUpdated, "serialization"),
}


def generate() -> dict[str, str]:
    """File name -> the JSON text it must hold."""
    rendered = {}
    for name, (model, mode) in _MODELS.items():
        schema: dict[str, Any] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": name,
            **model.model_json_schema(mode=mode),
        }
        rendered[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return rendered


def write(directory: pathlib.Path = SCHEMA_DIR) -> list[pathlib.Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generate().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
