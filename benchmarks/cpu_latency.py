"""CPU latency of one model and input on PyTorch eager, torch.compile, ONNX Runtime and ctc (TVM).

For all-MiniLM-L6-v2 against ONNX Runtime, the fair protocol is benchmarks/cpu_encoder_fair.py
(each runtime in its own process, idle thread pools checked, every input the tokenizer gives):
this script runs every runtime in one process, where a runtime's spinning pool can slow the next.

Why: issue 4's yardstick.  In one process and one run, the same model and the same input go
through every runtime; each is timed as the median of ``--runs`` (>= 20) calls after
``--warmup`` calls, with ``--threads`` intra-op threads everywhere.  Timed calls are interleaved
across runtimes in ``--rounds`` rounds, so load from other users of a shared machine falls on
every runtime alike.  The table gives the ratio
to ONNX Runtime, plus compile and tuning wall time.  ctc is measured with its default
(untuned) schedules and, with ``--trials N``, tuned within N meta-schedule trials (the tuning
database is reused across runs: a second run spends no tuning time; delete it or pass
``--tuning-dir`` to measure tuning itself).

Models: ``minilm128``/``minilm384`` (all-MiniLM-L6-v2, real weights, batch 1, seq 128/384,
``last_hidden_state``) and ``gpt2`` (a GPT-2-small-shaped decoder: 12 layers, d=768, 12 heads,
random weights, prefill of 128 tokens, hidden states without the LM head) and ``gpt2-decode``
(the same shape with the LM head, one decode step: 1 new token on a KV cache of 128 past
positions passed as 24 explicit [1, 12, 128, 64] tensors; outputs logits and the 24 grown k/v
tensors; max abs err is over all outputs, cosine over the logits) and ``smollm2-decode`` (the
bundled SmolLM2-135M, real weights, one decode step on a random KV cache of 128 positions).

Usage::

    python benchmarks/cpu_latency.py --models minilm128 --trials 0
    python benchmarks/cpu_latency.py --models minilm128,minilm384,gpt2 --trials 192
    python benchmarks/cpu_latency.py --models minilm128 --runtimes eager,ort,ort-int8,ctc,ctc-int8 --threads 2

Runtimes (``--runtimes``): eager (always), compile, ort, ort-int8 (ONNX Runtime's dynamic int8
quantization, QInt8 weights), ctc (default schedules), ctc-int8 (MiniLM or the SmolLM2 decode step after the rptq W8A8
pipeline of examples/minilm_w8a8.ctc, built with the TVM integer kernels), ctc-dyn (default
schedules, built for any sequence length as ``ctc compile`` does, instead of the benchmark's length).

The machine is shared: the load average before and after each model is printed; numbers
taken under load are slower for every runtime, ratios less so.
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


SETTLE_S = 0.5


def shown_command(argv: list[str]) -> str:
    """A benchmark's arguments as a report shows them: those that decide the numbers, not where output goes."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x in ("--json", "--out", "--render"):
            skip = True
        elif not x.startswith(("--json=", "--out=", "--render=")):
            out.append(x)
    return " ".join(out)


def timeit(fns: dict[str, Callable[[], Any]], runs: int, warmup: int, rounds: int) -> dict[str, tuple[float, float]]:
    """(median, min) wall ms of each callable, from :func:`time_samples`."""
    return {k: (statistics.median(v), min(v)) for k, v in time_samples(fns, runs, warmup, rounds).items()}


def time_samples(fns: dict[str, Callable[[], Any]], runs: int, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Every timed call's wall ms, per callable: ``warmup`` calls each, then ``rounds`` rounds that
    run every callable ``ceil(runs / rounds)`` times in turn, so a load spike from other users of
    the machine hits every runtime alike.  At least ``runs`` timed calls per callable.

    Between runtimes the process sleeps ``SETTLE_S``: the previous runtime's worker threads spin
    for a while after its last call (OpenMP, ONNX Runtime, TVM all do), and on a 2-core machine a
    spinning thread takes a core from the runtime timed next (measured: ctc's decode step ran
    1.15x ORT right after ORT's spinning pool, 0.96x with ORT and ctc alone)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per = -(-runs // rounds)
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            time.sleep(SETTLE_S)  # let the previous runtime's spinning threads go to sleep
            fn()  # one untimed call after switching runtimes (caches, thread pools)
            for _ in range(per):
                t0 = time.perf_counter()
                fn()
                ts[k].append((time.perf_counter() - t0) * 1e3)
    return ts


def spread_line(ms: list[float]) -> str:
    """``min / p10 / median / p90 / max`` of per-call times (ms), for a distribution's shape at a glance."""
    s = sorted(ms)

    def q(p: float) -> float:
        return s[min(len(s) - 1, int(p * len(s)))]

    return (f"{s[0]:.2f} / {q(0.1):.2f} / {statistics.median(s):.2f} / {q(0.9):.2f} / {s[-1]:.2f} "
            f"(mean {statistics.mean(s):.2f}, {len(s)} calls)")


def load_model(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], str, str]:
    """(model, inputs, output key, description)."""
    if name.startswith("minilm"):
        from ctc.frontends import load_bundled

        seq = int(name[len("minilm"):] or 128)
        hf = load_bundled("minilm")
        model, tok = hf.model, hf.tokenizer
        text = ("The quick brown fox jumps over the lazy dog while the committee discusses the budget "
                "for next year's research programme in compilers and machine learning. ") * 40
        enc = tok(text, return_tensors="pt", truncation=True, max_length=seq, padding="max_length")
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        return model.eval(), inputs, "last_hidden_state", f"all-MiniLM-L6-v2, batch 1, seq {seq}"
    if name == "gpt2":
        from transformers import GPT2Config, GPT2Model

        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
        model = GPT2Model(cfg).eval()
        ids = torch.randint(0, 50257, (1, 128))
        inputs = {"input_ids": ids, "attention_mask": torch.ones(1, 128, dtype=torch.long)}
        return model, inputs, "last_hidden_state", "GPT-2-small-shaped decoder (random weights), prefill seq 128"
    if name == "gpt2-decode":
        from transformers import GPT2Config, GPT2LMHeadModel

        from ctc.frontends.decode import decode_inputs, decode_step

        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
        step = decode_step(GPT2LMHeadModel(cfg).eval())
        return step, decode_inputs(cfg, past=128), "", ("GPT-2-small-shaped decoder with LM head (random weights), "
                                                        "one decode step: 1 new token, KV cache of 128 positions")
    if name == "smollm2-decode":
        from ctc.frontends.decode import decode_step

        model, windows = smollm2_decode_windows("evaluation", 1)
        return decode_step(model), windows[0], "", (
            "SmolLM2-135M (real weights, 30 layers, GQA 9/3 heads), one decode step: 1 new token on the "
            "KV cache of 128 prefilled tokens of wiki evaluation text")
    raise SystemExit(f"unknown model {name!r} (minilm128, minilm384, gpt2, gpt2-decode, smollm2-decode)")


def smollm2_decode_windows(split: str, n: int, past: int = 128) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """The bundled SmolLM2 and ``n`` real decode-step inputs: windows of ``past + 1`` tokens of the
    wiki ``split`` text, the first ``past`` prefilled into the KV cache (ctc.frontends.decode)."""
    from ctc.eval.data import wiki_text
    from ctc.frontends import load_bundled
    from ctc.frontends.decode import prefilled_inputs

    hf = load_bundled("smollm2")
    model, tok = hf.model, hf.tokenizer
    model.eval()
    ids = tok(wiki_text(split)[: max(8000, 8 * (past + 1)) * n], return_tensors="pt")["input_ids"]
    if ids.shape[1] < n * (past + 1):
        raise SystemExit(f"not enough {split} text for {n} windows of {past + 1} tokens")
    return model, [prefilled_inputs(model, ids[:, i * (past + 1):(i + 1) * (past + 1)], past) for i in range(n)]


class Wrapped(torch.nn.Module):
    """Positional-input wrapper returning one tensor (for ONNX export and torch.compile)."""

    def __init__(self, model: torch.nn.Module, key: str):
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        extra = {"use_cache": False} if "GPT2" in type(self.model).__name__ else {}
        return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask, **extra), self.key)


def _outs(o: Any) -> list[np.ndarray]:
    """A runtime's outputs as a list of arrays (one tensor, or a tuple/list of them)."""
    items = o if isinstance(o, (list, tuple)) else [o]
    return [x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in items]


def _agree(out: Any, ref: Any) -> tuple[float, float]:
    """(max abs error over every output, cosine of the first output) against PyTorch eager."""
    a, b = _outs(out), _outs(ref)
    if len(a) != len(b):
        raise SystemExit(f"runtime returned {len(a)} outputs, eager {len(b)}")
    err = max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))
    return err, _cosine(a[0], torch.as_tensor(b[0]))


def _cosine(a: Any, b: torch.Tensor) -> float:
    """Cosine similarity of two outputs, flattened (agreement with PyTorch fp32 eager)."""
    x = torch.as_tensor(np.asarray(a), dtype=torch.float64).flatten()
    y = b.detach().to(torch.float64).flatten()
    return float(torch.dot(x, y) / (x.norm() * y.norm()))


def rptq_w8a8_module(name: str) -> Any:
    """The model after examples/minilm_w8a8.ctc's pipeline (rptq W8A8, 4 clusters), run by the compile
    driver's own functions: MiniLM with the recipe's calibration data, or SmolLM2's decode step
    calibrated on real decode steps."""
    from ctc import driver

    recipe = driver.load_checked_recipe(ROOT / "examples" / "minilm_w8a8.ctc")
    quiet = driver.Progress(False)
    if name == "smollm2-decode":  # the same pipeline, calibrated on 32 real decode steps of wiki calibration text
        from ctc.frontends import capture
        from ctc.frontends.decode import decode_step

        model, calib = smollm2_decode_windows("calibration", 32)
        module, _ = driver.run_pipeline(capture(decode_step(model), calib[0], dynamic=False), recipe, calib, 0, quiet)
        return module
    if not name.startswith("minilm"):
        raise SystemExit(f"ctc-int8: only minilm* and smollm2-decode have an int8 pipeline here (got {name!r})")
    loaded = driver.load_model(recipe, quiet)
    assert recipe.calibrate is not None
    calib, _ = driver.dataset_batches(recipe, recipe.calibrate, loaded)
    seed = int(recipe.calibrate.options.get("seed", 0))
    module, _ = driver.run_pipeline(loaded.module, recipe, calib, seed, quiet)
    return module


def bench_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    model, inputs, key, desc = load_model(name)
    from ctc.frontends.decode import DecodeStep

    decode = isinstance(model, DecodeStep)  # takes and returns plain tensors already
    wrapped = model if decode else Wrapped(model, key).eval()
    ins = tuple(inputs.values())
    rows: list[dict[str, Any]] = []
    fns: dict[str, Callable[[], Any]] = {}
    keep: list[Any] = []
    print(f"\n## {name}: {desc}   (load average before: {os.getloadavg()[0]:.2f})", flush=True)
    torch.set_grad_enabled(False)
    ref = wrapped(*ins)
    fns["PyTorch eager"] = lambda: wrapped(*ins)
    rows.append({"runtime": "PyTorch eager", "err": 0.0, "cos": 1.0})
    if "compile" in args.runtimes:
        t0 = time.perf_counter()
        cm = torch.compile(wrapped)
        out = cm(*ins)
        fns["torch.compile"] = lambda: cm(*ins)
        err, cos = _agree(out, ref)
        rows.append({"runtime": "torch.compile", "compile_s": time.perf_counter() - t0, "err": err, "cos": cos})
    runtimes = {r.strip() for r in args.runtimes.split(",")}
    tmp = tempfile.TemporaryDirectory()
    keep.append(tmp)
    if {"ort", "ort-int8"} & runtimes:
        import onnxruntime as ort

        path = str(Path(tmp.name) / "model.onnx")
        t0 = time.perf_counter()
        onames = ["logits"] + [f"present_{t}_{i}" for i in range(wrapped.n_layers) for t in "kv"] if decode else ["out"]
        torch.onnx.export(wrapped, ins, path, input_names=list(inputs), output_names=onames,
                          opset_version=17, dynamo=False)
        export_s = time.perf_counter() - t0
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        feed = {k: v.numpy() for k, v in inputs.items()}
        ort_models = [("ONNX Runtime", path)] if "ort" in runtimes else []
        if "ort-int8" in runtimes:
            # ORT's standard int8 path: dynamic quantization, int8 weights (per tensor), uint8 activations
            from onnxruntime.quantization import QuantType, quantize_dynamic

            t1 = time.perf_counter()
            qpath = str(Path(tmp.name) / "model_int8.onnx")
            quantize_dynamic(path, qpath, weight_type=QuantType.QInt8)
            export_s += time.perf_counter() - t1
            ort_models.append(("ONNX Runtime int8", qpath))
        for label, mpath in ort_models:
            t0 = time.perf_counter()
            sess = ort.InferenceSession(mpath, so, providers=["CPUExecutionProvider"])
            out = sess.run(None, feed)
            fns[label] = lambda sess=sess: sess.run(None, feed)
            err, cos = _agree(out, ref)
            rows.append({"runtime": label, "compile_s": export_s + time.perf_counter() - t0, "err": err, "cos": cos})
    from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled
    from ctc.frontends import capture

    t0 = time.perf_counter()
    extra = {"use_cache": False} if name == "gpt2" else {}
    m = capture(model, inputs, dynamic=False) if decode else capture(model, {**inputs, **extra}, output=key)
    cap_s = time.perf_counter() - t0
    tune_here = args.trials > 0 and (args.tune_models == "all" or name in args.tune_models.split(","))
    variants = ([("ctc default", 0, m)] if "ctc" in runtimes else []) \
        + ([("ctc tuned", args.trials, m)] if tune_here else []) \
        + ([("ctc default, any length", 0, m)] if "ctc-dyn" in runtimes and not decode else [])
    if "ctc-int8" in runtimes:
        t0 = time.perf_counter()
        q = rptq_w8a8_module(name)
        print(f"(ctc int8: capture + rptq W8A8 pipeline {time.perf_counter() - t0:.1f} s; "
              f"inputs {[v.name for v in q.inputs]})", flush=True)
        variants.append(("ctc int8 rptq W8A8", 0, q))
    for label, trials, mod in variants:
        t0 = time.perf_counter()
        static = {} if "any length" in label else _static_dims(mod, inputs)
        comp = compile_module(mod, options=BuildOptions(static_dims=static, trials=trials,
                                                      tuning_dir=args.tuning_dir, trials_per_task=args.per_task))
        ct = time.perf_counter() - t0
        d = Path(tmp.name) / label.replace(" ", "_")
        comp.export(d)
        cm2 = load_compiled(d, threads=args.threads)
        mins = tuple(inputs[v.name] for v in mod.inputs)
        out = cm2(*mins)
        err, cos = _agree(out if decode else out[0], ref)
        rname = f"{label}" + (f" ({trials} trials)" if trials else "")
        fns[rname] = lambda cm2=cm2, mins=mins: cm2(*mins)  # the user's call: binding and output wrapping timed
        rows.append({"runtime": rname, "compile_s": ct, "tune_s": comp.timings.get("tune_s"), "capture_s": cap_s,
                     "err": err, "cos": cos,
                     "tuning": comp.meta.get("tuning") or {}, "int_kernels": comp.meta.get("int_kernels")})
        if comp.meta.get("int_kernels"):
            print(f"  {label}: int kernels {comp.meta['int_kernels']}", flush=True)
    times = timeit(fns, args.runs, args.warmup, args.rounds)
    for r in rows:
        r["ms"], r["min"] = times[r["runtime"]]
    print(f"(load average after: {os.getloadavg()[0]:.2f}; ctc capture {cap_s:.1f} s)")
    _table(rows)
    return rows


def _static_dims(m: Any, inputs: dict[str, torch.Tensor]) -> dict[str, int]:
    """Each symbolic input dim bound to the benchmark input's size (a fixed-shape build)."""
    out: dict[str, int] = {}
    for v in m.inputs:
        for d, n in zip(v.type.shape, inputs[v.name].shape, strict=True):
            if isinstance(d, str):
                if d not in v.type.symbols:
                    raise SystemExit(f"input {v.name}: dim {d!r} is an expression; bind its symbols by hand")
                out[d] = int(n)
    return out


def _table(rows: list[dict[str, Any]]) -> None:
    """Markdown table: latency, ratios (runtime / reference: < 1 is faster) and output agreement."""
    def ref_ms(name: str) -> float | None:
        return next((r["ms"] for r in rows if r["runtime"] == name), None)

    refs = [("x ORT", ref_ms("ONNX Runtime")), ("x ctc fp32", ref_ms("ctc default")),
            ("x ORT int8", ref_ms("ONNX Runtime int8"))]
    refs = [(h, v) for h, v in refs if v]
    print(f"| {'runtime':32s} | median ms | min ms | " + " | ".join(h for h, _ in refs)
          + " | cosine vs eager | max abs err | compile s | tune s |")
    print(f"|{'-' * 34}|----------:|-------:|" + "|".join("-" * (len(h) + 1) + ":" for h, _ in refs)
          + "|----------------:|------------:|----------:|-------:|")
    for r in rows:
        ratios = " | ".join(f"{r['ms'] / v:{len(h)}.2f}" for h, v in refs)
        cs = f"{r['compile_s']:9.1f}" if r.get("compile_s") is not None else "        -"
        ts = f"{r['tune_s']:6.1f}" if r.get("tune_s") is not None else "     -"
        print(f"| {r['runtime']:32s} | {r['ms']:9.2f} | {r['min']:6.2f} | {ratios} | {r['cos']:15.6f} "
              f"| {r['err']:11.2e} | {cs} | {ts} |")
    for r in rows:
        if r.get("tuning"):
            print(f"  {r['runtime']}: {r['tuning']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm128,minilm384,gpt2")
    ap.add_argument("--runtimes", default="eager,compile,ort,ctc")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (runtimes alternate between rounds)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--trials", type=int, default=0, help="meta-schedule trial budget for 'ctc tuned' (0: skip)")
    ap.add_argument("--tune-models", default="all", help="comma list of models to tune (default: all)")
    ap.add_argument("--per-task", type=int, default=None, help="trials per tuned task (default: budget / tasks)")
    ap.add_argument("--tuning-dir", default=None, help="tuning database root (default ~/.cache/ctc/tuning)")
    args = ap.parse_args()
    if args.runs < 20:
        raise SystemExit("--runs must be >= 20 (median of at least 20 runs)")
    torch.set_num_threads(args.threads)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import onnxruntime
    import tvm

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print("# ctc CPU latency benchmark")
    print(f"machine: {cpu}, {os.cpu_count()} cpus ({len(os.sched_getaffinity(0))} usable), {platform.platform()}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}, tvm {tvm.__version__}; LLVM mcpu {tvm.target.codegen.llvm_get_system_cpu()}")
    print(f"protocol: batch 1, {args.threads} threads for every runtime, median (and min) of >= {args.runs} runs after "
          f"{args.warmup} warm-up runs, interleaved in {args.rounds} rounds across runtimes; ctc compiled for the "
          "static sequence length; fp32 unless the row says int8 (ORT int8: quantize_dynamic, QInt8 weights; "
          "ctc int8: examples/minilm_w8a8.ctc's pipeline, rptq W8A8 4 clusters, TVM int8 kernels); ratios are "
          "runtime / reference (< 1: faster); cosine of the output against PyTorch fp32 eager")
    for name in args.models.split(","):
        bench_model(name.strip(), args)


if __name__ == "__main__":
    main()
