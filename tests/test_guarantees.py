"""The run-folder and teacher guarantees: names stay inside the run, one process per stage, repair cuts
only a torn tail, sampled requests are distinct seeded draws, the cache keeps only usable answers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import compeff_cmd

from compeff.config import ConfigError, load_recipe
from compeff.runs import (
    Stage,
    StageError,
    StageLocked,
    clear_stage_folder,
    iter_jsonl,
    read_manifest,
)
from compeff.teachers import ChatRequest, SamplingParams, TeacherCache
from compeff.teachers.fake_server import FakeServer
from compeff.teachers.openai_api import OpenAITeacher
from compeff.teaching import AnswerRejected, answer_requests


# ------------------------------------------------------------------ 1. names cannot reach other folders
@pytest.mark.parametrize(
    "override",
    [
        "run.name=../elsewhere",
        "run.name=",
        "run.name=.",
        "teach.stage=/some/abs/dir",
        "teach.stage=",
        "teach.stage=../otherrun/generate",
        "teach.stage=a/b",
    ],
)
def test_names_that_are_not_plain_are_refused(override):
    with pytest.raises(ConfigError, match="letters, digits"):
        load_recipe(overrides=[override])


def test_kd_student_names_are_plain():
    with pytest.raises(ConfigError, match=r"kd.students.0.name"):
        load_recipe(overrides=["kd.students=[{name: ../../x, init_from_teacher: true, layers: [0]}]"])


def test_stage_open_refuses_paths_and_foreign_folders(tmp_path):
    run = tmp_path / "run"
    for name in ("../other", "", ".", "/abs", "a/b"):
        with pytest.raises(StageError):
            Stage.open(run, name, config={})
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("mine")
    (run).mkdir()
    (run / "teach").symlink_to(victim)  # a symlink out of the run folder
    with pytest.raises(StageError, match="outside its run folder"):
        Stage.open(run, "teach", config={}, force=True)
    assert (victim / "precious.txt").read_text() == "mine"
    foreign = run / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(StageError, match="no compeff manifest"):
        Stage.open(run, "notes", config={}, force=True)
    with pytest.raises(StageError, match="not a compeff stage folder"):
        clear_stage_folder(foreign)
    assert (foreign / "todo.txt").read_text() == "keep me"


def test_cli_force_with_an_absolute_stage_name_touches_nothing(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("mine")
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "1", "prompt": "hi"}\n')
    proc = subprocess.run(
        compeff_cmd("teach", "--input", str(inp), "--set", f"teach.stage={victim}", "--force"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "teach.stage" in proc.stderr and "Traceback" not in proc.stderr
    assert (victim / "precious.txt").read_text() == "mine"


# ------------------------------------------------------------------ 2. one process per stage folder
HOLDER = """
import sys, time
from compeff.runs import Stage
st = Stage.open(sys.argv[1], "s", config={})
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_process_is_refused_with_the_holders_pid_and_a_dead_holder_frees_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StageLocked, match=f"pid {holder.pid}"):
            Stage.open(tmp_path, "s", config={})
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with Stage.open(tmp_path, "s", config={}) as st:  # the dead holder's lock is gone with it
        st.append([{"id": "1"}])
    assert read_manifest(tmp_path / "s")["status"] == "complete"


def test_two_teach_processes_on_one_stage_do_not_both_write(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": str(i), "prompt": f"p {i}"}) + "\n" for i in range(300)))
    with FakeServer(latency_ms=20) as srv:
        cmd = compeff_cmd(
            "teach",
            "--input",
            str(inp),
            "--set",
            "teacher.backend=openai",
            "--set",
            f"teacher.base_urls=[{srv.base_url}]",
            "--set",
            "teacher.model=fake",
            "--set",
            "teacher.concurrency=4",
            "--set",
            "teacher.cache=null",
        )
        first = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path
        )
        deadline = time.monotonic() + 60
        lock = tmp_path / "runs" / "quickstart" / "teach" / ".lock"
        while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.02)
        second = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        first.wait(timeout=120)
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr[-500:]
    ids = [r["id"] for r in iter_jsonl(tmp_path / "runs" / "quickstart" / "teach" / "data.jsonl")]
    assert first.returncode == 0 and sorted(ids, key=int) == [str(i) for i in range(300)]


# ------------------------------------------------------------------ 3. repair cuts only a torn tail
def _stage_with_lines(tmp_path: Path, lines: list[bytes]) -> Path:
    Stage.open(tmp_path, "s", config={}).close(complete=False)
    data = tmp_path / "s" / "data.jsonl"
    data.write_bytes(b"".join(lines))
    return data


def test_a_bad_line_in_the_middle_stops_the_stage_and_keeps_every_record(tmp_path):
    good = [json.dumps({"id": str(i)}).encode() + b"\n" for i in range(9)]
    data = _stage_with_lines(tmp_path, good[:3] + [b"{not json\n"] + good[3:8])
    before = data.read_bytes()
    with pytest.raises(StageError, match=r"data.jsonl:4: invalid JSON"):
        Stage.open(tmp_path, "s", config={})
    assert data.read_bytes() == before  # nothing cut


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b"\xff\xfe latin\n", "not UTF-8"),
        (b"[1, 2]\n", "not a JSON object"),
        (b'{"no_id": 1}\n', "with an 'id'"),
    ],
)
def test_undecodable_or_foreign_lines_are_one_clear_error(tmp_path, bad, message):
    _stage_with_lines(tmp_path, [b'{"id": "1"}\n', bad, b'{"id": "2"}\n'])
    with pytest.raises(StageError, match=f"data.jsonl:2: .*{message}"):
        Stage.open(tmp_path, "s", config={})


def test_only_a_torn_last_line_is_cut(tmp_path):
    data = _stage_with_lines(tmp_path, [b'{"id": "1"}\n', b'{"id": "2"}\n', b'{"id": "3", "te'])
    st = Stage.open(tmp_path, "s", config={})
    assert st.done_ids == {"1", "2"}
    st.close()
    assert data.read_bytes() == b'{"id": "1"}\n{"id": "2"}\n'


# ------------------------------------------------------------------ 6. data without a manifest, bad manifests
def test_records_without_a_manifest_are_not_adopted(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "data.jsonl").write_text('{"id": "old"}\n')
    with pytest.raises(StageError, match="no compeff manifest"):
        Stage.open(tmp_path, "s", config={"new": True})
    (folder / "manifest.json").write_text("")
    with pytest.raises(StageError, match="not a compeff manifest"):
        Stage.open(tmp_path, "s", config={"new": True})


# ------------------------------------------------------------------ 8. a skipped stage is left as it is
def test_an_up_to_date_stage_keeps_its_manifest_byte_for_byte(tmp_path):
    with Stage.open(tmp_path, "s", config={"a": 1}) as st:
        st.append([{"id": "1"}])
        st.fail([{"id": "2", "reason": "boom"}])
        st.extra["teacher_usage"] = {"requests": 2}
    manifest = tmp_path / "s" / "manifest.json"
    before = manifest.read_bytes()
    time.sleep(0.01)
    with Stage.open(tmp_path, "s", config={"a": 1}) as st:
        assert st.was_complete and st.pending([ChatRequest(id="2", messages=[])]) == []
    assert manifest.read_bytes() == before


# ------------------------------------------------------------------ 4-5. seeds and the cache
def _echo_seed(messages, body):
    return f"draw {body.get('seed')}"


def _teacher(url: str, seed: int | None = 7) -> OpenAITeacher:
    teacher = OpenAITeacher("fake", base_urls=url, concurrency=4, timeout_s=5, max_retries=1, backoff_s=0.01)
    teacher.seed = seed
    return teacher


def _same_prompt(n: int, temperature: float = 0.8) -> list[ChatRequest]:
    messages = [{"role": "user", "content": "the same prompt"}]
    return [
        ChatRequest(id=f"s{i}", messages=messages, params=SamplingParams(temperature=temperature))
        for i in range(n)
    ]


def test_sampled_requests_are_distinct_seeded_draws_and_reruns_repeat_them(tmp_path):
    cache = TeacherCache(tmp_path / "c.sqlite")
    with FakeServer(responder=_echo_seed) as srv:
        teacher = _teacher(srv.base_url)
        first = {r.id: r.text for r in teacher.generate(_same_prompt(20), cache=cache)}
        assert srv.stats.requests == 20 and len(set(first.values())) == 20  # no copies
        again = {r.id: r.text for r in teacher.generate(_same_prompt(20), cache=cache)}
        assert again == first and srv.stats.requests == 20  # the same draws, from the cache
        other_run = _teacher(srv.base_url, seed=8)
        moved = {r.id: r.text for r in other_run.generate(_same_prompt(20), cache=cache)}
        assert srv.stats.requests == 40 and not set(moved.values()) & set(first.values())
        greedy = list(teacher.generate(_same_prompt(5, temperature=0.0), cache=cache))
        assert {r.text for r in greedy} == {"draw None"}  # greedy requests carry no seed


@pytest.mark.parametrize(
    "answer",
    [
        {"content": None},
        {"content": ["a", "list"]},
        {"content": 42},
        {"content": ""},
        {"content": "cut off in the mid", "finish_reason": "length"},
    ],
)
def test_unusable_answers_are_not_cached(tmp_path, answer):
    cache = TeacherCache(tmp_path / "c.sqlite")
    with FakeServer(responder=lambda m, b: answer) as srv:
        teacher = _teacher(srv.base_url)
        for _ in range(2):
            results = list(teacher.generate(_same_prompt(1, temperature=0.0), cache=cache))
            assert len(results) == 1 and not results[0].cached
        assert len(cache) == 0 and srv.stats.requests >= 2
    if not isinstance(answer["content"], str):
        assert not results[0].ok and results[0].error_kind == "protocol"


def test_an_answer_the_stage_rejects_leaves_the_cache(tmp_path):
    cache = TeacherCache(tmp_path / "c.sqlite")

    def to_record(request, result):
        if "bad" in result.text:
            raise AnswerRejected("unusable")
        return {"id": request.id, "text": result.text}

    with FakeServer(responder=lambda m, b: "a bad answer") as srv:
        teacher = _teacher(srv.base_url)
        for attempt in (1, 2):
            with Stage.open(tmp_path, "s", config={}, force=attempt > 1) as st:  # a --force rerun
                answer_requests(
                    st, teacher, _same_prompt(3, temperature=0.0), to_record, cache=cache, progress=False
                )
            assert srv.stats.requests == 3 * attempt and len(cache) == 0  # the retry asked the teacher again
    assert sum(1 for _ in iter_jsonl(tmp_path / "s" / "failures.jsonl")) == 3


def test_an_answer_the_parser_chokes_on_is_that_items_failure_not_a_crash(tmp_path):
    """A record function that raises on a teacher's text (seen with llama.cpp: a raw control character
    inside a JSON string) fails that item with the reason and the raw answer; the stage goes on."""

    def to_record(request, result):
        return {"id": request.id, "value": json.loads(result.text)}  # raises on the bad answer

    answers = iter(['{"a": "fine"}', '{"a": "raw\x01control"}', '{"a": "fine too"}'])
    with FakeServer(responder=lambda m, b: next(answers)) as srv:
        teacher = _teacher(srv.base_url)
        with Stage.open(tmp_path, "s", config={}) as st:
            counts = answer_requests(st, teacher, _same_prompt(3, temperature=0.0), to_record, progress=False)
    assert counts["ok"] == 2 and counts["rejected"] == 1
    (failure,) = list(iter_jsonl(tmp_path / "s" / "failures.jsonl"))
    assert "unreadable answer (JSONDecodeError" in failure["reason"] and "control" in failure["raw"][0]


def test_a_corrupted_cache_file_is_one_clear_error(tmp_path):
    from compeff.teachers.cache import CacheError

    bad = tmp_path / "c.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CacheError, match="not a usable SQLite cache"):
        TeacherCache(bad)


# ------------------------------------------------------------------ 10. the client process ignores the cwd
def test_the_client_process_does_not_import_from_the_working_directory(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    (tmp_path / "orjson.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nraise ImportError('fake')\n")
    monkeypatch.chdir(tmp_path)
    with FakeServer() as srv:
        teacher = OpenAITeacher("fake", base_urls=srv.base_url, client_process=True)
        try:
            results = list(teacher.generate(_same_prompt(2, temperature=0.0)))
        finally:
            teacher.close()
    assert all(r.ok for r in results) and not marker.exists()
    assert os.getcwd() == str(tmp_path)


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing written
def _cli(*args: str):
    from typer.testing import CliRunner

    from compeff.cli import app

    return CliRunner().invoke(app, list(args))


def _assert_one_line_exit_2(result, *needles: str) -> None:
    output = result.output.strip()
    assert result.exit_code == 2, output[-2000:]
    assert "Traceback" not in output and len(output.splitlines()) <= 2, output[-2000:]
    for needle in needles:
        assert needle in output, output


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("teacher.base_urls=[]", "teacher.base_urls"),
        ("teacher.base_urls=[ftp://x]", "teacher.base_urls.0"),
        ("run.seed=-1", "run.seed"),
        ("teacher.timeout_s=.inf", "teacher.timeout_s"),
        ("teacher.concurrency=1e9", "teacher.concurrency"),
        ("eval.seeds=[]", "eval.seeds"),
        ("kd.seeds=[]", "kd.seeds"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(tmp_path, override, key):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "1", "prompt": "hi"}\n')
    _assert_one_line_exit_2(_cli("teach", "--input", str(inp), "--set", override), key)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"id": "1", "prompt": "a"}\n{"id": "1", "prompt": "b"}\n', "id '1' appears twice"),
        ('{"id": "1", "prompt": "a"}\n42\n', "in.jsonl:2: not a JSON object"),
        ('"just a string"\n', "in.jsonl:1: not a JSON object"),
        ('{"id": "1", "prompt": "bad \\ud83d"}\n', "lone surrogate"),
        ('{"id": "1", "messages": [{"role": "user", "content": 5}]}\n', "text 'content'"),
    ],
)
def test_bad_teach_input_is_one_line_and_exit_2(tmp_path, content, needle):
    inp = tmp_path / "in.jsonl"
    inp.write_text(content)
    _assert_one_line_exit_2(_cli("teach", "--input", str(inp)), needle)
    assert not (tmp_path / "runs").exists()


def test_non_utf8_teach_input_is_one_line_and_exit_2(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"id": "1", "prompt": "caf\xe9"}\n')
    _assert_one_line_exit_2(_cli("teach", "--input", str(inp)), "not UTF-8")


def test_a_corrupted_cache_file_is_one_line_and_exit_2(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "1", "prompt": "hi"}\n')
    cache = tmp_path / "cache.sqlite"
    cache.write_bytes(b"garbage" * 1000)
    with FakeServer() as srv:
        result = _cli(
            "teach",
            "--input",
            str(inp),
            "--set",
            "teacher.backend=openai",
            "--set",
            "teacher.model=fake",
            "--set",
            f"teacher.base_urls=[{srv.base_url}]",
            "--set",
            f"teacher.cache={cache}",
        )
    _assert_one_line_exit_2(result, "not a usable SQLite cache")


def test_credentials_in_a_base_url_stay_out_of_the_manifest(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "1", "prompt": "hi"}\n')
    with FakeServer() as srv:
        url = srv.base_url.replace("http://", "http://alice:s3cret@")
        proc = subprocess.run(
            compeff_cmd("teach", "--input", str(inp), "--set", "teacher.backend=openai", "--set",
                        "teacher.model=fake", "--set", f"teacher.base_urls=[{url}]", "--set", "teacher.cache=null"),
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = (tmp_path / "runs" / "quickstart" / "teach" / "manifest.json").read_text()
    assert "s3cret" not in manifest and "***@" in manifest


# ------------------------------------------------------------------ 9. untrusted text in report.html
def test_report_html_escapes_teacher_text_and_inlines_only_run_folder_images(tmp_path):
    from compeff.report import write_report

    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\nSECRET-BYTES")
    run = tmp_path / "run"
    with Stage.open(run, "enumerate", config={}) as st:
        st.write_artifact("plot.png", b"\x89PNG\r\n\x1a\nOWN-PLOT")
        st.write_artifact(
            "summary.md",
            "# Attributes\n\n| attribute | description |\n|---|---|\n"
            "| joy | <img src=x onerror=alert(1)> |\n\n"
            f"<script>alert(2)</script>\n\n![p]({secret})\n\n![q](../secret.png)\n\n![own](enumerate/plot.png)\n",
        )
    write_report(run)
    page = (run / "report.html").read_text()
    assert "<img src=x" not in page and "<script>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;script&gt;" in page
    import base64

    assert base64.b64encode(b"\x89PNG\r\n\x1a\nSECRET-BYTES").decode() not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) >= 3 and all(src == "" or src.startswith("data:image/png;base64,") for src in sources)
    assert base64.b64encode(b"\x89PNG\r\n\x1a\nOWN-PLOT").decode() in page


# ------------------------------------------------------------------ 11. only compeff's own proxy pickles load
def test_a_pickle_compeff_did_not_write_is_not_loaded(tmp_path):
    import pickle

    from compeff.data import DataError
    from compeff.select.proxy import load_proxy

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "proxy.joblib"
    bad.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataError, match="not a proxy written by"):
        load_proxy(bad)
    assert not marker.exists()


def test_a_response_body_over_the_cap_is_a_protocol_failure(monkeypatch):
    from compeff.teachers import openai_api

    monkeypatch.setattr(openai_api, "MAX_BODY_BYTES", 2000)
    with FakeServer(responder=lambda m, b: "x" * 5000) as srv:
        teacher = OpenAITeacher("fake", base_urls=srv.base_url, client_process=False, max_retries=0)
        [result] = list(teacher.generate(_same_prompt(1, temperature=0.0)))
        teacher.close()
    assert not result.ok and result.error_kind == "protocol" and "exceeds 2000" in result.error


def test_a_failed_cache_write_is_rolled_back_and_the_next_one_works(tmp_path):
    import sqlite3

    from compeff.teachers.base import TeacherResult
    from compeff.teachers.cache import CacheError

    cache = TeacherCache(tmp_path / "c.sqlite")
    request = _same_prompt(1, temperature=0.0)[0]
    answer = TeacherResult(id=request.id, ok=True, texts=["fine"], finish_reasons=["stop"])
    other = sqlite3.connect(tmp_path / "c.sqlite")
    other.execute("DROP TABLE answers")  # the write below fails inside its transaction
    other.commit()
    with pytest.raises(CacheError):
        cache.put_many("m", [(request, answer)])
    other.execute("CREATE TABLE answers (key TEXT PRIMARY KEY, model TEXT NOT NULL, value TEXT NOT NULL, "
                  "created REAL NOT NULL DEFAULT (julianday('now')))")  # fmt: skip
    other.commit()
    cache.put_many("m", [(request, answer)])  # no "cannot start a transaction within a transaction"
    assert cache.get("m", request).text == "fine"
