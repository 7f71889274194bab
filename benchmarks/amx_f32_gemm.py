"""f32 linears per GEMM shape: ctc strict (AVX-512 f32) against the AMX-BF16 split variants, with the roofs.

Why: issue 19 asks for ctc fp32 <= 0.7x ONNX Runtime fp32, which AVX-512 f32 GEMMs cannot give (MLAS runs
the same FMAs); ``fp32_matmul=bf16x6|bf16x3`` runs them on AMX-BF16 tiles (docs/tvm-cpu-backend.md). This
script times one ``linear`` (+ bias) per MiniLM shape as a compiled ctc library in each mode (the
activation split included), and torch's own f32 GEMM (oneDNN) beside it, interleaved in rounds, min and
median. It measures the roofs on this CPU: the AMX-BF16 peak (``tdpbf16ps`` on registers only, no
loads) and an f32 GEMM roof (torch.mm 1024^3, MKL/oneDNN AVX-512), both on the same thread count, and
prints each kernel's achieved rate against them: the "useful" rate (2 M K N per second) and, for the
split modes, the raw bf16 rate (products x 2 M K N per second) as a share of the AMX peak.

Run::

    python benchmarks/amx_f32_gemm.py --threads 1 --runs 30 --rounds 5
    python benchmarks/amx_f32_gemm.py --threads 2 --rows 128,384
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = ((384, 384), (384, 1536), (1536, 384))  # (K, N) of MiniLM's q/k/v/out, FFN up, FFN down
MODES = ("strict", "bf16x6", "bf16x3")
PRODUCTS = {"strict": 1, "bf16x6": 6, "bf16x3": 3}


def amx_peak(threads: int, iters: int = 200_000) -> float:
    """bf16 FLOP/s of ``tdpbf16ps`` on tiles already loaded (4 independent accumulators), ``threads`` tasks."""
    import tvm
    from tvm.script import tirx as T

    from ctc.backends.tvm.amx_f32 import _amx
    from ctc.backends.tvm.int_kernels import _as_target, amx_config_lines, amx_permission

    if not amx_permission():
        raise SystemExit("this process may not use the AMX tile registers")
    tdp = [_amx("tdpbf16ps", f"T.uint8({2 * a + b})", f"T.uint8({4 + a})", f"T.uint8({6 + b})")
           for a in (0, 1) for b in (0, 1)]
    body = "\n".join("            " + line for line in tdp)
    src = f'''@T.prim_func(s_tir=True)
def peak(out: T.Buffer((T.int64({threads}), T.int64(16), T.int64(16)), "float32")):
    with T.sblock("root"):
        for t in T.parallel(T.int64({threads})):
'''
    src += "".join(line + "\n" for line in amx_config_lines("            "))
    src += "".join(f"            {_amx('tilezero', f'T.uint8({i})')}\n" for i in range(8))
    src += f"            for it in range(T.int64({iters})):\n" + body.replace("            ", "                ") + "\n"
    store = _amx("tilestored64", "T.uint8(0)", "T.address_of(out[t, T.int64(0), T.int64(0)])", "T.int64(64)")
    src += f"            {store}\n"
    src += f"            {_amx('tilerelease')}\n"
    f = tvm.script.from_source(src, extra_vars={"T": T})
    lib = tvm.compile(tvm.IRModule({"main": f}), target=_as_target(None))
    out = tvm.runtime.tensor(np.zeros((threads, 16, 16), np.float32), tvm.cpu())
    lib["main"](out)
    best = min(_timed(lambda: lib["main"](out)) for _ in range(5))
    return threads * iters * 4 * 16 * 16 * 32 * 2 / best


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def f32_roof(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    return 2 * 1024 ** 3 / min(_timed(lambda: torch.mm(a, b)) for _ in range(10))


def build(m: int, k: int, n: int, mode: str, threads: int, work: Path) -> Any:
    import torch

    from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled
    from ctc.ir import Module, TensorType

    g = torch.Generator().manual_seed(k * 7 + n)
    mod = Module(f"linear_{m}x{k}x{n}")
    x = mod.add_input("x", TensorType((1, m, k), "f32"))
    mod.add_param("w", torch.randn(n, k, generator=g) * k ** -0.5)
    mod.add_param("b", torch.randn(n, generator=g))
    mod.set_outputs([mod.create_node("linear", [x, mod.param("w"), mod.param("b")], {}).output])
    comp = compile_module(mod, options=BuildOptions(fp32_matmul=mode))
    if comp.meta["fp32_matmul"] != mode:
        raise SystemExit(f"asked for fp32_matmul={mode}, the build ran {comp.meta['fp32_matmul']}")
    d = work / f"{mod.name}_{mode}"
    comp.export(d)
    return load_compiled(d, threads=threads), mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="128,384", help="comma list of M (sequence lengths)")
    ap.add_argument("--runs", type=int, default=30, help="timed calls per kernel and round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(f"# f32 linears per shape, {args.threads} thread(s), {args.rounds} interleaved rounds x {args.runs} calls; "
          f"load average at start {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    peak_amx, roof_f32 = amx_peak(args.threads), f32_roof(args.threads)
    print(f"roofs ({args.threads} thread(s)): AMX-BF16 tdpbf16ps on registers {peak_amx / 1e9:.0f} GFLOP/s; "
          f"f32 GEMM torch.mm 1024^3 {roof_f32 / 1e9:.0f} GFLOP/s (AMX / f32 = {peak_amx / roof_f32:.1f}x)")
    print("| M x K x N | runtime | min ms | median ms | GFLOP/s (min) | % of f32 roof | raw bf16 % of AMX peak |"
          " max rel err vs f64 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for m in (int(v) for v in args.rows.split(",")):
            for k, n in SHAPES:
                libs = {mode: build(m, k, n, mode, args.threads, Path(tmp)) for mode in MODES}
                mod = libs["strict"][1]
                w, b = mod.params["w"], mod.params["b"]
                x = torch.randn(1, m, k, generator=torch.Generator().manual_seed(m))
                ref = (x.double() @ w.double().T + b.double())
                scale = (x.abs().double() @ w.abs().double().T + b.abs().double())
                calls = {mode: (lambda lib=lib, x=x: lib(x)) for mode, (lib, _) in libs.items()}
                calls["torch"] = lambda x=x, w=w, b=b: torch.nn.functional.linear(x, w, b)
                times: dict[str, list[float]] = {r: [] for r in calls}
                errs = {}
                for r, fn in calls.items():
                    out = fn()
                    y = out[0] if isinstance(out, (list, tuple)) else out
                    errs[r] = float(((y.double() - ref).abs() / scale).max())
                for rnd in range(args.rounds):
                    order = list(calls)[rnd % len(calls):] + list(calls)[:rnd % len(calls)]
                    for r in order:
                        fn = calls[r]
                        fn()
                        for _ in range(args.runs):
                            times[r].append(_timed(fn))
                flops = 2 * m * k * n
                for r in (*MODES, "torch"):
                    lo, med = min(times[r]), statistics.median(times[r])
                    raw = (f"{PRODUCTS[r] * flops / lo / peak_amx * 100:.0f}%" if r.startswith("bf16") else "-")
                    label = f"ctc {r}" if r in MODES else "torch F.linear (oneDNN)"
                    print(f"| {m} x {k} x {n} | {label} | {lo * 1e3:.3f} | {med * 1e3:.3f} | {flops / lo / 1e9:.0f} | "
                          f"{flops / lo / roof_f32 * 100:.0f}% | {raw} | {errs[r]:.1e} |", flush=True)


if __name__ == "__main__":
    main()
