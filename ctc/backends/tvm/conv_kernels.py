"""Convolution lowering for the TVM CPU backend.

``lower_conv`` emits Relax's own ``nn.conv{1,2,3}d`` (and ``_transpose``) in torch's
channels-first layout, bias added per channel.
"""

from __future__ import annotations

from typing import Any

from ctc.backends.tvm.lower import Ctx, LoweringError, _dt
from ctc.ir.graph import Node

__all__ = ["lower_conv"]


def lower_conv(ctx: Ctx, node: Node, a: list[Any]) -> Any:
    """``conv`` node -> Relax (any dimensionality, groups, dilation, transposed)."""
    op = ctx.relax.op
    at = node.attrs
    nd = node.inputs[0].type.rank - 2
    layouts = {1: ("NCW", "OIW", "IOW"), 2: ("NCHW", "OIHW", "IOHW"), 3: ("NCDHW", "OIDHW", "IODHW")}
    if nd not in layouts:
        raise LoweringError(f"conv at {node.scope or '<root>'}: {nd} spatial axes are not supported")
    dl, kl, tkl = layouts[nd]
    pads = list(at["padding"]) * 2
    x, w = a[0], a[1]
    out_dt = _dt(node.outputs[0].type)
    if at["transposed"]:
        f = getattr(op.nn, f"conv{nd}d_transpose")
        y = ctx.emit(f(x, w, strides=list(at["stride"]), padding=pads,
                       output_padding=list(at["output_padding"] or (0,) * nd), dilation=list(at["dilation"]),
                       groups=at["groups"], data_layout=dl, kernel_layout=tkl, out_dtype=out_dt))
    else:
        f = getattr(op.nn, f"conv{nd}d")
        y = ctx.emit(f(x, w, strides=list(at["stride"]), padding=pads, dilation=list(at["dilation"]),
                       groups=at["groups"], data_layout=dl, kernel_layout=kl, out_dtype=out_dt))
    if len(a) > 2:
        b = ctx.emit(op.reshape(a[2], [1, -1] + [1] * nd))
        y = ctx.emit(op.add(y, b))
    return y
