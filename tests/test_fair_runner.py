"""benchmarks/fair_runner.py: the load checks printed with every fair benchmark (other users, hypervisor steal)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fair_runner as fair  # noqa: E402


def test_steal_is_read_and_reported_as_cores() -> None:
    assert fair.steal_ns() >= 0 and fair.machine_busy_ns() >= fair.steal_ns()
    # the machine's busy time counts steal too: 0.7 s busy beyond ours, 0.5 s of it stolen -> 0.1 cores of users
    t = fair.Timings(times={}, cpu_ns={}, calls={}, idle_ns=0, timed_ns=2_000_000_000, foreign_ns=700_000_000,
                     steal_ns=500_000_000)
    check = t.check()
    assert check["steal_cores"] == 0.25 and check["foreign_cores"] == 0.1
    lines = fair.check_lines(check)
    assert any("hypervisor took 0.25 cores" in ln and "same-run ratios" in ln for ln in lines)
    quiet = fair.check_lines(fair.Timings(times={}, cpu_ns={}, calls={}, timed_ns=10**9).check())
    assert any("hypervisor took 0.00 cores (steal time) during the timed batches." in ln for ln in quiet)


def test_the_runner_own_cpu_is_reported_apart_from_the_idle_pool_check() -> None:
    t = fair.Timings(times={}, cpu_ns={}, calls={}, idle_ns=5_000_000, timed_ns=1_000_000_000, runner_ns=12_000_000)
    line = fair.check_lines(t.check())[0]
    assert "(0.50%): passed." in line and "runner itself used 12.0 ms (1.20%)" in line


def test_a_noisy_part_is_said_to_be_one() -> None:
    steady = [1.0 + 0.01 * (i % 5) for i in range(40)]
    jumpy = [1.0 + 0.5 * (i % 3) for i in range(40)]
    quiet = fair.Timings(times={"a": steady, "b": steady}, cpu_ns={}, calls={}, timed_ns=10**9).check()
    assert quiet["spread_median"] == fair._spread(steady) < fair.NOISY_SPREAD
    line = fair.check_lines(quiet)[-1]
    assert line.startswith("Spread of the timed calls") and "NOISY" not in line
    noisy = fair.check_lines(fair.Timings(times={"a": jumpy, "b": jumpy, "c": steady}, cpu_ns={}, calls={},
                                          timed_ns=10**9).check())[-1]
    assert "median 67%, 4% to 67%: NOISY" in noisy and "machine's own timing" in noisy
    assert not any(ln.startswith("Spread") for ln in fair.check_lines(
        fair.Timings(times={}, cpu_ns={}, calls={}, timed_ns=10**9).check()))
