"""ctc.eval.fidelity: metrics on hand-computed inputs, embeddings, similarity agreement, module comparison."""

from __future__ import annotations

import math

import pytest
import torch

from ctc.eval import data
from ctc.eval import fidelity as F
from ctc.frontends import load_bundled
from ctc.ir import Module, TensorType


def test_cosine_rows_known_values():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cand = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    assert F.cosine_rows(ref, cand) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    assert F.cosine_rows(ref, -ref) == pytest.approx(-1.0)
    assert F.cosine_rows(torch.zeros(2, 3), torch.zeros(2, 3)) == 1.0
    assert F.cosine_rows(torch.zeros(1, 3), torch.ones(1, 3)) == 0.0
    # a mask keeps only the real rows of [B, L, D]
    r3, c3 = ref.reshape(1, 2, 2), cand.reshape(1, 2, 2)
    assert F.cosine_rows(r3, c3, torch.tensor([[1, 0]])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"reference shape \(2, 2\) != candidate shape \(2, 3\)"):
        F.cosine_rows(ref, torch.zeros(2, 3))


def test_kl_known_value():
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.25, 0.75]]).log()
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert F.kl_logits(p, q) == pytest.approx(want, rel=1e-6)  # float32 logits
    assert F.kl_logits(p + 3.0, q - 1.0) == pytest.approx(want, rel=1e-6)  # logits: shift-invariant
    assert F.kl_logits(q, q) == pytest.approx(0.0, abs=1e-12)
    # mean over positions
    two_p, two_q = torch.cat([p, p]), torch.cat([q, p])
    assert F.kl_logits(two_p, two_q) == pytest.approx(want / 2, rel=1e-6)


def test_max_and_relative_error():
    ref, cand = torch.tensor([3.0, 4.0]), torch.tensor([3.0, 5.0])
    assert F.max_abs_error(ref, cand) == 1.0
    assert F.relative_error(ref, cand) == pytest.approx(1 / 5)
    assert F.relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert F.relative_error(torch.zeros(2), torch.ones(2)) == math.inf
    res = F.compare_outputs(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 2.0]]), logits=True)
    assert res.cosine == pytest.approx(1.0) and res.max_abs_error == 1.0 and res.rel_error == 1.0
    assert res.kl is not None and res.kl > 0 and res.rows == 1


def test_fidelity_totals_keep_a_nan_max_error():
    """FidelityTotals adds windows up as the concatenation compares them: a NaN output (a broken kernel, an
    overflow) makes max_abs_error NaN there, so Python's max() must not drop it (it reported 0.0, and a
    `check max_error < x` passed on NaN outputs)."""
    r = torch.randn(2, 4)
    bad = r.clone()
    bad[0, 0] = float("nan")
    for pairs in ([(r, bad)], [(r, bad), (r, r + 1)], [(r, r + 1), (r, bad), (r, r)]):
        t = F.FidelityTotals()
        for a, b in pairs:
            t.add(a, b)
        whole = F.compare_outputs(torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs]))
        assert math.isnan(whole.max_abs_error) and math.isnan(t.result().max_abs_error), pairs
    t = F.FidelityTotals()
    t.add(r, r + 1)
    t.add(r, r + 0.5)
    assert t.result().max_abs_error == pytest.approx(1.0)


def test_mean_pool_by_hand():
    h = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
    m = torch.tensor([[1, 1, 0]])
    assert torch.allclose(F.mean_pool(h, m, normalize=False), torch.tensor([[2.0, 2.0]]))
    assert torch.allclose(F.mean_pool(h, m), torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2)]]))
    with pytest.raises(ValueError, match="mean_pool"):
        F.mean_pool(h, torch.ones(1, 2))


def test_module_embeddings_pool_each_feed_over_its_mask():
    m = Module("enc")
    h = m.add_input("h", TensorType((1, 3, 2), "f32"))
    m.add_input("attention_mask", TensorType((1, 3), "i64"))
    m.set_outputs([m.create_node("relu", [h]).output], ["y"])
    feeds = [{"h": torch.tensor([[[1.0, 3.0], [3.0, 1.0], [-5.0, 9.0]]]), "attention_mask": torch.tensor([[1, 1, 0]])},
             {"h": torch.tensor([[[0.0, 2.0], [0.0, 4.0], [0.0, 6.0]]]), "attention_mask": torch.tensor([[1, 1, 1]])}]
    e = F.module_embeddings(m, feeds)
    assert torch.allclose(e, torch.tensor([[2 ** -0.5, 2 ** -0.5], [0.0, 1.0]]))


def test_correlations():
    x = [1.0, 2.0, 3.0, 4.0]
    assert F.pearson(x, [2.0, 4.0, 6.0, 8.0]) == pytest.approx(1.0)
    assert F.pearson(x, [1.0, 0.0, 1.0, 0.0]) == pytest.approx(-2 / math.sqrt(20))
    assert F.spearman(x, [1.0, 8.0, 27.0, 64.0]) == pytest.approx(1.0)  # monotone, not linear
    assert F.spearman(x, [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert F.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # ties share ranks
    with pytest.raises(ValueError, match="constant"):
        F.pearson(x, [1.0, 1.0, 1.0, 1.0])


def test_similarity_agreement_identical_is_one_and_noise_lowers_it():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(12, 16, generator=g)
    same = F.similarity_agreement(e, e.clone())
    assert same.pearson == pytest.approx(1.0) and same.spearman == pytest.approx(1.0)
    assert same.pairs == 66 and same.embedding_cosine == pytest.approx(1.0) and same.max_similarity_error == 0.0
    # scaling rows does not change cosines
    assert F.similarity_agreement(e, e * torch.rand(12, 1, generator=g) + 0).pearson == pytest.approx(1.0)
    noisy = F.similarity_agreement(e, e + 0.8 * torch.randn(12, 16, generator=g))
    assert 0.0 < noisy.pearson < 0.99 and noisy.embedding_cosine < 0.99
    with pytest.raises(ValueError, match="N >= 3"):
        F.similarity_agreement(e[:2], e[:2])


@pytest.fixture(scope="module")
def minilm():
    hf = load_bundled("minilm")
    return hf.model, hf.tokenizer, hf.info


def test_sentence_embeddings_match_sentence_transformers(minilm):
    """Our mean-pool + normalise equals the sentence-transformers pipeline shipped with the model."""
    st = pytest.importorskip("sentence_transformers")
    model, tok, info = minilm
    texts = data.lee_test()[:4]
    ours = F.sentence_embeddings(F.torch_hidden_fn(model), tok, texts, max_length=info.max_seq_len)
    ref = st.SentenceTransformer(info.model_dir, device="cpu", local_files_only=True).encode(
        texts, convert_to_tensor=True)
    assert ours.shape == (4, 384)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(ours, ref.float(), atol=1e-5)


def test_human_correlation_on_lee_subset(minilm):
    model, tok, info = minilm
    docs, human = data.lee_test()[:12], torch.tensor(data.lee_similarities())[:12, :12]
    e = F.sentence_embeddings(F.torch_hidden_fn(model), tok, docs, max_length=info.max_seq_len)
    r = F.human_correlation(e, human)
    assert r.pairs == 66 and 0.3 < r.pearson < 1.0
    assert F.similarity_agreement(e, e).spearman == pytest.approx(1.0)
    # random embeddings do not track human judgement
    rnd = F.human_correlation(torch.randn(12, 384, generator=torch.Generator().manual_seed(0)), human)
    assert abs(rnd.pearson) < r.pearson


@pytest.mark.slow
def test_minilm_human_correlation_full_lee():
    """all-MiniLM-L6-v2 vs the 50x50 Lee human judgements: Pearson 0.656, Spearman 0.508 (1225 pairs)."""
    hf = load_bundled("minilm")
    model, tok, info = hf.model, hf.tokenizer, hf.info
    e = F.sentence_embeddings(F.torch_hidden_fn(model), tok, data.lee_test(), max_length=info.max_seq_len)
    r = F.human_correlation(e, data.lee_similarities())
    assert r.pairs == 1225
    assert r.pearson == pytest.approx(0.656, abs=0.002) and r.spearman == pytest.approx(0.508, abs=0.002)


def _ir(scale: float) -> Module:
    g = torch.Generator().manual_seed(0)
    m = Module("enc")
    m.add_param("emb", torch.randn(10, 6, generator=g))
    m.add_param("u", torch.randn(5, 2, generator=g) * scale)
    m.add_param("v", torch.randn(2, 6, generator=g))
    x = m.add_input("input_ids", TensorType((1, "s"), "i64"))
    h = m.create_node("embedding", [x, m.param("emb")]).output
    y = m.create_node("lowrank_linear", [h, m.param("u"), m.param("v")], {"rank": 2}).output
    m.set_outputs([y], ["out"])
    return m


def test_compare_modules_with_interpreter():
    batches = [{"input_ids": torch.tensor([[1, 2, 3]])}, {"input_ids": torch.tensor([[4, 5, 6, 7]])}]
    a = _ir(1.0)
    same = F.compare_modules(a, _ir(1.0), batches, task="causal_lm")
    assert same["fidelity"] == pytest.approx(1.0) and same["max_error"] == 0.0 and same["kl"] == pytest.approx(0.0)
    b = a.clone(copy_params=True)
    b.params["u"] = b.params["u"] + 0.3 * torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    diff = F.compare_modules(a, b, batches, task="causal_lm")
    assert diff["fidelity"] < 1.0 and diff["max_error"] > 0 and diff["kl"] > 0
    assert F.compare_modules(a, b, batches, task="causal_lm")["kl"] == pytest.approx(diff["kl"])
    enc = F.compare_modules(a, b, batches, task="encoder")
    assert "kl" not in enc and enc["fidelity"] == pytest.approx(diff["fidelity"])
