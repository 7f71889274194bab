"""dce, cse, constant-fold, canonicalize: golden IR before/after, and outputs preserved on random graphs."""

from __future__ import annotations

import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from strategies import module_and_inputs

from ctc.ir import Module, interpret
from ctc.ir.ops import get_op, registry
from ctc.ir.ops.registry import OpDef
from ctc.ir.text import parse, print_module
from ctc.ir.verify import verify
from ctc.passes.base import PassContext, Selector, get_pass
from ctc.passes.cse import node_key
from ctc.passes.dce import is_dead


def _ir(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


def _run(name: str, m: Module, selector: Selector | None = None, **options) -> tuple[Module, PassContext]:
    ctx = PassContext(selector=selector or Selector())
    out = get_pass(name)(options).run(m, ctx)
    verify(out)
    return out, ctx


def _golden(name: str, before: str, after: str, params: dict[str, torch.Tensor] | None = None,
            inputs: list[torch.Tensor] | None = None, **options) -> tuple[Module, PassContext]:
    """Parse ``before``, run the pass, compare the printed result with ``after`` and outputs with the input's."""
    m = parse(_ir(before), params=params)
    ref = parse(_ir(before), params=params)
    out, ctx = _run(name, m, **options)
    assert print_module(out) == _ir(after)
    if inputs is not None:
        for a, b in zip(interpret(ref, inputs), interpret(out, inputs), strict=True):
            assert torch.equal(a, b)
    return out, ctx


# =========================================================================== dce
def test_dce_golden() -> None:
    out, ctx = _golden("dce", """
        module m {
          param "w" : f32[4]
          param "dead" : f32[4]
          param "never_read" : f32[4]
          input %x : f32[2, 4]
          %w = param() {name = "w"} : f32[4]
          %d = param() {name = "dead"} : f32[4]
          %a = add(%x, %w) : f32[2, 4]
          %b = mul(%x, %d) : f32[2, 4]  loc("blk", block=0)
          %c = relu(%b) : f32[2, 4]  loc("blk", block=0)
          return %a as "y"
        }""", """
        module m {
          param "w" : f32[4]
          input %x : f32[2, 4]
          %w = param() {name = "w"} : f32[4]
          %a = add(%x, %w) : f32[2, 4]
          return %a as "y"
        }""", inputs=[torch.randn(2, 4)])
    assert ctx.metrics == {"nodes_removed": 3, "params_pruned": 2}
    assert any("relu x1" in n for n in ctx.notes)


def test_dce_with_selector_only_removes_selected_and_their_params() -> None:
    m = parse(_ir("""
        module m {
          param "a" : f32[4]
          param "b" : f32[4]
          param "never_read" : f32[4]
          input %x : f32[4]
          %a = param() {name = "a"} : f32[4]  loc("l0", block=0)
          %b = param() {name = "b"} : f32[4]  loc("l1", block=1)
          %u = relu(%a) : f32[4]  loc("l0", block=0)
          %v = relu(%b) : f32[4]  loc("l1", block=1)
          return %x as "y"
        }"""))
    out, _ = _run("dce", m, Selector(blocks=((1, 2),)))
    assert [n.outputs[0].name for n in out.nodes] == ["a", "u"]
    assert sorted(out.params) == ["a", "never_read"]


def test_dce_keeps_impure_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    _impure_op(monkeypatch)
    m = parse(_ir("""
        module m {
          input %x : f32[4]
          %e = test_effect(%x) : f32[4]
          %r = relu(%e) : f32[4]
          return %x as "y"
        }"""))
    out, _ = _run("dce", m)
    assert [n.op for n in out.nodes] == ["test_effect"]


def _impure_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test-only impure op (like a random draw): DCE must keep it, CSE must not merge it."""

    def ref(x: torch.Tensor) -> torch.Tensor:
        """Test-only: ``x`` plus noise."""
        return x + torch.rand_like(x)

    monkeypatch.setitem(registry._REGISTRY, "test_effect", OpDef(
        "test_effect", ("x",), {}, lambda ins, attrs: [ins[0]], ref, doc="test-only impure op", pure=False,
        category="test"))


# =========================================================================== cse
def test_cse_golden() -> None:
    _golden("cse", """
        module m {
          param "w" : f32[4]
          input %x : f32[2, 4]
          %w1 = param() {name = "w"} : f32[4]  loc("a", block=0)
          %w2 = param() {name = "w"} : f32[4]  loc("b", block=1)
          %a1 = add(%x, %w1) : f32[2, 4]  loc("a", block=0)
          %a2 = add(%x, %w2) : f32[2, 4]  loc("b", block=1)
          %r1 = relu(%a1) : f32[2, 4]
          %r2 = relu(%a2) : f32[2, 4]
          %g1 = gelu(%r1) : f32[2, 4]
          %g2 = gelu(%r2) {approximate = "tanh"} : f32[2, 4]
          %s = add(%g1, %g2) : f32[2, 4]
          %m = mul(%r1, %r2) : f32[2, 4]
          return %s as "s", %m as "m"
        }""", """
        module m {
          param "w" : f32[4]
          input %x : f32[2, 4]
          %w1 = param() {name = "w"} : f32[4]  loc("a", block=0)
          %a1 = add(%x, %w1) : f32[2, 4]  loc("a", block=0)
          %r1 = relu(%a1) : f32[2, 4]
          %g1 = gelu(%r1) : f32[2, 4]
          %g2 = gelu(%r1) {approximate = "tanh"} : f32[2, 4]
          %s = add(%g1, %g2) : f32[2, 4]
          %m = mul(%r1, %r1) : f32[2, 4]
          return %s as "s", %m as "m"
        }""", inputs=[torch.randn(2, 4)], across_blocks=True)


def test_cse_keeps_blocks_apart_by_default() -> None:
    m = parse(_ir("""
        module m {
          param "w" : f32[4]
          input %x : f32[4]
          %w0 = param() {name = "w"} : f32[4]
          %w1 = param() {name = "w"} : f32[4]  loc("l1", block=1)
          %w2 = param() {name = "w"} : f32[4]  loc("l2", block=2)
          %w3 = param() {name = "w"} : f32[4]  loc("l2", block=2)
          %a = add(%x, %w1) : f32[4]  loc("l1", block=1)
          %b = add(%a, %w2) : f32[4]  loc("l2", block=2)
          %c = add(%b, %w3) : f32[4]  loc("l2", block=2)
          return %c as "y", %w0 as "w"
        }"""))
    out, _ = _run("cse", m)
    # Reads in blocks 1 and 2 may reuse the read outside the blocks.
    assert [n.outputs[0].name for n in out.nodes] == ["w0", "a", "b", "c"]
    m = parse(_ir("""
        module m {
          param "w" : f32[4]
          input %x : f32[4]
          %w1 = param() {name = "w"} : f32[4]  loc("l1", block=1)
          %w2 = param() {name = "w"} : f32[4]  loc("l2", block=2)
          %w3 = param() {name = "w"} : f32[4]  loc("l2", block=2)
          %a = add(%x, %w1) : f32[4]  loc("l1", block=1)
          %b = add(%a, %w2) : f32[4]  loc("l2", block=2)
          %c = add(%b, %w3) : f32[4]  loc("l2", block=2)
          return %c as "y"
        }"""))
    out, _ = _run("cse", m)
    assert [n.outputs[0].name for n in out.nodes] == ["w1", "w2", "a", "b", "c"]  # w3 -> w2, never -> w1
    assert out.nodes[3].inputs[1] is out.nodes[1].outputs[0]
    out, _ = _run("cse", out, across_blocks=True)
    assert [n.outputs[0].name for n in out.nodes] == ["w1", "a", "b", "c"]


def test_cse_attribute_keys_tell_apart_signed_zero_and_bool() -> None:
    m = parse(_ir("""
        module m {
          input %x : f32[1]
          %a = full() {shape = [1], value = 0.0} : f32[1]
          %b = full() {shape = [1], value = -0.0} : f32[1]
          %c = full() {shape = [1], value = 0.0} : f32[1]
          %d = div(%x, %a) : f32[1]
          %e = div(%x, %b) : f32[1]
          %f = div(%x, %c) : f32[1]
          return %d as "d", %e as "e", %f as "f"
        }"""))
    out, ctx = _run("cse", m)
    assert [n.outputs[0].name for n in out.nodes] == ["a", "b", "d", "e"]
    assert ctx.metrics["nodes_merged"] == 2
    y = interpret(out, [torch.ones(1)])
    assert y[0].item() == float("inf") and y[1].item() == float("-inf")


def test_cse_never_merges_impure(monkeypatch: pytest.MonkeyPatch) -> None:
    _impure_op(monkeypatch)
    m = parse(_ir("""
        module m {
          input %x : f32[4]
          %e1 = test_effect(%x) : f32[4]
          %e2 = test_effect(%x) : f32[4]
          %s = sub(%e1, %e2) : f32[4]
          return %s as "y"
        }"""))
    out, _ = _run("cse", m)
    assert [n.op for n in out.nodes] == ["test_effect", "test_effect", "sub"]


def test_cse_dedupe_params() -> None:
    w = torch.randn(4)
    params = {"w": w, "w_copy": w.clone(), "other": torch.randn(4), "negzero": torch.zeros(4),
              "poszero": -torch.zeros(4)}
    m = parse(_ir("""
        module m {
          param "w" : f32[4]
          param "w_copy" : f32[4]
          param "other" : f32[4]
          param "negzero" : f32[4]
          param "poszero" : f32[4]
          input %x : f32[4]
          %a = param() {name = "w"} : f32[4]
          %b = param() {name = "w_copy"} : f32[4]
          %c = param() {name = "other"} : f32[4]
          %z1 = param() {name = "negzero"} : f32[4]
          %z2 = param() {name = "poszero"} : f32[4]
          %s = add(%a, %b) : f32[4]
          %t = add(%s, %c) : f32[4]
          %u = add(%z1, %z2) : f32[4]
          return %t as "t", %u as "u"
        }"""), params=params)
    out, ctx = _run("cse", m, dedupe_params=True)
    assert sorted(out.params) == ["negzero", "other", "poszero", "w"]
    assert [n.op for n in out.nodes].count("param") == 4
    assert ctx.metrics["params_deduplicated"] == 1
    assert ctx.notes[-1] == "1 parameter(s) are identical to earlier ones; 1 dropped"


# =========================================================================== constant-fold
FOLD_BEFORE = """
    module m {
      param "w" : f32[4]
      param "big" : f32[4, 4]
      input %x : f32[2, 4]
      %f = full() {shape = [4], value = 2.0} : f32[4]
      %w = param() {name = "w"} : f32[4]  loc("l", block=0)
      %k = mul(%f, %w) : f32[4]  loc("l", block=0)
      %y = add(%x, %k) : f32[2, 4]  loc("l", block=0)
      %b = param() {name = "big"} : f32[4, 4]
      %bt = neg(%b) : f32[4, 4]
      %z = matmul(%y, %bt) : f32[2, 4]
      return %z as "z"
    }"""


def test_constant_fold_golden() -> None:
    params = {"w": torch.randn(4), "big": torch.randn(4, 4)}
    out, ctx = _golden("constant-fold", FOLD_BEFORE, """
        module m {
          param "big" : f32[4, 4]
          param "l.k.const" : f32[4]
          input %x : f32[2, 4]
          %l.k.const = param() {name = "l.k.const"} : f32[4]  loc("l", block=0)
          %y = add(%x, %l.k.const) : f32[2, 4]  loc("l", block=0)
          %b = param() {name = "big"} : f32[4, 4]
          %bt = neg(%b) : f32[4, 4]
          %z = matmul(%y, %bt) : f32[2, 4]
          return %z as "z"
        }""", params=params, inputs=[torch.randn(2, 4)], max_elements=8)
    assert torch.equal(out.params["l.k.const"], 2.0 * params["w"])
    assert ctx.metrics == {"nodes_folded": 1, "params_added": 1, "params_dropped": 1}


def test_constant_fold_params_lifts_the_size_limit() -> None:
    params = {"w": torch.randn(4), "big": torch.randn(4, 4)}
    out, _ = _golden("constant-fold", FOLD_BEFORE, """
        module m {
          param "l.k.const" : f32[4]
          param "neg.bt.const" : f32[4, 4]
          input %x : f32[2, 4]
          %l.k.const = param() {name = "l.k.const"} : f32[4]  loc("l", block=0)
          %y = add(%x, %l.k.const) : f32[2, 4]  loc("l", block=0)
          %neg.bt.const = param() {name = "neg.bt.const"} : f32[4, 4]
          %z = matmul(%y, %neg.bt.const) : f32[2, 4]
          return %z as "z"
        }""", params=params, inputs=[torch.randn(2, 4)], max_elements=8, fold_params=True)
    assert torch.equal(out.params["neg.bt.const"], -params["big"])


GROWTH_BEFORE = """
    module m {
      param "w" : f32[4]
      param "pos" : i64[8]
      input %x : f32[2, 4]
      %w = param() {name = "w"} : f32[4]
      %wu = unsqueeze(%w) {axis = 0} : f32[1, 4]
      %a = add(%x, %wu) : f32[2, 4]
      %b = add(%a, %w) : f32[2, 4]
      %p = param() {name = "pos"} : i64[8]
      %ps = slice(%p) {axis = 0, start = [0], end = [4]} : i64[4]
      %r = arange() {end = [4]} : i64[4]
      %i = add(%r, %ps) : i64[4]
      %ci = cast(%i) {dtype = "f32"} : f32[4]
      %y = mul(%b, %ci) : f32[2, 4]
      return %y as "y"
    }"""


def test_constant_fold_does_not_grow_params_by_default() -> None:
    params = {"w": torch.randn(4), "pos": torch.arange(8) * 3}
    m = parse(_ir(GROWTH_BEFORE), params=params)
    # %wu would duplicate w (still read by %b); %ps..%ci would store 4 elements but free all 8 of
    # pos: that chain folds (into %ci's constant), the unsqueeze does not.
    out, ctx = _run("constant-fold", m)
    assert [n.op for n in out.nodes] == ["param", "unsqueeze", "add", "add", "param", "mul"]
    assert sorted(out.params) == ["cast.ci.const", "w"]
    assert out.param_count() == 4 + 4 and ctx.metrics == {"nodes_folded": 3, "params_added": 1, "params_dropped": 1}
    assert any("left 1 constant node(s) computed" in n for n in ctx.notes)
    x = torch.randn(2, 4)
    ref = parse(_ir(GROWTH_BEFORE), params=params)
    assert torch.equal(interpret(out, [x])[0], interpret(ref, [x])[0])
    # grow_params folds the unsqueeze too (a second copy of w, as [1, 4]).
    grown, _ = _run("constant-fold", parse(_ir(GROWTH_BEFORE), params=params), grow_params=True)
    assert "unsqueeze" not in [n.op for n in grown.nodes] and grown.param_count() == 12
    assert torch.equal(interpret(grown, [x])[0], interpret(ref, [x])[0])


def test_constant_fold_leaves_symbolic_and_input_dependent_nodes() -> None:
    m = parse(_ir("""
        module m {
          input %x : f32[2, s0]
          %f = full() {shape = [2, "s0"], value = 1.0} : f32[2, s0]
          %g = relu(%f) : f32[2, s0]
          %y = add(%x, %g) : f32[2, s0]
          return %y as "y"
        }"""))
    text = print_module(m)
    out, ctx = _run("constant-fold", m)
    assert print_module(out) == text and ctx.metrics["nodes_folded"] == 0


# =========================================================================== canonicalize
def test_canonicalize_golden() -> None:
    _golden("canonicalize", """
        module m {
          param "ones" : f32[4]
          input %x : f32[2, 4]
          %r = reshape(%x) {shape = [2, 4]} : f32[2, 4]
          %p = permute(%r) {perm = [0, 1]} : f32[2, 4]
          %c = cast(%p) {dtype = "f32"} : f32[2, 4]
          %m = mul(%c) {scalar = 1.0} : f32[2, 4]
          %z = full() {shape = [1], value = 0.0} : f32[1]
          %a = add(%z, %m) : f32[2, 4]
          %o = param() {name = "ones"} : f32[4]
          %d = div(%a, %o) : f32[2, 4]
          %s = sub(%d) {scalar = 0.0, reverse = true} : f32[2, 4]
          %t = permute(%s) {perm = [1, 0]} : f32[4, 2]
          %b = add(%z, %z) : f32[1]
          return %t as "t", %b as "b"
        }""", """
        module m {
          input %x : f32[2, 4]
          %z = full() {shape = [1], value = 0.0} : f32[1]
          %s = sub(%x) {scalar = 0.0, reverse = true} : f32[2, 4]
          %t = permute(%s) {perm = [1, 0]} : f32[4, 2]
          return %t as "t", %z as "b"
        }""", params={"ones": torch.ones(4)}, inputs=[torch.randn(2, 4)])


# =========================================================================== properties
def _same_outputs(ref: list[torch.Tensor], got: list[torch.Tensor]) -> None:
    assert len(ref) == len(got)
    for a, b in zip(ref, got, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("name,options", [
    ("dce", {}), ("cse", {}), ("cse", {"dedupe_params": True}), ("constant-fold", {}),
    ("constant-fold", {"fold_params": True}), ("canonicalize", {})])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mi=module_and_inputs(max_nodes=12))
def test_pass_preserves_interpreter_outputs(name: str, options: dict, mi: tuple[Module, list[torch.Tensor]]) -> None:
    m, inputs = mi
    ref = interpret(m, inputs)
    before_nodes, before_params = len(m.nodes), m.param_count()
    out, _ = _run(name, m, **options)
    _same_outputs(ref, interpret(out, inputs))
    if not options.get("fold_params"):
        assert out.param_count() <= before_params  # only an explicit request may grow the model
    assert len(out.nodes) <= before_nodes + (before_nodes if name == "constant-fold" else 0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mi=module_and_inputs(max_nodes=12))
def test_pipeline_of_basic_passes_preserves_outputs_and_cleans_up(mi: tuple[Module, list[torch.Tensor]]) -> None:
    m, inputs = mi
    ref = interpret(m, inputs)
    out = m
    for name in ("canonicalize", "constant-fold", "cse", "dce"):
        out, _ = _run(name, out)
    _same_outputs(ref, interpret(out, inputs))
    # Nothing dead, no two pure nodes computing the same thing, no unread parameter.
    assert not any(is_dead(out, n) for n in out.nodes)
    groups: dict = {}
    for n in out.nodes:
        if get_op(n.op).pure:
            earlier = groups.setdefault(node_key(n), [])
            assert not any(e.block is None or e.block == n.block for e in earlier), f"{n!r} duplicates {earlier}"
            earlier.append(n)
    assert set(out.params) == {n.attrs["name"] for n in out.nodes if n.op == "param"}
    # Another round of cse and dce finds nothing to do.
    text = print_module(out)
    for name in ("cse", "dce"):
        out, _ = _run(name, out)
    assert print_module(out) == text
