"""Task losses and metrics of a whole model on real data, for passes that search by task quality.

An :class:`Objective` is a list of model inputs plus two functions of the model's first output
on each of them: ``loss`` (lower is better; what a search minimises) and ``metric`` (what a
report shows).  Three tasks, on data that ships in installed packages:

* ``lm``: next-token negative log-likelihood of a causal LM on given windows (perplexity is
  ``exp(loss)``);
* ``polarity``: zero-shot sentiment of the 200 pang_lee movie-review sentences by
  log-likelihood: after ``Review: <sentence>\\nSentiment:`` the model should prefer
  `` positive`` or `` negative``; loss = mean cross-entropy over the two labels' first tokens,
  metric = accuracy;
* ``similarity``: the Lee news corpus with its 50x50 human similarity judgements; a sentence
  encoder's mean-pooled, L2-normalised embeddings of two documents should have a cosine that
  agrees with the humans: loss = 1 - Pearson r over document pairs, metric = Pearson and
  Spearman r.

``calibration`` and ``evaluation`` splits never share a sentence or a document (document
pairs are taken within one split's documents); the split is by a salted hash of the text, so it
is the same on every machine.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ctc.eval import data as D

__all__ = ["Objective", "lm_objective", "pearson", "polarity_objective", "sentence_embedding", "similarity_objective",
           "spearman", "split_of"]

Outputs = list[torch.Tensor]  # the model's first output, one tensor per input


@dataclass
class Objective:
    """Inputs and the loss/metric of the model's first output on them."""

    name: str
    description: str
    inputs: list[dict[str, torch.Tensor]]
    loss: Callable[[Outputs], float]
    metric: Callable[[Outputs], dict[str, float]]
    extra: dict[str, Any] = field(default_factory=dict)


def split_of(text: str, salt: str = "ctc-objective-split-v1") -> str:
    """``calibration`` or ``evaluation``, by a salted SHA-256 of the text (half each, machine independent)."""
    return "evaluation" if hashlib.sha256(f"{salt}:{text}".encode()).digest()[0] % 2 else "calibration"


def _check_split(split: str) -> None:
    if split not in D.SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(D.SPLITS)}")


# --------------------------------------------------------------------------- language modelling
def lm_objective(batches: Sequence[dict[str, torch.Tensor]], description: str = "") -> Objective:
    """Mean next-token NLL over every position whose token and predecessor are unmasked."""
    batches = list(batches)
    if not batches:
        raise ValueError("lm objective: no batches (give the recipe a `calibrate` statement)")
    if any("input_ids" not in b for b in batches):
        raise ValueError("lm objective: batches must hold input_ids")

    def nll(outs: Outputs) -> tuple[float, int]:
        total, count = 0.0, 0
        for b, logits in zip(batches, outs, strict=True):
            ids = b["input_ids"]
            mask = b.get("attention_mask", torch.ones_like(ids))
            keep = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
            logp = torch.log_softmax(logits[:, :-1][keep].double(), dim=-1)
            total += float(-logp.gather(-1, ids[:, 1:][keep].unsqueeze(-1)).sum())
            count += int(keep.sum())
        return total / max(count, 1), count

    def loss(outs: Outputs) -> float:
        return nll(outs)[0]

    def metric(outs: Outputs) -> dict[str, float]:
        v, n = nll(outs)
        return {"nll": v, "ppl": math.exp(v), "tokens": float(n)}

    return Objective("lm", description or f"next-token NLL on {len(batches)} batches", batches, loss, metric)


# --------------------------------------------------------------------------- zero-shot polarity
POLARITY_PROMPT = "Review: {text}\nSentiment:"
POLARITY_LABELS = (" positive", " negative")


def polarity_objective(tokenizer: Any, split: str, input_names: Sequence[str], *, limit: int | None = None
                       ) -> Objective:
    """Zero-shot pang_lee polarity by log-likelihood of the two labels (see the module doc)."""
    _check_split(split)
    rows = [(t, y) for t, y in D.pang_lee_polarity() if split_of(t) == split][:limit]
    label_ids = []
    for lab in POLARITY_LABELS:
        ids = tokenizer(lab, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"polarity objective: the tokenizer gives no token for {lab!r}")
        label_ids.append(int(ids[0]))
    if label_ids[0] == label_ids[1]:
        raise ValueError(f"polarity objective: {POLARITY_LABELS} start with the same token; cannot tell them apart")
    inputs = []
    for text, _ in rows:
        enc = tokenizer(POLARITY_PROMPT.format(text=text), return_tensors="pt")
        inputs.append(D.model_inputs(dict(enc), input_names))
    gold = torch.tensor([0 if y == "pos" else 1 for _, y in rows])
    lab = torch.tensor(label_ids)

    def two_way(outs: Outputs) -> torch.Tensor:
        return torch.stack([o[0, -1, lab].double() for o in outs])  # [N, 2] label logits at the last position

    def loss(outs: Outputs) -> float:
        return float(torch.nn.functional.cross_entropy(two_way(outs), gold))

    def metric(outs: Outputs) -> dict[str, float]:
        z = two_way(outs)
        return {"accuracy": float((z.argmax(-1) == gold).double().mean()), "cross_entropy": loss(outs),
                "sentences": float(len(rows))}

    desc = (f"pang_lee polarity ({split} half: {len(rows)} sentences), zero-shot: "
            f"{POLARITY_PROMPT!r} -> {POLARITY_LABELS}")
    return Objective("polarity", desc, inputs, loss, metric, {"labels": label_ids})


# --------------------------------------------------------------------------- Lee similarity
def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson's r of two equally long vectors (float64)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho: Pearson's r of the average ranks (ties share their mean rank)."""
    return pearson(_ranks(a), _ranks(b))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x)
    r = torch.empty_like(x, dtype=torch.float64)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    for v in torch.unique(x):
        sel = x == v
        if int(sel.sum()) > 1:
            r[sel] = r[sel].mean()
    return r


def sentence_embedding(feed: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the attention mask, L2-normalised (sentence-transformers' pooling)."""
    m = feed.get("attention_mask", torch.ones(hidden.shape[:2], dtype=torch.long)).unsqueeze(-1).to(hidden.dtype)
    e = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(e[0].double(), dim=-1)


def similarity_objective(tokenizer: Any, split: str, input_names: Sequence[str], *, max_len: int = 256,
                         limit: int | None = None) -> Objective:
    """Lee document-similarity agreement of a sentence encoder (see the module doc); ``limit`` keeps the
    split's first documents only (and the pairs among them)."""
    _check_split(split)
    docs = D.lee_test()
    human = D.lee_similarities()
    idx = [i for i, d in enumerate(docs) if split_of(d) == split][:limit]
    pairs = [(a, b) for x, a in enumerate(idx) for b in idx[x + 1:]]
    target = torch.tensor([human[a][b] for a, b in pairs], dtype=torch.float64)
    inputs = []
    for i in idx:
        enc = tokenizer(docs[i], return_tensors="pt", truncation=True, max_length=max_len)
        inputs.append(D.model_inputs(dict(enc), input_names))
    pos = {doc: k for k, doc in enumerate(idx)}

    def sims(outs: Outputs) -> torch.Tensor:
        embs = [sentence_embedding(feed, h) for feed, h in zip(inputs, outs, strict=True)]
        return torch.stack([embs[pos[a]] @ embs[pos[b]] for a, b in pairs])

    def loss(outs: Outputs) -> float:
        return 1.0 - pearson(sims(outs), target)

    def metric(outs: Outputs) -> dict[str, float]:
        s = sims(outs)
        return {"pearson": pearson(s, target), "spearman": spearman(s, target), "pairs": float(len(pairs))}

    desc = (f"Lee corpus ({split} half: {len(idx)} documents, {len(pairs)} pairs), cosine of mean-pooled "
            f"embeddings vs human similarity (Pearson), truncated at {max_len} tokens")
    return Objective("similarity", desc, inputs, loss, metric, {"documents": idx})
