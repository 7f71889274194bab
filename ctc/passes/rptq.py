"""``rptq``: reorder-based post-training quantization (Yuan et al. 2023, "RPTQ").

Method, per quantized activation (the operand 0 value ``X`` read by one or more linears):

1. From the calibration statistics, take each channel's (min, max) over all calibration
   tokens and cluster those 2-D points with k-means (k-means++ initialisation from a seeded
   ``torch.Generator``, Lloyd iterations, clusters ordered by centroid so results are
   deterministic) into ``clusters`` groups.
2. Reorder the channels so each cluster is contiguous (a stable sort by cluster), and give
   every contiguous segment one asymmetric (scale, zero point) from the min/max of its
   channels: the ``act_clusters`` / ``act_scale`` / ``act_zero`` of ``quant_linear``.
3. Fold the reorder into the graph as IR rewrites, chosen per activation (first that applies):

   * **producer rows** — ``X`` is computed from linears through channel-wise elementwise
     ops only (MLP hidden: ``fc1 -> gelu``; SwiGLU ``silu(gate) * up``): permute those
     linears' output rows and biases.  Zero run-time cost.
   * **attention heads** — ``X`` is the attention output (heads merged back by shape ops)
     feeding the out-projection: attention never mixes head-dim channels, so permuting the
     ``v`` projection's output rows *within each kv head* permutes ``X`` the same way in every
     query head of its group (q and k are untouched).  The reorder is therefore per kv head:
     channels are clustered on the per-(kv head, channel) range (merged over the query heads
     that share it), sorted within each head, and every run of equal cluster inside a head is
     one activation segment (up to ``heads x clusters`` segments).  Zero run-time cost in
     the reorder, but every segment costs the integer kernel an epilogue step: when the head
     layout gives more than ``max_segments`` segments, the explicit route below is taken
     instead (global clusters, one gather), which measured faster on MiniLM (22-47 segments
     made the out-projection 4.7x slower per call than a 4-segment projection of its shape).
   * **norm** — ``X`` is a ``layer_norm``/``rms_norm`` output read only by linears: the norm is
     permutation-equivariant, so its weight and bias are permuted and a ``channel_permute`` is
     put on the norm's *input* (a gather a backend fuses into the norm's load, as RPTQ's fused
     LayerNorm kernel writes reordered outputs).  Permuting weight and bias alone would *not*
     reorder the normalised values.
   * **explicit** — otherwise (e.g. BERT's post-LN output, which is also the residual stream
     read by an ``add``): a ``channel_permute`` of ``X`` feeds only the linears; other readers
     keep reading ``X`` unpermuted.  Reported in the notes; one gather per token row.

   Every consumer of a permuted value must absorb it; the linears reading ``X`` absorb it by
   permuting their input columns.  :func:`check_fold_complete` proves this on the networkx
   view of the rewritten module and raises if any reader of a permuted value was missed.
   ``check_fold`` also compares the folded float module with the original on one
   calibration batch before quantizing.
4. Weights per output channel (``group_size=-1``) or per group, in the permuted column
   order, by round-to-nearest or GPTQ (Frantar et al. 2022): Cholesky of the damped inverse
   Hessian ``H = X^T X / n`` (in the permuted order), columns quantized left to right in
   blocks of 128 with the error fed back to the remaining columns.

Defaults (what a recipe gets without naming the option; measured on held-out text in
benchmarks/results/quant_defaults.md):

* ``gptq``, ``group_size``, ``sym`` unset: at ``w_bits <= 4`` GPTQ, asymmetric, groups of 32
  input channels (llama.cpp's block size; SmolLM2-135M W4A8: per-channel RTN +98% perplexity,
  per-channel GPTQ +84%, GPTQ groups of 128 +40%, GPTQ asymmetric groups of 32 +17%); above 4
  bits RTN, symmetric, per output channel (8-bit weights cost ~0.2%).
* ``clusters`` unset: ``"auto"`` at ``w_bits <= 4``, 8 above.  With groups of 32 input channels the reorder
  decides which channels share a *weight* group as well as an activation range, and which of the two
  matters more depends on the model: for each activation (each group of activations whose readers share
  tied weights) the pass plans every count in ``auto_clusters`` (default 1 and 8), quantizes the readers'
  weights in that order as it then does (GPTQ/RTN, groups, zero points), quantizes ``clip_rows`` sampled
  calibration rows as the kernel will (static segments or per token), and keeps the count whose readers'
  outputs ``x W^T`` are reproduced with the least squared error.  One cluster means no reorder at all
  (no gather, nothing folded).  The pass report lists the choice per kind of activation with each
  candidate's mean relative error; ``metrics["rptq_cluster_choice"]`` has it per activation.  Why: on
  SmolLM2-135M, whose float weights were de-quantized from a Q4_1 GGUF, a group of 32 in the original
  order *is* a Q4_1 block and 8 clusters mix blocks (W4A8 float zero points: +16.3% perplexity with 8
  clusters, +0.6% with 1); on weights that were never 4-bit the reorder's activation gain can win.
* ``w_zero="auto"``: asymmetric weights get f32 zero points (each group's grid spans its own min..max, GGUF
  Q4_1's form) where activation ranges are per token at run time (the integer kernel adds the float
  minimum in its epilogue), integer zero points with static ranges, whose kernels need them.  A min..max
  grid is never coarser than one stretched to hold 0.  SmolLM2-135M W4A8 with ``clusters="auto"``: +15.6%
  perplexity with integer zero points, +2.6% with float ones (benchmarks/results/quant_defaults.md).
* ``a_mode="auto"``: per-token dynamic ranges (per cluster, in the kernel) for causal LMs and
  their decode steps, static calibrated ranges for everything else.  A decoder's attention-sink
  tokens reach activations thousands of times the others in a few channels (SmolLM2-135M,
  block 11's down_proj input at position 0: 3315 against a median token maximum of 1.4), so one static
  range per cluster spends most of the 8-bit grid on them; an encoder has no such tokens.
* ``a_clip="minmax"``: the ``mse`` clipping search is an option, not the default, because on
  SmolLM2 it clips exactly those rare sink-token values and measured worse (+5.0% vs +3.5%).

``kv_bits < 16`` fake-quantizes attention k/v (per head-dim channel; per tensor for ``v``
values whose channel order was changed per head).  Linears outside the repeated blocks
stay float (``blocks_only``), as in the paper's evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import networkx as nx
import torch

from ctc.ir import quant as Q
from ctc.ir.graph import Module, Node, Value, param_name, param_tensor
from ctc.ir.interpreter import interpret
from ctc.ir.nxview import to_digraph
from ctc.ir.ops.compress_attention import sparse_attention
from ctc.ir.rewrite import Rewriter
from ctc.options import option
from ctc.passes.analyses.calibration import CalibrationStats, ChannelStats
from ctc.passes.base import Pass, PassContext, PassError, PassOptions, register_pass
from ctc.passes.quantize import (
    build_quant_linear,
    clipped_segment_qparams,
    insert_kv_quant,
    kv_operands,
    kv_stats,
    segment_qparams,
    selected_linears,
)
from ctc.passes.shared_weights import OncePerKey, linked_groups, merged_range, perm_key
from ctc.tasks import TASK_CAUSAL_LM, TASK_DECODE_STEP

__all__ = ["FoldPlan", "RptqOptions", "RptqPass", "check_fold_complete", "gptq_quantize", "kmeans_1d_labels",
           "kmeans"]

# Ops that act on each channel independently (same channel in, same channel out).
UNARY_CHANNELWISE = frozenset({"gelu", "silu", "relu", "tanh", "sigmoid", "erf", "neg", "abs", "exp", "cast"})
BINARY_CHANNELWISE = frozenset({"add", "sub", "mul", "div", "maximum", "minimum"})
SHAPE_OPS = frozenset({"reshape", "transpose", "permute"})
REPEAT_OPS = frozenset({"reshape", "transpose", "permute", "expand", "unsqueeze"})
NORM_OPS = frozenset({"layer_norm", "rms_norm"})
ATTN_OPS = frozenset({"scaled_dot_product_attention"})



def _dense_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                            **attrs: object) -> torch.Tensor:
    """``sparse_attention`` with its filtering rounds removed: the dense attention it approximates."""
    return sparse_attention(q, k, v, mask, **{**attrs, "round_bits": (), "keep_ratios": (), "alphas": ()})


# The fold check compares float outputs before and after the reorder.  A reorder changes float summation
# order in the absorbing linears (last-bit differences), and an op whose output jumps on such differences
# (sparse attention's low-bit key selection) would turn them into large, meaningless errors: the check runs
# such ops as the continuous computation they filter, which a correct fold leaves unchanged to rounding.
FOLD_CHECK_REFS = {"sparse_attention": _dense_sparse_attention}


# --------------------------------------------------------------------------- k-means
def kmeans(points: torch.Tensor, k: int, *, seed: int = 0, iters: int = 100) -> torch.Tensor:
    """Deterministic k-means on ``points [n, d]``: k-means++ init (seeded), Lloyd iterations.

    Returns integer labels ``[n]`` in ``0..k'-1`` (``k' <= k``: empty clusters are dropped),
    clusters numbered by ascending centroid (lexicographic on the coordinates).
    """
    n = points.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    k = max(1, min(k, n))
    x = points.to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    centers = [x[int(torch.randint(n, (1,), generator=g))]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centers)).amin(1) ** 2
        total = float(d2.sum())
        if total <= 0:
            break
        idx = int(torch.multinomial(d2 / total, 1, generator=g))
        centers.append(x[idx])
    c = torch.stack(centers)
    labels = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        new_c = torch.stack([x[labels == j].mean(0) if bool((labels == j).any()) else c[j] for j in range(len(c))])
        new_labels = torch.cdist(x, new_c).argmin(1)
        c = new_c
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    used = sorted(set(labels.tolist()), key=lambda j: tuple(c[j].tolist()))
    remap = {j: i for i, j in enumerate(used)}
    return torch.tensor([remap[int(v)] for v in labels], dtype=torch.int64)


def kmeans_1d_labels(lo: torch.Tensor, hi: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Cluster labels of channels from their (min, max) points (the RPTQ clustering)."""
    return kmeans(torch.stack([lo.to(torch.float64), hi.to(torch.float64)], 1), k, seed=seed)


def runs(labels: torch.Tensor) -> list[int]:
    """Cumulative end boundaries of the runs of equal consecutive labels."""
    ends = [i for i in range(1, len(labels)) if int(labels[i]) != int(labels[i - 1])]
    return [*ends, len(labels)]


# --------------------------------------------------------------------------- GPTQ
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  *, percdamp: float = 0.01, blocksize: int = 128, float_zero: bool = False) -> Q.QuantizedWeight:
    """GPTQ (Frantar et al. 2022) of ``w [N, K]`` given ``H = X^T X / n [K, K]`` in w's column order.

    Dead input channels (zero Hessian diagonal) get weight 0; the Hessian is damped by
    ``percdamp`` of its mean diagonal; the upper Cholesky factor of ``H^-1`` drives the
    column-by-column error feedback.  Scales are per output row (``group_size=-1``, from the
    whole row) or per group (from the error-updated weights when the group starts).
    ``float_zero`` (asymmetric): each group's grid spans its own min..max with an f32 zero point
    (:func:`ctc.ir.quant.quantize_weight`'s ``float_zero``, GGUF Q4_1's form).
    """
    wf = w.detach().to(torch.float64).clone()
    n, k = wf.shape
    h = hessian.to(torch.float64).clone()
    if h.shape != (k, k):
        raise PassError(f"gptq: Hessian {tuple(h.shape)} does not match weight {tuple(w.shape)}")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    wf[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(h))
    h += damp * torch.eye(k, dtype=torch.float64)
    eye = torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_solve(eye, torch.linalg.cholesky(h)), upper=True).to(torch.float32)
    wf = wf.to(torch.float32)  # the error-feedback loop runs in fp32, as in the reference GPTQ
    lo_q, hi_q = Q.qrange(bits, True)
    g = Q.num_groups(k, group_size)
    scales = torch.ones(n, g, dtype=torch.float32)
    zeros = torch.zeros(n, g, dtype=torch.float32)

    def params(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ref = Q.quantize_weight(block.to(torch.float32), bits, -1, symmetric, float_zero=float_zero)
        return ref.scale[:, 0], ref.zero[:, 0].to(torch.float32)

    if group_size == -1:
        scales[:, 0], zeros[:, 0] = params(wf)
    q_int = torch.zeros(n, k, dtype=torch.float32)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = wf[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_size != -1 and col % group_size == 0:
                gi = col // group_size
                blk = torch.cat([w1[:, i:], wf[:, i2:]], 1)[:, :group_size]
                scales[:, gi], zeros[:, gi] = params(blk)
            gi = 0 if group_size == -1 else col // group_size
            s, z = scales[:, gi], zeros[:, gi]
            wc = w1[:, i]
            q = torch.clamp(torch.round(wc / s + z), lo_q, hi_q)  # = round(wc / s) + z for integer z
            q_int[:, col] = q
            dq = (q - z) * s
            e = (wc - dq) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        wf[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    qi = q_int.to(torch.int8)
    qweight = Q.pack_int4(qi) if bits <= 4 else qi
    return Q.QuantizedWeight(qweight, scales.to(torch.float32), zeros if float_zero else zeros.to(torch.int8), bits,
                             group_size, symmetric, k)


# --------------------------------------------------------------------------- fold planning
@dataclass
class FoldPlan:
    """How one activation value is reordered and which nodes absorb the reorder.

    ``perm[i]`` is the original channel now at position ``i``; ``bounds`` the activation
    segment end boundaries in the permuted order; ``route`` one of producer / attention /
    norm / explicit; ``row_perms`` maps producer linears (by id) to their output-row
    permutation; ``region`` the nodes whose outputs carry the permutation (through which it
    flows to the absorbers); ``absorbers`` the linears reading ``x`` as operand 0.
    """

    x: Value
    perm: torch.Tensor
    bounds: list[int]
    route: str
    absorbers: list[Node]
    row_perms: dict[int, tuple[Node, torch.Tensor]] = field(default_factory=dict)
    region: list[Node] = field(default_factory=list)
    per_head_v: Value | None = None
    reason: str = ""
    clusters: int = 0
    note: str = ""

    @property
    def identity(self) -> bool:
        """The reorder keeps every channel in place (one cluster): nothing to fold, no gather."""
        return bool(torch.equal(self.perm, torch.arange(len(self.perm))))


def _static_last(v: Value) -> int | None:
    d = v.type.shape[-1] if v.type.rank else None
    return d if isinstance(d, int) else None


def _is_param_linear(n: Node) -> bool:
    if n.op != "linear" or param_tensor(n.operand("weight")) is None:
        return False
    bias = n.operand("bias")
    return bias is None or param_tensor(bias) is not None


def _producer_region(x: Value, absorbers: list[Node]) -> tuple[list[Node], list[Node]] | None:
    """(source linears, region nodes) when ``x`` comes from linears through channel-wise ops only,
    and every value on the way is read only inside the region (or by the absorbers, for ``x``)."""
    c = _static_last(x)
    sources: list[Node] = []
    region: dict[int, Node] = {}
    work = [x]
    seen: set[int] = set()
    while work:
        v = work.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        p = v.producer
        if p is None or _static_last(v) != c or tuple(v.type.shape) != tuple(x.type.shape):
            return None
        region[id(p)] = p
        if _is_param_linear(p):
            sources.append(p)
        elif p.op in UNARY_CHANNELWISE or p.op in BINARY_CHANNELWISE:
            tensors = list(p.inputs)  # every tensor operand (a scalar-attribute operand is not one)
            if len(tensors) > 1 and any(tuple(a.type.shape) != tuple(x.type.shape) for a in tensors):
                return None  # broadcasting operand (a bias vector, a scalar tensor): not channel-wise here
            work.extend(tensors)
        else:
            return None
    absorb = {id(a) for a in absorbers}
    for node in region.values():
        for v in node.outputs:
            if node.module is not None and node.module.is_output(v):
                return None
            for u in v.users:
                if id(u) not in region and not (v is x and id(u) in absorb):
                    return None
    return sources, list(region.values())


def _attention_chain(x: Value, absorbers: list[Node]) -> tuple[Node, Node, list[Node], int, int, int] | None:
    """(attention node, v-projection linear, region nodes, heads, kv heads, head dim) when ``x`` is an
    attention output merged back by shape ops and ``v`` comes from a linear through shape/repeat ops."""
    region: list[Node] = []
    v = x
    while v.producer is not None and v.producer.op in SHAPE_OPS:
        region.append(v.producer)
        v = v.producer.operand("x")
    attn = v.producer
    if attn is None or attn.op not in ATTN_OPS or v.type.rank != 4:
        return None
    region.append(attn)
    q_t, v_t = attn.operand("q").type, attn.operand("v").type
    heads, dim = q_t.shape[-3], v_t.shape[-1]
    if not isinstance(heads, int) or not isinstance(dim, int) or heads * dim != _static_last(x):
        return None
    u = attn.operand("v")
    chain: list[Node] = []
    while u.producer is not None and u.producer.op in REPEAT_OPS:
        chain.append(u.producer)
        u = u.producer.operand("x")
    vproj = u.producer
    if vproj is None or not _is_param_linear(vproj):
        return None
    n_out = _static_last(u)
    if n_out is None or n_out % dim:
        return None
    kv_heads = n_out // dim
    if heads % kv_heads:
        return None
    region += chain + [vproj]
    # Every value on the way must flow only along the chain (the v operand into attention).
    ids = {id(n) for n in region}
    absorb = {id(a) for a in absorbers}
    for node in region:
        if node is attn:
            continue
        for o in node.outputs:
            if node.module is not None and node.module.is_output(o):
                return None
            for user in o.users:
                if id(user) not in ids and not (o is x and id(user) in absorb):
                    return None
                if user is attn and [k for k, w in attn.named_operands().items() if w is o] != ["v"]:
                    return None  # the permuted value also feeds q or k
    for o in attn.outputs:
        for user in o.users:
            if id(user) not in ids and not (o is x and id(user) in absorb):
                return None
    return attn, vproj, region, heads, kv_heads, dim


def _absorbers(x: Value) -> list[Node]:
    """The linears reading ``x`` as their activation with a parameter weight (they absorb its reorder)."""
    return [u for u in x.users if u.op == "linear" and u.operand("x") is x
            and param_tensor(u.operand("weight")) is not None
            and all(w is not x for k, w in u.named_operands().items() if k != "x")]


def _tied_groups(xs: dict[int, Value]) -> list[list[int]]:
    """The activations (keys of ``xs``) whose reorders must agree: those whose linears read weights other
    activations' linears read too (tied blocks), transitively; every other activation is a group of one."""
    touched: dict[int, list[str]] = {}
    for key, x in xs.items():
        # A weight whose input columns x's reorder permutes (an absorber), or whose output rows do (the
        # producer linears, the v projection): the same side of one weight must get the same order.
        absorbers = _absorbers(x)
        names = [f"columns of {param_name(a.operand('weight'))}" for a in absorbers]
        attn = _attention_chain(x, absorbers)
        if attn is not None:
            names.append(f"rows of {param_name(attn[1].operand('weight'))}")
        prod = _producer_region(x, absorbers)
        if prod is not None:
            names += [f"rows of {param_name(s.operand('weight'))}" for s in prod[0]]
        touched[key] = [n for n in names if not n.endswith(" of None")]
    return linked_groups(touched)


def _tied_ranges(xs: dict[int, Value], stats: dict[str, ChannelStats]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per activation, the (min, max) per channel its reorder is planned on: its own, or, for a tied group
    (:func:`_tied_groups`), the merged range of all of its activations, so they get one channel order and
    the tied weights stay one tensor."""
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for group in _tied_groups(xs):
        los, his = [], []
        for key in group:
            st = stats[xs[key].name]
            assert st.min is not None and st.max is not None
            los.append(st.min)
            his.append(st.max)
        lo, hi = merged_range(los, his)
        out.update({key: (lo, hi) for key in group})
    return out


def _weight_hessians(plans: Sequence[FoldPlan], lins: Sequence[Node], stats: dict[str, ChannelStats]
                     ) -> dict[str, torch.Tensor]:
    """``X^T X / n`` per (reordered) weight parameter over every activation its selected linears read, in the
    reordered channel order: a weight tied across blocks is quantized once, for all of its inputs."""
    acc: dict[str, tuple[torch.Tensor, int]] = {}
    chosen = {id(n) for n in lins}
    for pl in plans:
        st = stats[pl.x.name]
        if st.xtx is None:
            raise PassError(f"rptq: no X^T X for %{pl.x.name} (GPTQ needs the calibration Hessians)")
        xtx = st.xtx[pl.perm][:, pl.perm]
        for lin in pl.absorbers:
            name = param_name(lin.operand("weight")) if id(lin) in chosen else None
            if name is None:
                continue
            s, n = acc.get(name, (torch.zeros_like(xtx), 0))
            acc[name] = (s + xtx, n + st.rows)
    return {k: s / max(n, 1) for k, (s, n) in acc.items()}


def _rows_permuted(qw: Q.QuantizedWeight, rows: torch.Tensor) -> Q.QuantizedWeight:
    """``qw`` with its output rows reordered: every row is quantized on its own (RTN and GPTQ alike), so
    this is the quantization of the row-permuted weight."""
    return Q.QuantizedWeight(qw.qweight[rows].contiguous(), qw.scale[rows].contiguous(), qw.zero[rows].contiguous(),
                             qw.bits, qw.group_size, qw.symmetric, qw.k)


@dataclass
class ClusterChoice:
    """What ``clusters="auto"`` measured for one activation: the relative output error of its quantized
    readers per candidate cluster count, on sampled calibration rows, and the count chosen."""

    value: str
    readers: list[str]
    errors: dict[int, float]
    chosen: int

    def to_dict(self) -> dict[str, object]:
        return {"value": self.value, "readers": self.readers, "chosen": self.chosen,
                "rel_error": {str(k): v for k, v in self.errors.items()}}


def choice_summary(choices: Sequence[ClusterChoice]) -> list[str]:
    """One line per kind of activation (its readers' last scope names, e.g. ``q_proj/k_proj/v_proj``): how
    often each cluster count was chosen and each candidate's relative output error summed over the kind."""
    kinds: dict[str, list[ClusterChoice]] = {}
    for c in choices:
        kinds.setdefault("/".join(sorted({r.rsplit(".", 1)[-1] for r in c.readers})) or c.value, []).append(c)
    lines = []
    for kind, cs in kinds.items():
        counts: dict[int, int] = {}
        for c in cs:
            counts[c.chosen] = counts.get(c.chosen, 0) + 1
        errs = {k: sum(c.errors[k] for c in cs) / len(cs) for k in cs[0].errors}
        lines.append(f"{kind} input: " + ", ".join(f"{k} clusters x{n}" for k, n in sorted(counts.items()))
                     + " (mean relative output error " + ", ".join(f"{k}: {e:.3g}" for k, e in errs.items()) + ")")
    return lines


def check_fold_complete(module: Module, permuted: Sequence[Value], handled: Sequence[Node]) -> None:
    """Prove on the networkx view that every reader of a permuted value is handled.

    ``permuted``: values whose channel order changed; ``handled``: the nodes allowed to read
    them (absorbing linears, the permuted region's own nodes).  Any other reader, or a
    permuted value that is a module output, raises :class:`PassError` naming it.
    """
    g = to_digraph(module, include_io=True)
    ok = {id(n) for n in handled}
    for v in permuted:
        src = v.producer if v.producer is not None else ("input", v.name)
        if src not in g:
            raise PassError(f"rptq fold check: %{v.name} is not in module {module.name}")
        for _, dst, data in g.out_edges(src, data=True):
            if not any(o == v.index for o, _ in data["ports"]):
                continue
            if isinstance(dst, tuple):
                raise PassError(f"rptq fold check: permuted %{v.name} is module output {dst[1]!r}; "
                                "its channel order would change (fold incomplete)")
            if id(dst) not in ok:
                raise PassError(f"rptq fold check: %{v.name} (channels reordered) is read by {dst.op} at "
                                f"{dst.scope or '<root>'}, which does not absorb the permutation; "
                                "rewrite it or un-permute before it")
    _ = nx  # the view above is a networkx DiGraph


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class RptqOptions(PassOptions):
    """Options of the ``rptq`` pass."""

    w_bits: int = option(8, "weight bits (2..8); <= 4 packs two per byte", min=2, max=8)
    a_bits: int = option(8, "activation bits (4..8); 16 = float activations (weights only, reorder still folded)",
                         choices=(4, 5, 6, 7, 8, 16))
    kv_bits: int = option(16, "bits of attention k/v operands; 16 = float", choices=(2, 3, 4, 5, 6, 7, 8, 16))
    a_mode: str = option("auto", "activation ranges per cluster: static (calibrated), dynamic (per token and "
                                 "cluster, computed in the kernel at run time; the reorder is still calibrated) or "
                                 "auto (dynamic for causal LMs and their decode steps, static otherwise)",
                         choices=("auto", "static", "dynamic"))
    a_clip: str = option("minmax", "static activation range per cluster: minmax (calibration min..max) or mse (the "
                                   "shrunk range with the least quantization error on sampled calibration rows)",
                         choices=("minmax", "mse"))
    clip_rows: int = option(512, "calibration rows sampled per activation for a_clip=\"mse\" and for "
                                 "clusters=\"auto\"'s error measurement", min=16)
    clusters: int | str | None = option(None, "k-means clusters of activation channels (1 = per-tensor), or \"auto\": "
                                              "per activation, the count among auto_clusters whose quantized readers "
                                              "reproduce their float outputs best on calibration rows; unset: auto "
                                              "for w_bits <= 4, 8 above", min=1, max=1024)
    auto_clusters: list[int] = option([1, 8], "the cluster counts clusters=\"auto\" chooses among", min=1, max=1024)
    group_size: int | None = option(None, "input channels per weight scale group; -1 = per output channel; unset: "
                                          "32 for w_bits <= 4 (llama.cpp's block), -1 above", min=-1)
    gptq: bool | None = option(None, "GPTQ error compensation instead of round-to-nearest (needs X^T X); unset: on "
                                     "for w_bits <= 4 (where round-to-nearest loses most), off above")
    sym: bool | None = option(None, "symmetric weights (zero point 0); unset: asymmetric (a zero point per group, "
                                    "integer or f32 as w_zero says) for w_bits <= 4, symmetric above")
    w_zero: str = option("auto", "zero points of asymmetric weights: int (each group's range stretched to hold 0), "
                                 "float (each group's own min..max, GGUF Q4_1's grid; needs dynamic or float "
                                 "activations: the integer kernel applies the float minimum in its epilogue) or auto "
                                 "(float where activation ranges are per token at run time, int elsewhere)",
                         choices=("auto", "int", "float"))
    fold_only: bool = option(False, "only reorder and fold (no quantization): for checking exactness")
    check_fold: bool = option(True, "compare the folded float module with the original on one calibration batch")
    blocks_only: bool = option(True, "quantize only linears inside repeated blocks (without block info: all "
                                     "but the linears producing module outputs)")
    lm_head: bool = option(False, "also quantize the head (the linear producing the logits; a tied LM head gets its "
                                  "own integer copy, the embedding stays float)")
    damp: float = option(0.01, "GPTQ dampening, fraction of the mean Hessian diagonal", min=0.0, max=1.0)
    max_segments: int = option(16, "most activation segments the head-wise attention fold may produce; above "
                                   "it the attention output is reordered by an explicit gather with global "
                                   "clusters (fewer segments: faster integer kernels)", min=1)

    @property
    def cluster_candidates(self) -> tuple[int, ...]:
        """The cluster counts to try (one: no choice): as set, else the ``auto_clusters`` at 4 bits or fewer,
        where weight groups of 32 make the reorder matter to the weights too, and 8 above."""
        if isinstance(self.clusters, int):
            return (self.clusters,)
        if self.clusters == "auto" or (self.clusters is None and self.w_bits <= 4 and not self.fold_only):
            return tuple(sorted(set(self.auto_clusters)))
        return (8,)

    @property
    def groups(self) -> int:
        """Input channels per weight scale group (-1: per output channel): as set, else 32 at 4 bits or fewer."""
        if self.group_size is not None:
            return self.group_size
        return 32 if self.w_bits <= 4 else -1

    @property
    def symmetric(self) -> bool:
        """Symmetric weights: as set, else above 4 bits only."""
        return self.w_bits > 4 if self.sym is None else self.sym

    @property
    def use_gptq(self) -> bool:
        """Whether weights are rounded by GPTQ: as set, else for 4 bits or fewer (never when only folding)."""
        if self.fold_only:
            return False
        return self.w_bits <= 4 if self.gptq is None else self.gptq

    def dynamic_for(self, module: Module) -> bool:
        """Whether activation ranges are per token at run time: as set, else (``auto``) for decoder LMs, whose
        attention-sink tokens reach activations thousands of times the rest (one static range per cluster
        then spends the 8-bit grid on them: +3.55% perplexity on SmolLM2-135M, against +0.49% per token;
        benchmarks/results/quant_defaults.md), static for encoders (no such tokens; no run-time range pass)."""
        if self.a_mode != "auto":
            return self.a_mode == "dynamic"
        return module.meta.get("task") in (TASK_CAUSAL_LM, TASK_DECODE_STEP)

    def validate(self) -> None:
        if isinstance(self.clusters, str) and self.clusters != "auto":
            raise PassError(f"option clusters={self.clusters!r}: give a count (1..1024) or \"auto\"")
        if not self.auto_clusters:
            raise PassError("option auto_clusters=[]: list at least one cluster count, e.g. [1, 8]")
        if self.clusters == "auto" and self.fold_only:
            raise PassError("options clusters=\"auto\" and fold_only=true contradict each other: the automatic choice "
                            "compares quantization errors and fold_only quantizes nothing; give a count")
        if self.group_size == 0:
            raise PassError("option group_size=0: use -1 (per output channel) or a positive size")
        if self.w_zero == "float" and self.sym is True:
            raise PassError("options w_zero=\"float\" and sym=true contradict each other: a symmetric grid has no "
                            "zero point; drop sym or set sym=false")
        if self.w_zero == "float" and self.a_mode == "static" and self.a_bits != 16:
            raise PassError("option w_zero=\"float\" needs run-time activation ranges (a_mode=\"dynamic\" or "
                            "\"auto\" on a decoder) or a_bits=16: static-range integer kernels take integer zero "
                            "points only")
        if self.fold_only and self.gptq is True:
            raise PassError("options fold_only=true and gptq=true contradict each other: fold_only quantizes "
                            "nothing, so there is no rounding for GPTQ to compensate; drop one of them")


# --------------------------------------------------------------------------- the pass
@register_pass
class RptqPass(Pass):
    """RPTQ: cluster activation channels by range, reorder (folded into neighbours), quantize per cluster.

    See the module docstring for the method, the four fold routes and the choices made.
    """

    name = "rptq"
    Options = RptqOptions
    requires = (CalibrationStats,)
    needs_calibration = True

    # ----------------------------------------------------------------- planning
    def _plan(self, module: Module, lins: list[Node], stats: dict[str, ChannelStats], clusters: int, seed: int
              ) -> list[FoldPlan]:
        """One :class:`FoldPlan` per activation read by ``lins``, with ``clusters`` k-means clusters each."""
        o: RptqOptions = self.options  # type: ignore[assignment]
        by_x: dict[int, list[Node]] = {}
        xs: dict[int, Value] = {}
        for lin in lins:
            x = lin.operand("x")
            by_x.setdefault(id(x), []).append(lin)
            xs[id(x)] = x
        plans = []
        ranges = _tied_ranges(xs, stats)
        for key in by_x:
            x = xs[key]
            # Every linear reading x as its activation absorbs the reorder (even unselected ones).
            absorbers = _absorbers(x)
            lo, hi = ranges[key]  # shared by every activation whose linears read a tied weight: one order
            note = ""
            attn = _attention_chain(x, absorbers)
            if attn is not None:
                a_node, vproj, region, heads, kvh, dim = attn
                grp = heads // kvh
                lo_h = lo.reshape(kvh, grp, dim).amin(1)
                hi_h = hi.reshape(kvh, grp, dim).amax(1)
                labels = kmeans_1d_labels(lo_h.reshape(-1), hi_h.reshape(-1), clusters, seed).reshape(kvh, dim)
                sig = [torch.sort(labels[j], stable=True).indices for j in range(kvh)]
                row = torch.cat([j * dim + sig[j] for j in range(kvh)])
                perm = torch.cat([h * dim + sig[h // grp] for h in range(heads)])
                plab = torch.cat([labels[h // grp][sig[h // grp]] for h in range(heads)])
                head_bounds = runs(plab)
                if len(head_bounds) <= o.max_segments:
                    plans.append(FoldPlan(x, perm, head_bounds, "attention", absorbers, {id(vproj): (vproj, row)},
                                          region, per_head_v=a_node.operand("v"), clusters=clusters))
                    continue
                note = (f"rptq: %{x.name}: the head-wise fold would give {len(head_bounds)} activation segments "
                        f"(> max_segments={o.max_segments}); reordered by an explicit gather instead")
            labels = kmeans_1d_labels(lo, hi, clusters, seed)
            perm = torch.sort(labels, stable=True).indices
            bounds = runs(labels[perm])
            prod = _producer_region(x, absorbers)
            if prod is not None:
                sources, region = prod
                plans.append(FoldPlan(x, perm, bounds, "producer", absorbers,
                                      {id(s): (s, perm) for s in sources}, region, clusters=clusters, note=note))
                continue
            p = x.producer
            if (p is not None and p.op in NORM_OPS and len(absorbers) == len(x.users)
                    and not module.is_output(x)
                    and all(param_tensor(w) is not None for k, w in p.named_operands().items() if k != "x")
                    and (p.op == "rms_norm" or p.attrs.get("normalized_ndim", 1) == 1)):
                plans.append(FoldPlan(x, perm, bounds, "norm", absorbers, region=[p], clusters=clusters, note=note))
                continue
            others = sorted({u.op for u in x.users if all(u is not a for a in absorbers)})
            plans.append(FoldPlan(x, perm, bounds, "explicit", absorbers,
                                  reason=f"%{x.name} is also read by {', '.join(others) or 'the module output'}"
                                  if others or module.is_output(x) else f"%{x.name} has no foldable producer "
                                  f"({p.op if p is not None else 'module input'})", clusters=clusters, note=note))
        return plans

    # ----------------------------------------------------------------- folding
    def _fold(self, rw: Rewriter, plans: list[FoldPlan]) -> list[Value]:
        """Apply the reorders as IR rewrites through ``rw``; returns the values whose channel order changed."""
        module = rw.module
        row: dict[int, tuple[Node, torch.Tensor]] = {}
        col: dict[int, tuple[Node, torch.Tensor]] = {}
        permuted: list[Value] = []
        checks: list[tuple[list[Value], list[Node]]] = []
        for pl in plans:
            if pl.identity:  # one cluster: the channels stay where they are, nothing reads a permuted value
                continue
            for k, (n, r) in pl.row_perms.items():
                if k in row:
                    raise PassError(f"rptq: {n.scope} would get two output-row permutations")
                row[k] = (n, r)
            for a in pl.absorbers:
                col[id(a)] = (a, pl.perm)
            if pl.route in ("producer", "attention"):
                vals = [v for n in pl.region for v in n.outputs]
                permuted += vals
                checks.append((vals, pl.absorbers + pl.region))
        # Linears: new float weights W[row][:, col], bias[row]; a weight several linears read (tied blocks),
        # reordered alike, becomes one new parameter they all read.
        once: OncePerKey[str] = OncePerKey()

        def reordered(v: Value, what: str, n: Node, r: torch.Tensor | None, c: torch.Tensor | None) -> Value:
            t = param_tensor(v)
            assert t is not None and v.producer is not None

            def register() -> str:
                u = t if r is None else t[r]
                u = u if c is None else u[:, c]
                return rw.add_param(f"{n.scope or 'linear'}.{what}_rptq", u.contiguous())

            name = once.get((v.producer.attrs["name"], perm_key(r), perm_key(c)), register)
            return rw.read_param(name, before=n)

        for key in set(row) | set(col):
            n = (row.get(key) or col[key])[0]
            r = row[key][1] if key in row else None
            c = col[key][1] if key in col else None
            rw.set_operand(n, "weight", reordered(n.operand("weight"), "weight", n, r, c))
            bias = n.operand("bias")
            if bias is not None and r is not None:
                rw.set_operand(n, "bias", reordered(bias, "bias", n, r, None))
        for pl in plans:
            if pl.identity:
                rw.note(f"rptq: %{pl.x.name} keeps its channel order ("
                        + ("one cluster" if len(pl.bounds) == 1 else "its clusters are already contiguous")
                        + "): nothing folded")
            elif pl.route == "norm":
                norm = pl.x.producer
                assert norm is not None
                with rw.at(norm):
                    for k, v in list(norm.named_operands().items()):
                        if k == "x":
                            continue
                        t = param_tensor(v)  # type: ignore[arg-type]
                        assert t is not None
                        permuted_t = t[pl.perm].contiguous()
                        rw.set_operand(norm, k, rw.new_param(f"{norm.scope or 'norm'}.{k}_rptq", permuted_t))
                    pv = rw.new_param(f"{norm.scope or 'norm'}.rptq_perm", pl.perm.to(torch.int64))
                    g = rw.create("channel_permute", {"x": norm.operand("x"), "perm": pv}, {"axis": -1})
                rw.set_operand(norm, "x", g.output)
                permuted.append(pl.x)
                checks.append(([pl.x], list(pl.absorbers)))
                rw.note(f"rptq: %{pl.x.name} reorder folded into {norm.op} {norm.scope} (weight/bias permuted, "
                        "input gather fused into the norm's load)")
            elif pl.route == "explicit":
                first = min(pl.absorbers, key=module.index_of)
                with rw.at(first):
                    pv = rw.new_param(f"{first.scope or 'x'}.rptq_perm", pl.perm.to(torch.int64))
                    g = rw.create("channel_permute", {"x": pl.x, "perm": pv}, {"axis": -1})
                for a in pl.absorbers:
                    rw.set_operand(a, "x", g.output)
                permuted.append(g.output)
                checks.append(([g.output], list(pl.absorbers)))
                rw.note(f"rptq: explicit channel_permute before {', '.join(a.scope for a in pl.absorbers)} "
                        f"({pl.reason})")
            else:
                srcs = ", ".join(n.scope for n, _ in pl.row_perms.values())
                rw.note(f"rptq: %{pl.x.name} reorder folded into output rows of {srcs} ({pl.route})")
        rw.finish()  # clean up and verify: the fold must leave a valid graph before it is checked
        for vals, handled in checks:
            check_fold_complete(module, vals, handled)
        return permuted

    # ----------------------------------------------------------------- quantization helpers
    def _quantize(self, w: torch.Tensor, hessian: torch.Tensor | None, float_zero: bool) -> Q.QuantizedWeight:
        """``w`` (columns in the reordered order) by GPTQ with ``hessian`` (same order) or round-to-nearest."""
        o: RptqOptions = self.options  # type: ignore[assignment]
        if o.use_gptq:
            assert hessian is not None
            return gptq_quantize(w, hessian, o.w_bits, o.groups, o.symmetric, percdamp=o.damp, float_zero=float_zero)
        return Q.quantize_weight(w, o.w_bits, o.groups, o.symmetric, float_zero=float_zero)

    def _static_act_qparams(self, st: ChannelStats, pl: FoldPlan, dyn: bool, clip: bool
                            ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Calibrated (scale, zero) per activation segment of ``pl`` (None when ranges are dynamic or float)."""
        o: RptqOptions = self.options  # type: ignore[assignment]
        if o.a_bits == 16 or dyn:
            return None, None
        assert st.min is not None and st.max is not None
        lo, hi = st.min[pl.perm], st.max[pl.perm]
        if clip:
            assert st.reservoir is not None
            return clipped_segment_qparams(st.reservoir[:, pl.perm], lo, hi, pl.bounds, o.a_bits)
        return segment_qparams(lo, hi, pl.bounds, o.a_bits)

    def _choose_clusters(self, module: Module, ctx: PassContext, lins: list[Node], stats: dict[str, ChannelStats],
                         candidates: tuple[int, ...], dyn: bool, clip: bool, float_zero: bool
                         ) -> tuple[list[FoldPlan], dict[str, Q.QuantizedWeight]]:
        """``clusters="auto"``: per activation (per tied group of them), the candidate cluster count whose
        quantized readers reproduce their float outputs best on the sampled calibration rows.

        For every candidate the activation is planned (k-means, reorder), its readers' weights are quantized
        in that column order exactly as the pass then quantizes them (GPTQ or RTN, groups, zero points), the
        sampled rows are quantized as the kernel quantizes them (static segment ranges or per token and
        segment), and the error is ``sum ||x W^T - Q(x) Q(W)^T||^2`` over the readers.  The reorder decides
        which channels share a weight group as well as an activation range, so neither side alone tells which
        count loses least.  Ties go to the fewer clusters (fewer segments, no gather).  Returns the chosen
        plans and the readers' quantized weights by original parameter name (rows not yet reordered).
        """
        o: RptqOptions = self.options  # type: ignore[assignment]
        per_k = {k: self._plan(module, lins, stats, k, ctx.seed) for k in candidates}
        base = per_k[candidates[0]]
        chosen_lins = {id(n) for n in lins}
        n_act = len(base)
        err = torch.zeros(len(candidates), n_act, dtype=torch.float64)
        ref = torch.zeros(n_act, dtype=torch.float64)
        qws: dict[tuple[str, int], Q.QuantizedWeight] = {}
        total, done = len(candidates) * n_act, 0
        for ci, k in enumerate(candidates):
            plans = per_k[k]
            hessians = _weight_hessians(plans, lins, stats) if o.use_gptq else {}
            for i, pl in enumerate(plans):
                if pl.x is not base[i].x:
                    raise PassError("rptq: clusters=auto planned the activations in different orders (internal)")
                st = stats[pl.x.name]
                if st.reservoir is None or st.reservoir.shape[0] == 0:
                    raise PassError(f"rptq: clusters=auto needs sampled calibration rows of %{pl.x.name}; none were "
                                    "collected (give the recipe calibration data, or a cluster count)")
                x = st.reservoir.to(torch.float64)
                xp = x[:, pl.perm]
                if o.a_bits == 16:
                    xq = xp
                elif dyn:
                    xq = Q.fake_quant_act_dynamic(xp, o.a_bits, pl.bounds).to(torch.float64)
                else:
                    scale, zero = self._static_act_qparams(st, pl, dyn, clip)
                    assert scale is not None and zero is not None
                    xq = Q.fake_quant_act(xp, scale, zero, o.a_bits, pl.bounds).to(torch.float64)
                for lin in pl.absorbers:
                    name = param_name(lin.operand("weight"))
                    w = param_tensor(lin.operand("weight"))
                    if id(lin) not in chosen_lins or name is None or w is None:
                        continue
                    key = (name, k)
                    if key not in qws:
                        qws[key] = self._quantize(w[:, pl.perm], hessians.get(name), float_zero)
                    qw = qws[key]
                    wq = Q.dequantize_weight(qw.qweight, qw.scale, qw.zero, qw.bits, qw.group_size, qw.k)
                    y = x @ w.to(torch.float64).T
                    err[ci, i] += float((y - xq @ wq.to(torch.float64).T).square().sum())
                    if ci == 0:
                        ref[i] += float(y.square().sum())
                done += 1
                ctx.report_progress("rptq clusters=auto", done, total)
        pick = [0] * n_act
        for group in _tied_groups({id(pl.x): pl.x for pl in base}):
            idx = [i for i, pl in enumerate(base) if id(pl.x) in group]
            pick_g = int(torch.argmin(err[:, idx].sum(1)))  # first minimum: the fewest clusters on a tie
            for i in idx:
                pick[i] = pick_g
        plans = [per_k[candidates[pick[i]]][i] for i in range(n_act)]
        choices = [ClusterChoice(pl.x.name, [a.scope for a in pl.absorbers if id(a) in chosen_lins],
                                 {k: float(err[ci, i] / max(float(ref[i]), 1e-300)) for ci, k in enumerate(candidates)},
                                 pl.clusters) for i, pl in enumerate(plans)]
        ctx.metrics["rptq_cluster_choice"] = [c.to_dict() for c in choices]
        acts = "float" if o.a_bits == 16 else "dynamic" if dyn else "static"
        what = f"{'GPTQ' if o.use_gptq else 'RTN'} weights, {acts}"
        ctx.note(f"rptq: clusters=auto over {list(candidates)}, by the readers' output error on up to {o.clip_rows} "
                 f"sampled calibration rows per activation ({what} activations):")
        for line in choice_summary(choices):
            ctx.note(f"rptq:   {line}")
        prequant = {name: qw for (name, k), qw in qws.items()
                    if any(pl.clusters == k and any(param_name(a.operand("weight")) == name for a in pl.absorbers)
                           for pl in plans)}
        return plans, prequant

    # ----------------------------------------------------------------- run
    def run(self, module: Module, ctx: PassContext) -> Module:
        o: RptqOptions = self.options  # type: ignore[assignment]
        lins = selected_linears(module, ctx, o.blocks_only, o.lm_head)
        if not lins:
            ctx.note("rptq: no linear selected")
            return module
        dyn = o.a_bits != 16 and o.dynamic_for(module)
        float_zero = not o.symmetric and (o.w_zero == "float" or (o.w_zero == "auto" and dyn))
        if float_zero and o.a_bits != 16 and not dyn:
            raise PassError("rptq: w_zero=\"float\" needs run-time activation ranges, but a_mode=\"auto\" chose "
                            "static ranges for this (non-decoder) module: set a_mode=\"dynamic\" or w_zero=\"int\"")
        clip = o.a_clip == "mse" and o.a_bits != 16 and not dyn and not o.fold_only
        candidates = o.cluster_candidates
        sample = clip or len(candidates) > 1
        calib = ctx.get(CalibrationStats(hessian=o.use_gptq, **({"reservoir": o.clip_rows} if sample else {})), module)
        stats = dict(calib.stats)
        kv = kv_stats(module, ctx) if o.kv_bits != 16 and not o.fold_only and kv_operands(module) else None
        kv_st = dict(kv.stats) if kv is not None else {}
        reference = None
        if o.check_fold and ctx.calibration:
            reference = (ctx.calibration[0], interpret(module, ctx.calibration[0], refs=FOLD_CHECK_REFS))
        orig_names = {id(lin): param_name(lin.operand("weight")) for lin in lins}
        prequant: dict[str, Q.QuantizedWeight] = {}
        if len(candidates) > 1:
            plans, prequant = self._choose_clusters(module, ctx, lins, stats, candidates, dyn, clip, float_zero)
        else:
            plans = self._plan(module, lins, stats, candidates[0], ctx.seed)
        for pl in plans:
            if pl.note:
                ctx.note(pl.note)
        rw = ctx.rewriter(module)
        self._fold(rw, plans)
        row_of = {id(n): r for pl in plans if not pl.identity for n, r in pl.row_perms.values()}
        if reference is not None:
            got = interpret(module, reference[0], refs=FOLD_CHECK_REFS)
            for a, b in zip(got, reference[1], strict=True):
                if a.is_floating_point():
                    err = float((a.double() - b.double()).abs().max())
                    # the reorder permutes summation order: a few ulps of the output's own precision (bf16: 2^-7)
                    rel = max(1e-4, 4 * torch.finfo(b.dtype).eps)
                    tol = rel * max(1.0, float(b.double().abs().max()))
                    if err > tol:
                        raise PassError(f"rptq: folding the reorder changed the float outputs (max error {err:.3g} "
                                        f"> {tol:.3g}); a fold route mis-handled a layout")
        routes: dict[str, int] = {}
        for pl in plans:
            routes[pl.route] = routes.get(pl.route, 0) + 1
        ctx.metrics.update({"rptq_routes": routes, "explicit_permutes": routes.get("explicit", 0)})
        if o.fold_only:
            ctx.note(f"rptq: fold only; {len(plans)} activations reordered ({routes})")
            return module
        a_q = o.a_bits != 16
        per_tensor_v: set[int] = set()
        missing = any(orig_names[id(lin)] not in prequant for lin in lins)
        hessians = _weight_hessians(plans, lins, stats) if o.use_gptq and missing else {}
        qws: OncePerKey[Q.QuantizedWeight] = OncePerKey()
        once: OncePerKey[tuple[str, str, str]] = OncePerKey()  # a tied weight is quantized and stored once
        for done, pl in enumerate(plans):
            if pl.per_head_v is not None and not pl.identity:
                per_tensor_v.add(id(pl.per_head_v))
            scale, zero = self._static_act_qparams(stats[pl.x.name], pl, dyn, clip)
            for lin in pl.absorbers:
                if lin not in lins:
                    continue
                w = param_tensor(lin.operand("weight"))
                bias = lin.operand("bias")
                b = param_tensor(bias) if bias is not None else None
                name = param_name(lin.operand("weight"))
                assert w is not None and name is not None

                def quantized(w: torch.Tensor = w, name: str = name, lin: Node = lin) -> Q.QuantizedWeight:
                    pre = prequant.get(orig_names[id(lin)] or "")
                    if pre is not None:  # quantized while choosing the cluster count, before the row reorder
                        r = row_of.get(id(lin))
                        return pre if r is None else _rows_permuted(pre, r)
                    # GPTQ: the Hessian of every activation the (maybe tied) weight reads, in its order
                    return self._quantize(w, hessians.get(name), float_zero)

                qw = qws.get(name, quantized)
                bounds = pl.bounds if len(pl.bounds) > 1 else []
                build_quant_linear(rw, lin, w, b, qw, o.a_bits if a_q else None, scale, zero, bounds, once=once,
                                   dynamic=dyn)
            ctx.report_progress("rptq", done + 1, len(plans))
        n_kv = insert_kv_quant(rw, kv_st, o.kv_bits, frozenset(per_tensor_v)) if kv is not None else 0
        rw.cleanup()
        if once.hits:
            rw.note(f"rptq: {len(once)} weight(s) read by several linears (tied blocks) reordered, quantized and "
                    "stored once each")
        segs = [len(pl.bounds) for pl in plans]
        ranges = "" if not a_q else " dynamic" if dyn else f" static ({o.a_clip})"
        fz = " float-zero" if float_zero else ""
        wq = f"{'GPTQ' if o.use_gptq else 'RTN'} {'sym' if o.symmetric else 'asym'}{fz} " + (
            "per channel" if o.groups == -1 else f"groups of {o.groups}")
        counts = sorted({pl.clusters for pl in plans})
        cl = f"clusters={counts[0]}" if len(counts) == 1 and len(candidates) == 1 else (
            f"clusters=auto (chosen {'/'.join(map(str, counts))} of {'/'.join(map(str, candidates))})")
        ctx.note(f"rptq: W{o.w_bits}A{o.a_bits}{ranges} {cl} {wq}; "
                 f"{sum(len(p.absorbers) for p in plans)} linears; routes {routes}; activation segments "
                 f"{min(segs)}..{max(segs)}" + (f"; {n_kv} k/v operands at {o.kv_bits} bits" if n_kv else ""))
        return module
