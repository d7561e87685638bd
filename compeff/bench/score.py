"""``compeff bench score``: tokens scored per second, fast path against the per-token reference loop.

One scorer (a local causal LM with a large vocabulary: a BPE tokenizer trained here on IMDb texts,
a small randomly initialised Llama whose output layer spans ``--vocab`` tokens), the same samples
(an instruction with a real review, a real review as the response), one process: the reference
(an unpadded forward pass per sample, then a full sort of the vocabulary per response token) and the
fast path (:class:`compeff.select.difficulty.DifficultyScorer`, batched) score the same samples, and
their rho values are compared.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from compeff.data import load_texts
from compeff.llm_models import compeff_home


def bench_scorer_path(vocab: int, hidden: int = 128, layers: int = 2, train_steps: int = 300) -> Path:
    """A cached local scorer with a ``vocab``-wide output layer, trained ``train_steps`` steps on IMDb
    reviews so that its next-token distributions look like a language model's rather than uniform
    (built once: about two minutes on two CPU cores)."""
    from compeff.models import build_tiny_chat_model

    target = compeff_home() / f"bench-scorer-v{vocab}-h{hidden}-l{layers}-s{train_steps}"
    if (target / "config.json").exists():
        return target
    texts = [r["text"] for r in load_texts("imdb:train", limit=20000)[0]]
    tmp = target.with_name(target.name + ".tmp")
    build_tiny_chat_model(tmp, corpus=texts, vocab_size=vocab, hidden_size=hidden, layers=layers)
    if train_steps:
        train_lm(tmp, texts, train_steps)
    tmp.rename(target)
    return target


def train_lm(path: Path, texts: list[str], steps: int, seq_len: int = 128, batch_size: int = 16) -> None:
    """Plain next-token training of a saved causal LM on text chunks, in place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    if torch.cuda.is_available():
        model = model.cuda()
    ids = torch.tensor(
        [t for text in texts[:4000] for t in tokenizer(text, add_special_tokens=False)["input_ids"]],
        dtype=torch.long,
    )
    chunks = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(1, steps))
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = chunks[torch.randint(len(chunks), (batch_size,), generator=gen)].to(model.device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.cpu().eval().save_pretrained(path)


def bench_samples(n: int, seed: int = 0) -> list[tuple[str, list[dict[str, str]]]]:
    """Chat samples built from real IMDb test reviews (instruction + review, a review as the answer)."""
    rng = random.Random(seed)
    texts = [r["text"] for r in load_texts("imdb:test", limit=4 * n)[0]]
    rng.shuffle(texts)
    samples = []
    for i in range(n):
        review, answer = texts[2 * i][:1200], texts[2 * i + 1][: rng.randint(200, 900)]
        messages = [
            {
                "role": "user",
                "content": f"What does the author of this review feel about the film?\n\n{review}",
            },
            {"role": "assistant", "content": answer},
        ]
        samples.append((f"b{i:04d}", messages))
    return samples


def run_score_bench(
    n_samples: int = 200,
    vocab: int = 32000,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "float32",
    max_length: int = 1024,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Time the reference loop and the fast path on the same samples; print and return the figures."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compeff.loading import pick_device, pick_dtype
    from compeff.select.difficulty import DifficultyScorer, ScoreOptions
    from compeff.select.rank import CHUNK_ELEMENTS, nucleus_sizes
    from compeff.select.reference import reference_rho

    console = Console()
    path = bench_scorer_path(vocab)
    dev = pick_device(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype, dev)).to(dev).eval()
    options = ScoreOptions(metrics=("rank",), batch_size=batch_size, max_length=max_length)
    scorer = DifficultyScorer(model, tokenizer, options)
    samples = bench_samples(n_samples)
    examples = [scorer.prepare(i, m) for i, m in samples]
    tokens = sum(len(e.positions) for e in examples)

    def sync() -> None:
        if dev.startswith("cuda"):
            torch.cuda.synchronize()

    scorer.score_examples(examples[:2])  # warm-up (kernels, allocator)
    sync()
    start = time.perf_counter()
    fast = {}
    ordered = sorted(examples, key=lambda e: len(e.input_ids), reverse=True)
    for k in range(0, len(ordered), batch_size):
        for result in scorer.score_examples(ordered[k : k + batch_size]):
            fast[result.id] = result.difficulty["rank"]
    sync()
    fast_s = time.perf_counter() - start

    start = time.perf_counter()
    reference = {e.id: reference_rho(model, e, options.top_p) for e in examples}
    sync()
    ref_s = time.perf_counter() - start

    # the forward passes alone, to split each path's time into model and scoring
    start = time.perf_counter()
    for k in range(0, len(ordered), batch_size):
        chunk = ordered[k : k + batch_size]
        states, _ = scorer._forward([e.input_ids for e in chunk], [e.positions for e in chunk])
        if scorer.split_head:  # the output layer in the same chunks as the fast path
            head = model.get_output_embeddings()
            step = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
            with torch.inference_mode():
                for row in range(0, states.shape[0], step):
                    head(states[row : row + step])
    sync()
    fast_forward_s = time.perf_counter() - start
    first, _ = scorer.logits_at(
        [e.input_ids for e in ordered[:batch_size]], [e.positions for e in ordered[:batch_size]]
    )
    sizes = nucleus_sizes(torch.softmax(first.float(), -1), options.top_p).cpu().tolist()
    start = time.perf_counter()
    with torch.inference_mode():
        for e in examples:
            _ = model(input_ids=torch.tensor([e.input_ids], device=model.device)).logits
    sync()
    ref_forward_s = time.perf_counter() - start

    diffs = [abs(fast[k] - reference[k]) for k in reference]
    result = {
        "device": dev,
        "gpu": torch.cuda.get_device_name(0) if dev.startswith("cuda") else None,
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "vocab": model.config.vocab_size,
        "samples": n_samples,
        "response_tokens": tokens,
        "reference_s": round(ref_s, 3),
        "fast_s": round(fast_s, 3),
        "reference_tokens_per_s": round(tokens / ref_s, 1),
        "fast_tokens_per_s": round(tokens / fast_s, 1),
        "speedup": round(ref_s / fast_s, 1),
        "reference_forward_s": round(ref_forward_s, 3),
        "fast_forward_s": round(fast_forward_s, 3),
        "scoring_only_speedup": (
            round((ref_s - ref_forward_s) / (fast_s - fast_forward_s), 1) if fast_s > fast_forward_s else None
        ),
        "nucleus_size": {
            "median": float(np.median(sizes)),
            "p90": float(np.percentile(sizes, 90)),
            "share_le_64": float(np.mean(np.array(sizes) <= 64)),
        },
        "max_abs_diff": max(diffs),
        "within_1e-6": sum(d <= 1e-6 for d in diffs) / len(diffs),
    }
    table = Table(title=f"rank score, {n_samples} samples, {tokens} response tokens, vocab {result['vocab']}")
    for col in ("path", "seconds", "tokens/s"):
        table.add_column(col, justify="right")
    table.add_row("reference loop", f"{ref_s:.2f}", f"{tokens / ref_s:,.0f}")
    table.add_row("fast path", f"{fast_s:.2f}", f"{tokens / fast_s:,.0f}")
    console.print(table)
    console.print(
        f"nucleus sizes (first batch): median {result['nucleus_size']['median']:.0f}, "
        f"p90 {result['nucleus_size']['p90']:.0f}, share <= 64: {result['nucleus_size']['share_le_64']:.0%}; "
        f"scoring alone (forward passes subtracted): {result['scoring_only_speedup']}x"
    )
    console.print(
        f"speed-up {result['speedup']}x on {dev} ({result['threads']} threads, {dtype}); max |rho diff| "
        f"{result['max_abs_diff']:.2e}; samples within 1e-6: {result['within_1e-6']:.1%}"
    )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"score_bench_{dev.split(':')[0]}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
