"""Golden IR text of captured tiny BERT and GPT-2 models (random weights, fixed seeds).

A failing comparison means capture or the printer changed what they produce.  If the
change is intended, regenerate the files and review the diff::

    python tests/test_ir_golden_capture.py --update
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ctc.ir import interpret
from ctc.ir.nxview import isomorphic_blocks
from ctc.ir.text import parse, print_module, structural_diff
from ctc.ir.verify import verify

GOLDEN = Path(__file__).parent / "golden"


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    inputs = {"input_ids": torch.randint(0, 50, (1, 5)), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    return model, inputs, "last_hidden_state"


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                     use_cache=False)
    model = GPT2LMHeadModel(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 50, (1, 5)), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    return model, inputs, "logits"


MODELS = {"tiny_bert": tiny_bert, "tiny_gpt2": tiny_gpt2}


def _capture(name: str):
    from ctc.frontends import capture

    model, inputs, output = MODELS[name]()
    return model, inputs, output, capture(model, inputs, output=output, name=name)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_captured_model_matches_golden_text(name):
    model, inputs, output, m = _capture(name)
    verify(m)
    text = print_module(m)
    path = GOLDEN / f"{name}.ir"
    golden = path.read_text()
    if text != golden:
        import difflib

        diff = "".join(difflib.unified_diff(golden.splitlines(True), text.splitlines(True), str(path), "captured",
                                            n=1))
        pytest.fail(f"captured IR differs from {path} (regenerate with "
                    f"`python tests/test_ir_golden_capture.py --update` if intended):\n{diff[:6000]}")
    # the golden text is a complete program: with the model's weights it runs like the model
    m2 = parse(golden, params=m.params, filename=str(path))
    assert structural_diff(m, m2) == []
    out = interpret(m2, inputs)[0]
    with torch.no_grad():
        ref = getattr(model(**inputs), output)
    assert torch.allclose(out, ref, atol=1e-5)
    assert isomorphic_blocks(m2) == [[0, 1]]


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit(f"usage: python {sys.argv[0]} --update   (rewrites {GOLDEN}/<model>.ir)")
    for n in sorted(MODELS):
        (GOLDEN / f"{n}.ir").write_text(print_module(_capture(n)[3]))
        print(f"wrote {GOLDEN / f'{n}.ir'}")
