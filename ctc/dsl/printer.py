"""Print a Recipe back to recipe text, canonically: ``parse(print_recipe(r)) == r`` (spans aside).

Used by ``ctc show RECIPE``, by the artifact (the normalised recipe next to the user's copy)
and by the hypothesis round-trip test.
"""

from __future__ import annotations

import math
from typing import Any

from ctc.dsl.ast import Check, Dataset, ModelSource, Recipe, RecipeStep, SelectorItem, Target
from ctc.dsl.parser import quote


def format_value(v: Any) -> str:
    """One option value in recipe syntax."""
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "none"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"a recipe cannot hold the float {v!r}")
        return repr(v)
    if isinstance(v, str):
        return quote(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    raise TypeError(f"a recipe option cannot hold {type(v).__name__} {v!r}")


def _options(opts: dict[str, Any]) -> str:
    return "".join(f" {k}={format_value(v)}" for k, v in opts.items())


def format_selector(s: SelectorItem) -> str:
    if s.kind == "blocks":
        lo, hi = s.value
        return f"blocks[{lo}]" if hi == lo + 1 else f"blocks[{lo}:{hi}]"
    if s.kind == "scope":
        return quote(s.value)
    if s.kind == "op":
        return f"op {s.value}"
    raise ValueError(f"unknown selector kind {s.kind!r}")


def format_step(s: RecipeStep) -> str:
    out = s.name + _options(s.options)
    if s.selectors:
        out += " on " + ", ".join(format_selector(x) for x in s.selectors)
    return out


def format_model(m: ModelSource) -> str:
    return f"model {m.kind} {quote(m.ref)}{_options(m.options)}"


def format_dataset(d: Dataset) -> str:
    path = f" {quote(d.path)}" if d.path is not None else ""
    return f"{d.role} {d.source}{path}{_options(d.options)}"


def format_target(t: Target) -> str:
    trials = f" trials={format_value(t.trials)}" if t.trials is not None else ""
    return f"target {t.kind}{_options(t.options)}{trials}"


def format_check(c: Check) -> str:
    return f"check {c.metric} {c.op} {format_value(c.value)}{c.unit or ''}"


def print_recipe(r: Recipe) -> str:
    """Canonical recipe text: model, data, pipeline, targets, checks, emit."""
    lines: list[str] = []
    if r.model is not None:
        lines.append(format_model(r.model))
    for d in (r.calibrate, r.evaluate):
        if d is not None:
            lines.append(format_dataset(d))
    if r.pipeline:
        lines.append("pipeline {")
        lines += ["    " + format_step(s) for s in r.pipeline]
        lines.append("}")
    lines += [format_target(t) for t in r.targets]
    lines += [format_check(c) for c in r.checks]
    if r.emit is not None:
        lines.append(f"emit {quote(r.emit.path)}")
    lines += [f"emit {e.format}{_options(e.options)}" for e in r.exports]
    return "\n".join(lines) + "\n"
