"""``compeff sample``: keep the most informative share of the scored set, and say what was kept.

Writes ``runs/<name>/sample/data.jsonl`` (the retained records, a chat dataset for ``compeff sft``),
``report.json`` / ``report.md`` (kept/total overall, per perspective, per task type; class balance of
closed-set answers before and after; warnings) and ``hist_before_after.png``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np

from compeff.config import Recipe, SampleSettings
from compeff.data import DataError
from compeff.progress import console
from compeff.runs import Stage, iter_jsonl, read_chat_set, upstream_data
from compeff.select.plots import histogram_png
from compeff.select.sampling import select

CLASS_SHIFT_POINTS = 10.0  # warn when a class share moves by more than this many percentage points
MIN_GROUP_FOR_BALANCE = 10


def sample_input(recipe: Recipe) -> Path:
    """The scored set: ``sample.input`` or the run's score output."""
    return upstream_data(recipe.run_dir, recipe.sample.input, "score", "scored set", "sample.input")


def group_key(row: dict[str, Any], mode: str) -> Hashable:
    """The selection group of a record: its task (each analysis instruction is its own task), or one
    global group."""
    if mode == "global":
        return "all"
    if "task_id" in row:
        return str(row["task_id"])
    return (row.get("perspective_id"), row.get("task_name", "(no task)"))


def closed_labels(run_dir: Path) -> dict[str, list[str]]:
    """Label sets of the run's closed-classification tasks (empty when the run has no tasks file)."""
    path = run_dir / "tasks" / "tasks.jsonl"
    if not path.is_file():
        return {}
    return {
        t["id"]: t["labels"]
        for t in iter_jsonl(path)
        if t.get("type") == "closed_classification" and t.get("labels")
    }


def answer_label(row: dict[str, Any], labels: dict[str, list[str]]) -> str | None:
    """The class a closed-set answer names (``label`` field first, else matched against the task)."""
    from compeff.synth.tasks import match_label

    if isinstance(row.get("label"), str):
        return row["label"]
    task_labels = labels.get(str(row.get("task_id")))
    if not task_labels:
        return None
    return match_label(row["messages"][-1]["content"], task_labels) or "(other)"


def _shares(counter: Counter) -> dict[str, float]:
    total = sum(counter.values())
    return {k: round(100.0 * v / total, 2) for k, v in sorted(counter.items())} if total else {}


def selection_report(
    rows: list[dict[str, Any]], keep: list[bool], labels: dict[str, list[str]], group_mode: str
) -> dict[str, Any]:
    """Counts before/after per perspective, task type and group; class balance; warnings."""
    tallies: dict[str, dict[str, Counter]] = {
        k: defaultdict(Counter) for k in ("perspective", "task_type", "group")
    }
    balance: dict[str, Counter] = {"before": Counter(), "after": Counter()}
    per_task_balance: dict[str, dict[str, Counter]] = defaultdict(
        lambda: {"before": Counter(), "after": Counter()}
    )
    for row, kept in zip(rows, keep, strict=True):
        fields = {
            "perspective": str(row.get("perspective_id", "-")),
            "task_type": str(row.get("task_type", "-")),
            "group": str(group_key(row, group_mode)),
        }
        for kind, value in fields.items():
            tallies[kind][value]["total"] += 1
            tallies[kind][value]["kept"] += kept
        label = answer_label(row, labels)
        if label is not None:
            task = str(row.get("task_id", "-"))
            balance["before"][label] += 1
            per_task_balance[task]["before"][label] += 1
            if kept:
                balance["after"][label] += 1
                per_task_balance[task]["after"][label] += 1
    warnings = []
    empty = sorted(g for g, c in tallies["group"].items() if c["kept"] == 0)
    if empty:
        warnings.append(f"{len(empty)} group(s) kept no sample: {', '.join(empty[:10])}")

    def shift_warnings(where: str, before: Counter, after: Counter) -> None:
        b, a = _shares(before), _shares(after)
        for label in sorted(set(b) | set(a)):
            moved = a.get(label, 0.0) - b.get(label, 0.0)
            if abs(moved) > CLASS_SHIFT_POINTS:
                warnings.append(
                    f"{where}: the share of '{label}' moved {moved:+.1f} points ({b.get(label, 0):.1f}% -> "
                    f"{a.get(label, 0):.1f}%)"
                )

    if sum(balance["before"].values()):
        shift_warnings("closed-set answers overall", balance["before"], balance["after"])
    for task, counts in sorted(per_task_balance.items()):
        if sum(counts["before"].values()) >= MIN_GROUP_FOR_BALANCE:
            shift_warnings(f"task {task}", counts["before"], counts["after"])
    return {
        "total": len(rows),
        "kept": int(sum(keep)),
        **{f"by_{k}": {v: dict(c) for v, c in sorted(t.items())} for k, t in tallies.items()},
        "class_balance": {
            "before": dict(balance["before"]),
            "after": dict(balance["after"]),
            "before_pct": _shares(balance["before"]),
            "after_pct": _shares(balance["after"]),
        },
        "class_balance_per_task": {
            t: {"before": dict(c["before"]), "after": dict(c["after"])}
            for t, c in sorted(per_task_balance.items())
        },
        "warnings": warnings,
    }


def report_markdown(report: dict[str, Any], settings: dict[str, Any]) -> str:
    def table(title: str, key: str) -> list[str]:
        out = ["", f"## {title}", "", "| | kept | total | share |", "|---|---:|---:|---:|"]
        for name, c in report[key].items():
            out.append(
                f"| {name} | {c.get('kept', 0)} | {c['total']} | {c.get('kept', 0) / c['total']:.1%} |"
            )
        return out

    total = report["total"] or 1
    lines = [
        "# Selection",
        "",
        f"- kept {report['kept']} of {report['total']} ({report['kept'] / total:.1%}); "
        + ", ".join(f"{k} {v}" for k, v in settings.items()),
    ]
    cb = report["class_balance"]
    if cb["before"]:
        lines += [
            "",
            "## Closed-set answers",
            "",
            "| class | before | after | share before | share after |",
            "|---|---:|---:|---:|---:|",
        ]
        for label in sorted(set(cb["before"]) | set(cb["after"])):
            lines.append(
                f"| {label} | {cb['before'].get(label, 0)} | {cb['after'].get(label, 0)} | "
                f"{cb['before_pct'].get(label, 0):.1f}% | {cb['after_pct'].get(label, 0):.1f}% |"
            )
    lines += table("Per perspective", "by_perspective") + table("Per task type", "by_task_type")
    for warning in report["warnings"]:
        lines += ["", f"**Warning:** {warning}"]
    return "\n".join(lines) + "\n"


def tie_break_metric(settings: SampleSettings, rows: list[dict[str, Any]]) -> str | None:
    """The metric that orders equal difficulties (``sample.tie_break``), or None when it is the metric
    itself or no scored sample has it (then ties keep the id order, as before it existed)."""
    name = settings.tie_break
    if name is None or name == settings.metric:
        return None
    return name if any(_known(r["difficulty"].get(name)) for r in rows) else None


def _known(value: Any) -> bool:
    """A number that is not NaN (an infinite perplexity is a real, very hard value)."""
    return isinstance(value, int | float) and not math.isnan(value)


def tie_value(row: dict[str, Any], name: str) -> float:
    """A row's tie-break value; NaN when it is missing (``select_group`` counts NaN as the easiest)."""
    value = row["difficulty"].get(name)
    return float(value) if isinstance(value, int | float) else math.nan


def select_rows(rows: list[dict[str, Any]], settings: SampleSettings, ratio: float, seed: int) -> list[bool]:
    """Keep flags of the sample stage's selection (method, groups, metric and tie-break of ``settings``)
    at ``ratio``: the one call the stage and the bench's data-efficiency subsets share."""
    ties = tie_break_metric(settings, rows)
    return select(
        rows,
        lambda r: float(r["difficulty"][settings.metric]),
        lambda r: group_key(r, settings.group),
        ratio,
        settings.method,
        seed,
        settings.a,
        None if ties is None else (lambda r: tie_value(r, ties)),
    )


def sample_seed(recipe: Recipe) -> int:
    """The seed of the sample stage's draws: ``sample.seed``, else ``run.seed``."""
    return recipe.run.seed if recipe.sample.seed is None else recipe.sample.seed


def run_sample_stage(recipe: Recipe, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Select the retained subset of the scored set and write it with its report."""
    settings = recipe.sample
    seed = sample_seed(recipe)
    source = sample_input(recipe)
    rows = read_chat_set(source, need=("messages", "difficulty"))
    lacking = [
        i for i, r in enumerate(rows, 1) if not isinstance(r["difficulty"].get(settings.metric), int | float)
    ]
    if lacking:
        raise DataError(
            f"{source}:{lacking[0]}: no '{settings.metric}' difficulty ({len(lacking)} records lack it); "
            f"score with score.metrics including {settings.metric}"
        )
    ties = tie_break_metric(settings, rows)
    missing = 0 if ties is None else sum(not _known(r["difficulty"].get(ties)) for r in rows)
    if missing:
        console.print(
            f"[yellow]sample: {missing} of {len(rows)} samples have no '{ties}' (missing or NaN): their ties "
            "count as the easiest[/yellow]"
        )
    # the tie-break in effect is part of the key only when there is one: stages made before it existed, or
    # with it off or unusable, stay valid (their selection is the same)
    config = {"sample": {**settings.model_dump(exclude={"seed", "input", "tie_break"}), "seed": seed}}
    if ties is not None:
        config["sample"]["tie_break"] = ties
    stage = Stage.open(recipe.run_dir, "sample", config=config, inputs={"scored": source}, force=force)
    with stage:
        keep = select_rows(rows, settings, settings.ratio, seed)
        if not stage.was_complete:
            stage.append(r for r, k in zip(rows, keep, strict=True) if k)
        report = selection_report(rows, keep, closed_labels(recipe.run_dir), settings.group)
        values = np.array([float(r["difficulty"][settings.metric]) for r in rows])
        stage.write_artifact(
            "hist_before_after.png",
            histogram_png(
                {"before": values, "after": values[np.array(keep, dtype=bool)]},
                f"{settings.metric} before and after selection",
                settings.metric,
            ),
        )
        stage.write_artifact("report.json", report)
        shown = {
            "ratio": settings.ratio,
            "method": settings.method,
            "group": settings.group,
            "metric": settings.metric,
            "tie_break": ties or "none (id order)",
        }
        stage.write_artifact("report.md", report_markdown(report, {**shown, "a": settings.a, "seed": seed}))
        stage.extra.update(kept=report["kept"], total=report["total"], warnings=report["warnings"])
        for warning in report["warnings"]:
            console.print(f"[yellow]sample: {warning}[/yellow]")
        console.print(f"sample: kept {report['kept']} of {report['total']} -> {stage.data_path}")
    assert stage.manifest is not None
    return stage.manifest
