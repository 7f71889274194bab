"""Textual form of a ctc module: a readable printer and a parser that round-trips it.

``parse(print_module(m))`` is structurally equal to ``m`` (see :func:`structurally_equal`).
The text is what ``ctc show`` prints and what golden tests compare, e.g.::

    module tiny {
      meta {arch = "toy", n_layers = 2}
      param "fc.weight" : f32[8, 4]
      input %x : f32[1, s0, 4]
      %w = param() {name = "fc.weight"} : f32[8, 4]  loc("fc", block=0)
      %fc = linear(%x, %w) : f32[1, s0, 8]  loc("fc", block=0)
      return %fc as "logits"
    }

Grammar (informal; ``#`` starts a comment that runs to the end of the line)::

    module   := "module" NAME "{" item* "}"
    item     := "meta" dict | "param" STRING ":" type | "input" VALUE ":" type
              | [VALUE ("," VALUE)* "="] OPNAME "(" [VALUE ("," VALUE)*] ")" [dict] ":" types [loc]
              | "return" [VALUE "as" STRING ("," VALUE "as" STRING)*]
    type     := DTYPE "[" [dim ("," dim)*] "]"        dim := integer expression over symbols
    loc      := "loc" "(" STRING ["," "block" "=" INT] ")"
    dict     := "{" [key "=" literal ("," key "=" literal)*] "}"   key := NAME | STRING
    literal  := INT | FLOAT | "inf" | "-inf" | "nan" | "true" | "false" | "none" | STRING
              | "[" [literal ("," literal)*] "]" | dict

Value names are ``%`` followed by ``[A-Za-z0-9_.]+`` (or ``%"quoted"`` for anything else).
Floats print with ``repr`` so they round-trip exactly; strings are JSON-escaped.  Attributes
equal to their schema default are left out unless ``show_defaults=True``.  Parameter data is
not printed: :func:`parse` attaches tensors from an optional ``params`` dict, or creates zero
placeholders of the declared types.  Parsing never evaluates anything: it is a hand-written
tokenizer and recursive-descent parser; errors give ``line:col``, the line and a caret.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ctc.ir.graph import Module, Node, Value
from ctc.ir.ops import OpError, get_op
from ctc.ir.symbolic import SymbolicError, normalize_dim
from ctc.ir.types import DTYPES, TensorType, torch_dtype

__all__ = ["TextParseError", "parse", "print_module", "structural_diff", "structurally_equal"]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_VALUE_NAME = re.compile(r"[A-Za-z0-9_.]+\Z")
_KEYWORDS = {"true", "false", "none", "inf", "nan", "module", "meta", "param", "input", "return", "loc", "as"}


# =========================================================================== printing
def _fmt_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _fmt_key(k: Any, where: str) -> str:
    if not isinstance(k, str):
        raise TypeError(f"{where}: dict key {k!r} is not a string; IR text needs string keys")
    return k if _IDENT.match(k) and k not in _KEYWORDS else _fmt_str(k)


def _fmt_literal(v: Any, where: str) -> str:
    """One attribute/meta value as text (ints, floats, bools, strings, None, lists, dicts)."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return repr(v)  # 'inf', '-inf', '1e-05', '0.1': exact round trip
    if isinstance(v, str):
        return _fmt_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_literal(x, where) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_fmt_key(k, where)} = {_fmt_literal(x, where)}" for k, x in v.items()) + "}"
    raise TypeError(f"{where}: value {v!r} of type {type(v).__name__} has no IR text form "
                    "(use int, float, bool, str, None, lists or dicts of them)")


def _fmt_value(v: Value) -> str:
    return "%" + (v.name if _VALUE_NAME.match(v.name) else _fmt_str(v.name))


def _fmt_type(t: TensorType) -> str:
    return str(t)


def _is_default(value: Any, default: Any) -> bool:
    if type(value) is not type(default):
        return False
    return _lit_equal(value, default)


def format_node(node: Node, *, show_defaults: bool = False) -> str:
    """One node as a line of IR text (without indentation)."""
    where = f"node {node.op} at {node.scope or '<root>'}"
    try:
        schema = get_op(node.op).attrs
    except OpError:
        schema = {}
    attrs = {
        k: v for k, v in node.attrs.items()
        if show_defaults or k not in schema or schema[k].required or not _is_default(v, schema[k].default)
    }
    head = ", ".join(_fmt_value(v) for v in node.outputs)
    text = (head + " = " if head else "") + node.op + "(" + ", ".join(_fmt_value(v) for v in node.inputs) + ")"
    if attrs:
        text += " " + _fmt_literal(attrs, where)
    if node.outputs:
        text += " : " + ", ".join(_fmt_type(v.type) for v in node.outputs)
    if node.scope or node.block is not None:
        loc = _fmt_str(node.scope)
        if node.block is not None:
            loc += f", block={node.block}"
        text += f"  loc({loc})"
    return text


def print_module(module: Module, *, show_defaults: bool = False) -> str:
    """The IR text of ``module`` (ends with a newline)."""
    name = module.name if _IDENT.match(module.name) and module.name not in _KEYWORDS else _fmt_str(module.name)
    lines = [f"module {name} {{"]
    if module.meta:
        lines.append("  meta " + _fmt_literal(module.meta, "module meta"))
    for pname, t in module.params.items():
        lines.append(f"  param {_fmt_str(pname)} : {_fmt_type(TensorType.of(t))}")
    for v in module.inputs:
        lines.append(f"  input {_fmt_value(v)} : {_fmt_type(v.type)}")
    for n in module.nodes:
        lines.append("  " + format_node(n, show_defaults=show_defaults))
    outs = ", ".join(f"{_fmt_value(v)} as {_fmt_str(nm)}"
                     for v, nm in zip(module.outputs, module.output_names, strict=False))
    lines.append("  return" + (" " + outs if outs else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


# =========================================================================== tokenizer
class TextParseError(ValueError):
    """A syntax or semantic error in IR text, located by line and column (1-based)."""

    def __init__(self, msg: str, src: str, pos: int, filename: str = "<ir>"):
        self.line = src.count("\n", 0, pos) + 1
        start = src.rfind("\n", 0, pos) + 1
        end = src.find("\n", pos)
        end = len(src) if end < 0 else end
        self.col = pos - start + 1
        self.msg = msg
        from ctc.dsl.diagnostics import display_line, elide  # printable and short, whatever the text holds

        text, caret, _ = display_line(src[start:end], self.col, self.col + 1)
        super().__init__(f"{elide(filename)}:{self.line}:{self.col}: {elide(msg)}\n  {text}\n  {' ' * caret}^")


@dataclass(frozen=True)
class _Tok:
    kind: str  # name, value, string, int, float, punct, eof
    text: str
    pos: int
    value: Any = None


_PUNCT = set("{}()[],:=@+-*/")
_VALUE_RE = re.compile(r"[A-Za-z0-9_.]+")
_NUMBER_RE = re.compile(r"\d+(\.\d*)?([eE][+-]?\d+)?")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def _tokenize(src: str, filename: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if c in " \t\r\n":
            i += 1
            continue
        if c == "#":
            j = src.find("\n", i)
            i = n if j < 0 else j
            continue
        if c == '"':
            j, val = _scan_string(src, i, filename)
            toks.append(_Tok("string", src[i:j], i, val))
            i = j
            continue
        if c == "%":
            if i + 1 < n and src[i + 1] == '"':
                j, val = _scan_string(src, i + 1, filename)
                toks.append(_Tok("value", src[i:j], i, val))
                i = j
                continue
            m = _VALUE_RE.match(src, i + 1)
            if not m:
                raise TextParseError("expected a value name after '%'", src, i, filename)
            toks.append(_Tok("value", src[i:m.end()], i, m.group()))
            i = m.end()
            continue
        m = _NUMBER_RE.match(src, i)
        if m:
            text = m.group()
            if m.group(1) is not None or m.group(2) is not None:
                toks.append(_Tok("float", text, i, float(text)))
            else:
                toks.append(_Tok("int", text, i, int(text)))
            i = m.end()
            continue
        m = _NAME_RE.match(src, i)
        if m:
            toks.append(_Tok("name", m.group(), i, m.group()))
            i = m.end()
            continue
        if c == "/" and src.startswith("//", i):
            toks.append(_Tok("punct", "//", i))
            i += 2
            continue
        if c in _PUNCT:
            toks.append(_Tok("punct", c, i))
            i += 1
            continue
        raise TextParseError(f"unexpected character {c!r}", src, i, filename)
    toks.append(_Tok("eof", "", n))
    return toks


def _scan_string(src: str, i: int, filename: str) -> tuple[int, str]:
    """Scan the JSON-style string starting at ``src[i] == '"'``; return (end, decoded value)."""
    j, n = i + 1, len(src)
    while j < n and src[j] != '"' and src[j] != "\n":
        j += 2 if src[j] == "\\" else 1
    if j >= n or src[j] != '"':
        raise TextParseError("unterminated string", src, i, filename)
    try:
        return j + 1, json.loads(src[i:j + 1])
    except json.JSONDecodeError as e:
        raise TextParseError(f"bad string escape: {e.msg}", src, i + e.pos, filename) from None


# =========================================================================== parser
class _Parser:
    def __init__(self, src: str, filename: str):
        self.src = src
        self.filename = filename
        self.toks = _tokenize(src, filename)
        self.i = 0

    # ---- token helpers
    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def error(self, msg: str, tok: _Tok | None = None) -> TextParseError:
        return TextParseError(msg, self.src, (tok or self.tok).pos, self.filename)

    def describe(self, t: _Tok) -> str:
        return "end of input" if t.kind == "eof" else repr(t.text)

    def next(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def at(self, text: str) -> bool:
        t = self.tok
        return t.kind in ("punct", "name") and t.text == text

    def expect(self, text: str, what: str = "") -> _Tok:
        if not self.at(text):
            raise self.error(f"expected {text!r}{' ' + what if what else ''}, found {self.describe(self.tok)}")
        return self.next()

    def accept(self, text: str) -> bool:
        if self.at(text):
            self.i += 1
            return True
        return False

    def expect_kind(self, kind: str, what: str) -> _Tok:
        if self.tok.kind != kind:
            raise self.error(f"expected {what}, found {self.describe(self.tok)}")
        return self.next()

    # ---- literals
    def literal(self) -> Any:
        t = self.tok
        if t.kind == "int":
            self.next()
            return t.value
        if t.kind == "float":
            self.next()
            return t.value
        if t.kind == "string":
            self.next()
            return t.value
        if t.kind == "punct" and t.text == "-":
            self.next()
            u = self.tok
            if u.kind in ("int", "float"):
                self.next()
                return -u.value
            if u.kind == "name" and u.text == "inf":
                self.next()
                return -math.inf
            raise self.error("expected a number after '-'", u)
        if t.kind == "name":
            consts = {"true": True, "false": False, "none": None, "inf": math.inf, "nan": math.nan}
            if t.text in consts:
                self.next()
                return consts[t.text]
            raise self.error(f"unknown literal {t.text!r} (strings must be quoted)")
        if self.at("["):
            self.next()
            out = []
            if not self.at("]"):
                out.append(self.literal())
                while self.accept(","):
                    out.append(self.literal())
            self.expect("]", "to close the list")
            return out
        if self.at("{"):
            return self.dict_literal()
        raise self.error(f"expected a value, found {self.describe(t)}")

    def dict_literal(self, positions: dict[str, tuple[_Tok, _Tok]] | None = None) -> dict[str, Any]:
        """``{key = literal, ...}``; records each key's (key token, value token) in ``positions``."""
        self.expect("{")
        out: dict[str, Any] = {}
        if not self.at("}"):
            while True:
                kt = self.tok
                if kt.kind not in ("name", "string"):
                    raise self.error(f"expected a key, found {self.describe(kt)}")
                self.next()
                if kt.value in out:
                    raise self.error(f"duplicate key {kt.value!r}", kt)
                self.expect("=", f"after key {kt.value!r}")
                vt = self.tok
                out[kt.value] = self.literal()
                if positions is not None:
                    positions[kt.value] = (kt, vt)
                if not self.accept(","):
                    break
        self.expect("}", "to close the dict")
        return out

    # ---- types
    def dim(self) -> Any:
        start = self.tok
        depth = 0
        while True:
            t = self.tok
            if t.kind == "eof":
                raise self.error("unterminated type: expected ']'")
            if depth == 0 and t.kind == "punct" and t.text in ",]":
                break
            if t.kind == "punct" and t.text == "(":
                depth += 1
            elif t.kind == "punct" and t.text == ")":
                depth -= 1
                if depth < 0:
                    raise self.error("unbalanced ')' in dim")
            elif not (t.kind in ("int", "name") or (t.kind == "punct" and t.text in "+-*//")):
                raise self.error(f"unexpected {self.describe(t)} in a dim expression")
            self.next()
        if self.tok is start:
            raise self.error("empty dim")
        text = self.src[start.pos:self.tok.pos].strip()
        try:
            return normalize_dim(text)
        except SymbolicError as e:
            raise self.error(str(e), start) from None

    def type_(self) -> TensorType:
        t = self.expect_kind("name", "a type like f32[1, s0, 384]")
        if t.text not in DTYPES:
            raise self.error(f"unknown dtype {t.text!r} (known: {', '.join(sorted(DTYPES))})", t)
        self.expect("[", "after the dtype")
        dims = []
        if not self.at("]"):
            dims.append(self.dim())
            while self.accept(","):
                dims.append(self.dim())
        self.expect("]", "to close the shape")
        return TensorType(tuple(dims), t.text)

    # ---- module
    def module(self, params: Mapping[str, torch.Tensor] | None) -> Module:
        self.expect("module", "at the start of IR text")
        nt = self.tok
        if nt.kind not in ("name", "string"):
            raise self.error(f"expected the module name, found {self.describe(nt)}")
        self.next()
        m = Module(nt.value)
        self.expect("{", "to open the module body")
        values: dict[str, Value] = {}
        declared: dict[str, tuple[TensorType, _Tok]] = {}
        seen_return = False
        while not self.at("}"):
            t = self.tok
            if t.kind == "eof":
                raise self.error("expected '}' to close the module")
            if seen_return:
                raise self.error("nothing may follow 'return' in a module body")
            if t.kind == "name" and t.text == "meta":
                self.next()
                if m.meta:
                    raise self.error("meta given twice", t)
                m.meta = self.dict_literal()
            elif t.kind == "name" and t.text == "param":
                self.next()
                pt = self.expect_kind("string", "a quoted parameter name")
                self.expect(":")
                ty = self.type_()
                if pt.value in declared:
                    raise self.error(f"parameter {pt.value!r} declared twice", pt)
                if not ty.is_static:
                    raise self.error(f"parameter {pt.value!r} has a symbolic type {ty}; params are static", pt)
                declared[pt.value] = (ty, pt)
            elif t.kind == "name" and t.text == "input":
                self.next()
                vt = self.expect_kind("value", "an input value like %x")
                self.expect(":")
                ty = self.type_()
                v = Value(vt.value, ty)
                self.define(m, values, v, vt)
                m.inputs.append(v)
            elif t.kind == "name" and t.text == "return":
                self.next()
                seen_return = True
                outs, names = [], []
                if self.tok.kind == "value":
                    while True:
                        vt = self.expect_kind("value", "an output value")
                        outs.append(self.use(values, vt))
                        self.expect("as", "and the output name")
                        names.append(self.expect_kind("string", "a quoted output name").value)
                        if not self.accept(","):
                            break
                m.set_outputs(outs, names)
            else:
                self.node(m, values)
        if not seen_return:
            raise self.error("module has no 'return' line")
        self.expect("}")
        if self.tok.kind != "eof":
            raise self.error(f"unexpected {self.describe(self.tok)} after the module")
        self.attach_params(m, declared, params)
        return m

    def define(self, m: Module, values: dict[str, Value], v: Value, tok: _Tok) -> None:
        if v.name in values:
            raise self.error(f"value %{v.name} is defined twice", tok)
        values[v.name] = v
        m._names.add(v.name)

    def use(self, values: dict[str, Value], tok: _Tok) -> Value:
        try:
            return values[tok.value]
        except KeyError:
            raise self.error(f"value %{tok.value} is used before it is defined", tok) from None

    def node(self, m: Module, values: dict[str, Value]) -> None:
        out_toks: list[_Tok] = []
        if self.tok.kind == "value":
            out_toks.append(self.next())
            while self.accept(","):
                out_toks.append(self.expect_kind("value", "an output value"))
            self.expect("=", "after the node's outputs")
        opt = self.expect_kind("name", "an op name, 'param', 'input' or 'return'")
        try:
            opdef = get_op(opt.text)
        except OpError as e:
            raise self.error(str(e), opt) from None
        self.expect("(", "to open the operand list")
        in_toks: list[_Tok] = []
        if not self.at(")"):
            in_toks.append(self.expect_kind("value", "an operand like %x"))
            while self.accept(","):
                in_toks.append(self.expect_kind("value", "an operand like %x"))
        self.expect(")", "to close the operand list")
        inputs = [self.use(values, t) for t in in_toks]
        attr_tok = self.tok
        positions: dict[str, tuple[_Tok, _Tok]] = {}
        attrs = self.dict_literal(positions) if self.at("{") else {}
        where = f"{opt.text}"
        try:
            opdef.check_arity(len(inputs), where)
        except OpError as e:
            raise self.error(str(e), opt) from None
        for key, (kt, vt) in positions.items():
            if key not in opdef.attrs:
                near = difflib.get_close_matches(key, list(opdef.attrs), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise self.error(f"op {opdef.name} has no attribute {key!r}{hint} "
                                 f"(attributes: {', '.join(opdef.attrs) or 'none'})", kt)
            try:
                opdef.attrs[key].check(key, attrs[key], where)
            except OpError as e:
                raise self.error(str(e), vt) from None
        try:
            full = opdef.check_attrs(attrs, where=where)
        except OpError as e:
            raise self.error(str(e), attr_tok) from None
        types: list[TensorType] = []
        if out_toks or self.at(":"):
            self.expect(":", "before the result types")
            types.append(self.type_())
            while self.accept(","):
                types.append(self.type_())
        if len(types) != len(out_toks):
            raise self.error(f"{len(out_toks)} outputs but {len(types)} result types", opt)
        if len(out_toks) != opdef.num_outputs:
            raise self.error(f"op {opdef.name} has {opdef.num_outputs} outputs, {len(out_toks)} given", opt)
        scope, block = "", None
        if self.accept("loc"):
            self.expect("(", "after 'loc'")
            scope = self.expect_kind("string", "the quoted scope").value
            if self.accept(","):
                self.expect("block")
                self.expect("=")
                neg = self.accept("-")
                bt = self.expect_kind("int", "the block index")
                block = -bt.value if neg else bt.value
            self.expect(")", "to close loc(...)")
        node = Node(opdef.name, inputs, full, scope, block)
        node.module = m
        for i, (vt, ty) in enumerate(zip(out_toks, types, strict=False)):
            v = Value(vt.value, ty, node, i)
            self.define(m, values, v, vt)
            node.outputs.append(v)
        for i, v in enumerate(inputs):
            v.uses.append((node, i))
        m.nodes.append(node)

    def attach_params(self, m: Module, declared: dict[str, tuple[TensorType, _Tok]],
                      params: Mapping[str, torch.Tensor] | None) -> None:
        if params is not None:
            extra = sorted(set(params) - set(declared))
            if extra:
                raise TextParseError(f"params given for names the text does not declare: {extra}",
                                     self.src, 0, self.filename)
        for name, (ty, tok) in declared.items():
            if params is None:
                t = torch.zeros(tuple(int(d) for d in ty.shape), dtype=torch_dtype(ty.dtype))
            else:
                if name not in params:
                    raise self.error(f"parameter {name!r} is declared but missing from the params given", tok)
                t = params[name]
                if TensorType.of(t) != ty:
                    raise self.error(f"parameter {name!r} is declared {ty} but the tensor given is "
                                     f"{TensorType.of(t)}", tok)
            m.params[name] = t


def parse(text: str, params: Mapping[str, torch.Tensor] | None = None, *, filename: str = "<ir>") -> Module:
    """Parse IR text into a :class:`Module`.

    ``params`` supplies the parameter tensors (names and types must match the text);
    without it, zero tensors of the declared types stand in.  Errors are
    :class:`TextParseError` with line, column and a caret.
    """
    return _Parser(text, filename).module(params)


# =========================================================================== structural equality
def _lit_equal(a: Any, b: Any) -> bool:
    """Equality of attribute/meta values: NaN equals NaN, lists equal tuples, bool != int."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_lit_equal(x, y) for x, y in zip(a, b, strict=False))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_lit_equal(a[k], b[k]) for k in a)
    if type(a) is not type(b):
        return False
    return a == b


def structural_diff(a: Module, b: Module, *, names: bool = True, params_data: bool = False,
                    limit: int = 10) -> list[str]:
    """Differences between two modules, as readable lines (empty when structurally equal).

    Compares module name, meta, parameter names and types (and data with ``params_data``),
    inputs, every node (op, operands, attributes, result types, scope, block) and outputs.
    Values are matched by position; with ``names=False`` value names may differ.
    """
    out: list[str] = []

    def add(line: str) -> bool:
        out.append(line)
        return len(out) >= limit

    if a.name != b.name and add(f"module name: {a.name!r} != {b.name!r}"):
        return out
    if not _lit_equal(a.meta, b.meta) and add(f"meta: {a.meta!r} != {b.meta!r}"):
        return out
    if set(a.params) != set(b.params):
        if add(f"params only in first: {sorted(set(a.params) - set(b.params))}; "
               f"only in second: {sorted(set(b.params) - set(a.params))}"):
            return out
    for k in a.params:
        if k in b.params:
            ta, tb = TensorType.of(a.params[k]), TensorType.of(b.params[k])
            if ta != tb:
                if add(f"param {k!r}: {ta} != {tb}"):
                    return out
            elif params_data and not torch.equal(a.params[k], b.params[k]):
                if add(f"param {k!r}: data differs"):
                    return out
    vmap: dict[int, Value] = {}  # id(value in a) -> value in b

    def vname(v: Value) -> str:
        return "%" + v.name

    if len(a.inputs) != len(b.inputs):
        if add(f"inputs: {len(a.inputs)} != {len(b.inputs)}: {a.inputs} vs {b.inputs}"):
            return out
    for va, vb in zip(a.inputs, b.inputs, strict=False):
        vmap[id(va)] = vb
        if (names and va.name != vb.name) or va.type != vb.type:
            if add(f"input: {va!r} != {vb!r}"):
                return out
    if len(a.nodes) != len(b.nodes):
        if add(f"node count: {len(a.nodes)} != {len(b.nodes)}"):
            return out
    for i, (na, nb) in enumerate(zip(a.nodes, b.nodes, strict=False)):
        problems = []
        if na.op != nb.op:
            problems.append(f"op {na.op} != {nb.op}")
        if len(na.inputs) != len(nb.inputs) or any(
                vmap.get(id(x)) is not y for x, y in zip(na.inputs, nb.inputs, strict=False)):
            problems.append("operands differ")
        if not _lit_equal(dict(na.attrs), dict(nb.attrs)):
            problems.append("attributes differ")
        if len(na.outputs) != len(nb.outputs):
            problems.append("output counts differ")
        for x, y in zip(na.outputs, nb.outputs, strict=False):
            vmap[id(x)] = y
            if x.type != y.type:
                problems.append(f"type of output {x.index} differs")
            if names and x.name != y.name:
                problems.append(f"output name {vname(x)} != {vname(y)}")
        if na.scope != nb.scope or na.block != nb.block:
            problems.append("location differs")
        if problems:
            if add(f"node {i}: {'; '.join(problems)}\n    first:  {format_node(na, show_defaults=True)}\n"
                   f"    second: {format_node(nb, show_defaults=True)}"):
                return out
    if len(a.outputs) != len(b.outputs) or any(
            vmap.get(id(x)) is not y for x, y in zip(a.outputs, b.outputs, strict=False)):
        add(f"outputs differ: {[vname(v) for v in a.outputs]} vs {[vname(v) for v in b.outputs]}")
    elif a.output_names != b.output_names:
        add(f"output names differ: {a.output_names} vs {b.output_names}")
    return out


def structurally_equal(a: Module, b: Module, *, names: bool = True, params_data: bool = False) -> bool:
    """True when ``a`` and ``b`` have the same structure (see :func:`structural_diff`)."""
    return not structural_diff(a, b, names=names, params_data=params_data, limit=1)
