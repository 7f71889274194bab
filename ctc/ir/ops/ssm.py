"""State-space ops: the selective scan of Mamba-style blocks.

Why an op: the recurrence ``h_t = exp(A * dt_t) * h_{t-1} + dt_t * B_t * u_t``, ``y_t = C_t . h_t``
runs over the sequence; written as a Python loop it cannot be captured for a symbolic length
(and unrolled it is thousands of nodes).  As one op with reference semantics it captures for
any length, and a backend gives it a sequential kernel over time, parallel over batch and
channels.  The layout is ``mamba_ssm``'s ``selective_scan_fn`` (channels before length).
"""

from __future__ import annotations

import torch

from ctc.ir.ops.infer import expect_dim
from ctc.ir.ops.registry import OpError, register_op
from ctc.ir.types import FLOAT_DTYPES, TensorType

CAT = "ssm"


def _infer_selective_scan(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    u, dt, a, b, c = ins
    for t, what, rank in ((u, "u", 3), (dt, "delta", 3), (a, "A", 2), (b, "B", 3), (c, "C", 3)):
        if t.rank != rank or t.dtype not in FLOAT_DTYPES:
            raise OpError(f"selective_scan: {what} must be a rank-{rank} float tensor, got {t}")
    for i in range(3):
        expect_dim(u.shape[i], dt.shape[i], f"selective_scan: u vs delta dim {i}")
    expect_dim(a.shape[0], u.shape[1], "selective_scan: A rows vs channels of u")
    for t, what in ((b, "B"), (c, "C")):
        expect_dim(t.shape[0], u.shape[0], f"selective_scan: {what} batch vs u")
        expect_dim(t.shape[1], a.shape[1], f"selective_scan: {what} state size vs A columns")
        expect_dim(t.shape[2], u.shape[2], f"selective_scan: {what} length vs u")
    return [u]


def selective_scan_reference(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor) -> torch.Tensor:
    """The scan in float32, in the order Hugging Face's torch path computes it."""
    dtype = u.dtype
    batch, dim, length = u.shape
    dt = delta.float()
    d_a = torch.exp(A.float()[None, :, None, :] * dt[:, :, :, None])  # [B, D, L, N]
    d_bu = dt[:, :, :, None] * B.float().transpose(1, 2)[:, None, :, :] * u.float()[:, :, :, None]
    ct = C.float().transpose(1, 2)  # [B, L, N]
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float32, device=u.device)
    ys = []
    for t in range(length):
        h = d_a[:, :, t] * h + d_bu[:, :, t]
        ys.append(torch.matmul(h, ct[:, t, :].unsqueeze(-1))[:, :, 0])
    y = torch.stack(ys, dim=-1) if ys else torch.zeros(batch, dim, 0)
    return y.to(dtype)


@register_op("selective_scan", inputs=("u", "delta", "A", "B", "C"), infer=_infer_selective_scan, category=CAT)
def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor) -> torch.Tensor:
    """Selective scan (Mamba): for ``u, delta [B, D, L]``, ``A [D, N]``, ``B, C [B, N, L]`` and a zero
    initial state, ``h_t = exp(A * delta_t) * h_{t-1} + delta_t * B_t * u_t`` and
    ``y[b, d, t] = sum_n C[b, n, t] * h_t[b, d, n]``, computed in float32 (result in u's dtype).
    ``delta`` is used as given (apply its bias and softplus before), and the ``D`` skip and
    ``z`` gate of a Mamba block are separate ops."""
    return selective_scan_reference(u, delta, A, B, C)


__all__ = ["selective_scan_reference"]
