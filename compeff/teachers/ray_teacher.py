"""The recipe's teacher run on Ray Data actors (``run.executor: ray``), behind the one Teacher interface.

Each actor builds the recipe's backend once: an OpenAI-compatible client (every actor spreads its
requests over ``teacher.base_urls``, ``teacher.concurrency`` in flight each) or an in-process vLLM
engine (one per ``ray.gpus_per_actor`` GPUs). Requests are rendered, seeded and looked up in the answer
cache here, on the driver, before they leave (:meth:`Teacher.generate`); the actors never see the cache,
and new answers are stored here as they come back. A request that fails is a failed result with its
reason, as locally; if the Ray job itself fails after answers began to flow, the requests it did not
answer become failures (``kind: executor``) that the next run asks again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from compeff.config import RaySettings, TeacherSettings
from compeff.data import DataError
from compeff.ray_exec import map_on_actors
from compeff.teachers.base import ChatRequest, Teacher, TeacherResult


def backend_names(settings: TeacherSettings) -> tuple[str, str]:
    """(model name, cache identity) that the recipe's backend reports, without loading it: a served model
    is its name; a local one is keyed on its weights (a built-in's name carries its build)."""
    if settings.backend == "openai":
        return settings.model, settings.model
    from compeff.fingerprints import weights_fingerprint
    from compeff.models import resolve_model

    path = resolve_model(settings.model)
    if settings.backend == "vllm":
        return settings.model, weights_fingerprint(path)
    name = f"{settings.model}@{Path(path).name}" if settings.model.startswith("builtin:") else settings.model
    return name, weights_fingerprint(path) if Path(path).exists() else name


def teacher_worker(
    settings: TeacherSettings, seed: int | None
) -> Callable[[list[ChatRequest]], list[TeacherResult]]:
    """Inside an actor: the recipe's backend, built once, answering a batch of requests (no cache)."""
    from compeff.teachers import make_teacher

    teacher = make_teacher(settings, seed=seed)

    def answer(requests: list[ChatRequest]) -> list[TeacherResult]:
        return list(teacher.generate(requests))

    return answer


class RayTeacher(Teacher):
    """Answers on a pool of Ray actors, each holding the recipe's backend."""

    def __init__(self, settings: TeacherSettings, ray: RaySettings, seed: int | None = None):
        super().__init__()
        if settings.backend == "openai":  # nothing listening: one line now, not every item failed
            from compeff.teachers.endpoints import check_reachable

            check_reachable(settings.base_urls)
        self.settings = settings
        self.ray = ray
        self.seed = seed
        self.model, self._identity = backend_names(settings)

    @property
    def cache_identity(self) -> str:
        return self._identity

    def _generate(self, requests: Any) -> Iterator[TeacherResult]:
        todo: list[ChatRequest] = list(requests)
        answered: set[str] = set()
        kwargs = {"settings": self.settings, "seed": self.seed}
        try:
            for results in map_on_actors(todo, teacher_worker, kwargs, self.ray):
                for result in results:
                    answered.add(result.id)
                    yield result
        except DataError:
            raise
        except Exception as exc:  # the Ray job failed (not one request): say so once, keep the rest
            last = (str(exc).strip().splitlines() or [""])[-1]
            reason = f"the Ray job stopped: {type(exc).__name__}: {last}"
            if not answered:
                raise DataError(f"run.executor ray: {reason}") from None
            for request in todo:
                if request.id not in answered:
                    yield TeacherResult(id=request.id, ok=False, error=reason, error_kind="executor")
