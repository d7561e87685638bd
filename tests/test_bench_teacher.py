"""`compeff bench teacher` runs end to end and writes its tables (figures go to the README, not here)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from compeff.bench.teacher import cell_size
from compeff.cli import app


def test_bench_teacher_writes_tables(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "teacher",
            "--concurrency",
            "1",
            "--concurrency",
            "8",
            "--latency-ms",
            "0",
            "--latency-ms",
            "20",
            "--requests",
            "80",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "teacher_bench.json").read_text())
    assert [(r["latency_ms"], r["concurrency"]) for r in rows] == [(0, 1), (0, 8), (20, 1), (20, 8)]
    assert all(r["failed"] == 0 and r["requests_per_s"] > 0 for r in rows)
    assert rows[2]["ideal_per_s"] == 50.0 and rows[0]["ideal_per_s"] is None
    md = (tmp_path / "teacher_bench.md").read_text()
    assert md.count("\n") == 6 and "| 20 ms | 8 |" in md
    assert all(r["bare_per_s"] > 0 for r in rows)


def test_cell_size_bounds():
    assert cell_size(3000, 256, 0) == 3000
    assert cell_size(3000, 1, 50) == 80
    assert cell_size(100, 32, 50) == 320  # never fewer than ten rounds of the concurrency
