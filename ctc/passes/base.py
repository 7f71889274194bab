"""The pass contract: registered passes with typed, validated options; analyses; selectors.

A pass is a class with a registered ``name`` (the name recipes use), an ``Options``
frozen dataclass whose fields are its documented options, the analyses it
``requires`` and those it ``preserves``, and ``run(module, ctx) -> module``.
Passes keep no state between runs and never mutate parameter tensors in place
(they register new ones), so a cloned module stays a valid reference.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ctc.ir.graph import Module, Node
from ctc.ir.rewrite import RewriteLog, RewritePattern, Rewriter, apply_once, apply_patterns
from ctc.options import OptionError, Options, option  # noqa: F401 - option: re-exported for pass modules

_LABEL_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class PassError(Exception):
    """A pass could not run: bad options, missing analysis data, unsupported IR."""


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class PassOptions(Options):
    """Base of every pass's options (see :mod:`ctc.options`); fields are declared with :func:`option`."""


@dataclass(frozen=True)
class NoOptions(PassOptions):
    """A pass without options."""


# --------------------------------------------------------------------------- selectors
@dataclass(frozen=True)
class Selector:
    """Restricts a pipeline step to parts of the model.

    ``blocks`` holds half-open ranges of block indices, ``scopes`` glob patterns on node
    scopes (``*.mlp.*``), ``ops`` op names.  Each given criterion must match; an empty
    selector matches everything.
    """

    blocks: tuple[tuple[int, int], ...] = ()
    scopes: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Tuples whatever the caller built it with (a lone string is one pattern, a lone ``(lo, hi)`` one range);
        a malformed field is a :class:`PassError` naming it (a string read as characters matched every scope)."""
        def ints(r: Any) -> bool:
            return all(isinstance(x, int) and not isinstance(x, bool) for x in r)

        blocks = self.blocks
        if isinstance(blocks, (tuple, list)) and len(blocks) == 2 and ints(blocks):
            blocks = (blocks,)
        if not isinstance(blocks, (tuple, list)) or not all(
                isinstance(r, (tuple, list)) and len(r) == 2 and ints(r) and 0 <= r[0] < r[1] for r in blocks):
            raise PassError(f"Selector blocks={self.blocks!r}: give half-open block ranges, ((lo, hi), ...) with "
                            "0 <= lo < hi")
        object.__setattr__(self, "blocks", tuple((int(lo), int(hi)) for lo, hi in blocks))
        for name in ("scopes", "ops"):
            value = getattr(self, name)
            items = (value,) if isinstance(value, str) else value
            if not isinstance(items, (tuple, list)) or not all(isinstance(x, str) and x for x in items):
                raise PassError(f"Selector {name}={value!r}: give a string or a tuple of strings")
            object.__setattr__(self, name, tuple(items))
        from ctc.ir.ops.registry import all_ops

        known = all_ops()
        for op in self.ops:
            if op not in known:  # a typo would otherwise be "matches no node" with nothing pointing at it
                near = difflib.get_close_matches(op, list(known), n=1, cutoff=0.6)
                raise PassError(f"Selector ops: {op!r} is not an op" + (f"; did you mean {near[0]!r}?" if near else
                                                                        " (ctc.ir.ops.registry.all_ops() lists them)"))

    @property
    def is_all(self) -> bool:
        return not (self.blocks or self.scopes or self.ops)

    def matches_block(self, block: int | None) -> bool:
        if not self.blocks:
            return True
        return block is not None and any(lo <= block < hi for lo, hi in self.blocks)

    def matches_scope(self, scope: str) -> bool:
        return not self.scopes or any(fnmatch.fnmatchcase(scope, p) for p in self.scopes)

    def matches(self, node: Node) -> bool:
        return (self.matches_block(node.block) and self.matches_scope(node.scope)
                and (not self.ops or node.op in self.ops))

    def describe(self) -> str:
        parts = [f"blocks[{lo}:{hi}]" for lo, hi in self.blocks]
        parts += [repr(s) for s in self.scopes]
        parts += [f"op {o}" for o in self.ops]
        return " & ".join(parts) or "all"


# --------------------------------------------------------------------------- analyses
class Analysis:
    """A cached fact about a module.  Subclasses set ``name`` and implement ``compute``.

    ``config`` holds the keyword arguments an analysis was asked with; results are cached
    per (analysis, config) by the :class:`PassContext` until a pass that does not
    preserve them runs.
    """

    name: ClassVar[str] = ""
    # True when computing it runs the calibration batches (a pass requiring it then needs them).
    needs_calibration: ClassVar[bool] = False

    def __init__(self, **config: Any):
        self.config = config

    def compute(self, module: Module, ctx: PassContext) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.compute")

    def key(self) -> tuple[Any, ...]:
        return (type(self).__name__, tuple(sorted((k, _freeze(v)) for k, v in self.config.items())))


def _freeze(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


# --------------------------------------------------------------------------- context
@dataclass
class PassContext:
    """What a running pass may use besides the module.

    ``calibration`` is a list of model-input batches (dicts keyed by module input name);
    ``selector`` restricts the current step; ``notes`` collects human-readable lines for
    the report (what changed, what was left alone and why); ``progress`` reports
    sub-progress of long passes.
    """

    calibration: list[dict[str, torch.Tensor]] = field(default_factory=list)
    selector: Selector = field(default_factory=Selector)
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[str, int, int], None] | None = None
    # Names of the analyses computed (cache misses) since the pass manager last reset it.
    computed: list[str] = field(default_factory=list)
    # Rewriters handed out by rewriter() during the current pass (the manager finishes them).
    rewriters: list[Rewriter] = field(default_factory=list)
    # Further results of the current step (label, module), see emit_variant.
    variants: list[tuple[str, Module]] = field(default_factory=list)
    # Results per module object, held weakly: a module that is freed takes its results with
    # it, and an ``id()`` reused by a new module can never serve stale results.
    _cache: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)

    def selected(self, node: Node) -> bool:
        return self.selector.matches(node)

    def note(self, line: str) -> None:
        self.notes.append(line)

    def rewriter(self, module: Module, *, prune_params: bool = True) -> Rewriter:
        """The :class:`~ctc.ir.rewrite.Rewriter` a pass changes ``module`` through.

        It carries the step's selector and writes its notes to the report; the pass manager
        finishes it after the pass (cleanup) and records its log in the step's record.
        """
        rw = Rewriter(module, selector=self.selected, prune_params=prune_params, notes=self.notes)
        self.rewriters.append(rw)
        return rw

    def emit_variant(self, label: str, module: Module) -> None:
        """Hand the pass manager another result of the current step, besides the module ``run`` returns.

        For passes that make several models from one calibration (one per target depth): the
        rest of the pipeline runs on each variant too, the report gets one sub-report per
        ``label`` (``PipelineReport.variants``), and ``ctc compile`` writes one artifact per
        variant next to the main one (``<out>-<label>``).  Labels are short names of letters,
        digits, ``.``, ``_`` and ``-``, unique within the step.
        """
        if not _LABEL_OK.fullmatch(label):
            raise PassError(f"variant label {label!r} must be letters, digits, '.', '_' or '-' (it names a directory)")
        if any(lab == label for lab, _ in self.variants):
            raise PassError(f"variant label {label!r} emitted twice")
        self.variants.append((label, module))

    def rewrite_log(self) -> RewriteLog:
        """The merged logs of every rewriter handed out during the current pass."""
        log = RewriteLog()
        for rw in self.rewriters:
            log.merge(rw.log)
        return log

    def get(self, analysis: Analysis, module: Module) -> Any:
        """Result of ``analysis`` on ``module``, computed once and cached.

        Results are cached per module object, so asking about a trial clone does not evict
        the results of the module being compiled.  Within a pass, results describe the
        module as it was when first asked: a pass that rewrites the module and asks again
        must call :meth:`invalidate` itself.  Between passes the pass manager invalidates.
        """
        per = self._cache.setdefault(module, {})
        k = analysis.key()
        if k not in per:
            per[k] = analysis.compute(module, self)
            self.computed.append(analysis.name or type(analysis).__name__)
        return per[k]

    def cached(self, analysis: Analysis, module: Module) -> bool:
        """Whether ``analysis`` on ``module`` is in the cache (no computation)."""
        return analysis.key() in self._cache.get(module, {})

    def invalidate(self, keep: Sequence[type[Analysis]] = (), *, source: Module | None = None,
                   module: Module | None = None) -> None:
        """Drop cached analyses, of every module, except those of the given types.

        A pass may return a new module object that it declares equivalent to the one it was
        given for the analyses it preserves: pass that one as ``source`` and the result as
        ``module``, and the kept results of ``source`` move to ``module``.
        """
        names = {c.__name__ for c in keep}
        for m in list(self._cache.keys()):
            per = self._cache[m]
            for k in [k for k in per if k[0] not in names]:
                del per[k]
        if source is not None and module is not None and source is not module and source in self._cache:
            kept = self._cache.pop(source)
            self._cache.setdefault(module, {}).update(kept)

    def report_progress(self, what: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(what, done, total)


# --------------------------------------------------------------------------- passes
class Pass:
    """Base class of every pass.  Subclasses set ``name`` and ``Options`` and implement ``run``.

    The class docstring's first line is the pass's summary in `ctc passes` and the docs.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = NoOptions
    requires: ClassVar[tuple[type[Analysis], ...]] = ()
    preserves: ClassVar[tuple[type[Analysis], ...]] = ()
    needs_calibration: ClassVar[bool] = False

    def __init__(self, options: PassOptions | Mapping[str, Any] | None = None):
        try:
            if options is None:
                options = self.Options()
            elif isinstance(options, Mapping):
                options = self.Options.from_dict(options, owner=f"pass {self.name}")
        except OptionError as e:
            raise PassError(str(e)) from None
        if not isinstance(options, self.Options):
            raise PassError(f"pass {self.name}: options must be {self.Options.__name__}, got {type(options).__name__}")
        self.options = options

    def run(self, module: Module, ctx: PassContext) -> Module:
        raise NotImplementedError(f"pass {self.name} does not implement run()")

    @classmethod
    def check_module(cls, options: PassOptions, module: Module, selector: Selector) -> list[tuple[str | None, str]]:
        """Problems these options have on this module, found right after capture (before heavy work).

        Returns ``(where, message)`` pairs; ``where`` names the option at fault, or is
        ``"selector"`` or None (the step).  The recipe checker reports each one at that place
        in the recipe; a pass's ``run`` should still raise :class:`PassError` for the same cases.
        """
        return []

    @classmethod
    def uses_calibration(cls) -> bool:
        """Whether the pass needs calibration data, itself or through an analysis it requires."""
        return cls.needs_calibration or any(a.needs_calibration for a in cls.requires)

    def calibration_needed(self) -> bool:
        """Whether this pass, with its options, needs calibration data (default: :meth:`uses_calibration`;
        a pass whose options can make calibration unnecessary overrides it)."""
        return self.uses_calibration()

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


class PatternPass(Pass):
    """A pass that is a set of rewrite patterns, applied greedily to a fixpoint on selected roots.

    Subclasses list ``patterns`` (or override :meth:`rewrite_patterns` when options choose
    them); ``greedy = False`` applies them in one sweep instead (no revisits).  The report
    gets one note with what fired and the op-count change.
    """

    patterns: ClassVar[Sequence[RewritePattern]] = ()
    greedy: ClassVar[bool] = True

    def rewrite_patterns(self) -> Sequence[RewritePattern]:
        return self.patterns

    def run(self, module: Module, ctx: PassContext) -> Module:
        rw = ctx.rewriter(module)
        pats = self.rewrite_patterns()
        log = apply_patterns(rw, pats) if self.greedy else apply_once(rw, pats)
        rw.cleanup()
        if log.fired:
            ctx.note(log.summary())
        ctx.metrics["rewrites"] = sum(log.fired.values())
        return module


_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _PASSES and _PASSES[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} registered twice")
    _PASSES[cls.name] = cls
    return cls


def _load_all() -> None:
    import ctc.passes.library  # noqa: F401 - registers every pass


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as ``name``; unknown names suggest the nearest one."""
    _load_all()
    try:
        return _PASSES[name]
    except KeyError:
        near = difflib.get_close_matches(name, list(_PASSES), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise PassError(f"unknown pass {name!r}{hint} (see `ctc passes`)") from None


def all_passes() -> dict[str, type[Pass]]:
    _load_all()
    return dict(sorted(_PASSES.items()))
