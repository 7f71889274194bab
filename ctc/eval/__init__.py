"""Evaluation harness: real bundled data and models, perplexity, output fidelity, latency.

Submodules are imported on use (``from ctc.eval import perplexity``) so that importing ctc stays
cheap: ``data`` (texts and calibration batches), ``models`` (bundled real models),
``perplexity`` (sliding-window protocol), ``fidelity`` (output and embedding agreement),
``latency`` (timing and machine description).
"""
