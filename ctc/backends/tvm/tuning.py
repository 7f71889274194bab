"""Meta-schedule autotuning with a persistent, resumable database keyed by target and workload.

Why: the default schedules (:mod:`.schedules`) are good but fixed; meta-schedule searches
per-kernel schedules.  Tuning is slow (minutes), so:

* records live in a JSON database under ``<cache>/<target-key>/`` (default cache
  ``~/.cache/ctc/tuning``; override with ``cache_dir``/``tuning_dir``); the target key names
  the LLVM CPU, core count and feature flags (:func:`ctc.backends.tvm.targets.target_key`);
* the database is the truth: the trials a task has had are the records it holds
  (:mod:`.tuning_db`), so a compile killed mid-tuning resumes from what was measured, a second
  compile of the same model with the same budget tunes nothing, and the report's counts are
  the database's;
* the trial budget is the total for this module's tasks, spent on the heaviest first
  (estimated FLOPs x call count), at least ``min(trials, 16)`` trials per task; with a budget
  below the task count only the heaviest tasks are tuned and the report says which;
* only fixed-shape tasks are tuned: TVM 0.27's meta-schedule samples no tiling for a loop of
  symbolic length (``SamplePerfectTile`` gives a null factor) and its trace machinery then
  fails ("The random variable has been produced once" when a trace holds two such factors, a
  null-RV check failure when one is replayed), so tasks with symbolic dims are listed as not
  tunable and keep their default schedules (the cpu target binds batch and seq_len when it tunes);
* meta-schedule runs in a worker process of its own session (:mod:`.tune_worker`): Ctrl-C,
  SIGTERM or a failure stop the whole worker process group, never leaving a process behind;
* a tuned kernel is used only where it beats the default schedule (both timed in-process
  once; the choice is cached in the ledger): with a small budget meta-schedule's best can be
  slower than the hand-written matmul schedule.

TVM 0.27 facts applied (see ``docs``/tvm-notes): ``inspect.stack`` is replaced by a cheap
version in the worker and in every builder process (``import tvm.s_tir.tensor_intrin`` takes
~39 s otherwise and the builder times out) and, in this process, only while
:func:`tune_and_apply` runs (:func:`fast_inspect_stack` restores it), the builder timeout is raised, and the fixed VNNI
intrinsic of :mod:`.int_kernels` is registered in the workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import linecache
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctc.backends.tvm.tuning_db import TaskRecords, count_records
from ctc.cache import default_cache_dir

__all__ = ["TuningError", "builder_init", "fast_inspect_stack", "live_group_members", "plan_budget",
           "tune_and_apply", "tuning_dir"]

LEDGER_VERSION = 2
MIN_TRIALS_PER_TASK = 16
MAX_TRIALS_PER_TASK = 256
XGB_MIN_TRIALS = 32  # smaller searches use the random cost model (XGBoost training on a few samples is noise)


class TuningError(RuntimeError):
    """The tuning worker failed as a whole (it crashed or could not start); records so far are kept."""


def tuning_dir(info: Any, cache_dir: str | Path | None = None) -> Path:
    """The database directory for target ``info`` (a :class:`~.targets.TargetInfo`); the root defaults to
    ``<ctc cache>/tuning`` (``~/.cache/ctc/tuning``)."""
    from ctc.backends.tvm.targets import target_key

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "tuning"
    return root / target_key(info)


# ----------------------------------------------------------------------------- inspect.stack workaround
def _fast_stack(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack`` without reading source files for every frame (only the first three get
    their line, which TVMScript's class-scope check reads)."""
    frame = sys._getframe(1)
    out: list[inspect.FrameInfo] = []
    i = 0
    while frame is not None:
        code = frame.f_code
        ctx = None
        if i < 3 and context:
            line = linecache.getline(code.co_filename, frame.f_lineno)
            ctx = [line] if line else None
        out.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, ctx, 0 if ctx else None))
        frame = frame.f_back
        i += 1
    return out


@contextlib.contextmanager
def fast_inspect_stack() -> Iterator[None]:
    """``inspect.stack`` replaced by :func:`_fast_stack` inside the block, the previous one restored after
    (also on errors), so the rest of the process never sees the patch."""
    saved = inspect.stack
    inspect.stack = _fast_stack  # type: ignore[assignment]
    try:
        yield
    finally:
        inspect.stack = saved  # type: ignore[assignment]


def builder_init() -> None:
    """Set up a process that only builds tuning candidates (the tuning worker, a builder worker):
    cheap ``inspect.stack`` for that process's lifetime, the fixed VNNI intrinsic."""
    inspect.stack = _fast_stack  # type: ignore[assignment]
    try:
        from ctc.backends.tvm.int_kernels import register_vnni_intrinsics

        register_vnni_intrinsics()
    except Exception:  # noqa: BLE001 - int kernels absent or no VNNI: nothing to register
        pass


# ----------------------------------------------------------------------------- tasks and budget
def _flops(mod: Any) -> float:
    try:
        from tvm.s_tir.analysis import estimate_tir_flops

        return float(estimate_tir_flops(mod))
    except Exception:  # noqa: BLE001 - dynamic shapes etc.
        return 0.0


def _scheduled(mod: Any) -> bool:
    for _, f in mod.functions_items():
        attrs = getattr(f, "attrs", None)
        if attrs is not None and "tirx.is_scheduled" in attrs and int(attrs["tirx.is_scheduled"]) == 1:
            return True
    return False


def _symbolic_dims(mod: Any) -> list[str]:
    """The symbolic dims in the buffers of ``mod``'s PrimFuncs (empty: fixed shapes)."""
    import tvm

    dims: set[str] = set()
    for _, f in mod.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc):
            dims.update(str(d) for buf in f.params for d in getattr(buf, "shape", ())
                        if not isinstance(d, tvm.tirx.IntImm))
    return sorted(dims)


def _name(gv: Any) -> str:
    return str(getattr(gv, "name_hint", None) or gv)


@dataclass
class Task:
    """One tuning task: a fused PrimFunc, how much it weighs, and its records in the database."""

    name: str
    mod: Any
    shash: str
    weight: float
    flops: float
    symbolic: list[str]
    allotted: int = 0
    records: TaskRecords | None = None

    @property
    def measured(self) -> int:
        return self.records.measured if self.records else 0


def plan_budget(n_tasks: int, trials: int, per_task: int | None = None) -> list[int]:
    """Trials for each of ``n_tasks`` tasks (heaviest first) out of a total of ``trials``.

    Each tuned task gets ``per_task`` trials (default: an even share, at least
    ``min(trials, 16)`` and at most 256); the remainder goes to the heaviest task.  The sum is
    exactly ``trials`` whenever a task exists, so ``trials=1`` tunes the heaviest task once."""
    if n_tasks <= 0 or trials <= 0:
        return [0] * max(0, n_tasks)
    share = per_task or max(min(trials, MIN_TRIALS_PER_TASK), min(MAX_TRIALS_PER_TASK, trials // n_tasks))
    share = max(1, min(share, trials))
    k = min(n_tasks, trials // share)
    out = [share] * k + [0] * (n_tasks - k)
    out[0] += trials - share * k if per_task is None else 0
    return out


# ----------------------------------------------------------------------------- the worker
def live_group_members(pgid: int) -> list[int] | None:
    """Processes of process group ``pgid`` that still run (zombies, which have exited and only wait
    for their reaper, are not counted); None where ``/proc`` cannot tell."""
    try:
        entries = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return None
    out = []
    for d in entries:
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append(int(d))
    return out


def _group_gone(pgid: int) -> bool:
    members = live_group_members(pgid)
    if members is not None:
        return not members
    try:  # no /proc: a group with any member left (zombies included) still answers signal 0
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _stop_group(proc: subprocess.Popen[str], *, grace_s: float = 5.0, bound_s: float = 10.0) -> None:
    """Stop the worker and every process it started (its session's process group), and return only
    once none of them runs any more (at most ``grace_s`` + ``bound_s`` seconds): SIGTERM, then SIGKILL
    for whatever is left, then wait until the group is gone, so nothing outlives the compile."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + bound_s
    while True:
        try:  # the worker's pool processes outlive it unless killed: SIGKILL the group until it is empty
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc.poll() is None:
            try:
                proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
        if proc.returncode is not None and _group_gone(pgid):
            return
        if time.monotonic() > deadline:
            left = live_group_members(pgid) or []
            print(f"[ctc tune] warning: tuning processes {left or pgid} still run {bound_s:.0f} s after SIGKILL",
                  file=sys.stderr, flush=True)
            return
        time.sleep(0.02)


def _run_worker(spec: dict[str, Any], log_file: Path, on_event: Callable[[dict[str, Any]], None]) -> None:
    """Run :mod:`.tune_worker` on ``spec``; ``on_event`` gets each event line.  Ctrl-C, SIGTERM
    (Terminated) and errors stop the worker's whole process group before propagating."""
    import ctc

    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="ctc-tune-", delete=False) as f:
        json.dump(spec, f)
        spec_path = Path(f.name)
    root = str(Path(ctc.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ctc.backends.tvm.tune_worker", str(spec_path)],
                                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
                                start_new_session=True, env=env)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.strip()
                if line.startswith("{"):
                    on_event(json.loads(line))
            rc = proc.wait()
        finally:
            _stop_group(proc)
            spec_path.unlink(missing_ok=True)
    if rc != 0:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-5:] if log_file.exists() else []
        how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
        raise TuningError(f"the tuning worker stopped with {how}; the records it measured are kept in the "
                          f"database and the next compile resumes from them. Log {log_file}:\n  "
                          + "\n  ".join(tail))


# ----------------------------------------------------------------------------- the driver
def _load_ledger(path: Path) -> dict[str, Any]:
    try:
        ledger = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        ledger = {}
    if not isinstance(ledger, dict) or ledger.get("version") != LEDGER_VERSION:
        ledger = {}  # an older layout: the database stays the truth, only caches are lost
    ledger.setdefault("version", LEDGER_VERSION)
    ledger.setdefault("tasks", {})
    ledger.setdefault("choices", {})
    return ledger


def _write_ledger(path: Path, ledger: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(ledger, indent=1))
    os.replace(tmp, path)


def _say_default(msg: str) -> None:
    print(f"[ctc tune] {msg}", file=sys.stderr, flush=True)


def tune_and_apply(mod: Any, info: Any, *, trials: int, cache_dir: str | Path | None = None,
                   trials_per_task: int | None = None, max_tasks: int | None = None,
                   log: Callable[[str], None] | None = None, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Tune the fused Relax ``mod`` for target ``info`` within ``trials`` measured candidates
    (reusing and extending the persistent database) and apply the best records.

    Returns the module with tuned PrimFuncs (marked scheduled) and a JSON-able summary whose
    counts are read back from the database.  Raises :class:`TuningError` when the worker fails
    as a whole; a task that fails alone is reported and keeps its default schedule.
    """
    with fast_inspect_stack():
        return _tune_and_apply(mod, info, trials=trials, cache_dir=cache_dir, trials_per_task=trials_per_task,
                               max_tasks=max_tasks, log=log, seed=seed)


def _tune_and_apply(mod: Any, info: Any, *, trials: int, cache_dir: str | Path | None, trials_per_task: int | None,
                    max_tasks: int | None, log: Callable[[str], None] | None, seed: int) -> tuple[Any, dict[str, Any]]:
    import tvm_ffi

    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    tgt = info.target()
    wdir = tuning_dir(info, cache_dir)
    wdir.mkdir(parents=True, exist_ok=True)
    workload_file, record_file = wdir / "database_workload.json", wdir / "database_tuning_record.json"
    ledger_path = wdir / "ledger.json"
    ledger = _load_ledger(ledger_path)
    say = log or _say_default

    extracted = [t for t in ms.relax_integration.extract_tasks(mod, tgt) if not _scheduled(t.dispatched[0])]
    tasks = [Task(t.task_name, t.dispatched[0], str(tvm_ffi.structural_hash(t.dispatched[0])), float(t.weight),
                  _flops(t.dispatched[0]), _symbolic_dims(t.dispatched[0])) for t in extracted]
    symbolic = [t for t in tasks if t.symbolic]
    tunable = sorted((t for t in tasks if not t.symbolic), key=lambda t: -t.flops * t.weight)
    if max_tasks is not None:
        tunable = tunable[:max_tasks]
    for t, n in zip(tunable, plan_budget(len(tunable), trials, trials_per_task), strict=True):
        t.allotted = n
    counts = count_records(workload_file, record_file)
    for t in tunable:
        t.records = counts.get(t.shash)
    measured_before = {t.shash: t.measured for t in tunable}

    # a task whose search ended below its allotment (meta-schedule found no more candidates) is
    # not searched again for the same allotment, while the database still holds what that search measured
    # (records lost since, e.g. a damaged record file, are searched again: the database is the truth); a killed
    # run left no ledger entry, so it resumes
    todo, lost = [], []
    for t in tunable:
        left = t.allotted - t.measured
        entry = ledger["tasks"].get(t.shash, {})
        done_for = int(entry.get("searched_for", 0))
        if done_for >= t.allotted and t.measured < int(entry.get("measured", 0)):
            lost.append(t.name)
            done_for = 0
        if left > 0 and done_for < t.allotted:
            todo.append((t, left))
    if lost:
        say(f"the database {wdir} no longer holds the records of {len(lost)} searched task(s) ({lost[0]}"
            f"{', ...' if len(lost) > 1 else ''}; its record file was damaged or replaced?): searching them again")
    import importlib.util

    has_xgb = importlib.util.find_spec("xgboost") is not None
    cost_model = "xgb" if has_xgb else "random"
    summary: dict[str, Any] = {"dir": str(wdir), "trials": trials, "cost_model": cost_model, "tasks": len(tasks),
                               "tunable": len(tunable), "symbolic": sorted(t.name for t in symbolic)}
    if symbolic:
        dims = sorted({d for t in symbolic for d in t.symbolic})
        say(f"{len(symbolic)} of {len(tasks)} tasks have symbolic dims ({', '.join(dims)}) and keep their default "
            "schedules: meta-schedule tunes only fixed shapes (bind them, e.g. the cpu target's seq_len and batch)")
    n_alloc = sum(1 for t in tunable if t.allotted)
    if tunable and n_alloc < len(tunable):
        say(f"trials={trials} covers the {n_alloc} heaviest of {len(tunable)} tunable tasks; the other "
            f"{len(tunable) - n_alloc} keep their default schedules")
    t0 = time.perf_counter()
    failures: dict[str, str] = {}
    if todo:
        if not has_xgb and any(n >= XGB_MIN_TRIALS for _, n in todo):
            say("xgboost is not installed: tuning with a random cost model (pip install xgboost for a better search)")
        say(f"tuning {len(todo)} task{'s' if len(todo) != 1 else ''} ({sum(n for _, n in todo)} trials), "
            f"database {wdir}")
        with tempfile.TemporaryDirectory(prefix="ctc-tune-") as td:
            specs = []
            for i, (t, n) in enumerate(todo):
                f = Path(td) / f"task{i}.json"
                f.write_text(tvm.ir.save_json(t.mod))
                # the XGBoost model needs samples to learn from: below XGB_MIN_TRIALS it costs more than it helps
                model = cost_model if n >= XGB_MIN_TRIALS else "random"
                specs.append({"name": t.name, "module_file": str(f), "weight": t.weight, "trials": n,
                              "cost_model": model})
            spec = {"target": info.tvm, "workload_file": str(workload_file), "record_file": str(record_file),
                    "log_dir": str(wdir / "logs"), "seed": seed, "tasks": specs}
            started: dict[int, float] = {}

            def on_event(ev: dict[str, Any]) -> None:
                i = int(ev["task"])
                t, n = todo[i]
                if ev["event"] == "start":
                    started[i] = time.perf_counter()
                    say(f"task {i + 1}/{len(todo)} {t.name}: {n} trials ({t.measured} already in the database) ...")
                    return
                after = count_records(workload_file, record_file).get(t.shash)
                new = (after.measured if after else 0) - t.measured
                elapsed = time.perf_counter() - t0
                eta = elapsed / (i + 1) * (len(todo) - i - 1)
                if ev["event"] == "error":
                    failures[t.shash] = ev.get("error", "")
                    say(f"task {i + 1}/{len(todo)} {t.name}: FAILED after {new} measured trials: {ev.get('error')} "
                        "(it keeps its default schedule)")
                else:
                    valid = after.valid if after else 0
                    say(f"task {i + 1}/{len(todo)} {t.name}: {new} trials measured, {valid} valid records in the "
                        f"database, best {after.best_ms if after and after.best_ms else '-'} ms "
                        f"({time.perf_counter() - started.get(i, t0):.0f} s; about {eta:.0f} s left)")
                    if new == 0:
                        failures[t.shash] = "meta-schedule measured no candidate (none could be generated or built)"
                ledger["tasks"][t.shash] = {"name": t.name, "searched_for": t.allotted,
                                            "measured": after.measured if after else 0,
                                            "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                            **({"error": failures[t.shash]} if t.shash in failures else {})}
                _write_ledger(ledger_path, ledger)

            try:
                _run_worker(spec, wdir / "logs" / "worker.log", on_event)
            except KeyboardInterrupt:
                now = count_records(workload_file, record_file)
                kept = sum((now[t.shash].measured if t.shash in now else 0) - t.measured for t, _ in todo)
                say(f"tuning interrupted: the {kept} trials measured in this run are kept in {wdir}; the next "
                    "compile resumes from them")
                raise
    summary["tune_s"] = round(time.perf_counter() - t0, 2)

    counts = count_records(workload_file, record_file)
    rows = []
    for t in tunable:
        rec = counts.get(t.shash)
        rows.append({"name": t.name, "allotted": t.allotted, "measured_now": (rec.measured if rec else 0)
                     - measured_before[t.shash], "records": rec.measured if rec else 0,
                     "valid_records": rec.valid if rec else 0, "best_ms": rec.best_ms if rec else None,
                     **({"error": failures[t.shash]} if t.shash in failures else {})})
    summary["per_task"] = [r for r in rows if r["allotted"] or r["records"]]
    summary["trials_measured_now"] = sum(r["measured_now"] for r in rows)
    summary["records_in_database"] = sum(r["records"] for r in rows)
    summary["tasks_with_records"] = sum(1 for r in rows if r["valid_records"] > 0)
    summary["failed"] = sorted(r["name"] for r in rows if "error" in r)

    before = mod
    if summary["tasks_with_records"]:
        db = ms.database.JSONDatabase(str(workload_file), str(record_file), module_equality="structural")
        with tgt, db:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    tuned_names = []
    for gv, f in mod.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc) and _scheduled(tvm.IRModule({"main": f})) and gv in before.functions \
                and not _scheduled(tvm.IRModule({"main": before[gv]})):
            tuned_names.append(_name(gv))
    mod, kept = _keep_faster(before, mod, tgt, ledger["choices"])
    _write_ledger(ledger_path, ledger)
    summary["scheduled_from_database"] = len(tuned_names)
    summary["kept_default"] = kept
    summary["tuned_kernels_used"] = sorted(n for n in tuned_names if n not in kept)
    return mod, summary


def _time_func(func: Any, tgt: Any, number: int = 5, repeat: int = 3) -> float | None:
    """Min seconds of one call of a static-shape PrimFunc on random data (None: cannot time it)."""
    import numpy as np

    import tvm

    try:
        from ctc.backends.tvm.build import tir_pipeline_for

        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tgt,
                          tir_pipeline=tir_pipeline_for(tgt)).jit()
        args = []
        rng = np.random.default_rng(0)
        for p in func.params:
            shape = [int(d) for d in p.shape]
            if "float" in str(p.dtype):
                a = rng.standard_normal(shape).astype(str(p.dtype))
            else:
                a = np.zeros(shape, str(p.dtype))
            args.append(tvm.runtime.tensor(a))
        ev = lib.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)
        return float(min(ev(*args).results))
    except Exception:  # noqa: BLE001 - symbolic shapes or opaque params: keep the tuned version
        return None


def _keep_faster(before: Any, after: Any, tgt: Any, ledger: dict[str, Any]) -> tuple[Any, list[str]]:
    """For every PrimFunc the database scheduled, time it against the default schedule
    (:mod:`.schedules`) and keep the faster one.  Decisions are cached in ``ledger`` (the
    ledger's ``choices``, by workload hash), so later compiles do not re-measure."""
    import tvm_ffi

    import tvm
    from ctc.backends.tvm.schedules import default_rules
    from tvm.s_tir import dlight as dl

    kept: list[str] = []
    for gv, f in list(after.functions_items()):
        if not isinstance(f, tvm.tirx.PrimFunc) or gv not in before.functions:
            continue
        orig = before[gv]
        if not _scheduled(tvm.IRModule({"main": f})) or _scheduled(tvm.IRModule({"main": orig})):
            continue
        key = "choice_" + hashlib.sha1(str(tvm_ffi.structural_hash(orig)).encode()).hexdigest()[:16]
        choice = ledger.get(key, {}).get("choice")
        with tgt:
            dmod = dl.ApplyDefaultSchedule(*default_rules())(tvm.IRModule({"main": orig}))
        dflt = dmod["main"]
        if not _scheduled(dmod):
            continue
        if choice is None:
            t_tuned, t_dflt = _time_func(f, tgt), _time_func(dflt, tgt)
            if t_tuned is None or t_dflt is None:
                continue
            choice = "default" if t_dflt < t_tuned else "tuned"
            ledger[key] = {"name": _name(gv), "choice": choice,
                           "tuned_ms": round(t_tuned * 1e3, 4), "default_ms": round(t_dflt * 1e3, 4)}
        if choice == "default":
            after[gv] = dflt.with_attr("tirx.is_scheduled", True)
            kept.append(ledger[key]["name"])
    return after, kept
