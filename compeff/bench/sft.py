"""``compeff bench sft``: training tokens per second of ``compeff sft``, full fine-tuning against LoRA
(and packing on / off, the output layer at answer positions only or everywhere), on the same chat
samples and the same student, one after the other.

The samples are real IMDb reviews with the instruction of a sentiment task and the label word as the
answer; tokens counted are those TRL reports as seen by the model (``num_tokens``), over the
trainer's own runtime (model loading and data preparation excluded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from compeff.config import load_recipe
from compeff.data import load_labelled
from compeff.runs import iter_jsonl


def sft_bench_set(path: Path, n: int = 512) -> Path:
    """Chat samples over real IMDb test reviews (instruction + review, label word as the answer)."""
    rows, names, _ = load_labelled("imdb:test")
    rows = rows[:: max(1, len(rows) // n)][:n]
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            messages = [
                {"role": "user", "content": f"Is this review positive or negative?\n\n{row['text'][:400]}"},
                {"role": "assistant", "content": names[row["label"]]},
            ]
            fh.write(json.dumps({"id": row["id"], "messages": messages}) + "\n")
    return path


def run_sft_bench(
    model: str = "builtin:smollm2",
    steps: int = 30,
    batch_size: int = 8,
    max_length: int = 512,
    packing: tuple[bool, ...] = (False, True),
    out_dir: Path | None = None,
    heads: tuple[str, ...] = ("answer-only", "full"),
    methods: tuple[str, ...] = ("full", "lora"),
) -> list[dict[str, Any]]:
    """Time each (method, packing, output-layer) configuration; print a table and return the rows.
    ``heads``: the output layer only at answer positions (``sft.answer_only_head``, the default) or over
    every position (TRL's own loss), side by side on the same closed-task samples."""
    import torch

    from compeff.train.sft import run_sft_stage

    root = Path(out_dir or "runs/bench") / "sft-bench"
    root.mkdir(parents=True, exist_ok=True)
    data = sft_bench_set(root / "set.jsonl")
    results = []
    configs = [(m, p, h) for m in methods for p in packing for h in heads]
    for method, pack, head in configs:
        name = f"{method}-{'packed' if pack else 'padded'}-{head}"
        overrides = [
            f"run.dir={root}",
            f"run.name={name}",
            f"student.model={model}",
            f"sft.input={data}",
            f"sft.max_steps={steps}",
            f"sft.per_device_batch_size={batch_size}",
            f"sft.max_length={max_length}",
            f"sft.packing={str(pack).lower()}",
            "sft.logging_steps=1",
            "sft.learning_rate=1e-4",
            f"sft.answer_only_head={str(head == 'answer-only').lower()}",
        ]
        if method == "lora":
            overrides += ["sft.lora_r=16", "sft.lora_alpha=32"]
        manifest = run_sft_stage(load_recipe(None, overrides), force=True, progress=False)
        log = list(iter_jsonl(root / name / "sft" / "data.jsonl"))
        tokens = max((float(r["num_tokens"]) for r in log if "num_tokens" in r), default=0.0)
        runtime = manifest.get("train_runtime_s") or float("nan")
        results.append(
            {
                "method": method,
                "packing": pack,
                "head": head,
                "steps": manifest.get("steps"),
                "tokens": int(tokens),
                "seconds": round(float(runtime), 2),
                "tokens_per_s": round(tokens / float(runtime), 1),
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "threads": torch.get_num_threads(),
            }
        )
    table = Table(title=f"compeff sft on {model}: {steps} steps, batch {batch_size}, max_length {max_length}")
    for col in ("method", "packing", "output layer", "tokens", "seconds", "tokens/s"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            r["method"],
            str(r["packing"]),
            r["head"],
            str(r["tokens"]),
            f"{r['seconds']:.2f}",
            f"{r['tokens_per_s']:,.0f}",
        )
    Console().print(table)
    (root / "sft_bench.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
