"""Backend on transformers ``generate()``: batched, left-padded, chat-templated; CPU or GPU.

The embedded default teacher: it needs no server, so every stage runs offline on a laptop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from itertools import groupby
from pathlib import Path
from typing import Any

from compeff.fingerprints import weights_fingerprint
from compeff.loading import load_causal_lm, pick_device, pick_dtype
from compeff.models import resolve_model
from compeff.teachers.base import (
    ChatRequest,
    SamplingParams,
    Teacher,
    TeacherResult,
    TeacherUnavailable,
    hash_seeds,
)


class HFTeacher(Teacher):
    """Teacher run in-process with transformers; requests with equal sampling params share batches."""

    def __init__(
        self,
        model: str = "builtin:smollm2",
        batch_size: int = 8,
        device: str = "auto",
        dtype: str = "auto",
        max_prompt_tokens: int | None = None,
    ):
        super().__init__()
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # compeff shows its own progress

        path = resolve_model(model)
        # a built-in model is rebuilt when compeff changes it: its version is part of its name (cache keys)
        self.model = f"{model}@{Path(path).name}" if model.startswith("builtin:") else model
        # a local path is ambiguous (its files can change under the same name): key the cache on its weights
        self._identity = weights_fingerprint(path) if Path(path).exists() else self.model
        self.device = pick_device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.lm = load_causal_lm(path, pick_dtype(dtype, self.device))
        except OSError as exc:
            raise TeacherUnavailable(f"cannot load model '{model}': {exc}") from exc
        if self.tokenizer.chat_template is None:
            raise TeacherUnavailable(f"model '{model}' has no chat template; the hf backend needs one")
        self.lm.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size = batch_size
        self.flush_every = batch_size
        self._grammar_compiler: Any = None
        self._grammars: dict[str, Any] = {}
        self.max_prompt_tokens = max_prompt_tokens or getattr(self.lm.config, "max_position_embeddings", 4096)

    def _prompt_ids(self, request: ChatRequest) -> list[int]:
        ids = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    @property
    def cache_identity(self) -> str:
        return self._identity

    def _grammar_processor(self, schema_text: str, rows: int) -> Any:
        """An xgrammar logits processor holding every row of a batch to ``schema_text`` (a schema is
        compiled once per teacher; a processor serves one generate() call)."""
        try:
            import xgrammar as xgr
            from xgrammar.contrib.hf import LogitsProcessor
        except ImportError as exc:
            raise TeacherUnavailable(
                "structured output on the hf backend needs xgrammar (pip install xgrammar)"
            ) from exc
        if self._grammar_compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.lm.config.vocab_size)
            self._grammar_compiler = xgr.GrammarCompiler(info)
        compiled = self._grammars.get(schema_text)
        if compiled is None:
            # compact JSON: free whitespace lets a small model pad with newlines until max_tokens
            compiled = self._grammars[schema_text] = self._grammar_compiler.compile_json_schema(
                schema_text, any_whitespace=False
            )
        return LogitsProcessor([compiled] * rows)

    def _generate(self, requests: list[ChatRequest]) -> Iterator[TeacherResult]:
        def key(r: ChatRequest) -> SamplingParams:
            # per-request seeds do not split batches: a batch is seeded from its requests' seeds
            return dataclasses.replace(r.params, seed=None)

        ordered = sorted(requests, key=lambda r: repr(key(r)))
        for params, group in groupby(ordered, key=key):
            prepared: list[tuple[ChatRequest, list[int]]] = []
            for request in group:
                try:
                    ids = self._prompt_ids(request)
                except Exception as exc:  # bad messages: this request fails, the rest go on
                    yield TeacherResult(
                        id=request.id,
                        ok=False,
                        error=f"chat template: {exc}",
                        error_kind="input",
                        meta=request.meta,
                    )
                    continue
                if len(ids) + params.max_tokens > self.max_prompt_tokens:
                    yield TeacherResult(
                        id=request.id,
                        ok=False,
                        error=f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} exceeds the model's "
                        f"{self.max_prompt_tokens} positions",
                        error_kind="input",
                        meta=request.meta,
                    )
                    continue
                prepared.append((request, ids))
            prepared.sort(key=lambda item: len(item[1]))  # similar lengths batch with less padding
            for start in range(0, len(prepared), self.batch_size):
                batch = prepared[start : start + self.batch_size]
                seeds = [r.params.seed for r, _ in batch if r.params.seed is not None]
                seed = hash_seeds(seeds) if seeds else None
                yield from self._run_batch(batch, dataclasses.replace(params, seed=seed))

    def _run_batch(
        self, batch: list[tuple[ChatRequest, list[int]]], params: SamplingParams
    ) -> Iterator[TeacherResult]:
        import torch

        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for _, ids in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (_, ids) in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        sample = params.temperature > 0
        copies = params.n if sample else 1  # greedy answers are identical: decode once, repeat
        gen_kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_tokens,
            do_sample=sample,
            num_return_sequences=copies,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_logits=params.logprobs,
        )
        if sample:
            gen_kwargs.update(temperature=params.temperature, top_p=params.top_p)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        if params.json_schema:
            gen_kwargs["logits_processor"] = [
                self._grammar_processor(params.json_schema, len(batch) * copies)
            ]
        try:
            with torch.inference_mode():
                out = self.lm.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention.to(self.device),
                    **gen_kwargs,
                )
        except Exception as exc:  # e.g. out of memory: every request of the batch fails with the reason
            for request, _ in batch:
                yield TeacherResult(
                    id=request.id, ok=False, error=f"generate: {exc}", error_kind="backend", meta=request.meta
                )
            return
        new_tokens = out.sequences[:, width:].cpu()
        logprobs = self._logprobs(out, new_tokens, params) if params.logprobs else None
        eos = self.tokenizer.eos_token_id
        for row, (request, ids) in enumerate(batch):
            texts, reasons, lps, completion = [], [], [], 0
            for j in range(params.n):
                k = row * copies + (j if sample else 0)
                seq = new_tokens[k].tolist()
                length = len(seq)
                for pos, tok in enumerate(seq):
                    if tok in (eos, pad):
                        length = pos
                        break
                completion += length
                texts.append(self.tokenizer.decode(seq[:length], skip_special_tokens=True))
                reasons.append("stop" if length < len(seq) else "length")
                if logprobs is not None:
                    # an answer that ends at once still reports its first position (what label scoring reads)
                    lps.append({"content": logprobs[k][: max(length, 1)]})
            yield TeacherResult(
                id=request.id,
                ok=True,
                texts=texts,
                finish_reasons=reasons,
                logprobs=lps or None,
                usage={"prompt_tokens": len(ids), "completion_tokens": completion},
                meta=request.meta,
            )

    def _logprobs(self, out: Any, new_tokens: Any, params: SamplingParams) -> list[list[dict[str, Any]]]:
        """Per generated token: its log-probability and the top-k alternatives (OpenAI layout, with token
        ids). Read from the model's raw logits, before temperature, top-p or a grammar change them (as
        vLLM reports them), so they are the teacher's own distribution."""
        import torch

        scores = torch.stack(out.logits, dim=1).float().log_softmax(-1).cpu()  # (rows, steps, vocab)
        chosen = scores.gather(-1, new_tokens[:, : scores.shape[1]].unsqueeze(-1)).squeeze(-1)
        k = max(params.top_logprobs, 1)
        top_v, top_i = scores.topk(k, dim=-1)
        decode = self.tokenizer.convert_ids_to_tokens
        rows = []
        for r in range(scores.shape[0]):
            toks = decode(new_tokens[r, : scores.shape[1]].tolist())
            rows.append(
                [
                    {
                        "token": toks[s],
                        "id": int(new_tokens[r, s]),
                        "logprob": float(chosen[r, s]),
                        "top_logprobs": [
                            {"token": t, "id": i, "logprob": float(v)}
                            for t, i, v in zip(
                                decode(top_i[r, s].tolist()), top_i[r, s].tolist(), top_v[r, s].tolist()
                            )
                        ][: params.top_logprobs],
                    }
                    for s in range(scores.shape[1])
                ]
            )
        return rows

    def close(self) -> None:
        self.lm = None
