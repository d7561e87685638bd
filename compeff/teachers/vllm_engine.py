"""Backend on an in-process ``vllm.LLM``, for one GPU box without a separate server (optional extra)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from itertools import groupby
from typing import Any

from compeff.fingerprints import weights_fingerprint
from compeff.models import resolve_model
from compeff.teachers.base import ChatRequest, SamplingParams, Teacher, TeacherResult, TeacherUnavailable

MAX_TOP_LOGPROBS = 128  # generate.teacher_top_logprobs' upper bound


def completion_logprobs(completion: Any, k: int) -> dict[str, Any]:
    """One vLLM ``CompletionOutput``'s log-probabilities in the layout every backend gives
    (``{"content": [{"token", "id", "logprob", "top_logprobs": [{"token", "id", "logprob"}]}]}``:
    OpenAI's, with token ids), one entry per generated token.

    vLLM gives, per generated token, a dict token id -> ``Logprob(logprob, rank, decoded_token)`` with the
    k most likely tokens and the sampled one (k + 1 entries when the sampled token is not among them): the
    alternatives are the k most likely, the sampled token's own log-probability is read from the dict."""
    content = []
    for token_id, position in zip(completion.token_ids, completion.logprobs or []):
        position = position or {}
        ranked = sorted(position.items(), key=lambda kv: (-kv[1].logprob, kv[1].rank or 0))[:k]
        chosen = position.get(token_id)
        content.append(
            {
                "token": (chosen.decoded_token or "") if chosen is not None else "",
                "id": int(token_id),
                "logprob": float(chosen.logprob) if chosen is not None else float("-inf"),
                "top_logprobs": [
                    {"token": lp.decoded_token or "", "id": int(i), "logprob": float(lp.logprob)}
                    for i, lp in ranked
                ],
            }
        )
    return {"content": content}


class VLLMTeacher(Teacher):
    """Teacher run by vLLM's offline engine; requests with equal sampling params go in one ``chat`` call."""

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        batch_size: int = 256,
        **engine_kwargs,
    ):
        super().__init__()
        try:
            import vllm
        except ImportError as exc:
            raise TeacherUnavailable(
                "the 'vllm' backend needs vLLM in this environment: pip install 'compeff[vllm]' "
                "(or serve the model with `vllm serve` and use backend 'openai')"
            ) from exc
        self._vllm = vllm
        self.model = model
        self._identity = weights_fingerprint(resolve_model(model))
        self.batch_size = batch_size
        self.flush_every = batch_size
        # vLLM refuses requests for more log-probabilities than the engine's max_logprobs (20 unless told):
        # start it for the widest generate.teacher_top_logprobs a recipe allows
        engine_kwargs.setdefault("max_logprobs", MAX_TOP_LOGPROBS)
        self.llm = vllm.LLM(
            model=resolve_model(model),
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            **engine_kwargs,
        )

    @property
    def cache_identity(self) -> str:
        return self._identity

    def _sampling(self, params: SamplingParams) -> Any:
        extra: dict[str, Any] = {}
        if params.json_schema:  # constrained decoding: the newer and the older vLLM spelling
            import json

            schema = json.loads(params.json_schema)
            sp_module = self._vllm.sampling_params
            if hasattr(sp_module, "StructuredOutputsParams"):
                extra["structured_outputs"] = sp_module.StructuredOutputsParams(json=schema)
            else:
                extra["guided_decoding"] = sp_module.GuidedDecodingParams(json=schema)
        return self._vllm.SamplingParams(
            **extra,
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            seed=params.seed,
            stop=list(params.stop) or None,
            logprobs=params.top_logprobs if params.logprobs else None,
        )

    def _generate(self, requests: list[ChatRequest]) -> Iterator[TeacherResult]:
        def key(r: ChatRequest) -> SamplingParams:
            return dataclasses.replace(r.params, seed=None)  # seeds travel per request, not per group

        ordered = sorted(requests, key=lambda r: repr(key(r)))
        for _, group in groupby(ordered, key=key):
            group = list(group)
            for start in range(0, len(group), self.batch_size):
                chunk = group[start : start + self.batch_size]
                try:
                    outputs = self.llm.chat(
                        [r.messages for r in chunk], [self._sampling(r.params) for r in chunk], use_tqdm=False
                    )
                except Exception as exc:
                    for r in chunk:
                        yield TeacherResult(
                            id=r.id, ok=False, error=f"vllm: {exc}", error_kind="backend", meta=r.meta
                        )
                    continue
                for r, out in zip(chunk, outputs):
                    yield TeacherResult(
                        id=r.id,
                        ok=True,
                        texts=[c.text for c in out.outputs],
                        finish_reasons=[c.finish_reason for c in out.outputs],
                        logprobs=[completion_logprobs(c, r.params.top_logprobs) for c in out.outputs]
                        if r.params.logprobs
                        else None,
                        usage={
                            "prompt_tokens": len(out.prompt_token_ids or []),
                            "completion_tokens": sum(len(c.token_ids) for c in out.outputs),
                        },
                        meta=r.meta,
                    )
