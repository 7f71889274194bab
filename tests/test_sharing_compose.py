"""Tying composes with quantization and low rank: each shared weight is quantized (or factorised) once, read by
every member, bound once.

``share-blocks`` / ``recursive`` then ``rptq`` (RTN and GPTQ) or ``quantize``: the linears of a
group read one integer weight (one channel order for all the activations that feed it), the
model stays close to the tied float model, and the TVM build holds each packed weight once.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny_transformers import outlier_inputs, tiny_transformer

from ctc.ir.graph import Module
from ctc.ir.interpreter import interpret
from ctc.ir.verify import verify
from ctc.passes.base import PassContext, get_pass
from ctc.passes.block_tying import param_reads


def tied(kind: str, tying: str) -> tuple[Module, list[dict[str, torch.Tensor]]]:
    m = tiny_transformer(kind, layers=4, seq=8, seed=3)
    m.meta["block_prefix"] = "layers"
    calib = outlier_inputs(m, 3)
    opts = {"groups": [[0, 1, 2]]} if tying == "share-blocks" else {"loops": 2, "rank": 2}
    return get_pass(tying)(opts).run(m, PassContext(calibration=calib)), calib


def quantized(m: Module, calib: list[dict[str, torch.Tensor]], name: str, opts: dict) -> Module:
    out = get_pass(name)(opts).run(m.clone(), PassContext(calibration=calib))
    verify(out)
    return out


def qweight_readers(m: Module) -> Counter[str]:
    """How many quant_linear nodes read each integer weight parameter."""
    out: Counter[str] = Counter()
    for n in m.nodes:
        if n.op == "quant_linear":
            q = n.operand("qweight")
            assert q is not None and q.producer is not None
            out[q.producer.attrs["name"]] += 1
    return out


CASES = [("llama", "share-blocks", "rptq", {"w_bits": 8, "a_bits": 8, "clusters": 4}),
         ("bert", "share-blocks", "rptq", {"w_bits": 4, "a_bits": 8, "clusters": 2, "gptq": True}),
         ("llama", "share-blocks", "rptq", {"w_bits": 4, "a_bits": 8}),  # clusters="auto": one choice per tie
         ("llama", "recursive", "rptq", {"w_bits": 8, "a_bits": 8, "clusters": 4}),
         ("llama", "share-blocks", "quantize", {"w_bits": 8, "a_bits": 8}),
         ("bert", "recursive", "quantize", {"w_bits": 4, "a_bits": 16, "w_granularity": "group", "group_size": 8})]


@pytest.mark.parametrize(("kind", "tying", "name", "opts"), CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_each_shared_weight_is_quantized_once(kind: str, tying: str, name: str, opts: dict) -> None:
    m, calib = tied(kind, tying)
    shared = {k: c for k, c in param_reads(m).items() if c > 1 and m.params[k].dim() == 2}
    assert shared
    q = quantized(m, calib, name, opts)
    readers = qweight_readers(q)
    # one integer weight per shared float weight, read by all its former readers
    assert sorted(c for c in readers.values() if c > 1) == sorted(shared.values())
    assert len([k for k in q.params if k.endswith(".qweight")]) == len(readers)
    for b in calib:
        ref, got = interpret(m, b)[0], interpret(q, b)[0]
        cos = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0)
        assert cos > (0.98 if opts["w_bits"] == 8 else 0.9)


def test_tied_and_quantized_model_compiles_for_the_cpu_with_each_packed_weight_once(tmp_path: Path) -> None:
    pytest.importorskip("tvm")
    from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled

    m, calib = tied("llama", "share-blocks")
    q = quantized(m, calib, "rptq", {"w_bits": 8, "a_bits": 8, "clusters": 4})
    comp = compile_module(q, options=BuildOptions(params="input"))
    # a pack is one weight or several read by one merged GEMM (k|v, gate|up: their names joined by '+')
    packed = Counter(w for p in comp.meta["params"] if p["name"].endswith("_wpack")
                     for w in p["name"].split("::")[0].split("+"))
    assert packed and all(c == 1 for c in packed.values()), packed
    assert set(packed) == set(qweight_readers(q))
    comp.export(tmp_path)
    run = load_compiled(tmp_path, threads=1)
    for b in calib[:2]:
        torch.testing.assert_close(run(b)[0], interpret(q, b)[0], rtol=2e-3, atol=2e-3)


def lowrank_pairs(m: Module) -> dict[tuple[str, str], int]:
    """Per (u, v) parameter pair, how many lowrank_linear nodes read it."""
    out: Counter[tuple[str, str]] = Counter()
    for n in m.nodes:
        if n.op == "lowrank_linear":
            u, v = n.operand("u"), n.operand("v")
            assert u is not None and v is not None and u.producer is not None and v.producer is not None
            out[(u.producer.attrs["name"], v.producer.attrs["name"])] += 1
    return dict(out)


@pytest.mark.parametrize("tying", ["share-blocks", "recursive"])
def test_asvd_factorises_each_shared_weight_once(tying: str) -> None:
    """asvd after tying: a shared weight becomes one low-rank pair that every former reader reads (scaled by
    all its readers' activations), and activation-aware scaling beats plain SVD on the tied model."""
    m, calib = tied("llama", tying)
    shared = {k: c for k, c in param_reads(m).items() if c > 1 and m.params[k].dim() == 2}
    cos: dict[str, float] = {}
    for scaling in ("abs_mean", "none"):
        q = quantized(m, calib, "asvd", {"ratio": 0.7, "scaling": scaling, "allocation": "uniform"})
        pairs = lowrank_pairs(q)
        assert not set(shared) & set(q.params)  # every shared dense weight went
        got = {u[: -len(".lowrank_u")] + ".weight": c for (u, _), c in pairs.items()}
        assert {k: got.get(k) for k in shared} == shared  # one pair per shared weight, all its readers
        assert len(pairs) == len({u for u, _ in pairs}) == len({v for _, v in pairs})
        cos[scaling] = min(float(torch.nn.functional.cosine_similarity(
            interpret(m, b)[0].flatten(), interpret(q, b)[0].flatten(), dim=0)) for b in calib)
    assert cos["abs_mean"] > cos["none"] and cos["abs_mean"] > 0.95


@pytest.mark.slow  # a TVM build (~1-3 min on 2 shared cores); CI checks the binding in test_shared_params_once
def test_tied_low_rank_quantized_model_compiles_for_the_cpu_with_each_tensor_once(tmp_path: Path) -> None:
    """share-blocks + asvd + rptq in one pipeline, built for the TVM CPU target: each shared pair and each
    packed weight is bound once, and the library computes what the interpreter does."""
    pytest.importorskip("tvm")
    from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled
    from ctc.passes.base import Selector
    from ctc.passes.manager import PassManager, Step

    m = tiny_transformer("llama", layers=4, seq=8, seed=3)
    m.meta["block_prefix"] = "layers"
    calib = outlier_inputs(m, 3)
    steps = [Step(get_pass("share-blocks")({"groups": [[0, 1, 2]]}), Selector()),
             Step(get_pass("asvd")({"ratio": 0.8, "allocation": "uniform"}), Selector(blocks=((0, 3),))),
             Step(get_pass("rptq")({"w_bits": 8, "a_bits": 8, "clusters": 4}), Selector())]
    q, _ = PassManager(steps, calibration=calib, progress=False).run(m)
    assert {n.block for n in q.nodes if n.op == "lowrank_linear"} == {0, 1, 2}
    assert {n.block for n in q.nodes if n.op == "quant_linear"} == {3}
    comp = compile_module(q, options=BuildOptions(params="input"))
    bound = Counter(p["name"].split("::")[0] for p in comp.meta["params"])
    shared_pairs = [k for (u, v), c in lowrank_pairs(q).items() if c > 1 for k in (u, v)]
    assert shared_pairs and all(bound[k] == 1 for k in shared_pairs)
    # a pack is one weight or several read by one merged GEMM (k|v, gate|up: their names joined by '+')
    packed = Counter(w for p in comp.meta["params"] if p["name"].endswith("_wpack")
                     for w in p["name"].split("::")[0].split("+"))
    assert packed and all(c == 1 for c in packed.values()), packed
    comp.export(tmp_path)
    run = load_compiled(tmp_path, threads=1)
    for b in calib[:2]:
        torch.testing.assert_close(run(b)[0], interpret(q, b)[0], rtol=2e-3, atol=2e-3)
