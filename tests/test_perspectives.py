"""Frequency-weighted affinity propagation: equal to affinity propagation on repeated points,
and it groups real MiniLM embeddings of obviously related attribute names."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from compeff.config import EmbedderSettings
from compeff.embeddings import embed_texts
from compeff.synth.perspectives import (
    cluster_attributes,
    multiplicities,
    neg_sq_distances,
    weighted_affinity_propagation,
    weighted_percentile,
)


def repeated_ap_reference(s_rep: np.ndarray, damping: float, max_iter: int = 1000, conv: int = 15):
    """Textbook affinity propagation on a full (repeated) matrix, written out here independently
    (scikit-learn's update order, without its tie-breaking noise). Returns exemplar flags and iterations."""
    n = s_rep.shape[0]
    r = np.zeros((n, n))
    a = np.zeros((n, n))
    rows = np.arange(n)
    history = np.zeros((n, conv), dtype=bool)
    flags = np.zeros(n, dtype=bool)
    for it in range(max_iter):
        as_ = a + s_rep
        best = as_.argmax(axis=1)
        first = as_[rows, best]
        as_[rows, best] = -np.inf
        second = as_.max(axis=1)
        new_r = s_rep - first[:, None]
        new_r[rows, best] = s_rep[rows, best] - second
        r = damping * r + (1 - damping) * new_r
        rp = np.maximum(r, 0)
        np.fill_diagonal(rp, np.diag(r))
        col = rp.sum(axis=0)
        new_a = np.minimum(0, col[None, :] - rp)
        np.fill_diagonal(new_a, col - np.diag(r))
        a = damping * a + (1 - damping) * new_a
        flags = (np.diag(a) + np.diag(r)) > 0
        history[:, it % conv] = flags
        if it >= conv:
            stable = history.sum(axis=1)
            if np.sum((stable == conv) | (stable == 0)) == n and flags.any():
                return flags, it + 1
    return flags, max_iter


def blobs(seed: int, n: int = 50):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(5, 6))
    x = centers[rng.integers(0, 5, n)] + 0.45 * rng.normal(size=(n, 6))
    counts = rng.zipf(1.6, n).clip(1, 3000)
    return x, counts


@pytest.mark.parametrize("q", [0.5, 5.0, 37.0, 90.0])
def test_weighted_percentile_equals_percentile_of_repeated_matrix(q):
    x, counts = blobs(1, 30)
    w = multiplicities(counts)
    rep = neg_sq_distances(np.repeat(x, w, axis=0))
    assert weighted_percentile(neg_sq_distances(x), w, q) == pytest.approx(
        np.percentile(rep, q), rel=1e-12, abs=1e-12
    )


def test_multiplicities_follow_the_paper():
    assert multiplicities([1, 10, 13000]).tolist() == [1, 3, 10]  # 1 + int(log1p(count))


@pytest.mark.parametrize("seed", [0, 2, 5, 8])
def test_weighted_messages_equal_repeated_messages(seed):
    x, counts = blobs(seed)
    w = multiplicities(counts)
    s = neg_sq_distances(x)
    pref = weighted_percentile(s, w, 10.0)
    owner = np.repeat(np.arange(len(w)), w)
    leader = np.r_[True, owner[1:] != owner[:-1]]
    s_rep = neg_sq_distances(x[owner])
    np.fill_diagonal(s_rep, pref)
    s_rep[:, ~leader] = -1e100  # follower copies send and receive messages but are never chosen
    flags, iters = repeated_ap_reference(s_rep, damping=0.9)
    got = weighted_affinity_propagation(s, w, pref, damping=0.9)
    assert got.converged and got.n_iter == iters
    assert not flags[~leader].any()
    assert sorted(got.extra["message_exemplars"]) == sorted(owner[flags].tolist())


def test_unit_weights_match_scikit_learn():
    from sklearn.cluster import AffinityPropagation

    x, _ = blobs(3, 40)
    s = neg_sq_distances(x)
    pref = float(np.percentile(s, 5))
    ours = weighted_affinity_propagation(s, np.ones(40), pref, damping=0.9)
    ref = AffinityPropagation(affinity="precomputed", preference=pref, damping=0.9, random_state=0).fit(s)
    assert adjusted_rand_score(ref.labels_, ours.labels) == pytest.approx(1.0)
    assert sorted(ours.exemplars.tolist()) == sorted(ref.cluster_centers_indices_.tolist())


GROUPS = {
    "tone": ["tone", "tone of voice", "language tone"],
    "irony": ["sarcasm", "irony", "sarcastic remarks"],
    "rating": ["rating", "score", "star rating"],
}


@pytest.fixture(scope="module")
def obvious():
    names = [n for members in GROUPS.values() for n in members]
    truth = [g for g, members in enumerate(GROUPS.values()) for _ in members]
    emb = embed_texts(names, EmbedderSettings())  # the shipped all-MiniLM-L6-v2
    counts = [500, 40, 12, 300, 200, 15, 90, 60, 20]
    return names, truth, emb, counts


def test_minilm_groups_obvious_attributes(obvious):
    names, truth, emb, counts = obvious
    assert emb.shape == (9, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3)
    result = cluster_attributes(emb, counts, n_clusters_hint=3)
    assert result.n_clusters == 3
    assert adjusted_rand_score(truth, result.labels) == pytest.approx(1.0), dict(zip(names, result.labels))


def test_cls_pooling_option_gives_normalised_vectors():
    settings = EmbedderSettings(pooling="cls")
    cls = embed_texts(["tone", "irony"], settings)
    mean = embed_texts(["tone", "irony"], EmbedderSettings())
    assert cls.shape == (2, 384) and np.allclose(np.linalg.norm(cls, axis=1), 1.0, atol=1e-3)
    assert not np.allclose(cls, mean)  # a different pooling, not the shipped mean pooling
