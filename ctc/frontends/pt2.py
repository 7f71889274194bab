"""Saved ``torch.export`` programs (``.pt2`` files) as a model source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctc.frontends.hf import ModelLoadError


def load_pt2(path: str | Path) -> Any:
    """Load an ``ExportedProgram`` saved with ``torch.export.save`` (capture it with ``capture_loaded``)."""
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelLoadError(f"cannot load exported program {str(path)!r}: no such file. Save one with "
                             "torch.export.save(torch.export.export(model, args), 'model.pt2').")
    try:
        return torch.export.load(str(p))
    except Exception as e:  # noqa: BLE001 - one paragraph instead of a traceback
        raise ModelLoadError(f"cannot load exported program {str(path)!r}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}. Is it a file written by "
                             "torch.export.save with this torch version?") from None
