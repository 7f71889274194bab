"""benchmarks/cpu_artifact_ab.py: bad arguments end with a message naming the fix, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "cpu_artifact_ab.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_one_artifact_is_refused(tmp_path: Path) -> None:
    r = _run(str(tmp_path))
    assert r.returncode != 0 and "give at least two artifacts" in r.stderr and "Traceback" not in r.stderr


def test_an_artifact_without_a_cpu_target_is_named(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "targets" / "cpu").mkdir(parents=True)
    b.mkdir()
    r = _run(str(a), str(b))
    assert r.returncode != 0 and f"{b}: no compiled cpu target" in r.stderr and "Traceback" not in r.stderr


def test_counts_below_one_are_refused(tmp_path: Path) -> None:
    r = _run(str(tmp_path), str(tmp_path), "--rounds", "0")
    assert r.returncode == 2 and "--rounds: 0 must be at least 1" in r.stderr and "Traceback" not in r.stderr
