"""One fused CPU kernel for prefill attention: ``softmax(q k^T * scale + mask) v`` per (batch, head, row block).

Why: lowered op by op, attention is three kernels with two ``[B, H, S, L]`` tensors between
them (the logits, then the probabilities), each written to memory by one kernel and read back
by the next; on all-MiniLM-L6-v2 W8A8 at seq 128 those kernels (``q k^T`` with its scale and
mask, softmax, ``p v``) took about 3.5 of 14.9 ms of one thread, more than any matmul group but
the FFN's.  Here one task computes ``R`` query rows of one head from start to end:

1. scores of the ``R`` rows against each block of 32 keys: an ``R x 32`` register tile, the
   query element broadcast against a row of ``k^T`` (``[B, Hk, D, Lp]``, 32 contiguous keys), then
   the scale and the mask, written to the task's rows of the ``scores`` work buffer (``R x Lp``,
   still in L1/L2 when read back) while 32-lane running maxima are kept;
2. ``exp(s - max)`` in place (``fast_exp_expr``: exactly 0 for masked scores), with 32-lane sums;
3. ``out[r] = sum_j p[r, j] v[j] / sum_j p[r, j]``: an ``R x D`` register tile over the keys, ``PV_UNROLL``
   keys a step.

Every per-task buffer (``acc``, ``vmx``, ``o``) is read and written as whole 32-lane rows: reading the
32-lane score tile in 16-lane halves made LLVM rebuild the halves lane by lane (``vpextrq``/``vinsertps``,
79 in the seq-384 kernel; the kernel is ~8% faster without them).

The key axis of the scores is whole blocks of 32 (``Lp``): a key length that is not (a symbolic
one, in any-length builds) is padded by the caller with zero keys and a padded mask, and the kernel
masks keys ``>= L`` itself; the values are read as they are (``L`` rows: the padded keys' weights
are exactly 0, so ``p v`` stops at ``L``, and no padded copy of ``v`` is made).  The row edge
(``S`` not a multiple of ``R``) clamps the row index: the last block's extra rows recompute the
last row's scores (the same values) but neither exponentiate them again nor write an output.
Numerics are the op-by-op path's (fp32, the same exponential, the max subtracted first), summed
in a different order.

:func:`attention_kernel` returns the PrimFunc for one shape/attribute set; the lowering
(``lower._sdpa``) emits it with ``call_tir`` (outputs: the result and the work buffer).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from ctc.backends.tvm.row_kernels import halving_lines

__all__ = ["AttentionSpec", "KEY_BLOCK", "attention_kernel", "attention_rows"]

KEY_BLOCK = 32  # keys per score tile (2 x 16 f32 lanes); the padded key length is a multiple of it
ROWS = 8  # query rows per task (the register tiles: 8 x 32 scores, 8 x D outputs) with AVX-512's 32 zmm
PV_UNROLL = 4  # keys per step of the p v loop (one step per key: pointer bumps and loop overhead cost ~5%)


LAYOUTS = {
    "bhsd": "q, k, v and out as separate [B, H, S, D] tensors (k, v with the kv heads)",
    "bshd": "q, k, v and out as separate [B, S, H, D] tensors: the linears' outputs split into heads, untransposed",
    "qkv": "q, k and v as parts 0, 1, 2 of one [3, B, S, H * D] tensor (a merged q|k|v linear's part-major output); "
           "out [B, S, H, D]",
}
"""How the int8 kernel finds its operands.  The last two spare the model the head transposes around attention
(one copy of q, k and v each before it, one of the output after it)."""


def attention_rows(lanes: int) -> int:
    """Query rows per task of the f32 kernel for ``lanes`` f32 lanes.  AVX-512's 32 zmm hold the 8 x 32 score
    tile (16 registers); AVX2's 16 ymm do not (8 x 32 is 32 ymm), and there 2 rows measured fastest (one thread,
    MiniLM heads, seq 384: 4.49 ms with 2 rows, 5.15 with 3, 6.61 with 8; 64-wide heads at 256 keys: 4.48 vs 6.56)."""
    return ROWS if lanes >= 16 else 2


@dataclass(frozen=True)
class AttentionSpec:
    """Static facts of one attention: head count and dim, the mask's kind and broadcast, and flags.

    ``batch``/``seq``/``keys`` are ints for fixed sizes, None for symbolic ones; ``mask`` is None,
    ``"bool"`` (False = masked) or ``"float"`` (added to the scores); ``mask_dims`` says which of the
    mask's first three axes (batch, head, query row) are full size rather than broadcast (size 1).
    ``padded``: the key axis of ``k^T`` and the mask is padded past the true length ``L`` (the values'
    row count: ``v`` is not padded), so keys ``>= L`` are masked in the kernel.
    """

    heads: int
    kv_heads: int
    dim: int
    scale: float
    causal: bool
    mask: str | None
    mask_dims: tuple[bool, bool, bool]
    padded: bool
    batch: int | None = None
    seq: int | None = None
    keys: int | None = None  # padded key length Lp
    bits: int = 32  # 32: f32 products; 8: int8 q k^T and p v on VNNI (see attention_kernel)
    rows: int = ROWS  # query rows per task of the f32 kernel (its register tiles: rows x 32 scores, rows x D outputs)
    layout: str = "bhsd"  # how q, k, v and out are stored: see LAYOUTS (the int8 kernel takes all three)

    @property
    def name(self) -> str:
        """A stable PrimFunc name for this spec (the same in every process: no Python hash)."""
        m = "" if self.mask is None else f"_m{self.mask[0]}{''.join('1' if f else '0' for f in self.mask_dims)}"
        sizes = "_".join(str(v) if v is not None else "n" for v in (self.batch, self.seq, self.keys))
        flags = ("c" if self.causal else "") + ("p" if self.padded else "")
        lay = "" if self.layout == "bhsd" else f"_{self.layout}"
        return (f"ctc_attention_h{self.heads}k{self.kv_heads}d{self.dim}{m}{'_' + flags if flags else ''}"
                f"{'_i8' if self.bits == 8 else ''}{lay}_{sizes}"
                f"_s{self.scale!r}".replace(".", "p").replace("-", "m").replace("+", ""))

    def validate(self) -> None:
        """Raise ``ValueError`` for shapes the kernel does not cover (the caller falls back)."""
        if self.dim % 16:
            raise ValueError(f"attention kernel: head dim {self.dim} must be a multiple of 16")
        if self.heads % self.kv_heads:
            raise ValueError(f"attention kernel: {self.heads} query heads do not group over {self.kv_heads} kv heads")
        if self.bits not in (8, 32):
            raise ValueError(f"attention kernel: bits={self.bits}: expected 8 (int8 products) or 32 (f32)")
        if self.keys is not None and self.keys % KEY_BLOCK:
            raise ValueError(f"attention kernel: padded key length {self.keys} must be a multiple of {KEY_BLOCK}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"attention kernel: layout {self.layout!r}: expected one of {', '.join(LAYOUTS)}")
        if self.layout != "bhsd" and self.bits != 8:
            raise ValueError(f"attention kernel: layout {self.layout!r} is read by the int8 kernel only (bits=8)")
        if self.layout == "qkv" and (self.heads != self.kv_heads or (self.seq is None) != (self.keys is None) or (
                self.seq is not None and self.keys != -(-self.seq // KEY_BLOCK) * KEY_BLOCK)):
            raise ValueError("attention kernel: layout 'qkv' (q, k and v as parts of one tensor) is self-attention: "
                             "as many kv heads as heads, the keys the query rows (padded to whole key blocks)")


def _i(v: int) -> str:
    return f"T.int64({int(v)})"


_NEG = "T.float32(-3.4028234663852886e38)"


def _lane_reduce(op: str, ind: str, rows: int = ROWS, halving: bool = False) -> list[str]:
    """TVMScript lines: ``rs[r] = op`` over the ``KEY_BLOCK`` lanes of ``vmx[r]``: a chain over the lanes, or with
    ``halving`` folded in halves (``vmx`` overwritten).  The int8 kernel halves: its chains were 16% of its time
    (MiniLM, seq 128); the f32 kernel keeps the chain (its 16-lane halves made LLVM rebuild vectors lane by
    lane, see the module doc)."""
    if halving:
        return [f"{ind}for r in T.unroll({_i(rows)}):", *halving_lines(ind + "    ", "vmx[r, {c}]", op, KEY_BLOCK),
                f"{ind}    rs[r] = {op}(vmx[r, T.int64(0)], vmx[r, T.int64(1)])"]
    init = _NEG if op == "T.max" else "T.float32(0)"
    return [f"{ind}for r in range({_i(rows)}):", f"{ind}    rs[r] = {init}",
            f"{ind}    for c in range({_i(KEY_BLOCK)}):", f"{ind}        rs[r] = {op}(rs[r], vmx[r, c])"]


def _tile_fill(ind: str, lhs: str, value: str, cols: int = KEY_BLOCK, rows: int = ROWS) -> list[str]:
    """TVMScript lines: ``lhs = value`` over a register tile (``r`` unrolled over ``rows``, ``c`` vectorized)."""
    return [f"{ind}for r in T.unroll({_i(rows)}):", f"{ind}    for c in T.vectorized({_i(cols)}):",
            f"{ind}        {lhs} = {value}"]


def _pv(count: str, unroll: int, start: str, row: str, dim: int, ind: str, rows: int) -> list[str]:
    """TVMScript lines: ``o[r] += p[r, j] v[j]`` for ``count`` groups of ``unroll`` keys from key ``start``."""
    j = f"{start}j0 * {_i(unroll)} + j1"
    return [f"{ind}for j0 in range({count}):",
            f"{ind}    for j1 in T.unroll({_i(unroll)}):",
            f"{ind}        for r in T.unroll({_i(rows)}):",
            f"{ind}            for dd in T.vectorized({_i(dim)}):",
            f"{ind}                o[r, dd] = o[r, dd] + sc[b, h, {row}, {j}] * v[b, hk, {j}, dd]"]


def _score_value(spec: AttentionSpec, val: str, row: str, key: str, length: str, mask_scale: float = 1.0) -> str:
    """TVMScript of the masked score of ``(row, key)``: ``val`` (already scaled) plus an additive mask (times
    ``mask_scale``), or -inf where a bool mask, the causal triangle or the true key length ``length`` (padded
    keys) rules it out."""
    def at() -> str:
        return ", ".join([("b" if spec.mask_dims[0] else "T.int64(0)"), ("h" if spec.mask_dims[1] else "T.int64(0)"),
                          (row if spec.mask_dims[2] else "T.int64(0)"), key])
    if spec.mask == "float":
        val = f"{val} + mask[{at()}]" + ("" if mask_scale == 1.0 else f" * T.float32({mask_scale!r})")
    conds = []
    if spec.mask == "bool":
        conds.append(f"mask[{at()}]")
    if spec.padded:
        conds.append(f"{key} < {length}")
    if spec.causal:
        conds.append(f"{key} <= {row}")
    for cnd in conds:
        val = f"T.Select({cnd}, {val}, T.float32(-np.inf))"
    return val


def _dims(layout: str, b: str, h: str, s: str, d: str) -> str:
    """The shape of a separate q, k, v or out buffer in ``layout`` (TVMScript tuple)."""
    return f"({b}, {s}, {h}, {d})" if layout != "bhsd" else f"({b}, {h}, {s}, {d})"


def _at(spec: AttentionSpec, name: str, h: str, s: str, d: str) -> str:
    """TVMScript of element ``(b, h, s, d)`` of operand ``name`` (``"q"``, ``"k"``, ``"v"`` or ``"out"``, the
    kv head ``h`` for k and v) in ``spec.layout``."""
    if spec.layout == "qkv" and name != "out":
        return f"qkv[{_i('qkv'.index(name))}, b, {s}, {h} * {_i(spec.dim)} + {d}]"
    return f"{name}[b, {s}, {h}, {d}]" if spec.layout != "bhsd" else f"{name}[b, {h}, {s}, {d}]"


def _header(spec: AttentionSpec, name: str, params: list[str], decl: list[str], B: str, S: str, keys: list[str],
            mask_keys: str) -> list[str]:
    """TVMScript: the kernel's signature, size variables and the buffers ``q``, ``keys`` (``(name, shape)``
    lines after q), the mask (last axis ``mask_keys``) and ``out``."""
    H, D = spec.heads, spec.dim
    mshape = [B if spec.mask_dims[0] else _i(1), _i(H) if spec.mask_dims[1] else _i(1),
              S if spec.mask_dims[2] else _i(1), mask_keys]
    qdecl = (f'    qkv = T.match_buffer(var_qkv, ({_i(3)}, {B}, {S}, {_i(H * D)}), "float32")' if spec.layout == "qkv"
             else f'    q = T.match_buffer(var_q, {_dims(spec.layout, B, _i(H), S, _i(D))}, "float32")')
    L_ = ["@T.prim_func(private=True, s_tir=True)", f"def {name}({', '.join(params)}):",
          '    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})', *decl, qdecl, *keys]
    if spec.mask:
        mdt = "bool" if spec.mask == "bool" else "float32"
        L_.append(f'    mask = T.match_buffer(var_mask, ({", ".join(mshape)}), "{mdt}")')
    return [*L_, f'    out = T.match_buffer(var_out, {_dims(spec.layout, B, _i(H), S, _i(D))}, "float32")']


def _source(spec: AttentionSpec) -> str:
    """TVMScript of the fused kernel (the loop nest is the schedule)."""
    H, HK, D, R, KB = spec.heads, spec.kv_heads, spec.dim, spec.rows, KEY_BLOCK
    group = H // HK
    dims = {"B": spec.batch, "S": spec.seq, "LP": spec.keys}
    decl = [f"    {n} = T.int64()" for n, v in dims.items() if v is None]
    if spec.padded:
        decl.append("    L = T.int64()")
    B, S, LP = (v if dims[k] is None else _i(dims[k]) for k, v in (("B", "B"), ("S", "S"), ("LP", "LP")))
    params = ["var_q: T.handle", "var_kt: T.handle", "var_v: T.handle"]
    if spec.mask:
        params.append("var_mask: T.handle")
    params += ["var_out: T.handle", "var_sc: T.handle"]
    L_ = _header(spec, "attention", params, decl, B, S, [
        f'    kt = T.match_buffer(var_kt, ({B}, {_i(HK)}, {_i(D)}, {LP}), "float32")',
        f'    v = T.match_buffer(var_v, ({B}, {_i(HK)}, {"L" if spec.padded else LP}, {_i(D)}), "float32")'], LP)
    L_.append(f'    sc = T.match_buffer(var_sc, ({B}, {_i(H)}, {S}, {LP}), "float32")')
    nrb = f"(({S} + {_i(R - 1)}) // {_i(R)})"
    row = f"T.min(rb * {_i(R)} + r, {S} - T.int64(1))"
    key = f"jb * {_i(KB)} + c"
    val = _score_value(spec, f"acc[r, c] * T.float32({spec.scale!r})", row, key, "L")
    ind = "            "
    nk = "L" if spec.padded else LP  # p v stops at the true key length: padded keys weigh exactly 0
    L_ += [
        '    with T.sblock("root"):',
        f"        for t in T.parallel({B} * {_i(H)} * {nrb}):",
        f"            b = t // ({_i(H)} * {nrb})",
        f"            h = t // {nrb} % {_i(H)}",
        f"            rb = t % {nrb}",
        f"            hk = h // {_i(group)}",
        f'            acc = T.decl_buffer(({_i(R)}, {_i(KB)}), "float32", scope="local")',
        f'            vmx = T.decl_buffer(({_i(R)}, {_i(KB)}), "float32", scope="local")',
        f'            o = T.decl_buffer(({_i(R)}, {_i(D)}), "float32", scope="local")',
        f'            rs = T.decl_buffer(({_i(R)},), "float32", scope="local")',
        *_tile_fill(f"{ind}", "vmx[r, c]", f"{_NEG}", rows=R),
        # 1. scores, scaled and masked, with running 32-lane maxima
        f"{ind}for jb in range({LP} // {_i(KB)}):",
        *_tile_fill(f"{ind}    ", "acc[r, c]", "T.float32(0)", rows=R),
        f"{ind}    for d in range({_i(D)}):",
        f"{ind}        for r in T.unroll({_i(R)}):",
        f"{ind}            for c in T.vectorized({_i(KB)}):",
        f"{ind}                acc[r, c] = acc[r, c] + q[b, h, {row}, d] * kt[b, hk, d, jb * {_i(KB)} + c]",
        *_tile_fill(f"{ind}    ", f"sc[b, h, {row}, {key}]", f"{val}", rows=R),
        f"{ind}            vmx[r, c] = T.max(vmx[r, c], sc[b, h, {row}, {key}])",
        # row maxima; 2. exponentials in place with 32-lane sums (vmx reused for them)
        *_lane_reduce("T.max", ind, R),
        *_tile_fill(f"{ind}", "vmx[r, c]", "T.float32(0)", rows=R),
        # (in place: a clamped duplicate of the last row must not exponentiate it twice)
        f"{ind}for jb in range({LP} // {_i(KB)}):",
        f"{ind}    for r in T.unroll({_i(R)}):",
        f"{ind}        if rb * {_i(R)} + r < {S}:",
        f"{ind}            for c in T.vectorized({_i(KB)}):",
        f"{ind}                sc[b, h, {row}, {key}] = EXP(sc[b, h, {row}, {key}] - rs[r])",
        f"{ind}                vmx[r, c] = vmx[r, c] + sc[b, h, {row}, {key}]",
        *_lane_reduce("T.Add", ind, R),
        f"{ind}for r in T.unroll({_i(R)}):",
        f"{ind}    rs[r] = T.float32(1) / rs[r]",
        # 3. p v
        f"{ind}for r in T.unroll({_i(R)}):",
        f"{ind}    for dd in T.vectorized({_i(D)}):",
        f"{ind}        o[r, dd] = T.float32(0)",
        *_pv(f"{nk} // {_i(PV_UNROLL)}", PV_UNROLL, "", row, D, ind, R),
        *(_pv(f"{nk} % {_i(PV_UNROLL)}", 1, f"{nk} // {_i(PV_UNROLL)} * {_i(PV_UNROLL)} + ", row, D, ind, R)
          if spec.padded else []),
        f"{ind}for r in T.unroll({_i(R)}):",
        f"{ind}    if rb * {_i(R)} + r < {S}:",
        f"{ind}        for dd in T.vectorized({_i(D)}):",
        f"{ind}            out[b, h, {row}, dd] = o[r, dd] * rs[r]",
    ]
    return "\n".join(L_) + "\n"


QMAX = 127  # symmetric int8 codes of q, k and v: -127..127
PMAX = 32767  # int16 codes of the probabilities exp(s - max) (in [0, 1], the row's largest exactly 1)
LOG2E = 1.4426950408889634
PV_CHUNK = 512  # keys per int32 p v sum: 32767 * 127 * 512 < 2^31, so a chunk's sums cannot overflow


def _rne(x: str) -> str:
    return f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.roundeven"), {x}, dtype="float32")'


def _lrint(x: str) -> str:
    """TVMScript: ``x`` rounded to nearest even as an int32 (one ``vcvtps2dq``, not a round and a truncation)."""
    return f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.lrint"), {x}, dtype="int32")'


def _code(x: str) -> str:
    """TVMScript: the int8 code of ``x`` (already divided by its scale), rounded to nearest even and clamped."""
    return f"T.max(T.min({_rne(x)}, T.float32({QMAX})), T.float32({-QMAX}))"


def _pcode_expr(x: Any) -> Any:
    """``32767 * 2^x`` for ``x <= 0`` (a score minus its row's maximum, in log2 units) as a TIR expression, before
    rounding to the int16 probability code: ``2^n * p(r)`` with ``x = n + r``, ``|r| <= 1/2``, ``p`` the degree-5
    Taylor polynomial of ``32767 * 2^r`` (relative error < 3e-6: a tenth of a code).  Below -30 (where the code
    rounds to 0 anyway) the input is clamped, so ``-inf`` (a masked score) gives code 0 with no select; the
    result is at most 32767 (``x = 0`` gives exactly that)."""
    from tvm import tirx

    f32 = "float32"
    x = tirx.max(x, tirx.const(-30.0, f32))
    n = tirx.call_llvm_pure_intrin(f32, "llvm.roundeven", x)
    r = x - n
    coef = [PMAX * math.log(2) ** k / math.factorial(k) for k in range(6)]
    p = tirx.const(coef[5], f32)
    for c in reversed(coef[:5]):
        p = p * r + tirx.const(c, f32)
    # p * 2^n: one vscalefps (llvm.ldexp), not the exponent-field arithmetic
    return tirx.min(tirx.call_llvm_pure_intrin(f32, "llvm.ldexp", p, tirx.Cast("int32", n)),
                    tirx.const(float(PMAX), f32))


def _pv_rows(dim: int) -> int:
    """Rows per ``p v`` register tile of the int8 kernel: at most 16 int32x16 accumulators (of 32 zmm)."""
    r = ROWS
    while r > 1 and r * (dim // 16) > 16:
        r //= 2
    return r


def _amax_lines(ind: str, dst: str, src: str, count: int) -> list[str]:
    """TVMScript lines: ``dst = max |src(d)|`` over ``d < count`` (16-lane partial maxima ``am``, then their max)."""
    return [f"{ind}for l in T.vectorized(T.int64(16)):",
            f"{ind}    am[l] = T.float32(0)",
            f"{ind}for d0 in range({_i(count // 16)}):",
            f"{ind}    for l in T.vectorized(T.int64(16)):",
            f"{ind}        am[l] = T.max(am[l], T.fabs({src.format(d='d0 * T.int64(16) + l')}))",
            *halving_lines(ind, "am[{c}]", "T.max", 16),
            f"{ind}{dst} = T.max(am[T.int64(0)], am[T.int64(1)])"]


def _scale_lines(ind: str, s: str, r: str) -> list[str]:
    """TVMScript lines: the int8 scale ``s = amax / 127`` (1 where the values are all 0) and ``r = 1 / s``."""
    return [f"{ind}{s} = {s} / T.float32({QMAX})",
            f"{ind}if {s} <= T.float32(0):",
            f"{ind}    {s} = T.float32(1)",
            f"{ind}{r} = T.float32(1) / {s}"]


def _source_int8(spec: AttentionSpec) -> str:
    """TVMScript of the int8 kernel (see :func:`attention_kernel`)."""
    from ctc.backends.tvm.int_kernels import _vnni_step

    H, HK, D, R, KB = spec.heads, spec.kv_heads, spec.dim, ROWS, KEY_BLOCK
    D4, D16, RP = D // 4, D // 16, _pv_rows(D)
    decl = [f"    {n} = T.int64()" for n, v in (("B", spec.batch), ("S", spec.seq)) if v is None]
    B = "B" if spec.batch is None else _i(spec.batch)
    S = "S" if spec.seq is None else _i(spec.seq)
    lay = spec.layout
    if lay == "qkv":  # self-attention: the keys are the rows; padded to whole key blocks in the kernel
        LK = S
        LP = _i(-(-spec.seq // KB) * KB) if spec.seq is not None else f"(({S} + {_i(KB - 1)}) // {_i(KB)} * {_i(KB)})"
    elif spec.padded or spec.keys is None:
        decl.append("    L = T.int64()")
        LK = "L"
        LP = _i(spec.keys) if spec.keys is not None else f"((L + {_i(KB - 1)}) // {_i(KB)} * {_i(KB)})"
    else:
        LK = LP = _i(spec.keys)
    params = ["var_qkv: T.handle"] if lay == "qkv" else ["var_q: T.handle", "var_k: T.handle", "var_v: T.handle"]
    if spec.mask:
        params.append("var_mask: T.handle")
        if spec.padded:
            decl.append("    LM = T.int64()")
    params.append("var_out: T.handle")
    L_ = _header(spec, "attention_i8", params, decl, B, S, [] if lay == "qkv" else [
        f'    {n} = T.match_buffer(var_{n}, {_dims(lay, B, _i(HK), LK, _i(D))}, "float32")' for n in "kv"],
        "LM" if spec.padded else LP)
    nrb = f"(({S} + {_i(R - 1)}) // {_i(R)})"
    row = f"T.min(rb * {_i(R)} + r, {S} - T.int64(1))"
    key = f"jb * {_i(KB)} + c"
    # scores in log2 units (the logit scale times log2(e)): the probabilities are then 2^(s - max)
    val = _score_value(spec, f'T.Cast("float32", acc[r * {_i(KB)} + c]) * ks[{key}] * qs[r]', row, key, LK,
                       LOG2E)
    ind = " " * 12
    padded = LK != LP
    # key / value row of lane x (a padded key's row clamped in bounds: its scale is 0, its codes masked to 0)
    kj = "jb * T.int64(16) + kl"
    vj = "j2 * T.int64(2) + e"
    if padded:
        kj, vj = f"T.min({kj}, {LK} - T.int64(1))", f"T.min({vj}, {LK} - T.int64(1))"
    L_ += [
        '    with T.sblock("root"):',
        f"        for t in T.parallel({B} * {_i(H)}):",
        f"            b = t // {_i(H)}",
        f"            h = t % {_i(H)}",
        f"            hk = h // {_i(H // HK)}",
        # per task (one head): its keys and values as int8 in the VNNI layouts, then row blocks of queries
        f'            kp32 = T.decl_buffer(({LP} * {_i(D4)},), "int32")',
        f'            kp = T.decl_buffer(({LP} * {_i(D)},), "int8", data=kp32.data)',
        f'            kq32 = T.decl_buffer(({_i(16 * D4)},), "int32")',
        f'            kq = T.decl_buffer(({_i(16 * D)},), "int8", data=kq32.data)',
        f'            vp = T.decl_buffer(({LP} * {_i(D)},), "int16")',
        '            kr = T.decl_buffer((T.int64(16),), "float32", scope="local")',
        f'            vq = T.decl_buffer(({_i(2 * D)},), "int16", scope="local")',
        f'            of = T.decl_buffer(({_i(RP * D)},), "float32", scope="local")',
        f'            ks = T.decl_buffer(({LP},), "float32")',
        f'            kc = T.decl_buffer(({LP},), "int32")',
        f'            sc = T.decl_buffer(({_i(R)} * {LP},), "float32")',
        f'            pc = T.decl_buffer(({_i(R)} * {LP},), "int16")',
        f'            qu = T.decl_buffer(({_i(R * D)},), "uint8", scope="local")',
        f'            qs = T.decl_buffer(({_i(R)},), "float32", scope="local")',
        f'            pi = T.decl_buffer(({_i(KB)},), "int32", scope="local")',
        f'            vs = T.decl_buffer(({_i(D)},), "float32", scope="local")',
        f'            vr = T.decl_buffer(({_i(D)},), "float32", scope="local")',
        f'            acc = T.decl_buffer(({_i(max(R * KB, RP * D))},), "int32", scope="local")',
        f'            vmx = T.decl_buffer(({_i(R)}, {_i(KB)}), "float32", scope="local")',
        f'            rs = T.decl_buffer(({_i(R)},), "float32", scope="local")',
        '            am = T.decl_buffer((T.int64(16),), "float32", scope="local")',
        '            st = T.decl_buffer((T.int64(2),), "float32", scope="local")',
        '            si = T.decl_buffer((T.int64(1),), "int32", scope="local")',
        # 1. keys, 16 at a time: per key an int8 scale, the codes in the VNNI layout [Lp/16, D/4, 16 keys, 4],
        #    64 codes a vector, and -128 * (sum of the codes) (vpdpbusd of ones), the correction of the
        #    unsigned (+128) query codes; keys past the true length are zero
        f"{ind}for jb in range({LP} // T.int64(16)):",
        f"{ind}    for kl in range(T.int64(16)):",
        f"{ind}        if jb * T.int64(16) + kl < {LK}:",
        *_amax_lines(f"{ind}            ", "st[0]", _at(spec, "k", "hk", "jb * T.int64(16) + kl", "{d}"), D),
        *_scale_lines(f"{ind}            ", "st[0]", "kr[kl]"),
        f"{ind}            ks[jb * T.int64(16) + kl] = st[0]",
        f"{ind}        else:",
        f"{ind}            ks[jb * T.int64(16) + kl] = T.float32(0)",
        f"{ind}            kr[kl] = T.float32(0)",
        f"{ind}    for l in T.vectorized(T.int64(16)):",
        f"{ind}        kc[jb * T.int64(16) + l] = 0",
        f"{ind}    for kl in range(T.int64(16)):",
        f"{ind}        for d in T.vectorized({_i(D)}):",
        f"{ind}            kq[kl * {_i(D)} + d] = "
        f'T.Cast("int8", {_code(_at(spec, "k", "hk", kj, "d") + " * kr[kl]")})',
        f"{ind}    for d4 in range({_i(D4)}):",
        f"{ind}        for kl in T.vectorized(T.int64(16)):",
        f"{ind}            kp32[(jb * {_i(D4)} + d4) * T.int64(16) + kl] = kq32[kl * {_i(D4)} + d4]",
        f"{ind}        kc[T.ramp(jb * T.int64(16), 1, 16)] = " + _vnni_step(
            'kc.vload([jb * T.int64(16)], "int32x16")', "T.broadcast(T.uint8(128), 64)",
            f'kp.vload([(jb * {_i(D4)} + d4) * T.int64(64)], "int8x64")'),
        f"{ind}    for l in T.vectorized(T.int64(16)):",
        f"{ind}        kc[jb * T.int64(16) + l] = T.int32(0) - kc[jb * T.int64(16) + l]",
        # 2. values: one int8 scale per channel (over the head's keys), codes as int16 in [Lp/2, D/16, 16, 2 keys]
        f"{ind}for dd in T.vectorized({_i(D)}):",
        f"{ind}    vs[dd] = T.float32(0)",
        f"{ind}for j in range({LK}):",
        f"{ind}    for dd in T.vectorized({_i(D)}):",
        f"{ind}        vs[dd] = T.max(vs[dd], T.fabs({_at(spec, 'v', 'hk', 'j', 'dd')}))",
        f"{ind}for dd in range({_i(D)}):",
        *_scale_lines(f"{ind}    ", "vs[dd]", "vr[dd]"),
        f"{ind}for j2 in range({LP} // T.int64(2)):",
        f"{ind}    for e in T.unroll(T.int64(2)):",
        f"{ind}        for dd in T.vectorized({_i(D)}):",
        f'{ind}            vq[e * {_i(D)} + dd] = T.Cast("int16", '
        + _code(_at(spec, "v", "hk", vj, "dd") + " * vr[dd]")
        + (f" * T.Select(j2 * T.int64(2) + e < {LK}, T.float32(1), T.float32(0))" if padded else "") + ")",
        f"{ind}    for c2 in T.unroll({_i(D16)}):",
        f"{ind}        for x in T.unroll(T.int64(32)):",
        f"{ind}            vp[(j2 * {_i(D16)} + c2) * T.int64(32) + x] = "
        f"vq[x % T.int64(2) * {_i(D)} + c2 * T.int64(16) + x // T.int64(2)]",
        # 3. per block of R query rows
        f"{ind}for rb in range({nrb}):",
    ]
    ind = " " * 16
    a_q = (f'T.reinterpret(T.broadcast(T.reinterpret(qu.vload([r * {_i(D)} + d4 * T.int64(4)], "uint8x4"), '
           'dtype="int32"), 16), dtype="uint8x64")')
    # the rows' scores and codes in blocks of 32 keys, [Lp/32, R, 32]: a row's offset in a block is a constant
    blk = f"(jb * {_i(R)} + r) * {_i(KB)} + c"
    jb = f"jc * {_i(PV_CHUNK // KB)} + jb"
    j2 = f"({jb}) * {_i(KB // 2)} + c"
    a_p = (f'T.reinterpret(T.broadcast(T.reinterpret(pc.vload([(({jb}) * {_i(R)} + rp * {_i(RP)} + r) * {_i(KB)}'
           ' + c * T.int64(2)], '
           '"int16x2"), dtype="int32"), 16), dtype="int16x32")')
    acc_s = "(r * T.int64(2) + c2) * T.int64(16)"
    acc_o = f"(r * {_i(D16)} + c2) * T.int64(16)"
    L_ += [
        # the rows' query codes (unsigned: int8 + 128) and scales (times the logit scale)
        f"{ind}for r in T.unroll({_i(R)}):",
        *_amax_lines(f"{ind}    ", "st[0]", _at(spec, "q", "h", row, "{d}"), D),
        *_scale_lines(f"{ind}    ", "st[0]", "st[1]"),
        f"{ind}    qs[r] = st[0] * T.float32({spec.scale * LOG2E!r})",
        f"{ind}    for d in T.vectorized({_i(D)}):",
        f'{ind}        qu[r * {_i(D)} + d] = T.Cast("uint8", T.Cast("int32", '
        f'{_code(_at(spec, "q", "h", row, "d") + " * st[1]")}) + 128)',
        *_tile_fill(f"{ind}", "vmx[r, c]", f"{_NEG}"),
        # scores: int32 tiles of R rows x 32 keys by vpdpbusd, dequantized, scaled and masked
        f"{ind}for jb in range({LP} // {_i(KB)}):",
        *_tile_fill(f"{ind}    ", f"acc[r * {_i(KB)} + c]", f"kc[{key}]"),
        f"{ind}    for d4 in range({_i(D4)}):",
        f"{ind}        for r in T.unroll({_i(R)}):",
        f"{ind}            for c2 in T.unroll(T.int64(2)):",
        f"{ind}                acc[T.ramp({acc_s}, 1, 16)] = " + _vnni_step(
            f'acc.vload([{acc_s}], "int32x16")', a_q,
            f'kp.vload([((jb * T.int64(2) + c2) * {_i(D4)} + d4) * T.int64(64)], "int8x64")'),
        *_tile_fill(f"{ind}    ", f"sc[{blk}]", f"{val}"),
        f"{ind}            vmx[r, c] = T.max(vmx[r, c], sc[{blk}])",
        *_lane_reduce("T.max", ind, halving=True),
        # probabilities exp(s - max) in [0, 1] as int16 codes (scale 1/32767), with 32-lane sums of the codes
        # (in int32: exact at any length, and no int16 -> f32 conversion of every code)
        *_tile_fill(f"{ind}", f"acc[r * {_i(KB)} + c]", "T.int32(0)"),
        f"{ind}for jb in range({LP} // {_i(KB)}):",
        f"{ind}    for r in T.unroll({_i(R)}):",
        f"{ind}        for c in T.vectorized({_i(KB)}):",
        f'{ind}            pi[c] = {_lrint(f"PCODE(sc[{blk}] - rs[r])")}',
        f'{ind}            pc[{blk}] = T.Cast("int16", pi[c])',
        f"{ind}            acc[r * {_i(KB)} + c] = acc[r * {_i(KB)} + c] + pi[c]",
        *_tile_fill(f"{ind}", "vmx[r, c]", f'T.Cast("float32", acc[r * {_i(KB)} + c])'),
        *_lane_reduce("T.Add", ind, halving=True),
        f"{ind}for r in T.unroll({_i(R)}):",
        f"{ind}    rs[r] = T.float32(1) / rs[r]",
        # p v: int32 tiles of RP rows x D channels by vpdpwssd (2 keys a step), chunks of PV_CHUNK keys summed
        # in f32, scaled per channel and row
        f"{ind}for rp in range({_i(R // RP)}):",
        f"{ind}    for r in T.unroll({_i(RP)}):",
        f"{ind}        for c in T.vectorized({_i(D)}):",
        f"{ind}            of[r * {_i(D)} + c] = T.float32(0)",
        f"{ind}    for jc in range(({LP} + {_i(PV_CHUNK - 1)}) // {_i(PV_CHUNK)}):",
        f"{ind}        for r in T.unroll({_i(RP)}):",
        f"{ind}            for c in T.vectorized({_i(D)}):",
        f"{ind}                acc[r * {_i(D)} + c] = 0",
        f"{ind}        for jb in range(T.min({LP} // {_i(KB)} - jc * {_i(PV_CHUNK // KB)}, {_i(PV_CHUNK // KB)})):",
        f"{ind}            for c in range({_i(KB // 2)}):",
        f"{ind}                for r in T.unroll({_i(RP)}):",
        f"{ind}                    for c2 in T.unroll({_i(D16)}):",
        f"{ind}                        acc[T.ramp({acc_o}, 1, 16)] = T.call_llvm_pure_intrin("
        f'T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpwssd.512"), acc.vload([{acc_o}], "int32x16"), {a_p}, '
        f'vp.vload([(({j2}) * {_i(D16)} + c2) * T.int64(32)], "int16x32"), dtype="int32x16")',
        f"{ind}        for r in T.unroll({_i(RP)}):",
        f"{ind}            for c in T.vectorized({_i(D)}):",
        f'{ind}                of[r * {_i(D)} + c] = of[r * {_i(D)} + c] + T.Cast("float32", acc[r * {_i(D)} + c])',
        f"{ind}    for r in T.unroll({_i(RP)}):",
        f"{ind}        if rb * {_i(R)} + rp * {_i(RP)} + r < {S}:",
        f"{ind}            for dd in T.vectorized({_i(D)}):",
        f"{ind}                {_at(spec, 'out', 'h', f'rb * {_i(R)} + rp * {_i(RP)} + r', 'dd')} = "
        f'of[r * {_i(D)} + dd] * vs[dd] * rs[rp * {_i(RP)} + r]',
    ]
    return "\n".join(L_) + "\n"


@functools.lru_cache(maxsize=64)
def attention_kernel(spec: AttentionSpec) -> object:
    """The scheduled fused-attention PrimFunc for ``spec`` (raises ``ValueError`` when not covered).

    ``spec.bits == 32``: the f32 kernel of the module doc, ``(q, k^T, v[, mask]) -> (out, scores)``.
    ``spec.bits == 8`` (a CPU with AVX512-VNNI): ``(q, k, v[, mask]) -> out`` with ``k`` and ``v`` as
    stored (``[B, Hk, L, D]``, not transposed or padded), or in ``spec.layout`` (:data:`LAYOUTS`: ``"bshd"``,
    ``(q, k, v[, mask])`` as ``[B, S, H, D]`` and ``out`` too; ``"qkv"``, ``(qkv[, mask])`` with ``qkv`` the
    ``[3, B, S, H * D]`` parts of a merged q|k|v linear and ``out`` ``[B, S, H, D]``), parallel over (batch,
    head): per head, each key is
    quantized to symmetric int8 with its own scale (codes in the ``vpdpbusd`` layout ``[Lp/16, D/4, 16, 4]``),
    each value channel with one scale over the keys (int16 codes in the ``vpdpwssd`` layout ``[Lp/2, D/16,
    16, 2]``); per block of ``ROWS`` query rows, each row is quantized with its own scale and offset to
    unsigned (+128, undone by ``-128 * sum(k codes)`` per key), the int32 scores are dequantized with the two
    scales and the logit scale (times log2(e)), masked and soft-maxed in f32, the probabilities
    ``2^(s - max)`` (in [0, 1], the largest exactly 1) become int16 codes ``round(32767 p)`` and ``p v`` is
    their int32 ``vpdpwssd`` product with the value codes (summed in f32 every ``PV_CHUNK`` keys), times
    the channel's scale over the row's sum of codes.  (u8 probability codes lost too much: see
    docs/tvm-cpu-backend.md, "Integer prefill attention".)
    """
    import numpy as np

    import tvm
    from ctc.backends.tvm.row_kernels import fast_exp_expr
    from tvm.script import tirx as T

    spec.validate()
    src = _source_int8(spec) if spec.bits == 8 else _source(spec)
    return tvm.script.from_source(src, extra_vars={"T": T, "np": np, "EXP": fast_exp_expr, "PCODE": _pcode_expr})
