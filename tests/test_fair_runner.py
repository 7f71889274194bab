"""benchmarks/fair_runner.py: the load checks printed with every fair benchmark (other users, hypervisor steal)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fair_runner as fair  # noqa: E402


def test_steal_is_read_and_reported_as_cores() -> None:
    assert fair.steal_ns() >= 0 and fair.machine_busy_ns() >= fair.steal_ns()
    t = fair.Timings(times={}, cpu_ns={}, calls={}, idle_ns=0, timed_ns=2_000_000_000, foreign_ns=200_000_000,
                     steal_ns=500_000_000)
    check = t.check()
    assert check["steal_cores"] == 0.25 and check["foreign_cores"] == 0.1
    lines = fair.check_lines(check)
    assert any("hypervisor took 0.25 cores" in ln and "same-run ratios" in ln for ln in lines)
    quiet = fair.check_lines(fair.Timings(times={}, cpu_ns={}, calls={}, timed_ns=10**9).check())
    assert any("hypervisor took 0.00 cores (steal time) during the timed batches." in ln for ln in quiet)
