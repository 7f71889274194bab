"""Perplexity of ctc's integer decode variants (int8/int4 weights, per-token int8 activations, int8/int4
KV cache, the GGUF's own Q4_1 tensors) against fp32 and llama.cpp, on the same held-out text.

Why: issue 15's accuracy yardsticks, measured on what is deployed.  Each ctc row is the compiled
static decode step (the CPU kernels, the packed weights, the quantized cache as written and read
step by step), fed the text one token per call (:func:`ctc.generate.teacher_forced_nll`), not a
full-sequence graph that simulates the cache.  The protocol is llama.cpp's ``llama-perplexity``:
the held-out wiki evaluation text (``ctc.eval.data.wiki_text("evaluation")``, never used for
calibration) is tokenized whole; the first ``--chunks`` windows of ``--ctx`` tokens are scored
independently, each on its second half (positions ``ctx/2 .. ctx-1`` predicted, the first half
as context); SmolLM2 adds no BOS.  The llama.cpp rows run the same text file through
``llama-perplexity`` (built by benchmarks/llamacpp.py) on the bundled Q4_1 GGUF and on a Q8_0
re-quantization made by its ``llama-quantize``.

The bundled SmolLM2 weights *are* the Q4_1 file de-quantized (ctc.bundled), so "fp32" here is
Q4_1's weights in fp32 arithmetic: llama.cpp's Q4_1 row differs from it by llama.cpp's own
arithmetic (activations rounded to 8-bit blocks in its dot products), ctc's ``gguf`` row should
match it to rounding.

Run (all rows, one process; ``--decode`` adds decode-step timing from benchmarks/cpu_decode.py)::

    python benchmarks/int_decode_accuracy.py --ctx 256 --chunks 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import llamacpp  # noqa: E402
from cpu_decode import PIPELINES, ctc_module  # noqa: E402

DEFAULT_ROWS = "ctc,ctc-w8a8,ctc-w8a8-body,ctc-w8,ctc-w4,ctc-gguf,ctc-kv8,ctc-kv4,ctc-w8a8-kv8"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def held_out_text(tok: Any, ctx: int, chunks: int, folder: Path) -> tuple[Path, torch.Tensor]:
    """The evaluation text as a file (for llama.cpp) and its first ``chunks`` windows of ``ctx`` tokens."""
    from ctc.eval.data import wiki_text

    need = ctx * chunks
    text = wiki_text("evaluation")
    n_chars = min(len(text), need * 8)
    ids = tok(text[:n_chars], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < need:
        raise SystemExit(f"the evaluation text holds {ids.numel()} tokens, fewer than {chunks} x {ctx}")
    path = folder / "wiki_eval.txt"
    path.write_text(text[:n_chars], encoding="utf-8")
    return path, ids[:need].reshape(chunks, ctx)


def ctc_perplexity(model: Any, key: str, windows: torch.Tensor, gguf: str, threads: int, folder: Path
                   ) -> dict[str, Any]:
    """Build the ``key`` pipeline's decode step for ``ctx`` positions and score ``windows`` through it."""
    from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled
    from ctc.generate import teacher_forced_nll

    label, steps = PIPELINES[key]
    ctx = int(windows.shape[1])
    t0 = time.perf_counter()
    m = ctc_module(model, ctx, steps, gguf)
    comp = compile_module(m, options=BuildOptions(static_dims={}))
    comp.export(folder / key)
    lib = load_compiled(folder / key, threads=threads)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    nll, count = 0.0, 0
    for w in windows:
        s, c = teacher_forced_nll(lib, w[None], ctx // 2)
        nll, count = nll + s, count + c
    eval_s = time.perf_counter() - t0
    return {"row": label, "key": key, "ppl": math.exp(nll / count), "tokens": count, "build_s": build_s,
            "eval_s": eval_s, "steps_per_s": windows.shape[0] * (ctx - 1) / eval_s,
            "int_kernels": comp.meta.get("int_kernels"), "param_mb": (m.param_bytes() or 0) / 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=256, help="tokens per window (llama-perplexity -c)")
    ap.add_argument("--chunks", type=int, default=4, help="windows scored")
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"ctc rows, from {', '.join(PIPELINES)}")
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here, row by row; rows already "
                    "there (same --ctx/--chunks) are not measured again")
    a = ap.parse_args(argv)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in PIPELINES]
    if bad:
        raise SystemExit(f"unknown rows {bad}; choose from {', '.join(PIPELINES)}")
    if a.ctx % 2 or a.ctx < 4 or a.chunks < 1:
        raise SystemExit("--ctx must be an even number >= 4 and --chunks >= 1")
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    import tvm

    from ctc.bundled import bundled_gguf_file
    from ctc.frontends import load_bundled

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print("# ctc integer decode accuracy (SmolLM2-135M-Instruct, perplexity on held-out wiki text)")
    print(f"machine: {cpu}, {os.cpu_count()} cpus, {platform.platform()}; load average {os.getloadavg()[0]:.2f}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, tvm {tvm.__version__}")
    print(f"protocol: llama-perplexity's: wiki evaluation split tokenized whole, first {a.chunks} windows of {a.ctx} "
          f"tokens, each scoring positions {a.ctx // 2}..{a.ctx - 1} ({a.chunks * (a.ctx // 2 - 1)} tokens in all; "
          f"llama.cpp scores {a.ctx // 2 - 1} per window too), no BOS; ctc rows: the compiled static decode step, one "
          f"token per call, {a.threads} threads")
    hf = load_bundled("smollm2")
    model, tok = hf.model, hf.tokenizer
    gguf = str(bundled_gguf_file("smollm2"))
    tmp = tempfile.TemporaryDirectory()
    folder = Path(tmp.name)
    text_path, windows = held_out_text(tok, a.ctx, a.chunks, folder)
    results: list[dict[str, Any]] = []
    if a.out and a.out.is_file():  # resume: rows measured by an earlier run with the same protocol
        results = [r for r in json.loads(a.out.read_text()) if r.get("ctx") == a.ctx and r.get("chunks") == a.chunks]
        log(f"resuming: {', '.join(r['key'] for r in results) or 'nothing'} already in {a.out}")

    def save(r: dict[str, Any]) -> None:
        results.append({**r, "ctx": a.ctx, "chunks": a.chunks})
        if a.out:
            a.out.write_text(json.dumps(results, indent=1))

    done = {r["key"] for r in results}
    for key in rows:
        if key in done:
            continue
        log(f"{key}: build + {a.chunks} x {a.ctx} decode steps")
        r = ctc_perplexity(model, key, windows, gguf, a.threads, folder)
        log(f"  ppl {r['ppl']:.4f} (build {r['build_s']:.0f} s, eval {r['eval_s']:.0f} s)")
        save(r)
    if not a.no_llama:
        bin_dir = llamacpp.ensure_built()
        q8 = llamacpp.quantize(bin_dir, Path(gguf), llamacpp.DEFAULT_CACHE / "smollm2-q8_0.gguf", "Q8_0", a.threads)
        for label, path in (("llama.cpp Q4_1 (bundled GGUF)", Path(gguf)), ("llama.cpp Q8_0 (requantized)", q8)):
            if label in done:
                continue
            log(f"{label}: llama-perplexity")
            p = llamacpp.perplexity(bin_dir, path, text_path, a.ctx, a.chunks, a.threads)
            save({"row": label, "key": label, "ppl": p["ppl"], "tokens": a.chunks * (a.ctx // 2 - 1),
                  "eval_s": p["seconds"], "param_mb": path.stat().st_size / 1e6})
    base = next((r["ppl"] for r in results if r["key"] == "ctc"), None)
    print(f"\n(load average after: {os.getloadavg()[0]:.2f})\n")
    print("| row | perplexity | vs ctc fp32 | tokens scored | file / params MB | build s | eval s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        rel = f"{100 * (r['ppl'] / base - 1):+.2f}%" if base else "-"
        build = f"{r['build_s']:.0f}" if r.get("build_s") is not None else "-"
        print(f"| {r['row']} | {r['ppl']:.4f} | {rel} | {r['tokens']} | {r['param_mb']:.1f} | {build} "
              f"| {r['eval_s']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
