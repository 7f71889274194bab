"""The Rewriter (insertion, replacement, cleanup rule, accounting) and the pattern drivers."""

from __future__ import annotations

import pytest
import torch

from ctc.ir import Module, TensorType, interpret
from ctc.ir.patterns import op, same_type, splat, unit, var
from ctc.ir.rewrite import NotConverged, RewriteError, Rewriter, apply_once, apply_patterns, rule
from ctc.ir.text import print_module
from ctc.ir.verify import VerifyError, verify
from ctc.passes.base import PassContext, PatternPass, Selector
from ctc.passes.manager import PassManager


@rule(op("mul", var("x"), unit(), commutative=True))
def mul_one(rw, m):
    return m["x"] if same_type(m["x"], m.root.output) else None


def _module() -> Module:
    """x*1 chains in two blocks, a dead branch, and parameters read once or twice."""
    m = Module("r")
    x = m.add_input("x", TensorType((2, 4), "f32"))
    m.add_param("ones", torch.ones(4))
    m.add_param("w", torch.randn(4, 4))
    m.add_param("unused", torch.zeros(3))
    outs = []
    for b in range(2):
        one = m.param("ones", scope=f"l{b}", block=b)
        y = m.create_node("mul", [x, one], scope=f"l{b}.mul", block=b).output
        y = m.create_node("mul", [y], {"scalar": 1.0}, scope=f"l{b}.mul2", block=b).output
        y = m.create_node("linear", [y, m.param("w", scope=f"l{b}", block=b)], scope=f"l{b}.fc", block=b).output
        outs.append(y)
    dead = m.create_node("relu", [x], scope="dead", block=0)  # dead before any rewrite
    m.create_node("gelu", [dead.output], scope="dead", block=0)
    m.set_outputs(outs, ["a", "b"])
    verify(m)
    return m


def test_greedy_driver_reaches_a_fixpoint_and_accounts_for_it():
    m = _module()
    x = {"x": torch.randn(2, 4)}
    before = interpret(m, x)
    log = apply_patterns(m, [mul_one])
    assert log.fired == {"mul-one": 4}
    assert m.op_counts()["mul"] == 0 if "mul" in m.op_counts() else True
    assert "ones" not in m.params           # its last readers were orphaned by the rewrites
    assert "unused" in m.params              # unread before: not this rewrite's business
    assert m.op_counts().get("relu") == 1 and m.op_counts().get("gelu") == 1  # pre-existing dead code stays
    assert log.params_removed == ["ones"] and log.erased["param"] == 2 and log.erased["mul"] == 4
    assert log.op_diff() == {"mul": -4, "param": -2}
    for a, b in zip(interpret(m, x), before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_selector_restricts_roots_not_cleanup():
    m = _module()
    rw = Rewriter(m, selector=Selector(blocks=((1, 2),)).matches)
    apply_patterns(rw, [mul_one])
    rw.finish()
    assert [n.block for n in m.nodes if n.op == "mul"] == [0, 0]
    assert "ones" in m.params                # still read in block 0


def test_rewriter_inserts_before_the_anchor_with_its_scope_and_block():
    m = _module()
    lin = m.find("linear")[1]
    rw = Rewriter(m)
    with rw.at(lin):
        g = rw.create("gelu", {"x": lin.operand("x")})
        p = rw.new_param("l1.extra", torch.zeros(4))
    assert m.index_of(g) == m.index_of(lin) - 2 and g.scope == lin.scope and g.block == 1
    assert p.producer.scope == lin.scope and p.name in m.params and rw.log.params_added == [p.name]
    rw.finish(verify=False)
    # both ended unused: the cleanup takes back what this rewriter created and nothing read
    assert g.module is None and p.name not in m.params and rw.log.params_added == []
    with pytest.raises(RewriteError, match="no insertion point"):
        rw.create("relu", [m.inputs[0]])
    other = rw.create("relu", [m.inputs[0]], after=lin, scope="s", block=None)
    assert m.index_of(other) == m.index_of(lin) + 1 and other.scope == "s" and other.block is None


def test_replace_checks_types_and_set_operand_keeps_result_types():
    m = _module()
    lin = m.find("linear")[0]
    rw = Rewriter(m)
    with pytest.raises(RewriteError, match="types differ"):
        rw.replace(lin, m.find("param")[0].output)
    small = rw.new_param("small", torch.zeros(3, 4), before=lin)
    with pytest.raises(RewriteError, match="retype"):
        rw.set_operand(lin, "weight", small)
    assert lin.operand("weight").producer.attrs["name"] == "w"  # reverted
    with pytest.raises(RewriteError, match="not present"):
        rw.set_operand(lin, "bias", small)
    with pytest.raises(RewriteError, match="still read by"):
        rw.erase(lin.operand("weight").producer)
    w2 = rw.new_param("w2", torch.randn(4, 4), before=lin)
    rw.set_operand(lin, "weight", w2)
    rw.finish()
    assert "w" in m.params  # block 1's linear still reads it
    assert "small" not in m.params


def test_set_attrs_retargets_a_param_read_and_prunes_the_old_parameter():
    m = _module()
    m.add_param("w_copy", m.params["w"].clone())
    rw = Rewriter(m)
    for n in [n for n in m.nodes if n.op == "param" and n.attrs["name"] == "w"]:
        rw.set_attrs(n, name="w_copy")
    with pytest.raises(RewriteError, match="missing or of another type"):
        rw.set_attrs(m.find("param")[0], name="nope")
    rw.finish()
    assert "w" not in m.params and rw.log.params_removed == ["w"]


def test_non_converging_rules_are_named():
    m = Module("loop")
    x = m.add_input("x", TensorType((3,), "f32"))
    y = m.create_node("mul", [x], {"scalar": 2.0}).output
    m.set_outputs([y])

    @rule(op("mul", var("x"), splat(2.0)))
    def double_to_add(rw, mt):
        return rw.create("add", [mt["x"], mt["x"]]).output

    @rule(op("add", var("x"), var("x")))
    def add_to_double(rw, mt):
        return rw.create("mul", [mt["x"]], {"scalar": 2.0}).output

    with pytest.raises(NotConverged, match="double-to-add.*add-to-double|add-to-double.*double-to-add"):
        apply_patterns(m, [double_to_add, add_to_double], max_rewrites=50)


def test_rule_that_changes_the_module_must_say_so():
    m = _module()

    @rule(op("linear", var("x"), ...))
    def sneaky(rw, mt):
        rw.create("relu", [mt["x"]])
        return None

    with pytest.raises(RewriteError, match="changed the module but returned None"):
        apply_patterns(Rewriter(m), [sneaky])


def test_apply_once_does_not_revisit():
    m = Module("once")
    x = m.add_input("x", TensorType((3,), "f32"))
    y = m.create_node("relu", [x]).output
    m.set_outputs([y])

    @rule(op("relu", var("x")))
    def wrap(rw, mt):  # relu(x) -> relu(relu(x)): would never converge greedily
        inner = rw.create("relu", [mt["x"]])
        return rw.create("relu", [inner.output]).output

    log = apply_once(m, [wrap])
    assert log.fired == {"wrap": 1} and m.op_counts() == {"relu": 2}


def test_global_transform_plans_then_applies_and_finish_verifies():
    m = _module()
    rw = Rewriter(m)
    plan = [n for n in m.nodes if n.op == "linear"]  # plan on the unmodified module
    for lin in plan:
        with rw.at(lin):
            t = rw.create("transpose", [lin.operand("weight")], {"dim0": 0, "dim1": 1})
            t2 = rw.create("transpose", [t.output], {"dim0": 0, "dim1": 1})
            rw.set_operand(lin, "weight", t2.output)
    rw.finish()
    assert m.op_counts()["transpose"] == 4
    # a broken graph does not pass finish()
    m.nodes.reverse()
    with pytest.raises(VerifyError):
        Rewriter(m).finish()


class _MulOnePass(PatternPass):
    """Remove x*1 (test pass, not registered)."""

    name = "mul-one-test"
    patterns = (mul_one,)


def test_pattern_pass_feeds_the_record():
    m = _module()
    out, report = PassManager([_MulOnePass()], progress=False, fidelity_batch={"x": torch.randn(2, 4)}).run(m)
    rec = report.records[0]
    assert rec.rewrites["patterns"] == {"mul-one": 4} and rec.rewrites["params_removed"] == 1
    assert rec.ops_diff == {"mul": -4, "param": -2}
    assert rec.fidelity is not None and rec.fidelity.max_abs_error == 0.0
    assert any("fired mul-one x4" in n for n in rec.notes)
    assert "ones" in m.params  # the input module is untouched
    assert "%mul" not in print_module(out)


def test_context_rewriter_honours_the_step_selector():
    m = _module()
    ctx = PassContext(selector=Selector(blocks=((0, 1),)))
    rw = ctx.rewriter(m)
    apply_patterns(rw, [mul_one])
    assert [n.block for n in m.nodes if n.op == "mul"] == [1, 1] and ctx.rewrite_log().fired == {"mul-one": 2}


def _residual_stack(blocks: int = 3) -> Module:
    """h_{b+1} = h_b + linear_b(gelu(linear_b'(h_b))): one residual block per index, own parameters."""
    m = Module("stack")
    h = m.add_input("h", TensorType((2, 4), "f32"))
    g = torch.Generator().manual_seed(0)
    for b in range(blocks):
        for k, shape in (("up", (8, 4)), ("down", (4, 8))):
            m.add_param(f"l{b}.{k}", torch.randn(shape, generator=g) * 0.3)
        up = m.create_node("linear", [h, m.param(f"l{b}.up", scope=f"l{b}", block=b)], scope=f"l{b}.up", block=b)
        act = m.create_node("gelu", [up.output], scope=f"l{b}.act", block=b)
        down = m.create_node("linear", [act.output, m.param(f"l{b}.down", scope=f"l{b}", block=b)],
                             scope=f"l{b}.down", block=b)
        h = m.create_node("add", [h, down.output], scope=f"l{b}.res", block=b).output
    m.set_outputs([h], ["h"])
    return m


def test_block_removal_is_one_replacement_and_the_cleanup():
    """A global transform: plan (which block, its input and output), then replace its output by its input."""
    m = _residual_stack()
    out = next(n for n in m.nodes if n.block == 1 and n.op == "add")
    rw = Rewriter(m)
    rw.replace(out, out.operand("a"))        # the residual stream skips block 1
    log = rw.finish()
    assert {n.block for n in m.nodes} == {0, 2}
    assert sorted(log.params_removed) == ["l1.down", "l1.up"] and "l0.up" in m.params
    assert log.erased == {"add": 1, "linear": 2, "gelu": 1, "param": 2}


def test_block_sharing_retargets_param_reads_and_prunes_the_copies():
    """Sharing (FoldGPT-style): block 2 reads block 1's weights; block 2's own weights go."""
    m = _residual_stack()
    rw = Rewriter(m)
    for n in [n for n in m.nodes if n.op == "param" and n.block == 2]:
        rw.set_attrs(n, name=n.attrs["name"].replace("l2.", "l1."))
    log = rw.finish()
    assert sorted(log.params_removed) == ["l2.down", "l2.up"] and len(m.params) == 4
    x = torch.randn(2, 4)
    shared = _residual_stack()
    shared.params["l2.up"], shared.params["l2.down"] = shared.params["l1.up"], shared.params["l1.down"]
    torch.testing.assert_close(interpret(m, [x])[0], interpret(shared, [x])[0], rtol=0, atol=0)
