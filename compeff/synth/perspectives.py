"""Perspectives: embed attribute names and group them with frequency-weighted affinity propagation.

The paper repeats each attribute's embedding ``int(log1p(count))`` extra times before affinity
propagation, so the similarity matrix grows with the square of the total repeats. Here the copies
are folded into the messages instead: a point of multiplicity m stands for m identical copies, and
the responsibilities and availabilities between copies are computed in closed form (copies of one
point exchange the same messages by symmetry). Memory then grows with the number of distinct
attributes only, and the message passing is the same as on the repeated matrix.

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

    Same updates, damping and stopping rule as scikit-learn's ``affinity_propagation`` run on the
    repeated matrix (minus its tie-breaking noise), with O(n^2) memory in distinct points.
    """
    n = s.shape[0]
    m = np.asarray(weights, dtype=np.float64)
    if n == 0:
        return APResult(np.zeros(0, dtype=int), np.zeros(0, dtype=int), 0, True, preference)
    S = np.array(s, dtype=np.float64, copy=True)
    np.fill_diagonal(S, preference)
    if n == 1:
        return APResult(np.zeros(1, dtype=int), np.zeros(1, dtype=int), 0, True, preference)
    R = np.zeros((n, n))
    A = np.zeros((n, n))
    tmp = np.empty((n, n))
    r_sib = np.zeros(n)  # responsibility from a copy to a sibling copy (same point)
    a_sib = np.zeros(n)  # availability of a sibling copy to a copy
    has_sib = m >= 2
    sib_count = m - 1
    ind = np.arange(n)
    diag = np.diag_indices(n)
    col_count = np.broadcast_to(m, (n, n))  # entry (i, k) stands for m_k candidate copies
    history = np.zeros((n, convergence_iter), dtype=bool)
    converged = False
    it = 0
    for it in range(max_iter):
        # ---- responsibilities: r(i,k) = s(i,k) - max over the other candidates of a + s
        np.add(A, S, tmp)
        sib_val = np.where(has_sib, a_sib, -np.inf)  # sibling candidates: a_sib + s(copy, copy) = a_sib + 0
        top = np.argmax(tmp, axis=1)
        y1 = tmp[ind, top]
        tmp[ind, top] = -np.inf
        y2 = np.max(tmp, axis=1)
        sib_top = sib_val > y1
        v1 = np.where(sib_top, sib_val, y1)
        v2 = np.where(sib_top, y1, np.maximum(y2, sib_val))
        top_count = np.where(sib_top, sib_count, np.where(top == ind, 1.0, col_count[ind, top]))
        without_top = np.where(
            top_count >= 2, v1, v2
        )  # the max once one copy of the top candidate is left out
        np.subtract(S, v1[:, None], tmp)
        rows = ind[~sib_top]
        tmp[rows, top[rows]] = S[rows, top[rows]] - without_top[rows]
        new_r_sib = -np.where(sib_top, without_top, v1)
        tmp *= 1 - damping
        R *= damping
        R += tmp
        r_sib = damping * r_sib + (1 - damping) * new_r_sib

        # ---- availabilities
        r_kk = R[diag].copy()
        np.maximum(R, 0, out=tmp)
        tmp[diag] = 0.0
        pos_sum = m @ tmp  # P(k) = sum over other points j of m_j * max(0, r(j, k))
        r_sib_pos = np.where(has_sib, np.maximum(r_sib, 0.0), 0.0)
        base = r_kk + pos_sum + (m - 1) * r_sib_pos
        np.subtract(base[None, :], tmp, out=tmp)
        np.minimum(tmp, 0.0, out=tmp)
        tmp[diag] = pos_sum + (m - 1) * r_sib_pos
        new_a_sib = np.minimum(0.0, r_kk + pos_sum + (m - 2) * r_sib_pos)
        tmp *= 1 - damping
        A *= damping
        A += tmp
        a_sib = damping * a_sib + (1 - damping) * new_a_sib

        # ---- stopping rule (as scikit-learn: exemplar set unchanged for convergence_iter rounds)
        exemplar = (A[diag] + R[diag]) > 0
        history[:, it % convergence_iter] = exemplar
        k = int(exemplar.sum())
        if it >= convergence_iter:
            stable = history.sum(axis=1)
            unconverged = np.sum((stable == convergence_iter) + (stable == 0)) != n
            if not unconverged and k > 0:
                converged = True
                break
    raw_exemplars = np.flatnonzero((A[diag] + R[diag]) > 0)
    labels, exemplars = _assign(S, m, raw_exemplars)
    return APResult(
        labels, exemplars, it + 1, converged, preference, extra={"message_exemplars": raw_exemplars.tolist()}
    )


def _assign(S: np.ndarray, m: np.ndarray, exemplars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels from the message exemplars, as scikit-learn assigns them on the repeated matrix.

    Nearest exemplar first; then each cluster's exemplar moves to its medoid (follower copies weigh
    m_g, the exemplar's own cluster holds one of its copies); then nearest again, where the other
    copies of a multi-copy exemplar are still candidates (scikit-learn keeps them as exemplars).
    -1 for all when there is no exemplar.
    """
    n = S.shape[0]
    if exemplars.size == 0:
        return np.full(n, -1), exemplars
    c = np.argmax(S[:, exemplars], axis=1)
    c[exemplars] = np.arange(exemplars.size)
    pref = S[0, 0]
    medoids = exemplars.copy()
    for k, e in enumerate(exemplars):
        members = np.flatnonzero(c == k)
        w = m[members].copy()
        w[members == e] = 1.0
        block = S[np.ix_(members, members)] * w[:, None]
        np.fill_diagonal(block, pref)  # one copy of a candidate is itself; its siblings are at distance 0
        medoids[k] = members[np.argmax(block.sum(axis=0))]
    candidates = np.unique(np.concatenate([medoids, exemplars[m[exemplars] >= 2]]))
    c = np.argmax(S[:, candidates], axis=1)
    c[candidates] = np.arange(candidates.size)
    labels = candidates[c]
    centers = np.unique(labels)
    return np.searchsorted(centers, labels), centers


def repeat_affinity_propagation(
    x: np.ndarray,
    weights: np.ndarray,
    preference_percentile: float,
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
    preference = float(np.percentile(s_rep, preference_percentile))
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

    With ``n_clusters_hint`` the preference percentile is searched (bisection) so the number of
    clusters lands near the target; the result closest to it is returned.
    """
    weights = multiplicities(counts)
    if method == "repeat":

        def run(q: float) -> APResult:
            return repeat_affinity_propagation(embeddings, weights, q, damping, max_iter, seed)

    elif method == "weighted":
        s = neg_sq_distances(embeddings)

        def run(q: float) -> APResult:
            pref = weighted_percentile(s, weights, q)
            return weighted_affinity_propagation(s, weights, pref, damping, max_iter)

    else:
        raise ValueError(f"cluster.method: unknown method '{method}' (weighted or repeat)")
    if not n_clusters_hint:
        result = run(preference_percentile)
        result.extra["percentile"] = preference_percentile
        return result
    lo, hi = 0.0, 100.0
    best: APResult | None = None
    tried = []
    for _ in range(12):
        q = (lo + hi) / 2 if best is not None else preference_percentile
        result = run(q)
        result.extra["percentile"] = q
        tried.append((q, result.n_clusters))
        if best is None or abs(result.n_clusters - n_clusters_hint) < abs(best.n_clusters - n_clusters_hint):
            best = result
        if result.n_clusters == n_clusters_hint:
            break
        if result.n_clusters < n_clusters_hint:
            lo = q
        else:
            hi = q
    assert best is not None
    best.extra["search"] = tried
    return best
