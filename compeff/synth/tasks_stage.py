"""``compeff tasks``: perspectives -> analysis instructions and tasks with demonstrations.

Three teacher phases, each a resumable sub-stage of ``runs/<name>/tasks/``: ``ideas`` (analysis
instructions and task ideas per perspective), ``standard`` (one standardised definition per idea) and
``demos`` (``demo_calls`` calls per task, two demonstrations each, in the style of real user texts).
Near-duplicate tasks are merged between ``standard`` and ``demos`` so no teacher call is spent on a
duplicate. The product is ``tasks/tasks.jsonl`` plus ``summary.md``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from compeff.config import Recipe
from compeff.data import DataError, select_user_texts, source_inputs
from compeff.progress import console
from compeff.prompts import load_prompt, render_prompt
from compeff.runs import Stage, iter_jsonl
from compeff.synth import answer_schemas
from compeff.synth.answer_schemas import schema_text
from compeff.synth.seed_tasks import fill, seed_task_rows
from compeff.synth.tasks import (
    TaskDefinition,
    TaskRejected,
    merge_near_duplicates,
    parse_definition,
    parse_demo_pair,
    parse_ideas,
    parse_string_list,
)
from compeff.teachers import ChatRequest, Teacher, TeacherResult, make_teacher, sampling_params
from compeff.teaching import AnswerRejected, answer_requests, open_cache, teacher_identity

TASKS_FILE = "tasks.jsonl"


def perspectives_path(recipe: Recipe) -> Path:
    return recipe.run_dir / "cluster" / "perspectives.json"


def load_perspectives(path: Path, limit: int | None) -> list[dict[str, Any]]:
    """The cluster stage's perspectives (largest first), cut to ``limit``."""
    if not path.is_file():
        raise DataError(f"{path}: no perspectives (run `compeff cluster` first)")
    try:
        perspectives = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    return perspectives[:limit] if limit else perspectives


def _perspective_fields(p: dict[str, Any]) -> dict[str, str]:
    return {
        "perspective": p["exemplar"],
        "members": ", ".join(m["name"] for m in p["members"][:12]),
        "descriptions": "; ".join(p.get("top_descriptions") or []) or "(none given)",
    }


def _rng_for(key: str, seed: int) -> random.Random:
    """A random stream fixed by the run's seed and an item id (stable under resume and sharding)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


def format_demos(demos: list[dict[str, str]]) -> str:
    """Seed demonstrations as the demo prompt shows them."""
    return "\n\n".join(f"Input: {d['input']}\nOutput: {d['output']}" for d in demos)


def labels_line(task: dict[str, Any]) -> str:
    """The 'Allowed labels' line of the demo prompt (empty for tasks without labels)."""
    return f"\nAllowed labels: {', '.join(task['labels'])}" if task.get("labels") else ""


class _Phases:
    """Runs the three teacher phases with one lazily created teacher and cache."""

    def __init__(self, recipe: Recipe, root: Path, progress: bool):
        self.recipe = recipe
        self.root = root
        self.progress = progress
        self.teacher: Teacher | None = None
        self.cache = None
        self._params_by_schema: dict[str | None, Any] = {}
        tokens = recipe.tasks.max_tokens
        self.limits: dict[str, Any] = {"max_tokens": tokens} if tokens else {}

    def run(self, phase: str, config: dict[str, Any], requests: list[ChatRequest], to_record) -> Stage:
        stage = Stage.open(
            self.root,
            phase,
            config={**config, "teacher": {**teacher_identity(self.recipe.teacher), **self.limits}},
        )
        with stage:
            pending = stage.pending(requests)
            if pending:
                if self.teacher is None:
                    self.teacher = make_teacher(self.recipe.teacher, seed=self.recipe.run.seed)
                    self.cache = open_cache(self.recipe.teacher)
                before = self.teacher.usage.to_dict()
                counts = answer_requests(
                    stage, self.teacher, pending, to_record, cache=self.cache, progress=self.progress
                )
                after = self.teacher.usage.to_dict()
                stage.extra["call"] = counts
                stage.extra["teacher_usage"] = {k: after[k] - before.get(k, 0) for k in after}
        return stage

    def close(self) -> dict[str, Any]:
        usage = self.teacher.usage.to_dict() if self.teacher else {}
        if self.teacher:
            self.teacher.close()
        if self.cache:
            self.cache.close()
        return usage

    def ask(
        self, rid: str, prompt: str, meta: dict[str, Any], schema: dict[str, Any] | None = None
    ) -> ChatRequest:
        """A request for one phase; ``schema`` is the JSON the answer must follow (structured output)."""
        key = schema_text(schema)
        params = self._params_by_schema.get(key)
        if params is None:
            params = self._params_by_schema[key] = sampling_params(
                self.recipe.teacher, schema=schema, **self.limits
            )
        return ChatRequest(id=rid, messages=[{"role": "user", "content": prompt}], params=params, meta=meta)


def _rejecting(fn):
    """Turn TaskRejected into the stage's AnswerRejected (raw answer kept in failures.jsonl)."""

    def wrapped(request: ChatRequest, result: TeacherResult) -> dict[str, Any]:
        try:
            return fn(request, result)
        except TaskRejected as exc:
            raise AnswerRejected(str(exc)) from None

    return wrapped


def run_tasks_stage(recipe: Recipe, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write analysis instructions and demonstrated tasks for every perspective."""
    settings = recipe.tasks
    source = perspectives_path(recipe)
    perspectives = load_perspectives(source, settings.max_perspectives)
    texts, _ = select_user_texts(
        recipe.data.user_texts, 2000, recipe.run.seed, recipe.data.text_field, recipe.data.dir
    )
    if len(texts) < 2:
        raise DataError("data.user_texts: demonstrations need at least two user texts")
    prompts = {
        name: load_prompt(name) for name in ("analysis", "task_ideas", "task_standardise", "task_demos")
    }
    # a bad seed-task file: one line, before any call; the rows themselves (labels, wordings) are part of
    # the stage's settings, so a compeff whose built-in seed tasks changed asks them again
    seeds = seed_task_rows(list(settings.seed_tasks), settings.seed_tasks_file)
    config = {
        "tasks": settings.model_dump(),
        "seed": recipe.run.seed,
        "teacher": teacher_identity(recipe.teacher),
        "prompts": prompts,
        "seed_tasks": seeds,
    }
    inputs = {"perspectives": source, **source_inputs(recipe.data.user_texts, recipe.data.dir)}
    if settings.seed_tasks_file:  # an edited file makes the stage stale
        inputs["seed_tasks_file"] = Path(settings.seed_tasks_file)
    stage = Stage.open(recipe.run_dir, "tasks", config=config, inputs=inputs, force=force)
    report: dict[str, Any] = {}
    with stage:
        phases = _Phases(recipe, stage.folder, progress)
        try:
            tasks = _build_tasks(recipe, perspectives, texts, phases, report)
        finally:
            report["teacher_usage"] = phases.close()
        stage.append(tasks)
        stage.write_artifact(TASKS_FILE, "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tasks))
        stage.write_artifact("summary.md", summary_markdown(tasks, report))
        stage.extra.update(report=report, tasks=len(tasks))
        console.print(
            f"tasks: {len(tasks)} instructions and tasks from {len(perspectives)} perspectives "
            f"({report.get('merged', 0)} near-duplicates merged) -> {stage.folder / TASKS_FILE}"
        )
    assert stage.manifest is not None
    return stage.manifest


def _build_tasks(
    recipe: Recipe,
    perspectives: list[dict[str, Any]],
    texts: list[dict[str, Any]],
    phases: _Phases,
    report: dict[str, Any],
) -> list[dict[str, Any]]:
    settings = recipe.tasks
    seed = recipe.run.seed
    by_pid = {p["id"]: p for p in perspectives}

    # ---- phase 1: analysis instructions and task ideas per perspective
    requests = []
    for p in perspectives:
        fields = _perspective_fields(p)
        if settings.analysis_instructions:
            requests.append(
                phases.ask(
                    f"p{p['id']}:analysis",
                    render_prompt("analysis", n=str(settings.analysis_instructions), **fields),
                    {"perspective": p["id"], "kind": "analysis"},
                    answer_schemas.ANALYSIS,
                )
            )
        requests.append(
            phases.ask(
                f"p{p['id']}:ideas",
                render_prompt("task_ideas", n=str(settings.ideas_per_perspective), **fields),
                {"perspective": p["id"], "kind": "ideas"},
                answer_schemas.IDEAS,
            )
        )

    def idea_record(request: ChatRequest, result: TeacherResult) -> dict[str, Any]:
        base = {"id": request.id, **request.meta, "answer": result.text}
        if request.meta["kind"] == "analysis":
            return {**base, "instructions": parse_string_list(result.text)[: settings.analysis_instructions]}
        ideas, dropped = parse_ideas(result.text)
        return {
            **base,
            "ideas": [i.model_dump() for i in ideas[: settings.ideas_per_perspective]],
            "dropped": dropped,
        }

    ideas_stage = phases.run("ideas", {"phase": "ideas"}, requests, _rejecting(idea_record))
    rows = list(iter_jsonl(ideas_stage.data_path))
    analysis = [r for r in rows if r["kind"] == "analysis"]
    idea_rows = [r for r in rows if r["kind"] == "ideas"]
    report["ideas"] = sum(len(r["ideas"]) for r in idea_rows)
    report["ideas_dropped_two_texts"] = sum(r["dropped"]["two_texts"] for r in idea_rows)
    report["ideas_dropped_invalid"] = sum(r["dropped"]["invalid"] for r in idea_rows)

    # ---- phase 2: standardise each idea
    requests = []
    for row in sorted(idea_rows, key=lambda r: r["perspective"]):
        for j, idea in enumerate(row["ideas"]):
            prompt = render_prompt("task_standardise", min_examples=str(settings.min_examples), **idea)
            requests.append(
                phases.ask(
                    f"p{row['perspective']}:t{j}",
                    prompt,
                    {"perspective": row["perspective"], "idea_type": idea["type"]},
                    answer_schemas.DEFINITION,
                )
            )

    def definition_record(request: ChatRequest, result: TeacherResult) -> dict[str, Any]:
        task, dropped = parse_definition(result.text, request.meta["idea_type"], settings.min_examples)
        return {
            "id": request.id,
            "perspective": request.meta["perspective"],
            "task": task.model_dump(),
            "examples_dropped": dropped,
        }

    standard_stage = phases.run("standard", {"phase": "standard"}, requests, _rejecting(definition_record))
    defined = sorted(iter_jsonl(standard_stage.data_path), key=lambda r: _task_order(r["id"]))
    report["standardised"] = len(defined)
    report["standardise_rejected"] = len(requests) - len(defined)
    report["examples_dropped_off_format"] = sum(r["examples_dropped"] for r in defined)

    # ---- near-duplicate merge (before any demo call is spent)
    merged_into: dict[str, str] = {}
    if defined and settings.dedup_threshold < 1.0:
        from compeff.embeddings import embed_texts

        vectors = embed_texts(
            [f"{r['task']['name']}: {r['task']['instruction']}" for r in defined], recipe.embedder
        )
        targets = merge_near_duplicates(vectors, settings.dedup_threshold)
        merged_into = {defined[i]["id"]: defined[t]["id"] for i, t in enumerate(targets) if t != i}
    kept = [r for r in defined if r["id"] not in merged_into]
    report["merged"] = len(merged_into)
    report["merged_across_perspectives"] = sum(
        1 for a, b in merged_into.items() if a.split(":")[0] != b.split(":")[0]
    )

    # ---- phase 3: demonstrations
    requests = []
    for row in kept:
        task = row["task"]
        for c in range(settings.demo_calls):
            rid = f"{row['id']}:d{c}"
            rng = _rng_for(rid, seed)
            pair = rng.sample(texts, 2)
            seeds = rng.sample(task["examples"], min(len(task["examples"]), rng.randint(1, 2)))
            prompt = render_prompt(
                "task_demos",
                instruction=task["instruction"],
                output_format=task["output_format"],
                labels=labels_line(task),
                seed_demos=format_demos(seeds),
                text1=pair[0]["text"][:600],
                text2=pair[1]["text"][:600],
            )
            requests.append(phases.ask(rid, prompt, {"task_id": row["id"]}, answer_schemas.DEMO_PAIR))
    definitions = {r["id"]: TaskDefinition.model_validate(r["task"]) for r in kept}

    def demo_record(request: ChatRequest, result: TeacherResult) -> dict[str, Any]:
        demos, dropped = parse_demo_pair(result.text, definitions[request.meta["task_id"]])
        return {
            "id": request.id,
            "task_id": request.meta["task_id"],
            "demos": [d.model_dump() for d in demos],
            "dropped": dropped,
        }

    demo_stage = phases.run("demos", {"phase": "demos"}, requests, _rejecting(demo_record))
    demos_by_task: dict[str, list[dict[str, str]]] = defaultdict(list)
    demos_dropped = 0
    for row in sorted(
        iter_jsonl(demo_stage.data_path), key=lambda r: (_task_order(r["task_id"]), _task_order(r["id"]))
    ):
        demos_by_task[row["task_id"]].extend(row["demos"])
        demos_dropped += row["dropped"]
    report["demo_calls"] = len(requests)
    report["demo_calls_failed"] = len(requests) - demo_stage.n_ok
    report["demos_dropped_off_format"] = demos_dropped

    # ---- assemble
    tasks: list[dict[str, Any]] = []
    too_few = []
    for row in kept:
        demos = demos_by_task.get(row["id"], [])
        if len(demos) < settings.min_demos:
            too_few.append(row["id"])
            continue
        task = row["task"]
        p = by_pid.get(row["perspective"], {})
        tasks.append(
            {
                "id": row["id"],
                "perspective_id": row["perspective"],
                "perspective": p.get("exemplar"),
                "name": task["name"],
                "type": task["type"],
                "description": task["instruction"],
                "output_format": task["output_format"],
                "labels": task["labels"],
                "copy_exact": task["copy_exact"],
                "json_schema": task["json_schema"],
                "examples": task["examples"],
                "demos": demos,
                "merged_from": sorted(a for a, b in merged_into.items() if b == row["id"]),
            }
        )
    report["dropped_too_few_demos"] = too_few
    for row in sorted(analysis, key=lambda r: r["perspective"]):
        p = by_pid.get(row["perspective"], {})
        for k, text in enumerate(row["instructions"]):
            tasks.append(
                {
                    "id": f"p{row['perspective']}:a{k}",
                    "perspective_id": row["perspective"],
                    "perspective": p.get("exemplar"),
                    "name": f"{p.get('exemplar', 'perspective')} analysis {k + 1}",
                    "type": "analysis",
                    "description": text,
                    "output_format": "free text",
                    "labels": None,
                    "copy_exact": None,
                    "json_schema": None,
                    "examples": [],
                    "demos": [],
                    "merged_from": [],
                }
            )
    tasks = add_seed_tasks(recipe, tasks, report)
    report["by_type"] = dict(Counter(t["type"] for t in tasks))
    return tasks


def add_seed_tasks(
    recipe: Recipe, tasks: list[dict[str, Any]], report: dict[str, Any]
) -> list[dict[str, Any]]:
    """The teacher's tasks followed by the seed tasks (``tasks.seed_tasks``); a seed task that is a near
    duplicate of one of the teacher's is merged into it (the teacher's comes first). Counts by source."""
    settings = recipe.tasks
    seeds = seed_task_rows(list(settings.seed_tasks), settings.seed_tasks_file)
    own = [t for t in tasks if t["type"] != "analysis"]
    merged = 0
    if seeds and own and settings.dedup_threshold < 1.0:
        from compeff.embeddings import embed_texts

        vectors = embed_texts(
            [f"{t['name']}: {t['description']}" for t in own]
            + [f"{t['name']}: {fill(t['description'], t['labels'], '')}" for t in seeds],
            recipe.embedder,
        )
        targets = merge_near_duplicates(vectors, settings.dedup_threshold)
        keep = []
        for j, seed in enumerate(seeds):
            target = targets[len(own) + j]
            if target == len(own) + j:
                keep.append(seed)
            elif target < len(own):  # merged into a teacher task
                own[target]["merged_from"] = sorted([*own[target]["merged_from"], seed["id"]])
                merged += 1
            else:  # two seed tasks alike: the first is kept
                merged += 1
        seeds = keep
    report["by_source"] = {"teacher": len(tasks), "seed": len(seeds)}
    report["seed_merged"] = merged
    return tasks + seeds


def _task_order(rid: str) -> tuple:
    """Sort key for ids like 'p3:t12:d5' that orders numbers numerically."""
    return tuple(int(part[1:]) if part[1:].isdigit() else part for part in rid.split(":"))


def summary_markdown(tasks: list[dict[str, Any]], report: dict[str, Any]) -> str:
    """Counts of every filter and a table of tasks by type and perspective."""
    by_pair = Counter((t["perspective"], t["type"]) for t in tasks)
    types = sorted({t["type"] for t in tasks})
    lines = [
        "# Tasks",
        "",
        f"- task ideas: {report.get('ideas', 0)} (dropped: {report.get('ideas_dropped_two_texts', 0)} comparing two texts, "
        f"{report.get('ideas_dropped_invalid', 0)} invalid)",
        f"- standardised: {report.get('standardised', 0)} (rejected: {report.get('standardise_rejected', 0)}; "
        f"examples off format dropped: {report.get('examples_dropped_off_format', 0)})",
        f"- near-duplicates merged: {report.get('merged', 0)} ({report.get('merged_across_perspectives', 0)} across perspectives)",
        f"- demo calls: {report.get('demo_calls', 0)} (failed or unparseable: {report.get('demo_calls_failed', 0)}; "
        f"demos off format dropped: {report.get('demos_dropped_off_format', 0)})",
        f"- tasks dropped for too few demos: {len(report.get('dropped_too_few_demos', []))}",
        f"- by source: {', '.join(f'{k}: {v}' for k, v in report.get('by_source', {}).items())} "
        f"(seed tasks merged into the teacher's: {report.get('seed_merged', 0)})",
        f"- final: {len(tasks)} ({', '.join(f'{k}: {v}' for k, v in sorted(report.get('by_type', {}).items()))})",
        "",
        "| perspective | " + " | ".join(types) + " |",
        "|---|" + "---:|" * len(types),
    ]
    for perspective in sorted({t["perspective"] or "" for t in tasks}):
        lines.append(
            f"| {perspective} | " + " | ".join(str(by_pair.get((perspective, ty), 0)) for ty in types) + " |"
        )
    return "\n".join(lines) + "\n"
