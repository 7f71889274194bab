"""Default (untuned) GPU schedules, and how many kernels a compiled step launches.

Why: after the shared lowering and fusion every PrimFunc needs a GPU schedule (threads,
shared memory).  dlight's GPU rules are good defaults: its ``GEMV`` streams a one-row linear's
weight at ~90% of the copy rate (measured on the H200 for SmolLM2's 56 MB LM head), ``Matmul``
uses the tensor cores (wmma) for f16 products of at least 64 in every dim, ``Reduction`` and
``GeneralReduction`` make one kernel of a row reduction with its epilogue (RMSNorm, softmax),
``LowBatchGEMV`` covers a few rows (batch-8 decode), ``Fallback`` binds whatever is left.  The
hand-written kernels of :mod:`.cuda_kernels` are already scheduled and are left alone.

:func:`kernel_count` counts the device kernels one call of ``main`` launches: the figure the
decode work is about (a step was 640 launches in the first probe).
"""

from __future__ import annotations

from typing import Any

__all__ = ["default_gpu_rules", "kernel_count", "schedule_gpu_defaults"]


def default_gpu_rules() -> list[Any]:
    """dlight's GPU rules, in the order they are tried."""
    from tvm.s_tir import dlight as dl

    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
            dl.gpu.Fallback()]


def schedule_gpu_defaults(mod: Any, target: Any) -> Any:
    """Schedule every PrimFunc of ``mod`` not yet scheduled with :func:`default_gpu_rules`."""
    from tvm.s_tir import dlight as dl

    with target:
        return dl.ApplyDefaultSchedule(*default_gpu_rules())(mod)


def _kernels_in(func: Any) -> int:
    """Device kernels of one scheduled PrimFunc: its ``blockIdx.x`` launch scopes (one per kernel,
    as a thread-bound loop or a ``thread_extent`` attribute)."""
    import tvm_ffi

    from tvm import tirx

    count = 0

    def on_for(stmt: Any) -> None:
        nonlocal count
        if stmt.thread_binding is not None:
            count += str(stmt.thread_binding.thread_tag) == "blockIdx.x"

    def on_attr(stmt: Any) -> None:
        nonlocal count
        if stmt.attr_key == "thread_extent":
            count += str(stmt.node.thread_tag) == "blockIdx.x"

    tvm_ffi.structural_walk(func.body, [(tirx.For, on_for), (tirx.AttrStmt, on_attr)])
    return count


def kernel_count(mod: Any, func_name: str = "main") -> dict[str, int]:
    """Kernels one call of ``func_name`` launches, by callee, from a scheduled module (before the
    VM lowering): each ``call_tir``/``call_tir_inplace`` of a PrimFunc contributes that function's
    launch scopes.  ``{"total": n, "<callee>": n_callee, ...}``."""
    from tvm import relax, tirx

    mod = relax.transform.RewriteDataflowReshape()(mod)  # reshape-like kernels become VM views, as in the build
    per_func = {gv.name_hint: _kernels_in(f) for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}
    counts: dict[str, int] = {}

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and len(expr.args) and isinstance(expr.args[0], relax.GlobalVar):
            name = expr.args[0].name_hint
            if name in per_func:
                counts[name] = counts.get(name, 0) + per_func[name]

    relax.analysis.post_order_visit(mod[func_name], visit)
    return {"total": sum(counts.values()), **dict(sorted(counts.items(), key=lambda kv: -kv[1]))}
