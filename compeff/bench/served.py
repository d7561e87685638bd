"""``compeff bench teacher --server llamacpp``: the ``generate`` stage against a real llama.cpp server,
against that server's own ceiling.

compeff starts llama.cpp's OpenAI-compatible server on SmolLM2 (``teacher.serve``), runs the recipe's
chain up to ``tasks`` through it, then times ``generate`` (completion tokens per second of the stage,
from the server's usage counts over the stage's wall time). The ceiling is the same prompts, sampling
settings and seeds answered by ``llama_cpp.Llama`` in one process with the same threads: no HTTP, no
queue, no bookkeeping. The ratio is what compeff's client, scheduling and records cost.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from compeff.config import load_recipe
from compeff.pipeline import run_pipeline
from compeff.runs import iter_jsonl, read_manifest
from compeff.serving import llamacpp_model_file, serving
from compeff.teachers.base import request_seed


def timed_answers(
    answer, prompts: list[tuple[str, str]], max_tokens: int, temperature: float, seed: int
) -> dict[str, float]:
    """Completion tokens per second of ``answer(body) -> completion tokens`` over ``(id, prompt)`` pairs,
    one by one, each with the chat body compeff would send (its seed included)."""
    tokens = 0
    started = time.perf_counter()
    for rid, prompt in prompts:
        tokens += answer({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                          "temperature": temperature, "seed": request_seed(seed, rid)})  # fmt: skip
    seconds = time.perf_counter() - started
    return {
        "completion_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 2),
    }


def in_process_ceiling(
    model_file: str,
    prompts: list[tuple[str, str]],
    max_tokens: int,
    temperature: float,
    seed: int,
    threads: int,
) -> dict[str, float]:
    """Completion tokens per second of ``llama_cpp.Llama`` answering the prompts one by one, in process."""
    from llama_cpp import Llama

    llm = Llama(model_path=model_file, n_ctx=4096, n_threads=threads, verbose=False)
    return timed_answers(
        lambda body: int(llm.create_chat_completion(**body)["usage"]["completion_tokens"]),
        prompts, max_tokens, temperature, seed,
    )  # fmt: skip


def bare_http_rate(
    url: str, model: str, prompts: list[tuple[str, str]], max_tokens: int, temperature: float, seed: int
) -> dict[str, float]:
    """Completion tokens per second of a plain sequential HTTP loop (urllib, no compeff) against the
    server: what the server gives a client that does nothing else."""
    import urllib.request

    def answer(body: dict[str, Any]) -> int:
        request = urllib.request.Request(
            f"{url}/chat/completions",
            data=json.dumps({"model": model, **body}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=600) as resp:  # noqa: S310 - our own loopback server
            return int(json.loads(resp.read())["usage"]["completion_tokens"])

    return timed_answers(answer, prompts, max_tokens, temperature, seed)


def run_served_generate_bench(
    recipe_path: Path = Path("recipes/quickstart.yaml"),
    n_samples: int = 48,
    threads: int = 2,
    out_dir: Path = Path("runs/bench"),
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Time the generate stage through the served model and the in-process ceiling; print the table."""
    base = [
        f"run.dir={out_dir}",
        "run.name=served-bench",
        "teacher.serve.engine=llamacpp",
        f"teacher.serve.n_threads={threads}",
        f"generate.n_samples={n_samples}",
        "teacher.cache=null",  # every answer is asked, none replayed
        *(overrides or []),
    ]
    recipe = load_recipe(recipe_path, base)
    max_tokens = recipe.generate.max_tokens or recipe.teacher.max_tokens
    with serving(recipe) as served:
        run_pipeline(served, stages=["enumerate", "cluster", "tasks"], show=False)
        run_pipeline(served, stages=["generate"], force=True, show=False)
        prompts = [
            (str(r["id"]), r["messages"][0]["content"])
            for r in iter_jsonl(recipe.run_dir / "generate" / "data.jsonl")
        ]
        bare = bare_http_rate(str(served.teacher.base_urls[0]), recipe.teacher.model, prompts, max_tokens,
                              recipe.teacher.temperature, recipe.run.seed)  # fmt: skip
    manifest = read_manifest(recipe.run_dir / "generate") or {}
    usage = manifest.get("teacher_usage", {})
    stage_seconds = float(manifest.get("timings", {}).get("seconds", 0.0))
    stage_tokens = int(usage.get("completion_tokens", 0))
    ceiling = in_process_ceiling(
        llamacpp_model_file(recipe.teacher.model, recipe.teacher.serve),
        prompts,
        max_tokens,
        recipe.teacher.temperature,
        recipe.run.seed,
        threads,
    )
    stage_rate = stage_tokens / stage_seconds if stage_seconds else 0.0
    result = {
        "samples": len(prompts),
        "threads": threads,
        "stage": {
            "completion_tokens": stage_tokens,
            "seconds": stage_seconds,
            "tokens_per_s": round(stage_rate, 2),
        },
        "in_process": ceiling,
        "bare_http": bare,
        "stage_over_bare_http": round(stage_rate / bare["tokens_per_s"], 3) if bare["tokens_per_s"] else None,
        "stage_over_ceiling": round(stage_rate / ceiling["tokens_per_s"], 3)
        if ceiling["tokens_per_s"]
        else None,
        "server": manifest.get("servers"),
    }
    table = Table(
        title=f"generate through llama.cpp's server vs llama_cpp.Llama in-process ({threads} threads)"
    )
    for col in ("path", "samples", "completion tokens", "seconds", "tokens/s"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for name, row in (
        ("compeff generate -> server", result["stage"]),
        ("plain HTTP loop -> server", bare),
        ("llama_cpp.Llama in-process", ceiling),
    ):
        table.add_row(name, str(len(prompts)), str(row["completion_tokens"]), f"{row['seconds']:.1f}",
                      f"{row['tokens_per_s']:.1f}")  # fmt: skip
    console = Console()
    console.print(table)
    console.print(f"stage / in-process ceiling: {result['stage_over_ceiling']}; "
                  f"stage / plain HTTP loop: {result['stage_over_bare_http']}")  # fmt: skip
    (recipe.run_dir / "served_bench.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result
