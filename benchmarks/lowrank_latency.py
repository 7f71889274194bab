"""Does low rank pay off in the TVM CPU backend?  ``lowrank_linear`` against the dense ``linear`` it replaces.

Two parts, both through ctc's TVM CPU target with default schedules (no tuning), fixed shapes:

* ``kernels``: each distinct linear shape of SmolLM2-135M (q/o 576x576, k/v 192x576, gate/up
  1536x576, down 576x1536), dense against its low-rank pair at the rank ``asvd`` gives a layer at
  each ``--ratios`` parameter ratio (``rank_for_ratio``; the lowering pads it to whole SIMD
  vectors), for ``--rows`` rows (128: a prefill, two matmuls; 1: a decode step, two GEMVs).
  Random weights: the time of a matmul does not depend on the values.
* ``model``: the bundled SmolLM2 captured by ctc, dense against ``asvd`` at ``--model-ratio``
  (activation-aware scaling, uniform ranks: the ranks decide the cost, and uniform ranks make
  the result independent of the sensitivity measurement), whole forward at ``--model-seqs``
  tokens (1 = one GEMV per linear, the per-token cost of decode without a KV cache), checked
  against the reference interpreter.

Every callable is timed interleaved in rounds (median and min of >= ``--runs`` calls;
``cpu_latency.timeit``).  The machine may be shared: the load average is printed, and ratios from
one interleaved run are more trustworthy than absolute milliseconds.

Usage::

    python benchmarks/lowrank_latency.py --out benchmarks/results/lowrank_latency.md
    python benchmarks/lowrank_latency.py --parts kernels --rows 128,1 --ratios 0.9,0.8,0.6
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_latency import shown_command, timeit  # noqa: E402

from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled  # noqa: E402
from ctc.ir import Module, TensorType  # noqa: E402
from ctc.ir.interpreter import interpret  # noqa: E402
from ctc.passes.lowrank import rank_for_ratio  # noqa: E402

SMOLLM2_SHAPES = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
                  "down 576x1536": (576, 1536)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def linear_module(rows: int, n: int, k: int, rank: int) -> Module:
    """``x [1, rows, k] -> [1, rows, n]``: a dense linear (rank 0) or a rank-``rank`` low-rank pair."""
    g = torch.Generator().manual_seed(0)
    m = Module("linear" if rank == 0 else "lowrank")
    x = m.add_input("x", TensorType((1, rows, k), "f32"))
    if rank:
        m.add_param("u", torch.randn(n, rank, generator=g) * rank ** -0.5)
        m.add_param("v", torch.randn(rank, k, generator=g) * k ** -0.5)
        y = m.create_node("lowrank_linear", {"x": x, "u": m.param("u"), "v": m.param("v")}, {"rank": rank})
    else:
        m.add_param("w", torch.randn(n, k, generator=g) * k ** -0.5)
        y = m.create_node("linear", {"x": x, "weight": m.param("w")})
    m.set_outputs([y.output], ["y"])
    return m


def build(m: Module, feed: dict[str, torch.Tensor], tmp: Path, threads: int
          ) -> tuple[Callable[[], Any], float, int]:
    """A fixed-shape CPU build of ``m``: (timed call, max |TVM - interpreter|, library bytes)."""
    static = {d: int(feed[v.name].shape[i]) for v in m.inputs for i, d in enumerate(v.type.shape)
              if isinstance(d, str)}
    comp = compile_module(m, options=BuildOptions(static_dims=static))
    d = tmp / f"m{len(list(tmp.iterdir()))}"
    comp.export(d)
    run = load_compiled(d, threads=threads)
    args = tuple(feed[v.name] for v in m.inputs)
    err = float((torch.as_tensor(run(*args)[0]) - interpret(m, feed)[0]).abs().max())
    prep = run.prepare(*args)
    lib = sum(f.stat().st_size for f in d.iterdir())
    return (lambda: run.run_prepared(prep)), err, lib


def kernels(a: argparse.Namespace, tmp: Path) -> list[str]:
    lines = ["## Kernels: one SmolLM2 linear, dense vs its low-rank pair", "",
             "| rows | shape (n x k) | ratio | rank (padded) | dense ms (min) | low-rank ms (min) | "
             "low-rank / dense (median) | (min) | FLOP ratio |", "|---|---|---|---|---|---|---|---|---|"]
    from ctc.backends.tvm import targets as T
    from ctc.backends.tvm.schedules import vector_lanes

    lanes = vector_lanes(T.resolve("cpu", None).target(), 32)
    for rows in a.rows:
        for label, (n, k) in SMOLLM2_SHAPES.items():
            x = torch.randn(1, rows, k, generator=torch.Generator().manual_seed(1))
            fns: dict[str, Callable[[], Any]] = {}
            fns["dense"], _, _ = build(linear_module(rows, n, k, 0), {"x": x}, tmp, a.threads)
            ranks = {}
            for ratio in a.ratios:
                r = rank_for_ratio(n, k, ratio)
                fns[f"r{ratio}"], err, _ = build(linear_module(rows, n, k, r), {"x": x}, tmp, a.threads)
                ranks[ratio] = (r, -(-r // lanes) * lanes)  # as the lowering pads it
                if err > 1e-3:
                    raise SystemExit(f"{label} rank {r}: TVM disagrees with the interpreter (max error {err:.2e})")
            t = timeit(fns, a.runs, 3, a.rounds)
            dm, dn = t["dense"]
            for ratio, (r, rp) in ranks.items():
                m, mn = t[f"r{ratio}"]
                flops = rp * (n + k) / (n * k)
                lines.append(f"| {rows} | {label} | {ratio} | {r} ({rp}) | {dm:.3f} ({dn:.3f}) | {m:.3f} ({mn:.3f}) | "
                             f"{m / dm:.2f} | {mn / dn:.2f} | {flops:.2f} |")
            log(f"kernels rows {rows} {label}: {t}")
    return lines


def model(a: argparse.Namespace, tmp: Path) -> list[str]:
    from ctc.eval import data as D
    from ctc.frontends import load_bundled
    from ctc.frontends.hf import capture_hf_model
    from ctc.passes.base import PassContext, get_pass

    _loaded = load_bundled("smollm2")
    hf, tok = _loaded.model, _loaded.tokenizer
    t0 = time.perf_counter()
    dense = capture_hf_model(hf, name="smollm2")
    log(f"captured SmolLM2 in {time.perf_counter() - t0:.0f}s")
    calib = [{"input_ids": b["input_ids"], "attention_mask": torch.ones_like(b["input_ids"])}
             for b in D.calibration_batches(tok, "wiki", 2, 128, seed=0)]
    low = get_pass("asvd")({"ratio": a.model_ratio, "scaling": "abs_mean", "allocation": "uniform"}).run(
        dense.clone(), PassContext(calibration=calib))
    ranks = sorted({int(n.attrs["rank"]) for n in low.nodes if n.op == "lowrank_linear"})
    log(f"asvd {a.model_ratio}: {low.op_counts().get('lowrank_linear')} low-rank linears, ranks {ranks}")
    text = D.evaluation_windows(tok, "wiki", 1, max(a.model_seqs))[0]["input_ids"]
    lines = [f"## Model: SmolLM2-135M dense vs asvd at parameter ratio {a.model_ratio} (uniform ranks {ranks})", "",
             "| tokens | dense ms (min) | low-rank ms (min) | low-rank / dense (median) | (min) | "
             "max abs err dense / low-rank (TVM vs interpreter) | library MB dense / low-rank |",
             "|---|---|---|---|---|---|---|"]
    for seq in a.model_seqs:
        ids = text[:, :seq]
        feed = {v.name: {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                         "position_ids": torch.arange(seq).unsqueeze(0)}[v.name] for v in dense.inputs}
        fd, ed, ld = build(dense, feed, tmp, a.threads)
        fl, el, ll = build(low, feed, tmp, a.threads)
        log(f"built seq {seq} (errors {ed:.1e} / {el:.1e})")
        t = timeit({"dense": fd, "low": fl}, a.runs, 2, a.rounds)
        (dm, dn), (m, mn) = t["dense"], t["low"]
        lines.append(f"| {seq} | {dm:.2f} ({dn:.2f}) | {m:.2f} ({mn:.2f}) | {m / dm:.2f} | {mn / dn:.2f} | "
                     f"{ed:.1e} / {el:.1e} | {ld / 1e6:.0f} / {ll / 1e6:.0f} |")
        log(f"model seq {seq}: {t}")
    params = (dense.param_bytes() / 1e6, low.param_bytes() / 1e6)
    lines += ["", f"Parameter MB (fp32): dense {params[0]:.1f}, low-rank {params[1]:.1f} (the tied embedding/LM head "
              "and norms are not factorised)."]
    return lines


def main(argv: list[str] | None = None) -> int:
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="kernels,model", help="kernels, model, or both (comma-separated)")
    ap.add_argument("--rows", type=ints, default=[128, 1], help="rows of the kernel inputs")
    ap.add_argument("--ratios", type=floats, default=[0.9, 0.8, 0.6], help="parameter ratios of the kernels")
    ap.add_argument("--model-ratio", type=float, default=0.8)
    ap.add_argument("--model-seqs", type=ints, default=[128, 1], help="tokens of the whole-model inputs")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="TVM threads (1 is steadiest on a shared machine)")
    ap.add_argument("--out", default=None, help="write the markdown report here")
    a = ap.parse_args(argv)
    from ctc.eval.latency import machine_info

    info = machine_info()
    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="ctc-lowrank-"))
    shown = shown_command(argv if argv is not None else sys.argv[1:])
    lines = ["# Low rank in the TVM CPU backend (issue 11)", "",
             f"Command: `python benchmarks/lowrank_latency.py {shown}`", "",
             f"Machine: {info['cpu']}, {info['usable_cores']} usable cores; torch {info['torch']}, TVM {info['tvm']}; "
             f"{a.threads} TVM thread(s); load average before {os.getloadavg()[0]:.1f}; measured "
             f"{time.strftime('%Y-%m-%d %H:%M')}. Default schedules, fixed shapes; median (min) of >= {a.runs} calls "
             f"interleaved in {a.rounds} rounds. Shared machine: absolute times are noisy, ratios indicative.", ""]
    parts = a.parts.split(",")
    if "kernels" in parts:
        lines += kernels(a, tmp) + [""]
    if "model" in parts:
        lines += model(a, tmp) + [""]
    lines.append(f"Load average after: {os.getloadavg()[0]:.1f}.")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
