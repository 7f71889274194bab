"""Output fidelity of a compressed/compiled model against the original, and embedding-task quality for encoders.

Tensor agreement: mean row cosine, KL divergence of next-token distributions (LM logits), max
absolute error, relative L2 error.  Encoders: sentence embeddings (mean pooling over the
attention mask, L2-normalised: the all-MiniLM-L6-v2 recipe), agreement of a candidate's
pairwise similarities with the reference model's on real document pairs (Pearson/Spearman), and
correlation with the human similarity judgements of the Lee corpus.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ctc.tasks import TASK_CAUSAL_LM

__all__ = [
    "FidelityResult",
    "SimilarityAgreement",
    "cosine_rows",
    "kl_logits",
    "max_abs_error",
    "relative_error",
    "compare_outputs",
    "FidelityTotals",
    "mean_pool",
    "sentence_embeddings",
    "torch_hidden_fn",
    "pairwise_cosine",
    "pearson",
    "spearman",
    "similarity_agreement",
    "human_correlation",
    "compare_modules",
]

HiddenFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]


def _pair(ref: torch.Tensor, cand: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if tuple(ref.shape) != tuple(cand.shape):
        raise ValueError(f"{what}: reference shape {tuple(ref.shape)} != candidate shape {tuple(cand.shape)}")
    if ref.numel() == 0:
        raise ValueError(f"{what}: empty tensors")
    return ref.detach().double(), cand.detach().double()


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[..., D]`` -> ``[N, D]`` rows, keeping only rows where ``mask`` (shape ``[...]``) is nonzero."""
    if x.dim() == 0:
        x = x.reshape(1, 1)
    if mask is not None:
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the leading dims {tuple(x.shape[:-1])}")
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def cosine_rows(ref: torch.Tensor, cand: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean over rows (last dim = features) of row cosine; two zero rows count as 1, one zero row as 0."""
    a, b = _pair(ref, cand, "cosine")
    a, b = _rows(a, mask), _rows(b, mask)
    if a.shape[0] == 0:
        raise ValueError("cosine: the mask selects no rows")
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    cos = (a * b).sum(-1) / (na * nb).clamp_min(1e-300)
    cos = torch.where((na == 0) & (nb == 0), torch.ones_like(cos), cos)
    return float(cos.mean())


def kl_logits(ref_logits: torch.Tensor, cand_logits: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(cand)) in nats (last dim = vocabulary)."""
    a, b = _pair(ref_logits, cand_logits, "kl")
    a, b = _rows(a, mask), _rows(b, mask)
    if a.shape[0] == 0:
        raise ValueError("kl: the mask selects no positions")
    lp, lq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0).mean())


def max_abs_error(ref: torch.Tensor, cand: torch.Tensor) -> float:
    """Largest absolute elementwise difference."""
    a, b = _pair(ref, cand, "max_abs_error")
    return float((a - b).abs().max())


def relative_error(ref: torch.Tensor, cand: torch.Tensor) -> float:
    """``||cand - ref||_2 / ||ref||_2`` over all elements (inf if ref is all zeros and cand is not)."""
    a, b = _pair(ref, cand, "relative_error")
    num, den = float((a - b).norm()), float(a.norm())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


@dataclass
class FidelityResult:
    """Agreement of candidate outputs with reference outputs (``kl`` only for logits)."""

    cosine: float
    max_abs_error: float
    rel_error: float
    kl: float | None
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_outputs(ref: torch.Tensor, cand: torch.Tensor, *, logits: bool = False,
                    mask: torch.Tensor | None = None) -> FidelityResult:
    """All fidelity metrics for one output pair; ``mask`` (leading dims) restricts cosine/KL to real tokens
    (:class:`FidelityTotals` with one pair: the metrics are composed in one place)."""
    totals = FidelityTotals(logits=logits)
    totals.add(ref, cand, mask)
    return totals.result()


class FidelityTotals:
    """:func:`compare_outputs` over many output pairs, added one pair at a time.

    Why: comparing the concatenation of every evaluation window's logits held them all at once, in float64
    (windows x seq_len x vocabulary x 8 bytes per copy, several copies): a few hundred windows of a 49k-token
    vocabulary took 20+ GB.  The metrics are sums and maxima over rows, so they add up window by window and
    give exactly what comparing the concatenation gives."""

    def __init__(self, *, logits: bool = False) -> None:
        self.logits = logits
        self.rows = 0
        self._cos = 0.0
        self._kl = 0.0
        self._max = 0.0
        self._diff_sq = 0.0
        self._ref_sq = 0.0

    def add(self, ref: torch.Tensor, cand: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """One output pair (``mask``: its leading dims, nonzero on the rows cosine/KL count)."""
        a, b = _pair(ref, cand, "compare_outputs")
        ra, rb = _rows(a, mask), _rows(b, mask)
        if ra.shape[0]:
            self._cos += cosine_rows(ra, rb) * ra.shape[0]
            if self.logits:
                self._kl += kl_logits(ra, rb) * ra.shape[0]
        self.rows += int(ra.shape[0])
        m = max_abs_error(a, b)  # NaN stays NaN, as in the concatenation (Python's max() would drop it)
        if math.isnan(m) or m > self._max:  # once NaN, nothing is greater: it stays
            self._max = m
        self._diff_sq += float((a - b).square().sum())
        self._ref_sq += float(a.square().sum())

    def result(self) -> FidelityResult:
        """The metrics over every pair added (a ValueError when the masks selected no rows)."""
        if self.rows == 0:
            raise ValueError("compare_outputs: the masks select no rows")
        num, den = math.sqrt(self._diff_sq), math.sqrt(self._ref_sq)
        rel = (0.0 if num == 0.0 else math.inf) if den == 0.0 else num / den
        return FidelityResult(cosine=self._cos / self.rows, max_abs_error=self._max, rel_error=rel,
                              kl=self._kl / self.rows if self.logits else None, rows=self.rows)


# --------------------------------------------------------------------------- sentence embeddings
def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Sentence embeddings: token states averaged over the attention mask (``[B, L, D]`` -> ``[B, D]``), L2-normed."""
    if hidden.dim() != 3 or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"mean_pool: hidden {tuple(hidden.shape)} and mask {tuple(attention_mask.shape)} "
                         "must be [B, L, D] and [B, L]")
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    emb = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(emb, p=2, dim=-1) if normalize else emb


def module_embeddings(module: Any, feeds: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Sentence embeddings of a ctc encoder module (first output ``[1, L, D]``), one feed per text, run by the
    reference interpreter and mean-pooled over each feed's ``attention_mask`` (``[N, D]``, L2-normed)."""
    from ctc.ir.interpreter import interpret

    return torch.cat([mean_pool(interpret(module, dict(f))[0], f["attention_mask"]) for f in feeds])


def torch_hidden_fn(model: torch.nn.Module) -> HiddenFn:
    """A ``hidden_fn`` returning a Hugging Face encoder's ``last_hidden_state``."""
    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return fn


def sentence_embeddings(hidden_fn: HiddenFn, tokenizer: Any, texts: Sequence[str], *, max_length: int = 256,
                        batch_size: int = 16) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings ``[N, D]`` of ``texts`` (truncated to ``max_length`` tokens).

    ``hidden_fn(input_ids, attention_mask) -> [B, L, D]`` may be any backend.  256 is the
    truncation length sentence-transformers uses for all-MiniLM-L6-v2.
    """
    if isinstance(texts, str):
        raise TypeError("sentence_embeddings: pass a list of texts, not a single string")
    if not texts:
        raise ValueError("sentence_embeddings: no texts")
    out = []
    for k in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[k:k + batch_size]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        hidden = hidden_fn(enc["input_ids"], enc["attention_mask"])
        out.append(mean_pool(hidden.float(), enc["attention_mask"]))
    return torch.cat(out)


def pairwise_cosine(emb: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` cosine similarities of embedding rows."""
    e = torch.nn.functional.normalize(emb.double(), p=2, dim=-1)
    return e @ e.T


def pearson(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor) -> float:
    """Pearson correlation of two equal-length sequences."""
    a = torch.as_tensor(x, dtype=torch.float64).flatten()
    b = torch.as_tensor(y, dtype=torch.float64).flatten()
    if a.numel() != b.numel() or a.numel() < 2:
        raise ValueError(f"pearson: need two sequences of equal length >= 2, got {a.numel()} and {b.numel()}")
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    if den == 0.0:
        raise ValueError("pearson: a sequence is constant, correlation undefined")
    return float((a * b).sum()) / den


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties given their average rank."""
    from scipy.stats import rankdata

    return torch.as_tensor(rankdata(x.numpy(), method="average"), dtype=torch.float64)


def spearman(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor) -> float:
    """Spearman rank correlation (Pearson of average ranks, so ties are handled)."""
    a = torch.as_tensor(x, dtype=torch.float64).flatten()
    b = torch.as_tensor(y, dtype=torch.float64).flatten()
    if a.numel() != b.numel():
        raise ValueError(f"spearman: lengths differ ({a.numel()} vs {b.numel()})")
    return pearson(_ranks(a), _ranks(b))


def _upper(m: torch.Tensor) -> torch.Tensor:
    i, j = torch.triu_indices(m.shape[0], m.shape[1], offset=1)
    return m[i, j]


@dataclass
class SimilarityAgreement:
    """How well a candidate's pairwise similarities track the reference's (or human judgements)."""

    pearson: float
    spearman: float
    pairs: int
    embedding_cosine: float | None = None  # mean cosine of candidate vs reference embeddings (same texts)
    max_similarity_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def similarity_agreement(ref_emb: torch.Tensor, cand_emb: torch.Tensor) -> SimilarityAgreement:
    """Pearson/Spearman of candidate vs reference pairwise cosine over all pairs ``i < j`` of the same texts."""
    if tuple(ref_emb.shape) != tuple(cand_emb.shape) or ref_emb.dim() != 2 or ref_emb.shape[0] < 3:
        raise ValueError(f"similarity_agreement: need equal [N, D] embeddings with N >= 3, got "
                         f"{tuple(ref_emb.shape)} and {tuple(cand_emb.shape)}")
    s_ref, s_cand = _upper(pairwise_cosine(ref_emb)), _upper(pairwise_cosine(cand_emb))
    return SimilarityAgreement(pearson=pearson(s_ref, s_cand), spearman=spearman(s_ref, s_cand),
                               pairs=int(s_ref.numel()), embedding_cosine=cosine_rows(ref_emb, cand_emb),
                               max_similarity_error=float((s_ref - s_cand).abs().max()))


def human_correlation(emb: torch.Tensor, human: Sequence[Sequence[float]] | torch.Tensor) -> SimilarityAgreement:
    """Correlation of embedding cosine with human similarity scores over pairs ``i < j`` (upper triangle).

    For the Lee corpus: ``emb`` of :func:`ctc.eval.data.lee_test` documents and
    ``human`` = :func:`ctc.eval.data.lee_similarities` (1225 pairs).
    """
    h = torch.as_tensor(human, dtype=torch.float64)
    if h.dim() != 2 or h.shape[0] != h.shape[1] or h.shape[0] != emb.shape[0]:
        raise ValueError(f"human_correlation: need an [N, N] matrix for {emb.shape[0]} embeddings, "
                         f"got {tuple(h.shape)}")
    s, hu = _upper(pairwise_cosine(emb)), _upper(h)
    return SimilarityAgreement(pearson=pearson(s, hu), spearman=spearman(s, hu), pairs=int(s.numel()))


# --------------------------------------------------------------------------- ctc modules
def compare_modules(original: Any, compressed: Any, batches: Sequence[Mapping[str, torch.Tensor]], *,
                    task: str = "unknown", progress: Progress | None = None) -> dict[str, float]:
    """Fidelity of a compressed ctc module against the original, both run by the reference interpreter.

    Compares the first output over ``batches``: ``fidelity`` = mean row cosine over real tokens
    (attention mask), ``max_error``, ``rel_error``; for a causal LM
    (task ``causal_lm``) also ``kl`` of the next-token distributions.
    """
    from ctc.ir.interpreter import interpret

    if not batches:
        raise ValueError("compare_modules: no batches")
    is_lm = task == TASK_CAUSAL_LM
    refs, cands, masks = [], [], []
    for k, b in enumerate(batches):
        r = interpret(original, dict(b))[0]
        c = interpret(compressed, dict(b))[0]
        if tuple(r.shape) != tuple(c.shape):
            raise ValueError(f"compare_modules: output shape {tuple(c.shape)} != original {tuple(r.shape)} "
                             f"on batch {k}")
        m = b.get("attention_mask")
        use = m is not None and r.dim() >= 3 and tuple(m.shape) == tuple(r.shape[:-1])
        refs.append(r.reshape(-1, r.shape[-1]) if r.dim() else r.reshape(1, 1))
        cands.append(c.reshape(-1, c.shape[-1]) if c.dim() else c.reshape(1, 1))
        masks.append(m.reshape(-1) if use else torch.ones(refs[-1].shape[0], dtype=torch.long))
        if progress is not None:
            progress(k + 1, len(batches))
    widths = {t.shape[-1] for t in refs}
    if len(widths) == 1:
        ref, cand, mask = torch.cat(refs), torch.cat(cands), torch.cat(masks)
        res = compare_outputs(ref, cand, logits=is_lm, mask=mask)
        out = {"fidelity": res.cosine, "max_error": res.max_abs_error, "rel_error": res.rel_error}
        if res.kl is not None:
            out["kl"] = res.kl
        return out
    # outputs of different widths per batch: average the per-batch numbers
    per = [compare_outputs(r, c, logits=is_lm, mask=m) for r, c, m in zip(refs, cands, masks,
                                                                                        strict=True)]
    out = {"fidelity": sum(p.cosine for p in per) / len(per), "max_error": max(p.max_abs_error for p in per),
           "rel_error": max(p.rel_error for p in per)}
    if is_lm:
        out["kl"] = sum(p.kl or 0.0 for p in per) / len(per)
    return out
