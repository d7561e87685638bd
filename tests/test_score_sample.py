"""`compeff score` and `compeff sample` end to end on a tiny local scorer, plus their reports."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from conftest import WORDS, compeff_cmd
from datasets import load_dataset

from compeff.config import load_recipe
from compeff.data import DataError
from compeff.runs import StageConflict, iter_jsonl
from compeff.select.sample_stage import run_sample_stage, selection_report
from compeff.select.score_stage import run_score_stage

TASKS = [
    {"id": "p0-t0", "perspective_id": 0, "name": "polarity", "type": "closed_classification",
     "labels": ["positive", "negative", "neutral"]},
    {"id": "p0-t1", "perspective_id": 0, "name": "intensity", "type": "rating", "labels": []},
    {"id": "p1-t0", "perspective_id": 1, "name": "emotion", "type": "closed_classification",
     "labels": ["joy", "anger"]},
    {"id": "p1-a0", "perspective_id": 1, "name": "p1 analysis 1", "type": "analysis", "labels": []},
]  # fmt: skip


def write_distillation_set(run_dir: Path, n: int = 60, seed: int = 0) -> Path:
    """A generate-like chat set (and the run's tasks.jsonl) without a teacher."""
    rng = random.Random(seed)
    (run_dir / "tasks").mkdir(parents=True, exist_ok=True)
    (run_dir / "tasks" / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    rows = []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
        if task["labels"]:
            answer = rng.choice(task["labels"])
        elif task["type"] == "rating":
            answer = str(rng.randint(1, 5))
        else:
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30)))
        rows.append(
            {
                "id": f"g{i:05d}",
                "messages": [
                    {"role": "user", "content": f"Task {task['name']}.\nText: {text}"},
                    {"role": "assistant", "content": answer},
                ],
                "perspective_id": task["perspective_id"],
                "task_id": task["id"],
                "task_name": task["name"],
                "task_type": task["type"],
            }
        )
    path = run_dir / "generate" / "data.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe_file(tmp_path: Path, model: Path, name: str = "sc", extra: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"run: {{name: {name}, dir: {tmp_path / 'runs'}, seed: 5}}\n"
        f"student: {{model: {model}}}\n"
        "score: {batch_size: 4, max_length: 256}\n" + extra
    )
    return path


def test_score_then_sample(tmp_path, tiny_lm):
    recipe = load_recipe(recipe_file(tmp_path, tiny_lm))
    write_distillation_set(recipe.run_dir)
    manifest = run_score_stage(recipe, progress=False)
    assert manifest["status"] == "complete" and manifest["counts"]["ok"] == 60
    folder = recipe.run_dir / "score"
    rows = list(iter_jsonl(folder / "data.jsonl"))
    assert {r["id"] for r in rows} == {f"g{i:05d}" for i in range(60)}
    for row in rows:
        d = row["difficulty"]
        assert set(d) == {"rank", "ppl", "ifd", "length"}
        assert 0.0 <= d["rank"] <= 1.0 and d["ppl"] > 1.0 and d["ifd"] > 0 and d["length"] >= 1
    for metric in ("rank", "ppl", "ifd", "length"):
        assert (folder / f"hist_{metric}.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["samples"] == 60 and summary["metrics"]["rank"]["n"] == 60
    # a completed stage is left as it is
    assert run_score_stage(recipe, progress=False)["counts"]["ok"] == 60

    recipe = load_recipe(recipe_file(tmp_path, tiny_lm), ["sample.ratio=0.5", "sample.method=hard"])
    manifest = run_sample_stage(recipe, progress=False)
    kept = list(iter_jsonl(recipe.run_dir / "sample" / "data.jsonl"))
    assert len(kept) == manifest["kept"] == sum(round(0.5 * 15) for _ in TASKS)
    by_task = {}
    for row in rows:
        by_task.setdefault(row["task_id"], []).append(row)
    kept_ids = {r["id"] for r in kept}
    for members in by_task.values():  # hard: the hardest half of each task, exactly
        members.sort(key=lambda r: r["difficulty"]["rank"], reverse=True)
        top = {r["id"] for r in members[: round(0.5 * len(members))]}
        assert top <= kept_ids
    report = json.loads((recipe.run_dir / "sample" / "report.json").read_text())
    assert report["class_balance"]["before"]  # closed-set answers were recognised
    assert sum(report["class_balance"]["before"].values()) == 30
    assert (recipe.run_dir / "sample" / "hist_before_after.png").exists()
    # ready for sft: loadable as a chat dataset
    ds = load_dataset("json", data_files=str(recipe.run_dir / "sample" / "data.jsonl"), split="train")
    assert len(ds) == len(kept) and ds[0]["messages"][-1]["role"] == "assistant"


def test_shards_merge_to_the_single_run(tmp_path, tiny_lm):
    single = load_recipe(recipe_file(tmp_path, tiny_lm, "one"))
    write_distillation_set(single.run_dir, n=24)
    run_score_stage(single, progress=False)
    sharded = recipe_file(tmp_path, tiny_lm, "many")
    write_distillation_set(load_recipe(sharded).run_dir, n=24)
    for k in range(3):
        run_score_stage(load_recipe(sharded, [f"score.shard={k}/3"]), progress=False)
    run_score_stage(load_recipe(sharded, ["score.merge=true"]), progress=False)

    def by_id(recipe_path):
        rows = iter_jsonl(load_recipe(recipe_path).run_dir / "score" / "data.jsonl")
        return {r["id"]: r["difficulty"] for r in rows}

    one, many = by_id(tmp_path / "one.yaml"), by_id(sharded)
    assert one.keys() == many.keys() and len(one) == 24
    for key, value in one.items():
        assert many[key] == pytest.approx(value, rel=1e-5, abs=1e-7)


def test_unscorable_samples_are_kept_as_failures(tmp_path, tiny_lm):
    recipe = load_recipe(recipe_file(tmp_path, tiny_lm), ["score.max_length=8"])
    write_distillation_set(recipe.run_dir, n=8)
    manifest = run_score_stage(recipe, progress=False)
    failures = list(iter_jsonl(recipe.run_dir / "score" / "failures.jsonl"))
    assert manifest["counts"]["ok"] + manifest["counts"]["failed"] == 8
    assert failures and all("truncation" in f["reason"] for f in failures)
    # left truncation keeps the response
    recipe = load_recipe(recipe_file(tmp_path, tiny_lm), ["score.max_length=8", "score.truncation_side=left"])
    assert run_score_stage(recipe, force=True, progress=False)["counts"] == {
        "ok": 8,
        "failed": 0,
        "resumed_from": 0,
    }


def test_bad_input_names_file_and_line(tmp_path, tiny_lm):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "messages": []}\n{"id": "b"}\n')
    recipe = load_recipe(recipe_file(tmp_path, tiny_lm), [f"score.input={bad}"])
    with pytest.raises(DataError, match=r"bad.jsonl:2: record without 'messages'"):
        run_score_stage(recipe, progress=False)
    with pytest.raises(DataError, match="no scored set"):
        run_sample_stage(load_recipe(recipe_file(tmp_path, tiny_lm, "empty")), progress=False)


def test_class_shift_and_empty_group_warnings():
    rows = [
        {"id": f"r{i}", "task_id": "t", "label": "positive" if i < 50 else "negative",
         "messages": [{"role": "assistant", "content": "x"}]}
        for i in range(100)
    ] + [{"id": "lonely", "task_id": "u", "messages": [{"role": "assistant", "content": "x"}]}]  # fmt: skip
    keep = [i >= 40 for i in range(100)] + [False]  # keeps 10 positive, 50 negative
    report = selection_report(rows, keep, {}, "task")
    text = " ".join(report["warnings"])
    assert "share of 'negative' moved +33.3 points" in text
    assert "kept no sample: u" in text


def test_cli_score_and_sample(tmp_path, tiny_lm):
    path = recipe_file(tmp_path, tiny_lm, "cli")
    run_dir = load_recipe(path).run_dir
    write_distillation_set(run_dir, n=12)
    for args in (["score", "--metrics", "rank"], ["sample", "--ratio", "0.25", "--method", "random"]):
        out = subprocess.run(compeff_cmd(*args, "--config", str(path)), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    kept = list(iter_jsonl(run_dir / "sample" / "data.jsonl"))
    assert len(kept) == len(TASKS) * round(0.25 * 3)
    out = subprocess.run(
        compeff_cmd("sample", "--metric", "ppl", "--config", str(path), "--force"),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "no 'ppl' difficulty" in out.stderr


def test_scorer_warm_up_fine_tunes_the_student_first(tmp_path, tiny_lm):
    from compeff.stages import get_stage

    run_score_stage = get_stage("score")  # the stage as the CLI runs it: warm-up, then scoring
    recipe = load_recipe(
        recipe_file(tmp_path, tiny_lm, "warm"),
        ["score.warmup_samples=16", "sft.max_steps=4", "sft.max_length=256", "sft.learning_rate=1e-3"],
    )
    write_distillation_set(recipe.run_dir, n=24)
    manifest = run_score_stage(recipe, progress=False)
    warm = recipe.run_dir / "score-warmup" / "model"
    assert (warm / "config.json").exists() and manifest["config"]["scorer"] == str(warm)
    assert manifest["counts"]["ok"] == 24
    assert len(list(iter_jsonl(recipe.run_dir / "score-warmup-data" / "data.jsonl"))) == 16
    assert sorted(p.name for p in recipe.run_dir.iterdir() if p.is_file()) == []  # each stage in its folder
    made = {
        p: p.stat().st_mtime_ns
        for p in (warm / "config.json", recipe.run_dir / "score-warmup-data" / "manifest.json")
    }
    run_score_stage(recipe, progress=False)  # a second run reuses the drawn samples and the warmed scorer
    assert {p: p.stat().st_mtime_ns for p in made} == made
    fewer = recipe.model_copy(update={"score": recipe.score.model_copy(update={"warmup_samples": 12})})
    with pytest.raises(StageConflict) as conflict:  # compeff run starts the stage over on this
        run_score_stage(fewer, progress=False)
    assert "score-warmup-data" in str(conflict.value) and conflict.value.changed == ["warmup_samples"]
    cold = load_recipe(recipe_file(tmp_path, tiny_lm, "cold"))
    write_distillation_set(cold.run_dir, n=24)
    run_score_stage(cold, progress=False)

    def ranks(run_dir):
        return {r["id"]: r["difficulty"]["rank"] for r in iter_jsonl(run_dir / "score" / "data.jsonl")}

    assert ranks(recipe.run_dir) != ranks(cold.run_dir)  # the warmed scorer is another model


def test_a_warmed_scorer_on_another_runs_set_starts_a_fresh_run_folder(tmp_path, tiny_lm):
    from compeff.stages import get_stage

    donor = load_recipe(recipe_file(tmp_path, tiny_lm, "donor"))
    write_distillation_set(donor.run_dir, n=12)
    recipe = load_recipe(
        recipe_file(tmp_path, tiny_lm, "fresh"),
        [f"score.input={donor.run_dir / 'generate' / 'data.jsonl'}", "score.warmup_samples=6",
         "sft.max_steps=2", "sft.max_length=256"],
    )  # fmt: skip
    assert not recipe.run_dir.exists()  # score is this run's first stage
    manifest = get_stage("score")(recipe, progress=False)
    assert manifest["counts"]["ok"] == 12
    assert len(list(iter_jsonl(recipe.run_dir / "score-warmup-data" / "data.jsonl"))) == 6


def test_sample_stage_orders_tied_rho_by_perplexity_and_says_so(tmp_path, tiny_lm):
    scored = tmp_path / "scored.jsonl"
    rows = [
        {"id": f"s{i:02d}", "task_id": "seed:polarity",
         "messages": [{"role": "user", "content": f"text {i}"}, {"role": "assistant", "content": "positive"}],
         "difficulty": {"rank": 1.0, "ppl": float((7 * i) % 20), "length": 1}}
        for i in range(20)
    ]  # fmt: skip
    scored.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = [f"sample.input={scored}", "sample.method=hard", "sample.ratio=0.25"]
    recipe = load_recipe(recipe_file(tmp_path, tiny_lm, "ties"), settings)
    run_sample_stage(recipe, progress=False)
    kept = {r["id"] for r in iter_jsonl(recipe.run_dir / "sample" / "data.jsonl")}
    assert kept == {r["id"] for r in rows if r["difficulty"]["ppl"] >= 15}
    assert "metric rank, tie_break ppl" in (recipe.run_dir / "sample" / "report.md").read_text()
    plain = load_recipe(recipe_file(tmp_path, tiny_lm, "noties"), [*settings, "sample.tie_break=null"])
    run_sample_stage(plain, progress=False)
    assert {r["id"] for r in iter_jsonl(plain.run_dir / "sample" / "data.jsonl")} == {
        f"s{i}" for i in range(15, 20)
    }


def test_a_sample_stage_without_a_usable_tie_break_keeps_its_key(tmp_path, tiny_lm):
    scored = tmp_path / "scored.jsonl"
    rows = [{"id": f"s{i}", "messages": [{"role": "user", "content": "t"}, {"role": "assistant", "content": "x"}],
             "difficulty": {"rank": i / 10}} for i in range(10)]  # fmt: skip
    scored.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = recipe_file(tmp_path, tiny_lm, "keyed")
    first = run_sample_stage(
        load_recipe(path, [f"sample.input={scored}", "sample.tie_break=null"]), progress=False
    )
    # no scored sample has a perplexity: the default tie-break cannot apply, so the stage is the same one
    again = run_sample_stage(load_recipe(path, [f"sample.input={scored}"]), progress=False)
    assert again["fingerprint"] == first["fingerprint"] and "tie_break" not in again["config"]["sample"]
    rows[0]["difficulty"]["ppl"] = 3.0
    scored.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(StageConflict):  # now it applies: another selection, another key
        run_sample_stage(load_recipe(path, [f"sample.input={scored}"]), progress=False)
