"""ctc target descriptions (``cpu``/``cuda``/``fpga`` + options) -> TVM target dicts.

Why: the recipe names a target kind and options (:mod:`ctc.targets`); TVM wants a
``tvm.target.Target``.  ``cpu`` becomes ``llvm`` with this host's real ``-mcpu`` (LLVM's own
host detection, e.g. ``znver4``) and its usable core count, never a hard-coded CPU.  ``cuda``
and ``fpga`` have their descriptions written beside it but are not built by this backend yet
(issue 4 tracks the CPU path; GPU/FPGA builds are separate work): asking for them raises
:class:`UnsupportedTarget` naming that.

``target_key`` is the stable string the tuning database is keyed by: kind, mcpu, cores, and
the CPU feature flags that change code generation.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["TargetInfo", "UnsupportedTarget", "host_cpu", "host_cores", "resolve", "target_key"]

ISSUE = "issue 4 (TVM backend: only the cpu target is built so far)"


class UnsupportedTarget(NotImplementedError):
    """A ctc target kind this backend describes but does not build yet."""


def host_cpu() -> str:
    """LLVM's name for this host CPU (``znver4``, ``sapphirerapids``, ...), detected by LLVM itself."""
    import tvm

    name = str(tvm.target.codegen.llvm_get_system_cpu())
    if not name or name == "generic":
        raise RuntimeError("LLVM could not detect this host's CPU (-mcpu); give the cpu target an explicit mcpu "
                           "option, e.g. `target cpu mcpu=\"x86-64-v3\"`")
    return name


def host_cores() -> int:
    """CPU cores this process may run on (respects affinity masks / containers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class TargetInfo:
    """A resolved target: the TVM target dict plus what the runtime needs to know."""

    kind: str
    tvm: dict[str, Any]
    threads: int

    def target(self) -> Any:
        """The ``tvm.target.Target`` (imports TVM)."""
        import tvm

        return tvm.target.Target(self.tvm)


def _cpu(options: Any) -> TargetInfo:
    mcpu = getattr(options, "mcpu", "native") or "native"
    if mcpu == "native":
        mcpu = host_cpu()
    threads = int(getattr(options, "threads", 0) or 0)
    cores = threads or host_cores()
    return TargetInfo("cpu", {"kind": "llvm", "mcpu": mcpu, "num-cores": cores}, threads)


def _cuda(options: Any) -> TargetInfo:
    arch = getattr(options, "arch", "") or ""
    desc = {"kind": "cuda", "arch": arch or "sm_90", "host": {"kind": "llvm"}}
    raise UnsupportedTarget(f"target cuda ({desc}) is not yet supported by this backend; see {ISSUE}. "
                            "Build for `target cpu` instead.")


def _fpga(options: Any) -> TargetInfo:
    raise UnsupportedTarget(f"target fpga (HLS C, part {getattr(options, 'part', '?')}) is not yet supported by the "
                            f"TVM backend; see {ISSUE}. Build for `target cpu` instead.")


_RESOLVERS = {"cpu": _cpu, "cuda": _cuda, "fpga": _fpga}


def resolve(kind: str, options: Any = None) -> TargetInfo:
    """Resolve a ctc target kind and its options (a ``CpuOptions``-like object or None)."""
    try:
        fn = _RESOLVERS[kind]
    except KeyError:
        raise UnsupportedTarget(f"unknown target kind {kind!r} (known: {', '.join(_RESOLVERS)})") from None
    return fn(options)


def target_key(info: TargetInfo) -> str:
    """Directory-safe key of a target for the tuning database: ``llvm-znver4-2c-<hash of features>``."""
    import tvm

    t = info.target()
    feats = ""
    if t.kind.name == "llvm":
        try:
            keys = ["avx2", "avx512f", "avx512bw", "avx512vnni", "avx512bf16", "fma", "neon", "sve"]
            feats = ",".join(k for k in keys if tvm.target.codegen.target_has_features([k], t))
        except Exception:  # noqa: BLE001 - feature query unsupported for this target
            feats = ""
    h = hashlib.sha1(f"{sorted(info.tvm.items())}|{feats}".encode()).hexdigest()[:8]
    mcpu = info.tvm.get("mcpu", "generic")
    return f"{t.kind.name}-{mcpu}-{info.tvm.get('num-cores', 0)}c-{h}"
