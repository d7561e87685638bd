"""Teachers: one interface (:class:`Teacher`), three backends, one cache."""

from __future__ import annotations

import json
import os

from compeff.teachers.base import (
    ChatRequest,
    SamplingParams,
    Teacher,
    TeacherError,
    TeacherResult,
    TeacherUnavailable,
    Usage,
)
from compeff.teachers.cache import TeacherCache

__all__ = [
    "ChatRequest",
    "SamplingParams",
    "Teacher",
    "TeacherCache",
    "TeacherError",
    "TeacherResult",
    "TeacherUnavailable",
    "Usage",
    "make_teacher",
    "sampling_params",
]


def sampling_params(settings, schema: dict | None = None, **override) -> SamplingParams:
    """SamplingParams from a recipe's TeacherSettings, with per-call overrides; ``schema`` (a JSON
    schema the answer must follow) is kept when ``teacher.structured_output`` is on."""
    base = dict(
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_tokens=settings.max_tokens,
        n=settings.n,
        logprobs=settings.logprobs,
        top_logprobs=settings.top_logprobs,
    )
    if schema is not None and getattr(settings, "structured_output", False):
        base["json_schema"] = json.dumps(
            schema, separators=(",", ":")
        )  # property order kept: it is the answer's
    base.update(override)
    return SamplingParams(**base)


def make_teacher(settings, seed: int | None = None, **engine_kwargs) -> Teacher:
    """Build the backend a recipe's ``teacher`` section names (heavy imports happen only here).

    ``seed`` (the run seed) gives every sampled request its own seed, derived from its id;
    ``engine_kwargs`` go to ``vllm.LLM`` (vllm backend only)."""
    teacher = _make_backend(settings, engine_kwargs)
    teacher.seed = seed
    return teacher


def _make_backend(settings, engine_kwargs: dict) -> Teacher:
    if settings.backend == "openai":
        from compeff.teachers.endpoints import check_reachable
        from compeff.teachers.openai_api import OpenAITeacher

        check_reachable(settings.base_urls)  # nothing listening: one line now, not every item failed
        return OpenAITeacher(
            model=settings.model,
            base_urls=settings.base_urls,
            api_key=os.environ.get(settings.api_key_env, ""),
            concurrency=settings.concurrency,
            timeout_s=settings.timeout_s,
            max_retries=settings.max_retries,
            backoff_s=settings.backoff_s,
            backoff_max_s=settings.backoff_max_s,
            client_process=settings.client_process,
            response_format=settings.response_format,
        )
    if settings.backend == "vllm":
        from compeff.teachers.vllm_engine import VLLMTeacher

        return VLLMTeacher(
            settings.model,
            tensor_parallel_size=settings.tensor_parallel_size,
            dtype=settings.dtype,
            **engine_kwargs,
        )
    if settings.backend == "hf":
        from compeff.teachers.hf_local import HFTeacher

        return HFTeacher(
            settings.model, batch_size=settings.batch_size, device=settings.device, dtype=settings.dtype
        )
    raise ValueError(f"teacher.backend: unknown backend '{settings.backend}'")
