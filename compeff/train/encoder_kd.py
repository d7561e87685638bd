"""Encoder classifiers: fine-tune a teacher, distil students from its soft labels, measure both.

Students are any HF encoder or a layer-pruned copy of the teacher (works offline). Teacher logits on
the training set are computed once and cached per (teacher weights, set, max_length, truncation), so
a student run never runs the teacher again.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from compeff.train.kd_losses import corrected_targets, kd_loss, soft_targets

Truncation = Literal["plain", "head_tail"]
HEAD_SHARE = 0.25  # head+tail truncation keeps a quarter of the budget from the start, the rest from the end


@dataclass
class Encoded:
    """A tokenised labelled set."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def encode(
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    max_length: int,
    truncation: Truncation = "plain",
) -> Encoded:
    """Token ids of each text cut to ``max_length``: from the end (plain) or keeping its head and tail."""
    if truncation == "plain":
        enc = tokenizer(
            list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        return Encoded(enc["input_ids"], enc["attention_mask"], torch.tensor(list(labels)))
    special = tokenizer("", add_special_tokens=True)["input_ids"]  # e.g. [CLS, SEP] or [<s>, </s>]
    prefix, suffix = special[:1], special[1:]
    budget = max_length - len(special)
    head = int(budget * HEAD_SHARE)
    rows = []
    for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)[
        "input_ids"
    ]:  # no "too long" warning: cut below
        if len(ids) > budget:
            ids = ids[:head] + ids[len(ids) - (budget - head) :]
        rows.append(prefix + ids + suffix)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id or 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return Encoded(input_ids, mask, torch.tensor(list(labels)))


def _batches(n: int, size: int, rng: np.random.Generator | None = None):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, size):
        yield torch.from_numpy(order[start : start + size])


def length_grouped_batches(
    lengths: torch.Tensor, size: int, rng: np.random.Generator
) -> Iterator[torch.Tensor]:
    """One epoch's training batches of texts of similar length (transformers' ``group_by_length``: shuffled,
    sorted by length within mega-batches of up to 50 batches; the batch with the longest text first, the
    others in a shuffled order), so a step pads to its own longest text rather than to a random batch's:
    on the quickstart's 2,000 tweets random batches of 32 pad to 48.7 tokens on average for texts of 29.9."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    order = get_length_grouped_indices(lengths.tolist(), size, generator=generator)
    batches = [order[start : start + size] for start in range(0, len(order), size)]
    for i in [0, *rng.permutation(np.arange(1, len(batches)))]:  # the longest first, then any order
        yield torch.tensor(batches[i])


def predict_logits(
    model: Any, data: Encoded, batch_size: int = 64, progress: Callable[[int], None] | None = None
) -> np.ndarray:
    """Classifier logits for every row, in the data's order (float32).

    Rows are batched shortest first so each batch carries little padding (long-text sets such as IMDb
    mix 50- and 256-token rows); the logits are put back in the original order."""
    device = next(model.parameters()).device
    model.eval()
    lengths = data.attention_mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    out = []
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            idx = order[start : start + batch_size]
            mask = data.attention_mask[idx]
            width = int(lengths[idx].max())  # drop the batch's common padding
            logits = model(
                input_ids=data.input_ids[idx, :width].to(device), attention_mask=mask[:, :width].to(device)
            ).logits
            out.append(logits.float().cpu())
            if progress is not None:
                progress(len(idx))
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    logits = torch.cat(out)
    restored = torch.empty_like(logits)
    restored[order] = logits
    return restored.numpy()


TargetFn = Callable[[torch.Tensor], torch.Tensor | None]


@dataclass
class HiddenMatch:
    """The hidden-state term of the ``hidden`` loss: the teacher (run on every batch: its hidden states
    are too large to cache), the mapped MSE with its projection, and the term's weight."""

    teacher: Any
    loss: Any  # HiddenStateLoss
    weight: float = 1.0


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Hidden-state pairs (indices into ``hidden_states``, 0 = embeddings): embeddings to embeddings and
    student layer i to the teacher layer at the same relative depth."""
    return [(0, 0)] + [
        (i + 1, round((i + 1) * teacher_layers / student_layers)) for i in range(student_layers)
    ]


def train_classifier(
    model: Any,
    data: Encoded,
    epochs: float,
    lr: float,
    batch_size: int,
    seed: int,
    teacher_logits: np.ndarray | None = None,
    loss: Literal["ce", "kd", "corrected", "hidden"] = "ce",
    temperature: float = 2.0,
    alpha: float = 0.5,
    weight_decay: float = 0.01,
    progress: Callable[[int, int, float], None] | None = None,
    hidden: HiddenMatch | None = None,
    group_by_length: bool = True,
) -> list[float]:
    """Train in place with AdamW and linear decay; returns the loss of each step. ``hidden`` is the
    kd loss plus the hidden-state MSE (``hidden`` must then be given); ``group_by_length`` batches texts
    of similar length together (:func:`length_grouped_batches`), else batches are drawn at random."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    steps_per_epoch = math.ceil(len(data) / batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    params = list(model.parameters())
    if loss == "hidden":
        if hidden is None:
            raise ValueError("loss 'hidden' needs the teacher and a HiddenStateLoss")
        hidden.loss.to(device)
        hidden.teacher.eval()
        params += list(hidden.loss.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
    teacher = torch.from_numpy(teacher_logits).float() if teacher_logits is not None else None
    if loss != "ce" and teacher is None:
        raise ValueError(f"loss '{loss}' needs teacher logits")
    model.train()
    losses: list[float] = []
    step = 0
    while step < total:
        batches = (
            length_grouped_batches(data.attention_mask.sum(1), batch_size, rng)
            if group_by_length
            else _batches(len(data), batch_size, rng)
        )
        for idx in batches:
            if step >= total:
                break
            mask = data.attention_mask[idx]
            width = int(mask.sum(1).max())
            labels = data.labels[idx].to(device)
            inputs = {
                "input_ids": data.input_ids[idx, :width].to(device),
                "attention_mask": mask[:, :width].to(device),
            }
            out = model(**inputs, output_hidden_states=loss == "hidden")
            logits = out.logits
            if loss == "ce":
                value = F.cross_entropy(logits, labels)
            else:
                t = teacher[idx].to(device)
                targets = (
                    corrected_targets(t, labels, temperature)
                    if loss == "corrected"
                    else soft_targets(t, temperature)
                )
                value = kd_loss(logits, targets, labels, temperature, alpha)
                if loss == "hidden":
                    with torch.no_grad():
                        t_states = hidden.teacher(**inputs, output_hidden_states=True).hidden_states
                    value = value + hidden.weight * hidden.loss(
                        out.hidden_states, t_states, inputs["attention_mask"]
                    )
            value.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(float(value.detach()))
            step += 1
            if progress is not None:
                progress(step, total, losses[-1])
    model.eval()
    return losses


STACK_PATHS = (
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "distilbert.transformer.layer",
    "electra.encoder.layer",
)


def _stack_path(model: Any) -> str:
    """Attribute path of the transformer layers of an encoder classifier."""
    for path in STACK_PATHS:
        node = model
        try:
            for part in path.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        return path
    raise ValueError(f"cannot find the layer stack of {type(model).__name__} to prune it")


def layer_pruned_copy(teacher: Any, layers: Sequence[int]) -> Any:
    """A student that keeps the teacher's embeddings, head and the listed layers (in that order)."""
    path = _stack_path(teacher)
    *parents, leaf = path.split(".")
    holder = teacher
    for part in parents:
        holder = getattr(holder, part)
    stack = getattr(holder, leaf)
    if not layers or any(not 0 <= i < len(stack) for i in layers):
        raise ValueError(f"layers {list(layers)} must be indices of the teacher's {len(stack)} layers")
    setattr(holder, leaf, torch.nn.ModuleList())  # copy the rest without the layers ...
    try:
        student = copy.deepcopy(teacher)
    finally:
        setattr(holder, leaf, stack)
    target = student
    for part in parents:
        target = getattr(target, part)
    setattr(
        target, leaf, torch.nn.ModuleList([copy.deepcopy(stack[i]) for i in layers])
    )  # ... then the kept ones
    field = "n_layers" if path.startswith("distilbert") else "num_hidden_layers"
    setattr(student.config, field, len(layers))
    return student


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE over equal-width confidence bins: the weighted gap between confidence and accuracy."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            total += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(total)


def classifier_metrics(
    logits: np.ndarray, labels: np.ndarray, teacher_logits: np.ndarray | None = None
) -> dict[str, float]:
    """Accuracy, macro-F1, agreement with the teacher, mean max-softmax confidence, ECE."""
    from sklearn.metrics import accuracy_score, f1_score

    probs = torch.softmax(torch.from_numpy(logits).float(), -1).numpy()
    predicted = probs.argmax(1)
    out = {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro")),
        "confidence": float(probs.max(1).mean()),
        "ece": expected_calibration_error(probs, labels),
    }
    if teacher_logits is not None:
        out["agreement"] = float((teacher_logits.argmax(1) == predicted).mean())
    return out


def weights_fingerprint(model_dir: Path) -> str:
    """A short hash of a saved model's weight files (cache keys change when the weights do)."""
    files = sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin"))
    return _weights_hash(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@lru_cache(maxsize=32)
def _weights_hash(files: tuple[tuple[str, int, int], ...]) -> str:
    """Hash of the named files, once per (path, size, mtime): a run asks for the teacher's several times."""
    from compeff.runs import fingerprint_path

    digest = hashlib.sha256()
    for path, _, _ in files:
        digest.update(Path(path).name.encode())
        digest.update(fingerprint_path(path).encode())
    return digest.hexdigest()[:16]


class TeacherLogitCache:
    """Teacher logits per (teacher weights, data set, max_length, truncation), as .npy files."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.computed = 0  # how many times the teacher actually ran (tests check reuse)

    def key(self, teacher_dir: Path, data_key: str, max_length: int, truncation: str) -> str:
        raw = f"{weights_fingerprint(teacher_dir)}|{data_key}|{max_length}|{truncation}"
        return hashlib.sha256(raw.encode()).hexdigest()[:20]

    def get(
        self,
        teacher_dir: Path,
        data_key: str,
        max_length: int,
        truncation: str,
        compute: Callable[[], np.ndarray],
    ) -> np.ndarray:
        """The cached logits of this teacher on this data, computed on the first call only."""
        return self.get_keyed(self.key(teacher_dir, data_key, max_length, truncation), compute)

    def get_keyed(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The same under a caller's key (hashed into the file name)."""
        path = self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"
        if path.exists():
            return np.load(path)
        logits = compute()
        self.computed += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, logits)
        tmp.replace(path)
        return logits
