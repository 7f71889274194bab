"""Every fenced code block of docs/*.md and README.md is run, or skipped with its reason shown; generated pages are
up to date.

A block's info string says what it is (docs/guide.md, "About the code blocks"): ``sh`` lines starting with
``ctc`` run through the command line in-process, ``ctc`` blocks check as recipes, ``python`` blocks run (one
namespace per page), ``text`` is output or a diagram, and ``LANG skip: REASON`` is skipped with REASON.
Blocks run in page order in one scratch folder per page, so a ``ctc file=NAME`` block can feed a later
``sh`` block.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ctc.cli import EXIT_OK, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)
LANGS = {"sh", "ctc", "python", "text"}
STATEMENTS = ("model", "calibrate", "evaluate", "pipeline", "target", "check", "emit", "}", "#")
# blocks another test runs as part of a larger fixture (a pass that must be registered first)
ELSEWHERE = {"docs/writing-a-pass.md": "run by tests/test_writing_a_pass_doc.py (registers its example pass)"}


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    info: str
    body: str

    @property
    def skip(self) -> str | None:
        m = re.match(r"skip:\s*(.+)", self.info)
        return m.group(1).strip() if m else None


def _blocks() -> list[Block]:
    out = []
    for p in PAGES:
        text = p.read_text()
        for m in FENCE.finditer(text):
            lang, _, info = m.group(1).strip().partition(" ")
            out.append(Block(str(p.relative_to(ROOT)), text[:m.start()].count("\n") + 1, lang, info.strip(),
                             m.group(2)))
    return out


BLOCKS = _blocks()
_SCRATCH: dict[str, Path] = {}
_NAMESPACES: dict[str, dict[str, Any]] = {}


@pytest.fixture
def scratch(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    page = request.node.callspec.params["block"].page
    if page not in _SCRATCH:
        _SCRATCH[page] = tmp_path_factory.mktemp(Path(page).stem)
    return _SCRATCH[page]


@contextlib.contextmanager
def _cwd(path: Path) -> Any:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _commands(body: str) -> list[str]:
    """Shell lines of a block (backslash continuations joined, comments and blank lines dropped)."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [c for c in (shlex.split(line, comments=True) for line in joined.splitlines()) if c]


def _recipes(body: str) -> list[str]:
    """A recipe block as checkable recipes: a whole recipe as it is; a fragment (pipeline steps, statements without
    a model) completed with a small recipe, one recipe per statement line when a kind repeats (alternatives)."""
    lines = [ln for ln in body.splitlines() if ln.strip()]
    if any(ln.lstrip().startswith("model ") for ln in lines):
        return [body]
    statements = [ln for ln in lines if ln.lstrip().startswith(STATEMENTS)]
    steps = [ln for ln in lines if not ln.lstrip().startswith(STATEMENTS)]
    kinds = [ln.split()[0] for ln in statements if not ln.lstrip().startswith(("#", "}"))]
    groups = [statements] if len(kinds) == len(set(kinds)) else [[ln] for ln in statements]
    out = []
    for group in groups:
        given = {ln.split()[0] for ln in group}
        text = 'model bundled "minilm"\n'
        text += "" if "calibrate" in given else "calibrate wiki samples=2 seq_len=16\n"
        text += "" if "evaluate" in given else "evaluate lee samples=2 seq_len=16\n"
        if steps:
            text += "pipeline {\n" + "\n".join(steps) + "\n}\n"
        out.append(text + "\n".join(group) + "\n")
    return out


def _touch_named_files(recipe: str, where: Path) -> None:
    """Files and folders a recipe names (data files, model directories) exist, empty, in the scratch folder."""
    for m in re.finditer(r'^\s*(calibrate|evaluate)\s+(text|jsonl)\s+"([^"]+)"', recipe, re.M):
        f = where / m.group(3)
        if not f.exists():
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("Some text for the recipe check.\n" * 50)
    for m in re.finditer(r'^\s*model\s+(hf|pt2)\s+"([^"]+)"', recipe, re.M):
        f = where / m.group(2)
        if m.group(1) == "hf":
            f.mkdir(parents=True, exist_ok=True)
            (f / "config.json").touch()
        elif not f.exists():
            f.touch()


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.page}:{b.line}" for b in BLOCKS])
def test_code_block(block: Block, scratch: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = f"{block.page}:{block.line}"
    assert block.lang in LANGS, (f"{where}: a code block must say what it is (```sh, ```ctc, ```python or ```text; "
                                 f"```LANG skip: REASON when it cannot run in tests), not {block.lang!r}")
    if block.skip:
        pytest.skip(f"{where}: {block.skip}")
    if block.lang == "text":
        return
    if block.page in ELSEWHERE and block.lang in ("python", "ctc"):
        pytest.skip(f"{where}: {ELSEWHERE[block.page]}")
    with _cwd(scratch):
        if block.lang == "sh":
            for argv in _commands(block.body):
                assert argv[0] == "ctc", (f"{where}: `{' '.join(argv)}` is not a ctc command the test can run: "
                                          "mark the block ```sh skip: REASON")
                rc = main(argv[1:])
                out = capsys.readouterr()
                assert rc == EXIT_OK, f"{where}: `{' '.join(argv)}` exited {rc}\n{out.err[-2000:]}"
        elif block.lang == "ctc":
            name = re.match(r"file=(\S+)", block.info)
            for k, recipe in enumerate(_recipes(block.body)):
                path = scratch / (name.group(1) if name and k == 0 else f"block{block.line}-{k}.ctc")
                path.write_text(recipe)
                _touch_named_files(recipe, scratch)
                rc = main(["compile", str(path), "--check-only", "--out", str(scratch / "out-check")])
                out = capsys.readouterr()
                assert rc == EXIT_OK, (f"{where}: the recipe does not check:\n{out.err[-2000:]}\n"
                                       f"--- as checked:\n{recipe}")
        else:
            ns = _NAMESPACES.setdefault(block.page, {"__name__": f"docs_{Path(block.page).stem}"})
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(block.body, where, "exec"), ns)  # noqa: S102 - the docs' own example code


def test_every_page_has_its_blocks_found() -> None:
    """The fence pattern sees every block (an odd number of fences means a block was missed)."""
    for p in PAGES:
        fences = [ln for ln in p.read_text().splitlines() if ln.startswith("```")]
        assert len(fences) % 2 == 0, f"{p}: unbalanced code fences"
        assert len(fences) // 2 == sum(1 for b in BLOCKS if b.page == str(p.relative_to(ROOT))), p


def test_recipe_reference_is_up_to_date() -> None:
    from ctc.reference import recipe_reference

    assert (ROOT / "docs" / "recipe-reference.md").read_text() == recipe_reference(), \
        "docs/recipe-reference.md is stale: regenerate it with `ctc reference > docs/recipe-reference.md`"
