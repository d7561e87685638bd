"""``compeff bench cluster``: weighted affinity propagation against the paper's repeat-based run.

Synthetic attribute names (modifier + head, embedded by the offline MiniLM) get Zipf-distributed
counts topped near 13,000 (like the paper's "tone"). Both methods cluster them with the same
preference, one after the other in one process; wall time and peak traced memory (tracemalloc,
which sees numpy's buffers) are recorded with the adjusted Rand index between their labels.
"""

from __future__ import annotations

import json
import random
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from compeff.synth.perspectives import (
    APResult,
    multiplicities,
    neg_sq_distances,
    repeat_affinity_propagation,
    weighted_affinity_propagation,
    weighted_percentile,
)

HEADS = [
    "tone",
    "sarcasm",
    "irony",
    "humor",
    "praise",
    "criticism",
    "emotion",
    "anger",
    "joy",
    "sadness",
    "fear",
    "surprise",
    "disgust",
    "trust",
    "anticipation",
    "nostalgia",
    "excitement",
    "frustration",
    "disappointment",
    "satisfaction",
    "urgency",
    "politeness",
    "formality",
    "certainty",
    "stance",
    "rating",
    "recommendation",
    "comparison",
    "exaggeration",
    "empathy",
    "hostility",
    "gratitude",
    "regret",
    "hope",
    "confidence",
    "skepticism",
    "admiration",
    "contempt",
    "boredom",
    "curiosity",
    "optimism",
    "pessimism",
    "enthusiasm",
    "indifference",
    "irritation",
]
MODIFIERS = [
    "",
    "level of",
    "intensity of",
    "expression of",
    "use of",
    "degree of",
    "implicit",
    "explicit",
    "overall",
    "mild",
    "strong",
    "subtle",
    "personal",
    "social",
    "emotional",
    "verbal",
    "directed",
    "self-directed",
    "narrative",
    "comedic",
    "sarcastic",
    "positive",
    "negative",
    "mixed",
    "collective",
    "situational",
    "cultural",
    "political",
    "professional",
    "casual",
    "formal",
    "ambiguous",
    "genuine",
    "performative",
    "escalating",
    "sudden",
    "sustained",
    "nuanced",
    "blunt",
    "understated",
    "audience-facing",
    "hidden",
    "communal",
    "growing",
    "fading",
    "ironic",
    "restrained",
    "public",
    "private",
    "momentary",
]


def synthetic_attributes(
    n: int, top_count: int = 13000, exponent: float = 1.0, min_count: int = 10, seed: int = 0
):
    """n distinct attribute names and Zipf counts (rank r gets top_count / r^exponent, at least min_count)."""
    rng = random.Random(seed)
    names = [f"{mod} {head}".strip() for mod in MODIFIERS for head in HEADS]
    if n > len(names):
        raise ValueError(f"at most {len(names)} synthetic attributes")
    names = rng.sample(names, n)
    ranks = np.arange(1, n + 1, dtype=np.float64)
    counts = np.maximum(min_count, np.round(top_count / ranks**exponent)).astype(int)
    return names, counts


@dataclass
class ClusterBenchRow:
    method: str
    points: int
    seconds: float
    peak_mib: float
    clusters: int
    iterations: int
    converged: bool


def _traced(fn: Callable[[], APResult]) -> tuple[APResult, float, float]:
    tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return result, seconds, peak


def run_cluster_bench(
    n_attributes: int = 2000,
    percentile: float = 0.5,
    damping: float = 0.9,
    max_iter: int = 1000,
    out_dir: Path | None = None,
    seed: int = 0,
    noise_floor: bool = True,
) -> dict:
    """Cluster the same synthetic attributes both ways; print and optionally write the comparison."""
    from sklearn.metrics import adjusted_rand_score

    from compeff.config import EmbedderSettings
    from compeff.embeddings import embed_texts

    console = Console()
    names, counts = synthetic_attributes(n_attributes, seed=seed)
    embeddings = embed_texts(names, EmbedderSettings())
    weights = multiplicities(counts)
    s = neg_sq_distances(embeddings)
    preference = weighted_percentile(s, weights, percentile)
    console.print(
        f"{n_attributes} attributes, {int(weights.sum())} repeated points, preference {preference:.4f}"
    )

    weighted, w_sec, w_peak = _traced(
        lambda: weighted_affinity_propagation(s, weights, preference, damping, max_iter)
    )
    console.print(f"weighted: {w_sec:.1f} s, peak {w_peak:.0f} MiB, {weighted.n_clusters} clusters")
    repeated, r_sec, r_peak = _traced(
        lambda: repeat_affinity_propagation(embeddings, weights, preference, damping, max_iter, seed)
    )
    console.print(f"repeat: {r_sec:.1f} s, peak {r_peak:.0f} MiB, {repeated.n_clusters} clusters")
    # the reference's own noise floor: scikit-learn's tie-breaking noise decides which copies lead
    other_seed = (
        repeat_affinity_propagation(embeddings, weights, preference, damping, max_iter, seed + 1)
        if noise_floor
        else None
    )
    rows = [
        ClusterBenchRow(
            "weighted",
            n_attributes,
            round(w_sec, 2),
            round(w_peak, 1),
            weighted.n_clusters,
            weighted.n_iter,
            weighted.converged,
        ),
        ClusterBenchRow(
            "repeat (paper)",
            int(weights.sum()),
            round(r_sec, 2),
            round(r_peak, 1),
            repeated.n_clusters,
            repeated.n_iter,
            repeated.converged,
        ),
    ]
    report = {
        "attributes": n_attributes,
        "repeated_points": int(weights.sum()),
        "max_count": int(counts.max()),
        "preference": preference,
        "percentile": percentile,
        "ari": float(adjusted_rand_score(repeated.labels, weighted.labels)),
        "ari_weighted_vs_repeat_seed2": float(adjusted_rand_score(other_seed.labels, weighted.labels))
        if other_seed
        else None,
        "ari_repeat_seed1_vs_seed2": float(adjusted_rand_score(repeated.labels, other_seed.labels))
        if other_seed
        else None,
        "memory_ratio": r_peak / w_peak if w_peak else None,
        "speedup": r_sec / w_sec if w_sec else None,
        "rows": [asdict(r) for r in rows],
    }
    table = Table(title=f"clustering {n_attributes} attributes (Zipf counts, max {counts.max()})")
    for col in ("method", "points", "seconds", "peak MiB", "clusters", "iterations", "converged"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r.method,
            str(r.points),
            f"{r.seconds:.1f}",
            f"{r.peak_mib:.0f}",
            str(r.clusters),
            str(r.iterations),
            str(r.converged),
        )
    console.print(table)
    console.print(
        f"ARI(weighted, repeat) = {report['ari']:.3f}; peak memory repeat / weighted = {report['memory_ratio']:.1f}x"
    )
    if other_seed is not None:
        console.print(
            f"ARI(weighted, repeat with another seed) = {report['ari_weighted_vs_repeat_seed2']:.3f}; "
            f"ARI(repeat, repeat with another seed) = {report['ari_repeat_seed1_vs_seed2']:.3f} (the reference's own noise)"
        )
    if out_dir:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "cluster_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
