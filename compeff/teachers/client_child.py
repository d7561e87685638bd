"""The child side of the OpenAI client process: serves the parent's calls on its own event loop.

Started by :class:`compeff.teachers.client_process.ClientProcess` (see there for the protocol); it reads
requests from one pipe, runs them through :class:`~compeff.teachers.openai_api.OpenAITeacher` and writes
result rows to the other.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any

import orjson

from compeff.teachers.client_wire import BATCH, as_row
from compeff.teachers.openai_api import OpenAITeacher, run_loop


async def _serve_call(teacher: Any, inbox: Connection, outbox: Connection) -> None:
    loop = asyncio.get_running_loop()
    todo: asyncio.Queue = asyncio.Queue()
    handover: queue.Queue = queue.Queue()
    buffer: list[list] = []

    def add(items: list[tuple[str, bytes]]) -> None:
        for item in items:
            todo.put_nowait(item)

    def read() -> None:
        while True:
            try:
                message = inbox.recv()
            except (EOFError, OSError):
                os._exit(0)  # the parent is gone: nobody wants these answers
            if message[0] == "req":
                loop.call_soon_threadsafe(add, message[1])
            elif message[0] == "end":
                loop.call_soon_threadsafe(todo.put_nowait, None)
                return

    def write() -> None:
        while (batch := handover.get()) is not None:
            outbox.send_bytes(orjson.dumps(["res", batch]))

    flush_due = False

    def flush() -> None:
        nonlocal flush_due
        flush_due = False
        if buffer:
            handover.put(buffer[:])
            buffer.clear()

    async def worker(session: Any) -> None:
        nonlocal flush_due
        while (item := await todo.get()) is not None:
            result = await teacher.complete_body(session, item[0], item[1])
            buffer.append(as_row(result))
            if len(buffer) >= BATCH:
                flush()
            elif not flush_due:  # answers finished in this turn of the loop leave together, at its end
                flush_due = True
                loop.call_soon(flush)
        todo.put_nowait(None)  # the next worker stops too

    reader = threading.Thread(target=read, daemon=True)
    writer = threading.Thread(target=write, daemon=True)
    reader.start()
    writer.start()
    async with teacher._session() as session:
        await asyncio.gather(*(worker(session) for _ in range(teacher.concurrency)))
    flush()
    handover.put(None)
    writer.join()
    reader.join()
    outbox.send_bytes(b'["done"]')


def main(argv: list[str]) -> None:
    """Child entry point: serve calls until the parent says exit or goes away."""
    inbox = Connection(int(argv[0]), writable=False)
    outbox = Connection(int(argv[1]), readable=False)
    try:
        settings = inbox.recv()
    except (EOFError, OSError):
        return
    teacher = OpenAITeacher(**settings, client_process=False)
    while True:
        try:
            message = inbox.recv()
        except (EOFError, OSError):
            return
        if message[0] == "exit":
            return
        try:
            run_loop(_serve_call(teacher, inbox, outbox))
        except BaseException:
            outbox.send_bytes(orjson.dumps(["crash", traceback.format_exc()]))
            return


if __name__ == "__main__":
    main(sys.argv[1:])
