"""What an export writer reads (:class:`ExportSource`) and the load-back comparison every writer makes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ctc.exports import ExportError

__all__ = ["ExportSource", "compare_outputs", "example_feed", "from_artifact"]


@dataclass
class ExportSource:
    """A module to export and what writers need around it.

    ``example`` is one batch of the module's inputs (the load-back check runs it); ``tokenizer_dir``
    holds the source model's tokenizer and ``config.json`` when it had one; ``params_file`` is the
    artifact's own parameter file when the export is written inside that artifact (a writer may
    refer to it instead of copying the weights)."""

    module: Any
    name: str
    example: dict[str, torch.Tensor]
    tokenizer_dir: Path | None = None
    params_file: Path | None = None
    notes: list[str] = field(default_factory=list)
    checkpoint_dir: Path | None = None  # the source model's own weights (tensors the module never reads)

    def source_checkpoint_dir(self) -> Path | None:
        """Where the source model's safetensors are: ``checkpoint_dir``, else the tokenizer folder when it has them."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        if self.tokenizer_dir is not None and any(Path(self.tokenizer_dir).glob("*.safetensors")):
            return self.tokenizer_dir
        return None

    def reference_outputs(self, example: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The module's outputs on ``example`` (default: the example batch), by the reference interpreter."""
        from ctc.ir.interpreter import interpret

        with torch.no_grad():
            return list(interpret(self.module, dict(self.example if example is None else example)))

    def hf_config(self) -> dict[str, Any]:
        """The source model's Hugging Face ``config.json`` (copied into the artifact with the tokenizer)."""
        import json

        path = self.tokenizer_dir / "config.json" if self.tokenizer_dir is not None else None
        if path is None or not path.is_file():
            raise ExportError(f"{self.name}: no Hugging Face config.json travels with this model (it was not "
                              "captured from a Hugging Face model), so it cannot be written as one")
        return json.loads(path.read_text())


def example_feed(module: Any, tokenizer: Any = None, *, batch: int = 1, seq_len: int = 32) -> dict[str, torch.Tensor]:
    """One batch of the module's inputs: real text through the tokenizer when there is one, else
    deterministic random token ids; a module taking inputs that text cannot give gets seeded synthetic inputs
    of its shapes (N(0, 1) floats)."""
    names = [v.name for v in module.inputs]
    if tokenizer is not None:
        from ctc.eval.data import lee_test

        ids = tokenizer(" ".join(lee_test()), add_special_tokens=False, verbose=False)["input_ids"][:seq_len]
        window = torch.tensor(ids, dtype=torch.long).unsqueeze(0).repeat(batch, 1)
    else:
        vocab = _vocab_size(module)
        window = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    feed = {"input_ids": window, "attention_mask": torch.ones_like(window), "token_type_ids": torch.zeros_like(window),
            "position_ids": torch.arange(window.shape[1]).expand_as(window).contiguous()}
    missing = [n for n in names if n not in feed]
    if missing:  # not a text model (an MLP's or CNN's float inputs): seeded synthetic inputs, as ctc compile uses
        from ctc.eval.data import synthetic_batch

        try:
            return synthetic_batch(module, batch=batch, seq_len=seq_len)
        except ValueError as e:
            raise ExportError(f"cannot make example inputs {missing} for the load-back check: {e}") from e
    return {n: feed[n] for n in names}


def _vocab_size(module: Any) -> int:
    for n in module.nodes:
        if n.op == "embedding":
            return int(n.operand("weight").type.shape[0])
    return 2


def from_artifact(art: Any, *, batch: int = 1, seq_len: int = 32) -> ExportSource:
    """The export source of a loaded artifact (example batch from its tokenizer on real text)."""
    tok = art.tokenizer() if art.tokenizer_dir is not None else None
    example = example_feed(art.module, tok, batch=batch, seq_len=seq_len)
    return ExportSource(art.module, art.path.name, example, art.tokenizer_dir,
                        checkpoint_dir=_model_dir(art.report.get("model") or {}, art.path))


def _model_dir(model: Any, artifact: Path) -> Path | None:
    """The source model's folder named by an artifact's report (bundled name or Hugging Face directory), if here."""
    kind, ref = model.get("kind"), model.get("ref")
    if kind == "bundled" and ref:
        from ctc.bundled import BundledModelError, bundled_hf_dir

        try:
            return bundled_hf_dir(str(ref))
        except BundledModelError:
            return None
    if kind == "hf" and ref:
        for base in (Path(str(ref)), artifact.parent / str(ref)):
            if base.is_dir():
                return base.resolve()
    return None


def compare_outputs(what: str, got: Sequence[Any], ref: Sequence[torch.Tensor], tolerance: float,
                    names: Sequence[str] | None = None) -> dict[str, Any]:
    """Agreement of a reader's outputs with the module's: max |difference| relative to the output's largest
    magnitude must be <= ``tolerance`` (else :class:`ExportError`); returns the numbers for the report."""
    rows = []
    for i, (g, r) in enumerate(zip(got, ref, strict=False)):
        g = torch.as_tensor(g).detach().to(torch.float64)
        r = r.detach().to(torch.float64)
        if tuple(g.shape) != tuple(r.shape):
            raise ExportError(f"{what}: output {i} has shape {tuple(g.shape)}, the module's {tuple(r.shape)}")
        err = float((g - r).abs().max()) if r.numel() else 0.0
        scale = float(r.abs().max()) if r.numel() else 0.0
        cos = float(torch.nn.functional.cosine_similarity(g.reshape(1, -1), r.reshape(1, -1)).item()) \
            if r.numel() else 1.0
        name = names[i] if names is not None and i < len(names) else str(i)
        rows.append({"output": name, "max_abs_error": err, "relative": err / scale if scale else err, "cosine": cos})
    worst = max(rows, key=lambda r: r["relative"]) if rows else None
    if worst is not None and worst["relative"] > tolerance:
        raise ExportError(f"{what} does not reproduce the module: output {worst['output']} differs by "
                          f"{worst['max_abs_error']:.3g} ({worst['relative']:.3g} of its largest magnitude, "
                          f"tolerance {tolerance:g}; cosine {worst['cosine']:.6f}); nothing was written")
    return {"outputs": rows, "tolerance": tolerance}


def write_export(fmt: str, source: ExportSource, dest: str | Path, options: Any, *, force: bool = False,
                 protected: Sequence[tuple[str, str | Path]] = ()) -> tuple[Path, dict[str, Any]]:
    """Write ``source`` in format ``fmt`` to the directory ``dest`` atomically (ctc's output-directory
    rules: only an empty directory or one ctc wrote is replaced); returns (path, the writer's summary).

    The directory gets ``export.json`` (format, options, summary) and a ``manifest.json`` like an
    artifact's; nothing is left behind when the writer fails."""
    import dataclasses
    import json
    import shutil

    from ctc import __version__
    from ctc.artifact import normal_permissions
    from ctc.exports import EXPORTS
    from ctc.manifest import write_manifest
    from ctc.output_dir import PARTIAL_MARKER, check_destination, make_temp_dir, remove_stale_temps, swap_into_place

    spec = EXPORTS[fmt]
    write = spec.write_function()
    real = check_destination(dest, force=force, protected=protected)
    real.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(real)
    tmp = make_temp_dir(real)
    try:
        summary = write(source, tmp, options)
        (tmp / PARTIAL_MARKER).unlink()
        record = {"format": fmt, "source": source.name, "options": dataclasses.asdict(options), "summary": summary,
                  "ctc_version": __version__}
        (tmp / "export.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        write_manifest(tmp, __version__)
        normal_permissions(tmp)
        check_destination(real, force=force, protected=protected)
        swap_into_place(tmp, real)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return real, summary
