"""Output directories: ctc replaces only what it wrote, never its own inputs, and cleans up after killed runs.

The data-loss cases of issue 9 (``--out .``, ``--out`` on a user's directory, ``emit ".."``, the recipe's
own directory, directly or through a link), stale temporary directories, and SIGKILL / SIGTERM during
the artifact write.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ctc.artifact import write_artifact
from ctc.cli import EXIT_OK, EXIT_USAGE, main
from ctc.errors import OutputDirError
from ctc.ir.graph import Module
from ctc.ir.types import TensorType
from ctc.output_dir import PARTIAL_MARKER, check_destination, remove_stale_temps

ROOT = Path(__file__).resolve().parents[1]
RECIPE = 'model bundled "minilm"\npipeline {\n    dce\n}\n'


def _module() -> Module:
    m = Module("tiny")
    m.add_input("x", TensorType((2, 3), "f32"))
    m.add_param("w", torch.ones(2, 3))
    m.set_outputs([m.param("w")], ["w"])
    return m


def _user_dir(d: Path) -> dict[str, str]:
    d.mkdir(parents=True, exist_ok=True)
    files = {"thesis.tex": "years of work\n", "data/results.csv": "1,2,3\n"}
    for name, text in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return files


def _intact(d: Path, files: dict[str, str]) -> bool:
    return all((d / n).is_file() and (d / n).read_text() == t for n, t in files.items())


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's project directory holding a recipe and other files; the working directory is inside it."""
    proj = tmp_path / "project"
    _user_dir(proj)
    (proj / "recipes").mkdir()
    (proj / "recipes" / "r.ctc").write_text(RECIPE)
    monkeypatch.chdir(proj)
    return proj


@pytest.mark.parametrize("out", [".", "..", "recipes", "recipes/..", "data/.."])
def test_out_holding_recipe_or_workdir_is_refused_even_with_force(project: Path, out: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    for extra in ([], ["--force"]):
        rc = main(["compile", "recipes/r.ctc", "--out", out, "--check-only", *extra])
        err = capsys.readouterr().err
        assert rc == EXIT_USAGE, err
        assert "never replaces a directory holding its own inputs or the working directory" in err
        assert "Traceback" not in err
    assert _intact(project, {"thesis.tex": "years of work\n"}) and (project / "recipes" / "r.ctc").is_file()


def test_emit_dotdot_is_refused(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "recipes" / "r.ctc").write_text(RECIPE + 'emit ".."\n')
    assert main(["compile", "recipes/r.ctc", "--check-only"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "recipes/r.ctc:5:1: error: output recipes/.. " in err and "contains the recipe" in err


def test_symlinked_recipe_directory_is_refused(project: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    link = tmp_path / "link"
    link.symlink_to(project / "recipes")
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "link2").symlink_to(project / "recipes", target_is_directory=True)
    for out in (str(link), str(other / "link2"), str(tmp_path / "link" / ".")):
        rc = main(["compile", "recipes/r.ctc", "--out", out, "--check-only", "--force"])
        assert rc == EXIT_USAGE
        err = capsys.readouterr().err
        assert "symbolic link" in err or "contains the recipe" in err or "is the recipe" in err, err
    assert (project / "recipes" / "r.ctc").read_text() == RECIPE


def test_user_directory_needs_force(project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    theirs = tmp_path / "theirs"
    files = _user_dir(theirs)
    assert main(["compile", "recipes/r.ctc", "--out", str(theirs), "--check-only"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "is not a ctc artifact (no manifest.json) and holds 2 entries (data, thesis.tex)" in err
    assert "--force" in err
    with pytest.raises(OutputDirError, match="not a ctc artifact"):
        write_artifact(theirs, module=_module(), report={})
    assert _intact(theirs, files)
    assert main(["compile", "recipes/r.ctc", "--out", str(theirs), "--check-only", "--force"]) == EXIT_OK
    write_artifact(theirs, module=_module(), report={}, force=True)
    assert (theirs / "manifest.json").is_file() and not (theirs / "thesis.tex").exists()


def test_artifact_is_replaced_but_not_with_user_files_in_it(tmp_path: Path) -> None:
    dest = tmp_path / "a"
    write_artifact(dest, module=_module(), report={"name": "one"})
    write_artifact(dest, module=_module(), report={"name": "two"})  # a ctc artifact: replaced
    assert '"two"' in (dest / "report.json").read_text()
    (dest / "my-notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match=r"also holds 1 file ctc did not write \(my-notes.txt\)"):
        write_artifact(dest, module=_module(), report={"name": "three"})
    assert (dest / "my-notes.txt").read_text() == "mine"
    (dest / "my-notes.txt").unlink()
    (dest / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(OutputDirError, match="not a ctc artifact"):
        write_artifact(dest, module=_module(), report={})
    empty = tmp_path / "empty"
    empty.mkdir()
    write_artifact(empty, module=_module(), report={})  # an empty directory is fine


def test_destination_that_is_a_link_or_under_a_file(tmp_path: Path) -> None:
    real = tmp_path / "real"
    write_artifact(real, module=_module(), report={})
    (tmp_path / "ln").symlink_to(real)
    with pytest.raises(OutputDirError, match="is a symbolic link"):
        check_destination(tmp_path / "ln")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="exists and is not a directory"):
        check_destination(tmp_path / "file")
    with pytest.raises(OutputDirError, match="is a file, not a directory"):
        check_destination(tmp_path / "file" / "sub" / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_parent(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputDirError, match="not writable"):
            check_destination(ro / "out")
    finally:
        ro.chmod(0o700)


def test_protected_inputs_of_the_recipe(tmp_path: Path) -> None:
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "notes.txt").write_text("some text " * 50)
    with pytest.raises(OutputDirError, match="contains the evaluation data"):
        check_destination(data, force=True, protected=[("the evaluation data", data / "notes.txt")])


def test_home_directory_is_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home" / "me"
    files = _user_dir(home)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    for out in (home, home.parent):
        with pytest.raises(OutputDirError, match="your home directory"):
            check_destination(out, force=True)
    assert check_destination(home / "out") == (home / "out").resolve()  # under it is fine
    assert _intact(home, files)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_are_removed_with_a_note(tmp_path: Path) -> None:
    dest = tmp_path / "a"
    dead, live = _dead_pid(), os.getppid()
    stale = tmp_path / f".a.tmp-{dead}-abc123"
    (stale / "targets").mkdir(parents=True)
    (stale / PARTIAL_MARKER).write_text("")
    (stale / "targets" / "big.so").write_bytes(b"\0" * 4096)
    running = tmp_path / f".a.tmp-{live}-def456"
    running.mkdir()
    (running / PARTIAL_MARKER).write_text("")
    unmarked = tmp_path / f".a.tmp-{dead}-ghi789"  # not ctc's: no marker
    unmarked.mkdir()
    other = tmp_path / f".b.tmp-{dead}-jkl000"  # another destination's
    other.mkdir()
    (other / PARTIAL_MARKER).write_text("")
    notes: list[str] = []
    write_artifact(dest, module=_module(), report={}, log=notes.append)
    assert not stale.exists() and running.exists() and unmarked.exists() and other.exists()
    assert len(notes) == 1 and str(stale) in notes[0] and "interrupted run" in notes[0]
    assert remove_stale_temps(dest) == []


_WRITER = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from ctc.artifact import write_artifact
    from ctc.cli import _sigterm_as_interrupt
    from ctc.ir.graph import Module
    from ctc.ir.types import TensorType
    m = Module("tiny"); m.add_input("x", TensorType((2,), "f32")); m.add_param("w", torch.ones(2))
    m.set_outputs([m.param("w")], ["w"])
    def slow(d):
        (d / "lib.so").write_bytes(b"half")
        print("building", flush=True)
        time.sleep(60)
        return {}
    try:
        with _sigterm_as_interrupt():
            write_artifact(sys.argv[1], module=m, report={"name": "new"}, build_targets=[("cpu", slow)])
    except KeyboardInterrupt:
        sys.exit(143)
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_kill_during_write_keeps_the_old_artifact(tmp_path: Path, sig: int) -> None:
    dest = tmp_path / "a"
    write_artifact(dest, module=_module(), report={"name": "old"})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(dest)], stdout=subprocess.PIPE, env=env, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "building"
    p.send_signal(sig)
    rc = p.wait(timeout=60)
    assert '"old"' in (dest / "report.json").read_text()
    temps = [q for q in tmp_path.iterdir() if q.name.startswith(".a.tmp-")]
    if sig == signal.SIGTERM:
        assert rc == 143 and temps == [], "SIGTERM must clean up like Ctrl-C"
    else:
        assert rc == -signal.SIGKILL and len(temps) == 1
        notes: list[str] = []
        time.sleep(0.05)
        write_artifact(dest, module=_module(), report={"name": "next"}, log=notes.append)
        assert [q for q in tmp_path.iterdir() if q.name.startswith(".a.")] == []
        assert len(notes) == 1 and "left by an interrupted run" in notes[0]


def test_links_a_backend_writes_become_plain_files(tmp_path: Path) -> None:
    """A backend that links one artifact file to another (the fpga test bench's data) gets plain files,
    so the artifact stays valid when it moves; a link out of the artifact is refused."""
    import ctc
    from ctc.errors import ArtifactError

    def linking(d: Path) -> dict:
        (d / "weights.bin").write_bytes(b"w" * 64)
        (d / "data").mkdir()
        (d / "data" / "weights.bin").symlink_to((d / "weights.bin").resolve())  # absolute, into the temp dir
        return {}

    dest = write_artifact(tmp_path / "a", module=_module(), report={}, build_targets=[("cpu", linking)])
    linked = dest / "targets" / "cpu" / "data" / "weights.bin"
    assert not linked.is_symlink() and linked.read_bytes() == b"w" * 64
    assert ctc.load(dest).manifest.verify_dir("targets/cpu")

    def leaking(d: Path) -> dict:
        (d / "secret").symlink_to("/etc/hostname")
        return {}

    with pytest.raises(ArtifactError, match="outside the artifact"):
        write_artifact(tmp_path / "b", module=_module(), report={}, build_targets=[("cpu", leaking)])
    assert not (tmp_path / "b").exists()
