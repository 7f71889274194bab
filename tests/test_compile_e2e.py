"""End to end on the real bundled MiniLM: compile a recipe, check the artifact, load and run it.

One compile with a check that must fail (exit 1, artifact still written, report names the
failed check) and one that passes; kept small (few short windows) to stay well under a minute.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ctc
from ctc.cli import EXIT_CHECKS, EXIT_OK, EXIT_USAGE, main

RECIPE = """\
# small MiniLM compile for CI
model bundled "minilm"
calibrate wiki samples=2 seq_len=32
evaluate lee samples=2 seq_len=32
pipeline {
    canonicalize
    constant-fold
    cse on blocks[0:6]
    dce
}
check fidelity >= 0.999
check params <= 1.001x
check latency_ms <= 10x       # no target: both models through the torch backend
check param_bytes <= 0.5x     # cannot hold: no pass here removes half the bytes
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, str]:
    d = tmp_path_factory.mktemp("e2e")
    (d / "small.ctc").write_text(RECIPE)
    out = d / "out" / "small"
    rc = main(["compile", str(d / "small.ctc"), "--out", str(out), "--quiet"])
    return rc, out, RECIPE


def test_failed_check_exit_1_with_artifact(compiled: tuple[int, Path, str]) -> None:
    rc, out, _ = compiled
    assert rc == EXIT_CHECKS
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False
    assert report["failed_checks"] == ["param_bytes <= 0.5x"]
    by = {c["check"]: c for c in report["checks"]}
    assert by["params <= 1.001x"]["passed"] and by["params <= 1.001x"]["measured"] == pytest.approx(
        report["model"]["params_after"] / report["model"]["params_before"])
    assert by["fidelity >= 0.999"]["passed"] and by["fidelity >= 0.999"]["measured"] > 0.999
    lat = report["metrics"]["latency_ms"]
    assert lat["backend"] == "torch" and "torch backend" in lat["protocol"] and lat["original"] > 0
    assert by["latency_ms <= 10x"]["measured"] == pytest.approx(lat["ratio"]) and lat["ratio"] > 0
    assert [p["name"] for p in report["passes"]] == ["canonicalize", "constant-fold", "cse", "dce"]
    assert report["passes"][2]["selector"] == "blocks[0:6]"
    assert report["protocol"]["evaluate"]["windows"] == 2


def test_artifact_files_and_report(compiled: tuple[int, Path, str]) -> None:
    _, out, recipe = compiled
    for f in ("ir.txt", "params.safetensors", "recipe.ctc", "report.json", "report.html",
              "tokenizer/tokenizer.json"):
        assert (out / f).is_file(), f
    assert (out / "recipe.ctc").read_text() == recipe
    html = (out / "report.html").read_text()
    assert "<svg" in html and "param_bytes &lt;= 0.5x" in html
    assert not list(out.parent.glob(".*"))


def test_load_and_run_matches_reported_fidelity(compiled: tuple[int, Path, str]) -> None:
    """The loaded artifact, run on the recipe's evaluation windows, agrees with the original model as
    report.json says (the saved IR and parameters reproduce the measured numbers)."""
    _, out, recipe_text = compiled
    from ctc.driver import Progress, _compare, dataset_batches, load_model, text_inputs
    from ctc.dsl import parse
    from ctc.ir import interpret

    art = ctc.load(out)
    report = json.loads((out / "report.json").read_text())
    recipe = parse(recipe_text, str(out / "recipe.ctc"))
    loaded = load_model(recipe, Progress(False))  # the original, captured again from the bundled model
    assert recipe.evaluate is not None
    batches, protocol = dataset_batches(recipe, recipe.evaluate, loaded)
    assert protocol["windows"] == report["protocol"]["evaluate"]["windows"] == len(batches)
    ref = [interpret(loaded.module, b) for b in batches]
    got = [art.run(b) for b in batches]
    fid = _compare(batches, ref, got, logits=False)
    measured = report["metrics"]
    assert fid.cosine == pytest.approx(measured["fidelity"]["compressed"], abs=1e-6)
    assert fid.max_abs_error == pytest.approx(measured["max_error"]["compressed"], rel=1e-3, abs=1e-6)
    assert fid.rel_error == pytest.approx(measured["fidelity"]["rel_error"], rel=1e-3, abs=1e-7)
    # and on new text, through the artifact's tokenizer
    inputs = text_inputs(art.module, art.tokenizer(), ["The quick brown fox jumps over the lazy dog."])
    y = art.run(inputs)
    assert y[0].shape[:2] == inputs["input_ids"].shape and torch.isfinite(y[0]).all()


def test_cli_eval_and_bench(compiled: tuple[int, Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = compiled
    # `ctc eval` measures, next to the original model re-loaded from the artifact's recipe (same windows)
    assert main(["eval", str(out), "--samples", "2", "--seq-len", "16", "--json", "--quiet"]) == EXIT_OK
    res = json.loads(capsys.readouterr().out)
    assert res["task"] == "encoder" and res["windows"] == 2 and res["seq_len"] == 16
    assert res["baseline"] == "original model bundled 'minilm', same windows" and res["fidelity"] > 0.999
    assert "fidelity_vs_original_at_compile" not in res
    assert main(["eval", str(out), "--samples", "1", "--seq-len", "16", "--json", "--quiet", "--human-similarity",
                 "--docs", "6"]) == EXIT_OK
    res = json.loads(capsys.readouterr().out)
    h, o = res["human"], res["human_original"]
    assert h["pairs"] == 15 and -1 <= h["spearman"] <= 1 and h["pearson"] > 0
    assert abs(h["pearson"] - o["pearson"]) < 0.05, "the clean-up passes barely change the embedding"
    # no baseline: an encoder then has nothing to measure without --human-similarity
    assert main(["eval", str(out), "--samples", "1", "--no-baseline", "--quiet"]) == 2
    assert "nothing to measure" in capsys.readouterr().err
    assert main(["eval", str(out), "--samples", "1", "--seq-len", "16", "--quiet"]) == EXIT_OK
    text = capsys.readouterr().out
    assert "baseline: original model bundled 'minilm', same windows" in text and "cosine vs original" in text
    assert main(["bench", str(out), "--seq-len", "8", "--repeat", "20", "--json"]) == EXIT_OK
    res = json.loads(capsys.readouterr().out)
    assert res["median_ms"] > 0 and res["seq_len"] == 8 and "20 runs" in res["protocol"]
    assert main(["bench", str(out), "--seq-len", "8", "--profile"]) == 2  # kernels exist only for a target
    assert "--profile times the kernels of a compiled library: add --target" in capsys.readouterr().err
    assert main(["bench", str(out), "--profile", "--kernels", "0", "--target", "cpu"]) == 2
    assert "--kernels must be >= 1" in capsys.readouterr().err


def test_cli_show_and_run(compiled: tuple[int, Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = compiled
    assert main(["show", str(out)]) == EXIT_OK
    text = capsys.readouterr().out
    assert "[FAIL] param_bytes <= 0.5x" in text and "[ok  ] fidelity >= 0.999" in text
    assert main(["show", str(out), "--ir"]) == EXIT_OK
    assert capsys.readouterr().out.startswith("module ")
    assert main(["run", str(out), "--text", "Hello world."]) == EXIT_OK
    assert ": (1, " in capsys.readouterr().out


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)])
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def test_pt2_with_cpu_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A .pt2 program compiled for the cpu target: targets/cpu holds the library, which runs like the IR."""
    torch.manual_seed(0)
    torch.export.save(torch.export.export(_Tiny().eval(), (torch.randn(1, 8),)), str(tmp_path / "tiny.pt2"))
    (tmp_path / "t.ctc").write_text('model pt2 "tiny.pt2"\npipeline {\n    cse\n    dce on blocks[0:2]\n}\n'
                                    "target cpu threads=1\ncheck params <= 1.0x\n")
    out = tmp_path / "out"
    assert main(["compile", str(tmp_path / "t.ctc"), "--out", str(out), "--quiet"]) == EXIT_OK
    assert "target cpu: targets/cpu" in capsys.readouterr().out
    art = ctc.load(out)
    assert art.targets == ["cpu"] and art.report["targets"][0]["kind"] == "cpu"
    x = torch.randn(1, 8)  # the program was exported with a static batch of 1
    torch.testing.assert_close(art.run({"x": x}, target="cpu")[0], art.run({"x": x})[0], rtol=1e-5, atol=1e-5)
    kernels = art.runner("cpu").profile({"x": x}, runs=2)  # what `ctc bench --profile` prints
    assert kernels and all(k.calls_per_run >= 1 and k.ms_per_call >= 0 for k in kernels)
    assert any("matvec" in k.name for k in kernels), [k.name for k in kernels]  # batch 1: the GEMV path
    # ctc run on a tensor file, through the compiled library
    from safetensors.torch import save_file

    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    assert main(["run", str(out), "--input", str(tmp_path / "x.safetensors"), "--target", "cpu",
                 "--save", str(tmp_path / "y.safetensors")]) == EXIT_OK
    from safetensors.torch import load_file

    y = load_file(str(tmp_path / "y.safetensors"))
    torch.testing.assert_close(next(iter(y.values())), art.run({"x": x})[0], rtol=1e-5, atol=1e-5)
    assert main(["run", str(out), "--input", str(tmp_path / "t.ctc")]) == 2  # not a tensor file
    assert "--input takes a .safetensors or .pt file" in capsys.readouterr().err
    # ctc show RECIPE --ir captures and prints the IR
    assert main(["show", str(tmp_path / "t.ctc"), "--ir", "--quiet"]) == EXIT_OK
    assert 'loc("layers.0"' in capsys.readouterr().out
    # --target none skips the build
    out2 = tmp_path / "out2"
    assert main(["compile", str(tmp_path / "t.ctc"), "--out", str(out2), "--quiet", "--target", "none"]) == EXIT_OK
    assert ctc.load(out2).targets == []


ATTENTION_RECIPE = """\
# ACT, sparse attention and W8A8 in one recipe, built for the CPU (small for CI)
model bundled "minilm"
calibrate wiki samples=2 seq_len=32
evaluate lee samples=2 seq_len=32
pipeline {
    canonicalize
    cse
    share-blocks groups=[[4, 5]]
    calibrate-attention task="similarity" samples=4 budget=2 threshold=3.0 on blocks[0:2]
    sparse-attention rounds=[4, 8] keep=[0.75, 0.5] min_keep=4 on blocks[2:6]
    rptq w_bits=8 a_bits=8 clusters=2
    dce
}
target cpu
# measured 0.471 (2026-12-03, lee 2 x 32 tokens): share-blocks [[4, 5]] alone gives 0.475, the rest
# without it 0.971, the same at fcf1394 that added this recipe (its 0.9 was never reached): a
# composition test, not a quality setting
check fidelity >= 0.4
"""


@pytest.mark.slow  # minutes (16 under load); CI runs the tiny-model version: test_attention_pipeline.py
def test_attention_passes_compose_with_quantization_and_compile(tmp_path: Path) -> None:
    (tmp_path / "attn.ctc").write_text(ATTENTION_RECIPE)
    out = tmp_path / "out"
    rc = main(["compile", str(tmp_path / "attn.ctc"), "--out", str(out), "--quiet"])
    assert rc == EXIT_OK
    report = json.loads((out / "report.json").read_text())
    names = [p["name"] for p in report["passes"]]
    assert names == ["canonicalize", "cse", "share-blocks", "calibrate-attention", "sparse-attention", "rptq", "dce"]
    act = report["passes"][3]
    assert act["metrics"]["task"] == "similarity" and act["metrics"]["heads_evaluated"] == 2
    ops = report["passes"][4]["ops_diff"]
    assert ops["sparse_attention"] == 4
    # the compiled library (sparse kernels, calibrated heads, int8 linears) runs close to the IR
    art = ctc.load(out)
    assert art.targets == ["cpu"]
    tok = art.tokenizer()
    enc = tok(["Attention sinks are tokens that draw attention.", "A second, somewhat longer sentence about it."],
              return_tensors="pt", padding=True)
    feed = {v.name: enc[v.name] if v.name in enc else torch.zeros_like(enc["input_ids"]) for v in art.module.inputs}
    # Elementwise equality is not guaranteed here: the library's attention in blocks 0-1 is int8
    # (attention_bits auto = 8 for W8A8), which the IR does not model (layer 0's attention output
    # differs by ~8e-3), and a W8A8 activation code at a rounding boundary moves by one step when
    # fp32 sums run in another order (with attention_bits=32 the first difference, 4e-4, is such a
    # flip in block 4's FFN-down); later layers, the sparse selection included, amplify both
    # (measured 2026-12-03: max abs 0.47 of |y| <= 4.7, per-token cosine >= 0.985, pooled 0.996).
    got, want = art.run(feed, target="cpu")[0], art.run(feed)[0]
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.97
    assert torch.nn.functional.cosine_similarity(got.mean(1), want.mean(1), dim=-1).min() > 0.99
    # what is exact: each sparse attention kernel, fed the IR's own operands, selects the same keys as
    # the op's reference and gives its output (to fp32 summation order)
    from test_tvm_sparse_attention import _spec

    from ctc.backends.tvm.sparse_attention import run_sparse_attention
    from ctc.ir.interpreter import value_env

    env = value_env(art.module, feed)
    nodes = [n for n in art.module.nodes if n.op == "sparse_attention"]
    assert len(nodes) == 4
    for n in nodes:
        q, k, v, m = (env[n.operand(x).name] for x in ("q", "k", "v", "mask"))
        a = n.attrs
        assert a["scale"] in (None, pytest.approx(q.shape[3] ** -0.5))  # as _spec scales
        spec = _spec(q, k, v, m, a["is_causal"], bits=tuple(a["round_bits"]), select=a["select"],
                     params=tuple(a["keep_ratios"]), min_keep=a["min_keep"], dense=tuple(a["dense_heads"]))
        torch.testing.assert_close(torch.from_numpy(run_sparse_attention(spec, q, k, v, m)), env[n.outputs[0].name],
                                   rtol=1e-5, atol=1e-5)


def test_sparse_attention_on_cuda_is_a_located_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The sparse kernels are CPU kernels: a cuda target says so at its recipe line, naming the
    node, writes nothing and prints no traceback."""
    (tmp_path / "r.ctc").write_text('model bundled "minilm"\npipeline {\n'
                                    "    sparse-attention rounds=[8] keep=[0.5] on blocks[0:1]\n}\n"
                                    'target cuda arch="sm_90"\n')
    out = tmp_path / "out"
    assert main(["compile", str(tmp_path / "r.ctc"), "--out", str(out), "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "r.ctc:5:1: error: target cuda: the compressed model cannot be built for it: sparse_attention at " \
           "encoder.layer.0.attention.self: the sparse attention kernels are CPU (llvm) kernels" in err
    assert "nothing was written" in err and "Traceback" not in err
    assert not out.exists()


REAL_TVM = """\
# the real MiniLM through TVM at CI size: fixed 16-token build, default schedules
model bundled "minilm"
evaluate lee samples=1 seq_len=16
pipeline {
    canonicalize
    cse
    dce
}
target cpu seq_len=16
check fidelity >= 0.9999
check latency_ms <= 5000      # the compiled library's, measured after the build
"""


def test_real_minilm_compiles_through_tvm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A CI-sized TVM build of the real bundled MiniLM: the library agrees with the IR, and latency_ms is
    measured on it (the report says so)."""
    (tmp_path / "r.ctc").write_text(REAL_TVM)
    out = tmp_path / "out"
    assert main(["compile", str(tmp_path / "r.ctc"), "--out", str(out), "--quiet"]) == EXIT_OK
    report = json.loads((out / "report.json").read_text())
    (target,) = report["targets"]
    m = target["measured"]
    assert m["vs_ir"]["cosine"] > 0.9999 and m["vs_ir"]["max_abs_error"] < 1e-3
    lat = report["metrics"]["latency_ms"]
    assert lat["backend"] == "cpu" and lat["compressed"] == m["latency_ms"] and "compiled target cpu" in lat["protocol"]
    assert report["passed"] and "latency_ms <= 5000" in [c["check"] for c in report["checks"]]
    agree = report["metrics"]["target_fidelity"]  # the default floor checked the library against the IR
    assert agree["per_target"] == {"cpu": m["vs_ir"]["cosine"]}
    assert report["checks"][-1]["check"] == "target_fidelity >= 0.99" and report["checks"][-1]["passed"]
    art = ctc.load(out)
    from ctc.driver import text_inputs

    x = text_inputs(art.module, art.tokenizer(), ["a short sentence"], seq_len=16)
    x = {k: v.repeat(1, -(-16 // v.shape[1]))[:, :16] for k, v in x.items()}  # the library is built for 16 tokens
    torch.testing.assert_close(art.run(x, target="cpu")[0], art.run(x)[0], rtol=1e-3, atol=1e-3)


def test_target_that_disagrees_with_the_ir_fails_the_default_floor() -> None:
    """A compiled target below the default agreement with the IR (a backend fault, not a compression trade-off)
    fails the compile's checks with a note that says so; a recipe's own `check target_fidelity` replaces the floor."""
    from ctc.driver import record_target_fidelity, set_checks
    from ctc.dsl.ast import Check
    from ctc.dsl.check import TARGET_FIDELITY_FLOOR

    report: dict = {"metrics": {}}
    record_target_fidelity(report, "cpu", {"vs_ir": {"cosine": 0.999}})
    set_checks(report, [])
    assert report["passed"] and report["checks"][0]["check"] == f"target_fidelity >= {TARGET_FIDELITY_FLOOR}"
    record_target_fidelity(report, "fpga", {"vs_ir": {"cosine": 0.75}})
    set_checks(report, [])
    assert report["metrics"]["target_fidelity"]["per_target"] == {"cpu": 0.999, "fpga": 0.75}
    assert report["metrics"]["target_fidelity"]["compressed"] == 0.75
    assert not report["passed"] and report["failed_checks"] == [f"target_fidelity >= {TARGET_FIDELITY_FLOOR}"]
    assert "backend fault" in report["checks"][0]["note"] and "fpga 0.750000" in report["checks"][0]["note"]
    set_checks(report, [Check("target_fidelity", ">=", 0.5)])
    assert report["passed"] and [c["check"] for c in report["checks"]] == ["target_fidelity >= 0.5"]


def test_target_fidelity_check_needs_no_text_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`check target_fidelity` is measured on synthetic inputs when a recipe has no calibrate/evaluate line (a CNN
    from a .pt2 cannot have text data), so the checker does not ask for an evaluate line."""
    recipe = tmp_path / "r.ctc"
    recipe.write_text('model bundled "minilm"\npipeline {\n    dce\n}\ntarget cpu\ncheck target_fidelity >= 0.999\n')
    assert main(["compile", str(recipe), "--check-only", "--out", str(tmp_path / "o")]) == EXIT_OK, \
        capsys.readouterr().err
