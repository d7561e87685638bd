"""What the OpenAI client's parent and child processes exchange: batch size and result rows.

Shared by :mod:`compeff.teachers.client_process` (the parent side) and
:mod:`compeff.teachers.client_child` (the child's loop), so neither imports the other.
"""

from __future__ import annotations

from typing import Any

from compeff.teachers.base import TeacherResult

BATCH = 64  # requests or results per pipe message


def as_row(result: TeacherResult) -> list:
    """A result as the JSON row the child sends."""
    return [
        result.id,
        result.ok,
        result.texts,
        result.finish_reasons,
        result.logprobs,
        result.usage,
        result.error,
        result.error_kind,
        result.attempts,
        result.latency_s,
    ]


def from_row(row: list, meta: dict[str, Any]) -> TeacherResult:
    """The result a row stands for (``meta`` stays on the parent side)."""
    rid, ok, texts, reasons, logprobs, usage, error, error_kind, attempts, latency = row
    return TeacherResult(
        id=rid,
        ok=ok,
        texts=texts,
        finish_reasons=reasons,
        logprobs=logprobs,
        usage=usage,
        error=error,
        error_kind=error_kind,
        attempts=attempts,
        latency_s=latency,
        meta=meta,
    )
