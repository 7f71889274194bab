"""One-row (decode-step) shapes on the TVM CPU backend: the right schedule is chosen and the
numbers match the reference interpreter.

A decode step multiplies one row by every weight matrix; those products must stream the
``[N, K]`` weight contiguously (:class:`GemvRule`), and one-row layer norms must not be
parallelized over their elements (:class:`RowReductionRule`).  Each test checks both the
schedule that was picked (from the scheduled TIR) and the result against ``interpret``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from ctc.backends.tvm.build import BuildOptions, compile_module, relax_passes, schedule_defaults  # noqa: E402
from ctc.backends.tvm.lower import lower  # noqa: E402
from ctc.backends.tvm.targets import resolve  # noqa: E402
from ctc.ir import Module, TensorType  # noqa: E402
from ctc.ir.interpreter import interpret  # noqa: E402

TOL = {"rtol": 1e-4, "atol": 2e-5}


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scheduled(m: Module, static_dims: dict[str, int] | None = None) -> dict[str, str]:
    """PrimFunc name -> scheduled TIR text, after the default schedules."""
    tgt = resolve("cpu").target()
    low = lower(m, params="const", fast_math=True, static_dims=static_dims or {}, target=tgt, use_int_kernels=True)
    with tgt:
        mod = relax_passes(tgt)(low.mod)
    mod = schedule_defaults(mod, tgt)
    return {gv.name_hint: f.script() for gv, f in mod.functions.items() if hasattr(f, "body")
            and not hasattr(f, "ret_struct_info") and gv.name_hint != "main"}


def _run(m: Module, inputs: list[torch.Tensor], **opts: Any) -> list[torch.Tensor]:
    import tvm
    from tvm import relax

    comp = compile_module(m, options=BuildOptions(**opts))
    vm = relax.VirtualMachine(comp.executable, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x.numpy())) for x in inputs])
    outs = [out] if hasattr(out, "numpy") else list(out)
    return [torch.from_numpy(o.numpy()) for o in outs]


def _one_row_linear(n: int, k: int, *, bias: bool, act: str | None, rows: int | str = 1) -> Module:
    m = Module("one_row_linear")
    x = m.add_input("x", TensorType([1, rows, k], "f32"))
    m.add_param("w", torch.randn(n, k, generator=_g(n * 7 + k)) / k ** 0.5)
    ins = [x, m.param("w")]
    if bias:
        m.add_param("b", torch.randn(n, generator=_g(n)))
        ins.append(m.param("b"))
    y = m.create_node("linear", ins, {}).output
    if act:
        y = m.create_node(act, [y], {}).output
    m.set_outputs([y])
    return m


@pytest.mark.parametrize(("n", "k", "bias", "act"), [
    (48, 64, True, "gelu"),    # MLP-up shaped: bias + activation epilogue fused per output chunk
    (37, 64, False, None),     # ragged N (like a 50257-word LM head): one output row per task
    (64, 128, True, None),
    (24, 40, True, "relu"),    # K not a multiple of the vector width: GemvRule declines, still correct
])
def test_one_row_linear_streams_nk_weight(n: int, k: int, bias: bool, act: str | None) -> None:
    m = _one_row_linear(n, k, bias=bias, act=act)
    funcs = _scheduled(m)
    matvec = [s for name, s in funcs.items() if "matvec" in name]
    assert len(matvec) == 1, sorted(funcs)
    # the weight enters as stored ([N, K]), not transposed to [K, N]
    assert f"T.Buffer((T.int64({n}), T.int64({k})), \"float32\")" in matvec[0], matvec[0]
    from ctc.backends.tvm.schedules import vector_lanes

    if k % vector_lanes(resolve("cpu").target()) == 0:
        assert "_rf_local" in matvec[0] and "T.parallel" in matvec[0], matvec[0]
    x = torch.randn(1, 1, k, generator=_g(3))
    got = _run(m, [x])
    torch.testing.assert_close(got[0], interpret(m, [x])[0], **TOL)


def test_many_rows_keep_the_matmul_layout() -> None:
    m = _one_row_linear(48, 64, bias=True, act=None, rows="s")
    funcs = _scheduled(m)
    assert not any("matvec" in name for name in funcs), sorted(funcs)
    x = torch.randn(1, 5, 64, generator=_g(4))
    torch.testing.assert_close(_run(m, [x])[0], interpret(m, [x])[0], **TOL)


def test_symbolic_rows_bound_to_one_use_the_gemv_path() -> None:
    m = _one_row_linear(48, 64, bias=True, act=None, rows="s")
    funcs = _scheduled(m, {"s": 1})
    assert any("matvec" in name and "_rf_local" in s for name, s in funcs.items()), sorted(funcs)


def test_one_row_lowrank_linear() -> None:
    m = Module("one_row_lowrank")
    x = m.add_input("x", TensorType([1, 1, 64], "f32"))
    m.add_param("u", torch.randn(32, 16, generator=_g(5)))
    m.add_param("v", torch.randn(16, 64, generator=_g(6)))
    m.add_param("b", torch.randn(32, generator=_g(7)))
    y = m.create_node("lowrank_linear", [x, m.param("u"), m.param("v"), m.param("b")], {"rank": 16}).output
    m.set_outputs([y])
    assert sum("matvec" in name for name in _scheduled(m)) == 2
    xin = torch.randn(1, 1, 64, generator=_g(8))
    torch.testing.assert_close(_run(m, [xin])[0], interpret(m, [xin])[0], **TOL)


def test_one_row_layer_norm_is_not_parallel_over_elements() -> None:
    m = Module("one_row_ln")
    x = m.add_input("x", TensorType([1, 1, 96], "f32"))
    m.add_param("g", torch.randn(96, generator=_g(9)))
    m.add_param("b", torch.randn(96, generator=_g(10)))
    y = m.create_node("layer_norm", [x, m.param("g"), m.param("b")], {"normalized_ndim": 1, "eps": 1e-5}).output
    m.set_outputs([y])
    funcs = _scheduled(m)
    ln = [s for name, s in funcs.items() if "layer_norm" in name]
    assert len(ln) == 1 and "T.parallel" not in ln[0], ln
    xin = torch.randn(1, 1, 96, generator=_g(11))
    torch.testing.assert_close(_run(m, [xin])[0], interpret(m, [xin])[0], **TOL)


def test_many_row_layer_norm_is_parallel_over_rows() -> None:
    m = Module("rows_ln")
    x = m.add_input("x", TensorType([1, 8, 96], "f32"))
    y = m.create_node("layer_norm", [x], {"normalized_ndim": 1, "eps": 1e-5}).output
    m.set_outputs([y])
    ln = [s for name, s in _scheduled(m).items() if "layer_norm" in name]
    assert len(ln) == 1 and "T.parallel(T.int64(8))" in ln[0], ln
    xin = torch.randn(1, 8, 96, generator=_g(12))
    torch.testing.assert_close(_run(m, [xin])[0], interpret(m, [xin])[0], **TOL)


def test_profile_lists_kernels(tmp_path: Any) -> None:
    from ctc.backends.tvm.build import load_compiled

    m = _one_row_linear(48, 64, bias=True, act="gelu")
    compile_module(m).export(tmp_path)
    rows = load_compiled(tmp_path).profile(torch.randn(1, 1, 64, generator=_g(13)), runs=2)
    names = [r.name for r in rows]
    assert any("matvec" in n for n in names), names
    mv = next(r for r in rows if "matvec" in r.name)
    assert mv.calls_per_run == 1 and mv.ms_per_run > 0
    assert rows == sorted(rows, key=lambda r: -r.ms_per_run)
    with pytest.raises(ValueError, match="runs must be >= 1"):
        load_compiled(tmp_path).profile(torch.randn(1, 1, 64), runs=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_captured_decode_step_end_to_end(kind: str, tmp_path: Any) -> None:
    """A tiny HF decoder's decode step (explicit KV cache) through TVM: every linear takes the GEMV
    path, and logits and grown caches match eager PyTorch."""
    transformers = pytest.importorskip("transformers")
    from ctc.backends.tvm.build import load_compiled
    from ctc.frontends import capture
    from ctc.frontends.decode import decode_inputs, decode_step

    torch.manual_seed(0)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=61, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=61, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=64))
    step = decode_step(model.eval())
    ins = decode_inputs(model, past=9, seed=1)
    m = capture(step, ins, dynamic=False)
    n_linear = sum(1 for n in m.nodes if n.op == "linear")
    funcs = _scheduled(m)
    assert sum(1 for name, s in funcs.items() if "matvec" in name and "_rf_local" in s) >= min(n_linear, 4)
    compile_module(m).export(tmp_path)
    got = load_compiled(tmp_path)(ins)
    with torch.no_grad():
        ref = step(**ins)
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize(("hq", "hk", "n", "mask"), [(4, 4, 11, "bool"), (6, 2, 11, "add"), (4, 2, 11, None),
                                                    (9, 3, 80, "bool"), (6, 3, 100, "prefix")])
def test_one_query_attention_is_one_kernel(hq: int, hk: int, n: int, mask: str | None) -> None:
    """sdpa with one query (a decode step): one kernel (decode_attention.py) reading the KV cache as
    stored (neither transposed nor repeated for GQA), keys split into parallel chunks when the cache is
    long enough; same numbers as interpret, also when whole chunks are masked (``prefix``: only the
    first keys are valid, as in a preallocated cache)."""
    from ctc.backends.tvm.decode_attention import key_splits

    m = Module("one_query_sdpa")
    q = m.add_input("q", TensorType([1, hq, 1, 16], "f32"))
    k = m.add_input("k", TensorType([1, hk, n, 16], "f32"))
    v = m.add_input("v", TensorType([1, hk, n, 16], "f32"))
    ins = [q, k, v]
    if mask in ("bool", "prefix"):
        ins.append(m.add_input("mask", TensorType([1, 1, 1, n], "bool")))
    elif mask == "add":
        ins.append(m.add_input("mask", TensorType([1, hq, 1, n], "f32")))
    y = m.create_node("scaled_dot_product_attention", ins, {"enable_gqa": hq != hk}).output
    m.set_outputs([y])
    funcs = _scheduled(m)
    assert not any("repeat" in n or "transpose" in n for n in funcs), sorted(funcs)
    kernels = [nm for nm in funcs if nm.startswith("kv_attend_float32")]
    assert len(kernels) == 1 and not any("scores" in nm or "softmax" in nm for nm in funcs), sorted(funcs)
    splits = key_splits(hk, n, resolve("cpu").target().attrs["num-cores"])
    assert kernels[0].endswith(f"_s{splits}")
    g = _g(20 + hq)
    feed = [torch.randn(1, hq, 1, 16, generator=g), torch.randn(1, hk, n, 16, generator=g),
            torch.randn(1, hk, n, 16, generator=g)]
    if mask == "bool":
        feed.append(torch.rand(1, 1, 1, n, generator=g) > 0.3)
    elif mask == "prefix":
        feed.append(torch.arange(n).reshape(1, 1, 1, n) < 7)
    elif mask == "add":
        feed.append(torch.randn(1, hq, 1, n, generator=g))
    torch.testing.assert_close(_run(m, feed)[0], interpret(m, feed)[0], **TOL)


def test_key_splits_balance_the_threads() -> None:
    from ctc.backends.tvm.decode_attention import MIN_CHUNK, key_splits

    assert key_splits(3, 129, 2) == 2  # SmolLM2's 3 kv heads on 2 threads: 6 tasks, 3 each
    assert key_splits(4, 2048, 2) == 1  # already even
    assert key_splits(9, 2048, 4) == 4  # 36 tasks on 4 threads
    assert key_splits(3, 2 * MIN_CHUNK - 1, 2) == 1  # too few keys to split
    assert key_splits(3, 2048, 1) == 1


def test_many_queries_keep_the_matmul_attention() -> None:
    m = Module("prefill_sdpa")
    q = m.add_input("q", TensorType([1, 4, "s", 16], "f32"))
    k = m.add_input("k", TensorType([1, 2, "s", 16], "f32"))
    v = m.add_input("v", TensorType([1, 2, "s", 16], "f32"))
    m.set_outputs([m.create_node("scaled_dot_product_attention", [q, k, v],
                                 {"enable_gqa": True, "is_causal": True}).output])
    funcs = _scheduled(m)
    assert not any("scores" in n or "attn_values" in n for n in funcs), sorted(funcs)
    g = _g(30)
    feed = [torch.randn(1, 4, 7, 16, generator=g), torch.randn(1, 2, 7, 16, generator=g),
            torch.randn(1, 2, 7, 16, generator=g)]
    torch.testing.assert_close(_run(m, feed)[0], interpret(m, feed)[0], **TOL)


def test_symbolic_rows_narrow_matmul_uses_vecmat() -> None:
    """Attention's p v in an any-length build ([h, s, s] x [h, s, 32]): MatmulRule would pad and copy
    the whole probability matrix, so VecMatRule takes it (no padded copy); a fixed length keeps
    MatmulRule's register tile."""
    m = Module("pv")
    p = m.add_input("p", TensorType([3, "s", "s"], "f32"))
    v = m.add_input("v", TensorType([3, "s", 32], "f32"))
    m.set_outputs([m.create_node("matmul", [p, v], {}).output])
    dyn = [s for n, s in _scheduled(m).items() if "matmul" in n]
    assert len(dyn) == 1 and "_pad" not in dyn[0] and "T.vectorized" in dyn[0], dyn
    fixed = [s for n, s in _scheduled(m, {"s": 16}).items() if "matmul" in n]
    assert len(fixed) == 1 and "matmul_global" in fixed[0] and "_pad" not in fixed[0], fixed  # the register tile
    g = _g(40)
    feed = [torch.rand(3, 13, 13, generator=g), torch.randn(3, 13, 32, generator=g)]
    torch.testing.assert_close(_run(m, feed)[0], interpret(m, feed)[0], **TOL)


def test_symbolic_last_axis_elementwise_is_a_plain_loop() -> None:
    """An elementwise kernel whose last axis is symbolic (an any-length build's ``[B, S, S]`` mask or bias) keeps
    that axis a plain loop for LLVM to vectorize with a scalar tail: split into 16 lanes it needed a predicate,
    and the predicated vector loop ran lane by lane (MiniLM's any-length mask kernel: 0.83 ms, plain 0.004 ms)."""
    m = Module("any_length_bias")
    x = m.add_input("x", TensorType(["b", "s", "s"], "f32"))
    y = m.add_input("y", TensorType(["b", 1, "s"], "f32"))
    m.set_outputs([m.create_node("add", [x, y], {}).output])
    add = [s for name, s in _scheduled(m).items() if "add" in name]
    assert len(add) == 1 and "T.parallel" in add[0] and "T.vectorized" not in add[0] and "T.where" not in add[0], add
    for b, s in ((1, 37), (2, 64)):
        xin, yin = torch.randn(b, s, s, generator=_g(s)), torch.randn(b, 1, s, generator=_g(s + 1))
        torch.testing.assert_close(_run(m, [xin, yin])[0], xin + yin)
