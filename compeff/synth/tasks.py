"""Tasks for a perspective: validated ideas, standardised definitions, demonstrations, dedup.

Teacher answers are JSON read leniently (:mod:`compeff.synth.jsonparse`) and validated with
pydantic. Everything here is pure (no teacher, no files), so the stage and the tests share it.
"""

from __future__ import annotations

import json
import re
from functools import cached_property, lru_cache
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from compeff.synth.jsonparse import parse_json_lenient

TaskType = Literal["closed_classification", "open_classification", "rating", "extraction", "structured"]
TASK_TYPES: tuple[str, ...] = (
    "closed_classification",
    "open_classification",
    "rating",
    "extraction",
    "structured",
)
_TYPE_ALIASES = {
    "closed": "closed_classification",
    "closed-set classification": "closed_classification",
    "classification": "closed_classification",
    "open": "open_classification",
    "open-set classification": "open_classification",
    "scoring": "rating",
    "score": "rating",
    "scoring/rating": "rating",
    "json": "structured",
    "structured output": "structured",
    "structured_output": "structured",
}
_TWO_TEXTS = re.compile(
    r"\b(two|2|pair of|both|multiple|several) (texts|reviews|tweets|posts|documents|inputs)\b|\bcompare (the |two )?(texts|reviews|tweets)\b|\bwhich (text|review|tweet) is\b",
    re.IGNORECASE,
)


class TaskRejected(ValueError):
    """A teacher answer that cannot become (part of) a task; the message says why."""


def _norm_type(value: Any) -> Any:
    if isinstance(value, str):
        key = value.strip().lower().replace("-", "_")
        return _TYPE_ALIASES.get(key, _TYPE_ALIASES.get(value.strip().lower(), key))
    return value


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


class TaskIdea(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=2)
    type: TaskType
    description: str = Field(min_length=5)

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, value: Any) -> Any:
        return _norm_type(value)


class Demo(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: str = Field(min_length=1)
    output: str = Field(min_length=1)

    @field_validator("input", "output", mode="before")
    @classmethod
    def _text(cls, value: Any) -> str:
        if value is None:
            raise ValueError("missing")
        return _as_text(value)


class TaskDefinition(BaseModel):
    """A standardised task: everything a student needs to do it, and everything QC needs to check it."""

    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=2)
    type: TaskType
    instruction: str = Field(min_length=5)
    output_format: str = Field(min_length=2)
    labels: list[str] | None = None
    copy_exact: bool | None = None
    json_schema: dict[str, Any] | None = None
    examples: list[Demo] = Field(default_factory=list)

    @cached_property
    def _schema_key(self) -> str:
        return json.dumps(self.json_schema, sort_keys=True)

    def schema_error(self, value: Any) -> str | None:
        """Why a value breaks this task's JSON schema (None when it fits or there is no schema)."""
        if not self.json_schema:
            return None
        return _schema_error(self._schema_key, value)

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, value: Any) -> Any:
        return _norm_type(value)

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> Any:
        if isinstance(value, list):
            labels = [str(v).strip() for v in value if str(v).strip()]
            return list(dict.fromkeys(labels)) or None
        return value


def _json_or_reject(answer: str) -> Any:
    try:
        return parse_json_lenient(answer)
    except ValueError as exc:
        raise TaskRejected(str(exc)) from None


def parse_string_list(answer: str) -> list[str]:
    """A JSON list of strings (analysis instructions)."""
    value = _json_or_reject(answer)
    if not isinstance(value, list):
        raise TaskRejected("expected a JSON list")
    items = [str(v).strip() for v in value if isinstance(v, str) and len(str(v).strip()) > 5]
    if not items:
        raise TaskRejected("no instruction in the list")
    return items


def parse_ideas(answer: str) -> tuple[list[TaskIdea], dict[str, int]]:
    """Valid single-text task ideas, and counts of what was dropped (invalid, compares two texts)."""
    value = _json_or_reject(answer)
    if isinstance(value, dict):
        value = value.get("tasks") or value.get("ideas") or [value]
    if not isinstance(value, list):
        raise TaskRejected("expected a JSON list of task ideas")
    ideas, dropped = [], {"invalid": 0, "two_texts": 0}
    for item in value:
        try:
            idea = TaskIdea.model_validate(item)
        except ValidationError:
            dropped["invalid"] += 1
            continue
        if _TWO_TEXTS.search(idea.name + " " + idea.description):
            dropped["two_texts"] += 1
            continue
        ideas.append(idea)
    if not ideas:
        raise TaskRejected(f"no valid single-text task idea ({dropped})")
    return ideas, dropped


def check_output(task: TaskDefinition, output: str) -> str | None:
    """Why an output breaks the task's format (None when it is fine)."""
    text = output.strip()
    if task.type == "closed_classification" and task.labels and match_label(text, task.labels) is None:
        return f"'{text[:40]}' is not one of the labels"
    if task.type == "structured":
        try:
            value = parse_json_lenient(text)
        except ValueError:
            return "output is not JSON"
        error = task.schema_error(value)
        if error is not None:
            return f"output breaks the schema: {error[:80]}"
    if task.type == "rating" and not re.search(r"\d", text):
        return "a rating needs a number"
    return None


@lru_cache(maxsize=4096)
def _validator(schema_json: str):
    """A compiled JSON-schema validator per schema (fastjsonschema turns it into Python code once;
    None for a schema it cannot compile, which standardisation rejects)."""
    import fastjsonschema

    try:
        return fastjsonschema.compile(json.loads(schema_json))
    except (fastjsonschema.JsonSchemaDefinitionException, ValueError, TypeError, KeyError, RecursionError):
        return None


def _schema_error(schema_json: str, value: Any) -> str | None:
    """Why a value breaks a JSON schema given as canonical JSON (None when it fits)."""
    import fastjsonschema

    validate = _validator(schema_json)
    if validate is None:
        return None
    try:
        validate(value)
    except fastjsonschema.JsonSchemaValueException as exc:
        return exc.message
    return None


def match_label(text: str, labels: list[str]) -> str | None:
    """The label an answer names (case, quotes and trailing punctuation ignored), or None."""
    clean = text.strip().strip("\"'`*").rstrip(".!").strip().lower()
    for label in labels:
        if clean == label.lower():
            return label
    return None


def parse_definition(answer: str, idea_type: str, min_examples: int) -> tuple[TaskDefinition, int]:
    """A standardised task from the teacher's JSON; closed-set examples outside the labels are dropped.

    Returns the task and the number of dropped examples. Raises TaskRejected when the definition is
    incomplete (no labels for a closed set, no schema for structured output, too few examples).
    """
    value = _json_or_reject(answer)
    if not isinstance(value, dict):
        raise TaskRejected("expected a JSON object")
    value.setdefault("type", idea_type)
    try:
        task = TaskDefinition.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise TaskRejected(
            f"invalid definition: {'.'.join(map(str, first['loc']))}: {first['msg']}"
        ) from None
    if _TWO_TEXTS.search(task.name + " " + task.instruction):
        raise TaskRejected("the task compares two texts")
    if task.type == "closed_classification" and (not task.labels or len(task.labels) < 2):
        raise TaskRejected("a closed classification needs at least two labels")
    if task.type == "structured" and not task.json_schema:
        raise TaskRejected("a structured task needs a json_schema")
    if (
        task.type == "structured"
        and task.json_schema
        and _validator(json.dumps(task.json_schema, sort_keys=True)) is None
    ):
        raise TaskRejected("invalid json_schema: it does not compile")
    kept = [d for d in task.examples if check_output(task, d.output) is None]
    dropped = len(task.examples) - len(kept)
    task.examples = kept
    if len(kept) < min_examples:
        raise TaskRejected(f"{len(kept)} valid examples, {min_examples} needed")
    return task, dropped


def parse_demo_pair(answer: str, task: TaskDefinition) -> tuple[list[Demo], int]:
    """Exactly two demos from a demo call, each checked against the task's format.

    Raises TaskRejected when the answer is not two input/output pairs; returns the valid demos and
    how many were dropped for breaking the format (e.g. a label outside the set).
    """
    value = _json_or_reject(answer)
    if isinstance(value, dict):
        value = value.get("examples") or value.get("demos") or [value]
    if not isinstance(value, list) or len(value) != 2:
        raise TaskRejected(
            f"expected exactly two examples, got {len(value) if isinstance(value, list) else 'none'}"
        )
    try:
        demos = [Demo.model_validate(v) for v in value]
    except ValidationError:
        raise TaskRejected("examples need 'input' and 'output'") from None
    kept = [d for d in demos if check_output(task, d.output) is None]
    return kept, len(demos) - len(kept)


def merge_near_duplicates(embeddings: np.ndarray, threshold: float) -> list[int]:
    """For each task, the index of the task it merges into (itself if kept).

    Tasks are taken in order; a task joins the first earlier kept task whose cosine similarity is at
    least ``threshold``, so the representative is the earliest task of its group.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    target = list(range(len(x)))
    kept: list[int] = []
    for i in range(len(x)):
        if kept:
            sims = x[kept] @ x[i]
            j = int(np.argmax(sims))
            if sims[j] >= threshold:
                target[i] = kept[j]
                continue
        kept.append(i)
    return target
