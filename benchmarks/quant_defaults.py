"""Accuracy of the quantization passes with the options a user gets by default (issue 15).

Each row is a recipe pipeline run exactly as ``ctc compile`` runs it: the recipe's
``calibrate wiki`` statement with no options (the shipped calibration defaults), then the
pipeline's passes with only the options named in the row (everything else at its default),
then the measured metric on held-out text: the first consecutive windows of the Wikipedia
*evaluation* split, articles the calibration split never contains (``ctc.eval.data``).

* SmolLM2-135M: perplexity (``ctc.eval.perplexity``, the compile report's ``ppl``) and its
  change vs the float model on the same windows.
* all-MiniLM-L6-v2: fidelity (token-row cosine of ``last_hidden_state`` vs the float model,
  the compile report's ``fidelity``).

Every module runs on the ctc reference interpreter (the IR semantics: integer codes, per-cluster
activation scales).  ``--sensitivity`` adds a per-layer table: the perplexity with only one
kind of linear quantized (by its scope's last name, e.g. ``down_proj``) or only one block.

    python benchmarks/quant_defaults.py --model smollm2 --rows w8a8,w4a8
    python benchmarks/quant_defaults.py --model minilm --rows w8a8
    python benchmarks/quant_defaults.py --model smollm2 --row 'mine=rptq w_bits=8 a_bits=8 clusters=16'
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ctc import driver  # noqa: E402
from ctc.dsl import parse  # noqa: E402
from ctc.passes.base import get_pass  # noqa: E402
from ctc.tasks import TASK_CAUSAL_LM  # noqa: E402

# The shipped-defaults rows: only the bit widths are named.
ROWS = {
    "w8a8": "rptq w_bits=8 a_bits=8",
    "w4a8": "rptq w_bits=4 a_bits=8",
    "w8a8-tensor": "quantize w_bits=8 a_bits=8",
}
EVAL_TEXT = {"smollm2": "wiki", "minilm": "wiki"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def recipe_text(model: str, pipeline: str, calibrate: str, evaluate: str) -> str:
    """A recipe whose only non-default choices are the evaluation windows and the row's pipeline."""
    return (f'model bundled "{model}"\ncalibrate {calibrate}\nevaluate {evaluate}\n'
            f"pipeline {{\n    {pipeline}\n}}\n")


class Bench:
    """One model loaded and captured once; its calibration and evaluation batches; the float outputs."""

    def __init__(self, model: str, calibrate: str, evaluate: str):
        self.model, self.calibrate, self.evaluate = model, calibrate, evaluate
        recipe = parse(recipe_text(model, "dce", calibrate, evaluate))
        quiet = driver.Progress(False)
        t0 = time.perf_counter()
        self.loaded = driver.load_model(recipe, quiet)
        log(f"{model}: loaded and captured in {time.perf_counter() - t0:.0f}s")
        assert recipe.calibrate is not None and recipe.evaluate is not None
        self.calib, self.calib_protocol = driver.dataset_batches(recipe, recipe.calibrate, self.loaded)
        self.evalb, self.eval_protocol = driver.dataset_batches(recipe, recipe.evaluate, self.loaded)
        self.lm = self.loaded.task == TASK_CAUSAL_LM
        t0 = time.perf_counter()
        self.ref = self.outputs(self.loaded.module)
        self.eval_seconds = time.perf_counter() - t0
        self.ref_ppl = self.perplexity(self.ref) if self.lm else None
        log(f"{model}: float outputs in {self.eval_seconds:.0f}s" + (f", ppl {self.ref_ppl:.4f}" if self.lm else ""))

    def outputs(self, module: Any) -> list[list[Any]]:
        return driver._outputs(module, self.evalb, "eval", driver.Progress(False))

    def perplexity(self, outs: list[list[Any]]) -> float:
        return float(driver._perplexity(self.evalb, outs, "").ppl)

    def run(self, label: str, pipeline: str) -> dict[str, Any]:
        """Compile ``pipeline`` as a recipe would (the pass manager, the recipe's calibration) and measure it."""
        recipe = parse(recipe_text(self.model, pipeline, self.calibrate, self.evaluate))
        seed = int(recipe.calibrate.options.get("seed", 0)) if recipe.calibrate else 0
        t0 = time.perf_counter()
        module, report = driver.run_pipeline(self.loaded.module.clone(), recipe, self.calib, seed,
                                             driver.Progress(False))
        t_pipe = time.perf_counter() - t0
        got = self.outputs(module)
        fid = driver._compare(self.evalb, self.ref, got, logits=self.lm)
        row: dict[str, Any] = {"row": label, "pipeline": pipeline, "fidelity": float(fid.cosine),
                               "pipeline_s": round(t_pipe, 1), "notes": list(getattr(report, "notes", []))[-3:]}
        if self.lm:
            p = self.perplexity(got)
            assert self.ref_ppl is not None
            row.update(ppl=p, ppl_change=(p - self.ref_ppl) / self.ref_ppl)
        ppl = f"ppl {row['ppl']:.4f} ({100 * row['ppl_change']:+.2f}%) " if self.lm else ""
        log(f"{self.model} {label}: {ppl}fidelity {row['fidelity']:.5f} (pipeline {t_pipe:.0f}s)")
        return row


class CachedRuns:
    """One pass on fresh clones of the bench's module, the calibration statistics computed once and reused.

    Same statistics as a recipe's compile computes (one interpreter run over the same calibration
    batches); reused across clones, which keep the value names, through the context's documented
    ``invalidate(keep, source, module)``.  For the many runs of a sensitivity table.
    """

    def __init__(self, bench: Bench):
        from ctc.passes.analyses.calibration import CalibrationStats
        from ctc.passes.base import PassContext

        self.bench = bench
        self.ctx = PassContext(calibration=bench.calib, seed=0)
        self.cur = bench.loaded.module
        # One calibration run with every accumulator (X^T X, a row sample): its per-channel statistics are the
        # same as any narrower request's, so it answers those too (the extra accumulators go unread).
        full = CalibrationStats(hessian=True, reservoir=512)
        t0 = time.perf_counter()
        res = self.ctx.get(full, self.cur)
        per = self.ctx._cache[self.cur]  # benchmark only: alias the narrower requests' cache keys
        for h in (False, True):
            for r in ({}, {"reservoir": 512}):
                per.setdefault(CalibrationStats(hessian=h, **r).key(), res)
        log(f"calibration statistics (X^T X, 512-row samples) in {time.perf_counter() - t0:.0f}s")

    def run(self, label: str, pass_name: str, options: dict[str, Any], selector: Any) -> dict[str, Any]:
        from ctc.passes.analyses.calibration import CalibrationStats

        m = self.bench.loaded.module.clone()
        self.ctx.invalidate(keep=(CalibrationStats,), source=self.cur, module=m)
        self.cur = m
        self.ctx.selector = selector
        t0 = time.perf_counter()
        seen = len(self.ctx.notes)
        out = get_pass(pass_name)(options).run(m, self.ctx)
        t_pass = time.perf_counter() - t0
        for line in self.ctx.notes[seen:]:  # what clusters="auto" chose, per kind of activation
            if line.startswith(("rptq: clusters=auto", "rptq:   ", "rptq: W")):
                log(f"{label}: {line}")
        got = self.bench.outputs(out)
        fid = driver._compare(self.bench.evalb, self.bench.ref, got, logits=self.bench.lm)
        row: dict[str, Any] = {"row": label, "pipeline": f"{pass_name} {options} on {selector.describe()}",
                               "fidelity": float(fid.cosine), "pipeline_s": round(t_pass, 1)}
        choice = self.ctx.metrics.pop("rptq_cluster_choice", None)
        if choice:
            row["cluster_choice"] = choice
        if self.bench.lm:
            p = self.bench.perplexity(got)
            assert self.bench.ref_ppl is not None
            row.update(ppl=p, ppl_change=(p - self.bench.ref_ppl) / self.bench.ref_ppl)
        log(f"{label}: " + (f"ppl {row['ppl']:.4f} ({100 * row['ppl_change']:+.2f}%) " if self.bench.lm else "")
            + f"fidelity {row['fidelity']:.5f}")
        return row


def sensitivity(bench: Bench, step: str, by: str) -> list[dict[str, Any]]:
    """The metric with ``step`` (``pass opt=value ...``) applied to one kind of linear (its scope's last name)
    at a time (``by=kind``) or one block at a time (``by=block``), everything else float."""
    from ctc.passes.base import Selector

    recipe = parse(recipe_text(bench.model, step, bench.calibrate, bench.evaluate))
    st = recipe.pipeline[0]
    m = bench.loaded.module
    lins = [n for n in m.nodes if n.op == "linear" and n.block is not None]
    runs = CachedRuns(bench)
    out = []
    if by == "kind":
        for k in sorted({n.scope.rsplit(".", 1)[-1] for n in lins}):
            out.append({"what": k, **runs.run(f"only {k}", st.name, st.options, Selector(scopes=(f"*.{k}",)))})
    else:
        for b in sorted({int(n.block) for n in lins if n.block is not None}):
            out.append({"what": f"block {b}", **runs.run(f"only block {b}", st.name, st.options,
                                                         Selector(blocks=((b, b + 1),)))})
    return out


def table(bench: Bench, rows: list[dict[str, Any]]) -> str:
    lines = ["| row | pipeline | " + ("perplexity | vs fp32 | " if bench.lm else "") + "fidelity | pipeline s |",
             "|---|---|" + ("---:|---:|" if bench.lm else "") + "---:|---:|"]
    if bench.lm:
        lines.append(f"| fp32 | - | {bench.ref_ppl:.4f} | - | 1.00000 | - |")
    for r in rows:
        lm = f"{r['ppl']:.4f} | {100 * r['ppl_change']:+.2f}% | " if bench.lm else ""
        lines.append(f"| {r['row']} | `{r['pipeline']}` | {lm}{r['fidelity']:.5f} | {r['pipeline_s']} |")
    return "\n".join(lines)


def split_row(spec: str) -> tuple[str, str]:
    """``label=pipeline`` -> (label, pipeline): the label ends at the first ``=`` followed by a pass name, so a
    label may itself hold ``=`` (``'W4A8 clusters=1=rptq w_bits=4 clusters=1'``).  ("", "") when none is."""
    from ctc.passes.base import all_passes

    names = set(all_passes())
    for i, ch in enumerate(spec):
        if ch == "=" and spec[i + 1:].split(maxsplit=1)[:1] and spec[i + 1:].split(maxsplit=1)[0] in names:
            return spec[:i], spec[i + 1:]
    return "", ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=("smollm2", "minilm"))
    ap.add_argument("--rows", default="w8a8", help=f"comma-separated shipped-default rows: {', '.join(ROWS)}")
    ap.add_argument("--row", action="append", default=[], help="extra row 'label=pipeline text' (repeatable)")
    ap.add_argument("--cached-row", action="append", default=[],
                    help="extra row 'label=one pass step' run on statistics computed once (repeatable; faster)")
    ap.add_argument("--calibrate", default="wiki", help="the recipe's calibrate statement (default: no options)")
    ap.add_argument("--evaluate", default=None, help="the recipe's evaluate statement (default: wiki, 8 windows "
                    "of 256 tokens for smollm2, 16 of 128 for minilm)")
    ap.add_argument("--sensitivity", default=None, help="one pipeline step ('rptq w_bits=8 a_bits=8') to apply to "
                    "one kind of linear / one block at a time")
    ap.add_argument("--by", default="kind", choices=("kind", "block"), help="sensitivity per linear kind or block")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write rows as JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    evaluate = a.evaluate or ("wiki samples=8 seq_len=256" if a.model == "smollm2" else "wiki samples=16 seq_len=128")
    print(f"# machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"load {os.getloadavg()[0]:.1f}; torch {torch.__version__}; threads {a.threads}")
    # every row is read before the model loads: a typo fails now, not after an hour of calibration and rows
    for name in [r for r in a.rows.split(",") if r]:
        if name not in ROWS:
            ap.error(f"unknown row {name!r} (rows: {', '.join(ROWS)})")
    def read_row(flag: str, spec: str) -> tuple[str, str, list[Any]]:
        """(label, pipeline text, parsed steps) of one --row / --cached-row, every option checked; errors name it."""
        label, pipe = split_row(spec)
        if not pipe:
            ap.error(f"{flag} {spec!r}: write it as 'label=pipeline text' (the text starting with a pass name)")
        try:
            steps = parse(recipe_text(a.model, pipe, a.calibrate, evaluate)).pipeline
            for st in steps:
                get_pass(st.name)(st.options)
        except Exception as e:  # a recipe or option error: say which row, without a traceback
            ap.error(f"{flag} {spec!r}: {e}")
        return label, pipe, steps

    plain = [read_row("--row", spec)[:2] for spec in a.row]
    cached = [(r[0], r[2][0]) for r in (read_row("--cached-row", spec) for spec in a.cached_row)]
    bench = Bench(a.model, a.calibrate, evaluate)
    print(f"# calibration: {json.dumps(bench.calib_protocol)}")
    print(f"# evaluation: {json.dumps(bench.eval_protocol)}")
    rows = []
    for name in [r for r in a.rows.split(",") if r]:
        rows.append(bench.run(name, ROWS[name]))
    for label, pipe in plain:
        rows.append(bench.run(label, pipe))
    runs = CachedRuns(bench) if cached else None
    for label, st in cached:
        assert runs is not None
        rows.append(runs.run(label, st.name, st.options, st.selector()))
    print(table(bench, rows))
    sens = sensitivity(bench, a.sensitivity, a.by) if a.sensitivity else []
    if sens:
        print(f"\nper-layer sensitivity ({a.by}): {a.sensitivity}")
        print(table(bench, sens))
    if a.out:
        Path(a.out).write_text(json.dumps({"model": a.model, "ref_ppl": bench.ref_ppl, "rows": rows,
                                           "sensitivity": sens, "calibration": bench.calib_protocol,
                                           "evaluation": bench.eval_protocol}, indent=1, default=str))
    return 0 if all(math.isfinite(r.get("ppl", 0.0)) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
