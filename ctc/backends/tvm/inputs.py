"""Binding a caller's tensors to a compiled library's inputs: checked, and zero-copy when they already fit.

Why: this runs on every call of a loaded library (``ctc.load(dir).runner("cpu")(inputs)``), so its cost
is per-call overhead.  What can be decided once is decided when the library loads (:func:`input_specs`:
dtype, rank, fixed sizes, symbols); a call then only compares.  A CPU torch tensor or numpy array of the
right dtype that is contiguous and 64-byte aligned (torch's allocator aligns to 64 bytes) is handed to
the runtime through DLPack without a copy.  Anything else is converted once: a non-contiguous or
unaligned tensor is copied, an integer tensor of another width is cast to the declared one (checked
for overflow), a float of another precision is cast.  That conversion is one numpy copy on the calling
thread, never a torch op: a torch copy of a large tensor runs on torch's OpenMP pool, whose worker then
spins for milliseconds on a core the library's own threads need (an unaligned image from ``np.load``
made every 2-thread EfficientNet-Lite0 call ~1.8x slower).  Wrong kinds (floats for token ids), wrong ranks,
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
    built: frozenset[int] = frozenset()  # axes of ``fixed`` that the build fixed (a symbol in the model's IR)


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
        fixed, symbols, built = [], [], set()
        for axis, d in enumerate(i.get("shape", [])):
            if isinstance(d, int):
                fixed.append((axis, d))
            elif d in static:
                fixed.append((axis, static[d]))
                built.add(axis)
            elif isinstance(d, str) and d.isidentifier():
                symbols.append((axis, d))
            # an expression of symbols (seq + 1): the runtime's own shape check covers it
        specs.append(InputSpec(i["name"], i["dtype"], td, nd, _kind(td), tuple(fixed), tuple(symbols),
                               len(i.get("shape", [])), i["name"] in inplace, tuple(static.items()), frozenset(built)))
    return specs


def check_shape(spec: InputSpec, shape: Sequence[int], sizes: dict[str, tuple[int, str]]) -> None:
    """Rank, fixed sizes, non-empty symbolic axes and symbol agreement of one input; ``sizes`` collects
    symbol -> (size, input) over one call's inputs."""
    if len(shape) != spec.rank:
        raise UsageError(f"input {spec.name!r} must have {spec.rank} dims, got shape {tuple(shape)}")
    for axis, want in spec.fixed:
        if shape[axis] != want:
            if axis in spec.built:
                built = ", ".join(f"{k}={v}" for k, v in spec.static_dims)
                raise UsageError(f"this library was built for fixed shapes ({built}): input {spec.name!r} axis "
                                 f"{axis} must be {want}, got {shape[axis]}; give inputs of exactly that size (token "
                                 "ids padded together with their attention mask), or build the target without "
                                 "fixing it (no seq_len=/batch= on the target line, no trials=)")
            raise UsageError(f"input {spec.name!r} axis {axis} must be {want}, got {shape[axis]}")
    for axis, sym in spec.symbols:
        if shape[axis] == 0:
            raise UsageError(f"input {spec.name!r} is empty ({sym} = 0 on axis {axis}): give at least one element "
                             "(one token for token ids)")
        seen = sizes.setdefault(sym, (shape[axis], spec.name))
        if seen[0] != shape[axis]:
            raise UsageError(f"input {spec.name!r} axis {axis} is {sym} = {shape[axis]}, but input {seen[1]!r} "
                             f"gave {sym} = {seen[0]}")


def _numpy_or_none(t: Any) -> np.ndarray | None:
    """``t`` (a CPU torch tensor) as a numpy array over the same memory; None for a dtype numpy lacks (bf16)."""
    try:
        return t.numpy()
    except TypeError:
        return None


def _numpy_bits(t: Any) -> np.ndarray:
    """``t`` as a numpy array over the same memory; a dtype numpy lacks (bf16, fp8) as unsigned integers of
    its width, which a copy moves bit for bit."""
    import torch

    a = _numpy_or_none(t)
    return a if a is not None else t.view({1: torch.uint8, 2: torch.uint16, 4: torch.uint32}[t.element_size()]).numpy()


def _check_kind(spec: InputSpec, t: Any) -> None:
    """Same-kind conversions only (bool may become an integer); integers narrowed to the spec's dtype
    must fit it."""
    import torch

    if t.dtype == spec.torch_dtype:
        return
    have = _kind(t.dtype)
    if have != spec.kind and not (have == "b" and spec.kind == "i"):
        raise UsageError(f"input {spec.name!r} must be {spec.dtype} ({KIND_NAMES[spec.kind]}), got {t.dtype} "
                         f"({KIND_NAMES[have]}); convert it explicitly if that is meant")
    if spec.kind == "i" and t.numel():
        info = torch.iinfo(spec.torch_dtype)
        a = t.numpy()  # numpy's reductions run on the calling thread (torch's may start its pool)
        lo, hi = int(a.min()), int(a.max())
        if lo < info.min or hi > info.max:
            raise UsageError(f"input {spec.name!r} holds values in [{lo}, {hi}], outside {spec.dtype}")


def as_cpu_tensor(spec: InputSpec, x: Any) -> Any:
    """``x`` (torch tensor, numpy array, nested lists) as a CPU torch tensor sharing its memory where it can,
    in its own dtype, checked to be convertible to the spec's (:func:`converted_copy` converts it)."""
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
    if t.device.type == "meta":
        raise UsageError(f"input {spec.name!r} is a meta tensor (no data): give a tensor with values")
    if t.device.type != "cpu":
        t = t.cpu()
    _check_kind(spec, t)
    return t


def converted_copy(t: Any, dtype: Any) -> Any:
    """A C-contiguous copy of ``t`` (a CPU torch tensor) as ``dtype``, starting on an ``ALIGN``-byte boundary,
    made by numpy on the calling thread, cast included.  Only a cast to or from a dtype numpy lacks (bf16)
    is torch's."""
    import torch

    nbytes = t.numel() * dtype.itemsize
    buf = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    off = (-buf.data_ptr()) % ALIGN
    out = buf[off: off + nbytes].view(dtype).view(t.shape)
    if t.dtype == dtype:
        np.copyto(_numpy_bits(out), _numpy_bits(t))
        return out
    dst, src = _numpy_or_none(out), _numpy_or_none(t)
    if dst is None or src is None:
        out.copy_(t)  # bf16 <-> another float: numpy has no bf16
    else:
        np.copyto(dst, src, casting="unsafe")
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
    if spec.inplace or t.dtype != spec.torch_dtype or not t.is_contiguous() or t.data_ptr() % ALIGN:
        t = converted_copy(t, spec.torch_dtype)  # in-place inputs too: the library never writes the caller's
    keep.append(t)
    return ffi.from_dlpack(t)
