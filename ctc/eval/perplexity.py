"""Perplexity of a causal LM on real text, by the sliding-window protocol (as for WikiText-2), over any backend.

The model is a callable ``logits_fn(input_ids, attention_mask) -> logits`` (``[1, L]`` int64 in,
``[1, L, V]`` out), so an eager torch model, the ctc reference interpreter and a compiled TVM
module are measured the same way.  Protocol (the Hugging Face "perplexity of fixed-length
models" one, with exact token counts): windows of ``max_length`` tokens start every ``stride``
tokens; each window scores only the tokens not scored by an earlier window, each one predicted
from all the window's tokens before it.  With ``stride == max_length`` windows are disjoint;
with a smaller stride every scored token has at least ``max_length - stride`` tokens of context.
The first token of a window that starts where the previous one ended (always the text's first
token; with ``stride == max_length`` every window's first token) is not scored, since nothing in
its window predicts it; the result's ``n_tokens`` counts exactly what was scored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = [
    "LogitsFn",
    "PerplexityResult",
    "sliding_window_perplexity",
    "text_perplexity",
    "batches_perplexity",
    "PerplexityTotals",
    "scored_nll",
    "torch_logits_fn",
    "module_logits_fn",
    "module_perplexity",
    "window_plan",
]

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]


@dataclass
class PerplexityResult:
    """Perplexity and how it was measured."""

    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood per scored token (nats)
    n_tokens: int  # tokens scored
    windows: int  # forward passes
    max_length: int
    stride: int
    text_tokens: int  # tokens in the text (or in the part the windows covered)
    seconds: float
    protocol: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def window_plan(n_tokens: int, max_length: int, stride: int, max_windows: int | None = None
                ) -> list[tuple[int, int, int]]:
    """Windows as ``(begin, end, first_scored)``: window ``[begin, end)`` scores tokens ``[first_scored, end)``.

    No token is scored twice; with ``stride < max_length`` every token but the text's first is
    scored (when all windows are taken); with ``stride == max_length`` each window's first is not.
    """
    if max_length < 2:
        raise ValueError(f"perplexity: max_length must be >= 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"perplexity: stride must be in [1, max_length={max_length}], got {stride}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"perplexity: max_windows must be >= 1 or None, got {max_windows}")
    if n_tokens < 2:
        raise ValueError(f"perplexity: the text has {n_tokens} token(s); at least 2 are needed")
    plan = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        plan.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens or (max_windows is not None and len(plan) >= max_windows):
            break
    return plan


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position NLL of ``targets`` under ``logits`` (``[T, V]``, ``[T]``), computed in float64."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def scored_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               float64: bool = True) -> tuple[float, int]:
    """(sum of NLL, tokens scored) of one window batch: position ``p >= 1`` is scored from the logits at
    ``p - 1`` when it and its predecessor are unmasked (the rule of :func:`batches_perplexity`).

    ``float64=False`` takes the log-softmax in float32 (several times cheaper over a large
    vocabulary; for comparing many variants of one model, where 1e-6 relative does not matter).
    """
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    keep = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
    lg, tg = logits[:, :-1][keep], input_ids[:, 1:][keep]
    if float64:
        return float(_token_nll(lg, tg).sum()), int(keep.sum())
    return float(torch.nn.functional.cross_entropy(lg.float(), tg, reduction="sum")), int(keep.sum())


def _as_logits(out: Any, what: str) -> torch.Tensor:
    if isinstance(out, (list, tuple)):
        out = out[0]
    if hasattr(out, "logits"):
        out = out.logits
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{what}: logits_fn must return a tensor [batch, seq, vocab], got {type(out).__name__}")
    return out


def sliding_window_perplexity(logits_fn: LogitsFn, input_ids: torch.Tensor | Sequence[int], max_length: int,
                              stride: int | None = None, *, max_windows: int | None = None,
                              description: str = "", progress: Progress | None = None) -> PerplexityResult:
    """Perplexity of token sequence ``input_ids`` (1-D, or ``[1, n]``) by the sliding-window protocol.

    ``stride`` defaults to ``max_length`` (disjoint windows); ``max_windows`` stops early
    (the result says how many tokens were scored).  ``description`` (text source, tokenizer)
    is prefixed to the protocol string.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"perplexity: expected one sequence, got a batch of shape {tuple(ids.shape)}")
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"perplexity: input_ids must be 1-D, got shape {tuple(ids.shape)}")
    stride = max_length if stride is None else stride
    plan = window_plan(ids.numel(), max_length, stride, max_windows)
    t0 = time.perf_counter()
    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for k, (begin, end, first) in enumerate(plan):
            window = ids[begin:end].unsqueeze(0)
            logits = _as_logits(logits_fn(window, torch.ones_like(window)), "perplexity")
            if logits.dim() != 3 or logits.shape[0] != 1 or logits.shape[1] != end - begin:
                raise ValueError(f"perplexity: logits_fn returned shape {tuple(logits.shape)} for a window of "
                                 f"{end - begin} tokens; expected [1, {end - begin}, vocab]")
            # token at absolute position p is predicted by the logits at p - 1
            pos = torch.arange(first, end) - begin
            nll_sum += float(_token_nll(logits[0, pos - 1], window[0, pos]).sum())
            count += end - first
            if progress is not None:
                progress(k + 1, len(plan))
    nll = nll_sum / count
    covered = plan[-1][1]
    proto = (f"{description + '; ' if description else ''}sliding window: length {max_length}, stride {stride}, "
             f"{len(plan)} windows over the first {covered} of {ids.numel()} tokens, {count} tokens scored "
             f"(each once, from the tokens before it in its window)")
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=count, windows=len(plan), max_length=max_length,
                            stride=stride, text_tokens=covered, seconds=time.perf_counter() - t0, protocol=proto)


def text_perplexity(logits_fn: LogitsFn, tokenizer: Any, text: str, max_length: int, stride: int | None = None, *,
                    max_windows: int | None = None, source: str = "text", add_special_tokens: bool = True,
                    progress: Progress | None = None) -> PerplexityResult:
    """Tokenise ``text`` once (like ``tokenizer(text)``) and measure its sliding-window perplexity."""
    ids = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    desc = f"text: {source}; tokenizer: {name} ({len(ids)} tokens)"
    return sliding_window_perplexity(logits_fn, ids, max_length, stride, max_windows=max_windows,
                                     description=desc, progress=progress)


def batches_perplexity(logits_fn: LogitsFn, batches: Sequence[Mapping[str, torch.Tensor]], *,
                       description: str = "", progress: Progress | None = None) -> PerplexityResult:
    """Perplexity over pre-made windows (``input_ids`` ``[B, L]`` + optional ``attention_mask``).

    Every position ``p >= 1`` whose token and predecessor are both unmasked is scored from the
    logits at ``p - 1`` (each window independently: no context carries over).
    """
    if not batches:
        raise ValueError("perplexity: no batches to evaluate")
    totals = PerplexityTotals()
    with torch.no_grad():
        for k, b in enumerate(batches):
            mask = b.get("attention_mask")
            totals.add(logits_fn(b["input_ids"], torch.ones_like(b["input_ids"]) if mask is None else mask), b)
            if progress is not None:
                progress(k + 1, len(batches))
    return totals.result(description)


class PerplexityTotals:
    """:func:`batches_perplexity` fed one window batch's logits at a time (a caller that computes each batch's
    logits for other metrics too scores them and lets them go, instead of keeping every batch's)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.nll_sum, self.count, self.rows, self.width, self.text_tokens = 0.0, 0, 0, 0, 0

    def add(self, logits: Any, batch: Mapping[str, torch.Tensor]) -> None:
        """Score one batch (``input_ids`` ``[B, L]``, optional ``attention_mask``) from its logits ``[B, L, V]``."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        logits = _as_logits(logits, "perplexity")
        if tuple(logits.shape[:2]) != tuple(ids.shape):
            raise ValueError(f"perplexity: logits shape {tuple(logits.shape)} does not match inputs "
                             f"{tuple(ids.shape)}")
        total, n = scored_nll(logits, ids, mask)
        self.nll_sum += total
        self.count += n
        self.rows += ids.shape[0]
        self.width = max(self.width, ids.shape[1])
        self.text_tokens += int(ids.numel())

    def result(self, description: str = "") -> PerplexityResult:
        """Perplexity over every batch added."""
        if self.count == 0:
            raise ValueError("perplexity: the batches hold no scorable tokens")
        nll_mean = self.nll_sum / self.count
        proto = (f"{description + '; ' if description else ''}{self.rows} independent windows of up to {self.width} "
                 f"tokens, {self.count} tokens scored (all but each window's first)")
        return PerplexityResult(ppl=math.exp(nll_mean), nll=nll_mean, n_tokens=self.count, windows=self.rows,
                                max_length=self.width, stride=self.width, text_tokens=self.text_tokens,
                                seconds=time.perf_counter() - self.t0, protocol=proto)


def torch_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """A ``logits_fn`` for a Hugging Face causal LM (or any module returning ``.logits`` or a tensor)."""
    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _as_logits(model(input_ids=input_ids, attention_mask=attention_mask), "torch model")
    return fn


def module_logits_fn(module: Any) -> LogitsFn:
    """A ``logits_fn`` running a ctc IR module with the reference interpreter (its first output = logits)."""
    from ctc.ir.interpreter import interpret

    names = [v.name for v in module.inputs]
    unknown = [n for n in names if n not in ("input_ids", "attention_mask", "position_ids")]
    if unknown:
        raise ValueError(f"perplexity: module inputs {unknown} cannot be fed from text (expected input_ids, "
                         "attention_mask, position_ids)")

    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask,
                "position_ids": torch.arange(input_ids.shape[1]).expand_as(input_ids).contiguous()}
        return interpret(module, {n: feed[n] for n in names})[0]
    return fn


def module_perplexity(module: Any, batches: Sequence[Mapping[str, torch.Tensor]],
                      progress: Progress | None = None) -> float:
    """Perplexity of a ctc IR module (run by the interpreter) over evaluation windows."""
    return batches_perplexity(module_logits_fn(module), batches, progress=progress).ppl
