"""The integer model: the exact semantics the ``fpga`` target's C computes, bit for bit.

Why: a C simulation can only be checked *bit-exactly* against a reference whose every rounding
is specified.  The IR's reference implementations (``ctc/ir/ops``) are the semantics up to
float summation order; this module pins the order down.  ``interpret_exact(module, inputs)``
runs ctc's reference interpreter with the implementations below in place of the IR's for the
ops that need it; the C emitted by :mod:`.cgen` must agree with it exactly.

The integer model of a module:

* ``quant_linear`` with quantized activations (``a_bits`` set) is integer end to end inside the
  kernel.  Input boundary: ``qa = clamp(rne(x / s_c) + z_c, 0, 2^a - 1)`` (fp32 division,
  round half to even), exactly the IR's.  Inside, for each K-segment ``s`` of constant
  activation cluster ``c`` and weight group ``g``, the int32 sum
  ``acc_s = sum_k (qa - z_c)(qw - zw_g)`` (computed as ``sum qa*qw - z_c*sum qw - zw*(sum qa -
  len*z_c)``: the same integer).  Output boundary, in fp32 and in segment order:
  ``y = bias; y = y + (s_c * w_scale[n, g]) * f32(acc_s)``.  The IR's reference computes the
  same sum in fp32 after dequantizing; the two agree to fp32 rounding (``ctc.ir.quant`` has the
  float64 form, :func:`ctc.ir.quant.quant_linear_int`).
* Everything else stays float32 ("float islands"), IEEE single precision with every operation
  rounded once (no fused multiply-add: the C is compiled with ``-ffp-contract=off``) and a fixed
  order: every sum (dot products of float matmuls and attention, layer/RMS norm statistics,
  softmax denominators) is accumulated left to right from 0; ``exp``/``erf``/``tanh`` are the
  polynomial approximations :func:`exp_poly` / :func:`erf_poly` (``|error| < 2e-7``
  relative for exp, ``< 1e-6`` absolute for erf), built from +, -, *, /, floor and an
  exponent-field write only; ``sqrt`` and ``/`` are IEEE's, correctly rounded (the reference computes
  them in fp64 and rounds once: torch's fp32 ``sqrt`` is not always correctly rounded, and its ``/``
  by a scalar multiplies by the reciprocal).
  Formulas: ``layer_norm = ((x - mean) * (1 / sqrt(var + eps))) * w + b`` with
  ``mean = sum(x) / K``, ``var = sum((x - mean)^2) / K``; ``rms_norm = w * (x * (1 / sqrt(sum(x^2) / K
  + eps)))``; ``softmax = exp(x - max) / sum(exp(x - max))``; ``gelu = (x * 0.5) * (1 + erf(x *
  2^-1/2))``; ``silu = x / (1 + exp(-x))``; ``sigmoid = 1 / (1 + exp(-x))``; attention
  ``softmax(dot(q, k) * scale, masked) . v``.
* Data movement (reshape, transpose, gather, embedding, slices, concat, channel_permute) and
  single-rounding elementwise ops (add, sub, mul, div, comparisons, where, casts, rotary
  embedding) are the IR's own reference implementations: they are already exact.

Ops in neither table have no integer-model definition; the ``fpga`` target refuses them by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ctc.ir import quant as Q

__all__ = ["DATA_OPS", "EXACT_OPS", "ERF_ALPHA", "ERF_BETA", "EXP_COEFFS", "erf_poly", "exp_poly", "interpret_exact",
           "qlinear_segments", "seq_dot", "seq_sum", "unsupported_ops"]

F32 = torch.float32


def f32(v: float) -> torch.Tensor:
    """A 0-dim fp32 constant (so torch rounds the constant to fp32 once, as C's float literal)."""
    return torch.tensor(v, dtype=F32)


def fdiv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IEEE fp32 division, correctly rounded: computed in fp64 and rounded once (exact for fp32 operands).
    torch's own fp32 ``/`` multiplies by the reciprocal when the divisor is a scalar tensor."""
    return (a.to(torch.float64) / b.to(torch.float64)).to(F32)


def fsqrt(a: torch.Tensor) -> torch.Tensor:
    """IEEE fp32 square root, correctly rounded (fp64 then one rounding); torch's vectorized fp32 sqrt is
    not always correctly rounded (seen 1 ulp off on AVX-512)."""
    return torch.sqrt(a.to(torch.float64)).to(F32)


# --------------------------------------------------------------------------- ordered reductions
def seq_sum(x: torch.Tensor, dim: int = -1, keepdim: bool = True) -> torch.Tensor:
    """Left-to-right fp32 sum along ``dim`` starting from 0."""
    x = x.to(F32)
    d = dim % x.dim()
    acc = torch.zeros_like(x.select(d, 0))
    for i in range(x.shape[d]):
        acc = acc + x.select(d, i)
    return acc.unsqueeze(d) if keepdim else acc


def seq_max(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Left-to-right running maximum (``m = x > m ? x : m``) along ``dim``, kept."""
    d = dim % x.dim()
    m = x.select(d, 0)
    for i in range(1, x.shape[d]):
        v = x.select(d, i)
        m = torch.where(v > m, v, m)
    return m.unsqueeze(d)


def seq_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (``[..., M, K] x [..., K, N]``, broadcast batch) with each dot product summed left to
    right from 0 in fp32, one rounding per product and per addition."""
    a = a.to(F32)
    b = b.to(F32)
    shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
    acc = torch.zeros(shape, dtype=F32)
    for k in range(a.shape[-1]):
        acc = acc + a[..., :, k:k + 1] * b[..., k:k + 1, :]
    return acc


# --------------------------------------------------------------------------- polynomial functions
EXP_LO, EXP_HI = -87.0, 88.0
EXP_LOG2E, EXP_C1, EXP_C2 = 1.44269504088896341, 0.693359375, -2.12194440e-4
EXP_COEFFS = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
             -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
            -1.42647390514189e-02)
ERF_CLAMP = 4.0


def exp_poly(x: torch.Tensor) -> torch.Tensor:
    """exp in fp32: ``n = floor(x log2e + 1/2)``, ``r = (x - n c1) - n c2``, a degree-7 polynomial in r,
    scaled by ``2^n`` written into the exponent field.  0 below -87 (and for -inf), inputs above 88
    are clamped."""
    x = x.to(F32)
    xc = torch.clamp(x, EXP_LO, EXP_HI)
    n = torch.floor(xc * f32(EXP_LOG2E) + f32(0.5))
    r = (xc - n * f32(EXP_C1)) - n * f32(EXP_C2)
    p = f32(EXP_COEFFS[0])
    for c in EXP_COEFFS[1:]:
        p = p * r + f32(c)
    y = ((p * (r * r)) + r) + f32(1.0)
    scale = ((n.to(torch.int32) + 127) << 23).view(F32)
    return torch.where(x < f32(EXP_LO), f32(0.0), y * scale)


def erf_poly(x: torch.Tensor) -> torch.Tensor:
    """erf in fp32: the odd/even rational approximation ``x p(x^2) / q(x^2)`` on ``[-4, 4]``."""
    x = torch.clamp(x.to(F32), -ERF_CLAMP, ERF_CLAMP)
    x2 = x * x
    p = x2 * f32(ERF_ALPHA[0]) + f32(ERF_ALPHA[1])
    for c in ERF_ALPHA[2:]:
        p = x2 * p + f32(c)
    p = x * p
    q = x2 * f32(ERF_BETA[0]) + f32(ERF_BETA[1])
    for c in ERF_BETA[2:]:
        q = x2 * q + f32(c)
    return fdiv(p, q)


# --------------------------------------------------------------------------- op implementations
def _exp(x: torch.Tensor) -> torch.Tensor:
    return exp_poly(x)


def _erf(x: torch.Tensor) -> torch.Tensor:
    return erf_poly(x)


def _tanh(x: torch.Tensor) -> torch.Tensor:
    return f32(1.0) - fdiv(f32(2.0), exp_poly(x * f32(2.0)) + f32(1.0))


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    return fdiv(f32(1.0), f32(1.0) + exp_poly(-x))


def _silu(x: torch.Tensor) -> torch.Tensor:
    return fdiv(x, f32(1.0) + exp_poly(-x))


def _gelu(x: torch.Tensor, *, approximate: str) -> torch.Tensor:
    if approximate == "tanh":
        inner = (x + ((x * x) * x) * f32(0.044715)) * f32(math.sqrt(2.0 / math.pi))
        return (x * f32(0.5)) * (f32(1.0) + _tanh(inner))
    return (x * f32(0.5)) * (f32(1.0) + erf_poly(x * f32(1.0 / math.sqrt(2.0))))


def _softmax_rows(x: torch.Tensor) -> torch.Tensor:
    e = exp_poly(x - seq_max(x))
    return fdiv(e, seq_sum(e))


def _softmax(x: torch.Tensor, *, axis: int) -> torch.Tensor:
    return _softmax_rows(x.movedim(axis, -1)).movedim(-1, axis)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                eps: float, normalized_ndim: int) -> torch.Tensor:
    if normalized_ndim != 1:
        raise NotImplementedError("the integer model normalizes over the last axis only (normalized_ndim=1)")
    k = f32(float(x.shape[-1]))
    mean = fdiv(seq_sum(x), k)
    d = x - mean
    var = fdiv(seq_sum(d * d), k)
    y = d * fdiv(f32(1.0), fsqrt(var + f32(eps)))
    if weight is not None:
        y = y * weight.to(F32)
    if bias is not None:
        y = y + bias.to(F32)
    return y


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float) -> torch.Tensor:
    ms = fdiv(seq_sum(x * x), f32(float(x.shape[-1])))
    return weight.to(F32) * (x * fdiv(f32(1.0), fsqrt(ms + f32(eps))))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = seq_dot(x, weight.to(F32).T)
    return y + bias.to(F32) if bias is not None else y


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return seq_dot(a, b)


def attention_logits(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                     scale: float | None, enable_gqa: bool) -> torch.Tensor:
    """``dot(q, k) * scale`` per (query, key), masked keys (causal, bool False, float mask -inf) at -inf;
    a float mask is added.  GQA: kv head ``h // (Hq / Hk)`` serves query head ``h``."""
    hq, hk = q.shape[1], k.shape[1]
    if hq != hk:
        k = k.repeat_interleave(hq // hk, dim=1)
    sc = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    lg = seq_dot(q, k.transpose(-1, -2)) * f32(sc)
    if is_causal:
        lq, lk = lg.shape[-2], lg.shape[-1]
        keep = torch.ones(lq, lk, dtype=torch.bool).tril()
        lg = torch.where(keep, lg, f32(-math.inf))
    if mask is not None:
        if mask.dtype == torch.bool:
            lg = torch.where(mask, lg, f32(-math.inf))
        else:
            lg = lg + mask.to(F32)
    return lg


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
          is_causal: bool, scale: float | None, enable_gqa: bool) -> torch.Tensor:
    p = _softmax_rows(attention_logits(q, k, mask, is_causal, scale, enable_gqa))
    if v.shape[1] != q.shape[1]:
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return seq_dot(p, v)


def qlinear_segments(k: int, group_size: int, clusters: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """``(k0, length, cluster, group)`` of each K-segment with constant activation cluster and weight group."""
    cuts = {0, k, *clusters}
    if group_size != -1:
        cuts.update(range(0, k, group_size))
    bounds = list(clusters) or [k]
    c = sorted(cuts)
    out = []
    for a, b in zip(c[:-1], c[1:], strict=True):
        cl = next(i for i, e in enumerate(bounds) if a < e)
        out.append((a, b - a, cl, 0 if group_size == -1 else a // group_size))
    return out


def _quant_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                  *rest: torch.Tensor, w_bits: int, group_size: int, w_symmetric: bool, a_bits: int | None,
                  act_clusters: tuple[int, ...], has_bias: bool, act_dynamic: bool = False) -> torch.Tensor:
    if a_bits is None or a_bits == 16:
        raise NotImplementedError("the integer model has no weight-only quant_linear (float activations); "
                                  "quantize activations too (a_bits 4..8)")
    if act_dynamic:
        raise NotImplementedError("the integer model has no dynamic (per-token) activation ranges; quantize with "
                                  "static ranges")
    rest_l = list(rest)
    bias = rest_l.pop(0) if has_bias else None
    act_scale, act_zero = rest_l
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).to(F32)
    qa = Q.quantize_act(x2, act_scale, act_zero, a_bits, act_clusters).to(torch.float64)  # [M, K] exact ints
    q = Q.unpack_weight(qweight, w_bits, k).to(torch.float64)  # [N, K]
    n = q.shape[0]
    y = torch.zeros(x2.shape[0], n, dtype=F32) if bias is None else bias.to(F32).expand(x2.shape[0], n).clone()
    for k0, ln, c, g in qlinear_segments(k, group_size, act_clusters):
        za = float(act_zero[c])
        zw = w_zero[:, g].to(torch.float64)
        # products fit float64 exactly (|qa|, |q| < 2^9, K < 2^20): the integer sum, computed exactly
        acc = (qa[:, k0:k0 + ln] - za) @ (q[:, k0:k0 + ln] - zw[:, None]).T
        alpha = act_scale[c].to(F32) * w_scale[:, g].to(F32)
        y = y + alpha * acc.to(torch.int64).to(torch.int32).to(F32)
    return y.reshape(*lead, n).to(x.dtype)


def _div(a: torch.Tensor, b: torch.Tensor | None = None, *, scalar: float | None, reverse: bool) -> torch.Tensor:
    if scalar is not None:
        s = f32(float(scalar))
        return fdiv(s, a) if reverse else fdiv(a, s)
    assert b is not None
    return fdiv(a, b)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    return fsqrt(x)


EXACT_OPS: dict[str, Callable[..., Any]] = {
    "div": _div,
    "sqrt": _sqrt,
    "quant_linear": _quant_linear,
    "linear": _linear,
    "matmul": _matmul,
    "layer_norm": _layer_norm,
    "rms_norm": _rms_norm,
    "softmax": _softmax,
    "scaled_dot_product_attention": _sdpa,
    "exp": _exp,
    "erf": _erf,
    "tanh": _tanh,
    "sigmoid": _sigmoid,
    "silu": _silu,
    "gelu": _gelu,
}
"""Ops whose integer-model implementation differs from the IR reference (fixed order, polynomials)."""

DATA_OPS = frozenset({
    "reshape", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice", "concat", "gather", "index",
    "index_select", "channel_permute", "embedding", "arange", "full", "cast", "add", "sub", "mul", "neg",
    "abs", "relu", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
    "logical_not", "where", "masked_fill", "rotary_embedding", "triu", "tril",
})
"""Ops whose IR reference is already exact (data movement, one IEEE rounding per element)."""


def unsupported_ops(module: Any) -> dict[str, list[str]]:
    """Ops of ``module`` without an integer-model definition: op -> scopes where it occurs."""
    out: dict[str, list[str]] = {}
    for n in module.nodes:
        if n.op == "param" or n.op in EXACT_OPS or n.op in DATA_OPS:
            continue
        if n.op == "pow" and n.attrs.get("scalar") in (1.0, 2.0, 3.0) and not n.attrs.get("reverse"):
            continue
        out.setdefault(n.op, []).append(n.scope or "<root>")
    return out


def interpret_exact(module: Any, inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Run ``module``'s integer model with ctc's reference interpreter (see the module doc)."""
    from ctc.ir.interpreter import interpret

    return interpret(module, inputs, refs=EXACT_OPS)
