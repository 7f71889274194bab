"""CUDA decode kernels (``cuda_kernels``): the integer-weight GEMV and the key-chunked attention,
checked where no GPU is.

The kernels are compiled with nvcc for sm_90 and their generated CUDA source is read: integer codes
become f32 through the mantissa trick (no int-to-float conversion per weight), each lane reads its
weights as 16-byte words, one warp computes ``rows_per_warp`` output rows from one load of x, and rows
past N are never written.  Attention over a long cache is split into key chunks (flash-decoding) whose
partial results a second kernel combines.  Their numbers are checked on the GPU by ``benchmarks/cuda_kernel_check.py``
(every case against a float32 PyTorch computation; the closing notes quote its output).
"""

from __future__ import annotations

import re

import pytest

from ctc.backends.tvm import cuda_kernels as CK


def _source(spec: CK.GemvSpec | CK.AttentionSpec, tmp_path, monkeypatch) -> str:  # noqa: ANN001
    from ctc.backends.tvm.cuda_toolchain import find_nvcc, nvcc_compile_mode, prepare_cuda_build
    from ctc.backends.tvm.targets import cuda_target

    if find_nvcc() is None:
        pytest.skip("nvcc (CUDA toolkit) is not installed: CUDA kernels cannot be built here")
    prepare_cuda_build()
    import tvm

    monkeypatch.setenv("TVM_KERNEL_DUMP", str(tmp_path))
    tgt = tvm.target.Target(cuda_target("sm_90"))
    if isinstance(spec, CK.GemvSpec):
        funcs = {"k": CK.gemv_func(spec).with_attr("global_symbol", "k")}
    else:
        funcs = {"k": CK.decode_attention_func(spec).with_attr("global_symbol", "k"),
                 "c": CK.decode_attention_combine_func(spec).with_attr("global_symbol", "c")}
    with nvcc_compile_mode(), tgt:
        tvm.compile(tvm.IRModule(funcs), tgt)
    return (tmp_path / "tvm_kernels.cu").read_text()


@pytest.mark.parametrize("weight,group", [("int4", 128), ("int8", 32), ("int4", -1)])
def test_integer_gemv_widens_codes_without_conversions(weight: str, group: int, tmp_path, monkeypatch) -> None:
    spec = CK.GemvSpec(1, 512, 100, "float16", weight, group, "rms", 1e-5, "silu_mul", warp_rows=4, impl="tir")
    src = _source(spec, tmp_path, monkeypatch)
    body = src[src.index("__global__ void"):]
    assert spec.rows_per_warp == 4
    assert "| (uint)1258291200" in body  # 0x4B000000: the code ORed into the mantissa of 2^23
    # integer buffers converted to float: only the zero points (once per group and row), never the codes
    converted = set(re.findall(r"\(\(float\)\(?(\w+)\[", body))
    assert "ZP_ptr" in converted and not converted & {"wl_ptr", "Wu_ptr", "Wt_ptr"}, converted
    assert "*(uint4*)(Wu_ptr" in body  # 16-byte weight loads as words
    # 100 rows over blocks of 4 warps x 4 rows: 7 blocks, the last one's rows 100..111 never written
    assert all(f"if (n0_ptr[0] < {100 - r})" in body for r in range(4))


def test_rows_per_warp_keeps_registers_in_check() -> None:
    assert [CK.GemvSpec(m, 2048, 8192, "float16", "int4", 128).rows_per_warp for m in (1, 2, 3, 8, 9, 16)] == \
        [4, 4, 2, 2, 1, 1]
    # fewer rows per warp where N is small, so the grid keeps >= 256 blocks (measured on the H200: the
    # Llama-1B down projection, N = 2048, ran 7.2 us with 2 rows per warp, 10.4 us with 4)
    assert [CK.GemvSpec(1, 8192, n, "float16", "int4", 128).rows_per_warp for n in (2048, 3072, 1024, 200)] == \
        [2, 2, 1, 1]
    # dense weights: one row per warp at batch 1, two at batch 4-8
    assert [CK.GemvSpec(m, 8192, 2048, "float16").rows_per_warp for m in (1, 4, 8, 9)] == [1, 2, 2, 1]


def test_attention_splits_long_caches_into_key_chunks() -> None:
    def chunks(b: int, h: int, s: int) -> int:
        return CK.AttentionSpec(b, h, h // 4 or 1, s, 64, "float16", 0.125).key_chunks

    assert chunks(1, 9, 1088) == 8     # SmolLM2: 9 heads alone would use 9 of 132 SMs
    assert chunks(1, 32, 1088) == 8    # >= 128 keys a chunk
    assert chunks(8, 32, 1088) == 1    # 256 heads fill the GPU already (two chunks measured slower)
    assert chunks(2, 32, 1088) == 5    # 64 heads: 5 chunks make >= 264 blocks
    assert chunks(1, 9, 100) == 1      # short caches: one block per head, no combine kernel
    assert CK.AttentionSpec(1, 9, 3, 1088, 64, "float16", 0.125, chunks=1).key_chunks == 1


def test_chunked_attention_writes_partials_and_combines(tmp_path, monkeypatch) -> None:
    spec = CK.AttentionSpec(1, 4, 2, 600, 64, "float16", 0.125, "bool")
    assert spec.key_chunks == 4 and spec.chunk_keys == 150
    src = _source(spec, tmp_path, monkeypatch)
    assert set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", src)) == {"k_kernel", "c_kernel"}
    part = re.search(r"k_kernel\(([^)]*)\)", src).group(1)
    assert "float* __restrict__ O_ptr" in part and "float* __restrict__ PM_ptr" in part  # f32 partial results
    comb = src[src.index("c_kernel("):]
    assert "__expf" in comb or "exp" in comb


def test_gemv_layout_knobs_refused_where_they_cannot_work() -> None:
    assert "shared memory" in CK.gemv_supported(CK.GemvSpec(1, 512, 64, "float16", "int4", 128, "rms",
                                                             x_in_shared=False))
    assert "rows per warp" in CK.gemv_supported(CK.GemvSpec(8, 512, 64, "float16", "int4", 128, warp_rows=16))
    assert CK.gemv_supported(CK.GemvSpec(8, 512, 64, "float16", "int4", 128, warp_rows=8)) is None


def test_int4_gemv_on_half2_pairs_codes_and_activations_as_the_reference_does() -> None:
    """The half2 GEMV's bit tricks (cuda_gemv.dot8 / pair_x) replayed in numpy: ``(w & 0x000f000f) | 0x64006400``
    is the half pair (1024 + c0, 1024 + c4), the 0x00f000f0 mask gives 1024 + 16 c; centred by -(8 + zero)
    exactly; the activations paired (0, 4), (1, 5), (2, 6), (3, 7) by byte permutes."""
    import numpy as np

    def h2(u: int) -> np.ndarray:  # a 32-bit word as its two halves, low first
        return np.array([u & 0xFFFF, u >> 16], np.uint16).view(np.float16).astype(np.float32)

    def byte_perm(a: int, b: int, sel: int) -> int:  # CUDA's __byte_perm
        bs = a.to_bytes(4, "little") + b.to_bytes(4, "little")
        return int.from_bytes(bytes(bs[(sel >> (4 * i)) & 7] for i in range(4)), "little")

    rng = np.random.default_rng(0)
    for _ in range(50):
        codes, z = rng.integers(0, 16, 8), int(rng.integers(-8, 8))
        w = sum(int(c) << (4 * e) for e, c in enumerate(codes))
        x = rng.standard_normal(8).astype(np.float16)
        xw = x.view(np.uint16).astype(np.uint32)
        v = [int(xw[2 * i] | (xw[2 * i + 1] << 16)) for i in range(4)]
        xp = [byte_perm(v[0], v[2], 0x5410), byte_perm(v[0], v[2], 0x7632), byte_perm(v[1], v[3], 0x5410),
              byte_perm(v[1], v[3], 0x7632)]
        q = [h2((w & 0x000F000F) | 0x64006400) - (1032 + z), h2((w & 0x00F000F0) | 0x64006400) * 0.0625 - 72 - z,
             h2(((w >> 8) & 0x000F000F) | 0x64006400) - (1032 + z),
             h2(((w >> 8) & 0x00F000F0) | 0x64006400) * 0.0625 - 72 - z]
        pairs = np.stack([h2(p) for p in xp])
        np.testing.assert_array_equal(np.stack(q), (codes - 8 - z).reshape(2, 4).T)      # codes (e, e + 4)
        np.testing.assert_array_equal(pairs, x.astype(np.float32).reshape(2, 4).T)     # activations alike


def test_int4_gemv_uses_the_half2_kernel_where_it_covers_the_shape(tmp_path, monkeypatch) -> None:
    from ctc.backends.tvm import cuda_gemv

    spec = CK.GemvSpec(1, 2048, 8192, "float16", "int4", 128, "rms", 1e-5, "silu_mul")
    f = CK.gemv_func(spec)
    assert [str(p.dtype) for p in f.params] == ["float16", "float16", "uint8", "float32", "int8", "float16"]
    assert "ctc_gemv::gemv_i4<1, 2048, 8192, 128, 4, 1, 2, true>" in f.script()
    src = _source(spec, tmp_path, monkeypatch)
    assert "namespace ctc_gemv" in src and "lop3.b32" in src and "__hfma2" in src
    # the TIR kernel stays for what the half2 one does not cover: bfloat16, int8, > 32 sums per lane, or asked for
    assert "bfloat16" in cuda_gemv.gemv_i4_supported(CK.GemvSpec(1, 512, 64, "bfloat16", "int4", 128))
    assert "int8" in cuda_gemv.gemv_i4_supported(CK.GemvSpec(1, 512, 64, "float16", "int8", 128))
    assert "32 sums" in cuda_gemv.gemv_i4_supported(CK.GemvSpec(8, 512, 64, "float16", "int4", 128, warp_rows=8))
    # batch 8: half2 for the down/o projections, the TIR kernel for SwiGLU pairs and a large N (measured faster)
    assert cuda_gemv.gemv_i4_supported(CK.GemvSpec(8, 8192, 2048, "float16", "int4", 128)) is None
    for big in (CK.GemvSpec(8, 2048, 128256, "float16", "int4", 128),
                CK.GemvSpec(8, 2048, 8192, "float16", "int4", 128, epilogue="silu_mul")):
        assert "measured faster" in cuda_gemv.gemv_i4_supported(big)
    tir = CK.gemv_func(CK.GemvSpec(1, 2048, 8192, "float16", "int4", 128, impl="tir"))
    assert "ctc_gemv" not in tir.script()
    assert "implementation" in CK.gemv_supported(CK.GemvSpec(1, 512, 64, "float16", "int4", 128, impl="x"))
