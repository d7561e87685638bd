"""``compeff kd``: teacher fine-tuning, student distillation and baselines on a labelled set.

One row per (model, loss, seed) in ``runs/<name>/kd/data.jsonl`` (so a killed run resumes where it
stopped), the fine-tuned teacher in ``kd-teacher/``, cached teacher logits in ``kd-teacher-logits/`` (both
kept by ``--force``, which retrains the students only),
students in ``kd/students/<name>-<loss>-<seed>/``, and ``results.md`` / ``results.json``: accuracy,
macro-F1, agreement with the teacher, confidence and ECE, mean +- std over seeds, and each row's
share of the teacher's accuracy.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from compeff.config import Recipe
from compeff.data import DataError, load_labelled
from compeff.evaluate.classification import stratified_subset
from compeff.progress import Tracker, console
from compeff.runs import Stage, iter_jsonl

TEACHER_DIR = "kd-teacher"


def _steps(n: int, batch_size: int, epochs: float) -> int:
    return max(1, int(round(epochs * math.ceil(n / batch_size))))


def _load_set(spec: str, limit: int | None, seed: int, data_dir: str | None):
    rows, names, report = load_labelled(spec, root=data_dir)
    if not rows:
        raise DataError(f"{spec}: no labelled record ({'; '.join(report.problems[:3]) or 'empty'})")
    keep = stratified_subset([r["label"] for r in rows], limit, seed)
    return [rows[i]["text"] for i in keep], np.array([rows[i]["label"] for i in keep]), names


def _logits_with_progress(model: Any, data: Any, what: str, progress: bool) -> np.ndarray:
    """``predict_logits`` with a progress line: scoring 25,000 long reviews takes minutes on a CPU."""
    from compeff.train.encoder_kd import predict_logits

    with Tracker(f"kd logits: {what}", total=len(data), enabled=progress) as tracker:
        return predict_logits(model, data, progress=lambda n: tracker.advance(n))


def _parameters(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def run_kd_stage(recipe: Recipe, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Fine-tune (or load) the teacher, fit the baselines, distil every student x loss x seed."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from compeff.models import resolve_model
    from compeff.teachers.hf_local import pick_device
    from compeff.train.baselines import baseline_logits
    from compeff.train.encoder_kd import (
        TeacherLogitCache,
        classifier_metrics,
        encode,
        layer_pruned_copy,
        train_classifier,
    )

    hf_logging.disable_progress_bar()
    k = recipe.kd
    seed0 = k.seeds[0]
    train_texts, train_labels, names = _load_set(k.train_set, k.train_limit, recipe.run.seed, recipe.data.dir)
    test_texts, test_labels, _ = _load_set(k.test_set, k.test_limit, recipe.run.seed, recipe.data.dir)
    device = pick_device(k.device)
    config = {"kd": k.model_dump(exclude={"device"}), "seed": recipe.run.seed}
    stage = Stage.open(recipe.run_dir, "kd", config=config, force=force)
    with stage:
        done = {r["id"]: r for r in iter_jsonl(stage.data_path)}
        # the teacher and its logits live beside the kd stage, so `kd --force` retrains students only
        teacher_dir = Path(k.teacher) if k.teacher else recipe.run_dir / TEACHER_DIR
        base = resolve_model(k.teacher_model)
        recipe_of_teacher = {
            f: getattr(k, f)
            for f in ("teacher_model", "train_set", "train_limit", "max_length", "truncation", "teacher_epochs",
                      "teacher_lr", "batch_size", "group_by_length")
        } | {"seed": seed0, "run_seed": recipe.run.seed}  # fmt: skip
        marker = teacher_dir / "compeff_teacher.json"
        trained = (teacher_dir / "config.json").exists() and (
            k.teacher is not None or (marker.exists() and json.loads(marker.read_text()) == recipe_of_teacher)
        )
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir if trained else base)
        train = encode(tokenizer, train_texts, train_labels, k.max_length, k.truncation)
        test = encode(tokenizer, test_texts, test_labels, k.max_length, k.truncation)
        if not trained:
            console.print(f"kd: fine-tuning the teacher from {k.teacher_model} on {len(train)} texts")
            teacher = AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
            ).to(device)  # fmt: skip
            start = time.perf_counter()
            with Tracker("kd teacher (steps)", total=_steps(len(train), k.batch_size, k.teacher_epochs),
                         enabled=progress) as tracker:  # fmt: skip
                train_classifier(teacher, train, k.teacher_epochs, k.teacher_lr, k.batch_size, seed0,
                                 progress=lambda *_: tracker.advance(1), group_by_length=k.group_by_length)  # fmt: skip
            teacher.save_pretrained(teacher_dir)
            tokenizer.save_pretrained(teacher_dir)
            marker.write_text(json.dumps(recipe_of_teacher, sort_keys=True))
            stage.extra["teacher_train_s"] = round(time.perf_counter() - start, 1)
        teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).to(device).eval()
        cache = TeacherLogitCache(recipe.run_dir / "kd-teacher-logits")
        if k.soft_labels == "llm":  # black-box soft labels from the teacher LLM, cached by its name
            from compeff.train.blackbox import llm_soft_labels

            llm_key = f"llm|{recipe.teacher.model}|{recipe.teacher.backend}|{k.train_set}|{k.train_limit}|{recipe.run.seed}"
            t_train = cache.get_keyed(
                llm_key,
                lambda: np.log(np.clip(llm_soft_labels(recipe, train_texts, names), 1e-12, 1.0)).astype(
                    np.float32
                ),
            )
        else:
            t_train = cache.get(teacher_dir, f"{k.train_set}|{k.train_limit}|{recipe.run.seed}", k.max_length,
                                k.truncation, lambda: _logits_with_progress(teacher, train, "teacher, train", progress))  # fmt: skip
        t_test = cache.get(teacher_dir, f"{k.test_set}|{k.test_limit}|{recipe.run.seed}", k.max_length, k.truncation,
                           lambda: _logits_with_progress(teacher, test, "teacher, test", progress))  # fmt: skip
        stage.extra["teacher_runs"] = cache.computed
        rows = []
        if "teacher|-|-" not in done:
            rows.append({"id": "teacher|-|-", "model": "teacher", "loss": "ce", "seed": seed0,
                         "parameters": _parameters(teacher), **classifier_metrics(t_test, test_labels)})  # fmt: skip
        if k.baselines:
            for kind, label in (("nb", "tfidf-nb"), ("lr", "tfidf-lr")):
                if f"{label}|-|-" not in done:
                    logits = baseline_logits(kind, train_texts, train_labels, test_texts)
                    rows.append({"id": f"{label}|-|-", "model": label, "loss": "-", "seed": None, "parameters": None,
                                 **classifier_metrics(logits, test_labels, t_test)})  # fmt: skip
        stage.append(rows)
        temperature, alpha, student_lr = k.temperature, k.alpha, k.student_lr
        if k.search:
            best = _search(stage, done, k, teacher, train, t_train, device)
            temperature, alpha, student_lr = best["temperature"], best["alpha"], best["lr"]
            stage.extra["search_best"] = best
        runs = [(s, loss, seed) for s in k.students for loss in k.losses for seed in k.seeds]
        todo = [r for r in runs if f"{r[0].name}|{r[1]}|{r[2]}" not in done]
        with Tracker("kd students", total=len(runs), enabled=progress, done=len(runs) - len(todo)) as tracker:
            for spec, loss, seed in todo:
                torch.manual_seed(seed)
                s_train, s_test, s_tokenizer = train, test, tokenizer
                if spec.init_from_teacher:
                    student = layer_pruned_copy(teacher, spec.layers or []).to(device)
                else:  # its own tokenizer: the texts are encoded again, the teacher's logits stay per text
                    path = resolve_model(spec.model or "")
                    student = AutoModelForSequenceClassification.from_pretrained(
                        path, num_labels=len(names)
                    ).to(device)
                    if path != base:
                        s_tokenizer = AutoTokenizer.from_pretrained(path)
                        s_train = encode(s_tokenizer, train_texts, train_labels, k.max_length, k.truncation)
                        s_test = encode(s_tokenizer, test_texts, test_labels, k.max_length, k.truncation)
                match = None
                if loss == "hidden":
                    from compeff.train.encoder_kd import HiddenMatch, uniform_layer_map
                    from compeff.train.kd_losses import HiddenStateLoss

                    if s_tokenizer is not tokenizer:
                        raise DataError(
                            f"kd.students.{spec.name}: the hidden loss needs the teacher's tokenizer"
                        )
                    n_s, n_t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
                    pairs = (
                        [(0, 0)] + [(i + 1, t + 1) for i, t in enumerate(spec.layers)]
                        if spec.init_from_teacher and spec.layers
                        else uniform_layer_map(n_s, n_t)
                    )
                    torch.manual_seed(seed)
                    match = HiddenMatch(
                        teacher,
                        HiddenStateLoss(student.config.hidden_size, teacher.config.hidden_size, pairs),
                        k.hidden_weight,
                    )
                start = time.perf_counter()
                losses = train_classifier(
                    student, s_train, k.student_epochs, student_lr, k.batch_size, seed,
                    teacher_logits=None if loss == "ce" else t_train, loss=loss,
                    temperature=temperature, alpha=alpha, hidden=match, group_by_length=k.group_by_length,
                )  # fmt: skip
                seconds = time.perf_counter() - start
                logits = _logits_with_progress(student, s_test, f"{spec.name} {loss} {seed}, test", progress)
                out = stage.folder / "students" / f"{spec.name}-{loss}-{seed}"
                student.save_pretrained(out)
                s_tokenizer.save_pretrained(out)
                stage.append([{"id": f"{spec.name}|{loss}|{seed}", "model": spec.name, "loss": loss, "seed": seed,
                               "parameters": _parameters(student), "train_s": round(seconds, 1),
                               "final_train_loss": losses[-1], "path": str(out),
                               **classifier_metrics(logits, test_labels, t_test)}])  # fmt: skip
                tracker.advance(1)
        results = kd_results(
            list(iter_jsonl(stage.data_path)), names, k.train_set, k.test_set, len(train), len(test)
        )
        stage.write_artifact("results.json", results)
        stage.write_artifact("results.md", kd_markdown(results))
        stage.extra["summary"] = {r["row"]: r["accuracy"] for r in results["rows"]}
        console.print(kd_markdown(results))
    assert stage.manifest is not None
    return stage.manifest


def _search(
    stage: Stage, done: dict[str, Any], k: Any, teacher: Any, train: Any, t_train: np.ndarray, device: str
):
    """Successive halving of (T, alpha, lr) for the first student with the kd loss, scored on a held-out
    part of the training set; resumable through the stage's rows."""
    import torch

    from compeff.train.encoder_kd import (
        Encoded,
        classifier_metrics,
        layer_pruned_copy,
        predict_logits,
        train_classifier,
    )
    from compeff.train.search import config_id, grid, successive_halving

    spec = k.students[0]
    if not spec.init_from_teacher:
        raise DataError("kd.search: the first student must be a layer-pruned copy of the teacher")
    order = np.random.default_rng(k.seeds[0]).permutation(len(train))
    n_hold = max(1, int(len(train) * k.search_holdout))
    hold, fit = order[:n_hold], order[n_hold:]

    def part(idx: np.ndarray) -> Encoded:
        t = torch.from_numpy(idx)
        return Encoded(train.input_ids[t], train.attention_mask[t], train.labels[t])

    held = part(hold)

    def evaluate(config: dict[str, float], share: float) -> float:
        idx = fit[: max(1, int(len(fit) * share))]
        student = layer_pruned_copy(teacher, spec.layers or []).to(device)
        train_classifier(student, part(idx), k.student_epochs, config["lr"], k.batch_size, k.seeds[0],
                         teacher_logits=t_train[idx], loss="kd", temperature=config["temperature"],
                         alpha=config["alpha"], group_by_length=k.group_by_length)  # fmt: skip
        return classifier_metrics(predict_logits(student, held), held.labels.numpy())["accuracy"]

    earlier = {
        (r["round"], config_id(r["config"])): r["score"]
        for r in done.values()
        if r["id"].startswith("search|")
    }

    def record(round_no: int, config: dict[str, float], share: float, score: float) -> None:
        stage.append([{"id": f"search|{round_no}|{config_id(config)}", "model": "search", "loss": "kd",
                       "round": round_no, "config": config, "share": share, "score": score}])  # fmt: skip

    best, history = successive_halving(
        grid(k.search_temperatures, k.search_alphas, k.search_lrs),
        evaluate,
        k.search_fraction,
        earlier,
        record,
    )
    console.print(f"kd: search picked T={best['temperature']}, alpha={best['alpha']}, lr={best['lr']}")
    return best


def kd_results(rows: list[dict[str, Any]], names, train_set, test_set, n_train, n_test) -> dict[str, Any]:
    """Rows grouped by (model, loss): mean and std over seeds, and the share of the teacher's accuracy."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["model"] != "search":
            groups[(r["model"], r["loss"])].append(r)
    teacher_acc = next((g[0]["accuracy"] for (m, _), g in groups.items() if m == "teacher"), None)
    out = []
    for (model, loss), members in groups.items():
        row: dict[str, Any] = {"row": f"{model} ({loss})" if loss != "-" else model, "model": model, "loss": loss,
                               "seeds": len(members), "parameters": members[0].get("parameters")}  # fmt: skip
        for metric in ("accuracy", "macro_f1", "agreement", "confidence", "ece"):
            values = [m[metric] for m in members if m.get(metric) is not None]
            if values:
                row[metric] = float(np.mean(values))
                row[f"{metric}_std"] = float(np.std(values))
        if teacher_acc:
            row["share_of_teacher"] = row["accuracy"] / teacher_acc
        out.append(row)
    return {"train_set": train_set, "test_set": test_set, "n_train": n_train, "n_test": n_test,
            "labels": list(names), "rows": out}  # fmt: skip


def kd_markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Encoder distillation: train {results['train_set']} ({results['n_train']}), test {results['test_set']} "
        f"({results['n_test']})",
        "",
        "| model | params | seeds | accuracy | macro-F1 | agreement | confidence | ECE | of teacher |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(row: dict[str, Any], key: str) -> str:
        if key not in row:
            return "-"
        std = row.get(f"{key}_std", 0.0)
        return f"{100 * row[key]:.1f}" + (f" +- {100 * std:.1f}" if row["seeds"] > 1 else "")

    for row in results["rows"]:
        params = f"{row['parameters'] / 1e6:.1f}M" if row.get("parameters") else "-"
        share = f"{100 * row['share_of_teacher']:.1f}%" if "share_of_teacher" in row else "-"
        lines.append(
            f"| {row['row']} | {params} | {row['seeds']} | {cell(row, 'accuracy')} | {cell(row, 'macro_f1')} | "
            f"{cell(row, 'agreement')} | {cell(row, 'confidence')} | {cell(row, 'ece')} | {share} |"
        )
    return "\n".join(lines) + "\n"
