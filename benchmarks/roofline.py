"""Roofline of real artifacts on this CPU: MiniLM W8A8 (compiled, measured kernel times placed on the plot) and
SmolLM2 (modelled prefill vs decode).

Steps:

1. compile ``examples/minilm_w8a8_cpu.ctc`` with its cpu target built for ``--seq-len`` tokens
   (``--max-samples 4``: a quicker calibration, the same pipeline);
2. ``ctc analyze ART --target cpu --profile --seq-len N --html``: roofs measured on this machine (cached,
   ``--remeasure`` to take them again), the library's kernel times by group and its median latency;
3. ``ctc analyze`` on a SmolLM2 artifact (``--smollm2 DIR``, e.g. the one benchmarks/lm_eval_windows.py
   leaves in its ``--work`` folder; compiled from benchmarks/recipes/smollm2_w8_lm_eval.ctc when absent):
   prefill of ``--prompt`` tokens against one decode step after it.

Run::

    python benchmarks/roofline.py --seq-len 128 --prompt 256 --out benchmarks/results/roofline.md
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _ctc(*argv: str) -> str:
    from ctc.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(list(argv))
    if rc != 0:
        raise SystemExit(f"ctc {' '.join(argv)} exited {rc}")
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=128, help="MiniLM build and profile length")
    ap.add_argument("--prompt", type=int, default=256, help="SmolLM2 prefill length (decode reads this many)")
    ap.add_argument("--work", help="folder for the artifacts (default: a temporary one)")
    ap.add_argument("--smollm2", help="an existing SmolLM2 artifact to analyze")
    ap.add_argument("--remeasure", action="store_true", help="measure the CPU roofs again")
    ap.add_argument("--out", help="write the markdown result here (and the plot beside it)")
    args = ap.parse_args()

    from ctc.eval.latency import machine_info

    work = Path(args.work or tempfile.mkdtemp(prefix="roofline-"))
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "minilm_w8a8_cpu.ctc"
    text = (ROOT / "examples" / "minilm_w8a8_cpu.ctc").read_text()
    recipe.write_text(text.replace("target cpu ", f"target cpu seq_len={args.seq_len} ", 1))
    minilm = work / "minilm_w8a8_cpu"
    if not (minilm / "manifest.json").exists():
        log(f"compile {recipe.name} (cpu target, seq_len={args.seq_len})")
        _ctc("compile", str(recipe), "--out", str(minilm), "--quiet", "--max-samples", "4")
    html = Path(args.out).with_suffix(".html") if args.out else work / "roofline.html"
    log("analyze MiniLM with the profiler")
    extra = ["--remeasure"] if args.remeasure else []
    minilm_text = _ctc("analyze", str(minilm), "--target", "cpu", "--profile", "--seq-len", str(args.seq_len),
                       "--html", str(html), "--top", "8", "--quiet", *extra)
    minilm_json = json.loads(_ctc("analyze", str(minilm), "--target", "cpu", "--seq-len", str(args.seq_len),
                                  "--json", "--quiet"))
    smol = Path(args.smollm2) if args.smollm2 else work / "smollm2_w8"
    if not (smol / "manifest.json").exists():
        log("compile benchmarks/recipes/smollm2_w8_lm_eval.ctc")
        _ctc("compile", str(ROOT / "benchmarks" / "recipes" / "smollm2_w8_lm_eval.ctc"), "--out", str(smol),
             "--quiet")
    log("analyze SmolLM2 prefill and decode")
    smol_text = _ctc("analyze", str(smol), "--target", "cpu", "--seq-len", str(args.prompt), "--top", "6",
                     "--quiet")
    smol_json = json.loads(_ctc("analyze", str(smol), "--target", "cpu", "--seq-len", str(args.prompt), "--json",
                                "--quiet"))
    m = machine_info()
    rows = []
    for name, data in (("MiniLM W8A8", minilm_json), ("SmolLM2 W8", smol_json)):
        for ph in data["phases"]:
            rows.append(f"| {name} | {ph['name']} | {ph['flops'] / 1e9:.3f} | {ph['bytes'] / 1e6:.2f} | "
                        f"{ph['intensity']:.2f} | {ph['bound_ms']:.3f} | {ph['memory_bound_ms']:.3f} |")
    out = ["# Roofline of real artifacts on this CPU (`ctc analyze`)", "",
           f"Command: `python benchmarks/roofline.py --seq-len {args.seq_len} --prompt {args.prompt}`", "",
           f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, torch threads {m['torch_threads']}; the roofs "
           "and the latencies were measured while other work shared the machine (noisy: re-run on a quiet one).",
           "", "| model | phase | GFLOP | MB moved | FLOP/byte | roofline bound ms | of it memory-bound ms |",
           "|---|---|---:|---:|---:|---:|---:|", *rows, "",
           f"The script also writes the plot with the measured points as `{html.name}` beside its `--out` file (not "
           "kept in the repository; `ctc analyze ART --html FILE` writes the same page).", "",
           "## MiniLM W8A8, cpu target, with measured kernel groups", "", "```text", minilm_text.strip(), "```", "",
           f"## SmolLM2 W8: prefill of {args.prompt} tokens against one decode step", "", "```text",
           smol_text.strip(), "```", ""]
    result = "\n".join(out)
    print(result)
    if args.out:
        Path(args.out).write_text(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
