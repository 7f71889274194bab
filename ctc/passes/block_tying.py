"""Tying the weights of repeated blocks: what ``share-blocks`` and ``recursive`` have in common.

* :func:`tie_stack` lines up the parameters of the selected blocks (blocks must be identical
  in structure) and decides which are tied: matrices read only inside their block (``Slot.tie``);
  vectors (norm weights, biases) stay per block unless asked, since they cost almost nothing
  and carry much of what makes a layer itself (FoldGPT keeps and re-fits the norms).
* :class:`BlockActivations` (an analysis) runs the calibration batches once and keeps each
  selected block's residual input and the values blocks share (rotary tables, masks): enough
  to re-run any single block alone, with other weights, as often as planning needs.
* :func:`substitution_error` measures how well block ``i`` does with other weights on its own
  calibration inputs: the similarity that grouping and initialisation choices rest on.
* :func:`apply_ties` rewrites the graph for a plan: every member of a group reads one set of
  shared tensors (stored once), plus per-member channel coefficients (``mul``/``add`` after
  the linear) or a low-rank delta (``lowrank_linear`` added to the shared ``linear``).
* :func:`fit_coefficients` fits those coefficients in closed form, block after block and
  stage after stage inside a block, on the compressed model's own activations against the
  original's linear outputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ctc.ir.blocks import BlockInfo, BlockLayout, BlockLayoutError, block_layout
from ctc.ir.graph import Module, Node, Value
from ctc.ir.interpreter import bind_inputs, interpret
from ctc.ir.rewrite import Rewriter
from ctc.ir.types import torch_dtype
from ctc.passes.analyses.replay import consecutive_runs
from ctc.passes.base import Analysis, PassContext, PassError, Selector
from ctc.passes.weight_sharing import ChannelFit, lora_from_residual

__all__ = ["BlockActivations", "Group", "Slot", "Stack", "TieResult", "apply_ties", "block_module",
           "fit_coefficients", "input_grams", "lora_factors", "param_reads", "selected_blocks", "substitution_error",
           "tie_stack", "unique_counts"]

FLOAT = ("f32", "f16", "bf16", "f64")
# Ops whose float operands (scales, zero points) only mean something next to their integer weights.
QUANTIZED_OPS = frozenset({"quant_linear", "quantize", "dequantize"})


# --------------------------------------------------------------------------- the aligned stack
@dataclass
class Slot:
    """One parameter position of a block, the same in every selected block.

    ``index`` is the position among the block's ``param`` nodes (in module order); ``key`` the
    block-relative name (``self_attn.q_proj.weight``); ``tie`` whether it is shared;
    ``linear_weight`` whether every reader uses it as a ``linear``'s weight (then it can take
    coefficients or a low-rank delta).
    """

    index: int
    key: str
    shape: tuple[int, ...]
    dtype: str
    tie: bool
    linear_weight: bool

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n


@dataclass
class Stack:
    """The selected blocks of a module with their parameters lined up slot by slot."""

    module: Module
    layout: BlockLayout
    blocks: list[int]
    param_nodes: dict[int, list[Node]]
    slots: list[Slot]

    def name(self, block: int, slot: Slot) -> str:
        return str(self.param_nodes[block][slot.index].attrs["name"])

    def tensor(self, block: int, slot: Slot) -> torch.Tensor:
        return self.module.params[self.name(block, slot)]

    @property
    def tied(self) -> list[Slot]:
        return [s for s in self.slots if s.tie]

    def info(self, block: int) -> BlockInfo:
        return self.layout.by_index(block)

    def runs(self) -> list[list[int]]:
        """The selected blocks as runs of consecutive block numbers."""
        return consecutive_runs(self.blocks)


def selected_blocks(module: Module, selector: Selector) -> list[int] | None:
    """The block numbers a tying step's selector picks (what :func:`tie_stack` lines up), or None when the
    module has no block layout (tie_stack says why).  For the passes' ``check_module``."""
    try:
        return _picked(block_layout(module), selector)
    except BlockLayoutError:
        return None


def _picked(layout: BlockLayout, selector: Selector) -> list[int]:
    return [b.index for b in layout.blocks if selector.matches_block(b.index)]


def _signature(n: Node) -> tuple[Any, ...]:
    attrs = tuple(sorted((k, repr(v)) for k, v in n.attrs.items() if not (n.op == "param" and k == "name")))
    return (n.op, attrs, tuple(str(v.type) for v in n.outputs))


def _difference(x: list[Node], y: list[Node], k: int) -> str:
    """What differs at position ``k`` of two blocks' nodes: the ops, else the first differing attribute or type."""
    if k >= len(x) or k >= len(y):
        return f"{x[k].op if k < len(x) else 'end of block'} vs {y[k].op if k < len(y) else 'end of block'}"
    a, c = x[k], y[k]
    where = f"at {a.scope or '<root>'} vs {c.scope or '<root>'}"
    if a.op != c.op:
        return f"{a.op} {where} vs {c.op}"
    keys = [key for key in sorted(set(a.attrs) | set(c.attrs))
            if not (a.op == "param" and key == "name") and repr(a.attrs.get(key)) != repr(c.attrs.get(key))]
    return f"{a.op} {where}: " + (f"attribute {keys[0]} differs" if keys else "result types differ")


def _block_key(pn: Node, prefix: str | None, index: int) -> str:
    """A block-relative name for a slot: ``self_attn.q_proj.weight`` from ``model.layers.3.self_attn.q_proj.weight``
    (or from the reader's scope and the name's last part when an earlier pass renamed the parameter)."""
    name = str(pn.attrs["name"])
    head = f"{prefix}.{pn.block}." if prefix else None
    if head and name.startswith(head):
        return name[len(head):]
    if head and pn.scope.startswith(head):
        return f"{pn.scope[len(head):]}.{name.rsplit('.', 1)[-1]}"
    return f"param{index}"


def tie_stack(module: Module, ctx: PassContext, *, share_vectors: bool, what: str) -> Stack:
    """Line up the parameters of the blocks the step's selector picks; errors name the mismatch.

    A slot is tied when its tensor is float, a matrix (or any rank with ``share_vectors``), and
    read only inside its own block; a scope or op selector further restricts tying to the
    ``param`` nodes it selects.
    """
    try:
        layout = block_layout(module)
    except BlockLayoutError as e:
        raise PassError(f"{what}: {e}") from None
    blocks = _picked(layout, ctx.selector)
    if len(blocks) < 2:
        raise PassError(f"{what}: the selection holds {len(blocks)} block(s) of {len(layout)}; tying needs at "
                        "least two (widen the blocks[...] selector)")
    prefix = module.meta.get("block_prefix")
    param_nodes = {b: [n for n in layout.by_index(b).nodes if n.op == "param"] for b in blocks}
    first = blocks[0]
    sig0 = [_signature(n) for n in layout.by_index(first).nodes]
    for b in blocks[1:]:
        sig = [_signature(n) for n in layout.by_index(b).nodes]
        if sig != sig0:
            k = next((i for i, (a, c) in enumerate(zip(sig0, sig, strict=False)) if a != c), min(len(sig), len(sig0)))
            quantized = any(n.op in QUANTIZED_OPS for i in (first, b) for n in layout.by_index(i).nodes)
            raise PassError(f"{what}: blocks {first} and {b} differ in structure (node {k}: "
                            f"{_difference(layout.by_index(first).nodes, layout.by_index(b).nodes, k)}); only "
                            "identical blocks can share weights (" + ("tie before quantizing, or " if quantized else
                                                                     "run tying before passes that change blocks "
                                                                     "differently, or ")
                            + "select identical blocks with blocks[a:b])")
    selective = bool(ctx.selector.scopes or ctx.selector.ops)
    slots: list[Slot] = []
    for i, pn in enumerate(param_nodes[first]):
        t = module.params[pn.attrs["name"]]
        readers = [(u, u.operand_name(j)) for b in blocks for u, j in param_nodes[b][i].output.uses]
        inside = all(u.block == param_nodes[b][i].block for b in blocks for u in param_nodes[b][i].output.users)
        outputs = any(module.is_output(param_nodes[b][i].output) for b in blocks)
        dtype = pn.output.type.dtype
        lin = bool(readers) and all(u.op == "linear" and j == "weight" for u, j in readers)
        quantized = any(u.op in QUANTIZED_OPS for u, _ in readers)
        tie = (dtype in FLOAT and (t.dim() >= 2 or share_vectors) and inside and not outputs and not quantized
               and (not selective or all(ctx.selected(param_nodes[b][i]) for b in blocks)))
        slots.append(Slot(i, _block_key(pn, prefix, i), tuple(int(d) for d in t.shape), dtype, tie, lin))
    if not any(s.tie for s in slots):
        hint = ("; the blocks are quantized already: tie before quantizing (rptq/quantize then quantize each "
                "shared tensor once)" if any(n.op in QUANTIZED_OPS for n in layout.by_index(first).nodes) else "")
        raise PassError(f"{what}: no parameter of the selected blocks can be tied (tied: float matrices read only "
                        "inside their block" + (", selected by the step's scope/op selector" if selective else "")
                        + f"){hint}")
    return Stack(module, layout, blocks, param_nodes, slots)


# --------------------------------------------------------------------------- block sub-modules
def block_module(module: Module, info: BlockInfo) -> Module:
    """Block ``info`` alone as a module: inputs ``[residual_in, *shared]`` (their names kept), output
    its residual output; parameters are the module's own tensors (not copied)."""
    m = Module(f"{module.name}_block{info.index}")
    vmap: dict[int, Value] = {}
    for v in [info.residual_in, *info.shared]:
        if v.producer is not None and v.producer.op == "param":
            name = v.producer.attrs["name"]
            m.params.setdefault(name, module.params[name])
            vmap[id(v)] = m.param(name, scope=v.producer.scope, block=v.producer.block)
        else:
            nv = m.add_input(v.name, v.type)
            if nv.name != v.name:
                raise PassError(f"block {info.index}: input %{v.name} cannot keep its name")
            vmap[id(v)] = nv
    for n in info.nodes:
        if n.op == "param":
            name = n.attrs["name"]
            m.params.setdefault(name, module.params[name])
        new = m.create_node(n.op, [vmap[id(v)] for v in n.inputs], dict(n.attrs), scope=n.scope, block=n.block,
                            types=[v.type for v in n.outputs], names=[v.name for v in n.outputs])
        for a, b in zip(n.outputs, new.outputs, strict=True):
            vmap[id(a)] = b
    m.set_outputs([vmap[id(info.residual_out)]], ["residual_out"])
    return m


# --------------------------------------------------------------------------- calibration activations
@dataclass
class ActivationsResult:
    """Per calibration batch: each block's residual input, the last block's output, and the shared values."""

    inputs: dict[int, list[torch.Tensor]]
    last_output: list[torch.Tensor]
    shared: list[dict[str, torch.Tensor]]
    blocks: list[int]

    def output_of(self, block: int) -> list[torch.Tensor]:
        """The residual output of ``block`` (the next block's input)."""
        i = self.blocks.index(block)
        return self.last_output if i + 1 == len(self.blocks) else self.inputs[self.blocks[i + 1]]

    def feeds(self, info: BlockInfo, hidden: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Inputs of :func:`block_module` for ``info`` with residual inputs ``hidden`` (one per batch)."""
        out = []
        for k, h in enumerate(hidden):
            d = {info.residual_in.name: h}
            for v in info.shared:
                if not (v.producer is not None and v.producer.op == "param"):
                    d[v.name] = self.shared[k][v.name]
            out.append(d)
        return out


class BlockActivations(Analysis):
    """Residual inputs of every block (and the values blocks share) on the calibration batches.

    Config: ``max_batches`` (default all).  Memory: one hidden state per block per batch.
    """

    name = "block-activations"
    needs_calibration = True

    def __init__(self, max_batches: int | None = None):
        super().__init__(max_batches=max_batches)

    def compute(self, module: Module, ctx: PassContext) -> ActivationsResult:
        batches = list(ctx.calibration)
        if self.config["max_batches"] is not None:
            batches = batches[: int(self.config["max_batches"])]
        if not batches:
            raise PassError("block activations need calibration batches, and the pipeline has none "
                            "(add a `calibrate` line to the recipe)")
        try:
            layout = block_layout(module)
        except BlockLayoutError as e:
            raise PassError(str(e)) from None
        blocks = layout.indices()
        want: dict[int, Value] = {}
        for info in layout.blocks:
            want[id(info.residual_in)] = info.residual_in
            for v in info.shared:
                if not (v.producer is not None and v.producer.op == "param"):
                    want[id(v)] = v
        last = layout.blocks[-1].residual_out
        want[id(last)] = last
        by_producer: dict[int, list[Value]] = {}
        for v in want.values():
            if v.producer is not None:
                by_producer.setdefault(id(v.producer), []).append(v)
        res = ActivationsResult({b: [] for b in blocks}, [], [], blocks)
        for k, batch in enumerate(batches):
            seen: dict[str, torch.Tensor] = {}
            ordered, _ = bind_inputs(module, batch)
            for v, t in zip(module.inputs, ordered, strict=True):
                if id(v) in want:
                    seen[v.name] = t

            def observer(node: Node, args: list[torch.Tensor], outs: list[torch.Tensor],
                         seen: dict[str, torch.Tensor] = seen) -> None:
                for v in by_producer.get(id(node), ()):
                    seen[v.name] = outs[v.index]

            interpret(module, batch, observer=observer)
            for info in layout.blocks:
                res.inputs[info.index].append(seen[info.residual_in.name])
            res.last_output.append(seen[last.name])
            res.shared.append({v.name: seen[v.name] for v in want.values()})
            ctx.report_progress("block activations", k + 1, len(batches))
        return res


def run_block(sub: Module, feeds: Sequence[Mapping[str, torch.Tensor]], *,
              params: Mapping[str, torch.Tensor] | None = None, observer: Any = None) -> list[torch.Tensor]:
    """The block sub-module's output on each feed (``params`` overrides tensors by name)."""
    p = dict(sub.params)
    if params:
        p.update({k: v for k, v in params.items() if k in p})
    return [interpret(sub, f, params=p, observer=observer)[0] for f in feeds]


def substitution_error(stack: Stack, acts: ActivationsResult, block: int, tensors: Mapping[int, torch.Tensor],
                       *, batches: int | None = None, sub: Module | None = None) -> float:
    """Relative error of ``block``'s output when its tied slots hold ``tensors`` (slot index -> tensor).

    ``sum ||f'(h) - f(h)||^2 / sum ||f(h)||^2`` over the calibration batches, with ``h`` the block's
    original input: how far the residual stream moves, relative to its size (0 for its own weights).
    Relative to the stream, not to the block's own contribution: a block that adds little to the
    stream is cheap to share even when its weights are replaced badly (measured on SmolLM2: groups
    chosen this way keep perplexity 71 at ratio 0.8 where contribution-relative costs gave millions).
    """
    info = stack.info(block)
    sub = sub or block_module(stack.module, info)
    hs = acts.inputs[block][:batches]
    ref = acts.output_of(block)[:batches]
    override = {stack.name(block, s): tensors[s.index] for s in stack.tied if s.index in tensors}
    outs = run_block(sub, acts.feeds(info, hs), params=override)
    return _rel_error(outs, ref)


# --------------------------------------------------------------------------- the plan and its rewrite
@dataclass
class Group:
    """Blocks that read one set of tied tensors: ``members`` (consecutive), and where the shared
    tensors come from (``source`` block, or ``None`` = the members' mean)."""

    members: list[int]
    source: int | None
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)  # slot index -> shared tensor
    cost: float | None = None

    def describe(self) -> str:
        src = "mean" if self.source is None else f"block {self.source}"
        lo, hi = self.members[0], self.members[-1]
        return f"{lo}..{hi} <- {src}" if lo != hi else f"{lo} (alone)"


@dataclass
class Coefficient:
    """Where a member block's coefficients live: ``a`` is the shared linear's output (before the
    coefficients), ``target`` the original linear output's value name in the teacher module."""

    block: int
    linear: Node
    a: Value
    scale: str
    shift: str | None
    target: str


@dataclass
class TieResult:
    """What :func:`apply_ties` did: shared parameter names, coefficients to fit, LoRA pairs, notes."""

    shared: dict[str, list[int]] = field(default_factory=dict)  # shared param -> member blocks
    coefficients: list[Coefficient] = field(default_factory=list)
    lora: list[tuple[int, str, int]] = field(default_factory=list)  # (block, linear scope, rank)
    adapters: list[str] = field(default_factory=list)  # per-block parameters healing may train


def _group_name(stack: Stack, g: Group, kind: str) -> str:
    prefix = stack.module.meta.get("block_prefix") or "blocks"
    lo, hi = g.members[0], g.members[-1]
    return f"{prefix}.{kind}_{lo}_{hi}"


def lora_factors(stack: Stack, g: Group, rank: int,
                 grams: Mapping[tuple[int, int], torch.Tensor] | None = None
                 ) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """``(B, A)`` per (member block, tied linear slot) of group ``g``: the truncated SVD of the member's own
    weight minus the shared one (output-weighted by the slot's input Gram matrix when ``grams`` has it,
    see :func:`lora_from_residual`); members that already hold the shared weight get none."""
    out = {}
    for b in g.members:
        for s in stack.tied:
            w = stack.tensor(b, s)
            if s.linear_weight and not torch.equal(w, g.tensors[s.index]):
                gram = grams.get((b, s.index)) if grams is not None else None
                out[(b, s.index)] = lora_from_residual(w.to(torch.float32), g.tensors[s.index].to(torch.float32),
                                                       rank, input_gram=gram)
    return out


def input_grams(stack: Stack, acts: ActivationsResult, blocks: Iterable[int], *, batches: int | None = None
                ) -> dict[tuple[int, int], torch.Tensor]:
    """``E[x x^T]`` (float64) of the input of every tied linear of ``blocks`` on the original calibration stream,
    keyed like :func:`lora_factors`' result; linears reading one input share one matrix."""
    out: dict[tuple[int, int], torch.Tensor] = {}
    for b in blocks:
        info = stack.info(b)
        sub = block_module(stack.module, info)
        slot_of = {stack.name(b, s): s.index for s in stack.tied if s.linear_weight}
        x_of: dict[int, str] = {}
        for n in sub.nodes:
            w = n.operand("weight") if n.op == "linear" else None
            if w is not None and w.producer is not None and w.producer.op == "param" \
                    and w.producer.attrs["name"] in slot_of:
                x = n.operand("x")
                assert x is not None
                x_of[slot_of[w.producer.attrs["name"]]] = x.name
        seen = _observe(sub, acts.feeds(info, acts.inputs[b][:batches]), set(x_of.values()))
        grams: dict[str, torch.Tensor] = {}
        for name, ts in seen.items():
            rows = [t.reshape(-1, t.shape[-1]).to(torch.float64) for t in ts]
            grams[name] = sum(r.T @ r for r in rows) / max(sum(r.shape[0] for r in rows), 1)  # type: ignore[assignment]
        for slot, name in x_of.items():
            out[(b, slot)] = grams[name]
    return out


def apply_ties(stack: Stack, groups: Sequence[Group], rw: Rewriter, *, coefficients: str, lora_rank: int = 0,
               kind: str = "shared",
               lora: Mapping[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None) -> TieResult:
    """Rewrite ``stack.module`` through ``rw`` so each group's members read the group's tensors.

    The plan (groups, shared tensors, LoRA factors) is made on the unmodified module; this applies
    it.  ``coefficients``: ``"none"`` (plain tying), ``"channel"`` (per output channel scale after
    each tied linear; plus a per-channel shift where the linear has a bias, which it replaces).
    ``lora_rank > 0`` adds ``lowrank_linear(x, B, A)`` to each tied linear, initialised from the
    truncated SVD of (original weight - shared weight) (:func:`lora_factors`; pass ``lora`` to reuse
    factors already computed); members whose residual is zero get none.  Groups of one block are
    left alone.  The members' own matrices, now unread, go at the rewriter's cleanup (run here).
    """
    res = TieResult()
    for g in groups:
        if len(g.members) < 2:
            continue
        base = _group_name(stack, g, kind)
        names = {s.index: rw.add_param(f"{base}.{s.key}", g.tensors[s.index]) for s in stack.tied}
        for s in stack.tied:
            res.shared[names[s.index]] = list(g.members)
        factors = {} if lora_rank <= 0 else (lora if lora is not None else lora_factors(stack, g, lora_rank))
        for b in g.members:
            for s in stack.tied:
                pn = stack.param_nodes[b][s.index]
                readers = list(pn.output.users)
                new = rw.read_param(names[s.index], before=pn, scope=pn.scope, block=pn.block)
                rw.replace(pn, new)
                if not s.linear_weight:
                    continue
                for lin in readers:
                    coef = _relax_linear(rw, lin, b, coefficients == "channel", factors.get((b, s.index)))
                    if coef is not None:
                        res.coefficients.append(coef)
                        res.adapters += [c for c in (coef.scale, coef.shift) if c]
                    if (b, s.index) in factors:
                        res.lora.append((b, lin.scope, int(factors[(b, s.index)][0].shape[1])))
    rw.cleanup()
    m = stack.module
    # Adapters healing may train: coefficients, LoRA factors, and the members' own vectors (norms, biases).
    lora_names = [n.attrs["name"] for n in m.nodes if n.op == "param" and n.block is not None
                  and n.attrs["name"].endswith((".lora_u", ".lora_v"))]
    vectors = [stack.name(b, s) for g in groups if len(g.members) > 1 for b in g.members for s in stack.slots
               if not s.tie and s.dtype in FLOAT and stack.name(b, s) in m.params]
    res.adapters = sorted(set(res.adapters) | set(lora_names) | set(vectors))
    return res


def _relax_linear(rw: Rewriter, lin: Node, block: int, coefficients: bool,
                  lora: tuple[torch.Tensor, torch.Tensor] | None) -> Coefficient | None:
    """Replace a tied ``linear(x, W_shared[, b])`` by its relaxed form, as separate ops:

    * coefficients: ``linear(x, W_shared) * c [+ beta]`` (c = 1, beta = b until fitted);
    * LoRA: ``... + lowrank_linear(x, B, A)`` (the delta is never merged into a dense copy).
    """
    if not coefficients and lora is None:
        return None
    x, w, bias = lin.operand("x"), lin.operand("weight"), lin.operand("bias")
    assert x is not None and w is not None
    scope = lin.scope or "linear"
    wt = rw.param_tensor(w)
    dt = wt.dtype if wt is not None else torch.float32  # adapters in the model's dtype (bf16 models: a bf16 mul)
    with rw.at(lin):
        core = rw.create("linear", {"x": x, "weight": w, "bias": None if coefficients else bias})
        y = core.output
        coef = None
        if coefficients:
            n_out = int(w.type.shape[0])
            scale = rw.add_param(f"{scope}.coef", torch.ones(n_out, dtype=dt))
            y = rw.create("mul", {"a": y, "b": rw.read_param(scale)}).output
            shift = None
            if bias is not None:
                bt = rw.param_tensor(bias)
                if bt is None:
                    raise PassError(f"{lin.scope}: the bias is computed, not a parameter; coefficients need a "
                                    "parameter bias")
                shift = rw.add_param(f"{scope}.coef_shift", bt.detach().clone().to(dt))
                y = rw.create("add", {"a": y, "b": rw.read_param(shift)}).output
            coef = Coefficient(block, core, core.output, scale, shift, lin.output.name)
        if lora is not None:
            b, a = lora
            u, v = rw.new_param(f"{scope}.lora_u", b.to(dt)), rw.new_param(f"{scope}.lora_v", a.to(dt))
            delta = rw.create("lowrank_linear", {"x": x, "u": u, "v": v}, {"rank": int(b.shape[1])})
            y = rw.create("add", {"a": y, "b": delta.output}).output
    rw.replace(lin, y)
    return coef


# --------------------------------------------------------------------------- fitting the coefficients
def _stages(sub: Module, linears: Iterable[str]) -> dict[str, int]:
    """Stage of each named linear output inside a block: how many coefficient-carrying linears lie on the
    longest path from the block input to it (those of one stage can be fitted together)."""
    wanted = set(linears)
    level: dict[int, int] = {}
    stage: dict[str, int] = {}
    for n in sub.nodes:
        lv = max((level.get(id(v), 0) for v in n.inputs), default=0)
        if n.op == "linear" and n.outputs[0].name in wanted:
            stage[n.outputs[0].name] = lv
            lv += 1
        for v in n.outputs:
            level[id(v)] = lv
    return stage


def _observe(sub: Module, feeds: Sequence[Mapping[str, torch.Tensor]], names: Iterable[str], *,
             params: Mapping[str, torch.Tensor] | None = None) -> dict[str, list[torch.Tensor]]:
    """The values ``names`` (node results or the sub-module's inputs) on each feed, one list entry per feed."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    inputs = [v.name for v in sub.inputs if v.name in seen]

    def obs(node: Node, args: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        for v, t in zip(node.outputs, outs, strict=True):
            if v.name in seen:
                seen[v.name].append(t)

    for feed in feeds:
        for n in inputs:
            seen[n].append(feed[n])
        run_block(sub, [feed], params=params, observer=obs)
    return seen


def _fit_block(sub: Module, feeds: Sequence[Mapping[str, torch.Tensor]], coefs: Sequence[Coefficient],
               targets: Mapping[str, list[torch.Tensor]], ridge: float) -> dict[str, torch.Tensor]:
    """Closed-form coefficients of one block, stage by stage (later stages see earlier fits applied)."""
    stages = _stages(sub, [c.a.name for c in coefs])
    fitted: dict[str, torch.Tensor] = {}
    for s in sorted(set(stages.values())):
        todo = [c for c in coefs if stages[c.a.name] == s]
        seen = _observe(sub, feeds, [c.a.name for c in todo], params=fitted)
        for c in todo:
            fit = ChannelFit(int(c.a.type.shape[-1]), intercept=c.shift is not None)
            for a, t in zip(seen[c.a.name], targets[c.target], strict=True):
                fit.update(a, t)
            scale, shift = fit.solve(ridge)
            dt = torch_dtype(c.a.type.dtype)  # the model's dtype: an f32 fit would promote a bf16 stream
            fitted[c.scale] = scale.to(dt)
            if c.shift is not None:
                assert shift is not None
                fitted[c.shift] = shift.to(dt)
    return fitted


def fit_coefficients(stack: Stack, teacher: Module, acts: ActivationsResult, coefs: Sequence[Coefficient],
                     ctx: PassContext, *, ridge: float = 0.1, batches: int | None = None) -> dict[str, float]:
    """Fit every coefficient in closed form, blocks in order, stages in order within a block.

    The student (the rewritten module) runs on its own residual stream, starting from the
    original stream at the first changed block; the target of each tied linear is the original
    linear's output on the original stream.  Fitted tensors replace the placeholders (new tensor
    objects).  Returns ``{"error_before", "error_after"}``: the relative error of the last changed
    block's output on the calibration batches with the placeholders (plain tying) and with the fit.
    ``ridge`` pulls each coefficient towards 1 (see :meth:`ChannelFit.solve`).
    """
    m = stack.module
    t_layout = block_layout(teacher)
    by_block: dict[int, list[Coefficient]] = {}
    for c in coefs:
        by_block.setdefault(c.block, []).append(c)
    if not by_block:
        return {}
    lo, hi = min(by_block), max(by_block)
    layout = block_layout(m)
    student_h = list(acts.inputs[lo][:batches])
    plain_h = list(student_h)  # the same stream with the placeholders (plain tying), for the report
    for done, b in enumerate(range(lo, hi + 1)):
        info = layout.by_index(b)
        sub = block_module(m, info)
        here = by_block.get(b, [])
        if here:
            t_info = t_layout.by_index(b)
            targets = _observe(block_module(teacher, t_info), acts.feeds(t_info, acts.inputs[b][:batches]),
                               [c.target for c in here])
            for name, t in _fit_block(sub, acts.feeds(info, student_h), here, targets, ridge).items():
                m.params[name] = t.to(m.params[name].dtype)  # a new tensor object: nothing is written in place
        plain_h = run_block(sub, acts.feeds(info, plain_h))  # ``sub`` still holds the placeholders
        student_h = run_block(block_module(m, info), acts.feeds(info, student_h))
        ctx.report_progress("fitting coefficients", done + 1, hi - lo + 1)
    ref = acts.output_of(hi)[:batches]
    return {"error_before": _rel_error(plain_h, ref), "error_after": _rel_error(student_h, ref)}


def _rel_error(outs: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    num = sum(float(((o - r).double() ** 2).sum()) for o, r in zip(outs, ref, strict=True))
    den = sum(float((r.double() ** 2).sum()) for r in ref)
    return num / max(den, 1e-30)


# --------------------------------------------------------------------------- accounting
def param_reads(module: Module, blocks: Iterable[int] | None = None) -> dict[str, int]:
    """How many ``param`` nodes read each parameter (only nodes in ``blocks`` when given)."""
    want = None if blocks is None else set(blocks)
    out: dict[str, int] = {}
    for n in module.nodes:
        if n.op == "param" and (want is None or n.block in want):
            out[n.attrs["name"]] = out.get(n.attrs["name"], 0) + 1
    return out


def unique_counts(module: Module, blocks: Iterable[int]) -> tuple[int, int]:
    """(unique parameter count read by ``blocks``, parameter count if every block owned its tensors)."""
    reads: dict[str, set[int]] = {}
    for n in module.nodes:
        if n.op == "param" and n.block is not None and n.block in set(blocks):
            reads.setdefault(n.attrs["name"], set()).add(n.block)
    unique = sum(int(module.params[k].numel()) for k in reads)
    total = sum(int(module.params[k].numel()) * len(bs) for k, bs in reads.items())
    return unique, total


def per_member_overhead(stack: Stack, *, coefficients: str, rank: int) -> int:
    """Parameters each tied member adds: channel coefficients (a scale per output channel, plus a shift
    where the linear has a bias, which replaces it) and/or a rank-``rank`` LoRA pair per tied linear."""
    total = 0
    b0 = stack.blocks[0]
    for s in stack.tied:
        if not s.linear_weight:
            continue
        n_out, k_in = s.shape[0], s.shape[1]
        readers = len(stack.param_nodes[b0][s.index].output.users)
        if coefficients == "channel":
            total += readers * n_out  # the shift replaces the bias, so only the scale is new
        if rank > 0:
            total += readers * min(rank, n_out, k_in) * (n_out + k_in)
    return total


def report_ties(module: Module, ctx: PassContext, stack: Stack, groups: Sequence[Group], unique_before: int,
                what: str, extra: Mapping[str, Any] | None = None) -> None:
    """Notes and metrics every tying pass reports: groups, sources, unique vs total parameters."""
    unique_after, total_after = unique_counts(module, stack.blocks)
    all_unique = module.param_count()
    all_total = sum(int(module.params[k].numel()) * c for k, c in param_reads(module).items())
    tied = [g for g in groups if len(g.members) > 1]
    ctx.metrics.update({
        "groups": [g.members for g in groups],
        "sources": ["mean" if g.source is None else g.source for g in groups],
        "group_costs": [g.cost for g in groups],
        "blocks_unique_params": unique_after,
        "blocks_total_params": total_after,
        "blocks_ratio": unique_after / max(unique_before, 1),
        "unique_params": all_unique,
        "total_params": all_total,
        "unique_param_bytes": module.param_bytes(),
        "total_param_bytes": sum(int(module.params[k].numel()) * module.params[k].element_size() * c
                                 for k, c in param_reads(module).items()),
        **dict(extra or {}),
    })
    ctx.note(f"{what}: {len(tied)} group(s) tied: " + ", ".join(g.describe() for g in tied)
             + f"; selected blocks keep {unique_after / max(unique_before, 1):.3f} of their parameters "
             f"({unique_after:,} unique of {total_after:,} read)")
