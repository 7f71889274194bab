"""How many token positions a model has: read from its Hugging Face ``config.json``, or implied by its IR.

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


# ops whose output holds only values of their first input (a position index keeps its largest value)
_VALUE_KEEPING = ("reshape", "unsqueeze", "squeeze", "expand", "cast", "permute", "transpose", "slice")


def _affine(d: object) -> tuple[str, int, int] | None:
    """``(symbol, a, b)`` when the dim ``d`` is ``a * symbol + b`` with ``a > 0`` (one symbol), else None."""
    from ctc.ir.symbolic import SymbolicError, _parse

    if not isinstance(d, str):
        return None
    try:
        poly = dict(_parse(d))
    except SymbolicError:
        return None
    terms = [(m, c) for m, c in poly.items() if m]
    if len(terms) != 1 or len(terms[0][0]) != 1 or terms[0][1] <= 0:
        return None
    (sym,), a = terms[0]
    return sym, a, poly.get((), 0)


def _arange_end(v: object) -> object | None:
    """The ``end`` dim of the ``arange`` (start 0) whose values ``v`` carries through value-keeping ops."""
    n = getattr(v, "producer", None)
    while n is not None and n.op in _VALUE_KEEPING:
        n = n.inputs[0].producer
    if n is None or n.op != "arange" or list(n.attr("start")) != [0]:
        return None
    return n.attr("end")[0]


def ir_symbol_limits(module: object) -> dict[str, tuple[int, str]]:
    """``{symbol: (largest value, why)}`` that the IR itself implies for any-length builds: a ``slice`` of a
    static axis of length ``L`` ending at ``a * s + b`` needs ``a * s + b <= L`` (HF encoders slice their
    ``position_ids`` buffer to the sequence length); an ``embedding``/``gather``/``index_select`` of a table of
    ``R`` rows at indices ``arange(a * s + b)`` needs ``a * s + b <= R`` (GPT-2's learned positions).  Compiled code
    does not check these bounds, so a longer input would read past the table: the runner refuses it first."""
    out: dict[str, tuple[int, str]] = {}

    def bound(end: object, length: object, why: str) -> None:
        aff = _affine(end)
        if aff is None or not isinstance(length, int):
            return
        sym, a, b = aff
        limit = (length - b) // a
        if limit >= 0 and (sym not in out or limit < out[sym][0]):
            out[sym] = (limit, why)

    for n in module:  # type: ignore[attr-defined]
        if n.op == "slice":
            x = n.inputs[0]
            axis = n.attr("axis") % len(x.type.shape)
            bound(n.attr("end")[0], x.type.shape[axis], f"%{n.output.name} slices axis {axis} of {x.name}, "
                  f"{x.type.shape[axis]} long")
        elif n.op in ("embedding", "gather", "index_select"):
            table, index = (n.inputs[1], n.inputs[0]) if n.op == "embedding" else (n.inputs[0], n.inputs[1])
            axis = 0 if n.op == "embedding" else n.attr("axis") % len(table.type.shape)
            end = _arange_end(index)
            if end is not None:
                bound(end, table.type.shape[axis], f"%{n.output.name} reads {table.name}, "
                      f"{table.type.shape[axis]} rows, at positions 0..{end} - 1")
    return out
