"""ctc: compress, then compile.  Capture a PyTorch model into a graph IR, compress it
with composable passes, and lower it through Apache TVM."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keeps `import ctc` light: torch is imported only when an artifact is loaded
    from ctc.artifact import Artifact

__version__ = "0.1.0"


def load(path: str | os.PathLike[str]) -> Artifact:
    """Load an artifact directory written by `ctc compile` (``ctc.load("out/x").run(inputs)``)."""
    from ctc.artifact import load as _load

    return _load(path)
