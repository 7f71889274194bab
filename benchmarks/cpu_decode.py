"""Integer decode on the CPU: one SmolLM2-135M decode step through ctc's int8 / int4 kernels, against
ONNX Runtime fp32 and dynamic int8, in one process and one run.

Why: issue 15's yardsticks.  Every row decodes the same token on the same KV cache (``--past``
tokens of held-out wiki text, prefilled by the model) with ``--threads`` threads, and is timed
like benchmarks/cpu_latency.py (median and min of ``--runs`` calls after warm-up, interleaved in
``--rounds`` rounds, a settle pause between runtimes).  The logits of each row are compared with
PyTorch fp32 eager (cosine and max abs error).  Rows (``--rows``, comma list):

* ``ort``, ``ort-int8``: ONNX Runtime on the Hugging Face decode step (explicit past tensors in,
  grown caches out), fp32 and ``quantize_dynamic`` (QInt8 weights per tensor, u8 activations
  per tensor, every MatMul including the LM head);
* ``ctc``: ctc fp32 on the static decode step (preallocated caches written in place,
  ``ctc.frontends.decode.static_decode_step``), default schedules;
* ``ctc-w8a8``: ``quantize w_bits=8 a_bits=8 a_mode="dynamic" lm_head=true`` (int8 weights per
  output channel, activations quantized per token in the kernel: VNNI one-row GEMV);
  ``ctc-w8a8-body``: the same with the LM head left fp32;
* ``ctc-w4``: weight-only int4, asymmetric, groups of 32 (``quantize w_bits=4 a_bits=16
  w_granularity="group" group_size=32 sym=false lm_head=true``), packed in memory;
  ``ctc-w8``: weight-only int8 per output channel, LM head included;
* ``ctc-w4f``: int4 groups of 32 with float zero points (``w_zero="float"``: each group's own
  min..max, Q4_1's grid) for the blocks, then the LM head int8 per channel (a second
  ``quantize``): ctc's own quantization in the shape of the GGUF (Q4_1 body, Q8_0 head);
* ``--llama``: llama.cpp's ``llama-bench`` on the bundled Q4_1 GGUF and a Q8_0 re-quantization,
  ``--llama-gen`` tokens generated after ``--past`` cached ones (``-d``), ``--rounds`` repetitions
  (tokens/s of each repetition; its own timer, not interleaved with the rows above, no logits);
* ``ctc-gguf``: the bundled GGUF's own Q4_1 tensors as weight-only int4 (``gguf-weights``);
  ``ctc-gguf-a8``: the same codes with the activations quantized per token and block of 32 at run
  time (``gguf-weights a_bits=8``, llama.cpp's Q4_1 x Q8_1 form): VNNI integer dot products,
  the float block minima applied in the epilogue;
  ``ctc-w4f-a8``: ``ctc-w4f`` with the same per-block activations (``a_mode="block"``) for the
  body and the head;
* ``ctc-kv8`` / ``ctc-kv4``: fp32 weights with the int8 (int4, groups of 32) KV cache
  (``kv-cache-quant``); ``ctc-w8a8-kv8``: ``ctc-w8a8`` plus the int8 KV cache.

``--fair``: every row (eager, ORT and ctc) runs in a process of its own, started as
``cpu_decode.py --child SPEC`` and timed over pipes by benchmarks/fair_runner.py (the protocol of
issue 19: interleaved rounds whose order rotates, a settle pause before each batch, an idle check
on every other benchmark process, the load other users add).  This process only builds: it
exports each ctc library and its inputs under ``--work`` and loads none of them.  Why: two large
libraries loaded in one process do not stream their weights at the same speed (measured: ~10% on
the SmolLM2 step, in either order), which is as large as the int8 KV cache's whole saving at 2048
tokens, so a ratio between them from one process can flatter either row.  ``--reuse`` takes the
libraries a previous ``--fair`` run with the same ``--past``, pipeline and commit left in ``--work``
(for running both row orders without building twice).  The in-process mode stays the default.

Usage (the tables of benchmarks/results/cpu_int_decode.md)::

    python benchmarks/cpu_decode.py --past 128 --rows ort,ort-int8,ctc,ctc-w8a8,ctc-w8a8-body,ctc-w4,ctc-w8
    python benchmarks/cpu_decode.py --past 2047 --rows ctc,ctc-kv8 --fair
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import fair_runner as fair  # noqa: E402
from cpu_latency import _cosine, smollm2_decode_windows, spread_line, time_samples  # noqa: E402

PIPELINES: dict[str, tuple[str, list[tuple[str, dict[str, Any]]]]] = {
    "ctc": ("ctc fp32", []),
    "ctc-w8a8": ("ctc W8A8 per-token, head int8", [("quantize", {"w_bits": 8, "a_bits": 8, "a_mode": "dynamic",
                                                                  "lm_head": True})]),
    "ctc-w8a8-body": ("ctc W8A8 per-token, head fp32", [("quantize", {"w_bits": 8, "a_bits": 8,
                                                                      "a_mode": "dynamic"})]),
    "ctc-w4": ("ctc int4 weight-only g32", [("quantize", {"w_bits": 4, "a_bits": 16, "w_granularity": "group",
                                                          "group_size": 32, "sym": False, "lm_head": True})]),
    "ctc-w8": ("ctc int8 weight-only", [("quantize", {"w_bits": 8, "a_bits": 16, "lm_head": True})]),
    "ctc-w4f": ("ctc int4 g32 float-zero, head int8", [
        ("quantize", {"w_bits": 4, "a_bits": 16, "w_granularity": "group", "group_size": 32, "sym": False,
                      "w_zero": "float"}),
        ("quantize", {"w_bits": 8, "a_bits": 16, "lm_head": True})]),
    "ctc-gguf": ("ctc GGUF Q4_1 weights", [("gguf-weights", {})]),
    "ctc-gguf-a8": ("ctc GGUF Q4_1 weights x int8 act blocks of 32", [("gguf-weights", {"a_bits": 8})]),
    "ctc-w4f-a8": ("ctc int4 g32 float-zero x int8 act blocks, head int8", [
        ("quantize", {"w_bits": 4, "a_bits": 8, "a_mode": "block", "w_granularity": "group", "group_size": 32,
                      "sym": False, "w_zero": "float"}),
        ("quantize", {"w_bits": 8, "a_bits": 8, "a_mode": "block", "lm_head": True})]),
    "ctc-kv8": ("ctc fp32 + int8 KV", [("kv-cache-quant", {"bits": 8})]),
    "ctc-kv4": ("ctc fp32 + int4 KV g32", [("kv-cache-quant", {"bits": 4, "group_size": 32})]),
    "ctc-w8a8-kv8": ("ctc W8A8 per-token + int8 KV", [("quantize", {"w_bits": 8, "a_bits": 8, "a_mode": "dynamic",
                                                                    "lm_head": True}),
                                                      ("kv-cache-quant", {"bits": 8})]),
}


def static_inputs(model: torch.nn.Module, window: dict[str, torch.Tensor], max_len: int) -> dict[str, torch.Tensor]:
    """The static-step inputs decoding the same token on the same cache as the HF step's ``window``."""
    from ctc.frontends.decode import static_cache_names

    past = int(window["past_k_0"].shape[2])
    out = {"input_ids": window["input_ids"], "position": torch.tensor([past], dtype=torch.long)}
    for name, (i, t) in zip(static_cache_names(model.config),
                            [(i, t) for i in range(model.config.num_hidden_layers) for t in "kv"], strict=True):
        c = window[f"past_{t}_{i}"]
        buf = torch.zeros(*c.shape[:2], max_len, c.shape[3])
        buf[:, :, :past] = c
        out[name] = buf
    return out


def module_inputs(m: Any, static: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``m``'s inputs from the fp32 static-step inputs: a quantized cache (``kv-cache-quant``) gets the
    prefilled rows quantized as its write kernel would, and their scales."""
    from ctc.ir import quant as Q

    out: dict[str, torch.Tensor] = {}
    for v in m.inputs:
        if v.name in out:
            continue
        if v.type.dtype in ("i8", "u8"):
            f = static[v.name]
            groups = int(next(u for u in m.inputs if u.name == v.name + "_scale").type.shape[-1])
            bits = 8 if v.type.dtype == "i8" else 4
            q, s = Q.quantize_kv(f, bits, -1 if groups == 1 else f.shape[-1] // groups)
            past = int(static["position"][0])
            q[:, :, past:] = 0
            s[:, :, past:] = 0
            out[v.name], out[v.name + "_scale"] = q, s
        else:
            out[v.name] = static[v.name]
    return tuple(out[v.name] for v in m.inputs)


def ctc_module(model: torch.nn.Module, max_len: int, steps: list[tuple[str, dict[str, Any]]],
               gguf: str | None = None) -> Any:
    """The captured static decode step after ``steps`` (pass name, options); ``gguf``: the file the
    model was loaded from (where ``gguf-weights`` reads the quantized tensors)."""
    from ctc.frontends import capture
    from ctc.frontends.decode import static_decode_inputs, static_decode_step
    from ctc.passes.base import get_pass
    from ctc.passes.manager import PassManager

    m = capture(static_decode_step(model), static_decode_inputs(model, max_len, position=max_len - 1,
                                                                random_cache=False), dynamic=False)
    if gguf:
        m.meta["gguf"] = gguf
    if steps:
        pm = PassManager([get_pass(n)(o) for n, o in steps], progress=False, fidelity=False)
        m, _ = pm.run(m)
    return m


def _ort_options(threads: int) -> Any:
    """ONNX Runtime session options: ``threads`` intra-op threads, one inter-op."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return so


def child_runner(spec: dict[str, Any]) -> Callable[[], Any]:
    """``--fair``: one row's timed call, in a process of its own, from the files the parent wrote under
    ``--work`` (``spec["kind"]``: eager, ort or ctc; ``spec["names"]``: the arrays of ``spec["inputs"]``
    in call order); the call returns the logits."""
    threads = int(spec["threads"])
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    os.environ["TVM_NUM_THREADS"] = str(threads)
    z = np.load(spec["inputs"])
    if spec["kind"] == "eager":
        from ctc.frontends import load_bundled
        from ctc.frontends.decode import decode_step

        step = decode_step(load_bundled("smollm2").model.eval())
        tensors = [torch.from_numpy(z[k]) for k in spec["names"]]
        return lambda: step(*tensors)[0]
    if spec["kind"] == "ort":
        import onnxruntime as ort

        sess = ort.InferenceSession(spec["onnx"], _ort_options(threads), providers=["CPUExecutionProvider"])
        feed = {k: z[k] for k in spec["names"]}
        return lambda: sess.run(None, feed)[0]
    from ctc.backends.tvm.build import load_compiled

    lib = load_compiled(spec["lib"], threads=threads)
    prep = lib.prepare(*[z[k] for k in spec["names"]])

    def call() -> Any:
        out = lib.run_prepared(prep)
        return out if hasattr(out, "__dlpack__") else out[0]

    return call


def _stamp(args: argparse.Namespace, key: str) -> dict[str, Any]:
    """What a ``--fair`` library in ``--work`` was built from (``--reuse`` takes it only when this matches)."""
    return {"past": args.past, "pipeline": PIPELINES[key][1], "commit": fair.git_commit()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--past", type=int, default=128, help="KV-cache positions before the decoded token")
    ap.add_argument("--rows", default="ort,ort-int8,ctc,ctc-w8a8,ctc-w8a8-body,ctc-w4,ctc-w8")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fair", action="store_true", help="every row in a process of its own, timed by "
                    "benchmarks/fair_runner.py (see the docstring); default: every row in this process")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ctc_cpu_decode"), help="--fair: where the libraries, "
                    "their inputs, the children's logs and the raw timings go")
    ap.add_argument("--reuse", action="store_true", help="--fair: reuse the libraries that a run with the same "
                    "--past and commit left in --work (no build)")
    ap.add_argument("--settle", type=float, default=0.5, help="--fair: pause (s) before each timed batch")
    ap.add_argument("--llama", action="store_true", help="add llama.cpp rows (llama-bench on the bundled Q4_1 GGUF "
                    "and its Q8_0 re-quantization, decode after --past cached tokens; built by benchmarks/llamacpp.py)")
    ap.add_argument("--llama-gen", type=int, default=32, help="tokens llama-bench generates per repetition")
    ap.add_argument("--llama-cache", type=Path, default=None, help="where llama.cpp's source and builds live "
                    "(default: benchmarks/llamacpp.py's, .cache/llama.cpp in this checkout); point it at another "
                    "checkout's to reuse its build")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        spec = json.loads(args.child)
        return fair.serve(child_runner(spec), spec["warmup"])
    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows_wanted if r not in PIPELINES and r not in ("ort", "ort-int8")]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from ort, ort-int8, {', '.join(PIPELINES)}")
    if (args.reuse or args.work != ap.get_default("work")) and not args.fair:
        raise SystemExit("--work and --reuse go with --fair")
    torch.set_num_threads(args.threads)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import onnxruntime
    import tvm

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print("# ctc integer decode benchmark (SmolLM2-135M, one decode step)")
    print(f"machine: {cpu}, {os.cpu_count()} cpus ({len(os.sched_getaffinity(0))} usable), {platform.platform()}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}, tvm {tvm.__version__}")
    where = (f"every row in a process of its own (--fair, benchmarks/fair_runner.py: a {args.settle} s settle pause "
             "before each batch, rotating order, idle check on the other processes), ctc commit "
             f"{fair.git_commit()}" if args.fair else
             f"ctc/ORT/eager in this process with OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print(f"protocol: batch 1, one new token after {args.past} cached tokens of wiki evaluation text, {args.threads} "
          f"threads everywhere, median and min of >= {args.runs} calls after {args.warmup} warm-ups, "
          f"{args.rounds} interleaved rounds, {where} (llama.cpp's tools in their own, without it); cosine / max "
          "abs err of the logits vs PyTorch fp32 eager")
    torch.set_grad_enabled(False)
    from ctc.frontends.decode import decode_step

    model, windows = smollm2_decode_windows("evaluation", 1, past=args.past)
    step = decode_step(model)
    window = windows[0]
    ref = step(*window.values())[0]
    tmp = tempfile.TemporaryDirectory()
    base = Path(tmp.name)
    # in this process: the timed calls by label; --fair: each row's child spec by key (labels[key] its label)
    fns: dict[str, Callable[[], Any]] = {}
    specs: dict[str, dict[str, Any]] = {}
    labels = {"eager": "PyTorch eager"}

    def child(key: str, **spec: Any) -> None:
        specs[key] = {"runtime": key, "threads": args.threads, "warmup": args.warmup, **spec}

    if args.fair:
        base = args.work
        base.mkdir(parents=True, exist_ok=True)
        np.savez(base / "window.npz", **{k: v.numpy() for k, v in window.items()})
        child("eager", kind="eager", inputs=str(base / "window.npz"), names=list(window))
    else:
        fns["PyTorch eager"] = lambda: step(*window.values())
    rows: list[dict[str, Any]] = [{"runtime": "PyTorch eager", "key": "eager", "cos": 1.0, "err": 0.0,
                                   "build_s": None}]
    if {"ort", "ort-int8"} & set(rows_wanted):
        import onnxruntime as ort

        path = str(base / "step.onnx")
        t0 = time.perf_counter()
        onames = ["logits"] + [f"present_{t}_{i}" for i in range(step.n_layers) for t in "kv"]
        torch.onnx.export(step, tuple(window.values()), path, input_names=list(window), output_names=onames,
                          opset_version=17, dynamo=False)
        feed = {k: v.numpy() for k, v in window.items()}
        models = []
        if "ort" in rows_wanted:
            models.append(("ort", "ONNX Runtime fp32", path))
        if "ort-int8" in rows_wanted:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            qpath = str(base / "step_int8.onnx")
            quantize_dynamic(path, qpath, weight_type=QuantType.QInt8)
            models.append(("ort-int8", "ONNX Runtime int8 (dynamic)", qpath))
        for key, label, p in models:
            labels[key] = label
            row = {"runtime": label, "key": key, "build_s": time.perf_counter() - t0}
            if args.fair:
                child(key, kind="ort", onnx=p, inputs=str(base / "window.npz"), names=list(window))
            else:
                sess = ort.InferenceSession(p, _ort_options(args.threads), providers=["CPUExecutionProvider"])
                out = sess.run(None, feed)[0]
                fns[label] = lambda sess=sess: sess.run(None, feed)
                row.update(cos=_cosine(out, ref), err=float(np.abs(out - ref.numpy()).max()))
            rows.append(row)
    from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled
    from ctc.bundled import bundled_gguf_file
    from ctc.passes.base import get_pass

    max_len = args.past + 1
    sin = static_inputs(model, window, max_len)
    for key in rows_wanted:
        if key not in PIPELINES:
            continue
        label, steps = PIPELINES[key]
        labels[key] = label
        try:
            for n, _ in steps:
                get_pass(n)
        except Exception as e:  # noqa: BLE001 - a pass this checkout lacks
            print(f"(skipping {key}: {e})")
            continue
        t0 = time.perf_counter()
        d = base / key
        stamp, want = d / "built.json", json.loads(json.dumps(_stamp(args, key)))
        built = json.loads(stamp.read_text()) if args.reuse and stamp.exists() else {}
        if built and {k: built.get(k) for k in want} == want:
            rows.append({"runtime": label, "key": key, "weight_mb": built.get("weight_mb")})
            child(key, kind="ctc", lib=str(d), inputs=str(d / "inputs.npz"), names=built["names"])
            print(f"  reused {label} from {d}", flush=True)
            continue
        m = ctc_module(model, max_len, steps, str(bundled_gguf_file("smollm2")))
        comp = compile_module(m, options=BuildOptions(static_dims={}))
        comp.export(d)
        mins = module_inputs(m, sin)
        wbytes = m.param_bytes()
        row = {"runtime": label, "key": key, "build_s": time.perf_counter() - t0,
               "int_kernels": comp.meta.get("int_kernels"), "weight_mb": wbytes / 1e6 if wbytes else None}
        if args.fair:  # the child loads it; this process holds no library
            names = [f"a{i}" for i in range(len(mins))]
            np.savez(d / "inputs.npz", **{n: x.numpy() for n, x in zip(names, mins, strict=True)})
            stamp.write_text(json.dumps({**_stamp(args, key), "names": names, "weight_mb": row["weight_mb"]}))
            child(key, kind="ctc", lib=str(d), inputs=str(d / "inputs.npz"), names=names)
        else:
            lib = load_compiled(d, threads=args.threads)
            out = lib(*mins)[0]
            prep = lib.prepare(*mins)
            fns[label] = lambda lib=lib, prep=prep: lib.run_prepared(prep)
            row.update(cos=_cosine(out, ref), err=float((out - ref).abs().max()))
        rows.append(row)
        print(f"  built {label}: {time.perf_counter() - t0:.1f} s, int kernels {comp.meta.get('int_kernels')}, "
              f"weights {wbytes / 1e6 if wbytes else float('nan'):.1f} MB", flush=True)
    checks: list[str] = []
    if args.fair:
        t = fair.time_runtimes(__file__, specs, runs=args.runs, rounds=args.rounds, settle=args.settle, work=base,
                               tag=f"past{args.past}")
        samples = {labels[k]: [1e3 * s for s in v] for k, v in t.times.items()}
        for r in rows:
            out = t.outputs[r["key"]]
            r.update(cos=_cosine(out, ref), err=float(np.abs(out - ref.numpy()).max()))
        checks = fair.check_lines(t.check())
    else:
        samples = time_samples(fns, args.runs, args.warmup, args.rounds)
    times = {k: (float(np.median(v)), min(v)) for k, v in samples.items()}
    llama_reps: dict[str, list[float]] = {}
    if args.llama:  # its own process and timer: tokens/s over --llama-gen tokens, per repetition
        import llamacpp

        cache = args.llama_cache or llamacpp.DEFAULT_CACHE
        bin_dir = llamacpp.ensure_built(cache)
        gguf = Path(str(bundled_gguf_file("smollm2")))
        q8 = llamacpp.quantize(bin_dir, gguf, cache / "smollm2-q8_0.gguf", "Q8_0", args.threads)
        for label, path in (("llama.cpp Q4_1", gguf), ("llama.cpp Q8_0", q8)):
            time.sleep(0.5)
            # idle check: this process (ctc's, ORT's and torch's pools) must not spin while llama.cpp is timed
            cpu0, wall0 = time.process_time(), time.perf_counter()
            b = llamacpp.bench(bin_dir, path, args.threads, args.past, args.llama_gen, 0, args.rounds)["decode"]
            idle = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
            print(f"  idle check while {label} ran: this process used {idle:.2%} of a core "
                  f"({'passed' if idle <= 0.01 else 'FAILED: a pool here kept spinning; the row is not fair'})",
                  flush=True)
            times[label] = (1e3 / b["median"], 1e3 / b["max"])
            llama_reps[label] = [1e3 / t for t in b["samples"]]
            rows.append({"runtime": label, "cos": float("nan"), "err": float("nan"),
                         "weight_mb": path.stat().st_size / 1e6})
            print(f"  {label}: decode {b['median']:.1f} tok/s median of {args.rounds} (min {b['min']:.1f}, "
                  f"max {b['max']:.1f})", flush=True)
    ort_int8 = times.get("ONNX Runtime int8 (dynamic)", (None,))[0]
    print(f"\n(load average after: {os.getloadavg()[0]:.2f})\n")
    for line in checks:
        print(line)
    print("per-call ms, min / p10 / median / p90 / max (llama.cpp: per repetition of --llama-gen tokens):")
    for k, v in samples.items():
        print(f"  {k}: {spread_line(v)}")
    for k, v in llama_reps.items():
        print(f"  {k}: {spread_line(v)}")
    print()
    print("| runtime | median ms | min ms | tok/s (median) | x ORT int8 (median) | logits cosine | max abs err "
          "| params MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        med, mn = times[r["runtime"]]
        ratio = f"{med / ort_int8:.2f}" if ort_int8 else "-"
        wmb = f"{r['weight_mb']:.1f}" if r.get("weight_mb") else "-"
        print(f"| {r['runtime']} | {med:.2f} | {mn:.2f} | {1e3 / med:.1f} | {ratio} | {r['cos']:.6f} "
              f"| {r['err']:.3g} | {wmb} |")
    # a quantized KV cache against the same weights' fp32 cache, from this run's samples
    kv_pairs = (("ctc-kv8", "ctc"), ("ctc-kv4", "ctc"), ("ctc-w8a8-kv8", "ctc-w8a8"))
    if args.fair:  # with the ratio of CPU time per call (each row's process, all its threads): the least load-bound
        for line in fair.ratio_lines({k: fair.stats_row(t, k) for k in t.times}, kv_pairs, labels):
            print(line)
    for q_key, f_key in kv_pairs:
        q_lab, f_lab = (PIPELINES[k][0] for k in (q_key, f_key))
        if q_lab in times and f_lab in times:
            (qm, qn), (fm, fn) = times[q_lab], times[f_lab]
            print(f"\n{q_lab} / {f_lab}: {qm / fm:.3f}x by median, {qn / fn:.3f}x by min "
                  f"({'faster' if qm < fm else 'NOT faster'} by median)")


if __name__ == "__main__":
    main()
