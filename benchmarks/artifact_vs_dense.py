"""CPU latency of a compiled artifact's TVM library against its dense source model, built the same way.

Why: issue 11 asks whether a structurally compressed model (blocks removed, linears factorised,
attention quantized; e.g. examples/smollm2_structural_cpu.ctc) runs faster than the model it came
from through the TVM CPU target.  The artifact's ``targets/cpu`` library is loaded as built by
``ctc compile``; the dense source (the bundled model the recipe names, captured by ctc) is built
with the same fixed dimensions (the library's ``static_dims``: a fixed batch as well as a fixed
sequence length lets the lowering pack weight panels) and default schedules.  Both run the same tokens of the
Wikipedia evaluation split, timed interleaved in rounds (``cpu_latency.timeit``: median and min
of >= ``--runs`` calls each).  Sizes: parameter bytes of both modules and library bytes.

The machine may be shared: the load average before and after is printed; ratios from one
interleaved run are more trustworthy than absolute milliseconds.

Usage::

    ctc compile examples/smollm2_structural_cpu.ctc --out out/smollm2_structural_cpu
    python benchmarks/artifact_vs_dense.py out/smollm2_structural_cpu --seq 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_latency import timeit  # noqa: E402

import ctc  # noqa: E402
from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled  # noqa: E402
from ctc.eval import data as D  # noqa: E402
from ctc.eval.latency import machine_info  # noqa: E402
from ctc.frontends import load_bundled  # noqa: E402
from ctc.frontends.hf import capture_hf_model  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", help="a ctc artifact with a targets/cpu library built for a fixed --seq")
    ap.add_argument("--seq", type=int, default=128, help="tokens (the artifact's target seq_len)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="TVM threads (1 is steadiest on a shared machine)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.artifact)
    art = ctc.load(out)
    report = json.loads((out / "report.json").read_text())
    source = report["model"].get("source") or report["model"].get("name")
    name = "smollm2" if "smollm2" in json.dumps(report["model"]).lower() else "minilm"
    log(f"artifact {out} (source {source!r} -> bundled {name}), load average {os.getloadavg()[0]:.1f}")
    hf = load_bundled(name)
    dense = capture_hf_model(hf.model, name=name)
    ids = D.evaluation_windows(hf.tokenizer, "wiki", 1, a.seq)[0]["input_ids"][:, : a.seq]
    extra = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "position_ids": torch.arange(a.seq).unsqueeze(0)}
    feed = {v.name: extra[v.name] for v in dense.inputs}
    t0 = time.perf_counter()
    static = json.loads((out / "targets" / "cpu" / "model.json").read_text()).get("static_dims", {})
    if static.get("seq", a.seq) != a.seq:
        raise SystemExit(f"the artifact's library was built for seq {static['seq']}; pass --seq {static['seq']}")
    comp = compile_module(dense, options=BuildOptions(static_dims=static))  # built as the artifact's library was
    d = Path(tempfile.mkdtemp(prefix="ctc-dense-"))
    comp.export(d)
    log(f"built the dense source in {time.perf_counter() - t0:.0f}s")
    run_dense = load_compiled(d, threads=a.threads)
    run_art = load_compiled(out / "targets" / "cpu", threads=a.threads)
    art_feed = {v.name: extra[v.name] for v in art.module.inputs}
    pd = run_dense.prepare(*[feed[v.name] for v in dense.inputs])
    pa = run_art.prepare(*[art_feed[v.name] for v in art.module.inputs])
    lib_d = (d / "model.so").stat().st_size
    lib_a = (out / "targets" / "cpu" / "model.so").stat().st_size
    t = timeit({"dense": lambda: run_dense.run_prepared(pd), "artifact": lambda: run_art.run_prepared(pa)},
               a.runs, 2, a.rounds)
    (dm, dn), (am, an) = t["dense"], t["artifact"]
    info = machine_info()
    print(f"Machine: {info['cpu']}, {info['usable_cores']} usable cores; torch {info['torch']}, TVM {info['tvm']}; "
          f"{a.threads} TVM thread(s); load average after {os.getloadavg()[0]:.1f}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}; default schedules, batch 1, {a.seq} tokens, both built with "
          f"static dims {static}; median (min) of "
          f">= {a.runs} calls interleaved in {a.rounds} rounds (shared machine: ratios indicative).\n")
    print("| model | params | param MB | library MB | ms median (min) | / dense median (min) |")
    print("|---|---|---|---|---|---|")
    print(f"| dense {name} | {dense.param_count():,} | {dense.param_bytes() / 1e6:.1f} | {lib_d / 1e6:.1f} | "
          f"{dm:.1f} ({dn:.1f}) | 1.00 (1.00) |")
    print(f"| {out.name} | {art.module.param_count():,} | {art.module.param_bytes() / 1e6:.1f} | "
          f"{lib_a / 1e6:.1f} | {am:.1f} ({an:.1f}) | {am / dm:.2f} ({an / dn:.2f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
