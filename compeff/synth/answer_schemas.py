"""JSON schemas of the answers compeff asks a teacher for, for constrained decoding.

With ``teacher.structured_output`` the backend constrains the teacher's tokens to these schemas (a
server through ``response_format``, the hf backend through xgrammar), so even a small model answers in
parseable JSON; the lenient parsers stay for servers that cannot constrain.
"""

from __future__ import annotations

import json
from typing import Any

from compeff.synth.tasks import TASK_TYPES

_TEXT = {"type": "string", "minLength": 1}

ANALYSIS: dict[str, Any] = {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": 8}
IDEAS: dict[str, Any] = {
    "type": "array",
    "minItems": 1,
    "maxItems": 8,
    "items": {
        "type": "object",
        "properties": {"name": _TEXT, "type": {"enum": list(TASK_TYPES)}, "description": _TEXT},
        "required": ["name", "type", "description"],
    },
}
_DEMO = {"type": "object", "properties": {"input": _TEXT, "output": _TEXT}, "required": ["input", "output"]}
DEFINITION: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": _TEXT,
        "type": {"enum": list(TASK_TYPES)},
        "instruction": _TEXT,
        "output_format": _TEXT,
        "labels": {"type": "array", "items": _TEXT},
        "copy_exact": {"type": "boolean"},
        "json_schema": {"type": "object"},
        "examples": {"type": "array", "items": _DEMO, "maxItems": 6},
    },
    "required": ["name", "type", "instruction", "output_format", "examples"],
}
DEMO_PAIR: dict[str, Any] = {"type": "array", "items": _DEMO, "minItems": 2, "maxItems": 2}
ATTRIBUTES: dict[str, Any] = {
    "type": "object",
    "properties": {
        "attributes": {
            "type": "array",
            "minItems": 1,
            "maxItems": 12,
            "items": {
                "type": "object",
                "properties": {"name": _TEXT, "description": _TEXT},
                "required": ["name", "description"],
            },
        }
    },
    "required": ["attributes"],
}


def schema_text(schema: dict[str, Any] | None) -> str | None:
    """A schema as canonical JSON text (what a request carries and its cache key covers)."""
    return None if schema is None else json.dumps(schema, sort_keys=True, separators=(",", ":"))
