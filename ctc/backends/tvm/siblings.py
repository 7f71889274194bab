"""Sibling linears: the linears that read one input (q, k and v of an attention; gate and up of an FFN).

Why one helper: three lowerings merge such linears into one kernel over their weights side by side
(the GPU's q|k|v tensor-core GEMM in :mod:`.cuda_fusion`, the CPU's per-block VNNI GEMV in
:mod:`.block_gemv`, and the CPU's f32 and W8A8 GEMMs in :mod:`.lower`); they differ only in which
siblings their kernel can take, which each passes as ``accept``.
"""

from __future__ import annotations

from collections.abc import Callable

from ctc.ir.graph import Node

__all__ = ["LINEAR_OPS", "sibling_linears"]

LINEAR_OPS = ("linear", "quant_linear")


def sibling_linears(node: Node, accept: Callable[[Node], bool]) -> list[Node]:
    """The other linears (:data:`LINEAR_OPS`) reading ``node``'s operand ``x`` as their own ``x`` that ``accept``
    takes, each once, in the order of ``x``'s uses (``node`` itself is not in the list)."""
    xv = node.operand("x")
    out: list[Node] = []
    if xv is None:
        return out
    for u in xv.users:
        if u is node or u.op not in LINEAR_OPS or u.operand("x") is not xv or not accept(u):
            continue
        out.append(u)
    return out
