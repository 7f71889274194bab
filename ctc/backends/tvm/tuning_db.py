"""Read a meta-schedule JSON database without TVM: how many candidates each workload had measured.

Why: the tuning report and the resume logic must say what the database really holds, not what
was asked for.  ``database_workload.json`` has one ``[structural hash, module]`` line per
workload; ``database_tuning_record.json`` one ``[workload line, [trace, run_secs, target,
args]]`` line per measured candidate, appended as each is measured (a failed build or run is
recorded with a run time of 1e10 s).  The structural hash is ``tvm_ffi.structural_hash`` of the
task's module, so a task is found by its hash alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

INVALID_SECONDS = 1e9  # meta-schedule records failures as 1e10 s


@dataclass(frozen=True)
class TaskRecords:
    """The database's records of one workload."""

    measured: int  # every committed candidate, failed ones included (the trials it had)
    valid: int  # candidates that built and ran
    best_ms: float | None  # fastest valid mean run time


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def count_records(workload_file: Path, record_file: Path) -> dict[str, TaskRecords]:
    """Records per workload structural hash (as a decimal string); unreadable lines (a write cut
    short by a kill) are skipped, as meta-schedule itself does."""
    hashes: list[str | None] = []
    for line in _lines(workload_file):
        try:
            hashes.append(str(json.loads(line)[0]))
        except (ValueError, IndexError, TypeError):
            hashes.append(None)
    measured: dict[str, int] = {}
    valid: dict[str, int] = {}
    best: dict[str, float] = {}
    for line in _lines(record_file):
        try:
            widx, rec = json.loads(line)
            secs = [float(s) for s in (rec[1] or [])]
        except (ValueError, IndexError, TypeError):
            continue
        if not isinstance(widx, int) or not 0 <= widx < len(hashes) or hashes[widx] is None:
            continue
        h = str(hashes[widx])
        measured[h] = measured.get(h, 0) + 1
        if secs and all(math.isfinite(s) and s < INVALID_SECONDS for s in secs):
            valid[h] = valid.get(h, 0) + 1
            mean = sum(secs) / len(secs)
            best[h] = min(best.get(h, math.inf), mean)
    return {h: TaskRecords(n, valid.get(h, 0), round(best[h] * 1e3, 4) if h in best else None)
            for h, n in measured.items()}
