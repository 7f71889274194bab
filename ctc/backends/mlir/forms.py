"""Export forms of ctc ops: the same semantics as the op's reference, written for ``torch.export`` + torch-mlir.

The reference implementations favour clarity (``quant_linear`` builds its per-channel cluster
index with ``repeat_interleave`` of a small integer tensor); traced into MLIR that becomes a
signed-integer tensor literal, which torch-mlir's lowering cannot legalize, and a pile of index
arithmetic.  The forms here compute the same values, in the same float operations and order
(so their results are bit-identical to the reference in torch), from static slices, expands and
reshapes only.  ``tests/test_mlir_export.py`` checks each against its reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["EXPORT_FORMS", "per_channel", "quant_linear_form", "dequantized_weight"]


def per_channel(p: torch.Tensor, clusters: Sequence[int], k: int) -> torch.Tensor:
    """``[C]`` per-cluster values -> ``[K]`` per channel (clusters are cumulative end boundaries)."""
    bounds = list(clusters) or [k]
    parts, start = [], 0
    for c, end in enumerate(bounds):
        parts.append(p[c:c + 1].expand(end - start))
        start = end
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _unpacked(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Signed integer weights ``[N, K]`` as f32 from their storage form (see :mod:`ctc.ir.quant`)."""
    if bits > 4:
        return qweight.to(torch.float32)
    wide = qweight.to(torch.int32)
    lo = torch.remainder(wide, 16)
    hi = torch.div(wide, 16, rounding_mode="floor")
    both = torch.stack([lo, hi], dim=-1).reshape(qweight.shape[0], -1)
    return both[:, :k].to(torch.float32) - 8.0


def dequantized_weight(qweight: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor, bits: int,
                       group_size: int, k: int) -> torch.Tensor:
    """``(q - z) * s`` per group as f32 ``[N, K]`` (``ctc.ir.quant.dequantize_weight`` without gathers)."""
    q = _unpacked(qweight, bits, k)
    s = w_scale.to(torch.float32)
    z = w_zero.to(torch.float32)
    if group_size == -1:
        return (q - z) * s
    n, g = s.shape
    pad = g * group_size - k
    if pad:
        q = F.pad(q, (0, pad))
    w = (q.reshape(n, g, group_size) - z.unsqueeze(-1)) * s.unsqueeze(-1)
    return w.reshape(n, g * group_size)[:, :k]


def _fake_quant_dynamic(xf: torch.Tensor, bits: int, clusters: Sequence[int], k: int) -> torch.Tensor:
    """Per-token, per-cluster activation fake-quant (``ctc.ir.quant.fake_quant_act_dynamic``) on static
    slices: each cluster's row min/max gives its (scale, zero), in the reference's float operations."""
    qmax = (1 << bits) - 1
    bounds = list(clusters) or [k]
    parts = []
    for a, b in zip([0, *bounds[:-1]], bounds, strict=True):
        xc = xf[..., a:b]
        lo = xc.amin(-1, keepdim=True).clamp(max=0)
        hi = xc.amax(-1, keepdim=True).clamp(min=0)
        s = (hi - lo) / qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.round(-lo / s).clamp(0, qmax)
        parts.append((torch.clamp(torch.round(xc / s) + z, 0, qmax) - z) * s)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def quant_linear_form(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                      *rest: torch.Tensor, w_bits: int, group_size: int, w_symmetric: bool, a_bits: int | None,
                      act_clusters: tuple[int, ...], has_bias: bool, act_dynamic: bool = False) -> torch.Tensor:
    """``quant_linear`` (see :func:`ctc.ir.ops.compress.quant_linear`) with static slices instead of gathers."""
    rest_l = list(rest)
    bias = rest_l.pop(0) if has_bias else None
    k = x.shape[-1]
    w = dequantized_weight(qweight, w_scale, w_zero, w_bits, group_size, k)
    xf = x.to(torch.float32)
    if a_bits is not None and a_bits != 16 and act_dynamic:
        xf = _fake_quant_dynamic(xf, int(a_bits), act_clusters, k)
    elif a_bits is not None and a_bits != 16:
        act_scale, act_zero = rest_l
        s = per_channel(act_scale.to(torch.float32), act_clusters, k)
        z = per_channel(act_zero.to(torch.float32), act_clusters, k)
        qa = torch.clamp(torch.round(xf / s) + z, 0, (1 << int(a_bits)) - 1)
        xf = (qa - z) * s
    y = xf @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


EXPORT_FORMS: dict[str, Callable[..., Any]] = {"quant_linear": quant_linear_form}
