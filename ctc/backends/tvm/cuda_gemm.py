"""Tensor-core GEMM for prefill linears on CUDA: ``mma.sync`` with ``ldmatrix`` and a ``cp.async`` pipeline.

Why: the PyPI TVM runtime carries no cuBLAS, and dlight's ``Matmul`` rule (``wmma``, fixed 128 x 128
tiles) neither fuses a SwiGLU nor picks its tile from the shape.  This kernel is a CUDA device
function (:data:`CUDA_SOURCE`, compiled into TVM's module by :mod:`.cuda_mma`'s hook) launched from a
TIR PrimFunc (:func:`gemm_func`) whose launch, shared memory and buffers are TVM's, so the Relax VM,
CUDA-graph capture and the exported library treat it like any other kernel.  Measured on the H200 at
a Llama-1B prefill's shapes it runs at dlight's speed (120-230 TFLOP/s: bound by L2 -> SM traffic, see
:attr:`GemmSpec.tiles`) with the residual add or SwiGLU in its epilogue.  For the arch-specific Hopper
target ``sm_90a`` the same spec with ``wgmma=True`` launches :mod:`.cuda_wgmma`'s warpgroup-MMA kernel
instead (same operands, epilogues and split-K; 250-490 TFLOP/s at those shapes).

What it computes: ``C[m, n] = epilogue(A[m, :] . W[n, :])`` with ``A`` ``[M, K]`` (any ``M``, even
symbolic), the weight ``W`` ``[N, K]`` as a linear stores it, f16/bf16 inputs, f32 sums:

* ``"none"``: ``C = round(acc)``;
* ``"residual"``: ``C = round(round(acc) + R)`` (the linear, then the add, each rounded as the
  reference rounds);
* ``"silu_mul"``: ``W`` holds the gate and up rows interleaved in groups of 8 (:func:`gate_up_order`),
  ``C[m, f] = round(round(silu(round(gate))) * round(up))`` with ``N = 2F``.

Each block computes a ``BM x BN`` tile with ``(BM / WM) x (BN / WN)`` warps; the K loop moves 32
columns a step through ``STAGES`` shared-memory buffers (``cp.async``, rows past ``M`` zero-filled),
swizzled so ``ldmatrix`` reads are free of bank conflicts.  Blocks walk M fastest, so the blocks that
share a weight tile run together and the weight leaves DRAM once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["BK", "CUDA_SOURCE", "MARKER", "DequantSpec", "GemmSpec", "dequant_func", "dequant_supported",
           "gate_up_order", "gemm_func", "gemm_supported", "splitk_reduce_func"]

MARKER = "ctc_gemm::"
BK = 32
SMS = 132  # streaming multiprocessors of an H100/H200, what the tile choice fills
SPLIT_K = True  # large tiles over K ranges (summed by a second kernel) where the tiles alone leave SMs idle
WG_BK = 64  # K columns of one warpgroup-MMA stage (cuda_wgmma.BK)
WG_WIDTHS = (64, 128, 256)  # its block tile widths (cuda_wgmma.WIDTHS)

CUDA_SOURCE = r"""
// ---- ctc: tensor-core GEMM (ctc/backends/tvm/cuda_gemm.py) ----
namespace ctc_gemm {
using namespace ctc_mma;

// Element offset of (row, k) in a [rows][32] tile: 16-byte chunk c of row r is stored at c ^ ((r >> 1) & 3),
// so the 8 rows one ldmatrix phase reads fall in 8 different 16-byte bank groups.
__device__ __forceinline__ int swz(int row, int k) {
  return row * 32 + ((((k >> 3) ^ (row >> 1)) & 3) << 3) + (k & 7);
}

// EPI: 0 none, 1 residual, 2 silu_mul (gate/up rows interleaved by 8), 3 f32 partial sums of one of
// `splits` K ranges (split-K: block column bn covers weight tile bn / splits, K range bn % splits; the partials
// go to C_ as float [splits][M][N], summed by splitk_reduce).
template <typename T, int BM, int BN, int WM, int WN, int STAGES, int EPI>
__device__ __forceinline__ void gemm_tile(const T* __restrict__ A, const T* __restrict__ W, void* C_,
                                          const T* __restrict__ R, unsigned char* smem, int M, int N, int K,
                                          int splits, int bm, int bn, int tid) {
  const int ldk = K;
  const int split = split_k_range(A, W, K, bn, splits);
  constexpr int WARPS_N = BN / WN;
  constexpr int THREADS = (BM / WM) * WARPS_N * 32;
  constexpr int FM = WM / 16, FN = WN / 8;
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + STAGES * BM * 32;
  const int warp = tid >> 5, lane = tid & 31;
  const int wm = (warp / WARPS_N) * WM, wn = (warp % WARPS_N) * WN;
  const int m0 = bm * BM, n0 = bn * BN;
  const int KT = K / 32;

  auto load = [&](int stage, int kt) {
    const int k0 = kt * 32;
    T* as = As + stage * BM * 32;
    T* bs = Bs + stage * BN * 32;
#pragma unroll
    for (int i = tid; i < BM * 4; i += THREADS) {
      int r = i >> 2, c = (i & 3) << 3;
      int gr = m0 + r;
      bool ok = gr < M;
      cp_async16(as + swz(r, c), A + (size_t)(ok ? gr : 0) * ldk + k0 + c, ok);
    }
#pragma unroll
    for (int i = tid; i < BN * 4; i += THREADS) {
      int r = i >> 2, c = (i & 3) << 3;
      cp_async16(bs + swz(r, c), W + (size_t)(n0 + r) * ldk + k0 + c, true);
    }
  };

  float acc[FM][FN][4];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    {
      int nk = kt + STAGES - 1;
      if (nk < KT) load(nk % STAGES, nk);
      cp_async_commit();
    }
    const T* as = As + (kt % STAGES) * BM * 32;
    const T* bs = Bs + (kt % STAGES) * BN * 32;
#pragma unroll
    for (int kk = 0; kk < 32; kk += 16) {
      unsigned af[FM][4], bf[FN][2];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        int r = wm + i * 16 + (lane & 15);
        ldmatrix_x4(af[i], as + swz(r, kk + ((lane >> 4) << 3)));
      }
#pragma unroll
      for (int j = 0; j < FN; j += 2) {
        int mi = lane >> 3;
        int r = wn + j * 8 + ((mi >> 1) << 3) + (lane & 7);
        unsigned t[4];
        ldmatrix_x4(t, bs + swz(r, kk + ((mi & 1) << 3)));
        bf[j][0] = t[0]; bf[j][1] = t[1]; bf[j + 1][0] = t[2]; bf[j + 1][1] = t[3];
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) Mma<T>::run(acc[i][j], af[i], bf[j]);
    }
  }
  cp_async_wait<0>();

  const int g = lane >> 2, t2 = (lane & 3) << 1;
#pragma unroll
  for (int i = 0; i < FM; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + wm + i * 16 + g + h * 8;
      if (row < M) store_fragment_row<T, FN, EPI>(&acc[i][0][0], h, C_, R, row, n0 + wn, M, N, split, t2);
    }
  }
}

// C = epilogue(sum of the split-K partials P [splits][M][N]); 4 elements per thread, 256 threads a block.
template <typename T, int EPI>
__device__ __forceinline__ void splitk_reduce(const float* __restrict__ P, const T* __restrict__ R, T* __restrict__ C,
                                              int M, int N, int splits, int bx, int tid) {
  const size_t total = (size_t)M * N, i = ((size_t)bx * 256 + tid) * 4;
  if (i >= total) return;
  float4 a = *reinterpret_cast<const float4*>(P + i);
  for (int z = 1; z < splits; ++z) {
    const float4 p = *reinterpret_cast<const float4*>(P + (size_t)z * total + i);
    a.x += p.x; a.y += p.y; a.z += p.z; a.w += p.w;
  }
  const float v[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    T y = Mma<T>::from_f(v[e]);
    if (EPI == 1) y = Mma<T>::from_f(Mma<T>::to_f(y) + Mma<T>::to_f(R[i + e]));
    C[i + e] = y;
  }
}

// Integer weight-only linears of many rows: the packed weight expanded to T [N][K] for gemm_tile.  BITS 4:
// Q [N][K/2] bytes, element k the nibble k % 2 of byte k / 2 (low first), offset binary (q + 8); BITS 8: Q [N][K]
// int8.  W = (q - zero) * scale per group of GROUP input channels, computed in f32 and rounded once to T (the
// dequantized f32 weight, rounded as an fp16 weight is); Z is the zero point's type (int8, or float for float
// zeros).  Work unit: a chunk of 8 weights (4 or 8 packed bytes in, 16 bytes out); a block of 256 threads expands
// 4 x 256 consecutive chunks, chunk i * 256 + tid in its step i, so every load and store of a warp is one
// contiguous run (128 or 256 bytes in, 512 out); the 4 loads are issued before any store.  K and GROUP are
// compile-time constants (a chunk never straddles a group: GROUP is a multiple of 32).
// Weights (2j, 2j + 1) of a chunk of 8 as floats: int4 (one word, offset-binary nibbles) or int8 (two words).
__device__ __forceinline__ void chunk_pair(unsigned v, int j, float& lo, float& hi) {
  const unsigned w = v >> (j * 8);
  lo = (float)(w & 15u); hi = (float)((w >> 4) & 15u);
}
__device__ __forceinline__ void chunk_pair(uint2 v, int j, float& lo, float& hi) {
  const unsigned w = (j < 2 ? v.x : v.y) >> ((j & 1) * 16);
  lo = (float)(signed char)(w & 255u); hi = (float)(signed char)((w >> 8) & 255u);
}
template <int BITS> struct PackedChunk { using type = unsigned; };
template <> struct PackedChunk<8> { using type = uint2; };

template <typename T, int BITS, typename Z, int K, int GROUP>
__device__ __forceinline__ void dequant_weight(const void* __restrict__ Q_, const float* __restrict__ S,
                                               const Z* __restrict__ ZP, T* __restrict__ W, int N, int bx, int tid) {
  constexpr int CPR = K / 8, G = (K + GROUP - 1) / GROUP;  // chunks per row, groups per row
  const unsigned total = (unsigned)N * CPR;
  using In = typename PackedChunk<BITS>::type;
  In q[4];
  unsigned c[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    c[i] = (unsigned)bx * 1024u + (unsigned)(i * 256 + tid);
    if (c[i] < total) q[i] = reinterpret_cast<const In*>(Q_)[c[i]];
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (c[i] >= total) return;
    const unsigned n = c[i] / CPR, g = (c[i] % CPR) * 8 / GROUP;
    const float s = S[n * G + g];
    const float base = (BITS == 4 ? -8.f : 0.f) - (float)ZP[n * G + g];
    unsigned o[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // weights (2j, 2j + 1) -> one 32-bit word of two T
      float lo, hi;
      chunk_pair(q[i], j, lo, hi);
      o[j] = pack2<T>((lo + base) * s, (hi + base) * s);
    }
    reinterpret_cast<uint4*>(W)[c[i]] = make_uint4(o[0], o[1], o[2], o[3]);
  }
}

}  // namespace ctc_gemm
// ---- end ctc ----
"""


_EPILOGUES = {"none": 0, "residual": 1, "silu_mul": 2}


@dataclass(frozen=True)
class GemmSpec:
    """``C[M, n_out] = epilogue(A[M, K] @ W[N, K]^T)``; ``M`` is the PrimFunc's symbolic row count.

    ``tile``: ``(BM, BN, WM, WN, stages)``; ``()`` picks one from the shape (:meth:`tiles`)."""

    k: int
    n: int
    dtype: str
    epilogue: str = "none"
    rows_hint: int = 512           # the M the tile choice assumes (a prefill's tokens); any M runs
    tile: tuple[int, ...] = ()
    splits: int = 0                # K ranges summed by a second kernel (split-K); 0: from the shape
    wgmma: bool = False            # Hopper's warpgroup MMA (:mod:`.cuda_wgmma`, sm_90a) instead of mma.sync
    wg_inflight: int = 1           # wgmma: product groups left running while a stage refills (1 or 0)
    wg_staged: bool | None = None  # wgmma: outputs through shared memory as 16-byte row stores; None: by rule

    @property
    def n_out(self) -> int:
        return self.n // 2 if self.epilogue == "silu_mul" else self.n

    @property
    def tiles(self) -> tuple[int, int, int, int, int]:
        """The block tile ``(BM, BN, WM, WN, stages)``.  The kernel is bound by L2 -> SM traffic (a tile does
        ``BM * BN / (BM + BN)`` flops per byte loaded: 64 at 128 x 128, 32 at 64 x 64), so 128 x 128 (8 warps of
        64 x 32) wherever it, times the K splits (:attr:`k_splits`), gives every SM about two blocks at
        ``rows_hint`` rows; else 64 x 64 (4 warps of 32 x 32).  Measured on the H200 at 512 rows
        (``cuda_kernel_check.py --sweep``, 2026-12-03): down (K 8192, N 2048) 131 us at 64 x 64, 192 at 128 x 128,
        97 / 83 / 91 with 2 / 4 / 8 K splits at 128 x 128; o (K 2048, N 2048) 36.3 at 64 x 64, 28.7 with 4 splits;
        q|k|v (N 3072) 43.4 at 64 x 64, 54.5 at 128 x 128, 44.0 with 4 splits; gate|up (N 16384) 149 at 128 x 128
        vs 166; the LM head (N 128256) 1261 at 128 x 128, 1338 and slower with splits."""
        if self.tile:
            bm, bn, wm, wn, st = self.tile
            return bm, bn, wm, wn, st
        return self._choice[0]

    @property
    def k_splits(self) -> int:
        """K ranges computed by separate blocks and summed by :func:`splitk_reduce_func` (1: none)."""
        if self.splits:
            return self.splits
        return 1 if self.tile else self._choice[1]

    @property
    def _choice(self) -> tuple[tuple[int, int, int, int, int], int]:
        if self.wgmma:
            return self._wgmma_choice
        big = self.n % 128 == 0
        blocks = -(-self.rows_hint // 128) * (self.n // 128)
        if big and blocks >= 2 * SMS:
            return (128, 128, 64, 32, 4), 1
        if big and self.epilogue != "silu_mul" and SPLIT_K:
            for s in (2, 4, 8, 16):
                if blocks * s >= 1.9 * SMS and self.k % (s * BK) == 0 and self.k // s >= 256:
                    return (128, 128, 64, 32, 4), s
        return (64, 64, 32, 32, 4), 1

    @property
    def _wgmma_choice(self) -> tuple[tuple[int, int, int, int, int], int]:
        """The warpgroup-MMA tile ``(128, BN, 64, BN, stages)`` (two warpgroups of 64 rows): the widest ``BN``
        (256, 128, 64) dividing N whose tiles fill every SM once at ``rows_hint`` rows, else 128 (or 64), over
        the fewest K splits that fill 90% of the SMs where the tiles alone fill < 70%.  Measured on the H200 at
        512 rows (``cuda_kernel_check.py --wgmma-sweep``, 2026-12-03, us): gate|up (N 16384) 70.5 at 128 x 256
        vs 81-89 at 128 x 128; LM head (N 128256) 653 at 128 x 256 vs 737-763; q|k|v (N 3072, 96 tiles of 128)
        23.6 unsplit vs 29.0 with 2 splits; o (N 2048, 64 tiles) 16.9 with 2 splits vs 23.3 unsplit; down
        (K 8192, N 2048) 50.1 with 2 splits, 53.9 with 4, 79.6 unsplit."""
        tiles = -(-self.rows_hint // 128)
        for bn in (256, 128):
            if self.n % bn == 0 and tiles * (self.n // bn) >= SMS:
                return (128, bn, 64, bn, 4), 1
        bn = 128 if self.n % 128 == 0 else 64
        blocks = tiles * (self.n // bn)
        if self.epilogue != "silu_mul" and SPLIT_K and blocks < 0.7 * SMS:
            for s in (2, 4, 8):
                if blocks * s >= 0.9 * SMS and self.k % (s * WG_BK) == 0 and self.k // s >= 256:
                    return (128, bn, 64, bn, 4), s
        return (128, bn, 64, bn, 4), 1

    @property
    def staged(self) -> bool:
        """Whether the wgmma kernel's outputs leave through shared memory as 16-byte row stores: given, or where
        measured faster (H200, 512 rows, 2026-12-03: LM head 588 vs 647 us, q|k|v 21.8 vs 23.5; the SwiGLU's
        81 vs 71: ptxas serializes its products then, C7514); never for split-K's f32 partials."""
        if self.wg_staged is not None:
            return self.wg_staged and self.k_splits == 1
        return self.epilogue in ("none", "residual") and self.k_splits == 1

    @property
    def threads(self) -> int:
        bm, bn, wm, wn, _ = self.tiles
        return (bm // wm) * (bn // wn) * (128 if self.wgmma else 32)

    @property
    def smem_bytes(self) -> int:
        bm, bn, _, _, st = self.tiles
        if self.wgmma:  # 128-byte rows of 64 K columns, plus room to align the tiles to 1024 bytes
            return st * (bm + bn) * WG_BK * 2 + 1024
        return st * (bm + bn) * BK * 2

    @property
    def tag(self) -> str:
        bm, bn, wm, wn, st = self.tiles
        split = f"k{self.k_splits}" if self.k_splits > 1 else ""
        wg = f"wg{'' if self.wg_inflight == 1 else 'f0'}{'o' if self.staged else ''}" if self.wgmma else ""
        return (f"k{self.k}n{self.n}{self.epilogue[:3]}_{wg}{bm}x{bn}w{wm}x{wn}s{st}{split}"
                f"{'bf' if 'bfloat' in self.dtype else ''}")


def gemm_supported(spec: GemmSpec) -> str | None:
    """Why :func:`gemm_func` cannot build ``spec``, or None."""
    from ctc.backends.tvm.cuda_mma import dtype_problem

    if dtype_problem(spec.dtype, "the tensor-core GEMM"):
        return dtype_problem(spec.dtype, "the tensor-core GEMM")
    if spec.k % BK:
        return f"K = {spec.k} is not a multiple of {BK}"
    if spec.epilogue not in _EPILOGUES:
        return f"epilogue {spec.epilogue!r}"
    bm, bn, wm, wn, st = spec.tiles
    if spec.n % bn:
        return f"N = {spec.n} is not a multiple of the {bn}-wide block tile"
    if spec.wgmma:
        if (bm, wm, wn) != (128, 64, bn) or bn not in WG_WIDTHS or st < 2 + spec.wg_inflight:
            return f"warpgroup-MMA tile {spec.tiles} (128 x BN, BN in {WG_WIDTHS}, >= 3 stages, 2 with wg_inflight=0)"
        if spec.wg_inflight not in (0, 1):
            return f"wg_inflight={spec.wg_inflight} (0 or 1)"
        if spec.k % (spec.k_splits * WG_BK):
            return f"K = {spec.k} is not a multiple of {WG_BK} x {spec.k_splits} K splits (warpgroup MMA)"
    if spec.epilogue == "silu_mul" and (wn % 16 or spec.n % 16):
        return "silu_mul needs gate/up pairs of 8 columns inside a warp tile"
    if bm % wm or bn % wn or wm % 16 or wn % 16 or st < 2:
        return f"tile {spec.tiles}"
    if spec.smem_bytes > 227 * 1024:
        return f"{spec.smem_bytes} bytes of shared memory"
    if spec.k_splits > 1 and (spec.epilogue == "silu_mul" or spec.k % (spec.k_splits * BK)):
        return f"{spec.k_splits} K splits (K a multiple of 32 x splits; no SwiGLU epilogue)"
    return None


def gemm_func(spec: GemmSpec) -> Any:
    """The PrimFunc ``(A [M, K], W [N, K][, R [M, N]], C [M, n_out])`` launching the device function; with
    K splits ``(A, W, P [splits, M, N] f32)`` (partial sums; :func:`splitk_reduce_func` finishes)."""
    from ctc.backends.tvm.cuda_mma import device_type, launcher

    why = gemm_supported(spec)
    if why is not None:
        raise ValueError(f"gemm_func: {why}")
    bm, bn, wm, wn, st = spec.tiles
    dt, K, N, sp = spec.dtype, spec.k, spec.n, spec.k_splits
    res = spec.epilogue == "residual" and sp == 1
    out = ("C", f"m, {spec.n_out}", dt) if sp == 1 else ("C", f"{sp}, m, {N}", "float32")
    bufs = [("A", f"m, {K}", dt), ("W", f"{N}, {K}", dt), *([("R", f"m, {N}", dt)] if res else []), out]
    epi = _EPILOGUES[spec.epilogue] if sp == 1 else 3
    call = f"ctc_gemm::gemm_tile<{device_type(dt)}, {bm}, {bn}, {wm}, {wn}, {st}, {epi}>"
    if spec.wgmma:
        staged = "true" if spec.staged and epi != 3 else "false"
        call = f"ctc_wgmma::gemm_tile<{device_type(dt)}, {bn}, {st}, {epi}, {spec.wg_inflight}, {staged}>"
    args = ["A.data", "W.data", "C.data", "R.data" if res else "A.data",  # no residual: an unread pointer
            "S.data", 'T.Cast("int32", m)', str(N), str(K), str(sp)]
    return launcher("ctc_mma_gemm", bufs, ["m"], (f"(m + {bm - 1}) // {bm}", str(N // bn * sp)), spec.threads,
                    spec.smem_bytes, call, args)


def splitk_reduce_func(spec: GemmSpec) -> Any:
    """The PrimFunc ``(P [splits, M, N] f32, R [M, N] or A [M, K], C [M, N])``: the partials' sum with the
    epilogue.  Without a residual it takes the GEMM's input ``A`` unread: Relax's RewriteDataflowReshape
    fails on a kernel of one input that is not a TIR block (TVM 0.27)."""
    from ctc.backends.tvm.cuda_mma import device_type, launcher

    dt, N, sp = spec.dtype, spec.n, spec.k_splits
    res = spec.epilogue == "residual"
    second = ("R", f"m, {N}", dt) if res else ("A", f"m, {spec.k}", dt)
    bufs = [("P", f"{sp}, m, {N}", "float32"), second, ("C", f"m, {N}", dt)]
    call = f"ctc_gemm::splitk_reduce<{device_type(dt)}, {int(res)}>"
    args = ["P.data", f"{second[0]}.data", "C.data", 'T.Cast("int32", m)', str(N), str(sp)]
    return launcher("ctc_splitk_reduce", bufs, ["m"], (f"(m * {N // 4} + 255) // 256", "1"), 256, 0, call, args,
                    with_by=False)


def gate_up_order(features: int) -> Any:
    """Row order of the ``silu_mul`` weight: indices into ``concat([gate, up])`` (``[2F, K]``) taking 8 gate
    rows, then the same 8 features' up rows, and so on (a warp's neighbouring 8-column fragments are then
    the gate and up of one feature block).  Indexing works on numpy arrays and torch tensors alike."""
    import numpy as np

    if features % 8:
        raise ValueError(f"gate_up_order: {features} features is not a multiple of 8")
    blocks = np.arange(features).reshape(-1, 8)
    return np.stack([blocks, blocks + features], axis=1).reshape(-1)


@dataclass(frozen=True)
class DequantSpec:
    """An integer weight-only linear's packed weight ``[N, K]`` (``bits`` 4 or 8, :mod:`ctc.ir.quant`'s storage,
    f32 scales and ``zero_dtype`` zero points ``[N, G]`` per ``group`` input channels, -1: one group a row)
    expanded to ``dtype`` for :func:`gemm_func`."""

    n: int
    k: int
    bits: int
    group: int
    dtype: str
    zero_dtype: str = "int8"

    @property
    def group_size(self) -> int:
        return self.k if self.group == -1 else self.group

    @property
    def groups(self) -> int:
        return -(-self.k // self.group_size)

    @property
    def tag(self) -> str:
        zero = "" if self.zero_dtype == "int8" else "zf"
        return f"n{self.n}k{self.k}w{self.bits}g{self.group_size}{zero}{'bf' if 'bfloat' in self.dtype else ''}"


def dequant_supported(spec: DequantSpec) -> str | None:
    """Why :func:`dequant_func` cannot build ``spec``, or None."""
    from ctc.backends.tvm.cuda_mma import dtype_problem

    if dtype_problem(spec.dtype, "the weight expansion"):
        return dtype_problem(spec.dtype, "the weight expansion")
    if spec.bits not in (4, 8):
        return f"{spec.bits}-bit weights (4 or 8)"
    if spec.k % BK or spec.group_size % BK:
        return f"K = {spec.k} and the group size {spec.group_size} must be multiples of {BK}"
    if spec.zero_dtype not in ("int8", "float32"):
        return f"zero points of dtype {spec.zero_dtype}"
    return None


def dequant_func(spec: DequantSpec) -> Any:
    """The PrimFunc ``(Q, scale [N, G] f32, zero [N, G], W [N, K])``: the packed weight expanded (4 chunks of 8
    weights a thread, coalesced: see the device function)."""
    from ctc.backends.tvm.cuda_mma import device_type, launcher

    why = dequant_supported(spec)
    if why is not None:
        raise ValueError(f"dequant_func: {why}")
    n, k, g = spec.n, spec.k, spec.groups
    q = ("Q", f"{n}, {k // 2}", "uint8") if spec.bits == 4 else ("Q", f"{n}, {k}", "int8")
    bufs = [q, ("S", f"{n}, {g}", "float32"), ("Z", f"{n}, {g}", spec.zero_dtype), ("W", f"{n}, {k}", spec.dtype)]
    zt = "signed char" if spec.zero_dtype == "int8" else "float"
    call = f"ctc_gemm::dequant_weight<{device_type(spec.dtype)}, {spec.bits}, {zt}, {k}, {spec.group_size}>"
    blocks = -(-(n * k // 8) // 1024)
    return launcher("ctc_dequant", bufs, [], (str(blocks), "1"), 256, 0, call,
                    ["Q.data", "S.data", "Z.data", "W.data", str(n)], with_by=False)
