"""The compiled artifact: a directory written atomically, and ``ctc.load(dir)`` to use it.

Layout::

    out/NAME/
      ir.txt               final IR text (the loadable form, with params.safetensors)
      params.safetensors   parameters of the final module
      recipe.ctc           the recipe as the user wrote it
      report.json          what each pass did, measured accuracy/size/latency, check results
      report.html          the same, self-contained (inline CSS and SVG, no external assets)
      tokenizer/           tokenizer files of the source model, when it has one
      targets/<kind>/      per-target compiled library, written by the backend's build()

Everything is first written to a temporary directory next to the destination and renamed
into place at the end; on any failure the temporary directory is removed and an existing
destination is left untouched.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ctc.ir.graph import Module

IR_FILE = "ir.txt"
PARAMS_FILE = "params.safetensors"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
RECIPE_FILE = "recipe.ctc"
TOKENIZER_DIR = "tokenizer"
TARGETS_DIR = "targets"


class ArtifactError(Exception):
    """An artifact directory is missing files or cannot be read."""


# --------------------------------------------------------------------------- writing
def save_params(params: Mapping[str, torch.Tensor], path: Path) -> None:
    """Parameters as safetensors (shared or strided tensors are copied first)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in params.items()}
    seen: set[tuple[int, int]] = set()
    for k, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and (key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            tensors[k] = t.clone()
        seen.add(key)
    save_file(tensors, str(path), metadata={"format": "ctc"})


def module_ir_text(module: Module) -> str:
    from ctc.ir.text import print_module

    return print_module(module)


def write_artifact(
    dest: str | Path,
    *,
    module: Module,
    report: dict[str, Any],
    recipe_text: str | None = None,
    tokenizer_dir: str | Path | None = None,
    build_targets: Sequence[tuple[str, Callable[[Path], dict[str, Any]]]] = (),
) -> Path:
    """Write the artifact for ``module`` to ``dest`` atomically; return ``dest``.

    ``build_targets`` are ``(name, build(out_dir) -> summary)`` pairs; each writes its
    compiled library into ``targets/<name>/`` and its summary lands in the report.
    """
    dest = Path(dest).resolve()
    if dest.exists() and not dest.is_dir():
        raise ArtifactError(f"{dest} exists and is not a directory")
    created = [p for p in reversed(dest.parents) if not p.exists()]  # parents this call makes, outermost first
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except BaseException:
        _remove_empty(created)
        raise
    try:
        (tmp / IR_FILE).write_text(module_ir_text(module))
        save_params(module.params, tmp / PARAMS_FILE)
        if recipe_text is not None:
            (tmp / RECIPE_FILE).write_text(recipe_text)
        if tokenizer_dir is not None:
            copy_tokenizer(Path(tokenizer_dir), tmp / TOKENIZER_DIR)
        report.setdefault("targets", [])  # filled in place: the caller's report gains targets and files
        for name, build in build_targets:
            tdir = tmp / TARGETS_DIR / name
            tdir.mkdir(parents=True, exist_ok=True)
            summary = build(tdir)
            report["targets"].append({"kind": name, "dir": f"{TARGETS_DIR}/{name}", **(summary or {})})
        report["files"] = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) + [
            REPORT_JSON, REPORT_HTML]
        (tmp / REPORT_JSON).write_text(json.dumps(_jsonable(report), indent=2, sort_keys=False) + "\n")
        (tmp / REPORT_HTML).write_text(render_html(report))
        _normal_permissions(tmp)
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    return dest


def _normal_permissions(root: Path) -> None:
    """Give the artifact the permissions of ordinary files (mkdtemp makes it private to the user)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [root, *root.rglob("*")]:
        if p.is_dir():
            p.chmod(0o777 & ~mask)
        elif p.is_file():
            p.chmod((p.stat().st_mode | 0o666) & ~mask & 0o7777)


def _remove_empty(dirs: Sequence[Path]) -> None:
    """Remove directories this write created (innermost first) if they are empty."""
    for d in reversed(list(dirs)):
        try:
            d.rmdir()
        except OSError:
            break


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``; an existing ``dest`` is replaced only once ``tmp`` is complete."""
    if not dest.exists():
        os.rename(tmp, dest)
        return
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                    "merges.txt", "tokenizer.model", "added_tokens.json", "config.json")


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of a model directory (those that exist) into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    return str(x)


# --------------------------------------------------------------------------- report.html
_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#11772d;font-weight:600}.fail{color:#b00020;font-weight:600}code,pre{background:#f6f6f6}
pre{padding:.6em;overflow:auto}.small{color:#666;font-size:.9em}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:.4f}".rstrip("0").rstrip(".") if "." in f"{v:.4f}" else str(v)
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10000:
        return f"{v:,}"
    if v is None:
        return "–"
    return str(v)


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


def render_html(report: Mapping[str, Any]) -> str:
    """A self-contained HTML page for a compile report (no scripts, no external assets)."""
    r = report
    title = f"ctc report: {r.get('name', 'artifact')}"
    body = [f"<h1>{html.escape(title)}</h1>"]
    status = r.get("passed")
    if status is not None:
        cls, word = ("pass", "all checks passed") if status else ("fail", "some checks FAILED")
        body.append(f'<p class="{cls}">{word}</p>')
    model = r.get("model", {})
    if model:
        body.append("<h2>Model</h2>")
        body.append(_table(["", "original", "compressed"], [
            ["source", f"{model.get('kind', '')} {model.get('ref', '')}", ""],
            ["architecture / task", f"{model.get('arch', '')} / {model.get('task', '')}", ""],
            ["parameters", model.get("params_before"), model.get("params_after")],
            ["parameter bytes", model.get("bytes_before"), model.get("bytes_after")],
            ["nodes", model.get("nodes_before"), model.get("nodes_after")],
        ]))
    checks = r.get("checks", [])
    if checks:
        body.append("<h2>Checks</h2>")
        rows = [[c["check"], c.get("measured"), c.get("threshold"),
                 f'<span class="{"pass" if c["passed"] else "fail"}">{"pass" if c["passed"] else "FAIL"}</span>',
                 html.escape(c.get("note", ""))] for c in checks]
        body.append(_table(["check", "measured", "threshold", "result", "note"], rows, raw=(3, 4)))
    metrics = r.get("metrics", {})
    if metrics:
        body.append("<h2>Measurements</h2>")
        rows = [[k, v.get("original"), v.get("compressed"), v.get("doc", "")] for k, v in metrics.items()]
        body.append(_table(["metric", "original", "compressed", "what"], rows))
    proto = r.get("protocol")
    if proto:
        body.append('<p class="small">protocol: ' + html.escape(json.dumps(proto)) + "</p>")
    passes = r.get("passes", [])
    if passes:
        body.append("<h2>Passes</h2>")
        rows = []
        for p in passes:
            delta = p.get("ops_diff") or {}
            fid = (p.get("fidelity") or {}).get("cosine")
            dtext = ", ".join(f"{k} {'+' if v > 0 else ''}{v}" for k, v in delta.items() if v) or "no op changes"
            notes = "<br>".join(html.escape(str(n)) for n in p.get("notes", []))
            rows.append([html.escape(p.get("name", "")), html.escape(str(p.get("selector", "all"))),
                         p.get("params_before"), p.get("params_after"), p.get("bytes_after"),
                         html.escape(dtext), fid, p.get("seconds"), notes])
        body.append(_table(["pass", "on", "params before", "params after", "bytes after", "ops changed",
                            "cosine vs original", "time (s)", "notes"], rows, raw=(0, 1, 5, 8)))
    per_block = r.get("per_block")
    if per_block and per_block.get("blocks"):
        body.append("<h2>Per block</h2>")
        labels = [str(b) for b in per_block["blocks"]]
        series = {k: v for k, v in per_block.items() if k != "blocks" and isinstance(v, list)}
        body.append(bar_chart_svg(labels, series, title="parameter bytes per block", unit=" B"))
    targets = r.get("targets", [])
    if targets:
        body.append("<h2>Targets</h2>")
        rows = [[t.get("kind"), t.get("dir"), html.escape(json.dumps({k: v for k, v in t.items()
                                                                      if k not in ("kind", "dir")}))] for t in targets]
        body.append(_table(["target", "directory", "summary"], rows, raw=(2,)))
    if r.get("recipe_text"):
        body.append("<h2>Recipe</h2><pre>" + html.escape(r["recipe_text"]) + "</pre>")
    if r.get("files"):
        body.append('<p class="small">files: ' + html.escape(", ".join(r["files"])) + "</p>")
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# --------------------------------------------------------------------------- loading
@dataclass
class Artifact:
    """A loaded artifact: the final module, its report, and ways to run it."""

    path: Path
    module: Module
    report: dict[str, Any]
    _runners: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def tokenizer_dir(self) -> Path | None:
        d = self.path / TOKENIZER_DIR
        return d if d.is_dir() else None

    @property
    def targets(self) -> list[str]:
        d = self.path / TARGETS_DIR
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def tokenizer(self) -> Any:
        """The source model's tokenizer (transformers, loaded offline from the artifact)."""
        if self.tokenizer_dir is None:
            raise ArtifactError(f"{self.path} has no tokenizer (the model was not captured from a tokenized model)")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_dir), local_files_only=True)

    def run(self, inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor], *, target: str | None = None
            ) -> list[torch.Tensor]:
        """Run the model: through a compiled target's library when ``target`` is given, else the torch backend
        (the reference interpreter when no torch backend is installed)."""
        if target is not None:
            return self._run_target(target, inputs)
        runner = self._runners.get("torch")
        if runner is None:
            runner = torch_runner(self.module)
            self._runners["torch"] = runner
        with torch.no_grad():
            out = runner(inputs)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def _run_target(self, target: str, inputs: Any) -> list[torch.Tensor]:
        out = self.runner(target)(inputs)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def runner(self, target: str) -> Any:
        """The loaded compiled library of ``target`` (cached): callable on the model's inputs."""
        from ctc.targets import TARGETS

        if target not in self.targets:
            raise ArtifactError(f"artifact {self.path} has no compiled target {target!r} "
                                f"(has: {', '.join(self.targets) or 'none'})")
        runner = self._runners.get(target)
        if runner is None:
            import importlib

            backend = importlib.import_module(TARGETS[target].backend)
            load = getattr(backend, "load", None)
            if load is None:
                raise ArtifactError(f"backend {TARGETS[target].backend} cannot load compiled libraries (no load())")
            runner = load(self.path / TARGETS_DIR / target, self.module)
            self._runners[target] = runner
        return runner


def torch_runner(module: Module) -> Callable[[Any], Any]:
    """A callable running ``module`` through the torch backend (an fx GraphModule), else the interpreter."""
    try:
        from ctc.backends.torch_fx import to_graph_module
    except ImportError:
        from ctc.ir.interpreter import interpret

        return lambda inputs: interpret(module, inputs)
    gm = to_graph_module(module)

    def run_gm(inputs: Any) -> Any:
        if isinstance(inputs, Mapping):
            inputs = [inputs[v.name] for v in module.inputs]
        return gm(*inputs)

    return run_gm


def load(path: str | Path) -> Artifact:
    """Load an artifact directory written by `ctc compile`: ``ctc.load("out/minilm").run(...)``."""
    from safetensors.torch import load_file

    from ctc.ir.text import parse as parse_ir

    p = Path(path)
    if not p.is_dir():
        raise ArtifactError(f"artifact directory not found: {p}")
    for f in (IR_FILE, PARAMS_FILE, REPORT_JSON):
        if not (p / f).is_file():
            raise ArtifactError(f"{p} is not a ctc artifact: {f} is missing")
    params = load_file(str(p / PARAMS_FILE))
    module = parse_ir((p / IR_FILE).read_text(), params, filename=str(p / IR_FILE))
    report = json.loads((p / REPORT_JSON).read_text())
    return Artifact(p, module, report)
