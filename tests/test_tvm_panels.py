"""CPU linears read parameter weights packed in column panels (``[N / W, K, W]``, W = the matmul
tile's width): same results as the reference interpreter, one bound copy per weight, derivable from
the module's parameters, and the ``[K, N]`` layout kept where packing does not apply (the strict f32
kernels: ``fp32_matmul="strict"``; AMX-BF16 hosts otherwise run the linears of tests/test_amx_f32.py)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("tvm")

from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled  # noqa: E402
from ctc.backends.tvm.lower import derive_param  # noqa: E402
from ctc.ir import Module, TensorType  # noqa: E402
from ctc.ir.interpreter import interpret  # noqa: E402


def _ffn(n_hidden: int, *, tied: bool = False, batch: int | str = 1) -> Module:
    """x -> linear(+bias) -> GELU -> linear(+bias) + x (a transformer FFN with its residual); ``tied``: the
    first weight is also read by an embedding of token ids (a tied embedding / LM head); ``batch``: the
    leading dim (``"batch"``: symbolic, as in every exported encoder)."""
    g = torch.Generator().manual_seed(1)
    m = Module("ffn")
    x = m.add_input("x", TensorType((batch, "seq", 32), "f32"))
    m.add_param("w1", torch.randn(n_hidden, 32, generator=g) * 0.2)
    m.add_param("b1", torch.randn(n_hidden, generator=g))
    m.add_param("w2", torch.randn(32, n_hidden, generator=g) * 0.2)
    m.add_param("b2", torch.randn(32, generator=g))

    def n(op: str, ins: list[Any], **attrs: Any) -> Any:
        return m.create_node(op, ins, attrs).output

    h = n("gelu", [n("linear", [x, m.param("w1"), m.param("b1")])])
    y = n("add", [n("linear", [h, m.param("w2"), m.param("b2")]), x])
    outs = [y]
    if tied:
        ids = m.add_input("ids", TensorType((1, "seq"), "i64"))
        outs.append(n("embedding", [ids, m.param("w1")]))
    m.set_outputs(outs)
    return m


def _bound(comp: Any) -> dict[str, list[int]]:
    return {p["name"]: p["shape"] for p in comp.meta["params"]}


@pytest.mark.parametrize("seq", [5, 13, 16])
def test_packed_linears_match_the_interpreter(seq: int, tmp_path: Path) -> None:
    m = _ffn(64)
    comp = compile_module(m, options=BuildOptions(params="input", static_dims={"seq": seq}, fp32_matmul="strict"))
    bound = _bound(comp)
    panel = [k for k in bound if k.startswith("w1::P")]
    assert panel, f"the 64-wide linear weight is bound in panels: {bound}"
    width = int(panel[0].split("::P")[1])
    assert bound[panel[0]] == [64 // width, 32, width]
    comp.export(tmp_path, weights="derived")  # rebuilt from the module's parameters at load: the derivation
    lib = load_compiled(tmp_path, module_params=m.params, threads=1)
    x = torch.randn(1, seq, 32, generator=torch.Generator().manual_seed(seq))
    torch.testing.assert_close(lib(x)[0], interpret(m, [x])[0], rtol=1e-4, atol=2e-5)


def test_panel_derivation_is_the_layout_the_kernel_reads() -> None:
    w = torch.arange(64 * 3, dtype=torch.float32).reshape(64, 3)  # [N, K]
    p = derive_param({"op": "panels32", "from": ["w"]}, {"w": w})
    assert p.shape == (2, 3, 32)
    for n in (0, 31, 32, 63):
        for k in range(3):
            assert p[n // 32, k, n % 32] == w[n, k]


def test_weights_read_elsewhere_or_narrow_keep_the_plain_layout() -> None:
    fixed = BuildOptions(params="input", static_dims={"seq": 8}, fp32_matmul="strict")
    tied = compile_module(_ffn(64, tied=True), options=fixed)
    assert not any("::P" in k for k in _bound(tied) if k.startswith("w1")), "a tied weight is bound once, as [K, N]"
    narrow = compile_module(_ffn(24), options=fixed)  # 24 columns
    assert "w1::T" in _bound(narrow)


def test_any_length_linears_read_panels_and_match_the_interpreter(tmp_path: Path) -> None:
    """An any-length build (symbolic rows) packs the same panels as a fixed one, and is right for row
    counts that are and are not whole register tiles (the clamped rows past the end are dropped)."""
    m = _ffn(64)
    comp = compile_module(m, options=BuildOptions(params="input", fp32_matmul="strict"))
    assert any(k.startswith("w1::P") for k in _bound(comp)) and any(k.startswith("w2::P") for k in _bound(comp))
    comp.export(tmp_path, weights="derived")
    lib = load_compiled(tmp_path, module_params=m.params, threads=2)
    for seq in (1, 5, 8, 13, 16, 40):
        x = torch.randn(1, seq, 32, generator=torch.Generator().manual_seed(seq))
        torch.testing.assert_close(lib(x)[0], interpret(m, [x])[0], rtol=1e-4, atol=2e-5)


def test_any_length_panel_matmul_copies_no_operand() -> None:
    """With symbolic rows the panel matmul computes whole row tiles itself: its scheduled kernel has the
    register tile and the fused epilogue but no padded copy of the activations or of the result
    (``pad_einsum``'s ``*_pad`` buffers), as in a fixed-length build."""
    from ctc.backends.tvm.build import relax_passes, schedule_defaults
    from ctc.backends.tvm.lower import lower
    from ctc.backends.tvm.targets import resolve

    tgt = resolve("cpu").target()
    low = lower(_ffn(64), params="const", target=tgt, fp32_matmul="strict")
    with tgt:
        mod = schedule_defaults(relax_passes(tgt)(low.mod), tgt)
    kernels = {gv.name_hint: f.script() for gv, f in mod.functions.items()
               if hasattr(f, "body") and not hasattr(f, "ret_struct_info") and gv.name_hint != "main"}
    mm = {n: t for n, t in kernels.items() if "matmul_panels" in t}
    assert len(mm) == 2, sorted(kernels)
    for name, text in mm.items():
        assert "_pad" not in text, f"{name} copies a padded operand:\n{text}"
        assert "T.parallel" in text and "T.vectorized" in text, f"{name} is not the register-tiled schedule"


@pytest.mark.parametrize("seq", [None, 13, 16])
def test_symbolic_batch_linears_read_panels_and_match_the_interpreter(seq: int | None, tmp_path: Path) -> None:
    """A symbolic batch dim (an encoder's ``[batch, seq, K]``, fixed or any sequence length) packs the panels
    too, and is right for several batch sizes and row counts that are and are not whole register tiles."""
    m = _ffn(64, batch="batch")
    comp = compile_module(m, options=BuildOptions(params="input", fp32_matmul="strict",
                                                  static_dims={"seq": seq} if seq else None))
    assert any(k.startswith("w1::P") for k in _bound(comp)) and any(k.startswith("w2::P") for k in _bound(comp))
    comp.export(tmp_path, weights="derived")
    lib = load_compiled(tmp_path, module_params=m.params, threads=2)
    for batch in (1, 3):
        for rows in ((seq,) if seq else (5, 16)):
            x = torch.randn(batch, rows, 32, generator=torch.Generator().manual_seed(batch * rows))
            torch.testing.assert_close(lib(x)[0], interpret(m, [x])[0], rtol=1e-4, atol=2e-5)


def test_symbolic_shape_build_keeps_buffer_alias_info() -> None:
    """A build with a symbolic dim has the VM's ``shape_func`` beside its kernels; it is marked ``noalias``
    so LLVM gets per-buffer TBAA tags for every kernel, not the catch-all ``tvm-alias`` tag (with it, the
    matmul stored its 16 accumulators after every FMA: 2.5x slower)."""
    comp = compile_module(_ffn(64, batch="batch"), options=BuildOptions(params="input", fp32_matmul="strict"))
    mod = comp.executable.mod
    sources = [m.inspect_source("ll") for m in mod.imports if m.kind == "llvm"]
    assert sources and all("fused_matmul" not in s or '"tvm-alias"' not in s for s in sources)
    assert any("fused_matmul" in s for s in sources)


@pytest.mark.parametrize("batch", [1, "batch"])
def test_fixed_rows_not_whole_tiles_are_scheduled(batch: int | str) -> None:
    """A fixed row count that is not whole register tiles (13 = 8 + 5, no 7s or 6s) is computed in whole
    tiles by the panel linear (clamped rows), so the matmul schedule applies; padding cannot read panels,
    and the kernel was left unscheduled (~80x slower)."""
    from ctc.backends.tvm.build import relax_passes, schedule_defaults
    from ctc.backends.tvm.lower import lower
    from ctc.backends.tvm.targets import resolve

    tgt = resolve("cpu").target()
    low = lower(_ffn(64, batch=batch), params="const", target=tgt, fp32_matmul="strict", static_dims={"seq": 13})
    with tgt:
        mod = schedule_defaults(relax_passes(tgt)(low.mod), tgt)
    mm = {gv.name_hint: f.script() for gv, f in mod.functions.items()
          if hasattr(f, "body") and not hasattr(f, "ret_struct_info") and "matmul_panels" in f.script()}
    assert len(mm) == 2, sorted(mm)
    for name, text in mm.items():
        assert "T.parallel" in text and "T.vectorized" in text and "_pad" not in text, f"{name}:\n{text}"


def test_small_register_tiles_accumulate_on_the_stack() -> None:
    """A 7-row tile (a 7x7 plane's 49 rows) is under 1 KB: its accumulator is a "global" buffer (a stack
    array, registers after SROA), not a "local" one (TVM's workspace pool: an alloc, memset and free per tile)."""
    from ctc.backends.tvm.build import relax_passes, schedule_defaults
    from ctc.backends.tvm.lower import lower
    from ctc.backends.tvm.targets import resolve

    tgt = resolve("cpu").target()
    low = lower(_ffn(64), params="const", target=tgt, fp32_matmul="strict", static_dims={"seq": 49})
    with tgt:
        mod = schedule_defaults(relax_passes(tgt)(low.mod), tgt)
    mm = [f.script() for f in mod.functions.values()
          if hasattr(f, "body") and not hasattr(f, "ret_struct_info") and "matmul_panels" in f.script()]
    assert len(mm) == 2
    from ctc.backends.tvm.schedules import vector_lanes

    rows = 7 if vector_lanes(tgt) == 16 else 6  # AVX2's 16 ymm hold 6 x 2 accumulators, not 7 x 2: 54 rows padded
    for text in mm:
        assert f"T.unroll(T.int64({rows}))" in text and 'scope="local"' not in text, text


def test_one_kilobyte_register_tiles_accumulate_on_the_stack(tmp_path: Path) -> None:
    """The encoders' 8 x 32 f32 tile is exactly 1 KB, TVM's stack limit: ``build.stack_small_buffers`` keeps the
    accumulator an ``alloca`` (no ``TVMBackendAllocWorkspace`` + ``memset`` +
    ``Free`` per tile: 3-5% of the kernel), with the interpreter's results."""
    m = _ffn(64)
    comp = compile_module(m, options=BuildOptions(params="input", static_dims={"seq": 16}, fp32_matmul="strict"))
    sources = [s.inspect_source("ll") for s in comp.executable.mod.imports if s.kind == "llvm"]
    assert any("fused_matmul" in s for s in sources)
    assert all("TVMBackendAllocWorkspace" not in s for s in sources)
    comp.export(tmp_path)
    x = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(load_compiled(tmp_path)(x)[0], interpret(m, [x])[0], rtol=1e-4, atol=2e-5)


def _siblings(n_out: int, batch: int | str = 1) -> Module:
    """x -> three linears of ``n_out`` outputs reading x (an attention's q, k and v: merged into one GEMM whose
    result is ``[3, rows, n_out]``) -> their sum."""
    g = torch.Generator().manual_seed(2)
    m = Module("qkv")
    x = m.add_input("x", TensorType((batch, "seq", 32), "f32"))
    outs = []
    for name in "qkv":
        m.add_param(f"w{name}", torch.randn(n_out, 32, generator=g) * 0.2)
        m.add_param(f"b{name}", torch.randn(n_out, generator=g))
        outs.append(m.create_node("linear", [x, m.param(f"w{name}"), m.param(f"b{name}")], {}).output)
    s = m.create_node("add", [outs[0], outs[1]], {}).output
    m.set_outputs([m.create_node("add", [s, outs[2]], {}).output])
    return m


def _matmul_fmas_reading_the_stack(comp: Any) -> tuple[int, int]:
    """(f32 FMAs of the matmul kernels, those with an operand on the stack: an accumulator tile that stayed a
    stack array and is loaded and stored around every FMA) in the x86 assembly of ``comp``."""
    fmas = on_stack = 0
    for src in (s.inspect_source("asm") for s in comp.executable.mod.imports if s.kind == "llvm"):
        in_matmul = False
        for line in src.splitlines():
            if line and not line[0].isspace() and line.endswith(":") and not line.startswith("."):
                in_matmul = "matmul" in line
            elif in_matmul and "vfmadd" in line and "ps" in line.split()[0]:
                fmas += 1
                on_stack += "(%rsp" in line
    return fmas, on_stack


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="reads x86 assembly")
@pytest.mark.parametrize(("model", "n_out"), [("siblings", 384), ("siblings", 32), ("ffn", 64)])
def test_any_length_register_tiles_stay_in_registers(model: str, n_out: int, tmp_path: Path) -> None:
    """Symbolic rows (an any-length build): the accumulator tile of every matmul is registers, not a stack array
    indexed through the symbolic tile count (the merged q|k|v GEMM of MiniLM ran 2.6x slower than the fixed
    build's that way), for merged sibling linears with many and with few output panels and for a symbolic
    batch; results equal the interpreter's for row counts that are and are not whole tiles."""
    m = _siblings(n_out, batch="batch") if model == "siblings" else _ffn(n_out, batch="batch")
    comp = compile_module(m, options=BuildOptions(params="input", fp32_matmul="strict"))
    fmas, on_stack = _matmul_fmas_reading_the_stack(comp)
    assert fmas > 0 and on_stack == 0, f"{on_stack} of {fmas} matmul FMAs read an accumulator on the stack"
    comp.export(tmp_path, weights="derived")
    lib = load_compiled(tmp_path, module_params=m.params, threads=2)
    for seq in (1, 5, 13, 40):
        x = torch.randn(1, seq, 32, generator=torch.Generator().manual_seed(seq))
        torch.testing.assert_close(lib(x)[0], interpret(m, [x])[0], rtol=1e-4, atol=5e-5)


def test_gelu_keeps_fp32_accuracy_over_a_dense_sweep(tmp_path: Path) -> None:
    """The f32 erf-GELU (fast math: TVM's rational erf) against float64 torch over 2^20 points of [-12, 12] (and
    0, +-4, +-1e-30): within about the error of torch's own f32 GELU (1.2e-6 absolute; this 1.5e-6)."""
    x = torch.cat([torch.linspace(-12.0, 12.0, 1 << 20), torch.tensor([0.0, 4.0, -4.0, 1e-30, -1e-30])])
    m = Module("gelu")
    xv = m.add_input("x", TensorType((1, x.numel()), "f32"))
    m.set_outputs([m.create_node("gelu", [xv], {}).output])
    comp = compile_module(m, options=BuildOptions(params="input"))
    comp.export(tmp_path)
    got = load_compiled(tmp_path)(x[None])[0][0].double()
    ref = torch.nn.functional.gelu(x.double())
    err = (got - ref).abs()
    assert float(err.max()) <= 2e-6, float(err.max())
    big = ref.abs() >= 1
    assert float((err[big] / ref[big].abs()).max()) <= 8 * 2.0 ** -24  # torch f32: 6.3, this: 4.4 (2^-24 units)
