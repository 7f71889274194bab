"""CUDA device-function library for ctc's tensor-core kernels, and the hook that compiles it in.

Why: TVM's TIR has no concise way to write a pipelined ``mma.sync`` kernel with the register
fragments shared between a ``q k^T`` and a ``p v`` product (flash attention) or a swizzled
``cp.async`` pipeline; CUDA C does.  ctc writes such kernels as ``__device__`` functions and calls
them from TIR PrimFuncs (``T.call_extern``) that keep everything else TVM's: the launch (grid,
block, dynamic shared memory), the buffers, the Relax VM call, CUDA-graph capture, the exported
library.  :func:`postprocess_cuda_source` is TVM's ``tvm_callback_cuda_postproc`` hook: a module
whose generated source calls one of the library's functions gets the library's source in front of
its first kernel; every other module is compiled unchanged.

The kernels: :mod:`.cuda_gemm` (prefill linears), :mod:`.cuda_flash` (prefill attention), :mod:`.cuda_gemv`
(int4 decode GEMVs).  This
module holds what they share: ``cp.async`` loads, ``ldmatrix`` and the ``m16n8k16`` MMA for f16
and bf16 (sm_80 on).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["PRIMITIVES", "device_type", "dtype_problem", "launcher", "library_source", "postprocess_cuda_source",
           "register_postproc"]

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

// The m16n8k16 MMA with f32 accumulators, and T <-> f32, for T = half (PTX f16) and __nv_bfloat16 (bf16).
#define CTC_MMA_FOR(TY, PTX, TO_F, FROM_F)                                                              \
  template <> struct Mma<TY> {                                                                          \
    static __device__ __forceinline__ void run(float* c, const unsigned* a, const unsigned* b) {        \
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX "." PTX ".f32 "                        \
                   "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                  \
                   : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                     \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));                 \
    }                                                                                                   \
    static __device__ __forceinline__ float to_f(TY x) { return TO_F(x); }                              \
    static __device__ __forceinline__ TY from_f(float x) { return FROM_F(x); }                          \
  };
CTC_MMA_FOR(half, "f16", __half2float, __float2half_rn)
CTC_MMA_FOR(__nv_bfloat16, "bf16", __bfloat162float, __float2bfloat16_rn)
#undef CTC_MMA_FOR

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

// Split-K: block column bn computes weight tile bn / splits over K range bn % splits; A and W move to the range's
// first column, K becomes the range's length (rows keep the full stride: read it first).  Returns the range.
template <typename P>  // P: the operands' pointer type, __restrict__ included
__device__ __forceinline__ int split_k_range(P& A, P& W, int& K, int& bn, int splits) {
  const int split = bn % splits;
  bn /= splits;
  A += (size_t)split * (K / splits);
  W += (size_t)split * (K / splits);
  K /= splits;
  return split;
}

// SwiGLU of one gate/up accumulator pair as the reference rounds it: round(silu(round(gate))) * round(up) (the
// caller's store rounds the product).
template <typename T> __device__ __forceinline__ float swiglu(float gate, float up) {
  const float g = Mma<T>::to_f(Mma<T>::from_f(gate));
  return Mma<T>::to_f(Mma<T>::from_f(g / (1.f + __expf(-g)))) * Mma<T>::to_f(Mma<T>::from_f(up));
}

// The GEMM epilogue of one output row held in m16n8 accumulator fragments (mma.sync's and wgmma's layout):
// acc[j * 4 + h * 2 + e] is column col0 + 8 j + t2 + e of `row` (h: the fragments' lower or upper 8 rows).  EPI 0:
// C = round(acc); 1: round(round(acc) + R); 2: SwiGLU of the gate/up column blocks j, j + 1 (rows interleaved by 8)
// into C [M][N / 2]; 3: f32 partial sums of K range `split` into C [splits][M][N].
template <typename T, int FN, int EPI>
__device__ __forceinline__ void store_fragment_row(const float* acc, int h, void* C_, const T* __restrict__ R, int row,
                                                   int col0, int M, int N, int split, int t2) {
  T* C = static_cast<T*>(C_);
  if (EPI == 3) {
    float* P = static_cast<float*>(C_) + ((size_t)split * M + row) * N + col0 + t2;
#pragma unroll
    for (int j = 0; j < FN; ++j)
      *reinterpret_cast<float2*>(P + j * 8) = make_float2(acc[j * 4 + h * 2], acc[j * 4 + h * 2 + 1]);
  } else if (EPI == 2) {
#pragma unroll
    for (int j = 0; j < FN; j += 2) {
      const float lo = swiglu<T>(acc[j * 4 + h * 2], acc[(j + 1) * 4 + h * 2]);
      const float hi = swiglu<T>(acc[j * 4 + h * 2 + 1], acc[(j + 1) * 4 + h * 2 + 1]);
      *reinterpret_cast<unsigned*>(C + (size_t)row * (N / 2) + (col0 + j * 8) / 2 + t2) = pack2<T>(lo, hi);
    }
  } else {
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      const int col = col0 + j * 8 + t2;
      float o[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        o[e] = acc[j * 4 + h * 2 + e];
        if (EPI == 1) o[e] = Mma<T>::to_f(Mma<T>::from_f(o[e])) + Mma<T>::to_f(R[(size_t)row * N + col + e]);
      }
      *reinterpret_cast<unsigned*>(C + (size_t)row * N + col) = pack2<T>(o[0], o[1]);
    }
  }
}

}  // namespace ctc_mma
"""


def _kernels() -> list[tuple[tuple[str, ...], Callable[[], str]]]:
    """(markers, source) of each kernel in the library, in the order they are put in: a module whose code contains
    any of the markers (the calls the TIR wrappers emit) gets the source.  The persistent decode step's source
    (made from its kernel's text when asked) uses :mod:`.cuda_gemv`'s helpers, so its marker pulls those in too."""
    from ctc.backends.tvm import cuda_decode_stack, cuda_flash, cuda_gemm, cuda_gemv, cuda_wgmma

    return [((cuda_gemm.MARKER,), lambda: cuda_gemm.CUDA_SOURCE),
            ((cuda_flash.MARKER,), lambda: cuda_flash.CUDA_SOURCE),
            ((cuda_gemv.MARKER, cuda_decode_stack.MARKER), lambda: cuda_gemv.CUDA_SOURCE),
            ((cuda_wgmma.MARKER,), lambda: cuda_wgmma.CUDA_SOURCE),
            ((cuda_decode_stack.MARKER,), cuda_decode_stack.device_source)]


def library_source(code: str) -> str:
    """The library source a generated module ``code`` needs ("" when it calls none of it)."""
    used = [src() for markers, src in _kernels() if any(mk in code for mk in markers)]
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


def dtype_problem(dtype: str, what: str) -> str | None:
    """Why ``what`` cannot take ``dtype`` (the library's kernels take float16 and bfloat16), or None."""
    return None if dtype in ("float16", "bfloat16") else f"dtype {dtype} ({what} takes float16 or bfloat16)"


def device_type(dtype: str) -> str:
    """The CUDA type of a float16/bfloat16 element."""
    return "half" if dtype == "float16" else "__nv_bfloat16"


def launcher(name: str, buffers: list[tuple[str, str, str]], symbols: list[str], grid: tuple[str, str], threads: int,
             smem_bytes: int, call: str, args: list[str], with_by: bool = True, with_ids: bool = True) -> Any:
    """A private PrimFunc ``name`` that launches ``grid`` blocks of ``threads`` threads, each calling the device
    function ``call`` with ``args`` (TIR expressions over the buffers, ``S`` = ``smem_bytes`` of dynamic shared
    memory, and ``bx``/``by``/``tx``).  ``buffers``: ``(name, shape, dtype)`` in parameter order; ``symbols``:
    the symbolic dims the shapes use; ``with_by=False`` leaves ``by`` out of the call, ``with_ids=False`` all three
    block/thread indices (the device function reads them itself; its last parameters may then be a pack).  Opaque
    to fusion (op_pattern 8), already scheduled."""
    import tvm

    ids = ['T.Cast("int32", bx)', *(['T.Cast("int32", by)'] if with_by else []), 'T.Cast("int32", tx)']
    params = ", ".join(f"{b[0].lower()}_h: T.handle" for b in buffers)
    src = ["@T.prim_func(private=True)", f"def {name}({params}):",
           '    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})',
           *(f"    {s} = T.int64()" for s in symbols),
           *(f'    {b} = T.match_buffer({b.lower()}_h, ({shape}), "{dt}")' for b, shape, dt in buffers),
           f'    bx = T.launch_thread("blockIdx.x", {grid[0]})',
           f'    by = T.launch_thread("blockIdx.y", {grid[1]})',
           f'    tx = T.launch_thread("threadIdx.x", {threads})',
           *([f'    S = T.decl_buffer(({smem_bytes},), "uint8", scope="shared.dyn")'] if smem_bytes else []),
           f'    T.evaluate(T.call_extern("void", "{call}", {", ".join([*args, *(ids if with_ids else [])])}))']
    return tvm.script.from_source("\n".join(src))
