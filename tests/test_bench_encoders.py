"""The encoder benchmark: ONNX export fidelity, INT8 agreement, the NVML sampler, table and plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from compeff.bench.encoders import (
    export_onnx,
    make_batches,
    ort_session,
    quantize_dynamic_int8,
    run_encoder_bench,
)
from compeff.bench.power import Sampler, integrated_energy_j, nvml_sampler, rss_bytes
from compeff.data import load_labelled
from compeff.models import minilm_path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """The shipped MiniLM briefly fine-tuned on TweetEval (a real, if weak, classifier), saved as a folder."""
    from compeff.train.encoder_kd import encode, train_classifier

    folder = tmp_path_factory.mktemp("clf") / "minilm-clf"
    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=3)
    rows, _, _ = load_labelled("tweeteval_sentiment:validation", limit=320)
    data = encode(tok, [r["text"] for r in rows], [r["label"] for r in rows], 64)
    train_classifier(model, data, epochs=3, lr=1e-4, batch_size=16, seed=0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def real_texts(n: int) -> list[str]:
    rows, _, _ = load_labelled("tweeteval_sentiment:test", limit=n)
    return [r["text"] for r in rows]


def test_onnx_export_matches_pytorch_and_int8_agrees(classifier, tmp_path):
    tok = AutoTokenizer.from_pretrained(classifier)
    model = AutoModelForSequenceClassification.from_pretrained(classifier).eval()
    fp32 = export_onnx(model, tok, tmp_path / "model.onnx")
    batches = make_batches(tok, real_texts(160), 32, 128, None)
    session = ort_session(fp32, 2)
    torch_logits, ort_logits = [], []
    for b in batches:
        with torch.inference_mode():
            torch_logits.append(model(**{k: torch.from_numpy(v) for k, v in b.items()}).logits.numpy())
        ort_logits.append(session.run(["logits"], b)[0])
    torch_logits, ort_logits = np.concatenate(torch_logits), np.concatenate(ort_logits)
    assert np.abs(torch_logits - ort_logits).max() <= 1e-4
    int8 = ort_session(quantize_dynamic_int8(fp32, tmp_path / "int8.onnx"), 2)
    int8_logits = np.concatenate([int8.run(["logits"], b)[0] for b in batches])
    # a coin-flip prediction (top two probabilities within 0.05) flips under any perturbation; INT8 must
    # keep every decided one, and the classifier must decide most of the slice for this to mean anything
    probs = np.sort(torch.softmax(torch.from_numpy(torch_logits), -1).numpy(), 1)
    decided = probs[:, -1] - probs[:, -2] > 0.05
    assert decided.mean() >= 0.5
    agreement = (int8_logits.argmax(1) == torch_logits.argmax(1))[decided].mean()
    assert agreement >= 0.97
    assert (int8_logits.argmax(1) == torch_logits.argmax(1)).mean() >= 0.9


def test_samplers():
    sampler = Sampler(rss_bytes, 0.001).start()
    _ = np.ones(2_000_000)
    samples = sampler.stop()
    assert len(samples) >= 2 and sampler.peak > 0
    assert integrated_energy_j([(0.0, 100.0), (1.0, 100.0), (3.0, 200.0)]) == pytest.approx(100 + 300)
    power = nvml_sampler()
    if power is None:
        pytest.skip(
            "no NVML here (no nvidia-ml-py or no NVIDIA GPU): the benchmark reports power as not measured"
        )
    assert power.watts() > 0


def test_bench_writes_table_csv_json_and_plot(classifier, tmp_path):
    rows = run_encoder_bench(
        [str(classifier)], limit=40, timed=8, batch_sizes=(1, 8), warmup=1, calibration=4,
        backends=["torch-fp32", "ort-fp32", "ort-int8-dynamic", "ort-int8-static", "torch-bf16-cuda"],
        out_dir=tmp_path,
    )  # fmt: skip
    by = {(r.model, r.backend, r.batch_size): r for r in rows}
    fp32 = by[("minilm-clf", "torch-fp32", 1)]
    assert fp32.latency_ms_p50 > 0 and fp32.throughput > 0 and fp32.parameters > 20e6 and fp32.peak_rss_mb > 0
    assert by[("minilm-clf", "ort-int8-dynamic", 8)].size_mb < by[("minilm-clf", "ort-fp32", 8)].size_mb / 2
    assert by[("minilm-clf", "ort-fp32", 1)].agreement_fp32 == 1.0
    if not torch.cuda.is_available():
        assert "no CUDA" in by[("minilm-clf", "torch-bf16-cuda", 1)].note
    assert ("tfidf-lr", "sklearn", 8) in by
    data = json.loads((tmp_path / "encoders_bench.json").read_text())
    assert len(data["rows"]) == len(rows)
    assert (
        (tmp_path / "encoders_bench.csv").read_text().splitlines()[0].startswith("model,backend,batch_size")
    )
    assert "| minilm-clf | ort-int8-static |" in (tmp_path / "encoders_bench.md").read_text()
    for b in (1, 8):
        assert (tmp_path / f"encoders_pareto_b{b}.png").read_bytes()[:4] == b"\x89PNG"
