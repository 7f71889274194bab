"""Parallel loops of a CPU library claim chunks at run time (ctc/backends/tvm/parallel_pool.c).

Every CPU library carries its own launcher for TVM's parallel loops; loading it points the library's
``__TVMBackendParallelLaunch`` at it.  Each loop is cut into more chunks than threads, the threads claim
them from a shared counter, and the caller waits only for chunks another thread has claimed, so a worker
that never starts delays nothing.  Only the thread that computes an iteration changes: the results are
the same bits as under TVM's own pool.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from test_conv_layout import _block  # noqa: E402

from ctc.backends.tvm.build import compile_module, load_compiled  # noqa: E402
from ctc.ir.interpreter import interpret  # noqa: E402

CHUNKS_PER_THREAD = 4  # parallel_pool.c's default


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path, np.ndarray]:
    m = _block(28)
    d = tmp_path_factory.mktemp("pool")
    compile_module(m).export(d)
    x = np.random.default_rng(0).standard_normal((1, 32, 28, 28)).astype(np.float32)
    return m, d, x


def test_parallel_loops_claim_chunks_and_compute_what_tvms_pool_does(
        lib: tuple[object, Path, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    m, d, x = lib
    monkeypatch.delenv("CTC_PARALLEL_CHUNKS", raising=False)
    monkeypatch.setenv("CTC_PARALLEL", "tvm")
    tvm_pool = load_compiled(d, threads=2)
    assert tvm_pool.parallel == "tvm"
    want = tvm_pool(x, numpy=True)[0].copy()
    monkeypatch.delenv("CTC_PARALLEL")
    model = load_compiled(d, threads=2)
    assert model.parallel == "chunks"
    before = model.parallel_stats()
    for _ in range(3):
        got = model(x, numpy=True)[0]
        assert np.array_equal(got, want)
    s = {k: v - before[k] for k, v in model.parallel_stats().items() if k != "workers"}
    assert s["launches"] >= 3 * 3  # the three convolutions' loops, each call
    assert s["caller_chunks"] + s["worker_chunks"] == s["launches"] * 2 * CHUNKS_PER_THREAD
    assert model.parallel_stats()["workers"] == 1
    one = load_compiled(d, threads=1)  # the latest load's thread count holds for the library (as TVM's pool's)
    launches = one.parallel_stats()["launches"]
    assert np.array_equal(one(x, numpy=True)[0], want) and one.parallel_stats()["launches"] == launches
    import torch

    ref = interpret(m, [torch.from_numpy(x)])[0].numpy()
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_a_forked_child_starts_its_own_workers(lib: tuple[object, Path, np.ndarray], tmp_path: Path) -> None:
    """After fork() the parent's workers are not in the child: its first launch starts its own, every call returns
    the parent's bits, and each launch's chunks are all run (by the caller or the child's worker)."""
    _, d, x = lib
    np.save(tmp_path / "x.npy", x)
    code = f"""
import os, sys, numpy as np
from ctc.backends.tvm.build import load_compiled
x = np.load({str(tmp_path / 'x.npy')!r})
model = load_compiled({str(d)!r}, threads=2)
want = model(x, numpy=True)[0].copy()
assert model.parallel_stats()["workers"] == 1
pid = os.fork()
if pid == 0:
    before = model.parallel_stats()
    ok = all(np.array_equal(model(x, numpy=True)[0], want) for _ in range(3))
    after = model.parallel_stats()
    launched = after["launches"] - before["launches"]
    ran = after["caller_chunks"] + after["worker_chunks"] - before["caller_chunks"] - before["worker_chunks"]
    ok = ok and launched > 0 and ran == launched * 2 * {CHUNKS_PER_THREAD} and after["workers"] == 1
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""
    env = {**os.environ, "CTC_PARALLEL": "chunks"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and "child 0" in r.stdout, r.stdout + r.stderr[-2000:]


def test_unknown_parallel_mode_is_refused(lib: tuple[object, Path, np.ndarray],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTC_PARALLEL", "openmp")
    with pytest.raises(ValueError, match="CTC_PARALLEL='openmp': use 'chunks'"):
        load_compiled(lib[1], threads=2)
