"""From a ctc module to an emitted HLS C design: the shared Relax lowering with the fpga kernels,
TVM's legalization and TIR lowering, and the C printer.

Why a module of its own: the build (:mod:`.build`), the tuner (:mod:`.tune`) and the benchmark all
need "this module, these static shapes, this tiling plan -> the design's PrimFuncs and C".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctc.backends.hls.qlinear import QLinearShape, Tiling
from ctc.ir.graph import Module

__all__ = ["Design", "lower_design", "static_dims_for"]


@dataclass
class Design:
    """The lowered design: Relax module (main = the layer sequence) with lowered PrimFuncs."""

    mod: Any
    qlinear: dict[str, tuple[str, QLinearShape, Tiling]]  # kernel name -> (ctc value, shape, tiling)
    notes: list[str]

    def kernels(self) -> dict[str, Any]:
        """Kernel name -> lowered PrimFunc."""
        from tvm import relax

        return {gv.name_hint: self.mod[gv] for gv in self.mod.get_global_vars()
                if not isinstance(self.mod[gv], relax.Function)}

    def calls(self) -> list[tuple[str, list[Any]]]:
        """``(kernel, relax args)`` in execution order."""
        from tvm import relax

        out = []
        for block in self.mod["main"].body.blocks:
            for b in block.bindings:
                v = b.value
                if isinstance(v, relax.Call) and v.op.name == "relax.call_tir":
                    out.append((v.args[0].name_hint, [*v.args[1].fields, b.var]))
        return out


def static_dims_for(module: Module, seq_len: int, batch: int = 1) -> dict[str, int]:
    """Bind every symbolic input dim: the batch symbol -> ``batch``, the sequence symbol (and any other) ->
    ``seq_len``. The batch symbol is ``batch``, or a .pt2 program's first symbol at dim 0 (``d0``): bound to
    ``seq_len`` it made a design for 128 rows (:func:`ctc.analysis.roofline.input_symbols`, the one reading)."""
    from ctc.analysis.roofline import input_symbols

    b_sym, _, every = input_symbols(module)
    return {s: (batch if s == b_sym else seq_len) for s in sorted(every)}


def lower_design(module: Module, static_dims: Mapping[str, int], plan: Mapping[str, Tiling], *,
                 board: Any = None, utilization: float = 1.0) -> Design:
    """Lower ``module`` for the fpga target: shared lowering + HLS kernels, legalize, fold, lower TIR.

    With a ``board``, each float-island kernel gets the most reduction lanes (of 16, 8, 4, 2, 1) with
    which it fits ``utilization`` of the board (:func:`fitting_lanes`); without, 16."""
    import tvm
    from tvm import relax

    from ctc.backends.hls.cgen import lower_tir
    from ctc.backends.hls.exact import unsupported_ops
    from ctc.backends.hls.kernels import hls_kernels
    from ctc.backends.tvm.lower import LoweringError, lower

    missing = unsupported_ops(module)
    if missing:
        lines = "\n".join(f"  - {op} (at {', '.join(sorted(set(w))[:3])})" for op, w in sorted(missing.items()))
        symbolic = sorted({str(d) for n in module.nodes if n.op in missing for v in n.outputs
                           for d in v.type.shape if not isinstance(d, int)})
        hint = ("ops computed only from constants, such as rotary tables, disappear with the `constant-fold` pass"
                if not symbolic else
                f"their shapes depend on {', '.join(symbolic)}, so `constant-fold` cannot compute them ahead of "
                "time: a rotary table of a model captured for any length is not buildable for this target")
        raise LoweringError(f"the fpga target has no integer-model kernel for {len(missing)} op(s) of module "
                            f"{module.name}:\n{lines}\n({hint}; docs/fpga-backend.md lists what compiles)")
    record: dict[str, tuple[str, QLinearShape, Tiling]] = {}
    low = lower(module, params="const", static_dims=static_dims, kernels=hls_kernels(plan, static_dims, record),
                fast_math=False, use_int_kernels=False)
    seq = tvm.transform.Sequential([
        relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
        relax.transform.LegalizeOps(), relax.transform.FoldConstant(), relax.transform.RewriteDataflowReshape(),
        relax.transform.DeadCodeElimination(),
    ])
    with tvm.target.Target({"kind": "c"}):
        mod = seq(low.mod)
    prim = tvm.IRModule({gv: mod[gv] for gv in mod.get_global_vars() if not isinstance(mod[gv], relax.Function)})
    lowered = lower_tir(interleave_reductions(prim, None if board is None else fitting_lanes(prim, board, utilization)))
    for gv in lowered.get_global_vars():
        mod[gv.name_hint] = lowered[gv]
    return Design(mod, record, list(low.notes))


REDUCTION_LANES = 16
"""Output lanes of the float-island reductions (attention products, norm statistics): one fp32
multiply-add (5 DSPs) per lane."""


def interleave_reductions(mod: Any, lanes: Mapping[str, int] | None = None) -> Any:
    """The TE kernels' schedule: every reduction runs its reduction loops outermost and all its outputs,
    fused into one loop, inside them (``for k: for o: acc[o] += ...``), in :data:`REDUCTION_LANES`
    unrolled lanes under a pipelined loop.  Each output still sums in its fixed order, but consecutive
    pipeline iterations update different accumulators, so a float sum does not wait for the adder
    (II 1 instead of its latency), and the pipeline runs long.  Hand-written engines (``hls.kernel``)
    keep their own nests; elementwise kernels keep the default (innermost loop pipelined)."""
    from tvm import s_tir

    sch = s_tir.Schedule(mod)
    for gv in mod.get_global_vars():
        f = mod[gv]
        if f.attrs is not None and "hls.kernel" in f.attrs:
            continue
        sch.work_on(gv.name_hint)
        root = sch.get_sblock("root")
        for block in sch.get_child_blocks(root):
            iters = sch.get(block).iter_vars
            n_sp = sum(1 for it in iters if int(it.iter_type) == 0)
            loops = sch.get_loops(block)
            if n_sp == 0 or n_sp == len(iters) or len(loops) != len(iters):
                continue
            sch.reorder(*loops[n_sp:], *loops[:n_sp])
            outputs = sch.fuse(*loops[:n_sp]) if n_sp > 1 else loops[0]
            ext = int(sch.get(outputs).extent)
            cap = REDUCTION_LANES if lanes is None else lanes.get(gv.name_hint, REDUCTION_LANES)
            u = max(v for v in (1, 2, 4, 8, 16, 32) if v <= cap and ext % v == 0)
            outer, inner = sch.split(outputs, [None, u])
            sch.annotate(outer, "hls.pipeline", 1)
            if u > 1:
                sch.annotate(inner, "hls.unroll", u)
    return sch.mod


def fitting_lanes(prim: Any, board: Any, utilization: float) -> dict[str, int]:
    """Per TE kernel: the most reduction lanes whose modelled DSPs and on-chip bytes fit the board share."""
    import tvm

    from ctc.backends.hls.cgen import lower_tir
    from ctc.backends.hls.perf import kernel_cost

    out: dict[str, int] = {}
    for gv in prim.get_global_vars():
        f = prim[gv]
        if f.attrs is not None and "hls.kernel" in f.attrs:
            continue
        one = tvm.IRModule({gv.name_hint: f})
        for u in (REDUCTION_LANES, 8, 4, 2, 1):
            low = lower_tir(interleave_reductions(one, {gv.name_hint: u}))
            if kernel_cost(gv.name_hint, low[gv.name_hint], board).fits(board, utilization) is None or u == 1:
                out[gv.name_hint] = u
                break
    return out


def write_design(design: Design, module: Module, out_dir: Path) -> Any:
    """Print the design's C into ``out_dir`` (see :func:`ctc.backends.hls.cgen.write_program`)."""
    from ctc.backends.hls.cgen import write_program

    return write_program(design.mod, out_dir, [v.name for v in module.inputs], list(module.output_names))
