"""f32 linears on AMX-BF16 tiles with bf16-split operands (``amx_f32``): the split is exact enough, the
packed layout is the tile's, ``fp32_matmul`` is validated, and where the CPU has AMX-BF16 the kernels and a
compiled module match the f32 reference with the variant's tolerance (skipped cleanly elsewhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from ctc.backends.tvm import amx_f32 as A  # noqa: E402
from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled  # noqa: E402
from ctc.backends.tvm.lower import LoweringError, derive_param, resolve_fp32_matmul  # noqa: E402
from ctc.ir import Module, TensorType  # noqa: E402
from ctc.ir.interpreter import interpret  # noqa: E402
from ctc.options import OptionError  # noqa: E402
from ctc.targets import CpuOptions  # noqa: E402

HOST_AMX_BF16 = A.target_has_amx_bf16()
needs_amx_bf16 = pytest.mark.skipif(not HOST_AMX_BF16, reason="host CPU (or OS) gives no AMX-BF16 tiles")
NO_AMX_TARGET = {"kind": "llvm", "mcpu": "skylake-avx512"}


def test_pieces_add_up_to_the_value() -> None:
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * np.float32(1e3) ** np.random.default_rng(
        1).uniform(-3, 3, 4096).astype(np.float32)
    for pieces, bound in ((2, 2.0 ** -16), (3, 2.0 ** -24)):
        s = A.split_bf16(x, pieces).astype(np.uint32) << 16
        total = s.view(np.float32).astype(np.float64).sum(0)
        assert np.all(np.abs(total - x) <= bound * np.abs(x)), pieces
        # each piece is round-to-nearest-even of the remainder: the first is torch's bf16 rounding
        assert np.array_equal(s[0].view(np.float32), torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def test_packed_weight_is_the_b_tile_layout() -> None:
    spec = A.AmxF32Spec(k=40, n=20, pieces=2)
    w = np.random.default_rng(2).standard_normal((20, 40)).astype(np.float32)
    p = A.prepack(spec, w)
    assert p.shape == (2, spec.np_ // 16, spec.kp // 2, 16, 2) == (2, 2, 32, 16, 2)
    pieces = A.split_bf16(w, 2)
    for n, k in ((0, 0), (19, 39), (17, 3), (5, 38)):
        assert p[1, n // 16, k // 2, n % 16, k % 2] == pieces[1, n, k]
    assert not p[:, 1, :, 4:, :].any() and not p[:, :, 20:, :, :].any(), "padding is zeros"
    torch.testing.assert_close(derive_param({"op": "amx_bf16_pieces", "from": ["w"], "args": {"pieces": 2}},
                                            {"w": torch.from_numpy(w)}), torch.from_numpy(p))


def test_fp32_matmul_is_validated() -> None:
    with pytest.raises(OptionError, match="fp32_matmul"):
        CpuOptions.from_dict({"fp32_matmul": "bf16x4"})
    import tvm

    plain = tvm.target.Target(NO_AMX_TARGET)
    with pytest.raises(LoweringError, match="expected one of"):
        resolve_fp32_matmul("fast", plain)
    assert resolve_fp32_matmul("auto", plain) == "strict"
    assert resolve_fp32_matmul("strict", plain) == "strict"
    with pytest.raises(LoweringError, match="no AMX-BF16 tiles.*fp32_matmul=strict"):
        resolve_fp32_matmul("bf16x6", plain)
    with pytest.raises(LoweringError, match="amx=false"):
        resolve_fp32_matmul("bf16x3", None if not HOST_AMX_BF16 else A._as_target(None), use_amx=False)
    if HOST_AMX_BF16:
        assert resolve_fp32_matmul("auto", A._as_target(None)) == "bf16x6"


@needs_amx_bf16
@pytest.mark.parametrize("mode,gelu,m,k,n", [("bf16x3", False, 37, 72, 40), ("bf16x6", True, 37, 72, 40),
                                             ("bf16x6", False, 5, 16, 16)])  # not whole blocks; one part block
def test_kernel_matches_the_f32_product(mode: str, gelu: bool, m: int, k: int, n: int) -> None:
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    spec = A.AmxF32Spec(k, n, A.MODES[mode], gelu=gelu)
    y = A.run(A.plan(spec), x, A.prepack(spec, w), b)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + b
    if gelu:
        ref = torch.nn.functional.gelu(torch.from_numpy(ref)).numpy()
    scale = np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64) + np.abs(b)
    err = np.abs(y - ref) / scale
    f32_err = np.abs((x @ w.T + b) - (x.astype(np.float64) @ w.T.astype(np.float64) + b)) / scale
    if mode == "bf16x6":  # as accurate as an f32 product (GELU's erf approximation adds < 1.5e-7 abs)
        assert err.max() <= 2 * f32_err.max() + 2e-7, (err.max(), f32_err.max())
    else:
        assert 2.0 ** -20 < err.max() <= 2.0 ** -15, err.max()


def _ffn() -> Module:
    g = torch.Generator().manual_seed(1)
    m = Module("ffn")
    x = m.add_input("x", TensorType((1, "seq", 48), "f32"))
    m.add_param("w1", torch.randn(64, 48, generator=g) * 0.2)
    m.add_param("b1", torch.randn(64, generator=g))
    m.add_param("w2", torch.randn(48, 64, generator=g) * 0.2)

    def n(op: str, ins: list[Any], **attrs: Any) -> Any:
        return m.create_node(op, ins, attrs).output

    h = n("gelu", [n("linear", [x, m.param("w1"), m.param("b1")])])
    m.set_outputs([n("add", [n("linear", [h, m.param("w2")]), x])])
    return m


@needs_amx_bf16
def test_any_length_module_on_amx_matches_the_interpreter(tmp_path: Path) -> None:
    m = _ffn()
    comp = compile_module(m, options=BuildOptions(params="input", fp32_matmul="bf16x6"))
    assert comp.meta["fp32_matmul"] == "bf16x6" and comp.meta["amx_kernels"] == 2
    # 3 bf16 pieces of the [64, 48] and [48, 64] weights, both padded to 64 x 64, in place of their f32 values
    assert comp.meta["amx_f32_added_bytes"] == 2 * (3 * 2 * 64 * 64 - 4 * 64 * 48)
    bound = {p["name"] for p in comp.meta["params"]}
    assert {"w1::bf16p3", "w2::bf16p3"} <= bound and "w1::T" not in bound, bound
    comp.export(tmp_path, weights="derived")  # the pieces are rebuilt from the module's parameters at load
    lib = load_compiled(tmp_path, module_params=m.params, threads=1)
    for seq in (5, 40):
        x = torch.randn(1, seq, 48, generator=torch.Generator().manual_seed(seq))
        torch.testing.assert_close(lib(x)[0], interpret(m, [x])[0], rtol=1e-5, atol=1e-5)


def test_strict_and_no_amx_targets_keep_the_f32_kernels() -> None:
    from ctc.backends.tvm import targets as T

    m = _ffn()
    strict = compile_module(m, options=BuildOptions(fp32_matmul="strict", static_dims={"seq": 8}))
    assert strict.meta["fp32_matmul"] == "strict" and strict.meta["amx_kernels"] == 0
    info = T.TargetInfo("cpu", NO_AMX_TARGET, 1)
    plain = compile_module(m, target=info, options=BuildOptions(static_dims={"seq": 8}))
    assert plain.meta["fp32_matmul"] == "strict"
    assert any("fp32_matmul=auto" in note and "no AMX-BF16" in note for note in plain.meta["notes"])
