"""``compeff bench generate``: samples/s of the whole generate stage against the raw client.

Both run against the same loopback server (its own process, scripted answers, fixed latency) on the
same planned requests, one after the other: the raw client is an ``OpenAITeacher`` started, its
``generate`` over the rendered requests, and closed (its client process starts and stops in every round,
as it does in the stage); the pipeline is ``run_generate_stage`` end to end (load texts, plan, render,
teacher, QC, batch-wise fsync'd appends, report), with the SQLite cache off and on.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from compeff.bench.teacher import start_server
from compeff.config import load_recipe
from compeff.data import select_user_texts
from compeff.synth.generate import run_generate_stage
from compeff.synth.instructions import pairing_prompts, plan_pairings
from compeff.teachers import ChatRequest, sampling_params
from compeff.teachers.openai_api import OpenAITeacher


def bench_tasks() -> list[dict]:
    """A small task set of every kind, with demonstrations (as the tasks stage writes it)."""
    closed = {
        "id": "p0:t0", "perspective_id": 0, "perspective": "sarcasm", "name": "sarcasm detection",
        "type": "closed_classification", "description": "Decide whether the text is sarcastic.",
        "output_format": "one label", "labels": ["sarcastic", "not sarcastic"], "copy_exact": None,
        "json_schema": None, "examples": [], "merged_from": [],
        "demos": [{"input": f"demo {i}", "output": ["sarcastic", "not sarcastic"][i % 2]} for i in range(8)],
    }  # fmt: skip
    rating = {**closed, "id": "p0:t1", "name": "intensity", "type": "rating", "labels": None,
              "description": "Rate the intensity of feeling from 1 to 5.", "output_format": "a number from 1 to 5",
              "demos": [{"input": f"demo {i}", "output": str(1 + i % 5)} for i in range(8)]}  # fmt: skip
    schema = {
        "type": "object",
        "properties": {"emotion": {"type": "string"}, "strength": {"type": "integer"}},
        "required": ["emotion", "strength"],
    }
    structured = {**closed, "id": "p0:t2", "name": "emotion", "type": "structured", "labels": None, "json_schema": schema,
                  "description": "Give the main emotion and its strength.", "output_format": "JSON object",
                  "demos": [{"input": f"demo {i}", "output": json.dumps({"emotion": "joy", "strength": i})} for i in range(8)]}  # fmt: skip
    analysis = {**closed, "id": "p0:a0", "name": "analysis", "type": "analysis", "labels": None, "demos": [],
                "description": "Analyse how the writer's attitude shows in the text.", "output_format": "free text"}  # fmt: skip
    return [closed, rating, structured, analysis]


def run_generate_bench(
    n_samples: int = 12000,
    concurrency: int = 256,
    latency_ms: float = 50.0,
    out_dir: Path | None = None,
    rounds: int = 3,
    executors: tuple[str, ...] = ("local",),
    ray_actors: int = 2,
    ray_batch_size: int = 64,
) -> dict:
    """Raw client vs the generate stage (cache off, cache on) on the same requests; prints a table. With
    ``"ray"`` in ``executors`` the stage also runs on a local Ray (``ray_actors`` actors sharing the same
    number of requests in flight), and the table says what Ray adds per request."""
    console = Console()
    ray_start_s = None
    sources = ["tweeteval_sentiment:validation"]
    proc, url = start_server(latency_ms, script="pipeline")
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="compeff-bench-") as tmp:
            tasks_dir = Path(tmp) / "runs" / "bench" / "tasks"
            tasks_dir.mkdir(parents=True)
            tasks = bench_tasks()
            (tasks_dir / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
            overrides = [
                f"run.dir={tmp}/runs", "run.name=bench", f"data.user_texts={json.dumps(sources)}",
                "teacher.backend=openai", f"teacher.base_urls=[{url}]", f"teacher.concurrency={concurrency}",
                "teacher.max_tokens=64", f"generate.n_samples={n_samples}", "teacher.cache=null",
            ]  # fmt: skip
            recipe = load_recipe(None, overrides)
            # the same requests the stage will send, built the same way
            texts, _ = select_user_texts(sources, n_samples, recipe.run.seed + 1)
            plan = plan_pairings(tasks, len(texts), n_samples, 2, recipe.run.seed)
            prompt = pairing_prompts({t["id"]: t for t in tasks}, texts, recipe.generate.max_chars)
            params = sampling_params(recipe.teacher)
            requests = [
                ChatRequest(
                    id=f"raw-{p.id}", messages=[{"role": "user", "content": prompt(p)}], params=params
                )
                for p in plan
            ]
            measured: dict[str, list[tuple[int, float]]] = {}
            for round_ in range(rounds):  # interleaved rounds: the machine's noise hits every variant alike
                start = time.perf_counter()  # the client's start-up counts, as it does in the stage
                with OpenAITeacher(
                    "bench", base_urls=[url], concurrency=concurrency, timeout_s=60
                ) as teacher:
                    done = sum(r.ok for r in teacher.generate(requests))
                measured.setdefault("raw client (OpenAITeacher.generate)", []).append(
                    (done, time.perf_counter() - start)
                )
                variants = [
                    ("generate stage, cache off", None, []),
                    ("generate stage, cache on", f"{tmp}/cache-{round_}.sqlite", []),
                ]
                if "ray" in executors:
                    if ray_start_s is None:  # Ray's own start-up, once: not part of any round
                        ray_start_s = start_local_ray()
                    per_actor = -(-concurrency // ray_actors)  # the same requests in flight in all
                    ray_set = ["run.executor=ray", f"ray.actors={ray_actors}", f"ray.batch_size={ray_batch_size}",
                               "ray.cpus_per_actor=0.5", f"teacher.concurrency={per_actor}"]  # fmt: skip
                    quarter = [f"generate.n_samples={max(1, n_samples // 4)}"]
                    variants += [
                        (f"generate stage on Ray, {ray_actors} actors, cache off", None, ray_set),
                        (f"{QUARTER} generate stage, cache off", None, quarter),
                        (f"{QUARTER} generate stage on Ray, cache off", None, [*ray_set, *quarter]),
                    ]
                for label, cache, more in variants:
                    name = f"bench-{round_}-{len(more)}-{'on' if cache else 'off'}"
                    run = load_recipe(
                        None, [*overrides[:-1], f"teacher.cache={cache or 'null'}", f"run.name={name}", *more]
                    )
                    (Path(tmp) / "runs" / name).mkdir(parents=True)
                    (Path(tmp) / "runs" / name / "tasks").symlink_to(tasks_dir)
                    start = time.perf_counter()
                    manifest = run_generate_stage(run, progress=False)
                    seconds = time.perf_counter() - start
                    measured.setdefault(label, []).append(
                        (manifest["counts"]["ok"] + manifest["counts"]["failed"], seconds)
                    )
            for label, values in measured.items():
                rates = sorted(n / s for n, s in values)
                rows.append(
                    {
                        "what": label,
                        "samples": values[0][0],
                        "rounds": len(values),
                        "samples_per_s": rates[len(rates) // 2],
                        "all": [round(r, 1) for r in rates],
                    }
                )
    finally:
        proc.kill()
        proc.wait()
    for row in rows:
        row["samples_per_s"] = round(row["samples_per_s"], 1)
        row["vs_raw"] = round(row["samples_per_s"] / rows[0]["samples_per_s"], 3)
    costs = fixed_and_marginal(rows)
    table = Table(
        title=f"generate at {latency_ms:g} ms server latency, concurrency {concurrency} (median of {rounds} rounds)"
    )
    for col in ("what", "samples", "samples/s", "vs raw", "every round"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(
            row["what"],
            str(row["samples"]),
            f"{row['samples_per_s']:,.0f}",
            f"{row['vs_raw']:.2f}",
            ", ".join(f"{r:,.0f}" for r in row["all"]),
        )
    console.print(table)
    if costs:
        local, on_ray = costs["local"], costs["ray"]
        console.print(
            f"per request: local {local['ms_per_request']:.2f} ms, Ray {on_ray['ms_per_request']:.2f} ms "
            f"(Ray adds {on_ray['ms_per_request'] - local['ms_per_request']:.2f} ms); fixed per stage run: "
            f"local {local['fixed_s']:.1f} s, Ray {on_ray['fixed_s']:.1f} s (its actors start); "
            f"starting a local Ray: {ray_start_s:.1f} s once per command"
        )
    report = {
        "executors": list(executors),
        "costs": costs,
        "ray_start_s": round(ray_start_s, 2) if ray_start_s is not None else None,
        "n_samples": n_samples,
        "concurrency": concurrency,
        "latency_ms": latency_ms,
        "rounds": rounds,
        "rows": rows,
    }
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "generate_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def start_local_ray() -> float:
    """Start a local Ray on loopback addresses for the bench; the seconds it took."""
    import os

    from compeff.config import RaySettings
    from compeff.ray_exec import connect

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray address on 127.0.0.1
    start = time.perf_counter()
    connect(RaySettings())
    return time.perf_counter() - start


QUARTER = "1/4:"  # rows of the stage at a quarter of the samples, for the fixed and per-request costs


def fixed_and_marginal(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per executor (local, ray; cache off): the seconds a stage run costs whatever its size (start-up)
    and the milliseconds each request adds, from the runs at the full and at a quarter of the size."""
    by_what = {r["what"]: r for r in rows}
    out = {}
    for key, full, quarter in (
        ("local", "generate stage, cache off", f"{QUARTER} generate stage, cache off"),
        ("ray", next((w for w in by_what if w.startswith("generate stage on Ray")), ""),
         f"{QUARTER} generate stage on Ray, cache off"),
    ):  # fmt: skip
        if full not in by_what or quarter not in by_what:
            return {}
        n_full, n_quarter = by_what[full]["samples"], by_what[quarter]["samples"]
        t_full = n_full / by_what[full]["samples_per_s"]
        t_quarter = n_quarter / by_what[quarter]["samples_per_s"]
        per_request = (t_full - t_quarter) / max(1, n_full - n_quarter)
        out[key] = {
            "ms_per_request": round(per_request * 1e3, 3),
            "fixed_s": round(max(0.0, t_full - per_request * n_full), 2),
        }
    return out
