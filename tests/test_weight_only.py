"""Weight-only ``quant_linear`` on the TVM CPU backend: int4/int8 weights stay packed in the library and
the GEMV (one row) / dequantize + GEMM (several rows) kernels match the reference interpreter."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from ctc.backends.tvm import lower as L  # noqa: E402
from ctc.backends.tvm import weight_only as WO  # noqa: E402
from ctc.backends.tvm.build import BuildOptions, compile_module  # noqa: E402
from ctc.ir import Module, TensorType  # noqa: E402
from ctc.ir import quant as Q  # noqa: E402
from ctc.ir.interpreter import interpret  # noqa: E402


def _module(k: int, n: int, bits: int, gs: int, sym: bool, rows: int | str, bias: bool, float_zero: bool = False,
            seed: int = 0) -> Module:
    g = torch.Generator().manual_seed(seed)
    m = Module("wo")
    x = m.add_input("x", TensorType((1, rows, k), "f32"))
    qw = Q.quantize_weight(torch.randn(n, k, generator=g), bits, gs, sym)
    zero = qw.zero
    if float_zero:  # a float zero point (GGUF Q4_1 style minima)
        zero = qw.zero.to(torch.float32) + torch.rand(qw.zero.shape, generator=g) - 0.5
    names = {"qweight": qw.qweight, "w_scale": qw.scale, "w_zero": zero}
    if bias:
        names["bias"] = torch.randn(n, generator=g)
    ops = {"x": x}
    for nm, t in names.items():
        m.add_param(nm, t)
        ops[nm] = m.param(nm)
    y = m.create_node("quant_linear", ops, {"w_bits": bits, "group_size": gs, "w_symmetric": sym, "a_bits": None,
                                            "has_bias": bias})
    m.set_outputs([y.output])
    return m


def _run(m: Module, xs: torch.Tensor, **opts: object) -> torch.Tensor:
    import tvm
    from tvm import relax

    comp = compile_module(m, options=BuildOptions(**opts))
    vm = relax.VirtualMachine(comp.executable, tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(xs.numpy()))] + [tvm.runtime.tensor(a) for a in comp.param_arrays]
    return torch.from_numpy(vm["main"](*args).numpy())


@pytest.mark.parametrize("bits,gs,sym,bias,float_zero", [
    (4, 32, False, True, False), (4, 64, True, False, False), (4, 128, False, False, True), (4, -1, True, True, False),
    (8, 64, True, False, False), (8, -1, False, True, False), (8, 128, True, False, True)])
def test_gemv_and_gemm_match_interpreter(bits: int, gs: int, sym: bool, bias: bool, float_zero: bool) -> None:
    k, n = 320, 48  # 320 = 2.5 groups of 128: a short last group
    for rows in (1, 5):
        m = _module(k, n, bits, gs, sym, rows, bias, float_zero, seed=bits + gs)
        low = L.lower(m, static_dims={})
        assert low.int_kernels == 1 and not low.notes
        script = low.mod.script()
        assert ("ctc_wo_gemv" in script) == (rows == 1)
        xs = torch.randn(1, rows, k, generator=torch.Generator().manual_seed(3))
        ref = interpret(m, [xs])[0]
        got = _run(m, xs)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_packed_bytes_are_what_is_bound() -> None:
    m = _module(256, 64, 4, 32, False, 1, False)
    low = L.lower(m, params="input")
    arrays = {n: a for n, a in low.param_inputs}
    wp = [a for n, a in arrays.items() if "wo_pack" in n]
    assert len(wp) == 1 and wp[0].dtype == np.uint8 and wp[0].shape == (64, 128)
    assert not any(a.dtype == np.float32 and a.size >= 256 * 64 for a in arrays.values())


def test_pack_layout_is_gguf_like_blocks() -> None:
    spec = WO.spec_of(64, 2, 4, 32, False)
    q = (np.arange(128).reshape(2, 64) % 16 - 8).astype(np.int8)
    wp, s, o = WO.pack(spec, q, np.ones((2, 2), np.float32), np.zeros((2, 2), np.int8))
    # byte j of a block: element j (low nibble) and element j + 16 (high nibble), offset binary
    assert wp[0, 0] == (q[0, 0] + 8) | ((q[0, 16] + 8) << 4)
    assert wp[0, 16] == (q[0, 32] + 8) | ((q[0, 48] + 8) << 4)
    np.testing.assert_array_equal(o, -8.0 * np.ones((2, 2), np.float32))


def test_unsupported_shapes_fall_back_with_a_note() -> None:
    m = _module(40, 16, 4, -1, True, 1, False)  # K not a multiple of 32
    low = L.lower(m)
    assert any("dequantized at build time" in n for n in low.notes)
    xs = torch.randn(1, 1, 40)
    torch.testing.assert_close(_run(m, xs), interpret(m, [xs])[0], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- W8A8, dynamic activations
def _w8a8(k: int, n: int, clusters: tuple[int, ...], sym: bool, rows: int, dynamic: bool) -> Module:
    g = torch.Generator().manual_seed(7)
    m = Module("w8a8")
    x = m.add_input("x", TensorType((1, rows, k), "f32"))
    qw = Q.quantize_weight(torch.randn(n, k, generator=g), 8, -1, sym)
    ops = {"x": x}
    for nm, t in {"qweight": qw.qweight, "w_scale": qw.scale, "w_zero": qw.zero}.items():
        m.add_param(nm, t)
        ops[nm] = m.param(nm)
    if not dynamic:
        s, z = Q.act_qparams(torch.full((len(clusters) or 1,), -3.0), torch.full((len(clusters) or 1,), 3.0), 8)
        for nm, t in {"act_scale": s, "act_zero": z}.items():
            m.add_param(nm, t)
            ops[nm] = m.param(nm)
    y = m.create_node("quant_linear", ops, {"w_bits": 8, "group_size": -1, "w_symmetric": sym, "a_bits": 8,
                                            "act_clusters": clusters, "act_dynamic": dynamic})
    m.set_outputs([y.output])
    return m


@pytest.mark.parametrize("rows,clusters,sym", [(1, (), True), (1, (40, 64, 128), False), (6, (20, 128), True)])
def test_dynamic_activation_kernels_match_interpreter(rows: int, clusters: tuple[int, ...], sym: bool) -> None:
    m = _w8a8(128, 48, clusters, sym, rows, dynamic=True)
    low = L.lower(m)
    assert low.int_kernels == 1 and not low.notes and "ctc_qmm" in low.mod.script()
    xs = torch.randn(1, rows, 128, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.1, 4, 128)
    ref = interpret(m, [xs])[0]
    got = _run(m, xs)
    # same integer arithmetic; a value on a rounding boundary may land one activation step away
    step = float((xs.abs().amax() * 2 / 255) * m.params["w_scale"].abs().max()) * 128
    assert float((got - ref).abs().max()) <= step
    assert float((got - ref).abs().mean()) < 1e-4 * float(ref.abs().mean()) + 1e-5


@pytest.mark.parametrize("rows", [1, 4])
def test_float_zero_int4_with_block_activations_matches_interpreter(rows: int) -> None:
    """GGUF Q4_1's form (int4 codes, float block minima) x activations per row and block of 32 (the
    ``gguf-weights a_bits=8`` / ``quantize a_mode="block"`` nodes): integer kernels, not a float fallback."""
    g = torch.Generator().manual_seed(11)
    k, n = 128, 48
    qw = Q.quantize_weight(torch.randn(n, k, generator=g) * 0.1 + 0.05, 4, 32, False, float_zero=True)
    m = Module("w4a8f")
    x = m.add_input("x", TensorType((1, rows, k), "f32"))
    ops = {"x": x}
    for nm, t in {"qweight": qw.qweight, "w_scale": qw.scale, "w_zero": qw.zero}.items():
        m.add_param(nm, t)
        ops[nm] = m.param(nm)
    y = m.create_node("quant_linear", ops, {"w_bits": 4, "group_size": 32, "w_symmetric": False, "a_bits": 8,
                                            "act_clusters": Q.act_block_clusters(k), "act_dynamic": True})
    m.set_outputs([y.output])
    from ctc.backends.tvm.int_kernels import target_has_vnni

    low = L.lower(m)
    # AVX512-VNNI: the block kernels (block_gemv); elsewhere the generic integer kernels with a float epilogue
    want = "ctc_blk_gemv" if target_has_vnni() else "df_g32"
    assert low.int_kernels == 1 and not low.notes and want in low.mod.script()
    xs = torch.randn(1, rows, k, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 4, k)
    ref = interpret(m, [xs])[0]
    got = _run(m, xs)
    step = float((xs.abs().amax() * 2 / 255) * qw.scale.abs().max()) * 32
    assert float((got - ref).abs().max()) <= step
    assert float((got - ref).abs().mean()) < 1e-4 * float(ref.abs().mean()) + 1e-5


def test_one_row_uses_a_one_row_tile() -> None:
    from ctc.backends.tvm.int_kernels import target_has_amx, target_has_vnni

    vnni = target_has_vnni()
    one, several = ("vnni_1x4", "vnni_8x2") if vnni else ("avx2_1x2", "avx2_4x1")
    low = L.lower(_w8a8(128, 64, (), True, 1, dynamic=False))
    assert one in low.mod.script() and low.amx_kernels == 0
    low = L.lower(_w8a8(128, 64, (), True, 3, dynamic=False))
    # several rows: AMX tiles where the host has them (W8A8), else the VNNI (8 x 32) or AVX2 (4 x 16) register tile
    assert ("_amx" if target_has_amx() else several) in low.mod.script()
    assert low.amx_kernels == int(target_has_amx())
    low = L.lower(_w8a8(128, 64, (), True, 3, dynamic=False), use_amx=False)
    assert several in low.mod.script() and low.amx_kernels == 0


@pytest.mark.parametrize("rows,use_amx", [(5, True), (5, False), (1, True)])
def test_reorder_gather_is_read_by_the_quantizer(rows: int, use_amx: bool) -> None:
    """RPTQ's explicit reorder (a channel_permute read by quant_linears) runs inside their activation
    quantizer: no gather kernel is left in the library, and the output equals the interpreter's."""
    import tvm

    g = torch.Generator().manual_seed(3)
    k, n = 128, 64
    m = Module("w8a8_perm")
    x = m.add_input("x", TensorType((1, rows, k), "f32"))
    m.add_param("perm", torch.randperm(k, generator=g))
    xp = m.create_node("channel_permute", {"x": x, "perm": m.param("perm")}, {"axis": -1}).output
    outs = []
    for i in range(2):  # two readers, as q/k/v read one reordered activation
        qw = Q.quantize_weight(torch.randn(n, k, generator=g), 8, -1, True)
        s, z = Q.act_qparams(torch.tensor([-3.0, -1.0]), torch.tensor([3.0, 2.0]), 8)
        ops = {"x": xp}
        for nm, t in {"qweight": qw.qweight, "w_scale": qw.scale, "w_zero": qw.zero, "act_scale": s,
                      "act_zero": z}.items():
            m.add_param(f"{nm}{i}", t)
            ops[nm] = m.param(f"{nm}{i}")
        outs.append(m.create_node("quant_linear", ops, {"w_bits": 8, "group_size": -1, "w_symmetric": True,
                                                        "a_bits": 8, "act_clusters": (40, 128)}).output)
    m.set_outputs([m.create_node("add", {"a": outs[0], "b": outs[1]}).output])
    from ctc.backends.tvm.build import relax_passes
    from ctc.backends.tvm.int_kernels import host_target

    low = L.lower(m, use_amx=use_amx)
    with host_target(), tvm.transform.PassContext(opt_level=3):
        fused = relax_passes(host_target())(low.mod)
    names = [gv.name_hint for gv in fused.get_global_vars()]
    # one quantizer, and one GEMM over both weights side by side (lower._int_siblings)
    assert low.int_kernels == 1 and sum("qact" in nm and re.search(r"p(P\d+)?_g", nm) is not None
                                        for nm in names) == 1, names
    assert not any("take" in nm for nm in names), names
    comp = compile_module(m, options=BuildOptions(use_amx=use_amx))
    xs = torch.randn(1, rows, k, generator=g) * torch.linspace(0.1, 3, k)
    ref = interpret(m, [xs])[0]
    vm = tvm.relax.VirtualMachine(comp.executable, tvm.cpu())
    got = torch.from_numpy(vm["main"](tvm.runtime.tensor(xs.numpy()), *[tvm.runtime.tensor(a) for a in
                                                                         comp.param_arrays]).numpy())
    step = float(3 * 2 / 255 * max(float(m.params[f"w_scale{i}"].abs().max()) for i in range(2))) * 128
    assert float((got - ref).abs().max()) <= step  # a code on a rounding boundary may move one step
    assert float((got - ref).abs().mean()) < 1e-4 * float(ref.abs().mean()) + 1e-5


def test_gelu_after_an_amx_matmul_runs_in_its_epilogue() -> None:
    """quant_linear -> gelu (an FFN's first half) on AMX: one kernel, no gelu kernel of its own, the
    interpreter's result; with two readers of the product the gelu stays a kernel."""
    from ctc.backends.tvm.int_kernels import target_has_amx

    if not target_has_amx():
        pytest.skip("host CPU (or OS) gives no AMX int8 tiles")
    for readers in (1, 2):
        m = _w8a8(128, 64, (40, 128), True, 5, dynamic=False)
        y = m.outputs[0]
        h = m.create_node("gelu", [y], {"approximate": "none"}).output
        m.set_outputs([h] if readers == 1 else [h, y])
        low = L.lower(m)
        names = [gv.name_hint for gv in low.mod.get_global_vars()]
        assert sum("qmm" in nm and "G_g" in nm for nm in names) == (readers == 1)
        assert any("gelu" in nm for nm in names) == (readers == 2)
    m.set_outputs([h])
    xs = torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(9)) * 2
    ref = interpret(m, [xs])[0]
    got = _run(m, xs)
    # same integer arithmetic; a value on a rounding boundary may land one activation step away
    step = float(6 / 255 * m.params["w_scale"].abs().max()) * 128
    assert float((got - ref).abs().max()) <= step
    assert float((got - ref).abs().mean()) < 1e-4 * float(ref.abs().mean()) + 1e-5


def test_dynamic_reference_uses_each_rows_range() -> None:
    x = torch.tensor([[[0.0, 1.0, -2.0, 4.0]], [[100.0, -50.0, 25.0, 0.5]]])
    y = Q.fake_quant_act_dynamic(x, 8, (2, 4))
    for r in range(2):
        for a, b in ((0, 2), (2, 4)):
            s, z = Q.act_qparams(x[r, 0, a:b].min(), x[r, 0, a:b].max(), 8)
            torch.testing.assert_close(y[r, 0, a:b], Q.fake_quant_act(x[r, 0, a:b], s.reshape(1), z.reshape(1), 8, ()))


@pytest.mark.parametrize("bits,gs,k", [(4, 32, 64), (4, -1, 33), (8, 16, 48)])
def test_stored_int_decoder_matches_dequantize_weight(bits: int, gs: int, k: int) -> None:
    """The TE decoder of ctc.ir.quant's storage form (used by the GPU quant_linear and the KV cache
    expansion) reproduces ``dequantize_weight``, odd K (a padding nibble) included."""
    import tvm
    from tvm import te

    from ctc.backends.tvm.targets import resolve

    qw = Q.quantize_weight(torch.randn(5, k, generator=torch.Generator().manual_seed(1)), bits, gs, symmetric=False)
    arrays = [qw.qweight.numpy(), qw.scale.numpy(), qw.zero.numpy()]
    ph = [te.placeholder(a.shape, str(a.dtype), name=f"p{i}") for i, a in enumerate(arrays)]
    w = L._dequant_te(bits, gs, k)(*ph)
    f = tvm.compile(te.create_prim_func([*ph, w]), target=resolve("cpu").target())
    out = tvm.runtime.tensor(np.zeros((5, k), np.float32))
    f(*(tvm.runtime.tensor(a) for a in arrays), out)
    ref = Q.dequantize_weight(qw.qweight, qw.scale, qw.zero, bits, gs, k).numpy()
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-6)
