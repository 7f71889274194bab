"""Hopper (sm_90a) GEMM for prefill linears: ``wgmma.mma_async`` from 128-byte-swizzled shared memory.

Why: ``mma.sync`` (:mod:`.cuda_gemm`) tops out near 230 TFLOP/s on an H100/H200: every 16 x 8 x 16 product
needs its operands in registers, moved there by ``ldmatrix``, so shared-memory -> register traffic bounds
it.  Hopper's warpgroup MMA reads both operands straight from shared memory through 64-bit matrix
descriptors, 64 x N x 16 per instruction for a warpgroup of 4 warps, asynchronously (cuBLAS's
``nvjet_sm90`` kernels run at ~690 TFLOP/s with it).

The kernel (:data:`CUDA_SOURCE`, a device function behind the same TIR launcher as the ``mma.sync`` GEMM,
same contract and epilogues, chosen by :class:`.cuda_gemm.GemmSpec` with ``wgmma=True``):

* a block of 256 threads = 2 warpgroups computes a ``128 x BN`` tile (``BN`` 64, 128 or 256), each
  warpgroup 64 rows; the K loop moves 64 columns (128 bytes) a step;
* all 256 threads load each stage with ``cp.async`` (16 bytes a thread, rows past ``M`` zero-filled)
  into K-major tiles in the 128-byte swizzle the descriptors name: 16-byte chunk ``c`` of row ``r`` at
  chunk ``c ^ (r % 8)``, rows 128 bytes apart, 8-row groups 1024 bytes apart (the stride the
  descriptor carries), every tile 1024-byte aligned;
* ``STAGES`` buffers; stage ``kt`` waits for its copies, fences them into the async proxy
  (``fence.proxy.async``: ``cp.async`` writes are generic-proxy writes the tensor cores read), then the
  block refills the stage that the products two steps back read, issues 4 ``wgmma`` (k 16 each) and keeps
  one group of products in flight (``wgmma.wait_group 1``);
* accumulators: per thread ``BN / 2`` f32 in ``mma.sync``'s ``m16n8`` fragment order (warp ``w`` of a
  warpgroup holds rows ``16 w .. 16 w + 15``), so the epilogues (rounding, residual, SwiGLU over gate/up
  rows interleaved by 8, f32 split-K partials) are the ``mma.sync`` kernel's (``ctc_mma::store_fragment_row``);
  ``STAGED`` routes the outputs through shared memory instead and stores 16-byte row chunks.

Measured on one H200 (2026-12-03, ``benchmarks/cuda_kernel_check.py run --time``, 512 rows, f16, graph-timed,
every case within the f32 reference's tolerance): q|k|v 2048 -> 3072 21.8 us (296 TFLOP/s; ``mma.sync`` 42.8),
o + residual 17.5 (29.2), gate|up + SwiGLU 2048 -> 16384 71.4 (481 TFLOP/s; 148.3), down + residual
8192 -> 2048 49.3 (82.0), LM head 2048 -> 128256 588.5 (457 TFLOP/s; 1244.9).  cuBLAS's ``nvjet_sm90`` kernels
(TMA, a producer warp, persistent tiles) do the layer GEMMs at ~690 TFLOP/s: a producer warpgroup with
``mbarrier``-tracked copies and a persistent, epilogue-overlapped schedule are what is left.

Needs ``sm_90a`` (the arch-specific target: ``wgmma`` is not in plain ``sm_90``); the source refuses to
compile for anything else.  No TMA: the descriptor-made tensor map needs a host call (``cuTensorMapEncodeTiled``)
that a TVM-launched kernel has no place for.
"""

from __future__ import annotations

__all__ = ["BK", "CUDA_SOURCE", "MARKER", "WIDTHS", "wgmma_source"]

MARKER = "ctc_wgmma::"
BK = 64          # K columns a stage holds: one 128-byte swizzle row of f16/bf16
WIDTHS = (64, 128, 256)  # BN: the n of m64nNk16


def _mma_struct(ty: str, ptx: str, n: int) -> str:
    """``Wgmma<ty, n>::run(d, desc_a, desc_b)``: one ``m64n{n}k16`` product added into ``d`` (f32)."""
    regs = n // 2
    outs = ", ".join(f"%{i}" for i in range(regs))
    cons = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
    return (f"template <> struct Wgmma<{ty}, {n}> {{\n"
            "  static __device__ __forceinline__ void run(float* d, unsigned long long da, unsigned long long db) {\n"
            f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{regs + 2}, 0;\\n"\n'
            f'                 "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ptx}.{ptx} "\n'
            f'                 "{{{outs}}}, %{regs}, %{regs + 1}, p, 1, 1, 0, 0;\\n}}\\n"\n'
            f'                 : {cons}\n'
            '                 : "l"(da), "l"(db), "r"(1));\n'
            "  }\n};\n")


def wgmma_source() -> str:
    """The CUDA source of the library (device functions in ``namespace ctc_wgmma``)."""
    structs = "".join(_mma_struct(ty, ptx, n) for ty, ptx in (("half", "f16"), ("__nv_bfloat16", "bf16"))
                      for n in WIDTHS)
    return _HEAD + structs + _BODY


_HEAD = r"""
// ---- ctc: Hopper warpgroup-MMA GEMM (ctc/backends/tvm/cuda_wgmma.py) ----
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "ctc_wgmma needs the sm_90a target (wgmma.mma_async); build for arch sm_90a"
#endif
namespace ctc_wgmma {
using namespace ctc_mma;

template <typename T, int N> struct Wgmma;
"""

_BODY = r"""
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}
__device__ __forceinline__ void proxy_fence() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accumulator reads/writes across the asynchronous products.
__device__ __forceinline__ void keep(float& x) { asm volatile("" : "+f"(x) :: "memory"); }

// Shared-memory matrix descriptor of a K-major tile in the 128-byte swizzle: start address >> 4 (bits 0-13),
// leading byte offset 16 >> 4 (bits 16-29; unused by swizzled K-major tiles), stride byte offset 1024 >> 4 between
// 8-row groups (bits 32-45), swizzle mode 1 = 128 bytes (bits 62-63).
__device__ __forceinline__ unsigned long long desc(unsigned addr) {
  return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}

// Byte offset of 16-byte chunk c of row r in a [rows][64] tile of 2-byte elements, 128-byte swizzle.
__device__ __forceinline__ unsigned swz128(int r, int c) { return (unsigned)(r * 128 + ((c ^ (r & 7)) << 4)); }

// C = epilogue(A [M, K] . W [N, K]^T) for one 128 x BN tile (block (bm, bn)), 256 threads; EPI as ctc_gemm::gemm_tile
// (0 none, 1 residual, 2 silu_mul, 3 f32 partials of split bn % splits).  smem: STAGES * (128 + BN) * 128 bytes
// + 1024 (alignment).  K / splits must be a multiple of 64.  INFLIGHT: groups of products left running while the
// next stage's copies are issued (1: a stage is refilled two steps after its products, lookahead STAGES - 2; 0: each
// step waits for its products, lookahead STAGES - 1).  STAGED (EPI 0-2): the outputs go through shared memory and
// leave as 16-byte row-contiguous stores (the residual read the same way) instead of 4-byte stores per fragment.
template <typename T, int BN, int STAGES, int EPI, int INFLIGHT = 1, bool STAGED = false>
__device__ __forceinline__ void gemm_tile(const T* __restrict__ A, const T* __restrict__ W, void* C_,
                                          const T* __restrict__ R, unsigned char* smem, int M, int N, int K,
                                          int splits, int bm, int bn, int tid) {
  static_assert(STAGES >= 2 + INFLIGHT, "a stage in the products, one being filled, one landed");
  constexpr int BM = 128, FN = BN / 8, LAG = 1 + INFLIGHT;
  constexpr unsigned A_BYTES = BM * 128, B_BYTES = BN * 128, STAGE = A_BYTES + B_BYTES;
  T* C = static_cast<T*>(C_);
  const int ldk = K;
  const int split = split_k_range(A, W, K, bn, splits);
  const int KT = K / 64;
  const int m0 = bm * BM, n0 = bn * BN;
  const unsigned raw = smem_addr(smem);
  const unsigned base = (raw + 1023u) & ~1023u;  // swizzle atoms are 1024-byte aligned
  unsigned char* sbase = smem + (base - raw);

  auto load = [&](int stage, int kt) {
    const int k0 = kt * 64;
    unsigned char* as = sbase + stage * STAGE;
    unsigned char* bs = as + A_BYTES;
#pragma unroll
    for (int i = tid; i < BM * 8; i += 256) {
      const int r = i >> 3, c = i & 7, gr = m0 + r;
      const bool ok = gr < M;
      cp_async16(as + swz128(r, c), A + (size_t)(ok ? gr : 0) * ldk + k0 + c * 8, ok);
    }
#pragma unroll
    for (int i = tid; i < BN * 8; i += 256) {
      const int r = i >> 3, c = i & 7;
      cp_async16(bs + swz128(r, c), W + (size_t)(n0 + r) * ldk + k0 + c * 8, true);
    }
  };

  float d[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) d[i] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - LAG; ++s) {
    if (s < KT) load(s, s);
    cp_async_commit();
  }
  const int wg = tid >> 7;
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - LAG - 1>();  // stage kt landed (this thread's copies)
    proxy_fence();                      // ... visible to the tensor cores
    __syncthreads();                    // every thread's copies; every warpgroup's products of kt - LAG done
    {
      const int nk = kt + STAGES - LAG;
      if (nk < KT) load(nk % STAGES, nk);
      cp_async_commit();
    }
    const unsigned as = base + (kt % STAGES) * STAGE + wg * 64 * 128;
    const unsigned bs = base + (kt % STAGES) * STAGE + A_BYTES;
    fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) Wgmma<T, BN>::run(d, desc(as + kk * 32), desc(bs + kk * 32));
    commit();
    wait<INFLIGHT>();
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) keep(d[i]);
  }
  wait<0>();
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) keep(d[i]);
  cp_async_wait<0>();

  const int lane = tid & 31, g = lane >> 2, t2 = (lane & 3) << 1;
  const int wrow = wg * 64 + ((tid >> 5) & 3) * 16;  // the warp's first row in the tile
  if (STAGED && EPI != 3) {
    // Phase 1: each thread's values (rounded; the SwiGLU finished) into a [128][OW] tile, rows padded by 16 bytes
    // so the 8 rows x 4 column pairs a warp writes fall in 32 different banks.  Phase 2: 16-byte row chunks out.
    constexpr int OW = EPI == 2 ? BN / 2 : BN, PITCH = OW * 2 + 16;
    __syncthreads();  // every warpgroup done with the stages' shared memory
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      unsigned char* srow = sbase + (wrow + g + h * 8) * PITCH;
      if (EPI == 2) {
#pragma unroll
        for (int j = 0; j < FN; j += 2)
          *reinterpret_cast<unsigned*>(srow + ((j * 8) / 2 + t2) * 2) =
              pack2<T>(swiglu<T>(d[j * 4 + h * 2], d[(j + 1) * 4 + h * 2]),
                       swiglu<T>(d[j * 4 + h * 2 + 1], d[(j + 1) * 4 + h * 2 + 1]));
      } else {
#pragma unroll
        for (int j = 0; j < FN; ++j)
          *reinterpret_cast<unsigned*>(srow + (j * 8 + t2) * 2) = pack2<T>(d[j * 4 + h * 2], d[j * 4 + h * 2 + 1]);
      }
    }
    __syncthreads();
    const int ldc = EPI == 2 ? N / 2 : N, c0 = EPI == 2 ? n0 / 2 : n0;
#pragma unroll 4
    for (int i = tid; i < BM * (OW / 8); i += 256) {
      const int r = i / (OW / 8), c = (i % (OW / 8)) * 8;
      if (m0 + r >= M) continue;
      uint4 v = *reinterpret_cast<const uint4*>(sbase + r * PITCH + c * 2);
      const size_t at = (size_t)(m0 + r) * ldc + c0 + c;
      if (EPI == 1) {
        const uint4 rv = *reinterpret_cast<const uint4*>(R + at);
        const T* x = reinterpret_cast<const T*>(&v);
        const T* y = reinterpret_cast<const T*>(&rv);
        unsigned o[4];
#pragma unroll
        for (int e = 0; e < 4; ++e)
          o[e] = pack2<T>(Mma<T>::to_f(x[2 * e]) + Mma<T>::to_f(y[2 * e]),
                          Mma<T>::to_f(x[2 * e + 1]) + Mma<T>::to_f(y[2 * e + 1]));
        v = make_uint4(o[0], o[1], o[2], o[3]);
      }
      *reinterpret_cast<uint4*>(C + at) = v;
    }
  } else {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + wrow + g + h * 8;
      if (row < M) store_fragment_row<T, FN, EPI>(d, h, C_, R, row, n0, M, N, split, t2);
    }
  }
}

}  // namespace ctc_wgmma
// ---- end ctc wgmma ----
"""

CUDA_SOURCE = wgmma_source()
