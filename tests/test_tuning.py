"""Tuning that really tunes: budgets, counts read back from the database, resume, Ctrl-C, symbolic shapes.

The real meta-schedule runs here use a one-linear module and a few trials (CI-sized); MiniLM at
trials 1/8/48/320 is in the slow tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ctc.backends.tvm import tuning
from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled
from ctc.backends.tvm.tuning import plan_budget
from ctc.backends.tvm.tuning_db import count_records
from ctc.driver import CompileOptions, fit_batch, report_summary, selected_targets
from ctc.dsl.parser import parse
from ctc.errors import UsageError
from ctc.ir.graph import Module
from ctc.ir.interpreter import interpret
from ctc.ir.types import TensorType

ROOT = Path(__file__).resolve().parents[1]
# the tuned task here is the f32 matmul: on a CPU with AMX-BF16 the default (fp32_matmul=auto) runs it as a
# hand-written tile kernel, which meta-schedule does not tune
STRICT = {"fp32_matmul": "strict"}


def _linear_gelu(shape: tuple[Any, ...] = (1, 16, 32)) -> Module:
    g = torch.Generator().manual_seed(0)
    m = Module("tune")
    x = m.add_input("x", TensorType(shape, "f32"))
    m.add_param("w", torch.randn(32, 32, generator=g))
    m.add_param("b", torch.randn(32, generator=g))
    y = m.create_node("linear", [x, m.param("w"), m.param("b")], {}).output
    m.set_outputs([m.create_node("gelu", [y], {}).output])
    return m


# ----------------------------------------------------------------------------- budget
@given(n=st.integers(1, 60), trials=st.integers(1, 2000))
def test_budget_is_spent_exactly_heaviest_first(n: int, trials: int) -> None:
    plan = plan_budget(n, trials)
    assert sum(plan) == trials and len(plan) == n
    tuned = [x for x in plan if x]
    assert plan[: len(tuned)] == tuned, "tuned tasks are the heaviest (a prefix)"
    assert min(tuned) >= min(trials, tuning.MIN_TRIALS_PER_TASK)


@pytest.mark.parametrize(("trials", "tuned", "first"), [(1, 1, 1), (8, 1, 8), (48, 3, 16), (320, 20, 16)])
def test_budget_on_minilm_task_count(trials: int, tuned: int, first: int) -> None:
    plan = plan_budget(20, trials)  # a fixed-shape MiniLM build has about 15-20 tasks
    assert sum(1 for x in plan if x) == tuned and plan[-1] in (0, first) and sum(plan) == trials


def test_budget_with_fixed_per_task() -> None:
    assert plan_budget(5, 20, per_task=8) == [8, 8, 0, 0, 0]
    assert plan_budget(3, 0) == [0, 0, 0] and plan_budget(0, 10) == []


# ----------------------------------------------------------------------------- database accounting
def test_count_records_reads_what_the_database_holds(tmp_path: Path) -> None:
    wf, rf = tmp_path / "database_workload.json", tmp_path / "database_tuning_record.json"
    wf.write_text('["111", "AAA"]\n["222", "BBB"]\n')
    rec = [[0, [[], [0.002, 0.004], {}, []]], [0, [[], [1e10], {}, []]], [1, [[], [0.5], {}, []]],
           [0, [[], [0.001], {}, []]]]
    rf.write_text("".join(json.dumps(r) + "\n" for r in rec) + '[1, [[], [0.1')  # a write cut short by a kill
    counts = count_records(wf, rf)
    assert counts["111"].measured == 3 and counts["111"].valid == 2 and counts["111"].best_ms == 1.0
    assert counts["222"].measured == 1 and counts["222"].best_ms == 500.0
    assert count_records(tmp_path / "none", tmp_path / "none2") == {}


# ----------------------------------------------------------------------------- what gets tuned
def test_symbolic_tasks_are_not_tuned_and_say_why(tmp_path: Path) -> None:
    """Meta-schedule cannot tile loops of symbolic length (its traces break): such tasks are listed,
    keep default schedules, and no worker starts."""
    said: list[str] = []
    m = _linear_gelu(("batch", "seq", 32))
    import tvm

    from ctc.backends.tvm import targets as T
    from ctc.backends.tvm.build import relax_passes
    from ctc.backends.tvm.lower import lower

    info = T.resolve("cpu", None)
    tgt = info.target()
    with tgt, tvm.transform.PassContext(opt_level=3):
        mod = relax_passes(tgt)(lower(m, target=tgt).mod)
    _, summary = tuning.tune_and_apply(mod, info, trials=8, cache_dir=tmp_path, log=said.append)
    assert summary["tunable"] == 0 and summary["symbolic"] and summary["trials_measured_now"] == 0
    assert any("symbolic dims (batch, seq)" in s and "meta-schedule tunes only fixed shapes" in s for s in said)
    assert not list(tmp_path.rglob("database_tuning_record.json")) or count_records(
        *sorted(tmp_path.rglob("database_*.json"))) == {}


def test_a_task_that_produces_no_records_is_reported_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never report tuning that produced no records: a worker that measures nothing -> FAILED, not tuned."""
    events = [{"event": "start", "task": 0}, {"event": "done", "task": 0}]

    def fake_worker(spec: dict[str, Any], log_file: Path, on_event: Any) -> None:
        for ev in events:
            on_event(ev)

    monkeypatch.setattr(tuning, "_run_worker", fake_worker)
    said: list[str] = []
    comp = compile_module(_linear_gelu(), options=BuildOptions(trials=4, tuning_dir=tmp_path, **STRICT))
    t = comp.meta["tuning"]
    assert t["tasks_with_records"] == 0 and t["trials_measured_now"] == 0 and t["failed"] == ["fused_matmul_add_gelu"]
    assert "measured no candidate" in t["per_task"][0]["error"]
    line = report_summary({"targets": [{"kind": "cpu", "dir": "targets/cpu", "tuning": t}]})
    assert "0 of 1 tunable tasks have records" in line and "FAILED: fused_matmul_add_gelu" in line
    events[1] = {"event": "error", "task": 0, "error": "ValueError: boom"}
    monkeypatch.setattr(tuning, "_say_default", said.append)
    (next(tmp_path.rglob("ledger.json"))).unlink()
    t = compile_module(_linear_gelu(), options=BuildOptions(trials=4, tuning_dir=tmp_path, **STRICT)).meta["tuning"]
    assert t["per_task"][0]["error"] == "ValueError: boom" and any("FAILED" in s for s in said)


def test_records_lost_since_a_search_are_searched_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A searched task whose records are gone from the database (a damaged record file) was skipped for good: the
    ledger's 'searched_for' alone said done, and the compile reported 0 tasks with records without a word. The
    database is the truth: the task is searched again, and the log says why."""
    from ctc.backends.tvm.tuning_db import TaskRecords

    held: dict[str, TaskRecords] = {}  # what the database holds, by workload hash (patched in for count_records)
    searches: list[int] = []

    def fake_worker(spec: dict[str, Any], log_file: Path, on_event: Any) -> None:
        searches.append(len(spec["tasks"]))
        for i, task in enumerate(spec["tasks"]):
            on_event({"event": "start", "task": i})
            held["*"] = TaskRecords(task["trials"], task["trials"], 0.01)
            on_event({"event": "done", "task": i})

    class Every(dict):  # the same records for every workload (the module has one task)
        def get(self, key: Any, default: Any = None) -> Any:
            return held.get("*", default)

        def __contains__(self, key: object) -> bool:
            return "*" in held

        def __getitem__(self, key: Any) -> Any:
            return held["*"]

    monkeypatch.setattr(tuning, "_run_worker", fake_worker)
    monkeypatch.setattr(tuning, "count_records", lambda *_: Every())
    said: list[str] = []
    monkeypatch.setattr(tuning, "_say_default", said.append)
    options = BuildOptions(trials=4, tuning_dir=tmp_path, **STRICT)
    compile_module(_linear_gelu(), options=options)
    compile_module(_linear_gelu(), options=options)
    assert searches == [1]  # the second compile found the records and searched nothing
    held.clear()  # the record file was damaged: the database holds nothing now
    compile_module(_linear_gelu(), options=options)
    assert searches == [1, 1] and any("no longer holds the records of 1 searched task" in s for s in said), said


# ----------------------------------------------------------------------------- recipes
def _recipe(tmp_path: Path, target: str, evaluate: str = "evaluate lee samples=2 seq_len=64\n") -> Any:
    d = tmp_path / "recipes"
    d.mkdir(exist_ok=True)
    f = d / "r.ctc"
    f.write_text(f'model bundled "minilm"\n{evaluate}pipeline {{\n    dce\n}}\n{target}\n')
    return parse(f.read_text(), str(f))


def test_tuned_build_gets_fixed_shapes_and_recipe_relative_tuning_dir(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, 'target cpu trials=8 tuning_dir="tune"')
    (t,) = selected_targets(recipe, CompileOptions())
    assert t.options.tuning_dir == str((tmp_path / "recipes" / "tune").absolute())
    assert t.options.seq_len == 64 and t.options.batch == 1
    assert any("seq_len=64 (the evaluate line's" in n for n in t.notes) and any("batch=1" in n for n in t.notes)
    (t,) = selected_targets(_recipe(tmp_path, "target cpu seq_len=32 batch=2 trials=8"), CompileOptions())
    assert (t.options.seq_len, t.options.batch, t.notes) == (32, 2, ())
    (t,) = selected_targets(_recipe(tmp_path, "target cpu trials=8", evaluate=""), CompileOptions())
    assert t.options.seq_len == 128 and "the default" in t.notes[0]
    (t,) = selected_targets(_recipe(tmp_path, "target cpu"), CompileOptions())
    assert (t.options.seq_len, t.options.batch) == (0, 0), "an untuned build stays any-shape"
    (t,) = selected_targets(_recipe(tmp_path, "target cpu"), CompileOptions(tune=True))
    assert t.trials == 64 and t.options.seq_len == 64


def test_a_tuning_dir_without_trials_says_it_is_unused(tmp_path: Path) -> None:
    """`target cpu tuning_dir="tune"` without trials= built with default schedules, read no database and said
    nothing: the option was accepted and ignored. The build now notes it and names the fix; with --tune it is used."""
    (t,) = selected_targets(_recipe(tmp_path, 'target cpu tuning_dir="tune"'), CompileOptions())
    assert any("tuning_dir is not used" in n and "trials=N" in n and "--tune" in n for n in t.notes), t.notes
    (t,) = selected_targets(_recipe(tmp_path, 'target cpu tuning_dir="tune"'), CompileOptions(tune=True))
    assert not any("tuning_dir" in n for n in t.notes), t.notes
    (t,) = selected_targets(_recipe(tmp_path, 'target cpu tuning_dir="tune" trials=4'), CompileOptions(tune=False))
    assert any("tuning_dir is not used: --no-tune was given" in n for n in t.notes), t.notes


def test_a_tuned_build_of_a_fixed_shape_model_binds_no_shapes(tmp_path: Path) -> None:
    """`target cpu trials=2` on an MLP from a .pt2 (x f32[2, 16]) noted 'built for seq_len=128' and 'batch=1', then
    failed: 'seq_len=128 given, but the model's inputs have fixed shapes already; remove seq_len' (the user gave
    none). Once the model is captured, the shapes a tuned build chose for dims it lacks are dropped, notes too."""
    from ctc.backends.tvm.build import _options_from_target
    from ctc.driver import fit_target_shapes

    mlp = Module("mlp")
    mlp.set_outputs([mlp.create_node("relu", [mlp.add_input("x", TensorType([2, 16], "f32"))]).output])
    (t,) = selected_targets(_recipe(tmp_path, "target cpu trials=2", evaluate=""), CompileOptions())
    assert (t.options.seq_len, t.options.batch) == (128, 1)
    fitted = fit_target_shapes(t, mlp)
    assert (fitted.options.seq_len, fitted.options.batch, fitted.notes) == (0, 0, ()), fitted
    assert _options_from_target(fitted, mlp).static_dims == {}
    cnn = Module("cnn")  # a dynamic batch only: the batch stays bound (tuning needs it), the length is dropped
    cnn.set_outputs([cnn.create_node("relu", [cnn.add_input("x", TensorType(["d0", 3, 8], "f32"))]).output])
    fitted = fit_target_shapes(t, cnn)
    assert (fitted.options.seq_len, fitted.options.batch) == (0, 1) and len(fitted.notes) == 1, fitted
    assert "batch=1" in fitted.notes[0] and _options_from_target(fitted, cnn).static_dims == {"d0": 1}
    assert fit_target_shapes(t, _linear_gelu(("batch", "seq", 32))) is t  # a text model's dims: both kept


def test_a_tuned_build_fits_its_length_to_the_models_positions(tmp_path: Path) -> None:
    """`target cpu trials=1` on a BERT with 64 positions (no evaluation data): the build chose seq_len=128 and died
    in TVM ('broadcast_to expects ... 128 ... 64'), a traceback. The chosen length is now the model's 64 (the note
    says so); a seq_len the user gives past it is a UsageError naming the limit, before any TVM code runs."""
    from ctc.backends.tvm.build import _options_from_target
    from ctc.driver import fit_target_shapes
    from ctc.targets import CpuOptions, TargetConfig

    m = Module("pos")  # the HF encoder pattern: position_ids[:, 0:seq] of a 64-long buffer
    ids = m.add_input("input_ids", TensorType(("batch", "seq"), "i64"))
    m.add_param("position_ids", torch.arange(64).unsqueeze(0))
    pos = m.create_node("slice", [m.param("position_ids")], {"axis": 1, "start": [0], "end": ["seq"]}).output
    m.set_outputs([m.create_node("add", [ids, pos]).output])
    (t,) = selected_targets(_recipe(tmp_path, "target cpu trials=1", evaluate=""), CompileOptions())
    fitted = fit_target_shapes(t, m)
    assert fitted.options.seq_len == 64 and any("seq_len=64" in n and "64 positions" in n for n in fitted.notes), \
        fitted.notes
    assert _options_from_target(fitted, m).static_dims == {"seq": 64, "batch": 1}
    with pytest.raises(UsageError, match=r"seq_len=128, but the model takes at most 64.*give seq_len <= 64"):
        _options_from_target(TargetConfig("cpu", CpuOptions(seq_len=128)), m)


def test_fit_batch() -> None:
    ids = torch.arange(10).reshape(2, 5)
    out = fit_batch({"input_ids": ids, "scalar": torch.tensor(1)}, type("O", (), {"batch": 3, "seq_len": 7})())
    assert out["input_ids"].shape == (3, 7) and out["input_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert fit_batch({"input_ids": ids}, object())["input_ids"] is ids


def test_fixed_shape_library_says_what_it_takes(tmp_path: Path) -> None:
    comp = compile_module(_linear_gelu(("batch", "seq", 32)), options=BuildOptions(static_dims={"batch": 1, "seq": 8}))
    comp.export(tmp_path)
    lib = load_compiled(tmp_path)
    x = torch.randn(1, 8, 32)
    torch.testing.assert_close(lib(x)[0], interpret(_linear_gelu(("batch", "seq", 32)), [x])[0], rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(UsageError, match=r"built for fixed shapes \(batch=1, seq=8\): input 'x' axis 1 must be 8, "
                                         r"got 5"):
        lib(torch.randn(1, 5, 32))


# ----------------------------------------------------------------------------- real tuning, interrupted and resumed
_TUNE = textwrap.dedent("""
    import signal, sys, torch
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background process starts with SIGINT ignored
    sys.path.insert(0, sys.argv[3])
    from test_tuning import _linear_gelu
    from ctc.backends.tvm.build import BuildOptions, compile_module
    comp = compile_module(_linear_gelu(), options=BuildOptions(trials=int(sys.argv[1]), tuning_dir=sys.argv[2],
                                                               fp32_matmul="strict"))
""")


def _session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (exited ones awaiting their reaper are not counted)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # a zombie has exited (pid 1 reaps it when it will)
                out.append(int(d.name))
    return out


# a worker that exits on SIGTERM at once, leaving a pool process (in its group) that ignores SIGTERM
_STUBBORN_POOL = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                      "print('ready', flush=True); time.sleep(60)"], stdout=sys.stdout)
    time.sleep(60)
""")


def test_stopping_the_worker_returns_only_when_its_whole_group_is_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _STUBBORN_POOL], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    assert len(tuning.live_group_members(proc.pid) or []) == 2
    t0 = time.monotonic()
    tuning._stop_group(proc)
    assert tuning.live_group_members(proc.pid) == [] and proc.returncode is not None
    assert time.monotonic() - t0 < 10
    proc.stdout.close()


def _worker_of(parent: int) -> int | None:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == parent and b"ctc.backends.tvm.tune_worker" in cmd:
                return int(d.name)
    return None


def test_ctrl_c_stops_everything_and_the_next_compile_resumes_from_the_records(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", _TUNE, "8", str(tmp_path), str(ROOT / "tests")],
                         stderr=subprocess.PIPE, text=True, env=env)
    records = None
    worker = None
    deadline = time.time() + 300
    while time.time() < deadline:
        worker = worker or _worker_of(p.pid)
        found = list(tmp_path.rglob("database_tuning_record.json"))
        if found and found[0].read_text().count("\n") >= 2:
            records = found[0]
            break
        assert p.poll() is None, p.stderr.read() if p.stderr else ""
        time.sleep(0.2)
    assert records is not None and worker is not None, "no records appeared"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "KeyboardInterrupt" in err
    assert "tuning interrupted: the" in err and "the next compile resumes from them" in err
    assert _session_members(worker) == [], "a tuning process outlived the interrupted compile"
    kept = records.read_text().count("\n")
    assert 2 <= kept < 8

    first = compile_module(_linear_gelu(), options=BuildOptions(trials=8, tuning_dir=tmp_path, **STRICT))
    t = first.meta["tuning"]
    (row,) = t["per_task"]
    assert row["measured_now"] == 8 - kept and row["records"] == 8 == records.read_text().count("\n")
    assert t["records_in_database"] == 8 and t["tasks_with_records"] == 1 and not t["failed"]
    counts = count_records(records.with_name("database_workload.json"), records)
    assert sum(c.measured for c in counts.values()) == t["records_in_database"]

    # the same budget again: nothing to tune, with or without the ledger (the records are the truth)
    (records.parent / "ledger.json").unlink()
    again = compile_module(_linear_gelu(), options=BuildOptions(trials=8, tuning_dir=tmp_path, **STRICT))
    assert again.meta["tuning"]["trials_measured_now"] == 0 and again.timings["tune_s"] < 30
    assert again.meta["tuning"]["tasks_with_records"] == 1
    x = torch.randn(1, 16, 32)
    for comp in (first, again):
        comp.export(tmp_path / "lib")
        torch.testing.assert_close(load_compiled(tmp_path / "lib")(x)[0], interpret(_linear_gelu(), [x])[0],
                                   rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- MiniLM, every budget (slow)
@pytest.mark.slow
@pytest.mark.parametrize("trials", [1, 8, 48, 320])
def test_minilm_tunes_at_every_budget(trials: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`target cpu trials=N` on the real MiniLM: the compile succeeds, the report's counts are the database's."""
    from ctc.cli import EXIT_OK, main

    recipe = tmp_path / "r.ctc"
    recipe.write_text(f'model bundled "minilm"\nevaluate lee samples=1 seq_len=64\npipeline {{\n    dce\n}}\n'
                      f'target cpu trials={trials} tuning_dir="tune"\n')
    assert main(["compile", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == EXIT_OK
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (target,) = report["targets"]
    t = target["tuning"]
    assert target["options"]["seq_len"] == 64 and target["options"]["batch"] == 1
    assert t["tunable"] > 0 and not t["symbolic"] and not t["failed"]
    (wf,) = (tmp_path / "tune").rglob("database_workload.json")
    counts = count_records(wf, wf.with_name("database_tuning_record.json"))
    assert t["records_in_database"] == sum(c.measured for c in counts.values()) == t["trials_measured_now"]
    assert 0 < t["trials_measured_now"] <= trials == sum(r["allotted"] for r in t["per_task"])
    assert t["tasks_with_records"] == sum(1 for r in t["per_task"] if r["valid_records"])
    assert "tunable tasks have records" in capsys.readouterr().out
