"""``compeff score`` with a warmed-up scorer (``score.warmup_samples``), as the paper scores.

The student is first fine-tuned briefly with the ``sft`` settings on N random samples of the set (kept in
``score-warmup/`` and reused by later runs), then scores the whole set. Training sits above selection in
the package, so the composition lives here and :mod:`compeff.select.score_stage` only scores.
"""

from __future__ import annotations

import random
from typing import Any

from compeff.config import Recipe
from compeff.runs import atomic_write_text, dumps_line, read_chat_set
from compeff.select import score_stage
from compeff.train.sft import run_sft_stage


def warm_up_scorer(recipe: Recipe, force: bool = False, progress: bool = True) -> str:
    """The student fine-tuned on ``score.warmup_samples`` random samples of the set; its model folder."""
    rows = read_chat_set(score_stage.score_input(recipe))
    picks = random.Random(recipe.run.seed).sample(rows, min(recipe.score.warmup_samples, len(rows)))
    data = recipe.run_dir / "score-warmup-data.jsonl"
    text = "".join(dumps_line(r).decode() for r in sorted(picks, key=lambda r: str(r["id"])))
    if not data.exists() or data.read_text(encoding="utf-8") != text:
        data.parent.mkdir(parents=True, exist_ok=True)  # score may be a run's first stage (score.input)
        atomic_write_text(data, text)
    sft = recipe.sft.model_copy(update={"input": str(data), "merge": True})
    run_sft_stage(
        recipe.model_copy(update={"sft": sft}), force=force, progress=progress, stage_name="score-warmup"
    )
    return str(recipe.run_dir / "score-warmup" / "model")


def run_score_stage(recipe: Recipe, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """The score stage: with ``score.warmup_samples``, warm the scorer up first (a merge reuses the
    scorer the shards were scored with), then score as :func:`compeff.select.score_stage.run_score_stage`."""
    settings = recipe.score
    if settings.warmup_samples:
        if settings.merge:
            scorer = str(recipe.run_dir / "score-warmup" / "model")
        else:
            scorer = warm_up_scorer(recipe, force, progress)
        recipe = recipe.model_copy(update={"score": settings.model_copy(update={"scorer": scorer})})
    return score_stage.run_score_stage(recipe, force, progress)
