"""The rank score of response tokens, vectorised over many positions at once.

For each scored position (the logits just before a response token ``t``): ``p = softmax(logits)``;
sort ``p`` descending (ties in vocabulary order); the nucleus size ``n`` is the number of sorted
tokens whose cumulative probability is ``< top_p``, plus one; the token's score is its 0-based rank
over ``n`` when ``t`` lies within the first ``n``, else 1.0. Higher = harder.

Nothing here sorts a whole vocabulary per token: the rank is a count of larger probabilities, and the
nucleus size comes from the top-k of each row, widening k only for the rows whose nucleus is wider
(a full sort is the last resort, for rows whose nucleus spans most of the vocabulary). Cumulative
probabilities are summed in float64 so the nucleus edge does not depend on summation order.
"""

from __future__ import annotations

import os

import numpy as np
import torch

# Row chunk: keeps the [rows, vocab] temporaries cache-sized (measured: 64 rows of a 32k vocabulary
# run at half the time per row of 1024-row chunks).
CHUNK_ELEMENTS = 64 * 32768
TOPK_STEPS = (64,)


def nucleus_sizes(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus size per row: 1 + the number of sorted probabilities whose running sum is < top_p.

    Peaked rows are settled by a top-k; the others by a radix select on the float bits of the
    probabilities (non-negative floats order like their bit patterns): bucket masses locate the bucket
    where the running sum crosses top_p, and only that bucket's members go on to the next bits.
    """
    rows, vocab = probs.shape
    sizes = torch.full((rows,), -1, dtype=torch.long, device=probs.device)
    k = TOPK_STEPS[0]
    if k < vocab:
        top = torch.topk(probs, k, dim=-1, sorted=True).values
        cum = top.double().cumsum(-1)
        found = cum[:, -1] >= top_p  # the edge lies inside these k
        sizes[found] = (cum[found] < top_p).sum(-1) + 1
        todo = torch.nonzero(~found).flatten()
    else:
        todo = torch.arange(rows, device=probs.device)
    if todo.numel():
        sizes[todo] = _radix_nucleus(probs[todo].contiguous(), top_p)
    return sizes


RADIX_PASSES = ((20, 11), (8, 12), (0, 8))  # (shift, bits): 31 bits of a non-negative float32


def _boundary(
    mass: torch.Tensor, count: torch.Tensor, mass_above: torch.Tensor, top_p: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the first bucket (in descending order) where the running sum reaches top_p, and the
    mass and count of the buckets before it (added to those carried from earlier passes)."""
    rows, buckets = mass.shape
    row_ids = torch.arange(rows, device=mass.device)
    cmass, ccount = mass.cumsum(1), count.cumsum(1)
    j = ((mass_above[:, None] + cmass) < top_p).sum(1).clamp(max=buckets - 1)
    prev = (j - 1).clamp(min=0)
    mass_before = torch.where(j > 0, cmass[row_ids, prev], 0.0)
    count_before = torch.where(j > 0, ccount[row_ids, prev].long(), 0)
    return j, mass_before, count_before


def _radix_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    rows, vocab = probs.shape
    dev = probs.device
    bits = probs.float().view(torch.int32)
    # pass 1 over whole rows (2-D scatters parallelise over rows)
    shift, width = RADIX_PASSES[0]
    top = (1 << width) - 1
    key = (bits >> shift).long()
    mass = torch.zeros(rows, top + 1, dtype=torch.float64, device=dev).scatter_add_(1, key, probs.double())
    ones = torch.ones(1, dtype=torch.int32, device=dev).expand(rows, vocab)
    count = torch.zeros(rows, top + 1, dtype=torch.int32, device=dev).scatter_add_(1, key, ones)
    whole = mass.sum(1) < top_p  # the whole row sums to less than top_p
    mass_above = torch.zeros(rows, dtype=torch.float64, device=dev)
    j, mass_above, n_above = _boundary(mass.flip(1), count.flip(1), mass_above, top_p)  # descending
    value_bits = (top - j).to(torch.int32) << shift
    m_row, m_col = torch.nonzero(key == (top - j)[:, None], as_tuple=True)
    m_bits = bits[m_row, m_col]
    m_p = probs[m_row, m_col].double()
    # later passes over the members of the boundary bucket only (flattened)
    for shift, width in RADIX_PASSES[1:]:
        top = (1 << width) - 1
        desc = (top - ((m_bits >> shift) & top)).long()
        flat = m_row * (top + 1) + desc
        mass = torch.zeros(rows * (top + 1), dtype=torch.float64, device=dev).scatter_add_(0, flat, m_p)
        count = torch.zeros(rows * (top + 1), dtype=torch.long, device=dev).scatter_add_(
            0, flat, torch.ones_like(flat)
        )
        j, before, count_before = _boundary(mass.view(rows, -1), count.view(rows, -1), mass_above, top_p)
        mass_above, n_above = mass_above + before, n_above + count_before
        value_bits = value_bits | ((top - j).to(torch.int32) << shift)
        keep = desc == j[m_row]
        m_row, m_bits, m_p = m_row[keep], m_bits[keep], m_p[keep]
    # every member left has the same bits, so the same value v: count how many of the running sums
    # mass_above + v, mass_above + 2v, ... stay below top_p
    members = torch.zeros(rows, dtype=torch.long, device=dev).scatter_add_(0, m_row, torch.ones_like(m_row))
    value = value_bits.view(torch.float32).double()
    inside = torch.ceil((top_p - mass_above) / value.clamp(min=1e-300)) - 1
    inside = torch.minimum(inside.clamp(min=0).long(), members)
    sizes = n_above + inside + 1
    return torch.where(whole, torch.full_like(sizes, vocab), sizes.clamp(max=vocab))


def ranks_of_targets(probs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of each row's target in a descending stable sort of the row, and its probability."""
    p_t = probs.gather(1, targets[:, None])
    greater = (probs > p_t).sum(-1)
    tied = (probs == p_t).sum(-1)
    rank = greater
    multi = torch.nonzero(tied > 1).flatten()
    if multi.numel():  # equal probabilities: the stable sort puts lower token ids first
        sub = probs[multi]
        ids = torch.arange(probs.shape[1], device=probs.device)
        before = ((sub == p_t[multi]) & (ids[None, :] < targets[multi, None])).sum(-1)
        rank = rank.clone()
        rank[multi] += before
    return rank, p_t.squeeze(1)


def _cpu_kernel():
    """The compiled CPU kernel, or None when numba is missing or COMPEFF_RANK_KERNEL=torch."""
    if os.environ.get("COMPEFF_RANK_KERNEL", "auto") == "torch":
        return None
    try:
        from compeff.select.rank_kernel import score_rows
    except ImportError:  # pragma: no cover - numba is a dependency, but stay usable without it
        return None
    return score_rows


def token_scores(
    logits: torch.Tensor, targets: torch.Tensor, top_p: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank score and negative log-likelihood of each target given the logits before it.

    ``logits`` is [N, vocab] (any float dtype), ``targets`` [N]. Returns two float64 tensors of [N].
    float32 / bfloat16 / float16 logits are scored from float32 probabilities: on a CPU by the compiled
    kernel (:mod:`compeff.select.rank_kernel`), on a GPU (or with ``COMPEFF_RANK_KERNEL=torch``) by the
    torch code below; both equal :mod:`compeff.select.reference` on the same float32 probabilities, and
    differ from a float64 computation by about 1e-6 where a nucleus edge falls between two nearly equal
    probabilities. float64 logits (a float64 scorer) are scored in float64 throughout, and then agree
    with the reference to 1e-9.
    """
    if logits.dtype == torch.float64:  # a float64 scorer: exact to the definition in float64
        return _float64_scores(logits, targets, top_p)
    kernel = _cpu_kernel() if logits.device.type == "cpu" else None
    n, vocab = logits.shape
    scores = torch.empty(n, dtype=torch.float64, device=logits.device)
    nll = torch.empty(n, dtype=torch.float64, device=logits.device)
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, step):
        x = logits[start : start + step].float()
        t = targets[start : start + step]
        probs = torch.softmax(x, dim=-1)
        if kernel is not None:
            out = np.empty(probs.shape[0], dtype=np.float64)
            kernel(probs.contiguous().numpy(), t.numpy().astype(np.int64), float(top_p), out)
            scores[start : start + step] = torch.from_numpy(out)
            p_t = probs.gather(1, t[:, None]).squeeze(1)
            nll[start : start + step] = _nll(x, t, p_t)
            continue
        rank, p_t = ranks_of_targets(probs, t)
        nll[start : start + step] = _nll(x, t, p_t)
        score = torch.ones(rank.shape, dtype=torch.float64, device=logits.device)
        score[rank == 0] = 0.0
        need = torch.nonzero(rank > 0).flatten()
        if need.numel():
            sizes = nucleus_sizes(probs[need], top_p)
            r = rank[need]
            inside = r < sizes
            score[need[inside]] = r[inside].double() / sizes[inside].double()
        scores[start : start + step] = score
    return scores, nll


def _float64_scores(
    logits: torch.Tensor, targets: torch.Tensor, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank scores and NLL from float64 probabilities, a stable descending sort per row chunk (batched
    in torch: the float64 path is for exact checks and small vocabularies, not for speed)."""
    n, vocab = logits.shape
    scores = torch.empty(n, dtype=torch.float64, device=logits.device)
    nll = torch.empty(n, dtype=torch.float64, device=logits.device)
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, step):
        x = logits[start : start + step]
        t = targets[start : start + step]
        probs = torch.softmax(x, dim=-1)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        sizes = ((sorted_probs.cumsum(-1) < top_p).sum(-1) + 1).clamp(max=vocab)
        rank = (order == t[:, None]).int().argmax(-1)
        score = torch.where(
            rank < sizes, rank.double() / sizes.double(), torch.ones_like(rank, dtype=torch.float64)
        )
        scores[start : start + step] = score
        nll[start : start + step] = _nll(x, t, probs.gather(1, t[:, None]).squeeze(1))
    return scores, nll


def _nll(x: torch.Tensor, targets: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """-log p(target) in float64, from the probability, or from log-sum-exp where it underflowed."""
    nll = -torch.log(p_t.double())
    tiny = torch.nonzero(p_t < 1e-30).flatten()
    if tiny.numel():
        xs = x[tiny]
        nll[tiny] = (torch.logsumexp(xs, -1) - xs.gather(1, targets[tiny, None]).squeeze(1)).double()
    return nll


def rho(scores: torch.Tensor, exclude_argmax: bool = True, threshold: float = 1e-6) -> tuple[float, int]:
    """Mean token score of one response (the paper's rho) and how many tokens entered the mean.

    With ``exclude_argmax`` (the paper's rule) tokens scoring <= threshold - the model's top choice -
    are left out; 0.0 when nothing remains.
    """
    kept = scores[scores > threshold] if exclude_argmax else scores
    if kept.numel() == 0:
        return 0.0, 0
    return float(kept.mean()), int(kept.numel())
