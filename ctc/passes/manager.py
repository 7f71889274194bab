"""The one pass manager: runs a pipeline of (pass, selector) steps over a module and reports.

For every step it runs the pass with a shared :class:`~ctc.passes.base.PassContext`
(analyses cached there and invalidated after the pass unless it declares them in
``preserves``), verifies the IR, and records a :class:`PassRecord`: time, parameter
count and bytes, op counts and their diff, the pass's notes and metrics, and output
fidelity against the unmodified input module on a fidelity batch, computed with the
reference interpreter.  A pass that raises, or leaves IR the verifier rejects, stops the
pipeline with a :class:`PipelineError` naming the pass, its position (and recipe span)
and the passes that ran before it, in the manner of torch.fx's pass manager.

Instruments (as in TVM's ``PassInstrument``) observe the pipeline without changing it:
:class:`DumpIR` writes the IR text after every pass, for debugging rewrites.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from ctc.ir.graph import Module
from ctc.ir.interpreter import interpret
from ctc.passes.base import Pass, PassContext, PassError, Selector

__all__ = ["DumpIR", "Fidelity", "PassInstrument", "PassManager", "PassRecord", "PipelineError",
           "PipelineReport", "Step", "fidelity"]

Batch = Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]


# --------------------------------------------------------------------------- steps
@dataclass
class Step:
    """One pipeline step: a configured pass instance restricted by a selector.

    ``span`` is where the step was written (a :class:`ctc.dsl.ast.Span`, filled by the
    recipe compiler); errors about the step quote it.
    """

    pass_: Pass
    selector: Selector = field(default_factory=Selector)
    span: Any = None

    def __post_init__(self) -> None:
        _check_pass_instance(self.pass_, "Step")
        if not isinstance(self.selector, Selector):
            raise PassError(f"Step: selector must be a Selector, got {type(self.selector).__name__}")

    @property
    def name(self) -> str:
        return self.pass_.name

    def where(self) -> str:
        """``name`` plus its recipe location when known (for error messages)."""
        return f"{self.name!r}" + (f" (at {self.span})" if self.span is not None else "")


def _check_pass_instance(p: Any, what: str) -> None:
    """Raise PassError unless ``p`` is a configured pass instance (a pass class is the common slip)."""
    if isinstance(p, type) and issubclass(p, Pass):
        raise PassError(f"{what}: got the pass class {p.__name__} ({p.name!r}), not a configured pass: call it, "
                        f"e.g. get_pass({p.name!r})() or get_pass({p.name!r})({{...options}})")
    if not isinstance(p, Pass):
        raise PassError(f"{what}: expected a configured pass (get_pass(NAME)(options)), got {type(p).__name__}")


def _as_step(s: Step | Pass | tuple[Any, ...], i: int) -> Step:
    if isinstance(s, type) and issubclass(s, Pass):
        _check_pass_instance(s, f"pipeline step {i}")
    if isinstance(s, Step):
        return s
    if isinstance(s, Pass):
        return Step(s)
    if isinstance(s, tuple) and 1 <= len(s) <= 3 and isinstance(s[0], Pass):
        sel = s[1] if len(s) > 1 and s[1] is not None else Selector()
        if not isinstance(sel, Selector):
            raise PassError(f"pipeline step {i}: selector must be a Selector, got {type(sel).__name__}")
        return Step(s[0], sel, s[2] if len(s) > 2 else None)
    raise PassError(f"pipeline step {i}: expected a Step, a Pass instance or (pass, selector), got {s!r} "
                    "(build passes with get_pass(name)(options))")


# --------------------------------------------------------------------------- fidelity
def _num(x: float | None) -> float | None:
    """A finite float, or None (JSON has no NaN/inf)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class Fidelity:
    """Output agreement with the reference: cosine similarity, max abs error, relative L2 error.

    For several outputs the module-level numbers are the worst over outputs (lowest cosine,
    highest errors); ``outputs`` holds each output's own numbers; ``error`` says why outputs
    could not be compared (changed count or shape).
    """

    cosine: float | None
    max_abs_error: float | None
    rel_error: float | None
    outputs: list[dict[str, float | None]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fidelity:
        return cls(**dict(d))


class _Agree:
    """Streaming accumulators for one output pair (float64)."""

    def __init__(self) -> None:
        self.dot = self.na = self.nb = self.nd = 0.0
        self.max_abs = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a64, b64 = a.detach().double().flatten(), b.detach().double().flatten()
        d = a64 - b64
        self.dot += float(a64 @ b64)
        self.na += float(a64 @ a64)
        self.nb += float(b64 @ b64)
        self.nd += float(d @ d)
        if d.numel():
            m = float(d.abs().max())  # NaN if any element is NaN
            if math.isnan(m) or m > self.max_abs:
                self.max_abs = m

    def result(self) -> dict[str, float | None]:
        if self.na == 0.0 and self.nb == 0.0:
            cos: float | None = 1.0
        elif self.na == 0.0 or self.nb == 0.0:
            cos = 0.0
        else:
            cos = self.dot / math.sqrt(self.na * self.nb)
        rel = math.sqrt(self.nd / self.na) if self.na > 0 else (0.0 if self.nd == 0 else None)
        return {"cosine": _num(cos), "max_abs_error": _num(self.max_abs), "rel_error": _num(rel)}


def _step_batches(module: Module, batches: Sequence[Any]) -> list[Any]:
    """The pipeline's batches as ``module`` takes them: a decode step's float caches in the form the step
    stores them once ``kv-cache-quant`` ran (:func:`ctc.frontends.decode.step_inputs`); others as given."""
    from ctc.frontends.decode import step_inputs

    return [step_inputs(module, b) for b in batches]


def _run_batches(module: Module, batches: Sequence[Mapping[str, Any]]) -> list[list[torch.Tensor]]:
    """``module``'s outputs on each batch (reference interpreter), comparable with the input module's (a
    quantized cache read back as floats: :func:`ctc.frontends.decode.step_float_outputs`)."""
    from ctc.frontends.decode import step_float_outputs

    return [step_float_outputs(module, interpret(module, b)) for b in _step_batches(module, batches)]


def fidelity(reference: Sequence[Sequence[torch.Tensor]], outputs: Sequence[Sequence[torch.Tensor]]) -> Fidelity:
    """Compare per-batch output lists of a module against the reference's.

    Non-finite results (NaN/inf in an output) are reported as ``None``.
    """
    if len(reference) != len(outputs):
        return Fidelity(None, None, None, error=f"{len(outputs)} batches vs {len(reference)} reference batches")
    if not reference:
        return Fidelity(None, None, None, error="no batches")
    n_out = len(reference[0])
    acc = [_Agree() for _ in range(n_out)]
    for b, (ref, got) in enumerate(zip(reference, outputs, strict=True)):
        if len(got) != len(ref):
            return Fidelity(None, None, None, error=f"module has {len(got)} outputs, reference has {len(ref)}")
        for k, (r, g) in enumerate(zip(ref, got, strict=True)):
            if tuple(r.shape) != tuple(g.shape):
                return Fidelity(None, None, None, error=f"output {k} has shape {tuple(g.shape)} on batch {b}, "
                                                        f"reference {tuple(r.shape)}")
            acc[k].add(r, g)
    per = [a.result() for a in acc]

    def worst(key: str, pick: Any) -> float | None:
        vals = [p[key] for p in per]
        return None if any(v is None for v in vals) else pick(vals)

    return Fidelity(worst("cosine", min), worst("max_abs_error", max), worst("rel_error", max), per)


# --------------------------------------------------------------------------- records
def _jsonable(x: Any) -> Any:
    """Metrics and options as JSON values: tensors become lists (or scalars), NaN/inf None."""
    if isinstance(x, torch.Tensor):
        return _jsonable(x.detach().cpu().tolist()) if x.numel() <= 4096 else f"<tensor {list(x.shape)}>"
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return _num(x)
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return _jsonable(x.item())
    return repr(x)


def _diff(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    keys = sorted(set(before) | set(after))
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys if after.get(k, 0) != before.get(k, 0)}


@dataclass
class PassRecord:
    """What one pipeline step did (one row of the report)."""

    index: int
    name: str
    options: dict[str, Any]
    selector: str
    span: str | None
    status: str  # "ok" | "failed"
    seconds: float
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    ops_diff: dict[str, int]
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    analyses_computed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fidelity: Fidelity | None = None
    error: str | None = None
    # What the pass's rewriters did (RewriteLog.to_dict): ops created/erased, patterns fired, params.
    rewrites: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["fidelity"] = self.fidelity.to_dict() if self.fidelity is not None else None
        d["options"] = _jsonable(self.options)
        d["metrics"] = _jsonable(self.metrics)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PassRecord:
        d = dict(d)
        fid = d.pop("fidelity", None)
        return cls(**d, fidelity=Fidelity.from_dict(fid) if fid is not None else None)


@dataclass
class PipelineReport:
    """Everything a pipeline run did: one :class:`PassRecord` per step, plus totals."""

    module: str
    records: list[PassRecord] = field(default_factory=list)
    seconds: float = 0.0
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    fidelity: Fidelity | None = None
    # Reports of the variants a step emitted (PassContext.emit_variant), by label: the records up
    # to and including that step describe the variant, then the rest of the pipeline run on it.
    variants: dict[str, PipelineReport] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``json.dumps`` works on it; :meth:`from_dict` inverts it)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["records"] = [r.to_dict() for r in self.records]
        d["fidelity"] = self.fidelity.to_dict() if self.fidelity is not None else None
        d["variants"] = {k: v.to_dict() for k, v in self.variants.items()}
        return d

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kw)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PipelineReport:
        d = dict(d)
        recs = [PassRecord.from_dict(r) for r in d.pop("records", [])]
        fid = d.pop("fidelity", None)
        variants = {k: cls.from_dict(v) for k, v in d.pop("variants", {}).items()}
        return cls(**d, records=recs, fidelity=Fidelity.from_dict(fid) if fid is not None else None,
                   variants=variants)

    def table(self) -> str:
        """A fixed-width text table: one row per pass, then the totals."""
        head = ["#", "pass", "selector", "time", "params", "bytes", "ops", "cosine", "max err"]
        rows = []

        def fmt_f(f: Fidelity | None, key: str, spec: str) -> str:
            if f is None:
                return "-"
            v = getattr(f, key)
            return "n/a" if v is None else format(v, spec)

        def ops_str(diff: Mapping[str, int]) -> str:
            return " ".join(f"{k}{v:+d}" for k, v in diff.items()) or "="

        for r in self.records:
            rows.append([str(r.index + 1), r.name + ("" if r.status == "ok" else " FAILED"), r.selector,
                         f"{r.seconds:.2f}s", f"{_human(r.params_before)}->{_human(r.params_after)}",
                         f"{_human(r.bytes_before, 'B')}->{_human(r.bytes_after, 'B')}", ops_str(r.ops_diff),
                         fmt_f(r.fidelity, "cosine", ".6f"), fmt_f(r.fidelity, "max_abs_error", ".3g")])
        rows.append(["", "total", "", f"{self.seconds:.2f}s",
                     f"{_human(self.params_before)}->{_human(self.params_after)}",
                     f"{_human(self.bytes_before, 'B')}->{_human(self.bytes_after, 'B')}",
                     ops_str(_diff(self.ops_before, self.ops_after)),
                     fmt_f(self.fidelity, "cosine", ".6f"), fmt_f(self.fidelity, "max_abs_error", ".3g")])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
        for r in self.records:
            for n in r.notes:
                out.append(f"  [{r.index + 1} {r.name}] {n}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _human(n: int, unit: str = "") -> str:
    for suffix, k in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)) if unit == "B" else (
            ("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= k:
            return f"{n / k:.2f}{suffix}{unit}"
    return f"{n}{unit}"


class PipelineError(PassError):
    """A step failed or broke the IR.  ``report`` holds the records up to and including it."""

    def __init__(self, message: str, *, step: Step | None, index: int, ran_before: list[str],
                 report: PipelineReport, cause: BaseException | None = None):
        super().__init__(message)
        self.step = step
        self.index = index
        self.ran_before = ran_before
        self.report = report
        self.cause = cause


# --------------------------------------------------------------------------- instruments
class PassInstrument:
    """Observer of a pipeline (TVM-style): override the hooks you need.  Must not modify the module."""

    def enter_pipeline(self, module: Module) -> None:
        """Before the first step, with the (verified) input module."""

    def run_before_pass(self, module: Module, step: Step, index: int) -> None:
        """Just before step ``index`` runs."""

    def run_after_pass(self, module: Module, step: Step, index: int, record: PassRecord) -> None:
        """After step ``index`` ran and its result verified and measured."""

    def run_on_failure(self, module: Module | None, step: Step, index: int, error: BaseException) -> None:
        """Step ``index`` raised or produced invalid IR (``module`` is that IR, None if it raised)."""

    def exit_pipeline(self, module: Module, report: PipelineReport) -> None:
        """After the last step."""


class DumpIR(PassInstrument):
    """Writes the IR text of the input and after every pass to ``directory``.

    Files are ``00-input.ir``, ``01-<pass>.ir``, ... and ``NN-<pass>.failed.ir`` for a
    step whose output the verifier rejected (when it can still be printed).
    """

    def __init__(self, directory: str | Path, *, show_defaults: bool = False):
        self.directory = Path(directory)
        self.show_defaults = show_defaults
        self.written: list[Path] = []

    def _write(self, module: Module, stem: str) -> None:
        from ctc.ir.text import print_module

        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{stem}.ir"
        path.write_text(print_module(module, show_defaults=self.show_defaults))
        self.written.append(path)

    def enter_pipeline(self, module: Module) -> None:
        self._write(module, "00-input")

    def run_after_pass(self, module: Module, step: Step, index: int, record: PassRecord) -> None:
        self._write(module, f"{index + 1:02d}-{step.name}")

    def run_on_failure(self, module: Module | None, step: Step, index: int, error: BaseException) -> None:
        if module is None:
            return
        try:
            self._write(module, f"{index + 1:02d}-{step.name}.failed")
        except Exception as e:  # noqa: BLE001 - broken IR may not print; the pipeline error says what broke
            (self.directory / f"{index + 1:02d}-{step.name}.failed.txt").write_text(f"could not print: {e}\n")


# --------------------------------------------------------------------------- progress
class _Progress:
    """A tqdm bar over steps on stderr (only on a TTY); passes add sub-progress as a postfix."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="pass", file=sys.stderr, dynamic_ncols=True, leave=False)

    def start(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_description(name)
            self.bar.set_postfix_str("")

    def sub(self, what: str, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{what} {done}/{total}", refresh=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- manager
def _verify(module: Module) -> list[str]:
    from ctc.ir.verify import verify

    return verify(module)


def _fingerprint(module: Module) -> tuple[Any, ...]:
    """Everything a rewrite can change, by identity: equal fingerprints mean an unchanged module.

    Nodes, operands and results by object identity, attributes by value, result types,
    locations, outputs, and parameters by name, tensor identity and version counter.
    O(nodes); far cheaper than re-running an analysis.
    """
    nodes = tuple((id(n), n.op, tuple(map(id, n.inputs)), tuple((id(v), v.type) for v in n.outputs),
                   repr(n.attrs), n.scope, n.block) for n in module.nodes)
    params = tuple((k, id(t), t._version) for k, t in module.params.items())
    return (nodes, params, tuple(map(id, module.inputs)), tuple(map(id, module.outputs)),
            tuple(module.output_names), repr(module.meta))


def _normalise_batches(batch: Any, what: str) -> list[Batch]:
    if batch is None:
        return []
    if isinstance(batch, Mapping) or (isinstance(batch, (list, tuple)) and batch
                                      and all(isinstance(t, torch.Tensor) for t in batch)):
        return [batch]
    if isinstance(batch, (list, tuple)) and all(isinstance(b, (Mapping, list, tuple)) for b in batch):
        return list(batch)
    raise PassError(f"{what}: expected a batch (dict of input name -> tensor, or a list of tensors) "
                    f"or a list of batches, got {type(batch).__name__}")


def _calibration_batches(calibration: Any) -> list[Batch]:
    """``calibration`` as a list of ``{input name: tensor}`` batches; anything else is a PassError saying what to
    give (one dict, or a list of bare tensors, failed in ``dict()`` with 'dictionary update sequence element #0
    has length 4; 2 is required')."""
    if calibration is None:
        return []
    shape = "a list of batches, each a dict of input name -> tensor: calibration=[{'x': x0}, {'x': x1}]"
    if isinstance(calibration, (Mapping, torch.Tensor, str, bytes)) or not isinstance(calibration, Iterable):
        raise PassError(f"calibration: expected {shape}; got {type(calibration).__name__}"
                        + (" (one batch: wrap it in a list)" if isinstance(calibration, Mapping) else ""))
    calibration = list(calibration)  # a generator or other iterable of batches, read once
    for i, b in enumerate(calibration):
        if not isinstance(b, Mapping) or not all(isinstance(k, str) for k in b):
            raise PassError(f"calibration[{i}]: expected a dict of input name -> tensor ({shape}); got "
                            f"{type(b).__name__}")
    return [dict(b) for b in calibration]


class PassManager:
    """Runs a pipeline of steps over a module, verifying, measuring and reporting each.

    ``steps``: :class:`Step` objects (or ``Pass`` instances, or ``(pass, selector)`` tuples).
    ``calibration``: model-input batches handed to passes and analyses (``ctx.calibration``).
    ``fidelity_batch``: batch(es) on which outputs are compared with the unmodified module
    after every step; defaults to the first calibration batch; no fidelity without either
    (or with ``fidelity=False``).  ``verify``: run the IR verifier on the input and after every
    step.  ``progress``: a tqdm bar on stderr when it is a TTY.  ``instruments``: hooks
    called around every step.  ``strict_selectors``: a non-empty selector that matches no
    node is an error (a recipe typo), not a silent no-op.

    The input module is never modified: the pipeline runs on a clone.  Parameter tensors
    are shared with it, so a pass that writes a parameter in place is reported as an error.
    """

    def __init__(self, steps: Sequence[Step | Pass | tuple[Any, ...]], *,
                 calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
                 fidelity_batch: Any = None, fidelity: bool = True, verify: bool = True,
                 progress: bool = True, instruments: Sequence[PassInstrument] = (), seed: int = 0,
                 strict_selectors: bool = True):
        self.steps = [_as_step(s, i) for i, s in enumerate(steps)]
        self.calibration = _calibration_batches(calibration)
        fb = _normalise_batches(fidelity_batch, "fidelity_batch")
        if not fb and self.calibration:
            fb = [self.calibration[0]]
        self.fidelity_batches: list[Batch] = fb if fidelity else []
        self.verify = verify
        self.progress = progress
        self.instruments = list(instruments)
        self.seed = seed
        self.strict_selectors = strict_selectors

    def run(self, module: Module) -> tuple[Module, PipelineReport]:
        """Run every step; returns the transformed module and the report.

        Raises :class:`PipelineError` when the input fails verification, a pass raises, a
        pass's output fails verification, or a pass writes a parameter in place.  Variants a
        step emitted are run to the end too and reported in ``report.variants``; use
        :meth:`run_all` to get their modules.
        """
        results = self.run_all(module)
        return results[0][1], results[0][2]

    def run_all(self, module: Module) -> list[tuple[str, Module, PipelineReport]]:
        """Like :meth:`run`, and every variant a step emitted (:meth:`PassContext.emit_variant`)
        with the rest of the pipeline run on it: ``[("", main module, report), (label, module,
        variant report), ...]``.  One step of a pipeline may emit variants."""
        if not isinstance(module, Module):
            raise PassError(f"PassManager.run takes a ctc IR Module, got {type(module).__name__}: capture the model "
                            "first (ctc.frontends.capture(model, example_inputs), or load_hf / load_bundled)")
        t_start = time.perf_counter()
        report = PipelineReport(module=module.name, params_before=module.param_count(),
                                bytes_before=module.param_bytes(), ops_before=module.op_counts())
        names = [s.name for s in self.steps]
        if self.verify:
            try:
                _verify(module)
            except Exception as e:
                raise PipelineError(f"the input module {module.name!r} fails verification before any pass ran: {e}",
                                    step=None, index=-1, ran_before=[], report=report, cause=e) from e
        try:
            reference_out = _run_batches(module, self.fidelity_batches)
        except Exception as e:
            raise PipelineError(f"the fidelity batch does not run on the input module {module.name!r} "
                                f"(give batches keyed by its inputs {[v.name for v in module.inputs]}): {e}",
                                step=None, index=-1, ran_before=[], report=report, cause=e) from e
        current = module.clone()
        ref_versions = {k: t._version for k, t in module.params.items()}
        ctx = PassContext(calibration=self.calibration, seed=self.seed)
        bar = _Progress(len(self.steps), self.progress)
        ctx.progress = bar.sub
        for inst in self.instruments:
            inst.enter_pipeline(current)
        forks: list[tuple[str, Module, int]] = []
        try:
            for i, step in enumerate(self.steps):
                bar.start(step.name)
                ctx.variants = []
                current = self._run_step(i, step, current, ctx, report, names, reference_out)
                self._check_params_untouched(module, ref_versions, step, i, names, report)
                if ctx.variants:
                    if forks:
                        raise self._fail("emitted variants, but an earlier step already did; one step of a "
                                         "pipeline may", step, i, names, report, None)
                    forks = [(label, m, i) for label, m in ctx.variants]
                bar.step()
        except PipelineError:
            self._totals(report, current, t_start)  # the report of a failed run is still complete
            raise
        finally:
            bar.close()
        self._totals(report, current, t_start)
        for inst in self.instruments:
            inst.exit_pipeline(current, report)
        results = [("", current, report)]
        for label, m, i in forks:
            vm, vrep = self._run_variant(label, m, i, module, ctx, report, names, reference_out, ref_versions)
            report.variants[label] = vrep
            results.append((label, vm, vrep))
        return results

    def _run_variant(self, label: str, m: Module, i: int, module: Module, ctx: PassContext, main: PipelineReport,
                     names: list[str], reference_out: list[list[torch.Tensor]], ref_versions: dict[str, int]
                     ) -> tuple[Module, PipelineReport]:
        """Check variant ``label`` of step ``i``, then run steps ``i+1..`` on it (instruments are not called)."""
        t_start = time.perf_counter()
        step = self.steps[i]
        vrep = PipelineReport(module=main.module, params_before=main.params_before, bytes_before=main.bytes_before,
                              ops_before=main.ops_before, records=[dataclasses.replace(r) for r in main.records[:i]])
        head = main.records[i]
        rec = dataclasses.replace(head, params_after=m.param_count(), bytes_after=m.param_bytes(),
                                  ops_after=m.op_counts(), ops_diff=_diff(head.ops_before, m.op_counts()),
                                  notes=[*head.notes, f"variant {label}"], fidelity=None)
        vrep.records.append(rec)
        what = f"variant {label!r}"
        try:
            if self.verify:
                try:
                    rec.warnings = _verify(m)
                except Exception as e:
                    raise self._fail(f"produced an invalid {what}: {e}", step, i, names, vrep, e) from e
            if self.fidelity_batches:
                try:
                    rec.fidelity = fidelity(reference_out, _run_batches(m, self.fidelity_batches))
                except Exception as e:  # noqa: BLE001 - a variant that verifies but cannot run is a pass bug
                    raise self._fail(f"produced a {what} the interpreter cannot run: {e}", step, i, names,
                                     vrep, e) from e
            current = m
            for j in range(i + 1, len(self.steps)):
                ctx.variants = []
                current = self._run_step(j, self.steps[j], current, ctx, vrep, names, reference_out)
                self._check_params_untouched(module, ref_versions, self.steps[j], j, names, vrep)
                if ctx.variants:
                    raise self._fail("emitted variants while running on a variant of an earlier step; one step "
                                     "of a pipeline may", self.steps[j], j, names, vrep, None)
        except PipelineError as e:
            self._totals(vrep, m, t_start)
            e.args = (f"[{what} of step {i + 1}] {e.args[0]}",)
            raise
        self._totals(vrep, current, t_start)
        return current, vrep

    @staticmethod
    def _totals(report: PipelineReport, last_good: Module, t_start: float) -> None:
        report.seconds = time.perf_counter() - t_start
        report.params_after, report.bytes_after = last_good.param_count(), last_good.param_bytes()
        report.ops_after = last_good.op_counts()
        report.fidelity = next((r.fidelity for r in reversed(report.records) if r.status == "ok"), None)

    # ----------------------------------------------------------------- one step
    def _fail(self, msg: str, step: Step, i: int, names: list[str], report: PipelineReport,
              cause: BaseException | None) -> PipelineError:
        before = names[:i]
        pos = f"step {i + 1} of {len(names)}"
        ran = ", ".join(before) if before else "none"
        full = f"pass {step.where()} ({pos}) {msg}\n  passes that ran before it: {ran}"
        return PipelineError(full, step=step, index=i, ran_before=before, report=report, cause=cause)

    def _run_step(self, i: int, step: Step, module: Module, ctx: PassContext, report: PipelineReport,
                  names: list[str], reference_out: list[list[torch.Tensor]]) -> Module:
        p = step.pass_
        if self.strict_selectors and not step.selector.is_all and not any(step.selector.matches(n)
                                                                          for n in module.nodes):
            raise self._fail(f"has selector {step.selector.describe()} which matches no node of the module "
                             f"(blocks present: {module.blocks()})", step, i, names, report, None)
        if p.calibration_needed() and not ctx.calibration:
            raise self._fail("needs calibration data, but the pipeline has none (add a `calibrate` line; from "
                             "Python, PassManager(steps, calibration=[{input_name: tensor}, ...]))",
                             step, i, names, report, None)
        ctx.selector = step.selector
        ctx.calibration = _step_batches(module, self.calibration)
        ctx.notes = []
        ctx.metrics = {}
        ctx.computed = []
        ctx.rewriters = []
        params0, bytes0, ops0 = module.param_count(), module.param_bytes(), module.op_counts()
        fp0 = _fingerprint(module)

        def record(status: str, seconds: float, out: Module | None, error: str | None) -> PassRecord:
            m = out if out is not None else module
            ops1 = m.op_counts()
            return PassRecord(
                index=i, name=p.name, options=dataclasses.asdict(p.options), selector=step.selector.describe(),
                span=str(step.span) if step.span is not None else None, status=status, seconds=seconds,
                params_before=params0, params_after=m.param_count(), bytes_before=bytes0,
                bytes_after=m.param_bytes(), ops_before=ops0, ops_after=ops1, ops_diff=_diff(ops0, ops1),
                notes=list(ctx.notes), metrics=_jsonable(dict(ctx.metrics)), analyses_computed=list(ctx.computed),
                error=error, rewrites=ctx.rewrite_log().to_dict() if ctx.rewriters else {})

        for inst in self.instruments:
            inst.run_before_pass(module, step, i)
        t0 = time.perf_counter()
        try:
            out = p.run(module, ctx)
            for rw in ctx.rewriters:  # a pass that forgot to clean up still leaves no orphans
                rw.cleanup()
        except Exception as e:
            report.records.append(record("failed", time.perf_counter() - t0, None, f"{type(e).__name__}: {e}"))
            for inst in self.instruments:
                inst.run_on_failure(None, step, i, e)
            raise self._fail(f"failed: {type(e).__name__}: {e}", step, i, names, report, e) from e
        seconds = time.perf_counter() - t0
        if not isinstance(out, Module):
            err = PassError(f"run() returned {type(out).__name__}, not a Module")
            report.records.append(record("failed", seconds, None, str(err)))
            raise self._fail(str(err), step, i, names, report, err)
        warnings: list[str] = []
        if self.verify:
            try:
                warnings = _verify(out)
            except Exception as e:
                report.records.append(record("failed", seconds, out, f"{type(e).__name__}: {e}"))
                for inst in self.instruments:
                    inst.run_on_failure(out, step, i, e)
                raise self._fail(f"produced invalid IR: {e}", step, i, names, report, e) from e
        # Analyses: everything computed on the old IR is stale unless the pass preserves it,
        # or did not change the module at all (an analysis-only pass, or nothing to do).
        if out is not module or _fingerprint(out) != fp0:
            ctx.invalidate(keep=p.preserves, source=module, module=out)
        rec = record("ok", seconds, out, None)
        rec.warnings = warnings
        if self.fidelity_batches:
            try:
                got = _run_batches(out, self.fidelity_batches)
                rec.fidelity = fidelity(reference_out, got)
            except Exception as e:  # noqa: BLE001 - a module that verifies but cannot run is a pass bug
                report.records.append(dataclasses.replace(rec, status="failed", error=f"{type(e).__name__}: {e}"))
                for inst in self.instruments:
                    inst.run_on_failure(out, step, i, e)
                raise self._fail(f"produced a module the interpreter cannot run: {e}", step, i, names, report,
                                 e) from e
        report.records.append(rec)
        for inst in self.instruments:
            inst.run_after_pass(out, step, i, rec)
        return out

    def _check_params_untouched(self, reference: Module, versions: dict[str, int], step: Step, i: int,
                                names: list[str], report: PipelineReport) -> None:
        changed = [k for k, t in reference.params.items() if t._version != versions[k]]
        if changed:
            if report.records:
                report.records[-1].status = "failed"
            raise self._fail(f"wrote parameter(s) {changed[:5]} in place; passes must register new tensors "
                             "(Module.add_param) instead, so the reference stays intact", step, i, names, report,
                             None)
