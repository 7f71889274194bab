"""The W4A8/W8A8 block kernels (activations quantized per row and block of 32 at run time, llama.cpp's Q8_1
idea; int4 codes with float or integer zero points, or int8 codes) equal the ``quant_linear`` reference."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from ctc.backends.tvm import block_gemv as BG  # noqa: E402
from ctc.backends.tvm import int_kernels as IK  # noqa: E402
from ctc.ir import quant as Q  # noqa: E402
from ctc.ir.ops.compress import quant_linear  # noqa: E402

needs_vnni = pytest.mark.skipif(not IK.target_has_vnni(), reason="host CPU lacks avx512_vnni")


def _weights(bits: int, float_zero: bool, n: int, k: int, gs: int) -> Q.QuantizedWeight:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(bits + n)) * 0.05 + 0.01
    if bits == 8:
        return Q.quantize_weight(w, 8, gs, True)
    return Q.quantize_weight(w, 4, gs, False, float_zero=float_zero)


def _gguf_like(qw: Q.QuantizedWeight) -> Q.QuantizedWeight:
    """``qw`` with GGUF's block parameters: f16 scales, and Q4_1's zero ``-8 - m / d`` from an f16 minimum ``m``."""
    d = qw.scale.half().float()
    zero = qw.zero
    if zero.dtype.is_floating_point:
        m = (-(zero.double() + 8) * qw.scale.double()).half().double()
        zero = (-8.0 - m / d.double()).float()
    return Q.QuantizedWeight(qw.qweight, d, zero, qw.bits, qw.group_size, qw.symmetric, qw.k)


@needs_vnni
@pytest.mark.parametrize("bits,float_zero,gs,k,n,m,gguf", [
    (4, True, 32, 128, 64, 1, False), (4, False, 64, 96, 48, 3, False), (8, False, -1, 64, 32, 2, False),
    (4, True, 32, 160, 512, 1, False), (4, True, 32, 128, 64, 2, True), (8, False, 32, 64, 32, 1, True)])
def test_block_kernels_match_reference(bits: int, float_zero: bool, gs: int, k: int, n: int, m: int,
                                       gguf: bool) -> None:
    """Both per-block parameter tables: f32, and half precision where GGUF-like parameters allow it."""
    qw = _weights(bits, float_zero, n, k, gs)
    if gguf:
        qw = _gguf_like(qw)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g) * (0.2 + (torch.arange(k) % 7).float())
    x[0, 5] = 60.0  # an outlier only its own block's range sees
    b = torch.randn(n, generator=g)
    attrs = dict(w_bits=bits, group_size=gs, w_symmetric=qw.symmetric, a_bits=8,
                 act_clusters=Q.act_block_clusters(k), has_bias=True, act_dynamic=True)
    assert BG.block_layout(attrs, k, n) is None
    ref = quant_linear(x, qw.qweight, qw.scale, qw.zero, b, **attrs).numpy()
    codes = Q.unpack_weight(qw.qweight, bits, k).numpy()
    form = BG.compact_form(codes, qw.scale.numpy(), qw.zero.numpy(), gs, bits)
    assert form == ("" if not gguf else "z" if float_zero else "s")
    spec = BG.spec_for(k, n, bits, True, form)
    p = BG.pack(spec, codes, qw.scale.numpy(), qw.zero.numpy(), gs)
    tables = [p[nm] for nm in (("pd", "pu") + (("pz",) if form == "z" else ()) if form else ("pa",))]
    tgt = IK.host_target()
    fa = tvm.compile(tvm.IRModule({"main": BG.act_func(k).with_attr("global_symbol", "main")}), target=tgt)
    fg = tvm.compile(tvm.IRModule({"main": BG.gemv_func(spec).with_attr("global_symbol", "main")}), target=tgt)
    asm = fg.mod.inspect_source("asm")
    assert asm.count("vpdpbusd") >= (2 if bits == 4 else 1) * 4 * spec.nb  # the unrolled steps of one block
    t = lambda a: tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())  # noqa: E731
    xq, sx = t(np.zeros((m, k), np.uint8)), t(np.zeros((m, k // 32, 3), np.float32))
    y = t(np.zeros((m, n), np.float32))
    fa["main"](t(x.numpy()), xq, sx)
    fg["main"](xq, sx, t(p["wpack"]), *[t(a) for a in tables], t(b.numpy()), y)
    # the activation codes are the reference's, bit for bit
    s, z = Q.dynamic_act_qparams(x, 8, Q.act_block_clusters(k))
    idx = Q.cluster_index(Q.act_block_clusters(k), k)
    codes = torch.clamp(torch.round(x / s[:, idx]) + z[:, idx].float(), 0, 255).to(torch.uint8).numpy()
    np.testing.assert_array_equal(xq.numpy(), codes)
    np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_layout_conditions_are_named() -> None:
    base = dict(w_bits=4, group_size=32, a_bits=8, act_clusters=Q.act_block_clusters(64), act_dynamic=True)
    assert BG.block_layout(base, 64, 32) is None
    assert "dynamic" in BG.block_layout({**base, "act_dynamic": False}, 64, 32)
    assert "blocks of 32" in BG.block_layout({**base, "act_clusters": (64,)}, 64, 32)
    assert "N=40" in BG.block_layout(base, 64, 40)
    assert "group_size=16" in BG.block_layout({**base, "group_size": 16}, 64, 32)
    assert "w_bits=6" in BG.block_layout({**base, "w_bits": 6}, 64, 32)
    assert BG.spec_for(576, 1536, 4, False).nb == 4 and BG.spec_for(576, 192, 4, False).nb == 1


@needs_vnni
@pytest.mark.parametrize("gguf", [False, True])
def test_linears_of_one_input_share_the_quantizer_and_one_kernel(gguf: bool) -> None:
    """Three block linears of one input without bias (q, k, v) run as one ``blk_gemv`` with three outputs
    after one ``blk_act``; a fourth with a bias keeps its own kernel but reuses the codes; the step equals
    the reference interpreter."""
    from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled
    from ctc.ir.graph import Module
    from ctc.ir.interpreter import interpret
    from ctc.ir.types import TensorType

    k = 64
    m = Module("qkv")
    x = m.add_input("x", TensorType((1, 1, k), "f32"))
    outs = []
    for i, (n, bits, bias) in enumerate([(64, 4, False), (32, 4, False), (32, 4, False), (48, 4, True),
                                         (16, 8, False)]):
        qw = _gguf_like(_weights(bits, True, n, k, 32)) if gguf else _weights(bits, True, n, k, 32)
        names = [m.add_param(f"{nm}{i}", t) for nm, t in (("qw", qw.qweight), ("s", qw.scale), ("z", qw.zero))]
        ins = [x] + [m.param(nm) for nm in names]
        if bias:
            ins.append(m.param(m.add_param(f"b{i}", torch.randn(n))))
        attrs = dict(w_bits=bits, group_size=32, w_symmetric=qw.symmetric, a_bits=8,
                     act_clusters=Q.act_block_clusters(k), has_bias=bias, act_dynamic=True)
        outs.append(m.create_node("quant_linear", ins, attrs).output)
    m.set_outputs(outs)
    comp = compile_module(m, options=BuildOptions())
    assert comp.meta["int_kernels"] == 5
    d = tempfile.mkdtemp()
    comp.export(d)
    lib = load_compiled(d)
    xin = torch.randn(1, 1, k, generator=torch.Generator().manual_seed(3))
    got = lib(xin)
    for g_, r in zip(got, interpret(m, [xin]), strict=True):
        np.testing.assert_allclose(g_.numpy(), r.numpy(), rtol=0, atol=1e-5 * float(r.abs().max()))
    kernels = lib.profile(xin, runs=1)
    names = [kt.name for kt in kernels]
    assert sum("blk_act" in nm for nm in names) == 1, names
    gemv = [nm for nm in names if "blk_gemv" in nm]
    assert len(gemv) == 3 and any("_o64x32x32" in nm for nm in gemv), names  # q|k|v; the biased one; the int8 one
    assert all(("_cz" in nm or "_cs" in nm) == gguf for nm in gemv), gemv  # half-precision tables where exact
