"""Weight-only ``quant_linear`` on CPUs: int4/int8 weights kept packed in memory, fp32 activations.

Why: a decode step is bound by the bytes of weights it streams.  Dequantizing a weight-only
``quant_linear`` at build time (what the lowering did before) stores fp32 weights again, so
4-bit weights saved nothing at run time.  Here the weights stay 4 (or 8) bits in the library and
are expanded in registers inside the kernel:

* **GEMV** (one activation row: a decode step): :func:`gemv_func` builds a hand-written TIR
  kernel per shape, parallel over output rows.  For each row, each group of ``group_size``
  input channels accumulates ``q . x`` in 16 fp32 vector lanes from the packed bytes (int4: one
  16-byte load gives 32 weights, low nibbles the first 16 and high nibbles the next 16, as in
  GGML's Q4 blocks; int8: 16 bytes give 16 weights), then applies the group's scale once
  (``acc += s_g * (q . x)_g``) and its offset through the group's activation sum
  (``y += m_g * sum(x_g)``), so ``y = sum_g s_g q_g . x_g + m_g sum(x_g)``.
* **GEMM** (several rows: prefill): the packed weight is expanded into an fp32 ``[K, N]``
  work buffer by :func:`dequant_kn_te` (a vectorized elementwise kernel, ``O(N K)`` per call)
  and multiplied by the default matmul schedule (``O(M N K)``); the stored weights stay packed.

The affine form ``w = q_u * s + m`` covers every weight convention ctc reads: signed ``q`` with
integer zero points (:mod:`ctc.ir.quant`: ``w = (q - z) s``, so ``m = -(z + offset) s`` with the
int4 nibble offset 8) and the float zero points of ``quant_linear`` weight-only nodes (GGUF Q4_1's
per-block minimum, :mod:`ctc.frontends.gguf`).

Packed layout (``pack``): ``wpack [N, K/2] u8`` for int4 -- block ``b`` of 32 input channels
is 16 bytes, byte ``j`` = element ``32 b + j`` (low nibble) | element ``32 b + 16 + j`` (high),
nibbles unsigned 0..15 -- or ``[N, K] i8`` for int8; ``scale``/``offset [N, G] f32``.
K and the group size must be multiples of 32 (the lowering falls back otherwise, with a note).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["WeightOnlySpec", "dequant_kn_te", "gemv_func", "pack", "supported"]

LANES = 16
BLOCK = 32  # input channels per packed block (int4: 16 bytes)


@dataclass(frozen=True)
class WeightOnlySpec:
    """Static facts of one weight-only linear: ``y [N] = x [K] W^T + b`` with ``bits``-bit weights
    in groups of ``group`` input channels (``group == k`` for per-output-channel scales)."""

    k: int
    n: int
    bits: int
    group: int
    has_bias: bool

    @property
    def groups(self) -> int:
        return -(-self.k // self.group)

    @property
    def int4(self) -> bool:
        return self.bits <= 4

    @property
    def tag(self) -> str:
        return f"k{self.k}_n{self.n}_w{self.bits}_g{self.group}{'_b' if self.has_bias else ''}"


def supported(k: int, group_size: int) -> str | None:
    """None when the kernels cover ``k`` input channels in groups of ``group_size`` (-1: per row);
    else why not (the lowering then dequantizes at build time and says so)."""
    g = k if group_size == -1 else group_size
    if k % BLOCK:
        return f"K={k} is not a multiple of {BLOCK}"
    if g % BLOCK:
        return f"group_size={group_size} is not a multiple of {BLOCK}"
    return None


def spec_of(k: int, n: int, bits: int, group_size: int, has_bias: bool) -> WeightOnlySpec:
    """The spec of a ``quant_linear`` (raises ValueError when :func:`supported` says no)."""
    why = supported(k, group_size)
    if why is not None:
        raise ValueError(f"weight_only: {why}")
    return WeightOnlySpec(k, n, int(bits), k if group_size == -1 else min(int(group_size), k), has_bias)


# ----------------------------------------------------------------------------- packing
def pack(spec: WeightOnlySpec, q: np.ndarray, scale: np.ndarray, zero: np.ndarray
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(wpack, scale [N, G] f32, offset [N, G] f32)`` from signed integer weights ``q [N, K]``
    (values in the ``bits``-bit signed range) and ``w = (q - zero) * scale`` per group (``zero``
    integer or float)."""
    n, k = spec.n, spec.k
    if q.shape != (n, k):
        raise ValueError(f"weight_only.pack: q must be [{n}, {k}], got {list(q.shape)}")
    s = np.asarray(scale, np.float32).reshape(n, spec.groups)
    z = np.asarray(zero, np.float64).reshape(n, spec.groups)
    if spec.int4:
        qu = (q.astype(np.int16) + 8).astype(np.uint8)  # offset binary nibbles 0..15
        if qu.max(initial=0) > 15:
            raise ValueError("weight_only.pack: int4 values must lie in [-8, 7]")
        blk = qu.reshape(n, k // BLOCK, 2, 16)
        wpack = (blk[:, :, 0, :] | (blk[:, :, 1, :] << 4)).reshape(n, k // 2).astype(np.uint8)
        offset = (-(z + 8.0) * s).astype(np.float32)
    else:
        wpack = q.astype(np.int8)
        offset = (-z * s).astype(np.float32)
    return np.ascontiguousarray(wpack), np.ascontiguousarray(s), np.ascontiguousarray(offset)


# ----------------------------------------------------------------------------- GEMV kernel
def _i(v: int) -> str:
    return f"T.int64({int(v)})"


def _gemv_source(spec: WeightOnlySpec, with_offset: bool) -> str:
    """TVMScript of the one-row kernel (per-group loops written out: the last group may be short)."""
    K, N, G, NG = spec.k, spec.n, spec.group, spec.groups
    wshape = f"({_i(N)}, {_i(K // 2)})" if spec.int4 else f"({_i(N)}, {_i(K)})"
    wdt = "uint8" if spec.int4 else "int8"
    params = [f'x: T.Buffer(({_i(K)},), "float32")', f'wpack: T.Buffer({wshape}, "{wdt}")',
              f'scale: T.Buffer(({_i(N)}, {_i(NG)}), "float32")', f'offset: T.Buffer(({_i(N)}, {_i(NG)}), "float32")']
    if spec.has_bias:
        params.append(f'bias: T.Buffer(({_i(N)},), "float32")')
    params.append(f'y: T.Buffer(({_i(N)},), "float32")')
    L = ["@T.prim_func(private=True, s_tir=True)",
         f"def wo_gemv({', '.join(params)}):",
         '    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})',
         '    with T.sblock("root"):',
         f'        xs = T.alloc_buffer(({_i(NG)},), "float32")']
    if with_offset:  # activation sum of every group, once per call (all rows share it)
        L += [f"        for g in range({_i(NG)}):",
              "            xs[g] = T.float32(0)",
              f"            for kk in range({_i(G)}):",
              f"                if g * {_i(G)} + kk < {_i(K)}:",
              f"                    xs[g] = xs[g] + x[g * {_i(G)} + kk]"]
    L += [f"        for n in T.parallel({_i(N)}):",
          f'            acc = T.decl_buffer(({_i(LANES)},), "float32", scope="local")',
          f'            part = T.decl_buffer(({_i(LANES)},), "float32", scope="local")',
          '            tot = T.decl_buffer((T.int64(1),), "float32", scope="local")',
          f"            for l in T.vectorized({_i(LANES)}):",
          "                acc[l] = T.float32(0)",
          "            tot[0] = T.float32(0)"]
    full, last = K // G, K % G
    spans = []
    if full:
        spans.append(("g", full, G))
    if last:
        spans.append((str(full), 1, last))
    for gexpr, count, length in spans:
        ind = "            "
        g = "g"
        if count > 1 or gexpr == "g":
            L.append(f"{ind}for g in range({_i(count)}):")
            ind += "    "
        else:
            g = _i(int(gexpr))
        k0 = f"{g} * {_i(G)}"
        nb = length // BLOCK
        L += [f"{ind}for l in T.vectorized({_i(LANES)}):",
              f"{ind}    part[l] = T.float32(0)",
              f"{ind}for b in range({_i(nb)}):"]
        if spec.int4:
            byte = f"wpack[n, ({k0}) // T.int64(2) + b * {_i(16)} + l]"
            L += [f"{ind}    for l in T.vectorized({_i(LANES)}):",
                  f"{ind}        part[l] = part[l] + T.Cast(\"float32\", {byte} & T.uint8(15)) * "
                  f"x[{k0} + b * {_i(BLOCK)} + l] + T.Cast(\"float32\", T.shift_right({byte}, T.uint8(4))) * "
                  f"x[{k0} + b * {_i(BLOCK)} + {_i(16)} + l]"]
        else:
            for h in (0, 16):
                L += [f"{ind}    for l in T.vectorized({_i(LANES)}):",
                      f"{ind}        part[l] = part[l] + T.Cast(\"float32\", wpack[n, {k0} + b * {_i(BLOCK)} + "
                      f"{_i(h)} + l]) * x[{k0} + b * {_i(BLOCK)} + {_i(h)} + l]"]
        L += [f"{ind}for l in T.vectorized({_i(LANES)}):",
              f"{ind}    acc[l] = acc[l] + part[l] * scale[n, {g}]"]
        if with_offset:
            L.append(f"{ind}tot[0] = tot[0] + offset[n, {g}] * xs[{g}]")
    L += [f"            for l in range({_i(LANES)}):",
          "                tot[0] = tot[0] + acc[l]",
          "            y[n] = tot[0]" + (" + bias[n]" if spec.has_bias else "")]
    return "\n".join(L) + "\n"


@functools.lru_cache(maxsize=256)
def gemv_func(spec: WeightOnlySpec, with_offset: bool = True) -> Any:
    """The one-row PrimFunc ``(x [K], wpack, scale, offset[, bias], y [N])`` (scheduled, opaque to fusion).
    ``with_offset=False`` drops the offset term (symmetric int8 weights: every offset is 0)."""
    import tvm

    return tvm.script.from_source(_gemv_source(spec, with_offset))


# ----------------------------------------------------------------------------- GEMM (prefill)
def dequant_kn_te(spec: WeightOnlySpec) -> Any:
    """A TE function ``(wpack, scale, offset) -> w [K, N] f32``: the weight expanded for a matmul
    (vectorized along N by the elementwise schedule)."""
    def f(wp: Any, s: Any, o: Any) -> Any:
        from tvm import te, tirx

        G = spec.group

        def value(k: Any, n: Any) -> Any:
            g = k // G
            if spec.int4:
                blk, j = k // BLOCK, k % BLOCK
                byte = wp[n, blk * 16 + j % 16]
                nib = tirx.Select(j < 16, byte & tirx.const(15, "uint8"), byte >> tirx.const(4, "uint8"))
                qv = tirx.Cast("float32", nib)
            else:
                qv = tirx.Cast("float32", wp[n, k])
            return qv * s[n, g] + o[n, g]

        return te.compute((spec.k, spec.n), value, name="wo_dequant")
    return f


# ----------------------------------------------------------------------------- lowering
def lower_weight_only(ctx: Any, node: Any, ops: dict[str, Any], pnames: dict[str, str | None]) -> Any | None:
    """Lower a weight-only ``quant_linear`` whose operands are parameters (CPU): the GEMV kernel for
    one row, dequantize-into-a-work-buffer + matmul for several; None (with a note) where the
    kernels do not cover the shape, and the caller dequantizes at build time."""
    from ctc.backends.tvm.int_kernels import add_prim_func
    from ctc.backends.tvm.lower import _dt, _one_row
    from ctc.ir import quant as Q

    attrs = node.attrs
    xv = node.operand("x")
    k = int(xv.type.shape[-1])
    bits, gs = int(attrs["w_bits"]), int(attrs["group_size"])
    why = supported(k, gs)
    if why is not None:
        ctx.notes.append(f"quant_linear at {node.scope or '<root>'}: weights dequantized at build time ({why})")
        return None
    qarr = ctx.param_array(pnames["qweight"])
    n = int(qarr.shape[0])
    has_bias = "bias" in ops
    spec = spec_of(k, n, bits, gs, has_bias)
    key = f"wo_{spec.tag}_" + "_".join(str(pnames[m]) for m in ("qweight", "w_scale", "w_zero"))

    def packed() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch

        if key not in ctx.memo:
            q = Q.unpack_weight(torch.from_numpy(qarr), bits, k).numpy()
            ctx.memo[key] = pack(spec, q, ctx.param_array(pnames["w_scale"]), ctx.param_array(pnames["w_zero"]))
        return ctx.memo[key]

    wp, sc, off = packed()
    # the packed weight depends on the integer weight only: a tied weight is bound once
    wpack = ctx.param(pnames["qweight"], f"wo_pack_{spec.bits}_{spec.group}", array=wp)
    scale = ctx.param(pnames["w_scale"], f"{key}_scale", array=sc)
    offset = ctx.param(pnames["w_zero"], f"{key}_offset", array=off)
    relax, op = ctx.relax, ctx.relax.op
    xt = xv.type
    x = ops["x"]
    xf = x if xt.dtype == "f32" else ctx.emit(op.astype(x, "float32"))
    bias = None
    if has_bias:
        bias = ops["bias"] if node.operand("bias").type.dtype == "f32" else ctx.emit(op.astype(ops["bias"], "float32"))
    ctx.int_kernels += 1
    if _one_row(ctx, xv):
        with_offset = bool(np.any(off != 0))
        gv = add_prim_func(ctx.bb, gemv_func(spec, with_offset), f"ctc_wo_gemv_{spec.tag}{'' if with_offset else '_s'}")
        x1 = ctx.emit(op.reshape(xf, [k]))
        args = [x1, wpack, scale, offset] + ([bias] if bias is not None else [])
        y = ctx.emit(relax.call_tir(gv, args, relax.TensorType([n], "float32")))
        y = ctx.emit(op.reshape(y, ctx.shape_of(node.outputs[0])))
    else:
        w = ctx.te(dequant_kn_te(spec), wpack, scale, offset, name="wo_dequant")
        y = ctx.emit(op.matmul(xf, w))
        if bias is not None:
            y = ctx.emit(op.add(y, bias))
    return y if xt.dtype == "f32" else op.astype(y, _dt(xt))
