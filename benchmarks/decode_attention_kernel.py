"""The decode-step attention kernel alone (ctc/backends/tvm/decode_attention.py) on SmolLM2-135M's shape:
fp32 cache, int8 cache scored a row at a time, int8 cache scored 16 keys per vector (``key_lanes``).

Why: the 2048-token decode step's attention is 30 calls of this kernel; timing it alone, with the three
variants built in one process and called in interleaved rounds, says what each costs per layer without
the ~500 MB of weights the rest of the step streams.  The caches are random rows of the model's shape
(9 query heads on 3 kv heads, head dim 64), the last position masked as in a preallocated cache; each
variant's output is checked against PyTorch's attention over the same (dequantized) cache.

    python benchmarks/decode_attention_kernel.py --keys 2048 --threads 2

Note: 30 layers' caches do not fit in the CPU caches, one layer's does: per-call times here are the
compute side (the fp32 cache's 3.1 MB per layer is a memory stream in the real step, the int8 cache's 0.8 MB).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=2048, help="cached positions (the last one masked)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hq", type=int, default=9)
    ap.add_argument("--hk", type=int, default=3)
    ap.add_argument("--calls", type=int, default=50, help="calls per variant per round")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import tvm

    from ctc.backends.tvm import decode_attention as DA
    from ctc.backends.tvm.int_kernels import host_target
    from ctc.ir import quant as Q

    b, hq, hk, n, d = 1, args.hq, args.hk, args.keys, 64
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; load average "
          f"{os.getloadavg()[0]:.2f}; tvm {tvm.__version__}")
    print(f"shape: {hq} query heads on {hk} kv heads, head dim {d}, {n} cached keys; {args.threads} threads; "
          f"{args.rounds} interleaved rounds of {args.calls} calls per variant")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, 1, d, generator=g)
    k, v = torch.randn(b, hk, n, d, generator=g), torch.randn(b, hk, n, d, generator=g)
    kc, ks = Q.quantize_kv(k, 8, -1)
    vc, vs = Q.quantize_kv(v, 8, -1)
    mask = (torch.arange(n) < n - 1).reshape(1, 1, 1, n)
    target = host_target()
    splits = DA.key_splits(b * hk, n, args.threads)
    dev = tvm.cpu()
    variants = {"fp32 cache": ("float32", False), "int8 cache, rows": ("int8", False)}
    if DA.key_lanes_supported(target, "int8", -1):
        variants["int8 cache, 16 keys per vector"] = ("int8", True)
    runs = {}
    for label, (cache, lanes) in variants.items():
        spec = DA.AttendSpec(b, hq, hk, n, d, -1, 1 / math.sqrt(d), "bool", 1, 1, cache=cache, splits=splits,
                             key_lanes=lanes)
        lib = tvm.compile(tvm.IRModule({"main": DA.attend_func(spec).with_attr("global_symbol", "main")}),
                          target=target)
        if cache == "int8":
            feed, kr, vr = [q, kc, ks, vc, vs, mask], Q.dequantize_kv(kc, ks, 8, -1), Q.dequantize_kv(vc, vs, 8, -1)
        else:
            feed, kr, vr = [q, k, v, mask], k, v
        ta = [tvm.runtime.tensor(x.numpy(), dev) for x in feed]
        out = tvm.runtime.tensor(np.zeros((b, hq, 1, d), np.float32), dev)
        lib["main"](*ta, out)
        ref = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, enable_gqa=hq != hk)
        err = float((torch.from_numpy(out.numpy()) - ref).abs().max())
        runs[label] = (lib["main"], ta, out, [])
        print(f"  built {label}: max abs err vs torch {err:.2e}")
    for _ in range(args.rounds):
        for f, ta, out, ts in runs.values():
            f(*ta, out)
            for _ in range(args.calls):
                t0 = time.perf_counter()
                f(*ta, out)
                ts.append((time.perf_counter() - t0) * 1e6)
    print(f"(load average after: {os.getloadavg()[0]:.2f})\n")
    print("| kernel | median us | min us | x fp32 cache (median) |")
    print("|---|---:|---:|---:|")
    base = float(np.median(runs["fp32 cache"][3]))
    for label, (_, _, _, ts) in runs.items():
        med = float(np.median(ts))
        print(f"| {label} | {med:.1f} | {min(ts):.1f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
