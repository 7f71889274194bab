"""Canonicalization: remove no-op nodes (identity reshapes/permutes/casts, x*1, x+0, x-0, x/1).

Rewrites are a flat table of ``op -> rule``; a rule looks at one node and returns the
value that can replace its result, or None.  A rule fires only when the replacement has
exactly the result's type (no broadcast or dtype change hides behind the no-op).  Rules
for ops the registry does not declare are skipped, so the table can name ops that the
op library may not (yet) have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ctc.ir.graph import Module, Node, Value
from ctc.ir.ops import all_ops
from ctc.ir.verify import types_equal
from ctc.passes.base import Pass, PassContext, PassOptions, option, register_pass
from ctc.passes.dce import eliminate_dead

Rule = Callable[[Node, Module], "Value | None"]


def _same_type_input(node: Node, i: int = 0) -> Value | None:
    """Operand ``i`` if it has the node's result type (for ops that are identities then)."""
    if len(node.outputs) != 1 or len(node.inputs) <= i:
        return None
    v = node.inputs[i]
    return v if types_equal(v.type, node.outputs[0].type) else None


def _const_fill(v: Value, module: Module) -> float | None:
    """The single value a constant operand is filled with (``full``, or a uniform parameter)."""
    p = v.producer
    if p is None:
        return None
    if p.op == "full":
        return float(p.attrs["value"])
    if p.op == "param":
        t = module.params.get(p.attrs["name"])
        if t is None or t.numel() == 0 or t.numel() > 1 << 20 or not t.is_floating_point():
            return None
        first = t.reshape(-1)[0]
        if bool((t == first).all()) and torch.isfinite(first):
            return float(first)
    return None


def _identity_if(node: Node) -> Value | None:
    return _same_type_input(node)


def _permute(node: Node, module: Module) -> Value | None:
    perm = node.attrs.get("perm")
    if perm is None or tuple(perm) != tuple(range(node.inputs[0].type.rank)):
        return None
    return _same_type_input(node)


def _transpose(node: Node, module: Module) -> Value | None:
    d0, d1 = node.attrs.get("dim0"), node.attrs.get("dim1")
    r = max(node.inputs[0].type.rank, 1)
    if not isinstance(d0, int) or not isinstance(d1, int) or d0 % r != d1 % r:
        return None
    return _same_type_input(node)


def _binary_unit(unit: float, *, left_ok: bool) -> Rule:
    """``x op c`` (or ``c op x`` when ``left_ok``) where c is ``unit`` -> ``x``.

    ``c`` is a constant operand filled with ``unit`` or the op's ``scalar`` attribute
    (``reverse`` puts the scalar on the left).
    """

    def rule(node: Node, module: Module) -> Value | None:
        scalar = node.attrs.get("scalar")
        if scalar is not None:
            if len(node.inputs) != 1 or float(scalar) != unit or (node.attrs.get("reverse") and not left_ok):
                return None
            return _same_type_input(node, 0)
        if len(node.inputs) != 2 or node.attrs.get("reverse"):
            return None
        for x, c in ((0, 1), (1, 0)) if left_ok else ((0, 1),):
            fill = _const_fill(node.inputs[c], module)
            if fill is not None and fill == unit:
                v = _same_type_input(node, x)
                if v is not None:
                    return v
        return None

    return rule


RULES: dict[str, Rule] = {
    "reshape": lambda n, m: _identity_if(n),
    "view": lambda n, m: _identity_if(n),
    "expand": lambda n, m: _identity_if(n),
    "broadcast_to": lambda n, m: _identity_if(n),
    "flatten": lambda n, m: _identity_if(n),
    "squeeze": lambda n, m: _identity_if(n),
    "unsqueeze": lambda n, m: _identity_if(n),
    "contiguous": lambda n, m: _identity_if(n),
    "cast": lambda n, m: _identity_if(n),
    "to": lambda n, m: _identity_if(n),
    "permute": _permute,
    "transpose": _transpose,
    "mul": _binary_unit(1.0, left_ok=True),
    "add": _binary_unit(0.0, left_ok=True),
    "sub": _binary_unit(0.0, left_ok=False),
    "div": _binary_unit(1.0, left_ok=False),
}


@register_pass
class CanonicalizePass(Pass):
    """Canonicalization: replace no-op nodes by their operand (identity reshape/permute/cast, x*1, x+0, ...).

    Replaced nodes, and constants left unused, are removed.  Outputs are bit-identical,
    except where ``x + 0`` met ``x = -0.0`` (the result keeps its sign now).  With a
    selector, only selected nodes are rewritten.
    """

    name = "canonicalize"

    @dataclass(frozen=True)
    class Options(PassOptions):
        """Options of ``canonicalize``."""

        arithmetic: bool = option(True, "also remove x*1, 1*x, x/1, x+0, 0+x and x-0")

    def run(self, module: Module, ctx: PassContext) -> Module:
        known = all_ops()
        rules = {op: r for op, r in RULES.items() if op in known
                 and (self.options.arithmetic or op not in ("mul", "add", "sub", "div"))}
        removed: dict[str, int] = {}
        touched: list[Node] = []
        for node in list(module.nodes):
            rule = rules.get(node.op)
            if rule is None or not ctx.selected(node):
                continue
            new = rule(node, module)
            if new is None:
                continue
            module.replace_all_uses_with(node.outputs[0], new)
            touched.append(node)
            touched.extend(v.producer for v in node.inputs if v.producer is not None)
            removed[node.op] = removed.get(node.op, 0) + 1
        if touched:
            read_before = {n.attrs["name"] for n in module.nodes if n.op == "param"}
            eliminate_dead(module, touched)
            still = {n.attrs["name"] for n in module.nodes if n.op == "param"}
            for k in sorted(read_before - still):
                del module.params[k]
            ctx.note("removed no-ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(removed.items())))
        ctx.metrics.update(nodes_removed=sum(removed.values()))
        return module
