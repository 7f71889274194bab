"""Fair CPU latency of all-MiniLM-L6-v2: ONNX Runtime against ctc, each runtime in its own process,
each through the call its user makes.

Why: issue 19.  Timing every runtime in one process flattered ctc: a runtime's worker threads
(torch's OpenMP pool, ONNX Runtime's, TVM's) keep spinning after its last call and take a core
from the runtime timed next.  This benchmark cannot do that:

* every runtime lives in a process of its own (a child of this script) and loads, warms up and
  runs there; the children are driven over pipes, one at a time, in interleaved rounds (the
  order rotates each round), with a settle pause before each batch;
* while one child is timed, the CPU time every other process of the benchmark spends (idle
  children's thread pools, this parent) is read from ``/proc/<pid>/task/*/schedstat`` and
  reported: a spinning pool would show up there, and the header says whether the check passed;
* CPU time taken by processes outside the benchmark during the timed batches (other users of a
  shared machine) is read from ``/proc/stat`` and printed: it says how noisy the run was;
* each runtime is timed through its user-facing call on the tokenizer's output for real text:
  ``InferenceSession.run(None, tokenizer(text, return_tensors="np"))`` for ONNX Runtime,
  ``ctc.load(dir).runner("cpu")(tokenizer(text, return_tensors="pt"))`` for ctc (every input
  the tokenizer gives, the artifact picks the ones it takes), ``model(**enc)`` for PyTorch eager;
* min, median, p90 and the spread (p90 - min) / median are reported per runtime, and ratios of
  medians (and of mins) side by side from one run.

The ctc artifacts are built by ``ctc compile`` from recipes written into ``--work`` (fp32: the
cleanup passes only; int8: examples/minilm_w8a8_cpu.ctc's RPTQ W8A8 pipeline), for the fixed
sequence length (``seq_len=N``) and for any length.  ONNX Runtime gets the model exported with
dynamic batch and sequence axes (how it is deployed) and, for int8, ``quantize_dynamic`` with
QInt8 weights.  Built files are reused from ``--work`` unless ``--rebuild``.

Usage (the lead's re-run on a quiet machine)::

    python benchmarks/cpu_encoder_fair.py --seqs 128,384 --threads 2 --runs 40 --rounds 8 \\
        --out benchmarks/results/cpu_encoder_fair.md

Runtimes (``--runtimes``): eager, ort, ort-int8, ctc, ctc-int8, ctc-dyn, ctc-int8-dyn (any-length
builds), ctc-raw (the ctc fp32 library's VM called on prebuilt runtime tensors: the runner's
per-call overhead is ctc - ctc-raw).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ("eager", "ort", "ort-int8", "ctc", "ctc-int8", "ctc-dyn", "ctc-int8-dyn", "ctc-raw")
LABELS = {"eager": "PyTorch eager fp32", "ort": "ONNX Runtime fp32", "ort-int8": "ONNX Runtime int8 (dynamic)",
          "ctc": "ctc fp32", "ctc-int8": "ctc RPTQ W8A8", "ctc-dyn": "ctc fp32, any length",
          "ctc-int8-dyn": "ctc RPTQ W8A8, any length", "ctc-raw": "ctc fp32, raw VM call (no conversion)"}
# (runtime, reference): the side-by-side ratios of one run
RATIOS = (("ctc", "ort"), ("ctc-dyn", "ort"), ("ctc-int8", "ort-int8"), ("ctc-int8-dyn", "ort-int8"),
          ("ctc-dyn", "ctc"), ("ctc-int8-dyn", "ctc-int8"), ("ctc", "ctc-raw"), ("ctc-int8", "ctc"))
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
IDLE_CPU_LIMIT = 0.01  # idle processes of the benchmark may use at most 1% of the timed wall time

FP32_RECIPE = """model bundled "minilm"
pipeline {{
    canonicalize
    constant-fold
    cse
    dce
}}
target cpu seq_len={seq}
"""


def text_for(tok: Any, seq: int) -> str:
    """Real text (the Lee corpus documents, joined) long enough to fill ``seq`` tokens."""
    from ctc.eval.data import lee_test

    text = " ".join(lee_test())
    if len(tok(text, add_special_tokens=True, verbose=False)["input_ids"]) < seq:
        raise SystemExit(f"the Lee corpus has fewer than {seq} tokens")
    return text


def encode(tok: Any, seq: int, kind: str) -> Any:
    """What the tokenizer gives for one window of ``seq`` tokens (``kind`` = "pt" or "np")."""
    return tok(text_for(tok, seq), return_tensors=kind, truncation=True, max_length=seq)


# ----------------------------------------------------------------------------- child side
def child_runner(spec: dict[str, Any]) -> Any:
    """Load one runtime; returns the zero-argument callable the child times (the user-facing call)."""
    rt, seq, threads = spec["runtime"], spec["seq"], spec["threads"]
    if rt.startswith("ort"):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(spec["onnx"], so, providers=["CPUExecutionProvider"])
        tok = AutoTokenizer.from_pretrained(spec["tokenizer"], local_files_only=True)
        feed = dict(encode(tok, seq, "np"))
        return lambda: sess.run(None, feed)[0]
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    if rt == "eager":
        from ctc.frontends import load_bundled

        _hf = load_bundled("minilm")
        model, tok = _hf.model, _hf.tokenizer
        enc = encode(tok, seq, "pt")
        return lambda: model(**enc).last_hidden_state
    import ctc

    os.environ["TVM_NUM_THREADS"] = str(threads)
    art = ctc.load(spec["artifact"])
    enc = encode(art.tokenizer(), seq, "pt")
    runner = art.runner("cpu")
    if rt == "ctc-raw":
        prepared = runner.prepare(enc)
        return lambda: runner.run_prepared(prepared)
    return lambda: runner(enc)[0]


def child_main(spec_json: str) -> None:
    """Serve one runtime over stdin/stdout: ``run N`` -> JSON list of N wall times (s); ``out PATH``
    saves the output as .npy; ``quit``."""
    import numpy as np

    spec = json.loads(spec_json)
    fn = child_runner(spec)
    for _ in range(spec["warmup"]):
        fn()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "run":
            fn()  # one untimed call after the pause (caches, waking the pool)
            ts = []
            for _ in range(int(arg)):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            print(json.dumps(ts), flush=True)
        elif cmd == "out":
            o = fn()
            o = o.numpy() if hasattr(o, "numpy") else np.from_dlpack(o)  # a torch tensor, or the VM's own tensor
            np.save(arg, np.asarray(o, dtype=np.float32))
            print("saved", flush=True)
        elif cmd == "quit":
            return


# ----------------------------------------------------------------------------- parent side
def cpu_ns(pid: int) -> int:
    """CPU time (ns) all threads of process ``pid`` have run so far (schedstat: ns resolution)."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                continue
    except FileNotFoundError:
        return 0
    return total


def machine_busy_ns() -> int:
    """CPU time (ns) every process on the machine has run (/proc/stat: user+nice+system+irq+softirq+steal)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + (fields[7] if len(fields) > 7 else 0)
    return busy * (10**9 // os.sysconf("SC_CLK_TCK"))


class Child:
    """One runtime's process."""

    def __init__(self, spec: dict[str, Any], log: Path):
        env = {**os.environ, **CHILD_ENV}
        self.log = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.name = spec["runtime"]

    def wait_ready(self) -> None:
        line = self._line()
        if line != "ready":
            raise SystemExit(f"{self.name}: child did not start ({line!r}); see {self.log.name}")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.name}: child exited with {self.proc.wait()}; see {self.log.name}")
        return line.strip()

    def ask(self, cmd: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        """Ask the child to quit; one that has not exited after a minute (a loaded machine) is killed."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def build_all(args: argparse.Namespace, seqs: list[int], runtimes: set[str], work: Path) -> dict[tuple[str, int], str]:
    """Artifacts and ONNX files each runtime needs: ``{(runtime, seq): path}`` (built once, reused)."""
    paths: dict[tuple[str, int], str] = {}
    ctc_cli = [sys.executable, "-m", "ctc", "compile", "--quiet", "--force"]
    env = {**os.environ, **CHILD_ENV}
    int8_src = (ROOT / "examples" / "minilm_w8a8_cpu.ctc").read_text()
    if "\ntarget cpu" not in int8_src:
        raise SystemExit("examples/minilm_w8a8_cpu.ctc has no `target cpu` line to specialise")
    for rt in sorted(runtimes):
        if not rt.startswith("ctc"):
            continue
        int8 = "int8" in rt
        for seq in seqs:
            fixed = 0 if rt.endswith("-dyn") else seq
            name = f"{'int8' if int8 else 'fp32'}_{fixed or 'any'}"
            out = work / name
            paths[(rt, seq)] = str(out)
            if out.exists() and not args.rebuild:
                continue
            if int8:
                text = "\n".join(f"target cpu seq_len={fixed}" if ln.startswith("target cpu") else ln
                                 for ln in int8_src.splitlines()) + "\n"
            else:
                text = FP32_RECIPE.format(seq=fixed)
            recipe = work / f"{name}.ctc"
            recipe.write_text(text)
            print(f"(building {name} with ctc compile ...)", flush=True)
            t0 = time.perf_counter()
            r = subprocess.run([*ctc_cli, str(recipe), "--out", str(out)], env=env, capture_output=True, text=True)
            if r.returncode not in (0, 1):  # 1: a check failed, the artifact is still written
                raise SystemExit(f"ctc compile {recipe} failed:\n{r.stderr[-3000:]}")
            print(f"(built {name} in {time.perf_counter() - t0:.0f} s)", flush=True)
    if {"ort", "ort-int8"} & runtimes:
        onnx, qonnx = work / "minilm.onnx", work / "minilm_int8.onnx"
        if not onnx.exists() or not qonnx.exists() or args.rebuild:
            print("(exporting ONNX ...)", flush=True)
            r = subprocess.run([sys.executable, __file__, "--export-onnx", str(onnx), str(qonnx)], env=env,
                               capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"ONNX export failed:\n{r.stderr[-3000:]}")
        for seq in seqs:
            paths[("ort", seq)], paths[("ort-int8", seq)] = str(onnx), str(qonnx)
    return paths


def export_onnx(path: str, qpath: str) -> None:
    """The bundled MiniLM as ONNX (every tokenizer input, dynamic batch/sequence) and its QInt8 dynamic quantization."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ctc.frontends import load_bundled

    _hf = load_bundled("minilm")
    model, tok = _hf.model, _hf.tokenizer
    enc = encode(tok, 128, "pt")
    names = list(enc.keys())

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            return self.m(**dict(zip(names, xs, strict=True))).last_hidden_state

    axes = {n: {0: "batch", 1: "seq"} for n in names}
    torch.onnx.export(Hidden().eval(), tuple(enc.values()), path, input_names=names,
                      output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                      dynamic_axes={**axes, "last_hidden_state": {0: "batch", 1: "seq"}})
    quantize_dynamic(path, qpath, weight_type=QuantType.QInt8)


def reference(seq: int, work: Path) -> Any:
    """PyTorch fp32 eager output on the benchmark's input (computed after the timing)."""
    import numpy as np
    import torch

    from ctc.frontends import load_bundled

    _hf = load_bundled("minilm")
    model, tok = _hf.model, _hf.tokenizer
    with torch.no_grad():
        out = model(**encode(tok, seq, "pt")).last_hidden_state.numpy()
    np.save(work / f"ref_{seq}.npy", out)
    return out


def cosine(a: Any, b: Any) -> float:
    import numpy as np

    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def bench_seq(seq: int, runtimes: list[str], paths: dict[tuple[str, int], str], args: argparse.Namespace,
              work: Path) -> list[dict[str, Any]]:
    """Time every runtime at ``seq`` tokens, each in its own process; returns the table rows."""
    import numpy as np

    tokenizer = str(_tokenizer_dir())
    children: dict[str, Child] = {}
    try:
        for rt in runtimes:  # started one at a time: a loading child must not overlap another's warm-up
            spec = {"runtime": rt, "seq": seq, "threads": args.threads, "warmup": args.warmup, "tokenizer": tokenizer,
                    "onnx": paths.get((rt, seq)), "artifact": paths.get(("ctc", seq) if rt == "ctc-raw" else (rt, seq))}
            children[rt] = Child(spec, work / f"child_{rt}_{seq}.log")
            children[rt].wait_ready()
        times: dict[str, list[float]] = {rt: [] for rt in runtimes}
        own_cpu: dict[str, int] = dict.fromkeys(runtimes, 0)  # CPU ns the timed process used, untimed call included
        idle_ns = timed_ns = foreign_ns = 0
        per = math.ceil(args.runs / args.rounds)
        pids = {rt: c.proc.pid for rt, c in children.items()}
        for r in range(args.rounds):
            order = runtimes[r % len(runtimes):] + runtimes[:r % len(runtimes)]
            for rt in order:
                time.sleep(args.settle)
                others = [p for k, p in pids.items() if k != rt] + [os.getpid()]
                before = {p: cpu_ns(p) for p in [*others, pids[rt]]}
                busy0, t0 = machine_busy_ns(), time.perf_counter_ns()
                reply = children[rt].ask(f"run {per}")
                wall, busy1 = time.perf_counter_ns() - t0, machine_busy_ns()
                after = {p: cpu_ns(p) for p in before}
                idle = sum(after[p] - before[p] for p in others)
                ours = sum(after[p] - before[p] for p in before)
                idle_ns += idle
                timed_ns += wall
                foreign_ns += max(0, (busy1 - busy0) - ours)
                times[rt] += json.loads(reply)
                own_cpu[rt] += after[pids[rt]] - before[pids[rt]]
        # the raw timings, kept even if a later step fails
        (work / f"times_{seq}.json").write_text(json.dumps({"times": times, "cpu_ns": own_cpu, "idle_ns": idle_ns,
                                                            "timed_ns": timed_ns, "foreign_ns": foreign_ns}))
        rows = []
        outs = {}
        for rt, c in children.items():
            p = work / f"out_{rt}_{seq}.npy"
            c.ask(f"out {p}")
            outs[rt] = np.load(p)
    finally:
        for c in children.values():
            c.close()
    ref = reference(seq, work)
    for rt in runtimes:
        ts = sorted(times[rt])
        med = statistics.median(ts)
        p90 = ts[min(len(ts) - 1, int(0.9 * len(ts)))]
        rows.append({"runtime": rt, "n": len(ts), "median_ms": med * 1e3, "min_ms": ts[0] * 1e3, "p90_ms": p90 * 1e3,
                     "spread": (p90 - ts[0]) / med,
                     "cpu_ms": own_cpu[rt] / 1e6 / (args.rounds * (per + 1)), "cosine": cosine(outs[rt], ref),
                     "max_abs_err": float(np.abs(outs[rt] - ref).max())})
    check = {"idle_cpu_ms": idle_ns / 1e6, "timed_ms": timed_ns / 1e6, "idle_share": idle_ns / max(timed_ns, 1),
             "foreign_cores": foreign_ns / max(timed_ns, 1)}
    return [{"check": check}, *rows]


def _tokenizer_dir() -> Path:
    from ctc.bundled import bundled_model_dir

    return Path(bundled_model_dir("minilm"))


def versions() -> str:
    out = [f"python {platform.python_version()}"]
    for mod in ("torch", "onnxruntime", "tvm", "tvm_ffi", "transformers"):
        r = subprocess.run([sys.executable, "-c", f"import {mod}; print({mod}.__version__)"], capture_output=True,
                           text=True, env={**os.environ, **CHILD_ENV})
        out.append(f"{mod} {r.stdout.strip() or '?'}")
    return ", ".join(out)


def git_commit() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "ctc", "benchmarks"],
                           capture_output=True, text=True).stdout.strip()
    return (r.stdout.strip() or "?") + (" (+ uncommitted changes)" if dirty else "")


def header(args: argparse.Namespace) -> list[str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return [
        "# all-MiniLM-L6-v2 on the CPU, fair protocol (benchmarks/cpu_encoder_fair.py)",
        "",
        f"- command: `python benchmarks/cpu_encoder_fair.py {' '.join(sys.argv[1:])}`",
        f"- when: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, ctc commit {git_commit()}",
        f"- machine: {cpu}, {os.cpu_count()} cpus ({len(os.sched_getaffinity(0))} usable), {platform.platform()}; "
        f"load average at start {os.getloadavg()[0]:.2f}",
        f"- versions: {versions()}",
        f"- protocol: batch 1, real text (Lee corpus) tokenized to the sequence length; {args.threads} intra-op "
        "threads for every runtime; each runtime in its own process, loaded and warmed up "
        f"({args.warmup} calls) there; timed through its user-facing call (ORT `InferenceSession.run` on the "
        "tokenizer's numpy dict; ctc `ctc.load(dir).runner('cpu')(tokenizer(..., return_tensors='pt'))`; eager "
        f"`model(**enc)`); {args.rounds} interleaved rounds of {math.ceil(args.runs / args.rounds)} timed calls "
        f"per runtime (order rotating), each batch after a {args.settle} s pause and one untimed call; while one "
        "runtime is timed, the CPU time of every other benchmark process is measured (schedstat) and must stay "
        f"under {IDLE_CPU_LIMIT:.0%} of the timed wall time (no spinning pool steals a core); ratios are of "
        "medians (< 1: faster); spread = (p90 - min) / median; CPU ms per call = CPU time of the runtime's "
        "process over all its threads (spinning included; less inflated than wall time by other users' load); "
        "cosine of last_hidden_state against PyTorch "
        "fp32 eager on the same input",
    ]


def table(seq: int, result: list[dict[str, Any]]) -> list[str]:
    check, rows = result[0]["check"], result[1:]
    ok = check["idle_share"] <= IDLE_CPU_LIMIT
    lines = [
        "", f"## seq {seq}", "",
        f"Idle-pool check: other benchmark processes used {check['idle_cpu_ms']:.1f} ms of CPU during "
        f"{check['timed_ms'] / 1e3:.1f} s of timed batches ({check['idle_share']:.2%}): "
        + ("passed." if ok else "FAILED (a pool kept spinning; the numbers are not fair)."),
        f"Other users of the machine took {check['foreign_cores']:.2f} cores on average during the timed batches"
        + (" (measured under load: absolute numbers are noisy, ratios less so)." if check["foreign_cores"] > 0.1
           else " (quiet)."),
        "",
        "| runtime | median ms | min ms | p90 ms | spread | CPU ms per call | cosine vs fp32 eager | max abs err |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {LABELS[r['runtime']]} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['p90_ms']:.2f} | "
                     f"{r['spread']:.0%} | {r['cpu_ms']:.1f} | {r['cosine']:.6f} | {r['max_abs_err']:.2e} |")
    by = {r["runtime"]: r for r in rows}
    pairs = [(a, b) for a, b in RATIOS if a in by and b in by]
    if pairs:
        lines += ["", "| ratio (same run) | of medians | of mins |", "|---|---:|---:|"]
        for a, b in pairs:
            lines.append(f"| {LABELS[a]} / {LABELS[b]} | {by[a]['median_ms'] / by[b]['median_ms']:.3f} | "
                         f"{by[a]['min_ms'] / by[b]['min_ms']:.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="128,384", help="comma list of sequence lengths")
    ap.add_argument("--runtimes", default="eager,ort,ort-int8,ctc,ctc-int8,ctc-dyn,ctc-int8-dyn,ctc-raw")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=40, help="timed calls per runtime and sequence length (>= 20)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--settle", type=float, default=0.5, help="pause (s) before each timed batch")
    ap.add_argument("--work", default="/tmp/ctc_cpu_encoder_fair", help="built artifacts and ONNX files (reused)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the artifacts and ONNX files in --work")
    ap.add_argument("--out", default=None, help="also write the markdown report to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--export-onnx", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child_main(args.child)
    if args.export_onnx is not None:
        return export_onnx(*args.export_onnx)
    sys.path.insert(0, str(ROOT))
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad:
        raise SystemExit(f"unknown runtimes {bad} (choose from {', '.join(RUNTIMES)})")
    if args.runs < 20 or args.rounds < 1:
        raise SystemExit("--runs must be >= 20 and --rounds >= 1")
    seqs = [int(s) for s in args.seqs.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    need = set(runtimes) | ({"ctc"} if "ctc-raw" in runtimes else set())
    paths = build_all(args, seqs, need, work)
    lines = header(args)
    print("\n".join(lines), flush=True)
    for seq in seqs:
        t = table(seq, bench_seq(seq, runtimes, paths, args, work))
        print("\n".join(t), flush=True)
        lines += t
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"\n(written to {args.out})")


if __name__ == "__main__":
    main()
