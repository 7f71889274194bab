"""Compare the numbers of two artifacts' report.json (before/after a change to ctc), within float noise.

    python benchmarks/compare_reports.py OLD_ARTIFACT NEW_ARTIFACT [--rtol 1e-5]

Every number in the reports is compared (model sizes, per-pass parameter/byte/op counts and
fidelity, metrics, checks, target agreement), except what is expected to differ between runs:
times and latencies, paths, versions, and free text (notes).  Prints each difference and a
summary line; the exit status is 1 when a number differs beyond the tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

# Keys whose values are timings, paths or prose: they differ between any two runs.
SKIP = {"seconds", "compile_time_s", "load_seconds", "latency_ms", "p90_ms", "torch_backend_latency_ms",
        "speedup_vs_torch_backend", "tune_s", "time", "notes", "dir", "recipe_file", "ctc_version", "files",
        "protocol", "loaded_from", "model_dir", "tokenizer_dir", "name", "span", "rewrites", "analyses_computed",
        "warnings", "source", "at", "recipe_text", "summary", "error"}


def flatten(x: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b[0].c": leaf}`` for every leaf not under a SKIP key."""
    out: dict[str, Any] = {}
    if isinstance(x, dict):
        for k, v in x.items():
            if k in SKIP:
                continue
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = x
    return out


def differs(a: Any, b: Any, rtol: float) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return a != b
    if math.isnan(float(a)) and math.isnan(float(b)):
        return False
    return not math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=rtol * 1e-3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--rtol", type=float, default=1e-5)
    args = ap.parse_args()
    old = flatten(json.loads((args.old / "report.json").read_text()))
    new = flatten(json.loads((args.new / "report.json").read_text()))
    bad = 0
    for k in sorted(set(old) | set(new)):
        if k not in old or k not in new:
            print(f"only in {'new' if k not in old else 'old'}: {k} = {new.get(k, old.get(k))!r}")
            bad += 1
        elif differs(old[k], new[k], args.rtol):
            print(f"differs: {k}: {old[k]!r} -> {new[k]!r}")
            bad += 1
    numbers = sum(isinstance(v, (int, float)) for v in old.values())
    print(f"{args.old} vs {args.new}: {len(old)} values ({numbers} numbers) compared, {bad} difference(s), "
          f"rtol {args.rtol}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
