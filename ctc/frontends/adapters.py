"""Capture adapters: the forms ctc captures mixture-of-experts layers and state-space scans in.

Why: both are written for eager speed with data-dependent Python.  A Hugging Face MoE layer
loops over the experts that received tokens (``nonzero`` on the routing, then per-expert
gathers of a data-dependent size), and the torch path of a Mamba block loops over the sequence.
Neither captures for symbolic shapes.  During capture ctc swaps in exact equivalents through the
extension points transformers provides:

* **experts**: an implementation registered in transformers' ``ExpertsInterface`` (selected with
  the public ``set_experts_implementation``) that dispatches densely with masks: every expert
  runs on every token and its output is weighted by the token's routing weight for that expert
  (zero when not selected).  Experts are added in ascending order into a zero accumulator, as
  the eager loop does, so the result is the same floating-point sum; each expert's weights reach
  the IR as ordinary ``linear`` weights (``gate_up_proj.3``).
* **selective scan**: the modeling module's ``mamba_selective_scan`` (the ``selective_scan_fn``
  API of ``mamba_ssm``) is replaced by one that calls the custom op ``ctc::selective_scan``;
  ``torch.export`` keeps it as one node, which becomes the ``selective_scan`` IR op.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ctc.ir.ops.ssm import selective_scan_reference

EXPERTS_IMPLEMENTATION = "ctc_dense"


# --------------------------------------------------------------------------- mixture of experts
def _expert_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    y = x @ w if transposed else F.linear(x, w)
    return y + b if b is not None else y


def dense_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts forward with dense dispatch: ``out = sum_e w_e * expert_e(x)`` over all experts ``e``,
    ``w_e`` the token's routing weight for ``e`` (zero when ``e`` is not among its top-k)."""
    up = self.gate_up_proj if self.has_gate else self.up_proj
    up_b = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
    down = self.down_proj
    down_b = self.down_proj_bias if self.has_bias else None
    out = torch.zeros_like(hidden_states)
    for e in range(up.shape[0]):
        w = (top_k_weights * (top_k_index == e).to(top_k_weights.dtype)).sum(dim=-1)
        h = _expert_linear(hidden_states, up[e], up_b[e] if up_b is not None else None, self.is_transposed)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        y = _expert_linear(h, down[e], down_b[e] if down_b is not None else None, self.is_transposed)
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        out = out + (y * w[:, None]).to(out.dtype)
    return out


def register_experts_implementation() -> None:
    """Make ``experts_implementation="ctc_dense"`` known to transformers (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, dense_experts_forward)


def has_routed_experts(model: nn.Module) -> bool:
    """True when ``model`` has experts modules that dispatch through transformers' ExpertsInterface."""
    return any(hasattr(m, "has_gate") and hasattr(m, "_apply_gate") for m in model.modules())


@contextmanager
def dense_experts(model: nn.Module) -> Iterator[None]:
    """Within the block, the model's MoE layers dispatch densely (see the module doc); restored after."""
    if not has_routed_experts(model) or not hasattr(model, "set_experts_implementation"):
        yield
        return
    register_experts_implementation()
    before = model.config._experts_implementation
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    try:
        yield
    finally:
        model.set_experts_implementation(before)


# --------------------------------------------------------------------------- selective scan
@torch.library.custom_op("ctc::selective_scan", mutates_args=())
def selective_scan_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      C: torch.Tensor) -> torch.Tensor:
    """The ``selective_scan`` IR op as a torch custom op (export keeps it as one node)."""
    return selective_scan_reference(u, delta, A, B, C)


@selective_scan_op.register_fake
def _(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(u)


def selective_scan_fn(hidden_states: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                      delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                      return_last_state: bool = False, **_: Any) -> torch.Tensor:
    """``mamba_ssm.selective_scan_fn`` semantics (as transformers' torch path computes them) on the
    ctc op: bias and softplus on ``dt``, the scan, the ``D`` skip and the ``silu(z)`` gate."""
    if return_last_state:
        raise RuntimeError("the final SSM state is only returned with a cache; capture with use_cache=False")
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    y = selective_scan_op(hidden_states, dt, A, B, C)
    if D is not None:
        y = y + hidden_states * D[None, :, None]
    if z is not None:
        y = y * F.silu(z)
    return y


_SCAN_NAME = "mamba_selective_scan"  # transformers' modeling modules define the scan under this name


@contextmanager
def scan_op(model: nn.Module) -> Iterator[None]:
    """Within the block, the modeling modules of ``model`` that define ``mamba_selective_scan`` call the
    ctc op instead (restored after)."""
    patched: list[tuple[Any, Any]] = []
    for mod_name in {type(m).__module__ for m in model.modules()}:
        module = sys.modules.get(mod_name)
        if module is not None and callable(getattr(module, _SCAN_NAME, None)):
            patched.append((module, getattr(module, _SCAN_NAME)))
            setattr(module, _SCAN_NAME, selective_scan_fn)
    try:
        yield
    finally:
        for module, fn in patched:
            setattr(module, _SCAN_NAME, fn)


@contextmanager
def capture_forms(model: nn.Module) -> Iterator[None]:
    """Both adapters for the duration of a capture."""
    with dense_experts(model), scan_op(model):
        yield


__all__ = ["EXPERTS_IMPLEMENTATION", "capture_forms", "dense_experts", "dense_experts_forward", "has_routed_experts",
           "register_experts_implementation", "scan_op", "selective_scan_fn", "selective_scan_op"]
