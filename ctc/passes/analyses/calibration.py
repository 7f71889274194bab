"""Calibration statistics: per-channel activation ranges at chosen points, collected once.

One interpreter run over the calibration batches with an observer accumulates, for
every chosen value, running per-channel (last dim) min, max, sum of |x|, max |x|, sum
and sum of squares.  Nothing is kept of the activations themselves, so memory is
bounded by channels x points (plus the optional bounded row reservoir and the optional
``X^T X`` accumulators, channels^2 per point, for GPTQ/ASVD-style methods).

Points are chosen by op kind (the inputs or outputs of every ``linear``...) and by value
name.  Results are keyed by value name; :meth:`CalibrationResult.input_of` finds the
statistics of a node's operand.  The analysis is cached in the :class:`PassContext` like
any other, and dropped after a pass unless the pass lists :class:`CalibrationStats` in
``preserves`` (only passes that leave every observed value's meaning unchanged may).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ctc.ir.graph import Module, Node, Value
from ctc.ir.interpreter import bind_inputs, interpret
from ctc.ir.ops import OpError, get_op
from ctc.ir.ops.registry import did_you_mean
from ctc.passes.base import Analysis, PassContext, PassError

__all__ = ["CalibrationResult", "CalibrationStats", "ChannelStats"]


@dataclass
class ChannelStats:
    """Running per-channel statistics of one value (channels = its last dim).

    ``rows`` counts the observed channel vectors (all leading dims flattened, over all
    batches).  ``reservoir`` holds up to ``reservoir_size`` rows sampled uniformly
    (Algorithm R, seeded); ``xtx`` is ``sum_rows x^T x`` in float64 when requested.
    """

    value: str
    channels: int
    rows: int = 0
    min: torch.Tensor | None = None
    max: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    sum: torch.Tensor | None = None
    sq_sum: torch.Tensor | None = None
    reservoir: torch.Tensor | None = None
    reservoir_size: int = 0
    xtx: torch.Tensor | None = None
    _gen: torch.Generator | None = field(default=None, repr=False)

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean of |x| per channel."""
        assert self.abs_sum is not None
        return self.abs_sum / max(self.rows, 1)

    @property
    def mean(self) -> torch.Tensor:
        assert self.sum is not None
        return self.sum / max(self.rows, 1)

    @property
    def var(self) -> torch.Tensor:
        """Population variance per channel (from float64 running sums)."""
        assert self.sq_sum is not None
        m = self.mean
        return (self.sq_sum / max(self.rows, 1) - m * m).clamp_min(0)

    @property
    def hessian(self) -> torch.Tensor:
        """``X^T X / rows`` (float64), the layer-wise Hessian proxy GPTQ uses (up to a factor 2)."""
        if self.xtx is None:
            raise PassError(f"calibration point %{self.value}: X^T X was not collected "
                            "(ask CalibrationStats(..., hessian=True))")
        return self.xtx / max(self.rows, 1)

    def nbytes(self) -> int:
        """Memory held by this point's accumulators."""
        ts = [self.min, self.max, self.abs_max, self.abs_sum, self.sum, self.sq_sum, self.reservoir, self.xtx]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def update(self, x: torch.Tensor) -> None:
        """Fold one observed tensor into the running statistics (not retained)."""
        if x.dim() == 0:
            x = x.reshape(1)
        c = int(x.shape[-1])
        if c != self.channels:
            raise PassError(f"calibration point %{self.value}: last dim is {c} on this batch but was "
                            f"{self.channels} before; per-channel statistics need a fixed channel dim "
                            "(choose another point)")
        rows = x.detach().reshape(-1, c)
        n = rows.shape[0]
        if n == 0:
            return
        lo, hi = torch.aminmax(rows, dim=0)  # exact in the value's own dtype
        lo, hi = lo.to(torch.float64), hi.to(torch.float64)
        amax = torch.maximum(-lo, hi)  # max |x| per channel, without materialising |x|
        r64 = rows.to(torch.float64)
        s1, sa, s2 = r64.sum(0), r64.abs().sum(0), r64.square().sum(0)
        if self.rows == 0:
            self.min, self.max, self.abs_max = lo, hi, amax
            self.abs_sum, self.sum, self.sq_sum = sa, s1, s2
        else:
            assert self.min is not None and self.max is not None and self.abs_max is not None
            assert self.abs_sum is not None and self.sum is not None and self.sq_sum is not None
            torch.minimum(self.min, lo, out=self.min)
            torch.maximum(self.max, hi, out=self.max)
            torch.maximum(self.abs_max, amax, out=self.abs_max)
            self.abs_sum += sa
            self.sum += s1
            self.sq_sum += s2
        if self.xtx is not None:
            self.xtx += r64.T @ r64
        if self.reservoir_size > 0:
            self._sample(rows)
        self.rows += n

    def _sample(self, rows: torch.Tensor) -> None:
        """Algorithm R over rows: after N rows, each is in the reservoir with probability k/N."""
        k, seen, n = self.reservoir_size, self.rows, rows.shape[0]
        if self.reservoir is None:
            self.reservoir = torch.empty((0, self.channels), dtype=rows.dtype)
        fill = max(0, min(k - seen, n))
        if fill:
            self.reservoir = torch.cat([self.reservoir, rows[:fill].clone()])
        if fill < n:
            idx = torch.arange(seen + fill, seen + n, dtype=torch.float64)  # 0-based global row index
            draw = (torch.rand(n - fill, generator=self._gen, dtype=torch.float64) * (idx + 1)).floor().long()
            for j in torch.nonzero(draw < k).flatten().tolist():  # ~k/N of the rows, in order
                self.reservoir[int(draw[j])] = rows[fill + j]

    def summary(self) -> dict[str, Any]:
        """Small JSON-able digest (for reports)."""
        am = self.abs_max
        return {"value": self.value, "channels": self.channels, "rows": self.rows,
                "abs_max": float(am.max()) if am is not None and am.numel() else None,
                "abs_mean": float(self.abs_mean.mean()) if self.abs_sum is not None else None}


@dataclass
class CalibrationResult:
    """Statistics of every chosen point, keyed by value name.

    ``inputs[(node_key, operand)]`` names the value that is operand ``operand`` of a chosen node
    (``node_key`` is the node's first output name); ``outputs[node_key]`` names its
    outputs.  ``batches`` counts the calibration batches run.
    """

    stats: dict[str, ChannelStats]
    inputs: dict[tuple[str, str], str]
    outputs: dict[str, list[str]]
    batches: int

    def __getitem__(self, value: str | Value) -> ChannelStats:
        name = value.name if isinstance(value, Value) else value
        try:
            return self.stats[name]
        except KeyError:
            raise PassError(f"no calibration statistics for %{name} (collected: "
                            f"{', '.join(sorted(self.stats)[:10])}{'...' if len(self.stats) > 10 else ''})") from None

    def __contains__(self, value: str | Value) -> bool:
        return (value.name if isinstance(value, Value) else value) in self.stats

    def input_of(self, node: Node, operand: str = "x") -> ChannelStats:
        """Statistics of the operand called ``operand`` of ``node`` (which must have been a chosen point)."""
        v = node.operand(operand)
        if v is None:
            raise PassError(f"{node.op} at {node.scope or '<root>'} has no {operand!r} operand")
        return self[v]

    def output_of(self, node: Node, i: int = 0) -> ChannelStats:
        return self[node.outputs[i]]

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.stats.values())


def _node_key(node: Node) -> str:
    return node.outputs[0].name if node.outputs else f"{node.op}@{node.scope}"


class CalibrationStats(Analysis):
    """Per-channel activation statistics at chosen points over the calibration batches.

    Config (all optional, keyword):

    * ``input_ops``: op names whose operands are observed (default ``("linear", "quant_linear")``);
    * ``operands``: which operands of those ops, by name (default ``("x",)``, the activation);
    * ``output_ops``: op names whose results are observed (default none);
    * ``values``: value names observed wherever they are (module inputs included);
    * ``reservoir``: rows to keep per point in a uniform sample (default 0: none);
    * ``hessian``: also accumulate ``X^T X`` per point in float64 (default False);
    * ``max_batches``: use at most this many calibration batches (default all);
    * ``seed``: reservoir sampling seed (default: the context's seed).

    Only float values are observed; integer operands among the chosen ones are skipped.
    """

    name = "calibration-stats"
    needs_calibration = True

    _KNOWN = ("input_ops", "operands", "output_ops", "values", "reservoir", "hessian", "max_batches", "seed")

    def __init__(self, **config: Any):
        unknown = [k for k in config if k not in self._KNOWN]
        if unknown:
            import difflib

            near = difflib.get_close_matches(unknown[0], self._KNOWN, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise PassError(f"CalibrationStats has no setting {unknown[0]!r}{hint} "
                            f"(settings: {', '.join(self._KNOWN)})")
        config.setdefault("input_ops", ("linear", "quant_linear"))
        config.setdefault("operands", ("x",))
        config.setdefault("output_ops", ())
        config.setdefault("values", ())
        config.setdefault("reservoir", 0)
        config.setdefault("hessian", False)
        config.setdefault("max_batches", None)
        for k in ("input_ops", "operands", "output_ops", "values"):
            if isinstance(config[k], str) or not isinstance(config[k], Sequence):
                raise PassError(f"CalibrationStats: {k} must be a list, got {config[k]!r}")
            config[k] = tuple(config[k])
        bad = [o for o in config["operands"] if not isinstance(o, str)]
        if bad:
            raise PassError(f"CalibrationStats: operands are named as the op declares them (e.g. ('k', 'v') of "
                            f"scaled_dot_product_attention), got {bad[0]!r}")
        for op_name in config["input_ops"]:
            try:
                opdef = get_op(op_name)
            except OpError as e:
                raise PassError(f"CalibrationStats: input_ops: {e}") from None
            for o in config["operands"]:
                if o not in opdef.operand_names:
                    raise PassError(f"CalibrationStats: op {op_name} has no operand {o!r}"
                                    f"{did_you_mean(o, opdef.operand_names)} (operands: {', '.join(opdef.inputs)})")
        if not isinstance(config["reservoir"], int) or config["reservoir"] < 0:
            raise PassError(f"CalibrationStats: reservoir must be an int >= 0, got {config['reservoir']!r}")
        super().__init__(**config)

    # ----------------------------------------------------------------- planning
    def plan(self, module: Module) -> tuple[dict[int, list[tuple[int, Value]]], list[tuple[int, Value]],
                                            CalibrationResult]:
        """Where each point is observed, once per value: ``id(node) -> [(output index, value)]``
        for node results, ``[(input position, value)]`` for module inputs (read from each batch),
        and the empty result with its node -> value maps filled in."""
        cfg = self.config
        wanted: dict[int, Value] = {}  # id(value) -> value, insertion-ordered
        inputs: dict[tuple[str, str], str] = {}
        outputs: dict[str, list[str]] = {}

        def want(v: Value) -> bool:
            if v.type.dtype not in ("f32", "f16", "bf16", "f64"):
                return False
            wanted.setdefault(id(v), v)
            return True

        for n in module.nodes:
            if n.op in cfg["input_ops"]:
                for name in cfg["operands"]:
                    v = n.operand(name)
                    if v is not None and want(v):
                        inputs[(_node_key(n), name)] = v.name
            if n.op in cfg["output_ops"]:
                outputs[_node_key(n)] = [v.name for v in n.outputs if want(v)]
        by_name = {v.name: v for v in module.values()}
        missing = [name for name in cfg["values"] if name not in by_name]
        if missing:
            import difflib

            near = difflib.get_close_matches(missing[0], list(by_name), n=1)
            hint = f"; did you mean %{near[0]}?" if near else ""
            raise PassError(f"CalibrationStats: module {module.name} has no value %{missing[0]}{hint}")
        for name in cfg["values"]:
            if not want(by_name[name]):
                raise PassError(f"CalibrationStats: %{name} is {by_name[name].type}; only float values have "
                                "activation statistics")
        # Observe a node's results when it runs; module inputs come straight from the batch.
        sites: dict[int, list[tuple[int, Value]]] = {}
        for n in module.nodes:
            for j, v in enumerate(n.outputs):
                if id(v) in wanted:
                    sites.setdefault(id(n), []).append((j, v))
        module_inputs = [(k, v) for k, v in enumerate(module.inputs) if id(v) in wanted]
        result = CalibrationResult({}, inputs, outputs, 0)
        return sites, module_inputs, result

    # ----------------------------------------------------------------- running
    def compute(self, module: Module, ctx: PassContext) -> CalibrationResult:
        cfg = self.config
        batches = list(ctx.calibration)
        if cfg["max_batches"] is not None:
            batches = batches[: int(cfg["max_batches"])]
        if not batches:
            raise PassError("CalibrationStats needs calibration batches, and the pipeline has none "
                            "(add a `calibrate` line to the recipe)")
        sites, module_inputs, result = self.plan(module)
        seed = int(cfg.get("seed", ctx.seed))
        stats = result.stats

        def observe(v: Value, t: torch.Tensor) -> None:
            s = stats.get(v.name)
            if s is None:
                c = int(t.shape[-1]) if t.dim() else 1
                # Each point's sample depends on the seed and its name only, not on which
                # other points are collected (str hash() is salted per process: use crc32).
                gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(v.name.encode())) % 2**63)
                s = stats[v.name] = ChannelStats(v.name, c, reservoir_size=int(cfg["reservoir"]), _gen=gen)
                if cfg["hessian"]:
                    s.xtx = torch.zeros((c, c), dtype=torch.float64)
            s.update(t)

        def observer(node: Node, args: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
            for i, v in sites.get(id(node), ()):
                observe(v, outs[i])

        for b, batch in enumerate(batches):
            ordered, _ = bind_inputs(module, batch)
            for k, v in module_inputs:
                observe(v, ordered[k])
            interpret(module, batch, observer=observer)
            ctx.report_progress("calibration", b + 1, len(batches))
        result.batches = len(batches)
        return result
