"""The compile report's roofline: the module on its first target's roofs, with what the compile measured."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctc.analysis.peaks import fpga_peaks, target_peaks
from ctc.analysis.roofline import analyze_module, measured_points

__all__ = ["report_roofline"]

MAX_GROUPS = 40  # op groups kept per phase in report.json (slowest first)


def report_roofline(module: Any, target: Any, target_dir: Path, batch: Mapping[str, Any], measured: Mapping[str, Any],
                    *, profile: bool = True) -> dict[str, Any]:
    """report.json's ``roofline``: phases and op groups on the target's roofs, the measured whole-model latency and
    (``profile``, where the library runs here and can time its kernels) measured kernel-group points.  Never
    raises: a failure is recorded as ``error`` (the report is still written)."""
    try:
        return _roofline(module, target, target_dir, batch, measured, profile)
    except Exception as e:  # noqa: BLE001 - the roofline is a view of the report, not a reason to fail a compile
        return {"error": f"{type(e).__name__}: {e}"}


def _roofline(module: Any, target: Any, target_dir: Path, batch: Mapping[str, Any], measured: Mapping[str, Any],
              profile: bool) -> dict[str, Any]:
    if target.kind == "fpga":
        from ctc.backends.hls.boards import board_from_options

        peaks = fpga_peaks(board_from_options(target.options))
    else:
        peaks = target_peaks(target.kind)
    ids = batch.get("input_ids")
    shape = tuple(ids.shape) if ids is not None and getattr(ids, "dim", lambda: 0)() == 2 else (1, 128)
    a = analyze_module(module, peaks, seq_len=int(shape[1]), batch=int(shape[0]))
    phase = a.phases[0]
    kernels: list[dict[str, Any]] = []
    how = []
    latency = measured.get("latency_ms")
    if latency:
        how.append(f"whole model: the compile's latency measurement ({measured.get('protocol', '')})")
    elif measured.get("estimated_latency_ms"):
        latency = measured["estimated_latency_ms"]
        how.append("whole model: the fpga target's modelled latency (not a measurement)")
    if profile and target.kind != "fpga":
        from ctc.targets import TARGETS

        runner = importlib.import_module(TARGETS[target.kind].backend).load(target_dir, module)
        if hasattr(runner, "profile"):
            rows = runner.profile(dict(batch), runs=2)
            kernels = [{"kernel": r.name, "ms_per_run": r.ms_per_run} for r in rows]
            how.append("kernel groups: the library's profiler (2 runs after a warm-up, wall time), grouped by name")
    out = a.to_json()
    for ph in out["phases"]:
        ph["groups"] = ph["groups"][:MAX_GROUPS]
    out["measured"] = measured_points(phase, kernels, latency)
    out["measured_phase"] = phase.name
    out["measured_how"] = "; ".join(how)
    return out
