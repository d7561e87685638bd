"""Shared fixtures: a tiny local chat LM built from scratch, a loopback OpenAI-compatible server."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from compeff.models import build_tiny_chat_model
from compeff.teachers.fake_server import FakeServer

REPO = Path(__file__).resolve().parent.parent
# words of the tiny tokenizer's corpus, for synthetic samples
WORDS = [
    "the",
    "film",
    "was",
    "great",
    "awful",
    "plot",
    "actors",
    "boring",
    "brilliant",
    "music",
    "slow",
    "fun",
    "sad",
    "happy",
]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A 2-layer Llama with a BPE tokenizer trained here and a ChatML template, saved by path."""
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    """The same, as a Qwen2 config."""
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-qwen"), arch="qwen2")


@pytest.fixture(scope="session")
def tiny_chat(compeff_home) -> Path:
    """The format-taught tiny chat LM (tests/tiny_chat.py), built once per test session (~2 min) in a
    process of its own: inside pytest, thread settings left by earlier tests slowed it past the timeout."""
    import subprocess

    from tiny_chat import VERSION

    target = compeff_home / f"tiny-chat-{VERSION}"
    if not (target / "config.json").exists():
        build = "import sys; from tiny_chat import tiny_chat_path; tiny_chat_path(sys.argv[1])"
        try:
            out = subprocess.run([sys.executable, "-c", build, str(compeff_home)], cwd=Path(__file__).parent,
                                 stderr=subprocess.PIPE, text=True, errors="replace", timeout=1500)  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            tail = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
            pytest.fail(f"building the tiny chat LM took over {exc.timeout:g} s:\n{tail[-3000:]}")
        if out.returncode != 0:  # every test that needs it errors: say once why the build died
            pytest.fail(f"building the tiny chat LM failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return target


@pytest.fixture
def server():
    """A fault-free loopback server answering at once."""
    with FakeServer(max_seconds=120) as srv:
        yield srv


@pytest.fixture(scope="session")
def compeff_home(tmp_path_factory) -> Path:
    """One home for built-in models per test session (the tiny chat LM is built once, ~30 s)."""
    return tmp_path_factory.mktemp("compeff-home")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch, compeff_home):
    """Built-in models in the session's home; each test runs in its own tmp folder."""
    monkeypatch.setenv("COMPEFF_HOME", str(compeff_home))
    monkeypatch.chdir(tmp_path)


def compeff_cmd(*args: str) -> list[str]:
    """Command line running the installed CLI with this interpreter."""
    return [sys.executable, "-m", "compeff.cli", *args]


def kill_after_lines(cmd: list[str], data: Path, min_lines: int, wait_s: float = 300.0) -> int:
    """Start ``cmd``, SIGKILL it once ``data`` holds ``min_lines`` lines (bounded wait); lines at the kill."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not (data.exists() and data.read_text().count("\n") >= min_lines):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return data.read_text().count("\n") if data.exists() else 0


@pytest.fixture
def dead_proxy(monkeypatch):
    """$HTTP_PROXY names a loopback port where nothing listens (no $NO_PROXY): a request that goes through
    the proxy fails. urllib's default opener reads the proxies once, so it is reset before and after."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, url)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    urllib.request.install_opener(None)
    yield url
    urllib.request.install_opener(None)
