"""Value types of the ctc IR: dtypes and tensor types whose dims may be symbolic.

A dim is either an ``int`` or a ``str`` holding a small integer expression over
named symbols (``"s0"``, ``"s0 + 1"``, ``"2*s1"``); see :mod:`ctc.ir.symbolic`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from ctc.ir.symbolic import normalize_dim

Dim = Union[int, str]

# Short names used in IR text, mapped to torch dtypes.  Sub-byte integer dtypes
# (int4/uint4) exist only as logical element types of packed tensors: their
# storage dtype is uint8 (two values per byte).
DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f64": torch.float64,
    "i64": torch.int64,
    "i32": torch.int32,
    "i16": torch.int16,
    "i8": torch.int8,
    "u8": torch.uint8,
    "bool": torch.bool,
}
_TORCH_TO_NAME = {v: k for k, v in DTYPES.items()}

FLOAT_DTYPES = frozenset({"f32", "f16", "bf16", "f64"})
INT_DTYPES = frozenset({"i64", "i32", "i16", "i8", "u8"})


def dtype_name(dtype: torch.dtype) -> str:
    """Return the IR name of a torch dtype (``torch.float32`` -> ``"f32"``)."""
    try:
        return _TORCH_TO_NAME[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} has no ctc IR equivalent (supported: {sorted(DTYPES)})") from None


def torch_dtype(name: str) -> torch.dtype:
    """Return the torch dtype for an IR dtype name."""
    try:
        return DTYPES[name]
    except KeyError:
        raise TypeError(f"unknown dtype {name!r} (supported: {sorted(DTYPES)})") from None


@dataclass(frozen=True)
class TensorType:
    """The type of an SSA value: a shape of (possibly symbolic) dims and a dtype name."""

    shape: tuple[Dim, ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise TypeError(f"unknown dtype {self.dtype!r} (supported: {sorted(DTYPES)})")
        object.__setattr__(self, "shape", tuple(normalize_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    @property
    def symbols(self) -> set[str]:
        from ctc.ir.symbolic import free_symbols

        out: set[str] = set()
        for d in self.shape:
            if isinstance(d, str):
                out |= free_symbols(d)
        return out

    def numel(self) -> int:
        if not self.is_static:
            raise ValueError(f"numel of a symbolic type {self}")
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    def with_shape(self, shape: tuple[Dim, ...] | list[Dim]) -> TensorType:
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: str) -> TensorType:
        return TensorType(self.shape, dtype)

    @staticmethod
    def of(t: torch.Tensor) -> TensorType:
        """The static type of a concrete tensor."""
        return TensorType(tuple(int(s) for s in t.shape), dtype_name(t.dtype))

    def __str__(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"
