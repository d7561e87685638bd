"""``compeff bench encoders``: accuracy, latency, throughput, memory, power and INT8 of classifiers.

Backends: PyTorch fp32 (CPU); PyTorch fp32 / bf16 / fp16 on CUDA; ONNX Runtime fp32, INT8 dynamic and
INT8 static (calibrated on training texts). ONNX files come from ``torch.onnx.export`` (the TorchScript
exporter, opset 17) and the INT8 ones from onnxruntime's own ``quantize_dynamic`` / ``quantize_static``.
Every backend runs with the same thread count. Inputs are real test texts (their length distribution)
or a fixed length. Rows also hold the TF-IDF baselines.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compeff.bench.power import Sampler, integrated_energy_j, nvml_sampler, rss_bytes

CPU_BACKENDS = ("torch-fp32", "ort-fp32", "ort-int8-dynamic", "ort-int8-static")
CUDA_BACKENDS = ("torch-fp32-cuda", "torch-bf16-cuda", "torch-fp16-cuda")


@dataclass
class Row:
    """One (model, backend, batch size) measurement."""

    model: str
    backend: str
    batch_size: int
    parameters: int | None = None
    size_mb: float | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    agreement_fp32: float | None = None
    latency_ms_mean: float | None = None
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    latency_ms_p99: float | None = None
    throughput: float | None = None
    peak_rss_mb: float | None = None
    cuda_max_allocated_mb: float | None = None
    power_w: float | None = None
    energy_j_per_sample: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def export_onnx(model: Any, tokenizer: Any, path: Path) -> Path:
    """The classifier as ONNX (dynamic batch and length), written once."""
    import torch

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    enc = tokenizer(["an example text", "another one, a little longer"], padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask"]
    axes = {n: {0: "batch", 1: "length"} for n in names} | {"logits": {0: "batch"}}
    with torch.inference_mode():
        torch.onnx.export(
            model.cpu().eval(),
            (enc["input_ids"], enc["attention_mask"]),
            str(path),
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return path


def quantize_dynamic_int8(fp32: Path, out: Path) -> Path:
    """Dynamic INT8 with per-channel weight scales (per-tensor scales flipped 9% of a weak classifier's
    predictions in a measurement, per-channel 1%)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not out.exists():
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)
    return out


def quantize_static_int8(fp32: Path, out: Path, calibration: list[dict[str, np.ndarray]]) -> Path:
    """Static INT8 (QDQ, per-channel weights) calibrated by MinMax on the given batches."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration)

        def get_next(self):
            return next(self.items, None)

    if not out.exists():
        quantize_static(
            str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
        )  # fmt: skip
    return out


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def make_batches(
    tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int, fixed_length: int | None
) -> list[dict[str, np.ndarray]]:
    """Batches of real texts (padded to the batch's longest) or of a fixed length."""
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        if fixed_length:
            enc = tokenizer(
                chunk, padding="max_length", truncation=True, max_length=fixed_length, return_tensors="np"
            )
        else:
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        out.append(
            {
                "input_ids": enc["input_ids"].astype(np.int64),
                "attention_mask": enc["attention_mask"].astype(np.int64),
            }
        )
    return out


def time_runs(run: Callable[[dict[str, np.ndarray]], Any], batches: list[dict[str, np.ndarray]], warmup: int,
              sync: Callable[[], None] = lambda: None) -> list[float]:  # fmt: skip
    """Per-batch latencies (seconds) after ``warmup`` untimed batches."""
    for b in batches[:warmup]:
        run(b)
    sync()
    times = []
    for b in batches:
        start = time.perf_counter()
        run(b)
        sync()
        times.append(time.perf_counter() - start)
    return times


def file_mb(path: Path) -> float:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**20
    return path.stat().st_size / 2**20 if path.exists() else 0.0


def _metrics(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import accuracy_score, f1_score

    pred = logits.argmax(1)
    return float(accuracy_score(labels, pred)), float(f1_score(labels, pred, average="macro"))


def bench_model(
    model_dir: Path,
    name: str,
    texts: list[str],
    labels: np.ndarray,
    calib_texts: list[str],
    backends: Sequence[str],
    batch_sizes: Sequence[int],
    threads: int,
    warmup: int,
    timed_texts: list[str],
    max_length: int,
    fixed_length: int | None,
    work_dir: Path,
) -> list[Row]:
    """Every backend x batch size of one classifier."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    params = int(sum(p.numel() for p in model.parameters()))
    eval_batches = make_batches(tokenizer, texts, 32, max_length, None)
    rows: list[Row] = []
    reference: np.ndarray | None = None
    from compeff.train.encoder_kd import weights_fingerprint

    onnx_dir = work_dir / "onnx" / f"{name}-{weights_fingerprint(model_dir)[:10]}"  # new weights, new files
    for backend in backends:
        runner, size, note, cuda, sync = None, None, "", False, (lambda: None)
        if backend.endswith("-cuda"):
            if not torch.cuda.is_available():
                rows += [Row(name, backend, b, params, note="skipped: no CUDA device") for b in batch_sizes]
                continue
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
                backend.split("-")[1]
            ]
            gpu = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype).cuda().eval()
            cuda, sync = True, torch.cuda.synchronize

            def runner(b, gpu=gpu):
                with torch.inference_mode():
                    return (
                        gpu(**{k: torch.from_numpy(v).cuda() for k, v in b.items()})
                        .logits.float()
                        .cpu()
                        .numpy()
                    )

            size = file_mb(model_dir)
        elif backend == "torch-fp32":

            def runner(b):
                with torch.inference_mode():
                    return model(**{k: torch.from_numpy(v) for k, v in b.items()}).logits.numpy()

            size = file_mb(model_dir)
        else:
            fp32 = export_onnx(model, tokenizer, onnx_dir / "model.onnx")
            if backend == "ort-fp32":
                path = fp32
            elif backend == "ort-int8-dynamic":
                path = quantize_dynamic_int8(fp32, onnx_dir / "model-int8-dynamic-per-channel.onnx")
            elif backend == "ort-int8-static":
                calib = make_batches(tokenizer, calib_texts, 8, max_length, None)
                path = quantize_static_int8(fp32, onnx_dir / "model-int8-static.onnx", calib)
                note = f"calibrated on {len(calib_texts)} training texts"
            else:
                raise ValueError(
                    f"unknown backend {backend!r} (known: {', '.join(CPU_BACKENDS + CUDA_BACKENDS)})"
                )
            session = ort_session(path, threads)

            def runner(b, session=session):
                return session.run(["logits"], b)[0]

            size = file_mb(path)
        logits = np.concatenate([runner(b) for b in eval_batches])
        acc, f1 = _metrics(logits, labels)
        if backend == "torch-fp32":
            reference = logits
        agreement = float((logits.argmax(1) == reference.argmax(1)).mean()) if reference is not None else None
        for batch_size in batch_sizes:
            batches = make_batches(tokenizer, timed_texts, batch_size, max_length, fixed_length)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            power = nvml_sampler() if cuda else None
            power_samples = Sampler(power.watts, 0.02).start() if power else None
            energy0 = power.energy_j() if power and power.has_energy_counter else None
            memory = Sampler(rss_bytes).start()
            times = time_runs(runner, batches, min(warmup, len(batches)), sync)
            memory.stop()
            row = Row(name, backend, batch_size, params, round(size, 2), acc, f1, agreement, note=note)
            lat = np.array(times) * 1000
            row.latency_ms_mean = float(lat.mean())
            row.latency_ms_p50, row.latency_ms_p95, row.latency_ms_p99 = (
                float(np.percentile(lat, q)) for q in (50, 95, 99)
            )
            samples = sum(len(b["input_ids"]) for b in batches)
            row.throughput = samples / float(np.sum(times))
            row.peak_rss_mb = memory.peak / 2**20
            if cuda:
                row.cuda_max_allocated_mb = torch.cuda.max_memory_allocated() / 2**20
            if power_samples is not None:
                watts = power_samples.stop()
                row.power_w = float(np.mean([w for _, w in watts]))
                joules = power.energy_j() - energy0 if energy0 is not None else integrated_energy_j(watts)
                row.energy_j_per_sample = joules / samples
                row.extra["energy_source"] = "counter" if energy0 is not None else "integrated power"
            elif cuda:
                row.note = (row.note + "; " if row.note else "") + "no NVML: power not measured"
            rows.append(row)
    return rows


def baseline_rows(train_texts, train_labels, texts, labels, timed_texts, batch_sizes, warmup) -> list[Row]:
    """TF-IDF + NB / LR as rows of the same table (latency of predict_proba on the same batches)."""
    from compeff.train.baselines import tfidf_baseline

    rows = []
    for kind in ("nb", "lr"):
        model = tfidf_baseline(kind).fit(list(train_texts), list(train_labels))
        acc, f1 = _metrics(model.predict_proba(list(texts)), labels)
        for batch_size in batch_sizes:
            batches = [timed_texts[i : i + batch_size] for i in range(0, len(timed_texts), batch_size)]
            times = time_runs(
                lambda b, model=model: model.predict_proba(b), batches, min(warmup, len(batches))
            )
            lat = np.array(times) * 1000
            rows.append(Row(f"tfidf-{kind}", "sklearn", batch_size, None, None, acc, f1,
                            latency_ms_mean=float(lat.mean()), latency_ms_p50=float(np.percentile(lat, 50)),
                            latency_ms_p95=float(np.percentile(lat, 95)), latency_ms_p99=float(np.percentile(lat, 99)),
                            throughput=len(timed_texts) / float(np.sum(times))))  # fmt: skip
    return rows


COLUMNS = ("model", "backend", "batch_size", "parameters", "size_mb", "accuracy", "macro_f1", "agreement_fp32",
           "latency_ms_mean", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "throughput", "peak_rss_mb",
           "cuda_max_allocated_mb", "power_w", "energy_j_per_sample", "note")  # fmt: skip


def table_markdown(rows: list[Row]) -> str:
    def f(v: Any, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    lines = [
        "| model | backend | batch | params | MB | acc | macro-F1 | agree fp32 | p50 ms | p95 ms | p99 ms | samples/s | RSS MB | W | J/sample | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        params = f"{r.parameters / 1e6:.1f}M" if r.parameters else "-"
        lines.append(
            f"| {r.model} | {r.backend} | {r.batch_size} | {params} | {f(r.size_mb, '.1f')} | "
            f"{f(r.accuracy and 100 * r.accuracy, '.1f')} | {f(r.macro_f1 and 100 * r.macro_f1, '.1f')} | "
            f"{f(r.agreement_fp32 and 100 * r.agreement_fp32, '.1f')} | {f(r.latency_ms_p50)} | {f(r.latency_ms_p95)} | "
            f"{f(r.latency_ms_p99)} | {f(r.throughput, ',.0f')} | {f(r.peak_rss_mb, '.0f')} | {f(r.power_w, '.0f')} | "
            f"{f(r.energy_j_per_sample, '.4f')} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def pareto_png(rows: list[Row], batch_size: int) -> bytes:
    """Accuracy against p50 latency (log scale) at one batch size: marker size by parameters, one colour
    per backend, the Pareto front (faster and more accurate than every point behind it) drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.batch_size == batch_size and r.latency_ms_p50 and r.accuracy is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    backends = sorted({r.backend for r in points})
    colours = plt.get_cmap("tab10")
    for i, backend in enumerate(backends):
        mine = [r for r in points if r.backend == backend]
        ax.scatter([r.latency_ms_p50 for r in mine], [100 * r.accuracy for r in mine],
                   s=[20 + (r.parameters or 1e6) / 2e5 for r in mine], color=colours(i % 10), alpha=0.7, label=backend)  # fmt: skip
        for r in mine:
            ax.annotate(r.model, (r.latency_ms_p50, 100 * r.accuracy), fontsize=7, alpha=0.8)
    front, best = [], -1.0
    for r in sorted(points, key=lambda r: r.latency_ms_p50):
        if r.accuracy > best:
            front.append(r)
            best = r.accuracy
    if front:
        ax.plot(
            [r.latency_ms_p50 for r in front],
            [100 * r.accuracy for r in front],
            "k--",
            lw=1,
            label="Pareto front",
        )
    ax.set_xscale("log")
    ax.set_xlabel(f"p50 latency, batch {batch_size} (ms, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_outputs(rows: list[Row], out_dir: Path, settings: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "encoders_bench.json").write_text(
        json.dumps({"settings": settings, "rows": [asdict(r) for r in rows]}, indent=2) + "\n"
    )
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([getattr(r, c) for c in COLUMNS])
    (out_dir / "encoders_bench.csv").write_text(buf.getvalue())
    (out_dir / "encoders_bench.md").write_text(table_markdown(rows))
    for b in settings["batch_sizes"]:
        (out_dir / f"encoders_pareto_b{b}.png").write_bytes(pareto_png(rows, b))


def run_encoder_bench(
    models: Sequence[str],
    test_set: str = "tweeteval_sentiment:test",
    train_set: str = "tweeteval_sentiment:validation",
    limit: int = 1000,
    timed: int = 256,
    batch_sizes: Sequence[int] = (1, 32),
    threads: int = 2,
    warmup: int = 5,
    calibration: int = 128,
    max_length: int = 128,
    fixed_length: int | None = None,
    backends: Sequence[str] | None = None,
    baselines: bool = True,
    out_dir: Path = Path("runs/bench"),
) -> list[Row]:
    """Benchmark classifier folders (any HF sequence classifier; ``builtin:minilm`` is not one)."""
    from rich.console import Console

    from compeff.data import DataError, load_labelled
    from compeff.evaluate.classification import stratified_subset

    if not models:
        raise DataError(
            "bench encoders: name at least one classifier folder (e.g. runs/tweeteval-kd/kd-teacher)"
        )
    rows_, _, _ = load_labelled(test_set)
    keep = stratified_subset([r["label"] for r in rows_], limit, 0)
    texts = [rows_[i]["text"] for i in keep]
    labels = np.array([rows_[i]["label"] for i in keep])
    train_rows, _, _ = load_labelled(train_set)
    rng = np.random.default_rng(0)
    calib = [
        train_rows[i]["text"]
        for i in rng.choice(len(train_rows), min(calibration, len(train_rows)), replace=False)
    ]
    timed_texts = [rows_[i]["text"] for i in rng.choice(len(rows_), timed, replace=False)]
    chosen = list(backends or CPU_BACKENDS + CUDA_BACKENDS)
    rows: list[Row] = []
    for model in models:
        path = Path(model)
        if not (path / "config.json").exists():
            raise DataError(f"{model}: not a classifier folder (no config.json)")
        rows += bench_model(path, path.name, texts, labels, calib, chosen, batch_sizes, threads, warmup, timed_texts,
                            max_length, fixed_length, out_dir)  # fmt: skip
    if baselines:
        rows += baseline_rows([r["text"] for r in train_rows], [r["label"] for r in train_rows], texts, labels,
                              timed_texts, batch_sizes, warmup)  # fmt: skip
    settings = {"test_set": test_set, "train_set": train_set, "limit": limit, "timed_texts": timed,
                "batch_sizes": list(batch_sizes), "threads": threads, "warmup": warmup, "calibration": calibration,
                "max_length": max_length, "fixed_length": fixed_length, "backends": chosen}  # fmt: skip
    write_outputs(rows, out_dir, settings)
    Console().print(table_markdown(rows))
    return rows
