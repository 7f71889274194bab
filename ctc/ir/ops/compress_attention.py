"""Attention compression ops (category ``compress``): Energon's multi-round filtered attention
(``sparse_attention``) and ACT's sink-calibrated attention (``calibrated_attention``).

Both take ``scaled_dot_product_attention``'s operands and attributes unchanged (a pass swaps
one for the other) and equal it when they filter or calibrate nothing.  Their reference
implementations below are the semantics the TVM kernels (``ctc.backends.tvm.sparse_attention``)
are tested against.  Rows whose every key is masked give 0, as torch's SDPA does.

Papers: Zhou et al., "Energon: Towards Efficient Acceleration of Transformers Using Dynamic
Sparse Attention" (TCAD 2022, arXiv 2110.09310): mix-precision multi-round filtering.  Yu et
al., "Unveiling and Harnessing Hidden Attention Sinks" (ICML 2024, arXiv 2406.15765): the
attention calibration technique (ACT).
"""

from __future__ import annotations

import math

import torch

from ctc.ir.ops.infer import expect_dim, expect_rank
from ctc.ir.ops.registry import Attr, OpError, register_op
from ctc.ir.symbolic import dims_equal
from ctc.ir.types import FLOAT_DTYPES, TensorType

CAT = "compress"

__all__ = ["GUARD_BITS", "SPARSE_BITS", "calibrate_rows", "lowbit_vectors", "masked_logits", "repeat_kv_heads",
           "score_error_bound", "sparse_keep"]

SPARSE_BITS = tuple(range(2, 9))  # scoring rounds run on int8 lanes: 2..8-bit symmetric values
BOUND_SLACK = 1e-5  # relative slack of the score error bound (covers fp32 summation-order differences)
GUARD_BITS = 8  # precision of the scores that decide which keys may still be a row's exact top-1


# =========================================================================== shared helpers
def _float(t: TensorType, what: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise OpError(f"{what} must be a float tensor, got {t}")


def _infer_attention(name: str, ins: list[TensorType], attrs: dict) -> TensorType:
    q, k, v = ins[:3]
    for t, w in ((q, "q"), (k, "k"), (v, "v")):
        _float(t, f"{name} {w}")
        expect_rank(t, 4, f"{name} {w} ([batch, heads, seq, dim])")
    expect_dim(q.shape[0], k.shape[0], f"{name} batch of q vs k")
    expect_dim(k.shape[2], v.shape[2], f"{name} key length of k vs v")
    expect_dim(q.shape[3], k.shape[3], f"{name} head dim of q vs k")
    expect_dim(k.shape[1], v.shape[1], f"{name} heads of k vs v")
    hq, hk = q.shape[1], k.shape[1]
    if not dims_equal(hq, hk):
        if not (isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0):
            raise OpError(f"{name}: query heads {hq} must equal or be a multiple of key/value heads {hk}")
        if not attrs["enable_gqa"]:
            raise OpError(f"{name}: {hq} query heads but {hk} key/value heads needs enable_gqa=true")
    if len(ins) > 3:
        m = ins[3]
        if m.rank > 4:
            raise OpError(f"{name} mask must broadcast to [batch, heads, q_len, k_len], got {m}")
        if m.dtype != "bool" and m.dtype not in FLOAT_DTYPES:
            raise OpError(f"{name} mask must be bool (true = allowed) or float (added to the logits), got {m}")
    return q.with_shape((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


def _check_heads(name: str, what: str, heads: tuple[int, ...], hq: object) -> None:
    for h in heads:
        if h < 0 or (isinstance(hq, int) and h >= hq):
            raise OpError(f"{name} {what}: head {h} out of range for {hq} query heads")
    if len(set(heads)) != len(heads):
        raise OpError(f"{name} {what} must not repeat, got {list(heads)}")


def repeat_kv_heads(t: torch.Tensor, hq: int) -> torch.Tensor:
    """``[B, Hkv, L, D]`` -> ``[B, hq, L, D]``: each kv head serves ``hq / Hkv`` consecutive query heads."""
    return t.repeat_interleave(hq // t.shape[1], dim=1) if t.shape[1] != hq else t


def masked_logits(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                  scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """``(logits, allowed, additive, scale)``: fp32 ``q k^T * scale (+ float mask)`` with disallowed
    keys at -inf, the allowed-key bool mask ``[B, H, Lq, Lk]``, the float mask (or None) and the scale.

    Allowed keys: all, restricted by ``is_causal`` (``j <= i``, top-left aligned) and ``mask``
    (bool: True = allowed; float: added to the logits, ``-inf`` = not allowed); k is repeated
    for grouped heads."""
    k = repeat_kv_heads(k, q.shape[1])
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (q.to(torch.float32) @ k.to(torch.float32).transpose(-1, -2)) * sc
    lq, lk = logits.shape[-2], logits.shape[-1]
    allowed = torch.ones(lq, lk, dtype=torch.bool)
    if is_causal:
        allowed = allowed.tril()
    add = None
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            add = mask.to(torch.float32)
            allowed = allowed & (add > -math.inf)
    allowed = allowed.expand(logits.shape)
    if add is not None:
        logits = logits + add
    return logits.masked_fill(~allowed, -math.inf), allowed, add, sc


def _softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Row softmax; a row with no finite logit (every key masked) gives zeros, as torch's SDPA."""
    p = torch.softmax(logits, dim=-1)
    return torch.where(torch.isfinite(logits).any(-1, keepdim=True), p, torch.zeros_like(p))


def lowbit_vectors(t: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-vector quantization along the last dim: ``(ints, scale)`` with
    ``ints = clamp(round(t / s), -h, h)`` (fp32 holding integers, round half to even),
    ``h = 2^(bits-1) - 1`` and ``s = max|t| / h`` per vector (1 for an all-zero vector), so
    ``t ≈ ints * s``.  2-bit values are ternary ``{-1, 0, 1}``."""
    if bits not in SPARSE_BITS:
        raise ValueError(f"lowbit_vectors: bits={bits} must be one of {list(SPARSE_BITS)}")
    h = float((1 << (bits - 1)) - 1)
    t = t.to(torch.float32)
    s = t.abs().amax(dim=-1) / h
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.clamp(torch.round(t / s.unsqueeze(-1)), -h, h), s


def score_error_bound(q: torch.Tensor, qi: torch.Tensor, sq: torch.Tensor, k: torch.Tensor, ki: torch.Tensor,
                      sk: torch.Tensor, sc: float) -> torch.Tensor:
    """Per (query, key) bound ``e`` with ``|q·k - q̂·k̂| * sc <= e`` (``q̂ = qi * sq``, ``k̂ = ki * sk``):
    ``sc (|q - q̂| |k| + |q̂| |k - k̂| + slack |q| |k|)`` in Euclidean norms (Cauchy-Schwarz), the
    slack (1e-5) covering fp32 rounding of both scores."""
    qh, kh = qi * sq.unsqueeze(-1), ki * sk.unsqueeze(-1)
    dq, nqh, nq = (q - qh).norm(dim=-1), qh.norm(dim=-1), q.norm(dim=-1)
    dk, nk = (k - kh).norm(dim=-1), k.norm(dim=-1)
    return sc * (dq.unsqueeze(-1) * nk.unsqueeze(-2) + nqh.unsqueeze(-1) * dk.unsqueeze(-2)
                 + BOUND_SLACK * nq.unsqueeze(-1) * nk.unsqueeze(-2))


_ATTN_ATTRS = {
    "is_causal": Attr("bool", False, doc="query i sees keys j <= i (top-left aligned, as torch SDPA)"),
    "scale": Attr("opt_float", None, doc="logit scale; None = 1/sqrt(head_dim)"),
    "enable_gqa": Attr("bool", False, doc="k/v have fewer heads that groups of consecutive query heads share"),
}


# =========================================================================== sparse_attention
def _infer_sparse(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    out = _infer_attention("sparse_attention", ins, attrs)
    bits, sel = attrs["round_bits"], attrs["select"]
    ratios, alphas = attrs["keep_ratios"], attrs["alphas"]
    if any(b not in SPARSE_BITS for b in bits):
        raise OpError(f"sparse_attention round_bits must each be one of {list(SPARSE_BITS)}, got {list(bits)}")
    used, unused = (ratios, alphas) if sel == "topk" else (alphas, ratios)
    used_name, unused_name = ("keep_ratios", "alphas") if sel == "topk" else ("alphas", "keep_ratios")
    if len(used) != len(bits):
        raise OpError(f"sparse_attention: select={sel} needs one {used_name} entry per round: {len(bits)} "
                      f"round_bits but {len(used)} {used_name}")
    if unused:
        raise OpError(f"sparse_attention: {unused_name} is not used with select={sel}; leave it empty")
    if any(not 0.0 < r <= 1.0 for r in ratios):
        raise OpError(f"sparse_attention keep_ratios must lie in (0, 1], got {list(ratios)}")
    if any(b > a for a, b in zip(ratios, ratios[1:], strict=False)):
        raise OpError(f"sparse_attention keep_ratios must not grow from round to round, got {list(ratios)}")
    if any(not -1.0 <= a <= 1.0 for a in alphas):
        raise OpError(f"sparse_attention alphas must lie in [-1, 1], got {list(alphas)}")
    if attrs["min_keep"] < 1:
        raise OpError(f"sparse_attention min_keep must be >= 1, got {attrs['min_keep']}")
    _check_heads("sparse_attention", "dense_heads", attrs["dense_heads"], ins[0].shape[1])
    return [out]


@register_op(
    "sparse_attention",
    inputs=("q", "k", "v", "mask?"),
    infer=_infer_sparse,
    category=CAT,
    attrs={
        **_ATTN_ATTRS,
        "round_bits": Attr("ints", (), doc="bit width (2..8) of q and k in each filtering round, e.g. (4, 8)"),
        "select": Attr("str", "topk", doc="how a round filters: 'topk' (keep_ratios) or 'threshold' (Energon's "
                                          "mean/max threshold, alphas)", choices=("topk", "threshold")),
        "keep_ratios": Attr("floats", (), doc="topk: fraction of a query's allowed keys kept after each round"),
        "alphas": Attr("floats", (), doc="threshold: per-round factor in [-1, 1]; keep scores >= "
                                         "mean + alpha * (max - mean) of the row's candidates"),
        "min_keep": Attr("int", 1, doc="each round keeps at least this many candidates (by score)"),
        "dense_heads": Attr("ints", (), doc="query heads computed densely (no filtering)"),
    },
)
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
                     is_causal: bool, scale: float | None, enable_gqa: bool, round_bits: tuple[int, ...],
                     select: str, keep_ratios: tuple[float, ...], alphas: tuple[float, ...], min_keep: int,
                     dense_heads: tuple[int, ...]) -> torch.Tensor:
    """Energon mix-precision multi-round filtered attention; ``q [B, H, Lq, D]``, ``k, v [B, Hkv, Lk, *]``.

    Allowed keys are those of ``scaled_dot_product_attention`` with the same operands (causal
    and/or bool or additive float mask; here a mask and ``is_causal`` may be combined); with
    ``enable_gqa`` each kv head serves ``H / Hkv`` consecutive query heads.  Let ``n_i`` be the
    number of keys query ``i`` may see.  The candidates start as the allowed keys; each round
    ``r`` with ``b = round_bits[r]``:

    1. quantizes q and k per vector to ``b`` bits (:func:`lowbit_vectors`: ``qi, sq``, ``ki, sk``)
       and scores every candidate: ``s' = (f32(qi · ki) * (sq * scale)) * sk (+ float mask)``
       (the integer dot product is exact; multiplications in this order, in fp32);
    2. selects: ``topk`` keeps the candidates whose ``s'`` is at least the ``m``-th largest
       candidate score, ``m = min(#candidates, max(min_keep, ceil(keep_ratios[r] * n_i)))``
       (ties at the boundary all stay); ``threshold`` keeps ``s' >= mean + alpha_r (max - mean)``
       over the candidates (Energon's row threshold ``alpha max + (1 - alpha) mean``), plus the
       ``min_keep`` best;
    3. always keeps every candidate that may still be the row's exact top-1 key: with ``g`` the
       same scores at 8 bits (``GUARD_BITS``; the round's own when ``b = 8``) and ``e`` their
       error bound (:func:`score_error_bound`), those with ``g + e >= max_l (g_l - e_l)`` over the
       candidates.  So the key with the highest exact logit is never dropped.  (At 2 or 4 bits
       the bound is too loose to exclude much; hence the 8-bit guard.)

    Finally exact fp32 attention runs over the surviving keys only:
    ``softmax(q k^T * scale + mask, restricted to survivors) @ v``.  Heads in ``dense_heads``
    skip filtering.  No rounds, or keep ratios of 1, is ordinary scaled dot-product attention.
    """
    logits, allowed, add, sc = masked_logits(q, k, mask, is_causal, scale)
    alive = sparse_keep(q, k, allowed, add, sc, round_bits=round_bits, select=select, keep_ratios=keep_ratios,
                        alphas=alphas, min_keep=min_keep, dense_heads=dense_heads)
    probs = _softmax_rows(logits.masked_fill(~alive, -math.inf))
    return (probs @ repeat_kv_heads(v, q.shape[1]).to(torch.float32)).to(q.dtype)


def sparse_keep(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, add: torch.Tensor | None, sc: float, *,
                round_bits: tuple[int, ...], select: str, keep_ratios: tuple[float, ...], alphas: tuple[float, ...],
                min_keep: int, dense_heads: tuple[int, ...]) -> torch.Tensor:
    """The keys ``sparse_attention`` keeps: bool ``[B, H, Lq, Lk]`` (its rounds, see the op)."""
    alive = allowed.clone()
    n_allowed = allowed.sum(-1, keepdim=True)
    qf = q.to(torch.float32)
    kf = repeat_kv_heads(k, q.shape[1]).to(torch.float32)
    ninf = torch.tensor(-math.inf)
    params = keep_ratios if select == "topk" else alphas
    def scores(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        qi, sq = lowbit_vectors(qf, bits)
        ki, sk = lowbit_vectors(kf, bits)
        approx = ((qi @ ki.transpose(-1, -2)) * (sq * sc).unsqueeze(-1)) * sk.unsqueeze(-2)
        err = score_error_bound(qf, qi, sq, kf, ki, sk, sc)
        if add is not None:
            approx = approx + add
            err = err + 1e-6 * torch.where(torch.isfinite(add), add.abs(), torch.zeros_like(add))
        return approx, err

    for bits, p in zip(round_bits, params, strict=True):
        approx, _ = scores(bits)
        guard, err = scores(GUARD_BITS)
        cand = torch.where(alive, approx, ninf)
        n_alive = alive.sum(-1, keepdim=True)
        if select == "topk":
            m = torch.ceil(p * n_allowed.to(torch.float64) - 1e-9).to(torch.long).clamp(min=min_keep)
            chosen = torch.zeros_like(alive)
        else:
            m = torch.full_like(n_alive, min_keep)
            mean = torch.where(alive, approx, 0.0).sum(-1, keepdim=True) / n_alive.clamp(min=1)
            mx = cand.amax(-1, keepdim=True)
            chosen = cand >= mean + p * (mx - mean)
        m = torch.minimum(m, n_alive)
        ordered = cand.sort(dim=-1, descending=True).values
        kth = ordered.gather(-1, (m - 1).clamp(min=0))
        chosen = chosen | (cand >= kth)
        lower = torch.where(alive, guard - err, ninf).amax(-1, keepdim=True)
        protected = guard + err >= lower
        alive = alive & (chosen | protected)
    if dense_heads:
        alive[:, list(dense_heads)] = allowed[:, list(dense_heads)]
    return alive


# =========================================================================== calibrated_attention
def _infer_calibrated(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    out = _infer_attention("calibrated_attention", ins, attrs)
    if not 0.0 <= attrs["beta"] <= 1.0:
        raise OpError(f"calibrated_attention beta must lie in [0, 1], got {attrs['beta']}")
    if not attrs["threshold"] > 0.0:
        raise OpError(f"calibrated_attention threshold must be > 0 (a multiple of the uniform share 1/n), "
                      f"got {attrs['threshold']}")
    _check_heads("calibrated_attention", "heads", attrs["heads"], ins[0].shape[1])
    return [out]


def calibrate_rows(a: torch.Tensor, allowed: torch.Tensor, beta: float, threshold: float,
                   keep_first: bool, detect: str = "row") -> torch.Tensor:
    """ACT's calibration of attention rows ``a [..., Lq, Lk]`` (see ``calibrated_attention``)."""
    n = allowed.sum(-1, keepdim=True)
    if detect == "row":
        sink = allowed & (a > threshold / n.clamp(min=1))
    elif detect == "column":
        rel = torch.where(allowed, a * n, torch.zeros_like(a))  # attention over the query's uniform share
        seen = allowed.sum(-2, keepdim=True)
        sink = allowed & (rel.sum(-2, keepdim=True) > threshold * seen) & (seen > 0)
    else:
        raise ValueError(f"calibrate_rows: detect must be 'row' or 'column', got {detect!r}")
    if keep_first:
        first = torch.arange(a.shape[-1]) == allowed.to(torch.int8).argmax(-1, keepdim=True)
        sink = sink & ~first
    zero = torch.zeros_like(a)
    s = torch.where(sink, a, zero).sum(-1, keepdim=True)
    rest = torch.where(sink, zero, a).sum(-1, keepdim=True)  # summed, not 1 - s: exact when it is tiny
    ok = (s > 0) & (rest > 1e-12)
    gain = (s + rest - beta * s) / torch.where(ok, rest, torch.ones_like(rest))
    new = torch.where(sink, a * beta, a * gain)
    return torch.where(ok, new, a)


@register_op(
    "calibrated_attention",
    inputs=("q", "k", "v", "mask?"),
    infer=_infer_calibrated,
    category=CAT,
    attrs={
        **_ATTN_ATTRS,
        "heads": Attr("ints", (), doc="query heads whose attention is calibrated (others are plain attention)"),
        "beta": Attr("float", 0.4, doc="factor in [0, 1] on a detected sink's attention (ACT uses 0.4)"),
        "threshold": Attr("float", 5.0, doc="a key is a sink for a query when its attention exceeds threshold "
                                             "times the uniform share 1/n of that query's n allowed keys"),
        "keep_first": Attr("bool", True, doc="never treat a row's first allowed key as a sink (ACT keeps the "
                                             "initial token's attention)"),
        "detect": Attr("str", "row", doc="how sinks are found: 'column' (ACT's statistic: a key's attention "
                                         "relative to the uniform share, averaged over every query that sees it) "
                                         "or 'row' (each query's own attention)", choices=("row", "column")),
    },
)
def calibrated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
                         is_causal: bool, scale: float | None, enable_gqa: bool, heads: tuple[int, ...],
                         beta: float, threshold: float, keep_first: bool, detect: str) -> torch.Tensor:
    """Attention with ACT sink calibration (Yu et al. 2024), sinks detected on the fly.

    ``A = softmax(q k^T * scale + mask)`` exactly as scaled dot-product attention (masks and
    grouped heads as in ``sparse_attention``).  Then in each head of ``heads``, with ``n_i`` the
    number of keys query ``i`` may see, key ``j`` is a *sink* for query ``i`` (which may see it)
    when

    * ``detect="column"`` (ACT's statistic): the key's attention relative to the uniform share,
      averaged over every query that may see it, ``mean_i' A[i', j] n_i' > threshold``: a key
      that draws attention far above a uniform share from the queries *as a whole*.  (ACT's code
      compares the plain column mean with an absolute threshold; for ``n`` keys seen by all ``n``
      queries that is ``threshold / n``.)  The verdict is one per key, so a query's output
      depends on the other queries' attention, later ones included: not for causal decoding;
    * ``detect="row"``: the query's own attention, ``A[i, j] > threshold / n_i``.  Causal and
      fine for a one-query decode step, but it also fires on keys a single query attends
      sharply (a previous-token head's peak), which are no sinks;

    except the row's first allowed key when ``keep_first``.  With ``S_i`` the row's sink mass
    and ``R_i`` the rest (summed over the non-sink keys, ``1 - S_i`` up to rounding), sinks get
    ``beta * A[i, j]`` and every other key ``A[i, j] (S_i + R_i - beta S_i) / R_i``: the removed
    mass ``(1 - beta) S_i`` goes to the non-sink keys in proportion to their attention, so the
    row still sums to 1.  Masked keys keep weight 0; a row with no sink (or with nothing else
    left, ``R_i <= 1e-12``) is unchanged.  Output ``A' @ v``.
    """
    logits, allowed, _, _ = masked_logits(q, k, mask, is_causal, scale)
    a = _softmax_rows(logits)
    if heads and beta != 1.0:
        hs = list(heads)
        a = a.clone()
        a[:, hs] = calibrate_rows(a[:, hs], allowed[:, hs], beta, threshold, keep_first, detect)
    return (a @ repeat_kv_heads(v, q.shape[1]).to(torch.float32)).to(q.dtype)
