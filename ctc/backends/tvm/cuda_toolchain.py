"""What a CUDA build needs on a machine that may have no GPU: nvcc, a libcuda, TVM's CUDA runtime.

Why: TVM's CUDA runtime library (``libtvm_runtime_cuda.so``) links against the driver library
``libcuda.so.1``.  On a machine without an NVIDIA driver (this build machine, CI) that library
fails to load when ``tvm`` is imported, and TVM then silently embeds CUDA *source* in the
compiled library: the GPU machine would need the whole TVM compiler to load it.  With a
driver library present (the real one, or the stub built here from ``cuda_stub.c`` that
reports "no device" from every call) the runtime registers, the build compiles each module
with ``nvcc`` to a fatbin, and the exported ``.so`` runs on a GPU machine that carries only
TVM's three runtime libraries.

* :func:`build_stub` compiles the stub with the system C compiler into the ctc cache
  (``~/.cache/ctc/cuda-stub/<hash of the source>/libcuda.so.1``); ``make cuda-stub`` or
  ``python -m ctc.backends.tvm.cuda_toolchain`` runs it ahead of time.
* :func:`prepare_cuda_build` makes a process ready to build: nvcc found, a libcuda loaded
  (the real driver when there is one), TVM's CUDA runtime registered (also when ``tvm`` was
  imported before the stub was loaded).  :func:`nvcc_compile_mode` scopes TVM's
  ``TVM_CUDA_COMPILE_MODE=nvcc`` switch (TVM reads it per module; NVRTC is its default and
  needs the ``cuda-bindings`` package and a driver).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["CudaToolchainError", "build_stub", "find_nvcc", "nvcc_compile_mode", "prepare_cuda_build",
           "real_libcuda", "stub_source"]

STUB_SONAME = "libcuda.so.1"


class CudaToolchainError(RuntimeError):
    """A CUDA build cannot run on this machine; the message says what is missing and how to fix it."""


def stub_source() -> Path:
    """The C source of the stub driver library (shipped with the package)."""
    return Path(__file__).with_name("cuda_stub.c")


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ctc" / "cuda-stub"


def find_nvcc() -> str | None:
    """Path of ``nvcc``: on PATH, else under ``$CUDA_HOME``/``/usr/local/cuda``; None when absent."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def real_libcuda() -> bool:
    """Whether the real NVIDIA driver library loads in this process (a GPU machine)."""
    try:
        lib = ctypes.CDLL(STUB_SONAME, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return not hasattr(lib, "ctc_stub_marker") and _is_real_driver(lib)


def _is_real_driver(lib: ctypes.CDLL) -> bool:
    # the stub answers cuInit with CUDA_ERROR_NO_DEVICE and cuGetErrorString with its own text
    try:
        text = ctypes.c_char_p()
        lib.cuGetErrorString(0, ctypes.byref(text))
        return not (text.value or b"").startswith(b"ctc stub")
    except AttributeError:
        return False


def build_stub(cache_dir: str | Path | None = None, *, compiler: str | None = None) -> Path:
    """Compile the stub ``libcuda.so.1`` (once per source version) and return its path."""
    src = stub_source()
    digest = hashlib.sha1(src.read_bytes()).hexdigest()[:12]
    out_dir = (Path(cache_dir) if cache_dir is not None else _cache_root()) / digest
    lib = out_dir / STUB_SONAME
    if lib.is_file():
        return lib
    cc = compiler or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise CudaToolchainError("building the stub libcuda needs a C compiler (cc, gcc or clang) on PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{STUB_SONAME}.{os.getpid()}.tmp"
    cmd = [cc, "-shared", "-fPIC", "-O1", f"-Wl,-soname,{STUB_SONAME}", "-o", str(tmp), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise CudaToolchainError(f"compiling the stub libcuda failed ({' '.join(cmd)}):\n{res.stderr.strip()}")
    os.replace(tmp, lib)  # atomic: a concurrent build sees either nothing or the whole library
    return lib


def _tvm_cuda_runtime_loaded() -> bool:
    from tvm.base import _LOADED_LIBS

    return "tvm_runtime_cuda" in _LOADED_LIBS


def _load_tvm_cuda_runtime() -> None:
    """Register TVM's CUDA runtime (``import tvm`` skips it silently when libcuda is missing)."""
    from tvm_ffi.libinfo import load_lib_ctypes

    from tvm.base import _LOADED_LIBS

    if _tvm_cuda_runtime_loaded():
        return
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda",
                                                           extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
    except (OSError, RuntimeError) as e:
        raise CudaToolchainError(f"TVM's CUDA runtime library does not load even with a libcuda present: {e}. "
                                 "If it names an undefined cu* symbol, the stub in "
                                 f"{stub_source()} lacks it: add it there (returning 100, no device)") from None


_PREPARED = False


def prepare_cuda_build(*, cache_dir: str | Path | None = None) -> dict[str, str]:
    """Make this process able to build CUDA libraries with fatbins; returns what it used.

    Raises :class:`CudaToolchainError` naming the fix when nvcc or a C compiler is missing.
    Must run before TVM compiles anything for CUDA; it may run after ``import tvm``.
    """
    global _PREPARED
    nvcc = find_nvcc()
    if nvcc is None:
        raise CudaToolchainError("target cuda needs the CUDA toolkit's nvcc to compile kernels (not found on PATH, "
                                 "$CUDA_HOME or /usr/local/cuda); install the CUDA toolkit (13.x for sm_90) or put "
                                 "its bin/ on PATH")
    info = {"nvcc": nvcc}
    if not _PREPARED:
        if real_libcuda():
            info["libcuda"] = "driver"
        else:
            stub = build_stub(cache_dir)
            ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)  # NEEDED libcuda.so.1 now resolves to the stub
            info["libcuda"] = str(stub)
        _load_tvm_cuda_runtime()
        from ctc.backends.tvm.cuda_mma import register_postproc

        register_postproc()  # modules that call ctc's CUDA device functions get their source
        _PREPARED = True
    else:
        info["libcuda"] = "loaded"
    return info


@contextlib.contextmanager
def nvcc_compile_mode() -> Iterator[None]:
    """Within the block TVM compiles CUDA modules with nvcc to fatbins (nvcc's folder on PATH)."""
    nvcc = find_nvcc()
    saved = {k: os.environ.get(k) for k in ("TVM_CUDA_COMPILE_MODE", "PATH")}
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    if nvcc is not None:
        os.environ["PATH"] = str(Path(nvcc).parent) + os.pathsep + os.environ.get("PATH", "")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> int:
    """``python -m ctc.backends.tvm.cuda_toolchain``: build the stub and report the toolchain."""
    del argv
    try:
        lib = build_stub()
    except CudaToolchainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"stub libcuda: {lib}")
    print(f"nvcc: {find_nvcc() or 'not found (target cuda cannot build here)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
