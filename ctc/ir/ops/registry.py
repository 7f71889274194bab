"""The op registry: every ctc op is declared exactly once, here or in a sibling module.

A declaration gives the op's name, its operands, an attribute schema (kind, default,
doc, allowed values), a type-inference function and a torch reference implementation.
The reference implementation *is* the op's semantics: the interpreter runs it, every
backend is tested against it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ctc.ir.types import TensorType

REQUIRED = object()

# Attribute kinds and the Python values they admit.
ATTR_KINDS = ("int", "float", "bool", "str", "ints", "floats", "strs", "dims", "dtype",
              "opt_int", "opt_float", "opt_str", "opt_ints")


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


@dataclass
class OpDef:
    """Declaration of one op.

    ``inputs`` names the operands; a name ending in ``?`` is optional (may be omitted
    from the end), and a name starting with ``*`` takes any number (>= 1) of operands.
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
    _min_inputs: int = field(init=False)
    _max_inputs: int | None = field(init=False)

    def __post_init__(self) -> None:
        required = [i for i in self.inputs if not i.endswith("?") and not i.startswith("*")]
        self._min_inputs = len(required) + sum(1 for i in self.inputs if i.startswith("*"))
        self._max_inputs = None if any(i.startswith("*") for i in self.inputs) else len(self.inputs)

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
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator declaring an op; the decorated function is its reference implementation.

    The reference implementation takes the operand tensors positionally and the
    attributes as keyword arguments, and returns a tensor (or a tuple for several outputs).
    Its docstring becomes the op's doc.
    """

    def deco(ref: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"op {name!r} declared twice")
        _REGISTRY[name] = OpDef(
            name=name, inputs=tuple(inputs), attrs=dict(attrs or {}), infer=infer, ref=ref,
            num_outputs=num_outputs, doc=(ref.__doc__ or "").strip(), pure=pure, category=category,
        )
        return ref

    return deco


def get_op(name: str) -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        near = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise OpError(f"unknown op {name!r}{hint}") from None


def all_ops() -> dict[str, OpDef]:
    return dict(sorted(_REGISTRY.items()))
