"""Rank score: the fast path against the per-token reference loop and against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import WORDS
from transformers import AutoModelForCausalLM, AutoTokenizer

from compeff.select import rank as rank_mod
from compeff.select.difficulty import DifficultyScorer, ScoreOptions
from compeff.select.layout import LayoutError, render, tokenize_sample
from compeff.select.rank import nucleus_sizes, rho, token_scores
from compeff.select.reference import reference_rho, reference_token_score


def make_samples(n: int, seed: int = 0) -> list[tuple[str, list[dict[str, str]]]]:
    """Chat samples with instructions and answers of mixed lengths."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        instruction = "Classify: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 25)))
        out.append(
            (f"s{i}", [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}])
        )
    return out


@pytest.fixture(params=["numba", "torch"])
def kernel(request, monkeypatch):
    """Run a test with the compiled CPU kernel and with the torch code (the GPU path)."""
    monkeypatch.setenv("COMPEFF_RANK_KERNEL", "auto" if request.param == "numba" else "torch")
    if request.param == "numba":
        assert rank_mod._cpu_kernel() is not None
    return request.param


@pytest.fixture(scope="module")
def f64_models(tiny_lm):
    """The tiny LM in float64 (so padded and unpadded logits agree to ~1e-12), flat and peaked."""
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    flat = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float64).eval()
    peaked = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float64).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # sharper distributions: nuclei of a few tokens, like a trained LM's
        peaked.get_output_embeddings().weight.mul_(60.0)
    return tok, {"flat": flat, "peaked": peaked}


def test_hand_computed_token_scores(kernel):
    # probabilities 0.5, 0.3, 0.15, 0.05 -> running sums 0.5, 0.8, 0.95, 1.0
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    logits = probs.log().float().repeat(4, 1)
    targets = torch.tensor([0, 1, 2, 3])
    # top_p 0.9: sums < 0.9 are 0.5 and 0.8 -> nucleus 3 (ranks 0, 1, 2)
    scores, nll = token_scores(logits, targets, top_p=0.9)
    assert scores.tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])  # rank 0, rank k, outside
    assert nll.tolist() == pytest.approx([-math.log(p) for p in [0.5, 0.3, 0.15, 0.05]], rel=1e-5)
    for t in range(4):
        assert reference_token_score(logits[t], t, 0.9) == pytest.approx(scores[t].item())
    # all-argmax response: every token scores 0 -> rho 0.0; exclusion is an option
    assert rho(torch.zeros(5)) == (0.0, 0)
    assert rho(torch.tensor([0.0, 0.5, 1.0])) == (0.75, 2)
    assert rho(torch.tensor([0.0, 0.5, 1.0]), exclude_argmax=False)[0] == pytest.approx(0.5)


def test_ties_follow_vocabulary_order(kernel):
    logits = torch.zeros(3, 6)  # uniform: sums 1/6, 2/6, ... -> nucleus 6 at top_p 0.95
    targets = torch.tensor([0, 2, 5])
    scores, _ = token_scores(logits, targets, top_p=0.95)
    assert scores.tolist() == pytest.approx([0.0, 2 / 6, 5 / 6])
    for row, t in enumerate(targets.tolist()):
        assert reference_token_score(logits[row], t, 0.95) == pytest.approx(scores[row].item())


@pytest.mark.parametrize("steps", [(64, 512, 4096), (2, 8, 32)])
def test_nucleus_sizes_match_a_full_sort(steps, monkeypatch):
    monkeypatch.setattr(rank_mod, "TOPK_STEPS", steps)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 300, generator=gen) * torch.linspace(0.1, 12, 40)[:, None]
    probs = torch.softmax(logits, -1)
    expected = [
        int((torch.sort(p, descending=True).values.double().cumsum(0) < 0.95).sum()) + 1 for p in probs
    ]
    assert nucleus_sizes(probs, 0.95).tolist() == expected


@pytest.mark.parametrize("kind", ["flat", "peaked"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("truncation_side", ["left", "right"])
def test_fast_path_agrees_with_reference_loop(
    f64_models, kind, padding_side, truncation_side, monkeypatch, kernel
):
    monkeypatch.setattr(rank_mod, "TOPK_STEPS", (4, 16, 128))  # every widening step gets used
    tok, models = f64_models
    model = models[kind]
    options = ScoreOptions(
        max_length=48, padding_side=padding_side, truncation_side=truncation_side, batch_size=5
    )
    scorer = DifficultyScorer(model, tok, options)
    samples = make_samples(23)
    results = {r.id: r for batch in scorer.score(samples) for r in batch}
    assert len(results) == len(samples)
    truncated = 0
    for sample_id, messages in samples:
        example = scorer.prepare(sample_id, messages)
        truncated += example.truncated
        got = results[sample_id]
        if not example.positions:
            assert got.error
            continue
        assert got.difficulty["rank"] == pytest.approx(reference_rho(model, example), abs=1e-9)
        assert got.difficulty["length"] == example.response_tokens
    assert truncated > 0  # the length limit was actually hit


def test_ppl_and_ifd_match_direct_computation(f64_models, kernel):
    tok, models = f64_models
    model = models["flat"]
    scorer = DifficultyScorer(model, tok, ScoreOptions(batch_size=4))
    samples = make_samples(6, seed=3)
    results = {r.id: r for batch in scorer.score(samples) for r in batch}
    for sample_id, messages in samples:
        example = scorer.prepare(sample_id, messages)
        ids = torch.tensor([example.input_ids])
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        nll = -torch.stack([logp[p - 1, ids[0, p]] for p in example.positions]).mean()
        alone = torch.tensor([example.alone_ids])
        logp_a = torch.log_softmax(model(input_ids=alone).logits[0], -1)
        nll_a = -torch.stack([logp_a[p - 1, alone[0, p]] for p in example.alone_positions]).mean()
        got = results[sample_id].difficulty
        assert got["ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-6)
        assert got["ifd"] == pytest.approx((nll / nll_a).item(), rel=1e-6)


def test_response_span_from_offsets(tiny_lm):
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    messages = [
        {"role": "user", "content": "Rate it: great film"},
        {"role": "assistant", "content": "positive"},
    ]
    text, start, end = render(messages, "plain", "\n")
    assert text[start:end] == "positive"
    example = tokenize_sample("a", messages, tok, "plain", "\n")
    assert tok.decode([example.input_ids[p] for p in example.positions]) == "positive"
    chat = tokenize_sample("a", messages, tok, "chat")
    assert tok.decode([chat.input_ids[p] for p in chat.positions]) == "positive"
    with pytest.raises(LayoutError, match="assistant"):
        tokenize_sample("b", messages[:1], tok)


def test_wide_and_crowded_rows_match_the_reference(kernel):
    """Near-uniform rows (one crowded histogram bucket), rows summing below top_p, many exact ties."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.cat(
        [
            torch.randn(6, 5000, generator=gen) * 0.001,  # almost uniform: every float in one bucket
            torch.randn(6, 5000, generator=gen) * 3,
            torch.zeros(2, 5000),  # exact ties everywhere
            torch.full((2, 5000), -1e4).index_fill_(1, torch.tensor([7]), 0.0),  # one token takes it all
        ]
    )
    targets = torch.randint(0, 5000, (16,), generator=gen)
    for top_p in (0.5, 0.95, 1.0):
        scores, _ = token_scores(logits, targets, top_p)
        expected = [reference_token_score(logits[i], int(targets[i]), top_p) for i in range(16)]
        assert scores.tolist() == pytest.approx(expected, abs=1e-12)


def test_the_nucleus_edge_is_strict():
    """A running sum equal to top_p ends the nucleus: 0.5 + 0.25 is not < 0.75 (exact in binary)."""
    import numpy as np

    from compeff.select.rank_kernel import score_rows

    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125]] * 2)
    assert nucleus_sizes(probs, 0.75).tolist() == [2, 2]
    out = np.empty(2)
    score_rows(probs.numpy(), np.array([1, 2]), 0.75, out)
    assert out.tolist() == [0.5, 1.0]  # rank 1 of 2; rank 2 is outside
