"""Torch backend: the GraphModule built from a ctc module computes exactly what the interpreter
computes, for every captured architecture and for random generated modules, at shapes other
than the capture shapes (symbolic dims are read at run time)."""

from __future__ import annotations

import pytest
import torch
from hf_configs import ARCHS, captured, hf_inputs, reference
from hypothesis import HealthCheck, given, settings
from strategies import module_and_inputs

from ctc.backends.torch_fx import TorchBackendError, to_fx
from ctc.ir import interpret


@pytest.mark.parametrize("arch", ARCHS)
def test_fx_equals_interpreter(arch: str) -> None:
    model, m = captured(arch)
    gm = to_fx(m)
    assert isinstance(gm, torch.fx.GraphModule)
    for batch, seq, pad in ((1, 4, 0), (2, 13, 3)):
        inputs = hf_inputs(batch, seq, pad=pad)
        want = interpret(m, inputs)[0]
        got = gm.run(inputs)[0]
        assert torch.equal(got, want), arch
        assert (got - reference(model, inputs)).abs().max().item() <= 1e-5
    # positional call returns a tuple; parameters are the module's tensors, registered as buffers
    out = gm(*hf_inputs(1, 6).values())
    assert isinstance(out, tuple) and len(out) == 1
    for name, safe in gm.param_names.items():
        assert getattr(gm, safe) is m.params[name]


def test_fx_rejects_bad_input_shapes() -> None:
    _, m = captured("llama")
    gm = to_fx(m)
    bad = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    with pytest.raises(TorchBackendError, match="attention_mask"):
        gm.run(bad)
    with pytest.raises(TorchBackendError, match="missing inputs"):
        gm.run({"input_ids": bad["input_ids"]})


def test_fx_graph_is_traceable_by_export() -> None:
    """The way back out to PyTorch: the GraphModule exports with torch.export."""
    _, m = captured("bert")
    gm = to_fx(m, check_shapes=False)
    inputs = hf_inputs(2, 6)
    ep = torch.export.export(gm, tuple(inputs.values()))
    assert torch.equal(ep.module()(*inputs.values())[0], interpret(m, inputs)[0])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(module_and_inputs())
def test_fx_equals_interpreter_on_random_modules(mi) -> None:
    m, inputs = mi
    want = interpret(m, inputs)
    got = to_fx(m).run(inputs)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
