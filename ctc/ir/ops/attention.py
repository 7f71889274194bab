"""Attention ops: scaled_dot_product_attention (kept whole, never decomposed) and the
rotary position embedding in the Hugging Face ``rotate_half`` convention.

Keeping attention as one op lets attention passes (sparse, calibrated attention) find and
replace it, and lets backends pick a fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ctc.ir.ops.infer import broadcast, expect_dim
from ctc.ir.ops.registry import Attr, OpError, register_op
from ctc.ir.types import FLOAT_DTYPES, TensorType

CAT = "attention"


def _infer_sdpa(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    q, k, v, *mask = ins
    for t, what in ((q, "q"), (k, "k"), (v, "v")):
        if t.dtype not in FLOAT_DTYPES or t.dtype != q.dtype:
            raise OpError(f"scaled_dot_product_attention: {what} must be float like q, got {t}")
        if t.rank < 2:
            raise OpError(f"scaled_dot_product_attention: {what} needs rank >= 2, got {t}")
    expect_dim(q.shape[-1], k.shape[-1], "scaled_dot_product_attention: q vs k head dim")
    expect_dim(k.shape[-2], v.shape[-2], "scaled_dot_product_attention: k vs v length")
    if attrs["enable_gqa"] and q.rank >= 3:
        hq, hk = q.shape[-3], k.shape[-3]
        expect_dim(hk, v.shape[-3], "scaled_dot_product_attention: k vs v heads")
        if isinstance(hq, int) and isinstance(hk, int) and hq % hk:
            raise OpError(f"scaled_dot_product_attention: {hq} query heads not a multiple of {hk} kv heads")
        batch = broadcast(q.shape[:-3], k.shape[:-3], v.shape[:-3]) + (hq,)
    else:
        batch = broadcast(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    out = TensorType((*batch, q.shape[-2], v.shape[-1]), q.dtype)
    if mask:
        m = mask[0]
        if m.dtype != "bool" and m.dtype != q.dtype:
            raise OpError(f"scaled_dot_product_attention: mask must be bool or {q.dtype} (additive), got {m}")
        broadcast(m.shape, (*batch, q.shape[-2], k.shape[-2]))
        if attrs["is_causal"]:
            raise OpError("scaled_dot_product_attention: give either a mask or is_causal, not both")
    return [out]


@register_op("scaled_dot_product_attention", inputs=("q", "k", "v", "mask?"), infer=_infer_sdpa, category=CAT,
             attrs={
                 "is_causal": Attr("bool", False, doc="apply a lower-triangular causal mask (no mask operand)"),
                 "scale": Attr("opt_float", None, doc="logit scale; None = 1/sqrt(head_dim)"),
                 "enable_gqa": Attr("bool", False, doc="k/v have fewer heads (axis -3) that q's heads share"),
             })
def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                                 *, is_causal: bool, scale: float | None, enable_gqa: bool) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` (torch semantics): a bool mask keeps positions where
    true, a float mask is added to the logits; ``enable_gqa`` repeats each kv head for
    ``Hq / Hkv`` consecutive query heads."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=enable_gqa)


def _infer_rotary(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, cos, sin = ins
    if x.dtype not in FLOAT_DTYPES or cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise OpError(f"rotary_embedding: x, cos, sin must share a float dtype, got {x}, {cos}, {sin}")
    d = x.shape[-1]
    if isinstance(d, int) and d % 2:
        raise OpError(f"rotary_embedding: last dim of {x} must be even")
    shape = broadcast(x.shape, cos.shape, sin.shape)
    if len(shape) != x.rank or any(a != b for a, b in zip(shape, x.shape, strict=False)):
        raise OpError(f"rotary_embedding: cos {cos} / sin {sin} must broadcast to x {x}")
    return [x]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` for ``x = [x1, x2]`` split in halves along the last axis."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


@register_op("rotary_embedding", inputs=("x", "cos", "sin"), infer=_infer_rotary, category=CAT)
def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, Hugging Face ``rotate_half`` convention:
    ``x * cos + rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]`` (cos/sin broadcast)."""
    return x * cos + rotate_half(x) * sin


def _infer_cache_write(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    cache, update, position = ins
    if cache.dtype not in FLOAT_DTYPES or update.dtype != cache.dtype:
        raise OpError(f"cache_write: cache and update must share a float dtype, got {cache}, {update}")
    if cache.rank < 2 or update.rank != cache.rank:
        raise OpError(f"cache_write: update must have the cache's rank (>= 2), got {cache} and {update}")
    if position.dtype != "i64" or position.rank != 1:
        raise OpError(f"cache_write: position must be i64 [T] (one index per updated row), got {position}")
    ax = attrs["axis"] % cache.rank
    for i, (c, u) in enumerate(zip(cache.shape, update.shape, strict=True)):
        if i == ax:
            expect_dim(u, position.shape[0], "cache_write: update rows vs positions")
        else:
            expect_dim(u, c, f"cache_write: update vs cache dim {i}")
    return [cache]


@register_op("cache_write", inputs=("cache", "update", "position"), infer=_infer_cache_write, category=CAT,
             attrs={"axis": Attr("int", -2, doc="the cache's sequence axis")})
def cache_write(cache: torch.Tensor, update: torch.Tensor, position: torch.Tensor, *, axis: int) -> torch.Tensor:
    """A preallocated KV cache with ``update``'s rows written at ``position`` along ``axis``:
    ``out = cache; out[..., position[t], :] = update[..., t, :]`` (positions distinct and in range).

    The result replaces the cache: backends that own the cache buffer update it in place
    (a decode step then moves no cache bytes besides the new rows), the reference copies."""
    return cache.index_copy(axis % cache.dim(), position, update)
