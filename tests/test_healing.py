"""Healing by distillation: the loss goes down within the budget, nothing is written in place, bad input fails."""

from __future__ import annotations

import pytest
import torch
from tiny_transformers import outlier_inputs, tiny_transformer

from ctc.ir.blocks import block_layout
from ctc.ir.graph import Module
from ctc.passes.base import PassError
from ctc.passes.healing import HealBudget, cut_at, distill


def pair(seed: int = 0) -> tuple[Module, Module, list[str]]:
    """(teacher, student whose norm weights are perturbed, those weights' names)."""
    teacher = tiny_transformer("llama", layers=3, seq=8, seed=seed)
    student = teacher.clone()
    names = [k for k in student.params if k.endswith("ln1.weight") or k.endswith("ln2.weight")]
    g = torch.Generator().manual_seed(seed)
    for k in names:
        student.params[k] = student.params[k] * (1 + 0.3 * torch.randn(student.params[k].shape, generator=g))
    return teacher, student, names


def points(m: Module) -> list[str]:
    return [block_layout(m).blocks[-1].residual_out.name]


def test_distillation_lowers_the_loss_and_returns_new_tensors() -> None:
    teacher, student, names = pair()
    before = {k: student.params[k].clone() for k in names}
    calib = outlier_inputs(teacher, 4)
    res = distill(student, teacher, points(student), points(teacher), calib, names, HealBudget(steps=30, lr=1e-2))
    assert res.steps == 30 and len(res.losses) == 30 and res.stopped_by == "steps"
    assert res.validation_batches == 1  # a quarter held out: what is kept is decided there
    assert res.kept and res.loss_after < 0.5 * res.loss_before and 0 < res.best_step <= 30
    assert res.loss_after == min(v for _, v in res.val_losses)
    for k in names:
        assert torch.equal(student.params[k], before[k])  # the module is untouched
        assert res.tensors[k] is not student.params[k] and not torch.equal(res.tensors[k], before[k])


def test_time_budget_and_no_improvement() -> None:
    teacher, student, names = pair(1)
    calib = outlier_inputs(teacher, 2)
    res = distill(student, teacher, points(student), points(teacher), calib, names, HealBudget(seconds=0.5, lr=1e-2))
    assert res.stopped_by == "time" and res.steps >= 1
    res = distill(student, teacher, points(student), points(teacher), calib, names, HealBudget(steps=3, lr=0.0))
    assert not res.kept and all(res.tensors[k] is student.params[k] for k in names)


def test_cut_at_computes_only_what_the_points_need() -> None:
    m = tiny_transformer("llama", layers=3, seq=8)
    cut = cut_at(m, points(m))
    assert "lm_head.weight" not in cut.params and "final.ln.weight" not in cut.params
    assert len(cut.nodes) < len(m.nodes) and cut.output_names == ["cut0"]
    with pytest.raises(PassError, match="no such value"):
        cut_at(m, ["nope"])


def test_bad_input() -> None:
    teacher, student, names = pair()
    calib = outlier_inputs(teacher, 1)
    p_s, p_t = points(student), points(teacher)
    with pytest.raises(PassError, match="budget"):
        distill(student, teacher, p_s, p_t, calib, names, HealBudget())
    with pytest.raises(PassError, match="calibration"):
        distill(student, teacher, p_s, p_t, [], names, HealBudget(steps=1))
    with pytest.raises(PassError, match="not a parameter"):
        distill(student, teacher, p_s, p_t, calib, ["nope"], HealBudget(steps=1))
