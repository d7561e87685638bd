"""``compeff score`` with a warmed-up scorer (``score.warmup_samples``), as the paper scores.

The student is first fine-tuned briefly with the ``sft`` settings on N random samples of the set, then
scores the whole set. The N samples are a stage of their own (``score-warmup-data/``) and the warmed
scorer another (``score-warmup/``): each writes only its own folder, with a manifest, and both are reused
by later runs while the set and the settings stay the same. Training sits above selection in
the package, so the composition lives here and :mod:`compeff.select.score_stage` only scores.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from compeff.config import Recipe
from compeff.runs import Stage, read_chat_set
from compeff.select import score_stage
from compeff.train.sft import run_sft_stage

WARMUP_DATA_STAGE = "score-warmup-data"
WARMUP_STAGE = "score-warmup"


def warmup_set(recipe: Recipe, force: bool = False) -> Path:
    """Draw ``score.warmup_samples`` random samples of the set to be scored into the run's
    ``score-warmup-data`` stage (seeded by ``run.seed``, in id order); its data file."""
    source = score_stage.score_input(recipe)
    rows = read_chat_set(source)
    n = min(recipe.score.warmup_samples, len(rows))
    picks = sorted(random.Random(recipe.run.seed).sample(rows, n), key=lambda r: str(r["id"]))
    config = {"warmup_samples": recipe.score.warmup_samples, "seed": recipe.run.seed}
    with Stage.open(
        recipe.run_dir, WARMUP_DATA_STAGE, config=config, inputs={"set": source}, force=force
    ) as stage:
        stage.append(stage.pending(picks, key=lambda r: r["id"]))
    return stage.data_path


def warm_up_scorer(recipe: Recipe, force: bool = False, progress: bool = True) -> str:
    """The student fine-tuned on ``score.warmup_samples`` random samples of the set; its model folder."""
    data = warmup_set(recipe, force)
    sft = recipe.sft.model_copy(update={"input": str(data), "merge": True})
    run_sft_stage(
        recipe.model_copy(update={"sft": sft}), force=force, progress=progress, stage_name=WARMUP_STAGE
    )
    return str(recipe.run_dir / WARMUP_STAGE / "model")


def run_score_stage(recipe: Recipe, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """The score stage: with ``score.warmup_samples``, warm the scorer up first (a merge reuses the
    scorer the shards were scored with), then score as :func:`compeff.select.score_stage.run_score_stage`."""
    settings = recipe.score
    if settings.warmup_samples:
        if settings.merge:
            scorer = str(recipe.run_dir / WARMUP_STAGE / "model")
        else:
            scorer = warm_up_scorer(recipe, force, progress)
        recipe = recipe.model_copy(update={"score": settings.model_copy(update={"scorer": scorer})})
    return score_stage.run_score_stage(recipe, force, progress)
