"""Quantized KV-cache ops (category ``compress``): a cache stored as int8/int4 with per-head, per-token,
per-group scales, written at each decode step and read by attention.

Why: at long contexts a decode step streams its whole KV cache once per layer; stored as int8 it
moves a quarter of the fp32 bytes (an eighth at int4).  The cache is real storage, not a
fake-quant pair: the step's inputs are the integer buffers and their scales,
``quant_cache_write`` quantizes only the new rows into them (in place on a backend that owns
the buffers, like ``cache_write``), and ``quant_kv_attention`` reads the integers directly.
Conventions (symmetric, round half to even, int4 nibbles as weights) are in
:func:`ctc.ir.quant.quantize_kv`; the :mod:`ctc.passes.kv_cache_quant` pass introduces the ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ctc.ir import quant as Q
from ctc.ir.ops.infer import expect_dim
from ctc.ir.ops.registry import Attr, OpError, register_op
from ctc.ir.types import FLOAT_DTYPES, TensorType

CAT = "compress"

_KV_ATTRS = {
    "bits": Attr("int", 8, doc="bits per cached value: 8 (int8 storage) or 4 (two per byte)", choices=(4, 8)),
    "group_size": Attr("int", -1, doc="channels per scale along the head dim; -1 = one scale per head and token"),
}


def _check_storage(cache: TensorType, scale: TensorType, bits: int, group_size: int, d: int | str, what: str) -> None:
    want = "i8" if bits == 8 else "u8"
    if cache.dtype != want:
        raise OpError(f"{what}: a {bits}-bit cache is stored as {want}, got {cache}")
    if cache.rank != 4:
        raise OpError(f"{what}: the cache must be [batch, kv_heads, max_len, storage], got {cache}")
    if not isinstance(d, int):
        raise OpError(f"{what}: needs a static head dim, got {d}")
    try:
        g = Q.kv_groups(d, group_size)
    except ValueError as e:
        raise OpError(f"{what}: {e}") from None
    expect_dim(cache.shape[3], Q.kv_storage_dim(d, bits), f"{what}: cache storage columns for head dim {d}")
    if scale.dtype != "f32" or scale.rank != 4:
        raise OpError(f"{what}: scales must be f32 [batch, kv_heads, max_len, groups], got {scale}")
    for i in range(3):
        expect_dim(scale.shape[i], cache.shape[i], f"{what}: scale dim {i} vs cache")
    expect_dim(scale.shape[3], g, f"{what}: scale groups (head dim {d} / group_size {group_size})")


def _infer_write(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    cache, scale, update, position = ins
    if update.dtype not in FLOAT_DTYPES or update.rank != 4:
        raise OpError(f"quant_cache_write: update must be float [batch, kv_heads, T, head_dim], got {update}")
    if position.dtype != "i64" or position.rank != 1:
        raise OpError(f"quant_cache_write: position must be i64 [T], got {position}")
    _check_storage(cache, scale, attrs["bits"], attrs["group_size"], update.shape[3], "quant_cache_write")
    expect_dim(update.shape[2], position.shape[0], "quant_cache_write: update rows vs positions")
    for i in range(2):
        expect_dim(update.shape[i], cache.shape[i], f"quant_cache_write: update vs cache dim {i}")
    return [cache, scale]


@register_op("quant_cache_write", inputs=("cache", "scale", "update", "position"), infer=_infer_write, category=CAT,
             num_outputs=2, attrs=dict(_KV_ATTRS))
def quant_cache_write(cache: torch.Tensor, scale: torch.Tensor, update: torch.Tensor, position: torch.Tensor, *,
                      bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cache', scale')``: the new rows ``update [B, Hkv, T, D]`` quantized (:func:`ctc.ir.quant.quantize_kv`)
    and written at ``position [T]`` along the sequence axis of the integer cache and of its scales.

    Like ``cache_write``, the results replace the buffers (a backend that owns them writes in place)."""
    q, s = Q.quantize_kv(update, bits, group_size)
    pos = position.to(torch.int64)
    return cache.index_copy(2, pos, q), scale.index_copy(2, pos, s)


def _infer_attention(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    q, kc, ks, vc, vs, *mask = ins
    if q.dtype not in FLOAT_DTYPES or q.rank != 4:
        raise OpError(f"quant_kv_attention: q must be float [batch, heads, q_len, head_dim], got {q}")
    d = q.shape[3]
    _check_storage(kc, ks, attrs["bits"], attrs["group_size"], d, "quant_kv_attention keys")
    _check_storage(vc, vs, attrs["bits"], attrs["group_size"], d, "quant_kv_attention values")
    expect_dim(kc.shape[2], vc.shape[2], "quant_kv_attention: key vs value cache length")
    hq, hk = q.shape[1], kc.shape[1]
    if isinstance(hq, int) and isinstance(hk, int) and hq % hk:
        raise OpError(f"quant_kv_attention: {hq} query heads not a multiple of {hk} kv heads")
    if mask:
        m = mask[0]
        if m.dtype != "bool" and m.dtype != q.dtype:
            raise OpError(f"quant_kv_attention: mask must be bool or {q.dtype} (additive), got {m}")
    return [q]


@register_op("quant_kv_attention", inputs=("q", "k_cache", "k_scale", "v_cache", "v_scale", "mask?"),
             infer=_infer_attention, category=CAT,
             attrs={**_KV_ATTRS,
                    "scale": Attr("opt_float", None, doc="logit scale; None = 1/sqrt(head_dim)")})
def quant_kv_attention(q: torch.Tensor, k_cache: torch.Tensor, k_scale: torch.Tensor, v_cache: torch.Tensor,
                       v_scale: torch.Tensor, mask: torch.Tensor | None = None, *, bits: int, group_size: int,
                       scale: float | None) -> torch.Tensor:
    """``scaled_dot_product_attention(q, K, V, mask)`` over the dequantized caches ``K = k_cache * k_scale``
    (per group), ``V`` likewise; grouped kv heads serve ``Hq / Hkv`` consecutive query heads.  A bool mask
    keeps positions where true, a float mask is added to the logits.  The logits and the weighted sum are
    fp32; the result has q's dtype."""
    k = Q.dequantize_kv(k_cache, k_scale, bits, group_size)
    v = Q.dequantize_kv(v_cache, v_scale, bits, group_size)
    out = F.scaled_dot_product_attention(q.to(torch.float32), k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.to(q.dtype)
