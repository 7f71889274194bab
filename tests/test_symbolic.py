"""Symbolic dims (ctc.ir.symbolic): canonical forms, evaluation, binding, and rejection of non-arithmetic."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctc.ir.symbolic import (
    SymbolicError,
    bind_symbols,
    dim_add,
    dim_floordiv,
    dim_mul,
    dim_sub,
    dims_equal,
    eval_dim,
    free_symbols,
    normalize_dim,
)
from ctc.ir.types import TensorType


def test_canonical_forms_compare_equal():
    assert normalize_dim("s0+1") == normalize_dim("1 + s0") == "s0 + 1"
    assert normalize_dim("s1*2*s0") == normalize_dim("2*s0*s1") == "2*s0*s1"
    assert normalize_dim("s0 - s0 + 3") == 3
    assert normalize_dim("(s0 + 1) * (s0 - 1)") == normalize_dim("s0*s0 - 1")
    assert normalize_dim(7) == 7
    assert dims_equal("s0 + s0", "2*s0")
    assert not dims_equal("s0", "s1")


def test_constant_floordiv_folds_and_symbolic_floordiv_stays_opaque():
    assert normalize_dim("7 // 2") == 3
    d = normalize_dim("(s0 + 1)//2")
    assert isinstance(d, str) and "//" in d
    assert eval_dim(d, {"s0": 9}) == 5
    assert free_symbols(d) == {"s0"}


def test_arithmetic_helpers():
    assert dim_add(2, 3) == 5 and dim_mul(2, 3) == 6 and dim_sub(2, 3) == -1 and dim_floordiv(7, 2) == 3
    assert dim_add("s0", 1) == "s0 + 1"
    assert dim_sub("s0 + 1", 1) == "s0"
    assert dim_mul("s0", 4) == "4*s0"
    assert eval_dim(dim_floordiv("4*s0", 4), {"s0": 5}) == 5


@pytest.mark.parametrize("bad", ["s0 ** 2", "s0 / 2", "__import__('os')", "s0.real", "f(s0)", "[s0]", "s0 +", "1.5"])
def test_non_arithmetic_is_rejected_without_eval(bad):
    with pytest.raises(SymbolicError):
        normalize_dim(bad)


def test_bools_are_not_dims():
    with pytest.raises(SymbolicError):
        normalize_dim(True)


def test_eval_requires_bound_symbols():
    assert eval_dim("2*s0 + s1", {"s0": 3, "s1": 4}) == 10
    with pytest.raises(SymbolicError, match="unbound"):
        eval_dim("s0 + 1", {})


def test_bind_symbols_binds_checks_and_reports():
    env: dict[str, int] = {}
    bind_symbols((1, "s0", "s0 + 1"), (1, 5, 6), env)
    assert env == {"s0": 5}
    with pytest.raises(SymbolicError, match="should be 6"):
        bind_symbols((1, "s0", "s0 + 1"), (1, 5, 7), {})
    with pytest.raises(SymbolicError, match="bound to 5 and 4"):
        bind_symbols(("s0", "s0"), (5, 4), {})
    with pytest.raises(SymbolicError, match="rank mismatch"):
        bind_symbols(("s0",), (5, 4), {})
    with pytest.raises(SymbolicError, match="should be 2"):
        bind_symbols((2,), (3,), {})


def test_tensor_type_normalises_symbolic_dims():
    t = TensorType((1, "1 + s0", "4*2"), "f32")
    assert t.shape == (1, "s0 + 1", 8)
    assert t.symbols == {"s0"} and not t.is_static
    assert str(t) == "f32[1, s0 + 1, 8]"
    with pytest.raises(TypeError):
        TensorType((1,), "f8")


# A tiny expression generator: the canonical form must evaluate like the expression it came from.
_leaf = st.one_of(st.integers(-5, 9).map(str), st.sampled_from(["s0", "s1", "n"]))


def _combine(children):
    return st.tuples(children, st.sampled_from(["+", "-", "*"]), children).map(lambda t: f"({t[0]} {t[1]} {t[2]})")


_expr = st.recursive(_leaf, _combine, max_leaves=8)


def _py_eval(expr: str, env: dict[str, int]) -> int:
    # Reference evaluation: a direct walk of the expression tree in Python integers.
    import ast

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return env[node.id]
        if isinstance(node, ast.UnaryOp):
            return -ev(node.operand)
        a, b = ev(node.left), ev(node.right)
        return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}[type(node.op)]

    return ev(ast.parse(expr, mode="eval"))


@settings(max_examples=150, deadline=None)
@given(expr=_expr, s0=st.integers(0, 50), s1=st.integers(0, 50), n=st.integers(0, 50))
def test_normal_form_preserves_value(expr, s0, s1, n):
    env = {"s0": s0, "s1": s1, "n": n}
    norm = normalize_dim(expr)
    assert eval_dim(norm, env) == _py_eval(expr, env)
    assert normalize_dim(norm) == norm  # idempotent
    assert free_symbols(norm) <= {"s0", "s1", "n"}


def test_quotients_cancel_shared_factors():
    # Falcon's alibi: (4*batch)//batch is 4, so a reshape to [batch*heads, ...] type-checks
    assert normalize_dim("(4*batch)//(batch)") == 4
    assert normalize_dim("(4*batch)//(2*batch)") == 2
    assert normalize_dim("(2*s + 4)//2") == "s + 2"
    assert normalize_dim("(6*s*t + 3*s)//(3*s)") == "2*t + 1"
    assert normalize_dim("(s*t)//s") == "t"
    assert dims_equal("(8*b*s)//(4*s)", "2*b")
    # what does not divide stays an opaque quotient and still evaluates
    d = normalize_dim("(2*s + 3)//2")
    assert isinstance(d, str) and eval_dim(d, {"s": 4}) == 5
    assert normalize_dim("(4*s)%2") == 0 and normalize_dim("(s*b)%s") == 0
    assert eval_dim("(s + 1)%3", {"s": 7}) == 2


def test_max_min_sizes():
    # transformers' masks produce sizes like Max(0, 1 - s)
    d = normalize_dim("max(0, 1 - s)")
    assert free_symbols(d) == {"s"}
    assert eval_dim(d, {"s": 5}) == 0 and eval_dim(d, {"s": 0}) == 1
    assert normalize_dim("max(s, s)") == "s" and normalize_dim("min(3, 5)") == 3
    assert dims_equal("max(s, 1)", "max(1, s)")
    assert eval_dim("2*max(1, s) + min(t, 2)", {"s": 3, "t": 7}) == 8
    with pytest.raises(SymbolicError):
        normalize_dim("max(s)")
    with pytest.raises(SymbolicError):
        normalize_dim("abs(s)")


def test_floor_division_pulls_out_multiples():
    # wav2vec2's feature extractor: two conv stacks give equal lengths written differently
    assert dims_equal("((samples - 8)//(4) - 3)//(2) + 1", "((samples)//(4) - 5)//(2) + 1")
    assert normalize_dim("(s + 9)//4") == normalize_dim("(s + 1)//4 + 2")
    assert normalize_dim("(4*s - 1)//4") == "s - 1"
    for v in range(0, 40):
        for e in ("((s - 8)//(4) - 3)//(2) + 1", "(s + 9)//4", "(4*s - 1)//4", "(3*s + 7)//(3)"):
            assert eval_dim(normalize_dim(e), {"s": v}) == eval(e.replace("s", str(v)))  # noqa: S307 - test oracle
