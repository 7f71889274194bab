"""`ctc analyze`: the roofline of an artifact on a target, with measured kernel times where the target runs here."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from ctc.analysis.peaks import KINDS, target_peaks
from ctc.analysis.roofline import Analysis, analyze_module, measured_points, refuse_absent_dims, roofline_svg
from ctc.errors import UsageError
from ctc.tasks import TASK_DECODE_STEP

__all__ = ["analysis_page", "analyze_artifact", "default_seq_len", "parse_dims"]


def parse_dims(items: Sequence[str]) -> dict[str, int]:
    """``["seq=128", "h=224"]`` -> ``{"seq": 128, "h": 224}`` (sizes of symbolic input dims)."""
    out: dict[str, int] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name.strip() or not value.strip().isdigit() or int(value) < 1:
            raise UsageError(f"--dim {item!r}: expected NAME=N with N >= 1, e.g. --dim seq=128")
        out[name.strip()] = int(value)
    return out


def default_seq_len(art: Any) -> int:
    """The sequence length an artifact was evaluated at (its report's protocol), else 128."""
    proto = art.report.get("protocol") or {}
    for role in ("evaluate", "calibrate"):
        n = (proto.get(role) or {}).get("seq_len")
        if n:
            return int(n)
    return 128


def _fpga_board(art: Any) -> str | None:
    for t in art.report.get("targets") or []:
        if t.get("kind") == "fpga" and t.get("board"):
            return str(t["board"])
    return None


def analyze_artifact(art: Any, kind: str, *, seq_len: int | None = None, batch: int | None = None,
                     dims: Mapping[str, int] | None = None, gpu: str | None = None, board: str | None = None,
                     remeasure: bool = False, profile: bool = False, progress: bool = False
                     ) -> tuple[Analysis, list[dict[str, Any]], str]:
    """(analysis, measured points, what was measured) of a loaded artifact on target ``kind``.

    ``profile``: run the artifact's compiled library for ``kind`` here (``ctc bench --profile``) and place its
    kernel times and latency on the plot; the phase measured is the one the bench runs (prefill/forward at
    ``seq_len``, or the decode step)."""
    if kind not in KINDS:
        target_peaks(kind)  # raises the error naming the kinds
    peaks = target_peaks(kind, remeasure=remeasure, gpu=gpu, board=board or _fpga_board(art))
    if profile:  # before anything loads the library (its fixed length below): a GPU library may not load here
        from ctc.targets import TARGETS

        if kind not in art.targets:
            raise UsageError(f"--profile times the artifact's compiled {kind} library, but it has "
                             f"{', '.join(art.targets) or 'no compiled target'}; add `target {kind}` to the recipe")
        why = TARGETS[kind].cannot_run_here()
        if why:
            raise UsageError(f"--profile: {why}")
        from ctc.driver import refuse_simulated

        refuse_simulated(art, kind)
    b_sym, s_sym = refuse_absent_dims(art.module, seq_len=seq_len, batch=batch)
    if batch is None:  # the batch the profiled library was built for (`batch=`, a tuned build), else 1
        batch = (art.fixed_batch(kind) if profile else None) or 1
    built = art.fixed_seq_len(kind) if seq_len is None and profile else None  # the length its library was built for
    limit = art.seq_limit()  # the model's positions bound the length any pass can have
    if seq_len is not None and limit is not None and seq_len > limit[0]:
        raise UsageError(f"--seq-len {seq_len}: the model takes at most {limit[0]} tokens ({limit[1]}); give "
                         f"--seq-len <= {limit[0]}")
    n = seq_len if seq_len is not None else built or min(default_seq_len(art), limit[0] if limit else 1 << 62)
    a = analyze_module(art.module, peaks, seq_len=n, batch=batch, dims=dims, name=str(art.report.get("name") or
                                                                                      art.path.name))
    if not profile:
        return a, [], ""
    from ctc.driver import bench_artifact
    from ctc.eval.latency import MIN_RUNS

    # only the dims the inputs have: the bench refuses a size for one they lack (an MLP's or CNN's fixed shapes)
    res = bench_artifact(art, target=kind, batch=batch if b_sym else None, seq_len=n if s_sym else None,
                         repeat=MIN_RUNS, threads=None, profile=10_000)
    phase = a.phases[0] if art.module.meta.get("task") != TASK_DECODE_STEP else a.phase("decode")
    pts = measured_points(phase, res.get("kernels", []), res.get("median_ms"))
    shapes = res.get("inputs") or f"batch {batch}, seq {n}"  # a model without text inputs: what bench made
    what = (f"measured: {kind} library on this machine, {phase.name} on {shapes}: median "
            f"{res['median_ms']} ms ({res['protocol']}); kernel times from its profiler, grouped by kernel name")
    return a, pts, what


PAGE_GENERATOR = "<meta name='generator' content='ctc analyze'>"  # how `ctc analyze --html` knows its own pages


def analysis_page(a: Analysis, points: Sequence[Mapping[str, Any]] = (), measured: str = "") -> str:
    """A self-contained HTML page: the roofs and their source, the roofline plot, and per phase the op groups."""
    from ctc.report_html import _CSS, _table

    p = a.peaks
    body = [f"<h1>{html.escape(a.model)} on {html.escape(p.target)}</h1>",
            _table(["", "roof"], [["device", p.device], ["fp32 roof", f"{p.flops['f32'] / 1e9:.1f} GFLOP/s"],
                              ["int8 roof", f"{p.flops['int8'] / 1e9:.1f} GOP/s"],
                              ["memory roof", f"{p.bandwidth / 1e9:.2f} GB/s"], ["source", p.source]]),
            roofline_svg({**a.to_json(), "measured": list(points)})]
    if measured:
        body.append(f'<p class="small">{html.escape(measured)}</p>')
    for ph in a.phases:
        t = ph.totals(p)
        body.append(f"<h2>{html.escape(ph.name)}</h2><p>{html.escape(ph.description)}: "
                    f"{t['flops'] / 1e9:.3f} GFLOP, {t['bytes'] / 1e6:.2f} MB moved, bound {t['bound_ms']:.4g} ms</p>")
        rows = [[r["op"], r["where"], r["count"], r["flops"], r["bytes"], round(r["intensity"], 3), r["bound"],
                 round(r["bound_ms"], 5)] for r in ph.groups(p)]
        body.append(_table(["op", "where", "n", "FLOPs", "bytes", "FLOP/B", "bound", "ms"], rows))
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'>{PAGE_GENERATOR}"
            f"<title>{html.escape(a.model)} roofline</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
