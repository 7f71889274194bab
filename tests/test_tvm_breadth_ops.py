"""The TVM CPU backend computes what the reference interpreter computes for the Core ATen breadth,
vision and state-space ops (cases in ``tvm_breadth_cases.py``; one compiled module per family).

Tolerances as in ``test_tvm_cpu``: f32 ``rtol=1e-4, atol=2e-5``; integer and bool results exactly.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from test_tvm_cpu import _close, _run  # noqa: E402
from tvm_breadth_cases import CASES, FAMILY_INPUTS, g  # noqa: E402

from ctc.ir import Module  # noqa: E402
from ctc.ir.interpreter import interpret  # noqa: E402

_COMPILED: dict[str, tuple[list[str], list[torch.Tensor], list[torch.Tensor]]] = {}


def family_module(family: str) -> tuple[Module, list[str]]:
    m = Module(f"breadth_{family}")
    ins = {name: m.add_input(name, t) for name, t, _ in FAMILY_INPUTS[family]}
    outs, names = [], []
    for name, _op, fam, fn in CASES:
        if fam != family:
            continue
        r = fn(m, ins)
        for i, v in enumerate(r if isinstance(r, list) else [r]):
            outs.append(v)
            names.append(name if i == 0 else f"{name}#{i}")
    m.set_outputs(outs, names)
    return m, names


def _results(family: str) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    if family not in _COMPILED:
        m, names = family_module(family)
        gen = g(0)
        inputs = [make(gen) for _, _, make in FAMILY_INPUTS[family]]
        _COMPILED[family] = (names, interpret(m, inputs), _run(m, inputs))
    return _COMPILED[family]


@pytest.mark.parametrize("name,family", [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_breadth_op_matches_interpreter(name: str, family: str) -> None:
    names, ref, got = _results(family)
    for i, nm in enumerate(names):
        if nm == name or nm.startswith(name + "#"):
            _close(nm, got[i], ref[i])
