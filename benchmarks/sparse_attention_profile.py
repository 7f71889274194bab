"""Where the sparse-attention CPU kernel spends its time: phase costs on SmolLM2's real q/k/v.

Why: the kernel (``ctc.backends.tvm.sparse_attention``) fuses scoring, selection and exact
attention in one loop nest, so a profiler sees one function.  This script builds variants that
stop after a phase (the kernel's ``_DEBUG`` switches) and reports each phase as the difference
of two variants, next to ctc's dense attention and the kernel with no filtering round:

* ``exact``: scores, softmax and ``p v`` over the kept keys (full - ``stop_after_compact``);
* ``k-th search``: the per-row threshold search (``stop_after_compact`` - ``no_kth``);
* ``selection rest``: statistics, guard, alive flags (``no_kth`` - ``no_select``);
* ``vnni``: the integer dot products (``no_select`` - ``no_select + no_vnni``);
* ``rest``: query quantization, score conversion and masks, compaction of the kept keys.

Times are CPU seconds of this process over the calls (all threads; with the default one thread
that is the kernel's own time, and far less sensitive than wall time to other users of a shared
machine); min and median of ``--runs`` calls; the dense row likewise (CPU time of one call of
the compiled module).

Usage::

    python benchmarks/sparse_attention_profile.py                  # length 1024, keep 0.25, rounds 4,8
    python benchmarks/sparse_attention_profile.py --length 2048 --rounds 8 --keep 0.125
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = {"full": (), "stop_after_compact": ("stop_after_compact",),
            "no_kth": ("stop_after_compact", "no_kth"), "no_select": ("stop_after_compact", "no_select"),
            "no_vnni": ("stop_after_compact", "no_select", "no_vnni")}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--keep", type=float, default=0.25, help="final keep ratio")
    ap.add_argument("--rounds", default="4,8", help="bit width of each filtering round")
    ap.add_argument("--min-keep", type=int, default=16)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args()


def kernel_times(spec: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor, cuts: tuple[str, ...],
                 runs: int) -> tuple[list[float], torch.Tensor]:
    """CPU ms per call of the kernel built with the profiling ``cuts``, and its output."""
    from ctc.backends.tvm import sparse_attention as SA

    SA._DEBUG.clear()
    SA._DEBUG.update(cuts)
    SA.plan_sparse_attention.cache_clear()
    try:
        out, secs = SA.run_sparse_attention(spec, q, k, v, pad, repeat=runs)
    finally:
        SA._DEBUG.clear()
        SA.plan_sparse_attention.cache_clear()
    return [s * 1e3 for s in secs], torch.from_numpy(out)


def main() -> None:
    args = parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    from sparse_attention import attention_module, build, capture_qkv, keep_schedule

    from ctc import frontends
    from ctc.backends.tvm import sparse_attention as SA
    from ctc.backends.tvm.int_kernels import target_has_vnni
    from ctc.eval.data import evaluation_windows
    from ctc.eval.latency import machine_info
    from ctc.frontends import load_bundled

    L, rounds = args.length, tuple(int(x) for x in args.rounds.split(","))
    hf = load_bundled("smollm2")
    model, tok, info = hf.model, hf.tokenizer, hf.info
    module = frontends.capture_hf_model(model, task=info.task, name="smollm2")
    q, k, v, mask = capture_qkv(module, evaluation_windows(tok, "wiki", 1, L)[0])[args.layer]
    h, hk, d = q.shape[1], k.shape[1], q.shape[3]
    pad = torch.ones(1, 1, 1, L, dtype=torch.bool)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    print(f"# sparse-attention kernel phases: SmolLM2-135M layer {args.layer}, length {L}, keep {args.keep}, "
          f"rounds {list(rounds)}, min_keep {args.min_keep}; {machine_info()['cpu']}, threads {args.threads}, "
          f"load average {os.getloadavg()[0]:.2f} (a shared machine: CPU times, min / median of {args.runs})\n")

    def spec(bits: tuple[int, ...]) -> Any:
        return SA.SparseSpec(heads=h, kv_heads=hk, dim=d, vdim=v.shape[3], round_bits=bits, select="topk",
                             params=tuple(keep_schedule(args.keep, len(bits))), min_keep=args.min_keep,
                             dense_heads=(), causal=True, scale=1 / math.sqrt(d),
                             mask=SA.mask_spec([1, 1, 1, L], "bool"), vnni=target_has_vnni())

    dense = build(attention_module("scaled_dot_product_attention", h, hk, d, L,
                                   {"scale": 1 / math.sqrt(d), "enable_gqa": True}), args.threads)
    prepared = dense.prepare(q, k, v, mask)
    dense.run_prepared(prepared)
    walls = []
    for _ in range(args.runs):
        t0 = time.process_time()
        dense.run_prepared(prepared)
        walls.append((time.process_time() - t0) * 1e3)
    med: dict[str, float] = {}
    print("| variant | min ms | median ms | output cosine |")
    print("|---|---|---|---|")
    print(f"| ctc dense attention | {min(walls):.2f} | {statistics.median(walls):.2f} | 1 |")
    t, out = kernel_times(spec(()), q, k, v, pad, (), args.runs)
    cos = float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0))
    print(f"| kernel, no filtering round | {min(t):.2f} | {statistics.median(t):.2f} | {cos:.5f} |")
    for name, cuts in VARIANTS.items():
        t, out = kernel_times(spec(rounds), q, k, v, pad, cuts, args.runs)
        med[name] = statistics.median(t)
        cos = float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0))
        print(f"| sparse, {name} | {min(t):.2f} | {med[name]:.2f} | {cos:.5f} |" if name == "full" else
              f"| sparse, {' + '.join(cuts)} | {min(t):.2f} | {med[name]:.2f} | - |", flush=True)
    phases = {"exact attention over kept keys": med["full"] - med["stop_after_compact"],
              "k-th search": med["stop_after_compact"] - med["no_kth"],
              "selection rest (statistics, guard, alive)": med["no_kth"] - med["no_select"],
              "vnni dot products": med["no_select"] - med["no_vnni"],
              "rest (q quantization, score conversion, compaction)": med["no_vnni"]}
    print("\n| phase | median ms | share |")
    print("|---|---|---|")
    for name, ms in phases.items():
        print(f"| {name} | {ms:.2f} | {ms / med['full'] * 100:.0f}% |")


if __name__ == "__main__":
    main()
