"""``fold-batch-norm``: fold an inference batch norm into the convolution (or linear) before it.

``batch_norm(conv(x, W, b))`` is ``conv(x, W * s, (b - mean) * s + beta)`` with
``s = gamma / sqrt(var + eps)`` per output channel, so the normalization costs nothing at run
time and a later quantization pass sees the weights the model really applies.  It folds only
where the convolution's result feeds nothing but the norm and every operand involved is a
parameter; the folded weights are new parameters (the old ones go when nothing else reads them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctc.ir.graph import param_tensor
from ctc.ir.patterns import Match, op, var
from ctc.ir.rewrite import Rewriter, rule
from ctc.passes import PassOptions, PatternPass, register_pass


def _channel_scale_shift(bn: object) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) of a batch_norm node whose statistics and affine operands are parameters."""
    ts = {}
    for name in ("mean", "var", "weight", "bias"):
        v = bn.operand(name)  # type: ignore[attr-defined]
        if v is None:
            ts[name] = None
            continue
        t = param_tensor(v)
        if t is None:
            return None
        ts[name] = t.double()
    inv = torch.rsqrt(ts["var"] + bn.attr("eps"))  # type: ignore[attr-defined]
    scale = inv * ts["weight"] if ts["weight"] is not None else inv
    shift = -ts["mean"] * scale
    if ts["bias"] is not None:
        shift = shift + ts["bias"]
    return scale, shift


def _scaled_weight(w: torch.Tensor, scale: torch.Tensor, *, producer: str, transposed: bool, groups: int
                   ) -> torch.Tensor:
    """``w`` with each output channel multiplied by ``scale`` (conv ``[O, I/g, *k]``, transposed conv
    ``[I, O/g, *k]``, linear ``[O, I]``)."""
    wd = w.double()
    if producer == "linear" or not transposed:
        return (wd * scale.reshape(-1, *[1] * (w.dim() - 1))).to(w.dtype)
    cin, opg = w.shape[0], w.shape[1]
    view = wd.reshape(groups, cin // groups, opg, *w.shape[2:])
    s = scale.reshape(groups, 1, opg, *[1] * (w.dim() - 2))
    return (view * s).reshape(w.shape).to(w.dtype)


def _fold(rw: Rewriter, m: Match) -> object:
    bn = m.root
    prod = m["p"]
    if prod.op == "linear" and prod.output.type.rank != 2:
        return None  # batch norm normalizes axis 1; a linear's features are its last axis
    ss = _channel_scale_shift(bn)
    w = param_tensor(prod.operand("weight"))
    b_in = prod.operand("bias")
    b = param_tensor(b_in) if b_in is not None else None
    if ss is None or w is None or (b_in is not None and b is None):
        return None
    scale, shift = ss
    transposed = bool(prod.attrs.get("transposed", False))
    new_w = _scaled_weight(w, scale, producer=prod.op, transposed=transposed, groups=int(prod.attrs.get("groups", 1)))
    new_b = (((b.double() if b is not None else torch.zeros_like(scale)) * scale) + shift).to(w.dtype)
    wname = prod.operand("weight").producer.attrs["name"]
    wv = rw.new_param(f"{wname}.bn_folded", new_w, before=prod)
    bv = rw.new_param(f"{wname.rsplit('.', 1)[0]}.bias.bn_folded", new_b, before=prod)
    operands = {"x": prod.operand("x"), "weight": wv, "bias": bv}
    return rw.create(prod.op, operands, dict(prod.attrs), before=bn, scope=prod.scope, block=prod.block).output


@rule(op("batch_norm", x=op(("conv", "linear"), name="p", single_use=True), mean=var("mean"), var=var("var")))
def fold_into_producer(rw: Rewriter, m: Match) -> object:
    """batch_norm(conv(x, W, b)) -> conv(x, W*s, (b - mean)*s + beta) (likewise for a 2-d linear)."""
    return _fold(rw, m)


@register_pass
class FoldBatchNormPass(PatternPass):
    """Fold inference batch norms into the convolution or linear that feeds them.

    The weights are rescaled per output channel and the shift becomes the bias."""

    name = "fold-batch-norm"

    @dataclass(frozen=True)
    class Options(PassOptions):
        """``fold-batch-norm`` has no options."""

    patterns = (fold_into_producer,)


__all__ = ["FoldBatchNormPass"]
