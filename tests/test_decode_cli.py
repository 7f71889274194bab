"""Decoder artifacts end to end: `model hf "dir" decode=N` captures a static decode step, passes run on it
(calibrated on real decode-step inputs made from text), the cpu target builds it, and `ctc run --generate`
gives the same greedy tokens through the torch reference and through the compiled library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory) -> Path:
    from hf_configs import tiny_llama_with_smollm2_tokenizer

    root = tmp_path_factory.mktemp("decoder")
    tiny_llama_with_smollm2_tokenizer(root / "model")
    (root / "dec.ctc").write_text('model hf "model" decode=48\n'
                                  "calibrate wiki samples=2 seq_len=16\n"
                                  "evaluate wiki samples=2 seq_len=16\n"
                                  "pipeline {\n    quantize w_bits=8 a_bits=16\n    dce\n}\n"
                                  "check fidelity >= 0.9\n"
                                  "target cpu\n")
    return root


def _ctc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ctc", *args], capture_output=True, text=True, timeout=900)


def test_decoder_recipe_compiles_and_generates(tiny_decoder: Path) -> None:
    art = tiny_decoder / "art"
    res = _ctc("compile", str(tiny_decoder / "dec.ctc"), "--out", str(art), "-q")
    assert res.returncode == 0, res.stderr[-3000:]
    from ctc.artifact import load

    a = load(art)
    assert a.module.meta["task"] == "decode_step" and a.module.meta["decode"] == {"max_len": 48}
    assert [v.name for v in a.module.inputs][:3] == ["input_ids", "position", "cache_k_0"]
    assert a.module.op_counts().get("quant_linear", 0) > 0
    ref = _ctc("run", str(art), "--text", "The capital of France is", "--generate", "6", "-q")
    got = _ctc("run", str(art), "--text", "The capital of France is", "--generate", "6", "--target", "cpu", "-q")
    assert ref.returncode == 0 and got.returncode == 0, (ref.stderr[-2000:], got.stderr[-2000:])
    assert ref.stdout == got.stdout and ref.stdout.startswith("The capital of France is")
    assert "tokens/s" in got.stderr
    too_long = _ctc("run", str(art), "--text", "Hello", "--generate", "60", "-q")
    assert too_long.returncode == 2 and "cache positions" in too_long.stderr
    # ctc eval measures the step as the compile did: one step after each window's prefix (it asked for an input
    # 'position' that text cannot give)
    ev = _ctc("eval", str(art), "--json", "-q")
    assert ev.returncode == 0, ev.stderr[-2000:]
    import json

    res = json.loads(ev.stdout)
    compiled = a.report["metrics"]["fidelity"]["compressed"]
    assert res["task"] == "decode_step" and res["windows"] == 2 and res["fidelity"] == pytest.approx(compiled, abs=1e-6)
    assert "decode the last" in res["protocol"]
    shown = _ctc("show", str(art))  # the compile's own numbers say how the step was measured too
    assert shown.returncode == 0 and "decode step: prefill all but the last token" in shown.stdout, shown.stdout
    wide = _ctc("eval", str(art), "--seq-len", "100", "-q")
    assert wide.returncode == 2 and "cache of 48 positions" in wide.stderr
    saved = tiny_decoder / "gen.safetensors"  # --generate prints text: --save was ignored without a word
    both = _ctc("run", str(art), "--text", "Hello", "--generate", "2", "--save", str(saved), "-q")
    assert both.returncode == 2 and "leave --save out" in both.stderr and not saved.exists()


def test_decode_option_is_checked(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ctc"
    bad.write_text('model bundled "smollm2" decode=1 dtyp=f16\n')
    res = _ctc("compile", str(bad), "--check-only")
    assert res.returncode == 2
    assert "decode=1" in res.stderr and "did you mean" in res.stderr and "dtype" in res.stderr
