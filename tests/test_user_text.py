"""A user's own text and prompts: generation through a decode-step artifact (end-of-sequence stop, empty prompt),
and user text files and `ctc eval` data that a user really has.

The decoder is a tiny random Llama with SmolLM2's tokenizer (seconds to compile, no target): the mechanics, not
the model's quality, are under test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctc.cli import EXIT_OK, EXIT_USAGE, main
from ctc.errors import UsageError
from ctc.generate import greedy_generate

SPECS = [{"name": "input_ids", "shape": [2, 1], "dtype": "i64"}, {"name": "position", "shape": [1], "dtype": "i64"},
         {"name": "cache_k_0", "shape": [2, 1, 16, 2], "dtype": "f32"},
         {"name": "cache_v_0", "shape": [2, 1, 16, 2], "dtype": "f32"}]


def _counting_step(feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Next token = this one + 1 (mod 11), per sequence."""
    ids = feed["input_ids"][:, 0]
    logits = torch.zeros(ids.shape[0], 1, 11)
    logits[torch.arange(ids.shape[0]), 0, (ids + 1) % 11] = 1
    return [logits, feed["cache_k_0"], feed["cache_v_0"]]


def test_generation_stops_at_end_of_sequence() -> None:
    """greedy_generate ran past the end-of-sequence token to max_new_tokens (the CLI printed what the model said
    after it had finished); with eos_token_id it stops once every sequence has ended, and a sequence that ended
    first repeats its end token."""
    prompt = torch.tensor([[1], [5]])
    full = greedy_generate(_counting_step, prompt, 8, input_specs=SPECS).tokens
    assert full.tolist() == [[2, 3, 4, 5, 6, 7, 8, 9], [6, 7, 8, 9, 10, 0, 1, 2]]
    got = greedy_generate(_counting_step, prompt, 8, input_specs=SPECS, eos_token_id=[7, 3]).tokens
    assert got.tolist() == [[2, 3], [6, 7]]
    got = greedy_generate(_counting_step, prompt, 8, input_specs=SPECS, eos_token_id=[9, 4]).tokens
    assert got.tolist() == [[2, 3, 4, 4], [6, 7, 8, 9]]
    assert greedy_generate(_counting_step, prompt, 8, input_specs=SPECS, eos_token_id=9).tokens.tolist() == \
        [[2, 3, 4, 5, 6, 7, 8, 9], [6, 7, 8, 9, 9, 9, 9, 9]]
    for bad in ("7", [True], [], [-1]):
        with pytest.raises(ValueError, match="eos_token_id must be a token id"):
            greedy_generate(_counting_step, prompt, 2, input_specs=SPECS, eos_token_id=bad)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder: a tiny Llama with SmolLM2's tokenizer (``model/``) and a text file (``notes.txt``)."""
    from hf_configs import tiny_llama_with_smollm2_tokenizer

    root = tmp_path_factory.mktemp("user")
    tiny_llama_with_smollm2_tokenizer(root / "model")
    (root / "notes.txt").write_text(" ".join(f"Note {i}: the {w} crossed the river." for i, w in
                                             enumerate(["fox", "dog", "heron", "otter"] * 60)))
    return root


@pytest.fixture(scope="module")
def decoder(project: Path) -> Path:
    """A decode-step artifact (cache of 24 positions) of the tiny Llama."""
    root = project
    (root / "dec.ctc").write_text('model hf "model" decode=24\npipeline {\n    dce\n}\n')
    assert main(["compile", str(root / "dec.ctc"), "--out", str(root / "art"), "-q"]) == EXIT_OK
    return root / "art"


def test_cli_generation_stops_at_eos_and_refuses_an_empty_prompt(decoder: Path, capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`ctc run --generate` printed past <|im_end|>; an empty --text failed with greedy_generate's
    'prompt must be [1, P>=1] token ids, got (1, 0)'; --ignore-eos without --generate would be ignored."""
    import ctc.generate

    assert main(["run", str(decoder), "--text", "Hello there", "--generate", "6", "--ignore-eos", "-q"]) == EXIT_OK
    full = capsys.readouterr()
    assert "stopped" not in full.err and full.err.startswith("6 tokens")
    from ctc.artifact import load

    art = load(decoder)
    prompt = art.tokenizer()("Hello there", return_tensors="pt")["input_ids"]
    specs = art.module.input_specs()
    first = int(greedy_generate(lambda feed: art.run(feed), prompt, 1, input_specs=specs).tokens[0, 0])
    monkeypatch.setattr(ctc.generate, "tokenizer_eos_ids", lambda _tok: [first])  # the first token plays the end
    assert main(["run", str(decoder), "--text", "Hello there", "--generate", "6", "-q"]) == EXIT_OK
    stop = capsys.readouterr()
    assert stop.err.startswith("1 tokens, stopped at the end-of-sequence token"), stop.err
    assert stop.out == "Hello there\n" and len(full.out) > len(stop.out)  # the end token is not printed
    monkeypatch.undo()
    assert main(["run", str(decoder), "--text", "", "--generate", "3", "-q"]) == EXIT_USAGE
    assert "gives no tokens" in capsys.readouterr().err
    assert main(["run", str(decoder), "--text", "Hi", "--ignore-eos", "-q"]) == EXIT_USAGE
    assert "--ignore-eos applies to --generate" in capsys.readouterr().err
    # a prompt and N beyond the cache: the advice is numbers that fit (greedy_generate's message said "need 27
    # positions" for 26, and named no fix); following it works
    n = len(prompt[0])
    assert main(["run", str(decoder), "--text", "Hello there", "--generate", "25", "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"needs {n + 24} cache positions in all, but this decode step holds 24 (decode=24 in its recipe): use " \
           f"--generate {25 - n} or less, or compile the model with a larger decode=LEN" in err, err
    assert main(["run", str(decoder), "--text", "Hello there", "--generate", str(25 - n), "-q",
                 "--ignore-eos"]) == EXIT_OK
    assert capsys.readouterr().err.startswith(f"{25 - n} tokens")
    # the same from Python: Artifact.generate (greedy_generate alone needs input_specs and token ids)
    assert main(["run", str(decoder), "--text", "Hello there", "--generate", "4", "--ignore-eos", "-q"]) == EXIT_OK
    assert "Hello there" + art.generate("Hello there", 4, stop_at_eos=False) + "\n" == capsys.readouterr().out
    with pytest.raises(UsageError, match=f"max_new_tokens={25 - n} or less"):
        art.generate("Hello there", 25)


@pytest.fixture(scope="module")
def lm_art(project: Path) -> Path:
    """A causal-LM artifact of the tiny Llama, calibrated on the first 300 tokens of notes.txt (its positions: 128)."""
    (project / "lm.ctc").write_text('model hf "model"\ncalibrate text "notes.txt" samples=2 seq_len=16 limit=300\n'
                                    'evaluate text "notes.txt" samples=2 seq_len=16 skip=300\n'
                                    "pipeline {\n    cse\n}\ncheck ppl_increase <= 1\n")
    assert main(["compile", str(project / "lm.ctc"), "--out", str(project / "lm_art"), "-q"]) == EXIT_OK
    return project / "lm_art"


def test_eval_warns_when_it_reads_calibration_text(project: Path, lm_art: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The compile warned when evaluation read calibration text, but `ctc eval ART --skip 0` or `--data
    text:FILE` on the calibration file measured on it without a word; now the result carries a warning naming
    the tokens and the --skip that avoids them (and none when the windows lie past the calibrated range)."""
    import json

    art = str(lm_art)
    monkeypatch.chdir(project)  # --data paths are the user's, relative to the working directory
    for flags, warned in (([], False), (["--data", "text:notes.txt", "--skip", "300"], False),
                          (["--skip", "0"], True), (["--data", "text:notes.txt"], True),
                          (["--skip", "280"], True), (["--data", "text:model/config.json", "--seq-len", "8"], False)):
        assert main(["eval", art, "--json", "-q", "--no-baseline", *flags]) == EXIT_OK, flags
        res = json.loads(capsys.readouterr().out)
        assert ("warnings" in res) == warned, (flags, res.get("warnings"))
        if warned:
            assert len(res["warnings"]) == 1 and "calibrated on (notes.txt, tokens" in res["warnings"][0]
            assert "--skip 300" in res["warnings"][0]
    assert main(["eval", art, "--skip", "0", "-q", "--no-baseline"]) == EXIT_OK
    assert "warning: the evaluation windows read text the artifact was calibrated on" in capsys.readouterr().out


def test_model_folder_without_tokenizer_says_what_to_add(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Hugging Face folder without tokenizer files and a `calibrate text` line got the hint 'a .pt2 model has no
    tokenizer ... calibrate it from Python instead', and `ctc run --text` on its artifact said only 'has no
    tokenizer'; both now say what to add or give instead."""
    import shutil

    bare = project / "bare"
    bare.mkdir(exist_ok=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(project / "model" / f, bare / f)
    (project / "bare.ctc").write_text('model hf "bare"\ncalibrate text "notes.txt" samples=2 seq_len=16\n'
                                      "pipeline {\n    cse\n}\n")
    assert main(["compile", str(project / "bare.ctc"), "--out", str(project / "bare_a"), "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "bare holds no tokenizer" in err and "copy the model's tokenizer files" in err and ".pt2" not in err
    (project / "bare.ctc").write_text('model hf "bare"\npipeline {\n    cse\n}\n')
    assert main(["compile", str(project / "bare.ctc"), "--out", str(project / "bare_a"), "-q"]) == EXIT_OK
    capsys.readouterr()
    assert main(["run", str(project / "bare_a"), "--text", "hi", "-q"]) != EXIT_OK
    assert "ctc run --input FILE.safetensors" in capsys.readouterr().err


def test_text_files_users_have(tmp_path: Path) -> None:
    """A UTF-8 file saved with a byte-order mark (Windows editors) was read with U+FEFF as its first character,
    tokenized into the first window, and a .jsonl file with one failed as invalid JSON on line 1; a UTF-16 file
    got 'not UTF-8 at byte 0; convert it with iconv -t utf-8' (which converts nothing without -f)."""
    from ctc.eval.data import read_jsonl, read_text_file

    p = tmp_path / "notes.txt"
    p.write_bytes(b"\xef\xbb\xbfcaf\xc3\xa9 notes\r\nline two\n")
    assert read_text_file(p) == "café notes\r\nline two\n"
    j = tmp_path / "d.jsonl"
    j.write_bytes(b'\xef\xbb\xbf{"text": "one"}\n{"text": "two"}\n')
    assert read_jsonl(j) == ["one", "two"]
    for enc, name in (("utf-16", "UTF-16"), ("utf-32", "UTF-32")):
        p.write_bytes("café notes".encode(enc))
        with pytest.raises(ValueError, match=f"{name} text .*`iconv -f {enc} -t utf-8`"):
            read_text_file(p)
    for enc in ("utf-16le", "utf-16be"):  # no mark: NUL bytes every other byte
        p.write_bytes("plain notes, in UTF-16".encode(enc))
        with pytest.raises(ValueError, match=f"looks like {enc.upper()} text without a byte-order mark.*-f {enc}"):
            read_text_file(p)
    p.write_bytes(b"\x00" * 4096)  # valid UTF-8, so it was tokenized: a zero-filled file calibrated on NUL tokens
    with pytest.raises(ValueError, match="a NUL byte at byte 0: this is binary data, not a text file"):
        read_text_file(p)
    p.write_bytes(b"\xef\xbb\xbfcaf\xe9")  # the byte offset counts the mark
    with pytest.raises(ValueError, match="not UTF-8 text at byte 6; convert it with `iconv -f ENCODING -t utf-8`"):
        read_text_file(p)


def test_a_folder_given_as_data_is_named_as_such(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`calibrate text "corpus"` on a folder said 'data file not found', though the folder is right there."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "r.ctc").write_text('model bundled "minilm"\ncalibrate text "corpus" samples=2 seq_len=16\n')
    assert main(["compile", str(tmp_path / "r.ctc"), "--check-only"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "corpus is a folder; text data is one file" in err and "not found" not in err, err


def test_measure_holds_one_window_of_logits_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """`evaluate text "my.txt" samples=100000` on a tiny Llama (201 windows of 32 tokens, vocabulary 49152) was
    killed for memory in 'measure': every window's logits of both models were kept and compared as one float64
    tensor (23 GB). The metrics now add up window by window, equal to comparing the concatenation."""
    import weakref
    from types import SimpleNamespace

    import ctc.ir.interpreter
    from ctc.driver import Progress, measure
    from ctc.eval.fidelity import compare_outputs
    from ctc.eval.perplexity import batches_perplexity

    g = torch.Generator().manual_seed(0)
    live: list[weakref.ref[torch.Tensor]] = []
    kept: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    peak = 0

    def interpret(module: SimpleNamespace, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        nonlocal peak
        out = torch.randn(2, 6, 40, generator=g) * module.scale
        kept[module.name].append(out.clone())
        live.append(weakref.ref(out))
        peak = max(peak, sum(r() is not None for r in live))
        return [out]

    monkeypatch.setattr(ctc.ir.interpreter, "interpret", interpret)

    def module(name: str, scale: float) -> SimpleNamespace:
        return SimpleNamespace(name=name, scale=scale, nodes=[], param_count=lambda: 10, param_bytes=lambda: 40)

    batches = [{"input_ids": torch.randint(0, 40, (2, 6), generator=g),
                "attention_mask": torch.tensor([[1] * 6, [1] * (6 - k % 3) + [0] * (k % 3)])} for k in range(15)]
    m = measure(module("a", 1.0), module("b", 1.3), SimpleNamespace(task="causal_lm"), batches,
                {"fidelity", "max_error", "ppl", "kl"}, Progress(False))
    assert peak <= 3  # one window of each model and the next being made; the old code kept all 30
    ref, cand = torch.cat(kept["a"]), torch.cat(kept["b"])
    whole = compare_outputs(ref, cand, logits=True, mask=torch.cat([b["attention_mask"] for b in batches]))
    assert m["fidelity"]["compressed"] == pytest.approx(whole.cosine, rel=1e-12)
    assert m["fidelity"]["rows"] == whole.rows == sum(int(b["attention_mask"].sum()) for b in batches)
    assert m["fidelity"]["rel_error"] == pytest.approx(whole.rel_error, rel=1e-12)
    assert m["max_error"]["compressed"] == whole.max_abs_error
    assert m["kl"]["compressed"] == pytest.approx(whole.kl, rel=1e-12)
    served = iter(kept["b"])
    ppl = batches_perplexity(lambda ids, mask: next(served), batches)
    assert m["ppl"]["compressed"] == pytest.approx(ppl.ppl, rel=1e-12) and ppl.windows == 30


def test_windows_the_text_cannot_fill_or_the_tokenizer_cannot_read_are_warned(
        project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`evaluate text "notes.txt" samples=500` on a text of a few windows measured on those few without a word
    (only the protocol's window count told), and emoji text under MiniLM's WordPiece tokenizer calibrated on
    94% '[UNK]' tokens silently; both are now warnings at the recipe line, kept in the report (and in ctc eval's
    result)."""
    import json

    from transformers import AutoTokenizer

    from ctc.bundled import bundled_model_dir
    from ctc.eval.data import model_batches

    tok = AutoTokenizer.from_pretrained(str(bundled_model_dir("minilm")), local_files_only=True)
    emoji = tmp_path / "emoji.txt"
    emoji.write_text("\U0001f600\U0001f389 " * 300 + "the end")
    common = {"field": None, "tokenizer": tok, "input_names": ["input_ids"], "seed": 0}
    _, proto = model_batches(source="text", path=emoji, split="calibration", samples=2, seq_len=16, **common)
    assert len(proto["warnings"]) == 1 and "unknown token '[UNK]'" in proto["warnings"][0]
    _, proto = model_batches(source="text", path=project / "notes.txt", split="evaluation", samples=1000,
                             seq_len=16, **common)
    assert proto["warnings"] == [f"samples=1000 asked for more windows than the text holds: measured on the "
                                 f"{proto['windows']} consecutive windows of 16 tokens it has"]
    _, proto = model_batches(source="text", path=project / "notes.txt", split="evaluation", samples=3,
                             seq_len=16, **common)
    assert "warnings" not in proto

    (project / "many.ctc").write_text('model hf "model"\ncalibrate text "notes.txt" samples=2 seq_len=16 limit=300\n'
                                      'evaluate text "notes.txt" samples=1000 seq_len=64 skip=300\n'
                                      "pipeline {\n    cse\n}\n")
    art = project / "many_art"
    assert main(["compile", str(project / "many.ctc"), "--out", str(art), "-q"]) == EXIT_OK
    err = capsys.readouterr().err
    assert "many.ctc:3:15: warning: evaluate: samples=1000 asked for more windows than the text holds" in err, err
    report = json.loads((art / "report.json").read_text())
    assert any("samples=1000 asked" in w for w in report["warnings"])
    assert main(["eval", str(art), "--json", "-q", "--no-baseline"]) == EXIT_OK
    assert any("samples=1000 asked" in w for w in json.loads(capsys.readouterr().out)["warnings"])


def test_skip_and_limit_that_leave_too_little_say_so(project: Path) -> None:
    """`calibrate text "notes.txt" limit=10 seq_len=32` said 'the text has 10 tokens' of a text of thousands; the
    error now says skip/limit leave those and the text holds more."""
    from ctc.eval.data import calibration_batches, evaluation_windows

    tok = _smollm2_tokenizer(project)
    path = project / "notes.txt"
    with pytest.raises(ValueError, match=r"limit=10 leaves 10 of the text's \d+ tokens, fewer than one window of "
                                         r"32; lower skip, raise limit"):
        calibration_batches(tok, "text", 2, 32, path=path, limit=10)
    with pytest.raises(ValueError, match=r"skip=5 and limit=10 leave 10 of the text's \d+ tokens"):
        evaluation_windows(tok, "text", 2, 32, path=path, skip=5, limit=10)
    with pytest.raises(ValueError, match=r"the text has \d+ tokens, fewer than one window of 32000"):
        evaluation_windows(tok, "text", 2, 32000, path=path)


def _smollm2_tokenizer(project: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(project / "model"), local_files_only=True)


def test_eval_refuses_windows_past_the_models_positions(lm_art: Path, project: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`ctc eval ART --seq-len 200` on a model of 128 positions measured perplexity past them without a word (a
    recipe's seq_len=200 is refused), as did `--data` without --seq-len (256 by default), and on MiniLM (512)
    --seq-len 1000 ended in an InterpretError traceback."""
    assert main(["eval", str(lm_art), "--seq-len", "200", "--samples", "1", "--no-baseline", "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--seq-len 200 is longer than the model's 128 positions" in err and "--seq-len 128 or less" in err, err
    assert main(["eval", str(lm_art), "--seq-len", "128", "--samples", "1", "--no-baseline", "-q",
                 "--data", f"text:{project / 'notes.txt'}", "--skip", "300"]) == EXIT_OK
    capsys.readouterr()
    import json  # --data without --seq-len defaulted to 256-token windows, past this model's 128 positions

    assert main(["eval", str(lm_art), "--data", f"text:{project / 'notes.txt'}", "--skip", "300", "--samples", "1",
                 "--no-baseline", "--json", "-q"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["seq_len"] == 128
    from ctc.eval.data import read_jsonl

    (project / "body.jsonl").write_text('{"body": "words"}\n')
    with pytest.raises(ValueError, match=r"no field 'text' \(fields: body\); name the text field \(field=\"...\" in a "
                                         r"recipe, --data jsonl:FILE:FIELD for ctc eval\)"):
        read_jsonl(project / "body.jsonl")


def test_generate_advice_on_a_full_sequence_artifact_works_when_followed(
        lm_art: Path, project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ctc run ART --generate` on a causal LM said to compile with `model ... decode=LEN`; doing that to a recipe
    with `check ppl_increase` failed again ('metric ppl_increase needs a causal_lm model'). The message now gives
    the recipe's own model line with a decode length that fits the model, and the check lines to drop."""
    assert main(["run", str(lm_art), "--text", "Hello", "--generate", "3", "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    line = 'model hf "model" decode=128'
    assert f"here: `{line}`" in err and "without its `check ppl_increase` lines" in err, err
    text = (project / "lm.ctc").read_text().replace('model hf "model"', line).replace("check ppl_increase <= 1\n", "")
    (project / "lm_dec.ctc").write_text(text)
    assert main(["compile", str(project / "lm_dec.ctc"), "--out", str(project / "lm_dec"), "-q"]) == EXIT_OK
    capsys.readouterr()
    assert main(["run", str(project / "lm_dec"), "--text", "Hello", "--generate", "3", "--ignore-eos", "-q"]) == EXIT_OK
    assert capsys.readouterr().err.startswith("3 tokens")


def test_jsonl_whose_text_fields_are_empty_is_refused(tmp_path: Path) -> None:
    """A .jsonl file whose "text" values were all empty calibrated on nothing but the blank-line separators
    between documents, without a word; it is now an error, and blank values among real ones are dropped."""
    from ctc.eval.data import read_jsonl

    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "", "body": "real words"}\n' * 50)
    with pytest.raises(ValueError, match=r"every line's 'text' is empty or blank \(50 lines\)"):
        read_jsonl(j)
    j.write_text('{"text": "one"}\n{"text": "  "}\n{"text": "two"}\n')
    assert read_jsonl(j) == ["one", "two"]


def test_eval_measures_a_decode_steps_perplexity(decoder: Path, lm_art: Path, project: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`ctc eval` of a decode-step artifact gave fidelity after one step only: no perplexity for the artifact a
    user generates with. --perplexity feeds each window through the step token by token; on the same windows it
    equals the full-sequence model's perplexity (same weights), also without the original; elsewhere it is refused
    rather than ignored."""
    import json

    flags = ["--data", f"text:{project / 'notes.txt'}", "--skip", "300", "--samples", "2", "--seq-len", "16",
             "--json", "-q"]
    assert main(["eval", str(decoder), *flags, "--perplexity"]) == EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert main(["eval", str(lm_art), *flags]) == EXIT_OK
    full = json.loads(capsys.readouterr().out)
    assert got["ppl"] == pytest.approx(full["ppl"], rel=1e-4) and got["tokens_scored"] == 30
    assert got["ppl_original"] == pytest.approx(full["ppl"], rel=1e-4) and "fidelity" in got
    assert "one token per step" in got["protocol"]
    assert main(["eval", str(decoder), *flags, "--perplexity", "--no-baseline"]) == EXIT_OK
    alone = json.loads(capsys.readouterr().out)
    assert alone["ppl"] == got["ppl"] and "fidelity" not in alone and "ppl_original" not in alone
    assert main(["eval", str(lm_art), *flags, "--perplexity"]) == EXIT_USAGE
    assert "always measured: leave it out" in capsys.readouterr().err


def test_decode_cache_and_windows_are_checked_before_loading(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`model hf "model" decode=256` on a 128-position model compiled, and --generate 200 then ran past the trained
    positions without a word; `decode=32` with a calibrate line of the default seq_len (128) failed only after the
    model loaded. Both are recipe errors at their place now."""
    cases = (('model hf "model" decode=256\n', "1:18: error: model: decode=256 is longer than the model's 128 "
              "positions", "use decode <= 128"),
             ('model hf "model" decode=32\ncalibrate text "notes.txt" samples=2\n',
              "2:1: error: calibrate: the default seq_len=128 does not fit the decode step's cache of 32 positions",
              "use seq_len <= 32 on this line, or a larger decode="),
             ('model hf "model" decode=32\nevaluate text "notes.txt" samples=2 seq_len=33\n',
              "2:37: error: evaluate: seq_len=33 does not fit the decode step's cache of 32 positions",
              "seq_len <= 32"))
    for text, error, hint in cases:
        (project / "bad_dec.ctc").write_text(text + "pipeline {\n    dce\n}\n")
        assert main(["compile", str(project / "bad_dec.ctc"), "--check-only"]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert f"bad_dec.ctc:{error}" in err and hint in err, err
    (project / "ok_dec.ctc").write_text('model hf "model" decode=128\n'
                                        'calibrate text "notes.txt" samples=2 seq_len=128\npipeline {\n    dce\n}\n')
    assert main(["compile", str(project / "ok_dec.ctc"), "--check-only"]) == EXIT_OK
