"""Located recipe errors: one Diagnostic class for syntax, semantic and post-capture checks.

A diagnostic renders like a compiler error: ``file:line:col: error: message``, the source
line, and a caret under the offending text, plus an optional hint line.

What is printed is safe and short whatever the recipe holds: lines are counted as the parser
counts them (``\n`` only, :func:`source_lines`; form feeds, U+0085 and U+2028 are characters, not
line breaks), control characters and terminal escapes are shown escaped (``\x1b``), a long source
line is shown as a window around the error, a message with line breaks is joined into one line
(:func:`one_line`), and long words in messages are elided (:func:`elide`).
"""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ctc.dsl.ast import Span

LINE_WINDOW = 100  # source characters shown around an error on a long line
WORD_LIMIT = 120  # longer runs without spaces are elided in messages
MAX_SHOWN = 20  # diagnostics printed by a RecipeError; the rest are counted


def source_lines(text: str) -> list[str]:
    """The lines of recipe ``text`` as the parser numbers them: split at ``\n`` only (a ``\r`` before
    it is dropped), so line N here is line N of every location."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _visible(ch: str) -> str:
    """``ch`` as printed in a message: control, format (bidi) and separator characters escaped."""
    if ch == "\t":
        return " "
    cat = unicodedata.category(ch)
    if cat in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn") or ch in "\x85\u2028\u2029":
        code = ord(ch)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
    return ch


def escape(text: str) -> str:
    """``text`` with control characters and terminal escapes shown as ``\\xNN``/``\\uNNNN``."""
    return "".join(_visible(c) for c in text)


def printable(text: str) -> str:
    """``text`` with its line breaks kept and every other control character or terminal escape shown escaped
    (an error quoting a file's name or a library's message, which may carry ``\x1b[1m``)."""
    return "\n".join(escape(line) for line in text.split("\n"))


def one_line(text: str) -> str:
    """A message that came with line breaks (an exception listing items as ``  - conv (at ...)`` lines) as one
    line: lines joined by spaces, list items separated by ``; ``."""
    out, item = "", False
    for line in filter(None, (ln.strip() for ln in text.splitlines())):
        after_item, item = item, line.startswith("- ")
        out += ("; " if item and after_item else " " if out else "") + (line[2:] if item else line)
    return out


def elide(text: str, limit: int = WORD_LIMIT) -> str:
    """``text`` escaped, with each run of more than ``limit`` non-space characters cut to its ends."""
    out: list[str] = []
    for word in escape(text).split(" "):
        if len(word) > limit:
            keep = limit // 2
            word = f"{word[:keep]}...({len(word) - 2 * keep} more characters)...{word[-keep:]}"
        out.append(word)
    return " ".join(out)


def display_line(line: str, col: int, end_col: int) -> tuple[str, int, int]:
    """The shown form of source ``line`` (escaped, windowed around columns ``col``..``end_col``) and the
    caret's start and width in it (columns are 1-based, ``end_col`` exclusive)."""
    if len(line) <= 2 * LINE_WINDOW:
        lo, hi = 0, len(line)
    else:
        lo = max(0, col - 1 - LINE_WINDOW // 2)
        hi = min(len(line), min(max(end_col - 1, col), col - 1 + LINE_WINDOW) + LINE_WINDOW // 2)
    pieces = ["..."] if lo > 0 else []
    pos = len(pieces[0]) if pieces else 0
    start = width = None
    for i in range(lo, hi):
        shown = _visible(line[i])
        if i == col - 1:
            start = pos
        pos += len(shown)
        if start is not None and width is None and i == end_col - 2:
            width = pos - start
        pieces.append(shown)
    if hi < len(line):
        pieces.append("...")
    text = "".join(pieces)
    if start is None:  # the error is at the end of the line
        start = len(text) if col - 1 >= hi else 0
    if width is None:
        width = max(1, len(text) - start) if end_col > col + 1 else 1
    return text, start, max(1, width)


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
        """``file:line:col: error: msg`` + the source line + a caret (and the hint), all printable."""
        where = f"{self.span.line}:{self.span.col}:" if self.span.line > 0 else ""
        head = f"{escape(self.span.file)}:{where} {self.severity}: {elide(one_line(self.message))}"
        out = [head]
        if self.source_line is not None and self.span.line > 0:
            start = max(self.span.col, 1)
            if self.span.end_line == self.span.line and self.span.end_col > start:
                end = self.span.end_col
            elif self.span.end_line > self.span.line:
                end = len(self.source_line) + 1
            else:
                end = start + 1
            text, caret, width = display_line(self.source_line.rstrip("\n"), start, end)
            gutter = f"{self.span.line:>4} | "
            out.append(gutter + text)
            out.append(" " * (len(gutter) - 2) + "| " + " " * caret + "^" * width)
        if self.hint:
            out.append(f"  hint: {elide(one_line(self.hint))}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.format()


def attach_source(diags: Iterable[Diagnostic], source: str) -> list[Diagnostic]:
    """Fill in each diagnostic's source line from the recipe text."""
    lines = source_lines(source)
    out = []
    for d in diags:
        line = lines[d.span.line - 1] if 0 < d.span.line <= len(lines) else None
        out.append(Diagnostic(d.message, d.span, d.severity, d.hint, line))
    return out


class RecipeError(Exception):
    """A recipe has errors; carries every diagnostic found (errors first, in source order)."""

    def __init__(self, diagnostics: Sequence[Diagnostic]):
        self.diagnostics = sorted(diagnostics, key=lambda d: (d.severity != "error", d.span.line, d.span.col))
        shown = [d.format() for d in self.diagnostics[:MAX_SHOWN]]
        if len(self.diagnostics) > MAX_SHOWN:
            shown.append(f"... and {len(self.diagnostics) - MAX_SHOWN} more (the first {MAX_SHOWN} are shown)")
        super().__init__("\n".join(shown))

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
