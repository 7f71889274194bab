"""Semantics of the attention compression ops: ``sparse_attention`` (Energon) and
``calibrated_attention`` (ACT), by examples and hypothesis properties on their references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ctc.ir import OpError, TensorType, get_op
from ctc.ir.ops.compress_attention import (
    calibrate_rows,
    lowbit_vectors,
    masked_logits,
    repeat_kv_heads,
    score_error_bound,
    sparse_keep,
)


def _ref(op: str, *args, **attrs):
    d = get_op(op)
    return d.ref(*args, **d.check_attrs(attrs))


def _infer(op: str, types: list[TensorType], **attrs) -> list[TensorType]:
    d = get_op(op)
    return d.infer_types(types, d.check_attrs(attrs))


def _qkv(b=1, h=2, lq=6, lk=6, d=8, hk=None, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g) * scale, torch.randn(b, hk or h, lk, d, generator=g) * scale,
            torch.randn(b, hk or h, lk, d, generator=g))


@st.composite
def attention_inputs(draw, max_len: int = 12):
    """q, k, v (GQA or not), an optional bool/float mask that leaves every row a key, is_causal."""
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    hk = draw(st.sampled_from([1, 2]))
    h = hk * draw(st.sampled_from([1, 2]))
    lq = draw(st.integers(1, max_len))
    lk = draw(st.integers(1, max_len)) if draw(st.booleans()) else lq
    d = draw(st.sampled_from([4, 8, 16]))
    spread = draw(st.sampled_from([0.3, 1.0, 3.0]))
    q = torch.randn(2, h, lq, d, generator=g) * spread
    k = torch.randn(2, hk, lk, d, generator=g) * spread
    v = torch.randn(2, hk, lk, d, generator=g)
    causal = draw(st.booleans()) and lq <= lk
    kind = draw(st.sampled_from([None, "bool", "float"]))
    mask = None
    if kind == "bool":
        mask = torch.rand(2, 1, lq, lk, generator=g) > 0.4
        mask[..., 0] = True  # every row keeps a key (the first one is allowed under causal too)
    elif kind == "float":
        mask = torch.randn(2, 1, 1, lk, generator=g)
        mask[..., 1:] = mask[..., 1:].masked_fill(torch.rand(2, 1, 1, lk - 1, generator=g) > 0.7, -math.inf)
    return q, k, v, mask, causal


def _args(q, k, v, mask):
    return (q, k, v) if mask is None else (q, k, v, mask)


def _sdpa(q, k, v, mask, causal):
    """torch SDPA with a causal mask folded into ``mask`` (torch takes one or the other)."""
    if causal and mask is not None:
        tri = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        mask = (mask & tri) if mask.dtype == torch.bool else mask.masked_fill(~tri, -math.inf)
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _keep(q, k, mask, causal, **attrs):
    full = get_op("sparse_attention").check_attrs({"enable_gqa": q.shape[1] != k.shape[1], **attrs})
    _, allowed, add, sc = masked_logits(q, k, mask, causal, full["scale"])
    return sparse_keep(q, k, allowed, add, sc, round_bits=full["round_bits"], select=full["select"],
                       keep_ratios=full["keep_ratios"], alphas=full["alphas"], min_keep=full["min_keep"],
                       dense_heads=full["dense_heads"]), allowed


# =========================================================================== sparse_attention
@settings(max_examples=60, deadline=None)
@given(attention_inputs(), st.lists(st.sampled_from([2, 4, 8]), min_size=0, max_size=2))
def test_keep_ratio_one_equals_dense_attention(inp, bits):
    q, k, v, mask, causal = inp
    y = _ref("sparse_attention", *_args(q, k, v, mask), is_causal=causal, enable_gqa=q.shape[1] != k.shape[1],
             round_bits=tuple(bits), keep_ratios=(1.0,) * len(bits))
    torch.testing.assert_close(y, _sdpa(q, k, v, mask, causal), atol=2e-6, rtol=1e-5)


@settings(max_examples=80, deadline=None)
@given(attention_inputs(), st.lists(st.sampled_from([2, 3, 4, 8]), min_size=1, max_size=3),
       st.sampled_from([0.05, 0.25, 0.5]), st.sampled_from(["topk", "threshold"]), st.integers(1, 3))
def test_every_kept_set_holds_the_rows_exact_top1_key(inp, bits, ratio, select, min_keep):
    q, k, v, mask, causal = inp
    attrs = {"round_bits": tuple(bits), "select": select, "min_keep": min_keep}
    if select == "topk":
        attrs["keep_ratios"] = (ratio,) * len(bits)
    else:
        attrs["alphas"] = (min(1.0, 3 * ratio),) * len(bits)
    alive, allowed = _keep(q, k, mask, causal, **attrs)
    logits, _, _, _ = masked_logits(q, k, mask, causal, None)
    has = allowed.any(-1)
    top1 = logits.argmax(-1, keepdim=True)
    assert bool(alive.gather(-1, top1).squeeze(-1)[has].all())
    assert not bool((alive & ~allowed).any())  # masked keys are never kept
    n = allowed.sum(-1)
    if select == "topk":  # at least the requested share (ties and possible maxima may add more)
        want = torch.minimum(n, torch.ceil(n * ratio - 1e-9).long().clamp(min=min_keep))
    else:
        want = torch.minimum(n, torch.full_like(n, min_keep))
    assert bool((alive.sum(-1) >= want).all())


@settings(max_examples=40, deadline=None)
@given(attention_inputs(), st.sampled_from([(4,), (2, 8)]))
def test_masked_positions_never_receive_mass(inp, bits):
    q, k, v, mask, causal = inp
    lk = k.shape[-2]
    eye = torch.eye(lk).expand(k.shape[0], k.shape[1], lk, lk).contiguous()  # v = I: output = attention map
    for op, attrs in (("sparse_attention", {"round_bits": bits, "keep_ratios": (0.5,) * len(bits)}),
                      ("calibrated_attention", {"heads": tuple(range(q.shape[1])), "beta": 0.0, "threshold": 1.0})):
        a = _ref(op, *_args(q, k, eye, mask), is_causal=causal, enable_gqa=q.shape[1] != k.shape[1], **attrs)
        _, allowed, _, _ = masked_logits(q, k, mask, causal, None)
        assert bool((a[~allowed] == 0).all()), op
        assert torch.allclose(a.sum(-1)[allowed.any(-1)], torch.ones(()), atol=1e-5), op


def test_sparse_attention_by_example():
    # one sink-like key with a large logit and low-bit rounds: only a few keys survive
    q, k, v = _qkv(h=4, hk=2, lq=10, lk=10, seed=7)
    y = _ref("sparse_attention", q, k, v, round_bits=(8,), keep_ratios=(0.5,), enable_gqa=True, min_keep=1)
    alive, _ = _keep(q, k, None, False, round_bits=(8,), keep_ratios=(0.5,), min_keep=1)
    assert bool((alive.sum(-1) >= 5).all()) and bool((alive.sum(-1) <= 7).all())
    kk, vv = repeat_kv_heads(k, 4), repeat_kv_heads(v, 4)
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, kk, vv, attn_mask=alive), atol=1e-6, rtol=1e-5)
    # an approximation: it differs from dense attention, by little at 8 bits and 50%
    dense = F.scaled_dot_product_attention(q, kk, vv)
    assert not torch.allclose(y, dense, atol=1e-3)
    assert F.cosine_similarity(y.flatten(), dense.flatten(), dim=0) > 0.9
    # dense heads are exact
    yd = _ref("sparse_attention", q, k, v, round_bits=(2,), keep_ratios=(0.1,), enable_gqa=True, dense_heads=(1, 3))
    torch.testing.assert_close(yd[:, [1, 3]], dense[:, [1, 3]], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(yd[:, [0, 2]], dense[:, [0, 2]], atol=1e-3)


def test_threshold_select_is_energons_mean_max_rule():
    q, k, v = _qkv(h=1, lq=1, lk=40, d=16, seed=3)
    alpha = 0.4
    alive, _ = _keep(q, k, None, False, round_bits=(8,), select="threshold", alphas=(alpha,))
    qi, sq = lowbit_vectors(q, 8)
    ki, sk = lowbit_vectors(k, 8)
    s = ((qi @ ki.transpose(-1, -2)) * (sq * 0.25).unsqueeze(-1)) * sk.unsqueeze(-2)
    theta = alpha * s.max() + (1 - alpha) * s.mean()
    err = score_error_bound(q, qi, sq, k, ki, sk, 0.25)
    expect = (s >= theta) | (s + err >= (s - err).max())
    assert torch.equal(alive, expect)
    assert 0 < int(alive.sum()) < 40


def test_lowbit_vectors_and_error_bound():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, 16, generator=g)
    for bits in (2, 4, 8):
        xi, s = lowbit_vectors(x, bits)
        h = 2 ** (bits - 1) - 1
        assert float(xi.abs().max()) <= h and torch.equal(xi, xi.round())
        assert bool(((x - xi * s.unsqueeze(-1)).abs() <= s.unsqueeze(-1) / 2 + 1e-6).all())
    assert set(lowbit_vectors(x, 2)[0].unique().tolist()) <= {-1.0, 0.0, 1.0}
    zi, zs = lowbit_vectors(torch.zeros(3, 4), 4)
    assert torch.equal(zi, torch.zeros(3, 4)) and torch.equal(zs, torch.ones(3))
    q, k = x[:, :3], x[:, 3:]
    qi, sq = lowbit_vectors(q, 3)
    ki, sk = lowbit_vectors(k, 3)
    approx = ((qi @ ki.transpose(-1, -2)) * (sq * 0.5).unsqueeze(-1)) * sk.unsqueeze(-2)
    exact = (q @ k.transpose(-1, -2)) * 0.5
    assert bool(((approx - exact).abs() <= score_error_bound(q, qi, sq, k, ki, sk, 0.5)).all())


def test_sparse_attention_infer_errors():
    t = TensorType((1, 2, "s0", 8), "f32")
    assert _infer("sparse_attention", [t, t, t], round_bits=(4,), keep_ratios=(0.5,)) == [t]
    bad = [({"round_bits": (4,), "keep_ratios": ()}, "one keep_ratios entry per round"),
           ({"round_bits": (4,), "keep_ratios": (1.5,)}, r"\(0, 1\]"),
           ({"round_bits": (4, 8), "keep_ratios": (0.25, 0.5)}, "must not grow"),
           ({"round_bits": (16,), "keep_ratios": (0.5,)}, "one of"),
           ({"round_bits": (4,), "select": "threshold", "alphas": (2.0,)}, r"\[-1, 1\]"),
           ({"round_bits": (4,), "select": "threshold", "alphas": (0.1,), "keep_ratios": (0.5,)}, "leave it empty"),
           ({"dense_heads": (2,)}, "head 2 out of range"),
           ({"min_keep": 0}, "min_keep")]
    for attrs, msg in bad:
        with pytest.raises(OpError, match=msg):
            _infer("sparse_attention", [t, t, t], **attrs)
    with pytest.raises(OpError, match="needs enable_gqa"):
        _infer("sparse_attention", [TensorType((1, 4, "s0", 8), "f32"), t, t])


# =========================================================================== calibrated_attention
@settings(max_examples=60, deadline=None)
@given(attention_inputs(), st.data())
def test_heads_not_selected_are_unchanged(inp, data):
    q, k, v, mask, causal = inp
    h = q.shape[1]
    heads = tuple(sorted(data.draw(st.sets(st.integers(0, h - 1), max_size=h))))
    beta = data.draw(st.sampled_from([0.0, 0.4, 0.9]))
    gqa = q.shape[1] != k.shape[1]
    plain = _ref("calibrated_attention", *_args(q, k, v, mask), is_causal=causal, enable_gqa=gqa)
    torch.testing.assert_close(plain, _sdpa(q, k, v, mask, causal), atol=2e-6, rtol=1e-5)
    y = _ref("calibrated_attention", *_args(q, k, v, mask), is_causal=causal, enable_gqa=gqa, heads=heads, beta=beta,
             threshold=1.5)
    others = [x for x in range(h) if x not in heads]
    assert torch.equal(y[:, others], plain[:, others])


@settings(max_examples=60, deadline=None)
@given(attention_inputs(), st.sampled_from([1.5, 3.0]), st.sampled_from([0.0, 0.4]))
def test_calibrating_an_input_without_sinks_is_the_identity(inp, threshold, beta):
    q, k, v, mask, causal = inp
    q = torch.zeros_like(q)  # every allowed key gets the same attention (with a bool mask): no sink anywhere
    if mask is not None and mask.dtype != torch.bool:
        mask = torch.where(torch.isfinite(mask), torch.zeros_like(mask), mask)
    gqa = q.shape[1] != k.shape[1]
    plain = _ref("calibrated_attention", *_args(q, k, v, mask), is_causal=causal, enable_gqa=gqa)
    y = _ref("calibrated_attention", *_args(q, k, v, mask), is_causal=causal, enable_gqa=gqa,
             heads=tuple(range(q.shape[1])), beta=beta, threshold=threshold, keep_first=False)
    assert torch.equal(y, plain)


def test_calibration_rows_by_example():
    # one row, 5 keys; uniform share 0.2; threshold 2 -> sinks are keys above 0.4
    a = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]])
    allowed = torch.ones_like(a, dtype=torch.bool)
    out = calibrate_rows(a, allowed, beta=0.4, threshold=2.0, keep_first=True)
    s = 0.5
    gain = (1 - 0.4 * s) / (1 - s)
    expect = torch.tensor([[0.05 * gain, 0.5 * 0.4, 0.1 * gain, 0.3 * gain, 0.05 * gain]])
    torch.testing.assert_close(out, expect)
    assert abs(float(out.sum()) - 1.0) < 1e-6
    # keep_first: the first allowed key is never a sink, even when it dominates
    b = torch.tensor([[0.0, 0.9, 0.05, 0.05]])
    allow_b = torch.tensor([[False, True, True, True]])
    assert torch.equal(calibrate_rows(b, allow_b, 0.4, 1.5, True), b)
    moved = calibrate_rows(b, allow_b, 0.4, 1.5, False)
    assert abs(float(moved[0, 1]) - 0.36) < 1e-6 and float(moved[0, 0]) == 0.0
    # nothing else to give the mass to: unchanged
    c = torch.tensor([[0.0, 1.0]])
    assert torch.equal(calibrate_rows(c, torch.tensor([[False, True]]), 0.4, 1.0, False), c)


def test_calibrated_attention_lowers_sinks_on_the_fly():
    q, k, _ = _qkv(h=3, lq=7, lk=7, seed=8)
    k[:, :, 3] = q[:, :, :, :].mean(2) * 4  # key 3 attracts most rows' attention: a sink beyond the first token
    eye = torch.eye(7).expand(1, 3, 7, 7).contiguous()
    a = _ref("calibrated_attention", q, k, eye, is_causal=True)
    c = _ref("calibrated_attention", q, k, eye, is_causal=True, heads=(0, 2), beta=0.4, threshold=2.0)
    rows = (a[:, 0, :, 3] > 2.0 / torch.arange(1, 8)) & (torch.arange(7) > 0)
    assert bool(rows.any())
    torch.testing.assert_close(c[:, 0, :, 3][rows], 0.4 * a[:, 0, :, 3][rows])
    assert torch.equal(c[:, 1], a[:, 1])


def test_calibrated_attention_infer_errors():
    t = TensorType((1, 2, 5, 8), "f32")
    with pytest.raises(OpError, match="head 2 out of range"):
        _infer("calibrated_attention", [t, t, t], heads=(2,))
    with pytest.raises(OpError, match="must not repeat"):
        _infer("calibrated_attention", [t, t, t], heads=(0, 0))
    with pytest.raises(OpError, match=r"\[0, 1\]"):
        _infer("calibrated_attention", [t, t, t], heads=(0,), beta=1.5)
    with pytest.raises(OpError, match="threshold must be > 0"):
        _infer("calibrated_attention", [t, t, t], heads=(0,), threshold=0.0)


@pytest.mark.parametrize("op", ["sparse_attention", "calibrated_attention"])
@pytest.mark.parametrize("attrs", [{}, {"is_causal": True}, {"scale": 0.3}, {"enable_gqa": True}])
def test_attention_ops_accept_sdpa_attributes_and_match_it_unfiltered(op, attrs):
    """A pass swaps scaled_dot_product_attention for these ops keeping its operands and attributes."""
    sdpa = get_op("scaled_dot_product_attention")
    q, k, v = _qkv(h=4, hk=2 if attrs.get("enable_gqa") else 4, seed=11)
    full = sdpa.check_attrs(attrs)
    torch.testing.assert_close(_ref(op, q, k, v, **full), sdpa.ref(q, k, v, **full), atol=2e-6, rtol=1e-5)
    types = [TensorType.of(t) for t in (q, k, v)]
    assert _infer(op, types, **full) == sdpa.infer_types(types, full)
    if not attrs.get("is_causal"):
        mask = torch.randn(1, 1, 6, 6)
        torch.testing.assert_close(_ref(op, q, k, v, mask, **full), sdpa.ref(q, k, v, mask, **full), atol=2e-6,
                                   rtol=1e-5)


def _local_head_probs(n: int = 12, peak: float = 0.9) -> torch.Tensor:
    """A previous-token head: every query puts ``peak`` on the key just before it, the rest spread evenly."""
    a = torch.zeros(n, n)
    for i in range(n):
        j = max(i - 1, 0)
        a[i] = (1 - peak) / (n - 1)
        a[i, j] = peak
    return a.unsqueeze(0)


def test_column_detection_is_acts_statistic_not_each_querys_peak():
    """ACT finds sinks from the attention a key receives averaged over the queries that see it
    (``sum_i A[i, j] / count``): a previous-token head's peaks are not sinks there, although each one
    exceeds its row's uniform share ten times over; a key every query attends is one."""
    n = 12
    allowed = torch.ones(1, n, n, dtype=torch.bool)
    local = _local_head_probs(n)
    assert not torch.equal(calibrate_rows(local, allowed, 0.4, 5.0, True), local)  # row rule: each peak is a "sink"
    assert torch.equal(calibrate_rows(local, allowed, 0.4, 5.0, True, detect="column"), local)
    # key 4 draws 0.7 of every query's attention: ACT's sink (column mean 0.7 > 5 / n)
    sink = torch.full((1, n, n), 0.3 / (n - 1))
    sink[..., 4] = 0.7
    out = calibrate_rows(sink, allowed, 0.4, 5.0, True, detect="column")
    torch.testing.assert_close(out[..., 4], torch.full((1, n), 0.28))
    torch.testing.assert_close(out.sum(-1), torch.ones(1, n))
    rest = torch.ones(n, dtype=torch.bool)
    rest[4] = False
    torch.testing.assert_close(out[..., rest], sink[..., rest] * (1 - 0.28) / 0.3)


def test_column_detection_counts_only_the_queries_that_see_a_key():
    """A masked (query, key) pair neither votes for the key nor is changed; per query the threshold is
    relative to the uniform share of that query's own allowed keys, averaged over the key's observers."""
    n = 6
    allowed = torch.ones(1, n, n, dtype=torch.bool).tril()
    a = torch.where(allowed, 0.0, 0.0)
    for i in range(n):
        a[0, i, : i + 1] = 1.0 / (i + 1)
    a[0, 3:, 2] += 0.5  # key 2: half of every later query's attention
    a[0, 3:] /= a[0, 3:].sum(-1, keepdim=True)
    stat = (a[0] * allowed[0].sum(-1, keepdim=True)).sum(0) / allowed[0].sum(0)  # mean relative attention per key
    thr = float(stat[2]) - 1e-3
    assert float(stat[1]) < thr and float(stat[3]) < thr
    out = calibrate_rows(a, allowed, 0.5, thr, True, detect="column")
    torch.testing.assert_close(out[0, :, 2][allowed[0, :, 2]], 0.5 * a[0, :, 2][allowed[0, :, 2]])
    assert torch.equal(out[~allowed], a[~allowed])
    torch.testing.assert_close(out.sum(-1), a.sum(-1))


def test_calibrated_attention_column_mode_matches_acts_code():
    """The op in ``detect="column"`` against ACT's own per-head formula (GATECH-EIC/ACT
    ``atten_process_eval``: a key's column sum over the queries that see it, here all ``n``, against an
    absolute threshold ``t``, written ``threshold = t * n``; sinks scaled by beta, the removed mass given to
    the other keys in proportion)."""
    q, k, v = _qkv(h=2, lq=10, lk=10, seed=3)
    k[:, :, 6] = q.mean(2) * 3  # key 6 draws attention from most queries
    plain = _ref("calibrated_attention", q, k, v)
    a = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), -1)
    t = 0.12
    y = _ref("calibrated_attention", q, k, v, heads=(1,), beta=0.4, threshold=t * 10, keep_first=False,
             detect="column")
    head = a[0, 1]
    idx = torch.nonzero(head.sum(0) / head.shape[0] > t).flatten()
    assert len(idx) >= 1
    avail = head[:, idx].sum(1, keepdim=True) * 0.6
    rest = head.clone()
    rest[:, idx] = 0
    want = head.clone()
    want[:, idx] *= 0.4
    want = want + avail * rest / rest.sum(1, keepdim=True)
    torch.testing.assert_close(y[0, 1], want @ v[0, 1], atol=1e-5, rtol=1e-5)
    assert torch.equal(y[:, 0], plain[:, 0])


def test_calibrated_attention_detect_is_checked():
    t = TensorType((1, 2, 5, 8), "f32")
    with pytest.raises(Exception, match="detect"):
        _infer("calibrated_attention", [t, t, t], heads=(0,), detect="rows")
