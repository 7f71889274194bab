"""Semantic checks of a parsed Recipe: names, options, files, and (after capture) selectors.

``check_recipe`` runs before any heavy work (no model is loaded): every pass name and
option against the pass registry, targets, metrics, dataset sources and bundled model
names with "did you mean" suggestions, wrong types, out-of-range values and missing files.
``check_with_module`` runs once the model is captured: selectors that match nothing and
metrics that do not apply to the model's task.  Both return a list of
:class:`~ctc.dsl.diagnostics.Diagnostic` (empty = fine), each pointing at a span.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctc.dsl.ast import Check, Dataset, EmitFormat, ModelSource, Recipe, RecipeStep, Span, Target
from ctc.dsl.diagnostics import Diagnostic, attach_source, did_you_mean
from ctc.options import OptionError, Options, option
from ctc.passes.base import PassError
from ctc.positions import config_positions
from ctc.targets import TARGETS, TRIALS_HELP
from ctc.tasks import TASK_CAUSAL_LM

# What option construction raises: the option machinery, and a pass's own validate (PassError).
_OPTION_ERRORS = (OptionError, PassError)

# --------------------------------------------------------------------------- model sources
MODEL_KINDS = {
    "bundled": "a real model that ships with ctc's dependencies (see `ctc show --bundled`)",
    "hf": "a Hugging Face model directory (config.json + weights), loaded offline",
    "pt2": "a torch.export ExportedProgram saved with torch.export.save (.pt2)",
}


def bundled_model_names() -> list[str]:
    """Names accepted by ``model bundled "..."`` (the catalogue of ctc.bundled)."""
    from ctc.bundled import bundled_names

    return list(bundled_names())


# --------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class DatasetOptions(Options):
    """Options of `calibrate`/`evaluate` statements."""

    samples: int = option(32, "number of text windows (calibration batches / evaluation windows)", min=1, max=100000)
    seq_len: int = option(128, "tokens per window", min=8, max=32768)
    seed: int = option(0, "seed for choosing windows (deterministic)", min=0)
    batch_size: int = option(1, "windows per batch", min=1, max=4096)
    field: str | None = option(None, "jsonl only: the field holding the text")
    skip: int = option(0, "tokens of the text to skip before the first window (keeps evaluation text apart "
                          "from calibration text in one file)", min=0)
    limit: int = option(0, "use at most this many tokens after skip (0 = all)", min=0)

    def validate(self) -> None:
        if self.field is not None and not self.field.strip():
            raise OptionError('option field="" is empty: name the JSON field that holds the text, e.g. field="text"')


DATASET_SOURCES = {
    "wiki": "English Wikipedia articles shipped with gensim (calibration/evaluation split by article)",
    "lee": "Lee news corpus shipped with gensim (300 background + 50 test documents)",
    "text": 'a UTF-8 text file: `text "file.txt"`',
    "jsonl": 'a JSON-lines file, one object per line: `jsonl "file.jsonl" field="text"`',
}
_FILE_SOURCES = {"text", "jsonl"}


# --------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class MetricSpec:
    """A measurable quantity a `check` can bound."""

    name: str
    doc: str
    units: tuple[str | None, ...]
    tasks: tuple[str, ...] | None = None  # None = any model
    needs_eval: bool = True


METRICS: dict[str, MetricSpec] = {m.name: m for m in [
    MetricSpec("ppl", "perplexity of the compressed model on the evaluation text (x: ratio to the original)",
               (None, "x"), (TASK_CAUSAL_LM,)),
    MetricSpec("ppl_increase", "perplexity increase over the original (absolute, or % relative)",
               (None, "%"), (TASK_CAUSAL_LM,)),
    MetricSpec("fidelity", "cosine similarity of the outputs to the original model's over the evaluation "
               "windows (0..1, or %)", (None, "%")),
    MetricSpec("target_fidelity", "cosine similarity of each compiled target's outputs to the IR's (the compressed "
               "model it compiled) on the first evaluation batch, the lowest over targets (0..1, or %); without "
               "this check every measured target must reach 0.99 (without text data: on synthetic inputs)", (None, "%"),
               needs_eval=False),
    MetricSpec("kl", "mean KL divergence of next-token distributions from the original's", (None,), (TASK_CAUSAL_LM,)),
    MetricSpec("max_error", "largest absolute output difference from the original", (None,)),
    MetricSpec("params", "parameter count (x: ratio to the original)", (None, "x"), needs_eval=False),
    MetricSpec("param_bytes", "parameter bytes (x: ratio to the original)", (None, "x"), needs_eval=False),
    MetricSpec("latency_ms", "median latency of one evaluation batch in ms on the recipe's first target (the "
               "compiled library; without an evaluate line the first calibration batch, else synthetic inputs), or "
               "the torch backend when it builds none, which needs evaluation data (x: ratio to the original on the "
               "same backend; with a target the original is built for it too)", (None, "x")),
]}

COSINE_METRICS = ("fidelity", "target_fidelity")
TARGET_FIDELITY_FLOOR = 0.99
"""The agreement every measured target must reach with the IR it compiled when no `check target_fidelity` sets
one: a library below it computes something else than the artifact's model (a backend fault), not a compression
trade-off."""

# --------------------------------------------------------------------------- helpers
def option_diagnostics(opts_cls: type[Options], options: dict[str, Any], spans: dict[str, Span], whole: Span,
                       what: str, also: Sequence[str] = ()) -> list[Diagnostic]:
    """Strictly validate ``options`` against ``opts_cls``, locating each error at its option (a
    contradiction between options, found only by the whole set, at the statement). ``also``: names the
    statement takes beside the options (a target's ``trials``), offered for a misspelt one and listed."""
    try:
        opts_cls.from_dict(options, owner=what)
        return []
    except _OPTION_ERRORS:
        pass
    diags: list[Diagnostic] = []
    known = [f.name for f in dataclasses.fields(opts_cls)]
    good: dict[str, Any] = {}
    # Each option is checked next to the other options that are valid on their own, so a
    # cross-field check (a width the chosen board lacks) is reported at the option it concerns.
    alone = {k: v for k, v in options.items() if k in known and _valid(opts_cls, {k: v}, what)}
    for k, v in options.items():
        span = spans.get(k, whole)
        if k not in known:
            names = [*known, *also]
            diags.append(Diagnostic(f"{what} has no option {k!r}{did_you_mean(k, names)}", span,
                                    hint=f"options: {', '.join(names) or 'none'}"))
            continue
        others = {o: w for o, w in alone.items() if o != k}
        try:
            opts_cls.from_dict({**others, k: v}, owner=what)
        except _OPTION_ERRORS as e:
            if k in alone and not _valid(opts_cls, others, what):  # the others contradict each other: not k's
                good[k] = v
                continue
            spec = next(s for s in opts_cls.specs() if s.name == k)
            if not any(d.message == f"{what}: {e}" for d in diags):  # a contradiction: blamed once, first option
                diags.append(Diagnostic(f"{what}: {e}", span, hint=_spec_hint(spec)))
            continue
        good[k] = v
    if not diags:
        try:
            opts_cls.from_dict(good, owner=what)
        except _OPTION_ERRORS as e:
            diags.append(Diagnostic(f"{what}: {e}", whole))
    return diags


def _valid(opts_cls: type[Options], values: dict[str, Any], what: str) -> bool:
    try:
        opts_cls.from_dict(values, owner=what)
    except _OPTION_ERRORS:
        return False
    return True


def _spec_hint(spec: Any) -> str:
    parts = [f"{spec.name}: {spec.type}"]
    if spec.min is not None or spec.max is not None:
        parts.append(f"range [{'' if spec.min is None else spec.min}, {'' if spec.max is None else spec.max}]")
    if spec.choices:
        parts.append("one of " + ", ".join(repr(c) for c in spec.choices))
    parts.append(f"default {spec.default!r}")
    return "; ".join(parts) + (f" — {spec.doc}" if spec.doc else "")


def resolve_path(recipe: Recipe, p: str) -> Path:
    """Paths in a recipe are relative to the recipe file's directory (the working directory for a
    recipe read from a pipe)."""
    path = Path(p).expanduser()
    if path.is_absolute():
        return path
    if recipe.base_dir is not None:
        return Path(recipe.base_dir) / path
    if recipe.file.startswith("<"):
        return path
    return Path(recipe.file).parent / path


# --------------------------------------------------------------------------- static checks
def _decode_len(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 1 << 20:
        return "must be an integer cache length in [2, 1048576] (decode=N captures one generation step over " \
               "an N-position KV cache)"
    return None


def _model_dtype(v: Any) -> str | None:
    return None if v in ("f32", "f16", "bf16") else "must be one of \"f32\", \"f16\", \"bf16\""


# Options of `model bundled|hf`: decode=N captures the static decode step (ctc.frontends.decode) of a
# causal LM instead of its full-sequence forward; dtype casts the weights before capture.
MODEL_OPTIONS: dict[str, Any] = {"decode": _decode_len, "dtype": _model_dtype}


def _model_task(v: Any) -> str | None:
    from ctc.tasks import MODEL_TASKS, normalize_task

    if isinstance(v, str) and normalize_task(v) in MODEL_TASKS:
        return None
    return "must be one of " + ", ".join(repr(t.replace("_", "-")) for t in MODEL_TASKS) + \
        " (default: read from the model through transformers' auto-model mappings)"


def _model_attn(v: Any) -> str | None:
    return None if v in ("sdpa", "eager") else \
        "must be \"sdpa\" or \"eager\" (default: sdpa where the model supports it, else eager)"


def _model_gguf(v: Any) -> str | None:
    return None if isinstance(v, str) and v.endswith(".gguf") else "must name a .gguf file in the model directory"


# `model hf` also takes the task, the attention implementation and a GGUF checkpoint in the directory.
HF_MODEL_OPTIONS: dict[str, Any] = {**MODEL_OPTIONS, "task": _model_task, "attn": _model_attn, "gguf": _model_gguf}


def _check_model(recipe: Recipe, m: ModelSource | None, whole: Span) -> list[Diagnostic]:
    if m is None:
        return [Diagnostic("the recipe names no model", whole, hint='add a line like `model bundled "minilm"`')]
    if m.kind not in MODEL_KINDS:
        return [Diagnostic(f"unknown model source {m.kind!r}{did_you_mean(m.kind, MODEL_KINDS)}", m.kind_span,
                           hint="model sources: " + ", ".join(MODEL_KINDS))]
    diags = []
    allowed = HF_MODEL_OPTIONS if m.kind == "hf" else MODEL_OPTIONS if m.kind == "bundled" else {}
    for k, s in m.option_spans.items():
        if k not in allowed:
            known = f" (options: {', '.join(allowed)})" if allowed else ""
            diags.append(Diagnostic(f"model {m.kind} takes no option {k!r}{did_you_mean(k, list(allowed))}{known}", s))
            continue
        why = allowed[k](m.options[k])
        if why:
            diags.append(Diagnostic(f"model option {k}={m.options[k]!r}: {why}", s))
    if m.kind == "bundled":
        names = bundled_model_names()
        if not names:
            diags.append(Diagnostic("no bundled models are available in this installation (ctc.bundled)",
                                    m.ref_span))
        elif m.ref not in names:
            diags.append(Diagnostic(f"unknown bundled model {m.ref!r}{did_you_mean(m.ref, names)}", m.ref_span,
                                    hint="bundled models: " + ", ".join(names)))
    elif m.kind == "hf":
        p = resolve_path(recipe, m.ref)
        if not p.exists():
            diags.append(Diagnostic(f"model directory not found: {p}", m.ref_span,
                                    hint="paths are relative to the recipe file's directory"))
        elif not p.is_dir() or not (p / "config.json").is_file():
            diags.append(Diagnostic(f"{p} is not a Hugging Face model directory (no config.json)", m.ref_span))
        elif isinstance(m.options.get("gguf"), str) and not (p / str(m.options["gguf"])).is_file():
            diags.append(Diagnostic(f"no file {m.options['gguf']!r} in {p}", m.option_spans.get("gguf", m.span),
                                    hint="gguf= names a .gguf file inside the model directory"))
    elif m.kind == "pt2":
        p = resolve_path(recipe, m.ref)
        if not p.is_file():
            diags.append(Diagnostic(f"exported program not found: {p}", m.ref_span,
                                    hint="paths are relative to the recipe file's directory"))
        elif p.suffix != ".pt2":
            diags.append(Diagnostic(f"{p.name} is not a .pt2 file (save one with torch.export.save)", m.ref_span))
    return diags


def _check_dataset(recipe: Recipe, d: Dataset) -> list[Diagnostic]:
    if d.source not in DATASET_SOURCES:
        return [Diagnostic(f"unknown dataset {d.source!r}{did_you_mean(d.source, DATASET_SOURCES)}", d.source_span,
                           hint="datasets: " + ", ".join(DATASET_SOURCES))]
    diags = option_diagnostics(DatasetOptions, d.options, d.option_spans, d.span, d.role)
    if d.source in _FILE_SOURCES:
        if d.path is None:
            diags.append(Diagnostic(f"dataset {d.source} needs a file: `{d.role} {d.source} \"path\"`", d.source_span))
        else:
            p = resolve_path(recipe, d.path)
            if p.is_dir():
                diags.append(Diagnostic(f"data path {p} is a folder; {d.source} data is one file", d.path_span,
                                        hint="name a file in it (join several into one file, or into one .jsonl)"))
            elif not p.is_file():
                diags.append(Diagnostic(f"data file not found: {p}", d.path_span,
                                        hint="paths are relative to the recipe file's directory"))
        if d.source == "jsonl" and "field" not in d.options:
            diags.append(Diagnostic("jsonl data needs field=\"...\" naming the text field", d.span))
    else:
        if d.path is not None:
            diags.append(Diagnostic(f"dataset {d.source} is bundled and takes no file", d.path_span))
    if d.source != "jsonl" and "field" in d.options:
        diags.append(Diagnostic("field= only applies to jsonl data", d.option_spans["field"]))
    return diags


NO_TEXT_HINT = ("a .pt2 model has no tokenizer, and recipe data is text: calibrate it from Python instead, "
                "PassManager(steps, calibration=[{input_name: tensor}, ...]) (docs/pass-manager.md)")


def _check_step(step: RecipeStep, has_calibration: bool, valid: set[str] | None = None,
                text_model: bool = True) -> list[Diagnostic]:
    """Diagnostics of one pipeline step; ``valid`` remembers option sets already found valid in this
    recipe (a recipe repeating a step is checked in linear time with a small constant)."""
    from ctc.ir.ops import all_ops
    from ctc.passes.base import all_passes

    passes = all_passes()
    if step.name not in passes:
        return [Diagnostic(f"unknown pass {step.name!r}{did_you_mean(step.name, passes)}", step.name_span,
                           hint="`ctc passes` lists every pass and its options")]
    cls = passes[step.name]
    key = f"{step.name} {sorted(step.options.items())!r}"
    if valid is not None and key in valid:
        diags: list[Diagnostic] = []
    else:
        diags = option_diagnostics(cls.Options, step.options, step.option_spans, step.span, f"pass {step.name}")
        if not diags and valid is not None:
            valid.add(key)
    needs = cls.uses_calibration()
    if needs and not diags:
        try:
            needs = cls(step.options).calibration_needed()
        except Exception:  # noqa: BLE001 - option errors are reported above
            pass
    if needs and not has_calibration:
        diags.append(Diagnostic(f"pass {step.name} needs calibration data", step.name_span,
                                hint="add e.g. `calibrate wiki samples=32 seq_len=128`" if text_model else
                                NO_TEXT_HINT + "; or give the pass options that need none"))
    ops = all_ops()
    seen: dict[Any, Span] = {}
    for s in step.selectors:
        key = (s.kind, s.value if not isinstance(s.value, list) else tuple(s.value))
        if key in seen:
            diags.append(Diagnostic("selector given twice", s.span))
        seen[key] = s.span
        if s.kind == "blocks":
            lo, hi = s.value
            if hi <= lo:
                diags.append(Diagnostic(f"empty block range blocks[{lo}:{hi}]: the end must be above the start",
                                        s.span, hint="ranges are half-open: blocks[4:8] is blocks 4, 5, 6, 7"))
        elif s.kind == "op" and s.value not in ops:
            diags.append(Diagnostic(f"unknown op {s.value!r}{did_you_mean(s.value, ops)}", s.span))
        elif s.kind == "scope" and not s.value:
            diags.append(Diagnostic("empty scope pattern", s.span))
    return diags


def target_config(t: Target) -> Any:
    """The validated :class:`~ctc.targets.TargetConfig` of a checked target."""
    from ctc.targets import TargetConfig

    spec = TARGETS[t.kind]
    return TargetConfig(t.kind, spec.Options.from_dict(t.options, owner=f"target {t.kind}"), int(t.trials or 0))


def _check_tuning_dir(recipe: Recipe, t: Target) -> list[Diagnostic]:
    """An empty ``tuning_dir`` would silently mean the default cache, a file there fails only after capture."""
    tdir = t.options.get("tuning_dir")
    if not isinstance(tdir, str):
        return []
    span = t.option_spans.get("tuning_dir", t.span)
    if not tdir.strip():
        return [Diagnostic(f"target {t.kind}: tuning_dir is empty", span,
                           hint="name a directory (relative to the recipe), or leave the option out for the "
                                "default ~/.cache/ctc/tuning")]
    p = resolve_path(recipe, tdir).expanduser()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return [Diagnostic(f"target {t.kind}: tuning_dir {p} cannot be a directory: {probe} is a file", span,
                           hint="name a directory for the tuning database")]
    return []


def _check_target(t: Target, seen: dict[str, Span], recipe: Recipe) -> list[Diagnostic]:
    if t.kind not in TARGETS:
        return [Diagnostic(f"unknown target {t.kind!r}{did_you_mean(t.kind, TARGETS)}", t.kind_span,
                           hint="targets: " + ", ".join(TARGETS) + " (see `ctc targets`)")]
    diags = []
    if t.kind in seen:
        f = seen[t.kind]
        diags.append(Diagnostic(f"target {t.kind} given twice", t.kind_span, hint=f"the first is at {f.line}:{f.col}"))
    seen[t.kind] = t.kind_span
    spec = TARGETS[t.kind]
    diags += option_diagnostics(spec.Options, t.options, t.option_spans, t.span, f"target {t.kind}",
                                also=("trials",) if spec.trials else ())
    diags += _check_tuning_dir(recipe, t)
    if t.trials is not None:
        span = t.option_spans.get("trials", t.span)
        if not spec.trials:
            diags.append(Diagnostic(f"target {t.kind}: trials= is the meta-schedule tuning budget of targets "
                                    f"{', '.join(k for k, s in TARGETS.items() if s.trials)}", span,
                                    hint=f"leave it out: target {t.kind} tunes with tune=true (the default; "
                                         "`ctc targets` lists its options)"))
        elif isinstance(t.trials, bool) or not isinstance(t.trials, int):
            diags.append(Diagnostic(f"target {t.kind}: trials must be an int, got {t.trials!r}", span,
                                    hint=TRIALS_HELP))
        elif t.trials < 0:
            diags.append(Diagnostic(f"target {t.kind}: trials={t.trials} is below its minimum 0", span,
                                    hint=TRIALS_HELP))
    why = spec.unsupported_reason()
    if why:
        diags.append(Diagnostic(f"target {t.kind} cannot be built: {why}", t.kind_span,
                                hint="drop the target line to compile without it"))
    return diags


def _check_export(e: EmitFormat, seen: dict[str, Span]) -> list[Diagnostic]:
    from ctc.exports import EXPORTS

    if e.format not in EXPORTS:
        return [Diagnostic(f"unknown export format {e.format!r}{did_you_mean(e.format, EXPORTS)}", e.format_span,
                           hint="formats: " + ", ".join(EXPORTS) + '; `emit "DIR"` (quoted) sets the artifact '
                                                                   "directory")]
    diags = []
    if e.format in seen:
        f = seen[e.format]
        diags.append(Diagnostic(f"emit {e.format} given twice", e.format_span,
                                hint=f"the first is at {f.line}:{f.col}"))
    seen[e.format] = e.format_span
    spec = EXPORTS[e.format]
    diags += option_diagnostics(spec.Options, e.options, e.option_spans, e.span, f"emit {e.format}")
    missing = spec.missing()
    if missing:
        diags.append(Diagnostic(f"emit {e.format} needs {', '.join(missing)}, which this installation lacks",
                                e.format_span, hint=f"`pip install {' '.join(missing)}`, or drop the line"))
    return diags


def _check_check(c: Check, recipe: Recipe) -> list[Diagnostic]:
    if c.metric not in METRICS:
        return [Diagnostic(f"unknown metric {c.metric!r}{did_you_mean(c.metric, METRICS)}", c.metric_span,
                           hint="metrics: " + ", ".join(METRICS))]
    m = METRICS[c.metric]
    diags = []
    if not math.isfinite(float(c.value)):
        return [Diagnostic(f"threshold {c.value} is not a finite number", c.value_span,
                           hint="write a number such as 0.99, 1.5x or 2%")]
    if c.unit not in m.units:
        allowed = " or ".join("a plain number" if u is None else f"'{u}'" for u in m.units)
        diags.append(Diagnostic(f"metric {c.metric} cannot be given in {c.unit or 'plain numbers'}; use {allowed}",
                                c.value_span))
    elif c.unit == "%" and not 0 <= c.value <= 100 and c.metric in COSINE_METRICS:
        diags.append(Diagnostic(f"{c.value}% is outside 0..100%", c.value_span))
    elif c.metric in COSINE_METRICS and c.unit is None and not -1 <= c.value <= 1:
        diags.append(Diagnostic(f"{c.metric} is a cosine similarity in [-1, 1], got {c.value}", c.value_span,
                                hint=f"write e.g. `{c.metric} >= 0.99` or `{c.metric} >= 99%`"))
    elif c.value < 0 and c.metric not in ("ppl_increase",):
        diags.append(Diagnostic(f"metric {c.metric} is never negative; {c.value} cannot be a threshold", c.value_span))
    if c.metric == "target_fidelity" and not recipe.targets:
        diags.append(Diagnostic("check target_fidelity needs a target to compare with the IR", c.metric_span,
                                hint="add e.g. `target cpu`, or drop the check"))
    if m.needs_eval and recipe.evaluate is None and not (c.metric == "latency_ms" and recipe.targets):
        diags.append(Diagnostic(f"check {c.metric} needs evaluation data", c.metric_span,
                                hint="add e.g. `evaluate wiki samples=8 seq_len=256`"))
    return diags


def model_positions(recipe: Recipe) -> tuple[int, str] | None:
    """How many token positions the recipe's model has, read from its config before anything is loaded:
    ``(n, where it was read)``, or None when unknown (a .pt2 program, no config)."""
    m = recipe.model
    if m is None:
        return None
    config: Path | None = None
    if m.kind == "hf":
        config = resolve_path(recipe, m.ref) / "config.json"
    elif m.kind == "bundled":
        try:
            from ctc.bundled import BUNDLED, bundled_model_dir

            config = bundled_model_dir(m.ref) / "config.json"
            if not config.is_file():  # a GGUF checkpoint: the catalogue states its context length
                return BUNDLED[m.ref].max_seq_len, f"the context length of bundled model {m.ref!r}"
        except (ImportError, LookupError):
            return None
    return None if config is None else config_positions(config)


def _check_positions(recipe: Recipe) -> list[Diagnostic]:
    """A seq_len longer than the model's positions fails only deep inside capture or evaluation: say so now.
    A decode step's cache (decode=N) counts as positions too (generation would run past the trained ones), and a
    data window must fit in it (its prefix is written into the cache)."""
    diags = _check_decode_windows(recipe)
    uses: list[tuple[str, Any, Span]] = []
    m = recipe.model
    if m is not None and isinstance(m.options.get("decode"), int) and not isinstance(m.options["decode"], bool):
        uses.append(("model", m.options["decode"], m.option_spans.get("decode", m.span)))
    for ds in (recipe.calibrate, recipe.evaluate):
        if ds is not None and isinstance(ds.options.get("seq_len"), int):
            uses.append((ds.role, ds.options["seq_len"], ds.option_spans.get("seq_len", ds.span)))
    for t in recipe.targets:
        if isinstance(t.options.get("seq_len"), int):
            uses.append((f"target {t.kind}", t.options["seq_len"], t.option_spans.get("seq_len", t.span)))
    if not uses:
        return diags
    known = model_positions(recipe)
    if known is None:
        return diags
    n, where = known
    key = {"model": "decode"}
    return diags + [Diagnostic(f"{what}: {key.get(what, 'seq_len')}={v} is longer than the model's {n} positions "
                               f"({where})", span, hint=f"use {key.get(what, 'seq_len')} <= {n}")
                    for what, v, span in uses if v > n]


def _check_decode_windows(recipe: Recipe) -> list[Diagnostic]:
    """calibrate/evaluate windows of a decode-step recipe longer than its cache (decode=N), the default
    seq_len included: it failed after the model had loaded ('64 tokens need 64 cache positions')."""
    m = recipe.model
    n = m.options.get("decode") if m is not None else None
    if not isinstance(n, int) or isinstance(n, bool):
        return []
    out = []
    for ds in (recipe.calibrate, recipe.evaluate):
        if ds is None:
            continue
        v = ds.options.get("seq_len", DatasetOptions().seq_len)
        if isinstance(v, int) and v > n:
            given = "seq_len" in ds.options
            out.append(Diagnostic(f"{ds.role}: {'' if given else 'the default '}seq_len={v} does not fit the decode "
                                  f"step's cache of {n} positions (decode={n})",
                                  ds.option_spans.get("seq_len", ds.span) if given else ds.span,
                                  hint=f"use seq_len <= {n} on this line, or a larger decode="))
    return out


def same_text_tokens(calibrate: tuple[str, Path, Any], evaluate: tuple[str, Path, Any]) -> str | None:
    """``"tokens A..B"`` when evaluation reads tokens of the same file that calibration draws from, else None.

    Each side is ``(source, resolved path, DatasetOptions)``; calibration draws from ``[skip, skip + limit)``,
    evaluation reads ``samples * seq_len`` tokens from its ``skip`` (at most ``limit``).  Shared by the
    recipe check (a compile warning) and `ctc eval` (whose --data/--skip/--limit can point at calibration text)."""
    (cs, pc, co), (es, pe, eo) = calibrate, evaluate
    if cs != es or cs not in _FILE_SOURCES:
        return None
    try:
        same = pc.samefile(pe)
    except OSError:
        same = pc.resolve() == pe.resolve()
    if not same or (cs == "jsonl" and co.field != eo.field):
        return None
    c_end = co.skip + co.limit if co.limit else math.inf
    e_end = min(eo.skip + eo.limit if eo.limit else math.inf, eo.skip + eo.samples * eo.seq_len)
    lo, hi = max(co.skip, eo.skip), min(c_end, e_end)
    if lo >= hi:
        return None
    return f"tokens {lo}..{'end' if math.isinf(hi) else int(hi)}"


SAME_TEXT_HINT = ("calibrate on the first N tokens and evaluate after them (`limit=N` on the calibrate line, "
                  "`skip=N` on the evaluate line), or use another file")


def _data_overlap(recipe: Recipe) -> list[Diagnostic]:
    """A warning when calibration and evaluation read the same tokens of the same file: accuracy measured
    on calibration text is optimistic.  Bundled sources are split into disjoint parts already."""
    c, e = recipe.calibrate, recipe.evaluate
    if c is None or e is None or not (c.path and e.path):
        return []
    try:
        co, eo = DatasetOptions.from_dict(c.options), DatasetOptions.from_dict(e.options)
    except _OPTION_ERRORS:
        return []
    pe = resolve_path(recipe, e.path)
    what = same_text_tokens((c.source, resolve_path(recipe, c.path), co), (e.source, pe, eo))
    if what is None:
        return []
    return [Diagnostic(f"evaluation reads the same text as calibration ({pe}, {what}): accuracy measured on "
                       "calibration text is optimistic", e.path_span, severity="warning", hint=SAME_TEXT_HINT)]


def check_recipe(recipe: Recipe) -> list[Diagnostic]:
    """Every check that needs no model: returns diagnostics (with source lines attached)."""
    whole = Span(recipe.file, 1, 1, 1, 2)
    diags = _check_model(recipe, recipe.model, whole)
    for d in (recipe.calibrate, recipe.evaluate):
        if d is not None:
            diags += _check_dataset(recipe, d)
    diags += _data_overlap(recipe)
    valid: set[str] = set()
    for step in recipe.pipeline:
        diags += _check_step(step, recipe.calibrate is not None, valid,
                             text_model=recipe.model is None or recipe.model.kind != "pt2")
    seen: dict[str, Span] = {}
    for t in recipe.targets:
        diags += _check_target(t, seen, recipe)
    if not any(d.severity == "error" for d in diags):
        diags += _check_positions(recipe)
    seen_checks: dict[str, Span] = {}
    for c in recipe.checks:
        diags += _check_check(c, recipe)
        key = f"{c.metric} {c.op}"
        if key in seen_checks:
            f = seen_checks[key]
            diags.append(Diagnostic(f"check {key} given twice", c.span, hint=f"the first is at {f.line}:{f.col}"))
        seen_checks[key] = c.span
    seen_exports: dict[str, Span] = {}
    for e in recipe.exports:
        diags += _check_export(e, seen_exports)
    if recipe.emit is not None:
        p = resolve_path(recipe, recipe.emit.path)
        if p.exists() and not p.is_dir():
            diags.append(Diagnostic(f"emit path {p} exists and is not a directory", recipe.emit.span))
        elif not recipe.emit.path.strip():
            diags.append(Diagnostic("emit needs a directory", recipe.emit.span))
    return attach_source(diags, recipe.source)


# --------------------------------------------------------------------------- after capture
def _match_summary(module: Any, pred: Callable[[Any], bool]) -> int:
    return sum(1 for n in module.nodes if pred(n))


def _pass_module_diagnostics(step: RecipeStep, module: Any) -> list[Diagnostic]:
    """What the step's pass says about its options on this module (``Pass.check_module``), located."""
    from ctc.passes.base import all_passes

    cls = all_passes().get(step.name)
    if cls is None:
        return []
    try:
        opts = cls.Options.from_dict(step.options, owner=f"pass {step.name}")
    except _OPTION_ERRORS:
        return []  # reported by the static checks
    out = []
    for where, msg in cls.check_module(opts, module, step.selector()):
        if where == "selector" and step.selectors:
            span = step.selectors[0].span
        else:
            span = step.option_spans.get(where or "", step.name_span)
        out.append(Diagnostic(msg, span))
    return out


def _target_shape_diagnostics(recipe: Recipe, module: Any) -> list[Diagnostic]:
    """A target's ``seq_len=`` / ``batch=`` for a dim the model's inputs do not have (an MLP's or CNN's fixed
    shapes): the build would ignore it, so it is an error at the option."""
    from ctc.analysis.roofline import input_symbols

    b_sym, s_sym, _ = input_symbols(module)
    shapes = ", ".join(f"{v.name} {list(v.type.shape)}" for v in module.inputs)
    diags = []
    for t in recipe.targets:
        for opt, sym, what in (("seq_len", s_sym, "sequence"), ("batch", b_sym, "batch")):
            value = t.options.get(opt)
            if isinstance(value, int) and not isinstance(value, bool) and value and sym is None:
                diags.append(Diagnostic(f"target {t.kind}: {opt}={value}, but the model's inputs have no {what} dim "
                                        f"to size ({shapes})", t.option_spans.get(opt, t.span),
                                        hint=f"drop {opt}=: the build uses the shapes the model was captured with"))
    return diags


def _target_dtype_diagnostics(recipe: Recipe, module: Any) -> list[Diagnostic]:
    """`target cpu` of a model holding bf16 parameters: TVM's CPU lowering takes no bf16 tensors, and no pass turns
    them to f32, so the build would fail after every pass had run; said at the target line instead."""
    import torch

    bf16 = sorted(n for n, t in module.params.items() if t.dtype == torch.bfloat16)
    if not bf16:
        return []
    return [Diagnostic(f"target {t.kind}: the model holds bf16 parameters ({len(bf16)}, e.g. {bf16[0]!r}), which "
                       "the TVM CPU backend does not take", t.span,
                       hint="load the model in f32 (dtype=f32 on the model line); int8/int4 passes keep their "
                            "scales in the model's float type")
            for t in recipe.targets if t.kind == "cpu"]


def check_with_module(recipe: Recipe, module: Any) -> list[Diagnostic]:
    """Checks that need the captured module: selectors matching nothing, metrics vs task."""
    diags: list[Diagnostic] = []
    blocks = module.blocks()
    scopes = sorted({n.scope for n in module.nodes if n.scope})
    ops = sorted({n.op for n in module.nodes})
    for step in recipe.pipeline:
        for s in step.selectors:
            if s.kind == "blocks":
                lo, hi = s.value
                have = f"blocks {blocks[0]}..{blocks[-1]}" if blocks else "no blocks"
                if not any(lo <= b < hi for b in blocks):
                    diags.append(Diagnostic(f"selector blocks[{lo}:{hi}] matches nothing: the model has {have}",
                                            s.span))
                elif hi > blocks[-1] + 1 or lo < blocks[0]:
                    fit = f"blocks[{max(lo, blocks[0])}:{min(hi, blocks[-1] + 1)}]"
                    diags.append(Diagnostic(f"selector blocks[{lo}:{hi}] reaches past the model's blocks (it has "
                                            f"{have})", s.span, hint=f"write {fit} for the blocks that exist"))
            elif s.kind == "scope":
                if not any(fnmatch.fnmatchcase(sc, s.value) for sc in scopes):
                    example = ", ".join(repr(x) for x in scopes[:3])
                    near = did_you_mean(s.value, scopes)
                    diags.append(Diagnostic(f"selector {s.value!r} matches no node scope{near}", s.span,
                                            hint=f"scopes look like {example}" if scopes else None))
            elif s.kind == "op":
                if s.value not in ops:
                    diags.append(Diagnostic(f"selector op {s.value} matches nothing: the model has no {s.value} nodes",
                                            s.span, hint="ops in the model: " + ", ".join(ops)))
        if step.selectors and not any(d.span.line == step.span.line for d in diags):
            sel = step.selector()
            if not any(sel.matches(n) for n in module.nodes):
                diags.append(Diagnostic(f"the selectors of step {step.name} match nothing together "
                                        f"({sel.describe()})", step.selectors[0].span,
                                        hint="different kinds of selector must all hold"))
        if not any(d.span.line == step.span.line for d in diags):
            diags += _pass_module_diagnostics(step, module)
    diags += _target_shape_diagnostics(recipe, module) + _target_dtype_diagnostics(recipe, module)
    from ctc.exports import EXPORTS

    for e in recipe.exports:  # a format that cannot take this model at all: said before the passes run
        spec = EXPORTS.get(e.format)
        why = spec.source_problem(module) if spec is not None and spec.source_problem is not None else None
        if why:
            diags.append(Diagnostic(why, e.format_span))
    task = str(module.meta.get("task") or "unknown")  # the one spelling of ctc.tasks, on both sides
    for c in recipe.checks:
        m = METRICS.get(c.metric)
        if m is not None and m.tasks is not None and task not in m.tasks:
            diags.append(Diagnostic(f"metric {c.metric} needs a {' or '.join(m.tasks)} model; this model is "
                                    f"{task or 'of unknown task'}", c.metric_span))
    return attach_source(diags, recipe.source)
