"""The TVM integer quant_linear kernels equal the op's reference semantics (ctc/ir/ops/compress.py).

Checked: activation codes bit-exact against ``quantize_act``; the int32 accumulation exact
(power-of-two scales make the fp32 result an exactly representable integer); fp32 results
within summation tolerance of the reference, for one and several uneven clusters, int8 and
int4 weights, symmetric and asymmetric, per-channel and per-group, N not a multiple of 16,
both the VNNI schedule and the plain integer fallback, and a Relax function with symbolic M.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from ctc.backends.tvm import int_kernels as ik  # noqa: E402
from ctc.ir import quant as Q  # noqa: E402
from ctc.ir.ops.compress import quant_linear  # noqa: E402


def _host_vnni() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return bool(re.search(r"\bavx512_vnni\b", flags)) and ik.target_has_vnni()


HOST_VNNI = _host_vnni()
needs_vnni = pytest.mark.skipif(not HOST_VNNI, reason="host CPU lacks avx512_vnni: only the plain integer "
                                                      "fallback schedule can run here")
needs_avx2 = pytest.mark.skipif(not ik.target_has_avx2(), reason="host CPU lacks AVX2")
needs_int8_gemm = pytest.mark.skipif(not ik.target_has_int8_gemm(), reason="host CPU has neither AVX512-VNNI nor "
                                                                           "AVX2 (the hand-written 8-bit GEMM)")
SCHEDULES = [pytest.param(True, id="vnni", marks=needs_vnni), pytest.param(False, id="int-fallback"),
             pytest.param("avx2", id="avx2", marks=needs_avx2)]
HOST_AMX = HOST_VNNI and ik.target_has_amx()
needs_amx = pytest.mark.skipif(not HOST_AMX, reason="host CPU (or OS) gives no AMX int8 tiles")


def _case(m: int, k: int, n: int, clusters: tuple[int, ...], w_bits: int, gs: int, sym: bool,
          a_bits: int = 8, bias: bool = True, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    qw = Q.quantize_weight(torch.randn(n, k, generator=g), w_bits, gs, sym)
    # channels with very different ranges, so clusters matter
    x = torch.randn(m, k, generator=g) * (0.2 + (torch.arange(k) % 7).float())
    bounds = list(clusters) or [k]
    lo = torch.stack([x[:, a:b].min() for a, b in zip([0, *bounds[:-1]], bounds, strict=True)])
    hi = torch.stack([x[:, a:b].max() for a, b in zip([0, *bounds[:-1]], bounds, strict=True)])
    s, z = Q.act_qparams(lo, hi, a_bits)
    b = torch.randn(n, generator=g) if bias else None
    attrs = dict(w_bits=w_bits, group_size=gs, w_symmetric=sym, a_bits=a_bits, act_clusters=clusters, has_bias=bias)
    return dict(x=x, qw=qw, s=s, z=z, b=b, attrs=attrs, k=k, n=n)


def _reference(c: dict) -> torch.Tensor:
    rest = ([c["b"]] if c["b"] is not None else []) + [c["s"], c["z"]]
    return quant_linear(c["x"], c["qw"].qweight, c["qw"].scale, c["qw"].zero, *rest, **c["attrs"])


def _isa(kind: bool | str) -> str:
    """The ``isa`` a test parameter asks for: True (VNNI) and "amx" (its several-row kernel) "vnni", False the
    plain integer kernel, "avx2" the AVX2 one."""
    return {True: "vnni", "amx": "vnni", False: "int", "avx2": "avx2"}[kind]


def _run(c: dict, vnni: bool | str, amx: bool = False):
    spec = ik.QLinearSpec.from_attrs(c["attrs"], c["k"], c["n"])
    if amx:
        spec = ik.with_amx(spec)
        assert spec.amx
    kern = ik.plan_quant_linear(spec, isa=_isa(vnni))
    qw = c["qw"]
    packed = ik.prepack_weights(spec, qw.qweight, qw.scale, qw.zero, c["b"], c["s"], c["z"])
    y, xq, xs = ik.run_quant_linear(kern, c["x"], packed, return_intermediates=True)
    return spec, kern, y, xq, xs


CASES = {
    "per-tensor-int8-sym": (16, 64, 32, (), 8, -1, True),
    "3-uneven-clusters-int8-sym-N40": (37, 200, 40, (37, 100, 200), 8, -1, True),
    "clusters-int8-asym-group64": (9, 200, 48, (5, 130, 200), 8, 64, False),
    # 8 x 32 register tiles with a partial last row tile and channels past N in the last column block
    "2-clusters-int8-sym-N60-M13": (13, 100, 60, (33, 100), 8, -1, True),
    "clusters-int4-sym": (5, 200, 64, (37, 100, 200), 4, -1, True),
    "clusters-int4-asym-group32-oddK": (11, 201, 48, (37, 100, 201), 4, 32, False),
    "a4-w8-asym-nobias": (8, 96, 32, (50, 96), 8, -1, False),
}


KERNELS = [*SCHEDULES, pytest.param("amx", id="amx", marks=needs_amx)]


@pytest.mark.parametrize("vnni", KERNELS)
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name: str, vnni: bool | str) -> None:
    m, k, n, clusters, w_bits, gs, sym = CASES[name]
    if vnni == "amx" and w_bits <= 4:
        pytest.skip("int4 storage has no AMX kernel (with_amx keeps VNNI for it)")
    c = _case(m, k, n, clusters, w_bits, gs, sym, a_bits=4 if name.startswith("a4") else 8,
              bias=not name.endswith("nobias"))
    spec, kern, y, xq, xs = _run(c, vnni, amx=vnni == "amx")
    assert kern.isa == ("int" if vnni == "avx2" and w_bits == 4 else _isa(vnni)) and spec.amx == (vnni == "amx")
    # activation codes are bit-exact, pads are zero
    qa = Q.quantize_act(c["x"], c["s"], c["z"], c["attrs"]["a_bits"], clusters).numpy()
    for si, seg in enumerate(spec.segments):
        np.testing.assert_array_equal(xq[:, seg.poff: seg.poff + seg.length], qa[:, seg.k0: seg.k0 + seg.length])
        assert not xq[:, seg.poff + seg.length: seg.poff + seg.plen].any()
        if xs is not None:
            np.testing.assert_array_equal(xs[:, si], qa[:, seg.k0: seg.k0 + seg.length].sum(axis=1))
    ref = _reference(c).numpy()
    ref_int = Q.quant_linear_int(c["x"], c["qw"], c["s"], c["z"], c["attrs"]["a_bits"], clusters, c["b"]).numpy()
    scale = np.abs(ref).max()
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref_int, rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("vnni", KERNELS)
@pytest.mark.parametrize("w_bits,sym", [(8, True), (8, False), (4, False)])
def test_int32_accumulation_is_exact(w_bits: int, sym: bool, vnni: bool | str) -> None:
    """Power-of-two scales and integer inputs: every step is exact, so y must equal the int64 sum."""
    g = torch.Generator().manual_seed(1)
    m, k, n, clusters = 13, 136, 32, (20, 72, 136)
    lo_w, hi_w = Q.qrange(w_bits, True)
    q = torch.randint(lo_w, hi_w + 1, (n, k), generator=g, dtype=torch.int8)
    wz = (torch.zeros(n, 3, dtype=torch.int8) if sym  # 3 groups of 64 along K = 136
          else torch.randint(lo_w // 2, hi_w // 2 + 1, (n, 3), generator=g, dtype=torch.int8))
    ws = torch.tensor([[0.5, 2.0, 1.0]]).repeat(n, 1)
    qweight = Q.pack_int4(q) if w_bits <= 4 else q
    a_s = torch.tensor([1.0, 0.25, 2.0])
    a_z = torch.tensor([128, 3, 250], dtype=torch.int32)
    x = torch.randint(-40, 41, (m, k), generator=g).float()
    x[:, 20:72] *= 0.25  # representable on cluster 1's grid
    x[0, :] = 1e6  # clamps to 255 everywhere
    attrs = dict(w_bits=w_bits, group_size=64, w_symmetric=sym, a_bits=8, act_clusters=clusters)
    if vnni == "amx" and w_bits <= 4:
        pytest.skip("int4 storage has no AMX kernel")
    spec = ik.QLinearSpec.from_attrs(attrs, k, n)
    spec = ik.with_amx(spec) if vnni == "amx" else spec
    kern = ik.plan_quant_linear(spec, isa=_isa(vnni))
    packed = ik.prepack_weights(spec, qweight, ws, wz, None, a_s, a_z)
    y = ik.run_quant_linear(kern, x, packed)
    cid = Q.cluster_index(clusters, k)
    qa = Q.quantize_act(x, a_s, a_z, 8, clusters).to(torch.int64) - a_z.to(torch.int64)[cid]
    gid = torch.arange(k) // 64
    qwz = q.to(torch.int64) - wz.to(torch.int64)[:, gid]
    exact = torch.zeros(m, n, dtype=torch.float64)
    for seg in spec.segments:
        acc = qa[:, seg.k0: seg.k0 + seg.length] @ qwz[:, seg.k0: seg.k0 + seg.length].T
        exact += acc.double() * float(a_s[seg.cluster]) * float(ws[0, seg.group])
    assert len(spec.segments) == 5  # cuts at 20, 64, 72, 128
    assert np.abs(exact.numpy()).max() < 2**23  # so fp32 holds it exactly
    np.testing.assert_array_equal(y, exact.numpy().astype(np.float32))


def test_activation_rounding_is_half_to_even_and_clamps() -> None:
    """Exact ties (x / s = j + 0.5) and huge values quantize exactly like torch.round + clamp."""
    k, n = 48, 16
    spec = ik.QLinearSpec.from_attrs(dict(w_bits=8, a_bits=8, act_clusters=(20, 48)), k, n)
    kern = ik.plan_quant_linear(spec)
    s = torch.tensor([0.25, 0.1])
    z = torch.tensor([7, 128], dtype=torch.int32)
    x = (torch.arange(-40.0, 40.0, 0.5)[:, None] * s[Q.cluster_index((20, 48), k)][None, :]).float()
    x[:4] = torch.tensor([1e10, -1e10, 3e6, -3e6])[:, None]
    packed = ik.prepack_weights(spec, torch.zeros(n, k, dtype=torch.int8), torch.ones(n, 1),
                                torch.zeros(n, 1, dtype=torch.int8), None, s, z)
    _, xq, _ = ik.run_quant_linear(kern, x, packed, return_intermediates=True)
    qa = Q.quantize_act(x, s, z, 8, (20, 48)).numpy()
    assert ((x[:, :20] / 0.25) % 1 == 0.5).sum() > 100  # ties really occur
    got = np.concatenate([xq[:, seg.poff: seg.poff + seg.length] for seg in spec.segments], axis=1)
    np.testing.assert_array_equal(got, qa)


@pytest.mark.parametrize("dynamic", [False, True])
def test_quantizer_quotient_is_the_divisions_bits(dynamic: bool) -> None:
    """The quantizer computes ``x / s`` without a division (reciprocal, then one FMA correction): the codes
    equal the division's for values a few ulps either side of every half-integer multiple of the scale,
    where a plain ``x * (1 / s)`` rounds 2-3% of them the other way, and for values whose quotient
    overflows f32 (+-inf clamp to the ends, as the division's do)."""
    rng = np.random.default_rng(7)
    k = 256
    spec = ik.QLinearSpec.from_attrs(dict(w_bits=8, a_bits=8, act_clusters=(k,), act_dynamic=dynamic), k, 16)
    kern = ik.plan_quant_linear(spec)
    packed0 = ik.prepack_weights(spec, torch.zeros(16, k, dtype=torch.int8), torch.ones(16, 1),
                                 torch.zeros(16, 1, dtype=torch.int8), None, torch.ones(1),
                                 torch.zeros(1, dtype=torch.int32))
    plain_wrong = 0
    for s in (10 ** rng.uniform(-4, 1, 12)).astype(np.float32):
        half = ((np.arange(-128, 128, dtype=np.float32) + np.float32(0.5)) * s).astype(np.float32)
        near = [half]
        up, dn = half.copy(), half.copy()
        for _ in range(3):
            up, dn = np.nextafter(up, np.float32(np.inf)), np.nextafter(dn, np.float32(-np.inf))
            near += [up, dn]
        x = np.stack(near).astype(np.float32)  # [7, 256]: each row spans +-128.5 s
        if not dynamic:
            x = np.concatenate([x, np.full((1, k), 3e38, np.float32) * np.sign(half)])
        packed = {**packed0, "act_scale": np.array([s], np.float32), "act_zero": np.array([128], np.int32)}
        _, xq, _ = ik.run_quant_linear(kern, x, packed, return_intermediates=True)
        if dynamic:  # each row's own range: its scale is (max - min) / 255 in f32, as the reference makes it
            ss, zz = Q.act_qparams(torch.from_numpy(x.min(1, keepdims=True).clip(max=0)),
                                   torch.from_numpy(x.max(1, keepdims=True).clip(min=0)), 8)
            want = torch.clamp(torch.round(torch.from_numpy(x) / ss) + zz, 0, 255).numpy()
        else:
            want = Q.quantize_act(torch.from_numpy(x), torch.tensor([s]), torch.tensor([128], dtype=torch.int32), 8,
                                  (k,)).numpy()
            plain_wrong += int((np.round(x[:7] * (np.float32(1) / s)) != np.round(x[:7] / s)).sum())
        np.testing.assert_array_equal(xq[:, :k], want)
    assert dynamic or plain_wrong > 100  # the data does tell the two apart


def test_segments_cut_at_clusters_and_groups() -> None:
    spec = ik.QLinearSpec.from_attrs(dict(w_bits=4, group_size=64, a_bits=8, act_clusters=(37, 100, 201)), 201, 40)
    assert [(s.k0, s.k0 + s.length) for s in spec.segments] == [(0, 37), (37, 64), (64, 100), (100, 128),
                                                                 (128, 192), (192, 201)]
    assert [s.cluster for s in spec.segments] == [0, 1, 1, 2, 2, 2]
    assert [s.group for s in spec.segments] == [0, 0, 1, 1, 2, 3]
    assert all(s.plen % 8 == 0 and s.poff % 8 == 0 and s.plen - s.length < 8 for s in spec.segments)
    assert spec.np_ == 48
    one = ik.QLinearSpec.from_attrs(dict(w_bits=8, a_bits=8), 384, 384)
    assert len(one.segments) == 1 and one.kp == 384


@needs_vnni
def test_vnni_instruction_is_emitted() -> None:
    spec = ik.QLinearSpec.from_attrs(dict(w_bits=4, a_bits=8, act_clusters=(16, 64)), 64, 32)
    _, fm = ik.build_kernel(ik.plan_quant_linear(spec))
    asm = fm.mod.inspect_source("asm")
    assert asm.count("vpdpbusd") >= 16  # the 8x2 register tile, for each of the two nibble halves
    assert "vdivps" not in asm  # activation quantization lives in qact, not here


@needs_vnni
def test_several_row_kernel_prefetches_the_next_panel_and_one_row_does_not() -> None:
    """The 8-row VNNI kernel prefetches the next task's weights into L2 (``prefetcht1``) while it works; the one-row
    (decode) tile, whose task is a single pass, does not."""
    spec = ik.QLinearSpec.from_attrs(dict(w_bits=8, a_bits=8, act_clusters=(16, 64)), 64, 64)
    _, fm = ik.build_kernel(ik.plan_quant_linear(spec))
    assert "prefetcht1" in fm.mod.inspect_source("asm")
    _, f1 = ik.build_kernel(ik.plan_quant_linear(spec, tile=ik.gemv_tile(spec)))
    assert "prefetch" not in f1.mod.inspect_source("asm")


@needs_avx2
def test_avx2_kernel_multiplies_exactly_on_ymm() -> None:
    """Without VNNI, 8-bit weights run the AVX2 kernel: ``vpmaddwd`` on int16-widened codes (exact: no
    ``vpmaddubsw``, whose pair sums saturate), 4 rows x 16 channels, nothing wider than ymm; a target with
    VNNI keeps VNNI, int4 storage the plain kernel."""
    spec = ik.QLinearSpec.from_attrs(dict(w_bits=8, a_bits=8, act_clusters=(16, 64)), 64, 32)
    avx2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    kern = ik.plan_quant_linear(spec, avx2)
    assert kern.isa == "avx2" and kern.hand_written and kern.tile == ik.TileConfig(4, 1)
    asm = ik.build_kernel(kern, avx2)[1].mod.inspect_source("asm")
    assert asm.count("vpmaddwd") >= 12 and "vpmaddubsw" not in asm and "zmm" not in asm
    assert ik.plan_quant_linear(spec, tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})).isa == "vnni"
    assert ik.plan_quant_linear(ik.QLinearSpec.from_attrs(dict(w_bits=4, a_bits=8), 64, 32), avx2).isa == "int"
    with pytest.raises(ValueError, match="lacks avx2"):
        ik.plan_quant_linear(spec, tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"}), isa="avx2")


@pytest.mark.parametrize("vnni", KERNELS)
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("w_bits", [8, 4])
def test_gathering_quantizer_equals_permuting_first(vnni: bool | str, dynamic: bool, w_bits: int) -> None:
    """``gather=True`` (RPTQ's explicit reorder folded into qact): the kernel on ``x`` with ``perm``
    gives exactly what the plain kernel gives on ``x[:, perm]`` (int4 weights: segments padded to 8)."""
    import dataclasses

    if vnni == "amx" and w_bits == 4:
        pytest.skip("int4 storage has no AMX kernel")
    c = _case(19, 136, 64, (30, 100, 136), w_bits, -1, False, seed=4)
    attrs = {**c["attrs"], "act_dynamic": dynamic}
    perm = torch.randperm(136, generator=torch.Generator().manual_seed(2))
    spec = ik.QLinearSpec.from_attrs(attrs, 136, 64)
    spec = ik.with_amx(spec) if vnni == "amx" else spec
    got_spec = dataclasses.replace(spec, gather=True)
    qw = c["qw"]
    packed = ik.prepack_weights(spec, qw.qweight, qw.scale, qw.zero, c["b"], c["s"], c["z"])
    want = ik.run_quant_linear(ik.plan_quant_linear(spec, isa=_isa(vnni)), c["x"][:, perm], packed)
    got = ik.run_quant_linear(ik.plan_quant_linear(got_spec, isa=_isa(vnni)), c["x"],
                              {**packed, "perm": perm.numpy()})
    assert got_spec.tag != spec.tag
    np.testing.assert_array_equal(got, want)
    kern = ik.plan_quant_linear(got_spec, isa=_isa(vnni))
    if not dynamic and "avx512vbmi" in open("/proc/cpuinfo").read():
        # quantized in channel order, the codes permuted with byte shuffles: no f32 lane gathered one at a time
        assert kern.permute
        asm = ik.build_kernel(kern)[0].mod.inspect_source("asm")
        assert "vpermt2b" in asm or "vpermi2b" in asm
        assert "vinsertps" not in asm and "vgatherdps" not in asm
        with pytest.raises(ValueError, match="permutation of range"):
            ik.permute_tables(got_spec, np.zeros(136, np.int32), c["s"], c["z"])


@pytest.mark.parametrize("kind", [pytest.param("amx", marks=needs_amx), *SCHEDULES])
@pytest.mark.parametrize("n", [64, 40])
def test_gelu_epilogue_is_gelu_of_the_product(kind: str | bool, n: int) -> None:
    """``gelu=True``: the matmul's output (AMX, VNNI or the plain integer kernel) is exact-form gelu of the
    same kernel's without it (fast erf: error well under fp32's summation noise), also on the edge of
    N = 40 and for 37 rows (not whole row tiles)."""
    import dataclasses

    c = _case(37, 136, n, (30, 100, 136), 8, -1, True, seed=6)
    spec = ik.QLinearSpec.from_attrs(c["attrs"], 136, n)
    spec = ik.with_amx(spec) if kind == "amx" else spec
    isa = _isa(kind)
    qw = c["qw"]
    packed = ik.prepack_weights(spec, qw.qweight, qw.scale, qw.zero, c["b"], c["s"], c["z"])
    y = ik.run_quant_linear(ik.plan_quant_linear(spec, isa=isa), c["x"], packed)
    gspec = dataclasses.replace(spec, gelu=True)
    g = ik.run_quant_linear(ik.plan_quant_linear(gspec, isa=isa), c["x"], packed)
    want = torch.nn.functional.gelu(torch.from_numpy(y).double()).numpy()
    np.testing.assert_allclose(g, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())
    assert gspec.tag != spec.tag


@needs_amx
def test_amx_instructions_are_emitted_and_layout_is_whole_tiles() -> None:
    spec = ik.with_amx(ik.QLinearSpec.from_attrs(dict(w_bits=8, a_bits=8, act_clusters=(16, 100)), 100, 40))
    assert spec.amx and spec.np_ == 64 and spec.kp == 64 + 128
    assert all(s.plen % 64 == 0 and s.poff % 64 == 0 for s in spec.segments)
    _, fm = ik.build_kernel(ik.plan_quant_linear(spec))
    asm = fm.mod.inspect_source("asm")
    assert asm.count("tdpbusd") >= 8 and "ldtilecfg" in asm and "tilerelease" in asm  # 2 segments x 2 x 2 tiles
    # one row (a decode step) and int4 storage keep the VNNI kernels
    assert not ik.with_amx(ik.QLinearSpec.from_attrs(dict(w_bits=8, a_bits=8), 64, 32), rows=1).amx
    assert not ik.with_amx(ik.QLinearSpec.from_attrs(dict(w_bits=4, a_bits=8), 64, 32)).amx


def test_amx_needs_a_target_with_amx() -> None:
    import dataclasses

    plain = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    spec = ik.QLinearSpec.from_attrs(dict(w_bits=8, a_bits=8), 64, 32)
    assert not ik.target_has_amx(plain) and not ik.with_amx(spec, plain).amx
    with pytest.raises(ValueError, match="lacks amx-int8"):
        ik.plan_quant_linear(dataclasses.replace(spec, amx=True), plain)
    with pytest.raises(ValueError, match="8-bit weight storage"):
        ik.QLinearSpec(k=64, n=32, w_bits=4, group_size=-1, w_symmetric=True, a_bits=8, clusters=(),
                       amx=True).validate()


def test_target_without_vnni_falls_back_and_refuses_forced_vnni() -> None:
    plain = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})
    assert not ik.target_has_vnni(plain)
    spec = ik.QLinearSpec.from_attrs(dict(w_bits=8, a_bits=8), 64, 32)
    assert not ik.plan_quant_linear(spec, plain).vnni
    with pytest.raises(ValueError, match="lacks avx512vnni"):
        ik.plan_quant_linear(spec, plain, use_vnni=True)
    with pytest.raises(ValueError, match="need an llvm target"):
        ik.plan_quant_linear(spec, {"kind": "c"})


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="float activations"):
        ik.QLinearSpec.from_attrs(dict(w_bits=8, a_bits=None), 64, 32)
    with pytest.raises(ValueError, match="act_clusters"):
        ik.QLinearSpec.from_attrs(dict(w_bits=8, a_bits=8, act_clusters=(10, 60)), 64, 32)
    spec = ik.QLinearSpec.from_attrs(dict(w_bits=4, a_bits=8), 64, 32)
    with pytest.raises(ValueError, match="uint8 \\[32, 32\\]"):
        ik.prepack_weights(spec, torch.zeros(32, 64, dtype=torch.int8), torch.ones(32, 1), torch.zeros(32, 1),
                           None, torch.ones(1), torch.zeros(1, dtype=torch.int32))
    spec8 = ik.QLinearSpec.from_attrs(dict(w_bits=8, a_bits=8, act_clusters=(32, 64)), 64, 32)
    with pytest.raises(ValueError, match="one per cluster"):
        ik.prepack_weights(spec8, torch.zeros(32, 64, dtype=torch.int8), torch.ones(32, 1), torch.zeros(32, 1),
                           None, torch.ones(1), torch.zeros(1, dtype=torch.int32))


@pytest.mark.parametrize("amx", [pytest.param(False, id="vnni"), pytest.param(True, id="amx", marks=needs_amx)])
def test_relax_function_with_symbolic_m(tmp_path, amx: bool) -> None:
    """Two layers through emit_quant_linear in one Relax function; x is [2, m, K] with symbolic m;
    the library is exported and reloaded (as an artifact would be).  With ``amx`` the 8-bit layer
    runs on AMX tiles (its xq rows rounded up to whole blocks of a symbolic m)."""
    from tvm import relax

    k, n = 96, 48
    c1 = _case(1, k, n, (40, 96), 4, 32, False)
    c2 = _case(1, n, k, (), 8, -1, True, seed=3)
    ops = lambda c: dict(qweight=c["qw"].qweight, w_scale=c["qw"].scale, w_zero=c["qw"].zero,  # noqa: E731
                         bias=c["b"], act_scale=c["s"], act_zero=c["z"])
    bb = relax.BlockBuilder()
    m = tvm.tirx.Var("m", "int64")
    x = relax.Var("x", relax.TensorType([2, m, k], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h = ik.emit_quant_linear(bb, x, ops(c1), c1["attrs"])
            h2 = ik.emit_quant_linear(bb, x, ops(c1), c1["attrs"])  # same kernel: PrimFuncs shared
            y = ik.emit_quant_linear(bb, bb.emit(relax.op.add(h, h2)), ops(c2), c2["attrs"], amx=amx)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    assert sum(1 for gv in mod.get_global_vars() if gv.name_hint.startswith("ctc_")) == 4
    assert sum(1 for gv in mod.get_global_vars() if gv.name_hint.endswith("_amx")) == (2 if amx else 0)
    tvm.compile(mod, ik.host_target()).export_library(str(tmp_path / "qlinear.so"))
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "qlinear.so")), tvm.cpu())
    for mm in (1, 7, 33):
        xv = torch.randn(2, mm, k)
        got = vm["main"](tvm.runtime.tensor(xv.numpy())).numpy()
        h_ref = _reference({**c1, "x": xv})
        ref = _reference({**c2, "x": 2 * h_ref}).numpy()
        assert got.shape == (2, mm, k)
        # layer 2 re-quantizes h: a rounding flip in h may move one code; allow one step of layer 2
        step = float(c2["s"][0]) * float(c2["qw"].scale.abs().max()) * 127
        np.testing.assert_allclose(got, ref, rtol=0, atol=step)


@pytest.mark.parametrize("vnni", SCHEDULES)
@pytest.mark.parametrize("m", [1, 3])
def test_float_zero_points_with_block_dynamic_activations(m: int, vnni: bool) -> None:
    """GGUF Q4_1's form (int4 codes, per-block scale and *float* minimum) times activations quantized per
    row and block of 32 at run time (llama.cpp's Q8_1 idea): the kernel equals the op's reference."""
    g = torch.Generator().manual_seed(3)
    k, n = 160, 40
    w = torch.randn(n, k, generator=g) * 0.05 + 0.02
    qw = Q.quantize_weight(w, 4, 32, False, float_zero=True)
    assert qw.zero.dtype == torch.float32 and not torch.equal(qw.zero, qw.zero.round())
    x = torch.randn(m, k, generator=g) * (0.2 + (torch.arange(k) % 7).float())
    x[0, 3] = 40.0  # an outlier only its own block's range sees
    blocks = tuple(range(32, k + 1, 32))
    b = torch.randn(n, generator=g)
    attrs = dict(w_bits=4, group_size=32, w_symmetric=False, a_bits=8, act_clusters=blocks, has_bias=True,
                 act_dynamic=True)
    ref = quant_linear(x, qw.qweight, qw.scale, qw.zero, b, **attrs).numpy()
    spec = ik.QLinearSpec.from_attrs(attrs, k, n, w_zero_float=True)
    assert len(spec.segments) == k // 32 and "df_" in spec.tag
    tile = ik.gemv_tile(spec) if m == 1 else None
    kern = ik.plan_quant_linear(spec, isa=_isa(vnni), tile=tile)
    packed = ik.prepack_weights(spec, qw.qweight, qw.scale, qw.zero, b, None, None)
    assert packed["wzero"].dtype == np.float32
    y = ik.run_quant_linear(kern, x, packed)
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    # the activation rounding is real: the float-activation result differs by more than the kernel's error
    wo = quant_linear(x, qw.qweight, qw.scale, qw.zero, b, w_bits=4, group_size=32, w_symmetric=False,
                      a_bits=None, act_clusters=(), has_bias=True).numpy()
    assert np.abs(wo - ref).max() > 10 * np.abs(y - ref).max()
    with pytest.raises(ValueError, match="w_zero_float"):
        ik.prepack_weights(ik.QLinearSpec.from_attrs(attrs, k, n), qw.qweight, qw.scale, qw.zero, b, None, None)
    with pytest.raises(ValueError, match="dynamic activations"):
        ik.QLinearSpec.from_attrs({**attrs, "act_dynamic": False}, k, n, w_zero_float=True)


def _ffn(m_rows: int, k: int, n: int, n2: int, down_clusters: tuple[int, ...], seed: int = 7) -> dict:
    """An FFN's two integer linears (up: K -> N with gelu, down: N -> N2) and an input; the down projection's
    activation ranges are calibrated on the exact gelu output."""
    up = _case(m_rows, k, n, (30, k), 8, -1, True, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    qw2 = Q.quantize_weight(torch.randn(n2, n, generator=g), 8, -1, True)
    h = torch.nn.functional.gelu(_reference(up))
    bounds = [0, *down_clusters]
    lo = torch.stack([h[:, a:b].min() for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    hi = torch.stack([h[:, a:b].max() for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    s2, z2 = Q.act_qparams(lo, hi, 8)
    attrs2 = dict(w_bits=8, group_size=-1, w_symmetric=True, a_bits=8, act_clusters=down_clusters, has_bias=True)
    return dict(up=up, qw2=qw2, b2=torch.randn(n2, generator=g), s2=s2, z2=z2, attrs2=attrs2, n2=n2)


@needs_int8_gemm
@pytest.mark.parametrize("m_rows", [37, 8])
def test_gelu_epilogue_writes_the_next_linears_codes(m_rows: int) -> None:
    """``codes_spec``: the up projection's kernel writes the down projection's u8 codes (its padded
    layout: clusters that are not whole VNNI steps) bit for bit as qact makes them from the f32 gelu output,
    for partial row tiles and a last channel block past the codes; padding columns are 0."""
    import dataclasses

    f = _ffn(m_rows, 136, 200, 40, (45, 130, 199, 200))
    c = f["up"]
    spec = dataclasses.replace(ik.QLinearSpec.from_attrs(c["attrs"], 136, 200), gelu=True)
    cons = ik.QLinearSpec.from_attrs(f["attrs2"], 200, 40)
    assert cons.kp == 212 and cons.kp % 32  # padded segments, a partial last block of 32 channels
    qw = c["qw"]
    y = ik.run_quant_linear(ik.plan_quant_linear(spec), c["x"],
                            ik.prepack_weights(spec, qw.qweight, qw.scale, qw.zero, c["b"], c["s"], c["z"]))
    qw2 = f["qw2"]
    p2 = ik.prepack_weights(cons, qw2.qweight, qw2.scale, qw2.zero, f["b2"], f["s2"], f["z2"])
    _, want, _ = ik.run_quant_linear(ik.plan_quant_linear(cons), y, p2, return_intermediates=True)
    fspec = ik.codes_spec(spec, cons)
    assert (fspec.n, fspec.codes) == (200, 212) and "Q212" in fspec.tag
    got = ik.run_quant_linear(ik.plan_quant_linear(fspec), c["x"],
                              ik.prepack_codes(fspec, cons, qw.qweight, qw.scale, qw.zero, c["b"], c["s"], c["z"],
                                               f["s2"], f["z2"]))
    np.testing.assert_array_equal(got, want)
    pad = ik.code_layout(cons) < 0
    assert pad.sum() == 12 and not got[:, pad].any()  # not written (the buffer was zeros)
    with pytest.raises(ValueError, match="next linear's K"):
        ik.codes_spec(spec, ik.QLinearSpec.from_attrs(f["attrs2"] | dict(act_clusters=(100, 136)), 136, 40))
    with pytest.raises(ValueError, match="static activation ranges"):
        ik.codes_spec(spec, dataclasses.replace(cons, dynamic=True))


def _ffn_module(f: dict, gelu_is_output: bool) -> tuple[Any, Any]:
    from ctc.ir.graph import Module
    from ctc.ir.types import TensorType

    c = f["up"]
    m = Module("ffn")
    x = m.add_input("x", TensorType((1, "seq", c["k"]), "f32"))

    def p(name: str, t: torch.Tensor) -> Any:
        return m.param(m.add_param(name, t))

    qw, qw2 = c["qw"], f["qw2"]
    h = m.create_node("quant_linear", [x, p("w1", qw.qweight), p("s1", qw.scale), p("z1", qw.zero), p("b1", c["b"]),
                                       p("as1", c["s"]), p("az1", c["z"])], c["attrs"]).output
    g = m.create_node("gelu", [h], {"approximate": "none"}).output
    y = m.create_node("quant_linear", [g, p("w2", qw2.qweight), p("s2", qw2.scale), p("z2", qw2.zero),
                                       p("b2", f["b2"]), p("as2", f["s2"]), p("az2", f["z2"])], f["attrs2"]).output
    m.set_outputs([y, g] if gelu_is_output else [y])
    return m, x


@needs_int8_gemm
@pytest.mark.parametrize("gelu_is_output", [False, True])
def test_ffn_runs_one_quantizer_and_equals_the_unfused_kernels(gelu_is_output: bool) -> None:
    """Lowered, an FFN (quant_linear, gelu, quant_linear) runs one qact: the up projection writes the down
    projection's codes; the result is bit-identical to the two linears' own kernels and equal to the
    interpreter.  When the gelu output is read elsewhere (a module output here) both quantizers run."""
    import dataclasses
    import tempfile

    from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled
    from ctc.ir.interpreter import interpret

    f = _ffn(37, 136, 200, 40, (45, 130, 199, 200))
    m, _ = _ffn_module(f, gelu_is_output)
    comp = compile_module(m, options=BuildOptions())
    d = tempfile.mkdtemp()
    comp.export(d)
    lib = load_compiled(d, threads=1)
    c = f["up"]
    xin = c["x"][None]
    got = lib(xin)[0]
    names = [kt.name for kt in lib.profile(xin, runs=1)]
    assert sum("qact" in nm for nm in names) == (2 if gelu_is_output else 1), names
    assert sum("qmm" in nm and "Q212" in nm for nm in names) == (0 if gelu_is_output else 1), names
    spec = dataclasses.replace(ik.QLinearSpec.from_attrs(c["attrs"], 136, 200), gelu=True)
    cons = ik.QLinearSpec.from_attrs(f["attrs2"], 200, 40)
    qw, qw2 = c["qw"], f["qw2"]
    y = ik.run_quant_linear(ik.plan_quant_linear(spec), c["x"],
                            ik.prepack_weights(spec, qw.qweight, qw.scale, qw.zero, c["b"], c["s"], c["z"]))
    want = ik.run_quant_linear(ik.plan_quant_linear(cons), y,
                               ik.prepack_weights(cons, qw2.qweight, qw2.scale, qw2.zero, f["b2"], f["s2"], f["z2"]))
    np.testing.assert_array_equal(got.numpy()[0], want)
    ref = interpret(m, [xin])[0]
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=0, atol=2e-2 * float(ref.abs().max()))
