"""``compeff bench teacher``: how many requests/s the openai backend sustains against a loopback server.

The server runs in its own process (so client and server do not share one interpreter lock) and
answers at once or after a fixed latency. The figure of merit at latency L and concurrency c is the
ratio of the measured rate to the ideal c / L: the client should never be what limits a vLLM server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from compeff.teachers.base import ChatRequest, SamplingParams
from compeff.teachers.openai_api import OpenAITeacher


@dataclass
class TeacherBenchRow:
    latency_ms: float
    concurrency: int
    requests: int
    failed: int
    seconds: float
    requests_per_s: float
    ideal_per_s: float | None
    efficiency: float | None
    bare_per_s: float | None = None


def start_server(
    latency_ms: float, max_seconds: float = 900.0, script: str = "echo"
) -> tuple[subprocess.Popen, str]:
    """Start the fake server in a child process on a free loopback port; returns (process, base URL)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "compeff.teachers.fake_server",
            "--latency-ms",
            str(latency_ms),
            "--max-seconds",
            str(max_seconds),
            "--script",
            script,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("READY"):
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}/v1"


def _requests(n: int, tag: str) -> list[ChatRequest]:
    params = SamplingParams(temperature=0.0, max_tokens=16)
    return [
        ChatRequest(
            id=f"{tag}-{i}",
            messages=[{"role": "user", "content": f"Which attributes does text {i} show?"}],
            params=params,
        )
        for i in range(n)
    ]


def measure(base_url: str, concurrency: int, n_requests: int, latency_ms: float) -> TeacherBenchRow:
    """Time ``n_requests`` through OpenAITeacher.generate at the given concurrency (after a warm-up)."""
    teacher = OpenAITeacher(
        "bench", base_urls=[base_url], concurrency=concurrency, timeout_s=30, max_retries=2
    )
    list(teacher.generate(_requests(min(concurrency, n_requests), "warm")))
    start = time.perf_counter()
    results = list(teacher.generate(_requests(n_requests, "timed")))
    seconds = time.perf_counter() - start
    failed = sum(not r.ok for r in results)
    rate = (len(results) - failed) / seconds
    ideal = concurrency / (latency_ms / 1000.0) if latency_ms > 0 else None
    return TeacherBenchRow(
        latency_ms=latency_ms,
        concurrency=concurrency,
        requests=len(results),
        failed=failed,
        seconds=round(seconds, 3),
        requests_per_s=round(rate, 1),
        ideal_per_s=round(ideal, 1) if ideal else None,
        efficiency=round(rate / ideal, 3) if ideal else None,
    )


def measure_bare(base_url: str, concurrency: int, n_requests: int) -> float:
    """Requests/s of a bare aiohttp loop (no retries, no bookkeeping): the transport's own ceiling here."""
    import asyncio

    import aiohttp

    from compeff.teachers.openai_api import run_loop

    url = base_url + "/chat/completions"
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": "Which attributes?"}],
        "max_tokens": 16,
    }

    async def main() -> float:
        todo = iter(range(n_requests))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

            async def worker() -> None:
                for _ in todo:
                    async with session.post(url, json=body) as resp:
                        json.loads(await resp.read())

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return n_requests / (time.perf_counter() - start)

    return run_loop(main())


def cell_size(n_requests: int, concurrency: int, latency_ms: float, seconds: float = 4.0) -> int:
    """Requests for one cell: n_requests, shortened where latency makes them slow, never < 10 rounds."""
    if latency_ms <= 0:
        return n_requests
    expected = concurrency / (latency_ms / 1000.0)
    return max(10 * concurrency, min(n_requests, int(expected * seconds)))


def to_markdown(rows: list[TeacherBenchRow]) -> str:
    """Markdown table of the results."""
    lines = [
        "| server latency | concurrency | requests | failed | requests/s | ideal c/L | measured / ideal "
        "| bare aiohttp req/s | compeff / bare |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ideal = f"{r.ideal_per_s:,.0f}" if r.ideal_per_s else "-"
        eff = f"{r.efficiency:.2f}" if r.efficiency is not None else "-"
        bare = f"{r.bare_per_s:,.0f}" if r.bare_per_s else "-"
        share = f"{r.requests_per_s / r.bare_per_s:.2f}" if r.bare_per_s else "-"
        lines.append(
            f"| {r.latency_ms:g} ms | {r.concurrency} | {r.requests} | {r.failed} | {r.requests_per_s:,.0f} "
            f"| {ideal} | {eff} | {bare} | {share} |"
        )
    return "\n".join(lines) + "\n"


def run_teacher_bench(
    concurrency: list[int],
    latency_ms: list[float],
    n_requests: int = 3000,
    out_dir: Path | None = None,
    bare: bool = True,
) -> list[TeacherBenchRow]:
    """Measure every (latency, concurrency) cell, print a table, optionally write JSON + markdown."""
    console = Console()
    rows: list[TeacherBenchRow] = []
    for latency in latency_ms:
        proc, url = start_server(latency)
        try:
            for c in concurrency:
                n = cell_size(n_requests, c, latency)
                row = measure(url, c, n, latency)
                if bare:
                    row.bare_per_s = round(measure_bare(url, c, n), 1)
                rows.append(row)
                console.print(f"latency {latency:g} ms, concurrency {c}: {row.requests_per_s:,.0f} req/s")
        finally:
            proc.kill()
            proc.wait()
    table = Table(title="openai backend vs loopback server")
    for col in (
        "latency ms",
        "concurrency",
        "requests",
        "failed",
        "req/s",
        "ideal c/L",
        "measured/ideal",
        "bare req/s",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r.latency_ms:g}",
            str(r.concurrency),
            str(r.requests),
            str(r.failed),
            f"{r.requests_per_s:,.0f}",
            f"{r.ideal_per_s:,.0f}" if r.ideal_per_s else "-",
            f"{r.efficiency:.2f}" if r.efficiency is not None else "-",
            f"{r.bare_per_s:,.0f}" if r.bare_per_s else "-",
        )
    console.print(table)
    if out_dir:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "teacher_bench.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        (out_dir / "teacher_bench.md").write_text(to_markdown(rows))
    return rows
