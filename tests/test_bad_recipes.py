"""The bad-recipe corpus: each tests/bad_recipes/*.ctc gets its located error, exit code != 0, no artifact.

Each file starts with ``# expect: LINE:COL message-substring`` (and optionally ``# exit: N``,
default 2).  Recipes are copied with their fixture files into a temporary directory and
compiled in-process through the CLI.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from ctc.cli import main

CORPUS = Path(__file__).parent / "bad_recipes"
RECIPES = sorted(CORPUS.glob("*.ctc"))


def _expectation(path: Path) -> tuple[int, int, str, int]:
    text = path.read_text()
    m = re.search(r"^# expect: (\d+):(\d+) (.+)$", text, re.M)
    assert m, f"{path.name} has no '# expect: L:C message' header"
    e = re.search(r"^# exit: (\d+)$", text, re.M)
    return int(m.group(1)), int(m.group(2)), m.group(3).strip(), int(e.group(1)) if e else 2


def test_corpus_is_large_enough() -> None:
    assert len(RECIPES) >= 40


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class _Tiny(torch.nn.Module):
    """Two blocks and a head: enough for selectors to match (or not)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([_Block(), _Block()])
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus plus its fixtures: a tiny exported program, a broken one, a model dir with a bad config."""
    d = tmp_path_factory.mktemp("bad") / "recipes"
    shutil.copytree(CORPUS, d)
    torch.manual_seed(0)
    torch.export.save(torch.export.export(_Tiny().eval(), (torch.randn(1, 8),)), str(d / "tiny.pt2"))
    (d / "broken.pt2").write_bytes(b"not a zip archive")
    (d / "badmodel").mkdir()
    (d / "badmodel" / "config.json").write_text('{"model_type": "no-such-architecture"}')
    return d


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_bad_recipe(recipe: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line, col, needle, code = _expectation(recipe)
    path = workdir / recipe.name
    out_root = workdir.parent / "out"
    out = out_root / recipe.stem
    rc = main(["compile", str(path), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == code, err
    located = [ln for ln in err.splitlines() if ln.startswith(f"{path}:{line}:{col}: error: ")]
    assert located, f"no error at {line}:{col} in:\n{err}"
    assert any(needle in ln for ln in located), f"{needle!r} not in:\n{err}"
    # the source line and a caret under the column
    lines = err.splitlines()
    i = lines.index(located[0])
    src_line = path.read_text().splitlines()[line - 1] if line <= len(path.read_text().splitlines()) else ""
    if src_line:
        assert lines[i + 1].endswith(src_line.expandtabs(1)), err
        caret = lines[i + 2]
        gutter = lines[i + 1].index("| ") + 2
        assert caret.index("^") - gutter == col - 1, err
    assert not out.exists(), "an artifact directory was left behind"
    leftovers = list(out_root.glob(".*")) if out_root.exists() else []
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_text_data_on_a_pt2_model_hints_at_what_works(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A .pt2 MLP with `quantize a_bits=8` was told 'add e.g. `calibrate wiki ...`', which then failed with 'this
    model has no tokenizer' and no hint: recipe data is text, so both now point at calibrating from Python (and an
    evaluate line at dropping it: targets are then checked on synthetic inputs)."""
    quantize = "pipeline {\n    quantize w_bits=8 a_bits=8\n}\n"
    py = "PassManager(steps, calibration="
    cases = [(f'model pt2 "tiny.pt2"\n{quantize}', py),
             (f'model pt2 "tiny.pt2"\ncalibrate wiki samples=2 seq_len=16\n{quantize}', py),
             ('model pt2 "tiny.pt2"\nevaluate lee samples=2\ntarget fpga\n', "hint: remove this line: without data")]
    for i, (text, hint) in enumerate(cases):
        path = workdir / f"pt2_text_{i}.ctc"
        path.write_text(text)
        assert main(["compile", str(path), "--out", str(workdir.parent / "out" / path.stem), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert hint in err and "calibrate wiki samples=32" not in err, err


def test_a_target_size_for_a_dim_the_model_lacks_is_an_error(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`target fpga seq_len=64` (or `target cpu batch=2`) on a model captured with fixed shapes (tiny.pt2: x [1, 8])
    was accepted and ignored: the design was built for the captured shapes. It is now an error at the option."""
    path = workdir / "size_without_dim.ctc"
    path.write_text('model pt2 "tiny.pt2"\ntarget fpga seq_len=64 csim=false\ntarget cpu batch=2\n')
    assert main(["compile", str(path), "--out", str(workdir.parent / "out" / path.stem), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2:13: error: target fpga: seq_len=64, but the model's inputs have no sequence dim" in err, err
    assert f"{path}:3:12: error: target cpu: batch=2, but the model's inputs have no batch dim" in err, err


def test_a_capture_error_listing_ops_prints_as_one_line(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`model pt2` of a program with an FFT: the located error printed the capture's op list with its line break
    escaped ('nothing was captured:\\x0a  - aten._fft_r2c.default ...'), as target errors once did; every
    diagnostic now joins a multi-line message into one line."""

    class Fft(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.fft.rfft(x).abs()

    torch.export.save(torch.export.export(Fft(), (torch.randn(2, 8),)), str(workdir / "fft.pt2"))
    path = workdir / "fft_model.ctc"
    path.write_text('model pt2 "fft.pt2"\n')
    assert main(["compile", str(path), "--out", str(workdir.parent / "out" / path.stem), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "nothing was captured: aten._fft_r2c.default (1x)" in err and "\\x0a" not in err, err
