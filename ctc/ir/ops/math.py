"""More elementwise math: the rest of Core ATen's unary and binary ops, and the activations of
vision and audio models (hardswish, hardsigmoid, softplus, mish, elu, leaky_relu).

Why ops and not compositions: each is one Core ATen op (or one ``torch.nn.functional`` activation
that ``torch.export`` keeps whole), so the captured graph reads like the model, passes see one
activation per site, and backends pick one kernel.  Type rules follow
:mod:`ctc.ir.ops.elementwise`: binary operands share a dtype (or one is the ``scalar``
attribute), shapes broadcast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ctc.ir.ops.elementwise import _binary, _binary_infer, _infer_unary_float, _unary
from ctc.ir.ops.registry import Attr, OpError, register_op
from ctc.ir.types import FLOAT_DTYPES, TensorType

CAT = "elementwise"

# =========================================================================== unary math
_unary("acos", torch.acos, "Elementwise arc cosine.")
_unary("acosh", torch.acosh, "Elementwise inverse hyperbolic cosine.")
_unary("asin", torch.asin, "Elementwise arc sine.")
_unary("asinh", torch.asinh, "Elementwise inverse hyperbolic sine.")
_unary("atan", torch.atan, "Elementwise arc tangent.")
_unary("atanh", torch.atanh, "Elementwise inverse hyperbolic tangent.")
_unary("cosh", torch.cosh, "Elementwise hyperbolic cosine.")
_unary("sinh", torch.sinh, "Elementwise hyperbolic sine.")
_unary("tan", torch.tan, "Elementwise tangent.")
_unary("expm1", torch.expm1, "Elementwise ``e^x - 1`` (accurate near 0).")
_unary("log1p", torch.log1p, "Elementwise ``log(1 + x)`` (accurate near 0).")
_unary("log2", torch.log2, "Elementwise base-2 logarithm.")
_unary("log10", torch.log10, "Elementwise base-10 logarithm.")
_unary("floor", torch.floor, "Elementwise round toward -inf (integers unchanged).", floats_only=False)
_unary("ceil", torch.ceil, "Elementwise round toward +inf (integers unchanged).", floats_only=False)
_unary("round", torch.round, "Elementwise round half to even (integers unchanged).", floats_only=False)
_unary("trunc", torch.trunc, "Elementwise round toward zero (integers unchanged).", floats_only=False)
_unary("sign", torch.sign, "Elementwise sign: -1, 0 or 1 in the input's dtype.", floats_only=False)


def _infer_predicate(name: str) -> Callable[[list[TensorType], dict], list[TensorType]]:
    def infer(ins: list[TensorType], attrs: dict) -> list[TensorType]:
        return [ins[0].with_dtype("bool")]

    return infer


@register_op("isnan", inputs=("x",), infer=_infer_predicate("isnan"), category=CAT)
def isnan(x: torch.Tensor) -> torch.Tensor:
    """True where ``x`` is NaN (always false for integers); result is ``bool``."""
    return torch.isnan(x)


@register_op("isinf", inputs=("x",), infer=_infer_predicate("isinf"), category=CAT)
def isinf(x: torch.Tensor) -> torch.Tensor:
    """True where ``x`` is +inf or -inf (always false for integers); result is ``bool``."""
    return torch.isinf(x)


# =========================================================================== activations
@register_op("hardswish", inputs=("x",), infer=_infer_unary_float("hardswish"), category=CAT)
def hardswish(x: torch.Tensor) -> torch.Tensor:
    """``x * relu6(x + 3) / 6`` (MobileNetV3, EfficientNet-Lite)."""
    return F.hardswish(x)


@register_op("hardsigmoid", inputs=("x",), infer=_infer_unary_float("hardsigmoid"), category=CAT)
def hardsigmoid(x: torch.Tensor) -> torch.Tensor:
    """``relu6(x + 3) / 6``: a piecewise-linear sigmoid."""
    return F.hardsigmoid(x)


@register_op("softplus", inputs=("x",), infer=_infer_unary_float("softplus"), category=CAT, attrs={
    "beta": Attr("float", 1.0, doc="sharpness"),
    "threshold": Attr("float", 20.0, doc="above beta*x > threshold the result is x (linear regime)"),
})
def softplus(x: torch.Tensor, *, beta: float, threshold: float) -> torch.Tensor:
    """``log(1 + exp(beta * x)) / beta``, and ``x`` where ``beta * x > threshold``."""
    return F.softplus(x, beta=beta, threshold=threshold)


@register_op("mish", inputs=("x",), infer=_infer_unary_float("mish"), category=CAT)
def mish(x: torch.Tensor) -> torch.Tensor:
    """``x * tanh(softplus(x))``."""
    return F.mish(x)


@register_op("elu", inputs=("x",), infer=_infer_unary_float("elu"), category=CAT, attrs={
    "alpha": Attr("float", 1.0, doc="negative-side scale"),
    "scale": Attr("float", 1.0, doc="output scale (SELU: 1.0507...)"),
    "input_scale": Attr("float", 1.0, doc="scale of x inside the exponential (CELU: 1/alpha)"),
})
def elu(x: torch.Tensor, *, alpha: float, scale: float, input_scale: float) -> torch.Tensor:
    """``scale * x`` for ``x > 0``, else ``scale * alpha * (exp(input_scale * x) - 1)`` (ELU, SELU, CELU:
    torch's ``aten.elu``)."""
    return torch.ops.aten.elu(x, alpha, scale, input_scale)


@register_op("leaky_relu", inputs=("x",), infer=_infer_unary_float("leaky_relu"), category=CAT,
             attrs={"negative_slope": Attr("float", 0.01, doc="slope for x < 0")})
def leaky_relu(x: torch.Tensor, *, negative_slope: float) -> torch.Tensor:
    """``x`` for ``x > 0``, else ``negative_slope * x``."""
    return F.leaky_relu(x, negative_slope)


# =========================================================================== binary
_binary("atan2", torch.atan2, "Elementwise ``atan2(a, b)`` (angle of the point (b, a)).",
        infer=_binary_infer("atan2", floats=True))
_binary("fmod", torch.fmod, "Elementwise C remainder (sign of the dividend); integer division by zero is undefined.",
        infer=_binary_infer("fmod", no_bool=True))
_binary("remainder", torch.remainder,
        "Elementwise Python remainder (sign of the divisor); integer division by zero is undefined.",
        infer=_binary_infer("remainder", no_bool=True))
_binary("floor_divide", lambda a, b: torch.div(a, b, rounding_mode="floor"),
        "Elementwise ``floor(a / b)`` in the operands' dtype (torch ``div(rounding_mode='floor')``).",
        infer=_binary_infer("floor_divide", no_bool=True))
_binary("trunc_divide", lambda a, b: torch.div(a, b, rounding_mode="trunc"),
        "Elementwise ``trunc(a / b)`` in the operands' dtype (torch ``div(rounding_mode='trunc')``).",
        infer=_binary_infer("trunc_divide", no_bool=True))
_binary("bitwise_and", torch.bitwise_and, "Elementwise bitwise and of integers (logical and of bools).",
        infer=_binary_infer("bitwise_and", ints=True))
_binary("bitwise_or", torch.bitwise_or, "Elementwise bitwise or of integers (logical or of bools).",
        infer=_binary_infer("bitwise_or", ints=True))
_binary("bitwise_xor", torch.bitwise_xor, "Elementwise bitwise xor of integers (logical xor of bools).",
        infer=_binary_infer("bitwise_xor", ints=True))
_binary("logical_xor", torch.logical_xor, "Elementwise logical xor (non-zero is true); result is ``bool``.",
        infer=_binary_infer("logical_xor", result="bool"))


def _infer_bitwise_not(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    if x.dtype in FLOAT_DTYPES:
        raise OpError(f"bitwise_not needs an integer or bool tensor, got {x}")
    return [x]


@register_op("bitwise_not", inputs=("x",), infer=_infer_bitwise_not, category=CAT)
def bitwise_not(x: torch.Tensor) -> torch.Tensor:
    """Elementwise bitwise complement of integers (logical not of bools)."""
    return torch.bitwise_not(x)


UNARY_MATH = ("acos", "acosh", "asin", "asinh", "atan", "atanh", "cosh", "sinh", "tan", "expm1", "log1p", "log2",
              "log10", "floor", "ceil", "round", "trunc", "sign")
BINARY_MATH = ("atan2", "fmod", "remainder", "floor_divide", "trunc_divide", "bitwise_and", "bitwise_or",
               "bitwise_xor", "logical_xor")
ACTIVATIONS = ("hardswish", "hardsigmoid", "softplus", "mish", "elu", "leaky_relu")

__all__ = ["ACTIVATIONS", "BINARY_MATH", "UNARY_MATH"]
