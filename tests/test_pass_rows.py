"""The per-pass summary line `ctc compile` and `ctc show` print (driver.pass_rows)."""

from __future__ import annotations

from hf_configs import captured, hf_inputs

from ctc.driver import pass_rows
from ctc.passes.base import get_pass
from ctc.passes.manager import PassManager


def test_a_pass_that_changed_nothing_says_why() -> None:
    """calibrate-attention on a model without attention sinks (a random one) printed only 'no op changes; params
    a -> a ...': why ('evaluated 0 of 0 heads with sinks ...') was in report.json alone, so the pass looked silently
    broken. A pass that changes something keeps its op diff; one with nothing to say keeps 'no op changes'."""
    _, m = captured("gpt2")
    calib = [hf_inputs(1, 8, seed=s) for s in range(2)]
    pm = PassManager([get_pass("calibrate-attention")({"budget": 2}), get_pass("dce")(),
                      get_pass("quantize")({"w_bits": 8, "a_bits": 16})], calibration=calib, progress=False)
    _, report = pm.run(m)
    act, dce, quant = pass_rows(report)
    assert not report.records[0].ops_diff and report.records[0].notes
    assert act["summary"].startswith("nothing changed (evaluated 0 of 0 heads with sinks")
    assert dce["summary"].startswith("no op changes;")
    assert quant["summary"].startswith("linear -")
