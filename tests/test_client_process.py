"""The openai backend's client process: streaming, bounded look-ahead, failures of the source or the
child, and the in-process path it replaces."""

from __future__ import annotations

import pytest

from compeff.teachers import ChatRequest, SamplingParams
from compeff.teachers.client_process import ClientProcessError
from compeff.teachers.fake_server import FakeServer
from compeff.teachers.openai_api import OpenAITeacher


def request(i: int) -> ChatRequest:
    return ChatRequest(
        id=f"r{i}",
        messages=[{"role": "user", "content": f"text {i}"}],
        params=SamplingParams(temperature=0),
        meta={"row": i},
    )


def teacher_for(url: str, **kw) -> OpenAITeacher:
    return OpenAITeacher("fake-teacher", base_urls=url, timeout_s=2.0, max_retries=1, backoff_s=0.01, **kw)


@pytest.mark.parametrize("client_process", [True, False])
def test_both_paths_answer_every_request_with_its_meta(server, client_process):
    with teacher_for(server.base_url, concurrency=8, client_process=client_process) as teacher:
        results = list(teacher.generate([request(i) for i in range(40)]))
        again = list(teacher.generate([request(i) for i in range(40, 45)]))  # a second call, same child
    assert sorted(r.id for r in results) == sorted(f"r{i}" for i in range(40))
    assert all(r.ok and r.meta == {"row": int(r.id[1:])} and r.latency_s > 0 for r in results)
    assert [r.ok for r in again] == [True] * 5
    assert teacher.usage.ok == 45 and teacher.usage.prompt_tokens > 0


def test_a_lazy_source_is_read_no_further_than_the_window_ahead():
    pulled = answered = 0
    most_ahead = 0

    def source():
        nonlocal pulled
        for i in range(60):
            pulled += 1
            yield request(i)

    with FakeServer(latency_ms=20) as srv, teacher_for(srv.base_url, concurrency=2) as teacher:
        for result in teacher.generate(source()):
            assert result.ok
            answered += 1
            most_ahead = max(most_ahead, pulled - answered)
    window = 2 * teacher.concurrency
    assert answered == 60
    assert most_ahead <= window + 1  # the item pulled while waiting for a credit


def test_an_error_in_the_source_reaches_the_caller_after_the_sent_requests(server):
    def source():
        for i in range(5):
            yield request(i)
        raise ValueError("line 6 of the input is broken")

    with teacher_for(server.base_url, concurrency=4) as teacher:
        seen = []
        with pytest.raises(ValueError, match="line 6"):
            for result in teacher.generate(source()):
                seen.append(result.id)
        assert sorted(seen) == [f"r{i}" for i in range(5)]  # nothing sent was lost
        assert [r.ok for r in teacher.generate([request(9)])] == [True]  # still usable


def test_a_dead_client_process_is_an_error_and_the_next_call_starts_a_new_one(server):
    with teacher_for(server.base_url, concurrency=4) as teacher:
        results = teacher.generate(request(i) for i in range(20))
        assert next(results).ok
        teacher._client._proc.kill()  # the child dies mid-call (OOM killer, a crash)
        with pytest.raises(ClientProcessError, match="died"):
            list(results)
        assert sorted(r.id for r in teacher.generate([request(1), request(2)])) == ["r1", "r2"]


def test_abandoning_a_call_midway_leaves_the_teacher_usable(server):
    with teacher_for(server.base_url, concurrency=4) as teacher:
        answers = teacher.generate(request(i) for i in range(50))
        assert next(answers).ok
        answers.close()  # the caller stops early (an exception in its own code, Ctrl-C)
        assert len(list(teacher.generate([request(i) for i in range(7)]))) == 7
