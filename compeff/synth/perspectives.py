"""Perspectives: embed attribute names and group them with frequency-weighted affinity propagation.

The paper repeats each attribute's embedding ``int(log1p(count))`` extra times before affinity
propagation, so the similarity matrix grows with the square of the total repeats. Here the copies
are folded into the messages instead: a point of multiplicity m stands for one leader copy and m - 1
follower copies whose messages are computed once per point (followers of one point are identical,
so they exchange identical messages). Memory grows with the number of distinct attributes only.

Identical copies are a degenerate case for affinity propagation: with exact symmetry none of them
can become the exemplar and the run oscillates; scikit-learn escapes through the tiny random noise
it adds to the similarities, after which one copy leads and the others follow. The weighted form
makes that outcome explicit (only the leader may be an exemplar) instead of leaving it to noise.

``repeat_affinity_propagation`` keeps the paper's repeat-based version (scikit-learn on the
repeated embeddings) as the reference.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def multiplicities(counts: np.ndarray | list[int]) -> np.ndarray:
    """Copies per attribute in the paper's weighting: 1 + int(log1p(count))."""
    return 1 + np.floor(np.log1p(np.asarray(counts, dtype=np.float64))).astype(np.int64)


def neg_sq_distances(x: np.ndarray) -> np.ndarray:
    """Similarity matrix: minus squared Euclidean distances (float64, exact zero diagonal)."""
    x = np.asarray(x, dtype=np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    s = 2.0 * (x @ x.T)
    s -= sq[:, None]
    s -= sq[None, :]
    np.minimum(s, 0.0, out=s)
    np.fill_diagonal(s, 0.0)
    return s


def weighted_percentile(s: np.ndarray, weights: np.ndarray, q: float) -> float:
    """``np.percentile(S_rep, q)`` of the repeated matrix, computed without building it.

    Entry (i, k), i != k, stands for m_i * m_k entries; every copy pair inside one point (diagonal and
    siblings) is a zero similarity, sum(m_i^2) entries in all.
    """
    m = weights.astype(np.float64)
    n = len(m)
    iu = ~np.eye(n, dtype=bool)
    values = np.concatenate([s[iu], [0.0]])
    counts = np.concatenate([np.outer(m, m)[iu], [float(np.sum(m * m))]])
    order = np.argsort(values, kind="stable")
    values, counts = values[order], counts[order]
    cum = np.cumsum(counts)
    total = cum[-1]
    h = (total - 1) * q / 100.0  # numpy's 'linear' method on 0-based ranks
    lo = math.floor(h)
    frac = h - lo
    v_lo = values[np.searchsorted(cum, lo + 1)]
    v_hi = values[np.searchsorted(cum, min(lo + 2, total))]
    return float(v_lo + frac * (v_hi - v_lo))


@dataclass
class APResult:
    """Labels per attribute, exemplar indices, iterations, convergence and the preference used."""

    labels: np.ndarray
    exemplars: np.ndarray
    n_iter: int
    converged: bool
    preference: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_clusters(self) -> int:
        return int(len(np.unique(self.labels[self.labels >= 0])))


def weighted_affinity_propagation(
    s: np.ndarray,
    weights: np.ndarray,
    preference: float,
    damping: float = 0.9,
    max_iter: int = 1000,
    convergence_iter: int = 15,
) -> APResult:
    """Affinity propagation where point i stands for ``weights[i]`` identical copies.

    Each point is a leader copy plus ``weights[i] - 1`` follower copies. Followers send and receive
    messages like any point (so they weigh in every availability), but only the leader may become an
    exemplar. This is the symmetry that scikit-learn's tie-breaking noise settles into on the
    repeated matrix, where identical copies otherwise cannot decide which of them leads and the run
    oscillates. Memory is a handful of n x n arrays in distinct points; updates, damping and the
    stopping rule are scikit-learn's.
    """
    n = s.shape[0]
    m = np.asarray(weights, dtype=np.float64)
    if n <= 1:
        return APResult(np.zeros(n, dtype=int), np.arange(n), 0, True, preference)
    followers = m - 1
    S = np.array(s, dtype=np.float64, copy=True)
    np.fill_diagonal(S, preference)
    RL = np.zeros((n, n))  # leader copy of i -> candidate k
    AL = np.zeros((n, n))
    RF = np.zeros((n, n))  # a follower copy of i -> candidate k (diagonal: its own leader)
    AF = np.zeros((n, n))
    tmp = np.empty((n, n))
    tmp2 = np.empty((n, n))
    ind = np.arange(n)
    diag = np.diag_indices(n)
    history = np.zeros((n, convergence_iter), dtype=bool)
    converged = False
    it = 0

    def responsibilities(A: np.ndarray, R: np.ndarray, own: float) -> None:
        """Damped update of R; ``own`` is the similarity on the diagonal (the preference for a leader's
        own candidacy, 0 for a follower's own leader), so S itself is shared by both kinds of rows."""
        np.add(A, S, tmp)
        tmp[diag] += own - preference
        top = np.argmax(tmp, axis=1)
        y1 = tmp[ind, top]
        tmp[ind, top] = -np.inf
        y2 = np.max(tmp, axis=1)
        np.subtract(S, y1[:, None], tmp)
        tmp[diag] += own - preference
        s_top = np.where(top == ind, own, S[ind, top])
        tmp[ind, top] = s_top - y2
        np.multiply(tmp, 1 - damping, out=tmp)
        R *= damping
        R += tmp

    for it in range(max_iter):
        responsibilities(AL, RL, preference)
        responsibilities(AF, RF, 0.0)
        # column sums of positive responsibilities over every copy except the candidate itself
        np.maximum(RL, 0, out=tmp2)
        tmp2[diag] = 0.0
        np.maximum(RF, 0, out=tmp)
        col = tmp2.sum(axis=0) + followers @ tmp
        r_kk = RL[diag].copy()
        base = r_kk + col
        # followers' availabilities
        np.subtract(base[None, :], tmp, out=tmp)
        np.minimum(tmp, 0.0, out=tmp)
        tmp *= 1 - damping
        AF *= damping
        AF += tmp
        # leaders' availabilities
        np.subtract(base[None, :], tmp2, out=tmp2)
        np.minimum(tmp2, 0.0, out=tmp2)
        tmp2[diag] = col
        tmp2 *= 1 - damping
        AL *= damping
        AL += tmp2

        exemplar = (AL[diag] + RL[diag]) > 0
        history[:, it % convergence_iter] = exemplar
        if it >= convergence_iter:
            stable = history.sum(axis=1)
            if np.sum((stable == convergence_iter) + (stable == 0)) == n and exemplar.any():
                converged = True
                break
    raw_exemplars = np.flatnonzero((AL[diag] + RL[diag]) > 0)
    labels, exemplars = _assign(S, m, raw_exemplars)
    return APResult(
        labels, exemplars, it + 1, converged, preference, extra={"message_exemplars": raw_exemplars.tolist()}
    )


def _assign(S: np.ndarray, m: np.ndarray, exemplars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels from exemplars as scikit-learn assigns them: nearest exemplar, then each cluster's
    exemplar moved to its weighted medoid (copies of g weigh m_g), then nearest again.
    -1 for all when there is no exemplar."""
    n = S.shape[0]
    if exemplars.size == 0:
        return np.full(n, -1), exemplars
    exemplars = exemplars.copy()
    c = np.argmax(S[:, exemplars], axis=1)
    c[exemplars] = np.arange(exemplars.size)
    pref = S[0, 0]
    for k in range(exemplars.size):
        members = np.flatnonzero(c == k)
        block = S[np.ix_(members, members)] * m[members][:, None]
        np.fill_diagonal(block, pref)  # the candidate's leader is itself (p); its followers are at 0
        exemplars[k] = members[np.argmax(block.sum(axis=0))]
    c = np.argmax(S[:, exemplars], axis=1)
    c[exemplars] = np.arange(exemplars.size)
    labels = exemplars[c]
    centers = np.unique(labels)
    return np.searchsorted(centers, labels), centers


def repeat_affinity_propagation(
    x: np.ndarray,
    weights: np.ndarray,
    preference: float,
    damping: float = 0.9,
    max_iter: int = 1000,
    seed: int = 0,
) -> APResult:
    """The paper's reference: scikit-learn on embeddings repeated ``weights[i]`` times.

    An attribute's label is the largest cluster among its copies' labels: scikit-learn's final
    assignment puts all but one copy of an exemplar into singleton clusters, and this undoes that.
    """
    from sklearn.cluster import affinity_propagation

    owner = np.repeat(np.arange(len(weights)), weights)
    s_rep = neg_sq_distances(np.asarray(x)[owner])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, rep_labels, n_iter = affinity_propagation(
            s_rep,
            preference=preference,
            damping=damping,
            max_iter=max_iter,
            random_state=seed,
            return_n_iter=True,
        )
    converged = not any("did not converge" in str(w.message) for w in caught)
    del s_rep
    labels = np.full(len(weights), -1)
    sizes = np.bincount(rep_labels[rep_labels >= 0]) if (rep_labels >= 0).any() else np.zeros(0, dtype=int)
    for i in range(len(weights)):
        votes = np.unique(rep_labels[owner == i])
        votes = votes[votes >= 0]
        if votes.size:
            labels[i] = votes[np.argmax(sizes[votes])]
    if (labels >= 0).any():
        _, labels[labels >= 0] = np.unique(labels[labels >= 0], return_inverse=True)
    exemplars = np.array([int(np.flatnonzero(labels == k)[0]) for k in np.unique(labels[labels >= 0])])
    return APResult(
        labels, exemplars, int(n_iter), converged, preference, extra={"repeated_points": int(len(owner))}
    )


def cluster_attributes(
    embeddings: np.ndarray,
    counts: list[int] | np.ndarray,
    damping: float = 0.9,
    max_iter: int = 1000,
    preference_percentile: float = 0.5,
    method: str = "weighted",
    n_clusters_hint: int | None = None,
    seed: int = 0,
) -> APResult:
    """Frequency-weighted affinity propagation of attribute embeddings (weighted or repeat method).

    The preference is the given percentile of the (repeated) similarities. With ``n_clusters_hint``
    the preference is searched by bisection, below the smallest similarity too, so the number of
    clusters lands near the target; the run closest to it is returned.
    """
    weights = multiplicities(counts)
    s = neg_sq_distances(embeddings)
    if method == "repeat":

        def run(pref: float) -> APResult:
            return repeat_affinity_propagation(embeddings, weights, pref, damping, max_iter, seed)

    elif method == "weighted":

        def run(pref: float) -> APResult:
            return weighted_affinity_propagation(s, weights, pref, damping, max_iter)

    else:
        raise ValueError(f"cluster.method: unknown method '{method}' (weighted or repeat)")
    pref = weighted_percentile(s, weights, preference_percentile) if len(weights) > 1 else 0.0
    result = run(pref)
    result.extra["percentile"] = preference_percentile
    if not n_clusters_hint or len(weights) < 2:
        return result
    lo, hi = 4.0 * float(s.min()), 0.0  # preference bounds: one cluster ... every point its own
    best = result
    tried = [(pref, result.n_clusters)]
    for _ in range(16):
        if result.n_clusters == n_clusters_hint:
            break
        if result.n_clusters < n_clusters_hint:
            lo = pref
        else:
            hi = pref
        pref = (lo + hi) / 2
        result = run(pref)
        result.extra["percentile"] = None
        tried.append((pref, result.n_clusters))
        if abs(result.n_clusters - n_clusters_hint) < abs(best.n_clusters - n_clusters_hint):
            best = result
    best.extra["search"] = tried
    return best
