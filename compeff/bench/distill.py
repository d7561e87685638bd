"""``compeff bench distill``: what SFT on the teacher's distillation set does to the LLM student.

The recipe's synthesis chain (enumerate ... sample) runs in a run folder of the bench's own, with
``generate.n_samples`` answers; then the student is fine-tuned on the difficulty-selected share
(``compeff sample``'s output), on a random subset of the same size and on every sample (and, as asked,
with KD, on fractions, with several seeds, on true labels); the teacher, the student before training and
every trained student are scored by the ruler of ``compeff eval`` (its zero-shot wordings) on TweetEval
and IMDb test subsets. Rows: models; columns per set: accuracy / macro-F1 / agreement with the teacher
and, in brackets, agreement with the teacher's labels batch-calibrated on the test texts (the teacher a
chain with ``generate.batch_calibrate`` teaches, estimated); training seconds. A row of its own gives the
calibrated teacher's accuracy. Each model's labels are kept in ``eval/<name>.json`` and reused when the
bench is run again.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from compeff.config import ConfigError, Recipe, load_recipe
from compeff.evaluate.classification import HFLabelScorer
from compeff.evaluate.eval_stage import load_eval_set
from compeff.fingerprints import fingerprint_obj
from compeff.models import student_model
from compeff.pipeline import run_pipeline
from compeff.progress import Tracker
from compeff.runs import StageConflict, atomic_write_bytes, iter_jsonl, weights_fingerprint
from compeff.top_logprobs import FIELD
from compeff.train.logit_kd import LABEL_FIELD

CONFIDENCE = "teacher_confidence"
# bumped when the arithmetic of ``WordingRun.batch_calibrated_preds`` changes: a teacher cache with
# another version is scored again
CALIBRATION_VERSION = 1

CHAIN = ["enumerate", "cluster", "tasks", "generate", "score", "sample"]
SUBSETS = ("selected", "random", "all")


def subset_text(rows: list[dict[str, Any]]) -> str:
    """A training subset as chat-set JSONL: each sample's id, messages and the teacher's evidence that KD
    and the confidence rows read."""
    keys = ("id", "messages", FIELD, LABEL_FIELD, CONFIDENCE)
    return "".join(json.dumps({k: r[k] for k in keys if k in r}) + "\n" for r in rows)


def refuse_hard_draws(method: str, draws: int) -> None:
    """More than one draw of a hard selection is the same subset again: refuse it."""
    if draws > 1 and method == "hard":
        raise ConfigError(
            "bench distill: --draws > 1 needs sample.method soft or random (hard draws are all one)"
        )


def distillation_subsets(run_dir: Path, out: Path, seed: int) -> dict[str, Path]:
    """The three training sets: the ``sample`` stage's selection, a random subset of the same size of
    the ``generate`` output, and the whole of it (written as chat-set JSONL files under ``out``)."""
    generated = list(iter_jsonl(run_dir / "generate" / "data.jsonl"))
    selected = list(iter_jsonl(run_dir / "sample" / "data.jsonl"))
    if not generated or not selected:
        raise ValueError(f"{run_dir}: the generate and sample stages left no sample")
    rng = random.Random(seed)
    chosen = rng.sample(generated, len(selected))
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in (("selected", selected), ("random", chosen), ("all", generated)):
        text = subset_text(rows)
        paths[name] = out / f"{name}.jsonl"
        if not paths[name].exists() or paths[name].read_text(encoding="utf-8") != text:
            atomic_write_bytes(paths[name], text.encode("utf-8"))
    return paths


def train(recipe: Recipe, stage_name: str) -> dict[str, Any]:
    """Fine-tune into ``stage_name`` (reused when up to date; trained again when the settings changed)."""
    from compeff.train.sft import run_sft_stage

    try:
        return run_sft_stage(recipe, progress=False, stage_name=stage_name)
    except StageConflict:
        return run_sft_stage(recipe, force=True, progress=False, stage_name=stage_name)


def score_model(
    model: str, sets: dict[str, Any], recipe: Recipe, cache: Path, need_calibrated: bool = False
) -> dict[str, Any]:
    """Every wording's labels of one model on every set (the ruler of ``compeff eval``, the recipe's
    eval settings), and its batch-calibrated labels (the teacher's are the reference of a student's
    agreement with the teacher the chain teaches); reused from ``cache`` when the weights, sets and
    settings are the same (with ``need_calibrated``, the teacher's, only when the cache holds both: a
    cache written before them is scored again once)."""
    from compeff.evaluate.eval_stage import eval_wordings
    from compeff.evaluate.ruler import run_wording

    s = recipe.eval
    wordings = eval_wordings(recipe)
    key = fingerprint_obj(
        {
            "weights": weights_fingerprint(model),
            "sets": {name: len(data.texts) for name, data in sets.items()},
            "eval": s.model_dump(exclude={"batch_size", "device"}),
            "wordings": [w.__dict__ for w in wordings],
            "seed": recipe.run.seed,
        }
    )
    old_preds: dict[str, Any] = {}
    if cache.exists():
        kept = json.loads(cache.read_text(encoding="utf-8"))
        complete = kept.get("calibration") == CALIBRATION_VERSION and all(
            "batch_calibrated_preds" in r for r in kept.get("sets", {}).values()
        )
        if kept.get("key") == key and (complete or not need_calibrated):
            return kept["sets"]
        if kept.get("key") == key:
            old_preds = {name: r["preds"] for name, r in kept.get("sets", {}).items()}
            Console().print(
                f"bench distill: {cache.name} has no batch-calibrated labels of this version: "
                "scoring the teacher again once",
                markup=False,
            )
    scorer = HFLabelScorer(model, None, s.device, s.chat_template, s.max_length, s.batch_size)
    results: dict[str, Any] = {}
    with Tracker(f"scoring {cache.stem} (set x wording)", total=len(sets) * len(wordings)) as tracker:
        for name, data in sets.items():
            started = time.perf_counter()
            runs, calibrated = {}, {}
            for wording in wordings:
                seed = s.seeds[0] if wording.k_shot else None
                run = run_wording(scorer, data, wording, seed, s.k_shot, s.max_chars)
                runs[wording.name] = run.preds
                calibrated[wording.name] = run.batch_calibrated_preds()
                tracker.advance(1)
            results[name] = {
                "preds": runs,
                "batch_calibrated_preds": calibrated,
                "seconds": round(time.perf_counter() - started, 1),
            }
    del scorer
    for name, preds in old_preds.items():
        if name in results:
            changed, total = changed_labels(preds, results[name]["preds"])
            if changed:
                Console().print(
                    f"bench distill: {name}: {changed} of {total} labels differ from the cache's "
                    "(the scorer is not bit-stable here: batch sizes, threads or library versions)",
                    markup=False,
                )
    cache.parent.mkdir(parents=True, exist_ok=True)
    kept_json = {"key": key, "calibration": CALIBRATION_VERSION, "model": model, "sets": results}
    atomic_write_bytes(cache, json.dumps(kept_json).encode())
    return results


def changed_labels(old: dict[str, list[int]], new: dict[str, list[int]]) -> tuple[int, int]:
    """How many labels of the wordings both hold differ between two scorings of one model, and of how
    many."""
    pairs = [(a, b) for w in old.keys() & new.keys() for a, b in zip(old[w], new[w], strict=True)]
    return sum(a != b for a, b in pairs), len(pairs)


def summarise_row(
    scored: dict[str, Any], sets: dict[str, Any], teacher: dict[str, Any] | None
) -> dict[str, Any]:
    """A row's cells per set: accuracy and macro-F1 (mean over wordings, x 100, with the spread) and the
    agreement with the teacher's labels and with its batch-calibrated labels (means over wordings)."""
    from compeff.evaluate.ruler import WordingRun, summarise_runs

    out = {}
    for name, data in sets.items():
        n_labels = len(data.label_names)
        runs = [WordingRun.from_preds(w, None, p, n_labels) for w, p in scored[name]["preds"].items()]
        reference = calibrated = None
        if teacher is not None:
            reference = {(w, None): p for w, p in teacher[name]["preds"].items()}
            kept = teacher[name].get("batch_calibrated_preds") or {}
            calibrated = {(w, None): p for w, p in kept.items() if p is not None} or None
        r = summarise_runs(data, runs, reference, calibrated)
        own = {w: p for w, p in (scored[name].get("batch_calibrated_preds") or {}).items() if p is not None}
        if teacher is None and own:  # the model itself batch-calibrated: its accuracy (the teacher row)
            own_runs = [WordingRun.from_preds(w, None, p, n_labels) for w, p in own.items()]
            c = summarise_runs(data, own_runs)
            own_scores = {"accuracy": 100 * c["accuracy"], "macro_f1": 100 * c["macro_f1"]}
        else:
            own_scores = None
        out[name] = {
            "accuracy": 100 * r["accuracy"],
            "accuracy_std": 100 * r["accuracy_std"],
            "macro_f1": 100 * r["macro_f1"],
            "agreement": 100 * r["agreement"] if "agreement" in r else None,
            "agreement_batch_calibrated": 100 * r["agreement_batch_calibrated"]
            if "agreement_batch_calibrated" in r
            else None,
            "n": r["n"],
            "batch_calibrated": own_scores,
            "wordings": {
                w: {
                    k: e[k]
                    for k in ("accuracy", "macro_f1", "agreement", "agreement_batch_calibrated")
                    if k in e
                }
                for w, e in r["wordings"].items()
            },
        }
    return out


def draw_suffix(draw: int) -> str:
    """Name suffix of a data-efficiency subset's draw (the first draw keeps the plain name)."""
    return f"-d{draw}" if draw else ""


def fraction_subsets(
    recipe: Recipe, out: Path, fractions: tuple[float, ...], draws: int = 1
) -> dict[str, Path]:
    """The data-efficiency sets: for each fraction of the scored set, the difficulty-prioritised selection
    (the sample stage's method, groups, metric and tie-break at that ratio) and a random subset of the
    same size; ``draws`` > 1 adds further draws of both (other selection seeds, other random subsets), so
    the two are compared with their spread, not one draw against one."""
    from compeff.select.sample_stage import sample_seed, select_rows

    settings = recipe.sample
    refuse_hard_draws(settings.method, draws)
    seed = sample_seed(recipe)
    rows = list(iter_jsonl(recipe.run_dir / "score" / "data.jsonl"))
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fraction in fractions:
        for draw in range(draws):
            keep = select_rows(rows, settings, fraction, seed + 1_000 * draw)
            chosen = [r for r, k in zip(rows, keep, strict=True) if k]
            randomly = random.Random(seed + 7 + 1_000 * draw).sample(rows, len(chosen))
            for kind, subset in (("selected", chosen), ("random", randomly)):
                name = f"{kind}-{fraction:g}{draw_suffix(draw)}"
                paths[name] = out / f"{name}.jsonl"
                atomic_write_bytes(paths[name], subset_text(subset).encode("utf-8"))
    return paths


GOLD_TASKS = {
    "seed:polarity": ["negative", "positive"],
    "seed:polarity3": ["negative", "neutral", "positive"],
}


def gold_labels(recipe: Recipe) -> dict[str, str]:
    """The true label word of every user text the chain read (hidden from the chain itself)."""
    from compeff.data import select_user_texts

    texts, _ = select_user_texts(recipe.data.user_texts, recipe.generate.n_samples, recipe.run.seed + 1,
                                 recipe.data.text_field, recipe.data.dir)  # fmt: skip
    names = {"imdb": ["negative", "positive"], "tweeteval_sentiment": ["negative", "neutral", "positive"]}
    out = {}
    for t in texts:
        source = t["id"].split(":", 1)[0]
        if "label" in t and source in names:
            out[t["id"]] = names[source][int(t["label"])]
    return out


def gold_subset(run_dir: Path, out: Path, gold: dict[str, str]) -> tuple[Path, dict[str, Any]]:
    """The ceiling's training set: every generated polarity sample whose text has a true label in its task's
    label set, answered with that label; and how often the teacher's label was right there (all samples,
    and above confidence thresholds, what ``generate.min_confidence`` would keep)."""
    rows, right, confidence = [], [], []
    for r in iter_jsonl(run_dir / "generate" / "data.jsonl"):
        labels = GOLD_TASKS.get(r.get("task_id", ""))
        truth = gold.get(r.get("text_id", ""))
        if not labels or truth not in (labels or []):
            continue
        answer = r["messages"][-1]["content"]
        right.append(answer == truth)
        confidence.append(float(r.get("teacher_confidence", 1.0)))
        rows.append(
            {"id": r["id"], "messages": [*r["messages"][:-1], {"role": "assistant", "content": truth}]}
        )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gold.jsonl"
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
    right_a, conf_a = np.array(right, dtype=bool), np.array(confidence)
    quality = {"samples": len(rows), "teacher_right": float(right_a.mean()) if len(rows) else None}
    for t in (0.5, 0.6, 0.7, 0.8):
        kept = conf_a >= t
        quality[f"teacher_right_conf>={t}"] = [
            float(right_a[kept].mean()) if kept.any() else None,
            int(kept.sum()),
        ]
    return path, quality


def run_distill_bench(
    recipe_path: Path = Path("recipes/quickstart.yaml"),
    n_samples: int = 256,
    tweeteval: int = 1000,
    imdb: int = 500,
    out_dir: Path = Path("runs/bench"),
    overrides: list[str] | None = None,
    losses: tuple[str, ...] = ("sft",),
    top_k: int = 20,
    subsets: tuple[str, ...] = SUBSETS,
    seeds: int = 1,
    gold: bool = True,
    fractions: tuple[float, ...] = (),
    min_confidence: float | None = None,
    draws: int = 1,
) -> list[dict[str, Any]]:
    """Run the chain, the fine-tunings and the evaluations; print and save the table. The user texts are
    labelled splits (IMDb train, TweetEval validation) whose labels the chain never sees; the bench uses
    them for the gold-label ceiling (the same student trained on the same polarity samples with the true
    labels) and to count how often the teacher's labels are right. ``losses`` beyond ``sft`` (``kd``:
    soft labels for closed tasks and top-k logit KD for free text, ``gkd``: on-policy) add rows trained on
    the selected set; ``seeds`` > 1 repeats the selected-set SFT and KD rows with other training seeds;
    ``fractions`` (e.g. 0.1, 0.25) add SFT rows on the difficulty-selected and a random subset of that
    share of the scored set (the data-efficiency curve; 0.5 and 1.0 are the selected / random / all rows),
    each ``draws`` times (selection seeds and random subsets; the table shows their mean and spread);
    ``min_confidence`` adds an SFT row on the selected set without the closed-task samples whose teacher
    confidence is below it (what ``generate.min_confidence`` would have dropped)."""
    unknown = sorted(set(losses) - {"sft", "kd", "gkd"}) + sorted(set(subsets) - set(SUBSETS))
    if unknown:
        raise ConfigError(f"bench distill: unknown --loss / --subset {', '.join(unknown)}")
    if draws < 1:
        raise ConfigError(f"bench distill: --draws must be at least 1, got {draws}")
    bad = [f for f in fractions if not 0 < f < 1] + ([min_confidence] if min_confidence is not None and not 0 <= min_confidence < 1 else [])  # fmt: skip
    if bad or len(set(fractions)) != len(fractions):
        raise ConfigError(
            "bench distill: --fraction values must differ and lie in (0, 1), --min-confidence in [0, 1)"
        )
    base = [
        f"run.dir={out_dir}",
        "run.name=distill-bench",
        "data.user_texts=[imdb:train, tweeteval_sentiment:validation]",
        f"generate.n_samples={n_samples}",
        *([f"generate.teacher_top_logprobs={top_k}"] if "kd" in losses else []),
        *(overrides or []),
    ]
    recipe = load_recipe(recipe_path, base)
    if fractions:  # before an hour of chain and training
        refuse_hard_draws(recipe.sample.method, draws)
    root = recipe.run_dir
    run_pipeline(recipe, stages=CHAIN, show=False)
    sets = {
        "tweeteval_sentiment:test": load_eval_set(
            "tweeteval_sentiment:test", tweeteval, recipe.run.seed, recipe.data.dir
        ),
        "imdb:test": load_eval_set("imdb:test", imdb, recipe.run.seed, recipe.data.dir),
    }
    paths = distillation_subsets(root, root / "sets", recipe.run.seed)
    paths["gold"], quality = gold_subset(root, root / "sets", gold_labels(recipe))
    Console().print(f"teacher's labels in the distillation set vs the hidden true labels: {quality}")
    rows: list[dict[str, Any]] = [
        {"row": "teacher", "model": recipe.teacher.model, "samples": None, "train_s": None},
        {
            "row": "student before training",
            "model": student_model(recipe.student, recipe.data),
            "samples": None,
            "train_s": None,
        },
    ]

    def add(row: str, subset: str, loss: str, seed_offset: int = 0, draw: int | None = None) -> None:
        extra = [f"sft.input={paths[subset]}", f"sft.loss={loss}"]
        if seed_offset:
            extra.append(f"run.seed={recipe.run.seed + seed_offset}")
        trained = load_recipe(recipe_path, base + extra)
        name = f"sft-{loss}-{subset}" + (f"-s{seed_offset}" if seed_offset else "")
        manifest = train(trained, name)
        if draw is not None:  # a data-efficiency draw: same training seed, other data
            label, spread = (f" (draw {draw + 1})" if draws > 1 else ""), "draws"
        else:
            label, spread = (f" (seed {seed_offset + 1})" if seeds > 1 else ""), "seeds"
        rows.append({"row": row + label, "model": str(root / name / "model"),
                     "samples": manifest.get("kd_samples", manifest.get("samples")),
                     "train_s": manifest.get("train_runtime_s"), "group": row, "stage": name,
                     "spread": spread})  # fmt: skip

    for name in (x for x in SUBSETS if x in subsets and "sft" in losses):
        for k in range(seeds if name == "selected" else 1):
            add(f"SFT, {name}", name, "sft", k)
    for loss in (x for x in losses if x != "sft"):
        for k in range(seeds):
            add(f"{loss.upper()}, selected", "selected", loss, k)
    if min_confidence is not None:
        kept = [
            r for r in iter_jsonl(paths["selected"]) if r.get("teacher_confidence", 1.0) >= min_confidence
        ]
        paths["confident"] = root / "sets" / "confident.jsonl"
        atomic_write_bytes(paths["confident"], "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))
        add(f"SFT, selected, teacher confidence >= {min_confidence:g}", "confident", "sft")
    if fractions:
        paths.update(fraction_subsets(recipe, root / "sets", fractions, draws))
        for fraction in fractions:
            for kind in ("selected", "random"):
                for draw in range(draws):
                    add(f"SFT, {kind} {100 * fraction:g}%", f"{kind}-{fraction:g}{draw_suffix(draw)}", "sft",
                        draw=draw)  # fmt: skip
    if gold and quality["samples"]:
        add("gold-label ceiling (true labels, same texts)", "gold", "sft")
    elif gold:
        Console().print(
            "[yellow]bench distill: no polarity sample with a true label: no gold-label ceiling row[/yellow]"
        )
    teacher: dict[str, Any] | None = None
    for row in rows:  # the teacher first: every later row's agreement is read against its labels
        cache = root / "eval" / eval_cache_name(row)
        scored = score_model(row["model"], sets, recipe, cache, need_calibrated=teacher is None)
        row["sets"] = summarise_row(scored, sets, teacher)
        if teacher is None:
            teacher = scored
        Console().print(f"bench distill: {row['row']}: {row_line(row)}", markup=False, soft_wrap=True)
    table_rows = with_calibrated_teacher(with_seed_means(rows))
    print_table(table_rows, recipe)
    result = {"rows": rows, "table": table_rows, "teacher_label_quality": quality}
    (root / "distill_bench.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (root / "distill_bench.md").write_text(markdown_table(table_rows), encoding="utf-8")
    return table_rows


def with_calibrated_teacher(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table's rows with, after the first (the teacher), a row for the teacher's own labels
    batch-calibrated on the test texts, when they were kept: what the bracketed agreement is read
    against, and how good it is."""
    if not rows or not all(c.get("batch_calibrated") for c in rows[0]["sets"].values()):
        return rows
    sets = {
        name: {**c["batch_calibrated"], "agreement": None, "n": c["n"]} for name, c in rows[0]["sets"].items()
    }
    row = {
        "row": "teacher, batch-calibrated on the test texts",
        "samples": None,
        "train_s": None,
        "sets": sets,
    }
    return [rows[0], row, *rows[1:]]


def row_line(row: dict[str, Any]) -> str:
    """One scored row in a line (accuracy / agreement per set), printed as it is done: a long bench shows
    its rows before the table at the end."""
    cells = [
        f"{name} {c['accuracy']:.1f}"
        + (
            ""
            if not c.get("batch_calibrated")
            else f" (batch-calibrated {c['batch_calibrated']['accuracy']:.1f})"
        )
        + ("" if c["agreement"] is None else f" (agree {c['agreement']:.1f}")
        + (
            ""
            if c.get("agreement_batch_calibrated") is None
            else f", calibrated {c['agreement_batch_calibrated']:.1f}"
        )
        + ("" if c["agreement"] is None else ")")
        for name, c in row["sets"].items()
    ]
    return ", ".join(cells)


def eval_cache_name(row: dict[str, Any]) -> str:
    """File of a row's cached labels: a trained row's is named by its training stage, so one model is
    scored once whatever its row is called (``--seeds 3`` names the first seed's row apart from
    ``--seeds 1``); the teacher's and the untrained student's by their row."""
    tag = row.get("stage") or row["row"].replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
    return f"{tag}.json"


def with_seed_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows trained with several seeds (or on several data draws) folded into one row: the mean, with the
    sample standard deviation over the seeds or draws."""
    out: list[dict[str, Any]] = []
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row.get("group", row["row"]), []).append(row)
    for name, members in groups.items():
        if len(members) == 1:
            out.append(members[0])
            continue
        sets = {}
        for set_name in members[0]["sets"]:
            cells = [m["sets"][set_name] for m in members]
            sets[set_name] = {
                "accuracy": float(np.mean([c["accuracy"] for c in cells])),
                "accuracy_seed_std": float(np.std([c["accuracy"] for c in cells], ddof=1)),
                "macro_f1": float(np.mean([c["macro_f1"] for c in cells])),
                "agreement": float(np.mean([c["agreement"] for c in cells])),
                "agreement_batch_calibrated": float(np.mean([c["agreement_batch_calibrated"] for c in cells]))
                if all(c.get("agreement_batch_calibrated") is not None for c in cells)
                else None,
                "n": cells[0]["n"],
            }
        spread = members[0].get("spread", "seeds")
        counts = [m["samples"] for m in members if m["samples"] is not None]
        samples = round(float(np.mean(counts))) if counts else None  # soft draws keep a few more or less
        out.append({"row": f"{name} (mean of {len(members)} {spread})", "samples": samples,
                    "train_s": float(np.mean([m["train_s"] or 0 for m in members])), "sets": sets})  # fmt: skip
    return out


def _cell(c: dict[str, Any]) -> str:
    spread = c.get("accuracy_seed_std")
    acc = f"{c['accuracy']:.1f}" + (f" +- {spread:.1f}" if spread is not None else "")
    agree = "-" if c.get("agreement") is None else f"{c['agreement']:.1f}"
    calibrated = c.get("agreement_batch_calibrated")
    return f"{acc} / {c['macro_f1']:.1f} / {agree}" + ("" if calibrated is None else f" ({calibrated:.1f})")


def _cells(row: dict[str, Any], names: list[str]) -> list[str]:
    """A row's cells: samples, accuracy / macro-F1 / agreement per set, training seconds."""
    scores = [_cell(row["sets"][n]) for n in names]
    seconds = "-" if row["train_s"] is None else f"{row['train_s']:.0f}"
    return [str(row["samples"] or "-"), *scores, seconds]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The bench table in Markdown (per set: accuracy / macro-F1 / agreement with the teacher and, in
    brackets, with its batch-calibrated labels, x 100, means over the ruler's wordings; training seconds)."""
    names = list(rows[0]["sets"])
    head = (
        ["model", "samples"]
        + [f"{n} ({rows[0]['sets'][n]['n']}) acc / F1 / agree teacher (calibrated)" for n in names]
        + ["train s"]
    )
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join([r["row"], *_cells(r, names)]) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict[str, Any]], recipe: Recipe, title: str | None = None) -> None:
    """The bench table on the terminal (``compeff bench cut`` prints its rows with its own title)."""
    names = list(rows[0]["sets"])
    table = Table(
        title=title
        or "compeff bench distill: accuracy / macro-F1 / agreement with the teacher (in brackets: with its "
        "labels batch-calibrated on the test texts) (x 100, mean over wordings)"
    )
    for col in ["model", "samples", *names, "train s"]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(r["row"], *_cells(r, names))
    Console().print(table)
