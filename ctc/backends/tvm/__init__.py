"""TVM backend of ctc: the ``cpu`` target (llvm), with ``cuda``/``fpga`` descriptions beside it.

Why this module is thin: ``ctc.targets`` imports it to find ``build``/``load``; TVM itself is
imported only when a build or load actually happens (``import tvm`` costs seconds).

* :mod:`.targets`   -- ctc target descriptions -> TVM targets, tuning-database keys.
* :mod:`.lower`     -- ctc IR -> Relax, one rule per op.
* :mod:`.schedules` -- default (untuned) CPU schedules.
* :mod:`.tuning`    -- meta-schedule tuning with a persistent, resumable database.
* :mod:`.build`     -- the compile pipeline, ``export_library``, runtime-only loader.
* :mod:`.int_kernels` -- integer kernels for ``quant_linear``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["build_target", "load", "load_compiled", "supports"]


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
BUILT_KINDS = ("cpu",)


def supports(kind: str) -> str | None:
    """None when this backend builds ``kind``; else why not (shown at recipe check, before any work)."""
    if kind in BUILT_KINDS:
        return None
    return (f"the TVM backend builds only {', '.join(BUILT_KINDS)} so far; `target {kind}` is not supported yet "
            "(use `target cpu`)")
