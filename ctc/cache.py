"""Where ctc keeps what it can rebuild, and how it writes it: one cache folder, atomic entries.

The folder is ``$XDG_CACHE_HOME/ctc`` (``~/.cache/ctc``): de-quantised bundled weights, the
downloaded-once text corpora, meta-schedule tuning databases (``tuning/``).  Every caller that
takes a ``cache_dir=`` argument defaults to :func:`default_cache_dir`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_dir", "default_cache_dir"]


def default_cache_dir() -> Path:
    """ctc's cache folder: ``$XDG_CACHE_HOME/ctc`` or ``~/.cache/ctc`` (pass ``cache_dir=`` to choose another)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ctc"


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to ``dest`` (replacing an older one).

    A crash or exception leaves ``dest`` untouched and removes the temporary folder, so readers
    never see a half-written cache entry.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / "x")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
