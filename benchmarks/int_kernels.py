"""Integer quant_linear kernels vs fp32 matmuls on all-MiniLM-L6-v2's linear shapes.

Why: the RPTQ issue needs int8/int4 linears that are really faster than fp32.  For each
shape ``y[M, N] = x[M, K] W^T`` (M = 128 tokens; K, N in {384, 1536}) this times, median of
``--runs`` calls after warm-up, on the same machine in one run:

* ctc int kernels (``ctc.backends.tvm.int_kernels``): fp32 x -> per-cluster u8 quantization
  -> u8 x s8 VNNI int32 accumulation -> fp32 y, for W8A8 with 1 cluster, W8A8 with 4 uneven
  RPTQ clusters, and W4A8 (packed int4, unpacked in registers) with 4 clusters, and the two
  W8A8 cases on AMX tiles where the CPU has them; the ``qmm`` part alone is shown too;
* fp32 TVM matmul (weights pre-transposed to ``[K, N]``): unscheduled (what a plain
  ``relax.build`` gives), the backend's default schedule (``ctc.backends.tvm.schedules``, when
  present), and meta-schedule tuned with ``--trials`` trials (0 skips tuning; records are kept
  in ``--work-dir`` and reused; cost model xgb when xgboost is installed, else random);
* torch fp32 ``x @ W.T`` and ``torch._int_mm`` (s8 x s8 -> s32 only: no quantization, no
  scaling, so a lower bound for an int8 GEMM).

Run: ``python benchmarks/int_kernels.py [--trials 64] [--runs 50]``.  Threads: both TVM and
torch use ``--threads`` (default: all cores in the affinity mask).
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

SHAPES = [(384, 384), (384, 1536), (1536, 384)]  # (K, N): qkv/out-proj, FFN up, FFN down


def _fast_stack(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack`` without reading source files (TVMScript only needs the frames).

    Importing ``tvm.s_tir.tensor_intrin`` (meta-schedule does, for x86) parses ~500 PrimFuncs,
    each calling ``inspect.stack()``: ~39 s, past the builder's timeout.  This makes it ~3 s.
    """
    frame = sys._getframe(1)
    out = []
    while frame is not None:
        out.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name, None, None))
        frame = frame.f_back
    return out


def install_fast_stack() -> None:
    """Install :func:`_fast_stack` in this process (also the meta-schedule builder initializer)."""
    inspect.stack = _fast_stack  # type: ignore[assignment]


def timed(fn: Callable[[], object], runs: int, warmup: int = 5) -> list[float]:
    """Wall times of ``runs`` calls of ``fn()`` in milliseconds, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return ts


def fp32_matmul_mod(m: int, k: int, n: int, transposed_weight: bool = True):
    """``y = x @ wT`` as a TE PrimFunc, with the weight pre-transposed to ``[K, N]`` as the
    backend lowers a float linear (the default CPU matmul rule needs this form), or
    ``y = x @ w.T`` with ``w [N, K]`` (``transposed_weight=False``; meta-schedule in this TVM
    build samples no valid candidate for the ``[K, N]`` form: every one fails its
    RewriteParallelVectorizeUnroll postprocessor)."""
    import tvm
    from tvm import te

    x = te.placeholder((m, k), "float32", name="x")
    r = te.reduce_axis((0, k), name="r")
    if transposed_weight:
        w = te.placeholder((k, n), "float32", name="wT")
        y = te.compute((m, n), lambda i, j: te.sum(x[i, r] * w[r, j], axis=r), name="y")
    else:
        w = te.placeholder((n, k), "float32", name="w")
        y = te.compute((m, n), lambda i, j: te.sum(x[i, r] * w[j, r], axis=r), name="y")
    return tvm.IRModule({"main": te.create_prim_func([x, w, y]).with_attr("global_symbol", "main")})


def default_schedule(mod, target):
    """The backend's untuned default schedule (ctc.backends.tvm.schedules), or None if absent."""
    try:
        from tvm.s_tir import dlight as dl

        from ctc.backends.tvm.schedules import default_rules
    except ImportError:
        return None
    with target:
        return dl.ApplyDefaultSchedule(*default_rules())(mod)


def tune_fp32(mod, target, trials: int, work_dir: Path, threads: int):
    """Meta-schedule the fp32 matmul within ``trials`` trials; returns (scheduled mod, seconds)."""
    from tvm.s_tir import meta_schedule as ms

    t0 = time.time()
    rec = work_dir / "database_tuning_record.json"
    if rec.exists() and sum(1 for _ in rec.open()) >= trials:  # tuned before with this budget: reuse
        db = ms.database.JSONDatabase(str(work_dir / "database_workload.json"), str(rec))
        sch = ms.tir_integration.compile_tir(db, mod, target)
        return (sch.mod if sch is not None else None), 0.0
    try:  # meta-schedule's default cost model needs xgboost, which ctc does not depend on
        import xgboost  # noqa: F401

        cost_model = "xgb"
    except ImportError:
        cost_model = "random"
    builder = ms.builder.LocalBuilder(max_workers=threads, timeout_sec=120.0, initializer=install_fast_stack)
    runner = ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1,
                                                                                min_repeat_ms=20))
    db = ms.tune_tir(mod, target, str(work_dir), max_trials_global=trials, num_trials_per_iter=min(16, trials),
                     builder=builder, runner=runner, num_tuning_cores=threads, cost_model=cost_model)
    sch = ms.tir_integration.compile_tir(db, mod, target)
    return (sch.mod if sch is not None else None), time.time() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=64, help="meta-schedule trials per fp32 shape (0 = no tuning)")
    ap.add_argument("--runs", type=int, default=30, help="timed calls per round and implementation (>= 20)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all implementations")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--m", type=int, default=128, help="rows (tokens)")
    ap.add_argument("--work-dir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "ctc" / "bench_int_kernels")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,KxN,...")
    args = ap.parse_args(argv)
    if args.runs < 20:
        ap.error("--runs must be >= 20")
    # TVM's pool defaults to half the logical CPUs on x86 (1 here); set it before tvm loads.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    # Sleeping (not spinning) OpenMP workers: torch and TVM share the cores in one process, and
    # spinning threads on a busy 2-core machine make every barrier wait for a time slice.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    install_fast_stack()

    import numpy as np
    import torch
    import tvm

    from ctc.backends.tvm import int_kernels as ik

    torch.set_num_threads(args.threads)
    target = ik.host_target()
    cpu_name = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {platform.node()} {cpu_name}, {len(os.sched_getaffinity(0))} CPUs in affinity, "
          f"threads={args.threads}, llvm mcpu={target.attrs['mcpu']}, vnni={ik.target_has_vnni(target)}, "
          f"amx={ik.target_has_amx(target)}")
    print(f"versions: python {platform.python_version()}, tvm {tvm.__version__}, torch {torch.__version__}, "
          f"numpy {np.__version__}")
    print(f"load average before the run: {os.getloadavg()[0]:.2f} (other users of these cores skew timings), "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print(f"M={args.m}, {args.rounds} rounds x {args.runs} runs, tuning trials per fp32 shape={args.trials}\n")

    rows = []
    for kn in args.shapes.split(","):
        k, n = (int(v) for v in kn.split("x"))
        rows.append(((args.m, k, n), bench_shape(args, target, args.m, k, n)))

    for (m, k, n), res in rows:
        base = res["torch fp32"][0]
        gop = 2 * m * k * n / 1e9
        print(f"M={m} K={k} N={n}  ({gop * 1e3:.0f} MOP)")
        print(f"  {'implementation':<54} {'median ms':>9} {'best-round':>10} {'GOP/s':>7} {'vs torch fp32':>13}")
        for name, (med, best) in res.items():
            print(f"  {name:<54} {med:9.3f} {best:10.3f} {gop / med * 1e3:7.0f} {base / med:12.2f}x")
        print()
    print("median ms: median of all timed calls; best-round: the lowest of the per-round medians "
          f"({args.rounds} interleaved rounds of {args.runs} calls); ratios use the median.")


def bench_shape(args: argparse.Namespace, target, m: int, k: int, n: int) -> dict[str, tuple[float, float]]:
    """Build every implementation for one shape, then time them in interleaved rounds."""
    import numpy as np
    import torch
    import tvm

    from ctc.backends.tvm import int_kernels as ik
    from ctc.ir import quant as Q

    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    xf = rng.standard_normal((m, k)).astype(np.float32)
    wf = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)

    def t(a: np.ndarray):
        return tvm.runtime.tensor(np.ascontiguousarray(a), dev)

    fns: dict[str, Callable[[], object]] = {}

    # ---- ctc integer kernels: fp32 x -> u8 codes per cluster -> VNNI int32 -> fp32 y
    bounds4 = (k // 8, k // 2, k // 2 + k // 16 + 3, k)  # 4 uneven clusters
    cases = [("W8A8 c=1", 8, ()), ("W8A8 c=4", 8, bounds4), ("W4A8 c=4", 4, bounds4)]
    if ik.target_has_amx(target):  # the same W8A8 products on AMX tiles (what a prefill build uses here)
        cases += [("W8A8 c=1 AMX", 8, ()), ("W8A8 c=4 AMX", 8, bounds4)]
    for label, w_bits, clusters in cases:
        qw = Q.quantize_weight(torch.from_numpy(wf), w_bits)
        bb = list(clusters) or [k]
        lo = torch.tensor([xf[:, a:b].min() for a, b in zip([0, *bb[:-1]], bb, strict=True)])
        hi = torch.tensor([xf[:, a:b].max() for a, b in zip([0, *bb[:-1]], bb, strict=True)])
        s, z = Q.act_qparams(lo, hi, 8)
        spec = ik.QLinearSpec.from_attrs(dict(w_bits=w_bits, a_bits=8, act_clusters=clusters), k, n)
        if label.endswith("AMX"):
            spec = ik.with_amx(spec, target)
        kern = ik.plan_quant_linear(spec, target)
        fa, fm = ik.build_kernel(kern, target)
        p = ik.prepack_weights(spec, qw.qweight, qw.scale, qw.zero, None, s, z)
        xq, y = t(np.zeros((ik.amx_rows(m) if spec.amx else m, spec.kp), np.uint8)), t(np.zeros((m, n), np.float32))
        aargs = [t(xf), t(p["act_scale"]), t(p["act_zero"]), xq]
        margs = [xq, t(p["wpack"]), t(p["alpha"]), t(p["corr"]), t(p["bias"]), y]
        fa_main, fm_main = fa["main"], fm["main"]

        def both(fa_main=fa_main, fm_main=fm_main, aargs=aargs, margs=margs) -> None:
            fa_main(*aargs)
            fm_main(*margs)

        fns[f"ctc {label}{'' if spec.amx else ' (VNNI)' if kern.vnni else ' (int, no VNNI)'}"] = both
        fns[f"ctc {label} qmm only"] = lambda fm_main=fm_main, margs=margs: fm_main(*margs)

    # ---- fp32 TVM
    mod = fp32_matmul_mod(m, k, n)
    fargs = (t(xf), t(wf.T), t(np.zeros((m, n), np.float32)))
    slow: set[str] = set()
    if m * k * n <= 128 * 384 * 1536:
        raw = tvm.compile(mod, target=target)["main"]
        fns["tvm fp32 unscheduled"] = lambda: raw(*fargs)
        slow.add("tvm fp32 unscheduled")
    dmod = default_schedule(mod, target)
    if dmod is not None:
        dfn = tvm.compile(dmod, target=target)["main"]
        fns["tvm fp32 default schedule (ctc schedules.py)"] = lambda: dfn(*fargs)
    if args.trials > 0:
        nt_mod = fp32_matmul_mod(m, k, n, transposed_weight=False)
        tmod, tsec = tune_fp32(nt_mod, target, args.trials, args.work_dir / f"fp32_{m}x{k}x{n}", args.threads)
        if tmod is not None:
            tfn = tvm.compile(tmod, target=target)["main"]
            nt_args = (fargs[0], t(wf), fargs[2])
            how = f"{tsec:.0f} s" if tsec else "records reused"
            fns[f"tvm fp32 tuned, w [N,K] ({args.trials} trials, {how})"] = lambda: tfn(*nt_args)
        else:
            print(f"note: meta-schedule found no valid schedule for {m}x{k}x{n} in {args.trials} trials")

    # ---- torch
    tx, tw = torch.from_numpy(xf), torch.from_numpy(wf)
    fns["torch fp32"] = lambda: tx @ tw.T
    ix = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    iw = torch.randint(-128, 128, (k, n), dtype=torch.int8)
    fns["torch._int_mm s8 (no quant, no scaling)"] = lambda: torch._int_mm(ix, iw)

    times: dict[str, list[list[float]]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            runs = max(20, args.runs // 5) if name in slow else args.runs
            times[name].append(timed(fn, runs, warmup=1 if name in slow else 5))
    return {name: (float(np.median(sum(ts, []))), float(min(np.median(r) for r in ts))) for name, ts in times.items()}


if __name__ == "__main__":
    main()
