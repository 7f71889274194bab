"""The persistent decode-step kernel (``ctc/backends/tvm/cuda_persistent.py``), checked where no GPU is.

Here: the int4 RTN used by its benchmark is ctc's quantizer bit for bit, the float32 reference step is Hugging
Face's Llama step, the tensor-core phase C's lane arithmetic (fragments, masks, byte permutations, offset
correction, row rotation) gives the exact integer dot products, and the CUDA source compiles for sm_90a with its
entry points, within the register file that 544 threads leave (no large spills) and the 227 KB of shared memory a
block may have.  Its numbers are checked on the GPU by ``benchmarks/cuda_persistent_decode.py run`` (and by the
``gpu`` test below where one is present).
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


# ---- the tensor-core phase C (PDEC_MMA): its lane arithmetic replayed on the CPU.  _mma is PTX's
# mma.sync.m16n8k32.row.col.s32.s8.s8.s32 on the fragment layout of the PTX ISA (lane L = 4 g + t: A's a0 / a1 / a2 /
# a3 hold rows g / g + 8 / g / g + 8 at K 4 t .. 4 t + 3 (a0, a1) and 16 + 4 t .. (a2, a3); B's b0 / b1 column g at
# K 4 t .. and 16 + 4 t ..; C's c0, c1 row g columns 2 t, 2 t + 1, c2, c3 row g + 8); the loads, masks, byte
# permutations and the offset correction below are the kernel's (gu_mma, down, load_b_gu, load_b_down).
def _bytes(w: int) -> list[int]:
    return [((w >> (8 * j)) & 255) - (256 if (w >> (8 * j)) & 128 else 0) for j in range(4)]


def _word(b) -> int:
    return sum((int(v) & 255) << (8 * j) for j, v in enumerate(b))


def _prmt(a: int, b: int, sel: int) -> int:
    src = [(a >> (8 * i)) & 255 for i in range(4)] + [(b >> (8 * i)) & 255 for i in range(4)]
    return _word([src[(sel >> (4 * i)) & 7] for i in range(4)])


def _mma(c, a, b):
    import numpy as np

    am, bm, cm = np.zeros((16, 32), np.int64), np.zeros((32, 8), np.int64), np.zeros((16, 8), np.int64)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for j in range(4):
            am[g, 4 * t + j], am[g + 8, 4 * t + j] = _bytes(a[lane][0])[j], _bytes(a[lane][1])[j]
            am[g, 16 + 4 * t + j], am[g + 8, 16 + 4 * t + j] = _bytes(a[lane][2])[j], _bytes(a[lane][3])[j]
            bm[4 * t + j, g], bm[16 + 4 * t + j, g] = _bytes(b[lane][0])[j], _bytes(b[lane][1])[j]
        cm[g, 2 * t:2 * t + 2], cm[g + 8, 2 * t:2 * t + 2] = c[lane][0:2], c[lane][2:4]
    d = am @ bm + cm
    return [[d[ln >> 2, 2 * (ln & 3)], d[ln >> 2, 2 * (ln & 3) + 1], d[(ln >> 2) + 8, 2 * (ln & 3)],
             d[(ln >> 2) + 8, 2 * (ln & 3) + 1]] for ln in range(32)]


def _mma_word(c, wa, wb, b0, b1):   # the kernel's mma_word, for all 32 lanes
    m = 0x0F0F0F0F
    return _mma(c, [[wa[n] & m, wb[n] & m, (wa[n] >> 4) & m, (wb[n] >> 4) & m] for n in range(32)],
                [[b0[n], b1[n]] for n in range(32)])


def _b_regs(vals_of_lane, nwords: int):
    """B's registers (evens, odds of each 8 values) and the C init (-8 sum per column) from each lane's int8 values."""
    regs, sums = [], []
    for lane in range(32):
        v = vals_of_lane(lane)   # None: a zero column
        u = [_word(v[4 * i:4 * i + 4]) for i in range(nwords)] if v is not None else [0] * nwords
        r = []
        for i in range(nwords // 2):
            r += [_prmt(u[2 * i], u[2 * i + 1], 0x6420), _prmt(u[2 * i], u[2 * i + 1], 0x7531)]
        regs.append(r)
        sums.append(sum(x for w in r for x in _bytes(w)))
    s = [sums[n] + sums[n ^ 1] for n in range(32)]
    s = [s[n] + s[n ^ 2] for n in range(32)]
    corr = (-8 * s[0], -8 * s[4])
    return regs, [[corr[0], corr[1], corr[0], corr[1]] for _ in range(32)]


def _mma_rows(c_init, wa, wb, regs):
    """The kernel's mma_rows for all 32 lanes (words x, z of each lane's 16-byte reads of rows g, g + 8 into the chain
    that starts at the correction, y, w into the one that starts at 0), summed: lane 4 g's 4 values for g in 0..7."""
    import numpy as np

    ca, cb = [list(x) for x in c_init], [[0, 0, 0, 0] for _ in range(32)]
    for i in range(4):
        col = [wa[n][i] for n in range(32)], [wb[n][i] for n in range(32)]
        b0, b1 = [regs[n][2 * i] for n in range(32)], [regs[n][2 * i + 1] for n in range(32)]
        if i % 2:
            cb = _mma_word(cb, *col, b0, b1)
        else:
            ca = _mma_word(ca, *col, b0, b1)
    return np.array([[ca[4 * g][k] + cb[4 * g][k] for k in range(4)] for g in range(8)])


def test_tensor_core_gate_up_lanes_give_the_exact_group_dot_products() -> None:
    import numpy as np

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(16, 2048, generator=gen)
    packed, _ = P.rtn_int4(w)                               # ctc's layout, read in place by the kernel
    q = ((packed & 15).to(torch.int64) - 8, (packed >> 4).to(torch.int64) - 8)
    q = torch.stack(q, dim=-1).reshape(16, 2048).numpy()
    h = torch.randint(-127, 128, (2048,), generator=gen).numpy()
    lo = torch.randint(-127, 128, (2048,), generator=gen).numpy()
    rows = packed.numpy()
    for warp in (0, 7, 15):                                 # warp w: group w
        regs, c = _b_regs(lambda ln, w=warp: ((h, lo)[ln >> 2][128 * w + 32 * (ln & 3):][:32] if ln < 8 else None), 8)
        wa = [[_word(rows[ln >> 2, 64 * warp + 16 * (ln & 3) + 4 * i:][:4]) for i in range(4)] for ln in range(32)]
        wb = [[_word(rows[(ln >> 2) + 8, 64 * warp + 16 * (ln & 3) + 4 * i:][:4]) for i in range(4)]
              for ln in range(32)]
        got = _mma_rows(c, wa, wb, regs)
        seg = slice(128 * warp, 128 * warp + 128)
        assert np.array_equal(got[:, 0], q[:8, seg] @ h[seg]) and np.array_equal(got[:, 2], q[8:, seg] @ h[seg])
        assert np.array_equal(got[:, 1], q[:8, seg] @ lo[seg]) and np.array_equal(got[:, 3], q[8:, seg] @ lo[seg])


def test_tensor_core_down_lanes_give_the_exact_rows_in_atomic_order() -> None:
    import numpy as np

    gen = torch.Generator().manual_seed(6)
    wd = torch.randn(1, 2048, 8192, generator=gen)
    codes, scales = P.rtn_int4(wd[0])
    wo, so = torch.zeros(1, 2048, 1024, dtype=torch.uint8), torch.ones(1, 2048, 16)
    _, _, wd_p, _ = P.pack_o_down(wo, so, codes[None], scales[None])
    blk, tile, warp = 37, 1, 9                              # the block's 64 columns, a 1024-row tile, a warp
    rows = wd_p[0, blk, tile * 1024:(tile + 1) * 1024].numpy()          # the tile as the ring slot holds it
    dq = P.dequant_int4(codes, torch.ones_like(scales)).numpy().astype(np.int64)   # q, unscaled
    q = dq[tile * 1024:(tile + 1) * 1024, 64 * blk:64 * blk + 64]
    x = torch.randint(-127, 128, (64,), generator=gen).numpy()
    regs, c_init = _b_regs(lambda ln: (x[16 * (ln & 3):][:16] if ln < 4 else None), 4)
    ys = []
    for i in range(4):
        wa, wb = [], []
        for ln in range(32):
            g, tq = ln >> 2, ln & 3
            row = warp * 64 + 4 * g + ((i + (g & 3)) & 3)
            wa.append([_word(rows[row, 8 * tq:][:4]), _word(rows[row, 8 * tq + 4:][:4])])
            wb.append([_word(rows[row + 32, 8 * tq:][:4]), _word(rows[row + 32, 8 * tq + 4:][:4])])
        c = [list(v) for v in c_init]
        for k in range(2):
            c = _mma_word(c, [wa[n][k] for n in range(32)], [wb[n][k] for n in range(32)],
                          [regs[n][2 * k] for n in range(32)], [regs[n][2 * k + 1] for n in range(32)])
        ys.append(c)
    ref = q @ x
    for g in range(8):                                      # lane 4 g: rows base .. base + 3, base + 32 .., rotated
        r, base = g & 3, warp * 64 + 4 * g
        y = [ys[(k - r) & 3][4 * g][0] for k in range(4)]
        z = [ys[(k - r) & 3][4 * g][2] for k in range(4)]
        assert y == list(ref[base:base + 4]) and z == list(ref[base + 32:base + 36])


def test_tensor_core_o_projection_lanes_give_the_exact_group_dot_products() -> None:
    """PDEC_MMA_O: warp w's 16 rows of phase B's W_o tile, both g128 groups (load_b32 from the quantized outputs at
    ob / ob + 256, mma_rows on each group's 16-byte reads), give the exact integer dot products of each group."""
    import numpy as np

    gen = torch.Generator().manual_seed(7)
    wo = torch.randn(1, 2048, 2048, generator=gen)
    codes, scales = P.rtn_int4(wo[0])
    wd, sd = torch.zeros(1, 2048, 4096, dtype=torch.uint8), torch.ones(1, 2048, 64)
    wo_p, _, _, _ = P.pack_o_down(codes[None], scales[None], wd, sd)
    hk, j, warp = 3, 5, 6
    rows = wo_p[0, hk, 128 * j:128 * j + 128].numpy()               # the tile as the ring slot holds it
    q = P.dequant_int4(codes, torch.ones_like(scales)).numpy().astype(np.int64)
    h = torch.randint(-127, 128, (256,), generator=gen).numpy()      # the 256 outputs' int8 codes (ob[0, 256))
    lo = torch.randint(-127, 128, (256,), generator=gen).numpy()     # and residuals (ob[256, 512))
    for gq in (0, 1):
        regs, c = _b_regs(lambda ln, gq=gq: ((h, lo)[ln >> 2][128 * gq + 32 * (ln & 3):][:32] if ln < 8 else None), 8)
        row = [16 * warp + (ln >> 2) for ln in range(32)]
        wa = [[_word(rows[row[ln], 64 * gq + 16 * (ln & 3) + 4 * i:][:4]) for i in range(4)] for ln in range(32)]
        wb = [[_word(rows[row[ln] + 8, 64 * gq + 16 * (ln & 3) + 4 * i:][:4]) for i in range(4)] for ln in range(32)]
        got = _mma_rows(c, wa, wb, regs)
        r0 = 128 * j + 16 * warp
        ks = slice(256 * hk + 128 * gq, 256 * hk + 128 * gq + 128)
        seg = slice(128 * gq, 128 * gq + 128)
        assert np.array_equal(got[:, 0], q[r0:r0 + 8, ks] @ h[seg])
        assert np.array_equal(got[:, 2], q[r0 + 8:r0 + 16, ks] @ h[seg])
        assert np.array_equal(got[:, 1], q[r0:r0 + 8, ks] @ lo[seg])
        assert np.array_equal(got[:, 3], q[r0 + 8:r0 + 16, ks] @ lo[seg])


def test_kernel_builds_with_and_without_the_tensor_core_phase_c(tmp_path) -> None:
    from ctc.backends.tvm.cuda_toolchain import find_nvcc

    if find_nvcc() is None:
        pytest.skip("nvcc (CUDA toolkit) is not installed: the kernel cannot be built here")
    assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in P.CUDA_SOURCE
    assert all(f in P.CUDA_SOURCE for f in ("PDEC_MMA_O", "PDEC_MMA_QKV", "PDEC_HOLD"))
    for flags in (("-DPDEC_MMA=0",), ("-DPDEC_MMA_LO=0",), ("-DPDEC_IDP=1",),   # PDEC_IDP implies PDEC_MMA=0
                  ("-DPDEC_MMA_O=0",), ("-DPDEC_MMA_QKV=0",), ("-DPDEC_HOLD=1", "-DPDEC_NSLOT=4")):
        _, report = P.build_library(tmp_path, extra=flags, name="libv.so")
        step = next(v for k, v in P.ptxas_report(report).items() if "decode_step" in k)
        assert step["registers"] <= 96 and step["spill_stores"] <= 256 and step["stack"] <= 120, (flags, step)


def test_flags_that_cannot_work_together_do_not_build(tmp_path) -> None:
    """PDEC_HOLD's flag is raised by the grid barrier's one polling thread, which PDEC_WARP_POLL=1 replaces: that
    build held nothing (silently the plain kernel); it is now a compile error naming why, as PDEC_MMA with PDEC_IDP."""
    from ctc.backends.tvm.cuda_toolchain import find_nvcc

    if find_nvcc() is None:
        pytest.skip("nvcc (CUDA toolkit) is not installed: the kernel cannot be built here")
    for flags, why in ((("-DPDEC_HOLD=1", "-DPDEC_WARP_POLL=1"), "PDEC_HOLD's flag is set by the one polling thread"),
                       (("-DPDEC_MMA=1", "-DPDEC_IDP=1"), "PDEC_MMA replaces the half2 / dp2a arithmetic")):
        with pytest.raises(RuntimeError, match=why):
            P.build_library(tmp_path, extra=flags, name="libbad.so")


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
