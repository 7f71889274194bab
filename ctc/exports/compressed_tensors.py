"""`emit compressed-tensors`: quantized models in the format llm-compressor writes and transformers / vLLM load.

Each ``quant_linear`` maps onto a compressed-tensors scheme without re-quantizing anything:

* weights: ``int-quantized`` (8-bit, ``weight`` int8) or ``pack-quantized`` (2..7 bits packed into
  int32), per output channel (``group_size=-1``, strategy ``channel``) or per group of
  contiguous input channels (strategy ``group``), symmetric or with zero points.  ctc and
  compressed-tensors share the convention ``w = (q - z) * s`` with signed ``q`` and ``z``, so the
  integers are the module's (compressed-tensors' own compressor packs them, from the weights
  the module dequantizes to, which round back to the same integers);
* activations: static, asymmetric, one ``input_scale`` / ``input_zero_point`` per linear.
  ctc's unsigned codes ``[0, 2^b)`` with zero ``z`` are compressed-tensors' signed codes with zero
  ``z - 2^(b-1)``.  compressed-tensors has no static per-channel-group activation scales (its
  ``group`` strategy for static activations does not broadcast over batch and sequence), so a
  linear with several activation clusters (RPTQ ``clusters > 1``) is refused, as is a grouped
  weight behind a non-trivial RPTQ reorder (its groups are no longer contiguous input channels);
* everything else (embeddings, norms, float linears) is written as plain tensors.

The directory is loaded back with transformers (which applies the scheme through
compressed-tensors) and run on the example batch: outputs must match the module's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ctc.exports import ExportError
from ctc.exports.hf_layout import LinearHome, complete, dense_weight, hf_layout, layer_check, load_back, write_hf_dir
from ctc.exports.source import compare_outputs

__all__ = ["write"]


def _scheme_key(node: Any) -> tuple[int, int, bool, int | None]:
    a = node.attrs.get("a_bits")
    return (int(node.attrs["w_bits"]), int(node.attrs["group_size"]), bool(node.attrs["w_symmetric"]),
            None if a in (None, 16) else int(a))


def _format(w_bits: int, symmetric: bool) -> str:
    """int8 as is; fewer bits packed into int32, except with zero points: compressed-tensors 0.20 builds the
    model it loads into with unpacked zero points but packs them when compressing, so transformers rejects a
    packed asymmetric checkpoint (size mismatch).  Those weights are written one int8 per value instead."""
    return "pack-quantized" if w_bits < 8 and symmetric else "int-quantized"


def _check_representable(name: str, home: LinearHome) -> None:
    n = home.node
    if home.extra:
        raise ExportError(f"{name}: the quantized linear at {n.scope} is followed by "
                          f"{', '.join(sorted({e.op for e in home.extra}))} in the same layer (shared weights with "
                          "per-layer coefficients or LoRA), which a compressed-tensors linear cannot hold; quantize "
                          "after folding them, or write `emit hf` for the float model")
    clusters = tuple(n.attrs.get("act_clusters") or ())
    if len(clusters) > 1:
        raise ExportError(f"{name}: {n.scope} quantizes its activations with {len(clusters)} scales (RPTQ channel "
                          "clusters or per-channel activations), but compressed-tensors (and vLLM) hold one static "
                          "activation scale per linear; compile with `rptq clusters=1` or `quantize "
                          "a_granularity=tensor` for this format")
    perm = home.perm
    if perm is not None and int(n.attrs["group_size"]) != -1 and not torch.equal(perm, torch.arange(len(perm))):
        raise ExportError(f"{name}: {n.scope} groups its weights over RPTQ-reordered input channels, which "
                          "compressed-tensors cannot express (its groups are contiguous input channels); compile "
                          "with `rptq clusters=1` or group_size=-1 for this format")


def _args(bits: int, symmetric: bool, group_size: int) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    if group_size == -1:
        return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="channel")
    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size)


def _compressed(module: Any, home: LinearHome, scheme: Any) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quant_linear (weight, scales, zero points, input qparams)."""
    from compressed_tensors.compressors import NaiveQuantizationCompressor, PackedQuantizationCompressor

    from ctc.exports.hf_layout import constant_value

    n = home.node
    bits, gs, _sym, a_bits = _scheme_key(n)
    k = int(n.operand("x").type.shape[-1])
    if gs != -1 and k % gs:
        raise ExportError(f"{module.name}: {n.scope} has {k} input channels, not a multiple of its group size "
                          f"{gs}; compressed-tensors groups must divide the row")
    w, bias = dense_weight(module, home)
    scale = constant_value(module, n.operand("w_scale")).to(torch.float32)
    zero = constant_value(module, n.operand("w_zero"))
    if zero.is_floating_point() and not torch.equal(zero, zero.round()):
        raise ExportError(f"{module.name}: {n.scope} has float weight zero points (GGUF Q4_1 minima, or quantize/rptq "
                          "w_zero=\"float\"); compressed-tensors stores integer zero points: quantize with "
                          "w_zero=\"int\" for this export")
    zero = zero.to(torch.int8)
    compressor = PackedQuantizationCompressor if _format(bits, _sym) == "pack-quantized" else \
        NaiveQuantizationCompressor
    sd = dict(compressor.compress({"weight": w.to(torch.float32), "weight_scale": scale, "weight_zero_point": zero},
                                  scheme))
    if bias is not None:
        sd["bias"] = bias
    if a_bits is not None:
        s = constant_value(module, n.operand("act_scale")).to(torch.float32).reshape(1)
        z = constant_value(module, n.operand("act_zero")).to(torch.int32).reshape(1) - (1 << (a_bits - 1))
        sd["input_scale"] = s
        sd["input_zero_point"] = z.to(torch.int8)
    return {f"{home.key}.{name}": t for name, t in sd.items()}


def write(source: Any, out_dir: Path, options: Any) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    module = source.module
    layout = hf_layout(module, source.hf_config())
    tensors: dict[str, torch.Tensor] = dict(layout.tensors)
    groups: dict[tuple[int, int, bool, int | None], list[str]] = {}
    float_linears: list[str] = []
    for home in layout.linears:
        if layout.tied_head and home.key == "lm_head":
            continue
        if home.node.op != "quant_linear":
            w, b = dense_weight(module, home)
            tensors[f"{home.key}.weight"] = w.T if home.key in layout.transposed else w
            if b is not None:
                tensors[f"{home.key}.bias"] = b
            float_linears.append(home.key)
            continue
        if home.key in layout.transposed:
            raise ExportError(f"{source.name}: {home.key} is a Conv1D layer, which compressed-tensors does not "
                              "quantize; write `emit gguf` or `emit hf` instead")
        _check_representable(source.name, home)
        groups.setdefault(_scheme_key(home.node), []).append(home.key)
    if not groups:
        raise ExportError(f"{source.name}: no linear is quantized; a float model is written with `emit hf`")
    config_groups = {}
    by_key = {h.key: h for h in layout.linears}
    formats = set()
    for i, ((bits, gs, sym, a_bits), names) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        from compressed_tensors.quantization import QuantizationArgs

        acts = None if a_bits is None else QuantizationArgs(num_bits=a_bits, type="int", symmetric=False,
                                                            strategy="tensor", dynamic=False)
        scheme = QuantizationScheme(targets=[_target(names)], weights=_args(bits, sym, gs), input_activations=acts,
                                    format=_format(bits, sym))
        formats.add(_format(bits, sym))
        config_groups[f"group_{i}"] = scheme
        for name in names:
            tensors.update(_compressed(module, by_key[name], scheme))
    complete(layout, tensors, source.name, source.source_checkpoint_dir(),
             {f"{k}.weight" for names in groups.values() for k in names})
    fmt = formats.pop() if len(formats) == 1 else "mixed-precision"
    qconfig = QuantizationConfig(config_groups=config_groups, format=fmt, quantization_status="compressed",
                                 ignore=sorted(float_linears))
    files = write_hf_dir(layout, out_dir, tensors, source.tokenizer_dir,
                         {"quantization_config": qconfig.model_dump(mode="json", exclude_none=True)})
    model, got = load_back(out_dir, layout.cls, source.example, list(module.output_names))
    layers = layer_check(module, layout, model, source.example, options.max_mismatch)
    what = f"transformers' {layout.cls.__name__}.from_pretrained of the compressed-tensors directory"
    act_quant = any(k[3] is not None for k in groups)
    check = compare_outputs(what, [g.float() for g in got], source.reference_outputs(),
                            float("inf") if act_quant else options.tolerance, list(module.output_names))
    worst = min((r["cosine"] for r in check["outputs"]), default=1.0)
    if act_quant and worst < options.min_cosine:
        raise ExportError(f"{what} does not reproduce the module: output cosine {worst:.6f} < min_cosine "
                          f"{options.min_cosine}; nothing was written")
    check["criterion"] = (f"every layer on the module's own inputs (at most {options.max_mismatch:.2%} of the tokens "
                          f"off: activations rounded the other way at float ties) and output cosine >= "
                          f"{options.min_cosine}" if act_quant else
                          f"max |difference| <= {options.tolerance:g} x max |output|")
    check["layers"] = layers
    import compressed_tensors

    return {"files": files, "class": layout.cls.__name__, "scheme_format": fmt,
            "groups": [{"linears": len(v), "w_bits": k[0], "group_size": k[1], "symmetric": k[2], "a_bits": k[3]}
                       for k, v in groups.items()],
            "float_linears": sorted(float_linears),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "load_back": {**check, "reader": f"transformers {layout.cls.__name__}.from_pretrained + "
                                             f"compressed-tensors {compressed_tensors.__version__}"},
            "notes": layout.notes}


def _target(names: list[str]) -> str:
    """A compressed-tensors target matching exactly these module names."""
    import re

    return "re:^(" + "|".join(re.escape(n) for n in sorted(names)) + ")$"
