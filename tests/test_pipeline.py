"""`compeff run` on a reduced offline quickstart: every stage, a kill + resume, a changed setting."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import compeff_cmd, kill_after_lines

from compeff.config import load_recipe
from compeff.pipeline import run_pipeline
from compeff.runs import iter_jsonl, read_manifest

REPO = Path(__file__).resolve().parents[1]
# The module's first test pays for the whole reduced run (and maybe the tiny chat model's build): minutes.
pytestmark = pytest.mark.timeout(1800)
LLM_CHAIN = ["enumerate", "cluster", "tasks", "generate", "score", "sample", "sft", "eval"]


def reduced_quickstart(tmp_path: Path, name: str, tiny_chat: Path, stages: list[str] | None = None) -> Path:
    """recipes/quickstart.yaml made small enough for the test suite (and greedy, uncached, one prompt
    per batch: the same answers with or without a kill)."""
    data = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    data["run"].update(name=name, dir=str(tmp_path / "runs"))
    if stages:
        data["run"]["stages"] = stages
    # the fast format-taught tiny model instead of SmolLM2 (the real model's chain is timed in the README)
    data["teacher"].update(model=str(tiny_chat), temperature=0.0, cache=None, batch_size=1, max_tokens=320)
    data["student"] = {"model": str(tiny_chat)}
    data["enumerate"]["n_texts"] = 24
    data["tasks"].update(max_perspectives=2, demo_calls=2)
    data["generate"]["n_samples"] = 40
    data["sft"].update(epochs=1, max_length=1024)  # the tiny teacher's demos can be long reviews
    data["eval"].update(limit=30, sets=["tweeteval_sentiment:test"], compare=[])
    data["kd"].update(train_limit=150, test_limit=200, teacher_epochs=1, student_epochs=1, max_length=32)
    data["bench"].update(
        limit=60,
        timed=8,
        batch_sizes=[1],
        backends=["torch-fp32", "ort-int8-dynamic"],
        warmup=1,
        calibration=8,
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, compeff_home, tiny_chat) -> Path:
    """The reduced quickstart run once through `compeff run` (every stage)."""
    import os

    tmp = tmp_path_factory.mktemp("quickstart")
    recipe = reduced_quickstart(tmp, "full", tiny_chat)
    env = {**os.environ, "COMPEFF_HOME": str(compeff_home)}
    proc = subprocess.run(compeff_cmd("run", str(recipe)), capture_output=True, text=True, timeout=1200, cwd=tmp,
                          env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return recipe


def test_every_stage_completes_and_the_report_shows_them(full_run):
    recipe = load_recipe(full_run)
    run_dir = recipe.run_dir
    for stage in recipe.run.stages:
        manifest = read_manifest(run_dir / stage)
        assert manifest is not None and manifest["status"] == "complete", stage
    assert sum(1 for _ in iter_jsonl(run_dir / "generate" / "data.jsonl")) > 0
    assert (run_dir / "sft" / "model" / "config.json").exists() or any(
        (run_dir / "sft").glob("**/config.json")
    )
    report = (run_dir / "report.md").read_text()
    for stage in recipe.run.stages:
        assert f"## {stage}" in report
    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5  # perspectives, histograms, loss, Pareto inlined
    assert 'src="' not in html.replace('src="data:', "")  # nothing points outside the file
    bench = json.loads((run_dir / "bench" / "encoders_bench.json").read_text())
    assert {r["backend"] for r in bench["rows"]} >= {"torch-fp32", "ort-int8-dynamic"}


def test_second_run_skips_every_stage(full_run):
    recipe = load_recipe(full_run)
    outcomes = run_pipeline(recipe, show=False)
    assert [o.action for o in outcomes] == ["skipped"] * len(recipe.run.stages)


def test_changed_setting_reruns_that_stage_and_later_ones_of_its_chain(full_run, tmp_path):
    recipe = load_recipe(full_run)
    copy_dir = tmp_path / "runs"
    shutil.copytree(recipe.run_dir, copy_dir / "changed")
    changed = load_recipe(full_run, ["sample.ratio=0.3", f"run.dir={copy_dir}", "run.name=changed"])
    before = {s: read_manifest(copy_dir / "changed" / s)["fingerprint"] for s in changed.run.stages}
    outcomes = {o.stage: o for o in run_pipeline(changed, show=False)}
    rerun = [s for s, o in outcomes.items() if o.action != "skipped"]
    assert rerun == ["sample", "sft", "eval"]
    assert outcomes["sample"].reason.startswith("changed: sample")
    after = {s: read_manifest(copy_dir / "changed" / s)["fingerprint"] for s in changed.run.stages}
    assert [s for s in changed.run.stages if after[s] != before[s]] == ["sample", "sft", "eval"]
    kept = sum(1 for _ in iter_jsonl(copy_dir / "changed" / "sample" / "data.jsonl"))
    total = sum(1 for _ in iter_jsonl(copy_dir / "changed" / "score" / "data.jsonl"))
    assert kept < total * 0.5


def test_killed_run_resumes_to_the_same_artifacts(full_run, tmp_path, compeff_home, tiny_chat):
    recipe = reduced_quickstart(tmp_path, "killed", tiny_chat, stages=LLM_CHAIN[:4])
    data_file = tmp_path / "runs" / "killed" / "generate" / "data.jsonl"
    at_kill = kill_after_lines(compeff_cmd("run", str(recipe)), data_file, 5, wait_s=600)
    assert 5 <= at_kill < 40
    proc = subprocess.run(compeff_cmd("run", str(recipe)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_manifest(data_file.parent)["counts"]["resumed_from"] >= at_kill

    full_runs = load_recipe(full_run).run_dir.parent

    def records(runs: Path, stage: str) -> dict[str, dict]:
        return {r["id"]: r for r in iter_jsonl(runs / stage / "data.jsonl")}

    for stage in LLM_CHAIN[:4]:
        assert records(tmp_path / "runs" / "killed", stage) == records(full_runs / "full", stage), stage
    assert (tmp_path / "runs" / "killed" / "tasks" / "tasks.jsonl").read_text() == (
        full_runs / "full" / "tasks" / "tasks.jsonl"
    ).read_text()
