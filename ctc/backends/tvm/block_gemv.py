"""int4/int8 weights x activations quantized per block of 32 (llama.cpp's Q4_1 x Q8_1 idea) on AVX512-VNNI.

Why: a one-row int4 linear that expands every nibble to fp32 and multiplies in fp32
(:mod:`.weight_only`) does more work per weight byte than the int8 VNNI step, so 4-bit weights
were slower than 8-bit ones.  llama.cpp quantizes the activation row to int8 per block of 32
and runs integer dot products.  This module does the same for a ``quant_linear`` whose
activations are dynamic with one cluster per block of 32 input channels (``act_clusters ==
ctc.ir.quant.act_block_clusters(K)``, made by ``gguf-weights a_bits=8`` or ``quantize
a_mode="block"``), integer or float zero points (GGUF Q4_1's block minima):

* ``blk_act`` (per row, per block ``b``): the range ``[min(x_b, 0), max(x_b, 0)]``, ``s_b``,
  ``z_b`` and the u8 codes ``xq`` exactly as :func:`ctc.ir.quant.fake_quant_act_dynamic`
  computes them, plus ``e_b = s_b z_b`` and ``f_b = s_b (sum(xq_b) - 32 z_b)``.
* ``blk_gemv``: parallel over tiles of ``16 * nb`` output rows; per block, ``vpdpbusd`` (u8
  activations x the weight codes as bytes) accumulates ``acc = xq_b . u`` in int32 lanes, one
  lane per output row, four input channels per instruction; the epilogue adds
  ``s_b d acc - e_b (d sum(u)) - f_b (d z')`` in fp32, where the weight is ``w = d (u - z')``
  with unsigned codes ``u`` (int4: the offset-binary nibble, ``z' = w_zero + 8``; int8: the
  signed code, ``z' = w_zero``).  Expanding ``sum (xq - z_b)(u - z')`` gives exactly that, so
  the result equals the op's reference up to fp32 summation order.

Packed layout: ``wpack [T, B, J, nb, 64]`` bytes for tile ``t``, block ``b``, step ``j``: the
``vpdpbusd`` B operand, byte ``4 i + c`` for row ``16 nb' + i`` of the tile.  int4 (``J = 4``):
the low nibble is channel ``32 b + 8 j + c``, the high nibble ``32 b + 8 j + 4 + c`` (one load,
an ``and`` and a shift give two operands); int8 (``J = 8``): channel ``32 b + 4 j + c``.
``pa [T, B, 3, 16 nb]`` holds ``d``, ``d sum(u)``, ``d z'`` per row and block (f32, 12 bytes per 32
weights).  When every ``d`` is a float16 value and ``d z'`` one to f32 rounding (GGUF's Q4_1 and Q8_0
tensors: f16 ``d`` and ``m``, :func:`compact_form`), the table is ``pd`` (f16 ``d``), ``pu`` (i16
``sum(u)``) and ``pz`` (f16 ``d z'``, left out when all 0): 6 or 4 bytes, and ``d sum(u)`` is
computed in the epilogue, exactly the f32 table's value (an f16 value times at most 13 bits).  The
int4 body then reads 22 bytes per 32 weights instead of 28, and a decode step's time is its bytes.

Needs K a multiple of 32, N a multiple of 16, weight groups of a multiple of 32 (or one per row)
and AVX512-VNNI; elsewhere the lowering uses the generic integer kernels (:mod:`.int_kernels`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BlockSpec", "act_func", "block_layout", "compact_form", "gemv_func", "pack"]

BLOCK = 32
SERIAL_ROWS = 4  # blk_act quantizes fewer rows than this on the calling thread (no parallel launch)
_RNE = 'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.roundeven"), {v}, dtype="float32")'
_DP = 'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), {c}, {a}, {b}, ' \
      'dtype="int32x16")'


@dataclass(frozen=True)
class BlockSpec:
    """One linear: ``y [N] = x [K] W^T (+ b)`` with ``bits``-bit weights and ``nb`` 16-row vectors per tile."""

    k: int
    n: int
    bits: int
    nb: int
    has_bias: bool
    outs: tuple[int, ...] = ()  # several linears of one input in one kernel: each one's N (summing to n)
    compact: str = ""  # "": pa f32; "z": pd f16, pu i16, pz f16; "s": pd, pu only (zero points all 0)

    @property
    def blocks(self) -> int:
        return self.k // BLOCK

    @property
    def tiles(self) -> int:
        return self.n // (16 * self.nb)

    @property
    def steps(self) -> int:
        """64-byte weight vectors per block and 16 rows: 4 for int4 (two channel quads each), 8 for int8."""
        return 4 if self.bits <= 4 else 8

    @property
    def tag(self) -> str:
        outs = "_o" + "x".join(str(o) for o in self.outs) if self.outs else ""
        c = f"_c{self.compact}" if self.compact else ""
        return f"k{self.k}_n{self.n}_w{self.bits}_nb{self.nb}{'_b' if self.has_bias else ''}{outs}{c}"


def block_layout(attrs: Any, k: int, n: int) -> str | None:
    """None when a ``quant_linear`` (attributes ``attrs``, K, N) runs on these kernels; else why not."""
    from ctc.ir import quant as Q

    if attrs.get("a_bits") != 8 or not attrs.get("act_dynamic"):
        return "activations are not 8-bit dynamic"
    if tuple(attrs.get("act_clusters") or ()) != Q.act_block_clusters(k):
        return "activation clusters are not blocks of 32"
    if k % BLOCK:
        return f"K={k} is not a multiple of {BLOCK}"
    if n % 16:
        return f"N={n} is not a multiple of 16"
    gs = int(attrs.get("group_size", -1))
    if gs != -1 and gs % BLOCK:
        return f"group_size={gs} is not a multiple of {BLOCK}"
    if int(attrs["w_bits"]) not in (4, 8):
        return f"w_bits={attrs['w_bits']} (4 or 8 only)"
    return None


def spec_for(k: int, n: int | tuple[int, ...], bits: int, has_bias: bool, compact: str = "") -> BlockSpec:
    """The spec with the tile width that leaves enough tiles for the threads (>= 16 when N allows); ``n`` a
    tuple: several linears' outputs in one kernel (the tile width divides each)."""
    outs = n if isinstance(n, tuple) else (n,)
    vs = [o // 16 for o in outs]
    nb = next((c for c in (4, 2) if all(v % c == 0 for v in vs) and sum(vs) // c >= 16), 1)
    return BlockSpec(k, sum(outs), 4 if bits <= 4 else 8, nb, has_bias, outs if len(outs) > 1 else (), compact)


def _block_params(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group_size: int, bits: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row and block of 32: ``d`` (f32), the unsigned codes' sum and ``d z'`` (f64), see the module doc."""
    n, k = q.shape
    b_ = k // BLOCK
    gs = k if group_size == -1 else group_size
    blk_group = (np.arange(b_) * BLOCK) // gs
    d = np.asarray(scale, np.float32).reshape(n, -1)[:, blk_group]  # [N, B]
    z = np.asarray(zero, np.float64).reshape(n, -1)[:, blk_group]
    off = 8.0 if bits <= 4 else 0.0
    usum = (q.astype(np.float64) + off).reshape(n, b_, BLOCK).sum(-1)
    return d, usum, d.astype(np.float64) * (z + off)


def compact_form(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group_size: int, bits: int) -> str:
    """``"s"``/``"z"`` when the per-block parameters fit in half precision without changing the results: every
    ``d`` is a float16 value (GGUF's Q4_1/Q8_0 scales are), so ``d`` times the codes' sum (at most 13 bits) is
    exact in f32 at run time as it was in the f32 table; ``d z'`` (``-m`` of Q4_1) a float16 value to f32
    rounding (relative 2^-20), ``"s"`` when it is 0 everywhere.  ``""`` otherwise (the f32 table)."""
    d, usum, dz = _block_params(q, scale, zero, group_size, bits)
    if not np.array_equal(d.astype(np.float16).astype(np.float32), d) or np.abs(usum).max(initial=0) >= 2 ** 13:
        return ""
    if not dz.any():
        return "s"
    h = dz.astype(np.float16).astype(np.float64)
    if not np.all(np.isfinite(h)) or np.any(np.abs(h - dz) > 2.0 ** -20 * np.abs(dz)):
        return ""
    return "z"


def _i(v: int) -> str:
    return f"T.int64({int(v)})"


# ----------------------------------------------------------------------------- packing
def pack(spec: BlockSpec, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group_size: int
         ) -> dict[str, np.ndarray]:
    """``wpack`` and ``pa`` (see the module doc) from signed codes ``q [N, K]`` (int4: -8..7, int8: -128..127)
    and ``w = (q - zero) * scale`` per group of ``group_size`` (-1: per row)."""
    n, k, nb, t_, b_ = spec.n, spec.k, spec.nb, spec.tiles, spec.blocks
    if q.shape != (n, k):
        raise ValueError(f"block_gemv.pack: codes must be [{n}, {k}], got {list(q.shape)}")
    if spec.bits <= 4:
        u = (q.astype(np.int16) + 8).astype(np.uint8)  # offset-binary nibble 0..15
        quads = u.reshape(n, b_, 4, 2, 4)  # [N, B, j, half, c]
        byte = quads[:, :, :, 0, :] | (quads[:, :, :, 1, :] << 4)  # [N, B, J, c]
    else:
        u = q.astype(np.int8).view(np.uint8)  # the signed code's byte (vpdpbusd's B operand is signed)
        byte = u.reshape(n, b_, 8, 4)
    # [N, B, J, c] -> [T, nb, 16, B, J, c] -> [T, B, J, nb, 16, c]
    w = byte.reshape(t_, nb, 16, b_, spec.steps, 4).transpose(0, 3, 4, 1, 2, 5)
    wpack = np.ascontiguousarray(w.reshape(t_, b_, spec.steps, nb, 64)).astype(np.uint8)
    d, usum, dz = _block_params(q, scale, zero, group_size, spec.bits)  # [N, B] each

    def tiles(a: np.ndarray, dtype: Any) -> np.ndarray:  # [N, B] -> [T, B, nb*16]
        return np.ascontiguousarray(a.reshape(t_, nb * 16, b_).transpose(0, 2, 1).astype(dtype))

    if spec.compact:
        out = {"wpack": wpack, "pd": tiles(d, np.float16), "pu": tiles(usum, np.int16)}
        if spec.compact == "z":
            out["pz"] = tiles(dz, np.float16)
        return out
    pa = np.stack([d.astype(np.float64), d * usum, dz], axis=1)  # [N, 3, B]
    pa = pa.reshape(t_, nb * 16, 3, b_).transpose(0, 3, 2, 1)  # [T, B, 3, nb*16]
    return {"wpack": wpack, "pa": np.ascontiguousarray(pa.astype(np.float32))}


# ----------------------------------------------------------------------------- kernels
@functools.lru_cache(maxsize=128)
def act_func(k: int) -> Any:
    """``(x [m, K] f32, xq [m, K] u8, sx [m, B, 3] f32)``: each row's blocks quantized to u8 (own range),
    ``sx = (s_b, s_b z_b, s_b (sum(xq_b) - 32 z_b))``."""
    import tvm

    b_ = k // BLOCK
    q = ('T.max(T.min(' + _RNE.format(v=f"x[r, b * {_i(BLOCK)} + j] / st[2]") + ' + st[3], T.float32(255)), '
         'T.float32(0))')
    row = [  # one row's blocks (indented for the loop over rows)
        '            vlo = T.decl_buffer((T.int64(16),), "float32", scope="local")',
        '            vhi = T.decl_buffer((T.int64(16),), "float32", scope="local")',
        f'            qf = T.decl_buffer(({_i(BLOCK)},), "float32", scope="local")',
        '            st = T.decl_buffer((T.int64(4),), "float32", scope="local")',
        f"            for b in range({_i(b_)}):",
        "                for l in T.vectorized(T.int64(16)):",
        f"                    vlo[l] = T.min(x[r, b * {_i(BLOCK)} + l], x[r, b * {_i(BLOCK)} + T.int64(16) + l])",
        f"                    vhi[l] = T.max(x[r, b * {_i(BLOCK)} + l], x[r, b * {_i(BLOCK)} + T.int64(16) + l])",
        "                st[0] = T.float32(0)",
        "                st[1] = T.float32(0)",
        "                for l in range(T.int64(16)):",
        "                    st[0] = T.min(st[0], vlo[l])",
        "                    st[1] = T.max(st[1], vhi[l])",
        "                st[2] = (st[1] - st[0]) / T.float32(255)",
        "                st[2] = T.Select(st[2] > T.float32(0), st[2], T.float32(1))",
        "                st[3] = T.max(T.min(" + _RNE.format(v="(T.float32(0) - st[0]) / st[2]")
        + ", T.float32(255)), T.float32(0))",
        f"                for j in T.vectorized({_i(BLOCK)}):",
        f"                    qf[j] = {q}",
        f'                    xq[r, b * {_i(BLOCK)} + j] = T.Cast("uint8", qf[j])',
        "                for l in T.vectorized(T.int64(16)):",
        "                    vlo[l] = qf[l] + qf[T.int64(16) + l]",
        "                st[1] = T.float32(0)",
        "                for l in range(T.int64(16)):",
        "                    st[1] = st[1] + vlo[l]",
        "                sx[r, b, T.int64(0)] = st[2]",
        "                sx[r, b, T.int64(1)] = st[2] * st[3]",
        f"                sx[r, b, T.int64(2)] = st[2] * (st[1] - T.float32({BLOCK}) * st[3])",
    ]
    # a few rows (a decode step's one) run on the calling thread: a parallel launch would cost more than the
    # row (K values) and wake the pool for nothing
    src = "\n".join([
        "@T.prim_func(private=True, s_tir=True)",
        "def blk_act(var_x: T.handle, var_xq: T.handle, var_sx: T.handle):",
        '    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})',
        "    m = T.int64()",
        f'    x = T.match_buffer(var_x, (m, {_i(k)}), "float32")',
        f'    xq = T.match_buffer(var_xq, (m, {_i(k)}), "uint8")',
        f'    sx = T.match_buffer(var_sx, (m, {_i(b_)}, T.int64(3)), "float32")',
        '    with T.sblock("root"):',
        f"        if m < {_i(SERIAL_ROWS)}:",
        "            for r in range(m):",
        *["    " + ln for ln in row],
        "        else:",
        "            for r in T.parallel(m):",
        *["    " + ln for ln in row],
    ]) + "\n"
    return tvm.script.from_source(src)


@functools.lru_cache(maxsize=256)
def gemv_func(spec: BlockSpec) -> Any:
    """``(xq [m, K] u8, sx [m, B, 3], wpack, pa[, bias [N]], y [m, N] f32)``: the integer dot products and
    the per-block epilogue (rows of ``x`` one after another; each tile's weights stay in cache)."""
    import tvm

    k, n, nb, t_, b_, j_ = spec.k, spec.n, spec.nb, spec.tiles, spec.blocks, spec.steps
    w16 = 16 * nb
    params = ["var_xq: T.handle", "var_sx: T.handle",
              f'wpack: T.Buffer(({_i(t_)}, {_i(b_)}, {_i(j_)}, {_i(nb)}, T.int64(64)), "uint8")']
    if spec.compact:
        tb = f"{_i(t_)}, {_i(b_)}, {_i(w16)}"
        params += [f'pd: T.Buffer(({tb}), "float16")', f'pu: T.Buffer(({tb}), "int16")']
        if spec.compact == "z":
            params.append(f'pz: T.Buffer(({tb}), "float16")')
        dd = 'T.Cast("float32", pd[t, b, l])'
        du = f'({dd} * T.Cast("float32", pu[t, b, l]))'  # exact: an f16 value times at most 13 bits
        dz = 'T.Cast("float32", pz[t, b, l])' if spec.compact == "z" else None
    else:
        params.append(f'pa: T.Buffer(({_i(t_)}, {_i(b_)}, T.int64(3), {_i(w16)}), "float32")')
        dd, du, dz = "pa[t, b, T.int64(0), l]", "pa[t, b, T.int64(1), l]", "pa[t, b, T.int64(2), l]"
    if spec.has_bias:
        params.append(f'bias: T.Buffer(({_i(n)},), "float32")')
    outs = spec.outs or (n,)
    params += [f"var_y{i}: T.handle" for i in range(len(outs))]

    def bcast_act(off: str) -> str:
        word = f'T.reinterpret(xq.vload([r, {off}], "uint8x4"), dtype="int32")'
        return f'T.reinterpret(T.broadcast({word}, 16), dtype="uint8x64")'

    L = ["@T.prim_func(private=True, s_tir=True)",
         f"def blk_gemv({', '.join(params)}):",
         '    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})',
         "    m = T.int64()",
         f'    xq = T.match_buffer(var_xq, (m, {_i(k)}), "uint8")',
         f'    sx = T.match_buffer(var_sx, (m, {_i(b_)}, T.int64(3)), "float32")',
         *[f'    y{i} = T.match_buffer(var_y{i}, (m, {_i(o)}), "float32")' for i, o in enumerate(outs)],
         '    with T.sblock("root"):',
         f"        for t in T.parallel({_i(t_)}):",
         f'            acc = T.decl_buffer(({_i(w16)},), "int32", scope="local")',
         f'            ya = T.decl_buffer(({_i(w16)},), "float32", scope="local")',
         "            for r in range(m):",
         f"                for l in T.vectorized({_i(w16)}):",
         "                    ya[l] = T.float32(0)",
         f"                for b in range({_i(b_)}):",
         f"                    for l in T.vectorized({_i(w16)}):",
         "                        acc[l] = 0",
         f"                    for j in T.unroll({_i(j_)}):"]
    if spec.bits <= 4:
        lo_x = bcast_act(f"b * {_i(BLOCK)} + j * T.int64(8)")
        hi_x = bcast_act(f"b * {_i(BLOCK)} + j * T.int64(8) + T.int64(4)")
        L += [f"                        for v in T.unroll({_i(nb)}):"]
        wv = 'wpack.vload([t, b, j, v, T.int64(0)], "uint8x64")'
        lo_w = f'T.reinterpret(T.bitwise_and({wv}, T.broadcast(T.uint8(15), 64)), dtype="int8x64")'
        hi_w = f'T.reinterpret(T.shift_right({wv}, T.broadcast(T.uint8(4), 64)), dtype="int8x64")'
        cur = 'acc.vload([v * T.int64(16)], "int32x16")'
        L += ["                            acc[T.ramp(v * T.int64(16), 1, 16)] = "
              + _DP.format(c=_DP.format(c=cur, a=lo_x, b=lo_w), a=hi_x, b=hi_w)]
    else:
        xa = bcast_act(f"b * {_i(BLOCK)} + j * T.int64(4)")
        wv = 'T.reinterpret(wpack.vload([t, b, j, v, T.int64(0)], "uint8x64"), dtype="int8x64")'
        cur = 'acc.vload([v * T.int64(16)], "int32x16")'
        L += [f"                        for v in T.unroll({_i(nb)}):",
              "                            acc[T.ramp(v * T.int64(16), 1, 16)] = " + _DP.format(c=cur, a=xa, b=wv)]
    L += [f"                    for l in T.vectorized({_i(w16)}):",
          f'                        ya[l] = ya[l] + sx[r, b, T.int64(0)] * {dd} * T.Cast("float32", acc[l]) - '
          f"sx[r, b, T.int64(1)] * {du}" + (f" - sx[r, b, T.int64(2)] * {dz}" if dz else ""),
          *_write_rows(outs, w16, spec.has_bias)]
    return tvm.script.from_source("\n".join(L) + "\n")


def _write_rows(outs: tuple[int, ...], w16: int, has_bias: bool) -> list[str]:
    """The tile's results into its output: ``y0`` alone, or the output whose tile range holds ``t``."""
    lines: list[str] = []
    first = 0
    for i, o in enumerate(outs):
        tiles = o // w16
        ind = "                " + "    " * i
        if i < len(outs) - 1:
            lines.append(f"{ind}if t < {_i(first + tiles)}:")
            ind += "    "
        lines += [f"{ind}for l in T.vectorized({_i(w16)}):",
                  f"{ind}    y{i}[r, (t - {_i(first)}) * {_i(w16)} + l] = ya[l]"
                  + (f" + bias[t * {_i(w16)} + l]" if has_bias else "")]
        if i < len(outs) - 1:
            lines.append("                " + "    " * i + "else:")
        first += tiles
    return lines


# ----------------------------------------------------------------------------- lowering
def _param_names(ctx: Any, node: Any) -> dict[str, str | None]:
    """The parameter behind each operand (None for computed ones), also before its ``param`` node is lowered."""
    out: dict[str, str | None] = {}
    for nm, v in node.named_operands().items():
        p = getattr(v, "producer", None)
        out[nm] = p.attrs["name"] if p is not None and p.op == "param" else ctx.param_name(v)
    return out


def _siblings(ctx: Any, node: Any, k: int, bits: int) -> list[Any]:
    """The other ``quant_linear`` nodes not lowered yet that read ``node``'s input in the same block form
    (parameter weights of the same width, no bias): q, k and v of an attention, gate and up of an FFN."""
    from ctc.backends.tvm.siblings import sibling_linears

    def accept(u: Any) -> bool:
        if u.op != "quant_linear" or u.operand("bias") is not None:
            return False
        if id(u.outputs[0]) in ctx.env or id(u.outputs[0]) in ctx.absorbed:
            return False
        pn = _param_names(ctx, u)
        if any(pn.get(nm) is None for nm in ("qweight", "w_scale", "w_zero")) or int(u.attrs["w_bits"]) != bits:
            return False
        return block_layout(u.attrs, k, int(ctx.param_array(pn["qweight"]).shape[0])) is None

    return sibling_linears(node, accept)


def lower_block_linear(ctx: Any, node: Any, ops: Any, pnames: dict[str, str | None]) -> Any | None:
    """Lower a ``quant_linear`` with per-block dynamic activations through ``blk_act`` + ``blk_gemv``;
    None when the node does not have that form, its operands are not parameters, or the target lacks
    AVX512-VNNI (the caller then uses the generic integer kernels).

    The input is quantized once for every linear reading it, and the linears of one input without a
    bias (q, k, v; gate, up) run as one kernel over their weights side by side (one parallel launch,
    more tiles to share between the threads); the others' results are handed to the lowering as
    computed (``ctx.absorbed``)."""
    from ctc.backends.tvm.int_kernels import add_prim_func, target_has_vnni
    from ctc.ir import quant as Q

    xv = node.operand("x")
    k = int(xv.type.shape[-1])
    if any(pnames.get(nm) is None for nm in ("qweight", "w_scale", "w_zero")):
        return None
    n = int(ctx.param_array(pnames["qweight"]).shape[0])
    if block_layout(node.attrs, k, n) is not None or not target_has_vnni(ctx.target):
        return None
    has_bias = node.operand("bias") is not None
    if has_bias and pnames.get("bias") is None:
        return None
    bits = int(node.attrs["w_bits"])
    group = [node] + ([] if has_bias else _siblings(ctx, node, k, bits))
    names = [pnames] + [_param_names(ctx, u) for u in group[1:]]
    ns = tuple(int(ctx.param_array(pn["qweight"]).shape[0]) for pn in names)  # type: ignore[arg-type]
    import torch

    codes = [Q.unpack_weight(torch.from_numpy(ctx.param_array(pn["qweight"])), bits, k).numpy()  # type: ignore[arg-type]
             for pn in names]
    forms = {compact_form(q, ctx.param_array(pn["w_scale"]), ctx.param_array(pn["w_zero"]),  # type: ignore[arg-type]
                          int(u.attrs["group_size"]), bits) for q, pn, u in zip(codes, names, group, strict=True)}
    compact = "" if "" in forms else ("s" if forms == {"s"} else "z")
    spec = spec_for(k, ns if len(group) > 1 else ns[0], bits, has_bias, compact)
    key = f"blk_{spec.tag}_" + "_".join(str(pn[m]) for pn in names for m in ("qweight", "w_scale", "w_zero"))
    if key not in ctx.memo:
        parts = [pack(BlockSpec(k, nn, spec.bits, spec.nb, has_bias, (), spec.compact), q,
                      ctx.param_array(pn["w_scale"]), ctx.param_array(pn["w_zero"]),  # type: ignore[arg-type]
                      int(u.attrs["group_size"])) for u, pn, nn, q in zip(group, names, ns, codes, strict=True)]
        ctx.memo[key] = {nm: np.ascontiguousarray(np.concatenate([p[nm] for p in parts], axis=0)) for nm in parts[0]}
    packed = ctx.memo[key]
    # the packed codes depend on the integer weights only (a tied weight is bound once); the per-block
    # parameters on scales/zeros too
    wtag = "_".join(str(pn["qweight"]) for pn in names[1:])
    wpack = ctx.param(pnames["qweight"], f"blk_pack_{bits}_{spec.nb}" + (f"_with_{wtag}" if wtag else ""),
                      array=packed["wpack"])
    tables = [ctx.param(pnames["w_scale"], f"{key}_{nm}", array=arr) for nm, arr in packed.items() if nm != "wpack"]
    relax, op = ctx.relax, ctx.relax.op
    xt = xv.type
    x = ops["x"]
    lead = ctx.shape_of(xv)[:-1]
    m: Any = 1
    for dim in lead:
        m = m * dim
    act_key = ("blk_act", xv)  # linears reading one activation (q, k, v; gate, up) quantize it once
    if act_key not in ctx.memo:
        xf = x if xt.dtype == "f32" else ctx.emit(op.astype(x, "float32"))
        x2 = ctx.emit(op.reshape(xf, [m, k]))
        gv_a = add_prim_func(ctx.bb, act_func(k), f"ctc_blk_act_k{k}")
        qs = ctx.emit(relax.call_tir(gv_a, [x2], [relax.TensorType([m, k], "uint8"),
                                                  relax.TensorType([m, k // BLOCK, 3], "float32")]))
        ctx.memo[act_key] = (ctx.emit(relax.TupleGetItem(qs, 0)), ctx.emit(relax.TupleGetItem(qs, 1)))
    xq, sx = ctx.memo[act_key]
    gv_g = add_prim_func(ctx.bb, gemv_func(spec), f"ctc_blk_gemv_{spec.tag}")
    args = [xq, sx, wpack, *tables]
    if has_bias:
        b = ops["bias"]
        args.append(b if node.operand("bias").type.dtype == "f32" else ctx.emit(op.astype(b, "float32")))
    from ctc.backends.tvm.lower import _dt

    res = ctx.emit(relax.call_tir(gv_g, args, [relax.TensorType([m, nn], "float32") for nn in ns]
                                  if len(ns) > 1 else relax.TensorType([m, ns[0]], "float32")))
    results = []
    for i, u in enumerate(group):
        y = ctx.emit(relax.TupleGetItem(res, i)) if len(ns) > 1 else res
        y = op.reshape(y, ctx.shape_of(u.outputs[0]))
        if xt.dtype != "f32":
            y = op.astype(ctx.emit(y), _dt(xt))
        results.append(y)
    for u, y in zip(group[1:], results[1:], strict=True):
        ctx.absorbed[id(u.outputs[0])] = ctx.emit(y)
    ctx.int_kernels += len(group)
    return results[0]
