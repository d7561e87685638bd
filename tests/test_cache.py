"""The SQLite cache under concurrent threads and processes."""

from __future__ import annotations

import multiprocessing as mp
import threading

from compeff.teachers import ChatRequest, SamplingParams, TeacherCache, TeacherResult


def _req(i: int, rid: str = "x") -> ChatRequest:
    return ChatRequest(id=rid, messages=[{"role": "user", "content": f"m{i}"}], params=SamplingParams())


def _writer(path: str, start: int) -> None:
    cache = TeacherCache(path)
    for i in range(start, start + 200):
        cache.put("m", _req(i), TeacherResult(id="x", ok=True, texts=[f"a{i}"]))
    cache.close()


def test_concurrent_processes_and_threads(tmp_path):
    path = str(tmp_path / "c.sqlite")
    procs = [mp.get_context("spawn").Process(target=_writer, args=(path, k * 100)) for k in range(3)]
    for p in procs:
        p.start()
    errors: list[BaseException] = []

    def thread_writer(start: int) -> None:
        try:
            _writer(path, start)
        except BaseException as exc:  # a thread's failure would otherwise only be printed
            errors.append(exc)

    threads = [threading.Thread(target=thread_writer, args=(1000 + k * 200,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    cache = TeacherCache(path)
    assert len(cache) == 400 + 400  # 0..399 from the overlapping processes, 1000..1399 from threads
    hit = cache.get("m", _req(150, rid="mine"))
    assert hit.id == "mine" and hit.texts == ["a150"] and hit.cached


def test_key_covers_model_and_params_not_id(tmp_path):
    cache = TeacherCache(tmp_path / "c.sqlite")
    cache.put("m", _req(1), TeacherResult(id="x", ok=True, texts=["a"]))
    assert cache.get("m", _req(1, rid="other")) is not None
    assert cache.get("other-model", _req(1)) is None
    hot = ChatRequest(id="x", messages=_req(1).messages, params=SamplingParams(temperature=1.3))
    assert cache.get("m", hot) is None
    cache.put("m", _req(2), TeacherResult(id="x", ok=False, error="boom"))
    assert cache.get("m", _req(2)) is None  # failures are never cached
