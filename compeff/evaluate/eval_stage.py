"""``compeff eval``: accuracy and macro-F1 of models on labelled sets, over several prompt wordings.

Every prediction is a line of ``runs/<name>/eval/data.jsonl`` (model, set, wording, seed, label,
prediction, label log-masses), so a killed evaluation resumes; ``results.json`` / ``results.csv`` /
``results.md`` hold per set the mean over wordings (accuracy, macro-F1, spread) and a ``wordings`` entry
per wording (accuracy, macro-F1, agreement with the teacher, calibrated scores), confusion matrices, the
overall score (mean over sets x 100) and the settings.
"""

from __future__ import annotations

import csv
import io
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from compeff.config import Recipe
from compeff.data import DataError, dataset_name, load_labelled
from compeff.evaluate.classification import (
    CONTENT_FREE,
    HFLabelScorer,
    LabelledSet,
    label_owners,
    label_variants,
    served_label_scores,
    stratified_subset,
    summarise,
)
from compeff.evaluate.ruler import WordingRun, reference_preds, run_wording, summarise_runs
from compeff.evaluate.wordings import Wording, resolve_wordings
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


def adapter_base(adapter: Path) -> str | None:
    """The local model folder a LoRA adapter was trained on (its ``base_model_name_or_path``), so the
    adapter is put back on those weights even when the recipe's student settings changed since; None
    when that folder is gone (then the recipe's student is used)."""
    try:
        base = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path"
        )
    except (OSError, ValueError):
        return None
    return str(base) if base and Path(str(base)).is_dir() else None


def resolve_eval_model(recipe: Recipe) -> tuple[str, str | None]:
    """(model, adapter) to evaluate, following ``eval.model``."""
    choice = recipe.eval.model
    if choice == "student":
        return student_model(recipe.student, recipe.data), recipe.eval.adapter
    if choice == "teacher":
        return recipe.teacher.model, recipe.eval.adapter
    if choice:
        return choice, recipe.eval.adapter
    trained = recipe.run_dir / "sft" / "model"
    if (trained / "adapter_config.json").exists():
        return adapter_base(trained) or student_model(recipe.student, recipe.data), str(trained)
    if (trained / "config.json").exists():
        return str(trained), None
    return student_model(recipe.student, recipe.data), recipe.eval.adapter


@lru_cache(maxsize=64)
def _first_pieces(
    url: str, model: str, label_names: tuple[str, ...], api_key: str | None
) -> dict[str, str] | None:
    """The server's first token of every spelling of the labels (None: it has no tokenize endpoint),
    asked once per server and label set, not once per set and wording. An unreachable server raises
    TokenizerUnreachable, which lru_cache never keeps: the next call asks again."""
    from compeff.teachers.tokenize_api import served_first_pieces

    variants = [v for name in label_names for v in label_variants(name)]
    return served_first_pieces(url, model, variants, api_key)


def served_label_tokens(recipe: Recipe, label_names: list[str]) -> dict[str, int] | None:
    """The served tokenizer's first token of every spelling of each label word (None, with a note, when
    the server has no tokenize endpoint: label tokens are then matched by prefix). Raises
    TokenizerUnreachable when the server does not answer: the caller falls back for this call only."""
    t = recipe.teacher
    first = _first_pieces(str(t.base_urls[0]), t.model, tuple(label_names), os.environ.get(t.api_key_env))
    if first is None:
        console.print(
            "[yellow]eval: the server has no tokenize endpoint compeff knows; label tokens are matched by "
            "prefix (a token that starts several label words is skipped)[/yellow]"
        )
        return None
    return label_owners(first, label_names)


def outage_note(exc: Exception) -> None:
    """Say that label tokens are matched by prefix this once because the tokenizer did not answer."""
    console.print(f"[yellow]{exc}; label tokens matched by prefix this time, asked again next time[/yellow]")


class ServedLabelScorer:
    """A served model (the recipe's teacher settings, openai backend) read from the top log-probabilities
    of its answer's first token: the same label arithmetic as a local model, over the top-k it lists. A
    text whose top-k names no label has no evidence (-inf for every label): it is counted as wrong and
    kept in ``failures`` with its answer."""

    def __init__(self, recipe: Recipe, tag: str = "served"):
        self.recipe = recipe
        self.failures: list[dict[str, Any]] = []
        self.start(tag)

    def start(self, tag: str) -> None:
        """Name the next run's requests: ``tag|i`` for the texts, ``tag|cfj`` for a second (content-free)
        call, the ids of the stage's rows, so a failure and the row written later share their id."""
        self.tag = tag
        self._calls = 0

    def label_log_mass(
        self, user_turns: list[str], label_names: list[str], cue: str = "Answer"
    ) -> np.ndarray:
        from compeff.teachers import ChatRequest, SamplingParams
        from compeff.teaching import teacher_session

        params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=20)
        from compeff.teachers.tokenize_api import TokenizerUnreachable

        try:
            pieces = served_label_tokens(self.recipe, label_names)
        except TokenizerUnreachable as exc:
            outage_note(exc)
            pieces = None
        mark = "" if self._calls == 0 else "cf"
        self._calls += 1
        requests = [
            ChatRequest(id=f"{self.tag}|{mark}{i}", messages=[{"role": "user", "content": p}], params=params)
            for i, p in enumerate(user_turns)
        ]
        scores = np.full((len(user_turns), len(label_names)), -np.inf)
        with teacher_session(self.recipe.teacher) as (teacher, _):
            for result in teacher.generate(requests):
                i = int(result.id.rsplit("|", 1)[1].removeprefix("cf"))
                if not result.ok or not result.logprobs or not result.logprobs[0]:
                    self.failures.append(
                        {"id": result.id, "reason": result.error or "no logprobs in the answer"}
                    )
                    continue
                first = (result.logprobs[0].get("content") or [{}])[0]
                # a top-20 that names no label is a result (no evidence: counted as no_label), not a failure
                scores[i] = served_label_scores(first.get("top_logprobs") or [first], label_names, pieces)
        return scores


def served_predictions(recipe: Recipe, prompts: list[str], label_names: list[str], tag: str):
    """Predictions of the recipe's served model for ready prompts: (labels, log-masses, failures)."""
    scorer = ServedLabelScorer(recipe, tag)
    mass = scorer.label_log_mass(prompts, label_names)
    preds = [int(np.argmax(m)) if np.isfinite(m).any() else -1 for m in mass]
    return preds, mass, scorer.failures


def _compared_models(recipe: Recipe) -> list[tuple[str, str]]:
    """(tag, model) of each model ``eval.compare`` adds beside the evaluated one."""

    def path(tag: str) -> str:  # the student (perhaps cut and healed) is built only when compared
        return recipe.teacher.model if tag == "teacher" else student_model(recipe.student, recipe.data)

    return [(tag, path(tag)) for tag in recipe.eval.compare]


def eval_wordings(recipe: Recipe) -> list[Wording]:
    """The wordings every model is scored on (``eval.wordings``, else the defaults)."""
    s = recipe.eval
    specs = None if s.wordings is None else [w if isinstance(w, str) else w.model_dump() for w in s.wordings]
    # a served model is always asked through its chat endpoint: it gets the chat defaults
    return resolve_wordings(specs, s.chat_template or s.backend == "openai", s.k_shot)


def run_eval_stage(recipe: Recipe, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Evaluate the chosen model (and the ``eval.compare`` models) on every set and wording; write the
    results tables, with each student's agreement with the teacher when the teacher is among them."""
    s = recipe.eval
    model, adapter = resolve_eval_model(recipe)
    sets = s.sets or recipe.data.eval_sets
    compared = _compared_models(recipe)
    wordings = eval_wordings(recipe)
    config = {
        "eval": s.model_dump(exclude={"batch_size", "device"}),
        "wordings": [w.__dict__ for w in wordings],
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
        done_rows: dict[tuple[str, str, str, int | None], list[dict[str, Any]]] = {}
        for row in iter_jsonl(stage.data_path):
            key = (row.get("model_tag", ""), row["set"], row.get("wording", ""), row.get("seed"))
            done_rows.setdefault(key, []).append(row)
        data_sets = {
            spec: load_eval_set(spec, s.limit, recipe.run.seed, recipe.data.dir, s.label_names)
            for spec in sets
        }
        evaluated = [("", model, adapter, s.backend)] + [(tag, path, None, "hf") for tag, path in compared]
        runs_per_wording = sum(len(s.seeds) if w.k_shot else 1 for w in wordings)
        total = len(sets) * runs_per_wording * len(evaluated)
        runs: dict[str, dict[str, list[WordingRun]]] = {}
        with Tracker("eval (model x set x wording)", total=total, enabled=progress) as tracker:
            for tag, name, adapter_path, backend in evaluated:
                runs[tag] = _evaluate_model(
                    recipe, stage, tag, name, adapter_path, backend, data_sets, wordings, done_rows, tracker
                )
        teacher_tag = "teacher" if "teacher" in runs else ("" if s.model == "teacher" else None)
        per_model: dict[str, dict[str, dict[str, Any]]] = {}
        for tag in runs:
            per_model[tag] = {}
            for spec, data in data_sets.items():
                reference = calibrated = None
                if teacher_tag is not None and tag != teacher_tag:
                    reference = reference_preds(runs[teacher_tag][spec])
                    calibrated = reference_preds(runs[teacher_tag][spec], batch_calibrated=True)
                per_model[tag][spec] = summarise_runs(data, runs[tag][spec], reference, calibrated)
        per_set = per_model[""]
        overall = summarise(per_set)
        comparison = {
            tag or "evaluated": {"model": name, "sets": per_model[tag], "overall": summarise(per_model[tag])}
            for tag, name, _, _ in evaluated
        }
        g = recipe.generate  # how this run's chain decided the teacher's labels the student learnt
        taught = {
            "batch_calibrate": g.batch_calibrate,
            "calibrate": g.calibrate,
            "label_ensemble": g.label_ensemble,
        }
        results = {"model": model, "adapter": adapter, "backend": s.backend, "settings": config, "sets": per_set,
                   "overall": overall, "comparison": comparison if compared else None, "taught": taught}  # fmt: skip
        stage.write_artifact("results.json", results)
        stage.write_artifact("results.csv", results_csv(per_set))
        stage.write_artifact("results.md", results_markdown(results))
        stage.extra["overall"] = overall
        if compared:
            stage.extra["compared"] = {tag: c["overall"] for tag, c in comparison.items()}
        console.print(
            f"eval: {model}{' + ' + adapter if adapter else ''}: accuracy {overall['accuracy']:.1f}, "
            f"macro-F1 {overall['macro_f1']:.1f} (mean over {len(wordings)} wordings and {len(per_set)} sets "
            f"x 100) -> {stage.folder}"
        )
    assert stage.manifest is not None
    return {**stage.manifest, "results": results}


def _mass_row(values: list[float | None]) -> list[float]:
    return [float("-inf") if v is None else float(v) for v in values]


def _stored(values: np.ndarray) -> list[float | None]:
    return [round(float(v), 5) if np.isfinite(v) else None for v in values]


def _evaluate_model(
    recipe: Recipe,
    stage: Stage,
    tag: str,
    model: str,
    adapter: str | None,
    backend: str,
    data_sets: dict[str, LabelledSet],
    wordings: list[Wording],
    done_rows: dict[tuple[str, str, str, int | None], list[dict[str, Any]]],
    tracker: Tracker,
) -> dict[str, list[WordingRun]]:
    """Every wording run of one model on every set, reusing the rows an earlier run kept."""
    s = recipe.eval
    scorer: Any = None
    out: dict[str, list[WordingRun]] = {}
    prefix = f"{tag}|" if tag else ""
    try:
        for spec, data in data_sets.items():
            out[spec] = []
            for wording in wordings:
                for seed in s.seeds if wording.k_shot else [None]:
                    rows = done_rows.get((tag, spec, wording.name, seed), [])
                    texts = sorted((r for r in rows if not r.get("content_free")), key=_row_index)
                    free = sorted((r for r in rows if r.get("content_free")), key=_row_index)
                    if len(texts) == len(data.texts) and (not s.calibrate or len(free) == len(CONTENT_FREE)):
                        run = WordingRun(
                            wording.name,
                            seed,
                            np.array([_mass_row(r["scores"]) for r in texts]).reshape(len(texts), -1),
                            np.array([_mass_row(r["scores"]) for r in free]) if s.calibrate else None,
                        )
                    else:
                        if scorer is None:
                            scorer = (
                                ServedLabelScorer(recipe, tag or "evaluated")
                                if backend == "openai"
                                else HFLabelScorer(
                                    model, adapter, s.device, s.chat_template, s.max_length, s.batch_size
                                )
                            )
                        base = f"{prefix}{spec}|{wording.name}|{seed if seed is not None else '-'}"
                        if backend == "openai":
                            scorer.start(base)
                        run = run_wording(scorer, data, wording, seed, s.k_shot, s.max_chars, s.calibrate)
                        failed: set[str] = set()
                        if backend == "openai":  # failed calls get no row: the next run asks them again
                            failed = {f["id"] for f in scorer.failures}
                            stage.fail(scorer.failures)
                            scorer.failures = []
                        common = {"set": spec, "wording": wording.name, "seed": seed,
                                  **({"model_tag": tag} if tag else {})}  # fmt: skip
                        new = [
                            {"id": f"{base}|{i}", **common, "label": y, "pred": p, "scores": _stored(m)}
                            for i, (y, p, m) in enumerate(
                                zip(data.labels, run.preds, run.log_mass, strict=True)
                            )
                        ]
                        if run.content_free is not None:
                            new += [
                                {"id": f"{base}|cf{j}", **common, "content_free": True, "scores": _stored(m)}
                                for j, m in enumerate(run.content_free)
                            ]
                        stage.append([row for row in new if row["id"] not in failed])
                    out[spec].append(run)
                    tracker.advance(1)
    finally:
        del scorer  # one model in memory at a time
    return out


def _row_index(row: dict[str, Any]) -> int:
    last = row["id"].rsplit("|", 1)[1]
    return int(last[2:]) if last.startswith("cf") else int(last)


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def results_csv(per_set: dict[str, dict[str, Any]]) -> str:
    """One line per set and wording (wording 'mean': the mean over wordings)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["set", "wording", "n", "accuracy", "macro_f1", "agreement", "batch_calibrated_accuracy",
                     "batch_calibrated_macro_f1", "agreement_batch_calibrated"])  # fmt: skip

    def cells(e: dict[str, Any]) -> list[str]:
        b = e.get("batch_calibrated") or {}
        return [f"{e['accuracy']:.4f}", f"{e['macro_f1']:.4f}", _num(e.get("agreement")),
                _num(b.get("accuracy")), _num(b.get("macro_f1")), _num(e.get("agreement_batch_calibrated"))]  # fmt: skip

    for name, r in per_set.items():
        for wording, w in r["wordings"].items():
            writer.writerow([name, wording, r["n"], *cells(w)])
        writer.writerow([name, "mean", r["n"], *cells(r)])
    return buf.getvalue()


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def results_markdown(results: dict[str, Any]) -> str:
    """The results as a page: per set the mean over wordings with its spread, each wording (accuracy,
    macro-F1, agreement with the teacher, calibrated rows), the side-by-side table and confusions."""
    s = results["settings"]
    names_w = [w["name"] for w in s["wordings"]]
    lines = [
        f"# Evaluation: {results['model']}" + (f" + {results['adapter']}" if results["adapter"] else ""),
        "",
        f"Label-word scoring over {len(names_w)} wordings ({', '.join(names_w)}), backend {results['backend']}"
        + (", chat template" if s["eval"]["chat_template"] else "")
        + ". A label's evidence is the probability of the first tokens of all its spellings; a score is the "
        "mean over wordings +- its spread (std over wordings). No wording is chosen on test data.",
        "",
        "| set | n | accuracy | macro-F1 | no label |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results["sets"].items():
        lines.append(
            f"| {name} | {r['n']} | {100 * r['accuracy']:.1f} +- {100 * r['accuracy_std']:.1f} | "
            f"{100 * r['macro_f1']:.1f} +- {100 * r['macro_f1_std']:.1f} | {r['no_label']} |"
        )
    o = results["overall"]
    lines.append(f"| **overall** (mean x 100) | | **{o['accuracy']:.1f}** | **{o['macro_f1']:.1f}** | |")
    models = results.get("comparison") or {"evaluated": {"model": results["model"], "sets": results["sets"]}}
    for set_name in results["sets"]:
        lines += [
            "",
            f"## {set_name}: each wording (accuracy / macro-F1 / agreement with the teacher, x 100)",
            "",
        ]
        lines += ["| model | " + " | ".join(names_w) + " | mean |", "|---|" + "---:|" * (len(names_w) + 1)]
        for tag, c in models.items():
            r = c["sets"][set_name]
            cells = []
            for w in names_w:
                e = r["wordings"].get(w, {})
                cells.append(
                    f"{_pct(e.get('accuracy'))} / {_pct(e.get('macro_f1'))} / {_pct(e.get('agreement'))}"
                )
            cells.append(f"{_pct(r['accuracy'])} / {_pct(r['macro_f1'])} / {_pct(r.get('agreement'))}")
            lines.append(f"| {tag} | " + " | ".join(cells) + " |")
            if "calibrated" in r:
                cal = [_pct(r["wordings"][w]["calibrated"]["accuracy"]) + " / " + _pct(r["wordings"][w]["calibrated"]["macro_f1"]) + " / -" for w in names_w if w in r["wordings"]]  # fmt: skip
                cal.append(f"{_pct(r['calibrated']['accuracy'])} / {_pct(r['calibrated']['macro_f1'])} / -")
                lines.append(f"| {tag}, calibrated | " + " | ".join(cal) + " |")
    names = list(results["sets"])
    taught = results.get("taught") or {}
    if taught.get("batch_calibrate"):
        how = "this run's chain batch-calibrated the teacher's labels (on its own samples and wordings), so the "
        how += "calibrated teacher here is an estimate of what its student was taught"
    else:
        how = "this run's chain did not batch-calibrate (`generate.batch_calibrate: false`): its student was "
        how += "taught the teacher's plain labels"
    extra = [k for k in ("calibrate",) if taught.get(k)] + (
        [f"label_ensemble {taught['label_ensemble']}"] if (taught.get("label_ensemble") or 1) > 1 else []
    )
    if extra:
        how += f"; the chain also used generate {', '.join(extra)}, which this table does not reproduce"
    lines += ["", "Batch calibration (each label distribution divided by the model's mean over these texts, per "
              "wording: the arithmetic of `generate.batch_calibrate`; transductive, no label read), mean over "
              "wordings, x 100: each model's accuracy / macro-F1 so calibrated, and its agreement with the "
              f"teacher's plain and batch-calibrated labels. Here {how}.", "",
              "| model | " + " | ".join(f"{n}: acc / F1, batch-calibrated | agree: teacher / calibrated teacher" for n in names) + " |",
              "|---|" + "---:|---:|" * len(names)]  # fmt: skip
    for tag, c in models.items():
        cells = []
        for n in names:
            r = c["sets"][n]
            b = r.get("batch_calibrated") or {}
            cells += [f"{_pct(b.get('accuracy'))} / {_pct(b.get('macro_f1'))}",
                      f"{_pct(r.get('agreement'))} / {_pct(r.get('agreement_batch_calibrated'))}"]  # fmt: skip
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    if results.get("comparison"):
        names = list(results["sets"])
        lines += ["", "Side by side (mean over wordings, accuracy / macro-F1, x 100):", "",
                  "| model | " + " | ".join(names) + " | overall |", "|---|" + "---:|" * (len(names) + 1)]  # fmt: skip
        for tag, c in results["comparison"].items():
            cells = [
                f"{100 * c['sets'][n]['accuracy']:.1f} / {100 * c['sets'][n]['macro_f1']:.1f}" for n in names
            ]
            lines.append(f"| {tag} (`{c['model']}`) | " + " | ".join(cells)
                         + f" | {c['overall']['accuracy']:.1f} / {c['overall']['macro_f1']:.1f} |")  # fmt: skip
    for name, r in results["sets"].items():
        names = r["label_names"]
        lines += ["", f"Confusion on {name} (rows: truth, columns: prediction; summed over wordings)", ""]
        lines += ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines += [
            f"| {names[i]} | " + " | ".join(str(v) for v in row) + " |"
            for i, row in enumerate(r["confusion"])
        ]
    return "\n".join(lines) + "\n"
