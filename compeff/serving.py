"""``teacher.serve``: compeff starts the teacher's OpenAI-compatible servers, watches them and stops them.

Engines: ``vllm`` (``vllm serve``; N data-parallel replicas, each on its own GPUs through
``CUDA_VISIBLE_DEVICES``) and ``llamacpp`` (``python -m llama_cpp.server``, CPU or GPU layers). Each
server gets a free loopback port, its own process group and a log file in ``runs/<name>/servers/``; it
is ready when ``/v1/models`` answers (asked directly, never through ``HTTP_PROXY``, with the API key of
``teacher.api_key_env`` when that is set). Servers die with compeff: they are stopped when the block ends,
on Ctrl-C and SIGTERM (the whole process group), and the kernel kills them when compeff itself is killed
(``PR_SET_PDEATHSIG``). A server that dies mid-run is restarted once on the same port (requests carry a
seed each, so the client's retries are safe, and they keep retrying for as long as the restart may take);
a second death stops the stage with the log's tail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from compeff.config import ConfigError, Recipe, ServeSettings, TeacherSettings
from compeff.runs import StageError, atomic_write_bytes, note_servers
from compeff.teachers.base import TeacherUnavailable
from compeff.teachers.endpoints import DIRECT, managed_endpoints

PR_SET_PDEATHSIG = 1
LOG_TAIL_CHARS = 2000
VLLM_DEFAULT_MAX_LOGPROBS = 20  # `vllm serve` refuses top_logprobs above this unless --max-logprobs says more
RESTART_MARGIN_S = 30.0  # beyond startup_timeout_s: the watchdog noticing the death, the old process ending


class ServerFailed(StageError):
    """A teacher server would not start, or died twice; the message quotes its log's tail."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# No Python may run in the child between fork and exec: compeff has threads then (the watchdog, the
# teacher's client, progress bars), and a preexec_fn (which set PDEATHSIG by loading libc with ctypes after
# the fork) can deadlock on a lock another thread held at the fork (the dynamic loader's, the import lock).
# So the new session comes from start_new_session (done in C), and PR_SET_PDEATHSIG from this launcher: the
# child execs it first, a fresh single-threaded Python that sets the signal, gives up if compeff died before
# that (its parent changed), then execs the server in its own place (same pid; PDEATHSIG survives exec).
# The kernel sends the signal when the *thread* that started the child ends: the caller's, or the
# watchdog's for a restarted server; both live as long as the servers should.
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    f"ctypes.CDLL(None, use_errno=True).prctl({PR_SET_PDEATHSIG}, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(70)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def launch_argv(argv: list[str]) -> list[str]:
    """The command line that starts ``argv`` as a server dying with this process (Linux: through the
    PDEATHSIG launcher; elsewhere ``argv`` itself)."""
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), *argv]


def find_program(name: str) -> str | None:
    """The executable a server command starts: on PATH, or beside this Python (an unactivated venv)."""
    if os.sep in name:
        return name if os.access(name, os.X_OK) else None
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def llamacpp_model_file(model: str, serve: ServeSettings) -> str:
    """The GGUF file llama.cpp serves: ``serve.model_file``, or the shipped file of ``builtin:smollm2``."""
    if serve.model_file:
        return serve.model_file
    if model == "builtin:smollm2":
        from compeff.llm_models import smollm2_gguf

        return str(smollm2_gguf())
    if model.endswith(".gguf"):
        return model
    raise ConfigError(
        f"teacher.serve.engine=llamacpp needs a GGUF file: set teacher.serve.model_file (model {model!r})"
    )


def vllm_model_path(model: str) -> str:
    """What ``vllm serve`` loads for a teacher model name: a ``builtin:`` name's local folder (see
    :func:`compeff.models.resolve_model`), any other name as it is."""
    from compeff.models import resolve_model

    try:
        return resolve_model(model)
    except (ValueError, RuntimeError) as exc:  # an unknown builtin: name, a package not installed
        raise ConfigError(f"teacher.model: {exc}") from None


def server_commands(
    settings: TeacherSettings, max_logprobs: int = 0
) -> list[tuple[list[str], dict[str, str]]]:
    """(command line, extra environment) of each server ``teacher.serve`` asks for; ports are filled in
    later (``{port}``). ``max_logprobs``: the most top log-probabilities a request will ask for
    (``generate.teacher_top_logprobs``); vLLM is told to allow it when above its default of 20."""
    serve = settings.serve
    out: list[tuple[list[str], dict[str, str]]] = []
    if serve.engine == "vllm":
        tp = settings.tensor_parallel_size
        gpus = serve.gpus if serve.gpus is not None else list(range(serve.replicas * tp))
        if len(gpus) < serve.replicas * tp:
            raise ConfigError(
                f"teacher.serve: {serve.replicas} replica(s) x tensor_parallel_size {tp} need "
                f"{serve.replicas * tp} GPUs, teacher.serve.gpus lists {len(gpus)}"
            )
        path = vllm_model_path(settings.model)
        top_k = max(max_logprobs, settings.top_logprobs)
        for r in range(serve.replicas):
            cmd = ["vllm", "serve", path, "--host", "127.0.0.1", "--port", "{port}",
                   "--served-model-name", settings.model, "--tensor-parallel-size", str(tp),
                   "--gpu-memory-utilization", str(serve.gpu_memory_utilization)]  # fmt: skip
            if settings.dtype != "auto":
                cmd += ["--dtype", settings.dtype]
            if serve.max_model_len:
                cmd += ["--max-model-len", str(serve.max_model_len)]
            if top_k > VLLM_DEFAULT_MAX_LOGPROBS:
                cmd += ["--max-logprobs", str(top_k)]
            own = gpus[r * tp : (r + 1) * tp]
            out.append((cmd + list(serve.extra_args), {"CUDA_VISIBLE_DEVICES": ",".join(map(str, own))}))
    elif serve.engine == "llamacpp":
        for _ in range(serve.replicas):
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model",
                   llamacpp_model_file(settings.model, serve), "--model_alias", settings.model,
                   "--host", "127.0.0.1", "--port", "{port}", "--n_ctx", str(serve.max_model_len or 4096),
                   "--n_gpu_layers", str(serve.n_gpu_layers)]  # fmt: skip
            if serve.n_threads:
                cmd += ["--n_threads", str(serve.n_threads)]
            out.append((cmd + list(serve.extra_args), {}))
    return out


def engine_version(engine: str) -> str | None:
    """The installed version of the engine's Python package, if any."""
    package = {"vllm": "vllm", "llamacpp": "llama-cpp-python"}.get(engine)
    try:
        return metadata.version(package) if package else None
    except metadata.PackageNotFoundError:
        return None


@dataclass
class Server:
    """One running server: its command, port, log and process; ``api_key`` is sent with the readiness
    probe (a server started with an API key answers nothing without it)."""

    command: list[str]
    env: dict[str, str]
    port: int
    log: Path
    api_key: str | None = None
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        """Start the process (its own session and process group; killed if compeff dies)."""
        argv = [a.replace("{port}", str(self.port)) for a in self.command]
        with self.log.open("ab") as fh:
            fh.write(f"\n# compeff: {' '.join(argv)}\n".encode())
            self.process = subprocess.Popen(
                launch_argv(argv),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,  # setsid in C: no Python between fork and exec (see _LAUNCHER)
            )
        self.started_at.append(time.time())

    def ready(self) -> bool:
        """Whether ``/v1/models`` answers 200 now; ServerFailed when the server refuses the API key."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        request = urllib.request.Request(f"{self.url}/models", headers=headers)
        try:
            with DIRECT.open(request, timeout=2) as resp:  # not via $HTTP_PROXY
                return resp.status == 200
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                self.stop()
                what = "a wrong API key" if self.api_key else "no API key"
                raise ServerFailed(
                    f"teacher server on port {self.port} answered {exc.code} to {what}: the key it wants "
                    "goes in the environment variable named by teacher.api_key_env"
                ) from None
            return False
        except (urllib.error.URLError, OSError, TimeoutError):
            return False

    def log_tail(self) -> str:
        """The last lines of the server's log, for error messages."""
        try:
            data = self.log.read_bytes()[-LOG_TAIL_CHARS:]
        except OSError:
            return "(no log)"
        return data.decode("utf-8", "replace").strip()

    def wait_ready(self, timeout_s: float) -> None:
        """Poll ``/v1/models`` until it answers; fail with the log's tail if the process exits or time
        runs out."""
        deadline = time.monotonic() + timeout_s
        delay = 0.1
        while True:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                raise ServerFailed(
                    f"teacher server on port {self.port} exited with code {code} while starting; "
                    f"log {self.log}:\n{self.log_tail()}"
                )
            if self.ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerFailed(
                    f"teacher server on port {self.port} did not answer /v1/models within {timeout_s:.0f} s; "
                    f"log {self.log}:\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(1.0, delay * 1.5)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the server's process group, then SIGKILL after ``grace_s``."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


class ServerPool:
    """The servers of one ``teacher.serve`` block, with a watchdog that restarts a dead one once."""

    def __init__(self, settings: TeacherSettings, log_dir: Path, max_logprobs: int = 0):
        self.settings = settings
        self.log_dir = log_dir
        self.max_logprobs = max_logprobs
        self.servers: list[Server] = []
        self.failure: str | None = None
        #: set while the main thread has the SIGUSR1 handler that turns a failure into ServerFailed there
        #: (see _stop_on_signals); without it the signal's default action would kill the whole process
        self.signals_installed = False
        self._signal_lock = threading.Lock()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._main = threading.main_thread().ident

    def start(self) -> list[str]:
        """Start every server and wait until all answer; their URLs."""
        serve = self.settings.serve
        program = "vllm" if serve.engine == "vllm" else sys.executable
        if find_program(program) is None:  # before anything is resolved or converted for it
            raise TeacherUnavailable(missing_engine(serve.engine, program))
        commands = server_commands(self.settings, self.max_logprobs)
        for cmd, _ in commands:
            cmd[0] = find_program(cmd[0]) or cmd[0]
        api_key = os.environ.get(self.settings.api_key_env) or None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i, (cmd, env) in enumerate(commands):
            server = Server(cmd, env, free_port(), self.log_dir / f"{serve.engine}-{i}.log", api_key)
            self.servers.append(server)
            server.start()
        try:
            for server in self.servers:
                server.wait_ready(serve.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self._watchdog = threading.Thread(target=self._watch, name="compeff-serve-watchdog", daemon=True)
        self._watchdog.start()
        return [s.url for s in self.servers]

    def describe(self) -> list[dict[str, Any]]:
        """What the manifests record: engine, version, command line, URL, restarts."""
        version = engine_version(self.settings.serve.engine)
        return [
            {"engine": self.settings.serve.engine, "version": version, "url": s.url,
             "command": [a.replace("{port}", str(s.port)) for a in s.command], "env": s.env,
             "restarts": s.restarts, "log": str(s.log), "pid": s.process.pid if s.process else None}
            for s in self.servers
        ]  # fmt: skip

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            for server in self.servers:
                proc = server.process
                if proc is None or proc.poll() is None:
                    continue
                if self._stop.is_set():
                    return
                if server.restarts >= 1:
                    self.failure = (
                        f"teacher server {server.url} died twice (exit code {proc.returncode}); "
                        f"log {server.log}:\n{server.log_tail()}"
                    )
                    self._interrupt_main()
                    return
                server.restarts += 1
                server.start()  # same port: the client's retries find it again
                try:
                    server.wait_ready(self.settings.serve.startup_timeout_s)
                except ServerFailed as exc:
                    self.failure = (
                        f"teacher server {server.url} died twice (the restarted one while starting): {exc}"
                    )
                    self._interrupt_main()
                    return
                self.publish()

    def publish(self) -> None:
        """Record the servers as they are now: in every manifest written meanwhile and in servers.json."""
        note_servers(self.describe())
        atomic_write_bytes(
            self.log_dir / "servers.json", (json.dumps(self.describe(), indent=2) + "\n").encode()
        )

    def _interrupt_main(self) -> None:
        """Raise the failure in the main thread, where its SIGUSR1 handler is installed; elsewhere the
        failure waits in ``self.failure`` for the end of the ``serving`` block."""
        with self._signal_lock:
            if self.signals_installed and self._main is not None and not self._stop.is_set():
                with contextlib.suppress(ProcessLookupError, OSError):
                    signal.pthread_kill(self._main, signal.SIGUSR1)

    def signals(self, installed: bool) -> None:
        """Record whether the main thread's SIGUSR1 handler is in place (only then is it signalled)."""
        with self._signal_lock:
            self.signals_installed = installed

    def stop(self) -> None:
        """Stop the watchdog and every server."""
        self._stop.set()
        for server in self.servers:
            server.stop()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(5)


@contextlib.contextmanager
def _stop_on_signals(pool: ServerPool) -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C (servers stopped on the way out); SIGUSR1 from the watchdog
    raises the server's failure in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt("SIGTERM")

    def on_failure(signum, frame):  # noqa: ARG001
        raise ServerFailed(pool.failure or "a teacher server failed")

    previous = {sig: signal.signal(sig, handler) for sig, handler in ((signal.SIGTERM, on_term), (signal.SIGUSR1, on_failure))}  # fmt: skip
    pool.signals(True)
    try:
        yield
    finally:
        pool.signals(False)  # first: the watchdog must not signal once the default action is back
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def missing_engine(engine: str, program: str) -> str:
    """The one line that says an engine's program is not installed here, and what to do."""
    if engine == "vllm":
        return (
            f"teacher.serve.engine=vllm: vLLM is not installed here (no `{program}` command on PATH or "
            f"beside {sys.executable}); install it with `pip install 'compeff[vllm]'` (Linux, NVIDIA GPU), or "
            "serve the teacher yourself and point teacher.base_urls at it (teacher.serve.engine=none)"
        )
    return f"teacher.serve.engine={engine}: `{program}` not found on PATH or beside {sys.executable}"


def served_teacher(settings: TeacherSettings, urls: list[str]) -> TeacherSettings:
    """The teacher settings a stage uses while compeff serves the model: the openai backend at the
    servers' URLs, in the engine's response-format dialect (llama.cpp: json_object)."""
    update: dict[str, Any] = {"backend": "openai", "base_urls": urls}
    if settings.serve.engine == "llamacpp":
        update["response_format"] = "json_object"
        update["concurrency"] = min(settings.concurrency, 2 * len(urls))  # one answer at a time each
    return settings.model_copy(update=update)


def calls_teacher(recipe: Recipe, stages: list[str]) -> bool:
    """Whether any of these stages would call the teacher's server: the synthesis stages always, ``eval``
    with ``eval.backend: openai``, ``kd`` with ``kd.soft_labels: llm``."""
    for stage in stages:
        if stage in ("teach", "enumerate", "tasks", "generate"):
            return True
        if stage == "eval" and recipe.eval.backend == "openai":
            return True
        if stage == "kd" and recipe.kd.soft_labels == "llm":
            return True
    return False


@contextlib.contextmanager
def serving(recipe: Recipe) -> Iterator[Recipe]:
    """Run a block with the teacher's servers up when ``teacher.serve.engine`` is set (else the recipe
    unchanged); the servers stop when the block ends, however it ends."""
    settings = recipe.teacher
    if settings.serve.engine == "none":
        yield recipe
        return
    pool = ServerPool(settings, recipe.run_dir / "servers", recipe.generate.teacher_top_logprobs)
    restart_s = settings.serve.startup_timeout_s + RESTART_MARGIN_S
    with _stop_on_signals(pool):
        try:
            urls = pool.start()
            pool.publish()
            with managed_endpoints(urls, restart_s):  # the client waits out a restart (bounded)
                try:
                    yield recipe.model_copy(update={"teacher": served_teacher(settings, urls)})
                except Exception as exc:
                    if pool.failure and not isinstance(exc, ServerFailed):  # it failed as its server died
                        raise ServerFailed(pool.failure) from exc
                    raise
            if pool.failure:  # outside the main thread nothing interrupted the block: fail at its end
                raise ServerFailed(pool.failure)
        finally:
            pool.stop()
            note_servers(None)


def serve_forever(recipe: Recipe, ready: Any = print) -> None:
    """``compeff serve``: start the servers, report their URLs, keep them up until Ctrl-C / SIGTERM."""
    if recipe.teacher.serve.engine == "none":
        raise ConfigError(
            "compeff serve: set teacher.serve.engine (vllm or llamacpp) in the recipe or with --set"
        )
    with serving(recipe) as served:
        ready(served.teacher.base_urls)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
