"""`emit hf`: a plain Hugging Face directory (config.json + model.safetensors + tokenizer) that
``AutoModel*.from_pretrained`` loads, for float and structurally compressed modules.

Removed blocks really are gone (renumbered, smaller ``num_hidden_layers``); low-rank and shared
layers become the dense per-layer weights a plain HF layer holds; weight-only quantized linears
are written dequantized.  Quantized activations have no plain-HF form: those modules go to
``compressed-tensors``.  The directory is loaded back with transformers and run on
the example batch; outputs must match the module's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ctc.exports import ExportError
from ctc.exports.hf_layout import complete, dense_weight, hf_layout, load_back, write_hf_dir
from ctc.exports.source import compare_outputs

__all__ = ["write"]

_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
_ROUNDING = {"f32": 0.0, "f16": 5e-3, "bf16": 4e-2}  # relative output error its weight rounding alone may cause


def activation_quantized(module: Any) -> list[str]:
    """Scopes of the linears that quantize their activations (no plain-HF form)."""
    return [n.scope for n in module.nodes if n.op == "quant_linear" and n.attrs.get("a_bits") not in (None, 16)]


def write(source: Any, out_dir: Path, options: Any) -> dict[str, Any]:
    module = source.module
    aq = activation_quantized(module)
    if aq:
        raise ExportError(f"{source.name}: a plain Hugging Face layer computes in float, but {len(aq)} linears "
                          f"quantize their activations (e.g. {aq[0]}); write `emit compressed-tensors` (static "
                          "activation scales) instead")
    layout = hf_layout(module, source.hf_config())
    dtype = _DTYPES[options.dtype]
    tensors = {k: v for k, v in layout.tensors.items()}
    dequantized: list[str] = []
    folded: list[str] = []
    for home in layout.linears:
        if layout.tied_head and home.key == "lm_head":
            continue
        w, b = dense_weight(module, home)
        tensors[f"{home.key}.weight"] = w.T if home.key in layout.transposed else w
        if b is not None:
            tensors[f"{home.key}.bias"] = b
        if home.node.op != "linear":
            dequantized.append(f"{home.key} ({home.node.op})")
        if home.extra:
            folded.append(f"{home.key} ({', '.join(sorted({n.op for n in home.extra}))})")
    complete(layout, tensors, source.name, source.source_checkpoint_dir())
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()
               if k in layout.expected}
    files = write_hf_dir(layout, out_dir, tensors, source.tokenizer_dir,
                         {"torch_dtype": _DTYPE_NAMES[options.dtype], "dtype": _DTYPE_NAMES[options.dtype]})
    model, got = load_back(out_dir, layout.cls, source.example, list(module.output_names))
    tol = max(options.tolerance, _ROUNDING[options.dtype])
    check = compare_outputs(f"transformers' {layout.cls.__name__}.from_pretrained of the written directory",
                            [g.float() for g in got], source.reference_outputs(), tol, list(module.output_names))
    notes = list(layout.notes)
    if dequantized:
        notes.append(f"{len(dequantized)} weight-only quantized or low-rank linears written as dense "
                     f"{options.dtype} weights (e.g. {dequantized[0]})")
    if folded:
        notes.append(f"{len(folded)} layers computed by several ops (shared weights with per-layer coefficients or "
                     f"LoRA deltas) written as their dense per-layer affine map (e.g. {folded[0]})")
    return {"files": files, "class": layout.cls.__name__, "tensors": len(tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "load_back": {**check, "reader": f"transformers {layout.cls.__name__}.from_pretrained"}, "notes": notes}
