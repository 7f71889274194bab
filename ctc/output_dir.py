"""Where an artifact may be written: which existing directories ctc replaces, and temporary
directories of killed runs.

Why: writing an artifact replaces its destination directory, and a destination is easy to get
wrong (``--out .``, ``emit ".."``, a project directory).  The rules, checked before any work
starts and again just before the swap:

* an existing destination is replaced only when it is empty or a complete ctc artifact (its
  ``manifest.json``, :mod:`ctc.manifest`) holding nothing the manifest does not list;
  anything else is refused unless the caller passes ``force`` (``ctc compile --force``);
* a directory that contains the recipe, the working directory, the user's home directory or
  another input of the compile (or an ancestor of any of them) is never replaced, with or without
  ``force``; paths are compared after resolving symbolic links;
* a destination that is itself a symbolic link is refused (replacing it would replace the
  link's target, somewhere else);
* the nearest existing parent must be a writable directory (``--out`` under a file fails
  here, before the model is loaded), and must not lie inside an artifact (the artifact would then hold
  files its manifest does not list).

Temporary directories are named ``.NAME.tmp-PID-XXXX`` next to the destination and hold a
``.ctc-partial`` marker from the moment they exist.  A run killed with SIGKILL (or a machine
that went down) leaves one behind; the next write to the same destination removes those whose
process no longer runs, with a note.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from ctc.errors import OutputDirError
from ctc.manifest import MANIFEST_FILE, has_manifest, read_manifest

PARTIAL_MARKER = ".ctc-partial"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def _contains(outer: Path, inner: Path) -> bool:
    """Whether ``inner`` is ``outer`` or lies under it (both already resolved)."""
    return inner == outer or outer in inner.parents


def _home() -> list[tuple[str, Path]]:
    """The user's home directory: never replaced (``--out ~ --force`` from elsewhere would delete it)."""
    try:
        return [("your home directory", Path.home())]
    except (RuntimeError, KeyError):  # no HOME and no password entry
        return []


def check_destination(dest: str | Path, *, force: bool = False,
                      protected: Iterable[tuple[str, str | Path]] = ()) -> Path:
    """Check that an artifact may be written to ``dest``; return its resolved path.

    ``protected`` are ``(what, path)`` pairs (the recipe, data files, ...) that must survive the
    write: a destination containing one of them is refused.  The working directory is always
    protected.  Raises :class:`~ctc.errors.OutputDirError` with what to do instead.
    """
    given = Path(dest)
    if str(given).strip() == "":
        raise OutputDirError("the output directory is empty; give a directory name")
    if given.is_symlink():
        raise OutputDirError(f"output {given} is a symbolic link (to {os.readlink(given)}); ctc does not replace "
                             "what a link points to: give the directory itself")
    real = _real(given)
    guards = [*protected, ("the working directory", Path.cwd()), *_home()]
    for what, p in guards:
        rp = _real(Path(p))
        if _contains(real, rp):
            where = "is" if rp == real else "contains"
            raise OutputDirError(f"output {given} ({real}) {where} {what} ({p}); ctc never replaces a directory "
                                 "holding its own inputs or the working directory: choose an output directory of "
                                 "its own, e.g. out/NAME")
    if real.exists():
        if not real.is_dir():
            raise OutputDirError(f"output {given} exists and is not a directory")
        if not force:
            refusal = replace_refusal(real)
            if refusal:
                raise OutputDirError(f"output {given} {refusal}; ctc replaces only empty directories and artifacts it "
                                     "wrote: choose another --out, or pass --force to replace it (everything in it "
                                     "is deleted)")
    probe = real.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputDirError(f"cannot create output {given}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot write output {given}: {probe} is not writable (permission denied)")
    _refuse_inside_artifact(given, probe, "output")
    return real


def replace_refusal(d: Path) -> str | None:
    """Why the existing directory ``d`` must not be replaced without ``force`` (None: it may be)."""
    try:
        entries = list(d.iterdir())
    except OSError as e:
        return f"cannot be listed ({e.strerror})"
    if not entries:
        return None
    if not has_manifest(d):
        shown = ", ".join(sorted(p.name for p in entries)[:4]) + (", ..." if len(entries) > 4 else "")
        return (f"is not a ctc artifact (no {MANIFEST_FILE}) and holds {len(entries)} "
                f"{'entry' if len(entries) == 1 else 'entries'} ({shown})")
    extra = read_manifest(d).unlisted()
    if extra:
        shown = ", ".join(extra[:4]) + (", ..." if len(extra) > 4 else "")
        return (f"is a ctc artifact but also holds {len(extra)} file{'s' if len(extra) != 1 else ''} ctc did not "
                f"write ({shown})")
    return None


# --------------------------------------------------------------------------- temporary directories
def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(dest: Path) -> list[str]:
    """Remove temporary directories that killed runs left next to ``dest``; one note per removal.

    Only directories named like ctc's own (``.NAME.tmp-PID-XXXX``), holding ctc's marker, whose
    process is gone, are removed."""
    notes: list[str] = []
    parent = dest.parent
    if not parent.is_dir():
        return notes
    for p in parent.iterdir():
        m = _TEMP_RE.match(p.name)
        if not m or m.group("name") != dest.name or p.is_symlink() or not p.is_dir():
            continue
        if not (p / PARTIAL_MARKER).is_file() and not (p / MANIFEST_FILE).is_file():
            continue
        if _alive(int(m.group("pid"))):
            continue
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(p, ignore_errors=True)
        notes.append(f"removed {p} ({size / 2**20:.1f} MB) left by an interrupted run (process {m.group('pid')})")
    return notes


def make_temp_dir(dest: Path) -> Path:
    """A fresh marked temporary directory next to ``dest`` for building the artifact."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    (tmp / PARTIAL_MARKER).write_text("a ctc artifact being written; removed by the next write if its process "
                                      "is gone\n")
    return tmp


# --------------------------------------------------------------------------- the swap
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_into_place(tmp: Path, dest: Path) -> None:
    """Move the finished ``tmp`` to ``dest``; an existing ``dest`` is swapped out atomically (where
    the OS allows) and then deleted, so ``dest`` is at every moment either the old or the new artifact."""
    if not dest.exists():
        os.rename(tmp, dest)
        return
    if _exchange(tmp, dest):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old contents
        return
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}-0")
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- single files (--save, --html, ...)
def _inside_artifact(real: Path) -> Path | None:
    """The artifact directory that ``real`` (resolved) is or lies under, if any."""
    return next((d for d in (real, *real.parents) if d.is_dir() and has_manifest(d)), None)


def check_output_file(path: str | Path, *, flag: str, ours: Callable[[Path], bool]) -> Path:
    """Check that ctc may write the file ``path`` that a flag (``--save``, ``--html``) names; return it.

    Why: such a file is easy to get wrong (a folder, a typo in the folder, an artifact's own file, someone's
    data) and ctc never overwrites what it did not write.  Refused with :class:`~ctc.errors.OutputDirError`
    before any work: a directory, a missing or unwritable folder, a path inside an artifact (its manifest
    lists every file), and an existing file unless ``ours(path)`` recognises it as one ctc wrote."""
    p = Path(path)
    if str(path).strip() == "":
        raise OutputDirError(f"{flag}: give a file name")
    if p.is_dir():
        raise OutputDirError(f"{flag} {p}: is a directory; give a file name (e.g. {p / 'out'})")
    parent = _real(p.parent)
    if not parent.is_dir():
        raise OutputDirError(f"{flag} {p}: the folder {p.parent} does not exist (or is not a directory); create it "
                             "first or choose another path")
    _check_writable_outside_artifacts(p, parent, flag)
    if p.is_symlink() or (p.exists() and not (p.is_file() and ours(p))):
        raise OutputDirError(f"{flag} {p}: exists and ctc did not write it; ctc does not overwrite files it did not "
                             "write: choose another name, or remove it first")
    return p


def check_output_folder(path: str | Path, *, flag: str) -> Path:
    """Check that ctc may write its own named files into the folder ``path`` (made if missing); return it.
    Refused: a file, a folder under a file, and a folder inside an artifact (its manifest lists every file)."""
    p = Path(path)
    if str(path).strip() == "":
        raise OutputDirError(f"{flag}: give a folder name")
    if p.exists() and not p.is_dir():
        raise OutputDirError(f"{flag} {p}: is a file, not a folder; give a folder for the files")
    probe = _real(p)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputDirError(f"{flag} {p}: {probe} is a file, not a folder")
    _check_writable_outside_artifacts(p, probe, flag)
    return p


def check_not_inside_artifact(path: str | Path, *, flag: str) -> None:
    """Refuse a directory ``path`` that ctc is asked to write (``ctc export --out``) when a folder above it is
    an artifact: the artifact would then hold files its manifest does not list (``path`` itself may be a
    directory ctc wrote: replacing it is :func:`check_destination`'s business)."""
    folder = _real(Path(path)).parent
    while not folder.exists():
        folder = folder.parent
    _refuse_inside_artifact(Path(path), folder, flag)


def _check_writable_outside_artifacts(p: Path, folder: Path, flag: str) -> None:
    """``folder`` (resolved, existing), where ``p`` will be written, is writable and not inside an artifact."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputDirError(f"{flag} {p}: {folder} is not writable (permission denied)")
    _refuse_inside_artifact(p, folder, flag)


def _refuse_inside_artifact(p: Path, folder: Path, flag: str) -> None:
    artifact = _inside_artifact(folder)
    if artifact is not None:
        raise OutputDirError(f"{flag} {p}: is inside the artifact {artifact}; writing there would change it (its "
                             "manifest lists every file): choose a path outside it")


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``: an interrupted or failed
    write leaves no half-written file under the name (and the temporary one is removed)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o666 & ~mask)  # mkstemp makes it private to the user
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
