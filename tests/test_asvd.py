"""``asvd``: the low-rank rewrite, sensitivity measurement, allocation inside the pass, options and errors."""

from __future__ import annotations

import pytest
import torch
from hf_configs import captured, hf_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_transformers import outlier_inputs, tiny_transformer

from ctc.ir.interpreter import interpret
from ctc.ir.rewrite import Rewriter, apply_once
from ctc.ir.text import parse, print_module
from ctc.passes.analyses.replay import CalibrationReplay
from ctc.passes.asvd import LowRankSensitivity, lowrank_candidates, lowrank_rule
from ctc.passes.base import PassContext, PassError, Selector, get_pass
from ctc.passes.lowrank import factorize, rank_for_ratio
from ctc.passes.manager import PassManager, PipelineError, Step

CALIB = [hf_inputs(2, 10, seed=s) for s in range(2)]


def _run(module, opts: dict, calib=CALIB, selector: Selector | None = None):
    step = Step(get_pass("asvd")(opts), selector or Selector())
    return PassManager([step], calibration=calib, progress=False).run(module)


GOLDEN_IN = """
module t {
  param "fc.weight" : f32[6, 8]
  param "fc.bias" : f32[6]
  input %x : f32[2, 8]
  %w = param() {name = "fc.weight"} : f32[6, 8]  loc("fc", block=0)
  %b = param() {name = "fc.bias"} : f32[6]  loc("fc", block=0)
  %y = linear(%x, %w, %b) : f32[2, 6]  loc("fc", block=0)
  return %y as "y"
}
"""

GOLDEN_OUT = """
module t {
  param "fc.bias" : f32[6]
  param "fc.lowrank_u" : f32[6, 2]
  param "fc.lowrank_v" : f32[2, 8]
  input %x : f32[2, 8]
  %b = param() {name = "fc.bias"} : f32[6]  loc("fc", block=0)
  %fc.lowrank_u = param() {name = "fc.lowrank_u"} : f32[6, 2]  loc("fc", block=0)
  %fc.lowrank_v = param() {name = "fc.lowrank_v"} : f32[2, 8]  loc("fc", block=0)
  %fc_lowrank_linear = lowrank_linear(%x, %fc.lowrank_u, %fc.lowrank_v, %b) {rank = 2} : f32[2, 6]  loc("fc", block=0)
  return %fc_lowrank_linear as "y"
}
"""


def test_golden_plain_svd() -> None:
    g = torch.Generator().manual_seed(0)
    m = parse(GOLDEN_IN, params={"fc.weight": torch.randn(6, 8, generator=g), "fc.bias": torch.randn(6, generator=g)})
    out, rep = _run(m, {"ratio": 0.6, "scaling": "none", "allocation": "uniform"}, calib=[{"x": torch.randn(2, 8)}])
    assert print_module(out).strip() == GOLDEN_OUT.strip()  # rank floor(0.6 * 6 * 8 / (6 + 8)) = 2
    u, v = out.params["fc.lowrank_u"], out.params["fc.lowrank_v"]
    w2 = factorize(m.params["fc.weight"]).dense(2)
    assert torch.allclose(u @ v, w2, atol=1e-5)
    rec = rep.records[0]
    assert rec.rewrites["patterns"] == {"asvd-lowrank": 1} and rec.rewrites["params_removed"] == 1


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), kind=st.sampled_from(["llama", "bert"]), absorb=st.sampled_from(["uv", "u", "v"]))
def test_full_rank_pattern_reproduces_every_linear(seed: int, kind: str, absorb: str) -> None:
    m = tiny_transformer(kind, layers=2, seed=seed)
    x = outlier_inputs(m, 1, seed=seed)[0]
    ref = interpret(m, x)[0]
    cands = {c.weight: c for c in lowrank_candidates(m, Selector(), blocks_only=False)[0]}
    s = torch.rand(m.inputs[0].type.shape[-1]) + 0.5

    def full(weight: str):
        c = cands.get(weight)
        if c is None:
            return None
        sc = s if c.k == s.numel() else None
        u, v = factorize(m.params[weight], scale=sc).factors(min(c.n, c.k), absorb)
        return u, v, min(c.n, c.k)

    out = m.clone()
    rw = Rewriter(out)
    log = apply_once(rw, [lowrank_rule(full)])
    rw.finish()
    assert log.fired["asvd-lowrank"] == len(cands) and "linear" not in out.op_counts()
    got = interpret(out, x)[0]
    assert torch.allclose(got, ref, atol=1e-3 * float(ref.abs().max()), rtol=1e-4)


def test_sensitivity_equals_the_loss_of_the_factorised_model() -> None:
    _, m = captured("llama")
    ctx = PassContext(calibration=CALIB)
    cands, _ = lowrank_candidates(m, Selector(), True)
    c = cands[3]
    sens = ctx.get(LowRankSensitivity(weights=(c.weight,), scaling="abs_mean", alpha=0.5, ratios=(0.3, 0.6),
                                      rank_align=1, batches=2), m)
    assert set(sens.losses) == {c.weight} and set(sens.losses[c.weight]) == {0.3, 0.6}
    # Rewrite that one linear at ratio 0.3 for real and measure the whole model.
    from ctc.passes.asvd import factorization_of

    rank = rank_for_ratio(c.n, c.k, 0.3)
    u, v = factorization_of(m, c, ctx, "abs_mean", 0.5).factors(rank)
    out = m.clone()
    rw = Rewriter(out)
    apply_once(rw, [lowrank_rule(lambda w: (u, v, rank) if w == c.weight else None)])
    rw.finish()
    actual = PassContext(calibration=CALIB).get(CalibrationReplay(), out).base_loss
    assert actual == pytest.approx(sens.losses[c.weight][0.3], rel=1e-4)
    assert sens.base_loss == pytest.approx(ctx.get(CalibrationReplay(), m).base_loss)


@pytest.mark.parametrize("allocation", ["threshold", "knapsack", "uniform"])
def test_pass_meets_the_target_and_reports(allocation: str) -> None:
    _, m = captured("llama")
    out, rep = _run(m, {"ratio": 0.7, "allocation": allocation, "ratios": [0.3, 0.5, 0.7, 0.9]})
    r = rep.records[0]
    dense, got = r.metrics["asvd_linear_params"]
    assert got <= 0.7 * dense and r.metrics["asvd_ratio"] == pytest.approx(got / dense)
    n_low = out.op_counts().get("lowrank_linear", 0)
    assert n_low == r.metrics["asvd_factorised"] > 0
    assert out.op_counts().get("linear", 0) == 1 + r.metrics["asvd_dense"]  # the LM head stays (blocks_only)
    assert out.param_count() < m.param_count()
    lowrank_params = sum(t.numel() for k, t in out.params.items() if "lowrank" in k)
    assert lowrank_params == sum(lay["rank"] * sum(lay["shape"]) for lay in r.metrics["asvd_layers"] if lay["rank"])
    assert "linears factorised" in r.notes[-1]


def test_activation_aware_beats_plain_svd_on_outlier_channels() -> None:
    """The paper's premise: with a few channels carrying large activations, scaling by them keeps the
    directions that matter for the output."""
    m = tiny_transformer("llama", layers=2, d=32, ff=64, seed=1)
    calib = outlier_inputs(m, 3, seed=2, outliers=3, gain=20.0)
    cos = {}
    for scaling in ("abs_mean", "none", "whiten"):
        _, rep = _run(m, {"ratio": 0.6, "scaling": scaling, "allocation": "uniform"}, calib=calib)
        cos[scaling] = rep.records[0].fidelity.cosine
    assert cos["abs_mean"] > cos["none"] and cos["whiten"] > cos["none"]


def test_selector_and_tied_weights() -> None:
    _, m = captured("llama")
    out, rep = _run(m, {"ratio": 0.5, "allocation": "uniform"}, selector=Selector(blocks=((1, 2),)))
    assert {n.block for n in out.nodes if n.op == "lowrank_linear"} == {1}
    assert {n.block for n in out.nodes if n.op == "linear"} == {0, None}
    # blocks_only=false reaches the LM head; a weight read twice (tied) is left dense with a note.
    t = m.clone()
    head = next(n for n in t.nodes if n.op == "linear" and n.block is None)
    name = head.operand("weight").producer.attrs["name"]
    emb = t.create_node("add", [head.operand("weight"), head.operand("weight")], before=head)  # a second reader
    t.set_outputs([*t.outputs, emb.output], [*t.output_names, "tied"])
    out2, rep2 = _run(t, {"ratio": 0.5, "allocation": "uniform", "blocks_only": False})
    assert any(f"weight {name} is shared" in line for line in rep2.records[0].notes)
    assert name in out2.params


def test_encoder_sensitivity_uses_output_cosine() -> None:
    _, m = captured("bert")
    ctx = PassContext(calibration=CALIB)
    cands, _ = lowrank_candidates(m, Selector(), True)
    sens = ctx.get(LowRankSensitivity(weights=(cands[0].weight,), scaling="abs_mean", alpha=0.5, ratios=(0.2,),
                                      rank_align=1, batches=1), m)
    assert sens.kind == "cosine" and sens.base_loss == 0.0 and 0 < sens.losses[cands[0].weight][0.2] < 1


def test_bad_options_and_no_linear() -> None:
    cls = get_pass("asvd")
    with pytest.raises(PassError, match="above its maximum"):
        cls({"ratio": 1.5})
    with pytest.raises(PassError, match="must be above 0"):
        cls({"ratio": 0.0})
    with pytest.raises(PassError, match="not in"):
        cls({"ratios": [0.5, 1.0]})
    _, m = captured("llama")
    probs = cls.check_module(cls.Options(), m, Selector(ops=("silu",)))
    assert probs == [("selector", "asvd: the selector matches no linear (op silu)")]
    with pytest.raises(PipelineError, match="no linear"):
        _run(m, {"ratio": 0.5}, selector=Selector(ops=("silu",)))
    with pytest.raises(PipelineError, match="smallest candidate ratios"):
        _run(m, {"ratio": 0.05, "ratios": [0.5]})
