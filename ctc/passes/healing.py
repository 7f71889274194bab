"""Healing by distillation: a few optimiser steps that pull a compressed module's hidden states
back onto the original's (FoldGPT's tail-layer distillation, RRT's uptraining in miniature).

The student is the compressed module cut at chosen values (the outputs of the last blocks:
the "tail layers"); the teacher is the original module cut at the matching values.  The
teacher's targets are computed once per calibration batch with the reference interpreter.
The student runs as a torch.fx GraphModule (:mod:`ctc.backends.torch_fx`, the same op
references as the interpreter) whose trainable parameters are replaced by leaf tensors, so
autograd reaches them; everything else stays frozen.  The loss is the mean over the cut
points of ``||student - teacher||^2 / ||teacher||^2`` (a relative MSE, so points of different
scale weigh alike).  Adam runs one calibration batch per step, cycling, until the step or
time budget is spent.  A quarter of the calibration batches (with at least four) is held out:
its loss is measured before training and twice per pass over the rest, and the tensors of the
best held-out step are the result (early stopping; with fewer batches all of them serve both).
If no step beat the starting point, the original tensors are kept (and the result says so).

Nothing here mutates a parameter tensor: the trained values come back as new tensors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ctc.ir.graph import Module, Value
from ctc.ir.interpreter import interpret
from ctc.ir.rewrite import Rewriter
from ctc.passes.base import PassContext, PassError, PassOptions, option

__all__ = ["HealBudget", "HealOptions", "HealResult", "cut_at", "distill", "heal_after_tying"]

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class HealBudget:
    """How much healing: at most ``steps`` optimiser steps and ``seconds`` of wall time (0 = no limit on
    that one; both 0 = no healing), learning rate ``lr``."""

    steps: int = 0
    seconds: float = 0.0
    lr: float = 1e-3

    @property
    def enabled(self) -> bool:
        return self.steps > 0 or self.seconds > 0


@dataclass
class HealResult:
    """What healing did: trained tensors (by parameter name), the loss curve and the budget used."""

    tensors: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    loss_before: float = float("nan")
    loss_after: float = float("nan")
    best_step: int = 0
    validation_batches: int = 0
    steps: int = 0
    seconds: float = 0.0
    stopped_by: str = "steps"
    kept: bool = True

    def summary(self) -> dict[str, object]:
        """JSON-able digest for a pass's metrics (the training curve thinned to at most 200 points)."""
        stride = max(1, len(self.losses) // 200)
        return {"steps": self.steps, "seconds": round(self.seconds, 2), "stopped_by": self.stopped_by,
                "loss_before": self.loss_before, "loss_after": self.loss_after, "best_step": self.best_step,
                "validation_batches": self.validation_batches, "kept": self.kept,
                "loss_curve": self.losses[::stride], "curve_stride": stride,
                "validation_curve": [list(v) for v in self.val_losses]}


def cut_at(module: Module, values: Sequence[str], name: str | None = None) -> Module:
    """A copy of ``module`` whose outputs are the values named ``values`` and nothing else is computed."""
    m = module.clone()
    by_name = {v.name: v for v in m.values()}
    missing = [v for v in values if v not in by_name]
    if missing:
        raise PassError(f"cannot cut module {module.name} at %{missing[0]}: no such value")
    m.set_outputs([by_name[v] for v in values], [f"cut{i}" for i in range(len(values))])
    rw = Rewriter(m)
    rw.erase_dead()
    rw.prune_unread_params()
    if name:
        m.name = name
    return m


def _relative_mse(outs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    terms = [((o - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-30) for o, t in zip(outs, targets, strict=True)]
    return torch.stack(terms).mean()


def distill(student: Module, teacher: Module, student_points: Sequence[Value | str],
            teacher_points: Sequence[Value | str], batches: Sequence[Mapping[str, torch.Tensor]],
            trainable: Sequence[str], budget: HealBudget, *, progress: Progress | None = None) -> HealResult:
    """Train ``trainable`` parameters of ``student`` so its values at ``student_points`` match ``teacher``'s
    at ``teacher_points`` on ``batches``; returns the new tensors (the modules are not changed)."""
    from ctc.backends.torch_fx import to_graph_module

    if not budget.enabled:
        raise PassError("distill: the budget allows no step (give steps > 0 or seconds > 0)")
    if not batches:
        raise PassError("healing needs calibration batches, and the pipeline has none (add a `calibrate` line)")
    if len(student_points) != len(teacher_points) or not student_points:
        raise PassError("distill: give one teacher point per student point (at least one)")
    missing = [p for p in trainable if p not in student.params]
    if missing:
        raise PassError(f"distill: {missing[0]!r} is not a parameter of {student.name}")
    names = [p if isinstance(p, str) else p.name for p in student_points]
    t_names = [p if isinstance(p, str) else p.name for p in teacher_points]
    t_cut = cut_at(teacher, t_names, f"{teacher.name}_teacher")
    targets = [[t.detach() for t in interpret(t_cut, b)] for b in batches]
    s_cut = cut_at(student, names, f"{student.name}_student")
    unused = [p for p in trainable if p not in s_cut.params]
    trainable = [p for p in trainable if p in s_cut.params]  # parameters after the cut points do not matter
    gm = to_graph_module(s_cut)
    leaves: dict[str, torch.Tensor] = {}
    for p in trainable:
        leaf = s_cut.params[p].detach().clone().to(torch.float32).requires_grad_(True)
        setattr(gm, gm.param_names[p], leaf)
        leaves[p] = leaf
    inputs = [[b[v.name] for v in s_cut.inputs] for b in batches]
    n_val = len(inputs) // 4  # a held-out quarter of the calibration batches decides what is kept
    train = list(range(len(inputs) - n_val))
    val = list(range(len(inputs) - n_val, len(inputs))) if n_val else train

    def loss_on(idx: Sequence[int]) -> float:
        with torch.no_grad():
            return float(sum(float(_relative_mse(gm(*inputs[i]), targets[i])) for i in idx) / len(idx))

    original = {p: s_cut.params[p] for p in trainable}
    result = HealResult(tensors=dict(original), validation_batches=n_val)
    result.loss_before = loss_on(val)
    if not leaves:
        result.loss_after, result.kept = result.loss_before, False
        result.stopped_by = "nothing to train" + (f" ({len(unused)} parameter(s) after the cut)" if unused else "")
        return result
    opt = torch.optim.Adam(list(leaves.values()), lr=budget.lr)
    best = (result.loss_before, 0, {p: t.detach().clone() for p, t in leaves.items()})
    every = max(1, len(train) // 2)
    t0 = time.perf_counter()
    step = 0
    while True:
        if budget.steps > 0 and step >= budget.steps:
            result.stopped_by = "steps"
            break
        if budget.seconds > 0 and time.perf_counter() - t0 >= budget.seconds:
            result.stopped_by = "time"
            break
        k = train[step % len(train)]
        opt.zero_grad(set_to_none=True)
        loss = _relative_mse(gm(*inputs[k]), targets[k])
        loss.backward()
        opt.step()
        result.losses.append(float(loss.detach()))
        step += 1
        if step % every == 0:
            best = _checkpoint(best, loss_on(val), step, leaves, result)
        if progress is not None:  # steps when they bound the run, else seconds of the time budget
            if budget.steps > 0:
                progress("healing (steps)", step, budget.steps)
            else:
                progress("healing (seconds)", min(int(time.perf_counter() - t0), int(budget.seconds)),
                         int(budget.seconds))
    if step % every:
        best = _checkpoint(best, loss_on(val), step, leaves, result)
    result.steps = step
    result.seconds = time.perf_counter() - t0
    result.loss_after, result.best_step = best[0], best[1]
    if best[0] < result.loss_before:
        result.tensors = {p: t.to(original[p].dtype) for p, t in best[2].items()}
    else:
        result.kept = False
    return result


def _checkpoint(best: tuple[float, int, dict[str, torch.Tensor]], val_loss: float, step: int,
                leaves: Mapping[str, torch.Tensor], result: HealResult) -> tuple[float, int, dict[str, torch.Tensor]]:
    """Record the validation loss at ``step``; keep a copy of the trained tensors when it is the best so far."""
    result.val_losses.append((step, val_loss))
    if val_loss < best[0]:
        return val_loss, step, {p: t.detach().clone() for p, t in leaves.items()}
    return best


# --------------------------------------------------------------------------- pass options and the pass-side step
@dataclass(frozen=True)
class HealOptions(PassOptions):
    """Healing options shared by the tying passes (``heal_steps = heal_seconds = 0``: no healing)."""

    heal_steps: int = option(0, "healing: most distillation steps (one calibration batch each); 0 = no step limit "
                                "(then heal_seconds bounds it); both 0 = no healing", min=0)
    heal_seconds: float = option(0.0, "healing: wall-time budget in seconds; 0 = no time limit", min=0.0)
    heal_lr: float = option(1e-3, "healing: Adam learning rate", min=0.0)
    heal_tail: int = option(2, "healing: distil the outputs of this many last blocks of the model", min=1)
    heal_params: str = option("adapters", "healing trains the adapters (coefficients, LoRA, the tied blocks' own "
                                          "norms and biases) or also the shared weights",
                              choices=("adapters", "all"))

    @property
    def heal_budget(self) -> HealBudget:
        return HealBudget(self.heal_steps, self.heal_seconds, self.heal_lr)


def heal_dtype_problem(o: HealOptions, module: Module, what: str) -> str | None:
    """Healing trains float32 leaves inside the student graph: a bf16/f16 model cannot mix them in; say so."""
    if not o.heal_budget.enabled:
        return None
    low = sorted({str(t.dtype).removeprefix("torch.") for t in module.params.values()
                  if t.is_floating_point() and t.dtype != torch.float32})
    if not low:
        return None
    return (f"{what}: healing trains in float32 and this model's parameters are {', '.join(low)}: load it with "
            "dtype=f32 to heal, or leave heal_steps and heal_seconds at 0")


def heal_after_tying(module: Module, teacher: Module, adapters: Sequence[str], shared: Sequence[str],
                     o: HealOptions, ctx: PassContext, what: str) -> HealResult | None:
    """Distil ``teacher``'s last ``heal_tail`` block outputs into ``module`` (in place: trained tensors are
    registered as the parameters' new values); None when no healing was asked for."""
    from ctc.ir.blocks import block_layout

    problem = heal_dtype_problem(o, module, what)
    if problem:
        raise PassError(problem)

    if not o.heal_budget.enabled:
        return None
    s_layout, t_layout = block_layout(module), block_layout(teacher)
    tail = s_layout.indices()[-o.heal_tail:]
    s_points = [s_layout.by_index(b).residual_out for b in tail]
    t_points = [t_layout.by_index(b).residual_out for b in tail]
    trainable = sorted(set(adapters) | (set(shared) if o.heal_params == "all" else set()))
    trainable = [p for p in trainable if p in module.params]
    res = distill(module, teacher, s_points, t_points, ctx.calibration, trainable, o.heal_budget,
                  progress=ctx.progress)
    if res.kept:
        for name, t in res.tensors.items():
            module.params[name] = t  # new tensor objects; the originals are untouched
    verdict = f"kept step {res.best_step}" if res.kept else "discarded (no step improved on the start)"
    where = (f"{res.validation_batches} held-out calibration batch(es)" if res.validation_batches
             else "the calibration batches (too few to hold some out)")
    ctx.note(f"{what}: healing {res.steps} step(s) in {res.seconds:.1f}s (stopped by {res.stopped_by}) on "
             f"{len(trainable)} tensor(s); distillation loss on {where} {res.loss_before:.4g} -> "
             f"{res.loss_after:.4g}, {verdict}")
    return res
