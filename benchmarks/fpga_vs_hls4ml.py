"""ctc's fpga target side by side with hls4ml on models both can take: an MLP and a transformer FFN block.

Same models and weights (seeded), same input batch, 8-bit weights and activations on both sides:
ctc quantizes with ``quantize w_bits=8 a_bits=8`` (per-output-channel weight scales, per-tensor
activation scales, int32 accumulators); hls4ml uses its fixed-point types: weights ``ap_fixed<8,1>``,
layer results ``ap_fixed<8,4>``, accumulators ``ap_fixed<32,16>`` (power-of-two scales only).
For each tool: what it emits, whether its C simulation builds and runs, how it agrees with its own
reference (ctc: bit-exact against its integer model; hls4ml: against the float PyTorch model, since
it has no bit-exact reference), and the latency it estimates for the Alveo U280.

hls4ml runs in its own venv (it is not a ctc dependency): ``python -m venv .venv-hls4ml &&
.venv-hls4ml/bin/pip install torch==2.13.0 hls4ml==1.3.0``; ``--hls4ml-python`` points at it.
Run: ``python benchmarks/fpga_vs_hls4ml.py [--hls4ml-python .venv-hls4ml/bin/python]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hls4ml_side import build  # noqa: E402

from ctc.backends.hls.exact import interpret_exact  # noqa: E402
from ctc.frontends import capture  # noqa: E402
from ctc.passes.base import PassContext, get_pass  # noqa: E402
from ctc.targets import FpgaOptions, TargetConfig, build_target  # noqa: E402

HLS4ML_PRECISION = {"weight": "ap_fixed<8,1>", "bias": "ap_fixed<8,1>", "result": "ap_fixed<8,4>",
                    "accum": "ap_fixed<32,16>"}
MODELS = [{"name": "mlp", "kind": "mlp", "dims": [64, 128, 128, 10], "hls4ml_precision": HLS4ML_PRECISION},
          {"name": "ffn", "kind": "ffn", "dims": [64, 256], "hls4ml_precision": HLS4ML_PRECISION}]
ROWS = 16


def ctc_side(m: dict[str, Any], model: torch.nn.Module, x: np.ndarray, cal: list[np.ndarray], work: Path
             ) -> dict[str, Any]:
    cm = capture(model, {"x": torch.from_numpy(x)}, dynamic=False, name=m["name"])
    q = get_pass("quantize")({"w_bits": 8, "a_bits": 8, "blocks_only": False}).run(
        cm, PassContext(calibration=[{"x": torch.from_numpy(c)} for c in cal]))
    out = work / f"ctc_{m['name']}"
    t = TargetConfig("fpga", FpgaOptions.from_dict({"board": "u280", "tuning_dir": str(work / "tuning")}))
    s = build_target(q, t, out, example_inputs={"x": torch.from_numpy(x)})
    rep = json.loads((out / "report.json").read_text())
    y = interpret_exact(q, [torch.from_numpy(x)])[0].numpy()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    files = list((out / "hls").rglob("*.c")) + list((out / "hls").glob("*.h"))
    cos = float((y * ref).sum() / (np.linalg.norm(y) * np.linalg.norm(ref)))
    return {"model": m["name"], "tool": "ctc fpga", "converted": True, "csim": bool(s["csim"].get("run")),
            "bit_exact_vs_own_reference": s["csim"].get("bit_exact"), "cosine_vs_float": round(cos, 6),
            "max_abs_error_vs_float": float(np.abs(y - ref).max()),
            "quantized_linears": q.op_counts().get("quant_linear", 0), "float_linears": q.op_counts().get("linear", 0),
            "emitted": {"files": len(files), "lines": sum(len(p.read_text().splitlines()) for p in files),
                        "top": "ctc_top.c (layer sequence) + kernels/*.c (one per kernel) + tb.c; weights.bin"},
            "latency_estimate": f"{rep['totals']['latency_ms'] * 1e3:.2f} us at {rep['board']['clock_mhz']:g} MHz "
                                f"(model; {rep['max_layer_dsps']} DSPs in the largest layer)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hls4ml-python", default=str(Path(__file__).resolve().parents[1] / ".venv-hls4ml/bin/python"))
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="ctc_vs_hls4ml_"))
    work.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    for m in MODELS:
        torch.manual_seed(0)
        model = build(m["kind"], m["dims"]).eval()
        torch.save(model.state_dict(), work / f"{m['name']}.pt")
        d = m["dims"][0]
        x = (torch.randn(ROWS, d, generator=g)).numpy()
        cal = [torch.randn(ROWS, d, generator=g).numpy() for _ in range(4)]
        np.save(work / f"{m['name']}_x.npy", x)
        rows.append(ctc_side(m, model, x, cal, work))
    (work / "spec.json").write_text(json.dumps({"models": MODELS, "part": "xcu280-fsvh2892-2L-e"}))
    p = subprocess.run([a.hls4ml_python, str(Path(__file__).parent / "hls4ml_side.py"), str(work)],
                       capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        rows.append({"tool": "hls4ml", "error": p.stderr[-1500:]})
    else:
        rows += json.loads(p.stdout.strip().splitlines()[-1])
    print(f"# machine: {platform.machine()}; torch {torch.__version__}; board u280 (300 MHz); {ROWS} rows per batch;"
          " 8-bit weights and activations; noisy shared machine (only build times depend on it)")
    print(f"{'model':5s} {'tool':12s} {'converts':8s} {'C-sim':6s} {'agreement with own reference':34s} "
          f"{'cos vs float':12s} {'emitted':22s} latency estimate")
    for r in rows:
        own = ("bit-exact" if r.get("bit_exact_vs_own_reference") else "NOT bit-exact") if r.get("tool") == "ctc fpga" \
            else ("no bit-exact reference" if r.get("csim") else "-")
        em = r.get("emitted", {})
        print(f"{r.get('model', '-'):5s} {r.get('tool', '-'):12s} {str(r.get('converted')):8s} {str(r.get('csim')):6s} "
              f"{own:34s} {r.get('cosine_vs_float', float('nan')):<12.6f} "
              f"{em.get('files', 0):3d} files {em.get('lines', 0):6d} lines  "
              f"{r.get('latency_estimate', r.get('error', ''))}")
    print("ctc compiles, hls4ml 1.3's PyTorch front end does not: GELU/SiLU (and so transformer FFN blocks), "
          "attention (scaled_dot_product_attention, GQA, causal masks), RMSNorm, rotary embeddings, per-channel / "
          "per-cluster (RPTQ) integer quantization, int4 packed weights; whole MiniLM and SmolLM2 blocks "
          "(benchmarks/fpga_models.py).")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
