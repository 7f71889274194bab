"""Declared, strictly validated options: what passes, targets and the recipe checker share.

An options class is a frozen dataclass whose fields are declared with :func:`option` (default,
one-line doc, optional ``min``/``max``/``choices``).  Construction coerces and checks every
field against its annotation (ints are accepted where floats are; ``bool`` is never an int),
then calls :meth:`Options.validate` for cross-field rules.  :meth:`Options.from_dict` is the
strict entry point for user input: unknown keys are errors naming the nearest valid one.
:meth:`Options.specs` documents every field (``ctc passes``, ``ctc targets``, docs pages).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NoOptions", "OptionError", "OptionSpec", "Options", "coerce", "option"]


class OptionError(ValueError):
    """An option value of the wrong type, out of range, not among the choices, or unknown."""


def option(default: Any, doc: str, *, min: float | None = None, max: float | None = None,
           choices: Sequence[Any] | None = None) -> Any:
    """Declare a pass option: its default, a one-line doc, and optional bounds/choices."""
    meta = {"doc": doc, "min": min, "max": max, "choices": tuple(choices) if choices is not None else None}
    if isinstance(default, list):
        return field(default_factory=lambda d=tuple(default): list(d), metadata=meta)
    return field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp)


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` and normalise it; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except OptionError as e:
                errors.append(str(e))
        raise OptionError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise OptionError(f"{where}: expected a list, got {value!r}")
        elem = args[0] if args else Any
        return [coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(f"{where}: expected an int, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise OptionError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise OptionError(f"{where}: expected a string, got {value!r}")
        return value
    raise OptionError(f"{where}: unsupported option type {tp}")


@dataclass(frozen=True)
class OptionSpec:
    """Everything documented about one option (for `ctc passes` and the docs page)."""

    name: str
    type: str
    default: Any
    doc: str
    min: float | None
    max: float | None
    choices: tuple[Any, ...] | None


@dataclass(frozen=True)
class Options:
    """Base of every options class (passes, targets); subclasses add fields declared with :func:`option`."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            where = f"option {f.name}"
            val = coerce(getattr(self, f.name), hints[f.name], where)
            object.__setattr__(self, f.name, val)
            lo, hi, ch = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("choices")
            items = val if isinstance(val, list) else [val]
            for x in items:
                if isinstance(x, float) and not math.isfinite(x):
                    raise OptionError(f"{where}={val!r} is not a finite number")
                if x is None or isinstance(x, (str, bool)):
                    pass
                elif lo is not None and x < lo:
                    raise OptionError(f"{where}={val!r} is below its minimum {lo}")
                elif hi is not None and x > hi:
                    raise OptionError(f"{where}={val!r} is above its maximum {hi}")
                if ch is not None and x not in ch:
                    raise OptionError(f"{where}={x!r} must be one of {list(ch)}")
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; raise :class:`OptionError` naming the option."""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, owner: str = "") -> Options:
        """Strict construction: unknown keys are errors with the nearest valid name.

        ``owner`` says whose options these are in messages (``"pass cse"``, ``"target cpu"``).
        """
        known = [f.name for f in dataclasses.fields(cls)]
        for k in values:
            if k not in known:
                near = difflib.get_close_matches(k, known, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                opts = ", ".join(known) or "none"
                raise OptionError(f"{owner or cls.__name__} has no option {k!r}{hint} (options: {opts})")
        return cls(**dict(values))

    @classmethod
    def specs(cls) -> list[OptionSpec]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
            out.append(OptionSpec(f.name, _type_name(hints[f.name]), default, f.metadata.get("doc", ""),
                                  f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("choices")))
        return out


@dataclass(frozen=True)
class NoOptions(Options):
    """No options at all."""
