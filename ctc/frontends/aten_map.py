"""The ATen -> ctc op table: one entry per ATen overload the frontend understands.

Each handler receives the translation context (:class:`ctc.frontends.aten_capture.Translator`)
and the fx node, and returns the ctc value(s) for the node's result.  Handlers never
guess types: the exported program's fake-tensor metadata gives every result's shape and
dtype, and the translator inserts a ``cast`` wherever torch's type promotion would have
changed a dtype that the ctc op keeps.

Ops listed in :data:`IDENTITY` carry no meaning at inference time (dropout in eval mode,
clones, aliases, device moves) and vanish; those in :data:`IGNORED` produce no tensor
(shape assertions, symbolic-size arithmetic, which the translator reads from metadata).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from ctc.ir.graph import Value
from ctc.ir.types import FLOAT_DTYPES, dtype_name

if TYPE_CHECKING:
    from ctc.frontends.aten_capture import Translator

Handler = Callable[["Translator", fx.Node], Any]

TABLE: dict[str, Handler] = {}

# Results equal to their first operand at inference time.
IDENTITY = frozenset({
    "aten.clone.default", "aten.alias.default", "aten.contiguous.default", "aten.detach.default",
    "aten.dropout.default", "aten.lift_fresh_copy.default", "aten.to.device", "aten.feature_dropout.default",
    "aten.alpha_dropout.default",
})
# Nodes that produce no tensor (checks and symbolic-size arithmetic).
IGNORED = frozenset({
    "aten._assert_tensor_metadata.default", "aten._assert_scalar.default", "aten.sym_size.int",
    "aten.sym_constrain_range_for_size.default", "aten._assert_async.msg", "aten.sym_numel.default",
    "aten.sym_storage_offset.default", "aten.sym_stride.int", "aten.sym_constrain_range.default",
})

# Higher-order regions inlined by the translator (their bodies are mapped op by op).
REGION_OPS = frozenset({"wrap_with_set_grad_enabled", "wrap_with_autocast"})

# Advice for ops users commonly hit, keyed on what torch.export really produces (after the Core
# ATen decomposition); shown next to each unsupported op.  core_aten.NOT_SUPPORTED adds the
# Core ATen ops that have no inference meaning.
HINTS: dict[str, str] = {
    "aten.copy_.default": "in-place copies (e.g. KV-cache updates) are not supported; capture with use_cache=False",
    "aten.unique_consecutive.default": "the result's size depends on the data; not capturable",
    "aten._unique2.default": "the result's size depends on the data; not capturable",
    "aten.bincount.default": "the result's size depends on the data; use one_hot + sum",
    "aten.histc.default": "histograms of data-dependent range are not supported; count with one_hot + sum",
    "aten.masked_select.default": "the result's size depends on the data; use torch.where",
    "aten.item.default": "`.item()` turns a tensor into a Python number; keep it a tensor",
    "aten.view_as_real.default": "complex tensors are not in the ctc IR (real and imaginary parts as two tensors are)",
    "aten.view_as_complex.default": "complex tensors are not in the ctc IR (real and imaginary parts as two tensors "
                                    "are); rotary embeddings in complex form: use the rotate_half form",
    "aten.polar.default": "complex tensors are not in the ctc IR",
}


class CaptureUnsupported(Exception):
    """A handler cannot translate its node; capture reports it with the node's scope and source line
    (``op`` names the op to report when it is not the node's own, e.g. the producer of a tuple)."""

    def __init__(self, why: str, op: str | None = None):
        super().__init__(why)
        self.op = op


class Unavailable:
    """A result slot of a multi-output op that ctc does not compute (max-pool indices, a norm's saved
    statistics); reading it through ``getitem`` is reported with ``reason``."""

    def __init__(self, reason: str):
        self.reason = reason


def aten(*names: str) -> Callable[[Handler], Handler]:
    """Register ``fn`` as the handler of the listed ATen overloads (``"add.Tensor"`` -> ``aten.add.Tensor``)."""

    def deco(fn: Handler) -> Handler:
        for n in names:
            key = n if n.startswith(("aten.", "<", "ctc.")) else f"aten.{n}"
            if key in TABLE:
                raise ValueError(f"ATen op {key} mapped twice")
            TABLE[key] = fn
        return fn

    return deco


def target_name(node: fx.Node) -> str:
    """The table key of a call_function node's target."""
    t = node.target
    if t is operator.getitem:
        return "<getitem>"
    return str(t)


def supported(name: str) -> bool:
    return name in TABLE or name in IDENTITY or name in IGNORED or name in REGION_OPS


# --------------------------------------------------------------------------- helpers
def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _is_tensor(a: Any) -> bool:
    return isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)


# --------------------------------------------------------------------------- unary
_UNARY = {"neg": "neg", "abs": "abs", "exp": "exp", "log": "log", "sqrt": "sqrt", "rsqrt": "rsqrt", "tanh": "tanh",
          "sigmoid": "sigmoid", "relu": "relu", "silu": "silu", "sin": "sin", "cos": "cos", "erf": "erf",
          "reciprocal": "reciprocal"}


def _unary_handler(op: str) -> Handler:
    def h(tr: Translator, node: fx.Node) -> Value:
        x = tr.t(node.args[0])
        if op not in ("neg", "abs"):
            x = tr.cast_to(x, tr.out_dtype(node))
        return tr.emit(op, [x])

    return h


for _a, _o in _UNARY.items():
    aten(f"{_a}.default")(_unary_handler(_o))


@aten("gelu.default")
def _gelu(tr: Translator, node: fx.Node) -> Value:
    return tr.emit("gelu", [tr.t(node.args[0])], {"approximate": node.kwargs.get("approximate", "none")})


@aten("logical_not.default", "bitwise_not.default")
def _not(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    if str(node.target).startswith("aten.bitwise") and x.type.dtype != "bool":
        return tr.emit("bitwise_not", [x])
    return tr.emit("logical_not", [x])


# --------------------------------------------------------------------------- binary
def _binary_handler(op: str, *, compare: bool = False, reverse: bool = False) -> Handler:
    def h(tr: Translator, node: fx.Node) -> Value:
        a, b = node.args[0], node.args[1]
        if reverse:
            a, b = b, a
        alpha = node.kwargs.get("alpha", 1)
        if alpha != 1:
            if op not in ("add", "sub"):
                raise tr.unsupported(node, "alpha is only meaningful for add/sub")
            b = ("scaled", b, alpha)
        return tr.binary(op, a, b, node, compare=compare)

    return h


for _n in ("add", "sub", "mul", "div"):
    aten(f"{_n}.Tensor", f"{_n}.Scalar")(_binary_handler(_n))
aten("rsub.Scalar", "rsub.Tensor")(_binary_handler("sub", reverse=True))
aten("pow.Tensor_Scalar", "pow.Tensor_Tensor")(_binary_handler("pow"))
aten("pow.Scalar")(_binary_handler("pow"))
aten("maximum.default", "max.other", "fmax.default")(_binary_handler("maximum"))
aten("minimum.default", "min.other", "fmin.default")(_binary_handler("minimum"))
for _n in ("eq", "ne", "lt", "le", "gt", "ge"):
    aten(f"{_n}.Tensor", f"{_n}.Scalar")(_binary_handler(_n, compare=True))


def _logical_handler(op: str, bitwise: bool) -> Handler:
    def h(tr: Translator, node: fx.Node) -> Value:
        a, b = tr.t(node.args[0]), tr.t(node.args[1])
        if bitwise and (a.type.dtype != "bool" or b.type.dtype != "bool"):  # integer bits
            dt = tr.out_dtype(node)
            return tr.emit(op.replace("logical", "bitwise"), [tr.cast_to(a, dt), tr.cast_to(b, dt)])
        return tr.emit(op, [a, b])

    return h


aten("__and__.Tensor", "bitwise_and.Tensor")(_logical_handler("logical_and", True))
aten("__or__.Tensor", "bitwise_or.Tensor")(_logical_handler("logical_or", True))
aten("logical_and.default")(_logical_handler("logical_and", False))
aten("logical_or.default")(_logical_handler("logical_or", False))


@aten("where.self", "where.ScalarSelf", "where.ScalarOther", "where.Scalar")
def _where(tr: Translator, node: fx.Node) -> Value:
    cond, a, b = node.args[:3]
    dt = tr.out_dtype(node)
    ins = [tr.t(cond)]
    attrs: dict[str, Any] = {}
    for side, v in (("a", a), ("b", b)):
        if _is_tensor(v):
            ins.append(tr.cast_to(tr.t(v), dt))
        else:
            attrs[f"{side}_scalar"] = float(tr.scalar(v, node))
    return tr.emit("where", ins, attrs)


@aten("masked_fill.Scalar")
def _masked_fill(tr: Translator, node: fx.Node) -> Value:
    x, mask, value = node.args[:3]
    xv = tr.t(x)
    shape = tr.out_shape(node)
    if tuple(xv.type.shape) != tuple(shape):  # torch.masked_fill broadcasts x against the mask too
        xv = tr.emit("expand", [xv], {"shape": shape})
    return tr.emit("masked_fill", [xv, tr.t(mask)], {"value": float(tr.scalar(value, node))})


@aten("_to_copy.default", "to.dtype", "to.dtype_layout", "type_as.default")
def _to(tr: Translator, node: fx.Node) -> Value:
    return tr.cast_to(tr.t(node.args[0]), tr.out_dtype(node))


# --------------------------------------------------------------------------- creation
@aten("arange.default", "arange.start", "arange.start_step")
def _arange(tr: Translator, node: fx.Node) -> Value:
    nums = [a for a in node.args]
    if str(node.target) == "aten.arange.default":
        start, end, step = 0, nums[0], 1
    else:
        start, end = nums[0], nums[1]
        step = nums[2] if len(nums) > 2 else 1
    if any(isinstance(v, float) for v in (start, end, step)):
        raise tr.unsupported(node, "arange with float bounds is not supported")
    return tr.emit("arange", [], {"start": (tr.dim(start),), "end": (tr.dim(end),), "step": int(step),
                                  "dtype": tr.out_dtype(node)})


@aten("full.default", "new_ones.default", "new_zeros.default", "new_full.default", "ones.default",
      "zeros.default", "full_like.default", "ones_like.default", "zeros_like.default", "scalar_tensor.default")
def _full(tr: Translator, node: fx.Node) -> Value:
    name = str(node.target)
    if "ones" in name:
        value = 1.0
    elif "zeros" in name:
        value = 0.0
    elif name == "aten.full.default":
        value = node.args[1]
    elif name == "aten.full_like.default":
        value = node.args[1]
    elif name == "aten.new_full.default":
        value = node.args[2]
    else:  # scalar_tensor
        value = node.args[0]
    return tr.emit("full", [], {"shape": tr.out_shape(node), "value": float(tr.scalar(value, node)),
                                "dtype": tr.out_dtype(node)})


# --------------------------------------------------------------------------- shape
@aten("view.default", "reshape.default", "_unsafe_view.default", "flatten.using_ints", "unflatten.int")
def _reshape(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    shape = tr.out_shape(node)
    if tuple(x.type.shape) == tuple(shape):
        return x
    return tr.emit("reshape", [x], {"shape": shape})


@aten("expand.default", "expand_as.default")
def _expand(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    shape = tr.out_shape(node)
    if tuple(x.type.shape) == tuple(shape):
        return x
    return tr.emit("expand", [x], {"shape": shape})


@aten("unsqueeze.default")
def _unsqueeze(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    return tr.emit("unsqueeze", [x], {"axis": tr.axis(node.args[1], x.type.rank + 1)})


@aten("squeeze.dim", "squeeze.dims", "squeeze.default")
def _squeeze(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    if len(node.args) > 1:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        axes = sorted({tr.axis(d, x.type.rank) for d in dims})
    else:
        axes = list(range(x.type.rank))
    axes = [a for a in axes if x.type.shape[a] == 1]
    if not axes:
        return x
    return tr.emit("squeeze", [x], {"axes": tuple(axes)})


@aten("transpose.int")
def _transpose(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    r = x.type.rank
    return tr.emit("transpose", [x], {"dim0": tr.axis(node.args[1], r), "dim1": tr.axis(node.args[2], r)})


@aten("t.default", "numpy_T.default")
def _t(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    if x.type.rank < 2:
        return x
    return tr.emit("transpose", [x], {"dim0": 0, "dim1": 1})


@aten("permute.default")
def _permute(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    return tr.emit("permute", [x], {"perm": tuple(tr.axis(p, x.type.rank) for p in node.args[1])})


@aten("slice.Tensor")
def _slice(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    axis = tr.axis(_arg(node, 1, "dim", 0), x.type.rank)
    start, end = _arg(node, 2, "start", None), _arg(node, 3, "end", None)
    step = _arg(node, 4, "step", 1)
    return tr.slice(x, axis, start, end, step, node)


@aten("select.int")
def _select(tr: Translator, node: fx.Node) -> Value:
    view = tr.param_view(node.args[0], node.args[1], node.args[2])
    if view is not None:  # w[e] of a stacked parameter (a mixture-of-experts weight): a parameter of its own
        return view
    x = tr.t(node.args[0])
    axis = tr.axis(node.args[1], x.type.rank)
    idx = node.args[2]
    if isinstance(idx, int) and idx < 0:
        s = tr.slice(x, axis, idx, idx + 1 if idx != -1 else None, 1, node)
    else:
        s = tr.slice(x, axis, idx, tr.dim(idx) + 1 if isinstance(idx, int) else None, 1, node)
    return tr.emit("squeeze", [s], {"axes": (axis,)})


@aten("split.Tensor", "split_with_sizes.default", "chunk.default")
def _split(tr: Translator, node: fx.Node) -> list[Value]:
    x = tr.t(node.args[0])
    axis = tr.axis(_arg(node, 2, "dim", 0), x.type.rank)
    outs = node.meta["val"]
    vals, start = [], 0
    for o in outs:
        n = tr.dim(o.shape[axis])
        if not isinstance(n, int):
            raise tr.unsupported(node, "splitting along a symbolic dim is not supported")
        vals.append(tr.slice(x, axis, start, start + n, 1, node))
        start += n
    return vals


@aten("<getitem>")
def _getitem(tr: Translator, node: fx.Node) -> Value:
    seq = tr.env[node.args[0]]
    if not isinstance(seq, (list, Value)):
        tr.t(node.args[0])  # its producer failed: raises so that only the producer is reported
    if not isinstance(seq, list):
        raise tr.unsupported(node, "getitem on a single tensor")
    v = seq[node.args[1]]
    if isinstance(v, Unavailable):
        raise CaptureUnsupported(v.reason, op=target_name(node.args[0]))
    return v


@aten("cat.default", "concat.default")
def _cat(tr: Translator, node: fx.Node) -> Value:
    xs = [tr.t(a) for a in node.args[0]]
    dt = tr.out_dtype(node)
    xs = [tr.cast_to(x, dt) for x in xs if not (x.type.rank == 1 and x.type.shape[0] == 0)]
    if len(xs) == 1:
        return xs[0]
    return tr.emit("concat", xs, {"axis": tr.axis(_arg(node, 1, "dim", 0), xs[0].type.rank)})


@aten("gather.default")
def _gather(tr: Translator, node: fx.Node) -> Value:
    x, idx = tr.t(node.args[0]), tr.t(node.args[2])
    return tr.emit("gather", [x, idx], {"axis": tr.axis(node.args[1], x.type.rank)})


@aten("index_select.default")
def _index_select(tr: Translator, node: fx.Node) -> Value:
    x, idx = tr.t(node.args[0]), tr.t(node.args[2])
    return tr.emit("index_select", [x, idx], {"axis": tr.axis(node.args[1], x.type.rank)})


@aten("index.Tensor")
def _index(tr: Translator, node: fx.Node) -> Value:
    """Advanced indexing with index tensors on any axes (``None`` skips an axis: ``x[..., [-2], :]``)."""
    x = tr.t(node.args[0])
    idx = list(node.args[1])
    while idx and idx[-1] is None:
        idx.pop()
    axes = tuple(i for i, t in enumerate(idx) if t is not None)
    ins = [tr.t(idx[a]) for a in axes]
    if any(i.type.dtype == "bool" for i in ins):
        raise tr.unsupported(node, "boolean-mask indexing (x[mask]) gives a data-dependent shape; use torch.where "
                                   "or masked_fill")
    return tr.emit("index", [x, *ins], {"axes": None if axes == tuple(range(len(axes))) else axes})


@aten("embedding.default")
def _embedding(tr: Translator, node: fx.Node) -> Value:
    w, ids = tr.t(node.args[0]), tr.t(node.args[1])
    pad = _arg(node, 2, "padding_idx", -1)
    return tr.emit("embedding", [ids, w], {"padding_idx": None if pad is None or pad < 0 else int(pad)})


@aten("triu.default", "tril.default")
def _tri(tr: Translator, node: fx.Node) -> Value:
    op = "triu" if "triu" in str(node.target) else "tril"
    return tr.emit(op, [tr.t(node.args[0])], {"diagonal": int(_arg(node, 1, "diagonal", 0))})


# --------------------------------------------------------------------------- nn
@aten("linear.default")
def _linear(tr: Translator, node: fx.Node) -> Value:
    x, w = tr.t(node.args[0]), tr.t(node.args[1])
    b = _arg(node, 2, "bias", None)
    return tr.emit("linear", [x, w] + ([tr.t(b)] if b is not None else []))


@aten("addmm.default")
def _addmm(tr: Translator, node: fx.Node) -> Value:
    bias, x, w = node.args[:3]
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        raise tr.unsupported(node, "addmm with beta/alpha != 1")
    wt = tr.transposed_param(w)
    if wt is not None:  # Conv1D-style [in, out] weight: store it as a linear [out, in] weight
        return tr.emit("linear", [tr.t(x), wt, tr.t(bias)])
    y = tr.emit("matmul", [tr.t(x), tr.t(w)])
    return tr.emit("add", [y, tr.t(bias)])


@aten("mm.default", "bmm.default", "matmul.default")
def _mm(tr: Translator, node: fx.Node) -> Value:
    a, b = node.args[:2]
    if str(node.target) == "aten.mm.default":
        wt = tr.transposed_param(b)
        if wt is not None:
            return tr.emit("linear", [tr.t(a), wt])
    return tr.emit("matmul", [tr.t(a), tr.t(b)])


@aten("layer_norm.default")
def _layer_norm(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    shape = node.args[1]
    w, b = _arg(node, 2, "weight", None), _arg(node, 3, "bias", None)
    eps = _arg(node, 4, "eps", 1e-5)
    ins = [x]
    if w is not None:
        ins.append(tr.t(w))
        if b is not None:
            ins.append(tr.t(b))
    elif b is not None:
        raise tr.unsupported(node, "layer_norm with a bias but no weight")
    return tr.emit("layer_norm", ins, {"eps": float(eps), "normalized_ndim": len(shape)})


@aten("rms_norm.default")
def _rms_norm(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    shape, w = node.args[1], _arg(node, 2, "weight", None)
    eps = _arg(node, 3, "eps", None)
    if len(shape) != 1 or w is None:
        raise tr.unsupported(node, "rms_norm over several axes or without a weight")
    if eps is None:
        eps = torch.finfo(node.meta["val"].dtype).eps
    return tr.emit("rms_norm", [x, tr.t(w)], {"eps": float(eps)})


@aten("scaled_dot_product_attention.default")
def _sdpa(tr: Translator, node: fx.Node) -> Value:
    q, k, v = (tr.t(a) for a in node.args[:3])
    mask = _arg(node, 3, "attn_mask", None)
    if _arg(node, 4, "dropout_p", 0.0):
        raise tr.unsupported(node, "attention dropout must be 0 at inference (call model.eval())")
    attrs = {"is_causal": bool(_arg(node, 5, "is_causal", False)), "scale": _arg(node, 6, "scale", None),
             "enable_gqa": bool(_arg(node, 7, "enable_gqa", False))}
    ins = [q, k, v]
    if mask is not None:
        m = tr.t(mask)
        if m.type.dtype != "bool":
            m = tr.cast_to(m, q.type.dtype)
        ins.append(m)
    return tr.emit("scaled_dot_product_attention", ins, attrs)


def _reduction_handler(op: str) -> Handler:
    def h(tr: Translator, node: fx.Node) -> Value:
        x = tr.t(node.args[0])
        dims = _arg(node, 1, "dim", None)
        keep = bool(_arg(node, 2, "keepdim", False))
        if dims is None or dims == []:
            axes = tuple(range(x.type.rank))
        else:
            dims = dims if isinstance(dims, (list, tuple)) else [dims]
            axes = tuple(sorted({tr.axis(d, x.type.rank) for d in dims}))
        want = tr.out_dtype(node)
        if op == "mean" or (op == "sum" and want in FLOAT_DTYPES):
            x = tr.cast_to(x, want)
        return tr.emit(op, [x], {"axes": axes, "keepdim": keep})

    return h


aten("mean.dim", "mean.default")(_reduction_handler("mean"))
aten("sum.dim_IntList", "sum.default")(_reduction_handler("sum"))
aten("amax.default")(_reduction_handler("amax"))
aten("amin.default")(_reduction_handler("amin"))
@aten("argmax.default")
def _argmax(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    dim, keep = _arg(node, 1, "dim", None), bool(_arg(node, 2, "keepdim", False))
    if dim is None:  # torch flattens first
        n: Any = 1
        for d in x.type.shape:
            n = f"({n}) * ({d})"
        from ctc.ir.symbolic import normalize_dim

        r = tr.emit("argmax", [tr.emit("reshape", [x], {"shape": (normalize_dim(n),)})], {"axes": (0,)})
        return r if not keep else tr.emit("reshape", [r], {"shape": tr.out_shape(node)})
    return tr.emit("argmax", [x], {"axes": (tr.axis(dim, x.type.rank),), "keepdim": keep})


def _softmax_handler(op: str) -> Handler:
    def h(tr: Translator, node: fx.Node) -> Value:
        x = tr.cast_to(tr.t(node.args[0]), tr.out_dtype(node))
        return tr.emit(op, [x], {"axis": tr.axis(node.args[1], x.type.rank)})

    return h


aten("softmax.int", "_softmax.default", "_safe_softmax.default")(_softmax_handler("softmax"))
aten("log_softmax.int", "_log_softmax.default")(_softmax_handler("log_softmax"))


@aten("cumsum.default")
def _cumsum(tr: Translator, node: fx.Node) -> Value:
    x = tr.t(node.args[0])
    return tr.emit("cumsum", [x], {"axis": tr.axis(node.args[1], x.type.rank),
                                   "dtype": dtype_name(node.meta["val"].dtype)})


@aten("clamp.default", "clamp_min.default", "clamp_max.default")
def _clamp(tr: Translator, node: fx.Node) -> Value:
    name = str(node.target)
    lo = node.args[1] if name != "aten.clamp_max.default" and len(node.args) > 1 else node.kwargs.get("min")
    hi = (node.args[1] if name == "aten.clamp_max.default" else
          (node.args[2] if len(node.args) > 2 else node.kwargs.get("max")))
    x: Any = node.args[0]
    if lo is not None:
        x = tr.binary("maximum", x, lo, node)
    if hi is not None:
        x = tr.binary("minimum", x, hi, node)
    return x if isinstance(x, Value) else tr.t(x)


@aten("ctc.cache_write.default")
def _cache_write(tr: Translator, node: fx.Node) -> Value:
    cache, update, position = (tr.t(a) for a in node.args[:3])
    return tr.emit("cache_write", [cache, update, position], {"axis": int(_arg(node, 3, "axis", 2))})


# The rest of Core ATen, and the ops kept above it on purpose (convolution, pooling, activations):
# importing the module registers its handlers in TABLE.
from ctc.frontends import core_aten as _core_aten  # noqa: E402,F401
