"""The hand-written row softmax kernel (ctc/backends/tvm/row_kernels.py) against the interpreter:
symbolic and fixed row lengths, lengths that are not a multiple of the vector width (scalar
tail), masked (-inf) entries, log-softmax, and the choice between it and the TE softmax."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from ctc.backends.tvm.build import BuildOptions, compile_module, relax_passes  # noqa: E402
from ctc.backends.tvm.lower import ROW_KERNEL_MIN_LEN, lower  # noqa: E402
from ctc.backends.tvm.targets import resolve  # noqa: E402
from ctc.ir import Module, TensorType  # noqa: E402
from ctc.ir.interpreter import interpret  # noqa: E402

TOL = {"rtol": 1e-4, "atol": 2e-6}


def _module(op: str, shape: list[int | str]) -> Module:
    m = Module(op)
    x = m.add_input("x", TensorType(shape, "f32"))
    m.set_outputs([m.create_node(op, [x], {"axis": len(shape) - 1}).output])
    return m


def _run(m: Module, x: torch.Tensor, **opts: object) -> torch.Tensor:
    import tvm
    from tvm import relax

    comp = compile_module(m, options=BuildOptions(**opts))
    vm = relax.VirtualMachine(comp.executable, tvm.cpu())
    return torch.from_numpy(vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x.numpy()))).numpy())


def _uses_row_kernel(m: Module, static_dims: dict[str, int] | None = None) -> bool:
    tgt = resolve("cpu").target()
    low = lower(m, params="const", fast_math=True, static_dims=static_dims or {}, target=tgt, use_int_kernels=True)
    with tgt:
        mod = relax_passes(tgt)(low.mod)
    return any(gv.name_hint.startswith("row_") for gv in mod.get_global_vars())


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("length", [5, 16, 37, 300])
def test_symbolic_rows_match_interpreter(op: str, length: int) -> None:
    m = _module(op, [2, 3, "s"])
    assert _uses_row_kernel(m)
    x = torch.randn(2, 3, length, generator=torch.Generator().manual_seed(length)) * 4
    torch.testing.assert_close(_run(m, x), interpret(m, [x])[0], **TOL)


@pytest.mark.parametrize("fast_math", [True, False])
def test_masked_entries_get_zero_weight(fast_math: bool) -> None:
    m = _module("softmax", [4, "s"])
    x = torch.randn(4, 41, generator=torch.Generator().manual_seed(1))
    x[:, 3::5] = -math.inf  # masked keys, as attention masks make them
    y = _run(m, x, fast_math=fast_math)
    torch.testing.assert_close(y, interpret(m, [x])[0], **TOL)
    assert float(y[:, 3::5].abs().max()) < 1e-30
    torch.testing.assert_close(y.sum(-1), torch.ones(4), rtol=1e-5, atol=1e-6)


def test_fixed_rows_pick_the_kernel_by_length() -> None:
    short = _module("softmax", [3, ROW_KERNEL_MIN_LEN - 1])
    long = _module("softmax", [3, ROW_KERNEL_MIN_LEN])
    assert not _uses_row_kernel(short) and _uses_row_kernel(long)
    assert not _uses_row_kernel(_module("softmax", [3, "s"]), {"s": 128})  # bound short by static_dims
    x = torch.randn(3, ROW_KERNEL_MIN_LEN, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_run(long, x), interpret(long, [x])[0], **TOL)


def test_fast_exp_expression_accuracy() -> None:
    """fast_exp_expr vs float64 exp over the clamped range: relative error < 1e-6."""
    import tvm
    from tvm import te

    from ctc.backends.tvm.row_kernels import fast_exp_expr

    xs = np.linspace(-86.0, 87.0, 4001, dtype=np.float32)
    a = te.placeholder((xs.size,), "float32", name="a")
    b = te.compute(a.shape, lambda i: fast_exp_expr(a[i]), name="b")
    f = tvm.compile(te.create_prim_func([a, b]), target=resolve("cpu").target())
    out = tvm.runtime.tensor(np.zeros_like(xs))
    f(tvm.runtime.tensor(xs), out)
    rel = np.abs(out.numpy().astype(np.float64) / np.exp(xs.astype(np.float64)) - 1.0)
    assert rel.max() < 1e-6, rel.max()


def test_attention_softmax_takes_the_broadcast_batch() -> None:
    """sdpa with q's batch broadcast against k/v ([1, H, L, D] vs [2, H, S, D]): the logits are
    [2, H, L, S], and the row kernel must see all of them (its row count comes from the output)."""
    m = Module("bcast_sdpa")
    q = m.add_input("q", TensorType([1, 2, "s", 8], "f32"))
    k = m.add_input("k", TensorType([2, 2, "s", 8], "f32"))
    v = m.add_input("v", TensorType([2, 2, "s", 8], "f32"))
    m.set_outputs([m.create_node("scaled_dot_product_attention", [q, k, v], {}).output])
    assert _uses_row_kernel(m)
    g = torch.Generator().manual_seed(5)
    feed = [torch.randn(1, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g),
            torch.randn(2, 2, 6, 8, generator=g)]
    import tvm
    from tvm import relax

    comp = compile_module(m)
    vm = relax.VirtualMachine(comp.executable, tvm.cpu())
    got = torch.from_numpy(vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in feed]).numpy())
    ref = interpret(m, feed)[0]
    assert got.shape == ref.shape == (2, 2, 6, 8)
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("mask", [None, "bool", "add"])
@pytest.mark.parametrize(("lq", "lk"), [(5, 3), (3, 37), (33, 33)])
def test_any_length_attention_pads_keys(mask: str | None, lq: int, lk: int) -> None:
    """With a symbolic key length, keys/values (and the mask) are padded to whole 32-column panels,
    the padded logits masked to -inf: same result as the interpreter for query lengths above and
    below the key length, causal or masked."""
    from ctc.backends.tvm.lower import KEY_TILE

    m = Module("any_len_sdpa")
    q = m.add_input("q", TensorType([1, 2, "l", 8], "f32"))
    k = m.add_input("k", TensorType([1, 2, "s", 8], "f32"))
    v = m.add_input("v", TensorType([1, 2, "s", 8], "f32"))
    ins = [q, k, v]
    g = torch.Generator().manual_seed(lq * 100 + lk)
    feed = [torch.randn(1, 2, lq, 8, generator=g), torch.randn(1, 2, lk, 8, generator=g),
            torch.randn(1, 2, lk, 8, generator=g)]
    if mask == "bool":
        ins.append(m.add_input("mask", TensorType([1, 1, "l", "s"], "bool")))
        bm = torch.rand(1, 1, lq, lk, generator=g) > 0.3
        bm[..., 0] = True  # every query keeps one key
        feed.append(bm)
    elif mask == "add":
        ins.append(m.add_input("mask", TensorType([1, 2, "l", "s"], "f32")))
        feed.append(torch.randn(1, 2, lq, lk, generator=g))
    m.set_outputs([m.create_node("scaled_dot_product_attention", ins, {"is_causal": mask is None}).output])
    tgt = resolve("cpu").target()
    low = lower(m, params="const", fast_math=True, static_dims={}, target=tgt, use_int_kernels=True)
    names = [gv.name_hint for gv in low.mod.get_global_vars()]
    assert "key_pad" in names and "key_valid" in names and KEY_TILE == 32, names
    import tvm
    from tvm import relax

    comp = compile_module(m)
    vm = relax.VirtualMachine(comp.executable, tvm.cpu())
    got = torch.from_numpy(vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in feed]).numpy())
    torch.testing.assert_close(got, interpret(m, feed)[0], **TOL)


@pytest.mark.parametrize("width,residual,affine", [(40, False, True), (48, True, True), (7, True, False)])
def test_layer_norm_row_kernel_matches_interpreter(width: int, residual: bool, affine: bool) -> None:
    """The layer-norm row kernel (vectors plus a scalar tail), reading a residual add before it (whose
    own kernel is then left out), with and without weight and bias; a large common offset (the
    mean is subtracted before the squares are summed)."""
    g = torch.Generator().manual_seed(width)
    m = Module("ln")
    x = m.add_input("x", TensorType([2, "s", width], "f32"))
    ins = [x]
    if residual:
        ins = [m.create_node("add", [x, m.add_input("z", TensorType([2, "s", width], "f32"))]).output]
    if affine:
        for nm in ("w", "b"):
            m.add_param(nm, torch.randn(width, generator=g))
            ins.append(m.param(nm))
    m.set_outputs([m.create_node("layer_norm", ins, {"eps": 1e-5}).output])
    tgt = resolve("cpu").target()
    low = lower(m, target=tgt)
    import tvm
    from tvm import relax

    with tgt, tvm.transform.PassContext(opt_level=3):
        names = [gv.name_hint for gv in relax_passes(tgt)(low.mod).get_global_vars()]
    assert sum(nm.startswith("row_layer_norm") for nm in names) == 1 and not any("add" in nm for nm in names), names
    comp = compile_module(m)
    vm = relax.VirtualMachine(comp.executable, tvm.cpu())
    for s in (1, 9):
        feed = [torch.randn(2, s, width, generator=g) * 3 + 100.0] + ([torch.randn(2, s, width, generator=g)]
                                                                       if residual else [])
        args = [tvm.runtime.tensor(f.numpy()) for f in feed] + [tvm.runtime.tensor(p) for p in comp.param_arrays]
        got = torch.from_numpy(vm["main"](*args).numpy())
        torch.testing.assert_close(got, interpret(m, feed)[0], rtol=1e-4, atol=2e-5)


def test_gelu_expr_is_the_erf_gelu_to_f32_rounding() -> None:
    """The epilogue GELU (``row_kernels.gelu_expr``, a rational erf) against the exact erf form in float64: within
    1.5e-6 absolute, 2.5e-7 of |x| where |x| > 1; exactly x far right, 0 far left (|erf| held to 1), inf at inf."""
    import tvm
    from tvm import te

    from ctc.backends.tvm.int_kernels import host_target
    from ctc.backends.tvm.row_kernels import gelu_expr

    n = 1 << 20
    x = te.placeholder((n,), "float32", name="x")
    y = te.compute((n,), lambda i: gelu_expr(x[i]), name="y")
    func = te.create_prim_func([x, y]).with_attr("global_symbol", "main")
    f = tvm.compile(tvm.IRModule({"main": func}), target=host_target())["main"]
    xs = np.concatenate([np.linspace(-12, 12, n - 6, dtype=np.float32),
                         np.array([0.0, -0.0, 1e-30, -1e6, 1e6, np.inf], np.float32)])
    out = tvm.runtime.tensor(np.zeros(n, np.float32))
    f(tvm.runtime.tensor(xs), out)
    got = out.numpy().astype(np.float64)
    x64 = xs.astype(np.float64)
    want = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x64[:-1]] + [np.inf])
    err = np.abs(got[:-1] - want[:-1])
    assert err.max() < 1.5e-6 and (err / np.maximum(np.abs(x64[:-1]), 1.0)).max() < 2.5e-7  # ~2 f32 ulps
    assert got[-3] == 0.0 and got[-2] == 1e6 and got[-1] == np.inf
    assert got[n - 6] == 0.0 and got[n - 4] == np.float32(1e-30) * 0.5
