"""TVM lowering rules for the Core ATen breadth ops: more elementwise math and activations,
prod/any/all/argmin, topk/sort, flip, scatter, index_put, slice_scatter, generalized
advanced indexing and the selective scan.

Why a module of its own: :mod:`ctc.backends.tvm.lower` holds the transformer ops; these rules
register into the same :data:`~ctc.backends.tvm.lower.RULES` table when it is imported.  Where
TVM's own operator rounds or orders differently from torch (``round`` is half-away-from-zero in
TVM, half-to-even in torch; float ``remainder``/``floor_divide`` follow torch's fmod-based
formulas), the rule is a TE expression that computes exactly the reference's formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ctc.backends.tvm.lower import Ctx, Operands, _axis, _dt, _scalar_value, rule
from ctc.ir.graph import Node

FLOATS = ("f32", "f16", "bf16", "f64")


def edt(e: Any) -> str:
    """The dtype of a TIR expression (TVM 0.27 exposes it as ``.ty``)."""
    return str(e.ty)


def _ew(ctx: Ctx, node: Node, fn: Callable[..., Any], *args: Any, name: str | None = None) -> Any:
    """An elementwise TE op: ``fn`` maps the input element expressions to the output element."""
    from tvm import te

    def f(*ts: Any) -> Any:
        shape = ts[0].shape
        return te.compute(shape, lambda *i: fn(*(t(*i) for t in ts)), name=name or node.op)

    return ctx.te(f, *args, name=name or node.op)


# --- unary math --------------------------------------------------------------------
_RELAX_UNARY = {"acos": "acos", "acosh": "acosh", "asin": "asin", "asinh": "asinh", "atan": "atan", "atanh": "atanh",
                "tan": "tan", "sign": "sign"}


@rule(*_RELAX_UNARY)
def _unary_relax(ctx: Ctx, node: Node, a: Operands) -> Any:
    return getattr(ctx.relax.op, _RELAX_UNARY[node.op])(a["x"])


@rule("floor", "ceil", "trunc", "round")
def _rounding(ctx: Ctx, node: Node, a: Operands) -> Any:
    from tvm import tirx

    if a.type("x").dtype not in FLOATS:
        return a["x"]  # integers are already whole
    if node.op == "round":  # torch rounds half to even (tirx.round is half away from zero)
        return _ew(ctx, node, tirx.nearbyint, a["x"])
    return getattr(ctx.relax.op, node.op)(a["x"])


def _wide(x: Any) -> tuple[Any, str]:
    """``x`` widened to f64 (for formulas that lose precision near 0 in f32) and its dtype."""
    from tvm import tirx

    return tirx.Cast("float64", x), edt(x)


@rule("expm1", "log1p", "log2", "log10", "cosh", "sinh")
def _log_exp(ctx: Ctx, node: Node, a: Operands) -> Any:
    from tvm import tirx

    def f(x: Any) -> Any:
        w, dt = _wide(x)
        if node.op == "expm1":
            y = tirx.exp(w) - tirx.const(1.0, "float64")
        elif node.op == "log1p":
            y = tirx.log(w + tirx.const(1.0, "float64"))
        elif node.op in ("cosh", "sinh"):  # tirx.cosh/sinh have no LLVM lowering in TVM 0.27
            e, ie = tirx.exp(w), tirx.exp(-w)
            y = ((e + ie) if node.op == "cosh" else (e - ie)) * tirx.const(0.5, "float64")
        elif node.op == "log2":
            y = tirx.log2(w)
        else:
            y = tirx.log10(w)
        return tirx.Cast(dt, y)

    return _ew(ctx, node, f, a["x"])


@rule("isnan", "isinf")
def _predicate(ctx: Ctx, node: Node, a: Operands) -> Any:
    if a.type("x").dtype not in FLOATS:
        return ctx.relax.op.zeros(ctx.shape_of_type(a.type("x")), "bool")
    return getattr(ctx.relax.op, node.op)(a["x"])


# --- activations -------------------------------------------------------------------
@rule("hardswish", "hardsigmoid", "softplus", "mish", "elu", "leaky_relu")
def _activation(ctx: Ctx, node: Node, a: Operands) -> Any:
    from tvm import tirx

    at = node.attrs

    def c(v: float, x: Any) -> Any:
        return tirx.const(v, edt(x))

    def softplus(x: Any, beta: float, threshold: float) -> Any:
        w, dt = _wide(x * c(beta, x))
        sp = tirx.Cast(dt, tirx.log(tirx.exp(w) + tirx.const(1.0, "float64"))) / c(beta, x)
        return tirx.Select(x * c(beta, x) > c(threshold, x), x, sp)

    def f(x: Any) -> Any:
        if node.op in ("hardswish", "hardsigmoid"):
            r6 = tirx.min(tirx.max(x + c(3.0, x), c(0.0, x)), c(6.0, x))
            return (x * r6 if node.op == "hardswish" else r6) / c(6.0, x)
        if node.op == "softplus":
            return softplus(x, at["beta"], at["threshold"])
        if node.op == "mish":
            return x * tirx.tanh(softplus(x, 1.0, 20.0))
        if node.op == "elu":
            w, dt = _wide(x * c(at["input_scale"], x))
            neg = tirx.Cast(dt, tirx.exp(w) - tirx.const(1.0, "float64")) * c(at["alpha"] * at["scale"], x)
            return tirx.Select(x > c(0.0, x), x * c(at["scale"], x), neg)
        return tirx.Select(x > c(0.0, x), x, x * c(at["negative_slope"], x))

    return _ew(ctx, node, f, a["x"])


# --- binary math ---------------------------------------------------------------------
def _xor(p: Any, q: Any) -> Any:
    """``p != q`` for bool TIR expressions (a direct i1 compare fails LLVM verification)."""
    from tvm import tirx

    return tirx.Or(tirx.And(p, tirx.Not(q)), tirx.And(tirx.Not(p), q))


def _fmod(x: Any, y: Any) -> Any:
    """C ``fmod`` for floats, ``x - trunc(x / y) * y`` evaluated in f64 (``tirx.fmod`` has no LLVM
    lowering in TVM 0.27); exact for f32 operands whose quotient is below 2^29."""
    from tvm import tirx

    dt = edt(x)
    xd, yd = tirx.Cast("float64", x), tirx.Cast("float64", y)
    return tirx.Cast(dt, xd - tirx.trunc(xd / yd) * yd)


def _float_remainder(x: Any, y: Any) -> Any:
    """torch's float remainder: ``fmod`` moved to the divisor's sign."""
    from tvm import tirx

    m = _fmod(x, y)
    zero = tirx.const(0.0, edt(x))
    return tirx.Select(tirx.And(m != zero, _xor(y < zero, m < zero)), m + y, m)


def _float_floor_divide(x: Any, y: Any) -> Any:
    """torch's ``div_floor_floating``: the floor of the quotient computed exactly via fmod."""
    from tvm import tirx

    zero = tirx.const(0.0, edt(x))
    one = tirx.const(1.0, edt(x))
    m = _fmod(x, y)
    div = (x - m) / y
    div = tirx.Select(tirx.And(m != zero, _xor(y < zero, m < zero)), div - one, div)
    fl = tirx.floor(div)
    fl = tirx.Select(div - fl > tirx.const(0.5, edt(x)), fl + one, fl)
    res = tirx.Select(div != zero, fl, tirx.copysign(zero, x / y))
    return tirx.Select(y == zero, x / y, res)


def _binary_te(ctx: Ctx, node: Node, a: Operands, elem: Callable[[Any, Any], Any]) -> Any:
    """A binary op as one TE compute (numpy broadcasting, or the ``scalar``/``reverse`` attributes)."""
    from tvm import te, tirx

    tensor = "a" if a.value("a") is not None else "b"  # the other side may be the scalar attribute
    dt = a.type(tensor).dtype
    s = node.attrs["scalar"]
    if s is not None:
        rev = node.attrs["reverse"]

        def f1(x: Any) -> Any:
            c = tirx.const(_scalar_value(dt, s), x.dtype)
            return te.compute(x.shape, lambda *i: elem(c, x(*i)) if rev else elem(x(*i), c), name=node.op)

        return ctx.te(f1, a[tensor], name=node.op)

    def at(t: Any, idx: tuple[Any, ...]) -> Any:
        sub = idx[len(idx) - len(t.shape):]
        return t(*[tirx.const(0, "int64") if _is_one(d) else i for d, i in zip(t.shape, sub, strict=True)])

    def f2(p: Any, q: Any) -> Any:
        return te.compute(ctx.dims.shape(node.outputs[0].type), lambda *i: elem(at(p, i), at(q, i)), name=node.op)

    return ctx.te(f2, a["a"], a["b"], name=node.op)


@rule("atan2", "fmod", "remainder", "floor_divide", "trunc_divide")
def _div_like(ctx: Ctx, node: Node, a: Operands) -> Any:
    from tvm import tirx

    is_float = (a.value("a") or a.value("b")).type.dtype in FLOATS  # type: ignore[union-attr]

    def elem(p: Any, q: Any) -> Any:
        if node.op == "atan2":
            return tirx.atan2(p, q)
        if node.op == "fmod":
            return _fmod(p, q) if is_float else tirx.truncmod(p, q)
        if node.op == "remainder":
            return _float_remainder(p, q) if is_float else tirx.floormod(p, q)
        if node.op == "floor_divide":
            return _float_floor_divide(p, q) if is_float else tirx.floordiv(p, q)
        return tirx.trunc(p / q) if is_float else tirx.truncdiv(p, q)

    return _binary_te(ctx, node, a, elem)


def _is_one(d: Any) -> bool:
    return hasattr(d, "value") and int(d.value) == 1


@rule("bitwise_and", "bitwise_or", "bitwise_xor", "logical_xor")
def _bitwise(ctx: Ctx, node: Node, a: Operands) -> Any:
    from tvm import tirx

    def truth(v: Any) -> Any:
        return v if edt(v) == "bool" else v != tirx.const(0, edt(v))

    def elem(p: Any, q: Any) -> Any:
        if node.op == "logical_xor" or edt(p) == "bool":
            bp, bq = truth(p), truth(q)
            if node.op == "bitwise_and":
                return tirx.And(bp, bq)
            if node.op == "bitwise_or":
                return tirx.Or(bp, bq)
            return _xor(bp, bq)
        if node.op == "bitwise_and":
            return p & q
        if node.op == "bitwise_or":
            return p | q
        return p ^ q

    return _binary_te(ctx, node, a, elem)


@rule("bitwise_not")
def _bitwise_not(ctx: Ctx, node: Node, a: Operands) -> Any:
    if a.type("x").dtype == "bool":
        return ctx.relax.op.logical_not(a["x"])
    return ctx.relax.op.bitwise_not(a["x"])


# --- reductions ------------------------------------------------------------------------
@rule("prod", "any", "all", "argmin")
def _reduce_more(ctx: Ctx, node: Node, a: Operands) -> Any:
    op = ctx.relax.op
    t = a.type("x")
    axes = [_axis(i, t.rank) for i in node.attrs["axes"]]
    keep = node.attrs["keepdim"]
    x = a["x"]
    if node.op == "argmin":
        return op.argmin(x, axis=axes[0], keepdims=keep)
    if node.op == "prod":
        if t.dtype not in FLOATS:
            x = ctx.emit(op.astype(x, "int64"))
        return op.prod(x, axis=axes, keepdims=keep)
    nz = x if t.dtype == "bool" else ctx.emit(op.not_equal(x, ctx.const(0, t.dtype)))
    i8 = ctx.emit(op.astype(nz, "int8"))
    r = ctx.emit((op.max if node.op == "any" else op.min)(i8, axis=axes, keepdims=keep))
    return op.astype(r, "bool")


@rule("cumprod")
def _cumprod(ctx: Ctx, node: Node, a: Operands) -> Any:
    dt = node.outputs[0].type.dtype
    x = a["x"] if a.type("x").dtype == dt else ctx.emit(ctx.relax.op.astype(a["x"], _dt(dt)))
    return ctx.relax.op.cumprod(x, axis=node.attrs["axis"], dtype=_dt(dt))


@rule("topk")
def _topk(ctx: Ctx, node: Node, a: Operands) -> Any:
    op = ctx.relax.op
    at = node.attrs
    res = ctx.emit(op.topk(a["x"], k=at["k"], axis=at["axis"], ret_type="both", largest=at["largest"], dtype="int64"))
    return [ctx.emit(ctx.relax.TupleGetItem(res, 0)), ctx.emit(ctx.relax.TupleGetItem(res, 1))]


@rule("sort")
def _sort(ctx: Ctx, node: Node, a: Operands) -> Any:
    op = ctx.relax.op
    ax = node.attrs["axis"]
    idx = ctx.emit(op.argsort(a["x"], axis=ax, descending=node.attrs["descending"], dtype="int64"))
    return [ctx.emit(op.gather_elements(a["x"], idx, axis=ax)), idx]


@rule("flip")
def _flip(ctx: Ctx, node: Node, a: Operands) -> Any:
    x = a["x"]
    for ax in node.attrs["axes"]:
        x = ctx.emit(ctx.relax.op.flip(x, axis=ax))
    return x


# --- indexing --------------------------------------------------------------------------
def _prim(e: Any) -> Any:
    """A dim (int or TIR expression) as an int64 TIR expression, for passing to ``emit_te``."""
    from tvm import tirx

    return tirx.IntImm("int64", e) if isinstance(e, int) else e


def _wrap_index(i: Any, dim: Any) -> Any:
    """A torch index (negative counts from the end) as an in-range int64 position (clamped)."""
    from tvm import tirx

    i = tirx.Cast("int64", i)
    i = tirx.Select(i < tirx.const(0, "int64"), i + dim, i)
    return tirx.max(tirx.min(i, dim - tirx.const(1, "int64")), tirx.const(0, "int64"))


def advanced_index_coords(o: tuple[Any, ...], x: Any, idx: tuple[Any, ...], axes: tuple[int, ...], brank: int
                          ) -> list[Any]:
    """For output position ``o`` of ``x[..idx on axes..]`` (torch's placement rule), the position in
    ``x`` it reads: index tensors (broadcast, negative wrapped) on ``axes``, the rest of ``o`` elsewhere."""
    pre = axes[0] if axes[-1] - axes[0] + 1 == len(axes) else 0
    b = o[pre:pre + brank]
    rest = list(o[:pre]) + list(o[pre + brank:])
    src: list[Any] = []
    k = 0
    for d in range(len(x.shape)):
        if d in axes:
            t = idx[axes.index(d)]
            tb = b[len(b) - len(t.shape):]
            pos = [0 if _is_one(s) else j for s, j in zip(t.shape, tb, strict=True)]
            src.append(_wrap_index(t(*pos), x.shape[d]))
        else:
            src.append(rest[k])
            k += 1
    return src


@rule("index")
def _index_general(ctx: Ctx, node: Node, a: Operands) -> Any:
    """``x[..., i0, ..., i1, ...]`` with torch's placement rule (see :func:`ctc.ir.ops.shape.index`)."""
    from ctc.ir.ops.shape import index_axes
    from tvm import te

    xt = a.type("x")
    axes = index_axes(xt.rank, len(node.operands("indices")), node.attrs["axes"])
    out_shape = ctx.dims.shape(node.outputs[0].type)
    brank = len(out_shape) - (xt.rank - len(axes))

    def f(x: Any, *idx: Any) -> Any:
        def elem(*o: Any) -> Any:
            return x(*advanced_index_coords(o, x, idx, axes, brank))

        return te.compute(out_shape, elem, name="adv_index")

    return ctx.te(f, a["x"], *a.all("indices"), name="adv_index")


def scatter_flat_kernel(reduce: str, dtype: str) -> Any:
    """A PrimFunc ``(X [N], OFF [M] i64, V [M], Y [N])``: ``Y = X`` then, in order,
    ``Y[OFF[j]] = V[j]`` (``update``) or ``Y[OFF[j]] op= V[j]`` (``add``/``mul``/``max``/``min``).

    Sequential over the writes, so duplicate positions behave like torch's CPU loop (the last write
    wins; reductions see every value).  Offsets are clamped into ``[0, N)``."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def kernel(x_h: T.handle, off_h: T.handle, v_h: T.handle, y_h: T.handle) -> None:
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        N = T.int64()
        M = T.int64()
        X = T.match_buffer(x_h, (N,), dtype)
        OFF = T.match_buffer(off_h, (M,), "int64")
        V = T.match_buffer(v_h, (M,), dtype)
        Y = T.match_buffer(y_h, (N,), dtype)
        with T.sblock("root"):
            for i in T.parallel(N):
                Y[i] = X[i]
            for j in range(M):
                if reduce == "update":
                    Y[T.max(T.min(OFF[j], N - T.int64(1)), T.int64(0))] = V[j]
                elif reduce == "add":
                    Y[T.max(T.min(OFF[j], N - T.int64(1)), T.int64(0))] = \
                        Y[T.max(T.min(OFF[j], N - T.int64(1)), T.int64(0))] + V[j]
                elif reduce == "mul":
                    Y[T.max(T.min(OFF[j], N - T.int64(1)), T.int64(0))] = \
                        Y[T.max(T.min(OFF[j], N - T.int64(1)), T.int64(0))] * V[j]
                elif reduce == "max":
                    Y[T.max(T.min(OFF[j], N - T.int64(1)), T.int64(0))] = \
                        T.max(Y[T.max(T.min(OFF[j], N - T.int64(1)), T.int64(0))], V[j])
                else:
                    Y[T.max(T.min(OFF[j], N - T.int64(1)), T.int64(0))] = \
                        T.min(Y[T.max(T.min(OFF[j], N - T.int64(1)), T.int64(0))], V[j])

    return kernel


def _flat_scatter(ctx: Ctx, x: Any, xt: Any, offsets: Any, values: Any, reduce: str) -> Any:
    """``x`` (ctc type ``xt``) with ``values`` written at flat ``offsets`` (both ``[M]``)."""
    from ctc.backends.tvm.int_kernels import add_prim_func

    op = ctx.relax.op
    shape = ctx.shape_of_type(xt)
    total: Any = 1
    for d in shape:
        total = total * d
    flat = ctx.emit(op.reshape(x, [total]))
    dt = _dt(xt)
    gv = add_prim_func(ctx.bb, scatter_flat_kernel(reduce, dt), f"scatter_flat_{reduce}_{dt}")
    y = ctx.emit(ctx.relax.call_tir(gv, [flat, offsets, values], ctx.relax.TensorType([total], dt)))
    return ctx.emit(op.reshape(y, shape))


def _row_major_offset(coords: list[Any], shape: list[Any]) -> Any:
    off: Any = 0
    for c, d in zip(coords, shape, strict=True):
        off = off * d + c
    return off


def _scatter_operands(ctx: Ctx, node: Node, a: Operands, src: Any) -> tuple[Any, Any]:
    """Flat offsets into x and the matching src values, one per index element (``[M]`` each)."""
    from tvm import te, tirx

    ax = node.attrs["axis"]
    m_total: Any = 1
    for d in ctx.shape_of_type(a.type("index")):
        m_total = m_total * d
    op = ctx.relax.op

    def offs(x: Any, idx: Any) -> Any:
        def elem(*i: Any) -> Any:
            coords = [tirx.Cast("int64", c) for c in i]
            coords[ax] = _wrap_index(idx(*i), x.shape[ax])
            return _row_major_offset(coords, list(x.shape))

        return te.compute(idx.shape, elem, name="scatter_offsets")

    def vals(s: Any, idx: Any) -> Any:
        return te.compute(idx.shape, lambda *i: s(*i), name="scatter_values")

    o = ctx.te(offs, a["x"], a["index"], name="scatter_offsets")
    v = ctx.te(vals, src, a["index"], name="scatter_values")
    return ctx.emit(op.reshape(o, [m_total])), ctx.emit(op.reshape(v, [m_total]))


@rule("scatter")
def _scatter(ctx: Ctx, node: Node, a: Operands) -> Any:
    """Flat offsets of every index element, then a sequential scatter kernel (TVM's
    ``scatter_elements`` misplaces writes when the index is smaller than the data)."""
    op = ctx.relax.op
    at = node.attrs
    red = at["reduce"]
    xt = a.type("x")
    dt = xt.dtype
    src = a.get("src")
    if src is None:
        src = ctx.emit(op.full(ctx.shape_of_type(a.type("index")), ctx.const(_scalar_value(dt, at["value"]), dt),
                               _dt(dt)))
    off, vals = _scatter_operands(ctx, node, a, src)
    if red == "none":
        return _flat_scatter(ctx, a["x"], xt, off, vals, "update")
    is_float = dt in FLOATS
    big = math.inf if is_float else float(2 ** 31 - 1)
    ident = {"sum": 0.0, "mean": 0.0, "prod": 1.0, "amax": -big, "amin": big}[red]
    base = a["x"]
    if not at["include_self"]:
        # zeros + identity: legalizing ``full`` with an infinite value fails in TVM 0.27
        fill = ctx.emit(op.add(ctx.emit(op.zeros_like(vals)), ctx.const(_scalar_value(dt, ident), dt)))
        base = _flat_scatter(ctx, base, xt, off, fill, "update")
    kind = {"sum": "add", "mean": "add", "prod": "mul", "amax": "max", "amin": "min"}[red]
    out = _flat_scatter(ctx, base, xt, off, vals, kind)
    if red != "mean":
        return out
    ones = ctx.emit(op.ones(ctx.shape_of_type(xt), _dt(dt)))
    if not at["include_self"]:
        ones = _flat_scatter(ctx, ones, xt, off, ctx.emit(op.zeros_like(vals)), "update")
    cnt = _flat_scatter(ctx, ones, xt, off, ctx.emit(op.ones_like(vals)), "add")
    return op.divide(out, cnt) if is_float else op.floor_divide(out, cnt)


@rule("index_put")
def _index_put(ctx: Ctx, node: Node, a: Operands) -> Any:
    """Flat offsets of every position of the indexed shape (see :func:`ctc.ir.ops.shape.index`),
    values broadcast to it, then the sequential scatter kernel (``add`` when accumulating)."""
    from ctc.ir.ops.infer import broadcast
    from ctc.ir.ops.shape import index_axes, index_result_shape
    from tvm import te, tirx

    op = ctx.relax.op
    xt, vt = a.type("x"), a.type("values")
    its = [v.type for v in node.operands("indices")]
    axes = index_axes(xt.rank, len(its), node.attrs["axes"])
    bshape = broadcast(*(t.shape for t in its))
    target = xt.with_shape(index_result_shape(xt.shape, axes, bshape))
    tshape = ctx.shape_of_type(target)
    brank = len(bshape)

    def offs(x: Any, *idx: Any) -> Any:
        def elem(*o: Any) -> Any:
            coords = [tirx.Cast("int64", c) for c in advanced_index_coords(o, x, idx, axes, brank)]
            return _row_major_offset(coords, list(x.shape))

        return te.compute(tshape, elem, name="index_put_offsets")

    o = ctx.te(offs, a["x"], *a.all("indices"), name="index_put_offsets")
    vals = a["values"] if vt.dtype == xt.dtype else ctx.emit(op.astype(a["values"], _dt(xt)))
    vals = ctx.emit(op.broadcast_to(vals, tshape))
    m_total: Any = 1
    for d in tshape:
        m_total = m_total * d
    off = ctx.emit(op.reshape(o, [m_total]))
    vals = ctx.emit(op.reshape(vals, [m_total]))
    return _flat_scatter(ctx, a["x"], xt, off, vals, "add" if node.attrs["accumulate"] else "update")


@rule("slice_scatter")
def _slice_scatter(ctx: Ctx, node: Node, a: Operands) -> Any:
    from tvm import te, tirx

    at = node.attrs
    ax, step = at["axis"], at["step"]
    st, en = ctx.dims(at["start"][0]), ctx.dims(at["end"][0])

    def f(x: Any, s: Any, st: Any, en: Any) -> Any:
        def elem(*i: Any) -> Any:
            j = i[ax]
            inside = tirx.And(tirx.And(j >= st, j < en), tirx.floormod(j - st, step) == 0)
            k = list(i)
            k[ax] = tirx.max(tirx.min(tirx.floordiv(j - st, step), s.shape[ax] - 1), 0)
            return tirx.Select(inside, s(*k), x(*i))

        return te.compute(x.shape, elem, name="slice_scatter")

    # the bounds travel as arguments: emit_te remaps the symbols of its operands, not free ones
    return ctx.te(f, a["x"], a["src"], _prim(st), _prim(en), name="slice_scatter")


# --- state space -----------------------------------------------------------------------
def selective_scan_kernel(n_state: int) -> Any:
    """A PrimFunc ``(u, dt [B, D, L], A [D, N], Bm, Cm [B, N, L], Y [B, D, L])``, f32: the scan runs
    over L sequentially, parallel over (batch, channel), the state of N in registers."""
    from tvm.script import tirx as T

    n = n_state

    @T.prim_func(private=True, s_tir=True)
    def kernel(u_h: T.handle, dt_h: T.handle, a_h: T.handle, b_h: T.handle, c_h: T.handle, y_h: T.handle) -> None:
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        Bn = T.int64()
        D = T.int64()
        L = T.int64()
        U = T.match_buffer(u_h, (Bn, D, L), "float32")
        DT = T.match_buffer(dt_h, (Bn, D, L), "float32")
        A = T.match_buffer(a_h, (D, n), "float32")
        Bm = T.match_buffer(b_h, (Bn, n, L), "float32")
        Cm = T.match_buffer(c_h, (Bn, n, L), "float32")
        Y = T.match_buffer(y_h, (Bn, D, L), "float32")
        with T.sblock("root"):
            for bd in T.parallel(Bn * D):
                h = T.decl_buffer((n,), "float32", scope="local")
                acc = T.decl_buffer((1,), "float32", scope="local")
                for k in range(n):
                    h[k] = T.float32(0)
                for t in range(L):
                    acc[0] = T.float32(0)
                    for k in range(n):
                        h[k] = T.exp(A[bd % D, k] * DT[bd // D, bd % D, t]) * h[k] + \
                            DT[bd // D, bd % D, t] * Bm[bd // D, k, t] * U[bd // D, bd % D, t]
                        acc[0] = acc[0] + h[k] * Cm[bd // D, k, t]
                    Y[bd // D, bd % D, t] = acc[0]

    return kernel


@rule("selective_scan")
def _selective_scan(ctx: Ctx, node: Node, a: Operands) -> Any:
    from ctc.backends.tvm.int_kernels import add_prim_func
    from ctc.backends.tvm.lower import LoweringError, _static_int

    op = ctx.relax.op
    n = _static_int(ctx, a.type("A").shape[1])
    if n is None:
        raise LoweringError(f"selective_scan at {node.scope or '<root>'}: the state size (A's columns) must be static")
    names = ("u", "delta", "A", "B", "C")  # the kernel's argument order
    args = [a[k] if a.type(k).dtype == "f32" else ctx.emit(op.astype(a[k], "float32")) for k in names]
    gv = add_prim_func(ctx.bb, selective_scan_kernel(n), f"selective_scan_n{n}")
    ut = a.type("u")
    y = ctx.emit(ctx.relax.call_tir(gv, args, ctx.relax.TensorType(ctx.shape_of_type(ut), "float32")))
    return y if ut.dtype == "f32" else op.astype(y, _dt(ut))


__all__ = ["selective_scan_kernel"]
