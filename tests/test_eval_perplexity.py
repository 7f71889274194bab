"""ctc.eval.perplexity: window arithmetic, exact scoring against hand-computed values, HF agreement."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctc.eval import perplexity as P
from ctc.ir import Module, TensorType

P_CORRECT = [0.5, 0.6, 0.7, 0.8]  # probability given to token (x + 1) % 4 by window position 0, 1, 2, 3


def fake_logits_fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Vocabulary 4: at window position i, p(next = (x_i + 1) % 4) = P_CORRECT[i], the rest share the remainder."""
    b, n = input_ids.shape
    probs = torch.empty(b, n, 4, dtype=torch.float64)
    for i in range(n):
        q = P_CORRECT[i]
        probs[:, i, :] = (1 - q) / 3
        probs[torch.arange(b), i, (input_ids[:, i] + 1) % 4] = q
    return probs.log().float()


def test_window_plan_hand_examples():
    assert P.window_plan(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    # disjoint windows: a window's first token has no context inside it, so it is not scored
    assert P.window_plan(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert P.window_plan(10, 4, 4, max_windows=2) == [(0, 4, 1), (4, 8, 5)]
    assert P.window_plan(3, 8, 8) == [(0, 3, 1)]
    for bad in [(10, 1, 1), (10, 4, 5), (10, 4, 0), (1, 4, 4)]:
        with pytest.raises(ValueError, match="perplexity"):
            P.window_plan(*bad)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 300), length=st.integers(2, 64), data=st.data())
def test_window_plan_scores_every_token_once(n: int, length: int, data: st.DataObject):
    stride = data.draw(st.integers(1, length))
    plan = P.window_plan(n, length, stride)
    scored = [p for _, end, first in plan for p in range(first, end)]
    assert plan[-1][1] == n
    if stride < length:
        assert scored == list(range(1, n))
        for begin, _, first in plan[1:]:  # every scored token has >= length - stride tokens of context
            assert first - begin >= length - stride
    else:
        assert scored == [p for p in range(1, n) if p % length != 0]
    for begin, end, first in plan:
        assert end - begin <= length and begin < first <= end


def test_sliding_window_hand_computed():
    # tokens 0 1 2 0 1 2 ; length 4, stride 2 -> windows [0,4) scoring 1..3 and [2,6) scoring 4..5
    # window 0: 1|0 @pos0 (correct, .5), 2|1 @pos1 (.6), 0|2 @pos2 (wrong: (1-.7)/3 = .1)
    # window 1 (begin 2): 1|0 @pos1 (.6), 2|1 @pos2 (.7)
    r = P.sliding_window_perplexity(fake_logits_fn, [0, 1, 2, 0, 1, 2], 4, 2)
    nll = -(math.log(.5) + math.log(.6) + math.log(.1) + math.log(.6) + math.log(.7)) / 5
    assert r.n_tokens == 5 and r.windows == 2 and r.text_tokens == 6
    assert r.nll == pytest.approx(nll, rel=1e-6)
    assert r.ppl == pytest.approx(math.exp(nll), rel=1e-6)
    assert "length 4, stride 2" in r.protocol and "5 tokens scored" in r.protocol
    # disjoint windows (the HF protocol with stride = length): [0,4) scores 1..3 as above,
    # [4,6) scores only 5 (2|1 @pos0: .5); token 4 has no context in its window
    r = P.sliding_window_perplexity(fake_logits_fn, torch.tensor([[0, 1, 2, 0, 1, 2]]), 4)
    nll = -(math.log(.5) + math.log(.6) + math.log(.1) + math.log(.5)) / 4
    assert (r.n_tokens, r.windows, r.stride) == (4, 2, 4)
    assert r.nll == pytest.approx(nll, rel=1e-6)


def test_sliding_window_max_windows_and_bad_logits():
    r = P.sliding_window_perplexity(fake_logits_fn, [0, 1, 2, 3, 0, 1, 2, 3], 3, 2, max_windows=2)
    # [0,3) scores 1|0 @pos0 (.5), 2|1 @pos1 (.6); [2,5) scores 3 from pos 2 = window pos 0 (3|2: .5)
    # and 4 from window pos 1 (0|3, correct since (3 + 1) % 4 = 0: .6)
    assert (r.windows, r.n_tokens, r.text_tokens) == (2, 4, 5)
    assert r.nll == pytest.approx(-(2 * math.log(.5) + 2 * math.log(.6)) / 4, rel=1e-6)
    with pytest.raises(ValueError, match=r"expected \[1, 4, vocab\]"):
        P.sliding_window_perplexity(lambda i, m: torch.zeros(1, 3, 4), [0, 1, 2, 3], 4)
    with pytest.raises(ValueError, match="one sequence"):
        P.sliding_window_perplexity(fake_logits_fn, torch.zeros(2, 5, dtype=torch.long), 4)


def test_batches_perplexity_respects_mask():
    batch = {"input_ids": torch.tensor([[0, 1, 2, 3], [0, 1, 2, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    r = P.batches_perplexity(fake_logits_fn, [batch])
    # row 0: 1|0 .5, 2|1 .6, 3|2 .7 ; row 1: 1|0 .5 (positions 2,3 are padding)
    nll = -(math.log(.5) + math.log(.6) + math.log(.7) + math.log(.5)) / 4
    assert r.n_tokens == 4 and r.windows == 2
    assert r.nll == pytest.approx(nll, rel=1e-6)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_matches_hugging_face_loss_on_a_real_llama_architecture():
    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    fn = P.torch_logits_fn(model)
    with torch.no_grad():
        hf = float(model(ids, labels=ids).loss)
    r = P.sliding_window_perplexity(fn, ids, 40)
    assert r.n_tokens == 39 and r.nll == pytest.approx(hf, rel=1e-5)
    # strided: each window's new tokens, scored with the model on that window, as HF's loop does
    r = P.sliding_window_perplexity(fn, ids, 16, 8)
    total, count = 0.0, 0
    for begin, end, first in P.window_plan(40, 16, 8):
        w = ids[:, begin:end]
        labels = w.clone()
        labels[:, : first - begin] = -100
        with torch.no_grad():
            loss = float(model(w, labels=labels).loss)
        total += loss * (end - first)
        count += end - first
    assert r.n_tokens == count == 39
    assert r.nll == pytest.approx(total / count, rel=1e-5)


def _ir_lm(vocab: int = 4) -> Module:
    """input_ids -> embedding -> low-rank projection to logits (the interpreter runs it)."""
    g = torch.Generator().manual_seed(0)
    m = Module("lm")
    m.add_param("emb", torch.randn(vocab, 8, generator=g))
    m.add_param("u", torch.randn(vocab, 3, generator=g))
    m.add_param("v", torch.randn(3, 8, generator=g))
    x = m.add_input("input_ids", TensorType((1, "s"), "i64"))
    h = m.create_node("embedding", [x, m.param("emb")]).output
    y = m.create_node("lowrank_linear", [h, m.param("u"), m.param("v")], {"rank": 3}).output
    m.set_outputs([y], ["logits"])
    return m


def test_module_perplexity_runs_the_interpreter():
    m = _ir_lm()
    batches = [{"input_ids": torch.tensor([[0, 1, 2, 3, 1]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}]
    got = P.module_perplexity(m, batches)
    e, u, v = m.params["emb"], m.params["u"], m.params["v"]
    ref = P.batches_perplexity(lambda ids, mask: (e[ids] @ v.T) @ u.T, batches).ppl
    assert got == pytest.approx(ref, rel=1e-6)


@pytest.mark.slow
def test_smollm2_lee_background_first_512_tokens():
    """Real SmolLM2-135M on the Lee background corpus that ships with gensim (documents joined by blank
    lines, as ``token_stream`` does): 25.09 over the first 512 tokens, one window."""
    from ctc.eval import data
    from ctc.frontends import load_bundled

    hf = load_bundled("smollm2")
    model, tok = hf.model, hf.tokenizer
    text = "\n\n".join(data.lee_background())
    r = P.text_perplexity(P.torch_logits_fn(model), tok, text, 512, max_windows=1, source="lee_background")
    assert r.n_tokens == 511
    assert r.ppl == pytest.approx(25.087, abs=0.01)
