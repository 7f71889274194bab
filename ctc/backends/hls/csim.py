"""C simulation: compile the emitted C with gcc, run its test bench, check bit-exact agreement.

Why: no FPGA is here, so the design is proven the way HLS flows prove it before synthesis: the C
runs on the host.  The expected outputs come from the integer model (:mod:`.exact`) run by ctc's
reference interpreter; the test bench compares the raw bits of every output value.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CSimError", "CSimResult", "compile_csim", "run_csim", "write_inputs"]

NP_DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32, "int8": np.int8, "uint8": np.uint8,
             "bool": np.bool_, "float64": np.float64}


class CSimError(RuntimeError):
    """gcc is missing, the C does not compile, or the test bench did not run."""


@dataclass
class CSimResult:
    """What one C-simulation run produced."""

    passed: bool
    outputs: list[np.ndarray]
    mismatches: list[int]
    stdout: str
    compile_s: float
    run_s: float

    def to_json(self) -> dict[str, Any]:
        return {"bit_exact": self.passed, "mismatches": self.mismatches, "compile_s": round(self.compile_s, 2),
                "run_s": round(self.run_s, 3), "testbench": self.stdout.strip().splitlines()}


def compile_csim(design_dir: Path, *, cc: str = "gcc", timeout: float = 1800.0) -> float:
    """Build ``design_dir/csim`` with the design's Makefile flags (gcc only, no vendor tool); seconds taken."""
    if shutil.which(cc) is None:
        raise CSimError(f"C simulation needs a C compiler ({cc}) on PATH; install gcc or build with csim=false")
    srcs = ["ctc_top.c", "tb.c", *sorted(str(p.relative_to(design_dir)) for p in (design_dir / "kernels").glob("*.c"))]
    cmd = [cc, "-O2", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-Wno-unknown-pragmas", "-o", "csim",
           *srcs, "-lm"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=design_dir, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise CSimError(f"gcc failed on the emitted C in {design_dir}:\n{p.stderr[-4000:]}")
    return time.perf_counter() - t0


def write_inputs(design_dir: Path, inputs: list[np.ndarray], expected: list[np.ndarray] | None, tag: str = "") -> Path:
    """Input (and expected output) files for the test bench in ``design_dir/data{tag}``."""
    d = design_dir / f"data{tag}"
    d.mkdir(exist_ok=True)
    for i, a in enumerate(inputs):
        np.ascontiguousarray(a).tofile(d / f"input_{i}.bin")
    for i, a in enumerate(expected or []):
        np.ascontiguousarray(a).tofile(d / f"expected_{i}.bin")
    return d


def run_csim(design_dir: Path, data_dir: Path, outputs: list[tuple[str, str, int]], *,
             compile_s: float = 0.0, timeout: float = 3600.0) -> CSimResult:
    """Run the built test bench on ``data_dir``; outputs read back, mismatch counts from the raw bits."""
    exe = design_dir / "csim"
    if not exe.exists():
        raise CSimError(f"no C simulation binary in {design_dir} (compile_csim first)")
    t0 = time.perf_counter()
    p = subprocess.run([str(exe.resolve()), str(data_dir.resolve()), str((design_dir / "weights.bin").resolve())],
                       capture_output=True, text=True, timeout=timeout)
    run_s = time.perf_counter() - t0
    if p.returncode not in (0, 1):
        raise CSimError(f"the C simulation crashed (exit {p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    outs, bad = [], []
    for i, (_, dt, n) in enumerate(outputs):
        a = np.fromfile(data_dir / f"output_{i}.bin", dtype=NP_DTYPES[dt], count=n)
        outs.append(a)
        e = data_dir / f"expected_{i}.bin"
        if e.exists():
            ref = np.fromfile(e, dtype=NP_DTYPES[dt], count=n)
            differ = a.view(np.uint8).reshape(n, -1) != ref.view(np.uint8).reshape(n, -1)
            bad.append(int(np.count_nonzero(differ.any(axis=1))))
    return CSimResult(p.returncode == 0 and not any(bad), outs, bad, p.stdout, compile_s, run_s)
