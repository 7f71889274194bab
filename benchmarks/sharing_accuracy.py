"""Parameter sharing on the bundled real models (issue 12): share-blocks (FoldGPT) vs plain tying,
recursive with SVD-initialised LoRA vs without, each with and without healing, at unique-parameter ratios.

For SmolLM2-135M (causal LM) and all-MiniLM-L6-v2 (sentence embeddings), each captured into ctc
IR and calibrated once on random windows of the Wikipedia calibration split:

* ``share-blocks`` (FoldGPT: groups chosen by calibration similarity, mean-or-representative
  weights, closed-form per-channel coefficients) and plain tying (the same groups and shared
  weights, ``coefficients=none``);
* ``recursive`` with SVD-initialised LoRA of ``--rank`` and without LoRA: the fewest K-block tiles
  (smallest ``loops`` K that can reach the ratio) tied, cheapest first;
* each without healing and with ``--heal-seconds`` of distillation (last 2 blocks' outputs).

"Ratio" is the unique/original parameter ratio of the repeated blocks (embeddings and heads are
never shared); the achieved block ratio and the whole-model unique-parameter ratio are in the
table.  Accuracy is measured with the ctc reference interpreter on held-out text: SmolLM2
perplexity on the first consecutive windows of the Wikipedia evaluation split; MiniLM embedding
cosine vs the original IR on the Lee test documents and the Pearson/Spearman agreement of
embedding cosine with the human judgements.  ``--tvm`` adds, for the original and the unhealed
rows at the smallest ratio (healing changes values, not sizes or speed), the artifact's parameter
bytes (safetensors), the TVM CPU library bytes and its median/min latency (batch 1, seq 128,
default schedules; on a shared machine these are noisy).

Reproduce the table in benchmarks/results/sharing.md::

    nice python benchmarks/sharing_accuracy.py --models smollm2,minilm --out sharing.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctc.eval import data as D  # noqa: E402
from ctc.eval.fidelity import human_correlation, module_embeddings  # noqa: E402
from ctc.eval.latency import machine_info  # noqa: E402
from ctc.eval.perplexity import module_perplexity  # noqa: E402
from ctc.frontends import load_bundled  # noqa: E402
from ctc.frontends.hf import capture_hf_model  # noqa: E402
from ctc.ir.graph import Module  # noqa: E402
from ctc.passes.base import PassContext, get_pass  # noqa: E402
from ctc.passes.block_tying import BlockActivations  # noqa: E402
from ctc.passes.share_blocks import SubstitutionCosts  # noqa: E402

KEEP = (BlockActivations, SubstitutionCosts)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Runner:
    """One captured model, its calibration context and evaluation; runs a pass on a fresh clone each time.

    Block activations and substitution costs are computed once on the base module and moved to
    each clone (the documented ``invalidate(keep, source, module)``), so rows differ only in
    what their pass does with them.
    """

    def __init__(self, base: Module, calib: list[dict[str, torch.Tensor]]):
        self.base = base
        self.cur = base
        self.ctx = PassContext(calibration=calib)
        self.ratio: float | None = None  # the ratio a row with explicit groups stands for

    def run(self, pass_name: str, opts: dict[str, Any]) -> tuple[Module, dict[str, Any], list[str], float]:
        m = self.base.clone()
        self.ctx.invalidate(keep=KEEP, source=self.cur, module=m)
        self.cur = m
        self.ctx.metrics = {}
        n0 = len(self.ctx.notes)
        t0 = time.perf_counter()
        out = get_pass(pass_name)(opts).run(m, self.ctx)
        met = {**self.ctx.metrics, "target_ratio": opts.get("ratio", self.ratio)}
        return out, met, self.ctx.notes[n0:], time.perf_counter() - t0


# --------------------------------------------------------------------------- rows
Score = Callable[[Module, str, dict[str, Any], float], dict[str, Any]]


def method_rows(runner: Runner, ratio: float, rank: int, heal: dict[str, Any], score: Score,
                lora_inits: tuple[str, ...] = ("svd", "activation")) -> list[dict[str, Any]]:
    """The rows of one ratio: FoldGPT / plain tying / recursive + LoRA (paper's SVD init, activation-weighted
    SVD init; ``lora_inits`` picks which) / recursive without LoRA, each without and with healing."""
    rows = []
    runner.ratio = ratio
    for healed in (False, True) if any(heal.values()) else (False,):
        h = heal if healed else {}
        tag = " + healing" if healed else ""
        fold, met, notes, secs = runner.run("share-blocks", {"ratio": ratio, **h})
        rows.append(score(fold, "share-blocks (FoldGPT coefficients)" + tag, met, secs))
        groups = [g for g in met["groups"] if len(g) > 1]
        plain, met2, _, secs2 = runner.run("share-blocks", {"groups": groups, "coefficients": "none", **h})
        rows.append(score(plain, "plain tying (same groups, no coefficients)" + tag, met2, secs2))
        loras = [(rank, init, label) for init, label in (("svd", f"recursive + SVD LoRA r{rank}"),
                                                          ("activation", f"recursive + activation-weighted SVD "
                                                                         f"LoRA r{rank}")) if init in lora_inits]
        for r, init, label in [*loras, (0, "svd", "recursive, no LoRA")]:
            out = None
            for loops in (2, 3, 4, 5, 6):
                try:
                    out, met3, _, secs3 = runner.run("recursive", {"loops": loops, "rank": r, "lora_init": init,
                                                                   "ratio": ratio, **h})
                    break
                except Exception as e:  # noqa: BLE001 - the ratio is out of reach at this K: try a longer loop
                    if "cannot be reached" not in str(e) and "no run of" not in str(e):
                        raise
            if out is None:
                rows.append({"method": label + tag, "ratio": ratio, "note": "ratio out of reach"})
                continue
            rows.append(score(out, f"{label} K={loops}" + tag, met3, secs3))
        for row in rows[-(3 + len(loras)):]:
            row["target"] = ratio
    return rows


def scorer(model: str, base: Module, measure: Callable[[Module], dict[str, Any]],
           describe: Callable[[dict[str, Any]], str], a: argparse.Namespace) -> Score:
    """A row maker: accuracy (``measure``), sizes and ratios, pass and healing numbers, TVM numbers."""
    def score(m: Module, method: str, met: dict[str, Any], secs: float) -> dict[str, Any]:
        t = time.perf_counter()
        row = {"model": model, "method": method, **measure(m), "block_ratio": met.get("blocks_ratio", 1.0),
               "model_ratio": m.param_count() / base.param_count(), "unique_bytes": m.param_bytes(),
               "total_bytes": m.read_param_bytes(), "pass_s": secs, "groups": met.get("groups"),
               "heal": {k: v for k, v in (met.get("healing") or {}).items() if k != "loss_curve"} or None}
        log(f"{model} {method}: {describe(row)}, block ratio {row['block_ratio']:.3f} (pass {secs:.0f}s, "
            f"eval {time.perf_counter() - t:.0f}s)")
        if a.tvm and "healing" not in method and (not met or met.get("target_ratio") == min(a.ratios)):
            row.update(tvm_numbers(m, {"batch": 1, "seq": 128}, a))  # healing changes values, not structure
        return row
    return score


# --------------------------------------------------------------------------- SmolLM2
def smollm2(a: argparse.Namespace) -> dict[str, Any]:
    hf = load_bundled("smollm2")
    model, tok = hf.model, hf.tokenizer
    t0 = time.perf_counter()
    base = capture_hf_model(model, name="smollm2")
    log(f"smollm2 captured in {time.perf_counter() - t0:.0f}s")
    names = [v.name for v in base.inputs]
    calib, _ = D.model_batches(source="wiki", path=None, field=None, split="calibration", tokenizer=tok,
                               input_names=names, samples=a.calib, seq_len=a.calib_len, seed=0)
    evals, proto = D.model_batches(source="wiki", path=None, field=None, split="evaluation", tokenizer=tok,
                                   input_names=names, samples=a.windows, seq_len=a.seq_len, seed=0)

    def measure(m: Module) -> dict[str, Any]:
        return {"ppl": module_perplexity(m, evals)}

    score = scorer("smollm2", base, measure, lambda r: f"ppl {r['ppl']:.2f}", a)
    return {"rows": all_rows(base, calib, score, a), "protocol": (
        f"perplexity on the first {len(evals)} consecutive {a.seq_len}-token windows of the Wikipedia evaluation "
        f"split (gensim enwiki test file split by article; {proto['tokens']} tokens, SmolLM2 tokenizer), each window "
        f"scored alone; calibration: {a.calib} random {a.calib_len}-token windows of the calibration split (seed 0)")}


# --------------------------------------------------------------------------- MiniLM
def minilm(a: argparse.Namespace) -> dict[str, Any]:
    hf = load_bundled("minilm")
    model, tok = hf.model, hf.tokenizer
    base = capture_hf_model(model, name="minilm")
    names = [v.name for v in base.inputs]
    calib, _ = D.model_batches(source="wiki", path=None, field=None, split="calibration", tokenizer=tok,
                               input_names=names, samples=a.calib, seq_len=a.calib_len, seed=0)
    docs = D.lee_test()[: a.docs]
    human = torch.tensor(D.lee_similarities(), dtype=torch.float64)[: a.docs, : a.docs]
    feeds = []
    for d in docs:
        enc = tok(d, truncation=True, max_length=a.max_len, return_tensors="pt")
        feeds.append({n: enc[n] if n in enc else torch.zeros_like(enc["input_ids"]) for n in names})

    ref = module_embeddings(base, feeds)

    def measure(m: Module) -> dict[str, Any]:
        e = module_embeddings(m, feeds)
        cos = (e * ref).sum(-1)
        hc = human_correlation(e, human)
        return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "pearson": hc.pearson,
                "spearman": hc.spearman}

    score = scorer("minilm", base, measure, lambda r: f"cos {r['cos_mean']:.4f} pearson {r['pearson']:.3f}", a)
    return {"rows": all_rows(base, calib, score, a), "protocol": (
        f"Lee corpus lee.cor: first {len(docs)} documents truncated to {a.max_len} tokens, run one at a time; "
        "embedding = mean pooling + L2 norm; cosine vs the original ctc IR; agreement = Pearson/Spearman of "
        f"embedding cosine vs the human similarity judgements ({len(docs) * (len(docs) - 1) // 2} pairs); "
        f"calibration: {a.calib} random {a.calib_len}-token windows of the Wikipedia calibration split (seed 0)")}


# --------------------------------------------------------------------------- artifact / TVM numbers
def tvm_numbers(m: Module, dims: dict[str, int], a: argparse.Namespace) -> dict[str, Any]:
    """Artifact parameter bytes, TVM CPU library bytes and median latency (fixed-shape build)."""
    from ctc.artifact import save_params
    from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled

    with tempfile.TemporaryDirectory() as d:
        save_params(m.params, Path(d) / "params.safetensors")
        art = (Path(d) / "params.safetensors").stat().st_size
        t0 = time.perf_counter()
        comp = compile_module(m, options=BuildOptions(static_dims=dims))
        lib = comp.export(Path(d) / "cpu")
        build_s = time.perf_counter() - t0
        so = lib.stat().st_size
        run = load_compiled(Path(d) / "cpu", threads=a.threads)
        feed = {v.name: torch.ones(*[dims.get(s, s) if isinstance(s, str) else s for s in v.type.shape],
                                   dtype=torch.int64) for v in m.inputs}
        args = run.prepare(feed)
        for _ in range(3):
            run.run_prepared(args)
        ts = []
        for _ in range(a.runs):
            t = time.perf_counter()
            run.run_prepared(args)
            ts.append((time.perf_counter() - t) * 1e3)
    return {"artifact_param_bytes": art, "tvm_lib_bytes": so, "tvm_build_s": build_s,
            "latency_ms_median": statistics.median(ts), "latency_ms_min": min(ts)}


def all_rows(base: Module, calib: list[dict[str, torch.Tensor]], score: Score, a: argparse.Namespace
             ) -> list[dict[str, Any]]:
    """The original's row, then every method at every ratio, with and without healing."""
    runner = Runner(base, calib)
    heal = {"heal_seconds": a.heal_seconds, "heal_steps": a.heal_steps}
    heal = {**heal, "heal_lr": a.heal_lr} if any(heal.values()) else {}
    rows = [score(base, "original", {}, 0.0)]
    for r in a.ratios:
        rows += method_rows(runner, r, a.rank, heal, score, tuple(a.lora_inits))
    return rows


# --------------------------------------------------------------------------- table
def table(results: dict[str, Any], a: argparse.Namespace) -> str:
    lines = [f"machine: {json.dumps(results['machine'])}", f"command: {results['command']}", ""]
    for name, res in results["models"].items():
        is_lm = name == "smollm2"
        head = "| target | method | block ratio | model ratio | " + (
            "ppl |" if is_lm else "cos mean | cos min | Pearson | Spearman |") + \
            " unique MB | total MB | pass s | heal loss before -> after |"
        tvm = " artifact MB | TVM lib MB | latency ms (median/min) |" if a.tvm else ""
        lines += [f"### {name}", "", head + tvm, "|" + "---|" * ((head + tvm).count("|") - 1)]
        for r in res["rows"]:
            if "note" in r:
                lines.append(f"| {r.get('target', '')} | {r['method']} | {r['note']} |")
                continue
            acc = f"{r['ppl']:.2f} |" if is_lm else (f"{r['cos_mean']:.4f} | {r['cos_min']:.4f} | "
                                                    f"{r['pearson']:.3f} | {r['spearman']:.3f} |")
            h = r.get("heal") or {}
            hl = f"{h['loss_before']:.4g} -> {h['loss_after']:.4g} ({h['steps']} steps)" if h else ""
            line = (f"| {r.get('target', '')} | {r['method']} | {r['block_ratio']:.3f} | {r['model_ratio']:.3f} | "
                    f"{acc} {r['unique_bytes'] / 1e6:.1f} | {r['total_bytes'] / 1e6:.1f} | {r['pass_s']:.0f} | {hl} |")
            if a.tvm and "tvm_lib_bytes" in r:
                line += (f" {r['artifact_param_bytes'] / 1e6:.1f} | {r['tvm_lib_bytes'] / 1e6:.1f} | "
                         f"{r['latency_ms_median']:.1f} / {r['latency_ms_min']:.1f} |")
            lines.append(line)
        lines += ["", "Protocol: " + res["protocol"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,minilm")
    ap.add_argument("--ratios", default="0.8,0.6,0.5", type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank of the recursive rows")
    ap.add_argument("--heal-seconds", type=float, default=90.0,
                    help="healing wall-time budget per row (with --heal-steps 0 too: no healed rows)")
    ap.add_argument("--heal-steps", type=int, default=0, help="healing step budget (0 = time only)")
    ap.add_argument("--heal-lr", type=float, default=1e-3)
    ap.add_argument("--calib", type=int, default=8, help="calibration windows")
    ap.add_argument("--calib-len", type=int, default=128, help="calibration window length")
    ap.add_argument("--windows", type=int, default=4, help="SmolLM2 evaluation windows")
    ap.add_argument("--seq-len", type=int, default=256, help="SmolLM2 evaluation window length")
    ap.add_argument("--docs", type=int, default=50, help="Lee documents (MiniLM)")
    ap.add_argument("--max-len", type=int, default=128, help="tokens per Lee document")
    ap.add_argument("--tvm", action="store_true",
                    help="also build the original and the unhealed rows at the smallest ratio for the TVM CPU "
                         "target: artifact/library bytes, latency")
    ap.add_argument("--runs", type=int, default=20, help="timed TVM calls per row")
    ap.add_argument("--lora-inits", default="svd,activation", type=lambda s: s.split(","),
                    help="LoRA initialisations of the recursive rows (svd: the paper's; activation: "
                         "activation-weighted)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    results: dict[str, Any] = {"machine": machine_info(), "command": " ".join(sys.argv), "models": {}}
    for name in a.models.split(","):
        results["models"][name] = {"smollm2": smollm2, "minilm": minilm}[name](a)
        if a.out:
            Path(a.out).write_text(json.dumps(results, indent=1, default=str))
    print(table(results, a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
