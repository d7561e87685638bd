"""``compeff bench kd-memory``: the memory ``sft.loss: kd`` needs for the teacher's top-k arrays.

Synthetic samples in the record format ``generate`` writes (a prompt of about ``prompt_tokens`` and an
answer of ``answer_tokens`` tokens of the student's own tokenizer, the teacher's top-k at every answer
token) go through :func:`compeff.train.logit_kd.kd_features` and the training dataset, in a child
process per layout whose peak resident memory above its start is reported:

- ``answer-only arrays``: today's rows (numpy int32 / float32 at the answer positions only, the
  dataset holding row indices);
- ``full-length lists``: the layout before issue 26 (Python lists over every position, prompt included,
  then ``datasets.Dataset.from_list``), rebuilt here from the same rows for comparison.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

LAYOUTS = ("answer-only arrays", "full-length lists")
WORDS = ["good", "film", "plot", "slow", "actors", "music", "story", "great", "dull", "ending"]


def synthetic_rows(tokenizer: Any, n: int, prompt_tokens: int, answer_tokens: int, k: int) -> list[dict]:
    """``n`` chat records whose answers are spelt in the tokenizer's own tokens, each with the packed
    top-k field (random ids and normalised log-probabilities)."""
    from compeff import top_logprobs

    rng = np.random.default_rng(0)
    vocab = top_logprobs.vocab_fingerprint(tokenizer)
    per_word = max(1, len(tokenizer(" film good", add_special_tokens=False)["input_ids"]) // 2)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS, size=prompt_tokens // per_word))
        answer = " ".join(rng.choice(WORDS, size=answer_tokens // per_word))
        tokens = np.asarray(tokenizer(answer, add_special_tokens=False)["input_ids"])
        ids = rng.integers(0, len(tokenizer), size=(len(tokens), k))
        logprobs = np.log(rng.dirichlet(np.ones(k), size=len(tokens)))
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        rows.append({"id": f"s{i}", "messages": messages,
                     top_logprobs.FIELD: top_logprobs.pack_arrays(tokens, ids, logprobs, vocab)})  # fmt: skip
    return rows


def _resident() -> tuple[int, int]:
    """(current, peak) resident memory of this process in bytes (Linux /proc)."""
    fields = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def measure(
    layout: str, model: str, n: int, prompt_tokens: int, answer_tokens: int, k: int
) -> dict[str, Any]:
    """One layout in this process: the peak resident memory added by building the kd training rows and
    dataset, and the seconds it took."""
    import time

    from transformers import AutoTokenizer

    from compeff.models import resolve_model
    from compeff.train.logit_kd import kd_features, row_index

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    rows = synthetic_rows(tokenizer, n, prompt_tokens, answer_tokens, k)
    pairs = [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows]
    Path("/proc/self/clear_refs").write_text("5")  # the peak counter starts again here
    start, _ = _resident()
    began = time.perf_counter()
    features, refused, _ = kd_features(tokenizer, rows, pairs, max_length=4 * (prompt_tokens + answer_tokens))
    if layout == "answer-only arrays":
        dataset = row_index(features)
    else:
        from datasets import Dataset

        dataset = Dataset.from_list([full_length_lists(f) for f in features])
    seconds = time.perf_counter() - began
    _, peak = _resident()
    tokens = sum(len(f["input_ids"]) for f in features)
    answer = sum(sum(f["completion_mask"]) for f in features)
    return {"layout": layout, "samples": len(features), "refused": sum(map(len, refused.values())),
            "tokens": tokens, "answer_tokens": answer, "k": k, "rows": len(dataset),
            "peak_added_bytes": peak - start, "seconds": round(seconds, 1)}  # fmt: skip


def full_length_lists(feature: dict[str, Any]) -> dict[str, Any]:
    """A row in the layout before: the teacher's arrays over every position as Python lists."""
    n, k = len(feature["input_ids"]), feature["teacher_ids"].shape[1]
    ids = np.zeros((n, k), dtype=np.int64)
    logprobs = np.full((n, k), -np.inf, dtype=np.float32)
    ids[feature["teacher_pos"]], logprobs[feature["teacher_pos"]] = (
        feature["teacher_ids"],
        feature["teacher_logprobs"],
    )
    return {"input_ids": feature["input_ids"], "completion_mask": feature["completion_mask"],
            "teacher_ids": ids.tolist(), "teacher_logprobs": logprobs.tolist()}  # fmt: skip


def run_kd_memory_bench(
    model: str = "builtin:smollm2",
    samples: int = 10_000,
    prompt_tokens: int = 100,
    answer_tokens: int = 500,
    k: int = 20,
    layouts: tuple[str, ...] = LAYOUTS,
    out_dir: Path = Path("runs/bench"),
) -> list[dict[str, Any]]:
    """Each layout in a child process of its own; prints and saves the table (kd_memory_bench.json)."""
    rows = []
    for layout in layouts:
        code = ("import json, sys; from compeff.bench.kd_memory import measure; "
                "print(json.dumps(measure(*json.loads(sys.argv[1]))))")  # fmt: skip
        args = json.dumps([layout, model, samples, prompt_tokens, answer_tokens, k])
        done = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            rows.append({"layout": layout, "error": f"exit {done.returncode}: {tail[0]}"})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = Table(
        title=f"compeff bench kd-memory: {samples} samples, ~{answer_tokens} answer tokens, k = {k}"
    )
    for col in ("layout", "samples", "answer tokens", "peak added (GB)", "seconds"):
        table.add_column(col, justify="left" if col == "layout" else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["layout"], "-", "-", r["error"], "-")
        else:
            table.add_row(r["layout"], str(r["samples"]), str(r["answer_tokens"]),
                          f"{r['peak_added_bytes'] / 1e9:.2f}", f"{r['seconds']:.0f}")  # fmt: skip
    Console().print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kd_memory_bench.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return rows
