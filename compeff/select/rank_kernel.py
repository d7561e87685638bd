"""Compiled CPU kernel of the rank score (numba): a pass per row for the rank, one for a histogram.

On a CPU the torch path needs a dozen passes over each [vocab] row (compares, scatters, casts); this
kernel reads a row once to get the target's rank (strictly larger probabilities, plus equal ones at
lower token ids, as a stable sort orders them) and a histogram of probability mass and counts over
the top 11 bits of each float (exponent and 3 mantissa bits: non-negative floats order like their
bits). The bucket where the running mass crosses top_p is then read again, its members sorted (a
second histogram level first when it is crowded), and the nucleus size counted. The probabilities
come from torch's softmax, so they are bit-identical to the reference's.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

LEVEL1_SHIFT = 20  # 2048 buckets: sign (always 0), 8 exponent bits, 3 mantissa bits
LEVEL2_SHIFT = 8  # the next 12 bits, for crowded boundary buckets
CROWDED = 2048


@njit(cache=True, nogil=True)
def _count_inside(members, mass_above, top_p):
    """How many of the sorted-descending running sums, started at mass_above, stay below top_p."""
    sorted_members = np.sort(members)
    inside = 0
    cum = mass_above
    for j in range(sorted_members.shape[0] - 1, -1, -1):
        cum += sorted_members[j]
        if cum < top_p:
            inside += 1
        else:
            break
    return inside


@njit(cache=True, nogil=True)
def _boundary(hist_m, hist_c, buckets, mass_above, n_above, top_p):
    """From the top bucket down, the first whose mass takes the running sum to top_p (-1: none), and
    the mass and count of the buckets above it."""
    for key in range(buckets - 1, -1, -1):
        if mass_above + hist_m[key] >= top_p:
            return key, mass_above, n_above
        mass_above += hist_m[key]
        n_above += hist_c[key]
    return -1, mass_above, n_above


@njit(cache=True, nogil=True)
def _score_row(row, bits, target, top_p, hist_m, hist_c, scratch, scratch2):
    vocab = row.shape[0]
    p_t = row[target]
    rank = 0
    for k in range(vocab):  # branch-free, so it vectorises
        x = row[k]
        rank += (x > p_t) | ((x == p_t) & (k < target))
    if rank == 0:
        return 0.0
    hist_m[:2048] = 0.0
    hist_c[:2048] = 0
    for k in range(vocab):
        key = bits[k] >> LEVEL1_SHIFT
        hist_m[key] += row[k]
        hist_c[key] += 1
    boundary, mass_above, n_above = _boundary(hist_m, hist_c, 2048, 0.0, 0, top_p)
    if boundary < 0:  # the whole row sums to less than top_p
        size = vocab
    else:
        m = 0
        for k in range(vocab):
            if (bits[k] >> LEVEL1_SHIFT) == boundary:
                scratch[m] = row[k]
                m += 1
        if m > CROWDED:  # split the crowded bucket on the next 12 bits before sorting
            members = scratch[:m]
            member_bits = members.view(np.int32)
            hist_m[:4096] = 0.0
            hist_c[:4096] = 0
            for j in range(m):
                key = (member_bits[j] >> LEVEL2_SHIFT) & 4095
                hist_m[key] += members[j]
                hist_c[key] += 1
            sub, mass_above, n_above = _boundary(hist_m, hist_c, 4096, mass_above, n_above, top_p)
            m2 = 0
            for j in range(m):
                if ((member_bits[j] >> LEVEL2_SHIFT) & 4095) == sub:
                    scratch2[m2] = members[j]
                    m2 += 1
            size = n_above + _count_inside(scratch2[:m2], mass_above, top_p) + 1
        else:
            size = n_above + _count_inside(scratch[:m], mass_above, top_p) + 1
        size = min(size, vocab)
    return rank / size if rank < size else 1.0


@njit(parallel=True, cache=True)
def score_rows(probs, targets, top_p, scores):
    """Rank score of each row's target into ``scores`` (probs: float32 [N, V] C-contiguous)."""
    n_rows, vocab = probs.shape
    bits = probs.view(np.int32)
    for i in prange(n_rows):
        hist_m = np.empty(4096, dtype=np.float64)
        hist_c = np.empty(4096, dtype=np.int32)
        scratch = np.empty(vocab, dtype=np.float32)
        scratch2 = np.empty(vocab, dtype=np.float32)
        scores[i] = _score_row(probs[i], bits[i], targets[i], top_p, hist_m, hist_c, scratch, scratch2)
