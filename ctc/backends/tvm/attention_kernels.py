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
from dataclasses import dataclass

__all__ = ["AttentionSpec", "KEY_BLOCK", "attention_kernel"]

KEY_BLOCK = 32  # keys per score tile (2 x 16 f32 lanes); the padded key length is a multiple of it
ROWS = 8  # query rows per task (the register tiles: 8 x 32 scores, 8 x D outputs)
PV_UNROLL = 4  # keys per step of the p v loop (one step per key: pointer bumps and loop overhead cost ~5%)


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

    @property
    def name(self) -> str:
        """A stable PrimFunc name for this spec (the same in every process: no Python hash)."""
        m = "" if self.mask is None else f"_m{self.mask[0]}{''.join('1' if f else '0' for f in self.mask_dims)}"
        sizes = "_".join(str(v) if v is not None else "n" for v in (self.batch, self.seq, self.keys))
        flags = ("c" if self.causal else "") + ("p" if self.padded else "")
        return (f"ctc_attention_h{self.heads}k{self.kv_heads}d{self.dim}{m}{'_' + flags if flags else ''}_{sizes}"
                f"_s{self.scale!r}".replace(".", "p").replace("-", "m").replace("+", ""))

    def validate(self) -> None:
        """Raise ``ValueError`` for shapes the kernel does not cover (the caller falls back)."""
        if self.dim % 16:
            raise ValueError(f"attention kernel: head dim {self.dim} must be a multiple of 16")
        if self.heads % self.kv_heads:
            raise ValueError(f"attention kernel: {self.heads} query heads do not group over {self.kv_heads} kv heads")
        if self.keys is not None and self.keys % KEY_BLOCK:
            raise ValueError(f"attention kernel: padded key length {self.keys} must be a multiple of {KEY_BLOCK}")


def _i(v: int) -> str:
    return f"T.int64({int(v)})"


_NEG = "T.float32(-3.4028234663852886e38)"


def _lane_reduce(op: str, ind: str) -> list[str]:
    """TVMScript lines: ``rs[r] = op`` over the ``KEY_BLOCK`` lanes of ``vmx[r]`` (LLVM vectorizes the loop)."""
    init = _NEG if op == "T.max" else "T.float32(0)"
    return [f"{ind}for r in range({_i(ROWS)}):", f"{ind}    rs[r] = {init}",
            f"{ind}    for c in range({_i(KEY_BLOCK)}):", f"{ind}        rs[r] = {op}(rs[r], vmx[r, c])"]


def _pv(count: str, unroll: int, start: str, row: str, dim: int, ind: str) -> list[str]:
    """TVMScript lines: ``o[r] += p[r, j] v[j]`` for ``count`` groups of ``unroll`` keys from key ``start``."""
    j = f"{start}j0 * {_i(unroll)} + j1"
    return [f"{ind}for j0 in range({count}):",
            f"{ind}    for j1 in T.unroll({_i(unroll)}):",
            f"{ind}        for r in T.unroll({_i(ROWS)}):",
            f"{ind}            for dd in T.vectorized({_i(dim)}):",
            f"{ind}                o[r, dd] = o[r, dd] + sc[b, h, {row}, {j}] * v[b, hk, {j}, dd]"]


def _source(spec: AttentionSpec) -> str:
    """TVMScript of the fused kernel (the loop nest is the schedule)."""
    H, HK, D, R, KB = spec.heads, spec.kv_heads, spec.dim, ROWS, KEY_BLOCK
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
    mshape = [B if spec.mask_dims[0] else _i(1), _i(H) if spec.mask_dims[1] else _i(1),
              S if spec.mask_dims[2] else _i(1), LP]
    L_ = [
        "@T.prim_func(private=True, s_tir=True)",
        f"def attention({', '.join(params)}):",
        '    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})',
        *decl,
        f'    q = T.match_buffer(var_q, ({B}, {_i(H)}, {S}, {_i(D)}), "float32")',
        f'    kt = T.match_buffer(var_kt, ({B}, {_i(HK)}, {_i(D)}, {LP}), "float32")',
        f'    v = T.match_buffer(var_v, ({B}, {_i(HK)}, {"L" if spec.padded else LP}, {_i(D)}), "float32")',
    ]
    if spec.mask:
        mdt = "bool" if spec.mask == "bool" else "float32"
        L_.append(f'    mask = T.match_buffer(var_mask, ({", ".join(mshape)}), "{mdt}")')
    L_ += [f'    out = T.match_buffer(var_out, ({B}, {_i(H)}, {S}, {_i(D)}), "float32")',
           f'    sc = T.match_buffer(var_sc, ({B}, {_i(H)}, {S}, {LP}), "float32")']
    nrb = f"(({S} + {_i(R - 1)}) // {_i(R)})"
    row = f"T.min(rb * {_i(R)} + r, {S} - T.int64(1))"
    key = f"jb * {_i(KB)} + c"
    val = f"acc[r, c] * T.float32({spec.scale!r})"
    if spec.mask == "float":
        mi = ", ".join([("b" if spec.mask_dims[0] else "T.int64(0)"), ("h" if spec.mask_dims[1] else "T.int64(0)"),
                        (row if spec.mask_dims[2] else "T.int64(0)"), key])
        val = f"{val} + mask[{mi}]"
    conds = []
    if spec.mask == "bool":
        mi = ", ".join([("b" if spec.mask_dims[0] else "T.int64(0)"), ("h" if spec.mask_dims[1] else "T.int64(0)"),
                        (row if spec.mask_dims[2] else "T.int64(0)"), key])
        conds.append(f"mask[{mi}]")
    if spec.padded:
        conds.append(f"{key} < L")
    if spec.causal:
        conds.append(f"{key} <= {row}")
    for cnd in conds:
        val = f"T.Select({cnd}, {val}, T.float32(-np.inf))"
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
        f"{ind}for r in T.unroll({_i(R)}):",
        f"{ind}    for c in T.vectorized({_i(KB)}):",
        f"{ind}        vmx[r, c] = {_NEG}",
        # 1. scores, scaled and masked, with running 32-lane maxima
        f"{ind}for jb in range({LP} // {_i(KB)}):",
        f"{ind}    for r in T.unroll({_i(R)}):",
        f"{ind}        for c in T.vectorized({_i(KB)}):",
        f"{ind}            acc[r, c] = T.float32(0)",
        f"{ind}    for d in range({_i(D)}):",
        f"{ind}        for r in T.unroll({_i(R)}):",
        f"{ind}            for c in T.vectorized({_i(KB)}):",
        f"{ind}                acc[r, c] = acc[r, c] + q[b, h, {row}, d] * kt[b, hk, d, jb * {_i(KB)} + c]",
        f"{ind}    for r in T.unroll({_i(R)}):",
        f"{ind}        for c in T.vectorized({_i(KB)}):",
        f"{ind}            sc[b, h, {row}, {key}] = {val}",
        f"{ind}            vmx[r, c] = T.max(vmx[r, c], sc[b, h, {row}, {key}])",
        # row maxima; 2. exponentials in place with 32-lane sums (vmx reused for them)
        *_lane_reduce("T.max", ind),
        f"{ind}for r in T.unroll({_i(R)}):",
        f"{ind}    for c in T.vectorized({_i(KB)}):",
        f"{ind}        vmx[r, c] = T.float32(0)",
        # (in place: a clamped duplicate of the last row must not exponentiate it twice)
        f"{ind}for jb in range({LP} // {_i(KB)}):",
        f"{ind}    for r in T.unroll({_i(R)}):",
        f"{ind}        if rb * {_i(R)} + r < {S}:",
        f"{ind}            for c in T.vectorized({_i(KB)}):",
        f"{ind}                sc[b, h, {row}, {key}] = EXP(sc[b, h, {row}, {key}] - rs[r])",
        f"{ind}                vmx[r, c] = vmx[r, c] + sc[b, h, {row}, {key}]",
        *_lane_reduce("T.Add", ind),
        f"{ind}for r in T.unroll({_i(R)}):",
        f"{ind}    rs[r] = T.float32(1) / rs[r]",
        # 3. p v
        f"{ind}for r in T.unroll({_i(R)}):",
        f"{ind}    for dd in T.vectorized({_i(D)}):",
        f"{ind}        o[r, dd] = T.float32(0)",
        *_pv(f"{nk} // {_i(PV_UNROLL)}", PV_UNROLL, "", row, D, ind),
        *(_pv(f"{nk} % {_i(PV_UNROLL)}", 1, f"{nk} // {_i(PV_UNROLL)} * {_i(PV_UNROLL)} + ", row, D, ind)
          if spec.padded else []),
        f"{ind}for r in T.unroll({_i(R)}):",
        f"{ind}    if rb * {_i(R)} + r < {S}:",
        f"{ind}        for dd in T.vectorized({_i(D)}):",
        f"{ind}            out[b, h, {row}, dd] = o[r, dd] * rs[r]",
    ]
    return "\n".join(L_) + "\n"


@functools.lru_cache(maxsize=64)
def attention_kernel(spec: AttentionSpec) -> object:
    """The scheduled fused-attention PrimFunc for ``spec`` (raises ``ValueError`` when not covered)."""
    import numpy as np

    import tvm
    from ctc.backends.tvm.row_kernels import fast_exp_expr
    from tvm.script import tirx as T

    spec.validate()
    return tvm.script.from_source(_source(spec), extra_vars={"T": T, "np": np, "EXP": fast_exp_expr})
