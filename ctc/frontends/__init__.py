"""Frontends: capture PyTorch / Hugging Face models into the ctc IR.

``capture(model, example_inputs)`` for any ``nn.Module``; ``load_hf(dir)`` / ``load_bundled(name)``
then ``capture_loaded(loaded)`` for Hugging Face models; ``load_pt2(path)`` for a saved
``torch.export`` program; ``decode_step(model)`` + ``decode_inputs(model, past)`` for one
generation step of a causal LM over explicit KV-cache tensors.
"""

from ctc.frontends.aten_capture import CaptureError, capture, capture_exported
from ctc.frontends.bundled import BUNDLED, load_bundled
from ctc.frontends.decode import decode_inputs, decode_step
from ctc.frontends.hf import (
    TASK_CAUSAL_LM,
    TASK_ENCODER,
    HFModel,
    ModelLoadError,
    capture_hf_model,
    capture_loaded,
    example_inputs,
    load_hf,
    task_of,
)
from ctc.frontends.pt2 import load_pt2

__all__ = [
    "BUNDLED", "TASK_CAUSAL_LM", "TASK_ENCODER", "CaptureError", "HFModel", "ModelLoadError",
    "capture", "capture_exported", "capture_hf_model", "capture_loaded", "decode_inputs", "decode_step",
    "example_inputs", "load_bundled",
    "load_hf", "load_pt2", "task_of",
]
