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

Every other one-row linear of a decode step becomes a :class:`GemvGroup`: one hand-scheduled GEMV
kernel (:func:`~.cuda_kernels.gemv_func`) that also absorbs

* the RMSNorm in front of it, when every reader of the norm is such a GEMV (the norm of a few
  hundred values is recomputed by each block: cheaper than a launch),
* a residual ``add`` after it, or
* a SwiGLU: ``silu(x W_gate^T) * (x W_up^T)`` is one GEMV over both weights.

A Llama decoder layer is then six kernels (norm+qkv, rope+cache write, attention, o+residual,
norm+gate/up+SwiGLU, down+residual) instead of the op-by-op lowering's fourteen.

The lowering is unchanged otherwise: every op keeps its rule, and any subgraph that does not match
exactly (a value read elsewhere, a bias on one linear only, another layout) is lowered op by op.

Before all of that, a static decode step that is exactly what the persistent decode-step kernel computes
(:mod:`.cuda_decode_stack`: batch 1, int4 Llama layers of the kernel's shape) becomes one group, the whole step
in one launch; :attr:`FusionPlan.notes` says whether it did and, if not, why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ctc.backends.tvm.siblings import sibling_linears
from ctc.ir.graph import Module, Node, Value

__all__ = ["AttentionInput", "FusionPlan", "GemvGroup", "plan"]

MAX_GEMV_ROWS = 16

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
    norm: Node | None = None  # an RMSNorm whose readers are all fused GEMVs: computed inside the GEMV

    def last(self, order: dict[int, int]) -> Node:
        return max(self.members, key=lambda n: order[id(n)])


@dataclass
class GemvGroup:
    """One GEMV kernel (``kernel="gemv"``, a decode step's few rows) or tensor-core GEMM (``"gemm"``,
    a prefill's many rows, :mod:`.cuda_gemm`): ``linears`` (one, or gate and up of a SwiGLU), and what
    it absorbs."""

    linears: list[Node]
    epilogue: str = "none"            # none | residual | silu_mul | split (GEMM only: several outputs, sliced)
    tail: list[Node] = field(default_factory=list)  # the absorbed add, or silu and mul
    residual: Value | None = None
    norm: Node | None = None
    members: list[Node] = field(default_factory=list)
    kernel: str = "gemv"

    @property
    def result(self) -> Value:
        return (self.tail[-1] if self.tail else self.linears[0]).outputs[0]

    def last(self, order: dict[int, int]) -> Node:
        """The member at which the walk emits the group: its last one; for ``split`` its first (the linears
        read one input, and a reader of the first may come before the others)."""
        pick = min if self.epilogue == "split" else max
        return pick(self.members, key=lambda n: order[id(n)])


@dataclass
class FusionPlan:
    """Groups by member node id; a group is emitted when the walk reaches its last member; absorbed
    norms are never lowered on their own."""

    groups: dict[int, Any] = field(default_factory=dict)
    last: dict[int, Any] = field(default_factory=dict)
    absorbed: set[int] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)  # build notes (the persistent decode step: used, or why not)
    persistent_grid: int = 0  # blocks of the persistent decode step when it is used (the GPU's multiprocessors)

    def __len__(self) -> int:
        return len(self.last)


def _single_use(v: Value, m: Module) -> bool:
    return len(v.uses) == 1 and not m.is_output(v)


def _view_source(v: Value, m: Module, views: list[Node]) -> Value:
    """Walk back through single-use view ops; the first value that is not a view's result."""
    while v.producer is not None and v.producer.op in _VIEW_OPS and _single_use(v, m):
        views.append(v.producer)
        v = v.producer.operand("x")
    return v


def _linear_ok(n: Node | None, m: Module) -> bool:
    if n is None or n.op not in ("linear", "quant_linear") or not _single_use(n.outputs[0], m):
        return False
    if n.op == "quant_linear" and n.attr("a_bits") not in (None, 16):
        return False
    return all(p.producer is not None and p.producer.op == "param" for p in _weight_operands(n))


def _weight_operands(n: Node) -> list[Value]:
    """A linear's parameter operands by name: weight[, bias], or qweight, w_scale, w_zero[, bias]."""
    names = ("weight", "bias") if n.op == "linear" else ("qweight", "w_scale", "w_zero", "bias")
    return [v for k in names for v in n.operands(k)]


def _same_kind(ls: list[Node]) -> bool:
    a = ls[0]
    if any(x.op != a.op or len(_weight_operands(x)) != len(_weight_operands(a)) for x in ls):
        return False
    if a.op == "quant_linear":
        keys = ("w_bits", "group_size", "w_symmetric", "has_bias")
        return all(all(x.attr(k) == a.attr(k) for k in keys) for x in ls)
    return all(x.operand("weight").type.dtype == a.operand("weight").type.dtype for x in ls)


def _match(sdpa: Node, m: Module) -> AttentionInput | None:
    q_rot, kw, vw = (sdpa.operand(k).producer for k in ("q", "k", "v"))
    if q_rot is None or kw is None or vw is None or q_rot.op != "rotary_embedding":
        return None
    if kw.op != "cache_write" or vw.op != "cache_write" or kw.operand("position") is not vw.operand("position"):
        return None
    k_rot = kw.operand("update").producer
    if k_rot is None or k_rot.op != "rotary_embedding":
        return None
    if q_rot.operand("cos") is not k_rot.operand("cos") or q_rot.operand("sin") is not k_rot.operand("sin"):
        return None
    if not all(_single_use(v, m) for v in (q_rot.outputs[0], k_rot.outputs[0], kw.operand("update"),
                                           vw.operand("update"))):
        return None
    for w in (kw, vw):  # caches: module inputs written once, so the kernel may write them in place
        c = w.operand("cache")
        if c.producer is not None or len(c.users) != 1 or m.is_output(c) or w.attr("axis") % 4 != 2:
            return None
    views: list[Node] = []
    srcs = [_view_source(q_rot.operand("x"), m, views), _view_source(k_rot.operand("x"), m, views),
            _view_source(vw.operand("update"), m, views)]
    linears = [s.producer for s in srcs]
    if not all(_linear_ok(n, m) for n in linears):
        return None
    lin: list[Node] = linears  # type: ignore[assignment]
    if len({id(n.operand("x")) for n in lin}) != 1 or not _same_kind(lin):
        return None
    g = AttentionInput(lin, q_rot, k_rot, kw, vw, views)
    g.members = [*lin, q_rot, k_rot, kw, vw, *views]
    return g


def _gemv_rows(n: Node) -> int | None:
    """Rows of a linear's input when it is a small static batch of rows (a decode step); else None."""
    shape = n.operand("x").type.shape
    if not all(isinstance(d, int) for d in shape):
        return None
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows if rows <= MAX_GEMV_ROWS else None


def _gemv_candidate(n: Node, m: Module) -> bool:
    if n.op not in ("linear", "quant_linear") or _gemv_rows(n) is None:
        return False
    if n.has_operand("bias"):
        return False  # bias: the op-by-op path
    if n.op == "quant_linear" and n.attr("a_bits") not in (None, 16):
        return False
    return all(p.producer is not None and p.producer.op == "param" for p in _weight_operands(n))


def _gemm_candidate(n: Node, m: Module) -> bool:
    """A linear over many rows (a prefill) that the tensor-core GEMM covers: no bias, f16/bf16 input and output,
    parameter weights, K a multiple of 32; a float weight of the activations' dtype, or an integer weight-only
    ``quant_linear`` (4 or 8 bits, groups a multiple of 32: expanded by :func:`.cuda_gemm.dequant_func` first)."""
    from ctc.backends.tvm.cuda_gemm import BK

    if n.op not in ("linear", "quant_linear") or n.has_operand("bias") or _gemv_rows(n) is not None:
        return False
    x, y = n.operand("x").type, n.outputs[0].type
    if not (x.dtype == y.dtype and x.dtype in ("f16", "bf16")):
        return False
    k, nn = x.shape[-1], y.shape[-1]
    if not (isinstance(k, int) and isinstance(nn, int) and k % BK == 0 and nn % 64 == 0):
        return False
    if n.op == "linear":
        if n.operand("weight").type.dtype != x.dtype:
            return False
    else:
        gs = n.attr("group_size")
        if n.attr("a_bits") not in (None, 16) or n.attr("w_bits") not in (4, 8) or (gs != -1 and gs % BK):
            return False
        if n.operand("w_scale").type.dtype != "f32" or n.operand("w_zero").type.dtype not in ("i8", "f32"):
            return False
    return all(p.producer is not None and p.producer.op == "param" for p in _weight_operands(n))


def _swiglu(gate: Node, m: Module, taken: dict[int, Any], candidate: Any = _gemv_candidate) -> GemvGroup | None:
    """gate -> silu -> mul(silu, up) with up a linear of the same input and kind."""
    out = gate.outputs[0]
    if not _single_use(out, m):
        return None
    silu = out.users[0]
    if silu.op != "silu" or not _single_use(silu.outputs[0], m):
        return None
    mul = silu.outputs[0].users[0]
    if mul.op != "mul" or mul.operand("a") is not silu.outputs[0] or mul.operand("b") is None:
        return None  # the reference computes silu(gate) * up in that order
    up = mul.operand("b").producer
    if up is None or id(up) in taken or not candidate(up, m) or not _single_use(up.outputs[0], m):
        return None
    if up.operand("x") is not gate.operand("x") or not _same_kind([gate, up]):
        return None
    if up.outputs[0].type != gate.outputs[0].type:
        return None
    return GemvGroup([gate, up], "silu_mul", [silu, mul])


def _residual(lin: Node, m: Module) -> GemvGroup | None:
    out = lin.outputs[0]
    if not _single_use(out, m):
        return None
    add = out.users[0]
    if add.op != "add":
        return None
    a, b = add.operand("a"), add.operand("b")
    if b is None or add.outputs[0].type != out.type:
        return None
    other = b if a is out else a
    if other is out or other.type != out.type:
        return None
    return GemvGroup([lin], "residual", [add], residual=other)


def plan(m: Module, gemm: bool = False, persistent: Any = None) -> FusionPlan:
    """Every attention input and one-row GEMV of ``m`` that :func:`emit` can lower as fused kernels; with
    ``gemm`` (a GPU with ``mma.sync``: sm_80 on) also every many-row float linear, as a tensor-core GEMM
    with the SwiGLU or residual add after it in its epilogue.  ``persistent``
    (:class:`.cuda_decode_stack.StepOptions`, None = not considered): a decode step the persistent kernel computes
    is one group of every node instead."""
    order = {id(n): i for i, n in enumerate(m.nodes)}
    out = FusionPlan()

    def add(g: Any) -> None:
        for x in g.members:
            out.groups[id(x)] = g
        out.last[id(g.last(order))] = g

    if persistent is not None:
        from ctc.backends.tvm.cuda_decode_stack import plan_note

        stack, note = plan_note(m, persistent)
        out.notes += [note] if note else []
        if stack is not None:
            add(stack)
            out.persistent_grid = stack.sms
            return out

    for n in m.nodes:
        if n.op != "scaled_dot_product_attention":
            continue
        g = _match(n, m)
        if g is None or any(id(x) in out.groups for x in g.members):
            continue
        add(g)
    for n in m.nodes:
        if id(n) in out.groups or not _gemv_candidate(n, m):
            continue
        g = _swiglu(n, m, out.groups) or _residual(n, m) or GemvGroup([n])
        g.members = [*g.linears, *g.tail]
        if any(id(x) in out.groups for x in g.members):
            continue
        add(g)
    pending = []
    for n in m.nodes if gemm else ():
        if id(n) in out.groups or not _gemm_candidate(n, m):
            continue
        g = _swiglu(n, m, out.groups, _gemm_candidate) or _residual(n, m)
        if g is None:
            pending.append(n)
            continue
        g.members, g.kernel = [*g.linears, *g.tail], "gemm"
        if not any(id(x) in out.groups for x in g.members):
            add(g)
    waiting = {id(n) for n in pending}  # the rest, by input: q, k and v become one GEMM, its result sliced
    for n in pending:
        if id(n) in out.groups:
            continue
        lins = [n, *sibling_linears(n, lambda u: id(u) in waiting and id(u) not in out.groups)]
        groups = [lins] if _same_kind(lins) else [[n] for n in lins]
        for ls in groups:
            g = GemvGroup(ls, "split" if len(ls) > 1 else "none", kernel="gemm")
            g.members = list(ls)
            add(g)
    # RMSNorms every reader of which is a fused GEMV (or the fused q|k|v): computed inside those kernels
    for n in m.nodes:
        if n.op != "rms_norm" or m.is_output(n.outputs[0]) or not n.outputs[0].uses:
            continue
        gamma, x = n.operand("weight"), n.operand("x")
        if gamma.producer is None or gamma.producer.op != "param":
            continue
        readers = n.outputs[0].users
        groups = [out.groups.get(id(r)) for r in readers]
        if all(g is not None and getattr(g, "kernel", "gemv") == "gemv" and any(r is y for y in g.linears)
               and r.operand("x") is n.outputs[0]
               for g, r in zip(groups, readers, strict=True)):
            if len(x.type.shape) and n.outputs[0].type.dtype == x.type.dtype:
                out.absorbed.add(id(n))
                for g in groups:
                    g.norm = n
    return out


def emit(ctx: Any, g: Any) -> bool:
    """Lower group ``g`` (binding the values the rest of the graph reads); False when its shapes turn out
    unsupported (the caller then lowers the members op by op: an absorbed norm is then lowered first)."""
    if isinstance(g, GemvGroup):
        return _emit_gemm(ctx, g) if g.kernel == "gemm" else _emit_gemv(ctx, g)
    if isinstance(g, AttentionInput):
        return _emit_attention(ctx, g)
    from ctc.backends.tvm import cuda_decode_stack

    if not isinstance(g, cuda_decode_stack.DecodeStack):
        raise TypeError(f"cuda_fusion.emit: unknown group kind {type(g).__name__}")
    cuda_decode_stack.emit(ctx, g)  # matched whole: its errors are the build's (no op-by-op fallback)
    return True


def _emit_attention(ctx: Any, g: AttentionInput) -> bool:
    """The q|k|v GEMV and the rope/cache-write kernel; binds q', k_cache', v_cache'."""
    from ctc.backends.tvm import cuda_kernels as CK
    from ctc.backends.tvm import lower as L
    from ctc.backends.tvm.int_kernels import add_prim_func

    q_t, kc_t = g.q_rot.outputs[0].type, g.k_write.operand("cache").type
    x_v = g.linears[0].operand("x")
    dims = [L._static_int(ctx, d) for d in (*q_t.shape, *kc_t.shape, *x_v.type.shape)]
    if None in dims or len(q_t.shape) != 4 or len(kc_t.shape) != 4:
        return False
    b, hq, one, d = (int(v) for v in q_t.shape)  # type: ignore[arg-type]
    _, hk, s, _ = (int(v) for v in kc_t.shape)  # type: ignore[arg-type]
    outs = [n.outputs[0].type.shape[-1] for n in g.linears]
    if one != 1 or outs != [hq * d, hk * d, hk * d] or x_v.type.shape[:-1] != (b, 1):
        return False
    cos_t = g.q_rot.operand("cos").type
    cos_n = 1
    for dim in cos_t.shape:
        cos_n *= int(dim)  # type: ignore[arg-type]
    cos_b = cos_n // d
    if cos_n % d or cos_b not in (1, b) or cos_t.dtype != q_t.dtype or g.linears[0].outputs[0].type.dtype != q_t.dtype:
        return False
    relax, op, dt = ctx.relax, ctx.relax.op, L._dt(q_t)
    y = _merged_linear(ctx, g.linears, g.norm)
    if y is None:
        return False
    y2 = ctx.emit(op.reshape(y, [b, sum(outs)]))
    cos = ctx.emit(op.reshape(ctx.val(g.q_rot.operand("cos")), [cos_b, d]))
    sin = ctx.emit(op.reshape(ctx.val(g.q_rot.operand("sin")), [cos_b, d]))
    spec = CK.RopeWriteSpec(b, hq, hk, s, d, dt, cos_b)
    gv = add_prim_func(ctx.bb, CK.rope_write_func(spec), f"rope_write_{spec.tag}")
    kc, vc = ctx.val(g.k_write.operand("cache")), ctx.val(g.v_write.operand("cache"))
    cache_ty = relax.TensorType([b, hk, s, d], dt)
    res = ctx.emit(relax.call_tir_inplace(gv, [y2, cos, sin, ctx.val(g.k_write.operand("position")), kc, vc],
                                          [4, 5, -1], [cache_ty, cache_ty, relax.TensorType([b, hq, 1, d], dt)]))
    ctx.env[id(g.k_write.outputs[0])] = ctx.emit(relax.TupleGetItem(res, 0))
    ctx.env[id(g.v_write.outputs[0])] = ctx.emit(relax.TupleGetItem(res, 1))
    ctx.env[id(g.q_rot.outputs[0])] = ctx.emit(relax.TupleGetItem(res, 2))
    ctx.inplace_inputs.update({g.k_write.operand("cache").name, g.v_write.operand("cache").name})
    return True


def _param_name(v: Value) -> str:
    """The module parameter a weight operand reads (from its ``param`` node: a group emitted at its first
    member reads weights whose nodes the walk has not reached yet)."""
    assert v.producer is not None and v.producer.op == "param"
    return str(v.producer.attrs["name"])


def _weights(ctx: Any, lins: list[Node], key: str) -> list[Any]:
    """The linears' weight operands (and integer scales/zeros), concatenated along the output axis when
    there are several; each bound array records its derivation from the module parameters."""
    import numpy as np

    names = [[_param_name(v) for v in _weight_operands(n)] for n in lins]
    if len(lins) == 1:
        return [ctx.param(str(nm)) for nm in names[0]]
    out = []
    for i in range(len(names[0])):
        srcs = [str(ns[i]) for ns in names]
        arr = np.concatenate([ctx.param_array(nm) for nm in srcs], axis=0)
        out.append(ctx.param(srcs[0], f"{key}{i}:" + "+".join(srcs[1:]), array=arr,
                             source={"op": "concat0", "from": srcs}))
    return out


def _gemv_spec(ctx: Any, lins: list[Node], epilogue: str, norm: Node | None) -> Any | None:
    from ctc.backends.tvm import cuda_kernels as CK
    from ctc.backends.tvm import lower as L

    first = lins[0]
    rows = _gemv_rows(first)
    k = first.operand("x").type.shape[-1]
    n = sum(int(x.outputs[0].type.shape[-1]) for x in lins) if epilogue != "silu_mul" \
        else int(first.outputs[0].type.shape[-1])
    dt = L._dt(first.outputs[0].type)
    if rows is None or not isinstance(k, int) or L._dt(first.operand("x").type) != dt or first.has_operand("bias"):
        return None
    if first.op == "linear":
        if L._dt(first.operand("weight").type) != dt:
            return None
        weight, group = "dense", -1
    else:
        weight, group = ("int4" if first.attr("w_bits") <= 4 else "int8"), int(first.attr("group_size"))
        if first.attr("w_bits") not in (4, 8):
            return None
    spec = CK.GemvSpec(rows, int(k), n, dt, weight, group, "rms" if norm is not None else "none",
                       float(norm.attr("eps")) if norm is not None else 1e-6, epilogue)
    return spec if CK.gemv_supported(spec) is None else None


def _gemv_call(ctx: Any, lins: list[Node], epilogue: str, norm: Node | None, residual: Any = None) -> Any | None:
    """Emit the fused GEMV over ``lins``; its result ``[..., N]`` shaped like the linears' output."""
    from ctc.backends.tvm import cuda_kernels as CK
    from ctc.backends.tvm.int_kernels import add_prim_func

    spec = _gemv_spec(ctx, lins, epilogue, norm)
    if spec is None:
        return None
    op = ctx.relax.op
    src = norm.operand("x") if norm is not None else lins[0].operand("x")
    x = ctx.emit(op.reshape(ctx.val(src), [spec.rows, spec.k]))
    args = [x]
    if norm is not None:
        args.append(ctx.val(norm.operand("weight")))
    args += _weights(ctx, lins, "gemv" if epilogue != "silu_mul" else "swiglu")
    if residual is not None:
        args.append(ctx.emit(op.reshape(residual, [spec.rows, spec.n])))
    gv = add_prim_func(ctx.bb, CK.gemv_func(spec), f"gemv_{spec.tag}")
    y = ctx.emit(ctx.relax.call_tir(gv, args, ctx.relax.TensorType([spec.rows, spec.n], spec.dtype)))
    shape = [*ctx.dims.shape(lins[0].outputs[0].type)[:-1], spec.n]
    return ctx.emit(op.reshape(y, shape))


def _emit_gemv(ctx: Any, g: GemvGroup) -> bool:
    residual = ctx.val(g.residual) if g.residual is not None else None
    y = _gemv_call(ctx, g.linears, g.epilogue, g.norm, residual)
    if y is None:
        return False
    ctx.env[id(g.result)] = y
    return True


def _emit_gemm(ctx: Any, g: GemvGroup) -> bool:
    """The tensor-core GEMM over ``[rows, K]`` (rows flattened from the leading dims, any of them symbolic); an
    integer weight is first expanded to the activations' dtype (:func:`.cuda_gemm.dequant_func`, a work buffer)."""
    import numpy as np

    from ctc.backends.tvm import cuda_gemm as G
    from ctc.backends.tvm import lower as L
    from ctc.backends.tvm.int_kernels import add_prim_func

    first = g.linears[0]
    k = int(first.operand("x").type.shape[-1])
    n = sum(int(x.outputs[0].type.shape[-1]) for x in g.linears)
    rows = 1
    for d in ctx.dims.shape(first.operand("x").type)[:-1]:
        rows = rows * d
    hint = rows if isinstance(rows, int) else 512
    dt = L._dt(first.outputs[0].type)
    epi = "none" if g.epilogue == "split" else g.epilogue
    spec = G.GemmSpec(k, n, dt, epi, rows_hint=hint)
    if L.wgmma_gpu(ctx) and G.gemm_supported(G.GemmSpec(k, n, dt, epi, rows_hint=hint, wgmma=True)) is None:
        spec = G.GemmSpec(k, n, dt, epi, rows_hint=hint, wgmma=True)
    quant = None
    if first.op == "quant_linear":
        quant = G.DequantSpec(n, k, int(first.attr("w_bits")), int(first.attr("group_size")), dt,
                              L._dt(first.operand("w_zero").type))
        if G.dequant_supported(quant) is not None:
            return False
    if G.gemm_supported(spec) is not None:
        return False
    op = ctx.relax.op
    x = ctx.emit(op.reshape(ctx.val(first.operand("x")), [rows, k]))
    if g.epilogue == "silu_mul":  # gate and up rows interleaved by 8 (every weight operand alike)
        names = [[_param_name(v) for v in _weight_operands(lin)] for lin in g.linears]
        order = G.gate_up_order(n // 2)
        ws = []
        for i, (gate, up) in enumerate(zip(*names, strict=True)):
            arr = np.concatenate([ctx.param_array(gate), ctx.param_array(up)], axis=0)[order]
            ws.append(ctx.param(gate, f"gate_up8{'' if quant is None else i}:" + up, array=arr,
                                source={"op": "gate_up8", "from": [gate, up]}))
    else:
        ws = _weights(ctx, g.linears, "gemm")
    if quant is None:
        w = ws[0]
    else:
        deq = add_prim_func(ctx.bb, G.dequant_func(quant), f"dequant_{quant.tag}")
        w = ctx.emit(ctx.relax.call_tir(deq, ws[:3], ctx.relax.TensorType([n, k], dt)))
    args = [x, w]
    if g.residual is not None:
        args.append(ctx.emit(op.reshape(ctx.val(g.residual), [rows, n])))
    gv = add_prim_func(ctx.bb, G.gemm_func(spec), f"gemm_{spec.tag}")
    out = ctx.relax.TensorType([rows, spec.n_out], spec.dtype)
    if spec.k_splits == 1:
        y = ctx.emit(ctx.relax.call_tir(gv, args, out))
    else:  # f32 partial sums of K ranges, then their sum with the epilogue
        part = ctx.emit(ctx.relax.call_tir(gv, args[:2], ctx.relax.TensorType([spec.k_splits, rows, n], "float32")))
        red = add_prim_func(ctx.bb, G.splitk_reduce_func(spec), f"splitk_reduce_{spec.tag}")
        y = ctx.emit(ctx.relax.call_tir(red, [part, args[2] if len(args) > 2 else x], out))
    off = 0
    for lin in g.linears if g.epilogue == "split" else ():
        ni = int(lin.outputs[0].type.shape[-1])
        part = ctx.emit(op.strided_slice(y, axes=[1], begin=[off], end=[off + ni]))
        ctx.env[id(lin.outputs[0])] = ctx.emit(op.reshape(part, ctx.dims.shape(lin.outputs[0].type)))
        off += ni
    if g.epilogue != "split":
        shape = [*ctx.dims.shape(first.outputs[0].type)[:-1], spec.n_out]
        ctx.env[id(g.result)] = ctx.emit(op.reshape(y, shape))
    return True


def _merged_linear(ctx: Any, lins: list[Node], norm: Node | None = None) -> Any:
    """One GEMV over the linears' weights concatenated along the output axis: the fused kernel when it
    covers the shape (with the RMSNorm in front when absorbed), else a TE GEMV (bias added after)."""
    fused = _gemv_call(ctx, lins, "none", norm)
    if fused is not None:
        return fused
    if norm is not None:
        return None  # the norm was planned away: lower the group op by op
    return _merged_linear_te(ctx, lins)


def _merged_linear_te(ctx: Any, lins: list[Node]) -> Any:
    """One TE GEMV over the linears' weights concatenated along the output axis (bias added after)."""
    from ctc.backends.tvm import lower as L

    first = lins[0]
    x = ctx.val(first.operand("x"))
    w = _weights(ctx, lins, "qkv")
    if first.op == "linear":
        y = ctx.te(L._matvec_nk, x, w[0], name="matvec")
    else:
        k = int(first.operand("x").type.shape[-1])
        y = ctx.te(L._quant_matvec_te(int(first.attr("w_bits")), int(first.attr("group_size")), k), x, *w[:3],
                   name="quant_matvec")
    if first.has_operand("bias"):
        y = ctx.emit(ctx.relax.op.add(y, ctx.emit(ctx.relax.op.astype(w[-1], L._dt(first.outputs[0].type)))))
    return y
