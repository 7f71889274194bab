"""The arithmetic of sharing weights between blocks (no graph code here).

Used by ``share-blocks`` (after FoldGPT) and ``recursive`` (after Relaxed Recursive
Transformers):

* :class:`ChannelFit` — per-output-channel coefficients ``c`` (and an intercept ``beta`` where the
  layer has a bias) that make a shared linear ``c * (W_shared x) + beta`` match the original
  block's ``W x + b`` in least squares over calibration rows, in closed form from running
  float64 sums (one pass over the data, nothing kept).
* :func:`lora_from_residual` — a rank-``r`` pair ``(B [N, r], A [r, K])`` from the truncated SVD of
  ``W_original - W_shared`` (RRT's initialisation); at full rank ``W_shared + B A`` is the original.
* :func:`stepwise_sources` / :func:`average` — RRT's two initialisations of a tied block.
* :func:`contiguous_groups` — the best split of a run of blocks into ``u`` contiguous groups under
  a per-group cost (dynamic programming), for choosing FoldGPT's sharing groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["ChannelFit", "average", "contiguous_groups", "lora_from_residual", "stepwise_sources"]


# --------------------------------------------------------------------------- channel coefficients
@dataclass
class ChannelFit:
    """Running least-squares fit of ``target ≈ c * shared + beta`` per channel (last dim).

    ``intercept=False`` fits ``c`` alone (``beta = 0``).  Channels whose shared output never
    varies get ``c = 1`` (and the mean difference as ``beta`` with an intercept), so a channel
    the data says nothing about is left as plain sharing would leave it.
    """

    channels: int
    intercept: bool = False
    rows: int = 0
    s_a: torch.Tensor = field(init=False)
    s_t: torch.Tensor = field(init=False)
    s_aa: torch.Tensor = field(init=False)
    s_at: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        z = torch.zeros(self.channels, dtype=torch.float64)
        self.s_a, self.s_t, self.s_aa, self.s_at = z.clone(), z.clone(), z.clone(), z.clone()

    def update(self, shared: torch.Tensor, target: torch.Tensor) -> None:
        """Fold in one batch: ``shared`` = the shared layer's output, ``target`` = the original's."""
        if shared.shape != target.shape or shared.shape[-1] != self.channels:
            raise ValueError(f"ChannelFit: shapes {tuple(shared.shape)} and {tuple(target.shape)} must both end in "
                             f"{self.channels} channels")
        a = shared.detach().reshape(-1, self.channels).to(torch.float64)
        t = target.detach().reshape(-1, self.channels).to(torch.float64)
        self.rows += a.shape[0]
        self.s_a += a.sum(0)
        self.s_t += t.sum(0)
        self.s_aa += (a * a).sum(0)
        self.s_at += (a * t).sum(0)

    def solve(self, damping: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(c, beta)`` in float32 (``beta`` None without an intercept).

        ``damping`` is a ridge pull of ``c`` towards 1 of strength ``damping`` times the mean
        channel variance: channels whose shared output barely varies (where ``cov / var`` is
        noise divided by almost nothing) stay near 1 instead of taking extreme values.
        """
        if self.rows == 0:
            raise ValueError("ChannelFit.solve: no rows were observed")
        n = float(self.rows)
        if self.intercept:
            var = self.s_aa - self.s_a * self.s_a / n
            cov = self.s_at - self.s_a * self.s_t / n
        else:
            var, cov = self.s_aa, self.s_at
        lam = damping * var.abs().mean() + 1e-30
        c = (cov + lam) / (var + lam)
        dead = var <= 1e-12 * (var.abs().max() + 1e-30)
        c = torch.where(dead, torch.ones_like(c), c)
        beta = (self.s_t - c * self.s_a) / n if self.intercept else None
        return c.to(torch.float32), (beta.to(torch.float32) if beta is not None else None)


# --------------------------------------------------------------------------- LoRA from the residual
def lora_from_residual(original: torch.Tensor, shared: torch.Tensor, rank: int, *,
                       input_gram: torch.Tensor | None = None, damp: float = 0.01
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B [N, r], A [r, K])`` with ``B A`` the best rank-``r`` approximation of ``R = original - shared``.

    Plain (RRT's layer-wise LoRA initialisation): the truncated SVD of ``R``, ``B = U_r Sigma_r``,
    ``A = V_r^T``, best in the Frobenius norm of the weights.  With ``input_gram`` (``E[x x^T]`` of
    the layer's calibration inputs, ``[K, K]``): best for the *outputs* instead, minimising
    ``E ||(R - B A) x||^2``: with ``H = L L^T`` (Cholesky, damped by ``damp`` times its mean
    diagonal), the truncated SVD of ``R L`` gives ``B = U_r Sigma_r`` and ``A = V_r^T L^{-1}``
    (the whitening ASVD/SVD-LLM use), each rank-one component then rescaled so ``b_i`` and ``a_i``
    have equal norms.  Computed in the weights' precision but at least float32
    (float64 with a Gram matrix); ``rank`` is clipped to ``min(N, K)``, where either form
    reproduces ``R`` up to rounding.
    """
    if original.shape != shared.shape or original.dim() != 2:
        raise ValueError(f"lora_from_residual: weights must be equal-shaped matrices, got {tuple(original.shape)} "
                         f"and {tuple(shared.shape)}")
    if rank < 1:
        raise ValueError(f"lora_from_residual: rank must be >= 1, got {rank}")
    r = min(rank, *original.shape)
    k = original.shape[1]
    work = torch.promote_types(original.dtype, torch.float32) if input_gram is None else torch.float64
    res = original.to(work) - shared.to(work)
    if input_gram is None:
        u, s, vh = torch.linalg.svd(res, full_matrices=False)
        b, a = u[:, :r] * s[:r], vh[:r]
    else:
        if input_gram.shape != (k, k):
            raise ValueError(f"lora_from_residual: input_gram must be [{k}, {k}], got {tuple(input_gram.shape)}")
        h = input_gram.to(torch.float64)
        h = h + (damp * float(torch.diagonal(h).mean().clamp_min(1e-12))) * torch.eye(k, dtype=torch.float64)
        chol = torch.linalg.cholesky(h)
        u, s, vh = torch.linalg.svd(res @ chol, full_matrices=False)
        b = u[:, :r] * s[:r]
        a = torch.linalg.solve_triangular(chol, vh[:r], upper=False, left=False)  # V_r^T L^{-1}
        # Balance each component (b_i * g, a_i / g, the product unchanged): L^{-1} scales A by the inverse
        # activation magnitudes, and factors of very different sizes train badly (healing's Adam steps
        # are the same size for both).
        g = (a.norm(dim=1) / b.norm(dim=0).clamp_min(1e-30)).clamp_min(1e-30).sqrt()
        b, a = b * g, a / g.unsqueeze(1)
    return b.to(original.dtype).contiguous(), a.to(original.dtype).contiguous()


# --------------------------------------------------------------------------- initialising a tied block
def average(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Element-wise mean of equal-shaped float tensors (RRT's "average" initialisation), in float64."""
    if not tensors:
        raise ValueError("average: no tensors")
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for t in tensors:
        if t.shape != tensors[0].shape:
            raise ValueError(f"average: shapes differ ({tuple(t.shape)} vs {tuple(tensors[0].shape)})")
        acc += t.to(torch.float64)
    return (acc / len(tensors)).to(tensors[0].dtype)


def stepwise_sources(first: int, last: int, groups: int) -> list[int]:
    """RRT's "stepwise" choice: group ``g`` of ``groups`` takes the block at ``round(linspace(first, last))[g]``.

    The selected blocks are spread evenly over ``[first, last]``, keeping both ends, so the
    tied stack keeps the layers that start and finish the original one.
    """
    if groups < 1 or last < first:
        raise ValueError(f"stepwise_sources: need groups >= 1 and last >= first, got {groups}, {first}..{last}")
    if groups == 1:
        return [first]
    step = (last - first) / (groups - 1)
    # Python's round() (half to even) is what numpy's linspace + round gives in the reference code.
    return [int(round(first + g * step)) for g in range(groups)]


# --------------------------------------------------------------------------- grouping
def contiguous_groups(n: int, units: int, cost: Callable[[int, int], float], *, max_size: int | None = None
                      ) -> tuple[list[tuple[int, int]], float]:
    """Split ``0..n-1`` into exactly ``units`` contiguous groups minimising the summed ``cost(lo, hi)``.

    ``cost(lo, hi)`` is the cost of one group covering ``lo..hi-1`` (half-open); groups are at
    most ``max_size`` long.  Returns the groups as ``(lo, hi)`` pairs and the total cost.
    Dynamic programming over (prefix length, groups used): ``O(n * units * max_size)`` calls.
    """
    if not 1 <= units <= n:
        raise ValueError(f"contiguous_groups: units must be in 1..{n}, got {units}")
    size = n if max_size is None else max(1, max_size)
    if units * size < n:
        raise ValueError(f"contiguous_groups: {units} groups of at most {size} cannot cover {n} blocks")
    memo: dict[tuple[int, int], float] = {}

    def c(lo: int, hi: int) -> float:
        k = (lo, hi)
        if k not in memo:
            memo[k] = float(cost(lo, hi))
        return memo[k]

    inf = math.inf
    best = [[inf] * (units + 1) for _ in range(n + 1)]
    back = [[-1] * (units + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for end in range(1, n + 1):
        for u in range(1, min(units, end) + 1):
            for start in range(max(0, end - size), end):
                prev = best[start][u - 1]
                if prev == inf:
                    continue
                v = prev + c(start, end)
                if v < best[end][u]:
                    best[end][u] = v
                    back[end][u] = start
    if best[n][units] == inf:
        raise ValueError(f"contiguous_groups: no split of {n} blocks into {units} groups of at most {size}")
    groups: list[tuple[int, int]] = []
    end, u = n, units
    while end > 0:
        start = back[end][u]
        groups.append((start, end))
        end, u = start, u - 1
    return groups[::-1], best[n][units]
