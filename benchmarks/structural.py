"""Accuracy, size and CPU latency of the structural passes (issue 11) on the bundled real models.

Two tables, one per pass, each method beside its baseline on the same rows:

* ``asvd``: parameter ratios 1.0 / 0.95 / 0.9 / 0.8 / 0.7 of the block linears, for ASVD (abs-mean
  scaling, alpha 0.5, the paper's sensitivity threshold search), ASVD with the exact knapsack
  allocation, ASVD scaling with uniform ranks (separates the two ideas), whitening (Cholesky of
  X^T X) with uniform ranks, and plain truncated SVD with uniform ranks (the baseline).
* ``remove-blocks``: removing 0 / 10 / 20 / 30 % of the blocks by AmoebaLLM's DP on measured
  calibration loss, ShortGPT's block influence, the last blocks, and seeded random blocks.

Models: SmolLM2-135M (30 blocks; perplexity on consecutive windows of the Wikipedia *evaluation*
split, never the calibration text) and all-MiniLM-L6-v2 (6 blocks; sentence-embedding cosine vs
the fp32 IR on the Lee corpus documents, and Pearson/Spearman of embedding similarity with the
human judgements).  Calibration: random windows of the Wikipedia calibration split (seed 0).
Everything runs through the ctc reference interpreter; each pass is computed once per model
(sensitivities, block influence and the DP table are cached and shared by every row).

With ``--latency``, each row's module (and the dense source) is compiled through the TVM CPU
target with default schedules for a fixed shape (batch 1, ``--lat-seq`` tokens) and timed
interleaved in rounds (median and min of >= 20 calls each); ``param MB`` is the float32 parameter
bytes of the artifact.  The machine may be shared: timings taken under load are noisy (the load
average is printed); accuracy numbers are deterministic.

Usage::

    python benchmarks/structural.py asvd --models smollm2 --calib 4 --calib-len 256 --windows 8 --latency
    python benchmarks/structural.py remove-blocks --models minilm,smollm2 --latency
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ctc.eval import data as D  # noqa: E402
from ctc.eval.fidelity import module_embeddings, pearson, spearman  # noqa: E402
from ctc.eval.perplexity import scored_nll  # noqa: E402
from ctc.ir.graph import Module  # noqa: E402
from ctc.ir.interpreter import interpret  # noqa: E402
from ctc.passes.analyses.calibration import CalibrationStats  # noqa: E402
from ctc.passes.analyses.replay import CalibrationReplay  # noqa: E402
from ctc.passes.asvd import LowRankSensitivity  # noqa: E402
from ctc.passes.base import PassContext, get_pass  # noqa: E402
from ctc.passes.remove_blocks import DepthSearch  # noqa: E402

RATIOS = [1.0, 0.95, 0.9, 0.8, 0.7]
FRACTIONS = [0.0, 0.1, 0.2, 0.3]
ASVD_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("ASVD", {"scaling": "abs_mean", "allocation": "threshold"}),
    ("ASVD knapsack", {"scaling": "abs_mean", "allocation": "knapsack"}),
    ("ASVD uniform", {"scaling": "abs_mean", "allocation": "uniform"}),
    ("whiten uniform", {"scaling": "whiten", "allocation": "uniform"}),
    ("SVD uniform", {"scaling": "none", "allocation": "uniform"}),
]
DEPTH_METHODS = ["dp", "influence", "last", "random"]
KEEP_ANALYSES = (CalibrationStats, CalibrationReplay, LowRankSensitivity, DepthSearch)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- models and evaluation
@dataclass
class Bench:
    """A captured model, its calibration batches and how to score a variant of it."""

    name: str
    title: str
    module: Module
    calib: list[dict[str, torch.Tensor]]
    score: Callable[[Module], dict[str, float]]
    latency_input: dict[str, torch.Tensor]
    protocol: str
    ref: dict[str, float] = field(default_factory=dict)


def _feed(module: Module, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = b["input_ids"]
    extra = {"attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "position_ids": torch.arange(ids.shape[1]).unsqueeze(0)}
    return {v.name: b[v.name] if v.name in b else extra[v.name] for v in module.inputs}


def _capture(name: str) -> tuple[Any, Module]:
    from ctc.frontends import load_bundled
    from ctc.frontends.hf import capture_hf_model

    _hf = load_bundled(name)
    model, tok = _hf.model, _hf.tokenizer
    t0 = time.perf_counter()
    m = capture_hf_model(model, name=name)  # dynamic batch/seq: the export path, with block scopes
    log(f"{name}: captured in {time.perf_counter() - t0:.1f}s, {len(m.blocks())} blocks, "
        f"{m.op_counts().get('linear')} linears, {m.param_count():,} params")
    return tok, m


def smollm2(a: argparse.Namespace) -> Bench:
    tok, m = _capture("smollm2")
    calib = [_feed(m, b) for b in D.calibration_batches(tok, "wiki", a.calib, a.calib_len, seed=0)]
    evals = [_feed(m, b) for b in D.evaluation_windows(tok, "wiki", a.windows, a.seq_len)]

    def score(q: Module) -> dict[str, float]:
        total, count = 0.0, 0
        for b in evals:
            t, n = scored_nll(interpret(q, b)[0], b["input_ids"], b["attention_mask"])
            total, count = total + t, count + n
        return {"ppl": math.exp(total / count)}

    ids = evals[0]["input_ids"][:, : a.lat_seq]
    proto = (f"perplexity on the first {len(evals)} consecutive non-overlapping {a.seq_len}-token windows of the "
             f"Wikipedia evaluation split (gensim enwiki test file, split by article; SmolLM2 tokenizer), each "
             f"window scored independently ({len(evals) * (a.seq_len - 1)} tokens scored, float64 log-softmax); "
             f"calibration: {a.calib} random {a.calib_len}-token windows of the calibration split (seed 0)")
    return Bench("smollm2", TITLES["smollm2"], m, calib, score,
                 _feed(m, {"input_ids": ids}), proto)


def minilm(a: argparse.Namespace) -> Bench:
    tok, m = _capture("minilm")
    calib = [_feed(m, b) for b in D.calibration_batches(tok, "wiki", a.calib, a.calib_len, seed=0)]
    docs = D.lee_test()[: a.docs]
    feeds = [_feed(m, dict(tok(d, truncation=True, max_length=a.max_len, return_tensors="pt"))) for d in docs]
    pairs = [(i, j, h) for i, j, h in D.lee_similarity_pairs() if i < a.docs and j < a.docs]
    human = torch.tensor([h for _, _, h in pairs])

    ref = module_embeddings(m, feeds)

    def score(q: Module) -> dict[str, float]:
        e = module_embeddings(q, feeds)
        cos = (e * ref).sum(-1)
        sims = e @ e.T
        model_s = torch.tensor([float(sims[i, j]) for i, j, _ in pairs])
        return {"cos": float(cos.mean()), "cos_min": float(cos.min()), "pearson": pearson(model_s, human),
                "spearman": spearman(model_s, human)}

    lat = dict(tok(["a short sentence"] * 1, padding="max_length", max_length=a.lat_seq, return_tensors="pt"))
    proto = (f"Lee corpus: first {a.docs} documents truncated to {a.max_len} tokens, one at a time; embedding = "
             "mean pooling over the mask + L2 norm; cos = embedding cosine vs the fp32 ctc IR (mean, min); "
             f"Pearson/Spearman of embedding cosine vs the human judgements over {len(pairs)} pairs; calibration: "
             f"{a.calib} random {a.calib_len}-token windows of the Wikipedia calibration split (seed 0)")
    return Bench("minilm", TITLES["minilm"], m, calib, score, _feed(m, lat), proto)


# --------------------------------------------------------------------------- running passes on clones
class Runner:
    """Runs passes on clones of one base module, sharing the analyses computed on the base."""

    def __init__(self, bench: Bench):
        self.base = bench.module
        self.cur = bench.module
        self.ctx = PassContext(calibration=bench.calib)
        self.ctx.progress = _progress()

    def run(self, pass_name: str, opts: dict[str, Any]) -> tuple[Module, list[str], dict[str, Any]]:
        m = self.base.clone()
        self.ctx.invalidate(keep=KEEP_ANALYSES, source=self.cur, module=m)
        self.cur = m
        self.ctx.notes, self.ctx.metrics = [], {}
        out = get_pass(pass_name)(opts).run(m, self.ctx)
        return out, list(self.ctx.notes), dict(self.ctx.metrics)


def _progress() -> Callable[[str, int, int], None]:
    last = {"t": 0.0}

    def report(what: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last["t"] > 30:
            last["t"] = now
            log(f"  {what} {done}/{total}")
    return report


# --------------------------------------------------------------------------- latency
def compile_timed(mods: dict[str, Module], feed: dict[str, torch.Tensor], a: argparse.Namespace
                  ) -> dict[str, tuple[float, float]]:
    """Build each module for the TVM CPU target (default schedules, fixed shape), time them interleaved."""
    from cpu_latency import timeit

    from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled

    fns: dict[str, Callable[[], Any]] = {}
    tmp = tempfile.mkdtemp(prefix="ctc-structural-")
    for label, m in mods.items():
        static = {d: int(feed[v.name].shape[i]) for v in m.inputs for i, d in enumerate(v.type.shape)
                  if isinstance(d, str)}
        t0 = time.perf_counter()
        comp = compile_module(m, options=BuildOptions(static_dims=static))
        d = Path(tmp) / f"m{len(fns)}"
        comp.export(d)
        run = load_compiled(d, threads=a.threads)
        args = tuple(feed[v.name] for v in m.inputs)
        got = torch.as_tensor(run(*args)[0])
        ref = interpret(m, feed)[0]
        err = float((got - ref).abs().max())
        prep = run.prepare(*args)
        fns[label] = lambda run=run, prep=prep: run.run_prepared(prep)
        log(f"  built {label} in {time.perf_counter() - t0:.0f}s (max |TVM - IR| {err:.2e})")
    return timeit(fns, a.runs, 3, a.rounds)


# --------------------------------------------------------------------------- the two studies
def study_asvd(bench: Bench, a: argparse.Namespace) -> dict[str, Any]:
    runner = Runner(bench)
    rows: list[dict[str, Any]] = []
    mods: dict[str, Module] = {"dense": bench.module}
    t0 = time.perf_counter()
    base = {"ratio": 1.0, "method": "dense", **bench.ref, "param_bytes": bench.module.param_bytes()}
    rows.append(base)
    extra = {"ratios": a.candidates} if a.candidates else {}
    for ratio in [r for r in RATIOS if r < 1]:
        for label, opts in [(m, o) for m, o in ASVD_METHODS if m in a.methods]:
            t1 = time.perf_counter()
            q, notes, metrics = runner.run("asvd", {**opts, "ratio": ratio, "sensitivity_batches": a.sens_batches,
                                                    "alpha": 0.5, **extra})
            s = bench.score(q)
            rows.append({"ratio": ratio, "method": label, **s, "param_bytes": q.param_bytes(),
                         "linear_ratio": metrics["asvd_ratio"], "factorised": metrics["asvd_factorised"],
                         "dense_linears": metrics["asvd_dense"], "note": notes[-1]})
            log(f"{bench.name} asvd {label} {ratio}: {s} ({time.perf_counter() - t1:.0f}s)")
            if a.latency and label in ("ASVD", "SVD uniform") and ratio in a.lat_ratios:
                mods[f"{label} {ratio}"] = q
    out: dict[str, Any] = {"rows": rows, "protocol": bench.protocol, "seconds": time.perf_counter() - t0,
                           "analyses": runner.ctx.computed}
    return _with_latency(out, bench, mods, a)


def study_depth(bench: Bench, a: argparse.Namespace) -> dict[str, Any]:
    runner = Runner(bench)
    n = len(bench.module.blocks())
    rows: list[dict[str, Any]] = []
    mods: dict[str, Module] = {"dense": bench.module}
    t0 = time.perf_counter()
    done: dict[tuple[int, str], dict[str, Any]] = {}
    for frac in FRACTIONS:
        keep = n - int(math.floor(frac * n + 0.5))
        for method in DEPTH_METHODS if keep < n else ["none"]:
            if (keep, method) in done:  # small models: two fractions round to the same depth
                rows.append({**done[(keep, method)], "fraction": frac})
                continue
            if method == "none":
                rows.append({"fraction": frac, "keep": keep, "method": "none", **bench.ref, "removed": [],
                             "param_bytes": bench.module.param_bytes()})
                continue
            t1 = time.perf_counter()
            q, notes, metrics = runner.run("remove-blocks", {"keep": keep, "method": method, "seed": 0,
                                                             "measure_batches": a.sens_batches})
            s = bench.score(q)
            rows.append({"fraction": frac, "keep": keep, "method": method, **s, "removed": metrics["removed_blocks"],
                         "calib_loss": metrics["calibration_loss"][1], "param_bytes": q.param_bytes(),
                         "influence": metrics["block_influence"], "note": notes[-1]})
            done[(keep, method)] = rows[-1]
            log(f"{bench.name} remove-blocks {method} keep {keep}: {s} removed {metrics['removed_blocks']} "
                f"({time.perf_counter() - t1:.0f}s)")
            if a.latency and method == "dp":
                mods[f"keep {keep}"] = q
    influence = next((r["influence"] for r in rows if "influence" in r), None)
    out: dict[str, Any] = {"rows": rows, "protocol": bench.protocol, "seconds": time.perf_counter() - t0,
                           "influence": influence}
    return _with_latency(out, bench, mods, a)


def _with_latency(out: dict[str, Any], bench: Bench, mods: dict[str, Module], a: argparse.Namespace
                  ) -> dict[str, Any]:
    """With ``--latency``: build ``mods`` for the CPU target and add their timings to ``out``."""
    if a.latency:
        log(f"{bench.name}: building {len(mods)} modules for the CPU target (load {os.getloadavg()[0]:.1f})")
        out["latency"] = compile_timed(mods, bench.latency_input, a)
        out["latency_shape"] = {k: list(v.shape) for k, v in bench.latency_input.items()}
        out["load_after"] = os.getloadavg()[0]
    return out


# --------------------------------------------------------------------------- tables
def _acc_cols(bench_name: str) -> list[tuple[str, str]]:
    if bench_name == "smollm2":
        return [("ppl", "ppl")]
    return [("cos", "cos"), ("pearson", "Pearson"), ("spearman", "Spearman")]


def _fmt(k: str, v: Any) -> str:
    if v is None:
        return ""
    if k == "ppl":
        return f"{v:.2f}" if v < 1e5 else f"{v:.3g}"
    return f"{v:.4f}" if k == "cos" else f"{v:.3f}"


def asvd_table(name: str, res: dict[str, Any]) -> list[str]:
    cols = _acc_cols(name)
    methods = [m for m, _ in ASVD_METHODS if any(r["method"] == m for r in res["rows"])]
    head = "| param ratio | " + " | ".join(f"{m} {c}" for m in methods for _, c in cols) + \
        " | ASVD param MB | SVD param MB |"
    if "latency" in res:
        head += " ctc CPU ms ASVD (min) | ctc CPU ms SVD (min) | ASVD / dense |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    rows = res["rows"]
    dense = rows[0]
    lat = res.get("latency", {})
    for ratio in RATIOS:
        by = {r["method"]: r for r in rows if r["ratio"] == ratio}
        cells = []
        for m in methods:
            r = by.get(m, dense if ratio == 1.0 else None)
            cells += [_fmt(k, r.get(k)) if r else "" for k, _ in cols]
        mb = [f"{by.get(m, dense)['param_bytes'] / 1e6:.1f}" for m in ("ASVD", "SVD uniform")]
        line = f"| {ratio} | " + " | ".join(cells) + f" | {mb[0]} | {mb[1]} |"
        if lat:
            ka = "dense" if ratio == 1.0 else f"ASVD {ratio}"
            ks = "dense" if ratio == 1.0 else f"SVD uniform {ratio}"
            fa = f"{lat[ka][0]:.2f} ({lat[ka][1]:.2f})" if ka in lat else ""
            fs = f"{lat[ks][0]:.2f} ({lat[ks][1]:.2f})" if ks in lat else ""
            sp = f"{lat[ka][0] / lat['dense'][0]:.2f}" if ka in lat else ""
            line += f" {fa} | {fs} | {sp} |"
        lines.append(line)
    return lines


def depth_table(name: str, res: dict[str, Any]) -> list[str]:
    cols = _acc_cols(name)
    head = "| removed | kept | " + " | ".join(f"{m} {c}" for m in DEPTH_METHODS for _, c in cols) + \
        " | dp removes | influence removes | param MB |"
    lat = res.get("latency", {})
    if lat:
        head += " ctc CPU ms (min) | / dense |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    rows = res["rows"]
    for frac in FRACTIONS:
        by = {r["method"]: r for r in rows if r["fraction"] == frac}
        keep = next(iter(by.values()))["keep"]
        base = by.get("none")
        cells = []
        for m in DEPTH_METHODS:
            r = by.get(m, base)
            cells += [_fmt(k, r.get(k)) for k, _ in cols]
        some = next(iter(by.values()))
        n = len(some.get("removed", [])) if base is None else 0
        dp = by.get("dp", {}).get("removed", [])
        inf = by.get("influence", {}).get("removed", [])
        line = (f"| {n} ({frac:.0%}) | {keep} | " + " | ".join(cells) +
                f" | {dp} | {inf} | {some['param_bytes'] / 1e6:.1f} |")
        if lat:
            k = "dense" if base is not None else f"keep {keep}"
            line += (f" {lat[k][0]:.2f} ({lat[k][1]:.2f}) | {lat[k][0] / lat['dense'][0]:.2f} |"
                     if k in lat else " | |")
        lines.append(line)
    return lines


TITLES = {"smollm2": "SmolLM2-135M-Instruct (30 blocks)", "minilm": "all-MiniLM-L6-v2 (6 blocks)"}


def report(study: str, results: dict[str, Any], a: argparse.Namespace, info: dict[str, Any]) -> str:
    from cpu_latency import shown_command

    stamp = Path(a.render).stat().st_mtime if a.render else time.time()
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) + (" (rendered from its JSON)" if a.render else "")

    lines = [f"# {study} on real weights (issue 11)", "",
             f"Command: `python benchmarks/structural.py {shown_command(sys.argv[1:])}`", "",
             f"Machine: {info['cpu']}, {info['usable_cores']} usable cores; torch {info['torch']}, "
             f"TVM {info['tvm']}; interpreter threads {a.threads}; measured {when} "
             "(shared machine: timings noisy, accuracy deterministic).", ""]
    for name, res in results.items():
        lines += [f"## {TITLES[name]}", ""]
        lines += asvd_table(name, res) if study == "asvd" else depth_table(name, res)
        lines += ["", f"Protocol: {res['protocol']}."]
        if "latency" in res:
            lines.append(f"Latency: TVM CPU target, default schedules, fixed input {res['latency_shape']}, "
                         f"{a.threads} thread(s), median (min) of >= {a.runs} calls interleaved in {a.rounds} rounds; "
                         f"load average after {res['load_after']:.1f}.")
        lines.append(f"Study time {res['seconds'] / 60:.1f} min.")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", choices=["asvd", "remove-blocks"])
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--calib", type=int, default=4, help="calibration windows")
    ap.add_argument("--calib-len", type=int, default=256, help="calibration window length")
    ap.add_argument("--sens-batches", type=int, default=2,
                    help="calibration windows on which sensitivities / block losses are measured")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=[m for m, _ in ASVD_METHODS],
                    help="asvd rows to compute, comma-separated (default: all of ASVD_METHODS)")
    ap.add_argument("--candidates", type=lambda s: [float(x) for x in s.split(",")], default=None,
                    help="asvd sensitivity candidate ratios (default the paper's 0.1..0.9)")
    ap.add_argument("--windows", type=int, default=8, help="SmolLM2 evaluation windows")
    ap.add_argument("--seq-len", type=int, default=256, help="SmolLM2 evaluation window length")
    ap.add_argument("--docs", type=int, default=50, help="Lee documents (MiniLM)")
    ap.add_argument("--max-len", type=int, default=128, help="tokens per Lee document")
    ap.add_argument("--latency", action="store_true", help="also build for the TVM CPU target and time")
    ap.add_argument("--lat-seq", type=int, default=128, help="tokens of the latency input")
    ap.add_argument("--lat-ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.9, 0.8, 0.7])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch and TVM threads (1 is steadiest when shared)")
    ap.add_argument("--json", default=None, help="also write the raw rows here")
    ap.add_argument("--out", default=None, help="write the markdown report here")
    ap.add_argument("--render", default=None, help="only write the report of a previous run's --json rows "
                    "(give that run's other arguments too: the report shows them)")
    a = ap.parse_args(argv)
    unknown = [m for m in a.methods if m not in dict(ASVD_METHODS)]
    if unknown:
        ap.error(f"--methods: unknown {unknown} (known: {', '.join(m for m, _ in ASVD_METHODS)})")
    from ctc.eval.latency import machine_info

    info = machine_info()  # before any runtime pins threads
    torch.set_num_threads(a.threads)
    results: dict[str, Any] = json.loads(Path(a.render).read_text()) if a.render else {}
    for name in [] if a.render else a.models.split(","):
        b = {"smollm2": smollm2, "minilm": minilm}[name](a)
        b.ref = b.score(b.module)
        log(f"{name} dense: {b.ref}")
        results[name] = study_asvd(b, a) if a.study == "asvd" else study_depth(b, a)
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1, default=str))
    text = report(a.study, results, a, info)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
