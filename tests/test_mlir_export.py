"""MLIR export through torch-mlir, checked by compiling with IREE: export forms equal the references,
quantized modules (int8 and packed int4, per-cluster activations) run under IREE like the IR, the
weights stay integer function arguments, and ops torch-mlir cannot take are named in one error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_transformers import outlier_inputs, tiny_transformer

from ctc.backends.mlir.forms import quant_linear_form
from ctc.exports import EXPORTS, export_config
from ctc.exports.source import ExportSource, write_export
from ctc.ir import Module, TensorType
from ctc.ir import quant as Q
from ctc.ir.ops.compress import quant_linear
from ctc.passes.base import PassContext, get_pass

pytest.importorskip("torch_mlir")
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([3, 4, 8]), k=st.integers(1, 40), n=st.integers(1, 9),
       gs=st.sampled_from([-1, 4, 16]), sym=st.booleans(), a_bits=st.sampled_from([None, 8, 6]),
       clusters=st.integers(1, 4), bias=st.booleans(), dynamic=st.booleans())
def test_quant_linear_form_is_bit_identical_to_reference(seed: int, bits: int, k: int, n: int, gs: int, sym: bool,
                                                         a_bits: int | None, clusters: int, bias: bool,
                                                         dynamic: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    qw = Q.quantize_weight(torch.randn(n, k, generator=g), bits, gs, sym)
    x = torch.randn(2, 3, k, generator=g) * 4
    rest: list[torch.Tensor] = [torch.randn(n, generator=g)] if bias else []
    bounds: tuple[int, ...] = ()
    if a_bits is not None:
        c = min(clusters, k)
        bounds = tuple(sorted({*(int(b) for b in torch.linspace(0, k, c + 1)[1:-1].round()), k} - {0}))
        s, z = Q.act_qparams(-torch.rand(len(bounds), generator=g) * 5, torch.rand(len(bounds), generator=g) * 5,
                             a_bits)
        if not dynamic:  # per-token ranges (act_dynamic) are computed from x, not passed
            rest += [s, z]
    kw = dict(w_bits=bits, group_size=gs, w_symmetric=sym, a_bits=a_bits, act_clusters=bounds, has_bias=bias,
              act_dynamic=dynamic and a_bits is not None)
    ref = quant_linear(x, qw.qweight, qw.scale, qw.zero, *rest, **kw)
    got = quant_linear_form(x, qw.qweight, qw.scale, qw.zero, *rest, **kw)
    assert torch.equal(ref, got)


def _quantized(kind: str, opts: dict) -> tuple[Module, list[dict[str, torch.Tensor]]]:
    m = tiny_transformer(kind, layers=1, batch=1, seq=6)
    cal = outlier_inputs(m, 2)
    out = get_pass("rptq" if "clusters" in opts else "quantize")(opts).run(m, PassContext(calibration=cal))
    return out, cal


@pytest.fixture(scope="module")
def w8a8_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Module, Path, dict]:
    iree = pytest.importorskip("iree.compiler")
    assert iree
    module, cal = _quantized("bert", {"w_bits": 8, "a_bits": 8, "clusters": 3})
    dest = tmp_path_factory.mktemp("mlir") / "w8a8"
    src = ExportSource(module, "tiny_bert_w8a8", cal[1])
    _, summary = write_export("mlir", src, dest, export_config("mlir", {}))
    return module, dest, summary


def test_export_files_signature_and_integer_weights(w8a8_export: tuple[Module, Path, dict]) -> None:
    module, dest, summary = w8a8_export
    sig = json.loads((dest / "signature.json").read_text())
    assert sig["inputs"] == [{"name": "x", "shape": [1, 6, 32], "dtype": "float32"}]
    names = [p["name"] for p in sig["params"]]
    assert set(names) == set(module.params)  # every parameter is a function argument, once
    linalg = (dest / "model.linalg.mlir").read_text()
    torch_text = (dest / "model.torch.mlir").read_text()
    head = next(ln for ln in linalg.splitlines() if "func.func @main" in ln)
    assert head.count("%arg") == 1 + len(names)
    assert "tensor<32x32xi8>" in head  # weights stay int8 arguments, dequantized inside
    assert "dense_resource" not in linalg and "torch.vtensor.literal" not in torch_text  # no baked weights
    assert "torch.aten.round" in torch_text and "linalg.generic" in linalg
    assert summary["function_args"] == 1 + len(names)
    export = json.loads((dest / "export.json").read_text())
    assert export["format"] == "mlir" and export["summary"]["verified"]["dialect"] == "linalg"


def test_iree_runs_the_export_like_the_ir(w8a8_export: tuple[Module, Path, dict]) -> None:
    from ctc.backends.mlir import IreeFunction
    from ctc.ir.interpreter import interpret

    module, dest, summary = w8a8_export
    feed = outlier_inputs(module, 1, seed=7)[0]
    ref = interpret(module, feed)[0]
    for dialect in ("linalg", "torch"):
        got = IreeFunction(dest, dialect=dialect)(feed)[0]
        assert got.shape == ref.shape
        assert torch.nn.functional.cosine_similarity(got.reshape(1, -1), ref.reshape(1, -1)).item() > 0.999
    assert summary["verified"]["outputs"][0]["cosine"] > 0.999


def test_float_path_within_1e4_of_the_ir(tmp_path: Path) -> None:
    """Without activation rounding (weight-only int4 + int8 per group) IREE agrees with the IR to float noise."""
    pytest.importorskip("iree.compiler")
    module, cal = _quantized("llama", {"w_bits": 4, "a_bits": 16, "w_granularity": "group", "group_size": 16})
    assert module.op_counts()["quant_linear"] == 7
    _, summary = write_export("mlir", ExportSource(module, "tiny_llama_w4", cal[0]), tmp_path / "w4",
                              export_config("mlir", {"dialect": "linalg"}))
    row = summary["verified"]["outputs"][0]
    assert row["relative"] <= 1e-4 and row["max_abs_error"] < 1e-4
    assert "tensor<48x16xi8>" in (tmp_path / "w4" / "model.linalg.mlir").read_text()  # packed int4 argument


def _sparse_module() -> tuple[Module, dict[str, torch.Tensor]]:
    m = Module("sparse")
    q = m.add_input("q", TensorType((1, 2, 8, 4), "f32"))
    n = m.create_node("sparse_attention", [q, q, q], {"round_bits": (4,), "select": "topk", "keep_ratios": (0.5,)},
                      scope="layers.0.attn", block=0)
    m.set_outputs([n.output])
    return m, {"q": torch.randn(1, 2, 8, 4)}


def test_ops_torch_mlir_cannot_take_are_named(tmp_path: Path) -> None:
    from ctc.backends.mlir import MlirExportError

    m, feed = _sparse_module()
    with pytest.raises(MlirExportError) as e:
        write_export("mlir", ExportSource(m, "sparse", feed), tmp_path / "out", export_config("mlir", {}))
    msg = str(e.value)
    assert "cannot take these ctc ops: sparse_attention" in msg
    assert "layers.0.attn" in msg and "torch.aten.isfinite" in msg and "dialect=torch" in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())  # nothing half-written
    # the torch dialect alone imports it
    _, summary = write_export("mlir", ExportSource(m, "sparse", feed), tmp_path / "torch",
                              export_config("mlir", {"dialect": "torch", "verify": False}))
    assert summary["files"] == ["model.torch.mlir", "signature.json"]


def test_options_are_checked() -> None:
    from ctc.passes.base import PassError

    with pytest.raises(PassError, match="dialect"):
        export_config("mlir", {"dialect": "tosa"})
    assert EXPORTS["mlir"].Options().dialect == "both"


def _token_module() -> Module:
    """input_ids -> embedding -> int8 weight-only linear: what `ctc export` makes an example batch for."""
    m = Module("tok")
    ids = m.add_input("input_ids", TensorType((1, 8), "i64"))
    g = torch.Generator().manual_seed(3)
    m.add_param("emb", torch.randn(50, 16, generator=g))
    qw = Q.quantize_weight(torch.randn(8, 16, generator=g), 8, -1, True)
    for name, t in (("qw", qw.qweight), ("s", qw.scale), ("z", qw.zero)):
        m.add_param(name, t)
    h = m.create_node("embedding", [ids, m.param("emb", scope="embed")], {}, scope="embed").output
    out = m.create_node("quant_linear", [h, m.param("qw"), m.param("s"), m.param("z")],
                        {"w_bits": 8, "group_size": -1, "w_symmetric": True, "a_bits": None, "act_clusters": (),
                         "has_bias": False}, scope="layers.0.fc", block=0).output
    m.set_outputs([out], ["logits"])
    return m


def test_cli_export_checks_options_and_writes_next_to_the_artifact(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("iree.compiler")
    from ctc.artifact import write_artifact
    from ctc.cli import EXIT_OK, EXIT_USAGE, main

    art = write_artifact(tmp_path / "art", module=_token_module(), report={"name": "tok"})
    assert main(["export", str(art), "--to", "mlri"]) == EXIT_USAGE
    assert "did you mean 'mlir'" in capsys.readouterr().err
    assert main(["export", str(art), "--to", "mlir", "-s", "dialekt=torch"]) == EXIT_USAGE
    assert "dialect" in capsys.readouterr().err
    assert not (tmp_path / "art-mlir").exists()
    assert main(["export", str(art), "--to", "mlir", "-s", "dialect=linalg"]) == EXIT_OK  # its fixed length, 8
    out = capsys.readouterr().out
    assert "wrote mlir export" in out and "relative" in out
    dest = tmp_path / "art-mlir"
    assert sorted(p.name for p in dest.iterdir()) == ["export.json", "manifest.json", "model.linalg.mlir",
                                                      "params.safetensors", "signature.json"]
    assert json.loads((dest / "export.json").read_text())["summary"]["verified"]["outputs"][0]["relative"] <= 1e-4
    # the artifact itself is never an export destination
    assert main(["export", str(art), "--to", "mlir", "--out", str(art), "--force"]) == EXIT_USAGE
    assert (art / "report.json").is_file()


def test_export_of_a_float_input_model_and_of_a_resized_batch(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`ctc export --to mlir` of an MLP artifact (float input x [4, 8], no tokenizer) failed with 'cannot make
    example inputs ['x'] for the load-back check from text' (and, given inputs, cut x to [1, 8], a shape the
    module does not take); `-s batch=2` on a text model compared the IREE output on 2 rows with the IR's on 1
    ('output 0 has shape (2, 8, 8), the module's (1, 8, 8)')."""
    pytest.importorskip("iree.compiler")
    from ctc.artifact import write_artifact
    from ctc.cli import EXIT_OK, main

    mlp = Module("mlp")
    x = mlp.add_input("x", TensorType((4, 8), "f32"))
    mlp.add_param("w", torch.randn(3, 8, generator=torch.Generator().manual_seed(0)))
    mlp.set_outputs([mlp.create_node("relu", [mlp.create_node("linear", [x, mlp.param("w")]).output]).output])
    art = write_artifact(tmp_path / "mlp", module=mlp, report={"name": "mlp"})
    assert main(["export", str(art), "--to", "mlir", "-s", "dialect=linalg", "-q"]) == EXIT_OK, capsys.readouterr().err
    assert json.loads((tmp_path / "mlp-mlir" / "signature.json").read_text())["inputs"][0]["shape"] == [4, 8]
    # --seq-len on that fixed-shape model would size nothing: a usage error, not a flag silently ignored
    assert main(["export", str(art), "--to", "mlir", "--seq-len", "64", "--out", str(tmp_path / "s"), "-q"]) != EXIT_OK
    assert "--seq-len 64: the model's inputs have no sequence dim" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()

    tok = Module("tok")
    ids = tok.add_input("input_ids", TensorType(("batch", "seq"), "i64"))
    tok.add_param("emb", torch.randn(50, 8, generator=torch.Generator().manual_seed(1)))
    tok.set_outputs([tok.create_node("embedding", [ids, tok.param("emb")], {}).output])
    feed = {"input_ids": torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(2))}
    _, summary = write_export("mlir", ExportSource(tok, "tok", feed), tmp_path / "b2",
                              export_config("mlir", {"dialect": "linalg", "batch": 2}))
    assert summary["shapes"] == {"input_ids": [2, 8]} and summary["verified"]["outputs"][0]["max_abs_error"] == 0
