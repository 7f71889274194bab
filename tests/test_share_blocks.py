"""``share-blocks`` (FoldGPT group sharing): identity properties, groups, ratio, coefficients, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_transformers import outlier_inputs, tiny_transformer

from ctc.ir.graph import Module
from ctc.ir.interpreter import interpret
from ctc.ir.text import print_module
from ctc.passes.base import PassContext, PassError, Selector, get_pass
from ctc.passes.block_tying import param_reads
from ctc.passes.manager import PassManager, PipelineError


def tiny(kind: str = "llama", layers: int = 4, seed: int = 0, **kw: int) -> Module:
    m = tiny_transformer(kind, layers=layers, seq=8, seed=seed, **kw)
    m.meta["block_prefix"] = "layers"
    return m


def with_identical_blocks(m: Module, src: int, dsts: list[int]) -> Module:
    """A copy of ``m`` whose blocks ``dsts`` hold block ``src``'s matrices (same values, own tensors)."""
    m = m.clone()
    for k in list(m.params):
        parts = k.split(".")
        if parts[0] == "layers" and int(parts[1]) in dsts and m.params[k].dim() >= 2:
            m.params[k] = m.params[".".join(["layers", str(src), *parts[2:]])].clone()
    return m


def run(m: Module, opts: dict, calib: list[dict[str, torch.Tensor]], selector: Selector | None = None
        ) -> tuple[Module, PassContext]:
    ctx = PassContext(calibration=calib, selector=selector or Selector())
    out = get_pass("share-blocks")(opts).run(m.clone(), ctx)
    return out, ctx


def test_singleton_groups_are_the_identity() -> None:
    m = tiny()
    out, ctx = run(m, {"groups": [[0], [1], [2], [3]]}, outlier_inputs(m, 2))
    assert print_module(out) == print_module(m)
    assert ctx.metrics["blocks_ratio"] == 1.0


@settings(max_examples=6, deadline=None)
@given(kind=st.sampled_from(["llama", "bert"]), seed=st.integers(0, 1000), lo=st.integers(0, 2),
       size=st.integers(2, 3), coefficients=st.sampled_from(["channel", "none"]))
def test_sharing_identical_blocks_changes_nothing(kind: str, seed: int, lo: int, size: int, coefficients: str) -> None:
    """Blocks that already hold the same weights share them exactly: outputs equal, coefficients fit to one."""
    hi = min(lo + size, 4)
    base = with_identical_blocks(tiny(kind, seed=seed), lo, list(range(lo + 1, hi)))
    calib = outlier_inputs(base, 3, seed=seed)
    out, ctx = run(base, {"groups": [list(range(lo, hi))], "coefficients": coefficients}, calib)
    for b in calib:
        assert torch.allclose(interpret(out, b)[0], interpret(base, b)[0], atol=1e-4, rtol=1e-4)
    coefs = [k for k in out.params if k.endswith(".coef")]
    assert len(coefs) == (7 if kind == "llama" else 6) * (hi - lo) * (coefficients == "channel")
    for k in coefs:
        assert torch.allclose(out.params[k], torch.ones_like(out.params[k]), atol=1e-3)


def test_shared_tensors_are_stored_once_and_read_by_every_member() -> None:
    m = tiny()
    out, ctx = run(m, {"groups": [[0, 1, 2]], "shared": "mean"}, outlier_inputs(m, 3))
    shared = [k for k in out.params if ".shared_0_2." in k]
    assert len(shared) == 7  # q, k, v, o, gate, up, down: one tensor each
    reads = param_reads(out)
    for k in shared:
        assert reads[k] == 3
        assert {n.block for n in out.nodes if n.op == "param" and n.attrs["name"] == k} == {0, 1, 2}
    # the members' own matrices are gone; their norms stay
    assert not any(k.startswith("layers.1.") and out.params[k].dim() >= 2 for k in out.params)
    assert "layers.1.ln1.weight" in out.params
    assert ctx.metrics["unique_params"] == out.param_count() < ctx.metrics["total_params"]


def test_ratio_is_met_and_groups_are_contiguous() -> None:
    m = tiny(layers=6, d=64, ff=128)
    calib = outlier_inputs(m, 3)
    for ratio in (0.85, 0.6, 0.45):
        out, ctx = run(m, {"ratio": ratio, "max_group": 3}, calib)
        assert ctx.metrics["blocks_ratio"] <= ratio
        groups = ctx.metrics["groups"]
        assert [b for g in groups for b in g] == list(range(6))
        assert all(g == list(range(g[0], g[-1] + 1)) and len(g) <= 3 for g in groups)


def test_coefficients_beat_plain_tying_on_calibration_data() -> None:
    m = tiny(layers=4, d=64, ff=128, seed=3)
    calib = outlier_inputs(m, 4)
    _, ctx = run(m, {"groups": [[0, 1], [2, 3]]}, calib)
    fit = ctx.metrics["coefficient_fit"]
    assert fit["error_after"] < fit["error_before"]


def test_mean_or_representative_is_chosen_by_calibration_cost() -> None:
    m = with_identical_blocks(tiny(seed=5), 1, [2])  # 1 and 2 identical: block 1 (or 2) is a perfect source for both
    calib = outlier_inputs(m, 3)
    _, ctx = run(m, {"groups": [[1, 2]], "shared": "auto"}, calib)
    assert ctx.metrics["sources"] in ([1], [2])  # the mean equals them but is not cheaper: a block is kept
    _, ctx = run(m, {"groups": [[1, 2]], "shared": "mean"}, calib)
    assert ctx.metrics["sources"] == ["mean"]


def test_scope_selector_ties_only_selected_weights() -> None:
    m = tiny()
    out, _ = run(m, {"groups": [[0, 1]]}, outlier_inputs(m, 2), Selector(scopes=("*.mlp.*",)))
    assert "layers.1.attn.q.weight" in out.params and "layers.1.mlp.up.weight" not in out.params


def test_healing_reports_a_loss_curve_and_does_not_hurt_calibration_loss() -> None:
    m = tiny(layers=4, d=64, ff=128, seed=2)
    calib = outlier_inputs(m, 3)
    _, ctx = run(m, {"groups": [[0, 1, 2, 3]], "heal_steps": 12, "heal_lr": 3e-3}, calib)
    h = ctx.metrics["healing"]
    assert h["steps"] == 12 and len(h["loss_curve"]) == 12
    assert h["loss_after"] <= h["loss_before"]


def test_bad_groups_are_option_errors() -> None:
    with pytest.raises(PassError, match="consecutive"):
        get_pass("share-blocks")({"groups": [[0, 2]]})
    with pytest.raises(PassError, match="overlaps"):
        get_pass("share-blocks")({"groups": [[0, 1], [1, 2]]})
    with pytest.raises(PassError, match="ratio"):
        get_pass("share-blocks")({"ratio": 1.5})


def test_unreachable_ratio_and_unknown_blocks_fail_clearly() -> None:
    m = tiny(layers=2)
    calib = outlier_inputs(m, 2)
    pm = PassManager([get_pass("share-blocks")({"ratio": 0.05})], calibration=calib)
    with pytest.raises(PipelineError, match="cannot be reached"):
        pm.run(m)
    with pytest.raises(PassError, match="not among the selected blocks"):
        run(m, {"groups": [[4, 5]]}, calib)
    with pytest.raises(PassError, match="at least two"):
        run(m, {"ratio": 0.5}, calib, Selector(blocks=((0, 1),)))


def test_needs_block_structure() -> None:
    m = tiny()
    for n in m.nodes:
        n.block = None
    with pytest.raises(PassError, match="no repeated blocks"):
        run(m, {"ratio": 0.5}, outlier_inputs(m, 2))


def test_quantized_blocks_are_refused_with_the_order_to_use() -> None:
    m = tiny()
    calib = outlier_inputs(m, 2)
    q = get_pass("quantize")({"w_bits": 8, "a_bits": 16}).run(m.clone(), PassContext(calibration=calib))
    with pytest.raises(PassError, match="tie before quantizing"):
        run(q, {"ratio": 0.5}, calib)


def test_blocks_quantized_apart_are_named_with_what_differs_and_the_selector_that_works() -> None:
    """rptq on blocks[0:2], then share-blocks groups=[[2, 3]]: the refusal read 'blocks 0 and 1 differ in structure
    (node 9: quant_linear vs quant_linear)', the same op twice; it now names what differs and the order to use."""
    m = tiny()
    calib = outlier_inputs(m, 2)
    q = get_pass("rptq")({"w_bits": 8, "a_bits": 8}).run(
        m.clone(), PassContext(calibration=calib, selector=Selector(blocks=((0, 2),))))
    with pytest.raises(PassError, match=r"quant_linear at layers\.0\.\S+ vs layers\.1\.\S+: attribute \w+ "
                                        r"differs.*tie before quantizing") as e:
        run(q, {"groups": [[2, 3]]}, calib)
    assert "quant_linear vs quant_linear" not in str(e.value)
    out, _ = run(q, {"groups": [[2, 3]]}, calib, Selector(blocks=((2, 4),)))  # the selector the message points at
    assert out.op_counts()["quant_linear"] == q.op_counts()["quant_linear"]


@pytest.mark.parametrize("name, opts", [
    ("share-blocks", {"ratio": 0.6, "max_group": 2, "score_batches": 2}),
    ("recursive", {"loops": 2, "rank": 4, "score_batches": 2}),
])
def test_bf16_model_gets_bf16_adapters_and_healing_it_is_refused_up_front(name: str, opts: dict) -> None:
    """`model hf DIR dtype=bf16` + share-blocks failed 'mul: operand dtypes differ (bf16 vs f32)', + recursive
    'lowrank_linear ... expected m1 and m2 to have the same dtype' (exit 4): coefficients, LoRA factors and the
    fitted values were f32. They now take the model's dtype. Healing (f32 training) on such a model is refused
    before any work, saying what to do, instead of a dtype error inside the training graph."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from hf_configs import hf_inputs, tiny_hf

    from ctc.frontends import capture_hf_model

    m = capture_hf_model(tiny_hf("qwen2", layers=4).to(torch.bfloat16), seq_len=8)
    calib = [hf_inputs(1, 16, seed=s) for s in range(3)]
    cls = type(get_pass(name)(opts))
    healing = cls.Options.from_dict({**opts, "heal_steps": 2})
    ((where, msg),) = cls.check_module(healing, m, Selector())
    assert where is None and "healing trains in float32" in msg and "bfloat16" in msg and "dtype=f32" in msg
    with pytest.raises(PassError, match="healing trains in float32"):
        get_pass(name)({**opts, "heal_steps": 2}).run(m.clone(), PassContext(calibration=calib))
    assert cls.check_module(cls.Options.from_dict(opts), m, Selector()) == []
    out = get_pass(name)(opts).run(m, PassContext(calibration=calib))
    assert {t.dtype for t in out.params.values() if t.is_floating_point()} == {torch.bfloat16}
    assert interpret(out, calib[0])[0].dtype == torch.bfloat16
