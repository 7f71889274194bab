"""The fair CPU timing protocol of issue 19, shared by the benchmarks that compare runtimes on one machine.

Why: timing several runtimes in one process flatters whichever runs after a quiet one -- a runtime's
worker threads (torch's OpenMP pool, ONNX Runtime's, TVM's) keep spinning after its last call and
take a core from the runtime timed next.  Here every runtime lives in a process of its own (a child
of the benchmark script, started as ``python SCRIPT --child SPEC_JSON``), loads and warms up there,
and is driven over pipes one batch at a time, in interleaved rounds whose order rotates, after a
settle pause.  While one child is timed, the CPU time of every other benchmark process is read from
``/proc/<pid>/task/*/schedstat`` (a spinning idle pool shows up: the check fails above
``IDLE_CPU_LIMIT``), and the CPU time other users of the machine took is read from ``/proc/stat``.

A benchmark script supplies, per runtime, a JSON-able spec and a function that turns the spec into
the zero-argument call it times (:func:`serve`, in the child); :func:`time_runtimes` does the rest
and :func:`stats_row` / :func:`check_lines` format what every such benchmark reports.
Used by benchmarks/cpu_encoder_fair.py (MiniLM) and benchmarks/cnn_latency.py (EfficientNet-Lite0).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
IDLE_CPU_LIMIT = 0.01  # idle processes of the benchmark may use at most 1% of the timed wall time
NOISY_SPREAD = 0.25  # a median spread ((p90 - min) / median) over the runtimes above this marks the part noisy


# ----------------------------------------------------------------------------- child side
def serve(fn: Callable[[], Any], warmup: int) -> None:
    """Serve one runtime's call over stdin/stdout: ``run N`` -> JSON list of N wall times (s), after one
    untimed call (caches, waking the pool); ``out PATH`` saves the output as .npy; ``quit``."""
    import numpy as np

    for _ in range(warmup):
        fn()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "run":
            fn()
            ts = []
            for _ in range(int(arg)):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            print(json.dumps(ts), flush=True)
        elif cmd == "out":
            o = fn()
            o = o.numpy() if hasattr(o, "numpy") else np.from_dlpack(o)  # a torch tensor, or the VM's own tensor
            np.save(arg, np.asarray(o, dtype=np.float32))
            print("saved", flush=True)
        elif cmd == "quit":
            return


# ----------------------------------------------------------------------------- parent side
def cpu_ns(pid: int) -> int:
    """CPU time (ns) all threads of process ``pid`` have run so far (schedstat: ns resolution)."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                continue
    except FileNotFoundError:
        return 0
    return total


def _proc_stat_cpu() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def machine_busy_ns() -> int:
    """CPU time (ns) every process on the machine has run (/proc/stat: user+nice+system+irq+softirq+steal)."""
    fields = _proc_stat_cpu()
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + (fields[7] if len(fields) > 7 else 0)
    return busy * (10**9 // os.sysconf("SC_CLK_TCK"))


def steal_ns() -> int:
    """CPU time (ns) the hypervisor took from this VM's cores (/proc/stat's steal; 0 on bare metal)."""
    fields = _proc_stat_cpu()
    return (fields[7] if len(fields) > 7 else 0) * (10**9 // os.sysconf("SC_CLK_TCK"))


class Child:
    """One runtime's process: ``python script --child SPEC`` serving :func:`serve`'s commands."""

    def __init__(self, script: str, spec: dict[str, Any], log: Path, env: dict[str, str] | None = None):
        full_env = {**os.environ, **CHILD_ENV, **(env or {})}
        self.log = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, script, "--child", json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=full_env)
        self.name = spec["runtime"]

    def wait_ready(self) -> None:
        line = self._line()
        if line != "ready":
            raise SystemExit(f"{self.name}: child did not start ({line!r}); see {self.log.name}")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.name}: child exited with {self.proc.wait()}; see {self.log.name}")
        return line.strip()

    def ask(self, cmd: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        """Ask the child to quit; one that has not exited after a minute (a loaded machine) is killed."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@dataclass
class Timings:
    """What one fair run measured: wall times per runtime, CPU time of each runtime's process while it was
    timed (untimed calls included), and the idle-pool and foreign-load checks."""

    times: dict[str, list[float]]
    cpu_ns: dict[str, int]
    calls: dict[str, int]
    idle_ns: int = 0
    timed_ns: int = 0
    foreign_ns: int = 0
    steal_ns: int = 0
    runner_ns: int = 0  # this coordinating process's own CPU while a batch ran (reported, not an idle pool)
    outputs: dict[str, Any] = field(default_factory=dict)

    def check(self) -> dict[str, float]:
        timed = max(self.timed_ns, 1)
        spreads = sorted(_spread(ts) for ts in self.times.values() if len(ts) >= 5)
        out = {"idle_cpu_ms": self.idle_ns / 1e6, "timed_ms": self.timed_ns / 1e6, "idle_share": self.idle_ns / timed,
               "foreign_cores": max(0, self.foreign_ns - self.steal_ns) / timed, "steal_cores": self.steal_ns / timed,
               "runner_cpu_ms": self.runner_ns / 1e6, "runner_share": self.runner_ns / timed}
        if spreads:
            out.update(spread_median=statistics.median(spreads), spread_min=spreads[0], spread_max=spreads[-1])
        return out


def p90(sorted_times: list[float]) -> float:
    """The 90th percentile of sorted call times, as every report here takes it (rank ``int(0.9 n)``)."""
    return sorted_times[min(len(sorted_times) - 1, int(0.9 * len(sorted_times)))]


def _spread(times: list[float]) -> float:
    """(p90 - min) / median of one runtime's call times."""
    ts = sorted(times)
    return (p90(ts) - ts[0]) / statistics.median(ts)


def time_runtimes(script: str, specs: dict[str, dict[str, Any]], *, runs: int, rounds: int, settle: float,
                  work: Path, tag: str, env: dict[str, str] | None = None) -> Timings:
    """Start one child per spec (one at a time: a loading child must not overlap another's warm-up), time
    them in ``rounds`` interleaved rounds of ``ceil(runs / rounds)`` calls (order rotating, ``settle`` s
    pause before each batch), then fetch each runtime's output (``outputs``: numpy arrays).  The raw
    timings are written to ``work/times_{tag}.json`` before anything else can fail."""
    import numpy as np

    names = list(specs)
    children: dict[str, Child] = {}
    try:
        for rt in names:
            children[rt] = Child(script, specs[rt], work / f"child_{rt}_{tag}.log", env)
            children[rt].wait_ready()
        per = math.ceil(runs / rounds)
        t = Timings(times={rt: [] for rt in names}, cpu_ns=dict.fromkeys(names, 0),
                    calls=dict.fromkeys(names, rounds * (per + 1)))
        pids = {rt: c.proc.pid for rt, c in children.items()}
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for rt in order:
                time.sleep(settle)
                me = os.getpid()
                others = [p for k, p in pids.items() if k != rt] + [me]
                # this process's own reads of /proc (~1 ms a batch for 9 children) are kept outside its window:
                # its clock is read last before the batch and first after it
                before = {p: cpu_ns(p) for p in [pids[rt], *others[:-1]]}
                before[me] = cpu_ns(me)
                busy0, stolen0, t0 = machine_busy_ns(), steal_ns(), time.perf_counter_ns()
                reply = children[rt].ask(f"run {per}")
                wall, busy1, stolen1 = time.perf_counter_ns() - t0, machine_busy_ns(), steal_ns()
                after = {me: cpu_ns(me)}
                after.update({p: cpu_ns(p) for p in before if p != me})
                ours = sum(after[p] - before[p] for p in before)
                t.idle_ns += sum(after[p] - before[p] for p in others if p != me)
                t.runner_ns += after[me] - before[me]
                t.timed_ns += wall
                t.foreign_ns += max(0, (busy1 - busy0) - ours)
                t.steal_ns += stolen1 - stolen0
                t.times[rt] += json.loads(reply)
                t.cpu_ns[rt] += after[pids[rt]] - before[pids[rt]]
        (work / f"times_{tag}.json").write_text(json.dumps({"times": t.times, "cpu_ns": t.cpu_ns, "calls": t.calls,
                                                            "idle_ns": t.idle_ns, "timed_ns": t.timed_ns,
                                                            "foreign_ns": t.foreign_ns, "steal_ns": t.steal_ns,
                                                            "runner_ns": t.runner_ns}))
        for rt, c in children.items():
            p = work / f"out_{rt}_{tag}.npy"
            c.ask(f"out {p}")
            t.outputs[rt] = np.load(p)
    finally:
        for c in children.values():
            c.close()
    return t


def stats_row(t: Timings, rt: str) -> dict[str, float]:
    """Median, min, p90 (ms), spread = (p90 - min) / median, and CPU ms per call of one runtime."""
    ts = sorted(t.times[rt])
    med = statistics.median(ts)
    return {"n": len(ts), "median_ms": med * 1e3, "min_ms": ts[0] * 1e3, "p90_ms": p90(ts) * 1e3,
            "spread": _spread(ts), "cpu_ms": t.cpu_ns[rt] / 1e6 / max(t.calls[rt], 1)}


def check_lines(check: dict[str, float]) -> list[str]:
    """The idle-pool check, the load other users put on the machine and, where there are timings, how much the
    calls' times spread, as report lines (a noisy part is said to be one: its ratios are not to be quoted alone)."""
    ok = check["idle_share"] <= IDLE_CPU_LIMIT
    why = ("steal time" if check.get("steal_cores", 0) > 0.05 else "other users' load" if check["foreign_cores"] > 0.1
           else "no other users or steal show for it: the machine's own timing")
    spread = [] if "spread_median" not in check else [
        f"Spread of the timed calls ((p90 - min) / median) over the runtimes: median {check['spread_median']:.0%}, "
        f"{check['spread_min']:.0%} to {check['spread_max']:.0%}"
        + (f": NOISY (median over {NOISY_SPREAD:.0%}; {why}); the ratios of this part are not reliable, re-run it."
           if check["spread_median"] > NOISY_SPREAD else ".")]
    return [
        f"Idle-pool check: the other runtimes' processes used {check['idle_cpu_ms']:.1f} ms of CPU during "
        f"{check['timed_ms'] / 1e3:.1f} s of timed batches ({check['idle_share']:.2%}): "
        + ("passed." if ok else "FAILED (a pool kept spinning; the numbers are not fair).")
        + f" The runner itself used {check.get('runner_cpu_ms', 0.0):.1f} ms ({check.get('runner_share', 0.0):.2%}).",
        f"Other users of the machine took {check['foreign_cores']:.2f} cores on average during the timed batches"
        + (" (measured under load: absolute numbers are noisy, ratios less so)." if check["foreign_cores"] > 0.1
           else " (quiet)."),
        f"The hypervisor took {check.get('steal_cores', 0.0):.2f} cores (steal time) during the timed batches"
        + (": every runtime was slowed by it; compare only same-run ratios." if check.get("steal_cores", 0.0) > 0.05
           else "."),
        *spread,
    ]


def protocol_text(*, threads: str, warmup: int, runs: int, rounds: int, settle: float, timed: str) -> str:
    """The protocol sentence of a fair benchmark's header; ``timed`` says which call of each runtime is timed."""
    return (f"{threads} intra-op threads for every runtime; each runtime in its own process, loaded and warmed up "
            f"({warmup} calls) there; timed through {timed}; {rounds} interleaved rounds of "
            f"{math.ceil(runs / rounds)} timed calls per runtime (order rotating), each batch after a {settle} s "
            "pause and one untimed call; while one runtime is timed, the CPU time of every other benchmark process "
            f"is measured (schedstat) and must stay under {IDLE_CPU_LIMIT:.0%} of the timed wall time (no spinning "
            "pool steals a core); ratios are of medians (< 1: faster); spread = (p90 - min) / median (a part whose "
            f"runtimes' median spread is over {NOISY_SPREAD:.0%} is marked NOISY); CPU ms per "
            "call = CPU time of the runtime's process over all its threads (spinning included; less inflated than "
            "wall time by other users' load)")


def ratio_lines(rows: dict[str, dict[str, float]], pairs: tuple[tuple[str, str], ...], labels: dict[str, str]
                ) -> list[str]:
    """The side-by-side ratio table for the ``(runtime, reference)`` pairs measured: of medians, of mins, and
    of CPU time per call (the least sensitive to other users of the machine)."""
    have = [(a, b) for a, b in pairs if a in rows and b in rows]
    if not have:
        return []
    lines = ["", "| ratio (same run) | of medians | of mins | of CPU per call |", "|---|---:|---:|---:|"]
    for a, b in have:
        lines.append(f"| {labels[a]} / {labels[b]} | {rows[a]['median_ms'] / rows[b]['median_ms']:.3f} | "
                     f"{rows[a]['min_ms'] / rows[b]['min_ms']:.3f} | "
                     f"{rows[a]['cpu_ms'] / max(rows[b]['cpu_ms'], 1e-9):.3f} |")
    return lines


def versions(mods: tuple[str, ...] = ("torch", "onnxruntime", "tvm", "tvm_ffi", "transformers")) -> str:
    """Versions of python and ``mods`` as the children see them (imported in a subprocess)."""
    out = [f"python {platform.python_version()}"]
    for mod in mods:
        r = subprocess.run([sys.executable, "-c", f"import {mod}; print({mod}.__version__)"], capture_output=True,
                           text=True, env={**os.environ, **CHILD_ENV})
        out.append(f"{mod} {r.stdout.strip() or '?'}")
    return ", ".join(out)


def git_commit() -> str:
    """The short commit of this checkout, marked when ctc/ or benchmarks/ have uncommitted changes."""
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "ctc", "benchmarks"],
                           capture_output=True, text=True).stdout.strip()
    return (r.stdout.strip() or "?") + (" (+ uncommitted changes)" if dirty else "")


def machine_line() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return (f"{cpu}, {os.cpu_count()} cpus ({len(os.sched_getaffinity(0))} usable), {platform.platform()}; "
            f"load average at start {os.getloadavg()[0]:.2f}")
