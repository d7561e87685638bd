"""teacher.serve's life cycle on a real box, against stand-in engines: a `vllm` command on PATH and a
`llama_cpp.server` module (tests/engines) that are real processes on real loopback ports, answering as
compeff's fake server. They check what the real engines need from compeff: the command line (builtin
models resolved, --max-logprobs), a readiness probe with the API key and without $HTTP_PROXY, the child
started without Python between fork and exec, the watchdog's failure outside the main thread, requests
that wait out a restart, and the one-line stops of `compeff run` when vLLM is missing or nothing listens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, compeff_cmd

from compeff.config import load_recipe
from compeff.models import resolve_model
from compeff.serving import Server, ServerFailed, find_program, free_port, serving
from compeff.teachers import ChatRequest, SamplingParams, make_teacher
from compeff.teachers.openai_api import OpenAITeacher

ENGINES = REPO / "tests" / "engines"
FAKE_VLLM = """#!{python}
# a stand-in for the `vllm` command: records its arguments, then serves like tests/engines/llama_cpp
import json, os, sys
with open(os.environ["FAKE_VLLM_LOG"], "a") as fh:
    fh.write(json.dumps({{"argv": sys.argv[1:], "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}}) + "\\n")
from llama_cpp.server import main
main()
"""
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="servers' life cycle: Linux")


@pytest.fixture
def engines(tmp_path, monkeypatch) -> Path:
    """The stand-in engines on PATH and PYTHONPATH; returns the file where `vllm` records its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    vllm = bin_dir / "vllm"
    vllm.write_text(FAKE_VLLM.format(python=sys.executable))
    vllm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(ENGINES), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("FAKE_VLLM_LOG", str(tmp_path / "vllm-calls.jsonl"))
    return tmp_path / "vllm-calls.jsonl"


def served_recipe(tmp_path: Path, *sets: str):
    return load_recipe(None, [f"run.dir={tmp_path / 'runs'}", "run.name=s", "teacher.backend=openai",
                              "teacher.model=org/teacher", "teacher.cache=null", "teacher.serve.engine=vllm",
                              "teacher.serve.startup_timeout_s=15", *sets])  # fmt: skip


def listing(recipe) -> list[dict]:
    return json.loads((recipe.run_dir / "servers" / "servers.json").read_text())


def asks(n: int) -> list[ChatRequest]:
    params = SamplingParams(temperature=0.0, max_tokens=8)
    return [ChatRequest(id=f"q{i}", messages=[{"role": "user", "content": f"text {i}"}], params=params) for i in range(n)]  # fmt: skip


# ---------------------------------------------------------------------------------- the command line
def test_vllm_serves_a_builtin_model_by_its_path_with_the_logprobs_the_recipe_asks(tmp_path, engines):
    # builtin:minilm resolves without building anything; builtin:smollm2 goes the same way (resolve_model)
    recipe = served_recipe(tmp_path, "teacher.model=builtin:minilm", "generate.teacher_top_logprobs=128")
    with serving(recipe) as served:
        assert served.teacher.backend == "openai"
    (call,) = [json.loads(line) for line in engines.read_text().splitlines()]
    argv = call["argv"]
    assert argv[:2] == ["serve", resolve_model("builtin:minilm")] and not argv[1].startswith("builtin:")
    flags = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert flags["--served-model-name"] == "builtin:minilm"  # the client still asks for the recipe's name
    assert flags["--max-logprobs"] == "128" and call["gpus"] == "0"
    plain = served_recipe(tmp_path, "run.name=plain")
    with serving(plain):
        pass
    assert "--max-logprobs" not in json.loads(engines.read_text().splitlines()[-1])["argv"]  # 20: vLLM's own


# ------------------------------------------------------------------------------- the readiness probe
def test_the_readiness_probe_sends_the_api_key(tmp_path, engines, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sekrit")
    recipe = served_recipe(tmp_path, "teacher.serve.extra_args=['--api-key', 'sekrit']")
    with serving(recipe) as served:  # before: /v1/models answered 401 until the startup timeout
        teacher = make_teacher(served.teacher)
        try:
            assert all(r.ok for r in teacher.generate(asks(2)))
        finally:
            teacher.close()
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    started = time.monotonic()
    with pytest.raises(ServerFailed, match="answered 401 to a wrong API key"), serving(recipe):
        pass
    assert time.monotonic() - started < 10  # refused at once, not after teacher.serve.startup_timeout_s


def test_the_readiness_probe_does_not_go_through_http_proxy(tmp_path, engines, dead_proxy):
    with serving(served_recipe(tmp_path)) as served:  # before: the probe went to the dead proxy
        assert str(served.teacher.base_urls[0]).startswith("http://127.0.0.1:")


# ------------------------------------------------------------------------------- starting a process
def test_no_python_runs_in_the_child_between_fork_and_exec(tmp_path):
    forks: list[int] = []
    watching = [True]
    # these hooks run only when subprocess will call Python in the child (a preexec_fn): unsafe with threads
    os.register_at_fork(before=lambda: watching[0] and forks.append(1))
    server = Server(
        [sys.executable, "-c", "import time; time.sleep(30)"], {}, free_port(), tmp_path / "s.log"
    )
    try:
        server.start()
        assert server.process is not None
        assert forks == []
        assert os.getsid(server.process.pid) == server.process.pid  # its own session and process group
    finally:
        watching[0] = False
        server.stop(grace_s=2)


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_a_server_dies_with_compeff(tmp_path):
    script = ("import sys, time\nfrom pathlib import Path\nfrom compeff.serving import Server, free_port\n"
              "s = Server([sys.executable, '-c', 'import time; time.sleep(60)'], {}, free_port(), Path(sys.argv[1]))\n"
              "s.start()\nprint(s.process.pid, flush=True)\ntime.sleep(60)\n")  # fmt: skip
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "s.log")], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and b"prctl" in Path(f"/proc/{pid}/cmdline").read_bytes():
        time.sleep(0.05)  # the launcher has armed PDEATHSIG and become the server
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    assert not _alive(pid)


# ------------------------------------------------------------------------------ the watchdog's alarm
WATCHED_IN_A_THREAD = """
import json, os, signal, sys, threading, time
from compeff.config import load_recipe
from compeff.serving import ServerFailed, serving

recipe = load_recipe(None, sys.argv[1:])
listing = recipe.run_dir / "servers" / "servers.json"
outcome = []

def now():
    return json.loads(listing.read_text())[0]

def body():
    try:
        with serving(recipe):
            os.kill(now()["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and now()["restarts"] != 1:
                time.sleep(0.1)
            os.kill(now()["pid"], signal.SIGKILL)
            time.sleep(3)  # the watchdog sees the second death meanwhile
        outcome.append("no error")
    except ServerFailed as exc:
        outcome.append(str(exc).splitlines()[0])

worker = threading.Thread(target=body)
worker.start()
worker.join(90)
print("OUTCOME", json.dumps(outcome), flush=True)
"""


def test_a_server_failure_outside_the_main_thread_is_raised_there_not_a_kill(tmp_path, engines):
    sets = [f"run.dir={tmp_path / 'runs'}", "run.name=t", "teacher.backend=openai", "teacher.model=org/teacher",
            "teacher.serve.engine=vllm", "teacher.serve.startup_timeout_s=15"]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", WATCHED_IN_A_THREAD, *sets], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    # before: the watchdog sent SIGUSR1 to a main thread with no handler, and its default action killed it
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    line = next(x for x in done.stdout.splitlines() if x.startswith("OUTCOME"))
    (outcome,) = json.loads(line.split(" ", 1)[1])
    assert "died twice" in outcome


# ---------------------------------------------------------------------------------- the retry window
def test_requests_wait_out_a_server_restart(tmp_path, engines):
    # the client's own window is about 0.1 s here; the restart takes over 2 s (the server "loads" 2 s)
    recipe = served_recipe(tmp_path, "teacher.max_retries=1", "teacher.backoff_s=0.05", "teacher.backoff_max_s=0.1",
                           "teacher.serve.extra_args=['--start_delay_s', '2']")  # fmt: skip
    with serving(recipe) as served:
        teacher = make_teacher(served.teacher)
        try:
            os.kill(listing(recipe)[0]["pid"], signal.SIGKILL)
            started = time.monotonic()
            results = list(teacher.generate(asks(4)))
            waited = time.monotonic() - started
        finally:
            teacher.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and listing(recipe)[0]["restarts"] != 1:
            time.sleep(0.1)  # the watchdog records the restart once its own probe sees the server ready
        assert listing(recipe)[0]["restarts"] == 1
    assert [r.error for r in results if not r.ok] == []
    assert waited > 2 and max(r.attempts for r in results) > 2


def test_the_outage_window_is_bounded():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens
    for outage_s, least, most in ((0.0, 0.0, 1.0), (1.5, 1.4, 5.0)):
        teacher = OpenAITeacher("m", base_urls=url, max_retries=0, backoff_s=0.05, backoff_max_s=0.2,
                                outage_s=outage_s, client_process=False)  # fmt: skip
        started = time.monotonic()
        (result,) = teacher.generate(asks(1))
        took = time.monotonic() - started
        assert not result.ok and result.error_kind == "connection"
        assert least <= took < most
        assert (result.attempts == 1) if outage_s == 0 else (result.attempts > 3)


# ------------------------------------------------------------------------------- a new user's command
def _one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], done.stderr  # after a stage's header at most
    return errors[0]


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None or find_program("vllm") is not None,
    reason="vLLM is installed",
)
def test_run_without_vllm_says_how_to_install_it(tmp_path):
    done = subprocess.run(compeff_cmd("run", str(REPO / "recipes" / "paper.yaml"), "--set", "teacher.serve.engine=vllm",
                                      "--set", f"run.dir={tmp_path / 'runs'}"),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    line = _one_error_line(done)  # before: FileNotFoundError: 'vllm', exit 1
    assert "vLLM is not installed" in line and "pip install" in line


def test_run_with_nothing_listening_stops_before_the_stage(tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"I liked film {i}"}) + "\n" for i in range(20)))
    url = f"http://127.0.0.1:{free_port()}/v1"  # a closed port
    started = time.monotonic()
    done = subprocess.run(compeff_cmd("run", str(REPO / "recipes" / "paper.yaml"), "--set", f"run.dir={tmp_path / 'runs'}",
                                      "--set", f"teacher.base_urls=[{url}]", "--set", f"data.user_texts=[{texts}]",
                                      "--set", "teacher.cache=null"),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    line = _one_error_line(done)  # before: enumerate ran and recorded all 20 texts as failed, exit 0
    assert "nothing answers at teacher.base_urls" in line and url in line
    assert time.monotonic() - started < 60
    failures = tmp_path / "runs" / "paper" / "enumerate" / "failures.jsonl"
    assert not failures.exists() or failures.read_text() == ""


def test_opening_the_teacher_checks_that_something_listens(server):
    from compeff.teachers import TeacherUnavailable

    closed = f"http://127.0.0.1:{free_port()}/v1"
    settings = load_recipe(None, ["teacher.backend=openai", f"teacher.base_urls=[{closed}]"]).teacher
    started = time.monotonic()
    with pytest.raises(TeacherUnavailable, match="nothing answers at teacher.base_urls"):
        make_teacher(settings)  # every stage opens its teacher here (teacher_session, the tasks stage)
    assert time.monotonic() - started < 2
    one_up = settings.model_copy(update={"base_urls": [closed, server.base_url], "client_process": False})
    teacher = make_teacher(one_up)  # one replica answering is enough: retries go to the next URL
    teacher.close()
