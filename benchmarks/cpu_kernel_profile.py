"""Per-kernel CPU time of a compiled ctc artifact on one thread, and side by side for two artifacts.

Why: issue 19's decisions need per-kernel numbers that a shared, loaded machine does not distort.
Wall time per kernel there is mostly waiting for a core. The CPU time of the calling thread,
with the library on one thread, barely changes with other users' load (caches shared with them
still add some). The table lists each kernel's CPU ms per run, its share and its calls per run;
with two artifacts, kernels are matched by name (a kernel renamed by a change shows up twice).
The first line gives the whole run's process CPU time without the hook.

Usage::

    python benchmarks/cpu_kernel_profile.py out/minilm_fp32 --seq 128
    python benchmarks/cpu_kernel_profile.py /tmp/a_before /tmp/a_after --seq 128 --kernels 20

The artifact's own tokenizer makes the input (real text: the Lee corpus).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["TVM_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def profile_artifact(path: str, seq: int, runs: int) -> tuple[float, dict[str, tuple[float, int]]]:
    """(process CPU ms per run without the hook, {kernel: (CPU ms per run, calls per run)})."""
    import ctc
    from ctc.backends.tvm.build import load_compiled
    from ctc.eval.data import lee_test

    art = ctc.load(path)
    enc = art.tokenizer()(" ".join(lee_test()), return_tensors="pt", truncation=True, max_length=seq)
    art.runner("cpu")  # verifies the target directory against the manifest
    lib = load_compiled(Path(path) / "targets" / "cpu", threads=1, module_params=art.module.params)
    for _ in range(3):
        lib(enc)
    t0 = time.process_time()
    for _ in range(runs):
        lib(enc)
    whole = (time.process_time() - t0) / runs * 1e3
    rows = lib.profile(enc, runs=runs, clock="cpu")
    return whole, {r.name: (r.ms_per_run, r.calls_per_run) for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", help="one artifact, or two to compare (before, after)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--kernels", type=int, default=25)
    args = ap.parse_args()
    if len(args.artifacts) > 2:
        raise SystemExit("give one artifact, or two to compare")
    from ctc.errors import ArtifactError, ModelError, UsageError

    try:
        res = [profile_artifact(a, args.seq, args.runs) for a in args.artifacts]
    except (ArtifactError, ModelError, UsageError) as e:  # a wrong or broken artifact: its message, no traceback
        raise SystemExit(f"cpu_kernel_profile: {e}") from None
    print(f"# per-kernel CPU time, one thread, seq {args.seq}, {args.runs} runs (load average "
          f"{os.getloadavg()[0]:.1f}: CPU time is inflated a little by other users' cache use, far less than wall)")
    print("whole run (process CPU, no hook): " + " | ".join(f"{a}: {w:.2f} ms" for a, (w, _) in
                                                            zip(args.artifacts, res, strict=True)))
    first = res[0][1]
    total = sum(ms for ms, _ in first.values()) or 1.0
    names = sorted(set().union(*(r[1] for r in res)), key=lambda k: -max(r[1].get(k, (0.0, 0))[0] for r in res))
    head = "| kernel | calls | CPU ms/run | share |" + (" after ms/run | after / before |" if len(res) == 2 else "")
    print(head)
    print("|---|---:|---:|---:|" + ("---:|---:|" if len(res) == 2 else ""))
    for k in names[:args.kernels]:
        ms, calls = first.get(k, (0.0, 0))
        line = f"| {k} | {calls or res[-1][1].get(k, (0, 0))[1]} | {ms:.3f} | {ms / total:.1%} |"
        if len(res) == 2:
            ms2 = res[1][1].get(k, (0.0, 0))[0]
            line += f" {ms2:.3f} | {ms2 / ms:.2f} |" if ms else f" {ms2:.3f} | new |"
        print(line)


if __name__ == "__main__":
    main()
