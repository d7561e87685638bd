"""The recipe's teacher run on Ray Data actors (``run.executor: ray``), behind the one Teacher interface.

Each actor builds the recipe's backend once: an OpenAI-compatible client (every actor spreads its
requests over ``teacher.base_urls``, ``teacher.concurrency`` in flight each) or an in-process vLLM
engine (one per ``ray.gpus_per_actor`` GPUs). Requests are rendered, seeded and looked up in the answer
cache here, on the driver, before they leave (:meth:`Teacher.generate`); the actors never see the cache,
and new answers are stored here as they come back. A request that fails is a failed result with its
reason, as locally; if the Ray job itself stops, the command stops with one line after writing what
came back, and the next run asks the rest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from compeff.config import RaySettings, TeacherSettings
from compeff.data import DataError
from compeff.ray_exec import map_on_actors, new_stats
from compeff.teachers.base import ChatRequest, Teacher, TeacherResult, TeacherUnavailable


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
    settings: TeacherSettings, seed: int | None, names: tuple[str, str]
) -> Callable[[list[ChatRequest]], list[TeacherResult]]:
    """Inside an actor: the recipe's backend, built once, answering a batch of requests (no cache). It
    must be the model the driver named and keyed the cache on (``names``): a node holding other weights
    under the same path stops the job before any answer."""
    from compeff.teachers import make_teacher

    engine: dict[str, Any] = {}
    if settings.backend == "vllm" and settings.tensor_parallel_size > 1:
        engine["distributed_executor_backend"] = "mp"  # the group's GPUs are this actor's, not a new pool's
    teacher = make_teacher(settings, seed=seed, **engine)
    if (teacher.model, teacher.cache_identity) != names:
        raise TeacherUnavailable(
            f"this Ray node's {settings.model} is not the driver's (weights {teacher.cache_identity} here, "
            f"{names[1]} there): give every node the same files"
        )

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
        if settings.backend == "vllm" and ray.gpus_per_actor < settings.tensor_parallel_size:
            raise DataError(
                f"ray.gpus_per_actor {ray.gpus_per_actor:g}: a vLLM replica needs its "
                f"teacher.tensor_parallel_size ({settings.tensor_parallel_size}) GPUs; set ray.gpus_per_actor "
                f"to {settings.tensor_parallel_size}"
            )
        self.settings = settings
        self.ray = ray
        self.seed = seed
        self.model, self._identity = backend_names(settings)
        self.stats = new_stats(ray)

    @property
    def cache_identity(self) -> str:
        return self._identity

    def executor_info(self) -> dict[str, Any]:
        return dict(self.stats)

    def _generate(self, requests: Any) -> Iterator[TeacherResult]:
        todo: list[ChatRequest] = list(requests)
        kwargs = {"settings": self.settings, "seed": self.seed, "names": (self.model, self._identity)}
        key = os.environ.get(self.settings.api_key_env)  # the actors' clients send it too
        env = {self.settings.api_key_env: key} if key else None
        for results in map_on_actors(todo, teacher_worker, kwargs, self.ray, env=env, stats=self.stats):
            yield from results
