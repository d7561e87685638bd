"""The openai backend against a real loopback server that injects faults."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from compeff.config import load_recipe
from compeff.runs import iter_jsonl
from compeff.teachers import ChatRequest, SamplingParams, TeacherCache
from compeff.teachers.fake_server import FakeServer, FaultPlan
from compeff.teachers.openai_api import OpenAITeacher, parse_completion
from compeff.teaching import run_teach_stage


def requests(n: int, prefix: str = "r", marker: str = "") -> list[ChatRequest]:
    return [
        ChatRequest(
            id=f"{prefix}{i}",
            messages=[{"role": "user", "content": f"text {i} {marker}"}],
            params=SamplingParams(temperature=0),
        )
        for i in range(n)
    ]


def fast_teacher(url, **kw) -> OpenAITeacher:
    defaults = dict(concurrency=16, timeout_s=1.0, max_retries=4, backoff_s=0.01, backoff_max_s=0.05)
    defaults.update(kw)
    return OpenAITeacher("fake-teacher", base_urls=url, **defaults)


def test_clean_server_answers_everything(server):
    teacher = fast_teacher(server.base_url)
    results = list(teacher.generate(requests(50)))
    assert sorted(r.id for r in results) == sorted(f"r{i}" for i in range(50))
    assert all(r.ok and r.text.startswith("answer-") and r.attempts == 1 for r in results)
    assert teacher.usage.ok == 50 and teacher.usage.completion_tokens > 0
    assert server.stats.requests == 50


@pytest.mark.parametrize("kind", ["500", "429", "stall", "malformed", "drop"])
def test_transient_faults_are_retried(kind):
    with FakeServer(faults=FaultPlan(stall_seconds=3.0)) as srv:
        teacher = fast_teacher(srv.base_url, timeout_s=0.5)
        results = list(teacher.generate(requests(6, marker=f"[[first:2:{kind}]]")))
    assert all(r.ok for r in results), [r.error for r in results]
    assert all(r.attempts == 3 for r in results)
    assert teacher.usage.retries == 12


@pytest.mark.parametrize(
    ("kind", "error_kind"), [("500", "status"), ("stall", "timeout"), ("malformed", "protocol")]
)
def test_persistent_faults_fail_with_reason(kind, error_kind):
    with FakeServer(faults=FaultPlan(stall_seconds=3.0)) as srv:
        teacher = fast_teacher(srv.base_url, timeout_s=0.3, max_retries=2)
        results = list(teacher.generate(requests(3, marker=f"[[always:{kind}]]")))
    assert len(results) == 3
    assert all(not r.ok and r.error_kind == error_kind and r.attempts == 3 for r in results)


def test_client_errors_are_not_retried(server):
    teacher = OpenAITeacher(
        "m", base_urls=server.base_url.replace("/v1", "/nope"), max_retries=3, backoff_s=0.01
    )
    [result] = list(teacher.generate(requests(1)))
    assert not result.ok and result.error_kind == "status" and result.attempts == 1 and "404" in result.error


def test_unreachable_server_is_a_connection_failure():
    teacher = fast_teacher("http://127.0.0.1:9/v1", max_retries=1)
    [result] = list(teacher.generate(requests(1)))
    assert not result.ok and result.error_kind == "connection"


def test_round_robin_over_base_urls():
    with FakeServer() as a, FakeServer() as b:
        teacher = fast_teacher([a.base_url, b.base_url], concurrency=4)
        results = list(teacher.generate(requests(40)))
        assert all(r.ok for r in results)
        assert a.stats.requests == b.stats.requests == 20


def test_logprobs_and_n(server):
    teacher = fast_teacher(server.base_url)
    params = SamplingParams(temperature=0.5, n=2, logprobs=True, top_logprobs=1)
    [result] = list(
        teacher.generate(
            [ChatRequest(id="x", messages=[{"role": "user", "content": "hello world"}], params=params)]
        )
    )
    assert len(result.texts) == 2 and result.texts[0] != result.texts[1]
    assert result.logprobs and result.logprobs[0]["content"][0]["top_logprobs"]


def test_parse_completion_rejects_bodies_without_choices():
    from compeff.teachers.base import TeacherProtocolError

    for raw in (b"not json", b'{"choices": []}', b'{"object": "error"}', b'{"choices": [{"index": 0}]}'):
        with pytest.raises(TeacherProtocolError):
            parse_completion(raw)


def test_cache_answers_identical_requests_without_the_server(server, tmp_path):
    cache = TeacherCache(tmp_path / "c.sqlite")
    teacher = fast_teacher(server.base_url)
    first = {r.id: r.text for r in teacher.generate(requests(10), cache=cache)}
    assert server.stats.requests == 10
    again = list(teacher.generate(requests(10, prefix="other-id-"), cache=cache))
    assert server.stats.requests == 10  # not one more call
    assert all(r.cached for r in again)
    assert sorted(r.text for r in again) == sorted(first.values())
    changed = [ChatRequest(id="t", messages=requests(1)[0].messages, params=SamplingParams(temperature=0.9))]
    list(teacher.generate(changed, cache=cache))
    assert server.stats.requests == 11  # other sampling params are another request


def test_teach_stage_with_random_faults_loses_and_duplicates_nothing(tmp_path):
    """Random 500s, 429s, stalls, malformed bodies and drops: each id ends in data or failures, once."""
    inp = tmp_path / "requests.jsonl"
    n = 120
    with inp.open("w") as fh:
        for i in range(n):
            marker = " [[always:500]]" if i % 20 == 0 else ""
            fh.write(json.dumps({"id": f"q{i}", "prompt": f"question {i}{marker}"}) + "\n")
    plan = FaultPlan(
        error_500=0.1, error_429=0.1, stall=0.03, malformed=0.05, drop=0.03, stall_seconds=2.0, seed=7
    )
    with FakeServer(faults=plan) as srv:
        recipe = load_recipe(
            None,
            [
                f"teach.input={inp}",
                "teacher.backend=openai",
                f"teacher.base_urls=[{srv.base_url}]",
                "teacher.timeout_s=0.4",
                "teacher.max_retries=12",
                "teacher.backoff_s=0.01",
                "teacher.backoff_max_s=0.05",
                "teacher.concurrency=16",
                f"teacher.cache={tmp_path / 'cache.sqlite'}",
                f"run.dir={tmp_path / 'runs'}",
            ],
        )
        manifest = run_teach_stage(recipe, progress=False)
        assert sum(srv.stats.faults.values()) > 20  # faults really happened
    folder = tmp_path / "runs" / "quickstart" / "teach"
    ok_ids = [r["id"] for r in iter_jsonl(folder / "data.jsonl")]
    failed = list(iter_jsonl(folder / "failures.jsonl"))
    assert len(ok_ids) == len(set(ok_ids))
    assert {f["id"] for f in failed} == {f"q{i}" for i in range(0, n, 20)}
    assert set(ok_ids) | {f["id"] for f in failed} == {f"q{i}" for i in range(n)}
    assert all(f["kind"] == "status" and f["reason"] for f in failed)
    assert manifest["counts"]["ok"] == n - 6 and manifest["counts"]["failed"] == 6
    assert manifest["teacher_usage"]["retries"] > 0
    assert Counter(r["id"] for r in iter_jsonl(folder / "data.jsonl")).most_common(1)[0][1] == 1
