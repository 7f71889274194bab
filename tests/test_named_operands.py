"""Named operands: the one layout decoder, node accessors, building from names, the verifier check."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctc.ir import IRError, Module, OpError, TensorType, all_ops, get_op
from ctc.ir.ops import Scalar
from ctc.ir.verify import VerifyError, verify


def _ql_module(has_bias: bool, a_bits: int | None) -> tuple[Module, object]:
    m = Module("ql")
    x = m.add_input("x", TensorType((2, 8), "f32"))
    ops = {"x": x}
    for k, t in (("qweight", torch.zeros(4, 8, dtype=torch.int8)), ("w_scale", torch.ones(4, 1)),
                 ("w_zero", torch.zeros(4, 1, dtype=torch.int8))):
        m.add_param(k, t)
        ops[k] = m.param(k)
    if has_bias:
        m.add_param("b", torch.zeros(4))
        ops["bias"] = m.param("b")
    if a_bits is not None:
        m.add_param("s", torch.ones(1))
        m.add_param("z", torch.zeros(1, dtype=torch.int32))
        ops["act_scale"], ops["act_zero"] = m.param("s"), m.param("z")
    n = m.create_node("quant_linear", ops, {"w_bits": 8, "a_bits": a_bits, "has_bias": has_bias})
    m.set_outputs([n.output])
    return m, n


@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("a_bits", [None, 16, 8])
def test_quant_linear_layout_follows_attributes(has_bias, a_bits):
    m, n = _ql_module(has_bias, a_bits if a_bits != 16 else None)
    if a_bits == 16:  # a_bits=16 means float activations: no act operands either
        n.attrs["a_bits"] = 16
    verify(m)
    assert n.has_operand("bias") is has_bias
    assert (n.operand("bias") is not None) is has_bias
    quantized = a_bits == 8
    assert n.has_operand("act_scale") is quantized and n.has_operand("act_zero") is quantized
    if quantized:
        assert n.operand("act_zero").type.dtype == "i32"
    assert n.operand("qweight").type.dtype == "i8"
    assert list(n.named_operands()) == [k for k in ("x", "qweight", "w_scale", "w_zero", "bias", "act_scale",
                                                    "act_zero") if n.has_operand(k)]


def test_building_against_the_attributes_is_checked():
    m, n = _ql_module(True, 8)
    ops = n.named_operands()
    with pytest.raises(OpError, match="'bias' given, but quant_linear's attributes say it is absent"):
        m.create_node("quant_linear", ops, {"w_bits": 8, "a_bits": 8, "has_bias": False})
    ops.pop("act_scale")
    with pytest.raises(OpError, match="needs operand 'act_scale'"):
        m.create_node("quant_linear", ops, {"w_bits": 8, "a_bits": 8, "has_bias": True})
    with pytest.raises(OpError, match="no operand 'wieght'.*did you mean 'weight'"):
        m.create_node("linear", {"x": ops["x"], "wieght": ops["qweight"]})


def test_verifier_rejects_operands_the_attributes_do_not_describe():
    m, n = _ql_module(True, None)
    n.attrs["has_bias"] = False  # the bias operand is still there
    with pytest.raises(VerifyError, match="by its attributes, quant_linear takes 4 tensor operand"):
        verify(m)


def test_binary_scalar_operands_are_named_by_meaning():
    m = Module("b")
    x = m.add_input("x", TensorType((3,), "f32"))
    sub = m.create_node("sub", {"a": x}, {"scalar": 2.0})           # x - 2
    rsub = m.create_node("sub", {"b": x}, {"scalar": 2.0, "reverse": True})  # 2 - x
    both = m.create_node("sub", {"a": x, "b": sub.output})
    m.set_outputs([both.output, rsub.output])
    verify(m)
    assert sub.operand("a") is x and sub.operand("b") is None and sub.scalar("b") == 2.0
    assert rsub.operand("a") is None and rsub.scalar("a") == 2.0 and rsub.operand("b") is x
    assert rsub.slots() == {"a": Scalar(2.0, "scalar"), "b": 0}
    assert both.operand("b") is sub.output and both.scalar("b") is None
    with pytest.raises(OpError, match="scalar attribute scalar=2.0"):
        m.create_node("sub", {"a": x, "b": x}, {"scalar": 2.0})


def test_where_variadic_and_prefix_layouts():
    m = Module("w")
    c = m.add_input("c", TensorType((3,), "bool"))
    x = m.add_input("x", TensorType((3,), "f32"))
    w = m.create_node("where", {"cond": c, "b": x}, {"a_scalar": 0.5})
    assert w.operand("a") is None and w.scalar("a") == 0.5 and w.operand("b") is x and w.inputs == [c, x]
    cat = m.create_node("concat", {"xs": [x, x, w.output]}, {"axis": 0})
    assert cat.operands("xs") == [x, x, w.output]
    with pytest.raises(IRError, match="variadic; use node.operands"):
        cat.operand("xs")
    ln = m.create_node("layer_norm", {"x": x})
    assert ln.operand("weight") is None and ln.operand("bias") is None
    with pytest.raises(OpError, match="'bias' given without 'weight'"):
        m.create_node("layer_norm", {"x": x, "bias": x})
    assert cat.operand_name(2) == "xs" and w.operand_name(1) == "b"


def test_unknown_names_suggest_the_nearest():
    m = Module("u")
    x = m.add_input("x", TensorType((2, 4), "f32"))
    m.add_param("w", torch.zeros(3, 4))
    lin = m.create_node("linear", {"x": x, "weight": m.param("w")})
    with pytest.raises(IRError, match="no operand 'bais'.*did you mean 'bias'"):
        lin.operand("bais")
    sm = m.create_node("softmax", [lin.output], {"axis": 1})
    with pytest.raises(IRError, match="no attribute 'axes'.*did you mean 'axis'"):
        sm.attr("axes")
    assert sm.attr("axis") == 1


def test_every_op_decodes_its_minimal_layout():
    """Each declared op decodes a node with only its required operands (defaults for attributes)."""
    for name, opdef in all_ops().items():
        attrs = {k: a.default for k, a in opdef.attrs.items() if not a.required}
        pres = opdef.layout(attrs) if opdef.layout else {}
        n = sum(1 for d in opdef.inputs
                if pres.get(d.strip("?*"), not d.endswith("?")) is True)
        slots = opdef.slots(n, attrs)
        assert list(slots) == list(opdef.operand_names), name
        assert sorted(i for s in slots.values() for i in ([s] if isinstance(s, int) else
                                                          range(s.start, s.stop) if isinstance(s, slice) else [])
                      ) == list(range(n)), name


def test_opdef_operand_names_and_variadic():
    assert get_op("quant_linear").operand_names[4] == "bias"
    assert get_op("index").variadic == "indices" and get_op("linear").variadic is None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["insert", "erase"]), st.integers(0, 10_000)), max_size=60))
def test_index_of_matches_the_list_after_inserts_and_erases(ops):
    m = Module("order")
    x = m.add_input("x", TensorType((2,), "f32"))
    m.set_outputs([x])
    for kind, k in ops:
        if kind == "insert" or not m.nodes:
            anchor = m.nodes[k % len(m.nodes)] if m.nodes else None
            m.create_node("relu", [x], before=anchor if k % 2 else None, after=None if k % 2 else anchor)
        else:
            m.erase(m.nodes[k % len(m.nodes)])
        for i, n in enumerate(m.nodes):
            assert m.index_of(n) == i
    if len(m.nodes) >= 2:
        assert m.precedes(m.nodes[0], m.nodes[-1]) and not m.precedes(m.nodes[-1], m.nodes[0])


def test_lowering_rules_read_operands_by_name_only() -> None:
    """A TVM lowering rule's operands are named; a positional read is an error, not a silent misread."""
    pytest.importorskip("tvm")
    from ctc.backends.tvm.lower import RULES, LoweringError, Operands

    m, n = _ql_module(has_bias=False, a_bits=8)
    a = Operands(None, n)  # type: ignore[arg-type] - nothing is lowered before a read
    assert a.value("bias") is None and a.get("bias") is None
    assert a.type("act_scale").dtype == "f32"
    with pytest.raises(TypeError, match="by name"):
        a[0]  # noqa: B018
    with pytest.raises(LoweringError, match="no operand 'weight'"):
        a.get("weight")
    assert "quant_linear" in RULES
