"""Frontends: capture PyTorch / Hugging Face models into the ctc IR."""

from ctc.frontends.aten_capture import CaptureError, capture

__all__ = ["CaptureError", "capture"]
