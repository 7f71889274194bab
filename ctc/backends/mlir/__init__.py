"""MLIR backend: a ctc module as MLIR through torch-mlir's FX importer, checked by compiling it with IREE.

The module becomes a ``torch.fx`` graph (:func:`ctc.backends.torch_fx.to_fx`, every op through
its reference or its export form in :mod:`ctc.backends.mlir.forms`), ``torch.export`` traces it
to ATen at fixed shapes, and torch-mlir imports that program as MLIR:

* ``model.torch.mlir``: the torch dialect as the FX importer writes it (``iree-compile
  --iree-input-type=torch`` takes it);
* ``model.linalg.mlir``: the same lowered by torch-mlir to linalg-on-tensors (any MLIR
  pipeline, e.g. ``iree-compile`` without flags).

Weights are not baked into the text: the function ``@main`` takes the model inputs and then
every parameter it reads, in the order ``signature.json`` lists, and the tensors live in a
safetensors file under the same names (the artifact's own ``params.safetensors`` when the export
sits inside an artifact).  Integer weights stay integer (``i8``, int4 packed in ``ui8``) and are
dequantized inside the function.  :class:`IreeFunction` compiles an export for this CPU and runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctc.exports import ExportError

__all__ = ["IreeFunction", "MlirExportError", "exportable_graph", "lower", "write"]

SIGNATURE = "signature.json"
FILES = {"torch": "model.torch.mlir", "linalg": "model.linalg.mlir"}
_OUTPUT_TYPE = {"torch": "raw", "linalg": "linalg-on-tensors"}


class MlirExportError(ExportError):
    """torch-mlir cannot take the module (names the ctc ops it failed on)."""


def exportable_graph(module: Any) -> Any:
    """The module as a GraphModule whose placeholders are the inputs, then the parameters (export forms)."""
    from ctc.backends.mlir.forms import EXPORT_FORMS
    from ctc.backends.torch_fx import to_fx

    return to_fx(module, check_shapes=False, impls=EXPORT_FORMS, params_as_inputs=True)


def _feed(module: Any, gm: Any, example: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple([example[v.name] for v in module.inputs] + [module.params[n] for n in gm.param_inputs])


def _torch_mlir_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-mlir")
    except PackageNotFoundError:
        return "unknown"


class LoweringError(Exception):
    """torch-mlir failed; carries the MLIR diagnostics it printed."""

    def __init__(self, cause: BaseException, diagnostics: str):
        super().__init__(f"{cause}\n{diagnostics}")
        self.diagnostics = diagnostics


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Any]:
    """Collect what native code writes to file descriptor 2 (MLIR prints its diagnostics there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as buf:
        os.dup2(buf.fileno(), 2)
        box: dict[str, str] = {"text": ""}
        try:
            yield box
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            box["text"] = buf.read().decode("utf-8", "replace")


def lower(program: Any, dialect: str) -> str:
    """MLIR text of an ExportedProgram in ``dialect`` (torch | linalg); failures raise :class:`LoweringError`
    with torch-mlir's diagnostics."""
    from torch_mlir import fx

    with warnings.catch_warnings(), _captured_stderr() as err:
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree deprecation notes inside torch-mlir
        try:
            return str(fx.export_and_import(program, output_type=_OUTPUT_TYPE[dialect], func_name="main"))
        except Exception as e:  # noqa: BLE001 - re-raised with the diagnostics once stderr is restored
            failure: BaseException | None = e
        else:  # pragma: no cover - the return above leaves on success
            failure = None
    assert failure is not None
    raise LoweringError(failure, err["text"]) from None


def _first_error_line(e: BaseException) -> str:
    text = str(e)
    m = re.search(r"failed to legalize operation '([^']+)'", text)
    if m:
        return f"torch-mlir has no lowering for {m.group(1)}"
    lines = [ln.strip() for ln in text.splitlines() if re.search(r"\berror\b", ln, re.I) and ln.strip()]
    text = lines[0] if lines else (text.strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= 240 else text[:240] + "..."


def _export(fn: Any, args: tuple[Any, ...]) -> Any:
    return torch.export.export(fn, args, strict=False)


class _OneOp(torch.nn.Module):
    def __init__(self, impl: Any, kwargs: dict[str, Any]):
        super().__init__()
        self.impl, self.kw = impl, kwargs

    def forward(self, *xs: torch.Tensor) -> Any:
        return self.impl(*xs, **self.kw)


def unsupported_ops(module: Any, example: Mapping[str, torch.Tensor], dialects: Sequence[str]
                    ) -> list[dict[str, Any]]:
    """The ctc ops torch-mlir fails on, each tried alone on its first node's real operands.

    Returns ``{"op", "nodes", "scope", "dialect", "error"}`` per failing op kind."""
    import torch.fx as fx

    gm = exportable_graph(module)
    seen: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        op = node.meta.get("ctc_op")
        if op is not None:
            counts[op] = counts.get(op, 0) + 1
            seen.setdefault(op, node)
    captured: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node: Any) -> Any:
            op = node.meta.get("ctc_op")
            if op is not None and seen.get(op) is node:
                args, kwargs = self.fetch_args_kwargs_from_env(node)
                captured[op] = (args, dict(kwargs))
            return super().run_node(node)

    with torch.no_grad():
        Recorder(gm).run(*_feed(module, gm, example))
    bad = []
    for op, node in seen.items():
        if op not in captured:
            continue
        args, kwargs = captured[op]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if len(tensors) != len(args):  # a non-tensor operand: try it as a bound argument
            continue
        for dialect in dialects:
            try:
                lower(_export(_OneOp(node.target, kwargs), tuple(tensors)), dialect)
            except Exception as e:  # noqa: BLE001 - torch.export and torch-mlir raise many kinds
                bad.append({"op": op, "nodes": counts[op], "scope": node.meta.get("ctc_scope") or "<root>",
                            "dialect": dialect, "error": _first_error_line(e)})
                break
    return bad


def _unsupported_error(module: Any, example: Mapping[str, torch.Tensor], dialects: Sequence[str], stage: str,
                       cause: BaseException) -> MlirExportError:
    bad = unsupported_ops(module, example, dialects)
    if not bad:
        return MlirExportError(f"torch-mlir failed while {stage}: {_first_error_line(cause)} (no single ctc op "
                               "fails alone; the combination does)")
    lines = [f"  {b['op']} ({b['nodes']} node{'s' if b['nodes'] != 1 else ''}, e.g. {b['scope']}; "
             f"{b['dialect']}): {b['error']}" for b in bad]
    names = ", ".join(sorted({b["op"] for b in bad}))
    return MlirExportError(f"torch-mlir cannot take these ctc ops: {names}\n" + "\n".join(lines)
                           + "\n  hint: compile without the passes that introduce them, or emit only the torch "
                             "dialect (`emit mlir dialect=torch`) when only the linalg lowering failed")


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _fit(module: Any, example: Mapping[str, torch.Tensor], batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    """``example`` with its [batch, seq] inputs repeated or cut to ``batch`` rows and ``seq_len`` tokens, on the
    axes the module leaves symbolic: a fixed axis (an MLP's [4, 32] input) keeps the size it was captured with."""
    types = {v.name: v.type for v in module.inputs}
    out = {}
    for k, v in example.items():
        shape = types[k].shape if k in types else ()
        if v.dim() == 2 and len(shape) == 2:
            if seq_len and not isinstance(shape[1], int):
                v = v.repeat(1, -(-seq_len // v.shape[1]))[:, :seq_len]
            if not isinstance(shape[0], int):
                v = v.repeat(-(-batch // v.shape[0]), 1)[:batch]
        out[k] = v.contiguous()
    return out


def write(source: Any, out_dir: Path, options: Any) -> dict[str, Any]:
    """Write ``model.torch.mlir`` / ``model.linalg.mlir`` and ``signature.json`` into ``out_dir``; verify with IREE."""
    module = source.module
    dialects = ["torch", "linalg"] if options.dialect == "both" else [options.dialect]
    example = _fit(module, source.example, options.batch, options.seq_len)
    gm = exportable_graph(module)
    feed = _feed(module, gm, example)
    t0 = time.perf_counter()
    try:
        program = _export(gm, feed)
    except Exception as e:  # noqa: BLE001 - torch.export raises many kinds; name the ops instead
        raise _unsupported_error(module, example, dialects, "tracing the module with torch.export", e) from None
    texts: dict[str, str] = {}
    for d in dialects:
        try:
            texts[d] = lower(program, d)
        except Exception as e:  # noqa: BLE001
            raise _unsupported_error(module, example, [d], f"importing/lowering to {d}", e) from None
    for d, text in texts.items():
        (out_dir / FILES[d]).write_text(text)
    params_file = _params_file(source, gm.param_inputs, out_dir)
    sig = {
        "function": "main",
        "inputs": [{"name": v.name, "shape": list(example[v.name].shape), "dtype": _dtype_name(example[v.name])}
                   for v in module.inputs],
        "params": [{"name": n, "shape": list(module.params[n].shape), "dtype": _dtype_name(module.params[n])}
                   for n in gm.param_inputs],
        "outputs": list(module.output_names),
        "params_file": params_file,
        "files": {d: FILES[d] for d in dialects},
        "torch_mlir": _torch_mlir_version(),
        "note": "call @main with the inputs, then every parameter in this order (tensors of params_file by name)",
    }
    (out_dir / SIGNATURE).write_text(json.dumps(sig, indent=2) + "\n")
    summary: dict[str, Any] = {"files": [FILES[d] for d in dialects] + [SIGNATURE], "params_file": params_file,
                               "shapes": {k: list(v.shape) for k, v in example.items()},
                               "function_args": len(module.inputs) + len(gm.param_inputs),
                               "torch_mlir": sig["torch_mlir"], "seconds": round(time.perf_counter() - t0, 2),
                               "ops": {d: _op_census(t) for d, t in texts.items()}}
    if options.verify:
        summary["verified"] = verify_export(out_dir, source, example, options)
    return summary


def _params_file(source: Any, names: Sequence[str], out_dir: Path) -> str:
    """The weights file the signature points at: the artifact's own (relative) when inside it, else a copy."""
    if source.params_file is not None:
        import os

        return os.path.relpath(source.params_file, out_dir)
    from ctc.artifact import save_params

    save_params({n: source.module.params[n] for n in names}, out_dir / "params.safetensors")
    return "params.safetensors"


def _op_census(text: str, top: int = 12) -> dict[str, int]:
    """The most frequent MLIR ops of a text (what the export is made of, for the report)."""
    import re

    counts: dict[str, int] = {}
    for m in re.finditer(r"(?:=|^)\s*\"?((?:torch\.aten|linalg|tensor|arith|math)\.[a-z_0-9.]+)", text, re.M):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:top])


def _has_quantized_activations(module: Any) -> bool:
    return any(n.op == "quant_linear" and n.attrs.get("a_bits") not in (None, 16) for n in module.nodes)


def verify_export(out_dir: Path, source: Any, example: Mapping[str, torch.Tensor], options: Any) -> dict[str, Any]:
    """Compile the export with IREE for this CPU, run it on ``example`` and compare with the IR's outputs."""
    from ctc.exports.source import compare_outputs

    dialect = "linalg" if options.dialect in ("linalg", "both") else "torch"
    t0 = time.perf_counter()
    fn = IreeFunction(out_dir, dialect=dialect)
    compile_s = time.perf_counter() - t0
    got = fn(example)
    ref = source.reference_outputs(example)  # the batch the export was fitted to, not the source's own
    names = list(source.module.output_names)
    quant_acts = _has_quantized_activations(source.module)
    res = compare_outputs(f"the IREE-compiled {FILES[dialect]}", got, ref, float("inf") if quant_acts
                          else options.tolerance, names)
    worst = min(r["cosine"] for r in res["outputs"]) if res["outputs"] else 1.0
    if quant_acts and worst < options.min_cosine:
        raise MlirExportError(f"the IREE-compiled {FILES[dialect]} does not reproduce the module: output cosine "
                              f"{worst:.6f} < min_cosine {options.min_cosine}")
    res.update(compiler="iree-base-compiler " + _iree_version(), dialect=dialect, compile_s=round(compile_s, 2),
               criterion=(f"cosine >= {options.min_cosine} (quantized activations: float noise moves some values "
                          "across rounding boundaries)") if quant_acts else
               f"max |difference| <= {options.tolerance:g} x max |output|")
    return res


def _iree_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("iree-base-compiler")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class IreeFunction:
    """An MLIR export compiled by IREE for this CPU (llvm-cpu, host features), callable on the model inputs."""

    export_dir: Path
    dialect: str = "linalg"

    def __post_init__(self) -> None:
        try:
            import iree.compiler as ic
            import iree.runtime as rt
        except ImportError as e:
            raise ExportError("checking MLIR with IREE needs `pip install iree-base-compiler iree-base-runtime` "
                              f"({e}); or write it without the check (`verify=false`)") from None
        self.export_dir = Path(self.export_dir)
        self.signature = json.loads((self.export_dir / SIGNATURE).read_text())
        name = self.signature["files"].get(self.dialect)
        if name is None:
            have = ", ".join(self.signature["files"])
            raise ExportError(f"{self.export_dir} has no {self.dialect} MLIR (has: {have})")
        try:
            vmfb = ic.compile_file(str(self.export_dir / name), target_backends=["llvm-cpu"],
                                   input_type="torch" if self.dialect == "torch" else "auto",
                                   extra_args=["--iree-llvmcpu-target-cpu=host"])
        except ic.CompilerToolError as e:
            raise ExportError(f"IREE cannot compile {self.export_dir / name}: {_first_error_line(e)}") from None
        from safetensors.torch import load_file

        weights = load_file(str((self.export_dir / self.signature["params_file"]).resolve()))
        self._params = [weights[p["name"]].numpy() for p in self.signature["params"]]
        self._ctx = rt.SystemContext(config=rt.Config("local-task"))
        self._ctx.add_vm_module(rt.VmModule.copy_buffer(self._ctx.instance, vmfb))
        self._main = self._ctx.modules.module[self.signature["function"]]

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        args = []
        for spec in self.signature["inputs"]:
            x = inputs[spec["name"]]
            if list(x.shape) != spec["shape"]:
                raise ExportError(f"input {spec['name']} has shape {list(x.shape)}; this export was built for "
                                  f"{spec['shape']}")
            args.append(x.contiguous().numpy())
        out = self._main(*args, *self._params)
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [torch.from_numpy(o.to_host().copy()) for o in outs]


