"""How many token positions a model has, read from its Hugging Face ``config.json``.

Why: a sequence longer than the model's position table is not a shape error the compiled code can see:
its position embedding reads past the table's end (an any-length MiniLM library crashed the process on
513 tokens). The recipe checker and the compiled runner read the limit from the same keys here.
"""

from __future__ import annotations

import json
from pathlib import Path

POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def config_positions(config: Path) -> tuple[int, str] | None:
    """``(positions, where it was read)`` from a ``config.json``; None when the file or the key is missing."""
    if not config.is_file():
        return None
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    for key in POSITION_KEYS:
        v = cfg.get(key) if isinstance(cfg, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v, f"{key} in {config}"
    return None
