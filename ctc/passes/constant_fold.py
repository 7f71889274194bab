"""Constant folding: evaluate nodes whose operands are all constants into new parameters."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ctc.ir.graph import Module, Node, Value
from ctc.ir.ops import get_op
from ctc.ir.rewrite import Rewriter
from ctc.ir.symbolic import SymbolicError, eval_dim
from ctc.ir.types import TensorType
from ctc.options import option
from ctc.passes.base import Pass, PassContext, PassError, PassOptions, register_pass


def _static_attrs(node: Node) -> dict | None:
    """The node's attributes with ``dims`` evaluated, or None when a dim is symbolic."""
    opdef = get_op(node.op)
    attrs = dict(node.attrs)
    for k, spec in opdef.attrs.items():
        if spec.kind == "dims" and attrs.get(k) is not None:
            try:
                attrs[k] = tuple(eval_dim(d, {}) for d in attrs[k])
            except (SymbolicError, KeyError, ValueError):
                return None
    return attrs


def _dying_cone(module: Module, node: Node, const_nodes: set[int]) -> list[Node]:
    """``node`` and the constant nodes that would become dead if its results were replaced."""
    cone: dict[int, Node] = {}
    stack = [v.producer for v in node.inputs if v.producer is not None]
    while stack:
        a = stack.pop()
        if id(a) in cone or id(a) not in const_nodes:
            continue
        cone[id(a)] = a
        stack.extend(v.producer for v in a.inputs if v.producer is not None)
    dying = {id(node): node}
    changed = True
    while changed:  # the cone is small: iterate to a fixpoint
        changed = False
        for a in cone.values():
            if id(a) in dying or not get_op(a.op).pure:
                continue
            if all(not module.is_output(v) and all(id(u) in dying for u, _ in v.uses) for v in a.outputs):
                dying[id(a)] = a
                changed = True
    return list(dying.values())


def _freed_elements(rw: Rewriter, dying: list[Node]) -> int:
    """Parameter elements released when ``dying`` nodes go: parameters all of whose readers die."""
    gone = Counter(n.attrs["name"] for n in dying if n.op == "param")
    return sum(int(rw.module.params[k].numel()) for k, c in gone.items() if c >= rw.readers_of_param(k))


@register_pass
class ConstantFoldPass(Pass):
    """Constant folding: compute nodes whose operands are all parameters or constants, once.

    A pure node whose operands are all constant (``param`` reads, or constant-only
    subexpressions such as ``full`` with a static shape) and whose results are static and
    hold at most ``max_elements`` elements each is evaluated with its op's reference
    implementation and replaced by a ``param`` read of a new parameter.  The results are
    exactly what the interpreter would compute.  Nodes left dead are removed, and
    parameters nothing reads any more are dropped.  With a selector, only selected nodes
    are folded.

    A compression pipeline must not grow the model behind the user's back: by default a
    fold happens only when the new parameter is no larger than the parameters it frees
    (``full(2) * w`` with ``w`` read nowhere else folds; ``unsqueeze(w)`` with ``w`` still
    read elsewhere, or constants computed from ``arange``, stay computed).  ``grow_params``
    lifts that rule; ``fold_params`` lifts it and the size limit (e.g. fold a transpose of
    a weight into the weight).
    """

    name = "constant-fold"

    @dataclass(frozen=True)
    class Options(PassOptions):
        """Options of ``constant-fold``."""

        max_elements: int = option(65536, "fold a node only when each result has at most this many elements",
                                   min=0)
        grow_params: bool = option(False, "also fold when the new parameter is larger than the parameters "
                                          "the fold frees (stores computed constants such as index tensors)")
        fold_params: bool = option(False, "fold every constant subexpression regardless of result size and "
                                          "growth (parameter-only subexpressions become new parameters)")

    def run(self, module: Module, ctx: PassContext) -> Module:
        rw = ctx.rewriter(module)
        consts: dict[int, torch.Tensor] = {}  # id(value) -> concrete tensor (computed lazily)
        const_nodes: set[int] = set()
        folded: list[Node] = []
        may_grow = self.options.grow_params or self.options.fold_params
        skipped_growth = 0

        def value_of(v: Value) -> torch.Tensor:
            if id(v) not in consts:
                p = v.producer
                assert p is not None and id(p) in const_nodes
                if p.op == "param":
                    consts[id(v)] = module.params[p.attrs["name"]]
                else:
                    res = get_op(p.op).ref(*[value_of(x) for x in p.inputs], **_static_attrs(p))
                    outs = list(res) if isinstance(res, (tuple, list)) else [res]
                    for o, t in zip(p.outputs, outs, strict=True):
                        consts[id(o)] = t
            return consts[id(v)]

        for node in list(module.nodes):
            if node.module is not module:
                continue  # erased by an earlier fold's cleanup
            opdef = get_op(node.op)
            if node.op == "param":
                const_nodes.add(id(node))
                continue
            if not opdef.pure or any(v.producer is None or id(v.producer) not in const_nodes for v in node.inputs):
                continue
            if not all(o.type.is_static for o in node.outputs) or _static_attrs(node) is None:
                continue
            const_nodes.add(id(node))
            if not node.inputs:
                continue  # already a constant (e.g. `full`): folding would only move it into params
            if not ctx.selected(node):
                continue
            if not self.options.fold_params and any(o.type.numel() > self.options.max_elements
                                                    for o in node.outputs):
                continue
            if not may_grow:
                freed = _freed_elements(rw, _dying_cone(module, node, const_nodes))
                if sum(o.type.numel() for o in node.outputs) > freed:
                    skipped_growth += 1
                    continue
            with torch.no_grad():
                results = [value_of(o) for o in node.outputs]
            new: list[Value] = []
            for o, t in zip(node.outputs, results, strict=True):
                if TensorType.of(t) != o.type:
                    raise PassError(f"constant-fold: {node.op} at {node.scope or '<root>'} evaluated to "
                                    f"{TensorType.of(t)} but its result is typed {o.type}")
                v = rw.new_param(f"{node.scope or node.op}.{o.name}.const", t.detach().clone().contiguous(),
                                 before=node)
                const_nodes.add(id(v.producer))
                consts[id(v)] = module.params[v.producer.attrs["name"]]
                new.append(v)
            rw.replace(node, new)
            rw.cleanup()  # what only fed the folded node goes now: the next growth check sees it
            folded.append(node)
        log = rw.log
        if folded:
            ops = sorted({n.op for n in folded})
            removed = sum(log.erased.values())
            rw.note(f"folded {len(folded)} node(s) ({', '.join(ops)}) into {len(log.params_added)} new parameter(s); "
                    f"removed {removed} dead node(s) and {len(log.params_removed)} parameter(s)")
        if skipped_growth:
            rw.note(f"left {skipped_growth} constant node(s) computed: folding them would store more parameter "
                    "elements than it frees (grow_params=true folds them)")
        ctx.metrics.update(nodes_folded=len(folded), params_added=len(log.params_added),
                           params_dropped=len(log.params_removed))
        return module
