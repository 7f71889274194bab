"""Exceptions the command line maps to exit codes (import-light: no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ctc.dsl.diagnostics import Diagnostic


class ModelError(Exception):
    """The model could not be loaded or captured (exit code 3); located at the recipe's model line."""

    def __init__(self, message: str, diagnostic: Diagnostic | None = None):
        super().__init__(diagnostic.format() if diagnostic is not None else message)
        self.diagnostic = diagnostic


class UsageError(Exception):
    """Bad command-line use (exit code 2)."""


class OutputDirError(UsageError):
    """An output directory that ctc will not write or replace (exit code 2): it holds files ctc did
    not write, it contains the recipe or the working directory, or it cannot be written."""


class ArtifactError(Exception):
    """An artifact directory cannot be used: a file is missing, unreadable, changed since it was
    written, or does not hold what it should.  ``path`` names the file (or directory), ``reason``
    says what is wrong with it; ``str()`` is ``"PATH: REASON"``."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class ComputeError(Exception):
    """A compiled model ran but says it could not compute its result (exit code 4, no traceback): the message
    names the cause and the fix (e.g. the persistent CUDA decode step timed out waiting for its grid)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (the CLI turns it into this so that clean-up runs as it does for Ctrl-C)."""
