"""``ctc.frontends.decode``: one decode step of an HF causal LM over explicit KV-cache tensors is
real decoding (it continues a prefill exactly), and ctc captures it faithfully (GPT-2 and a
GQA Llama, checked through the reference interpreter)."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ctc.frontends import capture
from ctc.frontends.decode import cache_names, decode_inputs, decode_step, kv_cache_shape, prefilled_inputs
from ctc.ir.interpreter import interpret


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=50, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_decode_step_continues_a_prefill(make) -> None:  # noqa: ANN001
    model = make()
    ids = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(1))
    full = model(ids, use_cache=False).logits[:, -1:]
    pre = model(ids[:, :6], use_cache=True).past_key_values
    past = {f"past_{t}_{i}": (lay.keys if t == "k" else lay.values) for i, lay in enumerate(pre.layers) for t in "kv"}
    step = decode_step(model)
    out = step(ids[:, 6:], torch.ones(1, 7, dtype=torch.long), *past.values())
    assert len(out) == 1 + 2 * model.config.num_hidden_layers
    torch.testing.assert_close(out[0], full, rtol=1e-4, atol=1e-5)
    assert tuple(out[1].shape) == kv_cache_shape(model.config, 7)  # the cache grew by the new token
    torch.testing.assert_close(out[1][:, :, :6], past["past_k_0"])
    # keyword call binds by name, as torch.export does
    kw = step(input_ids=ids[:, 6:], attention_mask=torch.ones(1, 7, dtype=torch.long), **past)
    torch.testing.assert_close(kw[0], out[0])


def test_signature_names_every_cache_tensor() -> None:
    model = _llama()
    names = list(inspect.signature(decode_step(model).forward).parameters)
    assert names == ["input_ids", "attention_mask", *cache_names(model.config)]
    assert cache_names(model.config)[:3] == ["past_k_0", "past_v_0", "past_k_1"]
    assert kv_cache_shape(model.config, 9) == (1, 2, 9, 8)  # GQA: 2 kv heads of dim 32/4


def test_bad_uses_are_named() -> None:
    with pytest.raises(TypeError, match="Hugging Face causal LM"):
        decode_step(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="must be >= 1"):
        decode_inputs(_gpt2(), past=0)
    step = decode_step(_gpt2())
    with pytest.raises(TypeError, match="takes 4 cache tensors"):
        type(step).__mro__[1].forward(step, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))


@torch.no_grad()
@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_captured_decode_step_matches_eager(make) -> None:  # noqa: ANN001
    model = make()
    step = decode_step(model)
    ins = decode_inputs(model, past=5, seed=3)
    ref = step(**ins)
    m = capture(step, ins, dynamic=False)
    assert m.meta["capture_path"] == "export"
    assert [v.name for v in m.inputs] == list(ins)
    got = interpret(m, ins)
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(torch.as_tensor(g), r, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_prefilled_inputs_are_a_real_step() -> None:
    """prefilled_inputs(model, ids, P): the step on them gives the full forward's logits at P."""
    model = _llama()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    ins = prefilled_inputs(model, ids, 8)
    assert list(ins)[:2] == ["input_ids", "attention_mask"] and list(ins)[2:] == cache_names(model.config)
    assert tuple(ins["past_k_1"].shape) == kv_cache_shape(model.config, 8, batch=2)
    full = model(ids, use_cache=False).logits[:, -1:]
    torch.testing.assert_close(decode_step(model)(**ins)[0], full, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="past >= 1"):
        prefilled_inputs(model, ids, 9)


def _falcon_mqa():  # noqa: ANN202
    """Falcon's original architecture with multi_query: one kv head, which its config gives as no num_key_value_heads
    (num_kv_heads reads num_attention_heads there)."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    cfg = FalconConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, vocab_size=50, multi_query=True,
                       new_decoder_architecture=False, parallel_attn=True, alibi=False, bias=False)
    return FalconForCausalLM(cfg).eval()


@torch.no_grad()
def test_multi_query_falcon_caches_one_kv_head_and_its_static_step_captures() -> None:
    """`model hf FALCON decode=N` failed to capture ('cache_write: update vs cache dim 1: 1 != 4'): the caches were
    sized for 4 kv heads, Falcon's multi-query attention writes 1."""
    from ctc.frontends.decode import static_decode_inputs, static_decode_step, static_prefilled_inputs

    model = _falcon_mqa()
    assert kv_cache_shape(model.config, 9) == (1, 1, 9, 8)
    step = static_decode_step(model)
    m = capture(step, static_decode_inputs(model, 16), dynamic=False)
    ids = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(1))
    ins = static_prefilled_inputs(model, ids, 16)
    got = interpret(m, ins)[0]
    torch.testing.assert_close(torch.as_tensor(got), model(ids, use_cache=False).logits[:, -1:], rtol=1e-4,
                               atol=1e-5)


def test_decode_perplexity_says_which_windows_a_multi_row_step_left_out() -> None:
    """`ctc eval --perplexity` of a decode step that runs 2 sequences a call scored 2 of 3 windows and said nothing
    (its result still counted 3); the leftover window is now named, with the --samples that scores every one."""
    from hf_configs import tiny_hf

    from ctc.evaluate import _decode_perplexity
    from ctc.frontends.decode import static_decode_inputs, static_decode_step

    model = tiny_hf("llama")
    m = capture(static_decode_step(model), static_decode_inputs(model, 16, batch=2), dynamic=False)
    g = torch.Generator().manual_seed(0)
    windows = [{"input_ids": torch.randint(0, 50, (1, 8), generator=g)} for _ in range(3)]
    out = _decode_perplexity(m, None, windows)
    assert out["tokens_scored"] == 2 * 7 and "2 of 3 windows (groups of 2)" in out["ppl_protocol"]
    assert "the last 1 of the 3 windows were not scored; give --samples 2 or 4" in out["left_out"]
    assert "left_out" not in _decode_perplexity(m, None, windows[:2])
