"""Successive halving over distillation settings (T, alpha, lr), as seed 001's project searched them.

Round r trains every surviving configuration on a growing share of the training set (``fraction``
times 2^r, capped at all of it), scores it on a held-out part of the training set, and keeps the
better half, until one is left. Each (round, configuration) score is a row of the stage's data file,
so a killed search resumes without redoing finished trainings.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def grid(
    temperatures: Sequence[float], alphas: Sequence[float], lrs: Sequence[float]
) -> list[dict[str, float]]:
    """Every (T, alpha, lr) combination."""
    return [
        {"temperature": t, "alpha": a, "lr": lr} for t, a, lr in itertools.product(temperatures, alphas, lrs)
    ]


def config_id(config: dict[str, float]) -> str:
    return json.dumps(config, sort_keys=True)


def successive_halving(
    configs: list[dict[str, float]],
    evaluate: Callable[[dict[str, float], float], float],
    fraction: float = 0.25,
    done: dict[tuple[int, str], float] | None = None,
    record: Callable[[int, dict[str, float], float, float], None] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The best configuration and the history of every round.

    ``evaluate(config, share)`` trains on ``share`` of the data and returns a score (higher is better);
    ``done`` holds scores of an earlier, interrupted search; ``record`` is told each new score.
    """
    if not configs:
        raise ValueError("the search grid is empty")
    done = dict(done or {})
    alive = list(configs)
    history = []
    round_no = 0
    while True:
        share = min(1.0, fraction * 2**round_no)
        scores = []
        for config in alive:
            key = (round_no, config_id(config))
            if key not in done:
                done[key] = evaluate(config, share)
                if record is not None:
                    record(round_no, config, share, done[key])
            scores.append(done[key])
        history.append(
            {
                "round": round_no,
                "share": share,
                "scores": [[c, s] for c, s in zip(alive, scores, strict=True)],
            }
        )
        if len(alive) == 1:
            return alive[0], history
        order = np.argsort(-np.asarray(scores), kind="stable")
        alive = [alive[i] for i in order[: max(1, len(alive) // 2)]]
        round_no += 1
