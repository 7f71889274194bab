"""Capture-time fusions: recognise decomposed Hugging Face idioms and rebuild them as whole ops.

* ``rms_norm``: ``w * (x * rsqrt(mean(x^2, -1, keepdim) + eps))`` (Llama/Qwen ``RMSNorm`` in fp32;
  in half precision the same between ``cast(x16, f32)`` and a cast back to x16's dtype);
* ``rotary_embedding``: ``x * cos + cat(-x[..., h:], x[..., :h]) * sin`` (HF ``apply_rotary_pos_emb``);
* grouped-query attention: ``sdpa(q, repeat_kv(k), repeat_kv(v))`` becomes ``sdpa(q, k, v, enable_gqa)``
  (torch repeats each kv head for consecutive query heads, exactly as HF ``repeat_kv`` does); multi-query
  attention written as a broadcast (k/v with one head, Falcon) gets ``enable_gqa`` too;
* ``linear``: ``x @ w.T`` and ``x @ w.T + b`` on a 2-D weight parameter and a 1-D bias parameter (a
  hand-written linear, e.g. Falcon's ``FalconLinear``): compression passes select ``op linear``.

Each fusion is a pattern of :mod:`ctc.ir.patterns` and a rule applied by the rewrite driver.
Each computes the same torch operations in the same order as the op's reference, so outputs
stay bitwise equal (except a fused bias: ``F.linear`` adds it inside the GEMM, a last-bit
difference); compression passes then see one norm / one rotary op / one linear per site.  Unmatched
code is left decomposed (it is still correct, just less recognisable).
"""

from __future__ import annotations

from ctc.ir.graph import Module, Value
from ctc.ir.ops import OpError, get_op
from ctc.ir.patterns import Const, Match, has_type, op, splat, var
from ctc.ir.rewrite import Rewriter, apply_patterns, rule
from ctc.ir.verify import types_equal


def _scalar_attr(c: Const) -> bool:
    return c.is_scalar_attr


def _f32_weight(v: Value) -> bool:
    return v.producer is not None and v.producer.op == "param" and v.type.rank == 1 and v.type.dtype == "f32"


def _last_axis_mean(n) -> bool:  # noqa: ANN001 - a Node predicate
    return n.attrs["axes"] == (n.operand("x").type.rank - 1,)


def _normalized(x):  # noqa: ANN001, ANN202 - a pattern
    """x * rsqrt(mean(pow(x, 2), -1, keepdim) + eps), every intermediate read once."""
    return op("mul", x, op(
        "rsqrt", op(
            "add", op(
                "mean", op("pow", var("x"), splat(2.0).where(_scalar_attr), single_use=True),
                attrs={"keepdim": True}, where=_last_axis_mean, single_use=True),
            splat(name="eps").where(_scalar_attr), single_use=True),
        single_use=True), single_use=True)


# weight * normalized(x) in fp32
RMS_NORM = op("mul", var("w").where(_f32_weight), _normalized(var("x").where(has_type(dtype="f32"))))
# half precision: weight16 * cast(normalized(cast(x16, f32)), x16's dtype)
RMS_NORM_HALF = op("mul", var("w"), op("cast", _normalized(var("x").where(has_type(dtype="f32"))),
                                       name="down", single_use=True))


@rule(RMS_NORM)
def fuse_rms_norm(rw: Rewriter, m: Match) -> Value:
    return rw.create("rms_norm", {"x": m["x"], "weight": m["w"]}, {"eps": float(m["eps"].splat)}).output


@rule(RMS_NORM_HALF)
def fuse_rms_norm_half(rw: Rewriter, m: Match) -> Value | None:
    """The half-precision RMSNorm: x = cast(x16, f32) read only by the norm, the result cast back."""
    x, w = m["x"], m["w"]
    up = x.producer
    if up is None or up.op != "cast" or len(x.users) != 2 or rw.module.is_output(x):
        return None
    src = up.operand("x")
    dtype = src.type.dtype
    if dtype not in ("f16", "bf16") or m["down"].attrs["dtype"] != dtype:
        return None
    if w.producer is None or w.producer.op != "param" or w.type.rank != 1 or w.type.dtype != dtype:
        return None
    return rw.create("rms_norm", {"x": src, "weight": w}, {"eps": float(m["eps"].splat)}).output


def _halves(x: Value, lo_node, hi_node) -> bool:  # noqa: ANN001 - slice nodes
    d = x.type.shape[-1]
    if not isinstance(d, int) or d % 2:
        return False
    last = x.type.rank - 1

    def spec(n):  # noqa: ANN001, ANN202
        return (n.attrs["axis"], n.attrs["start"], n.attrs["end"], n.attrs["step"])

    return spec(lo_node) == (last, (0,), (d // 2,), 1) and spec(hi_node) == (last, (d // 2,), (d,), 1)


def _last_axis_concat(n) -> bool:  # noqa: ANN001 - a Node predicate
    return n.attrs["axis"] == n.outputs[0].type.rank - 1


# x * cos + concat(-x[..., h:], x[..., :h]) * sin
ROTARY = op("add", op("mul", var("x"), var("cos")), op(
    "mul", op("concat", op("neg", op("slice", var("x"), name="hi")), op("slice", var("x"), name="lo"),
              where=_last_axis_concat),
    var("sin")))


@rule(ROTARY)
def fuse_rotary(rw: Rewriter, m: Match) -> Value | None:
    x, cos, sin = m["x"], m["cos"], m["sin"]
    if not _halves(x, m["lo"], m["hi"]) or x.type.dtype != cos.type.dtype:
        return None
    try:  # shapes that do not fit the op stay decomposed
        (t,) = get_op("rotary_embedding").infer_types([x.type, cos.type, sin.type], {})
    except OpError:
        return None
    if not types_equal(t, m.root.output.type):
        return None
    return rw.create("rotary_embedding", {"x": x, "cos": cos, "sin": sin}).output


def _repeat_kv(name: str):  # noqa: ANN202 - a pattern
    """HF ``repeat_kv``: reshape(expand(unsqueeze(kv, 2), [B, H, n, S, D]), [B, H*n, S, D])."""
    return op("reshape", op("expand", op("unsqueeze", var(name), attrs={"axis": 2}, name=f"{name}_u"),
                            name=f"{name}_e"))


GQA = op("scaled_dot_product_attention", attrs={"enable_gqa": False}, k=_repeat_kv("k"), v=_repeat_kv("v"))


def _repeats(m: Match, name: str) -> int | None:
    kv: Value = m[name]
    if kv.type.rank != 4:
        return None
    b, h, s, d = kv.type.shape
    e = m[f"{name}_e"].output.type.shape
    n = e[2]
    if not isinstance(n, int) or not isinstance(h, int):
        return None
    rep = m.root.operand(name)
    if tuple(e) != (b, h, n, s, d) or tuple(rep.type.shape) != (b, h * n, s, d):
        return None
    return n


@rule(GQA)
def fuse_gqa(rw: Rewriter, m: Match) -> Value | None:
    """sdpa(q, repeat_kv(k), repeat_kv(v)) -> sdpa(q, k, v, enable_gqa=True): kv heads stay unrepeated."""
    nk, nv = _repeats(m, "k"), _repeats(m, "v")
    if nk is None or nk != nv or nk == 1:
        return None
    att = m.root
    return rw.create("scaled_dot_product_attention",
                     {"q": att.operand("q"), "k": m["k"], "v": m["v"], "mask": att.operand("mask")},
                     {**att.attrs, "enable_gqa": True}).output


def _single_kv_head(n) -> bool:  # noqa: ANN001 - a Node predicate
    q, k, v = (n.operand(x).type for x in ("q", "k", "v"))
    return (q.rank == 4 and k.rank == 4 and v.rank == 4 and k.shape[1] == 1 and v.shape[1] == 1
            and isinstance(q.shape[1], int) and q.shape[1] > 1)


MQA = op("scaled_dot_product_attention", attrs={"enable_gqa": False}, where=_single_kv_head)


@rule(MQA)
def fuse_mqa(rw: Rewriter, m: Match) -> Value | None:
    """sdpa(q, k, v) with one k/v head broadcast over q's heads -> enable_gqa (the same attention, one kv group)."""
    att = m.root
    try:
        (t,) = get_op("scaled_dot_product_attention").infer_types(
            [x.type for x in att.inputs], {**att.attrs, "enable_gqa": True})
    except OpError:
        return None
    if not types_equal(t, att.output.type):
        return None
    return rw.create("scaled_dot_product_attention",
                     {x: att.operand(x) for x in ("q", "k", "v", "mask")}, {**att.attrs, "enable_gqa": True}).output


def _swaps_2d(n) -> bool:  # noqa: ANN001 - a Node predicate
    """A transpose of a 2-D tensor (``permute [1, 0]`` or ``transpose 0, 1``)."""
    if n.operand("x").type.rank != 2:
        return False
    if n.op == "permute":
        return tuple(n.attrs["perm"]) == (1, 0)
    return {n.attrs["dim0"] % 2, n.attrs["dim1"] % 2} == {0, 1}


def _weight(v: Value) -> bool:
    return v.producer is not None and v.producer.op == "param" and v.type.rank == 2


# x @ w.T with w a [out, in] parameter
X_WT = op("matmul", var("x").where(has_type(dtype=("f32", "f16", "bf16"))),
          op(("permute", "transpose"), var("w").where(_weight), where=_swaps_2d))


def _bias_of(n, y: Value) -> Value | None:  # noqa: ANN001 - a Node
    """The 1-D parameter ``n`` (an add) adds to ``y`` when it is a linear's bias, else None."""
    if n.op != "add" or len(n.inputs) != 2:
        return None
    b = n.inputs[1] if n.inputs[0] is y else n.inputs[0]
    if b is y or b.producer is None or b.producer.op != "param" or b.type.rank != 1 or b.type.dtype != y.type.dtype:
        return None
    return b if b.type.shape[0] == y.type.shape[-1] and types_equal(n.output.type, y.type) else None


@rule(X_WT)
def fuse_linear(rw: Rewriter, m: Match) -> Value | bool | None:
    """x @ w.T -> linear(x, w); a 1-D parameter added to the result (its only reader) becomes the bias."""
    x, w, mm = m["x"], m["w"], m.root
    y = mm.output
    if x.type.rank < 2 or x.type.dtype != w.type.dtype:
        return None
    readers = y.users
    bias = _bias_of(readers[0], y) if len(readers) == 1 and not rw.module.is_output(y) else None
    if bias is None:
        return rw.create("linear", {"x": x, "weight": w}).output
    add = readers[0]  # after the bias's param read: the linear goes there, at the matmul's scope
    rw.replace(add, rw.create("linear", {"x": x, "weight": w, "bias": bias}, before=add, scope=mm.scope,
                              block=mm.block).output)
    rw.erase(mm)
    return True


# fusion name -> its rules
FUSIONS = {"rms_norm": (fuse_rms_norm, fuse_rms_norm_half), "rotary_embedding": (fuse_rotary,),
           "gqa_attention": (fuse_gqa, fuse_mqa), "linear": (fuse_linear,)}


def fuse_patterns(m: Module) -> dict[str, int]:
    """Apply every capture-time fusion, then remove dead code; returns how many sites each fusion rewrote."""
    rw = Rewriter(m)
    apply_patterns(rw, [r for rules in FUSIONS.values() for r in rules])
    rw.erase_dead()  # capture leaves dead nodes (unused exports); a fresh capture is cleaned whole
    rw.prune_unread_params()
    counts = {k: sum(rw.log.fired[r.name] for r in rules) for k, rules in FUSIONS.items()}
    m.meta["fused"] = {k: v for k, v in counts.items() if v}
    return counts
