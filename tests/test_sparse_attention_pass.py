"""The ``sparse-attention`` pass: golden IR (HF-style causal mask split into is_causal + padding),
options and their errors, heads and selectors, outputs against the original module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctc.ir import interpret
from ctc.ir.text import parse, print_module
from ctc.passes import PassError, Selector, get_pass
from ctc.passes.attention_masks import split_causal_mask
from ctc.passes.manager import PassManager, Step

# The mask a Hugging Face decoder builds: le(key_pos, query_pos) & true & padding (golden/*.ir).
GOLDEN = Path(__file__).parent / "golden"
BEFORE = (GOLDEN / "sparse_attention_before.ir").read_text()
AFTER = (GOLDEN / "sparse_attention_after.ir").read_text()


def run(m, options=None, selector=None):
    if isinstance(m, str):
        m = parse(m)
    out, report = PassManager([Step(get_pass("sparse-attention")(options or {}), selector or Selector())],
                              progress=False, fidelity=False).run(m)
    return out, report.records[0]


def _feed(seq=9, pad=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    am = torch.ones(1, seq, dtype=torch.long)
    am[0, :pad] = 0
    return {"q": torch.randn(1, 2, seq, 4, generator=g), "k": torch.randn(1, 1, seq, 4, generator=g),
            "v": torch.randn(1, 1, seq, 4, generator=g), "attention_mask": am}


def test_golden_causal_mask_split():
    out, rec = run(BEFORE, {"min_keep": 2})
    assert print_module(out).strip() == AFTER.strip()
    assert rec.rewrites["patterns"] == {"sparse-attention": 1}
    # keep 1.0: the same function as the original (mask split included)
    same, _ = run(BEFORE, {"keep": [1.0, 1.0]})
    feed = _feed()
    torch.testing.assert_close(interpret(same, feed)[0], interpret(parse(BEFORE), feed)[0], atol=1e-5, rtol=1e-5)
    got = interpret(out, feed)[0]
    assert torch.isfinite(got).all()


def test_masks_that_are_not_causal_are_kept_whole():
    # keys and queries swapped (j >= i): not top-left causal, the mask stays an operand
    anti = BEFORE.replace("le(%model_unsqueeze_1, %model_unsqueeze_4)", "le(%model_unsqueeze_4, %model_unsqueeze_1)")
    m = parse(anti)
    assert split_causal_mask(m.nodes[-1]) is None
    out, _ = run(m)
    sa = [n for n in out.nodes if n.op == "sparse_attention"][0]
    assert not sa.attrs["is_causal"] and sa.operand("mask").producer.op == "logical_and"
    feed = _feed()
    ref = interpret(parse(anti), feed)[0]
    same, _ = run(parse(anti), {"keep": [1.0, 1.0]})
    torch.testing.assert_close(interpret(same, feed)[0], ref, atol=1e-5, rtol=1e-5)
    # positions that do not start at 0 (a decode step's offset) are not causal-from-the-top either
    shifted = BEFORE.replace("%model_add = add(%model_arange) {scalar = 0.0}", "%model_add = add(%model_arange) "
                             "{scalar = 3.0}")
    assert split_causal_mask(parse(shifted).nodes[-1]) is None


@pytest.mark.parametrize("options,attrs", [
    ({}, {"round_bits": (4, 8), "keep_ratios": (0.5, 0.25), "min_keep": 16, "select": "topk"}),
    ({"rounds": [2, 4, 8]}, {"round_bits": (2, 4, 8), "keep_ratios": (1.0, 0.5, 0.25)}),
    ({"rounds": [8], "keep": [0.125]}, {"round_bits": (8,), "keep_ratios": (0.125,)}),
    ({"select": "threshold", "alpha": [0.1, 0.6]}, {"select": "threshold", "alphas": (0.1, 0.6), "keep_ratios": ()}),
    ({"select": "threshold"}, {"alphas": (0.5, 0.5)}),
    ({"heads": [1]}, {"dense_heads": (0,)}),
])
def test_options_become_attributes(options, attrs):
    out, _ = run(BEFORE, options)
    sa = [n for n in out.nodes if n.op == "sparse_attention"][0]
    for k, v in attrs.items():
        assert sa.attrs[k] == v, k


@pytest.mark.parametrize("options,msg", [
    ({"rounds": []}, "at least one round"),
    ({"rounds": [4, 16]}, "above its maximum 8"),
    ({"rounds": [4, 8], "keep": [0.5]}, "keep has 1 entries but rounds has 2"),
    ({"keep": [0.25, 0.5]}, "must not grow"),
    ({"keep": [0.0, 0.0]}, "must be > 0"),
    ({"alpha": [0.5, 0.5]}, "alpha is for select=\"threshold\""),
    ({"select": "threshold", "keep": [0.5, 0.25]}, "keep is for select=\"topk\""),
    ({"select": "threshold", "alpha": [2.0, 0.0]}, "above its maximum"),
    ({"select": "softmax"}, "must be one of"),
    ({"heads": [0, 0]}, "repeats a head"),
    ({"keeps": [0.5]}, "did you mean 'keep'"),
])
def test_bad_options_are_errors(options, msg):
    with pytest.raises(PassError, match=msg):
        get_pass("sparse-attention")(options)


def test_heads_beyond_the_model_are_an_error():
    with pytest.raises(Exception, match=r"has 2 query heads \(0..1\); \[3\] do not exist"):
        run(BEFORE, {"heads": [3]})


def test_heads_beyond_the_model_are_found_right_after_capture():
    """The recipe checker asks the pass before any pass runs: a located error (exit 2), not a failed pass (exit 4)."""
    cls = get_pass("sparse-attention")
    assert cls.check_module(cls.Options.from_dict({"heads": [3]}), parse(BEFORE), Selector()) == [
        ("heads", "option heads=[3]: the model's attention has 2 query heads (0..1); [3] do not exist")]
    assert cls.check_module(cls.Options.from_dict({"heads": [1]}), parse(BEFORE), Selector()) == []


def test_selector_restricts_layers():
    two = BEFORE.replace('return %attn as "y"', '%attn2 = scaled_dot_product_attention(%attn, %k, %v, '
                         '%model_logical_and_7) {scale = 0.5, enable_gqa = true} : f32[1, 2, seq, 4]  '
                         'loc("layers.1.attn", block=1)\n  return %attn2 as "y"')
    out, rec = run(two, selector=Selector(blocks=((1, 2),)))
    ops = [n.op for n in out.nodes if "attention" in n.op]
    assert ops == ["scaled_dot_product_attention", "sparse_attention"]
    assert rec.rewrites["patterns"] == {"sparse-attention": 1}
    # the causal mask is still read by layer 0: it stays
    assert any(n.op == "le" for n in out.nodes)
