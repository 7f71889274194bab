"""Reading recipes: BOM, pipes, line numbers that match the printed source, safe and short messages.

(Syntax and semantic errors with their exact locations are the bad-recipe corpus, tests/bad_recipes/;
this file holds what a static .ctc file cannot: pipes, byte-order marks, odd line separators,
terminal escapes and very large inputs.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctc.cli import EXIT_OK, EXIT_USAGE, main
from ctc.dsl.ast import Span
from ctc.dsl.diagnostics import MAX_SHOWN, Diagnostic, attach_source, elide, source_lines
from ctc.dsl.parser import parse, parse_file

ROOT = Path(__file__).resolve().parents[1]
GOOD = 'model bundled "minilm"\npipeline {\n    dce\n}\n'


def _compile(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["compile", *args])
    return rc, capsys.readouterr().err


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "bom.ctc"
    f.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    recipe = parse_file(f)
    assert recipe.model is not None and recipe.model.ref == "minilm" and recipe.model.span.col == 1


@pytest.mark.parametrize("how", ["stdin", "fd"])
def test_recipe_from_a_pipe(how: str, tmp_path: Path) -> None:
    """`ctc compile /dev/stdin` and `ctc compile <(...)`: the recipe is read once; relative paths start at
    the working directory."""
    (tmp_path / "notes.txt").write_text("some text " * 100)
    text = GOOD.replace("pipeline", 'evaluate text "notes.txt" samples=1 seq_len=16\npipeline')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys; from ctc.cli import main; sys.exit(main(sys.argv[1:]))"
    if how == "stdin":
        r = subprocess.run([sys.executable, "-c", code, "compile", "/dev/stdin", "--check-only", "--out", "o"],
                           input=text, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    else:
        rfd, wfd = os.pipe()
        os.write(wfd, text.encode())
        os.close(wfd)
        try:
            r = subprocess.run([sys.executable, "-c", code, "compile", f"/dev/fd/{rfd}", "--check-only", "--out", "o"],
                               capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120, pass_fds=(rfd,))
        finally:
            os.close(rfd)
    assert r.returncode == EXIT_OK, r.stderr
    assert ": ok" in r.stderr


@pytest.mark.parametrize("sep", ["\f", "\x85", "\u2028", "\u2029", "\v", "\x1c", "\r"])
def test_line_numbers_agree_with_the_printed_line(sep: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Characters Python calls line breaks but the recipe grammar does not (form feed, U+0085, U+2028...)
    earlier in the file must not shift the printed source line."""
    f = tmp_path / "r.ctc"
    f.write_text(f'model bundled "minilm"\n# a{sep}b\npipeline {{\n    dcee\n}}\n', newline="")
    rc, err = _compile([str(f), "--check-only"], capsys)
    assert rc == EXIT_USAGE
    lines = err.splitlines()
    head = next(i for i, ln in enumerate(lines) if "unknown pass 'dcee'" in ln)
    assert lines[head].startswith(f"{f}:4:5: error:") and lines[head + 1] == "   4 |     dcee"
    assert lines[head + 2] == "     |     ^^^^"


def test_crlf_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "r.ctc"
    f.write_bytes(GOOD.replace("dce", "dcee").replace("\n", "\r\n").encode())
    rc, err = _compile([str(f), "--check-only"], capsys)
    assert rc == EXIT_USAGE and "   3 |     dcee\n" in err and "\r" not in err


def test_control_characters_are_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "r.ctc"
    f.write_text('model bundled "mini\x1b[31mlm\x07"\npipeline {\n    dce\n}\n')
    rc, err = _compile([str(f), "--check-only"], capsys)
    assert rc == EXIT_USAGE and "\x1b" not in err and "\x07" not in err
    assert err.count("\\x1b[31mlm\\x07") == 2, err  # in the message and in the source line
    f.write_text('model bundled "minilm"\npipeline {\n    dce\u202e\n}\n')  # a bidi override
    rc, err = _compile([str(f), "--check-only"], capsys)
    assert rc == EXIT_USAGE and "\u202e" not in err and "unexpected character '\\u202e'" in err


def test_long_values_are_elided(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 1 MB string gave 3 MB of error output."""
    f = tmp_path / "r.ctc"
    f.write_text('model bundled "minilm"\ncalibrate wiki samples="' + "a" * 1_000_000 + '"\n' + GOOD.split("\n", 1)[1])
    rc, err = _compile([str(f), "--check-only"], capsys)
    assert rc == EXIT_USAGE and "expected an int" in err and len(err) < 2000
    assert "more characters" in err


def test_many_errors_are_counted_not_all_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "r.ctc"
    f.write_text('model bundled "minilm"\npipeline {\n    dce' + " x=1" * 2000 + "\n}\n")
    rc, err = _compile([str(f), "--check-only"], capsys)
    assert rc == EXIT_USAGE
    assert err.count("error: option 'x' given twice") == MAX_SHOWN
    assert f"... and {1999 - MAX_SHOWN} more" in err and len(err) < 20_000


def test_recipe_path_that_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _compile([str(tmp_path), "--check-only"], capsys)
    assert rc == EXIT_USAGE and f"{tmp_path}: error: {tmp_path} is a directory, not a recipe file" in err
    assert "Traceback" not in err


def test_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "r.ctc"
    f.write_bytes(b'model bundled "min\xffilm"\n')
    rc, err = _compile([str(f), "--check-only"], capsys)
    assert rc == EXIT_USAGE and "not UTF-8 text" in err and "byte 18" in err


def test_a_binary_file_given_as_the_recipe_is_named_as_such(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ctc show model.pt2` / `ctc compile model.pt2` said 'recipe is not UTF-8 text' with the hint 'convert it with
    iconv -t utf-8', which no model file survives; a UTF-16 recipe keeps that hint."""
    f = tmp_path / "model.pt2"
    f.write_bytes(b"PK\x03\x04\x00\x00\x08\x00\xff\xfe archive")
    rc, err = _compile([str(f), "--check-only"], capsys)
    assert rc == EXIT_USAGE and "model.pt2 is a binary file, not a recipe" in err and "iconv" not in err, err
    f.write_bytes('model bundled "minilm"\n'.encode("utf-16"))
    rc, err = _compile([str(f), "--check-only"], capsys)
    assert rc == EXIT_USAGE and "not UTF-8 text" in err and "iconv -t utf-8" in err, err


def test_source_lines_and_elide() -> None:
    assert source_lines("a\r\nb\fc\nd") == ["a", "b\fc", "d"]
    assert elide("x " + "y" * 300 + " z", limit=20) == "x " + "y" * 10 + "...(280 more characters)..." + "y" * 10 + " z"
    (d,) = attach_source([Diagnostic("m", Span("f", 2, 3, 2, 4))], "one\n\tab\x00c\n")
    assert d.format().splitlines()[1:] == ["   2 |  ab\\x00c", "     |   ^"]


def test_parse_error_positions_match_the_text_after_a_bom() -> None:
    recipe = parse("\ufeff" + GOOD)
    assert recipe.pipeline[0].span.line == 3 and recipe.pipeline[0].span.col == 5
