"""Sharing end to end on the real bundled MiniLM: a recipe with both tying passes, healing, the report.

Small on purpose (two short calibration windows, a few healing steps): it checks that the passes
run on real weights through the driver, that the artifact stores each shared tensor once and
loads back to the same outputs, and that the report carries unique vs total bytes and the loss curve.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ctc
from ctc.cli import main

RECIPE = """\
model bundled "minilm"
calibrate wiki samples=2 seq_len=32
evaluate lee samples=2 seq_len=32
pipeline {
    share-blocks groups=[[4, 5]] heal_steps=3
    recursive loops=2 rank=4 on blocks[0:2]
}
check params <= 0.95x
"""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sharing")
    (d / "share.ctc").write_text(RECIPE)
    out = d / "out" / "share"
    assert main(["compile", str(d / "share.ctc"), "--out", str(out), "--quiet"]) == 0
    return out


def test_report_has_groups_unique_bytes_and_the_loss_curve(artifact: Path) -> None:
    report = json.loads((artifact / "report.json").read_text())
    share, rec = report["passes"]
    assert share["metrics"]["groups"] == [[4, 5]] and rec["metrics"]["groups"] == [[0, 1]]
    heal = share["metrics"]["healing"]
    assert heal["steps"] == 3 and len(heal["loss_curve"]) == 3
    model = report["model"]
    assert model["read_bytes_after"] > model["bytes_after"]  # shared tensors are read more than once
    assert model["bytes_after"] < model["bytes_before"]
    html = (artifact / "report.html").read_text()
    assert "<polyline" in html and "healing loss" in html and "total: once per reader" in html


def test_artifact_loads_back_with_each_shared_tensor_once(artifact: Path) -> None:
    from safetensors import safe_open

    art = ctc.load(artifact)
    shared = [k for k in art.module.params if ".shared_4_5." in k or ".loop_0_1." in k]
    assert len(shared) == 12  # 6 tied matrices per group
    with safe_open(str(artifact / "params.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(art.module.params)
    assert art.module.op_counts()["lowrank_linear"] == 12
    ids = torch.tensor([[101, 7592, 2088, 102]])
    feed = {v.name: (ids if v.name == "input_ids" else torch.ones_like(ids) if "mask" in v.name
                     else torch.zeros_like(ids)) for v in art.module.inputs}
    from ctc.ir.interpreter import interpret

    torch.testing.assert_close(art.run(feed)[0], interpret(art.module, feed)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_tying_and_rptq_recipe_builds_for_the_cpu(tmp_path: Path) -> None:
    """examples/minilm_tied_w8a8_cpu.ctc: both tying passes, RPTQ and a TVM CPU build in one recipe."""
    recipe = Path(__file__).parents[1] / "examples" / "minilm_tied_w8a8_cpu.ctc"
    out = tmp_path / "tied"
    assert main(["compile", str(recipe), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    (cpu,) = report["targets"]
    assert cpu["measured"]["vs_ir"]["cosine"] > 0.999 and cpu["int_kernels"] > 0
    art = ctc.load(out)
    readers: dict[str, set[int]] = {}
    for n in art.module.nodes:
        if n.op == "quant_linear":
            q = n.operand("qweight")
            assert q is not None and q.producer is not None
            readers.setdefault(q.producer.attrs["name"], set()).add(n.block)
    assert sorted(len(b) for b in readers.values() if len(b) > 1) == [2] * 6 + [3] * 6  # tied weights, once each
