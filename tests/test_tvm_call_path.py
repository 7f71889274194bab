"""The loaded library's call path (issue 19): inputs bound without copies when they fit, converted
correctly when they do not, refused with a clear error when they cannot be right; outputs returned
without copies.  Correctness is checked against the reference interpreter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled  # noqa: E402
from ctc.errors import UsageError  # noqa: E402
from ctc.ir import Module, TensorType  # noqa: E402
from ctc.ir.interpreter import interpret  # noqa: E402


def _encoder_like() -> Module:
    """Token ids and a mask in, as a tokenizer gives them: embedding + masked linear + GELU."""
    g = torch.Generator().manual_seed(0)
    m = Module("enc")
    ids = m.add_input("input_ids", TensorType(("batch", "seq"), "i64"))
    mask = m.add_input("attention_mask", TensorType(("batch", "seq"), "i64"))
    m.add_param("emb", torch.randn(50, 16, generator=g))
    m.add_param("w", torch.randn(16, 16, generator=g) * 0.3)
    m.add_param("b", torch.randn(16, generator=g))

    def n(op: str, ins: list[Any], **attrs: Any) -> Any:
        return m.create_node(op, ins, attrs).output

    h = n("embedding", [ids, m.param("emb")])
    keep = n("unsqueeze", [n("cast", [mask], dtype="f32")], axis=2)
    h = n("gelu", [n("linear", [n("mul", [h, keep]), m.param("w"), m.param("b")])])
    m.set_outputs([h], ["last_hidden_state"])
    return m


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> tuple[Module, Any]:
    m = _encoder_like()
    d: Path = tmp_path_factory.mktemp("call_path")
    compile_module(m, options=BuildOptions()).export(d)
    return m, load_compiled(d, threads=1)


def _inputs(seq: int = 7) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 50, (1, seq), generator=torch.Generator().manual_seed(seq))
    mask = torch.ones(1, seq, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_fitting_inputs_are_bound_without_a_copy(lib: tuple[Module, Any]) -> None:
    m, model = lib
    feed = _inputs()
    keep: list[Any] = []
    args = model._args((feed,), keep)
    assert keep == [], "a contiguous, aligned int64 tensor needs no converted copy"
    for a, t in zip(args, feed.values(), strict=True):
        assert torch.from_dlpack(a).data_ptr() == t.data_ptr(), "the runtime reads the caller's buffer"
    out = model(feed)[0]
    torch.testing.assert_close(out, interpret(m, list(feed.values()))[0], rtol=1e-4, atol=2e-5)
    # numpy in, numpy out: same values, no copy of the inputs either
    arrs = {k: v.numpy() for k, v in feed.items()}
    assert model._args((arrs,), keep) and keep == []
    np.testing.assert_allclose(model(arrs, numpy=True)[0], out.numpy(), rtol=1e-6)


def test_outputs_are_views_of_the_runtime_buffers(lib: tuple[Module, Any]) -> None:
    _, model = lib
    out = model(_inputs())[0]
    assert out.is_contiguous() and out.data_ptr() % 64 == 0
    arr = model(_inputs(), numpy=True)[0]
    assert arr.base is not None, "numpy outputs share the runtime's buffer (no copy)"


def test_extra_tokenizer_inputs_are_ignored_by_name(lib: tuple[Module, Any]) -> None:
    m, model = lib
    feed = _inputs()
    ref = interpret(m, list(feed.values()))[0]
    extra = {**feed, "token_type_ids": torch.zeros_like(feed["input_ids"])}
    torch.testing.assert_close(model(extra)[0], ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("variant", ["int32", "non_contiguous", "unaligned", "bool_mask", "numpy_int32", "lists",
                                     "requires_grad_float_ids_cast_first"])
def test_inputs_that_do_not_fit_are_converted_correctly(lib: tuple[Module, Any], variant: str) -> None:
    m, model = lib
    feed = _inputs(9)
    ref = interpret(m, list(feed.values()))[0]
    ids, mask = feed["input_ids"], feed["attention_mask"]
    if variant == "int32":
        got = {"input_ids": ids.int(), "attention_mask": mask.int()}
    elif variant == "non_contiguous":
        got = {"input_ids": ids.repeat(2, 1).t().contiguous().t()[:1], "attention_mask": mask[:, :].expand(1, 9)}
        assert not got["input_ids"].is_contiguous()
    elif variant == "unaligned":
        buf = torch.zeros(ids.numel() + 1, dtype=torch.long)
        buf[1:] = ids.flatten()
        got = {"input_ids": buf[1:].view(1, 9), "attention_mask": mask}
        assert got["input_ids"].data_ptr() % 64
    elif variant == "bool_mask":
        got = {"input_ids": ids, "attention_mask": mask.bool()}
    elif variant == "numpy_int32":
        got = {"input_ids": ids.numpy().astype(np.int32), "attention_mask": mask.numpy()}
    elif variant == "lists":
        got = {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}
    else:
        got = {"input_ids": ids.to(torch.int16), "attention_mask": mask}
    before = {k: torch.as_tensor(np.asarray(v)).clone() for k, v in got.items()}
    torch.testing.assert_close(model(got)[0], ref, rtol=1e-4, atol=2e-5)
    for k, v in got.items():  # the caller's tensors are never changed
        assert torch.equal(torch.as_tensor(np.asarray(v)), before[k])


@pytest.mark.parametrize(("feed", "message"), [
    (lambda f: {**f, "input_ids": f["input_ids"].float()}, r"'input_ids' must be i64 \(integer\), got torch.float32"),
    (lambda f: {**f, "input_ids": f["input_ids"][0]}, r"'input_ids' must have 2 dims, got shape \(7,\)"),
    (lambda f: {**f, "attention_mask": f["attention_mask"][:, :5]},
     r"'attention_mask' axis 1 is seq = 5, but input 'input_ids' gave seq = 7"),
    (lambda f: {**f, "input_ids": f["input_ids"].to(torch.float64).numpy()},
     r"must be i64 \(integer\), got torch.float64"),
    (lambda f: {"input_ids": f["input_ids"]}, r"missing input 'attention_mask': the compiled model takes input_ids, "
                                              r"attention_mask"),
])
def test_wrong_inputs_are_refused_before_any_kernel(lib: tuple[Module, Any], feed: Any, message: str) -> None:
    _, model = lib
    with pytest.raises(UsageError, match=message):
        model(feed(_inputs()))


def test_integer_narrowing_is_checked_for_overflow(tmp_path: Path) -> None:
    m = Module("i32")
    x = m.add_input("x", TensorType((4,), "i32"))
    m.set_outputs([m.create_node("add", [x], {"scalar": 1}).output])
    compile_module(m).export(tmp_path)
    model = load_compiled(tmp_path, threads=1)
    assert model(torch.tensor([1, 2, 3, 4], dtype=torch.int64))[0].tolist() == [2, 3, 4, 5]
    with pytest.raises(UsageError, match=r"values in \[1, 4294967296\], outside i32"):
        model(torch.tensor([1, 2, 3, 2**32], dtype=torch.int64))
    with pytest.raises(UsageError, match="axis 0 must be 4, got 3"):
        model(torch.tensor([1, 2, 3], dtype=torch.int32))


def test_fixed_shape_build_names_its_sizes(tmp_path: Path) -> None:
    m = _encoder_like()
    compile_module(m, options=BuildOptions(static_dims={"batch": 1, "seq": 8})).export(tmp_path)
    model = load_compiled(tmp_path, threads=1)
    feed = _inputs(8)
    torch.testing.assert_close(model(feed)[0], interpret(m, list(feed.values()))[0], rtol=1e-4, atol=2e-5)
    with pytest.raises(UsageError, match=r"built for fixed shapes \(batch=1, seq=8\): input 'input_ids' axis 1 "
                                         r"must be 8, got 7; give inputs of exactly that size .* or build the "
                                         r"target without fixing it"):
        model(_inputs(7))


def test_profile_on_the_cpu_clock(lib: tuple[Module, Any], tmp_path: Path) -> None:
    """Per-kernel CPU time (for decisions on a shared machine) needs the library on one thread."""
    m, model = lib
    rows = model.profile(_inputs(), runs=2, clock="cpu")
    assert rows and all(r.ms_per_run >= 0 for r in rows)
    assert any("matmul" in r.name or "embedding" in r.name or "take" in r.name for r in rows), [r.name for r in rows]
    compile_module(m).export(tmp_path)
    with pytest.raises(ValueError, match="must run on one CPU thread"):
        load_compiled(tmp_path, threads=2).profile(_inputs(), clock="cpu")
    with pytest.raises(ValueError, match="clock must be 'wall' or 'cpu'"):
        model.profile(_inputs(), clock="gpu")


def test_conversions_stay_off_torchs_thread_pool(tmp_path: Path) -> None:
    """Converting a large input (unaligned, another float width) is numpy's work on the calling thread: a
    torch copy would start torch's OpenMP pool, whose worker then spins on a core the library's threads
    need (2-thread EfficientNet-Lite0 calls ~1.8x slower).  The control (a torch copy) shows the check
    can fail."""
    import subprocess
    import sys

    n = 1 << 17  # 512 KB of f32: above torch's grain size, so a torch copy would run on 2 threads
    m = Module("big")
    x = m.add_input("x", TensorType((n,), "f32"))
    m.set_outputs([m.create_node("add", [x], {"scalar": 1}).output])
    compile_module(m).export(tmp_path)
    code = f"""
import os, numpy as np, torch
torch.set_num_threads(2)
from ctc.backends.tvm.build import load_compiled
model = load_compiled({str(tmp_path)!r}, threads=1)
unaligned = np.arange({n} + 1, dtype=np.float32)[1:]
wide = np.arange({n}, dtype=np.float64)
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
outs = [model(unaligned)[0], model(torch.from_numpy(unaligned))[0], model(wide)[0]]
after = threads()
assert torch.from_numpy(unaligned).data_ptr() % 64
for y, src in zip(outs, [unaligned, unaligned, wide]):
    np.testing.assert_array_equal(y.numpy(), src.astype(np.float32) + 1)
torch.from_numpy(unaligned).clone()  # the control: torch's own copy starts its pool
print(before, after, threads())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    before, after, control = map(int, r.stdout.split())
    assert after == before, "converting the inputs started torch's thread pool"
    assert control > after, "the control should start torch's pool (the check could not fail)"
