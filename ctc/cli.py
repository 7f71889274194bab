"""The `ctc` command line: compile recipes, run/eval/bench artifacts, list passes and targets.

Heavy modules (torch, transformers, TVM) are imported inside the commands that need them,
so `ctc --help`, `ctc passes` and recipe errors stay fast.

Exit codes: 0 ok; 1 checks failed (the artifact is still written and its report says which);
2 usage or recipe errors; 3 model loading/capture errors; 4 internal errors.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ctc.tasks import TASK_CAUSAL_LM

EXIT_OK, EXIT_CHECKS, EXIT_USAGE, EXIT_MODEL, EXIT_INTERNAL = 0, 1, 2, 3, 4

_DESCRIPTION = """\
ctc — compress, then compile.

A recipe (.ctc file) names a model, calibration/evaluation text, a pipeline of
compression passes, targets and accuracy checks. `ctc compile` captures the model
into ctc's graph IR, runs the passes, measures the result against the original,
builds the targets and writes an artifact directory with a report.

A small recipe:

    model bundled "minilm"                     # or: model hf "dir" / model pt2 "f.pt2"
    calibrate wiki samples=8 seq_len=128       # real text shipped with gensim
    evaluate lee samples=8 seq_len=128
    pipeline {
        cse
        rptq w_bits=8 a_bits=8 on blocks[0:6]  # selectors: blocks[a:b], "*.glob.*", op NAME
        dce
    }
    target cpu trials=64                       # built with TVM into targets/cpu/
    check fidelity >= 0.99
    check param_bytes <= 0.7x
    emit "out/minilm"

The language is described in docs/recipes.md; `ctc passes` lists every pass.

exit codes: 0 ok, 1 checks failed (artifact written), 2 usage/recipe error,
            3 model or capture error, 4 internal error
"""

_EPILOG = """\
examples:
  ctc compile examples/minilm_w8a8.ctc --out out/minilm_w8a8
  ctc show out/minilm_w8a8              # report summary (--ir for the final IR)
  ctc run out/minilm_w8a8 --text "A sentence to embed."
  ctc bench out/minilm_w8a8 --seq-len 128
  ctc export out/minilm_w8a8 --to mlir  # MLIR through torch-mlir, checked with IREE
  ctc analyze out/minilm_w8a8 --target cpu   # roofline: per-op FLOPs, bytes, bound
  ctc passes                            # every pass, its options and defaults
"""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand (kept import-light)."""
    p = argparse.ArgumentParser(prog="ctc", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=_formatter)
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("compile", help="compile a recipe into an artifact directory", formatter_class=_formatter,
                       description="Parse and check RECIPE, capture its model, run its pipeline, evaluate its checks, "
                                   "build its targets and write the artifact atomically (nothing is left behind on "
                                   "failure). Exit 1 when a check fails: the artifact is still written.")
    c.add_argument("recipe", metavar="RECIPE", help="recipe file (.ctc)")
    c.add_argument("--out", "-o", metavar="DIR", help="artifact directory (default: the recipe's `emit`, "
                                                       "else out/<recipe name>)")
    c.add_argument("--target", "-t", action="append", metavar="KIND", dest="targets",
                   help="build only these targets (repeatable; options come from the recipe's target line if any); "
                        "`--target none` builds none")
    tune = c.add_mutually_exclusive_group()
    tune.add_argument("--tune", dest="tune", action="store_true", default=None,
                      help="tune targets (recipe trials, or 64 when the recipe gives none; fpga: tune=true)")
    tune.add_argument("--no-tune", dest="tune", action="store_false",
                      help="skip tuning (default schedules; fpga: tune=false, the default tiling)")
    c.add_argument("--check-only", action="store_true", help="parse and check the recipe, then stop (no model load)")
    c.add_argument("--max-samples", type=int, metavar="N",
                   help="use at most N calibration and evaluation windows (a quick trial compile; the report "
                        "records the cap)")
    c.add_argument("--force", action="store_true",
                   help="replace the output directory even when it is not a ctc artifact (never one holding the "
                        "recipe, its inputs or the working directory)")
    _common(c)

    r = sub.add_parser("run", help="run an artifact on text or input tensors", formatter_class=_formatter,
                       description="Run an artifact through the torch backend (or a compiled target with --target).")
    r.add_argument("artifact", metavar="ARTIFACT", help="artifact directory written by `ctc compile`")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text, tokenized with the artifact's tokenizer")
    src.add_argument("--input", metavar="FILE", help="input tensors: .safetensors (keys = input names) or .pt "
                                                     "(a dict or list of tensors, loaded with weights_only=True)")
    r.add_argument("--target", metavar="KIND", help="run the compiled library of this target instead")
    r.add_argument("--save", metavar="FILE", help="write the outputs to this .safetensors file")
    r.add_argument("--top", type=int, metavar="N",
                   help="causal LMs with --text: how many next-token candidates to print (default 5)")
    r.add_argument("--generate", type=int, metavar="N", help="decoder artifacts (`model ... decode=LEN`): greedy "
                                                             "generation of up to N tokens after --text, stopping "
                                                             "at the tokenizer's end-of-sequence token")
    r.add_argument("--ignore-eos", action="store_true",
                   help="with --generate: generate all N tokens, past the end-of-sequence token (timing runs)")
    _common(r)

    e = sub.add_parser("eval", help="measure an artifact's accuracy", formatter_class=_formatter,
                       description="Measure accuracy on real text, next to the original model (re-loaded from the "
                                   "artifact's recipe) on the same windows: perplexity for causal LMs, output fidelity "
                                   "to the original for any model. Data defaults to the recipe's `evaluate` line.")
    e.add_argument("artifact", metavar="ARTIFACT")
    e.add_argument("--data", metavar="SOURCE", help="wiki | lee | text:FILE | jsonl:FILE:FIELD (default: recipe's)")
    e.add_argument("--samples", type=int, help="windows to score")
    e.add_argument("--seq-len", type=int, help="tokens per window")
    e.add_argument("--skip", type=int, help="tokens of the text to skip before the first window (default: recipe's)")
    e.add_argument("--limit", type=int, help="use at most this many tokens after --skip (default: recipe's; 0 = all)")
    e.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="do not load the original model (measure the artifact alone)")
    e.add_argument("--human-similarity", action="store_true",
                   help="encoders: correlate embedding cosine with human similarity judgements (Lee corpus)")
    e.add_argument("--docs", type=int, help="with --human-similarity: use the first N of the 50 documents")
    e.add_argument("--target", metavar="KIND", help="with --human-similarity: run a compiled target's library")
    e.add_argument("--perplexity", action="store_true",
                   help="decode-step artifacts: perplexity too, each window fed through the step one token at a time "
                        "(seq-len steps per window and model: minutes on a real model)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--write-lm-eval-task", metavar="DIR",
                   help="instead of measuring, write an lm-eval task over the same windows into DIR (run it with "
                        "`python -m ctc.eval.lm_eval_adapter run --model ctc --model_args artifact=ARTIFACT "
                        "--tasks ctc_windows --include_path DIR`; docs/lm-eval.md)")
    _common(e)

    b = sub.add_parser("bench", help="measure an artifact's latency and memory", formatter_class=_formatter,
                       description="Median latency (after warm-up) and peak memory of one batch: Lee corpus text "
                                   "through the artifact's tokenizer, or, for a model without one (a CNN), seeded "
                                   "synthetic inputs of its shapes. A simulated target (fpga) is not timed: its "
                                   "modelled latency is in the report.")
    b.add_argument("artifact", metavar="ARTIFACT")
    b.add_argument("--target", metavar="KIND", help="bench the compiled library of this target (default: torch)")
    b.add_argument("--batch", type=int, help="batch size (default: the one the target's library was built for, "
                                              "else 1)")
    b.add_argument("--seq-len", type=int, help="sequence length (default: the one the target's library was built "
                                                "for, else 128, at most the model's positions)")
    b.add_argument("--repeat", type=int, default=20, help="timed runs (default and least 20)")
    b.add_argument("--threads", type=int, help="threads: torch's, or with --target the library's worker threads "
                                               "(default: torch's / the library's own)")
    b.add_argument("--profile", action="store_true", help="with --target: also time each compiled kernel")
    b.add_argument("--kernels", type=int, metavar="N",
                   help="with --profile: how many of the slowest kernels to list (default 15)")
    b.add_argument("--json", action="store_true", help="print JSON")
    _common(b)

    a = sub.add_parser("analyze", help="roofline: per-op FLOPs, bytes and bound on a target, prefill and decode",
                       formatter_class=_formatter,
                       description="Per-op FLOPs, bytes moved, arithmetic intensity and the roofline bound at the "
                                   "target's peaks (cpu: measured here and cached; cuda: data sheet; fpga: board "
                                   "preset), prefill and decode separately (docs/analyze.md).")
    a.add_argument("artifact", metavar="ARTIFACT")
    a.add_argument("--target", default="cpu", metavar="KIND", help="cpu | cuda | fpga (default cpu)")
    a.add_argument("--seq-len", type=int, help="prompt / sequence length (default: the artifact's evaluation window)")
    a.add_argument("--batch", type=int, help="batch size (default 1; with --profile, the batch the target's library "
                                              "was built for)")
    a.add_argument("--dim", action="append", default=[], metavar="NAME=N",
                   help="size of another symbolic input dim (repeatable)")
    a.add_argument("--gpu", metavar="NAME", help="cuda: data-sheet GPU (h100, h200, a100, l4; default: visible, "
                                                 "else h100)")
    a.add_argument("--board", metavar="NAME", help="fpga: board preset (default: the artifact's, else zc706)")
    a.add_argument("--remeasure", action="store_true", help="cpu: measure the peaks again (cached otherwise)")
    a.add_argument("--profile", action="store_true",
                   help="run the artifact's compiled library for --target here and place measured kernel times")
    a.add_argument("--top", type=int, default=15, help="op groups listed per phase (default 15)")
    a.add_argument("--html", metavar="FILE", help="also write a page with the roofline plot")
    a.add_argument("--json", action="store_true", help="print JSON (every op with --per-op)")
    a.add_argument("--per-op", action="store_true", help="with --json: every op, not only the groups")
    _common(a)

    x = sub.add_parser("export", help="write an artifact in a format other tools load", formatter_class=_formatter,
                       description="Write ARTIFACT's model in a format other tools load (docs/exporting.md). "
                                   "Options are the recipe's `emit FORMAT key=value` "
                                   "options. Each writer loads its output back with that ecosystem's reader and "
                                   "compares it with the artifact on an example batch; a mismatch writes nothing.")
    x.add_argument("artifact", metavar="ARTIFACT")
    x.add_argument("--to", required=True, metavar="FORMAT", help="the format, e.g. mlir (an unknown one lists all)")
    x.add_argument("--out", "-o", metavar="DIR", help="output directory (default: ARTIFACT-FORMAT next to it)")
    x.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", dest="options",
                   help="a format option, as in the recipe (repeatable), e.g. -s dialect=linalg")
    x.add_argument("--seq-len", type=int, help="tokens of the example batch the check runs (default: a fixed-length "
                                                "text model's length, else 32; not for fixed-shape float inputs)")
    x.add_argument("--force", action="store_true", help="replace DIR even when ctc did not write it")
    _common(x)

    ps = sub.add_parser("passes", help="list every pass with its options and defaults", formatter_class=_formatter)
    ps.add_argument("--markdown", action="store_true", help="print the docs/passes.md page")
    ps.add_argument("name", nargs="?", help="show one pass")

    sub.add_parser("targets", help="list targets, their options and whether their backend is installed",
                   formatter_class=_formatter)
    sub.add_parser("reference", help="print the recipe reference (docs/recipe-reference.md)",
                   formatter_class=_formatter)

    s = sub.add_parser("show", help="show a recipe (checked, canonical) or an artifact (report / IR)",
                       formatter_class=_formatter,
                       description="RECIPE: print it canonically after checking it; with --ir, capture its model "
                                   "and print the IR. ARTIFACT (a directory): print its report summary; with --ir, "
                                   "its final IR; with --json, report.json.")
    s.add_argument("path", metavar="RECIPE|ARTIFACT")
    s.add_argument("--ir", action="store_true", help="print IR text")
    s.add_argument("--json", action="store_true", help="artifact: print report.json")
    _common(s)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or info lines")


# --------------------------------------------------------------------------- commands
def cmd_compile(args: argparse.Namespace) -> int:
    from ctc.dsl.parser import parse_file

    recipe = parse_file(args.recipe)  # read once (a pipe works); syntax errors before torch is even imported
    from ctc.driver import CompileOptions, compile_recipe

    opts = CompileOptions(out=args.out, targets=args.targets, tune=args.tune, progress=not args.quiet,
                          check_only=args.check_only, force=args.force, max_samples=args.max_samples)
    result = compile_recipe(recipe, opts)
    if args.check_only:
        print(f"{args.recipe}: ok", file=sys.stderr)
        return EXIT_OK
    print(result.summary())
    return EXIT_OK if result.passed else EXIT_CHECKS


def _load_artifact(path: str) -> Any:
    from ctc.artifact import load

    return load(path)


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from ctc.errors import UsageError

    if args.top is not None and args.top < 1:
        raise UsageError(f"--top must be >= 1 (next-token candidates to print), got {args.top}")
    save = _output_file(args.save, "--save", _saved_outputs) if args.save else None
    art = _load_artifact(args.artifact)
    if args.top is not None and (art.module.meta.get("task") != TASK_CAUSAL_LM or args.text is None
                                 or args.generate is not None):
        raise UsageError("--top lists a causal LM's next-token candidates after --text (without --generate); "
                         "here it would do nothing: leave it out")
    if args.ignore_eos and args.generate is None:
        raise UsageError("--ignore-eos applies to --generate (it keeps generating past the end-of-sequence token); "
                         "here it would do nothing: leave it out")
    if args.generate is not None:
        if save is not None:  # the generated text goes to stdout; the step's output tensors are not kept
            raise UsageError("--save writes the model's output tensors of one run; --generate prints generated text "
                             "(redirect stdout to keep it): leave --save out")
        return _generate(art, args)
    if args.text is not None:
        tok = art.tokenizer()
        inputs, unpad = _text_inputs(art, tok, args.text, args.target)
    else:
        inputs, unpad = _read_tensors(Path(args.input)), None
    outs = art.run(inputs, target=args.target)
    if unpad is not None:
        outs = unpad(outs)
    names = art.module.output_names
    for name, t in zip(names, outs, strict=False):
        print(f"{name}: {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}  "
              f"mean {t.float().mean().item():.5g}  std {t.float().std().item() if t.numel() > 1 else 0:.5g}")
    task = art.module.meta.get("task")
    if args.text is not None and task == TASK_CAUSAL_LM and outs:
        logits = outs[0][0, -1].float()
        top = torch.topk(torch.softmax(logits, -1), k=min(args.top or 5, logits.numel()))
        tok = art.tokenizer()
        print("next token:", ", ".join(f"{tok.decode([int(i)])!r} {p:.3f}" for p, i in
                                       zip(top.values.tolist(), top.indices.tolist(), strict=True)))
    if save is not None:
        from safetensors.torch import save_file

        from ctc.output_dir import write_file_atomically

        tensors = {n: t.contiguous() for n, t in zip(names, outs, strict=False)}
        write_file_atomically(save, lambda tmp: save_file(tensors, str(tmp), metadata={"format": OUTPUTS_FORMAT}))
        if not args.quiet:
            print(f"wrote {save}", file=sys.stderr)
    return EXIT_OK


def _text_inputs(art: Any, tok: Any, text: str, target: str | None) -> tuple[dict[str, Any], Any]:
    """`ctc run --text`: the model's inputs, and, for a library built for one length (``seq_len=`` on the target
    line), a function cutting its outputs back to the text's tokens: the text is padded to that length on the
    right, its attention mask 0 there (a causal LM needs no mask: no earlier position sees the padding)."""
    from ctc.driver import text_inputs
    from ctc.errors import UsageError

    inputs = text_inputs(art.module, tok, [text])
    n = int(next(iter(inputs.values())).shape[1])
    positions = art.seq_limit()
    if positions is not None and n > positions[0]:
        raise UsageError(f"the text is {n} tokens, but the model has {positions[0]} positions ({positions[1]}): "
                         "shorten the text")
    fixed = art.fixed_seq_len(target) if target is not None else None
    if fixed is None or n == fixed:
        return inputs, None
    if n > fixed:
        raise UsageError(f"the text is {n} tokens, but this {target} library was built for {fixed} (`seq_len=` on "
                         "its target line): shorten the text, or build the target for a longer seq_len (cpu: or "
                         "none, any length)")
    if "attention_mask" not in inputs and art.module.meta.get("task") != TASK_CAUSAL_LM:
        raise UsageError(f"the text is {n} tokens, but this {target} library was built for {fixed}, and the model "
                         "takes no attention mask to pad it with: give that many tokens, or build the target with "
                         f"seq_len={n} (cpu: or no seq_len, any length)")
    seq = art.module.inputs[0].type.shape[1]

    def unpad(outs: list[Any]) -> list[Any]:
        return [t[:, :n] if len(v.type.shape) > 1 and v.type.shape[1] == seq else t
                for v, t in zip(art.module.outputs, outs, strict=False)]

    return text_inputs(art.module, tok, [text], pad_to=fixed), unpad


OUTPUTS_FORMAT = "ctc-outputs"  # safetensors metadata of the files `ctc run --save` writes


def _output_file(path: str, flag: str, ours: Any) -> Path:
    from ctc.output_dir import check_output_file

    return check_output_file(path, flag=flag, ours=ours)


def _saved_outputs(path: Path) -> bool:
    """Whether ``path`` is a file `ctc run --save` wrote (its safetensors metadata says so)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format") == OUTPUTS_FORMAT
    except Exception:  # noqa: BLE001 - anything unreadable as safetensors is not ours
        return False


def _analysis_page(path: Path) -> bool:
    """Whether ``path`` is a page `ctc analyze --html` wrote (its head names ctc as the generator)."""
    from ctc.analysis.artifact import PAGE_GENERATOR

    try:
        with path.open("rb") as f:
            return PAGE_GENERATOR.encode() in f.read(4096)
    except OSError:
        return False


def _generate(art: Any, args: argparse.Namespace) -> int:
    """`ctc run ART --generate N --text PROMPT`: greedy generation through a static decode step."""
    from ctc.errors import UsageError
    from ctc.generate import generate_text
    from ctc.tasks import TASK_DECODE_STEP

    if art.module.meta.get("task") != TASK_DECODE_STEP:
        raise UsageError("--generate needs a decoder artifact: compile the model with `model ... decode=LEN` "
                         "(one generation step over preallocated KV caches)" + _decode_advice(art))
    if args.text is None or args.generate < 1:
        raise UsageError("--generate N needs N >= 1 and a prompt (--text)")
    out = generate_text(art, args.text, args.generate, target=args.target, stop_at_eos=not args.ignore_eos,
                        count_flag="--generate")
    print(args.text + out.text)
    gen = out.generation
    end = (f", stopped at the end-of-sequence token {art.tokenizer().decode(gen.tokens[0, -1:].tolist())!r}"
           if out.stopped_at_eos else "")
    print(f"{gen.tokens.shape[1]} tokens{end}, {gen.tokens_per_s:.1f} tokens/s after the prompt "
          f"({gen.step_ms:.3f} ms per step; prompt {out.prompt_tokens} tokens in {gen.prompt_s:.3f} s; "
          f"backend {args.target or 'torch (reference)'})", file=sys.stderr)
    return EXIT_OK


def _decode_advice(art: Any) -> str:
    """For a causal LM's artifact: its recipe's model line with decode=, and the checks such a recipe cannot keep
    (perplexity and KL are measured on full-sequence models; a decode step is measured by fidelity)."""
    from dataclasses import replace

    from ctc.dsl.printer import format_model
    from ctc.evaluate import _artifact_recipe
    from ctc.tasks import TASK_CAUSAL_LM

    recipe = _artifact_recipe(art) if art.module.meta.get("task") == TASK_CAUSAL_LM else None
    if recipe is None or recipe.model is None:
        return ""
    positions = art.seq_limit()
    cache = min(256, positions[0]) if positions else 256
    line = format_model(replace(recipe.model, options={**recipe.model.options, "decode": cache}))
    drop = sorted({c.metric for c in recipe.checks} & {"ppl", "ppl_increase", "kl"})
    return (f"; here: `{line}` (LEN = prompt + generated tokens)"
            + (f", without its `check {'`/`check '.join(drop)}` lines (a decode step is measured by fidelity)"
               if drop else ""))


def _read_tensors(path: Path) -> Any:
    import torch

    from ctc.artifact import _first_line
    from ctc.errors import UsageError

    if not path.is_file():
        raise UsageError(f"input file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error kinds for a bad file
            raise UsageError(f"{path}: cannot be read as safetensors ({_first_line(e)})") from None
    if path.suffix == ".pt":
        try:  # weights_only: tensors and containers only, never code (a pickle naming a function is refused)
            obj = torch.load(str(path), weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling fails in many ways; each is a bad input file
            raise UsageError(f"{path}: cannot be read with torch.load(weights_only=True) ({_first_line(e)}); "
                             "save plain tensors (a dict or list of them), or use .safetensors") from None
        if isinstance(obj, torch.Tensor):
            return [obj]
        if isinstance(obj, (dict, list, tuple)):
            return obj
        raise UsageError(f"{path}: expected a tensor, a list or a dict of tensors, got {type(obj).__name__}")
    raise UsageError(f"{path}: --input takes a .safetensors or .pt file (for text use --text)")


def cmd_eval(args: argparse.Namespace) -> int:
    from ctc.evaluate import evaluate_artifact, format_result

    art = _load_artifact(args.artifact)
    if args.write_lm_eval_task:
        from ctc.errors import UsageError
        from ctc.eval.lm_eval_task import write_window_task

        ignored = [flag for flag, given in (("--target", args.target), ("--docs", args.docs),
                                            ("--human-similarity", args.human_similarity),
                                            ("--no-baseline", not args.baseline),
                                            ("--perplexity", args.perplexity)) if given]
        if ignored:  # the task only writes the windows: these measure something, which it does not
            raise UsageError(f"--write-lm-eval-task writes the task and measures nothing, so {', '.join(ignored)} "
                             "would do nothing: leave them out (run the task with lm-eval, docs/lm-eval.md)")

        proto = write_window_task(art, args.write_lm_eval_task, data=args.data, samples=args.samples,
                                  seq_len=args.seq_len, skip=args.skip, limit=args.limit)
        print(json.dumps(proto, indent=2) if args.json else
              f"wrote lm-eval task ctc_windows ({proto['windows']} windows x {proto['seq_len']} tokens, "
              f"{proto['tokens_scored']} tokens scored) to {args.write_lm_eval_task}")
        return EXIT_OK
    res = evaluate_artifact(art, data=args.data, samples=args.samples, seq_len=args.seq_len, skip=args.skip,
                            limit=args.limit, progress=not args.quiet, human=args.human_similarity, docs=args.docs,
                            target=args.target, baseline=args.baseline, perplexity=args.perplexity)
    print(json.dumps(res, indent=2) if args.json else format_result(res))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from ctc.driver import bench_artifact
    from ctc.errors import UsageError

    if args.kernels is not None and not args.profile:
        raise UsageError("--kernels applies to --profile (how many of the slowest kernels it lists)")
    if args.kernels is not None and args.kernels < 1:
        raise UsageError(f"--kernels must be >= 1, got {args.kernels}")
    art = _load_artifact(args.artifact)
    res = bench_artifact(art, target=args.target, batch=args.batch, seq_len=args.seq_len, repeat=args.repeat,
                         threads=args.threads, profile=(args.kernels or 15) if args.profile else 0)
    if args.json:
        print(json.dumps(res, indent=2))
        return EXIT_OK
    kernels = res.pop("kernels", None)
    for k, v in res.items():
        print(f"{k:>18}: {v}")
    if kernels:
        print(f"\n{'share':>6}  {'calls':>5}  {'ms/call':>9}  kernel")
        for r in kernels:
            print(f"{100 * r['share']:5.1f}%  {r['calls']:5d}  {r['ms_per_call']:9.4f}  {r['kernel']}")
    return EXIT_OK


def cmd_analyze(args: argparse.Namespace) -> int:
    from ctc.analysis.artifact import analysis_page, analyze_artifact, parse_dims
    from ctc.analysis.roofline import format_analysis
    from ctc.errors import UsageError

    if args.top < 1:
        raise UsageError("--top must be >= 1")
    for flag, given, applies in (("--gpu", args.gpu, "cuda"), ("--board", args.board, "fpga"),
                                 ("--remeasure", args.remeasure, "cpu")):
        if given and args.target != applies:
            raise UsageError(f"{flag} applies to --target {applies}; with --target {args.target} it would do nothing")
    if args.per_op and not args.json:
        raise UsageError("--per-op applies to --json (the text lists op groups; --top N lists more of them)")
    dims = parse_dims(args.dim)
    page = _output_file(args.html, "--html", _analysis_page) if args.html else None
    art = _load_artifact(args.artifact)
    analysis, points, measured = analyze_artifact(art, args.target, seq_len=args.seq_len, batch=args.batch,
                                                  dims=dims, gpu=args.gpu, board=args.board,
                                                  remeasure=args.remeasure, profile=args.profile)
    if page is not None:
        from ctc.output_dir import write_file_atomically

        text = analysis_page(analysis, points, measured)
        write_file_atomically(page, lambda tmp: tmp.write_text(text))
        if not args.quiet:
            print(f"wrote {page}", file=sys.stderr)
    if args.json:
        print(json.dumps({**analysis.to_json(per_op=args.per_op), "measured": points, "measured_how": measured},
                         indent=1, default=str))
    else:
        print(format_analysis(analysis, top=args.top, points=points))
        if measured:
            print(measured)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from ctc.dsl.check import option_diagnostics
    from ctc.dsl.diagnostics import RecipeError, did_you_mean
    from ctc.dsl.parser import parse
    from ctc.errors import UsageError
    from ctc.exports import EXPORTS, export_config

    if args.to not in EXPORTS:
        raise UsageError(f"--to {args.to}: unknown format{did_you_mean(args.to, EXPORTS)} "
                         f"(formats: {', '.join(EXPORTS)})")
    if args.seq_len is not None and args.seq_len < 1:
        raise UsageError(f"--seq-len must be >= 1 (tokens of the example batch the check runs), got {args.seq_len}")
    out = Path(args.out) if args.out else Path(str(Path(args.artifact)).rstrip("/") + f"-{args.to}")
    from ctc.output_dir import check_not_inside_artifact

    check_not_inside_artifact(out, flag="--out")
    line = f"emit {args.to} " + " ".join(args.options)
    try:  # the options are read exactly as a recipe's `emit FORMAT key=value` line
        emit = parse(line + "\n", "<--set>").exports[0]
    except RecipeError as e:
        raise UsageError(f"--set {' '.join(args.options)}: {e.diagnostics[0].message}") from None
    diags = option_diagnostics(EXPORTS[args.to].Options, emit.options, {}, emit.span, f"--to {args.to}")
    if diags:
        raise UsageError("; ".join(d.message for d in diags))
    options = export_config(args.to, emit.options)
    art = _load_artifact(args.artifact)
    from ctc.analysis.roofline import refuse_absent_dims
    from ctc.exports.source import from_artifact, write_export

    ids = next((v for v in art.module.inputs if v.name == "input_ids"), None)
    if ids is None:  # float inputs (an MLP's, a CNN's): --seq-len sizes only a sequence symbol, if there is one
        refuse_absent_dims(art.module, seq_len=args.seq_len, batch=None)
    seq_len = args.seq_len
    if seq_len is None:  # a text model captured at a fixed length is fed that length
        fixed = ids.type.shape[-1] if ids is not None else None
        seq_len = fixed if isinstance(fixed, int) else 32
    source = from_artifact(art, seq_len=seq_len)
    dest, summary = write_export(args.to, source, out, options, force=args.force,
                                 protected=[("the artifact", Path(args.artifact))])
    from ctc.driver import export_line

    print(f"wrote {args.to} export of {args.artifact} to {dest}" + export_line(summary))
    return EXIT_OK


def passes_text(markdown: bool = False, only: str | None = None) -> str:
    """The pass reference, from the registry: plain text for `ctc passes`, markdown for docs/passes.md."""
    from ctc.passes.base import all_passes, get_pass
    from ctc.reference import fmt_default, option_range, options_table

    passes = {only: get_pass(only)} if only else all_passes()
    out: list[str] = []
    if markdown:
        out += ["# Pass reference", "",
                "Generated by `ctc passes --markdown` from the pass registry; do not edit by hand",
                "(tests/test_cli.py checks that this page is up to date).", "",
                "A recipe step is `NAME key=value ... [on SELECTOR, ...]`; selectors are `blocks[lo:hi]`",
                '(half-open), scope globs like `"*.mlp.*"` and `op NAME`. Items of one kind are alternatives;',
                "different kinds must all hold.", ""]
    for name, cls in passes.items():
        specs = cls.Options.specs()
        flags = []
        if cls.needs_calibration:
            flags.append("needs calibration data")
        if cls.requires:
            flags.append("uses " + ", ".join(a.name or a.__name__ for a in cls.requires))
        doc = inspect.cleandoc(cls.__doc__ or "")
        if markdown:
            out += [f"## `{name}`", "", doc or "(undocumented)", ""]
            if flags:
                out += ["*" + "; ".join(flags) + "*", ""]
            out += [*options_table(specs), ""]
        else:
            out.append(f"{name}  —  {cls.summary()}" + (f"  [{'; '.join(flags)}]" if flags else ""))
            for s in specs:
                rng = option_range(s)
                out.append(f"    {s.name}={fmt_default(s.default)}  ({s.type}{', ' + rng if rng else ''})  {s.doc}")
    if not passes:
        out.append("(no passes are registered)")
    return "\n".join(out).rstrip() + "\n"


def cmd_passes(args: argparse.Namespace) -> int:
    from ctc.errors import UsageError
    from ctc.passes.base import PassError

    try:
        sys.stdout.write(passes_text(args.markdown, args.name))
    except PassError as e:
        raise UsageError(str(e)) from None
    return EXIT_OK


def targets_text() -> str:
    """`ctc targets`: every target kind, its backend's availability and its options."""
    from ctc.reference import fmt_default, option_range
    from ctc.targets import TARGETS, TRIALS_HELP

    out = []
    for name, spec in TARGETS.items():
        why = spec.unsupported_reason()
        avail = "available" if why is None else "not built yet"
        out.append(f"{name}  —  {spec.summary}  [{avail}]")
        for s in spec.Options.specs():
            rng = option_range(s)
            out.append(f"    {s.name}={fmt_default(s.default)}  ({s.type}{', ' + rng if rng else ''})  {s.doc}")
        if spec.trials:
            out.append(f"    trials=0  (int, [0, ])  {TRIALS_HELP}")
    return "\n".join(out) + "\n"


def cmd_reference(args: argparse.Namespace) -> int:
    from ctc.reference import recipe_reference

    sys.stdout.write(recipe_reference())
    return EXIT_OK


def cmd_targets(args: argparse.Namespace) -> int:
    sys.stdout.write(targets_text())
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from ctc.errors import UsageError

    p = Path(args.path)
    if args.ir and args.json:
        raise UsageError("--ir and --json: give one (the final IR, or the artifact's report.json)")
    if args.json and not p.is_dir():
        raise UsageError(f"--json prints an artifact's report.json; {p} is not an artifact directory (a recipe is "
                         "printed as text: leave --json out)")
    if p.is_dir():
        if args.ir:  # the IR is printed as loaded (and verified) with its parameters
            from ctc.ir.text import print_module

            sys.stdout.write(print_module(_load_artifact(str(p)).module))
            return EXIT_OK
        from ctc.artifact import read_report

        report = read_report(p)  # reads (and verifies) only what it prints
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            from ctc.driver import report_summary

            print(report_summary(report))
        return EXIT_OK
    if not p.exists():
        raise UsageError(f"{p}: no such recipe file or artifact directory")
    from ctc.driver import CompileOptions, compile_recipe, load_checked_recipe

    if args.ir:
        result = compile_recipe(str(p), CompileOptions(progress=not args.quiet, capture_only=True))
        from ctc.ir.text import print_module

        sys.stdout.write(print_module(result.module))
        return EXIT_OK
    from ctc.dsl.printer import print_recipe

    sys.stdout.write(print_recipe(load_checked_recipe(str(p))))
    return EXIT_OK


_COMMANDS = {"compile": cmd_compile, "run": cmd_run, "eval": cmd_eval, "bench": cmd_bench, "analyze": cmd_analyze,
             "export": cmd_export,
             "passes": cmd_passes, "targets": cmd_targets, "reference": cmd_reference, "show": cmd_show}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ctc` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    if args.version:
        from ctc import __version__

        print(f"ctc {__version__}")
        return EXIT_OK
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    from ctc.dsl.diagnostics import RecipeError, printable
    from ctc.errors import ArtifactError, ModelError, Terminated, UsageError

    with _sigterm_as_interrupt():
        try:
            return _COMMANDS[args.command](args)
        except RecipeError as e:
            print(str(e), file=sys.stderr)
            n = sum(1 for d in e.diagnostics if d.severity == "error")
            print(f"{n} error{'s' if n != 1 else ''}; nothing was written", file=sys.stderr)
            return EXIT_USAGE
        except (UsageError, ArtifactError) as e:  # messages may quote file names and libraries' text: escaped
            print(f"ctc {args.command}: error: {printable(str(e))}", file=sys.stderr)
            return EXIT_USAGE
        except Terminated:
            return _interrupted(signal.SIGTERM)
        except KeyboardInterrupt:
            return _interrupted(signal.SIGINT)
        except ModelError as e:
            print(str(e) if e.diagnostic is not None else f"ctc {args.command}: model error: {e}", file=sys.stderr)
            print("model error; nothing was written", file=sys.stderr)
            return EXIT_MODEL
        except Exception as e:
            if _SIGNALLED:  # a library turned the interrupt into its own error (TVM's FFI: a RuntimeError)
                return _interrupted(_SIGNALLED[-1])
            if isinstance(e, BrokenPipeError) and _stdout_reader_gone():
                # the reader of our output went away (`ctc analyze ART | head`): not ctc's fault, no traceback; a
                # broken pipe to anything else (a worker process) is an error like any other
                _stdout_to_devnull()
                return 128 + signal.SIGPIPE
            from ctc.passes.manager import PipelineError

            if isinstance(e, PipelineError):  # a pass failed: its message names the pass and recipe line
                print(f"ctc {args.command}: {e}\nnothing was written", file=sys.stderr)
                return EXIT_INTERNAL
            from ctc.errors import ComputeError

            if isinstance(e, ComputeError):  # the compiled model said why it could not compute
                print(f"ctc {args.command}: error: {e}", file=sys.stderr)
                return EXIT_INTERNAL
            if type(e).__name__ == "TuningError":  # the tuning worker failed: its message says where to look
                print(f"ctc {args.command}: tuning failed: {e}\nnothing was written", file=sys.stderr)
                return EXIT_INTERNAL
            print(f"ctc {args.command}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            return EXIT_INTERNAL


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end was closed (the kernel reports an error condition on its
    writing end)."""
    import os
    import select
    import stat

    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (stdout replaced in-process)
        return False


def _stdout_to_devnull() -> None:
    """Point the process's stdout at /dev/null, so that flushing what is still buffered at exit does not raise
    BrokenPipeError again (Python's advice for a pipe closed by its reader)."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (stdout replaced in-process)
        pass


_SIGNALLED: list[int] = []  # SIGINT / SIGTERM received while the current command runs


def _interrupted(signum: int) -> int:
    """The message and exit code of a command stopped by ``signum`` (its clean-up has run)."""
    if signum == signal.SIGTERM:
        print("terminated (SIGTERM); nothing was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    print("interrupted; nothing was written", file=sys.stderr)
    return 130


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM raises :class:`~ctc.errors.Terminated` (a KeyboardInterrupt) so
    that temporary files are removed and worker processes stopped exactly as on Ctrl-C.  Both signals are
    recorded in ``_SIGNALLED``: a library that catches the KeyboardInterrupt in its own callback and raises
    its own error instead (TVM's FFI does, during a build) still ends the command as interrupted."""
    import threading

    from ctc.errors import Terminated

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: Any) -> None:
        _SIGNALLED.append(signum)
        raise Terminated()

    def raise_interrupted(signum: int, frame: Any) -> None:
        _SIGNALLED.append(signum)
        raise KeyboardInterrupt()

    _SIGNALLED.clear()
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:  # Ctrl-C ignored (a background job) stays ignored
        signal.signal(signal.SIGINT, raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)


if __name__ == "__main__":
    sys.exit(main())
