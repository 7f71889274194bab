"""ACT attention calibration on the bundled models: the task metric before and after, on held-out real data.

Why: issue 13's yardstick for ``calibrate-attention``.  For each model and task, the pass searches
heads on the task's calibration data (reference interpreter, real weights), and the task metric is
measured before and after on data the search never saw:

* SmolLM2-135M, ``lm``: perplexity on consecutive windows of the Wikipedia evaluation text (the
  search uses random windows of the calibration text);
* SmolLM2-135M, ``polarity``: zero-shot pang_lee accuracy by log-likelihood on the evaluation
  half of the sentences (the search uses the other half);
* all-MiniLM-L6-v2, ``similarity``: Pearson/Spearman agreement of embedding cosines with the Lee
  human judgements over the pairs of the evaluation half of the documents (the search uses the
  pairs of the other half); the all-50-documents score is printed too, marked as overlapping.

Usage (the table in benchmarks/results/attention.md)::

    python benchmarks/act_calibration.py
    python benchmarks/act_calibration.py --runs smollm2:lm --budget 32 --cal-windows 4 --cal-len 256

Wall times are from a shared, loaded machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="smollm2:lm,smollm2:polarity,minilm:similarity",
                    help="model:task pairs (comma separated)")
    ap.add_argument("--budget", type=int, default=16, help="heads evaluated one by one (pass option budget)")
    ap.add_argument("--threshold", type=float, default=10.0, help="sink threshold x uniform share (pass option)")
    ap.add_argument("--beta", type=float, default=0.4, help="factor on sinks (pass option; ACT: 0.4)")
    ap.add_argument("--samples", type=int, default=0, help="task examples in the search (0 = all of the half)")
    ap.add_argument("--cal-windows", type=int, default=2, help="lm: calibration windows")
    ap.add_argument("--cal-len", type=int, default=256, help="lm: calibration window length")
    ap.add_argument("--eval-windows", type=int, default=8, help="lm: evaluation windows")
    ap.add_argument("--eval-len", type=int, default=256, help="lm: evaluation window length")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = every usable core)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "act_calibration.json"))
    return ap.parse_args()


def outputs(module: Any, inputs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    from ctc.ir.interpreter import interpret

    return [interpret(module, feed)[0] for feed in inputs]


def evaluate(model_name: str, task: str, module: Any, tok: Any, args: argparse.Namespace) -> dict[str, float]:
    """The task metric of ``module`` on the held-out data."""
    from ctc.eval import objectives as OBJ
    from ctc.eval.data import evaluation_windows, lee_similarity_pairs
    from ctc.eval.perplexity import batches_perplexity, module_logits_fn

    names = [v.name for v in module.inputs]
    if task == "lm":
        wins = evaluation_windows(tok, "wiki", args.eval_windows, args.eval_len)
        r = batches_perplexity(module_logits_fn(module), wins)
        return {"ppl": r.ppl, "nll": r.nll, "tokens": float(r.n_tokens)}
    if task == "polarity":
        obj = OBJ.polarity_objective(tok, "evaluation", names)
        return obj.metric(outputs(module, obj.inputs))
    obj = OBJ.similarity_objective(tok, "evaluation", names)
    res = obj.metric(outputs(module, obj.inputs))
    # all 50 documents (overlaps the search's half)
    both = [OBJ.similarity_objective(tok, s, names) for s in ("calibration", "evaluation")]
    embs: dict[int, torch.Tensor] = {}
    for ob in both:
        for i, feed, h in zip(ob.extra["documents"], ob.inputs, outputs(module, ob.inputs), strict=True):
            embs[i] = OBJ.sentence_embedding(feed, h)
    pairs = lee_similarity_pairs()
    sims = torch.stack([embs[a] @ embs[b] for a, b, _ in pairs])
    human = torch.tensor([x for _, _, x in pairs], dtype=torch.float64)
    res["pearson_all50"] = OBJ.pearson(sims, human)
    res["spearman_all50"] = OBJ.spearman(sims, human)
    return res


def main() -> None:
    args = parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    from ctc import frontends
    from ctc.eval.data import calibration_batches
    from ctc.frontends import load_bundled
    from ctc.passes import get_pass
    from ctc.passes.manager import PassManager, Step

    print(f"# ACT attention calibration (threshold {args.threshold}, beta {args.beta}, budget {args.budget}); "
          f"threads {threads}, load average {os.getloadavg()[0]:.2f}", flush=True)
    results: list[dict[str, Any]] = []
    loaded: dict[str, Any] = {}
    for run in args.runs.split(","):
        model_name, task = run.split(":")
        if model_name not in loaded:
            hf = load_bundled(model_name)
            model, tok, info = hf.model, hf.tokenizer, hf.info
            loaded[model_name] = (frontends.capture_hf_model(model, task=info.task, name=model_name,
                                                             source=info.loaded_from), tok)
        module, tok = loaded[model_name]
        calib = (calibration_batches(tok, "wiki", args.cal_windows, args.cal_len, 0) if task == "lm" else [])
        t0 = time.time()
        before = evaluate(model_name, task, module, tok, args)
        t_eval = time.time() - t0
        print(f"\n## {model_name} / {task}: before {before} ({t_eval:.0f} s)", flush=True)
        opts = {"task": task, "budget": args.budget, "threshold": args.threshold, "beta": args.beta,
                "samples": args.samples}
        t0 = time.time()
        pm = PassManager([Step(get_pass("calibrate-attention")(opts))], calibration=calib, progress=False,
                         fidelity=False)
        out, report = pm.run(module)
        t_search = time.time() - t0
        rec = report.records[0]
        for line in rec.notes:
            print(line, flush=True)
        after = evaluate(model_name, task, out, tok, args)
        print(f"after {after} (search {t_search:.0f} s)", flush=True)
        results.append({"model": model_name, "task": task, "before": before, "after": after,
                        "search_seconds": t_search, "options": opts,
                        "calibration": {k: rec.metrics[k] for k in ("task_description", "loss_before", "loss_after",
                                                                    "heads_evaluated", "heads", "candidates")}})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("\n| model | task | metric | before | after | change | heads chosen (evaluated) "
          "| calib. loss before -> after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        c = r["calibration"]
        for k, b in r["before"].items():
            if k in ("tokens", "sentences", "pairs"):
                continue
            a = r["after"][k]
            print(f"| {r['model']} | {r['task']} | {k} | {b:.4f} | {a:.4f} | {a - b:+.4f} | {len(c['heads'])} "
                  f"({c['heads_evaluated']}) | {c['loss_before']:.5f} -> {c['loss_after']:.5f} |")


if __name__ == "__main__":
    main()
