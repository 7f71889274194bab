"""Analyses shared by passes through the PassContext cache (calibration statistics, ...)."""

from ctc.passes.analyses.calibration import CalibrationResult, CalibrationStats, ChannelStats

__all__ = ["CalibrationResult", "CalibrationStats", "ChannelStats"]
