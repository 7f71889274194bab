"""The meta-schedule tuning worker: ``python -m ctc.backends.tvm.tune_worker SPEC.json``.

Why a separate process: meta-schedule runs builder and runner pools of its own processes and
spends minutes inside C++; a Ctrl-C delivered into that (or an interpreter exit with the pools
alive) crashed ctc and once left a pool process running.  :mod:`.tuning` starts this worker in
a session of its own and, on Ctrl-C, SIGTERM or any error, kills the worker's whole process
group, so nothing survives the compile; the worker also asks Linux to kill it if its parent dies.

The spec names the target, the database files and the tasks (each a PrimFunc module saved with
``tvm.ir.save_json``, a weight and a trial count).  The worker tunes them in order and prints one
JSON line per event on stdout: ``{"event": "start"|"done"|"error", "task": i, ...}``.  Every
measured candidate is committed to the JSON database as it is measured (meta-schedule's
``AddToDatabase``), so records survive however the worker ends.
"""

from __future__ import annotations

import ctypes
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: SIGKILL this process when the parent (the compile) dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: the parent's process-group kill still applies
        pass


def _emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def run(spec: dict[str, Any]) -> int:
    """Tune every task of ``spec``; one JSON event line per start/finish/error.  Candidates are measured
    in batches of a quarter of a task's trials (2 to 32), so an interrupted task keeps most of its work."""
    import tvm
    from ctc.backends.tvm.tuning import builder_init
    from tvm.s_tir import meta_schedule as ms

    builder_init()
    tgt = tvm.target.Target(spec["target"])
    db = ms.database.JSONDatabase(spec["workload_file"], spec["record_file"], module_equality="structural")
    builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=300.0, initializer=builder_init)
    runner = ms.runner.LocalRunner(timeout_sec=60.0, evaluator_config=ms.runner.EvaluatorConfig(
        number=3, repeat=1, min_repeat_ms=50, enable_cpu_cache_flush=False))
    for i, task in enumerate(spec["tasks"]):
        t0 = time.perf_counter()
        _emit(event="start", task=i, name=task["name"], trials=task["trials"])
        try:
            mod = tvm.ir.load_json(Path(task["module_file"]).read_text())
            trials = int(task["trials"])
            # a population in proportion to the budget: meta-schedule's 512 only pays off for long searches
            search = ms.search_strategy.EvolutionarySearch(population_size=max(64, min(512, 8 * trials)))
            ctx = ms.TuneContext(mod=mod, target=tgt, space_generator="post-order-apply", search_strategy=search,
                                 task_name=task["name"], num_threads="physical", rand_state=int(spec.get("seed", 0)))
            ms.tune.tune_tasks(tasks=[ctx], task_weights=[float(task["weight"])], work_dir=spec["log_dir"],
                               max_trials_global=trials, max_trials_per_task=trials,
                               num_trials_per_iter=min(32, max(2, trials // 4)), builder=builder, runner=runner,
                               database=db, task_scheduler="round-robin", cost_model=task["cost_model"])
        except Exception as e:  # noqa: BLE001 - reported per task; the parent decides what it means
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            _emit(event="error", task=i, name=task["name"], error=f"{type(e).__name__}: "
                                                                  f"{lines[-1] if lines else ''}"[:500],
                  seconds=round(time.perf_counter() - t0, 2))
            continue
        _emit(event="done", task=i, name=task["name"], seconds=round(time.perf_counter() - t0, 2))
    return 0


def main(argv: list[str]) -> int:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns Ctrl-C and stops this process group
    spec = json.loads(Path(argv[1]).read_text())
    return run(spec)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
