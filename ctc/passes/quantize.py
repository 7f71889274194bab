"""``quantize``: min-max round-to-nearest quantization baselines (per-tensor / per-channel / per-group).

Every selected ``linear`` becomes a ``quant_linear`` with real packed integer weights
(int8, or int4 two per byte), weight scales per tensor, per output channel or per group of
input channels, and activation quantization (asymmetric unsigned, min-max over the
calibration set) per tensor or per input channel.  Optionally the ``k`` and ``v`` operands
of every attention get a ``quantize``/``dequantize`` pair (``kv_bits``), the IR form of a
quantized KV cache.

Why a separate baseline pass: RPTQ (``rptq``) is only worth its reordering if it beats
these, and one recipe can compare them.  The helpers here (weight quantizers, the
``linear`` -> ``quant_linear`` rewrite, KV fake-quant insertion) are shared with ``rptq``.

Choices (documented because they change numbers):

* Only linears inside the repeated blocks (``node.block is not None``) are quantized by
  default (``blocks_only``): embeddings, pooler/classifier heads and a tied LM head stay
  float, as in the RPTQ/GPTQ/SmoothQuant evaluations.  A module without block information
  (captured on the fx fallback path) quantizes every linear except those whose result is a
  module output (the head), and says so in the notes.
* Per-channel activation scales are an accuracy reference: an integer GEMM cannot
  accumulate across input channels that have different scales, so it has no fast kernel.
* Activation ranges are the min/max over all calibration tokens (no clipping search).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ctc.ir import quant as Q
from ctc.ir.graph import Module, Node, Value, param_name, param_tensor
from ctc.ir.rewrite import Rewriter
from ctc.options import option
from ctc.passes.analyses.calibration import CalibrationResult, CalibrationStats, ChannelStats
from ctc.passes.base import Pass, PassContext, PassError, PassOptions, register_pass
from ctc.passes.shared_weights import OncePerKey

__all__ = ["QuantizeOptions", "QuantizePass", "build_quant_linear", "clipped_segment_qparams", "insert_kv_quant",
           "kv_operands", "mse_clipped_range", "quantize_weight_rtn", "segment_qparams", "segment_ranges",
           "selected_linears"]

ATTN_OPS = ("scaled_dot_product_attention",)


# --------------------------------------------------------------------------- weight quantizers
def quantize_weight_rtn(w: torch.Tensor, bits: int, granularity: str, group_size: int,
                        symmetric: bool, float_zero: bool = False) -> Q.QuantizedWeight:
    """Round-to-nearest min-max weight quantization in the :mod:`ctc.ir.quant` storage form.

    ``granularity``: ``tensor`` (one scale for the matrix, replicated per row so the
    ``quant_linear`` operand shapes stay ``[N, 1]``), ``channel`` (per output row) or
    ``group`` (per ``group_size`` input channels of each row).  ``float_zero``: f32 zero points
    over each row's/group's own min..max (``Q.quantize_weight``; channel or group only).
    """
    if granularity == "channel":
        return Q.quantize_weight(w, bits, -1, symmetric, float_zero)
    if granularity == "group":
        return Q.quantize_weight(w, bits, group_size, symmetric, float_zero)
    if granularity != "tensor":
        raise PassError(f"weight granularity {granularity!r} must be tensor, channel or group")
    wf = w.detach().to(torch.float32)
    n, k = wf.shape
    lo_q, hi_q = Q.qrange(bits, True)
    if symmetric:
        s = wf.abs().max() / hi_q
        s = s if s > 0 else torch.tensor(1.0)
        z = torch.zeros((), dtype=torch.float32)
    else:
        lo, hi = wf.min().clamp(max=0), wf.max().clamp(min=0)
        s = (hi - lo) / ((1 << bits) - 1)
        s = s if s > 0 else torch.tensor(1.0)
        z = torch.round(-lo / s).clamp(0, (1 << bits) - 1) - (1 << (bits - 1))
    q = torch.clamp(torch.round(wf / s) + z, lo_q, hi_q).to(torch.int8)
    qweight = Q.pack_int4(q) if bits <= 4 else q
    scale = torch.full((n, 1), float(s), dtype=torch.float32)
    zero = torch.full((n, 1), int(z), dtype=torch.int8)
    return Q.QuantizedWeight(qweight, scale, zero, bits, -1, symmetric, k)


# --------------------------------------------------------------------------- activation qparams
def segment_qparams(lo: torch.Tensor, hi: torch.Tensor, bounds: Sequence[int], bits: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One asymmetric (scale, zero) per contiguous channel segment from per-channel min/max.

    ``bounds`` are cumulative end boundaries (``()`` = one segment over all channels).
    """
    return Q.act_qparams(*segment_ranges(lo, hi, bounds), bits)


CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(29))  # range shrink factors searched by mse clipping: 1.0 .. 0.3


def mse_clipped_range(sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[a * lo, a * hi]`` (``a`` in :data:`CLIP_GRID`) whose ``bits``-bit asymmetric fake quantization of
    ``sample`` (calibration values of one segment) has the least squared error: range estimation by MSE
    (as in Banner et al. 2019 / the MSE observers of PTQ toolkits) instead of the outermost min/max, which
    spends the grid on values a handful of tokens reach.  Shrinking both ends keeps 0 representable."""
    x = sample.reshape(-1).to(torch.float32)
    if x.numel() == 0:
        return lo, hi
    best, best_err = 1.0, float("inf")
    for a in CLIP_GRID:
        s, z = Q.act_qparams(lo * a, hi * a, bits)
        q = torch.clamp(torch.round(x / s) + z, 0, (1 << bits) - 1)
        err = float(((q - z) * s - x).square().sum())
        if err < best_err:
            best, best_err = a, err
    return lo * best, hi * best


def segment_ranges(lo: torch.Tensor, hi: torch.Tensor, bounds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per contiguous channel segment (cumulative end ``bounds``; ``()`` = one), the min of ``lo`` / max of ``hi``."""
    k = int(lo.numel())
    ends = list(bounds) or [k]
    starts = [0, *ends[:-1]]
    seg_lo = torch.stack([lo[a:b].min() for a, b in zip(starts, ends, strict=True)])
    seg_hi = torch.stack([hi[a:b].max() for a, b in zip(starts, ends, strict=True)])
    return seg_lo.to(torch.float32), seg_hi.to(torch.float32)


def clipped_segment_qparams(sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bounds: Sequence[int],
                            bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`segment_qparams` with each segment's range chosen by :func:`mse_clipped_range` on ``sample``
    (``[rows, K]``, channels in the same order as ``lo``/``hi``)."""
    seg_lo, seg_hi = segment_ranges(lo, hi, bounds)
    ends = list(bounds) or [int(lo.numel())]
    starts = [0, *ends[:-1]]
    clipped = [mse_clipped_range(sample[:, a:b], seg_lo[i], seg_hi[i], bits)
               for i, (a, b) in enumerate(zip(starts, ends, strict=True))]
    return Q.act_qparams(torch.stack([c[0] for c in clipped]), torch.stack([c[1] for c in clipped]), bits)


# --------------------------------------------------------------------------- graph helpers
def selected_linears(module: Module, ctx: PassContext, blocks_only: bool, lm_head: bool = False) -> list[Node]:
    """``linear`` nodes to quantize: selected, with parameter weights (and bias), static in-features.
    ``lm_head`` adds the head (a linear whose result is a module output) to the blocks' linears."""
    out = []
    no_blocks = blocks_only and not module.blocks()
    if no_blocks:
        ctx.note("module has no block information (e.g. captured on the fx fallback path): quantizing every "
                 "linear except those whose result is a module output (LM/classifier heads)")
    for n in module.nodes:
        if n.op != "linear" or not ctx.selected(n):
            continue
        head = any(module.is_output(v) for v in n.outputs)
        if no_blocks:
            if head and not lm_head:
                continue
        elif blocks_only and n.block is None and not (lm_head and head):
            continue
        bias = n.operand("bias")
        if param_tensor(n.operand("weight")) is None or (bias is not None and param_tensor(bias) is None):
            ctx.note(f"{n.scope}: linear kept float (weight or bias is computed, not a parameter)")
            continue
        if not isinstance(n.operand("x").type.shape[-1], int):
            ctx.note(f"{n.scope}: linear kept float (dynamic input-channel count)")
            continue
        out.append(n)
    return out


def build_quant_linear(rw: Rewriter, lin: Node, w: torch.Tensor, bias: torch.Tensor | None,
                       qw: Q.QuantizedWeight, a_bits: int | None, act_scale: torch.Tensor | None,
                       act_zero: torch.Tensor | None, clusters: Sequence[int] = (), *,
                       once: OncePerKey[tuple[str, str, str]] | None = None, dynamic: bool = False) -> Node:
    """Replace ``lin`` (x, weight[, bias]) by a ``quant_linear`` reading its activation operand.

    ``w`` is only used for the shape check; ``bias`` is the (possibly permuted) float bias.
    With ``once``, linears reading one float weight parameter (tied blocks) read one set of
    integer weight, scale and zero-point parameters, registered by the first of them.
    The float weight and bias go at the rewriter's cleanup when nothing else reads them.
    """
    n, k = w.shape
    if qw.k != k:
        raise PassError(f"{lin.scope}: quantized weight has K={qw.k}, linear has {k}")
    base = lin.scope or "linear"

    def register() -> tuple[str, str, str]:
        return (rw.add_param(f"{base}.qweight", qw.qweight),
                rw.add_param(f"{base}.w_scale", qw.scale.to(torch.float32)),
                rw.add_param(f"{base}.w_zero", qw.zero if qw.zero.is_floating_point() else qw.zero.to(torch.int8)))

    wname = param_name(lin.operand("weight"))
    key = (wname, qw.bits, qw.group_size, qw.symmetric) if wname is not None else None
    names = once.get(key, register) if once is not None and key is not None else register()
    a_q = a_bits is not None and a_bits != 16
    with rw.at(lin):
        ops: dict[str, Value | None] = {
            "x": lin.operand("x"),
            "qweight": rw.read_param(names[0]),
            "w_scale": rw.read_param(names[1]),
            "w_zero": rw.read_param(names[2]),
            "bias": rw.new_param(f"{base}.qbias", bias.to(torch.float32)) if bias is not None else None,
        }
        if a_q and not dynamic:
            assert act_scale is not None and act_zero is not None
            ops["act_scale"] = rw.new_param(f"{base}.act_scale", act_scale.to(torch.float32))
            ops["act_zero"] = rw.new_param(f"{base}.act_zero", act_zero.to(torch.int32))
        attrs = {"w_bits": qw.bits, "group_size": qw.group_size, "w_symmetric": qw.symmetric,
                 "a_bits": a_bits if a_q else None, "act_clusters": tuple(int(c) for c in clusters) if a_q else (),
                 "has_bias": bias is not None, "act_dynamic": bool(dynamic and a_q)}
        q = rw.create("quant_linear", ops, attrs, names=[lin.output.name + "_q"])
    rw.replace(lin, q.output)
    return q


def kv_operands(module: Module) -> list[tuple[Node, str]]:
    """(attention node, operand name) of every ``k`` and ``v`` operand."""
    return [(n, name) for n in module.nodes if n.op in ATTN_OPS for name in ("k", "v")]


def kv_stats(module: Module, ctx: PassContext) -> CalibrationResult:
    """Per-head-dim-channel statistics of attention k/v operands."""
    return ctx.get(CalibrationStats(input_ops=ATTN_OPS, operands=("k", "v")), module)


def insert_kv_quant(rw: Rewriter, stats: dict[str, ChannelStats], bits: int,
                    per_tensor: frozenset[int] = frozenset()) -> int:
    """Fake-quantize every selected attention k/v operand (``quantize`` -> ``dequantize``) to ``bits``.

    Asymmetric unsigned, one (scale, zero) per head-dim channel (shared across heads and
    tokens), or per tensor for operands whose ``id(value)`` is in ``per_tensor`` (values
    whose channel order differs per head after a reorder).  A value read by several
    attentions is quantized once.  Returns the count inserted.
    """
    count = 0
    done: dict[int, Value] = {}
    for node, name in kv_operands(rw.module):
        v = node.operand(name)
        assert v is not None
        if id(v) in done:
            rw.set_operand(node, name, done[id(v)])
            continue
        if v.name not in stats or not rw.selected(node):
            continue
        s = stats[v.name]
        assert s.min is not None and s.max is not None
        lo, hi = s.min.to(torch.float32), s.max.to(torch.float32)
        axis: int | None = -1
        if id(v) in per_tensor:
            lo, hi, axis = lo.min(), hi.max(), None
        scale, zero = Q.act_qparams(lo, hi, bits)
        if axis is None:
            scale, zero = scale.reshape(1), zero.reshape(1)
        with rw.at(node):
            sp = rw.new_param(f"{node.scope or 'attn'}.{name}_scale", scale)
            zp = rw.new_param(f"{node.scope or 'attn'}.{name}_zero", zero.to(torch.int32))
            qa = {"bits": bits, "signed": False, "dtype": "u8" if bits <= 8 else "i32", "axis": axis,
                  "group_size": -1}
            q = rw.create("quantize", {"x": v, "scale": sp, "zero": zp}, qa)
            d = rw.create("dequantize", {"q": q.output, "scale": sp, "zero": zp},
                          {"dtype": v.type.dtype, "axis": axis, "group_size": -1})
        rw.set_operand(node, name, d.output)
        done[id(v)] = d.output
        count += 1
    return count


# --------------------------------------------------------------------------- the pass
@dataclass(frozen=True)
class QuantizeOptions(PassOptions):
    """Options of the ``quantize`` pass."""

    w_bits: int = option(8, "weight bits (2..8); <= 4 packs two per byte", min=2, max=8)
    a_bits: int = option(8, "activation bits (4..8), or 16 for float activations (weight-only)",
                         choices=(4, 5, 6, 7, 8, 16))
    kv_bits: int = option(16, "bits of attention k/v operands (quantize/dequantize pair); 16 = float",
                          choices=(2, 3, 4, 5, 6, 7, 8, 16))
    w_granularity: str = option("channel", "weight scales per tensor, per output channel or per group",
                                choices=("tensor", "channel", "group"))
    group_size: int = option(128, "input channels per weight group (w_granularity=group)", min=1)
    a_granularity: str = option("tensor", "activation scales per tensor or per input channel",
                                choices=("tensor", "channel"))
    a_mode: str = option("static", "activation ranges: static (calibrated), dynamic (per token, computed in the "
                                   "kernel at run time; a_granularity=tensor only) or block (per token and block of "
                                   "32 input channels at run time: llama.cpp's Q8_1 activation form)",
                         choices=("static", "dynamic", "block"))
    sym: bool = option(True, "symmetric weights (zero point 0); false = asymmetric min-max")
    w_zero: str = option("int", "zero points of asymmetric weights: int (range stretched to hold 0; what integer "
                                "kernels take) or float (each group's own min..max, GGUF Q4_1's grid; with a_bits=16 "
                                "or run-time activation ranges)",
                         choices=("int", "float"))
    blocks_only: bool = option(True, "quantize only linears inside repeated blocks (heads, embeddings stay float); "
                                     "without block info, all but the linears producing module outputs")
    lm_head: bool = option(False, "also quantize the head (the linear producing the logits: a tied LM head gets "
                                  "its own integer copy, the embedding stays float); its accuracy cost is the "
                                  "difference of the pass's fidelity with and without it")

    def validate(self) -> None:
        if self.w_zero == "float" and (self.sym or self.w_granularity == "tensor"
                                       or (self.a_bits != 16 and self.a_mode == "static")):
            raise PassError("option w_zero=\"float\" is for asymmetric weights per channel or group with float or "
                            "run-time activation ranges: set sym=false, w_granularity=\"channel\" or \"group\", "
                            "and a_bits=16 or a_mode=\"dynamic\"/\"block\"")
        if self.a_mode != "static" and self.a_granularity == "channel":
            raise PassError(f"option a_mode=\"{self.a_mode}\" computes its ranges per token at run time; it does "
                            "not combine with a_granularity=\"channel\" (use a_granularity=\"tensor\", or rptq's "
                            "clusters)")
        default = QuantizeOptions.__dataclass_fields__["group_size"].default
        if self.w_granularity != "group" and self.group_size != default:
            raise PassError(f"option group_size={self.group_size} applies only with w_granularity=\"group\"; "
                            "drop it or set w_granularity=\"group\"")


@register_pass
class QuantizePass(Pass):
    """Min-max RTN quantization of linears (per-tensor/channel/group weights, per-tensor/channel activations).

    Rewrites each selected ``linear`` into a ``quant_linear`` with packed integer weights
    and calibrated activation scale/zero points (see the module doc for the choices), and
    with ``kv_bits < 16`` fake-quantizes attention k/v.
    """

    name = "quantize"
    Options = QuantizeOptions
    requires = (CalibrationStats,)
    needs_calibration = True

    def calibration_needed(self) -> bool:
        """Static activation ranges and k/v ranges are calibrated; weight-only and dynamic modes need no data."""
        o: QuantizeOptions = self.options  # type: ignore[assignment]
        return (o.a_bits != 16 and o.a_mode == "static") or o.kv_bits != 16

    def run(self, module: Module, ctx: PassContext) -> Module:
        o: QuantizeOptions = self.options  # type: ignore[assignment]
        rw = ctx.rewriter(module)
        lins = selected_linears(module, ctx, o.blocks_only, o.lm_head)
        a_q = o.a_bits != 16
        calib = ctx.get(CalibrationStats(), module) if (a_q and lins and o.a_mode == "static") else None
        kv = kv_stats(module, ctx) if o.kv_bits != 16 and kv_operands(module) else None
        kv_st = dict(kv.stats) if kv is not None else {}
        qws: OncePerKey[Q.QuantizedWeight] = OncePerKey()
        once: OncePerKey[tuple[str, str, str]] = OncePerKey()  # a tied weight is quantized and stored once
        # Plan on the unmodified module (statistics are keyed by its value names; a linear reading
        # another linear's result would otherwise look up the replaced value), then rewrite.
        plans = []
        for lin in lins:
            w = param_tensor(lin.operand("weight"))
            bias = lin.operand("bias")
            b = param_tensor(bias) if bias is not None else None
            assert w is not None
            name = param_name(lin.operand("weight"))

            def rtn(w: torch.Tensor = w) -> Q.QuantizedWeight:
                return quantize_weight_rtn(w, o.w_bits, o.w_granularity, o.group_size, o.sym, o.w_zero == "float")

            qw = qws.get(name, rtn) if name is not None else rtn()
            scale = zero = None
            clusters: tuple[int, ...] = ()
            if a_q and o.a_mode == "dynamic":
                pass  # per-token ranges at run time: nothing to calibrate
            elif a_q and o.a_mode == "block":  # per token and block of 32 at run time
                clusters = Q.act_block_clusters(int(w.shape[1]))
            elif a_q:
                assert calib is not None
                st = calib.input_of(lin)
                assert st.min is not None and st.max is not None
                k = st.channels
                clusters = tuple(range(1, k + 1)) if o.a_granularity == "channel" else ()
                scale, zero = segment_qparams(st.min, st.max, clusters, o.a_bits)
            plans.append((lin, w, b, qw, scale, zero, clusters))
        for lin, w, b, qw, scale, zero, clusters in plans:
            build_quant_linear(rw, lin, w, b, qw, o.a_bits if a_q else None, scale, zero, clusters, once=once,
                               dynamic=o.a_mode != "static")
        n_kv = insert_kv_quant(rw, kv_st, o.kv_bits) if kv is not None else 0
        rw.cleanup()
        if once.hits:
            rw.note(f"quantize: {len(once)} weight(s) read by several linears (tied) quantized once each")
        rw.note(f"quantize: {len(lins)} linears -> quant_linear W{o.w_bits}A{o.a_bits} "
                f"(weights per {o.w_granularity}, activations "
                + (f"per token and block of {Q.ACT_BLOCK})" if o.a_mode == "block" else f"per {o.a_granularity})")
                + (f"; {n_kv} k/v operands fake-quantized to {o.kv_bits} bits" if n_kv else ""))
        ctx.metrics.update({"quantized_linears": len(lins), "kv_quantized": n_kv})
        return module
