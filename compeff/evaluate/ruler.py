"""The ruler: one model on one labelled set, over several wordings, with agreement and calibration.

Shared by ``compeff eval`` and ``compeff bench distill`` so both measure with the same arithmetic. A
scorer is anything with ``label_log_mass(user_turns, label_names, cue) -> [n, n_labels]`` (a local model,
:class:`compeff.evaluate.classification.HFLabelScorer`, or a served one read from its top log-probabilities).

Per wording the result keeps accuracy, macro-F1, how many texts had no evidence for any label (a served
top-k cut that lists no label: counted as wrong), optionally contextual calibration (Zhao et al. 2021:
each label's probability divided by its mean probability on content-free inputs), batch calibration
(each text's distribution divided by the mean over the set's texts: transductive, no label read), and the
agreement with a reference model's labels (the teacher's, plain and batch-calibrated): the share of texts
where the two labels are equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from compeff.evaluate.classification import (
    CONTENT_FREE,
    LabelledSet,
    calibrate,
    classification_metrics,
    cut,
    draw_demos,
    label_distribution,
    label_shares,
)
from compeff.evaluate.wordings import Wording


class LabelScorer(Protocol):
    def label_log_mass(
        self, user_turns: Sequence[str], label_names: Sequence[str], cue: str = "Answer"
    ) -> np.ndarray: ...


@dataclass
class WordingRun:
    """What one model answered on one set with one wording (one demo seed for k-shot wordings)."""

    wording: str
    seed: int | None
    log_mass: np.ndarray  # [n, n_labels]
    content_free: np.ndarray | None = None  # [len(CONTENT_FREE), n_labels]
    labels_only: bool = False  # built from labels alone (from_preds): no distribution to calibrate
    preds: list[int] = field(init=False)

    def __post_init__(self) -> None:
        has = np.isfinite(self.log_mass).any(axis=1)
        self.preds = [int(p) if h else -1 for p, h in zip(self.log_mass.argmax(1), has)]

    @classmethod
    def from_preds(cls, wording: str, seed: int | None, preds: Sequence[int], n_labels: int) -> WordingRun:
        """A run known only by its labels (-1: no label): all of each text's mass on its label."""
        mass = np.full((len(preds), n_labels), -np.inf)
        for i, p in enumerate(preds):
            if p >= 0:
                mass[i, p] = 0.0
        return cls(wording, seed, mass, labels_only=True)

    def calibrated_preds(self) -> list[int] | None:
        """Labels after contextual calibration (None without content-free scores). A text with no label
        evidence stays without a label; a label the content-free inputs never gave (a served top-k cut) is
        floored at ``CF_FLOOR`` rather than divided by zero."""
        if self.content_free is None:
            return None
        p = calibrate(label_distribution(self.log_mass), label_distribution(self.content_free))
        return [int(i) if pred >= 0 else -1 for i, pred in zip(p.argmax(1), self.preds)]

    def batch_calibrated_preds(self) -> list[int] | None:
        """Labels after batch calibration (Zhou et al. 2023, ``generate.batch_calibrate``'s arithmetic):
        each text's label distribution divided by the mean distribution over the set's texts that have
        label evidence (floored at ``CF_FLOOR``). Transductive: the prior comes from the scored texts
        themselves, no label is read. A chain that trains on batch-calibrated teacher labels teaches a
        model like this one (its priors came from its own samples), so a student's agreement with these
        labels estimates what it was taught. No evidence stays no label; exact ties go to the first
        label; None for a run known only by its labels."""
        if self.labels_only:
            return None
        has = [p >= 0 for p in self.preds]
        if not any(has):
            return list(self.preds)
        dist = label_distribution(self.log_mass)
        # rounded: a model that answers every text alike ties exactly (first label), not by float noise
        p = np.round(calibrate(dist, dist[np.array(has)]), 9)
        return [int(i) if pred >= 0 else -1 for i, pred in zip(p.argmax(1), self.preds)]


def wording_prompts(
    data: LabelledSet, wording: Wording, seed: int | None, k_shot: int, max_chars: int
) -> list[str]:
    """The user turn of every text of a set in one wording (k-shot demos drawn per text from the seed)."""
    out = []
    for i, text in enumerate(data.texts):
        demos = []
        if wording.k_shot and k_shot:
            drawn = draw_demos(data, k_shot, (seed or 0) * 1_000_003 + i, exclude=text)
            demos = [(cut(d, max_chars), label) for d, label in drawn]
        out.append(wording.render(cut(text, max_chars), data.label_names, demos))
    return out


def run_wording(
    scorer: LabelScorer,
    data: LabelledSet,
    wording: Wording,
    seed: int | None,
    k_shot: int,
    max_chars: int,
    calibrate: bool = False,
) -> WordingRun:
    """Score every text of a set in one wording (and the content-free inputs when ``calibrate``)."""
    prompts = wording_prompts(data, wording, seed, k_shot, max_chars)
    mass = scorer.label_log_mass(prompts, data.label_names, wording.cue)
    content_free = None
    if calibrate:  # in the same context as the texts: a k-shot wording keeps its demos (one draw)
        demos = []
        if wording.k_shot and k_shot:
            demos = [(cut(d, max_chars), label) for d, label in draw_demos(data, k_shot, seed or 0)]
        free = [wording.render(t, data.label_names, demos) for t in CONTENT_FREE]
        content_free = scorer.label_log_mass(free, data.label_names, wording.cue)
    return WordingRun(wording.name, seed, np.asarray(mass, dtype=np.float64), content_free)


def agreement(preds: Sequence[int], reference: Sequence[int]) -> float:
    """Share of texts where a model's label equals the reference model's (no label never agrees)."""
    pairs = [(a, b) for a, b in zip(preds, reference, strict=True)]
    return float(np.mean([a == b and a >= 0 for a, b in pairs])) if pairs else 0.0


def _scored(truth: Sequence[int], preds: Sequence[int], n_labels: int) -> dict[str, Any]:
    """Metrics with 'no label' (-1) counted as wrong: a miss for the true label, a hit for none (it is
    left out of the confusion matrix and counted as ``no_label``)."""
    return classification_metrics(truth, list(preds), n_labels)


def summarise_runs(
    data: LabelledSet,
    runs: Sequence[WordingRun],
    reference: dict[tuple[str, int | None], list[int]] | None = None,
    calibrated_reference: dict[tuple[str, int | None], list[int]] | None = None,
) -> dict[str, Any]:
    """A set's result: accuracy and macro-F1 as the mean over wordings (k-shot seeds averaged inside their
    wording) with the spread over wordings, a ``wordings`` entry per wording (accuracy, macro-F1, texts
    without label evidence, calibrated and batch-calibrated scores, agreement with ``reference`` and with
    ``calibrated_reference``, the reference model's batch-calibrated labels), the summed confusion matrix
    and the share of each predicted label."""
    n_labels = len(data.label_names)
    by_wording: dict[str, list[WordingRun]] = {}
    for run in runs:
        by_wording.setdefault(run.wording, []).append(run)
    wordings: dict[str, dict[str, Any]] = {}
    confusion = np.zeros((n_labels, n_labels), dtype=int)
    all_preds: list[int] = []
    for name, group in by_wording.items():
        metrics = [_scored(data.labels, r.preds, n_labels) for r in group]
        entry: dict[str, Any] = {
            "accuracy": float(np.mean([m["accuracy"] for m in metrics])),
            "macro_f1": float(np.mean([m["macro_f1"] for m in metrics])),
            "no_label": int(sum(p < 0 for r in group for p in r.preds)),
            "seeds": [r.seed for r in group] if group[0].seed is not None else None,
            "predicted_share": label_shares([p for r in group for p in r.preds], data.label_names),
        }
        for key, labelled in (
            ("calibrated", [r.calibrated_preds() for r in group]),
            ("batch_calibrated", [r.batch_calibrated_preds() for r in group]),
        ):
            if all(preds is not None for preds in labelled):
                scored = [_scored(data.labels, preds, n_labels) for preds in labelled if preds is not None]
                entry[key] = {k: float(np.mean([m[k] for m in scored])) for k in ("accuracy", "macro_f1")}
        if reference is not None:
            agree = [
                agreement(r.preds, reference[(name, r.seed)]) for r in group if (name, r.seed) in reference
            ]
            if agree:
                entry["agreement"] = float(np.mean(agree))
        if calibrated_reference is not None:
            agree = [
                agreement(r.preds, calibrated_reference[(name, r.seed)])
                for r in group
                if (name, r.seed) in calibrated_reference
            ]
            if agree:
                entry["agreement_batch_calibrated"] = float(np.mean(agree))
        wordings[name] = entry
        for m in metrics:
            confusion += np.array(m["confusion"])
        all_preds += [p for r in group for p in r.preds]
    acc = [w["accuracy"] for w in wordings.values()]
    f1 = [w["macro_f1"] for w in wordings.values()]
    result: dict[str, Any] = {
        "n": len(data.texts),
        "label_names": data.label_names,
        "accuracy": float(np.mean(acc)),
        "accuracy_std": float(np.std(acc)),
        "macro_f1": float(np.mean(f1)),
        "macro_f1_std": float(np.std(f1)),
        "confusion": confusion.tolist(),
        "predicted_share": label_shares(all_preds, data.label_names),
        "no_label": sum(w["no_label"] for w in wordings.values()),
        "wordings": wordings,
    }
    agreements = [w["agreement"] for w in wordings.values() if "agreement" in w]
    if agreements:
        result["agreement"] = float(np.mean(agreements))
        result["agreement_std"] = float(np.std(agreements))
    if wordings and all("batch_calibrated" in w for w in wordings.values()):
        result["batch_calibrated"] = {
            k: float(np.mean([w["batch_calibrated"][k] for w in wordings.values()]))
            for k in ("accuracy", "macro_f1")
        }
    calibrated_agreements = [
        w["agreement_batch_calibrated"] for w in wordings.values() if "agreement_batch_calibrated" in w
    ]
    if calibrated_agreements:
        result["agreement_batch_calibrated"] = float(np.mean(calibrated_agreements))
        result["agreement_batch_calibrated_std"] = float(np.std(calibrated_agreements))
    if all("calibrated" in w for w in wordings.values()) and wordings:
        result["calibrated"] = {
            "accuracy": float(np.mean([w["calibrated"]["accuracy"] for w in wordings.values()])),
            "macro_f1": float(np.mean([w["calibrated"]["macro_f1"] for w in wordings.values()])),
        }
    return result


def reference_preds(
    runs: Sequence[WordingRun], batch_calibrated: bool = False
) -> dict[tuple[str, int | None], list[int]]:
    """A model's labels per (wording, seed), the reference others' agreement is measured against (its
    batch-calibrated labels with ``batch_calibrated``; refused for runs known only by their labels)."""
    if not batch_calibrated:
        return {(r.wording, r.seed): r.preds for r in runs}
    out: dict[tuple[str, int | None], list[int]] = {}
    for r in runs:
        preds = r.batch_calibrated_preds()
        if preds is None:
            raise ValueError(
                f"wording {r.wording}: labels alone cannot be batch-calibrated (no distribution)"
            )
        out[(r.wording, r.seed)] = preds
    return out
