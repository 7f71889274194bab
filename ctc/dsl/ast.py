"""The recipe AST: plain dataclasses, every node carrying the source span it came from.

Spans and other location bookkeeping are excluded from equality, so two recipes compare
equal when they say the same thing (``parse(print(r)) == r``).  Nothing here is ever
evaluated as Python: option values are ints, floats, strings, bools, None or lists of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # parsing stays torch-free; the selector is built on demand
    from ctc.passes.base import Selector

OptionValue = Any  # int | float | str | bool | None | list[OptionValue]


@dataclass(frozen=True)
class Span:
    """Where a node is in its recipe file: 1-based line/col of its first and one past its last character."""

    file: str = "<recipe>"
    line: int = 0
    col: int = 0
    end_line: int = 0
    end_col: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


NO_SPAN = Span()


def _span() -> Any:
    return field(default=NO_SPAN, compare=False, repr=False)


def _spans() -> Any:
    return field(default_factory=dict, compare=False, repr=False)


@dataclass
class ModelSource:
    """``model KIND "ref" [key=value ...]``: a bundled model name, a Hugging Face directory or a .pt2 file."""

    kind: str
    ref: str
    options: dict[str, OptionValue] = field(default_factory=dict)
    span: Span = _span()
    kind_span: Span = _span()
    ref_span: Span = _span()
    option_spans: dict[str, Span] = _spans()


@dataclass
class Dataset:
    """``calibrate|evaluate SOURCE ["path"] [key=value ...]``: real text for calibration or evaluation."""

    role: str  # "calibrate" | "evaluate"
    source: str  # wiki | lee | text | jsonl
    path: str | None = None
    options: dict[str, OptionValue] = field(default_factory=dict)
    span: Span = _span()
    source_span: Span = _span()
    path_span: Span = _span()
    option_spans: dict[str, Span] = _spans()


@dataclass
class SelectorItem:
    """One restriction of a step: ``blocks[lo:hi]`` (half-open), a scope glob ``"*.mlp.*"`` or ``op NAME``."""

    kind: str  # "blocks" | "scope" | "op"
    value: Any  # (lo, hi) for blocks, str otherwise
    span: Span = _span()


@dataclass
class RecipeStep:
    """One pipeline step as written in a recipe: a pass name, its keyword options and selectors, with spans.

    (The pass manager's runnable step, a configured pass and a selector, is
    :class:`ctc.passes.manager.Step`; the recipe compiler builds one from each of these.)"""

    name: str
    options: dict[str, OptionValue] = field(default_factory=dict)
    selectors: list[SelectorItem] = field(default_factory=list)
    span: Span = _span()
    name_span: Span = _span()
    option_spans: dict[str, Span] = _spans()

    def selector(self) -> Selector:
        """The pass-manager selector: items of one kind are alternatives, different kinds must all hold."""
        from ctc.passes.base import Selector

        return Selector(
            blocks=tuple(tuple(s.value) for s in self.selectors if s.kind == "blocks"),  # type: ignore[misc]
            scopes=tuple(s.value for s in self.selectors if s.kind == "scope"),
            ops=tuple(s.value for s in self.selectors if s.kind == "op"),
        )


@dataclass
class Target:
    """``target KIND [key=value ...] [trials=N]``: a backend target, its options and tuning budget."""

    kind: str
    options: dict[str, OptionValue] = field(default_factory=dict)
    trials: int | None = None
    span: Span = _span()
    kind_span: Span = _span()
    option_spans: dict[str, Span] = _spans()


@dataclass
class Check:
    """``check METRIC OP VALUE[UNIT]``: an accuracy/size/speed bound; unit ``x`` is relative to the original."""

    metric: str
    op: str  # <= >= < > ==
    value: float | int
    unit: str | None = None  # None | "x" | "%"
    span: Span = _span()
    metric_span: Span = _span()
    value_span: Span = _span()

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {_num(self.value)}{self.unit or ''}"


def _num(v: float | int) -> str:
    return repr(v)


@dataclass
class Emit:
    """``emit "dir"``: where the artifact directory goes."""

    path: str
    span: Span = _span()


@dataclass
class EmitFormat:
    """``emit FORMAT [key=value ...]``: also write the model in a format other tools load (``ctc/exports``)."""

    format: str
    options: dict[str, OptionValue] = field(default_factory=dict)
    span: Span = _span()
    format_span: Span = _span()
    option_spans: dict[str, Span] = _spans()


@dataclass
class Recipe:
    """A whole recipe file."""

    model: ModelSource | None = None
    calibrate: Dataset | None = None
    evaluate: Dataset | None = None
    pipeline: list[RecipeStep] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    emit: Emit | None = None
    exports: list[EmitFormat] = field(default_factory=list)
    file: str = field(default="<recipe>", compare=False)
    source: str = field(default="", compare=False, repr=False)
    # the directory relative paths in the recipe start from (None: the recipe file's; a recipe read
    # from a pipe or terminal uses the working directory)
    base_dir: str | None = field(default=None, compare=False)
    pipeline_span: Span = _span()
