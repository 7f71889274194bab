"""Every shipped example recipe compiles, so an example can never rot.

The recipes in examples/ are compiled as shipped, end to end (capture, passes, checks, targets,
artifact), with ``--max-samples 4``: at most four calibration and evaluation windows, the CI-sized
run.  The report records the cap.  Adding a recipe to examples/ adds it here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ctc
from ctc.artifact import PARAMS_FILE
from ctc.cli import EXIT_OK, main
from ctc.ir.graph import Module

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.ctc"))
CI_SAMPLES = 4


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("recipe", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_passes_the_recipe_check(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", str(recipe), "--check-only", "--out", "out-never-written"]) == EXIT_OK, \
        capsys.readouterr().err


# Compiles that measure for longer than a CI run can give one test (the slow suite compiles them):
# smollm2_structural_cpu runs ~250 measured variants of SmolLM2 (remove-blocks DP, ASVD sensitivity)
# and a TVM build: ~30 min on 2 shared cores; minilm_recursive_w8a8_cpu ~70 s (CI builds the tied MiniLM
# with asvd and rptq through TVM in minilm_share_asvd_cpu already); smollm2_attention_w8a8_cpu 330 s on a quiet
# machine (CI compiles ACT + sparse attention + RPTQ through TVM at small size in tests/test_attention_pipeline.py);
# smollm2_asvd ~100 s and smollm2_remove_blocks ~115 s of measured variants (CI runs both passes on the real
# MiniLM: minilm_asvd, minilm_share_asvd_cpu, tests/test_structural_e2e.py).
SLOW_EXAMPLES = {"smollm2_structural_cpu", "minilm_recursive_w8a8_cpu", "smollm2_attention_w8a8_cpu", "smollm2_asvd",
                 "smollm2_remove_blocks"}
COMPILED = [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW_EXAMPLES else p for p in EXAMPLES]


@pytest.mark.parametrize("recipe", COMPILED, ids=[p.stem for p in EXAMPLES])
def test_example_compiles(recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / recipe.stem
    rc = main(["compile", str(recipe), "--out", str(out), "--max-samples", str(CI_SAMPLES), "--quiet"])
    captured = capsys.readouterr()
    assert rc == EXIT_OK, captured.err + captured.out
    art = ctc.load(out)
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and all(c["passed"] for c in report["checks"])
    for role, proto in report["protocol"].items():
        assert proto["windows"] <= CI_SAMPLES, role
    for t in report.get("targets", []):
        assert art.manifest is not None and art.manifest.verify_dir(t["dir"])
    if recipe.stem in SHARING_EXAMPLES:  # the stored-once check below is not vacuous for them
        assert art.module.read_param_bytes() > art.module.param_bytes()
    assert_each_tensor_stored_once(out, art.module, report)


# examples whose tensors are read by several nodes (tied blocks, a tied embedding)
SHARING_EXAMPLES = {"minilm_share_asvd_cpu", "minilm_recursive_w8a8_cpu", "minilm_tied_w8a8_cpu", "smollm2_recursive",
                    "smollm2_share_blocks"}
# what a compiled output may hold beyond its weights (code, headers, alignment, padded ranks)
OVERHEAD_BYTES = 4 << 20


def assert_each_tensor_stored_once(out: Path, module: Module, report: dict) -> None:
    """Stored once: a tensor several nodes read (a tied embedding, a shared block's weights) is one copy in the
    artifact's parameters and in every built library or weight blob, never one per reader (a library may add
    padded layouts and code, but not half of what a copy per reader would add)."""
    unique, read = module.param_bytes(), module.read_param_bytes()
    assert unique <= (out / PARAMS_FILE).stat().st_size < unique + OVERHEAD_BYTES
    if read == unique:
        return  # nothing is read twice
    copies = read - unique  # what one copy per reader would add
    for t in report.get("targets", []):
        # f32 linears on AMX-BF16 tiles bind their weights as bf16 pieces (bf16x6: 1.5x the f32 bytes)
        pieces = t.get("amx_f32_added_bytes", 0)
        for name in ("model.so", "weights.bin"):  # TVM library (weights as constants), fpga weight blob
            f = out / t["dir"] / name
            if f.exists():
                assert f.stat().st_size < unique + pieces + max(copies / 2, OVERHEAD_BYTES), \
                    (t["dir"], name, unique, pieces, read)
