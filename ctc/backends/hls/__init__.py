"""HLS backend of ctc: the ``fpga`` target (HLS C from TVM, a resource/latency model, C simulation).

Thin on purpose: ``ctc.targets`` imports it to find the hooks; TVM, gcc and matplotlib are used
only when a build or a simulation runs.

* :mod:`.boards`  -- board presets (DSPs, on-chip memory, clock, off-chip bandwidth, widths).
* :mod:`.exact`   -- the integer model: the exact semantics the emitted C computes.
* :mod:`.kernels` -- HLS kernels for the shared Relax lowering (:mod:`ctc.backends.tvm.lower`).
* :mod:`.cgen`    -- lowered TIR and the Relax call sequence printed as HLS C, test bench, data.
* :mod:`.perf`    -- resource and latency model per kernel and tiling.
* :mod:`.tune`    -- tiling search against the model, kept in the tuning database.
* :mod:`.csim`    -- gcc C simulation, bit-exact check against the integer model.
* :mod:`.build`   -- the target hooks: build, load, report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["build_target", "load", "supports"]


def supports(kind: str) -> str | None:
    """None when this backend builds ``kind`` (shown at recipe check, before any work)."""
    return None if kind == "fpga" else f"the HLS backend builds only `target fpga`, not {kind}"


def build_target(module: Any, target: Any, out_dir: Path, example_inputs: Any = None) -> dict[str, Any]:
    """Emit, model, tune and C-simulate ``module`` for ``target`` into ``out_dir`` (see :mod:`.build`)."""
    from ctc.backends.hls.build import build

    return build(module, target, out_dir, example_inputs=example_inputs)


def load(target_dir: str | Path, module: Any = None) -> Any:
    """A runner that C-simulates the emitted design on given inputs (bit-exact against the integer model)."""
    from ctc.backends.hls.build import load as _load

    return _load(target_dir, module)
