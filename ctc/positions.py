"""The bounds a model's inputs must keep: how many token positions it has (its Hugging Face ``config.json``,
or implied by its IR) and the tables its integer inputs index (token ids, cache positions).

Why: a sequence longer than the model's position table, or a token id past the embedding table, is not a shape
error the compiled code can see: it reads past the table's end (an any-length MiniLM library crashed the
process on 513 tokens).  The recipe checker, the artifact's input checker and the compiled runner read the
limits and raise the same errors from here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctc.errors import UsageError

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
    """One past the largest value ``v`` can hold when it is an ``arange`` from 0 carried through value-keeping
    ops and additions of a non-negative integer scalar (GPT-2 adds its past length, 0 here): None otherwise."""
    from ctc.ir.symbolic import dim_add

    n, shift = getattr(v, "producer", None), 0
    while n is not None and (n.op in _VALUE_KEEPING or n.op == "add"):
        if n.op == "add":
            c = n.attrs.get("scalar")
            if len(n.inputs) != 1 or c is None or c < 0 or c != int(c):
                return None
            shift += int(c)
        n = n.inputs[0].producer
    if n is None or n.op != "arange" or list(n.attr("start")) != [0]:
        return None
    return dim_add(n.attr("end")[0], shift)


def ir_symbol_limits(module: object) -> dict[str, tuple[int, str]]:
    """``{symbol: (largest value, why)}`` that the IR itself implies for any-length builds: a ``slice`` of a
    static axis of length ``L`` ending at ``a * s + b`` needs ``a * s + b <= L`` (HF encoders slice their
    ``position_ids`` buffer to the sequence length); an ``embedding``/``gather``/``index_select`` of a table of
    ``R`` rows at indices ``arange(a * s + b) (+ c)`` needs ``a * s + b (+ c) <= R`` (GPT-2's learned positions).
    Compiled code does not check these bounds, so a longer input would read past the table: the runner refuses
    it first."""
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


def model_limits(module: Any, config: Path | None) -> dict[str, tuple[int, str]]:
    """``{symbol: (largest value, why)}``: :func:`ir_symbol_limits` of ``module``, with ``seq`` also held to the
    positions of ``config`` (a ``config.json``; None or missing: the IR's alone), the smaller winning."""
    return with_config(ir_symbol_limits(module) if module is not None else {}, config)


def with_config(limits: dict[str, tuple[int, str]], config: Path | None) -> dict[str, tuple[int, str]]:
    """``limits`` with ``seq`` held also to the positions of ``config`` (a ``config.json``; None or missing: left
    as it is), the smaller winning; updated in place and returned."""
    positions = config_positions(config) if config is not None else None
    if positions is not None and positions[0] < limits.get("seq", (positions[0] + 1,))[0]:
        limits["seq"] = positions
    return limits


def check_symbol_limits(limits: Mapping[str, tuple[int, str]], sizes: Mapping[str, tuple[int, str]]) -> None:
    """A symbol over its limit (``sizes``: symbol -> (size, the input it was read from)) is a :class:`UsageError`
    before anything runs: the compiled code would read past the table that bounds it."""
    for sym, (limit, why) in limits.items():
        got = sizes.get(sym)
        if got is None or got[0] <= limit:
            continue
        if sym == "seq":
            raise UsageError(f"input {got[1]!r} has {sym} = {got[0]}, but the model has {limit} positions "
                             f"({why}); cut the input to at most {limit} (e.g. tokenizer(..., truncation=True, "
                             f"max_length={limit}))")
        raise UsageError(f"input {got[1]!r} has {sym} = {got[0]}, but the model allows at most {limit} ({why}): "
                         f"give at most {limit}")


def index_bounds(module: Any) -> dict[str, tuple[int, str]]:
    """``{input name: (table size, what its values are)}`` for the integer inputs ``module`` uses as indices:
    token ids and other embedding indices into the table's rows, a decode step's cache positions (float or
    quantized caches, written in place); the smallest table when an input indexes several."""
    index = {id(v): v.name for v in module.inputs}
    bounds: dict[str, tuple[int, str]] = {}
    for n in module.nodes:
        if n.op == "embedding":
            name, table = index.get(id(n.operand("ids"))), n.operand("weight")
            size = table.type.shape[0]
            what = "token ids" if name == "input_ids" else f"indices into {table.name}"
        elif n.op in ("cache_write", "quant_cache_write"):
            cache = n.operand("cache").type
            axis = n.attrs["axis"] % cache.rank if n.op == "cache_write" else 2  # quantized: [B, Hkv, L, D']
            name, size, what = index.get(id(n.operand("position"))), cache.shape[axis], "cache positions"
        else:
            continue
        if name is not None and isinstance(size, int) and (name not in bounds or size < bounds[name][0]):
            bounds[name] = (size, what)
    return bounds


def check_index_values(name: str, values: Any, size: int, what: str) -> None:
    """Input ``name``'s ``values`` (a numpy array) outside ``[0, size)`` is a :class:`UsageError` naming the fix."""
    if not values.size:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= size:
        if what == "token ids":
            has, fix = f"the embedding has {size} rows", "tokenize with this artifact's tokenizer"
        elif what == "cache positions":
            has, fix = f"the cache has {size} positions", "a longer sequence needs a step compiled with a larger " \
                                                          "`decode=`"
        else:
            has, fix = f"the table has {size} rows", f"give values from 0 to {size - 1}"
        raise UsageError(f"input {name!r} holds {what} in [{lo}, {hi}]; {has} (0 to {size - 1}): {fix}")
