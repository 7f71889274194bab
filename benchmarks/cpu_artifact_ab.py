"""Builds of one model timed against each other in one process, back to back, through the runner a user calls.

Why: issue 19 asks that any-length builds run within 5% of fixed-length ones. Across processes, with a pause
before every batch (the fair protocol of `cpu_encoder_fair.py`, needed when the runtimes differ), a 2-core VM's
wake-up noise swamps a few percent: the same two artifacts there read 0.91-1.23x in consecutive runs. Two builds
of ctc share one runtime and one thread pool, so nothing spins between them: here they take turns in one process,
call after call, in interleaved rounds, each through ``ctc.load(dir).runner("cpu")(tokenizer(...))`` on the same
real text (the Lee corpus cut to ``--seq`` tokens). The first artifact is the baseline of the printed ratios.

Usage::

    python benchmarks/cpu_artifact_ab.py W/int8_128 W/int8_any --seq 128 --threads 2 --rounds 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch is loaded (the tokenizer's tensors) but runs nothing here; its OpenMP pool must not spin on a core
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def time_artifacts(paths: list[str], seq: int, threads: int, rounds: int, calls: int, warmup: int
                   ) -> dict[str, list[float]]:
    """Wall ms of every call, per artifact: ``rounds`` rounds, each ``calls`` back-to-back calls of every
    artifact in turn (the order rotating per round)."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
    from cpu_encoder_fair import encode

    import ctc

    fns = {}
    for p in paths:
        art = ctc.load(p)
        enc = encode(art.tokenizer(), seq, "pt")
        runner = art.runner("cpu")
        fns[p] = (lambda r=runner, e=enc: r(e))
        for _ in range(warmup):
            fns[p]()
    times: dict[str, list[float]] = {p: [] for p in paths}
    for rnd in range(rounds):
        order = paths[rnd % len(paths):] + paths[:rnd % len(paths)]
        for p in order:
            fn = fns[p]
            fn()
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                times[p].append((time.perf_counter() - t0) * 1e3)
    return times


def _positive(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def main() -> None:
    from fair_runner import git_commit, machine_line, p90, versions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+",
                    help="two or more ctc artifacts with a cpu target; the first is the baseline")
    ap.add_argument("--seq", type=_positive, default=128, help="tokens of real text per call")
    ap.add_argument("--threads", type=_positive, default=2)
    ap.add_argument("--rounds", type=_positive, default=20)
    ap.add_argument("--calls", type=_positive, default=5, help="timed calls per artifact per round")
    ap.add_argument("--warmup", type=_positive, default=5)
    args = ap.parse_args()
    if len(args.artifacts) < 2:
        raise SystemExit("cpu_artifact_ab: give at least two artifacts (the first is the baseline)")
    for p in args.artifacts:
        if not (Path(p) / "targets" / "cpu").is_dir():
            raise SystemExit(f"cpu_artifact_ab: {p}: no compiled cpu target (ctc compile a recipe with `target cpu`)")
    from ctc.errors import ArtifactError, ModelError, UsageError

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load0 = machine_line()
    try:
        times = time_artifacts(args.artifacts, args.seq, args.threads, args.rounds, args.calls, args.warmup)
    except (ArtifactError, ModelError, UsageError) as e:
        raise SystemExit(f"cpu_artifact_ab: {e}") from None
    print("# ctc builds timed back to back in one process (benchmarks/cpu_artifact_ab.py)\n")
    print(f"- command: `python {' '.join(sys.argv)}`")
    print(f"- when: {when}, ctc commit {git_commit()}")
    print(f"- machine: {load0}")
    print(f"- versions: {versions(('torch', 'tvm', 'tvm_ffi', 'transformers'))}")
    print(f"- protocol: batch 1, {args.seq} tokens of real text (Lee corpus); {args.threads} threads; one process; "
          f"{args.warmup} warm-up calls each; {args.rounds} rounds, each {args.calls} timed back-to-back calls of "
          "every artifact (after one untimed call), the order rotating; the runner's call on the tokenizer's "
          "torch tensors; ratios against the first artifact\n")
    base = times[args.artifacts[0]]
    print("| artifact | median ms | min ms | p90 ms | median / first | min / first |")
    print("|---|---:|---:|---:|---:|---:|")
    for p, ts in times.items():
        s = sorted(ts)
        print(f"| {p} | {statistics.median(s):.3f} | {s[0]:.3f} | {p90(s):.3f} | "
              f"{statistics.median(s) / statistics.median(base):.3f} | {s[0] / min(base):.3f} |")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
