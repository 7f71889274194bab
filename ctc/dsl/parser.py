"""Parse recipe text into :class:`~ctc.dsl.ast.Recipe` dataclasses (Lark LALR, grammar in recipe.lark).

Syntax errors become :class:`~ctc.dsl.diagnostics.Diagnostic`s with file:line:col, the
source line, a caret and a hint for the statement being written.  The parser only builds
the tree; whether names, options and files are valid is :mod:`ctc.dsl.check`'s job.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from ctc.dsl.ast import Check, Dataset, Emit, EmitFormat, ModelSource, Recipe, RecipeStep, SelectorItem, Span, Target
from ctc.dsl.diagnostics import Diagnostic, RecipeError, attach_source, source_lines

GRAMMAR = Path(__file__).with_name("recipe.lark")


@lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(GRAMMAR.read_text(), parser="lalr", lexer="contextual", propagate_positions=True,
                maybe_placeholders=False)


# ------------------------------------------------------------------------- helpers
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"'}


def unquote(tok: str) -> str:
    """The value of a STRING token (``\\n \\t \\r \\\\ \\"`` escapes; other escapes keep the char)."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), tok[1:-1])


def quote(s: str) -> str:
    """A STRING token for ``s`` (inverse of :func:`unquote`)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace(
        "\t", "\\t").replace("\r", "\\r") + '"'


class _Val:
    """A parsed option value with its span (unwrapped when the AST is built)."""

    __slots__ = ("value", "span")

    def __init__(self, value: Any, span: Span):
        self.value, self.span = value, span


class _Builder(Transformer):
    def __init__(self, file: str):
        super().__init__()
        self.file = file

    # spans ------------------------------------------------------------------
    def tok_span(self, t: Token) -> Span:
        return Span(self.file, t.line or 0, t.column or 0, t.end_line or 0, t.end_column or 0)

    def meta_span(self, meta: Any) -> Span:
        if getattr(meta, "empty", True):
            return Span(self.file)
        return Span(self.file, meta.line, meta.column, meta.end_line, meta.end_column)

    # values -----------------------------------------------------------------
    @v_args(meta=True)
    def int(self, meta: Any, c: list) -> _Val:
        return _Val(int(c[0]), self.meta_span(meta))

    @v_args(meta=True)
    def float(self, meta: Any, c: list) -> _Val:
        return _Val(float(c[0]), self.meta_span(meta))

    @v_args(meta=True)
    def string(self, meta: Any, c: list) -> _Val:
        return _Val(unquote(c[0]), self.meta_span(meta))

    @v_args(meta=True)
    def word(self, meta: Any, c: list) -> _Val:
        return _Val(str(c[0]), self.meta_span(meta))

    @v_args(meta=True)
    def true(self, meta: Any, c: list) -> _Val:
        return _Val(True, self.meta_span(meta))

    @v_args(meta=True)
    def false(self, meta: Any, c: list) -> _Val:
        return _Val(False, self.meta_span(meta))

    @v_args(meta=True)
    def none(self, meta: Any, c: list) -> _Val:
        return _Val(None, self.meta_span(meta))

    @v_args(meta=True)
    def list(self, meta: Any, c: list) -> _Val:
        return _Val([v.value for v in c if isinstance(v, _Val)], self.meta_span(meta))

    @v_args(meta=True)
    def option(self, meta: Any, c: list) -> tuple[str, _Val, Span]:
        return (str(c[0]), c[1], self.meta_span(meta))

    # selectors --------------------------------------------------------------
    @v_args(meta=True)
    def blocks(self, meta: Any, c: list) -> SelectorItem:
        lo = int(c[0])
        hi = int(c[1]) if len(c) > 1 else lo + 1
        return SelectorItem("blocks", (lo, hi), self.meta_span(meta))

    @v_args(meta=True)
    def scope(self, meta: Any, c: list) -> SelectorItem:
        return SelectorItem("scope", unquote(c[0]), self.meta_span(meta))

    @v_args(meta=True)
    def op(self, meta: Any, c: list) -> SelectorItem:
        return SelectorItem("op", str(c[0]), self.meta_span(meta))

    def selectors(self, c: list) -> list[SelectorItem]:
        return list(c)

    # statements -------------------------------------------------------------
    def _options(self, items: list, what: str) -> tuple[dict, dict, list[Diagnostic]]:
        opts: dict[str, Any] = {}
        spans: dict[str, Span] = {}
        errs = []
        for name, val, span in items:
            if name in opts:
                errs.append(Diagnostic(f"option {name!r} given twice in this {what}", span,
                                       hint=f"first given at {spans[name].line}:{spans[name].col}"))
                continue
            opts[name] = val.value
            spans[name] = span
        return opts, spans, errs

    @v_args(meta=True)
    def model(self, meta: Any, c: list) -> tuple:
        kind, ref = c[0], c[1]
        opts, spans, errs = self._options([x for x in c[2:] if isinstance(x, tuple)], "model")
        return ("model", ModelSource(str(kind), unquote(ref), opts, self.meta_span(meta), self.tok_span(kind),
                                     self.tok_span(ref), spans), errs)

    @v_args(meta=True)
    def dataset(self, meta: Any, c: list) -> tuple:
        role, src = c[0], c[1]
        rest = c[2:]
        path = path_span = None
        if rest and isinstance(rest[0], Token) and rest[0].type == "STRING":
            path, path_span = unquote(rest[0]), self.tok_span(rest[0])
            rest = rest[1:]
        opts, spans, errs = self._options(rest, str(role))
        ds = Dataset(str(role), str(src), path, opts, self.meta_span(meta), self.tok_span(src),
                     path_span or Span(self.file), spans)
        return (str(role), ds, errs)

    @v_args(meta=True)
    def step(self, meta: Any, c: list) -> tuple:
        name = c[0]
        opts_items = [x for x in c[1:] if isinstance(x, tuple)]
        sels = next((x for x in c[1:] if isinstance(x, list)), [])
        opts, spans, errs = self._options(opts_items, f"step {name}")
        span = self.meta_span(meta)
        # the step rule includes its newline; end the span at the last real token
        last = sels[-1].span if sels else (opts_items[-1][2] if opts_items else self.tok_span(name))
        span = Span(self.file, span.line, span.col, last.end_line, last.end_col)
        return (RecipeStep(str(name), opts, sels, span, self.tok_span(name), spans), errs)

    @v_args(meta=True)
    def pipeline(self, meta: Any, c: list) -> tuple:
        steps, errs = [], []
        for s, e in c:
            steps.append(s)
            errs.extend(e)
        return ("pipeline", (steps, self.meta_span(meta)), errs)

    @v_args(meta=True)
    def target(self, meta: Any, c: list) -> tuple:
        kind = c[0]
        opts, spans, errs = self._options(c[1:], f"target {kind}")
        trials = opts.pop("trials", None)
        return ("target", Target(str(kind), opts, trials, self.meta_span(meta), self.tok_span(kind), spans), errs)

    @v_args(meta=True)
    def threshold(self, meta: Any, c: list) -> tuple[_Val, str | None]:
        tok = c[0]
        value = int(tok) if tok.type == "SIGNED_INT" else float(tok)
        return _Val(value, self.tok_span(tok)), (str(c[1]) if len(c) > 1 else None)

    @v_args(meta=True)
    def check(self, meta: Any, c: list) -> tuple:
        metric, cmp, (num, unit) = c[0], c[1], c[2]
        return ("check", Check(str(metric), str(cmp), num.value, unit, self.meta_span(meta), self.tok_span(metric),
                               num.span), [])

    @v_args(meta=True)
    def emit(self, meta: Any, c: list) -> tuple:
        return ("emit", Emit(unquote(c[0]), self.meta_span(meta)), [])

    @v_args(meta=True)
    def emit_format(self, meta: Any, c: list) -> tuple:
        fmt = c[0]
        opts, spans, errs = self._options(c[1:], f"emit {fmt}")
        return ("emit_format", EmitFormat(str(fmt), opts, self.meta_span(meta), self.tok_span(fmt), spans), errs)

    def start(self, c: list) -> list:
        return list(c)


def _assemble(items: list, file: str, source: str) -> Recipe:
    recipe = Recipe(file=file, source=source)
    errs: list[Diagnostic] = []
    first: dict[str, Span] = {}
    single = {"model": "model", "calibrate": "calibrate", "evaluate": "evaluate", "pipeline": "pipeline",
              "emit": "emit"}
    for kind, node, node_errs in items:
        errs.extend(node_errs)
        span = node[1] if kind == "pipeline" else node.span
        if kind in single:
            if kind in first:
                f = first[kind]
                extra = " (list every step in one pipeline block)" if kind == "pipeline" else ""
                errs.append(Diagnostic(f"{kind!r} given twice", span,
                                       hint=f"the first is at {f.line}:{f.col}; keep one{extra}"))
                continue
            first[kind] = span
        if kind == "model":
            recipe.model = node
        elif kind == "calibrate":
            recipe.calibrate = node
        elif kind == "evaluate":
            recipe.evaluate = node
        elif kind == "pipeline":
            recipe.pipeline, recipe.pipeline_span = node
        elif kind == "target":
            recipe.targets.append(node)
        elif kind == "check":
            recipe.checks.append(node)
        elif kind == "emit":
            recipe.emit = node
        elif kind == "emit_format":
            recipe.exports.append(node)
    if errs:
        raise RecipeError(attach_source(errs, source))
    return recipe


# ------------------------------------------------------------------------- errors
_TOKEN_WORDS = {
    "_NL": "end of line", "STRING": 'a quoted string ("...")', "NAME": "a name", "PASS_NAME": "a pass name",
    "INT": "an integer", "SIGNED_INT": "a number", "SIGNED_FLOAT": "a number",
    "COMPARE": "a comparison (<=, >=, <, >, ==)",
    "UNIT": "a unit (x or %)", "EQUAL": "'='", "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'", "RBRACE": "'}'",
    "COMMA": "','", "COLON": "':'", "$END": "end of file", "DATASET_ROLE": "calibrate/evaluate",
}

_HINTS = {
    "model": 'write `model bundled "minilm"`, `model hf "path/to/dir"` or `model pt2 "file.pt2"`',
    "calibrate": 'write e.g. `calibrate wiki samples=64 seq_len=128 seed=0` or '
                 '`calibrate jsonl "f.jsonl" field="text"`',
    "evaluate": 'write e.g. `evaluate lee samples=50 seq_len=128` or `evaluate text "notes.txt"`',
    "pipeline": ("write `pipeline {`, one step per line "
                 "(`pass key=value ... on blocks[0:4], \"*.mlp.*\", op linear`), `}`"),
    "target": "write e.g. `target cpu threads=2 trials=64`",
    "check": "write e.g. `check fidelity >= 0.99`, `check ppl_increase <= 0.5` or `check params <= 0.7x`",
    "emit": 'write `emit "out/dir"` (where the artifact goes) or `emit FORMAT` (mlir, hf, compressed-tensors, '
            'gguf: the model in a format other tools load)',
}
_STATEMENTS = "model, calibrate, evaluate, pipeline, target, check, emit"


def _describe(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    if tok.type == "_NL":
        return "end of line"
    return repr(str(tok))


def _expected(names: set[str]) -> str:
    words = []
    for n in sorted(names):
        w = _TOKEN_WORDS.get(n)
        if w is None:
            w = repr(n.lower()) if n.isupper() and n.isalpha() else n
        if w not in words:
            words.append(w)
    if len(words) > 6:
        words = words[:6] + ["..."]
    return ", ".join(words)


def _statement_of(source: str, line: int) -> str | None:
    """The statement keyword of the line an error is on (or of the enclosing pipeline)."""
    lines = source_lines(source)
    if not 0 < line <= len(lines):
        return None
    m = re.match(r"\s*([A-Za-z_]\w*)", lines[line - 1])
    if m and m.group(1) in _HINTS:
        return m.group(1)
    # inside a pipeline block?
    depth_open = None
    for i in range(line - 1, -1, -1):
        s = lines[i].split("#", 1)[0]
        if "}" in s and i < line - 1:
            break
        if re.match(r"\s*pipeline\b", s):
            depth_open = i
            break
    return "pipeline" if depth_open is not None else None


def _open_pipeline(lines: list[str], before: int) -> tuple[int, int] | None:
    """Where a ``pipeline {`` block that is still open at line ``before`` was opened (line, col), if any."""
    opened: tuple[int, int] | None = None
    for i, text in enumerate(lines[: before - 1], 1):
        code = re.sub(r'"([^"\\\n]|\\.)*"', '""', text).split("#", 1)[0]
        m = re.match(r"\s*pipeline\s*\{", code)
        if m:
            opened = (i, code.index("pipeline") + 1)
            code = code[m.end():]
        if opened is not None and "}" in code:
            opened = None
    return opened


def _syntax_error(e: UnexpectedInput, file: str, source: str) -> Diagnostic:
    line, col = e.line, e.column
    if isinstance(e, UnexpectedCharacters):
        ch = source[e.pos_in_stream] if e.pos_in_stream is not None and e.pos_in_stream < len(source) else ""
        if ch == '"':
            msg, hint = "unterminated string", 'close it with " on the same line'
        elif ch == "'":
            msg, hint = "strings use double quotes", "write \"...\" instead of '...'"
        else:
            msg = f"unexpected character {ch!r}"
            hint = _HINTS.get(_statement_of(source, line) or "", None)
        return Diagnostic(msg, Span(file, line, col, line, col + 1), hint=hint)
    if isinstance(e, UnexpectedToken):
        tok = e.token
        expected = set(e.expected)
        lines = source_lines(source)
        stmt = _statement_of(source, line if tok.type != "$END" else len(lines))
        opened = _open_pipeline(lines, line if tok.type != "$END" else len(lines) + 1)
        if opened is not None and tok.type != "$END" and 0 < line <= len(lines):
            first = re.match(r"\s*([A-Za-z_]\w*)", lines[line - 1])
            if first and first.group(1) in _HINTS and first.start(1) + 1 <= col:
                kw = first.group(1)
                return Diagnostic(f"the pipeline block opened at {opened[0]}:{opened[1]} is not closed before this "
                                  f"`{kw}` statement", Span(file, line, first.start(1) + 1, line, first.end(1) + 1),
                                  hint="close the pipeline with '}' on the line after its last step")
        if tok.type == "$END":
            line = max(1, len(lines))
            col = len(lines[-1]) + 1 if lines else 1
            if "RBRACE" in expected or "PASS_NAME" in expected:
                where = f" (opened at {opened[0]}:{opened[1]})" if opened else ""
                msg, hint = f"unexpected end of file inside a pipeline block{where}", "close the pipeline with '}'"
            else:
                msg, hint = f"unexpected end of file; expected {_expected(expected)}", _HINTS.get(stmt or "")
            return Diagnostic(msg, Span(file, line, col, line, col + 1), hint=hint)
        width = max(1, len(str(tok))) if tok.type != "_NL" else 1
        span = Span(file, line, col, line, col + width)
        if {"MODEL", "TARGET", "CHECK"} <= expected:
            from ctc.dsl.diagnostics import did_you_mean

            dym = did_you_mean(str(tok), _STATEMENTS.split(", "))
            return Diagnostic(f"unknown statement {str(tok)!r}{dym}", span,
                              hint=f"a recipe line starts with one of: {_STATEMENTS}")
        msg = f"unexpected {_describe(tok)}; expected {_expected(expected)}"
        if expected == {"EQUAL"}:
            # the word before the error was taken as an option name: say what it really is
            text = lines[line - 1][: col - 1] if 0 < line <= len(lines) else ""
            m = re.search(r"([A-Za-z_][A-Za-z0-9_]*)\s*$", text)
            if m:
                wspan = Span(file, line, m.start(1) + 1, line, m.end(1) + 1)
                word = m.group(1)
                num = re.search(r"[+-]?[0-9][0-9.]*$", text[: m.start(1)])
                if num:  # `0x10`, `1_000`, `3px`: digits the lexer ended, then a name
                    nspan = Span(file, line, num.start() + 1, line, m.end(1) + 1)
                    bad = num.group() + word
                    return Diagnostic(f"{bad!r} is not a number: write numbers in decimal, like 16, 0.5 or 1e-3",
                                      nspan, hint=_HINTS.get(stmt or ""))
                if word in _HINTS or word == "calibrate" or word == "evaluate":
                    return Diagnostic(f"{word!r} starts a new statement; put it on its own line", wspan)
                return Diagnostic(f"option {word!r} has no value; options are written key=value", wspan,
                                  hint=_HINTS.get(stmt or ""))
        if expected == {"COMMA", "_NL"} and tok.type == "NAME":
            return Diagnostic(f"unexpected {_describe(tok)}: a step's options go before its `on` selectors", span,
                              hint="write `pass key=value ... on blocks[0:4], \"*.mlp.*\"`")
        if "EQUAL" in expected and tok.type in ("_NL", "SIGNED_INT", "SIGNED_FLOAT", "STRING"):
            msg = f"unexpected {_describe(tok)}; options are written key=value"
        if expected == {"COMPARE"}:
            msg = f"unexpected {_describe(tok)}; a check needs a comparison (<=, >=, <, >, ==)"
        return Diagnostic(msg, span, hint=_HINTS.get(stmt or ""))
    if isinstance(e, UnexpectedEOF):
        return Diagnostic("unexpected end of file", Span(file, line, col, line, col + 1))
    return Diagnostic(str(e), Span(file, line, col))


# ------------------------------------------------------------------------- API
MAX_NESTING = 32  # list values nested deeper than this are refused before parsing


def _too_deep(source: str, file: str) -> Diagnostic | None:
    """A located error for list values nested deeper than :data:`MAX_NESTING` (one linear scan; the
    tree builder would otherwise recurse that deep)."""
    depth, line, col, in_str, esc, comment = 0, 1, 0, False, False, False
    for ch in source:
        col += 1
        if ch == "\n":
            line, col, in_str, comment, depth = line + 1, 0, False, False, 0
        elif comment:
            continue
        elif in_str:
            esc = not esc and ch == "\\"
            if ch == '"' and not esc:
                in_str = False
        elif ch == '"':
            in_str, esc = True, False
        elif ch == "#":
            comment = True
        elif ch == "[":
            depth += 1
            if depth > MAX_NESTING:
                return Diagnostic(f"a value nested more than {MAX_NESTING} lists deep", Span(file, line, col, line,
                                                                                               col + 1),
                                  hint="option values are numbers, strings, names or shallow lists")
        elif ch == "]":
            depth = max(0, depth - 1)
    return None


def parse(text: str, file: str = "<recipe>") -> Recipe:
    """Parse recipe ``text`` (``file`` names it in spans and errors); raise :class:`RecipeError`.
    A leading UTF-8 byte-order mark is ignored."""
    text = text.removeprefix("\ufeff")
    src = text if text.endswith("\n") else text + "\n"
    deep = _too_deep(src, file)
    if deep is not None:
        raise RecipeError(attach_source([deep], src))
    try:
        tree: Tree = _lark().parse(src)
    except UnexpectedInput as e:
        raise RecipeError(attach_source([_syntax_error(e, file, src)], src)) from None
    try:
        items = _Builder(file).transform(tree)
    except VisitError as e:  # pragma: no cover - a bug in the builder, not in the recipe
        raise e.orig_exc from None
    return _assemble(items, file, src)


def read_recipe(path: str | Path) -> tuple[str, str]:
    """The text of a recipe file, read once (a pipe such as ``/dev/stdin`` or ``<(...)`` can be read only
    once), and the directory its relative paths start from.  Problems are located RecipeErrors."""
    p = Path(path)
    where = Span(str(p))
    try:
        if p.is_dir():
            raise RecipeError([Diagnostic(f"{p} is a directory, not a recipe file", where,
                                          hint="give the .ctc file itself")])
        with open(p, "rb") as f:
            data = f.read()
        regular = p.is_file()
    except FileNotFoundError:
        raise RecipeError([Diagnostic(f"recipe file not found: {p}", where)]) from None
    except OSError as e:
        raise RecipeError([Diagnostic(f"cannot read recipe {p}: {e.strerror}", where)]) from None
    if b"\0" in data[:8192] and not data.startswith((b"\xff\xfe", b"\xfe\xff")):  # not UTF-16 text, but a model,
        # archive or tensor file given where the recipe goes: iconv would not help
        raise RecipeError([Diagnostic(f"{p.name} is a binary file, not a recipe (a .ctc text file)", where,
                                      hint="a model file is named inside the recipe: `model pt2 \"FILE.pt2\"`")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError([Diagnostic(f"recipe is not UTF-8 text ({e.reason} at byte {e.start})", where,
                                      hint="convert it with `iconv -t utf-8`")]) from None
    return text, str(p.parent) if regular else "."


def parse_file(path: str | Path) -> Recipe:
    """Read (once) and parse a recipe file; a missing or unreadable file is a RecipeError naming it."""
    text, base = read_recipe(path)
    recipe = parse(text, str(path))
    recipe.base_dir = base
    return recipe
