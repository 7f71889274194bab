"""One-row int4 linear kernels on the CPU, kernel by kernel, on SmolLM2-135M's linear shapes (issue 15).

Why: a decode step is a chain of one-row linears, so the int4 path's speed against llama.cpp is
decided here.  For each shape (K input, N output channels) this times, in one process and with
``--threads`` TVM threads, interleaved in rounds (median and min of ``--runs`` calls per round):

* ``wo-int4``: weight-only int4 GEMV (``weight_only.gemv_func``): nibbles expanded to fp32 in
  registers, fp32 FMAs (what ``gguf-weights`` / ``quantize a_bits=16`` lower to);
* ``w4a8-blk``: the activation row quantized per block of 32 at run time (u8, own scale and
  zero) and the int4 codes multiplied on VNNI with float block minima in the epilogue: the
  ``block_gemv`` kernels ``gguf-weights a_bits=8`` / ``quantize a_mode="block" w_zero="float"``
  lower to on AVX512-VNNI;
* ``w4a8-gen``: the same op through the generic ``int_kernels`` (one segment per block; what
  runs where ``block_gemv`` does not apply);
* ``w8a8-dyn``: int8 weights per channel x per-token int8 activations (``int_kernels``, the
  ``quantize w_bits=8 a_bits=8 a_mode="dynamic"`` step), for reference.

Weights are random (the kernels' speed does not depend on the values); each kernel's output is
checked against the op's reference semantics before timing.  Timings on a shared machine are
noisy: compare columns within one run.

    python benchmarks/int4_gemv.py                    # SmolLM2 shapes, 2 threads
    python benchmarks/int4_gemv.py --shapes 576x1536 --runs 200
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2_SHAPES = "576x576,576x192,576x1536,1536x576"  # q/o, k/v, gate/up, down (K x N)


def _time(fns: dict[str, Any], runs: int, warmup: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Per label: (median, min) microseconds per call over all rounds, labels interleaved."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(warmup):
            f()
    for _ in range(rounds):
        for k, f in fns.items():
            for _ in range(runs):
                t0 = time.perf_counter()
                f()
                samples[k].append((time.perf_counter() - t0) * 1e6)
    return {k: (statistics.median(v), min(v)) for k, v in samples.items()}


def _ik_call(kernel: Any, packed: dict[str, np.ndarray], x: np.ndarray) -> tuple[Any, Any]:
    """A no-allocation call of int_kernels' qact + qmm on ``x [1, K]`` and its output buffer."""
    import tvm

    from ctc.backends.tvm import int_kernels as IK

    fa, fm = IK.build_kernel(kernel)
    spec = kernel.spec
    dev = tvm.cpu()
    t = lambda a: tvm.runtime.tensor(np.ascontiguousarray(a), dev)  # noqa: E731
    m = x.shape[0]
    xq = t(np.zeros((m, spec.kp), np.uint8))
    dyn = [t(np.zeros((m, spec.num_clusters), np.float32)), t(np.zeros((m, spec.num_clusters), np.int32))]
    xs = [t(np.zeros((m, len(spec.segments)), np.int32))] if not spec.w_symmetric else []
    y = t(np.zeros((m, spec.n), np.float32))
    xt = t(x)
    wargs = [t(packed["wpack"]), t(packed["alpha"]), t(packed["corr"])]
    wargs += [t(packed["wzero"])] if not spec.w_symmetric else []
    wargs.append(t(packed["bias"]))
    qa, qm = fa["main"], fm["main"]

    def call() -> None:
        qa(xt, xq, *dyn, *xs)
        qm(xq, *xs, *dyn, *wargs, y)

    return call, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SMOLLM2_SHAPES, help="comma list of KxN")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import tvm

    from ctc.backends.tvm import block_gemv as BG
    from ctc.backends.tvm import int_kernels as IK
    from ctc.backends.tvm import weight_only as WO
    from ctc.ir import quant as Q
    from ctc.ir.ops.compress import quant_linear

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print("# one-row int4 linear kernels (ctc TVM CPU)")
    print(f"machine: {cpu}, {len(os.sched_getaffinity(0))} usable cpus, {platform.platform()}; load average "
          f"{os.getloadavg()[0]:.2f}; VNNI: {IK.target_has_vnni()}")
    print(f"versions: tvm {tvm.__version__}, torch {torch.__version__}; protocol: {args.threads} threads, "
          f"median and min of {args.rounds} x {args.runs} calls after {args.warmup} warm-ups, kernels interleaved")
    print("\n| K x N | wo-int4 us (median / min) | w4a8-blk us | w4a8-gen us | w8a8-dyn us "
          "| wo-int4 / w4a8-blk (median) |")
    print("|---|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.lower().split("x"))
        w = torch.randn(n, k, generator=g) * 0.05
        x = torch.randn(1, k, generator=g)
        fns: dict[str, Any] = {}
        # weight-only int4, float zero points (the GGUF Q4_1 form), fp32 activations
        q4 = Q.quantize_weight(w, 4, 32, False, float_zero=True)
        spec = WO.spec_of(k, n, 4, 32, False)
        wp, sc, off = WO.pack(spec, Q.unpack_weight(q4.qweight, 4, k).numpy(), q4.scale.numpy(), q4.zero.numpy())
        lib = tvm.compile(tvm.IRModule({"main": WO.gemv_func(spec).with_attr("global_symbol", "main")}),
                          target=IK.host_target())
        dev = tvm.cpu()
        wo_args = [tvm.runtime.tensor(a, dev) for a in (x.numpy().reshape(k), wp, sc, off)]
        wo_y = tvm.runtime.tensor(np.zeros(n, np.float32), dev)
        fns["wo-int4"] = lambda f=lib["main"], a=wo_args, y=wo_y: f(*a, y)
        ref_wo = quant_linear(x, q4.qweight, q4.scale, q4.zero, w_bits=4, group_size=32, w_symmetric=False,
                              a_bits=None, act_clusters=(), has_bias=False).numpy()
        fns["wo-int4"]()
        np.testing.assert_allclose(wo_y.numpy(), ref_wo[0], rtol=0, atol=1e-4 * np.abs(ref_wo).max())
        # W4A8: activation blocks of 32, float block minima
        attrs = dict(w_bits=4, group_size=32, w_symmetric=False, a_bits=8, act_clusters=Q.act_block_clusters(k),
                     has_bias=False, act_dynamic=True)
        s4 = IK.QLinearSpec.from_attrs(attrs, k, n, w_zero_float=True)
        k4 = IK.plan_quant_linear(s4, tile=IK.gemv_tile(s4))
        call4, y4 = _ik_call(k4, IK.prepack_weights(s4, q4.qweight, q4.scale, q4.zero, None, None, None), x.numpy())
        fns["w4a8-gen"] = call4
        call4()
        ref4 = quant_linear(x, q4.qweight, q4.scale, q4.zero, **attrs).numpy()
        np.testing.assert_allclose(y4.numpy(), ref4, rtol=0, atol=1e-4 * np.abs(ref4).max())
        bspec = BG.spec_for(k, n, 4, False)
        bp = BG.pack(bspec, Q.unpack_weight(q4.qweight, 4, k).numpy(), q4.scale.numpy(), q4.zero.numpy(), 32)
        fa = tvm.compile(tvm.IRModule({"main": BG.act_func(k).with_attr("global_symbol", "main")}),
                         target=IK.host_target())["main"]
        fg = tvm.compile(tvm.IRModule({"main": BG.gemv_func(bspec).with_attr("global_symbol", "main")}),
                         target=IK.host_target())["main"]
        bufs = (np.zeros((1, k), np.uint8), np.zeros((1, k // 32, 3), np.float32), bp["wpack"], bp["pa"],
                np.zeros((1, n), np.float32))
        b_args = [tvm.runtime.tensor(a, dev) for a in bufs]
        xt = tvm.runtime.tensor(x.numpy(), dev)
        fns["w4a8-blk"] = lambda fa=fa, fg=fg, a=b_args, xt=xt: (fa(xt, a[0], a[1]), fg(*a))
        fns["w4a8-blk"]()
        np.testing.assert_allclose(b_args[-1].numpy(), ref4, rtol=0, atol=1e-4 * np.abs(ref4).max())
        # W8A8 per-token, int8 weights per channel
        q8 = Q.quantize_weight(w, 8, -1, True)
        attrs8 = dict(w_bits=8, group_size=-1, w_symmetric=True, a_bits=8, act_clusters=(), has_bias=False,
                      act_dynamic=True)
        s8 = IK.QLinearSpec.from_attrs(attrs8, k, n)
        k8 = IK.plan_quant_linear(s8, tile=IK.gemv_tile(s8))
        call8, _ = _ik_call(k8, IK.prepack_weights(s8, q8.qweight, q8.scale, q8.zero, None, None, None), x.numpy())
        fns["w8a8-dyn"] = call8
        t = _time(fns, args.runs, args.warmup, args.rounds)
        cell = {key: f"{med:.1f} / {mn:.1f}" for key, (med, mn) in t.items()}
        print(f"| {k} x {n} | {cell['wo-int4']} | {cell['w4a8-blk']} | {cell['w4a8-gen']} | {cell['w8a8-dyn']} | "
              f"{t['wo-int4'][0] / t['w4a8-blk'][0]:.2f} |", flush=True)
    print(f"\n(load average after: {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
