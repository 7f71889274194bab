"""Bad input to the command line and to ``ctc.load(dir).run``: a clear UsageError (CLI exit 2) naming the
input and the fix, before any backend runs; never a traceback from deep inside an op, never a compiled
library reading past its embedding, position or cache table, never a file ctc did not write overwritten,
and an interrupted command says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import ctc
from ctc.artifact import write_artifact
from ctc.cli import EXIT_OK, EXIT_USAGE, main
from ctc.errors import UsageError
from ctc.ir.graph import Module
from ctc.ir.types import TensorType

VOCAB, POSITIONS = 10, 8


def _module(vocab: int = VOCAB) -> Module:
    """ids, mask [batch, seq] -> embedding rows masked: the shape of an encoder's first op."""
    m = Module("emb")
    m.add_param("emb", torch.randn(vocab, 4, generator=torch.Generator().manual_seed(0)))
    ids = m.add_input("input_ids", TensorType(("batch", "seq"), "i64"))
    mask = m.add_input("attention_mask", TensorType(("batch", "seq"), "i64"))
    h = m.create_node("embedding", [ids, m.param("emb")]).output
    f = m.create_node("cast", [mask], {"dtype": "f32"}).output
    f = m.create_node("unsqueeze", [f], {"axis": 2}).output
    y = m.create_node("mul", [h, f]).output
    m.set_outputs([y], ["hidden"])
    m.meta["task"] = "encoder"
    return m


@pytest.fixture()
def art_dir(tmp_path: Path) -> Path:
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "config.json").write_text(json.dumps({"max_position_embeddings": POSITIONS}))
    return write_artifact(tmp_path / "art", module=_module(), report={"name": "emb"}, tokenizer_dir=tok,
                          build_targets=[("cpu", lambda d: (d / "model.so").write_bytes(b"lib") and {})])


def _ok(seq: int = 4, batch: int = 1) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.arange(batch * seq).reshape(batch, seq) % VOCAB,
            "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


class _Library:
    """Stands in for a loaded compiled library: records whether it was called."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, inputs: Any) -> list[torch.Tensor]:
        self.calls += 1
        return [torch.zeros(1)]


BAD: list[tuple[str, Any, str]] = [
    ("missing input", {"input_ids": _ok()["input_ids"]}, "missing input 'attention_mask'"),
    ("too few inputs", [_ok()["input_ids"]], "takes 2 inputs (input_ids, attention_mask), got 1"),
    ("float token ids", {**_ok(), "input_ids": _ok()["input_ids"].float()}, "'input_ids' must be i64"),
    ("rank", {**_ok(), "input_ids": _ok()["input_ids"][0]}, "'input_ids' must have 2 dims"),
    ("batch mismatch", {**_ok(), "attention_mask": torch.ones(2, 4, dtype=torch.long)},
     "'attention_mask' axis 0 is batch = 2, but input 'input_ids' gave batch = 1"),
    ("seq mismatch", {**_ok(), "attention_mask": torch.ones(1, 3, dtype=torch.long)}, "seq = 3"),
    ("empty", _ok(seq=0), "'input_ids' is empty (seq = 0 on axis 1)"),
    ("id past the vocabulary", {**_ok(seq=3), "input_ids": torch.tensor([[1, 2, VOCAB]])},
     f"token ids in [1, {VOCAB}]; the embedding has {VOCAB} rows"),
    ("negative id", {**_ok(seq=3), "input_ids": torch.tensor([[-5, 2, 3]])}, "token ids in [-5, 3]"),
    ("more tokens than positions", _ok(seq=POSITIONS + 1), f"but the model has {POSITIONS} positions"),
    ("not a tensor", {**_ok(), "input_ids": "hello"}, "'input_ids': cannot be read as a tensor"),
    # these two were wrong errors before: text read as 5 inputs ("takes 2 inputs, got 5"), torch's meta-tensor failure
    ("text", "hello", "inputs are token tensors, not text: tokenize it first"),
    ("meta tensor", {k: v.to("meta") for k, v in _ok().items()}, "'input_ids' is a meta tensor (no data)"),
]


@pytest.mark.parametrize("what,inputs,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_are_usage_errors_on_every_backend(art_dir: Path, what: str, inputs: Any, message: str) -> None:
    art = ctc.load(art_dir)
    with pytest.raises(UsageError, match=_re(message)):
        art.run(inputs)
    lib = _Library()
    art._runners["cpu"] = lib
    with pytest.raises(UsageError, match=_re(message)):
        art.run(inputs, target="cpu")
    assert lib.calls == 0, "the compiled library ran on inputs that were checked to be wrong"


def test_cache_positions_past_the_cache_are_refused(tmp_path: Path) -> None:
    """A decode step writes the new key/value rows at ``position`` in place: a compiled library given a position
    past its cache would write past the buffer."""
    m = Module("step")
    cache = m.add_input("cache_k_0", TensorType((1, 4, 2), "f32"))
    pos = m.add_input("position", TensorType((1,), "i64"))
    new = m.add_input("k", TensorType((1, 1, 2), "f32"))
    m.set_outputs([m.create_node("cache_write", [cache, new, pos], {"axis": 1}).output], ["cache_k_0"])
    dest = write_artifact(tmp_path / "art", module=m, report={"name": "step"},
                          build_targets=[("cpu", lambda d: (d / "model.so").write_bytes(b"lib") and {})])
    art = ctc.load(dest)
    feed = {"cache_k_0": torch.zeros(1, 4, 2), "k": torch.ones(1, 1, 2)}
    assert art.run({**feed, "position": torch.tensor([3])})[0][0, 3].tolist() == [1.0, 1.0]
    lib = _Library()
    art._runners["cpu"] = lib
    for bad in (4, -1):
        for target in (None, "cpu"):
            with pytest.raises(UsageError, match=_re(f"'position' holds cache positions in [{bad}, {bad}]; the "
                                                     "cache has 4 positions")):
                art.run({**feed, "position": torch.tensor([bad])}, target=target)
    assert lib.calls == 0


def _re(text: str) -> str:
    import re

    return re.escape(text)


def test_good_inputs_run_in_any_form(art_dir: Path) -> None:
    art = ctc.load(art_dir)
    want = art.run(_ok())[0]
    assert want.shape == (1, 4, 4)
    as_list = art.run([_ok()["input_ids"], _ok()["attention_mask"]])[0]
    narrow = art.run({k: v.to(torch.int32) for k, v in _ok().items()})[0]  # same kind, another width: cast
    extra = art.run({**_ok(), "token_type_ids": torch.zeros(1, 4, dtype=torch.long)})[0]  # a tokenizer's extra
    boolean = art.run({**_ok(), "attention_mask": torch.ones(1, 4, dtype=torch.bool)})[0]
    numpy = art.run({k: v.numpy() for k, v in _ok().items()})[0]
    for got in (as_list, narrow, extra, boolean, numpy):
        assert torch.equal(got, want)
    assert art.run(_ok(seq=POSITIONS))[0].shape == (1, POSITIONS, 4)


def test_cli_run_bad_input_files_exit_2_without_traceback(art_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    save_file({"input_ids": torch.tensor([[1, 99]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)},
              str(tmp_path / "oob.safetensors"))
    save_file({"input_ids": torch.tensor([[1, 2]])}, str(tmp_path / "missing.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(_ok(), tmp_path / "ok.pt")
    cases = {"oob.safetensors": "token ids in [1, 99]", "missing.safetensors": "missing input 'attention_mask'",
             "garbage.safetensors": "cannot be read as safetensors", "garbage.pt": "cannot be read with torch.load",
             "empty.pt": "cannot be read with torch.load"}
    for name, message in cases.items():
        rc = main(["run", str(art_dir), "--input", str(tmp_path / name), "-q"])
        err = capsys.readouterr().err
        assert rc == EXIT_USAGE, (name, err)
        assert message in err and "Traceback" not in err, (name, err)
        assert str(tmp_path / name) in err or "input" in err, (name, err)
    assert main(["run", str(art_dir), "--input", str(tmp_path / "ok.pt"), "-q"]) == EXIT_OK
    assert "hidden: (1, 4, 4)" in capsys.readouterr().out


# --------------------------------------------------------------------------- ctc bench
class _ThreadedLibrary(_Library):
    """A loaded library whose worker pool was sized when it loaded (as the TVM runtime's is)."""

    threads = 3


@pytest.fixture()
def bench_art(tmp_path: Path) -> Any:
    """A tiny artifact with the real MiniLM tokenizer (so `ctc bench` can make its inputs) and a cpu library."""
    from ctc.bundled import bundled_model_dir

    m = Module("emb")
    m.add_param("emb", torch.zeros(30522, 2))
    ids = m.add_input("input_ids", TensorType(("batch", "seq"), "i64"))
    m.set_outputs([m.create_node("embedding", [ids, m.param("emb")]).output], ["hidden"])
    dest = write_artifact(tmp_path / "art", module=m, report={"name": "emb"}, tokenizer_dir=bundled_model_dir("minilm"),
                          build_targets=[("cpu", lambda d: (d / "model.so").write_bytes(b"lib") and {})])
    art = ctc.load(dest)
    art._runners["cpu"] = _ThreadedLibrary()
    return art


def test_bench_states_the_library_threads_and_refuses_a_count_it_cannot_apply(bench_art: Any) -> None:
    from ctc.driver import bench_artifact

    res = bench_artifact(bench_art, target="cpu", batch=1, seq_len=4, repeat=20, threads=None)
    assert res["protocol"].endswith(", 3 thread(s)"), res["protocol"]  # the library's pool, not torch's
    with pytest.raises(UsageError, match=r"--threads 1: this cpu library runs 3 worker threads"):
        bench_artifact(bench_art, target="cpu", batch=1, seq_len=4, repeat=20, threads=1)
    res = bench_artifact(bench_art, target="cpu", batch=1, seq_len=4, repeat=20, threads=3)
    assert res["protocol"].endswith(", 3 thread(s)")
    with pytest.raises(UsageError, match=r"--threads must be <= 256 .*got 1000"):  # the pool's cap
        bench_artifact(bench_art, target="cpu", batch=1, seq_len=4, repeat=20, threads=1000)


def _minilm_vocab_artifact(tmp_path: Path, positions: int) -> Any:
    """An embedding artifact with MiniLM's tokenizer whose config says ``positions`` positions, and a cpu library."""
    import shutil

    from ctc.bundled import bundled_model_dir

    tok = tmp_path / "tok"
    src = bundled_model_dir("minilm")
    tok.mkdir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, tok / name)
    (tok / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()),
                                                 "max_position_embeddings": positions}))
    m = Module("emb")
    m.add_param("emb", torch.zeros(30522, 2))
    ids = m.add_input("input_ids", TensorType(("batch", "seq"), "i64"))
    m.set_outputs([m.create_node("embedding", [ids, m.param("emb")]).output], ["hidden"])
    return ctc.load(write_artifact(tmp_path / "art", module=m, report={"name": "emb"}, tokenizer_dir=tok,
                                   log=lambda _: None,
                                   build_targets=[("cpu", lambda d: (d / "model.so").write_bytes(b"lib") and {})]))


def test_a_target_the_artifact_lacks_names_the_fix(tmp_path: Path) -> None:
    """`ctc bench ART --target cpu` on an artifact compiled without a target said only 'has no compiled target 'cpu'
    (has: none)'; it now says how to get one, or to time the torch backend, and a kind ctc has no target for (gpu)
    names the kinds."""
    from ctc.errors import ArtifactError

    m = Module("mlp")
    m.set_outputs([m.create_node("relu", [m.add_input("x", TensorType([2, 3], "f32"))]).output], ["y"])
    art = ctc.load(write_artifact(tmp_path / "a", module=m, report={"name": "mlp"}, log=lambda _: None))
    with pytest.raises(ArtifactError, match=r"has no compiled target 'cpu' \(has: none\).*add `target cpu` to the "
                                            r"recipe and compile again.*leave --target out"):
        art.runner("cpu")
    with pytest.raises(ArtifactError, match=r"'gpu' is not a target kind \(kinds: cpu, cuda, fpga"):
        art.runner("gpu")


def test_bench_default_length_fits_the_models_positions(tmp_path: Path) -> None:
    """`ctc bench ART` (no flags) on a BERT with 64 positions failed: 'input_ids has seq = 128, but the model has 64
    positions ... cut the input (e.g. tokenizer(..., truncation=True, max_length=64))', advice for a flag the user
    never gave. The default length is now the model's 64; an explicit longer --seq-len keeps that error."""
    from ctc.driver import bench_artifact

    art = _minilm_vocab_artifact(tmp_path, 64)
    art._runners["cpu"] = _ThreadedLibrary()
    for target in (None, "cpu"):
        assert bench_artifact(art, target=target, batch=None, seq_len=None, repeat=20, threads=None)["seq_len"] == 64
    with pytest.raises(UsageError, match="seq = 100, but the model has 64 positions"):
        bench_artifact(art, target=None, batch=None, seq_len=100, repeat=20, threads=None)


def test_bench_seq_len_past_the_text_times_that_many_tokens(tmp_path: Path) -> None:
    """`ctc bench ART --seq-len 5000` on a text model with 8192 positions failed with a traceback ('The expanded
    size of the tensor (4623) must match the existing size (5000)'): the bench text is 4623 tokens long. The text
    now repeats until the window has the length asked for, so the time reported is for the tokens it says."""
    from ctc.driver import bench_artifact

    art = _minilm_vocab_artifact(tmp_path, 8192)
    fed: list[torch.Tensor] = []

    class _Recording(_ThreadedLibrary):
        def __call__(self, inputs: Any) -> list[torch.Tensor]:
            fed.append(inputs["input_ids"] if isinstance(inputs, dict) else inputs[0])
            return super().__call__(inputs)

    art._runners["cpu"] = _Recording()
    res = bench_artifact(art, target="cpu", batch=2, seq_len=6000, repeat=20, threads=None)
    assert res["seq_len"] == 6000 and fed and all(t.shape == (2, 6000) for t in fed), res
    assert bool((fed[0][:, -1000:] != 0).all()), "the window's end is text, not padding"


def test_compile_states_the_library_threads_in_its_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    """A `target cpu threads=1` build on a 2-core machine: the compile's report said 'median/p90 of 20 runs after 3
    warm-up, 2 thread(s)' for the library (torch's count, as `ctc bench` once did). The protocol now states the
    library's pool; the torch backend's part keeps torch's."""
    import ctc.backends.tvm
    from ctc.driver import measure_target
    from ctc.ir.interpreter import interpret

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    m = _module()

    class _OneThread(_Library):
        threads = 1

        def __call__(self, inputs: Any) -> list[torch.Tensor]:
            super().__call__(inputs)
            return interpret(m, inputs)

    monkeypatch.setattr(ctc.backends.tvm, "load", lambda d, module: _OneThread())
    try:
        res = measure_target(m, "cpu", Path("unused"), _ok(), "synthetic inputs")
    finally:
        torch.set_num_threads(before)
    lib_part, torch_part = res["protocol"].split("; ")[1:]
    assert lib_part.endswith(", 1 thread(s)") and torch_part.endswith(", 2 thread(s)"), res["protocol"]


def test_a_size_the_model_fixes_is_not_blamed_on_the_build() -> None:
    """A library built with seq=128 refused an input whose channel axis (3 in the IR itself) was wrong with 'this
    library was built for fixed shapes (seq=128): ... axis 1 must be 3 ... build the target without fixing it',
    advice that cannot help: only an axis the build fixed gets that message."""
    from ctc.backends.tvm.inputs import check_shape, input_specs

    spec = input_specs({"inputs": [{"name": "x", "shape": [1, 3, "seq"], "dtype": "f32"}],
                        "static_dims": {"seq": 128}})[0]
    with pytest.raises(UsageError) as e:
        check_shape(spec, (1, 4, 128), {})
    assert str(e.value) == "input 'x' axis 1 must be 3, got 4"
    with pytest.raises(UsageError, match=r"built for fixed shapes \(seq=128\): input 'x' axis 2 must be 128, got 9"):
        check_shape(spec, (1, 3, 9), {})


def test_generation_takes_token_ids_in_any_form_and_refuses_others() -> None:
    """ctc.generate.greedy_generate: a list prompt failed with "'list' object has no attribute 'dim'", float
    'token ids' were used as they were, max_new_tokens="3" failed comparing str and int."""
    from ctc.generate import greedy_generate

    specs = [{"name": "input_ids", "shape": [1, 1], "dtype": "i64"}, {"name": "position", "shape": [1], "dtype": "i64"},
             {"name": "cache_k_0", "shape": [1, 1, 8, 2], "dtype": "f32"},
             {"name": "cache_v_0", "shape": [1, 1, 8, 2], "dtype": "f32"}]

    def step(feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:  # next token = this one + 1
        logits = torch.zeros(1, 1, 11)
        logits[0, 0, (int(feed["input_ids"][0, 0]) + 1) % 11] = 1
        return [logits, feed["cache_k_0"], feed["cache_v_0"]]

    for prompt in ([[1, 2]], torch.tensor([[1, 2]], dtype=torch.int32)):
        assert greedy_generate(step, prompt, 3, input_specs=specs).tokens.tolist() == [[3, 4, 5]]
    import numpy as np  # a count computed with numpy is a count (the int check refused np.int64(3))

    assert greedy_generate(step, [[1, 2]], np.int64(3), input_specs=specs).tokens.tolist() == [[3, 4, 5]]
    for prompt, n, msg in (([[1.0, 2.0]], 3, "token ids must be integers, got torch.float64"),
                           ("hi", 3, "token ids must be a tensor, array or nested list of integers"),
                           ([1, 2], 3, r"prompt must be \[1, P>=1\] token ids, got \(2,\)"),
                           ([[1, 2]], "3", "max_new_tokens must be an int >= 1, got '3'")):
        with pytest.raises(ValueError, match=msg):
            greedy_generate(step, prompt, n, input_specs=specs)


# --------------------------------------------------------------------------- text on a fixed-length library
class _FixedLibrary:
    """A library built for one sequence length (`target cpu seq_len=16`): refuses any other, as the real one does."""

    def __init__(self, module: Module, seq: int = 16) -> None:
        from ctc.artifact import torch_runner

        self.run, self.fed, self.seq = torch_runner(module), [], seq
        self.static_dims = {"seq": seq}

    def __call__(self, inputs: Any) -> list[torch.Tensor]:
        ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs[0]
        if ids.shape[1] != self.seq:
            raise UsageError(f"this library was built for fixed shapes (seq={self.seq}): got {ids.shape[1]}")
        self.fed.append(ids)
        return list(self.run(inputs))


def _fixed_length_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seq: int) -> tuple[Any, Path]:
    """An encoder artifact with the real MiniLM tokenizer and a cpu library built for ``seq`` tokens."""
    import ctc.cli
    from ctc.bundled import bundled_model_dir

    dest = write_artifact(tmp_path / "art", module=_module(vocab=30522), report={"name": "emb"},
                          tokenizer_dir=bundled_model_dir("minilm"), log=lambda _: None,
                          build_targets=[("cpu", lambda d: (d / "model.so").write_bytes(b"lib") and {})])
    art = ctc.load(dest)
    art._runners["cpu"] = _FixedLibrary(art.module, seq)
    monkeypatch.setattr(ctc.cli, "_load_artifact", lambda path: art)
    return art, dest


def test_cli_text_runs_on_a_library_built_for_one_length(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The guide's `ctc run out/first --target cpu --text ...` on its `target cpu seq_len=128` build failed:
    `--text` cannot be padded by the user.  The text is padded (with its attention mask) to the build's length and
    the outputs cut back to the text's tokens, so the line printed is the torch backend's."""
    art, dest = _fixed_length_artifact(tmp_path, monkeypatch, 16)
    lib = art._runners["cpu"]
    assert art.fixed_seq_len("cpu") == 16 and art.fixed_seq_len() is None
    assert main(["run", str(dest), "--text", "A sentence to embed.", "-q"]) == EXIT_OK
    want = capsys.readouterr().out
    assert main(["run", str(dest), "--target", "cpu", "--text", "A sentence to embed.", "-q"]) == EXIT_OK
    assert capsys.readouterr().out == want and "hidden: (1, 8, 4)" in want and lib.fed[0].shape == (1, 16)
    assert main(["run", str(dest), "--target", "cpu", "--text", "word " * 20, "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "the text is 22 tokens, but this cpu library was built for 16" in err, err


def test_bench_takes_the_length_a_library_was_built_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ctc bench ART --target cpu` on a `seq_len=16` build timed 128 tokens and failed with the library's 'give
    inputs of exactly that size (token ids padded ...)'; it now takes the build's length, and a --seq-len
    other than it is refused naming the one to give."""
    from ctc.driver import bench_artifact

    art, _ = _fixed_length_artifact(tmp_path, monkeypatch, 16)
    assert bench_artifact(art, target="cpu", batch=1, seq_len=None, repeat=20, threads=None)["seq_len"] == 16
    assert bench_artifact(art, target=None, batch=1, seq_len=None, repeat=20, threads=None)["seq_len"] == 128
    with pytest.raises(UsageError, match="--seq-len 64: this cpu library was built for 16 tokens"):
        bench_artifact(art, target="cpu", batch=1, seq_len=64, repeat=20, threads=None)
    art._runners["cpu"].static_dims = {"batch": 3, "seq": 16}  # `target cpu batch=3 seq_len=16`: batch likewise
    assert bench_artifact(art, target="cpu", batch=None, seq_len=None, repeat=20, threads=None)["batch"] == 3
    with pytest.raises(UsageError, match="--batch 1: this cpu library was built for batch 3"):
        bench_artifact(art, target="cpu", batch=1, seq_len=None, repeat=20, threads=None)


def test_bench_takes_the_batch_a_pt2_library_was_built_for(tmp_path: Path) -> None:
    """A .pt2 with a dynamic batch (captured as `d0`) built with `target cpu batch=4`: `ctc bench --target cpu` fed
    batch 1 and failed with the library's 'built for fixed shapes (d0=4)'; it now takes the build's batch, and
    --batch 2 is refused naming the one to give, as for a Hugging Face model's `batch`."""
    from ctc.driver import bench_artifact

    m = Module("mlp")
    m.set_outputs([m.create_node("relu", [m.add_input("x", TensorType(["d0", 16], "f32"))]).output], ["y"])
    art = ctc.load(write_artifact(tmp_path / "a", module=m, report={"name": "mlp"}, log=lambda _: None,
                                  build_targets=[("cpu", lambda d: (d / "model.so").write_bytes(b"lib") and {})]))
    art._runners["cpu"] = lib = _ThreadedLibrary()
    lib.static_dims = {"d0": 4}
    assert bench_artifact(art, target="cpu", batch=None, seq_len=None, repeat=20, threads=None)["batch"] == 4
    with pytest.raises(UsageError, match="--batch 2: this cpu library was built for batch 4"):
        bench_artifact(art, target="cpu", batch=2, seq_len=None, repeat=20, threads=None)


def test_cli_text_longer_than_the_model_says_to_shorten_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`ctc run --text` past the model's positions advised 'tokenizer(..., truncation=True, max_length=512)', which
    a command-line user cannot do."""
    _, dest = _fixed_length_artifact(tmp_path, monkeypatch, 16)
    assert main(["run", str(dest), "--text", "word " * 600, "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "the text is 602 tokens, but the model has 512 positions" in err and "tokenizer(" not in err, err


def test_human_similarity_on_a_library_built_for_one_length(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`ctc eval --human-similarity --target cpu` on a fixed-length build failed after loading the original model,
    with the library's 'give inputs of exactly that size', which the user cannot do: a build shorter than the
    documents' 256 tokens is refused first, naming the fix; a long enough one is fed padded documents."""
    art, dest = _fixed_length_artifact(tmp_path, monkeypatch, 16)
    argv = ["eval", str(dest), "--human-similarity", "--target", "cpu", "--docs", "3", "--no-baseline", "-q"]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "this cpu library was built for 16 tokens" in err and "256" in err, err
    art._runners["cpu"] = lib = _FixedLibrary(art.module, 256)
    assert main(argv) == EXIT_OK
    assert "human sim.: Pearson" in capsys.readouterr().out and lib.fed[0].shape == (1, 256)


def test_human_similarity_refuses_to_pad_for_a_model_without_an_attention_mask(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixed-length build of an encoder that takes no attention mask: the padded documents' hidden states would
    attend to the padding (silently other embeddings); refused naming why, as `ctc run --text` refuses it."""
    import ctc.cli
    from ctc.bundled import bundled_model_dir

    m = Module("emb")
    m.add_param("emb", torch.randn(30522, 4, generator=torch.Generator().manual_seed(0)))
    ids = m.add_input("input_ids", TensorType(("batch", "seq"), "i64"))
    m.set_outputs([m.create_node("embedding", [ids, m.param("emb")]).output], ["hidden"])
    m.meta["task"] = "encoder"
    dest = write_artifact(tmp_path / "art", module=m, report={"name": "emb"}, tokenizer_dir=bundled_model_dir("minilm"),
                          log=lambda _: None,
                          build_targets=[("cpu", lambda d: (d / "model.so").write_bytes(b"lib") and {})])
    art = ctc.load(dest)
    art._runners["cpu"] = lib = _FixedLibrary(art.module, 256)
    monkeypatch.setattr(ctc.cli, "_load_artifact", lambda path: art)
    argv = ["eval", str(dest), "--human-similarity", "--target", "cpu", "--docs", "3", "--no-baseline", "-q"]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "takes no attention mask to hide the padding with" in err and not lib.fed, err


def test_bench_makes_inputs_for_a_model_without_a_tokenizer(tmp_path: Path) -> None:
    """`ctc bench` on a CNN (a .pt2 with no tokenizer) refused: 'this artifact has no tokenizer, so ctc bench cannot
    build its inputs'.  It times seeded N(0, 1) inputs of the model's shapes (batch and seq from the flags) and says
    so; a symbol it cannot size is named."""
    from ctc.driver import bench_artifact

    m = Module("cnn")
    x = m.add_input("x", TensorType(("batch", 3, 5), "f32"))
    m.set_outputs([m.create_node("relu", [x]).output], ["y"])
    art = ctc.load(write_artifact(tmp_path / "a", module=m, report={"name": "cnn"}, log=lambda _: None))
    res = bench_artifact(art, target=None, batch=2, seq_len=None, repeat=20, threads=None)
    assert res["inputs"] == "x f32[2, 3, 5] (synthetic: floats N(0, 1), seed 0)" and "seq_len" not in res, res
    m2 = Module("img")
    m2.set_outputs([m2.create_node("relu", [m2.add_input("x", TensorType((1, "h", "w"), "f32"))]).output], ["y"])
    art2 = ctc.load(write_artifact(tmp_path / "b", module=m2, report={"name": "img"}, log=lambda _: None))
    with pytest.raises(UsageError, match="input 'x' has a dim 'w' that cannot be sized here.*ctc bench sizes only"):
        bench_artifact(art2, target=None, batch=None, seq_len=128, repeat=20, threads=None)


def test_bench_sizes_the_dims_the_model_has_and_refuses_flags_for_the_others(tmp_path: Path) -> None:
    """`ctc bench --seq-len 64 --batch 2` on an MLP captured as x [4, 32] timed x [4, 32] and printed nothing
    about the ignored flags (ctc analyze refuses them); on a .pt2 exported with a dynamic batch and sequence
    (symbols d0, d1) it failed: 'input 'x' has a dim 'd0' that cannot be sized here (sized: batch, seq)'."""
    from ctc.driver import bench_artifact

    def artifact(name: str, shape: tuple) -> Any:
        m = Module(name)
        m.set_outputs([m.create_node("relu", [m.add_input("x", TensorType(shape, "f32"))]).output], ["y"])
        return ctc.load(write_artifact(tmp_path / name, module=m, report={"name": name}, log=lambda _: None))

    mlp = artifact("mlp", (4, 32))
    for flags, flag in (({"seq_len": 64, "batch": None}, "--seq-len 64"), ({"seq_len": None, "batch": 2}, "--batch 2")):
        with pytest.raises(UsageError, match=f"{flag}: the model's inputs have no .* dim"):
            bench_artifact(mlp, target=None, repeat=20, threads=None, **flags)
    res = bench_artifact(artifact("pt2", ("d0", "d1", 8)), target=None, batch=2, seq_len=7, repeat=20, threads=None)
    assert res["inputs"].startswith("x f32[2, 7, 8]") and (res["batch"], res["seq_len"]) == (2, 7), res


def _fpga_design_artifact(tmp_path: Path, latency_ms: float) -> Any:
    """A loaded artifact with an fpga target whose report models ``latency_ms`` and which has no C simulation to
    load (a ``csim=false`` build)."""
    import json

    def design(d: Path) -> dict:
        (d / "report.json").write_text(json.dumps({"totals": {"latency_ms": latency_ms}}))
        return {}

    return ctc.load(write_artifact(tmp_path / "art", module=_module(), report={"name": "emb"}, log=lambda _: None,
                                   build_targets=[("fpga", design)]))


def test_bench_refuses_to_time_a_simulated_design(tmp_path: Path) -> None:
    """`ctc bench --target fpga` timed the gcc C simulation and printed it as the design's median latency (1147 ms
    for a design modelled at 21 ms); `ctc analyze --profile` already refused that: both refuse it in one place,
    before loading the design (one built with csim=false has no simulation to load: the refusal is the same)."""
    from ctc.driver import bench_artifact

    with pytest.raises(UsageError, match=r"a C simulation.*modelled latency: 21\.0 ms"):
        bench_artifact(_fpga_design_artifact(tmp_path, 21.0), target="fpga", batch=1, seq_len=4, repeat=20,
                       threads=None)


def test_bench_refusal_reads_the_design_report_only_as_written(tmp_path: Path) -> None:
    """The refusal quoted targets/fpga/report.json's latency without checking it against the manifest: a
    hand-edited 21 -> 99 ms was printed as the modelled latency (ctc run already refused that file)."""
    from ctc.driver import bench_artifact
    from ctc.errors import ArtifactError

    art = _fpga_design_artifact(tmp_path, 21.0)
    report = art.path / "targets" / "fpga" / "report.json"
    report.write_text(report.read_text().replace("21.0", "99.0"))
    with pytest.raises(ArtifactError, match=r"report\.json: does not match its SHA-256"):
        bench_artifact(art, target="fpga", batch=1, seq_len=4, repeat=20, threads=None)


# --------------------------------------------------------------------------- files ctc writes on request
def test_output_files_never_replace_what_ctc_did_not_write(art_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(_ok(), tmp_path / "in.pt")
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"the user's own file")
    params = art_dir / "params.safetensors"
    before = params.read_bytes()
    cases = [
        (["run", str(art_dir), "--input", str(tmp_path / "in.pt"), "--save", str(tmp_path)], "is a directory"),
        (["run", str(art_dir), "--input", str(tmp_path / "in.pt"), "--save", str(tmp_path / "no" / "y.safetensors")],
         "does not exist"),
        (["run", str(art_dir), "--input", str(tmp_path / "in.pt"), "--save", str(params)], "inside the artifact"),
        (["run", str(art_dir), "--input", str(tmp_path / "in.pt"), "--save", str(mine)], "ctc did not write it"),
        (["analyze", str(art_dir), "--html", str(tmp_path / "no" / "r.html")], "does not exist"),
        (["analyze", str(art_dir), "--html", str(art_dir / "report.html")], "inside the artifact"),
        (["analyze", str(art_dir), "--html", str(mine)], "ctc did not write it"),
        (["eval", str(art_dir), "--write-lm-eval-task", str(mine)], "is a file"),
        (["eval", str(art_dir), "--write-lm-eval-task", str(art_dir)], "inside the artifact"),
        (["eval", str(art_dir), "--write-lm-eval-task", str(tmp_path / "t"), "--target", "cpu", "--docs", "3"],
         "--target, --docs would do nothing"),
        (["export", str(art_dir), "--to", "hf", "--out", str(art_dir / "hf")], "inside the artifact"),  # was written
    ]
    for argv, message in cases:
        rc = main([*argv, "-q"])
        err = capsys.readouterr().err
        assert rc == EXIT_USAGE and message in err and "Traceback" not in err, (argv, err)
    from ctc.errors import OutputDirError
    from ctc.output_dir import check_destination

    with pytest.raises(OutputDirError, match="is inside the artifact"):  # ctc compile --out ART/nested wrote it
        check_destination(art_dir / "nested" / "deeper")
    assert mine.read_bytes() == b"the user's own file" and params.read_bytes() == before
    ctc.load(art_dir).run(_ok())  # still a whole artifact
    out = tmp_path / "y.safetensors"
    for _ in range(2):  # a file ctc wrote is replaced
        assert main(["run", str(art_dir), "--input", str(tmp_path / "in.pt"), "--save", str(out), "-q"]) == EXIT_OK
        assert "wrote" not in capsys.readouterr().err  # -q: no info lines (it said 'wrote FILE' all the same)
    from safetensors.torch import load_file

    assert load_file(str(out))["hidden"].shape == (1, 4, 4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"


# --------------------------------------------------------------------------- counts on the command line
BAD_COUNTS = [
    ("bench", ["--threads", "0"], "--threads must be >= 1"),
    ("bench", ["--threads", "-1"], "--threads must be >= 1"),
    ("bench", ["--repeat", "0"], "--repeat must be >= 20"),
    ("bench", ["--repeat", "5"], "--repeat must be >= 20"),  # was silently raised to 20
    ("eval", ["--samples", "0"], "--samples must be >= 1"),  # 0 was read as "not given": the recipe's count ran
    ("eval", ["--seq-len", "0"], "--seq-len must be >= 1"),
    ("eval", ["--skip", "-1"], "--skip must be >= 0"),
    ("eval", ["--human-similarity", "--docs", "2"], "--docs must be 3 to 50"),  # was clamped to 3
    ("eval", ["--human-similarity", "--docs", "51"], "--docs must be 3 to 50"),  # was clamped to 50
    ("eval", ["--docs", "5"], "--docs applies to --human-similarity"),
    ("eval", ["--target", "cpu"], "--target applies to --human-similarity"),  # was ignored: torch numbers shown
    ("run", ["--text", "hi", "--top", "0"], "--top must be >= 1"),  # printed an empty list
    ("run", ["--text", "hi", "--top", "-2"], "--top must be >= 1"),  # was a traceback from torch.topk
    ("analyze", ["--target", "fpga", "--dim", "nosuch=3"], "--dim nosuch: the model has no input dim"),  # ignored
    ("export", ["--to", "hf", "--seq-len", "0"], "--seq-len must be >= 1"),  # was a traceback from transformers
    # flags that did nothing where given, silently
    ("bench", ["--kernels", "3"], "--kernels applies to --profile"),
    ("run", ["--text", "hi", "--top", "3"], "--top lists a causal LM's next-token candidates"),  # an encoder
    ("show", ["--json", "--ir"], "--ir and --json: give one"),
]


def test_show_json_of_a_recipe_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ctc show RECIPE --json` printed the recipe, as if --json were not there."""
    (tmp_path / "r.ctc").write_text('model bundled "minilm"\n')
    assert main(["show", str(tmp_path / "r.ctc"), "--json"]) == EXIT_USAGE
    assert "--json prints an artifact's report.json" in capsys.readouterr().err


@pytest.mark.parametrize("cmd,flags,message", BAD_COUNTS, ids=[f"{c} {' '.join(f)}" for c, f, _ in BAD_COUNTS])
def test_cli_counts_are_taken_as_given_or_refused(art_dir: Path, cmd: str, flags: list[str], message: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main([cmd, str(art_dir), *flags, "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


# --------------------------------------------------------------------------- Ctrl-C
@pytest.mark.parametrize("signum,rc,message", [(2, 130, "interrupted; nothing was written"),
                                               (15, 143, "terminated (SIGTERM); nothing was written")])
def test_an_interrupt_inside_a_library_that_swallows_it_still_reads_as_an_interrupt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], signum: int, rc: int,
        message: str) -> None:
    """TVM's FFI turns a KeyboardInterrupt raised in one of its Python callbacks (Ctrl-C during a build) into a
    RuntimeError: `ctc compile` reported an internal error with a traceback instead of the interruption."""
    import os

    import ctc.driver

    def build_in_a_library(*args: Any, **kwargs: Any) -> None:
        try:
            os.kill(os.getpid(), signum)
            for _ in range(10_000_000):  # the handler runs between bytecodes
                pass
        except KeyboardInterrupt:
            raise RuntimeError("") from None  # what tvm_ffi raises

    monkeypatch.setattr(ctc.driver, "compile_recipe", build_in_a_library)
    (tmp_path / "r.ctc").write_text('model bundled "minilm"\npipeline {\n    dce\n}\n')
    assert main(["compile", str(tmp_path / "r.ctc"), "--out", str(tmp_path / "out"), "-q"]) == rc
    err = capsys.readouterr().err
    assert message in err and "internal error" not in err and "Traceback" not in err, err


# --------------------------------------------------------------------------- a GPU target on a machine without one
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: target cuda finds its arch here")
@pytest.mark.parametrize("recipe_target,flags", [("target cuda\n", []), ("", ["--target", "cuda"])])
def test_cuda_target_without_arch_and_without_a_gpu_fails_before_the_model_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], recipe_target: str, flags: list[str]) -> None:
    """It was an internal error with a traceback, raised only when the build started (after capture,
    calibration, passes and measurement)."""
    (tmp_path / "r.ctc").write_text('model bundled "minilm"\npipeline {\n    dce\n}\n' + recipe_target)
    rc = main(["compile", str(tmp_path / "r.ctc"), "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and "Traceback" not in err, err
    assert 'no GPU is visible here to detect the architecture from; name it, e.g. `target cuda arch="sm_90"`' in err
    assert ("r.ctc:5:1" in err) if recipe_target else ("--target cuda" in err), err
    assert "capture" not in err, "the model was loaded before the target was checked"
    assert not (tmp_path / "out").exists()


def test_fixed_length_of_a_text_model_without_a_tokenizer(tmp_path: Path) -> None:
    """A text model from a .pt2 carries no tokenizer, but its library built for one length is still one length:
    ctc bench and analyze read it (they benched 128 tokens and failed with the library's size error); a model
    whose first input is not [batch, seq] integer ids (a CNN) has none."""
    dest = write_artifact(tmp_path / "art", module=_module(), report={"name": "emb"}, log=lambda _: None,
                          build_targets=[("cpu", lambda d: (d / "model.so").write_bytes(b"lib") and {})])
    art = ctc.load(dest)
    art._runners["cpu"] = _FixedLibrary(art.module, 24)
    assert art.tokenizer_dir is None and art.fixed_seq_len("cpu") == 24 and art.fixed_seq_len() is None
    cnn = Module("cnn")
    x = cnn.add_input("x", TensorType(("batch", 3, 8, 8), "f32"))
    cnn.set_outputs([cnn.create_node("relu", [x]).output], ["y"])
    art_cnn = ctc.load(write_artifact(tmp_path / "cnn", module=cnn, report={"name": "cnn"}, log=lambda _: None))
    assert art_cnn.fixed_seq_len() is None


def test_analyze_profile_refuses_a_simulated_design_before_loading_it(tmp_path: Path) -> None:
    """`ctc analyze --profile --target fpga` on a design built with csim=false failed loading it, with advice to build
    with csim=true, which would only lead to the refusal to time a C simulation: it now gets that refusal first."""
    from ctc.analysis.artifact import analyze_artifact

    with pytest.raises(UsageError, match=r"a C simulation.*modelled latency: 3\.5 ms"):
        analyze_artifact(_fpga_design_artifact(tmp_path, 3.5), "fpga", profile=True)


def test_errors_print_no_terminal_escapes(art_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A pickled object given to `ctc run --input` printed torch's bold escape codes ('\\x1b[1mdo those steps
    ...\\x1b[0m') raw, and a path holding an escape sequence reached the terminal as one (recipe diagnostics
    already escaped them): library styling is dropped and every other control character is shown escaped."""

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("ran",))

    torch.save({"input_ids": Evil()}, tmp_path / "evil.pt")
    assert main(["run", str(art_dir), "--input", str(tmp_path / "evil.pt")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "weights_only=True" in err and "\x1b" not in err and "\\x1b" not in err, err
    odd = tmp_path / "a\x1b[31mred"
    assert main(["run", str(odd), "--input", str(tmp_path / "evil.pt")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "a\\x1b[31mred" in err and "\x1b" not in err, err


def test_a_long_text_gets_ctc_s_error_only(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`ctc run --text` past the model's positions printed transformers' 'Token indices sequence length is longer
    than the specified maximum ... will result in indexing errors' before ctc's own error; in the test suite that
    warning went to a stream an earlier test had closed ('--- Logging error ---'), failing the test above when it
    ran after tests/test_bad_recipes.py. The tokenizer is called quietly: ctc's error is the one said."""
    import logging

    _, dest = _fixed_length_artifact(tmp_path, monkeypatch, 16)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("transformers").addHandler(handler)
    try:
        assert main(["run", str(dest), "--text", "word " * 600, "-q"]) == EXIT_USAGE
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert "the text is 602 tokens" in capsys.readouterr().err
    assert not [m for m in seen if "Token indices sequence length" in m], seen
