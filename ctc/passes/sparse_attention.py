"""``sparse-attention``: Energon's dynamic sparse attention (mix-precision multi-round filtering).

Method (Zhou et al., "Energon", TCAD 2022, arXiv 2110.09310).  Attention output depends on a
few important query-key pairs, and which ones can be found cheaply: at run time, for every
query row, round 1 scores all keys with low-bit (2..4-bit) quantized ``q k^T`` and keeps the
keys above a threshold from the row's statistics (Energon's ``alpha max + (1 - alpha) mean``)
or a top-k share; round 2 re-scores the survivors at 8 bits and filters again; softmax and
``p v`` then run at full precision over the survivors only.  No training, no calibration.

The pass swaps each selected ``scaled_dot_product_attention`` for a ``sparse_attention`` node
with the same operands and attributes plus the filter settings (see the op for the exact
semantics, including the 8-bit guard that keeps every key that may be a row's exact top-1).
Which layers: the step's selector (``on blocks[4:30]``); which heads: ``heads``.  A captured
causal mask (``le(key_pos, query_pos) & padding``, as Hugging Face decoders build it) becomes
``is_causal=true`` plus the padding mask, so the CPU kernels skip the upper triangle.

The CPU target lowers ``sparse_attention`` to the kernels of
:mod:`ctc.backends.tvm.sparse_attention`; the reference interpreter runs the op's semantics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ctc.ir.graph import Module
from ctc.ir.patterns import op
from ctc.ir.rewrite import RewritePattern, Rule
from ctc.options import OptionError
from ctc.passes.attention_masks import split_causal_mask
from ctc.passes.base import PassError, PassOptions, PatternPass, Selector, option, register_pass


def default_keep(rounds: int) -> list[float]:
    """Top-k shares when none are given: 0.25 after the last round, twice that per round before."""
    return [min(1.0, 0.25 * 2 ** (rounds - 1 - r)) for r in range(rounds)]


def _heads_problem(heads: list[int], num_heads: Any) -> str | None:
    """What is wrong with option ``heads`` on an attention with ``num_heads`` query heads (None: nothing)."""
    if not isinstance(num_heads, int):
        return f"option heads needs attention with a static head count, got {num_heads}"
    bad = [h for h in heads if h >= num_heads]
    if bad:
        return (f"option heads={heads}: the model's attention has {num_heads} query heads (0..{num_heads - 1}); "
                f"{bad} do not exist")
    return None


@register_pass
class SparseAttentionPass(PatternPass):
    """Energon dynamic sparse attention: low-bit multi-round key filtering, exact attention over the kept keys.

    Each selected attention becomes ``sparse_attention``: per query, rounds of low-bit q/k
    scoring keep a top-k share (``keep``) or the keys above Energon's mean/max threshold
    (``alpha``), never fewer than ``min_keep`` and never the row's exact top-1 key; softmax and
    ``p v`` run at full precision over the kept keys.  A captured causal mask becomes
    ``is_causal`` plus the padding mask.  No calibration data needed.  On the CPU target the
    kernels of ``ctc/backends/tvm/sparse_attention.py`` run it.
    """

    name = "sparse-attention"

    @dataclass(frozen=True)
    class Options(PassOptions):
        """Options of ``sparse-attention``."""

        rounds: list[int] = option([4, 8], "bit width of q and k in each filtering round, e.g. [4, 8] "
                                           "(Energon: a low-bit round, then 8 bits)", min=2, max=8)
        select: str = option("topk", "how rounds filter: topk (keep a share of each row's keys) or threshold "
                                     "(Energon's alpha * max + (1 - alpha) * mean of the row's scores)",
                             choices=("topk", "threshold"))
        keep: list[float] | None = option(None, "topk: share of a query's allowed keys kept after each round, "
                                                "non-increasing (default: 0.25 at the end, doubling per round before)",
                                          min=0.0, max=1.0)
        alpha: list[float] | None = option(None, "threshold: factor in [-1, 1] per round (default 0.5 each)",
                                           min=-1.0, max=1.0)
        min_keep: int = option(16, "every round keeps at least this many keys per query (all of them in shorter "
                                   "rows): short rows gain nothing from filtering", min=1)
        heads: list[int] = option([], "query heads to filter ([] = all); the others stay exact attention", min=0)

        def validate(self) -> None:
            n = len(self.rounds)
            if n == 0:
                raise OptionError("option rounds must name at least one round, e.g. rounds=[4, 8]")
            if self.select == "topk":
                if self.alpha is not None:
                    raise OptionError("option alpha is for select=\"threshold\"; with select=\"topk\" give keep")
                keep = self.keep if self.keep is not None else default_keep(n)
                if len(keep) != n:
                    raise OptionError(f"option keep has {len(keep)} entries but rounds has {n}: one share per round")
                if any(x <= 0.0 for x in keep):
                    raise OptionError(f"option keep={keep} must be > 0 (a round keeping nothing drops every key)")
                if any(b > a for a, b in zip(keep, keep[1:], strict=False)):
                    raise OptionError(f"option keep={keep} must not grow from round to round")
            else:
                if self.keep is not None:
                    raise OptionError("option keep is for select=\"topk\"; with select=\"threshold\" give alpha")
                alpha = self.alpha if self.alpha is not None else [0.5] * n
                if len(alpha) != n:
                    raise OptionError(f"option alpha has {len(alpha)} entries but rounds has {n}: one per round")
            if len(set(self.heads)) != len(self.heads):
                raise OptionError(f"option heads={self.heads} repeats a head")

    @classmethod
    def check_module(cls, options: PassOptions, module: Module, selector: Selector) -> list[tuple[str | None, str]]:
        heads = options.heads  # type: ignore[attr-defined]
        for n in module.nodes if heads else ():
            if n.op == "scaled_dot_product_attention" and n.operand("q").type.rank == 4 and selector.matches(n):
                problem = _heads_problem(heads, n.operand("q").type.shape[1])
                if problem:
                    return [("heads", problem)]
        return []

    def filter_attrs(self, num_heads: Any) -> dict[str, Any]:
        """The ``sparse_attention`` attributes these options give, for a node with ``num_heads`` query heads."""
        o = self.options
        n = len(o.rounds)
        attrs: dict[str, Any] = {"round_bits": tuple(o.rounds), "select": o.select, "min_keep": o.min_keep}
        if o.select == "topk":
            attrs["keep_ratios"] = tuple(o.keep if o.keep is not None else default_keep(n))
        else:
            attrs["alphas"] = tuple(o.alpha if o.alpha is not None else [0.5] * n)
        if o.heads:
            problem = _heads_problem(o.heads, num_heads)
            if problem:
                raise PassError(problem)
            attrs["dense_heads"] = tuple(h for h in range(num_heads) if h not in o.heads)
        return attrs

    def rewrite_patterns(self) -> Sequence[RewritePattern]:
        def sparsify(rw: Any, m: Any) -> Any:
            node = m.root
            operands = {n: node.operand(n) for n in ("q", "k", "v", "mask")}
            attrs = dict(node.attrs)
            split = split_causal_mask(node)
            if split is not None:
                operands["mask"], attrs["is_causal"] = split
            attrs.update(self.filter_attrs(node.operand("q").type.shape[1]))
            return rw.create("sparse_attention", operands, attrs).output

        return (Rule(op("scaled_dot_product_attention", where=lambda n: n.operand("q").type.rank == 4), sparsify,
                     name="sparse-attention"),)
