"""The ``fpga`` target's hooks: build (emit, model, tune, C-simulate, report) and load (a C-sim runner).

``build`` writes into the target directory:

* ``hls/`` -- the C design (:mod:`.cgen`): ``kernels/*.c``, ``ctc_top.c``, ``tb.c``, ``weights.bin``,
  ``Makefile``, and ``data/`` with the test bench's inputs and the integer model's expected outputs;
* ``report.json`` -- board, per-layer resources against the budget, modelled latency and bound,
  totals, throughput, the tuned-vs-default comparison and the C-simulation verdict;
* ``roofline.png`` / ``roofline.svg`` -- where each kernel sits on the board's roofline.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctc.backends.hls.boards import Board, board_from_options
from ctc.backends.hls.perf import KernelCost, kernel_cost
from ctc.ir.graph import Module

__all__ = ["build", "design_costs", "load"]

DEFAULT_SEQ = 128


def _log(msg: str) -> None:
    import sys

    print(f"[ctc fpga] {msg}", file=sys.stderr, flush=True)


def _check_widths(module: Module, board: Board) -> None:
    from ctc.backends.tvm.lower import LoweringError

    for n in module.nodes:
        if n.op != "quant_linear":
            continue
        if n.attrs.get("act_dynamic"):
            raise LoweringError(f"quant_linear at {n.scope or '<root>'}: dynamic (per-token) activation ranges are "
                                "not supported by the fpga target; quantize with static ranges (rptq/quantize "
                                "a_mode=\"static\")")
        for what in ("w_bits", "a_bits"):
            b = n.attrs[what]
            if b is not None and b != 16 and min((w for w in board.widths if w >= b), default=None) is None:
                raise LoweringError(f"quant_linear at {n.scope or '<root>'}: {what}={b} exceeds the widest integer "
                                    f"datapath of board {board.name} ({max(board.widths)} bits)")
            if b is not None and b != 16 and b not in board.widths:
                raise LoweringError(f"quant_linear at {n.scope or '<root>'}: {what}={b}, but the target's integer "
                                    f"widths are {', '.join(map(str, board.widths))}; quantize to one of them or "
                                    "add the width to `widths=`")


def design_costs(design: Any, board: Board) -> tuple[list[tuple[str, KernelCost]], dict[str, KernelCost]]:
    """(per call in execution order, per kernel) model costs of a lowered design."""
    per_kernel = {name: kernel_cost(name, f, board) for name, f in design.kernels().items()}
    return [(k, per_kernel[k]) for k, _ in design.calls()], per_kernel


def _summary(calls: list[tuple[str, KernelCost]], board: Board) -> dict[str, Any]:
    cycles = sum(c.latency_cycles for _, c in calls)
    s = cycles / (board.clock_mhz * 1e6)
    return {"latency_cycles": cycles, "latency_ms": round(1e3 * s, 4),
            "inferences_per_s": round(1.0 / s, 2) if s else 0,
            "ops": sum(c.ops for _, c in calls), "offchip_bytes": sum(c.offchip_bytes for _, c in calls),
            "compute_bound_layers": sum(c.bound == "compute" for _, c in calls),
            "memory_bound_layers": sum(c.bound == "memory" for _, c in calls)}


def roofline_plot(per_kernel: Mapping[str, KernelCost], calls: Sequence[tuple[str, KernelCost]], board: Board,
                  path: Path, title: str) -> list[str]:
    """``path``.png and .svg: the board's roofline (int8 DSP peak, off-chip bandwidth) and each kernel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = board.clock_mhz * 1e6
    peak = board.dsps * board.products_per_dsp(8, 8) * 2 * f / 1e9  # GOP/s, int8 MACs
    bw = board.bandwidth_gbps
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = np.logspace(-3, 4, 200)
    ax.loglog(xs, np.minimum(peak, xs * bw), "k-", lw=1.5, label=f"roof: {peak:.0f} GOP/s int8, {bw:g} GB/s")
    counts: dict[str, int] = {}
    for k, _ in calls:
        counts[k] = counts.get(k, 0) + 1
    for kind, marker, color in (("qlinear", "o", "tab:blue"), ("other", "^", "tab:orange")):
        pts = [(c.ops / max(c.offchip_bytes, 1), c.ops / c.latency_s(board) / 1e9, counts.get(n, 0))
               for n, c in per_kernel.items() if (n.startswith("qlinear") == (kind == "qlinear")) and c.ops > 0]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=[12 + 4 * p[2] for p in pts], marker=marker,
                       c=color, alpha=0.75, label="integer GEMM layers" if kind == "qlinear" else "float islands")
    ax.set_xlabel("operational intensity (ops / off-chip byte)")
    ax.set_ylabel("attained GOP/s (model)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = []
    for ext in ("png", "svg"):
        fig.savefig(path.with_suffix(f".{ext}"))
        out.append(path.with_suffix(f".{ext}").name)
    plt.close(fig)
    return out


def build(module: Module, target: Any, out_dir: Path, *, example_inputs: Mapping[str, Any] | None = None
          ) -> dict[str, Any]:
    """Emit, model, tune and C-simulate ``module`` for ``target`` (a ``TargetConfig`` of kind fpga)."""
    from ctc.backends.hls import csim
    from ctc.backends.hls.design import lower_design, static_dims_for, write_design
    from ctc.backends.hls.exact import interpret_exact
    from ctc.backends.hls.kernels import qlinear_layers
    from ctc.backends.hls.qlinear import default_tiling
    from ctc.backends.hls.tune import TuneError, tune_plan
    from ctc.backends.tvm.lower import LoweringError

    t_start = time.perf_counter()
    opts = target.options
    board = board_from_options(opts)
    _check_widths(module, board)
    seq = int(opts.seq_len)
    from ctc.analysis.roofline import input_symbols
    from ctc.positions import ir_symbol_limits

    s_sym = input_symbols(module)[1]
    limit = ir_symbol_limits(module).get(s_sym) if s_sym else None  # (positions, why) of a position table
    if seq and limit is not None and seq > limit[0]:
        raise LoweringError(f"seq_len={seq}, but the model takes at most {limit[0]} positions ({limit[1]}): give "
                            f"seq_len <= {limit[0]}")
    if seq:
        static = static_dims_for(module, seq)
    elif example_inputs:  # the evaluation batch fixes every symbolic dim
        from ctc.ir.interpreter import bind_inputs

        _, static = bind_inputs(module, {k: torch.as_tensor(v) for k, v in example_inputs.items()})
        seq = int(static.get("seq", 0))
    else:  # no data: the default length, within the model's positions (a 64-position BERT is built for 64)
        seq = min(DEFAULT_SEQ, limit[0]) if limit is not None else DEFAULT_SEQ
        static = static_dims_for(module, seq)
    layers = qlinear_layers(module, static)
    default_plan = {v: default_tiling(s) for v, s in layers.items()}
    tune_info: dict[str, Any] = {"tuned": False}
    plan = default_plan
    too_big = "(lower seq_len, raise utilization, or pick a larger board)"
    if opts.tune and layers:
        try:
            plan, tune_info = tune_plan(layers, board, opts.utilization, cache_dir=opts.tuning_dir, log=_log)
        except TuneError as e:  # the same failure as a default tiling that does not fit, below
            raise LoweringError(f"{e} {too_big}") from None
        tune_info["tuned"] = True
    design = lower_design(module, static, plan, board=board, utilization=opts.utilization)
    calls, per_kernel = design_costs(design, board)
    refused = {n: c.fits(board, opts.utilization) for n, c in per_kernel.items()}
    refused = {n: why for n, why in refused.items() if why}
    if refused:
        lines = "\n".join(f"  - {n}: {why}" for n, why in sorted(refused.items()))
        raise LoweringError(f"{len(refused)} kernel(s) do not fit board {board.name} at utilization "
                            f"{opts.utilization}:\n{lines}\n{too_big}")
    totals = _summary(calls, board)
    compare: dict[str, Any] = {}
    if tune_info.get("tuned"):
        from ctc.backends.hls.qlinear import qlinear_cost

        d_cyc = sum(qlinear_cost(s, default_plan[v], board).latency_cycles for v, s in layers.items())
        t_cyc = sum(qlinear_cost(s, plan[v], board).latency_cycles for v, s in layers.items())
        other = sum(c.latency_cycles for k, c in calls if not k.startswith("qlinear"))
        compare = {"default_gemm_cycles": d_cyc, "tuned_gemm_cycles": t_cyc,
                   "gemm_speedup": round(d_cyc / t_cyc, 2) if t_cyc else None,
                   "model_speedup": round((d_cyc + other) / (t_cyc + other), 2)}
    hls = out_dir / "hls"
    prog = write_design(design, module, hls)
    feed = dict(example_inputs) if example_inputs and not opts.seq_len else example_inputs_for(module, static)
    ordered = [torch.as_tensor(feed[v.name]) for v in module.inputs]
    expected = interpret_exact(module, ordered)
    data = csim.write_inputs(hls, [np.asarray(t.numpy()) for t in ordered], [e.detach().numpy() for e in expected])
    sim: dict[str, Any] = {"run": False}
    if opts.csim:
        _log(f"C simulation: gcc on {len(prog.kernels)} kernels")
        cs = csim.compile_csim(hls)
        res = csim.run_csim(hls, data, prog.outputs, compile_s=cs)
        sim = {"run": True, **res.to_json()}
        if not res.passed:
            raise csim.CSimError(f"C simulation of {hls} is not bit-exact against the integer model: "
                                 f"{res.stdout.strip()}")
    layer_rows = []
    for k, c in calls:
        row = c.to_json()
        row["latency_us"] = round(1e6 * c.latency_s(board), 3)
        row["dsp_share"] = round(c.dsps / board.dsps, 4)
        row["onchip_share"] = round(c.onchip_bytes / board.onchip_bytes, 4)
        if k in design.qlinear:
            row["layer"], shape, t = design.qlinear[k]
            row["tiling"] = dict(zip(("tm", "tn", "tk", "pn", "pe"), t.as_tuple(), strict=True))
            row["macs"] = shape.macs
        layer_rows.append(row)
    plots: list[str] = []
    try:
        plots = roofline_plot(per_kernel, calls, board, out_dir / "roofline",
                              f"{module.name} on {board.name} ({board.clock_mhz:g} MHz)")
    except ImportError:
        plots = []
    report = {"board": board.to_json(), "utilization": opts.utilization, "static_dims": static,
              "totals": totals, "tuning": tune_info, "tuned_vs_default": compare, "csim": sim,
              "layers": layer_rows, "kernels": len(per_kernel), "calls": len(calls),
              "max_layer_dsps": max((c.dsps for _, c in calls), default=0),
              "max_layer_onchip_bytes": max((c.onchip_bytes for _, c in calls), default=0),
              "weights_bytes": prog.weights_bytes, "plots": plots, "notes": design.notes,
              "inputs": [{"name": n, "dtype": dt, "elements": e} for n, dt, e in prog.inputs],
              "outputs": [{"name": n, "dtype": dt, "elements": e} for n, dt, e in prog.outputs]}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    summary = {"board": board.name, "clock_mhz": board.clock_mhz, "static_dims": static,
               "latency_ms": totals["latency_ms"], "inferences_per_s": totals["inferences_per_s"],
               "max_layer_dsps": report["max_layer_dsps"], "board_dsps": board.dsps, "csim": sim,
               "tuned_vs_default": compare, "kernels": len(per_kernel), "plots": plots,
               "build_s": round(time.perf_counter() - t_start, 2), "report": "report.json"}
    if not opts.csim:  # the caller (ctc compile) must not try to run it
        summary["not_runnable"] = ("built with csim=false: the C was not compiled, so the design was neither run nor "
                                   "checked against the IR here (csim=true does both)")
    return summary


def example_inputs_for(module: Module, static: Mapping[str, int]) -> dict[str, torch.Tensor]:
    from ctc.eval.data import synthetic_inputs

    return synthetic_inputs(module, static)


class CSimRunner:
    """Runs the built C design on given inputs (gcc C simulation) and checks it against the integer model."""

    simulated = True

    def __init__(self, target_dir: Path, module: Module | None):
        from ctc.backends.hls.csim import CSimError

        self.dir = Path(target_dir)
        self.hls = self.dir / "hls"
        self.module = module
        rep = self.dir / "report.json"
        if not (self.hls / "csim").exists() or not rep.exists():
            raise CSimError(f"no C-simulation build in {self.dir} (build with `target fpga csim=true`)")
        self.report = json.loads(rep.read_text())
        self.estimated_latency_ms = float(self.report["totals"]["latency_ms"])
        self.last_bit_exact: bool | None = None

    @property
    def static_dims(self) -> dict[str, int]:
        """The one size of every symbol the design was built for (its shapes are static)."""
        return {str(k): int(v) for k, v in (self.report.get("static_dims") or {}).items()}

    def __call__(self, inputs: Mapping[str, Any] | Sequence[Any]) -> list[torch.Tensor]:
        from ctc.backends.hls import csim
        from ctc.backends.hls.exact import interpret_exact
        from ctc.errors import UsageError

        names = [i["name"] for i in self.report["inputs"]]
        if isinstance(inputs, Mapping):
            missing = [n for n in names if n not in inputs]
            if missing:
                raise UsageError(f"missing input {missing[0]!r}: the fpga design takes {', '.join(names)}")
            ordered = [torch.as_tensor(inputs[n]) for n in names]
        else:
            ordered = [torch.as_tensor(x) for x in inputs]
            if len(ordered) != len(names):
                raise UsageError(f"the fpga design takes {len(names)} inputs ({', '.join(names)}), got {len(ordered)}")
        for (n, x), spec in zip(zip(names, ordered, strict=True), self.report["inputs"], strict=True):
            if x.numel() != spec["elements"]:
                raise UsageError(f"fpga design input {n}: built for {spec['elements']} values "
                                 f"(static shapes {self.report['static_dims']}), got shape {list(x.shape)}")
        expected = interpret_exact(self.module, ordered) if self.module is not None else None
        outs = [(o["name"], o["dtype"], o["elements"]) for o in self.report["outputs"]]
        with tempfile.TemporaryDirectory(prefix="ctc_csim_") as tmp:
            d = Path(tmp)
            for i, x in enumerate(ordered):
                np.ascontiguousarray(x.numpy()).tofile(d / f"input_{i}.bin")
            for i, e in enumerate(expected or []):
                np.ascontiguousarray(e.detach().numpy()).tofile(d / f"expected_{i}.bin")
            if expected is None:
                for i, (_, dt, n) in enumerate(outs):
                    np.zeros(n, csim.NP_DTYPES[dt]).tofile(d / f"expected_{i}.bin")
            res = csim.run_csim(self.hls, d, outs)
        self.last_bit_exact = res.passed if expected is not None else None
        shapes = [tuple(e.shape) for e in expected] if expected is not None else [(-1,)] * len(outs)
        return [torch.from_numpy(a.copy()).reshape(s) for a, s in zip(res.outputs, shapes, strict=True)]


def load(target_dir: str | Path, module: Module | None = None) -> CSimRunner:
    """The artifact hook: a runner that C-simulates the design (bit-exact check when the module is given)."""
    return CSimRunner(Path(target_dir), module)

