"""Compression ops (category ``compress``): quantized and low-rank linears, channel
permutation, fake-quant pairs (the attention variants are in :mod:`ctc.ir.ops.compress_attention`).

They are first-class IR ops so that backends lower them to real kernels; each reference
implementation below is the semantics those kernels are tested against.  Integer storage
conventions (signed weights, offset-binary int4 nibbles, unsigned activations) are in
:mod:`ctc.ir.quant`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ctc.ir import quant as Q
from ctc.ir.ops.infer import expect_dim, expect_rank, norm_axis
from ctc.ir.ops.registry import Attr, OpError, Presence, register_op
from ctc.ir.symbolic import dims_equal
from ctc.ir.types import FLOAT_DTYPES, INT_DTYPES, TensorType

CAT = "compress"


def _float(t: TensorType, what: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise OpError(f"{what} must be a float tensor, got {t}")


def _int(t: TensorType, what: str) -> None:
    if t.dtype not in INT_DTYPES:
        raise OpError(f"{what} must be an integer tensor, got {t}")


def _shape(t: TensorType, shape: tuple, what: str) -> None:
    if t.rank != len(shape) or not all(dims_equal(a, b) for a, b in zip(t.shape, shape, strict=True)):
        raise OpError(f"{what} must have shape {list(shape)}, got {t}")


# =========================================================================== quant_linear
def _a_quantized(a_bits: int | None) -> bool:
    return a_bits is not None and a_bits != 16


def _infer_quant_linear(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, qw, ws, wz, *rest = ins
    bits, gs, a_bits, clusters = attrs["w_bits"], attrs["group_size"], attrs["a_bits"], attrs["act_clusters"]
    dynamic = bool(attrs.get("act_dynamic"))
    if dynamic and not _a_quantized(a_bits):
        raise OpError("quant_linear act_dynamic=true needs quantized activations (a_bits 4..8)")
    want = 4 + int(attrs["has_bias"]) + (2 if _a_quantized(a_bits) and not dynamic else 0)
    if len(ins) != want:
        raise OpError(f"quant_linear with has_bias={attrs['has_bias']}, a_bits={a_bits} and act_dynamic={dynamic} "
                      f"takes {want} operands (x, qweight, w_scale, w_zero[, bias][, act_scale, act_zero]), got "
                      + str(len(ins)))
    _float(x, "quant_linear x")
    if x.rank < 1:
        raise OpError(f"quant_linear x must have rank >= 1, got {x}")
    expect_rank(qw, 2, "quant_linear qweight")
    n = qw.shape[0]
    k = x.shape[-1]
    if not isinstance(k, int):
        raise OpError(f"quant_linear needs a static input-channel count, got {x}")
    if gs != -1 and gs <= 0:
        raise OpError(f"quant_linear group_size must be -1 (per output channel) or positive, got {gs}")
    if bits <= 4:
        if qw.dtype != "u8":
            raise OpError(f"{bits}-bit weights are packed two per byte as u8, got {qw}")
        expect_dim(qw.shape[1], Q.packed_k(k, bits), f"quant_linear packed qweight columns for K={k}")
    else:
        if qw.dtype != "i8":
            raise OpError(f"{bits}-bit weights are stored as i8, got {qw}")
        expect_dim(qw.shape[1], k, "quant_linear qweight columns vs input channels")
    g = Q.num_groups(k, gs)
    _float(ws, "quant_linear w_scale")
    _shape(ws, (n, g), "quant_linear w_scale")
    if wz.dtype != "i8" and not (wz.dtype == "f32" and (not _a_quantized(a_bits) or dynamic)):
        raise OpError(f"quant_linear w_zero must be i8 (signed zero points), or f32 for weight-only nodes and nodes "
                      f"with dynamic activations (float zero points, e.g. GGUF Q4_1 minima), got {wz}")
    _shape(wz, (n, g), "quant_linear w_zero")
    if attrs["has_bias"]:
        b = rest.pop(0)
        _float(b, "quant_linear bias")
        _shape(b, (n,), "quant_linear bias")
    if _a_quantized(a_bits):
        c = len(clusters) or 1
        try:
            Q.cluster_index(clusters, k)
        except ValueError as e:
            raise OpError(f"quant_linear: {e}") from None
        if dynamic:
            return [x.with_shape((*x.shape[:-1], n))]
        s, z = rest
        _float(s, "quant_linear act_scale")
        _shape(s, (c,), "quant_linear act_scale (one per cluster)")
        if z.dtype != "i32":
            raise OpError(f"quant_linear act_zero must be i32, got {z}")
        _shape(z, (c,), "quant_linear act_zero (one per cluster)")
    elif clusters:
        raise OpError("quant_linear act_clusters given but activations are not quantized (a_bits None/16)")
    return [x.with_shape((*x.shape[:-1], n))]


def _quant_linear_layout(attrs: Mapping[str, Any]) -> dict[str, Presence]:
    """``bias`` iff ``has_bias``; ``act_scale``/``act_zero`` iff activations are quantized (``a_bits`` 4..8)."""
    aq = _a_quantized(attrs.get("a_bits")) and not attrs.get("act_dynamic")
    return {"bias": bool(attrs.get("has_bias")), "act_scale": aq, "act_zero": aq}


@register_op(
    "quant_linear",
    inputs=("x", "qweight", "w_scale", "w_zero", "bias?", "act_scale?", "act_zero?"),
    infer=_infer_quant_linear,
    category=CAT,
    layout=_quant_linear_layout,
    attrs={
        "w_bits": Attr("int", doc="weight bits (2..8); <= 4 packs two per byte", choices=tuple(range(2, 9))),
        "group_size": Attr("int", -1, doc="input channels per weight scale group; -1 = one per output channel"),
        "w_symmetric": Attr("bool", True, doc="weights symmetric (w_zero all 0) or asymmetric"),
        "a_bits": Attr("opt_int", None, doc="activation bits (4..8); None or 16 = float activations",
                       choices=(None, 4, 5, 6, 7, 8, 16)),
        "act_clusters": Attr("ints", (), doc="cumulative end boundaries of contiguous input-channel clusters, "
                                             "each with its own act scale/zero; () = one cluster"),
        "has_bias": Attr("bool", False, doc="whether the bias operand is present"),
        "act_dynamic": Attr("bool", False, doc="activation scale/zero computed per token (row) and cluster at run "
                                               "time from the row's min/max; no act_scale/act_zero operands"),
    },
)
def quant_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                 *rest: torch.Tensor, w_bits: int, group_size: int, w_symmetric: bool, a_bits: int | None,
                 act_clusters: tuple[int, ...], has_bias: bool, act_dynamic: bool = False) -> torch.Tensor:
    """Linear layer with integer weights and optionally integer activations: ``y = x W^T + b``.

    Operands: ``x [..., K]`` float; ``qweight`` signed integer weights in storage form
    (``i8 [N, K]`` for ``w_bits > 4``, else ``u8 [N, ceil(K/2)]`` with two offset-binary
    nibbles per byte, low nibble first: :mod:`ctc.ir.quant`); ``w_scale f32 [N, G]`` and
    ``w_zero i8 [N, G]`` (``G = 1`` when ``group_size == -1``, else ``ceil(K/group_size)``);
    ``bias [N]`` when ``has_bias``; ``act_scale f32 [C]`` and ``act_zero i32 [C]`` when
    ``a_bits`` is 4..8, one per activation cluster (``act_clusters`` holds the cumulative end
    boundaries, e.g. ``(96, 384)`` is channels 0..95 and 96..383; RPTQ reorders channels so
    each cluster is contiguous).

    Semantics: weights dequantize to ``W = (q - w_zero) * w_scale`` per group.  Quantized
    activations are ``qa = clamp(round(x / s_c) + z_c, 0, 2^a_bits - 1)`` (round half to
    even) and dequantize to ``(qa - z_c) * s_c`` with their cluster's ``(s_c, z_c)``.  The
    result is ``dequant(x) @ W^T + b`` computed in fp32 and cast to x's dtype.  This equals,
    up to fp32 summation rounding, the integer kernel that accumulates
    ``Σ (qa - z_c)(q - w_zero)`` in int32 over each K-segment of constant cluster and
    group and applies ``s_c * w_scale`` to each segment sum (``ctc.ir.quant.quant_linear_int``).

    ``act_dynamic``: ``(s_c, z_c)`` are computed per token (every leading index of ``x``) and
    cluster from that row's min/max (``ctc.ir.quant.dynamic_act_qparams``), as a kernel does at
    run time; the op then has no ``act_scale``/``act_zero`` operands.  Weight-only and ``act_dynamic``
    nodes may carry f32 ``w_zero`` (float zero points: ``W = (q - z) * s`` with ``z`` not an integer;
    the integer kernel keeps ``q . qa`` in int32 and applies ``z``'s term in float).  Clusters of one
    weight group each (e.g. blocks of 32 with ``group_size=32``) are llama.cpp's Q8_1 activation
    form: each block of each row gets its own 8-bit range.
    """
    rest_l = list(rest)
    bias = rest_l.pop(0) if has_bias else None
    k = x.shape[-1]
    w = Q.dequantize_weight(qweight, w_scale, w_zero, w_bits, group_size, k)
    xf = x.to(torch.float32)
    if _a_quantized(a_bits) and act_dynamic:
        xf = Q.fake_quant_act_dynamic(xf, int(a_bits), act_clusters)  # type: ignore[arg-type]
    elif _a_quantized(a_bits):
        act_scale, act_zero = rest_l
        xf = Q.fake_quant_act(xf, act_scale, act_zero, int(a_bits), act_clusters)  # type: ignore[arg-type]
    y = xf @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


# =========================================================================== quantize / dequantize
def _check_qparam(x: TensorType, p: TensorType, axis: int | None, group_size: int, what: str) -> None:
    """Scale/zero-point shapes: [] or [1] per tensor; [C] per channel along ``axis``;
    x's shape with ``ceil(C/group_size)`` at ``axis`` for per-group."""
    if axis is None:
        if p.rank > 1 or (p.rank == 1 and p.shape[0] != 1):
            raise OpError(f"{what}: per-tensor parameters must have shape [] or [1], got {p}")
        if group_size != -1:
            raise OpError(f"{what}: group_size needs an axis")
        return
    a = norm_axis(axis, x.rank)
    c = x.shape[a]
    if group_size == -1:
        _shape(p, (c,), f"{what} (per channel along axis {axis})")
        return
    if group_size <= 0:
        raise OpError(f"{what}: group_size must be -1 or positive, got {group_size}")
    if not isinstance(c, int):
        raise OpError(f"{what}: per-group quantization needs a static dim at axis {axis}, got {x}")
    want = list(x.shape)
    want[a] = -(-c // group_size)
    _shape(p, tuple(want), f"{what} (per group of {group_size} along axis {axis})")


def expand_qparam(p: torch.Tensor, shape: tuple[int, ...], axis: int | None, group_size: int) -> torch.Tensor:
    """Broadcast a scale/zero-point tensor to ``shape`` (see the quantize op's doc)."""
    if axis is None:
        return p.reshape(())
    a = axis % len(shape)
    if group_size == -1:
        view = [1] * len(shape)
        view[a] = shape[a]
        return p.reshape(view)
    return p.repeat_interleave(group_size, dim=a).narrow(a, 0, shape[a])


_QATTRS = {
    "axis": Attr("opt_int", None, doc="channel axis; None = per tensor"),
    "group_size": Attr("int", -1, doc="channels per group along axis; -1 = one per channel"),
}


def _infer_quantize(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, s, z = ins
    _float(x, "quantize x")
    _float(s, "quantize scale")
    _int(z, "quantize zero")
    _check_qparam(x, s, attrs["axis"], attrs["group_size"], "quantize scale")
    _check_qparam(x, z, attrs["axis"], attrs["group_size"], "quantize zero")
    lo, hi = Q.qrange(attrs["bits"], attrs["signed"])
    dt = attrs["dtype"]
    dlo, dhi = {"i8": (-128, 127), "u8": (0, 255), "i16": (-(1 << 15), (1 << 15) - 1),
                "i32": (-(1 << 31), (1 << 31) - 1), "i64": (-(1 << 63), (1 << 63) - 1)}[dt]
    if lo < dlo or hi > dhi:
        raise OpError(f"quantize: {attrs['bits']}-bit {'signed' if attrs['signed'] else 'unsigned'} values "
                      f"do not fit dtype {dt}")
    return [x.with_dtype(dt)]


@register_op(
    "quantize",
    inputs=("x", "scale", "zero"),
    infer=_infer_quantize,
    category=CAT,
    attrs={
        "bits": Attr("int", doc="integer width", choices=tuple(range(2, 17))),
        "signed": Attr("bool", True, doc="signed range [-2^(b-1), 2^(b-1)-1] or unsigned [0, 2^b-1]"),
        "dtype": Attr("dtype", "i8", doc="storage dtype of the result", choices=("i8", "u8", "i16", "i32", "i64")),
        **_QATTRS,
    },
)
def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, bits: int, signed: bool, dtype: str,
             axis: int | None, group_size: int) -> torch.Tensor:
    """Affine quantization ``q = clamp(round(x / scale) + zero, lo, hi)`` (round half to even).

    Granularity follows ``axis``/``group_size``: per tensor (``axis=None``, scale shape ``[]``
    or ``[1]``), per channel (scale ``[C]`` for ``C = x.shape[axis]``), or per group
    (scale shaped like x with ``ceil(C/group_size)`` at ``axis``: each run of ``group_size``
    consecutive channels, in every other position, has its own scale).  ``lo, hi`` is the
    signed or unsigned ``bits``-bit range; the result is stored as ``dtype``.
    """
    from ctc.ir.types import torch_dtype

    lo, hi = Q.qrange(bits, signed)
    s = expand_qparam(scale.to(torch.float32), tuple(x.shape), axis, group_size)
    z = expand_qparam(zero.to(torch.float32), tuple(x.shape), axis, group_size)
    return torch.clamp(torch.round(x.to(torch.float32) / s) + z, lo, hi).to(torch_dtype(dtype))


def _infer_dequantize(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    q, s, z = ins
    _int(q, "dequantize q")
    _float(s, "dequantize scale")
    _int(z, "dequantize zero")
    _check_qparam(q, s, attrs["axis"], attrs["group_size"], "dequantize scale")
    _check_qparam(q, z, attrs["axis"], attrs["group_size"], "dequantize zero")
    return [q.with_dtype(attrs["dtype"])]


@register_op(
    "dequantize",
    inputs=("q", "scale", "zero"),
    infer=_infer_dequantize,
    category=CAT,
    attrs={"dtype": Attr("dtype", "f32", doc="float result dtype", choices=tuple(sorted(FLOAT_DTYPES))), **_QATTRS},
)
def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, dtype: str, axis: int | None,
               group_size: int) -> torch.Tensor:
    """Affine dequantization ``x = (q - zero) * scale`` with the granularity of ``quantize``.

    For ``x`` within the representable range ``[(lo - zero) * scale, (hi - zero) * scale]``,
    ``|dequantize(quantize(x)) - x| <= scale / 2``.
    """
    from ctc.ir.types import torch_dtype

    s = expand_qparam(scale.to(torch.float32), tuple(q.shape), axis, group_size)
    z = expand_qparam(zero.to(torch.float32), tuple(q.shape), axis, group_size)
    return ((q.to(torch.float32) - z) * s).to(torch_dtype(dtype))


# =========================================================================== lowrank_linear
def _infer_lowrank(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, u, v, *b = ins
    r = attrs["rank"]
    _float(x, "lowrank_linear x")
    expect_rank(u, 2, "lowrank_linear u")
    expect_rank(v, 2, "lowrank_linear v")
    if x.rank < 1:
        raise OpError(f"lowrank_linear x must have rank >= 1, got {x}")
    expect_dim(u.shape[1], r, "lowrank_linear u columns vs rank")
    expect_dim(v.shape[0], r, "lowrank_linear v rows vs rank")
    expect_dim(v.shape[1], x.shape[-1], "lowrank_linear v columns vs input channels")
    if b:
        _shape(b[0], (u.shape[0],), "lowrank_linear bias")
    return [x.with_shape((*x.shape[:-1], u.shape[0]))]


@register_op("lowrank_linear", inputs=("x", "u", "v", "bias?"), infer=_infer_lowrank, category=CAT,
             attrs={"rank": Attr("int", doc="inner rank r (u is [N, r], v is [r, K])")})
def lowrank_linear(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None, *,
                   rank: int) -> torch.Tensor:
    """Factorised linear ``y = (x @ v^T) @ u^T + bias`` with ``u [N, r]``, ``v [r, K]`` (ASVD factors).

    Equals a linear with weight ``u @ v`` in exact arithmetic; costs ``r (N + K)`` instead of
    ``N K`` multiply-adds per row.
    """
    y = (x @ v.T) @ u.T
    return y + bias if bias is not None else y


# =========================================================================== channel_permute
def _infer_permute(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, p = ins
    a = norm_axis(attrs["axis"], x.rank)
    if p.dtype not in ("i64", "i32"):
        raise OpError(f"channel_permute perm must be i64 or i32, got {p}")
    _shape(p, (x.shape[a],), f"channel_permute perm (one index per channel along axis {attrs['axis']})")
    return [x]


@register_op("channel_permute", inputs=("x", "perm"), infer=_infer_permute, category=CAT,
             attrs={"axis": Attr("int", -1, doc="the channel axis")})
def channel_permute(x: torch.Tensor, perm: torch.Tensor, *, axis: int) -> torch.Tensor:
    """Gather channels: ``y.select(axis, i) = x.select(axis, perm[i])``.

    ``perm`` is a permutation of ``0..C-1`` for a true reorder (RPTQ); passes fold it into
    neighbouring weights so it normally disappears before lowering.
    """
    return torch.index_select(x, axis, perm.to(torch.int64))
