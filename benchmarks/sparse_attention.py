"""Energon sparse attention on SmolLM2-135M, real weights and real long text: accuracy and kernel latency.

Why: issue 13's yardstick.  For each sequence length and keep ratio, in one run:

* accuracy: perplexity of the whole model with ``sparse-attention`` applied to every layer
  (reference interpreter, the op's semantics) against the dense model, on consecutive windows of
  the bundled Wikipedia evaluation text (never the calibration part); and the cosine between the
  sparse and the dense attention output, per layer, on the real q/k/v of one window;
* latency: one attention call of a middle layer (real q/k/v) through ctc's compiled dense
  attention (the TVM build of ``scaled_dot_product_attention`` as the model capture gives it:
  a [1, 1, L, L] bool causal mask), ctc's sparse attention kernels (the TVM build of
  ``sparse_attention`` as the pass leaves it: ``is_causal`` plus the key-padding mask), and
  PyTorch SDPA with the same bool mask and with ``is_causal=True`` (torch's flash kernel);
  interleaved rounds, min and median wall time.  The crossover is the shortest length where
  the sparse kernel beats ctc's dense attention (and torch SDPA).

Usage (the table in benchmarks/results/attention.md)::

    python benchmarks/sparse_attention.py                       # lengths 256..2048, keep 0.5/0.25/0.125
    python benchmarks/sparse_attention.py --lengths 1024 --keeps 0.25 --runs 20 --threads 1
    python benchmarks/sparse_attention.py --rounds 8             # one 8-bit round instead of [4, 8]

The machine is shared: timings taken under load are noisy for every runtime alike (the load
average is printed); ratios from one interleaved run are the numbers to compare.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
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


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="256,512,1024,2048", help="sequence lengths (comma separated)")
    ap.add_argument("--keeps", default="0.5,0.25,0.125", help="final keep ratios (comma separated)")
    ap.add_argument("--rounds", default="4,8", help="bit width of each filtering round; earlier rounds keep "
                                                    "twice the next round's share")
    ap.add_argument("--min-keep", type=int, default=16, help="keys always kept per query (the pass default)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens scored for perplexity at every length")
    ap.add_argument("--layer", type=int, default=15, help="layer whose attention call is timed")
    ap.add_argument("--runs", type=int, default=12, help="timed calls per runtime and length")
    ap.add_argument("--rounds-timing", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, default=0, help="threads for TVM and torch (0 = every usable core)")
    ap.add_argument("--skip-ppl", action="store_true", help="latency and cosine only")
    ap.add_argument("--skip-latency", action="store_true", help="perplexity and cosine only (no builds)")
    ap.add_argument("--model", choices=("smollm2", "minilm"), default="smollm2",
                    help="minilm: Lee-document fidelity and human agreement (accuracy only)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sparse_attention.json"),
                    help="where to write the raw results (JSON)")
    return ap.parse_args()


def keep_schedule(final: float, rounds: int) -> list[float]:
    return [min(1.0, final * 2 ** (rounds - 1 - r)) for r in range(rounds)]


def capture_qkv(module: Any, feed: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """(q, k, v, mask) of every attention node, in order, from one interpreter run."""
    from ctc.ir.interpreter import interpret

    got: list[tuple[torch.Tensor, ...]] = []

    def obs(node: Any, args: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        if node.op == "scaled_dot_product_attention":
            got.append(tuple(a.clone() for a in args))

    interpret(module, feed, observer=obs)
    return got


def attention_module(op: str, h: int, hk: int, d: int, seq: int, attrs: dict[str, Any], rows: int | None = None
                     ) -> Any:
    """A one-node module: ``op`` on q, k, v and the mask the model gives it (``rows`` queries: a
    decode step is one query against ``seq`` cached keys, with no mask)."""
    from ctc.ir import Module, TensorType

    m = Module(op)
    q = m.add_input("q", TensorType((1, h, rows or seq, d), "f32"))
    k = m.add_input("k", TensorType((1, hk, seq, d), "f32"))
    v = m.add_input("v", TensorType((1, hk, seq, d), "f32"))
    if rows is not None:
        m.set_outputs([m.create_node(op, [q, k, v], attrs).output], ["out"])
        return m
    if op == "scaled_dot_product_attention":
        mask = m.add_input("mask", TensorType((1, 1, seq, seq), "bool"))
    else:
        mask = m.add_input("mask", TensorType((1, 1, 1, seq), "bool"))
    m.set_outputs([m.create_node(op, [q, k, v, mask], attrs).output], ["out"])
    return m


def build(module: Any, threads: int) -> Any:
    from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled

    d = tempfile.mkdtemp(prefix="ctc-sa-bench-")
    compile_module(module, options=BuildOptions()).export(d)
    return load_compiled(d, threads=threads)


def compiled_runner(model: Any, *inputs: torch.Tensor) -> Any:
    """A no-argument call of a compiled model on prepared inputs."""
    prepared = model.prepare(*inputs)
    return lambda: model.run_prepared(prepared)


def runners(dense_m: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, d: int
            ) -> dict[str, Any]:
    """ctc's compiled dense attention and torch SDPA (bool mask; is_causal) on one layer's q, k, v."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {"ctc dense": compiled_runner(dense_m, q, k, v, mask),
            "torch sdpa (mask)": lambda: sdpa(q, k, v, attn_mask=mask, scale=1 / math.sqrt(d), enable_gqa=True),
            "torch sdpa (is_causal)": lambda: sdpa(q, k, v, is_causal=True, scale=1 / math.sqrt(d), enable_gqa=True)}


def minilm_main(args: argparse.Namespace, keeps: list[float], rounds: list[int]) -> None:
    """all-MiniLM-L6-v2 with ``sparse-attention`` on every layer (reference interpreter): output
    fidelity (row cosine of the last hidden states over real tokens) and sentence-embedding cosine
    against the dense model, and the Lee human-similarity agreement of both, on the evaluation half
    of the Lee documents (one document per batch, up to 256 tokens: no padding)."""
    from ctc import frontends
    from ctc.eval import objectives as OBJ
    from ctc.eval.fidelity import cosine_rows
    from ctc.frontends import load_bundled
    from ctc.ir.interpreter import interpret
    from ctc.passes import get_pass
    from ctc.passes.manager import PassManager, Step

    hf = load_bundled("minilm")
    model, tok, info = hf.model, hf.tokenizer, hf.info
    module = frontends.capture_hf_model(model, task=info.task, name="minilm")
    obj = OBJ.similarity_objective(tok, "evaluation", [v.name for v in module.inputs])
    lens = [int(f["input_ids"].shape[1]) for f in obj.inputs]
    print(f"# sparse attention on all-MiniLM-L6-v2: {obj.description}; tokens per document "
          f"{min(lens)}..{max(lens)} (mean {statistics.fmean(lens):.0f}); rounds {rounds}, min_keep {args.min_keep}",
          flush=True)
    dense = [interpret(module, f)[0] for f in obj.inputs]
    base = obj.metric(dense)
    rows: dict[str, Any] = {"dense": base, "rounds": rounds, "min_keep": args.min_keep, "keeps": {}}
    print("\n| keep | hidden-state cosine | embedding cosine mean / min | Lee Pearson | Lee Spearman |")
    print("|---|---|---|---|---|")
    print(f"| dense | 1 | 1 | {base['pearson']:.4f} | {base['spearman']:.4f} |", flush=True)
    for keep in keeps:
        pm = PassManager([Step(get_pass("sparse-attention")({"rounds": rounds, "keep": keep_schedule(keep, len(rounds)),
                                                              "min_keep": args.min_keep}))],
                         progress=False, fidelity=False)
        sparse_module, _ = pm.run(module)
        outs = [interpret(sparse_module, f)[0] for f in obj.inputs]
        m = obj.metric(outs)
        hid = statistics.fmean(cosine_rows(d[0], o[0]) for d, o in zip(dense, outs, strict=True))
        ecos = [float(OBJ.sentence_embedding(f, o) @ OBJ.sentence_embedding(f, d))
                for f, d, o in zip(obj.inputs, dense, outs, strict=True)]
        rows["keeps"][str(keep)] = {**m, "hidden_cosine": hid, "embedding_cosine_mean": statistics.fmean(ecos),
                                    "embedding_cosine_min": min(ecos)}
        print(f"| {keep} | {hid:.5f} | {statistics.fmean(ecos):.5f} / {min(ecos):.5f} | {m['pearson']:.4f} | "
              f"{m['spearman']:.4f} |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


def main() -> None:
    args = parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    os.environ["TVM_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    if args.model == "minilm":
        minilm_main(args, [float(x) for x in args.keeps.split(",")], [int(x) for x in args.rounds.split(",")])
        return
    from cpu_latency import timeit

    from ctc import frontends
    from ctc.eval.data import describe_source, evaluation_windows
    from ctc.eval.latency import machine_info
    from ctc.eval.perplexity import batches_perplexity, module_logits_fn
    from ctc.frontends import load_bundled
    from ctc.ir.ops import get_op
    from ctc.passes import get_pass
    from ctc.passes.manager import PassManager, Step

    lengths = [int(x) for x in args.lengths.split(",")]
    keeps = [float(x) for x in args.keeps.split(",")]
    rounds = [int(x) for x in args.rounds.split(",")]
    t0 = time.time()
    hf = load_bundled("smollm2")
    model, tok, info = hf.model, hf.tokenizer, hf.info
    module = frontends.capture_hf_model(model, task=info.task, name="smollm2")
    print(f"# sparse attention on SmolLM2-135M ({info.title}); capture {time.time() - t0:.0f} s", flush=True)
    print(f"machine: {platform.node()}, {machine_info()['cpu']}, threads {threads}, load average "
          f"{os.getloadavg()[0]:.2f}; torch {torch.__version__}", flush=True)
    cfg = model.config
    h, hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    sparse_op = get_op("sparse_attention")
    results: dict[str, Any] = {"machine": machine_info(), "threads": threads, "rounds": rounds,
                               "min_keep": args.min_keep, "text": describe_source("wiki", "evaluation"),
                               "lengths": {}}
    for L in lengths:
        n_win = max(1, args.tokens // L)
        wins = evaluation_windows(tok, "wiki", n_win, L)
        res: dict[str, Any] = {"windows": len(wins), "keeps": {}}
        print(f"\n## length {L}: {len(wins)} window(s) of the evaluation text", flush=True)
        qkv = capture_qkv(module, wins[0])
        dense_out = [torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mk, scale=1 / math.sqrt(d),
                                                                      enable_gqa=True) for q, k, v, mk in qkv]
        if not args.skip_ppl:
            t1 = time.time()
            base = batches_perplexity(module_logits_fn(module), wins)
            res["ppl_dense"] = base.ppl
            res["protocol"] = base.protocol
            print(f"dense perplexity {base.ppl:.3f} ({base.n_tokens} tokens, {time.time() - t1:.0f} s)", flush=True)
        # latency: one layer's attention, every runtime interleaved
        q, k, v, mk = qkv[args.layer]
        pad = torch.ones(1, 1, 1, L, dtype=torch.bool)
        fns: dict[str, Any] = {}
        if not args.skip_latency:
            dense_m = build(attention_module("scaled_dot_product_attention", h, hk, d, L,
                                             {"scale": 1 / math.sqrt(d), "enable_gqa": True}), threads)
            fns = runners(dense_m, q, k, v, mk, d)
            # the sparse kernel with no filtering round: causal attention over every key, gathered
            # (what the kernel costs before selection pays anything back)
            um = build(attention_module("sparse_attention", h, hk, d, L, {
                "is_causal": True, "scale": 1 / math.sqrt(d), "enable_gqa": True}), threads)
            fns["ctc kernel unfiltered"] = compiled_runner(um, q, k, v, pad)
        for keep in keeps:
            attrs = {"is_causal": True, "scale": 1 / math.sqrt(d), "enable_gqa": True, "round_bits": tuple(rounds),
                     "keep_ratios": tuple(keep_schedule(keep, len(rounds))), "min_keep": args.min_keep}
            # accuracy of the op on every layer's real q/k/v (reference semantics) and of the kernel
            full = sparse_op.check_attrs(attrs)
            cos = []
            for (ql, kl, vl, _), ref in zip(qkv, dense_out, strict=True):
                y = sparse_op.ref(ql, kl, vl, pad, **full)
                cos.append(float(torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0)))
            entry: dict[str, Any] = {"cosine_mean": statistics.fmean(cos), "cosine_min": min(cos)}
            kcos = float("nan")
            if not args.skip_latency:
                sm = build(attention_module("sparse_attention", h, hk, d, L, attrs), threads)
                fns[f"ctc sparse {keep}"] = compiled_runner(sm, q, k, v, pad)
                kern = sm(q, k, v, pad)[0]
                kcos = float(torch.nn.functional.cosine_similarity(kern.flatten(), dense_out[args.layer].flatten(),
                                                                   dim=0))
                entry["kernel_cosine_layer"] = kcos
            if not args.skip_ppl:
                t1 = time.time()
                pm = PassManager([Step(get_pass("sparse-attention")({"rounds": rounds,
                                                                      "keep": keep_schedule(keep, len(rounds)),
                                                                      "min_keep": args.min_keep}))],
                                 progress=False, fidelity=False)
                sparse_module, _ = pm.run(module)
                p = batches_perplexity(module_logits_fn(sparse_module), wins)
                entry["ppl"] = p.ppl
                print(f"keep {keep}: perplexity {p.ppl:.3f} ({time.time() - t1:.0f} s)", flush=True)
            print(f"keep {keep}: attention-output cosine mean {entry['cosine_mean']:.5f} min {entry['cosine_min']:.5f}"
                  f" (kernel, layer {args.layer}: {kcos:.5f})", flush=True)
            res["keeps"][str(keep)] = entry
        results["lengths"][str(L)] = res
        if args.skip_latency:
            continue
        print(f"timing ({args.runs} runs, {args.rounds_timing} interleaved rounds, load average "
              f"{os.getloadavg()[0]:.2f})", flush=True)
        # the decode step at this cache length: the last query against every key, no mask
        qd = q[:, :, -1:].contiguous()
        dec = build(attention_module("scaled_dot_product_attention", h, hk, d, L,
                                     {"scale": 1 / math.sqrt(d), "enable_gqa": True}, rows=1), threads)
        fns["decode: ctc dense"] = compiled_runner(dec, qd, k, v)
        fns["decode: torch sdpa"] = (lambda qd=qd, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
            qd, k, v, scale=1 / math.sqrt(d), enable_gqa=True))
        for keep in keeps:
            attrs = {"scale": 1 / math.sqrt(d), "enable_gqa": True, "round_bits": tuple(rounds),
                     "keep_ratios": tuple(keep_schedule(keep, len(rounds))), "min_keep": args.min_keep}
            sd = build(attention_module("sparse_attention", h, hk, d, L, attrs, rows=1), threads)
            fns[f"decode: ctc sparse {keep}"] = compiled_runner(sd, qd, k, v)
        times = timeit(fns, runs=args.runs, warmup=2, rounds=args.rounds_timing)
        res["latency_ms"] = {k: {"median": med, "min": mn} for k, (med, mn) in times.items()}
        dense_med = times["ctc dense"][0]
        for k, (med, mn) in times.items():
            print(f"  {k:24s} median {med:9.2f} ms  min {mn:9.2f} ms  ctc dense / this {dense_med / med:5.2f}x",
                  flush=True)
        res["load_average_after"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results, keeps)


def _ms(lat: dict[str, Any], key: str) -> str:
    return f"{lat[key]['min']:.2f} / {lat[key]['median']:.2f}"


def print_table(results: dict[str, Any], keeps: list[float]) -> None:
    """The markdown tables of benchmarks/results/attention.md (latency as min / median ms)."""
    print(f"\nrounds {results['rounds']}, min_keep {results['min_keep']}\n")
    print("| length | keep | ppl dense | ppl sparse | change | attn cosine mean / min | kernel cosine (layer) |")
    print("|---|---|---|---|---|---|---|")
    for L, res in results["lengths"].items():
        for keep in keeps:
            e = res["keeps"][str(keep)]
            ppl_d, ppl_s = res.get("ppl_dense"), e.get("ppl")
            ch = f"{(ppl_s - ppl_d) / ppl_d * 100:+.2f}%" if ppl_d and ppl_s else "-"
            kc = f"{e['kernel_cosine_layer']:.4f}" if "kernel_cosine_layer" in e else "-"
            print(f"| {L} | {keep} | {ppl_d or float('nan'):.3f} | {ppl_s or float('nan'):.3f} | {ch} | "
                  f"{e['cosine_mean']:.4f} / {e['cosine_min']:.4f} | {kc} |")
    timed = {L: r for L, r in sorted(results["lengths"].items(), key=lambda x: int(x[0])) if "latency_ms" in r}
    if not timed:
        return
    bases = ("ctc dense", "ctc kernel unfiltered", "torch sdpa (is_causal)")
    print("\n| length | keep | ctc dense ms | ctc kernel unfiltered ms | sparse ms | torch mask ms | torch causal ms "
          "| ctc dense / sparse | unfiltered / sparse | torch causal / sparse |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    cross: dict[tuple[str, float], int | None] = {(b, k): None for b in bases for k in keeps}
    for L, res in timed.items():
        lat = res["latency_ms"]
        for keep in keeps:
            sp = lat[f"ctc sparse {keep}"]["median"]
            print(f"| {L} | {keep} | {_ms(lat, 'ctc dense')} | {_ms(lat, 'ctc kernel unfiltered')} | "
                  f"{_ms(lat, f'ctc sparse {keep}')} | {_ms(lat, 'torch sdpa (mask)')} | "
                  f"{_ms(lat, 'torch sdpa (is_causal)')} | "
                  + " | ".join(f"{lat[b]['median'] / sp:.2f}x" for b in bases) + " |")
            for base in bases:
                if cross[(base, keep)] is None and lat[base]["median"] > sp:
                    cross[(base, keep)] = int(L)
    print("\n| cache length | ctc dense decode ms | torch sdpa decode ms | " + " | ".join(
        f"sparse {k} ms" for k in keeps) + " |")
    print("|---|---|---|" + "---|" * len(keeps))
    for L, res in timed.items():
        lat = res["latency_ms"]
        print(f"| {L} | {_ms(lat, 'decode: ctc dense')} | {_ms(lat, 'decode: torch sdpa')} | "
              + " | ".join(_ms(lat, f"decode: ctc sparse {k}") for k in keeps) + " |")
    print()
    for (base, keep), L in cross.items():
        print(f"crossover vs {base}, keep {keep}: "
              + (f"sparse is faster from length {L}" if L else "sparse not faster at any measured length"))


if __name__ == "__main__":
    main()
