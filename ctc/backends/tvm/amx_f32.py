"""fp32-accurate matrix products on AMX-BF16 tiles: each f32 operand split into bf16 pieces.

Why: on a Sapphire Rapids core ``tdpbf16ps`` multiplies a 16 x 32 bf16 tile by a 32 x 16 one into
16 x 16 f32 sums per instruction, about 16x the multiply-add rate of AVX-512 FP32; AVX-512 f32 code
cannot get much ahead of ONNX Runtime's MLAS SGEMM, AMX can.  A bf16 value keeps 8 significant bits,
so an f32 ``x`` is written as a sum of pieces, each the round-to-nearest-even bf16 of what the
pieces before it left: ``x = x0 + x1 (+ x2) + r`` with ``|x1| <= 2^-9 |x|``, ``|x2| <= 2^-18 |x|``.
The products of the pieces are exact in f32 and ``tdpbf16ps`` accumulates them in f32 (round to
nearest even), so ``x w`` is the sum of the cross products that matter (the technique of oneDNN's
``fpmath_mode`` / cuBLAS's 3xTF32):

* ``bf16x3``: two pieces, ``x0 w0 + x0 w1 + x1 w0`` (what is dropped, ``x1 w1`` and the second
  pieces' own rounding, is ~2^-17 of the product: about 128x fp32's 2^-24);
* ``bf16x6``: three pieces, the six products with ``i + j <= 2`` (what is dropped is ~2^-26 of the
  product, below fp32's rounding): as accurate as an f32 GEMM.

Weights are split and packed at build time (:func:`prepack`: ``[P, N/16, K/2, 16, 2]`` bf16 bits,
the tile layout ``tdpbf16ps`` reads as its B operand); activations are split at run time by
``split`` (parallel over rows, vectorized), which the linears reading one activation (q, k, v)
share.  ``mm`` is the loop nest it runs (no schedule): parallel over tasks of (a chunk of rows whose
pieces fit in half of L2, 32 output channels), a thread taking consecutive tasks (one chunk, successive
channel blocks); per block of 32 rows tiles 0-3 accumulate the 2 x 2 16 x 16 products over K, pieces
of ``x`` in tiles 4-5, of ``w`` in tiles 6-7, loaded in an order that reloads one operand per product;
the bias and an optional GELU (erf form) are applied on the way out.

``tdpbf16ps`` treats bf16 denormal inputs as zero and flushes denormal sums: a piece below ~1e-38
is lost, which only matters for values far below f32's useful range in a GEMM.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctc.backends.tvm.int_kernels import (
    _amx,
    _as_target,
    _i,
    add_prim_func,
    amx_config_lines,
    amx_permission,
    amx_rows,
    amx_store_lines,
    amx_write_lines,
    target_has_amx,
)

__all__ = ["MODES", "AmxF32Spec", "emit_linear", "plan", "prepack", "run", "split_bf16", "target_has_amx_bf16"]

# fp32_matmul modes on AMX-BF16: name -> number of bf16 pieces per operand
MODES = {"bf16x3": 2, "bf16x6": 3}
BLOCK = 32  # rows and output channels of the micro-kernel (2 x 2 tiles of 16 x 16 f32)
KSTEP = 32  # bf16 values of K one tile row holds (64 bytes)


def target_has_amx_bf16(target: Any = None) -> bool:
    """Whether ``target`` (default: this host) has AMX-BF16 tiles, and this process may use them."""
    return target_has_amx(target, "amx-bf16")


def _products(pieces: int) -> list[tuple[int, int]]:
    """The (activation piece, weight piece) products summed, ordered so that consecutive products share
    one operand (one tile pair reloaded per product)."""
    if pieces == 2:
        return [(1, 0), (0, 0), (0, 1)]
    if pieces == 3:
        return [(2, 0), (1, 0), (1, 1), (0, 1), (0, 2), (0, 0)]
    raise ValueError(f"amx_f32: {pieces} pieces; the modes are {MODES}")


@dataclass(frozen=True)
class AmxF32Spec:
    """One f32 linear shape on AMX-BF16: ``y[m, n] = act(sum_k x[m, k] w[n, k] + bias[n])``."""

    k: int
    n: int
    pieces: int
    gelu: bool = False

    def __post_init__(self) -> None:
        if self.pieces not in MODES.values():
            raise ValueError(f"amx_f32: pieces must be one of {sorted(MODES.values())}, got {self.pieces}")
        if self.k < 1 or self.n < 1:
            raise ValueError(f"amx_f32: k and n must be positive, got k={self.k} n={self.n}")

    @property
    def kp(self) -> int:
        """K padded to whole tile rows (zeros)."""
        return -(-self.k // KSTEP) * KSTEP

    @property
    def np_(self) -> int:
        """N padded to whole blocks (zero weights, outputs not written)."""
        return -(-self.n // BLOCK) * BLOCK

    @property
    def mode(self) -> str:
        return next(name for name, p in MODES.items() if p == self.pieces)

    @property
    def tag(self) -> str:
        return f"k{self.k}_n{self.n}_{self.mode}{'_gelu' if self.gelu else ''}"


# ----------------------------------------------------------------------------- splitting
def _bf16_bits_np(r: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even bf16 bits of f32 ``r`` (the kernel's integer rounding, bit for bit)."""
    u = r.view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def split_bf16(x: np.ndarray, pieces: int) -> np.ndarray:
    """``[pieces, *x.shape]`` bf16 bits (uint16): piece i is the bf16 of what pieces 0..i-1 left of f32 ``x``."""
    r = np.ascontiguousarray(x, np.float32)
    out = []
    for _ in range(pieces):
        h = _bf16_bits_np(r)
        out.append(h)
        r = r - (h.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return np.stack(out)


def prepack(spec: AmxF32Spec, w: np.ndarray) -> np.ndarray:
    """The ``[N, K]`` f32 weight as ``[P, NP/16, KP/2, 16, 2]`` bf16 pieces (uint16 bits), zero padded:
    ``out[p, t, kk, j, e]`` is piece p of ``w[16 t + j, 2 kk + e]``, the B-tile layout of ``tdpbf16ps``."""
    w = np.asarray(w, np.float32)
    if w.shape != (spec.n, spec.k):
        raise ValueError(f"amx_f32.prepack: weight must be [{spec.n}, {spec.k}], got {list(w.shape)}")
    wp = np.zeros((spec.np_, spec.kp), np.float32)
    wp[:spec.n, :spec.k] = w
    s = split_bf16(wp, spec.pieces)  # [P, NP, KP]
    s = s.reshape(spec.pieces, spec.np_ // 16, 16, spec.kp // 2, 2).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(s)


def _bits_expr(v: Any) -> Any:
    """TIR: round-to-nearest-even bf16 bits of f32 ``v`` as uint32 (the low 16 bits)."""
    from tvm import tirx

    u = tirx.reinterpret("uint32", v)
    one, half, sh = tirx.const(1, "uint32"), tirx.const(0x7FFF, "uint32"), tirx.const(16, "uint32")
    return (u + half + ((u >> sh) & one)) >> sh


def _piece_exprs(v: Any, pieces: int) -> list[Any]:
    """TIR: the bf16 bits (uint16) of every piece of f32 ``v``."""
    from tvm import tirx

    out = []
    r = v
    for i in range(pieces):
        b = _bits_expr(r)
        out.append(tirx.Cast("uint16", b))
        if i + 1 < pieces:
            r = r - tirx.reinterpret("float32", b << tirx.const(16, "uint32"))
    return out


def _split_source(spec: AmxF32Spec) -> str:
    """TVMScript of ``split``: ``x [m, K]`` f32 -> ``xs [P, mp, KP]`` bf16 bits, zero rows ``m..mp`` and
    columns ``K..KP`` (the tile loads read whole blocks), parallel over rows, 16 lanes at a time."""
    K, KP, P = spec.k, spec.kp, spec.pieces
    c = "co * T.int64(16) + ci"  # inline: a let-bound index inside the vectorized loop was miscompiled (zeros)
    load = f"x[T.min(r, m - T.int64(1)), {c}]"
    cond = "r < m" if K == KP else f"r < m and {c} < {_i(K)}"
    if K != KP:
        load = f"x[T.min(r, m - T.int64(1)), T.min({c}, {_i(K - 1)})]"
    L = ["@T.prim_func(s_tir=True)",
         "def split(var_x: T.handle, var_xs: T.handle):",
         '    T.func_attr({"tirx.noalias": True})',
         "    m = T.int64()",
         "    mp = T.int64()",
         f'    x = T.match_buffer(var_x, (m, {_i(K)}), "float32")',
         f'    xs = T.match_buffer(var_xs, ({_i(P)}, mp, {_i(KP)}), "uint16")',
         '    with T.sblock("root"):',
         "        for r in T.parallel(mp):",
         f"            for co in range({_i(KP // 16)}):",
         "                for ci in T.vectorized(T.int64(16)):"]
    for p in range(P):
        L.append(f"                    xs[{_i(p)}, r, {c}] = PIECE(T.if_then_else({cond}, {load}, T.float32(0)), {p})")
    return "\n".join(L) + "\n"


# activation bytes (pieces of a chunk of rows) one task walks: half of a Sapphire Rapids core's 2 MB L2.  A task
# is (chunk of rows, 32 channels); a thread takes consecutive tasks, so the chunk stays in L2 over the weight's
# channel blocks.  With every row in one task per channel block, MiniLM's FFN down at seq 384 read its 3.5 MB
# activation pieces from L3 for each of the 12 blocks.
A_CHUNK_BYTES = 1_250_000


def _mm_source(spec: AmxF32Spec) -> str:
    """TVMScript of the tile loop nest (see the module docstring)."""
    KP, N, NP, P = spec.kp, spec.n, spec.np_, spec.pieces
    B = BLOCK
    MB = max(1, A_CHUNK_BYTES // (B * KP * P * 2))  # row blocks per task
    L = ["@T.prim_func(s_tir=True)",
         f'def mm(var_xs: T.handle, wpack: T.Buffer(({_i(P)}, {_i(NP // 16)}, {_i(KP // 2)}, {_i(16)}, {_i(2)}), '
         f'"uint16"), bias: T.Buffer(({_i(NP)},), "float32"), var_y: T.handle):',
         '    T.func_attr({"tirx.noalias": True})',
         "    m = T.int64()",
         "    mp = T.int64()",
         f'    xs = T.match_buffer(var_xs, ({_i(P)}, mp, {_i(KP)}), "uint16")',
         f'    y = T.match_buffer(var_y, (m, {_i(N)}), "float32")',
         '    with T.sblock("root"):',
         f"        for t in T.parallel((mp // {_i(B)} + {_i(MB - 1)}) // {_i(MB)} * {_i(NP // B)}):",
         f"            nb = t % {_i(NP // B)}",
         f"            mc = t // {_i(NP // B)}",
         f'            acc = T.decl_buffer(({_i(B)}, {_i(B)}), "float32", scope="local")']
    ind = "            "
    ind2 = ind + "    "
    ind3 = ind2 + "    "
    L += [*amx_config_lines(ind), f"{ind}for mbi in range(T.min({_i(MB)}, mp // {_i(B)} - mc * {_i(MB)})):",
          f"{ind2}mb = mc * {_i(MB)} + mbi"]
    L += [f"{ind2}{_amx('tilezero', f'T.uint8({t})')}" for t in range(4)]
    L += [f"{ind2}for ks in range({_i(KP // KSTEP)}):",
          f"{ind3}k = ks * {_i(KSTEP)}"]
    a_in = b_in = -1
    for a, b in _products(P):
        if a != a_in:
            for h in (0, 1):
                at = f"T.address_of(xs[{_i(a)}, mb * {_i(B)} + {_i(16 * h)}, k])"
                L.append(ind3 + _amx("tileloadd64", f"T.uint8({4 + h})", at, _i(2 * KP)))
            a_in = a
        if b != b_in:
            for h in (0, 1):
                at = f"T.address_of(wpack[{_i(b)}, nb * {_i(2)} + {_i(h)}, k // {_i(2)}, T.int64(0), T.int64(0)])"
                L.append(ind3 + _amx("tileloadd64", f"T.uint8({6 + h})", at, _i(64)))
            b_in = b
        for i in (0, 1):
            for j in (0, 1):
                L.append(ind3 + _amx("tdpbf16ps", f"T.uint8({2 * i + j})", f"T.uint8({4 + i})", f"T.uint8({6 + j})"))
    # the bias over the whole 32 x 32 block: besides, a read of every element keeps TVM's buffer compaction
    # from shrinking ``acc`` to the region the (predicated) output loop reads, which the tile stores
    # overran (N < 32 or a static m < 32 gave wrong sums)
    L += [*amx_store_lines(ind2),
          f"{ind2}for r in range({_i(B)}):",
          f"{ind2}    for c in T.vectorized({_i(B)}):",
          f"{ind2}        acc[r, c] = acc[r, c] + bias[nb * {_i(B)} + c]",
          *amx_write_lines(ind2, N, "GELU(acc[r, c])" if spec.gelu else "acc[r, c]")]
    L.append(f"{ind}{_amx('tilerelease')}")
    return "\n".join(L) + "\n"


@dataclass(frozen=True)
class AmxF32Kernel:
    """The two PrimFuncs of one spec: ``split`` (activations into pieces) and ``mm`` (the tile product)."""

    spec: AmxF32Spec
    split: Any
    mm: Any

    @property
    def names(self) -> tuple[str, str]:
        """Global names in a Relax module; ``split`` depends on K and the piece count only (shared)."""
        s = self.spec
        return f"ctc_bf16split_k{s.k}_p{s.pieces}", f"ctc_amxf32_{s.tag}"


@functools.lru_cache(maxsize=128)
def _plan(spec: AmxF32Spec) -> AmxF32Kernel:
    import tvm
    from ctc.backends.tvm.row_kernels import gelu_expr
    from tvm.script import tirx as T

    split = tvm.script.from_source(_split_source(spec), extra_vars={"T": T, "PIECE": lambda v, p: _piece_exprs(
        v, spec.pieces)[p]})
    mm = tvm.script.from_source(_mm_source(spec), extra_vars={"T": T, "GELU": gelu_expr})
    return AmxF32Kernel(spec, split.with_attr("tirx.is_scheduled", True), mm.with_attr("tirx.is_scheduled", True))


def plan(spec: AmxF32Spec, target: Any = None) -> AmxF32Kernel:
    """The kernels of ``spec`` for ``target`` (default: this host), which must have AMX-BF16."""
    if not target_has_amx_bf16(target):
        raise ValueError(f"amx_f32: target {_as_target(target)} lacks amx-bf16 (or this process was refused the "
                         "tile registers); fp32_matmul='strict' runs these products in AVX-512 f32")
    return _plan(spec)


_BUILT: dict[Any, Any] = {}


def run(kernel: AmxF32Kernel, x: Any, wpack: np.ndarray, bias: np.ndarray | None = None,
        target: Any = None) -> np.ndarray:
    """Compile (cached) and run ``split`` then ``mm`` on ``x [M, K]`` f32 (tests, benchmarks)."""
    import tvm

    spec = kernel.spec
    tgt = _as_target(target)
    key = (kernel, str(tgt))
    if key not in _BUILT:
        _BUILT[key] = (tvm.compile(tvm.IRModule({"main": kernel.split}), target=tgt),
                       tvm.compile(tvm.IRModule({"main": kernel.mm}), target=tgt))
    fs, fm = _BUILT[key]
    xa = np.ascontiguousarray(np.asarray(x, np.float32))
    if xa.ndim != 2 or xa.shape[1] != spec.k:
        raise ValueError(f"amx_f32.run: x must be [M, {spec.k}], got {list(xa.shape)}")
    if not amx_permission():
        raise RuntimeError("amx_f32.run: this process may not use the AMX tile registers")
    m = xa.shape[0]
    dev = tvm.cpu()
    t = lambda a: tvm.runtime.tensor(np.ascontiguousarray(a), dev)  # noqa: E731
    xs = t(np.zeros((spec.pieces, amx_rows(m), spec.kp), np.uint16))
    fs["main"](t(xa), xs)
    b = np.zeros(spec.np_, np.float32)
    if bias is not None:
        b[:spec.n] = np.asarray(bias, np.float32)
    y = t(np.zeros((m, spec.n), np.float32))
    fm["main"](xs, t(wpack), t(b), y)
    return y.numpy()


def emit_linear(bb: Any, x: Any, wpack: Any, bias: Any, kernel: AmxF32Kernel, *,
                memo: dict[Any, Any] | None = None) -> Any:
    """Emit ``split`` (shared through ``memo`` by linears reading ``x`` with the same K and pieces) and
    ``mm`` for Relax ``x [..., K]`` f32; ``wpack``/``bias`` ([NP] f32) are Relax values.  Leading dims may
    be symbolic; the result is ``[..., N]`` f32."""
    from tvm import relax

    spec = kernel.spec
    ty = x.ty if hasattr(x, "ty") else x.struct_info
    shape = list(ty.shape)
    lead = shape[:-1]
    m = functools.reduce(lambda a, b: a * b, lead) if lead else 1
    xin = x if len(lead) == 1 else bb.emit(relax.op.reshape(x, [m, spec.k]))
    name_s, name_m = kernel.names
    key = ("bf16split", name_s, x)
    if memo is not None and key in memo:
        xs = memo[key]
    else:
        gv_s = add_prim_func(bb, kernel.split, name_s)
        xs = bb.emit(relax.call_tir(gv_s, [xin], relax.TensorType([spec.pieces, amx_rows(m), spec.kp], "uint16")))
        if memo is not None:
            memo[key] = xs
    gv_m = add_prim_func(bb, kernel.mm, name_m)
    y = bb.emit(relax.call_tir(gv_m, [xs, wpack, bias], relax.TensorType([m, spec.n], "float32")))
    if len(lead) != 1:
        y = bb.emit(relax.op.reshape(y, [*lead, spec.n]))
    return y


def with_gelu(spec: AmxF32Spec) -> AmxF32Spec:
    """``spec`` with the GELU (erf form) applied in the kernel's epilogue."""
    return dataclasses.replace(spec, gelu=True)


def padded_bias(spec: AmxF32Spec, bias: np.ndarray | None) -> np.ndarray:
    """``bias`` (or zeros) padded to ``[NP]`` f32."""
    out = np.zeros(spec.np_, np.float32)
    if bias is not None:
        out[:spec.n] = np.asarray(bias, np.float32).reshape(-1)
    return out

