"""The fpga target on the bundled real models: all-MiniLM-L6-v2 at W8A8 and one SmolLM2-135M block at W4A8.

For each model and board (ZC706, U280): RPTQ quantizes the model (calibrated on the Wikipedia
calibration split), the fpga target emits the HLS C, tunes every integer GEMM's tiling against the
resource/latency model, compiles the C with gcc and C-simulates it on held-out real text, checking
every output bit against the integer model.  Printed per run: kernels, the largest layer's DSPs and
on-chip bytes against the board, modelled latency and throughput, compute/memory-bound layer counts,
the tuned-vs-default factor (integer GEMMs and whole model), the C simulation verdict and the
integer model's cosine to the float IR.

Protocol: batch 1, seq 128 (MiniLM: Lee corpus test documents; SmolLM2: the block's input is the
token embedding of Wikipedia evaluation text); model numbers are estimates of the model, not
measurements of hardware.  ``python benchmarks/fpga_models.py [--models minilm,smollm2]
[--boards zc706,u280] [--seq 128] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ctc.backends.hls.exact import interpret_exact  # noqa: E402
from ctc.eval import data as D  # noqa: E402
from ctc.frontends import (
    capture,  # noqa: E402
    load_bundled,  # noqa: E402
)
from ctc.ir.interpreter import interpret  # noqa: E402
from ctc.passes.base import PassContext, get_pass  # noqa: E402
from ctc.targets import FpgaOptions, TargetConfig, build_target  # noqa: E402


class SmolBlock(torch.nn.Module):
    """Decoder block ``i`` of a Llama-architecture model on hidden states (rotary from its own table)."""

    def __init__(self, model: Any, i: int):
        super().__init__()
        self.layer = model.model.layers[i]
        self.rotary = model.model.rotary_emb

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(hidden.shape[1]).unsqueeze(0)
        cos, sin = self.rotary(hidden, pos)
        out = self.layer(hidden, position_embeddings=(cos, sin), attention_mask=None)
        return out[0] if isinstance(out, tuple) else out


def _windows(tok: Any, text: str, n: int, seq: int) -> list[torch.Tensor]:
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    return [ids[i * seq:(i + 1) * seq].unsqueeze(0) for i in range(n) if (i + 1) * seq <= len(ids)]


def minilm(seq: int, calib: int) -> tuple[Any, list[dict[str, torch.Tensor]], dict[str, torch.Tensor], str]:
    hf = load_bundled("minilm")
    model, tok = hf.model, hf.tokenizer
    m = capture(model, {"input_ids": torch.ones(1, seq, dtype=torch.int64),
                        "attention_mask": torch.ones(1, seq, dtype=torch.int64)}, output="last_hidden_state")
    cal = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in
           _windows(tok, D.wiki_text("calibration"), calib, seq)]
    doc = " ".join(D.lee_test()[:3])
    w = _windows(tok, doc, 1, seq)[0]
    q = get_pass("rptq")({"w_bits": 8, "a_bits": 8, "clusters": 4}).run(m, PassContext(calibration=cal))
    return q, cal, {"input_ids": w, "attention_mask": torch.ones_like(w)}, "RPTQ W8A8 clusters=4"


def smollm2_block(seq: int, calib: int) -> tuple[Any, list[dict[str, torch.Tensor]], dict[str, torch.Tensor], str]:
    hf = load_bundled("smollm2")
    model, tok = hf.model, hf.tokenizer
    block = SmolBlock(model, 0).eval()
    emb = model.model.embed_tokens

    def hidden(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"hidden": emb(ids).detach()}

    m = capture(block, {"hidden": torch.zeros(1, seq, model.config.hidden_size)}, dynamic=False, name="smollm2_block0")
    cal = [hidden(w) for w in _windows(tok, D.wiki_text("calibration"), calib, seq)]
    probe = hidden(_windows(tok, D.wiki_text("evaluation"), 1, seq)[0])
    # the rotary cos/sin tables of fixed positions become constants
    m = get_pass("constant-fold")({"grow_params": True}).run(m, PassContext())
    q = get_pass("rptq")({"w_bits": 4, "a_bits": 8, "clusters": 4}).run(m, PassContext(calibration=cal))
    return q, cal, probe, "constant-fold, RPTQ W4A8 clusters=4 (weights already on a 4-bit grid: Q4_1 GGUF)"


def run(name: str, q: Any, probe: dict[str, torch.Tensor], board: str, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = work / f"{name}_{board}"
    t = TargetConfig("fpga", FpgaOptions.from_dict({"board": board, "tuning_dir": str(work / "tuning")}))
    s = build_target(q, t, out, example_inputs=probe)
    rep = json.loads((out / "report.json").read_text())
    got = interpret_exact(q, probe)[0]
    ref = interpret(q, probe)[0]
    cos = float(torch.nn.functional.cosine_similarity(got.reshape(1, -1).double(), ref.reshape(1, -1).double()))
    b = rep["board"]
    return {"model": name, "board": board, "kernels": rep["kernels"], "calls": rep["calls"],
            "max_layer_dsps": rep["max_layer_dsps"], "board_dsps": b["dsps"],
            "max_layer_onchip_bytes": rep["max_layer_onchip_bytes"], "board_onchip_bytes": b["onchip_bytes"],
            "latency_ms": rep["totals"]["latency_ms"], "inferences_per_s": rep["totals"]["inferences_per_s"],
            "compute_bound": rep["totals"]["compute_bound_layers"],
            "memory_bound": rep["totals"]["memory_bound_layers"],
            "gemm_speedup": rep["tuned_vs_default"].get("gemm_speedup"),
            "model_speedup": rep["tuned_vs_default"].get("model_speedup"),
            "csim_bit_exact": s["csim"].get("bit_exact"), "int_model_cosine_vs_ir": round(cos, 6),
            "build_s": round(time.perf_counter() - t0, 1), "dir": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--boards", default="zc706,u280")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--out", default=None)
    ap.add_argument("--work", default=None, help="keep the designs here (default: a temporary directory)")
    a = ap.parse_args()
    makers = {"minilm": minilm, "smollm2": smollm2_block}
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="ctc_fpga_"))
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; torch {torch.__version__}; "
          f"python {platform.python_version()}; gcc C simulation; work dir {work}")
    rows = []
    for name in a.models.split(","):
        q, _, probe, how = makers[name](a.seq, a.calib)
        print(f"# {name}: {how}; seq {a.seq}, batch 1")
        for board in a.boards.split(","):
            rows.append(run(name, q, probe, board, work))
            r = rows[-1]
            print(f"{r['model']:8s} {r['board']:6s} kernels {r['kernels']:3d}  max layer {r['max_layer_dsps']:5d}/"
                  f"{r['board_dsps']} DSP, {r['max_layer_onchip_bytes'] / 1e6:.2f}/"
                  f"{r['board_onchip_bytes'] / 1e6:.1f} MB"
                  f"  latency {r['latency_ms']:.3f} ms ({r['inferences_per_s']:.1f}/s)  bound c/m "
                  f"{r['compute_bound']}/{r['memory_bound']}  tuned vs default x{r['gemm_speedup']} GEMMs, "
                  f"x{r['model_speedup']} model  C-sim bit-exact {r['csim_bit_exact']}  cos(int model, IR) "
                  f"{r['int_model_cosine_vs_ir']}  ({r['build_s']} s)", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    sys.exit(0 if all(r["csim_bit_exact"] for r in rows) else 1)


if __name__ == "__main__":
    main()
