"""The fresh-process harness of the benchmarks: a clock that waits for the device, peak-memory meters (RSS
sampled from /proc, CUDA's allocator statistics), a repeated timing, and a child interpreter whose last stdout
line is its JSON answer (so no engine inherits another's heap, allocator settings or warm caches).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import torch


def clock(device: str) -> float:
    """A wall-clock reading after the device's queued work is done."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def time_it(fn, reps: int, device: str) -> float:
    fn()  # warm-up
    start = clock(device)
    for _ in range(reps):
        fn()
    return (clock(device) - start) / reps


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms from /proc (Linux)."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


class PeakCUDA:
    """Peak GPU memory allocated above the level at entry."""

    def __enter__(self) -> PeakCUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def child(script: str, flag: str, value: str, options: list[str]) -> dict:
    """Run ``script flag value options`` in a fresh interpreter; its last stdout line, parsed as JSON."""
    cmd = [sys.executable, script, flag, value, *options]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])
