"""Evaluation harness: real bundled data, perplexity, output fidelity, latency (models: ctc.bundled).

Submodules are imported on use (``from ctc.eval import perplexity``) so that importing ctc stays
cheap: ``data`` (texts and calibration batches), ``perplexity`` (sliding-window protocol),
``fidelity`` (output and embedding agreement), ``latency`` (timing and machine description).
"""
