"""The fused CPU attention kernel (ctc/backends/tvm/attention_kernels.py) computes what the interpreter does.

Small shapes, each built once: fixed and symbolic sequence lengths, row counts that are not whole
row blocks and key lengths that are not whole key blocks (padded and masked in the kernel), a
bool mask ``[B, 1, S, S]`` (BERT's), an additive ``[B, 1, 1, S]`` mask, causal attention with
grouped kv heads; and the shapes the kernel does not take (a head dim that is not whole vectors)
keep the op-by-op path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from ctc.backends.tvm import lower as L  # noqa: E402
from ctc.backends.tvm.build import BuildOptions, compile_module  # noqa: E402
from ctc.ir import Module, TensorType  # noqa: E402
from ctc.ir.interpreter import interpret  # noqa: E402


def _module(heads: int, kv_heads: int, dim: int, seq: int | str, mask: str | None, causal: bool) -> Module:
    m = Module("attn")
    q = m.add_input("q", TensorType((2, heads, seq, dim), "f32"))
    k = m.add_input("k", TensorType((2, kv_heads, seq, dim), "f32"))
    v = m.add_input("v", TensorType((2, kv_heads, seq, dim), "f32"))
    ops = {"q": q, "k": k, "v": v}
    if mask == "bool":
        ops["mask"] = m.add_input("mask", TensorType((2, 1, seq, seq), "bool"))
    elif mask == "float":
        ops["mask"] = m.add_input("mask", TensorType((2, 1, 1, seq), "f32"))
    y = m.create_node("scaled_dot_product_attention", ops, {"is_causal": causal, "scale": None,
                                                            "enable_gqa": heads != kv_heads})
    m.set_outputs([y.output])
    return m


def _inputs(heads: int, kv_heads: int, dim: int, s: int, mask: str | None, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, h, s, dim, generator=g) * 2 for h in (heads, kv_heads, kv_heads)]
    if mask == "bool":  # padded tokens at the end of the second sequence, as a tokenizer's mask gives
        valid = torch.ones(2, s, dtype=torch.bool)
        valid[1, s - s // 3:] = False
        xs.append(valid[:, None, None, :].expand(2, 1, s, s).contiguous())
    elif mask == "float":
        xs.append(torch.where(torch.rand(2, 1, 1, s, generator=g) < 0.3, -1e4, 0.0))
    return xs


CASES = {  # heads, kv heads, dim, seq (symbol "s": run at the lengths below), mask, causal
    "fixed-20-no-mask": (2, 2, 16, 20, None, False),
    "any-length-bool-mask": (3, 3, 32, "s", "bool", False),
    "fixed-64-float-mask": (2, 2, 16, 64, "float", False),
    "any-length-causal-gqa": (4, 2, 16, "s", None, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fused_attention_matches_interpreter(name: str) -> None:
    import tvm
    from tvm import relax

    heads, kv_heads, dim, seq, mask, causal = CASES[name]
    m = _module(heads, kv_heads, dim, seq, mask, causal)
    script = L.lower(m).mod.script()
    assert "ctc_attention" in script  # the fused kernel, not three
    assert "value_pad" not in script  # values are read unpadded, whatever the key length
    vm = relax.VirtualMachine(compile_module(m, options=BuildOptions()).executable, tvm.cpu())
    for s in ([seq] if isinstance(seq, int) else [5, 37]):
        xs = _inputs(heads, kv_heads, dim, s, mask, seed=s)
        ref = interpret(m, xs)[0]
        got = torch.from_numpy(vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x.numpy())) for x in xs]).numpy())
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_every_row_tile_matches_interpreter(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The row tile follows the target (8 with AVX-512, 2 with AVX2); any tile computes the same attention,
    including the clamped last block of a length that is not whole tiles (20 rows, 5 and 37 in any-length)."""
    import tvm
    from tvm import relax

    from ctc.backends.tvm import attention_kernels

    monkeypatch.setattr(attention_kernels, "attention_rows", lambda lanes: rows)
    for name in ("fixed-20-no-mask", "any-length-causal-gqa"):
        heads, kv_heads, dim, seq, mask, causal = CASES[name]
        m = _module(heads, kv_heads, dim, seq, mask, causal)
        vm = relax.VirtualMachine(compile_module(m, options=BuildOptions()).executable, tvm.cpu())
        for s in ([seq] if isinstance(seq, int) else [5, 37]):
            xs = _inputs(heads, kv_heads, dim, s, mask, seed=s)
            got = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x.numpy())) for x in xs]).numpy()
            torch.testing.assert_close(torch.from_numpy(got), interpret(m, xs)[0], rtol=1e-4, atol=2e-5)


def test_head_dim_not_whole_vectors_keeps_the_op_by_op_path() -> None:
    m = _module(2, 2, 8, "s", "bool", False)
    script = L.lower(m).mod.script()
    assert "ctc_attention" not in script and "softmax" in script


@pytest.mark.parametrize("seq", [384, None])
def test_kernel_keeps_whole_vectors(seq: int | None) -> None:
    """MiniLM's attention (12 heads of 32, a ``[B, 1, S, S]`` bool mask), fixed and any length, compiles to
    whole-register code: no lane-by-lane vector rebuilds (``vinsertps``/``vpextrq``, which 16-lane accesses of
    the 32-lane score tile made LLVM emit: 79 of them at seq 384) and a ``p v`` loop unrolled over keys."""
    import tvm

    from ctc.backends.tvm.attention_kernels import PV_UNROLL, AttentionSpec, attention_kernel
    from ctc.backends.tvm.int_kernels import host_target

    tgt = host_target()
    if not tvm.target.codegen.target_has_features(["avx512f"], tgt):
        pytest.skip("the register tiles are sized for AVX-512")
    spec = AttentionSpec(heads=12, kv_heads=12, dim=32, scale=32 ** -0.5, causal=False, mask="bool",
                         mask_dims=(True, False, True), padded=seq is None, seq=seq, keys=seq)
    lib = tvm.compile(tvm.IRModule({"attn": attention_kernel(spec).with_attr("global_symbol", "attn")}), target=tgt)
    asm = lib.mod.inspect_source("asm")
    assert "vinsertps" not in asm and "vpextrq" not in asm
    # FMAs: the 8 x 32 score tile's 16 and PV_UNROLL steps of the 8 x 32 output tile's 16, at least
    assert asm.count("vfmadd231ps") >= 16 * (1 + PV_UNROLL)


def test_any_length_padded_key_transpose_runs_in_column_tiles() -> None:
    """An any-length build pads the keys to whole 32-key panels and transposes them (``k^T``, ``[B, H, D, Lp]``
    with ``Lp = (L + 31) // 32 * 32``): that symbolic axis is provably whole vectors, so the kernel runs in
    column tiles with ``D`` inside as the fixed-length transpose does (189 -> 39 us per MiniLM layer at L = 384),
    not as a row-by-row gather."""
    import re

    from ctc.backends.tvm.build import relax_passes, schedule_defaults
    from ctc.backends.tvm.targets import resolve

    tgt = resolve("cpu").target()
    low = L.lower(_module(3, 3, 32, "s", "bool", False), target=tgt)
    with tgt:
        mod = schedule_defaults(relax_passes(tgt)(low.mod), tgt)
    texts = [f.script() for gv, f in mod.functions.items() if "key_pad" in gv.name_hint]
    assert len(texts) == 1, [gv.name_hint for gv in mod.functions]
    # parallel over batch x heads, then the symbolic tile count as its own loop (fused with the rest, every
    # index divided by a symbolic extent and LLVM scalarized the tile: 660 us), then D, then a vector of keys
    tiles = (r"T\.parallel\(.*\):\n\s+for \w+, \w+ in T\.grid\(\(s \+ T\.int64\(31\)\) // T\.int64\(32\).*, "
             r"(?:T\.int64\()?32\)+:\n\s+for \w+ in T\.vectorized\((?:T\.int64\()?(\d+)")
    found = re.search(tiles, texts[0])
    from ctc.backends.tvm.schedules import vector_lanes

    lanes = vector_lanes(tgt)  # 16 f32 with AVX-512, 8 with AVX2
    assert found and int(found.group(1)) in (lanes, 2 * lanes, 32), texts[0]  # a vector of key columns, D inside
