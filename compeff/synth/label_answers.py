"""Closed tasks answered as label distributions, not sampled text.

For a task with a label set the teacher is asked for one token with its top-20 log-probabilities
(greedy); the evidence for each label is the probability mass of the first tokens of all its spellings,
computed by the ruler's own function (:func:`compeff.evaluate.classification.label_log_mass`) so the
teacher's labels in the distillation set and its score in ``compeff eval`` follow the same arithmetic.
The record keeps the most likely label as the assistant's answer and the whole distribution
(``label_probs``), which ``sft.loss: kd`` learns as soft labels; the top label's probability
(``teacher_confidence``) is a free quality signal (``generate.min_confidence``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compeff.evaluate.classification import (
    label_distribution,
    label_log_mass,
    label_owners,
    local_first_tokens,
)
from compeff.teachers import SamplingParams, TeacherResult
from compeff.teaching import AnswerRejected

TOP_K = 20  # what OpenAI-compatible servers (vLLM's default cap) give


def label_params() -> SamplingParams:
    """One greedy token with its top-k alternatives: all a label distribution needs."""
    return SamplingParams(temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=TOP_K)


class LabelReader:
    """Reads a teacher's answer to a closed task as a distribution over its labels. Local backends
    report token ids (matched against the teacher's tokenizer); a server reports token text (matched
    against its own tokenizer's pieces, asked once per label set)."""

    def __init__(self, recipe: Any):
        self.recipe = recipe
        self.served = recipe.teacher.backend == "openai"
        self._owners: dict[tuple[str, ...], dict[Any, int] | None] = {}
        self._tokenizer = None
        if not self.served:
            from transformers import AutoTokenizer

            from compeff.models import resolve_model

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(recipe.teacher.model))

    def owners(self, labels: list[str]) -> dict[Any, int] | None:
        """Which token stands for which label (None: matched by prefix). A served tokenizer that did not
        answer gives None for this call only: the next call asks again, nothing is kept."""
        key = tuple(labels)
        if key not in self._owners:
            if self.served:
                from compeff.evaluate.eval_stage import outage_note, served_label_tokens
                from compeff.teachers.tokenize_api import TokenizerUnreachable

                try:
                    self._owners[key] = served_label_tokens(self.recipe, labels)
                except TokenizerUnreachable as exc:
                    outage_note(exc)
                    return None
            else:
                self._owners[key] = label_owners(local_first_tokens(self._tokenizer, labels), labels)
        return self._owners[key]

    def unreadable(self, labels: list[str]) -> str | None:
        """Why a task's labels cannot be scored (two labels no first token tells apart), or None."""
        from compeff.evaluate.classification import EvalError

        try:
            self.owners(labels)
        except EvalError as exc:
            return str(exc)
        return None

    def read(self, result: TeacherResult, labels: list[str]) -> dict[str, float]:
        """The label distribution of an answer; rejected (with the reason) when the top-k lists no label."""
        content = ((result.logprobs or [{}])[0] or {}).get("content") or []
        if not content:
            raise AnswerRejected("no log-probabilities in the teacher's answer (label scoring)")
        first = content[0]
        alternatives = first.get("top_logprobs") or [first]
        owners = self.owners(labels)
        if owners is None:  # a server without a tokenize endpoint: a token counts for the label it starts
            from compeff.evaluate.classification import served_label_scores

            mass = served_label_scores(alternatives, labels)
        else:
            key = "token" if self.served else "id"
            pairs = [(alt.get(key), float(alt.get("logprob", -np.inf))) for alt in alternatives]
            mass = label_log_mass(pairs, owners, len(labels))
        if not np.isfinite(mass).any():
            raise AnswerRejected(f"no label word among the teacher's top-{TOP_K} log-probabilities")
        probs = label_distribution(mass)[0]
        return {label: round(float(p), 6) for label, p in zip(labels, probs)}
