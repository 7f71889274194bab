"""TVM backend of ctc: the ``cpu`` (llvm) and ``cuda`` targets, one lowering for both.

Why this module is thin: ``ctc.targets`` imports it to find ``build``/``load``; TVM itself is
imported only when a build or load actually happens (``import tvm`` costs seconds).

* :mod:`.targets`   -- ctc target descriptions -> TVM targets, tuning-database keys.
* :mod:`.lower`     -- ctc IR -> Relax, one rule per op.
* :mod:`.schedules` -- default (untuned) CPU schedules.
* :mod:`.cuda_schedules`, :mod:`.cuda_kernels`, :mod:`.cuda_toolchain` -- GPU schedules, hand-scheduled
  CUDA kernels (decode attention), and the build-without-a-GPU toolchain (nvcc, stub libcuda).
* :mod:`.cache_kernels` -- the in-place KV-cache write of decode steps.
* :mod:`.tuning`    -- meta-schedule tuning with a persistent, resumable database.
* :mod:`.build`     -- the compile pipeline, ``export_library``, runtime-only loader.
* :mod:`.int_kernels` -- integer kernels for ``quant_linear``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["build_target", "load", "load_compiled", "runs_here", "supports"]


def build_target(module: Any, target: Any, out_dir: Path) -> dict[str, Any]:
    """Compile ``module`` for ``target`` (a ``ctc.targets.TargetConfig``) into ``out_dir``.

    Named ``build_target`` because importing the ``build`` submodule rebinds ``build`` here."""
    from ctc.backends.tvm.build import build as _build

    return _build(module, target, out_dir)


def load(target_dir: str | Path, module: Any = None) -> Any:
    """A runner over the library compiled into ``target_dir`` (TVM runtime only)."""
    from ctc.backends.tvm.build import load as _load

    return _load(target_dir, module)


def load_compiled(path: str | Path, *, threads: int | None = None) -> Any:
    """Load a compiled ``model.so`` (or its directory) with the TVM runtime only."""
    from ctc.backends.tvm.build import load_compiled as _lc

    return _lc(path, threads=threads)


# Kinds this backend builds today; the others are described (ctc.backends.tvm.targets) but refused.
BUILT_KINDS = ("cpu", "cuda")


def runs_here(kind: str) -> str | None:
    """None when this machine can run libraries built for ``kind``; else why not (the library is still
    built: a GPU library is made on any machine with nvcc and run where the GPU is)."""
    if kind != "cuda":
        return None
    from ctc.backends.tvm.targets import detect_cuda_arch

    if detect_cuda_arch() is None:
        return "no CUDA GPU on this machine: the library is built, run it where the GPU is (`ctc bench --target cuda`)"
    return None


def supports(kind: str) -> str | None:
    """None when this backend builds ``kind``; else why not (shown at recipe check, before any work)."""
    if kind in BUILT_KINDS:
        return None
    return (f"the TVM backend builds only {', '.join(BUILT_KINDS)} so far; `target {kind}` is not supported yet "
            "(use `target cpu` or `target cuda`)")
