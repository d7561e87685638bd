"""``compeff eval``: accuracy and macro-F1 of a model on labelled sets, k-shot label-word scoring.

Every prediction is a line of ``runs/<name>/eval/data.jsonl`` (set, seed, label, prediction, label
scores), so a killed evaluation resumes; ``results.json`` / ``results.csv`` / ``results.md`` hold the
per-set scores (mean and spread over the demo seeds), confusion matrices, the overall score (mean over
sets x 100) and the settings.
"""

from __future__ import annotations

import csv
import io
import os
from functools import lru_cache
from typing import Any

import numpy as np

from compeff.config import Recipe
from compeff.data import DataError, dataset_name, load_labelled
from compeff.evaluate.classification import (
    HFLabelScorer,
    LabelledSet,
    classification_metrics,
    draw_demos,
    label_pieces,
    label_shares,
    label_variants,
    mean_over_seeds,
    render_prompt,
    served_label_scores,
    stratified_subset,
    summarise,
)
from compeff.models import student_model
from compeff.progress import Tracker, console
from compeff.runs import Stage, iter_jsonl, weights_fingerprint

DEMO_SPLITS = {"imdb": "imdb:train", "tweeteval_sentiment": "tweeteval_sentiment:validation"}


def demo_source(spec: str) -> str:
    """Where a set's demonstrations come from: the train split of a known set, else the set itself."""
    name = dataset_name(spec)
    if name in DEMO_SPLITS and spec != DEMO_SPLITS[name]:
        return DEMO_SPLITS[name]
    return spec


def load_eval_set(
    spec: str, limit: int | None, seed: int, data_dir: str | None, label_names: list[str] | None = None
) -> LabelledSet:
    """A labelled set (stratified subsample if ``limit``) and its demo pool."""
    known = dataset_name(spec) in DEMO_SPLITS
    rows, names, report = load_labelled(spec, root=data_dir, label_names=None if known else label_names)
    if not rows:
        raise DataError(f"{spec}: no labelled record ({'; '.join(report.problems[:3]) or 'empty'})")
    keep = stratified_subset([r["label"] for r in rows], limit, seed)
    source = demo_source(spec)
    demos = rows if source == spec else load_labelled(source, label_names=names, root=data_dir)[0]
    return LabelledSet(
        name=spec,
        texts=[rows[i]["text"] for i in keep],
        labels=[rows[i]["label"] for i in keep],
        label_names=list(names),
        demo_texts=[r["text"] for r in demos],
        demo_labels=[r["label"] for r in demos],
    )


def resolve_eval_model(recipe: Recipe) -> tuple[str, str | None]:
    """(model, adapter) to evaluate, following ``eval.model``."""
    choice = recipe.eval.model
    if choice == "student":
        return student_model(recipe.student), recipe.eval.adapter
    if choice == "teacher":
        return recipe.teacher.model, recipe.eval.adapter
    if choice:
        return choice, recipe.eval.adapter
    trained = recipe.run_dir / "sft" / "model"
    if (trained / "adapter_config.json").exists():
        return student_model(recipe.student), str(trained)
    if (trained / "config.json").exists():
        return str(trained), None
    return student_model(recipe.student), recipe.eval.adapter


def eval_prompts(data: LabelledSet, k: int, seed: int, max_chars: int) -> list[str]:
    """The k-shot prompt of every text of a set (demos drawn per text from the seed, never the text)."""
    return [
        render_prompt(
            text, draw_demos(data, k, seed * 1_000_003 + i, exclude=text), data.label_names, max_chars
        )
        for i, text in enumerate(data.texts)
    ]


@lru_cache(maxsize=64)
def _first_pieces(
    url: str, model: str, label_names: tuple[str, ...], api_key: str | None
) -> dict[str, str] | None:
    """The server's first token of every spelling of the labels: asked once per server and label set,
    not once per set and seed."""
    from compeff.teachers.tokenize_api import served_first_pieces

    variants = [v for name in label_names for v in label_variants(name)]
    return served_first_pieces(url, model, variants, api_key)


def served_label_tokens(recipe: Recipe, label_names: list[str]) -> dict[str, int] | None:
    """The served tokenizer's first token of every spelling of each label word (None, with a note, when
    the server has no tokenize endpoint: label tokens are then matched by prefix)."""
    t = recipe.teacher
    first = _first_pieces(str(t.base_urls[0]), t.model, tuple(label_names), os.environ.get(t.api_key_env))
    if first is None:
        console.print(
            "[yellow]eval: the server has no tokenize endpoint compeff knows; label tokens are matched by "
            "prefix (a token that starts several label words is skipped)[/yellow]"
        )
        return None
    return label_pieces(first, label_names)


def served_predictions(recipe: Recipe, prompts: list[str], label_names: list[str], tag: str):
    """Predictions of the recipe's served model (openai backend) from its top log-probabilities."""
    from compeff.teachers import ChatRequest, SamplingParams
    from compeff.teaching import teacher_session

    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=20)
    pieces = served_label_tokens(recipe, label_names)
    requests = [
        ChatRequest(id=f"{tag}|{i}", messages=[{"role": "user", "content": p}], params=params)
        for i, p in enumerate(prompts)
    ]
    preds, scores, failures = [-1] * len(prompts), [[float("-inf")] * len(label_names)] * len(prompts), []
    with teacher_session(recipe.teacher) as (teacher, _):
        for result in teacher.generate(requests):
            i = int(result.id.rsplit("|", 1)[1])
            if not result.ok or not result.logprobs or not result.logprobs[0]:
                failures.append({"id": result.id, "reason": result.error or "no logprobs in the answer"})
                continue
            first = (result.logprobs[0].get("content") or [{}])[0]
            s = served_label_scores(first.get("top_logprobs") or [first], label_names, pieces)
            scores[i] = s.tolist()
            if np.isfinite(s).any():
                preds[i] = int(np.argmax(s))
            else:  # counted as wrong, and kept where failures are
                failures.append({"id": result.id, "reason": "no label word among the top log-probabilities",
                                 "kind": "rejected", "answer": result.text})  # fmt: skip
    return preds, np.array(scores), failures


def _compared_models(recipe: Recipe) -> list[tuple[str, str]]:
    """(tag, model) of each model ``eval.compare`` adds beside the evaluated one."""
    paths = {"teacher": recipe.teacher.model, "student": student_model(recipe.student)}
    return [(tag, paths[tag]) for tag in recipe.eval.compare]


def run_eval_stage(recipe: Recipe, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Evaluate the chosen model (and the ``eval.compare`` models) on every set and seed; write the
    results tables."""
    s = recipe.eval
    model, adapter = resolve_eval_model(recipe)
    sets = s.sets or recipe.data.eval_sets
    compared = _compared_models(recipe)
    config = {
        "eval": s.model_dump(exclude={"batch_size", "device"}),
        "model": model if s.backend == "hf" else f"{recipe.teacher.model}@openai",
        "adapter": adapter,
        "sets": sets,
        "seed": recipe.run.seed,
    }
    config["weights"] = weights_fingerprint(model) if s.backend == "hf" else None
    config["adapter_weights"] = weights_fingerprint(adapter) if adapter else None
    config["compared"] = {tag: weights_fingerprint(path) for tag, path in compared}
    stage = Stage.open(recipe.run_dir, "eval", config=config, inputs={}, force=force)
    with stage:
        done_rows: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
        for row in iter_jsonl(stage.data_path):
            done_rows.setdefault((row.get("model_tag", ""), row["set"], row["seed"]), []).append(row)
        data_sets = {
            spec: load_eval_set(spec, s.limit, recipe.run.seed, recipe.data.dir, s.label_names)
            for spec in sets
        }
        evaluated = [("", model, adapter, s.backend)] + [(tag, path, None, "hf") for tag, path in compared]
        total = len(sets) * len(s.seeds) * len(evaluated)
        per_model: dict[str, dict[str, dict[str, Any]]] = {}
        with Tracker("eval (model x set x seed)", total=total, enabled=progress) as tracker:
            for tag, name, adapter_path, backend in evaluated:
                per_model[tag] = _evaluate_model(
                    recipe, stage, tag, name, adapter_path, backend, data_sets, done_rows, tracker
                )
        per_set = per_model[""]
        overall = summarise(per_set)
        comparison = {
            tag or "evaluated": {"model": name, "sets": per_model[tag], "overall": summarise(per_model[tag])}
            for tag, name, _, _ in evaluated
        }
        results = {"model": model, "adapter": adapter, "backend": s.backend, "settings": config, "sets": per_set,
                   "overall": overall, "comparison": comparison if compared else None}  # fmt: skip
        stage.write_artifact("results.json", results)
        stage.write_artifact("results.csv", results_csv(per_set))
        stage.write_artifact("results.md", results_markdown(results))
        stage.extra["overall"] = overall
        if compared:
            stage.extra["compared"] = {tag: c["overall"] for tag, c in comparison.items()}
        console.print(
            f"eval: {model}{' + ' + adapter if adapter else ''}: accuracy {overall['accuracy']:.1f}, "
            f"macro-F1 {overall['macro_f1']:.1f} (mean over {len(per_set)} sets x 100) -> {stage.folder}"
        )
    assert stage.manifest is not None
    return {**stage.manifest, "results": results}


def _evaluate_model(
    recipe: Recipe,
    stage: Stage,
    tag: str,
    model: str,
    adapter: str | None,
    backend: str,
    data_sets: dict[str, LabelledSet],
    done_rows: dict[tuple[str, str, int], list[dict[str, Any]]],
    tracker: Tracker,
) -> dict[str, dict[str, Any]]:
    """Metrics of one model on every set (mean over seeds), reusing the rows an earlier run kept."""
    s = recipe.eval
    scorer = None
    per_set: dict[str, dict[str, Any]] = {}
    prefix = f"{tag}|" if tag else ""
    try:
        for spec, data in data_sets.items():
            runs = []
            all_preds: list[int] = []
            for seed in s.seeds:
                rows = done_rows.get((tag, spec, seed))
                if rows is None or len(rows) != len(data.texts):
                    prompts = eval_prompts(data, s.k_shot, seed, s.max_chars)
                    if backend == "openai":
                        preds, scores, failures = served_predictions(
                            recipe, prompts, data.label_names, f"{spec}|{seed}"
                        )
                        stage.fail(failures)
                    else:
                        if scorer is None:
                            scorer = HFLabelScorer(
                                model, adapter, s.device, s.chat_template, s.max_length, s.batch_size
                            )
                        preds, scores = scorer.predict(prompts, data.label_names)
                    rows = [
                        {"id": f"{prefix}{spec}|{seed}|{i}", "set": spec, "seed": seed, "label": y, "pred": p,
                         "scores": [round(float(v), 5) for v in sc], **({"model_tag": tag} if tag else {})}
                        for i, (y, p, sc) in enumerate(zip(data.labels, preds, scores, strict=True))
                    ]  # fmt: skip
                    stage.append(rows)
                preds = [r["pred"] for r in sorted(rows, key=lambda r: int(r["id"].rsplit("|", 1)[1]))]
                truth = data.labels
                scored = [(y, p if p >= 0 else (y + 1) % len(data.label_names)) for y, p in zip(truth, preds, strict=True)]  # fmt: skip
                runs.append(
                    {
                        "seed": seed,
                        **classification_metrics(
                            [a for a, _ in scored], [b for _, b in scored], len(data.label_names)
                        ),
                    }
                )
                all_preds += preds
                tracker.advance(1)
            result = mean_over_seeds(runs)
            result.update(
                n=len(data.texts),
                label_names=data.label_names,
                predicted_share=label_shares(all_preds, data.label_names),
            )
            per_set[spec] = result
    finally:
        del scorer  # one model in memory at a time
    return per_set


def results_csv(per_set: dict[str, dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["set", "n", "accuracy", "accuracy_std", "macro_f1", "macro_f1_std"])
    for name, r in per_set.items():
        writer.writerow([name, r["n"], f"{r['accuracy']:.4f}", f"{r['accuracy_std']:.4f}", f"{r['macro_f1']:.4f}", f"{r['macro_f1_std']:.4f}"])  # fmt: skip
    return buf.getvalue()


def results_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]["eval"]
    lines = [
        f"# Evaluation: {results['model']}" + (f" + {results['adapter']}" if results["adapter"] else ""),
        "",
        f"{s['k_shot']}-shot label-word scoring, seeds {s['seeds']}, backend {results['backend']}"
        + (", chat template" if s["chat_template"] else ""),
        "",
        "| set | n | accuracy | macro-F1 |",
        "|---|---:|---:|---:|",
    ]
    for name, r in results["sets"].items():
        lines.append(
            f"| {name} | {r['n']} | {100 * r['accuracy']:.1f} +- {100 * r['accuracy_std']:.1f} | "
            f"{100 * r['macro_f1']:.1f} +- {100 * r['macro_f1_std']:.1f} |"
        )
    o = results["overall"]
    lines.append(f"| **overall** (mean x 100) | | **{o['accuracy']:.1f}** | **{o['macro_f1']:.1f}** |")
    if results.get("comparison"):
        names = list(results["sets"])
        lines += ["", "Side by side, same prompts and seeds (accuracy / macro-F1, x 100):", "",
                  "| model | " + " | ".join(names) + " | overall |", "|---|" + "---:|" * (len(names) + 1)]  # fmt: skip
        for tag, c in results["comparison"].items():
            cells = [
                f"{100 * c['sets'][n]['accuracy']:.1f} / {100 * c['sets'][n]['macro_f1']:.1f}" for n in names
            ]
            lines.append(f"| {tag} (`{c['model']}`) | " + " | ".join(cells)
                         + f" | {c['overall']['accuracy']:.1f} / {c['overall']['macro_f1']:.1f} |")  # fmt: skip
    for name, r in results["sets"].items():
        names = r["label_names"]
        lines += ["", f"Confusion on {name} (rows: truth, columns: prediction; summed over seeds)", ""]
        lines += ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines += [
            f"| {names[i]} | " + " | ".join(str(v) for v in row) + " |"
            for i, row in enumerate(r["confusion"])
        ]
    return "\n".join(lines) + "\n"
