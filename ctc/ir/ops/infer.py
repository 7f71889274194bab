"""Shape-inference helpers shared by op declarations (symbolic-dim aware)."""

from __future__ import annotations

from ctc.ir.ops.registry import OpError
from ctc.ir.symbolic import dim_mul, dims_equal, normalize_dim
from ctc.ir.types import Dim, TensorType


def broadcast(*shapes: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """Numpy-style broadcast of shapes; symbolic dims must match exactly or meet a 1."""
    rank = max(len(s) for s in shapes)
    out: list[Dim] = []
    for i in range(rank):
        dim: Dim = 1
        for s in shapes:
            j = i - (rank - len(s))
            if j < 0:
                continue
            d = s[j]
            if d == 1:
                continue
            if dim == 1:
                dim = d
            elif not dims_equal(dim, d):
                if _opaque(dim) or _opaque(d):
                    # a max/min or an inexact quotient that symbolic algebra cannot compare (MPT's
                    # 64 - max(0, 64 - seq) against seq): torch.export takes them as equal, and so does
                    # ctc; keep the plainer form (the run time broadcast still checks)
                    dim = d if _opaque(dim) and not _opaque(d) else dim
                    continue
                raise OpError(f"shapes {[list(s) for s in shapes]} do not broadcast (dim {dim} vs {d})")
        out.append(dim)
    return tuple(out)


def _opaque(d: Dim) -> bool:
    return isinstance(d, str) and any(t in d for t in ("max(", "min(", "//", "%"))


def norm_axis(axis: int, rank: int) -> int:
    a = axis + rank if axis < 0 else axis
    if not 0 <= a < max(rank, 1):
        raise OpError(f"axis {axis} out of range for rank {rank}")
    return a


def product(dims: tuple[Dim, ...] | list[Dim]) -> Dim:
    out: Dim = 1
    for d in dims:
        out = dim_mul(out, d)
    return normalize_dim(out)


def same(t: TensorType) -> list[TensorType]:
    return [t]


def expect_rank(t: TensorType, ranks: tuple[int, ...] | int, what: str) -> None:
    ranks = (ranks,) if isinstance(ranks, int) else ranks
    if t.rank not in ranks:
        raise OpError(f"{what} must have rank {' or '.join(map(str, ranks))}, got {t}")


def expect_dim(a: Dim, b: Dim, what: str) -> None:
    if not dims_equal(a, b):
        raise OpError(f"{what}: {a} != {b}")
