"""JSON schemas of the answers compeff asks a teacher for, for constrained decoding.

With ``teacher.structured_output`` the backend constrains the teacher's tokens to these schemas (a
server through ``response_format``, the hf backend through xgrammar), so even a small model answers in
parseable JSON; the lenient parsers stay for servers that cannot constrain.
"""

from __future__ import annotations

import json
from typing import Any

from compeff.synth.tasks import TASK_TYPES


def _text(least: int, most: int) -> dict[str, Any]:
    """A string of bounded length: the bounds keep a small model from an empty answer or from one string
    that runs until max_tokens (both seen with SmolLM2-135M before the bounds)."""
    return {"type": "string", "minLength": least, "maxLength": most}


_NAME = _text(3, 60)

ANALYSIS: dict[str, Any] = {"type": "array", "items": _text(15, 300), "minItems": 1, "maxItems": 8}
IDEAS: dict[str, Any] = {
    "type": "array",
    "minItems": 1,
    "maxItems": 8,
    "items": {
        "type": "object",
        "properties": {"name": _NAME, "type": {"enum": list(TASK_TYPES)}, "description": _text(10, 300)},
        "required": ["name", "type", "description"],
    },
}
_DEMO = {
    "type": "object",
    "properties": {"input": _text(1, 600), "output": _text(1, 300)},
    "required": ["input", "output"],
}
DEFINITION: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": _NAME,
        "type": {"enum": list(TASK_TYPES)},
        "instruction": _text(10, 500),
        "output_format": _text(2, 200),
        "labels": {"type": "array", "items": _text(1, 40), "maxItems": 10},
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
            "maxItems": 5,  # five short items fit in a few hundred tokens; a small model repeats itself past them
            "items": {
                "type": "object",
                "properties": {"name": _text(3, 40), "description": _text(5, 120), "value": _text(1, 60)},
                "required": ["name", "description", "value"],
            },
        }
    },
    "required": ["attributes"],
}


def schema_text(schema: dict[str, Any] | None) -> str | None:
    """A schema as compact JSON text (what a request carries and its cache key covers). Keys keep their
    order: a constrained answer writes its properties in the schema's order (a name before its
    description reads better to a small model than the reverse)."""
    return None if schema is None else json.dumps(schema, separators=(",", ":"))
