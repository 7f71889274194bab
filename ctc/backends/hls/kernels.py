"""The fpga target's kernels for the shared Relax lowering (:func:`ctc.backends.tvm.lower.lower`).

Why: the one lowering of the ctc IR walks the graph and emits Relax; a target swaps in its own
kernels for the ops that need them (``lower(..., kernels=hls_kernels(plan))``).  Here those are
the ops whose integer model (:mod:`.exact`) fixes an order or an approximation: each rule below
is the TE (or, for ``quant_linear``, the tiled TIR engine of :mod:`.qlinear`) of exactly the
formula :mod:`.exact` states, so the printed C agrees with the integer model bit for bit.
Reductions are TE ``sum``/max reductions, which lower to one left-to-right loop from the
initial value.  Attention is three kernels (scores with scale and masks, row softmax, the
weighted sum of values); the off-chip tensors between them are what the model charges.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ctc.backends.hls import exact as E
from ctc.backends.hls.qlinear import QLinearShape, Tiling, default_tiling, prepack, qlinear_primfunc
from ctc.ir.graph import Module, Node
from ctc.ir.symbolic import eval_dim

__all__ = ["hls_kernels", "qlinear_layers"]


def _c(v: float) -> Any:
    from tvm import tirx

    return tirx.const(v, "float32")


# --------------------------------------------------------------------------- scalar expressions
def exp_expr(x: Any) -> Any:
    """:func:`.exact.exp_poly` as a TIR expression."""
    from tvm import tirx

    xc = tirx.min(tirx.max(x, _c(E.EXP_LO)), _c(E.EXP_HI))
    n = tirx.floor(xc * _c(E.EXP_LOG2E) + _c(0.5))
    r = (xc - n * _c(E.EXP_C1)) - n * _c(E.EXP_C2)
    p = _c(E.EXP_COEFFS[0])
    for c in E.EXP_COEFFS[1:]:
        p = p * r + _c(c)
    y = ((p * (r * r)) + r) + _c(1.0)
    bits = tirx.shift_left(tirx.Cast("int32", n) + tirx.const(127, "int32"), tirx.const(23, "int32"))
    return tirx.Select(x < _c(E.EXP_LO), _c(0.0), y * tirx.reinterpret("float32", bits))


def erf_expr(x: Any) -> Any:
    """:func:`.exact.erf_poly` as a TIR expression."""
    from tvm import tirx

    x = tirx.min(tirx.max(x, _c(-E.ERF_CLAMP)), _c(E.ERF_CLAMP))
    x2 = x * x
    p = x2 * _c(E.ERF_ALPHA[0]) + _c(E.ERF_ALPHA[1])
    for c in E.ERF_ALPHA[2:]:
        p = x2 * p + _c(c)
    p = x * p
    q = x2 * _c(E.ERF_BETA[0]) + _c(E.ERF_BETA[1])
    for c in E.ERF_BETA[2:]:
        q = x2 * q + _c(c)
    return p / q


def _tanh_expr(x: Any) -> Any:
    return _c(1.0) - _c(2.0) / (exp_expr(x * _c(2.0)) + _c(1.0))


def _unary_expr(op: str, attrs: Mapping[str, Any]) -> Any:
    def gelu(x: Any) -> Any:
        if attrs.get("approximate") == "tanh":
            inner = (x + ((x * x) * x) * _c(0.044715)) * _c(math.sqrt(2.0 / math.pi))
            return (x * _c(0.5)) * (_c(1.0) + _tanh_expr(inner))
        return (x * _c(0.5)) * (_c(1.0) + erf_expr(x * _c(1.0 / math.sqrt(2.0))))

    return {
        "exp": exp_expr,
        "erf": erf_expr,
        "tanh": _tanh_expr,
        "sigmoid": lambda x: _c(1.0) / (_c(1.0) + exp_expr(-x)),
        "silu": lambda x: x / (_c(1.0) + exp_expr(-x)),
        "gelu": gelu,
    }[op]


def _f32_only(node: Node) -> None:
    from ctc.backends.tvm.lower import LoweringError

    bad = [v.type for v in [*node.inputs, *node.outputs] if v.type.dtype not in ("f32", "bool", "i64", "i32")]
    if bad:
        raise LoweringError(f"{node.op} at {node.scope or '<root>'}: the fpga target's float islands are fp32; "
                            f"got {bad[0]} (cast the model to float32)")


# --------------------------------------------------------------------------- rules
def _unary(ctx: Any, node: Node, a: Any) -> Any:
    from tvm import te

    _f32_only(node)
    f = _unary_expr(node.op, node.attrs)
    return ctx.te(lambda x: te.compute(x.shape, lambda *i: f(x(*i)), name=node.op), a["x"], name=node.op)


def _argmax_reducer() -> Any:
    from tvm import te, tirx

    return te.comm_reducer(lambda acc, v: tirx.Select(v > acc, v, acc),
                           lambda t: tirx.const(-math.inf, t), name="running_max")


def softmax_te(x: Any) -> Any:
    """Row softmax over the last axis: running max, sum of exp from 0, exp / sum (exp recomputed)."""
    from tvm import te

    lead, n = list(x.shape[:-1]), x.shape[-1]
    k1 = te.reduce_axis((0, n), "k")
    mx = te.compute(lead, lambda *i: _argmax_reducer()(x[(*i, k1)], axis=k1), name="row_max")
    k2 = te.reduce_axis((0, n), "k")
    s = te.compute(lead, lambda *i: te.sum(exp_expr(x[(*i, k2)] - mx[i]), axis=k2), name="row_sum")
    return te.compute(x.shape, lambda *i: exp_expr(x(*i) - mx[i[:-1]]) / s[i[:-1]], name="softmax")


def _softmax(ctx: Any, node: Node, a: Any) -> Any:
    from ctc.backends.tvm.lower import LoweringError

    _f32_only(node)
    rank = node.operand("x").type.rank  # type: ignore[union-attr]
    if node.attrs["axis"] % rank != rank - 1:
        raise LoweringError(f"softmax at {node.scope or '<root>'}: the fpga target normalizes the last axis only")
    return ctx.te(softmax_te, a["x"], name="softmax")


def _layer_norm(ctx: Any, node: Node, a: Any) -> Any:
    from tvm import te, tirx

    from ctc.backends.tvm.lower import LoweringError

    _f32_only(node)
    if node.attrs["normalized_ndim"] != 1:
        raise LoweringError(f"layer_norm at {node.scope or '<root>'}: the fpga target normalizes the last axis only")
    eps = float(node.attrs["eps"])
    w, b = a.get("weight"), a.get("bias")
    has_w, has_b = w is not None, b is not None

    def f(x: Any, *wb: Any) -> Any:
        lead, n = list(x.shape[:-1]), x.shape[-1]
        kf = _c(float(int(n)))
        k1 = te.reduce_axis((0, n), "k")
        mean = te.compute(lead, lambda *i: te.sum(x[(*i, k1)], axis=k1), name="row_sum")
        mean = te.compute(lead, lambda *i: mean(*i) / kf, name="mean")
        k2 = te.reduce_axis((0, n), "k")
        var = te.compute(lead, lambda *i: te.sum((x[(*i, k2)] - mean[i]) * (x[(*i, k2)] - mean[i]), axis=k2),
                         name="row_sq")
        rstd = te.compute(lead, lambda *i: _c(1.0) / tirx.sqrt(var(*i) / kf + _c(eps)), name="rstd")

        def out(*i: Any) -> Any:
            y = (x(*i) - mean[i[:-1]]) * rstd[i[:-1]]
            if has_w:
                y = y * wb[0][i[-1]]
            if has_b:
                y = y + wb[-1][i[-1]]
            return y

        return te.compute(x.shape, out, name="layer_norm")

    return ctx.te(f, a["x"], *(t for t in (w, b) if t is not None), name="layer_norm")


def _rms_norm(ctx: Any, node: Node, a: Any) -> Any:
    from tvm import te, tirx

    _f32_only(node)
    eps = float(node.attrs["eps"])

    def f(x: Any, w: Any) -> Any:
        lead, n = list(x.shape[:-1]), x.shape[-1]
        k = te.reduce_axis((0, n), "k")
        ms = te.compute(lead, lambda *i: te.sum(x[(*i, k)] * x[(*i, k)], axis=k), name="row_sq")
        r = te.compute(lead, lambda *i: _c(1.0) / tirx.sqrt(ms(*i) / _c(float(int(n))) + _c(eps)), name="rrms")
        return te.compute(x.shape, lambda *i: w[i[-1]] * (x(*i) * r[i[:-1]]), name="rms_norm")

    return ctx.te(f, a["x"], a["weight"], name="rms_norm")


def _dot_nk(x: Any, w: Any) -> Any:
    from tvm import te

    k = te.reduce_axis((0, w.shape[1]), "k")
    return te.compute([*x.shape[:-1], w.shape[0]], lambda *i: te.sum(x[(*i[:-1], k)] * w[i[-1], k], axis=k),
                      name="dot")


def _linear(ctx: Any, node: Node, a: Any) -> Any:
    _f32_only(node)
    y = ctx.te(_dot_nk, a["x"], a["weight"], name="linear")
    bias = a.get("bias")
    return ctx.relax.op.add(y, bias) if bias is not None else y


def _matmul(ctx: Any, node: Node, a: Any) -> Any:
    from tvm import te

    from ctc.backends.tvm.lower import LoweringError

    _f32_only(node)
    at, bt = node.operand("a").type, node.operand("b").type  # type: ignore[union-attr]
    if at.rank < 2 or bt.rank < 2 or (bt.rank > 2 and tuple(at.shape[:-2]) != tuple(bt.shape[:-2])):
        raise LoweringError(f"matmul at {node.scope or '<root>'}: the fpga target multiplies [..., M, K] by "
                            f"[K, N] or by the same batch of [K, N]; got {at} x {bt}")

    def f(x: Any, y: Any) -> Any:
        k = te.reduce_axis((0, x.shape[-1]), "k")
        if len(y.shape) == 2:
            return te.compute([*x.shape[:-1], y.shape[-1]],
                              lambda *i: te.sum(x[(*i[:-1], k)] * y[k, i[-1]], axis=k), name="matmul")
        return te.compute([*x.shape[:-1], y.shape[-1]],
                          lambda *i: te.sum(x[(*i[:-1], k)] * y[(*i[:-2], k, i[-1])], axis=k), name="matmul")

    return ctx.te(f, a["a"], a["b"], name="matmul")


def _bcast(t: Any, idx: tuple[Any, ...]) -> Any:
    """``t`` indexed by ``idx`` with numpy broadcasting (size-1 dims read index 0; missing leading dims dropped)."""
    r = len(t.shape)
    sub = idx[len(idx) - r:]
    return t[tuple(0 if int(d) == 1 else i for d, i in zip(t.shape, sub, strict=True))]


def _sdpa(ctx: Any, node: Node, a: Any) -> Any:
    from tvm import te, tirx

    from ctc.backends.tvm.lower import LoweringError

    _f32_only(node)
    qt, kt = node.operand("q").type, node.operand("k").type  # type: ignore[union-attr]
    if qt.rank != 4:
        raise LoweringError(f"attention at {node.scope or '<root>'}: the fpga target takes [batch, heads, seq, dim]")
    hq, hk = int(qt.shape[1]), int(kt.shape[1])
    group = hq // hk
    sc = node.attrs["scale"] if node.attrs["scale"] is not None else 1.0 / math.sqrt(int(qt.shape[-1]))
    causal = bool(node.attrs["is_causal"])
    mask = node.operand("mask")
    mt = mask.type if mask is not None else None

    def scores(q: Any, k: Any, *m: Any) -> Any:
        d = te.reduce_axis((0, q.shape[3]), "d")
        dot = te.compute([q.shape[0], q.shape[1], q.shape[2], k.shape[2]],
                         lambda b, h, i, j: te.sum(q[b, h, i, d] * k[b, h // group, j, d], axis=d), name="qk")

        def out(b: Any, h: Any, i: Any, j: Any) -> Any:
            v = dot[b, h, i, j] * _c(sc)
            ninf = _c(-math.inf)
            if causal:
                v = tirx.Select(j > i, ninf, v)
            if m:
                mv = _bcast(m[0], (b, h, i, j))
                v = tirx.Select(mv, v, ninf) if mt is not None and mt.dtype == "bool" else v + mv
            return v

        return te.compute(dot.shape, out, name="scores")

    lg = ctx.te(scores, a["q"], a["k"], *([a["mask"]] if mask is not None else []), name="attn_scores")
    p = ctx.te(softmax_te, lg, name="softmax")

    def values(pp: Any, v: Any) -> Any:
        j = te.reduce_axis((0, v.shape[2]), "j")
        return te.compute([pp.shape[0], pp.shape[1], pp.shape[2], v.shape[3]],
                          lambda b, h, i, e: te.sum(pp[b, h, i, j] * v[b, h // group, j, e], axis=j), name="pv")

    return ctx.te(values, p, a["v"], name="attn_values")


# --------------------------------------------------------------------------- quant_linear
def _static(d: Any, static_dims: Mapping[str, int]) -> int:
    """A dim's value with the design's symbols bound; expressions too (GPT-2's Conv1D rows are ``batch*seq``)."""
    return eval_dim(d, dict(static_dims))  # a SymbolicError (a ValueError) names an unbound symbol


def qlinear_layers(module: Module, static_dims: Mapping[str, int]) -> dict[str, QLinearShape]:
    """Every ``quant_linear`` of ``module`` (by output value name) with its static shape."""
    return {n.outputs[0].name: qlinear_layers_for(n, static_dims) for n in module.nodes if n.op == "quant_linear"}


def kernel_name(prefix: str, scope: str, used: set[str]) -> str:
    """A C identifier ``prefix_scope`` unique among ``used``."""
    base = f"{prefix}_{re.sub(r'[^0-9A-Za-z]+', '_', scope).strip('_')}".rstrip("_")[:60]
    name, i = base, 1
    while name in used:
        name, i = f"{base}_{i}", i + 1
    used.add(name)
    return name


def _quant_linear_rule(plan: Mapping[str, Tiling], static_dims: Mapping[str, int],
                       record: dict[str, Any]) -> Any:
    def rule(ctx: Any, node: Node, a: Any) -> Any:
        from ctc.backends.tvm.int_kernels import add_prim_func
        from ctc.backends.tvm.lower import LoweringError

        relax = ctx.relax
        shape = qlinear_layers_for(node, static_dims)
        tiling = plan.get(node.outputs[0].name) or default_tiling(shape)
        names = ["x", "qweight", "w_scale", "w_zero", "bias", "act_scale", "act_zero"]
        ops = {n: node.operand(n) for n in names if node.has_operand(n)}
        pname = {k: ctx.param_name(v) for k, v in ops.items() if k != "x"}
        if any(v is None for v in pname.values()):
            raise LoweringError(f"quant_linear at {node.scope or '<root>'}: weights, scales and zero points must be "
                                "parameters for the fpga target")
        qw, wz = ctx.param_array(pname["qweight"]), ctx.param_array(pname["w_zero"])
        wsum = prepack(shape, qw, wz)
        used = ctx.memo.setdefault("hls_names", set())
        name = kernel_name("qlinear", node.scope or node.outputs[0].name, used)
        gv = add_prim_func(ctx.bb, qlinear_primfunc(shape, tiling, name), name)
        record[name] = (node.outputs[0].name, shape, tiling)
        x = ctx.val(ops["x"])
        x2 = ctx.emit(relax.op.reshape(x, [shape.m, shape.k]))
        bias = ctx.val(ops["bias"]) if "bias" in ops else relax.const(np.zeros(shape.n, np.float32))
        args = [x2, ctx.val(ops["qweight"]), ctx.val(ops["w_scale"]), ctx.val(ops["w_zero"]), bias,
                ctx.val(ops["act_scale"]), ctx.val(ops["act_zero"]), relax.const(wsum)]
        y = ctx.emit(relax.call_tir(gv, args, relax.TensorType([shape.m, shape.n], "float32")))
        return relax.op.reshape(y, ctx.dims.shape(node.outputs[0].type))

    return rule


def qlinear_layers_for(node: Node, static_dims: Mapping[str, int]) -> QLinearShape:
    """The static shape of one ``quant_linear`` (located errors for dynamic shapes, float activations)."""
    from ctc.backends.tvm.lower import LoweringError

    x, qweight = node.operand("x"), node.operand("qweight")
    assert x is not None and qweight is not None
    xt = x.type
    try:
        m = int(np.prod([_static(d, static_dims) for d in xt.shape[:-1]])) if xt.rank > 1 else 1
    except ValueError as e:
        raise LoweringError(f"quant_linear at {node.scope or '<root>'}: {e}; the fpga target builds static shapes "
                            "(set seq_len)") from None
    a = node.attrs
    if a["a_bits"] is None or a["a_bits"] == 16:
        raise LoweringError(f"quant_linear at {node.scope or '<root>'} has float activations (weight-only); the "
                            "fpga target's integer engine needs quantized activations (a_bits 4..8)")
    return QLinearShape(m, int(xt.shape[-1]), int(qweight.type.shape[0]), int(a["w_bits"]), int(a["a_bits"]),
                        int(a["group_size"]), bool(a["w_symmetric"]), tuple(int(c) for c in a["act_clusters"]))


def hls_kernels(plan: Mapping[str, Tiling], static_dims: Mapping[str, int],
                record: dict[str, Any] | None = None) -> dict[str, Any]:
    """The rule table handed to ``lower(..., kernels=...)`` for the fpga target; ``record`` receives
    ``kernel name -> (ctc value name, QLinearShape, Tiling)`` for every quant_linear engine emitted."""
    rules: dict[str, Any] = {op: _unary for op in ("exp", "erf", "tanh", "sigmoid", "silu", "gelu")}
    rules.update({"softmax": _softmax, "layer_norm": _layer_norm, "rms_norm": _rms_norm, "linear": _linear,
                  "matmul": _matmul, "scaled_dot_product_attention": _sdpa,
                  "quant_linear": _quant_linear_rule(plan, static_dims, {} if record is None else record)})
    return rules
