"""Core ops: parameter reads and constants."""

from __future__ import annotations

import torch

from ctc.ir.ops.registry import Attr, OpError, register_op
from ctc.ir.types import TensorType, torch_dtype


def _no_infer(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    raise OpError("param: output type comes from the parameter tensor; build it with Module.param()")


@register_op("param", inputs=(), infer=_no_infer, attrs={"name": Attr("str", doc="parameter name in Module.params")})
def param(*, name: str) -> torch.Tensor:
    """Read the module parameter called ``name`` (the interpreter and backends supply it)."""
    raise OpError("param is evaluated by the interpreter from Module.params")


def _infer_full(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    return [TensorType(tuple(attrs["shape"]), attrs["dtype"])]


@register_op(
    "full",
    inputs=(),
    infer=_infer_full,
    attrs={
        "shape": Attr("dims", doc="output shape (may be symbolic)"),
        "value": Attr("float", doc="fill value"),
        "dtype": Attr("dtype", "f32", doc="element type"),
    },
)
def full(*, shape: tuple[int, ...], value: float, dtype: str) -> torch.Tensor:
    """A tensor of ``shape`` filled with ``value`` (symbolic dims resolved by the caller)."""
    return torch.full(tuple(shape), value, dtype=torch_dtype(dtype))
