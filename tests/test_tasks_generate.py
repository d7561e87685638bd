"""tasks and generate: parsing and validation units, then both stages over a scripted loopback server
(well-formed and malformed answers), pairing determinism, caps, resume after SIGKILL, shard + merge."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import compeff_cmd, kill_after_lines

from compeff import top_logprobs
from compeff.config import load_recipe
from compeff.runs import iter_jsonl, read_manifest
from compeff.synth.generate import run_generate_stage
from compeff.synth.instructions import plan_pairings, qc_reason, render_instruction
from compeff.synth.jsonparse import parse_json_lenient
from compeff.synth.tasks import (
    TaskRejected,
    merge_near_duplicates,
    parse_definition,
    parse_demo_pair,
    parse_ideas,
    parse_string_list,
)
from compeff.synth.tasks_stage import run_tasks_stage
from compeff.teachers.fake_server import FakeServer
from compeff.teachers.scripted import pipeline_responder

# ------------------------------------------------------------------------------------------ units


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("[1, 2, 3]", [1, 2, 3]),
        ('Sure!\n```json\n{"a": 1}\n```\nDone.', {"a": 1}),
        ('{"a": [1, 2,], }', {"a": [1, 2]}),
        ("{'a': 'single', 'b': True}", {"a": "single", "b": True}),
        ("{'a': true, 'b': null}", {"a": True, "b": None}),
        ('The list: ["x", "y"] as asked', ["x", "y"]),
    ],
)
def test_lenient_json(text, value):
    assert parse_json_lenient(text) == value


@pytest.mark.parametrize("text", ["", "no json here", "{broken: [}", "[unclosed"])
def test_lenient_json_rejects(text):
    with pytest.raises(ValueError):
        parse_json_lenient(text)


def test_ideas_drop_two_text_tasks_and_invalid_items():
    answer = json.dumps(
        [
            {"name": "sarcasm", "type": "closed", "description": "Is the text sarcastic?"},
            {
                "name": "which is better",
                "type": "rating",
                "description": "Compare two reviews and rate the better one.",
            },
            {"name": "x", "type": "poem", "description": "Write a poem about the text."},
            {"name": "intensity", "type": "scoring", "description": "Rate intensity 1-5."},
        ]
    )
    ideas, dropped = parse_ideas(answer)
    assert [(i.name, i.type) for i in ideas] == [
        ("sarcasm", "closed_classification"),
        ("intensity", "rating"),
    ]
    assert dropped == {"invalid": 1, "two_texts": 1}
    with pytest.raises(TaskRejected):
        parse_ideas("I cannot do that.")


def test_definition_validation():
    closed = {
        "name": "sarcasm",
        "type": "closed_classification",
        "instruction": "Is the text sarcastic?",
        "output_format": "one label",
        "labels": ["yes", "no", "yes"],
        "examples": [{"input": f"t{i}", "output": ["yes", "no", "maybe"][i % 3]} for i in range(12)],
    }
    task, dropped = parse_definition(json.dumps(closed), "closed_classification", 8)
    assert task.labels == ["yes", "no"] and dropped == 4 and len(task.examples) == 8
    with pytest.raises(TaskRejected, match="valid examples"):
        parse_definition(json.dumps(closed), "closed_classification", 9)
    with pytest.raises(TaskRejected, match="two labels"):
        parse_definition(json.dumps({**closed, "labels": ["yes"]}), "closed_classification", 1)
    structured = {**closed, "type": "structured", "labels": None, "json_schema": None}
    with pytest.raises(TaskRejected, match="json_schema"):
        parse_definition(json.dumps(structured), "structured", 1)
    schema = {"type": "object", "properties": {"e": {"type": "string"}}, "required": ["e"]}
    structured.update(
        json_schema=schema,
        examples=[{"input": "a", "output": {"e": "joy"}}, {"input": "b", "output": {"x": 1}}],
    )
    task, dropped = parse_definition(json.dumps(structured), "structured", 1)
    assert dropped == 1 and json.loads(task.examples[0].output) == {"e": "joy"}


def test_demo_pairs_must_be_exactly_two_and_on_format():
    task, _ = parse_definition(
        json.dumps(
            {
                "name": "sarcasm",
                "type": "closed_classification",
                "instruction": "Is it sarcastic?",
                "output_format": "label",
                "labels": ["yes", "no"],
                "examples": [{"input": "a", "output": "yes"}],
            }
        ),
        "closed_classification",
        1,
    )
    demos, dropped = parse_demo_pair(
        '[{"input": "a", "output": "Yes."}, {"input": "b", "output": "perhaps"}]', task
    )
    assert [d.output for d in demos] == ["Yes."] and dropped == 1
    for bad in (
        '[{"input": "a", "output": "yes"}]',
        "[]",
        "three: [1,2,3]",
        '[{"input": "a"}, {"input": "b"}]',
    ):
        with pytest.raises(TaskRejected):
            parse_demo_pair(bad, task)
    assert parse_string_list('["Analyse the tone.", 3, "ok"]') == ["Analyse the tone."]


def test_near_duplicate_merge_keeps_the_first():
    import numpy as np

    x = np.array([[1.0, 0.0], [0.99, 0.05], [0.0, 1.0], [0.7, 0.7]])
    assert merge_near_duplicates(x, 0.95) == [0, 0, 2, 3]
    assert merge_near_duplicates(x, 1.0) == [0, 1, 2, 3]


def _tasks(n_closed: int = 3, n_analysis: int = 2) -> list[dict]:
    closed = [
        {
            "id": f"p0:t{i}",
            "name": f"pick {i}",
            "type": "closed_classification",
            "labels": ["a", "b"],
            "demos": [{"input": f"d{j}", "output": "a"} for j in range(5)],
            "description": "Pick.",
            "output_format": "label",
            "json_schema": None,
            "copy_exact": None,
        }
        for i in range(n_closed)
    ]
    analysis = [
        {"id": f"p0:a{i}", "type": "analysis", "demos": [], "description": "Analyse."}
        for i in range(n_analysis)
    ]
    return closed + analysis


def test_pairing_is_seeded_capped_and_balanced():
    tasks = _tasks()
    plan = plan_pairings(
        tasks, n_texts=500, n_samples=400, k_demos=2, seed=3, task_cap=1.2, analysis_share=0.1
    )
    again = plan_pairings(
        tasks, n_texts=500, n_samples=400, k_demos=2, seed=3, task_cap=1.2, analysis_share=0.1
    )
    other = plan_pairings(
        tasks, n_texts=500, n_samples=400, k_demos=2, seed=4, task_cap=1.2, analysis_share=0.1
    )
    assert plan == again and plan != other
    counts = Counter(p.task_id for p in plan)
    assert sum(counts[f"p0:a{i}"] for i in range(2)) == 40
    assert max(counts[f"p0:t{i}"] for i in range(3)) <= 144  # cap = ceil(1.2 * 360 / 3)
    assert len({p.text_index for p in plan}) == 400  # enough texts: none used twice
    assert all(len(p.demo_indices) == (2 if p.task_id.startswith("p0:t") else 0) for p in plan)


def test_instruction_and_qc():
    task = _tasks()[0]
    text = render_instruction(task, "What a film!", task["demos"][:1])
    assert text.startswith("Pick.") and "Allowed labels: a, b" in text and text.endswith("Text: What a film!")
    assert qc_reason(task, "A.") is None and "not one of the labels" in qc_reason(task, "c")
    assert qc_reason({"type": "analysis"}, "  ") == "empty answer"


# ----------------------------------------------------------------------------- stages over HTTP

PERSPECTIVES = [
    {
        "id": 0,
        "exemplar": "sarcasm",
        "size": 2,
        "total_count": 30,
        "members": [{"name": "sarcasm", "count": 20}, {"name": "irony", "count": 10}],
        "top_descriptions": ["mocking"],
    },
    {
        "id": 1,
        "exemplar": "rating",
        "size": 1,
        "total_count": 12,
        "members": [{"name": "rating", "count": 12}],
        "top_descriptions": ["a score"],
    },
    {
        "id": 2,
        "exemplar": "praise",
        "size": 1,
        "total_count": 11,
        "members": [{"name": "praise", "count": 11}],
        "top_descriptions": ["good words"],
    },
]


def recipe_for(tmp_path: Path, url: str, name: str = "s", **extra) -> Path:
    data = {
        "run": {"name": name, "dir": str(tmp_path / "runs"), "seed": 5},
        "teacher": {
            "backend": "openai",
            "base_urls": [url],
            "concurrency": 8,
            "cache": None,
            "max_retries": 1,
            "backoff_s": 0.01,
        },
        # the teacher's own tasks answered in sampled text (seed tasks and label scoring: test_label_distill)
        "tasks": {"demo_calls": 6, "min_demos": 4, "seed_tasks": []},
        "generate": {"n_samples": 80, "k_demos": 2, "label_scoring": False},
    }
    for key, value in extra.items():
        section, field = key.split("__")
        data.setdefault(section, {})[field] = value
    (tmp_path / "runs" / name / "cluster").mkdir(parents=True, exist_ok=True)
    (tmp_path / "runs" / name / "cluster" / "perspectives.json").write_text(json.dumps(PERSPECTIVES))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def scripted():
    with FakeServer(responder=pipeline_responder, max_seconds=300) as srv:
        yield srv


def test_tasks_and_generate_over_the_scripted_server(tmp_path, scripted):
    recipe = load_recipe(recipe_for(tmp_path, scripted.base_url))
    manifest = run_tasks_stage(recipe, progress=False)
    report = manifest["report"]
    folder = tmp_path / "runs" / "s" / "tasks"
    tasks = list(iter_jsonl(folder / "tasks.jsonl"))
    assert report["ideas_dropped_two_texts"] >= 1  # "which review is happier" never becomes a task
    assert report["standardise_rejected"] >= 1  # the extraction idea comes with too few examples
    assert report["merged_across_perspectives"] >= 1  # every perspective proposes the same tasks
    assert report["demo_calls_failed"] >= 1 and report["demos_dropped_off_format"] >= 1
    failures = list(iter_jsonl(folder / "demos" / "failures.jsonl"))
    assert all(f["kind"] == "rejected" and f["raw"] for f in failures)
    demonstrated = [t for t in tasks if t["type"] != "analysis"]
    assert demonstrated and all(len(t["demos"]) >= 4 for t in demonstrated)
    for t in demonstrated:
        if t["type"] == "closed_classification":
            assert all(d["output"] in t["labels"] for d in t["demos"] + t["examples"])
    assert "near-duplicates merged" in (folder / "summary.md").read_text()
    requests_after_tasks = scripted.stats.requests

    manifest = run_generate_stage(recipe, progress=False)
    gen = tmp_path / "runs" / "s" / "generate"
    rows = list(iter_jsonl(gen / "data.jsonl"))
    rejected = [f for f in iter_jsonl(gen / "failures.jsonl") if f["kind"] == "rejected"]
    assert len(rows) + len(rejected) == 80 and rejected  # QC dropped the off-label answers, and counted them
    by_id = {t["id"]: t for t in tasks}
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert qc_reason(by_id[row["task_id"]], assistant["content"]) is None
        assert (
            row["task_type"] == by_id[row["task_id"]]["type"] and row["text_id"] and row["sampling"]["n"] == 1
        )
    report = json.loads((gen / "report.json").read_text())
    assert report["samples"] == len(rows) and report["rejected_qc"] == len(rejected)
    assert sum(report["closed_set_balance"][t]["sarcastic"] for t in report["closed_set_balance"]) > 0
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(gen / "data.jsonl"), split="train")
    assert len(ds) == len(rows) and ds[0]["messages"][1]["role"] == "assistant"

    # a second run is answered from the stage's own files: no teacher call at all
    run_tasks_stage(recipe, progress=False)
    run_generate_stage(recipe, progress=False)
    assert scripted.stats.requests == requests_after_tasks + 80


def test_shards_merge_to_the_single_run(tmp_path, scripted):
    single = load_recipe(recipe_for(tmp_path, scripted.base_url, name="one"))
    run_tasks_stage(single, progress=False)
    run_generate_stage(single, progress=False)
    sharded_path = recipe_for(tmp_path, scripted.base_url, name="two")
    # same tasks for both runs, so the comparison is about generate alone
    (tmp_path / "runs" / "two" / "tasks").mkdir(parents=True)
    for f in (tmp_path / "runs" / "one" / "tasks").iterdir():
        if f.is_file():
            (tmp_path / "runs" / "two" / "tasks" / f.name).write_bytes(f.read_bytes())
    for k in range(3):
        run_generate_stage(load_recipe(sharded_path, [f"generate.shard={k}/3"]), progress=False)
    run_generate_stage(load_recipe(sharded_path, ["generate.merge=true"]), progress=False)

    def rows(name):
        return list(iter_jsonl(tmp_path / "runs" / name / "generate" / "data.jsonl"))

    assert sorted(rows("two"), key=lambda r: r["id"]) == sorted(rows("one"), key=lambda r: r["id"])
    merged = read_manifest(tmp_path / "runs" / "two" / "generate")
    assert merged["status"] == "complete" and len(merged["merged_shards"]) == 3


def test_merge_refuses_missing_shards(tmp_path, scripted):
    path = recipe_for(tmp_path, scripted.base_url)
    recipe = load_recipe(path)
    run_tasks_stage(recipe, progress=False)
    run_generate_stage(load_recipe(path, ["generate.shard=0/2"]), progress=False)
    from compeff.data import DataError

    with pytest.raises(DataError, match="missing shards"):
        run_generate_stage(load_recipe(path, ["generate.merge=true"]), progress=False)


def test_generate_resumes_after_sigkill(tmp_path, tiny_lm):
    # with the teacher's top-3 log-probabilities kept in every record: they survive the kill with it
    # the server tokenizes as the student does (vLLM's tokenize endpoints): its tokenizer is checked first
    keep = {"generate__teacher_top_logprobs": 3, "student__model": str(tiny_lm)}
    with FakeServer(responder=pipeline_responder, latency_ms=40, max_seconds=300, tokenizer=tiny_lm) as srv:
        clean = recipe_for(
            tmp_path, srv.base_url, name="clean", generate__n_samples=150, teacher__concurrency=2, **keep
        )
        killed = recipe_for(
            tmp_path, srv.base_url, name="killed", generate__n_samples=150, teacher__concurrency=2, **keep
        )
        subprocess.run(
            compeff_cmd("tasks", "--config", str(clean)), check=True, capture_output=True, timeout=300
        )
        (tmp_path / "runs" / "killed" / "tasks").mkdir(parents=True)
        for f in (tmp_path / "runs" / "clean" / "tasks").iterdir():
            if f.is_file():
                (tmp_path / "runs" / "killed" / "tasks" / f.name).write_bytes(f.read_bytes())
        subprocess.run(
            compeff_cmd("generate", "--config", str(clean)), check=True, capture_output=True, timeout=300
        )
        out = tmp_path / "runs" / "killed" / "generate" / "data.jsonl"
        at_kill = kill_after_lines(compeff_cmd("generate", "--config", str(killed)), out, 20, wait_s=120)
        assert 20 <= at_kill < 150
        subprocess.run(
            compeff_cmd("generate", "--config", str(killed)), check=True, capture_output=True, timeout=300
        )

    def rows(name):
        seen = {}
        for r in iter_jsonl(tmp_path / "runs" / name / "generate" / "data.jsonl"):
            assert r["id"] not in seen
            seen[r["id"]] = r
        return seen

    assert rows("killed") == rows("clean")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    for row in rows("killed").values():  # one packed entry per answer token, named by id by the server
        tokens, ids, logprobs = top_logprobs.unpack(row[top_logprobs.FIELD])
        answer = tokenizer(row["messages"][-1]["content"], add_special_tokens=False)["input_ids"]
        assert tokens.tolist() == answer and ids.shape[1] == 3 and row[top_logprobs.FIELD]["unmapped"] == 0
    # the columnar copy beside data.jsonl, rewritten when the resumed stage completed: one row per sample,
    # the same arrays, readable by pyarrow and by datasets
    import datasets
    import pyarrow.parquet as pq

    folder = tmp_path / "runs" / "killed" / "generate"
    table = pq.read_table(folder / top_logprobs.PARQUET_FILE)
    assert sorted(table.column("id").to_pylist()) == sorted(rows("killed"))
    assert str(table.schema.field("top_logprobs").type) == "list<element: list<element: halffloat>>"
    by_id = {r["id"]: r for r in table.to_pylist()}
    for sample_id, row in rows("killed").items():
        tokens, ids, logprobs = top_logprobs.unpack(row[top_logprobs.FIELD])
        assert by_id[sample_id]["tokens"] == tokens.tolist()
        assert by_id[sample_id]["top_ids"] == ids.tolist()
        np.testing.assert_array_equal(np.array(by_id[sample_id]["top_logprobs"], dtype=np.float32), logprobs)
    loaded = datasets.load_dataset(
        "parquet",
        data_files=str(folder / top_logprobs.PARQUET_FILE),
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert loaded.num_rows == len(rows("killed"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["top_logprobs"]["rows"] == len(rows("killed"))
    assert manifest["top_logprobs"]["tokens"] == sum(
        len(np.array(t)) for t in table.column("tokens").to_pylist()
    )


def test_tasks_with_the_tiny_local_teacher_completes_and_generate_refuses_clearly(tmp_path, tiny_chat):
    """The built-in tiny teacher only learnt the enumerate format: the tasks stage must still finish, keep
    every unusable answer with its raw text, and generate must say plainly that there is nothing to do."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "tiny", "dir": str(tmp_path / "runs")},
                "teacher": {
                    "backend": "hf",
                    "model": str(tiny_chat),
                    "max_tokens": 60,
                    "temperature": 0.0,
                    "cache": None,
                },
                "tasks": {"demo_calls": 2, "min_demos": 1, "min_examples": 2},
            }
        )
    )
    (tmp_path / "runs" / "tiny" / "cluster").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "cluster" / "perspectives.json").write_text(json.dumps(PERSPECTIVES[:2]))
    proc = subprocess.run(
        compeff_cmd("tasks", "--config", str(recipe)), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ideas = tmp_path / "runs" / "tiny" / "tasks" / "ideas"
    ok = list(iter_jsonl(ideas / "data.jsonl")) if (ideas / "data.jsonl").exists() else []
    failed = list(iter_jsonl(ideas / "failures.jsonl")) if (ideas / "failures.jsonl").exists() else []
    assert len(ok) + len({f["id"] for f in failed}) == 4  # 2 perspectives x (analysis + ideas)
    assert all(f["kind"] == "rejected" and "raw" in f for f in failed)
    assert read_manifest(tmp_path / "runs" / "tiny" / "tasks")["status"] == "complete"
    tasks = list(iter_jsonl(tmp_path / "runs" / "tiny" / "tasks" / "tasks.jsonl"))
    gen = subprocess.run(
        compeff_cmd("generate", "--config", str(recipe), "--n-samples", "4"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if tasks:
        assert gen.returncode == 0, gen.stderr[-2000:]
    else:
        assert gen.returncode == 2 and "kept no task" in gen.stderr


def test_generate_skips_pairs_the_proxy_predicts_easy(tmp_path, scripted):
    from test_proxy import write_scored_set

    from compeff.select.proxy import run_proxy

    recipe = load_recipe(recipe_for(tmp_path, scripted.base_url, name="px"))
    run_tasks_stage(recipe, progress=False)
    write_scored_set(recipe.run_dir, n=60)
    run_proxy(recipe, progress=False)
    skipping = load_recipe(
        recipe_for(tmp_path, scripted.base_url, name="px"),
        [f"generate.proxy={recipe.run_dir / 'score-proxy'}", "generate.proxy_skip=0.5"],
    )
    manifest = run_generate_stage(skipping, progress=False)
    assert 30 <= manifest["proxy_skipped"] <= 50  # half of each task's pairs, rounded per task
    gen = recipe.run_dir / "generate"
    answered = {r["id"] for r in iter_jsonl(gen / "data.jsonl")} | {
        f["id"] for f in iter_jsonl(gen / "failures.jsonl")
    }
    assert len(answered) == 80 - manifest["proxy_skipped"]


def test_merge_checks_the_shards_against_the_recipe_and_adds_failures_once(tmp_path, scripted):
    path = recipe_for(tmp_path, scripted.base_url)
    run_tasks_stage(load_recipe(path), progress=False)
    for k in range(2):
        run_generate_stage(load_recipe(path, [f"generate.shard={k}/2"]), progress=False)
    from compeff.data import DataError

    with pytest.raises(DataError, match=r"other settings or inputs than this recipe \(changed: teacher"):
        run_generate_stage(
            load_recipe(path, ["generate.merge=true", "teacher.temperature=0.3"]), progress=False
        )
    run_dir = load_recipe(path).run_dir
    shard = run_dir / "generate-shard-0-of-2"
    with (shard / "failures.jsonl").open("a") as fh:  # a failure kept by the shard
        fh.write(json.dumps({"id": "never-answered", "reason": "HTTP 500", "time": 0}) + "\n")
    for _ in range(3):
        run_generate_stage(load_recipe(path, ["generate.merge=true"]), progress=False)
    merged = run_dir / "generate" / "failures.jsonl"
    ids = [f["id"] for f in iter_jsonl(merged)]
    assert ids.count("never-answered") == 1 and len(ids) == len(set(ids))


def test_rewritten_user_texts_make_generate_stale(tmp_path, scripted):
    texts = tmp_path / "texts.jsonl"
    texts.write_text(
        "".join(json.dumps({"id": str(i), "text": f"a review number {i}"}) + "\n" for i in range(12))
    )
    path = recipe_for(tmp_path, scripted.base_url, data__user_texts=[str(texts)], generate__n_samples=12)
    recipe = load_recipe(path)
    run_tasks_stage(recipe, progress=False)
    run_generate_stage(recipe, progress=False)
    texts.write_text(
        "".join(json.dumps({"id": str(i), "text": f"another text {i}"}) + "\n" for i in range(12))
    )
    from compeff.runs import StageConflict

    with pytest.raises(StageConflict, match=r"data:"):
        run_generate_stage(load_recipe(path), progress=False)
