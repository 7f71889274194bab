"""Convolution lowering and schedules for the TVM CPU backend (torch's channels-first layout).

Why not Relax's ``nn.conv2d``: its legalized TE has no fast default CPU schedule (dlight has no
convolution rule, and a direct NCHW convolution does not map onto the register-tiled matmul).
So each convolution is lowered to a form the default schedules already run fast:

* **pointwise** (1x1, stride 1): ``Y[n, co, p] = sum_ci W[co, ci] * X[n, ci, p]`` over the
  flattened spatial axis ``p`` -- exactly :class:`~ctc.backends.tvm.schedules.MatmulRule`'s
  product (rows = output channels, vectorized along ``p``), bias and activation fused in;
* **general** (``k x k``, strides, dilation, channel groups): the input patches are gathered
  once (im2col, a producer stage of the same kernel), then the same per-group matmul;
* **depthwise** (one input channel per group): a padded copy of each channel plane, then a
  stencil vectorized along the output width, parallel over (batch, channel)
  (:class:`DepthwiseConvRule`); on small static planes with many taps (5x5 kernels, 14x14-28x28
  planes) the plane is stored flat and the stencil runs over it in full-width vectors with
  unrolled accumulators (:meth:`_ConvSpec.depthwise_flat`);
* **channels-last** (small static planes, whole vectors of channels): pointwise and depthwise
  convolutions computed in ``[N, H, W, C]``, vectorized along the channels
  (:func:`channels_last_pays`, :func:`_lower_channels_last`); the layout carries on between them.

A zero ``pad`` feeding the convolution (TensorFlow-style "same" padding, EfficientNet) is read
through, not materialized: its amounts join the convolution's own (possibly asymmetric)
padding.  Transposed and 3-d convolutions, and non-f32 ones, use Relax's ops.
"""

from __future__ import annotations

from typing import Any

from ctc.backends.tvm.lower import Ctx, LoweringError, Operands, _dt
from ctc.backends.tvm.schedules import (
    _CpuRule,
    _extent,
    _vectorize_last,
    single_reduction,
    vector_lanes,
)
from ctc.ir.graph import Node, Value
from tvm import s_tir, tirx
from tvm.target import Target

__all__ = ["DepthwiseConvRule", "lower_conv"]



# --------------------------------------------------------------------------- lowering
def _absorbed_pad(ctx: Ctx, node: Node) -> tuple[Value, list[tuple[int, int]]]:
    """The convolution's input, reading through a zero ``pad`` of the spatial axes that only this
    convolution reads; and the (before, after) padding per spatial axis."""
    x = node.operand("x")
    assert x is not None
    nd = x.type.rank - 2
    pads = [(int(p), int(p)) for p in node.attrs["padding"]]
    prod = x.producer
    if prod is None or prod.op != "pad" or len(x.uses) != 1 or prod.module.is_output(x):
        return x, pads
    if prod.attrs["mode"] != "constant" or prod.attrs["value"] != 0.0 or len(prod.attrs["pads"]) > 2 * nd:
        return x, pads
    p = list(prod.attrs["pads"]) + [0] * (2 * nd - len(prod.attrs["pads"]))
    for i in range(nd):  # F.pad order: last axis first
        ax = nd - 1 - i
        pads[ax] = (pads[ax][0] + p[2 * i], pads[ax][1] + p[2 * i + 1])
    src = prod.operand("x")
    assert src is not None
    return src, pads


def lower_conv(ctx: Ctx, node: Node, a: Operands) -> Any:
    """``conv`` node -> the pointwise / im2col+matmul / depthwise TE forms above, or Relax's ops.

    The elementwise chain that only consumes the convolution (bias, ReLU/ReLU6/hard-swish,
    scalar arithmetic, a residual add) is computed in the same kernel, per output tile."""
    at = node.attrs
    xt = a.type("x")
    nd = xt.rank - 2
    if at["transposed"] or nd not in (1, 2) or xt.dtype != "f32" or a.type("weight").dtype != "f32":
        return _relax_conv(ctx, node, a)
    x_val, pads = _absorbed_pad(ctx, node)
    op = ctx.relax.op
    wt = a.type("weight")
    cout, cin_g = int(wt.shape[0]), int(wt.shape[1])
    ks = [int(k) for k in wt.shape[2:]]
    g = int(at["groups"])
    out_shape = ctx.shape_of(node.outputs[0])
    spec = _ConvSpec(nd, ks, list(at["stride"]), pads, list(at["dilation"]), g, cout, cin_g)
    flat = _flat_spatial(out_shape)
    chain = epilogue_chain(ctx, node)
    flat_dw = spec.flat_depthwise_pays(ctx.shape_of(x_val)[2:], out_shape[2:])
    if g > 1 and cin_g == 1 and cout == g:
        kind = "depthwise"
    elif all(k == 1 for k in ks) and all(s == 1 for s in spec.stride) and not any(p != (0, 0) for p in pads) \
            and g == 1:
        kind = "pointwise"
    else:
        kind = "im2col"
    if kind != "im2col" and channels_last_pays(ctx, node, kind, x_val, out_shape):
        return _lower_channels_last(ctx, node, a, spec, kind, x_val, chain, out_shape)
    x = ctx.val(x_val)
    w = a["weight"]
    if kind == "depthwise":
        shape, bshape, name = out_shape, [cout], "depthwise_conv"
        args = [x, w]
    elif kind == "pointwise":
        # [n, c, *sp] -> [n, c, p] and back are views in Relax, not copies inside the kernel
        shape, bshape, name = [out_shape[0], cout, flat], [cout], "conv_pointwise"
        args = [ctx.emit(op.reshape(x, [out_shape[0], cin_g, flat])), ctx.emit(op.reshape(w, [cout, cin_g]))]
    else:
        kk = 1
        for k in ks:
            kk *= k
        shape, bshape, name = [out_shape[0], g, cout // g, flat], [g, cout // g], "conv_im2col"
        cols = ctx.te(spec.patches, x, *_prims(out_shape[2:]), name="conv_patches")
        cols = ctx.emit(op.reshape(cols, [out_shape[0], g, cin_g * kk, flat]))
        args = [cols, ctx.emit(op.reshape(w, [g, cout // g, cin_g * kk]))]
    bias = [ctx.emit(op.reshape(a["bias"], bshape))] if a.value("bias") is not None else []
    others = [ctx.emit(op.reshape(ctx.val(o), shape)) for _, o, _ in chain if o is not None]
    n_other = len(others)

    def fn(*ts: Any) -> Any:
        xs, ws = ts[0], ts[1]
        rest = list(ts[2:])
        b = rest.pop(0) if bias else None
        oth = rest[:n_other]
        sp = rest[n_other:]
        y = spec.depthwise_flat(xs, ws, *sp) if kind == "depthwise" and flat_dw else \
            spec.depthwise(xs, ws, *sp) if kind == "depthwise" else \
            spec.pointwise(xs, ws) if kind == "pointwise" else spec.grouped_matmul(xs, ws)
        if b is None and not chain:
            return y
        return _epilogue(y, b, chain, oth, kind)

    y = ctx.te(fn, *args, *bias, *others, *(_prims(out_shape[2:]) if kind == "depthwise" else []), name=name)
    if kind != "depthwise":
        y = ctx.emit(op.reshape(y, out_shape))
    for u, _, _ in chain[:-1]:
        ctx.absorbed[id(u.outputs[0])] = None  # read only by the next link of the chain
    if chain:
        ctx.absorbed[id(chain[-1][0].outputs[0])] = y
    return y


# Channels-last (NHWC) convolutions for small planes: at 14x14 and 7x7 the flattened spatial axis
# (196, 49 outputs) is a poor vector axis -- padded to whole vectors, rows computed and dropped --
# while the channels (80-1280 in EfficientNet, MobileNet) are whole vectors.  A convolution whose
# output plane has at most this many positions, or whose input is already channels-last, runs
# channels-last when its channels are whole vectors; the layout then carries on to the next one.
CHANNELS_LAST_MAX_PLANE = 196
_CL_KEY = "channels_last"


def channels_last_value(ctx: Ctx, v: Value) -> Any | None:
    """The ``[N, H, W, C]`` form of ``v`` when a channels-last convolution computed it, else None."""
    return ctx.memo.get((_CL_KEY, id(v)))


def channels_last_pays(ctx: Ctx, node: Node, kind: str, x_val: Value, out_shape: list[Any]) -> bool:
    """Whether this (pointwise or depthwise) convolution runs channels-last on a CPU: 2-d, static,
    a parameter weight, whole vectors of output channels, and an input already channels-last, a small
    output plane, or (pointwise) a result read only by depthwise convolutions that run channels-last
    (which then need no transposing copy of their input)."""
    if not _channels_last_capable(ctx, node, out_shape) or \
            not all(isinstance(d, int) for d in ctx.shape_of(x_val)[1:]):
        return False
    if channels_last_value(ctx, x_val) is not None or out_shape[2] * out_shape[3] <= CHANNELS_LAST_MAX_PLANE:
        return True
    return kind == "pointwise" and _feeds_channels_last_depthwise(ctx, node)


def _channels_last_capable(ctx: Ctx, node: Node, out_shape: list[Any]) -> bool:
    from ctc.backends.tvm.schedules import vector_lanes

    target = ctx.target
    if len(out_shape) != 4 or target is None or getattr(target.kind, "name", "") != "llvm":
        return False
    w = node.operand("weight")
    if w is None or w.producer is None or w.producer.op != "param":  # its layouts are made at compile time
        return False
    if not all(isinstance(d, int) for d in out_shape[1:]):
        return False
    return out_shape[1] % vector_lanes(target, 32) == 0


def _feeds_channels_last_depthwise(ctx: Ctx, node: Node) -> bool:
    """Whether every reader of ``node``'s result (after its fused epilogue; through a zero pad that
    a convolution reads through) is a depthwise convolution with a small output plane."""
    chain = epilogue_chain(ctx, node)
    v = chain[-1][0].outputs[0] if chain else node.outputs[0]
    m = node.module
    if m.is_output(v) or not v.users:
        return False
    for u in v.users:
        read = v
        if u.op == "pad":
            read = u.outputs[0]
            if len(read.uses) != 1 or m.is_output(read) or u.attrs["mode"] != "constant" or u.attrs["value"] != 0.0 \
                    or len(u.attrs["pads"]) > 4:
                return False
            u = read.users[0]
        w = u.operand("weight") if u.op == "conv" else None
        if w is None or u.operand("x") is not read or u.attrs["transposed"] or w.type.rank != 4:
            return False
        groups, (cout, cin_g) = int(u.attrs["groups"]), (int(w.type.shape[0]), int(w.type.shape[1]))
        out = ctx.shape_of(u.outputs[0])
        if not (groups > 1 and cin_g == 1 and cout == groups) or not _channels_last_capable(ctx, u, out):
            return False
        if out[2] * out[3] > CHANNELS_LAST_MAX_PLANE:
            return False
    return True


def _weight_in_layout(ctx: Ctx, a: Operands, key: str, fn: Any) -> Any:
    """The convolution's parameter weight rearranged by ``fn`` at compile time (cached under ``key``)."""
    wv = a.value("weight")
    name = ctx.param_name(wv) if wv is not None else None
    assert name is not None, "channels_last_pays admits parameter weights only"
    return ctx.param(name, key, fn)


def _lower_channels_last(ctx: Ctx, node: Node, a: Operands, spec: _ConvSpec, kind: str, x_val: Value,
                         chain: list[tuple[Node, Value | None, bool]], out_shape: list[Any]) -> Any:
    """A pointwise or depthwise convolution computed in ``[N, H, W, C]`` (input read in whichever
    layout it has); the result is recorded channels-last for the next convolution, and its
    channels-first form is a transpose that only a reader other than a channels-last convolution
    keeps (dead code otherwise)."""
    from ctc.backends.tvm.schedules import vector_lanes

    op = ctx.relax.op
    lanes = vector_lanes(ctx.target, 32)
    n, cout, ho, wo = out_shape
    xl = channels_last_value(ctx, x_val)
    nhwc_in = xl is not None
    x = xl if nhwc_in else ctx.val(x_val)
    cin, (kh, kw) = spec.cin_g, spec.ks
    if kind == "pointwise":
        p = ho * wo
        x = ctx.emit(op.reshape(x, [n, p, cin] if nhwc_in else [n, cin, p]))
        # [K, N] in column panels [N / W, K, W] (W = the matmul tile's width): a tile's panel is contiguous
        width = next(t for t in (2 * lanes, lanes) if cout % t == 0)
        w = _weight_in_layout(ctx, a, f"nhwc_panels{width}", lambda t: t.reshape(cout, cin).T.reshape(
            cin, cout // width, width).transpose(1, 0, 2))
        shape = [n, p, cout]
    else:
        w = _weight_in_layout(ctx, a, "nhwc", lambda t: t.reshape(cout, kh * kw).T.reshape(kh, kw, cout))
        shape = [n, ho, wo, cout]
    bias = [a["bias"]] if a.value("bias") is not None else []
    others = []
    for _, o, _ in chain:
        if o is None:
            continue
        ol = channels_last_value(ctx, o)
        ol = ol if ol is not None else ctx.emit(op.permute_dims(ctx.val(o), [0, 2, 3, 1]))
        others.append(ctx.emit(op.reshape(ol, shape)))
    n_other = len(others)

    def fn(*ts: Any) -> Any:
        xs, ws, rest = ts[0], ts[1], list(ts[2:])
        b = rest.pop(0) if bias else None
        y = spec.pointwise_nhwc(xs, ws, nhwc_in, width) if kind == "pointwise" else \
            spec.depthwise_nhwc(xs, ws, nhwc_in, ho, wo)
        if b is None and not chain:
            return y
        return _epilogue(y, b, chain, rest[:n_other], "channels_last")

    y = ctx.te(fn, x, w, *bias, *others, name="conv_pointwise_nhwc" if kind == "pointwise" else "depthwise_conv_nhwc")
    if kind == "pointwise":
        y = ctx.emit(op.reshape(y, [n, ho, wo, cout]))
    nchw = ctx.emit(op.permute_dims(y, [0, 3, 1, 2]))
    for u, _, _ in chain[:-1]:
        ctx.absorbed[id(u.outputs[0])] = None  # read only by the next link of the chain
    last = chain[-1][0].outputs[0] if chain else node.outputs[0]
    if chain:
        ctx.absorbed[id(last)] = nchw
    ctx.memo[(_CL_KEY, id(last))] = y
    return nchw


_EPI_UNARY = ("relu", "hardswish", "hardsigmoid")
_EPI_SCALAR = ("add", "sub", "mul", "div", "maximum", "minimum")
_EPI_TENSOR = ("add", "sub", "mul")


def epilogue_chain(ctx: Ctx, node: Node) -> list[tuple[Node, Value | None, bool]]:
    """The elementwise nodes that only consume ``node``'s result, in order: ``(node, other operand or
    None, whether the chain value is the first operand)``.  A tensor operand must have the chain
    value's type and already be lowered (a residual computed before the convolution)."""
    v = node.outputs[0]
    m = node.module
    out: list[tuple[Node, Value | None, bool]] = []
    while len(v.uses) == 1 and not m.is_output(v):
        u = v.users[0]
        if u.outputs[0].type != v.type:
            break
        if u.op in _EPI_UNARY:
            out.append((u, None, True))
        elif u.op in _EPI_SCALAR and u.attrs.get("scalar") is not None:
            out.append((u, None, True))
        elif u.op in _EPI_TENSOR and u.attrs.get("scalar") is None and u.has_operand("b"):
            first = u.operand("a") is v
            other = u.operand("b") if first else u.operand("a")
            assert other is not None
            if other is v or other.type != v.type or id(other) not in ctx.env:
                break
            out.append((u, other, first))
        else:
            break
        v = u.outputs[0]
    return out


def _epilogue(y: Any, bias: Any | None, chain: list[tuple[Node, Value | None, bool]], others: list[Any],
              kind: str) -> Any:
    """One elementwise stage after the convolution: bias (per channel), then the absorbed chain."""
    from tvm import te

    def elem(*i: Any) -> Any:
        e = y(*i)
        if bias is not None:
            e = e + (bias(i[1], i[2]) if kind == "im2col" else bias(i[-1]) if kind == "channels_last" else bias(i[1]))
        k = 0
        for u, other, first in chain:
            attrs = u.attrs
            if other is not None:
                o = others[k](*i)
                k += 1
                e = {"add": lambda p, q: p + q, "mul": lambda p, q: p * q,
                     "sub": lambda p, q: p - q}[u.op](e, o) if first else \
                    {"add": lambda p, q: q + p, "mul": lambda p, q: q * p, "sub": lambda p, q: q - p}[u.op](e, o)
                continue
            zero, three, six = (tirx.const(c, "float32") for c in (0.0, 3.0, 6.0))
            if u.op == "relu":
                e = tirx.max(e, zero)
            elif u.op in ("hardswish", "hardsigmoid"):
                r6 = tirx.min(tirx.max(e + three, zero), six)
                e = (e * r6 if u.op == "hardswish" else r6) / six
            else:
                c = tirx.const(float(attrs["scalar"]), "float32")
                rev = bool(attrs.get("reverse"))
                if u.op == "add":
                    e = c + e if rev else e + c
                elif u.op == "mul":
                    e = c * e if rev else e * c
                elif u.op == "sub":
                    e = c - e if rev else e - c
                elif u.op == "div":
                    e = c / e if rev else e / c
                elif u.op == "maximum":
                    e = tirx.max(e, c)
                else:
                    e = tirx.min(e, c)
        return e

    return te.compute(y.shape, elem, name="conv_epilogue")


def _flat_spatial(shape: list[Any]) -> Any:
    p: Any = 1
    for d in shape[2:]:
        p = p * d
    return p


def _flat_grid(ho: int, wq: int, vec: int = 16) -> tuple[int, int]:
    """``(Hr, Wr)``, ``Hr >= ho`` rows of ``Wr >= wq`` columns, ``Hr * Wr`` a multiple of ``vec``, as few
    elements as possible (fewer rows on ties): the flat depthwise stencil's accumulator grid."""
    return min((h * w, h, w) for h in range(ho, ho + vec) for w in range(wq, wq + vec) if h * w % vec == 0)[1:]


def _prims(dims: list[Any]) -> list[Any]:
    """Output sizes as TIR expressions passed to emit_te (it remaps the symbols of its operands only)."""
    return [tirx.IntImm("int64", d) if isinstance(d, int) else d for d in dims]


class _ConvSpec:
    """The geometry of one convolution and its three TE forms."""

    def __init__(self, nd: int, ks: list[int], stride: list[int], pads: list[tuple[int, int]], dil: list[int],
                 groups: int, cout: int, cin_g: int):
        self.nd, self.ks, self.stride, self.pads, self.dil = nd, ks, stride, pads, dil
        self.groups, self.cout, self.cin_g = groups, cout, cin_g

    def _padded(self, x: Any) -> Any:
        """``x`` with zero borders (only where padding is nonzero; a separate producer stage)."""
        from tvm import te

        if not any(lo or hi for lo, hi in self.pads):
            return x
        nd = self.nd
        shape = list(x.shape[:2]) + [x.shape[2 + i] + lo + hi for i, (lo, hi) in enumerate(self.pads)]

        def f(*i: Any) -> Any:
            ok = tirx.const(True, "bool")
            src = list(i[:2])
            for d in range(nd):
                lo = self.pads[d][0]
                j = i[2 + d] - lo
                ok = tirx.And(ok, tirx.And(j >= 0, j < x.shape[2 + d]))
                src.append(tirx.max(tirx.min(j, x.shape[2 + d] - 1), 0))
            return tirx.Select(ok, x(*src), tirx.const(0.0, x.dtype))

        return te.compute(shape, f, name="conv_pad")

    def pointwise(self, x: Any, w: Any) -> Any:
        """1x1: ``Y[n, co, p] = sum_ci W[co, ci] * X[n, ci, p]`` (spatial axes flattened to ``p``)."""
        from tvm import te

        k = te.reduce_axis((0, x.shape[1]), "ci")
        return te.compute([x.shape[0], w.shape[0], x.shape[2]],
                          lambda b, co, q: te.sum(w[co, k] * x[b, k, q], axis=k), name="conv_mm")

    def pointwise_nhwc(self, x: Any, w: Any, nhwc_in: bool, width: int) -> Any:
        """1x1 channels-last: ``Y[n, p, co] = sum_ci X[n, p, ci] * W[co // width, ci, co % width]`` (the
        weight in column panels; ``X`` given as ``[n, p, ci]``, or channels-first ``[n, ci, p]`` and
        read transposed)."""
        from tvm import te

        cin = x.shape[2] if nhwc_in else x.shape[1]
        p = x.shape[1] if nhwc_in else x.shape[2]
        k = te.reduce_axis((0, cin), "ci")

        def xv(b: Any, q: Any) -> Any:
            return x[b, q, k] if nhwc_in else x[b, k, q]

        return te.compute([x.shape[0], p, w.shape[0] * width],
                          lambda b, q, co: te.sum(xv(b, q) * w[co // width, k, co % width], axis=k),
                          name="conv_mm_nhwc")

    def depthwise_nhwc(self, x: Any, w: Any, nhwc_in: bool, ho: int, wo: int) -> Any:
        """Depthwise channels-last: ``Y[n, h, j, c] = sum_k Xpad[n, h*s + k*d, j*s + k*d, c] * W[k, c]``,
        vectorized along the channels (whole vectors whatever the plane's size).  The padded plane
        is a producer stage, which also transposes a channels-first input."""
        from tvm import te

        (pt, pb), (pl, pr) = self.pads
        (sh, sw), (dh, dw) = self.stride, self.dil
        if nhwc_in:
            n, hin, win, c = x.shape
        else:
            n, c, hin, win = x.shape
        if nhwc_in and not (pt or pb or pl or pr):
            xp = x
        else:
            def pad(b: Any, r: Any, j: Any, ch: Any) -> Any:
                sr, sj = r - pt, j - pl
                ok = tirx.And(tirx.And(sr >= 0, sr < hin), tirx.And(sj >= 0, sj < win))
                sr, sj = tirx.max(tirx.min(sr, hin - 1), 0), tirx.max(tirx.min(sj, win - 1), 0)
                v = x[b, sr, sj, ch] if nhwc_in else x[b, ch, sr, sj]
                return tirx.Select(ok, v, tirx.const(0.0, x.dtype))

            xp = te.compute([n, hin + pt + pb, win + pl + pr, c], pad, name="dw_pad_nhwc")
        rh = te.reduce_axis((0, self.ks[0]), "kh")
        rw = te.reduce_axis((0, self.ks[1]), "kw")
        return te.compute([n, ho, wo, c], lambda b, h, j, ch: te.sum(
            xp[b, h * sh + rh * dh, j * sw + rw * dw, ch] * w[rh, rw, ch], axis=[rh, rw]), name="depthwise_nhwc")

    def patches(self, x: Any, *out_sp: Any) -> Any:
        """im2col: ``P[n, g, (ci, k...), o...] = Xpad[n, g*cin_g + ci, o*s + k*d]`` (a kernel of its own,
        vectorized along the output width; strided reads come from column phases, see :meth:`_phases`)."""
        from tvm import te

        nd, g = self.nd, self.groups
        kk = 1
        for k in self.ks:
            kk *= k
        sw, dw = self.stride[-1], self.dil[-1]
        phased = sw > 1 and dw == 1
        src_t = self._phases(x, sw) if phased else self._padded(x)

        def patch(b: Any, gi: Any, r: Any, *o: Any) -> Any:
            src = [b, gi * self.cin_g + tirx.floordiv(r, kk)]
            ks = tirx.floormod(r, kk)
            kpos = []
            for d in range(nd - 1, -1, -1):
                kpos.append(tirx.floormod(ks, self.ks[d]))
                ks = tirx.floordiv(ks, self.ks[d])
            kpos.reverse()
            last = nd - 1 if phased else nd
            for d in range(last):
                src.append(o[d] * self.stride[d] + kpos[d] * self.dil[d])
            if phased:
                src += [tirx.floormod(kpos[-1], sw), o[-1] + tirx.floordiv(kpos[-1], sw)]
            return src_t(*src)

        return te.compute([x.shape[0], g, self.cin_g * kk, *out_sp], patch, name="im2col")

    def grouped_matmul(self, cols: Any, w: Any) -> Any:
        """``Y[n, g, co, p] = sum_r W[g, co, r] * P[n, g, r, p]`` (``P`` the flattened patches)."""
        from tvm import te

        r = te.reduce_axis((0, cols.shape[2]), "r")
        return te.compute([cols.shape[0], cols.shape[1], w.shape[1], cols.shape[3]],
                          lambda b, gi, co, q: te.sum(w[gi, co, r] * cols[b, gi, r, q], axis=r), name="conv_mm")

    def depthwise(self, x: Any, w: Any, *out_sp: Any) -> Any:
        """``Y[n, c, o...] = sum_k Xpad[n, c, o*s + k*d] * W[c, 0, k]`` (one channel per group).

        With a stride ``s > 1`` along the last axis (and no dilation there), the padded plane is
        stored as ``s`` column phases (``P[.., h, q, j] = Xpad[.., h, j*s + q]``), so each tap reads
        consecutive elements: a vector load instead of a strided gather."""
        from tvm import te

        nd = self.nd
        rs = [te.reduce_axis((0, k), f"k{i}") for i, k in enumerate(self.ks)]
        sw, dw = self.stride[-1], self.dil[-1]
        if sw == 1 or dw != 1:
            xp = self._padded(x)

            def f(b: Any, c: Any, *o: Any) -> Any:
                src = [b, c] + [o[d] * self.stride[d] + rs[d] * self.dil[d] for d in range(nd)]
                return te.sum(xp(*src) * w(c, 0, *rs), axis=rs)

            return te.compute([x.shape[0], x.shape[1], *out_sp], f, name="depthwise")
        ph = self._phases(x, sw)

        def g(b: Any, c: Any, *o: Any) -> Any:
            src = [b, c] + [o[d] * self.stride[d] + rs[d] * self.dil[d] for d in range(nd - 1)]
            src += [tirx.floormod(rs[-1], sw), o[-1] + tirx.floordiv(rs[-1], sw)]
            return te.sum(ph(*src) * w(c, 0, *rs), axis=rs)

        return te.compute([x.shape[0], x.shape[1], *out_sp], g, name="depthwise")

    def flat_depthwise_pays(self, in_sp: list[Any], out_sp: list[Any]) -> bool:
        """Whether :meth:`depthwise_flat` beats :meth:`depthwise` here (static sizes only).

        The flat form pays a per-channel plane fill and copy and computes the padding columns;
        it wins where its full-width vectors and unrolled accumulators matter: planes up to
        ~1024 outputs (plane, accumulators and output stay in L1) with enough taps to amortize
        the copy.  Measured on EfficientNet-Lite0's depthwise layers (AVX-512, one thread):
        1.3-2.9x faster on 5x5 kernels and 14x14-28x28 planes, slower on 56x56 and larger planes
        and on 3x3 kernels over 7x7 planes (benchmarks/cnn_latency.py)."""
        if not all(isinstance(d, int) for d in [*in_sp, *out_sp]):
            return False
        ks = [1, *self.ks] if self.nd == 1 else self.ks
        st = [1, *self.stride] if self.nd == 1 else self.stride
        pads = [(0, 0), *self.pads] if self.nd == 1 else self.pads
        ho = 1 if self.nd == 1 else int(out_sp[0])
        hr, wr = _flat_grid(ho, -(-(int(in_sp[-1]) + pads[-1][0] + pads[-1][1]) // st[-1]))
        return hr * wr <= 1024 and ks[0] * ks[1] * hr * wr >= 1500

    def depthwise_flat(self, x: Any, w: Any, *out_sp: Any) -> Any:
        """Depthwise convolution over each channel's padded plane stored flat (static sizes only).

        The plane is kept as ``sh * sw`` stride phases (one when the stride is 1) of ``Wr`` columns,
        flattened: ``S[n, c, ph, r * Wr + j]``.  Output ``(h, w)`` is computed at ``q = h * Wr + w``,
        and each tap reads ``S[.., ph(tap), q + off(tap)]``: one contiguous run per tap over the
        whole plane, so the stencil runs in full-width vectors whatever the plane's width (7, 14,
        28, ...), at the price of the padding columns between rows, computed and dropped.
        ``Wr >= ceil(Wp / sw)`` and the accumulator's rows ``Hr >= Ho`` are picked so that
        ``Hr * Wr`` is whole 16-element vectors (:func:`_flat_grid`)."""
        from tvm import te

        if self.nd == 1:
            ks, st, dl, pads = [1, *self.ks], [1, *self.stride], [1, *self.dil], [(0, 0), *self.pads]
            hin, win = 1, int(x.shape[2])
            ho, wo = 1, int(out_sp[0])
        else:
            ks, st, dl, pads = self.ks, self.stride, self.dil, self.pads
            hin, win = int(x.shape[2]), int(x.shape[3])
            ho, wo = int(out_sp[0]), int(out_sp[1])
        (kh, kw), (sh, sw), (dh, dw) = ks, st, dl
        (pt, _pb), (pl, pr) = pads
        hr, wr = _flat_grid(ho, -(-(win + pl + pr) // sw))
        max_off = ((kh - 1) * dh // sh) * wr + ((kw - 1) * dw) // sw
        rows = -(-(hr * wr + max_off) // wr)

        def plane(b: Any, c: Any, ph: Any, r: Any, j: Any) -> Any:
            # unclamped, so that the schedule can split it into a zero fill and an in-bounds copy
            src_r = r * sh + tirx.floordiv(ph, sw) - pt
            src_j = j * sw + tirx.floormod(ph, sw) - pl
            ok = tirx.And(tirx.And(src_r >= 0, src_r < hin), tirx.And(src_j >= 0, src_j < win))
            src = [b, c, src_j] if self.nd == 1 else [b, c, src_r, src_j]
            return tirx.if_then_else(ok, x(*src), tirx.const(0.0, x.dtype))

        s_plane = te.compute([x.shape[0], x.shape[1], sh * sw, rows, wr], plane, name="dw_plane")
        ri = te.reduce_axis((0, kh), "kh")
        rj = te.reduce_axis((0, kw), "kw")

        def tap(b: Any, c: Any, h: Any, o: Any) -> Any:
            ph = tirx.floormod(ri * dh, sh) * sw + tirx.floormod(rj * dw, sw)
            col = o + tirx.floordiv(rj * dw, sw)  # may run into the next row: the plane is read flat
            wt = w[c, 0, ri, rj] if self.nd == 2 else w[c, 0, rj]
            return te.sum(s_plane[b, c, ph, h + tirx.floordiv(ri * dh, sh) + tirx.floordiv(col, wr),
                                  tirx.floormod(col, wr)] * wt, axis=[ri, rj])

        acc = te.compute([x.shape[0], x.shape[1], hr, wr], tap, name="depthwise_flat")
        if self.nd == 1:
            return te.compute([x.shape[0], x.shape[1], wo], lambda b, c, o: acc[b, c, 0, o], name="dw_rows")
        return te.compute([x.shape[0], x.shape[1], ho, wo], lambda b, c, h, o: acc[b, c, h, o], name="dw_rows")

    def _phases(self, x: Any, s: int) -> Any:
        """The zero-padded input with its last axis split into ``s`` phases: ``[.., h, s, ceil(W'/s)]``."""
        from tvm import te

        nd = self.nd
        lo_w, hi_w = self.pads[-1]
        wp = x.shape[-1] + lo_w + hi_w
        cols = tirx.floordiv(wp + (s - 1), s)
        shape = list(x.shape[:2]) + [x.shape[2 + d] + self.pads[d][0] + self.pads[d][1] for d in range(nd - 1)]
        shape += [s, cols]

        def f(*i: Any) -> Any:
            ok = tirx.const(True, "bool")
            src = list(i[:2])
            for d in range(nd - 1):
                j = i[2 + d] - self.pads[d][0]
                ok = tirx.And(ok, tirx.And(j >= 0, j < x.shape[2 + d]))
                src.append(tirx.max(tirx.min(j, x.shape[2 + d] - 1), 0))
            j = i[-1] * s + i[-2] - lo_w
            ok = tirx.And(ok, tirx.And(j >= 0, j < x.shape[-1]))
            src.append(tirx.max(tirx.min(j, x.shape[-1] - 1), 0))
            return tirx.Select(ok, x(*src), tirx.const(0.0, x.dtype))

        return te.compute(shape, f, name="conv_pad")


def _relax_conv(ctx: Ctx, node: Node, a: Operands) -> Any:
    """Relax's own convolution ops (transposed, 3-d, non-f32), bias added per channel."""
    op = ctx.relax.op
    at = node.attrs
    nd = a.type("x").rank - 2
    layouts = {1: ("NCW", "OIW", "IOW"), 2: ("NCHW", "OIHW", "IOHW"), 3: ("NCDHW", "OIDHW", "IODHW")}
    if nd not in layouts:
        raise LoweringError(f"conv at {node.scope or '<root>'}: {nd} spatial axes are not supported")
    dl, kl, tkl = layouts[nd]
    pads = list(at["padding"]) * 2
    x, w = a["x"], a["weight"]
    out_dt = _dt(node.outputs[0].type)
    if at["transposed"]:
        f = getattr(op.nn, f"conv{nd}d_transpose")
        y = ctx.emit(f(x, w, strides=list(at["stride"]), padding=pads,
                       output_padding=list(at["output_padding"] or (0,) * nd), dilation=list(at["dilation"]),
                       groups=at["groups"], data_layout=dl, kernel_layout=tkl, out_dtype=out_dt))
    else:
        f = getattr(op.nn, f"conv{nd}d")
        y = ctx.emit(f(x, w, strides=list(at["stride"]), padding=pads, dilation=list(at["dilation"]),
                       groups=at["groups"], data_layout=dl, kernel_layout=kl, out_dtype=out_dt))
    if a.value("bias") is not None:
        y = ctx.emit(op.add(y, ctx.emit(op.reshape(a["bias"], [1, -1] + [1] * nd))))
    return y


# --------------------------------------------------------------------------- schedule
def _stencil_loops(sch: s_tir.Schedule, rb: Any, epis: list[Any], ns: int, n_plane: int) -> tuple[Any, Any, Any]:
    """Inline all epilogue blocks but the last; the stencil block's loops as (leading (batch, channel),
    the ``n_plane`` plane loops, the tap loops)."""
    for e in epis[:-1]:
        sch.compute_inline(e.block_rv)
    loops = sch.get_loops(rb)
    return loops[:ns - n_plane], loops[ns - n_plane:ns], loops[ns:]


class DepthwiseConvRule(_CpuRule):
    """Depthwise convolution PrimFuncs: (padded-plane stage) -> stencil reduction -> epilogue.

    Parallel over (batch, channel); the padded plane of a channel is computed right before its
    stencil (it stays in cache); each output row is computed in vectors along the width, the
    taps accumulated in registers; the epilogue (bias, activation) applied per row chunk.
    """

    def _apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        found = single_reduction(func)
        if found is None:
            return None
        sch, infos, ri = found
        red = infos[ri]
        kinds = red.dom_kind()
        nr, ns = kinds.count("R"), kinds.count("S")
        block = sch.get(red.block_rv)
        if len(block.reads) == 2 and block.name_hint == "depthwise_flat":
            return self._flat(sch, infos, ri, target)
        if len(block.reads) == 2 and block.name_hint == "depthwise_nhwc":
            return self._channels_last(sch, infos, ri, target)
        # (batch,) channel, spatial...: normalization drops a unit batch axis
        if nr not in (1, 2) or kinds != "S" * ns + "R" * nr or ns not in (nr + 1, nr + 2):
            return None
        if len(block.reads) != 2 or block.name_hint != "depthwise":
            return None
        producers = infos[:ri]
        epis = infos[ri + 1:]
        if any(not b.is_injective() for b in producers + epis) or len(producers) > 1:
            return None
        rb = red.block_rv
        lead, sp, rks = _stencil_loops(sch, rb, epis, ns, nr)
        ow = sp[-1]
        ow_ext = _extent(sch, ow)
        lanes = vector_lanes(target, 32)
        nc = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        sch.parallel(nc)
        if ow_ext is not None and ow_ext <= lanes:
            v = next((x for x in (lanes, 8, 4) if ow_ext % x == 0 and x <= ow_ext), ow_ext)
        elif ow_ext is not None:
            v = next((x for x in (lanes, 8, 4, 2) if ow_ext % x == 0), 1)
        else:
            v = 1
        owo, owi = sch.split(ow, [None, v])
        sch.reorder(nc, *sp[:-1], owo, *rks, owi)
        if v > 1:
            sch.vectorize(owi)
        for rk in rks:
            sch.unroll(rk)
        anchor = owo
        if epis:
            last = epis[-1].block_rv
            sch.reverse_compute_at(last, anchor, preserve_unit_loops=True)
            sch.set_scope(rb, 0, "local")
            if v > 1:
                _vectorize_last(sch, last, v)
        else:
            cw = sch.cache_write(rb, 0, "local")
            sch.reverse_compute_at(cw, anchor, preserve_unit_loops=True)
            if v > 1:
                _vectorize_last(sch, cw, v)
        init = sch.decompose_reduction(rb, rks[0])
        if v > 1:
            sch.vectorize(sch.get_loops(init)[-1])
        if producers:
            pb = producers[0].block_rv
            sch.compute_at(pb, nc, preserve_unit_loops=True)
            ploops = sch.get_loops(pb)
            inner = ploops[-1]
            pe = _extent(sch, inner)
            if pe is not None and pe >= lanes:
                _o, pv = sch.split(inner, [None, lanes])
                sch.vectorize(pv)
        return sch

    def _flat(self, sch: s_tir.Schedule, infos: list[Any], ri: int, target: Target) -> s_tir.Schedule | None:
        """The flat stencil (:meth:`_ConvSpec.depthwise_flat`): per channel (in parallel) the phased
        plane is written row by row, then the accumulator grid, its rows fused into one run, ``U``
        vectors at a time with every tap's ``U`` loads and FMAs unrolled (``U`` independent
        accumulators), then the epilogue picks the real columns (bias, activation fused)."""
        red = infos[ri]
        kinds = red.dom_kind()
        nr = kinds.count("R")
        ns = len(kinds) - nr
        if kinds != "S" * ns + "R" * nr or ri != 1 or len(infos) < 3:
            return None
        plane, epis = infos[0], infos[ri + 1:]
        if not plane.is_injective() or any(not e.is_injective() for e in epis):
            return None
        grid_rows = int(sch.get(red.block_rv).writes[0].source.shape[-2])  # static; the batch may not be
        n_grid = 1 if grid_rows == 1 else 2  # a one-row grid's unit loop is normalized away
        if ns < n_grid + 1:
            return None
        rb = red.block_rv
        lead, grid, rks = _stencil_loops(sch, rb, epis, ns, n_grid)
        q = sch.fuse(*grid) if len(grid) > 1 else grid[0]
        q_ext = _extent(sch, q)
        lanes = vector_lanes(target, 32)
        if q_ext is None or q_ext % lanes:
            return None
        nvec = q_ext // lanes
        u = next(d for d in (8, 7, 6, 5, 4, 3, 2, 1) if nvec % d == 0)
        nc = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        sch.parallel(nc)
        qo, qu, qv = sch.split(q, [None, u, lanes])
        sch.reorder(qo, *rks, qu, qv)
        for rk in rks:
            sch.unroll(rk)
        sch.unroll(qu)
        sch.vectorize(qv)
        init = sch.decompose_reduction(rb, rks[0])
        iq, iv = sch.get_loops(init)[-2:]
        sch.unroll(iq)
        sch.vectorize(iv)
        last = epis[-1].block_rv
        sch.reverse_compute_at(last, nc, preserve_unit_loops=True)
        # a stack array: LLVM then knows no other buffer aliases it and keeps the accumulators in registers
        sch.set_scope(rb, 0, "local")
        el = sch.get_loops(last)[-1]
        ext = _extent(sch, el)
        if ext is not None and 2 <= ext <= 4 * lanes:
            sch.vectorize(el)
        pb = plane.block_rv
        sch.compute_at(pb, nc, preserve_unit_loops=True)
        # zero fill of the whole plane, then a copy of the in-bounds rows without conditions
        ploops = sch.get_loops(pb)
        fill = sch.decompose_padding(pb, ploops[-3] if len(ploops) >= 3 else ploops[0])
        for blk in (fill, pb):
            inner = sch.get_loops(blk)[-1]
            ext = _extent(sch, inner)
            if ext is not None and 2 <= ext <= 4 * lanes:
                sch.vectorize(inner)
        return sch

    def _channels_last(self, sch: s_tir.Schedule, infos: list[Any], ri: int, target: Target
                       ) -> s_tir.Schedule | None:
        """The channels-last stencil (:meth:`_ConvSpec.depthwise_nhwc`): parallel over (batch, vector of
        channels); a task writes its channels' padded plane (a producer stage, in L1), then for each
        output row a tile of up to 8 columns accumulates in registers, every tap one weight vector
        and one input vector per column (taps and columns unrolled), then the epilogue on the tile.
        One parallel region per convolution, no plane written to memory and read back."""
        red = infos[ri]
        kinds = red.dom_kind()
        nr = kinds.count("R")
        ns = len(kinds) - nr
        if kinds != "S" * ns + "R" * nr or nr != 2 or ns < 2:
            return None
        producers, epis = infos[:ri], infos[ri + 1:]
        if len(producers) > 1 or any(not b.is_injective() for b in producers + epis):
            return None
        lanes = vector_lanes(target, 32)
        rb = red.block_rv
        lead, sp, rks = _stencil_loops(sch, rb, epis, ns, 2)  # lead: (batch,) row; sp: column, channel
        col, ch = sp
        c_ext, w_ext = _extent(sch, ch), _extent(sch, col)
        if c_ext is None or w_ext is None or c_ext % lanes:
            return None
        wt = next(d for d in (8, 7, 6, 5, 4, 3, 2, 1) if w_ext % d == 0)
        co, ci = sch.split(ch, [None, lanes])
        wo, wi = sch.split(col, [None, wt])
        rows = lead[-1:]  # (batch,) row: the rows of one channel vector run in one task
        sch.reorder(*lead[:-1], co, *rows, wo, *rks, wi, ci)
        outer = sch.fuse(*lead[:-1], co) if len(lead) > 1 else co
        sch.parallel(outer)
        for rk in rks:
            sch.unroll(rk)
        sch.unroll(wi)
        sch.vectorize(ci)
        if epis:
            last = epis[-1].block_rv
            sch.reverse_compute_at(last, wo, preserve_unit_loops=True)
            sch.set_scope(rb, 0, "local")
        else:
            last = sch.cache_write(rb, 0, "local")
            sch.reverse_compute_at(last, wo, preserve_unit_loops=True)
        eloops = sch.get_loops(last)
        sch.vectorize(eloops[-1])
        init = sch.decompose_reduction(rb, rks[0])
        iloops = sch.get_loops(init)
        sch.unroll(iloops[-2])
        sch.vectorize(iloops[-1])
        if producers:
            # the padded plane of this task's channel vector, right before its stencil (it stays in L1)
            pb = producers[0].block_rv
            sch.compute_at(pb, outer, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(pb)[-1])
        return sch
