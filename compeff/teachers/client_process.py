"""The OpenAI client's event loop in a process of its own.

A stage does real work per answer (quality checks, records, fsync'd appends, reports) and builds the
next requests while earlier ones are in flight. In one Python process that work and the event loop
that keeps hundreds of connections moving share one GIL, and each slows the other. Here the loop
runs in a child process (``compeff.teachers.client_child``): the parent sends request
bodies, already serialised, in small batches and gets parsed answers back, so the two sides run on
two cores.

Wire protocol (two pipes): parent -> child, pickled: the client settings once, then per call
``("begin",)``, ``("req", [(id, body), ...])``..., ``("end",)``; ``("exit",)`` to stop. Child -> parent,
JSON (orjson reads it several times faster than pickle): ``["res", [result row, ...]]``... and
``["done"]`` when every request of the call is answered, or ``["crash", traceback]``. The parent keeps
at most ``window`` requests outstanding, so a lazy request source is read only as fast as the server
answers. POSIX only (inherited pipe descriptors); elsewhere the client stays in a thread.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import orjson

from compeff.teachers.base import ChatRequest, TeacherError, TeacherResult
from compeff.teachers.client_wire import BATCH, from_row

# The child's entry point. ``python -m`` (and ``-c``) put the working directory first on sys.path, so an
# ``orjson.py`` or ``aiohttp.py`` lying where compeff runs would be imported inside the child; the entry
# drops that entry before importing anything that is not built in.
_CHILD_MAIN = (
    "import sys; del sys.path[0]; import runpy; "
    "runpy.run_module('compeff.teachers.client_child', run_name='__main__', alter_sys=True)"
)


class ClientProcessError(TeacherError):
    """The client process died or crashed; the requests of the call in progress are lost to it."""

    kind = "client_process"


class ClientProcess:
    """Parent side: starts the child, streams one call's requests to it and yields the results."""

    def __init__(self, settings: dict[str, Any], window: int):
        self.settings = settings
        self.window = window
        self._proc: subprocess.Popen | None = None
        self._to_child: Connection | None = None
        self._from_child: Connection | None = None

    def start(self) -> None:
        """Launch the child (isolated from the working directory: see ``_CHILD_MAIN``); it imports its libraries while the caller prepares the first requests."""
        down_r, down_w = os.pipe()  # parent -> child
        up_r, up_w = os.pipe()  # child -> parent
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD_MAIN, str(down_r), str(up_w)],
            pass_fds=(down_r, up_w),
            stdin=subprocess.DEVNULL,
        )
        os.close(down_r)
        os.close(up_w)
        self._to_child = Connection(down_w, readable=False)
        self._from_child = Connection(up_r, writable=False)
        self._to_child.send(self.settings)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def generate(
        self, requests: Iterable[ChatRequest], encode: Callable[[ChatRequest], bytes]
    ) -> Iterator[TeacherResult]:
        """Answer every request (completion order); ``encode`` turns one into its HTTP body."""
        if not self.alive:
            self.close()
            self.start()
        assert self._to_child is not None and self._from_child is not None
        to_child, from_child = self._to_child, self._from_child
        metas: dict[str, dict[str, Any]] = {}
        # the look-ahead window: plain counters (one writer each) and an event for the rare wait; a
        # threading.Semaphore costs a Python-level lock round per request
        answered = [0]
        room = threading.Event()
        stopped = False  # the caller left mid-call: stop reading the source
        problems: list[BaseException] = []

        def send() -> None:
            chunk: list[tuple[str, bytes]] = []
            sent = 0
            try:
                to_child.send(("begin",))
                for request in requests:
                    if sent - answered[0] >= self.window:
                        if chunk:  # what is waiting goes out before we wait for answers
                            to_child.send(("req", chunk))
                            chunk = []
                        while sent - answered[0] >= self.window and not stopped:
                            room.clear()
                            if sent - answered[0] < self.window or stopped:
                                break
                            room.wait()
                    if stopped:
                        chunk = []
                        return
                    sent += 1
                    metas[request.id] = request.meta
                    chunk.append((request.id, encode(request)))
                    if len(chunk) >= BATCH:
                        to_child.send(("req", chunk))
                        chunk = []
            except BaseException as exc:  # the source raised (bad input) or the pipe broke
                problems.append(exc)
            finally:
                with contextlib.suppress(OSError):
                    if chunk:  # what was taken from the source is answered, even after an error
                        to_child.send(("req", chunk))
                    to_child.send(("end",))

        sender = threading.Thread(target=send, name="teacher-requests", daemon=True)
        sender.start()
        finished = False
        try:
            while True:
                try:
                    message = orjson.loads(from_child.recv_bytes())
                except (EOFError, OSError):
                    code = self._proc.poll() if self._proc else None
                    raise ClientProcessError(f"the teacher client process died (exit code {code})") from None
                if message[0] == "done":
                    finished = True
                    break
                if message[0] == "crash":
                    raise ClientProcessError(f"the teacher client process crashed:\n{message[1]}")
                answered[0] += len(message[1])
                room.set()
                for row in message[1]:
                    yield from_row(row, metas.pop(row[0], {}))
        finally:
            if not finished:  # abandoned or broken mid-call: requests are still in flight there
                stopped = True
                room.set()
                self.close(kill=True)
            sender.join(timeout=5)
        if problems and not isinstance(problems[0], OSError):
            raise problems[0]

    def close(self, kill: bool = False) -> None:
        """Stop the child (politely unless ``kill``) and release the pipes."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                if kill or self._to_child is None:
                    proc.kill()
                else:
                    self._to_child.send(("exit",))
            except OSError:
                proc.kill()
            # the child winds down on its own; reaping it need not hold the caller up
            threading.Thread(target=_reap, args=(proc,), daemon=True).start()
        for conn in (self._to_child, self._from_child):
            if conn is not None:
                conn.close()
        self._to_child = self._from_child = None


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
