"""docs/writing-a-pass.md stays true: every Python block runs, the example pass registers, its tests pass.

The guide's first Python block is the example pass (a complete ``ctc/passes/mul_one.py``), the
``python test`` block its test file; the other Python blocks are API snippets executed in order
in one namespace; the ``ctc`` block must check as a recipe while the pass is registered.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from ctc.passes import base

DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-a-pass.md"
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[str, str, str]]:
    return [(lang, info.strip(), body) for lang, info, body in BLOCK.findall(DOC.read_text())]


@pytest.fixture
def example_pass():
    """Execute the example pass as module ``ctc.passes.mul_one`` and unregister it afterwards."""
    before = dict(base.all_passes())  # load the registry first: restoring must not empty it
    src = next(body for lang, info, body in _blocks() if lang == "python" and "register_pass" in body)
    mod = types.ModuleType("ctc.passes.mul_one")
    mod.__file__ = "ctc/passes/mul_one.py"
    sys.modules[mod.__name__] = mod
    try:
        exec(compile(src, "docs/writing-a-pass.md:mul_one.py", "exec"), mod.__dict__)
        yield mod
    finally:
        sys.modules.pop(mod.__name__, None)
        base._PASSES.clear()
        base._PASSES.update(before)


def test_example_pass_is_short_and_registered(example_pass):
    src = next(body for lang, info, body in _blocks() if lang == "python" and "register_pass" in body)
    assert len(src.strip().splitlines()) < 40
    assert base.get_pass("mul-one") is example_pass.MulOnePass


def test_example_pass_tests_pass(example_pass):
    src = next(body for lang, info, body in _blocks() if lang == "python" and info == "test")
    ns: dict = {"__name__": "test_mul_one"}
    exec(compile(src, "docs/writing-a-pass.md:test_mul_one.py", "exec"), ns)
    tests = [f for k, f in ns.items() if k.startswith("test_") and callable(f)]
    assert len(tests) >= 4
    for t in tests:
        t()


def test_recipe_block_checks(example_pass):
    from ctc.dsl import check_recipe, parse

    src = next(body for lang, info, body in _blocks() if lang == "ctc")
    diags = [d for d in check_recipe(parse(src, "docs/writing-a-pass.md")) if d.severity == "error"]
    assert not diags, [str(d) for d in diags]


def test_api_snippets_run():
    ns: dict = {"__name__": "writing_a_pass_snippets"}
    snippets = [body for lang, info, body in _blocks()
                if lang == "python" and not info and "register_pass" not in body]
    assert len(snippets) >= 3
    for i, src in enumerate(snippets):
        exec(compile(src, f"docs/writing-a-pass.md:snippet{i}", "exec"), ns)
