"""GPU paths (bf16 generation, CUDA embeddings). Skipped cleanly where no CUDA device exists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compeff.config import EmbedderSettings
from compeff.embeddings import embed_texts
from compeff.teachers import ChatRequest, SamplingParams
from compeff.teachers.hf_local import HFTeacher, pick_device, pick_dtype

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def test_auto_device_and_dtype_follow_the_hardware():
    device = pick_device("auto")
    assert device == ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        assert pick_dtype("auto", device) == torch.float32


@cuda
def test_hf_teacher_generates_in_bf16_on_cuda(tiny_lm):
    teacher = HFTeacher(str(tiny_lm), device="cuda", dtype="auto")
    assert teacher.lm.dtype == torch.bfloat16 and next(teacher.lm.parameters()).is_cuda
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=True, top_logprobs=2)
    asks = [
        ChatRequest(id=str(i), messages=[{"role": "user", "content": t}], params=params)
        for i, t in enumerate(["great film", "bad"])
    ]
    results = list(teacher.generate(asks))
    assert all(r.ok and r.usage["completion_tokens"] > 0 for r in results)
    assert all(tok["logprob"] <= 0 for r in results for tok in r.logprobs[0]["content"])


@cuda
def test_cuda_embeddings_match_cpu():
    names = ["tone", "use of sarcasm", "star rating"]
    cpu = embed_texts(names, EmbedderSettings(device="cpu"))
    gpu = embed_texts(names, EmbedderSettings(device="cuda"))
    assert np.min(np.sum(cpu * gpu, axis=1)) > 0.999


@cuda
def test_rank_scores_on_cuda_match_the_cpu_kernel():
    from compeff.select.rank import token_scores

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 4096, generator=gen) * torch.linspace(0.01, 10, 300)[:, None]
    targets = torch.randint(0, 4096, (300,), generator=gen)
    cpu_scores, cpu_nll = token_scores(logits, targets, 0.95)
    gpu_scores, gpu_nll = token_scores(logits.cuda(), targets.cuda(), 0.95)
    # CUDA's softmax may round a probability differently in the last bit: allow a rare nucleus edge
    differ = (gpu_scores.cpu() - cpu_scores).abs() > 1e-9
    assert differ.float().mean() <= 0.01
    assert torch.allclose(gpu_nll.cpu(), cpu_nll, rtol=1e-5)
