"""Sampling threads: resident memory of this process, and a GPU's power through NVML.

NVML is optional (``nvidia-ml-py``): without it, or without an NVIDIA GPU, :func:`nvml_sampler` returns
None and the benchmark says so in its table.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Sampler:
    """Calls ``read()`` every ``interval_s`` in a thread between ``start()`` and ``stop()``."""

    def __init__(self, read: Any, interval_s: float = 0.005):
        self.read = read
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._stop.clear()
        self.samples = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), float(self.read())))
            self._stop.wait(self.interval_s)

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.samples.append((time.perf_counter(), float(self.read())))
        return self.samples

    @property
    def peak(self) -> float:
        return max((v for _, v in self.samples), default=0.0)


class NvmlPower:
    """A GPU's power (W) and, where the GPU has one, its total-energy counter (mJ)."""

    def __init__(self, index: int = 0):
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.has_energy_counter = True
        except pynvml.NVMLError:
            self.has_energy_counter = False

    def watts(self) -> float:
        return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0

    def energy_j(self) -> float:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0


def nvml_sampler(index: int = 0) -> NvmlPower | None:
    """NVML power reading for GPU ``index``, or None (no nvidia-ml-py, no driver, no GPU)."""
    try:
        return NvmlPower(index)
    except Exception:  # ImportError, NVMLError of any kind: no power figures here
        return None


def integrated_energy_j(samples: list[tuple[float, float]]) -> float:
    """Energy (J) from (time, watts) samples by the trapezoidal rule."""
    total = 0.0
    for (t0, w0), (t1, w1) in zip(samples, samples[1:], strict=False):
        total += (t1 - t0) * (w0 + w1) / 2
    return total
