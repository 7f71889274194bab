"""``calibrate-attention``: ACT, training-free attention calibration (Yu et al., ICML 2024, arXiv 2406.15765).

Method.  Attention sinks (tokens that draw far more attention than their meaning warrants)
appear not only at the first token, and not all of them help: in some heads, lowering the
attention paid to sinks improves the task.  ACT finds those heads on a small calibration set,
then at inference calibrates them on the fly: in each chosen head, a key is a sink when the
attention it receives, averaged over the queries that see it, exceeds ``threshold`` times the
uniform share (``detect="column"``, ACT's statistic; its code compares the column mean with an
absolute 0.1), the first key excepted; its weight is multiplied by ``beta`` (0.4 in the paper)
and the removed mass goes to the other keys in proportion to their weights (the op
``calibrated_attention`` states it exactly).

The search, as in ACT's code: each candidate head is calibrated alone and the task loss on the
calibration data is measured; heads that lower it are chosen.  Here candidates are the heads
with the most sink attention first (a head without sinks is unchanged by calibration), at most
``budget`` of them; with ``confirm``, chosen heads are then added one at a time, best first,
and each is kept only when the loss with every head kept so far drops again (heads that help
alone can cancel out together).  Every trial resumes the reference interpreter at the
candidate's layer from a snapshot of the base run, so a candidate costs the layers after it.

Tasks (``task``): ``lm`` (next-token loss on the recipe's calibration windows; perplexity),
``polarity`` (zero-shot pang_lee sentiment, calibration half) and ``similarity`` (Lee document
similarity against human judgements, calibration half); ``auto`` picks ``lm`` for causal LMs
and ``similarity`` for encoders.  The report lists every chosen head with the loss change it
brought alone and when added, and the calibration loss before and after.

Causal attention (decoders, decode steps) uses ``detect="row"``: each query decides from its own
row (``A[i, j] > threshold / n_i``).  ACT's column mean includes later queries, so a token's output
would depend on tokens after it, and a one-query decode step has no column.  The row rule is not
ACT's statistic: it also fires on keys that one query attends sharply.  Measured on SmolLM2-135M
(one 256-token Wikipedia window, threshold 10): in 5 of the 8 heads with the most row-rule sink
mass, 60-90% of that mass is on the query's own or previous key (layer 16 head 0: 0.70 of 0.77),
and ACT's rule (as its code: column mean above 0.1) puts only 0.02-0.04 of their attention on sinks;
its sinks are elsewhere (layer 4 head 3: tokens 54 and 82, 0.63 of the attention).  On
all-MiniLM-L6-v2 the row rule's top heads are local heads too (layer 0 head 2: 0.975 of 0.979 on
the neighbouring keys, column statistic at most 1.5x uniform); the column rule's sinks at 10x are
in the last two layers (up to 24x in layer 5, 4 Lee documents).  ``detect="auto"`` (the default)
takes the column rule on non-causal attention of models that do not generate (encoders) and the
row rule elsewhere (a seq2seq decoder's cross-attention rows are positions too); ``detect="column"``
where the row rule is required is an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctc.ir.graph import Module, Node
from ctc.ir.interpreter import Execution
from ctc.ir.ops import get_op
from ctc.ir.ops.compress_attention import calibrate_rows, masked_logits
from ctc.passes.attention_masks import split_causal_mask
from ctc.passes.base import Pass, PassContext, PassError, PassOptions, option, register_pass
from ctc.tasks import TASK_CAUSAL_LM, TASK_DECODE_STEP, TASK_SEQ2SEQ

ATTENTION = "scaled_dot_product_attention"
GENERATING = (TASK_CAUSAL_LM, TASK_DECODE_STEP, TASK_SEQ2SEQ)  # models whose attention rows are positions in order
DETECT_NOTE = {"column": "ACT's statistic: a key's relative attention averaged over the queries that see it",
               "row": "each query's own attention, causal; it also fires on keys one query attends sharply"}


@dataclass(frozen=True)
class HeadTrial:
    """One candidate head and what calibrating it did to the task loss."""

    node: str  # the attention node's output name
    scope: str
    block: int | None
    head: int
    sink_mass: float  # mean attention mass calibration moves off this head's sinks (base run)
    loss: float | None = None  # task loss with this head alone calibrated
    loss_added: float | None = None  # task loss when added to the heads chosen before it (confirm)

    def to_dict(self, base: float) -> dict[str, Any]:
        def rel(x: float | None) -> float | None:
            return None if x is None else (x - base) / base

        return {"scope": self.scope, "block": self.block, "head": self.head, "sink_mass": self.sink_mass,
                "loss_alone": self.loss, "change_alone": rel(self.loss), "loss_added": self.loss_added}


@register_pass
class CalibrateAttentionPass(Pass):
    """ACT attention calibration: find heads whose attention sinks hurt the task, damp their sinks on the fly.

    Sinks are keys whose attention, averaged over the queries that see them, is far above a uniform
    share (ACT's statistic; causal attention and generating models use each query's own row, ``detect``).
    Each candidate head (most sink attention first, ``budget`` of them) is calibrated alone and
    the task loss measured on calibration data; heads that lower it are chosen (with
    ``confirm``, kept only while the combined loss keeps dropping) and their attention becomes
    ``calibrated_attention``.  Restrict layers with a selector (ACT leaves the first two alone).
    The report lists each chosen head with the loss change it brought.  See the module
    docstring (``ctc/passes/calibrate_attention.py``) for the method and the tasks.
    """

    name = "calibrate-attention"

    @dataclass(frozen=True)
    class Options(PassOptions):
        """Options of ``calibrate-attention``."""

        beta: float = option(0.4, "factor on a sink's attention in a chosen head (ACT: 0.4)", min=0.0, max=1.0)
        threshold: float = option(10.0, "a key is a sink when its attention exceeds threshold times the uniform "
                                        "share 1/n of a query's n keys: averaged over the queries that see it "
                                        "(detect=column), or one query's own (row)", min=1.0)
        keep_first: bool = option(True, "never treat a query's first key as a sink (ACT leaves the initial token)")
        detect: str = option("auto", "how sinks are found: column (ACT's statistic: a key's attention over the "
                                     "uniform share averaged over every query that sees it), row (each query's own "
                                     "attention; also fires on a previous-token head's peaks), or auto (column on "
                                     "non-causal attention of models that do not generate, row elsewhere)",
                             choices=("auto", "column", "row"))
        task: str = option("auto", "task loss the search minimises: lm (calibration windows), polarity "
                                   "(pang_lee, zero-shot), similarity (Lee, human judgements); auto = lm for "
                                   "causal LMs, similarity for encoders",
                           choices=("auto", "lm", "polarity", "similarity"))
        budget: int = option(32, "heads evaluated one by one (those with the most sink attention first)", min=1)
        samples: int = option(0, "task examples used: calibration windows (lm), sentences (polarity), documents "
                                 "(similarity); 0 = all of them", min=0)
        min_gain: float = option(0.0, "a head is chosen when it lowers the task loss by more than this fraction",
                                 min=0.0)
        confirm: bool = option(True, "add chosen heads one at a time, best first, keeping each only if the loss "
                                     "with all heads kept so far drops")

    # ------------------------------------------------------------------ run
    def run(self, module: Module, ctx: PassContext) -> Module:
        o = self.options
        nodes = [n for n in module.nodes if n.op == ATTENTION and ctx.selected(n)
                 and n.operand("q").type.rank == 4 and isinstance(n.operand("q").type.shape[1], int)]
        if not nodes:
            ctx.note("no attention with a static head count selected: nothing to calibrate")
            return module
        modes = {id(n): self._detect(module, n) for n in nodes}
        objective = self._objective(module, ctx)
        search = _HeadSearch(module, nodes, objective, o, ctx, modes)
        chosen = search.run()
        rw = ctx.rewriter(module)
        by_node: dict[str, list[int]] = {}
        for t in chosen:
            by_node.setdefault(t.node, []).append(t.head)
        for n in nodes:
            heads = sorted(by_node.get(n.outputs[0].name, []))
            if not heads:
                continue
            attrs = {**n.attrs, "heads": tuple(heads), "beta": o.beta, "threshold": o.threshold,
                     "keep_first": o.keep_first, "detect": modes[id(n)]}
            with rw.at(n):
                new = rw.create("calibrated_attention", {x: n.operand(x) for x in ("q", "k", "v", "mask")}, attrs)
            rw.replace(n, new.output)
        base, final = search.base_loss, search.final_loss
        ctx.metrics["detect"] = sorted(set(modes.values()))
        ctx.metrics["task"] = objective.name
        ctx.metrics["task_description"] = objective.description
        ctx.metrics["loss_before"] = base
        ctx.metrics["loss_after"] = final
        ctx.metrics["heads_evaluated"] = len(search.trials)
        ctx.metrics["heads"] = [t.to_dict(base) for t in chosen]
        ctx.metrics["candidates"] = [t.to_dict(base) for t in search.trials]
        ctx.note(f"task {objective.name}: {objective.description}; sinks found by "
                 + " and ".join(f"{m} ({DETECT_NOTE[m]})" for m in sorted(set(modes.values()))))
        ctx.note(f"evaluated {len(search.trials)} of {search.with_sinks} heads with sinks "
                 f"({search.total_heads} selected); chose {len(chosen)}; calibration loss {base:.5f} -> {final:.5f} "
                 f"({(final - base) / base * 100:+.3f}%)")
        for t in chosen:
            alone = (t.loss - base) / base * 100 if t.loss is not None else float("nan")
            added = f", added {t.loss_added:.5f}" if t.loss_added is not None else ""
            ctx.note(f"  {t.scope} (block {t.block}) head {t.head}: sink mass {t.sink_mass:.3f}, loss alone "
                     f"{t.loss:.5f} ({alone:+.3f}%){added}")
        return module

    def _detect(self, module: Module, node: Node) -> str:
        """The sink rule for ``node``: as set, else ACT's column statistic unless the attention is causal (or
        in a model that generates: a decoder's cross-attention queries are positions too)."""
        causal = (bool(node.attrs.get("is_causal")) or split_causal_mask(node) is not None
                  or module.meta.get("task") in GENERATING)
        mode = self.options.detect
        if mode == "auto":
            return "row" if causal else "column"
        if mode == "column" and causal:
            where = node.scope or "<root>"
            raise PassError(f"calibrate-attention: detect=\"column\" on the causal attention at {where} (causal, "
                            f"or in a {module.meta.get('task')} model whose rows are positions): ACT's per-key "
                            "statistic averages over every query, later ones included, so a token's "
                            "output would depend on the tokens after it (and a one-query decode step has no "
                            "column); use detect=\"row\" or \"auto\" here")
        return mode

    def _objective(self, module: Module, ctx: PassContext) -> Any:
        from ctc.eval import objectives as OBJ

        task = self.options.task
        if task == "auto":
            task = "lm" if module.meta.get("task") == TASK_CAUSAL_LM else "similarity"
        names = [v.name for v in module.inputs]
        limit = self.options.samples or None
        if task == "lm":
            if module.meta.get("task") not in (None, TASK_CAUSAL_LM):
                raise PassError(f"task=\"lm\" needs a causal LM; this model's task is {module.meta.get('task')!r} "
                                "(use task=\"similarity\" for encoders)")
            if not ctx.calibration:
                raise PassError("task=\"lm\" measures the next-token loss on the calibration windows, and the "
                                "pipeline has none: add a `calibrate wiki samples=4 seq_len=256` line")
            return OBJ.lm_objective(ctx.calibration[:limit], "next-token NLL on the recipe's calibration windows")
        tok = _tokenizer(module)
        if task == "polarity":
            return OBJ.polarity_objective(tok, "calibration", names, limit=limit)
        return OBJ.similarity_objective(tok, "calibration", names, limit=limit, max_len=_max_len(module, 256))


def _max_len(module: Module, default: int) -> int:
    """``default`` tokens, or fewer where the model has fewer positions (its config.json or its IR)."""
    from ctc.positions import model_limits

    src = str(module.meta.get("source") or "")
    config = Path(src) / "config.json" if src and os.path.isdir(src) else None
    seq = model_limits(module, config).get("seq")
    return min(default, seq[0]) if seq else default


def _tokenizer(module: Module) -> Any:
    """The captured model's tokenizer (its folder is recorded at capture), loaded offline."""
    src = module.meta.get("tokenizer_dir") or module.meta.get("source")
    if not src or not os.path.isdir(str(src)):
        raise PassError("this task needs the model's tokenizer, and the captured module names no tokenizer folder "
                        "(capture it from a Hugging Face folder or a bundled model, or use task=\"lm\")")
    from transformers import AutoTokenizer

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


class _HeadSearch:
    """ACT's head search over the selected attention nodes (see the module doc)."""

    def __init__(self, module: Module, nodes: list[Node], objective: Any, options: Any, ctx: PassContext,
                 modes: dict[int, str]):
        self.module, self.nodes, self.obj, self.o, self.ctx = module, nodes, objective, options, ctx
        self.modes = modes  # the sink rule per attention node (by id)
        self.index = {id(n): i for i, n in enumerate(module.nodes)}
        self.total_heads = sum(int(n.operand("q").type.shape[1]) for n in nodes)
        self.trials: list[HeadTrial] = []
        self.with_sinks = 0
        self.base_loss = float("nan")
        self.final_loss = float("nan")

    def calibrated(self, node: Node, heads: tuple[int, ...]) -> Any:
        """The calibrated attention of ``node`` with ``heads``, as a function of its operands."""
        ref = get_op("calibrated_attention").ref
        attrs = {**node.attrs, "heads": heads, "beta": self.o.beta, "threshold": self.o.threshold,
                 "keep_first": self.o.keep_first, "detect": self.modes[id(node)]}
        return lambda args: [ref(*args, **attrs)]

    def sink_mass(self) -> tuple[list[torch.Tensor], float]:
        """Per node, the mean attention mass calibration would move per head; and the base loss."""
        mass = [torch.zeros(int(n.operand("q").type.shape[1]), dtype=torch.float64) for n in self.nodes]
        rows = [0] * len(self.nodes)
        pos = {id(n): i for i, n in enumerate(self.nodes)}

        def observe(node: Node, args: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
            i = pos.get(id(node))
            if i is None:
                return
            q, k = args[0], args[1]
            mask = args[3] if len(args) > 3 else None
            logits, allowed, _, _ = masked_logits(q, k, mask, node.attrs["is_causal"], node.attrs["scale"])
            a = torch.softmax(logits, dim=-1).nan_to_num(0.0)
            moved = (a - calibrate_rows(a, allowed, self.o.beta, self.o.threshold, self.o.keep_first,
                                        self.modes[id(node)])).clamp_min(0)
            valid = allowed.any(-1)  # [B, H, Lq]
            mass[i] += moved.sum(-1).double().mul(valid).sum((0, 2))
            rows[i] += int(valid[:, 0].sum())

        outs = []
        for k, feed in enumerate(self.obj.inputs):
            outs.append(Execution(self.module, feed, observer=observe).finish()[0])
            self.ctx.report_progress("calibrate-attention: sink statistics", k + 1, len(self.obj.inputs))
        return [m / max(r, 1) for m, r in zip(mass, rows, strict=True)], self.obj.loss(outs)

    def run(self) -> list[HeadTrial]:
        mass, self.base_loss = self.sink_mass()
        cands = [HeadTrial(n.outputs[0].name, n.scope, n.block, h, float(mass[i][h]))
                 for i, n in enumerate(self.nodes) for h in range(len(mass[i])) if float(mass[i][h]) > 0.0]
        self.with_sinks = len(cands)
        cands.sort(key=lambda t: -t.sink_mass)
        cands = cands[: self.o.budget]
        by_node: dict[str, list[HeadTrial]] = {}
        for t in cands:
            by_node.setdefault(t.node, []).append(t)
        node_of = {n.outputs[0].name: n for n in self.nodes}
        # one stepwise base run per input; at each candidate node, fork it once per candidate head
        order = sorted(by_node, key=lambda name: self.index[id(node_of[name])])
        outs: dict[tuple[str, int], list[torch.Tensor]] = {(t.node, t.head): [] for t in cands}
        for k, feed in enumerate(self.obj.inputs):
            run = Execution(self.module, feed)
            for name in order:
                node = node_of[name]
                run.run_to(self.index[id(node)])
                for t in by_node[name]:
                    outs[(t.node, t.head)].append(run.fork().finish({node: self.calibrated(node, (t.head,))})[0])
            self.ctx.report_progress("calibrate-attention: head trials", k + 1, len(self.obj.inputs))
        self.trials = [HeadTrial(t.node, t.scope, t.block, t.head, t.sink_mass, self.obj.loss(outs[(t.node, t.head)]))
                       for t in cands]
        gain = self.o.min_gain * abs(self.base_loss)
        good = sorted((t for t in self.trials if t.loss is not None and t.loss < self.base_loss - gain),
                      key=lambda t: t.loss)
        if not self.o.confirm or not good:
            self.final_loss = self.evaluate(good) if good else self.base_loss
            return good
        chosen: list[HeadTrial] = []
        best = self.base_loss
        for t in good:
            loss = self.evaluate([*chosen, t])
            if loss < best - gain:
                chosen.append(HeadTrial(t.node, t.scope, t.block, t.head, t.sink_mass, t.loss, loss))
                best = loss
        self.final_loss = best
        return chosen

    def evaluate(self, trials: list[HeadTrial]) -> float:
        """Task loss with every head of ``trials`` calibrated."""
        node_of = {n.outputs[0].name: n for n in self.nodes}
        heads: dict[str, list[int]] = {}
        for t in trials:
            heads.setdefault(t.node, []).append(t.head)
        overrides = {node_of[name]: self.calibrated(node_of[name], tuple(sorted(hs))) for name, hs in heads.items()}
        return self.obj.loss([Execution(self.module, feed).finish(overrides)[0] for feed in self.obj.inputs])
