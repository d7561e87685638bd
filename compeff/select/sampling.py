"""Difficulty-prioritised sampling: which samples of each group to keep for a target ratio r.

Soft (the paper's): sort a group by difficulty ascending, give item i the position
x_i = (i + 0.5) / n and keep it, independently, with probability F(x_i), where
F(x) = (x / a)^b for x < a and ((x - 1) / (a - 1))^b for x >= a, and b makes the integral of F over
[0, 1] equal r. Hard: the top round(r n) of each group. Random: round(r n) drawn uniformly.

Ties in the difficulty are ordered by an optional second metric (``sample.tie_break``): the rank score
rho is 1.0 for every answer token outside the scorer's nucleus, so a cold student puts most one-word
answers of closed tasks at exactly 1.0 (97% of 578 polarity samples in one bench run), and without a
tie-break their order, hence the soft selection among them, would follow their ids.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from functools import lru_cache
from typing import Any, Literal

import numpy as np

Method = Literal["soft", "hard", "random"]


def keep_probability(x: np.ndarray | float, a: float, b: float) -> np.ndarray:
    """F(x): the keep probability at relative position x in [0, 1] (difficulty ascending)."""
    x = np.asarray(x, dtype=np.float64)
    if a >= 1.0:
        return np.power(x, b)
    rising = np.power(np.clip(x / a, 0.0, 1.0), b)
    falling = np.power(np.clip((x - 1.0) / (a - 1.0), 0.0, 1.0), b)
    return np.where(x < a, rising, falling)


@lru_cache(maxsize=256)
def solve_exponent(ratio: float, a: float = 1.0) -> float:
    """The exponent b for which the integral of F over [0, 1] equals ``ratio`` (solved numerically)."""
    from scipy.integrate import quad
    from scipy.optimize import brentq

    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if not 0.0 < a <= 1.0:
        raise ValueError(f"a must be in (0, 1], got {a}")
    if ratio == 1.0:
        return 0.0

    def excess(b: float) -> float:
        points = [a] if a < 1.0 else None
        return quad(lambda x: float(keep_probability(x, a, b)), 0.0, 1.0, points=points, limit=200)[0] - ratio

    high = 1.0
    while excess(high) > 0:  # the integral falls as b grows; bracket the root
        high *= 2.0
    return float(brentq(excess, 0.0, high, xtol=1e-12, rtol=1e-12))


def _group_seed(seed: int, key: Hashable) -> int:
    """A seed per group that does not depend on the order groups are visited in."""
    digest = hashlib.sha256(f"{seed}|{key!r}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def select_group(
    difficulties: Sequence[float],
    ratio: float,
    method: Method,
    seed: int,
    a: float = 1.0,
    tie_break: Sequence[float] | None = None,
) -> np.ndarray:
    """Boolean keep mask for one group (in the given order); equal difficulties are ordered by
    ``tie_break`` (ascending; NaN counts as the easiest), then by input order."""
    values = np.asarray(difficulties, dtype=np.float64)
    n = values.size
    mask = np.zeros(n, dtype=bool)
    if n == 0:
        return mask
    rng = np.random.default_rng(seed)
    if tie_break is None:
        order = np.argsort(values, kind="stable")  # easiest first; ties keep input order
    else:  # lexsort: the last key is the primary one; equal keys keep input order
        ties = np.asarray(tie_break, dtype=np.float64)
        order = np.lexsort((np.where(np.isnan(ties), -np.inf, ties), values))
    if method == "soft":
        x = (np.arange(n) + 0.5) / n
        keep = rng.random(n) < keep_probability(x, a, solve_exponent(ratio, a))
        mask[order[keep]] = True
    elif method == "hard":
        k = round(ratio * n)
        if k:
            mask[order[n - k :]] = True
    elif method == "random":
        mask[rng.choice(n, size=round(ratio * n), replace=False)] = True
    else:
        raise ValueError(f"unknown method {method!r} (soft, hard, random)")
    return mask


def select(
    rows: Sequence[dict[str, Any]],
    difficulty: Callable[[dict[str, Any]], float],
    group: Callable[[dict[str, Any]], Hashable],
    ratio: float,
    method: Method = "soft",
    seed: int = 42,
    a: float = 1.0,
    tie_break: Callable[[dict[str, Any]], float] | None = None,
) -> list[bool]:
    """Keep flags for every row, chosen group by group. Rows within a group are ordered by id first, so
    the subset does not depend on the order of the input file; ``tie_break`` orders equal difficulties."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[group(row)].append(i)
    keep = [False] * len(rows)
    for key, members in groups.items():
        members.sort(key=lambda i: str(rows[i].get("id", i)))
        ties = None if tie_break is None else [tie_break(rows[i]) for i in members]
        values = [difficulty(rows[i]) for i in members]
        mask = select_group(values, ratio, method, _group_seed(seed, key), a, ties)
        for i, kept in zip(members, mask, strict=True):
            keep[i] = bool(kept)
    return keep
