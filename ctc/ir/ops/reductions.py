"""More reductions and the ordering ops: prod, argmin, any, all, topk, sort.

Why: mixture-of-experts routers pick experts with ``topk`` (some with ``sort``), and Core ATen
reduces with ``prod``/``any``/``argmin`` where the model calls ``max(dim)``, ``all()`` or
``torch.prod``.  ``topk`` and ``sort`` have two results (values, then i64 indices).
"""

from __future__ import annotations

import torch

from ctc.ir.ops.nn import _RED_ATTRS, _reduce_shape, _reduction
from ctc.ir.ops.registry import Attr, OpError, register_op
from ctc.ir.types import INT_DTYPES, TensorType

CAT = "nn"

_reduction("prod", lambda x, a, k: _prod(x, a, k), "Product over ``axes`` (integers and bools multiply in i64).",
           lambda d: "i64" if d in INT_DTYPES or d == "bool" else d)


def _prod(x: torch.Tensor, axes: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    for a in sorted(axes, reverse=True):
        x = torch.prod(x, dim=a, keepdim=keepdim)
    return x


def _bool_reduction(name: str, fn: str) -> None:
    def infer(ins: list[TensorType], attrs: dict) -> list[TensorType]:
        (x,) = ins
        return [TensorType(_reduce_shape(x, attrs["axes"], attrs["keepdim"], name), "bool")]

    def ref(x: torch.Tensor, *, axes: tuple[int, ...], keepdim: bool) -> torch.Tensor:
        return getattr(torch, fn)(x, dim=axes, keepdim=keepdim)

    which = "any" if fn == "any" else "every"
    ref.__doc__ = f"True where {which} element over ``axes`` is non-zero; result is ``bool``."
    ref.__name__ = name
    register_op(name, inputs=("x",), infer=infer, attrs=dict(_RED_ATTRS), category=CAT)(ref)


_bool_reduction("any", "any")
_bool_reduction("all", "all")


def _infer_argmin(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    if len(attrs["axes"]) != 1:
        raise OpError(f"argmin reduces exactly one axis, got axes={list(attrs['axes'])}")
    return [TensorType(_reduce_shape(x, attrs["axes"], attrs["keepdim"], "argmin"), "i64")]


@register_op("argmin", inputs=("x",), infer=_infer_argmin, attrs=dict(_RED_ATTRS), category=CAT)
def argmin(x: torch.Tensor, *, axes: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    """Index (i64) of the first minimum along the single axis in ``axes``."""
    return torch.argmin(x, dim=axes[0], keepdim=keepdim)


# =========================================================================== topk / sort
def _infer_topk(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    a, k = attrs["axis"], attrs["k"]
    if not 0 <= a < x.rank:
        raise OpError(f"topk: axis {a} out of range for {x} (stored non-negative)")
    n = x.shape[a]
    if k < 0 or isinstance(n, int) and k > n:
        raise OpError(f"topk: k={k} out of range for axis {a} of {x}")
    shape = list(x.shape)
    shape[a] = k
    return [x.with_shape(tuple(shape)), TensorType(tuple(shape), "i64")]


@register_op("topk", inputs=("x",), infer=_infer_topk, num_outputs=2, category=CAT, attrs={
    "k": Attr("int", doc="how many elements to keep"),
    "axis": Attr("int", doc="axis searched (non-negative)"),
    "largest": Attr("bool", True, doc="the k largest (else the k smallest)"),
    "sorted": Attr("bool", True, doc="results in order (largest first when largest)"),
})
def topk(x: torch.Tensor, *, k: int, axis: int, largest: bool, sorted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest (or smallest) elements along ``axis`` and their i64 indices (torch.topk; the
    order among equal values is unspecified)."""
    v, i = torch.topk(x, k, dim=axis, largest=largest, sorted=True)
    return v, i


def _infer_sort(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    if not 0 <= attrs["axis"] < x.rank:
        raise OpError(f"sort: axis {attrs['axis']} out of range for {x} (stored non-negative)")
    return [x, x.with_dtype("i64")]


@register_op("sort", inputs=("x",), infer=_infer_sort, num_outputs=2, category=CAT, attrs={
    "axis": Attr("int", doc="sorted axis (non-negative)"),
    "descending": Attr("bool", False, doc="largest first"),
    "stable": Attr("bool", False, doc="equal elements keep their order"),
})
def sort(x: torch.Tensor, *, axis: int, descending: bool, stable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted values along ``axis`` and the i64 indices that sort them (stable: equal elements keep
    their input order)."""
    v, i = torch.sort(x, dim=axis, descending=descending, stable=True)
    return v, i


__all__: list[str] = []


def _infer_cumprod(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    if not 0 <= attrs["axis"] < x.rank:
        raise OpError(f"cumprod: axis {attrs['axis']} out of range for {x} (stored non-negative)")
    return [x.with_dtype("i64" if x.dtype in INT_DTYPES or x.dtype == "bool" else x.dtype)]


@register_op("cumprod", inputs=("x",), infer=_infer_cumprod, category=CAT,
             attrs={"axis": Attr("int", doc="scanned axis (non-negative)")})
def cumprod(x: torch.Tensor, *, axis: int) -> torch.Tensor:
    """Inclusive prefix product along ``axis`` (integers and bools accumulate in i64)."""
    return torch.cumprod(x, dim=axis)
