"""``asvd``: activation-aware SVD of linears into low-rank pairs (Yuan et al. 2023, "ASVD"), or plain SVD.

Method, per weight ``W [N, K]`` of the selected ``linear`` nodes (a parameter only they read):

1. **Input transform** from the calibration statistics of its activation ``x``
   (``scaling``): ``abs_mean`` (the paper's default) ``S = diag(mean|x|^alpha)``, ``abs_max``
   ``S = diag(max|x|^alpha)``, ``whiten`` the Cholesky factor of ``X^T X`` (the whitening
   variant the ASVD code adopted from SVD-LLM), or ``none`` (plain truncated SVD).  Channels
   that carry large activations then weigh more in the truncation.
2. **SVD** of ``W S`` once per layer (float64); a rank-``r`` pair is ``u = U_r Sigma_r^a``,
   ``v = Sigma_r^(1-a) V_r^T S^-1`` with the singular values absorbed as ``absorb`` says
   (``uv``: a square root into each, the paper's default; ``u``; ``v``), so
   ``u @ v = U_r Sigma_r V_r^T S^-1`` and full rank reproduces ``W``.
3. **Rank allocation** meeting ``ratio`` (parameters of the factorised linears over their
   dense parameters; a layer's ratio is ``r (N + K) / (N K)``):

   * ``threshold`` (the paper's sensitivity-based truncation rank search): each layer's
     calibration loss is measured with only that layer truncated at each candidate ratio
     (``ratios``; perplexity for causal LMs, ``1 - cosine`` of the outputs otherwise, on
     ``sensitivity_batches`` calibration batches, re-running only the blocks from the layer
     on, see :mod:`ctc.passes.analyses.replay`); a binary search over a loss threshold gives
     every layer the smallest ratio whose loss stays under it, the smallest threshold that
     meets the target wins;
   * ``knapsack``: the same measurements, an exact multiple-choice knapsack minimising the
     summed loss increase under the parameter budget;
   * ``uniform``: every layer at ``ratio`` (no measurements) — with ``scaling=none`` this is
     the plain-SVD baseline.

   Ratios are rounded down to whole ranks (multiples of ``rank_align``), so the target is
   always met; a layer whose rank would not save parameters stays dense (skipped).
4. **Rewrite**: the linear becomes ``lowrank_linear(x, u, v[, bias]) {rank}``; the dense
   weight parameter is dropped.

A weight several linears share (``share-blocks``, ``recursive``) is one candidate: its scaling
comes from all its readers' inputs (their ``mean|x|`` pooled over every row, the elementwise
``max|x|``, or the summed ``X^T X``), its sensitivity is measured with every reader truncated,
and every reader becomes a ``lowrank_linear`` of the one pair, so the pair is stored once.
Linears outside the repeated blocks (embeddings, LM heads) are left alone by default
(``blocks_only``), as are weights that something other than selected linears reads (a tied
embedding) and computed weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ctc.ir.graph import Module, Node, Value
from ctc.ir.patterns import Match, op, var
from ctc.ir.rewrite import Rewriter, Rule, apply_once, rule
from ctc.passes.analyses.calibration import CalibrationStats
from ctc.passes.analyses.replay import CalibrationReplay
from ctc.passes.base import Analysis, Pass, PassContext, PassError, PassOptions, Selector, option, register_pass
from ctc.passes.lowrank import (
    AllocationError,
    Factorization,
    LayerChoice,
    LayerSpec,
    allocate_knapsack,
    allocate_threshold,
    allocate_uniform,
    allocation_params,
    cholesky_factor,
    factorize,
    rank_for_ratio,
    saves,
    scaling_vector,
)

__all__ = ["AsvdOptions", "AsvdPass", "LowRankSensitivity", "factorization_of", "lowrank_candidates", "lowrank_rule"]

PAPER_RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


@dataclass(frozen=True)
class AsvdOptions(PassOptions):
    """Options of the ``asvd`` pass."""

    ratio: float = option(0.9, "target parameter ratio of the factorised linears, in (0, 1] (1 = unchanged)",
                          min=0.0, max=1.0)
    alpha: float = option(0.5, "exponent of the activation scale S = diag(stat^alpha)", min=0.0, max=4.0)
    scaling: str = option("abs_mean", "input transform: per-channel mean |x| or max |x| (to the alpha), whitening "
                          "by the Cholesky factor of X^T X, or none (plain SVD)",
                          choices=("abs_mean", "abs_max", "whiten", "none"))
    allocation: str = option("threshold", "rank allocation: the paper's sensitivity threshold search, an exact "
                             "knapsack on the measured losses, or the same ratio for every layer",
                             choices=("threshold", "knapsack", "uniform"))
    absorb: str = option("uv", "where the singular values go: split as sqrt into both factors, or into u, or v",
                         choices=("uv", "u", "v"))
    ratios: list[float] = option(PAPER_RATIOS, "candidate per-layer parameter ratios whose loss is measured",
                                 min=0.0, max=1.0)
    sensitivity_batches: int = option(2, "calibration batches on which each candidate's loss is measured", min=1)
    rank_align: int = option(1, "ranks are multiples of this (the TVM CPU lowering already pads ranks to whole "
                                "vectors, exactly)", min=1)
    blocks_only: bool = option(True, "factorise only linears inside the repeated blocks (not embeddings or heads)")

    def validate(self) -> None:
        if not self.ratio > 0:
            raise PassError(f"option ratio={self.ratio!r} must be above 0 (a parameter ratio in (0, 1])")
        bad = [r for r in self.ratios if not 0 < r < 1]
        if bad:
            raise PassError(f"option ratios: {bad[0]!r} is not in (0, 1) (candidate ratios below dense)")
        if not self.ratios and self.allocation != "uniform":
            raise PassError("option ratios is empty; the sensitivity search needs candidate ratios")


# --------------------------------------------------------------------------- selection
@dataclass
class Candidate:
    """A weight ``asvd`` may factorise: the linears reading it (several when it is shared), its name and shape."""

    readers: list[Node]
    weight: str
    n: int
    k: int

    @property
    def node(self) -> Node:
        """The first linear reading the weight."""
        return self.readers[0]


def _param_name(node: Node | None) -> str | None:
    return node.attrs["name"] if node is not None and node.op == "param" else None


def lowrank_candidates(module: Module, selector: Selector, blocks_only: bool) -> tuple[list[Candidate], list[str]]:
    """Weights of selected linears that only selected linears read (a shared weight once, with all its readers),
    and why the others are left alone."""
    reads: dict[str, int] = {}
    for n in module.nodes:
        if n.op == "param":
            for v in n.outputs:
                reads[n.attrs["name"]] = reads.get(n.attrs["name"], 0) + len(v.uses) + module.is_output(v)
    linears: dict[str, list[Node]] = {}  # weight -> every linear reading it as its weight
    for n in module.nodes:
        if n.op == "linear":
            name = _param_name(w.producer) if (w := n.operand("weight")) is not None else None
            if name is not None:
                linears.setdefault(name, []).append(n)
    out: list[Candidate] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for n in module.nodes:
        if n.op != "linear" or not selector.matches(n):
            continue
        where = n.scope or n.output.name
        if blocks_only and n.block is None:
            continue
        w = n.operand("weight")
        name = _param_name(w.producer) if w is not None else None
        if name is None:
            skipped.append(f"{where}: weight is computed, not a parameter")
            continue
        if name in seen:
            continue
        seen.add(name)
        readers = linears[name]
        if reads.get(name, 0) != len(readers):
            skipped.append(f"{where}: weight {name} is shared with other readers (tied); factorising it here "
                           "would add parameters")
            continue
        outside = [r for r in readers if not selector.matches(r) or (blocks_only and r.block is None)]
        if outside:
            skipped.append(f"{where}: weight {name} is shared with the unselected linear "
                           f"{outside[0].scope or outside[0].output.name}; select every reader to factorise it once")
            continue
        t = module.params[name]
        if t.dim() != 2 or not t.is_floating_point():
            skipped.append(f"{where}: weight {name} is not a 2-D float tensor")
            continue
        out.append(Candidate(readers, name, int(t.shape[0]), int(t.shape[1])))
    return out, skipped


def _stats_config(scaling: str) -> dict[str, Any]:
    return {"hessian": True} if scaling == "whiten" else {}


def factorization_of(module: Module, cand: Candidate, ctx: PassContext, scaling: str, alpha: float
                     ) -> Factorization:
    """The SVD of ``cand``'s weight read through its input transform (calibration statistics via ``ctx``)."""
    w = module.params[cand.weight]
    if scaling == "none":
        return factorize(w)
    stats = ctx.get(CalibrationStats(**_stats_config(scaling)), module)
    seen: set[str] = set()
    inputs = []  # the distinct activations the weight reads (one per reader of a shared weight)
    for r in cand.readers:
        if r.operand("x").name not in seen:
            seen.add(r.operand("x").name)
            inputs.append(stats.input_of(r))
    rows = sum(st.rows for st in inputs)
    if scaling == "whiten":
        xtx = sum(st.hessian * st.rows for st in inputs)
        return factorize(w, chol=cholesky_factor(xtx / max(rows, 1)))
    if scaling == "abs_mean":
        stat = sum(st.abs_mean * st.rows for st in inputs) / max(rows, 1)
    else:
        stat = torch.stack([st.abs_max for st in inputs if st.abs_max is not None]).amax(0)
    return factorize(w, scale=scaling_vector(stat, alpha))


# --------------------------------------------------------------------------- sensitivity
@dataclass
class SensitivityResult:
    """Calibration loss per (weight name, candidate ratio) and of the unmodified model."""

    base_loss: float
    losses: dict[str, dict[float, float]] = field(default_factory=dict)
    kind: str = "nll"
    runs: int = 0


class LowRankSensitivity(Analysis):
    """Calibration loss of the model with one linear truncated at each candidate ratio (ASVD's sensitivity).

    Config: ``weights`` (the linears' weight parameter names), ``scaling``, ``alpha``,
    ``ratios``, ``rank_align``, ``batches`` (calibration batches measured).  Cached like any
    analysis, so several targets (or a knapsack and a threshold search) share one measurement.
    """

    name = "lowrank-sensitivity"
    needs_calibration = True

    def compute(self, module: Module, ctx: PassContext) -> SensitivityResult:
        cfg = self.config
        wanted = set(cfg["weights"])
        cands = [c for c in lowrank_candidates(module, Selector(), False)[0] if c.weight in wanted]
        replay = ctx.get(CalibrationReplay(max_batches=int(cfg["batches"])), module)
        res = SensitivityResult(replay.base_loss, kind=replay.kind)
        total = len(cands) * len(cfg["ratios"])
        done = 0
        for c in cands:
            fac = factorization_of(module, c, ctx, cfg["scaling"], cfg["alpha"])
            row: dict[float, float] = {}
            for r in cfg["ratios"]:
                rank = rank_for_ratio(c.n, c.k, r, cfg["rank_align"])
                if saves(c.n, c.k, rank):
                    row[float(r)] = replay.loss_with_params({c.weight: fac.dense(rank)})
                done += 1
                ctx.report_progress("asvd sensitivity", done, total)
            res.losses[c.weight] = row
        res.runs = replay.runs
        return res


# --------------------------------------------------------------------------- the pass
@register_pass
class AsvdPass(Pass):
    """ASVD: activation-aware SVD of linears into low-rank pairs, ranks allocated by measured sensitivity.

    Each selected block linear ``W`` is read through its inputs' scale ``S`` (from calibration:
    ``diag(mean|x|^alpha)`` by default), ``W S`` is decomposed by SVD and truncated, and the
    linear becomes ``lowrank_linear(x, u, v)`` with ``u v = U_r Sigma_r V_r^T S^-1``.  Per-layer
    ranks meet ``ratio`` (factorised parameters over dense ones): the paper's search gives each
    layer the smallest candidate ratio whose measured calibration loss (perplexity, or output
    cosine for encoders, with only that layer truncated) stays under a threshold, found by
    binary search; ``knapsack`` minimises the summed loss increase exactly; ``uniform`` gives
    every layer the same ratio.  Ranks round down (the target is always met); layers where low
    rank would save nothing stay dense.  ``scaling=none allocation=uniform`` is plain truncated
    SVD (the baseline).  Module docstring of ``ctc/passes/asvd.py``: the details.
    """

    name = "asvd"
    Options = AsvdOptions
    requires = (CalibrationStats, CalibrationReplay, LowRankSensitivity)
    needs_calibration = True

    @classmethod
    def check_module(cls, options: PassOptions, module: Module, selector: Selector) -> list[tuple[str | None, str]]:
        o: AsvdOptions = options  # type: ignore[assignment]
        cands, skipped = lowrank_candidates(module, selector, o.blocks_only)
        if cands:
            return []
        n_lin = sum(1 for n in module.nodes if n.op == "linear" and selector.matches(n))
        if n_lin == 0:
            if selector.is_all:
                return [(None, "asvd: the module has no linear")]
            return [("selector", f"asvd: the selector matches no linear ({selector.describe()})")]
        why = skipped[0] if skipped else ("every selected linear is outside the repeated blocks (blocks_only=true)"
                                          if o.blocks_only else "no selected linear can be factorised")
        return [("blocks_only" if o.blocks_only and not skipped else None,
                 f"asvd: no selected linear can be factorised: {why}")]

    def run(self, module: Module, ctx: PassContext) -> Module:
        o: AsvdOptions = self.options  # type: ignore[assignment]
        cands, skipped = lowrank_candidates(module, ctx.selector, o.blocks_only)
        for line in skipped:
            ctx.note(f"asvd: kept dense: {line}")
        if not cands:
            problems = self.check_module(o, module, ctx.selector)
            raise PassError(problems[0][1] if problems else "asvd: no linear to factorise")
        dense = sum(c.n * c.k for c in cands)
        if o.ratio >= 1:
            ctx.note(f"asvd: ratio=1: {len(cands)} linears left dense")
            return module
        if o.scaling != "none":  # statistics of the unmodified model, before any rewrite
            ctx.get(CalibrationStats(**_stats_config(o.scaling)), module)
        specs_losses: dict[str, dict[float, float]] = {}
        base = 0.0
        kind = ""
        if o.allocation != "uniform":
            sens = ctx.get(LowRankSensitivity(weights=tuple(c.weight for c in cands), scaling=o.scaling,
                                              alpha=o.alpha, ratios=tuple(sorted(o.ratios)),
                                              rank_align=o.rank_align, batches=o.sensitivity_batches), module)
            specs_losses, base, kind = sens.losses, sens.base_loss, sens.kind
        specs = [LayerSpec(c.weight, c.n, c.k, specs_losses.get(c.weight, {})) for c in cands]
        threshold = None
        try:
            if o.allocation == "uniform":
                choices = allocate_uniform(specs, o.ratio, o.rank_align)
            elif o.allocation == "threshold":
                choices, threshold = allocate_threshold(specs, o.ratio, o.ratios, o.rank_align)
            else:
                choices = allocate_knapsack(specs, o.ratio, o.ratios, base, o.rank_align)
        except AllocationError as e:
            raise PassError(f"asvd: ratio={o.ratio}: {e}") from None
        self._rewrite(module, ctx, cands, choices, o)
        kept = sum(1 for c in choices if c.dense)
        got = allocation_params(choices)
        loss = "perplexity" if kind == "nll" else "1-cosine"
        thr = ""
        if threshold is not None and kind:
            import math

            shown = math.exp(threshold) if kind == "nll" and math.isfinite(threshold) else threshold
            thr = f"; sensitivity threshold {loss} {shown:.4g}"
        ctx.note(f"asvd: {o.scaling} scaling (alpha {o.alpha}), {o.allocation} allocation: {len(cands) - kept} of "
                 f"{len(cands)} linears factorised, {kept} kept dense; linear params {dense:,} -> {got:,} "
                 f"(ratio {got / dense:.4f}, target {o.ratio}){thr}")
        ctx.metrics.update({
            "asvd_ratio": got / dense, "asvd_target": o.ratio, "asvd_factorised": len(cands) - kept,
            "asvd_dense": kept, "asvd_linear_params": [dense, got],
            "asvd_layers": [{"weight": c.key, "shape": [s.n, s.k], "rank": c.rank, "ratio": c.ratio,
                             **({"loss": specs_losses[c.key].get(c.ratio)} if c.key in specs_losses
                                and not c.dense else {})}
                            for c, s in zip(choices, specs, strict=True)],
        })
        if o.allocation != "uniform":
            ctx.metrics["asvd_base_loss"] = base
        return module

    # ----------------------------------------------------------------- rewriting
    def _rewrite(self, module: Module, ctx: PassContext, cands: Sequence[Candidate], choices: Sequence[LayerChoice],
                 o: AsvdOptions) -> None:
        """Plan (which weight gets which rank) then apply the low-rank pattern once over the module."""
        plan = {c.weight: (c, ch) for c, ch in zip(cands, choices, strict=True) if not ch.dense}
        done = [0]

        def factors(weight: str) -> tuple[torch.Tensor, torch.Tensor, int] | None:
            if weight not in plan:
                return None
            c, ch = plan[weight]
            u, v = factorization_of(module, c, ctx, o.scaling, o.alpha).factors(ch.rank, o.absorb)
            done[0] += 1
            ctx.report_progress("asvd factorise", done[0], len(plan))
            return u, v, ch.rank

        rw = ctx.rewriter(module)
        log = apply_once(rw, [lowrank_rule(factors)])
        rw.cleanup()
        want = sum(len(c.readers) for c, _ in plan.values())
        if log.fired.get("asvd-lowrank", 0) != want:
            raise PassError(f"asvd: planned {want} low-rank linears ({len(plan)} weights) but the rewrite applied "
                            f"{log.fired.get('asvd-lowrank', 0)}")


LINEAR = op("linear", var("x"), var("w"), ...)


def lowrank_rule(factors: Callable[[str], tuple[torch.Tensor, torch.Tensor, int] | None]) -> Rule:
    """The pattern ``linear(x, W[, b]) -> lowrank_linear(x, u, v[, b]) {rank}`` for the weights ``factors``
    gives ``(u, v, rank)`` for (None: leave it); the dense ``W`` goes with the rewriter's cleanup.

    ``factors`` is asked once per weight: every linear reading a shared ``W`` reads the one pair."""
    made: dict[str, tuple[str, str, int] | None] = {}

    @rule(LINEAR, name="asvd-lowrank")
    def factorise(rw: Rewriter, m: Match) -> Value | None:
        p = m["w"].producer
        weight = p.attrs["name"] if p is not None and p.op == "param" else None
        if weight is None:
            return None
        if weight not in made:
            got = factors(weight)
            if got is not None:
                u, v, rank = got
                base = weight[: -len(".weight")] if weight.endswith(".weight") else weight
                got = (rw.add_param(f"{base}.lowrank_u", u), rw.add_param(f"{base}.lowrank_v", v), rank)
            made[weight] = got
        pair = made[weight]
        if pair is None:
            return None
        un, vn, rank = pair
        node = rw.create("lowrank_linear", {"x": m["x"], "u": rw.read_param(un), "v": rw.read_param(vn),
                                            "bias": m.root.operand("bias")}, {"rank": rank})
        return node.output

    return factorise
