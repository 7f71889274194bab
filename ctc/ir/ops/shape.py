"""Shape and indexing ops: reshape, permute, transpose, expand, (un)squeeze, slice, concat,
gather, index_select, index, embedding, arange, triu/tril, masked_fill.

Attributes are canonical: axes are non-negative, target shapes are complete (no ``-1``;
the frontend resolves them), and every dim that can depend on the sequence length is a
``dims`` attribute so it may be symbolic (``slice`` bounds and ``arange`` ends are
one-element ``dims`` lists for that reason).
"""

from __future__ import annotations

import torch

from ctc.ir.ops.infer import broadcast, expect_dim, norm_axis, product
from ctc.ir.ops.registry import Attr, OpError, register_op
from ctc.ir.symbolic import dim_add, dim_floordiv, dim_sub, dims_equal
from ctc.ir.types import FLOAT_DTYPES, INT_DTYPES, Dim, TensorType, torch_dtype

CAT = "shape"


def _axis_ok(axis: int, rank: int, op: str) -> None:
    if not 0 <= axis < rank:
        raise OpError(f"{op}: axis {axis} out of range for rank {rank} (axes are stored non-negative)")


# =========================================================================== reshape
def _infer_reshape(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    shape = tuple(attrs["shape"])
    if any(isinstance(d, int) and d < 0 for d in shape):
        raise OpError(f"reshape: target shape {list(shape)} must be complete (no -1; resolve it when building)")
    a, b = product(x.shape), product(shape)
    if not dims_equal(a, b) and (isinstance(a, int) and isinstance(b, int) or "//" not in f"{a}{b}"):
        raise OpError(f"reshape: {x} has {a} elements, target shape {list(shape)} has {b}")
    return [x.with_shape(shape)]


@register_op("reshape", inputs=("x",), infer=_infer_reshape, category=CAT,
             attrs={"shape": Attr("dims", doc="complete target shape (symbolic dims allowed, no -1)")})
def reshape(x: torch.Tensor, *, shape: tuple[int, ...]) -> torch.Tensor:
    """Same elements in row-major order, viewed with a new ``shape``."""
    return x.reshape(shape)


# =========================================================================== permute / transpose
def _infer_permute(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    perm = tuple(attrs["perm"])
    if sorted(perm) != list(range(x.rank)):
        raise OpError(f"permute: perm {list(perm)} is not a permutation of 0..{x.rank - 1} for {x}")
    return [x.with_shape(tuple(x.shape[p] for p in perm))]


@register_op("permute", inputs=("x",), infer=_infer_permute, category=CAT,
             attrs={"perm": Attr("ints", doc="output axis i is input axis perm[i]")})
def permute(x: torch.Tensor, *, perm: tuple[int, ...]) -> torch.Tensor:
    """Reorder axes: ``out.shape[i] = x.shape[perm[i]]``."""
    return x.permute(perm)


def _infer_transpose(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    d0, d1 = attrs["dim0"], attrs["dim1"]
    _axis_ok(d0, x.rank, "transpose")
    _axis_ok(d1, x.rank, "transpose")
    s = list(x.shape)
    s[d0], s[d1] = s[d1], s[d0]
    return [x.with_shape(tuple(s))]


@register_op("transpose", inputs=("x",), infer=_infer_transpose, category=CAT,
             attrs={"dim0": Attr("int", doc="first axis"), "dim1": Attr("int", doc="second axis")})
def transpose(x: torch.Tensor, *, dim0: int, dim1: int) -> torch.Tensor:
    """Swap two axes."""
    return x.transpose(dim0, dim1)


# =========================================================================== expand
def _infer_expand(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    shape = tuple(attrs["shape"])
    if len(shape) < x.rank:
        raise OpError(f"expand: target {list(shape)} has lower rank than {x}")
    for d, t in zip(reversed(x.shape), reversed(shape), strict=False):
        if d != 1 and not dims_equal(d, t):
            raise OpError(f"expand: cannot expand {x} to {list(shape)} (dim {d} vs {t})")
    return [x.with_shape(shape)]


@register_op("expand", inputs=("x",), infer=_infer_expand, category=CAT,
             attrs={"shape": Attr("dims", doc="complete target shape (size-1 dims broadcast)")})
def expand(x: torch.Tensor, *, shape: tuple[int, ...]) -> torch.Tensor:
    """Broadcast size-1 dims (and new leading dims) to ``shape``."""
    return x.expand(shape)


# =========================================================================== (un)squeeze
def _infer_unsqueeze(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    a = attrs["axis"]
    _axis_ok(a, x.rank + 1, "unsqueeze")
    s = list(x.shape)
    s.insert(a, 1)
    return [x.with_shape(tuple(s))]


@register_op("unsqueeze", inputs=("x",), infer=_infer_unsqueeze, category=CAT,
             attrs={"axis": Attr("int", doc="position of the new size-1 axis in the output")})
def unsqueeze(x: torch.Tensor, *, axis: int) -> torch.Tensor:
    """Insert a size-1 axis at ``axis``."""
    return x.unsqueeze(axis)


def _infer_squeeze(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    axes = attrs["axes"]
    for a in axes:
        _axis_ok(a, x.rank, "squeeze")
        if x.shape[a] != 1:
            raise OpError(f"squeeze: axis {a} of {x} is not 1")
    return [x.with_shape(tuple(d for i, d in enumerate(x.shape) if i not in axes))]


@register_op("squeeze", inputs=("x",), infer=_infer_squeeze, category=CAT,
             attrs={"axes": Attr("ints", doc="size-1 axes to remove")})
def squeeze(x: torch.Tensor, *, axes: tuple[int, ...]) -> torch.Tensor:
    """Remove the listed size-1 axes."""
    for a in sorted(axes, reverse=True):
        x = x.squeeze(a)
    return x


# =========================================================================== slice
def slice_len(start: Dim, end: Dim, step: int) -> Dim:
    """Number of elements of ``range(start, end, step)`` for canonical bounds (start <= end)."""
    n = dim_sub(end, start)
    if step == 1:
        return n
    return dim_floordiv(dim_add(n, step - 1), step)


def _infer_slice(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    a, step = attrs["axis"], attrs["step"]
    _axis_ok(a, x.rank, "slice")
    if len(attrs["start"]) != 1 or len(attrs["end"]) != 1:
        raise OpError("slice: start and end are one-element dims lists, e.g. start=[0], end=[s0]")
    start, end = attrs["start"][0], attrs["end"][0]
    if step < 1:
        raise OpError(f"slice: step must be >= 1, got {step}")
    dim = x.shape[a]
    if isinstance(start, int) and start < 0 or isinstance(end, int) and end < 0:
        raise OpError(f"slice: bounds must be canonical (0 <= start <= end <= dim), got {start}:{end}")
    if isinstance(dim, int) and isinstance(end, int) and end > dim:
        raise OpError(f"slice: end {end} exceeds dim {dim} of {x}")
    if isinstance(start, int) and isinstance(end, int) and start > end:
        raise OpError(f"slice: start {start} > end {end}")
    s = list(x.shape)
    s[a] = slice_len(start, end, step)
    return [x.with_shape(tuple(s))]


@register_op("slice", inputs=("x",), infer=_infer_slice, category=CAT, attrs={
    "axis": Attr("int", doc="sliced axis"),
    "start": Attr("dims", doc="[start] (one element, may be symbolic)"),
    "end": Attr("dims", doc="[end], exclusive (one element, may be symbolic)"),
    "step": Attr("int", 1, doc="stride >= 1"),
})
def slice_(x: torch.Tensor, *, axis: int, start: tuple[int], end: tuple[int], step: int) -> torch.Tensor:
    """``x[..., start:end:step, ...]`` along ``axis``, with canonical bounds ``0 <= start <= end <= dim``."""
    idx = (slice(None),) * axis + (slice(start[0], end[0], step),)
    return x[idx]


# =========================================================================== concat
def _infer_concat(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    a = attrs["axis"]
    first = ins[0]
    _axis_ok(a, first.rank, "concat")
    total: Dim = 0
    for t in ins:
        if t.rank != first.rank or t.dtype != first.dtype:
            raise OpError(f"concat: operands differ in rank or dtype ({first} vs {t})")
        for i, (d, e) in enumerate(zip(first.shape, t.shape, strict=False)):
            if i != a:
                expect_dim(d, e, f"concat: dim {i}")
        total = dim_add(total, t.shape[a])
    s = list(first.shape)
    s[a] = total
    return [first.with_shape(tuple(s))]


@register_op("concat", inputs=("*xs",), infer=_infer_concat, category=CAT,
             attrs={"axis": Attr("int", doc="axis to join along")})
def concat(*xs: torch.Tensor, axis: int) -> torch.Tensor:
    """Join tensors along ``axis`` (other dims must match)."""
    return torch.cat(xs, dim=axis)


# =========================================================================== gather / index_select / index
def _int_index(t: TensorType, what: str) -> None:
    if t.dtype not in INT_DTYPES:
        raise OpError(f"{what} must be an integer tensor, got {t}")


def _infer_gather(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, idx = ins
    _axis_ok(attrs["axis"], x.rank, "gather")
    _int_index(idx, "gather index")
    if idx.rank != x.rank:
        raise OpError(f"gather: index rank must equal input rank ({idx} vs {x})")
    return [idx.with_dtype(x.dtype)]


@register_op("gather", inputs=("x", "index"), infer=_infer_gather, category=CAT,
             attrs={"axis": Attr("int", doc="axis indexed by `index`")})
def gather(x: torch.Tensor, index: torch.Tensor, *, axis: int) -> torch.Tensor:
    """``out[i][j][k] = x[i][index[i][j][k]][k]`` for axis 1 (torch.gather semantics)."""
    return torch.gather(x, axis, index)


def _infer_index_select(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, idx = ins
    a = attrs["axis"]
    _axis_ok(a, x.rank, "index_select")
    _int_index(idx, "index_select index")
    if idx.rank != 1:
        raise OpError(f"index_select: index must be 1-D, got {idx}")
    s = list(x.shape)
    s[a] = idx.shape[0]
    return [x.with_shape(tuple(s))]


@register_op("index_select", inputs=("x", "index"), infer=_infer_index_select, category=CAT,
             attrs={"axis": Attr("int", doc="axis to pick from")})
def index_select(x: torch.Tensor, index: torch.Tensor, *, axis: int) -> torch.Tensor:
    """Pick entries ``index`` (1-D) along ``axis``."""
    return torch.index_select(x, axis, index)


def index_axes(rank: int, count: int, axes: tuple[int, ...] | None) -> tuple[int, ...]:
    """The axes an ``index`` node's index tensors apply to (default: the leading ``count`` axes)."""
    out = tuple(range(count)) if axes is None else tuple(axes)
    if len(out) != count:
        raise OpError(f"index: {count} index tensors but axes={list(out)}")
    if list(out) != sorted(set(out)) or any(not 0 <= a < rank for a in out):
        raise OpError(f"index: axes {list(out)} must be increasing and in 0..{rank - 1}")
    return out


def index_result_shape(x: tuple[Dim, ...], axes: tuple[int, ...], bshape: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """torch's advanced-indexing result shape: the broadcast index shape replaces the indexed axes
    where they are adjacent, and goes first when they are not."""
    rest = [d for i, d in enumerate(x) if i not in axes]
    if axes[-1] - axes[0] + 1 == len(axes):
        return tuple(x[:axes[0]]) + tuple(bshape) + tuple(x[axes[-1] + 1:])
    return tuple(bshape) + tuple(rest)


def _infer_index(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, *idx = ins
    if not idx:
        raise OpError("index needs at least one index tensor")
    if len(idx) > x.rank:
        raise OpError(f"index: {len(idx)} index tensors for {x}")
    for t in idx:
        _int_index(t, "index operand")
    axes = index_axes(x.rank, len(idx), attrs["axes"])
    return [x.with_shape(index_result_shape(x.shape, axes, broadcast(*(t.shape for t in idx))))]


@register_op("index", inputs=("x", "*indices"), infer=_infer_index, category=CAT, attrs={
    "axes": Attr("opt_ints", None, doc="axis of x each index tensor selects on (increasing); none = the leading axes"),
})
def index(x: torch.Tensor, *indices: torch.Tensor, axes: tuple[int, ...] | None) -> torch.Tensor:
    """Advanced (fancy) indexing, torch semantics: index tensor ``i`` picks along ``axes[i]`` (default
    the leading axes); the index tensors broadcast together; negative indices count from the end.
    The broadcast shape replaces the indexed axes where they are adjacent and comes first when they
    are not (``x[:, i, :, j]``)."""
    ax = index_axes(x.dim(), len(indices), axes)
    key: list[object] = [slice(None)] * (ax[-1] + 1)
    for a, t in zip(ax, indices, strict=True):
        key[a] = t
    return x[tuple(key)]


def _infer_embedding(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    ids, w = ins
    _int_index(ids, "embedding ids")
    if w.rank != 2:
        raise OpError(f"embedding weight must be [vocab, dim], got {w}")
    return [TensorType(tuple(ids.shape) + (w.shape[1],), w.dtype)]


@register_op("embedding", inputs=("ids", "weight"), infer=_infer_embedding, category=CAT,
             attrs={"padding_idx": Attr("opt_int", None, doc="row whose gradient is zero (no effect on inference)")})
def embedding(ids: torch.Tensor, weight: torch.Tensor, *, padding_idx: int | None) -> torch.Tensor:
    """Look up rows of ``weight [vocab, dim]``: ``out[..., :] = weight[ids[...], :]``."""
    return torch.nn.functional.embedding(ids, weight)


# =========================================================================== arange / triu / tril / masked_fill
def _infer_arange(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    if len(attrs["start"]) != 1 or len(attrs["end"]) != 1:
        raise OpError("arange: start and end are one-element dims lists, e.g. start=[0], end=[s0]")
    start, end, step = attrs["start"][0], attrs["end"][0], attrs["step"]
    if step < 1:
        raise OpError(f"arange: step must be >= 1, got {step}")
    if isinstance(start, int) and isinstance(end, int) and end < start:
        raise OpError(f"arange: end {end} < start {start}")
    return [TensorType((slice_len(start, end, step),), attrs["dtype"])]


@register_op("arange", inputs=(), infer=_infer_arange, category=CAT, attrs={
    "start": Attr("dims", (0,), doc="[start] (one element, may be symbolic)"),
    "end": Attr("dims", doc="[end], exclusive (one element, may be symbolic)"),
    "step": Attr("int", 1, doc="stride >= 1"),
    "dtype": Attr("dtype", "i64", doc="element type"),
})
def arange(*, start: tuple[int], end: tuple[int], step: int, dtype: str) -> torch.Tensor:
    """``[start, start+step, ...]`` below ``end``."""
    return torch.arange(start[0], end[0], step, dtype=torch_dtype(dtype))


def _infer_tri(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    (x,) = ins
    if x.rank < 2:
        raise OpError(f"triu/tril need rank >= 2, got {x}")
    return [x]


@register_op("triu", inputs=("x",), infer=_infer_tri, category=CAT,
             attrs={"diagonal": Attr("int", 0, doc="keep j - i >= diagonal")})
def triu(x: torch.Tensor, *, diagonal: int) -> torch.Tensor:
    """Upper triangle of the last two axes (``j - i >= diagonal``), zeros elsewhere."""
    return torch.triu(x, diagonal)


@register_op("tril", inputs=("x",), infer=_infer_tri, category=CAT,
             attrs={"diagonal": Attr("int", 0, doc="keep j - i <= diagonal")})
def tril(x: torch.Tensor, *, diagonal: int) -> torch.Tensor:
    """Lower triangle of the last two axes (``j - i <= diagonal``), zeros elsewhere."""
    return torch.tril(x, diagonal)


def _infer_masked_fill(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, mask = ins
    if mask.dtype != "bool":
        raise OpError(f"masked_fill: mask must be bool, got {mask}")
    shape = broadcast(x.shape, mask.shape)
    if not all(dims_equal(a, b) for a, b in zip(shape, x.shape, strict=False)) or len(shape) != x.rank:
        raise OpError(f"masked_fill: mask {mask} must broadcast to x {x}")
    if x.dtype not in FLOAT_DTYPES and attrs["value"] != int(attrs["value"]):
        raise OpError(f"masked_fill: non-integral value {attrs['value']} for {x}")
    return [x]


@register_op("masked_fill", inputs=("x", "mask"), infer=_infer_masked_fill, category=CAT,
             attrs={"value": Attr("float", doc="fill value (may be -inf)")})
def masked_fill(x: torch.Tensor, mask: torch.Tensor, *, value: float) -> torch.Tensor:
    """``x`` with ``value`` where ``mask`` (broadcast to x) is true."""
    return x.masked_fill(mask, value)


__all__ = ["norm_axis", "slice_len"]
