"""The Hugging Face loader takes task, inputs and attention from the model (issue 16's failure modes):
an image model's directory captures with pixel values, an audio model with raw audio, a GGUF-style
``gemma3_text`` directory without ``architectures`` is a causal LM, Gemma-2 loads with eager
attention (and ``attn="sdpa"`` is refused with the reason), Falcon's alibi and
``fused_qkv[..., [-2], :]`` capture, MoE layers capture by dense dispatch, and sizes like
``Max(0, 4 - s)`` stay symbolic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ctc.frontends import CaptureError, ModelLoadError, capture, capture_hf_model, capture_loaded, load_hf, task_of
from ctc.ir.interpreter import interpret
from ctc.tasks import TASK_AUDIO, TASK_CAUSAL_LM, TASK_IMAGE_CLASSIFICATION, TASK_SEQ2SEQ, TASK_VISION

T = pytest.importorskip("transformers")


def _save(model: nn.Module, d: Path, *, drop_architectures: bool = False) -> Path:
    model.save_pretrained(d)
    if drop_architectures:
        cfg = json.loads((d / "config.json").read_text())
        cfg.pop("architectures", None)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), float((got - ref).abs().max())


def test_image_model_directory_captures_with_pixel_values(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = T.ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=24, num_labels=3)
    d = _save(T.ViTForImageClassification(cfg).eval(), tmp_path / "vit")
    loaded = load_hf(d)
    assert loaded.task == TASK_IMAGE_CLASSIFICATION
    m = capture_loaded(loaded)
    assert [(v.name, v.type.shape) for v in m.inputs] == [("pixel_values", ("batch", 3, 16, 16))]
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = loaded.model(pixel_values=x).logits
    _close(interpret(m, [x])[0], ref)


def test_cnn_and_audio_tasks_come_from_the_model() -> None:
    resnet = T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic"))
    assert task_of(resnet.config, resnet) == TASK_VISION
    w2v = T.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                           conv_dim=(8,), conv_stride=(4,), conv_kernel=(8,), num_feat_extract_layers=1,
                           num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
    assert task_of(w2v) == TASK_AUDIO  # no architectures: the base class's main input decides
    assert task_of(T.T5Config(), None) == TASK_SEQ2SEQ


def test_gguf_style_gemma3_text_without_architectures_is_a_causal_lm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = T.Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=32)
    d = _save(T.Gemma3ForCausalLM(cfg).eval(), tmp_path / "gemma3", drop_architectures=True)
    loaded = load_hf(d)
    assert loaded.task == TASK_CAUSAL_LM and type(loaded.model).__name__ == "Gemma3ForCausalLM"
    m = capture_loaded(loaded, seq_len=5)
    assert m.meta["output"] == "logits"


def test_gemma2_defaults_to_eager_and_refuses_sdpa(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = T.Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=32)
    d = _save(T.Gemma2ForCausalLM(cfg).eval(), tmp_path / "gemma2")
    loaded = load_hf(d)
    assert loaded.model.config._attn_implementation == "eager"
    with pytest.raises(ModelLoadError, match=r'Gemma2 does not support attn="sdpa".*use attn="eager"'):
        load_hf(d, attn="sdpa")
    with pytest.raises(ModelLoadError, match=r"unknown task 'causal-lmm' \(did you mean 'causal_lm'\?\)"):
        load_hf(d, task="causal-lmm")
    assert load_hf(d, task="causal-lm").task == TASK_CAUSAL_LM


def test_falcon_alibi_and_fused_qkv_indexing_capture() -> None:
    torch.manual_seed(0)
    cfg = T.FalconConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, alibi=True,
                         multi_query=True, parallel_attn=True, bos_token_id=0, eos_token_id=0)
    model = T.FalconForCausalLM(cfg).eval()
    m = capture_hf_model(model, seq_len=5)
    assert "index" in m.op_counts()  # fused_qkv[..., [-2], :]: an index tensor after skipped axes
    for b, s in ((2, 5), (3, 9)):
        ids = torch.randint(0, 64, (b, s))
        am = torch.ones(b, s, dtype=torch.long)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=am, use_cache=False).logits
        _close(interpret(m, [ids, am])[0], ref)


def test_moe_layers_capture_by_dense_dispatch_exactly() -> None:
    """Every expert computed densely and weighted by its routing mask equals HF's sparse dispatch up to float
    rounding (the sums run in another order: 2e-9 apart on an AVX2 CPU, bit-equal on an AVX-512 one)."""
    torch.manual_seed(0)
    cfg = T.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                          max_position_embeddings=32)
    model = T.MixtralForCausalLM(cfg).eval()
    m = capture_hf_model(model, seq_len=5)
    assert model.config._experts_implementation != "ctc_dense", "the dispatch is switched back after capture"
    assert m.op_counts()["topk"] == 1
    experts = [n for n in m.params if ".experts.gate_up_proj." in n]
    assert len(experts) == 4, "each expert's weight is a parameter of its own"
    ids = torch.randint(0, 64, (3, 7))
    am = torch.ones(3, 7, dtype=torch.long)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, use_cache=False).logits
    got = interpret(m, [ids, am])[0]
    assert float((got - ref).abs().max()) <= 1e-7 * float(ref.abs().max()) + 1e-8


class _PadToFour(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = torch.zeros(x.shape[0], max(0, 4 - x.shape[1]))
        return torch.cat([x, pad], dim=1)


def test_sizes_with_max_stay_symbolic() -> None:
    m = capture(_PadToFour(), {"x": torch.randn(2, 6)}, dynamic={"x": {1: "s"}})
    assert "max(" in str(m.outputs[0].type.shape[1])
    for s in (2, 6):
        x = torch.randn(2, s)
        assert torch.equal(interpret(m, [x])[0], _PadToFour()(x))


def test_wrong_input_names_say_what_the_forward_takes() -> None:
    class Net(nn.Module):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return inputs * 2

    with pytest.raises(CaptureError, match=r"Net\.forward takes \(inputs\); got x"):
        capture(Net(), {"x": torch.randn(2, 3)})
