"""Compile a ctc module for a CPU or a CUDA GPU through TVM Relax, export it, and load it back with the
runtime only.

Why: this is the flow that turns a (compressed) ctc module into a deployable library:

1. :func:`ctc.backends.tvm.lower.lower` -- ctc nodes -> Relax (params as constants or inputs).
2. Legalize + ``FoldConstant`` + ``FuseOps``/``FuseTIR`` (bias, activation, residual and
   layer-norm epilogues fuse into their producers).
3. Tuned schedules from the tuning database when a trial budget is given
   (:mod:`ctc.backends.tvm.tuning`; a second compile reuses the records, no tuning time).
4. Default schedules for every PrimFunc still unscheduled (:mod:`.schedules` on a CPU:
   register-tiled matmul rule, dlight CPU reduction/GEMV rules, vectorized elementwise rule;
   :mod:`.cuda_schedules` on a GPU: dlight's GPU rules).
5. ``tvm.compile`` and ``export_library`` into ``<out>/model.so`` plus ``model.json`` (input,
   output and parameter signature) and, with ``params="input"``, ``params.npz``.  For CUDA the
   kernels are compiled here by nvcc into a fatbin inside the library
   (:mod:`.cuda_toolchain`: works on a machine without a GPU).

Only the target-specific steps differ (schedules, finalizing passes, packaging); the lowering
and fusion are the same for every target.  :func:`load_compiled` needs only ``tvm_ffi`` and
TVM's runtime libraries (no Relax import) and takes/returns torch tensors or numpy arrays; on
a CUDA library it also loads TVM's CUDA runtime and runs on the GPU.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctc.backends.tvm.inputs import bind_input, check_shape, input_specs
from ctc.backends.tvm.targets import host_cores, usable_cores
from ctc.errors import UsageError
from ctc.ir.graph import Module
from ctc.positions import check_index_values, check_symbol_limits, index_bounds, ir_symbol_limits, with_config
from ctc.targets import MAX_CPU_THREADS

__all__ = ["BuildOptions", "CompiledModel", "build", "compile_module", "load", "load_compiled", "relax_passes"]

LIB_NAME = "model.so"
META_NAME = "model.json"
PARAMS_NAME = "params.npz"
PARALLEL_POOL_SOURCE = Path(__file__).with_name("parallel_pool.c")
PARALLEL_ENV = "CTC_PARALLEL"  # "tvm": keep TVM's thread pool for the parallel loops of a CPU library


@dataclass
class BuildOptions:
    """How to compile: parameter binding, shape specialisation, math mode and tuning budget."""

    params: str = "const"
    static_dims: dict[str, int] | None = None
    fast_math: bool = True
    trials: int = 0
    tuning_dir: str | Path | None = None
    use_int_kernels: bool = True
    use_amx: bool = True  # integer matmuls of several rows on AMX tiles where the target has them
    fp32_matmul: str = "auto"  # f32 linears: auto | strict | bf16x3 | bf16x6 (lower.resolve_fp32_matmul)
    attention_bits: int = 0  # CPU prefill attention: 32 = f32, 8 = int8 (attention_kernels), 0 = 8 for W8A8 models
    default_schedules: bool = True
    trials_per_task: int | None = None
    opt_level: int = 3
    extra: dict[str, Any] = field(default_factory=dict)


def relax_passes(target: Any) -> Any:
    """Legalization and fusion passes (before scheduling)."""
    import tvm
    from tvm import relax

    return tvm.transform.Sequential([
        fold_reshapes(),
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


def fold_reshapes() -> Any:
    """A Relax pass: a reshape of a reshape reads the first one's input (``reshape(reshape(x, a), b)`` ->
    ``reshape(x, b)``), and one back to that input's shape is the input itself.

    Why: the rules reshape to the shapes their kernels take (``[rows, K]``) and back to the op's
    (``[batch, seq, N]``): between two such kernels (a layer norm and the next linear's quantizer) the pair
    cancels, but each reshape over a symbolic batch still cost a shape computation and a view at run time
    (``vm.builtin.make_shape`` + ``vm.builtin.reshape``, ~5 us together on one thread; MiniLM W8A8 ran 110)."""
    from tvm_ffi import structural_equal

    import tvm
    from tvm import relax

    reshape = tvm.ir.Op.get("relax.reshape")

    @relax.expr_functor.mutator
    class _Fold(relax.PyExprMutator):  # type: ignore[misc]
        def __init__(self, mod: Any) -> None:
            super().__init__(mod)
            self.source: dict[Any, Any] = {}  # a reshape's var -> the value it reshapes (never itself a reshape)

        def visit_var_binding_(self, b: Any) -> None:
            value = self.visit_expr(b.value)
            if not (isinstance(b.var, relax.DataflowVar) and isinstance(value, relax.Call) and value.op == reshape
                    and isinstance(value.args[0], relax.Var)):
                super().visit_var_binding_(b)
                return
            x = value.args[0]
            x0 = self.source.get(x)
            if x0 is not None:
                if structural_equal(x0.ty, b.var.ty):
                    self.set_var_remap(b.var, x0)  # back to the input's own shape: the input
                    return
                value = self.builder_.normalize(relax.Call(reshape, [x0, value.args[1]], value.attrs, value.ty_args))
            self.source[b.var] = x0 if x0 is not None else x
            self.builder_.emit_normalized(relax.VarBinding(b.var, value))

    @tvm.transform.module_pass(opt_level=0, name="FoldReshapes")
    def _pass(mod: Any, _ctx: Any) -> Any:
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mod[gv] = _Fold(mod).visit_expr(func)
        return relax.transform.DeadCodeElimination()(mod)

    return _pass


def outputs_through_dataflow_vars(mod: Any) -> Any:
    """Bind each dataflow block output computed by a call to a dataflow var first (``lv = f(...); gv = lv``).

    Why: ``CanonicalizeBindings`` folds such aliases, so a final reshape (a decoder's logits
    ``[rows, vocab] -> [1, rows, vocab]``) became the block's output binding, which
    ``RewriteDataflowReshape`` leaves alone: it ran as a copy kernel (227 us for Llama-1B's prefill
    logits on the H200) instead of a view."""
    from tvm import relax

    for gv, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        blocks, changed = [], False
        for block in func.body.blocks:
            if not isinstance(block, relax.DataflowBlock):
                blocks.append(block)
                continue
            bindings = []
            for b in block.bindings:
                if isinstance(b, relax.VarBinding) and not isinstance(b.var, relax.DataflowVar) \
                        and isinstance(b.value, relax.Call):
                    dv = relax.DataflowVar(b.var.name + "_df", b.var.ty)
                    bindings += [relax.VarBinding(dv, b.value), relax.VarBinding(b.var, dv)]
                    changed = True
                else:
                    bindings.append(b)
            blocks.append(relax.DataflowBlock(bindings))
        if changed:
            body = relax.SeqExpr(blocks, func.body.body)
            mod[gv] = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)
    return mod


def _finalize(target: Any) -> Any:
    import tvm

    if target.kind.name == "cuda":
        from tvm.relax.backend.cuda import pipeline as cp
    else:
        from tvm.relax.backend.cpu_generic import pipeline as cp  # type: ignore[no-redef]
    return tvm.transform.Sequential(cp.dataflow_lower_passes(target) + cp.finalize_passes(target)
                                    + [_shape_funcs_noalias()])


def _shape_funcs_noalias() -> Any:
    """Mark the VM's one-buffer ``shape_func`` PrimFuncs ``tirx.noalias``.

    Why: ``VMShapeLower`` emits a ``shape_func`` without ``tirx.noalias`` for any symbolic dim, and with it
    in the module TVM's LLVM codegen tagged the kernels' buffer accesses with the catch-all ``tvm-alias``
    TBAA tag: LLVM then could not keep the f32 matmul's accumulator tile in registers across the reduction
    loop (it stored all 16 accumulators after every FMA: 2.5x slower linears in builds with a symbolic
    batch or sequence).  A one-buffer function has nothing to alias."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="ShapeFuncsNoAlias")
    def _pass(mod: Any, _ctx: Any) -> Any:
        for gv, f in list(mod.functions.items()):
            if isinstance(f, tvm.tirx.PrimFunc) and len(f.params) <= 1 and not f.attrs.get("tirx.noalias"):
                mod[gv] = f.with_attr("tirx.noalias", True)
        return mod

    return _pass


STACK_BUFFER_BYTES = 2048  # the register file (32 AVX-512 registers): constant allocations this small stay on the stack


def stack_small_buffers() -> Any:
    """TIR pass: every constant-size CPU allocation of at most :data:`STACK_BUFFER_BYTES` stays on the stack.

    Why: ``LowerTVMBuiltin`` keeps only "global" CPU allocations under 1 KB (``kMaxStackAlloca``) on the stack;
    a "local" one of any size, or a 1 KB register tile, takes ``TVMBackendAllocWorkspace`` (+ ``memset``) +
    ``TVMBackendFreeWorkspace`` from the pool each time its scope runs.  The f32 matmul's 8 x 32 register tile
    is exactly 1 KB; the row kernels' 16-lane accumulators and code buffers are "local", declared per row: MiniLM
    W8A8's layer norms (128 x 384, writing the next linear's codes) made 4 workspace calls and 4 frees a row.
    Marked ``disable_lower_builtin``, the buffer stays an ``alloca`` in the function's entry block (LLVM's SROA
    puts it in registers where it can).  Runs before the host finalization (``TIR_PIPELINE``)."""
    import tvm
    from tvm import tirx

    def small(buf: Any) -> bool:
        n = 1
        for e in buf.shape:
            if not isinstance(e, tirx.IntImm):
                return False
            n *= int(e)
        return n * buf.dtype.bits * buf.dtype.lanes // 8 <= STACK_BUFFER_BYTES

    def visit(stmt: Any) -> Any:
        if isinstance(stmt, tirx.AllocBuffer):
            if small(stmt.buffer) and "disable_lower_builtin" not in stmt.annotations:
                keep = tirx.IntImm("int32", 1)
                return tirx.AllocBuffer(stmt.buffer, {**stmt.annotations, "disable_lower_builtin": keep})
            return stmt
        if isinstance(stmt, tirx.SeqStmt):
            seq = [visit(s) for s in stmt.seq]
            return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq, strict=True)) else tirx.SeqStmt(seq)
        if isinstance(stmt, tirx.For):
            body = visit(stmt.body)
            return stmt if body.same_as(stmt.body) else tirx.For(
                stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding, stmt.annotations,
                stmt.step, stmt.span)
        if isinstance(stmt, tirx.While):
            body = visit(stmt.body)
            return stmt if body.same_as(stmt.body) else tirx.While(stmt.condition, body)
        if isinstance(stmt, tirx.AttrStmt):
            body = visit(stmt.body)
            return stmt if body.same_as(stmt.body) else tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body)
        if isinstance(stmt, tirx.IfThenElse):
            then = visit(stmt.then_case)
            other = None if stmt.else_case is None else visit(stmt.else_case)
            same = then.same_as(stmt.then_case) and (other is None or other.same_as(stmt.else_case))
            return stmt if same else tirx.IfThenElse(stmt.condition, then, other)
        return stmt

    @tvm.tirx.transform.prim_func_pass(opt_level=0, name="StackTiles")
    def _pass(func: Any, _mod: Any, _ctx: Any) -> Any:
        body = visit(func.body)
        return func if body.same_as(func.body) else func.with_body(body)

    return _pass


def _ctc_tir_pipeline() -> Any:
    """TVM's default CPU TIR pipeline with :func:`stack_small_buffers` ahead of the host finalization."""
    import tvm

    pipeline, finalize_host, finalize_device = tvm.tirx.get_tir_pipeline("s_tir")
    return pipeline, (lambda: tvm.transform.Sequential([stack_small_buffers(), finalize_host()])), finalize_device


TIR_PIPELINE = "ctc_cpu"  # tvm.compile(..., tir_pipeline=TIR_PIPELINE) for CPU targets


def register_tir_pipeline() -> str:
    """Register :data:`TIR_PIPELINE` with TVM (idempotent); returns its name."""
    import tvm

    tvm.tirx.register_tir_pipeline(TIR_PIPELINE, _ctc_tir_pipeline)
    return TIR_PIPELINE


def tir_pipeline_for(target: Any) -> str:
    """The TIR pipeline ctc compiles ``target``'s kernels with (builds and the tuner's timing alike)."""
    return "default" if target.kind.name == "cuda" else register_tir_pipeline()


def schedule_defaults(mod: Any, target: Any) -> Any:
    """Give every unscheduled PrimFunc the target's default schedule (:mod:`.schedules` for CPUs,
    :mod:`.cuda_schedules` for CUDA)."""
    if target.kind.name == "cuda":
        from ctc.backends.tvm.cuda_schedules import schedule_gpu_defaults

        return schedule_gpu_defaults(mod, target)
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

    def export(self, out_dir: str | Path, *, weights: str = "all") -> Path:
        """Write ``model.so``, ``model.json`` (and ``params.npz``) into ``out_dir``; returns the library path.

        ``weights="all"`` stores every bound array (the library runs alone); ``"derived"`` stores
        only arrays that cannot be rebuilt from the module's parameters (their ``source``), and
        the loader derives the rest from the module it is given (an artifact keeps one copy)."""
        if weights not in ("all", "derived"):
            raise ValueError(f"export: weights must be 'all' or 'derived', got {weights!r}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        lib = out / LIB_NAME
        if self.meta.get("device") == "cpu":  # host code: parallel loops claim chunks at run time (parallel_pool.c)
            self.executable.export_library(str(lib), addons=[str(PARALLEL_POOL_SOURCE)], options=["-O2", "-pthread"])
        else:
            self.executable.export_library(str(lib))
        specs = self.meta.get("params", [])
        stored = [i for i, spec in enumerate(specs) if weights == "all" or not spec.get("source")]
        meta = {**self.meta, "params_stored": stored}
        (out / META_NAME).write_text(json.dumps(meta, indent=1))
        if stored:
            np.savez(out / PARAMS_NAME, **{f"p{i}": self.param_arrays[i] for i in stored})
        return lib


def compile_module(module: Module, *, target: Any = None, options: BuildOptions | None = None,
                   kind: str = "cpu", target_options: Any = None) -> Compiled:
    """Lower, schedule (tuned and/or default) and compile ``module`` for ``target``.

    ``target`` is a :class:`~ctc.backends.tvm.targets.TargetInfo` (default: this host's cpu).
    """
    import tvm
    from ctc.backends.tvm import targets as T
    from ctc.backends.tvm.lower import lower
    from tvm import relax

    opts = options or BuildOptions()
    info = target if isinstance(target, T.TargetInfo) else T.resolve(kind, target_options)
    gpu = info.kind == "cuda"
    toolchain: dict[str, str] = {}
    if gpu:
        from ctc.backends.tvm.cuda_toolchain import prepare_cuda_build

        toolchain = prepare_cuda_build()  # before TVM builds anything for CUDA (stub libcuda, nvcc)
    tgt = info.target()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    step = None
    if gpu:  # the persistent decode step (cuda_decode_stack): the target's options
        from ctc.backends.tvm.cuda_decode_stack import StepOptions

        step = StepOptions(info.persistent, info.sms, str(info.tvm.get("arch", "")))
    low = lower(module, params=opts.params, fast_math=opts.fast_math, static_dims=opts.static_dims, target=tgt,
                use_int_kernels=opts.use_int_kernels, use_amx=opts.use_amx, fp32_matmul=opts.fp32_matmul,
                attention_bits=opts.attention_bits, persistent=step)
    timings["lower_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tgt, tvm.transform.PassContext(opt_level=opts.opt_level):
        mod = relax_passes(tgt)(low.mod)
    timings["fuse_s"] = time.perf_counter() - t0
    tune_summary: dict[str, Any] = {}
    if opts.trials > 0 and gpu:
        raise ValueError("tuning for target cuda runs on the GPU machine (benchmarks/cuda_tune.py); "
                         "build with trials=0 here")
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
    mod = relax.transform.RewriteDataflowReshape()(outputs_through_dataflow_vars(mod))  # before counting kernels
    kernels: dict[str, int] = {}
    if gpu:
        from ctc.backends.tvm.cuda_schedules import kernel_count

        kernels = kernel_count(mod)
    t0 = time.perf_counter()
    with _codegen_scope(tgt), tvm.transform.PassContext(opt_level=opts.opt_level):
        ex = tvm.compile(mod, tgt, relax_pipeline=_finalize(tgt),
                         tir_pipeline=tir_pipeline_for(tgt))
    timings["codegen_s"] = time.perf_counter() - t0
    meta = {
        "format": "ctc-tvm-1",
        "device": "cuda" if gpu else "cpu",
        "target": info.tvm,
        "threads": info.threads,
        "inputs": module.input_specs(),
        "outputs": [{"name": n, "shape": list(v.type.shape), "dtype": v.type.dtype}
                    for n, v in zip(module.output_names, module.outputs, strict=True)],
        "params": [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype), "source": src}
                   for (n, a), src in zip(low.param_inputs, low.param_sources, strict=True)],
        "static_dims": dict(opts.static_dims or {}),
        "opt_level": opts.opt_level,
        "fast_math": opts.fast_math,
        "int_kernels": low.int_kernels,
        "amx_kernels": low.amx_kernels,
        "fp32_matmul": low.fp32_matmul,
        "amx_f32_added_bytes": low.amx_f32_added_bytes,
        "notes": low.notes,
        "tuning": tune_summary,
        "inplace_inputs": low.inplace_inputs,
        # what the compiled code does not check: inputs that index a table, symbols a table bounds (see positions)
        "index_bounds": {k: list(v) for k, v in index_bounds(module).items()},
        "symbol_limits": {k: list(v) for k, v in ir_symbol_limits(module).items()},
    }
    if not gpu:
        from ctc.backends.tvm.targets import required_cpu_features

        meta["cpu_features"] = required_cpu_features(tgt)
    if gpu:
        meta["kernels_per_call"] = kernels.get("total", 0)
        meta["kernels"] = {k: v for k, v in kernels.items() if k != "total"}
        meta["toolchain"] = toolchain
        if low.persistent_grid:  # the persistent decode step: refused at load on a GPU with another SM count
            meta["persistent_grid"] = low.persistent_grid
    return Compiled(ex, meta, [a for _, a in low.param_inputs], timings)


def _codegen_scope(target: Any) -> Any:
    """CUDA: compile kernels with nvcc to fatbins, inside the target's scope (TVM reads the arch from it)."""
    import contextlib

    if target.kind.name != "cuda":
        return contextlib.nullcontext()
    from ctc.backends.tvm.cuda_toolchain import nvcc_compile_mode

    stack = contextlib.ExitStack()
    stack.enter_context(nvcc_compile_mode())
    stack.enter_context(target)
    return stack


# ----------------------------------------------------------------------------- runtime side
_RUNTIME_LOADED: set[str] = set()
RUNTIME_DIR_ENV = "CTC_TVM_LIBDIR"  # a folder holding TVM's runtime libraries, where the tvm package is absent


def runtime_lib_dir() -> str:
    """The folder of TVM's runtime libraries: the installed ``tvm`` package's ``lib/``, else
    ``$CTC_TVM_LIBDIR`` (a GPU machine that carries only ``libtvm_runtime*.so``)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("tvm")
    if spec is not None and spec.origin is not None:
        return os.path.join(os.path.dirname(spec.origin), "lib")
    env = os.environ.get(RUNTIME_DIR_ENV, "")
    if env and os.path.isfile(os.path.join(env, "libtvm_runtime.so")):
        return env
    raise RuntimeError("load_compiled: TVM's runtime libraries were not found: install apache-tvm, or set "
                       f"{RUNTIME_DIR_ENV} to a folder holding libtvm_runtime.so (and libtvm_runtime_cuda.so for "
                       "CUDA libraries)")


def _load_cudart() -> None:
    """libcudart.so.13 (TVM's CUDA runtime needs it): the system's, else the one PyTorch's CUDA wheels ship."""
    import ctypes
    import glob
    import os

    try:
        ctypes.CDLL("libcudart.so.13", mode=ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    import torch

    root = os.path.dirname(os.path.dirname(torch.__file__))
    for path in sorted(glob.glob(os.path.join(root, "nvidia", "**", "libcudart.so.13*"), recursive=True)):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            continue
    raise RuntimeError("load_compiled: libcudart.so.13 (CUDA 13 runtime) was not found; install the CUDA 13 "
                       "runtime or a CUDA 13 build of PyTorch")


def _load_runtime(device: str = "cpu") -> Any:
    """``tvm_ffi`` with TVM's runtime libraries loaded (no ``tvm``/``tvm.relax`` Python import);
    ``device="cuda"`` adds TVM's CUDA runtime."""
    import ctypes
    import os

    import tvm_ffi

    if "cpu" not in _RUNTIME_LOADED:
        libdir = runtime_lib_dir()
        for name in ("libtvm_runtime.so", "libtvm_runtime_extra.so"):
            path = os.path.join(libdir, name)
            if os.path.exists(path):
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        _RUNTIME_LOADED.add("cpu")
    if device == "cuda" and "cuda" not in _RUNTIME_LOADED:
        _load_cudart()
        path = os.path.join(runtime_lib_dir(), "libtvm_runtime_cuda.so")
        if not os.path.exists(path):
            raise RuntimeError(f"load_compiled: {path} is missing (TVM's CUDA runtime; apache-tvm ships it)")
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise RuntimeError(f"load_compiled: TVM's CUDA runtime does not load ({e}); is the NVIDIA driver "
                               "(libcuda.so.1) installed?") from None
        _RUNTIME_LOADED.add("cuda")
    return tvm_ffi


def _check_persistent_grid(ffi: Any, lib: Path, grid: int) -> None:
    """A library with the persistent decode step launches ``grid`` blocks whose grid barriers need every one of them
    resident at once (one per multiprocessor): refuse a GPU with another multiprocessor count (with fewer, the
    barriers wait for blocks that cannot start until the kernel's timeout: NaN logits; with more, the step runs
    short of the GPU)."""
    sms = int(ffi.get_global_func("runtime.GetDeviceAttr")(2, 0, 7))  # kDLCUDA, device 0, kMultiProcessorCount
    if sms != grid:
        raise RuntimeError(f"load_compiled: {lib}'s persistent decode step launches {grid} blocks, one per "
                           f"multiprocessor of the GPU it was built for, but this GPU has {sms}; rebuild it with "
                           f"`target cuda sms={sms}` (or `persistent=false` for the per-operator kernels)")


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
    Inputs may be torch tensors or numpy arrays: bound without a copy when they already have the
    declared dtype and are contiguous and 64-byte aligned, else checked and converted
    (:mod:`.inputs`); outputs are torch tensors (numpy arrays with ``numpy=True``) over the
    runtime's own buffers, zero-copy through DLPack.
    """

    checks_inputs = True  # arity, shapes, limits and index values: the checks of ctc.artifact.InputChecker

    def __init__(self, path: str | Path, *, threads: int | None = None,
                 module_params: Mapping[str, Any] | None = None, bind_weights: bool = True):
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
            self.threads = int(env) if env.isdigit() and int(env) > 0 else min(host_cores(), MAX_CPU_THREADS)
        self.device = str(self.meta.get("device", "cpu"))
        if self.device == "cpu" and self.threads > MAX_CPU_THREADS:  # the pool would run fewer than it says
            given = ("threads" if threads is not None else "its target's threads" if self.meta.get("threads")
                     else "TVM_NUM_THREADS")
            raise UsageError(f"load_compiled: {given}={self.threads}, but a CPU library runs at most "
                             f"{MAX_CPU_THREADS} worker threads; give a count up to {MAX_CPU_THREADS}")
        os.environ["TVM_NUM_THREADS"] = str(self.threads)
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                arch = self.meta.get("target", {}).get("arch")
                raise RuntimeError(f"load_compiled: {lib} was built for CUDA ({arch}); load it on a machine with an "
                                   "NVIDIA GPU and driver")
        if self.device == "cpu" and self.meta.get("cpu_features"):
            from ctc.backends.tvm.targets import missing_cpu_features

            lack = missing_cpu_features(self.meta["cpu_features"])
            if lack:  # the first such instruction would kill the process (SIGILL)
                raise RuntimeError(f"load_compiled: {lib} was built for a CPU with {', '.join(lack)} "
                                   f"({self.meta.get('target', {}).get('mcpu', '?')}), which this CPU lacks; rebuild "
                                   "it on this machine (`target cpu`), or for a CPU both have (`target cpu "
                                   "mcpu=\"x86-64-v3\"`)")
        if self.meta.get("amx_kernels"):
            from ctc.backends.tvm.int_kernels import amx_permission

            if not amx_permission():  # the first tile instruction would kill the process (SIGILL)
                raise RuntimeError(f"load_compiled: {lib} runs {self.meta['amx_kernels']} matmul(s) on AMX tiles, "
                                   "and this CPU or operating system does not allow them; rebuild it here, or with "
                                   "`target cpu amx=false`")
        ffi = _load_runtime(self.device)
        self._ffi = ffi
        if self.meta.get("persistent_grid"):
            _check_persistent_grid(ffi, lib, int(self.meta["persistent_grid"]))
        cfg = ffi.get_global_func("runtime.config_threadpool", allow_missing=True)
        if cfg is not None:
            cfg(POOL_ONE_CORE_PER_THREAD, self.threads, [str(c) for c in usable_cores()])
        self._lib = ffi.load_module(str(lib))
        self._pool = _install_parallel_pool(lib, self.threads) if self.device == "cpu" else None
        self.parallel = "chunks" if self._pool is not None else "tvm"
        self.vm = self._lib["vm_load_executable"]()
        # (device type, id, allocator) for the device and the host: kDLCPU=1, kDLCUDA=2, pooled allocator=2
        self.vm["vm_initialization"](2 if self.device == "cuda" else 1, 0, 2, 1, 0, 2)
        self._main = self.vm["main"]
        self._inplace = set(self.meta.get("inplace_inputs", []))
        self._specs = input_specs(self.meta, self._inplace)
        # symbol -> (largest size, why) and [(input index, name, table size, what its values are)]: _check_limits
        self.symbol_limits: dict[str, tuple[int, str]] = {}
        self._index_checks: list[tuple[int, str, int, str]] = []
        self.set_bounds(self.meta.get("index_bounds", {}), self.meta.get("symbol_limits", {}))
        self._keep: list[Any] = []
        self._params: list[Any] = []
        self._param_keep: list[Any] = []
        if self.meta.get("params") and bind_weights:
            self.bind_params(self._weights(d, module_params))

    def parallel_stats(self) -> dict[str, int]:
        """Counters of the library's chunk-claiming launcher (all zero under TVM's pool): parallel loops run,
        chunks run by the calling thread and by the workers, worker threads started."""
        import ctypes

        if self._pool is None:
            return {"launches": 0, "caller_chunks": 0, "worker_chunks": 0, "workers": 0}
        out = (ctypes.c_int64 * 4)()
        self._pool.ctc_parallel_stats(out)
        return dict(zip(("launches", "caller_chunks", "worker_chunks", "workers"), list(out), strict=True))

    def _weights(self, d: Path, module_params: Mapping[str, Any] | None) -> list[Any]:
        """The bound arrays: stored ones from ``params.npz``, the others derived from ``module_params``."""
        from ctc.backends.tvm.lower import derive_param

        specs = self.meta["params"]
        stored = set(self.meta.get("params_stored", range(len(specs))))
        z = np.load(d / PARAMS_NAME) if stored else {}
        out = []
        for i, spec in enumerate(specs):
            if i in stored:
                out.append(z[f"p{i}"])
            elif module_params is None:
                raise ValueError(f"load_compiled: weight {spec['name']} is not stored beside the library; load it "
                                 "through its artifact (ctc.load(dir).runner(...)) or give module_params")
            else:
                out.append(derive_param(spec["source"], module_params))
        return out

    def bind_module_params(self, module_params: Mapping[str, Any]) -> None:
        """Bind every weight derived from module parameters (e.g. seeded random weights made on the GPU
        machine); weights stored beside the library stay as loaded."""
        from ctc.backends.tvm.lower import derive_param

        arrays = []
        for spec in self.meta["params"]:
            if not spec.get("source"):
                raise ValueError(f"bind_module_params: weight {spec['name']} has no recorded source")
            arrays.append(derive_param(spec["source"], module_params))
        self.bind_params(arrays)

    def bind_params(self, arrays: Sequence[Any]) -> None:
        """Use ``arrays`` (numpy arrays or torch tensors, in ``meta["params"]`` order) as the weights: moved to
        the model's device once and kept there (the benchmark binds seeded random weights this way)."""
        want = self.meta.get("params", [])
        if len(arrays) != len(want):
            raise ValueError(f"bind_params: the library takes {len(want)} parameter arrays, got {len(arrays)}")
        keep: list[Any] = []
        ffi_params = []
        for spec, a in zip(want, arrays, strict=True):
            if tuple(a.shape) != tuple(spec["shape"]):
                raise ValueError(f"bind_params: {spec['name']} must have shape {spec['shape']}, got {tuple(a.shape)}")
            ffi_params.append(self._to_ffi(a, keep))
        self._param_keep = keep
        self._params = ffi_params

    @property
    def weight_bytes(self) -> int:
        """Bytes of the bound weights (each array once: a tied parameter is bound once)."""
        return sum(int(t.nbytes) for t in self._param_keep)

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.meta.get("inputs", [])]

    @property
    def static_dims(self) -> dict[str, int]:
        """The symbols this library was built for one size of (``seq_len=``/``batch=``, a tuned build); {} = any."""
        return {str(k): int(v) for k, v in (self.meta.get("static_dims") or {}).items()}

    def _to_ffi(self, x: Any, keep: list[Any], *, copy: bool = False) -> Any:
        """A runtime tensor on the model's device holding ``x`` (a torch tensor or numpy array); ``copy``
        forces a private buffer (for inputs the library writes in place)."""
        if self.device == "cuda":
            import torch

            t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
            on_gpu = t.is_cuda
            t = t.to("cuda").contiguous()
            if (copy and on_gpu) or t.data_ptr() % 64:
                t = t.clone()
            keep.append(t)
            return self._ffi.from_dlpack(t)
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()  # strided is fine: numpy copies below, on this thread (not torch's pool)
        a = np.ascontiguousarray(x)
        a = _aligned(a.copy() if copy else a)
        keep.append(a)
        return self._ffi.from_dlpack(a)

    def _args(self, inputs: tuple[Any, ...], keep: list[Any]) -> list[Any]:
        """The VM's arguments for one call: the inputs bound (zero-copy where they already fit), then the
        bound weights."""
        if len(inputs) == 1 and isinstance(inputs[0], Mapping):
            given = inputs[0]
            missing = [s.name for s in self._specs if s.name not in given]
            if missing:
                raise UsageError(f"missing input {missing[0]!r}: the compiled model takes "
                                 f"{', '.join(self.input_names)} (by name, or a list in this order)")
            inputs = tuple(given[s.name] for s in self._specs)
        elif len(inputs) == 1 and isinstance(inputs[0], (list, tuple)):
            inputs = tuple(inputs[0])
        want = len(self._specs) if self._specs else len(inputs)
        if len(inputs) != want:
            raise UsageError(f"the compiled model takes {want} inputs ({', '.join(self.input_names)}), "
                             f"got {len(inputs)}")
        sizes: dict[str, tuple[int, str]] = {}
        if not self._specs:  # a library without an input signature: bound as given
            return [self._to_ffi(x, keep) for x in inputs] + self._params
        if self.device == "cuda":
            for spec, x in zip(self._specs, inputs, strict=True):
                check_shape(spec, tuple(int(n) for n in np.shape(x)), sizes)
            self._check_limits(sizes, inputs)
            return [self._to_ffi(x, keep, copy=s.inplace) for s, x in zip(self._specs, inputs, strict=True)] \
                + self._params
        args = [bind_input(self._ffi, spec, x, sizes, keep) for spec, x in zip(self._specs, inputs, strict=True)]
        self._check_limits(sizes, inputs)
        return args + self._params if self._params else args

    def set_bounds(self, index_bounds: Mapping[str, Any], symbol_limits: Mapping[str, Any]) -> None:
        """Add what :meth:`_check_limits` enforces: ``{input: (table size, what)}`` and ``{symbol: (limit, why)}``
        (:mod:`ctc.positions`), kept for this library's own inputs and symbols."""
        symbols = {sym for spec in self._specs for sym in dict(spec.symbols).values()}
        self.symbol_limits.update({k: (int(v[0]), str(v[1])) for k, v in symbol_limits.items() if k in symbols})
        have = {c[1] for c in self._index_checks}
        self._index_checks += [(i, s.name, int(index_bounds[s.name][0]), str(index_bounds[s.name][1]))
                               for i, s in enumerate(self._specs) if s.name in index_bounds and s.name not in have]

    def _check_limits(self, sizes: Mapping[str, tuple[int, str]], inputs: tuple[Any, ...]) -> None:
        """Before any kernel runs (the compiled code checks no index): a symbol over its limit (``symbol_limits``:
        more tokens than the model has positions), or an index input outside its table (``meta["index_bounds"]``:
        token ids, cache positions), is a :class:`UsageError`.  Index values already on a GPU are not read back
        (that would synchronize every call): the caller who keeps them there keeps them in range."""
        check_symbol_limits(self.symbol_limits, sizes)
        for i, name, size, what in self._index_checks:
            x = inputs[i]
            if not getattr(x, "is_cuda", False):
                check_index_values(name, x.detach().numpy() if hasattr(x, "detach") else np.asarray(x), size, what)

    def __call__(self, *inputs: Any, numpy: bool = False) -> list[Any]:
        """Run on ``inputs`` (a mapping by name, a list, or positional); outputs as CPU torch tensors (numpy
        arrays with ``numpy=True``).  Inputs the library writes in place are copied first, so the
        caller's tensors never change."""
        keep: list[Any] = []
        out = self._main(*self._args(inputs, keep))
        outs = [out] if hasattr(out, "__dlpack__") else list(out)
        import torch

        res = [torch.from_dlpack(o) for o in outs]
        if self.device == "cuda":
            res = [r.cpu() for r in res]
            if self.meta.get("persistent_grid"):
                from ctc.backends.tvm.cuda_decode_stack import check_logits

                check_logits(res[0])
        if numpy:  # views of the same buffers: the outputs are the caller's, no copy needed
            return [r.numpy() for r in res]
        return res

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def call_device(self, args: Sequence[Any]) -> list[Any]:
        """Run on runtime tensors already on the device (from :meth:`device_tensor`) plus the bound
        weights; outputs as torch tensors on the device, in place where the library writes in place."""
        import torch

        out = self._main(*args, *self._params)
        outs = [out] if hasattr(out, "__dlpack__") else list(out)
        return [torch.from_dlpack(o) for o in outs]

    def device_tensor(self, x: Any) -> tuple[Any, Any]:
        """``(runtime tensor, torch tensor)`` sharing one buffer on the model's device, holding ``x``."""
        import torch

        keep: list[Any] = []
        r = self._to_ffi(x, keep, copy=True)
        held = keep[0]
        return r, (held if isinstance(held, torch.Tensor) else torch.from_numpy(held))

    def prepare(self, *inputs: Any) -> list[Any]:
        """Runtime tensors for ``inputs`` (to time the model without conversion cost)."""
        keep: list[Any] = []
        args = self._args(inputs, keep)
        self._keep += keep
        return args

    def run_prepared(self, args: Sequence[Any]) -> Any:
        return self._main(*args)

    def profile(self, *inputs: Any, runs: int = 3, clock: str = "wall") -> list[KernelTime]:
        """Wall time per compiled kernel over ``runs`` calls, slowest first.

        Each packed call the Relax VM makes (a fused PrimFunc, or a builtin such as an
        allocation) is timed through the VM's instrument hook; ``ms_per_call`` includes the
        hook's own few microseconds.  For finding the kernel that holds a model back.

        ``clock="cpu"`` times the calling thread's CPU time instead: on a machine shared with
        other work, wall time includes waiting for a core, CPU time hardly does.  It needs a
        library loaded with one thread (the kernels then run on the calling thread).
        """
        import time

        if runs < 1:
            raise ValueError(f"profile: runs must be >= 1, got {runs}")
        if clock not in ("wall", "cpu"):
            raise ValueError(f"profile: clock must be 'wall' or 'cpu', got {clock!r}")
        if clock == "cpu" and (self.threads != 1 or self.device != "cpu"):
            raise ValueError("profile: clock='cpu' times the calling thread, so the library must run on one CPU "
                             f"thread (load it with threads=1; it has {self.threads} on {self.device})")
        now = time.perf_counter if clock == "wall" else time.thread_time
        keep: list[Any] = []
        args = self._args(inputs, keep)
        self._main(*args)  # warm-up, not recorded
        totals: dict[str, list[float]] = {}
        started: dict[str, float] = {}

        sync = self._sync

        def hook(_func: Any, name: Any, before: bool, _ret: Any, *_args: Any) -> int:
            key = str(name)
            sync()  # a GPU kernel's time is only known once it has finished
            if before:
                started[key] = now()
            else:
                t = totals.setdefault(key, [0, 0.0])
                t[0] += 1
                t[1] += now() - started.pop(key, now())
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


# TVM's pool affinity mode for runtime.config_threadpool(mode, threads, cpus): -2 = one core per thread,
# over the cores given.  ctc gives the cores this process may use (taskset, container cpusets): worker i
# is pinned to the (i + 1)-th of them, and the calling thread, which runs task 0, keeps all of them.
# TVM's other modes ignore the process's mask: -1 (little cores) pinned the workers to the slowest
# cores of the machine (a hybrid CPU's efficiency cores) and 1 (big cores) pins the caller to the first
# `threads` cores of the machine (one thread: the Python thread that loaded the library, to core 0).
# TVM_BIND_THREADS=0 turns pinning off.
POOL_ONE_CORE_PER_THREAD = -2


def _install_parallel_pool(lib: Path, threads: int) -> Any:
    """Point the loaded CPU library's parallel launch at its own chunk-claiming pool (parallel_pool.c); the
    library handle, or None where the library predates it, has no parallel loop, uses TVM's parallel
    barrier, or CTC_PARALLEL=tvm is set."""
    import ctypes
    import os

    mode = os.environ.get(PARALLEL_ENV, "").strip().lower()
    if mode not in ("", "chunks", "tvm"):
        raise ValueError(f"load_compiled: {PARALLEL_ENV}={mode!r}: use 'chunks' (the default) or 'tvm'")
    if mode == "tvm":
        return None
    handle = ctypes.CDLL(str(lib))  # the library TVM loaded (dlopen returns the same handle)
    if not hasattr(handle, "ctc_parallel_install") or hasattr(handle, "__TVMBackendParallelBarrier"):
        return None
    try:
        slot = ctypes.c_void_p.in_dll(handle, "__TVMBackendParallelLaunch")
    except ValueError:  # no parallel loop in the library
        return None
    handle.ctc_parallel_install.argtypes = [ctypes.c_void_p, ctypes.c_int]
    handle.ctc_parallel_install(ctypes.addressof(slot), int(threads))
    return handle


def load_compiled(path: str | Path, *, threads: int | None = None,
                  module_params: Mapping[str, Any] | None = None, bind_weights: bool = True) -> CompiledModel:
    """Load ``model.so`` (a file or the directory holding it) with the TVM runtime only; weights not stored
    beside it are derived from ``module_params`` (``bind_weights=False``: bind them later with
    :meth:`CompiledModel.bind_module_params` or :meth:`CompiledModel.bind_params`)."""
    return CompiledModel(path, threads=threads, module_params=module_params, bind_weights=bind_weights)


# ----------------------------------------------------------------------------- ctc backend hooks
def _options_from_target(target: Any, module: Module) -> BuildOptions:
    """Build options from a ``TargetConfig``: its trial budget, ``opt_level``, ``tuning_dir``
    (default: ~/.cache/ctc/tuning) and ``seq_len``/``batch`` (a fixed-shape build binds the
    module's ``seq``/``batch`` symbols)."""

    from ctc.analysis.roofline import input_symbols

    opts = target.options
    # `batch` / `seq` as captured from Hugging Face, else a .pt2 program's own names (d0 at dim 0, d1 after it),
    # as the recipe checker and `ctc bench --batch/--seq-len` read them
    b_sym, s_sym, every = input_symbols(module)
    static: dict[str, int] = {}
    for option_name, symbol, what in (("seq_len", s_sym, "sequence"), ("batch", b_sym, "batch")):
        value = int(getattr(opts, option_name, 0) or 0)
        if not value:
            continue
        if symbol is None:
            dims = f"their dims use {sorted(every)}" if every else "they have fixed shapes already"
            raise UsageError(f"target {target.kind}: {option_name}={value} given, but the model's inputs have no "
                             f"{what} dim ({dims}); remove {option_name}")
        static[symbol] = value
    for symbol, value in static.items():  # a longer build would index past a table (TVM fails in broadcast_to)
        limit = ir_symbol_limits(module).get(symbol)
        if limit is not None and value > limit[0]:
            option_name = "seq_len" if symbol == s_sym else "batch"
            raise UsageError(f"target {target.kind}: {option_name}={value}, but the model takes at most {limit[0]} "
                             f"({symbol}: {limit[1]}); give {option_name} <= {limit[0]}")
    # GPU weights are not constants inside the library: bound at load from the module's parameters
    return BuildOptions(trials=int(getattr(target, "trials", 0) or 0),
                        tuning_dir=getattr(opts, "tuning_dir", None) or None, static_dims=static,
                        opt_level=int(getattr(opts, "opt_level", 3)), use_amx=bool(getattr(opts, "amx", True)),
                        fp32_matmul=str(getattr(opts, "fp32_matmul", "auto")),
                        attention_bits=int(getattr(opts, "attention_bits", 0)),
                        params="input" if target.kind == "cuda" else "const")


def build(module: Module, target: Any, out_dir: Path) -> dict[str, Any]:
    """The ctc target hook (:mod:`ctc.targets`): compile ``module`` for ``target`` into ``out_dir``."""
    from ctc.backends.tvm import targets as T

    info = T.resolve(target.kind, target.options)
    opts = _options_from_target(target, module)
    t0 = time.perf_counter()
    comp = compile_module(module, target=info, options=opts)
    # GPU libraries keep no second copy of the weights: the artifact's parameters are bound at load
    lib = comp.export(out_dir, weights="derived" if info.kind == "cuda" else "all")
    summary = {"library": lib.name, "tvm_target": info.tvm, "compile_s": round(time.perf_counter() - t0, 3),
               "timings": {k: round(v, 3) for k, v in comp.timings.items()}, "int_kernels": comp.meta["int_kernels"],
               "fp32_matmul": comp.meta["fp32_matmul"], "amx_f32_added_bytes": comp.meta["amx_f32_added_bytes"],
               "notes": comp.meta["notes"], "tuning": comp.meta["tuning"]}
    if "kernels_per_call" in comp.meta:
        summary["kernels_per_call"] = comp.meta["kernels_per_call"]
    return summary


def load(target_dir: str | Path, module: Module | None = None) -> Any:
    """The ctc artifact hook: the compiled library in ``target_dir``, callable on a mapping or a list of
    inputs (and with :meth:`CompiledModel.profile` for ``ctc bench --profile``); weights not stored beside
    it come from ``module``'s parameters."""
    compiled = load_compiled(target_dir, module_params=module.params if module is not None else None)
    if module is not None and "index_bounds" not in compiled.meta:  # a library built before model.json held them
        compiled.set_bounds(index_bounds(module), ir_symbol_limits(module))
    # an artifact's library (ART/targets/KIND): the source model's config sits in ART/tokenizer
    compiled.set_bounds({}, with_config(dict(compiled.symbol_limits),
                                        Path(target_dir).parent.parent / "tokenizer" / "config.json"))
    return compiled
