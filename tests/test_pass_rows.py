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


def test_a_pass_that_rewrote_without_changing_counts_is_not_nothing_changed() -> None:
    """Equal op, parameter and byte counts do not mean nothing changed: a pass that swapped weights one for one (an
    rptq fold_only whose permutations all fold into the weights: 'rptq: fold only; N activations reordered') must not
    read 'nothing changed (rptq: fold only; ...)'. Its rewriters' log says it rewrote."""
    from types import SimpleNamespace

    from ctc.passes.manager import PassRecord

    def row(rewrites: dict) -> str:
        r = PassRecord(index=0, name="rptq", options={}, selector="all", span=None, status="ok", seconds=0.1,
                       params_before=10, params_after=10, bytes_before=40, bytes_after=40, ops_before={"linear": 2},
                       ops_after={"linear": 2}, ops_diff={}, notes=["rptq: fold only; 2 activations reordered"],
                       rewrites=rewrites)
        return pass_rows(SimpleNamespace(records=[r]))[0]["summary"]

    swapped = {"created": {"param": 2}, "erased": {"param": 2}, "replaced": {}, "patterns": {}, "params_added": 2,
               "params_removed": 2}
    assert row(swapped).startswith("no op changes;")
    assert row({}).startswith("nothing changed (rptq: fold only")
