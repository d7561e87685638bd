"""``compeff generate``: tasks x user texts -> the distillation set.

Each sample is a chat (`messages`: the instruction with inlined demonstrations and the text, then the
teacher's answer) with metadata, in ``runs/<name>/generate/data.jsonl``: loadable with
``datasets.load_dataset("json", ...)`` and trainable by TRL's SFTTrainer as is. Answers that break
their task's format are dropped by the optional QC and counted per task in ``failures.jsonl`` and the
report. ``--shard K/N`` does one part in ``generate-shard-K-of-N``; ``--merge`` joins the parts.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compeff import top_logprobs
from compeff.config import Recipe
from compeff.data import DataError, select_user_texts, source_inputs
from compeff.evaluate.classification import calibrate
from compeff.models import resolve_model
from compeff.progress import console
from compeff.runs import Stage, iter_jsonl, read_manifest
from compeff.shards import (
    check_shards_match,
    finished_shards,
    merge_shard_records,
    shard_of,
    shard_stage_name,
)
from compeff.synth.instructions import (
    pairing_prompts,
    plan_pairings,
    qc_reason,
    task_definition,
    wording_index,
)
from compeff.synth.label_answers import LabelReader, label_params
from compeff.synth.label_calls import (
    TEXT_SLOT,
    answer_label_requests,
    calibrated,
    calibration_requests,
    ensemble_requests,
    template_key,
)
from compeff.synth.tasks import match_label
from compeff.synth.tasks_stage import TASKS_FILE
from compeff.teachers import ChatRequest, TeacherResult, sampling_params
from compeff.teaching import (
    AnswerRejected,
    answer_requests,
    ray_executor,
    teacher_identity,
    teacher_session,
)

LOW_CONFIDENCE = "qc: teacher confidence below the threshold"


def load_tasks(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: no tasks (run `compeff tasks` first)")
    tasks = list(iter_jsonl(path))
    if not tasks:
        raise DataError(f"{path}: the tasks stage kept no task; nothing to generate")
    return tasks


def check_served_vocabulary(recipe: Recipe, tokenizer: Any) -> tuple[str, bool]:
    """(fingerprint, ask for ids) for a served teacher's log-probabilities: every server's tokenizer is
    fingerprinted from its tokenize endpoint and must be the student's (``tokenizer``), else one clear
    refusal before any call; ids are asked for where every server takes ``return_tokens_as_token_ids``."""
    from compeff.teachers.tokenize_api import VLLM, TokenizerUnreachable, served_vocabulary

    t = recipe.teacher
    student = top_logprobs.tokenizer_probe_fingerprint(tokenizer)
    dialects = set()
    for url in map(str, t.base_urls):
        try:
            served = served_vocabulary(url, t.model, os.environ.get(t.api_key_env))
        except TokenizerUnreachable as exc:
            raise DataError(
                f"generate.teacher_top_logprobs: {exc}; try again when the server answers"
            ) from None
        if served is None:
            raise top_logprobs.VocabularyMismatch(
                f"generate.teacher_top_logprobs: {url} has no tokenize endpoint compeff knows (vLLM, "
                "llama.cpp, llama-cpp-python), so its tokenizer cannot be checked against the student's; "
                "serve the teacher with one of those or drop generate.teacher_top_logprobs"
            )
        if served.fingerprint != student:
            raise top_logprobs.VocabularyMismatch(
                f"generate.teacher_top_logprobs: the served teacher's tokenizer ({t.model} at {url}: "
                f"{served.fingerprint}) is not the student's ({recipe.student.model}: {student}), "
                "so sft.loss: kd could not use its log-probabilities; use a student of the teacher's family "
                "or drop generate.teacher_top_logprobs"
            )
        dialects.add(served.dialect)
    return student, dialects == {VLLM}


def logprob_capture(recipe: Recipe) -> tuple[Callable[[TeacherResult], dict[str, Any]], bool]:
    """(capture, ask for ids): a function packing an answer's top-k log-probabilities
    (``generate.teacher_top_logprobs``) with token ids, and whether served requests should ask for ids.

    Local backends (hf, vllm) report the ids of the teacher's tokenizer, fingerprinted whole. A served
    teacher's tokenizer is fingerprinted from the server and must be the student's
    (:func:`check_served_vocabulary`); its ids come from the server where it names them (vLLM asked with
    ``return_tokens_as_token_ids``, llama.cpp's server), else its token texts are looked up in the
    student's tokenizer, which the fingerprint showed to be the served one."""
    from transformers import AutoTokenizer

    k = recipe.generate.teacher_top_logprobs
    served = recipe.teacher.backend == "openai"
    # a pruned or healed student keeps its base model's tokenizer: read it there, without building the cut
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model(recipe.student.model if served else recipe.teacher.model)
    )
    if served:
        vocab, ask_ids = check_served_vocabulary(recipe, tokenizer)
    else:
        vocab, ask_ids = top_logprobs.vocab_fingerprint(tokenizer), False
    lookup = top_logprobs.token_id_lookup(tokenizer)

    def capture(result: TeacherResult) -> dict[str, Any]:
        content = (result.logprobs or [{}])[0] or {}
        entries = content.get("content") if isinstance(content, dict) else None
        if not entries:
            raise AnswerRejected(
                "no log-probabilities in the teacher's answer (generate.teacher_top_logprobs)"
            )
        return top_logprobs.pack(entries, k, lookup, vocab)

    return capture, ask_ids


def _stage_config(recipe: Recipe) -> dict[str, Any]:
    return {
        "generate": recipe.generate.model_dump(exclude={"shard", "merge"}),
        "seed": recipe.run.seed,
        "teacher": teacher_identity(recipe.teacher),
        "sources": recipe.data.user_texts,
    }


def _skip_with_proxy(plan, by_id, prompt, proxy_path: str, share: float):
    """The plan without the pairs the difficulty proxy predicts easiest (per task)."""
    from compeff.select.proxy import PROXY_FILE, load_proxy, skip_predicted_easy

    proxy = load_proxy(proxy_path)
    prompts = [prompt(p) for p in plan]
    kept, _ = skip_predicted_easy(
        plan, prompts, [p.task_id for p in plan], [by_id[p.task_id]["type"] for p in plan], proxy, share
    )
    console.print(f"generate: the difficulty proxy skips {len(plan) - len(kept)} of {len(plan)} pairs")
    path = Path(proxy_path)
    return kept, len(plan) - len(kept), path / PROXY_FILE if path.is_dir() else path


def run_generate_stage(recipe: Recipe, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Pair, answer, check and write the distillation set (or one shard of it, or merge the shards)."""
    settings = recipe.generate
    tasks_file = recipe.run_dir / "tasks" / TASKS_FILE
    if settings.merge:
        return merge_shards(recipe, force)
    tasks = load_tasks(tasks_file)
    texts, _ = select_user_texts(
        recipe.data.user_texts,
        settings.n_samples,
        recipe.run.seed + 1,
        recipe.data.text_field,
        recipe.data.dir,
    )
    if not texts:
        raise DataError(f"data.user_texts: no usable text in {', '.join(recipe.data.user_texts)}")
    plan = plan_pairings(
        tasks,
        len(texts),
        settings.n_samples,
        settings.k_demos,
        recipe.run.seed,
        settings.task_cap,
        settings.analysis_share,
        settings.seed_share,
    )
    name = "generate"
    if settings.shard:
        k, n = (int(x) for x in settings.shard.split("/"))
        plan = [p for p in plan if shard_of(p.id, n) == k]
        name = shard_stage_name("generate", settings.shard)
    by_id = {t["id"]: t for t in tasks}
    definitions = {t["id"]: task_definition(t) for t in tasks}
    prompt = pairing_prompts(by_id, texts, settings.max_chars)
    inputs: dict[str, Path | str] = {
        "tasks": tasks_file,
        **source_inputs(recipe.data.user_texts, recipe.data.dir),
    }
    skipped = 0
    if settings.proxy:
        plan, skipped, inputs["proxy"] = _skip_with_proxy(
            plan, by_id, prompt, settings.proxy, settings.proxy_skip
        )
    limits: dict[str, Any] = {"max_tokens": settings.max_tokens} if settings.max_tokens else {}
    if settings.teacher_top_logprobs:
        limits.update(logprobs=True, top_logprobs=settings.teacher_top_logprobs)
    params = sampling_params(recipe.teacher, **limits)
    sampling = params.to_dict()
    # a structured task's answers follow its own schema (constrained when teacher.structured_output)
    task_params = {
        tid: sampling_params(recipe.teacher, schema=t["json_schema"], **limits)
        for tid, t in by_id.items()
        if t.get("type") == "structured" and t.get("json_schema")
    }

    scored = {
        tid
        for tid, t in by_id.items()
        if settings.label_scoring and t.get("type") == "closed_classification" and t.get("labels")
    }
    ask_ids = False  # set with the capture: a vLLM server names the captured answers' tokens by id
    template_of: dict[str, str] = {}  # sample id -> its prompt template's key (generate.calibrate)

    def build(pairing) -> ChatRequest:
        meta = {"task_id": pairing.task_id, "text_id": texts[pairing.text_index]["id"]}
        if pairing.id in template_of:  # which content-free answers calibrate it
            meta["template"] = template_of[pairing.id]
        return ChatRequest(
            id=pairing.id,
            messages=[{"role": "user", "content": prompt(pairing)}],
            params=task_params.get(pairing.task_id, params),
            meta=meta,
            logprob_token_ids=ask_ids and pairing.task_id not in scored,
        )

    stage = Stage.open(recipe.run_dir, name, config=_stage_config(recipe), inputs=inputs, force=force)
    with stage:
        stage.extra["proxy_skipped"] = skipped
        report_rows = ReportBuilder(by_id, len(plan))
        if stage.done_ids and stage.data_path.exists():  # resumed: the rows written before count too
            for row in iter_jsonl(stage.data_path):
                report_rows.add_row(row)
        pending = stage.pending(plan)
        if pending:
            capture = None
            if settings.teacher_top_logprobs:  # checked before the teacher loads: a refusal costs nothing
                capture, ask_ids = logprob_capture(recipe)
            with teacher_session(recipe.teacher, recipe.run.seed, ray_executor(recipe)) as (teacher, cache):
                reader = LabelReader(recipe) if scored else None
                for tid in sorted(scored):  # label words that cannot be told apart: sampled text instead
                    assert reader is not None
                    why = reader.unreadable(by_id[tid]["labels"])
                    if why:
                        console.print(
                            f"[yellow]generate: task {tid}: {why}; answered with sampled text[/yellow]"
                        )
                        scored.discard(tid)
                task_params.update(dict.fromkeys(scored, label_params()))
                config = _stage_config(recipe)
                extra = ensemble_requests(pending, by_id, texts, settings, scored) if reader and settings.label_ensemble > 1 else []  # fmt: skip
                ensembled = answer_label_requests(stage, "ensemble", teacher, cache, reader, extra, config, progress)  # fmt: skip
                content_free: dict[str, list[dict[str, Any]]] = {}
                if reader is not None and settings.calibrate:
                    templates = {}
                    for p in pending:
                        if p.task_id in scored:
                            template = prompt(p, TEXT_SLOT)
                            template_of[p.id] = template_key(template)
                            templates[template_of[p.id]] = (template, by_id[p.task_id]["labels"])
                    for r in extra:  # the ensemble's wordings are calibrated each by its own template
                        templates[r.meta["template"]] = (r.meta["template_text"], r.meta["labels"])
                    asked = calibration_requests(templates)
                    content_free = answer_label_requests(stage, "calibration", teacher, cache, reader, asked, config, progress)  # fmt: skip

                def reading(probs: dict[str, float], template: str | None) -> dict[str, float]:
                    """A distribution as the student learns it: calibrated by its template when asked."""
                    if not settings.calibrate or template is None:
                        return probs
                    out = calibrated(probs, content_free.get(template, []))
                    if out is None:
                        raise AnswerRejected(
                            f"calibration: the content-free questions of template {template} are not all "
                            "answered (generate/calibration/failures.jsonl); a later run asks them again"
                        )
                    return out

                def combined(
                    request_id: str, probs: dict[str, float]
                ) -> tuple[dict[str, float], dict[str, Any]]:
                    """A closed sample's distribution before the argmax: with the prompt ensemble's other
                    wordings averaged in (each read as :func:`reading` reads it)."""
                    fields: dict[str, Any] = {}
                    others = [
                        reading(row["label_probs"], row.get("template"))
                        for row in ensembled.get(request_id, [])
                    ]
                    if others:  # the prompt ensemble: the mean distribution over the wordings asked
                        probs = {
                            label: round(sum(d[label] for d in [probs, *others]) / (1 + len(others)), 6)
                            for label in probs
                        }
                        fields["label_wordings"] = 1 + len(others)
                    if settings.calibrate:
                        fields["calibrated"] = True
                    return probs, fields

                def decided(probs: dict[str, float], fields: dict[str, Any]) -> tuple[str, dict[str, Any]]:
                    """The answer (the argmax label) and the record's label fields; refused below
                    generate.min_confidence."""
                    answer = max(probs, key=probs.__getitem__)
                    confidence = probs[answer]
                    if confidence < settings.min_confidence:
                        raise AnswerRejected(
                            f"{LOW_CONFIDENCE}: {confidence:.3f} < generate.min_confidence {settings.min_confidence}"
                        )
                    return answer, {**fields, "label_probs": probs, "teacher_confidence": confidence}

                def record_of(request: ChatRequest, answer: str, fields: dict[str, Any]) -> dict[str, Any]:
                    task = by_id[request.meta["task_id"]]
                    record = {
                        "id": request.id,
                        "messages": [*request.messages, {"role": "assistant", "content": answer}],
                        "perspective_id": task["perspective_id"],
                        "task_id": task["id"],
                        "task_name": task["name"],
                        "task_type": task["type"],
                        "text_id": request.meta["text_id"],
                        "teacher": teacher.model,
                        "sampling": sampling,
                    }
                    record.update(fields)
                    return record

                def to_record(request: ChatRequest, result: TeacherResult) -> dict[str, Any]:
                    task = by_id[request.meta["task_id"]]
                    fields: dict[str, Any] = {}
                    answer = result.text
                    if reader is not None and task["id"] in scored:
                        own = reading(reader.read(result, task["labels"]), request.meta.get("template"))
                        answer, fields = decided(*combined(request.id, own))
                    elif settings.qc:
                        reason = qc_reason(task, result.text, definitions[task["id"]])
                        if reason:
                            raise AnswerRejected(f"qc: {reason}")
                    record = record_of(request, answer, fields)
                    if capture is not None and not fields:
                        record[top_logprobs.FIELD] = capture(result)
                    report_rows.add_row(record)
                    return record

                todo = pending
                if (
                    reader is not None and settings.batch_calibrate
                ):  # closed samples: asked first, then written
                    todo = [p for p in pending if p.task_id not in scored]
                    closed = [p for p in plan if p.task_id in scored]
                    asked_own = {p.id: label_request(build(p), by_id[p.task_id]["labels"]) for p in closed}
                    own = answer_label_requests(stage, "labels", teacher, cache, reader, list(asked_own.values()), config, progress)  # fmt: skip
                    prior_key = {p.id: batch_prior_key(p.id, by_id[p.task_id]) for p in closed}
                    asked_failed = (
                        stage.folder / "labels" / "failures.jsonl"
                    )  # label questions without a label
                    asked_failures = (
                        {r["id"]: r for r in iter_jsonl(asked_failed)} if asked_failed.is_file() else {}
                    )
                    ok, bad = batch_calibrated_records(
                        stage, [asked_own[p.id] for p in pending if p.task_id in scored], prior_key, own,
                        reading, combined, decided, record_of, asked_failures,
                    )  # fmt: skip
                    for record in ok:
                        report_rows.add_row(record)
                    stage.append(ok)
                    stage.fail(bad)
                    stage.extra["batch_calibrated"] = {"written": len(ok), "not_written": len(bad)}
                # requests are rendered while earlier ones are in flight
                lazy = (build(p) for p in todo)
                counts = answer_requests(
                    stage, teacher, lazy, to_record, cache=cache, progress=progress, total=len(todo)
                )
                stage.extra.update(call=counts, teacher_usage=teacher.usage.to_dict())
        report_rows.add_failures(stage.failures_path)
        report = report_rows.result()
        stage.write_artifact("report.json", report)
        stage.write_artifact("report.md", report_markdown(report))
        stage.extra.update(
            planned=len(plan),
            report_summary={k: report[k] for k in ("samples", "rejected_qc", "failed_calls")},
        )
        console.print(
            f"{name}: {report['samples']}/{len(plan)} samples, {report['rejected_qc']} dropped by QC, "
            f"{report['failed_calls']} failed calls -> {stage.data_path}"
        )
    assert stage.manifest is not None
    return stage.manifest


def label_request(request: ChatRequest, labels: list[str]) -> ChatRequest:
    """A closed sample's own label question as the ``generate/labels/`` sub-stage asks it."""
    request.meta.update(group=request.id, labels=labels, template=request.meta.get("template"))
    return request


BATCH_PRIORS_FILE = "batch_priors.json"


def batch_prior_key(sample_id: str, task: dict[str, Any]) -> str:
    """Which samples share a batch-calibration prior: a seed task's samples asked in the same wording
    (each wording has a bias of its own), a teacher task's samples (one wording, demos drawn per sample)."""
    words = task.get("wordings") or []
    return f"{task['id']}#w{wording_index(sample_id, len(words))}" if len(words) > 1 else task["id"]


def batch_calibrated_records(
    stage: Stage,
    requests: list[ChatRequest],
    prior_key: dict[str, str],
    own: dict[str, list[dict[str, Any]]],
    reading: Callable[[dict[str, float], str | None], dict[str, float]],
    combined: Callable[[str, dict[str, float]], tuple[dict[str, float], dict[str, Any]]],
    decided: Callable[[dict[str, float], dict[str, Any]], tuple[str, dict[str, Any]]],
    record_of: Callable[[ChatRequest, str, dict[str, Any]], dict[str, Any]],
    asked_failures: dict[str, dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Batch calibration (``generate.batch_calibrate``; Zhou et al. 2023): each closed sample's distribution
    divided by the mean distribution of the run's closed samples that share its prior (``prior_key``: the
    same task and wording; answers in ``own``), renormalised, then decided. The priors are computed once,
    when the first records are written, and kept in the stage folder (``batch_priors.json``), so records
    written by a resumed run use the same ones. Returns (records, failures) for ``requests``; a sample
    whose label question failed is kept as failed and asked again by a later run, one whose answer held
    no label (``asked_failures``: the label sub-stage's failures by id) is kept as rejected, with its reason."""
    asked_failures = asked_failures or {}
    dists: dict[str, tuple[dict[str, float], dict[str, Any]]] = {}
    unreadable: dict[str, str] = {}
    for sample_id, rows in own.items():
        if sample_id in prior_key and rows:
            try:
                dists[sample_id] = combined(
                    sample_id, reading(rows[0]["label_probs"], rows[0].get("template"))
                )
            except AnswerRejected as exc:
                unreadable[sample_id] = str(exc)
    by_key: dict[str, list[dict[str, float]]] = defaultdict(list)
    for sample_id, (probs, _) in dists.items():
        by_key[prior_key[sample_id]].append(probs)
    saved = stage.folder / BATCH_PRIORS_FILE
    kept = json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else {}
    priors = {
        key: {label: float(np.mean([d[label] for d in rows])) for label in rows[0]}
        for key, rows in by_key.items()
    }
    priors.update(kept)  # a prior once used stays the prior of every record of its samples
    if priors.keys() - kept.keys():
        stage.write_artifact(BATCH_PRIORS_FILE, priors)
    ok, bad = [], []
    for request in requests:
        meta = {"task_id": request.meta["task_id"], "text_id": request.meta["text_id"]}
        prior = priors.get(prior_key[request.id])
        if request.id in unreadable:
            bad.append(
                {
                    "id": request.id,
                    "reason": f"rejected: {unreadable[request.id]}",
                    "kind": "rejected",
                    **meta,
                }
            )
            continue
        if request.id not in dists or prior is None:
            failed = asked_failures.get(request.id)
            if failed and failed.get("kind") == "rejected":  # the teacher's answer held no label
                bad.append({"id": request.id, "reason": failed["reason"], "kind": "rejected", **meta})
                continue
            reason = "its label question was not answered (generate/labels/failures.jsonl); a later run asks it again"
            bad.append({"id": request.id, "reason": reason, "kind": "failed", **meta})
            continue
        probs, fields = dists[request.id]
        labels = list(probs)
        before = max(probs, key=probs.__getitem__)  # the label as decided without the batch's prior
        out = calibrate(
            np.array([[probs[label] for label in labels]]), np.array([[prior[label] for label in labels]])
        )[0]
        probs = {label: round(float(p), 6) for label, p in zip(labels, out)}
        try:
            answer, fields = decided(
                probs, {**fields, "batch_calibrated": True, "label_before_batch_calibration": before}
            )
        except AnswerRejected as exc:
            bad.append({"id": request.id, "reason": f"rejected: {exc}", "kind": "rejected", **meta})
            continue
        ok.append(record_of(request, answer, fields))
    return ok, bad


def merge_shards(recipe: Recipe, force: bool = False) -> dict[str, Any]:
    """Join every finished ``generate-shard-K-of-N`` into ``generate`` (in sample order)."""
    shards = finished_shards(recipe.run_dir, "generate")
    tasks_file = recipe.run_dir / "tasks" / TASKS_FILE
    inputs = {"tasks": tasks_file, **source_inputs(recipe.data.user_texts, recipe.data.dir)}
    check_shards_match(shards, _stage_config(recipe), inputs)
    stage = Stage.open(recipe.run_dir, "generate", config=_stage_config(recipe), inputs=inputs, force=force)
    with stage:
        if stage.was_complete:  # merged before from these very shards: left as it is
            console.print(f"generate: merge up to date ({stage.folder})")
        else:
            merge_shard_records(stage, shards)
            by_id = {t["id"]: t for t in load_tasks(tasks_file)}
            planned = sum((read_manifest(p) or {}).get("planned", 0) for p in shards)
            report = build_report(stage.data_path, stage.failures_path, by_id, planned)
            stage.write_artifact("report.json", report)
            stage.write_artifact("report.md", report_markdown(report))
            stage.extra.update(merged_shards=[p.name for p in shards], planned=planned)
            console.print(f"generate: merged {len(shards)} shards, {stage.n_ok} samples -> {stage.data_path}")
    assert stage.manifest is not None
    return stage.manifest


class ReportBuilder:
    """Counts per task, answer lengths, and class balance of closed-set answers, fed row by row."""

    def __init__(self, tasks: dict[str, dict[str, Any]], planned: int):
        self.tasks = tasks
        self.planned = planned
        self.per_task: dict[str, Counter] = defaultdict(Counter)
        self.balance: dict[str, Counter] = defaultdict(Counter)
        self.lengths: list[int] = []
        self.ok_ids: set[str] = set()
        self.failed_ids: set[str] = set()
        self.rejected = self.failed = self.low_confidence = 0
        self.confidences: list[float] = []
        self.moved: dict[str, Counter] = defaultdict(Counter)  # batch calibration: labels kept / changed

    def add_row(self, row: dict[str, Any]) -> None:
        self.ok_ids.add(row["id"])
        answer = row["messages"][-1]["content"]
        self.lengths.append(len(answer.split()))
        self.per_task[row["task_id"]]["ok"] += 1
        task = self.tasks.get(row["task_id"], {})
        if "teacher_confidence" in row:
            self.confidences.append(float(row["teacher_confidence"]))
        if task.get("type") == "closed_classification" and task.get("labels"):
            self.balance[row["task_id"]][match_label(answer, task["labels"]) or "(other)"] += 1
        if "label_before_batch_calibration" in row:
            changed = row["label_before_batch_calibration"] != answer
            self.moved[row["task_id"]]["changed" if changed else "kept"] += 1

    def add_failures(self, path: Path) -> None:
        """Failures of items that never succeeded, each counted once (the file keeps every attempt)."""
        if not path.exists():
            return
        for row in iter_jsonl(path):
            if row["id"] in self.ok_ids or row["id"] in self.failed_ids:
                continue
            self.failed_ids.add(row["id"])
            key = "rejected" if row.get("kind") == "rejected" else "failed"
            self.per_task[row.get("task_id", "?")][key] += 1
            self.rejected += key == "rejected"
            self.failed += key == "failed"
            self.low_confidence += LOW_CONFIDENCE in str(row.get("reason", ""))

    def result(self) -> dict[str, Any]:
        lengths = self.lengths
        by_type: Counter = Counter()
        for task_id, counts in self.per_task.items():
            if task_id in self.tasks and counts["ok"]:
                by_type[self.tasks[task_id]["type"]] += counts["ok"]
        return {
            "planned": self.planned,
            "samples": len(self.ok_ids),
            "rejected_qc": self.rejected,
            "failed_calls": self.failed,
            "label_scored": len(self.confidences),
            "rejected_low_confidence": self.low_confidence,
            "teacher_confidence_mean": round(statistics.fmean(self.confidences), 4)
            if self.confidences
            else None,
            "answer_words": {
                "mean": round(statistics.fmean(lengths), 2) if lengths else 0,
                "median": statistics.median(lengths) if lengths else 0,
                "max": max(lengths, default=0),
            },
            "per_task": {t: dict(c) for t, c in sorted(self.per_task.items())},
            "closed_set_balance": {t: dict(c) for t, c in sorted(self.balance.items())},
            "batch_calibration_changed": {
                t: {"changed": c["changed"], "of": c["changed"] + c["kept"]}
                for t, c in sorted(self.moved.items())
            },
            "by_type": dict(by_type),
        }


def build_report(
    data_path: Path, failures_path: Path, tasks: dict[str, dict[str, Any]], planned: int
) -> dict[str, Any]:
    """The report of a stage folder, read from its files."""
    builder = ReportBuilder(tasks, planned)
    if data_path.exists():
        for row in iter_jsonl(data_path):
            builder.add_row(row)
    builder.add_failures(failures_path)
    return builder.result()


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a short markdown page."""
    lines = [
        "# Distillation set",
        "",
        f"- samples: {report['samples']} of {report['planned']} planned",
        f"- dropped by QC: {report['rejected_qc']} (of them for low teacher confidence: "
        f"{report.get('rejected_low_confidence', 0)}); failed teacher calls: {report['failed_calls']}",
        f"- closed-task answers read as label distributions: {report.get('label_scored', 0)} (mean teacher "
        f"confidence {report.get('teacher_confidence_mean') or '-'})",
        f"- answer length (words): mean {report['answer_words']['mean']}, median {report['answer_words']['median']}, "
        f"max {report['answer_words']['max']}",
        f"- by task type: {', '.join(f'{k}: {v}' for k, v in sorted(report['by_type'].items())) or '-'}",
        "",
        "| task | ok | dropped by QC | failed |",
        "|---|---:|---:|---:|",
    ]
    for task_id, counts in report["per_task"].items():
        lines.append(
            f"| {task_id} | {counts.get('ok', 0)} | {counts.get('rejected', 0)} | {counts.get('failed', 0)} |"
        )
    if report["closed_set_balance"]:
        lines += ["", "## Closed-set answers", "", "| task | label counts |", "|---|---|"]
        for task_id, counts in report["closed_set_balance"].items():
            lines.append(f"| {task_id} | {', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))} |")
    moved = report.get("batch_calibration_changed") or {}
    if moved:
        lines += [
            "",
            "## Labels batch calibration changed",
            "",
            "The student learns the calibrated label; where it differs from the label before batch calibration,",
            "a student that learns it well agrees less with the teacher as it answers uncalibrated.",
            "",
            "| task | changed | of | share |",
            "|---|---:|---:|---:|",
        ]
        for task_id, c in moved.items():
            lines.append(f"| {task_id} | {c['changed']} | {c['of']} | {c['changed'] / max(1, c['of']):.1%} |")
    return "\n".join(lines) + "\n"
