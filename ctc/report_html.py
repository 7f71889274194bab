"""report.html: the compile report as one self-contained page (inline CSS and SVG; no scripts, no external assets).

Sections, in reading order: status, model, checks, measurements (each metric's protocol folded under
it), the evaluation protocol as a table, the passes (long note lists folded), per block (what the
pipeline did to each block: bits, ranks, removal, sharing, by which pass; parameter bytes per block),
per-layer sensitivity where a pass measured one, the roofline on the first target (with the compile's
measured points), targets, exports and the recipe.  Values that are absolute paths are shown by their
last two components: a report is read on other machines.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["bar_chart_svg", "line_chart_svg", "render_html"]

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#11772d;font-weight:600}.fail{color:#b00020;font-weight:600}code,pre{background:#f6f6f6}
pre{padding:.6em;overflow:auto}.small{color:#666;font-size:.9em}details summary{cursor:pointer;color:#345}
"""

NOTES_SHOWN = 2  # notes of a pass shown before the rest are folded
PROTOCOL_FIELDS = (("text", "text"), ("split", "split"), ("tokenizer", "tokenizer"), ("windows", "windows"),
                   ("seq_len", "window length (tokens)"), ("stride", "stride"), ("selection", "selection"),
                   ("token_range", "token range"), ("batch_size", "batch size"), ("tokens", "tokens"),
                   ("samples_capped_from", "samples capped from"), ("decode_step", "decode step"))


_ABS_PATH = re.compile(r"(?<![\w.~/-])/(?:[\w.+@-]+/){2,}[\w.+@-]*")


def _short(v: Any) -> Any:
    """Absolute paths in a string as ``.../parent/name`` (install and home directories say nothing on another
    machine)."""
    if not isinstance(v, str) or "/" not in v:
        return v

    def cut(m: re.Match[str]) -> str:
        parts = [p for p in m.group(0).split("/") if p]
        return ".../" + "/".join(parts[-2:])
    return _ABS_PATH.sub(cut, v)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:.4f}".rstrip("0").rstrip(".") if "." in f"{v:.4f}" else str(v)
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10000:
        return f"{v:,}"
    if v is None:
        return "–"
    return str(_short(v))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], raw: Sequence[int] = ()) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"]
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            num = isinstance(c, (int, float)) and not isinstance(c, bool)
            text = str(c) if i in raw else html.escape(_fmt(c))
            cells.append(f"<td class=num>{text}</td>" if num else f"<td>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _fold(items: Sequence[str], shown: int = NOTES_SHOWN, what: str = "notes") -> str:
    """Escaped lines joined by <br>; past ``shown`` the rest folded under a details/summary."""
    esc = [html.escape(str(_short(x))) for x in items]
    if len(esc) <= shown + 1:
        return "<br>".join(esc)
    head = "<br>".join(esc[:shown])
    return (f"{head}<details><summary>{len(esc) - shown} more {what}</summary>" + "<br>".join(esc[shown:])
            + "</details>")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += _flatten(v, key + ".")
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, Mapping) for x in v):
            out.append((key, f"{len(v)} entries (report.json)"))
        elif isinstance(v, (list, tuple)):
            out.append((key, ", ".join(_fmt(x) for x in v)))
        else:
            out.append((key, v))
    return out


def bar_chart_svg(labels: Sequence[str], series: Mapping[str, Sequence[float]], *, title: str, unit: str = "",
                  width: int = 720, height: int = 220) -> str:
    """A grouped bar chart as inline SVG (one group per label, one bar per series)."""
    colors = ["#8da0cb", "#fc8d62", "#66c2a5", "#e78ac3"]
    names = list(series)
    vmax = max([v for s in series.values() for v in s if v is not None and math.isfinite(v)] + [1e-12])
    left, bottom, top = 56, 34, 26
    plot_w, plot_h = width - left - 10, height - bottom - top
    n = max(1, len(labels))
    gw = plot_w / n
    bw = max(1.0, gw * 0.8 / max(1, len(names)))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(title)}">',
             f'<text x="{left}" y="16" font-size="13">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#999"/>',
             f'<text x="4" y="{top + 10}" font-size="10">{html.escape(_fmt(vmax))}{html.escape(unit)}</text>']
    for i, lab in enumerate(labels):
        for j, name in enumerate(names):
            v = series[name][i]
            if v is None or not math.isfinite(v):
                continue
            h = plot_h * max(0.0, v) / vmax
            x = left + i * gw + gw * 0.1 + j * bw
            parts.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bw:.1f}" height="{h:.1f}" '
                         f'fill="{colors[j % len(colors)]}"><title>{html.escape(name)} {html.escape(lab)}: '
                         f'{html.escape(_fmt(v))}{html.escape(unit)}</title></rect>')
        if n <= 40 or i % max(1, n // 20) == 0:
            parts.append(f'<text x="{left + i * gw + gw / 2:.1f}" y="{top + plot_h + 14}" font-size="10" '
                         f'text-anchor="middle">{html.escape(lab)}</text>')
    for j, name in enumerate(names):
        x = left + plot_w - 150 + j * 75
        parts.append(f'<rect x="{x}" y="6" width="10" height="10" fill="{colors[j % len(colors)]}"/>'
                     f'<text x="{x + 14}" y="15" font-size="11">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def line_chart_svg(xs: Sequence[float], ys: Sequence[float], *, title: str, xlabel: str = "",
                   width: int = 720, height: int = 200) -> str:
    """One series as an inline SVG polyline with its range on the axes (e.g. a training loss curve)."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True) if math.isfinite(float(y))]
    left, bottom, top, right = 56, 30, 26, 12
    pw, ph = width - left - right, height - bottom - top
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(title)}">',
             f'<text x="{left}" y="16" font-size="13">{html.escape(title)}</text>']
    if pts:
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        sx = pw / (x1 - x0) if x1 > x0 else 0.0
        sy = ph / (y1 - y0) if y1 > y0 else 0.0
        poly = " ".join(f"{left + (x - x0) * sx:.1f},{top + ph - (y - y0) * sy:.1f}" for x, y in pts)
        parts += [f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#999"/>',
                  f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#999"/>',
                  f'<polyline fill="none" stroke="#fc8d62" stroke-width="1.5" points="{poly}"/>',
                  f'<text x="4" y="{top + 10}" font-size="10">{html.escape(_fmt(y1))}</text>',
                  f'<text x="4" y="{top + ph}" font-size="10">{html.escape(_fmt(y0))}</text>',
                  f'<text x="{left}" y="{height - 8}" font-size="10">{html.escape(_fmt(x0))}</text>',
                  f'<text x="{left + pw}" y="{height - 8}" font-size="10" text-anchor="end">'
                  f'{html.escape(_fmt(x1))} {html.escape(xlabel)}</text>']
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------- sections
def _model(model: Mapping[str, Any]) -> list[str]:
    return ["<h2>Model</h2>", _table(["", "original", "compressed"], [
        ["source", f"{model.get('kind', '')} {_short(model.get('ref', ''))}", ""],
        ["architecture / task", f"{model.get('arch', '')} / {model.get('task', '')}", ""],
        ["parameters", model.get("params_before"), model.get("params_after")],
        ["parameter bytes (unique: stored)", model.get("bytes_before"), model.get("bytes_after")],
        ["parameter bytes (total: once per reader)", model.get("read_bytes_before"), model.get("read_bytes_after")],
        ["nodes", model.get("nodes_before"), model.get("nodes_after")],
    ])]


def _checks(checks: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = [[c["check"], c.get("measured"), c.get("threshold"),
             f'<span class="{"pass" if c["passed"] else "fail"}">{"pass" if c["passed"] else "FAIL"}</span>',
             html.escape(c.get("note", ""))] for c in checks]
    return ["<h2>Checks</h2>", _table(["check", "measured", "threshold", "result", "note"], rows, raw=(3, 4))]


def _metrics(metrics: Mapping[str, Any]) -> list[str]:
    rows = []
    for k, v in metrics.items():
        how = v.get("protocol")
        cell = html.escape(str(v.get("doc", "")))
        if how:
            cell += f"<details><summary>how measured</summary>{html.escape(str(how))}</details>"
        rows.append([k, v.get("original"), v.get("compressed"), cell])
    return ["<h2>Measurements</h2>", _table(["metric", "original", "compressed", "what"], rows, raw=(3,))]


def _protocol(proto: Mapping[str, Any]) -> list[str]:
    roles = [r for r, v in proto.items() if isinstance(v, Mapping)]
    if not roles:
        return []
    known = {k for k, _ in PROTOCOL_FIELDS}
    extra = sorted({k for r in roles for k in proto[r] if k not in known and k not in ("source", "seconds")})
    rows = []
    for key, label in [*PROTOCOL_FIELDS, *((k, k) for k in extra)]:
        vals = [proto[r].get(key) for r in roles]
        if any(v is not None for v in vals):
            rows.append([label, *vals])
    return ["<h2>Evaluation protocol</h2>", _table(["", *roles], rows)]


def _passes(passes: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = []
    for p in passes:
        delta = p.get("ops_diff") or {}
        fid = (p.get("fidelity") or {}).get("cosine")
        dtext = ", ".join(f"{k} {'+' if v > 0 else ''}{v}" for k, v in delta.items() if v) or "no op changes"
        rows.append([html.escape(p.get("name", "")), html.escape(str(p.get("selector", "all"))),
                     p.get("params_before"), p.get("params_after"), p.get("bytes_after"),
                     html.escape(dtext), fid, p.get("seconds"), _fold([str(n) for n in p.get("notes", [])])])
    out = ["<h2>Passes</h2>", _table(["pass", "on", "params before", "params after", "bytes after", "ops changed",
                                      "cosine vs original", "time (s)", "notes"], rows, raw=(0, 1, 5, 8))]
    for i, p in enumerate(passes):
        heal = (p.get("metrics") or {}).get("healing") or {}
        curve = [v for v in heal.get("loss_curve") or [] if isinstance(v, (int, float))]
        if len(curve) >= 2:
            stride = int(heal.get("curve_stride") or 1)
            out.append(line_chart_svg([k * stride + 1 for k in range(len(curve))], curve,
                                      title=f"healing loss, pass {i + 1} ({p.get('name', '')}): "
                                            f"{heal.get('steps')} steps in {heal.get('seconds')} s", xlabel="step"))
    return out


def _blocks(r: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    blocks = r.get("blocks") or []
    per_block = r.get("per_block") or {}
    if not blocks and not per_block.get("blocks"):
        return out
    out.append("<h2>Per block</h2>")
    if blocks:
        rows = [[b["block"], b.get("bytes_before"), b.get("bytes_after"), b.get("quantized") or "–",
                 b.get("low_rank") or "–", "removed" if b.get("removed") else "–",
                 ", ".join(map(str, b.get("shares_with") or [])) or "–", b.get("other") or "–",
                 ", ".join(b.get("passes") or []) or "–"] for b in blocks]
        out.append(_table(["block", "bytes before", "bytes after", "quantized (bits)", "low rank", "removed",
                           "shares weights with", "other", "by"], rows))
    if per_block.get("blocks"):
        labels = [str(b) for b in per_block["blocks"]]
        series = {k: v for k, v in per_block.items() if k != "blocks" and isinstance(v, list)}
        out.append(bar_chart_svg(labels, series, title="parameter bytes per block", unit=" B"))
    return out


def _sensitivity(passes: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per-layer sensitivity a pass measured: remove-blocks' block influence, asvd's per-layer loss."""
    out: list[str] = []
    for i, p in enumerate(passes):
        m = p.get("metrics") or {}
        infl = m.get("block_influence")
        if isinstance(infl, Mapping) and infl:
            labels = sorted(infl, key=lambda b: int(b) if str(b).isdigit() else str(b))
            out.append(bar_chart_svg(labels, {"influence": [float(infl[b]) for b in labels]},
                                     title=f"block influence (1 - cosine of a block's input and output), pass "
                                           f"{i + 1} ({p.get('name', '')}; removed: "
                                           f"{', '.join(map(str, m.get('removed_blocks') or [])) or 'none'})"))
        layers = [x for x in m.get("asvd_layers") or [] if isinstance(x, Mapping) and x.get("loss") is not None]
        if layers:
            labels = [str(x["weight"]).rsplit(".", 2)[-2] if "." in str(x["weight"]) else str(x["weight"])
                      for x in layers]
            out.append(bar_chart_svg(labels, {"loss": [float(x["loss"]) for x in layers]},
                                     title=f"calibration loss with each layer factorised at its chosen ratio, pass "
                                           f"{i + 1} ({p.get('name', '')})"))
    return (["<h2>Per-layer sensitivity</h2>", *out]) if out else []


def _roofline(roof: Mapping[str, Any]) -> list[str]:
    if roof.get("error"):
        return ["<h2>Roofline</h2>", f'<p class="small">not drawn: {html.escape(str(roof["error"]))}</p>']
    from ctc.analysis.roofline import roofline_svg

    t = roof["target"]
    out = ["<h2>Roofline</h2>", roofline_svg(roof)]
    rows = [[ph["name"], ph["description"], ph["flops"], ph["bytes"], round(ph["intensity"], 3),
             round(ph["bound_ms"], 4), round(ph["memory_bound_ms"], 4)] for ph in roof["phases"]]
    out.append(_table(["phase", "what", "FLOPs", "bytes moved", "FLOP/byte", "roofline bound (ms)",
                       "of it memory-bound (ms)"], rows))
    meas = [[pt["label"], round(pt["ms"], 4), pt["flops_per_s"], round(pt["intensity"], 3)]
            for pt in roof.get("measured") or []]
    if meas:
        out.append(_table([f"measured ({roof.get('measured_phase', '')})", "ms", "FLOP/s attained", "FLOP/byte"],
                          meas))
    out.append(f'<p class="small">roofs: {html.escape(str(t["source"]))}. '
               + (html.escape(str(roof.get("measured_how", ""))) + ". " if roof.get("measured_how") else "")
               + "Model: every op its own kernel (no fusion); `ctc analyze` prints every op group.</p>")
    return out


def _targets(targets: Sequence[Mapping[str, Any]]) -> list[str]:
    out = ["<h2>Targets</h2>"]
    for t in targets:
        items = _flatten({k: v for k, v in t.items() if k not in ("kind", "dir")})
        rows = [[k, v] for k, v in items]
        head, rest = rows[:12], rows[12:]
        out.append(f"<h3>{html.escape(str(t.get('kind')))} <span class=small>({html.escape(str(t.get('dir')))})"
                   f"</span></h3>" + _table(["", ""], head))
        if rest:
            out.append(f"<details><summary>{len(rest)} more entries</summary>{_table(['', ''], rest)}</details>")
    return out


def _exports(exports: Sequence[Mapping[str, Any]]) -> list[str]:
    out = ["<h2>Exports</h2>"]
    for e in exports:
        rows = [[k, v] for k, v in _flatten({k: v for k, v in e.items() if k not in ("format", "dir")})]
        out.append(f"<h3>{html.escape(str(e.get('format')))}</h3><details><summary>{len(rows)} entries"
                   f"</summary>{_table(['', ''], rows)}</details>")
    return out


def render_html(report: Mapping[str, Any]) -> str:
    """A self-contained HTML page for a compile report (no scripts, no external assets)."""
    r = report
    title = f"ctc report: {r.get('name', 'artifact')}"
    body = [f"<h1>{html.escape(title)}</h1>"]
    status = r.get("passed")
    if status is not None:
        cls, word = ("pass", "all checks passed") if status else ("fail", "some checks FAILED")
        body.append(f'<p class="{cls}">{word}</p>')
    if r.get("model"):
        body += _model(r["model"])
    if r.get("checks"):
        body += _checks(r["checks"])
    if r.get("metrics"):
        body += _metrics(r["metrics"])
    if isinstance(r.get("protocol"), Mapping):
        body += _protocol(r["protocol"])
    if r.get("passes"):
        body += _passes(r["passes"])
    body += _blocks(r)
    body += _sensitivity(r.get("passes") or [])
    if isinstance(r.get("roofline"), Mapping):
        body += _roofline(r["roofline"])
    if r.get("targets"):
        body += _targets(r["targets"])
    if r.get("exports"):
        body += _exports(r["exports"])
    if r.get("recipe_text"):
        body.append("<h2>Recipe</h2><pre>" + html.escape(r["recipe_text"]) + "</pre>")
    if r.get("files"):
        body.append('<p class="small">files: ' + html.escape(", ".join(r["files"])) + "</p>")
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
