"""``recursive``: tie K consecutive blocks into one block looped K times, relaxed by layer-wise LoRA,
after Relaxed Recursive Transformers (Bae et al., ICLR 2025).

Method:

1. **Tiles.** The selected blocks (each run of consecutive ones) are cut into tiles of ``loops``
   blocks (RRT's "sequence" sharing: the tile becomes one block run ``loops`` times); blocks left
   over at the end of a run keep their weights.  With ``ratio``, only as many tiles as that target
   needs are tied, the ones whose (LoRA-corrected) shared weights cost least on calibration data.
2. **Initialisation** of the looped block, as the paper does: ``average`` (the element-wise mean of
   the tile's blocks) or ``stepwise`` (one block per tile, spread evenly over the stack with its first
   and last kept: ``round(linspace(first, last, tiles))``); ``auto`` takes average with LoRA and
   stepwise without, the initialisations the paper found best for each.
3. **Layer-wise LoRA** (``rank > 0``): every looped position keeps its own low-rank delta per tied
   linear, initialised from the truncated SVD of (its original weight - the shared weight), so the
   model is useful before any training (at full rank it reproduces the original blocks).  The delta
   stays a separate ``lowrank_linear`` added to the shared ``linear``; the shared weight is stored once
   and never merged back into per-position copies.  ``rank = 0`` is the plain Recursive Transformer.
4. **Healing** (optional): distillation of the last blocks' outputs on calibration data, training
   the LoRA factors and the positions' own vectors (or also the shared weights, ``heal_params=all``),
   as the paper's uptraining does in miniature; see :mod:`ctc.passes.healing`.

Norm weights and biases stay per position unless ``share_vectors`` (RRT's optional norm sharing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctc.ir.graph import Module
from ctc.passes.analyses.replay import consecutive_runs
from ctc.passes.base import Pass, PassContext, PassError, PassOptions, Selector, option, register_pass
from ctc.passes.block_tying import (
    BlockActivations,
    Group,
    Stack,
    apply_ties,
    block_module,
    input_grams,
    lora_factors,
    per_member_overhead,
    report_ties,
    selected_blocks,
    substitution_error,
    tie_stack,
    unique_counts,
)
from ctc.passes.healing import HealOptions, heal_after_tying, heal_dtype_problem
from ctc.passes.weight_sharing import average, stepwise_sources

__all__ = ["RecursiveOptions", "RecursivePass"]


@dataclass(frozen=True)
class RecursiveOptions(HealOptions):
    """Options of the ``recursive`` pass."""

    loops: int = option(2, "K: consecutive blocks tied into one block looped K times", min=2)
    rank: int = option(16, "rank of each looped position's LoRA delta per tied linear (SVD-initialised); "
                           "0 = no LoRA (plain recursive)", min=0)
    lora_init: str = option("svd", "LoRA initialisation: truncated SVD of (original - shared) weights as the paper "
                                   "does (svd), or of the residual weighted by each layer's calibration inputs, "
                                   "best for its outputs rather than its weights (activation)",
                            choices=("svd", "activation"))
    init: str = option("auto", "initial shared block: mean of the tile (average), one evenly spread block "
                               "per tile (stepwise), or auto (average with LoRA, stepwise without)",
                       choices=("auto", "average", "stepwise"))
    ratio: float | None = option(None, "tie only as many tiles as this unique/original parameter ratio of the "
                                       "selected blocks needs (LoRA counted), cheapest first; none = every tile",
                                 min=0.01, max=1.0)
    share_vectors: bool = option(False, "also tie vectors (norm weights, biases); by default they stay per position")
    score_batches: int = option(4, "calibration batches used to cost tiles (with ratio)", min=1)


def _no_tile(loops: int, blocks: list[int]) -> str:
    return (f"recursive: no run of {loops} consecutive selected blocks (selected: {blocks}); lower loops or "
            "select more blocks")


@register_pass
class RecursivePass(Pass):
    """Relaxed Recursive Transformer: K consecutive blocks become one looped block plus SVD-initialised LoRA deltas.

    See the module docstring for the method.  Needs block structure and calibration data.
    """

    name = "recursive"
    Options = RecursiveOptions
    requires = (BlockActivations,)
    needs_calibration = True

    @classmethod
    def check_module(cls, options: PassOptions, module: Module, selector: Selector) -> list[tuple[str | None, str]]:
        o: RecursiveOptions = options  # type: ignore[assignment]
        blocks = selected_blocks(module, selector)
        if blocks and not any(len(r) >= o.loops for r in consecutive_runs(blocks)):
            return [("loops", _no_tile(o.loops, blocks))]
        heal = heal_dtype_problem(o, module, "recursive")
        return [(None, heal)] if heal else []

    def run(self, module: Module, ctx: PassContext) -> Module:
        o: RecursiveOptions = self.options  # type: ignore[assignment]
        stack = tie_stack(module, ctx, share_vectors=o.share_vectors, what="recursive")
        init = o.init if o.init != "auto" else ("average" if o.rank > 0 else "stepwise")
        tiles, left = self._tiles(stack, o.loops)
        if not tiles:
            raise PassError(_no_tile(o.loops, stack.blocks))
        groups = [self._group(stack, t, s, init) for t, s in zip(tiles, self._sources(stack, tiles, init),
                                                                  strict=True)]
        factors = {}
        if o.rank > 0:
            grams = None
            if o.lora_init == "activation":
                acts = ctx.get(BlockActivations(), module)
                grams = input_grams(stack, acts, [b for g in groups for b in g.members])
            for g in groups:
                factors.update(lora_factors(stack, g, o.rank, grams))
        if o.ratio is not None:
            groups = self._cheapest(stack, groups, o, ctx, factors)
        teacher = module.clone()
        unique0, _ = unique_counts(module, stack.blocks)
        res = apply_ties(stack, groups, ctx.rewriter(module), coefficients="none", lora_rank=o.rank, kind="loop",
                         lora=factors)
        if left:
            ctx.note(f"recursive: blocks {left} do not fill a tile of {o.loops} and keep their weights")
        lora = f"LoRA rank {o.rank} on {len(res.lora)} linear(s)" if o.rank else "no LoRA"
        ctx.note(f"recursive: {len([g for g in groups if len(g.members) > 1])} tile(s) of {o.loops} blocks looped, "
                 f"initialised by {init}; {lora}")
        report_ties(module, ctx, stack, groups, unique0, "recursive",
                    extra={"loops": o.loops, "rank": o.rank, "init": init, "lora_linears": len(res.lora)})
        heal = heal_after_tying(module, teacher, res.adapters, list(res.shared), o, ctx, "recursive")
        if heal is not None:
            ctx.metrics["healing"] = heal.summary()
        return module

    # ----------------------------------------------------------------- planning
    @staticmethod
    def _tiles(stack: Stack, k: int) -> tuple[list[list[int]], list[int]]:
        tiles: list[list[int]] = []
        left: list[int] = []
        for run in stack.runs():
            full = len(run) - len(run) % k
            tiles += [run[i:i + k] for i in range(0, full, k)]
            left += run[full:]
        return tiles, left

    @staticmethod
    def _sources(stack: Stack, tiles: list[list[int]], init: str) -> list[int | None]:
        if init == "average":
            return [None] * len(tiles)
        return stepwise_sources(tiles[0][0], tiles[-1][-1], len(tiles)) if len(tiles) > 1 else [tiles[0][0]]

    @staticmethod
    def _group(stack: Stack, tile: list[int], source: int | None, init: str) -> Group:
        if source is not None and source not in tile:  # tiles of several runs: keep the source inside its tile
            source = tile[min(range(len(tile)), key=lambda i: abs(tile[i] - source))]
        if source is None:
            tensors = {s.index: average([stack.tensor(b, s) for b in tile]) for s in stack.tied}
        else:
            tensors = {s.index: stack.tensor(source, s) for s in stack.tied}
        return Group(list(tile), source, tensors)

    def _cheapest(self, stack: Stack, groups: list[Group], o: RecursiveOptions, ctx: PassContext,
                  factors: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]) -> list[Group]:
        """Tie only the fewest tiles that meet ``ratio``, the cheapest on calibration data."""
        n = len(stack.blocks)
        matrix = sum(s.numel for s in stack.tied)
        vector = sum(s.numel for s in stack.slots if not s.tie)
        over = per_member_overhead(stack, coefficients="none", rank=o.rank)
        before = n * (matrix + vector)
        assert o.ratio is not None
        need = None
        for t in range(len(groups) + 1):
            after = before - t * (o.loops - 1) * matrix + t * o.loops * over
            if after <= o.ratio * before:
                need = t
                break
        if need is None:
            best = (before - len(groups) * (o.loops - 1) * matrix + len(groups) * o.loops * over) / before
            raise PassError(f"recursive: ratio={o.ratio} cannot be reached: tying every tile of {o.loops} with "
                            f"rank {o.rank} keeps {best:.3f} of the selected blocks' parameters (raise loops, "
                            "lower rank, or raise ratio)")
        acts = ctx.get(BlockActivations(), stack.module)
        nb = min(o.score_batches, len(acts.last_output))
        costs = []
        for g in groups:
            c = 0.0
            for b in g.members:
                dense = {}
                for s in stack.tied:
                    w = g.tensors[s.index]
                    if (b, s.index) in factors:  # score the relaxed weight (shared + B A) as one dense matrix
                        u, v = factors[(b, s.index)]
                        w = w + (u @ v).to(w.dtype)
                    dense[s.index] = w
                c += substitution_error(stack, acts, b, dense, batches=nb, sub=block_module(stack.module,
                                                                                             stack.info(b)))
            g.cost = c
            costs.append(c)
        order = sorted(range(len(groups)), key=lambda i: costs[i])[:need]
        chosen = set(order)
        out: list[Group] = []
        for i, g in enumerate(groups):
            if i in chosen:
                out.append(g)
            else:
                out += [Group([b], b, {s.index: stack.tensor(b, s) for s in stack.tied}) for b in g.members]
        ctx.note(f"recursive: ratio {o.ratio} needs {need} of {len(groups)} tiles; tied the cheapest "
                 f"(calibration costs {', '.join(f'{costs[i]:.3g}' for i in sorted(order))})")
        return out
