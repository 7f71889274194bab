"""Attention masks as passes see them: find the causal part of a captured mask.

Hugging Face decoders hand attention one bool mask built as ``le(key_pos, query_pos) & padding``
(positions from ``arange``).  An attention op that knows it is causal can skip the upper
triangle (the sparse attention kernels do), so passes that replace attention split that mask
back into ``is_causal=true`` and the padding part.  The causal part is accepted only when its
positions provably run ``0..L-1`` over the query and the key axis, so the split never changes
what the op computes.
"""

from __future__ import annotations

from ctc.ir.graph import Node, Value
from ctc.ir.patterns import op, var
from ctc.ir.symbolic import dims_equal

__all__ = ["split_causal_mask"]

_CAUSAL = op("le", var("kpos"), var("qpos"))
_AND = op("logical_and", var("a"), var("b"))
_POSITION_STEPS = ("unsqueeze", "reshape", "expand", "cast")


def _arange_source(v: Value) -> Node | None:
    """The ``arange(0, n, 1)`` a position tensor is read from through shape-only steps and ``+ 0``."""
    while v.producer is not None:
        n = v.producer
        if n.op in _POSITION_STEPS:
            v = n.operand("x")
        elif n.op in ("add", "sub") and n.attrs.get("scalar") == 0.0 and not n.attrs.get("reverse"):
            v = n.operand("a")
        elif n.op == "arange":
            return n if tuple(n.attrs["start"]) == (0,) and n.attrs["step"] == 1 else None
        else:
            return None
    return None


def _is_top_left_causal(v: Value, lq: object, lk: object) -> bool:
    """``v`` is ``le(key_pos, query_pos)`` with positions ``0..Lk-1`` along the last axis and
    ``0..Lq-1`` along the one before: query i sees keys j <= i."""
    if v.producer is None:
        return False
    m = _CAUSAL.match(v.producer)
    if m is None:
        return False
    kpos, qpos = m["kpos"].type, m["qpos"].type
    if kpos.rank < 2 or qpos.rank < 2 or kpos.shape[-2] != 1 or qpos.shape[-1] != 1:
        return False
    if not (dims_equal(kpos.shape[-1], lk) and dims_equal(qpos.shape[-2], lq)):
        return False
    ka, qa = _arange_source(m["kpos"]), _arange_source(m["qpos"])
    return (ka is not None and qa is not None and dims_equal(ka.attrs["end"][0], lk)
            and dims_equal(qa.attrs["end"][0], lq))


def _true_constant(v: Value) -> bool:
    p = v.producer
    return p is not None and p.op == "full" and bool(p.attrs["value"]) and v.type.dtype == "bool"


def split_causal_mask(attn: Node) -> tuple[Value | None, bool] | None:
    """For an attention node whose bool mask is ``causal & rest`` (``causal`` top-left over its
    query and key lengths, possibly and-ed with a constant true): ``(rest, True)``, with ``rest``
    None when nothing but the causal part is left.  None when the mask is not of that form."""
    mask = attn.operand("mask")
    if mask is None or mask.type.dtype != "bool" or attn.attrs.get("is_causal"):
        return None
    lq, lk = attn.operand("q").type.shape[-2], attn.operand("k").type.shape[-2]
    todo, rest = [mask], []
    causal = False
    while todo:  # flatten a tree of logical_and
        v = todo.pop()
        m = _AND.match(v.producer) if v.producer is not None else None
        if m is not None and v.type.dtype == "bool":
            todo += [m["a"], m["b"]]
        elif not causal and _is_top_left_causal(v, lq, lk):
            causal = True
        elif not _true_constant(v):
            rest.append(v)
    if not causal or len(rest) > 1:
        return None
    return (rest[0] if rest else None), True
