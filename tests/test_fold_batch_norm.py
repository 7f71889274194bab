"""``fold-batch-norm``: batch norms after convolutions (plain, grouped, transposed) and 2-d linears
disappear, outputs stay equal, and nothing is folded where it would change the program."""

from __future__ import annotations

import torch
from torch import nn

from ctc.frontends import capture
from ctc.ir import interpret
from ctc.passes import Selector, get_pass
from ctc.passes.manager import PassManager, Step


def _bn(c: int, seed: int, dim: int = 2) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    bn = (nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d)(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), _bn(8, 1)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False), _bn(8, 2)
        self.c3, self.b3 = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), _bn(6, 3)
        self.fc, self.b4 = nn.Linear(6, 5), _bn(5, 4, dim=1)
        self.c5, self.b5 = nn.Conv2d(3, 4, 1), _bn(4, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.b1(self.c1(x)))
        h = self.b3(self.c3(self.b2(self.c2(h))))
        y = self.b4(self.fc(h.mean((2, 3))))
        shared = self.c5(x)  # read twice: folding would change the other reader
        return y, self.b5(shared) + shared.mean()


def _run(m, selector=None):
    step = Step(get_pass("fold-batch-norm")({}), selector or Selector())
    out, report = PassManager([step], progress=False, fidelity=False).run(m)
    return out, report.records[0]


def test_folds_and_keeps_outputs() -> None:
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    m = capture(net, {"x": x}, dynamic=False)
    assert m.op_counts()["batch_norm"] == 5
    ref = interpret(m, {"x": x})
    out, rec = _run(m)
    assert out.op_counts().get("batch_norm", 0) == 1  # only the norm of the shared conv stays
    assert rec.rewrites["patterns"] == {"fold-into-producer": 4}
    got = interpret(out, {"x": x})
    with torch.no_grad():
        eager = net(x)
    for a, b, e in zip(got, ref, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    assert not any(k.startswith("b1.") for k in out.params), "the folded norm's parameters are gone"
    assert "c1.weight.bn_folded" in out.params and "c1.weight" not in out.params


def test_selector_limits_the_fold() -> None:
    net = Net().eval()
    m = capture(net, {"x": torch.randn(1, 3, 8, 8)}, dynamic=False)
    out, rec = _run(m, Selector(scopes=("b1",)))
    assert out.op_counts()["batch_norm"] == 4 and rec.rewrites["patterns"] == {"fold-into-producer": 1}
