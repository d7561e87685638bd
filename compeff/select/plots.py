"""Histograms of difficulty, as PNG bytes (matplotlib, no display needed)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence


def histogram_png(series: Mapping[str, Sequence[float]], title: str, xlabel: str, bins: int = 40) -> bytes:
    """One histogram per named series, overlaid on common bins (e.g. before / after selection)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = [np.asarray(v, dtype=float) for v in series.values()]
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(0)
    edges = np.histogram_bin_edges(finite if finite.size else np.zeros(1), bins=bins)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for (label, _), v in zip(series.items(), values, strict=True):
        ax.hist(v[np.isfinite(v)], bins=edges, alpha=0.55, label=f"{label} (n={v.size})")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
