"""``recursive`` (Relaxed Recursive Transformers): tiles, initialisations, SVD LoRA as separate ops, ratio."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_transformers import outlier_inputs, tiny_transformer

from ctc.ir.graph import Module
from ctc.ir.interpreter import interpret
from ctc.ir.verify import verify
from ctc.passes.base import PassContext, PassError, Selector, get_pass
from ctc.passes.block_tying import param_reads
from ctc.passes.weight_sharing import average


def tiny(kind: str = "llama", layers: int = 4, seed: int = 0, **kw: int) -> Module:
    m = tiny_transformer(kind, layers=layers, seq=8, seed=seed, **kw)
    m.meta["block_prefix"] = "layers"
    return m


def run(m: Module, opts: dict, calib: list[dict[str, torch.Tensor]], selector: Selector | None = None
        ) -> tuple[Module, PassContext]:
    ctx = PassContext(calibration=calib, selector=selector or Selector())
    out = get_pass("recursive")(opts).run(m.clone(), ctx)
    verify(out)
    return out, ctx


@settings(max_examples=6, deadline=None)
@given(kind=st.sampled_from(["llama", "bert"]), seed=st.integers(0, 1000), loops=st.integers(2, 4),
       init=st.sampled_from(["average", "stepwise"]), lora_init=st.sampled_from(["svd", "activation"]))
def test_full_rank_lora_reproduces_every_block(kind: str, seed: int, loops: int, init: str, lora_init: str) -> None:
    m = tiny(kind, seed=seed)
    calib = outlier_inputs(m, 2, seed=seed)
    out, _ = run(m, {"loops": loops, "rank": 64, "init": init, "lora_init": lora_init}, calib)
    for b in calib:
        ref = interpret(m, b)[0]
        got = interpret(out, b)[0]
        assert torch.allclose(got, ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)


def test_lora_stays_a_separate_op_on_one_shared_weight() -> None:
    m = tiny()
    out, ctx = run(m, {"loops": 2, "rank": 4, "init": "average"}, outlier_inputs(m, 2))
    counts = out.op_counts()
    assert counts["lowrank_linear"] == 4 * 7  # every position of every tile, every tied linear
    assert counts["linear"] == m.op_counts()["linear"]  # no dense copy rebuilt
    shared = [k for k in out.params if ".loop_" in k]
    assert len(shared) == 2 * 7 and all(param_reads(out)[k] == 2 for k in shared)
    # the shared weight of tile 0..1 is the mean of the two originals
    q = out.params["layers.loop_0_1.attn.q.weight"]
    assert torch.allclose(q, average([m.params["layers.0.attn.q.weight"], m.params["layers.1.attn.q.weight"]]))
    for n in out.nodes:
        if n.op == "lowrank_linear":
            (user,) = n.output.users
            assert user.op == "add" and any(v.producer.op == "linear" for v in user.inputs if v.producer)
    assert ctx.metrics["lora_linears"] == 28


def test_stepwise_without_lora_is_plain_layer_tying() -> None:
    m = tiny(layers=6)
    out, ctx = run(m, {"loops": 2, "rank": 0}, outlier_inputs(m, 2))
    assert "lowrank_linear" not in out.op_counts()
    # round(linspace(0, 5, 3)), half to even
    assert ctx.metrics["init"] == "stepwise" and ctx.metrics["sources"] == [0, 2, 5]
    assert torch.equal(out.params["layers.loop_2_3.attn.q.weight"], m.params["layers.2.attn.q.weight"])
    # the source block reads its own weight, so it needs no LoRA even when one is asked for
    out, ctx = run(m, {"loops": 2, "rank": 4, "init": "stepwise"}, outlier_inputs(m, 2))
    assert ctx.metrics["lora_linears"] == 3 * 7


def test_leftover_blocks_keep_their_weights() -> None:
    m = tiny(layers=5)
    out, ctx = run(m, {"loops": 2, "rank": 0}, outlier_inputs(m, 2))
    assert ctx.metrics["groups"] == [[0, 1], [2, 3]]
    assert "layers.4.attn.q.weight" in out.params and any("blocks [4]" in n for n in ctx.notes)


def test_ratio_ties_only_the_cheapest_tiles_needed() -> None:
    m = tiny(layers=6, d=64, ff=128)
    calib = outlier_inputs(m, 3)
    out, ctx = run(m, {"loops": 2, "rank": 2, "ratio": 0.8}, calib)
    tied = [g for g in ctx.metrics["groups"] if len(g) > 1]
    assert 1 <= len(tied) < 3 and ctx.metrics["blocks_ratio"] <= 0.8
    costs = [float(x) for x in next(n for n in ctx.notes if "tied the cheapest" in n).split("costs ")[1]
             .rstrip(")").split(", ")]
    assert len(costs) == len(tied)
    with pytest.raises(PassError, match="cannot be reached"):
        run(m, {"loops": 2, "rank": 32, "ratio": 0.5}, calib)


def test_lora_beats_plain_tying_at_the_same_tiles() -> None:
    m = tiny(layers=4, d=64, ff=128, seed=7)
    calib = outlier_inputs(m, 3)
    ref = [interpret(m, b)[0] for b in calib]

    def err(out: Module) -> float:
        return sum(float((interpret(out, b)[0] - r).norm()) for b, r in zip(calib, ref, strict=True))

    plain, _ = run(m, {"loops": 2, "rank": 0, "init": "average"}, calib)
    relaxed, _ = run(m, {"loops": 2, "rank": 8, "init": "average"}, calib)
    weighted, _ = run(m, {"loops": 2, "rank": 8, "init": "average", "lora_init": "activation"}, calib)
    assert err(weighted) < err(relaxed) < err(plain)


def test_selection_and_errors() -> None:
    m = tiny(layers=4)
    calib = outlier_inputs(m, 2)
    out, ctx = run(m, {"loops": 2, "rank": 0}, calib, Selector(blocks=((2, 4),)))
    assert ctx.metrics["groups"] == [[2, 3]] and "layers.0.attn.q.weight" in out.params
    with pytest.raises(PassError, match="no run of 3"):
        run(m, {"loops": 3, "rank": 0}, calib, Selector(blocks=((0, 2),)))
    with pytest.raises(PassError, match="loops"):
        get_pass("recursive")({"loops": 1})
    with pytest.raises(PassError, match="init"):
        get_pass("recursive")({"init": "upper"})
