"""The benchmark's GPT-2 decode-step wrapper (explicit KV-cache tensors) is real decoding and ctc
captures it faithfully: checked on a tiny GPT-2 through the reference interpreter."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ctc.frontends import capture
from ctc.ir.interpreter import interpret

ROOT = Path(__file__).resolve().parents[1]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cpu_latency", ROOT / "benchmarks" / "cpu_latency.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny() -> tuple[GPT2LMHeadModel, GPT2Config]:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=50, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval(), cfg


@torch.no_grad()
def test_decode_step_continues_a_prefill() -> None:
    cl = _bench()
    model, cfg = _tiny()
    ids = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(1))
    full = model(ids, use_cache=False).logits[:, -1:]
    pre = model(ids[:, :6], use_cache=True).past_key_values
    past = {f"past_{t}_{i}": (lay.keys if t == "k" else lay.values) for i, lay in enumerate(pre.layers) for t in "kv"}
    step = cl.decode_step_wrapper(model)
    out = step(ids[:, 6:], torch.ones(1, 7, dtype=torch.long), *past.values())
    assert len(out) == 1 + 2 * cfg.n_layer
    torch.testing.assert_close(out[0], full, rtol=1e-4, atol=1e-5)
    assert out[1].shape == (1, 4, 7, 8)  # the cache grew by the new token
    torch.testing.assert_close(out[1][:, :, :6], past["past_k_0"])


@torch.no_grad()
def test_captured_decode_step_matches_eager() -> None:
    cl = _bench()
    model, cfg = _tiny()
    step = cl.decode_step_wrapper(model)
    ins = cl.decode_inputs(cfg, past=5, seed=3)
    ref = step(*ins.values())
    m = capture(step, ins, dynamic=False)
    assert m.meta["capture_path"] == "export"
    assert [v.name for v in m.inputs] == list(ins)
    got = interpret(m, ins)
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(torch.as_tensor(g), r, rtol=1e-4, atol=1e-5)
