"""Kill a real `compeff teach` process with SIGKILL mid-run, run it again: same data, no id twice."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import compeff_cmd, kill_after_lines

from compeff.runs import iter_jsonl, read_manifest
from compeff.teachers.fake_server import FakeServer

N = 150


def teach_cmd(inp: Path, url: str, run_dir: Path, cache: Path) -> list[str]:
    return compeff_cmd(
        "teach",
        "--input", str(inp),
        "--teacher-backend", "openai",
        "--teacher-base-urls", url,
        "--teacher-concurrency", "3",
        "--teacher-cache", str(cache),
        "--run-dir", str(run_dir),
    )  # fmt: skip


def comparable(path: Path) -> dict[str, dict]:
    rows = {}
    for row in iter_jsonl(path):
        assert row["id"] not in rows, f"id {row['id']} written twice"
        row.pop("cached")
        rows[row["id"]] = row
    return rows


def test_sigkill_then_resume_gives_the_uninterrupted_result(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": f"review number {i}"}) + "\n" for i in range(N))
    )
    with FakeServer(latency_ms=30) as srv:
        subprocess.run(
            teach_cmd(inp, srv.base_url, tmp_path / "clean", tmp_path / "c1.sqlite"),
            check=True,
            timeout=300,
            capture_output=True,
        )

        data = tmp_path / "killed" / "quickstart" / "teach" / "data.jsonl"
        killed = teach_cmd(inp, srv.base_url, tmp_path / "killed", tmp_path / "c2.sqlite")
        done_at_kill = kill_after_lines(killed, data, 10, wait_s=120)
        assert 10 <= done_at_kill < N, "the kill must land mid-run"
        assert read_manifest(data.parent)["status"] == "running"

        second = subprocess.run(
            teach_cmd(inp, srv.base_url, tmp_path / "killed", tmp_path / "c2.sqlite"),
            timeout=300,
            capture_output=True,
            text=True,
        )
        assert second.returncode == 0, second.stderr

    clean = comparable(tmp_path / "clean" / "quickstart" / "teach" / "data.jsonl")
    resumed = comparable(data)
    assert len(clean) == N
    assert resumed == clean
    manifest = read_manifest(data.parent)
    assert manifest["status"] == "complete" and manifest["counts"]["resumed_from"] >= done_at_kill
