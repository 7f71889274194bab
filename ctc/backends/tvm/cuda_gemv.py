"""The int4 weight-only GEMV of a decode step as a CUDA device function: half2 arithmetic on the packed codes.

Why: the TIR GEMV (:func:`.cuda_kernels.gemv_func`) turns every 4-bit code into an f32 by OR-ing it into the
mantissa of 2^23 (shift, mask, or, subtract: ~4 instructions a code before its FMA); at a Llama-1B step's shapes
it streamed 1.4-1.7 TB/s of int4 bytes on the H200, bound by those instructions, not by memory.  Here one
``lop3`` turns two codes into a ``half2`` (``(w & 0x000f000f) | 0x64006400`` is the pair ``1024 + c``; the
``0x00f000f0`` mask gives ``1024 + 16 c``), one ``hsub2``/``hfma2`` centres the pair exactly (``c - 8 - zero``, a
small integer), and one ``hfma2`` multiplies it with two activations: ~1.6 instructions a code.  The products
of one 16-byte load (32 codes, inside one group) are summed in half2 (8 products a half), then widened to f32,
scaled by the group's scale and summed in f32.  The activations are paired to match the codes with ``prmt``
(``__byte_perm``): the word's codes come as (0, 4), (1, 5), (2, 6), (3, 7).

The kernel keeps the TIR GEMV's shape and contract (:class:`.cuda_kernels.GemvSpec`: 4 warps a block, each warp
:attr:`~.cuda_kernels.GemvSpec.rows_per_warp` output rows, one 16-byte load per lane and step, every load
issued before the sums; the RMSNorm prologue, residual and SwiGLU epilogues rounded as the reference rounds).
It covers float16 activations and int4 weights with int8 zero points; the TIR kernel covers the rest.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CUDA_SOURCE", "MARKER", "gemv_i4_func", "gemv_i4_supported"]

MARKER = "ctc_gemv::"

CUDA_SOURCE = r"""
// ---- ctc: int4 GEMV with half2 arithmetic (ctc/backends/tvm/cuda_gemv.py) ----
namespace ctc_gemv {

__device__ __forceinline__ unsigned lop3_and_or(unsigned a, unsigned mask, unsigned magic) {
  unsigned r;  // (a & mask) | magic in one instruction
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(a), "r"(mask), "r"(magic));
  return r;
}

__device__ __forceinline__ __half2 as_h2(unsigned u) { return *reinterpret_cast<__half2*>(&u); }

__device__ __forceinline__ float round_h(float v) { return __half2float(__float2half_rn(v)); }

// One 32-bit word of 8 codes (code e at bits 4e) times 8 activations (x[0..7] as 4 words of half pairs), added to
// acc: the codes paired (0, 4), (1, 5), (2, 6), (3, 7) and centred by -(8 + zero); the activations paired alike.
__device__ __forceinline__ __half2 dot8(unsigned w, const unsigned* xp, __half2 c0, __half2 c1, __half2 acc) {
  const __half2 sixteenth = __float2half2_rn(0.0625f);
  const unsigned w8 = w >> 8;
  __half2 q0 = __hsub2(as_h2(lop3_and_or(w, 0x000f000fu, 0x64006400u)), c0);
  __half2 q1 = __hfma2(as_h2(lop3_and_or(w, 0x00f000f0u, 0x64006400u)), sixteenth, c1);
  __half2 q2 = __hsub2(as_h2(lop3_and_or(w8, 0x000f000fu, 0x64006400u)), c0);
  __half2 q3 = __hfma2(as_h2(lop3_and_or(w8, 0x00f000f0u, 0x64006400u)), sixteenth, c1);
  acc = __hfma2(q0, as_h2(xp[0]), acc);
  acc = __hfma2(q1, as_h2(xp[1]), acc);
  acc = __hfma2(q2, as_h2(xp[2]), acc);
  return __hfma2(q3, as_h2(xp[3]), acc);
}

// 8 activations (one 16-byte load: halves 0..7) as the pairs (0, 4), (1, 5), (2, 6), (3, 7).
__device__ __forceinline__ void pair_x(uint4 v, unsigned* xp) {
  xp[0] = __byte_perm(v.x, v.z, 0x5410);
  xp[1] = __byte_perm(v.x, v.z, 0x7632);
  xp[2] = __byte_perm(v.y, v.w, 0x5410);
  xp[3] = __byte_perm(v.y, v.w, 0x7632);
}

// PRO 0 none, 1 RMSNorm of x (gamma, eps); EPI 0 none, 1 residual, 2 silu_mul (gate rows, then up rows at + N);
// STAGE: x (normalized: always with PRO 1) copied to shared memory first.  R output rows per warp, 4 warps a block.
template <int M, int K, int N, int GROUP, int R, int PRO, int EPI, bool STAGE>
__device__ __forceinline__ void gemv_i4(const half* __restrict__ X, const half* __restrict__ GAM,
                                        const unsigned char* __restrict__ W, const float* __restrict__ S,
                                        const signed char* __restrict__ Z, const half* __restrict__ RES,
                                        half* __restrict__ O, float eps, unsigned char* smem, int bx, int tid) {
  constexpr int P = EPI == 2 ? 2 : 1, WR = R * P, STEPS = (K + 1023) / 1024, G = (K + GROUP - 1) / GROUP;
  const int lane = tid & 31;
  const int n0 = (bx * 4 + (tid >> 5)) * R;
  half* xs = reinterpret_cast<half*>(smem);
  float* wred = reinterpret_cast<float*>(smem + (STAGE ? M * K * 2 : 0));
  uint4 wl[WR][STEPS];
  if (n0 < N) {  // every weight load issued first: their latency overlaps the prologue
#pragma unroll
    for (int r = 0; r < WR; ++r) {
      const int row = min(n0 + r / P, N - 1) + (r % P) * N;
#pragma unroll
      for (int s = 0; s < STEPS; ++s)
        if ((s * 32 + lane) * 32 < K)
          wl[r][s] = *reinterpret_cast<const uint4*>(W + (size_t)row * (K / 2) + (s * 32 + lane) * 16);
    }
  }
  if (PRO == 1) {
    for (int m = 0; m < M; ++m) {
      float ss = 0.f;
      for (int k = tid; k < K; k += 128) {
        float v = __half2float(X[m * K + k]);
        ss += v * v;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
      __syncthreads();
      if (lane == 0) wred[tid >> 5] = ss;
      __syncthreads();
      ss = rsqrtf((wred[0] + wred[1] + wred[2] + wred[3]) / (float)K + eps);
      for (int k = tid; k < K; k += 128)
        xs[m * K + k] = __float2half_rn(__half2float(GAM[k]) * round_h(__half2float(X[m * K + k]) * ss));
    }
  } else if (STAGE) {
    for (int i = tid * 8; i < M * K; i += 128 * 8)
      *reinterpret_cast<uint4*>(xs + i) = *reinterpret_cast<const uint4*>(X + i);
  }
  if (STAGE) __syncthreads();
  if (n0 >= N) return;
  const half* xsrc = STAGE ? xs : X;
  float acc[WR][M];
#pragma unroll
  for (int r = 0; r < WR; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
#pragma unroll
  for (int s = 0; s < STEPS; ++s) {
    const int k0 = (s * 32 + lane) * 32;
    if (k0 >= K) break;
    const int g = k0 / GROUP;
    float sc[WR];
    __half2 c0[WR], c1[WR];
#pragma unroll
    for (int r = 0; r < WR; ++r) {
      const int row = min(n0 + r / P, N - 1) + (r % P) * N;
      sc[r] = S[row * G + g];
      const float z = (float)Z[row * G + g];
      c0[r] = __float2half2_rn(1032.f + z);
      c1[r] = __float2half2_rn(-72.f - z);
    }
    __half2 part[WR][M];
#pragma unroll
    for (int r = 0; r < WR; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) part[r][m] = __float2half2_rn(0.f);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
#pragma unroll
      for (int m = 0; m < M; ++m) {
        unsigned xp[4];
        pair_x(*reinterpret_cast<const uint4*>(xsrc + m * K + k0 + c * 8), xp);
#pragma unroll
        for (int r = 0; r < WR; ++r) {
          const unsigned w = c == 0 ? wl[r][s].x : c == 1 ? wl[r][s].y : c == 2 ? wl[r][s].z : wl[r][s].w;
          part[r][m] = dot8(w, xp, c0[r], c1[r], part[r][m]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < WR; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float2 f = __half22float2(part[r][m]);
        acc[r][m] += sc[r] * (f.x + f.y);
      }
  }
#pragma unroll
  for (int r = 0; r < WR; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], o);
  if (lane != 0) return;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int n = n0 + r;
    if (n >= N) continue;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float y = acc[r * P][m];
      float out;
      if (EPI == 0) {
        out = y;
      } else if (EPI == 1) {
        out = round_h(y) + __half2float(RES[m * N + n]);
      } else {
        const float gt = round_h(y);
        out = round_h(gt / (1.f + __expf(-gt))) * round_h(acc[r * P + 1][m]);
      }
      O[m * N + n] = __float2half_rn(out);
    }
  }
}

}  // namespace ctc_gemv
// ---- end ctc ----
"""


def gemv_i4_supported(spec: Any) -> str | None:
    """Why :func:`gemv_i4_func` does not cover ``spec`` (a :class:`.cuda_kernels.GemvSpec`), or None."""
    from ctc.backends.tvm.cuda_kernels import gemv_supported

    why = gemv_supported(spec)
    if why is not None:
        return why
    if spec.weight != "int4" or spec.dtype != "float16":
        return f"{spec.weight} weights with {spec.dtype} activations (int4 and float16 only)"
    pair = 2 if spec.epilogue == "silu_mul" else 1
    if spec.rows * spec.rows_per_warp * pair > 32:
        return "more than 32 sums per lane"
    # H200, 2026-12-03, batch 8: gate|up + SwiGLU 49.3 us here, 44.2 with the TIR kernel; the LM head (N 128256)
    # 513 vs 397 us; but o and down (N 2048) 7.5 / 20.9 us here vs 8.4 / 23.5
    if spec.rows * pair > 8 or (spec.rows > 4 and spec.n > 8192):
        return f"{spec.rows} rows x {pair} weight rows, N = {spec.n} (the TIR kernel measured faster)"
    return None


def _stages(spec: Any) -> bool:
    from ctc.backends.tvm.cuda_kernels import _gemv_stages_x

    return spec.prologue == "rms" or _gemv_stages_x(spec)


def gemv_i4_func(spec: Any) -> Any:
    """The PrimFunc with :func:`.cuda_kernels.gemv_func`'s signature ``(x[, gamma], W, scale, zero[, r], out)``
    launching :data:`CUDA_SOURCE`'s kernel."""
    from ctc.backends.tvm.cuda_kernels import GEMV_WARPS
    from ctc.backends.tvm.cuda_mma import launcher

    why = gemv_i4_supported(spec)
    if why is not None:
        raise ValueError(f"gemv_i4_func: {why}")
    M, K, N, R = spec.rows, spec.k, spec.n, spec.rows_per_warp
    NW, G = spec.weight_rows, spec.groups
    rms, epi = spec.prologue == "rms", {"none": 0, "residual": 1, "silu_mul": 2}[spec.epilogue]
    bufs = [("X", f"{M}, {K}", "float16"), *([("GAM", f"{K}", "float16")] if rms else []),
            ("W", f"{NW}, {K // 2}", "uint8"), ("SC", f"{NW}, {G}", "float32"), ("Z", f"{NW}, {G}", "int8"),
            *([("RES", f"{M}, {N}", "float16")] if epi == 1 else []), ("O", f"{M}, {N}", "float16")]
    stage = _stages(spec)
    smem = (M * K * 2 if stage else 0) + 4 * GEMV_WARPS
    group = K if spec.group == -1 else spec.group
    call = f"ctc_gemv::gemv_i4<{M}, {K}, {N}, {group}, {R}, {int(rms)}, {epi}, {'true' if stage else 'false'}>"
    args = ["X.data", "GAM.data" if rms else "X.data", "W.data", "SC.data", "Z.data",
            "RES.data" if epi == 1 else "X.data", "O.data", f"T.float32({spec.eps!r})", "S.data"]
    return launcher("ctc_gemv_i4", bufs, [], (str(-(-N // (GEMV_WARPS * R))), "1"), 32 * GEMV_WARPS, smem, call,
                    args, with_by=False)
