"""Peak arithmetic and memory bandwidth of a target: the roofs of the roofline, and where each number comes from.

* ``cpu``: **measured** on this machine, once, then cached (``~/.cache/ctc/peaks.json``, keyed by CPU model,
  cores, threads and torch version): the best of several fp32 GEMMs (``torch.mm``, 1024³) -- what a tuned
  library attains, not the data sheet's figure -- and a STREAM-style triad (``a = b + s·c`` over three
  64 MiB arrays, 12 bytes per element) for memory bandwidth.  int8: ``torch._int_mm`` where it is faster,
  else, on CPUs with VNNI (four int8 products per 32-bit lane where fp32 has one FMA), 4× the fp32 GEMM
  (derived, stated as such: torch's int8 GEMM does not use VNNI on every CPU).
  ``remeasure=True`` measures again (a number taken on a busy machine is low: re-run on a quiet one).
* ``cuda``: the **data sheet** of the GPU named by ``gpu=`` (default: the visible GPU, else H100 SXM): dense
  tensor-core throughput for f16/int8 and CUDA-core fp32, HBM bandwidth.  Not measured here.
* ``fpga``: the board preset of the fpga target (``ctc.backends.hls.boards``, from vendors' data sheets):
  int8 = DSPs × products per DSP × 2 × clock; fp32 = DSPs / 5 (a full-DSP fp32 multiply 3 + add 2, PG060) ×
  2 × clock; off-chip bandwidth at its peak.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ctc.errors import UsageError

__all__ = ["GPUS", "Peaks", "target_peaks"]

KINDS = ("cpu", "cuda", "fpga")
PEAKS_VERSION = 2  # of the cached cpu measurement


@dataclass(frozen=True)
class Peaks:
    """The roofs of one target: FLOP/s by compute dtype class, bytes/s, and their source."""

    target: str
    device: str
    flops: dict[str, float]  # "f32" | "f16" | "int8" -> operations per second
    bandwidth: float  # bytes per second
    source: str
    measured: bool

    def peak(self, compute: str) -> float:
        """The arithmetic roof for a dtype class (falls back to f32 where the target states no other)."""
        return self.flops.get(compute) or self.flops["f32"]

    def ridge(self, compute: str = "f32") -> float:
        """Intensity (FLOP/byte) where the memory roof meets the compute roof."""
        return self.peak(compute) / self.bandwidth

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Data-sheet numbers (dense; no sparsity): fp32 on CUDA cores, f16 and int8 on tensor cores, HBM bandwidth.
GPUS: dict[str, dict[str, Any]] = {
    "h100": {"name": "NVIDIA H100 SXM5 80GB", "f32": 67e12, "f16": 989.4e12, "int8": 1978.9e12, "bw": 3.35e12,
             "source": "NVIDIA H100 Tensor Core GPU data sheet (SXM5)"},
    "h200": {"name": "NVIDIA H200 SXM 141GB", "f32": 67e12, "f16": 989.4e12, "int8": 1978.9e12, "bw": 4.8e12,
             "source": "NVIDIA H200 Tensor Core GPU data sheet (SXM)"},
    "a100": {"name": "NVIDIA A100 SXM4 80GB", "f32": 19.5e12, "f16": 312e12, "int8": 624e12, "bw": 2.039e12,
             "source": "NVIDIA A100 Tensor Core GPU data sheet (SXM4 80GB)"},
    "l4": {"name": "NVIDIA L4", "f32": 30.3e12, "f16": 121e12, "int8": 242e12, "bw": 0.3e12,
           "source": "NVIDIA L4 Tensor Core GPU data sheet"},
}


def _cache_file() -> Path:
    from ctc.cache import default_cache_dir

    return default_cache_dir() / "peaks.json"


def _best_seconds(fn: Any, runs: int) -> float:
    fn()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cpu(runs: int = 5) -> dict[str, Any]:
    """fp32 and int8 GEMM throughput and triad bandwidth of this CPU with torch's threads."""
    import torch

    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    f32 = 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), runs)
    ai = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    bi = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    try:
        int8 = 2 * n**3 / _best_seconds(lambda: torch._int_mm(ai, bi), runs)
    except (RuntimeError, AttributeError):
        int8 = 0.0
    count = 1 << 24  # 64 MiB per array: well past the last-level cache
    x, y, z = torch.empty(count), torch.rand(count), torch.rand(count)
    bw = 3 * count * 4 / _best_seconds(lambda: torch.add(y, z, alpha=2.0, out=x), runs)
    from ctc.eval.latency import machine_info

    vnni = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(machine_info().get("cpu_flags") or []))
    derived = 4 * f32 if vnni else 0.0
    if derived > int8:
        note = (f"4x the fp32 GEMM (VNNI: four int8 products per 32-bit lane where fp32 has one FMA; torch._int_mm "
                f"reached only {int8 / 1e9:.0f} GOP/s)")
    else:
        note = "torch._int_mm" if int8 >= f32 else "no int8 speed-up found: int8 roof = fp32 roof"
    return {"f32": f32, "int8": max(int8, f32, derived), "bw": bw, "threads": torch.get_num_threads(),
            "int8_note": note, "version": PEAKS_VERSION}


def _cpu_key() -> str:
    import torch

    from ctc.eval.latency import machine_info

    m = machine_info()
    return f"{m['cpu']}|{m['usable_cores']} cores|{torch.get_num_threads()} threads|torch {torch.__version__}"


def cpu_peaks(*, remeasure: bool = False, cache: Path | None = None) -> Peaks:
    """This CPU's measured roofs (cached per machine)."""
    path = cache or _cache_file()
    key = _cpu_key()
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    entry = None if remeasure or not isinstance(stored, dict) else stored.get(key)
    if not isinstance(entry, dict) or entry.get("version") != PEAKS_VERSION:
        entry = {**measure_cpu(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        stored = stored if isinstance(stored, dict) else {}
        stored[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(stored, indent=1))
            tmp.replace(path)
        except OSError as e:  # an unwritable cache only costs a re-measurement next time: say so, go on
            warnings.warn(f"ctc analyze: could not cache the measured CPU peaks at {path} ({e}); "
                          "they are measured again next time", stacklevel=2)
    src = (f"measured on this machine {entry['when']} (fp32 GEMM torch.mm 1024³, int8 GEMM "
           f"{entry.get('int8_note', 'torch._int_mm')}, STREAM-style triad over 3×64 MiB; best of 5; "
           f"{entry.get('threads', '?')} threads); re-measure with --remeasure on a quiet machine")
    return Peaks("cpu", key.split("|")[0], {"f32": entry["f32"], "f16": entry["f32"], "int8": entry["int8"]},
                 entry["bw"], src, True)


def cuda_peaks(gpu: str | None = None) -> Peaks:
    """Data-sheet roofs of a GPU (``gpu``: h100, h200, a100, l4; default: the visible GPU, else h100)."""
    if gpu is None:
        gpu = "h100"
        try:
            import torch

            if torch.cuda.is_available():
                name = torch.cuda.get_device_name(0).lower()
                gpu = next((k for k in GPUS if k in name), "h100")
        except Exception:  # noqa: BLE001 - no usable CUDA runtime: the default stands
            pass
    if gpu not in GPUS:
        raise UsageError(f"unknown GPU {gpu!r} for the cuda roofline (known: {', '.join(GPUS)})")
    g = GPUS[gpu]
    return Peaks("cuda", g["name"], {"f32": g["f32"], "f16": g["f16"], "int8": g["int8"]}, g["bw"],
                 f"data sheet: {g['source']} (dense, no sparsity); not measured", False)


def fpga_peaks(board: Any = "zc706") -> Peaks:
    """Roofs of an fpga target board: a preset's name, or a ``Board`` (a recipe's overrides applied)."""
    from ctc.backends.hls.boards import BOARDS

    if isinstance(board, str) and board not in BOARDS:
        raise UsageError(f"unknown board {board!r} for the fpga roofline (known: {', '.join(BOARDS)})")
    b = BOARDS[board] if isinstance(board, str) else board
    clock = b.clock_mhz * 1e6
    int8 = b.dsps * b.products_per_dsp(8, 8) * 2 * clock
    f32 = b.dsps / 5 * 2 * clock
    return Peaks("fpga", f"{b.name} ({b.part})", {"f32": f32, "f16": f32, "int8": int8}, b.bandwidth_gbps * 1e9,
                 f"board preset {b.name}: {b.source}; int8 = {b.dsps} DSPs × {b.products_per_dsp(8, 8)} products × 2 "
                 f"× {b.clock_mhz:g} MHz, fp32 = DSPs/5 (PG060 full-DSP multiply 3 + add 2) × 2 × clock; "
                 f"{b.memory} at {b.bandwidth_gbps:g} GB/s", False)


def target_peaks(kind: str, *, remeasure: bool = False, gpu: str | None = None, board: str | None = None) -> Peaks:
    """The roofs of target ``kind`` (cpu | cuda | fpga)."""
    if kind == "cpu":
        return cpu_peaks(remeasure=remeasure)
    if kind == "cuda":
        return cuda_peaks(gpu)
    if kind == "fpga":
        return fpga_peaks(board or "zc706")
    from ctc.dsl.diagnostics import did_you_mean

    raise UsageError(f"unknown target {kind!r} for the roofline{did_you_mean(kind, KINDS)} (choose from "
                     f"{', '.join(KINDS)})")
