"""lm-eval on ctc artifacts, offline: the window task reproduces `ctc eval`'s perplexity on the same windows, rolling
log-likelihoods and greedy generation agree with lm-eval's own ``hf`` model on the same weights, and a decode step
fed token by token gives the full-sequence logits.

The causal LM is a tiny random Llama with SmolLM2's real tokenizer (byte-level BPE, so windows survive lm-eval's
text requests) on one article of the bundled Wikipedia text: the mechanics are under test; real-weight numbers are in
benchmarks/lm_eval_windows.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ctc.cli import EXIT_OK, EXIT_USAGE, main

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama HF directory (SmolLM2's tokenizer) compiled with W8 weights, also written as a plain HF directory
    (`emit hf`: the artifact's weights, de-quantized) for lm-eval's own ``hf`` model."""
    from hf_configs import tiny_llama_with_smollm2_tokenizer

    from ctc.eval.data import wiki_split

    root = tmp_path_factory.mktemp("lmeval")
    tiny_llama_with_smollm2_tokenizer(root / "model")
    # one article of the bundled Wikipedia text's evaluation split (tokenizing the whole split takes seconds)
    (root / "article.txt").write_text(wiki_split("evaluation")[0].text[:4000])
    (root / "w8.ctc").write_text('model hf "model"\nevaluate text "article.txt" samples=3 seq_len=32\n'
                                 "pipeline {\n    quantize w_bits=8 a_bits=16\n}\nemit hf\n")
    assert main(["compile", str(root / "w8.ctc"), "--out", str(root / "w8"), "--quiet"]) == EXIT_OK
    return root


def _evaluate(task_dir: Path, model: Any, task: str = "ctc_windows") -> dict[str, Any]:
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(model=model, tasks=[task], task_manager=TaskManager(include_path=str(task_dir),
                                                                                      include_defaults=False))
    return res["results"][task]


def test_window_task_reproduces_ctc_eval(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ctc.eval.lm_eval_adapter import CtcLM

    art = project / "w8"
    assert main(["eval", str(art), "--json", "--quiet", "--no-baseline"]) == EXIT_OK
    ours = json.loads(capsys.readouterr().out)
    tasks = project / "tasks"
    assert main(["eval", str(art), "--write-lm-eval-task", str(tasks), "--json"]) == EXIT_OK
    proto = json.loads(capsys.readouterr().out)
    assert proto["windows"] == ours["windows"] == 3 and proto["tokens_scored"] == ours["tokens_scored"] == 93
    assert proto["stride"] == 32 and proto["split"] == "evaluation"
    header = (tasks / "ctc_windows.yaml").read_text()
    assert "# tokenizer: w8/tokenizer (TokenizersBackend, vocab 49152)" in header, header
    got = _evaluate(tasks, CtcLM(artifact=str(art)))
    assert got["token_perplexity,none"] == pytest.approx(ours["ppl"], rel=1e-6)
    # a run stopped before the yaml: its own leftover files are recognised and replaced, a user's file is not
    (tasks / "ctc_windows.yaml").unlink()
    assert main(["eval", str(art), "--write-lm-eval-task", str(tasks), "--quiet"]) == EXIT_OK
    (tasks / "ctc_windows.yaml").unlink()
    (tasks / "ctc_windows_data.py").write_text("# the user's own module\n")
    assert main(["eval", str(art), "--write-lm-eval-task", str(tasks), "--quiet"]) == EXIT_USAGE
    assert (tasks / "ctc_windows_data.py").read_text() == "# the user's own module\n"
    capsys.readouterr()
    # the protocol is written into the compile report and the eval result (tokenizer by name, stride, split)
    report = json.loads((art / "report.json").read_text())
    ev = report["protocol"]["evaluate"]
    assert ev["tokenizer"].endswith("/model (TokenizersBackend, vocab 49152)") and ev["split"] == "evaluation"
    assert str(project) not in json.dumps(report["protocol"]), "no absolute paths"
    assert ev["stride"].startswith("32 text tokens (disjoint")
    assert "/model (TokenizersBackend, vocab 49152)" in report["metrics"]["ppl"]["protocol"]
    assert "tokenizer w8/tokenizer (TokenizersBackend" in ours["protocol"]
    page = (art / "report.html").read_text()  # the same protocol as a table, and what quantize did per block
    assert "<h2>Evaluation protocol</h2>" in page and "<td>stride</td>" in page and str(project) not in page
    assert [b["quantized"] for b in report["blocks"]] == ["W8A16 ×7", "W8A16 ×7"]
    assert [b["passes"] for b in report["blocks"]] == [["quantize"], ["quantize"]]


def test_rolling_and_generation_agree_with_lm_eval_hf_model(project: Path) -> None:
    """Same weights (the W8 artifact through ctc, its `emit hf` export through lm-eval's ``hf`` model), lm-eval's
    rolling windows of 16 tokens."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctc.eval.lm_eval_adapter import CtcLM

    text = ("The quick brown fox jumps over the lazy dog. Perplexity is measured over windows of text, "
            "and lm-eval rolls them so that every token is predicted exactly once.")
    exported = project / "w8" / "exports" / "hf"
    tok = AutoTokenizer.from_pretrained(str(exported), local_files_only=True)
    hf = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(str(exported), local_files_only=True),
              tokenizer=tok, max_length=16, batch_size=1)
    ours = CtcLM(artifact=str(project / "w8"), max_length="16")
    assert len(ours.tok_encode(text)) > 32, "several rolling windows"
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    want, got = hf.loglikelihood_rolling(rolling, disable_tqdm=True), ours.loglikelihood_rolling(rolling, True)
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    pairs = [Instance("loglikelihood", {}, ("The capital of France", " is Paris"), 0),
             Instance("loglikelihood", {}, ("", "Hello world"), 1)]
    for (a, ga), (b, gb) in zip(hf.loglikelihood(pairs, disable_tqdm=True), ours.loglikelihood(pairs, True),
                                strict=True):
        assert b == pytest.approx(a, rel=1e-5) and ga == gb
    gen = [Instance("generate_until", {}, ("Once upon a time", {"until": ["\n\n"], "max_gen_toks": 6}), 0)]
    assert ours.generate_until(gen, True) == hf.generate_until(gen, disable_tqdm=True)
    with pytest.raises(Exception, match="greedy"):
        ours.generate_until([Instance("generate_until", {}, ("x", {"do_sample": True}), 0)], True)


def test_a_window_starting_with_a_newline_round_trips(project: Path) -> None:
    """lm-eval moves a context's trailing whitespace into the continuation; a window whose first token is a newline
    would be left with no context, so the ctc model keeps an all-blank context (what the window task relies on)."""
    from ctc.eval.lm_eval_adapter import CtcLM
    from ctc.eval.lm_eval_task import _round_trips

    lm = CtcLM(artifact=str(project / "w8"))
    ids = lm.tok_encode("\nThe cat sat on the mat.")
    assert lm.tok_decode(ids[:1]) == "\n"
    pair = _round_trips(lm.tokenizer, ids)
    assert pair == ("\n", "The cat sat on the mat.") and lm._encode_pair(*pair) == (ids[:1], ids[1:])


def test_bad_arguments_are_named(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ctc.errors import ArtifactError, UsageError
    from ctc.eval.lm_eval_adapter import CtcLM

    with pytest.raises(UsageError, match="artifact=DIR"):
        CtcLM()
    with pytest.raises(UsageError, match="unknown model args pretrained"):
        CtcLM(artifact=str(project / "w8"), pretrained="x")
    with pytest.raises(UsageError, match="add_bos_token='maybe' is not a boolean"):
        CtcLM(artifact=str(project / "w8"), add_bos_token="maybe")
    with pytest.raises(ArtifactError, match="no such artifact"):
        CtcLM(artifact=str(project / "missing"))
    with pytest.raises(ArtifactError, match="has no compiled target 'cpu'"):
        CtcLM(artifact=str(project / "w8"), target="cpu")
    assert main(["eval", str(project / "w8"), "--write-lm-eval-task", str(project / "t2"), "--data", "lee"]) \
        == EXIT_OK, "any text the tokenizer round-trips"
    capsys.readouterr()
    assert main(["eval", str(project / "w8"), "--write-lm-eval-task", str(project / "t3"), "--data", "nope"]) \
        == EXIT_USAGE
    assert "expected wiki, lee" in capsys.readouterr().err


def test_step_logits_of_a_decode_step_equal_full_sequence_logits() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from ctc.artifact import torch_runner
    from ctc.frontends import capture
    from ctc.frontends.decode import static_decode_inputs, static_decode_step
    from ctc.generate import step_logits

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=48,
                                         max_position_embeddings=64)).eval()
    m = capture(static_decode_step(model), static_decode_inputs(model, 16, random_cache=False), dynamic=False)
    specs = m.input_specs()
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(2))
    run = torch_runner(m)
    got = step_logits(run, ids, input_specs=specs)
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cache positions"):
        step_logits(run, torch.zeros(1, 17, dtype=torch.long), input_specs=specs)
    # the same step under `ctc analyze`: one decode phase reading the whole preallocated cache
    from ctc.analysis.peaks import fpga_peaks
    from ctc.analysis.roofline import analyze_module

    m.meta.update(task="decode_step", decode={"max_len": 16})
    (phase,) = analyze_module(m, fpga_peaks()).phases
    attn = [c for c in phase.costs if c.op == "scaled_dot_product_attention"]
    assert phase.name == "decode" and len(attn) == 2 and "16 positions" in phase.description
