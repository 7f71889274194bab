"""Hugging Face exports (`emit hf`, `emit compressed-tensors`): written from captured tiny models, loaded back
with transformers (compressed-tensors applying the quantization config) and compared with the ctc module.

The models are random tiny Llama / BERT configs saved with ``save_pretrained`` (no downloads); the real-weight
round trips (MiniLM W8A8, SmolLM2 GPTQ int4) are the slow tests at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ctc.exports import ExportError, export_config
from ctc.exports.source import ExportSource, write_export
from ctc.passes.base import PassContext, get_pass

transformers = pytest.importorskip("transformers")


def _tiny(kind: str, root: Path) -> tuple[Any, dict[str, torch.Tensor], Path]:
    from ctc.frontends.hf import capture_hf_model

    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=96, vocab_size=97,
                                       max_position_embeddings=64, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(cfg).eval()
    else:
        cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                      intermediate_size=96, vocab_size=97, max_position_embeddings=64)
        model = transformers.BertModel(cfg).eval()
    src = root / kind
    model.save_pretrained(src)
    module = capture_hf_model(model, batch=2, seq_len=16)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    feed = {v.name: ids if v.name == "input_ids" else (torch.zeros_like(ids) if v.name == "token_type_ids"
                                                        else torch.ones_like(ids)) for v in module.inputs}
    return module, feed, src


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, torch.Tensor], Path]:
    return _tiny("llama", tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, torch.Tensor], Path]:
    return _tiny("bert", tmp_path_factory.mktemp("hf"))


def _run(pass_name: str, opts: dict[str, Any], model: tuple[Any, dict[str, torch.Tensor], Path]) -> Any:
    module, feed, _ = model
    return get_pass(pass_name)(opts).run(module.clone(copy_params=True), PassContext(calibration=[feed]))


def _export(fmt: str, module: Any, model: tuple[Any, dict[str, torch.Tensor], Path], dest: Path,
            **opts: Any) -> dict[str, Any]:
    _, feed, src = model
    _, summary = write_export(fmt, ExportSource(module, "tiny", feed, src), dest, export_config(fmt, opts))
    return summary


def _reload(dest: Path, cls: str, feed: dict[str, torch.Tensor]) -> torch.Tensor:
    """An independent load of the written directory (what a user of transformers does)."""
    model = getattr(transformers, cls).from_pretrained(str(dest), local_files_only=True).eval()
    with torch.no_grad():
        out = model(**feed)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_float_model_round_trips_exactly(llama: Any, tmp_path: Path) -> None:
    module, feed, _ = llama
    summary = _export("hf", module, llama, tmp_path / "hf")
    assert summary["load_back"]["outputs"][0]["relative"] == 0.0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg["tie_word_embeddings"] is True
    from ctc.ir.interpreter import interpret

    got = _reload(tmp_path / "hf", "AutoModelForCausalLM", feed)
    assert torch.equal(got, interpret(module, feed)[0])


@pytest.mark.parametrize("pass_name, opts, extra_op", [
    ("share-blocks", {"groups": [[0, 1], [2, 3]]}, "mul"),
    ("recursive", {"loops": 2, "rank": 4}, "lowrank_linear"),
])
def test_shared_layers_written_as_their_dense_per_layer_maps(llama: Any, tmp_path: Path, pass_name: str,
                                                            opts: dict[str, Any], extra_op: str) -> None:
    from ctc.ir.interpreter import interpret

    module = _run(pass_name, opts, llama)
    assert module.param_count() < llama[0].param_count()
    summary = _export("hf", module, llama, tmp_path / "hf")
    assert summary["load_back"]["outputs"][0]["relative"] < 1e-5
    assert any("dense per-layer affine map" in n and extra_op in n for n in summary["notes"])
    got = _reload(tmp_path / "hf", "LlamaForCausalLM", llama[1])
    ref = interpret(module, llama[1])[0]
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_rptq_reorder_folded_into_a_norm_is_undone(llama: Any, tmp_path: Path) -> None:
    """RPTQ's norm route permutes the RMSNorm's weight and gathers its input; the linears after it read the
    reordered channels with no channel_permute of their own.  The HF norm gets its weight back in the original
    order and every linear its columns, so the directory computes what the module does."""
    from ctc.ir.interpreter import interpret

    module = _run("rptq", {"w_bits": 8, "a_bits": 16, "clusters": 4}, llama)
    norms = [n for n in module.nodes if n.op == "rms_norm" and n.operand("x").producer is not None
             and n.operand("x").producer.op == "channel_permute"]
    assert norms, "rptq no longer folds a reorder into a norm: this test needs another model"
    summary = _export("hf", module, llama, tmp_path / "hf")
    assert summary["load_back"]["outputs"][0]["relative"] < 1e-5
    got = _reload(tmp_path / "hf", "LlamaForCausalLM", llama[1])
    ref = interpret(module, llama[1])[0]
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_hf_refuses_quantized_activations_and_writes_nothing(bert: Any, tmp_path: Path) -> None:
    module = _run("rptq", {"w_bits": 8, "a_bits": 8, "clusters": 1}, bert)
    with pytest.raises(ExportError, match="quantize their activations.*compressed-tensors"):
        _export("hf", module, bert, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and list(tmp_path.iterdir()) == []


def test_gptq_int4_groups_pack_and_load_exactly(llama: Any, tmp_path: Path) -> None:
    from safetensors import safe_open

    module = _run("rptq", {"w_bits": 4, "a_bits": 16, "clusters": 1, "group_size": 16, "gptq": True, "sym": True},
                  llama)  # symmetric: the packed format (asymmetric int4, the 4-bit default, is written unpacked)
    summary = _export("compressed-tensors", module, llama, tmp_path / "ct")
    assert summary["scheme_format"] == "pack-quantized" and summary["load_back"]["outputs"][0]["relative"] == 0.0
    assert summary["groups"] == [{"linears": 28, "w_bits": 4, "group_size": 16, "symmetric": True, "a_bits": None}]
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    weights = next(iter(qc["config_groups"].values()))["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"]) == (4, "group", 16)
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        scale = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
    assert "model.layers.0.mlp.down_proj.weight" not in keys  # no float copy next to the integers
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (64, 96 * 4 // 32)
    assert tuple(scale.shape) == (64, 96 // 16)
    from ctc.ir.interpreter import interpret

    assert torch.equal(_reload(tmp_path / "ct", "LlamaForCausalLM", llama[1]), interpret(module, llama[1])[0])


def test_w8a8_static_activation_scales_load_exactly(bert: Any, tmp_path: Path) -> None:
    from safetensors import safe_open

    module = _run("rptq", {"w_bits": 8, "a_bits": 8, "clusters": 1}, bert)
    summary = _export("compressed-tensors", module, bert, tmp_path / "ct")
    assert summary["scheme_format"] == "int-quantized" and summary["load_back"]["outputs"][0]["relative"] == 0.0
    assert any("pooler" in n for n in summary["notes"])  # the pooler the module never reads: copied as is
    scheme = next(iter(json.loads((tmp_path / "ct" / "config.json").read_text())
                       ["quantization_config"]["config_groups"].values()))
    assert scheme["input_activations"]["dynamic"] is False and scheme["input_activations"]["strategy"] == "tensor"
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("encoder.layer.0.attention.self.query.weight").dtype == torch.int8
        assert f.get_tensor("encoder.layer.0.attention.self.query.input_zero_point").dtype == torch.int8


def test_asymmetric_int4_is_written_unpacked(llama: Any, tmp_path: Path) -> None:
    module = _run("rptq", {"w_bits": 4, "a_bits": 16, "clusters": 1, "group_size": 32, "sym": False}, llama)
    summary = _export("compressed-tensors", module, llama, tmp_path / "ct")
    assert summary["scheme_format"] == "int-quantized" and summary["load_back"]["outputs"][0]["relative"] == 0.0


def test_unrepresentable_quantization_is_named(bert: Any, tmp_path: Path) -> None:
    module = _run("rptq", {"w_bits": 8, "a_bits": 8, "clusters": 3}, bert)
    with pytest.raises(ExportError, match="3 scales .*rptq clusters=1"):
        _export("compressed-tensors", module, bert, tmp_path / "ct")
    with pytest.raises(ExportError, match="no linear is quantized.*emit hf"):
        _export("compressed-tensors", bert[0], bert, tmp_path / "ct")
    module = _run("rptq", {"w_bits": 4, "a_bits": 16, "clusters": 1, "w_zero": "float"}, bert)
    with pytest.raises(ExportError, match="float weight zero points.*w_zero=\"int\""):
        _export("compressed-tensors", module, bert, tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []


def test_layer_check_tells_a_wrong_layer_from_rounding_ties(bert: Any, tmp_path: Path) -> None:
    """Teacher-forced per-layer comparison: the export passes, the same model with one scale off does not."""
    from ctc.exports.hf_layout import hf_layout, layer_check, load_back

    module = _run("rptq", {"w_bits": 8, "a_bits": 8, "clusters": 1}, bert)
    summary = _export("compressed-tensors", module, bert, tmp_path / "ct")
    assert summary["load_back"]["layers"]["layers"] == 12
    layout = hf_layout(module, json.loads((bert[2] / "config.json").read_text()))
    model, _ = load_back(tmp_path / "ct", layout.cls, bert[1], list(module.output_names))
    assert layer_check(module, layout, model, bert[1], 0.0)["worst_mismatch"] == 0.0
    target = dict(model.named_modules())["encoder.layer.1.intermediate.dense"]
    with torch.no_grad():
        target.input_scale.mul_(1.5)
    with pytest.raises(ExportError, match="encoder.layer.1.intermediate.dense does not compute the module's layer"):
        layer_check(module, layout, model, bert[1], 0.05)


@pytest.mark.slow
@pytest.mark.parametrize("recipe, reader_class", [("minilm_w8a8_compressed_tensors.ctc", "BertModel"),
                                                  ("smollm2_gptq4_compressed_tensors.ctc", "LlamaForCausalLM")])
def test_real_models_round_trip_through_compressed_tensors(tmp_path: Path, recipe: str, reader_class: str) -> None:
    """benchmarks/recipes on the bundled real weights: the export is written, reloaded by transformers and checked."""
    from ctc.cli import EXIT_OK, main

    recipes = Path(__file__).resolve().parent.parent / "benchmarks" / "recipes"
    assert main(["compile", str(recipes / recipe), "--out", str(tmp_path / "art"), "--quiet"]) == EXIT_OK
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    (export,) = report["exports"]
    assert export["format"] == "compressed-tensors" and export["class"] == reader_class
    check = export["load_back"]
    if "layers" in check:  # quantized activations: ties may round apart, layers must agree
        assert check["layers"]["worst_mismatch"] <= 0.05 and check["outputs"][0]["cosine"] >= 0.98
    else:
        assert check["outputs"][0]["relative"] <= 1e-4
    assert (tmp_path / "art" / "exports" / "compressed-tensors" / "config.json").is_file()


@pytest.mark.parametrize("method", ["last", "random"])
def test_removed_blocks_leave_the_written_config(llama: Any, tmp_path: Path, method: str) -> None:
    """remove-blocks then `emit hf`: the exporter took meta['num_blocks'] (the blocks kept) for the original count,
    so a removed last block went unnoticed (config still 4 layers, the 4th random: 'does not reproduce the
    module', cosine 0.86) and a removed middle one was 'blocks were removed (3 -> 3) but the config names no
    layer count to update'."""
    module, feed, _ = llama
    cut = get_pass("remove-blocks")({"keep": 3, "method": method, "seed": 1}).run(
        module.clone(copy_params=True), PassContext(calibration=[feed]))
    summary = _export("hf", cut, llama, tmp_path / "hf")
    assert summary["load_back"]["outputs"][0]["relative"] <= 1e-5
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 3
    from ctc.ir.interpreter import interpret

    torch.testing.assert_close(_reload(tmp_path / "hf", "AutoModelForCausalLM", feed), interpret(cut, feed)[0],
                               rtol=1e-4, atol=1e-5)


def test_gpt2_conv1d_layers_are_written(tmp_path: Path) -> None:
    """GPT-2's Conv1D linears run on ``reshape [batch*seq, in]`` rows: `emit hf` ended in a TypeError traceback
    (reshape(): ... found element of type str), the symbolic dims handed to torch unevaluated."""
    from ctc.frontends.hf import capture_hf_model

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64,
                                                                 vocab_size=97)).eval()
    model.save_pretrained(tmp_path / "gpt2")
    module = capture_hf_model(model, batch=2, seq_len=16)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    summary = _export("hf", module, (module, feed, tmp_path / "gpt2"), tmp_path / "hf")
    assert summary["load_back"]["outputs"][0]["relative"] <= 1e-5
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["n_layer"] == 2


def test_a_transformers_load_back_that_raises_is_an_export_error(tmp_path: Path) -> None:
    """Falcon W4A16 `emit compressed-tensors`: transformers' own Falcon weight init reads FalconLinear.weight,
    which compressed-tensors replaced, so the load-back check ended the compile in an AttributeError traceback
    (exit 4). It is an ExportError naming the class, the failure and the formats to write instead."""
    pytest.importorskip("compressed_tensors")
    from ctc.frontends.hf import capture_hf_model

    torch.manual_seed(0)
    cfg = transformers.FalconConfig(num_hidden_layers=1, num_attention_heads=4, hidden_size=64, vocab_size=97,
                                    multi_query=True, parallel_attn=True, alibi=False, bias=False)
    model = transformers.FalconForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "falcon")
    module = capture_hf_model(model, batch=2, seq_len=16)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    q = get_pass("quantize")({"w_bits": 4, "a_bits": 16, "w_granularity": "group", "group_size": 32}).run(
        module.clone(copy_params=True), PassContext(calibration=[feed]))
    try:
        _export("compressed-tensors", q, (q, feed, tmp_path / "falcon"), tmp_path / "ct")
    except ExportError as e:
        assert "FalconForCausalLM.from_pretrained" in str(e) and "emit hf" in str(e)
        assert not (tmp_path / "ct").exists()
    # (a transformers release whose Falcon loads the checkpoint passes the load-back check instead)
