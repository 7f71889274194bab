"""Latency measurement (warm-up, then median/p90 of >= 20 timed runs at a stated thread count) and machine facts.

Every latency ctc reports comes from :func:`measure_latency`, so numbers in reports and
benchmarks share one protocol, stated next to them (runs, warm-up, threads, machine).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["BUDGET_MIN_RUNS", "MIN_RUNS", "LatencyResult", "measure_latency", "percentile", "machine_info"]

MIN_RUNS = 20
BUDGET_MIN_RUNS = 3  # timed runs a time budget may stop at (a median of 3 calls of a slow reference)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile: q must be in [0, 100], got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class LatencyResult:
    """Timing of repeated calls, in milliseconds, with the protocol that produced it."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    runs: int
    warmup: int
    threads: int
    times_ms: list[float] = field(repr=False)
    label: str = ""
    budget_s: float | None = None  # set when a time budget cut the runs short of the requested count

    @property
    def protocol(self) -> str:
        cut = "" if self.budget_s is None else f" (stopped by the {self.budget_s:g} s time budget)"
        return f"median/p90 of {self.runs} runs after {self.warmup} warm-up{cut}, {self.threads} thread(s)"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["protocol"] = self.protocol
        return d


def measure_latency(fn: Callable[[], Any], *, runs: int = MIN_RUNS, warmup: int = 3, threads: int | None = None,
                    min_seconds: float = 0.0, max_seconds: float | None = None, label: str = "",
                    clock: Callable[[], float] = time.perf_counter) -> LatencyResult:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``runs`` (>= 20) timed calls.

    More runs are taken until ``min_seconds`` of timed work has accumulated.  ``max_seconds`` is a
    time budget for a slow callee (a reference implementation timed only for comparison): warm-up
    stops once it has used a quarter of the budget, and timing stops once the budget is spent and
    at least ``BUDGET_MIN_RUNS`` runs are in; the result's protocol says so.  ``threads`` sets
    torch's intra-op thread count for the measurement (restored afterwards); None keeps the
    current count, which is reported either way.  ``clock`` is injectable for tests.
    """
    if runs < MIN_RUNS:
        raise ValueError(f"measure_latency: runs must be >= {MIN_RUNS} for a meaningful median/p90, got {runs}")
    if warmup < 0:
        raise ValueError(f"measure_latency: warmup must be >= 0, got {warmup}")
    if threads is not None and threads < 1:
        raise ValueError(f"measure_latency: threads must be >= 1, got {threads}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"measure_latency: max_seconds must be > 0, got {max_seconds}")
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        used = torch.get_num_threads()
        warmed, t_start = 0, clock()
        while warmed < warmup and (max_seconds is None or warmed == 0 or clock() - t_start < max_seconds / 4):
            fn()
            warmed += 1
        times: list[float] = []
        total = 0.0
        cut = False
        while len(times) < runs or total < min_seconds:
            if max_seconds is not None and total >= max_seconds and len(times) >= BUDGET_MIN_RUNS:
                cut = True
                break
            t0 = clock()
            fn()
            dt = clock() - t0
            times.append(dt * 1e3)
            total += dt
    finally:
        if threads is not None:
            torch.set_num_threads(old)
    return LatencyResult(median_ms=statistics.median(times), p90_ms=percentile(times, 90),
                         mean_ms=statistics.fmean(times), min_ms=min(times), max_ms=max(times), runs=len(times),
                         warmup=warmed, threads=used, times_ms=times, label=label,
                         budget_s=max_seconds if cut else None)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return sorted(have & {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "fma",
                                          "amx_int8", "amx_bf16"})
    except OSError:
        pass
    return []


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Facts a latency number depends on: CPU model and features, cores, threads, library versions."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tvm": _version("apache-tvm"),
        "transformers": _version("transformers"),
        "onnxruntime": _version("onnxruntime"),
        "numpy": _version("numpy"),
    }
