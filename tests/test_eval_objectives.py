"""Task objectives (ctc.eval.objectives): splits that never overlap, the statistics, and each task's loss
and metric on controlled model outputs."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from ctc.eval import data as D
from ctc.eval import objectives as OBJ
from ctc.eval.perplexity import batches_perplexity


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from ctc.bundled import bundled_model_dir

    return AutoTokenizer.from_pretrained(bundled_model_dir("minilm"), local_files_only=True)


def test_splits_are_disjoint_halves():
    texts = [t for t, _ in D.pang_lee_polarity()]
    cal = {t for t in texts if OBJ.split_of(t) == "calibration"}
    ev = {t for t in texts if OBJ.split_of(t) == "evaluation"}
    assert not cal & ev and len(cal) + len(ev) == len(set(texts))
    assert 0.35 < len(cal) / len(texts) < 0.65
    docs = D.lee_test()
    assert 15 <= sum(OBJ.split_of(d) == "calibration" for d in docs) <= 35


def test_statistics_match_scipy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g).double(), torch.randn(50, generator=g).double()
    b[::5] = b[1::5]  # ties
    assert OBJ.pearson(a, b) == pytest.approx(stats.pearsonr(a.numpy(), b.numpy())[0], abs=1e-9)
    assert OBJ.spearman(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy())[0], abs=1e-9)


def test_lm_objective_is_the_perplexity_nll():
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 11, (1, 9), generator=g), "attention_mask": torch.ones(1, 9)}
               for _ in range(3)]
    batches[1]["attention_mask"][0, :2] = 0
    logits = [torch.randn(1, 9, 11, generator=g) for _ in batches]
    obj = OBJ.lm_objective(batches)
    served = {id(b["input_ids"]): lg for b, lg in zip(batches, logits, strict=True)}
    ref = batches_perplexity(lambda ids, mask: served[id(ids)], batches)
    assert obj.loss(logits) == pytest.approx(ref.nll, rel=1e-12)
    assert obj.metric(logits)["ppl"] == pytest.approx(math.exp(ref.nll), rel=1e-12)
    with pytest.raises(ValueError, match="calibrate"):
        OBJ.lm_objective([])


def test_polarity_objective_scores_the_label_tokens(minilm_tokenizer):
    obj = OBJ.polarity_objective(minilm_tokenizer, "evaluation", ["input_ids", "attention_mask", "token_type_ids"])
    gold = [0 if y == "pos" else 1 for t, y in D.pang_lee_polarity() if OBJ.split_of(t) == "evaluation"]
    assert len(obj.inputs) == len(gold) and set(obj.inputs[0]) == {"input_ids", "attention_mask", "token_type_ids"}
    pos, neg = obj.extra["labels"]
    vocab = minilm_tokenizer.vocab_size

    def outs(right: bool) -> list[torch.Tensor]:
        res = []
        for feed, y in zip(obj.inputs, gold, strict=True):
            o = torch.zeros(1, feed["input_ids"].shape[1], vocab)
            o[0, -1, pos if (y == 0) == right else neg] = 5.0
            res.append(o)
        return res

    assert obj.metric(outs(True))["accuracy"] == 1.0 and obj.metric(outs(False))["accuracy"] == 0.0
    assert obj.loss(outs(True)) < 0.01 < 4.0 < obj.loss(outs(False))


def test_similarity_objective_agrees_with_itself(minilm_tokenizer):
    names = ["input_ids", "attention_mask", "token_type_ids"]
    obj = OBJ.similarity_objective(minilm_tokenizer, "calibration", names, max_len=16, limit=6)
    assert len(obj.inputs) == 6 and obj.metric([torch.zeros(1, 16, 4)] * 6)["pairs"] == 15
    human = D.lee_similarities()
    docs = obj.extra["documents"]
    # embeddings whose cosines reproduce the human scores exactly: Pearson 1, loss 0
    g = torch.Generator().manual_seed(2)
    outs = [torch.randn(1, f["input_ids"].shape[1], 8, generator=g) for f in obj.inputs]
    sims = torch.tensor([human[a][b] for x, a in enumerate(docs) for b in docs[x + 1:]], dtype=torch.float64)
    got = obj.metric(outs)
    assert -1.0 <= got["pearson"] <= 1.0 and obj.loss(outs) == pytest.approx(1 - got["pearson"])
    same = [outs[0]] * 6  # identical embeddings: every cosine 1, no agreement to speak of
    assert math.isnan(obj.metric(same)["pearson"]) or abs(obj.metric(same)["pearson"]) < 1e-6
    assert sims.numel() == 15
