"""Calibration replay: the model's calibration loss, re-measured cheaply for many variants of the model.

Structural passes choose what to cut by *measuring* the damage of each candidate on calibration
data (ASVD's per-layer sensitivity, the block-removal dynamic program).  Re-running the whole
model per candidate is the cost that makes those methods slow; but a change in block ``b``
leaves everything before block ``b`` untouched.  This analysis runs the calibration batches
once, leaving an interpreter :class:`~ctc.ir.interpreter.Checkpoint` at the start of every
block, and measures a variant by resuming from the checkpoint of the first block it changes
(with replaced parameters, or with whole blocks skipped and the residual stream rewired).

The loss is the one the papers use: for a causal LM the mean next-token negative
log-likelihood of the calibration windows (``exp`` of it is the calibration perplexity; the
log-softmax is taken in float32, as only differences between variants matter here); for
any other model, ``1 - cosine`` between the variant's and the original's first output rows
(over unmasked tokens).  The same pass also yields ShortGPT's block influence,
``1 - mean cos(x_in, x_out)`` of each block's residual input and output rows.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ctc.ir.blocks import BlockLayout, BlockLayoutError, block_layout
from ctc.ir.graph import Module, Node, Value
from ctc.ir.interpreter import Checkpoint, interpret_with_checkpoints, resume
from ctc.passes.base import Analysis, PassContext, PassError
from ctc.tasks import TASK_CAUSAL_LM

__all__ = ["CalibrationReplay", "ReplayResult", "consecutive_runs"]


def _row_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of corresponding rows (last dim) in float64; two zero rows count as 1."""
    a64, b64 = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    na, nb = a64.norm(dim=-1), b64.norm(dim=-1)
    cos = (a64 * b64).sum(-1) / (na * nb).clamp_min(1e-300)
    return torch.where((na == 0) & (nb == 0), torch.ones_like(cos), cos)


def _row_mask(batch: Mapping[str, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """Which rows of ``t`` (all leading dims flattened) are real tokens (the attention mask when it fits)."""
    m = batch.get("attention_mask")
    if m is not None and tuple(m.shape) == tuple(t.shape[:-1]):
        return m.reshape(-1) != 0
    return torch.ones(t.numel() // max(1, t.shape[-1]), dtype=torch.bool)


@dataclass
class ReplayResult:
    """Checkpoints of the reference run and the means to measure variants against it.

    ``module`` is a structural copy of the measured module; ``kind`` is ``"nll"`` (causal LM) or
    ``"cosine"``; ``base_loss`` the unmodified model's loss
    (0 for cosine); ``layout`` the block layout (None when the module has no blocks, and then
    every variant re-runs from the start); ``influence[k]`` ShortGPT's block influence of
    ``layout.blocks[k]`` (empty without blocks).  ``runs`` counts variant measurements.
    """

    module: Module
    batches: list[dict[str, torch.Tensor]]
    kind: str
    layout: BlockLayout | None
    starts: list[int]  # checkpoint positions, ascending (0 first)
    checkpoints: list[list[Checkpoint]]  # [batch][k] at starts[k]
    references: list[torch.Tensor | None]
    base_loss: float
    influence: list[float] = field(default_factory=list)
    runs: int = 0
    removal_losses: dict[frozenset[int], float] = field(default_factory=dict)  # memo of loss_without_blocks

    # ----------------------------------------------------------------- losses
    def _loss_terms(self, b: int, out: torch.Tensor) -> tuple[float, float]:
        batch = self.batches[b]
        if self.kind == "nll":
            from ctc.eval.perplexity import scored_nll

            return scored_nll(out, batch["input_ids"], batch.get("attention_mask"), float64=False)
        ref = self.references[b]
        assert ref is not None
        keep = _row_mask(batch, ref)
        cos = _row_cosines(ref, out)[keep]
        return float((1 - cos).sum()), int(keep.sum())

    def _measure(self, start: int, *, params: Mapping[str, torch.Tensor] | None = None,
                 skip: Collection[Node] = (), alias: Mapping[Value, Value] | None = None) -> float:
        k = max(i for i, s in enumerate(self.starts) if s <= start)
        total, count = 0.0, 0
        for b, cps in enumerate(self.checkpoints):
            out = resume(self.module, cps[k], params=params, skip=skip, alias=alias)[0]
            t, n = self._loss_terms(b, out)
            total += t
            count += n
        self.runs += 1
        return total / max(count, 1)

    def loss_with_params(self, changed: Mapping[str, torch.Tensor]) -> float:
        """Loss of the model with parameters ``changed`` (name -> tensor) replacing the module's.

        The run resumes at the block of the first node that reads any of them.
        """
        unknown = [k for k in changed if k not in self.module.params]
        if unknown:
            raise PassError(f"calibration replay: no parameter {unknown[0]!r} to replace")
        first = next((i for i, n in enumerate(self.module.nodes) if n.op == "param" and n.attrs["name"] in changed),
                     0)
        params = dict(self.module.params)
        params.update(changed)
        return self._measure(first, params=params)

    def loss_without_blocks(self, removed: Collection[int]) -> float:
        """Loss of the model with the blocks ``removed`` (block indices) cut out of the residual stream.

        Each maximal run of consecutive removed blocks is bypassed: what read the run's last
        residual output reads its first residual input (exactly what the ``remove-blocks``
        rewrite does to the graph).
        """
        if not removed:
            return self.base_loss
        key = frozenset(removed)
        if key in self.removal_losses:
            return self.removal_losses[key]
        layout = self.require_layout()
        pos = {b.index: k for k, b in enumerate(layout.blocks)}
        missing = [b for b in removed if b not in pos]
        if missing:
            raise PassError(f"calibration replay: no block {missing[0]} (blocks: {layout.indices()})")
        ks = sorted(pos[b] for b in removed)
        skip = [n for k in ks for n in layout.blocks[k].nodes]
        alias: dict[Value, Value] = {}
        for run in consecutive_runs(ks):
            alias[layout.blocks[run[-1]].residual_out] = layout.blocks[run[0]].residual_in
        loss = self.removal_losses[key] = self._measure(layout.blocks[ks[0]].first, skip=skip, alias=alias)
        return loss

    def require_layout(self) -> BlockLayout:
        if self.layout is None:
            raise PassError(f"module {self.module.name} has no blocks to measure")
        return self.layout

    def to_perplexity(self, loss: float) -> float:
        """``exp(loss)`` for an NLL loss (calibration perplexity); the loss itself otherwise."""
        return math.exp(min(loss, 700.0)) if self.kind == "nll" else loss


def consecutive_runs(ks: Sequence[int]) -> list[list[int]]:
    """Maximal runs of consecutive integers in sorted ``ks``."""
    out: list[list[int]] = []
    for k in ks:
        if out and out[-1][-1] == k - 1:
            out[-1].append(k)
        else:
            out.append([k])
    return out


class CalibrationReplay(Analysis):
    """Reference run of (the first ``max_batches``) calibration batches with a checkpoint per block.

    Config: ``max_batches`` (default 2).  The result (:class:`ReplayResult`) measures variants
    of the module as it was when computed: it keeps its own structural copy (parameters shared,
    never written), so rewriting the module afterwards does not disturb it.  Variants are named
    by parameter names and block indices, which mean the same in the copy.
    """

    name = "calibration-replay"
    needs_calibration = True

    def __init__(self, **config: Any):
        unknown = [k for k in config if k != "max_batches"]
        if unknown:
            raise PassError(f"CalibrationReplay has no setting {unknown[0]!r} (settings: max_batches)")
        config.setdefault("max_batches", 2)
        mb = config["max_batches"]
        if not isinstance(mb, int) or isinstance(mb, bool) or mb < 1:
            raise PassError(f"CalibrationReplay: max_batches must be an int >= 1, got {mb!r}")
        super().__init__(**config)

    def compute(self, module: Module, ctx: PassContext) -> ReplayResult:
        module = module.clone()  # the result stays valid when the pass rewrites the original
        batches = [dict(b) for b in ctx.calibration[: self.config["max_batches"]]]
        if not batches:
            raise PassError("calibration replay needs calibration batches (add a `calibrate` line to the recipe)")
        lm = module.meta.get("task") == TASK_CAUSAL_LM
        if lm and "input_ids" not in {v.name for v in module.inputs}:
            raise PassError(f"module {module.name} is a causal LM without an input_ids input; its calibration "
                            "loss (next-token NLL) cannot be scored")
        try:
            layout: BlockLayout | None = block_layout(module)
        except BlockLayoutError:
            layout = None
        starts = [0] + ([b.first for b in layout.blocks] if layout is not None else [])
        starts = sorted(set(starts))
        result = ReplayResult(module, batches, "nll" if lm else "cosine", layout, starts, [], [], 0.0)
        # Block influence: cosine of each block's residual input and output rows, over real tokens.
        outs_of: dict[int, int] = {}
        if layout is not None:
            outs_of = {id(b.residual_out): k for k, b in enumerate(layout.blocks)}
        sums = [0.0] * (len(layout.blocks) if layout is not None else 0)
        counts = [0] * len(sums)
        total, count = 0.0, 0
        for bi, batch in enumerate(batches):
            captured: dict[int, torch.Tensor] = {}

            def observe(node: Node, args: list[torch.Tensor], outs: list[torch.Tensor],
                        captured: dict[int, torch.Tensor] = captured) -> None:
                for v, t in zip(node.outputs, outs, strict=True):
                    k = outs_of.get(id(v))
                    if k is not None:
                        captured[k] = t

            out, cps = interpret_with_checkpoints(module, batch, starts, observer=observe if outs_of else None)
            result.checkpoints.append(cps)
            result.references.append(None if lm else out[0])
            if layout is not None:
                for k, blk in enumerate(layout.blocks):
                    x_in = cps[starts.index(blk.first)].values[id(blk.residual_in)]  # live: the block reads it
                    x_out = captured[k]
                    keep = _row_mask(batch, x_out)
                    cos = _row_cosines(x_in, x_out)[keep]
                    sums[k] += float(cos.sum())
                    counts[k] += int(keep.sum())
            if lm:
                t, n = result._loss_terms(bi, out[0])
                total, count = total + t, count + n
            ctx.report_progress("calibration replay", bi + 1, len(batches))
        result.base_loss = total / max(count, 1) if lm else 0.0
        result.influence = [1.0 - s / max(c, 1) for s, c in zip(sums, counts, strict=True)]
        return result
