"""The op registry: every ctc op is declared exactly once, here or in a sibling module.

A declaration gives the op's name, its operands, an attribute schema (kind, default,
doc, allowed values), a type-inference function and a torch reference implementation.
The reference implementation *is* the op's semantics: the interpreter runs it, every
backend is tested against it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from ctc.ir.types import TensorType

REQUIRED = object()

# Attribute kinds and the Python values they admit.
ATTR_KINDS = ("int", "float", "bool", "str", "ints", "floats", "strs", "dims", "dtype",
              "opt_int", "opt_float", "opt_str", "opt_ints", "opt_floats")


class OpError(Exception):
    """An op used with the wrong operands, attributes or types."""


@dataclass(frozen=True)
class Attr:
    """Schema of one attribute."""

    kind: str
    default: Any = REQUIRED
    doc: str = ""
    choices: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ATTR_KINDS:
            raise ValueError(f"unknown attribute kind {self.kind!r}")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, name: str, value: Any, where: str) -> Any:
        """Validate and normalise one attribute value (lists become tuples)."""
        k = self.kind
        if k.startswith("opt_"):
            if value is None:
                return None
            k = k[4:]

        def bad(expect: str) -> OpError:
            return OpError(f"{where}: attribute {name}={value!r} should be {expect}")

        if k == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad("an int")
        elif k == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad("a float")
            value = float(value)
        elif k == "bool":
            if not isinstance(value, bool):
                raise bad("a bool")
        elif k in ("str", "dtype"):
            if not isinstance(value, str):
                raise bad("a string")
            if k == "dtype":
                from ctc.ir.types import DTYPES

                if value not in DTYPES:
                    raise bad(f"one of {sorted(DTYPES)}")
        elif k in ("ints", "floats", "strs", "dims"):
            if not isinstance(value, (list, tuple)):
                raise bad("a list")
            elem = {"ints": (int,), "floats": (int, float), "strs": (str,), "dims": (int, str)}[k]
            if any(isinstance(x, bool) or not isinstance(x, elem) for x in value):
                raise bad(f"a list of {k[:-1]}")
            if k == "floats":
                value = tuple(float(x) for x in value)
            elif k == "dims":
                from ctc.ir.symbolic import normalize_dim

                value = tuple(normalize_dim(x) for x in value)
            else:
                value = tuple(value)
        if self.choices is not None and value not in self.choices:
            raise OpError(f"{where}: attribute {name}={value!r} must be one of {list(self.choices)}")
        return value


InferFn = Callable[[list[TensorType], dict[str, Any]], list[TensorType]]


@dataclass(frozen=True)
class Scalar:
    """An operand given by a scalar attribute instead of a tensor (``mul(x) {scalar=2}``).

    ``attr`` names the attribute holding ``value``; patterns match it like a constant.
    """

    value: float
    attr: str


# What an op's ``layout`` hook says about one declared operand, from the node's attributes:
# True = a tensor operand, False = absent, Scalar = given by that attribute.
Presence = Union[bool, Scalar]
LayoutFn = Callable[[Mapping[str, Any]], Mapping[str, Presence]]
# Where a named operand is: an index into ``node.inputs``, a slice (variadic), a Scalar, or None.
Slot = Union[int, slice, Scalar, None]


def _bare(name: str) -> str:
    return name.rstrip("?").lstrip("*")


def did_you_mean(name: str, known: Sequence[str]) -> str:
    """`` (did you mean x?)`` for the nearest of ``known``, or ``""``."""
    near = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


@dataclass
class OpDef:
    """Declaration of one op.

    ``inputs`` names the operands; a name ending in ``?`` is optional (may be omitted
    from the end), and a name starting with ``*`` takes any number (>= 1) of operands.
    ``layout`` decodes attribute-dependent layouts: given the attributes, it says which
    operands are tensors, absent, or given by a scalar attribute (``quant_linear``'s bias
    iff ``has_bias``; ``mul``'s ``b`` is the ``scalar`` attribute when set).  Without it,
    optional operands are present as a prefix in declared order.  :meth:`slots` is the
    one decoder every named-operand accessor uses.
    """

    name: str
    inputs: tuple[str, ...]
    attrs: dict[str, Attr]
    infer: InferFn
    ref: Callable[..., Any]
    num_outputs: int = 1
    doc: str = ""
    pure: bool = True
    category: str = "core"
    layout: LayoutFn | None = None
    _min_inputs: int = field(init=False)
    _max_inputs: int | None = field(init=False)

    def __post_init__(self) -> None:
        required = [i for i in self.inputs if not i.endswith("?") and not i.startswith("*")]
        self._min_inputs = len(required) + sum(1 for i in self.inputs if i.startswith("*"))
        self._max_inputs = None if any(i.startswith("*") for i in self.inputs) else len(self.inputs)
        variadic = [i for i in self.inputs if i.startswith("*")]
        if len(variadic) > 1:
            raise ValueError(f"op {self.name}: at most one variadic operand, got {variadic}")
        if variadic and any(i.endswith("?") for i in self.inputs) and self.layout is None:
            raise ValueError(f"op {self.name}: a variadic operand with optional ones needs a layout hook")
        names = [_bare(i) for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"op {self.name}: operand names repeat: {names}")

    # ----------------------------------------------------------------- named operands
    @property
    def operand_names(self) -> tuple[str, ...]:
        """Declared operand names without the ``?``/``*`` markers, in order."""
        return tuple(_bare(i) for i in self.inputs)

    @property
    def variadic(self) -> str | None:
        """The name of the variadic operand (``*xs``), if any."""
        return next((_bare(i) for i in self.inputs if i.startswith("*")), None)

    def check_operand_name(self, name: str) -> None:
        """Raise :class:`OpError` with the nearest name when ``name`` is not an operand of this op."""
        if name not in self.operand_names:
            raise OpError(f"op {self.name} has no operand {name!r}{did_you_mean(name, self.operand_names)} "
                          f"(operands: {', '.join(self.inputs) or 'none'})")

    def _presence(self, attrs: Mapping[str, Any]) -> Mapping[str, Presence]:
        if self.layout is None:
            return {}
        return self.layout(attrs)

    def slots(self, n_inputs: int, attrs: Mapping[str, Any], where: str = "") -> dict[str, Slot]:
        """Where each declared operand is for a node with ``n_inputs`` tensors and ``attrs``.

        The one decoder of operand layouts.  Raises :class:`OpError` when the count does not
        fit the layout the attributes describe.
        """
        where = where or self.name
        pres = self._presence(attrs)
        fixed = 0
        unknown: list[str] = []
        for decl in self.inputs:
            name = _bare(decl)
            p = pres.get(name)
            if isinstance(p, Scalar) or p is False:
                continue
            if p is True or not (decl.endswith("?") or decl.startswith("*")):
                fixed += 1
            elif decl.endswith("?"):
                unknown.append(name)
        var = self.variadic
        if var is not None:
            n_var = n_inputs - fixed
            if n_var < 1:
                raise OpError(f"{where}: {self.name} needs at least one {var!r} operand "
                              f"({', '.join(self.inputs)}), got {n_inputs} operand(s)")
            present_opt: set[str] = set()
        else:
            extra = n_inputs - fixed
            if extra < 0 or extra > len(unknown):
                raise OpError(self._count_message(n_inputs, fixed, len(unknown), pres, where))
            present_opt = set(unknown[:extra])
        out: dict[str, Slot] = {}
        i = 0
        for decl in self.inputs:
            name = _bare(decl)
            p = pres.get(name)
            if isinstance(p, Scalar):
                out[name] = p
            elif p is False or (p is None and decl.endswith("?") and name not in present_opt):
                out[name] = None
            elif decl.startswith("*"):
                out[name] = slice(i, i + n_var)
                i += n_var
            else:
                out[name] = i
                i += 1
        return out

    def _count_message(self, n: int, fixed: int, n_opt: int, pres: Mapping[str, Presence], where: str) -> str:
        if self.layout is not None:
            tensors = [_bare(d) for d in self.inputs if pres.get(_bare(d), not d.endswith("?")) is True]
            return (f"{where}: by its attributes, {self.name} takes {len(tensors)} tensor operand(s) "
                    f"({', '.join(tensors)}); the node has {n}")
        want = f"{fixed}" if n_opt == 0 else f"{fixed}..{fixed + n_opt}"
        return f"{where}: {self.name} takes {want} operands ({', '.join(self.inputs)}), got {n}"

    def pack(self, named: Mapping[str, Any], attrs: Mapping[str, Any], where: str = "") -> list[Any]:
        """Positional operands from named ones (``None`` = absent), checked against the layout.

        ``attrs`` must be complete (defaults filled, as :meth:`check_attrs` returns them).
        Unknown names, missing required operands, operands the attributes say are absent or
        scalars, and optional operands out of declared order are errors.
        """
        where = where or self.name
        for k in named:
            self.check_operand_name(k)
        pres = self._presence(attrs)
        out: list[Any] = []
        gap: str | None = None
        for decl in self.inputs:
            name = _bare(decl)
            v = named.get(name)
            p = pres.get(name)
            if isinstance(p, Scalar):
                if v is not None:
                    raise OpError(f"{where}: operand {name!r} of {self.name} is the scalar attribute "
                                  f"{p.attr}={p.value}; pass no tensor for it (or set {p.attr}=None)")
                continue
            if p is False:
                if v is not None:
                    raise OpError(f"{where}: operand {name!r} given, but {self.name}'s attributes say it is "
                                  f"absent (attributes {self._attrs_text(attrs)})")
                continue
            if decl.startswith("*"):
                vs = list(v) if v is not None else []
                if not vs:
                    raise OpError(f"{where}: {self.name} needs at least one {name!r} operand")
                out.extend(vs)
                continue
            required = p is True or not decl.endswith("?")
            if v is None:
                if required:
                    raise OpError(f"{where}: {self.name} needs operand {name!r}"
                                  + (f" (attributes {self._attrs_text(attrs)})" if p is True else ""))
                gap = gap or name
                continue
            if gap is not None and p is None:
                raise OpError(f"{where}: {self.name} operand {name!r} given without {gap!r}; optional operands "
                              f"are positional ({', '.join(self.inputs)})")
            out.append(v)
        return out

    def _attrs_text(self, attrs: Mapping[str, Any]) -> str:
        return ", ".join(f"{k}={attrs[k]!r}"[:40] for k in self.attrs if k in attrs) or "no attributes"

    def check_arity(self, n: int, where: str) -> None:
        if n < self._min_inputs or (self._max_inputs is not None and n > self._max_inputs):
            want = f"{self._min_inputs}" if self._min_inputs == self._max_inputs else (
                f"{self._min_inputs}..{self._max_inputs if self._max_inputs is not None else 'N'}")
            raise OpError(f"{where}: {self.name} takes {want} operands ({', '.join(self.inputs)}), got {n}")

    def check_attrs(self, attrs: dict[str, Any], where: str = "") -> dict[str, Any]:
        """Fill defaults and validate; unknown attributes are an error."""
        where = where or self.name
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise OpError(f"{where}: unknown attribute(s) {sorted(unknown)} for op {self.name} "
                          f"(known: {sorted(self.attrs)})")
        out: dict[str, Any] = {}
        for k, spec in self.attrs.items():
            if k in attrs:
                out[k] = spec.check(k, attrs[k], where)
            elif spec.required:
                raise OpError(f"{where}: op {self.name} needs attribute {k!r} ({spec.doc})")
            else:
                out[k] = spec.default
        return out

    def infer_types(self, in_types: Sequence[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        self.check_arity(len(in_types), self.name)
        out = self.infer(list(in_types), attrs)
        if isinstance(out, TensorType):
            out = [out]
        if len(out) != self.num_outputs:
            raise OpError(f"{self.name}: inference gave {len(out)} types for {self.num_outputs} outputs")
        return list(out)


_REGISTRY: dict[str, OpDef] = {}


def register_op(
    name: str,
    *,
    inputs: Sequence[str],
    infer: InferFn,
    attrs: dict[str, Attr] | None = None,
    num_outputs: int = 1,
    pure: bool = True,
    category: str = "core",
    layout: LayoutFn | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator declaring an op; the decorated function is its reference implementation.

    The reference implementation takes the operand tensors positionally and the
    attributes as keyword arguments, and returns a tensor (or a tuple for several outputs).
    Its docstring becomes the op's doc.  ``layout`` decodes operand layouts that depend on
    attributes (see :class:`OpDef`).
    """

    def deco(ref: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"op {name!r} declared twice")
        _REGISTRY[name] = OpDef(
            name=name, inputs=tuple(inputs), attrs=dict(attrs or {}), infer=infer, ref=ref,
            num_outputs=num_outputs, doc=(ref.__doc__ or "").strip(), pure=pure, category=category,
            layout=layout,
        )
        return ref

    return deco


def get_op(name: str) -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        near = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise OpError(f"unknown op {name!r}{hint}") from None


def all_ops() -> dict[str, OpDef]:
    return dict(sorted(_REGISTRY.items()))
