"""A layer norm that writes the next integer linears' u8 codes (RPTQ: layer norm -> reorder -> q, k, v).

The norm's row kernel quantizes each output row as the linears' own quantizer would (the same arithmetic on the
same f32 row), so the quantizer's kernel goes and every output is bit-identical to the build without the fusion.
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
from ctc.ir import Module, TensorType, Value  # noqa: E402
from ctc.ir import quant as Q  # noqa: E402
from ctc.ir.interpreter import interpret  # noqa: E402

K, N = 96, 64
HOST_VBMI = ik.target_has_vnni() and "avx512vbmi" in open("/proc/cpuinfo").read()
needs_vbmi = pytest.mark.skipif(not HOST_VBMI, reason="host CPU lacks avx512_vnni/avx512_vbmi (the permuting "
                                                      "quantizer)")


def _p(m: Module, name: str, t: torch.Tensor) -> Value:
    m.add_param(name, t)
    return m.param(name)


def _ln_qkv(residual: bool) -> tuple[Module, list[torch.Tensor]]:
    """``x [1, s, K]`` (+ a residual ``z``) -> layer norm -> reorder -> q, k, v (W8A8, one set of ranges, four
    clusters); outputs q, k, v and the norm's output (read elsewhere, as a residual is)."""
    g = torch.Generator().manual_seed(11)
    m = Module("lnqkv")
    x = m.add_input("x", TensorType((1, "s", K), "f32"))
    xs = [torch.randn(1, 19, K, generator=g) * 3 + 1]
    if residual:
        z = m.add_input("z", TensorType((1, "s", K), "f32"))
        xs.append(torch.randn(1, 19, K, generator=g))
        x = m.create_node("add", [x, z], {}).output
    ln = m.create_node("layer_norm", [x, _p(m, "g", torch.rand(K, generator=g) + 0.5),
                                      _p(m, "b", torch.randn(K, generator=g) * 0.1)], {"eps": 1e-12}).output
    perm = torch.randperm(K, generator=g)
    xp = m.create_node("channel_permute", [ln, _p(m, "perm", perm)], {"axis": -1}).output
    cuts = (13, 40, 90, K)
    lo = torch.tensor([-2.0, -3.0, -1.5, -4.0])
    s, z0 = Q.act_qparams(lo, -lo * 1.2, 8)
    attrs = dict(w_bits=8, group_size=-1, w_symmetric=True, a_bits=8, act_clusters=cuts, has_bias=True)
    outs = []
    for nm in "qkv":
        qw = Q.quantize_weight(torch.randn(N, K, generator=g), 8, -1, True)
        ins = [xp, _p(m, f"{nm}.w", qw.qweight), _p(m, f"{nm}.s", qw.scale), _p(m, f"{nm}.z", qw.zero),
               _p(m, f"{nm}.b", torch.randn(N, generator=g)), _p(m, f"{nm}.as", s), _p(m, f"{nm}.az", z0)]
        outs.append(m.create_node("quant_linear", ins, attrs).output)
    m.set_outputs([*outs, ln])
    return m, xs


def _run(m: Module, xs: list[torch.Tensor]) -> list[np.ndarray]:
    import tvm
    from tvm import relax

    from ctc.backends.tvm.build import BuildOptions, compile_module

    comp = compile_module(m, options=BuildOptions())
    vm = relax.VirtualMachine(comp.executable, tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(x.numpy()) for x in xs), *(tvm.runtime.tensor(a) for a in comp.param_arrays))
    return [o.numpy() for o in out]


@needs_vbmi
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_writes_the_reordered_linears_codes_bit_identically(residual: bool,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    m, xs = _ln_qkv(residual)
    main = L.lower(m, target=ik.host_target()).mod.script().split("def main")[1]
    assert "ctc_qact_" not in main, "no quantizer kernel: the norm writes the codes"
    assert len(re.findall(r"row_layer_norm_96_\w*codes_k96_n192_", main)) == 1
    assert len(re.findall(r"ctc_qmm_k96_n192_", main)) == 1
    got = _run(m, xs)
    monkeypatch.setattr(L, "_ln_codes", lambda *a: None)
    want = _run(m, xs)
    for g_, w_ in zip(got, want, strict=True):
        np.testing.assert_array_equal(g_, w_)
    ref = interpret(m, xs)
    for g_, r_ in zip(got[:3], ref[:3], strict=True):
        np.testing.assert_allclose(g_, r_.numpy(), rtol=0, atol=3e-2 * float(r_.abs().max()))


def test_layer_norm_codes_kernel_refuses_other_quantizers() -> None:
    spec = ik.QLinearSpec(k=K, n=N, w_bits=8, group_size=-1, w_symmetric=True, a_bits=8, clusters=(K,))
    kernel: Any = ik.plan_quant_linear(spec)  # no gather: not the permuting quantizer
    with pytest.raises(ValueError, match="permuting static quantizer"):
        ik.layer_norm_codes_func(K, 1e-5, False, None, kernel)


@needs_vbmi
def test_row_kernels_keep_their_row_buffers_on_the_stack() -> None:
    """The norm's 16-lane accumulators and the row's code buffers are small "local" buffers declared per row;
    TVM would take each from its workspace pool per row (4 allocations and 4 frees a row: 2x the kernel's time
    on MiniLM's 128 x 384).  ctc's TIR pipeline (``build.stack_small_buffers``) keeps them on the stack."""
    import tvm

    from ctc.backends.tvm.build import register_tir_pipeline

    spec = ik.QLinearSpec(k=K, n=N, w_bits=8, group_size=-1, w_symmetric=True, a_bits=8, clusters=(40, K),
                          gather=True)
    kernel: Any = ik.plan_quant_linear(spec)
    assert kernel.permute
    for func in (ik.layer_norm_codes_func(K, 1e-5, True, None, kernel), kernel.qact):
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=ik.host_target(),
                          tir_pipeline=register_tir_pipeline())
        ll = "\n".join(m.inspect_source("ll") for m in [lib.mod, *lib.mod.imports] if m.kind == "llvm")
        assert "parallel_lambda" in ll and "TVMBackendAllocWorkspace" not in ll
