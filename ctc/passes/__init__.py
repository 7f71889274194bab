"""Passes over the ctc IR: the pass contract, the pass manager, and every registered pass."""

from ctc.options import option
from ctc.passes.base import (
    Analysis,
    NoOptions,
    Pass,
    PassContext,
    PassError,
    PassOptions,
    PatternPass,
    Selector,
    all_passes,
    get_pass,
    register_pass,
)

__all__ = ["Analysis", "NoOptions", "Pass", "PassContext", "PassError", "PassOptions", "PatternPass", "Selector",
           "all_passes", "get_pass", "option", "register_pass"]
