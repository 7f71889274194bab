"""A persistent decode-step kernel for a Llama-3.2-1B-shaped decoder with int4 g128 weights (CUDA, sm_90).

Why: a decode step of the 1B shape through ctc's per-operator kernels is 118 launches in one CUDA graph; at
batch 1 most of them are a few microseconds long, so launch gaps and ramp-up/tail of each kernel, not HBM,
set the step time (0.63 ms, 25% of the copy bandwidth for ~0.66 GB of int4 weights and scales).  Here the
whole step is **one launch**: one block per multiprocessor, all co-resident, with grid-wide barriers between
the stages that depend on each other's outputs.

Layout of a block (544 threads): 16 *consumer* warps and one *producer* warp.  The producer's lane 0 walks
the block's fixed list of weight tiles for the whole step (its q|k|v rows, W_o tile, gate|up pairs and W_down
slice of every layer, the KV-cache rows of its attention work, its LM-head rows) and streams them into a ring of
3 shared-memory slots of 36 KB (``PDEC_NSLOT``; 4 and 5 measured slower on the H200: more bytes in flight
lengthen the round trips on the critical path) with 1-D bulk copies (``cp.async.bulk`` completing on an
``mbarrier``, L2 ``evict_first``).  Weights do not depend on activations, so the producer runs ahead across the
exchanges.  Consumers wait on a slot's *full* barrier, compute, and arrive on its *empty* barrier.  (An optional
L2 prefetch window, ``PDEC_PF_KB``, prefetches tiles into L2 ahead of their copy; measured slower, off.)

A layer is **three phases** (blocks 0..127 do the work of B and C; at least 128 co-resident blocks needed):

* (A) RMSNorm (recomputed by each block) -> 24 of kv head ``b / 16``'s 384 q|k|v rows (W_qkv repacked per kv
  head, :func:`pack_qkv`); a release on the head's counter.  No grid barrier: phase B of a kv head waits for
  its own 16 blocks only.
* (B) block ``b`` = (kv head ``hk = b / 16``, slice ``j = b % 16``): attention of the head's 4 query heads (RoPE
  from a per-step cos/sin table, the new k/v written into the fp16 cache, online softmax started from the new
  row; up to 256 positions every block of the head computes it whole, beyond that chunk ``j`` of ``C`` chunks
  of ~64 positions, the (max, sum, 64 sums) partials published on a per-head counter and merged by each of the
  head's 16 blocks), then the **o projection folded in**: W_o's rows ``[128 j, 128 j + 128)`` x the head's 256
  columns (two whole g128 groups; W_o repacked ``[L, 8, 2048, 128 B]``, :func:`pack_o_down`) times the head's
  output, added into the residual (on the tensor cores, ``PDEC_MMA_O``, see below).  Grid barrier.
* (C) RMSNorm -> gate|up pairs ``[64 b, 64 b + 64)`` -> SwiGLU (64 values kept in shared memory) -> the **down
  projection split along K**: W_down's columns ``[64 b, 64 b + 64)`` (half a g128 group; repacked
  ``[L, 128, 2048, 32 B]``, scales transposed ``[L, 64, 2048]``) times them, all 2048 rows, added into the
  residual.  Grid barrier.  Blocks take W_down's two row tiles and four passes in a rotated order
  (``PDEC_STAGGER``), so that at any moment the 128 blocks' atomics land on 8 different 256-row ranges rather
  than all on the same 256 rows (the C barrier, which drains them, went from 2.3 to 1.3-1.6 us).

Then final RMSNorm -> int4 LM head (rows split over all blocks) -> fp32 logits: 32 grid barriers a step.

The residual stream: version ``k`` (``2 l``: layer ``l``'s input, ``2 l + 1``: after its attention) is
accumulated with **f32 atomics** (``red.global.add.v4.f32``, 16 bytes each; scalar ones measured 30% slower
overall) into a zeroed buffer: the previous version's 16 elements a block (carried in the norm), then the
partial products of every block.  Versions rotate over three buffers (version 1 in a fourth, zeroed by the last
block out of the previous step); A(l) zeroes version ``2 l + 2``'s buffer (last read in C(l - 1)), C(l) version
``2 l + 3``'s (last read in A(l)), so no block adds into a buffer that another still reads.  **The step is not
bit-deterministic**: the order of the f32 additions (8 o partials + 1 carry per element, 128 down partials + 1
carry) changes run to run; two runs of the same step differ by up to ~0.014 in the logits (max |logit| ~4), about
the size of the error against float32 (<= 0.027 at positions 5..1024).

Arithmetic of phase C (``PDEC_MMA``, default 1): gate|up and W_down on the **integer tensor cores**,
``mma.sync.m16n8k32.s32.s8.s8`` with the weights as A (16 rows x 32 K) and the activations as B: column 0 their int8
codes ``h`` (one scale per g128 group, set in the norm; per block for the 64 SwiGLU outputs), column 1 the int8
residual ``l`` (``x ~ s (h + l / 254)``: ~15-bit activations for the price of one FFMA an output; the other 6
columns are zero: tensor throughput is not the limit).  A lane's 8 codes of a row (one word of ctc's layout, read
in place: no repacking) become two A registers by one LOP3 each (+1 SHF): the even codes and the odd ones as unsigned
bytes ``q + 8``; the ``-8 sum(x)`` of that offset is the accumulator's initial value, and the K permutation this
implies is applied to B once a phase.  So 8 codes cost 3 integer instructions + half an MMA instead of dot8's 13.
gate|up: warp ``w`` takes group ``w`` of a tile's 32 rows (4 MMAs per 16-row block, two accumulator chains each),
f32 partials through shared memory, summed and SwiGLU'd by 64 threads, which also quantize the 64 outputs once;
W_down: warp ``w`` takes 64 rows of a 1024-row tile in 4 row blocks whose rows rotate by lane group (conflict-free
8-byte reads) so that each lane ends with 4 consecutive rows for one 16-byte atomic.  Measured (run 21): phase C
7.2 vs 7.9 us a layer (gate|up 3.5 vs 4.1, now waiting on the ring: 2.4 us with no copies; W_down with the SwiGLU
0.7 + 1.8 vs 0.3 + 2.5), the step 1.5-1.7% faster, logits closer to fp32 (max abs 0.011-0.015 vs 0.017-0.023); pure
int8 activations (``PDEC_MMA_LO=0``) are 10x worse (0.18-0.26, argmax wrong once at KV 1024), so the residual column
stays.  The gate|up tile's rows are 1 KB apart, so its 16-byte reads are 2-way bank-conflicted (inherent to ctc's
row layout; a swizzled repack would need per-row copies or a new layout).

Phase B's o projection on the same tensor-core helpers (``PDEC_MMA_O``, default on with ``PDEC_MMA``; 0: the half2
path below): the threads that finish the attention keep each output in f32 and the warp's max |o|; after one block
sync the 256 outputs are quantized once (int8 code + int8 residual, one scale per g128 group = 2 query heads), and
warp ``w < 8`` multiplies rows ``[16 w, 16 w + 16)`` of the 128-row W_o tile by both groups (``load_b32`` twice,
``mma_rows`` twice: 8 MMAs in 4 chains), each group's integer sums scaled in f32; lanes 0 and 16 gather 4 rows each
for two 16-byte atomics.  Measured (run 23, one command beside the previous default): 0.3544 / 0.4080 ms a step
(graph b2b, KV 128 / 1024) vs 0.3605-0.3610 / 0.4133-0.4152, the o projection 1.19 vs 1.46-1.50 us a layer, ptxas
spills 8 / 4 bytes instead of 40 / 56, logits max abs vs fp32 0.009-0.010 vs 0.013-0.014.

Ring and barriers (run 23): ``PDEC_HOLD=1`` (the producer issues no copy while its block's consumers are in a grid
barrier, so that the barrier's arrive and poll do not queue behind this multiprocessor's bulk copies) measured
slower with 3 slots (0.3640 vs 0.3605 ms at KV 128) and with 4 (0.3683; 4 slots alone 0.3628): with 4 slots
gate|up takes 2.7 instead of 3.6 us a layer, but the C barrier 2.4-2.7 instead of 1.6, and holding the copies back
makes it longer, not shorter -- the barrier waits for the slowest block's share of HBM, not for queued atomics.

Phase A on the tensor cores (``PDEC_MMA_QKV``, default on with ``PDEC_MMA``: the accuracy at no measurable cost):
the norm quantizes to int8 + residual as for gate|up, the 24 q|k|v rows run through ``gu_mma`` (rows 24..31 of the
slot padding), 24 threads sum the 16 warps' partials after one more block sync. Measured (run 24, twice each beside
the default): 0.3537-0.3540 / 0.4056-0.4068 ms vs 0.3532-0.3534 / 0.4053-0.4058 (phase A 2.06-2.09 vs 1.95 us a
layer: the quantizing norm and the extra sync cost what the MMAs save), but the logits' max abs error vs fp32 falls
from 0.008-0.010 to 0.0027-0.0029 (the half2 q|k|v, summing 16 products in fp16, is now the largest error term of
the default build; argmax and top-5 equal either way).

Arithmetic of the other GEMVs (``PDEC_IDP=1`` builds an alternative for the K-2048 GEMVs: int16 activations with a
scale per g128 group, ``dp2a`` into exact int32 sums; more accurate, 7 instead of 13 instructions per 8 codes, but
measured 0-3% slower a step because the norms get slower; ``PDEC_IDP_OD=1`` adds W_o / W_down, slower still; both
imply ``PDEC_MMA=0``): the int4 dot products use :mod:`.cuda_gemv`'s half2 trick (``dot8``/``pair_x``: one ``lop3``
turns two codes into a half2, 16 products summed in half2 per 16-byte load, i.e. within one group), each
group's partial is widened to f32 and scaled in f32; every reduction across a row, the softmax, the norms
and the residual stream are f32.  Activations that feed a GEMV are rounded to fp16 once (stored swizzled, so
that each warp's 8 reads of its 64 activations are conflict-free).

Weights are ctc's RTN int4 storage (:func:`ctc.ir.quant.quantize_weight`, symmetric, group 128): ``uint8
[N, K/2]`` (element ``2j`` in the low nibble of byte ``j``, ``q + 8``), ``float32`` scales ``[N, K/128]``,
zero points all 0 (asymmetric zero points are not read).  The gate and up rows are stacked ``[2F, K]``
(gate first), q|k|v ``[3072, K]``; :class:`PersistentDecoder` repacks q|k|v, W_o and W_down.

Grid barrier: hand-rolled (one monotone counter, ``red.release`` arrive + ``ld.acquire`` poll by one thread
after a ``bar.sync`` of the consumers, target = blocks x barrier index; the last block to leave resets the
counters; ~0.9 us alone on the H200), under a *cooperative* launch attribute only so the runtime refuses a grid
that would not be co-resident.  The per-head counters (q|k|v, attention chunks) are monotone too (target grows
per layer).  The next RMSNorm's weights are loaded before the barrier that precedes it.  A barrier, counter or
ring wait that exceeds 0.2 s sets an abort flag in the workspace and lets the step finish (wrong values, no hang).

Measured (H200, ``benchmarks/results/cuda_h200.md``, 2026-12-04, stop 29, run 25): the default (q|k|v, W_o, gate|up
and W_down on the tensor cores) 0.3539 / 0.4066 ms a step at KV 128 / 1024 (graph b2b, 44.3% / 38.6% of copy), through
``ctc compile`` 0.346 / 0.400.  Run 24, with the half2 q|k|v (``PDEC_MMA_QKV=0``, the default then): 0.3532-0.3534 /
0.4053-0.4058 ms (44.0% / 38.3%).  Run 21:
0.361 / 0.412 ms a step at KV 128
/ 1024 as a CUDA graph (back to back) with the tensor-core phase C (the half2 build in the same run: 0.366 / 0.419),
43% / 38% of the copy bandwidth; with no copies at all (diagnostic, LM head cut) 0.263 vs 0.292 ms.  Before it
(third section): 0.367 / 0.419 ms a step at
KV 128 / 1024 as a CUDA graph (back to back), 43% / 38% of the copy bandwidth for 656.5 MB of int4 codes and
scales (before the staggered W_down order 0.382 / 0.434; 5 phases a layer: 0.482 / 0.527 ms).  With the
weights L2-resident the step is no faster, and with no copies at all it still takes ~0.29 ms: the time is the
consumers' serial chain a layer (norm prologues ~1 us each, attention ~3.3 us at KV 128, the int4 arithmetic of
phase C ~6.9 us) plus ~4 us of exchanges, not HBM.  Two variants of that chain measured slower (run 15) and
kept buildable: ``PDEC_ATT_WARP=1`` (attention as a per-warp online softmax with one merge, no block syncs in the
tile loop: the attention itself 3.54 vs 3.30 us a layer and phase C ~0.6 us slower from the extra register
pressure; 0.380 vs 0.366 ms a step) and ``PDEC_WARP_POLL=1`` (every warp polls the grid barrier: 2.3 vs 0.9 us a
barrier).

The launcher (``extern "C"``) takes raw device pointers (:class:`DecodeArgs`); ``mode`` bits make timing
variants: 1 = no grid barriers or counter waits, 2 = consumers skip all arithmetic (the ring's streaming rate
alone), 4 = every layer streams layer 0's weights (L2-resident), 8 = no copies at all (consumers compute on stale
shared memory: the arithmetic and exchanges alone).
"""

from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path
from typing import Any

from ctc.backends.tvm import cuda_gemv

__all__ = ["CUDA_SOURCE", "DecodeArgs", "LLAMA_1B", "WS_FLOATS", "PersistentDecoder", "build_library", "dequant_int4",
           "pack_o_down", "pack_qkv", "ptxas_report", "qkv_head_rows", "reference_step", "rtn_int4", "source_text"]

# the shape the kernel is compiled for (Llama-3.2-1B; layers, vocab and cache length are run-time)
LLAMA_1B = dict(hidden=2048, heads=32, kv_heads=8, head_dim=64, ffn=8192, group=128, layers=16, vocab=128256,
                rope_theta=500000.0, eps=1e-5)
CMAX = 16                                                  # attention chunks per kv head, at most
WS_FLOATS = 4 * 2048 + 3072 + 32 * CMAX * 66 + 1024 + 4096 + 64  # workspace (see WS_* in the source)
WS_CTL = WS_FLOATS - 64                                    # control words: barrier, exit, abort, head counters
TRACE_STRIDE = 320

CUDA_SOURCE = r"""
// ---- ctc: persistent decode step (ctc/backends/tvm/cuda_persistent.py) ----
namespace ctc_pdec {

constexpr int H = 2048, NQ = 32, NKV = 8, HD = 64, FF = 8192, GS = 128;
constexpr int QKV = (NQ + 2 * NKV) * HD;  // 3072 rows: q, k, v
constexpr int NCW = 16, NCT = NCW * 32, NT = NCT + 32;  // consumer warps / threads, + 1 producer warp
#ifndef PDEC_NSLOT  // ring slots: 3 measured faster than 4 and 5 (less in flight, shorter critical round trips)
#define PDEC_NSLOT 3
#endif
#ifndef PDEC_RED_V4  // 1: partial products go into the residual by 16-byte vector atomics (red.v4.f32), 0: scalar
#define PDEC_RED_V4 1
#endif
#ifndef PDEC_GRID_A  // 1: a grid barrier after phase A as well (the per-head counter alone suffices; for timing)
#define PDEC_GRID_A 0
#endif
#ifndef PDEC_HINT
#define PDEC_HINT 1
#endif
#ifndef PDEC_BAR_FENCE  // 1: __threadfence() around the grid barrier's arrive / wait (0: release / acquire only)
#define PDEC_BAR_FENCE 0
#endif
#ifndef PDEC_IDP  // 1: the K-2048 GEMVs (q|k|v, gate|up, LM head) as int4 x int16 dot products on the integer
#define PDEC_IDP 0  // dot-product unit (dp2a), exact int32 sums (0: cuda_gemv's half2 dequant + HFMA2, fp16 partials;
#endif              // dp2a measured 1-4% slower a step: gate|up faster, the norms slower)
#ifndef PDEC_IDP_OD  // 1: W_o and W_down on dp2a too (their 32 inputs a lane quantized per lane: slower still)
#define PDEC_IDP_OD 0
#endif
#ifndef PDEC_MMA  // 1: phase C's gate|up and W_down on the integer tensor cores (mma.sync m16n8k32 s8: int4 codes
#if PDEC_IDP || PDEC_IDP_OD  // unpacked to bytes by LOP3, activations int8 + int8 residual, a scale per g128 group; see
#define PDEC_MMA 0           // mma_s8); measured 1.5% faster a step than the half2 path (0) and more accurate (run 21)
#else
#define PDEC_MMA 1
#endif
#endif
#ifndef PDEC_MMA_LO  // with PDEC_MMA: 1 = B's second column carries the int8 residual of each activation (x ~ s (h +
#define PDEC_MMA_LO 1  // l / 254): ~15-bit activations at no extra instruction), 0 = int8 activations alone
#endif
#ifndef PDEC_STAGGER  // 1: blocks take W_down's two row tiles and four passes in a rotated order, so that the
#define PDEC_STAGGER 1  // f32 atomics of the 128 blocks spread over all 2048 rows at once, not 256 of them
#endif
#ifndef PDEC_ATT_WARP  // 1: attention as a per-warp online softmax (16-byte K reads, 4 positions a warp at a time,
#define PDEC_ATT_WARP 0  // no block syncs in the tile loop) and one merge of the 16 warps; measured slower on the
#endif  // H200 (3.54 vs 3.30 us a layer at KV 128, and phase C slower by ~0.6 us: registers), so 0: block-wide
        // softmax per 128-position tile (3 block syncs a tile, scores through shared memory)
#ifndef PDEC_WARP_POLL  // 1: after the grid barrier's arrive, lane 0 of every consumer warp polls the counter and
#define PDEC_WARP_POLL 0  // its warp goes on alone (no block sync after the wait; measured 2.3 vs 0.9 us a barrier:
#endif                    // 16x the polls on one line); 0: thread 0 polls, then a block sync
#ifndef PDEC_GAM_SMEM  // 1: the next RMSNorm's weights wait in shared memory (cp.async before the barrier, waited
#define PDEC_GAM_SMEM 0  // for in it) instead of 4 registers a thread that ptxas spills to local memory and reloads
#endif  // after the barrier; measured 1-1.5% slower a step on the H200 (run 16), so 0: registers
#ifndef PDEC_MMA_O  // 1: phase B's o projection on the integer tensor cores too (the 256 attention outputs int8 + int8
#define PDEC_MMA_O PDEC_MMA  // residual, a scale per g128 group; 8 warps, one 16-row block each, 8 MMAs); measured
#endif  // 1.3-1.8% faster a step than the half2 W_o and closer to fp32 (run 23), so on with PDEC_MMA
#ifndef PDEC_MMA_QKV  // 1: phase A's q|k|v rows on the tensor cores as well (int8 + residual activations from the
#define PDEC_MMA_QKV PDEC_MMA  // norm; gate|up's code with 24 + 8 padding rows; the 16 warps' partials summed by 24
#endif  // threads): 3x closer to fp32 at the same step time (run 24: within 0.2%), so on with PDEC_MMA
#ifndef PDEC_HOLD  // 1: the producer issues no copy while its block's consumers are in a grid barrier (its arrive
#define PDEC_HOLD 0  // and poll then do not queue behind bulk copies of this multiprocessor)
#endif
#ifndef PDEC_PF_KB  // L2 prefetch window: tiles are prefetched into L2 this many KB before their copy to shared memory
#define PDEC_PF_KB 0  // (0: off; 96-320 KB measured slower on the H200)
#endif
constexpr int NSLOT = PDEC_NSLOT, SLOT = 36864;  // 32 rows of K 2048 + scales; 16 gate|up pairs; 1024 down rows
// phase A: kv head hk's 16 blocks compute its 384 q|k|v rows (4 query heads, key, value; W_qkv repacked
// [L, 8, 384, 1024 B]), 24 rows a block, and publish them on a per-head counter (no grid barrier before B)
// phase B: kv head hk's 4 query heads own W_o's 256 columns [256 hk, 256 hk + 256) = 2 whole g128 groups; the 16
// blocks of a kv head split its 2048 output rows in slices of 128 (W_o repacked [L, 8, 2048, 128 B], scales
// [L, 8, 2048, 2]: one slice is one contiguous 17 KB tile)
constexpr int OSL = 16, OROWS = H / OSL, NOB = NKV * OSL;   // 128 blocks
constexpr int QKV_H = QKV / NKV, QKV_B = QKV_H / OSL;        // 384 rows a kv head, 24 a block
// phase C: 128 slices of 64 FFN channels (half a g128 group of W_down's K axis); block j < 128 owns gate|up pairs
// [64 j, 64 j + 64) and W_down's columns [64 j, 64 j + 64) (repacked [L, 128, 2048, 32 B]; scales transposed
// [L, 64 groups, 2048]: slice j reads group j / 2)
constexpr int FSL = 128, FCH = FF / FSL, GU_T = 16, DROWS = 1024;
constexpr int ATT_T = 128;              // cache positions per ring tile (K rows, then V rows at + 16 KB)
// the 4 rotated query heads in shared memory: dims d of head h at h * 72 + d + 4 (d >= 32), so that the 4 lanes
// of a position (dims 16 qt ..) read 4 different bank groups
constexpr int QROW = HD + 8;
__device__ __forceinline__ int qi(int h, int d) { return h * QROW + d + ((d >> 5) << 2); }
constexpr int CMAX = 16;
static_assert(CMAX <= OSL, "a kv head's chunks are computed by its own 16 blocks");
static_assert(!(PDEC_MMA && (PDEC_IDP || PDEC_IDP_OD)), "PDEC_MMA replaces the half2 / dp2a arithmetic of phase C");
static_assert(!(PDEC_MMA_O || PDEC_MMA_QKV) || PDEC_MMA, "PDEC_MMA_O / _QKV use phase C's tensor-core helpers");
static_assert(!(PDEC_HOLD && PDEC_WARP_POLL), "PDEC_HOLD's flag is set by the one polling thread of PDEC_WARP_POLL=0");
static_assert(FCH % 32 == 0 && FCH <= NCT, "down_begin: the SwiGLU outputs are whole warps");
static_assert(DROWS * (FCH / 2 + 4) <= SLOT && 2 * GU_T * (H / 2 + H / GS * 4) <= SLOT, "tiles fit a slot");
// workspace (floats): 4 residual buffers (version 1 in the 4th, later ones rotating over 3), q|k|v (per kv
// head), attention partials, attention output and SwiGLU output (halves, kept for checking), control words
constexpr int WS_X = 0, WS_QKV = 4 * H, WS_PART = WS_QKV + QKV, WS_ATTN = WS_PART + NQ * CMAX * 66,
              WS_H = WS_ATTN + H / 2, WS_CTL = WS_H + FF / 2;
constexpr int CTL_BAR = 0, CTL_EXIT = 1, CTL_ABORT = 2, CTL_HEAD = 8, CTL_QKV = 16;  // + kv head
constexpr int XS_BYTES = FF * 2;
// per block: start, then per stage (begin, ready, first tile in, mid, first tile after mid in, end); <= 53 stages
constexpr int TRACE_STRIDE = 320, NSTAMP = 6;
// shared memory: ring slots | activations (fp16) | mbarriers | small arrays; fixed offsets from one symbol
constexpr int OFF_XS = NSLOT * SLOT, OFF_FULL = OFF_XS + XS_BYTES, OFF_EMPTY = OFF_FULL + NSLOT * 8,
              OFF_SC = OFF_EMPTY + NSLOT * 8, OFF_QS = OFF_SC + 4 * ATT_T * 4, OFF_RED16 = OFF_QS + 4 * QROW * 4,
              OFF_MLS = OFF_RED16 + 16 * 4, OFF_FRESH = OFF_MLS + 16 * 4, OFF_ROPE = OFF_FRESH + 2 * HD * 2,
              OFF_OVEC = OFF_ROPE + 64 * 4, OFF_HVEC = OFF_OVEC + 4 * HD * 2, OFF_SXG = OFF_HVEC + FCH * 2,
              OFF_PQ = OFF_SXG + 16 * 4;
// the producer's queue of tiles generated (and prefetched into L2) but not yet copied into the ring
struct Piece { const void* src; unsigned bytes, off; };  // off: offset in the slot; bit 31: no L2 hint
struct TileDesc { Piece pc[4]; unsigned n, total; };
// then the next RMSNorm's weights (fp16, PDEC_GAM_SMEM), copied in by cp.async before the barrier that precedes it
constexpr int PQN = 32, OFF_GAM = (OFF_PQ + PQN * (int)sizeof(TileDesc) + 15) / 16 * 16,
              OFF_HOLD = OFF_GAM + PDEC_GAM_SMEM * H * 2, OFF_END = OFF_HOLD + PDEC_HOLD * 16;
constexpr unsigned PF_BYTES = PDEC_PF_KB * 1024u, NOHINT = 1u << 31;
constexpr int SMEM = OFF_END;
static_assert(OFF_OVEC % 16 == 0 && OFF_HVEC % 16 == 0 && OFF_QS % 16 == 0 && OFF_FULL % 8 == 0 && OFF_PQ % 8 == 0 &&
              OFF_GAM % 16 == 0,
              "alignment");
extern __shared__ __align__(1024) unsigned char pdec_smem[];
template <class T> __device__ __forceinline__ T* sm(int off) { return reinterpret_cast<T*>(pdec_smem + off); }
__device__ __forceinline__ unsigned char* slot_ptr(unsigned s) { return pdec_smem + (size_t)s * SLOT; }
__device__ __forceinline__ unsigned long long* full_bar(unsigned s) { return sm<unsigned long long>(OFF_FULL) + s; }
__device__ __forceinline__ unsigned long long* empty_bar(unsigned s) { return sm<unsigned long long>(OFF_EMPTY) + s; }
constexpr unsigned long long TIMEOUT_NS = 200000000ull;
constexpr float LOG2E = 1.4426950408889634f;

struct Args {
  const unsigned char* wqkv; const float* sqkv;
  const unsigned char* wo; const float* so;
  const unsigned char* wgu; const float* sgu;
  const unsigned char* wd; const float* sd;
  const half* attn_norm; const half* mlp_norm; const half* final_norm;
  const half* emb; const unsigned char* whead; const float* shead;
  half* kcache; half* vcache;
  const float* inv_freq;
  const int* token; const int* pos;
  float* ws; float* logits;
  unsigned long long* trace;  // null, or globaltimer stamps [blocks][TRACE_STRIDE]
  int layers, vocab, max_len, mode;
  float eps;
  int att_span;  // positions per attention chunk (0: one chunk up to 256 positions, else 64 a chunk)
};

// ------------------------------------------------------------------ primitives
__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ unsigned long long gtime() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void cons_sync() { asm volatile("bar.sync 1, %0;" ::"n"(NCT) : "memory"); }
__device__ __forceinline__ void mbar_init(unsigned long long* b, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(unsigned long long* b, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(b)) : "memory");
}
__device__ __forceinline__ bool mbar_try(unsigned long long* b, unsigned parity) {
  unsigned ok;
  asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
               : "=r"(ok) : "r"(smem_u32(b)), "r"(parity) : "memory");
  return ok != 0;
}
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void red_release_add(unsigned* p, unsigned v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ unsigned long long evict_first_policy() {
  unsigned long long pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  return pol;
}
__device__ __forceinline__ void bulk_g2s_plain(void* dst, const void* src, unsigned bytes, unsigned long long* bar);
__device__ __forceinline__ void bulk_g2s(void* dst, const void* src, unsigned bytes, unsigned long long* bar,
                                         unsigned long long pol) {
  if (!PDEC_HINT) return bulk_g2s_plain(dst, src, bytes, bar);
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
      ::"r"(smem_u32(dst)), "l"(src), "r"(bytes), "r"(smem_u32(bar)), "l"(pol) : "memory");
}
__device__ __forceinline__ void bulk_g2s_plain(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(smem_u32(dst)), "l"(src), "r"(bytes), "r"(smem_u32(bar)) : "memory");
}

__device__ __forceinline__ void prefetch_l2(const void* src, unsigned bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
}

// wait for a phase of an mbarrier; after TIMEOUT_NS (or once another wait gave up) set/see the abort flag
__device__ __forceinline__ void mbar_wait(unsigned long long* b, unsigned parity, unsigned* ctl) {
  if (mbar_try(b, parity)) return;
  const unsigned long long t0 = gtime();
  for (unsigned i = 1;; ++i) {
    if (mbar_try(b, parity)) return;
    if ((i & 255u) == 0) {
      if (*(volatile unsigned*)(ctl + CTL_ABORT)) return;
      if (gtime() - t0 > TIMEOUT_NS) { atomicExch(ctl + CTL_ABORT, 1u); return; }
    }
  }
}

// all blocks: every consumer thread's writes before it are visible to every block after it
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

__device__ __forceinline__ void grid_barrier(unsigned* ctl, unsigned target) {
  cons_sync();  // the block's writes happen before thread 0's release (bar.sync orders them; release is cumulative)
#if PDEC_WARP_POLL
  if (threadIdx.x == 0) red_release_add(ctl + CTL_BAR, 1u);
  if ((threadIdx.x & 31) == 0 && ld_acquire(ctl + CTL_BAR) < target) {
    const unsigned long long t0 = gtime();
    for (unsigned i = 1; ld_acquire(ctl + CTL_BAR) < target; ++i) {
      if ((i & 63u) == 0) {
        if (*(volatile unsigned*)(ctl + CTL_ABORT)) break;
        if (gtime() - t0 > TIMEOUT_NS) { atomicExch(ctl + CTL_ABORT, 2u); break; }
      }
    }
  }
  __syncwarp();  // lane 0's acquire, then the warp goes on (the block's other warps need not have seen it yet)
  cp_async_wait_all();
#else
  if (threadIdx.x == 0) {
    if (PDEC_HOLD) *reinterpret_cast<volatile unsigned*>(pdec_smem + OFF_HOLD) = 1u;  // the producer holds its copies
    if (PDEC_BAR_FENCE) __threadfence();
    red_release_add(ctl + CTL_BAR, 1u);
    if (ld_acquire(ctl + CTL_BAR) < target) {
      const unsigned long long t0 = gtime();
      for (unsigned i = 1; ld_acquire(ctl + CTL_BAR) < target; ++i) {
        if ((i & 63u) == 0) {
          if (*(volatile unsigned*)(ctl + CTL_ABORT)) break;
          if (gtime() - t0 > TIMEOUT_NS) { atomicExch(ctl + CTL_ABORT, 2u); break; }
        }
      }
    }
    if (PDEC_BAR_FENCE) __threadfence();
    if (PDEC_HOLD) *reinterpret_cast<volatile unsigned*>(pdec_smem + OFF_HOLD) = 0u;
  }
  cp_async_wait_all();  // the next RMSNorm's weights (issued before the barrier) are in shared memory
  cons_sync();
#endif
}


__device__ __forceinline__ int2 part(int n, int b, int G) {
  return make_int2((int)((long long)n * b / G), (int)((long long)n * (b + 1) / G));
}


struct Plan { int G, b, pos, C, layers, vocab; };

// The block's work in order: both roles walk it (the producer issues copies, the consumers compute).  Three
// phases a layer; a grid barrier after B and after C:
//   (A) blocks 0..127: RMSNorm -> 24 of kv head b / 16's 384 q|k|v rows; a release on the head's counter
//       instead of a grid barrier (phase B of that head waits for its 16 blocks only)
//   (B) blocks 0..127: kv head hk = b / 16, row slice j = b % 16: attention of the kv head's 4 query heads
//       (every block of the head computes it whole up to 256 positions; beyond, chunk j of C, partials merged by
//       all 16 blocks after a per-head counter), then W_o's 128 rows x 256 columns of that head -> residual
//   (C) blocks 0..127: RMSNorm -> gate|up pairs [64 b, 64 b + 64) -> SwiGLU -> W_down[:, 64 b : 64 b + 64] ->
//       residual (all 2048 rows, split along K)
template <class V>
__device__ __forceinline__ void walk(V& v, const Plan& p) {
  for (int l = 0; l < p.layers; ++l) {
    v.stage(0, l);
    if (p.b < NOB) v.gemv(0, l, (p.b / OSL) * QKV_H + (p.b % OSL) * QKV_B, QKV_B);
    v.stage_end(0, l);
    v.stage(1, l);
    if (p.b < NOB) {
      const int hk = p.b / OSL, j = p.b % OSL;
      if (p.C == 1) {  // the whole attention, redundantly in each of the head's 16 blocks (no exchange)
        v.att_begin(l, hk, 0, p.pos + 1, j == 0);
        for (int t = 0; t < p.pos; t += ATT_T) v.att_tile(l, hk, t, min(ATT_T, p.pos - t));
        v.att_end(l, hk, 0, j == 0);
      } else {
        if (j < p.C) {
          const int span = (p.pos + p.C) / p.C;
          const int c0 = min(j * span, p.pos + 1), c1 = min(p.pos + 1, c0 + span), ce = min(c1, p.pos);
          v.att_begin(l, hk, c0, c1, c1 == p.pos + 1);
          for (int t = c0; t < ce; t += ATT_T) v.att_tile(l, hk, t, min(ATT_T, ce - t));
          v.att_end(l, hk, j, false);
        }
        v.att_merge(l, hk, j == 0);
      }
      v.mid();
      v.oproj(l, hk, j);
    }
    v.stage_end(1, l);
    v.stage(2, l);
    if (p.b < FSL) {
      for (int t = 0; t < FCH / GU_T; ++t) v.gemv(3, l, p.b * FCH + t * GU_T, GU_T);
      v.mid();
      v.down_begin();
      for (int t = 0; t < H / DROWS; ++t) v.down(l, p.b, PDEC_STAGGER ? (t + p.b) % (H / DROWS) : t);
    }
    v.stage_end(2, l);
  }
  v.stage(3, 0);
  { const int2 r = part(p.vocab, p.b, p.G); for (int i = r.x; i < r.y; i += 32) v.gemv(5, 0, i, min(32, r.y - i)); }
  v.stage_end(3, 0);
}

// a K-2048 GEMV's matrix: weights, scales, whether rows come in gate|up pairs
struct Mat { const unsigned char* w; const float* s; bool pair; };
__device__ __forceinline__ Mat mat_of(const Args& a, int st, int l) {
  switch (st) {
    case 0: return {a.wqkv + (size_t)l * QKV * (H / 2), a.sqkv + (size_t)l * QKV * (H / GS), false};
    case 3: return {a.wgu + (size_t)l * 2 * FF * (H / 2), a.sgu + (size_t)l * 2 * FF * (H / GS), true};
    default: return {a.whead, a.shead, false};
  }
}

// ------------------------------------------------------------------ producer (one thread)
// Each tile the walk generates is prefetched into L2 at once (cp.async.bulk.prefetch) and queued; a queued tile is
// copied into a ring slot once PF_BYTES of later tiles are queued behind it (or at the end).  So HBM keeps
// streaming up to PF_BYTES a block ahead while the consumers sit in a barrier, and the copies into the ring, on
// the consumers' critical path, come from L2.  PDEC_PF_KB=0: each tile is copied as soon as it is generated.
struct Producer {
  const Args& a; unsigned* ctl; unsigned t; unsigned long long pol; int pos;
  unsigned head, tail, pend;
  // mode bit 4 (timing only): every layer streams layer 0's weights (32 MB: they stay in L2)
  __device__ __forceinline__ int lw(int l) const { return (a.mode & 4) ? 0 : l; }
  __device__ __forceinline__ TileDesc& next() const { return sm<TileDesc>(OFF_PQ)[head % PQN]; }
  __device__ __forceinline__ void issue_one() {
    const TileDesc& d = sm<TileDesc>(OFF_PQ)[tail % PQN];
    ++tail;
    pend -= d.total;
    const unsigned s = t % NSLOT, round = t / NSLOT;
    if (round > 0) mbar_wait(empty_bar(s), (round - 1) & 1u, ctl);
    if (PDEC_HOLD)  // not while the consumers are in a grid barrier (the barrier clears the flag also when it gives up)
      while (*reinterpret_cast<volatile unsigned*>(pdec_smem + OFF_HOLD)) {}
    unsigned long long* bar = full_bar(s);
    mbar_expect_tx(bar, d.total);
    ++t;
    unsigned char* dst = slot_ptr(s);
    for (unsigned i = 0; i < d.n; ++i) {
      const Piece& c = d.pc[i];
      if (c.off & NOHINT) bulk_g2s_plain(dst + (c.off & ~NOHINT), c.src, c.bytes, bar);
      else bulk_g2s(dst + c.off, c.src, c.bytes, bar, pol);
    }
  }
  __device__ __forceinline__ void piece(TileDesc& d, const void* src, unsigned bytes, unsigned off) {
    d.pc[d.n++] = Piece{src, bytes, off};
    d.total += bytes;
    if (PF_BYTES) prefetch_l2(src, bytes);
  }
  __device__ __forceinline__ TileDesc& open() {
    TileDesc& d = next();
    d.n = 0;
    d.total = 0;
    return d;
  }
  __device__ __forceinline__ void push(const TileDesc& d) {
    ++head;
    pend += d.total;
    while (head - tail >= (unsigned)PQN || pend > PF_BYTES) issue_one();
  }
  __device__ __forceinline__ void finish() { while (tail != head) issue_one(); }

  __device__ __forceinline__ void stage(int, int) {}
  __device__ __forceinline__ void stage_end(int, int) {}
  __device__ __forceinline__ void mid() {}
  __device__ __forceinline__ void down_begin() {}
  __device__ __forceinline__ void att_begin(int, int, int, int, bool) {}
  __device__ __forceinline__ void att_end(int, int, int, bool) {}
  __device__ __forceinline__ void att_merge(int, int, bool) {}
  __device__ __forceinline__ void gemv(int st, int l, int r0, int cnt) {
    const Mat m = mat_of(a, st, lw(l));
    constexpr unsigned rb = H / 2, sb = H / GS * 4;
    const unsigned nr = m.pair ? 2 * cnt : cnt;
    const unsigned char* sc = reinterpret_cast<const unsigned char*>(m.s);
    TileDesc& d = open();
    piece(d, m.w + (size_t)r0 * rb, cnt * rb, 0);
    if (m.pair) piece(d, m.w + (size_t)(r0 + FF) * rb, cnt * rb, cnt * rb);
    piece(d, sc + (size_t)r0 * sb, cnt * sb, nr * rb);
    if (m.pair) piece(d, sc + (size_t)(r0 + FF) * sb, cnt * sb, nr * rb + cnt * sb);
    push(d);
  }
  __device__ __forceinline__ void att_tile(int l, int hk, int t0, int n) {
    const size_t off = ((size_t)(l * NKV + hk) * a.max_len + t0) * HD;
    TileDesc& d = open();
    piece(d, a.kcache + off, n * HD * 2, NOHINT);
    piece(d, a.vcache + off, n * HD * 2, NOHINT | (ATT_T * HD * 2));
    push(d);
  }
  __device__ __forceinline__ void oproj(int l, int hk, int j) {  // 128 rows x 128 B codes, then 128 x 2 scales
    const size_t row0 = (size_t)(lw(l) * NKV + hk) * H + j * OROWS;
    TileDesc& d = open();
    piece(d, a.wo + row0 * 128, OROWS * 128, 0);
    piece(d, a.so + row0 * 2, OROWS * 8, OROWS * 128);
    push(d);
  }
  __device__ __forceinline__ void down(int l, int b, int t) {  // 1024 rows x 32 B codes, then 1024 scales
    l = lw(l);
    TileDesc& d = open();
    piece(d, a.wd + ((size_t)(l * FSL + b) * H + t * DROWS) * (FCH / 2), DROWS * (FCH / 2), 0);
    piece(d, a.sd + ((size_t)l * (FF / GS) + b / 2) * H + t * DROWS, DROWS * 4, DROWS * (FCH / 2));
    push(d);
  }
};

// ------------------------------------------------------------------ consumers (16 warps)
// one row's 2048-wide segment: codes from shared memory, scales (16) beside them, x as pre-paired halves
__device__ __forceinline__ float dot_seg(const unsigned char* w, const float* s, const unsigned* xp, int lane) {
  const uint4 a = reinterpret_cast<const uint4*>(w)[lane];
  const uint4 b = reinterpret_cast<const uint4*>(w)[lane + 32];
  const float sa = s[lane >> 2], sb = s[8 + (lane >> 2)];
  const __half2 c0 = __float2half2_rn(1032.f), c1 = __float2half2_rn(-72.f);
  __half2 pa = __float2half2_rn(0.f), pb = pa;
  pa = ctc_gemv::dot8(a.x, xp + 0, c0, c1, pa);
  pb = ctc_gemv::dot8(b.x, xp + 16, c0, c1, pb);
  pa = ctc_gemv::dot8(a.y, xp + 4, c0, c1, pa);
  pb = ctc_gemv::dot8(b.y, xp + 20, c0, c1, pb);
  pa = ctc_gemv::dot8(a.z, xp + 8, c0, c1, pa);
  pb = ctc_gemv::dot8(b.z, xp + 24, c0, c1, pb);
  pa = ctc_gemv::dot8(a.w, xp + 12, c0, c1, pa);
  pb = ctc_gemv::dot8(b.w, xp + 28, c0, c1, pb);
  const float2 fa = __half22float2(pa), fb = __half22float2(pb);
  return sa * (fa.x + fa.y) + sb * (fb.x + fb.y);
}
// 32 codes (16 bytes) times 32 activations paired in xp[0..15]: the half2 sum widened to f32 (one group)
__device__ __forceinline__ float dot32(const uint4 w, const unsigned* xp) {
  const __half2 c0 = __float2half2_rn(1032.f), c1 = __float2half2_rn(-72.f);
  __half2 acc = __float2half2_rn(0.f);
  acc = ctc_gemv::dot8(w.x, xp + 0, c0, c1, acc);
  acc = ctc_gemv::dot8(w.y, xp + 4, c0, c1, acc);
  acc = ctc_gemv::dot8(w.z, xp + 8, c0, c1, acc);
  acc = ctc_gemv::dot8(w.w, xp + 12, c0, c1, acc);
  const float2 f = __half22float2(acc);
  return f.x + f.y;
}

// ---- the integer path (PDEC_IDP): activations as int16 with one f32 scale per 128 (K-2048 GEMVs: per g128 group,
// set by the norm) or per 32 values (W_o, W_down: per lane, from its fp16 inputs); codes stay unsigned nibbles
// u = q + 8, so sum(q x) = sum(u x) - 8 sum(x), the second term an int32 constant per lane and group (corr).
// 8 codes (one word: element 2 j in byte j's low nibble, 2 j + 1 in its high nibble) cost 2 LOP3 + 1 SHF + 4 dp2a
// (16-bit x 8-bit pairs) instead of 4 LOP3 + 1 SHF + 4 centering + 4 HFMA2; the int32 sums are exact.
// xp per 8 values x0..x7 (int16): (x0, x2), (x4, x6), (x1, x3), (x5, x7), matching dp2a.lo/.hi of the low nibbles
// (bytes: e0 e2 e4 e6) and of the high ones (e1 e3 e5 e7).
__device__ __forceinline__ void pair_i16(uint4 v, unsigned* xp) {
  xp[0] = __byte_perm(v.x, v.y, 0x5410);
  xp[1] = __byte_perm(v.z, v.w, 0x5410);
  xp[2] = __byte_perm(v.x, v.y, 0x7632);
  xp[3] = __byte_perm(v.z, v.w, 0x7632);
}
__device__ __forceinline__ int idp8(unsigned w, const unsigned* xp, int acc) {
  const int lo = (int)(w & 0x0f0f0f0fu), hi = (int)((w >> 4) & 0x0f0f0f0fu);
  acc = __dp2a_lo((int)xp[0], lo, acc);
  acc = __dp2a_hi((int)xp[1], lo, acc);
  acc = __dp2a_lo((int)xp[2], hi, acc);
  return __dp2a_hi((int)xp[3], hi, acc);
}
// 32 codes (16 bytes) times the 32 int16 activations paired in xp[0..15], plus corr: an exact int32
__device__ __forceinline__ int idp32(const uint4 w, const unsigned* xp, int corr) {
  const int a = idp8(w.y, xp + 4, idp8(w.x, xp, corr));
  const int b = idp8(w.w, xp + 12, idp8(w.z, xp + 8, 0));
  return a + b;
}
// -8 x the sum of the 32 int16 activations paired in xp[0..15]
__device__ __forceinline__ int idp_corr(const unsigned* xp) {
  int s[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < 16; ++i) s[i & 3] = __dp2a_lo((int)xp[i], 0x0101, s[i & 3]);
  return -8 * ((s[0] + s[1]) + (s[2] + s[3]));
}
// 32 fp16 values (4 x 16 bytes at src) as int16 pairs in xp[0..15] with one scale (max |v| / 32767); returns the scale
__device__ __forceinline__ float quant32(const half* src, unsigned* xp, int& corr) {
  float f[32];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const uint4 u = reinterpret_cast<const uint4*>(src)[c];
    const unsigned w4[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = __half22float2(*reinterpret_cast<const __half2*>(&w4[i]));
      f[8 * c + 2 * i] = t.x;
      f[8 * c + 2 * i + 1] = t.y;
    }
  }
  float m = 0.f;
#pragma unroll
  for (int i = 0; i < 32; ++i) m = fmaxf(m, fabsf(f[i]));
  const float inv = m > 0.f ? 32767.f / m : 0.f;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    unsigned q[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      q[i] = (__float2int_rn(f[8 * c + 2 * i] * inv) & 0xffff) |
             ((unsigned)__float2int_rn(f[8 * c + 2 * i + 1] * inv) << 16);
    pair_i16(make_uint4(q[0], q[1], q[2], q[3]), xp + 4 * c);
  }
  corr = idp_corr(xp);
  return m > 0.f ? m / 32767.f : 0.f;
}

// the same on the integer path: xp int16 pairs (scales sx[0], sx[1] for the two segments, corr their -8 sums)
__device__ __forceinline__ float dot_seg_i(const unsigned char* w, const float* s, const unsigned* xp, int lane,
                                          const float* sx, const int* corr) {
  const uint4 a = reinterpret_cast<const uint4*>(w)[lane];
  const uint4 b = reinterpret_cast<const uint4*>(w)[lane + 32];
  const float sa = s[lane >> 2], sb = s[8 + (lane >> 2)];
  const int ia = idp32(a, xp, corr[0]), ib = idp32(b, xp + 16, corr[1]);
  return sa * sx[0] * (float)ia + sb * sx[1] * (float)ib;
}

// ---- the tensor-core path (PDEC_MMA) for phase C: mma.sync m16n8k32 s8 x s8 -> s32, the weights as A (16 rows x
// 32 K), the activations as B: column 0 their int8 codes h, column 1 (PDEC_MMA_LO) the int8 residual l (x ~ s (h +
// l / 254)), columns 2..7 zero.  A lane's 8 codes of one row (one word: code 2 j in byte j's low nibble, 2 j + 1 in its
// high one) give two A registers by one LOP3 each (+ one SHF): the low nibbles (even codes) and the high ones (odd
// codes), unsigned u = q + 8; the -8 sum(x) of the offset is the accumulator's initial value (per column, one
// constant per group).  The permutation of K this implies (a lane's K slots 4 t + j / 16 + 4 t + j hold its word's
// even / odd codes) is applied to B once, when the activations are loaded.  16 products a lane per MMA: per 8 codes
// 3 integer instructions and half an MMA, against 13 instructions of cuda_gemv's dot8 (half2 dequant + HFMA2).
__device__ __forceinline__ void mma_s8(int (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                       unsigned b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// rows g and g + 8's code words wa, wb (the same 8 K positions) times B (b0: the even ones, b1: the odd ones)
__device__ __forceinline__ void mma_word(int (&c)[4], unsigned wa, unsigned wb, unsigned b0, unsigned b1) {
  mma_s8(c, wa & 0x0f0f0f0fu, wb & 0x0f0f0f0fu, (wa >> 4) & 0x0f0f0f0fu, (wb >> 4) & 0x0f0f0f0fu, b0, b1);
}
constexpr float MMA_KL = PDEC_MMA_LO ? 1.f / 254.f : 0.f;  // column 1's weight
// the thread index read afresh (volatile: the per-lane offsets of the MMA code derived from it are not hoisted out of
// the layer loop, where they would be live through phases A and B and push their values to local memory)
__device__ __forceinline__ int tid_fresh() {
  unsigned t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return (int)t;
}
// 8 int8 values (x0..x3 in u0, x4..x7 in u1) as B's two registers: the even ones, the odd ones
__device__ __forceinline__ unsigned evens8(unsigned u0, unsigned u1) { return __byte_perm(u0, u1, 0x6420); }
__device__ __forceinline__ unsigned odds8(unsigned u0, unsigned u1) { return __byte_perm(u0, u1, 0x7531); }
// y in [-127, 127] as int8 code h = rint(y) and its residual l = rint(254 (y - h)), each in the low byte of the
// returned words (the float bits of y + 1.5 2^23: its low mantissa bits are the rounded integer; no conversions)
constexpr float RND_MAGIC = 12582912.f;
__device__ __forceinline__ void q8(float y, unsigned& h, unsigned& l) {
  const float t = y + RND_MAGIC;
  h = __float_as_uint(t);
  l = __float_as_uint(fmaf(y - (t - RND_MAGIC), 254.f, RND_MAGIC));
}
// the low bytes of four words as one word
__device__ __forceinline__ unsigned low_bytes(unsigned a, unsigned b, unsigned c, unsigned d) {
  return __byte_perm(__byte_perm(a, b, 0x0040), __byte_perm(c, d, 0x0040), 0x5410);
}
// B's 8 registers for one g128 group's 4 MMAs (a lane's 32 codes of a row: 16 bytes, 4 words): lane (gb, t) takes the
// 32 int8 values at h + 32 t (column 0: the codes) or h + lo + 32 t (column 1: the residuals), as evens / odds per
// word; c0, c1 get the offset correction -8 sum(x) of columns 0 and 1 (the accumulators' initial values)
__device__ __forceinline__ void load_b32(const unsigned char* h, int lo, unsigned* b, int& c0, int& c1) {
  const int lane = tid_fresh() & 31, gb = lane >> 2, t = lane & 3;
  const uint4* src = reinterpret_cast<const uint4*>(h + (gb & 1) * lo + 32 * t);
  const uint4 u0 = src[0], u1 = src[1];
  const unsigned u[8] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};
  const bool on = gb < (PDEC_MMA_LO ? 2 : 1);
  int sum = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    b[2 * i] = on ? evens8(u[2 * i], u[2 * i + 1]) : 0u;
    b[2 * i + 1] = on ? odds8(u[2 * i], u[2 * i + 1]) : 0u;
    sum = __dp4a((int)b[2 * i], 0x01010101, __dp4a((int)b[2 * i + 1], 0x01010101, sum));
  }
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  c0 = -8 * __shfl_sync(0xffffffffu, sum, 0);
  c1 = -8 * __shfl_sync(0xffffffffu, sum, 4);
}
// rows g and g + 8 of a 16-row block (lane (g, t)'s 16-byte reads wa, wb: 32 codes each) times load_b32's registers b:
// 4 MMAs in two accumulator chains (ca starts at the correction, cb at 0)
__device__ __forceinline__ void mma_rows(int (&ca)[4], int (&cb)[4], const uint4 wa, const uint4 wb,
                                         const unsigned* b) {
  mma_word(ca, wa.x, wb.x, b[0], b[1]);
  mma_word(cb, wa.y, wb.y, b[2], b[3]);
  mma_word(ca, wa.z, wb.z, b[4], b[5]);
  mma_word(cb, wa.w, wb.w, b[6], b[7]);
}
// lane (g, 0)'s dot product of row g (k = 0) or g + 8 (k = 2) from the two chains, in units of the activation scale
__device__ __forceinline__ float mma_val(const int (&ca)[4], const int (&cb)[4], int k) {
  return (float)(ca[k] + cb[k]) + (float)(ca[k + 1] + cb[k + 1]) * MMA_KL;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ void red_add(float* p, float v) {  // fire-and-forget f32 add at L2
  asm volatile("red.relaxed.gpu.global.add.f32 [%0], %1;" ::"l"(p), "f"(v) : "memory");
}
__device__ __forceinline__ void red_add4(float* p, float a, float b, float c, float d) {  // p 16-byte aligned
  if (PDEC_RED_V4) {
    asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(a), "f"(b), "f"(c),
                 "f"(d) : "memory");
  } else {
    red_add(p, a); red_add(p + 1, b); red_add(p + 2, c); red_add(p + 3, d);
  }
}

struct Consumer {
  const Args& a; unsigned* ctl; Plan p;
  unsigned long long* trace;
  unsigned t, nbar, nst, wstate;
  int tid, lane, warp;
  bool compute, barriers, copies;
  unsigned xp[32];
  int corr[2];   // PDEC_IDP: -8 x the sums of the int16 activations in xp[0..15], xp[16..31]
  float sxl[2];  // PDEC_IDP: their scales
  float acc[8];
#if PDEC_ATT_WARP
  // per-warp attention state (warp-uniform): the running max and sum of weights per head; acc holds this lane's
  // dims 2 lane, 2 lane + 1 of the 4 heads' unnormalized weighted value sums
  float om[4], ol[4];
#endif
  float gam[4];  // the next RMSNorm's weights (this thread's 4), loaded before the barrier that precedes it

  __device__ __forceinline__ half* xs() const { return sm<half>(OFF_XS); }
  __device__ __forceinline__ float* sc() const { return sm<float>(OFF_SC); }
  __device__ __forceinline__ float* qs() const { return sm<float>(OFF_QS); }
  __device__ __forceinline__ float* red16() const { return sm<float>(OFF_RED16); }
  __device__ __forceinline__ float* mls() const { return sm<float>(OFF_MLS); }
  __device__ __forceinline__ half* fresh() const { return sm<half>(OFF_FRESH); }
  __device__ __forceinline__ float* rope() const { return sm<float>(OFF_ROPE); }
  __device__ __forceinline__ half* ovec() const { return sm<half>(OFF_OVEC); }
  __device__ __forceinline__ half* hvec() const { return sm<half>(OFF_HVEC); }
  // residual version k (k = 2 l: layer l's input; 2 l + 1: after its attention) lives in buffer k % 3, version 1
  // in buffer 3 (zeroed by the last block out of the previous step, as its first adds come before any barrier).
  // Every version is accumulated by f32 atomics into a zeroed buffer: the carry of the previous version (16
  // elements a block, in the norm), then the partial products.  Zeroing: A(l) zeroes version 2 l + 2's buffer
  // (it held 2 l - 1, last read in C(l - 1)), C(l) version 2 l + 3's (it held 2 l, last read in A(l)).
  __device__ __forceinline__ float* xbuf(int k) const { return a.ws + WS_X + (k == 1 ? 3 : k % 3) * H; }

  // trace: per stage (begin, ready = prologue done, first tile in, mid, first tile after mid in, end); the middle
  // ones default to ready
  __device__ __forceinline__ void stamp(int k) {
    if (trace != nullptr && tid == 0) trace[1 + NSTAMP * nst + k] = gtime();
  }
  __device__ __forceinline__ void prefetch_gamma(const half* g) {
#if PDEC_GAM_SMEM
    if (tid < H / 8) cp_async16(sm<half>(OFF_GAM) + 8 * tid, g + 8 * tid);  // waited for in the barrier
#else
    const uint2 u = *reinterpret_cast<const uint2*>(g + 4 * tid);
    const float2 f0 = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
    const float2 f1 = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
    gam[0] = f0.x; gam[1] = f0.y; gam[2] = f1.x; gam[3] = f1.y;
#endif
  }
  __device__ __forceinline__ void load_gamma() {  // this thread's 4 weights of the RMSNorm from shared memory
#if PDEC_GAM_SMEM
    const uint2 u = *reinterpret_cast<const uint2*>(sm<half>(OFF_GAM) + 4 * tid);
    const float2 f0 = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
    const float2 f1 = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
    gam[0] = f0.x; gam[1] = f0.y; gam[2] = f1.x; gam[3] = f1.y;
#endif
  }

  __device__ __forceinline__ unsigned char* wait_tile() {
    const unsigned s = t % NSLOT, round = t / NSLOT;
    if (copies) mbar_wait(full_bar(s), round & 1u, ctl);
    if (wstate == 0 || wstate == 2) { stamp(wstate == 0 ? 2 : 4); ++wstate; }
    return slot_ptr(s);
  }
  __device__ __forceinline__ void release_tile() {
    __syncwarp();
    if (lane == 0 && copies) mbar_arrive(empty_bar(t % NSLOT));
    ++t;
  }

  // RMSNorm of residual src (null: the embedding row) into xs as fp16.  Blocks b < 128 also add their 16
  // elements [16 b, 16 b + 16) of src into dst (the next residual version) and zero theirs of buffer zero
  __device__ __forceinline__ void norm(const float* src, float* dst, float* zero, bool i8 = false) {
    float v[4];
    if (src == nullptr) {
      const int tok = __ldg(a.token);
      const uint2 u = *reinterpret_cast<const uint2*>(a.emb + (size_t)tok * H + 4 * tid);
      const float2 f0 = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
      const float2 f1 = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
      v[0] = f0.x; v[1] = f0.y; v[2] = f1.x; v[3] = f1.y;
    } else {
      const float4 f = __ldcg(reinterpret_cast<const float4*>(src) + tid);
      v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
    }
    float ss = v[0] * v[0] + v[1] * v[1] + v[2] * v[2] + v[3] * v[3];
#if PDEC_IDP
    load_gamma();
    // the group's (warp's) max |gamma v|, reduced beside the sum of squares (its scale is that times rs / 32767)
    float gm = fmaxf(fmaxf(fabsf(gam[0] * v[0]), fabsf(gam[1] * v[1])),
                     fmaxf(fabsf(gam[2] * v[2]), fabsf(gam[3] * v[3])));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      ss += __shfl_xor_sync(0xffffffffu, ss, o);
      gm = fmaxf(gm, __shfl_xor_sync(0xffffffffu, gm, o));
    }
#else
    ss = warp_sum(ss);
#endif
    if (lane == 0) red16()[warp] = ss;
    if (dst != nullptr && (tid >> 2) == p.b) {
      red_add4(dst + 4 * tid, v[0], v[1], v[2], v[3]);
      __stcg(reinterpret_cast<float4*>(zero) + tid, make_float4(0.f, 0.f, 0.f, 0.f));
    }
    cons_sync();
#if !PDEC_IDP
    load_gamma();  // after the block sync: each thread's cp.async copies, waited for by each, are then visible to all
#endif
    float4 t4 = reinterpret_cast<const float4*>(red16())[0];
#pragma unroll
    for (int i = 1; i < NCW / 4; ++i) {
      const float4 u = reinterpret_cast<const float4*>(red16())[i];
      t4.x += u.x; t4.y += u.y; t4.z += u.z; t4.w += u.w;
    }
    const float tot = (t4.x + t4.y) + (t4.z + t4.w);
    const float rs = rsqrtf(tot / (float)H + a.eps);
#if PDEC_MMA
    if (i8) {  // int8 codes h (bytes [0, H)) and residuals l (bytes [H, 2 H)), natural order, a scale per group (warp)
      float n[4], m = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        n[i] = gam[i] * (v[i] * rs);
        m = fmaxf(m, fabsf(n[i]));
      }
      m = warp_max(m);
      const float inv = m > 0.f ? 127.f / m : 0.f;
      if (lane == 0) sm<float>(OFF_SXG)[warp] = m * (1.f / 127.f);
      unsigned hb[4], lb[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) q8(n[i] * inv, hb[i], lb[i]);
      const int tf = tid_fresh();
      reinterpret_cast<unsigned*>(xs())[tf] = low_bytes(hb[0], hb[1], hb[2], hb[3]);
      reinterpret_cast<unsigned*>(xs())[H / 4 + tf] = low_bytes(lb[0], lb[1], lb[2], lb[3]);
      cons_sync();
      return;
    }
#endif
    // xs swizzled for load_xp: the 8 values k = 32 (L + 32 j) + 8 c .. + 7 (lane L's chunk c of segment j) at
    // ((4 j + c) * 32 + L) * 8, so that each of load_xp's 8 reads is 512 contiguous bytes across the warp
    const int k = 4 * tid;
    uint2* dstx = reinterpret_cast<uint2*>(xs() + ((4 * (k >> 10) + ((k >> 3) & 3)) * 32 + ((k >> 5) & 31)) * 8 +
                                           (k & 7));
#if PDEC_IDP
    {  // int16 with one scale per g128 group = per warp (k = 4 tid: warp w holds elements [128 w, 128 w + 128))
      const float n0 = gam[0] * (v[0] * rs), n1 = gam[1] * (v[1] * rs), n2 = gam[2] * (v[2] * rs),
                  n3 = gam[3] * (v[3] * rs);
      const float m = gm * rs;
      const float inv = m > 0.f ? 32767.f / m : 0.f;
      if (lane == 0) sm<float>(OFF_SXG)[warp] = m * (1.f / 32767.f);
      *dstx = make_uint2((__float2int_rn(n0 * inv) & 0xffff) | ((unsigned)__float2int_rn(n1 * inv) << 16),
                         (__float2int_rn(n2 * inv) & 0xffff) | ((unsigned)__float2int_rn(n3 * inv) << 16));
    }
#else
    const __half2 h01 = __floats2half2_rn(gam[0] * (v[0] * rs), gam[1] * (v[1] * rs));
    const __half2 h23 = __floats2half2_rn(gam[2] * (v[2] * rs), gam[3] * (v[3] * rs));
    *dstx = make_uint2(*reinterpret_cast<const unsigned*>(&h01), *reinterpret_cast<const unsigned*>(&h23));
#endif
    cons_sync();
  }
  __device__ __forceinline__ void load_xp() {  // this lane's 64 activations (see norm's swizzle) as pairs
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const uint4 u = reinterpret_cast<const uint4*>(xs())[(4 * j + c) * 32 + lane];
        if (PDEC_IDP) pair_i16(u, xp + 16 * j + 4 * c);
        else ctc_gemv::pair_x(u, xp + 16 * j + 4 * c);
      }
    if (PDEC_IDP) {  // segment j of lane L: elements [32 (L + 32 j), + 32), in group L / 4 + 8 j
      corr[0] = idp_corr(xp);
      corr[1] = idp_corr(xp + 16);
      sxl[0] = sm<float>(OFF_SXG)[lane >> 2];
      sxl[1] = sm<float>(OFF_SXG)[8 + (lane >> 2)];
    }
  }
#if PDEC_MMA
  // B's registers for gate|up (warp w: group w, K [128 w, 128 w + 128), 4 MMAs a row block; lane (gb, t) holds
  // column gb's K slots of activations 128 w + 32 t .. + 32) in xp[0..7], the offset correction of columns 0 and 1
  // in corr, the group's scale in sxl[0]
  __device__ __forceinline__ void load_b_gu() {
    const int warp = tid_fresh() >> 5;
    load_b32(reinterpret_cast<const unsigned char*>(xs()) + GS * warp, H, xp, corr[0], corr[1]);
    sxl[0] = sm<float>(OFF_SXG)[warp];
  }
  // B's registers for W_down: the block's 64 SwiGLU outputs as int8 codes (bytes [0, 64) of xs) and residuals (bytes
  // [64, 128)), written by down_begin with one scale (red16()[2]); lane (gb, t): channels 16 t .. + 16
  __device__ __forceinline__ void load_b_down() {
    const int tf = tid_fresh(), lane = tf & 31, gb = lane >> 2, t = lane & 3;
    const uint4 u = reinterpret_cast<const uint4*>(xs())[(gb & 1) * 4 + t];
    const bool on = gb < (PDEC_MMA_LO ? 2 : 1);
    xp[0] = on ? evens8(u.x, u.y) : 0u;
    xp[1] = on ? odds8(u.x, u.y) : 0u;
    xp[2] = on ? evens8(u.z, u.w) : 0u;
    xp[3] = on ? odds8(u.z, u.w) : 0u;
    int sum = __dp4a((int)xp[0], 0x01010101, __dp4a((int)xp[1], 0x01010101, 0));
    sum = __dp4a((int)xp[2], 0x01010101, __dp4a((int)xp[3], 0x01010101, sum));
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    corr[0] = -8 * __shfl_sync(0xffffffffu, sum, 0);
    corr[1] = -8 * __shfl_sync(0xffffffffu, sum, 4);
    sxl[0] = red16()[2];
  }
  // the gate|up tile (16 gate rows, 16 up rows, 2048 wide) on the tensor cores: warp w takes group w of all 32 rows
  // (two row blocks, 4 MMAs each; lane (g, t) reads 16 bytes of rows g and g + 8), its f32 partials (group scale x
  // activation scale applied) into shared memory [16 warps][128 rows of the block's 64 pairs], summed in down_begin
  // (PDEC_MMA_QKV: phase A's 24 q|k|v rows the same way, nrows = 24: rows 24..31 of the slot are padding whose
  // partials nobody reads)
  __device__ __forceinline__ void gu_mma(const unsigned char* slot, int j0, int nrows = 2 * GU_T) {
    constexpr int rb = H / 2, ng = H / GS;
    const int tf = tid_fresh(), lane = tf & 31, warp = tf >> 5, g = lane >> 2, t = lane & 3;
    const unsigned char* cw = slot + (GS / 2) * warp + 16 * t;
    const float* sc0 = reinterpret_cast<const float*>(slot + nrows * rb) + g * ng + warp;
    float* part = reinterpret_cast<float*>(xs()) + H / 2 + warp * 2 * FCH + j0 + g;
    // gate rows g, g + 8 (wa, wb), up rows g, g + 8 (wc, wd); two accumulators a row block (shorter MMA chains)
    const uint4 wa = *reinterpret_cast<const uint4*>(cw + g * rb);
    const uint4 wb = *reinterpret_cast<const uint4*>(cw + (g + 8) * rb);
    const uint4 wc = *reinterpret_cast<const uint4*>(cw + (GU_T + g) * rb);
    const uint4 wd = *reinterpret_cast<const uint4*>(cw + (GU_T + g + 8) * rb);
    const float s0 = sc0[0], s1 = sc0[8 * ng], s2 = sc0[GU_T * ng], s3 = sc0[(GU_T + 8) * ng];
    int c0[4] = {corr[0], corr[1], corr[0], corr[1]}, c1[4] = {0, 0, 0, 0};
    int c2[4] = {corr[0], corr[1], corr[0], corr[1]}, c3[4] = {0, 0, 0, 0};
    mma_rows(c0, c1, wa, wb, xp);
    mma_rows(c2, c3, wc, wd, xp);
    if (t == 0) {
      const float sx = sxl[0];
      part[0] = s0 * sx * mma_val(c0, c1, 0);
      part[8] = s1 * sx * mma_val(c0, c1, 2);
      part[FCH] = s2 * sx * mma_val(c2, c3, 0);
      part[FCH + 8] = s3 * sx * mma_val(c2, c3, 2);
    }
  }
#endif
  // one row's 2048-wide segment times this lane's activations (f32)
  __device__ __forceinline__ float seg(const unsigned char* w, const float* s) const {
#if PDEC_IDP
    return dot_seg_i(w, s, xp, lane, sxl, corr);
#else
    return dot_seg(w, s, xp, lane);
#endif
  }

  __device__ __forceinline__ void stage(int st, int l) {
    stamp(0);
#if PDEC_MMA
    // the activation registers are rewritten by every stage that reads them (when computing): killing them here,
    // unconditionally, ends their live ranges (else ptxas keeps phase A's 32 values alive through phase C, which
    // rewrites 8 of them, and spills them in phase A)
    if (st != 1) {
#pragma unroll
      for (int i = 0; i < 32; ++i) xp[i] = 0u;
      corr[0] = corr[1] = 0;
      sxl[0] = sxl[1] = 0.f;
    }
#endif
    if (st == 1 && barriers && p.b < NOB) {  // phase A's rows of this kv head: its 16 blocks' releases
      if (tid == 0) wait_count(ctl + CTL_QKV + p.b / OSL, (unsigned)OSL * (unsigned)(l + 1));
      cons_sync();
    }
    if (compute && (st == 3 || p.b < NOB)) {  // blocks 128.. have no rows in A and C
      if (st == 0) norm(l == 0 ? nullptr : xbuf(2 * l), xbuf(2 * l + 1), xbuf(2 * l + 2), PDEC_MMA_QKV);
      else if (st == 2) norm(xbuf(2 * l + 1), xbuf(2 * l + 2), xbuf(2 * l + 3), PDEC_MMA);
      else if (st == 3) norm(xbuf(2 * p.layers), nullptr, nullptr);
#if PDEC_MMA
      if (st == 2 || (st == 0 && PDEC_MMA_QKV)) load_b_gu();
      else if (st != 1) load_xp();
#else
      if (st != 1) load_xp();
#endif
    }
    stamp(1);
    stamp(2);
    stamp(3);
    stamp(4);
    wstate = 0;
  }
  // thread 0: until *c >= target (acquire), or the abort flag / a timeout
  __device__ __forceinline__ void wait_count(unsigned* c, unsigned target) {
    if (ld_acquire(c) >= target) return;
    const unsigned long long t0 = gtime();
    for (unsigned i = 1; ld_acquire(c) < target; ++i) {
      if ((i & 63u) == 0) {
        if (*(volatile unsigned*)(ctl + CTL_ABORT)) break;
        if (gtime() - t0 > TIMEOUT_NS) { atomicExch(ctl + CTL_ABORT, 3u); break; }
      }
    }
  }
  __device__ __forceinline__ void mid() {
    stamp(3);
    wstate = 2;
  }

  __device__ __forceinline__ void stage_end(int st, int l) {
    if (compute && st == 1) prefetch_gamma(a.mlp_norm + (size_t)l * H);
    if (compute && st == 2) prefetch_gamma(l + 1 < p.layers ? a.attn_norm + (size_t)(l + 1) * H : a.final_norm);
    stamp(5);
    ++nst;
    if (st == 3) return;  // the step's last stage: no barrier
    if (st == 0) {  // q|k|v rows out: release on the kv head's counter (the stores before it: bar.sync, cumulative)
      if (p.b < NOB) {
        cons_sync();
        if (tid == 0) red_release_add(ctl + CTL_QKV + p.b / OSL, 1u);
      }
      if (!PDEC_GRID_A) return;
    }
    ++nbar;
    if (barriers) {
      grid_barrier(ctl, nbar * (unsigned)p.G);
    } else {  // timing mode 1: no barrier, but the next norm's weights (cp.async) are in before it
      cp_async_wait_all();
      cons_sync();
    }
  }

  // K-2048 rows from a 34 KB tile: q|k|v (st 0), gate|up pairs -> SwiGLU (3), LM head (5)
  __device__ __forceinline__ void gemv(int st, int l, int r0, int cnt) {
    const unsigned char* slot = wait_tile();
    if (compute) {
      constexpr int rb = H / 2, ng = H / GS;
      const int nr = st == 3 ? 2 * cnt : cnt;
      const float* sc0 = reinterpret_cast<const float*>(slot + (size_t)nr * rb);
      if (st == 3 && PDEC_MMA) {
#if PDEC_MMA
        gu_mma(slot, r0 - p.b * FCH);
#endif
      } else if (st == 0 && PDEC_MMA_QKV) {
#if PDEC_MMA
        gu_mma(slot, 0, QKV_B);
#endif
      } else if (st == 3) {  // gate|up pairs: warp w takes pair w
        if (warp < cnt) {
          const float g0 = seg(slot + (size_t)warp * rb, sc0 + warp * ng);
          const float u0 = seg(slot + (size_t)(cnt + warp) * rb, sc0 + (cnt + warp) * ng);
          // both sums in 5 shuffles: after the first, lanes 0..15 carry g, lanes 16..31 u
          const bool up = lane & 16;
          float gu = (up ? u0 : g0) + __shfl_xor_sync(0xffffffffu, up ? g0 : u0, 16);
#pragma unroll
          for (int o = 8; o > 0; o >>= 1) gu += __shfl_xor_sync(0xffffffffu, gu, o);
          const float g = gu, u = __shfl_sync(0xffffffffu, gu, 16);
          if (lane == 0) {
            const half h = __float2half_rn(g / (1.f + expf(-g)) * u);
            hvec()[r0 - p.b * FCH + warp] = h;
            reinterpret_cast<half*>(a.ws + WS_H)[r0 + warp] = h;  // kept for checking only
          }
        }
      } else {  // one output per row: warp w takes rows w and w + 16
        float y0 = 0.f, y1 = 0.f;
        if (warp < cnt) y0 = seg(slot + (size_t)warp * rb, sc0 + warp * ng);
        if (warp + 16 < cnt) y1 = seg(slot + (size_t)(warp + 16) * rb, sc0 + (warp + 16) * ng);
        y0 = warp_sum(y0);
        y1 = warp_sum(y1);
        if (lane == 0) {
          float* out = st == 0 ? a.ws + WS_QKV : a.logits;
          if (warp < cnt) out[r0 + warp] = y0;
          if (warp + 16 < cnt) out[r0 + warp + 16] = y1;
        }
      }
    }
    release_tile();
#if PDEC_MMA_QKV
    if (compute && st == 0) {  // the 16 warps' partials of the q|k|v rows (gu_mma's layout: rows 16.. at + FCH)
      cons_sync();
      const int tf = tid_fresh();
      if (tf < cnt) {
        const float* part = reinterpret_cast<const float*>(xs()) + H / 2 + (tf < 16 ? tf : FCH + tf - 16);
        float y = 0.f;
#pragma unroll
        for (int w = 0; w < NCW; ++w) y += part[w * 2 * FCH];
        a.ws[WS_QKV + r0 + tf] = y;
      }
    }
#endif
  }

  // ---- attention over positions [c0, c1) for the 4 query heads of kv head hk
  __device__ __forceinline__ void att_begin(int l, int hk, int c0, int c1, bool write) {
    if (!compute) return;
    const float* qkv = a.ws + WS_QKV + hk * QKV_H;  // this kv head's 4 query heads, key, value
    const int pos = p.pos;
    const bool with_new = c1 == pos + 1;
    if (tid < 4 * HD) {
      const int h = tid >> 6, d = tid & 63, base = h * HD;
      const float q = __ldcg(qkv + base + d), qp = __ldcg(qkv + base + (d ^ 32));
      const float cs = rope()[d & 31], sn = rope()[32 + (d & 31)];
      qs()[qi(h, d)] = (d < 32 ? q * cs - qp * sn : q * cs + qp * sn) * (0.125f * LOG2E);
    } else if (with_new && tid < 5 * HD) {  // the new key: RoPE, fp16, into the cache
      const int d = tid - 4 * HD, base = 4 * HD;
      const float k = __ldcg(qkv + base + d), kp = __ldcg(qkv + base + (d ^ 32));
      const float cs = rope()[d & 31], sn = rope()[32 + (d & 31)];
      const half kh = __float2half_rn(d < 32 ? k * cs - kp * sn : k * cs + kp * sn);
      fresh()[d] = kh;
      if (write) a.kcache[((size_t)(l * NKV + hk) * a.max_len + pos) * HD + d] = kh;
    } else if (with_new && tid < 6 * HD) {  // the new value
      const int d = tid - 5 * HD;
      const half vh = __float2half_rn(__ldcg(qkv + 5 * HD + d));
      fresh()[HD + d] = vh;
      if (write) a.vcache[((size_t)(l * NKV + hk) * a.max_len + pos) * HD + d] = vh;
    }
#if PDEC_ATT_WARP
    cons_sync();
    {  // every warp's state empty, except warp NCW - 1's: the new row (q stays in shared memory)
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        om[h] = -INFINITY;
        ol[h] = 0.f;
        acc[2 * h] = acc[2 * h + 1] = 0.f;
      }
      if (with_new && warp == NCW - 1) {  // start from the new row: score, weight 1, its value
        float sn[4];
        att_score(fresh(), sn);
        const float2 vf = __half22float2(reinterpret_cast<const __half2*>(fresh() + HD)[lane]);
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          om[h] = sn[h];
          ol[h] = 1.f;
          acc[2 * h] = vf.x;
          acc[2 * h + 1] = vf.y;
        }
      }
    }
  }
  // 8 fp16 values (16 bytes) as f32
  __device__ __forceinline__ static void half8_to_f32(const uint4 u, float* f) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
  // the 4 heads' scores (log2 domain) of one cached row: each lane of a group of 8 reads 16 bytes of it, the
  // group reduces (3 shuffles a head); every lane of the group gets all 4
  __device__ __forceinline__ void att_score(const half* row, float* s) const {
    float kf[8];
    half8_to_f32(reinterpret_cast<const uint4*>(row)[lane & 7], kf);
#pragma unroll
    for (int h = 0; h < 4; ++h) {  // q from shared memory (two 16-byte reads a head; registers are short)
      const float4 u = *reinterpret_cast<const float4*>(qs() + qi(h, 8 * (lane & 7)));
      const float4 v = *reinterpret_cast<const float4*>(qs() + qi(h, 8 * (lane & 7)) + 4);
      float a0 = u.x * kf[0], a1 = u.y * kf[1];
      a0 = fmaf(u.z, kf[2], a0);
      a1 = fmaf(u.w, kf[3], a1);
      a0 = fmaf(v.x, kf[4], a0);
      a1 = fmaf(v.y, kf[5], a1);
      a0 = fmaf(v.z, kf[6], a0);
      a1 = fmaf(v.w, kf[7], a1);
      s[h] = a0 + a1;
    }
#pragma unroll
    for (int o = 1; o < 8; o <<= 1)
#pragma unroll
      for (int h = 0; h < 4; ++h) s[h] += __shfl_xor_sync(0xffffffffu, s[h], o);
  }
  // n positions of a ring tile (K rows at kp, V rows at vp): warp w, lane group g scores position
  // 64 it + 4 w + g (16-byte K reads); the warp's max per head over them (2 shuffles a head), the state rescaled
  // once, then per position its 4 weights from its lane group (shuffles) times its V row (4 bytes a lane: the
  // sums stay 8 registers a lane).  No block sync: each warp releases the tile when done.
  __device__ __forceinline__ void att_rows(const half* kp, const half* vp, int n) {
    constexpr int IT = ATT_T / (4 * NCW);
    const int g = lane >> 3;
    float s[IT][4];
    float tm[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
#pragma unroll
    for (int it = 0; it < IT; ++it) {
      const int i = it * 4 * NCW + warp * 4 + g;
      if (it * 4 * NCW < n) {  // warp-uniform (the shuffles need all lanes)
        att_score(kp + i * HD, s[it]);
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          if (i >= n) s[it][h] = -INFINITY;
          tm[h] = fmaxf(tm[h], s[it][h]);
        }
      }
    }
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      tm[h] = fmaxf(tm[h], __shfl_xor_sync(0xffffffffu, tm[h], 8));
      tm[h] = fmaxf(tm[h], __shfl_xor_sync(0xffffffffu, tm[h], 16));
      const float mn = fmaxf(om[h], tm[h]);
      const float al = mn == -INFINITY ? 1.f : exp2f(om[h] - mn);
      om[h] = mn;
      ol[h] *= al;
      acc[2 * h] *= al;
      acc[2 * h + 1] *= al;
    }
#pragma unroll
    for (int it = 0; it < IT; ++it) {
      if (it * 4 * NCW < n) {
        float e[4];
#pragma unroll
        for (int h = 0; h < 4; ++h) e[h] = s[it][h] == -INFINITY ? 0.f : exp2f(s[it][h] - om[h]);
#pragma unroll
        for (int gg = 0; gg < 4; ++gg) {
          const int i = it * 4 * NCW + warp * 4 + gg;
          if (i < n) {  // warp-uniform
            const float2 vf = __half22float2(reinterpret_cast<const __half2*>(vp + i * HD)[lane]);
#pragma unroll
            for (int h = 0; h < 4; ++h) {
              const float eh = __shfl_sync(0xffffffffu, e[h], 8 * gg);
              ol[h] += eh;
              acc[2 * h] = fmaf(eh, vf.x, acc[2 * h]);
              acc[2 * h + 1] = fmaf(eh, vf.y, acc[2 * h + 1]);
            }
          }
        }
      }
    }
  }
#else
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.f;
    cons_sync();
    if (with_new) {  // start the online softmax from the new row (score, weight 1, its value in warp 0)
      const float2 kf = __half22float2(reinterpret_cast<const __half2*>(fresh())[lane]);
      const float2 vf = __half22float2(reinterpret_cast<const __half2*>(fresh() + HD)[lane]);
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        const float sh = warp_sum(qs()[qi(h, 2 * lane)] * kf.x + qs()[qi(h, 2 * lane) + 1] * kf.y);
        if (warp == 0) { acc[2 * h] = vf.x; acc[2 * h + 1] = vf.y; }
        if (tid == 0) { mls()[h] = sh; mls()[4 + h] = 1.f; }
      }
    } else if (tid < 4) {
      mls()[tid] = -INFINITY;
      mls()[4 + tid] = 0.f;
    }
    cons_sync();
  }
  // n positions: K rows at kp, V rows at vp (64 halves each), online softmax into mls / acc
  __device__ __forceinline__ void att_rows(const half* kp, const half* vp, int n) {
    const int pp = tid >> 2, qt = tid & 3;
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    if (pp < n) {
      const uint4* kr = reinterpret_cast<const uint4*>(kp + pp * HD + qt * 16);
      const uint4 k0 = kr[0], k1 = kr[1];
      const unsigned kw[8] = {k0.x, k0.y, k0.z, k0.w, k1.x, k1.y, k1.z, k1.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // dims qt * 16 + 4 i .. + 3: one 16-byte read of q per head
        const float2 ka = __half22float2(*reinterpret_cast<const __half2*>(&kw[2 * i]));
        const float2 kb = __half22float2(*reinterpret_cast<const __half2*>(&kw[2 * i + 1]));
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          const float4 q4 = reinterpret_cast<const float4*>(qs() + qi(h, qt * 16))[i];
          s[h] = fmaf(q4.x, ka.x, s[h]);
          s[h] = fmaf(q4.y, ka.y, s[h]);
          s[h] = fmaf(q4.z, kb.x, s[h]);
          s[h] = fmaf(q4.w, kb.y, s[h]);
        }
      }
    }
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      s[h] += __shfl_xor_sync(0xffffffffu, s[h], 1);
      s[h] += __shfl_xor_sync(0xffffffffu, s[h], 2);
    }
    if (qt == 0 && pp < n) {
#pragma unroll
      for (int h = 0; h < 4; ++h) sc()[h * ATT_T + pp] = s[h];
    }
    cons_sync();
    if (warp < 4) {
      const int h = warp;
      float mx = -INFINITY;
      for (int q = lane; q < n; q += 32) mx = fmaxf(mx, sc()[h * ATT_T + q]);
      mx = warp_max(mx);
      const float mo = mls()[h], mn = fmaxf(mo, mx);
      float sum = 0.f;
      for (int q = lane; q < n; q += 32) {
        const float e = exp2f(sc()[h * ATT_T + q] - mn);
        sc()[h * ATT_T + q] = e;
        sum += e;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float al = exp2f(mo - mn);
        mls()[h] = mn;
        mls()[4 + h] = mls()[4 + h] * al + sum;
        mls()[8 + h] = al;
      }
    }
    cons_sync();
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      const float al = mls()[8 + h];
      acc[2 * h] *= al;
      acc[2 * h + 1] *= al;
    }
    for (int q = warp; q < n; q += NCW) {
      const float2 vf = __half22float2(reinterpret_cast<const __half2*>(vp + q * HD)[lane]);
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        const float e = sc()[h * ATT_T + q];
        acc[2 * h] = fmaf(e, vf.x, acc[2 * h]);
        acc[2 * h + 1] = fmaf(e, vf.y, acc[2 * h + 1]);
      }
    }
    cons_sync();
  }
#endif

  __device__ __forceinline__ void att_tile(int, int, int, int n) {
    const unsigned char* slot = wait_tile();
    if (compute) {
      const half* kp = reinterpret_cast<const half*>(slot);
      att_rows(kp, kp + ATT_T * HD, n);
    }
    release_tile();
  }


  // the 4 heads' sums over the 16 warps: redundant (one chunk) -> normalized outputs into ovec; chunked ->
  // (max, sum, 64 sums) per query head into the workspace, then a release on the kv head's counter
  __device__ __forceinline__ void att_end(int l, int hk, int c, bool write_attn) {
    if (!compute) {
      if (p.C > 1 && tid == 0) red_release_add(ctl + CTL_HEAD + hk, 1u);
      return;
    }
    float* red = reinterpret_cast<float*>(xs());  // [16 warps][4 heads][64]
#if PDEC_ATT_WARP
    // one merge of the 16 warps' states by 256 threads
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      red[(warp * 4 + h) * HD + 2 * lane] = acc[2 * h];
      red[(warp * 4 + h) * HD + 2 * lane + 1] = acc[2 * h + 1];
    }
    if (lane == 0) {
#pragma unroll
      for (int h = 0; h < 4; ++h) { sc()[warp * 4 + h] = om[h]; sc()[4 * NCW + warp * 4 + h] = ol[h]; }
    }
    cons_sync();
    if (tid < 4 * HD) {
      const int h = tid >> 6, d = tid & 63;
      float M = -INFINITY;
#pragma unroll
      for (int w = 0; w < NCW; ++w) M = fmaxf(M, sc()[w * 4 + h]);
      float o = 0.f, L = 0.f;
#pragma unroll
      for (int w = 0; w < NCW; ++w) {
        const float mw = sc()[w * 4 + h], e = mw == -INFINITY ? 0.f : exp2f(mw - M);
        o = fmaf(red[(w * 4 + h) * HD + d], e, o);
        L = fmaf(sc()[4 * NCW + w * 4 + h], e, L);
      }
      if (p.C == 1) {
        put_o(o / L, hk, write_attn);
      } else {
        float* P = a.ws + WS_PART + ((4 * hk + h) * CMAX + c) * 66;
        P[2 + d] = o;
        if (d == 0) { P[0] = M; P[1] = L; }
      }
    }
#else
#pragma unroll
    for (int h = 0; h < 4; ++h) {
      red[(warp * 4 + h) * HD + 2 * lane] = acc[2 * h];
      red[(warp * 4 + h) * HD + 2 * lane + 1] = acc[2 * h + 1];
    }
    cons_sync();
    if (tid < 4 * HD) {
      const int h = tid >> 6, d = tid & 63;
      float o = 0.f;
#pragma unroll
      for (int g = 0; g < NCW; ++g) o += red[(g * 4 + h) * HD + d];
      if (p.C == 1) {
        put_o(o / mls()[4 + h], hk, write_attn);
      } else {
        float* P = a.ws + WS_PART + ((4 * hk + h) * CMAX + c) * 66;
        P[2 + d] = o;
        if (d == 0) { P[0] = mls()[h]; P[1] = mls()[4 + h]; }
      }
    }
#endif
    if (p.C > 1) {
      cons_sync();  // the partials before thread 0's release (cumulative, as in the grid barrier)
      if (tid == 0) red_release_add(ctl + CTL_HEAD + hk, 1u);
    }
  }

  // attention output tid (< 256: head tid / 64, dim tid % 64) as fp16 into ovec (and the workspace, for checking
  // only); with PDEC_MMA_O also as f32 into xs()[tid] (only this thread read that word of the reduction buffer) and
  // the warp's max |o| into red16()[warp] (warps 0..3: group 0, 4..7: group 1), which oproj quantizes from
  __device__ __forceinline__ void put_o(float o, int hk, bool write_attn) {
    const half oh = __float2half_rn(o);
    ovec()[tid] = oh;
    if (write_attn) reinterpret_cast<half*>(a.ws + WS_ATTN)[hk * 4 * HD + tid] = oh;
#if PDEC_MMA_O
    reinterpret_cast<float*>(xs())[tid] = o;
    const float m = warp_max(fabsf(o));
    if (lane == 0) red16()[warp] = m;
#endif
  }

  // chunked attention: wait until the kv head's C chunks are published (a monotone counter: C a layer), then
  // every block of the head merges them itself into ovec
  __device__ __forceinline__ void att_merge(int l, int hk, bool write_attn) {
    if (tid == 0 && barriers) wait_count(ctl + CTL_HEAD + hk, (unsigned)p.C * (unsigned)(l + 1));
    cons_sync();
    if (!compute) return;
    if (tid < 4 * HD) {
      const int h = tid >> 6, d = tid & 63;
      const float* P = a.ws + WS_PART + (4 * hk + h) * CMAX * 66;
      float M = -INFINITY;
      for (int cc = 0; cc < p.C; ++cc) M = fmaxf(M, __ldcg(P + cc * 66));
      float L = 0.f, O = 0.f;
      for (int cc = 0; cc < p.C; ++cc) {
        const float e = exp2f(__ldcg(P + cc * 66) - M);
        L = fmaf(__ldcg(P + cc * 66 + 1), e, L);
        O = fmaf(__ldcg(P + cc * 66 + 2 + d), e, O);
      }
      put_o(O / L, hk, write_attn);
    }
  }

#if PDEC_MMA_O
  // W_o rows [128 j, 128 j + 128) x the kv head's 256 columns (2 groups) on the tensor cores, added into the
  // residual (version 2 l + 1): the 256 outputs (f32 in xs, put_o) quantized once, int8 codes at byte OB of xs and
  // residuals at OB + 256 with one scale per group (max |o| / 127); warp w < 8 takes rows [16 w, 16 w + 16), both
  // groups (load_b32 twice, 8 MMAs in 4 chains), lane 4 g's rows g and g + 8 gathered by 4 for two 16-byte atomics
  __device__ __forceinline__ void oproj(int l, int, int j) {
    constexpr int OB = 4096;  // past the f32 outputs; the rest of att_end's reduction buffer is dead
    unsigned char* ob = reinterpret_cast<unsigned char*>(xs()) + OB;
    if (compute) {
      cons_sync();  // the outputs and their warps' max complete
      const int tf = tid_fresh();
      if (tf < 4 * HD) {
        const float4 m4 = reinterpret_cast<const float4*>(red16())[tf >> 7];
        const float m = fmaxf(fmaxf(m4.x, m4.y), fmaxf(m4.z, m4.w));
        unsigned hb, lb;
        q8(reinterpret_cast<const float*>(xs())[tf] * (m > 0.f ? 127.f / m : 0.f), hb, lb);
        ob[tf] = (unsigned char)hb;
        ob[4 * HD + tf] = (unsigned char)lb;
      }
      cons_sync();
    }
    const unsigned char* slot = wait_tile();
    const int tf = tid_fresh(), lane = tf & 31, warp = tf >> 5;
    if (compute && warp < OROWS / 16) {
      const int g = lane >> 2, t = lane & 3, row = 16 * warp + g;
      unsigned b[16];
      int cr[4];
      load_b32(ob, 4 * HD, b, cr[0], cr[1]);
      load_b32(ob + GS, 4 * HD, b + 8, cr[2], cr[3]);
      const unsigned char* w = slot + row * 128 + 16 * t;
      const uint4 wa0 = *reinterpret_cast<const uint4*>(w), wb0 = *reinterpret_cast<const uint4*>(w + 1024);
      const uint4 wa1 = *reinterpret_cast<const uint4*>(w + 64), wb1 = *reinterpret_cast<const uint4*>(w + 1088);
      int c0[4] = {cr[0], cr[1], cr[0], cr[1]}, c1[4] = {0, 0, 0, 0};
      int c2[4] = {cr[2], cr[3], cr[2], cr[3]}, c3[4] = {0, 0, 0, 0};
      mma_rows(c0, c1, wa0, wb0, b);
      mma_rows(c2, c3, wa1, wb1, b + 8);
      const float* scl = reinterpret_cast<const float*>(slot + OROWS * 128);  // [128 rows][2 groups]
      const float2 sa = *reinterpret_cast<const float2*>(scl + 2 * row);
      const float2 sb = *reinterpret_cast<const float2*>(scl + 2 * (row + 8));
      const float4 m0 = reinterpret_cast<const float4*>(red16())[0], m1 = reinterpret_cast<const float4*>(red16())[1];
      const float sx0 = fmaxf(fmaxf(m0.x, m0.y), fmaxf(m0.z, m0.w)) * (1.f / 127.f);
      const float sx1 = fmaxf(fmaxf(m1.x, m1.y), fmaxf(m1.z, m1.w)) * (1.f / 127.f);
      const float y = sa.x * sx0 * mma_val(c0, c1, 0) + sa.y * sx1 * mma_val(c2, c3, 0);
      const float z = sb.x * sx0 * mma_val(c0, c1, 2) + sb.y * sx1 * mma_val(c2, c3, 2);
      // row g's value sits in lane 4 g: lanes 0 and 16 gather rows 0..3 and 4..7 (and + 8)
      const float y1 = __shfl_down_sync(0xffffffffu, y, 4), y2 = __shfl_down_sync(0xffffffffu, y, 8),
                  y3 = __shfl_down_sync(0xffffffffu, y, 12);
      const float z1 = __shfl_down_sync(0xffffffffu, z, 4), z2 = __shfl_down_sync(0xffffffffu, z, 8),
                  z3 = __shfl_down_sync(0xffffffffu, z, 12);
      if ((lane & 15) == 0) {
        float* xo = xbuf(2 * l + 1) + j * OROWS + 16 * warp + (lane >> 2);
        red_add4(xo, y, y1, y2, y3);
        red_add4(xo + 8, z, z1, z2, z3);
      }
    }
    release_tile();
  }
#else
  // W_o rows [128 j, 128 j + 128) x the kv head's 256 columns (2 groups) times ovec, added into the residual
  // (version 2 l + 1; its base, version 2 l, was stored there in phase A).  8 lanes a row: lane q = lane % 8
  // takes columns [32 q, 32 q + 32), in group q / 4; 4 rows a warp, 2 passes.
  __device__ __forceinline__ void oproj(int l, int hk, int j) {
    const int q = lane & 7;
    if (compute) {
      cons_sync();  // ovec complete
      if (PDEC_IDP_OD) {
        sxl[0] = quant32(ovec() + 32 * q, xp, corr[0]);
      } else {
#pragma unroll
        for (int c = 0; c < 4; ++c)
          ctc_gemv::pair_x(*reinterpret_cast<const uint4*>(ovec() + 32 * q + 8 * c), xp + 4 * c);
      }
    }
    const unsigned char* slot = wait_tile();
    if (compute) {
      float* xo = xbuf(2 * l + 1) + j * OROWS;
      const float* scl = reinterpret_cast<const float*>(slot + OROWS * 128);
      constexpr int NP = OROWS / 64;
      float y[NP];
#pragma unroll
      for (int pass = 0; pass < NP; ++pass) {  // all products first (the atomics below are ordered asm)
        const int r = pass * 64 + warp * 4 + (lane >> 3);
        const uint4 w = reinterpret_cast<const uint4*>(slot + r * 128)[q];
        y[pass] = PDEC_IDP_OD ? scl[2 * r + (q >> 2)] * sxl[0] * (float)idp32(w, xp, corr[0])
                              : scl[2 * r + (q >> 2)] * dot32(w, xp);
      }
#pragma unroll
      for (int pass = 0; pass < NP; ++pass) {
        float v = y[pass];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        v += __shfl_xor_sync(0xffffffffu, v, 4);
        // rows r .. r + 3 sit in lanes 0, 8, 16, 24: one 16-byte atomic from lane 0
        const float v1 = __shfl_down_sync(0xffffffffu, v, 8), v2 = __shfl_down_sync(0xffffffffu, v, 16),
                    v3 = __shfl_down_sync(0xffffffffu, v, 24);
        if (lane == 0) red_add4(xo + pass * 64 + warp * 4, v, v1, v2, v3);
      }
    }
    release_tile();
  }
#endif

  // the block's 64 SwiGLU outputs as pairs: lane parity hp takes channels [32 hp, 32 hp + 32) of the slice
  __device__ __forceinline__ void down_begin() {
    if (!compute) return;
#if PDEC_MMA
    cons_sync();  // the gate|up partials complete: sum the 16 warps', SwiGLU
    const int tid = tid_fresh(), lane = tid & 31, warp = tid >> 5;
    if (tid < FCH) {
      const float* part = reinterpret_cast<const float*>(xs()) + H / 2 + tid;
      float g = 0.f, u = 0.f;
#pragma unroll
      for (int w = 0; w < NCW; ++w) {
        g += part[w * 2 * FCH];
        u += part[w * 2 * FCH + FCH];
      }
      const float hf = g / (1.f + expf(-g)) * u;
      const half h = __float2half_rn(hf);
      hvec()[tid] = h;
      reinterpret_cast<half*>(a.ws + WS_H)[p.b * FCH + tid] = h;  // kept for checking only
      // int8 code and residual of each output with one scale for the 64 (the two warps' max |h| exchanged)
      const float m = warp_max(fabsf(hf));
      if (lane == 0) red16()[warp] = m;
      asm volatile("bar.sync 2, %0;" ::"n"(FCH) : "memory");
      const float mx = fmaxf(red16()[0], red16()[1]);
      const float inv = mx > 0.f ? 127.f / mx : 0.f;
      unsigned hb, lb;
      q8(hf * inv, hb, lb);
      reinterpret_cast<unsigned char*>(xs())[tid] = (unsigned char)hb;
      reinterpret_cast<unsigned char*>(xs())[FCH + tid] = (unsigned char)lb;
      if (tid == 0) red16()[2] = mx * (1.f / 127.f);
    }
    cons_sync();
    load_b_down();
    return;
#endif
    cons_sync();  // hvec complete
    const int hp = lane & 1;
    if (PDEC_IDP_OD) {
      sxl[0] = quant32(hvec() + 32 * hp, xp, corr[0]);
    } else {
#pragma unroll
      for (int c = 0; c < 4; ++c)
        ctc_gemv::pair_x(*reinterpret_cast<const uint4*>(hvec() + 32 * hp + 8 * c), xp + 4 * c);
    }
  }
  // W_down's pass order in a tile: rotated by block (PDEC_STAGGER; with the tile order rotated in walk, the 128
  // blocks' atomics land on 8 different 256-row ranges at a time)
  __device__ __forceinline__ int rot(int pass) const { return PDEC_STAGGER ? (pass + (p.b >> 1)) & 3 : pass; }
  // W_down rows [1024 t, 1024 t + 1024) x the block's 64 columns, added into the residual (version 2 l + 2):
  // 2 lanes a row, 16 rows a warp, 4 passes
  __device__ __forceinline__ void down(int l, int, int t) {
    const unsigned char* slot = wait_tile();
#if PDEC_MMA
    // on the tensor cores: warp w takes rows [64 w, 64 w + 64) of the tile in 4 row blocks; in block i, lane group g's
    // MMA rows g and g + 8 are rows 4 g + (i + g) % 4 and 32 + that (the rotation keeps each half-warp's 8-byte reads
    // on distinct banks), so that after the 4 blocks lane 4 g holds rows 4 g .. 4 g + 3 and 32 + 4 g .. (rotated
    // back by selects): two 16-byte atomics
    if (compute) {
      float* xo = xbuf(2 * l + 2) + t * DROWS;
      const float* scl = reinterpret_cast<const float*>(slot + DROWS * (FCH / 2));
      const int tf = tid_fresh(), lane = tf & 31, warp = tf >> 5;
      const int g = lane >> 2, tq = lane & 3, r = g & 3, base = warp * 64 + 4 * g;
      const float4 sa = *reinterpret_cast<const float4*>(scl + base);
      const float4 sb = *reinterpret_cast<const float4*>(scl + base + 32);
      uint2 wa[4], wb[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = base + ((i + r) & 3);
        wa[i] = *reinterpret_cast<const uint2*>(slot + row * (FCH / 2) + 8 * tq);
        wb[i] = *reinterpret_cast<const uint2*>(slot + (row + 32) * (FCH / 2) + 8 * tq);
      }
      float y[4], z[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        int c[4] = {corr[0], corr[1], corr[0], corr[1]};
        mma_word(c, wa[i].x, wb[i].x, xp[0], xp[1]);
        mma_word(c, wa[i].y, wb[i].y, xp[2], xp[3]);
        y[i] = (float)c[0] + (float)c[1] * MMA_KL;
        z[i] = (float)c[2] + (float)c[3] * MMA_KL;
      }
      const bool r1 = r & 1, r2 = r & 2;  // o[k] = y[(k - r) % 4]
      const float ya[4] = {r1 ? y[3] : y[0], r1 ? y[0] : y[1], r1 ? y[1] : y[2], r1 ? y[2] : y[3]};
      const float za[4] = {r1 ? z[3] : z[0], r1 ? z[0] : z[1], r1 ? z[1] : z[2], r1 ? z[2] : z[3]};
      const float sx = sxl[0];
      if (tq == 0) {
        red_add4(xo + base, sa.x * sx * (r2 ? ya[2] : ya[0]), sa.y * sx * (r2 ? ya[3] : ya[1]),
                 sa.z * sx * (r2 ? ya[0] : ya[2]), sa.w * sx * (r2 ? ya[1] : ya[3]));
        red_add4(xo + base + 32, sb.x * sx * (r2 ? za[2] : za[0]), sb.y * sx * (r2 ? za[3] : za[1]),
                 sb.z * sx * (r2 ? za[0] : za[2]), sb.w * sx * (r2 ? za[1] : za[3]));
      }
    }
    release_tile();
    return;
#endif
    if (compute) {
      float* xo = xbuf(2 * l + 2) + t * DROWS;
      const float* scl = reinterpret_cast<const float*>(slot + DROWS * (FCH / 2));
      const int hp = lane & 1;
      constexpr int NP = DROWS / 256;
      static_assert(NP == 4, "rot() rotates 4 passes");
      float y[NP];
#pragma unroll
      for (int pass = 0; pass < NP; ++pass) {  // all products first (the atomics below are ordered asm)
        const int r = rot(pass) * 256 + warp * 16 + (lane >> 1);
        const uint4 w = reinterpret_cast<const uint4*>(slot + r * (FCH / 2))[hp];
        y[pass] = PDEC_IDP_OD ? (float)idp32(w, xp, corr[0]) * (scl[r] * sxl[0]) : dot32(w, xp) * scl[r];
      }
#pragma unroll
      for (int pass = 0; pass < NP; ++pass) {
        float v = y[pass];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        // rows r .. r + 3 sit in lanes 0, 2, 4, 6 (of each 8): one 16-byte atomic from lane 8 i
        const float v1 = __shfl_down_sync(0xffffffffu, v, 2), v2 = __shfl_down_sync(0xffffffffu, v, 4),
                    v3 = __shfl_down_sync(0xffffffffu, v, 6);
        if ((lane & 7) == 0) red_add4(xo + rot(pass) * 256 + warp * 16 + (lane >> 1), v, v1, v2, v3);
      }
    }
    release_tile();
  }
};

__device__ __forceinline__ int attn_chunks(int pos, int G, int span) {
  if (span <= 0) {  // one chunk (computed by each of the kv head's 16 blocks) up to 256 positions, else 64 a chunk
    if (pos + 1 <= 256) return 1;
    span = 64;
  }
  return max(1, min(min(CMAX, G / NKV), (pos + span) / span));
}

__global__ void __launch_bounds__(NT, 1) decode_step(const __grid_constant__ Args a) {
  unsigned* ctl = reinterpret_cast<unsigned*>(a.ws + WS_CTL);
  if (threadIdx.x == 0) {
    for (int i = 0; i < NSLOT; ++i) { mbar_init(full_bar(i), 1); mbar_init(empty_bar(i), NCW); }
    if (PDEC_HOLD) *sm<unsigned>(OFF_HOLD) = 0u;
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  Plan p;
  p.G = gridDim.x; p.b = blockIdx.x; p.pos = __ldg(a.pos); p.layers = a.layers; p.vocab = a.vocab;
  p.C = attn_chunks(p.pos, p.G, a.att_span);
  const int warp = threadIdx.x >> 5;
  if (warp == NCW) {
    if ((threadIdx.x & 31) == 0) {
      Producer pr{a, ctl, 0u, evict_first_policy(), p.pos, 0u, 0u, 0u};
      if ((a.mode & 8) == 0) {  // mode bit 8 (timing only): no copies; the consumers compute on stale slots
        walk(pr, p);
        pr.finish();
      }
    }
    return;
  }
  Consumer cs{a, ctl, p};
  cs.t = 0; cs.nbar = 0; cs.nst = 0; cs.wstate = 0;
  cs.copies = (a.mode & 8) == 0;
  cs.tid = threadIdx.x; cs.lane = threadIdx.x & 31; cs.warp = warp;
  cs.compute = (a.mode & 2) == 0;
  cs.barriers = (a.mode & 1) == 0;
  cs.trace = a.trace == nullptr ? nullptr : a.trace + (size_t)p.b * TRACE_STRIDE;
  if (cs.trace != nullptr && threadIdx.x == 0) cs.trace[0] = gtime();
  if (threadIdx.x < 32) {  // RoPE at this position (the same f32 angle as the reference: pos * inv_freq)
    float sn, c;
    sincosf((float)p.pos * a.inv_freq[threadIdx.x], &sn, &c);
    cs.rope()[threadIdx.x] = c;
    cs.rope()[32 + threadIdx.x] = sn;
  }
  cs.prefetch_gamma(a.attn_norm);
  cp_async_wait_all();
  cons_sync();
  walk(cs, p);
  // the last block out resets the counters and zeroes residual buffer 3 (version 1) for the next launch
  unsigned* last = reinterpret_cast<unsigned*>(cs.red16());
  if (threadIdx.x == 0) {
    __threadfence();
    *last = atomicAdd(ctl + CTL_EXIT, 1u) == (unsigned)p.G - 1;
    if (*last) {
      atomicExch(ctl + CTL_BAR, 0u);
      for (int i = 0; i < NKV; ++i) { atomicExch(ctl + CTL_HEAD + i, 0u); atomicExch(ctl + CTL_QKV + i, 0u); }
      atomicExch(ctl + CTL_EXIT, 0u);
    }
  }
  cons_sync();
  if (*last) __stcg(reinterpret_cast<float4*>(a.ws + WS_X + 3 * H) + threadIdx.x, make_float4(0.f, 0.f, 0.f, 0.f));
}


// nb grid barriers and nothing else, same launch shape: what one barrier costs
__global__ void __launch_bounds__(NT, 1) barrier_bench(float* ws, int nb) {
  unsigned* ctl = reinterpret_cast<unsigned*>(ws + WS_CTL);
  if (threadIdx.x >= NCT) return;
  for (int i = 1; i <= nb; ++i) grid_barrier(ctl, (unsigned)i * gridDim.x);
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(ctl + CTL_EXIT, 1u) == gridDim.x - 1) {
      atomicExch(ctl + CTL_BAR, 0u);
      atomicExch(ctl + CTL_EXIT, 0u);
    }
  }
}

}  // namespace ctc_pdec

static cudaError_t g_last = cudaSuccess;

static cudaError_t launch(const void* fn, void** args, int grid, int coop, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(ctc_pdec::NT);
  cfg.dynamicSmemBytes = ctc_pdec::SMEM;
  cfg.stream = stream;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeCooperative;
  at[0].val.cooperative = coop;
  cfg.attrs = at;
  cfg.numAttrs = 1;
  return cudaLaunchKernelExC(&cfg, fn, args);
}

// grid (blocks = multiprocessors, one each), shared memory bytes, threads; 0 or a CUDA error code
extern "C" int ctc_pdec_config(int* grid, int* smem, int* threads) {
  int dev = 0, sms = 0, per = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (!e) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (!e) e = cudaFuncSetAttribute(ctc_pdec::decode_step, cudaFuncAttributeMaxDynamicSharedMemorySize, ctc_pdec::SMEM);
  if (!e) e = cudaFuncSetAttribute(ctc_pdec::barrier_bench, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   ctc_pdec::SMEM);
  if (!e) e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per, ctc_pdec::decode_step, ctc_pdec::NT, ctc_pdec::SMEM);
  g_last = e;
  if (e) return (int)e;
  *grid = sms * (per < 1 ? 0 : 1);
  *smem = ctc_pdec::SMEM;
  *threads = ctc_pdec::NT;
  if (per < 1) return -1;
  return sms < ctc_pdec::NOB ? -2 : 0;  // phases B and C need 128 co-resident blocks
}

extern "C" int ctc_pdec_launch(const ctc_pdec::Args* a, int grid, int coop, void* stream) {
  ctc_pdec::Args copy = *a;
  void* args[] = {&copy};
  g_last = launch((const void*)ctc_pdec::decode_step, args, grid, coop, (cudaStream_t)stream);
  return (int)g_last;
}

extern "C" int ctc_pdec_barrier_bench(float* ws, int nb, int grid, int coop, void* stream) {
  void* args[] = {&ws, &nb};
  g_last = launch((const void*)ctc_pdec::barrier_bench, args, grid, coop, (cudaStream_t)stream);
  return (int)g_last;
}

extern "C" const char* ctc_pdec_error() { return cudaGetErrorString(g_last); }

extern "C" int ctc_pdec_ws_floats() { return ctc_pdec::WS_CTL + 64; }
extern "C" int ctc_pdec_smem_bytes() { return ctc_pdec::SMEM; }
// ---- end ctc ----
"""


def source_text() -> str:
    """The whole translation unit: includes, :mod:`.cuda_gemv`'s half2 helpers, the persistent kernel."""
    return ("#include <cuda_fp16.h>\n#include <cuda_runtime.h>\n#include <math.h>\n"
            + cuda_gemv.CUDA_SOURCE + CUDA_SOURCE)


def build_library(out_dir: Path, nvcc: str | None = None, arch: str = "sm_90a", extra: tuple[str, ...] = (),
                  name: str = "libctc_pdec.so") -> tuple[Path, str]:
    """Compile :func:`source_text` with nvcc into ``out_dir/name``; returns its path and ptxas's report.  ``extra``:
    more nvcc flags, e.g. ``-DPDEC_NSLOT=4`` (ring slots) or ``-DPDEC_HINT=0`` (no L2 evict-first hint)."""
    from ctc.backends.tvm.cuda_toolchain import find_nvcc

    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc (CUDA toolkit) not found")
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / "ctc_pdec.cu"
    src.write_text(source_text())
    lib = out_dir / name
    gencode = f"-gencode=arch=compute_{arch[3:]},code={arch}"
    cmd = [nvcc, gencode, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "--cudart", "static",
           "-Xptxas", "-v", "-lineinfo", *extra, "-o", str(lib), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return lib, res.stderr


def ptxas_report(text: str) -> dict[str, dict[str, int]]:
    """Registers, spill bytes and stack frame per kernel from ``-Xptxas -v`` output."""
    out: dict[str, dict[str, int]] = {}
    name = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            name = m.group(1)
            out[name] = {}
            continue
        if name is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[name].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[name]["registers"] = int(m.group(1))
    return out


class DecodeArgs(ctypes.Structure):
    """The kernel's ``ctc_pdec::Args``: raw device pointers and sizes (field order as in the source)."""

    _fields_ = [(n, ctypes.c_void_p) for n in (
        "wqkv", "sqkv", "wo", "so", "wgu", "sgu", "wd", "sd", "attn_norm", "mlp_norm", "final_norm", "emb",
        "whead", "shead", "kcache", "vcache", "inv_freq", "token", "pos", "ws", "logits", "trace")] + [
        ("layers", ctypes.c_int), ("vocab", ctypes.c_int), ("max_len", ctypes.c_int), ("mode", ctypes.c_int),
        ("eps", ctypes.c_float), ("att_span", ctypes.c_int)]


# ---------------------------------------------------------------------------------------------- torch helpers
def rtn_int4(w: Any, group: int = 128) -> tuple[Any, Any]:
    """ctc's symmetric RTN int4 (:func:`ctc.ir.quant.quantize_weight` with bits 4) on any device: packed
    ``uint8 [N, K/2]`` and ``float32`` scales ``[N, K/group]`` (zero points are all 0)."""
    import torch

    n, k = w.shape
    wf = w.detach().to(torch.float32)
    wg = wf.reshape(n, k // group, group)
    scale = wg.abs().amax(dim=-1) / 7
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(wf / scale.repeat_interleave(group, dim=-1)), -8, 7).to(torch.int16)
    u = (q + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4), scale


def qkv_head_rows(heads: int = 32, kv_heads: int = 8, head_dim: int = 64) -> Any:
    """Row order of the kernel's q|k|v (weights and outputs): per kv head, its query heads' rows, its key's, its
    value's (``[kv_heads * (heads / kv_heads + 2) * head_dim]`` indices into the q, k, v row order)."""
    import torch

    g, nq = heads // kv_heads, heads * head_dim
    return torch.cat([torch.cat([torch.arange(hk * g * head_dim, (hk + 1) * g * head_dim),
                                 nq + hk * head_dim + torch.arange(head_dim),
                                 nq + kv_heads * head_dim + hk * head_dim + torch.arange(head_dim)])
                      for hk in range(kv_heads)])


def pack_qkv(wqkv: Any, sqkv: Any) -> tuple[Any, Any]:
    """W_qkv's rows (``[L, 3072, ...]``) in :func:`qkv_head_rows` order: phase A's 24-row tiles of one kv head."""
    idx = qkv_head_rows().to(wqkv.device)
    return wqkv[:, idx].contiguous(), sqkv[:, idx].contiguous()


def pack_o_down(wo: Any, so: Any, wd: Any, sd: Any) -> tuple[Any, Any, Any, Any]:
    """The kernel's layouts of W_o and W_down (from ctc's ``[L, N, K/2]`` codes, ``[L, N, K/128]`` scales): W_o
    ``[L, 8, 2048, 128]`` (kv head hk's 256 columns, two whole groups, per row) with scales ``[L, 8, 2048, 2]``, so
    that phase B's tile (kv head, 128-row slice) is contiguous; W_down ``[L, 128, 2048, 32]`` (64-channel slices of
    the K axis) with scales transposed ``[L, 64, 2048]`` (slice j reads group j // 2)."""
    n_l, h = wo.shape[0], wo.shape[1]
    wo_p = wo.reshape(n_l, h, 8, 128).permute(0, 2, 1, 3).contiguous()
    so_p = so.reshape(n_l, h, 8, 2).permute(0, 2, 1, 3).contiguous()
    wd_p = wd.reshape(n_l, h, 128, 32).permute(0, 2, 1, 3).contiguous()
    sd_p = sd.permute(0, 2, 1).contiguous()
    return wo_p, so_p, wd_p, sd_p


def dequant_int4(packed: Any, scale: Any, group: int = 128) -> Any:
    """``float32 [N, K]`` from :func:`rtn_int4`'s storage."""
    import torch

    lo = (packed & 0x0F).to(torch.float32) - 8
    hi = (packed >> 4).to(torch.float32) - 8
    q = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)
    return q * scale.repeat_interleave(group, dim=-1)


def _rms(x: Any, g: Any, eps: float) -> Any:
    import torch

    return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: Any, cos: Any, sin: Any) -> Any:
    import torch

    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], dim=-1) * sin


def reference_step(w: dict[str, Any], token: int, pos: int, kcache: Any, vcache: Any, cfg: dict[str, Any]
                   ) -> tuple[Any, dict[str, Any]]:
    """One decode step in float32 (Llama semantics, as Hugging Face computes them): float32 weights ``w``
    (``emb``, per layer ``qkv.l``/``o.l``/``gu.l``/``down.l``/``attn_norm.l``/``mlp_norm.l``, ``final_norm``,
    ``head``), caches ``[L, kv_heads, max_len, head_dim]`` read at positions ``< pos``.  Returns the logits
    and the last layer's intermediates (``qkv``, ``attn``, ``h``, ``x``)."""
    import torch

    hd, nq, nkv, eps = cfg["head_dim"], cfg["heads"], cfg["kv_heads"], cfg["eps"]
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    ang = (torch.tensor(float(pos)) * inv).to(w["emb"].device)
    cos, sin = torch.cat([ang, ang]).cos(), torch.cat([ang, ang]).sin()
    x = w["emb"][token].float()
    inter: dict[str, Any] = {}
    for layer in range(cfg["layers"]):
        h = _rms(x, w[f"attn_norm.{layer}"], eps)
        qkv = w[f"qkv.{layer}"] @ h
        q = _rope(qkv[: nq * hd].view(nq, hd), cos, sin)
        k = _rope(qkv[nq * hd:(nq + nkv) * hd].view(nkv, hd), cos, sin)
        v = qkv[(nq + nkv) * hd:].view(nkv, hd)
        keys = torch.cat([kcache[layer, :, :pos].float(), k[:, None]], dim=1)     # [kv, pos + 1, hd]
        vals = torch.cat([vcache[layer, :, :pos].float(), v[:, None]], dim=1)
        qg = q.view(nkv, nq // nkv, hd)
        p = torch.softmax(torch.einsum("grd,gpd->grp", qg, keys) / hd ** 0.5, dim=-1)
        attn = torch.einsum("grp,gpd->grd", p, vals).reshape(nq * hd)
        x = x + w[f"o.{layer}"] @ attn
        h2 = _rms(x, w[f"mlp_norm.{layer}"], eps)
        gu = w[f"gu.{layer}"] @ h2
        g, u = gu.chunk(2)
        hh = torch.nn.functional.silu(g) * u
        x = x + w[f"down.{layer}"] @ hh
        inter = {"qkv": qkv, "attn": attn, "h": hh, "x": x}
    logits = w["head"] @ _rms(x, w["final_norm"], eps)
    return logits, inter


class PersistentDecoder:
    """Drives the compiled kernel from torch CUDA tensors (the GPU machine: torch with CUDA, no TVM).

    ``weights``: ``wqkv [L, 3072, 1024]``, ``sqkv [L, 3072, 16]``, ``wo``/``so``, ``wgu [L, 2F, 1024]`` (gate rows
    then up rows), ``sgu``, ``wd [L, 2048, 4096]``, ``sd [L, 2048, 64]`` (uint8 / float32, :func:`rtn_int4`),
    ``attn_norm``/``mlp_norm [L, 2048]``, ``final_norm``, ``emb [V, 2048]`` (float16), ``whead``/``shead`` (the
    int4 LM head), ``inv_freq [32]`` (float32); W_qkv, W_o and W_down are repacked here (:func:`pack_qkv`,
    :func:`pack_o_down`).  Caches
    ``[L, kv_heads, max_len, 64]`` float16, updated in place at ``pos`` by every step.  Needs at least 128
    co-resident blocks (one per multiprocessor)."""

    FIELDS = ("wqkv", "sqkv", "wo", "so", "wgu", "sgu", "wd", "sd", "attn_norm", "mlp_norm", "final_norm", "emb",
              "whead", "shead", "kcache", "vcache", "inv_freq")

    def __init__(self, lib_path: str | Path, weights: dict[str, Any], kcache: Any, vcache: Any, eps: float = 1e-5):
        import torch

        self.lib = ctypes.CDLL(str(lib_path))
        self.lib.ctc_pdec_error.restype = ctypes.c_char_p
        grid, smem, threads = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        rc = self.lib.ctc_pdec_config(ctypes.byref(grid), ctypes.byref(smem), ctypes.byref(threads))
        if rc != 0:
            why = "fewer than 128 multiprocessors" if rc == -2 else self.lib.ctc_pdec_error().decode()
            raise RuntimeError(f"ctc_pdec_config: {rc} {why}")
        self.grid, self.smem, self.threads = grid.value, smem.value, threads.value
        if self.lib.ctc_pdec_ws_floats() != WS_FLOATS:
            raise RuntimeError("workspace size of the library and of this module differ")
        dev = kcache.device
        wo, so, wd, sd = pack_o_down(weights["wo"], weights["so"], weights["wd"], weights["sd"])
        wqkv, sqkv = pack_qkv(weights["wqkv"], weights["sqkv"])
        self.tensors = {**weights, "wqkv": wqkv, "sqkv": sqkv, "wo": wo, "so": so, "wd": wd, "sd": sd,
                        "kcache": kcache, "vcache": vcache}
        self.ws = torch.zeros(WS_FLOATS, dtype=torch.float32, device=dev)
        self.logits = torch.empty(weights["emb"].shape[0], dtype=torch.float32, device=dev)
        self.token = torch.zeros(1, dtype=torch.int32, device=dev)
        self.pos = torch.zeros(1, dtype=torch.int32, device=dev)
        self.args = DecodeArgs(**{n: self.tensors[n].data_ptr() for n in self.FIELDS},
                               token=self.token.data_ptr(), pos=self.pos.data_ptr(), ws=self.ws.data_ptr(),
                               logits=self.logits.data_ptr(), layers=weights["wqkv"].shape[0],
                               vocab=weights["emb"].shape[0], max_len=kcache.shape[2], mode=0, eps=eps)
        self.coop = 1
        self.trace: Any = None

    def enable_trace(self, on: bool = True) -> None:
        """Record globaltimer stamps (block start; each stage's begin, prologue end, end) into :attr:`trace`."""
        import torch

        if on and self.trace is None:
            self.trace = torch.zeros(self.grid, TRACE_STRIDE, dtype=torch.int64, device=self.ws.device)
        self.args.trace = self.trace.data_ptr() if on else None

    def set(self, token: int, pos: int) -> None:
        """The token and cache position of the next step (device scalars: a captured graph reads them)."""
        self.token.fill_(token)
        self.pos.fill_(pos)

    def step(self, mode: int = 0, layers: int | None = None) -> None:
        """One decode step on torch's current stream (``mode`` bits: 1 no grid barriers, 2 no arithmetic)."""
        import torch

        self.args.mode = mode
        if layers is not None:
            self.args.layers = layers
        rc = self.lib.ctc_pdec_launch(ctypes.byref(self.args), self.grid, self.coop,
                                      ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
        if rc != 0:
            raise RuntimeError(f"ctc_pdec_launch: {rc} {self.lib.ctc_pdec_error().decode()}")

    def barrier_bench(self, n: int) -> None:
        """``n`` grid barriers in one launch of the same shape (nothing else)."""
        import torch

        rc = self.lib.ctc_pdec_barrier_bench(ctypes.c_void_p(self.ws.data_ptr()), n, self.grid, self.coop,
                                             ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
        if rc != 0:
            raise RuntimeError(f"ctc_pdec_barrier_bench: {rc} {self.lib.ctc_pdec_error().decode()}")

    def aborted(self) -> int:
        """The abort flag (1: a ring wait, 2: a grid barrier, 3: a per-head counter timed out); clears the
        workspace when set."""
        import torch

        flag = int(self.ws[WS_CTL:WS_CTL + 4].view(torch.int32)[2].item())
        if flag:
            self.ws.zero_()
        return flag

    def intermediates(self) -> dict[str, Any]:
        """The last layer's q|k|v (f32, before RoPE), attention output, SwiGLU output (fp16) and residual (f32:
        version 2 L of the three rotating buffers)."""
        import torch

        ws, x0 = self.ws, 2048 * ((2 * self.args.layers) % 3)
        attn = 4 * 2048 + 3072 + 32 * CMAX * 66
        qkv = torch.empty(3072, dtype=torch.float32, device=ws.device)
        qkv[qkv_head_rows().to(ws.device)] = ws[4 * 2048:4 * 2048 + 3072]
        return {"x": ws[x0:x0 + 2048].clone(), "qkv": qkv,
                "attn": ws[attn:attn + 1024].view(torch.float16).float().clone(),
                "h": ws[attn + 1024:attn + 1024 + 4096].view(torch.float16).float().clone()}
