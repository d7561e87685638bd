"""The difficulty proxy: savings arithmetic, training on a scored set, skipping in generate."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from compeff.config import load_recipe
from compeff.data import DataError
from compeff.runs import iter_jsonl
from compeff.select.proxy import calls_saved, load_proxy, run_proxy, skip_predicted_easy

HARD = ["awful", "boring", "slow", "sad", "confusing", "tedious"]
EASY = ["great", "fun", "happy", "brilliant", "lovely", "superb"]


def test_calls_saved_with_a_perfect_and_a_useless_proxy():
    truth = np.random.default_rng(0).random(1000)
    perfect = calls_saved(truth, truth, ratio=0.3)
    assert perfect["saved_share_proxy"] == pytest.approx(0.7)  # only the kept 30% need answers
    useless = calls_saved(truth, np.random.default_rng(1).random(1000), ratio=0.3)
    assert useless["saved_share_proxy"] <= 0.05
    assert perfect["curve"][0]["proxy"] == pytest.approx(perfect["oracle_mean_rho"])


def write_scored_set(run_dir, n=240, seed=0):
    """Scored samples whose rho rises with the share of 'hard' words in the prompt."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        share = rng.random()
        words = [rng.choice(HARD) if rng.random() < share else rng.choice(EASY) for _ in range(12)]
        rho = 0.1 + 0.8 * sum(w in HARD for w in words) / 12 + rng.gauss(0, 0.03)
        rows.append(
            {
                "id": f"s{i:04d}",
                "messages": [
                    {"role": "user", "content": "Describe the mood of this review: " + " ".join(words)},
                    {"role": "assistant", "content": "mixed"},
                ],
                "task_id": f"t{i % 3}",
                "task_type": "analysis",
                "difficulty": {"rank": rho},
            }
        )
    path = run_dir / "score" / "data.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_proxy_learns_rho_from_the_prompt(tmp_path):
    recipe = load_recipe(None, [f"run.dir={tmp_path}", "run.name=px", "sample.ratio=0.5"])
    with pytest.raises(DataError, match="no scored set"):
        run_proxy(recipe, progress=False)
    rows = write_scored_set(recipe.run_dir)
    report = run_proxy(recipe, progress=False)
    assert report["heldout"] == 48 and report["train"] == 192
    assert report["spearman_heldout"] > 0.6
    assert report["savings"]["saved_share_proxy"] >= report["savings"]["saved_share_random"]
    folder = recipe.run_dir / "score-proxy"
    assert len(list(iter_jsonl(folder / "data.jsonl"))) == 48
    assert "Spearman" in (folder / "report.md").read_text()

    proxy = load_proxy(folder)
    prompts = [r["messages"][0]["content"] for r in rows[:60]]
    kept, predicted = skip_predicted_easy(
        rows[:60], prompts, [r["task_id"] for r in rows[:60]], ["analysis"] * 60, proxy, 0.5
    )
    assert len(kept) == 30
    for task in ("t0", "t1", "t2"):  # half of each task, the ones predicted hardest
        members = [i for i, r in enumerate(rows[:60]) if r["task_id"] == task]
        top = sorted(members, key=lambda i: predicted[i], reverse=True)[: len(members) // 2]
        assert {rows[i]["id"] for i in top} == {r["id"] for r in kept if r["task_id"] == task}
    truth = np.array([r["difficulty"]["rank"] for r in rows[:60]])
    kept_truth = np.array([r["difficulty"]["rank"] for r in kept])
    assert kept_truth.mean() > truth.mean()  # the skipped pairs were the easier ones
