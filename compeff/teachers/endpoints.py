"""The openai backend's servers before and between answers: is anything listening, and how long may one
be gone.

A stage that opens the teacher first checks that something listens at ``teacher.base_urls`` (one TCP
connect each, a few seconds at most), so a run against a server that is not up stops at once with one
line instead of recording every text as failed. Servers that compeff runs itself (``teacher.serve``)
are registered here while they run: their watchdog restarts a dead one, which can take minutes (a vLLM
server loads its weights again), so the client keeps retrying requests to them for that long instead of
its usual few seconds.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from urllib.parse import urlsplit

from compeff.teachers.base import TeacherUnavailable

REACH_TIMEOUT_S = 5.0

#: urllib's opener without proxies, for compeff's own HTTP calls to teacher servers (readiness probes,
#: tokenize endpoints): urllib's default opener sends even 127.0.0.1 to ``$HTTP_PROXY``
#: (``proxy_bypass('127.0.0.1')`` is False), and the chat client (aiohttp) never uses a proxy either.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_MANAGED: dict[str, float] = {}  # base URL of a server compeff runs -> seconds a restart may take


def _key(url: object) -> str:
    return str(url).rstrip("/")


@contextlib.contextmanager
def managed_endpoints(urls: Iterable[object], restart_s: float) -> Iterator[None]:
    """Mark these base URLs as servers compeff runs and restarts, within ``restart_s`` seconds, for the
    block."""
    keys = [_key(u) for u in urls]
    for key in keys:
        _MANAGED[key] = float(restart_s)
    try:
        yield
    finally:
        for key in keys:
            _MANAGED.pop(key, None)


def restart_window_s(urls: Iterable[object]) -> float:
    """How long a request keeps retrying while nothing answers at these URLs: the restart time of a
    server compeff runs there, 0 (only ``teacher.max_retries``) for servers it does not run."""
    return max((_MANAGED.get(_key(u), 0.0) for u in urls), default=0.0)


def _connect_error(url: str, timeout_s: float) -> str | None:
    """None when a TCP connection to the URL's host and port opens, else why not."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        return str(exc)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def check_reachable(urls: Iterable[object], timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Raise :class:`TeacherUnavailable` (one line) when nothing listens at any of ``urls``; servers
    compeff runs are not probed (their watchdog does that). Takes at most about ``timeout_s``."""
    urls = [str(u) for u in urls]
    if not urls or any(_key(u) in _MANAGED for u in urls):
        return
    found: dict[int, str | None] = {}

    def probe(i: int, url: str) -> None:
        found[i] = _connect_error(url, timeout_s)

    # daemon threads, all at once: a name lookup that hangs cannot hold the stage (or the exit) past this
    probes = [threading.Thread(target=probe, args=(i, u), daemon=True) for i, u in enumerate(urls)]
    for thread in probes:
        thread.start()
    deadline = time.monotonic() + timeout_s + 1.0
    for thread in probes:
        thread.join(max(0.0, deadline - time.monotonic()))
    errors = [found.get(i, f"no answer within {timeout_s:g} s") for i in range(len(urls))]
    if any(error is None for error in errors):
        return
    raise TeacherUnavailable(
        f"nothing answers at teacher.base_urls {', '.join(urls)} ({errors[0]}): start the teacher's "
        "server there (e.g. `vllm serve MODEL --port 8000`), point teacher.base_urls at a running one, "
        "or let compeff start it with --set teacher.serve.engine=vllm"
    )
