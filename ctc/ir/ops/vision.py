"""Vision and audio ops in torch's channels-first layout: convolution (1-d/2-d/3-d, groups,
dilation, transposed), batch and group norm, max/avg/adaptive pooling, pad (constant, reflect,
replicate, circular) and resize (nearest, linear, cubic interpolation).

Why whole ops: a convolution is what a compression pass quantizes or prunes and what a backend
gives a tuned kernel, and ``batch_norm`` after a convolution is folded into it by the
``fold-batch-norm`` pass; decomposed into gathers and sums neither would be possible.  Spatial
dims may be symbolic (an audio length), so output sizes are computed with symbolic arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ctc.ir.ops.infer import expect_dim
from ctc.ir.ops.registry import Attr, OpError, register_op
from ctc.ir.symbolic import dim_add, dim_floordiv, dim_mul, dim_sub
from ctc.ir.types import FLOAT_DTYPES, Dim, TensorType

CAT = "vision"


def _float(t: TensorType, what: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise OpError(f"{what} must be a float tensor, got {t}")


def _spatial_attr(name: str, v: tuple[int, ...], nd: int, op: str, lo: int = 0) -> tuple[int, ...]:
    if len(v) != nd:
        raise OpError(f"{op}: {name} needs {nd} values (one per spatial axis), got {list(v)}")
    if any(x < lo for x in v):
        raise OpError(f"{op}: {name} values must be >= {lo}, got {list(v)}")
    return v


def conv_out_dim(size: Dim, k: int, s: int, p: int, d: int) -> Dim:
    """``(size + 2p - d(k-1) - 1) // s + 1`` (symbolic sizes allowed)."""
    return dim_add(dim_floordiv(dim_sub(dim_add(size, 2 * p), d * (k - 1) + 1), s), 1)


def conv_transpose_out_dim(size: Dim, k: int, s: int, p: int, d: int, op: int) -> Dim:
    """``(size - 1) s - 2p + d(k-1) + output_padding + 1``."""
    return dim_add(dim_mul(dim_sub(size, 1), s), d * (k - 1) + op + 1 - 2 * p)


# =========================================================================== convolution
def _infer_conv(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, w, *b = ins
    _float(x, "conv x")
    nd = w.rank - 2
    if nd not in (1, 2, 3) or x.rank != nd + 2:
        raise OpError(f"conv needs x[N, C, *spatial] and weight[.., .., *kernel] of matching rank (1-3 spatial "
                      f"axes), got {x} and {w}")
    if w.dtype != x.dtype:
        raise OpError(f"conv: weight dtype {w.dtype} differs from x dtype {x.dtype}")
    st = _spatial_attr("stride", attrs["stride"], nd, "conv", 1)
    pd = _spatial_attr("padding", attrs["padding"], nd, "conv")
    dl = _spatial_attr("dilation", attrs["dilation"], nd, "conv", 1)
    g = attrs["groups"]
    tr = attrs["transposed"]
    op = attrs["output_padding"] or (0,) * nd
    _spatial_attr("output_padding", op, nd, "conv")
    if g < 1:
        raise OpError(f"conv: groups must be >= 1, got {g}")
    cin = x.shape[1]
    if not all(isinstance(d, int) for d in w.shape):
        raise OpError(f"conv: weight {w} must have a static shape")
    if tr:
        expect_dim(cin, w.shape[0], f"conv (transposed): x channels vs weight {w} dim 0")
        cout = int(w.shape[1]) * g
    else:
        expect_dim(cin, int(w.shape[1]) * g, f"conv: x channels vs weight {w} in-channels x groups {g}")
        cout = int(w.shape[0])
        if cout % g:
            raise OpError(f"conv: {cout} output channels not divisible by groups {g}")
    if isinstance(cin, int) and cin % g:
        raise OpError(f"conv: {cin} input channels not divisible by groups {g}")
    if b:
        if b[0].rank != 1 or b[0].dtype != x.dtype:
            raise OpError(f"conv: bias must be [C_out] of x's dtype, got {b[0]}")
        expect_dim(b[0].shape[0], cout, "conv: bias length vs output channels")
    ks = [int(k) for k in w.shape[2:]]
    if tr:
        sp = [conv_transpose_out_dim(s, k, a, p, d, o) for s, k, a, p, d, o in zip(x.shape[2:], ks, st, pd, dl, op,
                                                                                       strict=True)]
    else:
        if any(o for o in op):
            raise OpError("conv: output_padding only applies to transposed convolutions")
        sp = [conv_out_dim(s, k, a, p, d) for s, k, a, p, d in zip(x.shape[2:], ks, st, pd, dl, strict=True)]
    for d in sp:
        if isinstance(d, int) and d < 1:
            raise OpError(f"conv: input {x} is too small for kernel {ks} (output size {d})")
    return [x.with_shape((x.shape[0], cout, *sp))]


@register_op("conv", inputs=("x", "weight", "bias?"), infer=_infer_conv, category=CAT, attrs={
    "stride": Attr("ints", doc="stride per spatial axis"),
    "padding": Attr("ints", doc="zero padding on both sides, per spatial axis"),
    "dilation": Attr("ints", doc="kernel dilation per spatial axis"),
    "groups": Attr("int", 1, doc="channel groups (C_in for depthwise)"),
    "transposed": Attr("bool", False, doc="transposed convolution (weight [C_in, C_out/groups, *k])"),
    "output_padding": Attr("ints", (), doc="transposed only: extra size on one side, per spatial axis"),
})
def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, stride: tuple[int, ...],
         padding: tuple[int, ...], dilation: tuple[int, ...], groups: int, transposed: bool,
         output_padding: tuple[int, ...]) -> torch.Tensor:
    """Cross-correlation of ``x [N, C_in, *spatial]`` with ``weight [C_out, C_in/groups, *k]`` plus
    bias (torch ``convolution``; 1-3 spatial axes); ``transposed`` computes its adjoint
    (``conv_transpose``) with ``weight [C_in, C_out/groups, *k]``."""
    return torch.ops.aten.convolution(x, weight, bias, list(stride), list(padding), list(dilation), transposed,
                                      list(output_padding) or [0] * len(stride), groups)


# =========================================================================== norms
def _infer_batch_norm(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, mean, var, *wb = ins
    _float(x, "batch_norm x")
    if x.rank < 2:
        raise OpError(f"batch_norm needs x[N, C, ...], got {x}")
    for t, what in ((mean, "mean"), (var, "var"), *zip(wb, ("weight", "bias"), strict=False)):
        if t.rank != 1 or t.dtype not in FLOAT_DTYPES:
            raise OpError(f"batch_norm: {what} must be a float [C] vector, got {t}")
        expect_dim(t.shape[0], x.shape[1], f"batch_norm: {what} length vs channels of {x}")
    return [x]


@register_op("batch_norm", inputs=("x", "mean", "var", "weight?", "bias?"), infer=_infer_batch_norm, category=CAT,
             attrs={"eps": Attr("float", 1e-5, doc="added to the variance")})
def batch_norm(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, *, eps: float) -> torch.Tensor:
    """Inference batch norm over axis 1: ``(x - mean) / sqrt(var + eps) * weight + bias`` with the
    running statistics ``mean``/``var`` (torch ``batch_norm(training=False)``)."""
    return F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)


def _infer_group_norm(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, *wb = ins
    _float(x, "group_norm x")
    g = attrs["groups"]
    if x.rank < 2 or g < 1:
        raise OpError(f"group_norm needs x[N, C, ...] and groups >= 1, got {x}, groups={g}")
    c = x.shape[1]
    if isinstance(c, int) and c % g:
        raise OpError(f"group_norm: {c} channels not divisible by {g} groups")
    for t, what in zip(wb, ("weight", "bias"), strict=False):
        if t.rank != 1 or t.dtype != x.dtype:
            raise OpError(f"group_norm: {what} must be [C] of x's dtype, got {t}")
        expect_dim(t.shape[0], c, f"group_norm: {what} length vs channels")
    return [x]


@register_op("group_norm", inputs=("x", "weight?", "bias?"), infer=_infer_group_norm, category=CAT, attrs={
    "groups": Attr("int", doc="channel groups normalized together"),
    "eps": Attr("float", 1e-5, doc="added to the variance"),
})
def group_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
               groups: int, eps: float) -> torch.Tensor:
    """Normalize each sample's channel groups over (channels in group, spatial) with biased
    variance, then scale and shift per channel (torch ``group_norm``)."""
    return F.group_norm(x, groups, weight, bias, eps)


# =========================================================================== pooling
def pool_out_dim(size: Dim, k: int, s: int, p: int, d: int, ceil_mode: bool) -> Dim:
    """Output length of a pooling window (torch's rule, ceil mode included: the last window must start
    inside the input or its left padding)."""
    if not ceil_mode:
        return conv_out_dim(size, k, s, p, d)
    if not isinstance(size, int):
        raise OpError("pooling with ceil_mode needs static spatial sizes")
    out = -(-(size + 2 * p - d * (k - 1) - 1) // s) + 1
    if (out - 1) * s >= size + p:
        out -= 1
    return out


def _pool_nd(x: TensorType, kernel: tuple[int, ...], op: str) -> int:
    nd = len(kernel)
    if nd not in (1, 2, 3) or x.rank not in (nd + 1, nd + 2):
        raise OpError(f"{op}: kernel {list(kernel)} needs an input of rank {nd + 1} or {nd + 2}, got {x}")
    return nd


def _infer_max_pool(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    k = attrs["kernel"]
    nd = _pool_nd(x, k, "max_pool")
    _spatial_attr("kernel", k, nd, "max_pool", 1)
    st = _spatial_attr("stride", attrs["stride"], nd, "max_pool", 1)
    pd = _spatial_attr("padding", attrs["padding"], nd, "max_pool")
    dl = _spatial_attr("dilation", attrs["dilation"], nd, "max_pool", 1)
    if any(2 * p > kk for p, kk in zip(pd, k, strict=True)):
        raise OpError(f"max_pool: padding {list(pd)} must be at most half the kernel {list(k)}")
    sp = [pool_out_dim(s, kk, a, p, d, attrs["ceil_mode"]) for s, kk, a, p, d in
          zip(x.shape[-nd:], k, st, pd, dl, strict=True)]
    return [x.with_shape((*x.shape[:-nd], *sp))]


@register_op("max_pool", inputs=("x",), infer=_infer_max_pool, category=CAT, attrs={
    "kernel": Attr("ints", doc="window size per spatial axis (1-3 axes)"),
    "stride": Attr("ints", doc="stride per spatial axis"),
    "padding": Attr("ints", doc="implicit -inf padding on both sides, per spatial axis"),
    "dilation": Attr("ints", doc="window dilation per spatial axis"),
    "ceil_mode": Attr("bool", False, doc="round the output size up (last window may hang over)"),
})
def max_pool(x: torch.Tensor, *, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
             dilation: tuple[int, ...], ceil_mode: bool) -> torch.Tensor:
    """Maximum over each window of the trailing ``len(kernel)`` axes (torch ``max_pool{1,2,3}d``)."""
    f = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(kernel) - 1]
    return f(x, kernel, stride, padding, dilation, ceil_mode=ceil_mode)


def _infer_avg_pool(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    _float(x, "avg_pool x")
    k = attrs["kernel"]
    nd = _pool_nd(x, k, "avg_pool")
    _spatial_attr("kernel", k, nd, "avg_pool", 1)
    st = _spatial_attr("stride", attrs["stride"], nd, "avg_pool", 1)
    pd = _spatial_attr("padding", attrs["padding"], nd, "avg_pool")
    if any(2 * p > kk for p, kk in zip(pd, k, strict=True)):
        raise OpError(f"avg_pool: padding {list(pd)} must be at most half the kernel {list(k)}")
    if attrs["divisor_override"] is not None and attrs["divisor_override"] < 1:
        raise OpError("avg_pool: divisor_override must be >= 1")
    sp = [pool_out_dim(s, kk, a, p, 1, attrs["ceil_mode"]) for s, kk, a, p in
          zip(x.shape[-nd:], k, st, pd, strict=True)]
    return [x.with_shape((*x.shape[:-nd], *sp))]


@register_op("avg_pool", inputs=("x",), infer=_infer_avg_pool, category=CAT, attrs={
    "kernel": Attr("ints", doc="window size per spatial axis (1-3 axes)"),
    "stride": Attr("ints", doc="stride per spatial axis"),
    "padding": Attr("ints", doc="implicit zero padding on both sides, per spatial axis"),
    "ceil_mode": Attr("bool", False, doc="round the output size up"),
    "count_include_pad": Attr("bool", True, doc="padding zeros count in the divisor"),
    "divisor_override": Attr("opt_int", None, doc="fixed divisor instead of the window size"),
})
def avg_pool(x: torch.Tensor, *, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
             ceil_mode: bool, count_include_pad: bool, divisor_override: int | None) -> torch.Tensor:
    """Mean over each window of the trailing ``len(kernel)`` axes (torch ``avg_pool{1,2,3}d``)."""
    nd = len(kernel)
    if nd == 1:
        if divisor_override is not None:  # avg_pool1d has no divisor_override: compute it as 2-d
            return avg_pool(x.unsqueeze(-2), kernel=(1, *kernel), stride=(1, *stride), padding=(0, *padding),
                            ceil_mode=ceil_mode, count_include_pad=count_include_pad,
                            divisor_override=divisor_override).squeeze(-2)
        return F.avg_pool1d(x, kernel, stride, padding, ceil_mode, count_include_pad)
    f = F.avg_pool2d if nd == 2 else F.avg_pool3d
    return f(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)


def _infer_adaptive(op: str):  # noqa: ANN202 - small factory
    def infer(ins: list[TensorType], attrs: dict) -> list[TensorType]:
        (x,) = ins
        out = attrs["output_size"]
        nd = _pool_nd(x, out, op)
        _spatial_attr("output_size", out, nd, op, 1)
        if op == "adaptive_avg_pool":
            _float(x, f"{op} x")
        return [x.with_shape((*x.shape[:-nd], *out))]

    return infer


@register_op("adaptive_avg_pool", inputs=("x",), infer=_infer_adaptive("adaptive_avg_pool"), category=CAT,
             attrs={"output_size": Attr("ints", doc="output size per spatial axis (1-3 axes)")})
def adaptive_avg_pool(x: torch.Tensor, *, output_size: tuple[int, ...]) -> torch.Tensor:
    """Mean over windows ``[floor(i*L/O), ceil((i+1)*L/O))`` of each trailing axis (torch
    ``adaptive_avg_pool{1,2,3}d``; output size 1 is a global average)."""
    f = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[len(output_size) - 1]
    return f(x, output_size)


@register_op("adaptive_max_pool", inputs=("x",), infer=_infer_adaptive("adaptive_max_pool"), category=CAT,
             attrs={"output_size": Attr("ints", doc="output size per spatial axis (1-3 axes)")})
def adaptive_max_pool(x: torch.Tensor, *, output_size: tuple[int, ...]) -> torch.Tensor:
    """Maximum over windows ``[floor(i*L/O), ceil((i+1)*L/O))`` of each trailing axis (torch
    ``adaptive_max_pool{1,2,3}d``)."""
    f = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)[len(output_size) - 1]
    return f(x, output_size)


# =========================================================================== pad
PAD_MODES = ("constant", "reflect", "replicate", "circular")


def _infer_pad(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    pads, mode = attrs["pads"], attrs["mode"]
    if len(pads) % 2 or not 2 <= len(pads) <= 2 * x.rank:
        raise OpError(f"pad: pads {list(pads)} must be (before, after) pairs for up to {x.rank} trailing axes")
    if any(p < 0 for p in pads):
        raise OpError(f"pad: pads {list(pads)} must be >= 0 (negative padding is a slice)")
    shape = list(x.shape)
    for i in range(len(pads) // 2):
        ax = x.rank - 1 - i
        lo, hi = pads[2 * i], pads[2 * i + 1]
        d = shape[ax]
        if mode == "reflect" and isinstance(d, int) and (lo >= d or hi >= d):
            raise OpError(f"pad: reflect padding {lo},{hi} must be smaller than dim {d} of {x}")
        if mode == "circular" and isinstance(d, int) and (lo > d or hi > d):
            raise OpError(f"pad: circular padding {lo},{hi} must be at most dim {d} of {x}")
        shape[ax] = dim_add(d, lo + hi)
    if mode != "constant" and attrs["value"] != 0.0:
        raise OpError(f"pad: value only applies to constant padding (mode {mode})")
    return [x.with_shape(tuple(shape))]


@register_op("pad", inputs=("x",), infer=_infer_pad, category=CAT, attrs={
    "pads": Attr("ints", doc="(before, after) pairs, last axis first (torch F.pad order)"),
    "mode": Attr("str", "constant", doc="how the border is filled", choices=PAD_MODES),
    "value": Attr("float", 0.0, doc="fill value of constant padding"),
})
def pad(x: torch.Tensor, *, pads: tuple[int, ...], mode: str, value: float) -> torch.Tensor:
    """Pad the trailing axes (torch ``F.pad`` order and modes: constant, reflect without repeating
    the edge, replicate the edge, circular wrap-around)."""
    if mode == "constant":
        return F.pad(x, list(pads), value=value)
    n = len(pads) // 2
    if x.dim() - n >= 1 and x.dim() - n <= 2:  # torch's non-constant modes pad 1-3 trailing axes of batched input
        return F.pad(x, list(pads), mode=mode)
    lead = x.shape[:x.dim() - n]
    out = F.pad(x.reshape(1, -1, *x.shape[x.dim() - n:]), list(pads), mode=mode)
    return out.reshape(*lead, *out.shape[2:])


# =========================================================================== resize
RESIZE_MODES = ("nearest", "nearest-exact", "linear", "cubic")


def _infer_resize(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    size, mode = attrs["size"], attrs["mode"]
    nd = len(size)
    if nd not in (1, 2, 3) or x.rank != nd + 2:
        raise OpError(f"resize: size {list(size)} needs x[N, C, *spatial] with {nd} spatial axes, got {x}")
    if mode != "nearest" and mode != "nearest-exact":
        _float(x, f"resize ({mode}) x")
    if mode == "cubic" and nd != 2:
        raise OpError("resize: cubic interpolation is 2-d only (torch bicubic)")
    if attrs["align_corners"] and mode in ("nearest", "nearest-exact"):
        raise OpError("resize: align_corners applies to linear and cubic modes only")
    if attrs["scales"] is not None and len(attrs["scales"]) != nd:
        raise OpError(f"resize: scales {list(attrs['scales'])} needs one value per spatial axis")
    return [x.with_shape((*x.shape[:2], *size))]


@register_op("resize", inputs=("x",), infer=_infer_resize, category=CAT, attrs={
    "size": Attr("dims", doc="output size per spatial axis (1-3 axes; may be symbolic)"),
    "mode": Attr("str", "nearest", doc="interpolation", choices=RESIZE_MODES),
    "align_corners": Attr("bool", False, doc="linear/cubic: corner pixels' centres align"),
    "scales": Attr("opt_floats", None, doc="scale factors the model gave (they set the sampling step, as in torch)"),
})
def resize(x: torch.Tensor, *, size: tuple[int, ...], mode: str, align_corners: bool,
           scales: tuple[float, ...] | None) -> torch.Tensor:
    """Interpolate the spatial axes to ``size`` (torch ``interpolate``: nearest, nearest-exact,
    (bi/tri)linear, bicubic with A = -0.75; the sampling step is ``1/scale`` when ``scales`` is
    given, else ``in/out``)."""
    nd = len(size)
    tmode = {"linear": ("linear", "bilinear", "trilinear")[nd - 1], "cubic": "bicubic"}.get(mode, mode)
    ac = align_corners if tmode not in ("nearest", "nearest-exact") else None
    if scales is not None:
        y = F.interpolate(x, scale_factor=list(scales), mode=tmode, align_corners=ac, recompute_scale_factor=False)
        if tuple(y.shape[2:]) != tuple(size):
            raise OpError(f"resize: scales {list(scales)} give size {list(y.shape[2:])}, not {list(size)}")
        return y
    return F.interpolate(x, size=list(size), mode=tmode, align_corners=ac)


__all__ = ["PAD_MODES", "RESIZE_MODES", "conv_out_dim", "pool_out_dim"]
