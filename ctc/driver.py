"""The compile driver: recipe -> capture -> calibration data -> passes -> measured checks -> targets -> artifact.

Order matters for the user: everything that can be checked without the model (syntax,
names, options, files, output directory) is checked first, then the model is captured and
the selectors are checked against it, and only then does heavy work start.  Nothing is
written until the end, and the artifact appears atomically (see :mod:`ctc.artifact`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctc.dsl.ast import Check, Dataset, Recipe
from ctc.dsl.check import METRICS, TARGET_FIDELITY_FLOOR, check_recipe, check_with_module, resolve_path, target_config
from ctc.dsl.diagnostics import Diagnostic, RecipeError, attach_source, did_you_mean
from ctc.dsl.parser import parse_file
from ctc.errors import ModelError, UsageError
from ctc.tasks import TASK_CAUSAL_LM, TASK_DECODE_STEP

DEFAULT_TRIALS = 64
# Time budget for timing the torch backend (the fx reference, a comparison only): a reference op such as
# sparse attention's takes seconds a call, and 23 calls of it cost minutes for one side number.
TORCH_BASELINE_BUDGET_S = 20.0
# a compiled call slower than 1.5 s is timed fewer than 20 times (at least 3; the report's protocol says so)
TARGET_LATENCY_BUDGET_S = 30.0


@dataclass
class CompileOptions:
    """Command-line overrides of a compile."""

    out: str | None = None
    targets: Sequence[str] | None = None  # None: the recipe's; ["none"]: no targets
    tune: bool | None = None  # None: the recipe's trials; False: none; True: recipe's or DEFAULT_TRIALS
    progress: bool = True
    check_only: bool = False
    capture_only: bool = False
    force: bool = False  # replace an existing --out directory that is not a ctc artifact
    max_samples: int | None = None  # cap the calibration and evaluation windows (quick trial compiles, CI)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):  # one kind, not its letters
            self.targets = [self.targets]
        if self.max_samples is not None and self.max_samples < 1:
            raise UsageError(f"--max-samples must be >= 1, got {self.max_samples}")


@dataclass
class CompileResult:
    """What a compile produced: the artifact path, its report, and whether every check passed."""

    recipe: Recipe
    artifact: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)
    module: Any = None
    # One more artifact per variant a pipeline step emitted (e.g. remove-blocks also_keep=[...]).
    variants: list[CompileResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.report.get("passed", True)) and all(v.passed for v in self.variants)

    def summary(self) -> str:
        text = report_summary(self.report) + (f"\nartifact: {self.artifact}" if self.artifact else "")
        for v in self.variants:
            text += "\n\n" + v.summary()
        return text


# --------------------------------------------------------------------------- progress
class Progress:
    """Stage lines and tqdm bars on stderr (silent when disabled)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar: Any = None
        self._bar_what = ""

    def note(self, line: str) -> None:
        """A note the user should see even with --quiet (e.g. files ctc removed)."""
        self.close_bar()
        print(f"[ctc] note: {line}", file=sys.stderr, flush=True)

    def info(self, line: str) -> None:
        if self.enabled:
            self.close_bar()
            print(line, file=sys.stderr, flush=True)

    @contextmanager
    def stage(self, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self.info(f"[ctc] {what} ...")
        try:
            yield
        finally:
            self.close_bar()
        if self.enabled:
            print(f"[ctc] {what}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)

    def update(self, what: str, done: int, total: int) -> None:
        if not self.enabled or not sys.stderr.isatty():  # bars only on a terminal; logs get stage lines
            return
        from tqdm import tqdm

        if self._bar is None or self._bar_what != what:
            self.close_bar()
            self._bar = tqdm(total=total, desc=f"  {what}", file=sys.stderr, leave=False, dynamic_ncols=True)
            self._bar_what = what
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()
        if done >= total:
            self.close_bar()

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# --------------------------------------------------------------------------- recipe
def checked_recipe(path: str | Path | Recipe) -> tuple[Recipe, list[Diagnostic]]:
    """Parse (unless given a parsed Recipe) and statically check a recipe: the recipe and its warnings;
    raise RecipeError with every located error.  A file is read once, so a recipe from a pipe works."""
    recipe = path if isinstance(path, Recipe) else parse_file(path)
    diags = check_recipe(recipe)
    errors = [d for d in diags if d.severity == "error"]
    if errors:
        raise RecipeError(errors)
    return recipe, [d for d in diags if d.severity != "error"]


def load_checked_recipe(path: str | Path | Recipe) -> Recipe:
    """:func:`checked_recipe` without the warnings."""
    return checked_recipe(path)[0]


def output_dir(recipe: Recipe, opts: CompileOptions) -> Path:
    """--out, else the recipe's emit (relative to the recipe), else out/<recipe stem>."""
    if opts.out:
        return Path(opts.out)
    if recipe.emit is not None:
        return resolve_path(recipe, recipe.emit.path)
    return Path("out") / Path(recipe.file).stem


def protected_inputs(recipe: Recipe) -> list[tuple[str, Path]]:
    """The files a compile reads or keeps (recipe, model, data, tuning database): an output directory
    containing one of them is never replaced (:func:`ctc.output_dir.check_destination`)."""
    out: list[tuple[str, Path]] = []
    if not recipe.file.startswith("<") and Path(recipe.file).is_file():
        out.append(("the recipe", Path(recipe.file)))
    m = recipe.model
    if m is not None and m.kind in ("hf", "pt2"):
        out.append(("the model", resolve_path(recipe, m.ref)))
    for ds in (recipe.calibrate, recipe.evaluate):
        if ds is not None and ds.path is not None:
            out.append((f"the {ds.role} data", resolve_path(recipe, ds.path)))
    for t in recipe.targets:
        tdir = t.options.get("tuning_dir")
        if isinstance(tdir, str) and tdir:
            out.append(("the tuning database", resolve_path(recipe, tdir)))
    return out


def selected_targets(recipe: Recipe, opts: CompileOptions) -> list[Any]:
    """The TargetConfigs to build: the recipe's, filtered/extended by --target, trials set by --tune."""
    from ctc.targets import TARGETS, TargetConfig

    by_kind = {t.kind: target_config(t) for t in recipe.targets}
    if opts.targets is None:
        chosen = list(by_kind.values())
    elif list(opts.targets) == ["none"]:
        chosen = []
    elif "none" in opts.targets:
        others = " ".join(f"--target {k}" for k in opts.targets if k != "none")
        raise UsageError(f"--target none builds no target; it cannot be given with {others}")
    else:
        chosen = []
        for k in dict.fromkeys(opts.targets):  # each kind once, in the order given
            if k not in TARGETS:
                raise UsageError(f"--target {k}: unknown target{did_you_mean(k, TARGETS)} "
                                 f"(targets: {', '.join(TARGETS)})")
            why = TARGETS[k].unsupported_reason()
            if why:
                raise UsageError(f"--target {k}: {why}")
            chosen.append(by_kind.get(k) or TargetConfig(k, TARGETS[k].Options(), 0))
    out = []
    for t in chosen:
        if not t.spec.trials:  # a target tuned by its own model (fpga): --tune / --no-tune set its tune option
            if opts.tune is not None:
                t = dataclasses.replace(t, options=dataclasses.replace(t.options, tune=opts.tune))
            out.append(_settle_target(recipe, t))
            continue
        trials = t.trials
        if opts.tune is False:
            trials = 0
        elif opts.tune is True and not trials:
            trials = DEFAULT_TRIALS
        out.append(_settle_target(recipe, dataclasses.replace(t, trials=trials)))
    return out


_SHAPE_NOTE = "tuning needs fixed shapes: built for "  # the note of a seq_len / batch a tuned build chose itself


def fit_target_shapes(t: Any, module: Any) -> Any:
    """``t`` without the ``seq_len`` / ``batch`` a tuned build chose for a dim the captured ``module``'s inputs do
    not have (an MLP's or CNN's fixed shapes), nor their notes: those shapes are fixed already, and binding them
    refused the build ('seq_len=128 given, but the model's inputs have fixed shapes'). A recipe's own value for such
    a dim never gets here (:func:`ctc.dsl.check.check_with_module` refuses it at the option). A length it chose past
    the model's positions (128 for a 64-position BERT) becomes that limit."""
    from ctc.analysis.roofline import input_symbols
    from ctc.positions import ir_symbol_limits

    if not t.trials or not hasattr(t.options, "seq_len") or not hasattr(t.options, "batch"):
        return t
    b_sym, s_sym, _ = input_symbols(module)
    drop = [opt for opt, sym in (("seq_len", s_sym), ("batch", b_sym)) if sym is None and getattr(t.options, opt)]
    changes: dict[str, Any] = dict.fromkeys(drop, 0)
    notes = tuple(n for n in t.notes if not any(n.startswith(f"{_SHAPE_NOTE}{opt}=") for opt in drop))
    chosen = any(n.startswith(f"{_SHAPE_NOTE}seq_len=") for n in notes)  # a length the user gave is checked at build
    limit = ir_symbol_limits(module).get(s_sym) if s_sym and chosen else None
    if limit is not None and t.options.seq_len > limit[0]:  # a longer build reads past the model's positions
        changes["seq_len"] = limit[0]
        notes = tuple(f"{_SHAPE_NOTE}seq_len={limit[0]} (the model's {limit[0]} positions: {limit[1]}; set seq_len "
                      "on the target line to choose, or trials=0 for an any-length build)"
                      if n.startswith(f"{_SHAPE_NOTE}seq_len=") else n for n in notes)
    if not changes:
        return t
    return dataclasses.replace(t, options=dataclasses.replace(t.options, **changes), notes=notes)


def _settle_target(recipe: Recipe, t: Any) -> Any:
    """Recipe-relative paths and the fixed shapes a tuned build needs, with a note for each default.

    A ``tuning_dir`` is relative to the recipe, like every path in it.  Meta-schedule tunes only
    fixed shapes (see :mod:`ctc.backends.tvm.tuning`), so a tuned cpu build binds ``seq_len`` (the
    recipe's evaluation, else calibration, window length, else 128) and ``batch`` (1) unless given."""
    options = t.options
    changes: dict[str, Any] = {}
    notes: list[str] = []
    tdir = getattr(options, "tuning_dir", None)
    if tdir and not Path(tdir).expanduser().is_absolute():
        changes["tuning_dir"] = str(resolve_path(recipe, tdir).absolute())
    if tdir and t.spec.trials and not t.trials:  # only a tuned build reads or writes the database
        no_tune = any(rt.kind == t.kind and rt.trials for rt in recipe.targets)  # trials= given, --no-tune
        why, fix = (("--no-tune was given", "leave --no-tune out to tune") if no_tune else
                    ("the target line has no trials=", "add trials=N to the target line, or compile with --tune"))
        notes.append(f"tuning_dir is not used: {why}, so this build uses default schedules and no tuning database "
                     f"({fix})")
    if t.trials > 0 and hasattr(options, "seq_len") and hasattr(options, "batch"):
        if not options.seq_len:
            ds = recipe.evaluate or recipe.calibrate
            seq = int(ds.options.get("seq_len", 128)) if ds is not None else 128
            where = f"the {ds.role} line's" if ds is not None and "seq_len" in ds.options else "the default"
            changes["seq_len"] = seq
            notes.append(f"{_SHAPE_NOTE}seq_len={seq} ({where}; set seq_len on the target "
                         "line to choose, or trials=0 for an any-length build)")
        if not options.batch:
            changes["batch"] = 1
            notes.append(f"{_SHAPE_NOTE}batch=1 (set batch on the target line to choose)")
    if not changes:
        return t
    return dataclasses.replace(t, options=dataclasses.replace(options, **changes), notes=t.notes + tuple(notes))


# --------------------------------------------------------------------------- model
@dataclass
class LoadedModel:
    """A captured model plus what evaluation needs: the eager model, tokenizer and task."""

    module: Any
    task: str
    tokenizer: Any = None
    tokenizer_dir: Path | None = None
    description: dict[str, Any] = field(default_factory=dict)
    eager: Any = None  # the loaded PyTorch model (decode steps are calibrated on its prefilled caches)


def _load_and_capture(recipe: Recipe) -> tuple[Any, Any, dict[str, Any], Path | None, Any]:
    """(captured module, tokenizer, description, tokenizer dir, eager model) of the recipe's model source.

    ``model ... dtype=f16`` casts the weights before capture; ``decode=N`` captures one generation
    step over N-position KV caches (:func:`ctc.frontends.decode.static_decode_step`) instead of the
    full-sequence forward."""
    from ctc import frontends

    m = recipe.model
    assert m is not None
    decode = m.options.get("decode")
    dtype = m.options.get("dtype")
    if m.kind == "bundled":
        # SmolLM2's de-quantised GGUF weights are cached (ctc.bundled; saves ~20 s per compile)
        hf = frontends.load_bundled(m.ref)
        info = hf.info
        model = _cast(hf.model, dtype)
        desc = {"kind": "bundled", "ref": m.ref, "title": info.title, "arch": info.arch, "pip": info.pip,
                "load_seconds": round(info.load_seconds, 2)}
        if decode:
            module = _capture_decode(model, info.task, int(decode))
        else:
            module = frontends.capture_hf_model(model, task=info.task, name=m.ref, source=info.loaded_from)
        if "gguf" in info.extra:  # where the `gguf-weights` pass finds the quantized original
            module.meta["gguf"] = info.extra["gguf"]
        return module, hf.tokenizer, desc, Path(info.loaded_from), model
    if m.kind == "hf":
        o = m.options
        loaded = frontends.load_hf(resolve_path(recipe, m.ref), task=o.get("task"), attn=o.get("attn"),
                                   dtype=o.get("dtype") or "f32", gguf_file=o.get("gguf"))
        desc = {"kind": "hf", "ref": m.ref, "arch": loaded.arch}
        tok_dir = Path(loaded.tokenizer_dir) if loaded.tokenizer_dir else None
        if decode:
            module = _capture_decode(loaded.model, loaded.task, int(decode))
        else:
            module = frontends.capture_loaded(loaded)
        if o.get("gguf"):  # where `gguf-weights` and `emit gguf` find the quantized original
            module.meta["gguf"] = str((resolve_path(recipe, m.ref) / str(o["gguf"])).resolve())
        return module, loaded.tokenizer, desc, tok_dir, loaded.model
    ep = frontends.load_pt2(resolve_path(recipe, m.ref))
    module = frontends.capture_loaded(ep)
    return module, None, {"kind": "pt2", "ref": m.ref, "arch": "exported program"}, None, None


def _cast(model: Any, dtype: str | None) -> Any:
    import torch

    if dtype is None:
        return model
    return model.to({"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype])


def _capture_decode(model: Any, task: str, max_len: int) -> Any:
    """The static decode step of a causal LM over ``max_len``-position caches, as a ctc module."""
    from ctc.frontends import capture
    from ctc.frontends.decode import static_decode_inputs, static_decode_step

    if task != TASK_CAUSAL_LM:
        raise ValueError(f"decode={max_len} captures a generation step of a causal LM; this model is a {task} model")
    dtype = next(model.parameters()).dtype
    step = static_decode_step(model)
    module = capture(step, static_decode_inputs(model, max_len, position=max_len // 2, dtype=dtype,
                                                random_cache=False), dynamic=False)
    module.meta["task"] = TASK_DECODE_STEP
    module.meta["decode"] = {"max_len": max_len}
    return module


def load_model(recipe: Recipe, progress: Progress) -> LoadedModel:
    """Load and capture the recipe's model; failures become ModelError located at the model line."""
    m = recipe.model
    assert m is not None
    if not progress.enabled:  # --quiet: no "Loading weights" bars from transformers either
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    try:
        module, tok, desc, tok_dir, eager = _load_and_capture(recipe)
    except (RecipeError, KeyboardInterrupt):
        raise
    except Exception as e:
        msg = f"could not load/capture model {m.kind} {m.ref!r}: {type(e).__name__}: {e}"
        diag = attach_source([Diagnostic(msg, m.span)], recipe.source)[0]
        raise ModelError(msg, diag) from e
    task = str(module.meta.get("task", "unknown"))
    desc["task"] = task
    desc.setdefault("arch", module.meta.get("arch", ""))
    return LoadedModel(module, task, tok, tok_dir, desc, eager)


def text_inputs(module: Any, tokenizer: Any, texts: Sequence[str], seq_len: int | None = None,
                pad_to: int | None = None) -> dict[str, Any]:
    """Tokenize ``texts`` into the module's named inputs (input_ids, attention_mask, ...); ``pad_to``: padded on
    the right to that many tokens (a library built for one length), the attention mask 0 over the padding."""
    import torch.nn.functional as F

    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=seq_len is not None,
                    max_length=seq_len, verbose=False)  # a text past the model's positions: ctc's own error says so
    names = [v.name for v in module.inputs]
    missing = [n for n in names if n not in enc]
    if missing:
        raise UsageError(f"the model takes inputs {names}; the tokenizer gives {sorted(enc)}")
    n = enc["input_ids"].shape[1]
    if pad_to is not None and n < pad_to:
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        return {k: F.pad(enc[k], (0, pad_to - n), value=pad_id if k == "input_ids" else 0) for k in names}
    return {k: enc[k] for k in names}


# --------------------------------------------------------------------------- data
def _no_tokenizer_hint(recipe: Recipe) -> str | None:
    """What a Hugging Face directory without a loadable tokenizer needs (None for other model kinds)."""
    m = recipe.model
    if m is None or m.kind != "hf":
        return None
    return (f"{resolve_path(recipe, m.ref)} holds no tokenizer that transformers can load offline: copy the model's "
            "tokenizer files (tokenizer.json and tokenizer_config.json, or its vocabulary files) into it")


def dataset_batches(recipe: Recipe, ds: Dataset, loaded: LoadedModel, max_samples: int | None = None
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Model-input batches for a calibrate/evaluate statement (at most ``max_samples`` windows), and the
    protocol that made them."""
    from ctc.dsl.check import DatasetOptions
    from ctc.eval import data as eval_data

    opts = DatasetOptions.from_dict(ds.options)
    capped = max_samples is not None and opts.samples > max_samples
    if capped:
        opts = dataclasses.replace(opts, samples=max_samples)
    path = resolve_path(recipe, ds.path) if ds.path is not None else None
    split = "calibration" if ds.role == "calibrate" else "evaluation"
    decode = loaded.task == TASK_DECODE_STEP
    try:
        batches, protocol = eval_data.model_batches(
            source=ds.source, path=path, field=opts.field, split=split, tokenizer=loaded.tokenizer,
            input_names=["input_ids"] if decode else [v.name for v in loaded.module.inputs], samples=opts.samples,
            seq_len=opts.seq_len, seed=opts.seed, batch_size=opts.batch_size, skip=opts.skip,
            limit=opts.limit or None)
        if decode:
            batches, protocol = decode_step_batches(loaded, batches, protocol)
    except (OSError, ValueError) as e:
        span = ds.path_span if ds.path is not None else ds.source_span
        from ctc.dsl.check import NO_TEXT_HINT

        hint = None if loaded.tokenizer is not None else _no_tokenizer_hint(recipe) or (
            NO_TEXT_HINT if ds.role == "calibrate" else
            "remove this line: without data, the targets are checked on synthetic inputs of the model's shapes")
        raise RecipeError(attach_source([Diagnostic(f"cannot read {ds.role} data: {e}", span, hint=hint)],
                                        recipe.source)) from e
    if capped:
        protocol["samples_capped_from"] = int(ds.options.get("samples", DatasetOptions().samples))
    return batches, protocol


def decode_step_batches(loaded: Any, windows: list[dict[str, Any]], protocol: dict[str, Any]
                        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A decode-step model's batches from text windows (``input_ids``): one step after each window's prefix, on
    caches that ``loaded``'s eager model filled; the protocol says so."""
    from ctc.frontends.decode import static_prefilled_inputs

    max_len = int(loaded.module.meta["decode"]["max_len"])
    batches = [static_prefilled_inputs(loaded.eager, b["input_ids"], max_len) for b in windows]
    return batches, {**protocol, "decode_step": "prefill all but the last token of each window, decode the last"}


# --------------------------------------------------------------------------- passes
def run_pipeline(module: Any, recipe: Recipe, calibration: list[dict[str, Any]], seed: int,
                 progress: Progress) -> tuple[Any, Any]:
    """Run the recipe's steps through the PassManager; return the module and its PipelineReport."""
    _, out, report = run_pipeline_all(module, recipe, calibration, seed, progress)[0]
    return out, report


def run_pipeline_all(module: Any, recipe: Recipe, calibration: list[dict[str, Any]], seed: int,
                     progress: Progress) -> list[tuple[str, Any, Any]]:
    """Run the recipe's steps through the PassManager: ``[(label, module, PipelineReport)]``, the main
    result first (label ""), then every variant a step emitted (e.g. one per depth of ``remove-blocks``)."""
    from ctc.passes.base import get_pass
    from ctc.passes.manager import PassManager, Step

    steps = [Step(get_pass(s.name)(s.options), s.selector(), s.span) for s in recipe.pipeline]
    pm = PassManager(steps, calibration=calibration, progress=progress.enabled, seed=seed)
    return pm.run_all(module)


def pass_rows(report: Any) -> list[dict[str, Any]]:
    """Per-pass report rows (the PassManager's records plus a one-line summary)."""
    rows = []
    for r in report.records:
        d = r.to_dict()
        changed = ", ".join(f"{k} {v:+d}" for k, v in r.ops_diff.items()) or "no op changes"
        rewrote = any(r.rewrites.get(k) for k in ("created", "erased", "replaced", "params_added", "params_removed"))
        if (not r.ops_diff and r.params_before == r.params_after and r.bytes_before == r.bytes_after and r.notes
                and not rewrote):  # equal counts alone: a pass may swap nodes or weights one for one
            why = r.notes[-1] if len(r.notes[-1]) <= 160 else r.notes[-1][:157] + "..."
            changed = f"nothing changed ({why})"  # the pass's own last word on why, not just a blank line
        fid = f", cosine {r.fidelity.cosine:.6f}" if r.fidelity is not None and r.fidelity.cosine is not None else ""
        d["summary"] = (f"{changed}; params {r.params_before:,} -> {r.params_after:,}; "
                        f"bytes {r.bytes_before:,} -> {r.bytes_after:,}{fid}; {r.seconds:.2f}s")
        rows.append(d)
    return rows


# --------------------------------------------------------------------------- measuring
def _count(module: Any) -> dict[str, Any]:
    return {"params": module.param_count(), "bytes": module.param_bytes(), "nodes": len(module.nodes)}


def _outputs(module: Any, batches: list[dict[str, Any]], what: str, progress: Progress) -> list[list[Any]]:
    """Every batch's outputs of ``module`` (reference interpreter: the IR's semantics)."""
    from ctc.frontends.decode import step_inputs
    from ctc.ir.interpreter import interpret

    outs = []
    for k, b in enumerate(batches):
        outs.append(interpret(module, step_inputs(module, b)))
        progress.update(what, k + 1, len(batches))
    return outs


def _perplexity(batches: list[dict[str, Any]], outs: list[list[Any]], description: str) -> Any:
    """Perplexity of already-computed logits (first output) over the evaluation windows."""
    from ctc.eval.perplexity import batches_perplexity

    served = {id(b["input_ids"]): o[0] for b, o in zip(batches, outs, strict=True)}
    return batches_perplexity(lambda ids, mask: served[id(ids)], batches, description=description)


def _module_perplexity(module: Any, batches: list[dict[str, Any]], progress: Progress, description: str) -> Any:
    """Perplexity of ``module``'s logits (first output, reference interpreter) over the evaluation windows, one
    batch's logits alive at a time."""
    from ctc.eval.perplexity import PerplexityTotals
    from ctc.frontends.decode import step_inputs
    from ctc.ir.interpreter import interpret

    totals = PerplexityTotals()
    for k, b in enumerate(batches):
        totals.add(interpret(module, step_inputs(module, b))[0], b)
        progress.update("evaluate", k + 1, len(batches))
    return totals.result(description)


def _compare(batches: list[dict[str, Any]], ref: list[list[Any]], got: list[list[Any]], logits: bool) -> Any:
    """ctc.eval.fidelity metrics of the first output over all windows (real tokens only)."""
    from ctc.eval.fidelity import FidelityTotals

    totals = FidelityTotals(logits=logits)
    for b, r, c in zip(batches, ref, got, strict=True):
        _compare_batch(totals, b, r[0], c[0])
    return totals.result()


def _compare_batch(totals: Any, batch: Mapping[str, Any], r0: Any, c0: Any) -> None:
    """Add one window batch's first outputs to ``totals`` (a FidelityTotals; real tokens only)."""
    import torch

    if tuple(r0.shape) != tuple(c0.shape):
        raise RuntimeError(f"the compressed model's output has shape {tuple(c0.shape)}, the original's "
                           f"{tuple(r0.shape)}")
    m = batch.get("attention_mask")
    r, c = r0.reshape(-1, r0.shape[-1]), c0.reshape(-1, c0.shape[-1])
    use = m is not None and r0.dim() >= 3 and tuple(m.shape) == tuple(r0.shape[:-1])
    totals.add(r, c, m.reshape(-1) if use else torch.ones(r.shape[0], dtype=torch.long))


def measure(original: Any, compressed: Any, loaded: LoadedModel, eval_batches: list[dict[str, Any]],
            metrics: set[str], progress: Progress, description: str = "") -> dict[str, dict[str, Any]]:
    """Measure ``metrics`` (plus sizes) of the compressed module against the original on the evaluation batches.

    Both modules run once per window (reference interpreter); perplexity and fidelity are computed
    from those outputs with ctc.eval's definitions.
    """
    out: dict[str, dict[str, Any]] = {}
    a, b = _count(original), _count(compressed)
    out["params"] = {"original": a["params"], "compressed": b["params"], "ratio": b["params"] / max(1, a["params"])}
    out["param_bytes"] = {"original": a["bytes"], "compressed": b["bytes"], "ratio": b["bytes"] / max(1, a["bytes"])}
    lm = loaded.task == TASK_CAUSAL_LM
    if eval_batches and metrics & {"fidelity", "max_error", "ppl", "ppl_increase", "kl"}:
        from ctc.eval.fidelity import FidelityTotals
        from ctc.eval.perplexity import PerplexityTotals
        from ctc.frontends.decode import step_inputs
        from ctc.ir.interpreter import interpret

        # window by window, keeping sums only: every window's logits at once outgrew memory (samples x seq_len x
        # vocabulary floats per model)
        totals, ppl0, ppl1 = FidelityTotals(logits=lm), PerplexityTotals(), PerplexityTotals()
        for k, b in enumerate(eval_batches):
            r0 = interpret(original, step_inputs(original, b))[0]
            c0 = interpret(compressed, step_inputs(compressed, b))[0]
            _compare_batch(totals, b, r0, c0)
            if lm:
                ppl0.add(r0, b)
                ppl1.add(c0, b)
            progress.update("run original and compressed", k + 1, len(eval_batches))
        fid = totals.result()
        out["fidelity"] = {"original": 1.0, "compressed": fid.cosine, "rel_error": fid.rel_error, "rows": fid.rows}
        out["max_error"] = {"original": 0.0, "compressed": fid.max_abs_error}
        if lm:
            p0, p1 = ppl0.result(description), ppl1.result(description)
            out["ppl"] = {"original": p0.ppl, "compressed": p1.ppl, "ratio": p1.ppl / p0.ppl,
                          "protocol": p0.protocol}
            out["ppl_increase"] = {"original": 0.0, "compressed": p1.ppl - p0.ppl,
                                   "relative": (p1.ppl - p0.ppl) / p0.ppl}
            out["kl"] = {"original": 0.0, "compressed": fid.kl}
    if "latency_ms" in metrics and eval_batches:
        out["latency_ms"] = torch_backend_latency(original, compressed, eval_batches[0])
    for k, v in out.items():
        v["doc"] = METRICS[k].doc if k in METRICS else ""
    return out


def fit_batch(batch: Mapping[str, Any], options: Any) -> dict[str, Any]:
    """``batch`` reshaped to a fixed-shape build's ``batch``/``seq_len`` (rows and tokens repeated or cut);
    unchanged for an any-shape build."""
    rows, seq = int(getattr(options, "batch", 0) or 0), int(getattr(options, "seq_len", 0) or 0)
    out = {}
    for k, v in batch.items():
        if getattr(v, "dim", lambda: 0)() == 2:
            if seq:
                reps = -(-seq // v.shape[1])
                v = v.repeat(1, reps)[:, :seq]
            if rows:
                reps = -(-rows // v.shape[0])
                v = v.repeat(reps, 1)[:rows]
        out[k] = v
    return out


def _library_threads(res: Any, library: Any) -> Any:
    """A latency result of a compiled CPU library whose protocol states the library's own pool (``threads=`` on its
    target line, else every core), not torch's thread count, which the library does not use."""
    if getattr(library, "threads", None) and getattr(library, "device", "cpu") == "cpu":
        return dataclasses.replace(res, threads=int(library.threads))
    return res


def measure_target(module: Any, kind: str, target_dir: Path, batch: Mapping[str, Any],
                   inputs: str = "first evaluation batch") -> dict[str, Any]:
    """The compiled library's latency on one evaluation batch (median of >= 20 runs after warm-up, or of the runs
    that fit ``TARGET_LATENCY_BUDGET_S`` for a slow call) next to the torch backend's on the same batch, and its
    output agreement with the IR's semantics; ``inputs`` says in the protocol what ``batch`` is."""
    import importlib

    from ctc.artifact import torch_runner
    from ctc.eval.fidelity import compare_outputs
    from ctc.eval.latency import MIN_RUNS, measure_latency
    from ctc.frontends.decode import step_inputs
    from ctc.ir.interpreter import interpret
    from ctc.targets import TARGETS

    run = importlib.import_module(TARGETS[kind].backend).load(target_dir, module)
    feed = step_inputs(module, dict(batch))
    got = run(feed)[0]
    ref = interpret(module, feed)[0]
    agree = compare_outputs(ref.reshape(-1, ref.shape[-1]).float(),
                            torch_tensor(got).reshape(-1, ref.shape[-1]).float(), logits=False)
    if getattr(run, "simulated", False):  # a C simulation: its wall time says nothing; the model's latency does
        return {"estimated_latency_ms": run.estimated_latency_ms, "bit_exact_vs_integer_model": run.last_bit_exact,
                "vs_ir": {"cosine": agree.cosine, "max_abs_error": agree.max_abs_error},
                "protocol": f"{inputs} {({k: list(v.shape) for k, v in feed.items()})}, C simulation"}
    lat = _library_threads(measure_latency(lambda: run(feed), runs=MIN_RUNS, warmup=3,
                                           max_seconds=TARGET_LATENCY_BUDGET_S, label=kind), run)
    torch_run = torch_runner(module)
    base = measure_latency(lambda: torch_run(feed), runs=MIN_RUNS, warmup=3, max_seconds=TORCH_BASELINE_BUDGET_S,
                           label="torch")
    shape = {k: list(v.shape) for k, v in feed.items()}
    return {"latency_ms": round(lat.median_ms, 3), "p90_ms": round(lat.p90_ms, 3),
            "torch_backend_latency_ms": round(base.median_ms, 3), "speedup_vs_torch_backend":
            round(base.median_ms / lat.median_ms, 3), "vs_ir": {"cosine": agree.cosine,
                                                              "max_abs_error": agree.max_abs_error},
            "protocol": f"{inputs} {shape}; {lat.protocol}; torch backend: {base.protocol}"}


def torch_backend_latency(original: Any, compressed: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    """``latency_ms`` of a recipe without a target: both modules through the torch backend (fx), on one batch."""
    import torch

    from ctc.artifact import torch_runner
    from ctc.eval.latency import MIN_RUNS, measure_latency
    from ctc.frontends.decode import step_inputs

    feed = dict(batch)
    f0, f1 = step_inputs(original, feed), step_inputs(compressed, feed)
    r0, r1 = torch_runner(original), torch_runner(compressed)
    with torch.no_grad():
        l0 = measure_latency(lambda: r0(f0), runs=MIN_RUNS, warmup=3, max_seconds=TORCH_BASELINE_BUDGET_S,
                             label="torch")
        l1 = measure_latency(lambda: r1(f1), runs=MIN_RUNS, warmup=3, max_seconds=TORCH_BASELINE_BUDGET_S,
                             label="torch")
    shape = {k: list(v.shape) for k, v in feed.items()}
    return {"original": round(l0.median_ms, 3), "compressed": round(l1.median_ms, 3),
            "ratio": l1.median_ms / l0.median_ms, "backend": "torch",
            "protocol": f"torch backend (fx GraphModule; the recipe builds no target), first evaluation batch "
                        f"{shape}; {l1.protocol}"}


def target_latency(original: Any, target: Any, compressed_measured: Mapping[str, Any], batch: Mapping[str, Any],
                   *, with_original: bool) -> dict[str, Any]:
    """``latency_ms`` of a recipe with a target: the compiled compressed model's measured latency; with
    ``with_original`` (a check relative to the original) the original is built for the same target
    (same options and tuning budget, into a temporary directory) and measured the same way."""
    import tempfile

    from ctc.targets import build_target

    key = "latency_ms" if "latency_ms" in compressed_measured else "estimated_latency_ms"
    how = "measured" if key == "latency_ms" else "estimated by the target's model"
    out: dict[str, Any] = {"compressed": compressed_measured[key], "backend": target.kind,
                           "protocol": f"compiled target {target.kind} ({how}); {compressed_measured['protocol']}"}
    if with_original:
        with tempfile.TemporaryDirectory(prefix="ctc-latency-original-") as tmp:
            build_target(original, target, Path(tmp), example_inputs=batch)
            m0 = measure_target(original, target.kind, Path(tmp), batch)
        out["original"] = m0[key]
        out["ratio"] = out["compressed"] / out["original"]
        out["protocol"] += "; the original built for the same target and measured the same way"
    return out


def set_checks(report: dict[str, Any], checks: Sequence[Check]) -> None:
    """(Re)evaluate the recipe's checks against ``report["metrics"]`` and record the verdicts; once a target's
    agreement with the IR is measured and no check bounds it, the default floor applies as one more check."""
    rows = [evaluate_check(c, report["metrics"]) for c in checks]
    if "target_fidelity" in report["metrics"] and not any(c.metric == "target_fidelity" for c in checks):
        row = evaluate_check(Check("target_fidelity", ">=", TARGET_FIDELITY_FLOOR), report["metrics"])
        if not row["passed"]:
            low = report["metrics"]["target_fidelity"]["per_target"]
            row["note"] = (f"(default floor) the compiled library computes something else than the model it compiled "
                           f"(cosine vs IR: {', '.join(f'{k} {v:.6f}' for k, v in low.items())}): a ctc backend "
                           f"fault; please report it with the recipe; `check target_fidelity >= X` sets another floor")
        rows.append(row)
    report["checks"] = rows
    report["failed_checks"] = [c["check"] for c in rows if not c["passed"]]
    report["passed"] = all(c["passed"] for c in rows)


def record_target_fidelity(report: dict[str, Any], kind: str, measured: Mapping[str, Any],
                           inputs: str = "the first evaluation batch") -> None:
    """Put target ``kind``'s measured cosine vs the IR into ``report["metrics"]["target_fidelity"]`` (per target,
    and the lowest as the checked value); ``inputs`` says in the protocol what they ran on."""
    m = report["metrics"].setdefault("target_fidelity", {
        "per_target": {}, "doc": METRICS["target_fidelity"].doc,
        "protocol": f"each target's library and ctc's reference interpreter on {inputs}: cosine of the flattened "
                    "outputs"})
    m["per_target"][kind] = float(measured["vs_ir"]["cosine"])
    m["compressed"] = min(m["per_target"].values())


def torch_tensor(x: Any) -> Any:
    """A torch tensor from a backend output (torch, numpy, or anything with __dlpack__)."""
    import numpy as np
    import torch

    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    return torch.from_dlpack(x)


_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, ">": lambda a, b: a > b,
    "==": lambda a, b: math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12),
}


def evaluate_check(c: Check, measured: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One check's result: measured value (in the check's unit), threshold, pass/fail."""
    row: dict[str, Any] = {"check": str(c), "metric": c.metric, "op": c.op, "unit": c.unit, "line": c.span.line}
    m = measured.get(c.metric)
    if m is None:
        why = (": no target ran here on inputs (a target this machine cannot run, or a model whose input sizes "
               "need text data: add a calibrate or evaluate line)" if c.metric in ("target_fidelity", "latency_ms")
               else "")
        row.update(measured=None, threshold=c.value, passed=False, note=f"{c.metric} was not measured{why}")
        return row
    threshold = float(c.value)
    if c.unit == "x":
        value = m["ratio"]
    elif c.unit == "%":
        value = 100.0 * (m["relative"] if c.metric == "ppl_increase" else m["compressed"])
    else:
        value = m["compressed"]
    row.update(measured=value, threshold=threshold, passed=bool(_OPS[c.op](float(value), threshold)))
    return row


# --------------------------------------------------------------------------- driver
def compile_recipe(path: str | Path | Recipe, opts: CompileOptions | None = None) -> CompileResult:
    """Compile the recipe at ``path`` (or an already parsed Recipe); raise RecipeError (2), UsageError (2)
    or ModelError (3) on failure."""
    opts = opts or CompileOptions()
    progress = Progress(opts.progress)
    recipe, warnings = checked_recipe(path)
    for w in warnings:  # shown even with --quiet, and kept in the report
        progress.close_bar()
        print(w.format(), file=sys.stderr, flush=True)
    dest = output_dir(recipe, opts)
    targets = selected_targets(recipe, opts)
    from ctc.errors import OutputDirError
    from ctc.output_dir import check_destination

    try:
        check_destination(dest, force=opts.force, protected=protected_inputs(recipe))
    except OutputDirError as e:
        if opts.out or recipe.emit is None:
            raise
        raise RecipeError(attach_source([Diagnostic(str(e), recipe.emit.span)], recipe.source)) from None
    if opts.check_only:
        return CompileResult(recipe)
    _check_targets_resolve(recipe, targets)

    t_start = time.perf_counter()
    with progress.stage(f"capture {recipe.model.kind} {recipe.model.ref!r}"):  # type: ignore[union-attr]
        loaded = load_model(recipe, progress)
    post = [d for d in check_with_module(recipe, loaded.module) if d.severity == "error"]
    if post:
        raise RecipeError(post)
    if opts.capture_only:
        return CompileResult(recipe, module=loaded.module)
    targets = [fit_target_shapes(t, loaded.module) for t in targets]

    original = loaded.module
    calib: list[dict[str, Any]] = []
    protocol: dict[str, Any] = {}
    if recipe.calibrate is not None:
        with progress.stage("calibration data"):
            calib, protocol["calibrate"] = dataset_batches(recipe, recipe.calibrate, loaded, opts.max_samples)
    evalb: list[dict[str, Any]] = []
    if recipe.evaluate is not None:
        with progress.stage("evaluation data"):
            evalb, protocol["evaluate"] = dataset_batches(recipe, recipe.evaluate, loaded, opts.max_samples)

    warnings = [*warnings, *_data_warnings(recipe, protocol, progress)]
    seed = int(recipe.calibrate.options.get("seed", 0)) if recipe.calibrate else 0
    with progress.stage(f"pipeline ({len(recipe.pipeline)} steps)"):
        results = run_pipeline_all(original, recipe, calib, seed, progress)

    out: list[CompileResult] = []
    for label, module, pipeline_report in results:
        where = dest if not label else dest.with_name(f"{dest.name}-{label}")
        if label:
            progress.info(f"[ctc] variant {label}: {where}")
        out.append(_emit_artifact(recipe, opts, loaded, original, module, pipeline_report, where, targets, calib,
                                  evalb, protocol, progress, t_start, warnings))
    main = out[0]
    main.variants = out[1:]
    return main


def _data_warnings(recipe: Recipe, protocol: Mapping[str, Any], progress: Progress) -> list[Diagnostic]:
    """The data's warnings (windows the text could not fill, text the tokenizer cannot read) at their recipe lines,
    shown as the recipe's warnings are (even with --quiet) and kept in the report with them."""
    out = []
    for ds in (recipe.calibrate, recipe.evaluate):
        if ds is None:
            continue
        span = ds.path_span if ds.path is not None else ds.source_span
        found = [Diagnostic(f"{ds.role}: {w}", span, severity="warning")
                 for w in protocol.get(ds.role, {}).get("warnings", [])]
        for d in attach_source(found, recipe.source):
            progress.close_bar()
            print(d.format(), file=sys.stderr, flush=True)
            out.append(d)
    return out


def _emit_artifact(recipe: Recipe, opts: CompileOptions, loaded: LoadedModel, original: Any, module: Any,
                   pipeline_report: Any, dest: Path, targets: list[Any], calib: list[dict[str, Any]],
                   evalb: list[dict[str, Any]], protocol: dict[str, Any], progress: Progress,
                   t_start: float, warnings: Sequence[Any] = ()) -> CompileResult:
    """Measure one pipeline result, check it, build its targets and write its artifact at ``dest``."""
    wanted = {c.metric for c in recipe.checks} | ({"fidelity"} if evalb else set())
    if loaded.task == TASK_CAUSAL_LM and evalb:
        wanted |= {"ppl"}
    # latency_ms is the compiled target's when the recipe builds one (measured after the build, on the first
    # evaluation batch, else calibration batch, else synthetic inputs), else the torch backend's on evaluation data
    # (which the checker made sure of).
    latency_on = targets[0] if targets and "latency_ms" in wanted else None
    with progress.stage("measure"):
        from ctc.eval.data import protocol_line

        desc = protocol_line(protocol.get("evaluate", {}))
        measured = measure(original, module, loaded, evalb, wanted - ({"latency_ms"} if latency_on else set()),
                           progress, desc)

    from ctc.analysis.blocks import block_view, per_block_bytes

    before, after = per_block_bytes(original), per_block_bytes(module)
    blocks = sorted(set(before) | set(after))
    report: dict[str, Any] = {
        "name": dest.name,
        "ctc_version": _version(),
        "recipe_file": str(recipe.file),
        "recipe_dir": str(Path(recipe.base_dir or Path(recipe.file).parent).absolute()),
        "recipe_text": recipe.source,
        "model": {**loaded.description, "params_before": original.param_count(), "params_after": module.param_count(),
                  "bytes_before": original.param_bytes(), "bytes_after": module.param_bytes(),
                  "read_bytes_before": original.read_param_bytes(), "read_bytes_after": module.read_param_bytes(),
                  "nodes_before": len(original.nodes), "nodes_after": len(module.nodes),
                  "op_counts_before": original.op_counts(), "op_counts_after": module.op_counts()},
        "protocol": protocol,
        "passes": pass_rows(pipeline_report),
        "pipeline": {"seconds": pipeline_report.seconds,
                     "fidelity": pipeline_report.fidelity.to_dict() if pipeline_report.fidelity else None},
        "metrics": measured,
        "warnings": [f"{w.span.line}:{w.span.col}: {w.message}" for w in warnings],
        "per_block": {"blocks": blocks, "original": [before.get(b, 0) for b in blocks],
                      "compressed": [after.get(b, 0) for b in blocks]},
    }
    report["blocks"] = block_view(original, module, report["passes"])
    if pipeline_report.variants:
        report["variants"] = {k: f"{dest.name}-{k}" for k in pipeline_report.variants}

    set_checks(report, recipe.checks)  # again after the target builds when latency_ms is a target's

    from ctc.artifact import write_artifact
    from ctc.targets import build_target

    probe = evalb[0] if evalb else (calib[0] if calib else None)
    inputs = "the first evaluation batch" if evalb else "the first calibration batch"
    unmeasured = None  # why the targets are not measured, when no batch can be made for them
    if probe is None and targets:  # no text data (a CNN): the libraries are checked and timed on synthetic inputs
        from ctc.eval.data import synthetic_batch

        try:
            probe = synthetic_batch(module)  # batch 1 (`batch`, or a .pt2 program's d0)
            inputs = "synthetic inputs (floats N(0, 1), seed 0: the recipe has no calibrate or evaluate data)"
            progress.note(f"the targets are checked against the IR and timed on {inputs}")
        except ValueError as e:  # a dim other than batch (seq) is not sized without data: nothing is measured
            probe = None
            unmeasured = f"no calibrate or evaluate data to size the inputs with ({e})"
            progress.note(f"the targets are not checked against the IR nor timed: {unmeasured}")

    for t in targets:
        for line in t.notes:
            progress.note(f"target {t.kind}: {line}")

    def build_and_measure(t: Any, d: Path) -> dict[str, Any]:
        try:
            built = build_target(module, t, d, example_inputs=probe)
        except Exception as e:
            raise _unbuildable(recipe, t.kind, e) from None
        not_here = built.pop("not_runnable", None) or t.spec.cannot_run_here()  # a build with nothing to run
        summary = {**t.to_json(), **built}
        batch = fit_batch(probe, t.options) if probe is not None else None
        if not_here is not None or (batch is None and unmeasured):  # e.g. a CUDA library built without a GPU here
            summary["measured"] = {"skipped": not_here or unmeasured}
        elif batch is not None:
            with progress.stage(f"measure target {t.kind}"):
                summary["measured"] = measure_target(module, t.kind, d, batch, inputs.removeprefix("the "))
            record_target_fidelity(report, t.kind, summary["measured"], inputs)
            set_checks(report, recipe.checks)
            if t is latency_on:
                relative = any(c.metric == "latency_ms" and c.unit == "x" for c in recipe.checks)
                with progress.stage(f"latency_ms on target {t.kind}" + (" (building the original too)"
                                                                        if relative else "")):
                    lat = target_latency(original, t, summary["measured"], batch, with_original=relative)
                lat["doc"] = METRICS["latency_ms"].doc
                report["metrics"]["latency_ms"] = lat
                set_checks(report, recipe.checks)
        if t is targets[0] and batch is not None:
            from ctc.analysis.report import report_roofline

            with progress.stage(f"roofline on target {t.kind}"):
                report["roofline"] = report_roofline(module, t, d, batch, summary.get("measured") or {},
                                                     profile=not_here is None)
        return summary

    builds = [(t.kind, lambda d, t=t: build_and_measure(t, d)) for t in targets]
    exports = export_builders(recipe, module, dest.name, probe, loaded, progress)
    with progress.stage(f"write artifact {dest}"):
        report["compile_time_s"] = round(time.perf_counter() - t_start, 2)
        dest = write_artifact(dest, module=module, report=report, recipe_text=recipe.source,
                              tokenizer_dir=loaded.tokenizer_dir, build_targets=builds, build_exports=exports,
                              force=opts.force, protected=protected_inputs(recipe), log=progress.note)
    return CompileResult(recipe, dest, report, module)


def export_builders(recipe: Recipe, module: Any, name: str, probe: Mapping[str, Any] | None, loaded: LoadedModel,
                    progress: Progress) -> list[tuple[str, Callable[[Path], dict[str, Any]]]]:
    """``(format, build(dir) -> summary)`` for each ``emit FORMAT`` line: the writer of :mod:`ctc.exports`
    on the compressed module, the first evaluation batch as its example, the artifact's parameters at hand."""
    from ctc.exports import EXPORTS, export_config
    from ctc.exports.source import ExportSource, example_feed

    out = []
    for e in recipe.exports:
        opts = export_config(e.format, e.options)

        def build(d: Path, fmt: str = e.format, opts: Any = opts) -> dict[str, Any]:
            from ctc.artifact import PARAMS_FILE

            example = dict(probe) if probe is not None else example_feed(module, loaded.tokenizer)
            src = ExportSource(module, name, example, loaded.tokenizer_dir, params_file=d.parent.parent / PARAMS_FILE)
            with progress.stage(f"emit {fmt}"):
                return {"options": dataclasses.asdict(opts), **EXPORTS[fmt].write_function()(src, d, opts)}
        out.append((e.format, build))
    return out


def _unbuildable(recipe: Recipe, kind: str, e: Exception) -> Exception:
    """A lowering failure (an op the target has no kernel for, with the node's scope) or a target this machine
    cannot resolve as an error located at the recipe's ``target`` line, or at ``--target`` when the recipe has
    none; any other exception unchanged."""
    lower = sys.modules.get("ctc.backends.tvm.lower")  # imported by every backend that lowers
    tvm_targets = sys.modules.get("ctc.backends.tvm.targets")
    if tvm_targets is not None and isinstance(e, tvm_targets.UnsupportedTarget):
        return _target_error(recipe, kind, str(e).removeprefix(f"target {kind}: "))
    if lower is None or not isinstance(e, lower.LoweringError):
        return e
    return _target_error(recipe, kind, f"the compressed model cannot be built for it: {e}")


def _target_error(recipe: Recipe, kind: str, message: str) -> Exception:
    from ctc.dsl.diagnostics import one_line

    message = one_line(message)  # a backend's message may list items on lines of their own ("  - conv (at ...)")
    span = next((t.span for t in recipe.targets if t.kind == kind), None)
    if span is None:
        return UsageError(f"--target {kind}: {message}")
    return RecipeError(attach_source([Diagnostic(f"target {kind}: {message}", span)], recipe.source))


def _check_targets_resolve(recipe: Recipe, targets: Sequence[Any]) -> None:
    """Each TVM target resolves on this machine (``target cuda`` without ``arch=`` needs a visible GPU), checked
    before the model is loaded rather than when the build starts, after capture, calibration and the passes.
    Not part of ``--check-only``: resolving imports TVM (seconds)."""
    from ctc.targets import TARGETS

    for t in targets:
        if TARGETS[t.kind].backend != "ctc.backends.tvm":
            continue
        from ctc.backends.tvm.targets import UnsupportedTarget, resolve

        try:
            resolve(t.kind, t.options)
        except UnsupportedTarget as e:
            raise _unbuildable(recipe, t.kind, e) from None


def _version() -> str:
    from ctc import __version__

    return __version__


def report_summary(report: Mapping[str, Any]) -> str:
    """A few human lines: model sizes, measured metrics, each check's verdict, targets."""
    lines = []
    m = report.get("model", {})
    if m:
        lines.append(f"model {m.get('kind', '')} {m.get('ref', '')!r} ({m.get('arch', '')}, {m.get('task', '')}): "
                     f"params {m.get('params_before', 0):,} -> {m.get('params_after', 0):,}, "
                     f"bytes {m.get('bytes_before', 0):,} -> {m.get('bytes_after', 0):,}, "
                     f"nodes {m.get('nodes_before')} -> {m.get('nodes_after')}")
    for p in report.get("passes", []):
        lines.append(f"  pass {p.get('name')}: {p.get('summary') or ''}".rstrip())
    for k, v in report.get("metrics", {}).items():
        if k in ("params", "param_bytes"):
            continue
        if k == "target_fidelity":  # no original: each target against the IR it compiled
            lines.append(f"  {k}: " + ", ".join(f"{t} {_short(c)}" for t, c in v["per_target"].items()))
            continue
        lines.append(f"  {k}: original {_short(v.get('original'))}, compressed {_short(v.get('compressed'))}")
    ev = (report.get("protocol") or {}).get("evaluate")
    if isinstance(ev, Mapping) and report.get("metrics"):
        from ctc.eval.data import protocol_line

        lines.append(f"  measured on: {protocol_line(ev)}; {ev.get('split')} split, {ev.get('windows')} windows of "
                     f"{ev.get('seq_len')} tokens, stride {ev.get('stride', ev.get('seq_len'))}"
                     + (f"; decode step: {ev['decode_step']}" if ev.get("decode_step") else ""))
    for c in report.get("checks", []):
        verdict = "ok  " if c["passed"] else "FAIL"
        lines.append(f"  [{verdict}] {c['check']}  (measured {_short(c.get('measured'))})"
                     + (f" {c['note']}" if c.get("note") else ""))
    for t in report.get("targets", []):
        m = t.get("measured") or {}
        if "skipped" in m:
            extra = f"  (not measured: {m['skipped']})"
        elif "estimated_latency_ms" in m:  # a simulated target (fpga): the model's latency, the C-sim verdict
            extra = (f"  {m['estimated_latency_ms']} ms estimated, C simulation bit-exact "
                     f"{m['bit_exact_vs_integer_model']}, cosine vs IR {m['vs_ir']['cosine']:.6f}")
        else:
            extra = (f"  {m['latency_ms']} ms (torch backend {m['torch_backend_latency_ms']} ms), "
                     f"cosine vs IR {m['vs_ir']['cosine']:.6f}" if m else "")
        lines.append(f"  target {t.get('kind')}: {t.get('dir')}{extra}")
        if t.get("fp32_matmul") not in (None, "strict"):  # f32 linears on AMX-BF16 (docs/tvm-cpu-backend.md)
            lines.append(f"    f32 linears: fp32_matmul={t['fp32_matmul']} (AMX-BF16 tiles, bf16-split operands)")
        tuning = t.get("tuning") or {}
        if tuning:
            lines.append("    " + tuning_line(tuning))
        for note in t.get("target_notes", []):
            lines.append(f"    note: {note}")
        if t.get("kind") == "cuda":  # the lowering's choices (the persistent decode step: used, or why not)
            lines.extend(f"    note: {note}" for note in t.get("notes", []))
    for e in report.get("exports", []):
        lines.append(f"  export {e.get('format')}: {e.get('dir')}" + export_line(e))
    if report.get("passed") is False:
        lines.append("checks failed: " + ", ".join(report.get("failed_checks", [])))
    return "\n".join(lines)


def export_line(e: Mapping[str, Any]) -> str:
    """How an export was checked against the module (its writer's load-back comparison)."""
    check = e.get("verified") or e.get("load_back") or {}
    rows = check.get("outputs") or []
    if not rows:
        return ""
    worst = max(rows, key=lambda r: r.get("relative", 0))
    by = check.get("reader") or check.get("compiler") or "load-back"
    return (f"  ({by}: max |diff| {worst['max_abs_error']:.3g}, relative {worst['relative']:.3g}, "
            f"cosine {worst['cosine']:.6f})")


def tuning_line(t: Mapping[str, Any]) -> str:
    """One line saying what tuning did, with the database's own counts."""
    used, kept = t.get("tuned_kernels_used", []), t.get("kept_default", [])
    parts = [f"tuning ({t.get('trials')} trials): {t.get('tasks_with_records', 0)} of {t.get('tunable', 0)} tunable "
             f"tasks have records ({t.get('trials_measured_now', 0)} measured now, "
             f"{t.get('records_in_database', 0)} in the database)"]
    if t.get("symbolic"):
        parts.append(f"{len(t['symbolic'])} tasks with symbolic dims not tunable")
    parts.append(f"tuned kernels used: {len(used)}" + (f", {len(kept)} slower than the default schedule" if kept
                                                          else ""))
    if t.get("failed"):
        parts.append("FAILED: " + ", ".join(t["failed"]))
    return "; ".join(parts)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


# --------------------------------------------------------------------------- ctc eval / ctc bench
def refuse_simulated(art: Any, target: str | None) -> None:
    """Raise UsageError when ``target``'s library runs here only as a simulation (fpga: gcc's C simulation), whose
    times are not the design's; checked before anything loads it (a ``csim=false`` design has nothing to load)."""
    from ctc.targets import TARGETS

    if target not in art.targets or target not in TARGETS or not TARGETS[target].simulated:
        return
    name = f"targets/{target}/report.json"
    try:  # the design's own model, from its report (as checked against the manifest: a hand-edited one is refused)
        text = art.manifest.read_text(name) if art.manifest is not None else (Path(art.path) / name).read_text()
        est = float(json.loads(text)["totals"]["latency_ms"])
    except (OSError, ValueError, KeyError, TypeError):
        est = None
    modelled = f"its modelled latency: {est} ms; " if est is not None else ""
    raise UsageError(f"the {target} library runs on this machine only as a C simulation, whose times are not the "
                     f"design's ({modelled}per layer in targets/{target}/report.json, and `ctc show ART`)")


def bench_artifact(art: Any, *, target: str | None, batch: int | None, seq_len: int | None, repeat: int,
                   threads: int | None, profile: int = 0) -> dict[str, Any]:
    """Latency (ctc.eval.latency protocol) and peak memory of one batch through the torch backend or a target;
    ``profile`` > 0 adds that many of the slowest kernels of a compiled target (per-kernel wall time).
    ``batch`` / ``seq_len`` None: what the target's library was built for (``batch=`` / ``seq_len=`` on its
    target line, a tuned build), else 1 and 128."""
    import resource

    import torch

    from ctc.analysis.roofline import refuse_absent_dims
    from ctc.eval.latency import MIN_RUNS, machine_info, measure_latency
    from ctc.targets import MAX_CPU_THREADS

    refuse_simulated(art, target)
    given = {"seq_len": seq_len, "batch": batch}  # as the user gave them (None: left out)
    fixed = art.fixed_seq_len(target) if target is not None else None
    if fixed is not None and seq_len is not None and seq_len != fixed:
        raise UsageError(f"--seq-len {seq_len}: this {target} library was built for {fixed} tokens (`seq_len=` on its "
                         f"target line): give --seq-len {fixed} or leave it out")
    limit = art.seq_limit()  # the default length stays within the model's positions (a 64-position BERT)
    seq_len = seq_len if seq_len is not None else fixed or min(128, limit[0] if limit else 128)
    rows = art.fixed_batch(target) if target is not None else None
    if rows is not None and batch is not None and batch != rows:
        raise UsageError(f"--batch {batch}: this {target} library was built for batch {rows} (`batch=` on its target "
                         f"line, or a tuned build): give --batch {rows} or leave it out")
    batch = batch if batch is not None else rows or 1
    if batch < 1 or seq_len < 2:
        raise UsageError("--batch must be >= 1 and --seq-len >= 2")
    if repeat < MIN_RUNS:
        raise UsageError(f"--repeat must be >= {MIN_RUNS} (a median and p90 need at least {MIN_RUNS} timed runs), "
                         f"got {repeat}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1 (leave it out for the default), got {threads}")
    if threads is not None and threads > MAX_CPU_THREADS:  # a library's pool runs at most that many
        raise UsageError(f"--threads must be <= {MAX_CPU_THREADS} (a CPU library's pool runs at most that many), "
                         f"got {threads}")
    if profile and target is None:
        raise UsageError("--profile times the kernels of a compiled library: add --target KIND")
    names = [v.name for v in art.module.inputs]
    sizes: dict[str, int] = {"batch": batch, "seq_len": seq_len}  # what the result says the inputs were
    if art.module.meta.get("task") == TASK_DECODE_STEP:  # one step at position seq_len of zeroed caches
        from ctc.ir.types import torch_dtype

        max_len = int(art.module.meta["decode"]["max_len"])
        feed = {v.name: torch.zeros([int(d) for d in v.type.shape], dtype=torch_dtype(v.type.dtype))
                for v in art.module.inputs}
        feed["position"] = torch.tensor([min(seq_len, max_len - 1)])
    elif art.tokenizer_dir is not None:
        from ctc.eval.data import lee_test

        tok = art.tokenizer()
        ids = tok(" ".join(lee_test()), add_special_tokens=False, verbose=False)["input_ids"]
        ids = (ids * -(-seq_len // len(ids)))[:seq_len]  # the text again past its end: seq_len tokens, as reported
        window = torch.tensor(ids, dtype=torch.long).unsqueeze(0).repeat(batch, 1)
        feed_all = {"input_ids": window, "attention_mask": torch.ones_like(window),
                    "token_type_ids": torch.zeros_like(window),
                    "position_ids": torch.arange(seq_len).expand_as(window).contiguous()}
        missing = [n for n in names if n not in feed_all]
        if missing:
            raise UsageError(f"cannot make inputs {missing} from text; use `ctc run --input` style tensors")
        feed = {n: feed_all[n] for n in names}
    else:  # no text to make inputs of (a CNN, a .pt2): seeded synthetic inputs of the model's shapes
        from ctc.eval.data import synthetic_batch

        b_sym, s_sym = refuse_absent_dims(art.module, **given)  # `batch`/`seq`, or a .pt2 program's d0/d1
        try:
            feed = synthetic_batch(art.module, batch=batch, seq_len=seq_len)
        except ValueError as e:
            raise UsageError(f"{e}: ctc bench sizes only batch (--batch) and seq (--seq-len); time this model from "
                             "Python with inputs of your own (ctc.load(ART).runner(KIND))") from None
        kinds = sorted({"floats N(0, 1)" if t.is_floating_point() else "integers" for t in feed.values()})
        sizes = {k: n for k, n, sym in (("batch", batch, b_sym), ("seq_len", seq_len, s_sym)) if sym}
        sizes["inputs"] = (", ".join(f"{v.name} {v.type.dtype}{list(feed[v.name].shape)}" for v in art.module.inputs)
                           + f" (synthetic: {', '.join(kinds)}, seed 0)")
    library = _library_with_threads(art, target, threads) if target is not None else None
    art.run(feed, target=target)  # inputs checked once; the library loaded outside the timed region
    if library is None:
        res = measure_latency(lambda: art.run(feed), runs=repeat, warmup=3, threads=threads, label="torch")
    else:
        res = _library_threads(measure_latency(lambda: library(feed), runs=repeat, warmup=3, label=target), library)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out = {"backend": target or "torch (reference)", **sizes,
           "median_ms": round(res.median_ms, 3), "p90_ms": round(res.p90_ms, 3), "min_ms": round(res.min_ms, 3),
           "protocol": res.protocol, "peak_rss_mb": round(peak_mb, 1),
           "param_mb": round(art.module.param_bytes() / 2**20, 2), "cpu": machine_info().get("cpu", "")}
    if profile:
        runner = art.runner(target)
        if not hasattr(runner, "profile"):
            raise UsageError(f"the {target} backend's runtime cannot time its kernels (no profile())")
        rows = runner.profile(feed, runs=5)
        total = sum(r.ms_per_run for r in rows) or 1.0
        out["kernels"] = [{"kernel": r.name, "calls": r.calls_per_run, "ms_per_call": round(r.ms_per_call, 4),
                           "ms_per_run": round(r.ms_per_run, 4), "share": round(r.ms_per_run / total, 4)}
                          for r in rows[:profile]]
    return out


def _library_with_threads(art: Any, target: str, threads: int | None) -> Any:
    """The loaded library of ``target``, with ``threads`` worker threads when given.  A CPU library sizes its
    pool when it loads (from ``TVM_NUM_THREADS`` unless its target line fixed ``threads=``), so a count it
    cannot take is a :class:`UsageError`, never a measurement labelled with a count it did not run."""
    if threads is None:
        return art.runner(target)
    before = os.environ.get("TVM_NUM_THREADS")
    os.environ["TVM_NUM_THREADS"] = str(threads)  # read by the library's loader if this loads it
    try:
        library = art.runner(target)
    finally:  # the process's setting is the caller's again
        if before is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = before
    have = getattr(library, "threads", None)
    if getattr(library, "device", "cpu") != "cpu":
        raise UsageError(f"--threads {threads}: a {target} library runs on its GPU, not on CPU threads; leave "
                         "--threads out")
    if have != threads:
        why = (f"runs {have} worker threads (fixed by its target's `threads=` option or when it was first loaded)"
               if have is not None else "sets no thread count")
        raise UsageError(f"--threads {threads}: this {target} library {why}; leave --threads out, or rebuild "
                         f"with `target {target} threads={threads}`")
    return library


__all__ = ["CompileOptions", "CompileResult", "ModelError", "UsageError", "bench_artifact", "compile_recipe",
           "load_checked_recipe", "report_summary"]
