"""Convolutions on small planes run channels-last, and the layout carries between them.

``conv_kernels.channels_last_pays``: a pointwise or depthwise 2-d convolution with at most
``CHANNELS_LAST_MAX_PLANE`` output positions and whole vectors of channels computes ``[N, H, W, C]``;
the next such convolution reads that form directly, and the channels-first transpose of a value
that only channels-last convolutions read is dead code that no compiled kernel computes.  The
numerics of these kernels are checked against the interpreter in ``test_tvm_breadth_ops``
(family ``image_cl``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from ctc.ir import Module, TensorType, Value  # noqa: E402


def _conv(m: Module, x: Value, name: str, cout: int, cin_g: int, k: int, groups: int = 1, seed: int = 0,
          stride: int = 1) -> Value:
    g = torch.Generator().manual_seed(seed)
    m.add_param(name, torch.randn(cout, cin_g, k, k, generator=g) * 0.2)
    m.add_param(name + ".b", torch.randn(cout, generator=g) * 0.1)
    y = m.create_node("conv", [x, m.param(name), m.param(name + ".b")],
                      {"stride": (stride, stride), "padding": (k // 2, k // 2), "dilation": (1, 1),
                       "groups": groups}).output
    return m.create_node("relu", [y], {}).output


def _block(plane: int, stride: int = 1) -> Module:
    """expand 1x1 -> depthwise 3x3 -> project 1x1 on a ``plane x plane`` map of 32 channels."""
    m = Module("cl_block")
    x = m.add_input("x", TensorType((1, 32, plane, plane), "f32"))
    e = _conv(m, x, "e", 64, 32, 1, seed=1)
    d = _conv(m, e, "d", 64, 1, 3, groups=64, seed=2, stride=stride)
    m.set_outputs([_conv(m, d, "p", 32, 64, 1, seed=3)], ["y"])
    return m


def _callees(m: Module) -> list[str]:
    import tvm
    from tvm import relax

    from ctc.backends.tvm import targets as T
    from ctc.backends.tvm.build import relax_passes
    from ctc.backends.tvm.lower import lower

    tgt = T.resolve("cpu", None).target()
    with tgt, tvm.transform.PassContext(opt_level=3):
        mod = relax_passes(tgt)(lower(m, target=tgt).mod)
    return [b.value.args[0].name_hint for blk in mod["main"].body.blocks for b in blk.bindings
            if isinstance(b.value, relax.Call) and b.value.op.name == "relax.call_tir"]


def test_small_plane_block_runs_channels_last_with_one_transpose() -> None:
    calls = _callees(_block(7))
    assert sum("nhwc" in c for c in calls) == 3, calls
    # only the module output is turned back to channels-first; the two intermediate transposes are dead
    assert sum("transpose" in c for c in calls) == 1, calls


def test_expansion_feeding_a_small_plane_depthwise_runs_channels_last() -> None:
    # the 16x16 expansion's only reader is a strided depthwise with an 8x8 output: computing the
    # expansion channels-last spares the depthwise a transposing copy of its input
    calls = _callees(_block(16, stride=2))
    assert sum("nhwc" in c for c in calls) == 3, calls
    assert sum("transpose" in c for c in calls) == 1, calls


def test_large_plane_block_stays_channels_first() -> None:
    calls = _callees(_block(16))  # 256 positions > CHANNELS_LAST_MAX_PLANE
    assert not any("nhwc" in c or "transpose" in c for c in calls), calls


def test_symbolic_batch_block_matches_interpreter() -> None:
    """A symbolic batch, a 5x5 depthwise and a residual read from the channels-first input."""
    from test_tvm_cpu import _run

    from ctc.ir.interpreter import interpret

    m = Module("cl_symbolic_batch")
    x = m.add_input("x", TensorType(("b", 32, 7, 7), "f32"))
    d = _conv(m, _conv(m, x, "e", 64, 32, 1, seed=1), "d", 64, 1, 5, groups=64, seed=2)
    m.set_outputs([m.create_node("add", [_conv(m, d, "p", 32, 64, 1, seed=3), x], {}).output], ["y"])
    assert sum("nhwc" in c for c in _callees(m)) == 3
    inputs = [torch.randn(3, 32, 7, 7, generator=torch.Generator().manual_seed(4))]
    ref, got = interpret(m, inputs)[0], _run(m, inputs)[0]
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5
