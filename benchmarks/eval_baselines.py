"""Baseline accuracy and timing of the bundled real models on the bundled real text, with the protocol stated.

Prints one table: SmolLM2-135M perplexity (Lee background corpus first 512 tokens; Wikipedia evaluation split,
16 disjoint 512-token windows), all-MiniLM-L6-v2 correlation with the Lee human similarity
judgements, data/model load times and eager latencies, plus the machine they ran on.
These are the FP32 references that compressed artifacts are compared against.

    python benchmarks/eval_baselines.py [--threads 2] [--windows 16] [--cold] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ctc.eval import data
from ctc.eval import fidelity as F
from ctc.eval import perplexity as P
from ctc.eval.latency import machine_info, measure_latency
from ctc.frontends import load_bundled


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--windows", type=int, default=16, help="Wikipedia windows of 512 tokens (default 16)")
    ap.add_argument("--stride", type=int, default=512, help="Wikipedia window stride (default 512: disjoint)")
    ap.add_argument("--cold", action="store_true", help="also time cold wiki extraction and GGUF load (+~40 s)")
    ap.add_argument("--no-latency", action="store_true", help="skip the latency rows")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []

    def row(what: str, value: str, protocol: str, **extra: Any) -> None:
        rows.append({"what": what, "value": value, "protocol": protocol, **extra})
        print(f"  {what:<44} {value:>12}   {protocol}", flush=True)

    print("ctc evaluation baselines (FP32, eager PyTorch)")
    if args.cold:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            arts = data.wiki_articles(tmp)
            row("wiki extraction (cold)", f"{time.perf_counter() - t:.1f} s",
                f"extract_pages + filter_wiki of {data.WIKI_FILE}: {len(arts)} articles kept")
            t = time.perf_counter()
            hf = load_bundled("smollm2", cache_dir=tmp)
            info = hf.info
            row("SmolLM2 load from GGUF (cold)", f"{info.load_seconds:.1f} s",
                "Q4_1 GGUF de-quantised to fp32 + safetensors cache written")
    t = time.perf_counter()
    arts = data.wiki_articles()
    split = data.split_articles(arts)
    row("wiki articles (cached)", f"{time.perf_counter() - t:.2f} s",
        f"{len(arts)} articles: {len(split['calibration'])} calibration / {len(split['evaluation'])} evaluation, "
        f"{sum(len(a.text) for a in split['evaluation']):,} evaluation chars")

    hf = load_bundled("smollm2")
    lm, lm_tok, lm_info = hf.model, hf.tokenizer, hf.info
    row("SmolLM2 load", f"{lm_info.load_seconds:.1f} s", f"cache hit: {lm_info.cache_hit}, {lm_info.params:,} params")
    fn = P.torch_logits_fn(lm)
    lee = "\n\n".join(data.lee_background())  # ships with gensim: every host has it
    r = P.text_perplexity(fn, lm_tok, lee, 512, max_windows=1, source="gensim lee_background.cor")
    row("SmolLM2 ppl, Lee background first 512 tokens", f"{r.ppl:.3f}", r.protocol, result=r.to_dict())
    r = P.text_perplexity(fn, lm_tok, data.wiki_text("evaluation"), 512, args.stride, max_windows=args.windows,
                          source="wiki " + data.describe_source("wiki", "evaluation"))
    row(f"SmolLM2 ppl, wiki eval, {r.windows}x512 s{args.stride}", f"{r.ppl:.3f}", r.protocol, result=r.to_dict())
    row("  (time for that)", f"{r.seconds:.1f} s", f"{r.seconds / r.windows:.2f} s per window")

    hf = load_bundled("minilm")
    enc, enc_tok, enc_info = hf.model, hf.tokenizer, hf.info
    hfn = F.torch_hidden_fn(enc)
    t = time.perf_counter()
    emb = F.sentence_embeddings(hfn, enc_tok, data.lee_test(), max_length=enc_info.max_seq_len)
    secs = time.perf_counter() - t
    hc = F.human_correlation(emb, data.lee_similarities())
    proto = (f"gensim lee.cor 50 docs, mean-pool + L2, truncation {enc_info.max_seq_len} tokens, cosine vs "
             f"similarities0-1.txt over {hc.pairs} pairs i<j; {secs:.1f} s")
    row("MiniLM vs human, Pearson", f"{hc.pearson:.4f}", proto, result=hc.to_dict())
    row("MiniLM vs human, Spearman", f"{hc.spearman:.4f}", proto)

    if not args.no_latency:
        ids = enc_tok(data.lee_test()[0], truncation=True, max_length=128, padding="max_length",
                      return_tensors="pt")
        lat = measure_latency(lambda: enc(**ids), threads=args.threads, label="minilm b1 s128")
        row("MiniLM eager latency, batch 1 seq 128", f"{lat.median_ms:.1f} ms",
            f"{lat.protocol}; p90 {lat.p90_ms:.1f} ms", result=lat.to_dict())
        w = lm_tok(data.lee_test()[0], return_tensors="pt").input_ids[:, :128]
        lat = measure_latency(lambda: fn(w, torch.ones_like(w)), threads=args.threads, label="smollm2 b1 s128")
        row(f"SmolLM2 eager latency, batch 1 seq {w.shape[1]}", f"{lat.median_ms:.1f} ms",
            f"{lat.protocol}; p90 {lat.p90_ms:.1f} ms (full-sequence forward, no cache)", result=lat.to_dict())

    mi = machine_info()
    print(f"machine: {mi['cpu']} ({mi['usable_cores']} usable of {mi['logical_cores']} cores, "
          f"flags {' '.join(mi['cpu_flags'])}); torch {mi['torch']}, tvm {mi['tvm']}, "
          f"transformers {mi['transformers']}; {args.threads} threads")
    if args.json:
        args.json.write_text(json.dumps({"machine": mi, "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
