"""The arithmetic of weight sharing: closed-form channel coefficients, SVD LoRA, RRT initialisations, grouping."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctc.passes.weight_sharing import ChannelFit, average, contiguous_groups, lora_from_residual, stepwise_sources


def test_channel_fit_recovers_scale_and_shift() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 50, 7, generator=g)
    c, beta = torch.rand(7, generator=g) + 0.5, torch.randn(7, generator=g)
    fit = ChannelFit(7, intercept=True)
    for k in range(3):
        fit.update(a[k], a[k] * c + beta)
    got_c, got_b = fit.solve(damping=0.0)
    assert torch.allclose(got_c, c, atol=1e-5) and got_b is not None and torch.allclose(got_b, beta, atol=1e-5)


def test_channel_fit_without_intercept_is_least_squares() -> None:
    g = torch.Generator().manual_seed(1)
    a, t = torch.randn(200, 5, generator=g), torch.randn(200, 5, generator=g)
    fit = ChannelFit(5)
    fit.update(a, t)
    c, beta = fit.solve(damping=0.0)
    assert beta is None
    want = (a.double() * t.double()).sum(0) / (a.double() ** 2).sum(0)
    assert torch.allclose(c.double(), want, atol=1e-6)


def test_channel_fit_leaves_silent_channels_at_one() -> None:
    a = torch.randn(40, 3)
    a[:, 1] = 0.0
    fit = ChannelFit(3, intercept=True)
    fit.update(a, 2 * a + 1)
    c, beta = fit.solve()
    assert float(c[1]) == 1.0 and beta is not None and abs(float(beta[1]) - 1.0) < 1e-6
    assert abs(float(c[0]) - 2.0) < 1e-4


def test_channel_fit_identity_when_shared_equals_target() -> None:
    a = torch.randn(64, 9)
    fit = ChannelFit(9, intercept=True)
    fit.update(a, a.clone())
    c, beta = fit.solve()
    assert torch.allclose(c, torch.ones(9), atol=1e-6) and beta is not None and beta.abs().max() < 1e-6


def test_channel_fit_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="channels"):
        ChannelFit(4).update(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="no rows"):
        ChannelFit(4).solve()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), k=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_lora_full_rank_reproduces_the_original(n: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w, s = torch.randn(n, k, generator=g), torch.randn(n, k, generator=g)
    b, a = lora_from_residual(w, s, max(n, k))
    assert b.shape == (n, min(n, k)) and a.shape == (min(n, k), k)
    assert torch.allclose(s + b @ a, w, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 10), k=st.integers(2, 10), r=st.integers(1, 9), seed=st.integers(0, 10_000))
def test_lora_is_the_best_rank_r_approximation(n: int, k: int, r: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w, s = torch.randn(n, k, generator=g, dtype=torch.float64), torch.randn(n, k, generator=g, dtype=torch.float64)
    b, a = lora_from_residual(w, s, r)
    r_eff = min(r, n, k)
    assert torch.linalg.matrix_rank(b @ a) <= r_eff
    sv = torch.linalg.svdvals(w - s)
    err = float(torch.linalg.matrix_norm(w - s - b @ a) ** 2)
    assert err == pytest.approx(float((sv[r_eff:] ** 2).sum()), rel=1e-6, abs=1e-9)  # Eckart-Young


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 10), k=st.integers(2, 10), r=st.integers(1, 9), seed=st.integers(0, 10_000))
def test_activation_weighted_lora_is_better_for_the_outputs(n: int, k: int, r: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w, s = torch.randn(n, k, generator=g, dtype=torch.float64), torch.randn(n, k, generator=g, dtype=torch.float64)
    x = torch.randn(200, k, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, k, dtype=torch.float64)
    gram = x.T @ x / 200

    def out_err(b: torch.Tensor, a: torch.Tensor) -> float:
        return float(((x @ (w - s - b @ a).T) ** 2).mean())

    plain = lora_from_residual(w, s, r)
    weighted = lora_from_residual(w, s, r, input_gram=gram, damp=0.0)
    assert out_err(*weighted) <= out_err(*plain) * (1 + 1e-9) + 1e-12
    full = lora_from_residual(w, s, max(n, k), input_gram=gram)
    assert torch.allclose(s + full[0] @ full[1], w, atol=1e-8)


def test_lora_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="equal-shaped"):
        lora_from_residual(torch.zeros(2, 3), torch.zeros(3, 2), 1)
    with pytest.raises(ValueError, match="rank"):
        lora_from_residual(torch.zeros(2, 3), torch.zeros(2, 3), 0)


@pytest.mark.parametrize(("first", "last", "groups"), [(0, 5, 3), (0, 29, 15), (0, 29, 10), (2, 9, 4), (0, 17, 9),
                                                       (3, 3, 1), (0, 11, 2)])
def test_stepwise_matches_the_reference_linspace(first: int, last: int, groups: int) -> None:
    want = [round(float(x)) for x in np.linspace(first, last, groups)]
    assert stepwise_sources(first, last, groups) == want


def test_average_is_elementwise_mean() -> None:
    ts = [torch.full((2, 2), float(v)) for v in (1, 2, 6)]
    assert torch.equal(average(ts), torch.full((2, 2), 3.0))
    with pytest.raises(ValueError):
        average([torch.zeros(2), torch.zeros(3)])


def _brute(n: int, units: int, cost, max_size: int) -> float:
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), units - 1):
        bounds = [0, *cuts, n]
        if any(b - a > max_size for a, b in zip(bounds, bounds[1:], strict=False)):
            continue
        best = min(best, sum(cost(a, b) for a, b in zip(bounds, bounds[1:], strict=False)))
    return best


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 8), data=st.data())
def test_contiguous_groups_is_optimal(n: int, data: st.DataObject) -> None:
    max_size = data.draw(st.integers(1, n))
    units = data.draw(st.integers(-(-n // max_size), n))
    table = {(a, b): data.draw(st.floats(0, 10)) for a in range(n) for b in range(a + 1, n + 1)}
    groups, total = contiguous_groups(n, units, lambda a, b: table[(a, b)], max_size=max_size)
    assert len(groups) == units and groups[0][0] == 0 and groups[-1][1] == n
    assert all(a < b and b - a <= max_size for a, b in groups)
    assert all(groups[i][1] == groups[i + 1][0] for i in range(units - 1))
    assert total == pytest.approx(_brute(n, units, lambda a, b: table[(a, b)], max_size))


def test_contiguous_groups_errors() -> None:
    with pytest.raises(ValueError, match="cannot cover"):
        contiguous_groups(5, 2, lambda a, b: 0.0, max_size=2)
    with pytest.raises(ValueError, match="units"):
        contiguous_groups(3, 4, lambda a, b: 0.0)
