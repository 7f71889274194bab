"""Functional writes and reorderings: scatter (with reductions), index_put, slice_scatter, flip.

Why: ``torch.export`` functionalizes in-place writes (``x[idx] = v``, ``index_add_``,
``x[:, 2:4] = y``, ``scatter_``) into these Core ATen ops, and mixture-of-experts and mask
code uses them.  Each returns a new tensor; the input is never modified.
"""

from __future__ import annotations

import torch

from ctc.ir.ops.infer import broadcast, expect_dim
from ctc.ir.ops.registry import Attr, OpError, register_op
from ctc.ir.ops.shape import index_axes, index_result_shape, slice_len
from ctc.ir.symbolic import dims_equal
from ctc.ir.types import INT_DTYPES, TensorType

CAT = "shape"

SCATTER_REDUCTIONS = ("none", "sum", "prod", "mean", "amax", "amin")


def _int_index(t: TensorType, what: str) -> None:
    if t.dtype not in INT_DTYPES:
        raise OpError(f"{what} must be an integer tensor, got {t}")


def _infer_scatter(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, idx, *src = ins
    a = attrs["axis"]
    if not 0 <= a < x.rank:
        raise OpError(f"scatter: axis {a} out of range for {x} (stored non-negative)")
    _int_index(idx, "scatter index")
    if idx.rank != x.rank:
        raise OpError(f"scatter: index rank must equal input rank ({idx} vs {x})")
    if src:
        if attrs["value"] is not None:
            raise OpError("scatter: give either a src operand or the value attribute, not both")
        if src[0].rank != x.rank or src[0].dtype != x.dtype:
            raise OpError(f"scatter: src must have x's rank and dtype, got {src[0]} for {x}")
    elif attrs["value"] is None:
        raise OpError("scatter needs a src operand or the value attribute")
    elif attrs["reduce"] != "none":
        raise OpError("scatter: a reduction needs a src tensor (value scatters only overwrite)")
    return [x]


@register_op("scatter", inputs=("x", "index", "src?"), infer=_infer_scatter, category=CAT, attrs={
    "axis": Attr("int", doc="axis written along (non-negative)"),
    "reduce": Attr("str", "none", doc="how written values combine", choices=SCATTER_REDUCTIONS),
    "include_self": Attr("bool", True, doc="with a reduction: x's own value takes part in it"),
    "value": Attr("opt_float", None, doc="scalar written instead of src (reduce none only)"),
})
def scatter(x: torch.Tensor, index: torch.Tensor, src: torch.Tensor | None = None, *, axis: int, reduce: str,
            include_self: bool, value: float | None) -> torch.Tensor:
    """``out = x`` with ``out[..., index[i, j, k], ...] = src[i, j, k]`` along ``axis`` (torch.scatter);
    with ``reduce`` the written values and (``include_self``) x's value are summed, multiplied,
    averaged or max/min-ed (torch.scatter_reduce).  Duplicate indices without a reduction write an
    unspecified one of the values."""
    if src is None:
        assert value is not None
        return x.scatter(axis, index, value)
    if reduce == "none":
        return x.scatter(axis, index, src)
    return x.scatter_reduce(axis, index, src, reduce, include_self=include_self)


def _infer_index_put(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, values, *idx = ins
    if not idx:
        raise OpError("index_put needs at least one index tensor")
    for t in idx:
        _int_index(t, "index_put index")
    if values.dtype != x.dtype:
        raise OpError(f"index_put: values dtype must be x's ({values} vs {x})")
    axes = index_axes(x.rank, len(idx), attrs["axes"])
    target = index_result_shape(x.shape, axes, broadcast(*(t.shape for t in idx)))
    shape = broadcast(values.shape, target)
    if len(shape) != len(target) or not all(dims_equal(a, b) for a, b in zip(shape, target, strict=True)):
        raise OpError(f"index_put: values {values} do not broadcast to the indexed shape {list(target)}")
    return [x]


@register_op("index_put", inputs=("x", "values", "*indices"), infer=_infer_index_put, category=CAT, attrs={
    "axes": Attr("opt_ints", None, doc="axis of x each index tensor selects on (increasing); none = the leading axes"),
    "accumulate": Attr("bool", False, doc="add values to x's (duplicates all add) instead of overwriting"),
})
def index_put(x: torch.Tensor, values: torch.Tensor, *indices: torch.Tensor, axes: tuple[int, ...] | None,
              accumulate: bool) -> torch.Tensor:
    """``out = x`` with ``out[idx] = values`` (or ``+= values`` when ``accumulate``), ``idx`` the
    advanced index of :func:`ctc.ir.ops.shape.index`; values broadcast to the indexed shape."""
    ax = index_axes(x.dim(), len(indices), axes)
    key: list[torch.Tensor | None] = [None] * (ax[-1] + 1)
    for a, t in zip(ax, indices, strict=True):
        key[a] = t
    return torch.ops.aten.index_put(x, key, values, accumulate)


def _infer_slice_scatter(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, src = ins
    a, step = attrs["axis"], attrs["step"]
    if not 0 <= a < x.rank:
        raise OpError(f"slice_scatter: axis {a} out of range for {x}")
    if step < 1:
        raise OpError(f"slice_scatter: step must be >= 1, got {step}")
    if src.rank != x.rank or src.dtype != x.dtype:
        raise OpError(f"slice_scatter: src must have x's rank and dtype ({src} vs {x})")
    start, end = attrs["start"][0], attrs["end"][0]
    for i, (d, e) in enumerate(zip(x.shape, src.shape, strict=True)):
        expect_dim(slice_len(start, end, step) if i == a else d, e, f"slice_scatter: src dim {i}")
    return [x]


@register_op("slice_scatter", inputs=("x", "src"), infer=_infer_slice_scatter, category=CAT, attrs={
    "axis": Attr("int", doc="sliced axis"),
    "start": Attr("dims", doc="[start] (one element, may be symbolic)"),
    "end": Attr("dims", doc="[end], exclusive (one element, may be symbolic)"),
    "step": Attr("int", 1, doc="stride >= 1"),
})
def slice_scatter(x: torch.Tensor, src: torch.Tensor, *, axis: int, start: tuple[int], end: tuple[int],
                  step: int) -> torch.Tensor:
    """``out = x`` with ``out[..., start:end:step, ...] = src`` along ``axis`` (canonical bounds)."""
    return torch.slice_scatter(x, src, axis, start[0], end[0], step)


def _infer_flip(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    axes = attrs["axes"]
    if not axes or list(axes) != sorted(set(axes)) or any(not 0 <= a < x.rank for a in axes):
        raise OpError(f"flip: axes {list(axes)} must be non-empty, sorted, distinct and in 0..{x.rank - 1}")
    return [x]


@register_op("flip", inputs=("x",), infer=_infer_flip, category=CAT,
             attrs={"axes": Attr("ints", doc="reversed axes (sorted, non-negative)")})
def flip(x: torch.Tensor, *, axes: tuple[int, ...]) -> torch.Tensor:
    """Reverse the order of elements along ``axes``."""
    return torch.flip(x, axes)


__all__ = ["SCATTER_REDUCTIONS"]
