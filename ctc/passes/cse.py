"""Common-subexpression elimination: one node per (op, operands, attributes) among pure nodes."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from ctc.ir.graph import Module, Node
from ctc.ir.ops import get_op
from ctc.ir.rewrite import Rewriter
from ctc.options import option
from ctc.passes.base import Pass, PassContext, PassOptions, register_pass


def freeze_attr(v: Any) -> Hashable:
    """A hashable key for an attribute value that tells apart what ``==`` conflates.

    ``True == 1`` and ``0.0 == -0.0`` in Python, but they are different attributes; NaN
    never equals itself, yet two NaN fill values are the same constant.  Keys carry the
    type name and ``repr`` of floats.
    """
    if isinstance(v, float):
        return ("float", repr(v))
    if isinstance(v, (list, tuple)):
        return ("seq", tuple(freeze_attr(x) for x in v))
    if isinstance(v, dict):
        return ("map", tuple(sorted((str(k), freeze_attr(x)) for k, x in v.items())))
    return (type(v).__name__, v)


def node_key(node: Node) -> Hashable:
    """Operands by identity, op name and attributes: equal keys compute equal results (pure ops)."""
    return (node.op, tuple(id(v) for v in node.inputs),
            tuple(sorted((k, freeze_attr(x)) for k, x in node.attrs.items())))


def _tensor_key(t: torch.Tensor) -> Hashable:
    return (str(t.dtype), tuple(t.shape))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (so -0.0 and 0.0 differ, and equal NaNs match)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


@register_pass
class CsePass(Pass):
    """Common-subexpression elimination: merge pure nodes with the same op, operands and attributes.

    ``param`` nodes reading the same parameter merge, so later nodes see shared operands
    and merge in turn (one forward sweep suffices in SSA order).  Impure ops never merge.
    With ``dedupe_params``, parameters holding identical tensors become one parameter
    first.  With a selector, only selected nodes are replaced (by an earlier equal node
    anywhere).  The kept node is the first; its scope and block stay.  A node is only
    replaced by one in its own block or outside the repeated blocks, unless
    ``across_blocks``: block-level passes (removal, reordering) rely on blocks not reading
    each other's nodes.
    """

    name = "cse"

    @dataclass(frozen=True)
    class Options(PassOptions):
        """Options of ``cse``."""

        dedupe_params: bool = option(False, "merge parameters whose tensors are identical (same dtype, "
                                            "shape and values), then their param nodes")
        across_blocks: bool = option(False, "also replace a node by an equal one inside another block "
                                            "(removing or reordering that block later would then break)")

    def run(self, module: Module, ctx: PassContext) -> Module:
        rw = ctx.rewriter(module)
        redirected = self._dedupe_params(rw) if self.options.dedupe_params else set()
        seen: dict[Hashable, list[Node]] = {}
        merged: dict[str, int] = {}
        across = self.options.across_blocks
        for node in list(module.nodes):  # one forward sweep: merged operands make later keys equal
            if not get_op(node.op).pure:
                continue
            key = node_key(node)
            cands = seen.setdefault(key, [])
            first = next((c for c in cands if across or c.block is None or c.block == node.block), None)
            if first is None or not ctx.selected(node):
                cands.append(node)
                continue
            rw.replace(node, first.outputs)
            merged[node.op] = merged.get(node.op, 0) + 1
        rw.cleanup()
        pruned = [k for k in rw.log.params_removed if k in redirected]
        total = sum(merged.values())
        if total:
            rw.note(f"merged {total} duplicate node(s): " + ", ".join(f"{k} x{v}" for k, v in sorted(merged.items())))
        if redirected:
            rw.note(f"{len(redirected)} parameter(s) are identical to earlier ones; {len(pruned)} dropped")
        ctx.metrics.update(nodes_merged=total, params_deduplicated=len(pruned))
        return module

    @staticmethod
    def _dedupe_params(rw: Rewriter) -> set[str]:
        """Point selected ``param`` nodes at the first parameter with identical data; returns the names
        redirected (the rewriter drops those nothing reads any more)."""
        module = rw.module
        groups: dict[Hashable, list[str]] = {}
        canon: dict[str, str] = {}
        for name, t in module.params.items():
            bucket = groups.setdefault(_tensor_key(t), [])
            for other in bucket:
                o = module.params[other]
                if o is t or torch.equal(_bits(o), _bits(t)):
                    canon[name] = other
                    break
            else:
                bucket.append(name)
        redirected: set[str] = set()
        for n in list(module.nodes):
            if n.op == "param" and n.attrs["name"] in canon and rw.selected(n):
                redirected.add(n.attrs["name"])
                rw.set_attrs(n, name=canon[n.attrs["name"]])
        return redirected
