"""The persistent decode-step kernel (``ctc/backends/tvm/cuda_persistent.py``), checked where no GPU is.

Here: the int4 RTN used by its benchmark is ctc's quantizer bit for bit, the float32 reference step is Hugging
Face's Llama step, and the CUDA source compiles for sm_90a with its entry points, within the register file that
544 threads leave (no large spills) and the 227 KB of shared memory a block may have.  Its numbers are checked
on the GPU by ``benchmarks/cuda_persistent_decode.py run`` (and by the ``gpu`` test below where one is present).
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from ctc.backends.tvm import cuda_persistent as P


def test_rtn_int4_is_ctcs_quantizer() -> None:
    from ctc.ir.quant import dequantize_weight, quantize_weight

    w = torch.randn(48, 384, generator=torch.Generator().manual_seed(3)) * 0.02
    w[3, :128] = 0  # an all-zero group keeps scale 1
    q, s = P.rtn_int4(w)
    ref = quantize_weight(w, 4, 128, True)
    assert torch.equal(q, ref.qweight) and torch.equal(s, ref.scale)
    assert torch.equal(P.dequant_int4(q, s), dequantize_weight(ref.qweight, ref.scale, ref.zero, 4, 128, 384))


def test_repacked_o_and_down_tiles_are_the_slices_the_kernel_multiplies() -> None:
    """Phase B's tile (kv head hk, rows [128 j, 128 j + 128)) of the repacked W_o is W_o[rows, 256 hk : 256 hk + 256]
    with two whole groups of scales; phase C's slice j of W_down is W_down[:, 64 j : 64 j + 64] with group j // 2's
    scales.  The sum of the per-block partial products is the full product (what the atomics add up)."""
    g = torch.Generator().manual_seed(5)
    wo, so = P.rtn_int4(torch.randn(2048, 2048, generator=g) * 0.02)
    wd, sd = P.rtn_int4(torch.randn(2048, 8192, generator=g) * 0.02)
    wo_p, so_p, wd_p, sd_p = P.pack_o_down(wo[None], so[None], wd[None], sd[None])
    assert wo_p.shape == (1, 8, 2048, 128) and so_p.shape == (1, 8, 2048, 2)
    assert wd_p.shape == (1, 128, 2048, 32) and sd_p.shape == (1, 64, 2048)
    wo_f, wd_f = P.dequant_int4(wo, so), P.dequant_int4(wd, sd)
    attn, h = torch.randn(2048, generator=g), torch.randn(8192, generator=g)
    y_o = torch.zeros(2048)
    for hk in range(8):
        for j in range(16):
            rows = slice(128 * j, 128 * j + 128)
            tile = P.dequant_int4(wo_p[0, hk, rows], so_p[0, hk, rows])            # [128, 256]
            assert torch.equal(tile, wo_f[rows, 256 * hk:256 * hk + 256])
            y_o[rows] += tile @ attn[256 * hk:256 * hk + 256]
    torch.testing.assert_close(y_o, wo_f @ attn, rtol=1e-4, atol=1e-4)
    y_d = torch.zeros(2048)
    for j in range(128):
        lo = (wd_p[0, j] & 0x0F).float() - 8
        hi = (wd_p[0, j] >> 4).float() - 8
        sl = torch.stack([lo, hi], -1).reshape(2048, 64) * sd_p[0, j // 2][:, None]
        assert torch.equal(sl, wd_f[:, 64 * j:64 * j + 64])
        y_d += sl @ h[64 * j:64 * j + 64]
    torch.testing.assert_close(y_d, wd_f @ h, rtol=1e-4, atol=1e-3)


def test_qkv_rows_grouped_per_kv_head() -> None:
    """Phase A's 24-row tiles: kv head hk's 384 rows are its 4 query heads (q rows 256 hk ..), its key, its value."""
    idx = P.qkv_head_rows()
    assert sorted(idx.tolist()) == list(range(3072))
    hk = 3
    rows = idx[384 * hk:384 * (hk + 1)].tolist()
    assert rows[:256] == list(range(256 * hk, 256 * hk + 256))
    assert rows[256:320] == list(range(2048 + 64 * hk, 2048 + 64 * hk + 64))
    assert rows[320:] == list(range(2560 + 64 * hk, 2560 + 64 * hk + 64))
    w = torch.arange(2 * 3072 * 4, dtype=torch.uint8).reshape(2, 3072, 4)
    wp, _ = P.pack_qkv(w, w.float())
    assert torch.equal(wp[1, 384 * hk + 256], w[1, 2048 + 64 * hk])


@torch.no_grad()
def test_reference_step_is_hf_llama() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, attn_implementation="eager")
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    for n, p in m.named_parameters():
        if "norm" in n:
            p.copy_(1 + 0.1 * torch.randn_like(p))
    pos = 37
    ids = torch.randint(0, 300, (1, pos + 1))
    full = m(ids).logits[0, -1]
    past = m(ids[:, :pos], use_cache=True).past_key_values
    kc, vc = torch.zeros(2, 2, 48, 32), torch.zeros(2, 2, 48, 32)
    w = {"emb": m.model.embed_tokens.weight, "final_norm": m.model.norm.weight, "head": m.lm_head.weight}
    for i, layer in enumerate(m.model.layers):
        kc[i, :, :pos], vc[i, :, :pos] = past.layers[i].keys[0], past.layers[i].values[0]
        a, f = layer.self_attn, layer.mlp
        w |= {f"qkv.{i}": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), f"o.{i}": a.o_proj.weight,
              f"gu.{i}": torch.cat([f.gate_proj.weight, f.up_proj.weight]), f"down.{i}": f.down_proj.weight,
              f"attn_norm.{i}": layer.input_layernorm.weight, f"mlp_norm.{i}": layer.post_attention_layernorm.weight}
    shape = dict(hidden=128, heads=4, kv_heads=2, head_dim=32, ffn=192, layers=2, vocab=300, rope_theta=500000.0,
                 eps=1e-5)
    got, inter = P.reference_step(w, int(ids[0, pos]), pos, kc, vc, shape)
    torch.testing.assert_close(got, full, atol=2e-5, rtol=1e-4)
    assert set(inter) == {"qkv", "attn", "h", "x"}


def test_kernel_compiles_within_the_register_file_and_shared_memory(tmp_path) -> None:
    from ctc.backends.tvm.cuda_toolchain import find_nvcc

    if find_nvcc() is None:
        pytest.skip("nvcc (CUDA toolkit) is not installed: the kernel cannot be built here")
    lib_path, report = P.build_library(tmp_path)
    rep = P.ptxas_report(report)
    step = next(v for k, v in rep.items() if "decode_step" in k)
    bench = next(v for k, v in rep.items() if "barrier_bench" in k)
    # 17 warps a block: 5 of them share one of the 4 register files, so 96 registers a thread at most
    assert step["registers"] <= 96
    # a few per-stage scalars spill (counters, pointers); the 32 activation pairs of the dot products must not
    # (a run-time index into them would put them, 128 bytes, on the stack and reload them in every dot product)
    assert step["spill_stores"] <= 256 and step["spill_loads"] <= 384 and step["stack"] <= 120, step
    assert bench["spill_stores"] == 0
    lib = ctypes.CDLL(str(lib_path))   # static cudart: loads without a driver
    for sym in ("ctc_pdec_config", "ctc_pdec_launch", "ctc_pdec_barrier_bench", "ctc_pdec_error"):
        assert hasattr(lib, sym)
    assert lib.ctc_pdec_ws_floats() == P.WS_FLOATS
    assert 128 * 1024 < lib.ctc_pdec_smem_bytes() <= 227 * 1024   # one block a multiprocessor, 3 ring slots
    # ring slots | activations | mbarriers | small arrays | producer queue
    # (the small arrays: scores, q, reductions, RoPE, o and SwiGLU vectors, 16 activation scales)
    assert lib.ctc_pdec_smem_bytes() == 3 * 36864 + 16384 + 3 * 16 + 4352 + 128 + 64 + 32 * 72
    assert ctypes.sizeof(P.DecodeArgs) == 22 * 8 + 6 * 4          # the C struct's layout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_layer_step_matches_the_fp32_reference_on_the_gpu(tmp_path) -> None:
    import sys
    from pathlib import Path

    from ctc.backends.tvm.cuda_toolchain import find_nvcc

    if find_nvcc() is None:
        pytest.skip("nvcc is not installed")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import cuda_persistent_decode as B

    lib_path, _ = P.build_library(tmp_path)
    cfg = dict(P.LLAMA_1B)
    packed, w32 = B.make_weights(cfg, 1)
    w32["_inv"] = packed["inv_freq"]
    shape = (1, cfg["kv_heads"], 160, cfg["head_dim"])
    g = torch.Generator(device="cuda").manual_seed(1)
    kc = torch.randn(shape, generator=g, device="cuda").half()
    vc = torch.randn(shape, generator=g, device="cuda").half()
    dec = P.PersistentDecoder(lib_path, packed, kc, vc)
    for row in B.check(dec, w32, cfg, 1, kc, vc, (5, 128)):
        assert row["aborted"] == 0
        assert row["logits"]["max_abs"] <= 0.02 * row["logits"]["ref_max_abs"] + 1e-2, row
        assert row["argmax_equal"]
