"""Random-initialised tiny Hugging Face models of each captured architecture (no downloads).

``tiny_hf(arch, **sizes)`` builds an eval-mode model; ``captured(arch)`` captures the default
size once per test session (capture costs a few seconds, so tests share it).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

ARCHS = ("bert", "gpt2", "llama", "qwen2", "opt")
VOCAB = 97


def tiny_hf(arch: str, *, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 8,
            ff_mult: int = 2, seed: int = 0) -> torch.nn.Module:
    """A tiny random ``arch`` model: hidden = heads * head_dim; llama/qwen2 use GQA (kv_heads < heads)."""
    import transformers as T

    torch.manual_seed(seed)
    d = heads * head_dim
    common: dict[str, Any] = {"vocab_size": VOCAB, "max_position_embeddings": 64}
    if arch == "bert":
        cfg = T.BertConfig(num_hidden_layers=layers, num_attention_heads=heads, hidden_size=d,
                           intermediate_size=d * ff_mult, **common)
        return T.BertModel(cfg, add_pooling_layer=False).eval()
    if arch == "gpt2":
        cfg = T.GPT2Config(n_layer=layers, n_head=heads, n_embd=d, vocab_size=VOCAB, n_positions=64,
                           bos_token_id=0, eos_token_id=0)
        return T.GPT2LMHeadModel(cfg).eval()
    if arch in ("llama", "qwen2"):
        cls_cfg, cls = (T.LlamaConfig, T.LlamaForCausalLM) if arch == "llama" else (T.Qwen2Config, T.Qwen2ForCausalLM)
        cfg = cls_cfg(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      hidden_size=d, intermediate_size=d * ff_mult, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0, **common)
        return cls(cfg).eval()
    if arch == "opt":
        cfg = T.OPTConfig(num_hidden_layers=layers, num_attention_heads=heads, hidden_size=d, ffn_dim=d * ff_mult,
                          word_embed_proj_dim=d, bos_token_id=0, eos_token_id=0, pad_token_id=1, **common)
        return T.OPTForCausalLM(cfg).eval()
    raise ValueError(f"unknown arch {arch!r} (choose from {ARCHS})")


def hf_inputs(batch: int, seq: int, *, pad: int = 0, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random ids with the first ``pad`` positions of row 0 masked out (left padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def reference(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The eager model's main output (logits or last_hidden_state)."""
    with torch.no_grad():
        out = model(**inputs) if not hasattr(model, "lm_head") else model(**inputs, use_cache=False)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@cache
def captured(arch: str) -> tuple[torch.nn.Module, Any]:
    """(eager model, captured ctc Module) for the default tiny size, cached per session."""
    from ctc.frontends import capture_hf_model

    model = tiny_hf(arch)
    return model, capture_hf_model(model, seq_len=7)


def tiny_llama_with_smollm2_tokenizer(dest: Any) -> Any:
    """A random 2-layer Llama (hidden 32, tied head) saved at ``dest`` with SmolLM2's real tokenizer beside it
    (vocabulary 49152, byte-level BPE): a decoder that tokenizes real text like the bundled one, in seconds."""
    import shutil
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    from ctc.bundled import bundled_hf_dir

    dest = Path(dest)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).eval().save_pretrained(dest)
    src = bundled_hf_dir("smollm2")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dest / f)
    return dest
