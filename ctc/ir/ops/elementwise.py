"""Elementwise ops: unary math and activations, binary arithmetic and comparisons, where, cast.

Type rules are explicit rather than promoting: binary operands must share a dtype (the
frontend inserts ``cast`` where torch would promote), a scalar operand (``scalar`` attr)
takes the tensor's dtype, comparisons give ``bool``.  ``reverse=True`` puts the scalar on
the left (``2 - x``, ``1 / x``).  Shapes broadcast numpy-style, symbolic dims included.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ctc.ir.ops.infer import broadcast
from ctc.ir.ops.registry import Attr, OpError, Presence, Scalar, register_op
from ctc.ir.types import FLOAT_DTYPES, TensorType, torch_dtype

CAT = "elementwise"


# =========================================================================== unary
def _infer_unary_float(name: str) -> Callable[[list[TensorType], dict], list[TensorType]]:
    def infer(ins: list[TensorType], attrs: dict) -> list[TensorType]:
        (x,) = ins
        if x.dtype not in FLOAT_DTYPES:
            raise OpError(f"{name} needs a float tensor, got {x} (cast it first)")
        return [x]

    return infer


def _infer_unary_any(name: str) -> Callable[[list[TensorType], dict], list[TensorType]]:
    def infer(ins: list[TensorType], attrs: dict) -> list[TensorType]:
        (x,) = ins
        if x.dtype == "bool":
            raise OpError(f"{name} is not defined on bool tensors, got {x}")
        return [x]

    return infer


def _unary(name: str, fn: Callable[[torch.Tensor], torch.Tensor], doc: str, *, floats_only: bool = True) -> None:
    def ref(x: torch.Tensor) -> torch.Tensor:
        return fn(x)

    ref.__doc__ = doc
    ref.__name__ = name
    infer = _infer_unary_float(name) if floats_only else _infer_unary_any(name)
    register_op(name, inputs=("x",), infer=infer, category=CAT)(ref)


_unary("neg", torch.neg, "Elementwise negation ``-x`` (float or integer).", floats_only=False)
_unary("abs", torch.abs, "Elementwise absolute value (float or integer).", floats_only=False)
_unary("exp", torch.exp, "Elementwise ``e^x``.")
_unary("log", torch.log, "Elementwise natural logarithm.")
_unary("sqrt", torch.sqrt, "Elementwise square root.")
_unary("rsqrt", torch.rsqrt, "Elementwise ``1/sqrt(x)``.")
_unary("tanh", torch.tanh, "Elementwise hyperbolic tangent.")
_unary("sigmoid", torch.sigmoid, "Elementwise logistic sigmoid ``1/(1+e^-x)``.")
_unary("relu", torch.relu, "Elementwise ``max(x, 0)``.")
_unary("silu", F.silu, "Elementwise SiLU / swish ``x * sigmoid(x)``.")
_unary("sin", torch.sin, "Elementwise sine.")
_unary("cos", torch.cos, "Elementwise cosine.")
_unary("erf", torch.erf, "Elementwise Gauss error function.")
_unary("reciprocal", torch.reciprocal, "Elementwise ``1/x``.")


@register_op("gelu", inputs=("x",), infer=_infer_unary_float("gelu"), category=CAT,
             attrs={"approximate": Attr("str", "none", doc="'none' (erf form) or 'tanh' approximation",
                                        choices=("none", "tanh"))})
def gelu(x: torch.Tensor, *, approximate: str) -> torch.Tensor:
    """GELU activation ``x * Phi(x)``; ``approximate='tanh'`` uses the tanh formula (torch semantics)."""
    return F.gelu(x, approximate=approximate)


def _infer_logical_not(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    return [ins[0].with_dtype("bool")]


@register_op("logical_not", inputs=("x",), infer=_infer_logical_not, category=CAT)
def logical_not(x: torch.Tensor) -> torch.Tensor:
    """Elementwise logical negation; non-zero is true.  Result is ``bool``."""
    return torch.logical_not(x)


def _infer_cast(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    return [ins[0].with_dtype(attrs["dtype"])]


@register_op("cast", inputs=("x",), infer=_infer_cast, category=CAT,
             attrs={"dtype": Attr("dtype", doc="result element type")})
def cast(x: torch.Tensor, *, dtype: str) -> torch.Tensor:
    """Convert elements to ``dtype`` (torch ``Tensor.to`` semantics: floats truncate toward zero into ints)."""
    return x.to(torch_dtype(dtype))


# =========================================================================== binary
_SCALAR_ATTRS = {
    "scalar": Attr("opt_float", None, doc="scalar second operand (then the op takes one tensor)"),
    "reverse": Attr("bool", False, doc="with scalar: compute op(scalar, x) instead of op(x, scalar)"),
}

COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge")
LOGICAL = ("logical_and", "logical_or")
ARITH = ("add", "sub", "mul", "div", "pow", "maximum", "minimum")


def _binary_infer(name: str, *, floats: bool = False, ints: bool = False, no_bool: bool = False,
                  result: str | None = None) -> Callable[[list[TensorType], dict], list[TensorType]]:
    """Type rule of a binary op: operand dtypes equal (or one tensor and the ``scalar`` attribute),
    shapes broadcast.  ``floats``/``ints``/``no_bool`` restrict the operand kind; ``result`` fixes
    the result dtype (``bool`` for comparisons)."""
    def infer(ins: list[TensorType], attrs: dict) -> list[TensorType]:
        scalar = attrs["scalar"]
        if scalar is None:
            if len(ins) != 2:
                raise OpError(f"{name} takes two tensors, or one tensor and the 'scalar' attribute")
            a, b = ins
            if name not in LOGICAL and a.dtype != b.dtype:
                raise OpError(f"{name}: operand dtypes differ ({a} vs {b}); cast one first")
            shape = broadcast(a.shape, b.shape)
        else:
            if len(ins) != 1:
                raise OpError(f"{name} with a 'scalar' attribute takes exactly one tensor, got {len(ins)}")
            a = ins[0]
            shape = a.shape
        if attrs["reverse"] and scalar is None:
            raise OpError(f"{name}: reverse=true needs the 'scalar' attribute")
        if (floats or name in ("div", "pow")) and a.dtype not in FLOAT_DTYPES:
            raise OpError(f"{name} needs float operands, got {a} (cast first)")
        if ints and a.dtype in FLOAT_DTYPES:
            raise OpError(f"{name} needs integer or bool operands, got {a}")
        if (name in ARITH or no_bool) and a.dtype == "bool":
            raise OpError(f"{name} is not defined on bool tensors")
        dtype = result or ("bool" if name in COMPARISONS or name in LOGICAL else a.dtype)
        return [TensorType(shape, dtype)]

    return infer


def _scalar_for(x: torch.Tensor, s: float) -> float | int | bool:
    """The scalar in the tensor's kind: integral tensors take an int, bool tensors a bool."""
    if x.dtype == torch.bool:
        return bool(s)
    if not x.dtype.is_floating_point:
        if s != int(s):
            raise OpError(f"scalar {s} is not integral but the tensor is {x.dtype}")
        return int(s)
    return s


def _binary_layout(attrs: Mapping[str, Any]) -> dict[str, Presence]:
    """``a``/``b`` from the ``scalar``/``reverse`` attributes: the scalar is ``b``, or ``a`` when reversed."""
    s = attrs.get("scalar")
    if s is None:
        return {"a": True, "b": True}
    sc = Scalar(float(s), "scalar")
    return {"a": sc, "b": True} if attrs.get("reverse") else {"a": True, "b": sc}


def _binary(name: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], doc: str,
            infer: Callable[[list[TensorType], dict], list[TensorType]] | None = None) -> None:
    def ref(a: torch.Tensor, b: torch.Tensor | None = None, *, scalar: float | None, reverse: bool) -> torch.Tensor:
        if scalar is not None:
            s = torch.tensor(_scalar_for(a, scalar), dtype=a.dtype)
            return fn(s, a) if reverse else fn(a, s)
        assert b is not None
        return fn(a, b)

    ref.__doc__ = doc + (" Shapes broadcast; with the ``scalar`` attribute the second operand is that "
                         "scalar in the tensor's dtype (first operand when ``reverse``).")
    ref.__name__ = name
    register_op(name, inputs=("a", "b?"), infer=infer or _binary_infer(name), attrs=dict(_SCALAR_ATTRS),
                category=CAT, layout=_binary_layout)(ref)


_binary("add", torch.add, "Elementwise ``a + b``.")
_binary("sub", torch.sub, "Elementwise ``a - b``.")
_binary("mul", torch.mul, "Elementwise ``a * b``.")
_binary("div", torch.div, "Elementwise true division ``a / b`` (float operands).")
_binary("pow", torch.pow, "Elementwise power ``a ** b`` (float operands).")
_binary("maximum", torch.maximum, "Elementwise maximum (NaN propagates).")
_binary("minimum", torch.minimum, "Elementwise minimum (NaN propagates).")
_binary("eq", torch.eq, "Elementwise ``a == b``; result is ``bool``.")
_binary("ne", torch.ne, "Elementwise ``a != b``; result is ``bool``.")
_binary("lt", torch.lt, "Elementwise ``a < b``; result is ``bool``.")
_binary("le", torch.le, "Elementwise ``a <= b``; result is ``bool``.")
_binary("gt", torch.gt, "Elementwise ``a > b``; result is ``bool``.")
_binary("ge", torch.ge, "Elementwise ``a >= b``; result is ``bool``.")
_binary("logical_and", torch.logical_and, "Elementwise logical and (non-zero is true); result is ``bool``.")
_binary("logical_or", torch.logical_or, "Elementwise logical or (non-zero is true); result is ``bool``.")


# =========================================================================== where
def _infer_where(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    sa, sb = attrs["a_scalar"], attrs["b_scalar"]
    want = 3 - (sa is not None) - (sb is not None)
    if len(ins) != want:
        raise OpError(f"where takes {want} tensors (cond{'' if sa is not None else ', a'}"
                      f"{'' if sb is not None else ', b'}) with these scalar attributes, got {len(ins)}")
    cond, *vals = ins
    if cond.dtype != "bool":
        raise OpError(f"where: cond must be bool, got {cond}")
    if not vals:
        raise OpError("where: at least one of a and b must be a tensor (a_scalar and b_scalar both set)")
    if len(vals) == 2 and vals[0].dtype != vals[1].dtype:
        raise OpError(f"where: a and b dtypes differ ({vals[0]} vs {vals[1]}); cast one first")
    return [TensorType(broadcast(cond.shape, *(v.shape for v in vals)), vals[0].dtype)]


def _where_layout(attrs: Mapping[str, Any]) -> dict[str, Presence]:
    """``a``/``b`` are tensors unless ``a_scalar``/``b_scalar`` give them."""
    sa, sb = attrs.get("a_scalar"), attrs.get("b_scalar")
    return {"a": True if sa is None else Scalar(float(sa), "a_scalar"),
            "b": True if sb is None else Scalar(float(sb), "b_scalar")}


@register_op("where", inputs=("cond", "a?", "b?"), infer=_infer_where, category=CAT, layout=_where_layout, attrs={
    "a_scalar": Attr("opt_float", None, doc="scalar used where cond is true (then a is not an operand)"),
    "b_scalar": Attr("opt_float", None, doc="scalar used where cond is false (then b is not an operand)"),
})
def where(cond: torch.Tensor, *vals: torch.Tensor, a_scalar: float | None, b_scalar: float | None) -> torch.Tensor:
    """Select ``a`` where ``cond`` else ``b`` (broadcast); either side may be a scalar attribute
    (in the dtype of the tensor side)."""
    it = iter(vals)
    a = next(it) if a_scalar is None else None
    b = next(it) if b_scalar is None else None
    ref = a if a is not None else b
    assert ref is not None
    if a is None:
        a = torch.tensor(_scalar_for(ref, a_scalar), dtype=ref.dtype)  # type: ignore[arg-type]
    if b is None:
        b = torch.tensor(_scalar_for(ref, b_scalar), dtype=ref.dtype)  # type: ignore[arg-type]
    return torch.where(cond, a, b)


__all__ = ["ARITH", "COMPARISONS", "LOGICAL"]
