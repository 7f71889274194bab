"""TVM lowering rules for the vision and audio ops (:mod:`ctc.ir.ops.vision`): convolution,
batch/group norm, pooling, pad and resize.

Why hand-written TE for pooling, pad and resize: torch's index arithmetic (ceil-mode windows,
``count_include_pad``, ``divisor_override``, reflect padding, the source-coordinate and clamping
rules of each interpolation mode) is the reference, and spelling it out here keeps the compiled
code bit-for-bit on the same sample positions.  Convolutions go to :mod:`.conv_kernels`.
"""

from __future__ import annotations

from typing import Any

from ctc.backends.tvm.lower import Ctx, Operands, _dt, rule
from ctc.ir.graph import Node


def _spatial(node: Node) -> int:
    x = node.operand("x")
    assert x is not None
    return x.type.rank - 2


def _channel_view(ctx: Ctx, v: Any, rank: int) -> Any:
    """A ``[C]`` vector viewed as ``[1, C, 1, ...]`` for broadcasting over ``[N, C, *spatial]``."""
    return ctx.emit(ctx.relax.op.reshape(v, [1, -1] + [1] * (rank - 2)))


@rule("conv")
def _conv(ctx: Ctx, node: Node, a: Operands) -> Any:
    from ctc.backends.tvm.conv_kernels import lower_conv

    return lower_conv(ctx, node, a)


@rule("batch_norm")
def _batch_norm(ctx: Ctx, node: Node, a: Operands) -> Any:
    """``(x - mean) * rsqrt(var + eps) * weight + bias``, per channel (axis 1)."""
    op = ctx.relax.op
    xt = a.type("x")
    dt = _dt(xt)
    x = a["x"]
    rank = xt.rank

    def f32(name: str) -> Any:
        return a[name] if a.type(name).dtype == xt.dtype else ctx.emit(op.astype(a[name], dt))

    mean, var = f32("mean"), f32("var")
    inv = ctx.emit(op.rsqrt(ctx.emit(op.add(var, ctx.const(node.attrs["eps"], xt.dtype)))))
    scale = inv if a.value("weight") is None else ctx.emit(op.multiply(inv, f32("weight")))
    shift = ctx.emit(op.negative(ctx.emit(op.multiply(mean, scale))))
    if a.value("bias") is not None:
        shift = ctx.emit(op.add(shift, f32("bias")))
    y = ctx.emit(op.multiply(x, _channel_view(ctx, scale, rank)))
    return op.add(y, _channel_view(ctx, shift, rank))


@rule("group_norm")
def _group_norm(ctx: Ctx, node: Node, a: Operands) -> Any:
    op = ctx.relax.op
    xt = a.type("x")
    c = ctx.dims(xt.shape[1])
    w, b = a.get("weight"), a.get("bias")
    w = w if w is not None else op.ones([c], _dt(xt))
    b = b if b is not None else op.zeros([c], _dt(xt))
    return op.nn.group_norm(a["x"], w, b, num_groups=node.attrs["groups"], channel_axis=1,
                            axes=list(range(2, xt.rank)), epsilon=node.attrs["eps"])


# --- pooling -------------------------------------------------------------------------
def _window_bounds(o: Any, k: int, s: int, p: int, size: Any) -> tuple[Any, Any, Any]:
    """torch's avg-pool window for output index ``o``: (start, end) clipped to the input, and the
    window size counted over input plus padding."""
    from tvm import tirx

    start = o * s - p
    end = tirx.min(start + k, size + p)
    pool = end - start
    return tirx.max(start, 0), tirx.min(end, size), pool


@rule("max_pool")
def _max_pool(ctx: Ctx, node: Node, a: Operands) -> Any:
    from tvm import te, tirx

    at = node.attrs
    k, st, pd, dl = at["kernel"], at["stride"], at["padding"], at["dilation"]
    nd = len(k)
    out_shape = ctx.dims.shape(node.outputs[0].type)

    def f(x: Any) -> Any:
        lead = len(x.shape) - nd
        rs = [te.reduce_axis((0, kk), f"r{i}") for i, kk in enumerate(k)]
        lowest = tirx.min_value(x.dtype)

        def elem(*o: Any) -> Any:
            idx = list(o[:lead])
            ok = tirx.const(True, "bool")
            for i in range(nd):
                pos = o[lead + i] * st[i] - pd[i] + rs[i] * dl[i]
                ok = tirx.And(ok, tirx.And(pos >= 0, pos < x.shape[lead + i]))
                idx.append(tirx.max(tirx.min(pos, x.shape[lead + i] - 1), 0))
            return te.max(tirx.Select(ok, x(*idx), lowest), axis=rs)

        return te.compute(out_shape, elem, name="max_pool")

    return ctx.te(f, a["x"], name="max_pool")


@rule("avg_pool")
def _avg_pool(ctx: Ctx, node: Node, a: Operands) -> Any:
    from tvm import te, tirx

    at = node.attrs
    k, st, pd = at["kernel"], at["stride"], at["padding"]
    nd = len(k)
    out_shape = ctx.dims.shape(node.outputs[0].type)
    dt = _dt(a.type("x"))

    def f(x: Any) -> Any:
        lead = len(x.shape) - nd
        rs = [te.reduce_axis((0, kk), f"r{i}") for i, kk in enumerate(k)]

        def total(*o: Any) -> Any:
            idx = list(o[:lead])
            ok = tirx.const(True, "bool")
            for i in range(nd):
                pos = o[lead + i] * st[i] - pd[i] + rs[i]
                ok = tirx.And(ok, tirx.And(pos >= 0, pos < x.shape[lead + i]))
                idx.append(tirx.max(tirx.min(pos, x.shape[lead + i] - 1), 0))
            return te.sum(tirx.Select(ok, x(*idx), tirx.const(0.0, dt)), axis=rs)

        sums = te.compute(out_shape, total, name="pool_sum")

        def avg(*o: Any) -> Any:
            if at["divisor_override"] is not None:
                return sums(*o) / tirx.const(float(at["divisor_override"]), dt)
            n_pad: Any = tirx.const(1, "int64")
            n_in: Any = tirx.const(1, "int64")
            for i in range(nd):
                lo, hi, pool = _window_bounds(o[lead + i], k[i], st[i], pd[i], x.shape[lead + i])
                n_pad = n_pad * pool
                n_in = n_in * (hi - lo)
            n = n_pad if at["count_include_pad"] else n_in
            return sums(*o) / tirx.Cast(dt, n)

        return te.compute(out_shape, avg, name="avg_pool")

    return ctx.te(f, a["x"], name="avg_pool")


@rule("adaptive_avg_pool", "adaptive_max_pool")
def _adaptive_pool(ctx: Ctx, node: Node, a: Operands) -> Any:
    """Windows ``[floor(i*L/O), ceil((i+1)*L/O))``: reduced over the largest window length with the
    positions beyond each window masked out."""
    from tvm import te, tirx

    out = node.attrs["output_size"]
    nd = len(out)
    xt = a.type("x")
    sizes = [ctx.dims(d) for d in xt.shape[xt.rank - nd:]]
    if node.op == "adaptive_avg_pool" and all(o == 1 for o in out):  # global average
        return ctx.relax.op.mean(a["x"], axis=list(range(xt.rank - nd, xt.rank)), keepdims=True)
    for s in sizes:
        if not isinstance(s, int) and not hasattr(s, "value"):
            from ctc.backends.tvm.lower import LoweringError

            raise LoweringError(f"{node.op} at {node.scope or '<root>'}: needs static spatial sizes (got {xt})")
    sizes = [int(getattr(s, "value", s)) for s in sizes]
    spans = [-(-s // o) + (1 if s % o else 0) for s, o in zip(sizes, out, strict=True)]
    out_shape = ctx.dims.shape(node.outputs[0].type)
    dt = _dt(xt)
    is_max = node.op == "adaptive_max_pool"

    def f(x: Any) -> Any:
        lead = len(x.shape) - nd
        rs = [te.reduce_axis((0, sp), f"r{i}") for i, sp in enumerate(spans)]

        def bounds(i: int, o: Any) -> tuple[Any, Any]:
            s, oo = sizes[i], out[i]
            return tirx.floordiv(o * s, oo), tirx.floordiv((o + 1) * s + oo - 1, oo)

        def red(*o: Any) -> Any:
            idx = list(o[:lead])
            ok = tirx.const(True, "bool")
            for i in range(nd):
                lo, hi = bounds(i, o[lead + i])
                pos = lo + rs[i]
                ok = tirx.And(ok, pos < hi)
                idx.append(tirx.min(pos, sizes[i] - 1))
            if is_max:
                return te.max(tirx.Select(ok, x(*idx), tirx.min_value(x.dtype)), axis=rs)
            return te.sum(tirx.Select(ok, x(*idx), tirx.const(0.0, dt)), axis=rs)

        r = te.compute(out_shape, red, name="adaptive_red")
        if is_max:
            return r

        def mean(*o: Any) -> Any:
            n: Any = tirx.const(1, "int64")
            for i in range(nd):
                lo, hi = bounds(i, o[lead + i])
                n = n * (hi - lo)
            return r(*o) / tirx.Cast(dt, n)

        return te.compute(out_shape, mean, name="adaptive_avg")

    return ctx.te(f, a["x"], name=node.op)


# --- pad ----------------------------------------------------------------------------------
@rule("pad")
def _pad(ctx: Ctx, node: Node, a: Operands) -> Any:
    from tvm import te, tirx

    at = node.attrs
    pads, mode = at["pads"], at["mode"]
    xt = a.type("x")
    out_shape = ctx.dims.shape(node.outputs[0].type)
    n = len(pads) // 2
    value = at["value"]

    def f(x: Any) -> Any:
        def elem(*o: Any) -> Any:
            idx = list(o)
            ok = tirx.const(True, "bool")
            for i in range(n):
                ax = xt.rank - 1 - i
                lo = pads[2 * i]
                size = tirx.Cast("int64", x.shape[ax])
                j = tirx.Cast("int64", o[ax]) - lo
                if mode == "constant":
                    ok = tirx.And(ok, tirx.And(j >= 0, j < size))
                    j = tirx.max(tirx.min(j, size - 1), 0)
                elif mode == "reflect":
                    j = tirx.Select(j < 0, -j, j)
                    j = tirx.Select(j >= size, 2 * (size - 1) - j, j)
                elif mode == "replicate":
                    j = tirx.max(tirx.min(j, size - 1), 0)
                else:
                    j = tirx.floormod(j, size)
                idx[ax] = j
            v = x(*idx)
            if mode == "constant":
                return tirx.Select(ok, v, tirx.const(value, x.dtype) if x.dtype != "bool" else
                                   tirx.const(bool(value), "bool"))
            return v

        return te.compute(out_shape, elem, name=f"pad_{mode}")

    return ctx.te(f, a["x"], name=f"pad_{mode}")


# --- resize -------------------------------------------------------------------------------
def _scale(in_size: Any, out_size: Any, align_corners: bool, scale: float | None) -> Any:
    """torch's ``area_pixel_compute_scale`` in f32 (``compute_scales_value`` for nearest)."""
    from tvm import tirx

    f32 = "float32"
    if align_corners:
        return tirx.Select(out_size > 1, tirx.Cast(f32, in_size - 1) / tirx.Cast(f32, out_size - 1),
                           tirx.const(0.0, f32))
    if scale is not None and scale > 0:
        return tirx.const(1.0 / scale, f32)
    return tirx.Cast(f32, in_size) / tirx.Cast(f32, out_size)


def _cubic_coeffs(t: Any) -> list[Any]:
    """torch's bicubic weights (A = -0.75) for fractional offset ``t``."""
    from tvm import tirx

    A = tirx.const(-0.75, "float32")
    one = tirx.const(1.0, "float32")

    def cc1(x: Any) -> Any:
        return ((A + 2) * x - (A + 3)) * x * x + one

    def cc2(x: Any) -> Any:
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    return [cc2(t + one), cc1(t), cc1(one - t), cc2(2 * one - t)]


@rule("resize")
def _resize(ctx: Ctx, node: Node, a: Operands) -> Any:
    from tvm import te, tirx

    at = node.attrs
    mode, ac, scales = at["mode"], at["align_corners"], at["scales"]
    nd = len(at["size"])
    out_shape = ctx.dims.shape(node.outputs[0].type)
    xt = a.type("x")
    f32 = "float32"

    def f(x: Any, *outs: Any) -> Any:
        ins = [x.shape[2 + i] for i in range(nd)]
        sc = [_scale(ins[i], outs[i], ac, scales[i] if scales else None) for i in range(nd)]

        def clampi(v: Any, size: Any) -> Any:
            return tirx.max(tirx.min(v, size - 1), 0)

        def elem(*o: Any) -> Any:
            sp = o[2:]
            if mode in ("nearest", "nearest-exact"):
                idx = list(o[:2])
                for i in range(nd):
                    d = tirx.Cast(f32, sp[i])
                    if mode == "nearest-exact":
                        d = d + tirx.const(0.5, f32)
                    idx.append(tirx.min(tirx.Cast("int64", tirx.floor(d * sc[i])), ins[i] - 1))
                return x(*idx)
            taps: list[list[tuple[Any, Any]]] = []  # per axis: (index, weight) pairs
            for i in range(nd):
                d = tirx.Cast(f32, sp[i])
                src = d * sc[i] if ac else sc[i] * (d + tirx.const(0.5, f32)) - tirx.const(0.5, f32)
                if mode == "linear":
                    src = src if ac else tirx.max(src, tirx.const(0.0, f32))
                    i0 = tirx.min(tirx.Cast("int64", tirx.floor(src)), ins[i] - 1)
                    lam = tirx.min(tirx.max(src - tirx.Cast(f32, i0), tirx.const(0.0, f32)), tirx.const(1.0, f32))
                    i1 = i0 + tirx.Select(i0 < ins[i] - 1, tirx.const(1, "int64"), tirx.const(0, "int64"))
                    taps.append([(i0, tirx.const(1.0, f32) - lam), (i1, lam)])
                else:
                    fl = tirx.floor(src)
                    i0 = tirx.Cast("int64", fl)
                    cs = _cubic_coeffs(src - fl)
                    taps.append([(clampi(i0 + (j - 1), ins[i]), cs[j]) for j in range(4)])

            def interp(axis: int, prefix: list[Any]) -> Any:
                if axis == nd:
                    v = x(*o[:2], *prefix)
                    return v if x.dtype == f32 else tirx.Cast(f32, v)
                acc = None
                for j, w in taps[axis]:
                    term = w * interp(axis + 1, [*prefix, j])
                    acc = term if acc is None else acc + term
                return acc

            r = interp(0, [])
            return r if x.dtype == f32 else tirx.Cast(x.dtype, r)

        return te.compute(out_shape, elem, name=f"resize_{mode}")

    del xt
    # output sizes travel as arguments: emit_te remaps the symbols of its operands, not free ones
    sizes = [tirx.IntImm("int64", d) if isinstance(d, int) else d for d in out_shape[2:]]
    return ctx.te(f, a["x"], *sizes, name=f"resize_{mode.replace('-', '_')}")


__all__: list[str] = []
