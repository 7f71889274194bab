"""CUDA tensor-core kernels for prefill (``cuda_gemm``, ``cuda_flash``, ``cuda_mma``), checked where no GPU is.

The GEMM and the flash attention are CUDA device functions compiled into TVM's module by a source hook;
here their choices (tiles, supported shapes, the SwiGLU weight order), the hook and the lowering that
picks them are checked, and a small half-precision Llama prefill is built for sm_90 and its CUDA source
read.  Their numbers are checked on the GPU by ``benchmarks/cuda_kernel_check.py`` (every case against a
float32 PyTorch computation; the closing notes quote its output).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from ctc.backends.tvm import cuda_flash as CF
from ctc.backends.tvm import cuda_gemm as G
from ctc.backends.tvm import cuda_mma


def test_gate_up_order_interleaves_blocks_of_eight() -> None:
    order = G.gate_up_order(16)
    assert order.tolist() == [*range(8), *range(16, 24), *range(8, 16), *range(24, 32)]
    from ctc.backends.tvm.lower import derive_param

    gate, up = torch.randn(16, 4), torch.randn(16, 4)
    derived = derive_param({"op": "gate_up8", "from": ["g", "u"]}, {"g": gate, "u": up})
    np.testing.assert_array_equal(derived.numpy(), np.concatenate([gate.numpy(), up.numpy()])[order])
    with pytest.raises(ValueError, match="multiple of 8"):
        G.gate_up_order(12)


def test_gemm_tiles_fill_the_gpu_and_unsupported_shapes_say_why() -> None:
    assert G.GemmSpec(2048, 16384, "float16", "silu_mul").tiles[:2] == (128, 128)   # 4 x 128 blocks
    down = G.GemmSpec(8192, 2048, "float16", "residual")       # 4 x 16 large tiles would idle SMs: 4 K splits
    assert (down.tiles[:2], down.k_splits) == ((128, 128), 4) and "k4" in down.tag
    assert G.GemmSpec(2048, 128256, "float16").k_splits == 1                        # enough blocks already
    assert G.GemmSpec(2048, 16384, "float16", "silu_mul", rows_hint=64).k_splits == 1   # SwiGLU is not split
    assert G.GemmSpec(8192, 2048, "float16", tile=(64, 64, 32, 32, 4)).k_splits == 1    # a given tile: unsplit
    assert "K splits" in G.gemm_supported(G.GemmSpec(2080, 2048, "float16", splits=4))
    assert G.GemmSpec(576, 960, "float16", rows_hint=77).tiles[:2] == (64, 64)      # 960 is not 128-wide tiles
    assert G.gemm_supported(G.GemmSpec(2048, 2048, "float16")) is None
    assert "multiple of 32" in G.gemm_supported(G.GemmSpec(100, 2048, "float16"))
    assert "float32" in G.gemm_supported(G.GemmSpec(2048, 2048, "float32"))
    assert "block tile" in G.gemm_supported(G.GemmSpec(2048, 2000, "float16"))
    with pytest.raises(ValueError, match="multiple of 32"):
        G.gemm_func(G.GemmSpec(100, 2048, "float16"))
    assert "head dim" in CF.flash_supported(CF.FlashSpec(4, 4, 80, "float16", 0.1))
    assert "kv heads" in CF.flash_supported(CF.FlashSpec(6, 4, 64, "float16", 0.1))


def test_split_k_gemm_writes_f32_partials_that_a_second_kernel_sums_with_the_epilogue() -> None:
    spec = G.GemmSpec(8192, 2048, "float16", "residual")
    gemm = G.gemm_func(spec)
    assert [str(p.dtype) for p in gemm.params] == ["float16", "float16", "float32"]  # no R yet
    assert [str(d) for d in gemm.params[2].shape][::2] == ["4", "2048"]      # [splits, m, N]
    assert "ctc_gemm::gemm_tile<half, 128, 128, 64, 32, 4, 3>" in gemm.script()            # EPI 3: partial sums
    red = G.splitk_reduce_func(spec)
    assert [str(p.dtype) for p in red.params] == ["float32", "float16", "float16"]
    assert "ctc_gemm::splitk_reduce<half, 1>" in red.script()                              # + the residual
    plain = G.splitk_reduce_func(G.GemmSpec(2048, 3072, "bfloat16"))
    assert [str(d) for d in plain.params[1].shape][1] == "2048"            # A, unread: docstring
    assert "splitk_reduce<__nv_bfloat16, 0>" in plain.script()


def test_source_hook_adds_the_library_only_where_it_is_called() -> None:
    plain = 'extern "C" __global__ void k(float* a) { a[0] = 1; }'
    assert cuda_mma.postprocess_cuda_source(plain) == plain
    code = '#include <x>\nextern "C" __global__ void k(half* a) { ctc_gemm::gemm_tile<half, 64, 64, 32, 32, 4, 0>(a); }'
    out = cuda_mma.postprocess_cuda_source(code)
    assert out.startswith("#include <x>\n") and out.count("namespace ctc_mma {") == 1
    assert out.index("namespace ctc_gemm") < out.index('extern "C" __global__') and "namespace ctc_flash" not in out
    assert cuda_mma.postprocess_cuda_source(out) == out  # idempotent


def _tiny_prefill_build(tmp_path, monkeypatch, quantize: bool = False, arch: str = "sm_90"):  # noqa: ANN001, ANN202
    """(module, compiled) of a one-layer half-precision Llama prefill of 64 tokens built for ``arch`` (the CUDA
    source dumped into ``tmp_path``); ``quantize``: int4 weight-only linears in groups of 32 first."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ctc.backends.tvm import targets as T
    from ctc.backends.tvm.build import BuildOptions, compile_module
    from ctc.backends.tvm.cuda_toolchain import find_nvcc
    from ctc.frontends.hf import capture_hf_model
    from ctc.passes.manager import PassManager
    from ctc.passes.quantize import QuantizeOptions, QuantizePass

    if find_nvcc() is None:
        pytest.skip("nvcc (CUDA toolkit) is not installed: CUDA libraries cannot be built here")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=256, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval().to(torch.float16)
    m = capture_hf_model(model, task="causal_lm", batch=1, seq_len=64, dynamic=False)
    if quantize:
        ins = {"input_ids": torch.zeros(1, 64, dtype=torch.long), "attention_mask": torch.ones(1, 64, dtype=torch.long)}
        opts = QuantizeOptions(w_bits=4, a_bits=16, w_granularity="group", group_size=32, sym=True, blocks_only=False)
        m, _ = PassManager([QuantizePass(opts)], calibration=[ins], fidelity=False, progress=False).run(m)
    monkeypatch.setenv("TVM_KERNEL_DUMP", str(tmp_path))
    comp = compile_module(m, target=T.resolve("cuda", type("Opts", (), {"arch": arch})()),
                          options=BuildOptions(params="input"))
    return m, comp


def test_half_prefill_runs_linears_and_attention_on_tensor_core_kernels(tmp_path, monkeypatch) -> None:
    """A half-precision Llama prefill of 64 tokens for sm_90: every linear is the mma GEMM (the residual
    adds and the SwiGLU in its epilogue), the attention one flash kernel; the source carries the library once."""
    _, comp = _tiny_prefill_build(tmp_path, monkeypatch)
    # the logits' final [64, V] -> [1, 64, V] reshape is a view, not a copy kernel (build.outputs_through_dataflow_vars)
    assert not [k for k in comp.meta["kernels"] if k.startswith("reshape")], comp.meta["kernels"]
    src = (tmp_path / "tvm_kernels.cu").read_text()
    calls = set(re.findall(r"ctc_(?:gemm|flash)::\w+<[^>]*>", src))
    epilogues = {c.rsplit(",", 1)[1].strip(" >") for c in calls if c.startswith("ctc_gemm")}
    assert epilogues == {"0", "1", "2"}, calls            # plain (q, k, v, head), + residual, SwiGLU
    assert any(c.startswith("ctc_flash::attend<half, 64, 1") for c in calls), calls   # the bool mask, as f32
    assert src.count("namespace ctc_mma {") == 1
    assert not re.search(r"void __launch_bounds__\(\d+\) \w*(matmul|softmax)\w*_kernel", src)


def test_dequant_kernel_shapes_and_refusals() -> None:
    spec = G.DequantSpec(2048, 8192, 4, 128, "float16")
    f = G.dequant_func(spec)
    assert [str(p.dtype) for p in f.params] == ["uint8", "float32", "int8", "float16"]
    assert [int(d) for d in f.params[0].shape] == [2048, 4096] and [int(d) for d in f.params[1].shape] == [2048, 64]
    assert "ctc_gemm::dequant_weight<half, 4, signed char, 8192, 128>" in f.script()  # K, group: constants
    i8 = G.dequant_func(G.DequantSpec(64, 256, 8, -1, "bfloat16", "float32"))
    assert [str(p.dtype) for p in i8.params] == ["int8", "float32", "float32", "bfloat16"]
    assert [int(d) for d in i8.params[1].shape] == [64, 1]
    assert "dequant_weight<__nv_bfloat16, 8, float, 256, 256>" in i8.script()      # one group a row
    assert "multiples of 32" in G.dequant_supported(G.DequantSpec(64, 256, 4, 48, "float16"))
    assert "4 or 8" in G.dequant_supported(G.DequantSpec(64, 256, 3, 32, "float16"))
    with pytest.raises(ValueError, match="float32"):
        G.dequant_func(G.DequantSpec(64, 256, 4, 32, "float32"))


def test_dequant_source_matches_the_reference_on_the_cpu() -> None:
    """The device function's arithmetic, replayed in numpy on packed weights: nibble order and zero points."""
    from ctc.ir import quant as Q

    torch.manual_seed(0)
    w = torch.randn(8, 64)
    for bits in (4, 8):
        for sym in (True, False):
            qw = Q.quantize_weight(w, bits, 32, sym)
            ref = Q.dequantize_weight(qw.qweight, qw.scale, qw.zero, bits, 32, 64).numpy()
            q = qw.qweight.numpy()
            if bits == 4:  # what dequant_weight does: nibble k % 2 of byte k / 2, minus 8 and the zero point
                codes = np.stack([q & 15, q >> 4], -1).reshape(8, 64).astype(np.float32) - 8
            else:
                codes = q.astype(np.float32)
            z = np.repeat(qw.zero.numpy().astype(np.float32), 32, axis=1)
            s = np.repeat(qw.scale.numpy(), 32, axis=1)
            np.testing.assert_array_equal((codes + (-z)) * s, ref)


def test_int4_prefill_expands_weights_for_the_tensor_core_gemm(tmp_path, monkeypatch) -> None:
    """An int4 (groups of 32) half-precision Llama prefill for sm_90: every quantized linear is one weight
    expansion and the mma GEMM with its epilogue (no generic dequantizing matmul)."""
    m, comp = _tiny_prefill_build(tmp_path, monkeypatch, quantize=True)
    assert sum(n.op == "quant_linear" for n in m.nodes) == 8  # q, k, v, o, gate, up, down, head
    kernels = comp.meta["kernels"]
    assert not [k for k in kernels if "quant_matvec" in k or "matmul" in k], kernels
    src = (tmp_path / "tvm_kernels.cu").read_text()
    calls = set(re.findall(r"ctc_gemm::\w+<[^>]*>", src))
    assert {c for c in calls if "dequant" in c} == {f"ctc_gemm::dequant_weight<half, 4, signed char, {k}, 32>"
                                                    for k in (128, 256)}, calls  # hidden 128, FFN 256
    epilogues = {c.rsplit(",", 1)[1].strip(" >") for c in calls if "gemm_tile" in c}
    assert epilogues == {"0", "1", "2"}, calls
    # the weights stay packed (uint8 codes, f32 scales, int8 zeros); gate|up rows are interleaved alike, and each
    # bound array derives from the module's parameters as the GPU machine rebuilds it
    from ctc.backends.tvm.lower import derive_param

    params = {n: torch.from_numpy(np.asarray(a)) for n, a in m.params.items()}
    specs = comp.meta["params"]
    assert {p["dtype"] for p in specs} >= {"uint8", "float32", "int8"} and "float16" in {p["dtype"] for p in specs}
    gate_up = [(p, a) for p, a in zip(specs, comp.param_arrays, strict=True) if p["source"]["op"] == "gate_up8"]
    assert sorted(p["dtype"] for p, _ in gate_up) == ["float32", "int8", "uint8"]
    for p, a in gate_up:
        np.testing.assert_array_equal(derive_param(p["source"], params).numpy(), np.asarray(a))


# ----------------------------------------------------------------------------- Hopper warpgroup MMA (sm_90a)
def test_wgmma_tiles_fill_the_gpu_and_unsupported_shapes_say_why() -> None:
    def wg(k: int, n: int, epi: str = "none", **kw: object) -> G.GemmSpec:
        return G.GemmSpec(k, n, "float16", epi, wgmma=True, **kw)  # type: ignore[arg-type]

    gate_up, head = wg(2048, 16384, "silu_mul"), wg(2048, 128256)
    assert (gate_up.tiles, gate_up.k_splits, gate_up.threads) == ((128, 256, 64, 256, 4), 1, 256)   # 4 x 64 tiles
    assert head.tiles[:2] == (128, 256) and "_wgo128x256" in head.tag and head.staged   # "o": staged stores
    assert gate_up.smem_bytes == 4 * (128 + 256) * 128 + 1024 <= 227 * 1024     # + room to align to 1024 bytes
    down = wg(8192, 2048, "residual")                 # 4 x 16 tiles of 128 fill < 70% of the SMs: 2 K splits
    assert (down.tiles[:2], down.k_splits) == ((128, 128), 2)
    assert not gate_up.staged and not down.staged      # SwiGLU: measured slower staged; split-K: f32 partials
    assert (wg(2048, 3072).tiles[:2], wg(2048, 3072).k_splits) == ((128, 128), 1)   # 96 tiles: unsplit
    assert wg(576, 960, rows_hint=77).tiles[:2] == (128, 64)                     # 960: only 64-wide tiles divide it
    assert "multiple of 64" in G.gemm_supported(wg(2080, 2048))                # K: 128-byte swizzle rows
    assert "warpgroup-MMA tile" in G.gemm_supported(wg(2048, 2048, tile=(128, 128, 64, 32, 4)))
    assert "warpgroup-MMA tile" in G.gemm_supported(wg(2048, 2048, tile=(128, 128, 64, 128, 2)))
    assert G.gemm_supported(wg(2048, 2048, tile=(128, 128, 64, 128, 2), wg_inflight=0)) is None
    assert "0 or 1" in G.gemm_supported(wg(2048, 2048, wg_inflight=2))
    assert "shared memory" in G.gemm_supported(wg(2048, 2048, tile=(128, 256, 64, 256, 5)))
    f = G.gemm_func(down)
    assert "ctc_wgmma::gemm_tile<half, 128, 4, 3, 1, false>" in f.script()     # EPI 3: f32 partial sums
    assert "ctc_gemm::gemm_tile" not in f.script()
    staged = G.gemm_func(wg(2048, 16384, "silu_mul", wg_staged=True, wg_inflight=0))
    assert "ctc_wgmma::gemm_tile<half, 256, 4, 2, 0, true>" in staged.script()


def test_wgmma_source_assembles_for_sm_90a_only(tmp_path) -> None:
    """The library with every tile width instantiated compiles to PTX with warpgroup MMAs for sm_90a; for plain
    sm_90 it stops at its own #error (wgmma is not in sm_90)."""
    import subprocess

    from ctc.backends.tvm import cuda_wgmma as W
    from ctc.backends.tvm.cuda_toolchain import find_nvcc

    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc (CUDA toolkit) is not installed")
    body = "".join(
        f'extern "C" __global__ void __launch_bounds__(256) k{bn}_{e}_{f}({t}* a, {t}* w, {t}* c, {t}* r, int m) {{\n'
        f"  extern __shared__ unsigned char s[];\n"
        f"  ctc_wgmma::gemm_tile<{t}, {bn}, 4, {e}, {f}, {'true' if f else 'false'}>(a, w, c, r, s, m, 2 * {bn}, 1024, "
        f"{1 + (e == 3)}, blockIdx.x, blockIdx.y, threadIdx.x);\n}}\n"
        for bn in W.WIDTHS for e, t in enumerate(("half", "__nv_bfloat16", "half", "half")) for f in (0, 1))
    src = tmp_path / "wg.cu"
    src.write_text(cuda_mma.PRIMITIVES + W.CUDA_SOURCE + body)
    ptx = tmp_path / "wg.ptx"
    subprocess.run([nvcc, "-gencode=arch=compute_90a,code=sm_90a", "-ptx", "-o", str(ptx), str(src)], check=True,
                   capture_output=True)
    text = ptx.read_text()
    for bn in W.WIDTHS:
        assert f"wgmma.mma_async.sync.aligned.m64n{bn}k16.f32.f16.f16" in text
        assert f"wgmma.mma_async.sync.aligned.m64n{bn}k16.f32.bf16.bf16" in text
    assert "wgmma.wait_group.sync.aligned 1" in text and "fence.proxy.async.shared::cta" in text
    plain = subprocess.run([nvcc, "-arch=sm_90", "-ptx", "-o", str(tmp_path / "p.ptx"), str(src)],
                           capture_output=True, text=True)
    assert plain.returncode != 0 and "needs the sm_90a target" in plain.stderr


def test_half_prefill_for_sm_90a_runs_its_linears_on_warpgroup_mma(tmp_path, monkeypatch) -> None:
    """The same tiny prefill built for sm_90a: every linear is the wgmma GEMM (epilogues none, residual, SwiGLU),
    attention still the flash kernel; sm_90 builds keep mma.sync (the test above)."""
    _, comp = _tiny_prefill_build(tmp_path, monkeypatch, arch="sm_90a")
    src = (tmp_path / "tvm_kernels.cu").read_text()
    calls = set(re.findall(r"ctc_(?:gemm|wgmma|flash)::\w+<[^>]*>", src))
    epilogues = {c.split(",")[3].strip() for c in calls if c.startswith("ctc_wgmma::gemm_tile")}  # <T, BN, ST, EPI..
    assert epilogues == {"0", "1", "2"}, calls
    assert not [c for c in calls if c.startswith("ctc_gemm::gemm_tile")], calls
    assert any(c.startswith("ctc_flash::attend") for c in calls), calls
    assert src.count("namespace ctc_wgmma {") == 1 and src.count("namespace ctc_mma {") == 1
