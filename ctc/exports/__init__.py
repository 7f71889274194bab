"""Formats other tools load (`emit FORMAT` in recipes, `ctc export ART --to FORMAT`): their options and writers.

Each format declares a typed options class (validated like pass and target options) and the
module that writes it.  A writer is ``write(source: ExportSource, out_dir: Path, options) -> dict``:
it fills ``out_dir`` (a fresh directory) and returns a JSON-able summary for the report.  Every
writer checks what it wrote by loading it back with that ecosystem's own reader and comparing
its outputs with the ctc module's on an example batch; an export that does not reproduce the
module is an :class:`ExportError`, never a silently different file.  Writers are imported only
when a format is written, so recipe checking never imports torch-mlir, gguf or transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ctc.errors import UsageError
from ctc.options import OptionError, option
from ctc.passes.base import PassError, PassOptions

__all__ = ["EXPORTS", "ExportError", "ExportSpec", "export_config", "gguf_source_problem"]


class ExportError(UsageError):
    """A module cannot be written in a format (names what and why, and what to do instead)."""


@dataclass(frozen=True)
class MlirOptions(PassOptions):
    """Options of `emit mlir` (torch-mlir's FX importer; checked by compiling with IREE)."""

    dialect: str = option("both", "torch (the FX importer's torch dialect), linalg (lowered to linalg-on-tensors "
                                  "by torch-mlir) or both", choices=("torch", "linalg", "both"))
    seq_len: int = option(0, "sequence length of the exported function (0 = the evaluation window, else 128)",
                          min=0)
    batch: int = option(1, "batch size of the exported function", min=1)
    verify: bool = option(True, "compile the MLIR with IREE for this CPU and compare its outputs with the IR's "
                                "on an example batch (needs iree-base-compiler and iree-base-runtime)")
    tolerance: float = option(1e-4, "verify: largest output difference accepted, relative to the output's largest "
                                    "magnitude (modules whose activations stay float)", min=0.0)
    min_cosine: float = option(0.999, "verify, modules with quantized activations: smallest output cosine accepted "
                                      "(float noise of a few ulps moves some activations across a rounding "
                                      "boundary, so element-wise tolerances do not apply)", min=0.0, max=1.0)


@dataclass(frozen=True)
class HfOptions(PassOptions):
    """Options of `emit hf` (a plain Hugging Face directory: config.json + model.safetensors)."""

    dtype: str = option("f32", "dtype of the written float weights", choices=("f32", "f16", "bf16"))
    tolerance: float = option(1e-4, "largest output difference the load-back check accepts, relative to the "
                                    "output's largest magnitude", min=0.0)


@dataclass(frozen=True)
class CompressedTensorsOptions(PassOptions):
    """Options of `emit compressed-tensors` (the format llm-compressor writes and transformers/vLLM read)."""

    tolerance: float = option(1e-4, "weight-only models: largest output difference the load-back check accepts, "
                                    "relative to the output's largest magnitude", min=0.0)
    max_mismatch: float = option(0.05, "largest fraction of tokens whose outputs of one layer may differ when the "
                                       "reloaded layer runs on the module's own input (compressed-tensors rounds "
                                       "round(x/s + z), ctc and vLLM round(x/s) + z: they part at float ties)",
                                 min=0.0, max=1.0)
    min_cosine: float = option(0.98, "models with quantized activations: smallest output cosine accepted end to "
                                     "end (one tie rounded the other way early in a network moves later "
                                     "activations across rounding boundaries too)", min=0.0, max=1.0)


@dataclass(frozen=True)
class GgufOptions(PassOptions):
    """Options of `emit gguf` (llama.cpp's format; Q8_0 / Q4_0 / Q4_1 where the quantization maps)."""

    tolerance: float = option(5e-3, "largest output difference transformers' run of the written file may show, "
                                    "relative to the output's largest magnitude (scales are stored as f16)", min=0.0)
    weight_tolerance: float = option(1e-3, "largest difference between a tensor gguf's reader de-quantizes and the "
                                           "module's weight, relative to the weight's largest magnitude", min=0.0)


def gguf_source_problem(module: Any, name: str | None = None) -> str | None:
    """Why `emit gguf` cannot write ``module``: it copies the tokenizer and metadata of the GGUF file the model
    was loaded from, so a model from anywhere else is refused (known right after capture)."""
    if module.meta.get("gguf"):
        return None
    return (f"{name or module.name}: `emit gguf` writes models loaded from a GGUF file (model bundled "
            "\"smollm2\", model hf \"DIR\" gguf=\"FILE\"), whose tokenizer and metadata it copies; write this one "
            "with `emit hf` and convert it with llama.cpp's convert_hf_to_gguf.py")


@dataclass(frozen=True)
class ExportSpec:
    """An export format: summary, options class, the module with its ``write`` and the packages it needs."""

    name: str
    summary: str
    Options: type[PassOptions]
    writer: str
    needs: tuple[tuple[str, str], ...] = ()  # (import name, pip requirement)
    # why the captured module cannot be written at all (None: it can), checked before any pass runs
    source_problem: Callable[[Any], str | None] | None = None

    def missing(self) -> list[str]:
        """pip requirements of packages this format needs that are not installed."""
        out = []
        for mod, pip in self.needs:
            try:
                found = importlib.util.find_spec(mod) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                out.append(pip)
        return out

    def write_function(self) -> Any:
        missing = self.missing()
        if missing:
            raise ExportError(f"format {self.name} needs {', '.join(missing)}: `pip install {' '.join(missing)}`")
        return importlib.import_module(self.writer).write


EXPORTS: dict[str, ExportSpec] = {s.name: s for s in [
    ExportSpec("mlir", "MLIR through torch-mlir's FX importer (torch dialect and linalg-on-tensors); weights are "
               "function arguments read from params.safetensors", MlirOptions, "ctc.backends.mlir",
               (("torch_mlir", "torch-mlir"),)),
    ExportSpec("hf", "plain Hugging Face directory (config.json + model.safetensors) for AutoModel.from_pretrained; "
               "float and structurally compressed models", HfOptions, "ctc.exports.hf_dir"),
    ExportSpec("compressed-tensors", "Hugging Face directory in the compressed-tensors format (int8, packed int4 with "
               "group scales, static activation scales) that transformers and vLLM load", CompressedTensorsOptions,
               "ctc.exports.compressed_tensors", (("compressed_tensors", "compressed-tensors"),)),
    ExportSpec("gguf", "GGUF file for llama.cpp (Llama-family models loaded from a GGUF file; Q8_0 / Q4_0 / Q4_1 "
               "blocks where the quantization maps, F32 otherwise), read back with gguf's reader and transformers",
               GgufOptions, "ctc.exports.gguf", (("gguf", "gguf"),), gguf_source_problem),
]}


def export_config(name: str, options: dict[str, Any]) -> PassOptions:
    """The validated options of format ``name`` (raises PassError naming the bad option)."""
    try:
        return EXPORTS[name].Options.from_dict(options, owner=f"emit {name}")  # type: ignore[return-value]
    except OptionError as e:
        raise PassError(str(e)) from None


def export_dir_name(name: str) -> str:
    """Where format ``name`` goes inside an artifact."""
    return f"exports/{name}"

