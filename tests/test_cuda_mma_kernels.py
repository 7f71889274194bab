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


def _tiny_prefill_build(tmp_path, monkeypatch, quantize: bool = False):  # noqa: ANN001, ANN202
    """(module, compiled) of a one-layer half-precision Llama prefill of 64 tokens built for sm_90 (the CUDA
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
    comp = compile_module(m, target=T.resolve("cuda", type("Opts", (), {"arch": "sm_90"})()),
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
