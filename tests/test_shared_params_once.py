"""Stored once, loaded once: a tensor several nodes read is one tensor in every output.

Checked on every backend that holds parameters: the artifact's safetensors, the torch (fx)
backend's buffers, the TVM CPU build (the arrays its lowering binds, and the built library run
against the interpreter), the TVM CUDA lowering (no GPU needed) and the fpga design's weight
blob, on a tied-embedding LM and on the outputs of the sharing passes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_transformers import outlier_inputs, tiny_transformer

from ctc.artifact import PARAMS_FILE, write_artifact
from ctc.ir import Module, TensorType
from ctc.ir.interpreter import interpret
from ctc.passes.base import PassContext, get_pass
from ctc.passes.block_tying import param_reads


def tied_lm(vocab: int = 40, d: int = 16, seq: int = 8) -> Module:
    """ids -> embedding(E) -> two linears reading one shared W -> head linear reading E (tied)."""
    g = torch.Generator().manual_seed(0)
    m = Module("tied")
    ids = m.add_input("ids", TensorType((1, seq), "i64"))
    m.add_param("emb", torch.randn(vocab, d, generator=g))
    m.add_param("shared.w", torch.randn(d, d, generator=g) * d ** -0.5)
    h = m.create_node("embedding", {"ids": ids, "weight": m.param("emb", block=None)}).output
    for b in range(2):
        y = m.create_node("linear", {"x": h, "weight": m.param("shared.w", block=b)}, block=b, scope=f"l.{b}")
        h = m.create_node("add", {"a": h, "b": y.output}, block=b, scope=f"l.{b}").output
    head = m.create_node("linear", {"x": h, "weight": m.param("emb")}, scope="lm_head")
    m.set_outputs([head.output], ["logits"])
    return m


def shared_models() -> list[tuple[str, Module, list[dict[str, torch.Tensor]]]]:
    out = [("tied", tied_lm(), [{"ids": torch.randint(0, 40, (1, 8), generator=torch.Generator().manual_seed(1))}])]
    base = tiny_transformer("llama", layers=4, seq=8)
    base.meta["block_prefix"] = "layers"
    calib = outlier_inputs(base, 2)
    for name, opts in (("share-blocks", {"groups": [[0, 1, 2]]}), ("recursive", {"loops": 2, "rank": 3})):
        m = get_pass(name)(opts).run(base.clone(), PassContext(calibration=calib))
        out.append((name, m, calib))
    asvd = get_pass("asvd")({"ratio": 0.7, "allocation": "uniform"})
    low = asvd.run(out[1][1].clone(), PassContext(calibration=calib))
    out.append(("share-blocks+asvd", low, calib))  # each shared weight one low-rank pair read by every member
    return out


MODELS = shared_models()


def shared_names(m: Module) -> list[str]:
    return [k for k, c in param_reads(m).items() if c > 1]


@pytest.mark.parametrize(("name", "m", "_"), MODELS, ids=[x[0] for x in MODELS])
def test_artifact_stores_each_shared_tensor_once(tmp_path: Path, name: str, m: Module, _: object) -> None:
    from safetensors import safe_open

    assert shared_names(m), "the model must share something"
    dest = write_artifact(tmp_path / name, module=m, report={"name": name})
    with safe_open(str(dest / PARAMS_FILE), "pt") as f:
        keys = list(f.keys())
        stored = {k: f.get_tensor(k) for k in keys}
    assert sorted(keys) == sorted(m.params)
    assert sum(t.numel() * t.element_size() for t in stored.values()) == m.param_bytes()
    for k in shared_names(m):  # no second tensor holds the same values
        same = [j for j, t in stored.items() if t.shape == stored[k].shape and torch.equal(t, stored[k])]
        assert same == [k]


@pytest.mark.parametrize(("name", "m", "_"), MODELS, ids=[x[0] for x in MODELS])
def test_torch_backend_registers_each_tensor_once(name: str, m: Module, _: object) -> None:
    from ctc.backends.torch_fx import to_graph_module

    gm = to_graph_module(m)
    buffers = dict(gm.named_buffers())
    assert len(buffers) == len(m.params)
    reads = Counter(n.target for n in gm.graph.nodes if n.op == "get_attr")
    for k in shared_names(m):
        assert reads[gm.param_names[k]] == param_reads(m)[k]  # every reader gets the one buffer
        assert buffers[gm.param_names[k]].data_ptr() == m.params[k].data_ptr()


def full_size_copies(m: Module, bound: list[tuple[str, object]]) -> dict[str, int]:
    """Per parameter, how many arrays of at least half its size the lowering bound (copies of it)."""
    count: Counter[str] = Counter()
    for key, arr in bound:
        name = key.split("::")[0]
        if name in m.params and arr.nbytes * 2 >= m.params[name].numel() * m.params[name].element_size():
            count[name] += 1
    return dict(count)


@pytest.mark.parametrize(("name", "m", "_"), MODELS, ids=[x[0] for x in MODELS])
def test_tvm_lowering_binds_each_shared_tensor_once(name: str, m: Module, _: object) -> None:
    pytest.importorskip("tvm")
    from ctc.backends.tvm.lower import lower

    for dims in ({}, {"seq": 1}):  # several rows (transposed layout) and the one-row layout
        low = lower(m, params="input", static_dims=dims)
        copies = full_size_copies(m, low.param_inputs)
        assert all(c == 1 for c in copies.values()), copies
        assert set(shared_names(m)) <= set(copies)


@pytest.mark.parametrize(("name", "m", "_"), MODELS, ids=[x[0] for x in MODELS])
def test_cuda_lowering_binds_each_shared_tensor_once(name: str, m: Module, _: object) -> None:
    tvm = pytest.importorskip("tvm")
    from ctc.backends.tvm.lower import lower

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm"}})
    low = lower(m, params="input", static_dims={"seq": 8} if name == "tied" else {}, target=target)
    copies = full_size_copies(m, low.param_inputs)
    assert all(c == 1 for c in copies.values()), copies
    assert set(shared_names(m)) <= set(copies)


@pytest.mark.parametrize(("name", "m", "_"), MODELS, ids=[x[0] for x in MODELS])
def test_fpga_design_writes_each_shared_tensor_once(tmp_path: Path, name: str, m: Module, _: object) -> None:
    pytest.importorskip("tvm")
    from ctc.backends.hls.design import lower_design, write_design
    from ctc.backends.hls.exact import unsupported_ops

    if unsupported_ops(m):
        pytest.skip(f"the fpga target does not lower {sorted(unsupported_ops(m))}")
    write_design(lower_design(m, {}, {}), m, tmp_path)
    blob = (tmp_path / "weights.bin").stat().st_size
    align = 64 * len(m.params)  # each tensor starts aligned
    assert blob <= m.param_bytes() + align < m.read_param_bytes()


def test_tvm_build_of_a_tied_model_runs_and_holds_the_table_once(tmp_path: Path) -> None:
    pytest.importorskip("tvm")
    from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled

    m = tied_lm(vocab=300, d=64)
    comp = compile_module(m, options=BuildOptions(params="input"))
    comp.export(tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    emb_arrays = [p for p in meta["params"] if p["name"].split("::")[0] == "emb"]
    assert len(emb_arrays) == 1 and sorted(emb_arrays[0]["shape"]) == [64, 300]
    run = load_compiled(tmp_path, threads=1)
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(run({"ids": ids})[0], interpret(m, {"ids": ids})[0], rtol=1e-4, atol=1e-4)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 100), lo=st.integers(0, 2), recursive=st.booleans())
def test_tied_models_hold_each_tensor_once_everywhere(seed: int, lo: int, recursive: bool) -> None:
    """Property: after tying, no two parameters hold equal tensors, every member reads the tied tensor, and the
    TVM lowering binds each tied tensor in one layout."""
    pytest.importorskip("tvm")
    from ctc.backends.tvm.lower import lower

    base = tiny_transformer("llama", layers=4, seq=8, seed=seed)
    base.meta["block_prefix"] = "layers"
    calib = outlier_inputs(base, 2, seed=seed)
    name, opts = (("recursive", {"loops": 2, "rank": 2}) if recursive
                  else ("share-blocks", {"groups": [[lo, lo + 1]], "coefficients": "none"}))
    m = get_pass(name)(opts).run(base.clone(), PassContext(calibration=calib))
    mats = [(k, t) for k, t in m.params.items() if t.dim() == 2]
    for i, (a, ta) in enumerate(mats):
        for b, tb in mats[i + 1:]:
            assert not (ta.shape == tb.shape and torch.equal(ta, tb)), (a, b)
    members = [[0, 1], [2, 3]] if recursive else [[lo, lo + 1]]
    for k in shared_names(m):
        assert sorted({n.block for n in m.nodes if n.op == "param" and n.attrs["name"] == k}) in members
    copies = full_size_copies(m, lower(m, params="input").param_inputs)
    assert all(c == 1 for c in copies.values()) and set(shared_names(m)) <= set(copies)
