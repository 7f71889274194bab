"""The pass registry: every pass is declared the same way, so recipes, `ctc passes` and docs agree."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from ctc.passes.base import Pass, PassOptions, all_passes

PASSES = all_passes()


def test_the_ordinary_passes_are_registered() -> None:
    assert {"dce", "cse", "constant-fold", "canonicalize"} <= set(PASSES)


@pytest.mark.parametrize("key", sorted(PASSES))
def test_pass_declaration(key: str) -> None:
    cls = PASSES[key]
    assert issubclass(cls, Pass)
    # Name == registry key, spelt like recipes spell it.
    assert cls.name == key
    assert re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", key), f"pass name {key!r} is not kebab-case"
    # Names line up: `constant-fold` <-> ctc/passes/constant_fold.py <-> ConstantFoldPass.
    path = Path(inspect.getfile(cls))
    assert path.stem == key.replace("-", "_"), f"{key} lives in {path.name}"
    assert cls.__name__ == "".join(p.capitalize() for p in key.split("-")) + "Pass"
    # A one-line summary for `ctc passes` and the docs.
    assert cls.summary() and not cls.summary().endswith(":"), f"{key} has no summary docstring"
    # ... a whole sentence on the first line (fold-batch-norm's was cut off mid-parenthesis in `ctc passes`)
    assert cls.summary().endswith("."), f"{key}: the docstring's first line is not a whole sentence"
    # Options: a frozen PassOptions dataclass; every field documented, defaults valid.
    opts = cls.Options
    assert issubclass(opts, PassOptions) and dataclasses.is_dataclass(opts)
    assert opts.__dataclass_params__.frozen
    for f in dataclasses.fields(opts):
        assert f.metadata.get("doc"), f"option {key}.{f.name} has no doc (declare it with option())"
    for spec in opts.specs():
        assert spec.doc and spec.type
    cls()  # the defaults validate
    for name in ("requires", "preserves"):
        assert isinstance(getattr(cls, name), tuple)
