"""Neural-network ops: linear, matmul, layer_norm, rms_norm, reductions, softmax, cumsum.

These are the ops compression passes select and rewrite (``linear`` above all), so they
stay whole rather than decomposed.  Reductions take non-negative, sorted ``axes``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ctc.ir.ops.infer import broadcast, expect_dim
from ctc.ir.ops.registry import Attr, OpError, register_op
from ctc.ir.types import DTYPES, FLOAT_DTYPES, INT_DTYPES, TensorType, dtype_name, torch_dtype

CAT = "nn"


def _float(t: TensorType, what: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise OpError(f"{what} must be a float tensor, got {t}")


# =========================================================================== linear / matmul
def _infer_linear(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, w, *b = ins
    _float(x, "linear x")
    if x.rank < 1 or w.rank != 2:
        raise OpError(f"linear needs x[..., in] and weight[out, in], got {x} and {w}")
    if w.dtype != x.dtype:
        raise OpError(f"linear: weight dtype {w.dtype} differs from x dtype {x.dtype}")
    expect_dim(x.shape[-1], w.shape[1], f"linear: x {x} last dim vs weight {w} in-features")
    if b:
        if b[0].rank != 1 or b[0].dtype != x.dtype:
            raise OpError(f"linear: bias must be [out] of x's dtype, got {b[0]}")
        expect_dim(b[0].shape[0], w.shape[0], "linear: bias length vs weight out-features")
    return [x.with_shape((*x.shape[:-1], w.shape[0]))]


@register_op("linear", inputs=("x", "weight", "bias?"), infer=_infer_linear, category=CAT)
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Affine map ``y = x @ weight^T + bias`` with ``weight [out, in]`` (torch.nn.Linear layout)."""
    return F.linear(x, weight, bias)


def _infer_matmul(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    a, b = ins
    if a.dtype != b.dtype:
        raise OpError(f"matmul: dtypes differ ({a} vs {b})")
    if a.rank < 1 or b.rank < 1:
        raise OpError(f"matmul needs rank >= 1 operands, got {a} and {b}")
    ak = a.shape[-1]
    bk = b.shape[-2] if b.rank >= 2 else b.shape[0]
    expect_dim(ak, bk, f"matmul: contraction dim of {a} vs {b}")
    if a.rank == 1 and b.rank == 1:
        return [TensorType((), a.dtype)]
    if a.rank == 1:
        return [TensorType((*b.shape[:-2], b.shape[-1]), a.dtype)]
    if b.rank == 1:
        return [TensorType(a.shape[:-1], a.dtype)]
    batch = broadcast(a.shape[:-2], b.shape[:-2])
    return [TensorType((*batch, a.shape[-2], b.shape[-1]), a.dtype)]


@register_op("matmul", inputs=("a", "b"), infer=_infer_matmul, category=CAT)
def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Matrix product with batch broadcasting (torch.matmul semantics, 1-D operands included)."""
    return torch.matmul(a, b)


# =========================================================================== norms
def _infer_layer_norm(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, *wb = ins
    _float(x, "layer_norm x")
    n = attrs["normalized_ndim"]
    if not 1 <= n <= x.rank:
        raise OpError(f"layer_norm: normalized_ndim {n} out of range for {x}")
    norm_shape = x.shape[x.rank - n:]
    for t, what in zip(wb, ("weight", "bias"), strict=False):
        if t.rank != n or t.dtype != x.dtype:
            raise OpError(f"layer_norm: {what} must be {list(norm_shape)} of x's dtype, got {t}")
        for d, e in zip(t.shape, norm_shape, strict=False):
            expect_dim(d, e, f"layer_norm {what}")
    return [x]


@register_op("layer_norm", inputs=("x", "weight?", "bias?"), infer=_infer_layer_norm, category=CAT, attrs={
    "eps": Attr("float", 1e-5, doc="added to the variance"),
    "normalized_ndim": Attr("int", 1, doc="number of trailing axes normalized together"),
})
def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
               eps: float, normalized_ndim: int) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the trailing ``normalized_ndim`` axes
    (biased variance; torch.nn.functional.layer_norm)."""
    return F.layer_norm(x, tuple(x.shape[x.dim() - normalized_ndim:]), weight, bias, eps)


def _infer_rms_norm(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, w = ins
    _float(x, "rms_norm x")
    if w.rank != 1:
        raise OpError(f"rms_norm weight must be 1-D, got {w}")
    expect_dim(w.shape[0], x.shape[-1], "rms_norm weight vs last dim of x")
    return [x.with_dtype(dtype_name(torch.promote_types(torch_dtype(x.dtype), torch_dtype(w.dtype))))]


@register_op("rms_norm", inputs=("x", "weight"), infer=_infer_rms_norm, category=CAT,
             attrs={"eps": Attr("float", 1e-6, doc="added to the mean square")})
def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis, Llama convention: ``h = x.float()``,
    ``h = h * rsqrt(mean(h^2) + eps)``, result ``weight * h.to(x.dtype)``."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


# =========================================================================== reductions
def _reduce_shape(x: TensorType, axes: tuple[int, ...], keepdim: bool, op: str) -> tuple:
    if not axes:
        raise OpError(f"{op}: axes must not be empty")
    if list(axes) != sorted(set(axes)) or any(not 0 <= a < x.rank for a in axes):
        raise OpError(f"{op}: axes {list(axes)} must be sorted, distinct and in 0..{x.rank - 1} for {x}")
    if keepdim:
        return tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    return tuple(d for i, d in enumerate(x.shape) if i not in axes)


_RED_ATTRS = {"axes": Attr("ints", doc="reduced axes (sorted, non-negative)"),
              "keepdim": Attr("bool", False, doc="keep reduced axes as size 1")}


def _reduction(name: str, fn: Callable[..., torch.Tensor], doc: str, result: Callable[[str], str],
               floats_only: bool = False) -> None:
    def infer(ins: list[TensorType], attrs: dict) -> list[TensorType]:
        (x,) = ins
        if floats_only:
            _float(x, f"{name} input")
        return [TensorType(_reduce_shape(x, attrs["axes"], attrs["keepdim"], name), result(x.dtype))]

    def ref(x: torch.Tensor, *, axes: tuple[int, ...], keepdim: bool) -> torch.Tensor:
        return fn(x, axes, keepdim)

    ref.__doc__ = doc
    ref.__name__ = name
    register_op(name, inputs=("x",), infer=infer, attrs=dict(_RED_ATTRS), category=CAT)(ref)


_reduction("sum", lambda x, a, k: torch.sum(x, dim=a, keepdim=k), "Sum over ``axes`` (integers and bools sum to i64).",
           lambda d: "i64" if d in INT_DTYPES or d == "bool" else d)
_reduction("mean", lambda x, a, k: torch.mean(x, dim=a, keepdim=k), "Arithmetic mean over ``axes``.",
           lambda d: d, floats_only=True)
_reduction("amax", lambda x, a, k: torch.amax(x, dim=a, keepdim=k), "Maximum over ``axes``.", lambda d: d)
_reduction("amin", lambda x, a, k: torch.amin(x, dim=a, keepdim=k), "Minimum over ``axes``.", lambda d: d)


def _infer_argmax(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    if len(attrs["axes"]) != 1:
        raise OpError(f"argmax reduces exactly one axis, got axes={list(attrs['axes'])}")
    return [TensorType(_reduce_shape(x, attrs["axes"], attrs["keepdim"], "argmax"), "i64")]


@register_op("argmax", inputs=("x",), infer=_infer_argmax, attrs=dict(_RED_ATTRS), category=CAT)
def argmax(x: torch.Tensor, *, axes: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    """Index (i64) of the first maximum along the single axis in ``axes``."""
    return torch.argmax(x, dim=axes[0], keepdim=keepdim)


# =========================================================================== softmax / cumsum
def _infer_softmax(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    _float(x, "softmax input")
    if not 0 <= attrs["axis"] < x.rank:
        raise OpError(f"softmax: axis {attrs['axis']} out of range for {x} (stored non-negative)")
    return [x]


@register_op("softmax", inputs=("x",), infer=_infer_softmax, category=CAT,
             attrs={"axis": Attr("int", doc="normalized axis (non-negative)")})
def softmax(x: torch.Tensor, *, axis: int) -> torch.Tensor:
    """``exp(x) / sum(exp(x))`` along ``axis`` (numerically stable)."""
    return torch.softmax(x, dim=axis)


@register_op("log_softmax", inputs=("x",), infer=_infer_softmax, category=CAT,
             attrs={"axis": Attr("int", doc="normalized axis (non-negative)")})
def log_softmax(x: torch.Tensor, *, axis: int) -> torch.Tensor:
    """``x - logsumexp(x)`` along ``axis``."""
    return torch.log_softmax(x, dim=axis)


def _infer_cumsum(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    if not 0 <= attrs["axis"] < x.rank:
        raise OpError(f"cumsum: axis {attrs['axis']} out of range for {x} (stored non-negative)")
    dt = attrs["dtype"]
    if dt is None:
        dt = "i64" if x.dtype in INT_DTYPES or x.dtype == "bool" else x.dtype
    return [x.with_dtype(dt)]


@register_op("cumsum", inputs=("x",), infer=_infer_cumsum, category=CAT, attrs={
    "axis": Attr("int", doc="scanned axis (non-negative)"),
    "dtype": Attr("opt_str", None, doc="result dtype; default i64 for integer/bool input, else x's dtype",
                  choices=(None, *sorted(DTYPES))),
})
def cumsum(x: torch.Tensor, *, axis: int, dtype: str | None) -> torch.Tensor:
    """Inclusive prefix sum along ``axis`` (integers and bools accumulate in i64 unless ``dtype``)."""
    return torch.cumsum(x, dim=axis, dtype=torch_dtype(dtype) if dtype is not None else None)
