"""The matcher library: op patterns, captures, constants, commutativity, predicates, chains."""

from __future__ import annotations

import math

import pytest
import torch

from ctc.ir import Module, TensorType
from ctc.ir.patterns import (
    Const,
    PatternError,
    absent,
    any_,
    chain,
    const,
    cvar,
    has_type,
    op,
    splat,
    unit,
    var,
    zero,
)


@pytest.fixture
def m() -> Module:
    return Module("p")


def _x(m: Module, shape=(2, 4), dtype="f32"):
    return m.add_input(f"x{len(m.inputs)}", TensorType(shape, dtype))


def test_unit_matches_full_uniform_param_and_scalar_attribute_in_either_order(m):
    x = _x(m)
    one = m.create_node("full", [], {"shape": (2, 4), "value": 1.0}).output
    m.add_param("ones", torch.ones(4))
    p1 = m.param("ones")
    pat = op("mul", var("x"), unit(), commutative=True)
    for node in (m.create_node("mul", [x, one]), m.create_node("mul", [one, x]),
                 m.create_node("mul", [x], {"scalar": 1.0}),
                 m.create_node("mul", [x], {"scalar": 1.0, "reverse": True}), m.create_node("mul", [x, p1])):
        got = pat.match(node)
        assert got is not None and got["x"] is x and got.root is node, node
    two = m.create_node("mul", [x], {"scalar": 2.0})
    assert pat.match(two) is None
    # without commutativity, 1 * x does not match x * 1
    strict = op("mul", var("x"), unit())
    assert strict.match(m.create_node("mul", [one, x])) is None
    assert strict.match(m.create_node("mul", [x], {"scalar": 1.0, "reverse": True})) is None


def test_sub_zero_only_on_the_right_and_zero_matches_negative_zero(m):
    x = _x(m)
    pat = op("sub", var("x"), zero())
    assert pat.match(m.create_node("sub", [x], {"scalar": -0.0})) is not None
    assert pat.match(m.create_node("sub", [x], {"scalar": 0.0, "reverse": True})) is None  # 0 - x


def test_constants_capture_and_splat_values(m):
    x = _x(m)
    m.add_param("w", torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    w = m.param("w")
    n = m.create_node("add", [x, w])
    got = op("add", var("x"), cvar("c")).match(n)
    assert isinstance(got["c"], Const) and got["c"].splat is None and torch.equal(got["c"].tensor, m.params["w"])
    assert op("add", var("x"), splat()).match(n) is None
    nan = m.create_node("full", [], {"shape": (2, 4), "value": math.nan}).output
    assert op("add", var("x"), splat(math.nan)).match(m.create_node("add", [x, nan])) is not None
    assert op("add", var("x"), const()).match(m.create_node("add", [x, x])) is None
    # a constant operand is not a value capture: var() never binds a scalar attribute
    assert op("add", var("x"), var("y")).match(m.create_node("add", [x], {"scalar": 3.0})) is None
    assert op("add", var("x"), any_()).match(m.create_node("add", [x], {"scalar": 3.0})) is not None


def test_same_name_twice_means_the_same_value(m):
    x, y = _x(m), _x(m)
    pat = op("add", var("a"), var("a"))
    assert pat.match(m.create_node("add", [x, x])) is not None
    assert pat.match(m.create_node("add", [x, y])) is None


def test_named_operands_attrs_and_predicates(m):
    x = _x(m)
    m.add_param("w", torch.zeros(3, 4))
    m.add_param("b", torch.zeros(3))
    nb = m.create_node("linear", {"x": x, "weight": m.param("w")})
    wb = m.create_node("linear", {"x": x, "weight": m.param("w"), "bias": m.param("b")})
    no_bias = op("linear", x=var("x"), bias=absent())
    assert no_bias.match(nb) is not None and no_bias.match(wb) is None
    assert op("linear", var("x"), var("w")).match(wb) is None  # three logical operands
    assert op("linear", var("x"), var("w"), ...).match(wb) is not None
    t = m.create_node("transpose", [x], {"dim0": 0, "dim1": 1})
    assert op("transpose", var("x"), attrs={"dim0": 0}).match(t) is not None
    assert op("transpose", var("x"), attrs={"dim1": lambda d: d > 5}).match(t) is None
    assert op("transpose", var("x").where(has_type(dtype="f32", rank=2))).match(t) is not None
    assert op("transpose", var("x").where(has_type(dtype="i64"))).match(t) is None
    assert op("transpose", var("x"), where=lambda n: n.scope == "nowhere").match(t) is None


def test_alternatives_and_node_captures(m):
    x = _x(m)
    r = m.create_node("reshape", [x], {"shape": (2, 4)})
    pat = op("reshape", var("x"), name="r") | op("expand", var("x"), name="r")
    got = pat.match(r)
    assert got["r"] is r and got["x"] is x
    assert pat.root_ops() == frozenset({"reshape", "expand"})


def test_chain_linear_gelu_linear_with_single_use(m):
    x = _x(m)
    m.add_param("w1", torch.zeros(8, 4))
    m.add_param("w2", torch.zeros(4, 8))
    fc1 = m.create_node("linear", [x, m.param("w1")])
    g = m.create_node("gelu", [fc1.output])
    fc2 = m.create_node("linear", [g.output, m.param("w2")])
    pat = chain(op("linear", var("x"), ..., name="fc1"), "gelu", op("linear", name="fc2"))
    got = pat.match(fc2)
    assert got["fc1"] is fc1 and got["fc2"] is fc2 and got["x"] is x and got.nodes[0] is fc2
    assert len(got.nodes) == 3
    m.create_node("relu", [g.output])  # a second reader of the gelu
    assert chain("linear", "gelu", "linear", single_use=True).match(fc2) is None
    assert chain("linear", "gelu", "linear").match(fc2) is not None


def test_patterns_are_checked_against_the_registry_when_built():
    with pytest.raises(PatternError, match="unknown op 'gleu'.*gelu"):
        op("gleu", var("x"))
    with pytest.raises(PatternError, match="operand 'wieght'.*did you mean 'weight'"):
        op("linear", wieght=var("w"))
    with pytest.raises(PatternError, match="attribute 'perms'.*did you mean 'perm'"):
        op("permute", var("x"), attrs={"perms": (0, 1)})
    with pytest.raises(PatternError, match="commutative matching needs exactly two"):
        op("relu", var("x"), commutative=True)
    with pytest.raises(PatternError, match="must be patterns"):
        op("relu", "x")
    with pytest.raises(PatternError, match="has no operand 'weight'"):
        chain("relu", "gelu", via="weight")
