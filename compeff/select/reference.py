"""A deliberately plain implementation of the rank score: one sample and one token at a time.

It transcribes the definition line by line (full sort of the vocabulary per token) so that the fast
path in :mod:`compeff.select.rank` can be checked against it and timed against it
(``compeff bench score``). Not for production use.
"""

from __future__ import annotations

from typing import Any

from compeff.select.layout import Example


def reference_token_score(logits_row: Any, target: int, top_p: float) -> float:
    """The rank score of one token from the logits at the position before it."""
    import torch

    probs = torch.softmax(logits_row if logits_row.dtype == torch.float64 else logits_row.float(), dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
    cumulative = sorted_probs.double().cumsum(0)
    nucleus = int((cumulative < top_p).sum()) + 1
    nucleus = min(nucleus, probs.numel())
    rank = int((order == target).nonzero()[0, 0])
    return rank / nucleus if rank < nucleus else 1.0


def reference_rho(model: Any, example: Example, top_p: float = 0.95, exclude_argmax: bool = True) -> float:
    """rho of one tokenised sample: an unpadded forward pass, then a loop over its response tokens."""
    import torch

    ids = torch.tensor([example.input_ids], dtype=torch.long, device=next(model.parameters()).device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0]
    scores = []
    for pos in example.positions:
        score = reference_token_score(logits[pos - 1], int(ids[0, pos]), top_p)
        if exclude_argmax and score <= 1e-6:
            continue
        scores.append(score)
    return sum(scores) / len(scores) if scores else 0.0
