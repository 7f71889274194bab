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
    """Bind every symbolic input dim: ``batch`` -> 1, ``seq`` (and any other) -> ``seq_len``."""
    syms = sorted(set().union(*(v.type.symbols for v in module.inputs))) if module.inputs else []
    return {s: (batch if s == "batch" else seq_len) for s in syms}


def lower_design(module: Module, static_dims: Mapping[str, int], plan: Mapping[str, Tiling]) -> Design:
    """Lower ``module`` for the fpga target: shared lowering + HLS kernels, legalize, fold, lower TIR."""
    import tvm
    from tvm import relax

    from ctc.backends.hls.cgen import lower_tir
    from ctc.backends.hls.exact import unsupported_ops
    from ctc.backends.hls.kernels import hls_kernels
    from ctc.backends.tvm.lower import LoweringError, lower

    missing = unsupported_ops(module)
    if missing:
        lines = "\n".join(f"  - {op} (at {', '.join(sorted(set(w))[:3])})" for op, w in sorted(missing.items()))
        raise LoweringError(f"the fpga target has no integer-model kernel for {len(missing)} op(s) of module "
                            f"{module.name}:\n{lines}\n(see docs/fpga-backend.md for what it compiles)")
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
    lowered = lower_tir(prim)
    for gv in lowered.get_global_vars():
        mod[gv.name_hint] = lowered[gv]
    return Design(mod, record, list(low.notes))


def write_design(design: Design, module: Module, out_dir: Path) -> Any:
    """Print the design's C into ``out_dir`` (see :func:`ctc.backends.hls.cgen.write_program`)."""
    from ctc.backends.hls.cgen import write_program

    return write_program(design.mod, out_dir, [v.name for v in module.inputs], list(module.output_names))
