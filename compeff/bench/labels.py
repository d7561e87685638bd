"""``compeff bench labels``: how often the teacher's labels are right, and what confidence QC and the
prompt ensemble buy.

The teacher answers the seed polarity tasks (2-way on IMDb train reviews, 3-way on TweetEval validation
tweets: splits no evaluation uses) in each of the task's wordings, read as label distributions by the
ruler's arithmetic; the labels are compared with the sets' true labels: per wording, the ensemble (the mean distribution over the wordings,
``generate.label_ensemble``), after contextual calibration (each wording's distribution divided by its
mean on content-free inputs, ``generate.calibrate``) and after batch calibration (divided by its mean over
the set's own texts: no content-free input, but the texts' label balance is assumed), and above confidence thresholds
(``generate.min_confidence``: the share of samples kept and how often their label is right).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from compeff.data import DataError
from compeff.evaluate.classification import CONTENT_FREE, HFLabelScorer, calibrate, cut, label_distribution
from compeff.evaluate.eval_stage import load_eval_set
from compeff.synth.seed_tasks import SEED_TASKS, fill, load_seed_file

# labelled splits that no evaluation uses: wordings are never judged on test data
PAIRS = {"imdb:train": "polarity", "tweeteval_sentiment:validation": "polarity3"}
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def confidence_table(probs: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Per threshold: the share of texts whose top label reaches it, and the accuracy among them."""
    top = probs.max(axis=1)
    right = probs.argmax(axis=1) == truth
    out = {}
    for t in THRESHOLDS:
        kept = top >= t
        out[f"{t:g}"] = {
            "kept": float(kept.mean()),
            "accuracy": float(right[kept].mean()) if kept.any() else None,
        }
    return out


def run_labels_bench(
    teacher: str = "builtin:smollm2",
    imdb: int = 200,
    tweeteval: int = 300,
    max_chars: int = 400,
    seed: int = 42,
    out_dir: Path = Path("runs/bench"),
    data_dir: str | None = None,
    seed_tasks_file: str | None = None,
) -> dict[str, Any]:
    """Score the teacher on every wording of the polarity seed tasks; print and save the table.
    ``seed_tasks_file`` (the format of ``tasks.seed_tasks_file``) replaces the ``polarity`` and
    ``polarity3`` tasks by its own of those names: candidate wordings measured before they are chosen."""
    library = {**SEED_TASKS, **(load_seed_file(seed_tasks_file) if seed_tasks_file else {})}
    scorer = HFLabelScorer(teacher, chat_template=True, batch_size=16)
    results: dict[str, Any] = {}
    for spec, task_name in PAIRS.items():
        n = imdb if spec.startswith("imdb") else tweeteval
        data = load_eval_set(spec, n, seed, data_dir)
        task = library[task_name]
        if [x.lower() for x in task["labels"]] != [x.lower() for x in data.label_names]:
            raise DataError(f"{spec}: labels {data.label_names} differ from {task_name}'s {task['labels']}")
        truth = np.array(data.labels)
        per_wording, calibrated = [], []
        for wording in task["wordings"]:
            turns = [fill(wording, task["labels"], cut(t, max_chars)) for t in data.texts]
            per_wording.append(label_distribution(scorer.label_log_mass(turns, task["labels"])))
            free = [fill(wording, task["labels"], t) for t in CONTENT_FREE]
            calibrated.append(
                calibrate(per_wording[-1], label_distribution(scorer.label_log_mass(free, task["labels"])))
            )
        # batch calibration: each wording's mean distribution over the texts themselves as the prior
        batch = [calibrate(p, p) for p in per_wording]
        mean, mean_cal = np.mean(per_wording, axis=0), np.mean(calibrated, axis=0)
        results[spec] = {
            "task": task_name,
            "n": len(truth),
            "wording_texts": list(task["wordings"]),
            "wordings": [float((p.argmax(1) == truth).mean()) for p in per_wording],
            "ensemble": float((mean.argmax(1) == truth).mean()),
            "calibrated_wordings": [float((p.argmax(1) == truth).mean()) for p in calibrated],
            "calibrated_ensemble": float((mean_cal.argmax(1) == truth).mean()),
            "batch_calibrated_wordings": [float((p.argmax(1) == truth).mean()) for p in batch],
            "batch_calibrated_ensemble": float((np.mean(batch, axis=0).argmax(1) == truth).mean()),
            "label_shares": [np.bincount(p.argmax(1), minlength=p.shape[1]).tolist() for p in per_wording],
            "calibrated_label_shares": [
                np.bincount(p.argmax(1), minlength=p.shape[1]).tolist() for p in calibrated
            ],
            "confidence_single": confidence_table(per_wording[0], truth),
            "confidence_ensemble": confidence_table(mean, truth),
            "confidence_calibrated": confidence_table(calibrated[0], truth),
            "confidence_batch_calibrated": confidence_table(batch[0], truth),
            "batch_calibrated_label_shares": [
                np.bincount(p.argmax(1), minlength=p.shape[1]).tolist() for p in batch
            ],
        }
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels_bench.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print_table(results, teacher)
    return results


def print_table(results: dict[str, Any], teacher: str) -> None:
    """Accuracy of the teacher's labels per wording and ensembled; kept share and accuracy per threshold."""
    table = Table(title=f"compeff bench labels: {teacher}'s labels against the true ones (x 100)")
    for col in (
        "set (task)",
        "each wording",
        "ensemble",
        *[f"conf >= {t:g} (kept / acc)" for t in THRESHOLDS],
    ):
        table.add_column(col, justify="left" if col.startswith("set") else "right")
    for spec, r in results.items():
        for kind in ("single", "ensemble", "calibrated", "batch_calibrated"):
            cells = []
            for t in THRESHOLDS:
                c = r[f"confidence_{kind}"][f"{t:g}"]
                acc = "-" if c["accuracy"] is None else f"{100 * c['accuracy']:.1f}"
                cells.append(f"{100 * c['kept']:.0f} / {acc}")
            first = f"{spec} ({r['task']}, {r['n']})" if kind == "single" else f"  {kind}"
            key = {
                "single": ("wordings", "ensemble"),
                "calibrated": ("calibrated_wordings", "calibrated_ensemble"),
                "batch_calibrated": ("batch_calibrated_wordings", "batch_calibrated_ensemble"),
            }
            words, ens = "", ""
            if kind in key:
                words = " / ".join(f"{100 * w:.1f}" for w in r[key[kind][0]])
                ens = f"{100 * r[key[kind][1]]:.1f}"
            table.add_row(first, words, ens, *cells)
    Console().print(table)
