"""CPU kernels (TVM TIR) for ``sparse_attention``: low-bit scoring with VNNI, per-row selection and
exact attention over the kept keys only.

Why: the op's reference computes every logit exactly and then throws most of them away; a
kernel that pays must never compute a full-precision logit, a softmax term or a ``p v``
product for a dropped key.  Per call (all batches and heads) two kinds of PrimFuncs run:

1. ``quant_k`` (one per distinct round bit width): keys ``[B, Hkv, Lk, D]`` to symmetric
   per-key integers in the VNNI operand layout ``[B, Hkv, Lk/16, D/4, 16, 4]`` (int8), with the
   per-key scale, integer sum (for the unsigned-query correction), ``|k|`` and ``|k - k̂|``.
2. ``attend``: parallel over (batch, head, tile of ``MT`` query rows).  Per tile and round,
   the tile's query rows are quantized the same way (offset to unsigned bytes), and
   ``vpdpbusd`` (u8 x s8 -> i32, 64 MACs per instruction) scores them against every key
   the tile may see (a causal tile stops at its last row: the upper triangle is never
   touched).  A bit width several rounds need (the 8-bit guard of a 4-bit round, then the
   8-bit round itself) is scored once per tile: later rounds read the kept scores back with
   their dropped keys masked.  Each row then selects: the ``m``-th largest score by a bracketed
   search over order-preserving integer keys of the fp32 scores (vectorized counting passes,
   first guess the previous row's threshold, then interpolation; exits as soon as exactly
   ``m`` keys pass), or Energon's mean/max threshold, plus the keys that may still be the
   row's exact top-1 (score error bounds, see the op).  The survivors are
   compacted into an index list, and the row's exact fp32 scores, softmax and ``p v`` are
   computed over that list only.

The semantics are the op's reference (``ctc.ir.ops.compress_attention.sparse_attention``),
with two differences of rounding only: fp32 sums are taken in another order, and the exp is
the vectorizable polynomial of :func:`ctc.backends.tvm.row_kernels.fast_exp_expr` when
``fast_math``.  A key whose approximate score sits within rounding of a selection boundary may
therefore be kept by one and dropped by the other (tests measure how rarely).

On a CPU without AVX512-VNNI the same loop nest runs plain int32 multiply-adds.  On CPUs
the bit width of a round does not change its speed (2..8-bit values all occupy int8 lanes):
a first round at 2 or 4 bits is Energon's method, not a speed-up here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MaskSpec", "SparseSpec", "build_sparse_attention", "emit_sparse_attention", "plan_sparse_attention",
           "run_sparse_attention"]

MT_DEFAULT = 8  # query rows per tile: 8 accumulators of 16 keys each live in zmm registers
LANES = 16
INT_MIN = -(2**31)
SLACK = 1e-5  # keep equal to ctc.ir.ops.compress_attention.BOUND_SLACK
GUARD_BITS = 8  # keep equal to ctc.ir.ops.compress_attention.GUARD_BITS


@dataclass(frozen=True)
class MaskSpec:
    """A mask operand as the kernel sees it: rank 4 ``[MB, MH, MQ, MK]`` after left-padding with
    1s; each ``bcast_*`` says that dim is 1 (broadcast)."""

    dtype: str  # "bool" | "float32"
    bcast_batch: bool
    bcast_heads: bool
    bcast_rows: bool
    bcast_keys: bool


@dataclass(frozen=True)
class SparseSpec:
    """Everything static about one ``sparse_attention`` call (the kernel is generated for it)."""

    heads: int
    kv_heads: int
    dim: int
    vdim: int
    round_bits: tuple[int, ...]
    select: str
    params: tuple[float, ...]  # keep ratios (topk) or alphas (threshold), one per round
    min_keep: int
    dense_heads: tuple[int, ...]
    causal: bool
    scale: float
    mask: MaskSpec | None
    vnni: bool
    fast_math: bool = True
    rows_tile: int = MT_DEFAULT

    def validate(self) -> None:
        """Raise ``ValueError`` naming what the kernel cannot handle."""
        if self.dim % 4:
            raise ValueError(f"sparse attention kernel: head dim {self.dim} must be a multiple of 4")
        if self.heads % self.kv_heads:
            raise ValueError(f"sparse attention kernel: {self.heads} heads not a multiple of {self.kv_heads}")
        if len(self.params) != len(self.round_bits):
            raise ValueError("sparse attention kernel: one selection parameter per round")
        if any(not 2 <= b <= 8 for b in self.round_bits):
            raise ValueError(f"sparse attention kernel: round bits {self.round_bits} must lie in 2..8")
        if self.select not in ("topk", "threshold"):
            raise ValueError(f"sparse attention kernel: select {self.select!r}")

    @property
    def bits_set(self) -> tuple[int, ...]:
        """Distinct bit widths of the key quantizations: the rounds', then the 8-bit guard
        (which decides the keys that may be a row's exact top-1; see the op)."""
        return tuple(dict.fromkeys([*self.round_bits, GUARD_BITS])) if self.round_bits else ()

    @property
    def tag(self) -> str:
        h = abs(hash(self)) % (1 << 32)
        return f"h{self.heads}_{self.kv_heads}_d{self.dim}_{self.vdim}_r{'_'.join(map(str, self.round_bits))}_{h:08x}"


def _i(v: int) -> str:
    return f"T.int64({int(v)})"


def _f(v: float) -> str:
    if math.isinf(v):
        return "T.float32(-3.4028234663852886e38)" if v < 0 else "T.float32(3.4028234663852886e38)"
    return f"T.float32({float(v)!r})"


def _roundeven(x: str) -> str:
    return f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.roundeven"), {x}, dtype="float32")'




NINF = 'T.reinterpret("float32", T.int32(-8388608))'  # -inf
PINF = 'T.reinterpret("float32", T.int32(2139095040))'  # +inf
LP = "((LK + T.int64(15)) // T.int64(16) * T.int64(16))"  # key length padded to whole 16-key tiles



def _quant_k_source(spec: SparseSpec, bits: int) -> str:
    """TVMScript: keys to the VNNI layout at ``bits`` (see the module doc), one key per step.

    (Index expressions are spelled out in full throughout: a TVMScript assignment becomes a
    local buffer, which breaks inside vectorized loops.)"""
    D, D4, HK = spec.dim, spec.dim // 4, spec.kv_heads
    h = (1 << (bits - 1)) - 1
    b, hk, j = f"(t // ({_i(HK)} * {LP}))", f"(t // {LP} % {_i(HK)})", f"(t % {LP})"
    kv = f"k[{b}, {hk}, {j}, d]"
    kp = f"kp[{b}, {hk}, {j} // T.int64(16), d // T.int64(4), {j} % T.int64(16), d % T.int64(4)]"
    r = f"T.max(T.min({_roundeven(f'{kv} / st[0]')}, T.float32({h})), T.float32({-h}))"
    L = [
        "@T.prim_func(s_tir=True)",
        "def quant_k(var_k: T.handle, var_kp: T.handle, var_ks: T.handle, var_ksum: T.handle, var_kn: T.handle,"
        " var_ke: T.handle):",
        '    T.func_attr({"tirx.noalias": True, "op_pattern": 8})',  # 8: opaque, never fused
        "    B = T.int64()",
        "    LK = T.int64()",
        f'    k = T.match_buffer(var_k, (B, {_i(HK)}, LK, {_i(D)}), "float32")',
        f'    kp = T.match_buffer(var_kp, (B, {_i(HK)}, (LK + T.int64(15)) // T.int64(16), {_i(D4)}, T.int64(16),'
        ' T.int64(4)), "int8")',
        f'    ks = T.match_buffer(var_ks, (B, {_i(HK)}, {LP}), "float32")',
        f'    ksum = T.match_buffer(var_ksum, (B, {_i(HK)}, {LP}), "int32")',
        f'    kn = T.match_buffer(var_kn, (B, {_i(HK)}, {LP}), "float32")',
        f'    ke = T.match_buffer(var_ke, (B, {_i(HK)}, {LP}), "float32")',
        '    with T.sblock("root"):',
        f"        for t in T.parallel(B * {_i(HK)} * {LP}):",
        '            st = T.decl_buffer((T.int64(4),), "float32", scope="local")',
        '            si = T.decl_buffer((T.int64(1),), "int32", scope="local")',
        f"            if {j} < LK:",
        "                st[0] = T.float32(0)",
        f"                for d in range({_i(D)}):",
        f"                    st[0] = T.max(st[0], T.fabs({kv}))",
        f"                st[0] = st[0] / T.float32({float(h)!r})",
        "                if st[0] <= T.float32(0):",
        "                    st[0] = T.float32(1)",
        "                st[1] = T.float32(0)",
        "                st[2] = T.float32(0)",
        "                si[0] = 0",
        f"                for d in range({_i(D)}):",
        f"                    st[3] = {r}",
        f'                    {kp} = T.Cast("int8", st[3])',
        '                    si[0] = si[0] + T.Cast("int32", st[3])',
        f"                    st[1] = st[1] + {kv} * {kv}",
        f"                    st[2] = st[2] + ({kv} - st[3] * st[0]) * ({kv} - st[3] * st[0])",
        f"                ks[{b}, {hk}, {j}] = st[0]",
        f"                ksum[{b}, {hk}, {j}] = si[0]",
        f"                kn[{b}, {hk}, {j}] = T.sqrt(st[1])",
        f"                ke[{b}, {hk}, {j}] = T.sqrt(st[2])",
        "            else:",
        f"                for d in range({_i(D)}):",
        f"                    {kp} = T.int8(0)",
        f"                ks[{b}, {hk}, {j}] = T.float32(1)",
        f"                ksum[{b}, {hk}, {j}] = 0",
        f"                kn[{b}, {hk}, {j}] = T.float32(0)",
        f"                ke[{b}, {hk}, {j}] = T.float32(0)",
    ]
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- the attention kernel
class _Src:
    """Indented TVMScript lines; ``with src.block(head):`` indents what follows ``head``."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.ind = 0

    def __call__(self, *lines: str) -> None:
        for ln in lines:
            self.lines.append("    " * self.ind + ln)

    def block(self, head: str) -> _Block:
        return _Block(self, head)


class _Block:
    def __init__(self, src: _Src, head: str):
        self.src, self.head = src, head

    def __enter__(self) -> None:
        self.src(self.head)
        self.src.ind += 1

    def __exit__(self, *a: Any) -> None:
        self.src.ind -= 1


class _Names:
    """The kernel's index names.  ``b, h, hk, i0`` are bound once per tile: the divisions by the
    runtime tile count that compute them would otherwise run in every inner iteration (LLVM does
    not hoist a division it cannot prove safe).  Names are never bound inside a vectorized loop
    (a TVMScript assignment becomes a local buffer, which breaks there)."""

    def __init__(self, spec: SparseSpec):
        H, MT, G = spec.heads, spec.rows_tile, spec.heads // spec.kv_heads
        self.nqt = f"((LQ + {_i(MT - 1)}) // {_i(MT)})"
        self.binds = [f"b = t // ({_i(H)} * {self.nqt})", f"h = t // {self.nqt} % {_i(H)}",
                      f"hk = t // {self.nqt} % {_i(H)} // {_i(G)}", f"i0 = t % {self.nqt} * {_i(MT)}"]
        self.b, self.h, self.hk, self.i0 = "b", "h", "hk", "i0"
        self.i = "(i0 + mm)"
        ncol = f"T.min(LK, i0 + {_i(MT)})" if spec.causal else "LK"
        self.njt = f"(({ncol} + T.int64(15)) // T.int64(16))"
        self.nc = "T.min(LK, i0 + mm + T.int64(1))" if spec.causal else "LK"  # keys row mm may see


def _mask_at(spec: SparseSpec, n: _Names, i: str, j: str) -> str:
    m = spec.mask
    assert m is not None
    z = "T.int64(0)"
    return (f"mask[{z if m.bcast_batch else n.b}, {z if m.bcast_heads else n.h}, {z if m.bcast_rows else i}, "
            f"{z if m.bcast_keys else j}]")


def _allowed(spec: SparseSpec, n: _Names, i: str, j: str) -> str:
    """TIR bool: key j allowed for query row i (``j < LK`` is the caller's)."""
    conds = []
    if spec.causal:
        conds.append(f"{j} <= {i}")
    if spec.mask is not None:
        mi = _mask_at(spec, n, i, j)
        conds.append(mi if spec.mask.dtype == "bool" else f"{mi} > {NINF}")
    return " and ".join(conds) if conds else "True"


def _add(spec: SparseSpec, n: _Names, i: str, j: str) -> str | None:
    """The additive float mask at (i, j), or None."""
    if spec.mask is None or spec.mask.dtype == "bool":
        return None
    return _mask_at(spec, n, i, j)


def _okey(x: str) -> str:
    """Order-preserving int32 key of an fp32 value (larger float -> larger key)."""
    r = f'T.reinterpret("int32", {x})'
    return f"T.Select({r} >= 0, {r}, T.bitwise_xor({r}, T.int32(2147483647)))"


def _attend_source(spec: SparseSpec) -> str:
    """TVMScript of the fused score / select / exact-attention kernel (see the module doc)."""
    D, DV, H, HK, MT = spec.dim, spec.vdim, spec.heads, spec.kv_heads, spec.rows_tile
    n = _Names(spec)
    params = ["var_q: T.handle", "var_k: T.handle", "var_v: T.handle"]
    if spec.mask is not None:
        params.append("var_mask: T.handle")
    for k in range(len(spec.bits_set)):
        params += [f"var_kp{k}: T.handle", f"var_ks{k}: T.handle", f"var_ksum{k}: T.handle", f"var_ke{k}: T.handle"]
    if spec.round_bits:
        params.append("var_kn: T.handle")
    params.append("var_o: T.handle")
    s = _Src()
    s("@T.prim_func(s_tir=True)", f"def attend({', '.join(params)}):")
    s.ind += 1
    s('T.func_attr({"tirx.noalias": True, "op_pattern": 8})',  # 8: opaque, never fused with neighbours
      "B = T.int64()", "LQ = T.int64()", "LK = T.int64()")
    s(f'q = T.match_buffer(var_q, (B, {_i(H)}, LQ, {_i(D)}), "float32")',
      f'k = T.match_buffer(var_k, (B, {_i(HK)}, LK, {_i(D)}), "float32")',
      f'v = T.match_buffer(var_v, (B, {_i(HK)}, LK, {_i(DV)}), "float32")')
    if spec.mask is not None:
        m = spec.mask
        shape = ", ".join(["T.int64(1)" if m.bcast_batch else "B", "T.int64(1)" if m.bcast_heads else _i(H),
                           "T.int64(1)" if m.bcast_rows else "LQ", "T.int64(1)" if m.bcast_keys else "LK"])
        s(f'mask = T.match_buffer(var_mask, ({shape}), "{m.dtype}")')
    for k in range(len(spec.bits_set)):
        s(f'kp{k} = T.match_buffer(var_kp{k}, (B, {_i(HK)}, (LK + T.int64(15)) // T.int64(16), {_i(D // 4)}, '
          'T.int64(16), T.int64(4)), "int8")',
          f'ks{k} = T.match_buffer(var_ks{k}, (B, {_i(HK)}, {LP}), "float32")',
          f'ksum{k} = T.match_buffer(var_ksum{k}, (B, {_i(HK)}, {LP}), "int32")',
          f'ke{k} = T.match_buffer(var_ke{k}, (B, {_i(HK)}, {LP}), "float32")')
    if spec.round_bits:
        s(f'kn = T.match_buffer(var_kn, (B, {_i(HK)}, {LP}), "float32")')
    s(f'o = T.match_buffer(var_o, (B, {_i(H)}, LQ, {_i(DV)}), "float32")')
    with s.block('with T.sblock("root"):'):
        with s.block(f"for t in T.parallel(B * {_i(H)} * {n.nqt}):"):
            s(*n.binds)
            # scratch: the tile's scores and alive flags, one row's int keys / kept indices / weights
            s(f'sbuf = T.decl_buffer(({LP} * {_i(MT)},), "float32")',
              f'alive = T.decl_buffer(({LP} * {_i(MT)},), "int8")',
              f'prot = T.decl_buffer(({LP} * {_i(MT)},), "int8")',
              f'idx = T.decl_buffer(({LP},), "int32")',
              f'ex = T.decl_buffer(({LP},), "float32")',
              f'qu = T.decl_buffer(({_i(MT * D)},), "uint8", scope="local")',
              f'qrow = T.decl_buffer(({_i(MT * 4)},), "float32", scope="local")',  # qs, qa, qc per row
              f'acc = T.decl_buffer(({_i(MT * 16)},), "int32", scope="local")',
              'fs = T.decl_buffer((T.int64(12),), "float32", scope="local")',
              'ist = T.decl_buffer((T.int64(12),), "int64", scope="local")',
              f'pv = T.decl_buffer(({_i(DV)},), "float32", scope="local")',
              'part = T.decl_buffer((T.int64(16),), "float32", scope="local")',
              'pk = T.decl_buffer((T.int64(256),), "float32", scope="local")',
              *[f'pk{x} = T.decl_buffer((T.int64({16 * c}),), "float32", scope="local")'
                for x, c in ((1, 8), (2, 4), (3, 2), (4, 1))],
              'vc = T.decl_buffer((T.int64(16),), "int32", scope="local")',
              *[f'v{x} = T.decl_buffer((T.int64(16),), "float32", scope="local")' for x in range(4)],
              f'nal = T.decl_buffer(({_i(MT)},), "int64", scope="local")')
            for b, uses in _score_uses(spec).items():
                if uses > 1:
                    x = spec.bits_set.index(b)
                    s(f'ssave{x} = T.decl_buffer(({LP} * {_i(MT)},), "float32")',
                      f'qsave{x} = T.decl_buffer(({_i(MT * 4)},), "float32", scope="local")')
            dense = " or ".join(f"{n.h} == {_i(x)}" for x in spec.dense_heads)
            if not spec.round_bits:
                _dense_alive(s, spec, n)
            elif dense:
                with s.block(f"if {dense}:"):
                    _dense_alive(s, spec, n)
                with s.block("else:"):
                    done: set[int] = set()
                    for r in range(len(spec.round_bits)):
                        _round(s, spec, n, r, done)
            else:
                done = set()
                for r in range(len(spec.round_bits)):
                    _round(s, spec, n, r, done)
            _exact_rows(s, spec, n)
    return "\n".join(s.lines) + "\n"


def _dense_alive(s: _Src, spec: SparseSpec, n: _Names) -> None:
    with s.block(f"for mm in range({_i(spec.rows_tile)}):"):
        with s.block(f"for j in range({n.nc}):"):
            s(f'alive[mm * {LP} + j] = T.Cast("int8", {_allowed(spec, n, n.i, "j")})')


def _quant_q_rows(s: _Src, spec: SparseSpec, n: _Names, bits: int) -> None:
    """The tile's query rows to unsigned bytes (int + 128) and their per-row factors, vectorized
    over the head dim (partial sums per lane, then a tree)."""
    D, MT, sc = spec.dim, spec.rows_tile, spec.scale
    h = (1 << (bits - 1)) - 1
    w = LANES if D % LANES == 0 else (8 if D % 8 == 0 else 4)
    qv = f"q[{n.b}, {n.h}, T.min({n.i}, LQ - T.int64(1)), d0 * {_i(w)} + l]"
    rq = f"T.max(T.min({_roundeven(f'{qv} / fs[0]')}, T.float32({h})), T.float32({-h}))"
    with s.block(f"for mm in range({_i(MT)}):"):
        with s.block("for l in T.vectorized(T.int64(16)):"):
            s("v0[l] = T.float32(0)", "v1[l] = T.float32(0)", "v2[l] = T.float32(0)", "v3[l] = T.float32(0)")
        with s.block(f"for d0 in range({_i(D // w)}):"):
            with s.block(f"for l in T.vectorized({_i(w)}):"):
                s(f"v0[l] = T.max(v0[l], T.fabs({qv}))")
        _lanes_reduce(s, "fs[0]", "v0", "max")
        s(f"fs[0] = fs[0] / T.float32({float(h)!r})")
        with s.block("if fs[0] <= T.float32(0):"):
            s("fs[0] = T.float32(1)")
        with s.block(f"for d0 in range({_i(D // w)}):"):
            with s.block(f"for l in T.vectorized({_i(w)}):"):
                s(f'qu[mm * {_i(D)} + d0 * {_i(w)} + l] = T.Cast("uint8", T.Cast("int32", {rq}) + 128)',
                  f"v1[l] = v1[l] + {qv} * {qv}",
                  f"v2[l] = v2[l] + ({qv} - {rq} * fs[0]) * ({qv} - {rq} * fs[0])",
                  f"v3[l] = v3[l] + ({rq} * fs[0]) * ({rq} * fs[0])")
        _lanes_reduce(s, "fs[1]", "v1", "+")
        _lanes_reduce(s, "fs[2]", "v2", "+")
        _lanes_reduce(s, "fs[3]", "v3", "+")
        # qs = sq * scale; qa multiplies |k|, qc multiplies |k - k̂| in the error bound
        s(f"qrow[mm * T.int64(4)] = fs[0] * {_f(sc)}",
          f"qrow[mm * T.int64(4) + T.int64(1)] = {_f(sc)} * (T.sqrt(fs[2]) + {_f(SLACK)} * T.sqrt(fs[1]))",
          f"qrow[mm * T.int64(4) + T.int64(2)] = {_f(sc)} * T.sqrt(fs[3])")


def _vnni_step(spec: SparseSpec, n: _Names, k: int) -> list[str]:
    """acc[mm] += qu[mm, 4 d4 : 4 d4 + 4] . kp[jt, d4] for every row of the tile (one d4 step)."""
    D, MT = spec.dim, spec.rows_tile
    if spec.vnni:
        return [f"for mm in T.unroll({_i(MT)}):",
                '    acc[T.ramp(mm * T.int64(16), 1, 16)] = T.call_llvm_pure_intrin('
                'T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), '
                'acc.vload([mm * T.int64(16)], dtype="int32x16"), '
                f'T.reinterpret(T.broadcast(T.reinterpret(qu.vload([mm * {_i(D)} + d4 * T.int64(4)], '
                '"uint8x4"), dtype="int32"), 16), dtype="uint8x64"), '
                f'kp{k}.vload([{n.b}, {n.hk}, jt, d4, T.int64(0), T.int64(0)], dtype="int8x64"), dtype="int32x16")']
    return [f"for mm, l, c in T.grid({_i(MT)}, T.int64(16), T.int64(4)):",
            f'    acc[mm * T.int64(16) + l] = acc[mm * T.int64(16) + l] + T.Cast("int32", '
            f'qu[mm * {_i(D)} + d4 * T.int64(4) + c]) * T.Cast("int32", kp{k}[{n.b}, {n.hk}, jt, d4, l, c])']


def _score_tile(s: _Src, spec: SparseSpec, n: _Names, r: int, k: int) -> None:
    """Scores of the tile's rows against every key they may see, with key quantization ``k``:
    VNNI int32 tiles of MT rows x 16 keys, then fp32 ``sbuf`` (-inf where not allowed, or
    already dropped by an earlier round)."""
    MT = spec.rows_tile
    j = "(jt * T.int64(16) + l)"
    with s.block(f"for jt in range({n.njt}):"):
        with s.block(f"for mm in T.unroll({_i(MT)}):"):
            with s.block("for l in T.vectorized(T.int64(16)):"):
                s("acc[mm * T.int64(16) + l] = 0")
        # unrolled: the tile's accumulators then stay in registers across the d4 steps
        loop = "T.unroll" if spec.dim <= 128 else "range"
        if "no_vnni" not in _DEBUG:
            with s.block(f"for d4 in {loop}({_i(spec.dim // 4)}):"):
                s(*_vnni_step(spec, n, k))
        with s.block(f"for mm in range({_i(MT)}):"):
            with s.block("for l in T.vectorized(T.int64(16)):"):
                val = (f'(T.Cast("float32", acc[mm * T.int64(16) + l] - 128 * ksum{k}[{n.b}, {n.hk}, {j}]) * '
                       f"qrow[mm * T.int64(4)]) * ks{k}[{n.b}, {n.hk}, {j}]")
                add = _add(spec, n, n.i, j)
                if add is not None:
                    val = f"{val} + {add}"
                ok = f"{j} < LK and {n.i} < LQ and {_allowed(spec, n, n.i, j)}"
                if r > 0:
                    ok = f"{ok} and alive[mm * {LP} + {j}] != T.int8(0)"
                s(f"sbuf[mm * {LP} + {j}] = T.Select({ok}, {val}, {NINF})")


def _guard_rows(s: _Src, spec: SparseSpec, n: _Names, k: int) -> None:
    """From 8-bit scores in ``sbuf``: ``prot`` = the candidates that may be the row's exact top-1."""
    j = "(c * T.int64(16) + l)"
    sv = f"sbuf[mm * {LP} + {j}]"
    ok = f"({sv} > {NINF})"
    chunks = f"(({n.nc} + T.int64(15)) // T.int64(16))"
    with s.block(f"for mm in range({_i(spec.rows_tile)}):"):
        with s.block(f"if {n.i} < LQ:"):
            with s.block("for l in T.vectorized(T.int64(16)):"):
                s(f"v3[l] = {NINF}")
            with s.block(f"for c in range({chunks}):"):
                with s.block("for l in T.vectorized(T.int64(16)):"):
                    s(f"v3[l] = T.max(v3[l], T.Select({ok}, {sv} - ({_bound(spec, n, k, j)}), {NINF}))")
            _lanes_reduce(s, "fs[3]", "v3", "max")
            with s.block(f"for c in range({chunks}):"):
                with s.block("for l in T.vectorized(T.int64(16)):"):
                    s(f'prot[mm * {LP} + {j}] = T.Cast("int8", {ok} and {sv} + ({_bound(spec, n, k, j)}) >= fs[3])')


def _score_uses(spec: SparseSpec) -> dict[int, int]:
    """How many rounds need the scores at each bit width (a round's own, and the 8-bit guard of a
    round with fewer bits).  A width needed more than once is scored once: the scores of every
    allowed key are kept, and a later round reads them back with its dead keys dropped (the key
    and query quantizations are the same, so the scores are too)."""
    uses: dict[int, int] = {}
    for bits in spec.round_bits:
        for b in ([GUARD_BITS] if bits != GUARD_BITS else []) + [bits]:
            uses[b] = uses.get(b, 0) + 1
    return uses


def _scores(s: _Src, spec: SparseSpec, n: _Names, r: int, bits: int, done: set[int]) -> None:
    """``sbuf`` (and ``qrow``) for round ``r`` at ``bits``: scored, or read back from the first
    round's scores at that width (see :func:`_score_uses`)."""
    k = {b: x for x, b in enumerate(spec.bits_set)}[bits]
    if bits in done:
        _copy_scores(s, spec, n, "qrow", f"qsave{k}", "sbuf",
                     f"T.Select(alive[mm * {LP} + {{j}}] != T.int8(0), ssave{k}[mm * {LP} + {{j}}], {NINF})")
        return
    _quant_q_rows(s, spec, n, bits)
    _score_tile(s, spec, n, r, k)
    if _score_uses(spec)[bits] > 1:
        done.add(bits)
        _copy_scores(s, spec, n, f"qsave{k}", "qrow", f"ssave{k}", f"sbuf[mm * {LP} + {{j}}]")


def _copy_scores(s: _Src, spec: SparseSpec, n: _Names, qdst: str, qsrc: str, dst: str, value: str) -> None:
    """``qdst = qsrc`` (the rows' query factors) and ``dst[mm, j] = value`` over the tile's keys."""
    j = "(jt * T.int64(16) + l)"
    with s.block(f"for mm in range({_i(spec.rows_tile * 4)}):"):
        s(f"{qdst}[mm] = {qsrc}[mm]")
    with s.block(f"for jt in range({n.njt}):"):
        with s.block(f"for mm in range({_i(spec.rows_tile)}):"):
            with s.block("for l in T.vectorized(T.int64(16)):"):
                s(f"{dst}[mm * {LP} + {j}] = {value.format(j=j)}")


def _round(s: _Src, spec: SparseSpec, n: _Names, r: int, done: set[int]) -> None:
    """Round r: the 8-bit guard (when the round has fewer bits), then the round's own scores and
    the selection of every row of the tile.  ``done``: the widths already scored (and kept)."""
    bits = spec.round_bits[r]
    idx = {b: x for x, b in enumerate(spec.bits_set)}
    guarded = bits != GUARD_BITS
    if guarded:
        _scores(s, spec, n, r, GUARD_BITS, done)
        _guard_rows(s, spec, n, idx[GUARD_BITS])
    _scores(s, spec, n, r, bits, done)
    s(f"fs[10] = {NINF}")  # no previous row's threshold yet (see _kth_search)
    with s.block(f"for mm in range({_i(spec.rows_tile)}):"):
        with s.block(f"if {n.i} < LQ:"):
            if "no_select" in _DEBUG:  # every candidate survives, written as the selection writes it
                with s.block(f"for c in range((({n.nc} + T.int64(15)) // T.int64(16))):"):
                    with s.block("for l in T.vectorized(T.int64(16)):"):
                        s(f'alive[mm * {LP} + c * T.int64(16) + l] = T.Cast("int8", '
                          f'sbuf[mm * {LP} + c * T.int64(16) + l] > {NINF})')
            else:
                _row_select(s, spec, n, r, idx[bits], guarded)


def _bound(spec: SparseSpec, n: _Names, k: int, j: str) -> str:
    """Error bound of the approximate score of key j for row mm."""
    e = (f"qrow[mm * T.int64(4) + T.int64(1)] * kn[{n.b}, {n.hk}, {j}] + "
         f"qrow[mm * T.int64(4) + T.int64(2)] * ke{k}[{n.b}, {n.hk}, {j}]")
    add = _add(spec, n, n.i, j)
    if add is not None:
        e = f"{e} + T.float32(1e-6) * T.Select({add} > {NINF}, T.fabs({add}), T.float32(0))"
    return e


def _lanes_reduce(s: _Src, dst: str, src: str, op: str) -> None:
    """``dst = op-reduction of the 16 lanes src[0:16]`` (a tree: four dependent steps, not sixteen)."""
    for w in (8, 4, 2, 1):
        with s.block(f"for l in T.vectorized(T.int64({w})):"):
            if op == "+":
                s(f"{src}[l] = {src}[l] + {src}[l + T.int64({w})]")
            else:
                s(f"{src}[l] = T.{op}({src}[l], {src}[l + T.int64({w})])")
    s(f"{dst} = {src}[0]")


def _fkey(k: str) -> str:
    """Inverse of :func:`_okey` (an int64 holding an int32 key -> fp32)."""
    flipped = f"T.bitwise_xor({k}, T.int64(2147483647))"
    return f'T.reinterpret("float32", T.Cast("int32", T.Select({k} >= T.int64(0), {k}, {flipped})))'


def _kth_search(s: _Src, n: _Names, sv: str, j: str) -> None:
    """``fs[6]`` = the ``ist[1]``-th largest of the row's ``ist[0]`` candidate scores (ties count).

    Invariant: ``count(s >= lo) >= m > count(s >= hi)`` over order keys ``lo = ist[2]``,
    ``hi = ist[3]``.  The first guess is the previous row's threshold (``fs[10]``: neighbouring
    query rows score alike); then each step guesses by linear interpolation of the count between
    the bracket's ends, except that after two steps in a row that did not halve the count
    between the ends, one step halves the bracket in key space (so at most ~3 x 32 counting
    passes in the worst case; about 6 on SmolLM2's real scores against 7 with interpolation and
    halving alternated).  It stops when a guess counts exactly ``m`` or no float lies strictly
    between the ends (then the ``m``-th largest is ``lo`` itself)."""
    chunks = f"(({n.nc} + T.int64(15)) // T.int64(16))"
    # ist: 2 lo, 3 hi, 4 count, 5 done, 6 guess, 7 count(lo), 8 count(hi), 9 poor steps in a row,
    # 10 count(lo) - count(hi) before the step
    s(f'ist[2] = T.Cast("int64", {_okey("fs[1]")})', f'ist[3] = T.Cast("int64", {_okey("fs[0]")}) + T.int64(1)',
      "ist[5] = T.int64(0)", "ist[7] = ist[0]", "ist[8] = T.int64(0)", "ist[9] = T.int64(0)")
    # the two ends need no search: every candidate (m = count) or the maximum (m = 1)
    with s.block("if ist[1] == ist[0]:"):
        s("ist[5] = T.int64(1)")
    with s.block("if ist[1] == T.int64(1):"):
        s("ist[2] = ist[3] - T.int64(1)", "ist[5] = T.int64(1)")
    with s.block("for it in range(T.int64(100)):"):
        with s.block("if ist[3] - ist[2] > T.int64(1) and ist[5] == T.int64(0):"):
            s("ist[10] = ist[7] - ist[8]", "ist[6] = ist[2] + (ist[3] - ist[2]) // T.int64(2)")
            with s.block("if ist[9] < T.int64(2):"):
                s(f"fs[7] = {_fkey('ist[2]')}", f"fs[8] = {_fkey('ist[3]')}",
                  'fs[9] = fs[7] + T.Cast("float32", ist[7] - ist[1]) / T.Cast("float32", ist[7] - ist[8]) '
                  "* (fs[8] - fs[7])",
                  f'ist[11] = T.Cast("int64", {_okey("fs[9]")})')
                with s.block("if ist[11] > ist[2] and ist[11] < ist[3]:"):
                    s("ist[6] = ist[11]")
            with s.block("if it == T.int64(0):"):
                s(f'ist[11] = T.Cast("int64", {_okey("fs[10]")})')
                with s.block("if ist[11] > ist[2] and ist[11] < ist[3]:"):
                    s("ist[6] = ist[11]")
            s(f"fs[9] = {_fkey('ist[6]')}")
            with s.block("for l in T.vectorized(T.int64(16)):"):
                s("vc[l] = 0")
            with s.block(f"for c in range({chunks}):"):
                with s.block("for l in T.vectorized(T.int64(16)):"):
                    s(f'vc[l] = vc[l] + T.Cast("int32", {sv} >= fs[9])')
            _lanes_reduce(s, "ist[4]", "vc", "+")
            with s.block("if ist[4] >= ist[1]:"):
                s("ist[2] = ist[6]", "ist[7] = ist[4]")
                with s.block("if ist[4] == ist[1]:"):
                    s("ist[5] = T.int64(1)")
            with s.block("else:"):
                s("ist[3] = ist[6]", "ist[8] = ist[4]")
            # a poor step: the count between the ends did not halve (the first guess never is;
            # after a halving step the count starts again)
            s("ist[9] = T.Select(it == T.int64(0) or ist[9] >= T.int64(2) or "
              "(ist[7] - ist[8]) * T.int64(2) <= ist[10], T.int64(0), ist[9] + T.int64(1))")
    s(f"fs[6] = {_fkey('ist[2]')}", "fs[10] = fs[6]")


def _row_select(s: _Src, spec: SparseSpec, n: _Names, r: int, k: int, guarded: bool) -> None:
    """Selection of row ``mm`` in round ``r``: writes ``alive`` for the keys it may see.

    Every loop runs over whole 16-key chunks: the scores of keys the row may not see (past its
    causal end, or past LK) are -inf in ``sbuf``, so they count as dead candidates."""
    j = "(c * T.int64(16) + l)"
    sv = f"sbuf[mm * {LP} + {j}]"
    ok = f"({sv} > {NINF})"
    chunks = f"(({n.nc} + T.int64(15)) // T.int64(16))"
    # pass A: count, max, min and sum of the candidates, the lower bound of the exact max, int keys
    with s.block("for l in T.vectorized(T.int64(16)):"):
        s("vc[l] = 0", f"v0[l] = {NINF}", f"v1[l] = {PINF}", "v2[l] = T.float32(0)", f"v3[l] = {NINF}")
    with s.block(f"for c in range({chunks}):"):
        with s.block("for l in T.vectorized(T.int64(16)):"):
            s(f'vc[l] = vc[l] + T.Cast("int32", {ok})',
              f"v0[l] = T.max(v0[l], {sv})",
              f"v1[l] = T.min(v1[l], T.Select({ok}, {sv}, {PINF}))",
              f"v2[l] = v2[l] + T.Select({ok}, {sv}, T.float32(0))")
            if not guarded:
                s(f"v3[l] = T.max(v3[l], T.Select({ok}, {sv} - ({_bound(spec, n, k, j)}), {NINF}))")
    _lanes_reduce(s, "ist[0]", "vc", "+")
    _lanes_reduce(s, "fs[0]", "v0", "max")
    _lanes_reduce(s, "fs[1]", "v1", "min")
    _lanes_reduce(s, "fs[2]", "v2", "+")
    if not guarded:
        _lanes_reduce(s, "fs[3]", "v3", "max")
    if r == 0:
        s("nal[mm] = ist[0]")
    with s.block("if ist[0] > T.int64(0):"):
        p = spec.params[r]
        if spec.select == "topk":
            s(f'ist[1] = T.min(ist[0], T.max(T.int64({spec.min_keep}), T.Cast("int64", T.ceil('
              f'T.Cast("float64", nal[mm]) * T.float64({p!r}) - T.float64(1e-9)))))')
        else:
            s(f"ist[1] = T.min(ist[0], T.int64({spec.min_keep}))")
        if "no_kth" in _DEBUG:
            s(f"fs[6] = {PINF}")
        else:
            _kth_search(s, n, sv, j)
        keep = f"{sv} >= fs[6]"
        if spec.select == "threshold":
            s('fs[4] = fs[2] / T.Cast("float32", ist[0])', f"fs[5] = fs[4] + T.float32({p!r}) * (fs[0] - fs[4])")
            keep = f"{keep} or {sv} >= fs[5]"
        with s.block(f"for c in range({chunks}):"):
            with s.block("for l in T.vectorized(T.int64(16)):"):
                prot = (f"prot[mm * {LP} + {j}] != T.int8(0)" if guarded
                        else f"{sv} + ({_bound(spec, n, k, j)}) >= fs[3]")
                s(f'alive[mm * {LP} + {j}] = T.Cast("int8", {ok} and ({keep} or {prot}))')
    with s.block("else:"):
        with s.block(f"for c in range({chunks}):"):
            with s.block("for l in T.vectorized(T.int64(16)):"):
                s(f"alive[mm * {LP} + {j}] = T.int8(0)")


# profiling cuts (benchmarks/sparse_attention_profile.py): kernels planned while a name is in the
# set skip a phase and compute wrong outputs on purpose; plan_sparse_attention's cache must be
# cleared around them.  "stop_after_compact": no exact attention; "no_kth": no threshold search;
# "no_select": no selection at all; "no_vnni": no integer dot products.
_DEBUG: set[str] = set()


def _butterfly_levels() -> list[tuple[list[int], list[int]]]:
    """Shuffle index pairs (lo, hi) of the four levels that sum 16 vectors of 16 partial sums into
    one vector of 16 totals (key t in lane t): level ``k`` adds ``S(x, y, lo) + S(x, y, hi)`` for
    consecutive pairs (x, y), halving the lanes per key."""
    levels = []
    for w in (8, 4, 2, 1):  # lanes per key after this level
        lo, hi = [], []
        for src in (0, 16):  # x, then y in the concatenation [x, y]
            for base in range(0, 16, 2 * w):
                lo += [src + base + j for j in range(w)]
                hi += [src + base + w + j for j in range(w)]
        levels.append((lo, hi))
    return levels


def _exact_scores_16(s: _Src, spec: SparseSpec, n: _Names) -> None:
    """Exact scores of the row's kept keys, 16 at a time: 16 vectors of partial sums (one per
    key, 4 FMAs each for D = 64), then a shuffle butterfly (15 adds, 30 shuffles) instead of 16
    horizontal sums."""
    D, sc = spec.dim, spec.scale
    with s.block("for g in range((ist[0] + T.int64(15)) // T.int64(16)):"):
        with s.block("for u in T.unroll(T.int64(16)):"):
            kk = 'T.Cast("int64", idx[T.min(g * T.int64(16) + u, ist[0] - T.int64(1))])'
            with s.block("for l in T.vectorized(T.int64(16)):"):
                s(f"pk[u * T.int64(16) + l] = q[{n.b}, {n.h}, {n.i}, l] * k[{n.b}, {n.hk}, {kk}, l]")
            for d0 in range(1, D // LANES):
                with s.block("for l in T.vectorized(T.int64(16)):"):
                    s(f"pk[u * T.int64(16) + l] = pk[u * T.int64(16) + l] + q[{n.b}, {n.h}, {n.i}, "
                      f"T.int64({d0 * 16}) + l] * k[{n.b}, {n.hk}, {kk}, T.int64({d0 * 16}) + l]")
        src, count = "pk", 16
        for lvl, (lo, hi) in enumerate(_butterfly_levels()):
            dst = f"pk{lvl + 1}"
            count //= 2
            for i in range(count):
                x = f'{src}.vload([T.int64({2 * i * 16})], "float32x16")'
                y = f'{src}.vload([T.int64({(2 * i + 1) * 16})], "float32x16")'
                s(f"{dst}[T.ramp(T.int64({i * 16}), 1, 16)] = T.Shuffle([{x}, {y}], {lo}) + "
                  f"T.Shuffle([{x}, {y}], {hi})")
            src = dst
        with s.block("for l in T.vectorized(T.int64(16)):"):
            s(f"ex[g * T.int64(16) + l] = {src}[l] * {_f(sc)}")


def _exact_rows(s: _Src, spec: SparseSpec, n: _Names) -> None:
    """Per row: compact the survivors, then exact scores, softmax and p v over them only."""
    D, DV, MT, sc = spec.dim, spec.vdim, spec.rows_tile, spec.scale
    dl = LANES if D % LANES == 0 else (8 if D % 8 == 0 else 4)
    jj = 'T.Cast("int64", idx[tt])'
    exp = "fast_exp" if spec.fast_math else "T.exp"
    with s.block(f"for mm in range({_i(MT)}):"):
        with s.block(f"if {n.i} < LQ:"):
            s("ist[0] = T.int64(0)")
            with s.block(f"for j in range({n.nc}):"):
                s('idx[ist[0]] = T.Cast("int32", j)', f'ist[0] = ist[0] + T.Cast("int64", alive[mm * {LP} + j])')
            if "stop_after_compact" in _DEBUG:
                s("ist[0] = T.int64(0)")
            if D % LANES == 0:
                _exact_scores_16(s, spec, n)
            else:  # per key: partial sums reduced as a tree
                with s.block("for tt in range(ist[0]):"):
                    with s.block(f"for l in T.vectorized({_i(dl)}):"):
                        s(f"part[l] = q[{n.b}, {n.h}, {n.i}, l] * k[{n.b}, {n.hk}, {jj}, l]")
                    with s.block(f"for d0 in range(T.int64(1), {_i(D // dl)}):"):
                        with s.block(f"for l in T.vectorized({_i(dl)}):"):
                            s(f"part[l] = part[l] + q[{n.b}, {n.h}, {n.i}, d0 * {_i(dl)} + l] * "
                              f"k[{n.b}, {n.hk}, {jj}, d0 * {_i(dl)} + l]")
                    w = dl // 2
                    while w >= 1:
                        with s.block(f"for l in T.vectorized(T.int64({w})):"):
                            s(f"part[l] = part[l] + part[l + T.int64({w})]")
                        w //= 2
                    s(f"ex[tt] = part[0] * {_f(sc)}")
            add = _add(spec, n, n.i, jj)
            if add is not None:
                with s.block("for tt in range(ist[0]):"):
                    s(f"ex[tt] = ex[tt] + {add}")
            # softmax over the kept keys: whole 16-wide chunks, then the tail
            nv = "(ist[0] // T.int64(16))"
            with s.block("for l in T.vectorized(T.int64(16)):"):
                s(f"v0[l] = {NINF}")
            with s.block(f"for c in range({nv}):"):
                with s.block("for l in T.vectorized(T.int64(16)):"):
                    s("v0[l] = T.max(v0[l], ex[c * T.int64(16) + l])")
            _lanes_reduce(s, "fs[0]", "v0", "max")
            with s.block(f"for tt in range({nv} * T.int64(16), ist[0]):"):
                s("fs[0] = T.max(fs[0], ex[tt])")
            with s.block("for l in T.vectorized(T.int64(16)):"):
                s("v2[l] = T.float32(0)")
            with s.block(f"for c in range({nv}):"):
                with s.block("for l in T.vectorized(T.int64(16)):"):
                    s(f"ex[c * T.int64(16) + l] = {exp}(ex[c * T.int64(16) + l] - fs[0])",
                      "v2[l] = v2[l] + ex[c * T.int64(16) + l]")
            _lanes_reduce(s, "fs[2]", "v2", "+")
            with s.block(f"for tt in range({nv} * T.int64(16), ist[0]):"):
                s(f"ex[tt] = {exp}(ex[tt] - fs[0])", "fs[2] = fs[2] + ex[tt]")
            with s.block(f"for d in T.vectorized({_i(DV)}):"):
                s("pv[d] = T.float32(0)")
            with s.block("for tt in range(ist[0]):"):
                with s.block(f"for d in T.vectorized({_i(DV)}):"):
                    s(f"pv[d] = pv[d] + ex[tt] * v[{n.b}, {n.hk}, {jj}, d]")
            s("fs[3] = T.Select(fs[2] > T.float32(0), T.float32(1) / fs[2], T.float32(0))")
            with s.block(f"for d in T.vectorized({_i(DV)}):"):
                s(f"o[{n.b}, {n.h}, {n.i}, d] = pv[d] * fs[3]")


# ----------------------------------------------------------------------------- planning and emission
@dataclass(frozen=True)
class SparseKernel:
    """The PrimFuncs of one spec: a key quantizer per distinct bit width and the attention kernel."""

    spec: SparseSpec
    quant_k: tuple[Any, ...]
    attend: Any

    @property
    def names(self) -> tuple[list[str], str]:
        return ([f"ctc_sa_quant_k{b}_{self.spec.tag}" for b in self.spec.bits_set], f"ctc_sa_attend_{self.spec.tag}")


def _parse(src: str) -> Any:
    import tvm
    from ctc.backends.tvm.row_kernels import fast_exp_expr
    from tvm.script import tirx as T

    return tvm.script.from_source(src, extra_vars={"fast_exp": fast_exp_expr, "T": T})


@functools.lru_cache(maxsize=128)
def plan_sparse_attention(spec: SparseSpec) -> SparseKernel:
    """Generate the PrimFuncs for ``spec`` (cached)."""
    spec.validate()
    qk = tuple(_parse(_quant_k_source(spec, b)).with_attr("tirx.is_scheduled", True) for b in spec.bits_set)
    att = _parse(_attend_source(spec)).with_attr("tirx.is_scheduled", True)
    return SparseKernel(spec, qk, att)

def _target(target: Any) -> Any:
    from ctc.backends.tvm.int_kernels import _as_target

    return _as_target(target)


_BUILT: dict[tuple[SparseKernel, str], tuple[list[Any], Any]] = {}


def build_sparse_attention(kernel: SparseKernel, target: Any = None) -> tuple[list[Any], Any]:
    """Compile the kernel's PrimFuncs for ``target`` (cached per process)."""
    import tvm

    tgt = _target(target)
    key = (kernel, str(tgt))
    if key not in _BUILT:
        qs = [tvm.compile(tvm.IRModule({"main": f}), target=tgt) for f in kernel.quant_k]
        att = tvm.compile(tvm.IRModule({"main": kernel.attend}), target=tgt)
        _BUILT[key] = (qs, att)
    return _BUILT[key]


def _mask4(mask: np.ndarray | None) -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(mask)
    return m.reshape((1,) * (4 - m.ndim) + m.shape)


def mask_spec(shape: Sequence[Any], dtype: str) -> MaskSpec:
    """The :class:`MaskSpec` of a mask operand of ``shape`` (ints or symbols) and dtype."""
    dims = [1] * (4 - len(shape)) + list(shape)
    one = [d == 1 for d in dims]
    return MaskSpec("bool" if dtype == "bool" else "float32", *one)


def run_sparse_attention(spec: SparseSpec, q: Any, k: Any, v: Any, mask: Any = None, target: Any = None,
                         *, repeat: int = 0) -> Any:
    """Compile (cached) and run on numpy/torch inputs; returns the output (numpy).  With
    ``repeat > 0`` returns ``(output, seconds per call list)`` timing ``repeat`` calls (the key
    quantization included)."""
    import time

    import tvm

    qs, att = build_sparse_attention(plan_sparse_attention(spec), target)
    f = lambda a, dt=np.float32: np.ascontiguousarray(a.detach().cpu().numpy() if hasattr(a, "detach")  # noqa: E731
                                                       else np.asarray(a)).astype(dt, copy=False)
    qn, kn_, vn = f(q), f(k), f(v)
    b, hk, lk, d = kn_.shape
    lp = (lk + 15) // 16 * 16
    dev = tvm.cpu()
    t = lambda a: tvm.runtime.tensor(np.ascontiguousarray(a), dev)  # noqa: E731
    args = [t(qn), t(kn_), t(vn)]
    if mask is not None:
        mk = _mask4(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask)
        args.append(t(mk.astype(np.bool_) if spec.mask and spec.mask.dtype == "bool" else mk.astype(np.float32)))
    kparts = []
    for _ in spec.bits_set:
        kparts.append([t(np.zeros((b, hk, lp // 16, d // 4, 16, 4), np.int8)), t(np.zeros((b, hk, lp), np.float32)),
                       t(np.zeros((b, hk, lp), np.int32)), t(np.zeros((b, hk, lp), np.float32)),
                       t(np.zeros((b, hk, lp), np.float32))])
    out = t(np.zeros((qn.shape[0], qn.shape[1], qn.shape[2], vn.shape[3]), np.float32))

    def call() -> None:
        for fn, (kp, ks, ksum, kn, ke) in zip(qs, kparts, strict=True):
            fn["main"](args[1], kp, ks, ksum, kn, ke)
        a = list(args)
        for kp, ks, ksum, _, ke in kparts:
            a += [kp, ks, ksum, ke]
        a += ([kparts[0][3]] if kparts else []) + [out]
        att["main"](*a)

    call()
    if repeat:
        times = []
        for _ in range(repeat):
            t0 = time.process_time()
            call()
            times.append(time.process_time() - t0)
        return out.numpy(), times
    return out.numpy()


def _ty(x: Any) -> Any:
    return x.ty if hasattr(x, "ty") else x.struct_info


def emit_sparse_attention(bb: Any, q: Any, k: Any, v: Any, mask: Any | None, spec: SparseSpec) -> Any:
    """Emit the key quantizers and the attention kernel into a Relax function; the output value.

    ``q, k, v`` are f32 ``[B, H, Lq, D]`` / ``[B, Hkv, Lk, D|Dv]`` Relax values, ``mask`` a rank-4
    value shaped as ``spec.mask`` says (or None)."""
    from ctc.backends.tvm.int_kernels import add_prim_func
    from tvm import relax

    kernel = plan_sparse_attention(spec)
    qnames, aname = kernel.names
    bsz, hk, lk, d = list(_ty(k).shape)
    lp = (lk + 15) // 16 * 16
    parts = []
    for fn, nm in zip(kernel.quant_k, qnames, strict=True):
        gv = add_prim_func(bb, fn, nm)
        res = bb.emit(relax.call_tir(gv, [k], [
            relax.TensorType([bsz, hk, (lk + 15) // 16, d // 4, 16, 4], "int8"),
            relax.TensorType([bsz, hk, lp], "float32"), relax.TensorType([bsz, hk, lp], "int32"),
            relax.TensorType([bsz, hk, lp], "float32"), relax.TensorType([bsz, hk, lp], "float32")]))
        parts.append([bb.emit(relax.TupleGetItem(res, i)) for i in range(5)])
    args = [q, k, v] + ([mask] if mask is not None else [])
    for kp, ks, ksum, _, ke in parts:
        args += [kp, ks, ksum, ke]
    if parts:
        args.append(parts[0][3])
    gv = add_prim_func(bb, kernel.attend, aname)
    qs = list(_ty(q).shape)
    return bb.emit(relax.call_tir(gv, args, relax.TensorType([qs[0], qs[1], qs[2], list(_ty(v).shape)[3]],
                                                             "float32")))


def lower_sparse_attention(ctx: Any, node: Any) -> Any:
    """The ``sparse_attention`` rule of the Relax lowering (``ctc.backends.tvm.lower``), CPU targets only.

    Operands are cast to f32 and the head dim zero-padded to a multiple of 4 when needed (zeros
    change neither dot products nor per-vector scales); a mask of rank < 4 is reshaped to rank
    4.  Heads and head dims must be static."""
    from ctc.backends.tvm.int_kernels import target_has_vnni
    from ctc.backends.tvm.lower import DTYPE_MAP, LoweringError
    from tvm import relax

    where = f"sparse_attention at {node.scope or '<root>'}"
    if ctx.target is None or ctx.target.kind.name != "llvm":
        kind = ctx.target.kind.name if ctx.target is not None else "none"
        raise LoweringError(f"{where}: the sparse attention kernels are CPU (llvm) kernels; target {kind!r} has none "
                            "(compile for the cpu target, or leave attention dense on this target)")
    qv, kv, vv, mv = (node.operand(x) for x in ("q", "k", "v", "mask"))
    qt, kt, vt = qv.type, kv.type, vv.type
    h, hk, d, dv = qt.shape[1], kt.shape[1], qt.shape[3], vt.shape[3]
    if not all(isinstance(x, int) for x in (h, hk, d, dv)):
        raise LoweringError(f"{where}: heads and head dims must be static, got q {qt}, k {kt}, v {vt}")
    op = relax.op

    def f32(x: Any, t: Any) -> Any:
        return x if t.dtype == "f32" else ctx.emit(op.astype(x, "float32"))

    q, k, v = f32(ctx.val(qv), qt), f32(ctx.val(kv), kt), f32(ctx.val(vv), vt)
    dp = -(-d // 4) * 4
    if dp != d:
        q = ctx.emit(op.nn.pad(q, [0, 0, 0, 0, 0, 0, 0, dp - d]))
        k = ctx.emit(op.nn.pad(k, [0, 0, 0, 0, 0, 0, 0, dp - d]))
    mask = None
    mspec = None
    if mv is not None:
        mt = mv.type
        shape4 = [1] * (4 - mt.rank) + list(mt.shape)
        mspec = mask_spec(shape4, mt.dtype)
        mask = ctx.val(mv)
        if mt.rank != 4:
            mask = ctx.emit(op.reshape(mask, [ctx.dims(x) for x in shape4]))
        if mt.dtype not in ("bool", "f32"):
            mask = ctx.emit(op.astype(mask, "float32"))
    a = node.attrs
    lq = qt.shape[2]
    static_lq = lq if isinstance(lq, int) else None
    spec = SparseSpec(heads=h, kv_heads=hk, dim=dp, vdim=dv, round_bits=tuple(a["round_bits"]), select=a["select"],
                      params=tuple(a["keep_ratios"] if a["select"] == "topk" else a["alphas"]),
                      min_keep=int(a["min_keep"]), dense_heads=tuple(a["dense_heads"]), causal=bool(a["is_causal"]),
                      scale=float(a["scale"]) if a["scale"] is not None else 1.0 / math.sqrt(d), mask=mspec,
                      vnni=target_has_vnni(ctx.target), fast_math=bool(ctx.fast_math),
                      rows_tile=1 if static_lq == 1 else MT_DEFAULT)
    out = emit_sparse_attention(ctx.bb, q, k, v, mask, spec)
    return out if qt.dtype == "f32" else op.astype(out, DTYPE_MAP[qt.dtype])
