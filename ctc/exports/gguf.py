"""``emit gguf``: a Llama-family model as a GGUF file for llama.cpp, its quantized linears as Q8_0 / Q4_0 / Q4_1 blocks.

What maps without re-quantizing (``w = (q - z) s`` in ctc, groups of 32 along the input channels):

* 8-bit symmetric, groups of 32 -> **Q8_0** (``w = d q``);
* 4-bit symmetric, groups of 32 -> **Q4_0** (``w = d (u - 8)``, ``u = q + 8``);
* 4-bit with zero points (integer or float), groups of 32 -> **Q4_1** (``w = d u + m``, ``m = -(z + 8) d``).

The integer codes are written as they are; only the scales (and Q4_1's minima) become f16, as GGUF
stores them: a weight moves by at most half an f16 ulp of its group's scale (the summary reports the
largest relative change; zero for models whose scales came from a GGUF file).  Every other linear
(other bit widths or group sizes, float, low-rank, shared with per-layer coefficients, reordered by
RPTQ) is written as its dense F32 map, with a note; norms and embeddings are F32, except that a
tensor equal to the source file's de-quantized tensor keeps the source's own blocks.

Metadata (architecture numbers, tokenizer) comes from the GGUF file the model was loaded from
(``model bundled "smollm2"``, ``model hf "DIR" gguf="FILE"``), with ``block_count`` and ``file_type``
set for what is written.  Models captured from safetensors have no GGUF tokenizer to copy: write them
with ``emit hf`` and convert with llama.cpp's ``convert_hf_to_gguf.py``.

The check: gguf's own reader reads the file back, every tensor de-quantizes (``gguf.quants``) to the
weight ctc meant to write, and transformers loads the file (``from_pretrained(gguf_file=...)``, its
GGUF reader) and reproduces the module's outputs on the example batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctc.exports import ExportError, gguf_source_problem
from ctc.exports.hf_layout import LinearHome, dense_weight, hf_layout
from ctc.exports.source import compare_outputs
from ctc.ir import quant as Q

__all__ = ["write"]

BLOCK = 32
GGUF_FILE = "model.gguf"


def _codes(module: Any, home: LinearHome) -> tuple[str, Q.QuantizedWeight] | None:
    """(GGUF type, weight) of a quant_linear whose storage maps onto a GGUF block type, else None."""
    from ctc.exports.hf_layout import constant_value

    n = home.node
    if n.op != "quant_linear" or home.perm is not None or home.extra:
        return None
    a = n.attrs
    bits, gs = int(a["w_bits"]), int(a.get("group_size", -1))
    k = int(n.operand("x").type.shape[-1])
    if gs != BLOCK or k % BLOCK or bits not in (4, 8) or (bits == 8 and not a.get("w_symmetric", True)):
        return None
    qw = Q.QuantizedWeight(constant_value(module, n.operand("qweight")), constant_value(module, n.operand("w_scale")),
                           constant_value(module, n.operand("w_zero")), bits, gs, bool(a.get("w_symmetric", True)), k)
    if any(t is None for t in (qw.qweight, qw.scale, qw.zero)):
        return None
    if bits == 8:
        return "Q8_0", qw
    return ("Q4_0" if qw.symmetric and not torch.is_floating_point(qw.zero) and not qw.zero.any() else "Q4_1"), qw


def _blocks(kind: str, qw: Q.QuantizedWeight) -> np.ndarray:
    """The weight's GGML blocks ``[N, K/32 * bytes]`` (uint8), codes as stored, scales (and minima) in f16."""
    q = Q.unpack_weight(qw.qweight, qw.bits, qw.k).to(torch.int16).numpy()  # signed codes [N, K]
    n, k = q.shape
    g = k // BLOCK
    d = qw.scale.float().numpy().reshape(n, g).astype(np.float16)
    if kind == "Q8_0":
        body = q.astype(np.int8).reshape(n, g, BLOCK).view(np.uint8)
        return np.concatenate([d.reshape(n, g, 1).view(np.uint8), body], axis=-1).reshape(n, -1)
    u = (q + 8).astype(np.uint8).reshape(n, g, BLOCK)
    nib = (u[..., :16] | (u[..., 16:] << 4)).astype(np.uint8)  # GGML: value j low, value j + 16 high
    head = [d.reshape(n, g, 1).view(np.uint8)]
    if kind == "Q4_1":
        z = qw.zero.float().numpy().reshape(n, g)
        m = (-(z + 8.0) * qw.scale.float().numpy().reshape(n, g)).astype(np.float16)
        head.append(m.reshape(n, g, 1).view(np.uint8))
    return np.concatenate([*head, nib], axis=-1).reshape(n, -1)


def _permute_rows(x: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for its rotary layout (``reshape(heads, 2, hd/2, ...).swapaxes(1, 2)``)."""
    n = x.shape[0]
    return x.reshape(heads, 2, n // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _source(module: Any, name: str) -> Any:
    import gguf

    path = module.meta.get("gguf")
    if not path:
        raise ExportError(str(gguf_source_problem(module, name)))
    if not Path(path).is_file():
        raise ExportError(f"{name}: the GGUF file the model was loaded from is gone: {path}")
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else "?"
    if arch != "llama":
        raise ExportError(f"{name}: the source GGUF's architecture is {arch!r}; `emit gguf` writes llama-family "
                          "models")
    return reader


def _config(source: Any) -> dict[str, Any]:
    """The model's Hugging Face config: the one that travels with it, else the one transformers reads from the GGUF."""
    try:
        return source.hf_config()
    except ExportError:
        from transformers import AutoConfig

        g = Path(source.module.meta["gguf"])
        return AutoConfig.from_pretrained(str(g.parent), gguf_file=g.name, local_files_only=True).to_dict()


def write(source: Any, out_dir: Path, options: Any) -> dict[str, Any]:
    import gguf

    from ctc.exports.hf_dir import activation_quantized

    module = source.module
    reader = _source(module, source.name)
    aq = activation_quantized(module)
    if aq:
        raise ExportError(f"{source.name}: a GGUF file holds weights only (llama.cpp picks its own activation "
                          f"format at run time), but {len(aq)} linears quantize their activations (e.g. {aq[0]}), "
                          "so no GGUF file computes what this module does; compile with a_bits=16 (weight-only) "
                          "for `emit gguf`")
    layout = hf_layout(module, _config(source))
    cfg = layout.config
    blocks = int(cfg["num_hidden_layers"])
    heads, kv_heads = int(cfg["num_attention_heads"]), int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)
    src_tensors = {t.name: t for t in reader.tensors}
    notes = list(layout.notes)
    planned: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}  # gguf name -> (type, raw or float data, meant)

    def gname(key: str) -> str:
        g = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise ExportError(f"{source.name}: no GGUF tensor name for {key}")
        return g

    def rows_for(g: str, x: np.ndarray) -> np.ndarray:
        part = g.split(".")[-2] if g.count(".") >= 2 else ""
        return _permute_rows(x, heads) if part == "attn_q" else _permute_rows(x, kv_heads) if part == "attn_k" else x

    for key, t in layout.tensors.items():
        g = gname(key)
        meant = t.detach().float().numpy()
        src = src_tensors.get(g)
        if src is not None and src.tensor_type.name not in ("F32", "F16"):
            deq = gguf.quants.dequantize(src.data, src.tensor_type).reshape(meant.shape)
            if np.array_equal(deq, meant):
                planned[g] = (src.tensor_type.name, np.asarray(src.data), meant)
                continue
        planned[g] = ("F32", meant.astype(np.float32), meant)
    counts: dict[str, int] = {}
    scale_err = 0.0
    for home in layout.linears:
        if layout.tied_head and home.key == "lm_head":
            continue
        g = gname(f"{home.key}.weight")
        mapped = _codes(module, home)
        if mapped is None:
            w, b = dense_weight(module, home)
            meant = rows_for(g, w.detach().float().numpy())
            planned[g] = ("F32", meant.astype(np.float32), meant)
            if b is not None:
                bg = gname(f"{home.key}.bias")
                planned[bg] = ("F32", rows_for(bg, b.detach().float().numpy()), rows_for(bg, b.float().numpy()))
            kind = "F32"
            if home.node.op == "quant_linear":
                notes.append(f"{home.key}: {home.node.attrs['w_bits']}-bit group_size "
                             f"{home.node.attrs.get('group_size')} has no GGUF block type: written as F32")
        else:
            kind, qw = mapped
            exact = Q.dequantize_weight(qw.qweight, qw.scale, qw.zero, qw.bits, qw.group_size, qw.k).numpy()
            raw = _blocks(kind, qw)
            planned[g] = (kind, rows_for(g, raw), rows_for(g, exact))
            if home.node.has_operand("bias"):
                from ctc.exports.hf_layout import constant_value

                bg = gname(f"{home.key}.bias")
                bias = constant_value(module, home.node.operand("bias")).float().numpy()
                planned[bg] = ("F32", rows_for(bg, bias), rows_for(bg, bias))
        counts[kind] = counts.get(kind, 0) + 1
    quant_kinds = {k for k in counts if k != "F32"}
    ftype = {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
             "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}.get(next(iter(quant_kinds)), gguf.LlamaFileType.GUESSED) \
        if len(quant_kinds) == 1 else (gguf.LlamaFileType.ALL_F32 if not quant_kinds else gguf.LlamaFileType.GUESSED)

    path = out_dir / GGUF_FILE
    w = gguf.GGUFWriter(str(path), "llama")
    skip = {"general.architecture", "general.file_type", "llama.block_count"}
    for f in reader.fields.values():
        if f.name in skip or f.name.startswith("GGUF."):
            continue
        main = f.types[0]
        sub = f.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), main, sub_type=sub)
    w.add_block_count(blocks)
    w.add_file_type(int(ftype))
    for g, (kind, data, _) in planned.items():
        qt = getattr(gguf.GGMLQuantizationType, kind)
        if kind in ("F32", "F16"):
            w.add_tensor(g, np.ascontiguousarray(data))
        else:
            w.add_tensor(g, np.ascontiguousarray(data), raw_shape=data.shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # load back: gguf's reader sees the tensors ctc meant, transformers runs the file like the module
    back = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    missing = sorted(set(planned) - set(back))
    if missing:
        raise ExportError(f"{source.name}: gguf's reader does not find {', '.join(missing[:5])} in the written file")
    for g, (kind, _, meant) in planned.items():
        t = back[g]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(meant.shape)
        top = float(np.abs(meant).max()) or 1.0
        err = float(np.abs(got - meant).max()) / top
        if t.tensor_type.name != kind or err > options.weight_tolerance:
            raise ExportError(f"{source.name}: {g} reads back as {t.tensor_type.name} {err:.3g} x max |w| away from "
                              f"the module's weight (allowed {options.weight_tolerance:g}); nothing was written")
        scale_err = max(scale_err, err)
    check = _transformers_check(source, out_dir, options)
    return {"files": [GGUF_FILE], "tensors": {k: sum(1 for v in planned.values() if v[0] == k)
                                              for k in sorted({v[0] for v in planned.values()})},
            "linears": counts, "file_type": ftype.name, "bytes": path.stat().st_size,
            "weights_read_back": {"reader": f"gguf {_version('gguf')} GGUFReader + gguf.quants.dequantize",
                                  "max_relative_change": scale_err,
                                  "why": "scales and minima stored as f16"},
            "load_back": check, "notes": notes}


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _transformers_check(source: Any, out_dir: Path, options: Any) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out_dir), gguf_file=GGUF_FILE, dtype=torch.float32,
                                                 local_files_only=True).eval()
    feed = {k: v for k, v in source.example.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        got = model(**feed, use_cache=False).logits
    what = "transformers' from_pretrained(gguf_file=...) of the written GGUF"
    check = compare_outputs(what, [got.float()], source.reference_outputs()[:1], options.tolerance,
                            list(source.module.output_names)[:1])
    check["reader"] = f"transformers {type(model).__name__} from the GGUF"
    return check
