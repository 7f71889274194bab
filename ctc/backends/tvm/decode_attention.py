"""One-query (decode-step) attention on the CPU as one TIR kernel, over an fp32, int8 or int4 KV cache, with
the keys of each kv head split into chunks that run in parallel (flash-decoding).

Why: lowered op by op, a decode step's attention is four kernels per layer (scores, mask, softmax,
``p v``), each a fork/join of the thread pool for a few microseconds of work; and a kernel that is
parallel over (batch, kv head) only has 3 tasks for SmolLM2's 3 kv heads, so of 2 threads one runs
two tasks and the other one: the step waits for the slower thread (one third of the time wasted)
and is exposed to any stall of it.  Here one task handles one chunk of the keys of one kv head for
every query head that shares it (each key row is loaded, and for int8 converted, once):

1. scores ``q . k_j * scale`` (``* s_k,j`` for int8 rows) with the mask, into the task's work buffer;
   integer keys on AVX-512 (``key_lanes``) are scored 16 keys per vector: one ``vpgatherdd`` per
   4 (int4: 8) channels fetches those channels of 16 rows, so each channel is one FMA per query
   head for 16 keys and no score needs a horizontal sum (:func:`_key_lane_scores`); a chunk's last
   ``cnt % 16`` keys and fp32 caches are scored a row at a time (a 16-lane product per query head,
   then its horizontal sum);
2. the chunk's maximum ``m``, ``p_j = exp(s_j - m)`` (the vectorizable exponential of
   :mod:`.row_kernels`, exactly 0 below -87) and their sum ``l``;
3. ``acc = sum_j p_j v_j`` (``* s_v,j`` for int8 rows), unnormalized.

Then, serially (a few hundred values): per query head ``M = max_c m_c``, and
``out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c``.  A chunk that is entirely masked
(positions past the current one in a preallocated cache) gets weight ``e^(-huge) = 0``.

The number of chunks (:func:`key_splits`) makes the task count a multiple of the target's cores
(3 kv heads x 2 chunks = 6 tasks for 2 threads), with at least :data:`MIN_CHUNK` keys per chunk.
Numerics: fp32 throughout, the same exponential as the softmax kernels; sums in another order than
the op-by-op path (differences of a few ulp).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["AttendSpec", "MIN_CHUNK", "attend_func", "attend_supported", "emit_decode_attention", "key_lanes_supported",
           "key_splits"]

LANES = 16
MIN_CHUNK = 32  # fewest keys per parallel chunk: below, the combine costs more than the balance wins
NEG = "T.float32(-3.4028234663852886e38)"


def _i(v: int) -> str:
    return f"T.int64({int(v)})"


@dataclass(frozen=True)
class AttendSpec:
    """Static shape of one decode-step attention: ``q [b, hq, 1, d]`` against caches ``[b, hk, n, d]``."""

    b: int
    hq: int
    hk: int
    n: int  # cache length
    d: int
    group: int  # int8 caches: -1 (one scale per row) or a multiple of 16 dividing d; fp32: -1
    scale: float
    mask: str  # "none" | "bool" | "add"
    mb: int  # mask batch extent (1 or b)
    mh: int  # mask head extent (1 or hq)
    cache: str = "int8"  # "int8" | "int4" (two per byte, see ctc.ir.quant; both with per-row/group scales) | "float32"
    splits: int = 1  # key chunks per (batch, kv head), see key_splits
    key_lanes: bool = False  # int8 keys scored 16 keys per vector (AVX-512 gathers), see key_lanes_supported

    @property
    def groups(self) -> int:
        return 1 if self.group == -1 else self.d // self.group

    @property
    def chunk(self) -> int:
        return -(-self.n // self.splits)

    @property
    def tag(self) -> str:
        return (f"{self.cache}_{self.b}_{self.hq}_{self.hk}_{self.n}_{self.d}_{self.group}_{self.mask}{self.mb}"
                f"{self.mh}_s{self.splits}" + ("_kl" if self.key_lanes else ""))


def key_splits(tasks: int, n: int, threads: int) -> int:
    """Key chunks per (batch, kv head) so that ``tasks * splits`` tasks spread evenly over ``threads``
    (the smallest count with the least imbalance), each chunk at least :data:`MIN_CHUNK` keys."""
    if threads <= 1 or tasks <= 0:
        return 1
    best, best_cost = 1, math.inf
    for s in range(1, 2 * threads + 1):
        if s > 1 and n < s * MIN_CHUNK:
            break
        total = tasks * s
        cost = -(-total // threads) / (total / threads)  # the busiest thread's share over the even share
        if cost < best_cost - 1e-9:
            best, best_cost = s, cost
    return best


def attend_supported(spec: AttendSpec, bits: int | None) -> str | None:
    """None when :func:`attend_func` covers ``spec`` (``bits``: 8 or 4 for an integer cache, None for fp32); else
    why not."""
    if bits is not None and bits not in (4, 8):
        return f"{bits}-bit cache storage"
    if spec.d % LANES:
        return f"head dim {spec.d} is not a multiple of {LANES}"
    if spec.group != -1 and (spec.group % LANES or spec.cache == "float32"):
        return f"group_size {spec.group} is not a multiple of {LANES}"
    if spec.hq % spec.hk:
        return f"{spec.hq} query heads are not a multiple of {spec.hk} kv heads"
    return None


def key_lane_parts(r: int) -> int:
    """Partial accumulators per query head in :func:`_key_lane_scores` (independent FMA chains: ``r * parts``
    of them, at most 16 vector registers)."""
    return 4 if r <= 4 else 2 if r <= 8 else 1


def _key_lane_scores(spec: AttendSpec, score_of: Any) -> list[str]:
    """TVMScript lines scoring the whole blocks of 16 keys of a task's chunk with one key per vector lane.

    An int8 key row is ``d`` contiguous bytes, so the dot products of 16 keys run side by side: per
    4 channels one ``vpgatherdd`` loads the 4 bytes of each of the 16 rows (a 16 x 4 column of the
    block), each byte is sign-extended in place (two shifts) and converted, and every query head
    sharing the kv head adds ``q_d * k_d`` for the 16 keys with one FMA, with no horizontal sum.
    The row scales of 16 keys are one vector load and are applied once per score; with groups of
    channels, each group's partial sums are scaled by the 16 keys' scales of that group (a gather of
    16 floats) when the group ends.  Unrolled in the source (per byte and query head) so that the
    accumulators stay in registers."""
    r, d, c_, gn = spec.hq // spec.hk, spec.d, spec.chunk, spec.groups
    int4 = spec.cache == "int4"
    cpw = 8 if int4 else 4  # channels per gathered 32-bit word of a row
    ds = d // 2 if int4 else d  # bytes per row
    parts = key_lane_parts(r)
    lanes = _i(LANES)
    gather = ('T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.gather.dpi.512"), '
              'T.broadcast(T.int32(0), 16), T.address_of(kc[bi, hi, j, c * T.int64(4)]), '
              f'T.ramp(T.int32(0), T.int32({ds}), 16), T.int16(-1), T.int32(1), dtype="int32x16")')
    L = [f'            sa = T.decl_buffer(({_i(r * parts * LANES)},), "float32", scope="local")',
         f'            wv = T.decl_buffer(({lanes},), "int32", scope="local")',
         f'            kv = T.decl_buffer(({lanes},), "float32", scope="local")',
         f"            for jb in range(cnt // {lanes}):",
         f"                j = j0 + jb * {lanes}"]
    ind = "                "
    if gn > 1:  # per head: the running total of the scaled group sums
        L += [f'{ind}tot = T.decl_buffer(({_i(r * LANES)},), "float32", scope="local")',
              f'{ind}gs = T.decl_buffer(({lanes},), "float32", scope="local")']
        for ri in range(r):
            L += [f"{ind}for l in T.vectorized({lanes}):", f"{ind}    tot[{_i(ri * LANES)} + l] = T.float32(0)"]
        L.append(f"{ind}for g in range({_i(gn)}):")
        ind += "    "
    for a in range(r * parts):
        L += [f"{ind}for l in T.vectorized({lanes}):", f"{ind}    sa[{_i(a * LANES)} + l] = T.float32(0)"]
    words = d // cpw // gn
    cexpr = f"g * {_i(words)} + cq" if gn > 1 else "cq"
    L += [f"{ind}for cq in range({_i(words)}):",
          f"{ind}    c = {cexpr}",
          f"{ind}    wv[T.ramp(T.int64(0), T.int64(1), 16)] = {gather}"]
    for e in range(cpw):
        if int4:  # nibble e is channel 8c + e (stored + 8); qs holds the even channels, then the odd ones
            code = f"T.bitwise_and(T.shift_right(wv[l], T.int32({4 * e})), T.int32(15)) - T.int32(8)"
            pos = f"c * T.int64(4) + {_i(e // 2 + (ds if e % 2 else 0))}"
        else:  # byte e, sign-extended in its lane
            code = f"T.shift_right(T.shift_left(wv[l], T.int32({24 - 8 * e})), T.int32(24))"
            pos = f"c * T.int64(4) + {_i(e)}"
        L += [f"{ind}    for l in T.vectorized({lanes}):", f'{ind}        kv[l] = T.Cast("float32", {code})']
        for ri in range(r):
            a = _i((ri * parts + e % parts) * LANES)
            L += [f"{ind}    for l in T.vectorized({lanes}):",
                  f"{ind}        sa[{a} + l] = sa[{a} + l] + qs[{_i(ri * d)} + {pos}] * kv[l]"]
    dots = [" + ".join(f"sa[{_i((ri * parts + p) * LANES)} + l]" for p in range(parts)) for ri in range(r)]
    if gn > 1:
        L += [f"{ind}for l in T.vectorized({lanes}):",
              f"{ind}    gs[l] = ks[bi, hi, j + l, g]"]
        for ri in range(r):
            L += [f"{ind}for l in T.vectorized({lanes}):",
                  f"{ind}    tot[{_i(ri * LANES)} + l] = tot[{_i(ri * LANES)} + l] + ({dots[ri]}) * gs[l]"]
        dots = [f"tot[{_i(ri * LANES)} + l]" for ri in range(r)]
    for ri in range(r):
        L += [f"                for l in T.vectorized({lanes}):",
              f"                    sc[{_i(ri * c_)} + jb * {lanes} + l] = "
              + score_of(f"({dots[ri]})", "j + l", _i(ri))]
    return L


@functools.lru_cache(maxsize=64)
def attend_func(spec: AttendSpec) -> Any:  # noqa: C901 - one kernel, written out in order
    """``(q [b, hq, 1, d], kc[, ks], vc[, vs][, mask [mb, mh, 1, n]], out [b, hq, 1, d])``."""
    import tvm
    from ctc.backends.tvm.row_kernels import fast_exp_expr
    from tvm.script import tirx as T

    b, hq, hk, n, d, s_ = spec.b, spec.hq, spec.hk, spec.n, spec.d, spec.splits
    r, c_ = hq // hk, spec.chunk
    quant = spec.cache != "float32"
    int4 = spec.cache == "int4"  # rows of d / 2 bytes; the task works in channel order 0, 2, ..., 1, 3, ...
    ds = d // 2 if int4 else d
    cdt = {"int4": "uint8"}.get(spec.cache, spec.cache)
    gn = spec.groups
    dg = d // gn
    chunks = d // LANES
    tasks = b * hk * s_
    params = [f'q: T.Buffer(({_i(b)}, {_i(hq)}, T.int64(1), {_i(d)}), "float32")',
              f'kc: T.Buffer(({_i(b)}, {_i(hk)}, {_i(n)}, {_i(ds)}), "{cdt}")']
    if quant:
        params.append(f'ks: T.Buffer(({_i(b)}, {_i(hk)}, {_i(n)}, {_i(gn)}), "float32")')
    params.append(f'vc: T.Buffer(({_i(b)}, {_i(hk)}, {_i(n)}, {_i(ds)}), "{cdt}")')
    if quant:
        params.append(f'vs: T.Buffer(({_i(b)}, {_i(hk)}, {_i(n)}, {_i(gn)}), "float32")')
    if spec.mask != "none":
        params.append(f'mask: T.Buffer(({_i(spec.mb)}, {_i(spec.mh)}, T.int64(1), {_i(n)}), '
                      f'"{"bool" if spec.mask == "bool" else "float32"}")')
    params.append(f'out: T.Buffer(({_i(b)}, {_i(hq)}, T.int64(1), {_i(d)}), "float32")')

    def load_row(buf: str, sbuf: str) -> list[str]:
        """Lines putting cache row ``j`` into ``kf`` as f32 (int4: even channels, then odd ones).  Integer rows
        with one scale are left unscaled: keys are scaled after the dot product (one multiply per score),
        values through the row's weight (one multiply per query head); grouped scales apply per element."""
        ind = " " * 16
        if not quant:
            return [f"{ind}for l in T.vectorized({_i(d)}):", f"{ind}    kf[l] = {buf}[bi, hi, j, l]"]

        def scaled(v: str, ch: str) -> str:
            return f"{v} * {sbuf}[bi, hi, j, ({ch}) // {_i(dg)}]" if gn > 1 else v

        if not int4:
            return [f"{ind}for l in T.vectorized({_i(d)}):",
                    f"{ind}    kf[l] = " + scaled(f'T.Cast("float32", {buf}[bi, hi, j, l])', "l")]
        lo = f'T.Cast("float32", T.Cast("int32", T.bitwise_and({buf}[bi, hi, j, l], T.uint8(15))) - T.int32(8))'
        hi = f'T.Cast("float32", T.Cast("int32", T.shift_right({buf}[bi, hi, j, l], T.uint8(4))) - T.int32(8))'
        return [f"{ind}for l in T.vectorized({_i(ds)}):",
                f"{ind}    kf[l] = " + scaled(lo, "l * T.int64(2)"),
                f"{ind}    kf[{_i(ds)} + l] = " + scaled(hi, "l * T.int64(2) + T.int64(1)")]

    weight = f"sc[ri * {_i(c_)} + jj]" + (" * vs[bi, hi, j, T.int64(0)]" if quant and gn == 1 else "")

    def score_of(dot: str, j: str, ri: str) -> str:
        """The logit of key ``j`` for query head ``ri`` from its dot product (row scale, mask)."""
        sc_ = f"{dot} * ks[bi, hi, {j}, T.int64(0)]" if quant and gn == 1 else dot
        mb = "bi" if spec.mb > 1 else "T.int64(0)"
        mh = f"hi * {_i(r)} + {ri}" if spec.mh > 1 else "T.int64(0)"
        if spec.mask == "bool":
            return f"T.Select(mask[{mb}, {mh}, T.int64(0), {j}], {sc_}, {NEG})"
        if spec.mask == "add":
            return f"{sc_} + mask[{mb}, {mh}, T.int64(0), {j}]"
        return sc_

    L = ["@T.prim_func(private=True, s_tir=True)",
         f"def kv_attend({', '.join(params)}):",
         '    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})',
         '    with T.sblock("root"):',
         f'        pm = T.decl_buffer(({_i(tasks * r)},), "float32")',
         f'        pl = T.decl_buffer(({_i(tasks * r)},), "float32")',
         f'        pa = T.decl_buffer(({_i(tasks * r * d)},), "float32")',
         f"        for t in T.parallel({_i(tasks)}):",
         f'            sc = T.decl_buffer(({_i(r * c_)},), "float32")',
         f'            qs = T.decl_buffer(({_i(r * d)},), "float32", scope="local")',
         f'            acc = T.decl_buffer(({_i(r * d)},), "float32", scope="local")',
         f'            part = T.decl_buffer(({_i(LANES)},), "float32", scope="local")',
         f'            kf = T.decl_buffer(({_i(d)},), "float32", scope="local")',
         f'            st = T.decl_buffer(({_i(2 * r + 1)},), "float32", scope="local")',
         f"            bi = t // {_i(hk * s_)}",
         f"            hi = t // {_i(s_)} % {_i(hk)}",
         f"            j0 = t % {_i(s_)} * {_i(c_)}",
         f"            cnt = T.max(T.min({_i(c_)}, {_i(n)} - j0), T.int64(0))",
         # the logit scale folded into q once (int4: in the rows' channel order)
         f"            for ri in range({_i(r)}):",
         *([f"                for l in T.vectorized({_i(ds)}):",
            f"                    qs[ri * {_i(d)} + l] = q[bi, hi * {_i(r)} + ri, T.int64(0), l * T.int64(2)] * "
            f"T.float32({spec.scale!r})",
            f"                    qs[ri * {_i(d)} + {_i(ds)} + l] = q[bi, hi * {_i(r)} + ri, T.int64(0), "
            f"l * T.int64(2) + T.int64(1)] * T.float32({spec.scale!r})"] if int4 else
           [f"                for l in T.vectorized({_i(d)}):",
            f"                    qs[ri * {_i(d)} + l] = q[bi, hi * {_i(r)} + ri, T.int64(0), l] * "
            f"T.float32({spec.scale!r})"]),
         *(_key_lane_scores(spec, score_of) if spec.key_lanes else []),
         f"            for jj in range({'cnt // ' + _i(LANES) + ' * ' + _i(LANES) if spec.key_lanes else '0'}, cnt):",
         "                j = j0 + jj",
         *load_row("kc", "ks"),
         f"                for ri in range({_i(r)}):",
         f"                    for l in T.vectorized({_i(LANES)}):",
         "                        part[l] = T.float32(0)",
         f"                    for c in range({_i(chunks)}):",
         f"                        for l in T.vectorized({_i(LANES)}):",
         f"                            part[l] = part[l] + qs[ri * {_i(d)} + c * {_i(LANES)} + l] * "
         f"kf[c * {_i(LANES)} + l]",
         "                    st[0] = T.float32(0)",
         f"                    for l in range({_i(LANES)}):",
         "                        st[0] = st[0] + part[l]"]
    L += [f"                    sc[ri * {_i(c_)} + jj] = {score_of('st[0]', 'j', 'ri')}",
          # per query head: the chunk's max, the vectorizable exp and its sum
          f"            for ri in range({_i(r)}):",
          # (16 running maxima, then theirs: a serial max over the chunk is one 4-cycle chain per key)
          f"                for l in T.vectorized({_i(LANES)}):",
          f"                    part[l] = {NEG}",
          f"                for jb in range(cnt // {_i(LANES)}):",
          f"                    for l in T.vectorized({_i(LANES)}):",
          f"                        part[l] = T.max(part[l], sc[ri * {_i(c_)} + jb * {_i(LANES)} + l])",
          f"                st[ri * T.int64(2)] = {NEG}",
          f"                for l in range({_i(LANES)}):",
          "                    st[ri * T.int64(2)] = T.max(st[ri * T.int64(2)], part[l])",
          f"                for jj in range(cnt // {_i(LANES)} * {_i(LANES)}, cnt):",
          f"                    st[ri * T.int64(2)] = T.max(st[ri * T.int64(2)], sc[ri * {_i(c_)} + jj])",
          f"                for l in T.vectorized({_i(LANES)}):",
          "                    part[l] = T.float32(0)",
          f"                for jb in range(cnt // {_i(LANES)}):",
          f"                    for l in T.vectorized({_i(LANES)}):",
          f"                        sc[ri * {_i(c_)} + jb * {_i(LANES)} + l] = "
          f"EXP(sc[ri * {_i(c_)} + jb * {_i(LANES)} + l] - st[ri * T.int64(2)])",
          f"                        part[l] = part[l] + sc[ri * {_i(c_)} + jb * {_i(LANES)} + l]",
          "                st[ri * T.int64(2) + T.int64(1)] = T.float32(0)",
          f"                for l in range({_i(LANES)}):",
          "                    st[ri * T.int64(2) + T.int64(1)] = st[ri * T.int64(2) + T.int64(1)] + part[l]",
          f"                for jj in range(cnt // {_i(LANES)} * {_i(LANES)}, cnt):",
          f"                    sc[ri * {_i(c_)} + jj] = EXP(sc[ri * {_i(c_)} + jj] - st[ri * T.int64(2)])",
          "                    st[ri * T.int64(2) + T.int64(1)] = st[ri * T.int64(2) + T.int64(1)] + "
          f"sc[ri * {_i(c_)} + jj]",
          f"                for l in T.vectorized({_i(d)}):",
          f"                    acc[ri * {_i(d)} + l] = T.float32(0)",
          # the weighted value rows (unnormalized)
          "            for jj in range(cnt):",
          "                j = j0 + jj",
          *load_row("vc", "vs"),
          f"                for ri in range({_i(r)}):",
          f"                    for l in T.vectorized({_i(d)}):",
          f"                        acc[ri * {_i(d)} + l] = acc[ri * {_i(d)} + l] + {weight} * kf[l]",
          f"            for ri in range({_i(r)}):",
          f"                pm[t * {_i(r)} + ri] = st[ri * T.int64(2)]",
          f"                pl[t * {_i(r)} + ri] = st[ri * T.int64(2) + T.int64(1)]",
          *([f"                for l in T.vectorized({_i(ds)}):",
             f"                    pa[(t * {_i(r)} + ri) * {_i(d)} + l * T.int64(2)] = acc[ri * {_i(d)} + l]",
             f"                    pa[(t * {_i(r)} + ri) * {_i(d)} + l * T.int64(2) + T.int64(1)] = "
             f"acc[ri * {_i(d)} + {_i(ds)} + l]"] if int4 else
            [f"                for l in T.vectorized({_i(d)}):",
             f"                    pa[(t * {_i(r)} + ri) * {_i(d)} + l] = acc[ri * {_i(d)} + l]"]),
          # combine the chunks of each query head (serial: b * hq * splits * d values)
          f"        for bh in range({_i(b * hq)}):",
          f'            od = T.decl_buffer(({_i(d)},), "float32", scope="local")',
          '            mx = T.decl_buffer((T.int64(3),), "float32", scope="local")',
          f"            base = (bh // {_i(hq)} * {_i(hk)} + bh % {_i(hq)} // {_i(r)}) * {_i(s_)}",
          f"            ri = bh % {_i(hq)} % {_i(r)}",
          f"            mx[0] = {NEG}",
          f"            for c in range({_i(s_)}):",
          f"                mx[0] = T.max(mx[0], pm[(base + c) * {_i(r)} + ri])",
          "            mx[1] = T.float32(0)",
          f"            for l in T.vectorized({_i(d)}):",
          "                od[l] = T.float32(0)",
          f"            for c in range({_i(s_)}):",
          f"                mx[2] = EXP(pm[(base + c) * {_i(r)} + ri] - mx[0])",
          f"                mx[1] = mx[1] + mx[2] * pl[(base + c) * {_i(r)} + ri]",
          f"                for l in T.vectorized({_i(d)}):",
          f"                    od[l] = od[l] + mx[2] * pa[((base + c) * {_i(r)} + ri) * {_i(d)} + l]",
          "            mx[1] = T.float32(1) / mx[1]",
          f"            for l in T.vectorized({_i(d)}):",
          f"                out[bh // {_i(hq)}, bh % {_i(hq)}, T.int64(0), l] = od[l] * mx[1]"]
    return tvm.script.from_source("\n".join(L) + "\n", extra_vars={"T": T, "EXP": fast_exp_expr})


def key_lanes_supported(target: Any, cache: str, group: int) -> bool:
    """Whether :func:`_key_lane_scores` applies: an int8 cache (one scale per row or per group of channels) on
    an AVX-512 target (``vpgatherdd``); other targets keep the row-at-a-time scores."""
    import tvm

    if cache not in ("int8", "int4") or target is None or target.kind.name != "llvm":
        return False
    try:
        return bool(tvm.target.codegen.target_has_features(["avx512f"], target))
    except Exception:  # noqa: BLE001 - a target whose features LLVM cannot report
        return False


def target_threads(target: Any) -> int:
    """The cores a CPU target was built for (its ``num-cores``; 1 when absent)."""
    try:
        return max(int(target.attrs["num-cores"]), 1)
    except Exception:  # noqa: BLE001 - a target without the attribute
        return 1


def mask_operand(ctx: Any, mask_v: Any, b: int, hq: int, n: int) -> tuple[str, int, int, Any] | str:
    """``(kind, mb, mh, relax value [mb, mh, 1, n])`` for an attention mask the kernel reads, or why not."""
    from ctc.backends.tvm.lower import _static_int

    relax = ctx.relax
    full = [1] * (4 - mask_v.type.rank) + [_static_int(ctx, x) for x in mask_v.type.shape]
    if None in full or full[2] != 1 or full[3] != n or full[0] not in (1, b) or full[1] not in (1, hq):
        return f"mask {mask_v.type}"
    mb, mh = int(full[0]), int(full[1])  # type: ignore[arg-type]
    kind = "bool" if mask_v.type.dtype == "bool" else "add"
    m = ctx.val(mask_v)
    if kind == "add" and mask_v.type.dtype != "f32":
        m = ctx.emit(relax.op.astype(m, "float32"))
    return kind, mb, mh, ctx.emit(relax.op.reshape(m, [mb, mh, 1, n]))


def emit_decode_attention(ctx: Any, spec: AttendSpec, args: list[Any]) -> Any:
    """``call_tir`` of :func:`attend_func` on ``args`` (q, the caches and scales, the mask if any)."""
    from ctc.backends.tvm.int_kernels import add_prim_func

    gv = add_prim_func(ctx.bb, attend_func(spec), f"kv_attend_{spec.tag}")
    return ctx.relax.call_tir(gv, args, ctx.relax.TensorType([spec.b, spec.hq, 1, spec.d], "float32"))
