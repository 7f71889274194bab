"""Targets on Hugging Face architectures other than the bundled BERT/Llama: what a user's own model meets."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hf_configs import hf_inputs, tiny_hf

from ctc.frontends import capture_hf_model
from ctc.passes.base import PassContext, get_pass
from ctc.targets import FpgaOptions, TargetConfig, build_target


def test_fpga_printer_reads_both_operands_of_a_kernel_whose_parameters_share_a_name() -> None:
    """``x * x`` lowers to a kernel ``multiply(lv, lv, out)`` (emit_te names placeholders after the operand) that
    the block builder reuses for ``y * x``; the C read its second operand twice, so ``x^3`` came out as ``x^2``."""
    import tvm
    from tvm import te

    from ctc.backends.hls.cgen import c_kernel, lower_tir

    a, b = te.placeholder((8, 4), name="lv57"), te.placeholder((8, 4), name="lv57")
    c = te.compute((8, 4), lambda i, j: a[i, j] * b[i, j], name="T_multiply")
    low = lower_tir(tvm.IRModule({"multiply": te.create_prim_func([a, b, c])}))["multiply"]
    sig, text = c_kernel("k_multiply", low)
    params = [p.split("*")[1].strip() for p in sig[sig.index("(") + 1:sig.index(")")].split(",")]
    assert len(set(params)) == 3
    (body,) = [line for line in text.splitlines() if "T_multiply[" in line and "=" in line]
    assert f"{params[0]}[" in body and f"{params[1]}[" in body


@pytest.mark.skipif(shutil.which("gcc") is None, reason="C simulation needs gcc")
def test_gpt2_w8a8_builds_for_the_fpga_bit_exactly(tmp_path: Path) -> None:
    """GPT-2: Conv1D linears run on ``[batch*seq, in]`` rows (the design said "dim 'batch*seq' is not static ...
    (set seq_len)" even with seq_len set), and gelu_new's ``pow(x, 3)`` is ``x * x * x`` (the C computed x^2)."""
    model = tiny_hf("gpt2", layers=1)
    m = capture_hf_model(model, seq_len=8)
    cal = [hf_inputs(1, 8, seed=s) for s in range(2)]
    q = get_pass("quantize")({"w_bits": 8, "a_bits": 8}).run(m, PassContext(calibration=cal))
    t = TargetConfig("fpga", FpgaOptions.from_dict({"tuning_dir": str(tmp_path / "db"), "seq_len": 8,
                                                    "tune": False}))
    s = build_target(q, t, tmp_path / "fpga", example_inputs=cal[0])
    assert s["csim"]["bit_exact"] is True


def test_fpga_refusal_of_a_length_dependent_rotary_table_does_not_advise_constant_fold(tmp_path: Path) -> None:
    """A Llama/Qwen captured for any length computes its rotary table from ``arange(seq)``: the refusal said
    `constant-fold` makes such ops disappear, which a user then tried in vain (the shapes are symbolic)."""
    from ctc.backends.tvm.lower import LoweringError

    m = capture_hf_model(tiny_hf("llama", layers=1), seq_len=8)
    cal = [hf_inputs(1, 8)]
    q = get_pass("quantize")({"w_bits": 8, "a_bits": 8}).run(m, PassContext(calibration=cal))
    q = get_pass("constant-fold")({}).run(q, PassContext())
    t = TargetConfig("fpga", FpgaOptions.from_dict({"tuning_dir": str(tmp_path / "db"), "seq_len": 8,
                                                    "tune": False, "csim": False}))
    with pytest.raises(LoweringError, match=r"(?s)cos .*sin .*depend on seq, so `constant-fold` cannot") as e:
        build_target(q, t, tmp_path / "fpga", example_inputs=cal[0])
    assert "disappear with the `constant-fold` pass" not in str(e.value)
