"""Hypothesis strategies that generate random valid ctc modules and matching inputs.

Use them for property tests of anything that must preserve meaning or structure
(printer/parser round trip, DCE, CSE, constant folding, backends)::

    from hypothesis import given
    from strategies import module_and_inputs   # pytest puts tests/ on sys.path

    @given(module_and_inputs())
    def test_my_pass_preserves_outputs(mi):
        m, inputs = mi
        before = interpret(m, inputs)
        ...

What a generated module contains (each piece only when its op is registered, so the strategy
keeps working while the op library grows; a builder that builds an invalid node fails the test):

* 1-2 float inputs ``f32[B, S, D]`` (``D`` from ``dims``, default 4 or 8; larger for backend
  tests), ``S`` a symbol ``s0`` about half of the time, and sometimes token ids ``i64[B, S]``;
* a random DAG of elementwise unary/binary ops (tensor or scalar operands), ``linear``,
  ``matmul``, ``softmax``, ``layer_norm``/``rms_norm``, ``transpose``, ``reshape``/``permute``
  head splits (rank 4 values) feeding ``scaled_dot_product_attention``, ``sparse_attention``
  or ``calibrated_attention``, and the compression ops ``channel_permute``,
  ``lowrank_linear``, ``quant_linear``;
* integer and bool data flow: casts to ``i32``/``i64`` and integer arithmetic, comparisons,
  logical ops, ``where`` and ``masked_fill``, ``embedding`` of the token ids;
* parameters, some read by two ``param`` nodes and some values read by two nodes
  (shared weights), ``full`` constants and parameter-only subexpressions (constant-folding
  fodder), no-op nodes (``x * 1`` in all its forms, ``x + 0``, identity reshapes, permutes,
  transposes, expands and casts: canonicalization fodder), exact duplicates of earlier nodes
  (CSE fodder), and nodes no output depends on (DCE fodder).  Each kind of fodder (and a
  ``linear`` for the quantizers) is in about three modules of four, so every pass has work in
  most modules (``changed_share`` measures it);
* a scope and block on every node, and a module ``meta``.

Every module passes :func:`ctc.ir.verify.verify`; inputs are finite ``randn`` tensors (ids in
range), and the generated ops keep values finite.  ``module_and_inputs(special=True)`` puts
NaN, +-inf and -0.0 into the float inputs, for properties that hold for them too (every
op's reference defines them; compare with ``equal_nan``).  Parameter data comes from a drawn
seed, so examples shrink and replay deterministically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st

from ctc.ir import Module, TensorType, Value, all_ops
from ctc.ir import quant as Q
from ctc.ir.symbolic import eval_dim
from ctc.ir.types import torch_dtype

__all__ = ["BUILDERS", "FODDER", "OPT_IN", "available_builders", "changed_share", "inputs_for", "module_and_inputs",
           "modules"]

# Ops that keep randn-scale values finite and well-defined (no log/sqrt/div/exp chains).
SAFE_UNARY = ("relu", "gelu", "silu", "tanh", "sigmoid", "neg", "abs", "sin", "cos", "erf")
SAFE_BINARY = ("add", "sub", "mul", "maximum", "minimum")
INT_UNARY = ("neg", "abs")
INT_BINARY = ("add", "sub", "mul", "maximum", "minimum")
COMPARE = ("gt", "lt", "ge", "le", "eq", "ne")
# Token ids of the optional integer input lie in [0, VOCAB).
VOCAB = 8


@dataclass
class _Ctx:
    """State of one module under construction."""

    draw: Callable[[st.SearchStrategy[Any]], Any]
    m: Module
    gen: torch.Generator
    pool: list[Value] = field(default_factory=list)
    step: int = 0
    dims: tuple[int, ...] = (4, 8)
    private: set[str] = field(default_factory=set)  # parameters later nodes must not share

    def loc(self) -> dict[str, Any]:
        block = self.draw(st.one_of(st.none(), st.integers(0, 2)))
        prefix = f"layers.{block}" if block is not None else "head"
        return {"scope": f"{prefix}.n{self.step}", "block": block}

    def pick(self, pred: Callable[[Value], bool] = lambda v: True, dtypes: tuple[str, ...] = ("f32",)
             ) -> Value | None:
        cands = [v for v in self.pool if v.type.dtype in dtypes and pred(v)]
        return self.draw(st.sampled_from(cands)) if cands else None

    def param(self, shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32, share: bool = True,
              data: torch.Tensor | None = None, loc: dict[str, Any] | None = None) -> Value:
        """A param read; may reuse an existing parameter of that type (shared weights)."""
        loc = loc or self.loc()
        want = TensorType(shape, {torch.float32: "f32", torch.int64: "i64"}.get(dtype, "f32"))
        if share and data is None:
            read = [n.outputs[0] for n in self.m.nodes if n.op == "param" and n.outputs[0].type == want
                    and n.attrs["name"] not in self.private]
            how = self.draw(st.sampled_from(["new", "same_param", "same_value"]))
            if read and how == "same_param":  # a second param node naming the same parameter
                return self.m.param(self.draw(st.sampled_from(read)).producer.attrs["name"], **loc)
            if read and how == "same_value":  # one param value read by two nodes
                return self.draw(st.sampled_from(read))
        if data is None:
            data = torch.randn(shape, generator=self.gen) * 0.5
        name = self.m.fresh_param_name(f"{loc['scope']}.p")
        self.m.add_param(name, data)
        if not share:
            self.private.add(name)
        return self.m.param(name, **loc)

    def node(self, op: str, inputs: list[Value], attrs: dict[str, Any] | None = None,
             loc: dict[str, Any] | None = None) -> Value:
        return self.m.create_node(op, inputs, attrs or {}, **(loc or self.loc())).outputs[0]


def _has(op: str) -> bool:
    return op in all_ops()


def _attr_name(op: str, candidates: tuple[str, ...]) -> str | None:
    attrs = all_ops()[op].attrs
    return next((c for c in candidates if c in attrs), None)


# --------------------------------------------------------------------------- builders
def _unary(c: _Ctx) -> Value | None:
    ops = [o for o in SAFE_UNARY if _has(o)]
    v = c.pick()
    if not ops or v is None:
        return None
    op = c.draw(st.sampled_from(ops))
    attrs = {}
    spec = all_ops()[op].attrs.get("approximate")
    if spec is not None and spec.kind == "str":
        attrs["approximate"] = c.draw(st.sampled_from(["none", "tanh"]))
    return c.node(op, [v], attrs)


def _binary(c: _Ctx) -> Value | None:
    ops = [o for o in SAFE_BINARY if _has(o)]
    a = c.pick()
    if not ops or a is None:
        return None
    op = c.draw(st.sampled_from(ops))
    # a * a of a * a ... squares magnitudes: multiply only by bounded params/constants
    kinds = (["same"] if op != "mul" else []) + ["row", "const"] + (
        ["scalar"] if "scalar" in all_ops()[op].attrs else [])
    kind = c.draw(st.sampled_from(kinds))
    if kind == "scalar":  # op(x, scalar) or op(scalar, x) as attributes
        attrs = {"scalar": c.draw(st.floats(-2, 2, width=32))}
        if "reverse" in all_ops()[op].attrs:
            attrs["reverse"] = c.draw(st.booleans())
        return c.node(op, [a], attrs)
    if kind == "same":
        b = c.pick(lambda v: v.type == a.type) or a
    elif kind == "row":
        b = c.param((int(a.type.shape[-1]),)) if isinstance(a.type.shape[-1], int) else a
    else:
        b = c.node("full", [], {"shape": (1,), "value": c.draw(st.floats(-2, 2, width=32))})
    return c.node(op, [a, b] if c.draw(st.booleans()) else [b, a])


def _last_static(v: Value) -> bool:
    return v.type.rank >= 1 and isinstance(v.type.shape[-1], int)


def _linear(c: _Ctx) -> Value | None:
    if not _has("linear"):
        return None
    x = c.pick(_last_static)
    if x is None:
        return None
    k = int(x.type.shape[-1])
    n = c.draw(st.sampled_from([4, 8]))
    loc = c.loc()
    w = c.param((n, k), loc=loc)
    ins = [x, w]
    if c.draw(st.booleans()):
        ins.append(c.param((n,), loc=loc))
    return c.node("linear", ins, loc=loc)


def _matmul(c: _Ctx) -> Value | None:
    if not _has("matmul"):
        return None
    x = c.pick(_last_static)
    if x is None:
        return None
    k = int(x.type.shape[-1])
    return c.node("matmul", [x, c.param((k, c.draw(st.sampled_from([4, 8]))))])


def _softmax(c: _Ctx) -> Value | None:
    if not _has("softmax"):
        return None
    x = c.pick()
    if x is None:
        return None
    name = _attr_name("softmax", ("axis", "dim"))
    return c.node("softmax", [x], {name: c.draw(st.integers(0, x.type.rank - 1))} if name else {})


def _norm(c: _Ctx) -> Value | None:
    """layer_norm(x, w, b) or rms_norm(x, w) over the last axis."""
    ops = [o for o in ("layer_norm", "rms_norm") if _has(o)]
    x = c.pick(_last_static)
    if not ops or x is None:
        return None
    op = c.draw(st.sampled_from(ops))
    d = int(x.type.shape[-1])
    loc = c.loc()
    ins = [x, c.param((d,), loc=loc)]
    if op == "layer_norm" and c.draw(st.booleans()):
        ins.append(c.param((d,), loc=loc))
    return c.node(op, ins, loc=loc)


def _transpose(c: _Ctx) -> Value | None:
    if not _has("transpose"):
        return None
    x = c.pick(lambda v: v.type.rank >= 2)
    if x is None:
        return None
    r = x.type.rank
    return c.node("transpose", [x], {"dim0": r - 2, "dim1": r - 1})


def _attention(c: _Ctx) -> Value | None:
    """An attention op over rank-4 values (from split_heads): SDPA or a compression variant."""
    ops = [o for o in ("scaled_dot_product_attention", "sparse_attention", "calibrated_attention") if _has(o)]
    if not ops:
        return None
    q = c.pick(lambda v: v.type.rank == 4) or _split_heads(c, back=False)
    if q is None:
        return None
    k = c.pick(lambda v: v.type == q.type) or q
    v = c.pick(lambda v: v.type == q.type) or q
    op = c.draw(st.sampled_from(ops))
    attrs: dict[str, Any] = {"is_causal": c.draw(st.booleans())}
    if op == "sparse_attention":
        n = c.draw(st.integers(0, 2))
        attrs["round_bits"] = tuple(c.draw(st.sampled_from([2, 4, 8])) for _ in range(n))
        attrs["keep_ratios"] = tuple(sorted((c.draw(st.sampled_from([0.25, 0.5, 1.0])) for _ in range(n)),
                                            reverse=True))
    elif op == "calibrated_attention":
        h = q.type.shape[1]
        attrs["heads"] = (c.draw(st.integers(0, h - 1)),) if isinstance(h, int) else ()
        attrs["beta"] = c.draw(st.sampled_from([0.0, 0.4, 1.0]))
        attrs["threshold"] = c.draw(st.sampled_from([1.0, 2.0]))
    return c.node(op, [q, k, v], attrs)


def _split_heads(c: _Ctx, back: bool | None = None) -> Value | None:
    """reshape [B, S, D] -> [B, S, 2, D/2] -> permute to [B, 2, S, D/2]; sometimes back again."""
    if not (_has("reshape") and _has("permute")):
        return None
    x = c.pick(lambda v: v.type.rank == 3 and isinstance(v.type.shape[-1], int) and v.type.shape[-1] % 2 == 0)
    if x is None:
        return None
    shape_attr = _attr_name("reshape", ("shape", "new_shape"))
    perm_attr = _attr_name("permute", ("dims", "perm", "order", "axes"))
    if shape_attr is None or perm_attr is None:
        return None
    b, s, d = x.type.shape
    loc = c.loc()
    y = c.node("reshape", [x], {shape_attr: (b, s, 2, int(d) // 2)}, loc=loc)
    y = c.node("permute", [y], {perm_attr: (0, 2, 1, 3)}, loc=loc)
    if c.draw(st.booleans()) if back is None else back:
        y = c.node("permute", [y], {perm_attr: (0, 2, 1, 3)}, loc=loc)
        y = c.node("reshape", [y], {shape_attr: (b, s, d)}, loc=loc)
    return y


def _channel_permute(c: _Ctx) -> Value | None:
    x = c.pick(_last_static)
    if x is None:
        return None
    loc = c.loc()
    perm = c.param((int(x.type.shape[-1]),), dtype=torch.int64,
                   data=torch.randperm(int(x.type.shape[-1]), generator=c.gen), loc=loc)
    return c.node("channel_permute", [x, perm], loc=loc)


def _lowrank(c: _Ctx) -> Value | None:
    x = c.pick(_last_static)
    if x is None:
        return None
    k = int(x.type.shape[-1])
    r = c.draw(st.integers(1, 3))
    n = c.draw(st.sampled_from([4, 8]))
    loc = c.loc()
    ins = [x, c.param((n, r), loc=loc), c.param((r, k), loc=loc)]
    if c.draw(st.booleans()):
        ins.append(c.param((n,), loc=loc))
    return c.node("lowrank_linear", ins, {"rank": r}, loc=loc)


def _quant_linear(c: _Ctx) -> Value | None:
    x = c.pick(_last_static)
    if x is None:
        return None
    k = int(x.type.shape[-1])
    n = c.draw(st.sampled_from([4, 8]))
    bits = c.draw(st.sampled_from([4, 8]))
    gs = c.draw(st.sampled_from([-1, 2]))
    sym = c.draw(st.booleans())
    a_bits = c.draw(st.sampled_from([None, 8]))
    qw = Q.quantize_weight(torch.randn(n, k, generator=c.gen), bits, gs, sym)
    loc = c.loc()
    ins = [x] + [c.param(tuple(t.shape), data=t, loc=loc) for t in (qw.qweight, qw.scale, qw.zero)]
    has_bias = c.draw(st.booleans())
    if has_bias:
        ins.append(c.param((n,), loc=loc))
    clusters: tuple[int, ...] = ()
    if a_bits:
        clusters = (k // 2, k) if k >= 2 and c.draw(st.booleans()) else ()
        nc = len(clusters) or 1
        sa, za = Q.act_qparams(torch.full((nc,), -4.0), torch.full((nc,), 4.0), a_bits)
        ins += [c.param((nc,), data=sa, loc=loc), c.param((nc,), data=za, loc=loc)]
    return c.node("quant_linear", ins, {"w_bits": bits, "group_size": gs, "w_symmetric": sym, "a_bits": a_bits,
                                        "act_clusters": clusters, "has_bias": has_bias}, loc=loc)


def _constant_subexpr(c: _Ctx) -> Value | None:
    """full + param (+ a unary op): foldable to a constant, then mixed into an activation."""
    ops = [o for o in SAFE_BINARY if _has(o)]
    x = c.pick(_last_static)
    if not ops or x is None:
        return None
    d = int(x.type.shape[-1])
    loc = c.loc()
    k = c.node("full", [], {"shape": (d,), "value": c.draw(st.floats(-1, 1, width=32))}, loc=loc)
    k = c.node(c.draw(st.sampled_from(ops)), [k, c.param((d,), share=False, loc=loc)], loc=loc)
    return c.node(c.draw(st.sampled_from(ops)), [x, k], loc=loc)


def _int_flow(c: _Ctx) -> Value | None:
    """Integer data flow: a float value or the token ids, cast to ``i32``/``i64``, through integer
    arithmetic (small scalars and same-type tensors), sometimes cast back to ``f32``."""
    x = c.pick(dtypes=("f32", "i64", "i32"))
    if x is None:
        return None
    loc = c.loc()
    if x.type.dtype == "f32":
        x = c.node("cast", [x], {"dtype": c.draw(st.sampled_from(["i32", "i64"]))}, loc=loc)
    op = c.draw(st.sampled_from(INT_UNARY + INT_BINARY))
    if op in INT_UNARY:
        y = c.node(op, [x], loc=loc)
    elif c.draw(st.booleans()):
        y = c.node(op, [x], {"scalar": float(c.draw(st.integers(-2, 2))), "reverse": c.draw(st.booleans())}, loc=loc)
    else:
        other = c.pick(lambda v: v.type == x.type, dtypes=(x.type.dtype,)) or x
        y = c.node(op, [x, other], loc=loc)
    if c.draw(st.booleans()):
        y = c.node("cast", [y], {"dtype": "f32"}, loc=loc)
    return y


def _bool_flow(c: _Ctx) -> Value | None:
    """Bool data flow: a comparison (tensor or scalar), logical ops, then ``where`` or ``masked_fill``."""
    x = c.pick()
    if x is None:
        return None
    loc = c.loc()
    cmp = c.draw(st.sampled_from(COMPARE))
    other = c.pick(lambda v: v.type == x.type)
    if other is not None and c.draw(st.booleans()):
        cond = c.node(cmp, [x, other], loc=loc)
    else:
        cond = c.node(cmp, [x], {"scalar": c.draw(st.floats(-1, 1, width=32))}, loc=loc)
    extra = c.pick(lambda v: v.type == cond.type, dtypes=("bool",))
    how = c.draw(st.sampled_from(["and", "or", "not", "none"]))
    if how == "not":
        cond = c.node("logical_not", [cond], loc=loc)
    elif how != "none" and extra is not None:
        cond = c.node("logical_and" if how == "and" else "logical_or", [cond, extra], loc=loc)
    if c.draw(st.booleans()):
        return c.node("masked_fill", [x, cond], {"value": c.draw(st.floats(-2, 2, width=32))}, loc=loc)
    y = c.pick(lambda v: v.type == x.type) or x
    form = c.draw(st.sampled_from(["tensors", "a_scalar", "b_scalar"]))
    if form == "tensors":
        return c.node("where", [cond, x, y], loc=loc)
    s = c.draw(st.floats(-1, 1, width=32))
    return c.node("where", [cond, x], {"b_scalar" if form == "b_scalar" else "a_scalar": s}, loc=loc)


def _embedding(c: _Ctx) -> Value | None:
    """Rows of a parameter table indexed by the token ids (an integer input)."""
    ids = c.pick(lambda v: v.producer is None, dtypes=("i64",))
    if ids is None:
        return None
    loc = c.loc()
    w = c.param((VOCAB, c.draw(st.sampled_from(c.dims))), share=False, loc=loc)
    return c.node("embedding", [ids, w], loc=loc)


def _noop(c: _Ctx) -> Value | None:
    """A node that computes its operand unchanged (canonicalization fodder): ``x * 1``, ``1 * x``,
    ``x + 0``, ``x - 0``, ``x / 1`` with the constant as a ``full``, a uniform parameter or a scalar
    attribute; an identity reshape, permute, transpose, expand or cast.  Integer values too."""
    x = c.pick(dtypes=("f32", "i32", "i64"))
    if x is None:
        return None
    kind = c.draw(st.sampled_from(["mul", "add", "sub", "div", "reshape", "permute", "transpose", "expand",
                                   "cast"]))
    if kind == "div" and x.type.dtype != "f32":
        kind = "mul"  # div is defined on floats only
    loc = c.loc()
    if kind in ("reshape", "expand"):
        return c.node(kind, [x], {"shape": tuple(x.type.shape)}, loc=loc)
    if kind == "permute":
        return c.node("permute", [x], {"perm": tuple(range(x.type.rank))}, loc=loc)
    if kind == "transpose":
        d = c.draw(st.integers(0, max(x.type.rank - 1, 0)))
        return c.node("transpose", [x], {"dim0": d, "dim1": d}, loc=loc)
    if kind == "cast":
        return c.node("cast", [x], {"dtype": x.type.dtype}, loc=loc)
    unit = 1.0 if kind in ("mul", "div") else c.draw(st.sampled_from([0.0, -0.0]))
    form = c.draw(st.sampled_from(["scalar", "full", "param"]))
    left = kind in ("mul", "add") and c.draw(st.booleans())
    if form == "scalar":
        return c.node(kind, [x], {"scalar": unit, "reverse": left}, loc=loc)
    last = x.type.shape[-1] if x.type.rank else 1
    shape = c.draw(st.sampled_from([(1,), (last,)] if isinstance(last, int) else [(1,)]))
    if form == "full":
        k = c.node("full", [], {"shape": shape, "value": unit, "dtype": x.type.dtype}, loc=loc)
    else:
        k = c.param(shape, data=torch.full(shape, unit, dtype=torch_dtype(x.type.dtype)), loc=loc)
    return c.node(kind, [k, x] if left else [x, k], loc=loc)


def _duplicate(c: _Ctx) -> Value | None:
    """An exact copy (op, operands, attributes) of an earlier non-param node."""
    cands = [n for n in c.m.nodes if n.op != "param" and len(n.outputs) == 1]
    if not cands:
        return None
    n = c.draw(st.sampled_from(cands))
    return c.m.create_node(n.op, list(n.inputs), dict(n.attrs), scope=n.scope, block=n.block).outputs[0]


def _conv_bn(c: _Ctx) -> Value | None:
    """``transpose -> conv1d -> batch_norm -> transpose`` over the feature axis (fold-batch-norm's work);
    opt-in (see ``OPT_IN``), so the other tests' module distribution does not change."""
    if not all(_has(o) for o in ("conv", "batch_norm", "transpose")):
        return None
    x = c.pick(lambda v: v.type.rank == 3 and isinstance(v.type.shape[-1], int))
    if x is None:
        return None
    d, o, k = int(x.type.shape[-1]), c.draw(st.sampled_from(list(c.dims))), c.draw(st.sampled_from([1, 3]))
    loc = c.loc()
    t = c.node("transpose", [x], {"dim0": 1, "dim1": 2}, loc=loc)
    ins = [t, c.param((o, d, k), share=False, loc=loc)]
    if c.draw(st.booleans()):
        ins.append(c.param((o,), share=False, loc=loc))
    y = c.node("conv", ins, {"stride": (1,), "padding": (k // 2,), "dilation": (1,), "groups": 1}, loc=loc)
    stats = [c.param((o,), share=False, loc=loc),
             c.param((o,), share=False, data=torch.rand(o, generator=c.gen) + 0.5, loc=loc)]
    affine = [c.param((o,), share=False, loc=loc) for _ in range(c.draw(st.integers(0, 2)))]
    y = c.node("batch_norm", [y, *stats, *affine], {"eps": 1e-5}, loc=loc)
    return c.node("transpose", [y], {"dim0": 1, "dim1": 2}, loc=loc)


BUILDERS: dict[str, Callable[[_Ctx], Value | None]] = {
    "unary": _unary,
    "binary": _binary,
    "linear": _linear,
    "matmul": _matmul,
    "softmax": _softmax,
    "norm": _norm,
    "transpose": _transpose,
    "attention": _attention,
    "split_heads": _split_heads,
    "channel_permute": _channel_permute,
    "lowrank_linear": _lowrank,
    "quant_linear": _quant_linear,
    "constant": _constant_subexpr,
    "duplicate": _duplicate,
    "noop": _noop,
    "int_flow": _int_flow,
    "bool_flow": _bool_flow,
    "embedding": _embedding,
    "conv_bn": _conv_bn,
}

# Builders used only when asked for by name (``modules(builders=[...])``).
OPT_IN = ("conv_bn",)


# Builders whose nodes exist to give passes work (no-ops, duplicates, constant subexpressions,
# linears for the quantizers).
FODDER = ("noop", "duplicate", "constant", "linear")


def available_builders() -> list[str]:
    """Builders whose ops are registered now (compression ops are always there)."""
    need = {"unary": any(_has(o) for o in SAFE_UNARY), "binary": any(_has(o) for o in SAFE_BINARY),
            "linear": _has("linear"), "matmul": _has("matmul"), "softmax": _has("softmax"),
            "split_heads": _has("reshape") and _has("permute"),
            "norm": _has("layer_norm") or _has("rms_norm"), "transpose": _has("transpose"),
            "attention": _has("reshape") and _has("permute"),
            "constant": any(_has(o) for o in SAFE_BINARY),
            "int_flow": _has("cast") and all(_has(o) for o in INT_UNARY + INT_BINARY),
            "bool_flow": all(_has(o) for o in (*COMPARE, "logical_and", "logical_or", "logical_not", "where",
                                                "masked_fill")),
            "embedding": _has("embedding")}
    return [b for b in BUILDERS if need.get(b, True) and b not in OPT_IN]


@st.composite
def modules(draw: Callable[[st.SearchStrategy[Any]], Any], *, max_nodes: int = 10,
            symbolic: bool | None = None, builders: list[str] | None = None,
            dims: tuple[int, ...] = (4, 8)) -> Module:
    """A random valid module (see the module docstring); ``dims`` are the feature sizes drawn from."""
    names = builders if builders is not None else available_builders()
    if not names:
        raise ValueError("no builders available")
    sym = draw(st.booleans()) if symbolic is None else symbolic
    seq: int | str = "s0" if sym else draw(st.integers(1, 4))
    batch = draw(st.integers(1, 2))
    m = Module(draw(st.sampled_from(["random", "g", "net"])))
    m.meta = {"generator": "tests/strategies.py", "seed_model": draw(st.integers(0, 9))}
    c = _Ctx(draw, m, torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1))), dims=tuple(dims))
    for i in range(draw(st.integers(1, 2))):
        d = draw(st.sampled_from(list(dims)))
        c.pool.append(m.add_input(f"x{i}", TensorType((batch, seq, d), "f32")))
    if "embedding" in names and draw(st.integers(0, 2)) == 0:
        c.pool.append(m.add_input("ids", TensorType((batch, seq), "i64")))
    steps = [draw(st.sampled_from(names)) for _ in range(draw(st.integers(1, max_nodes)))]
    # Each kind of fodder is in about three modules of four, at a random place in the graph,
    # so that every pass has work in most modules.
    steps += [b for b in FODDER if b in names and draw(st.sampled_from([True, True, True, False]))]
    for step, b in enumerate(draw(st.permutations(steps))):
        c.step = step
        v = BUILDERS[b](c)  # an invalid node raises: a builder out of step with the op library
        if v is not None:
            c.pool.append(v)
    produced = [v for v in c.pool if v.producer is not None] or c.pool
    k = draw(st.integers(1, min(3, len(produced))))
    outs = [produced[-1]] + draw(st.lists(st.sampled_from(produced), max_size=k - 1, unique_by=id))
    outs = list({id(v): v for v in outs}.values())
    m.set_outputs(outs, [f"out{i}" for i in range(len(outs))])
    return m


SPECIAL_FLOATS = (float("nan"), float("inf"), float("-inf"), -0.0)


def inputs_for(module: Module, seq_len: int, seed: int = 0, *, special: bool = False) -> list[torch.Tensor]:
    """Random inputs for ``module`` with every symbol bound to ``seq_len``: ``randn`` floats (with
    ``special``, about one element in eight is NaN, +-inf or -0.0), integer ids in ``[0, VOCAB)``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for v in module.inputs:
        env = {s: seq_len for s in v.type.symbols}
        shape = tuple(eval_dim(d, env) for d in v.type.shape)
        if v.type.dtype in ("i64", "i32"):
            out.append(torch.randint(0, VOCAB, shape, generator=g, dtype=torch.int64).to(torch_dtype(v.type.dtype)))
            continue
        t = torch.randn(shape, generator=g)
        if special and t.numel():
            where = torch.rand(shape, generator=g) < 0.125
            pick = torch.randint(0, len(SPECIAL_FLOATS), shape, generator=g)
            t = torch.where(where, torch.tensor(SPECIAL_FLOATS)[pick], t)
        out.append(t)
    return out


@st.composite
def module_and_inputs(draw: Callable[[st.SearchStrategy[Any]], Any], *, special: bool = False,
                      **kwargs: Any) -> tuple[Module, list[torch.Tensor]]:
    """``(module, inputs)``: a random module and matching random inputs (symbols bound to 1..5);
    ``special`` puts NaN, +-inf and -0.0 into the float inputs."""
    m = draw(modules(**kwargs))
    return m, inputs_for(m, draw(st.integers(1, 5)), draw(st.integers(0, 2**16)), special=special)


def changed_share(transform: Callable[[Module], Module], n: int = 60, **kwargs: Any) -> float:
    """The share of ``n`` generated modules (fixed seed) whose printed IR ``transform`` changes.

    ``transform`` gets a clone and returns the result (e.g. a pass run through the pass
    manager).  Derandomized, so a pass whose share drops fails the same way every run.
    """
    from hypothesis import HealthCheck, given, settings

    from ctc.ir.text import print_module

    seen: list[bool] = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(modules(**kwargs))
    def probe(m: Module) -> None:
        seen.append(print_module(transform(m.clone())) != print_module(m))

    probe()
    return sum(seen) / max(len(seen), 1)
