"""Prefill attention on CUDA as one tensor-core kernel (flash attention: scores never leave the SM).

Why: lowered op by op, a prefill layer's attention is ``q k^T`` (f32 scores written to memory), a
softmax kernel and ``p v``: at 512 tokens and 32 heads that is 32 MB of scores written and read
twice, ~130 us per layer on the H200 where the fused kernel needs ~15.  :data:`CUDA_SOURCE` is a
device function (compiled in by :mod:`.cuda_mma`'s hook) that keeps a block's 64 query rows in
registers, streams 64-key tiles of K and V through shared memory (``cp.async``, double-buffered),
computes the scores with ``mma.sync``, applies the scale, the mask and the causal rule, keeps a
running max and sum per row (online softmax, f32), and multiplies the probabilities (rounded to the
input dtype, as the reference rounds ``p`` before ``p v``) by V with the same MMA, f32 sums.

Semantics: ``o[b, h] = softmax(q[b, h] k[b, h // g]^T * scale + mask (+ causal)) v[b, h // g]`` with
q ``[B, HQ, S, D]``, k and v ``[B, HK, T, D]`` read as stored (GQA: ``g = HQ / HK``), an optional f32
additive mask broadcast from ``[MB, MH, MS, T]`` (each of MB, MH, MS 1 or full), causal = top-left
(key ``j > i`` masked).  A row whose every key is masked gives zeros.  D is 64 or 128; S and T may
be symbolic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CUDA_SOURCE", "MARKER", "FlashSpec", "flash_func", "flash_supported"]

MARKER = "ctc_flash::attend<"
BLOCK_Q = 64   # query rows per block (4 warps of 16)
BLOCK_K = 64   # keys per tile

CUDA_SOURCE = r"""
// ---- ctc: flash attention for prefill (ctc/backends/tvm/cuda_flash.py) ----
namespace ctc_flash {
using namespace ctc_mma;

// Element offset of (row, col) in a [rows][D] tile: 16-byte chunk c stored at c ^ (row & 7) (D >= 64),
// so the 8 rows one ldmatrix phase reads fall in 8 different bank groups.
template <int D>
__device__ __forceinline__ int swz(int row, int col) {
  return row * D + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 8 + (col & 7);
}

template <typename T, int D>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int row0, int rows, int tid) {
  constexpr int CH = D / 8;  // 16-byte chunks per row
#pragma unroll
  for (int i = tid; i < 64 * CH; i += 128) {
    int r = i / CH, c = (i % CH) * 8;
    bool ok = row0 + r < rows;
    cp_async16(dst + swz<D>(r, c), src + (size_t)(ok ? row0 + r : 0) * D + c, ok);
  }
}

// MASK: 0 none, 1 additive f32 mask.  One block: 64 query rows of one (batch, head); 128 threads.
template <typename T, int D, int MASK, bool CAUSAL>
__device__ __forceinline__ void attend(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
                                       const void* Mk_, T* __restrict__ O, unsigned char* smem,
                                       int S, int Tk, int HQ, int HK, int MB, int MH, int MS, float scale,
                                       int bq, int bh, int tid) {
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + 64 * D;
  T* Vs = Ks + 2 * 64 * D;
  const int b = bh / HQ, h = bh % HQ, hk = h / (HQ / HK);
  const T* q = Q + ((size_t)bh * S) * D;
  const T* k = K + ((size_t)(b * HK + hk) * Tk) * D;
  const T* v = V + ((size_t)(b * HK + hk) * Tk) * D;
  const int q0 = bq * 64;
  const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t2 = (lane & 3) << 1;
  const float* Mk = static_cast<const float*>(Mk_);
  const float* mrow = nullptr;
  size_t mq_stride = 0;
  if (MASK) {
    mrow = Mk + ((size_t)(MB == 1 ? 0 : b) * MH + (MH == 1 ? 0 : h)) * (size_t)MS * Tk;
    mq_stride = MS == 1 ? 0 : (size_t)Tk;
  }
  int tiles = (Tk + 63) / 64;
  if (CAUSAL) tiles = min(tiles, (q0 + 63) / 64 + 1);

  load_tile<T, D>(Qs, q, q0, S, tid);
  if (tiles > 0) { load_tile<T, D>(Ks, k, 0, Tk, tid); load_tile<T, D>(Vs, v, 0, Tk, tid); }
  cp_async_commit();

  unsigned qf[D / 16][4];
  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float mx[2] = {-INFINITY, -INFINITY}, sum[2] = {0.f, 0.f};
  const float sl2 = scale * 1.4426950408889634f;  // exp(x) = exp2(x * log2(e))
  const int r0 = q0 + warp * 16 + g;             // this thread's rows: r0 and r0 + 8

  for (int t = 0; t < tiles; ++t) {
    cp_async_wait<0>();
    __syncthreads();
    if (t == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        ldmatrix_x4(qf[kk], Qs + swz<D>(warp * 16 + (lane & 15), kk * 16 + ((lane >> 4) << 3)));
    }
    if (t + 1 < tiles) {
      int nb = (t + 1) & 1;
      load_tile<T, D>(Ks + nb * 64 * D, k, (t + 1) * 64, Tk, tid);
      load_tile<T, D>(Vs + nb * 64 * D, v, (t + 1) * 64, Tk, tid);
    }
    cp_async_commit();
    const T* ks = Ks + (t & 1) * 64 * D;
    const T* vs = Vs + (t & 1) * 64 * D;
    float s[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int j = 0; j < 8; j += 2) {
        int mi = lane >> 3;
        unsigned bt[4];
        ldmatrix_x4(bt, ks + swz<D>(j * 8 + ((mi >> 1) << 3) + (lane & 7), kk * 16 + ((mi & 1) << 3)));
        unsigned b0[2] = {bt[0], bt[1]}, b1[2] = {bt[2], bt[3]};
        Mma<T>::run(s[j], qf[kk], b0);
        Mma<T>::run(s[j + 1], qf[kk], b1);
      }
    }
    // scale (log2 domain), mask, causal rule, keys past the end
    float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = r0 + (e >> 1) * 8, key = t * 64 + j * 8 + t2 + (e & 1);
        float x = s[j][e] * sl2;
        if (key >= Tk || (CAUSAL && key > row)) x = -INFINITY;
        else if (MASK && row < S) x += mrow[row * mq_stride + key] * 1.4426950408889634f;
        s[j][e] = x;
        tmax[e >> 1] = fmaxf(tmax[e >> 1], x);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffff, tmax[r], 1));
      tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffff, tmax[r], 2));
      const float nm = fmaxf(mx[r], tmax[r]);
      const float base = nm == -INFINITY ? 0.f : nm;   // every key so far masked: nothing to rescale
      const float alpha = exp2f(mx[r] - base);
      mx[r] = nm;
      sum[r] *= alpha;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) { o[j][2 * r] *= alpha; o[j][2 * r + 1] *= alpha; }
      float ts = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        s[j][2 * r] = exp2f(s[j][2 * r] - base);
        s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - base);
        ts += s[j][2 * r] + s[j][2 * r + 1];
      }
      sum[r] += ts;
    }
    // o += p v: the score fragments of keys 16i..16i+15 are the A fragment of the i-th k step
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      unsigned pa[4] = {pack2<T>(s[2 * i][0], s[2 * i][1]), pack2<T>(s[2 * i][2], s[2 * i][3]),
                        pack2<T>(s[2 * i + 1][0], s[2 * i + 1][1]), pack2<T>(s[2 * i + 1][2], s[2 * i + 1][3])};
#pragma unroll
      for (int j = 0; j < D / 8; j += 2) {
        int mi = lane >> 3;
        unsigned bt[4];
        ldmatrix_x4_trans(bt, vs + swz<D>(i * 16 + ((mi & 1) << 3) + (lane & 7), j * 8 + ((mi >> 1) << 3)));
        unsigned b0[2] = {bt[0], bt[1]}, b1[2] = {bt[2], bt[3]};
        Mma<T>::run(o[j], pa, b0);
        Mma<T>::run(o[j + 1], pa, b1);
      }
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float tot = sum[r];
    tot += __shfl_xor_sync(0xffffffff, tot, 1);
    tot += __shfl_xor_sync(0xffffffff, tot, 2);
    const int row = r0 + r * 8;
    if (row >= S) continue;
    const float inv = tot > 0.f ? 1.f / tot : 0.f;
    T* orow = O + ((size_t)bh * S + row) * D;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      orow[j * 8 + t2] = Mma<T>::from_f(o[j][2 * r] * inv);
      orow[j * 8 + t2 + 1] = Mma<T>::from_f(o[j][2 * r + 1] * inv);
    }
  }
}

}  // namespace ctc_flash
// ---- end ctc ----
"""


@dataclass(frozen=True)
class FlashSpec:
    """The attention one :func:`flash_func` computes (see the module doc); sizes other than the head counts
    and ``head_dim`` are the PrimFunc's symbolic buffer dims."""

    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    scale: float
    mask: bool = False      # an f32 additive mask operand [MB, MH, MS, T]
    causal: bool = False

    @property
    def tag(self) -> str:
        return (f"h{self.q_heads}k{self.kv_heads}d{self.head_dim}{'m' if self.mask else ''}{'c' if self.causal else ''}"
                f"{'bf' if 'bfloat' in self.dtype else ''}")

    @property
    def smem_bytes(self) -> int:
        return 5 * 64 * self.head_dim * 2  # Q, then K and V twice each


def flash_supported(spec: FlashSpec) -> str | None:
    """Why :func:`flash_func` cannot build ``spec``, or None."""
    from ctc.backends.tvm.cuda_mma import dtype_problem

    if dtype_problem(spec.dtype, "the flash kernel"):
        return dtype_problem(spec.dtype, "the flash kernel")
    if spec.head_dim not in (64, 128):
        return f"head dim {spec.head_dim} (64 or 128)"
    if spec.kv_heads < 1 or spec.q_heads % spec.kv_heads:
        return f"{spec.q_heads} query heads over {spec.kv_heads} kv heads"
    return None


def flash_func(spec: FlashSpec) -> Any:
    """The PrimFunc ``(q, k, v[, mask], o)`` launching :data:`CUDA_SOURCE`'s ``attend``."""
    from ctc.backends.tvm.cuda_mma import device_type, launcher

    why = flash_supported(spec)
    if why is not None:
        raise ValueError(f"flash_func: {why}")
    dt, HQ, HK, D = spec.dtype, spec.q_heads, spec.kv_heads, spec.head_dim
    bufs = [("Q", f"b, {HQ}, s, {D}", dt), ("K", f"b, {HK}, t, {D}", dt), ("V", f"b, {HK}, t, {D}", dt),
            *([("M", "mb, mh, ms, t", "float32")] if spec.mask else []), ("O", f"b, {HQ}, s, {D}", dt)]
    call = f"ctc_flash::attend<{device_type(dt)}, {D}, {int(spec.mask)}, {'true' if spec.causal else 'false'}>"
    mask = ["M.data", 'T.Cast("int32", mb)', 'T.Cast("int32", mh)', 'T.Cast("int32", ms)'] if spec.mask \
        else ["Q.data", "1", "1", "1"]  # no mask: an unread pointer
    args = ["Q.data", "K.data", "V.data", mask[0], "O.data", "S.data", 'T.Cast("int32", s)', 'T.Cast("int32", t)',
            str(HQ), str(HK), *mask[1:], f"T.float32({spec.scale!r})"]
    symbols = ["b", "s", "t", *(["mb", "mh", "ms"] if spec.mask else [])]
    return launcher("ctc_flash_attention", bufs, symbols, (f"(s + {BLOCK_Q - 1}) // {BLOCK_Q}", f"b * {HQ}"), 128,
                    spec.smem_bytes, call, args)
