"""Soak: `compeff teach` over thousands of prompts against a server with every fault on, SIGKILLed twice
at random moments, resumed until complete: each prompt ends exactly once, right answer or failure."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter

from conftest import compeff_cmd

from compeff.runs import iter_jsonl, read_manifest
from compeff.teachers.fake_server import FakeServer, FaultPlan, default_responder

N_PROMPTS = 3000
ALWAYS_FAILS = set(range(0, N_PROMPTS, 97))  # these prompts get a 500 on every attempt


def test_teach_survives_faults_and_two_sigkills(tmp_path):
    inp = tmp_path / "requests.jsonl"
    prompts = {}
    with inp.open("w") as fh:
        for i in range(N_PROMPTS):
            prompts[f"q{i}"] = f"question {i}" + (" [[always:500]]" if i in ALWAYS_FAILS else "")
            fh.write(json.dumps({"id": f"q{i}", "prompt": prompts[f"q{i}"]}) + "\n")
    plan = FaultPlan(
        error_500=0.05, error_429=0.05, stall=0.01, malformed=0.03, drop=0.02, stall_seconds=1.0, seed=11
    )
    rng = random.Random(2026)
    folder = tmp_path / "runs" / "soak" / "teach"
    with FakeServer(faults=plan, latency_ms=20, max_seconds=300) as srv:
        cmd = compeff_cmd(
            "teach", "--input", str(inp), "--set", "run.name=soak", "--set", "teacher.backend=openai",
            "--set", f"teacher.base_urls=[{srv.base_url}]", "--set", "teacher.model=fake",
            "--set", "teacher.timeout_s=0.3", "--set", "teacher.max_retries=8", "--set", "teacher.backoff_s=0.01",
            "--set", "teacher.backoff_max_s=0.05", "--set", "teacher.concurrency=16",
            "--set", f"teacher.cache={tmp_path / 'cache.sqlite'}",
        )  # fmt: skip
        kills = 0
        at_kill: list[int] = []
        for _attempt in range(6):  # two killed runs, then runs until the stage is complete
            proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True)  # fmt: skip
            if kills < 2:
                data = folder / "data.jsonl"
                before = data.read_bytes().count(b"\n") if data.exists() else 0
                deadline = time.monotonic() + 60
                # a random moment once answers flow: some lines written since the start, then a random wait
                while time.monotonic() < deadline and proc.poll() is None:
                    if data.exists() and data.read_bytes().count(b"\n") > before:
                        break
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 1.5))
                os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its client process, at once
                proc.wait(timeout=30)
                assert (read_manifest(folder) or {}).get("status") != "complete"  # killed mid-run
                at_kill.append(data.read_bytes().count(b"\n") if data.exists() else 0)
                kills += 1
                continue
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-3000:]
            if (read_manifest(folder) or {}).get("status") == "complete":
                break
        assert sum(srv.stats.faults.values()) > 100  # the faults really happened
    assert kills == 2 and read_manifest(folder)["status"] == "complete"
    assert 0 < at_kill[0] <= at_kill[1] < N_PROMPTS, at_kill
    print(f"soak: killed at {at_kill} answered lines of {N_PROMPTS}")
    rows = list(iter_jsonl(folder / "data.jsonl"))
    ids = Counter(r["id"] for r in rows)
    assert ids.most_common(1)[0][1] == 1  # nothing duplicated
    for r in rows:  # every answer is the right one for its prompt
        assert r["response"] == default_responder([{"role": "user", "content": prompts[r["id"]]}], {}), r[
            "id"
        ]
    failed = Counter(f["id"] for f in iter_jsonl(folder / "failures.jsonl"))
    always = {f"q{i}" for i in ALWAYS_FAILS}
    assert set(failed) >= always and not set(ids) & always and failed.most_common(1)[0][1] == 1
    assert set(ids) | set(failed) == set(prompts)  # nothing lost
    assert read_manifest(folder)["counts"]["failed"] == len(set(failed) - set(ids))
