"""The TVM CPU backend computes what the reference interpreter computes.

Every lowered op is compiled (default schedules, no tuning) on small shapes and compared with
``ctc.ir.interpreter.interpret``.  Ops are grouped into a few modules per family so each family
compiles once; each op is still its own test case.  Tolerances: f32 ``rtol=1e-4, atol=2e-5``
(fast-math exp/erf/tanh have relative error <= 5e-6; summation order differs from torch);
integer and bool results exactly; integer-kernel ``quant_linear`` within one activation
quantization step of the float reference (rounding of values that land exactly between two
steps may differ by fp32 summation order).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from ctc.backends.tvm import lower as L  # noqa: E402
from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled  # noqa: E402
from ctc.ir import Module, TensorType, Value, all_ops  # noqa: E402
from ctc.ir import quant as Q  # noqa: E402
from ctc.ir.interpreter import interpret  # noqa: E402

F32_TOL = {"rtol": 1e-4, "atol": 2e-5}


def _run(m: Module, inputs: list[torch.Tensor], tmp_path: Any = None, **opts: Any) -> list[torch.Tensor]:
    comp = compile_module(m, options=BuildOptions(**opts))
    if tmp_path is None:
        import tvm
        from tvm import relax

        vm = relax.VirtualMachine(comp.executable, tvm.cpu())
        args = [tvm.runtime.tensor(np.ascontiguousarray(x.numpy())) for x in inputs]
        args += [tvm.runtime.tensor(a) for a in comp.param_arrays]
        out = vm["main"](*args)
        outs = [out] if hasattr(out, "numpy") else list(out)
        return [torch.from_numpy(o.numpy()) for o in outs]
    comp.export(tmp_path)
    return load_compiled(tmp_path)(*inputs)


def _close(name: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    assert tuple(got.shape) == tuple(ref.shape), f"{name}: shape {tuple(got.shape)} vs reference {tuple(ref.shape)}"
    assert got.dtype == ref.dtype, f"{name}: dtype {got.dtype} vs reference {ref.dtype}"
    if ref.dtype.is_floating_point:
        torch.testing.assert_close(got, ref, msg=lambda s: f"{name}: {s}", equal_nan=True, **F32_TOL)
    else:
        assert torch.equal(got, ref), f"{name}: integer/bool result differs from the reference"


# ----------------------------------------------------------------------------- op cases
# Each case: (op name, family, builder(m, x, y, ids) -> Value).  x: f32[2, s, 8] (s symbolic, run
# with 5), y: f32[2, s, 8], ids: i64[2, s] in [0, 8).
Builder = Callable[[Module, Value, Value, Value], Value]
CASES: list[tuple[str, str, Builder]] = []


def case(op: str, family: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        CASES.append((op, family, fn))
        return fn

    return deco


def _n(m: Module, op: str, ins: list[Value], **attrs: Any) -> Value:
    return m.create_node(op, ins, attrs).output


def _p(m: Module, name: str, t: torch.Tensor) -> Value:
    m.add_param(name, t)
    return m.param(name)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


for _op in ("neg", "exp", "tanh", "sigmoid", "relu", "silu", "sin", "cos", "erf", "abs"):
    case(_op, "unary")(lambda m, x, y, ids, _op=_op: _n(m, _op, [x]))
case("log", "unary")(lambda m, x, y, ids: _n(m, "log", [_n(m, "add", [_n(m, "abs", [x])], scalar=0.5)]))
case("sqrt", "unary")(lambda m, x, y, ids: _n(m, "sqrt", [_n(m, "abs", [x])]))
case("rsqrt", "unary")(lambda m, x, y, ids: _n(m, "rsqrt", [_n(m, "add", [_n(m, "abs", [x])], scalar=0.5)]))
case("reciprocal", "unary")(lambda m, x, y, ids: _n(m, "reciprocal", [_n(m, "add", [_n(m, "abs", [x])], scalar=1.0)]))
case("gelu", "unary")(lambda m, x, y, ids: _n(m, "gelu", [x]))
case("gelu_tanh", "unary")(lambda m, x, y, ids: _n(m, "gelu", [x], approximate="tanh"))
case("cast", "unary")(lambda m, x, y, ids: _n(m, "cast", [_n(m, "mul", [x], scalar=3.0)], dtype="i32"))
case("cast_bool", "unary")(lambda m, x, y, ids: _n(m, "cast", [_n(m, "relu", [x])], dtype="bool"))
case("logical_not", "unary")(lambda m, x, y, ids: _n(m, "logical_not", [_n(m, "relu", [x])]))

for _op in ("add", "sub", "mul", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge"):
    case(_op, "binary")(lambda m, x, y, ids, _op=_op: _n(m, _op, [x, y]))
case("div", "binary")(lambda m, x, y, ids: _n(m, "div", [x, _n(m, "add", [_n(m, "abs", [y])], scalar=0.5)]))
case("pow", "binary")(lambda m, x, y, ids: _n(m, "pow", [_n(m, "add", [_n(m, "abs", [x])], scalar=0.1), y]))
case("pow3_scalar", "binary")(lambda m, x, y, ids: _n(m, "pow", [x], scalar=3.0))
case("pow_scalar_generic", "binary")(lambda m, x, y, ids: _n(m, "pow", [_n(m, "abs", [x])], scalar=1.5))
case("sub_reverse", "binary")(lambda m, x, y, ids: _n(m, "sub", [x], scalar=2.0, reverse=True))
case("div_reverse", "binary")(lambda m, x, y, ids: _n(m, "div", [_n(m, "add", [_n(m, "abs", [x])], scalar=1.0)],
                                                        scalar=1.0, reverse=True))
case("add_int_scalar", "binary")(lambda m, x, y, ids: _n(m, "add", [ids], scalar=3.0))
case("broadcast_mul", "binary")(lambda m, x, y, ids: _n(m, "mul", [x, _p(m, "bm", torch.randn(8, generator=_g(1)))]))
for _op in ("logical_and", "logical_or"):
    case(_op, "binary")(lambda m, x, y, ids, _op=_op: _n(m, _op, [_n(m, "gt", [x, y]), _n(m, "gt", [x], scalar=0.0)]))
case("where", "binary")(lambda m, x, y, ids: _n(m, "where", [_n(m, "gt", [x, y]), x, y]))
case("where_scalar", "binary")(lambda m, x, y, ids: _n(m, "where", [_n(m, "gt", [x, y]), x], b_scalar=-1.0))
case("masked_fill", "binary")(lambda m, x, y, ids: _n(m, "masked_fill", [x, _n(m, "gt", [y], scalar=0.0)],
                                                       value=-1e9))

case("sum", "reduce")(lambda m, x, y, ids: _n(m, "sum", [x], axes=(2,)))
case("sum_int", "reduce")(lambda m, x, y, ids: _n(m, "sum", [ids], axes=(1,), keepdim=True))
case("mean", "reduce")(lambda m, x, y, ids: _n(m, "mean", [x], axes=(1, 2), keepdim=True))
case("amax", "reduce")(lambda m, x, y, ids: _n(m, "amax", [x], axes=(2,)))
case("amin", "reduce")(lambda m, x, y, ids: _n(m, "amin", [x], axes=(1,)))
case("argmax", "reduce")(lambda m, x, y, ids: _n(m, "argmax", [x], axes=(2,)))
case("softmax", "reduce")(lambda m, x, y, ids: _n(m, "softmax", [x], axis=2))
case("log_softmax", "reduce")(lambda m, x, y, ids: _n(m, "log_softmax", [x], axis=2))
case("cumsum", "reduce")(lambda m, x, y, ids: _n(m, "cumsum", [x], axis=1))
case("cumsum_int", "reduce")(lambda m, x, y, ids: _n(m, "cumsum", [ids], axis=1))

case("reshape", "shape")(lambda m, x, y, ids: _n(m, "reshape", [x], shape=(2, "s", 2, 4)))
case("permute", "shape")(lambda m, x, y, ids: _n(m, "permute", [x], perm=(2, 0, 1)))
case("transpose", "shape")(lambda m, x, y, ids: _n(m, "transpose", [x], dim0=1, dim1=2))
case("expand", "shape")(lambda m, x, y, ids: _n(m, "expand", [_n(m, "unsqueeze", [x], axis=1)], shape=(2, 3, "s", 8)))
case("unsqueeze", "shape")(lambda m, x, y, ids: _n(m, "unsqueeze", [x], axis=0))
case("squeeze", "shape")(lambda m, x, y, ids: _n(m, "squeeze", [_n(m, "unsqueeze", [x], axis=1)], axes=(1,)))
case("slice", "shape")(lambda m, x, y, ids: _n(m, "slice", [x], axis=2, start=(1,), end=(7,), step=2))
case("slice_symbolic", "shape")(lambda m, x, y, ids: _n(m, "slice", [x], axis=1, start=(1,), end=("s",)))
case("concat", "shape")(lambda m, x, y, ids: _n(m, "concat", [x, y], axis=2))
case("gather", "shape")(lambda m, x, y, ids: _n(m, "gather", [x, _n(m, "expand", [_n(m, "unsqueeze", [ids], axis=2)],
                                                                     shape=(2, "s", 8))], axis=2))
case("index_select", "shape")(lambda m, x, y, ids: _n(m, "index_select", [x, _p(m, "isel", torch.tensor([3, 0, 3]))],
                                                      axis=2))
case("index", "shape")(lambda m, x, y, ids: _n(m, "index", [_p(m, "tab", torch.randn(8, 4, generator=_g(2))), ids]))
case("embedding", "shape")(lambda m, x, y, ids: _n(
    m, "embedding", [ids, _p(m, "emb", torch.randn(8, 6, generator=_g(3)))]))
case("arange", "shape")(lambda m, x, y, ids: _n(m, "add", [ids, _n(m, "arange", [], end=("s",))]))
case("triu", "shape")(lambda m, x, y, ids: _n(m, "triu", [x], diagonal=1))
case("tril", "shape")(lambda m, x, y, ids: _n(m, "tril", [x], diagonal=0))
case("full", "shape")(lambda m, x, y, ids: _n(m, "add", [x, _n(m, "full", [], shape=(2, "s", 8), value=0.25)]))
case("channel_permute", "shape")(lambda m, x, y, ids: _n(
    m, "channel_permute", [x, _p(m, "perm", torch.randperm(8, generator=_g(4)))], axis=2))


def _w(m: Module, name: str, *shape: int, seed: int) -> Value:
    return _p(m, name, torch.randn(*shape, generator=_g(seed)) * 0.3)


case("linear", "nn")(lambda m, x, y, ids: _n(m, "linear", [x, _w(m, "lw", 16, 8, seed=5), _w(m, "lb", 16, seed=6)]))
case("linear_nobias_input_weight", "nn")(lambda m, x, y, ids: _n(
    m, "linear", [x, _n(m, "mul", [_w(m, "lw2", 8, 8, seed=7)], scalar=2.0)]))
case("matmul", "nn")(lambda m, x, y, ids: _n(m, "matmul", [x, _n(m, "transpose", [y], dim0=1, dim1=2)]))
case("matmul_param", "nn")(lambda m, x, y, ids: _n(m, "matmul", [x, _w(m, "mw", 8, 32, seed=8)]))
case("layer_norm", "nn")(lambda m, x, y, ids: _n(m, "layer_norm", [x, _w(m, "g", 8, seed=9), _w(m, "b", 8, seed=10)]))
case("layer_norm_noaffine", "nn")(lambda m, x, y, ids: _n(m, "layer_norm", [x], eps=1e-6))
case("rms_norm", "nn")(lambda m, x, y, ids: _n(m, "rms_norm", [x, _w(m, "rw", 8, seed=11)]))
case("lowrank_linear", "nn")(lambda m, x, y, ids: _n(
    m, "lowrank_linear", [x, _w(m, "u", 12, 3, seed=12), _w(m, "v", 3, 8, seed=13), _w(m, "ub", 12, seed=14)], rank=3))


def _heads(m: Module, v: Value) -> Value:
    return _n(m, "transpose", [_n(m, "reshape", [v], shape=(2, "s", 2, 4))], dim0=1, dim1=2)  # [2, 2, s, 4]


case("scaled_dot_product_attention", "attention")(lambda m, x, y, ids: _n(
    m, "scaled_dot_product_attention", [_heads(m, x), _heads(m, y), _heads(m, x)]))
case("sdpa_causal", "attention")(lambda m, x, y, ids: _n(
    m, "scaled_dot_product_attention", [_heads(m, x), _heads(m, y), _heads(m, y)], is_causal=True, scale=0.3))
case("sdpa_bool_mask", "attention")(lambda m, x, y, ids: _n(
    m, "scaled_dot_product_attention", [_heads(m, x), _heads(m, y), _heads(m, x),
                                        _n(m, "unsqueeze", [_n(m, "unsqueeze", [_n(m, "ge", [ids], scalar=1.0)],
                                                                axis=1)], axis=1)]))
case("sdpa_gqa", "attention")(lambda m, x, y, ids: _n(
    m, "scaled_dot_product_attention", [_heads(m, x), _n(m, "slice", [_heads(m, y)], axis=1, start=(0,), end=(1,)),
                                        _n(m, "slice", [_heads(m, x)], axis=1, start=(1,), end=(2,))],
    enable_gqa=True, is_causal=True))
case("rotary_embedding", "attention")(lambda m, x, y, ids: _n(
    m, "rotary_embedding", [_heads(m, x), _n(m, "cos", [_heads(m, y)]), _n(m, "sin", [_heads(m, y)])]))
case("calibrated_attention", "attention")(lambda m, x, y, ids: _n(
    m, "calibrated_attention", [_heads(m, x), _heads(m, y), _heads(m, x)], heads=(1,), beta=0.4, threshold=1.5,
    is_causal=True))
case("calibrated_attention_mask", "attention")(lambda m, x, y, ids: _n(
    m, "calibrated_attention", [_heads(m, x), _heads(m, y), _heads(m, x),
                                _n(m, "unsqueeze", [_n(m, "unsqueeze", [_n(m, "ge", [ids], scalar=1.0)], axis=1)],
                                   axis=1)], heads=(0, 1), beta=0.0, threshold=1.2, keep_first=False))
case("calibrated_attention_column", "attention")(lambda m, x, y, ids: _n(
    m, "calibrated_attention", [_heads(m, x), _heads(m, y), _heads(m, x),
                                _n(m, "unsqueeze", [_n(m, "unsqueeze", [_n(m, "ge", [ids], scalar=1.0)], axis=1)],
                                   axis=1)], heads=(0, 1), beta=0.4, threshold=1.1, detect="column"))
case("sparse_attention", "attention")(lambda m, x, y, ids: _n(
    m, "sparse_attention", [_heads(m, x), _heads(m, y), _heads(m, x)], round_bits=(2, 4), keep_ratios=(0.7, 0.5),
    min_keep=1))
case("sparse_attention_causal", "attention")(lambda m, x, y, ids: _n(
    m, "sparse_attention", [_heads(m, x), _heads(m, y), _heads(m, y)], round_bits=(3,), keep_ratios=(0.5,),
    is_causal=True, min_keep=2))
case("sparse_attention_threshold_mask", "attention")(lambda m, x, y, ids: _n(
    m, "sparse_attention", [_heads(m, x), _heads(m, y), _heads(m, x),
                            _n(m, "unsqueeze", [_n(m, "unsqueeze", [_n(m, "ge", [ids], scalar=1.0)], axis=1)], axis=1)],
    round_bits=(8,), select="threshold", alphas=(0.2,), dense_heads=(1,)))


def _qparams(m: Module, name: str, n: int, k: int, bits: int, gs: int, sym: bool, seed: int) -> list[Value]:
    qw = Q.quantize_weight(torch.randn(n, k, generator=_g(seed)), bits, gs, sym)
    return [_p(m, f"{name}.q", qw.qweight), _p(m, f"{name}.s", qw.scale), _p(m, f"{name}.z", qw.zero)]


case("quant_linear_weight_only_w4", "quant")(lambda m, x, y, ids: _n(
    m, "quant_linear", [x, *_qparams(m, "ql1", 16, 8, 4, -1, False, 20)], w_bits=4, group_size=-1, w_symmetric=False))
case("quantize", "quant")(lambda m, x, y, ids: _n(
    m, "quantize", [x, _p(m, "qs", torch.tensor([0.05])), _p(m, "qz", torch.tensor([3], dtype=torch.int32))],
    bits=8, signed=True, dtype="i8"))
case("quantize_per_group", "quant")(lambda m, x, y, ids: _n(
    m, "quantize", [_n(m, "add", [_w(m, "qx2", 3, 8, seed=23), _n(m, "mean", [x], axes=(0, 1))]),
                    _p(m, "qs2", torch.rand(3, 2, generator=_g(21)) * 0.1 + 0.01),
                    _p(m, "qz2", torch.zeros(3, 2, dtype=torch.int32))],
    bits=4, signed=True, dtype="i8", axis=1, group_size=4))
case("dequantize", "quant")(lambda m, x, y, ids: _n(
    m, "dequantize", [_n(m, "cast", [_n(m, "mul", [x], scalar=20.0)], dtype="i8"),
                      _p(m, "ds", torch.rand(8, generator=_g(22)) + 0.1),
                      _p(m, "dz", torch.arange(8, dtype=torch.int32))],
    axis=2))

# a computed cache (not a module input): written into a copy, the input stays intact
case("cache_write", "cache")(lambda m, x, y, ids: _n(
    m, "cache_write", [_n(m, "mul", [x], scalar=2.0), _n(m, "slice", [y], axis=1, start=[1], end=[3], step=1),
                       _p(m, "cw_pos", torch.tensor([4, 0]))], axis=1))

FAMILIES = sorted({f for _, f, _ in CASES})
SEQ = 5


def _family_module(family: str) -> tuple[Module, list[str]]:
    m = Module(f"ops_{family}")
    x = m.add_input("x", TensorType((2, "s", 8), "f32"))
    y = m.add_input("y", TensorType((2, "s", 8), "f32"))
    ids = m.add_input("ids", TensorType((2, "s"), "i64"))
    outs, names = [], []
    for op, fam, fn in CASES:
        if fam == family:
            outs.append(fn(m, x, y, ids))
            names.append(op)
    m.set_outputs(outs, names)
    return m, names


def _inputs(seq: int, seed: int = 0) -> list[torch.Tensor]:
    g = _g(seed)
    return [torch.randn(2, seq, 8, generator=g), torch.randn(2, seq, 8, generator=g),
            torch.randint(0, 8, (2, seq), generator=g)]


_COMPILED: dict[str, tuple[list[str], list[torch.Tensor], list[torch.Tensor]]] = {}


def _family_results(family: str) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    if family not in _COMPILED:
        m, names = _family_module(family)
        inputs = _inputs(SEQ)
        ref = interpret(m, inputs)
        got = _run(m, inputs)
        _COMPILED[family] = (names, ref, got)
    return _COMPILED[family]


@pytest.mark.parametrize("op,family", [(op, fam) for op, fam, _ in CASES], ids=[op for op, _, _ in CASES])
def test_op_matches_interpreter(op: str, family: str) -> None:
    names, ref, got = _family_results(family)
    i = names.index(op)
    _close(op, got[i], ref[i])


def test_every_registered_op_has_a_rule_and_a_test() -> None:
    registered = set(all_ops())
    unsupported = sorted(registered - set(L.supported_ops()))
    assert not unsupported, f"ops without a TVM lowering rule: {unsupported}"
    from tvm_breadth_cases import CASES as BREADTH

    # the quantized KV-cache ops take integer cache inputs: tests/test_kv_cache_quant.py runs their kernels
    tested = {op for op, _, _ in CASES} | {"param", "scaled_dot_product_attention", "gelu", "quant_linear",
                                           "quant_cache_write", "quant_kv_attention"}
    tested |= {op for _, op, _, _ in BREADTH}
    missing = registered - tested
    assert not missing, f"lowered ops without a test case here: {sorted(missing)}"


def test_unknown_ops_are_reported_together(monkeypatch: pytest.MonkeyPatch) -> None:
    m, _ = _family_module("unary")
    monkeypatch.delitem(L.RULES, "exp")
    monkeypatch.delitem(L.RULES, "tanh")
    with pytest.raises(L.LoweringError) as e:
        L.lower(m)
    msg = str(e.value)
    assert "cannot lower 2 op(s)" in msg and "- exp" in msg and "- tanh" in msg


# ----------------------------------------------------------------------------- params, loader, dynamic seq
def _mlp() -> Module:
    m = Module("mlp")
    x = m.add_input("x", TensorType((1, "seq", 16), "f32"))
    h = _n(m, "linear", [x, _w(m, "w1", 32, 16, seed=30), _w(m, "b1", 32, seed=31)])
    h = _n(m, "gelu", [h])
    h = _n(m, "linear", [h, _w(m, "w2", 16, 32, seed=32), _w(m, "b2", 16, seed=33)])
    h = _n(m, "add", [h, x])
    m.set_outputs([_n(m, "layer_norm", [h, _w(m, "g", 16, seed=34), _w(m, "b", 16, seed=35)])], ["y"])
    return m


@pytest.mark.parametrize("params", ["const", "input"])
def test_export_and_runtime_loader_dynamic_seq(params: str, tmp_path: Any) -> None:
    m = _mlp()
    comp = compile_module(m, options=BuildOptions(params=params))
    comp.export(tmp_path)
    assert (tmp_path / "model.so").exists() and (tmp_path / "model.json").exists()
    assert (tmp_path / "params.npz").exists() == (params == "input")
    model = load_compiled(tmp_path)
    for seq in (3, 17):  # one compile, two sequence lengths
        x = torch.randn(1, seq, 16, generator=_g(seq))
        ref = interpret(m, [x])[0]
        _close(f"mlp seq {seq}", model(x)[0], ref)
        np.testing.assert_allclose(model(x.numpy(), numpy=True)[0], ref.numpy(), **F32_TOL)
        _close(f"mlp seq {seq} (mapping)", model({"x": x})[0], ref)


def test_runtime_loader_does_not_import_relax(tmp_path: Any) -> None:
    import subprocess
    import sys

    compile_module(_mlp()).export(tmp_path)
    code = ("import sys, numpy as np\nfrom ctc.backends.tvm.build import load_compiled\n"
            f"m = load_compiled({str(tmp_path)!r})\n"
            "y = m(np.ones((1, 4, 16), 'float32'), numpy=True)[0]\n"
            "assert y.shape == (1, 4, 16)\n"
            "assert 'tvm.relax' not in sys.modules, 'relax was imported'\nprint('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_host_target_matches_what_the_cpu_reports() -> None:
    """A virtual machine may mask units its CPU model has (LLVM names an AVX-512-less Zen 4 guest ``znver4``): the
    host target turns off what ``/proc/cpuinfo`` lacks and adds the AMX units a name leaves out."""
    from ctc.backends.tvm import targets as T

    implied = {"avx2", "avx512f", "avx512vnni", "sse4.1", "bmi", "sha", "gfni", "fast-lzcnt"}
    masked = frozenset({"avx2", "sse4_1", "bmi1", "sha_ni", "amx_tile"})
    assert T.mattr_for_host("znver4", implied, masked) == ("-avx512f", "-avx512vnni", "-gfni", "+amx-tile")
    assert T.mattr_for_host("znver4", implied, None) == ()  # no /proc/cpuinfo: LLVM's name stands
    assert T.missing_cpu_features(["avx2", "avx512bw", "sse4.2"], frozenset({"avx2", "sse4_2"})) == ["avx512bw"]
    import tvm

    tgt = tvm.target.Target(T.native_target(1))
    assert T.missing_cpu_features(T.required_cpu_features(tgt)) == []


def test_artifact_for_a_cpu_this_one_lacks_is_refused(tmp_path: Any) -> None:
    """A library built for units this CPU lacks is refused at load with the fix named (it would die of SIGILL)."""
    import json

    compile_module(_mlp()).export(tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    from ctc.backends.tvm import targets as T
    from ctc.backends.tvm.int_kernels import host_target

    assert meta["cpu_features"] == T.required_cpu_features(host_target())
    assert load_compiled(tmp_path)(np.ones((1, 4, 16), "float32"), numpy=True)[0].shape == (1, 4, 16)
    meta["cpu_features"] = [*meta["cpu_features"], "amx-fp8"]  # no host reports this one yet
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match="amx-fp8.*rebuild it on this machine"):
        load_compiled(tmp_path)


def test_static_dims_specialise_and_reject_other_lengths() -> None:
    m = _mlp()
    low = L.lower(m, static_dims={"seq": 6})
    assert not low.symbols
    low_dyn = L.lower(m)
    assert low_dyn.symbols == ["seq"]


def test_target_seq_len_and_opt_level_reach_the_build() -> None:
    """`target cpu seq_len=N opt_level=K` in a recipe: a fixed-length build of the sequence symbol."""
    from ctc.backends.tvm.build import _options_from_target
    from ctc.errors import UsageError
    from ctc.targets import CpuOptions, TargetConfig

    m = _mlp()
    opts = _options_from_target(TargetConfig("cpu", CpuOptions(seq_len=16, opt_level=2)), m)
    assert opts.static_dims == {"seq": 16} and opts.opt_level == 2
    assert _options_from_target(TargetConfig("cpu", CpuOptions()), m).static_dims == {}
    comp = compile_module(m, options=opts)
    assert comp.meta["static_dims"] == {"seq": 16} and comp.meta["opt_level"] == 2
    fixed = Module("fixed")
    fixed.set_outputs([fixed.create_node("relu", [fixed.add_input("x", TensorType([2, 3], "f32"))], {}).output])
    with pytest.raises(UsageError, match=r"no sequence dim \(they have fixed shapes already\); remove seq_len"):
        _options_from_target(TargetConfig("cpu", CpuOptions(seq_len=8)), fixed)
    batch_only = Module("batch_only")  # a lone symbol that is not the sequence is never bound by seq_len
    batch_only.set_outputs([batch_only.create_node(
        "relu", [batch_only.add_input("x", TensorType(["batch", 4], "f32"))], {}).output])
    with pytest.raises(UsageError, match=r"no sequence dim \(their dims use \['batch'\]\)"):
        _options_from_target(TargetConfig("cpu", CpuOptions(seq_len=8)), batch_only)


def test_target_batch_and_seq_len_bind_a_pt2_programs_own_dims() -> None:
    """A .pt2 exported with a dynamic batch captures it as `d0`: `target cpu batch=4` passed the recipe check (which
    reads d0 as the batch, as `ctc bench --batch` does) and then failed the build with 'batch binds the batch symbol
    'batch', but the model's input dims use ['d0']; capture with the batch axis named 'batch'', which a .pt2 user
    cannot do. The option binds the dim the checker named."""
    from ctc.backends.tvm.build import _options_from_target
    from ctc.targets import CpuOptions, TargetConfig

    pt2 = Module("pt2")
    pt2.set_outputs([pt2.create_node("relu", [pt2.add_input("x", TensorType(["d0", 16], "f32"))], {}).output])
    assert _options_from_target(TargetConfig("cpu", CpuOptions(batch=4)), pt2).static_dims == {"d0": 4}
    two = Module("two")
    two.set_outputs([two.create_node("relu", [two.add_input("x", TensorType(["a", "b"], "f32"))], {}).output])
    assert _options_from_target(TargetConfig("cpu", CpuOptions(seq_len=8, batch=2)), two).static_dims == {"b": 8,
                                                                                                         "a": 2}


def test_runtime_uses_every_core_by_default(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """threads=0 (the cpu target's default) means every usable core at run time, not TVM's own default
    (one thread on this kind of machine); an explicit TVM_NUM_THREADS or threads= wins."""
    from ctc.backends.tvm.targets import host_cores

    compile_module(_mlp()).export(tmp_path)
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    assert load_compiled(tmp_path).threads == host_cores()
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    assert load_compiled(tmp_path).threads == 1
    assert load_compiled(tmp_path, threads=2).threads == 2


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")
def test_thread_counts_past_the_pool_are_refused(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`target cpu threads=100000` was accepted, the library's pool ran 256 (parallel_pool.c caps there), and
    `ctc bench` reported '100000 thread(s)'. The recipe option, --threads and loading refuse a count past the cap."""
    import json

    from ctc.errors import UsageError
    from ctc.targets import MAX_CPU_THREADS, CpuOptions

    src = (Path(__file__).resolve().parents[1] / "ctc/backends/tvm/parallel_pool.c").read_text()
    assert int(re.search(r"#define CTC_MAX_THREADS (\d+)", src).group(1)) == MAX_CPU_THREADS
    with pytest.raises(Exception, match=f"above its maximum {MAX_CPU_THREADS}"):
        CpuOptions.from_dict({"threads": MAX_CPU_THREADS + 1}, owner="target cpu")
    (tmp_path / "model.so").write_bytes(b"not loaded")
    (tmp_path / "model.json").write_text(json.dumps({"threads": 300, "device": "cpu"}))
    with pytest.raises(UsageError, match=f"its target's threads=300, but a CPU library runs at most {MAX_CPU_THREADS}"):
        load_compiled(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"threads": 0, "device": "cpu"}))
    monkeypatch.setenv("TVM_NUM_THREADS", "1000")
    with pytest.raises(UsageError, match="TVM_NUM_THREADS=1000"):
        load_compiled(tmp_path)


def test_runtime_threads_stay_on_the_process_cores(tmp_path: Any) -> None:
    """Loading a library pins TVM's workers inside the process's affinity mask and leaves the calling
    thread's mask as it was (TVM's big/little modes pinned by machine core number: the loading thread
    to core 0 with one thread, workers to the slowest cores)."""
    import subprocess
    import sys

    compile_module(_mlp()).export(tmp_path)
    last = max(os.sched_getaffinity(0))
    code = ("import os, numpy as np\nfrom ctc.backends.tvm.build import load_compiled\n"
            "for n in (1, 2):\n"
            f"    load_compiled({str(tmp_path)!r}, threads=n)(np.ones((1, 4, 16), 'float32'))\n"
            "    assert os.sched_getaffinity(0) == {%d}, (n, os.sched_getaffinity(0))\n"
            "    for t in os.listdir('/proc/self/task'):\n"
            "        assert os.sched_getaffinity(int(t)) <= {%d}, (n, t, os.sched_getaffinity(int(t)))\n"
            "print('ok')\n") % (last, last)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: os.sched_setaffinity(0, {last}))  # as `taskset -c LAST python ...`
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_pow3_becomes_multiplications() -> None:
    m = Module("p")
    x = m.add_input("x", TensorType((4,), "f32"))
    m.set_outputs([_n(m, "pow", [x], scalar=3.0)])
    txt = L.lower(m).mod.script()
    assert "power" not in txt and "multiply" in txt


def _quant_linear_module(n: int, seed: int, rows: int, cut: int | None, gelu: bool = False
                         ) -> tuple[Module, torch.Tensor, float]:
    """``x [1, s, 64] -> quant_linear`` (int8 weights, u8 activations in one cluster or two cut at ``cut``,
    calibrated on the input), optionally ``-> gelu``; returns the module, an input of ``rows`` rows and the
    output's one-activation-step error bound."""
    g = _g(seed)
    k = 64
    m = Module("ql")
    x = m.add_input("x", TensorType((1, "s", k), "f32"))
    qw = Q.quantize_weight(torch.randn(n, k, generator=g), 8, -1, True)
    xs = torch.randn(1, rows, k, generator=g) * 2
    parts = [xs[..., :cut], xs[..., cut:]] if cut is not None else [xs]
    s, z = Q.act_qparams(torch.stack([t.min() for t in parts]), torch.stack([t.max() for t in parts]), 8)
    ins = [x, _p(m, "q", qw.qweight), _p(m, "ws", qw.scale), _p(m, "wz", qw.zero), _w(m, "qb", n, seed=seed + 1),
           _p(m, "as", s), _p(m, "az", z)]
    y = _n(m, "quant_linear", ins, w_bits=8, group_size=-1, w_symmetric=True, a_bits=8,
           act_clusters=(cut, k) if cut is not None else (k,), has_bias=True)
    m.set_outputs([_n(m, "gelu", [y]) if gelu else y])
    return m, xs, float(s.max()) * float(qw.scale.abs().max()) * k


def test_quant_linear_uses_integer_kernels() -> None:
    m, xs, step = _quant_linear_module(32, 40, 9, 24)
    low = L.lower(m)
    assert low.int_kernels == 1 and not low.notes
    assert "ctc_qmm" in low.mod.script()
    ref = interpret(m, [xs])[0]
    got = _run(m, [xs])[0]
    assert float((got - ref).abs().max()) <= step, "integer kernel deviates by more than one activation step"
    assert float((got - ref).abs().mean()) < 1e-3 * float(ref.abs().mean()) + 1e-4


def test_gelu_after_a_quant_linear_runs_in_its_epilogue() -> None:
    """The FFN's ``quant_linear -> gelu``: the integer kernel (VNNI, AMX or plain) applies the gelu to its
    output; no kernel of its own writes and reads the activation back.  Same numbers as the interpreter."""
    m, xs, step = _quant_linear_module(48, 44, 11, None, gelu=True)
    low = L.lower(m)
    script = low.mod.script()
    assert low.int_kernels == 1 and not low.notes
    assert re.search(r"ctc_qmm_k64_n48_\w*G_", script), "the matmul's spec carries the gelu"
    assert "gelu" not in script.split("def main")[1], "no gelu kernel of its own in main"
    got = _run(m, [xs])[0]
    assert float((got - interpret(m, [xs])[0]).abs().max()) <= step


def test_unsupported_targets_name_the_issue() -> None:
    from ctc.backends.tvm import targets as T

    with pytest.raises(T.UnsupportedTarget, match="not yet supported.*issue 17"):
        T.resolve("fpga")
    info = T.resolve("cpu")
    assert info.tvm["kind"] == "llvm" and info.tvm["mcpu"] not in ("", "generic", "native")
    assert info.tvm["num-cores"] >= 1
    assert T.target_key(info).startswith(f"llvm-{info.tvm['mcpu']}-")


# ----------------------------------------------------------------------------- random modules
def test_random_modules_match_interpreter() -> None:
    hyp = pytest.importorskip("hypothesis")
    try:
        from strategies import module_and_inputs
    except ImportError:
        pytest.skip("tests/strategies.py not available")

    @hyp.settings(max_examples=6, deadline=None, derandomize=True,
                  suppress_health_check=list(hyp.HealthCheck))
    @hyp.given(module_and_inputs())
    def check(mi: Any) -> None:
        m, inputs = mi
        ref = interpret(m, inputs)
        got = _run(m, list(inputs.values()) if isinstance(inputs, dict) else list(inputs))
        for i, (a, b) in enumerate(zip(got, ref, strict=True)):
            _close(f"output {i} of {m.op_counts()}", a, b)

    check()


# ----------------------------------------------------------------------------- captured transformers
def _hf(kind: str) -> tuple[torch.nn.Module, str]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=64)
        return transformers.BertModel(cfg).eval(), "last_hidden_state"
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return transformers.GPT2Model(cfg).eval(), "last_hidden_state"
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval(), "logits"


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_captured_tiny_transformer_end_to_end(kind: str, tmp_path: Any) -> None:
    from ctc.frontends import capture

    model, key = _hf(kind)
    ids = torch.randint(0, 64, (1, 7), generator=_g(50))
    am = torch.ones(1, 7, dtype=torch.long)
    extra = {} if kind == "bert" else {"use_cache": False}
    m = capture(model, {"input_ids": ids, "attention_mask": am, **extra}, output=key)
    assert [v.name for v in m.inputs] == ["input_ids", "attention_mask"]
    comp = compile_module(m)
    comp.export(tmp_path)
    run = load_compiled(tmp_path)
    for seq in (7, 12):
        ids = torch.randint(0, 64, (1, seq), generator=_g(seq))
        am = torch.ones(1, seq, dtype=torch.long)
        ref = interpret(m, [ids, am])
        with torch.no_grad():
            eager = getattr(model(input_ids=ids, attention_mask=am, **extra), key)
        got = run(ids, am)
        _close(f"{kind} seq {seq}", got[0], ref[0])
        torch.testing.assert_close(got[0], eager, rtol=1e-3, atol=1e-4)
    assert not math.isnan(float(got[0].abs().max()))


# ----------------------------------------------------------------------------- tuning database
def test_fast_inspect_stack_keeps_frames() -> None:
    import inspect

    from ctc.backends.tvm import tuning

    def inner() -> list[inspect.FrameInfo]:
        return tuning._fast_stack()

    st = inner()
    assert st[0].function == "inner" and st[1].function == "test_fast_inspect_stack_keeps_frames"
    assert st[0].code_context and "_fast_stack" in st[0].code_context[0]
    assert st[1].frame.f_locals["inner"] is inner


@pytest.mark.slow
def test_tuning_database_is_reused_and_resumable(tmp_path: Any) -> None:
    """Tiny real tuning run (8 trials): records persist; a second compile tunes nothing."""
    m = Module("tune")
    x = m.add_input("x", TensorType((1, 16, 32), "f32"))
    m.set_outputs([_n(m, "gelu", [_n(m, "linear", [x, _w(m, "tw", 32, 32, seed=60), _w(m, "tb", 32, seed=61)])])])
    xs = torch.randn(1, 16, 32, generator=_g(62))
    ref = interpret(m, [xs])[0]
    opts = BuildOptions(trials=8, trials_per_task=8, tuning_dir=tmp_path)
    first = compile_module(m, options=opts)
    assert first.meta["tuning"]["trials_measured_now"] == 8 and first.meta["tuning"]["tasks_with_records"] == 1
    db = Path(first.meta["tuning"]["dir"])
    assert db.parent == tmp_path and (db / "database_tuning_record.json").read_text().count("\n") == 8
    assert (db / "ledger.json").exists()
    second = compile_module(m, options=opts)
    assert second.meta["tuning"]["trials_measured_now"] == 0 and second.meta["tuning"]["records_in_database"] == 8
    assert second.meta["tuning"]["scheduled_from_database"] >= 1
    assert second.timings["tune_s"] < 30
    for comp in (first, second):
        comp.export(tmp_path / "lib")
        _close("tuned", load_compiled(tmp_path / "lib")(xs)[0], ref)


def test_key_transpose_runs_in_column_tiles() -> None:
    """Attention's ``k^T`` (``[1, L, H * D] -> [1, H, D, L]``): the output's last axis reads the input with a
    stride, so it is scheduled in tiles of one vector of columns with ``D`` inside (the tile's input rows stay
    in L1: 3x faster than vectorizing the whole row at L = 384), and equals the reference."""
    from ctc.backends.tvm.build import relax_passes, schedule_defaults
    from ctc.backends.tvm.lower import lower
    from ctc.backends.tvm.targets import resolve

    m = Module("kt")
    x = m.add_input("x", TensorType((1, 128, 96), "f32"))
    m.set_outputs([_n(m, "permute", [_n(m, "reshape", [x], shape=[1, 128, 3, 32])], perm=[0, 2, 3, 1])])
    tgt = resolve("cpu").target()
    low = lower(m, params="const", target=tgt)
    with tgt:
        mod = schedule_defaults(relax_passes(tgt)(low.mod), tgt)
    text = "\n".join(f.script() for f in mod.functions.values() if hasattr(f, "body") and "transpose" in f.script())
    lanes = re.search(r"T\.vectorized\(T\.int64\((\d+)\)\)", text)
    assert lanes and int(lanes.group(1)) < 128, text  # vectors of columns, not whole rows of 128
    tiles = r"T\.parallel\(.*\n\s+for \w+ in range\(T\.int64\(32\)\):\n\s+for \w+ in T\.vectorized"
    assert re.search(tiles, text), text  # D inside the column tile
    xs = torch.randn(1, 128, 96, generator=_g(7))
    _close("k^T", _run(m, [xs])[0], interpret(m, [xs])[0])
