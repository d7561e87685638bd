"""``compeff bench cut``: what each way of cutting the student can learn, before any teacher is asked.

For every cut (a list of the student model's decoder layers to keep, ``recipe`` for the recipe's
``student.keep_layers``, or the closest cut of ``student.cut_layers``; ``closest`` for the block Gromov et
al.'s angular distance would drop, on the user texts ``student.cut_layers`` reads), the bench
measures how far the cut moves the residual stream (``compeff.layer_cut``) and its **gold-label
ceiling**: the cut fine-tuned on labelled training texts (IMDb train reviews, TweetEval validation
tweets; never test data) with their true labels, asked in the seed polarity wordings, as the chain's
closed-task samples are. The teacher, each cut before and after training are scored by the ruler of
``compeff eval`` on TweetEval and IMDb test subsets, with agreement with the teacher. The teacher writes nothing (it is only scored, locally):
minutes per cut, where ``bench distill`` needs the whole chain (with ``student.heal.steps`` set every cut
is healed first, at its cost, and its first row says "healed, before SFT"). Each model's labels are kept in
``eval/<name>.json`` and each training stage in the bench's run folder, reused when run again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from compeff.bench.distill import markdown_table, print_table, row_line, score_model, summarise_row, train
from compeff.config import ConfigError, Recipe, load_recipe
from compeff.evaluate.eval_stage import load_eval_set
from compeff.layer_cut import closest_block_cut, cut_distance
from compeff.models import CUT_TEXTS, decoder_depth, resolve_model, student_model, user_text_distances
from compeff.runs import atomic_write_bytes
from compeff.synth.seed_tasks import SEED_TASKS, fill

TRAIN_SETS = ("imdb:train", "tweeteval_sentiment:validation")
TEST_SETS = ("tweeteval_sentiment:test", "imdb:test")


def parse_cut(spec: str, depth: int) -> list[int]:
    """Layers to keep from a spec such as ``0-7,28-29`` or ``0,3,6`` (ranges inclusive); a clear error
    for anything else."""
    layers: list[int] = []
    try:
        for part in spec.split(","):
            first, _, last = part.strip().partition("-")
            layers += range(int(first), int(last or first) + 1)
    except ValueError:
        raise ConfigError(
            f"bench cut: --cut '{spec}': give layers as 0-7,28-29, or recipe, or closest"
        ) from None
    if not layers or len(set(layers)) != len(layers) or not all(0 <= i < depth for i in layers):
        raise ConfigError(f"bench cut: --cut '{spec}': need distinct layers of 0..{depth - 1}")
    return sorted(layers)


def cut_label(layers: list[int]) -> str:
    """A cut written back compactly (``0-7,28-29``)."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def gold_chat_rows(train: int, max_chars: int, seed: int, data_dir: str | None) -> list[dict[str, Any]]:
    """The ceiling's training set: ``train`` labelled texts of each training split (stratified), each
    asked in one of the seed polarity wordings of its label set (in turn) and answered with its true
    label, texts cut to ``max_chars``."""
    tasks = {tuple(t["labels"]): t for t in (SEED_TASKS["polarity"], SEED_TASKS["polarity3"])}
    rows = []
    for spec in TRAIN_SETS:
        data = load_eval_set(spec, train, seed, data_dir)
        task = tasks.get(tuple(data.label_names))
        if task is None:
            raise ConfigError(f"bench cut: {spec}: no seed polarity task has the labels {data.label_names}")
        for i, (text, label) in enumerate(zip(data.texts, data.labels, strict=True)):
            wording = task["wordings"][i % len(task["wordings"])]
            prompt = fill(wording, data.label_names, text[:max_chars])
            rows.append({"id": f"{spec}:{i}", "messages": [{"role": "user", "content": prompt},
                                                          {"role": "assistant", "content": data.label_names[label]}]})  # fmt: skip
    return rows


def resolve_cuts(specs: list[str], recipe: Recipe, depth: int) -> list[list[int] | str]:
    """The cuts asked for, in order, each once: a layer list (``recipe`` is ``student.keep_layers``, or
    ``closest`` when the recipe sets ``student.cut_layers``), or ``closest``, chosen once the distances are
    known. Bad specs fail here, before any model runs."""
    out: list[list[int] | str] = []
    for spec in specs:
        if spec == "closest" or (spec == "recipe" and recipe.student.cut_layers):
            n_keep = closest_size(recipe, depth)
            if n_keep > depth:
                raise ConfigError(
                    f"bench cut: --cut {spec} keeps {n_keep} layers (student.keep_layers or cut_layers) of a "
                    f"model with {depth}"
                )
            layers: list[int] | str = "closest"
        elif spec == "recipe":
            if not recipe.student.keep_layers:
                raise ConfigError(
                    "bench cut: --cut recipe: the recipe sets no student.keep_layers or cut_layers"
                )
            layers = parse_cut(",".join(map(str, recipe.student.keep_layers)), depth)
        else:
            layers = parse_cut(spec, depth)
        if layers not in out:
            out.append(layers)
    return out


def cut_overrides(base: list[str], gold: Path, layers: list[int]) -> list[str]:
    """The recipe overrides that train one cut on the ceiling's set: its layers listed, in place of the
    recipe's ``keep_layers`` or ``cut_layers``."""
    return [*base, f"sft.input={gold}", "student.cut_layers=null", f"student.keep_layers={layers}"]


def closest_size(recipe: Recipe, depth: int) -> int:
    """Layers the ``closest`` cut keeps: ``student.cut_layers``, or as many as ``student.keep_layers``,
    else a third of the model."""
    return recipe.student.cut_layers or len(recipe.student.keep_layers or []) or max(1, depth // 3)


def closest_layers(recipe: Recipe, distances: np.ndarray) -> list[int]:
    """The ``closest`` cut: the block cut of ``closest_size`` layers that moves the residual stream least."""
    depth = distances.shape[0] - 1
    return closest_block_cut(distances, closest_size(recipe, depth))


def run_cut_bench(
    recipe_path: Path | None = Path("recipes/quickstart.yaml"),
    cuts: tuple[str, ...] = ("recipe", "closest"),
    train_texts: int = 200,
    tweeteval: int = 200,
    imdb: int = 200,
    out_dir: Path = Path("runs/bench"),
    overrides: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Score the teacher and every cut before and after training on true labels; print and keep the
    table (``cut_bench.md``, ``cut_bench.json`` in the run folder ``cut-bench``)."""
    if train_texts < 1 or not cuts:
        raise ConfigError("bench cut: --train must be at least 1 and at least one --cut given")
    if tweeteval < 1 or imdb < 1:
        raise ConfigError("bench cut: --tweeteval and --imdb must be at least 1")
    base = [f"run.dir={out_dir}", "run.name=cut-bench", *(overrides or []), "sft.loss=sft"]
    recipe = load_recipe(recipe_path, base)
    root = recipe.run_dir
    console = Console()
    model_path = resolve_model(recipe.student.model)
    asked = resolve_cuts(list(cuts), recipe, decoder_depth(recipe.student.model, model_path))
    console.print(
        f"bench cut: angular distances of {recipe.student.model} on up to {CUT_TEXTS} user texts (kept "
        "in $COMPEFF_HOME once measured)"
    )
    distances = user_text_distances(recipe.student.model, recipe.data)  # what student.cut_layers reads
    layer_lists: list[list[int]] = []
    for layers in asked:
        chosen = closest_layers(recipe, distances) if layers == "closest" else layers
        if chosen not in layer_lists:
            layer_lists.append(chosen)
    gold = gold_chat_rows(train_texts, recipe.generate.max_chars, recipe.run.seed, recipe.data.dir)
    gold_path = root / "sets" / "gold-cut.jsonl"
    gold_path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in gold)
    if not gold_path.exists() or gold_path.read_text(encoding="utf-8") != text:
        atomic_write_bytes(gold_path, text.encode("utf-8"))
    sets = {
        name: load_eval_set(name, limit, recipe.run.seed, recipe.data.dir)
        for name, limit in zip(TEST_SETS, (tweeteval, imdb), strict=True)
    }
    teacher_scored = score_model(
        recipe.teacher.model, sets, recipe, root / "eval" / "teacher.json", need_calibrated=True
    )
    rows = [
        {
            "row": "teacher",
            "samples": None,
            "train_s": None,
            "sets": summarise_row(teacher_scored, sets, None),
        }
    ]
    console.print(f"bench cut: teacher: {row_line(rows[0])}", markup=False, soft_wrap=True)
    for layers in layer_lists:
        label = cut_label(layers)
        tag = label.replace(",", "_")
        trained = load_recipe(recipe_path, cut_overrides(base, gold_path, layers))
        distance = cut_distance(distances, layers)
        before = student_model(trained.student, trained.data, progress=False)
        scored = score_model(before, sets, recipe, root / "eval" / f"before-{tag}.json")
        name = f"{len(layers)} layers {label} (distance {distance:.3f})"
        before_label = "healed, before SFT" if trained.student.heal.steps else "before training"
        rows.append({"row": f"{name}: {before_label}", "samples": None, "train_s": None,
                     "sets": summarise_row(scored, sets, teacher_scored), "layers": layers, "distance": distance})  # fmt: skip
        console.print(f"bench cut: {rows[-1]['row']}: {row_line(rows[-1])}", markup=False, soft_wrap=True)
        stage = f"sft-cut-{tag}"
        manifest = train(trained, stage)
        scored = score_model(str(root / stage / "model"), sets, recipe, root / "eval" / f"{stage}.json")
        rows.append({"row": f"{name}: true labels", "samples": manifest.get("samples"),
                     "train_s": manifest.get("train_runtime_s"), "sets": summarise_row(scored, sets, teacher_scored),
                     "layers": layers, "distance": distance})  # fmt: skip
        console.print(f"bench cut: {rows[-1]['row']}: {row_line(rows[-1])}", markup=False, soft_wrap=True)
    title = (
        "compeff bench cut: each cut before and after SFT on true labels: accuracy / macro-F1 / agreement "
        "with the teacher (in brackets: with its labels batch-calibrated on the test texts) (x 100, mean over "
        "wordings)"
    )
    print_table(rows, recipe, title=title)
    result = {"rows": rows, "distances": distances.tolist(), "train_texts_per_set": train_texts}
    (root / "cut_bench.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (root / "cut_bench.md").write_text(markdown_table(rows), encoding="utf-8")
    return rows
