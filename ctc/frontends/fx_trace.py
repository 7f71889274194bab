"""Fallback capture with ``torch.fx`` tracing (``make_fx``) when ``torch.export`` fails.

Triggered by :func:`ctc.frontends.aten_capture.capture` when ``torch.export.export`` raises
(Python that export cannot trace, data-dependent control flow such as ``if mask.all():``).
The model is traced in real mode at the example inputs: every dim is static, and
data-dependent branches are fixed to the values the example inputs took (that is why the
fallback is a fallback).  ``module.meta["capture_warning"]`` says so and why export failed.
Parameters enter as placeholders (so their names survive) and the same ATen table maps the
graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from ctc.frontends.aten_capture import CaptureError, _dedupe_params, _translate
from ctc.ir.graph import Module


def capture_fx(model: nn.Module, inputs: Mapping[str, Any], *, output: str | int | None, name: str | None,
               why: str) -> Module:
    """Trace ``model(**inputs)`` with make_fx (static shapes) and translate it to ctc."""
    state: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    keys = list(state)
    tensor_keys = [k for k, v in inputs.items() if isinstance(v, torch.Tensor)]
    consts = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}
    spec_box: list[Any] = []

    def fn(*flat: torch.Tensor) -> list[torch.Tensor]:
        ps = dict(zip(keys, flat[:len(keys)], strict=True))
        kw = dict(zip(tensor_keys, flat[len(keys):], strict=True)) | consts
        out = torch.func.functional_call(model, ps, (), kw)
        leaves, spec = pytree.tree_flatten(out)
        spec_box.append(spec)
        return leaves

    fn._orig_mod = model  # type: ignore[attr-defined]  # make_fx records module scopes only under this attribute
    try:
        with torch.no_grad():
            gm = make_fx(fn, tracing_mode="real", pre_dispatch=True, record_module_stack=True,
                         _error_on_data_dependent_ops=False)(*state.values(), *(inputs[k] for k in tensor_keys))
    except Exception as e:  # noqa: BLE001 - both capture paths failed: report both
        raise CaptureError(f"could not capture {type(model).__name__}: torch.export failed ({why}) and the "
                           f"torch.fx fallback failed ({type(e).__name__}: {str(e).splitlines()[0]}). Make the "
                           "forward traceable (no data-dependent Python control flow) and retry.") from e
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    canon = _dedupe_params({k: v.detach() for k, v in state.items()})
    param_nodes: dict[fx.Node, str] = {ph: canon[k] for ph, k in zip(placeholders[:len(keys)], keys, strict=True)}
    input_nodes = {ph: k for ph, k in zip(placeholders[len(keys):], tensor_keys, strict=True)}
    for ph in placeholders:
        if "val" not in ph.meta:
            raise CaptureError("torch.fx fallback: traced graph lacks tensor metadata")
    try:
        m = _translate(gm, model, params={canon[k]: v.detach() for k, v in state.items() if canon[k] == k},
                       param_nodes=param_nodes, input_nodes=input_nodes, out_spec=spec_box[-1] if spec_box else None,
                       output=output, name=name)
    except CaptureError as e:  # composite ops (instance_norm, lstm) reach this path whole: export would decompose them
        raise CaptureError(f"{e}\n(this is the torch.fx fallback, taken because torch.export failed: {why}. It maps "
                           "ops as traced, without the decompositions torch.export applies; a forward that "
                           "torch.export can capture may avoid these ops)") from e
    m.meta["capture_warning"] = (f"captured with the torch.fx fallback because torch.export failed ({why}); "
                                 "shapes and data-dependent branches are fixed to the example inputs")
    return m
