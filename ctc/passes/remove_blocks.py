"""``remove-blocks``: shrink depth by cutting whole blocks out of the residual stream.

Which blocks go (``method``):

* ``influence`` (ShortGPT, Men et al. 2024): block influence ``BI_i = 1 - mean cos(x_i, x_{i+1})``
  between a block's residual input and output rows on the calibration data (real tokens only);
  the blocks that change the hidden state least (lowest BI) are removed.
* ``dp`` (AmoebaLLM's dynamic-programming depth shrinking, Fu et al. 2024): scanning blocks in
  order, the state ``(n, m)`` holds the best set of ``m`` blocks to remove among the first ``n``;
  it is the better of "keep block ``n``" (state ``(n-1, m)``) and "remove block ``n``" (state
  ``(n-1, m-1)`` plus ``n``), each candidate set *measured as a whole* (the calibration loss of
  the model with exactly those blocks removed: perplexity for causal LMs, ``1 - cosine`` of the
  outputs otherwise), so the loss of removing runs of consecutive blocks is measured, never
  assumed additive.  One table serves every target depth up to the deepest cut, so every depth
  comes from one calibration (``N x M`` measurements for ``N`` blocks and at most ``M`` removed;
  each re-runs only the blocks from the first removed one, see
  :mod:`ctc.passes.analyses.replay`).
* ``last``: the last blocks (baseline); ``random``: blocks drawn with ``seed`` (baseline).

The rewrite is planned on the block layout (:func:`ctc.ir.blocks.block_layout`: one residual
value in, one out, per block) and applied as a graph edit: for each maximal run of removed
blocks, what read the run's last residual output reads its first residual input; the blocks'
nodes are erased and their parameters pruned; the result must again be a residual chain of the
kept blocks (checked).  Kept blocks keep their indices (selectors and reports keep naming the
source model's layers); ``meta["num_blocks"]`` and ``meta["removed_blocks"]`` record the cut.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ctc.ir.blocks import BlockLayout, BlockLayoutError, block_layout
from ctc.ir.graph import Module, Value
from ctc.ir.rewrite import Rewriter
from ctc.passes.analyses.replay import CalibrationReplay, ReplayResult, consecutive_runs
from ctc.passes.base import Analysis, Pass, PassContext, PassError, PassOptions, Selector, option, register_pass

__all__ = ["DepthPlan", "DepthSearch", "DepthTable", "RemoveBlocksOptions", "RemoveBlocksPass", "apply_removal",
           "dp_depth_plans", "influence_order", "target_keep"]


@dataclass(frozen=True)
class RemoveBlocksOptions(PassOptions):
    """Options of the ``remove-blocks`` pass."""

    keep: int | None = option(None, "number of blocks to keep (give keep or ratio)", min=1)
    ratio: float | None = option(None, "fraction of the blocks to keep, in (0, 1]; keep = round(ratio x blocks)",
                                 min=0.0, max=1.0)
    method: str = option("dp", "which blocks go: AmoebaLLM's dynamic program on measured calibration loss, "
                         "ShortGPT's lowest block influence, the last ones, or seeded random ones",
                         choices=("dp", "influence", "last", "random"))
    seed: int = option(0, "seed of method=random", min=0)
    measure_batches: int = option(2, "calibration batches for block influence and the measured losses", min=1)
    also_keep: list[int] = option([], "further depths (blocks kept) to emit as variants from the same calibration: "
                                      "the rest of the pipeline runs on each, and ctc compile writes one artifact "
                                      "per depth (<out>-keepN)", min=1)

    def validate(self) -> None:
        if self.keep is not None and self.ratio is not None:
            raise PassError("give one of keep= (blocks to keep) or ratio= (fraction of blocks to keep), not both")
        if self.ratio is not None and not self.ratio > 0:
            raise PassError(f"option ratio={self.ratio!r} must be above 0 (a fraction of blocks in (0, 1])")


def target_keep(o: RemoveBlocksOptions, n_blocks: int) -> int:
    """How many blocks to keep under ``o`` for a model of ``n_blocks`` blocks (at least 1)."""
    if o.keep is not None:
        return o.keep
    if o.ratio is None:
        raise PassError("remove-blocks needs keep= (blocks to keep) or ratio= (fraction of blocks to keep)")
    return max(1, min(n_blocks, math.floor(o.ratio * n_blocks + 0.5)))


# --------------------------------------------------------------------------- choosing
def influence_order(influence: Sequence[float], indices: Sequence[int]) -> list[int]:
    """Block indices from least to most influential (ties: the later block first, as deeper layers
    are the redundant ones in ShortGPT's measurements)."""
    return [b for _, _, b in sorted((bi, -k, b) for k, (bi, b) in enumerate(zip(influence, indices, strict=True)))]


@dataclass
class DepthPlan:
    """Blocks to remove for one target depth, and the calibration loss measured with them removed."""

    removed: tuple[int, ...]
    loss: float


class DepthTable:
    """AmoebaLLM's DP table over (blocks scanned, blocks removed), grown on demand.

    State ``(n, m)``: the best set of ``m`` blocks to remove among the first ``n``, the better (by
    measured loss) of ``(n-1, m)`` keeping block ``n`` and ``(n-1, m-1)`` plus block ``n``.  A state
    depends only on states with fewer blocks scanned and no more removed, so a table built for
    ``M`` removals answers every ``m <= M``, and asking for more extends it (memoised losses).
    """

    def __init__(self, replay: ReplayResult, progress: Callable[[int, int], None] | None = None):
        self.replay = replay
        self.indices = replay.require_layout().indices()
        self.progress = progress
        self.memo: dict[frozenset[int], float] = {frozenset(): replay.base_loss}
        self.best: list[list[frozenset[int]]] = [[frozenset()] for _ in range(len(self.indices) + 1)]
        # best[n][m]: state (n blocks scanned, m removed), m <= min(n, columns built)

    def loss(self, s: frozenset[int]) -> float:
        if s not in self.memo:
            self.memo[s] = self.replay.loss_without_blocks(sorted(s))
        return self.memo[s]

    def plans(self, max_removed: int) -> dict[int, DepthPlan]:
        """Removal plans for ``m = 0..max_removed`` (at most ``blocks - 1``)."""
        n = len(self.indices)
        max_removed = min(max_removed, n - 1)
        built = len(self.best[n]) - 1
        todo = sum(max(0, min(k + 1, max_removed) - min(k + 1, built)) for k in range(n))
        done = 0
        for m in range(built + 1, max_removed + 1):
            for k in range(m - 1, n):  # state (k + 1, m): block indices[k] scanned last
                b = self.indices[k]
                row, prev = self.best[k + 1], self.best[k]
                cands = [prev[m - 1] | {b}]
                if len(prev) > m:
                    cands.append(prev[m])
                for c in cands:
                    if c not in self.memo:
                        self.loss(c)
                        done += 1
                        if self.progress is not None:
                            self.progress(done, max(todo, done))
                row.append(min(cands, key=lambda s: (self.memo[s], sorted(s))))
        return {m: DepthPlan(tuple(sorted(self.best[n][m])), self.memo[self.best[n][m]])
                for m in range(max_removed + 1)}


def dp_depth_plans(replay: ReplayResult, max_removed: int,
                   progress: Callable[[int, int], None] | None = None) -> dict[int, DepthPlan]:
    """AmoebaLLM's DP (see :class:`DepthTable`): the best measured removal set for each count up to ``max_removed``."""
    return DepthTable(replay, progress).plans(max_removed)


class DepthSearch(Analysis):
    """The DP table of :class:`DepthTable` on the calibration replay (cached: one calibration, every depth).

    Config: ``batches`` (calibration batches measured).  Ask ``.plans(max_removed)``.
    """

    name = "depth-search"
    needs_calibration = True

    def compute(self, module: Module, ctx: PassContext) -> DepthTable:
        replay = ctx.get(CalibrationReplay(max_batches=int(self.config["batches"])), module)
        return DepthTable(replay, lambda d, t: ctx.report_progress("depth search", d, t))


# --------------------------------------------------------------------------- rewriting
def apply_removal(rw: Rewriter, layout: BlockLayout, removed: Sequence[int]) -> None:
    """Cut blocks ``removed`` (block indices, planned on ``layout``) out of ``rw``'s module.

    Each maximal run of consecutive removed blocks is bypassed: the readers of its last residual
    output read its first residual input.  The rewriter's cleanup then erases the blocks (nothing
    reads them any more), whatever only they read, and their parameters; a removed block node
    that survives (impure, or read from outside) is an error naming it.
    """
    pos = {b.index: k for k, b in enumerate(layout.blocks)}
    ks = sorted(pos[b] for b in set(removed))
    for run in consecutive_runs(ks):
        first, last = layout.blocks[run[0]], layout.blocks[run[-1]]
        rw.replace_value(last.residual_out, first.residual_in)
    rw.cleanup()
    gone = {layout.blocks[k].index for k in ks}
    left = [n for n in rw.module.nodes if n.block in gone]
    if left:
        n = left[0]
        raise PassError(f"remove-blocks: {n.op} at {n.scope or '<root>'} (block {n.block}) is still in the module "
                        "after its block was bypassed (it is impure or read from outside the block)")


def _check_chain(module: Module, kept: Sequence[int]) -> None:
    """Prove the rewrite: the kept blocks still form a residual chain, in order, and nothing dangles."""
    try:
        after = block_layout(module)
    except BlockLayoutError as e:
        raise PassError(f"remove-blocks: the rewritten module is no longer a residual chain: {e}") from None
    if after.indices() != list(kept):
        raise PassError(f"remove-blocks: blocks after the rewrite are {after.indices()}, expected {list(kept)}")


# --------------------------------------------------------------------------- the pass
@register_pass
class RemoveBlocksPass(Pass):
    """Depth shrinking: remove blocks by AmoebaLLM's DP on measured loss, ShortGPT's block influence, or baselines.

    ``dp``: scanning the blocks in order, the best set of ``m`` blocks to remove among the first
    ``n`` is the better of keeping or removing block ``n``, each candidate set measured as a whole
    on calibration data (perplexity, or output cosine for encoders), so removing runs of
    consecutive blocks is measured, not assumed additive; one table serves every depth, and
    ``also_keep`` emits those depths as further artifacts from the same calibration.
    ``influence``: ShortGPT's ``1 - cos(block input, block output)``, lowest removed.  ``last``
    and ``random`` (seeded) are the baselines.  The removal is a graph edit on the residual
    stream (each removed run is bypassed, its nodes and parameters go); kept blocks keep their
    indices.  The report lists the removed blocks with their influence and the calibration loss
    before and after.  Module docstring of ``ctc/passes/remove_blocks.py``: the details.
    """

    name = "remove-blocks"
    Options = RemoveBlocksOptions
    requires = (CalibrationReplay, DepthSearch)
    needs_calibration = True

    @classmethod
    def check_module(cls, options: PassOptions, module: Module, selector: Selector) -> list[tuple[str | None, str]]:
        o: RemoveBlocksOptions = options  # type: ignore[assignment]
        if o.keep is None and o.ratio is None:
            return [(None, "remove-blocks needs keep= (blocks to keep) or ratio= (fraction of blocks to keep)")]
        try:
            layout = block_layout(module)
        except BlockLayoutError as e:
            return [(None, f"remove-blocks: {e}")]
        n = len(layout)
        if o.keep is not None and o.keep > n:
            return [("keep", f"remove-blocks: keep={o.keep} but the model has only {n} blocks")]
        over = [d for d in o.also_keep if d > n]
        if over:
            return [("also_keep", f"remove-blocks: also_keep asks for {over[0]} blocks but the model has only {n}")]
        main = target_keep(o, n)
        if main in o.also_keep or len(set(o.also_keep)) != len(o.also_keep):
            return [("also_keep", f"remove-blocks: also_keep={o.also_keep} repeats a depth (the main one is {main})")]
        if not selector.is_all:
            return [("selector", "remove-blocks works on the whole block stack; it takes no selector")]
        return []

    def run(self, module: Module, ctx: PassContext) -> Module:
        o: RemoveBlocksOptions = self.options  # type: ignore[assignment]
        problems = self.check_module(o, module, ctx.selector)
        if problems:
            raise PassError(problems[0][1])
        layout = block_layout(module)
        idx = layout.indices()
        keep = target_keep(o, len(idx))
        replay = ctx.get(CalibrationReplay(max_batches=o.measure_batches), module)
        scores = dict(zip(idx, replay.influence, strict=True))
        # Plan every depth first (one calibration, one DP table), on the unmodified module.
        plans = {d: self._choose(o, ctx, module, replay, len(idx) - d) for d in dict.fromkeys([keep, *o.also_keep])}
        for d in o.also_keep:  # the variants: the same plan applied to copies of the input
            variant = module.clone()
            rw = Rewriter(variant)
            self._apply(variant, rw, block_layout(variant), plans[d], idx)
            rw.finish()
            ctx.emit_variant(f"keep{d}", variant)
            ctx.note(self._describe(o, replay, scores, idx, plans[d], len(rw.log.params_removed), f"variant keep{d}"))
        removed = plans[keep]
        pruned = 0
        if removed:  # removing nothing leaves the module exactly as it was
            rw = ctx.rewriter(module)
            self._apply(module, rw, layout, removed, idx)
            pruned = len(rw.log.params_removed)
        loss = replay.loss_without_blocks(removed)
        ctx.note(self._describe(o, replay, scores, idx, removed, pruned, ""))
        ctx.metrics.update({"removed_blocks": removed, "kept_blocks": [b for b in idx if b not in removed],
                            "block_influence": {str(b): scores[b] for b in idx},
                            "calibration_loss": [replay.base_loss, loss], "loss_kind": replay.kind,
                            "measurements": replay.runs,
                            "variants": {f"keep{d}": plans[d] for d in o.also_keep}})
        return module

    @staticmethod
    def _choose(o: RemoveBlocksOptions, ctx: PassContext, module: Module, replay: ReplayResult, k: int) -> list[int]:
        """The ``k`` blocks ``o.method`` removes."""
        idx = replay.require_layout().indices()
        if o.method == "dp":
            removed = list(ctx.get(DepthSearch(batches=o.measure_batches), module).plans(k)[k].removed)
        elif o.method == "influence":
            removed = influence_order(replay.influence, idx)[:k]
        elif o.method == "last":
            removed = idx[len(idx) - k:]
        else:
            removed = random.Random(o.seed).sample(idx, k)
        return sorted(removed)

    @staticmethod
    def _apply(module: Module, rw: Rewriter, layout: BlockLayout, removed: Sequence[int], idx: Sequence[int]) -> None:
        if not removed:
            return
        apply_removal(rw, layout, removed)
        _check_chain(module, [b for b in idx if b not in removed])
        module.meta["num_blocks"] = len(idx) - len(removed)
        module.meta["removed_blocks"] = sorted({*module.meta.get("removed_blocks", []), *removed})

    @staticmethod
    def _describe(o: RemoveBlocksOptions, replay: ReplayResult, scores: dict[int, float], idx: Sequence[int],
                  removed: Sequence[int], pruned: int, label: str) -> str:
        what = "perplexity" if replay.kind == "nll" else "1-cosine"
        before = replay.to_perplexity(replay.base_loss)
        after = replay.to_perplexity(replay.loss_without_blocks(removed))
        listing = ", ".join(f"{b} (BI {scores[b]:.4f})" for b in removed) or "none"
        return (f"remove-blocks ({o.method}{', ' + label if label else ''}): kept {len(idx) - len(removed)} of "
                f"{len(idx)} blocks; removed {listing}; calibration {what} {before:.4g} -> {after:.4g}; "
                f"{pruned} parameters pruned")


def residual_edges(module: Module) -> list[tuple[Value, Value]]:
    """(residual input, residual output) of every block, in order (tests and reports)."""
    return [(b.residual_in, b.residual_out) for b in block_layout(module).blocks]
