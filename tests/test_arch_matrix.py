"""The architecture matrix (``arch_matrix.py``): every row captures and matches eager within 1e-5
relative (fp32) through the interpreter, at a different batch and length than it was captured
with, and builds with TVM for this CPU and matches eager there.  CI runs a representative part
(``Row.in_ci``: one row per kind of construct; ``tvm_in_ci``: the TVM builds), about 90 CPU s on 2
cores; the rest runs under ``-m slow`` (benchmarks/results/arch_matrix.md: CPU time per row).

The docs table (docs/arch-matrix.md) comes from ``python tests/arch_matrix.py``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
from arch_matrix import ROWS, Row, check_row, row, tvm_error

TOL = 1e-5


@cache
def _captured(model_type: str) -> tuple[Any, Any, Any]:
    """(result, captured module, eager model) of a row, once per session."""
    return check_row(row(model_type), tvm=False)


def _params(select: Any, *, tvm: bool = False) -> list[Any]:
    out = []
    for r in ROWS:
        if not select(r):
            continue
        reason = r.xfail or (r.tvm_xfail if tvm else "")
        marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
        out.append(pytest.param(r.model_type, marks=marks, id=r.model_type))
    return out


def test_matrix_is_broad() -> None:
    fams = {f: [r for r in ROWS if r.family == f] for f in ("decoder", "encoder", "encoder-decoder", "vision", "audio")}
    assert len(ROWS) >= 40 and all(len(v) >= 2 for v in fams.values()), {k: len(v) for k, v in fams.items()}
    feats = " ".join(r.features for r in ROWS)
    for f in ("GQA", "parallel", "soft-capping", "sliding window", "q/k norm", "alibi", "mixture of experts",
              "state space"):
        assert f in feats, f
    for t in ("vit", "convnext", "resnet", "mobilenet_v1", "mobilenet_v2", "wav2vec2", "whisper"):
        assert any(r.model_type == t for r in ROWS), t
    assert len({r.model_type for r in ROWS}) == len(ROWS)
    assert all(any(r.in_ci for r in v) for v in fams.values()), "every family has a row in CI"


def _capture_check(model_type: str) -> None:
    res, _, _ = _captured(model_type)
    assert res.captured, res.error
    assert res.rel_err is not None and res.rel_err <= TOL, f"{model_type}: relative error {res.rel_err}"


@pytest.mark.parametrize("model_type", _params(lambda r: r.in_ci))
def test_captures_and_matches_eager(model_type: str) -> None:
    _capture_check(model_type)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", _params(lambda r: not r.in_ci))
def test_every_other_row_captures_and_matches_eager(model_type: str) -> None:
    _capture_check(model_type)


def _tvm_check(r: Row) -> None:
    res, module, model = _captured(r.model_type)
    assert res.captured, res.error
    err = tvm_error(module, model)
    assert err <= TOL, f"{r.model_type}: TVM relative error {err}"


@pytest.mark.parametrize("model_type", _params(lambda r: r.tvm_in_ci, tvm=True))
def test_tvm_build_representative_rows(model_type: str) -> None:
    _tvm_check(row(model_type))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", _params(lambda r: not r.tvm_in_ci, tvm=True))
def test_tvm_build_every_other_row(model_type: str) -> None:
    _tvm_check(row(model_type))
