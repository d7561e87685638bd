"""The extra one-token label calls ``generate`` makes for closed tasks, beside each sample's own.

- **Prompt ensemble** (``generate.label_ensemble``): the same text in other wordings of its task; the
  sample's distribution is the mean over the wordings asked.
- **Contextual calibration** (``generate.calibrate``, Zhao et al. 2021): each prompt template (the prompt
  with its text taken out) asked with the content-free inputs of the ruler (``N/A``, an empty text,
  ``[MASK]``); a distribution is divided by its template's mean content-free distribution and
  renormalised (:func:`compeff.evaluate.classification.calibrate`, the ruler's own arithmetic). A small
  teacher that answers one label for nearly every text (SmolLM2-135M: "positive") has that prior taken
  out. The cost is three calls per template: a seed task has a template per wording; a teacher task's
  template includes the sample's demonstrations, so with several demos drawn per sample it can come to
  three calls per sample.

Both are answered in sub-stages of the generate folder (``generate/ensemble/``, ``generate/calibration/``),
resumable like any stage, before the samples themselves.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from compeff.evaluate.classification import CONTENT_FREE, calibrate
from compeff.runs import Stage, iter_jsonl
from compeff.synth.instructions import wording_index
from compeff.synth.label_answers import LabelReader, label_params
from compeff.synth.seed_tasks import fill
from compeff.teachers import ChatRequest, TeacherResult
from compeff.teaching import answer_requests

TEXT_SLOT = "\x00text\x00"  # stands for the user text in a prompt template


def template_key(template: str) -> str:
    """A prompt template's short stable name (the prompt with :data:`TEXT_SLOT` for its text)."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]


def ensemble_requests(
    pending: list[Any],
    by_id: dict[str, dict[str, Any]],
    texts: list[dict[str, Any]],
    settings: Any,
    scored: set[str],
) -> list[ChatRequest]:
    """For each pending closed sample of a task with several wordings, the other wordings of its task
    (up to ``generate.label_ensemble`` in all, the sample's own first), asked of the same text."""
    out = []
    for p in pending:
        task = by_id[p.task_id]
        words = task.get("wordings") or []
        if p.task_id not in scored or len(words) < 2:
            continue
        first = wording_index(p.id, len(words))
        text = texts[p.text_index]["text"][: settings.max_chars]
        for step in range(1, min(settings.label_ensemble, len(words))):
            j = (first + step) % len(words)
            template = fill(words[j], task["labels"], TEXT_SLOT)
            out.append(
                ChatRequest(
                    id=f"{p.id}~w{j}",
                    messages=[{"role": "user", "content": template.replace(TEXT_SLOT, text)}],
                    params=label_params(),
                    meta={
                        "group": p.id,
                        "labels": task["labels"],
                        "template": template_key(template),
                        "template_text": template,
                    },  # fmt: skip
                )
            )
    return out


def calibration_requests(templates: dict[str, tuple[str, list[str]]]) -> list[ChatRequest]:
    """The content-free questions of every template (key -> (template, labels)), one per input."""
    return [
        ChatRequest(
            id=f"cf-{key}-{j}",
            messages=[{"role": "user", "content": template.replace(TEXT_SLOT, free)}],
            params=label_params(),
            meta={"group": key, "labels": labels, "template": key},
        )
        for key, (template, labels) in sorted(templates.items())
        for j, free in enumerate(CONTENT_FREE)
    ]


def answer_label_requests(
    stage: Stage,
    sub_name: str,
    teacher: Any,
    cache: Any,
    reader: LabelReader,
    requests: list[ChatRequest],
    config: dict[str, Any],
    progress: bool,
) -> dict[str, list[dict[str, Any]]]:
    """Answer label questions in the sub-stage ``generate/<sub_name>/`` (resumable, each asked once);
    group -> its answers, each ``{"template", "label_probs"}``."""
    if not requests:
        return {}

    def to_record(request: ChatRequest, result: TeacherResult) -> dict[str, Any]:
        return {"id": request.id, "group": request.meta["group"], "template": request.meta["template"],
                "label_probs": reader.read(result, request.meta["labels"])}  # fmt: skip

    sub = Stage.open(stage.folder, sub_name, config=config, inputs={})
    with sub:
        # whatever the samples still pending need and has no answer yet, failed before or never asked,
        # even in a sub-stage that finished: it is asked only while its parent stage is not complete
        pending = [r for r in requests if r.id not in sub.done_ids]
        if pending:
            # as an iterator: a sub-stage that finished with failures asks them again (a list would be
            # filtered once more by the stage, which has nothing pending once complete)
            answer_requests(
                sub, teacher, iter(pending), to_record, cache=cache, progress=progress, total=len(pending)
            )
    out: dict[str, list[dict[str, Any]]] = {}
    for row in iter_jsonl(sub.data_path):
        out.setdefault(row["group"], []).append(row)
    return out


def calibrated(probs: dict[str, float], content_free: list[dict[str, Any]]) -> dict[str, float] | None:
    """A label distribution divided by its template's mean content-free distribution, renormalised;
    None unless every content-free question of the template was answered (as the ruler requires)."""
    if len(content_free) < len(CONTENT_FREE):
        return None
    labels = list(probs)
    free = np.array([[row["label_probs"][label] for label in labels] for row in content_free])
    out = calibrate(np.array([[probs[label] for label in labels]]), free)[0]
    return {label: round(float(p), 6) for label, p in zip(labels, out)}
