"""Accuracy of min-max per-tensor / per-channel quantization vs RPTQ on the bundled real models (issue 5).

For all-MiniLM-L6-v2 (sentence embeddings) and SmolLM2-135M (causal LM), each captured into ctc
IR, calibrated once on the Wikipedia calibration split, rewritten by the ``quantize`` or ``rptq``
pass, and evaluated with the ctc reference interpreter (the IR semantics: ``quant_linear`` with
integer codes and per-cluster activation scales):

* MiniLM: embedding cosine vs the FP32 IR on the Lee corpus documents (mean and minimum), and
  similarity agreement: Pearson/Spearman of the model's cosine with the 1225 human judgements;
  plus ONNX Runtime's own int8 dynamic quantization (``quantize_dynamic``, QInt8 weights,
  dynamic per-tensor uint8 activations) of the same model as a peer, accuracy and latency.
* SmolLM2: perplexity on consecutive windows of the Wikipedia evaluation split.

Every row uses the same per-output-channel symmetric RTN weights (unless marked GPTQ), so
the rows differ in how activations are quantized.  ``--quick`` shrinks the sample counts.
Run: ``python benchmarks/quant_accuracy.py [--models minilm,smollm2] [--out results.json]``.
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
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ctc.eval import data as D  # noqa: E402
from ctc.frontends import (
    capture,  # noqa: E402
    load_bundled,  # noqa: E402
)
from ctc.ir.graph import Module  # noqa: E402
from ctc.ir.interpreter import interpret  # noqa: E402
from ctc.passes.analyses.calibration import CalibrationStats  # noqa: E402
from ctc.passes.base import PassContext, get_pass  # noqa: E402

BITS = [("W8A8", 8, 8, 16), ("W4A8", 4, 8, 16), ("W4A4", 4, 4, 16), ("W4A8KV4", 4, 8, 4)]
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("per-tensor", "quantize", {"a_granularity": "tensor", "w_granularity": "channel"}),
    ("per-channel", "quantize", {"a_granularity": "channel", "w_granularity": "channel"}),
    ("RPTQ", "rptq", {"clusters": 8}),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class StatsCache:
    """Calibration statistics computed once on the base module and reused by every trial clone.

    A clone has the same value names, so the statistics describe it too; the context's
    documented ``invalidate(keep, source, module)`` moves the kept results to each new clone.
    """

    def __init__(self, base: Module, calib: list[dict[str, torch.Tensor]], hessian: bool):
        self.base = base
        self.cur = base
        self.ctx = PassContext(calibration=calib)
        self.ctx.get(CalibrationStats(), base)
        self.ctx.get(CalibrationStats(input_ops=("scaled_dot_product_attention",), operands=("k", "v")), base)
        if hessian:
            self.ctx.get(CalibrationStats(hessian=True), base)

    def quantized(self, pass_name: str, opts: dict[str, Any]) -> tuple[Module, list[str]]:
        """Run one quantization pass on a fresh clone of the base module."""
        m = self.base.clone()
        self.ctx.invalidate(keep=(CalibrationStats,), source=self.cur, module=m)
        self.cur = m
        n0 = len(self.ctx.notes)
        computed = len(self.ctx.computed)
        out = get_pass(pass_name)(opts).run(m, self.ctx)
        if len(self.ctx.computed) != computed:
            raise RuntimeError(f"{pass_name} recomputed calibration statistics: {self.ctx.computed[computed:]}")
        return out, self.ctx.notes[n0:]


# --------------------------------------------------------------------------- MiniLM
def minilm(n_docs: int, max_len: int, n_calib: int, calib_len: int, gptq: bool) -> dict[str, Any]:
    hf = load_bundled("minilm")
    model, tok = hf.model, hf.tokenizer
    docs = D.lee_test()[:n_docs]
    enc = [tok(d, truncation=True, max_length=max_len, return_tensors="pt") for d in docs]
    ex = {k: enc[0][k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    t0 = time.perf_counter()
    m = capture(model, ex, output="last_hidden_state", name="minilm")
    log(f"minilm captured in {time.perf_counter() - t0:.1f}s")
    names = [v.name for v in m.inputs]
    feeds = [{n: e[n] for n in names} for e in enc]
    calib = D.calibration_batches(tok, "wiki", n_calib, calib_len, seed=0)
    calib = [{n: (b[n] if n in b else torch.zeros_like(b["input_ids"])) for n in names} for b in calib]
    pairs = D.lee_similarity_pairs()

    def embed(fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> torch.Tensor:
        out = []
        for f in feeds:
            h = fn(f)
            mask = f["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(e, dim=-1)[0])
        return torch.stack(out)

    def agreement(e: torch.Tensor) -> tuple[float, float]:
        sims = e @ e.T
        model_s = torch.tensor([float(sims[i, j]) for i, j, _ in pairs if i < n_docs and j < n_docs])
        human = torch.tensor([h for i, j, h in pairs if i < n_docs and j < n_docs])
        return pearson(model_s, human), spearman(model_s, human)

    rows: list[dict[str, Any]] = []
    ref = embed(lambda f: interpret(m, f)[0])
    pr, sp = agreement(ref)
    rows.append({"model": "minilm", "bits": "FP32", "method": "FP32 (ctc IR)", "cos_mean": 1.0, "cos_min": 1.0,
                 "pearson": pr, "spearman": sp})
    log(f"minilm fp32: pearson {pr:.3f}")
    cache = StatsCache(m, calib, gptq)
    checked = False
    for bits, wb, ab, kvb in BITS:
        gptq_row = [("RPTQ+GPTQ", "rptq", {"clusters": 8, "gptq": True})] if gptq and bits == "W4A8" else []
        for label, pname, opts in list(METHODS) + gptq_row:
            t0 = time.perf_counter()
            extra: dict[str, Any] = {}
            if pname == "rptq":  # verify the folded float graph == original once per model (real layouts)
                extra = {"check_fold": not checked}
                checked = True
            q, notes = cache.quantized(pname, {**opts, "w_bits": wb, "a_bits": ab, "kv_bits": kvb, **extra})
            e = embed(lambda f, q=q: interpret(q, f)[0])
            cos = (e * ref).sum(-1)
            pr, sp = agreement(e)
            rows.append({"model": "minilm", "bits": bits, "method": label, "cos_mean": float(cos.mean()),
                         "cos_min": float(cos.min()), "pearson": pr, "spearman": sp,
                         "explicit_permutes": q.op_counts().get("channel_permute", 0)})
            log(f"minilm {bits} {label}: cos {float(cos.mean()):.4f} ({time.perf_counter() - t0:.0f}s)")
    rows += ort_peer(model, tok, docs, max_len, ref, agreement)
    return {"rows": rows, "protocol": (
        f"Lee corpus lee.cor: first {n_docs} documents, each truncated to {max_len} tokens (MiniLM tokenizer), "
        f"run one at a time; embedding = mean pooling over the mask + L2 norm; cosine vs the FP32 ctc IR; "
        f"agreement = Pearson/Spearman of embedding cosine vs the human similarity judgements over "
        f"{sum(1 for i, j, _ in pairs if i < n_docs and j < n_docs)} pairs. Calibration: {n_calib} random windows "
        f"of {calib_len} tokens from the Wikipedia calibration split (seed 0).")}


def ort_peer(model: Any, tok: Any, docs: list[str], max_len: int, ref: torch.Tensor,
             agreement: Callable[[torch.Tensor], tuple[float, float]]) -> list[dict[str, Any]]:
    """ONNX Runtime fp32 and int8 dynamic quantization of the same model: accuracy and latency."""
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rows = []
    with tempfile.TemporaryDirectory() as d:
        fp = Path(d) / "minilm.onnx"
        q8 = Path(d) / "minilm.int8.onnx"
        ex = tok(docs[0], truncation=True, max_length=max_len, return_tensors="pt")

        class Wrap(torch.nn.Module):
            def __init__(self, mdl: Any):
                super().__init__()
                self.m = mdl

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        token_type_ids: torch.Tensor) -> torch.Tensor:
                return self.m(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

        names = ["input_ids", "attention_mask", "token_type_ids"]
        torch.onnx.export(Wrap(model), tuple(ex[n] for n in names), str(fp), input_names=names,
                          output_names=["h"], dynamic_axes={n: {0: "b", 1: "s"} for n in [*names, "h"]},
                          opset_version=17, dynamo=False)
        quantize_dynamic(str(fp), str(q8), weight_type=QuantType.QInt8)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        for label, path in (("ONNX Runtime fp32", fp), ("ONNX Runtime int8 dynamic", q8)):
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            embs = []
            for doc in docs:
                e = tok(doc, truncation=True, max_length=max_len, return_tensors="np")
                h = torch.from_numpy(sess.run(None, {n: e[n].astype(np.int64) for n in names})[0])
                mask = torch.from_numpy(e["attention_mask"]).unsqueeze(-1).float()
                embs.append(torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)[0])
            emb = torch.stack(embs)
            cos = (emb * ref).sum(-1)
            pr, sp = agreement(emb)
            lat = ort_latency(sess, tok, names)
            rows.append({"model": "minilm", "bits": "W8A8 (dyn)" if "int8" in label else "FP32", "method": label,
                         "cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "pearson": pr, "spearman": sp,
                         "latency_ms": lat})
            log(f"{label}: cos {float(cos.mean()):.4f}, {lat:.1f} ms")
    return rows


def ort_latency(sess: Any, tok: Any, names: list[str], seq: int = 128, reps: int = 30) -> float:
    """Median latency (ms) of one batch-1, ``seq``-token input, 2 intra-op threads."""
    import numpy as np

    ids = np.full((1, seq), 1996, dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    for _ in range(3):
        sess.run(None, feed)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, feed)
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]


# --------------------------------------------------------------------------- SmolLM2
def smollm2(n_windows: int, seq_len: int, n_calib: int, calib_len: int) -> dict[str, Any]:
    hf = load_bundled("smollm2")
    model, tok = hf.model, hf.tokenizer
    calib = D.calibration_batches(tok, "wiki", n_calib, calib_len, seed=0)
    windows = D.evaluation_windows(tok, "wiki", n_windows, seq_len)
    from ctc.frontends.hf import capture_hf_model

    t0 = time.perf_counter()
    m = capture_hf_model(model, batch=1, seq_len=seq_len, name="smollm2")  # static dims on the fx path
    log(f"smollm2 captured in {time.perf_counter() - t0:.1f}s ({m.op_counts().get('linear')} linears)")
    names = [v.name for v in m.inputs]

    def feed(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = b["input_ids"]
        extra = {"attention_mask": torch.ones_like(ids), "position_ids": torch.arange(ids.shape[1]).unsqueeze(0)}
        return {n: (b[n] if n in b else extra[n]) for n in names}

    calib = [feed(b) for b in calib]
    evals = [feed(b) for b in windows]

    def ppl(q: Module) -> float:
        nll, cnt = 0.0, 0
        for b in evals:
            logits = interpret(q, b)[0][0]
            ids = b["input_ids"][0]
            nll += float(torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum"))
            cnt += ids.numel() - 1
        return math.exp(nll / cnt)

    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    p = ppl(m)
    rows.append({"model": "smollm2", "bits": "FP32", "method": "FP32 (ctc IR)", "ppl": p})
    log(f"smollm2 fp32 ppl {p:.2f} ({time.perf_counter() - t0:.0f}s)")
    cache = StatsCache(m, calib, False)
    checked = False
    for bits, wb, ab, kvb in BITS:
        for label, pname, opts in METHODS:
            t0 = time.perf_counter()
            extra: dict[str, Any] = {}
            if pname == "rptq":  # verify the folded float graph == original once (real layouts)
                extra = {"check_fold": not checked}
                checked = True
            q, _ = cache.quantized(pname, {**opts, "w_bits": wb, "a_bits": ab, "kv_bits": kvb, **extra})
            p = ppl(q)
            rows.append({"model": "smollm2", "bits": bits, "method": label, "ppl": p,
                         "explicit_permutes": q.op_counts().get("channel_permute", 0)})
            log(f"smollm2 {bits} {label}: ppl {p:.2f} ({time.perf_counter() - t0:.0f}s)")
    return {"rows": rows, "protocol": (
        f"Wikipedia evaluation split (gensim enwiki test file, split by article): the first {len(evals)} "
        f"consecutive non-overlapping windows of {seq_len} tokens (SmolLM2 tokenizer), each scored independently, "
        f"{len(evals) * (seq_len - 1)} tokens scored. Calibration: {n_calib} random windows of {calib_len} tokens "
        "from the calibration split (seed 0). The fold check (folded float graph == original on a calibration "
        "window) ran on the first RPTQ row.")}


# --------------------------------------------------------------------------- stats + table
def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    def rank(x: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(x.double(), stable=True)
        r = torch.empty(len(x), dtype=torch.float64)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        return r
    return pearson(rank(a), rank(b))


def table(results: dict[str, Any]) -> str:
    lines = []
    if "minilm" in results:
        lines += ["all-MiniLM-L6-v2 (ctc reference interpreter; ORT rows: ONNX Runtime)", "",
                  "| bits | method | cos mean | cos min | Pearson | Spearman | latency ms |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["minilm"]["rows"]:
            lat = f"{r['latency_ms']:.1f}" if "latency_ms" in r else ""
            lines.append(f"| {r['bits']} | {r['method']} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} | "
                         f"{r['pearson']:.3f} | {r['spearman']:.3f} | {lat} |")
        lines += ["", "Protocol: " + results["minilm"]["protocol"], ""]
    if "smollm2" in results:
        lines += ["SmolLM2-135M-Instruct (ctc reference interpreter)", "", "| bits | method | perplexity |",
                  "|---|---|---|"]
        for r in results["smollm2"]["rows"]:
            lines.append(f"| {r['bits']} | {r['method']} | {r['ppl']:.2f} |")
        lines += ["", "Protocol: " + results["smollm2"]["protocol"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--docs", type=int, default=25, help="Lee documents (MiniLM)")
    ap.add_argument("--max-len", type=int, default=96, help="tokens per Lee document")
    ap.add_argument("--windows", type=int, default=2, help="SmolLM2 evaluation windows")
    ap.add_argument("--seq-len", type=int, default=192, help="SmolLM2 window length")
    ap.add_argument("--calib", type=int, default=16, help="calibration windows")
    ap.add_argument("--calib-len", type=int, default=128, help="calibration window length")
    ap.add_argument("--gptq", action="store_true", help="add an RPTQ+GPTQ row at W4A8 (MiniLM)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    results: dict[str, Any] = {}
    models = a.models.split(",")
    if "minilm" in models:
        results["minilm"] = minilm(a.docs, a.max_len, a.calib, a.calib_len, a.gptq)
    if "smollm2" in models:
        results["smollm2"] = smollm2(a.windows, a.seq_len, a.calib, a.calib_len)
    print(table(results))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
