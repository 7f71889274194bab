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

import functools
import json
import math
import os
import re
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
from ctc.report_html import bar_chart_svg, line_chart_svg, render_html  # noqa: F401 - the report page, re-exported

IR_FILE = "ir.txt"
PARAMS_FILE = "params.safetensors"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
RECIPE_FILE = "recipe.ctc"
TOKENIZER_DIR = "tokenizer"
TARGETS_DIR = "targets"
EXPORTS_DIR = "exports"

__all__ = ["Artifact", "ArtifactError", "InputChecker", "load", "read_report", "write_artifact"]


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

    @functools.cached_property
    def input_checker(self) -> InputChecker:
        """What :meth:`run` checks every call's inputs with (built once)."""
        return InputChecker(self.module, self.path / TOKENIZER_DIR / "config.json" if self.tokenizer_dir else None)

    def tokenizer(self) -> Any:
        """The source model's tokenizer (transformers, loaded offline from the verified artifact files)."""
        if self.tokenizer_dir is None:
            raise ArtifactError(self.path, "has no tokenizer (its model came without one), so text cannot be turned "
                                           "into its inputs: give input tensors (`ctc run --input FILE.safetensors`), "
                                           "or put the model's tokenizer files beside it and compile again")
        tdir = self.manifest.verify_dir(TOKENIZER_DIR) if self.manifest is not None else self.tokenizer_dir
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(tdir), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds; one error type for the caller
            raise ArtifactError(tdir, f"cannot be loaded as a tokenizer ({type(e).__name__}: {_first_line(e)})"
                                ) from None

    def run(self, inputs: Mapping[str, Any] | Sequence[Any] | torch.Tensor, *, target: str | None = None
            ) -> list[torch.Tensor]:
        """Run the model: through a compiled target's library when ``target`` is given, else the torch backend
        (the reference interpreter when no torch backend is installed); returns the outputs, a list of tensors.

        ``inputs``: by name (a dict, or a tokenizer's ``BatchEncoding``; names the model does not take are
        ignored), a list in the model's input order, or one tensor; each a torch tensor, numpy array or nested
        list (integers of another width and bools are cast to the declared integer type).  A library built for
        one length takes exactly that length (:meth:`fixed_seq_len`).  The inputs are checked first
        (:class:`InputChecker`, or the compiled library's own checks, the same ones): a wrong one is a
        :class:`~ctc.errors.UsageError` naming it."""
        if isinstance(inputs, (str, bytes)):
            from ctc.errors import UsageError

            raise UsageError("inputs are token tensors, not text: tokenize it first (ids = art.tokenizer()(text, "
                             "return_tensors='pt'); art.run(dict(ids))), or use `ctc run ART --text`")
        if target is not None:  # the library binds the caller's own tensors (zero-copy, on their device)
            runner = self.runner(target)
            if not getattr(runner, "checks_inputs", False):  # a runner that checks them itself is not doubled
                inputs = self.input_checker(inputs)[1]
            out = runner(inputs)
            return list(out) if isinstance(out, (list, tuple)) else [out]
        checked, _ = self.input_checker(inputs)
        runner = self._runners.get("torch")
        if runner is None:
            runner = torch_runner(self.module)
            self._runners["torch"] = runner
        with torch.no_grad():
            out = runner(checked)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def generate(self, prompt: str, max_new_tokens: int, *, target: str | None = None,
                 stop_at_eos: bool = True) -> str:
        """Greedy continuation of ``prompt`` (text) by a decoder artifact (``model ... decode=LEN``), as
        ``ctc run ART --generate N --text PROMPT`` prints it after the prompt: ``target``'s compiled library, else the
        torch backend; stops at the tokenizer's end-of-sequence token (not returned) unless ``stop_at_eos`` is
        False.  Token ids and timings: :func:`ctc.generate.generate_text` / :func:`ctc.generate.greedy_generate`."""
        from ctc.generate import generate_text

        return generate_text(self, prompt, max_new_tokens, target=target, stop_at_eos=stop_at_eos).text

    def fixed_seq_len(self, target: str | None = None) -> int | None:
        """The sequence length every call must have: the IR's own (a number on the first input's axis 1), or,
        with ``target``, the one its library was built for (the runner's ``static_dims``: ``seq_len=`` on the
        target line, a tuned build, an fpga design); None when any length runs, and for a model without text
        inputs (no tokenizer and no ``[batch, seq]`` integer ids first: a CNN) or a decode step (one token a call)."""
        from ctc.ir.types import INT_DTYPES
        from ctc.tasks import TASK_DECODE_STEP

        if not self.module.inputs or self.module.meta.get("task") == TASK_DECODE_STEP:
            return None
        first = self.module.inputs[0].type
        token_ids = first.rank == 2 and first.dtype in INT_DTYPES  # a .pt2 text model has no tokenizer
        if self.tokenizer_dir is None and not token_ids:
            return None
        shape = first.shape
        if len(shape) > 1 and isinstance(shape[1], int):
            return shape[1]
        if target is None:
            return None
        from ctc.analysis.roofline import input_symbols

        seq = input_symbols(self.module)[1]  # `seq`, or a .pt2 program's d1
        fixed = (getattr(self.runner(target), "static_dims", None) or {}).get(seq) if seq else None
        return int(fixed) if fixed else None

    def seq_limit(self) -> tuple[int, str] | None:
        """(the longest sequence the model takes, why): a table the IR indexes by position (HF encoders'
        ``position_ids``), or the source model's configured positions, the smaller; None when neither bounds it."""
        from ctc.analysis.roofline import input_symbols

        seq = input_symbols(self.module)[1]
        return self.input_checker.limits.get(seq) if seq else None

    def fixed_batch(self, target: str) -> int | None:
        """The batch size ``target``'s library was built for (``batch=`` on its target line, a tuned build), None
        when it takes any batch or the model's inputs have no symbolic batch dim."""
        from ctc.analysis.roofline import input_symbols

        b_sym = input_symbols(self.module)[0]  # `batch`, or a .pt2 program's d0
        fixed = (getattr(self.runner(target), "static_dims", None) or {}).get(b_sym) if b_sym else None
        return int(fixed) if fixed else None

    def runner(self, target: str) -> Any:
        """The loaded compiled library of ``target`` (cached, verified against the manifest before it is
        loaded): callable on the model's inputs."""
        from ctc.targets import TARGETS

        if target not in self.targets:
            if target not in TARGETS:
                raise ArtifactError(self.path, f"has no compiled target {target!r}: {target!r} is not a target kind "
                                               f"(kinds: {', '.join(TARGETS)})")
            raise ArtifactError(self.path, f"has no compiled target {target!r} "
                                           f"(has: {', '.join(self.targets) or 'none'}): add `target {target}` to the "
                                           "recipe and compile again, or leave --target out to use the torch backend")
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


class InputChecker:
    """Checks a model's inputs before any backend runs them: ``InputChecker(module, config)(inputs)``.

    Why: a backend given a wrong input fails deep inside an op with a traceback, or, compiled, reads past a
    table and returns garbage or crashes.  Checked, each a :class:`~ctc.errors.UsageError` naming the input:
    every input given (extra names, such as a tokenizer's ``token_type_ids``, are ignored), its kind (no float
    token ids), rank, fixed sizes and symbols agreeing across inputs (the compiled runner's own checks, from
    :mod:`ctc.backends.tvm.inputs`), no empty symbolic axis, token ids inside the embedding table they index,
    a decode step's cache positions inside its KV cache (written in place), and ``seq`` within the model's
    positions (:func:`ctc.positions.model_limits`: the config's, or the IR's).  What depends only
    on the module is worked out once, here."""

    def __init__(self, module: Module, config: Path | None = None):
        from ctc.backends.tvm.inputs import input_specs
        from ctc.positions import index_bounds, model_limits

        self.names = [v.name for v in module.inputs]
        self.specs = input_specs({"inputs": module.input_specs()})
        self.limits = model_limits(module, config)
        bounds = index_bounds(module)
        # input index -> (the size of the smallest table it indexes, what its values are)
        self.bounds = {i: bounds[n] for i, n in enumerate(self.names) if n in bounds}

    def __call__(self, inputs: Any) -> tuple[list[torch.Tensor], list[Any]]:
        """``inputs`` (by name, in order, or one tensor) checked; returns ``(tensors, given)``: CPU tensors in the
        module's dtypes for the torch backend, and the caller's own objects in input order for a compiled
        library (which binds them itself)."""
        from ctc.backends.tvm.inputs import as_cpu_tensor, check_shape
        from ctc.errors import UsageError
        from ctc.positions import check_index_values, check_symbol_limits

        names = self.names
        if isinstance(inputs, Mapping):
            missing = [n for n in names if n not in inputs]
            if missing:
                raise UsageError(f"missing input {missing[0]!r}: the model takes {', '.join(names)} (by name, or "
                                 "a list in this order)")
            given = [inputs[n] for n in names]
        else:
            given = [inputs] if isinstance(inputs, torch.Tensor) or not isinstance(inputs, Sequence) else list(inputs)
            if len(given) != len(names):
                raise UsageError(f"the model takes {len(names)} inputs ({', '.join(names)}), got {len(given)}")
        sizes: dict[str, tuple[int, str]] = {}
        tensors = []
        for spec, x in zip(self.specs, given, strict=True):
            t = as_cpu_tensor(spec, x)
            check_shape(spec, tuple(t.shape), sizes)  # rank, sizes, no empty symbolic axis
            tensors.append(t if t.dtype == spec.torch_dtype else t.to(spec.torch_dtype))
        check_symbol_limits(self.limits, sizes)
        for i, (size, what) in self.bounds.items():
            # numpy's reductions run on the calling thread (torch's may start its pool)
            check_index_values(names[i], tensors[i].numpy(), size, what)
        return tensors, given


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
    """The first line of a library's exception, without its terminal styling (torch.load bolds a warning)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    text = plain.splitlines()[0] if plain else type(e).__name__
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
