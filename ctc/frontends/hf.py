"""Hugging Face models, offline only: load a local directory (or an already-cached hub name)
and capture it with ``input_ids`` and ``attention_mask`` as inputs.

Nothing is downloaded: every ``from_pretrained`` call passes ``local_files_only=True``; nothing in
the directory runs as code (``trust_remote_code=False``, pickled weights read ``weights_only``).
A path that does not hold a model gives one paragraph naming the path and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctc.frontends.aten_capture import CaptureError, capture
from ctc.ir.graph import Module
from ctc.tasks import TASK_CAUSAL_LM, TASK_ENCODER  # re-exported by ctc.frontends


class ModelLoadError(CaptureError):
    """A model could not be loaded (bad path, not cached, unreadable weights)."""


OUTPUT_OF_TASK = {TASK_ENCODER: "last_hidden_state", TASK_CAUSAL_LM: "logits"}


@dataclass
class HFModel:
    """An eager Hugging Face model plus what capture and evaluation need."""

    model: nn.Module
    task: str
    arch: str
    source: str
    name: str
    tokenizer: Any = None
    tokenizer_dir: str | None = None
    load_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)


def _task_of(config: Any, model: nn.Module | None = None) -> str:
    archs = [a for a in (getattr(config, "architectures", None) or [])]
    if model is not None:
        archs.append(type(model).__name__)
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return TASK_CAUSAL_LM
    if getattr(config, "is_decoder", False) or config.model_type in (
            "gpt2", "llama", "qwen2", "opt", "mistral", "gpt_neox", "phi", "gemma", "qwen3"):
        return TASK_CAUSAL_LM
    return TASK_ENCODER


def load_hf(name_or_dir: str | Path, *, task: str | None = None, gguf_file: str | None = None,
            dtype: torch.dtype = torch.float32, name: str | None = None) -> HFModel:
    """Load a Hugging Face model and tokenizer from local files only.

    ``task`` ("encoder" | "causal_lm") defaults from the config's architectures.  ``gguf_file``
    loads (and de-quantizes) a GGUF checkpoint inside ``name_or_dir``.
    """
    import transformers as T

    src = str(name_or_dir)
    p = Path(src).expanduser()
    looks_like_path = p.is_absolute() or src.startswith((".", "~")) or p.exists() or src.count("/") > 1
    if looks_like_path and not p.is_dir():
        raise ModelLoadError(
            f"cannot load Hugging Face model {src!r}: "
            f"{'it is a file, not a directory' if p.exists() else 'no such directory'}. "
            "Give a directory holding config.json and weights (model.safetensors or a .gguf via gguf_file), "
            "or a bundled model name (`minilm`, `smollm2`); ctc never downloads models.")
    # offline, and no code from the model directory: remote code refused, .bin weights read weights_only
    kw: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    try:
        config = T.AutoConfig.from_pretrained(str(p) if looks_like_path else src, **kw)
    except Exception as e:  # noqa: BLE001 - one paragraph instead of a traceback
        raise ModelLoadError(
            f"cannot load Hugging Face model {src!r}: no readable config ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). ctc works offline: pass a local model directory "
            "(config.json + weights) or a name already in the local Hugging Face cache.") from None
    task = task or _task_of(config)
    if task not in OUTPUT_OF_TASK:
        raise ModelLoadError(f"unknown task {task!r} for {src!r} (choose from {sorted(OUTPUT_OF_TASK)})")
    cls = T.AutoModelForCausalLM if task == TASK_CAUSAL_LM else T.AutoModel
    try:
        model = cls.from_pretrained(str(p) if looks_like_path else src, dtype=dtype, attn_implementation="sdpa",
                                     weights_only=True, **kw)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(
            f"cannot load the weights of {src!r} as a {task} model ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Check that the directory holds complete weights "
            "(model.safetensors, or the .gguf named by gguf_file) matching config.json.") from None
    model.eval()
    tok, tok_dir = None, None
    try:
        tok = T.AutoTokenizer.from_pretrained(str(p) if looks_like_path else src, **kw)
        tok_dir = str(p) if looks_like_path else None
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
    except Exception:  # noqa: BLE001 - a model without a tokenizer still captures
        tok = None
    return HFModel(model=model, task=task, arch=str(config.model_type), source=str(p) if looks_like_path else src,
                   name=name or (p.name if looks_like_path else src), tokenizer=tok, tokenizer_dir=tok_dir,
                   load_kwargs={"gguf_file": gguf_file} if gguf_file else {})


def example_inputs(model: nn.Module, *, batch: int = 1, seq_len: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic ``input_ids``/``attention_mask`` for capture (ids drawn below the vocab size)."""
    g = torch.Generator().manual_seed(seed)
    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq_len, dtype=torch.long)}


def hf_meta(model: nn.Module, task: str, source: str | None = None) -> dict[str, Any]:
    return {"arch": str(getattr(model.config, "model_type", type(model).__name__)), "task": task,
            "output": OUTPUT_OF_TASK[task], "source": source or "", "hf_class": type(model).__name__}


DYNAMIC_DEFAULT = ("batch", "seq")


def capture_hf_model(model: nn.Module, *, task: str | None = None, batch: int = 2, seq_len: int = 16,
                     dynamic: Any = DYNAMIC_DEFAULT, name: str | None = None, source: str | None = None) -> Module:
    """Capture a Hugging Face ``PreTrainedModel`` with inputs (input_ids, attention_mask).

    Batch and sequence length are symbolic (``batch``, ``seq``) unless ``dynamic`` says otherwise.
    The output is ``logits`` for causal LMs and ``last_hidden_state`` for encoders (recorded
    in ``meta["output"]``); KV caches are off (``use_cache=False``).
    """
    task = task or _task_of(model.config, model)
    inputs: dict[str, Any] = example_inputs(model, batch=batch, seq_len=seq_len)
    if task == TASK_CAUSAL_LM:
        inputs["use_cache"] = False
    m = capture(model, inputs, dynamic=dynamic, name=name or type(model).__name__, output=OUTPUT_OF_TASK[task],
                meta=hf_meta(model, task, source))
    return m


def capture_loaded(loaded: Any, *, seq_len: int = 16, batch: int = 2, dynamic: Any = DYNAMIC_DEFAULT) -> Module:
    """Capture a model returned by :func:`load_hf` / ``load_bundled`` (or an ExportedProgram from ``load_pt2``)."""
    if not isinstance(loaded, HFModel):
        from torch.export import ExportedProgram

        from ctc.frontends.aten_capture import capture_exported

        if isinstance(loaded, ExportedProgram):
            return capture_exported(loaded)
        raise CaptureError(f"capture_loaded takes what load_hf/load_bundled/load_pt2 return, got {type(loaded)}")
    seq_len = max(3, min(seq_len, int(getattr(loaded.model.config, "max_position_embeddings", seq_len) or seq_len)))
    m = capture_hf_model(loaded.model, task=loaded.task, batch=batch, seq_len=seq_len, dynamic=dynamic,
                         name=loaded.name, source=loaded.source)
    if loaded.tokenizer_dir:
        m.meta["tokenizer_dir"] = loaded.tokenizer_dir
    if loaded.load_kwargs:
        m.meta["load_kwargs"] = dict(loaded.load_kwargs)
    return m
