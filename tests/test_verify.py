"""The IR verifier: a valid module passes; each kind of corruption is reported, all at once."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import modules

from ctc.ir import Module, TensorType, Value
from ctc.ir.graph import Node
from ctc.ir.verify import VerifyError, types_equal, verify


def _module() -> Module:
    """x -> channel_permute(perm) -> lowrank_linear(u, v) -> y ; plus a constant output."""
    m = Module("v")
    m.add_param("perm", torch.randperm(4))
    m.add_param("u", torch.randn(3, 2))
    m.add_param("v", torch.randn(2, 4))
    x = m.add_input("x", TensorType((1, "s0", 4), "f32"))
    p = m.create_node("channel_permute", [x, m.param("perm", scope="a", block=0)], scope="a", block=0).output
    y = m.create_node("lowrank_linear", [p, m.param("u", scope="a", block=0), m.param("v", scope="a", block=0)],
                      {"rank": 2}, scope="a", block=0).output
    c = m.create_node("full", [], {"shape": (2, "s0"), "value": 1.0}).output
    m.set_outputs([y, c], ["y", "c"])
    return m


def _errors(m: Module) -> list[str]:
    with pytest.raises(VerifyError) as ei:
        verify(m)
    assert str(ei.value).startswith(f"module {m.name} failed verification")
    return ei.value.errors


def _node(m: Module, op: str) -> Node:
    return next(n for n in m.nodes if n.op == op)


def test_valid_module_passes_without_warnings():
    assert verify(_module()) == []


def test_duplicate_value_names():
    m = _module()
    _node(m, "full").outputs[0].name = "x"
    assert any("value name %x is used by 2 values" in e for e in _errors(m))


def test_value_defined_twice():
    m = _module()
    f = _node(m, "full")
    lr = _node(m, "lowrank_linear")
    f.outputs[0] = lr.outputs[0]
    errs = _errors(m)
    assert any("is already defined by node" in e for e in errs)


def test_use_before_definition_and_topological_order():
    m = _module()
    lr = _node(m, "lowrank_linear")
    m.nodes.remove(lr)
    m.nodes.insert(0, lr)
    errs = _errors(m)
    assert any("is defined later" in e and "topological order" in e for e in errs)


def test_operand_from_another_module():
    m = _module()
    other = Value("ghost", TensorType((1, "s0", 4), "f32"))
    _node(m, "channel_permute").set_input(0, other)
    errs = _errors(m)
    assert any("%ghost is not defined in this module" in e for e in errs)


def test_missing_and_stale_uses():
    m = _module()
    x = m.inputs[0]
    x.uses.clear()
    errs = _errors(m)
    assert any("use list of %x misses 1 use(s)" in e for e in errs)
    m = _module()
    y = m.outputs[0]
    y.uses.append((_node(m, "channel_permute"), 0))
    errs = _errors(m)
    assert any("use list of %" in e and "stale use(s)" in e for e in errs)


def test_producer_backlink():
    m = _module()
    _node(m, "full").outputs[0].index = 3
    assert any("has producer/index" in e for e in _errors(m))


def test_outputs_defined_counted_and_uniquely_named():
    m = _module()
    m.outputs.append(Value("nowhere", TensorType((1,), "f32")))
    m.output_names.append("y")
    errs = _errors(m)
    assert any("output 2 %nowhere is not defined" in e for e in errs)
    assert any("output name 'y' is used 2 times" in e for e in errs)
    m = _module()
    m.output_names.pop()
    assert any("2 outputs but 1 output names" in e for e in _errors(m))


def test_attribute_schema():
    m = _module()
    _node(m, "lowrank_linear").attrs["rank"] = "two"
    assert any("attribute rank='two' should be an int" in e for e in _errors(m))
    m = _module()
    _node(m, "lowrank_linear").attrs["alpha"] = 1
    assert any("unknown attribute(s) ['alpha']" in e for e in _errors(m))
    m = _module()
    del _node(m, "channel_permute").attrs["axis"]
    assert any("attributes ['axis'] are missing" in e for e in _errors(m))


def test_unknown_op_arity_and_output_count():
    m = _module()
    _node(m, "full").op = "fulll"
    assert any("unknown op 'fulll'" in e and "did you mean full" in e for e in _errors(m))
    m = _module()
    n = _node(m, "lowrank_linear")
    n.inputs = n.inputs[:2]
    assert any("lowrank_linear takes 3..4 operands" in e for e in _errors(m))
    m = _module()
    f = _node(m, "full")
    f.outputs.append(Value("extra", TensorType((1,), "f32"), f, 1))
    assert any("has 2 outputs, op full declares 1" in e for e in _errors(m))


def test_recorded_types_must_equal_inferred_types():
    m = _module()
    _node(m, "lowrank_linear").outputs[0].type = TensorType((1, "s0", 5), "f32")
    errs = _errors(m)
    assert any("is recorded as f32[1, s0, 5] but infers as f32[1, s0, 3]" in e for e in errs)
    m = _module()
    _node(m, "channel_permute").inputs[0].type = TensorType((1, "s0", 5), "f32")
    assert any("type inference fails" in e for e in _errors(m))


def test_symbolic_types_compare_by_value():
    assert types_equal(TensorType(("s0 + 1",), "f32"), TensorType(("1 + s0",), "f32"))
    assert not types_equal(TensorType(("s0",), "f32"), TensorType(("s1",), "f32"))
    assert not types_equal(TensorType(("s0",), "f32"), TensorType(("s0",), "f16"))


def test_param_nodes_checked_against_params():
    m = _module()
    del m.params["u"]
    assert any("reads parameter 'u' which does not exist" in e for e in _errors(m))
    m = _module()
    m.params["v"] = torch.randn(2, 5)
    assert any("but parameter 'v' is f32[2, 5]" in e for e in _errors(m))


def test_node_bookkeeping():
    m = _module()
    _node(m, "full").module = None
    assert any("node.module does not point at this module" in e for e in _errors(m))
    m = _module()
    m.nodes.append(m.nodes[0])
    assert any("appears twice in the node list" in e for e in _errors(m))


def test_every_problem_is_listed_at_once():
    m = _module()
    _node(m, "full").op = "nope"
    _node(m, "lowrank_linear").attrs["rank"] = 7
    m.inputs[0].uses.clear()
    errs = _errors(m)
    assert len(errs) >= 3


def test_warnings_unused_params_and_unbound_symbols():
    m = _module()
    m.add_param("dead", torch.zeros(2))
    m.create_node("full", [], {"shape": ("t9",), "value": 0.0})
    warns = verify(m)
    assert any("parameter 'dead' is never read" in w for w in warns)
    assert any("symbol t9" in w and "bound by no input" in w for w in warns)


# --------------------------------------------------------------------------- random corruptions
def _corrupt(m: Module, kind: str, pick: int) -> bool:
    """Apply one corruption; False when the module has nothing to corrupt that way."""
    nodes = [n for n in m.nodes if n.inputs and any(v.producer is not None for v in n.inputs)]
    if kind == "reorder":
        if not nodes:
            return False
        n = nodes[pick % len(nodes)]
        producer = next(v.producer for v in n.inputs if v.producer is not None)
        m.nodes.remove(n)
        m.nodes.insert(m.index_of(producer), n)
    elif kind == "drop_use":
        used = [v for v in m.values() if v.uses]
        if not used:
            return False
        used[pick % len(used)].uses.pop()
    elif kind == "stale_use":  # a use by a node at an operand position it does not have
        vals = list(m.values())
        if not m.nodes or not vals:  # a module of no nodes (outputs = inputs) has no reader to point at
            return False
        vals[pick % len(vals)].uses.append((m.nodes[pick % len(m.nodes)], 99))
    elif kind == "retype":
        n = [n for n in m.nodes if n.op != "param"]
        if not n:
            return False
        out = n[pick % len(n)].outputs[0]
        out.type = out.type.with_shape((*out.type.shape, 7))
    elif kind == "dup_name":
        vals = list(m.values())
        if len(vals) < 2:
            return False
        vals[-1 - pick % (len(vals) - 1)].name = vals[0].name
    elif kind == "lost_param":
        ps = [n for n in m.nodes if n.op == "param"]
        if not ps:
            return False
        m.params.pop(ps[pick % len(ps)].attrs["name"], None)
    return True


CORRUPTIONS = ["reorder", "drop_use", "stale_use", "retype", "dup_name", "lost_param"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corruptions_of_degenerate_modules(kind):
    """Modules with no nodes, or no inputs: a corruption either does not apply or is detected
    (the random test once divided by the node count of a module with none)."""
    empty = Module("empty")
    x = empty.add_input("x", TensorType((2,), "f32"))
    empty.set_outputs([x], ["y"])
    no_inputs = Module("no_inputs")
    no_inputs.set_outputs([no_inputs.create_node("full", [], {"shape": (2,), "value": 1.0}).output], ["y"])
    for m in (empty, no_inputs):
        verify(m)
        for pick in (0, 1, 7):
            c = m.clone()
            if _corrupt(c, kind, pick):
                with pytest.raises(VerifyError):
                    verify(c)


@settings(max_examples=80, deadline=None)
@given(m=modules(), kind=st.sampled_from(CORRUPTIONS), pick=st.integers(0, 1000))
def test_random_corruptions_are_detected(m, kind, pick):
    verify(m)
    assume(_corrupt(m, kind, pick))
    with pytest.raises(VerifyError):
        verify(m)
