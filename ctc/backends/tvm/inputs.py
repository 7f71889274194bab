"""Binding a caller's tensors to a compiled library's inputs: checked, and zero-copy when they already fit.

Why: this runs on every call of a loaded library (``ctc.load(dir).runner("cpu")(inputs)``), so its cost
is per-call overhead.  What can be decided once is decided when the library loads (:func:`input_specs`:
dtype, rank, fixed sizes, symbols); a call then only compares.  A CPU torch tensor or numpy array of the
right dtype that is contiguous and 64-byte aligned (torch's allocator aligns to 64 bytes) is handed to
the runtime through DLPack without a copy.  Anything else is converted once: a non-contiguous or
unaligned tensor is copied, an integer tensor of another width is cast to the declared one (checked
for overflow), a float of another precision is cast.  Wrong kinds (floats for token ids), wrong ranks,
sizes other than a fixed-shape build's, and one symbol (``seq``) given two sizes by two inputs are
:class:`~ctc.errors.UsageError` naming the input, the axis and what it must be, before any kernel runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctc.errors import UsageError

ALIGN = 64  # bytes: TVM's kernels assume 64-byte aligned buffers


@dataclass(frozen=True)
class InputSpec:
    """What one input of a compiled library takes (from ``model.json``, resolved once at load)."""

    name: str
    dtype: str  # ctc dtype name (i64, f32, ...)
    torch_dtype: Any
    np_dtype: np.dtype | None  # None: numpy has no such dtype (bf16)
    kind: str  # "f" float, "i" integer, "b" bool
    fixed: tuple[tuple[int, int], ...]  # (axis, size) of every axis whose size is known at build time
    symbols: tuple[tuple[int, str], ...]  # (axis, symbol) of every axis sized by a plain symbol
    rank: int
    inplace: bool  # the library writes this input's buffer: the caller's tensor gets a private copy
    static_dims: tuple[tuple[str, int], ...]  # the build's bound symbols, for the error message


def _kind(torch_dtype: Any) -> str:
    import torch

    if torch_dtype == torch.bool:
        return "b"
    if torch_dtype.is_floating_point:
        return "f"
    if torch_dtype.is_complex:
        return "c"
    return "i"


KIND_NAMES = {"f": "floating-point", "i": "integer", "b": "bool", "c": "complex"}


def input_specs(meta: Mapping[str, Any], inplace: set[str] | frozenset[str] = frozenset()) -> list[InputSpec]:
    """The inputs a library's ``model.json`` declares, resolved for per-call checks."""
    import torch

    from ctc.ir.types import torch_dtype

    static = {str(k): int(v) for k, v in (meta.get("static_dims") or {}).items()}
    specs = []
    for i in meta.get("inputs", []):
        td = torch_dtype(i["dtype"])
        try:
            nd: np.dtype | None = torch.empty(0, dtype=td).numpy().dtype
        except TypeError:
            nd = None
        fixed, symbols = [], []
        for axis, d in enumerate(i.get("shape", [])):
            if isinstance(d, int):
                fixed.append((axis, d))
            elif d in static:
                fixed.append((axis, static[d]))
            elif isinstance(d, str) and d.isidentifier():
                symbols.append((axis, d))
            # an expression of symbols (seq + 1): the runtime's own shape check covers it
        specs.append(InputSpec(i["name"], i["dtype"], td, nd, _kind(td), tuple(fixed), tuple(symbols),
                               len(i.get("shape", [])), i["name"] in inplace, tuple(static.items())))
    return specs


def check_shape(spec: InputSpec, shape: Sequence[int], sizes: dict[str, tuple[int, str]]) -> None:
    """Rank, fixed sizes and symbol agreement of one input; ``sizes`` collects symbol -> (size, input)
    over one call's inputs."""
    if len(shape) != spec.rank:
        raise UsageError(f"input {spec.name!r} must have {spec.rank} dims, got shape {tuple(shape)}")
    for axis, want in spec.fixed:
        if shape[axis] != want:
            if spec.static_dims:
                built = ", ".join(f"{k}={v}" for k, v in spec.static_dims)
                raise UsageError(f"this library was built for fixed shapes ({built}): input {spec.name!r} axis "
                                 f"{axis} must be {want}, got {shape[axis]}")
            raise UsageError(f"input {spec.name!r} axis {axis} must be {want}, got {shape[axis]}")
    for axis, sym in spec.symbols:
        seen = sizes.setdefault(sym, (shape[axis], spec.name))
        if seen[0] != shape[axis]:
            raise UsageError(f"input {spec.name!r} axis {axis} is {sym} = {shape[axis]}, but input {seen[1]!r} "
                             f"gave {sym} = {seen[0]}")


def _cast_checked(spec: InputSpec, t: Any) -> Any:
    """``t`` (a CPU torch tensor) as the spec's dtype: same-kind casts only, integers checked for overflow."""
    import torch

    if t.dtype == spec.torch_dtype:
        return t
    have = _kind(t.dtype)
    if have != spec.kind and not (have == "b" and spec.kind == "i"):
        raise UsageError(f"input {spec.name!r} must be {spec.dtype} ({KIND_NAMES[spec.kind]}), got {t.dtype} "
                         f"({KIND_NAMES[have]}); convert it explicitly if that is meant")
    if spec.kind == "i" and t.numel():
        info = torch.iinfo(spec.torch_dtype)
        lo, hi = int(t.min()), int(t.max())
        if lo < info.min or hi > info.max:
            raise UsageError(f"input {spec.name!r} holds values in [{lo}, {hi}], outside {spec.dtype}")
    return t.to(spec.torch_dtype)


def as_cpu_tensor(spec: InputSpec, x: Any) -> Any:
    """``x`` (torch tensor, numpy array, nested lists) as a CPU torch tensor of the spec's dtype (shares
    memory when nothing has to change)."""
    import torch

    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(x) if x.dtype.kind in "biuf" and x.dtype.isnative else torch.as_tensor(np.array(x))
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as e:
            raise UsageError(f"input {spec.name!r}: cannot be read as a tensor ({type(x).__name__}: {e})") from None
    if t.device.type != "cpu":
        t = t.cpu()
    return _cast_checked(spec, t)


def _aligned_copy(t: Any) -> Any:
    """A C-contiguous copy of ``t`` starting on an ``ALIGN``-byte boundary."""
    import torch

    n, size = t.numel(), t.element_size()
    buf = torch.empty(n * size + ALIGN, dtype=torch.uint8)
    off = (-buf.data_ptr()) % ALIGN
    out = buf[off: off + n * size].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def bind_input(ffi: Any, spec: InputSpec, x: Any, sizes: dict[str, tuple[int, str]], keep: list[Any]) -> Any:
    """A CPU runtime tensor for one input: the caller's own buffer when it fits (zero-copy), else a checked,
    converted, aligned copy (kept alive in ``keep`` for the call)."""
    import torch

    if type(x) is torch.Tensor and x.dtype == spec.torch_dtype and not spec.inplace and x.device.type == "cpu" \
            and x.is_contiguous() and x.data_ptr() % ALIGN == 0:
        check_shape(spec, x.shape, sizes)
        return ffi.from_dlpack(x.detach() if x.requires_grad else x)
    if type(x) is np.ndarray and x.dtype == spec.np_dtype and not spec.inplace and x.flags.c_contiguous \
            and x.ctypes.data % ALIGN == 0:
        check_shape(spec, x.shape, sizes)
        return ffi.from_dlpack(x)
    t = as_cpu_tensor(spec, x)
    check_shape(spec, tuple(t.shape), sizes)
    if spec.inplace or not t.is_contiguous() or t.data_ptr() % ALIGN:
        t = _aligned_copy(t)  # the library writes in-place inputs: never into the caller's tensor
    keep.append(t)
    return ffi.from_dlpack(t)
