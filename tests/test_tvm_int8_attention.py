"""int8 prefill attention on VNNI (``attention_bits=8``, ctc/backends/tvm/attention_kernels.py).

The kernel is compared with a numpy reference of the same quantization (q, k per row, v per channel,
symmetric int8; probabilities ``exp(s - max)`` as int16 codes ``round(32767 p)``; int32 products): the
integer products are exact, so the outputs agree to f32 rounding except where the kernel's polynomial
exp and numpy's put a probability code on the other side of a rounding tie.  Also: the kernel is built
on ``vpdpbusd`` (q k^T) and ``vpdpwssd`` (p v) and reads k and v as stored; the option is validated; a
tiny captured BERT compiled with it stays close to eager.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from test_tvm_attention_kernel import _module  # noqa: E402

from ctc.backends.tvm import lower as L  # noqa: E402
from ctc.backends.tvm.build import BuildOptions, compile_module  # noqa: E402
from ctc.backends.tvm.int_kernels import target_has_vnni  # noqa: E402
from ctc.backends.tvm.lower import LoweringError  # noqa: E402
from ctc.ir import Module, TensorType  # noqa: E402
from ctc.ir.interpreter import interpret  # noqa: E402
from ctc.options import OptionError  # noqa: E402
from ctc.targets import CpuOptions  # noqa: E402

needs_vnni = pytest.mark.skipif(not target_has_vnni(), reason="the CPU has no AVX512-VNNI")
F = np.float32


def _inputs(heads: int, kv_heads: int, dim: int, s: int, mask: str | None, seed: int) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    xs = [(g.standard_normal((2, h, s, dim)) * 2).astype(F) for h in (heads, kv_heads, kv_heads)]
    if mask == "bool":  # padded tokens at the end of the second sequence, as a tokenizer's mask gives
        valid = np.ones((2, s), bool)
        valid[1, s - s // 3:] = False
        xs.append(np.ascontiguousarray(np.broadcast_to(valid[:, None, None, :], (2, 1, s, s))))
    elif mask == "float":
        xs.append(np.where(g.random((2, 1, 1, s)) < 0.3, F(-1e4), F(0)).astype(F))
    return xs


def _quant(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes and scales along ``axis`` (the kernel's arithmetic: ``x * (1 / s)``, rounded to even)."""
    s = (np.abs(x).max(axis=axis, keepdims=True) / F(127)).astype(F)
    s = np.where(s <= 0, F(1), s).astype(F)
    return np.clip(np.rint(x * (F(1) / s)), -127, 127).astype(np.int64), s


def int8_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None, causal: bool
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's quantized attention in numpy: (output, the int32 scores ``q codes . k codes``)."""
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    qc, qs = _quant(q, -1)
    kc, ks = _quant(k, -1)
    vc, vs = _quant(v, -2)
    scores = qc @ np.swapaxes(kc, -1, -2)
    s = (scores.astype(F) * np.swapaxes(ks, -1, -2)) * (qs * F(1 / math.sqrt(q.shape[-1])))
    if mask is not None:
        s = np.where(mask, s, F(-np.inf)) if mask.dtype == bool else s + mask
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, F(-np.inf))
    p = np.exp(s - s.max(-1, keepdims=True))
    pc = np.rint(p * F(32767)).astype(np.int64)
    return ((pc @ vc).astype(F) * vs / pc.sum(-1, keepdims=True).astype(F)).astype(F), scores


CASES = {  # heads, kv heads, dim, seq (symbol "s": run at the lengths below), mask, causal
    "fixed-64-bool-mask": (2, 2, 32, 64, "bool", False),
    "fixed-20-float-mask-padded": (2, 2, 16, 20, "float", False),
    "any-length-bool-mask": (3, 3, 32, "s", "bool", False),
    "any-length-causal-gqa-d64": (4, 2, 64, "s", None, True),
}


@needs_vnni
@pytest.mark.parametrize("name", list(CASES))
def test_int8_attention_matches_the_integer_reference(name: str) -> None:
    import tvm
    from tvm import relax

    heads, kv_heads, dim, seq, mask, causal = CASES[name]
    m = _module(heads, kv_heads, dim, seq, mask, causal)
    script = L.lower(m, attention_bits=8).mod.script()  # the target: this host
    assert "vpdpbusd" in script and "vpdpwssd" in script and "_i8_" in script  # the int8 kernel, on VNNI
    assert "permute_dims" not in script and "key_pad" not in script  # k read as stored, never padded
    vm = relax.VirtualMachine(compile_module(m, options=BuildOptions(attention_bits=8)).executable, tvm.cpu())
    for s in ([seq] if isinstance(seq, int) else [5, 37, 600]):  # 600: p v in two chunks of int32 sums
        xs = _inputs(heads, kv_heads, dim, s, mask, seed=s)
        want, scores = int8_reference(*xs[:3], xs[3] if mask else None, causal)
        assert np.abs(scores).max() < 2**31 and scores.dtype == np.int64  # exact: int32 sums of int8 products
        got = vm["main"](*[tvm.runtime.tensor(x) for x in xs]).numpy()
        err = np.abs(got - want)
        assert float(np.median(err)) < 1e-5, name  # the same quantization, to f32 rounding
        assert float(err.max()) < 1e-3 * float(np.abs(xs[2]).max()), name  # a probability code off by one at most
        exact = torch.nn.functional.scaled_dot_product_attention(
            *(torch.from_numpy(x) for x in xs[:3]), attn_mask=torch.from_numpy(xs[3]) if mask else None,
            is_causal=causal, enable_gqa=heads != kv_heads).numpy()
        cos = float((got * exact).sum() / np.linalg.norm(got) / np.linalg.norm(exact))
        assert cos > 0.999, (name, cos)


@needs_vnni
def test_long_rows_of_equal_scores_do_not_overflow_the_int32_sums() -> None:
    import tvm
    from tvm import relax

    m = _module(1, 1, 16, "s", None, False)
    vm = relax.VirtualMachine(compile_module(m, options=BuildOptions(attention_bits=8)).executable, tvm.cpu())
    s = 1100  # every p code 32767 and every v code 127: 32767 * 127 * 1100 > 2^31, summed in chunks
    q = np.random.default_rng(0).standard_normal((2, 1, s, 16)).astype(F)
    k, v = np.zeros((2, 1, s, 16), F), np.full((2, 1, s, 16), 3.0, F)
    got = vm["main"](*[tvm.runtime.tensor(x) for x in (q, k, v)]).numpy()
    np.testing.assert_allclose(got, v, rtol=1e-6)


@needs_vnni
def test_auto_attention_bits_is_int8_for_w8a8_models_only() -> None:
    from tiny_transformers import outlier_inputs, tiny_transformer

    from ctc.passes import PassContext, get_pass

    m = tiny_transformer("bert", d=64, heads=4, batch=1, seq=8, layers=2, seed=1)
    cal = outlier_inputs(m, 2, seed=1)
    q = get_pass("rptq")({"w_bits": 8, "a_bits": 8, "clusters": 2}).run(m, PassContext(calibration=cal))
    f32 = L.lower(tiny_transformer("bert", d=64, heads=4, batch=1, seq=8, layers=2, seed=1))
    w8a8 = L.lower(q)  # attention_bits=0: auto
    assert "_i8_" in w8a8.mod.script() and any("attention_bits=8: 2 attention(s)" in n for n in w8a8.notes)
    assert "_i8_" not in f32.mod.script() and "ctc_attention" in f32.mod.script()
    assert "_i8_" not in L.lower(q, attention_bits=32).mod.script()


def test_int8_attention_needs_vnni_else_f32_with_a_note() -> None:
    import tvm

    m = _module(2, 2, 32, 64, "bool", False)
    low = L.lower(m, target=tvm.target.Target({"kind": "llvm", "mcpu": "skylake"}), attention_bits=8)
    assert "_i8_" not in low.mod.script() and "ctc_attention" in low.mod.script()
    assert any("no AVX512-VNNI" in n for n in low.notes)


def test_attention_bits_is_validated() -> None:
    with pytest.raises(OptionError, match="attention_bits"):
        CpuOptions.from_dict({"attention_bits": 4})
    assert CpuOptions.from_dict({"attention_bits": 8}).attention_bits == 8
    assert CpuOptions().attention_bits == 0  # auto
    with pytest.raises(LoweringError, match="attention_bits=16"):
        L.lower(_module(2, 2, 32, 8, None, False), attention_bits=16)


@needs_vnni
def test_tiny_bert_with_int8_attention_stays_close_to_eager(tmp_path: Path) -> None:
    import transformers

    from ctc.backends.tvm.build import load_compiled
    from ctc.frontends import capture

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=96, max_position_embeddings=128)
    model = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids, am = torch.randint(0, 64, (1, 9), generator=g), torch.ones(1, 9, dtype=torch.long)
    m = capture(model, {"input_ids": ids, "attention_mask": am}, output="last_hidden_state")
    comp = compile_module(m, options=BuildOptions(attention_bits=8))
    assert any("attention_bits=8: 2 attention(s)" in n for n in comp.meta["notes"])
    comp.export(tmp_path)
    run = load_compiled(tmp_path)
    for seq in (9, 40):
        ids = torch.randint(0, 64, (1, seq), generator=g)
        am = torch.ones(1, seq, dtype=torch.long)
        am[0, seq - 3:] = 0  # padding: masked keys
        with torch.no_grad():
            eager = model(input_ids=ids, attention_mask=am).last_hidden_state
        got = run(ids, am)[0]
        cos = float(torch.nn.functional.cosine_similarity(got.flatten(), eager.flatten(), dim=0))
        assert cos > 0.999, (seq, cos)


def _heads_module(merged: bool, seq: int | str, kv_heads: int = 4, causal: bool = False) -> Module:
    """x -> q, k, v ([2, s, 64], from three linears when ``merged``, else three inputs; k and v ``kv_heads`` * 16
    wide) split into heads of 16 and swapped to [2, heads, s, 16], attention, swapped back and merged: the layout
    a captured encoder (or, with fewer kv heads and causal, a decoder without RoPE) has."""
    m = Module("heads")
    g = torch.Generator().manual_seed(3)
    widths = {"q": 64, "k": 16 * kv_heads, "v": 16 * kv_heads}
    if merged:
        x = m.add_input("x", TensorType((2, seq, 64), "f32"))
        qkv = []
        for n in "qkv":
            w = m.param(m.add_param(f"{n}.weight", torch.randn(widths[n], 64, generator=g) / 8))
            b = m.param(m.add_param(f"{n}.bias", torch.randn(widths[n], generator=g) / 8))
            qkv.append(m.create_node("linear", {"x": x, "weight": w, "bias": b}).output)
    else:
        qkv = [m.add_input(n, TensorType((2, seq, widths[n]), "f32")) for n in "qkv"]
    heads = []
    for t, n in zip(qkv, "qkv", strict=True):
        r = m.create_node("reshape", [t], {"shape": [2, seq, widths[n] // 16, 16]}).output
        heads.append(m.create_node("transpose", [r], {"dim0": 1, "dim1": 2}).output)
    y = m.create_node("scaled_dot_product_attention", dict(zip("qkv", heads, strict=True)),
                      {"is_causal": causal, "scale": None, "enable_gqa": kv_heads != 4}).output
    y = m.create_node("transpose", [y], {"dim0": 1, "dim1": 2}).output
    m.set_outputs([m.create_node("reshape", [y], {"shape": [2, seq, 64]}).output])
    return m


@needs_vnni
@pytest.mark.parametrize("case", ["separate-inputs", "merged-qkv-linear", "gqa-causal"])
@pytest.mark.parametrize("seq", [37, "s"], ids=["fixed", "any-length"])
def test_int8_attention_reads_the_heads_untransposed(case: str, seq: int | str) -> None:
    """q, k and v split into heads and swapped to [B, H, S, D]: the kernel reads them as the linears wrote them
    (layout "bshd", or "qkv" straight from a merged q|k|v linear's part-major output) and writes [B, S, H, D],
    so no head transpose (nor split of the parts) is left after dead-code elimination; the numbers match the
    integer reference (two kv heads for four query heads, causal, in the GQA case)."""
    import tvm
    from tvm import relax

    from ctc.backends.tvm.int_kernels import host_target

    merged, kv, causal = case == "merged-qkv-linear", 2 if case == "gqa-causal" else 4, case == "gqa-causal"
    m = _heads_module(merged, seq, kv, causal)
    mod = relax.transform.DeadCodeElimination()(L.lower(m, attention_bits=8, target=host_target()).mod)
    script = mod.script()
    assert ("_i8_qkv_" if merged else "_i8_bshd_") in script, script
    assert "permute_dims" not in script and "split_heads" not in script and "transpose" not in script, script
    vm = relax.VirtualMachine(compile_module(m, options=BuildOptions(attention_bits=8)).executable, tvm.cpu())
    for s in ([seq] if isinstance(seq, int) else [5, 40]):
        g = np.random.default_rng(s)
        xs = [g.standard_normal((2, s, 64)).astype(F)] if merged else \
            [g.standard_normal((2, s, w)).astype(F) for w in (64, 16 * kv, 16 * kv)]
        got = vm["main"](*[tvm.runtime.tensor(x) for x in xs]).numpy()
        if merged:
            want = interpret(m, [torch.from_numpy(xs[0])])[0].numpy()
            cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
            assert cos > 0.9995, (s, cos)
            continue
        heads = [np.ascontiguousarray(x.reshape(2, s, -1, 16).transpose(0, 2, 1, 3)) for x in xs]
        want = int8_reference(*heads, None, causal)[0].transpose(0, 2, 1, 3).reshape(2, s, 64)
        err = np.abs(got - want)
        assert float(np.median(err)) < 1e-5 and float(err.max()) < 1e-3 * float(np.abs(xs[2]).max()), s


@needs_vnni
def test_a_fourth_sibling_linear_keeps_the_separate_heads_layout() -> None:
    """Four same-shape linears of one input merge into one part-major GEMM of 4 parts; the attention over three of
    them is not the 3-part "qkv" layout then (the build failed on the part count), but reads its heads ("bshd")."""
    import tvm
    from tvm import relax

    from ctc.backends.tvm.int_kernels import host_target

    m = _heads_module(True, 37)
    x = m.inputs[0]
    g = torch.Generator().manual_seed(5)
    w = m.param(m.add_param("extra.weight", torch.randn(64, 64, generator=g) / 8))
    b = m.param(m.add_param("extra.bias", torch.randn(64, generator=g) / 8))
    extra = m.create_node("linear", {"x": x, "weight": w, "bias": b}).output
    out = m.create_node("add", [m.outputs[0], extra]).output
    m.set_outputs([out])
    script = L.lower(m, attention_bits=8, target=host_target()).mod.script()
    assert "_i8_bshd_" in script and "_i8_qkv_" not in script
    vm = relax.VirtualMachine(compile_module(m, options=BuildOptions(attention_bits=8)).executable, tvm.cpu())
    xs = np.random.default_rng(0).standard_normal((2, 37, 64)).astype(F)
    got = vm["main"](tvm.runtime.tensor(xs)).numpy()
    want = interpret(m, [torch.from_numpy(xs)])[0].numpy()
    assert float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)) > 0.9995
