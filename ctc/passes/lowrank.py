"""Low-rank factorisation of linear weights and per-layer rank allocation (the math behind ``asvd``).

Factorisation (ASVD, Yuan et al. 2023): a weight ``W [N, K]`` is read through its inputs'
scale.  With an invertible input transform ``T`` (``diag(s)`` from activation magnitudes, or
the Cholesky factor ``L`` of ``X^T X`` for whitening), ``W = (W T) T^-1``; the SVD
``W T = U Sigma V^T`` truncated to rank ``r`` gives ``W' = U_r Sigma_r (V_r^T T^-1)``, the
rank-``r`` approximation that is best for inputs shaped like the calibration activations
rather than for the weight alone (``T = I`` is plain truncated SVD).  The singular values are
absorbed into the two factors (``absorb``): split as ``Sigma^1/2`` into both (the paper's
default: both factors get the same dynamic range, which suits quantizing them later), or all
into ``u`` or into ``v``.

Parameter ratio of a factorised layer: ``r (N + K) / (N K)``; the rank for a ratio is the
largest one (a multiple of ``align``) within it, and a layer whose rank would not save
parameters stays dense.

Allocation: given per-layer losses measured at candidate ratios, choose one ratio per layer
so that the parameters of all layers meet a global ratio: the paper's binary search over a
sensitivity threshold (:func:`allocate_threshold`), an exact multiple-choice knapsack on the
loss increases (:func:`allocate_knapsack`), or the same ratio everywhere
(:func:`allocate_uniform`, the baseline).  All three always meet the target they are given
(or raise :class:`AllocationError` when no choice can).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "AllocationError",
    "Factorization",
    "LayerChoice",
    "LayerSpec",
    "allocate_knapsack",
    "allocate_threshold",
    "allocate_uniform",
    "allocation_params",
    "cholesky_factor",
    "factorize",
    "lowrank_params",
    "rank_for_ratio",
    "scaling_vector",
]

ABSORB = ("uv", "u", "v")


class AllocationError(ValueError):
    """No choice of the candidate ratios meets the parameter target."""


# --------------------------------------------------------------------------- ranks
def lowrank_params(n: int, k: int, rank: int) -> int:
    """Parameters of a rank-``rank`` pair for an ``[n, k]`` weight (``u [n, r]`` plus ``v [r, k]``)."""
    return rank * (n + k)


def rank_for_ratio(n: int, k: int, ratio: float, align: int = 1) -> int:
    """The largest rank (a multiple of ``align``) whose pair has at most ``ratio * n * k`` parameters.

    0 means no rank fits (the layer cannot be factorised within the ratio); a rank that would
    not save parameters (``r (n + k) >= n k``) is returned as is, and callers keep such layers dense.
    """
    if not 0 < ratio:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    r = math.floor(ratio * n * k / (n + k) + 1e-9)
    r = min(r, min(n, k))
    return (r // align) * align


def saves(n: int, k: int, rank: int) -> bool:
    """Whether a rank-``rank`` pair is smaller than the dense ``[n, k]`` weight."""
    return 0 < rank and lowrank_params(n, k, rank) < n * k


# --------------------------------------------------------------------------- input transforms
def scaling_vector(abs_stat: torch.Tensor, alpha: float, eps: float = 1e-6) -> torch.Tensor:
    """ASVD's diagonal input scale ``s = stat^alpha + eps`` (``stat``: per-channel mean or max of ``|x|``).

    The ``eps`` keeps channels the calibration never excited invertible (as the paper does).
    """
    s = abs_stat.to(torch.float64).clamp_min(0) ** alpha
    return s + eps


def cholesky_factor(hessian: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor ``L`` of ``H = X^T X / n`` (float64), ``L L^T = H``, for whitening.

    ``H`` is positive semi-definite; channels never excited make it singular, so a jitter of
    growing size (relative to the mean diagonal, from 1e-10) is added until it factorises.
    """
    h = hessian.to(torch.float64)
    h = (h + h.T) / 2
    scale = float(torch.diagonal(h).mean().clamp_min(1e-30))
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    for jitter in (0.0, *(10.0 ** e for e in range(-10, 1))):
        lo, info = torch.linalg.cholesky_ex(h + jitter * scale * eye)
        if int(info) == 0:
            return lo
    raise ValueError("X^T X is not positive semi-definite even with jitter (non-finite activations?)")


# --------------------------------------------------------------------------- factorisation
@dataclass
class Factorization:
    """SVD of the input-transformed weight ``W T``, from which factors of any rank are cut.

    ``u [N, m]``, ``sigma [m]`` (descending), ``vt [m, K]`` with ``m = min(N, K)``; ``scale`` is the
    diagonal of ``T`` or None; ``chol`` the lower-triangular ``T`` for whitening or None.
    Everything is float64; factors come out in ``dtype``.
    """

    u: torch.Tensor
    sigma: torch.Tensor
    vt: torch.Tensor
    scale: torch.Tensor | None = None
    chol: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.u.shape[0]), int(self.vt.shape[1])

    @property
    def max_rank(self) -> int:
        return int(self.sigma.shape[0])

    def _untransform(self, vt: torch.Tensor) -> torch.Tensor:
        """``vt T^-1``."""
        if self.scale is not None:
            return vt / self.scale.unsqueeze(0)
        if self.chol is not None:
            # X = vt L^-1  <=>  L^T X^T = vt^T (L^T upper-triangular)
            return torch.linalg.solve_triangular(self.chol.T, vt.T, upper=True).T
        return vt

    def factors(self, rank: int, absorb: str = "uv") -> tuple[torch.Tensor, torch.Tensor]:
        """``(u [N, r], v [r, K])`` with ``u @ v = U_r Sigma_r V_r^T T^-1``."""
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} outside 1..{self.max_rank}")
        if absorb not in ABSORB:
            raise ValueError(f"absorb must be one of {ABSORB}, got {absorb!r}")
        s = self.sigma[:rank]
        u, vt = self.u[:, :rank], self.vt[:rank]
        if absorb == "uv":
            r = s.sqrt()
            u, vt = u * r.unsqueeze(0), vt * r.unsqueeze(1)
        elif absorb == "u":
            u = u * s.unsqueeze(0)
        else:
            vt = vt * s.unsqueeze(1)
        return u.to(self.dtype).contiguous(), self._untransform(vt).to(self.dtype).contiguous()

    def dense(self, rank: int) -> torch.Tensor:
        """The rank-``rank`` approximation ``W'`` as one ``[N, K]`` weight (for measuring, not for storing)."""
        s = self.sigma[:rank]
        w = (self.u[:, :rank] * s.unsqueeze(0)) @ self._untransform(self.vt[:rank])
        return w.to(self.dtype)


def factorize(w: torch.Tensor, *, scale: torch.Tensor | None = None, chol: torch.Tensor | None = None
              ) -> Factorization:
    """SVD of ``w [N, K]`` read through ``diag(scale)`` or the Cholesky factor ``chol`` (or neither: plain SVD)."""
    if w.dim() != 2:
        raise ValueError(f"factorize needs a 2-D weight, got shape {tuple(w.shape)}")
    if scale is not None and chol is not None:
        raise ValueError("give scale or chol, not both")
    a = w.detach().to(torch.float64)
    k = a.shape[1]
    if scale is not None:
        if tuple(scale.shape) != (k,):
            raise ValueError(f"scale has shape {tuple(scale.shape)}, the weight has {k} input channels")
        scale = scale.to(torch.float64)
        a = a * scale.unsqueeze(0)
    if chol is not None:
        if tuple(chol.shape) != (k, k):
            raise ValueError(f"chol has shape {tuple(chol.shape)}, the weight has {k} input channels")
        chol = chol.to(torch.float64)
        a = a @ chol
    u, s, vt = torch.linalg.svd(a, full_matrices=False)
    return Factorization(u, s, vt, scale, chol, w.dtype)


# --------------------------------------------------------------------------- allocation
@dataclass(frozen=True)
class LayerSpec:
    """One factorisable layer: a key, its weight shape, and loss per candidate ratio (dense = ``base``)."""

    key: str
    n: int
    k: int
    losses: Mapping[float, float]


@dataclass(frozen=True)
class LayerChoice:
    """The allocation for one layer: its ratio (1.0 = dense), rank (0 = dense) and parameters."""

    key: str
    ratio: float
    rank: int
    params: int

    @property
    def dense(self) -> bool:
        return self.rank == 0


def _choice(spec: LayerSpec, ratio: float, align: int) -> LayerChoice:
    if ratio >= 1:
        return LayerChoice(spec.key, 1.0, 0, spec.n * spec.k)
    r = rank_for_ratio(spec.n, spec.k, ratio, align)
    if not saves(spec.n, spec.k, r):
        return LayerChoice(spec.key, 1.0, 0, spec.n * spec.k)
    return LayerChoice(spec.key, ratio, r, lowrank_params(spec.n, spec.k, r))


def allocation_params(choices: Sequence[LayerChoice]) -> int:
    return sum(c.params for c in choices)


def _budget(specs: Sequence[LayerSpec], target: float) -> int:
    if not 0 < target <= 1:
        raise AllocationError(f"parameter ratio target must be in (0, 1], got {target}")
    return math.floor(target * sum(s.n * s.k for s in specs) + 1e-6)


def _check_feasible(specs: Sequence[LayerSpec], ratios: Sequence[float], budget: int, align: int) -> None:
    smallest = [min((_choice(s, r, align) for r in [*ratios, 1.0]), key=lambda c: c.params) for s in specs]
    least = allocation_params(smallest)
    if least > budget:
        total = sum(s.n * s.k for s in specs)
        raise AllocationError(f"the smallest candidate ratios reach only {least / total:.3f} of the parameters, "
                              f"above the target {budget / total:.3f}; add smaller candidate ratios")


def allocate_uniform(specs: Sequence[LayerSpec], target: float, align: int = 1) -> list[LayerChoice]:
    """Every layer at the target ratio (the baseline); layers where that rank saves nothing stay dense.

    Meets the target because each layer's rank is rounded down; dense layers can only occur when
    the target is so close to 1 that no rank fits below it, and then raise if over budget.
    """
    budget = _budget(specs, target)
    out = [_choice(s, target, align) for s in specs]
    if allocation_params(out) > budget:
        raise AllocationError(f"uniform ratio {target}: some layers cannot be factorised within it "
                              f"({[c.key for c in out if c.dense][:3]} stay dense), so the total misses the target")
    return out


def allocate_threshold(specs: Sequence[LayerSpec], target: float, ratios: Sequence[float], align: int = 1
                       ) -> tuple[list[LayerChoice], float]:
    """ASVD's sensitivity-based truncation rank search: binary search over a loss threshold.

    Every (layer, candidate ratio) pair is ranked by its measured loss; under threshold ``t`` each
    layer takes the smallest ratio whose loss is <= ``t`` (dense if none).  Fewer parameters as ``t``
    grows, so a binary search finds the smallest threshold that meets the target.  Returns the
    choices and that threshold.
    """
    budget = _budget(specs, target)
    ratios = sorted({float(r) for r in ratios if 0 < r < 1})
    _check_feasible(specs, ratios, budget, align)
    entries = sorted((float(s.losses[r]), i, r) for i, s in enumerate(specs) for r in ratios
                     if r in s.losses and not _choice(s, r, align).dense)

    def choose(t: int) -> list[LayerChoice]:
        best = [1.0] * len(specs)
        for _, i, r in entries[:t]:
            best[i] = min(best[i], r)
        return [_choice(s, best[i], align) for i, s in enumerate(specs)]

    lo, hi = 0, len(entries)
    if allocation_params(choose(hi)) > budget:
        raise AllocationError("no loss threshold meets the parameter target with the measured candidate ratios "
                              "(some layers have no measured loss at their smallest ratio)")
    while lo < hi:  # smallest t with params(t) <= budget; params(t) is non-increasing in t
        mid = (lo + hi) // 2
        if allocation_params(choose(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    threshold = entries[lo - 1][0] if lo > 0 else -math.inf
    return choose(lo), threshold


def allocate_knapsack(specs: Sequence[LayerSpec], target: float, ratios: Sequence[float], base_loss: float,
                      align: int = 1, resolution: int = 4096) -> list[LayerChoice]:
    """Least total loss increase subject to the parameter target: a multiple-choice knapsack.

    Each layer picks one option (dense, or a candidate ratio) with cost = its parameters and
    damage = its measured loss minus ``base_loss``.  Solved exactly by dynamic programming over
    a budget discretised into ``resolution`` units, costs rounded *up* to whole units (so the
    result always meets the target; the rounding only forgoes solutions within one unit per
    layer of the budget).  Damage is taken as additive over layers (each was measured alone) and
    never negative, so a layer is cut only where the budget needs it (ties keep it dense).
    """
    budget = _budget(specs, target)
    ratios = sorted({float(r) for r in ratios if 0 < r < 1})
    _check_feasible(specs, ratios, budget, align)
    unit = max(1, math.ceil(sum(s.n * s.k for s in specs) / resolution))
    cap = budget // unit
    inf = float("inf")
    best = torch.zeros(cap + 1, dtype=torch.float64)  # least damage at cost <= c, before any layer
    picks: list[torch.Tensor] = []
    options: list[list[LayerChoice]] = []
    for s in specs:
        opts = [_choice(s, 1.0, align)]
        dmg = [0.0]
        for r in ratios:
            if r in s.losses:
                c = _choice(s, r, align)
                if not c.dense:
                    opts.append(c)
                    # A cut measured *below* the base loss is calibration noise, not a gain: taken at face
                    # value it would be chosen whatever the budget (overshooting the target).
                    dmg.append(max(0.0, float(s.losses[r]) - base_loss))
        new = torch.full((cap + 1,), inf, dtype=torch.float64)
        pick = torch.zeros(cap + 1, dtype=torch.int16)
        for j, (c, d) in enumerate(zip(opts, dmg, strict=True)):
            w = math.ceil(c.params / unit)
            if w > cap:
                continue
            cand = torch.full((cap + 1,), inf, dtype=torch.float64)
            cand[w:] = best[: cap + 1 - w] + d
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.tensor(j, dtype=torch.int16), pick)
        best = new
        picks.append(pick)
        options.append(opts)
    if not math.isfinite(float(best[cap])):
        raise AllocationError("no combination of the candidate ratios meets the parameter target after rounding "
                              "to the knapsack's resolution; raise the resolution or add smaller ratios")
    chosen: list[LayerChoice] = []
    c = cap
    for i in range(len(specs) - 1, -1, -1):
        j = int(picks[i][c])
        opt = options[i][j]
        chosen.append(opt)
        c -= math.ceil(opt.params / unit)
    chosen.reverse()
    return chosen
