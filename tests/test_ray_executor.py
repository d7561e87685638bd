"""``run.executor: ray`` on a local Ray cluster (2 CPUs, loopback, no dashboard) started for this module:
generate through a faulty loopback server with the driver SIGKILLed once and resumed (each sample once,
no written sample asked again, the records a local run writes), and score giving local's scores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import yaml
from conftest import compeff_cmd
from test_tasks_generate import recipe_for

from compeff.config import load_recipe
from compeff.runs import iter_jsonl, read_manifest
from compeff.synth.generate import run_generate_stage
from compeff.synth.tasks_stage import run_tasks_stage
from compeff.teachers.fake_server import FakeServer, FaultPlan, _prompt_key
from compeff.teachers.scripted import pipeline_responder

N_SAMPLES = 200


def test_compeff_imports_no_ray_and_asks_for_it_in_one_line(tmp_path):
    # importing every command costs nothing without Ray
    code = "import sys, compeff.cli, compeff.synth.generate, compeff.select.score_stage; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
    # a recipe asking for Ray where it is not installed: one line, exit 2 (Ray hidden from this process)
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    hide = (
        "import sys; sys.modules['ray'] = None; from compeff.cli import main; sys.argv[0] = 'compeff'; main()"
    )
    args = ["teach", "--input", "in.jsonl", "--executor", "ray", "--set", "teacher.backend=openai",
            "--set", "teacher.base_urls=[http://127.0.0.1:9/v1]"]  # fmt: skip
    with FakeServer(max_seconds=60) as srv:
        args[-1] = f"teacher.base_urls=[{srv.base_url}]"
        out = subprocess.run([sys.executable, "-c", hide, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "compeff[ray]" in lines[0] and "Traceback" not in out.stderr, out.stderr


@pytest.fixture(scope="module")
def ray_address():
    """A Ray cluster of 2 CPUs on loopback addresses only, for this module; its address for drivers."""
    pytest.importorskip("ray.data")
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray address on 127.0.0.1
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)


def on_ray(path, address: str, **ray_settings) -> None:
    """Switch a test recipe file to the Ray executor on ``address``."""
    data = yaml.safe_load(path.read_text())
    data["run"]["executor"] = "ray"
    data["ray"] = {"address": address, "actors": 2, "cpus_per_actor": 0.5, "batch_size": 10, **ray_settings}
    path.write_text(yaml.safe_dump(data))


def test_generate_on_ray_survives_faults_and_a_killed_driver(tmp_path, ray_address):
    # the same tasks for both runs: made once over a fault-free server, copied to the Ray run
    with FakeServer(responder=pipeline_responder, max_seconds=300) as clean:
        local = recipe_for(tmp_path, clean.base_url, name="local", generate__n_samples=N_SAMPLES)
        run_tasks_stage(load_recipe(local), progress=False)
        run_generate_stage(load_recipe(local), progress=False)
    expected = {r["id"]: r for r in iter_jsonl(tmp_path / "runs" / "local" / "generate" / "data.jsonl")}
    rejected = {f["id"] for f in iter_jsonl(tmp_path / "runs" / "local" / "generate" / "failures.jsonl")}
    planned = set(expected) | rejected  # the scripted teacher's off-format answers are dropped by QC
    assert len(planned) == N_SAMPLES

    faults = FaultPlan(error_500=0.1, error_429=0.1, drop=0.05, seed=7)
    with FakeServer(responder=pipeline_responder, faults=faults, latency_ms=30, max_seconds=300) as srv:
        extra = {"teacher__max_retries": 1, "teacher__cache": str(tmp_path / "answers.sqlite")}
        path = recipe_for(tmp_path, srv.base_url, name="onray", generate__n_samples=N_SAMPLES, **extra)
        on_ray(path, ray_address)
        tasks = tmp_path / "runs" / "onray" / "tasks"
        tasks.mkdir(parents=True)
        for f in (tmp_path / "runs" / "local" / "tasks").iterdir():
            if f.is_file():
                (tasks / f.name).write_bytes(f.read_bytes())
        folder = tmp_path / "runs" / "onray" / "generate"
        data = folder / "data.jsonl"
        cmd = compeff_cmd("generate", "--config", str(path))
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if data.exists() and data.read_bytes().count(b"\n") >= 30:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver; Ray ends its job's actors
        proc.wait(timeout=30)
        assert (read_manifest(folder) or {}).get("status") != "complete"
        written = {r["id"]: r for r in iter_jsonl(data)}
        assert 30 <= len(written) < N_SAMPLES
        asked_before = {
            i: srv.stats.attempts_by_prompt[_prompt_key(r["messages"][:-1])] for i, r in written.items()
        }
        time.sleep(1.0)  # a killed job's actors may still finish a request in flight: not a written one
        resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert sum(srv.stats.faults.values()) > 10  # the faults really happened
        for i, r in written.items():  # no written sample was asked again
            assert srv.stats.attempts_by_prompt[_prompt_key(r["messages"][:-1])] == asked_before[i], i
        requests_after = srv.stats.requests
        # the answers came from Ray actors (processes of the cluster, not this one's nor the driver's)
        executor = read_manifest(folder)["executor"]
        assert executor["kind"] == "ray" and executor["batches"] > 0
        assert executor["actor_pids"] and os.getpid() not in executor["actor_pids"]

        # a stage run on Ray and rerun locally is complete: nothing asked
        local_rerun = load_recipe(path, ["run.executor=local"])
        assert run_generate_stage(local_rerun, progress=False)["status"] == "complete"
        assert srv.stats.requests == requests_after

    manifest = read_manifest(folder)
    assert manifest["status"] == "complete" and manifest["planned"] == N_SAMPLES
    rows = list(iter_jsonl(data))
    ids = Counter(r["id"] for r in rows)
    assert ids and ids.most_common(1)[0][1] == 1  # nothing duplicated
    failed = {f["id"] for f in iter_jsonl(folder / "failures.jsonl")} - set(ids)
    assert set(ids) | failed == planned and not set(ids) & failed  # every sample ends once
    assert rejected <= failed  # what local QC dropped, Ray's run dropped too
    assert manifest["counts"]["failed"] == len(failed)
    for row in rows:  # each answer is the one the local run wrote for that sample
        assert row == expected[row["id"]], row["id"]
    report = json.loads((folder / "report.json").read_text())
    assert report["samples"] == len(ids) and report["planned"] == N_SAMPLES


def test_score_on_ray_gives_the_local_scores(tmp_path, tiny_lm, ray_address):
    rows = []
    for i in range(24):
        rows.append(
            {
                "id": f"s{i}",
                "messages": [
                    {"role": "user", "content": f"Is review {i} positive? " + "it was fine " * (i % 5)},
                    {"role": "assistant", "content": ["positive", "negative", "it is mixed"][i % 3]},
                ],
            }
        )
    source = tmp_path / "set.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"score.input={source}", f"student.model={tiny_lm}", f"run.dir={tmp_path / 'runs'}"]
    from compeff.select.score_stage import run_score_stage

    run_score_stage(load_recipe(None, [*common, "run.name=local"]), progress=False)
    ray_set = [f"ray.address={ray_address}", "ray.actors=2", "ray.cpus_per_actor=0.5", "ray.batch_size=5"]
    manifest = run_score_stage(
        load_recipe(None, [*common, "run.name=onray", "run.executor=ray", *ray_set]), progress=False
    )
    assert manifest["status"] == "complete" and manifest["counts"]["ok"] == len(rows)
    assert manifest["executor"]["kind"] == "ray" and manifest["executor"]["batches"] == len(rows) // 5 + 1
    assert manifest["executor"]["actor_pids"] and os.getpid() not in manifest["executor"]["actor_pids"]

    def scores(name):
        return {
            r["id"]: r["difficulty"] for r in iter_jsonl(tmp_path / "runs" / name / "score" / "data.jsonl")
        }

    local, onray = scores("local"), scores("onray")
    assert sorted(onray) == sorted(local) == sorted(r["id"] for r in rows)
    for sample_id, difficulty in local.items():
        assert onray[sample_id].keys() == difficulty.keys()
        for metric, value in difficulty.items():
            assert onray[sample_id][metric] == pytest.approx(value, rel=1e-4, abs=1e-5), (sample_id, metric)


def test_teach_on_ray_with_a_local_model_answers_as_locally(tmp_path, tiny_lm, ray_address):
    # sampled answers from an in-process model on an actor, each request seeded by its id. The hf backend
    # draws a batch with one generator (docs/scaling.md): one Ray batch of all requests keeps local's batches
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": f"say something about {i}"}) + "\n" for i in range(12))
    )
    common = [
        "teach.input=in.jsonl", "teacher.backend=hf", f"teacher.model={tiny_lm}", "teacher.temperature=1.0",
        "teacher.max_tokens=8", "teacher.device=cpu", f"run.dir={tmp_path / 'runs'}", "teacher.cache=null",
    ]  # fmt: skip
    from compeff.teaching import run_teach_stage

    ray_set = ["run.executor=ray", f"ray.address={ray_address}", "ray.actors=1", "ray.batch_size=12"]
    run_teach_stage(load_recipe(None, [*common, "run.name=local"]), progress=False)
    manifest = run_teach_stage(load_recipe(None, [*common, "run.name=onray", *ray_set]), progress=False)
    assert manifest["status"] == "complete" and manifest["counts"]["ok"] == 12
    assert manifest["executor"]["kind"] == "ray" and len(manifest["executor"]["actor_pids"]) == 1

    def answers(name):
        rows = iter_jsonl(tmp_path / "runs" / name / "teach" / "data.jsonl")
        return {r["id"]: (r["response"], r["teacher"], r["finish_reason"]) for r in rows}

    local = answers("local")
    assert len({a for a, _, _ in local.values()}) == 12  # sampled: every answer its own
    assert answers("onray") == local
    # the driver names the model and keys the cache as the backend in the actors does
    from compeff.teachers.hf_local import HFTeacher
    from compeff.teachers.ray_teacher import RayTeacher

    recipe = load_recipe(None, [*common, *ray_set])
    local_teacher = HFTeacher(str(tiny_lm), device="cpu")
    on_ray = RayTeacher(recipe.teacher, recipe.ray)
    assert (on_ray.model, on_ray.cache_identity) == (local_teacher.model, local_teacher.cache_identity)


def test_a_ray_job_that_stops_is_one_line(ray_address):
    from compeff.config import RaySettings
    from compeff.data import DataError
    from compeff.ray_exec import map_on_actors

    def no_model_here():  # an actor that cannot start: the job stops before any result
        raise RuntimeError("cannot load the model on this node")

    settings = RaySettings(address=ray_address, actors=1, cpus_per_actor=0.5, batch_size=2)
    with pytest.raises(DataError, match="the Ray job stopped") as caught:
        list(map_on_actors([1, 2, 3], no_model_here, {}, settings))
    assert "\n" not in str(caught.value)
    with pytest.raises(DataError, match="ray.gpus_per_actor 1: the Ray cluster has 0 GPUs"):
        list(map_on_actors([1], no_model_here, {}, RaySettings(address=ray_address, gpus_per_actor=1)))
