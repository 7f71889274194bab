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


def test_half_prefill_runs_linears_and_attention_on_tensor_core_kernels(tmp_path, monkeypatch) -> None:
    """A half-precision Llama prefill of 64 tokens for sm_90: every linear is the mma GEMM (the residual
    adds and the SwiGLU in its epilogue), the attention one flash kernel; the source carries the library once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ctc.backends.tvm import targets as T
    from ctc.backends.tvm.build import BuildOptions, compile_module
    from ctc.backends.tvm.cuda_toolchain import find_nvcc
    from ctc.frontends.hf import capture_hf_model

    if find_nvcc() is None:
        pytest.skip("nvcc (CUDA toolkit) is not installed: CUDA libraries cannot be built here")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=256, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval().to(torch.float16)
    m = capture_hf_model(model, task="causal_lm", batch=1, seq_len=64, dynamic=False)
    monkeypatch.setenv("TVM_KERNEL_DUMP", str(tmp_path))
    comp = compile_module(m, target=T.resolve("cuda", type("Opts", (), {"arch": "sm_90"})()),
                          options=BuildOptions(params="input"))
    # the logits' final [64, V] -> [1, 64, V] reshape is a view, not a copy kernel (build.outputs_through_dataflow_vars)
    assert not [k for k in comp.meta["kernels"] if k.startswith("reshape")], comp.meta["kernels"]
    src = (tmp_path / "tvm_kernels.cu").read_text()
    calls = set(re.findall(r"ctc_(?:gemm|flash)::\w+<[^>]*>", src))
    epilogues = {c.rsplit(",", 1)[1].strip(" >") for c in calls if c.startswith("ctc_gemm")}
    assert epilogues == {"0", "1", "2"}, calls            # plain (q, k, v, head), + residual, SwiGLU
    assert any(c.startswith("ctc_flash::attend<half, 64, 1") for c in calls), calls   # the bool mask, as f32
    assert src.count("namespace ctc_mma {") == 1
    assert not re.search(r"void __launch_bounds__\(\d+\) \w*(matmul|softmax)\w*_kernel", src)
