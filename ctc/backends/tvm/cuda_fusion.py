"""Multi-node GPU kernels chosen by the lowering: the attention input of a decode step.

Why: lowered op by op, the start of every decode layer's attention is three GEMVs (q, k, v), two
rotary kernels, two cache-write kernels and the copies in between: seven launches for a few
kilobytes of work, and a launch costs more than the work.  :func:`plan` finds, for each one-query
attention over preallocated caches, the subgraph

    q|k|v = linear(x)   (three linears of one input, parameter weights, float or weight-only quantized)
    q' = rotary(view(q), cos, sin),  k' = rotary(view(k), cos, sin),  v' = view(v)
    k_cache' = cache_write(k_cache, k', position),  v_cache' = cache_write(v_cache, v', position)

(``view`` = reshape/transpose chains that keep the memory order: ``[B, 1, H*D] -> [B, H, 1, D]``)
and lowers it as two kernels: one GEMV over the three weights concatenated (bound as one array
whose ``source`` records the concatenation, so weights still come from the module's parameters)
and :func:`~.cuda_kernels.rope_write_func`, which splits the row, rotates q and k and writes k and
v into the caches in place.  The attention itself is then one kernel too (``decode_attention``).

The lowering is unchanged otherwise: every op keeps its rule, and any subgraph that does not match
exactly (a value read elsewhere, a bias on one linear only, another layout) is lowered op by op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ctc.ir.graph import Module, Node, Value

__all__ = ["AttentionInput", "FusionPlan", "plan"]

_VIEW_OPS = ("reshape", "transpose", "permute")


@dataclass
class AttentionInput:
    """One matched attention input (see the module doc)."""

    linears: list[Node]
    q_rot: Node
    k_rot: Node
    k_write: Node
    v_write: Node
    views: list[Node]
    members: list[Node] = field(default_factory=list)

    def last(self, order: dict[int, int]) -> Node:
        return max(self.members, key=lambda n: order[id(n)])


@dataclass
class FusionPlan:
    """Groups by member node id; a group is emitted when the walk reaches its last member."""

    groups: dict[int, AttentionInput] = field(default_factory=dict)
    last: dict[int, AttentionInput] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.last)


def _single_use(v: Value, m: Module) -> bool:
    return len(v.uses) == 1 and not m.is_output(v)


def _view_source(v: Value, m: Module, views: list[Node]) -> Value:
    """Walk back through single-use view ops; the first value that is not a view's result."""
    while v.producer is not None and v.producer.op in _VIEW_OPS and _single_use(v, m):
        views.append(v.producer)
        v = v.producer.inputs[0]
    return v


def _linear_ok(n: Node | None, m: Module) -> bool:
    if n is None or n.op not in ("linear", "quant_linear") or not _single_use(n.outputs[0], m):
        return False
    if n.op == "quant_linear" and n.attrs["a_bits"] not in (None, 16):
        return False
    params = n.inputs[1:]
    return all(p.producer is not None and p.producer.op == "param" for p in params)


def _same_kind(ls: list[Node]) -> bool:
    a = ls[0]
    if any(x.op != a.op or len(x.inputs) != len(a.inputs) for x in ls):
        return False
    if a.op == "quant_linear":
        keys = ("w_bits", "group_size", "w_symmetric", "has_bias")
        return all(all(x.attrs[k] == a.attrs[k] for k in keys) for x in ls)
    return all(x.inputs[1].type.dtype == a.inputs[1].type.dtype for x in ls)


def _match(sdpa: Node, m: Module) -> AttentionInput | None:
    if len(sdpa.inputs) < 3:
        return None
    q_rot, kw, vw = (v.producer for v in sdpa.inputs[:3])
    if q_rot is None or kw is None or vw is None or q_rot.op != "rotary_embedding":
        return None
    if kw.op != "cache_write" or vw.op != "cache_write" or kw.inputs[2] is not vw.inputs[2]:
        return None
    k_rot = kw.inputs[1].producer
    if k_rot is None or k_rot.op != "rotary_embedding":
        return None
    if q_rot.inputs[1] is not k_rot.inputs[1] or q_rot.inputs[2] is not k_rot.inputs[2]:
        return None
    if not all(_single_use(v, m) for v in (q_rot.outputs[0], k_rot.outputs[0], kw.inputs[1], vw.inputs[1])):
        return None
    for w in (kw, vw):  # caches: module inputs written once, so the kernel may write them in place
        c = w.inputs[0]
        if c.producer is not None or len(c.users) != 1 or m.is_output(c) or w.attrs["axis"] % 4 != 2:
            return None
    views: list[Node] = []
    srcs = [_view_source(q_rot.inputs[0], m, views), _view_source(k_rot.inputs[0], m, views),
            _view_source(vw.inputs[1], m, views)]
    linears = [s.producer for s in srcs]
    if not all(_linear_ok(n, m) for n in linears):
        return None
    lin: list[Node] = linears  # type: ignore[assignment]
    if len({id(n.inputs[0]) for n in lin}) != 1 or not _same_kind(lin):
        return None
    g = AttentionInput(lin, q_rot, k_rot, kw, vw, views)
    g.members = [*lin, q_rot, k_rot, kw, vw, *views]
    return g


def plan(m: Module) -> FusionPlan:
    """Every attention input of ``m`` that :func:`emit` can lower as two kernels."""
    order = {id(n): i for i, n in enumerate(m.nodes)}
    out = FusionPlan()
    for n in m.nodes:
        if n.op != "scaled_dot_product_attention":
            continue
        g = _match(n, m)
        if g is None or any(id(x) in out.groups for x in g.members):
            continue
        for x in g.members:
            out.groups[id(x)] = g
        out.last[id(g.last(order))] = g
    return out


def emit(ctx: Any, g: AttentionInput) -> bool:
    """Lower group ``g`` (binding the values the rest of the graph reads: q', k_cache', v_cache');
    False when its shapes turn out unsupported (the caller then lowers the members op by op)."""
    from ctc.backends.tvm import cuda_kernels as CK
    from ctc.backends.tvm import lower as L
    from ctc.backends.tvm.int_kernels import add_prim_func

    q_t, kc_t = g.q_rot.outputs[0].type, g.k_write.inputs[0].type
    x_v = g.linears[0].inputs[0]
    dims = [L._static_int(ctx, d) for d in (*q_t.shape, *kc_t.shape, *x_v.type.shape)]
    if None in dims or len(q_t.shape) != 4 or len(kc_t.shape) != 4:
        return False
    b, hq, one, d = (int(v) for v in q_t.shape)  # type: ignore[arg-type]
    _, hk, s, _ = (int(v) for v in kc_t.shape)  # type: ignore[arg-type]
    outs = [n.outputs[0].type.shape[-1] for n in g.linears]
    if one != 1 or outs != [hq * d, hk * d, hk * d] or x_v.type.shape[:-1] != (b, 1):
        return False
    cos_t = g.q_rot.inputs[1].type
    cos_n = 1
    for dim in cos_t.shape:
        cos_n *= int(dim)  # type: ignore[arg-type]
    cos_b = cos_n // d
    if cos_n % d or cos_b not in (1, b) or cos_t.dtype != q_t.dtype or g.linears[0].outputs[0].type.dtype != q_t.dtype:
        return False
    relax, op, dt = ctx.relax, ctx.relax.op, L._dt(q_t)
    y = _merged_linear(ctx, g.linears)
    y2 = ctx.emit(op.reshape(y, [b, sum(outs)]))
    cos = ctx.emit(op.reshape(ctx.val(g.q_rot.inputs[1]), [cos_b, d]))
    sin = ctx.emit(op.reshape(ctx.val(g.q_rot.inputs[2]), [cos_b, d]))
    spec = CK.RopeWriteSpec(b, hq, hk, s, d, dt, cos_b)
    gv = add_prim_func(ctx.bb, CK.rope_write_func(spec), f"rope_write_{spec.tag}")
    kc, vc = ctx.val(g.k_write.inputs[0]), ctx.val(g.v_write.inputs[0])
    cache_ty = relax.TensorType([b, hk, s, d], dt)
    res = ctx.emit(relax.call_tir_inplace(gv, [y2, cos, sin, ctx.val(g.k_write.inputs[2]), kc, vc],
                                          [4, 5, -1], [cache_ty, cache_ty, relax.TensorType([b, hq, 1, d], dt)]))
    ctx.env[id(g.k_write.outputs[0])] = ctx.emit(relax.TupleGetItem(res, 0))
    ctx.env[id(g.v_write.outputs[0])] = ctx.emit(relax.TupleGetItem(res, 1))
    ctx.env[id(g.q_rot.outputs[0])] = ctx.emit(relax.TupleGetItem(res, 2))
    ctx.inplace_inputs.update({g.k_write.inputs[0].name, g.v_write.inputs[0].name})
    return True


def _merged_linear(ctx: Any, lins: list[Node]) -> Any:
    """One GEMV over the linears' weights concatenated along the output axis (bias too)."""
    from ctc.backends.tvm import lower as L

    first = lins[0]
    x = ctx.val(first.inputs[0])
    names = [[ctx.param_name(v) for v in n.inputs[1:]] for n in lins]
    key = "qkv"

    def cat(i: int) -> Any:
        srcs = [str(ns[i]) for ns in names]
        arrs = [ctx.param_array(n) for n in srcs]
        import numpy as np

        return ctx.param(srcs[0], f"{key}{i}:" + "+".join(srcs[1:]), array=np.concatenate(arrs, axis=0),
                         source={"op": "concat0", "from": srcs})

    if first.op == "linear":
        y = ctx.te(L._matvec_nk, x, cat(0), name="matvec")
        bias_i = 1 if len(first.inputs) > 2 else None
    else:
        a = first.attrs
        k = int(first.inputs[0].type.shape[-1])
        y = ctx.te(L._quant_matvec_te(int(a["w_bits"]), int(a["group_size"]), k), x, cat(0), cat(1), cat(2),
                   name="quant_matvec")
        bias_i = 3 if a["has_bias"] else None
    if bias_i is not None:
        bias = cat(bias_i)
        y = ctx.emit(ctx.relax.op.add(y, ctx.emit(ctx.relax.op.astype(bias, L._dt(first.outputs[0].type)))))
    return y
