"""Lenient JSON for teacher answers: code fences, prose around the value, trailing commas, single
quotes and Python literals (True/None) are accepted; anything else raises ValueError."""

from __future__ import annotations

import ast
import json
import re
from typing import Any

_FENCE = re.compile(r"```(?:json|JSON|python)?\s*\n?(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")

try:
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover
    _fast_loads = json.loads


def _candidates(text: str) -> list[str]:
    """Fenced blocks, the whole answer, then the outermost bracketed span (the earliest opening first)."""
    found = [m.group(1) for m in _FENCE.finditer(text)]
    found.append(text)
    spans = []
    for open_, close in (("[", "]"), ("{", "}")):
        start, end = text.find(open_), text.rfind(close)
        if start != -1 and end > start:
            spans.append((start, text[start : end + 1]))
    found.extend(span for _, span in sorted(spans))
    return found


def parse_json_lenient(text: str) -> Any:
    """The first JSON (or Python-literal) value found in a teacher answer."""
    try:  # the common case: the answer is clean JSON
        value = _fast_loads(text)
    except ValueError:  # orjson's and json's decode errors are both ValueErrors
        pass
    else:
        if isinstance(value, (list, dict)):
            return value
    for candidate in _candidates(text.strip()):
        candidate = candidate.strip()
        if not candidate:
            continue
        no_commas = _TRAILING_COMMA.sub(r"\1", candidate)
        pythonic = re.sub(
            r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", re.sub(r"\bnull\b", "None", no_commas))
        )
        for attempt in (candidate, no_commas, pythonic):
            try:  # strict=False: raw newlines inside strings (llama.cpp's grammars let them through)
                return json.loads(attempt, strict=False)
            except json.JSONDecodeError:
                pass
            try:
                value = ast.literal_eval(attempt)
            except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
                continue
            if isinstance(value, (list, dict)):
                return value
    raise ValueError(f"no JSON value found in answer: {text[:120]!r}")
