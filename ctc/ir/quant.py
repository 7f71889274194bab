"""Integer quantization conventions shared by the compression ops, passes and backends.

Conventions (every producer and consumer of quantized tensors follows them):

* **Weights** are stored as *signed* integers ``q`` in ``[-2^(b-1), 2^(b-1) - 1]`` with a
  signed zero point ``z`` in the same range, so ``w ≈ (q - z) * s``.  Symmetric weights have
  ``z = 0``; asymmetric ones carry the usual unsigned zero point shifted by ``2^(b-1)``.
  Scales and zero points have shape ``[N, G]`` (``G = 1`` per output channel, else
  ``ceil(K / group_size)`` groups of ``group_size`` consecutive input channels).
* **Storage**: bits > 4 → ``int8`` tensor ``[N, K]``; bits <= 4 → ``uint8`` tensor
  ``[N, ceil(K/2)]`` with two values per byte along K.  Nibble order: element ``2j`` is the
  *low* nibble of byte ``j`` and element ``2j+1`` the *high* nibble; each nibble holds
  ``q + 8`` (offset binary, 0..15).  An odd K is padded with one ``q = 0`` nibble.
* **Activations** are quantized *asymmetric unsigned*: ``qa = clamp(round(x/s) + z, 0, 2^b - 1)``
  with an integer zero point ``z`` in ``[0, 2^b - 1]`` (stored as ``int32``), one (s, z) per
  contiguous cluster of input channels.  This is the u8 x s8 shape integer dot-product
  instructions (e.g. x86 VNNI) want.
* Rounding is ``torch.round``: half to even.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ACT_BLOCK", "QuantizedWeight", "act_block_clusters", "act_qparams", "cluster_index", "dequantize_kv",
           "dequantize_weight", "dynamic_act_qparams", "fake_quant_act", "fake_quant_act_dynamic", "kv_groups",
           "kv_storage_dim", "quantize_kv",
           "num_groups", "pack_int4", "packed_k", "qrange", "quant_linear_int", "quantize_act", "quantize_weight",
           "unpack_int4", "unpack_weight"]


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """The integer range ``(lo, hi)`` of a ``bits``-wide signed or unsigned integer."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits={bits} out of range 1..16")
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def packed_k(k: int, bits: int) -> int:
    """Storage length along K for ``k`` values of ``bits`` bits (see the module doc)."""
    return (k + 1) // 2 if bits <= 4 else k


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed values in [-8, 7] two per byte along the last dim (low nibble first)."""
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise TypeError(f"pack_int4 takes an integer tensor, got {q.dtype}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"pack_int4: values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[-1] % 2:
        u = torch.cat([u, torch.full((*u.shape[:-1], 1), 8, dtype=torch.uint8)], dim=-1)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``k`` signed int8 values per row from packed uint8 bytes."""
    if p.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 takes a uint8 tensor, got {p.dtype}")
    if p.shape[-1] != (k + 1) // 2:
        raise ValueError(f"unpack_int4: {p.shape[-1]} bytes cannot hold k={k} values (need {(k + 1) // 2})")
    lo = (p & 0x0F).to(torch.int8) - 8
    hi = (p >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], -1)[..., :k]


def unpack_weight(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Signed integer weights ``[N, K]`` (int8) from their storage form."""
    if bits <= 4:
        return unpack_int4(qweight, k)
    if qweight.dtype != torch.int8:
        raise TypeError(f"{bits}-bit weights are stored as int8, got {qweight.dtype}")
    return qweight


def _expand_groups(p: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """``[N, G]`` per-group parameters expanded to ``[N, K]``."""
    if group_size == -1:
        return p.expand(p.shape[0], k) if p.shape[-1] == 1 else p
    return p.repeat_interleave(group_size, dim=-1)[:, :k]


def num_groups(k: int, group_size: int) -> int:
    """Number of weight groups along K (1 for per-output-channel, ``group_size == -1``)."""
    return 1 if group_size == -1 else -(-k // group_size)


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized ``[N, K]`` weight in storage form, with its ``[N, G]`` scales and zero points."""

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    k: int


def quantize_weight(w: torch.Tensor, bits: int, group_size: int = -1, symmetric: bool = True,
                    float_zero: bool = False) -> QuantizedWeight:
    """Round-to-nearest min-max quantization of a ``[N, K]`` weight (per channel or per group).

    ``float_zero`` (asymmetric only): the grid spans each group's own ``[min, max]`` with an f32 zero
    point (``w = min + s * (q + 2^(b-1))``, GGUF Q4_1's form) instead of a range stretched to hold 0
    with an integer zero point; such weights suit weight-only kernels (an integer kernel needs
    integer zero points)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight takes a [N, K] matrix, got shape {tuple(w.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be 2..8, got {bits}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be -1 (per channel) or positive, got {group_size}")
    n, k = w.shape
    g = num_groups(k, group_size)
    gs = k if group_size == -1 else group_size
    wf = w.detach().to(torch.float32)
    pad = g * gs - k
    wg = torch.cat([wf, wf.new_zeros(n, pad)], dim=1).reshape(n, g, gs) if pad else wf.reshape(n, g, gs)
    lo_q, hi_q = qrange(bits, True)
    if float_zero:
        if symmetric:
            raise ValueError("quantize_weight: float_zero needs symmetric=False (a symmetric grid's zero point is 0)")
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        scale = (hi - lo) / ((1 << bits) - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        s_full = _expand_groups(scale, group_size, k)
        q = torch.clamp(torch.round((wf - _expand_groups(lo, group_size, k)) / s_full) + lo_q, lo_q, hi_q)
        zero_f = (lo_q - lo / scale).to(torch.float32)
        q = q.to(torch.int8)
        return QuantizedWeight(pack_int4(q) if bits <= 4 else q, scale, zero_f, bits, group_size, False, k)
    if symmetric:
        scale = wg.abs().amax(dim=-1) / hi_q
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.zeros(n, g, dtype=torch.int8)
    else:
        lo = wg.amin(dim=-1).clamp(max=0)
        hi = wg.amax(dim=-1).clamp(min=0)
        scale = (hi - lo) / ((1 << bits) - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_u = torch.round(-lo / scale).clamp(0, (1 << bits) - 1)
        zero = (zero_u - (1 << (bits - 1))).to(torch.int8)
    s_full = _expand_groups(scale, group_size, k)
    z_full = _expand_groups(zero.to(torch.float32), group_size, k)
    q = torch.clamp(torch.round(wf / s_full) + z_full, lo_q, hi_q).to(torch.int8)
    qweight = pack_int4(q) if bits <= 4 else q
    return QuantizedWeight(qweight, scale, zero, bits, group_size, symmetric, k)


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                      group_size: int, k: int) -> torch.Tensor:
    """``(q - z) * s`` as an fp32 ``[N, K]`` matrix."""
    q = unpack_weight(qweight, bits, k).to(torch.float32)
    s = _expand_groups(scale.to(torch.float32), group_size, k)
    z = _expand_groups(zero.to(torch.float32), group_size, k)
    return (q - z) * s


def act_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric unsigned (scale f32, zero i32) covering ``[min(lo, 0), max(hi, 0)]``."""
    lo = torch.as_tensor(lo, dtype=torch.float32).clamp(max=0)
    hi = torch.as_tensor(hi, dtype=torch.float32).clamp(min=0)
    qmax = (1 << bits) - 1
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, qmax).to(torch.int32)
    return scale, zero


def cluster_index(clusters: tuple[int, ...] | list[int], k: int) -> torch.Tensor:
    """Cluster id of every input channel, from cumulative end boundaries (``()`` = one cluster)."""
    bounds = list(clusters) or [k]
    if bounds[-1] != k or any(b <= a for a, b in zip([0, *bounds[:-1]], bounds, strict=True)):
        raise ValueError(f"act_clusters {list(clusters)} must be strictly increasing end boundaries ending at K={k}")
    sizes = torch.tensor([b - a for a, b in zip([0, *bounds[:-1]], bounds, strict=True)])
    return torch.repeat_interleave(torch.arange(len(bounds)), sizes)


def quantize_act(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                 clusters: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Unsigned integer activations (as int32) with one (scale, zero) per channel cluster."""
    idx = cluster_index(clusters, x.shape[-1])
    s = scale.to(torch.float32)[idx]
    z = zero.to(torch.float32)[idx]
    return torch.clamp(torch.round(x.to(torch.float32) / s) + z, 0, (1 << bits) - 1).to(torch.int32)


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   clusters: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Quantize then dequantize activations per channel cluster (fp32 result)."""
    idx = cluster_index(clusters, x.shape[-1])
    qa = quantize_act(x, scale, zero, bits, clusters).to(torch.float32)
    return (qa - zero.to(torch.float32)[idx]) * scale.to(torch.float32)[idx]


def dynamic_act_qparams(x: torch.Tensor, bits: int, clusters: tuple[int, ...] | list[int]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (every leading index of ``x``) and per-cluster ``(scale [..., C], zero [..., C])`` from
    each row's min/max over the cluster's channels: what a dynamic-activation kernel computes."""
    k = x.shape[-1]
    bounds = list(clusters) or [k]
    starts = [0, *bounds[:-1]]
    xf = x.to(torch.float32)
    lo = torch.stack([xf[..., a:b].amin(-1) for a, b in zip(starts, bounds, strict=True)], -1)
    hi = torch.stack([xf[..., a:b].amax(-1) for a, b in zip(starts, bounds, strict=True)], -1)
    return act_qparams(lo, hi, bits)


ACT_BLOCK = 32
"""Input channels per activation block in the per-block dynamic mode (llama.cpp's ``QK8_1``)."""


def act_block_clusters(k: int, block: int = ACT_BLOCK) -> tuple[int, ...]:
    """Cluster end boundaries cutting ``k`` input channels into blocks of ``block`` (the last may be short):
    with ``act_dynamic`` each row's every block gets its own 8-bit range, llama.cpp's Q8_1 activation form."""
    if k <= 0 or block <= 0:
        raise ValueError(f"act_block_clusters: k={k} and block={block} must be positive")
    return (*range(block, k, block), k)


def fake_quant_act_dynamic(x: torch.Tensor, bits: int, clusters: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Quantize then dequantize activations with per-token, per-cluster ranges (fp32 result)."""
    idx = cluster_index(clusters, x.shape[-1])
    scale, zero = dynamic_act_qparams(x, bits, clusters)
    s = scale[..., idx]
    z = zero.to(torch.float32)[..., idx]
    qa = torch.clamp(torch.round(x.to(torch.float32) / s) + z, 0, (1 << bits) - 1)
    return (qa - z) * s


def quant_linear_int(x: torch.Tensor, qw: QuantizedWeight, act_scale: torch.Tensor, act_zero: torch.Tensor,
                     a_bits: int, clusters: tuple[int, ...] | list[int],
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Integer-arithmetic form of ``quant_linear``: what an int8 x int8 -> int32 kernel computes.

    K is cut into segments where both the activation cluster and the weight group are
    constant; each segment accumulates ``(qa - za) * (qw - zw)`` exactly in integers, and
    the segment sums are scaled by ``sa * sw`` and added in fp32.  It equals the
    dequantize-then-matmul reference up to fp32 summation rounding.
    """
    k = qw.k
    cid = cluster_index(clusters, k)
    gid = torch.arange(k) // (k if qw.group_size == -1 else qw.group_size)
    qa = quantize_act(x, act_scale, act_zero, a_bits, clusters).to(torch.int64) - act_zero.to(torch.int64)[cid]
    q = unpack_weight(qw.qweight, qw.bits, k).to(torch.int64)
    zw = _expand_groups(qw.zero.to(torch.int64), qw.group_size, k)
    qwz = q - zw  # [N, K]
    out = torch.zeros(*x.shape[:-1], q.shape[0], dtype=torch.float64)
    start = 0
    while start < k:
        end = start + 1
        while end < k and cid[end] == cid[start] and gid[end] == gid[start]:
            end += 1
        acc = qa[..., start:end] @ qwz[:, start:end].T  # exact integer accumulation
        sa = act_scale.to(torch.float64)[cid[start]]
        sw = qw.scale.to(torch.float64)[:, int(gid[start])]
        out += acc.to(torch.float64) * sa * sw
        start = end
    if bias is not None:
        out += bias.to(torch.float64)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- KV caches
def kv_groups(d: int, group_size: int) -> int:
    """Scale groups per cached vector of ``d`` channels (``group_size=-1``: one per head and token)."""
    if group_size == -1:
        return 1
    if group_size <= 0 or d % group_size:
        raise ValueError(f"kv group_size={group_size} must be -1 or divide the head dim {d}")
    return d // group_size


def kv_storage_dim(d: int, bits: int) -> int:
    """Last dim of a quantized cache: ``d`` int8 values, or ``d / 2`` bytes of two int4 values."""
    return d if bits > 4 else d // 2


def quantize_kv(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of cached vectors ``x [..., D]``: ``(storage, scale [..., G])``.

    Per group of ``group_size`` channels of each vector (one head's key or value at one position),
    ``s = max|x| / (2^(bits-1) - 1)`` (1 for an all-zero group) and ``q = clamp(round(x / s), -qmax, qmax)``
    (round half to even).  Storage: int8 ``[..., D]`` for 8 bits; for 4 bits uint8 ``[..., D/2]`` with
    two offset-binary nibbles per byte (``q + 8``, element ``2j`` in the low nibble), as weights."""
    if bits not in (4, 8):
        raise ValueError(f"KV cache bits must be 4 or 8, got {bits}")
    d = x.shape[-1]
    g = kv_groups(d, group_size)
    qmax = (1 << (bits - 1)) - 1
    xf = x.to(torch.float32).reshape(*x.shape[:-1], g, d // g)
    s = xf.abs().amax(-1) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.clamp(torch.round(xf / s.unsqueeze(-1)), -qmax, qmax).to(torch.int8).reshape(x.shape)
    return (pack_int4(q) if bits == 4 else q), s


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """fp32 vectors from :func:`quantize_kv`'s storage and scales."""
    g = scale.shape[-1]
    if bits == 4:
        d = q.shape[-1] * 2
        v = unpack_int4(q, d).to(torch.float32)
    else:
        v = q.to(torch.float32)
        d = v.shape[-1]
    v = v.reshape(*v.shape[:-1], g, d // g) * scale.to(torch.float32).unsqueeze(-1)
    return v.reshape(*v.shape[:-2], d)
