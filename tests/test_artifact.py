"""Artifact directories: atomic writes, nothing left on failure, self-contained report, ctc.load round trip."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import ctc
from ctc.artifact import ArtifactError, bar_chart_svg, render_html, write_artifact
from ctc.ir.graph import Module
from ctc.ir.types import TensorType


def _module() -> Module:
    m = Module("tiny")
    m.add_input("x", TensorType((2, 3), "f32"))
    m.add_param("w", torch.arange(6, dtype=torch.float32).reshape(2, 3))
    m.add_param("q", torch.tensor([1, -2, 3], dtype=torch.int8))
    w = m.param("w", scope="layers.0.fc", block=0)
    q = m.param("q", scope="layers.1.fc", block=1)
    m.set_outputs([w, q], ["w", "q"])
    m.meta["task"] = "test"
    return m


REPORT = {"name": "tiny", "passed": False, "failed_checks": ["params <= 0.5x"],
          "model": {"kind": "bundled", "ref": "tiny", "params_before": 9, "params_after": 9},
          "checks": [{"check": "params <= 0.5x", "measured": 1.0, "threshold": 0.5, "passed": False},
                     {"check": "fidelity >= 0.99", "measured": 1.0, "threshold": 0.99, "passed": True}],
          "passes": [{"name": "dce", "selector": "all", "ops_diff": {"add": -1}, "notes": ["<removed> 1"],
                      "fidelity": {"cosine": 1.0}, "seconds": 0.01}],
          "per_block": {"blocks": [0, 1], "original": [24, 3], "compressed": [24, 3]},
          "recipe_text": 'model bundled "tiny"\n'}


def test_write_and_load_round_trip(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "model.safetensors").write_text("not copied")
    dest = write_artifact(tmp_path / "out" / "a", module=_module(), report=REPORT, recipe_text="model x\n",
                          tokenizer_dir=tok, build_targets=[("cpu", lambda d: (d / "lib.so").write_bytes(b"x")
                                                             and {"library": "lib.so"})])
    files = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    assert files == {"ir.txt", "params.safetensors", "recipe.ctc", "report.json", "report.html",
                     "tokenizer/tokenizer.json", "targets/cpu/lib.so", "manifest.json"}
    assert dest.stat().st_mode & 0o055 == 0o055 & ~_umask(), "artifact directory is private"
    art = ctc.load(dest)
    assert art.report["failed_checks"] == ["params <= 0.5x"]
    assert art.report["targets"][0]["kind"] == "cpu" and art.targets == ["cpu"]
    assert torch.equal(art.module.params["q"], _module().params["q"])
    out = art.run({"x": torch.zeros(2, 3)})
    assert torch.equal(out[0], _module().params["w"]) and out[1].dtype == torch.int8
    assert not list((tmp_path / "out").glob(".*")), "temporary directory left behind"


def _umask() -> int:
    import os

    m = os.umask(0)
    os.umask(m)
    return m


def test_failure_leaves_nothing_and_keeps_old_artifact(tmp_path: Path) -> None:
    dest = tmp_path / "a"
    write_artifact(dest, module=_module(), report=REPORT)
    before = (dest / "report.json").read_text()

    def boom(d: Path) -> dict:
        (d / "partial.so").write_bytes(b"half")
        raise RuntimeError("backend failed")

    with pytest.raises(RuntimeError, match="backend failed"):
        write_artifact(dest, module=_module(), report={**REPORT, "name": "new"}, build_targets=[("cpu", boom)])
    assert (dest / "report.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    with pytest.raises(RuntimeError):
        write_artifact(tmp_path / "new" / "deep" / "b", module=_module(), report=REPORT, build_targets=[("cpu", boom)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"], "directories created for the artifact were left"


def test_replacing_an_artifact(tmp_path: Path) -> None:
    dest = tmp_path / "a"
    write_artifact(dest, module=_module(), report=REPORT)
    write_artifact(dest, module=_module(), report={**REPORT, "name": "second"})
    assert json.loads((dest / "report.json").read_text())["name"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_report_html_is_self_contained() -> None:
    page = render_html({**REPORT, "files": ["ir.txt"]})
    assert "<svg" in page and "params &lt;= 0.5x" in page and "FAIL" in page
    assert "&lt;removed&gt; 1" in page  # notes are escaped
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<script" not in page


def test_bar_chart_svg_scales_bars() -> None:
    svg = bar_chart_svg(["0", "1"], {"a": [10.0, 5.0]}, title="t")
    heights = [float(h) for h in re.findall(r'<rect x="[\d.]+" y="[\d.]+" width="[\d.]+" height="([\d.]+)"', svg)]
    assert heights[0] == pytest.approx(2 * heights[1])


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        ctc.load(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(ArtifactError, match="manifest.json: is missing: this is not a ctc artifact"):
        ctc.load(tmp_path / "x")
