"""``compeff score``: every sample of a distillation set gets its difficulty under a scorer LM.

Writes ``runs/<name>/score/data.jsonl`` (the input records plus ``difficulty`` {rank, ppl, ifd,
length} and ``score_info``), unscorable samples to ``failures.jsonl``, one histogram PNG per metric,
and ``summary.md`` / ``summary.json``. ``--shard K/N`` scores a part; ``--merge`` joins the parts;
``--proxy`` then trains the difficulty proxy (:mod:`compeff.select.proxy`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from compeff.config import ConfigError, Recipe
from compeff.models import student_model
from compeff.progress import Tracker, console
from compeff.runs import Stage, iter_jsonl, read_chat_set, upstream_data, weights_fingerprint
from compeff.select.difficulty import DifficultyScorer, Scored, ScoreOptions
from compeff.select.plots import histogram_png
from compeff.shards import (
    check_shards_match,
    finished_shards,
    merge_shard_records,
    parse_shard,
    shard_of,
    shard_stage_name,
)

SATURATION = 0.5  # warn when over half of the rho values sit at an end of [0, 1]


def score_input(recipe: Recipe) -> Path:
    """The set to score: ``score.input`` or the run's generate output."""
    return upstream_data(recipe.run_dir, recipe.score.input, "generate", "distillation set", "score.input")


def scorer_name(recipe: Recipe) -> str:
    return recipe.score.scorer or student_model(recipe.student, recipe.data)


def score_options(recipe: Recipe) -> ScoreOptions:
    s = recipe.score
    return ScoreOptions(
        metrics=tuple(s.metrics),
        top_p=s.top_p,
        exclude_argmax=s.exclude_argmax,
        layout=s.layout,
        separator=s.separator,
        max_length=s.max_length,
        truncation_side=s.truncation_side,
        padding_side=s.padding_side,
        batch_size=s.batch_size,
    )


def _stage_config(recipe: Recipe) -> dict[str, Any]:
    settings = recipe.score.model_dump(
        exclude={
            "shard",
            "merge",
            "proxy",
            "proxy_head",
            "proxy_holdout",
            "batch_size",
            "device",
            "padding_side",
        }
    )
    scorer = scorer_name(recipe)  # once: a healed student's texts are read on each call
    return {"score": settings, "scorer": scorer, "scorer_weights": weights_fingerprint(scorer)}


def run_score_stage(recipe: Recipe, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Score the distillation set (or a shard of it, or merge the shards); then the proxy if asked. With
    ``score.warmup_samples`` the stage runs through :func:`compeff.train.score_warmup.run_score_stage`,
    which trains the scorer first and passes it here as ``score.scorer``."""
    settings = recipe.score
    if settings.warmup_samples and not settings.scorer:
        raise ConfigError(
            "score.warmup_samples: run the score stage as `compeff score` (compeff.train.score_warmup "
            "trains the warmed-up scorer first)"
        )
    manifest = merge_score_shards(recipe, force) if settings.merge else _score(recipe, force, progress)
    if settings.proxy and not settings.shard:
        from compeff.select.proxy import run_proxy

        manifest = {**manifest, "proxy": run_proxy(recipe, force=force, progress=progress)}
    return manifest


def _score(recipe: Recipe, force: bool, progress: bool) -> dict[str, Any]:
    settings = recipe.score
    source = score_input(recipe)
    rows = read_chat_set(source)
    name = "score"
    if settings.shard:
        k, n = parse_shard(settings.shard)
        rows = [r for r in rows if shard_of(str(r["id"]), n) == k]
        name = shard_stage_name("score", settings.shard)
    stage = Stage.open(
        recipe.run_dir, name, config=_stage_config(recipe), inputs={"data": source}, force=force
    )
    with stage:
        pending = stage.pending(rows, key=lambda r: r["id"])
        if pending:
            by_id = {str(r["id"]): r for r in pending}
            with Tracker(
                f"score ({len(rows)} samples)",
                total=len(rows),
                enabled=progress,
                done=len(rows) - len(pending),
            ) as tracker:
                executor: dict[str, Any] = {"kind": recipe.run.executor}
                samples = [(str(r["id"]), r["messages"]) for r in pending]
                for batch in score_batches(recipe, samples, executor):
                    ok = [
                        {**by_id[s.id], "difficulty": s.difficulty, "score_info": s.info}
                        for s in batch
                        if s.error is None
                    ]
                    bad = [{"id": s.id, "reason": s.error, "kind": "unscorable"} for s in batch if s.error]
                    stage.append(ok)
                    stage.fail(bad)
                    tracker.advance(len(ok), len(bad))
                stage.extra["executor"] = executor
        write_score_summary(stage, len(rows))
    assert stage.manifest is not None
    return stage.manifest


def scorer_worker(
    name: str, options: ScoreOptions, device: str, dtype: str
) -> Callable[[list[tuple[str, list[dict[str, Any]]]]], list[Scored]]:
    """The scorer, loaded once (in a Ray actor), scoring a batch of (id, messages) pairs."""
    scorer = DifficultyScorer.load(name, options, device, dtype)

    def score(samples: list[tuple[str, list[dict[str, Any]]]]) -> list[Scored]:
        return [s for batch in scorer.score(samples) for s in batch]

    return score


def score_batches(
    recipe: Recipe, samples: list[tuple[str, list[dict[str, Any]]]], executor: dict[str, Any]
) -> Iterator[list[Scored]]:
    """Scored batches of (id, messages) pairs: in this process, or on a pool of Ray actors that each load
    the scorer once (``run.executor: ray``; ``executor`` gets where they ran); either way this process
    writes them. On Ray the samples go out in length order, as the local scorer batches them, so a Ray
    batch pads about as little as a local one."""
    s = recipe.score
    if recipe.run.executor == "ray":
        from compeff.ray_exec import map_on_actors, new_stats

        executor.update(new_stats(recipe.ray))
        kwargs = {
            "name": scorer_name(recipe),
            "options": score_options(recipe),
            "device": s.device,
            "dtype": s.dtype,
        }
        ordered = sorted(samples, key=lambda sample: sum(len(str(m.get("content", ""))) for m in sample[1]))
        yield from map_on_actors(ordered, scorer_worker, kwargs, recipe.ray, stats=executor)
        return
    yield from DifficultyScorer.load(scorer_name(recipe), score_options(recipe), s.device, s.dtype).score(
        samples
    )


def merge_score_shards(recipe: Recipe, force: bool = False) -> dict[str, Any]:
    """Join every finished ``score-shard-K-of-N`` into ``score``."""
    shards = finished_shards(recipe.run_dir, "score")
    source = score_input(recipe)
    check_shards_match(shards, _stage_config(recipe), {"data": source})
    stage = Stage.open(
        recipe.run_dir, "score", config=_stage_config(recipe), inputs={"data": source}, force=force
    )
    with stage:
        if not stage.was_complete:  # else merged before from these very shards: left as it is
            merge_shard_records(stage, shards)
            stage.extra["merged_shards"] = [p.name for p in shards]
            write_score_summary(stage, None)
    assert stage.manifest is not None
    return stage.manifest


def _stats(values: np.ndarray) -> dict[str, float]:
    q = np.percentile(values, [10, 50, 90]) if values.size else [0, 0, 0]
    return {
        "n": int(values.size),
        "mean": float(values.mean()) if values.size else 0.0,
        "std": float(values.std()) if values.size else 0.0,
        "min": float(values.min()) if values.size else 0.0,
        "p10": float(q[0]),
        "median": float(q[1]),
        "p90": float(q[2]),
        "max": float(values.max()) if values.size else 0.0,
    }


def summarize_scores(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Distribution of every metric, their rank correlations, truncation, and warnings."""
    from scipy.stats import spearmanr

    metrics = sorted({m for r in rows for m in r.get("difficulty", {})})
    columns = {m: np.array([r["difficulty"].get(m, np.nan) for r in rows], dtype=float) for m in metrics}
    summary: dict[str, Any] = {
        "samples": len(rows),
        "truncated": sum(bool(r.get("score_info", {}).get("truncated")) for r in rows),
        "metrics": {m: _stats(v[np.isfinite(v)]) for m, v in columns.items()},
        "spearman": {},
        "warnings": [],
    }
    for i, a in enumerate(metrics):
        for b in metrics[i + 1 :]:
            both = np.isfinite(columns[a]) & np.isfinite(columns[b])
            if both.sum() > 2 and np.ptp(columns[a][both]) > 0 and np.ptp(columns[b][both]) > 0:
                summary["spearman"][f"{a}~{b}"] = float(spearmanr(columns[a][both], columns[b][both])[0])
    if "rank" in columns and rows:
        rank = columns["rank"]
        ends = float(np.mean((rank < 0.02) | (rank > 0.98)))
        if ends > SATURATION:
            summary["warnings"].append(
                f"{ends:.0%} of rho values are within 0.02 of 0 or 1: the scorer barely separates samples "
                "(warm the scorer up with score.warmup_samples, or check score.top_p; sample.tie_break orders the ties)"
            )
    return summary


def summary_markdown(summary: dict[str, Any], expected: int | None) -> str:
    lines = [
        "# Difficulty scores",
        "",
        f"- scored samples: {summary['samples']}" + (f" of {expected}" if expected else ""),
        f"- samples whose response was cut by score.max_length: {summary['truncated']}",
        "",
        "| metric | n | mean | std | p10 | median | p90 | max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, s in summary["metrics"].items():
        lines.append(
            f"| {m} | {s['n']} | {s['mean']:.4g} | {s['std']:.4g} | {s['p10']:.4g} | {s['median']:.4g} "
            f"| {s['p90']:.4g} | {s['max']:.4g} |"
        )
    if summary["spearman"]:
        lines += [
            "",
            "Spearman correlations: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["spearman"].items()),
        ]
    for warning in summary["warnings"]:
        lines += ["", f"**Warning:** {warning}"]
    return "\n".join(lines) + "\n"


def write_score_summary(stage: Stage, expected: int | None) -> dict[str, Any]:
    """Histograms and summary of a score stage folder, read back from its data file."""
    rows = list(iter_jsonl(stage.data_path))
    summary = summarize_scores(rows)
    for metric in summary["metrics"]:
        values = np.array([r["difficulty"].get(metric, np.nan) for r in rows], dtype=float)
        label = metric
        if metric == "ppl":
            values, label = np.log10(values), "log10 perplexity"
        stage.write_artifact(
            f"hist_{metric}.png", histogram_png({"all": values}, f"difficulty: {metric}", label)
        )
    stage.write_artifact("summary.json", summary)
    stage.write_artifact("summary.md", summary_markdown(summary, expected))
    stage.extra["summary"] = {m: s["mean"] for m, s in summary["metrics"].items()}
    for warning in summary["warnings"]:
        console.print(f"[yellow]score: {warning}[/yellow]")
    console.print(f"{stage.name}: {summary['samples']} samples scored -> {stage.data_path}")
    return summary
