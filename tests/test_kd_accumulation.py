"""KD's loss weighs the same under gradient accumulation and DDP: the gradient of one step with
accumulation 2 equals that of one batch of twice the size, and 2 torchrun ranks (gloo, CPU) equal one
rank with the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("kd_step.py")


def run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_kd_gradient_is_the_same_under_accumulation_and_two_ranks(tmp_path, tiny_lm):
    run([sys.executable, str(SCRIPT), str(tiny_lm), str(tmp_path), "4x1", "2x2"], tmp_path)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(SCRIPT), str(tiny_lm), str(tmp_path), "2x1"], tmp_path)  # fmt: skip
    whole = torch.load(tmp_path / "4x1-1.pt")
    scale = max(float(g.abs().max()) for g in whole.values())
    assert scale > 1e-3  # a real gradient, not zeros
    assert largest_difference(whole, torch.load(tmp_path / "2x2-1.pt")) < 1e-5
    assert largest_difference(whole, torch.load(tmp_path / "2x1-2.pt")) < 1e-5
