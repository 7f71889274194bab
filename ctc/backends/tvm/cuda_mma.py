"""CUDA device-function library for ctc's tensor-core kernels, and the hook that compiles it in.

Why: TVM's TIR has no concise way to write a pipelined ``mma.sync`` kernel with the register
fragments shared between a ``q k^T`` and a ``p v`` product (flash attention) or a swizzled
``cp.async`` pipeline; CUDA C does.  ctc writes such kernels as ``__device__`` functions and calls
them from TIR PrimFuncs (``T.call_extern``) that keep everything else TVM's: the launch (grid,
block, dynamic shared memory), the buffers, the Relax VM call, CUDA-graph capture, the exported
library.  :func:`postprocess_cuda_source` is TVM's ``tvm_callback_cuda_postproc`` hook: a module
whose generated source calls one of the library's functions gets the library's source in front of
its first kernel; every other module is compiled unchanged.

The kernels: :mod:`.cuda_gemm` (prefill linears), :mod:`.cuda_flash` (prefill attention).  This
module holds what they share: ``cp.async`` loads, ``ldmatrix`` and the ``m16n8k16`` MMA for f16
and bf16 (sm_80 on).
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRIMITIVES", "library_source", "postprocess_cuda_source", "register_postproc"]

PRIMITIVES = r"""
// ---- ctc: tensor-core primitives (ctc/backends/tvm/cuda_mma.py) ----
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace ctc_mma {


__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  unsigned d = smem_addr(dst);
  int n = valid ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(d), "l"(src), "r"(n));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

template <typename T> struct Mma;

template <> struct Mma<half> {
  static __device__ __forceinline__ void run(float* c, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  static __device__ __forceinline__ float to_f(half x) { return __half2float(x); }
  static __device__ __forceinline__ half from_f(float x) { return __float2half_rn(x); }
};

template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* c, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  static __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// Two floats as one register of two T (the A fragment of a product whose left side was a product's result).
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack2<half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}
template <> __device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}

}  // namespace ctc_mma
"""


def _kernels() -> list[tuple[str, str]]:
    """(marker, source) of each kernel in the library: the marker is the call the TIR wrapper emits."""
    from ctc.backends.tvm import cuda_flash, cuda_gemm

    return [(cuda_gemm.MARKER, cuda_gemm.CUDA_SOURCE), (cuda_flash.MARKER, cuda_flash.CUDA_SOURCE)]


def library_source(code: str) -> str:
    """The library source a generated module ``code`` needs ("" when it calls none of it)."""
    used = [src for marker, src in _kernels() if marker in code]
    return PRIMITIVES + "".join(used) if used else ""


def postprocess_cuda_source(code: str) -> str:
    """Put :func:`library_source` in front of the first kernel of ``code`` (after TVM's own preamble)."""
    if "namespace ctc_mma" in code:
        return code
    lib = library_source(code)
    if not lib:
        return code
    at = code.find('extern "C" __global__')
    at = at if at >= 0 else 0
    return code[:at] + lib + "\n" + code[at:]


_REGISTERED = False


def register_postproc() -> None:
    """Install :func:`postprocess_cuda_source` as TVM's CUDA source hook (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import tvm_ffi

    @tvm_ffi.register_global_func("tvm_callback_cuda_postproc", override=True)
    def _postproc(code: str, target: Any = None) -> str:  # noqa: ARG001 - TVM passes the target
        return postprocess_cuda_source(code)

    _REGISTERED = True
