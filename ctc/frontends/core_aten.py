"""The rest of Core ATen: handlers for every Core ATen op that :mod:`ctc.frontends.aten_map` does
not map, the ops ctc keeps above Core ATen on purpose (convolutions, pooling, activations), and
the reasons for the few Core ATen ops that have no meaning in an inference graph.

How capture uses it: when an exported graph holds an op that no handler maps, the program is
decomposed with :func:`decomposition_table` -- torch's Core ATen decompositions minus every op
ctc maps -- so whatever a model calls arrives as ops of this table.  ``tests/test_core_aten.py``
enumerates torch's Core ATen opset (ops tagged ``torch.Tag.core``) and fails on any op that is
neither mapped, decomposed, nor listed in :data:`NOT_SUPPORTED` with its reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from ctc.frontends.aten_map import TABLE, Handler, Unavailable, _arg, _is_tensor, aten
from ctc.ir.graph import Value
from ctc.ir.symbolic import dim_floordiv, dim_mul, dim_sub, normalize_dim
from ctc.ir.types import FLOAT_DTYPES, Dim

if TYPE_CHECKING:
    from ctc.frontends.aten_capture import Translator

# Core ATen ops that never reach a handler, and why (shown to the user when one appears).
NOT_SUPPORTED: dict[str, str] = {
    "aten._local_scalar_dense.default": "`.item()`/`int(tensor)` turns a tensor into a Python number at run time "
                                        "(data-dependent); keep the value a tensor (torch.where, masks)",
    "aten.nonzero.default": "the result's size depends on the data (torch.nonzero, torch.where(cond) with one "
                            "argument, boolean-mask indexing); use masks (torch.where(cond, a, b), masked_fill)",
    "aten.as_strided.default": "arbitrary strides have no ctc equivalent; use view/unfold/slicing instead",
    "aten._embedding_bag.default": "embedding bags (per-bag offsets) are not supported; use embedding + a reduction",
    "aten._fft_r2c.default": "FFTs produce complex tensors, which the ctc IR does not have",
    "aten._fft_c2r.default": "FFTs produce complex tensors, which the ctc IR does not have",
    "aten.grid_sampler_2d.default": "grid_sample (data-dependent sampling positions) is not supported yet",
    "aten.col2im.default": "fold/col2im is not supported yet",
    "aten._cdist_forward.default": "cdist is not supported yet; compute distances with matmul",
    "aten._pdist_forward.default": "pdist is not supported yet; compute distances with matmul",
    "aten.rand.default": "random numbers at inference: call model.eval() (dropout) or pass the noise as an input",
    "aten.randn.default": "random numbers at inference: call model.eval() (dropout) or pass the noise as an input",
    "aten.randperm.default": "random permutations at inference: pass the permutation as an input",
    "aten.atan2.out": "an out= variant; functional graphs use aten.atan2.default",
    "aten.resize_.default": "an in-place resize; functionalized graphs do not contain it (allocate the tensor at "
                            "its final size instead)",
}
_TRAINING = "a training-only op (gradients); capture the model in eval mode without autograd"
for _n in ("aten._adaptive_avg_pool2d_backward.default", "aten.avg_pool2d_backward.default",
           "aten.convolution_backward.default", "aten.embedding_dense_backward.default",
           "aten.max_pool2d_with_indices_backward.default", "aten.native_group_norm_backward.default",
           "aten.native_layer_norm_backward.default"):
    NOT_SUPPORTED[_n] = _TRAINING


def core_aten_ops() -> list[str]:
    """Every overload torch tags as Core ATen (``torch.Tag.core``), as ``aten.<op>.<overload>``."""
    out = []
    for name in dir(torch.ops.aten):
        try:
            packet = getattr(torch.ops.aten, name)
        except (AttributeError, RuntimeError):
            continue
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for ov in packet.overloads():
            op = getattr(packet, ov)
            if torch.Tag.core in op.tags:
                out.append(str(op))
    return sorted(out)


@cache
def _mapped_overloads() -> tuple[Any, ...]:
    out = []
    for key in TABLE:
        parts = key.split(".")
        if parts[0] != "aten" or len(parts) != 3:
            continue
        packet = getattr(torch.ops.aten, parts[1], None)
        op = getattr(packet, parts[2], None) if packet is not None else None
        if op is not None:
            out.append(op)
    return tuple(out)


def decomposition_table() -> Any:
    """torch's Core ATen decompositions without the ops ctc maps (those stay whole)."""
    table = torch.export.default_decompositions()
    for op in _mapped_overloads():
        try:
            del table[op]
        except KeyError:
            pass
    return table


# --------------------------------------------------------------------------- helpers
def _ints(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(x) for x in v)
    return v * n if len(v) == 1 and n > 1 else v


def _opt_value(tr: Translator, a: Any) -> Value | None:
    return tr.t(a) if a is not None else None


def _emit_multi(tr: Translator, op: str, ins: Sequence[Value], attrs: dict[str, Any]) -> list[Value]:
    return list(tr.m.create_node(op, list(ins), attrs, scope=tr.scope, block=tr.block).outputs)


# --------------------------------------------------------------------------- unary / activations
def _unary(op: str, keep_dtype: bool = False) -> Handler:
    def h(tr: Translator, node: fx.Node) -> Value:
        x = tr.t(node.args[0])
        if not keep_dtype:
            x = tr.cast_to(x, tr.out_dtype(node))
        return tr.emit(op, [x])

    return h


for _o in ("acos", "acosh", "asin", "asinh", "atan", "atanh", "cosh", "sinh", "tan", "expm1", "log1p", "log2",
           "log10"):
    aten(f"{_o}.default")(_unary(_o))
for _o in ("floor", "ceil", "round", "trunc", "sign", "isnan", "isinf"):
    aten(f"{_o}.default")(_unary(_o, keep_dtype=True))
for _o in ("hardswish", "hardsigmoid", "mish"):
    aten(f"{_o}.default")(_unary(_o))


@aten("softplus.default")
def _softplus(tr: Translator, node: fx.Node) -> Value:
    return tr.emit("softplus", [tr.t(node.args[0])], {"beta": float(_arg(node, 1, "beta", 1.0)),
                                                      "threshold": float(_arg(node, 2, "threshold", 20.0))})


@aten("elu.default")
def _elu(tr: Translator, node: fx.Node) -> Value:
    return tr.emit("elu", [tr.t(node.args[0])], {"alpha": float(_arg(node, 1, "alpha", 1.0)),
                                                 "scale": float(_arg(node, 2, "scale", 1.0)),
                                                 "input_scale": float(_arg(node, 3, "input_scale", 1.0))})


@aten("selu.default")
def _selu(tr: Translator, node: fx.Node) -> Value:
    return tr.emit("elu", [tr.t(node.args[0])], {"alpha": 1.6732632423543772, "scale": 1.0507009873554805})


@aten("celu.default")
def _celu(tr: Translator, node: fx.Node) -> Value:
    alpha = float(_arg(node, 1, "alpha", 1.0))
    return tr.emit("elu", [tr.t(node.args[0])], {"alpha": alpha, "input_scale": 1.0 / alpha})


@aten("leaky_relu.default")
def _leaky_relu(tr: Translator, node: fx.Node) -> Value:
    return tr.emit("leaky_relu", [tr.t(node.args[0])], {"negative_slope": float(_arg(node, 1, "negative_slope", 0.01))})


@aten("hardtanh.default", "relu6.default")
def _hardtanh(tr: Translator, node: fx.Node) -> Value:
    if str(node.target) == "aten.relu6.default":
        lo, hi = 0.0, 6.0
    else:
        lo, hi = float(_arg(node, 1, "min_val", -1.0)), float(_arg(node, 2, "max_val", 1.0))
    x = tr.emit("maximum", [tr.t(node.args[0])], {"scalar": lo})
    return tr.emit("minimum", [x], {"scalar": hi})


@aten("clamp.Tensor")
def _clamp_tensor(tr: Translator, node: fx.Node) -> Value:
    lo, hi = _arg(node, 1, "min", None), _arg(node, 2, "max", None)
    x: Any = node.args[0]
    if lo is not None:
        x = tr.binary("maximum", x, lo, node)
    if hi is not None:
        x = tr.binary("minimum", x if isinstance(x, Value) else x, hi, node)
    return x if isinstance(x, Value) else tr.t(x)


# --------------------------------------------------------------------------- binary
def _binary(op: str) -> Handler:
    def h(tr: Translator, node: fx.Node) -> Value:
        return tr.binary(op, node.args[0], node.args[1], node)

    return h


for _o in ("atan2", "fmod", "remainder"):
    aten(f"{_o}.default" if _o == "atan2" else f"{_o}.Tensor")(_binary(_o))
    if _o != "atan2":
        aten(f"{_o}.Scalar")(_binary(_o))


@aten("div.Tensor_mode", "div.Scalar_mode")
def _div_mode(tr: Translator, node: fx.Node) -> Value:
    mode = _arg(node, 2, "rounding_mode", None)
    op = {None: "div", "floor": "floor_divide", "trunc": "trunc_divide"}[mode]
    return tr.binary(op, node.args[0], node.args[1], node)


@aten("floor_divide.default")
def _floor_divide(tr: Translator, node: fx.Node) -> Value:
    return tr.binary("floor_divide", node.args[0], node.args[1], node)


@aten("logical_xor.default")
def _logical_xor(tr: Translator, node: fx.Node) -> Value:
    return tr.emit("logical_xor", [tr.t(node.args[0]), tr.t(node.args[1])])


@aten("bitwise_xor.Tensor", "bitwise_and.Scalar", "bitwise_or.Scalar", "bitwise_xor.Scalar", "__xor__.Tensor")
def _bitwise(tr: Translator, node: fx.Node) -> Value:
    name = str(node.target).split(".")[1].strip("_")
    op = {"and": "bitwise_and", "or": "bitwise_or", "xor": "bitwise_xor"}.get(name, name)
    a, b = node.args[0], node.args[1]
    if _is_tensor(b):
        return tr.emit(op, [tr.cast_to(tr.t(a), tr.out_dtype(node)), tr.cast_to(tr.t(b), tr.out_dtype(node))])
    return tr.emit(op, [tr.cast_to(tr.t(a), tr.out_dtype(node))], {"scalar": float(tr.scalar(b, node))})


# --------------------------------------------------------------------------- reductions
def _axes_of(tr: Translator, dims: Any, rank: int) -> tuple[int, ...]:
    if dims is None or dims == []:
        return tuple(range(rank))
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    return tuple(sorted({tr.axis(d, rank) for d in dims}))


@aten("any.default", "any.dim", "any.dims", "all.default", "all.dim", "all.dims")
def _any_all(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    op = "any" if ".any." in str(node.target) else "all"
    if x.type.rank == 0:
        return tr.emit("ne", [x], {"scalar": 0.0}) if x.type.dtype != "bool" else x
    return tr.emit(op, [x], {"axes": _axes_of(tr, _arg(node, 1, "dim", None), x.type.rank),
                             "keepdim": bool(_arg(node, 2, "keepdim", False))})


@aten("prod.default", "prod.dim_int")
def _prod(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    want = tr.out_dtype(node)
    if want in FLOAT_DTYPES:
        x = tr.cast_to(x, want)
    if str(node.target) == "aten.prod.default":
        axes, keep = tuple(range(x.type.rank)), False
    else:
        axes, keep = (tr.axis(node.args[1], x.type.rank),), bool(_arg(node, 2, "keepdim", False))
    if not axes:
        return x
    return tr.emit("prod", [x], {"axes": axes, "keepdim": keep})


def _arg_reduce(op: str) -> Handler:
    def h(tr: Translator, node: fx.Node) -> Value:
        x = tr.t(node.args[0])
        dim = _arg(node, 1, "dim", None)
        keep = bool(_arg(node, 2, "keepdim", False))
        if dim is None:
            x = tr.emit("reshape", [x], {"shape": (_numel(x),)})
            r = tr.emit(op, [x], {"axes": (0,), "keepdim": False})
            return r if not keep else tr.emit("reshape", [r], {"shape": tr.out_shape(node)})
        return tr.emit(op, [x], {"axes": (tr.axis(dim, x.type.rank),), "keepdim": keep})

    return h


aten("argmin.default")(_arg_reduce("argmin"))


def _numel(x: Value) -> Dim:
    n: Dim = 1
    for d in x.type.shape:
        n = dim_mul(n, d)
    return normalize_dim(n)


@aten("max.dim", "min.dim")
def _max_min_dim(tr: Translator, node: fx.Node) -> list[Value]:
    x = tr.t(node.args[0])
    ax = tr.axis(node.args[1], x.type.rank)
    keep = bool(_arg(node, 2, "keepdim", False))
    big = "max" in str(node.target)
    vals = tr.emit("amax" if big else "amin", [x], {"axes": (ax,), "keepdim": keep})
    idx = tr.emit("argmax" if big else "argmin", [x], {"axes": (ax,), "keepdim": keep})
    return [vals, idx]


@aten("max.default", "min.default")
def _max_min_all(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    big = "max" in str(node.target)
    return tr.emit("amax" if big else "amin", [x], {"axes": tuple(range(x.type.rank)), "keepdim": False})


@aten("var.correction", "var.dim", "std.correction", "std.dim")
def _var(tr: Translator, node: fx.Node) -> Value:
    """``sum((x - mean)^2) / (N - correction)``, then ``sqrt`` for std."""
    x = tr.cast_to(tr.t(node.args[0]), tr.out_dtype(node))
    name = str(node.target)
    axes = _axes_of(tr, _arg(node, 1, "dim", None), x.type.rank)
    if name.endswith(".dim"):
        unbiased = _arg(node, 2, "unbiased", True)
        corr = 1.0 if unbiased else 0.0
        keep = bool(_arg(node, 3, "keepdim", False))
    else:
        c = node.kwargs.get("correction", 1)
        corr = 1.0 if c is None else float(c)
        keep = bool(node.kwargs.get("keepdim", False))
    mean = tr.emit("mean", [x], {"axes": axes, "keepdim": True})
    d = tr.emit("sub", [x, mean])
    ss = tr.emit("sum", [tr.emit("mul", [d, d])], {"axes": axes, "keepdim": keep})
    n: Dim = 1
    for a in axes:
        n = dim_mul(n, x.type.shape[a])
    n = normalize_dim(n)
    if isinstance(n, int):
        v = tr.emit("div", [ss], {"scalar": float(max(n - corr, 0.0))})
    else:
        cnt = tr.cast_to(tr.scalar_tensor(dim_sub(n, int(corr)) if corr == int(corr) else n, node), x.type.dtype)
        v = tr.emit("div", [ss, cnt])
    return tr.emit("sqrt", [v]) if ".std." in name else v


@aten("linalg_vector_norm.default")
def _vector_norm(tr: Translator, node: fx.Node) -> Value:
    x = tr.cast_to(tr.t(node.args[0]), tr.out_dtype(node))
    ordv = float(_arg(node, 1, "ord", 2))
    axes = _axes_of(tr, _arg(node, 2, "dim", None), x.type.rank)
    keep = bool(_arg(node, 3, "keepdim", False))
    ax = tr.emit("abs", [x])
    if ordv == float("inf"):
        return tr.emit("amax", [ax], {"axes": axes, "keepdim": keep})
    if ordv == float("-inf"):
        return tr.emit("amin", [ax], {"axes": axes, "keepdim": keep})
    if ordv == 0:
        nz = tr.cast_to(tr.emit("ne", [x], {"scalar": 0.0}), x.type.dtype)
        return tr.emit("sum", [nz], {"axes": axes, "keepdim": keep})
    if ordv == 1:
        return tr.emit("sum", [ax], {"axes": axes, "keepdim": keep})
    if ordv == 2:
        return tr.emit("sqrt", [tr.emit("sum", [tr.emit("mul", [x, x])], {"axes": axes, "keepdim": keep})])
    s = tr.emit("sum", [tr.emit("pow", [ax], {"scalar": ordv})], {"axes": axes, "keepdim": keep})
    return tr.emit("pow", [s], {"scalar": 1.0 / ordv})


@aten("cumprod.default")
def _cumprod(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    want = tr.out_dtype(node)
    if want in FLOAT_DTYPES:
        x = tr.cast_to(x, want)
    return tr.emit("cumprod", [x], {"axis": tr.axis(node.args[1], x.type.rank)})


@aten("topk.default")
def _topk(tr: Translator, node: fx.Node) -> list[Value]:
    x = tr.t(node.args[0])
    k = node.args[1]
    if not isinstance(k, int):
        raise tr.unsupported(node, "topk with a symbolic k (it must be a Python int)")
    ax = tr.axis(_arg(node, 2, "dim", -1), x.type.rank)
    return _emit_multi(tr, "topk", [x], {"k": k, "axis": ax, "largest": bool(_arg(node, 3, "largest", True)),
                                         "sorted": bool(_arg(node, 4, "sorted", True))})


@aten("sort.default", "sort.stable")
def _sort(tr: Translator, node: fx.Node) -> list[Value]:
    x = tr.t(node.args[0])
    if str(node.target) == "aten.sort.stable":
        stable = bool(node.kwargs.get("stable", False))
        dim, desc = node.kwargs.get("dim", -1), node.kwargs.get("descending", False)
    else:
        stable, dim, desc = False, _arg(node, 1, "dim", -1), _arg(node, 2, "descending", False)
    return _emit_multi(tr, "sort", [x], {"axis": tr.axis(dim, x.type.rank), "descending": bool(desc),
                                         "stable": stable})


# --------------------------------------------------------------------------- shape
@aten("flip.default")
def _flip(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    axes = sorted({tr.axis(d, x.type.rank) for d in node.args[1]})
    return tr.emit("flip", [x], {"axes": tuple(axes)}) if axes else x


@aten("repeat.default")
def _repeat(tr: Translator, node: fx.Node) -> Value:
    """``x.repeat(r)``: view as ``[1, d0, 1, d1, ...]``, expand to ``[r0, d0, r1, d1, ...]``, merge pairs."""
    x = tr.t(node.args[0])
    reps = [tr.dim(r) for r in node.args[1]]  # may be symbolic (x.repeat(batch, 1))
    shape = [1] * (len(reps) - x.type.rank) + list(x.type.shape)
    if all(r == 1 for r in reps):
        return tr.emit("reshape", [x], {"shape": tuple(shape)}) if len(shape) != x.type.rank else x
    inter: list[Dim] = []
    big: list[Dim] = []
    for r, d in zip(reps, shape, strict=True):
        inter += [1, d]
        big += [r, d]
    v = tr.emit("reshape", [x], {"shape": tuple(inter)})
    v = tr.emit("expand", [v], {"shape": tuple(big)})
    return tr.emit("reshape", [v], {"shape": tr.out_shape(node)})


@aten("repeat_interleave.self_int")
def _repeat_interleave(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    r = node.args[1]
    dim = _arg(node, 2, "dim", None)
    if not isinstance(r, int):
        raise tr.unsupported(node, "repeat_interleave with a symbolic repeat count")
    if dim is None:
        x = tr.emit("reshape", [x], {"shape": (_numel(x),)})
        dim = 0
    ax = tr.axis(dim, x.type.rank)
    u = tr.emit("unsqueeze", [x], {"axis": ax + 1})
    shape = list(u.type.shape)
    shape[ax + 1] = r
    e = tr.emit("expand", [u], {"shape": tuple(shape)})
    return tr.emit("reshape", [e], {"shape": tr.out_shape(node)})


@aten("diagonal.default")
def _diagonal(tr: Translator, node: fx.Node) -> Value:
    """``x.diagonal(offset, d1, d2)`` as advanced indexing with two aranges, the diagonal moved last."""
    x = tr.t(node.args[0])
    off = int(_arg(node, 1, "offset", 0))
    r = x.type.rank
    d1, d2 = tr.axis(_arg(node, 2, "dim1", 0), r), tr.axis(_arg(node, 3, "dim2", 1), r)
    length = tr.out_shape(node)[-1]
    s1, s2 = max(-off, 0), max(off, 0)
    i1 = tr.emit("arange", [], {"start": (s1,), "end": (normalize_dim(f"({length}) + {s1}"),), "dtype": "i64"})
    i2 = tr.emit("arange", [], {"start": (s2,), "end": (normalize_dim(f"({length}) + {s2}"),), "dtype": "i64"})
    lo, hi = sorted((d1, d2))
    v = tr.emit("index", [x, *([i1, i2] if d1 < d2 else [i2, i1])], {"axes": (lo, hi)})
    pos = lo if hi == lo + 1 else 0  # where torch's indexing rule put the diagonal axis
    perm = [i for i in range(v.type.rank) if i != pos] + [pos]
    return tr.emit("permute", [v], {"perm": tuple(perm)}) if perm != list(range(v.type.rank)) else v


@aten("unfold.default")
def _unfold(tr: Translator, node: fx.Node) -> Value:
    """``x.unfold(dim, size, step)``: windows gathered with an index ``[n, size]``, the window axis last."""
    x = tr.t(node.args[0])
    ax = tr.axis(node.args[1], x.type.rank)
    size, step = int(node.args[2]), int(node.args[3])
    d = x.type.shape[ax]
    n = normalize_dim(dim_floordiv(dim_sub(d, size), step)) if not isinstance(d, int) else (d - size) // step
    n = normalize_dim(f"({n}) + 1")
    starts = tr.emit("arange", [], {"start": (0,), "end": (dim_mul(n, step),), "step": step, "dtype": "i64"})
    offs = tr.emit("arange", [], {"end": (size,), "dtype": "i64"})
    idx = tr.emit("add", [tr.emit("unsqueeze", [starts], {"axis": 1}), tr.emit("unsqueeze", [offs], {"axis": 0})])
    v = tr.emit("index", [x, idx], {"axes": (ax,)})  # [..., n, size, ...]
    if ax == x.type.rank - 1:
        return v
    perm = [i for i in range(v.type.rank) if i != ax + 1] + [ax + 1]
    return tr.emit("permute", [v], {"perm": tuple(perm)})


# --------------------------------------------------------------------------- scatter family
@aten("scatter.src", "scatter.value", "scatter_add.default", "scatter_reduce.two", "scatter.reduce",
      "scatter.value_reduce")
def _scatter(tr: Translator, node: fx.Node) -> Value:
    name = str(node.target)
    x, idx = tr.t(node.args[0]), tr.t(node.args[2])
    ax = tr.axis(node.args[1], x.type.rank)
    src = node.args[3]
    reduce, include_self = "none", True
    if name == "aten.scatter_add.default":
        reduce = "sum"
    elif name == "aten.scatter_reduce.two":
        reduce = str(node.args[4])
        include_self = bool(_arg(node, 5, "include_self", True))
    elif name in ("aten.scatter.reduce", "aten.scatter.value_reduce"):
        reduce = {"add": "sum", "multiply": "prod"}[str(_arg(node, 4, "reduce", "add"))]
    if _is_tensor(src):
        return tr.emit("scatter", [x, idx, tr.cast_to(tr.t(src), x.type.dtype)],
                       {"axis": ax, "reduce": reduce, "include_self": include_self})
    val = float(tr.scalar(src, node))
    if reduce != "none":
        full = tr.emit("full", [], {"shape": idx.type.shape, "value": val, "dtype": x.type.dtype})
        return tr.emit("scatter", [x, idx, full], {"axis": ax, "reduce": reduce, "include_self": include_self})
    return tr.emit("scatter", [x, idx], {"axis": ax, "value": val})


def _index_list(tr: Translator, node: fx.Node, items: Sequence[Any]) -> tuple[list[Value], tuple[int, ...]]:
    idx = list(items)
    while idx and idx[-1] is None:
        idx.pop()
    axes = tuple(i for i, t in enumerate(idx) if t is not None)
    return [tr.t(idx[a]) for a in axes], axes


@aten("index_put.default")
def _index_put(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    vals = tr.cast_to(tr.t(node.args[2]), x.type.dtype)
    acc = bool(_arg(node, 3, "accumulate", False))
    ins, axes = _index_list(tr, node, node.args[1])
    if any(i.type.dtype == "bool" for i in ins):
        if len(ins) != 1 or axes != (0,) or acc or vals.type.rank > x.type.rank - ins[0].type.rank:
            raise tr.unsupported(node, "assigning through a boolean mask with a data-dependent number of values "
                                       "(x[mask] = tensor); write torch.where(mask, value, x)")
        mask = ins[0]
        for _ in range(x.type.rank - mask.type.rank):
            mask = tr.emit("unsqueeze", [mask], {"axis": mask.type.rank})
        return tr.emit("where", [mask, vals, x])  # x[mask] = v with v broadcast over the selected elements
    return tr.emit("index_put", [x, vals, *ins], {"axes": None if axes == tuple(range(len(axes))) else axes,
                                                  "accumulate": acc})


@aten("slice_scatter.default")
def _slice_scatter(tr: Translator, node: fx.Node) -> Value:
    x, src = tr.t(node.args[0]), tr.t(node.args[1])
    ax = tr.axis(_arg(node, 2, "dim", 0), x.type.rank)
    s, e = tr.slice_bounds(x, ax, _arg(node, 3, "start", None), _arg(node, 4, "end", None))
    step = int(_arg(node, 5, "step", 1) or 1)
    if isinstance(s, int) and isinstance(e, int) and e < s:
        return x
    return tr.emit("slice_scatter", [x, tr.cast_to(src, x.type.dtype)],
                   {"axis": ax, "start": (s,), "end": (e,), "step": step})


@aten("select_scatter.default")
def _select_scatter(tr: Translator, node: fx.Node) -> Value:
    x, src = tr.t(node.args[0]), tr.t(node.args[1])
    ax = tr.axis(node.args[2], x.type.rank)
    i = node.args[3]
    if isinstance(i, int) and i < 0:
        d = x.type.shape[ax]
        i = d + i if isinstance(d, int) else normalize_dim(f"({d}) - {-i}")
    i = tr.dim(i) if not isinstance(i, (int, str)) else i
    src = tr.emit("unsqueeze", [tr.cast_to(src, x.type.dtype)], {"axis": ax})
    return tr.emit("slice_scatter", [x, src], {"axis": ax, "start": (i,), "end": (normalize_dim(f"({i}) + 1"),)})


@aten("masked_scatter.default")
def _masked_scatter(tr: Translator, node: fx.Node) -> Value:
    """Fill ``x`` where ``mask`` holds with the leading elements of ``source`` in order: the k-th true
    position takes ``source.flatten()[k]`` (its index is the running count of trues minus one)."""
    x, mask, src = (tr.t(a) for a in node.args[:3])
    n = _numel(x)
    if tuple(mask.type.shape) != tuple(x.type.shape):
        mask = tr.emit("expand", [mask], {"shape": x.type.shape})
    flat_m = tr.emit("reshape", [mask], {"shape": (n,)})
    pos = tr.emit("sub", [tr.emit("cumsum", [flat_m], {"axis": 0, "dtype": "i64"})], {"scalar": 1.0})
    pos = tr.emit("maximum", [pos], {"scalar": 0.0})
    flat_s = tr.emit("reshape", [tr.cast_to(src, x.type.dtype)], {"shape": (_numel(src),)})
    picked = tr.emit("index", [flat_s, pos])
    out = tr.emit("where", [flat_m, picked, tr.emit("reshape", [x], {"shape": (n,)})])
    return tr.emit("reshape", [out], {"shape": x.type.shape})


# --------------------------------------------------------------------------- creation / copies
@aten("empty.memory_format", "empty_strided.default", "empty_like.default", "new_empty.default",
      "new_empty_strided.default")
def _empty(tr: Translator, node: fx.Node) -> Value:
    # empty tensors hold unspecified values; every correct program overwrites them, zeros are one choice
    return tr.emit("full", [], {"shape": tr.out_shape(node), "value": 0.0, "dtype": tr.out_dtype(node)})


@aten("fill.Scalar")
def _fill(tr: Translator, node: fx.Node) -> Value:
    return tr.emit("full", [], {"shape": tr.out_shape(node), "value": float(tr.scalar(node.args[1], node)),
                                "dtype": tr.out_dtype(node)})


@aten("fill.Tensor")
def _fill_tensor(tr: Translator, node: fx.Node) -> Value:
    v = tr.cast_to(tr.t(node.args[1]), tr.out_dtype(node))
    return tr.emit("expand", [v], {"shape": tr.out_shape(node)}) if v.type.shape != tr.out_shape(node) else v


@aten("copy.default")
def _copy(tr: Translator, node: fx.Node) -> Value:
    """``dst.copy_(src)`` made functional: ``src`` in ``dst``'s dtype, broadcast to its shape."""
    src = tr.cast_to(tr.t(node.args[1]), tr.out_dtype(node))
    shape = tr.out_shape(node)
    if tuple(src.type.shape) == tuple(shape):
        return src
    return tr.emit("expand", [src], {"shape": shape})


@aten("native_dropout.default")
def _native_dropout(tr: Translator, node: fx.Node) -> list[Any]:
    if _arg(node, 2, "train", False):
        raise tr.unsupported(node, "dropout in training mode; call model.eval() before capture")
    return [tr.t(node.args[0]), Unavailable("the dropout mask exists only in training")]


# --------------------------------------------------------------------------- convolution
def _conv_attrs(nd: int, stride: Any, padding: Any, dilation: Any, groups: Any) -> dict[str, Any]:
    return {"stride": _ints(stride, nd), "padding": _ints(padding, nd), "dilation": _ints(dilation, nd),
            "groups": int(groups)}


@aten("convolution.default")
def _convolution(tr: Translator, node: fx.Node) -> Value:
    x, w = tr.t(node.args[0]), tr.t(node.args[1])
    b = _opt_value(tr, node.args[2])
    nd = w.type.rank - 2
    stride, padding, dilation, transposed, out_pad, groups = node.args[3:9]
    attrs = _conv_attrs(nd, stride, padding, dilation, groups)
    if transposed:
        attrs.update({"transposed": True, "output_padding": _ints(out_pad, nd)})
    elif any(_ints(out_pad, nd)):
        raise tr.unsupported(node, "output_padding on a non-transposed convolution")
    return _emit_conv(tr, node, x, w, b, attrs)


def _emit_conv(tr: Translator, node: fx.Node, x: Value, w: Value, b: Value | None, attrs: dict[str, Any]) -> Value:
    unbatched = x.type.rank == w.type.rank - 1
    if unbatched:
        x = tr.emit("unsqueeze", [x], {"axis": 0})
    x = tr.cast_to(x, w.type.dtype)
    y = tr.emit("conv", [x, w] + ([tr.cast_to(b, w.type.dtype)] if b is not None else []), attrs)
    return tr.emit("squeeze", [y], {"axes": (0,)}) if unbatched else y


@aten("conv1d.default", "conv2d.default", "conv3d.default", "conv1d.padding", "conv2d.padding", "conv3d.padding")
def _conv_nd(tr: Translator, node: fx.Node) -> Value:
    x, w = tr.t(node.args[0]), tr.t(node.args[1])
    b = _opt_value(tr, _arg(node, 2, "bias", None))
    nd = w.type.rank - 2
    stride = _arg(node, 3, "stride", 1)
    padding = _arg(node, 4, "padding", 0)
    dilation = _arg(node, 5, "dilation", 1)
    groups = _arg(node, 6, "groups", 1)
    dl = _ints(dilation, nd)
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # "same": total padding d(k-1), the odd unit on the right side (torch's choice)
            ks = [int(k) for k in w.type.shape[2:]]
            total = [d * (k - 1) for d, k in zip(dl, ks, strict=True)]
            lo = [t // 2 for t in total]
            if any(t % 2 for t in total):
                pads: list[int] = []
                for t, left in zip(reversed(total), reversed(lo), strict=True):
                    pads += [0, t - left - left]
                x = tr.emit("pad", [x], {"pads": tuple(pads)})
            padding = lo
    return _emit_conv(tr, node, x, w, b, _conv_attrs(nd, stride, padding, dilation, groups))


@aten("conv_transpose1d.default", "conv_transpose2d.input", "conv_transpose3d.input")
def _conv_transpose(tr: Translator, node: fx.Node) -> Value:
    x, w = tr.t(node.args[0]), tr.t(node.args[1])
    b = _opt_value(tr, _arg(node, 2, "bias", None))
    nd = w.type.rank - 2
    attrs = _conv_attrs(nd, _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0), _arg(node, 7, "dilation", 1),
                        _arg(node, 6, "groups", 1))
    attrs.update({"transposed": True, "output_padding": _ints(_arg(node, 5, "output_padding", 0), nd)})
    return _emit_conv(tr, node, x, w, b, attrs)


# --------------------------------------------------------------------------- normalization
_NORM_STATS = "the saved mean/rstd of a normalization are only used by its backward pass"


@aten("_native_batch_norm_legit_no_training.default")
def _batch_norm_inference(tr: Translator, node: fx.Node) -> list[Any]:
    return [_batch_norm_running(tr, node, float(_arg(node, 6, "eps", 1e-5))), Unavailable(_NORM_STATS),
            Unavailable(_NORM_STATS)]


@aten("batch_norm.default")
def _batch_norm_composite(tr: Translator, node: fx.Node) -> Value:
    """``aten.batch_norm`` (input, weight, bias, running_mean, running_var, training, momentum, eps, ...) as the
    torch.fx fallback traces it: it has no Core ATen decomposition there, which failed such a capture."""
    eps = float(_arg(node, 7, "eps", 1e-5))
    if bool(_arg(node, 5, "training", False)) or node.args[3] is None or node.args[4] is None:
        return _normalize_by_batch(tr, node, eps)
    return _batch_norm_running(tr, node, eps)


def _batch_norm_running(tr: Translator, node: fx.Node, eps: float) -> Value:
    """Batch norm by running statistics; operands (input, weight, bias, running_mean, running_var, ...)."""
    x = tr.t(node.args[0])
    w, b = _opt_value(tr, node.args[1]), _opt_value(tr, node.args[2])
    mean, var = tr.t(node.args[3]), tr.t(node.args[4])
    ins = [x, tr.cast_to(mean, x.type.dtype), tr.cast_to(var, x.type.dtype)]
    if w is not None or b is not None:
        c = x.type.shape[1]
        ins.append(tr.cast_to(w, x.type.dtype) if w is not None else
                   tr.emit("full", [], {"shape": (c,), "value": 1.0, "dtype": x.type.dtype}))
        if b is not None:
            ins.append(tr.cast_to(b, x.type.dtype))
    return tr.emit("batch_norm", ins, {"eps": eps})


@aten("_native_batch_norm_legit.default", "_native_batch_norm_legit.no_stats",
      "_native_batch_norm_legit_functional.default")
def _batch_norm_batch_stats(tr: Translator, node: fx.Node) -> list[Any]:
    """Normalization by the batch's own statistics (instance norm, or batch norm without running
    statistics): mean and biased variance over every axis but the channels."""
    x = tr.t(node.args[0])
    w, b = _opt_value(tr, node.args[1]), _opt_value(tr, node.args[2])
    no_stats = str(node.target).endswith("no_stats")
    training = bool(node.args[3] if no_stats else node.args[5])
    eps = float(node.args[5] if no_stats else node.args[7])
    if not training and not no_stats:
        mean, var = tr.t(node.args[3]), tr.t(node.args[4])
        ins = [x, mean, var] + ([w] if w is not None else []) + ([b] if b is not None and w is not None else [])
        return [tr.emit("batch_norm", ins, {"eps": eps}), Unavailable(_NORM_STATS), Unavailable(_NORM_STATS)]
    out: list[Any] = [_normalize_by_batch(tr, node, eps), Unavailable(_NORM_STATS), Unavailable(_NORM_STATS)]
    if str(node.target).endswith("functional.default"):
        out += [Unavailable("running statistics are only updated in training"),
                Unavailable("running statistics are only updated in training")]
    return out


def _normalize_by_batch(tr: Translator, node: fx.Node, eps: float) -> Value:
    """Mean and biased variance over every axis but the channels; operands (input, weight, bias, ...)."""
    x = tr.t(node.args[0])
    w, b = _opt_value(tr, node.args[1]), _opt_value(tr, node.args[2])
    axes = tuple(a for a in range(x.type.rank) if a != 1)
    mean = tr.emit("mean", [x], {"axes": axes, "keepdim": True})
    d = tr.emit("sub", [x, mean])
    var = tr.emit("mean", [tr.emit("mul", [d, d])], {"axes": axes, "keepdim": True})
    y = tr.emit("mul", [d, tr.emit("rsqrt", [tr.emit("add", [var], {"scalar": eps})])])
    shape = tuple(x.type.shape[1] if a == 1 else 1 for a in range(x.type.rank))
    if w is not None:
        y = tr.emit("mul", [y, tr.emit("reshape", [w], {"shape": shape})])
    if b is not None:
        y = tr.emit("add", [y, tr.emit("reshape", [b], {"shape": shape})])
    return y


@aten("native_group_norm.default")
def _native_group_norm(tr: Translator, node: fx.Node) -> list[Any]:
    x = tr.t(node.args[0])
    w, b = _opt_value(tr, node.args[1]), _opt_value(tr, node.args[2])
    groups, eps = int(node.args[6]), float(node.args[7])
    return [_group_norm_emit(tr, x, w, b, groups, eps), Unavailable(_NORM_STATS), Unavailable(_NORM_STATS)]


@aten("group_norm.default")
def _group_norm(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    w, b = _opt_value(tr, _arg(node, 2, "weight", None)), _opt_value(tr, _arg(node, 3, "bias", None))
    return _group_norm_emit(tr, x, w, b, int(node.args[1]), float(_arg(node, 4, "eps", 1e-5)))


def _group_norm_emit(tr: Translator, x: Value, w: Value | None, b: Value | None, groups: int, eps: float) -> Value:
    ins = [x]
    if w is not None or b is not None:
        ins.append(w if w is not None else tr.emit("full", [], {"shape": (x.type.shape[1],), "value": 1.0,
                                                               "dtype": x.type.dtype}))
        if b is not None:
            ins.append(b)
    return tr.emit("group_norm", [tr.cast_to(i, x.type.dtype) for i in ins], {"groups": groups, "eps": eps})


@aten("native_layer_norm.default")
def _native_layer_norm(tr: Translator, node: fx.Node) -> list[Any]:
    x = tr.t(node.args[0])
    w, b = _opt_value(tr, node.args[2]), _opt_value(tr, node.args[3])
    ins = [x]
    if w is not None:
        ins.append(w)
        if b is not None:
            ins.append(b)
    elif b is not None:
        raise tr.unsupported(node, "layer_norm with a bias but no weight")
    y = tr.emit("layer_norm", ins, {"eps": float(node.args[4]), "normalized_ndim": len(node.args[1])})
    return [y, Unavailable(_NORM_STATS), Unavailable(_NORM_STATS)]


# --------------------------------------------------------------------------- pooling
_POOL_INDICES = "max-pool indices (return_indices=True, max_unpool) are not supported"


def _pool_common(node: fx.Node, nd: int, kernel: Any, stride: Any, padding: Any) -> dict[str, Any]:
    k = _ints(kernel, nd)
    st = _ints(stride, nd) if stride not in (None, [], ()) else k
    return {"kernel": k, "stride": st, "padding": _ints(padding, nd)}


def _max_pool_attrs(node: fx.Node, nd: int) -> dict[str, Any]:
    attrs = _pool_common(node, nd, node.args[1], _arg(node, 2, "stride", None), _arg(node, 3, "padding", 0))
    attrs.update({"dilation": _ints(_arg(node, 4, "dilation", 1), nd),
                  "ceil_mode": bool(_arg(node, 5, "ceil_mode", False))})
    return attrs


@aten("max_pool2d_with_indices.default", "max_pool3d_with_indices.default", "max_pool1d_with_indices.default")
def _max_pool_with_indices(tr: Translator, node: fx.Node) -> list[Any]:
    nd = int(str(node.target).split("max_pool")[1][0])
    y = tr.emit("max_pool", [tr.t(node.args[0])], _max_pool_attrs(node, nd))
    return [y, Unavailable(_POOL_INDICES)]


@aten("max_pool1d.default", "max_pool2d.default", "max_pool3d.default")
def _max_pool(tr: Translator, node: fx.Node) -> Value:
    nd = int(str(node.target).split("max_pool")[1][0])
    return tr.emit("max_pool", [tr.t(node.args[0])], _max_pool_attrs(node, nd))


@aten("avg_pool1d.default", "avg_pool2d.default", "avg_pool3d.default")
def _avg_pool(tr: Translator, node: fx.Node) -> Value:
    nd = int(str(node.target).split("avg_pool")[1][0])
    x = tr.cast_to(tr.t(node.args[0]), tr.out_dtype(node))
    attrs = _pool_common(node, nd, node.args[1], _arg(node, 2, "stride", None), _arg(node, 3, "padding", 0))
    attrs.update({"ceil_mode": bool(_arg(node, 4, "ceil_mode", False)),
                  "count_include_pad": bool(_arg(node, 5, "count_include_pad", True))})
    if nd > 1:
        attrs["divisor_override"] = _arg(node, 6, "divisor_override", None)
    return tr.emit("avg_pool", [x], attrs)


def _adaptive_size(tr: Translator, node: fx.Node, nd: int) -> tuple[int, ...]:
    out = tr.out_shape(node)[-nd:]
    if not all(isinstance(d, int) for d in out):
        raise tr.unsupported(node, "adaptive pooling to a symbolic output size")
    return tuple(int(d) for d in out)


@aten("_adaptive_avg_pool2d.default", "_adaptive_avg_pool3d.default", "adaptive_avg_pool1d.default",
      "adaptive_avg_pool2d.default", "adaptive_avg_pool3d.default")
def _adaptive_avg(tr: Translator, node: fx.Node) -> Value:
    nd = len(node.args[1]) if isinstance(node.args[1], (list, tuple)) else 1
    x = tr.cast_to(tr.t(node.args[0]), tr.out_dtype(node))
    return tr.emit("adaptive_avg_pool", [x], {"output_size": _adaptive_size(tr, node, nd)})


@aten("adaptive_max_pool1d.default", "adaptive_max_pool2d.default", "adaptive_max_pool3d.default")
def _adaptive_max(tr: Translator, node: fx.Node) -> list[Any]:
    nd = int(str(node.target).split("adaptive_max_pool")[1][0])
    val = node.meta["val"]
    size = tuple(int(d) for d in (val[0] if isinstance(val, (list, tuple)) else val).shape[-nd:])
    y = tr.emit("adaptive_max_pool", [tr.t(node.args[0])], {"output_size": size})
    return [y, Unavailable(_POOL_INDICES)]


# --------------------------------------------------------------------------- pad
def _pad_emit(tr: Translator, node: fx.Node, x: Value, pads: Sequence[int], mode: str, value: float) -> Value:
    pads = [int(p) for p in pads]
    if mode == "constant" and any(p < 0 for p in pads):  # negative padding crops: slice first
        for i in range(len(pads) // 2):
            ax = x.type.rank - 1 - i
            lo, hi = pads[2 * i], pads[2 * i + 1]
            if lo < 0 or hi < 0:
                d = x.type.shape[ax]
                end: Dim = dim_sub(d, -hi) if hi < 0 else d
                x = tr.slice(x, ax, max(-lo, 0), end, 1, node)
        pads = [max(p, 0) for p in pads]
    if not any(pads):
        return x
    while len(pads) > 2 and pads[-1] == 0 and pads[-2] == 0:
        pads = pads[:-2]
    return tr.emit("pad", [x], {"pads": tuple(pads), "mode": mode, "value": value if mode == "constant" else 0.0})


@aten("constant_pad_nd.default")
def _constant_pad(tr: Translator, node: fx.Node) -> Value:
    return _pad_emit(tr, node, tr.t(node.args[0]), node.args[1], "constant",
                     float(tr.scalar(_arg(node, 2, "value", 0.0), node)))


@aten("reflection_pad1d.default", "reflection_pad2d.default", "reflection_pad3d.default",
      "replication_pad1d.default", "replication_pad2d.default", "replication_pad3d.default", "_pad_circular.default")
def _mode_pad(tr: Translator, node: fx.Node) -> Value:
    name = str(node.target)
    mode = "reflect" if "reflection" in name else "replicate" if "replication" in name else "circular"
    return _pad_emit(tr, node, tr.t(node.args[0]), node.args[1], mode, 0.0)


@aten("pad.default")
def _pad(tr: Translator, node: fx.Node) -> Value:
    mode = str(_arg(node, 2, "mode", "constant"))
    value = _arg(node, 3, "value", None)
    return _pad_emit(tr, node, tr.t(node.args[0]), node.args[1], mode, float(value or 0.0))


# --------------------------------------------------------------------------- resize
_UPSAMPLE = {
    "upsample_nearest1d.vec": "nearest", "upsample_nearest2d.vec": "nearest", "upsample_nearest3d.vec": "nearest",
    "_upsample_nearest_exact1d.vec": "nearest-exact", "_upsample_nearest_exact2d.vec": "nearest-exact",
    "_upsample_nearest_exact3d.vec": "nearest-exact", "upsample_linear1d.vec": "linear",
    "upsample_bilinear2d.vec": "linear", "upsample_trilinear3d.vec": "linear", "upsample_bicubic2d.vec": "cubic",
}


@aten(*_UPSAMPLE)
def _upsample(tr: Translator, node: fx.Node) -> Value:
    mode = _UPSAMPLE[str(node.target)[len("aten."):]]
    x = tr.t(node.args[0])
    nd = x.type.rank - 2
    if mode in ("nearest", "nearest-exact"):
        ac, scales = False, _arg(node, 2, "scale_factors", None)
    else:
        ac, scales = bool(_arg(node, 2, "align_corners", False)), _arg(node, 3, "scale_factors", None)
    size = tr.out_shape(node)[2:]
    attrs: dict[str, Any] = {"size": size, "mode": mode}
    if ac:
        attrs["align_corners"] = True
    if scales is not None and _arg(node, 1, "output_size", None) is None:
        attrs["scales"] = tuple(float(s) for s in _ints_or_floats(scales, nd))
    return tr.emit("resize", [x], attrs)


def _ints_or_floats(v: Any, n: int) -> tuple[float, ...]:
    v = tuple(v) if isinstance(v, (list, tuple)) else (v,)
    return tuple(float(x) for x in (v * n if len(v) == 1 else v))


__all__ = ["NOT_SUPPORTED", "core_aten_ops", "decomposition_table"]


# --------------------------------------------------------------------------- ctc custom ops
@aten("ctc.selective_scan.default")
def _selective_scan(tr: Translator, node: fx.Node) -> Value:
    """``torch.ops.ctc.selective_scan`` (see :mod:`ctc.frontends.adapters`) -> the ``selective_scan`` op."""
    return tr.emit("selective_scan", [tr.t(a) for a in node.args[:5]])
