"""`emit gguf`: a Llama loaded from a GGUF file, compressed, written back as GGUF; gguf's reader sees the weights the
module holds (the file's own Q4_0/Q4_1/Q8_0 codes byte for byte, RTN 4-bit groups of 32 as Q4_0, other schemes
as F32) and transformers runs the written file like the module.

The model is a tiny random Llama written here as GGUF with a byte-level BPE tokenizer (so real text tokenizes);
its block linears cycle through Q4_1, Q4_0 and Q8_0."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from ctc.cli import EXIT_OK, main  # noqa: E402

D, FF, HEADS, KV, LAYERS = 64, 96, 2, 1, 2
KINDS = ("Q4_1", "Q4_0", "Q8_0")


def _byte_vocab() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary (GPT-2's byte-to-character map, a few merges) and its merges: real text
    tokenizes, and the file stays small (SmolLM2's 49,152-token vocabulary takes seconds to copy and parse)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = [], 0
    for b in range(256):
        chars.append(chr(b) if b in keep else chr(256 + extra))
        extra += b not in keep
    merges = ["Ġ t", "h e", "Ġ a", "i n", "Ġt he"]
    return chars + ["Ġt", "he", "Ġa", "in", "Ġthe", "<|endoftext|>"], merges


def _tiny_gguf(folder: Path) -> Path:
    """``folder``/tiny.gguf (+ its config.json, which recipes check for): random weights, a byte-level tokenizer."""
    from transformers import AutoConfig

    tokens, merges = _byte_vocab()
    folder.mkdir(parents=True)
    w = gguf.GGUFWriter(str(folder / "tiny.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_add_bos_token(False)
    w.add_vocab_size(len(tokens))
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(D // HEADS)
    rng = np.random.default_rng(0)

    def add(name: str, shape: tuple[int, ...], kind: str | None, scale: float) -> None:
        x = (rng.standard_normal(shape) * scale).astype(np.float32)
        if kind is None:
            w.add_tensor(name, x)
            return
        qt = getattr(gguf.GGMLQuantizationType, kind)
        raw = gguf.quants.quantize(x, qt)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qt)

    add("token_embd.weight", (len(tokens), D), "Q8_0", 0.5)
    add("output_norm.weight", (D,), None, 1.0)
    shapes = {"attn_q": (D, D), "attn_k": (KV * D // HEADS, D), "attn_v": (KV * D // HEADS, D),
              "attn_output": (D, D), "ffn_gate": (FF, D), "ffn_up": (FF, D), "ffn_down": (D, FF)}
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (D,), None, 1.0)
        add(f"blk.{i}.ffn_norm.weight", (D,), None, 1.0)
        for j, (name, shape) in enumerate(shapes.items()):
            add(f"blk.{i}.{name}.weight", shape, KINDS[(i + j) % 3], 0.2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    AutoConfig.from_pretrained(str(folder), gguf_file="tiny.gguf", local_files_only=True).save_pretrained(folder)
    return folder / "tiny.gguf"


RECIPE = """\
model hf "tiny" gguf="tiny.gguf"
calibrate wiki samples=1 seq_len=16
evaluate wiki samples=1 seq_len=32
pipeline {
    gguf-weights on blocks[0]                                                          # the file's own codes
    quantize w_bits=4 a_bits=16 w_granularity=group group_size=32 on blocks[1], "*.mlp.*"   # -> Q4_0
    quantize w_bits=8 a_bits=16 on blocks[1], "*.self_attn.*"                          # per channel: no GGUF type
}
emit gguf
"""


def test_gguf_round_trip(tmp_path: Path) -> None:
    src = _tiny_gguf(tmp_path / "tiny")
    (tmp_path / "r.ctc").write_text(RECIPE)
    assert main(["compile", str(tmp_path / "r.ctc"), "--out", str(tmp_path / "art"), "--quiet"]) == EXIT_OK
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    (e,) = report["exports"]
    # block 0 keeps the file's types, block 1's MLP is Q4_0, its attention F32 (the head stays tied to token_embd)
    assert e["linears"] == {"Q4_1": 3, "Q4_0": 2 + 3, "Q8_0": 2, "F32": 4}, e["linears"]
    assert any("no GGUF block type: written as F32" in n for n in e["notes"])
    assert e["weights_read_back"]["max_relative_change"] < 1e-3
    assert e["load_back"]["outputs"][0]["relative"] <= 5e-3 and e["load_back"]["outputs"][0]["cosine"] > 0.9999
    # the file's own blocks are written byte for byte (q/k rows back in llama.cpp's order)
    before = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    after = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "art" / "exports" / "gguf" / "model.gguf")).tensors}
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight", "token_embd.weight"):
        assert after[name].tensor_type == before[name].tensor_type
        assert np.array_equal(np.asarray(after[name].data), np.asarray(before[name].data)), name
    assert after["blk.1.ffn_up.weight"].tensor_type.name == "Q4_0"
    assert after["blk.1.attn_q.weight"].tensor_type.name == "F32"


def test_models_not_loaded_from_gguf_are_refused(tmp_path: Path) -> None:
    from tiny_transformers import tiny_transformer

    from ctc.exports import ExportError, export_config
    from ctc.exports.gguf import write
    from ctc.exports.source import ExportSource

    m = tiny_transformer("llama", layers=1, batch=1, seq=4)
    with pytest.raises(ExportError, match="writes models loaded from a GGUF file"):
        write(ExportSource(m, "tiny", {}), tmp_path, export_config("gguf", {}))
    m.meta["gguf"] = str(tmp_path / "gone.gguf")
    with pytest.raises(ExportError, match="is gone"):
        write(ExportSource(m, "tiny", {}), tmp_path, export_config("gguf", {}))


@pytest.mark.parametrize("step", ["quantize w_bits=8 a_bits=8 w_granularity=group group_size=32",
                                  "gguf-weights a_bits=8"])
def test_quantized_activations_are_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   step: str) -> None:
    """A GGUF file holds weights only (llama.cpp picks its own activation format at run time), so a module that
    quantizes its activations is refused naming that, not after a load-back mismatch that says nothing of why."""
    from ctc.cli import EXIT_USAGE

    _tiny_gguf(tmp_path / "tiny")
    (tmp_path / "r.ctc").write_text(RECIPE.split("pipeline")[0] + "pipeline {\n    " + step + "\n}\nemit gguf\n")
    assert main(["compile", str(tmp_path / "r.ctc"), "--out", str(tmp_path / "art"), "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "quantize their activations" in err and "a_bits=16" in err, err
    assert "does not reproduce" not in err and not (tmp_path / "art").exists()


def test_artifact_of_a_gguf_only_directory_keeps_its_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`model hf DIR gguf=FILE` with no tokenizer files next to the GGUF (its tokenizer lives in the file): the
    artifact's tokenizer/ must still load, so `ctc export` (real text for its check) works on it afterwards, from
    any directory (the artifact records where the GGUF is as an absolute path)."""
    from ctc.artifact import load as load_artifact

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _tiny_gguf(tmp_path / "tiny")
    (tmp_path / "r.ctc").write_text(RECIPE.split("pipeline")[0])
    monkeypatch.chdir(tmp_path)  # a recipe named by a relative path: the GGUF's path is relative too
    assert main(["compile", "r.ctc", "--out", "art", "--quiet"]) == EXIT_OK
    tok = load_artifact(tmp_path / "art").tokenizer()
    assert tok("the cat")["input_ids"]
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the export runs from another directory
    assert main(["export", str(tmp_path / "art"), "--to", "gguf", "--quiet"]) == EXIT_OK
    assert (tmp_path / "art-gguf" / "model.gguf").is_file()
