"""Difficulty-prioritised sampling: the exponent, kept fractions, monotonicity, hard/random, seeds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.integrate import quad

from compeff.select.sampling import keep_probability, select, select_group, solve_exponent


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("a", [1.0, 0.7, 0.3])
def test_exponent_satisfies_the_integral(ratio, a):
    b = solve_exponent(ratio, a)
    area = quad(lambda x: float(keep_probability(x, a, b)), 0, 1, points=[a] if a < 1 else None)[0]
    assert area == pytest.approx(ratio, abs=1e-7)
    if a == 1.0:
        assert b == pytest.approx(1 / ratio - 1, rel=1e-7)  # the closed form for F(x) = x^b


def test_bad_ratio_is_refused():
    with pytest.raises(ValueError, match="ratio"):
        solve_exponent(1.5)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75])
def test_kept_fraction_over_many_seeds(ratio):
    difficulties = np.random.default_rng(0).random(1000)
    fractions = [select_group(difficulties, ratio, "soft", seed).mean() for seed in range(200)]
    assert abs(np.mean(fractions) - ratio) < 0.01


def test_keep_probability_rises_with_difficulty():
    x = np.linspace(0, 1, 101)
    assert np.all(np.diff(keep_probability(x, 1.0, solve_exponent(0.5))) >= 0)
    difficulties = np.arange(1000, dtype=float)
    kept = np.mean([select_group(difficulties, 0.5, "soft", seed) for seed in range(100)], axis=0)
    deciles = kept.reshape(10, 100).mean(axis=1)
    assert np.all(np.diff(deciles) > 0)


def _rows(n_groups=3, size=200, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"id": f"g{g}-{i:04d}", "task_id": f"t{g}", "d": float(rng.random())}
        for g in range(n_groups)
        for i in range(size + 17 * g)
    ]


def test_hard_keeps_exactly_the_top_of_each_group():
    rows = _rows()
    keep = select(rows, lambda r: r["d"], lambda r: r["task_id"], 0.3, "hard", seed=1)
    for g in range(3):
        members = [(r["d"], k) for r, k in zip(rows, keep, strict=True) if r["task_id"] == f"t{g}"]
        top = sorted(members, reverse=True)[: round(0.3 * len(members))]
        assert sum(k for _, k in members) == len(top)
        assert all(k for _, k in top)


def test_same_seed_same_subset_and_order_independence():
    rows = _rows()
    diff, grp = (lambda r: r["d"]), (lambda r: r["task_id"])
    first = select(rows, diff, grp, 0.5, "soft", seed=7)
    assert first == select(rows, diff, grp, 0.5, "soft", seed=7)
    assert first != select(rows, diff, grp, 0.5, "soft", seed=8)
    shuffled = list(reversed(rows))
    again = select(shuffled, diff, grp, 0.5, "soft", seed=7)
    assert {r["id"] for r, k in zip(rows, first, strict=True) if k} == {
        r["id"] for r, k in zip(shuffled, again, strict=True) if k
    }
    rand = select(rows, diff, grp, 0.5, "random", seed=7)
    assert sum(rand) == sum(round(0.5 * (200 + 17 * g)) for g in range(3))


def test_ties_are_ordered_by_the_tie_break_metric_and_the_metric_still_leads():
    tied = [1.0] * 6
    ppl = [5.0, 1.0, 4.0, 2.0, 3.0, 0.0]
    assert set(np.flatnonzero(select_group(tied, 0.5, "hard", 0))) == {3, 4, 5}  # input order
    assert set(np.flatnonzero(select_group(tied, 0.5, "hard", 0, tie_break=ppl))) == {0, 2, 4}
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert set(np.flatnonzero(select_group(rising, 0.5, "hard", 0, tie_break=ppl))) == {3, 4, 5}
    with_nan = [1.0, float("nan"), 3.0, 2.0]
    assert set(np.flatnonzero(select_group([1.0] * 4, 0.25, "hard", 0, tie_break=with_nan))) == {2}
    assert set(np.flatnonzero(select_group([1.0] * 4, 0.75, "hard", 0, tie_break=with_nan))) == {0, 2, 3}


def test_soft_selection_among_ties_follows_the_tie_break():
    rows = [{"id": f"r{i:03d}", "rho": 1.0, "ppl": float(i)} for i in range(400)]
    keep = select(rows, lambda r: r["rho"], lambda r: "g", 0.25, "soft", 3, tie_break=lambda r: r["ppl"])
    kept = [r["ppl"] for r, k in zip(rows, keep) if k]
    dropped = [r["ppl"] for r, k in zip(rows, keep) if not k]
    assert np.mean(kept) > np.mean(dropped) + 100  # F rises with position: the higher-ppl ties are kept
