"""ctc target descriptions (``cpu``/``cuda``/``fpga`` + options) -> TVM target dicts.

Why: the recipe names a target kind and options (:mod:`ctc.targets`); TVM wants a
``tvm.target.Target``.  ``cpu`` becomes ``llvm`` with this host's real ``-mcpu`` (LLVM's own
host detection, e.g. ``znver4``) and its usable core count, never a hard-coded CPU.  ``cuda``
becomes TVM's ``cuda`` kind for the given ``arch`` (or the visible GPU's), with the
architecture's real per-block limits filled in (:data:`CUDA_ARCH_LIMITS`; left out, TVM assumes
48 KB of shared memory, a quarter of what a Hopper block may use).  ``fpga`` is described
but not built by this backend.

``target_key`` is the stable string the tuning database is keyed by: kind, mcpu, cores, and
the CPU feature flags that change code generation; for cuda, the GPU architecture.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["CUDA_ARCH_LIMITS", "CUDA_ARCH_SMS", "TargetInfo", "UnsupportedTarget", "check_mcpu", "cpuinfo_flags",
           "cuda_target", "detect_cuda_arch", "detect_cuda_sms", "host_cores", "host_cpu", "host_mattr", "llvm_cpus",
           "mattr_for_host", "missing_cpu_features", "native_target", "required_cpu_features", "resolve", "target_key"]

ISSUE = "issue 17 (FPGA-style target)"

# Per-block limits by CUDA architecture (NVIDIA's CUDA C Programming Guide, "Technical Specifications
# per Compute Capability"): shared memory a block may opt into, threads, 32-bit registers.
CUDA_ARCH_LIMITS: dict[str, dict[str, int]] = {
    "sm_70": {"max_shared_memory_per_block": 98304, "registers_per_block": 65536},
    "sm_75": {"max_shared_memory_per_block": 65536, "registers_per_block": 65536},
    "sm_80": {"max_shared_memory_per_block": 166912, "registers_per_block": 65536},
    "sm_86": {"max_shared_memory_per_block": 101376, "registers_per_block": 65536},
    "sm_87": {"max_shared_memory_per_block": 166912, "registers_per_block": 65536},
    "sm_89": {"max_shared_memory_per_block": 101376, "registers_per_block": 65536},
    "sm_90": {"max_shared_memory_per_block": 232448, "registers_per_block": 65536},
    "sm_90a": {"max_shared_memory_per_block": 232448, "registers_per_block": 65536},
}

# Multiprocessors of the common data-center part of each architecture: the grid of the persistent decode step
# (cuda_decode_stack) when `target cuda sms=...` is not given.  Hopper: H100 SXM and H200 have 132 (H100 PCIe 114,
# H20 78: give sms= for those); Ampere: A100 108.
CUDA_ARCH_SMS: dict[str, int] = {"sm_80": 108, "sm_90": 132, "sm_90a": 132}


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


@functools.lru_cache(maxsize=1)
def llvm_cpus() -> tuple[str, ...]:
    """The CPU names LLVM (inside TVM) accepts as ``-mcpu`` for this host's target triple."""
    import tvm

    return tuple(sorted(str(c) for c in tvm.target.codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm"}))))


def check_mcpu(mcpu: str) -> str | None:
    """None when LLVM knows ``mcpu`` (or it is ``native``), else why not, with the nearest names."""
    if mcpu in ("", "native"):
        return None
    cpus = llvm_cpus()
    if not cpus or mcpu in cpus:
        return None
    import difflib

    near = difflib.get_close_matches(mcpu, cpus, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    return (f"LLVM does not know the CPU {mcpu!r}{hint} (mcpu=\"native\" builds for this machine, "
            f"{host_cpu_or_none() or 'unknown here'}; LLVM knows {len(cpus)} CPU names for this host)")


def host_cpu_or_none() -> str | None:
    try:
        return host_cpu()
    except RuntimeError:
        return None


def usable_cores() -> list[int]:
    """The ids of the CPU cores this process may run on, in order (affinity masks, container cpusets)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return list(range(os.cpu_count() or 1))


def host_cores() -> int:
    """CPU cores this process may run on (respects affinity masks / containers)."""
    return len(usable_cores())


@dataclass(frozen=True)
class TargetInfo:
    """A resolved target: the TVM target dict plus what the runtime needs to know."""

    kind: str
    tvm: dict[str, Any]
    threads: int
    sms: int = 0  # cuda: the GPU's multiprocessor count the build assumes (the persistent decode step's grid)
    persistent: bool = True  # cuda: a matching decode step may run as one persistent kernel

    def target(self) -> Any:
        """The ``tvm.target.Target`` (imports TVM)."""
        import tvm

        return tvm.target.Target(self.tvm)


# LLVM feature -> /proc/cpuinfo flag where the two names differ beyond "_", "-" and "."
_CPUINFO_ALIASES = {"bmi": "bmi1", "sha": "sha_ni", "lzcnt": "abm", "pclmul": "pclmulqdq", "sse3": "pni"}
# instruction-set features checked against /proc/cpuinfo: the vector units and the few scalar ones codegen emits
_CHECKED_SCALAR = {"adx", "aes", "bmi", "bmi2", "f16c", "fma", "gfni", "lzcnt", "movbe", "pclmul", "popcnt",
                   "sha", "sse3", "sse4.1", "sse4.2", "sse4a", "ssse3", "vaes", "vpclmulqdq"}
# flags whose LLVM feature a host's -mcpu name may leave out (AMX on a guest named after an older core)
_ADDED_FLAGS = {"amx_tile": "amx-tile", "amx_int8": "amx-int8", "amx_bf16": "amx-bf16"}


def _norm(name: str) -> str:
    return name.replace("_", "").replace("-", "").replace(".", "").lower()


def _checked(feature: str) -> bool:
    return feature.startswith(("avx", "amx")) or feature in _CHECKED_SCALAR


def cpuinfo_flags() -> frozenset[str] | None:
    """The flags of the first CPU in ``/proc/cpuinfo``, or None where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
    except OSError:
        return None


def mattr_for_host(mcpu: str, implied: set[str] | frozenset[str], flags: frozenset[str] | None) -> tuple[str, ...]:
    """``-mattr`` that makes LLVM's CPU ``mcpu`` (whose features are ``implied``) match the host's real
    ``flags``: ``-feat`` for each instruction set the name implies but the host does not report (a virtual
    machine often masks AVX-512 while LLVM still names the CPU ``znver4``: code built for the name would
    die of an illegal instruction), ``+feat`` for the AMX units the name leaves out."""
    if flags is None:
        return ()
    off = sorted(missing_cpu_features(sorted(implied), flags))
    on = [feat for flag, feat in _ADDED_FLAGS.items() if flag in flags and feat not in implied]
    return tuple(f"-{f}" for f in off) + tuple(f"+{f}" for f in on)


@functools.lru_cache(maxsize=1)
def host_mattr() -> tuple[str, ...]:
    """The ``-mattr`` of this host (:func:`mattr_for_host` for LLVM's name of it and ``/proc/cpuinfo``)."""
    import tvm

    mcpu = host_cpu()
    implied = {str(f) for f in tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm",
                                                                                          "mcpu": mcpu}))}
    return mattr_for_host(mcpu, implied, cpuinfo_flags())


def required_cpu_features(target: Any) -> list[str]:
    """The instruction-set features (those checked against ``/proc/cpuinfo``) code built for llvm ``target`` may use:
    recorded in a CPU artifact so that loading it on a CPU without them is refused, not killed by SIGILL."""
    import tvm

    if target.kind.name != "llvm":
        return []
    return sorted(f for f in (str(x) for x in tvm.target.codegen.llvm_get_cpu_features(target)) if _checked(f))


def missing_cpu_features(features: list[str], flags: frozenset[str] | None = None) -> list[str]:
    """Which of ``features`` (LLVM names) this host's ``/proc/cpuinfo`` (or ``flags``) does not report; none where
    the flags cannot be read (no ``/proc/cpuinfo``: nothing to check against)."""
    flags = cpuinfo_flags() if flags is None else flags
    if flags is None:
        return []
    have = {_norm(f) for f in flags}
    return [f for f in features if _checked(f) and _norm(_CPUINFO_ALIASES.get(f, f)) not in have]


def native_target(cores: int) -> dict[str, Any]:
    """The llvm target dict of this host: LLVM's CPU name, its features as the host reports them, ``cores`` cores."""
    out: dict[str, Any] = {"kind": "llvm", "mcpu": host_cpu(), "num-cores": cores}
    if host_mattr():
        out["mattr"] = list(host_mattr())
    return out


def _cpu(options: Any) -> TargetInfo:
    mcpu = getattr(options, "mcpu", "native") or "native"
    threads = int(getattr(options, "threads", 0) or 0)
    cores = threads or host_cores()
    if mcpu == "native":
        return TargetInfo("cpu", native_target(cores), threads)
    return TargetInfo("cpu", {"kind": "llvm", "mcpu": mcpu, "num-cores": cores}, threads)


def detect_cuda_arch() -> str | None:
    """``sm_XY`` of the first visible GPU (through torch's CUDA runtime); None without one."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
    except Exception:  # noqa: BLE001 - a broken driver counts as no GPU
        return None
    return f"sm_{major}{minor}"


def detect_cuda_sms() -> int | None:
    """Multiprocessors of the first visible GPU (through torch's CUDA runtime); None without one."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.get_device_properties(0).multi_processor_count)
    except Exception:  # noqa: BLE001 - a broken driver counts as no GPU
        return None


def cuda_target(arch: str) -> dict[str, Any]:
    """The TVM target dict for ``arch`` (``sm_90``...), with that architecture's block limits."""
    if not arch.startswith("sm_") or not arch[3:5].isdigit():
        raise UnsupportedTarget(f"target cuda: arch must look like sm_90 (compute capability 9.0), got {arch!r}")
    limits = CUDA_ARCH_LIMITS.get(arch)
    if limits is None:
        known = ", ".join(CUDA_ARCH_LIMITS)
        raise UnsupportedTarget(f"target cuda: no block limits known for {arch} (known: {known}); add its row to "
                                "ctc.backends.tvm.targets.CUDA_ARCH_LIMITS")
    return {"kind": "cuda", "arch": arch, "max_threads_per_block": 1024, "thread_warp_size": 32, **limits,
            "host": {"kind": "llvm"}}


def _cuda(options: Any) -> TargetInfo:
    arch = getattr(options, "arch", "") or ""
    if not arch:
        arch = detect_cuda_arch() or ""
        if not arch:
            raise UnsupportedTarget("target cuda: no GPU is visible here to detect the architecture from; name it, "
                                    'e.g. `target cuda arch="sm_90"` (H100/H200) -- libraries for a GPU are built '
                                    "on any machine with nvcc")
    sms = int(getattr(options, "sms", 0) or 0)
    if sms < 0:
        raise UnsupportedTarget(f"target cuda: sms={sms} must be >= 0 (0 = the visible GPU's, else the arch's common "
                                "part)")
    return TargetInfo("cuda", cuda_target(arch), 0, sms=sms or default_cuda_sms(arch),
                      persistent=bool(getattr(options, "persistent", True)))


def default_cuda_sms(arch: str) -> int:
    """Multiprocessors a library for ``arch`` is built for when the target does not say: the visible GPU's when it
    is that arch (sm_90a is sm_90 with Hopper's extra instructions), else the arch's common part
    (:data:`CUDA_ARCH_SMS`; 0 when unknown)."""
    here = detect_cuda_sms() if (detect_cuda_arch() or "").rstrip("a") == arch.rstrip("a") else None
    return here or CUDA_ARCH_SMS.get(arch, 0)


def _fpga(options: Any) -> TargetInfo:
    raise UnsupportedTarget(f"target fpga (HLS C, part {getattr(options, 'part', '?')}) is not yet supported by the "
                            f"TVM backend; see {ISSUE}. Build for `target cpu` or `target cuda` instead.")


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
    if t.kind.name == "cuda":
        return f"cuda-{info.tvm['arch']}-{h}"
    mcpu = info.tvm.get("mcpu", "generic")
    return f"{t.kind.name}-{mcpu}-{info.tvm.get('num-cores', 0)}c-{h}"
