"""Patterns over the IR: match a node and its operands, capture parts by name.

A small matcher library in the manner of tinygrad's ``UPat`` and TVM Relax's dataflow
patterns, over ctc's named operands::

    from ctc.ir.patterns import op, var, unit

    p = op("mul", var("x"), unit(), commutative=True)      # x * 1, 1 * x, mul(x) {scalar=1}
    m = p.match(node)                                       # a Match, or None
    m["x"]                                                  # the captured Value

Building blocks:

* ``op(name_or_names, *operands, **named)``: a node of one of these ops.  Positional
  operand patterns match the node's *logical* operands: its present operands in declared
  order, where an operand given by a scalar attribute (``mul(x) {scalar=2}``,
  ``reverse=true`` puts it first) is a :class:`~ctc.ir.ops.Scalar` that only constant
  patterns and ``any_()`` match.  A trailing ``...`` allows more operands.  Keyword
  patterns match operands by declared name (``bias=absent()``).  ``attrs={k: value or
  predicate}``, ``where=predicate(node)``, ``commutative=True`` (two operands, either
  order), ``single_use=True`` (its result is read once and is no module output).
  Op names, operand names and attribute names are checked against the registry when the
  pattern is built, with the nearest valid name in the error.
* ``var(name)``: any value, captured; the same name twice must be the same value.
  ``any_()``: anything (a value or a scalar operand), not captured.
* ``const()``, ``splat(v)``, ``unit()``, ``zero()``, ``cvar(name)``: constants: ``full``
  nodes, parameters (a uniform parameter is a splat), and scalar-attribute operands.  A
  capture is a :class:`Const`.
* ``absent()``: an optional operand that is not there.
* ``a | b``: either pattern; ``p.named(n)`` captures what ``p`` matches (the node of an op
  pattern); ``p.where(pred)`` adds a predicate on it; ``has_type(dtype=, rank=, static=)``
  builds a type predicate.
* ``chain("linear", "gelu", "linear")``: each op reading the previous one's result through
  its first (or ``via``) operand; pass op patterns instead of names to constrain a link.

A :class:`Match` gives captures by name (``m["x"]``), the matched ``root`` node and every
node the pattern matched (``m.nodes``, root first).  Rewrites consume matches through
:mod:`ctc.ir.rewrite`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from ctc.ir.graph import Node, Value
from ctc.ir.ops import OpError, Scalar, get_op
from ctc.ir.ops.registry import did_you_mean
from ctc.ir.types import TensorType

__all__ = ["Const", "Match", "Pattern", "absent", "any_", "chain", "const", "constant", "cvar", "has_type", "op",
           "same_type", "splat", "unit", "var", "zero"]

# A logical operand: a value, an operand given by a scalar attribute, or None (absent optional).
Operand = Union[Value, Scalar, None]

# Uniform parameters larger than this are not inspected for splat values (the check reads the tensor).
MAX_SPLAT_CHECK = 1 << 20


class PatternError(OpError):
    """A pattern built with an unknown op, operand or attribute name, or malformed."""


# --------------------------------------------------------------------------- constants
@dataclass(frozen=True)
class Const:
    """A constant operand: a ``full`` node, a parameter read, or a scalar attribute.

    ``value`` is the operand (None for a scalar attribute), ``splat`` the single value every
    element holds (None when the elements differ or could not be inspected), ``tensor`` the
    data when it is known without running anything (a parameter's tensor; None otherwise).
    """

    value: Value | None
    splat: float | None
    tensor: torch.Tensor | None = None

    @property
    def is_scalar_attr(self) -> bool:
        return self.value is None


def constant(x: Value | Scalar) -> Const | None:
    """The constant behind an operand, or None when it is computed from inputs.

    ``full`` nodes are splats of their fill value; a ``param`` read is a constant whose
    splat is set when all its elements are equal and finite (checked on tensors of at most
    ``MAX_SPLAT_CHECK`` elements); a :class:`Scalar` operand is a splat.
    """
    if isinstance(x, Scalar):
        return Const(None, x.value)
    p = x.producer
    if p is None:
        return None
    if p.op == "full":
        return Const(x, float(p.attrs["value"]))
    if p.op == "param" and p.module is not None:
        t = p.module.params.get(p.attrs["name"])
        if t is None:
            return None
        splat: float | None = None
        if 0 < t.numel() <= MAX_SPLAT_CHECK:
            first = t.reshape(-1)[0]
            if bool((t == first).all()) and (not t.is_floating_point() or bool(torch.isfinite(first))):
                splat = float(first)
        return Const(x, splat, t)
    return None


# --------------------------------------------------------------------------- matches
class Match:
    """The result of a successful match: captures by name, the root node, the matched nodes."""

    __slots__ = ("root", "captures", "nodes")

    def __init__(self, root: Node | None, captures: dict[str, Any], nodes: list[Node]):
        self.root = root
        self.captures = captures
        self.nodes = nodes

    def __getitem__(self, name: str) -> Any:
        try:
            return self.captures[name]
        except KeyError:
            raise KeyError(f"pattern captured no {name!r}{did_you_mean(name, list(self.captures))} "
                           f"(captured: {', '.join(self.captures) or 'nothing'})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.captures

    def get(self, name: str, default: Any = None) -> Any:
        return self.captures.get(name, default)

    def __repr__(self) -> str:
        return f"<Match root={self.root!r} captures={sorted(self.captures)}>"


class _State:
    """Captures and matched nodes while matching; snapshots make alternatives undoable."""

    __slots__ = ("captures", "nodes")

    def __init__(self) -> None:
        self.captures: dict[str, Any] = {}
        self.nodes: list[Node] = []

    def save(self) -> tuple[dict[str, Any], int]:
        return dict(self.captures), len(self.nodes)

    def restore(self, snap: tuple[dict[str, Any], int]) -> None:
        self.captures = dict(snap[0])
        del self.nodes[snap[1]:]

    def bind(self, name: str | None, what: Any) -> bool:
        if name is None:
            return True
        if name in self.captures:
            old = self.captures[name]
            if isinstance(old, Const) and isinstance(what, Const):
                return old.value is what.value and old.splat == what.splat
            return old is what
        self.captures[name] = what
        return True


# --------------------------------------------------------------------------- patterns
Predicate = Callable[[Any], bool]


class Pattern:
    """Base of every pattern.  Subclasses implement :meth:`_match` on one logical operand."""

    def __init__(self, name: str | None = None, preds: Sequence[Predicate] = ()):
        self.name = name
        self.preds = tuple(preds)

    # ----------------------------------------------------------------- combinators
    def _copy(self, **changes: Any) -> Pattern:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new

    def named(self, name: str) -> Pattern:
        """The same pattern, capturing what it matches under ``name``."""
        return self._copy(name=name)

    def where(self, pred: Predicate) -> Pattern:
        """The same pattern with one more predicate on what it matches (and would capture)."""
        return self._copy(preds=self.preds + (pred,))

    def __or__(self, other: Pattern) -> Pattern:
        return _Or((self, other))

    # ----------------------------------------------------------------- matching
    def match(self, target: Node | Value) -> Match | None:
        """Match against a node (op patterns) or a value; a :class:`Match` or None."""
        st = _State()
        if isinstance(target, Node):
            if not isinstance(self, (OpPattern, _Or)):
                raise PatternError(f"{self!r} matches values, not nodes; match it against a value")
            ok = self._match_node(target, st)
            root: Node | None = target
        else:
            ok = self._match(target, st)
            root = target.producer
        return Match(root, st.captures, st.nodes) if ok else None

    def _match(self, x: Operand, st: _State) -> bool:
        raise NotImplementedError

    def _check(self, what: Any, st: _State) -> bool:
        return all(p(what) for p in self.preds) and st.bind(self.name, what)

    def root_ops(self) -> frozenset[str] | None:
        """Op names a root node must have for this pattern to match (None: any)."""
        return None


class _Any(Pattern):
    def __init__(self, name: str | None = None, *, values_only: bool = False):
        super().__init__(name)
        self.values_only = values_only

    def _match(self, x: Operand, st: _State) -> bool:
        if x is None or (self.values_only and not isinstance(x, Value)):
            return False
        return self._check(x, st)

    def __repr__(self) -> str:
        return f"var({self.name!r})" if self.name else "any_()"


class _Absent(Pattern):
    def _match(self, x: Operand, st: _State) -> bool:
        return x is None

    def __repr__(self) -> str:
        return "absent()"


class _Const(Pattern):
    def __init__(self, name: str | None = None, value: float | None = None, *, splat_only: bool = False):
        super().__init__(name)
        self.value = value
        self.splat_only = splat_only or value is not None

    def _match(self, x: Operand, st: _State) -> bool:
        if x is None:
            return False
        c = constant(x)
        if c is None or (self.splat_only and c.splat is None):
            return False
        if self.value is not None:
            assert c.splat is not None
            if not (c.splat == self.value or (math.isnan(self.value) and math.isnan(c.splat))):
                return False
        return self._check(c, st)

    def __repr__(self) -> str:
        if self.value is not None:
            return f"splat({self.value!r})"
        return "splat()" if self.splat_only else "const()"


class _Or(Pattern):
    def __init__(self, alts: Sequence[Pattern], name: str | None = None):
        super().__init__(name)
        flat: list[Pattern] = []
        for a in alts:
            flat.extend(a.alts if isinstance(a, _Or) and a.name is None and not a.preds else [a])
        self.alts = tuple(flat)

    def _match(self, x: Operand, st: _State) -> bool:
        for a in self.alts:
            snap = st.save()
            if a._match(x, st) and self._check(x, st):
                return True
            st.restore(snap)
        return False

    def _match_node(self, node: Node, st: _State) -> bool:
        for a in self.alts:
            snap = st.save()
            ok = a._match_node(node, st) if isinstance(a, OpPattern) else (
                len(node.outputs) == 1 and a._match(node.outputs[0], st))
            if ok and self._check(node, st):
                return True
            st.restore(snap)
        return False

    def root_ops(self) -> frozenset[str] | None:
        ops: set[str] = set()
        for a in self.alts:
            r = a.root_ops()
            if r is None:
                return None
            ops |= r
        return frozenset(ops)

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.alts))


AttrSpec = Union[Any, Callable[[Any], bool]]


class OpPattern(Pattern):
    """A node of one of ``ops`` whose operands and attributes match (see the module doc)."""

    def __init__(self, ops: str | Iterable[str], operands: Sequence[Pattern | Any] = (),
                 named: Mapping[str, Pattern] | None = None, *, attrs: Mapping[str, AttrSpec] | None = None,
                 where: Predicate | None = None, commutative: bool = False, single_use: bool = False,
                 name: str | None = None):
        super().__init__(name, (where,) if where is not None else ())
        self.ops = (ops,) if isinstance(ops, str) else tuple(ops)
        if not self.ops:
            raise PatternError("op(): give at least one op name")
        defs = []
        for o in self.ops:
            try:
                defs.append(get_op(o))
            except OpError as e:
                raise PatternError(f"pattern names {e}") from None
        pos = list(operands)
        self.open = bool(pos) and pos[-1] is Ellipsis
        if self.open:
            pos.pop()
        for p in pos:
            if not isinstance(p, Pattern):
                raise PatternError(f"op({self.ops[0]!r}): operand patterns must be patterns, got {p!r} "
                                   "(use var(), const(), splat(v), op(...))")
        self.operands = tuple(pos)
        self.named_ops = dict(named or {})
        for k, p in self.named_ops.items():
            for d in defs:
                if k not in d.operand_names:
                    raise PatternError(f"pattern names operand {k!r} of op {d.name}, which has none"
                                       f"{did_you_mean(k, d.operand_names)} (operands: {', '.join(d.inputs)})")
            if not isinstance(p, Pattern):
                raise PatternError(f"op({self.ops[0]!r}): operand {k}= must be a pattern, got {p!r}")
        self.attrs = dict(attrs or {})
        for k in self.attrs:
            for d in defs:
                if k not in d.attrs:
                    raise PatternError(f"pattern names attribute {k!r} of op {d.name}, which has none"
                                       f"{did_you_mean(k, sorted(d.attrs))} (attributes: "
                                       f"{', '.join(sorted(d.attrs)) or 'none'})")
        if commutative and len(self.operands) != 2:
            raise PatternError(f"op({self.ops[0]!r}): commutative matching needs exactly two operand patterns")
        self.commutative = commutative
        self.single_use = single_use

    def root_ops(self) -> frozenset[str] | None:
        return frozenset(self.ops)

    def _match(self, x: Operand, st: _State) -> bool:
        if not isinstance(x, Value) or x.producer is None:
            return False
        if self.single_use and (len(x.uses) != 1 or (x.producer.module is not None
                                                     and x.producer.module.is_output(x))):
            return False
        return self._match_node(x.producer, st)

    def _match_node(self, node: Node, st: _State) -> bool:
        if node.op not in self.ops:
            return False
        for k, want in self.attrs.items():
            have = node.attrs.get(k)
            if callable(want):
                if not want(have):
                    return False
            elif _norm(have) != _norm(want):
                return False
        slots = node.slots()
        snap = st.save()
        st.nodes.append(node)
        if self._match_operands(node, slots, st) and self._check(node, st):
            return True
        st.restore(snap)
        return False

    def _match_operands(self, node: Node, slots: dict[str, Any], st: _State) -> bool:
        for k, p in self.named_ops.items():
            s = slots[k]
            if isinstance(s, slice):
                raise PatternError(f"operand {k!r} of {node.op} is variadic; match it positionally")
            if not p._match(_operand(node, s), st):
                return False
        if not self.operands and not self.open:
            return True
        logical: list[Operand] = []
        for s in slots.values():
            if isinstance(s, slice):
                logical.extend(node.inputs[s])
            elif s is not None:
                logical.append(_operand(node, s))
        n = len(self.operands)
        if len(logical) < n or (len(logical) > n and not self.open):
            return False
        orders = [(0, 1), (1, 0)] if self.commutative else [tuple(range(n))]
        for order in orders:
            snap = st.save()
            if all(p._match(logical[i], st) for p, i in zip(self.operands, order, strict=True)):
                return True
            st.restore(snap)
        return False

    def __repr__(self) -> str:
        parts = [repr(p) for p in self.operands] + (["..."] if self.open else [])
        parts += [f"{k}={p!r}" for k, p in self.named_ops.items()]
        head = self.ops[0] if len(self.ops) == 1 else "|".join(self.ops)
        return f"op({head!r}{', ' if parts else ''}{', '.join(parts)})"


def _operand(node: Node, s: Any) -> Operand:
    if isinstance(s, int):
        return node.inputs[s]
    return s  # a Scalar, or None


def _norm(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_norm(x) for x in v)
    if isinstance(v, tuple):
        return tuple(_norm(x) for x in v)
    return v


# --------------------------------------------------------------------------- constructors
def op(ops: str | Iterable[str], *operands: Pattern | Any, attrs: Mapping[str, AttrSpec] | None = None,
       where: Predicate | None = None, commutative: bool = False, single_use: bool = False,
       name: str | None = None, **named: Pattern) -> OpPattern:
    """A node of op ``ops`` (a name or several) with these operand patterns; see the module doc."""
    return OpPattern(ops, operands, named, attrs=attrs, where=where, commutative=commutative,
                     single_use=single_use, name=name)


def var(name: str) -> Pattern:
    """Any value (not a scalar attribute), captured as ``name``."""
    return _Any(name, values_only=True)


def any_() -> Pattern:
    """Anything: a value or a scalar-attribute operand (not captured)."""
    return _Any()


def absent() -> Pattern:
    """An optional operand that is not present."""
    return _Absent()


def const(name: str | None = None) -> Pattern:
    """Any constant: a ``full`` node, a parameter read, or a scalar attribute; captured as a :class:`Const`."""
    return _Const(name)


def cvar(name: str) -> Pattern:
    """Any constant, captured as ``name`` (a :class:`Const`)."""
    return _Const(name)


def splat(value: float | None = None, name: str | None = None) -> Pattern:
    """A constant all of whose elements equal ``value`` (any single value when None).

    ``0.0`` also matches ``-0.0`` (they compare equal); ``nan`` matches NaN fills.
    """
    return _Const(name, value, splat_only=True)


def unit(name: str | None = None) -> Pattern:
    """A constant of ones."""
    return splat(1.0, name)


def zero(name: str | None = None) -> Pattern:
    """A constant of zeros (either sign)."""
    return splat(0.0, name)


def chain(*links: str | OpPattern, via: str | None = None, single_use: bool = False) -> OpPattern:
    """Ops each reading the previous one's result through operand ``via`` (default: its first operand).

    ``chain("linear", "gelu", "linear")`` matches ``linear(gelu(linear(...)))`` rooted at the
    last linear; op patterns may stand for links (``op("linear", name="fc1")``) to add
    captures and constraints.  With ``single_use``, every intermediate result is read only
    by the next link (what a fusion needs).
    """
    if len(links) < 2:
        raise PatternError("chain() needs at least two links")
    pats = [op(x) if isinstance(x, str) else x for x in links]
    cur = pats[0]
    if single_use:
        cur = cur._copy(single_use=True)
    for k, nxt in enumerate(pats[1:], start=1):
        slot = via
        if slot is None:
            names = get_op(nxt.ops[0]).operand_names
            if not names:
                raise PatternError(f"chain(): op {nxt.ops[0]} takes no operands")
            slot = names[0]
        for o in nxt.ops:
            if slot not in get_op(o).operand_names:
                raise PatternError(f"chain(): op {o} has no operand {slot!r}"
                                   f"{did_you_mean(slot, get_op(o).operand_names)}")
        if slot in nxt.named_ops:
            raise PatternError(f"chain(): link {k} already constrains operand {slot!r}")
        cur = nxt._copy(named_ops={**nxt.named_ops, slot: cur},
                        single_use=nxt.single_use or (single_use and k < len(pats) - 1))
    assert isinstance(cur, OpPattern)
    return cur


# --------------------------------------------------------------------------- predicates
def has_type(*, dtype: str | Iterable[str] | None = None, rank: int | None = None,
             static: bool | None = None) -> Predicate:
    """A predicate on a value's (or single-output node's) type, for :meth:`Pattern.where`."""
    dtypes = None if dtype is None else ({dtype} if isinstance(dtype, str) else set(dtype))

    def pred(x: Any) -> bool:
        t = _type_of(x)
        if t is None:
            return False
        return ((dtypes is None or t.dtype in dtypes) and (rank is None or t.rank == rank)
                and (static is None or t.is_static == static))

    return pred


def _type_of(x: Any) -> TensorType | None:
    if isinstance(x, Value):
        return x.type
    if isinstance(x, Node):
        return x.outputs[0].type if len(x.outputs) == 1 else None
    if isinstance(x, Const) and x.value is not None:
        return x.value.type
    return None


def same_type(a: Value, b: Value) -> bool:
    """Whether two values have equal types (symbolic dims compared as expressions)."""
    from ctc.ir.verify import types_equal

    return types_equal(a.type, b.type)

