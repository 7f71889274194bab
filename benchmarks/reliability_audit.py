"""Hostile-user audit of issue 9 with the real command line: bad output directories, corrupted artifacts,
checks that must come before capture, recipe reading, and Ctrl-C at several points of a tuned compile.

Each case runs ``python -m ctc`` in a subprocess and prints its exit code, time and first error line,
and ``OK``/``BAD``: BAD when the exit code is not the expected one, a traceback reached the user, or the
case's own check failed (a user's file gone, an artifact left behind, a process outliving Ctrl-C).
The CI tests (tests/test_output_dir.py, test_artifact_integrity.py, test_bad_recipes.py,
test_recipe_reading.py, test_tuning.py) hold the same behaviours on small inputs; this runs them on
the bundled MiniLM, end to end.  It needs a few minutes per MiniLM compile on a quiet 2-core machine.

    python benchmarks/reliability_audit.py [--only SUBSTRING ...] [--interrupt-at 3 20 45 90 150]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ctc.backends.tvm.tuning import live_group_members

ROOT = Path(__file__).resolve().parents[1]
RECIPE = 'model bundled "minilm"\nevaluate lee samples=2 seq_len=32\npipeline {\n    dce\n}\n'
Check = Callable[[str, str], bool]


class Audit:
    """Runs the cases and keeps their verdicts."""

    def __init__(self, work: Path, only: list[str]) -> None:
        self.work, self.only = work, only
        self.rows: list[tuple[str, bool]] = []
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}

    def wanted(self, name: str) -> bool:
        return not self.only or any(o in name for o in self.only)

    def case(self, name: str, args: list[str], want: int | tuple[int, ...], check: Check = lambda o, e: True,
             cwd: Path | None = None, stdin: str | None = None) -> None:
        if not self.wanted(name):
            return
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "ctc", *args], cwd=cwd or self.work, env=self.env, text=True,
                           capture_output=True, input=stdin, timeout=3600)
        codes = (want,) if isinstance(want, int) else want
        ok = p.returncode in codes and "Traceback" not in p.stderr and check(p.stdout, p.stderr)
        first = next((ln for ln in p.stderr.splitlines() if ln.strip()), "")[:200]
        self.report(name, ok, f"rc={p.returncode} {time.time() - t0:6.1f}s  {first}")

    def report(self, name: str, ok: bool, text: str) -> None:
        self.rows.append((name, ok))
        print(f"{'OK ' if ok else 'BAD'} {name}: {text}", flush=True)


def _user_dir(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "thesis.tex").write_text("years of work\n")
    return d


def output_dirs(a: Audit) -> None:
    """Category 1 and 6: no user file is ever deleted; bad destinations fail before the model loads."""
    w = a.work
    proj = _user_dir(w / "proj")
    (proj / "r.ctc").write_text(RECIPE)

    def intact(o: str, e: str) -> bool:
        return (proj / "thesis.tex").is_file() and (proj / "r.ctc").is_file()

    a.case("--out . in the project", ["compile", "r.ctc", "--out", "."], 2, intact, cwd=proj)
    a.case("--out . --force", ["compile", "r.ctc", "--out", ".", "--force"], 2, intact, cwd=proj)
    a.case("--out the recipe's directory", ["compile", "proj/r.ctc", "--out", "proj", "--force"], 2, intact)
    (w / "link").symlink_to(proj)
    a.case("--out a link to the recipe's directory", ["compile", "proj/r.ctc", "--out", "link/."], 2, intact)
    a.case("--out /", ["compile", "proj/r.ctc", "--out", "/"], 2, intact)
    (proj / "up.ctc").write_text(RECIPE + 'emit ".."\n')
    a.case('emit ".."', ["compile", "proj/up.ctc"], 2, intact)
    user = _user_dir(w / "user")
    a.case("--out a user's directory", ["compile", "proj/r.ctc", "--out", "user"], 2,
           lambda o, e: (user / "thesis.tex").is_file())
    (w / "afile").write_text("x")
    a.case("--out under a file", ["compile", "proj/r.ctc", "--out", "afile/sub"], 2,
           lambda o, e: (w / "afile").read_text() == "x")
    a.case("recipe path is a directory", ["compile", "proj"], 2)
    a.case("--force replaces a user's directory (explicit)", ["compile", "proj/r.ctc", "--out", "user", "--force",
                                                               "--quiet"], 0,
           lambda o, e: (user / "manifest.json").is_file() and not (user / "thesis.tex").exists())


def corrupted_artifacts(a: Audit) -> None:
    """Category 4: every damage is refused with the file named; show reads only the report; eval measures."""
    art = a.work / "user"

    def flip(d: Path) -> None:
        p = d / "params.safetensors"
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 1
        p.write_bytes(bytes(b))

    def truncate(d: Path) -> None:
        p = d / "params.safetensors"
        p.write_bytes(p.read_bytes()[:-100])

    def edit_ir(d: Path) -> None:
        p = d / "ir.txt"
        p.write_text(p.read_text().replace("gelu", "relu", 1))

    def link_report(d: Path) -> None:
        (d / "report.json").unlink()
        (d / "report.json").symlink_to("/etc/passwd")

    damages: list[tuple[str, Callable[[Path], None], list[str], int, Check]] = [
        ("bit flip / run", flip, ["run", "ART", "--text", "hello"], 2, lambda o, e: "SHA-256" in e),
        ("truncated / run", truncate, ["run", "ART", "--text", "hello"], 2, lambda o, e: "params.safetensors" in e),
        ("gelu->relu / run", edit_ir, ["run", "ART", "--text", "hello"], 2, lambda o, e: "ir.txt" in e),
        ("report a symlink / show", link_report, ["show", "ART"], 2, lambda o, e: "root:" not in o + e),
        ("bit flip / show (reads only the report)", flip, ["show", "ART"], 0, lambda o, e: True),
        ("intact / eval measures with a baseline", lambda d: None, ["eval", "ART", "--samples", "2", "--seq-len",
                                                                    "32"], 0, lambda o, e: "original" in o + e),
    ]
    for name, damage, args, want, check in damages:
        if not a.wanted("artifact: " + name):
            continue
        if not (art / "manifest.json").is_file():
            a.report("artifact: " + name, False, "no artifact: the --force case of output_dirs writes it")
            continue
        copy = a.work / f"damaged{len(a.rows)}"
        shutil.copytree(art, copy, symlinks=True)
        damage(copy)
        a.case("artifact: " + name, [x.replace("ART", str(copy)) for x in args], want, check)


def before_capture(a: Audit) -> None:
    """Categories 6 and 7: bad values are located errors, before the model is captured."""
    bodies = {
        "seq_len past the positions": 'model bundled "minilm"\nevaluate lee samples=1 seq_len=100000\n'
                                      'pipeline {\n    dce\n}\n',
        "unknown mcpu": RECIPE + 'target cpu mcpu="skylakee"\n',
        "group_size without groups": 'model bundled "minilm"\ncalibrate wiki samples=1 seq_len=32\npipeline {\n'
                                     '    quantize w_granularity="tensor" group_size=32\n}\n',
        "fold_only with gptq": 'model bundled "minilm"\ncalibrate wiki samples=1 seq_len=32\npipeline {\n'
                               '    rptq fold_only=true gptq=true\n}\n',
        "threshold 1e999": RECIPE + "check fidelity >= 1e999\n",
        "option nested 5000 deep": 'model bundled "minilm"\npipeline {\n    dce x=' + "[" * 5000 + "]" * 5000
                                   + "\n}\n",
        "samples=0x10": 'model bundled "minilm"\nevaluate lee samples=0x10\npipeline {\n    dce\n}\n',
        "empty tuning_dir": RECIPE + 'target cpu trials=1 tuning_dir=""\n',
    }
    out = a.work / "never"
    for name, body in bodies.items():
        p = a.work / f"early{len(a.rows)}.ctc"
        p.write_text(body)
        a.case("early: " + name, ["compile", str(p), "--out", str(out)], 2,
               lambda o, e: "[ctc] capture" not in e and not out.exists())


def recipe_reading(a: Audit) -> None:
    """Category 8."""
    w = a.work
    (w / "bom.ctc").write_bytes(b"\xef\xbb\xbf" + RECIPE.encode())
    a.case("a UTF-8 BOM", ["compile", "bom.ctc", "--check-only"], 0)
    a.case("a recipe from a pipe", ["compile", "/dev/stdin", "--check-only"], 0, stdin=RECIPE)
    (w / "big.ctc").write_text(RECIPE + "# filler comment line\n" * 250_000 + "pipelin {\n}\n")
    a.case("a typo at the end of 5 MB", ["compile", "big.ctc", "--check-only"], 2, lambda o, e: ":250006:1:" in e)
    (w / "esc.ctc").write_text('model bundled "minilm\x1b[31m"\n')
    a.case("a terminal escape", ["compile", "esc.ctc", "--check-only"], 2, lambda o, e: "\x1b" not in e)
    (w / "long.ctc").write_text('model bundled "' + "x" * 1_000_000 + '"\n')
    a.case("a 1 MB string", ["compile", "long.ctc", "--check-only"], 2, lambda o, e: len(e) < 5000)
    (w / "ff.ctc").write_text('# a\x0cb\u2028c\x85\nmodel bundled "minilm"\npipeline {\n    dcee\n}\n')
    a.case("form feed, U+2028, U+0085", ["compile", "ff.ctc", "--check-only"], 2, lambda o, e: "ff.ctc:4:5:" in e)


def interrupts(a: Audit, delays: list[float]) -> None:
    """Category 3 and 5: Ctrl-C (SIGINT to the process group, as a terminal sends it) during a tuned
    compile: exit 130, nothing written, no temporary directory, no process left; then a compile to the
    end resumes from the records the interrupted ones kept."""
    w = a.work / "interrupt"
    w.mkdir()
    (w / "r.ctc").write_text(RECIPE + 'target cpu trials=8 tuning_dir="tune"\n')
    for delay in delays:
        name = f"Ctrl-C after {delay:g} s"
        if not a.wanted(name):
            continue
        out = w / "out"
        p = subprocess.Popen([sys.executable, "-m", "ctc", "compile", "r.ctc", "--out", str(out)], cwd=w,
                             env=a.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True,  # SIGINT restored: a background job inherits it ignored
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        os.killpg(p.pid, signal.SIGINT)
        t0 = time.time()
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            _, err = p.communicate()
        left, temps = live_group_members(p.pid) or [], [x.name for x in w.iterdir() if x.name.startswith(".")]
        said = [ln for ln in err.splitlines() if "interrupted" in ln]
        ok = p.returncode == 130 and not out.exists() and not temps and not left and "Traceback" not in err
        a.report(name, ok, f"rc={p.returncode}, exited {time.time() - t0:.1f} s after SIGINT, artifact "
                           f"{out.exists()}, temp dirs {temps}, processes left {left}; {' | '.join(said)[:200]}")
    a.case("the next compile resumes from the records", ["compile", "r.ctc", "--out", "out", "--quiet"], 0,
           lambda o, e: "tunable tasks have records" in o, cwd=w)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=[], help="run only the cases whose name contains one of these")
    ap.add_argument("--interrupt-at", nargs="*", type=float, default=[3, 20, 45, 90, 150],
                    help="seconds into a tuned compile at which to send Ctrl-C")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ctc-audit-"))
    print(f"ctc tree {ROOT}, work directory {work}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    a = Audit(work, args.only)
    try:
        output_dirs(a)
        corrupted_artifacts(a)
        before_capture(a)
        recipe_reading(a)
        interrupts(a, args.interrupt_at)
    finally:
        if not args.keep:
            os.chmod(work, 0o755)
            shutil.rmtree(work, ignore_errors=True)
    bad = [n for n, ok in a.rows if not ok]
    print(f"\n{len(a.rows)} cases, {len(bad)} bad" + "".join(f"\n  BAD {n}" for n in bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
