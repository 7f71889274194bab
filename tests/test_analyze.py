"""`ctc analyze`: FLOP and byte counts equal closed-form counts (a GEMM, an attention layer, decode over a KV
cache), the roofs say where they come from (cpu peaks measured once and cached), and bad input is named."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_transformers import tiny_transformer

from ctc.analysis.costs import ATTN_SCORE_FLOPS, module_costs
from ctc.analysis.peaks import Peaks, cuda_peaks, fpga_peaks
from ctc.analysis.roofline import analyze_module, kernel_group, measured_points
from ctc.cli import EXIT_OK, EXIT_USAGE, main
from ctc.ir import Module, TensorType

F32 = 4


def _gemm(k: int = 24, n: int = 40, bias: bool = True) -> Module:
    m = Module("gemm")
    x = m.add_input("x", TensorType(("batch", "seq", k), "f32"))
    m.add_param("w", torch.randn(n, k))
    ins = [x, m.param("w", scope="fc")]
    if bias:
        m.add_param("b", torch.randn(n))
        ins.append(m.param("b", scope="fc"))
    y = m.create_node("linear", ins, scope="fc").output
    m.set_outputs([y], ["y"])
    return m


def test_gemm_counts_equal_closed_form() -> None:
    b, s, k, n = 2, 7, 24, 40
    (c,) = module_costs(_gemm(k, n), {"batch": b, "seq": s})
    assert c.flops == 2 * b * s * n * k + b * s * n
    assert c.bytes_read == F32 * (b * s * k + n * k + n) and c.bytes_written == F32 * b * s * n
    assert c.weight_bytes == F32 * (n * k + n) and c.op_class == "gemm" and c.compute == "f32"
    (nb,) = module_costs(_gemm(k, n, bias=False), {"batch": b, "seq": s})
    assert nb.flops == 2 * b * s * n * k


def test_int4_weights_count_their_stored_bytes() -> None:
    from ctc.passes.base import PassContext, get_pass

    m = _gemm(64, 32, bias=False)
    q = get_pass("quantize")({"w_bits": 4, "a_bits": 8, "w_granularity": "group", "group_size": 32,
                              "blocks_only": False}).run(m, PassContext(calibration=[{"x": torch.randn(1, 5, 64)}]))
    (c,) = [c for c in module_costs(q, {"batch": 1, "seq": 5}) if c.op == "quant_linear"]
    node = next(n for n in q.nodes if n.op == "quant_linear")
    stored = sum(q.params[v.producer.attrs["name"]].numel() * q.params[v.producer.attrs["name"]].element_size()
                 for v in node.inputs if v.producer is not None and v.producer.op == "param")
    assert c.weight_bytes == stored and q.params[node.operand("qweight").producer.attrs["name"]].numel() == 32 * 32
    assert c.compute == "int8" and c.flops == 2 * 5 * 32 * 64


def test_attention_layer_counts_equal_closed_form() -> None:
    b, s, d, h, kvh = 2, 6, 32, 4, 2
    dh, kvd = d // h, kvh * (d // h)
    m = tiny_transformer("llama", d=d, heads=h, kv_heads=kvh, layers=1, batch=b, seq=s)
    layer = [c for c in module_costs(m, {}) if c.block == 0 and (".attn" in c.scope or c.scope.endswith(".ln1"))]
    bsd, bsk = b * s * d, b * s * kvd
    flops = (4 * bsd  # rms_norm
             + 2 * bsd * d + 2 * 2 * b * s * d * kvd  # q, k, v projections
             + b * h * s * s * (2 * dh + ATTN_SCORE_FLOPS + 2 * dh)  # scores, softmax, weighted sum
             + 2 * bsd * d  # output projection
             + bsd)  # residual add
    moved = F32 * ((bsd + d + bsd)  # rms_norm: x, weight -> y
                   + (bsd + d * d + bsd) + 2 * (bsd + kvd * d + bsk)  # q, k, v
                   + 2 * bsd + 2 * 2 * bsk  # transposes into heads (the reshapes are views)
                   + (bsd + 2 * bsk + bsd)  # attention reads q, k, v, writes its output
                   + 2 * bsd  # transpose back
                   + (bsd + d * d + bsd)  # output projection
                   + 3 * bsd)  # residual add
    assert sum(c.flops for c in layer) == flops
    assert sum(c.bytes for c in layer) == moved


def _attention_lm() -> Module:
    b, h, dh = 1, 4, 8
    m = Module("attn")
    m.meta["task"] = "causal_lm"
    qkv = [m.add_input(n, TensorType((b, h, "seq", dh), "f32")) for n in ("q", "k", "v")]
    y = m.create_node("scaled_dot_product_attention", qkv, {"is_causal": True}, scope="layers.0.attn",
                      block=0).output
    m.set_outputs([y], ["y"])
    return m


def test_decode_reads_the_kv_cache_and_prefill_the_whole_prompt() -> None:
    s, h, dh = 96, 4, 8
    a = analyze_module(_attention_lm(), fpga_peaks("u280"), seq_len=s)
    pre, dec = a.phase("prefill").costs[0], a.phase("decode").costs[0]
    assert pre.flops == h * s * s * (4 * dh + ATTN_SCORE_FLOPS)
    assert pre.bytes == F32 * 4 * h * s * dh
    assert dec.flops == h * s * (4 * dh + ATTN_SCORE_FLOPS)
    assert dec.bytes == F32 * (h * dh + 2 * h * s * dh + h * dh), "q, the cached keys and values, the output"
    assert "reads 96 cached" in dec.notes[0]


def test_roofline_bound_and_groups() -> None:
    peaks = Peaks("cpu", "test", {"f32": 1e11, "f16": 1e11, "int8": 4e11}, 1e10, "test numbers", False)
    a = analyze_module(tiny_transformer("llama", layers=2, batch=1, seq=64), peaks)
    (ph,) = a.phases
    assert ph.name == "forward"
    for c in ph.costs:
        t, bound = ph.bound_s(c, peaks)
        assert t == max(c.flops / 1e11, c.bytes / 1e10)
        assert bound == ("compute" if c.flops / 1e11 > c.bytes / 1e10 else "memory")
    groups = ph.groups(peaks)
    up = next(g for g in groups if g["where"] == "layers.*.mlp.up")
    assert up["count"] == 2 and up["op"] == "linear"
    assert math.isclose(sum(g["bound_ms"] for g in groups), ph.totals(peaks)["bound_ms"])


def test_measured_points_and_kernel_groups() -> None:
    assert kernel_group("fused_matmul_add1") == "gemm" and kernel_group("fused_softmax_cast") == "attention"
    assert kernel_group("vm.builtin.alloc_storage") == "runtime" and kernel_group("fused_rms_norm1") == "norm"
    ph = analyze_module(tiny_transformer("llama", layers=1, batch=1, seq=8), fpga_peaks()).phases[0]
    gemm = ph.classes()["gemm"]
    pts = measured_points(ph, [{"kernel": "fused_matmul", "ms_per_run": 2.0},
                               {"kernel": "vm.builtin.x", "ms_per_run": 9.0}], latency_ms=4.0)
    by = {p["label"]: p for p in pts}
    assert by["gemm kernels (measured)"]["flops_per_s"] == gemm["flops"] / 2e-3
    assert by["whole model (measured latency)"]["ms"] == 4.0 and len(pts) == 2


def test_peaks_state_their_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctc.analysis import peaks as P

    assert "data sheet" in cuda_peaks("h200").source and cuda_peaks("h200").bandwidth == 4.8e12
    z = fpga_peaks("zc706")
    assert z.flops["int8"] == 900 * 1 * 2 * 200e6 and z.bandwidth == 12.8e9 and "DS190" in z.source
    calls = []

    def fake() -> dict:
        calls.append(1)
        return {"f32": 5e10, "int8": 5e10, "bw": 8e9, "threads": 2, "version": P.PEAKS_VERSION}

    monkeypatch.setattr(P, "measure_cpu", fake)
    cache = tmp_path / "peaks.json"
    first = P.cpu_peaks(cache=cache)
    again = P.cpu_peaks(cache=cache)
    assert len(calls) == 1 and first == again and first.measured and "measured on this machine" in first.source
    P.cpu_peaks(cache=cache, remeasure=True)
    assert len(calls) == 2


def test_cli_analyze_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ctc.artifact import write_artifact

    art = tmp_path / "art"
    module = _attention_lm()
    write_artifact(art, module=module, report={"name": "attn", "protocol": {"evaluate": {"seq_len": 48}}},
                   log=lambda _: None)
    assert main(["analyze", str(art), "--target", "cuda", "--gpu", "a100", "--json", "--per-op"]) == EXIT_OK
    res = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in res["phases"]] == ["prefill", "decode"] and res["phases"][0]["dims"] == {"seq": 48}
    assert res["target"]["device"] == "NVIDIA A100 SXM4 80GB" and len(res["phases"][1]["ops"]) == 1
    html_file = tmp_path / "roof.html"
    assert main(["analyze", str(art), "--target", "fpga", "--seq-len", "16", "--html", str(html_file)]) == EXIT_OK
    text = capsys.readouterr().out
    assert "== prefill: prompt of 16 tokens" in text and "== decode: one new token after 16" in text
    assert "<svg" in html_file.read_text()
    for argv, msg in ((["--target", "gpu"], "unknown target 'gpu' for the roofline; did you mean 'cpu'?"),
                      (["--target", "cuda", "--gpu", "v100"], "unknown GPU 'v100'"),
                      (["--target", "fpga", "--board", "vu9p"], "unknown board 'vu9p'"),
                      (["--target", "fpga", "--dim", "seq"], "--dim 'seq': expected NAME=N"),
                      (["--target", "fpga", "--profile"], "has no compiled target"),
                      (["--target", "fpga", "--seq-len", "0"], "--seq-len and --batch must be >= 1"),
                      # flags of another target, or of --json, did nothing
                      (["--target", "fpga", "--gpu", "h200"], "--gpu applies to --target cuda"),
                      (["--target", "cuda", "--board", "u280"], "--board applies to --target fpga"),
                      (["--target", "cuda", "--remeasure"], "--remeasure applies to --target cpu"),
                      (["--target", "fpga", "--per-op"], "--per-op applies to --json")):
        assert main(["analyze", str(art), *argv]) == EXIT_USAGE, argv
        assert msg in capsys.readouterr().err, argv
    assert main(["analyze", str(tmp_path / "missing")]) == EXIT_USAGE
    assert "no such artifact directory" in capsys.readouterr().err


def _emb_artifact(tmp_path: Path, kind: str) -> Path:
    """An embedding artifact with MiniLM's tokenizer and a placeholder compiled ``kind`` library (a test puts its
    own runner in place)."""
    from ctc.artifact import write_artifact
    from ctc.bundled import bundled_model_dir

    m = Module("emb")
    m.add_param("emb", torch.zeros(30522, 2))
    ids = m.add_input("input_ids", TensorType(("batch", "seq"), "i64"))
    m.set_outputs([m.create_node("embedding", [ids, m.param("emb")]).output], ["hidden"])
    return write_artifact(tmp_path / "art", module=m, report={"name": "emb"}, tokenizer_dir=bundled_model_dir("minilm"),
                          build_targets=[(kind, lambda d: (d / "model.so").write_bytes(b"lib") and {})],
                          log=lambda _: None)


class _ProfiledLibrary:
    """Stands in for a loaded cpu library with a profiler: records the first input of each call."""

    def __init__(self, static_dims: dict[str, int] | None = None) -> None:
        self.static_dims = static_dims or {}
        self.fed: list[torch.Tensor] = []

    def __call__(self, inputs: Any) -> list[torch.Tensor]:
        self.fed.append(next(iter(inputs.values())) if isinstance(inputs, dict) else inputs[0])
        return [torch.zeros(1)]

    def profile(self, inputs: object, runs: int) -> list[Any]:
        from ctc.backends.tvm.build import KernelTime

        return [KernelTime("fused_take", 1, 0.5, 0.5)]


def test_profile_times_the_compiled_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ctc analyze --target cpu --profile` runs the library through `ctc bench`'s protocol (it asked for 10 runs,
    fewer than the bench's floor of 20, so every cpu profile was refused with a --repeat error analyze lacks)."""
    import ctc
    from ctc.analysis import artifact as A

    dest = _emb_artifact(tmp_path, "cpu")
    art = ctc.load(dest)
    art._runners["cpu"] = _ProfiledLibrary()
    monkeypatch.setattr(A, "target_peaks", lambda *a, **k: fpga_peaks())
    _, _, measured = A.analyze_artifact(art, "cpu", seq_len=8, profile=True)
    assert "median/p90 of 20 runs" in measured, measured


def test_profile_takes_the_batch_the_library_was_built_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ctc analyze ART --target cpu --profile` on a `target cpu batch=4` build (no --batch given) failed with
    '--batch 1: this cpu library was built for batch 4 ...: give --batch 4 or leave it out'; it was left out. The
    profile and the analysis now take the build's batch, as they take its length."""
    import ctc
    from ctc.analysis import artifact as A

    art = ctc.load(_emb_artifact(tmp_path, "cpu"))
    art._runners["cpu"] = lib = _ProfiledLibrary({"batch": 4})
    monkeypatch.setattr(A, "target_peaks", lambda *a, **k: fpga_peaks())
    a, _, measured = A.analyze_artifact(art, "cpu", seq_len=8, profile=True)
    assert "median/p90 of 20 runs" in measured and lib.fed and all(t.shape == (4, 8) for t in lib.fed), measured
    assert "batch 4" in a.phases[0].description, a.phases[0].description
    a, _, _ = A.analyze_artifact(art, "cpu", seq_len=8)  # no profile: the model's analysis at the default batch 1
    assert "batch 1" in a.phases[0].description


@pytest.mark.parametrize("shape", [(2, 16), ("d0", 16)])
def test_profile_of_a_model_without_a_sequence_dim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    shape: tuple[Any, ...]) -> None:
    """`ctc analyze ART --target cpu --profile` on an MLP from a .pt2 (fixed x [2, 16], or a dynamic batch) failed
    with '--seq-len 128: the model's inputs have no sequence dim ...; leave it out', a flag the user never gave:
    the profile passed its own default length (and batch 1) to the bench. It now sizes only the dims the inputs
    have."""
    import ctc
    from ctc.analysis import artifact as A
    from ctc.artifact import write_artifact

    m = Module("mlp")
    m.set_outputs([m.create_node("relu", [m.add_input("x", TensorType(shape, "f32"))]).output], ["y"])
    art = ctc.load(write_artifact(tmp_path / "art", module=m, report={"name": "mlp"}, log=lambda _: None,
                                  build_targets=[("cpu", lambda d: (d / "model.so").write_bytes(b"lib") and {})]))
    art._runners["cpu"] = lib = _ProfiledLibrary()
    monkeypatch.setattr(A, "target_peaks", lambda *a, **k: fpga_peaks())
    _, _, measured = A.analyze_artifact(art, "cpu", profile=True)
    assert "x f32[2, 16]" in measured if shape[0] == 2 else "x f32[1, 16]" in measured, measured
    assert lib.fed, "the library ran"


def test_analysis_length_stays_within_the_models_positions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ctc analyze ART` on a 64-position BERT without evaluation data analysed 'one forward pass over 128 tokens', a
    pass the model cannot run (`ctc bench` refuses it), and --seq-len 200 was accepted likewise. The default is now
    the model's 64 positions and a longer --seq-len is refused naming the limit."""
    import ctc
    from ctc.analysis import artifact as A
    from ctc.artifact import write_artifact
    from ctc.errors import UsageError

    m = Module("pos")  # the HF encoder pattern: position_ids[:, 0:seq] of a 64-long buffer
    ids = m.add_input("input_ids", TensorType(("batch", "seq"), "i64"))
    m.add_param("position_ids", torch.arange(64).unsqueeze(0))
    pos = m.create_node("slice", [m.param("position_ids")], {"axis": 1, "start": [0], "end": ["seq"]}).output
    m.set_outputs([m.create_node("add", [ids, pos]).output], ["y"])
    art = ctc.load(write_artifact(tmp_path / "art", module=m, report={"name": "pos"}, log=lambda _: None))
    monkeypatch.setattr(A, "target_peaks", lambda *a, **k: fpga_peaks())
    a, _, _ = A.analyze_artifact(art, "cpu")
    assert "over 64 tokens" in a.phases[0].description, a.phases[0].description
    assert "over 32 tokens" in A.analyze_artifact(art, "cpu", seq_len=32)[0].phases[0].description
    with pytest.raises(UsageError, match=r"--seq-len 200: the model takes at most 64 tokens .*give --seq-len <= 64"):
        A.analyze_artifact(art, "cpu", seq_len=200)


def test_profile_on_a_machine_that_cannot_run_the_library_says_so_before_loading_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ctc analyze --profile --target cuda` where no GPU is: the library's fixed length was read (loading it)
    before the 'no CUDA GPU' check, so the user got the loader's 'cannot be loaded' instead of why."""
    import ctc
    import ctc.backends.tvm
    from ctc.analysis import artifact as A

    dest = _emb_artifact(tmp_path, "cuda")
    art = ctc.load(dest)
    monkeypatch.setattr(ctc.backends.tvm, "runs_here", lambda kind: "no CUDA GPU on this machine")
    monkeypatch.setattr(A, "target_peaks", lambda *a, **k: fpga_peaks())
    with pytest.raises(A.UsageError, match="--profile: no CUDA GPU on this machine"):
        A.analyze_artifact(art, "cuda", profile=True)
    assert "cuda" not in art._runners  # nothing was loaded


def test_sizes_of_dims_the_model_does_not_have_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ctc analyze CNN --seq-len 64` (or --batch 4 on a batch fixed at capture) printed the captured shapes' analysis
    as if the flag were not there, as --dim NAME did before it was refused."""
    from ctc.artifact import write_artifact

    m = Module("cnn")
    x = m.add_input("x", TensorType((1, 3, 8), "f32"))
    m.set_outputs([m.create_node("relu", [x]).output], ["y"])
    art = write_artifact(tmp_path / "art", module=m, report={"name": "cnn"}, log=lambda _: None)
    assert main(["analyze", str(art), "--target", "fpga"]) == EXIT_OK
    capsys.readouterr()
    for flag, what in ((["--seq-len", "64"], "--seq-len 64: the model's inputs have no sequence dim"),
                       (["--batch", "4"], "--batch 4: the model's inputs have no batch dim")):
        assert main(["analyze", str(art), "--target", "fpga", *flag]) == EXIT_USAGE
        assert what in capsys.readouterr().err
