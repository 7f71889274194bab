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
      exports/<format>/    the model in a format other tools load (`emit mlir`, ...: ctc.exports)
      manifest.json        size and SHA-256 of every file above, written last (:mod:`ctc.manifest`)

Everything is first written to a marked temporary directory next to the destination and
swapped into place at the end; on any failure (SIGTERM and Ctrl-C included) the temporary
directory is removed and an existing destination is left untouched.  Which destinations may
be replaced, and the clean-up after runs killed outright, are :mod:`ctc.output_dir`'s rules.

Loading verifies what it reads against the manifest, parses and verifies the IR, and turns
every failure into an :class:`~ctc.errors.ArtifactError` naming the file and the reason.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ctc.errors import ArtifactError
from ctc.ir.graph import Module
from ctc.manifest import MANIFEST_FILE, Manifest, read_manifest, write_manifest
from ctc.output_dir import PARTIAL_MARKER, check_destination, make_temp_dir, remove_stale_temps, swap_into_place

IR_FILE = "ir.txt"
PARAMS_FILE = "params.safetensors"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
RECIPE_FILE = "recipe.ctc"
TOKENIZER_DIR = "tokenizer"
TARGETS_DIR = "targets"
EXPORTS_DIR = "exports"

__all__ = ["Artifact", "ArtifactError", "load", "read_report", "write_artifact"]


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


def _note(line: str) -> None:
    print(f"[ctc] note: {line}", file=sys.stderr, flush=True)


def write_artifact(
    dest: str | Path,
    *,
    module: Module,
    report: dict[str, Any],
    recipe_text: str | None = None,
    tokenizer_dir: str | Path | None = None,
    build_targets: Sequence[tuple[str, Callable[[Path], dict[str, Any]]]] = (),
    build_exports: Sequence[tuple[str, Callable[[Path], dict[str, Any]]]] = (),
    force: bool = False,
    protected: Iterable[tuple[str, str | Path]] = (),
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write the artifact for ``module`` to ``dest`` atomically; return ``dest`` (resolved).

    ``build_targets`` are ``(name, build(out_dir) -> summary)`` pairs; each writes its
    compiled library into ``targets/<name>/`` and its summary lands in the report; ``build_exports``
    likewise write ``exports/<format>/`` (after the parameters, which an export may refer to).
    ``dest`` must be replaceable (:func:`ctc.output_dir.check_destination`: missing, empty or an
    artifact ctc wrote; with ``force`` anything but a directory holding ``protected`` paths or the
    working directory); else :class:`~ctc.errors.OutputDirError` is raised before anything is written.
    """
    say = log or _note
    protected = list(protected)
    dest = check_destination(dest, force=force, protected=protected)
    created = [p for p in reversed(dest.parents) if not p.exists()]  # parents this call makes, outermost first
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        for line in remove_stale_temps(dest):
            say(line)
        tmp = make_temp_dir(dest)
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
        if build_exports:
            report.setdefault("exports", [])
        for name, build in build_exports:
            edir = tmp / EXPORTS_DIR / name
            edir.mkdir(parents=True, exist_ok=True)
            report["exports"].append({"format": name, "dir": f"{EXPORTS_DIR}/{name}", **(build(edir) or {})})
        (tmp / PARTIAL_MARKER).unlink()
        report["files"] = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) + [
            REPORT_JSON, REPORT_HTML, MANIFEST_FILE]
        (tmp / REPORT_JSON).write_text(json.dumps(_jsonable(report), indent=2, sort_keys=False) + "\n")
        (tmp / REPORT_HTML).write_text(render_html(report))
        write_manifest(tmp, str(report.get("ctc_version", "")))
        normal_permissions(tmp)
        # the build may have taken minutes: check the destination again just before replacing it
        check_destination(dest, force=force, protected=protected)
        swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    return dest


def normal_permissions(root: Path) -> None:
    """Give the artifact the permissions of ordinary files (mkdtemp makes it private to the user)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
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
            ["parameter bytes (unique: stored)", model.get("bytes_before"), model.get("bytes_after")],
            ["parameter bytes (total: once per reader)", model.get("read_bytes_before"), model.get("read_bytes_after")],
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
        for i, p in enumerate(passes):
            heal = (p.get("metrics") or {}).get("healing") or {}
            curve = [v for v in heal.get("loss_curve") or [] if isinstance(v, (int, float))]
            if len(curve) >= 2:
                stride = int(heal.get("curve_stride") or 1)
                body.append(line_chart_svg([k * stride + 1 for k in range(len(curve))], curve,
                                           title=f"healing loss, pass {i + 1} ({p.get('name', '')}): "
                                                 f"{heal.get('steps')} steps in {heal.get('seconds')} s",
                                           xlabel="step"))
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
    """A loaded artifact: the final module, its report, and ways to run it.

    Every file it reads is checked against the artifact's manifest first (the tokenizer and a
    target's library when they are first used)."""

    path: Path
    module: Module
    report: dict[str, Any]
    manifest: Manifest | None = field(default=None, repr=False)
    _runners: dict[str, Any] = field(default_factory=dict, repr=False)

    def _listed_dir(self, name: str) -> bool:
        if self.manifest is not None:
            return bool(self.manifest.names(name + "/"))
        return (self.path / name).is_dir()

    @property
    def tokenizer_dir(self) -> Path | None:
        return self.path / TOKENIZER_DIR if self._listed_dir(TOKENIZER_DIR) else None

    @property
    def targets(self) -> list[str]:
        if self.manifest is not None:
            return sorted({n.split("/")[1] for n in self.manifest.names(TARGETS_DIR + "/") if n.count("/") >= 2})
        d = self.path / TARGETS_DIR
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def tokenizer(self) -> Any:
        """The source model's tokenizer (transformers, loaded offline from the verified artifact files)."""
        if self.tokenizer_dir is None:
            raise ArtifactError(self.path, "has no tokenizer (the model was not captured from a tokenized model)")
        tdir = self.manifest.verify_dir(TOKENIZER_DIR) if self.manifest is not None else self.tokenizer_dir
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(tdir), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds; one error type for the caller
            raise ArtifactError(tdir, f"cannot be loaded as a tokenizer ({type(e).__name__}: {_first_line(e)})"
                                ) from None

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
        """The loaded compiled library of ``target`` (cached, verified against the manifest before it is
        loaded): callable on the model's inputs."""
        from ctc.targets import TARGETS

        if target not in self.targets:
            raise ArtifactError(self.path, f"has no compiled target {target!r} "
                                           f"(has: {', '.join(self.targets) or 'none'})")
        runner = self._runners.get(target)
        if runner is None:
            import importlib

            if target not in TARGETS:
                raise ArtifactError(self.path / TARGETS_DIR / target, "is a target kind this ctc does not know")
            tdir = self.path / TARGETS_DIR / target
            if self.manifest is not None:
                tdir = self.manifest.verify_dir(f"{TARGETS_DIR}/{target}")
            try:
                backend = importlib.import_module(TARGETS[target].backend)
            except ImportError as e:
                raise ArtifactError(tdir, f"needs backend {TARGETS[target].backend}, which cannot be imported "
                                          f"({_first_line(e)})") from None
            load_fn = getattr(backend, "load", None)
            if load_fn is None:
                raise ArtifactError(tdir, f"backend {TARGETS[target].backend} cannot load compiled libraries "
                                          "(no load())")
            try:
                runner = load_fn(tdir, self.module)
            except Exception as e:  # noqa: BLE001 - a backend's loader fails in its own ways; name the file
                raise ArtifactError(tdir, f"the compiled library cannot be loaded ({type(e).__name__}: "
                                          f"{_first_line(e)})") from None
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


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def open_artifact(path: str | Path) -> Manifest:
    """The manifest of the artifact directory ``path`` (checked: a directory ctc wrote)."""
    p = Path(path)
    if not p.exists():
        raise ArtifactError(p, "no such artifact directory")
    if not p.is_dir():
        raise ArtifactError(p, "is not a directory (an artifact is the directory `ctc compile` writes)")
    return read_manifest(p)


def _report(man: Manifest) -> dict[str, Any]:
    path = man.root / REPORT_JSON
    try:
        doc = json.loads(man.read_text(REPORT_JSON))
    except (ValueError, RecursionError) as e:
        raise ArtifactError(path, f"is not valid JSON ({_first_line(e)})") from None
    if not isinstance(doc, dict):
        raise ArtifactError(path, f"holds a JSON {type(doc).__name__}, not the report object")
    return doc


def read_report(path: str | Path) -> dict[str, Any]:
    """Only the verified report of an artifact (what `ctc show` prints; no parameters are read)."""
    return _report(open_artifact(path))


def _module(man: Manifest) -> Module:
    from safetensors.torch import load as load_safetensors

    from ctc.ir.text import TextParseError
    from ctc.ir.text import parse as parse_ir
    from ctc.ir.verify import VerifyError, verify

    ppath, ipath = man.root / PARAMS_FILE, man.root / IR_FILE
    data = man.read_bytes(PARAMS_FILE)
    try:
        params = load_safetensors(data)
    except Exception as e:  # noqa: BLE001 - safetensors/torch raise several kinds for a bad file
        raise ArtifactError(ppath, f"is not a readable safetensors file ({_first_line(e)})") from None
    text = man.read_text(IR_FILE)
    try:
        module = parse_ir(text, params, filename=str(ipath))
    except TextParseError as e:
        raise ArtifactError(ipath, f"does not parse as ctc IR: {e}") from None
    except RecursionError:
        raise ArtifactError(ipath, "nests too deeply to parse as ctc IR") from None
    except Exception as e:  # noqa: BLE001 - attribute/shape inference of a tampered file fails in many ways
        raise ArtifactError(ipath, f"cannot be read as ctc IR ({type(e).__name__}: {_first_line(e)})") from None
    try:
        verify(module)
    except VerifyError as e:
        raise ArtifactError(ipath, f"fails IR verification: {e}") from None
    except RecursionError:
        raise ArtifactError(ipath, "nests too deeply to verify") from None
    return module


def load(path: str | Path) -> Artifact:
    """Load an artifact directory written by `ctc compile`: ``ctc.load("out/minilm").run(...)``.

    The report, IR and parameters are checked against the manifest's hashes, the IR is parsed
    with the parameters and verified; any failure is an :class:`ArtifactError` naming the file."""
    man = open_artifact(path)
    report = _report(man)
    return Artifact(Path(path), _module(man), report, man)
