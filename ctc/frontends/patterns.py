"""Capture-time fusions: recognise decomposed Hugging Face idioms and rebuild them as whole ops.

* ``rms_norm``: ``w * (x * rsqrt(mean(x^2, -1, keepdim) + eps))`` (Llama/Qwen ``RMSNorm`` in fp32;
  in half precision the same between ``cast(x16, f32)`` and a cast back to x16's dtype);
* ``rotary_embedding``: ``x * cos + cat(-x[..., h:], x[..., :h]) * sin`` (HF ``apply_rotary_pos_emb``);
* grouped-query attention: ``sdpa(q, repeat_kv(k), repeat_kv(v))`` becomes ``sdpa(q, k, v, enable_gqa)``
  (torch repeats each kv head for consecutive query heads, exactly as HF ``repeat_kv`` does).

Each rewrite computes the same torch operations in the same order as the op's reference, so
outputs stay bitwise equal; compression passes then see one norm / one rotary op per site.
Unmatched code is left decomposed (it is still correct, just less recognisable).
"""

from __future__ import annotations

from ctc.ir.graph import Module, Node, Value


def _single_use(v: Value, m: Module) -> bool:
    return len(v.uses) == 1 and not m.is_output(v)


def _prod(v: Value, op: str) -> Node | None:
    n = v.producer
    return n if n is not None and n.op == op else None


def _scalar(n: Node) -> float | None:
    return n.attrs.get("scalar") if not n.attrs.get("reverse") else None


def _fuse_rms_norm(m: Module) -> int:
    count = 0
    for r in list(m.nodes):
        if r.op != "rsqrt" or r.module is None:
            continue
        a = _prod(r.inputs[0], "add")
        if a is None or len(a.inputs) != 1 or _scalar(a) is None:
            continue
        mean = _prod(a.inputs[0], "mean")
        if mean is None or not mean.attrs["keepdim"] or mean.attrs["axes"] != (mean.inputs[0].type.rank - 1,):
            continue
        p = _prod(mean.inputs[0], "pow")
        if p is None or len(p.inputs) != 1 or _scalar(p) != 2.0:
            continue
        x = p.inputs[0]
        if x.type.dtype != "f32" or not all(_single_use(v.output, m) for v in (p, mean, a, r)):
            continue
        h = r.output.users[0]
        if h.op != "mul" or len(h.inputs) != 2 or {id(v) for v in h.inputs} != {id(x), id(r.output)}:
            continue
        if h.inputs[0] is not x or not _single_use(h.output, m):
            continue
        src, down = x, None  # half precision: x = cast(src, f32) ... cast(h, src dtype)
        up = _prod(x, "cast")
        if up is not None and up.inputs[0].type.dtype in ("f16", "bf16") and len(x.users) == 2 \
                and not m.is_output(x):
            down = h.output.users[0]
            if down.op != "cast" or down.attrs["dtype"] != up.inputs[0].type.dtype \
                    or not _single_use(down.output, m):
                continue
            src = up.inputs[0]
        last = down.output if down is not None else h.output
        y = last.users[0]
        if y.op != "mul" or len(y.inputs) != 2:
            continue
        w = y.inputs[0] if y.inputs[1] is last else y.inputs[1]
        if w.producer is None or w.producer.op != "param" or w.type.rank != 1 or w.type.dtype != src.type.dtype:
            continue
        if y.inputs[0] is not w:  # reference computes weight * h
            continue
        new = m.create_node("rms_norm", [src, w], {"eps": float(_scalar(a))}, scope=y.scope, block=y.block,
                            before=y).output
        m.replace_all_uses_with(y.output, new)
        for n in (y, down, h, r, a, mean, p, up if down is not None else None):
            if n is not None:
                m.erase(n)
        count += 1
    return count


def _rotate_half_source(c: Value, m: Module) -> Value | None:
    """x when c = concat(neg(x[..., h:]), x[..., :h]) along the last axis, else None."""
    cat = _prod(c, "concat")
    if cat is None or len(cat.inputs) != 2 or cat.attrs["axis"] != c.type.rank - 1:
        return None
    neg = _prod(cat.inputs[0], "neg")
    lo = _prod(cat.inputs[1], "slice")
    hi = _prod(neg.inputs[0], "slice") if neg is not None else None
    if hi is None or lo is None:
        return None
    x = lo.inputs[0]
    if hi.inputs[0] is not x:
        return None
    d = x.type.shape[-1]
    if not isinstance(d, int) or d % 2:
        return None
    last = x.type.rank - 1
    if (lo.attrs["axis"], lo.attrs["start"], lo.attrs["end"], lo.attrs["step"]) != (last, (0,), (d // 2,), 1):
        return None
    if (hi.attrs["axis"], hi.attrs["start"], hi.attrs["end"], hi.attrs["step"]) != (last, (d // 2,), (d,), 1):
        return None
    return x


def _fuse_rotary(m: Module) -> int:
    count = 0
    for add in list(m.nodes):
        if add.op != "add" or add.module is None or len(add.inputs) != 2:
            continue
        m1, m2 = (_prod(v, "mul") for v in add.inputs)
        if m1 is None or m2 is None or len(m1.inputs) != 2 or len(m2.inputs) != 2:
            continue
        x = m1.inputs[0]
        cos = m1.inputs[1]
        rot = m2.inputs[0]
        sin = m2.inputs[1]
        if _rotate_half_source(rot, m) is not x or x.type.dtype != cos.type.dtype:
            continue
        try:
            new = m.create_node("rotary_embedding", [x, cos, sin], scope=add.scope, block=add.block, before=add).output
        except Exception:  # noqa: BLE001 - shapes that do not fit the op stay decomposed
            continue
        m.replace_all_uses_with(add.output, new)
        count += 1
    return count


def _repeat_kv_source(v: Value) -> tuple[Value, int] | None:
    """(kv, n_rep) when v = reshape(expand(unsqueeze(kv, 2), [B, H, n, S, D]), [B, H*n, S, D]) (HF repeat_kv)."""
    r = _prod(v, "reshape")
    e = _prod(r.inputs[0], "expand") if r is not None else None
    u = _prod(e.inputs[0], "unsqueeze") if e is not None else None
    if u is None or u.attrs["axis"] != 2 or u.inputs[0].type.rank != 4:
        return None
    kv = u.inputs[0]
    b, h, s, d = kv.type.shape
    n = e.output.type.shape[2]
    if not isinstance(n, int) or not isinstance(h, int):
        return None
    if tuple(e.output.type.shape) != (b, h, n, s, d) or tuple(v.type.shape) != (b, h * n, s, d):
        return None
    return kv, n


def _fuse_gqa(m: Module) -> int:
    """sdpa(q, repeat_kv(k), repeat_kv(v)) -> sdpa(q, k, v, enable_gqa=True): kv heads stay unrepeated."""
    count = 0
    for att in list(m.nodes):
        if att.op != "scaled_dot_product_attention" or att.attrs["enable_gqa"]:
            continue
        ks, vs = _repeat_kv_source(att.inputs[1]), _repeat_kv_source(att.inputs[2])
        if ks is None or vs is None or ks[1] != vs[1] or ks[1] == 1:
            continue
        new = m.create_node("scaled_dot_product_attention", [att.inputs[0], ks[0], vs[0], *att.inputs[3:]],
                            {**att.attrs, "enable_gqa": True}, scope=att.scope, block=att.block, before=att).output
        m.replace_all_uses_with(att.output, new)
        m.erase(att)
        count += 1
    return count


def dce(m: Module) -> int:
    """Erase nodes whose outputs nobody reads (then parameters nobody reads)."""
    removed = 0
    for n in reversed(list(m.nodes)):
        if n.opdef.pure and all(not v.uses and not m.is_output(v) for v in n.outputs):
            m.erase(n)
            removed += 1
    m.prune_params()
    return removed


def fuse_patterns(m: Module) -> dict[str, int]:
    """Apply every capture-time fusion; returns how many sites each one rewrote."""
    counts = {"rms_norm": _fuse_rms_norm(m), "rotary_embedding": _fuse_rotary(m), "gqa_attention": _fuse_gqa(m)}
    dce(m)
    m.meta["fused"] = {k: v for k, v in counts.items() if v}
    return counts
