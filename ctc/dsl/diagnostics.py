"""Located recipe errors: one Diagnostic class for syntax, semantic and post-capture checks.

A diagnostic renders like a compiler error: ``file:line:col: error: message``, the source
line, and a caret under the offending text, plus an optional hint line.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ctc.dsl.ast import Span


@dataclass(frozen=True)
class Diagnostic:
    """One problem in a recipe, at a span, with an optional hint (what to do about it)."""

    message: str
    span: Span
    severity: str = "error"  # "error" | "warning"
    hint: str | None = None
    source_line: str | None = None

    @property
    def line(self) -> int:
        return self.span.line

    @property
    def col(self) -> int:
        return self.span.col

    def format(self) -> str:
        """``file:line:col: error: msg`` + the source line + a caret (and the hint)."""
        head = f"{self.span.file}:{self.span.line}:{self.span.col}: {self.severity}: {self.message}"
        out = [head]
        if self.source_line is not None and self.span.line > 0:
            text = self.source_line.rstrip("\n").expandtabs(1)
            gutter = f"{self.span.line:>4} | "
            out.append(gutter + text)
            start = max(self.span.col, 1)
            if self.span.end_line == self.span.line and self.span.end_col > start:
                width = self.span.end_col - start
            else:
                width = max(1, len(text) - start + 1) if self.span.end_line > self.span.line else 1
            out.append(" " * (len(gutter) - 2) + "| " + " " * (start - 1) + "^" * max(1, width))
        if self.hint:
            out.append(f"  hint: {self.hint}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.format()


def attach_source(diags: Iterable[Diagnostic], source: str) -> list[Diagnostic]:
    """Fill in each diagnostic's source line from the recipe text."""
    lines = source.splitlines()
    out = []
    for d in diags:
        line = lines[d.span.line - 1] if 0 < d.span.line <= len(lines) else None
        out.append(Diagnostic(d.message, d.span, d.severity, d.hint, line))
    return out


class RecipeError(Exception):
    """A recipe has errors; carries every diagnostic found (errors first, in source order)."""

    def __init__(self, diagnostics: Sequence[Diagnostic]):
        self.diagnostics = sorted(diagnostics, key=lambda d: (d.severity != "error", d.span.line, d.span.col))
        super().__init__("\n".join(d.format() for d in self.diagnostics))

    @property
    def first(self) -> Diagnostic:
        return self.diagnostics[0]


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the nearest candidate, or empty."""
    cands = list(candidates)
    near = difflib.get_close_matches(word, cands, n=1, cutoff=0.6)
    if not near:
        lower = {c.lower(): c for c in cands}
        near = [lower[word.lower()]] if word.lower() in lower else []
    return f"; did you mean {near[0]!r}?" if near else ""
