"""Instructions: seeded pairing of tasks with user texts, the prompt a student sees, and QC."""

from __future__ import annotations

import json
import math
import random
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from compeff.synth.seed_tasks import fill
from compeff.synth.tasks import TaskDefinition, check_output


class Pairing(NamedTuple):
    """One planned sample: which task meets which text, and which demonstrations are inlined."""

    id: str
    task_id: str
    text_index: int
    demo_indices: tuple[int, ...]


def _capped_draws(rng: random.Random, ids: list[str], n: int, cap_factor: float) -> list[str]:
    """n draws from ids, uniform among those below their cap (cap = ceil(cap_factor * n / len(ids)))."""
    if not ids or n <= 0:
        return []
    cap = max(1, math.ceil(cap_factor * n / len(ids)))
    counts = dict.fromkeys(ids, 0)
    open_ids = list(ids)
    draws = []
    for _ in range(n):
        k = rng.randrange(len(open_ids))
        task_id = open_ids[k]
        draws.append(task_id)
        counts[task_id] += 1
        if counts[task_id] >= cap:
            open_ids[k] = open_ids[-1]
            open_ids.pop()
            if not open_ids:  # every task at its cap: start a new round of caps
                open_ids = list(ids)
                counts = dict.fromkeys(ids, 0)
    return draws


def plan_pairings(
    tasks: list[dict[str, Any]],
    n_texts: int,
    n_samples: int,
    k_demos: int,
    seed: int,
    task_cap: float = 2.0,
    analysis_share: float = 0.1,
    seed_share: float = 0.5,
) -> list[Pairing]:
    """Random pairing of instructions with texts, fixed by the seed: a shuffled text order, a task per
    sample drawn with a per-task cap, and k demonstrations per sample drawn from its task. Seed tasks
    (``source: seed``) get ``seed_share`` of the non-analysis samples when the teacher wrote tasks too,
    all of them when it wrote none."""
    rng = random.Random(seed)
    seeded = [t["id"] for t in tasks if t.get("source") == "seed"]
    demonstrated = [t["id"] for t in tasks if t["type"] != "analysis" and t.get("source") != "seed"]
    analysis = [t["id"] for t in tasks if t["type"] == "analysis"]
    n_analysis = round(analysis_share * n_samples) if analysis else 0
    if not demonstrated and not seeded:
        n_analysis = n_samples
    n_closed = n_samples - n_analysis
    n_seed = (round(seed_share * n_closed) if demonstrated else n_closed) if seeded else 0
    draws = (
        _capped_draws(rng, demonstrated, n_closed - n_seed, task_cap)
        + _capped_draws(rng, seeded, n_seed, task_cap)
        + _capped_draws(rng, analysis, n_analysis, task_cap)
    )
    rng.shuffle(draws)
    gen = np.random.default_rng(seed)
    order = gen.permutation(n_texts)
    # k demonstrations per sample, without replacement, drawn for all samples of a task at once
    demo_rows: list[tuple[int, ...]] = [()] * len(draws)
    positions: dict[str, list[int]] = {}
    for i, task_id in enumerate(draws):
        positions.setdefault(task_id, []).append(i)
    n_demos = {t["id"]: len(t["demos"]) for t in tasks}
    for task_id in sorted(positions):
        available = n_demos[task_id]
        take = min(k_demos, available)
        if take == 0:
            continue
        rows = np.sort(np.argsort(gen.random((len(positions[task_id]), available)), axis=1)[:, :take], axis=1)
        for i, row in zip(positions[task_id], rows.tolist()):
            demo_rows[i] = tuple(row)
    return [
        Pairing(f"g{i:07d}", task_id, int(order[i % n_texts]), demo_rows[i])
        for i, task_id in enumerate(draws)
    ]


def instruction_head(task: dict[str, Any]) -> str:
    """The part of a task's user message that every sample shares: instruction and output rules."""
    parts = [task["description"].strip()]
    if task["type"] != "analysis":
        parts.append(f"Output format: {task['output_format']}")
        if task.get("labels"):
            parts.append(f"Allowed labels: {', '.join(task['labels'])}")
        if task.get("copy_exact"):
            parts.append("Copy the spans exactly as they appear in the text.")
        if task.get("json_schema"):
            parts.append(f"JSON schema: {json.dumps(task['json_schema'], ensure_ascii=False)}")
    return "\n\n".join(parts)


def render_instruction(
    task: dict[str, Any], text: str, demos: list[dict[str, str]], head: str | None = None
) -> str:
    """The user message: task instruction, its output rules, inlined demonstrations, then the text.
    ``head`` is :func:`instruction_head` of the task, when the caller keeps it (many samples per task)."""
    parts = [instruction_head(task) if head is None else head]
    if demos:
        parts.append("Examples:\n" + "\n\n".join(f"Text: {d['input']}\nAnswer: {d['output']}" for d in demos))
    parts.append(f"Text: {text}")
    return "\n\n".join(parts)


def pairing_prompts(
    tasks: dict[str, dict[str, Any]], texts: list[dict[str, Any]], max_chars: int | None = None
) -> Callable[..., str]:
    """A function from a planned pairing to its user message (each task's head rendered once), so the
    generate stage, its difficulty proxy and the benchmark all build the very same prompt."""
    heads = {task_id: instruction_head(task) for task_id, task in tasks.items()}

    def prompt(pairing: Pairing, text: str | None = None) -> str:
        """The pairing's user message; ``text`` in place of its user text (content-free calibration)."""
        task = tasks[pairing.task_id]
        if text is None:
            text = texts[pairing.text_index]["text"][:max_chars]
        if task.get("wordings"):
            return fill(
                task["wordings"][wording_index(pairing.id, len(task["wordings"]))], task["labels"], text
            )
        demos = [task["demos"][i] for i in pairing.demo_indices]
        return render_instruction(task, text, demos, heads[pairing.task_id])

    return prompt


def wording_index(sample_id: str, n: int) -> int:
    """Which of a task's ``n`` wordings a sample uses: fixed by its id, spread evenly."""
    return zlib.crc32(sample_id.encode("utf-8")) % n


def task_definition(task: dict[str, Any]) -> TaskDefinition | None:
    """The validated definition of a tasks.jsonl row (None for open analysis instructions)."""
    if task["type"] == "analysis":
        return None
    return TaskDefinition.model_validate({**task, "instruction": task["description"], "examples": []})


def qc_reason(task: dict[str, Any], response: str, definition: TaskDefinition | None = None) -> str | None:
    """Why a teacher answer breaks its task's format (None when fine); analysis answers need text only."""
    if not response.strip():
        return "empty answer"
    if task["type"] == "analysis":
        return None
    return check_output(definition or task_definition(task), response)
