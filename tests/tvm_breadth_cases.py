"""TVM lowering cases for the Core ATen breadth, vision and state-space ops (issue 16).

Each case: (name, op, family, builder(m, inputs) -> Value | list[Value]).  A family shares one
compiled module and one set of inputs (see :data:`FAMILY_INPUTS`).  ``test_tvm_cpu`` checks
that every registered op has a case here or in its own list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ctc.ir import Module, TensorType, Value

Builder = Callable[[Module, dict[str, Value]], Any]
CASES: list[tuple[str, str, str, Builder]] = []

SEQ = 5
# family -> list of (input name, symbolic type, concrete tensor factory(seed))
FAMILY_INPUTS: dict[str, list[tuple[str, TensorType, Callable[[torch.Generator], torch.Tensor]]]] = {
    "math": [("x", TensorType((2, "s", 8), "f32"), lambda g: torch.randn(2, SEQ, 8, generator=g) * 2),
             ("y", TensorType((2, "s", 8), "f32"), lambda g: torch.randn(2, SEQ, 8, generator=g) * 2),
             ("ids", TensorType((2, "s"), "i64"), lambda g: torch.randint(-9, 10, (2, SEQ), generator=g))],
    "image": [("img", TensorType((2, 4, 9, 10), "f32"), lambda g: torch.randn(2, 4, 9, 10, generator=g))],
    # whole vectors of channels on a small plane: the channels-last convolutions (conv_kernels.py)
    "image_cl": [("fmap", TensorType((2, 32, 9, 10), "f32"), lambda g: torch.randn(2, 32, 9, 10, generator=g))],
    "signal": [("sig", TensorType((2, 4, "s"), "f32"), lambda g: torch.randn(2, 4, SEQ + 6, generator=g))],
    "signal_static": [("wave", TensorType(("b", 4, 300), "f32"), lambda g: torch.randn(2, 4, 300, generator=g))],
}
FAMILY_SEQ = {"math": SEQ, "image": SEQ, "image_cl": SEQ, "signal": SEQ + 6, "signal_static": SEQ}


def case(name: str, op: str, family: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        CASES.append((name, op, family, fn))
        return fn

    return deco


def n(m: Module, op: str, ins: list[Value], **attrs: Any) -> Value:
    return m.create_node(op, ins, attrs).output


def outs(m: Module, op: str, ins: list[Value], **attrs: Any) -> list[Value]:
    return list(m.create_node(op, ins, attrs).outputs)


def p(m: Module, name: str, t: torch.Tensor) -> Value:
    m.add_param(name, t)
    return m.param(name)


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pos(m: Module, v: Value, shift: float = 0.5) -> Value:
    return n(m, "add", [n(m, "abs", [v])], scalar=shift)


def _unit(m: Module, v: Value) -> Value:  # values in (-1, 1)
    return n(m, "tanh", [v])


# --- math ---------------------------------------------------------------------------------
for _op in ("atan", "asinh", "cosh", "sinh", "sign", "floor", "ceil", "trunc", "expm1", "hardswish", "hardsigmoid",
            "mish"):
    case(_op, _op, "math")(lambda m, v, _op=_op: n(m, _op, [v["x"]]))
for _op in ("asin", "acos", "atanh"):
    case(_op, _op, "math")(lambda m, v, _op=_op: n(m, _op, [n(m, "mul", [_unit(m, v["x"])], scalar=0.9)]))
case("tan", "tan", "math")(lambda m, v: n(m, "tan", [_unit(m, v["x"])]))
case("acosh", "acosh", "math")(lambda m, v: n(m, "acosh", [_pos(m, v["x"], 1.1)]))
for _op in ("log1p", "log2", "log10"):
    case(_op, _op, "math")(lambda m, v, _op=_op: n(m, _op, [_pos(m, v["x"], 0.01)]))
case("expm1_small", "expm1", "math")(lambda m, v: n(m, "expm1", [n(m, "mul", [v["x"]], scalar=1e-4)]))
case("round", "round", "math")(lambda m, v: n(m, "round", [n(m, "mul", [v["x"]], scalar=2.0)]))
case("round_half", "round", "math")(lambda m, v: n(m, "round", [n(m, "add", [n(m, "floor", [v["x"]])], scalar=0.5)]))
case("round_int", "round", "math")(lambda m, v: n(m, "round", [v["ids"]]))
case("sign_int", "sign", "math")(lambda m, v: n(m, "sign", [v["ids"]]))
case("isnan", "isnan", "math")(lambda m, v: n(m, "isnan", [n(m, "log", [v["x"]])]))
case("isinf", "isinf", "math")(lambda m, v: n(m, "isinf", [n(m, "div", [v["x"], n(m, "floor", [v["y"]])])]))
case("isnan_int", "isnan", "math")(lambda m, v: n(m, "isnan", [v["ids"]]))
case("softplus", "softplus", "math")(lambda m, v: n(m, "softplus", [v["x"]], beta=2.0, threshold=3.0))
case("elu", "elu", "math")(lambda m, v: n(m, "elu", [v["x"]], alpha=0.7, scale=1.2, input_scale=0.5))
case("leaky_relu", "leaky_relu", "math")(lambda m, v: n(m, "leaky_relu", [v["x"]], negative_slope=0.1))
case("atan2", "atan2", "math")(lambda m, v: n(m, "atan2", [v["x"], v["y"]]))
for _op in ("fmod", "remainder", "floor_divide", "trunc_divide"):
    case(_op, _op, "math")(lambda m, v, _op=_op: n(m, _op, [v["x"], n(m, "mul", [v["y"]], scalar=0.7)]))
    case(f"{_op}_int", _op, "math")(lambda m, v, _op=_op: n(m, _op, [v["ids"]], scalar=4.0))
    case(f"{_op}_int_rev", _op, "math")(lambda m, v, _op=_op: n(
        m, _op, [n(m, "add", [n(m, "abs", [v["ids"]])], scalar=1.0)], scalar=-7.0, reverse=True))
for _op in ("bitwise_and", "bitwise_or", "bitwise_xor"):
    case(_op, _op, "math")(lambda m, v, _op=_op: n(m, _op, [v["ids"], n(m, "mul", [v["ids"]], scalar=3.0)]))
    case(f"{_op}_bool", _op, "math")(lambda m, v, _op=_op: n(m, _op, [n(m, "gt", [v["x"], v["y"]]),
                                                                      n(m, "gt", [v["x"]], scalar=0.0)]))
case("bitwise_not", "bitwise_not", "math")(lambda m, v: n(m, "bitwise_not", [v["ids"]]))
case("logical_xor", "logical_xor", "math")(lambda m, v: n(m, "logical_xor", [v["x"], n(m, "floor", [v["y"]])]))
case("prod", "prod", "math")(lambda m, v: n(m, "prod", [_unit(m, v["x"])], axes=(2,)))
case("prod_int", "prod", "math")(lambda m, v: n(m, "prod", [v["ids"]], axes=(0,), keepdim=True))
case("any", "any", "math")(lambda m, v: n(m, "any", [n(m, "gt", [v["x"]], scalar=1.5)], axes=(2,)))
case("all", "all", "math")(lambda m, v: n(m, "all", [n(m, "gt", [v["x"]], scalar=-1.5)], axes=(1, 2), keepdim=True))
case("any_int", "any", "math")(lambda m, v: n(m, "any", [v["ids"]], axes=(1,)))
case("cumprod", "cumprod", "math")(lambda m, v: n(m, "cumprod", [_unit(m, v["x"])], axis=1))
case("cumprod_int", "cumprod", "math")(lambda m, v: n(m, "cumprod", [v["ids"]], axis=1))
case("argmin", "argmin", "math")(lambda m, v: n(m, "argmin", [v["x"]], axes=(2,)))
case("topk", "topk", "math")(lambda m, v: outs(m, "topk", [v["x"]], k=3, axis=2))
case("topk_small", "topk", "math")(lambda m, v: outs(m, "topk", [v["x"]], k=2, axis=2, largest=False))
case("sort", "sort", "math")(lambda m, v: outs(m, "sort", [v["x"]], axis=2))
case("sort_desc", "sort", "math")(lambda m, v: outs(m, "sort", [v["x"]], axis=0, descending=True))
case("flip", "flip", "math")(lambda m, v: n(m, "flip", [v["x"]], axes=(1, 2)))
case("index_axis2", "index", "math")(lambda m, v: n(
    m, "index", [v["x"], p(m, "ix", torch.tensor([[-2, 3], [0, 7]]))], axes=(2,)))
case("index_split_axes", "index", "math")(lambda m, v: n(
    m, "index", [v["x"], p(m, "i0", torch.tensor([1, 0, -1])), p(m, "i2", torch.tensor([5, -8, 2]))], axes=(0, 2)))
case("index_leading_neg", "index", "math")(lambda m, v: n(m, "index", [v["x"], p(m, "i3", torch.tensor([[-1], [0]]))]))
case("scatter", "scatter", "math")(lambda m, v: n(
    m, "scatter", [v["x"], p(m, "si", torch.tensor([[[1, 0, 7, 2]]] * 2)), n(m, "slice", [v["y"]], axis=2, start=(0,),
                                                                                   end=(4,))], axis=2))
case("scatter_value", "scatter", "math")(lambda m, v: n(
    m, "scatter", [v["x"], p(m, "si2", torch.tensor([[[3], [1]]] * 2))], axis=2, value=-3.0))
for _red in ("sum", "prod", "amax", "amin", "mean"):
    for _inc in (True, False):
        case(f"scatter_{_red}_{_inc}", "scatter", "math")(lambda m, v, _red=_red, _inc=_inc: n(
            m, "scatter", [v["x"], p(m, f"sr_{_red}_{_inc}", torch.tensor([[[1, 1, 4, 1, 0, 4]]] * 2)),
                           n(m, "slice", [v["y"]], axis=2, start=(0,), end=(6,))],
            axis=2, reduce=_red, include_self=_inc))
case("index_put", "index_put", "math")(lambda m, v: n(
    m, "index_put", [v["x"], n(m, "slice", [v["y"]], axis=0, start=(0,), end=(1,)), p(m, "ip", torch.tensor([-1]))]))
case("index_put_acc", "index_put", "math")(lambda m, v: n(
    m, "index_put", [v["x"], p(m, "ipv", torch.tensor([1.5])), p(m, "ip2", torch.tensor([2, 5, 2]))], axes=(2,),
    accumulate=True))
case("index_put_split", "index_put", "math")(lambda m, v: n(
    m, "index_put", [v["x"], p(m, "ipv3", torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]])),
                     p(m, "ia", torch.tensor([[0], [1]])), p(m, "ib", torch.tensor([[3, -1]]))], axes=(0, 2)))
case("slice_scatter", "slice_scatter", "math")(lambda m, v: n(
    m, "slice_scatter", [v["x"], n(m, "slice", [v["y"]], axis=2, start=(0,), end=(3,))], axis=2, start=(1,), end=(7,),
    step=2))
case("slice_scatter_seq", "slice_scatter", "math")(lambda m, v: n(
    m, "slice_scatter", [v["x"], n(m, "slice", [v["y"]], axis=1, start=(1,), end=("s",))], axis=1, start=(0,),
    end=("s - 1",)))


# --- image ------------------------------------------------------------------------------
def _w(m: Module, name: str, *shape: int, seed: int) -> Value:
    return p(m, name, torch.randn(*shape, generator=g(seed)) * 0.3)


case("conv2d", "conv", "image")(lambda m, v: n(
    m, "conv", [v["img"], _w(m, "cw", 6, 4, 3, 3, seed=1), _w(m, "cb", 6, seed=2)], stride=(1, 1), padding=(1, 1),
    dilation=(1, 1)))
case("conv2d_strided_dilated", "conv", "image")(lambda m, v: n(
    m, "conv", [v["img"], _w(m, "cw2", 6, 2, 3, 2, seed=3)], stride=(2, 1), padding=(0, 1), dilation=(2, 1), groups=2))
case("conv2d_depthwise", "conv", "image")(lambda m, v: n(
    m, "conv", [v["img"], _w(m, "dw", 4, 1, 3, 3, seed=4), _w(m, "db", 4, seed=5)], stride=(2, 2), padding=(1, 1),
    dilation=(1, 1), groups=4))
case("conv2d_pointwise", "conv", "image")(lambda m, v: n(
    m, "conv", [v["img"], _w(m, "pw", 7, 4, 1, 1, seed=6)], stride=(1, 1), padding=(0, 0), dilation=(1, 1)))
case("conv2d_transposed", "conv", "image")(lambda m, v: n(
    m, "conv", [v["img"], _w(m, "tw", 4, 3, 3, 3, seed=7), _w(m, "tb", 3, seed=8)], stride=(2, 2), padding=(1, 1),
    dilation=(1, 1), transposed=True, output_padding=(1, 0)))
case("conv_epilogue_relu6_residual", "conv", "image")(lambda m, v: n(m, "hardswish", [n(
    m, "add", [v["img"], n(m, "minimum", [n(m, "maximum", [n(
        m, "conv", [v["img"], _w(m, "ew", 4, 4, 3, 3, seed=30), _w(m, "eb", 4, seed=31)], stride=(1, 1),
        padding=(1, 1), dilation=(1, 1))], scalar=0.0)], scalar=6.0)])]))
case("conv_pointwise_epilogue", "conv", "image")(lambda m, v: n(m, "sub", [n(m, "relu", [n(
    m, "conv", [v["img"], _w(m, "pe", 4, 4, 1, 1, seed=32), _w(m, "pb", 4, seed=33)], stride=(1, 1),
    padding=(0, 0), dilation=(1, 1))]), n(m, "mul", [v["img"]], scalar=0.5)]))
case("conv_depthwise_epilogue", "conv", "image")(lambda m, v: n(m, "div", [n(m, "hardsigmoid", [n(
    m, "conv", [n(m, "pad", [v["img"]], pads=(0, 1, 0, 1)), _w(m, "de", 4, 1, 3, 3, seed=34)], stride=(2, 2),
    padding=(0, 0), dilation=(1, 1), groups=4)])], scalar=2.0, reverse=True))
# 5x5 depthwise kernels take the flat-plane stencil (ConvSpec.depthwise_flat): strides, dilation, an
# absorbed asymmetric pad, an epilogue; the 3x3 ones above take the direct stencil
case("conv2d_depthwise_flat", "conv", "image")(lambda m, v: n(
    m, "conv", [v["img"], _w(m, "df", 4, 1, 5, 5, seed=35), _w(m, "dfb", 4, seed=36)], stride=(1, 1),
    padding=(2, 2), dilation=(1, 1), groups=4))
case("conv2d_depthwise_flat_strided_dilated", "conv", "image")(lambda m, v: n(m, "relu", [n(
    m, "conv", [n(m, "pad", [v["img"]], pads=(1, 3, 0, 2)), _w(m, "dg", 4, 1, 5, 5, seed=37)], stride=(2, 1),
    padding=(1, 0), dilation=(1, 2), groups=4)]))
case("conv2d_depthwise_flat_s2", "conv", "image")(lambda m, v: n(
    m, "conv", [v["img"], _w(m, "dh", 4, 1, 5, 5, seed=38)], stride=(2, 2), padding=(4, 4), dilation=(2, 2),
    groups=4))


def _relu6(m: Module, v: Value) -> Value:
    return n(m, "minimum", [n(m, "maximum", [v], scalar=0.0)], scalar=6.0)


def _cl_block(m: Module, v: dict[str, Value]) -> list[Value]:
    """Inverted residual in channels-last: expand (input read channels-first), depthwise 5x5 behind an
    absorbed asymmetric pad, project with a residual from the expansion (a channels-last value),
    then a global average pool (a non-convolution reader of a channels-last result)."""
    x = v["fmap"]
    e = _relu6(m, n(m, "conv", [x, _w(m, "cle", 64, 32, 1, 1, seed=40), _w(m, "cleb", 64, seed=41)],
                    stride=(1, 1), padding=(0, 0), dilation=(1, 1)))
    d = n(m, "relu", [n(m, "conv", [n(m, "pad", [e], pads=(1, 1, 2, 0)), _w(m, "cld", 64, 1, 5, 5, seed=42),
                                    _w(m, "cldb", 64, seed=43)], stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                        groups=64)])
    pr = n(m, "add", [n(m, "conv", [e, _w(m, "clp", 64, 64, 1, 1, seed=44)], stride=(1, 1), padding=(0, 0),
                        dilation=(1, 1)), n(m, "add", [d, e])])
    pooled = n(m, "adaptive_avg_pool", [n(m, "hardswish", [pr])], output_size=(1, 1))
    return [pr, pooled]


case("conv_channels_last_block", "conv", "image_cl")(_cl_block)
# a strided depthwise convolution reading a channels-first input (its padded plane transposes), no bias
case("conv_channels_last_dw_s2", "conv", "image_cl")(lambda m, v: n(
    m, "conv", [v["fmap"], _w(m, "cls", 32, 1, 3, 3, seed=45)], stride=(2, 2), padding=(1, 1), dilation=(2, 1),
    groups=32))
case("batch_norm", "batch_norm", "image")(lambda m, v: n(
    m, "batch_norm", [v["img"], _w(m, "bm", 4, seed=9), p(m, "bv", torch.rand(4, generator=g(10)) + 0.5),
                      _w(m, "bw", 4, seed=11), _w(m, "bb", 4, seed=12)], eps=1e-3))
case("group_norm", "group_norm", "image")(lambda m, v: n(
    m, "group_norm", [v["img"], _w(m, "gw", 4, seed=13), _w(m, "gb", 4, seed=14)], groups=2))
case("max_pool", "max_pool", "image")(lambda m, v: n(
    m, "max_pool", [v["img"]], kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1)))
case("max_pool_ceil", "max_pool", "image")(lambda m, v: n(
    m, "max_pool", [v["img"]], kernel=(2, 3), stride=(2, 2), padding=(0, 1), dilation=(1, 1), ceil_mode=True))
case("avg_pool", "avg_pool", "image")(lambda m, v: n(
    m, "avg_pool", [v["img"]], kernel=(3, 3), stride=(2, 2), padding=(1, 1)))
case("avg_pool_ceil_nopad", "avg_pool", "image")(lambda m, v: n(
    m, "avg_pool", [v["img"]], kernel=(2, 3), stride=(2, 2), padding=(1, 1), ceil_mode=True, count_include_pad=False))
case("avg_pool_divisor", "avg_pool", "image")(lambda m, v: n(
    m, "avg_pool", [v["img"]], kernel=(2, 2), stride=(2, 2), padding=(0, 0), divisor_override=3))
case("adaptive_avg_pool_global", "adaptive_avg_pool", "image")(lambda m, v: n(
    m, "adaptive_avg_pool", [v["img"]], output_size=(1, 1)))
case("adaptive_avg_pool", "adaptive_avg_pool", "image")(lambda m, v: n(
    m, "adaptive_avg_pool", [v["img"]], output_size=(4, 3)))
case("adaptive_max_pool", "adaptive_max_pool", "image")(lambda m, v: n(
    m, "adaptive_max_pool", [v["img"]], output_size=(4, 3)))
for _mode in ("constant", "reflect", "replicate", "circular"):
    case(f"pad_{_mode}", "pad", "image")(lambda m, v, _mode=_mode: n(
        m, "pad", [v["img"]], pads=(1, 2, 3, 0), mode=_mode, **({"value": -2.0} if _mode == "constant" else {})))
case("resize_nearest", "resize", "image")(lambda m, v: n(m, "resize", [v["img"]], size=(18, 20)))
case("resize_nearest_down", "resize", "image")(lambda m, v: n(m, "resize", [v["img"]], size=(4, 7)))
case("resize_nearest_exact", "resize", "image")(lambda m, v: n(m, "resize", [v["img"]], size=(13, 6),
                                                                mode="nearest-exact"))
case("resize_bilinear", "resize", "image")(lambda m, v: n(m, "resize", [v["img"]], size=(18, 20), mode="linear",
                                                           scales=(2.0, 2.0)))
case("resize_bilinear_ac", "resize", "image")(lambda m, v: n(m, "resize", [v["img"]], size=(11, 7), mode="linear",
                                                              align_corners=True))
case("resize_bicubic", "resize", "image")(lambda m, v: n(m, "resize", [v["img"]], size=(14, 15), mode="cubic"))


# --- signal (symbolic length) -------------------------------------------------------------
case("conv1d", "conv", "signal")(lambda m, v: n(
    m, "conv", [v["sig"], _w(m, "c1", 6, 2, 3, seed=20), _w(m, "c1b", 6, seed=21)], stride=(1,), padding=(2,),
    dilation=(2,), groups=2))
case("conv1d_strided", "conv", "signal")(lambda m, v: n(
    m, "conv", [v["sig"], _w(m, "c2", 3, 4, 4, seed=22)], stride=(2,), padding=(1,), dilation=(1,)))
case("conv1d_depthwise_flat", "conv", "signal_static")(lambda m, v: n(
    m, "conv", [v["wave"], _w(m, "c3", 4, 1, 15, seed=23), _w(m, "c3b", 4, seed=24)], stride=(2,), padding=(7,),
    dilation=(1,), groups=4))
case("max_pool1d", "max_pool", "signal")(lambda m, v: n(
    m, "max_pool", [v["sig"]], kernel=(3,), stride=(2,), padding=(1,), dilation=(1,)))
case("pad1d_reflect", "pad", "signal")(lambda m, v: n(m, "pad", [v["sig"]], pads=(2, 3), mode="reflect"))
case("resize1d_linear", "resize", "signal")(lambda m, v: n(m, "resize", [v["sig"]], size=("2*s",), mode="linear",
                                                            scales=(2.0,)))
case("resize1d_nearest_sym", "resize", "signal")(lambda m, v: n(m, "resize", [v["sig"]], size=("2*s + 1",)))
case("selective_scan", "selective_scan", "signal")(lambda m, v: n(
    m, "selective_scan", [v["sig"], n(m, "softplus", [v["sig"]]),
                          n(m, "neg", [n(m, "exp", [_w(m, "A", 4, 3, seed=23)])]),
                          n(m, "slice", [v["sig"]], axis=1, start=(0,), end=(3,)),
                          n(m, "slice", [v["sig"]], axis=1, start=(1,), end=(4,))]))

FAMILIES = sorted({c[2] for c in CASES})
