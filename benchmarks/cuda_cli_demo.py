"""A small decoder for `ctc compile ... target cuda` here and `ctc bench --target cuda` on a GPU machine.

Why: a bundled model's artifact (SmolLM2: 540 MB of fp32 parameters) does not fit one GPU call's
64 MiB carry.  This writes a Hugging Face directory with SmolLM2's real tokenizer and config
family, shrunk to 2 layers of width 64 (random weights, seed 0), and a recipe that compiles it
for `target cuda`.  The artifact then goes to the GPU machine with TVM's runtime libraries only.

    python benchmarks/cuda_cli_demo.py DIR            # DIR/model (HF dir) + DIR/tiny_cuda.ctc
    ctc compile DIR/tiny_cuda.ctc --out DIR/art       # here: nvcc, no GPU
    python -m ctc bench DIR/art --target cuda         # there: one decode step
    python -m ctc run DIR/art --target cuda --text "Hello" --generate 32
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ctc.bundled import bundled_hf_dir

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__)
        return 2
    out = Path(args[0])
    src = bundled_hf_dir("smollm2")
    base = LlamaConfig.from_pretrained(src)
    cfg = LlamaConfig(vocab_size=base.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, rms_norm_eps=base.rms_norm_eps,
                      bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    (out / "model").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, out / "model" / f)
    (out / "tiny_cuda.ctc").write_text(
        "# a 2-layer SmolLM2-family decoder (random weights): one fp16 decode step over a 256-position cache\n"
        'model hf "model" decode=256 dtype="f16"\n'
        "calibrate wiki samples=2 seq_len=64\n"
        "pipeline {\n    cse\n    dce\n}\n"
        'target cuda arch="sm_90"\n')
    print(f"wrote {out / 'model'} and {out / 'tiny_cuda.ctc'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
