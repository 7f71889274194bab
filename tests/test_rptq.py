"""rptq pass: folding the reorder is exact, the fold check catches a missed consumer, clusters=1 is
per-tensor, k-means is deterministic, GPTQ reduces the layer output error, quantized graphs are integer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_transformers import outlier_inputs, tiny_transformer

from ctc.ir import quant as Q
from ctc.ir.graph import param_tensor
from ctc.ir.interpreter import interpret
from ctc.ir.verify import verify
from ctc.options import OptionError
from ctc.passes.base import PassContext, PassError, get_pass
from ctc.passes.quantize import mse_clipped_range, segment_qparams
from ctc.passes.rptq import check_fold_complete, gptq_quantize, kmeans, runs

FAST = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _run(kind: str, opts: dict, seed: int = 0, **kw: int):
    m = tiny_transformer(kind, seed=seed, **kw)
    cal = outlier_inputs(m, 3, seed=seed + 1)
    ref = m.clone()
    ctx = PassContext(calibration=cal, seed=seed)
    out = get_pass("rptq")(opts).run(m, ctx)
    verify(out)
    return ref, out, cal, ctx


@FAST
@given(kind=st.sampled_from(["bert", "llama"]), seed=st.integers(0, 10_000), clusters=st.integers(1, 6),
       heads=st.sampled_from([2, 4]), max_segments=st.sampled_from([1024, 1]))
def test_fold_only_is_exact(kind: str, seed: int, clusters: int, heads: int, max_segments: int) -> None:
    ref, out, cal, ctx = _run(kind, {"fold_only": True, "clusters": clusters, "check_fold": False,
                                     "max_segments": max_segments},
                              seed=seed, heads=heads, kv_heads=heads // 2)
    assert out.op_counts().get("quant_linear", 0) == 0
    for b in cal:
        a, e = interpret(out, b)[0], interpret(ref, b)[0]
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))
    routes = dict(ctx.metrics["rptq_routes"])
    if max_segments == 1:  # head-wise attention folds with > 1 segment become explicit gathers
        n = 2 - routes.get("attention", 0)
        routes["attention"] = 2
        routes["explicit"] = routes.get("explicit", 0) - n
        routes = {k: v for k, v in routes.items() if v}
    if kind == "llama":  # pre-norm: every reorder folds with no standalone permute besides the norm gathers
        assert routes == {"norm": 4, "attention": 2, "producer": 2}
    else:  # post-LN: the LN output is also the residual stream -> explicit permute on the linear branch
        assert routes == {"explicit": 4, "attention": 2, "producer": 2}


def test_a16_w16_like_fold_with_weights_changes_nothing_in_float() -> None:
    """a_bits=16 keeps activations float; with the reorder folded the graph still computes the same
    function as RTN weight-only quantization of the un-reordered weights (same per-row scales)."""
    ref, out, cal, _ = _run("llama", {"a_bits": 16, "w_bits": 8})
    base = ref.clone()
    base = get_pass("quantize")({"a_bits": 16, "w_bits": 8}).run(base, PassContext(calibration=cal))
    a, e = interpret(out, cal[0])[0], interpret(base, cal[0])[0]
    torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))


def test_fold_check_fails_loudly_on_missed_consumer() -> None:
    """Permute a LayerNorm-produced value but declare only the q/k/v linears handled: the residual
    add that also reads it (BERT post-LN) must be reported."""
    m = tiny_transformer("bert", layers=1)
    ln = next(n for n in m.nodes if n.op == "layer_norm")
    x = ln.output
    lins = [u for u in x.users if u.op == "linear"]
    assert any(u.op == "add" for u in x.users)
    with pytest.raises(PassError, match=r"read by add .* does not absorb"):
        check_fold_complete(m, [x], lins)
    check_fold_complete(m, [x], x.users)  # all readers handled: passes
    last = m.outputs[0]
    with pytest.raises(PassError, match="module output"):
        check_fold_complete(m, [last], [])


def test_fold_numeric_check_catches_wrong_layout() -> None:
    """check_fold compares the folded float graph with the original: break the head layout the
    attention route relies on (heads merged in the wrong order) and the pass must refuse."""
    m = tiny_transformer("bert", layers=1, heads=4)
    attn = next(n for n in m.nodes if n.op == "scaled_dot_product_attention")
    t = attn.output.users[0]
    assert t.op == "transpose"
    t.attrs["dim0"], t.attrs["dim1"] = 1, 1  # identity transpose: the reshape now mixes positions and heads
    for v in t.outputs:
        v.type = attn.output.type
    with pytest.raises(PassError, match="changed the float outputs"):
        get_pass("rptq")({"fold_only": True, "max_segments": 1024}).run(
            m, PassContext(calibration=outlier_inputs(m, 2)))


@FAST
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([4, 8]))
def test_clusters_one_equals_per_tensor(seed: int, bits: int) -> None:
    """RPTQ with one cluster is per-tensor activation quantization (same weights: per channel)."""
    ref, out, cal, _ = _run("llama", {"clusters": 1, "w_bits": 8, "a_bits": bits, "check_fold": False}, seed=seed)
    base = get_pass("quantize")({"w_bits": 8, "a_bits": bits, "a_granularity": "tensor",
                                 "w_granularity": "channel"}).run(ref, PassContext(calibration=cal, seed=seed))
    for n in out.nodes:
        if n.op == "quant_linear":
            assert n.attrs["act_clusters"] == ()
    a, e = interpret(out, cal[0])[0], interpret(base, cal[0])[0]
    torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))


def test_rptq_beats_per_tensor_on_outlier_channels() -> None:
    ref, out, cal, _ = _run("llama", {"clusters": 8, "w_bits": 8, "a_bits": 4})
    base = get_pass("quantize")({"w_bits": 8, "a_bits": 4}).run(ref.clone(), PassContext(calibration=cal))
    e_r = e_t = 0.0
    for b in cal:
        y = interpret(ref, b)[0]
        e_r += float((interpret(out, b)[0] - y).pow(2).mean())
        e_t += float((interpret(base, b)[0] - y).pow(2).mean())
    assert e_r < 0.5 * e_t


def test_quantized_graph_is_integer_and_segments_contiguous() -> None:
    _, out, _, _ = _run("llama", {"clusters": 3, "w_bits": 4, "a_bits": 8})
    qls = [n for n in out.nodes if n.op == "quant_linear"]
    assert len(qls) == 14  # 7 linears x 2 blocks; lm_head (outside the blocks) stays float
    assert not [n for n in out.nodes if n.op == "linear" and n.block is not None]
    for n in qls:
        qw = out.params[n.inputs[1].producer.attrs["name"]]
        assert qw.dtype == torch.uint8  # int4 packed two per byte
        k = n.inputs[0].type.shape[-1]
        assert qw.shape[1] == (k + 1) // 2
        b = n.attrs["act_clusters"]
        assert list(b) == sorted(set(b)) and (not b or b[-1] == k)
    # standalone gathers: only the norm-input ones (pre-norm model)
    assert out.op_counts().get("channel_permute", 0) == 4


def test_kmeans_deterministic_and_separates() -> None:
    g = torch.Generator().manual_seed(0)
    pts = torch.cat([torch.randn(20, 2, generator=g) * 0.05 + c for c in (0.0, 5.0, -7.0)])
    l1, l2 = kmeans(pts, 3, seed=3), kmeans(pts, 3, seed=3)
    assert torch.equal(l1, l2)
    assert len(set(l1[:20].tolist())) == len(set(l1[20:40].tolist())) == len(set(l1[40:].tolist())) == 1
    assert len(set(l1.tolist())) == 3
    assert kmeans(pts[:2], 5).tolist() in ([0, 1], [1, 0])  # k capped by the point count
    assert runs(torch.tensor([0, 0, 1, 1, 1, 2])) == [2, 5, 6]


@FAST
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([4, 8]), k=st.integers(2, 40), nseg=st.integers(1, 4))
def test_act_quant_dequant_error_within_half_step(seed: int, bits: int, k: int, nseg: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, k, generator=g) * torch.rand(k, generator=g) * 10
    nseg = min(nseg, k)
    bounds = sorted(set(torch.randperm(k - 1, generator=g)[: nseg - 1].add(1).tolist())) + [k]
    s, z = segment_qparams(x.amin(0), x.amax(0), bounds, bits)
    y = Q.fake_quant_act(x, s, z, bits, bounds)
    step = s[Q.cluster_index(bounds, k)]
    assert bool(((y - x).abs() <= step / 2 + 1e-6 * (1 + x.abs())).all())


@pytest.mark.parametrize("group_size", [-1, 8])
def test_gptq_reduces_output_error(group_size: int) -> None:
    g = torch.Generator().manual_seed(0)
    k, n = 32, 24
    mix = torch.randn(k, k, generator=g)
    x = torch.randn(512, k, generator=g) @ mix  # correlated inputs: where GPTQ helps
    w = torch.randn(n, k, generator=g)
    h = x.double().T @ x.double() / x.shape[0]
    q_g = gptq_quantize(w, h, 4, group_size, True)
    q_r = Q.quantize_weight(w, 4, group_size, True)

    def err(q: Q.QuantizedWeight) -> float:
        wd = Q.dequantize_weight(q.qweight, q.scale, q.zero, q.bits, q.group_size, k)
        return float((x @ (wd - w).T).pow(2).mean())

    assert err(q_g) < 0.8 * err(q_r)
    codes = Q.unpack_weight(q_g.qweight, 4, k)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7


def test_gptq_pass_runs_with_hessian() -> None:
    ref, out, cal, ctx = _run("bert", {"gptq": True, "w_bits": 4, "a_bits": 8, "kv_bits": 8, "clusters": 4})
    assert out.op_counts()["quant_linear"] == 12
    assert out.op_counts()["quantize"] == 4  # k and v of two attention layers
    y = interpret(out, cal[0])[0]
    e = interpret(ref, cal[0])[0]
    assert float((y - e).abs().max()) < 0.5 * float(e.abs().max())


def test_bad_options_are_errors() -> None:
    with pytest.raises(PassError, match="group_size"):
        get_pass("rptq")({"group_size": 0})
    with pytest.raises(PassError, match="did you mean 'clusters'"):
        get_pass("rptq")({"cluster": 4})
    with pytest.raises(PassError, match="a_bits"):
        get_pass("rptq")({"a_bits": 3})


def test_gptq_is_the_default_rounding_at_four_bits_or_fewer() -> None:
    """Unset ``gptq`` means GPTQ for w_bits <= 4 and RTN above; an explicit value wins; fold_only rounds nothing."""
    opts = get_pass("rptq").Options
    assert opts(w_bits=4).use_gptq and opts(w_bits=3).use_gptq and not opts(w_bits=8).use_gptq
    assert not opts(w_bits=4, gptq=False).use_gptq and opts(w_bits=8, gptq=True).use_gptq
    assert not opts(w_bits=4, fold_only=True).use_gptq  # and no contradiction error
    assert (opts(w_bits=4).groups, opts(w_bits=4).symmetric) == (32, False)
    assert (opts(w_bits=8).groups, opts(w_bits=8).symmetric) == (-1, True)
    assert (opts(w_bits=4, group_size=-1, sym=True).groups, opts(w_bits=4, sym=True).symmetric) == (-1, True)
    _, out, _, ctx = _run("llama", {"w_bits": 4, "a_bits": 8, "clusters": 2, "check_fold": False})
    assert any("GPTQ" in n for n in ctx.notes)
    _, rtn, _, ctx = _run("llama", {"w_bits": 4, "a_bits": 8, "clusters": 2, "check_fold": False, "gptq": False})
    assert any("RTN" in n for n in ctx.notes)
    w_gptq = [out.params[n.operand("qweight").producer.attrs["name"]] for n in out.nodes if n.op == "quant_linear"]
    w_rtn = [rtn.params[n.operand("qweight").producer.attrs["name"]] for n in rtn.nodes if n.op == "quant_linear"]
    assert any(not torch.equal(a, b) for a, b in zip(w_gptq, w_rtn, strict=True))


@FAST
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([4, 8]), spike=st.floats(5.0, 200.0))
def test_mse_clipping_never_worse_than_minmax_and_clips_rare_spikes(seed: int, bits: int, spike: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2000, generator=g)
    x[0] = spike  # one rare large value sets the min-max range
    lo, hi = x.min(), x.max()
    a, b = mse_clipped_range(x, lo, hi, bits)

    def err(lo_: torch.Tensor, hi_: torch.Tensor) -> float:
        s, z = Q.act_qparams(lo_, hi_, bits)
        return float(((torch.clamp(torch.round(x / s) + z, 0, (1 << bits) - 1) - z) * s - x).square().sum())

    assert err(a, b) <= err(lo, hi)
    assert float(a) <= 0 <= float(b) and float(b) <= float(hi) and float(a) >= float(lo)
    if bits == 4 and spike >= 150:
        assert float(b) < float(hi)  # a far spike is not worth 4 bits of everyone's resolution


def test_rptq_mse_clipping_shrinks_static_ranges() -> None:
    """a_clip="mse" samples calibration rows and never widens a segment's range over min-max."""
    _, mm, _, _ = _run("llama", {"w_bits": 8, "a_bits": 4, "clusters": 2, "check_fold": False})
    _, cl, _, ctx = _run("llama", {"w_bits": 8, "a_bits": 4, "clusters": 2, "check_fold": False, "a_clip": "mse",
                                   "clip_rows": 64})
    assert "calibration-stats" in ctx.computed

    def scales(m: object) -> list[torch.Tensor]:
        return [m.params[n.operand("act_scale").producer.attrs["name"]] for n in m.nodes  # type: ignore[attr-defined]
                if n.op == "quant_linear"]

    pairs = list(zip(scales(cl), scales(mm), strict=True))
    assert all(bool((c <= m * (1 + 1e-6)).all()) for c, m in pairs)
    assert any(bool((c < m).any()) for c, m in pairs)
    with pytest.raises(PassError, match="a_clip"):
        get_pass("rptq")({"a_clip": "percentile"})


def test_activation_ranges_default_to_per_token_for_decoder_lms_only() -> None:
    """a_mode="auto": dynamic (no calibrated act scales) on a module marked as a causal LM, static on any other;
    an explicit a_mode wins."""
    def act_modes(task: str | None, a_mode: str | None) -> set[bool]:
        m = tiny_transformer("llama", seed=0)
        if task is not None:
            m.meta["task"] = task
        cal = outlier_inputs(m, 2, seed=1)
        opts = {"clusters": 2, "check_fold": False, **({"a_mode": a_mode} if a_mode else {})}
        out = get_pass("rptq")(opts).run(m, PassContext(calibration=cal))
        return {bool(n.attrs["act_dynamic"]) for n in out.nodes if n.op == "quant_linear"}

    assert act_modes("causal_lm", None) == {True} and act_modes("decode_step", None) == {True}
    assert act_modes("encoder", None) == {False} and act_modes(None, None) == {False}
    assert act_modes("causal_lm", "static") == {False} and act_modes("encoder", "dynamic") == {True}


def test_gptq_float_zero_keeps_weights_already_on_a_q4_1_grid() -> None:
    """Weights that sit on a Q4_1 grid (per block of 32: ``min + d * u``, codes 0 and 15 used) come back exactly
    from GPTQ with float zero points (no rounding error, so no feedback), not from integer zero points."""
    g = torch.Generator().manual_seed(4)
    n, k = 16, 64
    d = torch.rand(n, k // 32, 1, generator=g) * 0.02 + 0.005
    m = torch.rand(n, k // 32, 1, generator=g) * 0.1 - 0.12
    u = torch.randint(0, 16, (n, k // 32, 32), generator=g)
    u[..., 0], u[..., 1] = 0, 15
    w = (m + d * u).reshape(n, k)
    x = torch.randn(256, k, generator=g)
    h = x.double().T @ x.double() / x.shape[0]
    fz = gptq_quantize(w, h, 4, 32, False, float_zero=True)
    assert fz.zero.dtype == torch.float32
    back = Q.dequantize_weight(fz.qweight, fz.scale, fz.zero, 4, 32, k)
    torch.testing.assert_close(back, w, rtol=0, atol=1e-5)
    iz = gptq_quantize(w, h, 4, 32, False)
    assert iz.zero.dtype == torch.int8
    assert float((Q.dequantize_weight(iz.qweight, iz.scale, iz.zero, 4, 32, k) - w).abs().max()) > 1e-3


def test_float_zero_option_needs_run_time_activation_ranges() -> None:
    m = tiny_transformer("llama", seed=0)
    m.meta["task"] = "causal_lm"
    cal = outlier_inputs(m, 2, seed=1)
    out = get_pass("rptq")({"w_bits": 4, "clusters": 2, "w_zero": "float", "check_fold": False}).run(
        m, PassContext(calibration=cal))
    verify(out)
    qls = [n for n in out.nodes if n.op == "quant_linear"]
    assert qls and all(n.attrs["act_dynamic"] and n.operand("w_zero").type.dtype == "f32" for n in qls)
    with pytest.raises(PassError, match="w_zero"):
        get_pass("rptq")({"w_zero": "float", "a_mode": "static"})
    with pytest.raises(PassError, match="w_zero"):
        get_pass("rptq")({"w_zero": "float", "sym": True})
    enc = tiny_transformer("llama", seed=0)
    with pytest.raises(PassError, match="w_zero"):
        get_pass("rptq")({"w_bits": 4, "w_zero": "float", "check_fold": False}).run(
            enc, PassContext(calibration=outlier_inputs(enc, 2, seed=1)))


# --------------------------------------------------------------------------- clusters="auto"
def _dequantized_rows(n) -> list[tuple[float, ...]]:
    """A quant_linear's dequantized weight rows as a sorted list (independent of the output-row order)."""
    q, s, z = (param_tensor(n.operand(o)) for o in ("qweight", "w_scale", "w_zero"))
    k = n.operand("x").type.shape[-1]
    return sorted(map(tuple, Q.dequantize_weight(q, s, z, n.attrs["w_bits"], n.attrs["group_size"], k).tolist()))


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_auto_clusters_picks_the_least_error_and_quantizes_as_that_count(kind: str) -> None:
    """clusters="auto" (the w_bits <= 4 default) records, per activation, its readers' relative output error for
    each candidate, picks the least (the fewer clusters on a tie), and quantizes those readers exactly as a run
    with that count fixed does: same activation segments, same weight rows (up to the output-row order, which
    a neighbouring activation's reorder decides)."""
    def run(opts: dict):
        m = tiny_transformer(kind, seed=0, d=64, ff=96)
        ctx = PassContext(calibration=outlier_inputs(m, 3, seed=1), seed=0)
        out = get_pass("rptq")({"w_bits": 4, "a_bits": 8, "check_fold": False, **opts}).run(m, ctx)
        verify(out)
        return {n.scope: n for n in out.nodes if n.op == "quant_linear"}, ctx

    auto, ctx = run({})
    fixed = {k: run({"clusters": k})[0] for k in (1, 8)}
    choices = ctx.metrics["rptq_cluster_choice"]
    assert {c["chosen"] for c in choices} == {1, 8}  # this model has activations of both kinds
    assert any("clusters=auto" in n for n in ctx.notes)
    for c in choices:
        err = {int(k): v for k, v in c["rel_error"].items()}
        assert set(err) == {1, 8} and c["chosen"] == min(err, key=lambda k: (err[k], k))
        for r in c["readers"]:
            a, f = auto[r], fixed[c["chosen"]][r]
            assert a.attrs["act_clusters"] == f.attrs["act_clusters"]
            assert _dequantized_rows(a) == _dequantized_rows(f)


def test_auto_clusters_keeps_weight_groups_that_sit_on_their_grid() -> None:
    """Weights already on a 4-bit grid per group of 16 in their own channel order (as a model de-quantized from
    a GGUF Q4_1 file is): a reorder would mix groups and move every weight; clusters="auto" measures that and
    keeps the order (one cluster) wherever a reorder would have changed it, so float-zero W4 weights come back
    exactly.  A fixed 8-cluster reorder does not."""
    m = tiny_transformer("llama", seed=3, d=64, ff=96)
    for name, t in list(m.params.items()):
        if name.endswith(".weight") and t.dim() == 2:
            g = t.reshape(t.shape[0], -1, 16)
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            s = (hi - lo) / 15
            m.params[name] = (lo + s * torch.round((g - lo) / s)).reshape(t.shape)
    cal = outlier_inputs(m, 3, seed=1)
    opts = {"w_bits": 4, "a_bits": 16, "group_size": 16, "w_zero": "float", "check_fold": False}

    def err(o: dict) -> tuple[float, PassContext]:
        ctx = PassContext(calibration=cal, seed=0)
        out = get_pass("rptq")({**opts, **o}).run(m.clone(), ctx)
        a, e = interpret(out, cal[0])[0], interpret(m, cal[0])[0]
        return float((a - e).abs().max() / e.abs().max()), ctx

    e_auto, ctx = err({})
    e_8, _ = err({"clusters": 8})
    assert e_auto < 1e-5 < 1e-3 < e_8
    assert {c["chosen"] for c in ctx.metrics["rptq_cluster_choice"]} == {1}


def test_cluster_count_options() -> None:
    opts = get_pass("rptq").Options
    assert opts(w_bits=4).cluster_candidates == (1, 8) and opts(w_bits=8).cluster_candidates == (8,)
    assert opts(w_bits=8, clusters="auto", auto_clusters=[16, 1, 4]).cluster_candidates == (1, 4, 16)
    assert opts(w_bits=4, clusters=3).cluster_candidates == (3,)
    assert opts(w_bits=4, fold_only=True).cluster_candidates == (8,)
    with pytest.raises(PassError, match="clusters='many'"):
        opts(clusters="many")
    with pytest.raises(PassError, match="fold_only"):
        opts(clusters="auto", fold_only=True)
    with pytest.raises(PassError, match="auto_clusters"):
        opts(auto_clusters=[])
    with pytest.raises(OptionError, match="clusters"):
        opts(clusters=0)


def test_float_zero_points_are_the_default_where_activation_ranges_are_per_token() -> None:
    """w_zero="auto": asymmetric weights get f32 zero points (each group's own min..max) where the activations'
    ranges are per token at run time (decoders by default), integer ones with static ranges (whose integer
    kernels need them); symmetric weights have none; an explicit w_zero wins."""
    def zero_dtypes(task: str | None, **opts: object) -> set[str]:
        m = tiny_transformer("llama", seed=0)
        if task is not None:
            m.meta["task"] = task
        cal = outlier_inputs(m, 2, seed=1)
        out = get_pass("rptq")({"w_bits": 4, "clusters": 2, "check_fold": False, **opts}).run(
            m, PassContext(calibration=cal))
        return {n.operand("w_zero").type.dtype for n in out.nodes if n.op == "quant_linear"}

    assert zero_dtypes("causal_lm") == {"f32"} and zero_dtypes(None) == {"i8"}
    assert zero_dtypes("causal_lm", w_zero="int") == {"i8"} and zero_dtypes("causal_lm", w_bits=8) == {"i8"}
    assert zero_dtypes(None, a_mode="dynamic") == {"f32"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_passes_the_fold_check(dtype: torch.dtype) -> None:
    """`model hf DIR dtype=bf16` + rptq failed 'folding the reorder changed the float outputs (max error 0.00391 >
    0.000116)': one bf16 ulp from the permuted summation order, judged by an fp32 tolerance. The check's tolerance
    follows the output's precision; a fold that really mis-handles a layout still fails it (fp32 test above)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from hf_configs import hf_inputs, tiny_hf

    from ctc.frontends import capture_hf_model

    model = tiny_hf("gpt2", head_dim=16).to(dtype)
    m = capture_hf_model(model, seq_len=8)
    calib = [hf_inputs(2, 16, seed=s) for s in range(2)]
    out = get_pass("rptq")({"w_bits": 8, "a_bits": 8}).run(m, PassContext(calibration=calib))
    assert out.op_counts()["quant_linear"] == 2 * 4
