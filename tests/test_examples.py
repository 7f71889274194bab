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
from ctc.cli import EXIT_OK, main

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.ctc"))
CI_SAMPLES = 4


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("recipe", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_passes_the_recipe_check(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", str(recipe), "--check-only", "--out", "out-never-written"]) == EXIT_OK, \
        capsys.readouterr().err


@pytest.mark.parametrize("recipe", EXAMPLES, ids=[p.stem for p in EXAMPLES])
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
