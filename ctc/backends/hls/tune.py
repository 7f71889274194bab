"""Tiling search for the fpga target's integer GEMM engines against the model, kept in the tuning database.

Why ctc's own search: the cost is the closed-form model of :func:`.qlinear.qlinear_cost` (equal to
the model's walk of the printed TIR, tested), so a candidate costs microseconds and the search is
exhaustive over :func:`.qlinear.candidate_tilings` (tile sizes dividing the layer, MAC and epilogue
lanes): every tiling whose DSPs or on-chip bytes exceed the layer's share of the board
(``utilization``) is refused, and the fastest of the rest wins (ties: fewer DSPs).

Database: ``<tuning dir>/<board key>/hls_tilings.json`` next to the CPU target's meta-schedule
records (:mod:`ctc.backends.tvm.tuning`: same root, ``~/.cache/ctc/tuning``, one directory per target
key).  Each record is keyed by the workload (:attr:`.qlinear.QLinearShape.key`) and holds the tiling,
its modelled cycles and resources, the default tiling's cycles, how many candidates were tried
and refused and the search version (records of an older engine or model are searched again); a
second build finds every layer there and searches nothing.  The board key names the
board and every number of it that changes the answer (clock, bandwidth, DSPs, widths, utilization).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctc.backends.hls.boards import Board
from ctc.backends.hls.qlinear import QLinearShape, Tiling, candidate_tilings, default_tiling, qlinear_cost

__all__ = ["TuneError", "board_key", "search_layer", "tune_plan", "tuning_db_path"]


SEARCH_VERSION = 2
"""Bumped whenever the engine, its cost model or the candidate space change: older records are searched
again instead of being reused."""


class TuneError(Exception):
    """No tiling of a layer fits the board (names the layer and what overflows)."""


def board_key(board: Board, utilization: float) -> str:
    """Directory-safe key: ``fpga-<board>-<clock>MHz-<hash of every budget number>``."""
    h = hashlib.sha1(json.dumps({**board.to_json(), "utilization": utilization}, sort_keys=True).encode()).hexdigest()
    return f"fpga-{board.name}-{board.clock_mhz:g}MHz-{h[:8]}"


def tuning_db_path(board: Board, utilization: float, cache_dir: str | Path | None = None) -> Path:
    """Where the tilings for this board live (``~/.cache/ctc/tuning/<board key>/hls_tilings.json``)."""
    if cache_dir is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(base) / "ctc" / "tuning"
    else:
        root = Path(cache_dir)
    return root / board_key(board, utilization) / "hls_tilings.json"


def search_layer(shape: QLinearShape, board: Board, utilization: float) -> dict[str, Any]:
    """The best fitting tiling of one layer, with the default's cost and the search counts."""
    best = None
    tried = refused = 0
    for t in candidate_tilings(shape):
        if t.valid_for(shape):
            continue
        tried += 1
        c = qlinear_cost(shape, t, board)
        if c.fits(board, utilization):
            refused += 1
            continue
        key = (c.latency_cycles, c.dsps, c.onchip_bytes)
        if best is None or key < best[0]:
            best = (key, t, c)
    d = default_tiling(shape)
    dc = qlinear_cost(shape, d, board)
    if best is None:
        raise TuneError(f"no tiling of {shape.key} fits {utilization:.0%} of board {board.name} ({tried} tried; the "
                        f"default tiling needs {dc.dsps} DSPs and {dc.onchip_bytes} on-chip bytes, the board has "
                        f"{board.dsps} and {board.onchip_bytes})")
    _, t, c = best
    return {"tiling": list(t.as_tuple()), "latency_cycles": c.latency_cycles, "dsps": c.dsps,
            "onchip_bytes": c.onchip_bytes, "bound": c.bound, "default": list(d.as_tuple()),
            "default_latency_cycles": dc.latency_cycles, "candidates": tried, "refused": refused,
            "version": SEARCH_VERSION, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _read_db(path: Path, log: Any) -> dict[str, Any]:
    """The tuning database at ``path`` ({} when absent); one that is not a JSON object of records (a damaged or
    hand-edited file) is read as empty, and the log says so: its layers are searched again and it is rewritten."""
    if not path.exists():
        return {}
    try:
        db = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        db, why = None, f"{type(e).__name__}: {e}"
    else:
        why = "not a JSON object of records"
    if isinstance(db, dict) and all(isinstance(v, dict) for v in db.values()):
        return db
    if log is not None:
        log(f"tuning database {path} cannot be read ({why}): its layers are searched again and it is rewritten")
    return {}


def _unusable(record: Mapping[str, Any], shape: QLinearShape, board: Board, utilization: float) -> str | None:
    """Why a stored record's tiling cannot serve ``shape`` on ``board`` (malformed, invalid, or too big), else None."""
    try:
        t = Tiling(*(int(v) for v in record["tiling"]))
    except (KeyError, TypeError, ValueError) as e:
        return f"malformed tiling: {type(e).__name__}: {e}"
    if min(t.as_tuple()) < 1:
        return f"tiling {list(t.as_tuple())} has a size below 1"
    return t.valid_for(shape) or qlinear_cost(shape, t, board).fits(board, utilization)


def tune_plan(layers: Mapping[str, QLinearShape], board: Board, utilization: float, *,
              cache_dir: str | Path | None = None, log: Any = None) -> tuple[dict[str, Tiling], dict[str, Any]]:
    """A tiling per layer (``value name -> Tiling``) from the database, searching the layers it lacks."""
    path = tuning_db_path(board, utilization, cache_dir)
    db = _read_db(path, log)
    plan: dict[str, Tiling] = {}
    searched = reused = 0
    t0 = time.perf_counter()
    shapes = {s.key: s for s in layers.values()}
    for i, (key, shape) in enumerate(sorted(shapes.items())):
        if key in db and db[key].get("version") == SEARCH_VERSION:
            why = _unusable(db[key], shape, board, utilization)
            if why is None:
                reused += 1
                continue
            if log is not None:
                log(f"tuning record {key} in {path} is unusable ({why}): searched again")
        try:
            db[key] = search_layer(shape, board, utilization)
        except TuneError as e:  # name the layers of this shape (the key alone says little)
            names = sorted(n for n, s in layers.items() if s.key == key)
            raise TuneError(f"layer {', '.join(names)}: {e}") from None
        searched += 1
        if log is not None:
            log(f"tuned {i + 1}/{len(shapes)} {key}: {db[key]['tiling']} ({db[key]['candidates']} candidates, "
                f"{db[key]['refused']} refused)")
    if searched:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(db, indent=1, sort_keys=True))
        tmp.replace(path)
    for name, shape in layers.items():
        plan[name] = Tiling(*db[shape.key]["tiling"])
    summary = {"db": str(path), "layers": len(layers), "workloads": len(shapes), "searched": searched,
               "reused": reused, "search_s": round(time.perf_counter() - t0, 2)}
    return plan, summary
