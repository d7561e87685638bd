"""Driving a teacher over many requests inside a stage: resume, batch-wise appends, failures, usage.

Every stage that calls a teacher goes through :func:`answer_requests`, so none writes its own
bookkeeping. ``compeff teach`` exposes it directly: a jsonl of chat requests in, answers out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from compeff.config import RaySettings, Recipe, TeacherSettings
from compeff.data import DataError, check_text
from compeff.fingerprints import weights_fingerprint
from compeff.progress import Tracker
from compeff.runs import Stage, iter_jsonl
from compeff.teachers import ChatRequest, Teacher, TeacherCache, TeacherResult, make_teacher, sampling_params

RecordFn = Callable[[ChatRequest, TeacherResult], dict[str, Any]]


class AnswerRejected(ValueError):
    """Raised by a stage's record function when a teacher answer cannot be used (e.g. unparseable)."""


def teacher_identity(settings: TeacherSettings) -> dict[str, Any]:
    """The part of the teacher config that changes answers (model, backend, sampling), not transport."""
    keys = ("backend", "model", "temperature", "top_p", "max_tokens", "n", "logprobs", "top_logprobs")
    identity = {k: getattr(settings, k) for k in keys}
    if settings.backend != "openai":  # a local model: its weights, not only its name
        identity["weights"] = weights_fingerprint(settings.model)
    return identity


def open_cache(settings: TeacherSettings) -> TeacherCache | None:
    """The recipe's request cache, or None when disabled."""
    return TeacherCache(settings.cache) if settings.cache else None


def ray_executor(recipe: Recipe) -> RaySettings | None:
    """The recipe's Ray settings when its stages run on Ray (``run.executor: ray``), else None."""
    return recipe.ray if recipe.run.executor == "ray" else None


@contextmanager
def teacher_session(
    settings: TeacherSettings, seed: int | None = None, ray: RaySettings | None = None
) -> Iterator[tuple[Teacher, TeacherCache | None]]:
    """The recipe's teacher and request cache, closed when the block ends; ``seed`` (the run seed) seeds
    every sampled request by its id (see :meth:`Teacher.seeded`). With ``ray`` the teacher's backend runs
    on a pool of Ray actors (:mod:`compeff.teachers.ray_teacher`); the cache stays in this process."""
    if ray is not None:
        from compeff.teachers.ray_teacher import RayTeacher

        teacher: Teacher = RayTeacher(settings, ray, seed=seed)
    else:
        teacher = make_teacher(settings, seed=seed)
    cache = open_cache(settings)
    try:
        yield teacher, cache
    finally:
        teacher.close()
        if cache is not None:
            cache.close()


def answer_requests(
    stage: Stage,
    teacher: Teacher,
    requests: list[ChatRequest] | Iterator[ChatRequest],
    to_record: RecordFn,
    cache: TeacherCache | None = None,
    flush_every: int = 1024,
    flush_seconds: float = 1.0,
    progress: bool = True,
    total: int | None = None,
) -> dict[str, int]:
    """Answer the requests a stage has not finished yet; append results batch by batch.

    ``to_record`` turns an ok answer into the stage's record (it may raise :class:`AnswerRejected`, and
    the raw answer then goes to ``failures.jsonl``). ``requests`` is a list, or a lazy iterator of
    requests that are all still to do (``total`` of them): it is then built while the teacher answers.
    Returns counts of this call.
    """
    by_id: dict[str, ChatRequest] = {}
    if isinstance(requests, list):
        seen: set[str] = set()
        for request in requests:
            if request.id in seen:
                raise ValueError(f"{stage.name}: request id '{request.id}' appears twice")
            seen.add(request.id)
        todo_list = stage.pending(requests)
        by_id = {r.id: r for r in todo_list}
        asked, skipped, todo = len(todo_list), len(requests) - len(todo_list), iter(todo_list)
    else:

        def registered(items: Iterator[ChatRequest]) -> Iterator[ChatRequest]:
            for item in items:
                by_id[item.id] = item
                yield item

        asked, skipped, todo = total or 0, len(stage.done_ids), registered(requests)
    counts = {"asked": asked, "skipped_done": skipped, "ok": 0, "failed": 0, "rejected": 0}
    flush_every = teacher.flush_every or flush_every
    ok_buf: list[dict[str, Any]] = []
    fail_buf: list[dict[str, Any]] = []
    rejected: list[ChatRequest] = []  # answers the stage cannot use: out of the cache, so a retry asks again
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        teacher.forget(rejected, cache)
        counts["ok"] += stage.append(ok_buf)
        stage.fail(fail_buf)
        ok_buf.clear()
        fail_buf.clear()
        rejected.clear()
        last_flush = time.monotonic()

    def answer_all(tracker: Tracker) -> None:
        for result in teacher.generate(todo, cache=cache):
            request = by_id[result.id]
            if result.ok:
                try:
                    ok_buf.append(to_record(request, result))
                    tracker.advance(ok=1)
                except (AnswerRejected, ValueError, KeyError, TypeError) as exc:
                    # an answer the stage cannot read is that item's failure, never the stage's crash
                    if not isinstance(exc, AnswerRejected):
                        exc = AnswerRejected(f"unreadable answer ({type(exc).__name__}: {exc})")
                    rejected.append(request)
                    counts["rejected"] += 1
                    counts["failed"] += 1
                    fail_buf.append(
                        {
                            **result.failure_record(),
                            "reason": f"rejected: {exc}",
                            "kind": "rejected",
                            "raw": result.texts,
                        }
                    )
                    tracker.advance(failed=1)
            else:
                counts["failed"] += 1
                fail_buf.append(result.failure_record())
                tracker.advance(failed=1)
            if len(ok_buf) + len(fail_buf) >= flush_every or time.monotonic() - last_flush > flush_seconds:
                flush()

    with Tracker(stage.name, total=asked + skipped, done=skipped, enabled=progress) as tracker:
        try:
            answer_all(tracker)
        finally:  # whatever came back is written, even when the teacher stops the stage
            flush()
            stage.extra["executor"] = teacher.executor_info()
    return counts


# ---------------------------------------------------------------------------------- compeff teach
def read_chat_requests(
    path: str | Path, settings: TeacherSettings, system: str | None = None
) -> list[ChatRequest]:
    """Read a jsonl of {id, messages} or {id, prompt}; a bad line raises DataError naming file:line."""
    params = sampling_params(settings)
    requests = []
    first_line: dict[str, int] = {}
    try:
        for lineno, row in enumerate(iter_jsonl(path), 1):
            if "id" not in row:
                raise DataError(f"{path}:{lineno}: missing 'id'")
            if isinstance(row.get("messages"), list):
                messages = row["messages"]
            elif isinstance(row.get("prompt"), str):
                messages = [{"role": "user", "content": row["prompt"]}]
            else:
                raise DataError(f"{path}:{lineno}: needs 'messages' (a list) or 'prompt' (a string)")
            if not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            ):
                raise DataError(f"{path}:{lineno}: every message needs a 'role' and a text 'content'")
            for m in messages:
                check_text(f"{path}:{lineno}", m["content"])
            if system:
                messages = [{"role": "system", "content": system}, *messages]
            rid = str(row["id"])
            if rid in first_line:
                raise DataError(
                    f"{path}:{lineno}: id {rid!r} appears twice (first on line {first_line[rid]})"
                )
            first_line[rid] = lineno
            requests.append(ChatRequest(id=rid, messages=messages, params=params))
    except ValueError as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(str(exc)) from None
    return requests


def run_teach_stage(recipe: Recipe, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Answer every request of ``teach.input`` with the recipe's teacher into ``<run>/<teach.stage>/``."""
    settings = recipe.teach
    if not settings.input:
        raise DataError("teach.input: no input file given (a jsonl of {id, messages} or {id, prompt})")
    requests = read_chat_requests(settings.input, recipe.teacher, settings.system)
    stage = Stage.open(
        recipe.run_dir,
        settings.stage,
        config={"teach": settings.model_dump(exclude={"input"}), "teacher": teacher_identity(recipe.teacher)},
        inputs={"input": settings.input},
        force=force,
    )
    with stage:
        if not stage.pending(requests):  # nothing left: do not load a model
            stage.extra.update(call={"asked": 0, "skipped_done": len(requests)}, total_requests=len(requests))
        else:
            _answer_teach_requests(recipe, stage, requests, progress)
    assert stage.manifest is not None
    return stage.manifest


def _answer_teach_requests(recipe: Recipe, stage: Stage, requests: list[ChatRequest], progress: bool) -> None:
    with teacher_session(recipe.teacher, seed=recipe.run.seed, ray=ray_executor(recipe)) as (teacher, cache):

        def to_record(request: ChatRequest, result: TeacherResult) -> dict[str, Any]:
            return {
                "id": request.id,
                "messages": request.messages,
                "response": result.text,
                "responses": result.texts if len(result.texts) > 1 else None,
                "finish_reason": result.finish_reasons[0] if result.finish_reasons else None,
                "usage": result.usage,
                "cached": result.cached,
                "teacher": teacher.model,
            }

        counts = answer_requests(stage, teacher, requests, to_record, cache=cache, progress=progress)
        stage.extra.update(teacher_usage=teacher.usage.to_dict(), call=counts, total_requests=len(requests))
