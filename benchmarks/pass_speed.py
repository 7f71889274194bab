"""Time the passes of the example pipelines on the real bundled models (the IR layer's pass overhead).

    python benchmarks/pass_speed.py [--model minilm|smollm2|all] [--repeat 3]
    python benchmarks/pass_speed.py --trees OLD_TREE NEW_TREE [--model all] [--repeat 3]

One tree: captures each model, builds the calibration batches of its example recipe (wiki,
seed 0: 8 x 128 tokens for MiniLM as examples/minilm_w8a8.ctc, 4 x 128 for SmolLM2 as
examples/smollm2_cleanup.ctc), then runs that recipe's pipeline through the pass manager
``--repeat`` times (fidelity measurement off, IR verification on as in ``ctc compile``; rptq
computes its calibration statistics inside each run).  Prints min and median seconds per pass.

``--trees``: the same measurement for two source trees (e.g. main before and after a change),
each run in a child process with ``PYTHONPATH`` set to the tree, the two interleaved run by run
so that load on a shared machine hits both alike; prints both side by side with new/old ratios.
Timings on a loaded machine are noisy: compare medians, and re-run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PIPELINES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "minilm": [("canonicalize", {}), ("constant-fold", {}), ("cse", {}),
               ("rptq", {"w_bits": 8, "a_bits": 8, "clusters": 4}), ("dce", {})],
    "smollm2": [("canonicalize", {}), ("constant-fold", {}), ("cse", {"dedupe_params": True}), ("dce", {})],
}
CALIBRATION = {"minilm": (8, 128), "smollm2": (4, 128)}


def _load(name: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, task) of a bundled model, through whichever loader the tree has."""
    from ctc.frontends import load_bundled

    hf = load_bundled(name)
    info = getattr(hf, "info", None)  # trees before ctc.bundled: the task is on the loaded model
    return hf.model, hf.tokenizer, info.task if info is not None else hf.task


def measure(model_name: str, repeat: int) -> dict[str, Any]:
    """Per-pass seconds of ``repeat`` pipeline runs in this process (this tree)."""
    from ctc.eval import data
    from ctc.frontends import capture_hf_model
    from ctc.passes import get_pass
    from ctc.passes.manager import PassManager

    model, tok, task = _load(model_name)
    t0 = time.perf_counter()
    m = capture_hf_model(model, task=task, name=model_name)
    capture_s = time.perf_counter() - t0
    samples, seq_len = CALIBRATION[model_name]
    calib = data.model_batches(source="wiki", path=None, field=None, split="calibration", tokenizer=tok,
                               input_names=[v.name for v in m.inputs], samples=samples, seq_len=seq_len, seed=0,
                               batch_size=1)[0]
    pipeline = PIPELINES[model_name]
    times: dict[str, list[float]] = {n: [] for n, _ in pipeline}
    nodes_after = 0
    for _ in range(repeat):
        steps = [get_pass(n)(o) for n, o in pipeline]
        out, report = PassManager(steps, calibration=calib, fidelity=False, progress=False).run(m)
        for r in report.records:
            times[r.name].append(r.seconds)
        nodes_after = len(out.nodes)
    return {"model": model_name, "nodes": len(m.nodes), "nodes_after": nodes_after, "capture_s": capture_s,
            "times": times}


def _versions() -> str:
    import torch

    return f"python {platform.python_version()}, torch {torch.__version__}"


def _table(res: dict[str, Any]) -> list[str]:
    lines = [f"model {res['model']}: {res['nodes']} nodes -> {res['nodes_after']}; capture {res['capture_s']:.1f} s",
             f"{'pass':<14} {'min s':>9} {'median s':>9}"]
    for n, ts in res["times"].items():
        lines.append(f"{n:<14} {min(ts):>9.3f} {statistics.median(ts):>9.3f}")
    return lines


def _child(tree: Path, model_name: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--model", model_name, "--repeat", "1",
                          "--json"], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"pass_speed: the run in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(old: Path, new: Path, models: list[str], repeat: int) -> None:
    print(f"machine: {platform.node()}, {os.cpu_count()} cpus, load average {os.getloadavg()}; {_versions()}")
    print(f"protocol: per model, {repeat} interleaved child runs per tree (old, new, old, new, ...), one pipeline "
          "run each, fidelity off, verification on; seconds per pass as the pass manager records them")
    print(f"old: {old}\nnew: {new}")
    for name in models:
        runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
        for _ in range(repeat):
            runs["old"].append(_child(old, name))
            runs["new"].append(_child(new, name))
        o, n = runs["old"][0], runs["new"][0]
        print(f"\nmodel {name}: captured {o['nodes']} nodes (old) / {n['nodes']} (new); after the pipeline "
              f"{o['nodes_after']} / {n['nodes_after']}")
        print(f"{'pass':<14} {'old min':>9} {'old med':>9} {'new min':>9} {'new med':>9} {'med new/old':>12}")
        tot = {"old": [0.0] * repeat, "new": [0.0] * repeat}
        for p in o["times"]:
            ts = {k: [r["times"][p][0] for r in runs[k]] for k in runs}
            for k in ts:
                tot[k] = [a + b for a, b in zip(tot[k], ts[k], strict=True)]
            mo, mn = statistics.median(ts["old"]), statistics.median(ts["new"])
            print(f"{p:<14} {min(ts['old']):>9.3f} {mo:>9.3f} {min(ts['new']):>9.3f} {mn:>9.3f} "
                  f"{mn / mo if mo else float('nan'):>11.2f}x")
        mo, mn = statistics.median(tot["old"]), statistics.median(tot["new"])
        print(f"{'pipeline':<14} {min(tot['old']):>9.3f} {mo:>9.3f} {min(tot['new']):>9.3f} {mn:>9.3f} "
              f"{mn / mo if mo else float('nan'):>11.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm", choices=[*PIPELINES, "all"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--trees", nargs=2, type=Path, metavar=("OLD", "NEW"),
                    help="compare two source trees side by side (child processes)")
    ap.add_argument("--json", action="store_true", help="print one JSON line (used by --trees)")
    args = ap.parse_args(argv)
    models = list(PIPELINES) if args.model == "all" else [args.model]
    if args.trees:
        for t in args.trees:
            if not (t / "ctc" / "__init__.py").is_file():
                ap.error(f"--trees: {t} is not a ctc source tree (no ctc/__init__.py)")
        compare(args.trees[0].resolve(), args.trees[1].resolve(), models, args.repeat)
        return 0
    for name in models:
        res = measure(name, args.repeat)
        if args.json:
            print(json.dumps(res))
        else:
            print(f"machine: {platform.node()}, {os.cpu_count()} cpus; {_versions()}")
            print("\n".join(_table(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
