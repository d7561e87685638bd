"""``compeff bench proxy``: how well the difficulty proxy predicts rho before the teacher answers.

Offline there is no teacher, so the distillation set is built from real labelled reviews with answers
a teacher could have given and that can be read off the data: the sentiment label, the review's first
sentence (a one-line summary), and its most emphatic sentence (a quote). The set goes through the
real stages: ``compeff score`` with the local benchmark scorer, then ``compeff score --proxy``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from compeff.config import load_recipe
from compeff.data import load_labelled

TASKS = {
    "polarity": ("closed_classification", "Is the sentiment of this review positive or negative? Answer with one word."),
    "summary": ("extraction", "Summarise this review in one sentence taken from it."),
    "quote": ("extraction", "Quote the sentence of this review that shows the strongest feeling."),
}  # fmt: skip
EMPHASIS = re.compile(r"[!]|\b(best|worst|great|awful|love|hate|terrible|brilliant|boring|amazing)\b", re.I)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 3]


def proxy_bench_set(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Chat samples over real IMDb test reviews for the three tasks, round robin."""
    rng = random.Random(seed)
    rows, names, _ = load_labelled("imdb:test")
    rng.shuffle(rows)
    out = []
    for i, row in enumerate(rows[:n]):
        name = list(TASKS)[i % len(TASKS)]
        kind, instruction = TASKS[name]
        text = row["text"][:1500]
        sentences = _sentences(text) or [text]
        if name == "polarity":
            answer = names[row["label"]]
        elif name == "summary":
            answer = sentences[0]
        else:
            answer = max(sentences, key=lambda s: (len(EMPHASIS.findall(s)), -len(s)))
        out.append(
            {
                "id": f"px{i:05d}",
                "messages": [
                    {"role": "user", "content": f"{instruction}\n\nReview: {text}"},
                    {"role": "assistant", "content": answer},
                ],
                "task_id": name,
                "task_name": name,
                "task_type": kind,
                "perspective_id": 0,
            }
        )
    return out


def run_proxy_bench(
    n_samples: int = 3000, out_dir: Path | None = None, head: str = "ridge"
) -> dict[str, Any]:
    """Score the set, train and test the proxy; print and return the proxy's report."""
    from compeff.bench.score import bench_scorer_path
    from compeff.select.proxy import run_proxy
    from compeff.train.score_warmup import run_score_stage

    root = Path(out_dir or "runs/bench")
    run_dir = root / "proxy-bench"
    run_dir.mkdir(parents=True, exist_ok=True)
    data = run_dir / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in proxy_bench_set(n_samples)))
    recipe = load_recipe(
        None,
        [
            f"run.dir={root}",
            "run.name=proxy-bench",
            f"student.model={bench_scorer_path(32000)}",
            f"score.input={data}",
            "score.metrics=[rank]",
            "score.max_length=1024",
            "score.batch_size=16",
            f"score.proxy_head={head}",
            "sample.ratio=0.5",
        ],
    )
    run_score_stage(recipe)
    report = run_proxy(recipe, force=True)
    if out_dir is not None:
        (root / "proxy_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
