"""Sentiment classification by label-word scoring, in the style of SentiBench.

A prompt (one of several wordings, :mod:`compeff.evaluate.wordings`) ends where the label is due;
the evidence for a label is the probability mass of the first tokens of all its spellings, and the
largest wins. Local causal LMs are read from their logits; served models (vLLM, any OpenAI-compatible
server) from their top log-probabilities, so a teacher and its student are scored by the same code.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import logsumexp

from compeff.data import DataError
from compeff.evaluate.wordings import BUILTIN_WORDINGS


class EvalError(DataError):
    """The evaluation cannot be run as asked (label words, sets, model)."""


@dataclass
class LabelledSet:
    """Texts with integer labels, their label names, and demos to draw from."""

    name: str
    texts: list[str]
    labels: list[int]
    label_names: list[str]
    demo_texts: list[str]
    demo_labels: list[int]


def cut(text: str, max_chars: int) -> str:
    """A text shortened to ``max_chars`` characters on a word boundary."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    return text[:max_chars].rsplit(" ", 1)[0] + " ..."


def render_prompt(
    text: str, demos: Sequence[tuple[str, str]], label_names: Sequence[str], max_chars: int = 1000
) -> str:
    """The k-shot prompt of a model read without a chat template, ending with 'Sentiment:'."""
    wording = BUILTIN_WORDINGS["k-shot"]
    shown = [(cut(d, max_chars), label) for d, label in demos]
    return wording.completion_prompt(wording.render(cut(text, max_chars), label_names, shown))


def draw_demos(data: LabelledSet, k: int, seed: int, exclude: str | None = None) -> list[tuple[str, str]]:
    """k demos for one prompt, balanced over labels as far as k allows (seeded)."""
    if k == 0:
        return []
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(data.demo_labels):
        if data.demo_texts[i] != exclude:
            by_label.setdefault(y, []).append(i)
    if not by_label:
        raise EvalError(f"{data.name}: no demonstration to draw from")
    labels = sorted(by_label)
    picks = []
    for j in range(k):
        pool = by_label[labels[(j + seed) % len(labels)]]
        picks.append(pool[rng.randrange(len(pool))])
    rng.shuffle(picks)
    return [(data.demo_texts[i], data.label_names[data.demo_labels[i]]) for i in picks]


def stratified_subset(labels: Sequence[int], limit: int | None, seed: int = 0) -> list[int]:
    """Indices of a subsample keeping each label's share (all indices when no limit)."""
    if limit is None or limit >= len(labels):
        return list(range(len(labels)))
    rng = random.Random(seed)
    groups: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(y, []).append(i)
    picked = []
    for _, members in sorted(groups.items()):
        share = round(limit * len(members) / len(labels))
        picked += rng.sample(members, min(len(members), max(1, share)))
    return sorted(picked[:limit] if len(picked) > limit else picked)


def classification_metrics(truth: Sequence[int], predicted: Sequence[int], n_labels: int) -> dict[str, Any]:
    """Accuracy, macro-F1 and the confusion matrix (rows: truth, columns: prediction)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    labels = list(range(n_labels))
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, labels=labels, average="macro", zero_division=0)),
        "confusion": confusion_matrix(truth, predicted, labels=labels).tolist(),
    }


class HFLabelScorer:
    """A local causal LM (and optional LoRA adapter) read at the position where the label is due."""

    def __init__(
        self,
        model: str,
        adapter: str | None = None,
        device: str = "auto",
        chat_template: bool = False,
        max_length: int = 2048,
        batch_size: int = 8,
    ):
        import torch
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        from compeff.loading import load_causal_lm, pick_device, pick_dtype
        from compeff.models import resolve_model

        hf_logging.disable_progress_bar()
        path = resolve_model(model)
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(adapter or path)
        lm = load_causal_lm(path, pick_dtype("auto", self.device), adapter=adapter, device=self.device)
        self.model = lm.eval()
        self.chat_template = chat_template
        if chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise EvalError(f"{model}: eval.chat_template is on but the tokenizer has no chat template")
        self.max_length = max_length
        self.batch_size = batch_size
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self._torch = torch

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt as the model reads it: with a chat template the prompt is the user turn
        (the assistant turn follows); without one it is read as it is. The beginning is cut if too long."""
        if self.chat_template:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        return ids[-self.max_length :]

    def owners(self, label_names: Sequence[str]) -> dict[int, int]:
        """Token id -> label for the first token of every spelling of every label word."""
        return label_owners(local_first_tokens(self.tokenizer, label_names), label_names)

    def next_token_logits(self, prompts: Sequence[str]) -> np.ndarray:
        """Logits of the token after each prompt, [len(prompts), vocab] (float32).

        Prompts are batched by length and padded on the left, so every row's next token sits in the last
        column and the LM head runs on that column only (``logits_to_keep=1``)."""
        torch = self._torch
        encoded = [self.encode(p) for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out_rows: list[Any] = [None] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                seq = encoded[i]
                ids[row, width - len(seq) :] = torch.tensor(seq)
                mask[row, width - len(seq) :] = 1
            with torch.inference_mode():
                out = self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(self.device),
                    logits_to_keep=1,
                )
            last = out.logits[:, -1].float().cpu()
            for row, i in enumerate(chunk):
                out_rows[i] = last[row]
        if not out_rows:
            return np.zeros((0, 0), dtype=np.float32)
        return torch.stack(out_rows).numpy()

    def label_log_mass(
        self, user_turns: Sequence[str], label_names: Sequence[str], cue: str = "Answer"
    ) -> np.ndarray:
        """Log of each label's probability mass (all its spellings' first tokens) at the answer's first
        token, [len(user_turns), n_labels]; ``cue`` ends the prompt of a model read without a template."""
        prompts = list(user_turns) if self.chat_template else [f"{u}\n{cue}:" for u in user_turns]
        owners = self.owners(label_names)
        ids = list(owners)
        logits = self.next_token_logits(prompts)
        if not len(logits):
            return np.zeros((0, len(label_names)))
        # log-probabilities of the owned tokens only: their logits less each row's log-normaliser
        columns = logits[:, ids].astype(np.float64) - logsumexp(
            logits.astype(np.float64), axis=1, keepdims=True
        )
        return np.stack([label_log_mass(zip(ids, row.tolist()), owners, len(label_names)) for row in columns])

    def predict(self, user_turns: Sequence[str], label_names: Sequence[str], cue: str = "Answer"):
        """Predicted label index per prompt and the label log-masses [len(prompts), n_labels]."""
        mass = self.label_log_mass(user_turns, label_names, cue)
        return [int(i) for i in mass.argmax(1)], mass


def label_variants(name: str) -> list[str]:
    """The spellings a model may start its answer with: the word, capitalised, each with a leading space."""
    forms = dict.fromkeys([name, name.lower(), name.capitalize()])
    return [prefix + form for prefix in ("", " ") for form in forms]


def local_first_tokens(tokenizer: Any, label_names: Sequence[str]) -> dict[str, int]:
    """The first token id of every spelling of every label word, from a local tokenizer."""
    first = {}
    for name in label_names:
        for variant in label_variants(name):
            tokens = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if not tokens:
                raise EvalError(f"label word {name!r} has no token")
            first[variant] = tokens[0]
    return first


def label_owners(first_tokens: Mapping[str, Hashable], label_names: Sequence[str]) -> dict[Any, int]:
    """Map each first token (an id for a local tokenizer, a token text for a server) of a label word's
    spellings to its label; a token that starts the words of two labels tells them apart no better than
    chance and is left out; a label left with no token of its own is an error that names the labels it
    cannot be told from."""
    first_pieces = first_tokens
    owners: dict[Any, set[int]] = {}
    for i, name in enumerate(label_names):
        for variant in label_variants(name):
            owners.setdefault(first_pieces[variant], set()).add(i)
    pieces = {piece: next(iter(labels)) for piece, labels in owners.items() if len(labels) == 1}
    for i, name in enumerate(label_names):
        if i not in pieces.values():
            colliding = sorted({label_names[j] for p, ls in owners.items() if i in ls for j in ls})
            raise EvalError(
                f"every spelling of the label {name!r} starts with the same token as "
                f"{', '.join(n for n in colliding if n != name)}: choose label words whose first tokens differ"
            )
    return pieces


label_pieces = label_owners  # the served tokenizer's pieces: the same mapping, keyed by token text


def label_log_mass(
    alternatives: Iterable[tuple[Hashable, float]], owners: Mapping[Any, int], n_labels: int
) -> np.ndarray:
    """The evidence for each label, one function for every backend: the log of the summed probability of
    the tokens that start its spellings, read from (token, log-probability) pairs: every owned token of a
    local model's full distribution, or a served model's top-k alternatives. A label none of whose tokens
    is listed gets -inf (a served top-k cut: its mass is below the k-th alternative's)."""
    scores = np.full(n_labels, -np.inf)
    for token, logprob in alternatives:
        hit = owners.get(token)
        if hit is not None:
            scores[hit] = np.logaddexp(scores[hit], float(logprob))
    return scores


def label_distribution(log_mass: np.ndarray) -> np.ndarray:
    """Label probabilities renormalised over the label set, [n, n_labels]; a row with no evidence for any
    label (a served top-k that lists none) is uniform."""
    x = np.atleast_2d(np.asarray(log_mass, dtype=np.float64))
    top = x.max(axis=1, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    e = np.exp(x - safe)
    total = e.sum(axis=1, keepdims=True)
    return np.where(total > 0, e / np.where(total > 0, total, 1.0), 1.0 / x.shape[1])


CONTENT_FREE = ("N/A", "", "[MASK]")  # the content-free inputs of contextual calibration (Zhao et al. 2021)
CF_FLOOR = 1e-3  # smallest content-free probability a label is divided by


def calibrate(probs: np.ndarray, content_free: np.ndarray) -> np.ndarray:
    """Contextual calibration: each label's probability divided by its mean probability on the
    content-free inputs of the same prompt (floored at ``CF_FLOOR``: a label those inputs never gave is
    not divided by zero), renormalised over the labels. ``probs`` [n, L], ``content_free`` [m, L]."""
    p_cf = np.atleast_2d(content_free).mean(axis=0)
    p = np.atleast_2d(probs) / np.maximum(p_cf, CF_FLOOR)
    return p / p.sum(axis=1, keepdims=True)


def served_label_scores(
    top_logprobs: list[dict[str, Any]], label_names: Sequence[str], pieces: dict[str, int] | None = None
) -> np.ndarray:
    """Log-probabilities of each label from a served model's top alternatives for the answer's first token.

    With ``pieces`` (the served tokenizer's first token of each label spelling, from
    :func:`label_pieces`) a token counts for a label only when it is exactly one of those tokens, and a
    label's score adds the probabilities of its spellings. Without them (a server with no tokenize
    endpoint) a token counts for the one label word it starts; a token that starts several is skipped.
    -inf where no token of a label is listed."""
    pairs = [(alt.get("token", ""), float(alt.get("logprob", -np.inf))) for alt in top_logprobs]
    if pieces is None:  # no tokenize endpoint: a token counts for the one label word it starts
        owners: dict[str, int] = {}
        for token, _ in pairs:
            word = token.strip().lower()
            hits = [i for i, name in enumerate(label_names) if word and name.lower().startswith(word)]
            if len(hits) == 1:
                owners[token] = hits[0]
        pieces = owners
    return label_log_mass(pairs, pieces, len(label_names))


def summarise(per_set: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Overall score: the mean over sets of accuracy and macro-F1, x 100."""
    if not per_set:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    return {
        "accuracy": 100 * float(np.mean([r["accuracy"] for r in per_set.values()])),
        "macro_f1": 100 * float(np.mean([r["macro_f1"] for r in per_set.values()])),
    }


def mean_over_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Metrics averaged over the seed runs (confusion matrices summed), with their spread."""
    acc = [r["accuracy"] for r in runs]
    f1 = [r["macro_f1"] for r in runs]
    confusion = np.sum([r["confusion"] for r in runs], axis=0).tolist()
    return {
        "accuracy": float(np.mean(acc)),
        "accuracy_std": float(np.std(acc)),
        "macro_f1": float(np.mean(f1)),
        "macro_f1_std": float(np.std(f1)),
        "confusion": confusion,
        "per_seed": runs,
        "predicted_share": {},
    }


def label_shares(predicted: Sequence[int], label_names: Sequence[str]) -> dict[str, float]:
    counts = Counter(predicted)
    return {name: counts.get(i, 0) / max(1, len(predicted)) for i, name in enumerate(label_names)}
