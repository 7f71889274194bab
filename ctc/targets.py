"""Deployment targets a recipe can name (`target cpu|cuda|fpga`), their options, and the backend hook.

Each target declares a typed options class (same strict validation as pass options) and
the backend module that builds it.  A backend module exposes
``build_target(module, target: TargetConfig, out_dir: Path) -> dict`` which writes the compiled
library and whatever it needs into ``out_dir`` (the artifact's ``targets/<name>/``) and
returns a small JSON-able summary for the report; ``load(out_dir, module) -> runner`` to run
it from ``ctc.load(dir).run(inputs, target=...)``; and optionally
``supports(kind) -> str | None`` (None, or why the kind cannot be built) so that recipes
fail at check time, not after compressing, and ``runs_here(kind) -> str | None`` (None, or why
this machine cannot run the library: a CUDA build without a GPU is built but not measured). A summary with
the key ``not_runnable`` (why) says that this build has nothing to run (`target fpga csim=false`): ctc compile
does not measure it and drops the key.
Backends are imported only when a target is built, so `ctc --help` and recipe checking never import TVM.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctc.options import OptionError, Options, option


@dataclass(frozen=True)
class TargetOptions(Options):
    """Base of every target's options (see :mod:`ctc.options`)."""


# The most threads a CPU library's pool runs (CTC_MAX_THREADS in ctc/backends/tvm/parallel_pool.c): more were
# accepted, silently capped there, and reported as the count asked for.
MAX_CPU_THREADS = 256


@dataclass(frozen=True)
class CpuOptions(TargetOptions):
    """Options of the `cpu` target (TVM llvm)."""

    threads: int = option(0, "worker threads at run time (0 = all cores)", min=0, max=MAX_CPU_THREADS)
    mcpu: str = option("native", "LLVM -mcpu (native = this machine)")
    opt_level: int = option(3, "TVM optimisation level", min=0, max=3)
    tuning_dir: str | None = option(None, "meta-schedule tuning database directory (default ~/.cache/ctc/tuning)")
    seq_len: int = option(0, "build for this sequence length only (0 = any length, else >= 2); fixed-length code is a "
                             "little faster (MiniLM: 0-5%). A tuned build (trials > 0) needs fixed shapes: it "
                             "defaults to the recipe's evaluation (else calibration) seq_len, else 128", min=0)
    batch: int = option(0, "build for this batch size only (0 = any); a tuned build (trials > 0) defaults to 1",
                        min=0)
    amx: bool = option(True, "run W8A8 matmuls of several rows (and f32 linears, see fp32_matmul) on AMX tiles "
                             "where the CPU has them (Sapphire Rapids and later); false = no AMX: AVX-512 VNNI for "
                             "W8A8, f32 FMAs for f32")
    fp32_matmul: str = option("auto", "f32 linears of several rows: strict = f32 FMAs (AVX-512); bf16x6 = on "
                                        "AMX-BF16 tiles, each operand split into 3 bf16 pieces, 6 products (as "
                                        "accurate as f32); bf16x3 = 2 pieces, 3 products: faster, ~2^-17 relative "
                                        "error per product; auto = bf16x6 where the CPU has AMX-BF16 (and amx=true), "
                                        "else strict (the build notes say so)",
                              choices=("auto", "strict", "bf16x3", "bf16x6"))
    attention_bits: int = option(0, "prefill attention's products: 32 = f32; 8 = q k^T on int8 and p v on int16 x "
                                    "int8 VNNI kernels (q, k per token and head, v per channel), softmax in f32: "
                                    "faster, as accurate on MiniLM W8A8 (docs/tvm-cpu-backend.md); 0 = auto: 8 for "
                                    "a model with integer activations (W8A8), else 32; f32 where the CPU has no "
                                    "AVX512-VNNI", choices=(0, 8, 32))

    def validate(self) -> None:
        if self.seq_len == 1:
            raise OptionError("option seq_len=1: a build for one token is not supported (its one-element reductions "
                              "break the schedules); use seq_len >= 2, or 0 for any length (a decode step is "
                              "`model ... decode=LEN`)")
        if self.fp32_matmul in ("bf16x3", "bf16x6"):  # no silent fallback at the build: say so before the capture
            why = "amx=false turns AMX off" if not self.amx else None
            if why is None and self.mcpu in ("", "native"):
                try:
                    from ctc.backends.tvm.amx_f32 import target_has_amx_bf16
                except ImportError:  # no TVM: the target check reports the missing backend
                    pass
                else:
                    if not target_has_amx_bf16():
                        why = "this CPU has no AMX-BF16 tiles (or this process may not use them)"
            if why:
                raise OptionError(f"option fp32_matmul={self.fp32_matmul!r} runs on AMX-BF16 tiles, but {why}; use "
                                  "fp32_matmul=\"strict\" (or \"auto\": AMX where the CPU has it)")
        if self.mcpu not in ("", "native"):
            try:
                from ctc.backends.tvm.targets import check_mcpu
            except ImportError:  # no TVM: the target check reports the missing backend
                return
            why = check_mcpu(self.mcpu)
            if why:
                raise OptionError(f"option mcpu={self.mcpu!r}: {why}")


@dataclass(frozen=True)
class CudaOptions(TargetOptions):
    """Options of the `cuda` target (TVM cuda)."""

    arch: str = option("", "CUDA arch like sm_90 (empty = the visible GPU's)")
    opt_level: int = option(3, "TVM optimisation level", min=0, max=3)
    sms: int = option(0, "multiprocessors of the GPU the library will run on: the persistent decode step's grid "
                         "(0 = the visible GPU's, else the arch's common part: 132 for sm_90/sm_90a, H100 SXM and "
                         "H200); a library is refused on a GPU with another count", min=0)
    persistent: bool = option(True, "run a batch-1 int4 Llama-1B-shaped decode step as one persistent kernel "
                                    "(docs/tvm-cuda-backend.md); false = the per-operator kernels")


@dataclass(frozen=True)
class FpgaOptions(TargetOptions):
    """Options of the `fpga` target (HLS C, a resource/latency model, C simulation); see docs/fpga-backend.md."""

    board: str = option("zc706", "board preset: zc706 (Zynq XC7Z045) or u280 (Alveo XCU280)", choices=("zc706", "u280"))
    clock_mhz: float | None = option(None, "kernel clock in MHz (default: the board's; FPGA fabric clocks stay under "
                                           "1 GHz)", max=1000.0)
    bandwidth_gbps: float | None = option(None, "off-chip bandwidth in GB/s (default: the board's peak; HBM parts "
                                                "reach ~0.8 TB/s)", max=4000.0)
    dsps: int | None = option(None, "DSP slices available (default: the board's)", min=1)
    widths: list[int] = option([], "integer widths the design may use (default: every width the board supports)")
    utilization: float = option(0.8, "fraction of the board's DSPs and on-chip memory one layer may use",
                                min=0.05, max=1.0)
    seq_len: int = option(0, "sequence length the design is built for (0 = the evaluation window, else 128 or the "
                             "model's positions if fewer)", min=0)
    tune: bool = option(True, "search each integer GEMM's tiling against the model (seconds); false = default tiling")
    csim: bool = option(True, "compile the emitted C with gcc and check it bit-exactly against the integer model")
    tuning_dir: str | None = option(None, "tuning database directory (default ~/.cache/ctc/tuning)")

    def validate(self) -> None:
        from ctc.backends.hls.boards import BOARDS

        for name in ("clock_mhz", "bandwidth_gbps"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise OptionError(f"option {name}={v} must be > 0")
        board = BOARDS[self.board]
        bad = [w for w in self.widths if w not in board.widths]
        if bad:
            raise OptionError(f"option widths={list(self.widths)}: board {self.board} has no {bad[0]}-bit integer "
                            f"datapath (it supports {', '.join(map(str, board.widths))})")


@dataclass(frozen=True)
class TargetSpec:
    """A target kind: its summary, options class and the backend module that builds it."""

    name: str
    summary: str
    Options: type[TargetOptions]
    backend: str
    trials: bool = True  # takes `trials=N` (meta-schedule's budget); the fpga target tunes by its own model
    simulated: bool = False  # its library runs here only as a simulation (fpga: gcc's C sim), never timed as itself

    def available(self) -> bool:
        """Whether the backend module exists in this ctc (backends ship in-tree: a missing one is not built yet)."""
        try:
            return importlib.util.find_spec(self.backend) is not None
        except ModuleNotFoundError:
            return False

    def unsupported_reason(self) -> str | None:
        """None when this kind can be built; else why not, starting with "not built yet" (the backend
        does not exist in ctc yet, or its optional hook ``supports(kind) -> str | None`` refuses the kind)."""
        if not self.available():
            return f"not built yet: ctc has no {self.backend} backend so far"
        mod = importlib.import_module(self.backend)
        probe = getattr(mod, "supports", None)
        why = probe(self.name) if callable(probe) else None
        return None if why is None else f"not built yet: {why}"

    def cannot_run_here(self) -> str | None:
        """Why this machine cannot run what the backend builds for this kind (optional backend hook
        ``runs_here(kind) -> str | None``), or None."""
        mod = importlib.import_module(self.backend)
        probe = getattr(mod, "runs_here", None)
        return probe(self.name) if callable(probe) else None

    def build_function(self) -> Any:
        """The backend's ``build_target(module, target, out_dir)``; raises if the backend lacks it.

        (Not ``build``: a backend package with a ``build`` submodule would see that name
        rebound to the submodule as soon as it is imported.)"""
        mod = importlib.import_module(self.backend)
        fn = getattr(mod, "build_target", None)
        if not callable(fn):
            raise RuntimeError(f"backend {self.backend} has no build_target(module, target, out_dir) function")
        return fn


TARGETS: dict[str, TargetSpec] = {
    "cpu": TargetSpec(
        "cpu", "x86/ARM CPU through TVM (llvm), tuned with meta-schedule", CpuOptions, "ctc.backends.tvm"),
    "cuda": TargetSpec(
        "cuda", "NVIDIA GPU through TVM (cuda), tuned with meta-schedule", CudaOptions, "ctc.backends.tvm"),
    "fpga": TargetSpec(
        "fpga", "FPGA-style target: HLS C and a cycle/resource model", FpgaOptions, "ctc.backends.hls",
        trials=False, simulated=True),
}

TRIALS_HELP = "tuning budget: meta-schedule trials (0 = no tuning, use default schedules)"


@dataclass(frozen=True)
class TargetConfig:
    """A validated target from a recipe (or the command line): kind, options, tuning trials."""

    kind: str
    options: TargetOptions
    trials: int = 0
    notes: tuple[str, ...] = ()  # what ctc decided for this build that the recipe did not say

    @property
    def spec(self) -> TargetSpec:
        return TARGETS[self.kind]

    def to_json(self) -> dict[str, Any]:
        import dataclasses

        out = {"kind": self.kind, "options": dataclasses.asdict(self.options), "trials": self.trials}
        return {**out, "target_notes": list(self.notes)} if self.notes else out


def build_target(module: Any, target: TargetConfig, out_dir: Path, example_inputs: Any = None) -> dict[str, Any]:
    """Build ``module`` for ``target`` into ``out_dir`` through the target's backend.

    ``example_inputs`` (one batch of the module's inputs, e.g. the first evaluation batch) reach backends
    whose ``build_target`` takes them (the fpga target's test bench data)."""
    import inspect

    out_dir.mkdir(parents=True, exist_ok=True)
    fn = target.spec.build_function()
    takes = "example_inputs" in inspect.signature(fn).parameters
    summary = fn(module, target, out_dir, example_inputs=example_inputs) if takes else fn(module, target, out_dir)
    return dict(summary or {})
