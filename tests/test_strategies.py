"""The random-module strategies themselves: valid, runnable, and varied enough to test passes with."""

from __future__ import annotations

from collections import Counter

import torch
from hypothesis import given, settings
from strategies import available_builders, module_and_inputs, modules

from ctc.ir import interpret
from ctc.ir.verify import verify


@settings(max_examples=60, deadline=None)
@given(module_and_inputs())
def test_generated_modules_verify_and_run_finite(mi):
    m, inputs = mi
    verify(m)
    assert m.outputs and all(n.scope for n in m.nodes)
    for t in interpret(m, inputs):
        assert torch.isfinite(t).all()


def _has_dead(m) -> bool:
    live = {id(v.producer) for v in m.outputs if v.producer is not None}
    for n in reversed(m.nodes):
        if id(n) in live:
            live |= {id(v.producer) for v in n.inputs if v.producer is not None}
    return any(id(n) not in live for n in m.nodes)


FEATURES = {
    "param read by two param nodes":
        lambda m: max(Counter(n.attrs["name"] for n in m.nodes if n.op == "param").values(), default=0) >= 2,
    "param value read by two nodes": lambda m: any(n.op == "param" and len(n.outputs[0].users) >= 2 for n in m.nodes),
    "exact duplicate node": lambda m: len({(n.op, tuple(map(id, n.inputs)), repr(n.attrs)) for n in m.nodes
                                           if n.op != "param"}) < sum(n.op != "param" for n in m.nodes),
    "dead node": _has_dead,
    "symbolic input": lambda m: any(v.type.symbols for v in m.inputs),
    "static input": lambda m: all(not v.type.symbols for v in m.inputs),
    "two outputs": lambda m: len(m.outputs) >= 2,
    "block-less node": lambda m: any(n.block is None for n in m.nodes),
    "integer value": lambda m: any(v.type.dtype in ("i32", "i64") for n in m.nodes for v in n.outputs),
    "bool value": lambda m: any(v.type.dtype == "bool" for n in m.nodes for v in n.outputs),
    "integer input": lambda m: any(v.type.dtype == "i64" for v in m.inputs),
    "scalar-attribute operand": lambda m: any(n.attrs.get("scalar") is not None for n in m.nodes),
}


def test_strategy_reaches_shared_params_duplicates_dead_code_and_symbols_and_every_builder():
    seen_features: set[str] = set()
    seen_ops: Counter = Counter()

    # derandomized: whether 200 random draws reach every rare op is luck, and a test must not fail on luck
    @settings(max_examples=200, deadline=None, database=None, derandomize=True)
    @given(modules())
    def collect(m):
        seen_ops.update(m.op_counts())
        seen_features.update(k for k, f in FEATURES.items() if f(m))

    collect()
    assert seen_features == set(FEATURES)
    assert {"channel_permute", "lowrank_linear", "quant_linear"} <= set(seen_ops)
    if "linear" in available_builders():
        assert "linear" in seen_ops
    if "attention" in available_builders():
        # the attention builder picks one of three ops; whether 200 mixed examples reach each of them
        # depends on how earlier draws went, so check the builder's reach on its own
        attn: Counter = Counter()

        @settings(max_examples=60, deadline=None, database=None, derandomize=True)
        @given(modules(builders=["attention"]))
        def collect_attention(m):
            attn.update(m.op_counts())

        collect_attention()
        assert {"scaled_dot_product_attention", "sparse_attention", "calibrated_attention"} <= set(attn)
    if "unary" in available_builders() or "binary" in available_builders():
        assert len(seen_ops) >= 8
    if "bool_flow" in available_builders():
        assert {"where", "masked_fill", "logical_not"} <= set(seen_ops)
    if "embedding" in available_builders():
        assert "embedding" in seen_ops


@settings(max_examples=40, deadline=None)
@given(module_and_inputs(special=True, dims=(16, 32)))
def test_special_inputs_and_larger_dims(mi):
    m, inputs = mi
    assert all(v.type.shape[-1] in (16, 32) for v in m.inputs if v.type.dtype == "f32")
    floats = [t for t in inputs if t.is_floating_point()]
    verify(m)
    interpret(m, inputs)  # every op's reference defines NaN, inf and -0.0
    assert floats
