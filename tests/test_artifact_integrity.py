"""Corrupted artifacts: every damage is an ArtifactError naming the file (exit 2 from the CLI, no traceback),
never a run that silently gives different numbers.

Two kinds of damage: files changed after the write (the manifest's hashes catch them), and files
changed *with* a re-computed manifest (a buggy tool, or someone who knows the format), which the
IR parser, the verifier and the loaders must still turn into clear errors.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ctc
from ctc.artifact import read_report, write_artifact
from ctc.cli import EXIT_OK, EXIT_USAGE, main
from ctc.errors import ArtifactError
from ctc.ir.graph import Module
from ctc.ir.types import TensorType
from ctc.manifest import MANIFEST_FILE, write_manifest


def _module() -> Module:
    g = torch.Generator().manual_seed(0)
    m = Module("tiny")
    x = m.add_input("x", TensorType((2, 4), "f32"))
    m.add_param("w", torch.randn(4, 4, generator=g))
    m.add_param("b", torch.randn(4, generator=g))
    y = m.create_node("linear", [x, m.param("w"), m.param("b")], {}).output
    z = m.create_node("relu", [y], {}).output
    m.set_outputs([z, y], ["relu", "linear"])
    m.meta["task"] = "test"
    return m


def _library(d: Path) -> dict:
    (d / "model.so").write_bytes(b"\x7fELF not loaded in these tests")
    return {"library": "model.so"}


@pytest.fixture()
def art(tmp_path: Path) -> Path:
    return write_artifact(tmp_path / "a", module=_module(), report={"name": "a", "passed": True},
                          recipe_text='model pt2 "x.pt2"\n', build_targets=[("cpu", _library)])


@pytest.fixture()
def inputs(tmp_path: Path) -> Path:
    f = tmp_path / "in.safetensors"
    save_file({"x": torch.ones(2, 4)}, str(f))
    return f


def _rehash(d: Path) -> None:
    (d / MANIFEST_FILE).unlink()
    write_manifest(d, "test")


# ----------------------------------------------------------------------------- changed after the write
def _truncate(d: Path) -> None:
    p = d / "params.safetensors"
    p.write_bytes(p.read_bytes()[:-7])


def _flip_bit(d: Path) -> None:
    p = d / "params.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x10
    p.write_bytes(bytes(data))


def _nan_weights(d: Path) -> None:
    p = d / "params.safetensors"
    t = load_file(str(p))
    t["w"][0, 0] = float("nan")
    save_file(t, str(p), metadata={"format": "ctc"})


def _changed_attribute(d: Path) -> None:
    p = d / "ir.txt"
    p.write_text(p.read_text().replace("relu", "gelu", 1))


def _swapped_outputs(d: Path) -> None:
    p = d / "ir.txt"
    text = p.read_text()
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("return"))
    p.write_text(text.replace(line, line.replace("relu", "TMP").replace("linear", "relu").replace("TMP", "linear")))


def _edited_report(d: Path) -> None:
    p = d / "report.json"  # same size: only the digest can tell
    p.write_text(p.read_text().replace('"passed": true', '"passed": null'))


def _extra_library_file(d: Path) -> None:
    (d / "targets" / "cpu" / "evil.so").write_bytes(b"planted")


def _deleted_file(d: Path) -> None:
    (d / "ir.txt").unlink()


def test_edited_report_is_refused_by_show(art: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _edited_report(art)
    assert main(["show", str(art)]) == EXIT_USAGE
    assert "report.json: does not match its SHA-256" in capsys.readouterr().err


def test_show_reads_only_the_report(art: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ctc show` prints the report without reading parameters: damaged params do not stop it."""
    _flip_bit(art)
    assert main(["show", str(art)]) == EXIT_OK
    capsys.readouterr()
    assert main(["show", str(art), "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["name"] == "a"
    assert main(["show", str(art), "--ir"]) == EXIT_USAGE  # the IR comes with its parameters


def test_planted_file_in_a_target_is_refused(art: Path) -> None:
    _extra_library_file(art)
    loaded = ctc.load(art)  # the module itself is intact
    with pytest.raises(ArtifactError, match=r"evil.so: is not listed in the artifact's manifest"):
        loaded.runner("cpu")


def test_symlinks_inside_are_refused_and_not_followed(art: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-LINE\n")
    report = art / "report.json"
    report.unlink()
    report.symlink_to(secret)
    assert main(["show", str(art)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "report.json: is a symbolic link" in err and "TOP-SECRET" not in err
    with pytest.raises(ArtifactError, match="symbolic link"):
        ctc.load(art)


# ----------------------------------------------------------------------------- changed with a re-computed manifest
def _bad_ir_syntax(d: Path) -> None:
    (d / "ir.txt").write_text("module tiny {\n  this is not ir\n}\n")


def _deep_ir(d: Path) -> None:
    p = d / "ir.txt"
    text = p.read_text()
    assert 'meta {task = "test"}' in text
    p.write_text(text.replace('meta {task = "test"}', "meta {task = " + "[" * 100_000 + "]" * 100_000 + "}"))


def _long_ir_line(d: Path) -> None:
    p = d / "ir.txt"  # a 200 kB line with an error in its middle: the message shows a window of it
    p.write_text(p.read_text().replace('meta {task = "test"}', 'meta {task = "' + "x" * 100_000 + '" ]'
                                       + "y" * 100_000 + "}"))


def _verify_fails(d: Path) -> None:
    p = d / "ir.txt"  # the relu result declared with the wrong shape: the verifier's type check
    text = p.read_text()
    assert "relu(%linear) : f32[2, 4]" in text
    p.write_text(text.replace("relu(%linear) : f32[2, 4]", "relu(%linear) : f32[2, 5]"))


def _param_missing(d: Path) -> None:
    p = d / "params.safetensors"
    t = load_file(str(p))
    del t["b"]
    save_file(t, str(p))


def _param_wrong_shape(d: Path) -> None:
    p = d / "params.safetensors"
    t = load_file(str(p))
    t["w"] = torch.zeros(3, 3)
    save_file(t, str(p))


def _params_garbage(d: Path) -> None:
    (d / "params.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")


def _report_not_json(d: Path) -> None:
    (d / "report.json").write_text("{not json")


def _report_a_list(d: Path) -> None:
    (d / "report.json").write_text("[1, 2]")


def _report_deep(d: Path) -> None:
    (d / "report.json").write_text("[" * 100_000 + "]" * 100_000)


# what was done to the artifact, whether the manifest was re-computed after it, the file blamed, the reason
DAMAGE: dict[str, tuple[Callable[[Path], None], bool, str, str]] = {
    "truncated params": (_truncate, False, "params.safetensors", "the manifest says"),
    "bit flip": (_flip_bit, False, "params.safetensors", "does not match its SHA-256"),
    "NaN weight": (_nan_weights, False, "params.safetensors", "does not match its SHA-256"),
    "changed attribute": (_changed_attribute, False, "ir.txt", "manifest"),
    "swapped outputs": (_swapped_outputs, False, "ir.txt", "does not match its SHA-256"),
    "deleted file": (_deleted_file, False, "ir.txt", "is missing"),
    "IR syntax": (_bad_ir_syntax, True, "ir.txt", "does not parse as ctc IR"),
    "IR nested deep": (_deep_ir, True, "ir.txt", "nests too deeply"),
    "IR long line": (_long_ir_line, True, "ir.txt", "does not parse as ctc IR"),
    "IR fails verification": (_verify_fails, True, "ir.txt", "is recorded as f32[2, 5] but infers as f32[2, 4]"),
    "param missing": (_param_missing, True, "ir.txt", "missing from the params"),
    "param wrong shape": (_param_wrong_shape, True, "ir.txt", "the tensor given is f32[3, 3]"),
    "params not safetensors": (_params_garbage, True, "params.safetensors", "is not a readable safetensors file"),
    "report not JSON": (_report_not_json, True, "report.json", "is not valid JSON"),
    "report a list": (_report_a_list, True, "report.json", "not the report object"),
    "report nested deep": (_report_deep, True, "report.json", "is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_artifacts_are_refused(case: str, art: Path, inputs: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    """ctc.load raises an ArtifactError naming the file and the reason; ctc run exits 2 with a short message."""
    damage, rehash, file, reason = DAMAGE[case]
    damage(art)
    if rehash:
        _rehash(art)
    with pytest.raises(ArtifactError) as e:
        ctc.load(art)
    assert e.value.path == str(art / file) and reason in e.value.reason, e.value
    assert main(["run", str(art), "--input", str(inputs)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"ctc run: error: {art / file}: " in err and "Traceback" not in err and len(err) < 3000


# ----------------------------------------------------------------------------- the manifest itself
@pytest.mark.parametrize(("content", "reason"), [
    (None, "is missing"),
    ("not json", "is not valid JSON"),
    ('{"format": "zip"}', "is not a ctc artifact manifest"),
    ('{"format": "ctc-artifact", "version": 99, "files": {}}', "manifest version 99"),
    ('{"format": "ctc-artifact", "version": 1, "files": {"../../etc/passwd": {"size": 1, "sha256": "'
     + "0" * 64 + '"}}}', "malformed entry"),
    ('{"format": "ctc-artifact", "version": 1, "files": []}', 'no "files" table'),
])
def test_bad_manifests(content: str | None, reason: str, art: Path) -> None:
    (art / MANIFEST_FILE).unlink()
    if content is not None:
        (art / MANIFEST_FILE).write_text(content)
    with pytest.raises(ArtifactError) as e:
        read_report(art)
    assert e.value.path == str(art / MANIFEST_FILE) and reason in e.value.reason


def test_an_intact_artifact_runs_the_same(art: Path, inputs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loaded = ctc.load(art)
    x = torch.ones(2, 4)
    ref = torch.nn.functional.linear(x, _module().params["w"], _module().params["b"])
    torch.testing.assert_close(loaded.run({"x": x})[1], ref)
    assert main(["run", str(art), "--input", str(inputs)]) == EXIT_OK
    assert "relu: (2, 4) float32" in capsys.readouterr().out
    assert os.access(art / "params.safetensors", os.R_OK)
