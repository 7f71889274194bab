"""Compile a ctc module for a CPU through TVM Relax, export it, and load it back with the runtime only.

Why: this is the flow that turns a (compressed) ctc module into a deployable library:

1. :func:`ctc.backends.tvm.lower.lower` -- ctc nodes -> Relax (params as constants or inputs).
2. Legalize + ``FoldConstant`` + ``FuseOps``/``FuseTIR`` (bias, activation, residual and
   layer-norm epilogues fuse into their producers).
3. Tuned schedules from the tuning database when a trial budget is given
   (:mod:`ctc.backends.tvm.tuning`; a second compile reuses the records, no tuning time).
4. Default schedules for every PrimFunc still unscheduled (:mod:`.schedules`: register-tiled
   matmul rule, dlight CPU reduction/GEMV rules, vectorized elementwise rule).
5. ``tvm.compile`` and ``export_library`` into ``<out>/model.so`` plus ``model.json`` (input,
   output and parameter signature) and, with ``params="input"``, ``params.npz``.

:func:`load_compiled` needs only ``tvm.runtime`` (no Relax import) and takes/returns torch
tensors or numpy arrays.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctc.backends.tvm.targets import host_cores
from ctc.ir.graph import Module

__all__ = ["BuildOptions", "CompiledModel", "build", "compile_module", "load", "load_compiled", "relax_passes"]

LIB_NAME = "model.so"
META_NAME = "model.json"
PARAMS_NAME = "params.npz"


@dataclass
class BuildOptions:
    """How to compile: parameter binding, shape specialisation, math mode and tuning budget."""

    params: str = "const"
    static_dims: dict[str, int] | None = None
    fast_math: bool = True
    trials: int = 0
    tuning_dir: str | Path | None = None
    use_int_kernels: bool = True
    default_schedules: bool = True
    trials_per_task: int | None = None
    opt_level: int = 3
    extra: dict[str, Any] = field(default_factory=dict)


def relax_passes(target: Any) -> Any:
    """Legalization and fusion passes (before scheduling)."""
    import tvm
    from tvm import relax

    return tvm.transform.Sequential([
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ])


def _finalize(target: Any) -> Any:
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cp

    return tvm.transform.Sequential(cp.dataflow_lower_passes(target) + cp.finalize_passes(target))


def schedule_defaults(mod: Any, target: Any) -> Any:
    """Give every unscheduled PrimFunc the default CPU schedule (:mod:`.schedules`)."""
    from ctc.backends.tvm.schedules import default_rules
    from tvm.s_tir import dlight as dl

    with target:
        return dl.ApplyDefaultSchedule(*default_rules())(mod)


@dataclass
class Compiled:
    """An in-memory compiled model (before export) and its signature."""

    executable: Any
    meta: dict[str, Any]
    param_arrays: list[np.ndarray]
    timings: dict[str, float]

    def export(self, out_dir: str | Path) -> Path:
        """Write ``model.so``, ``model.json`` (and ``params.npz``) into ``out_dir``; returns the library path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        lib = out / LIB_NAME
        self.executable.export_library(str(lib))
        (out / META_NAME).write_text(json.dumps(self.meta, indent=1))
        if self.param_arrays:
            np.savez(out / PARAMS_NAME, **{f"p{i}": a for i, a in enumerate(self.param_arrays)})
        return lib


def compile_module(module: Module, *, target: Any = None, options: BuildOptions | None = None,
                   kind: str = "cpu", target_options: Any = None) -> Compiled:
    """Lower, schedule (tuned and/or default) and compile ``module`` for ``target``.

    ``target`` is a :class:`~ctc.backends.tvm.targets.TargetInfo` (default: this host's cpu).
    """
    import tvm
    from ctc.backends.tvm import targets as T
    from ctc.backends.tvm.lower import lower

    opts = options or BuildOptions()
    info = target if isinstance(target, T.TargetInfo) else T.resolve(kind, target_options)
    tgt = info.target()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    low = lower(module, params=opts.params, fast_math=opts.fast_math, static_dims=opts.static_dims, target=tgt,
                use_int_kernels=opts.use_int_kernels)
    timings["lower_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tgt, tvm.transform.PassContext(opt_level=opts.opt_level):
        mod = relax_passes(tgt)(low.mod)
    timings["fuse_s"] = time.perf_counter() - t0
    tune_summary: dict[str, Any] = {}
    if opts.trials > 0:
        from ctc.backends.tvm import tuning

        t0 = time.perf_counter()
        mod, tune_summary = tuning.tune_and_apply(mod, info, trials=opts.trials, cache_dir=opts.tuning_dir,
                                                  trials_per_task=opts.trials_per_task)
        timings["tune_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if opts.default_schedules:
        mod = schedule_defaults(mod, tgt)
    timings["schedule_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tvm.transform.PassContext(opt_level=opts.opt_level):
        ex = tvm.compile(mod, tgt, relax_pipeline=_finalize(tgt))
    timings["codegen_s"] = time.perf_counter() - t0
    meta = {
        "format": "ctc-tvm-1",
        "target": info.tvm,
        "threads": info.threads,
        "inputs": [{"name": v.name, "shape": list(v.type.shape), "dtype": v.type.dtype} for v in module.inputs],
        "outputs": [{"name": n, "shape": list(v.type.shape), "dtype": v.type.dtype}
                    for n, v in zip(module.output_names, module.outputs, strict=True)],
        "params": [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype)} for n, a in low.param_inputs],
        "static_dims": dict(opts.static_dims or {}),
        "opt_level": opts.opt_level,
        "fast_math": opts.fast_math,
        "int_kernels": low.int_kernels,
        "notes": low.notes,
        "tuning": tune_summary,
    }
    return Compiled(ex, meta, [a for _, a in low.param_inputs], timings)


# ----------------------------------------------------------------------------- runtime side
_RUNTIME_LOADED = False


def _load_runtime() -> Any:
    """``tvm_ffi`` with TVM's runtime libraries loaded (no ``tvm``/``tvm.relax`` Python import)."""
    global _RUNTIME_LOADED
    import ctypes
    import importlib.util
    import os

    import tvm_ffi

    if not _RUNTIME_LOADED:
        spec = importlib.util.find_spec("tvm")
        if spec is None or spec.origin is None:
            raise RuntimeError("load_compiled: the TVM runtime libraries (package apache-tvm) are not installed")
        libdir = os.path.join(os.path.dirname(spec.origin), "lib")
        for name in ("libtvm_runtime.so", "libtvm_runtime_extra.so"):
            path = os.path.join(libdir, name)
            if os.path.exists(path):
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        _RUNTIME_LOADED = True
    return tvm_ffi


def _aligned(a: np.ndarray) -> np.ndarray:
    """A 64-byte aligned C-contiguous copy (TVM kernels assume aligned buffers)."""
    a = np.asarray(a)
    if a.ctypes.data % 64 == 0 and a.flags.c_contiguous:
        return a
    buf = np.empty(a.nbytes + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    out = buf[off: off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


class CompiledModel:
    """A compiled ctc model loaded with the TVM runtime only: ``model(*inputs) -> list of outputs``.

    Only ``tvm_ffi`` and TVM's runtime shared libraries are loaded (no ``tvm``/Relax import).
    Inputs may be torch tensors or numpy arrays (copied into 64-byte aligned buffers); outputs
    are torch tensors (zero-copy through dlpack) unless ``numpy=True``.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None):
        import os

        p = Path(path)
        lib = p / LIB_NAME if p.is_dir() else p
        d = lib.parent
        if not lib.exists():
            raise FileNotFoundError(f"load_compiled: no compiled library at {lib} (build it with `ctc compile "
                                    "--target cpu` or ctc.backends.tvm.build.compile_module(...).export(dir))")
        self.meta: dict[str, Any] = json.loads((d / META_NAME).read_text()) if (d / META_NAME).exists() else {}
        self.threads = threads if threads is not None else int(self.meta.get("threads") or 0)
        if not self.threads:
            # 0 = every usable core (the target's documented default).  Left alone, TVM's pool runs
            # one thread on this kind of machine: MiniLM int8 took 18.9 ms instead of 8.3.
            env = os.environ.get("TVM_NUM_THREADS", "")
            self.threads = int(env) if env.isdigit() and int(env) > 0 else host_cores()
        os.environ["TVM_NUM_THREADS"] = str(self.threads)
        ffi = _load_runtime()
        self._ffi = ffi
        cfg = ffi.get_global_func("runtime.config_threadpool", allow_missing=True)
        if cfg is not None:
            cfg(-1, self.threads)
        self._lib = ffi.load_module(str(lib))
        self.vm = self._lib["vm_load_executable"]()
        # (device type, id, allocator) for the device and the host: kDLCPU=1, pooled allocator=2
        self.vm["vm_initialization"](1, 0, 2, 1, 0, 2)
        self._main = self.vm["main"]
        self._keep: list[np.ndarray] = []
        self._params: list[Any] = []
        if self.meta.get("params"):
            z = np.load(d / PARAMS_NAME)
            arrs = [_aligned(z[f"p{i}"]) for i in range(len(self.meta["params"]))]
            self._keep += arrs
            self._params = [ffi.from_dlpack(a) for a in arrs]

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.meta.get("inputs", [])]

    def _to_ffi(self, x: Any, keep: list[np.ndarray]) -> Any:
        if hasattr(x, "detach"):
            x = x.detach().cpu().contiguous().numpy()
        a = _aligned(np.ascontiguousarray(x))
        keep.append(a)
        return self._ffi.from_dlpack(a)

    def _args(self, inputs: tuple[Any, ...], keep: list[np.ndarray]) -> list[Any]:
        if len(inputs) == 1 and isinstance(inputs[0], Mapping):
            names = self.input_names
            missing = [n for n in names if n not in inputs[0]]
            if missing:
                raise KeyError(f"compiled model: missing inputs {missing} (takes {names})")
            inputs = tuple(inputs[0][n] for n in names)
        elif len(inputs) == 1 and isinstance(inputs[0], (list, tuple)):
            inputs = tuple(inputs[0])
        want = len(self.meta.get("inputs", inputs))
        if len(inputs) != want:
            raise TypeError(f"compiled model takes {want} inputs ({self.input_names}), got {len(inputs)}")
        self._check_fixed_dims(inputs)
        return [self._to_ffi(x, keep) for x in inputs] + self._params

    def _check_fixed_dims(self, inputs: Sequence[Any]) -> None:
        """A fixed-shape build (``seq_len``/``batch`` on the target) takes only those sizes: say so
        instead of letting the kernels read out of bounds."""
        from ctc.errors import UsageError

        fixed = self.meta.get("static_dims") or {}
        for spec, x in zip(self.meta.get("inputs", []), inputs, strict=False):
            shape = tuple(getattr(x, "shape", ()))
            for axis, dim in enumerate(spec.get("shape", [])):
                want = fixed.get(dim) if isinstance(dim, str) else dim
                if isinstance(want, int) and axis < len(shape) and int(shape[axis]) != want:
                    sizes = ", ".join(f"{k}={v}" for k, v in fixed.items())
                    raise UsageError(f"this library was built for fixed shapes ({sizes or 'as captured'}): input "
                                     f"{spec.get('name')!r} axis {axis} must be {want}, got {int(shape[axis])}")

    def __call__(self, *inputs: Any, numpy: bool = False) -> list[Any]:
        keep: list[np.ndarray] = []
        out = self._main(*self._args(inputs, keep))
        outs = [out] if hasattr(out, "__dlpack__") else list(out)
        if numpy:
            return [np.from_dlpack(o).copy() for o in outs]
        import torch

        return [torch.from_dlpack(o) for o in outs]

    def prepare(self, *inputs: Any) -> list[Any]:
        """Runtime tensors for ``inputs`` (to time the model without conversion cost)."""
        keep: list[np.ndarray] = []
        args = self._args(inputs, keep)
        self._keep += keep
        return args

    def run_prepared(self, args: Sequence[Any]) -> Any:
        return self._main(*args)

    def profile(self, *inputs: Any, runs: int = 3) -> list[KernelTime]:
        """Wall time per compiled kernel over ``runs`` calls, slowest first.

        Each packed call the Relax VM makes (a fused PrimFunc, or a builtin such as an
        allocation) is timed through the VM's instrument hook; ``ms_per_call`` includes the
        hook's own few microseconds.  For finding the kernel that holds a model back.
        """
        import time

        if runs < 1:
            raise ValueError(f"profile: runs must be >= 1, got {runs}")
        keep: list[np.ndarray] = []
        args = self._args(inputs, keep)
        self._main(*args)  # warm-up, not recorded
        totals: dict[str, list[float]] = {}
        started: dict[str, float] = {}

        def hook(_func: Any, name: Any, before: bool, _ret: Any, *_args: Any) -> int:
            key = str(name)
            if before:
                started[key] = time.perf_counter()
            else:
                t = totals.setdefault(key, [0, 0.0])
                t[0] += 1
                t[1] += time.perf_counter() - started.pop(key, time.perf_counter())
            return 0  # run the call normally

        self.vm["set_instrument"](self._ffi.convert(hook))
        try:
            for _ in range(runs):
                self._main(*args)
        finally:
            self.vm["set_instrument"](None)  # later calls run without the hook
        rows = [KernelTime(k, int(c / runs), 1e3 * s / runs, 1e3 * s / c) for k, (c, s) in totals.items()]
        return sorted(rows, key=lambda r: -r.ms_per_run)


@dataclass
class KernelTime:
    """One kernel's share of a run (:meth:`CompiledModel.profile`)."""

    name: str
    calls_per_run: int
    ms_per_run: float
    ms_per_call: float


def load_compiled(path: str | Path, *, threads: int | None = None) -> CompiledModel:
    """Load ``model.so`` (a file or the directory holding it) with the TVM runtime only."""
    return CompiledModel(path, threads=threads)


# ----------------------------------------------------------------------------- ctc backend hooks
def _options_from_target(target: Any, module: Module) -> BuildOptions:
    """Build options from a ``TargetConfig``: its trial budget, ``opt_level``, ``tuning_dir``
    (default: ~/.cache/ctc/tuning) and ``seq_len``/``batch`` (a fixed-shape build binds the
    module's ``seq``/``batch`` symbols)."""
    from ctc.errors import UsageError

    opts = target.options
    symbols = sorted(set().union(*(v.type.symbols for v in module.inputs))) if module.inputs else []
    static: dict[str, int] = {}
    for option_name, symbol, what in (("seq_len", "seq", "sequence"), ("batch", "batch", "batch")):
        value = int(getattr(opts, option_name, 0) or 0)
        if not value:
            continue
        if not symbols:
            raise UsageError(f"target {target.kind}: {option_name}={value} given, but the model's inputs have fixed "
                             f"shapes already; remove {option_name}")
        if symbol not in symbols:
            raise UsageError(f"target {target.kind}: {option_name} binds the {what} symbol {symbol!r}, but the "
                             f"model's input dims use {symbols}; capture with the {what} axis named {symbol!r}")
        static[symbol] = value
    return BuildOptions(trials=int(getattr(target, "trials", 0) or 0),
                        tuning_dir=getattr(opts, "tuning_dir", None) or None, static_dims=static,
                        opt_level=int(getattr(opts, "opt_level", 3)))


def build(module: Module, target: Any, out_dir: Path) -> dict[str, Any]:
    """The ctc target hook (:mod:`ctc.targets`): compile ``module`` for ``target`` into ``out_dir``."""
    from ctc.backends.tvm import targets as T

    info = T.resolve(target.kind, target.options)
    opts = _options_from_target(target, module)
    t0 = time.perf_counter()
    comp = compile_module(module, target=info, options=opts)
    lib = comp.export(out_dir)
    return {"library": lib.name, "tvm_target": info.tvm, "compile_s": round(time.perf_counter() - t0, 3),
            "timings": {k: round(v, 3) for k, v in comp.timings.items()}, "int_kernels": comp.meta["int_kernels"],
            "notes": comp.meta["notes"], "tuning": comp.meta["tuning"]}


def load(target_dir: str | Path, module: Module | None = None) -> Any:
    """The ctc artifact hook: the compiled library in ``target_dir``, callable on a mapping or a list of
    inputs (and with :meth:`CompiledModel.profile` for ``ctc bench --profile``)."""
    return load_compiled(target_dir)
