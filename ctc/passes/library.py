"""Imports every pass module so each registers itself (one line per pass module)."""
