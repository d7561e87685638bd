"""Black-box soft labels from an LLM teacher: label-word probabilities, normalised over the label set.

The label words must be single, distinct tokens in the teacher's tokenizer (seed 002 found multi-token
label words silently scoring only their first piece); a violation is refused with a message. A local
model is read from its logits; a served one (OpenAI-compatible) from its top log-probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from compeff.evaluate.classification import EvalError, render_prompt


def check_single_tokens(tokenizer: Any, label_names: Sequence[str], leading_space: bool = True) -> list[int]:
    """Token id of each label word, refusing words that take several tokens or share one."""
    ids = []
    for name in label_names:
        tokens = tokenizer((" " if leading_space else "") + name, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            pieces = [tokenizer.decode([t]) for t in tokens]
            raise EvalError(
                f"label word {name!r} is {len(tokens)} tokens in the teacher's tokenizer ({pieces}); soft labels "
                "need single-token label words - choose other words"
            )
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise EvalError(f"label words {list(label_names)} do not map to distinct tokens")
    return ids


def normalise(scores: np.ndarray) -> np.ndarray:
    """Softmax of label-word log-scores over the label set (-inf: not offered; a row with none: uniform)."""
    scores = np.asarray(scores, dtype=np.float64)
    masked = np.where(np.isfinite(scores), scores, -np.inf)
    top = masked.max(axis=1, keepdims=True)
    empty = ~np.isfinite(top[:, 0])
    e = np.exp(masked - np.where(np.isfinite(top), top, 0.0))
    out = e / np.where(e.sum(axis=1, keepdims=True) > 0, e.sum(axis=1, keepdims=True), 1.0)
    out[empty] = 1.0 / scores.shape[1]
    return out


def local_llm_soft_labels(
    scorer: Any, texts: Sequence[str], label_names: Sequence[str], max_chars: int = 1000
) -> np.ndarray:
    """Label distributions of a local causal LM (an :class:`HFLabelScorer`) for zero-shot prompts."""
    ids = check_single_tokens(scorer.tokenizer, label_names, leading_space=not scorer.chat_template)
    prompts = [render_prompt(t, [], label_names, max_chars) for t in texts]
    logits = scorer.next_token_logits(prompts)[:, ids]
    return normalise(logits)


def served_llm_soft_labels(
    recipe: Any, texts: Sequence[str], label_names: Sequence[str], max_chars: int = 1000
) -> np.ndarray:
    """Label distributions of the recipe's served teacher (openai backend) from top log-probabilities."""
    from compeff.evaluate.eval_stage import served_predictions

    prompts = [render_prompt(t, [], label_names, max_chars) for t in texts]
    _, scores, _ = served_predictions(recipe, prompts, list(label_names), "soft")
    return normalise(scores)


def llm_soft_labels(recipe: Any, texts: Sequence[str], label_names: Sequence[str]) -> np.ndarray:
    """Soft labels of the recipe's teacher LLM (``teacher`` section): local (hf) or served (openai)."""
    from compeff.evaluate.classification import HFLabelScorer

    if recipe.teacher.backend == "openai":
        return served_llm_soft_labels(recipe, texts, label_names)
    if recipe.teacher.backend != "hf":
        raise EvalError("kd.soft_labels: llm reads the teacher through the hf or openai backend")
    scorer = HFLabelScorer(recipe.teacher.model, device=recipe.teacher.device)
    return local_llm_soft_labels(scorer, texts, label_names)
