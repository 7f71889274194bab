"""Dead-code elimination: remove pure nodes no output depends on, then unused parameters."""

from __future__ import annotations

from dataclasses import dataclass

from ctc.ir.graph import Module, Node
from ctc.ir.ops import get_op
from ctc.options import option
from ctc.passes.base import Pass, PassContext, PassOptions, register_pass


def is_dead(module: Module, node: Node) -> bool:
    """A pure node none of whose outputs is read by a node or returned by the module."""
    if not get_op(node.op).pure:
        return False
    return all(not v.uses and not module.is_output(v) for v in node.outputs)


@register_pass
class DcePass(Pass):
    """Dead-code elimination: drop pure nodes whose results nothing uses, then unused parameters.

    Impure ops (declared ``pure=False``) always stay.  With a selector, the dead nodes of the
    selection are removed, with what only they kept alive (the rewriter's cleanup rule), and
    only parameters whose every reader was removed are pruned; dead code elsewhere stays.
    """

    name = "dce"

    @dataclass(frozen=True)
    class Options(PassOptions):
        """Options of ``dce``."""

        prune_params: bool = option(True, "drop parameters that no param node reads any more")

    def run(self, module: Module, ctx: PassContext) -> Module:
        rw = ctx.rewriter(module, prune_params=self.options.prune_params)
        before = len(module.params)
        erased = rw.erase_dead(ctx.selected)
        if self.options.prune_params and ctx.selector.is_all:
            rw.prune_unread_params()
        log = rw.log
        if erased:
            what = ", ".join(f"{k} x{v}" for k, v in sorted(log.erased.items()))
            rw.note(f"removed {erased} dead node(s): {what}")
        if log.params_removed:
            rw.note(f"pruned {len(log.params_removed)} unused parameter(s) of {before}")
        ctx.metrics.update(nodes_removed=erased, params_pruned=len(log.params_removed))
        return module
