"""Which decoder layers a cut student keeps: how much each dropped block changes the residual stream.

Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers") drop the ``n`` consecutive
layers ``l .. l+n-1`` whose input and output hidden states are closest in angle: the angular distance
``arccos(cos(h_l, h_{l+n})) / pi`` at each text's last token, averaged over texts. This module measures
that distance for every pair of depths in one forward pass per batch and picks the block; ``compeff bench
cut`` reads it next to what each cut learns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def angular_distances(
    model_path: str,
    texts: Sequence[str],
    max_length: int = 256,
    batch_size: int = 8,
    device: str = "auto",
) -> np.ndarray:
    """Mean angular distance (0 = same direction, 1 = opposite) between the hidden states entering
    depths ``a`` and ``b`` (``a <= b``; depth ``L`` is after the last layer) at each
    text's last token: an ``(L + 1, L + 1)`` upper-triangular array. Depth ``L`` is the last layer's
    output before the final norm, so every depth is the same residual stream. Runs on this process's GPU when
    one is visible (``device: auto``), in float32 either way (GPU and CPU kernels still differ in the last
    digits, so only a near tie between two blocks could be chosen differently)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compeff.loading import local_device

    if not texts:
        raise ValueError("angular distances need at least one text")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"  # the last position is every row's last token
    tokenizer.truncation_side = "left"  # and a long text keeps its end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = model.to(local_device(device)).eval()
    depth = model.config.num_hidden_layers
    total = np.zeros((depth + 1, depth + 1))
    # transformers' last hidden state is after the final norm; depth L is the last layer's own output
    last_layer_out: list[Any] = []
    hook = model.model.layers[-1].register_forward_hook(
        lambda _module, _inputs, out: last_layer_out.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        total = _summed_distances(model, tokenizer, texts, max_length, batch_size, last_layer_out, total)
    finally:
        hook.remove()
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # a vLLM engine or trainer later in this process sees the memory free
    distances = np.triu(total / len(texts))
    np.fill_diagonal(distances, 0.0)  # a depth against itself: 0, not arccos's rounding noise near 1
    return distances


def _summed_distances(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    batch_size: int,
    last_layer_out: list[Any],
    total: np.ndarray,
) -> np.ndarray:
    """The angular distances of every depth pair, summed over ``texts`` (batched forward passes)."""
    import torch

    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            batch = batch.to(model.device)
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding: not shifted
            last_layer_out.clear()
            states = model(**batch, position_ids=positions, output_hidden_states=True).hidden_states
            states = (*states[:-1], last_layer_out[-1])
            last = torch.nn.functional.normalize(torch.stack([h[:, -1].double() for h in states]), dim=-1)
            cosine = torch.einsum("atd,btd->abt", last, last).clamp(-1.0, 1.0)
            total += (torch.arccos(cosine) / math.pi).sum(-1).cpu().numpy()
    return total


def dropped_blocks(keep_layers: Sequence[int], depth: int) -> list[tuple[int, int]]:
    """The maximal runs of consecutive layers a cut drops, as ``(first, end)`` with ``end`` exclusive."""
    kept = set(keep_layers)
    blocks, start = [], None
    for layer in range(depth + 1):
        if layer < depth and layer not in kept:
            start = layer if start is None else start
        elif start is not None:
            blocks.append((start, layer))
            start = None
    return blocks


def cut_distance(distances: np.ndarray, keep_layers: Sequence[int]) -> float:
    """How far a cut moves the residual stream: the sum, over the blocks it drops, of the angular distance
    between a block's input and output (0 for a cut that drops nothing)."""
    depth = distances.shape[0] - 1
    return float(sum(distances[a, b] for a, b in dropped_blocks(keep_layers, depth)))


def closest_block_cut(distances: np.ndarray, n_keep: int) -> list[int]:
    """The layers to keep when dropping the one block of ``depth - n_keep`` consecutive layers whose
    removal changes the residual stream least (Gromov et al.; the first such block on a tie)."""
    depth = distances.shape[0] - 1
    if not 0 < n_keep <= depth:
        raise ValueError(f"keep 1..{depth} of {depth} layers, not {n_keep}")
    n_drop = depth - n_keep
    start = min(range(depth - n_drop + 1), key=lambda s: (distances[s, s + n_drop], s))
    return [layer for layer in range(depth) if not start <= layer < start + n_drop]
