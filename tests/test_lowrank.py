"""Low-rank factorisation and rank allocation (the math of ``asvd``): properties and exact cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctc.passes.lowrank import (
    AllocationError,
    LayerSpec,
    allocate_knapsack,
    allocate_threshold,
    allocate_uniform,
    allocation_params,
    cholesky_factor,
    factorize,
    lowrank_params,
    rank_for_ratio,
    scaling_vector,
)

shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def _transform(kind: str, k: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "scale":
        return {"scale": scaling_vector(torch.rand(k, generator=g) * 10, 0.5)}
    if kind == "chol":
        x = torch.randn(3 * k + 2, k, generator=g, dtype=torch.float64)
        return {"chol": cholesky_factor(x.T @ x / x.shape[0])}
    return {}


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10_000), kind=st.sampled_from(["none", "scale", "chol"]),
       absorb=st.sampled_from(["uv", "u", "v"]))
def test_full_rank_reproduces_the_weight(shape: tuple[int, int], seed: int, kind: str, absorb: str) -> None:
    n, k = shape
    w = _weight(n, k, seed)
    fac = factorize(w, **_transform(kind, k, seed))
    u, v = fac.factors(min(n, k), absorb)
    assert u.shape == (n, min(n, k)) and v.shape == (min(n, k), k)
    assert torch.allclose(u.double() @ v.double(), w.double(), atol=1e-5, rtol=1e-5)
    assert torch.allclose(fac.dense(min(n, k)), w, atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10_000), kind=st.sampled_from(["none", "scale", "chol"]),
       absorb=st.sampled_from(["uv", "u", "v"]), frac=st.floats(0.0, 1.0))
def test_pair_has_rank_at_most_r(shape: tuple[int, int], seed: int, kind: str, absorb: str, frac: float) -> None:
    n, k = shape
    fac = factorize(_weight(n, k, seed), **_transform(kind, k, seed))
    r = max(1, int(frac * min(n, k)))
    u, v = fac.factors(r, absorb)
    assert u.shape == (n, r) and v.shape == (r, k)
    assert int(torch.linalg.matrix_rank(u.double() @ v.double())) <= r
    # The absorbed factors and the dense approximation are the same matrix.
    assert torch.allclose(u.double() @ v.double(), fac.dense(r).double(), atol=1e-4, rtol=1e-4)


def test_truncation_is_optimal_in_the_transformed_norm() -> None:
    """Eckart-Young in the weighted norm: ASVD's rank-r W' minimises ||(W - W') S|| over rank-r matrices,
    so it beats plain SVD there (and plain SVD wins in the unweighted norm)."""
    w = _weight(16, 12, 3)
    s = scaling_vector(torch.linspace(0.01, 30, 12), 1.0)
    asvd, plain = factorize(w, scale=s).dense(4).double(), factorize(w).dense(4).double()
    w64, s64 = w.double(), s.unsqueeze(0)
    assert ((w64 - asvd) * s64).norm() < ((w64 - plain) * s64).norm()
    assert (w64 - plain).norm() < (w64 - asvd).norm()
    # Weighted error equals the tail singular values of W S.
    sig = torch.linalg.svdvals(w64 * s64)
    assert math.isclose(float(((w64 - asvd) * s64).norm()), float(sig[4:].norm()), rel_tol=1e-6)


def test_whitening_minimises_output_error_on_the_calibration_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=g, dtype=torch.float64) * torch.linspace(0.1, 5, 10, dtype=torch.float64)
    x[:, 3] += 2 * x[:, 7]  # correlated channels: a diagonal scale cannot capture this
    w = _weight(8, 10, 1)
    chol = cholesky_factor(x.T @ x / x.shape[0])
    err = {kind: float((x @ (w.double() - f.dense(3).double()).T).norm())
           for kind, f in (("white", factorize(w, chol=chol)), ("plain", factorize(w)),
                           ("diag", factorize(w, scale=scaling_vector(x.abs().mean(0), 0.5))))}
    assert err["white"] <= err["diag"] + 1e-9 and err["white"] <= err["plain"] + 1e-9


def test_cholesky_of_singular_hessian_factorises() -> None:
    x = torch.randn(50, 6, dtype=torch.float64)
    x[:, 2] = 0  # a channel the calibration never excited
    lo = cholesky_factor(x.T @ x / 50)
    assert torch.isfinite(lo).all() and torch.allclose(torch.tril(lo), lo)


@given(n=st.integers(1, 4000), k=st.integers(1, 4000), ratio=st.floats(0.01, 1.0), align=st.sampled_from([1, 8]))
def test_rank_for_ratio_fits(n: int, k: int, ratio: float, align: int) -> None:
    r = rank_for_ratio(n, k, ratio, align)
    assert r % align == 0 and 0 <= r <= min(n, k)
    assert lowrank_params(n, k, r) <= ratio * n * k + 1e-6
    nxt = r + align
    assert nxt > min(n, k) or lowrank_params(n, k, nxt) > ratio * n * k - 1e-6


RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


@st.composite
def layer_sets(draw: st.DrawFn) -> list[LayerSpec]:
    layers = []
    for i in range(draw(st.integers(1, 8))):
        n, k = draw(st.integers(8, 300)), draw(st.integers(8, 300))
        sens = draw(st.floats(0.0, 5.0))
        noise = draw(st.lists(st.floats(0.0, 0.5), min_size=len(RATIOS), max_size=len(RATIOS)))
        losses = {r: 3.0 + sens * (1 - r) ** 2 + e for r, e in zip(RATIOS, noise, strict=True)}
        layers.append(LayerSpec(f"l{i}", n, k, losses))
    return layers


@settings(max_examples=80, deadline=None)
@given(specs=layer_sets(), target=st.floats(0.2, 1.0), method=st.sampled_from(["threshold", "knapsack", "uniform"]))
def test_allocation_meets_its_target(specs: list[LayerSpec], target: float, method: str) -> None:
    total = sum(s.n * s.k for s in specs)
    try:
        if method == "threshold":
            choices, _ = allocate_threshold(specs, target, RATIOS)
        elif method == "knapsack":
            choices = allocate_knapsack(specs, target, RATIOS, base_loss=3.0)
        else:
            choices = allocate_uniform(specs, target)
    except AllocationError:
        # Only when even the smallest candidates (or the uniform ranks) cannot fit.
        least = sum(min([s.n * s.k] + [lowrank_params(s.n, s.k, r) for r in
                                       (rank_for_ratio(s.n, s.k, q) for q in RATIOS) if r]) for s in specs)
        assert method == "uniform" or least > math.floor(target * total + 1e-6)
        return
    assert allocation_params(choices) <= target * total + 1e-6
    for c, s in zip(choices, specs, strict=True):
        assert c.key == s.key
        assert c.dense == (c.rank == 0)
        assert c.params == (s.n * s.k if c.dense else lowrank_params(s.n, s.k, c.rank))
        assert c.dense or lowrank_params(s.n, s.k, c.rank) < s.n * s.k  # never a pair that saves nothing


def test_knapsack_is_no_worse_than_threshold_on_additive_losses() -> None:
    g = torch.Generator().manual_seed(0)
    specs = []
    for i in range(12):
        sens = float(torch.rand(1, generator=g)) * 4
        specs.append(LayerSpec(f"l{i}", 64 + 16 * i, 96, {r: 3.0 + sens * (1 - r) ** 3 for r in RATIOS}))
    for target in (0.9, 0.7, 0.5):
        thr, _ = allocate_threshold(specs, target, RATIOS)
        ks = allocate_knapsack(specs, target, RATIOS, base_loss=3.0)

        def damage(cs: list) -> float:
            return sum(0.0 if c.dense else s.losses[c.ratio] - 3.0 for c, s in zip(cs, specs, strict=True))

        assert damage(ks) <= damage(thr) + 1e-9


def test_threshold_prefers_insensitive_layers() -> None:
    flat = LayerSpec("flat", 100, 100, {r: 3.0 + 0.01 * (1 - r) for r in RATIOS})
    steep = LayerSpec("steep", 100, 100, {r: 3.0 + 10 * (1 - r) for r in RATIOS})
    choices, _ = allocate_threshold([flat, steep], 0.6, RATIOS)
    by = {c.key: c for c in choices}
    assert by["flat"].ratio < by["steep"].ratio


def test_infeasible_target_is_an_error() -> None:
    spec = LayerSpec("a", 10, 10, {0.5: 1.0})
    with pytest.raises(AllocationError, match="smaller candidate ratios"):
        allocate_threshold([spec], 0.1, [0.5])
    with pytest.raises(AllocationError, match=r"\(0, 1\]"):
        allocate_uniform([spec], 1.5)


@pytest.mark.parametrize("rows", [1, 4])
def test_tvm_lowering_pads_the_rank_with_replayable_sources(rows: int) -> None:
    """The TVM lowering pads an odd rank to whole SIMD vectors (one row: GEMVs over the stored layout,
    several: matmuls over the transposed one); every bound factor is derived from the module's own
    parameters by its recorded source, and the dense ``u v`` is never bound."""
    pytest.importorskip("tvm")
    from ctc.backends.tvm.lower import derive_param, lower
    from ctc.ir import Module, TensorType

    m = Module("lowrank")
    x = m.add_input("x", TensorType((rows, 8), "f32"))
    m.add_param("u", _weight(12, 3, 0))
    m.add_param("v", _weight(3, 8, 1))
    y = m.create_node("lowrank_linear", {"x": x, "u": m.param("u"), "v": m.param("v")}, attrs={"rank": 3})
    m.set_outputs([y.output], ["y"])
    low = lower(m, params="input")
    shapes = sorted(tuple(a.shape) for _, a in low.param_inputs)
    assert shapes == ([(12, 16), (16, 8)] if rows == 1 else [(8, 16), (16, 12)])
    for (_, arr), src in zip(low.param_inputs, low.param_sources, strict=True):
        assert src is not None and src["op"] in ("pad", "pad_transpose")
        assert torch.equal(derive_param(src, m.params), torch.from_numpy(arr))


def test_knapsack_cuts_only_what_the_budget_needs_when_cuts_measure_below_the_base_loss() -> None:
    """Cuts measured slightly *better* than the dense model (calibration noise, common on a few hundred
    tokens) are not gains: the knapsack still lands at its target instead of cutting every such layer."""
    specs = [LayerSpec(f"l{i}", 256, 256, {r: 3.0 - 0.01 * (i + 1) + 0.5 * (1 - r) ** 2 for r in RATIOS})
             for i in range(10)]
    total = sum(s.n * s.k for s in specs)
    for target in (0.97, 0.9):
        got = allocation_params(allocate_knapsack(specs, target, RATIOS, base_loss=3.0))
        assert target * total - 256 * 256 / 4 <= got <= target * total  # no more cut than the budget needs
