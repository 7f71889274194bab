"""Evaluation text: skip/limit ranges of a file, the calibration/evaluation overlap warning, and `ctc eval`
measuring a causal LM next to its original model on the same windows (and without it when it moved).

The causal LM is a tiny Llama with random weights and the bundled MiniLM tokenizer: the mechanics,
not the accuracy, are under test here (real-model numbers are in the slow tests and benchmarks).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ctc.cli import EXIT_OK, EXIT_USAGE, main
from ctc.eval.data import evaluation_windows

TEXT = " ".join(f"The {w} sat on the mat number {i}." for i, w in enumerate(["cat", "dog", "bird", "fish"] * 150))


def _tokenizer_dir() -> Path:
    from ctc.bundled import bundled_model_dir

    return bundled_model_dir("minilm")


@pytest.fixture(scope="module")
def lm_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder: a tiny Llama HF directory (MiniLM's tokenizer), a text file and a recipe."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("lmproj")
    tok = AutoTokenizer.from_pretrained(str(_tokenizer_dir()), local_files_only=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(cfg).save_pretrained(d / "tiny")
    tok.save_pretrained(d / "tiny")
    (d / "notes.txt").write_text(TEXT)
    (d / "r.ctc").write_text('model hf "tiny"\ncalibrate text "notes.txt" samples=2 seq_len=32 limit=400\n'
                             'evaluate text "notes.txt" samples=3 seq_len=32 skip=400\n'
                             "pipeline {\n    cse\n    dce\n}\ncheck ppl_increase <= 0.01\n")
    return d


def test_skip_and_limit_select_token_ranges() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_tokenizer_dir()), local_files_only=True)
    whole = evaluation_windows(tok, [TEXT], None, 16)
    later = evaluation_windows(tok, [TEXT], 2, 16, skip=14)
    assert torch.equal(later[0]["input_ids"][0, 1:-1], whole[1]["input_ids"][0, 1:-1])  # 14 = one window's body
    assert len(evaluation_windows(tok, [TEXT], None, 16, limit=42)) == 3
    with pytest.raises(ValueError, match="skips the whole text"):
        evaluation_windows(tok, [TEXT], 1, 16, skip=10**7)


def test_overlap_warning(lm_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overlapping = lm_project / "overlap.ctc"
    overlapping.write_text((lm_project / "r.ctc").read_text().replace(" limit=400", "").replace(" skip=400", ""))
    assert main(["compile", str(overlapping), "--check-only", "--out", str(lm_project / "o")]) == EXIT_OK
    err = capsys.readouterr().err
    assert f"{overlapping}:3:15: warning: evaluation reads the same text as calibration" in err
    assert "tokens 0..96" in err
    assert main(["compile", str(lm_project / "r.ctc"), "--check-only", "--out", str(lm_project / "o")]) == EXIT_OK
    assert "warning" not in capsys.readouterr().err, "separated by limit/skip: no warning"


def test_eval_measures_against_the_original(lm_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = lm_project / "out"
    assert main(["compile", str(lm_project / "r.ctc"), "--out", str(out), "--quiet"]) == EXIT_OK
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"]["evaluate"]["token_range"] == "tokens 400..end of the text"
    assert main(["eval", str(out), "--json", "--quiet"]) == EXIT_OK
    res = json.loads(capsys.readouterr().out)
    assert res["baseline"] == "original model hf 'tiny', same windows" and res["windows"] == 3
    assert res["ppl"] == pytest.approx(res["ppl_original"], rel=1e-4)
    assert res["ppl_increase"] == pytest.approx(0, abs=1e-3)
    assert res["ppl"] == pytest.approx(report["metrics"]["ppl"]["compressed"], rel=1e-4), "same windows as compile"
    assert res["token_range"] == "tokens 400..end of the text" and res["fidelity"] > 0.9999
    # other windows through the flags
    assert main(["eval", str(out), "--json", "--quiet", "--skip", "0", "--samples", "2"]) == EXIT_OK
    res2 = json.loads(capsys.readouterr().out)
    assert res2["windows"] == 2 and res2["ppl"] != res["ppl"]
    # the original moved away: the artifact alone is measured, and the result says why there is no baseline
    shutil.move(lm_project / "tiny", lm_project / "tiny-moved")
    try:
        assert main(["eval", str(out), "--json", "--quiet"]) == EXIT_OK
        alone = json.loads(capsys.readouterr().out)
        assert alone["baseline"].startswith("unavailable: ") and alone["ppl"] == pytest.approx(res["ppl"], rel=1e-4)
        assert "ppl_original" not in alone
    finally:
        shutil.move(lm_project / "tiny-moved", lm_project / "tiny")
    assert main(["eval", str(out), "--quiet", "--human-similarity"]) == EXIT_USAGE
    assert "applies to sentence encoders" in capsys.readouterr().err
