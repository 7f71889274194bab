"""Core ATen coverage: every op torch tags as Core ATen is mapped, decomposed, or listed with its
reason; models using the ops vision, audio and mixture-of-experts code calls capture and match
eager through the interpreter (static and symbolic shapes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctc.frontends import CaptureError, capture
from ctc.frontends import aten_map as A
from ctc.frontends.core_aten import NOT_SUPPORTED, core_aten_ops, decomposition_table
from ctc.ir.interpreter import interpret


def test_every_core_aten_op_is_mapped_decomposed_or_listed() -> None:
    ops = core_aten_ops()
    assert len(ops) > 150, "torch's Core ATen opset looks empty; did the tag change?"
    decomposed = {str(k) for k in decomposition_table()}
    missing = [o for o in ops if not (A.supported(o) or o in decomposed or o in NOT_SUPPORTED)]
    assert not missing, f"Core ATen ops with no mapping, decomposition or listed reason: {missing}"
    stale = sorted(set(NOT_SUPPORTED) & set(A.TABLE))
    assert not stale, f"ops both mapped and listed as unsupported: {stale}"
    for op, why in NOT_SUPPORTED.items():
        assert len(why) > 20, f"{op}: give a reason and what to do instead"


def test_mapped_ops_are_kept_whole_by_the_decomposition() -> None:
    table = decomposition_table()
    kept = [str(k) for k in table if str(k) in A.TABLE]
    assert not kept, f"ops ctc maps would be decomposed: {kept}"
    for name in ("aten.linear.default", "aten.scaled_dot_product_attention.default", "aten.layer_norm.default",
                 "aten.conv2d.default", "aten.hardswish.default", "aten.rms_norm.default"):
        assert name in A.TABLE


class Breadth(nn.Module):
    """Ops of vision, audio and MoE models, most of them not in ``aten_map``'s transformer table."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv1d(5, 5, 3, groups=5, padding=2)
        self.refl = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.up = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> list[torch.Tensor]:
        y = F.hardswish(self.bn(self.conv(x)))
        z = x.clone()
        z[:, 1] = 3.0
        z2 = x.clone()
        z2[:, :, [0, 2]] += 1.0
        return [
            y, F.adaptive_avg_pool2d(y, 1).flatten(1), F.hardsigmoid(x), F.softplus(x), F.relu6(x), F.mish(x),
            F.elu(x), F.leaky_relu(x), F.selu(x), x.repeat_interleave(2, dim=1), x.repeat(1, 2, 1, 1),
            torch.stack([x, x]), F.adaptive_avg_pool2d(x, (2, 3)), F.max_pool2d(x, 2), F.avg_pool2d(x, 2),
            F.pad(x, (1, 1, 2, 2), mode="reflect"), F.interpolate(x, scale_factor=2, mode="bilinear"),
            F.interpolate(x, size=(5, 7), mode="nearest"), F.group_norm(x, 2), torch.baddbmm(q, q, q.transpose(-1, -2)),
            self.dw(q[0].transpose(0, 1)), F.logsigmoid(x), x.flip(-1), torch.roll(x, 1, -1), F.glu(x, 1),
            F.instance_norm(x), F.pixel_shuffle(x.repeat(1, 4, 1, 1), 2), x.var(-1), x.std(-1), torch.topk(x, 2)[0],
            torch.sort(x, -1)[1], torch.cumprod(x, 1), x.unfold(3, 3, 2), torch.all(x > 0, 1), x.max(1).values,
            x.max(1).indices, F.adaptive_max_pool2d(x, 3), F.normalize(x, dim=1), self.refl(x), self.up(x),
            x.diagonal(1, 2, 3), torch.fmod(x, 0.7), torch.remainder(x, 0.7), x // 0.3,
            torch.div(x, 0.3, rounding_mode="trunc"), x.sign(), x.round(), torch.atan2(x, x.flip(0)),
            torch.where(x > 0, x, 0.5), x[..., [-2], :], x[:, [0, 1], :, [2, 3]],
            F.embedding(torch.tensor([[1, 2]]), q[0]),
            z, z2, torch.zeros(2, 5).scatter_add(1, torch.tensor([[0, 1, 0], [4, 4, 2]]), q[0, :2, :3]),
        ]


def _check(m: nn.Module, inputs: dict[str, torch.Tensor], dynamic: object, runs: list[dict[str, torch.Tensor]]) -> None:
    mod = capture(m, inputs, dynamic=dynamic)
    for ins in runs:
        with torch.no_grad():
            ref = m(**ins)
        ref = [ref] if isinstance(ref, torch.Tensor) else ref
        got = interpret(mod, ins)
        assert len(got) == len(ref)
        for i, (a, b) in enumerate(zip(got, ref, strict=True)):
            assert a.shape == b.shape and a.dtype == b.dtype, (i, a.shape, b.shape, a.dtype, b.dtype)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda s, i=i: f"output {i}: {s}")


def test_breadth_module_matches_eager() -> None:
    torch.manual_seed(0)
    m = Breadth().eval()
    x, q = torch.randn(1, 4, 8, 8), torch.randn(2, 5, 5)
    _check(m, {"x": x, "q": q}, False, [{"x": x, "q": q}])


class Signal(nn.Module):
    """An audio front end over a symbolic length: strided conv, GELU, group norm, pooling, upsampling."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 5, stride=2, padding=2)
        self.norm = nn.GroupNorm(4, 8)
        self.c2 = nn.Conv1d(8, 8, 3, padding=1, padding_mode="replicate")

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.norm(self.c1(wav)))
        h = self.c2(F.max_pool1d(h, 2, 2)) + F.avg_pool1d(h, 2, 2)
        return F.interpolate(h, scale_factor=2.0, mode="linear") + F.pad(h, (0, 0)).repeat_interleave(2, dim=2)


def test_symbolic_length_audio_front_end() -> None:
    torch.manual_seed(0)
    m = Signal().eval()
    g = torch.Generator().manual_seed(1)
    runs = [{"wav": torch.randn(2, 3, n, generator=g)} for n in (32, 44, 52)]
    _check(m, runs[0], {"wav": {2: "samples"}}, runs)


def test_unsupported_core_ops_give_their_reason() -> None:
    class Noise(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.randn(x.shape)

    with pytest.raises(CaptureError, match=r"aten\.randn\.default \(1x\) at <root> .*random numbers at inference"):
        capture(Noise(), {"x": torch.randn(2, 3)}, dynamic=False)
