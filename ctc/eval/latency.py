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

__all__ = ["MIN_RUNS", "LatencyResult", "measure_latency", "percentile", "machine_info"]

MIN_RUNS = 20


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

    @property
    def protocol(self) -> str:
        return f"median/p90 of {self.runs} runs after {self.warmup} warm-up, {self.threads} thread(s)"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["protocol"] = self.protocol
        return d


def measure_latency(fn: Callable[[], Any], *, runs: int = MIN_RUNS, warmup: int = 3, threads: int | None = None,
                    min_seconds: float = 0.0, label: str = "",
                    clock: Callable[[], float] = time.perf_counter) -> LatencyResult:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``runs`` (>= 20) timed calls.

    More runs are taken until ``min_seconds`` of timed work has accumulated.  ``threads`` sets
    torch's intra-op thread count for the measurement (restored afterwards); None keeps the
    current count, which is reported either way.  ``clock`` is injectable for tests.
    """
    if runs < MIN_RUNS:
        raise ValueError(f"measure_latency: runs must be >= {MIN_RUNS} for a meaningful median/p90, got {runs}")
    if warmup < 0:
        raise ValueError(f"measure_latency: warmup must be >= 0, got {warmup}")
    if threads is not None and threads < 1:
        raise ValueError(f"measure_latency: threads must be >= 1, got {threads}")
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        used = torch.get_num_threads()
        for _ in range(warmup):
            fn()
        times: list[float] = []
        total = 0.0
        while len(times) < runs or total < min_seconds:
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
                         warmup=warmup, threads=used, times_ms=times, label=label)


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
