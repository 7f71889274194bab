"""``share-blocks``: group parameter sharing of adjacent blocks, after FoldGPT (Liu et al. 2024).

Method:

1. **Similarity from calibration.** Every selected block is re-run alone on its own calibration
   inputs with the matrices of each neighbour within ``max_group`` (:func:`substitution_error`:
   the relative error of the block's contribution to the residual stream).  That is the cost of
   letting block ``i`` read block ``r``'s weights.
2. **Groups.** Given as ``groups`` (lists of consecutive block numbers), or chosen: the fewest
   unique weight sets meeting ``ratio`` (unique / original parameters of the selected blocks,
   counting the coefficients), split into contiguous groups by dynamic programming so that the
   summed substitution cost is least (each group costed at its best representative).
3. **Shared weights.** Each group reads one set of matrices: its most representative block's or
   the members' mean, whichever gives the lower calibration cost (``shared=auto``), stored once.
   Vectors (norm weights, biases) stay per block (``share_vectors`` ties them too).
4. **Coefficients** (``coefficients=channel``): FoldGPT's small learnable per-block scaling, as
   one scale per output channel of every tied linear (``linear -> mul``; where the linear had a
   bias, a per-channel shift replaces it, ``-> add``).  They are fitted in closed form by least
   squares, block after block on the compressed model's own residual stream, stage after stage
   inside a block (q/k/v, then o, then gate/up, then down), against the original linear outputs.
   ``coefficients=none`` is plain tying.
5. **Healing** (optional, ``heal_steps``/``heal_seconds``): FoldGPT's tail-layer distillation,
   Adam on the coefficients and the members' vectors (or everything, ``heal_params=all``) so the
   outputs of the last ``heal_tail`` blocks match the original's on the calibration batches
   (:mod:`ctc.passes.healing`); the loss curve goes into the report.

Sharing a block with itself changes nothing: groups of one are left alone, and a block that
reads its own weights gets coefficients of exactly one (and its own bias as the shift).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ctc.ir.graph import Module
from ctc.options import OptionError
from ctc.passes.base import Analysis, Pass, PassContext, PassError, PassOptions, Selector, option, register_pass
from ctc.passes.block_tying import (
    ActivationsResult,
    BlockActivations,
    Group,
    Stack,
    apply_ties,
    block_module,
    fit_coefficients,
    per_member_overhead,
    report_ties,
    selected_blocks,
    substitution_error,
    tie_stack,
    unique_counts,
)
from ctc.passes.healing import HealOptions, heal_after_tying, heal_dtype_problem
from ctc.passes.weight_sharing import average, contiguous_groups

__all__ = ["ShareBlocksOptions", "ShareBlocksPass"]


@dataclass(frozen=True)
class ShareBlocksOptions(HealOptions):
    """Options of the ``share-blocks`` pass."""

    ratio: float = option(0.5, "target unique/original parameter ratio of the selected blocks (coefficients "
                               "counted); the groups are chosen to meet it", min=0.01, max=1.0)
    groups: list[list[int]] = option([], "explicit groups of consecutive block numbers (e.g. [[0,1],[2,3,4]]); "
                                         "blocks in no group keep their weights; overrides ratio")
    max_group: int = option(4, "most blocks in one group when groups are chosen", min=1)
    shared: str = option("auto", "shared weights: the group's most representative block, the members' mean, "
                                 "or whichever has the lower calibration cost", choices=("auto", "representative",
                                                                                       "mean"))
    coefficients: str = option("channel", "per-block coefficients: one scale per output channel of each tied "
                                          "linear (plus a shift where it has a bias), or none (plain tying)",
                               choices=("channel", "none"))
    ridge: float = option(0.1, "ridge pull of the fitted coefficients towards 1, in units of the mean channel "
                               "variance (0 = plain least squares; larger = closer to plain tying)", min=0.0)
    share_vectors: bool = option(False, "also tie vectors (norm weights, biases); by default they stay per block")
    score_batches: int = option(4, "calibration batches used to score block similarity", min=1)

    def validate(self) -> None:
        super().validate()
        seen: set[int] = set()
        for i, g in enumerate(self.groups):
            if not g:
                raise OptionError(f"option groups[{i}] is empty")
            if sorted(g) != list(range(min(g), max(g) + 1)) or sorted(g) != g:
                raise OptionError(f"option groups[{i}]={g} must list consecutive block numbers in order")
            if seen & set(g):
                raise OptionError(f"option groups[{i}]={g} overlaps an earlier group (block {min(seen & set(g))})")
            if min(g) < 0:
                raise OptionError(f"option groups[{i}]={g}: block numbers are >= 0")
            seen |= set(g)


def _groups_problem(groups: list[list[int]], blocks: list[int]) -> str | None:
    """What is wrong with explicit ``groups`` on the selected ``blocks`` (a block they name is not selected)."""
    for g in groups:
        bad = [b for b in g if b not in blocks]
        if bad:
            return (f"share-blocks: option groups names block {bad[0]}, which is not among the selected blocks "
                    f"{blocks[0]}..{blocks[-1]}")
    return None


@register_pass
class ShareBlocksPass(Pass):
    """FoldGPT group sharing: adjacent blocks read one set of weights, plus fitted per-block channel coefficients.

    See the module docstring for the method.  Needs block structure (a captured layer stack)
    and calibration data.
    """

    name = "share-blocks"
    Options = ShareBlocksOptions
    requires = (BlockActivations,)
    needs_calibration = True

    @classmethod
    def check_module(cls, options: PassOptions, module: Module, selector: Selector) -> list[tuple[str | None, str]]:
        o: ShareBlocksOptions = options  # type: ignore[assignment]
        blocks = selected_blocks(module, selector)
        if blocks is not None and len(blocks) < 2:  # (ALBERT: one shared layer applied N times is one block)
            return [(None, f"share-blocks: the selection holds {len(blocks)} block(s); tying needs at least two "
                           "(widen the blocks[...] selector)")]
        problem = _groups_problem(o.groups, blocks) if blocks else None
        if problem:
            return [("groups", problem)]
        heal = heal_dtype_problem(o, module, "share-blocks")
        return [(None, heal)] if heal else []

    def run(self, module: Module, ctx: PassContext) -> Module:
        o: ShareBlocksOptions = self.options  # type: ignore[assignment]
        stack = tie_stack(module, ctx, share_vectors=o.share_vectors, what="share-blocks")
        acts = ctx.get(BlockActivations(), module)
        nb = min(o.score_batches, len(acts.last_output))
        cost = _CostTable(stack, ctx, acts, nb)
        groups = self._explicit(stack, o) if o.groups else self._chosen(stack, o, cost, ctx)
        for g in groups:
            self._choose_source(g, stack, o, cost)
        teacher = module.clone()
        unique0, _ = unique_counts(module, stack.blocks)
        res = apply_ties(stack, groups, ctx.rewriter(module), coefficients=o.coefficients, kind="shared")
        fit: dict[str, float] = {}
        if res.coefficients:
            fit = fit_coefficients(stack, teacher, acts, res.coefficients, ctx, ridge=o.ridge)
        report_ties(module, ctx, stack, groups, unique0, "share-blocks",
                    extra={"coefficients": o.coefficients, "coefficient_fit": fit})
        if fit:
            ctx.note(f"share-blocks: coefficients fitted in closed form ({len(res.coefficients)} linears); relative "
                     f"error of the last changed block's output on calibration data {fit['error_before']:.4g} "
                     f"(plain tying) -> {fit['error_after']:.4g}")
        heal = heal_after_tying(module, teacher, res.adapters, list(res.shared), o, ctx, "share-blocks")
        if heal is not None:
            ctx.metrics["healing"] = heal.summary()
        return module

    # ----------------------------------------------------------------- groups
    def _explicit(self, stack: Stack, o: ShareBlocksOptions) -> list[Group]:
        problem = _groups_problem(o.groups, stack.blocks)
        if problem:
            raise PassError(problem)
        return [Group(list(g), None) for g in o.groups]

    def _chosen(self, stack: Stack, o: ShareBlocksOptions, cost: _CostTable, ctx: PassContext) -> list[Group]:
        n = len(stack.blocks)
        matrix = sum(s.numel for s in stack.tied)
        vector = sum(s.numel for s in stack.slots if not s.tie)
        over = per_member_overhead(stack, coefficients=o.coefficients, rank=0)
        before = n * (matrix + vector)
        runs = stack.runs()
        units = None
        for u in range(n, len(runs) - 1, -1):  # the most weight sets that meet the ratio
            after = u * matrix + n * vector + (n * over if u < n else 0)  # coefficients: at most one set per block
            if after <= o.ratio * before:
                units = u
                break
        if units is None:
            lowest = (len(runs) * matrix + n * vector + n * over) / before
            raise PassError(f"share-blocks: ratio={o.ratio} cannot be reached on these {n} blocks: one weight set "
                            f"per run of selected blocks keeps {lowest:.3f} of their parameters (select more "
                            "blocks, raise ratio, or use coefficients=none)")
        if units * o.max_group < n:
            raise PassError(f"share-blocks: ratio={o.ratio} needs {units} weight sets for {n} blocks, more than "
                            f"max_group={o.max_group} blocks each; raise max_group")
        groups = self._split(stack, runs, units, o.max_group, cost)
        ctx.note(f"share-blocks: {n} blocks -> {units} weight sets (target ratio {o.ratio})")
        return groups

    def _split(self, stack: Stack, runs: list[list[int]], units: int, max_group: int, cost: _CostTable
               ) -> list[Group]:
        """Best contiguous grouping over all runs with ``units`` groups in total (DP per run, then over runs)."""
        per_run: list[dict[int, tuple[list[tuple[int, int]], float]]] = []
        for run in runs:
            options: dict[int, tuple[list[tuple[int, int]], float]] = {}
            for u in range(max(1, -(-len(run) // max_group)), len(run) + 1):
                options[u] = contiguous_groups(len(run), u, lambda a, b, run=run: cost.group(run[a:b])[0],
                                               max_size=max_group)
            per_run.append(options)
        # Distribute the units over runs (small knapsack over the runs).
        best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
        for options in per_run:
            nxt: dict[int, tuple[float, list[int]]] = {}
            for used, (c0, picks) in best.items():
                for u, (_, c) in options.items():
                    if used + u > units:
                        continue
                    v = (c0 + c, [*picks, u])
                    if used + u not in nxt or v[0] < nxt[used + u][0]:
                        nxt[used + u] = v
            best = nxt
        if units not in best:
            raise PassError(f"share-blocks: cannot split the selected blocks into {units} groups of at most "
                            f"{max_group}")
        groups: list[Group] = []
        for run, options, u in zip(runs, per_run, best[units][1], strict=True):
            for a, b in options[u][0]:
                members = run[a:b]
                c, src = cost.group(members)
                groups.append(Group(members, src, cost=c))
        return groups

    def _choose_source(self, g: Group, stack: Stack, o: ShareBlocksOptions, cost: _CostTable) -> None:
        if len(g.members) < 2:
            g.source = g.members[0]
            g.tensors = {s.index: stack.tensor(g.members[0], s) for s in stack.tied}
            return
        rep_cost, rep = cost.group(g.members)
        if o.shared in ("mean", "auto"):
            mean = {s.index: average([stack.tensor(b, s) for b in g.members]) for s in stack.tied}
            mean_cost = sum(cost.mean_error(b, g.members, mean) for b in g.members)
            if o.shared == "mean" or mean_cost < rep_cost:
                g.source, g.tensors, g.cost = None, mean, mean_cost
                return
        g.source, g.cost = rep, rep_cost
        g.tensors = {s.index: stack.tensor(rep, s) for s in stack.tied}


class SubstitutionCosts(Analysis):
    """A memo of substitution errors for one stack and scoring size, filled on demand by ``share-blocks``.

    Cached like any analysis (config: the blocks, the tied slots and the scoring batches), so
    trial runs on clones of one module (benchmarks, ratio sweeps) re-run no block twice.
    """

    name = "substitution-costs"
    needs_calibration = True

    def __init__(self, blocks: tuple[int, ...], tied: tuple[int, ...], batches: int):
        super().__init__(blocks=blocks, tied=tied, batches=batches)

    def compute(self, module: Module, ctx: PassContext) -> dict[tuple[Any, ...], float]:
        return {}


class _CostTable:
    """Substitution errors ``e(i, r)`` (block ``i`` reading block ``r``'s matrices, or a group's mean)."""

    def __init__(self, stack: Stack, ctx: PassContext, acts: ActivationsResult, batches: int):
        self.stack = stack
        self.acts = acts
        self.batches = batches
        key = SubstitutionCosts(tuple(stack.blocks), tuple(s.index for s in stack.tied), batches)
        self._e: dict[tuple[Any, ...], float] = ctx.get(key, stack.module)
        self._subs: dict[int, Module] = {}

    def sub(self, b: int) -> Module:
        if b not in self._subs:
            self._subs[b] = block_module(self.stack.module, self.stack.info(b))
        return self._subs[b]

    def _run(self, i: int, tensors: dict[int, torch.Tensor]) -> float:
        return substitution_error(self.stack, self.acts, i, tensors, batches=self.batches, sub=self.sub(i))

    def error(self, i: int, r: int) -> float:
        """Block ``i`` with block ``r``'s tied tensors."""
        if r == i:
            return 0.0
        if (i, r) not in self._e:
            self._e[(i, r)] = self._run(i, {s.index: self.stack.tensor(r, s) for s in self.stack.tied})
        return self._e[(i, r)]

    def mean_error(self, i: int, members: list[int], tensors: dict[int, torch.Tensor]) -> float:
        """Block ``i`` with the mean of ``members``' tied tensors (given)."""
        k = ("mean", i, tuple(members))
        if k not in self._e:
            self._e[k] = self._run(i, tensors)
        return self._e[k]

    def group(self, members: list[int]) -> tuple[float, int]:
        """(cost, representative): the member whose weights cost the group least."""
        return min(((sum(self.error(i, r) for i in members), r) for r in members), key=lambda t: t[0])
