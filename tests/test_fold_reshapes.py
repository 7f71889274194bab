"""build.fold_reshapes: reshape chains read their first input; a reshape back to that input's shape vanishes."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("tvm")


def _chain() -> object:
    """``x [b, 4, 6]`` (b symbolic) -> reshape [4b, 6] -> exp -> reshape [b, 4, 6] -> reshape [4b, 6] -> exp ->
    reshape [b, 24] -> reshape [b, 4, 6] (the output), as rules that reshape around their kernels emit."""
    import tvm
    from tvm import relax, tirx

    b = tirx.Var("b", "int64")
    x = relax.Var("x", relax.TensorType([b, 4, 6], "float32"))
    bb = relax.BlockBuilder()
    op = relax.op
    with bb.function("main", [x]):
        with bb.dataflow():
            r1 = bb.emit(op.reshape(x, [b * 4, 6]))
            e1 = bb.emit(op.exp(r1))
            r2 = bb.emit(op.reshape(e1, [b, 4, 6]))
            r3 = bb.emit(op.reshape(r2, [b * 4, 6]))  # back to e1's shape: e1 itself
            e2 = bb.emit(op.exp(r3))
            r4 = bb.emit(op.reshape(e2, [b, 24]))
            r5 = bb.emit(op.reshape(r4, [b, 4, 6]))  # reads e2: one reshape, not two
            out = bb.emit_output(r5)
        bb.emit_func_output(out)
    del tvm
    return bb.get()


def test_reshape_pairs_cancel_and_chains_read_their_first_input() -> None:
    import tvm
    from tvm import relax

    from ctc.backends.tvm.build import fold_reshapes

    mod = _chain()
    folded = fold_reshapes()(mod)
    before = mod["main"].script().count("R.reshape(")
    after = folded["main"].script()
    assert before >= 4 and after.count("R.reshape(") == 2, after  # into exp, and e2 -> the output
    assert len(re.findall(r"R\.exp\(", after)) == 2
    xs = np.random.default_rng(0).standard_normal((3, 4, 6)).astype("float32")
    outs = []
    for m in (mod, folded):
        ex = tvm.compile(m, "llvm")
        outs.append(relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(xs)).numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[1], np.exp(np.exp(xs)), rtol=1e-6)
