"""``teacher.serve``: compeff starts the teacher's OpenAI-compatible servers, watches them and stops them.

Engines: ``vllm`` (``vllm serve``; N data-parallel replicas, each on its own GPUs through
``CUDA_VISIBLE_DEVICES``) and ``llamacpp`` (``python -m llama_cpp.server``, CPU or GPU layers). Each
server gets a free loopback port, its own process group and a log file in ``runs/<name>/servers/``; it
is ready when ``/v1/models`` answers. Servers die with compeff: they are stopped when the block ends, on
Ctrl-C and SIGTERM (the whole process group), and the kernel kills them when compeff itself is killed
(``PR_SET_PDEATHSIG``). A server that dies mid-run is restarted once on the same port (requests carry a
seed each, so the client's retries are safe); a second death stops the stage with the log's tail.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
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

PR_SET_PDEATHSIG = 1
LOG_TAIL_CHARS = 2000


class ServerFailed(StageError):
    """A teacher server would not start, or died twice; the message quotes its log's tail."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


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


def server_commands(settings: TeacherSettings) -> list[tuple[list[str], dict[str, str]]]:
    """(command line, extra environment) of each server ``teacher.serve`` asks for; ports are filled in
    later (``{port}``)."""
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
        for r in range(serve.replicas):
            cmd = ["vllm", "serve", settings.model, "--host", "127.0.0.1", "--port", "{port}",
                   "--served-model-name", settings.model, "--tensor-parallel-size", str(tp),
                   "--gpu-memory-utilization", str(serve.gpu_memory_utilization)]  # fmt: skip
            if settings.dtype != "auto":
                cmd += ["--dtype", settings.dtype]
            if serve.max_model_len:
                cmd += ["--max-model-len", str(serve.max_model_len)]
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
    """One running server: its command, port, log and process."""

    command: list[str]
    env: dict[str, str]
    port: int
    log: Path
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
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - setsid + PDEATHSIG need the child's side
            )
        self.started_at.append(time.time())

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
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError, TimeoutError):
                pass
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

    def __init__(self, settings: TeacherSettings, log_dir: Path):
        self.settings = settings
        self.log_dir = log_dir
        self.servers: list[Server] = []
        self.failure: str | None = None
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._main = threading.main_thread().ident

    def start(self) -> list[str]:
        """Start every server and wait until all answer; their URLs."""
        serve = self.settings.serve
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i, (cmd, env) in enumerate(server_commands(self.settings)):
            server = Server(cmd, env, free_port(), self.log_dir / f"{serve.engine}-{i}.log")
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
        if self._main is not None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pthread_kill(self._main, signal.SIGUSR1)

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
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
    pool = ServerPool(settings, recipe.run_dir / "servers")
    with _stop_on_signals(pool):
        try:
            urls = pool.start()
            pool.publish()
            yield recipe.model_copy(update={"teacher": served_teacher(settings, urls)})
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
