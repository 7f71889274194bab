"""Exceptions the command line maps to exit codes (import-light: no torch)."""

from __future__ import annotations

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
