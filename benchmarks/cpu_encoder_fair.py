"""Fair CPU latency of all-MiniLM-L6-v2: ONNX Runtime against ctc, each runtime in its own process,
each through the call its user makes.

Why: issue 19.  Timing every runtime in one process flattered ctc: a runtime's worker threads
(torch's OpenMP pool, ONNX Runtime's, TVM's) keep spinning after its last call and take a core
from the runtime timed next.  This benchmark cannot do that (the runner is benchmarks/fair_runner.py,
shared with benchmarks/cnn_latency.py):

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
per-call overhead is ctc - ctc-raw), ctc-strict (the fixed-length fp32 build with ``fp32_matmul=strict``:
f32 FMAs (AVX-512 or AVX2) where the default, ``auto``, runs the linears on AMX-BF16 tiles with bf16-split
operands; the header says which kernels each fp32 build ran).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from fair_runner import (  # noqa: E402
    CHILD_ENV,
    check_lines,
    git_commit,
    machine_line,
    protocol_text,
    ratio_lines,
    serve,
    stats_row,
    time_runtimes,
    versions,
)

RUNTIMES = ("eager", "ort", "ort-int8", "ctc", "ctc-int8", "ctc-dyn", "ctc-int8-dyn", "ctc-raw", "ctc-strict")
LABELS = {"eager": "PyTorch eager fp32", "ort": "ONNX Runtime fp32", "ort-int8": "ONNX Runtime int8 (dynamic)",
          "ctc": "ctc fp32", "ctc-int8": "ctc RPTQ W8A8", "ctc-dyn": "ctc fp32, any length",
          "ctc-int8-dyn": "ctc RPTQ W8A8, any length", "ctc-raw": "ctc fp32, raw VM call (no conversion)",
          "ctc-strict": "ctc fp32, fp32_matmul=strict (f32 FMAs)"}
# (runtime, reference): the side-by-side ratios of one run
RATIOS = (("ctc", "ort"), ("ctc-dyn", "ort"), ("ctc-int8", "ort-int8"), ("ctc-int8-dyn", "ort-int8"),
          ("ctc-dyn", "ctc"), ("ctc-int8-dyn", "ctc-int8"), ("ctc", "ctc-raw"), ("ctc-int8", "ctc"),
          ("ctc-strict", "ort"), ("ctc", "ctc-strict"))

FP32_RECIPE = """model bundled "minilm"
pipeline {{
    canonicalize
    constant-fold
    cse
    dce
}}
target cpu seq_len={seq}{options}
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
    """Serve one runtime over stdin/stdout (:func:`fair_runner.serve`)."""
    spec = json.loads(spec_json)
    serve(child_runner(spec), spec["warmup"])


# ----------------------------------------------------------------------------- parent side
def build_all(args: argparse.Namespace, seqs: list[int], runtimes: set[str], work: Path) -> dict[tuple[str, int], str]:
    """Artifacts and ONNX files each runtime needs: ``{(runtime, seq): path}`` (built once, reused)."""
    paths: dict[tuple[str, int], str] = {}
    ctc_cli = [sys.executable, "-m", "ctc", "compile", "--quiet", "--force"]
    env = {**os.environ, **CHILD_ENV}
    int8_src = (ROOT / "examples" / "minilm_w8a8_cpu.ctc").read_text()
    built: set[str] = set()
    if "\ntarget cpu" not in int8_src:
        raise SystemExit("examples/minilm_w8a8_cpu.ctc has no `target cpu` line to specialise")
    for rt in sorted(runtimes):
        if not rt.startswith("ctc") or rt == "ctc-raw":  # ctc-raw calls the ctc build's library
            continue
        int8 = "int8" in rt
        for seq in seqs:
            fixed = 0 if rt.endswith("-dyn") else seq
            strict = rt == "ctc-strict"
            name = f"{'int8' if int8 else 'fp32'}{'_strict' if strict else ''}_{fixed or 'any'}"
            out = work / name
            paths[(rt, seq)] = str(out)
            if (out.exists() and not args.rebuild) or name in built:  # an any-length build serves every seq
                continue
            built.add(name)
            if int8:
                text = "\n".join(f"target cpu seq_len={fixed}" if ln.startswith("target cpu") else ln
                                 for ln in int8_src.splitlines()) + "\n"
            else:
                text = FP32_RECIPE.format(seq=fixed, options=" fp32_matmul=strict" if strict else "")
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
    specs = {rt: {"runtime": rt, "seq": seq, "threads": args.threads, "warmup": args.warmup, "tokenizer": tokenizer,
                  "onnx": paths.get((rt, seq)),
                  "artifact": paths.get(("ctc", seq) if rt == "ctc-raw" else (rt, seq))} for rt in runtimes}
    t = time_runtimes(__file__, specs, runs=args.runs, rounds=args.rounds, settle=args.settle, work=work, tag=str(seq))
    ref = reference(seq, work)
    rows = [{"runtime": rt, **stats_row(t, rt), "cosine": cosine(t.outputs[rt], ref),
             "max_abs_err": float(np.abs(t.outputs[rt] - ref).max())} for rt in runtimes]
    return [{"check": t.check()}, *rows]


def _tokenizer_dir() -> Path:
    from ctc.bundled import bundled_model_dir

    return Path(bundled_model_dir("minilm"))


def fp32_kernels_line(paths: dict[tuple[str, int], str]) -> str:
    """Which kernels the fp32 builds' linears ran (``fp32_matmul`` in each library's model.json)."""
    import json

    seen = []
    for (rt, seq), path in sorted(paths.items()):
        meta = Path(path) / "targets" / "cpu" / "model.json"
        if rt.startswith("ctc") and "int8" not in rt and meta.exists():
            mode = json.loads(meta.read_text()).get("fp32_matmul", "strict (built before fp32_matmul)")
            seen.append(f"{LABELS[rt]} seq {seq}: {mode}")
    return "- ctc fp32 linears (fp32_matmul): " + ("; ".join(seen) if seen else "no fp32 build")


def header(args: argparse.Namespace) -> list[str]:
    timed = ("its user-facing call (ORT `InferenceSession.run` on the tokenizer's numpy dict; ctc "
             "`ctc.load(dir).runner('cpu')(tokenizer(..., return_tensors='pt'))`; eager `model(**enc)`)")
    return [
        "# all-MiniLM-L6-v2 on the CPU, fair protocol (benchmarks/cpu_encoder_fair.py)",
        "",
        f"- command: `python benchmarks/cpu_encoder_fair.py {' '.join(sys.argv[1:])}`",
        f"- when: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, ctc commit {git_commit()}",
        f"- machine: {machine_line()}",
        f"- versions: {versions()}",
        "- protocol: batch 1, real text (Lee corpus) tokenized to the sequence length; "
        + protocol_text(threads=str(args.threads), warmup=args.warmup, runs=args.runs, rounds=args.rounds,
                        settle=args.settle, timed=timed)
        + "; cosine of last_hidden_state against PyTorch fp32 eager on the same input",
    ]


def table(seq: int, result: list[dict[str, Any]]) -> list[str]:
    check, rows = result[0]["check"], result[1:]
    lines = [
        "", f"## seq {seq}", "",
        *check_lines(check),
        "",
        "| runtime | median ms | min ms | p90 ms | spread | CPU ms per call | cosine vs fp32 eager | max abs err |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {LABELS[r['runtime']]} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['p90_ms']:.2f} | "
                     f"{r['spread']:.0%} | {r['cpu_ms']:.1f} | {r['cosine']:.6f} | {r['max_abs_err']:.2e} |")
    return lines + ratio_lines({r["runtime"]: r for r in rows}, RATIOS, LABELS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="128,384", help="comma list of sequence lengths")
    ap.add_argument("--runtimes", default="eager,ort,ort-int8,ctc,ctc-int8,ctc-dyn,ctc-int8-dyn,ctc-raw,ctc-strict")
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
    lines = [*header(args), fp32_kernels_line(paths)]
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
