"""CalibrationStats: streaming per-channel statistics equal a brute-force computation, bounded memory."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import ctc.passes.analyses.calibration as calib
from ctc.ir import Module, TensorType
from ctc.ir import quant as Q
from ctc.ir.interpreter import value_env
from ctc.passes.analyses import CalibrationStats
from ctc.passes.base import PassContext, PassError


def _model(seed: int = 0, k: int = 8, n: int = 6) -> Module:
    """x -> quant_linear -> lowrank_linear -> out, plus a second quant_linear reading x (shared input)."""
    g = torch.Generator().manual_seed(seed)
    m = Module("calib")
    x = m.add_input("x", TensorType((2, "s0", k), "f32"))
    qw = Q.quantize_weight(torch.randn(n, k, generator=g), 8, -1, True)
    for name, t in (("q.qweight", qw.qweight), ("q.scale", qw.scale), ("q.zero", qw.zero)):
        m.add_param(name, t)
    attrs = {"w_bits": 8, "group_size": -1, "w_symmetric": True, "a_bits": None, "act_clusters": (),
             "has_bias": False}
    ins = [m.param(p, scope="q") for p in ("q.qweight", "q.scale", "q.zero")]
    h = m.create_node("quant_linear", [x, *ins], attrs, scope="q", block=0).output
    h2 = m.create_node("quant_linear", [x, *ins], attrs, scope="q2", block=0).output
    m.add_param("lr.u", torch.randn(n, 2, generator=g))
    m.add_param("lr.v", torch.randn(2, n, generator=g))
    y = m.create_node("lowrank_linear", [h, m.param("lr.u", scope="lr"), m.param("lr.v", scope="lr")],
                      {"rank": 2}, scope="lr", block=1).output
    m.set_outputs([y, h2], ["y", "h2"])
    return m


def _batches(n: int, seed: int = 1, k: int = 8, seqs: tuple[int, ...] = (3, 5, 1)) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(2, seqs[i % len(seqs)], k, generator=g) * (1 + i)} for i in range(n)]


def _brute(m: Module, batches: list[dict[str, torch.Tensor]], value: str) -> torch.Tensor:
    rows = [value_env(m, b)[value].reshape(-1, value_env(m, b)[value].shape[-1]) for b in batches]
    return torch.cat(rows).double()


def test_stats_equal_brute_force() -> None:
    m = _model()
    batches = _batches(4)
    ctx = PassContext(calibration=batches)
    res = ctx.get(CalibrationStats(output_ops=("lowrank_linear",)), m)
    # Points: x (input of both quant_linears, observed once), and the lowrank output.
    qn = [n for n in m.nodes if n.op == "quant_linear"]
    lr = next(n for n in m.nodes if n.op == "lowrank_linear")
    assert set(res.stats) == {"x", lr.output.name}
    assert res.input_of(qn[0]) is res.input_of(qn[1]) is res["x"]
    assert res.outputs[lr.output.name] == [lr.output.name]
    assert res.batches == 4
    for name in res.stats:
        X = _brute(m, batches, name)
        s = res[name]
        assert s.rows == X.shape[0] and s.channels == X.shape[1]
        torch.testing.assert_close(s.min, X.amin(0))
        torch.testing.assert_close(s.max, X.amax(0))
        torch.testing.assert_close(s.abs_max, X.abs().amax(0))
        torch.testing.assert_close(s.abs_mean, X.abs().mean(0))
        torch.testing.assert_close(s.mean, X.mean(0))
        torch.testing.assert_close(s.var, X.var(0, unbiased=False))


def test_hessian_and_reservoir() -> None:
    m = _model()
    batches = _batches(5)
    ctx = PassContext(calibration=batches, seed=3)
    res = ctx.get(CalibrationStats(hessian=True, reservoir=7), m)
    X = _brute(m, batches, "x")
    s = res["x"]
    torch.testing.assert_close(s.xtx, X.T @ X)
    assert s.xtx.dtype == torch.float64
    torch.testing.assert_close(s.hessian, X.T @ X / X.shape[0])
    # The reservoir holds 7 distinct rows, each one of the observed rows.
    assert s.reservoir is not None and s.reservoir.shape == (7, 8)
    Xf = X.float()
    for row in s.reservoir:
        assert bool((Xf == row).all(1).any())
    assert len({tuple(r.tolist()) for r in s.reservoir}) == 7
    # Seeded: the same config and seed give the same sample; another seed a different one.
    again = PassContext(calibration=batches, seed=3).get(CalibrationStats(hessian=True, reservoir=7), m)
    assert torch.equal(again["x"].reservoir, s.reservoir)
    other = PassContext(calibration=batches, seed=4).get(CalibrationStats(hessian=True, reservoir=7), m)
    assert not torch.equal(other["x"].reservoir, s.reservoir)
    # A point's sample does not depend on which other points are collected.
    lr = next(n for n in m.nodes if n.op == "lowrank_linear").output.name
    more = PassContext(calibration=batches, seed=3).get(
        CalibrationStats(values=(lr,), input_ops=(), reservoir=7), m)
    alone = PassContext(calibration=batches, seed=3).get(
        CalibrationStats(values=("x", lr), input_ops=(), reservoir=7), m)
    assert torch.equal(more[lr].reservoir, alone[lr].reservoir)
    assert torch.equal(alone["x"].reservoir, s.reservoir)


def test_reservoir_is_uniform() -> None:
    """Every row is equally likely to be sampled (Algorithm R), checked over many seeds."""
    m = Module("id")
    x = m.add_input("x", TensorType((4, 1), "f32"))
    m.add_param("u", torch.ones(1, 1))
    m.add_param("v", torch.ones(1, 1))
    y = m.create_node("lowrank_linear", [x, m.param("u"), m.param("v")], {"rank": 1}).output
    m.set_outputs([y])
    batches = [{"x": torch.arange(4 * i, 4 * i + 4, dtype=torch.float32).reshape(4, 1)} for i in range(5)]
    counts = torch.zeros(20)
    trials = 300
    for seed in range(trials):
        res = PassContext(calibration=batches, seed=seed).get(
            CalibrationStats(input_ops=("lowrank_linear",), reservoir=5), m)
        counts[res["x"].reservoir.flatten().long()] += 1
    expected = trials * 5 / 20  # 75 per row
    assert counts.sum() == trials * 5
    assert float((counts - expected).abs().max()) < 0.4 * expected, counts


def test_memory_bounded_no_activations_retained(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _model()
    seen: list[weakref.ref] = []
    real = calib.interpret

    def spying(module, inputs, *, observer=None, params=None):  # noqa: ANN001, ANN202
        def obs(node, args, outs):  # noqa: ANN001, ANN202
            observer(node, args, outs)
            seen.extend(weakref.ref(t) for t in outs if node.op != "param")
        return real(module, inputs, observer=obs, params=params)

    monkeypatch.setattr(calib, "interpret", spying)
    small = PassContext(calibration=_batches(2)).get(CalibrationStats(output_ops=("lowrank_linear",)), m)
    big = PassContext(calibration=_batches(12)).get(CalibrationStats(output_ops=("lowrank_linear",)), m)
    gc.collect()
    assert seen and all(r() is None for r in seen), "an activation tensor outlived the analysis"
    # Memory is channels x points: the same for 2 and for 12 batches.
    assert big.nbytes() == small.nbytes() > 0
    assert (small["x"].rows, big["x"].rows) == (2 * (3 + 5), 2 * 4 * (3 + 5 + 1))


def test_value_points_and_errors() -> None:
    m = _model()
    ctx = PassContext(calibration=_batches(2))
    lr = next(n for n in m.nodes if n.op == "lowrank_linear")
    res = ctx.get(CalibrationStats(input_ops=(), values=("x", lr.output.name)), m)
    assert set(res.stats) == {"x", lr.output.name}
    with pytest.raises(PassError, match=r"no value %xx; did you mean %x\?"):
        ctx.get(CalibrationStats(values=("xx",)), m)
    with pytest.raises(PassError, match="did you mean 'reservoir'"):
        CalibrationStats(resevoir=3)
    with pytest.raises(PassError, match="needs calibration batches"):
        PassContext().get(CalibrationStats(), m)
    with pytest.raises(PassError, match="no calibration statistics for %nope"):
        res["nope"]
    with pytest.raises(PassError, match="hessian=True"):
        _ = res["x"].hessian


def test_changing_channel_dim_is_an_error() -> None:
    m = Module("seqlast")
    x = m.add_input("x", TensorType((1, "s0"), "f32"))
    m.add_param("u", torch.ones(1, 1))
    y = m.create_node("lowrank_linear", [m.param("u"), m.param("u"), m.param("u")], {"rank": 1}).output
    m.set_outputs([x, y])
    ctx = PassContext(calibration=[{"x": torch.ones(1, 3)}, {"x": torch.ones(1, 4)}])
    with pytest.raises(PassError, match="last dim is 4 on this batch but was 3"):
        ctx.get(CalibrationStats(input_ops=(), values=("x",)), m)


def test_cached_and_progress() -> None:
    m = _model()
    calls: list[tuple[str, int, int]] = []
    ctx = PassContext(calibration=_batches(3), progress=lambda w, d, t: calls.append((w, d, t)))
    a = ctx.get(CalibrationStats(), m)
    b = ctx.get(CalibrationStats(), m)
    assert a is b and ctx.computed == ["calibration-stats"]
    assert calls == [("calibration", 1, 3), ("calibration", 2, 3), ("calibration", 3, 3)]
    c = ctx.get(CalibrationStats(max_batches=1), m)  # another config: another entry
    assert c is not a and c.batches == 1
    ctx.invalidate()
    assert ctx.get(CalibrationStats(), m) is not a
