"""``compeff bench distill``: what SFT on the teacher's distillation set does to the LLM student.

The recipe's synthesis chain (enumerate ... sample) runs in a run folder of the bench's own, with
``generate.n_samples`` answers; then the student is fine-tuned three times, on the difficulty-selected
share (``compeff sample``'s output), on a random subset of the same size and on every sample; the teacher,
the student before SFT and the three trained students are scored with the same k-shot label-word prompts
on TweetEval and IMDb test subsets. Rows: models; columns: accuracy and macro-F1 per set, training
seconds. Each model's scores are kept in ``eval/<row>.json`` and reused when the bench is run again.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from compeff.config import ConfigError, Recipe, load_recipe
from compeff.evaluate.classification import HFLabelScorer, classification_metrics
from compeff.evaluate.eval_stage import eval_prompts, load_eval_set
from compeff.fingerprints import fingerprint_obj
from compeff.models import student_model
from compeff.pipeline import run_pipeline
from compeff.runs import StageConflict, atomic_write_bytes, iter_jsonl, read_manifest, weights_fingerprint
from compeff.top_logprobs import FIELD, PARQUET_FILE, stored_bytes_per_token

CHAIN = ["enumerate", "cluster", "tasks", "generate", "score", "sample"]
SUBSETS = ("selected", "random", "all")


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
        text = "".join(
            json.dumps({k: r[k] for k in ("id", "messages", FIELD) if k in r}) + "\n" for r in rows
        )
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


def score_model(model: str, sets: dict[str, Any], recipe: Recipe, cache: Path) -> dict[str, dict[str, float]]:
    """Accuracy and macro-F1 of one model on every set (k-shot label-word scoring, the recipe's eval
    settings); reused from ``cache`` when the weights, sets and settings are the same."""
    s = recipe.eval
    seed = s.seeds[0]
    key = fingerprint_obj(
        {
            "weights": weights_fingerprint(model),
            "sets": {name: len(data.texts) for name, data in sets.items()},
            "eval": s.model_dump(exclude={"batch_size", "device"}),
            "seed": recipe.run.seed,
        }
    )
    if cache.exists():
        kept = json.loads(cache.read_text(encoding="utf-8"))
        if kept.get("key") == key:
            return kept["sets"]
    scorer = HFLabelScorer(model, None, s.device, s.chat_template, s.max_length, s.batch_size)
    results: dict[str, dict[str, float]] = {}
    for name, data in sets.items():
        started = time.perf_counter()
        preds, _ = scorer.predict(eval_prompts(data, s.k_shot, seed, s.max_chars), data.label_names)
        metrics = classification_metrics(data.labels, preds, len(data.label_names))
        results[name] = {
            "accuracy": 100 * metrics["accuracy"],
            "macro_f1": 100 * metrics["macro_f1"],
            "n": len(data.texts),
            "seconds": round(time.perf_counter() - started, 1),
        }
    del scorer
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache, json.dumps({"key": key, "model": model, "sets": results}, indent=2).encode())
    return results


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
) -> list[dict[str, Any]]:
    """Run the chain, the fine-tunings and the evaluations; print and save the table. ``losses`` beyond
    ``sft`` (``kd``: offline top-k logit KD, ``gkd``: on-policy) add rows trained on the selected set;
    with ``kd`` the chain keeps the teacher's top-``top_k`` log-probabilities. ``subsets`` picks the
    plain-SFT rows."""
    unknown = sorted(set(losses) - {"sft", "kd", "gkd"}) + sorted(set(subsets) - set(SUBSETS))
    if unknown:
        raise ConfigError(f"bench distill: unknown --loss / --subset {', '.join(unknown)}")
    base = [
        f"run.dir={out_dir}",
        "run.name=distill-bench",
        f"generate.n_samples={n_samples}",
        *([f"generate.teacher_top_logprobs={top_k}"] if "kd" in losses else []),
        *(overrides or []),
    ]
    recipe = load_recipe(recipe_path, base)
    root = recipe.run_dir
    run_pipeline(recipe, stages=CHAIN, show=False)
    sets = {
        "tweeteval_sentiment:test": load_eval_set(
            "tweeteval_sentiment:test", tweeteval, recipe.run.seed, recipe.data.dir
        ),
        "imdb:test": load_eval_set("imdb:test", imdb, recipe.run.seed, recipe.data.dir),
    }
    paths = distillation_subsets(root, root / "sets", recipe.run.seed)
    rows: list[dict[str, Any]] = [
        {"row": "teacher", "model": recipe.teacher.model, "samples": None, "train_s": None},
        {
            "row": "student before SFT",
            "model": student_model(recipe.student),
            "samples": None,
            "train_s": None,
        },
    ]
    for name in (x for x in SUBSETS if x in subsets and "sft" in losses):
        trained = load_recipe(recipe_path, base + [f"sft.input={paths[name]}"])
        manifest = train(trained, f"sft-{name}")
        rows.append(
            {
                "row": f"student after SFT, {name}",
                "model": str(root / f"sft-{name}" / "model"),
                "samples": sum(1 for _ in iter_jsonl(paths[name])),
                "train_s": manifest.get("train_runtime_s"),
            }
        )
    for loss in (x for x in losses if x != "sft"):
        trained = load_recipe(recipe_path, base + [f"sft.input={paths['selected']}", f"sft.loss={loss}"])
        manifest = train(trained, f"sft-{loss}-selected")
        rows.append(
            {
                "row": f"student after {loss.upper()}, selected",
                "model": str(root / f"sft-{loss}-selected" / "model"),
                "samples": manifest.get("kd_samples", manifest.get("samples")),
                "train_s": manifest.get("train_runtime_s"),
            }
        )
    if "kd" in losses:
        fields = [r[FIELD] for r in iter_jsonl(paths["selected"]) if FIELD in r]
        bytes_per_token = sum(stored_bytes_per_token(f) * f["n"] for f in fields) / max(
            1, sum(f["n"] for f in fields)
        )
        parquet = (read_manifest(root / "sample") or {}).get("top_logprobs", {})
        Console().print(
            f"stored teacher log-probabilities (k = {top_k}): {bytes_per_token:.0f} bytes per answer token "
            f"in the records, {parquet.get('parquet_bytes_per_token', '-')} in sample/{PARQUET_FILE}"
        )
        for row in rows:
            kd_row = row["row"].startswith("student after KD")
            row["logit_bytes_per_token"] = round(bytes_per_token, 1) if kd_row else None
            row["logit_parquet_bytes_per_token"] = parquet.get("parquet_bytes_per_token") if kd_row else None
    for row in rows:
        tag = row["row"].replace(" ", "-").replace(",", "")
        row["sets"] = score_model(row["model"], sets, recipe, root / "eval" / f"{tag}.json")
    print_table(rows, recipe)
    (root / "distill_bench.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    (root / "distill_bench.md").write_text(markdown_table(rows), encoding="utf-8")
    return rows


def _cells(row: dict[str, Any], names: list[str]) -> list[str]:
    """A row's cells: samples, accuracy / macro-F1 per set, training seconds."""
    scores = [f"{row['sets'][n]['accuracy']:.1f} / {row['sets'][n]['macro_f1']:.1f}" for n in names]
    seconds = "-" if row["train_s"] is None else f"{row['train_s']:.0f}"
    cells = [str(row["samples"] or "-"), *scores, seconds]
    if "logit_bytes_per_token" in row:
        jsonl, parquet = row["logit_bytes_per_token"], row.get("logit_parquet_bytes_per_token")
        cells.append("-" if jsonl is None else f"{jsonl:.0f} / {parquet if parquet is not None else '-'}")
    return cells


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The bench table in Markdown (accuracy / macro-F1 x 100 per set, training seconds)."""
    names = list(rows[0]["sets"])
    head = ["model", "samples"] + [f"{n} ({rows[0]['sets'][n]['n']}) acc / F1" for n in names] + ["train s"]
    head += ["logit bytes/token (records / parquet)"] if "logit_bytes_per_token" in rows[0] else []
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join([r["row"], *_cells(r, names)]) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict[str, Any]], recipe: Recipe) -> None:
    """The bench table on the terminal."""
    names = list(rows[0]["sets"])
    table = Table(
        title=f"compeff bench distill: {recipe.eval.k_shot}-shot label-word accuracy / macro-F1 (x 100)"
    )
    extra = ["logit bytes/token (records / parquet)"] if "logit_bytes_per_token" in rows[0] else []
    for col in ["model", "samples", *names, "train s", *extra]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(r["row"], *_cells(r, names))
    Console().print(table)
