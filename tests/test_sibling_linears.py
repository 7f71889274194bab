"""Sibling linears (q, k, v reading one input) lowered as one GEMM on the CPU: W8A8 and f32.

The merged kernel computes every output channel exactly as the linear's own kernel does, so the W8A8 result
is bit-identical to each linear's own integer kernel; the f32 result equals the interpreter's.  The structure
(one quantizer, one GEMM, the concatenated weights' source) is asserted on the lowered module.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from ctc.backends.tvm import int_kernels as ik  # noqa: E402
from ctc.backends.tvm import lower as L  # noqa: E402
from ctc.backends.tvm.siblings import sibling_linears  # noqa: E402
from ctc.ir import Module, TensorType, Value  # noqa: E402
from ctc.ir import quant as Q  # noqa: E402
from ctc.ir.interpreter import interpret  # noqa: E402

needs_int8_gemm = pytest.mark.skipif(not ik.target_has_int8_gemm(),
                                     reason="host CPU has neither AVX512-VNNI nor AVX2 (the hand-written 8-bit GEMM)")
K, N = 64, 64


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _p(m: Module, name: str, t: torch.Tensor) -> Value:
    m.add_param(name, t)
    return m.param(name)


def _qkv_w8a8(same_ranges: bool = True, rows: int = 37) -> tuple[Module, torch.Tensor, list[dict[str, Any]]]:
    """``x [1, s, K]`` read by three integer ``quant_linear`` (q, k, v: their own weights and biases, one set of
    activation ranges unless ``same_ranges`` is False), each a module output."""
    g = _g(3)
    m = Module("qkv8")
    x = m.add_input("x", TensorType((1, "s", K), "f32"))
    xs = torch.randn(1, rows, K, generator=g) * 2
    s, z = Q.act_qparams(torch.stack([xs[..., :20].min(), xs[..., 20:].min()]),
                         torch.stack([xs[..., :20].max(), xs[..., 20:].max()]), 8)
    attrs = dict(w_bits=8, group_size=-1, w_symmetric=True, a_bits=8, act_clusters=(20, K), has_bias=True)
    outs, parts = [], []
    for nm in "qkv":
        qw = Q.quantize_weight(torch.randn(N, K, generator=g), 8, -1, True)
        b = torch.randn(N, generator=g)
        si = s if same_ranges or nm != "v" else s * 1.5
        ins = [x, _p(m, f"{nm}.w", qw.qweight), _p(m, f"{nm}.s", qw.scale), _p(m, f"{nm}.z", qw.zero),
               _p(m, f"{nm}.b", b), _p(m, f"{nm}.as", si), _p(m, f"{nm}.az", z)]
        outs.append(m.create_node("quant_linear", ins, attrs).output)
        parts.append(dict(qw=qw, b=b, s=si, z=z, attrs=attrs))
    m.set_outputs(outs)
    return m, xs, parts


def _main(script: str) -> str:
    return script.split("def main")[1]


def test_sibling_linears_are_the_other_readers_of_x_in_use_order() -> None:
    m, _, _ = _qkv_w8a8()
    q, k, v = (o.producer for o in m.outputs)
    assert sibling_linears(q, lambda u: True) == [k, v]
    assert sibling_linears(k, lambda u: u is not v) == [q]


@needs_int8_gemm
def test_w8a8_qkv_is_one_quantizer_and_one_gemm_bit_identical_to_each_linears_kernel() -> None:
    from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled

    m, xs, parts = _qkv_w8a8()
    low = L.lower(m, target=ik.host_target())
    main = _main(low.mod.script())
    assert low.int_kernels == 1 and not low.notes
    assert len(re.findall(r"ctc_qmm_k64_n192_\w*P3_", main)) == 1, "q|k|v: one GEMM over N = 3 x 64, part-major"
    assert len(re.findall(r"ctc_qact_", main)) == 1, "one quantizer for the three"
    assert main.count("strided_slice") == 3
    comp = compile_module(m, options=BuildOptions())
    import tempfile

    d = tempfile.mkdtemp()
    comp.export(d)
    got = load_compiled(d, threads=1)(xs)
    for out, p in zip(got, parts, strict=True):
        spec = ik.QLinearSpec.from_attrs(p["attrs"], K, N)
        qw = p["qw"]
        want = ik.run_quant_linear(ik.plan_quant_linear(spec), xs[0],
                                   ik.prepack_weights(spec, qw.qweight, qw.scale, qw.zero, p["b"], p["s"], p["z"]))
        np.testing.assert_array_equal(out.numpy()[0], want)
    for out, ref in zip(got, interpret(m, [xs]), strict=True):
        np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=0, atol=2e-2 * float(ref.abs().max()))


@needs_int8_gemm
def test_w8a8_linears_with_other_activation_ranges_stay_apart() -> None:
    """v's activations quantize with other ranges: q|k is one GEMM (one quantizer), v another."""
    m, _, _ = _qkv_w8a8(same_ranges=False)
    main = _main(L.lower(m, target=ik.host_target()).mod.script())
    assert "n192" not in main and main.count("strided_slice") == 2
    assert len(re.findall(r"ctc_qmm_k64_n128_", main)) == 1 and len(re.findall(r"ctc_qmm_k64_n64_", main)) == 1
    assert len(re.findall(r"ctc_qact_", main)) == 2


def _qkv_f32(bias: tuple[bool, bool, bool] = (True, True, True)) -> Module:
    g = _g(5)
    m = Module("qkv32")
    x = m.add_input("x", TensorType((1, "s", K), "f32"))
    outs = []
    for nm, has_b in zip("qkv", bias, strict=True):
        ins = [x, _p(m, f"{nm}.w", torch.randn(32 * 3, K, generator=g) * 0.2)]
        if has_b:
            ins.append(_p(m, f"{nm}.b", torch.randn(32 * 3, generator=g)))
        outs.append(m.create_node("linear", ins, {}).output)
    m.set_outputs(outs)
    return m


@pytest.mark.parametrize("seq", [16, None])
def test_f32_qkv_is_one_panel_gemm_whose_weights_come_from_the_parameters(seq: int | None) -> None:
    """One GEMM over q|k|v's weights side by side (fixed and symbolic rows), bound with sources that replay the
    concatenation from the module's parameters; equal to the interpreter."""
    from ctc.backends.tvm.build import BuildOptions, compile_module

    m = _qkv_f32()
    low = L.lower(m, target=ik.host_target(), params="input", static_dims={"s": seq} if seq else None)
    main = _main(low.mod.script())
    assert main.count("strided_slice") == 3 and main.count("matmul") == 1, main
    srcs = {s["op"]: s["from"] for s in low.param_sources if s}
    width = next(int(k[len("concat0_panels"):]) for k in srcs if k.startswith("concat0_panels"))
    assert srcs[f"concat0_panels{width}"] == ["q.w", "k.w", "v.w"]
    assert srcs["concat0"] == ["q.b", "k.b", "v.b"]
    params = dict(m.params)
    for (name, arr), src in zip(low.param_inputs, low.param_sources, strict=True):
        np.testing.assert_array_equal(L.derive_param(src, params).numpy(), arr, err_msg=name)  # type: ignore[arg-type]
    xs = torch.randn(1, 16, K, generator=_g(6))
    comp = compile_module(m, options=BuildOptions(static_dims={"s": seq} if seq else None))
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(comp.executable, tvm.cpu())
    outs = vm["main"](tvm.runtime.tensor(xs.numpy()), *(tvm.runtime.tensor(a) for a in comp.param_arrays))
    for got, ref in zip(outs, interpret(m, [xs]), strict=True):
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_f32_linears_with_and_without_bias_stay_apart() -> None:
    main = _main(L.lower(_qkv_f32((True, False, True)), target=ik.host_target()).mod.script())
    assert "strided_slice" in main and main.count("matmul") == 2  # q and v merged; k alone


def _with_heads(m: Module) -> Module:
    """``m``'s outputs split into heads and transposed (``[1, s, N] -> [1, heads, s, 16]``), as attention reads
    q, k and v."""
    outs = []
    for o in m.outputs:
        n = int(o.type.shape[-1])
        h = m.create_node("reshape", [o], {"shape": (1, "s", n // 16, 16)}).output
        outs.append(m.create_node("transpose", [h], {"dim0": 1, "dim1": 2}).output)
    m.set_outputs(outs)
    return m


@pytest.mark.parametrize("kind", [pytest.param("w8a8", marks=needs_int8_gemm), "f32"])
def test_heads_of_the_merged_result_fuse_into_the_transposes(kind: str) -> None:
    """q, k, v each read by a head reshape and a transpose: the parts of the merged GEMM's result are gathered in
    the heads' shape inside the transposes' kernels (no slice kernel, no copy of their own), also for a symbolic
    length; the values are the unmerged ones'."""
    import tvm

    from ctc.backends.tvm.build import relax_passes

    m = _with_heads(_qkv_w8a8()[0] if kind == "w8a8" else _qkv_f32())
    tgt = ik.host_target()
    low = L.lower(m, target=tgt)
    assert "strided_slice" not in _main(low.mod.script())
    with tgt, tvm.transform.PassContext(opt_level=3):
        fused = relax_passes(tgt)(low.mod)
    calls = re.findall(r"R\.call_tir\((\w+)", fused["main"].script())
    assert sum("split_heads" in c for c in calls) == 3 and all("transpose" in c for c in calls if "split_heads" in c)
    assert len([c for c in calls if "reshape" not in c]) == (2 if kind == "w8a8" else 1) + 3, calls
    xs = torch.randn(1, 21, K, generator=_g(8)) * 2
    from tvm import relax

    from ctc.backends.tvm.build import BuildOptions, compile_module

    comp = compile_module(m, options=BuildOptions())
    vm = relax.VirtualMachine(comp.executable, tvm.cpu())
    outs = vm["main"](tvm.runtime.tensor(xs.numpy()), *(tvm.runtime.tensor(a) for a in comp.param_arrays))
    for got, ref in zip(outs, interpret(m, [xs]), strict=True):
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=(2e-2 * float(ref.abs().max()))
                                   if kind == "w8a8" else 1e-5)
