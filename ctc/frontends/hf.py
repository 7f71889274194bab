"""Hugging Face models, offline only: load a local directory (or an already-cached hub name) and
capture it with the inputs the model itself takes.

Nothing is downloaded: every ``from_pretrained`` call passes ``local_files_only=True``; nothing in
the directory runs as code (``trust_remote_code=False``, pickled weights read ``weights_only``).
The task (causal LM, encoder, encoder-decoder LM, image classifier, vision or audio encoder)
comes from the model: its ``architectures`` or ``model_type`` looked up in transformers' own
auto-model mappings, never from a list kept in ctc.  The inputs come from the model class's
``main_input_name`` and forward signature (``input_ids``/``attention_mask``, ``pixel_values``,
``input_values``, ``input_features``, ``decoder_input_ids``), their sizes from the config or the
image processor saved next to it.  The attention implementation defaults to what the model
class supports (``sdpa`` where it can, ``eager`` otherwise: Gemma-2's soft-capping has no sdpa).
A path that does not hold a model gives one paragraph naming the path and the fix.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctc.frontends.aten_capture import CaptureError, capture
from ctc.ir.graph import Module
from ctc.tasks import MODEL_TASKS as TASKS
from ctc.tasks import (  # re-exported by ctc.frontends
    TASK_AUDIO,
    TASK_CAUSAL_LM,
    TASK_ENCODER,
    TASK_IMAGE_CLASSIFICATION,
    TASK_SEQ2SEQ,
    TASK_VISION,
    normalize_task,
)


class ModelLoadError(CaptureError):
    """A model could not be loaded (bad path, not cached, unreadable weights, bad options)."""


OUTPUT_OF_TASK = {TASK_ENCODER: "last_hidden_state", TASK_CAUSAL_LM: "logits", TASK_SEQ2SEQ: "logits",
                  TASK_IMAGE_CLASSIFICATION: "logits", TASK_VISION: "last_hidden_state",
                  TASK_AUDIO: "last_hidden_state"}
ATTN_CHOICES = ("sdpa", "eager")
DTYPES = {"f32": torch.float32, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "f16": torch.float16, "fp16": torch.float16, "float16": torch.float16}


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
    processor: Any = None
    info: Any = None  # ctc.bundled.BundledInfo for bundled models (what was loaded from where, how long)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)


# --------------------------------------------------------------------------- task and class
def _mappings() -> Any:
    from transformers.models.auto import modeling_auto as MA

    return MA


def _classes_in(mapping: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    for v in mapping.values():
        out.update(v if isinstance(v, (list, tuple)) else [v])
    return out


def _task_mappings() -> list[tuple[str, dict[str, Any], str]]:
    """(task, auto-model mapping, AutoModel class name) in the order tasks are decided."""
    MA = _mappings()
    return [
        (TASK_SEQ2SEQ, MA.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, "AutoModelForSeq2SeqLM"),
        (TASK_SEQ2SEQ, MA.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES, "AutoModelForSpeechSeq2Seq"),
        (TASK_CAUSAL_LM, MA.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "AutoModelForCausalLM"),
        (TASK_IMAGE_CLASSIFICATION, MA.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
         "AutoModelForImageClassification"),
    ]


_MODALITY_TASK = {"input_ids": TASK_ENCODER, "pixel_values": TASK_VISION, "input_values": TASK_AUDIO,
                  "input_features": TASK_AUDIO}


def _main_input_of_class(name: str | None) -> str:
    import transformers as T

    cls = getattr(T, name, None) if name else None
    return str(getattr(cls, "main_input_name", None) or "input_ids")


def task_of(config: Any, model: nn.Module | None = None) -> str:
    """The ctc task of a model, from transformers' auto-model mappings: the class names in
    ``config.architectures`` (or the model's own class), else the ``model_type``; models no task
    mapping claims are encoders of their modality (text, vision or audio, by their main input)."""
    archs = list(getattr(config, "architectures", None) or [])
    if model is not None:
        archs.insert(0, type(model).__name__)
    for task, mapping, _ in _task_mappings():
        if set(archs) & _classes_in(mapping):
            return task
    if archs:
        main = getattr(model, "main_input_name", None) or _main_input_of_class(archs[0])
        return _MODALITY_TASK.get(main, TASK_ENCODER)
    MA = _mappings()
    mt = str(getattr(config, "model_type", ""))
    for task, mapping, _ in _task_mappings():
        if mt not in mapping:
            continue
        if task == TASK_SEQ2SEQ and not getattr(config, "is_encoder_decoder", False):
            continue
        if task == TASK_CAUSAL_LM and mt in MA.MODEL_FOR_MASKED_LM_MAPPING_NAMES and \
                not getattr(config, "is_decoder", False):
            continue  # an encoder that also has an LM-head variant (BERT): capture the encoder
        return task
    base = MA.MODEL_MAPPING_NAMES.get(mt)
    return _MODALITY_TASK.get(_main_input_of_class(base if isinstance(base, str) else None), TASK_ENCODER)


def auto_class(task: str) -> Any:
    """The transformers Auto class that loads a model for ``task``."""
    import transformers as T

    for t, _, name in _task_mappings():
        if t == task:
            return getattr(T, name)
    return T.AutoModel


def default_attn(cls: type) -> str:
    """``sdpa`` when the model class supports it (captured as one attention op), else ``eager``."""
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def _resolve_class(config: Any, task: str) -> type | None:
    """The concrete model class ``auto_class(task)`` would build for ``config`` (None if unknown)."""
    auto = auto_class(task)
    mapping = getattr(auto, "_model_mapping", None)
    try:
        return mapping[type(config)] if mapping is not None else None
    except KeyError:
        for t, m, _ in _task_mappings():
            if t == task and config.model_type in m:
                import transformers as T

                return getattr(T, m[config.model_type], None)
        return None


# --------------------------------------------------------------------------- loading
def check_options(*, task: str | None, attn: str | None, dtype: Any) -> tuple[str | None, str | None, torch.dtype]:
    """Validate the model options (recipe ``model hf "dir" task=... attn=... dtype=...``)."""
    import difflib

    t = normalize_task(task) if task is not None else None
    if t is not None and t not in TASKS:
        near = difflib.get_close_matches(t, TASKS, n=1)
        raise ModelLoadError(f"unknown task {task!r}{f' (did you mean {near[0]!r}?)' if near else ''}; "
                             f"tasks: {', '.join(TASKS)}")
    if attn is not None and attn not in ATTN_CHOICES:
        raise ModelLoadError(f"unknown attention implementation {attn!r}; choose from {', '.join(ATTN_CHOICES)}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r}; choose from f32, bf16, f16")
        dtype = DTYPES[dtype]
    return t, attn, dtype


def load_hf(name_or_dir: str | Path, *, task: str | None = None, gguf_file: str | None = None,
            dtype: Any = torch.float32, name: str | None = None, attn: str | None = None) -> HFModel:
    """Load a Hugging Face model (and its tokenizer or processor) from local files only.

    ``task`` defaults to what :func:`task_of` reads from the config; ``attn`` ("sdpa" | "eager")
    to what the model class supports; ``dtype`` is a torch dtype or "f32"/"bf16"/"f16";
    ``gguf_file`` loads (and de-quantizes) a GGUF checkpoint inside ``name_or_dir``.
    """
    import transformers as T

    task, attn, dtype = check_options(task=task, attn=attn, dtype=dtype)
    src = str(name_or_dir)
    p = Path(src).expanduser()
    looks_like_path = p.is_absolute() or src.startswith((".", "~")) or p.exists() or src.count("/") > 1
    if looks_like_path and not p.is_dir():
        raise ModelLoadError(
            f"cannot load Hugging Face model {src!r}: "
            f"{'it is a file, not a directory' if p.exists() else 'no such directory'}. "
            "Give a directory holding config.json and weights (model.safetensors or a .gguf via gguf_file), "
            "or a bundled model name (`minilm`, `smollm2`); ctc never downloads models.")
    where = str(p) if looks_like_path else src
    # offline, and no code from the model directory: remote code refused, .bin weights read weights_only
    kw: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    try:
        config = T.AutoConfig.from_pretrained(where, **kw)
    except Exception as e:  # noqa: BLE001 - one paragraph instead of a traceback
        raise ModelLoadError(
            f"cannot load Hugging Face model {src!r}: no readable config ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). ctc works offline: pass a local model directory "
            "(config.json + weights) or a name already in the local Hugging Face cache.") from None
    task = task or task_of(config)
    cls = _resolve_class(config, task)
    supported = default_attn(cls) if cls is not None else "eager"
    if attn == "sdpa" and supported != "sdpa":
        raise ModelLoadError(f"{type(config).__name__.replace('Config', '')} does not support attn=\"sdpa\" "
                             "(transformers has no sdpa path for it); use attn=\"eager\" or leave attn unset")
    attn = attn or supported
    try:
        model = auto_class(task).from_pretrained(where, dtype=dtype, attn_implementation=attn, weights_only=True,
                                                 **kw)
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0] if str(e) else ""
        hint = ("check that the directory holds complete weights (model.safetensors, or the .gguf named by "
                "gguf_file) matching config.json")
        if type(e).__name__ == "UnpicklingError" or "Weights only load failed" in msg:
            # torch's own text goes on to suggest weights_only=False, i.e. running the file's code: not passed on
            raise ModelLoadError(
                f"refusing to load the weights of {src!r}: its PyTorch pickle (.bin) holds Python objects beyond "
                "tensors, and unpickling them can run arbitrary code, which ctc never does. Save the weights as "
                "safetensors where you trust the file (`model.save_pretrained(dir, safe_serialization=True)`) and "
                "point ctc at that directory.") from None
        if "attn_implementation" in msg or "does not support" in msg:
            hint = "set the attention implementation the model supports: attn=\"eager\""
        elif "Unrecognized configuration class" in msg or "does not recognize" in msg:
            hint = f"the model has no {task} head; set task= to one of {', '.join(TASKS)}"
        article = "an" if task[:1] in "aeiou" else "a"
        raise ModelLoadError(f"cannot load the weights of {src!r} as {article} {task} model "
                             f"({type(e).__name__}: {msg}). {hint.capitalize()}.") from None
    model.eval()
    tok, tok_dir, proc = None, None, None
    main = getattr(model, "main_input_name", "input_ids")
    if main == "input_ids":
        try:
            tok = T.AutoTokenizer.from_pretrained(where, **kw)
            tok_dir = str(p) if looks_like_path else None
            if gguf_file and looks_like_path:
                tok_dir = str(_gguf_tokenizer_dir(p, gguf_file, tok, config))
            if tok.pad_token is None and tok.eos_token is not None:
                tok.pad_token = tok.eos_token
        except Exception:  # noqa: BLE001 - a model without a tokenizer still captures
            tok = None
    else:
        try:
            proc = (T.AutoImageProcessor if main == "pixel_values" else T.AutoFeatureExtractor).from_pretrained(
                where, local_files_only=True, trust_remote_code=False)
        except Exception:  # noqa: BLE001 - sizes then come from the config
            proc = None
    return HFModel(model=model, task=task, arch=str(config.model_type), source=where,
                   name=name or (p.name if looks_like_path else src), tokenizer=tok, tokenizer_dir=tok_dir,
                   load_kwargs={"gguf_file": gguf_file} if gguf_file else {}, processor=proc)


def _gguf_tokenizer_dir(model_dir: Path, gguf_file: str, tok: Any, config: Any) -> Path:
    """Where the tokenizer of a model loaded from a GGUF file can be copied from: the model directory when it
    holds tokenizer files, else a cache folder with the tokenizer transformers read out of the GGUF saved as
    files (artifacts and HF exports copy a tokenizer folder; the GGUF's own tokenizer is in no file of it)."""
    import hashlib
    import shutil

    from ctc.artifact import _TOKENIZER_FILES
    from ctc.cache import atomic_dir, default_cache_dir

    if any((model_dir / f).is_file() for f in _TOKENIZER_FILES if f != "config.json"):
        return model_dir
    g = (model_dir / gguf_file).resolve()
    st = g.stat()
    key = hashlib.sha256(f"{g}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = default_cache_dir() / "gguf-tokenizers" / f"{g.stem}-{key}"
    if not (dest / "tokenizer_config.json").is_file():
        try:
            with atomic_dir(dest) as tmp:
                tok.save_pretrained(tmp)
                if (model_dir / "config.json").is_file():
                    shutil.copy2(model_dir / "config.json", tmp / "config.json")
                else:
                    config.save_pretrained(tmp)
        except OSError:  # an unwritable cache: the artifact then holds no loadable tokenizer, as before
            return model_dir
    return dest


# --------------------------------------------------------------------------- inputs
def _forward_params(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _image_size(model: nn.Module, processor: Any) -> tuple[int, int]:
    if processor is not None:
        for key in ("crop_size", "size"):
            s = getattr(processor, key, None)
            if isinstance(s, dict):
                if "height" in s and "width" in s:
                    return int(s["height"]), int(s["width"])
                if "shortest_edge" in s:
                    return int(s["shortest_edge"]), int(s["shortest_edge"])
            elif isinstance(s, int):
                return s, s
    cfg = model.config
    s = getattr(cfg, "image_size", None)
    if isinstance(s, (list, tuple)):
        return int(s[0]), int(s[-1])
    if isinstance(s, int):
        return s, s
    return 224, 224


def example_inputs(model: nn.Module, *, batch: int = 1, seq_len: int = 16, seed: int = 0, task: str | None = None,
                   processor: Any = None) -> dict[str, torch.Tensor]:
    """Deterministic inputs of the kind the model takes (its ``main_input_name`` and forward signature):
    token ids (with an attention mask and, for encoder-decoders, decoder ids), images at the
    processor's or config's size, raw audio, or log-mel features."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    params = _forward_params(model)
    main = getattr(model, "main_input_name", "input_ids")
    out: dict[str, torch.Tensor] = {}
    if main == "input_ids":
        vocab = int(getattr(cfg, "vocab_size", 100) or 100)
        out["input_ids"] = torch.randint(0, vocab, (batch, seq_len), generator=g)
        if "attention_mask" in params or not params:
            out["attention_mask"] = torch.ones(batch, seq_len, dtype=torch.long)
    elif main == "pixel_values":
        h, w = _image_size(model, processor)
        out["pixel_values"] = torch.randn(batch, int(getattr(cfg, "num_channels", 3) or 3), h, w, generator=g)
    elif main == "input_values":
        strides = getattr(cfg, "conv_stride", None) or [1]
        kernels = getattr(cfg, "conv_kernel", None) or [1]
        hop = 1
        for s in strides:
            hop *= int(s)
        n = max(seq_len, 4) * hop + sum(int(k) for k in kernels)
        out["input_values"] = torch.randn(batch, n, generator=g)
    elif main == "input_features":
        if hasattr(cfg, "num_mel_bins") and hasattr(cfg, "max_source_positions"):  # Whisper: fixed frame count
            out["input_features"] = torch.randn(batch, int(cfg.num_mel_bins), 2 * int(cfg.max_source_positions),
                                                generator=g)
        elif hasattr(cfg, "input_feat_per_channel"):  # Speech2Text: [B, frames, features]
            feats = int(cfg.input_feat_per_channel) * int(getattr(cfg, "input_channels", 1))
            out["input_features"] = torch.randn(batch, max(seq_len, 8) * 4, feats, generator=g)
            if "attention_mask" in params:
                out["attention_mask"] = torch.ones(batch, max(seq_len, 8) * 4, dtype=torch.long)
        else:
            raise CaptureError(f"cannot size example input_features for {type(model).__name__}; pass inputs to "
                               "ctc.frontends.capture yourself")
    else:
        raise CaptureError(f"{type(model).__name__} takes {main!r} as its main input, which ctc cannot make example "
                           "inputs for; call ctc.frontends.capture with your own inputs")
    if (task or task_of(cfg, model)) == TASK_SEQ2SEQ and "decoder_input_ids" in params:
        start = getattr(cfg, "decoder_start_token_id", None)
        start = 0 if start is None else int(start)
        dec = torch.randint(0, int(getattr(cfg, "vocab_size", 100) or 100), (batch, max(seq_len // 2, 3)),
                            generator=g)
        dec[:, 0] = start
        out["decoder_input_ids"] = dec
    return out


def dynamic_dims(inputs: dict[str, torch.Tensor], dynamic: Any) -> Any:
    """``("batch", "seq")`` (the default) spelled per input kind: token ids take batch and seq, decoder
    ids batch and ``tgt``, raw audio batch and ``samples``; images and log-mel features only batch
    (models fix their spatial and frame sizes)."""
    if dynamic != DYNAMIC_DEFAULT:
        return dynamic
    spec: dict[str, dict[int, str]] = {}
    for k, v in inputs.items():
        if not isinstance(v, torch.Tensor):
            continue
        if k in ("input_ids", "attention_mask", "token_type_ids") and v.dim() == 2:
            spec[k] = {0: "batch", 1: "seq"}
        elif k == "decoder_input_ids":
            spec[k] = {0: "batch", 1: "tgt"}
        elif k == "input_values":
            spec[k] = {0: "batch", 1: "samples"}
        else:
            spec[k] = {0: "batch"}
    if "input_features" in inputs and "attention_mask" in spec:  # Speech2Text: mask follows the frames
        spec["attention_mask"] = {0: "batch"}
    return spec


def hf_meta(model: nn.Module, task: str, source: str | None = None) -> dict[str, Any]:
    return {"arch": str(getattr(model.config, "model_type", type(model).__name__)), "task": task,
            "output": OUTPUT_OF_TASK[task], "source": source or "", "hf_class": type(model).__name__}


DYNAMIC_DEFAULT = ("batch", "seq")


def capture_hf_model(model: nn.Module, *, task: str | None = None, batch: int = 2, seq_len: int = 16,
                     dynamic: Any = DYNAMIC_DEFAULT, name: str | None = None, source: str | None = None,
                     processor: Any = None) -> Module:
    """Capture a Hugging Face ``PreTrainedModel`` with the inputs it takes (see :func:`example_inputs`).

    Batch and sequence length are symbolic (``batch``, ``seq``) unless ``dynamic`` says otherwise.
    The output is ``logits`` for LMs and classifiers, ``last_hidden_state`` for encoders (recorded
    in ``meta["output"]``); KV caches are off (``use_cache=False``).
    """
    task = normalize_task(task) if task else task_of(model.config, model)
    if task not in OUTPUT_OF_TASK:
        raise CaptureError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    inputs: dict[str, Any] = example_inputs(model, batch=batch, seq_len=seq_len, task=task, processor=processor)
    if "use_cache" in _forward_params(model) and task in (TASK_CAUSAL_LM, TASK_SEQ2SEQ):
        inputs["use_cache"] = False
    return capture(model, inputs, dynamic=dynamic_dims(inputs, dynamic), name=name or type(model).__name__,
                   output=OUTPUT_OF_TASK[task], meta=hf_meta(model, task, source))


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
                         name=loaded.name, source=loaded.source, processor=loaded.processor)
    if loaded.tokenizer_dir:
        m.meta["tokenizer_dir"] = loaded.tokenizer_dir
    if loaded.load_kwargs:
        m.meta["load_kwargs"] = dict(loaded.load_kwargs)
    return m


# Kept for callers of the old name.
_task_of = task_of
