"""Canonicalization: remove no-op nodes (identity reshapes/permutes/casts, x*1, x+0, x-0, x/1).

Each rewrite is a pattern over the registry's ops (an unknown op name fails when this module
is imported) and a rule that replaces the node by its operand.  A rule fires only when the
operand has exactly the result's type, so no broadcast or dtype change hides behind the
no-op.  The table is flat and read top to bottom, in the manner of tinygrad's rewrite lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ctc.ir.patterns import Match, op, same_type, unit, var, zero
from ctc.ir.rewrite import RewritePattern, Rewriter, Rule
from ctc.options import option
from ctc.passes.base import PassOptions, PatternPass, register_pass


def _operand_x(rw: Rewriter, m: Match):  # noqa: ANN202 - a rule: Value | None
    """The matched ``x`` when it has the node's result type (the node is then the identity)."""
    return m["x"] if same_type(m["x"], m.root.output) else None


def _identity_perm(perm: Sequence[int]) -> bool:
    return tuple(perm) == tuple(range(len(perm)))


def _same_axis(node) -> bool:  # noqa: ANN001 - a Node predicate
    r = max(node.operand("x").type.rank, 1)
    return node.attrs["dim0"] % r == node.attrs["dim1"] % r


# Shape and cast ops that are the identity exactly when their result type equals the operand's.
IDENTITY_OPS = ("reshape", "expand", "squeeze", "unsqueeze", "cast")

SHAPE_RULES: tuple[RewritePattern, ...] = (
    Rule(op(IDENTITY_OPS, var("x")), _operand_x, name="identity-shape"),
    Rule(op("permute", var("x"), attrs={"perm": _identity_perm}), _operand_x, name="identity-permute"),
    Rule(op("transpose", var("x"), where=_same_axis), _operand_x, name="identity-transpose"),
)

ARITHMETIC_RULES: tuple[RewritePattern, ...] = (
    Rule(op("mul", var("x"), unit(), commutative=True), _operand_x, name="mul-one"),
    Rule(op("add", var("x"), zero(), commutative=True), _operand_x, name="add-zero"),
    Rule(op("sub", var("x"), zero()), _operand_x, name="sub-zero"),
    Rule(op("div", var("x"), unit()), _operand_x, name="div-one"),
)


@register_pass
class CanonicalizePass(PatternPass):
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

    def rewrite_patterns(self) -> Sequence[RewritePattern]:
        return SHAPE_RULES + (ARITHMETIC_RULES if self.options.arithmetic else ())
