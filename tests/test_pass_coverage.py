"""Every registered pass changes a stated share of generated modules, and keeps their meaning.

A pass that silently stops matching (a renamed op, a broken pattern, a selector bug) fails here.
Shares are measured on a fixed-seed sample of 60 modules (``strategies.changed_share``); the
thresholds sit a margin below what the passes reach today (canonicalize 85%, cse 93%, dce 100%,
constant-fold 78%, quantize and rptq 72%; the share is printed on failure), and every registered
pass must have an entry, so a new pass comes with its own.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from strategies import changed_share, inputs_for, module_and_inputs

from ctc.ir import Module, interpret
from ctc.passes import all_passes, get_pass
from ctc.passes.manager import PassManager

# pass name -> (options, least share of generated modules it must change)
SHARES: dict[str, tuple[dict, float]] = {
    "canonicalize": ({}, 0.7),
    "cse": ({}, 0.75),
    "dce": ({}, 0.8),
    "constant-fold": ({}, 0.6),
    "quantize": ({"blocks_only": False}, 0.55),
    "rptq": ({"blocks_only": False, "clusters": 2}, 0.55),
}
N = 60


def _calibration(m: Module) -> list[dict[str, torch.Tensor]]:
    return [{v.name: t for v, t in zip(m.inputs, inputs_for(m, 3, seed), strict=True)} for seed in range(2)]


def _runner(name: str, options: dict) -> Callable[[Module], Module]:
    def run(m: Module) -> Module:
        pm = PassManager([get_pass(name)(options)], calibration=_calibration(m), progress=False, fidelity=False)
        return pm.run(m)[0]

    return run


def test_every_registered_pass_has_a_share() -> None:
    assert set(all_passes()) <= set(SHARES), f"add the new pass(es) {set(all_passes()) - set(SHARES)} to SHARES"


@pytest.mark.parametrize("name", sorted(SHARES))
def test_pass_changes_its_share_of_generated_modules(name: str) -> None:
    options, least = SHARES[name]
    share = changed_share(_runner(name, options), n=N)
    assert share >= least, f"{name} changed {share:.0%} of {N} generated modules; it must change >= {least:.0%}"


@pytest.mark.parametrize("name", ["canonicalize", "cse", "dce", "constant-fold"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mi=module_and_inputs(max_nodes=12, special=True))
def test_exact_passes_keep_outputs_with_nan_inf_and_signed_zero(name: str, mi) -> None:
    m, inputs = mi
    ref = interpret(m, inputs)
    out = _runner(name, SHARES[name][0])(m)
    for a, b in zip(interpret(out, inputs), ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
