"""lm-eval against a real compressed artifact: does the `ctc` lm-eval model reproduce `ctc eval`'s perplexity on the
same windows, and what does lm-eval's own rolling protocol give on the same text?

Steps (one process, everything offline):

1. compile ``benchmarks/recipes/smollm2_w8_lm_eval.ctc`` (bundled SmolLM2-135M, RTN W8 per-channel weights,
   float activations; evaluation = the first ``--windows`` windows of ``--seq-len`` tokens of the bundled
   Wikipedia text's evaluation split);
2. ``ctc eval ART --no-baseline --json``: the artifact's perplexity on those windows (reference interpreter);
3. ``ctc eval ART --write-lm-eval-task DIR``, then lm-eval's ``simple_evaluate`` with the ``ctc`` model (torch
   backend) on that task: ``token_perplexity`` must equal step 2's number;
4. lm-eval's rolling protocol (``loglikelihood_rolling``, prefix token + disjoint windows of ``--seq-len``
   predicted tokens) on the same windows' text joined into one document: a different protocol, printed with
   its own token count, to show how much the protocol alone moves the number.

Run::

    python benchmarks/lm_eval_windows.py --windows 8 --seq-len 256 --out benchmarks/results/lm_eval_windows.md
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "benchmarks" / "recipes" / "smollm2_w8_lm_eval.ctc"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--work", help="folder for the artifact and task (default: a temporary one)")
    ap.add_argument("--out", help="write the markdown result here")
    args = ap.parse_args()

    import io
    from contextlib import redirect_stdout

    import lm_eval
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from ctc.artifact import load
    from ctc.cli import main as ctc_main
    from ctc.eval.lm_eval_adapter import CtcLM

    work = Path(args.work or tempfile.mkdtemp(prefix="lm_eval_windows-"))
    work.mkdir(parents=True, exist_ok=True)
    art_dir, task_dir = work / "smollm2_w8", work / "tasks"
    flags = ["--samples", str(args.windows), "--seq-len", str(args.seq_len)]
    t0 = time.perf_counter()
    reused = (art_dir / "manifest.json").exists()
    if not reused:
        log(f"compile {RECIPE.name} -> {art_dir}")
        assert ctc_main(["compile", str(RECIPE), "--out", str(art_dir), "--quiet"]) == 0
    compiled = "reused from --work" if reused else f"compiled in {time.perf_counter() - t0:.0f} s"

    log("ctc eval")
    buf = io.StringIO()
    t0 = time.perf_counter()
    with redirect_stdout(buf):
        assert ctc_main(["eval", str(art_dir), "--json", "--quiet", "--no-baseline", *flags]) == 0
    ours = json.loads(buf.getvalue())
    t_eval = time.perf_counter() - t0

    log("write the window task and run lm-eval")
    with redirect_stdout(io.StringIO()):
        assert ctc_main(["eval", str(art_dir), "--write-lm-eval-task", str(task_dir), *flags]) == 0
    t0 = time.perf_counter()
    lm = CtcLM(artifact=str(art_dir), max_length=str(args.seq_len))
    res = lm_eval.simple_evaluate(model=lm, tasks=["ctc_windows"],
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    theirs = res["results"]["ctc_windows"]["token_perplexity,none"]
    t_lmeval = time.perf_counter() - t0

    log("lm-eval's rolling protocol on the same text")
    rows = [json.loads(x) for x in (task_dir / "ctc_windows_windows.jsonl").read_text().splitlines()]
    doc = "".join(r["context"] + r["continuation"] for r in rows)
    n_tokens = len(lm.tok_encode(doc))
    t0 = time.perf_counter()
    (ll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (doc,), 0)], disable_tqdm=True)
    t_roll = time.perf_counter() - t0
    rolling = math.exp(-ll / n_tokens)

    art = load(art_dir)
    proto = art.report["protocol"]["evaluate"]
    rel = abs(theirs - ours["ppl"]) / ours["ppl"]
    lines = [
        "# lm-eval on a compressed SmolLM2 artifact: the `ctc` model reproduces `ctc eval`",
        "",
        f"Command: `python benchmarks/lm_eval_windows.py --windows {args.windows} --seq-len {args.seq_len}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"lm-eval {lm_eval.__version__}; timings are wall seconds on a machine shared with other work (noisy).",
        "",
        f"Artifact: `{RECIPE.relative_to(ROOT)}` (bundled SmolLM2-135M-Instruct, RTN W8 per-channel weights, float "
        f"activations), {compiled}.",
        "",
        "| protocol | tokenizer | windows x length | tokens scored | perplexity | seconds |",
        "|---|---|---|---:|---:|---:|",
        f"| `ctc eval` (reference interpreter): each window alone, all but its first token | {proto['tokenizer']} | "
        f"{ours['windows']} x {ours['seq_len']} | {ours['tokens_scored']} | {ours['ppl']:.4f} | {t_eval:.1f} |",
        f"| lm-eval `ctc` model, task `ctc_windows` (torch backend): the same windows | same | same | "
        f"{sum(r['scored'] for r in rows)} | {theirs:.4f} | {t_lmeval:.1f} |",
        f"| lm-eval rolling (`loglikelihood_rolling`): the same text as one document, prefix token + disjoint "
        f"windows of {args.seq_len} | same | - | {n_tokens} | {rolling:.4f} | {t_roll:.1f} |",
        "",
        f"Relative difference between the first two rows: {rel:.2e} (interpreter vs torch backend float "
        "rounding). The third row scores every token including each window's first, with one token of context "
        "carried across windows, so it is not the same number. That is why the protocol goes into every report.",
        "",
        f"Text: {proto['text']}; split {proto['split']}; stride {proto['stride']}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if rel < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
