"""ctc.eval.latency: the timing protocol (warm-up, >= 20 runs, median/p90, threads) and machine facts."""

from __future__ import annotations

import pytest
import torch

from ctc.eval import latency as L


def test_percentile_interpolates_like_numpy():
    vals = [float(v) for v in range(1, 21)]  # 1..20
    assert L.percentile(vals, 50) == 10.5
    assert L.percentile(vals, 90) == pytest.approx(18.1)
    assert L.percentile([5.0], 90) == 5.0
    with pytest.raises(ValueError):
        L.percentile([], 50)


def test_measure_latency_with_a_fake_clock():
    """Call k takes k ms; warm-up calls are not timed."""
    calls = []
    now = [0.0]

    def fn():
        calls.append(1)
        now[0] += len(calls) / 1000.0

    r = L.measure_latency(fn, runs=20, warmup=3, clock=lambda: now[0], label="fake")
    assert len(calls) == 23 and r.runs == 20 and r.warmup == 3
    assert r.times_ms == pytest.approx([float(k) for k in range(4, 24)])
    assert r.median_ms == pytest.approx(13.5) and r.p90_ms == pytest.approx(21.1)
    assert r.min_ms == pytest.approx(4.0) and r.max_ms == pytest.approx(23.0)
    assert "median/p90 of 20 runs after 3 warm-up" in r.to_dict()["protocol"]


def test_measure_latency_min_seconds_adds_runs_and_threads_restored():
    before = torch.get_num_threads()
    now = [0.0]

    def fn():
        now[0] += 0.01

    r = L.measure_latency(fn, runs=20, warmup=0, min_seconds=0.3, threads=1, clock=lambda: now[0])
    assert r.runs == 30 and r.threads == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="runs must be >= 20"):
        L.measure_latency(fn, runs=5)
    with pytest.raises(ValueError, match="threads"):
        L.measure_latency(fn, threads=0)


def test_machine_info_fields():
    info = L.machine_info()
    assert info["cpu"] and info["logical_cores"] >= 1 and 1 <= info["usable_cores"] <= info["logical_cores"]
    assert info["torch"] == torch.__version__
    assert info["tvm"] is not None and info["tvm"].startswith("0.")


def test_a_time_budget_stops_a_slow_callee_after_three_runs_and_says_so():
    """A 10 s callee under a 20 s budget: one warm-up (it used over a quarter of the budget), then timed
    runs until the budget is spent with at least three in; a fast callee is not cut (20 runs)."""
    now = [0.0]

    def slow():
        now[0] += 10.0

    r = L.measure_latency(slow, runs=20, warmup=3, max_seconds=20.0, clock=lambda: now[0])
    assert (r.warmup, r.runs, r.budget_s) == (1, 3, 20.0)
    assert "stopped by the 20 s time budget" in r.protocol and "3 runs after 1 warm-up" in r.protocol

    def fast():
        now[0] += 0.01

    f = L.measure_latency(fast, runs=20, warmup=3, max_seconds=20.0, clock=lambda: now[0])
    assert (f.warmup, f.runs, f.budget_s) == (3, 20, None) and "budget" not in f.protocol
    with pytest.raises(ValueError, match="max_seconds"):
        L.measure_latency(fast, max_seconds=0)
