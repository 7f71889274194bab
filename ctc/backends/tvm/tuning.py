"""Meta-schedule autotuning with a persistent, resumable database keyed by target and workload.

Why: the default schedules (:mod:`.schedules`) are good but fixed; meta-schedule searches
per-kernel schedules.  Tuning is slow (minutes), so:

* records live in a JSON database under ``<cache>/<target-key>/`` (default cache
  ``~/.cache/ctc/tuning``; override with ``cache_dir``/``--tuning-dir``); the target key names
  the LLVM CPU, core count and feature flags (:func:`ctc.backends.tvm.targets.target_key`);
* a task (one fused PrimFunc, identified by its structural hash) whose trials were completed
  earlier is not tuned again (``ledger.json``): a second compile of the same model spends no
  tuning time;
* meta-schedule commits every measured record to the JSON files as it comes, so an
  interrupted run keeps its records and the next run resumes: tasks without a ledger entry are
  tuned again, starting from the records already in the database;
* the trial budget is spent on the heaviest tasks first (estimated FLOPs x call count); the
  rest keep their default schedules;
* a tuned kernel is used only where it beats the default schedule (both timed in-process
  once; the choice is cached in the ledger): with a small budget meta-schedule's best can be
  slower than the hand-written matmul schedule.

TVM 0.27 facts applied (see ``docs``/tvm-notes): ``inspect.stack`` is replaced by a cheap
version in this process and in every builder worker (``import tvm.s_tir.tensor_intrin`` takes
~39 s otherwise and the builder times out), the builder timeout is raised, and the fixed VNNI
intrinsic of :mod:`.int_kernels` is registered in the workers.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import linecache
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["default_cache_dir", "install_fast_inspect_stack", "tune_and_apply", "tuning_dir"]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ctc/tuning`` (``~/.cache/ctc/tuning``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ctc" / "tuning"


def tuning_dir(info: Any, cache_dir: str | Path | None = None) -> Path:
    """The database directory for target ``info`` (a :class:`~.targets.TargetInfo`)."""
    from ctc.backends.tvm.targets import target_key

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / target_key(info)


# ----------------------------------------------------------------------------- inspect.stack workaround
_ORIG_STACK = inspect.stack


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


def install_fast_inspect_stack() -> None:
    """Replace ``inspect.stack`` process-wide (idempotent); also used as the builder initializer."""
    inspect.stack = _fast_stack  # type: ignore[assignment]


def _builder_init() -> None:
    install_fast_inspect_stack()
    try:
        from ctc.backends.tvm.int_kernels import register_vnni_intrinsics

        register_vnni_intrinsics()
    except Exception:  # noqa: BLE001 - int kernels absent or no VNNI: nothing to register
        pass


# ----------------------------------------------------------------------------- task selection
def _flops(mod: Any) -> float:
    try:
        from tvm.s_tir.analysis import estimate_tir_flops

        return float(estimate_tir_flops(mod))
    except Exception:  # noqa: BLE001 - dynamic shapes etc.
        return 0.0


def _task_key(task: Any) -> str:
    import tvm_ffi

    return hashlib.sha1(str(tvm_ffi.structural_hash(task.dispatched[0])).encode()
                        + task.task_name.encode()).hexdigest()[:16]


def _scheduled(mod: Any) -> bool:
    for _, f in mod.functions_items():
        attrs = getattr(f, "attrs", None)
        if attrs is not None and "tirx.is_scheduled" in attrs and int(attrs["tirx.is_scheduled"]) == 1:
            return True
    return False


def tune_and_apply(mod: Any, info: Any, *, trials: int, cache_dir: str | Path | None = None,
                   trials_per_task: int | None = None, max_tasks: int | None = None,
                   log: Any = None) -> tuple[Any, dict[str, Any]]:
    """Tune the fused Relax ``mod`` for target ``info`` within ``trials`` measured candidates
    (reusing and extending the persistent database) and apply the best records.

    Returns the module with tuned PrimFuncs (marked scheduled) and a JSON-able summary.
    """
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    install_fast_inspect_stack()
    _builder_init()
    tgt = info.target()
    wdir = tuning_dir(info, cache_dir)
    wdir.mkdir(parents=True, exist_ok=True)
    ledger_path = wdir / "ledger.json"
    ledger: dict[str, Any] = json.loads(ledger_path.read_text()) if ledger_path.exists() else {}
    db = ms.database.JSONDatabase(str(wdir / "database_workload.json"), str(wdir / "database_tuning_record.json"),
                                  module_equality="structural")
    say = log or (lambda msg: print(f"[ctc tune] {msg}", file=sys.stderr, flush=True))

    tasks = [t for t in ms.relax_integration.extract_tasks(mod, tgt) if not _scheduled(t.dispatched[0])]
    scored = sorted(tasks, key=lambda t: -_flops(t.dispatched[0]) * float(t.weight))
    if max_tasks is not None:
        scored = scored[:max_tasks]
    todo = [t for t in scored if _task_key(t) not in ledger]
    # The budget covers this module's tasks, trials spent in earlier runs included: a second
    # compile with the same budget tunes nothing; a larger budget tunes the next-heaviest tasks.
    spent = sum(int(ledger[_task_key(t)].get("trials", 0)) for t in scored if _task_key(t) in ledger)
    left = max(0, trials - spent)
    per_task = trials_per_task or max(16, min(256, trials // max(1, len(scored))))
    chosen = todo[: left // per_task] if left >= per_task else []
    summary: dict[str, Any] = {"dir": str(wdir), "tasks": len(tasks), "already_tuned": len(scored) - len(todo),
                               "tuned_now": len(chosen), "trials_per_task": per_task, "trials": trials,
                               "trials_spent_before": spent}
    import importlib.util

    cost_model = "xgb" if importlib.util.find_spec("xgboost") is not None else "random"
    summary["cost_model"] = cost_model
    t0 = time.perf_counter()
    if chosen:
        if cost_model == "random":
            say("xgboost is not installed: tuning with a random cost model (pip install xgboost for a better search)")
        say(f"tuning {len(chosen)} of {len(tasks)} tasks, {per_task} trials each, database {wdir}")
        builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=300.0, initializer=_builder_init)
        runner = ms.runner.LocalRunner(timeout_sec=60.0, evaluator_config=ms.runner.EvaluatorConfig(
            number=3, repeat=1, min_repeat_ms=50, enable_cpu_cache_flush=False))
        # One task at a time, heaviest first: a progress line per task, and the ledger is written
        # after each, so an interrupted run resumes at the first unfinished task.
        for i, t in enumerate(chosen, 1):
            t1 = time.perf_counter()
            ctx = ms.TuneContext(mod=t.dispatched[0], target=tgt, space_generator="post-order-apply",
                                 search_strategy="evolutionary", task_name=t.task_name, num_threads="physical")
            ms.tune.tune_tasks(tasks=[ctx], task_weights=[float(t.weight)], work_dir=str(wdir / "logs"),
                               max_trials_global=per_task, max_trials_per_task=per_task,
                               num_trials_per_iter=min(32, per_task), builder=builder, runner=runner, database=db,
                               task_scheduler="round-robin", cost_model=cost_model)
            ledger[_task_key(t)] = {"name": t.task_name, "trials": per_task, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            ledger_path.write_text(json.dumps(ledger, indent=1))
            done = time.perf_counter() - t0
            say(f"task {i}/{len(chosen)} {t.task_name}: {per_task} trials in {time.perf_counter() - t1:.0f} s "
                f"(elapsed {done:.0f} s, about {done / i * (len(chosen) - i):.0f} s left)")
    summary["tune_s"] = round(time.perf_counter() - t0, 2)
    before = mod
    with tgt, db:
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    applied = sum(1 for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and _scheduled(
        tvm.IRModule({"main": f})))
    summary["scheduled_after_apply"] = applied
    mod, kept = _keep_faster(before, mod, tgt, ledger)
    ledger_path.write_text(json.dumps(ledger, indent=1))
    summary["kept_default"] = kept
    return mod, summary


def _time_func(func: Any, tgt: Any, number: int = 5, repeat: int = 3) -> float | None:
    """Min seconds of one call of a static-shape PrimFunc on random data (None: cannot time it)."""
    import numpy as np

    import tvm

    try:
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tgt).jit()
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
    (:mod:`.schedules`) and keep the faster one.  Decisions are cached in the ledger (by
    workload hash), so later compiles do not re-measure."""
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
            ledger[key] = {"name": gv.name_hint if hasattr(gv, "name_hint") else str(gv), "choice": choice,
                           "tuned_ms": round(t_tuned * 1e3, 4), "default_ms": round(t_dflt * 1e3, 4)}
        if choice == "default":
            after[gv] = dflt.with_attr("tirx.is_scheduled", True)
            kept.append(ledger[key]["name"])
    return after, kept
