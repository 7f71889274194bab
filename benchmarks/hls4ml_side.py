"""hls4ml's half of benchmarks/fpga_vs_hls4ml.py; runs inside a venv that has hls4ml (not ctc).

Reads ``spec.json`` and the models' weights (``*.pt`` state dicts, loaded with weights_only=True),
converts each model with hls4ml's PyTorch front end at the requested fixed-point widths (Vitis
backend, the U280 part), compiles hls4ml's C simulation (g++) and runs it on the given inputs, and
writes what it emitted, whether it compiled, its agreement with the float PyTorch model and whether a
latency estimate exists, as JSON on stdout.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch


class MLP(torch.nn.Module):
    def __init__(self, sizes: list[int]):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, lin in enumerate(self.layers):
            x = lin(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class FFN(torch.nn.Module):
    """A transformer FFN block: LayerNorm(x + fc2(gelu(fc1(x))))."""

    def __init__(self, d: int, ff: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, ff)
        self.fc2 = torch.nn.Linear(ff, d)
        self.ln = torch.nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))


def build(kind: str, dims: list[int]) -> torch.nn.Module:
    return MLP(dims) if kind == "mlp" else FFN(dims[0], dims[1])


def main() -> None:
    import hls4ml

    work = Path(sys.argv[1])
    spec = json.loads((work / "spec.json").read_text())
    out = []
    for m in spec["models"]:
        model = build(m["kind"], m["dims"]).eval()
        model.load_state_dict(torch.load(work / f"{m['name']}.pt", weights_only=True))
        x = np.load(work / f"{m['name']}_x.npy")
        row = {"model": m["name"], "tool": f"hls4ml {hls4ml.__version__}"}
        t0 = time.perf_counter()
        try:
            prec = m["hls4ml_precision"]
            cfg = hls4ml.utils.config_from_pytorch_model(model, input_shape=tuple(x.shape[1:]), granularity="name",
                                                         default_precision=prec["result"], backend="Vitis")
            for layer in cfg.get("LayerName", {}).values():  # 8-bit weights and activations, wide accumulators
                p = layer.get("Precision")
                if isinstance(p, dict):
                    for field in p:
                        p[field] = prec.get(field, prec["result"])
            proj = work / f"hls4ml_{m['name']}"
            hm = hls4ml.converters.convert_from_pytorch_model(model, hls_config=cfg, output_dir=str(proj),
                                                              backend="Vitis", part=spec["part"],
                                                              io_type="io_parallel")
            row["converted"] = True
        except Exception as e:  # noqa: BLE001 - reported as the tool's limitation
            row.update(converted=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            out.append(row)
            continue
        try:
            hm.compile()
            y = hm.predict(np.ascontiguousarray(x.astype(np.float32)))
            with torch.no_grad():
                ref = model(torch.from_numpy(x)).numpy()
            y = np.asarray(y).reshape(ref.shape)
            cos = float((y * ref).sum() / (np.linalg.norm(y) * np.linalg.norm(ref) + 1e-30))
            row.update(csim=True, max_abs_error_vs_float=float(np.abs(y - ref).max()), cosine_vs_float=cos)
        except Exception as e:  # noqa: BLE001
            row.update(csim=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                       trace=traceback.format_exc()[-400:])
        files = [p for p in proj.rglob("*") if p.is_file() and p.suffix in (".cpp", ".h", ".tcl")]
        row["emitted"] = {"files": len(files), "lines": sum(len(p.read_text(errors="ignore").splitlines())
                                                             for p in files),
                          "top": "firmware/myproject.cpp (one function, layers as templated calls; weights as "
                                 "C arrays in firmware/weights/*.h)"}
        row["latency_estimate"] = "none without Vitis HLS (hls4ml reports latency from the vendor tool's synthesis)"
        row["seconds"] = round(time.perf_counter() - t0, 1)
        out.append(row)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
