"""GGUF Q4_0/Q4_1/Q8_0 tensors read into quant_linear storage without re-rounding, and the ``gguf-weights``
pass on a small llama-architecture file written here with the ``gguf`` package (the same writer and
quantizers llama.cpp's converter uses)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from ctc.frontends.gguf import GgufError, read_llama_linears, read_tensor  # noqa: E402
from ctc.ir import Module, TensorType  # noqa: E402
from ctc.ir import quant as Q  # noqa: E402
from ctc.ir.interpreter import interpret  # noqa: E402
from ctc.passes.base import get_pass  # noqa: E402
from ctc.passes.manager import PassManager, PipelineError  # noqa: E402

KINDS = ("Q4_0", "Q4_1", "Q8_0")


@pytest.mark.parametrize("kind", KINDS)
def test_read_tensor_equals_ggml_dequantization(kind: str) -> None:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((6, 96)) * np.linspace(0.1, 2, 96)).astype(np.float32)
    w[2, 32:64] = 0.25  # a constant block (Q4_1: scale 0, the value in the minimum)
    qt = getattr(gguf.GGMLQuantizationType, kind)
    raw = gguf.quants.quantize(w, qt)
    want = gguf.quants.dequantize(raw, qt).reshape(6, 96)
    qw = read_tensor(kind, raw, 6, 96, "t")
    assert qw.bits == (8 if kind == "Q8_0" else 4) and qw.group_size == 32
    got = Q.dequantize_weight(qw.qweight, qw.scale, qw.zero, qw.bits, qw.group_size, qw.k).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_unreadable_types_and_sizes_are_named() -> None:
    with pytest.raises(GgufError, match="Q6_K is not read"):
        read_tensor("Q6_K", np.zeros(10, np.uint8), 1, 256, "blk.0.ffn_up.weight")
    with pytest.raises(GgufError, match="bytes of data"):
        read_tensor("Q8_0", np.zeros(10, np.uint8), 1, 32, "x")


def _write_llama(path: Path, heads: int = 2, kv_heads: int = 1) -> dict[str, np.ndarray]:
    """A 1-block llama GGUF; returns the HF-layout float weights its tensors dequantize to."""
    rng = np.random.default_rng(1)
    hd, d, ff = 32, 64, 96
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    hf: dict[str, np.ndarray] = {}
    shapes = {"attn_q": (heads * hd, d), "attn_k": (kv_heads * hd, d), "attn_v": (kv_heads * hd, d),
              "attn_output": (d, heads * hd), "ffn_gate": (ff, d), "ffn_up": (ff, d), "ffn_down": (d, ff)}
    hf_names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
    for i, (name, shape) in enumerate(shapes.items()):
        qt = getattr(gguf.GGMLQuantizationType, KINDS[i % 3])
        x = rng.standard_normal(shape).astype(np.float32)
        if name in ("attn_q", "attn_k"):  # llama.cpp's converter permutes q/k rows for its rotary layout
            h = heads if name == "attn_q" else kv_heads
            x_g = x.reshape(h, 2, shape[0] // h // 2, shape[1]).swapaxes(1, 2).reshape(shape)
        else:
            x_g = x
        raw = gguf.quants.quantize(x_g, qt)
        w.add_tensor(f"blk.0.{name}.weight", raw, raw_shape=raw.shape, raw_dtype=qt)
        deq = gguf.quants.dequantize(raw, qt).reshape(shape)
        if name in ("attn_q", "attn_k"):
            h = heads if name == "attn_q" else kv_heads
            deq = deq.reshape(h, shape[0] // h // 2, 2, shape[1]).swapaxes(1, 2).reshape(shape)
        hf[f"model.layers.0.{hf_names[name]}.weight"] = deq
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_read_llama_linears_undoes_the_qk_permutation(tmp_path: Path) -> None:
    want = _write_llama(tmp_path / "m.gguf")
    got = read_llama_linears(tmp_path / "m.gguf")
    assert set(got) == set(want) and {g.kind for g in got.values()} == set(KINDS)
    for name, g in got.items():
        w = g.weight
        deq = Q.dequantize_weight(w.qweight, w.scale, w.zero, w.bits, w.group_size, w.k).numpy()
        np.testing.assert_allclose(deq, want[name], rtol=1e-6, atol=1e-6)


def test_gguf_weights_pass_swaps_the_linears(tmp_path: Path) -> None:
    want = _write_llama(tmp_path / "m.gguf")
    m = Module("toy")
    x = m.add_input("x", TensorType((1, 3, 64), "f32"))
    name = "model.layers.0.mlp.up_proj.weight"
    m.add_param("wrapper." + name, torch.zeros(96, 64))
    y = m.create_node("linear", [x, m.param("wrapper." + name)], scope="model.layers.0.mlp.up_proj", block=0)
    m.set_outputs([m.create_node("relu", [y.output], block=0).output])
    out, _ = PassManager([get_pass("gguf-weights")({"file": str(tmp_path / "m.gguf")})], progress=False,
                         fidelity=False).run(m)
    assert out.op_counts().get("quant_linear") == 1 and "linear" not in out.op_counts()
    xs = torch.randn(1, 3, 64)
    ref = torch.relu(xs @ torch.from_numpy(want[name]).T)
    torch.testing.assert_close(interpret(out, [xs])[0], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(PipelineError, match="give file="):
        PassManager([get_pass("gguf-weights")({})], progress=False, fidelity=False).run(m)


def test_gguf_weights_with_block_quantized_activations(tmp_path: Path) -> None:
    """``a_bits=8``: the file's codes unchanged, activations quantized per row and block of 32 at run time."""
    want = _write_llama(tmp_path / "m.gguf")
    m = Module("toy")
    x = m.add_input("x", TensorType((1, 3, 64), "f32"))
    name = "model.layers.0.mlp.up_proj.weight"
    m.add_param(name, torch.zeros(96, 64))
    y = m.create_node("linear", [x, m.param(name)], scope="model.layers.0.mlp.up_proj", block=0)
    m.set_outputs([y.output])
    out, _ = PassManager([get_pass("gguf-weights")({"file": str(tmp_path / "m.gguf"), "a_bits": 8})],
                         progress=False, fidelity=False).run(m)
    (q,) = [n for n in out.nodes if n.op == "quant_linear"]
    assert q.attrs["a_bits"] == 8 and q.attrs["act_dynamic"] and q.attrs["act_clusters"] == (32, 64)
    xs = torch.randn(1, 3, 64)
    ref = xs @ torch.from_numpy(want[name]).T
    got = interpret(out, [xs])[0]
    err = float((got - ref).abs().max())
    assert 0 < err < 0.02 * float(ref.abs().max())  # 8-bit activation rounding: small, not zero
