"""Roofline analysis of a ctc module on a target: which ops are compute- or memory-bound, prefill and decode apart.

For each op (:mod:`ctc.analysis.costs`) the roofline bound is ``max(flops / peak, bytes / bandwidth)`` at
the target's roofs (:mod:`ctc.analysis.peaks`); the op is compute-bound when the first term is larger.
The bound is a lower limit on the op's time: real kernels fuse ops (moving fewer bytes) or miss the peaks.
Measured kernel times (``ctc bench --profile``, or ``ctc analyze --profile``) are placed beside it
by kernel group (:func:`measured_points`).

Phases: a causal LM has a **prefill** (the prompt of ``seq_len`` tokens in one pass) and a **decode**
(one new token after it, reading ``seq_len`` cached keys and values per attention); an encoder or any
other graph has one **forward**; a decode-step artifact (``model ... decode=LEN``) is its **decode** step
as captured (it reads its whole preallocated cache; a prompt is fed through the same step).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ctc.analysis.costs import CostError, OpCost, module_costs
from ctc.analysis.peaks import Peaks
from ctc.errors import UsageError
from ctc.ir.graph import Module
from ctc.tasks import TASK_CAUSAL_LM, TASK_DECODE_STEP

__all__ = ["Analysis", "Phase", "analyze_module", "format_analysis", "measured_points", "roofline_svg"]


@dataclass
class Phase:
    """One way the model runs (prefill, decode or forward) and the cost of each op in it."""

    name: str
    description: str
    env: dict[str, int]
    costs: list[OpCost]

    def bound_s(self, c: OpCost, peaks: Peaks) -> tuple[float, str]:
        t_c = c.flops / peaks.peak(c.compute)
        t_m = c.bytes / peaks.bandwidth
        return max(t_c, t_m), ("compute" if t_c > t_m else "memory")

    def totals(self, peaks: Peaks) -> dict[str, Any]:
        times = [self.bound_s(c, peaks) for c in self.costs]
        flops = sum(c.flops for c in self.costs)
        nbytes = sum(c.bytes for c in self.costs)
        t = sum(x for x, _ in times)
        return {"flops": flops, "bytes": nbytes, "weight_bytes": sum(c.weight_bytes for c in self.costs),
                "intensity": flops / nbytes if nbytes else math.inf, "bound_ms": 1e3 * t,
                "compute_bound_ms": 1e3 * sum(x for x, b in times if b == "compute"),
                "memory_bound_ms": 1e3 * sum(x for x, b in times if b == "memory"), "ops": len(self.costs)}

    def groups(self, peaks: Peaks) -> list[dict[str, Any]]:
        """Ops of one kind at the same place in every block (``model.layers.*.mlp.up_proj``), slowest first."""
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for c in self.costs:
            where = re.sub(r"\.\d+(\.|$)", r".*\1", c.scope) if c.block is not None else c.scope
            r = rows.setdefault((c.op, where), {"op": c.op, "where": where or "-", "class": c.op_class,
                                                "compute": c.compute, "count": 0, "flops": 0.0, "bytes": 0.0,
                                                "bound_ms": 0.0, "compute_bound": 0})
            t, b = self.bound_s(c, peaks)
            r["count"] += 1
            r["flops"] += c.flops
            r["bytes"] += c.bytes
            r["bound_ms"] += 1e3 * t
            r["compute_bound"] += b == "compute"
        out = sorted(rows.values(), key=lambda r: -r["bound_ms"])
        for r in out:
            r["intensity"] = r["flops"] / r["bytes"] if r["bytes"] else math.inf
            r["bound"] = "compute" if r["compute_bound"] * 2 > r["count"] else "memory"
            del r["compute_bound"]
        return out

    def classes(self) -> dict[str, dict[str, float]]:
        """FLOPs and bytes per op class (gemm, attention, norm, elementwise, data)."""
        out: dict[str, dict[str, float]] = {}
        for c in self.costs:
            d = out.setdefault(c.op_class, {"flops": 0.0, "bytes": 0.0})
            d["flops"] += c.flops
            d["bytes"] += c.bytes
        return out


@dataclass
class Analysis:
    """A module's phases on one target's roofs."""

    model: str
    task: str
    peaks: Peaks
    phases: list[Phase]
    notes: list[str] = field(default_factory=list)

    def phase(self, name: str) -> Phase:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(name)

    def to_json(self, *, per_op: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "task": self.task, "target": self.peaks.to_json(),
                               "notes": self.notes, "phases": []}
        for p in self.phases:
            d = {"name": p.name, "description": p.description, "dims": p.env, **p.totals(self.peaks),
                 "groups": p.groups(self.peaks)}
            if per_op:
                d["ops"] = [{"node": c.node, "block": c.block, "class": c.op_class, "compute": c.compute,
                             "flops": c.flops, "bytes": c.bytes, "weight_bytes": c.weight_bytes,
                             "bound_ms": 1e3 * p.bound_s(c, self.peaks)[0], "bound": p.bound_s(c, self.peaks)[1],
                             **({"notes": c.notes} if c.notes else {})} for c in p.costs]
            out["phases"].append(d)
        return out


def input_symbols(module: Module) -> tuple[str | None, str | None, set[str]]:
    """(batch symbol, sequence symbol, every symbol) of the module's inputs: ``batch`` / ``seq`` when capture named
    them so, else the first symbol at dim 0 and the first symbol at a later dim."""
    batch = seq = None
    every: set[str] = set()
    for v in module.inputs:
        every |= v.type.symbols
        for i, d in enumerate(v.type.shape):
            if not isinstance(d, str) or not d.isidentifier():
                continue
            if i == 0 and batch is None:
                batch = d
            elif i > 0 and seq is None and d != batch:
                seq = d
    if "batch" in every:
        batch = "batch"
    if "seq" in every:
        seq = "seq"
    return batch, (seq if seq != batch else None), every


def refuse_absent_dims(module: Module, *, seq_len: int | None, batch: int | None) -> tuple[str | None, str | None]:
    """The (batch, sequence) symbols of ``module``'s inputs; a ``--seq-len`` / ``--batch`` given (not None) for a
    dim the inputs do not have (an MLP's or CNN's fixed shapes) is a UsageError, not a flag silently ignored."""
    b_sym, s_sym, _ = input_symbols(module)
    for flag, given, sym, what in (("--seq-len", seq_len, s_sym, "sequence"), ("--batch", batch, b_sym, "batch")):
        if given is not None and sym is None:
            raise UsageError(f"{flag} {given}: the model's inputs have no {what} dim (that size is fixed as "
                             "captured); leave it out")
    return b_sym, s_sym


def analyze_module(module: Module, peaks: Peaks, *, seq_len: int = 128, batch: int = 1,
                   dims: Mapping[str, int] | None = None, name: str = "") -> Analysis:
    """Costs and roofline bounds of ``module`` on ``peaks``' target, by phase (see the module docstring)."""
    if seq_len < 1 or batch < 1:
        raise UsageError(f"--seq-len and --batch must be >= 1 (got {seq_len}, {batch})")
    task = str(module.meta.get("task", "unknown"))
    b_sym, s_sym, every = input_symbols(module)
    env: dict[str, int] = {}
    if b_sym:
        env[b_sym] = batch
    if s_sym:
        env[s_sym] = seq_len
    stray = sorted(set(dims or {}) - every)
    if stray:
        raise UsageError(f"--dim {stray[0]}: the model has no input dim of that name (its symbolic dims: "
                         f"{', '.join(sorted(every)) or 'none, every input shape is fixed'})")
    env.update(dims or {})
    unknown = sorted(every - set(env))
    if unknown:
        raise UsageError(f"the model's input dims use {', '.join(unknown)}: give each a size with --dim NAME=N")
    notes = []
    try:
        if task == TASK_DECODE_STEP:
            max_len = int(module.meta.get("decode", {}).get("max_len", 0))
            phases = [Phase("decode", f"one decode step, batch {batch if b_sym else 'as captured'}; reads its whole "
                                      f"preallocated KV cache of {max_len} positions (masked beyond the position)",
                            env, module_costs(module, env))]
            notes.append("decode-step artifact: a prompt runs through the same step one token at a time")
        elif task == TASK_CAUSAL_LM and s_sym:
            one = {**env, s_sym: 1}
            phases = [Phase("prefill", f"prompt of {seq_len} tokens in one pass, batch {batch}", env,
                            module_costs(module, env)),
                      Phase("decode", f"one new token after {seq_len}, batch {batch}: the graph at length 1, each "
                                      f"attention reading {seq_len} cached key/value positions", one,
                            module_costs(module, one, context=seq_len))]
        else:
            what = f"{seq_len} tokens" if s_sym else "the captured shapes"
            phases = [Phase("forward", f"one forward pass over {what}, batch {batch if b_sym else 'as captured'}",
                            env, module_costs(module, env))]
            if task == TASK_CAUSAL_LM:
                notes.append("causal LM captured at fixed shapes: no separate decode phase (compile with "
                             "`model ... decode=LEN` for a decode step)")
    except CostError as e:
        raise UsageError(f"cannot analyze the module: {e}") from None
    return Analysis(name or module.name, task, peaks, phases, notes)


# ---------------------------------------------------------------------- measured kernel times
_KERNEL_GROUPS = (("attention", ("attention", "softmax")),
                  ("gemm", ("matmul", "dense", "conv", "qlinear", "quant_linear", "gemv", "gemm", "lowrank", "vnni",
                            "int8", "int4", "linear")),
                  ("norm", ("norm", "mean", "variance", "rsqrt")))


def kernel_group(name: str) -> str:
    """The op class a compiled kernel's time is put against, by its name (TVM names fused kernels after their
    ops: ``fused_matmul_add``); ``runtime`` for the VM's own builtins, ``other`` otherwise."""
    low = name.lower()
    if low.startswith("vm.") or "builtin" in low or low.startswith("alloc"):
        return "runtime"
    for group, keys in _KERNEL_GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def measured_points(phase: Phase, kernels: Sequence[Mapping[str, Any]], latency_ms: float | None
                    ) -> list[dict[str, Any]]:
    """Measured points for the roofline plot: per kernel group (model FLOPs and bytes of that op class over the
    measured time of its kernels) and the whole model (all FLOPs over the measured latency)."""
    classes = phase.classes()
    merged = {"elementwise": "other", "data": "other"}
    model: dict[str, dict[str, float]] = {}
    for cls, d in classes.items():
        m = model.setdefault(merged.get(cls, cls), {"flops": 0.0, "bytes": 0.0})
        m["flops"] += d["flops"]
        m["bytes"] += d["bytes"]
    times: dict[str, float] = {}
    for k in kernels:
        g = kernel_group(str(k.get("kernel", "")))
        times[g] = times.get(g, 0.0) + float(k.get("ms_per_run", 0.0))
    pts = []
    for g, ms in sorted(times.items()):
        m = model.get(g)
        if g == "runtime" or m is None or ms <= 0 or m["flops"] <= 0 or m["bytes"] <= 0:
            continue
        pts.append({"label": f"{g} kernels (measured)", "intensity": m["flops"] / m["bytes"],
                    "flops_per_s": m["flops"] / (ms / 1e3), "ms": ms})
    if latency_ms:
        flops = sum(d["flops"] for d in classes.values())
        nbytes = sum(d["bytes"] for d in classes.values())
        if flops > 0 and nbytes > 0:
            pts.append({"label": "whole model (measured latency)", "intensity": flops / nbytes,
                        "flops_per_s": flops / (latency_ms / 1e3), "ms": latency_ms})
    return pts


# ---------------------------------------------------------------------- text and plot
def _si(x: float, unit: str = "") -> str:
    if not math.isfinite(x):
        return "inf"
    for f, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= f:
            return f"{x / f:.3g} {p}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def format_analysis(a: Analysis, *, top: int = 15, points: Sequence[Mapping[str, Any]] = ()) -> str:
    """`ctc analyze`'s text: the roofs, then per phase the totals and the slowest op groups."""
    p = a.peaks
    lines = [f"model: {a.model} ({a.task})",
             f"target: {p.target} -- {p.device}",
             f"  roofs: fp32 {_si(p.flops['f32'], 'FLOP/s')}, int8 {_si(p.flops['int8'], 'OP/s')}, "
             f"memory {_si(p.bandwidth, 'B/s')}; ridge {p.ridge('f32'):.1f} FLOP/byte (fp32)",
             f"  source: {p.source}",
             "  model: every op its own kernel (no fusion), bytes = operands read + result written; bound = "
             "max(FLOPs / peak, bytes / bandwidth)"]
    lines += [f"  note: {n}" for n in a.notes]
    for ph in a.phases:
        t = ph.totals(p)
        lines += ["", f"== {ph.name}: {ph.description}",
                  f"   {_si(t['flops'], 'FLOP')}, {_si(t['bytes'], 'B')} moved ({_si(t['weight_bytes'], 'B')} "
                  f"weights), intensity {t['intensity']:.2f} FLOP/B; roofline bound {t['bound_ms']:.4g} ms "
                  f"({t['memory_bound_ms']:.4g} ms in memory-bound ops, {t['compute_bound_ms']:.4g} ms compute-bound)"]
        head = f"   {'op':<28} {'where':<44} {'n':>4} {'FLOPs':>10} {'bytes':>10} {'FLOP/B':>8} {'bound':>8} {'ms':>9}"
        lines.append(head)
        groups = ph.groups(p)
        for r in groups[:top]:
            lines.append(f"   {r['op']:<28} {r['where'][-44:]:<44} {r['count']:>4} {_si(r['flops']):>10} "
                         f"{_si(r['bytes']):>10} {r['intensity']:>8.2f} {r['bound']:>8} {r['bound_ms']:>9.4f}")
        if len(groups) > top:
            rest = sum(r["bound_ms"] for r in groups[top:])
            lines.append(f"   ... {len(groups) - top} more groups ({rest:.4f} ms; --top N or --json for all)")
    for pt in points:
        lines.append(f"measured: {pt['label']}: {pt['ms']:.4g} ms, {_si(pt['flops_per_s'], 'FLOP/s')} attained "
                     f"at {pt['intensity']:.2f} FLOP/B")
    return "\n".join(lines)


def roofline_svg(data: Mapping[str, Any], *, title: str = "") -> str:
    """The roofline plot as an inline SVG string, from :meth:`Analysis.to_json` (plus ``measured``: the points of
    :func:`measured_points`): roofs, one marker per op group and phase (at its bound, sized by its time), and
    the measured points."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = data["target"]
    flops, bw = t["flops"], float(t["bandwidth"])
    points = list(data.get("measured") or [])

    def roof(compute: str) -> float:
        return float(flops.get(compute) or flops["f32"])

    plt.rcParams["svg.fonttype"] = "none"
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    groups = [(ph["name"], r) for ph in data["phases"] for r in ph["groups"] if r["flops"] > 0 and r["bytes"] > 0]
    xs_all = [r["intensity"] for _, r in groups] + [pt["intensity"] for pt in points]
    lo = min([0.01] + [x / 3 for x in xs_all if x > 0])
    hi = max([roof("int8") / bw * 10] + [x * 3 for x in xs_all])
    xs = [lo * (hi / lo) ** (i / 199) for i in range(200)]
    for compute, style in (("f32", "-"), ("int8", "--")):
        if compute == "int8" and roof("int8") == roof("f32"):
            continue
        ax.loglog(xs, [min(roof(compute), x * bw) for x in xs], "k" + style, lw=1.3,
                  label=f"roof {compute}: {_si(roof(compute), 'OP/s')}, {_si(bw, 'B/s')}")
    markers = {"prefill": ("o", "tab:blue"), "forward": ("o", "tab:blue"), "decode": ("s", "tab:orange")}
    for ph in data["phases"]:
        rows = [r for name, r in groups if name == ph["name"]]
        if not rows:
            continue
        m, col = markers.get(ph["name"], ("o", "tab:green"))
        longest = max(r["bound_ms"] for r in rows) or 1.0
        ax.scatter([r["intensity"] for r in rows], [min(roof(r["compute"]), r["intensity"] * bw) for r in rows],
                   s=[12 + 60 * r["bound_ms"] / longest for r in rows], marker=m, c=col, alpha=0.6,
                   label=f"{ph['name']} op groups (bound)")
    for i, pt in enumerate(points):
        ax.scatter([pt["intensity"]], [pt["flops_per_s"]], marker="*", s=140, c=f"C{(i + 3) % 10}",
                   edgecolors="k", linewidths=0.5, label=pt["label"])
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved)")
    ax.set_ylabel("FLOP/s")
    ax.set_title(title or f"{data.get('model', '')} on {t['target']} ({t['device']})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]
