"""A CNN goes from a recipe to the TVM CPU library and computes what eager PyTorch computes.

The network is EfficientNet-shaped (the issue-16 benchmark's model, benchmarks/cnn_latency.py):
a strided stem with TensorFlow-style "same" padding, batch norms, ReLU6, depthwise 3x3 and 5x5
convolutions (strided, the direct and the flat-plane stencils), pointwise expansions and
projections with a residual add, hard-swish, global average pooling and a classifier.  The
recipe folds the batch norms into the convolutions (``fold-batch-norm``) before the build, so
the test also shows that no batch norm reaches the backend.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import ctc
from ctc.cli import EXIT_OK, main

pytest.importorskip("tvm")


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, pad: int | None = None) -> nn.Sequential:
    p = k // 2 if pad is None else pad
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, p, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU6())


class _Block(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project (+ input when shapes allow)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int = 4):
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn(cin, mid, 1)
        self.dw = _conv_bn(mid, mid, k, stride, groups=mid)
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


class _TinyEfficientNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8, 3, 2, pad=0)  # "same" padding comes from the explicit F.pad below
        self.blocks = nn.Sequential(_Block(8, 8, 3, 1), _Block(8, 12, 3, 2), _Block(12, 12, 5, 1),
                                    _Block(12, 16, 5, 2))
        self.head = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(nn.functional.pad(x, (0, 1, 0, 1)))
        x = nn.functional.hardswish(self.head(self.blocks(x)))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def _randomize_bn(model: nn.Module, g: torch.Generator) -> None:
    """Non-trivial running statistics, so that folding them is visible in the result."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def test_cnn_recipe_compiles_and_matches_eager(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = _TinyEfficientNet().eval()
    _randomize_bn(model, g)
    x = torch.randn(1, 3, 40, 40, generator=g)
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "cnn.pt2"))
    (tmp_path / "cnn.ctc").write_text('model pt2 "cnn.pt2"\npipeline {\n    fold-batch-norm\n    dce\n}\n'
                                      "target cpu threads=1\ncheck latency_ms <= 60000\n")
    out = tmp_path / "out"
    assert main(["compile", str(tmp_path / "cnn.ctc"), "--out", str(out), "--quiet"]) == EXIT_OK
    art = ctc.load(out)
    assert "batch_norm" not in (out / "ir.txt").read_text()
    # no text data to measure with: the library is still checked against the IR (and timed), on synthetic inputs
    # (it was neither, so a library computing garbage would have shipped with exit 0)
    measured = art.report["targets"][0]["measured"]
    assert measured["vs_ir"]["cosine"] > 0.99999 and measured["latency_ms"] > 0, measured
    assert "synthetic" in measured["protocol"] and art.report["metrics"]["target_fidelity"]["compressed"] > 0.99999
    # so is `check latency_ms` (it asked for an evaluate line, which a CNN cannot have)
    lat = art.report["metrics"]["latency_ms"]
    assert lat["compressed"] == measured["latency_ms"] and "synthetic" in lat["protocol"] and art.report["passed"]
    with torch.no_grad():
        ref = model(x)
    for target in (None, "cpu"):  # the reference interpreter on the artifact's IR, then the TVM library
        got = art.run([x], target=target)[0] if target else art.run([x])[0]
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err <= 1e-5, (target, err)
