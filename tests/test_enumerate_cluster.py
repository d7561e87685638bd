"""End to end on the tiny local teacher: enumerate -> cluster, and a SIGKILL + resume of enumerate."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml
from conftest import compeff_cmd, kill_after_lines

from compeff.runs import iter_jsonl, read_manifest


def write_recipe(tmp_path: Path, name: str, model: Path, **enumerate_overrides) -> Path:
    recipe = {
        "run": {"name": name, "dir": str(tmp_path / "runs"), "seed": 7, "stages": ["enumerate", "cluster"]},
        "teacher": {
            "backend": "hf",
            "model": str(model),
            "structured_output": False,  # the tiny model learnt the numbered-list format
            "batch_size": 4,
            "temperature": 0.0,
            "max_tokens": 120,
            "cache": str(tmp_path / f"{name}-cache.sqlite"),
        },
        "data": {"user_texts": ["imdb:unsupervised", "tweeteval_sentiment:validation"]},
        "enumerate": {"n_texts": 20, "min_frac": 0.1, "max_chars": 400, **enumerate_overrides},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_enumerate_then_cluster(tmp_path, tiny_chat):
    recipe = write_recipe(tmp_path, "e2e", tiny_chat)
    proc = subprocess.run(compeff_cmd("run", str(recipe)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "e2e"
    answers = list(iter_jsonl(run / "enumerate" / "data.jsonl"))
    failures = (
        list(iter_jsonl(run / "enumerate" / "failures.jsonl"))
        if (run / "enumerate" / "failures.jsonl").exists()
        else []
    )
    assert len(answers) + len(failures) == 20 and len(answers) >= 15
    assert {a["source"] for a in answers} == {"imdb:unsupervised", "tweeteval_sentiment:validation"}
    manifest = read_manifest(run / "enumerate")
    assert manifest["status"] == "complete" and manifest["texts_per_source"] == {
        "imdb:unsupervised": 10,
        "tweeteval_sentiment:validation": 10,
    }
    attributes = list(iter_jsonl(run / "enumerate" / "attributes.jsonl"))
    assert attributes and all(a["count"] >= 2 for a in attributes)
    assert all(a["name"] == a["name"].lower() and len(a["text_ids"]) == a["count"] for a in attributes)
    perspectives = json.loads((run / "cluster" / "perspectives.json").read_text())
    members = [m["name"] for p in perspectives for m in p["members"]]
    assert sorted(members) == sorted(a["name"] for a in attributes)
    assert all(
        p["size"] == len(p["members"]) and p["exemplar"] in [m["name"] for m in p["members"]]
        for p in perspectives
    )
    assert (run / "cluster" / "perspectives.png").read_bytes()[:4] == b"\x89PNG"
    assert "perspectives:" in (run / "cluster" / "summary.md").read_text()
    cluster_manifest = read_manifest(run / "cluster")
    assert cluster_manifest["result"]["perspectives"] == len(perspectives)

    again = subprocess.run(compeff_cmd("run", str(recipe)), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "up to date" in again.stderr + again.stdout
    assert json.loads((run / "cluster" / "perspectives.json").read_text()) == perspectives


def test_enumerate_resumes_after_sigkill(tmp_path, tiny_chat):
    clean = write_recipe(tmp_path, "clean", tiny_chat, n_texts=16)
    killed = write_recipe(tmp_path, "killed", tiny_chat, n_texts=16)
    for path in (clean, killed):  # one prompt per batch: the same batches with or without a kill
        data = yaml.safe_load(path.read_text())
        data["teacher"]["batch_size"] = 1
        path.write_text(yaml.safe_dump(data))
    subprocess.run(
        compeff_cmd("enumerate", "--config", str(clean)), check=True, capture_output=True, timeout=600
    )

    out = tmp_path / "runs" / "killed" / "enumerate" / "data.jsonl"
    at_kill = kill_after_lines(compeff_cmd("enumerate", "--config", str(killed)), out, 3)
    assert 3 <= at_kill < 16
    subprocess.run(
        compeff_cmd("enumerate", "--config", str(killed)), check=True, capture_output=True, timeout=600
    )

    def answers(name: str) -> dict:
        rows = {}
        for row in iter_jsonl(tmp_path / "runs" / name / "enumerate" / "data.jsonl"):
            assert row["id"] not in rows
            rows[row["id"]] = (row["answer"], row["attributes"])
        return rows

    assert answers("killed") == answers("clean")
    attrs = [
        (tmp_path / "runs" / n / "enumerate" / "attributes.jsonl").read_text() for n in ("clean", "killed")
    ]
    assert attrs[0] == attrs[1]
    assert read_manifest(out.parent)["counts"]["resumed_from"] >= at_kill
