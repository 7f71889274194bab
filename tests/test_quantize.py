"""quantize pass (min-max RTN baselines): real packed weights, half-step bounds, granularity ordering."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_transformers import outlier_inputs, tiny_transformer

from ctc.ir import quant as Q
from ctc.ir.interpreter import interpret
from ctc.ir.verify import verify
from ctc.passes.base import PassContext, PassError, get_pass
from ctc.passes.quantize import quantize_weight_rtn

FAST = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([2, 3, 4, 6, 8]), gran=st.sampled_from(["tensor", "channel",
                                                                                                  "group"]),
       sym=st.booleans(), n=st.integers(1, 9), k=st.integers(1, 33), gs=st.sampled_from([4, 8]))
def test_weight_dequant_error_within_half_step(seed: int, bits: int, gran: str, sym: bool, n: int, k: int,
                                               gs: int) -> None:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 3
    qw = quantize_weight_rtn(w, bits, gran, gs, sym)
    assert qw.qweight.dtype == (torch.uint8 if bits <= 4 else torch.int8)
    wd = Q.dequantize_weight(qw.qweight, qw.scale, qw.zero, bits, qw.group_size, k)
    step = Q._expand_groups(qw.scale, qw.group_size, k)
    assert bool(((wd - w).abs() <= step / 2 + 1e-5 * (1 + w.abs())).all())


def _mse(kind: str, opts: dict, seed: int = 0) -> float:
    m = tiny_transformer(kind, seed=seed)
    cal = outlier_inputs(m, 3, seed=seed + 1)
    ref = m.clone()
    out = get_pass("quantize")(opts).run(m, PassContext(calibration=cal))
    verify(out)
    return sum(float((interpret(out, b)[0] - interpret(ref, b)[0]).pow(2).mean()) for b in cal)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_rewrites_every_block_linear(kind: str) -> None:
    m = tiny_transformer(kind)
    cal = outlier_inputs(m, 2)
    n_lin = len([n for n in m.nodes if n.op == "linear" and n.block is not None])
    out = get_pass("quantize")({"w_bits": 4, "a_bits": 8, "kv_bits": 8}).run(m, PassContext(calibration=cal))
    verify(out)
    c = out.op_counts()
    assert c["quant_linear"] == n_lin
    assert c["quantize"] == c["dequantize"] == 4
    assert not any(n.op == "linear" and n.block is not None for n in out.nodes)
    assert not any(k.endswith(".weight") and k.startswith("layers.") and "ln" not in k for k in out.params)


def test_granularity_ordering() -> None:
    """Per-channel activations beat per-tensor ones on outlier channels; finer weights beat per-tensor."""
    assert _mse("llama", {"a_bits": 4, "a_granularity": "channel"}) < _mse("llama", {"a_bits": 4})
    w_t = _mse("llama", {"w_bits": 3, "a_bits": 16, "w_granularity": "tensor"})
    w_c = _mse("llama", {"w_bits": 3, "a_bits": 16, "w_granularity": "channel"})
    w_g = _mse("llama", {"w_bits": 3, "a_bits": 16, "w_granularity": "group", "group_size": 8})
    assert w_g < w_t and w_c < w_t


def test_eight_bit_close_to_float() -> None:
    m = tiny_transformer("bert")
    cal = outlier_inputs(m, 2)
    ref = interpret(m, cal[0])[0]
    out = get_pass("quantize")({"w_bits": 8, "a_bits": 8, "a_granularity": "channel"}).run(
        m, PassContext(calibration=cal))
    y = interpret(out, cal[0])[0]
    assert float((y - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_selector_and_options() -> None:
    from ctc.passes.base import Selector

    m = tiny_transformer("llama")
    ctx = PassContext(calibration=outlier_inputs(m, 1), selector=Selector(scopes=("*.mlp.*",)))
    out = get_pass("quantize")({}).run(m, ctx)
    assert out.op_counts()["quant_linear"] == 6  # gate/up/down of 2 blocks
    with pytest.raises(PassError, match="w_granularity"):
        get_pass("quantize")({"w_granularity": "row"})
    with pytest.raises(PassError, match="no option"):
        get_pass("quantize")({"bits": 4})


def test_module_without_blocks_quantizes_all_but_heads() -> None:
    """fx-path captures carry no block info: every linear but the one producing the output is quantized."""
    m = tiny_transformer("llama")
    for n in m.nodes:
        n.block = None
    ctx = PassContext(calibration=outlier_inputs(m, 1))
    out = get_pass("rptq")({"w_bits": 8, "a_bits": 8}).run(m, ctx)
    assert out.op_counts()["quant_linear"] == 14
    head = out.outputs[0].producer
    assert head is not None and head.op == "linear"
    assert any("no block information" in s for s in ctx.notes)


@FAST
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([3, 4, 8]), gs=st.sampled_from([-1, 8, 32]),
       n=st.integers(1, 6), k=st.integers(1, 40))
def test_float_zero_points_span_each_groups_own_range(seed: int, bits: int, gs: int, n: int, k: int) -> None:
    """``float_zero``: half-step error over the group's own min..max; weights already on such a grid
    (a GGUF Q4_1 tensor de-quantized) come back exactly, where integer zero points cannot."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) + 0.7  # mostly positive rows: an integer zero point wastes range
    qw = Q.quantize_weight(w, bits, gs, symmetric=False, float_zero=True)
    assert qw.zero.dtype == torch.float32 and not qw.symmetric
    wd = Q.dequantize_weight(qw.qweight, qw.scale, qw.zero, bits, gs, k)
    step = Q._expand_groups(qw.scale, gs, k)
    assert bool(((wd - w).abs() <= step / 2 + 1e-5 * (1 + w.abs())).all())
    on_grid = wd  # re-quantizing de-quantized weights is exact (to fp32 rounding)
    again = Q.quantize_weight(on_grid, bits, gs, symmetric=False, float_zero=True)
    back = Q.dequantize_weight(again.qweight, again.scale, again.zero, bits, gs, k)
    assert torch.allclose(back, on_grid, atol=1e-5 * float(on_grid.abs().max()) + 1e-6)


def test_float_zero_option_is_weight_only_and_keeps_f32_zero_points() -> None:
    m = tiny_transformer("llama")
    ref = m.clone()
    out = get_pass("quantize")({"w_bits": 4, "a_bits": 16, "sym": False, "w_zero": "float",
                                "w_granularity": "group", "group_size": 16}).run(m, PassContext())
    verify(out)
    zeros = [out.params[p.attrs["name"]] for p in out.nodes
             if p.op == "param" and str(p.attrs["name"]).endswith("w_zero")]
    assert zeros and all(z.dtype == torch.float32 for z in zeros)
    x = outlier_inputs(ref, 1)[0]
    assert float((interpret(out, x)[0] - interpret(ref, x)[0]).abs().max()) < 0.5
    for bad in ({"w_zero": "float", "a_bits": 16}, {"w_zero": "float", "sym": False},
                {"w_zero": "float", "sym": False, "a_bits": 16, "w_granularity": "tensor"}):
        with pytest.raises(PassError, match="w_zero"):
            get_pass("quantize")(bad)


def test_block_activation_mode_with_float_zero_points() -> None:
    """``a_mode="block"``: per-token ranges per block of 32 input channels (llama.cpp's Q8_1 form), computed at
    run time (no calibration), combinable with float weight zero points (Q4_1's grid)."""
    m = tiny_transformer("llama")
    ref = m.clone()
    p = get_pass("quantize")({"w_bits": 4, "a_bits": 8, "a_mode": "block", "sym": False, "w_zero": "float",
                              "w_granularity": "group", "group_size": 16})
    assert not p.calibration_needed()
    out = p.run(m, PassContext())
    verify(out)
    qls = [n for n in out.nodes if n.op == "quant_linear"]
    assert qls
    for n in qls:
        k = int(n.operand("x").type.shape[-1])
        assert n.attrs["act_dynamic"] and n.attrs["act_clusters"] == Q.act_block_clusters(k)
        assert n.operand("w_zero").type.dtype == "f32"
    x = outlier_inputs(ref, 1)[0]
    assert float((interpret(out, x)[0] - interpret(ref, x)[0]).abs().max()) < 0.5
    with pytest.raises(PassError, match="a_mode"):
        get_pass("quantize")({"a_mode": "block", "a_granularity": "channel"})
