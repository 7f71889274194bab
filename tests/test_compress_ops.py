"""Compression ops and integer-quantization helpers: reference semantics, inference checks, properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ctc.ir import Module, OpError, TensorType, get_op, interpret
from ctc.ir import quant as Q
from ctc.ir.text import parse, print_module, structural_diff
from ctc.ir.verify import verify

SETTINGS = settings(max_examples=40, deadline=None)


def _ref(op: str, *args, **attrs):
    """Call an op's reference implementation with schema defaults filled in."""
    full = get_op(op).check_attrs(attrs)
    return get_op(op).ref(*args, **full)


def _infer(op: str, types: list[TensorType], **attrs) -> list[TensorType]:
    d = get_op(op)
    return d.infer_types(types, d.check_attrs(attrs))


# =========================================================================== int4 packing
def test_nibble_order_is_low_first_offset_binary():
    packed = Q.pack_int4(torch.tensor([[1, -2, 7]], dtype=torch.int8))
    # byte0 = (1+8) | (-2+8) << 4 = 9 | 96; byte1 = (7+8) | pad (0+8) << 4
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[9 | (6 << 4), 15 | (8 << 4)]]


@SETTINGS
@given(rows=st.integers(1, 4), k=st.integers(1, 33), seed=st.integers(0, 2**16))
def test_pack_unpack_int4_round_trips(rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (rows, k), generator=g, dtype=torch.int8)
    p = Q.pack_int4(q)
    assert p.shape == (rows, (k + 1) // 2) and p.dtype == torch.uint8
    assert torch.equal(Q.unpack_int4(p, k), q)


def test_pack_int4_rejects_out_of_range_and_floats():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        Q.pack_int4(torch.tensor([8]))
    with pytest.raises(TypeError):
        Q.pack_int4(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="cannot hold"):
        Q.unpack_int4(torch.zeros(1, 2, dtype=torch.uint8), 5)


# =========================================================================== weight / act quantization
@SETTINGS
@given(n=st.integers(1, 5), k=st.integers(1, 20), bits=st.integers(2, 8), gs=st.sampled_from([-1, 1, 3, 8]),
       sym=st.booleans(), seed=st.integers(0, 2**16))
def test_weight_quant_error_at_most_half_a_step(n, k, bits, gs, sym, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 3
    qw = Q.quantize_weight(w, bits, gs, sym)
    assert qw.qweight.dtype == (torch.uint8 if bits <= 4 else torch.int8)
    assert qw.qweight.shape == (n, Q.packed_k(k, bits))
    lo, hi = Q.qrange(bits, True)
    q = Q.unpack_weight(qw.qweight, bits, k)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    if sym:
        assert int(qw.zero.abs().max()) == 0
    wd = Q.dequantize_weight(qw.qweight, qw.scale, qw.zero, bits, gs, k)
    step = Q._expand_groups(qw.scale, gs, k)
    assert bool(((wd - w).abs() <= step / 2 + 1e-5 * step).all())


@SETTINGS
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), bits=st.integers(2, 8), signed=st.booleans(),
       gran=st.sampled_from(["tensor", "channel", "group"]), seed=st.integers(0, 2**16))
def test_quantize_dequantize_error_at_most_half_a_step(shape, bits, signed, gran, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    axis = None if gran == "tensor" else len(shape) - 1
    gs = 2 if gran == "group" else -1
    lo_q, hi_q = Q.qrange(bits, signed)
    # min-max parameters at the requested granularity
    if axis is None:
        red = x.reshape(1, -1)
        pshape: tuple[int, ...] = ()
    elif gs == -1:
        red = x.reshape(-1, shape[-1]).T
        pshape = (shape[-1],)
    else:
        c = shape[-1]
        ng = -(-c // gs)
        pad = torch.cat([x, x[..., -1:].expand(*shape[:-1], ng * gs - c)], dim=-1) if ng * gs > c else x
        red = pad.reshape(*shape[:-1], ng, gs).reshape(-1, gs)
        pshape = (*shape[:-1], ng)
    mn = red.amin(-1).clamp(max=0)
    mx = red.amax(-1).clamp(min=0)
    scale = ((mx - mn) / (hi_q - lo_q)).clamp(min=1e-8).reshape(pshape)
    zero = (lo_q - torch.round(mn / scale.reshape(-1))).clamp(lo_q, hi_q).to(torch.int32).reshape(pshape)
    attrs = dict(bits=bits, signed=signed, axis=axis, group_size=gs)
    q = _ref("quantize", x, scale, zero, dtype="i32", **attrs)
    assert int(q.min()) >= lo_q and int(q.max()) <= hi_q
    xd = _ref("dequantize", q, scale, zero, axis=axis, group_size=gs)
    from ctc.ir.ops.compress import expand_qparam

    s_full = expand_qparam(scale, tuple(x.shape), axis, gs)
    assert bool(((xd - x).abs() <= s_full / 2 * (1 + 1e-4) + 1e-7).all())


def test_quantize_infer_checks_granularity_and_dtype():
    x = TensorType((4, 6), "f32")
    assert _infer("quantize", [x, TensorType((), "f32"), TensorType((), "i32")], bits=8) == [x.with_dtype("i8")]
    assert _infer("quantize", [x, TensorType((6,), "f32"), TensorType((6,), "i32")], bits=8, axis=1)[0].dtype == "i8"
    assert _infer("quantize", [x, TensorType((4, 2), "f32"), TensorType((4, 2), "i32")], bits=4, axis=1,
                  group_size=4)[0].shape == (4, 6)
    with pytest.raises(OpError, match="per channel"):
        _infer("quantize", [x, TensorType((4,), "f32"), TensorType((4,), "i32")], bits=8, axis=1)
    with pytest.raises(OpError, match="do not fit"):
        _infer("quantize", [x, TensorType((), "f32"), TensorType((), "i32")], bits=8, signed=False, dtype="i8")
    with pytest.raises(OpError, match="integer"):
        _infer("dequantize", [x, TensorType((), "f32"), TensorType((), "i32")])


# =========================================================================== quant_linear
def _ql_operands(x, w, bits, gs, sym, a_bits, clusters, bias):
    qw = Q.quantize_weight(w, bits, gs, sym)
    ops = [x, qw.qweight, qw.scale, qw.zero]
    if bias is not None:
        ops.append(bias)
    sa = za = None
    if a_bits:
        idx = Q.cluster_index(clusters, x.shape[-1])
        c = int(idx.max()) + 1
        flat = x.reshape(-1, x.shape[-1])
        lo = torch.stack([flat[:, idx == i].min() for i in range(c)])
        hi = torch.stack([flat[:, idx == i].max() for i in range(c)])
        sa, za = Q.act_qparams(lo, hi, a_bits)
        ops += [sa, za]
    return qw, ops, sa, za


@SETTINGS
@given(k=st.integers(2, 24), n=st.integers(1, 6), bits=st.sampled_from([2, 3, 4, 6, 8]),
       gs=st.sampled_from([-1, 2, 5]), sym=st.booleans(), a_bits=st.sampled_from([None, 4, 8]),
       n_clusters=st.integers(1, 3), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_quant_linear_reference_equals_integer_accumulation(k, n, bits, gs, sym, a_bits, n_clusters, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    cuts = sorted({max(1, k * i // n_clusters) for i in range(1, n_clusters)} - {k})
    clusters = tuple(cuts + [k]) if a_bits else ()
    qw, ops, sa, za = _ql_operands(x, w, bits, gs, sym, a_bits, clusters, b)
    y = _ref("quant_linear", *ops, w_bits=bits, group_size=gs, w_symmetric=sym, a_bits=a_bits,
             act_clusters=clusters, has_bias=bias)
    assert y.shape == (2, 3, n)
    if a_bits:
        yi = Q.quant_linear_int(x, qw, sa, za, a_bits, clusters, b)
    else:  # float activations: the integer weights times fp32 x
        yi = x @ Q.dequantize_weight(qw.qweight, qw.scale, qw.zero, bits, gs, k).T + (b if b is not None else 0)
    assert torch.allclose(y, yi, atol=1e-4, rtol=1e-5)


def test_quant_linear_w8_float_acts_is_close_to_linear():
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 64), torch.randn(32, 64), torch.randn(32)
    qw, ops, _, _ = _ql_operands(x, w, 8, -1, True, None, (), b)
    y = _ref("quant_linear", *ops, w_bits=8, has_bias=True)
    ref = F.linear(x, w, b)
    assert (y - ref).abs().max() < 0.05 * ref.abs().max()
    # and 4-bit is worse than 8-bit: the op really quantizes
    qw4, ops4, _, _ = _ql_operands(x, w, 4, -1, True, None, (), b)
    y4 = _ref("quant_linear", *ops4, w_bits=4, has_bias=True)
    assert (y4 - ref).abs().mean() > 2 * (y - ref).abs().mean()


def test_quant_linear_one_cluster_equals_per_tensor_quantize():
    torch.manual_seed(1)
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    qw, ops, sa, za = _ql_operands(x, w, 8, -1, True, 8, (), None)
    y = _ref("quant_linear", *ops, w_bits=8, a_bits=8)
    y_explicit = _ref("quant_linear", *ops, w_bits=8, a_bits=8, act_clusters=(16,))
    assert torch.equal(y, y_explicit)
    xq = _ref("quantize", x, sa, za, bits=8, signed=False, dtype="i32")
    xd = _ref("dequantize", xq, sa, za)
    w_d = Q.dequantize_weight(qw.qweight, qw.scale, qw.zero, 8, -1, 16)
    assert torch.allclose(y, xd @ w_d.T, atol=1e-5)


def test_quant_linear_clusters_beat_one_cluster_on_outlier_channels():
    torch.manual_seed(2)
    x = torch.randn(64, 16)
    x[:, 12:] *= 50  # four outlier channels, contiguous as after an RPTQ reorder
    w = torch.randn(8, 16)
    w[:, 12:] = 0  # measure the error the outliers cause on the ordinary channels
    ref = x @ Q.dequantize_weight(*(lambda q: (q.qweight, q.scale, q.zero))(Q.quantize_weight(w, 8)), 8, -1, 16).T
    err = {}
    for clusters in [(), (12, 16)]:
        _, ops, _, _ = _ql_operands(x, w, 8, -1, True, 4, clusters, None)
        y = _ref("quant_linear", *ops, w_bits=8, a_bits=4, act_clusters=clusters)
        err[clusters] = (y - ref).pow(2).mean().item()
    assert err[(12, 16)] < 0.25 * err[()]


def test_quant_linear_infer_and_errors():
    x = TensorType((1, "s0", 10), "f32")
    i8 = TensorType((6, 10), "i8")
    s, z = TensorType((6, 1), "f32"), TensorType((6, 1), "i8")
    assert _infer("quant_linear", [x, i8, s, z], w_bits=8) == [TensorType((1, "s0", 6), "f32")]
    u8 = TensorType((6, 5), "u8")
    assert _infer("quant_linear", [x, u8, s, z], w_bits=4)[0].shape == (1, "s0", 6)
    sg, zg = TensorType((6, 3), "f32"), TensorType((6, 3), "i8")
    assert _infer("quant_linear", [x, u8, sg, zg], w_bits=4, group_size=4)[0].shape == (1, "s0", 6)
    with pytest.raises(OpError, match="packed two per byte"):
        _infer("quant_linear", [x, i8, s, z], w_bits=4)
    with pytest.raises(OpError, match="packed qweight columns"):
        _infer("quant_linear", [x, TensorType((6, 4), "u8"), s, z], w_bits=4)
    with pytest.raises(OpError, match="w_scale"):
        _infer("quant_linear", [x, i8, sg, z], w_bits=8)
    with pytest.raises(OpError, match="takes 6 operands"):
        _infer("quant_linear", [x, i8, s, z], w_bits=8, a_bits=8)
    acts = [TensorType((2,), "f32"), TensorType((2,), "i32")]
    assert _infer("quant_linear", [x, i8, s, z, *acts], w_bits=8, a_bits=8, act_clusters=(3, 10))
    with pytest.raises(OpError, match="end boundaries"):
        _infer("quant_linear", [x, i8, s, z, *acts], w_bits=8, a_bits=8, act_clusters=(3, 9))
    with pytest.raises(OpError, match="one per cluster"):
        _infer("quant_linear", [x, i8, s, z, *acts], w_bits=8, a_bits=8, act_clusters=(2, 3, 10))
    with pytest.raises(OpError, match="not quantized"):
        _infer("quant_linear", [x, i8, s, z], w_bits=8, act_clusters=(10,))
    with pytest.raises(OpError, match="must be one of"):
        get_op("quant_linear").check_attrs({"w_bits": 9})
    with pytest.raises(OpError, match="static"):
        _infer("quant_linear", [TensorType(("s1",), "f32"), i8, s, z], w_bits=8)


# =========================================================================== lowrank / permute
def test_lowrank_linear_equals_product_weight():
    torch.manual_seed(3)
    x, u, v, b = torch.randn(2, 5, 12), torch.randn(7, 3), torch.randn(3, 12), torch.randn(7)
    y = _ref("lowrank_linear", x, u, v, b, rank=3)
    assert torch.allclose(y, F.linear(x, u @ v, b), atol=1e-5)
    assert _infer("lowrank_linear", [TensorType((2, "s0", 12), "f32"), TensorType((7, 3), "f32"),
                                     TensorType((3, 12), "f32")], rank=3) == [TensorType((2, "s0", 7), "f32")]
    with pytest.raises(OpError, match="rank"):
        _infer("lowrank_linear", [TensorType((2, 12), "f32"), TensorType((7, 3), "f32"),
                                  TensorType((3, 12), "f32")], rank=4)


def test_channel_permute_gathers_and_inverts():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 6)
    perm = torch.randperm(6)
    y = _ref("channel_permute", x, perm)
    assert torch.equal(y, x[..., perm])
    inv = torch.argsort(perm)
    assert torch.equal(_ref("channel_permute", y, inv), x)
    assert torch.equal(_ref("channel_permute", x, torch.randperm(3), axis=1).sort(1).values, x.sort(1).values)
    with pytest.raises(OpError, match="one index per channel"):
        _infer("channel_permute", [TensorType((2, 6), "f32"), TensorType((5,), "i64")])


def test_compress_ops_are_categorised_and_documented():
    names = ["quant_linear", "quantize", "dequantize", "lowrank_linear", "channel_permute", "sparse_attention",
             "calibrated_attention", "quant_cache_write", "quant_kv_attention"]
    for n in names:
        d = get_op(n)
        assert d.category == "compress", n
        assert len(d.doc) > 60, n
        assert all(a.doc for a in d.attrs.values()), n


# =========================================================================== in a module
def test_quantized_module_interprets_round_trips_and_verifies():
    torch.manual_seed(9)
    w, b = torch.randn(6, 10), torch.randn(6)
    qw = Q.quantize_weight(w, 4, 4, False)
    sa, za = Q.act_qparams(torch.tensor([-4.0, -4.0]), torch.tensor([4.0, 4.0]), 8)
    m = Module("qmodel")
    x = m.add_input("x", TensorType((1, "s0", 10), "f32"))
    for name, t in [("qw", qw.qweight), ("s", qw.scale), ("z", qw.zero), ("b", b), ("sa", sa), ("za", za),
                    ("perm", torch.randperm(10))]:
        m.add_param(name, t)
    xp = m.create_node("channel_permute", [x, m.param("perm")], scope="fc").output
    y = m.create_node("quant_linear", [xp, *(m.param(n) for n in ("qw", "s", "z", "b", "sa", "za"))],
                      dict(w_bits=4, group_size=4, w_symmetric=False, a_bits=8, act_clusters=(3, 10),
                           has_bias=True), scope="fc", block=0).output
    m.set_outputs([y], ["y"])
    assert verify(m) == []
    xi = torch.randn(1, 5, 10)
    out = interpret(m, [xi])[0]
    expect = Q.quant_linear_int(xi[..., m.params["perm"]], qw, sa, za, 8, (3, 10), b)
    assert torch.allclose(out, expect, atol=1e-4)
    m2 = parse(print_module(m), params=m.params)
    assert structural_diff(m, m2) == []
    assert torch.equal(interpret(m2, [xi])[0], out)
