"""An artifact's manifest: every file's size and SHA-256, written last, checked when a file is read.

Why: an artifact is a directory of plain files that anything can change afterwards (a truncated
copy, a flipped bit, an edited IR line, a swapped output).  ``manifest.json`` is written after
every other file, so its presence also marks a complete artifact written by ctc -- the only
kind of directory ctc replaces (:mod:`ctc.output_dir`).  Readers go through
:class:`Manifest`, which refuses a file that is not listed, reached through a symbolic link,
missing, or different from what was written, with an :class:`~ctc.errors.ArtifactError`
naming the file and the reason.  Each reader verifies only what it reads, so `ctc show`
hashes the report and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ctc.errors import ArtifactError

MANIFEST_FILE = "manifest.json"
FORMAT = "ctc-artifact"
VERSION = 1
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    """What the manifest promises about one file."""

    size: int
    sha256: str


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _walk_files(root: Path) -> list[str]:
    """Relative POSIX names of every file under ``root``; a link or special file is an error."""
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                raise ArtifactError(os.path.join(dirpath, d), "is a symbolic link; an artifact holds only plain files")
        for f in filenames:
            full = os.path.join(dirpath, f)
            mode = os.lstat(full).st_mode
            if not stat.S_ISREG(mode):
                raise ArtifactError(full, "is not a plain file (a symbolic link or a special file); an artifact "
                                          "holds only plain files")
            names.append(Path(full).relative_to(root).as_posix())
    return sorted(names)


def _materialize_links(root: Path) -> None:
    """Replace each symbolic link under ``root`` that points at a file inside ``root`` with a hard link
    to it (a copy where hard links fail): an artifact holds only plain files, which stay valid when it
    moves.  A link that leaves ``root`` or points at nothing is an error naming it."""
    real_root = Path(os.path.realpath(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*filenames, *dirnames]:
            link = Path(dirpath) / name
            if not link.is_symlink():
                continue
            target = Path(os.path.realpath(link))
            if real_root not in target.parents or not target.is_file():
                raise ArtifactError(link, f"is a symbolic link to {os.readlink(link)}, outside the artifact or not "
                                          "a file; an artifact holds only plain files")
            link.unlink()
            try:
                os.link(target, link)
            except OSError:
                shutil.copy2(target, link)


def write_manifest(root: Path, ctc_version: str) -> dict[str, Any]:
    """Hash every file under ``root`` into ``root/manifest.json`` (call it after the last other file).
    Links to files inside ``root`` (a backend's shortcut) become plain files first."""
    _materialize_links(root)
    files = {name: {"size": (root / name).stat().st_size, "sha256": _sha256_file(root / name)}
             for name in _walk_files(root) if name != MANIFEST_FILE}
    doc = {"format": FORMAT, "version": VERSION, "ctc_version": ctc_version, "files": files}
    (root / MANIFEST_FILE).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return doc


def _check_name(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name and "\0" not in name


def has_manifest(root: Path) -> bool:
    """Whether ``root`` holds a readable ctc manifest (a complete artifact written by ctc)."""
    try:
        read_manifest(root)
    except ArtifactError:
        return False
    return True


def read_manifest(root: str | Path) -> Manifest:
    """Parse and validate ``root/manifest.json``; any problem is an ArtifactError naming it."""
    root = Path(root)
    path = root / MANIFEST_FILE
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        legacy = (root / "ir.txt").is_file() and (root / "report.json").is_file()
        why = ("is missing: the artifact was written by an older ctc (no content hashes); compile it again"
               if legacy else "is missing: this is not a ctc artifact directory (written by `ctc compile`)")
        raise ArtifactError(path, why) from None
    except OSError as e:
        raise ArtifactError(path, f"cannot be read ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise ArtifactError(path, "is not a plain file (a symbolic link?); an artifact holds only plain files")
    if st.st_size > 64 << 20:
        raise ArtifactError(path, f"is {st.st_size:,} bytes, far more than a manifest holds")
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise ArtifactError(path, f"is not valid JSON ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
                            ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ArtifactError(path, f"is not a ctc artifact manifest (no \"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise ArtifactError(path, f"has manifest version {doc.get('version')!r}; this ctc reads version {VERSION}")
    files = doc.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(path, "has no \"files\" table")
    entries: dict[str, FileEntry] = {}
    for name, e in files.items():
        ok = (isinstance(name, str) and _check_name(name) and isinstance(e, dict)
              and isinstance(e.get("size"), int) and not isinstance(e.get("size"), bool) and e["size"] >= 0
              and isinstance(e.get("sha256"), str) and len(e["sha256"]) == 64)
        if not ok:
            raise ArtifactError(path, f"has a malformed entry for {str(name)[:200]!r}")
        entries[name] = FileEntry(e["size"], e["sha256"])
    return Manifest(root, entries, str(doc.get("ctc_version", "")))


@dataclass(frozen=True)
class Manifest:
    """The files an artifact promises, and verified access to them."""

    root: Path
    files: dict[str, FileEntry]
    ctc_version: str = ""

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self, prefix: str = "") -> list[str]:
        """Listed files under ``prefix`` (a directory name ending in ``/``, or empty for all)."""
        return sorted(n for n in self.files if n.startswith(prefix))

    def path(self, name: str) -> Path:
        """The on-disk path of listed file ``name``, after checking that no part of it is a link
        and that it is a plain file of the promised size (contents are checked by :meth:`verify`)."""
        if name not in self.files:
            raise ArtifactError(self.root / name, f"is not listed in {MANIFEST_FILE}")
        p = self.root
        parts = PurePosixPath(name).parts
        for i, part in enumerate(parts):
            p = p / part
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                raise ArtifactError(p, "is missing (listed in the artifact's manifest)") from None
            except OSError as e:
                raise ArtifactError(p, f"cannot be read ({e.strerror})") from None
            if stat.S_ISLNK(st.st_mode):
                raise ArtifactError(p, "is a symbolic link; ctc does not follow links inside an artifact")
            last = i == len(parts) - 1
            if last and not stat.S_ISREG(st.st_mode):
                raise ArtifactError(p, "is not a plain file")
            if not last and not stat.S_ISDIR(st.st_mode):
                raise ArtifactError(p, "is not a directory")
        want = self.files[name].size
        if st.st_size != want:
            raise ArtifactError(p, f"has {st.st_size:,} bytes, the manifest says {want:,} (truncated or changed "
                                   "after it was written)")
        return p

    def _check_digest(self, name: str, digest: str) -> None:
        if digest != self.files[name].sha256:
            raise ArtifactError(self.root / name, "does not match its SHA-256 in the manifest (changed or corrupted "
                                                  "after it was written); compile the artifact again")

    def read_bytes(self, name: str) -> bytes:
        """The verified contents of ``name`` (read once, hashed, then returned)."""
        p = self.path(name)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ArtifactError(p, f"cannot be read ({e.strerror})") from None
        if len(data) != self.files[name].size:
            raise ArtifactError(p, "changed while it was being read")
        self._check_digest(name, hashlib.sha256(data).hexdigest())
        return data

    def read_text(self, name: str) -> str:
        """The verified contents of ``name`` as UTF-8 text."""
        try:
            return self.read_bytes(name).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ArtifactError(self.root / name, f"is not UTF-8 text ({e.reason} at byte {e.start})") from None

    def verify(self, name: str) -> Path:
        """Check ``name``'s contents against the manifest (for files read by another library); its path."""
        p = self.path(name)
        try:
            self._check_digest(name, _sha256_file(p))
        except OSError as e:
            raise ArtifactError(p, f"cannot be read ({e.strerror})") from None
        return p

    def verify_dir(self, prefix: str) -> Path:
        """Verify every listed file under directory ``prefix`` (e.g. ``targets/cpu``) and refuse files
        there that the manifest does not list; returns the directory's path."""
        prefix = prefix.rstrip("/") + "/"
        names = self.names(prefix)
        if not names:
            raise ArtifactError(self.root / prefix, "is not part of this artifact (no files listed in its manifest)")
        for n in names:
            self.verify(n)
        d = self.root / prefix
        try:
            present = _walk_files(d)
        except OSError as e:
            raise ArtifactError(d, f"cannot be read ({e.strerror})") from None
        extra = sorted(set(prefix + n for n in present) - set(names))
        if extra:
            raise ArtifactError(self.root / extra[0], "is not listed in the artifact's manifest (added after it was "
                                                      "written)")
        return d

    def unlisted(self) -> list[str]:
        """Files present under the root that the manifest does not list (the manifest itself excepted);
        links and special files count as unlisted."""
        present: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            for f in [*filenames, *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))]:
                present.append(Path(os.path.join(dirpath, f)).relative_to(self.root).as_posix())
        return sorted(n for n in present if n != MANIFEST_FILE and n not in self.files)
