"""Op library: each op's type inference agrees with its torch reference on random inputs, both
with static shapes and with the dim 5 made symbolic (``s``); invalid uses raise OpError."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ctc.ir import Module, OpError, TensorType, all_ops, interpret
from ctc.ir.symbolic import eval_dim
from ctc.ir.types import dtype_name

S = 5  # the dim made symbolic in the symbolic variant of each case

F, I, B = torch.float32, torch.int64, torch.bool  # noqa: E741


def spec(shape: tuple[int, ...], dtype: torch.dtype = F, kind: str = "randn") -> tuple:
    return (shape, dtype, kind)


def _make(shape: tuple[int, ...], dtype: torch.dtype, kind: str, g: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype == torch.int64:
        hi = int(kind.split(":")[1]) if kind.startswith("idx:") else 10
        return torch.randint(0, hi, shape, generator=g)
    if kind == "pos":
        return torch.rand(shape, generator=g) + 0.5
    return torch.randn(shape, generator=g)


# (op, inputs, attrs); the dim 5 stands for a symbolic sequence length in the symbolic variant.
CASES: list[tuple[str, list[tuple], dict[str, Any]]] = [
    *[(op, [spec((2, S, 3))], {}) for op in ("neg", "abs", "exp", "tanh", "sigmoid", "relu", "silu", "sin", "cos",
                                             "erf", "reciprocal")],
    *[(op, [spec((2, S, 3), kind="pos")], {}) for op in ("log", "sqrt", "rsqrt")],
    ("neg", [spec((2, S), I)], {}),
    ("gelu", [spec((2, S, 3))], {"approximate": "tanh"}),
    ("gelu", [spec((2, S, 3))], {}),
    ("logical_not", [spec((2, S), B)], {}),
    ("cast", [spec((2, S))], {"dtype": "i64"}),
    ("cast", [spec((2, S), I)], {"dtype": "f16"}),
    *[(op, [spec((2, S, 3)), spec((S, 1))], {}) for op in ("add", "sub", "mul", "maximum", "minimum")],
    ("div", [spec((2, S, 3)), spec((3,), kind="pos")], {}),
    ("pow", [spec((2, S, 3), kind="pos"), spec((1,))], {}),
    ("pow", [spec((2, S, 3))], {"scalar": 2.0}),
    ("sub", [spec((2, S))], {"scalar": 1.0, "reverse": True}),
    ("add", [spec((S,), I)], {"scalar": 3.0}),
    ("div", [spec((2, S), kind="pos")], {"scalar": 1.0, "reverse": True}),
    *[(op, [spec((2, S)), spec((1, S))], {}) for op in ("eq", "ne", "lt", "le", "gt", "ge")],
    ("ge", [spec((2, S), I)], {"scalar": 4.0}),
    ("logical_and", [spec((2, 1, S), B), spec((1, S, S), B)], {}),
    ("logical_or", [spec((2, S), B), spec((2, S), B)], {}),
    ("where", [spec((1, S), B), spec((2, S)), spec((2, 1))], {}),
    ("where", [spec((2, S), B), spec((2, S))], {"b_scalar": -1e9}),
    ("where", [spec((2, S), B), spec((2, S))], {"a_scalar": 0.0}),
    ("sum", [spec((2, S, 3))], {"axes": (1,), "keepdim": False}),
    ("sum", [spec((2, S), B)], {"axes": (0, 1), "keepdim": True}),
    ("mean", [spec((2, S, 3))], {"axes": (2,), "keepdim": True}),
    ("amax", [spec((2, S, 3))], {"axes": (0, 2)}),
    ("amin", [spec((2, S, 3))], {"axes": (1,)}),
    ("argmax", [spec((2, S, 3))], {"axes": (2,)}),
    ("softmax", [spec((2, S, 3))], {"axis": 2}),
    ("log_softmax", [spec((2, S, 3))], {"axis": 1}),
    ("cumsum", [spec((2, S), I)], {"axis": 1}),
    ("cumsum", [spec((2, S), B)], {"axis": 1}),
    ("cumsum", [spec((2, S))], {"axis": 0, "dtype": "f64"}),
    ("reshape", [spec((2, S, 6))], {"shape": (2, S, 2, 3)}),
    ("reshape", [spec((2, S, 6))], {"shape": (12, S)}),
    ("permute", [spec((2, S, 3, 4))], {"perm": (0, 2, 1, 3)}),
    ("transpose", [spec((2, S, 3))], {"dim0": 0, "dim1": 2}),
    ("expand", [spec((1, 1, S))], {"shape": (2, 3, S)}),
    ("expand", [spec((S, 1))], {"shape": (4, S, 3)}),
    ("unsqueeze", [spec((2, S))], {"axis": 2}),
    ("unsqueeze", [spec((2, S))], {"axis": 0}),
    ("squeeze", [spec((2, 1, S, 1))], {"axes": (1, 3)}),
    ("slice", [spec((2, S, 8))], {"axis": 2, "start": (1,), "end": (7,), "step": 2}),
    ("slice", [spec((2, S, 8))], {"axis": 1, "start": (1,), "end": (S,)}),
    ("slice", [spec((2, S, 8))], {"axis": 1, "start": (0,), "end": (S,), "step": 3}),
    ("concat", [spec((2, S, 3)), spec((2, S, 1)), spec((2, S, 2))], {"axis": 2}),
    ("concat", [spec((2, S)), spec((2, 3))], {"axis": 1}),
    ("gather", [spec((2, S, 3)), spec((2, 4, 3), I, "idx:5")], {"axis": 1}),
    ("index_select", [spec((S, 3)), spec((4,), I, "idx:3")], {"axis": 1}),
    ("index", [spec((3, S), B), spec((2, 1, 1), I, "idx:3"), spec((1, S), I, "idx:5")], {}),
    ("index", [spec((4, S, 3)), spec((2,), I, "idx:4")], {}),
    ("embedding", [spec((2, S), I, "idx:11"), spec((11, 4))], {}),
    ("embedding", [spec((2, S), I, "idx:11"), spec((11, 4))], {"padding_idx": 0}),
    ("arange", [], {"end": (S,)}),
    ("arange", [], {"start": (2,), "end": (S,), "dtype": "f32"}),
    ("arange", [], {"start": (1,), "end": (S,), "step": 2}),
    ("triu", [spec((S, S))], {"diagonal": 1}),
    ("tril", [spec((2, S, S), B)], {}),
    ("masked_fill", [spec((2, 3, S)), spec((1, S), B)], {"value": float("-inf")}),
    ("full", [], {"shape": (2, S), "value": 1.0, "dtype": "bool"}),
    ("linear", [spec((2, S, 6)), spec((4, 6)), spec((4,))], {}),
    ("linear", [spec((S, 6)), spec((4, 6))], {}),
    ("matmul", [spec((2, 3, S, 4)), spec((2, 3, 4, S))], {}),
    ("matmul", [spec((2, S, 4)), spec((4, 6))], {}),
    ("matmul", [spec((S, 4)), spec((4,))], {}),
    ("layer_norm", [spec((2, S, 6)), spec((6,)), spec((6,))], {"eps": 1e-12}),
    ("layer_norm", [spec((2, S, 6))], {}),
    ("layer_norm", [spec((2, S, 2, 3)), spec((2, 3))], {"normalized_ndim": 2}),
    ("rms_norm", [spec((2, S, 6)), spec((6,))], {"eps": 1e-6}),
    ("scaled_dot_product_attention", [spec((2, 4, S, 8)), spec((2, 4, S, 8)), spec((2, 4, S, 6))], {}),
    ("scaled_dot_product_attention", [spec((2, 4, S, 8))] * 3, {"is_causal": True, "scale": 0.5}),
    ("scaled_dot_product_attention", [spec((2, 4, S, 8)), spec((2, 2, S, 8)), spec((2, 2, S, 8)),
                                      spec((2, 1, S, S), B)], {"enable_gqa": True}),
    ("scaled_dot_product_attention", [spec((2, 4, S, 8)), spec((2, 4, 3, 8)), spec((2, 4, 3, 8)),
                                      spec((1, 1, S, 3))], {}),
    ("rotary_embedding", [spec((2, 4, S, 8)), spec((1, 1, S, 8)), spec((1, 1, S, 8))], {}),
    ("cache_write", [spec((2, 3, S, 4)), spec((2, 3, 1, 4)), spec((1,), torch.int64, "idx:5")], {"axis": 2}),
]

# Core ATen breadth (issue 16): more math, activations, reductions, ordering, scatter, vision, ssm.
CASES += [
    *[(op, [spec((2, S, 3))], {}) for op in ("atan", "asinh", "cosh", "sinh", "tan", "expm1", "floor", "ceil", "round",
                                             "trunc", "sign", "isnan", "isinf", "hardswish", "hardsigmoid", "mish")],
    *[(op, [spec((2, S, 3), kind="pos")], {}) for op in ("log1p", "log2", "log10")],
    *[(op, [spec((2, S))], {}) for op in ("asin", "acos", "atanh")],
    ("acosh", [spec((2, S), kind="pos")], {}),
    ("sign", [spec((2, S), I)], {}),
    ("softplus", [spec((2, S, 3))], {"beta": 2.0, "threshold": 1.0}),
    ("elu", [spec((2, S, 3))], {"alpha": 0.5, "scale": 1.5, "input_scale": 2.0}),
    ("leaky_relu", [spec((2, S, 3))], {"negative_slope": 0.2}),
    ("atan2", [spec((2, S)), spec((1, S))], {}),
    *[(op, [spec((2, S), kind="pos"), spec((2, S), kind="pos")], {}) for op in ("fmod", "remainder", "floor_divide",
                                                                               "trunc_divide")],
    ("remainder", [spec((2, S), I)], {"scalar": 3.0}),
    ("floor_divide", [spec((2, S), I)], {"scalar": 4.0}),
    *[(op, [spec((2, S), I), spec((1, S), I)], {}) for op in ("bitwise_and", "bitwise_or", "bitwise_xor")],
    ("bitwise_not", [spec((2, S), I)], {}),
    ("logical_xor", [spec((2, S), B), spec((2, S), B)], {}),
    ("prod", [spec((2, S, 3))], {"axes": (1,), "keepdim": True}),
    ("prod", [spec((2, S), I)], {"axes": (0, 1)}),
    ("any", [spec((2, S), B)], {"axes": (1,)}),
    ("all", [spec((2, S, 3), B)], {"axes": (0, 2), "keepdim": True}),
    ("argmin", [spec((2, S, 3))], {"axes": (1,)}),
    ("cumprod", [spec((2, S, 3))], {"axis": 1}),
    ("cumprod", [spec((2, S), B)], {"axis": 1}),
    ("topk", [spec((2, S, 6))], {"k": 3, "axis": 2}),
    ("topk", [spec((2, S))], {"k": 2, "axis": 1, "largest": False}),
    ("sort", [spec((2, S, 3))], {"axis": 1, "descending": True}),
    ("index", [spec((3, S, 4)), spec((2,), I, "idx:4")], {"axes": (2,)}),
    ("index", [spec((3, S, 4, 2)), spec((2, 1), I, "idx:3"), spec((5,), I, "idx:4")], {"axes": (0, 2)}),
    ("scatter", [spec((3, S)), spec((2, S), I, "idx:3"), spec((2, S))], {"axis": 0}),
    ("scatter", [spec((3, S)), spec((3, 2), I, "idx:5")], {"axis": 1, "value": 7.0}),
    ("scatter", [spec((3, S)), spec((2, S), I, "idx:3"), spec((2, S))], {"axis": 0, "reduce": "sum"}),
    ("scatter", [spec((3, S)), spec((4, S), I, "idx:3"), spec((4, S))],
     {"axis": 0, "reduce": "amax", "include_self": False}),
    ("index_put", [spec((4, S, 3)), spec((2, S, 3)), spec((2,), I, "idx:4")], {}),
    ("index_put", [spec((4, S, 3)), spec((1,)), spec((2,), I, "idx:4")], {"accumulate": True}),
    ("index_put", [spec((4, S, 3)), spec((4, S, 2)), spec((2,), I, "idx:3")], {"axes": (2,)}),
    ("slice_scatter", [spec((2, S, 8)), spec((2, S, 3))], {"axis": 2, "start": (1,), "end": (7,), "step": 2}),
    ("slice_scatter", [spec((2, 8)), spec((2, 2))], {"axis": 1, "start": (4,), "end": (6,)}),
    ("flip", [spec((2, S, 3))], {"axes": (1, 2)}),
    ("conv", [spec((2, 4, S)), spec((6, 2, 3)), spec((6,))], {"stride": (1,), "padding": (1,), "dilation": (1,),
                                                              "groups": 2}),
    ("conv", [spec((1, 3, S, 7)), spec((4, 3, 3, 2))], {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)}),
    ("conv", [spec((1, 4, S, 6)), spec((4, 1, 3, 3))], {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1),
                                                        "groups": 4}),
    ("conv", [spec((1, 4, S)), spec((4, 3, 4)), spec((3,))], {"stride": (2,), "padding": (1,), "dilation": (1,),
                                                              "transposed": True, "output_padding": (1,)}),
    ("batch_norm", [spec((2, 3, S, 4)), spec((3,)), spec((3,), kind="pos"), spec((3,)), spec((3,))], {"eps": 1e-3}),
    ("batch_norm", [spec((2, 3, S)), spec((3,)), spec((3,), kind="pos")], {}),
    ("group_norm", [spec((2, 6, S, 3)), spec((6,)), spec((6,))], {"groups": 3}),
    ("group_norm", [spec((2, 4, S))], {"groups": 2, "eps": 1e-6}),
    ("max_pool", [spec((1, 3, S, 6))], {"kernel": (3, 2), "stride": (2, 2), "padding": (1, 0), "dilation": (1, 1)}),
    ("max_pool", [spec((1, 3, 7, 6))], {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1), "dilation": (1, 1),
                                        "ceil_mode": True}),
    ("max_pool", [spec((2, S, 9))], {"kernel": (2,), "stride": (2,), "padding": (0,), "dilation": (2,)}),
    ("avg_pool", [spec((1, 3, S, 6))], {"kernel": (2, 3), "stride": (1, 2), "padding": (1, 1)}),
    ("avg_pool", [spec((1, 3, 7, 6))], {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1), "ceil_mode": True,
                                        "count_include_pad": False}),
    ("avg_pool", [spec((2, 3, S))], {"kernel": (2,), "stride": (2,), "padding": (0,), "divisor_override": 3}),
    ("adaptive_avg_pool", [spec((2, 3, S, 7))], {"output_size": (1, 1)}),
    ("adaptive_avg_pool", [spec((2, 3, 7, 5))], {"output_size": (3, 2)}),
    ("adaptive_max_pool", [spec((2, 3, 7, 5))], {"output_size": (3, 2)}),
    ("adaptive_max_pool", [spec((2, 3, 10))], {"output_size": (4,)}),
    ("pad", [spec((2, 3, S, 4))], {"pads": (1, 2, 0, 1), "value": -1.0}),
    ("pad", [spec((2, 3, S, 4))], {"pads": (1, 2, 2, 1), "mode": "reflect"}),
    ("pad", [spec((2, 3, S))], {"pads": (3, 1), "mode": "replicate"}),
    ("pad", [spec((2, 3, S, 4))], {"pads": (1, 2, 2, 3), "mode": "circular"}),
    ("resize", [spec((1, 2, S, 3))], {"size": (2 * S, 6)}),
    ("resize", [spec((1, 2, 4, 3))], {"size": (8, 6), "mode": "linear", "scales": (2.0, 2.0)}),
    ("resize", [spec((1, 2, 4, 3))], {"size": (7, 6), "mode": "linear", "align_corners": True}),
    ("resize", [spec((1, 2, 4, 3))], {"size": (6, 7), "mode": "cubic"}),
    ("resize", [spec((1, 2, S))], {"size": (9,), "mode": "nearest-exact"}),
    ("selective_scan", [spec((2, 4, S)), spec((2, 4, S), kind="pos"), spec((4, 3)), spec((2, 3, S)),
                        spec((2, 3, S))], {}),
]

MY_CATEGORIES = ("elementwise", "shape", "nn", "attention", "vision", "ssm")


def _symbolize(d: Any) -> Any:
    return "s" if d == S else d


def _run_case(op: str, ins: list[tuple], attrs: dict[str, Any], symbolic: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = [_make(shape, dt, kind, g) for shape, dt, kind in ins]
    m = Module("case")
    vals = []
    for i, t in enumerate(tensors):
        shape = tuple(_symbolize(d) if symbolic else d for d in t.shape)
        vals.append(m.add_input(f"x{i}", TensorType(shape, dtype_name(t.dtype))))
    a = dict(attrs)
    if symbolic:
        for k, sp in all_ops()[op].attrs.items():
            if sp.kind == "dims" and k in a:
                a[k] = tuple(_symbolize(d) for d in a[k])
    node = m.create_node(op, vals, a)
    m.set_outputs(node.outputs)
    if not tensors and symbolic:  # no input binds s: bind it by adding one
        m.add_input("bind", TensorType(("s",), "f32"))
        tensors.append(torch.zeros(S))
    outs = interpret(m, tensors)
    for out, v in zip(outs, node.outputs, strict=True):
        t = v.type
        want = tuple(eval_dim(d, {"s": S}) for d in t.shape)
        assert tuple(out.shape) == want, (op, t, tuple(out.shape))
        assert dtype_name(out.dtype) == t.dtype, (op, t, out.dtype)
    t = node.outputs[0].type
    if symbolic and ins:
        assert t.is_static == all(S not in shape for shape, _, _ in ins) or S not in want, (op, t)


@pytest.mark.parametrize("symbolic", [False, True], ids=["static", "symbolic"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_infer_matches_reference(case: int, symbolic: bool) -> None:
    op, ins, attrs = CASES[case]
    for seed in (0, 1):
        _run_case(op, ins, attrs, symbolic, seed)


def test_every_op_has_a_case_and_a_doc() -> None:
    mine = {n for n, d in all_ops().items() if d.category in MY_CATEGORIES}
    covered = {c[0] for c in CASES}
    assert mine - covered == set()
    for n in mine:
        assert all_ops()[n].doc, n


def test_reference_semantics_spot_checks() -> None:
    x = torch.randn(2, 4, 6, 8)
    cos, sin = torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    rot = all_ops()["rotary_embedding"].ref(x, cos, sin)
    x1, x2 = x[..., :4], x[..., 4:]
    assert torch.equal(rot, x * cos + torch.cat([-x2, x1], -1) * sin)
    h = torch.randn(2, 3, 8)
    w = torch.randn(8)
    want = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.equal(all_ops()["rms_norm"].ref(h, w, eps=1e-6), want)
    sub = all_ops()["sub"].ref(h, scalar=1.0, reverse=True)
    assert torch.equal(sub, 1.0 - h)
    ints = all_ops()["add"].ref(torch.arange(4), scalar=2.0, reverse=False)
    assert ints.dtype == torch.int64 and ints.tolist() == [2, 3, 4, 5]
    q = torch.randn(1, 4, 5, 8)
    k = torch.randn(1, 2, 5, 8)
    gqa = all_ops()["scaled_dot_product_attention"].ref(q, k, k, is_causal=True, scale=None, enable_gqa=True)
    kk = k.repeat_interleave(2, dim=1)
    assert torch.allclose(gqa, torch.nn.functional.scaled_dot_product_attention(q, kk, kk, is_causal=True))


BAD: list[tuple[str, list[TensorType], dict[str, Any], str]] = [
    ("exp", [TensorType((2,), "i64")], {}, "float"),
    ("add", [TensorType((2, 3), "f32"), TensorType((2, 3), "i64")], {}, "dtypes differ"),
    ("add", [TensorType((2, 3), "f32"), TensorType((4,), "f32")], {}, "broadcast"),
    ("add", [TensorType((2, 3), "f32")], {}, "scalar"),
    ("div", [TensorType((2,), "i64")], {"scalar": 2.0}, "float"),
    ("reshape", [TensorType((2, 3), "f32")], {"shape": (4, 2)}, "elements"),
    ("reshape", [TensorType((2, 3), "f32")], {"shape": (-1,)}, "complete"),
    ("permute", [TensorType((2, 3), "f32")], {"perm": (0, 0)}, "permutation"),
    ("transpose", [TensorType((2, 3), "f32")], {"dim0": 0, "dim1": 2}, "out of range"),
    ("slice", [TensorType((2, 3), "f32")], {"axis": 1, "start": (0,), "end": (4,)}, "exceeds"),
    ("slice", [TensorType((2, 3), "f32")], {"axis": 1, "start": (-1,), "end": (2,)}, "canonical"),
    ("squeeze", [TensorType((2, 3), "f32")], {"axes": (1,)}, "not 1"),
    ("expand", [TensorType((2, 3), "f32")], {"shape": (2, 4)}, "cannot expand"),
    ("concat", [TensorType((2, 3), "f32"), TensorType((3, 3), "f32")], {"axis": 1}, "concat"),
    ("linear", [TensorType((2, 3), "f32"), TensorType((4, 5), "f32")], {}, "in-features"),
    ("matmul", [TensorType(("s", 3), "f32"), TensorType((4, 5), "f32")], {}, "contraction"),
    ("layer_norm", [TensorType((2, 3), "f32"), TensorType((4,), "f32")], {}, "layer_norm"),
    ("softmax", [TensorType((2, 3), "f32")], {"axis": -1}, "non-negative"),
    ("sum", [TensorType((2, 3), "f32")], {"axes": (1, 0)}, "sorted"),
    ("embedding", [TensorType((2,), "f32"), TensorType((4, 5), "f32")], {}, "integer"),
    ("masked_fill", [TensorType((2, 3), "f32"), TensorType((2, 3), "f32")], {"value": 0.0}, "bool"),
    ("scaled_dot_product_attention", [TensorType((1, 4, 5, 8), "f32"), TensorType((1, 3, 5, 8), "f32"),
                                      TensorType((1, 3, 5, 8), "f32")], {"enable_gqa": True}, "multiple"),
    ("rotary_embedding", [TensorType((1, 2, 5, 7), "f32")] * 3, {}, "even"),
    ("where", [TensorType((2,), "f32"), TensorType((2,), "f32"), TensorType((2,), "f32")], {}, "bool"),
]


@pytest.mark.parametrize("op,types,attrs,match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_invalid_uses_raise(op: str, types: list[TensorType], attrs: dict[str, Any], match: str) -> None:
    m = Module("bad")
    vals = [m.add_input(f"x{i}", t) for i, t in enumerate(types)]
    with pytest.raises(OpError, match=match):
        m.create_node(op, vals, attrs)
