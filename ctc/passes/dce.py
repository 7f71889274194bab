"""Dead-code elimination: remove pure nodes no output depends on, then unused parameters."""

from __future__ import annotations

from dataclasses import dataclass

from ctc.ir.graph import Module, Node
from ctc.ir.ops import get_op
from ctc.passes.base import Pass, PassContext, PassOptions, option, register_pass


def is_dead(module: Module, node: Node) -> bool:
    """A pure node none of whose outputs is read by a node or returned by the module."""
    if not get_op(node.op).pure:
        return False
    return all(not v.uses and not module.is_output(v) for v in node.outputs)


def eliminate_dead(module: Module, candidates: list[Node] | None = None,
                   keep: frozenset[int] = frozenset()) -> list[Node]:
    """Erase dead pure nodes, following chains backwards; returns the erased nodes in order.

    ``candidates`` restricts which nodes may be erased (all when None); ``keep`` holds
    ``id()`` of nodes that must stay.  One reverse sweep suffices: a node's readers come
    after it, so they have already been erased when it is examined.
    """
    allowed = None if candidates is None else {id(n) for n in candidates}
    erased: list[Node] = []
    for node in reversed(list(module.nodes)):
        if id(node) in keep or (allowed is not None and id(node) not in allowed):
            continue
        if is_dead(module, node):
            module.erase(node)
            erased.append(node)
    erased.reverse()
    return erased


@register_pass
class DcePass(Pass):
    """Dead-code elimination: drop pure nodes whose results nothing uses, then unused parameters.

    Impure ops (declared ``pure=False``) always stay.  With a selector, only selected nodes
    are removed, and only parameters whose every reader was removed are pruned.
    """

    name = "dce"

    @dataclass(frozen=True)
    class Options(PassOptions):
        """Options of ``dce``."""

        prune_params: bool = option(True, "drop parameters that no param node reads any more")

    def run(self, module: Module, ctx: PassContext) -> Module:
        cands = None if ctx.selector.is_all else [n for n in module.nodes if ctx.selected(n)]
        before = set(module.params)
        read_by_erased: set[str] = set()
        erased = eliminate_dead(module, cands)
        for n in erased:
            if n.op == "param":
                read_by_erased.add(n.attrs["name"])
        pruned: list[str] = []
        if self.options.prune_params:
            still = {n.attrs["name"] for n in module.nodes if n.op == "param"}
            if ctx.selector.is_all:
                pruned = [k for k in module.params if k not in still]
            else:
                pruned = [k for k in module.params if k in read_by_erased and k not in still]
            for k in pruned:
                del module.params[k]
        counts: dict[str, int] = {}
        for n in erased:
            counts[n.op] = counts.get(n.op, 0) + 1
        if erased:
            what = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
            ctx.note(f"removed {len(erased)} dead node(s): {what}")
        if pruned:
            ctx.note(f"pruned {len(pruned)} unused parameter(s) of {len(before)}")
        ctx.metrics.update(nodes_removed=len(erased), params_pruned=len(pruned))
        return module
