"""The persistent decode-step kernel (``ctc/backends/tvm/cuda_persistent.py``) on one GPU: checked and timed.

Two phases:

* ``build OUT`` (any machine with nvcc; no GPU needed): compiles the kernel into ``OUT/libctc_pdec.so``
  (sm_90a) and writes ptxas's report (``OUT/build.json``).
* ``run OUT`` (the GPU machine: torch with CUDA; nothing else): makes a Llama-3.2-1B-shaped decoder's weights
  from a fixed seed *on the GPU* (normal(0, 0.02) linears and embedding, norms 1 + 0.1 normal), quantizes
  every linear and the tied LM head with ctc's symmetric RTN int4, group 128 (:func:`rtn_int4`, the same
  arithmetic as :func:`ctc.ir.quant.quantize_weight`), fills fp16 KV caches with normal(0, 1) rows below the
  position, and

  - checks the logits (and the last layer's q|k|v, attention output, SwiGLU output, residual, and the cache row
    the step writes) against a float32 PyTorch step on the dequantized weights, first with 1 layer, then 16,
    at several positions;
  - runs each checked step twice and reports the largest logit difference between the runs (the residual is
    accumulated with f32 atomics: not bit-deterministic);
  - times the step at KV 128 and 1024: median / min of ``--repeat`` CUDA-event timings of single launches,
    back-to-back (``--repeat`` launches / n), the same for the step captured once in a CUDA graph; timing
    variants (no grid barriers; no arithmetic; neither: the ring's streaming rate), attention chunk spans, the
    compile-time variants of ``VARIANTS`` and a barrier-only kernel; one traced step per position (per phase:
    prologue, tile waits, the two halves of B and C, barriers);
  - diagnostics at KV 128 with the LM head cut to 4224 rows: weights L2-resident (every layer reads layer 0's),
    no copies at all, and their combinations with no barriers / no arithmetic, with traces;
  - measures the device-to-device copy rate (bytes read + written; ``cuda_decode.copy_bandwidth``) at the start
    and the end, and reports int4 weight + scale bytes / step time as a fraction of it.

* ``profile OUT --modes 0 8`` (the GPU machine, under ``ncu --profile-from-start off``): one step per mode.

Results: ``$OUT/persistent_decode.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctc.backends.tvm import cuda_persistent as P  # noqa: E402

SEED = 0
MAX_LEN = 1088
CHECK_POS = (5, 128, 300, 1024)
TIME_POS = (128, 1024)


# timing variants built beside the main library: name -> nvcc flags
VARIANTS = {"base": (), "half2": ("-DPDEC_MMA=0",), "half2_o": ("-DPDEC_MMA_O=0",), "half2_qkv": ("-DPDEC_MMA_QKV=0",),
            "gam_smem": ("-DPDEC_GAM_SMEM=1",), "att_warp": ("-DPDEC_ATT_WARP=1",)}
# also buildable, measured slower or no faster (runs 11-21): "-DPDEC_MMA_LO=0" (phase C's tensor cores with int8
# activations alone: 10x the logit error), "-DPDEC_IDP=1" (dp2a for the K-2048 GEMVs, implies PDEC_MMA=0),
# "-DPDEC_IDP=1 -DPDEC_IDP_OD=1" (dp2a for W_o and W_down too), "-DPDEC_PF_KB=128" (L2 prefetch window),
# "-DPDEC_RED_V4=0" (scalar atomics), "-DPDEC_GRID_A=1" (a grid barrier after phase A), "-DPDEC_STAGGER=0" (W_down
# in the same order in every block), "-DPDEC_NSLOT=4" / "=2" (ring slots), "-DPDEC_WARP_POLL=1" (every warp polls
# the grid barrier: 2.3 us a barrier), "-DPDEC_HOLD=1" with or without "-DPDEC_NSLOT=4" (no copy issued while the
# block is in a grid barrier: slower, run 23)
# attention chunk spans timed besides the default (one chunk, computed by each of the kv head's 16 blocks, up to
# 256 positions, else chunks of 64): 64 chunks at KV 128 too, 256 gives 4 chunks at 1024, 2048 one chunk at 1024
SPANS = (64, 256, 2048)
STAGES = ("qkv", "attn_o", "ffn", "head")
PER_LAYER = 3
NSTAMP = 6
# diagnostic modes (timed at KV 128 with the LM head cut to 132 x 32 rows, so the layers' streaming dominates):
# bits 1 no grid barriers / counter waits, 2 no arithmetic, 4 every layer streams layer 0's weights (L2-resident),
# 8 no copies at all (arithmetic + exchanges on stale shared memory)
DIAG = {"full": 0, "stream_only": 3, "l2_weights": 4, "l2_stream_only": 7, "l2_no_barriers": 5, "no_copies": 8,
        "no_copies_no_barriers": 9, "no_copies_no_arithmetic": 10}
DIAG_VOCAB = 132 * 32


def trace_breakdown(trace: Any, layers: int) -> dict[str, Any]:
    """Per phase kind, from one step's globaltimer stamps ``[blocks, 320]`` (start; per phase: begin, ready =
    prologue done, first tile in, mid, first tile after mid in, end): ``span_us`` = sum over layers of (last
    block's end - first block's begin), ``barrier_us`` = mean of (first block's begin of the next phase - last
    block's end), and means over the blocks that have work in the phase and over layers: ``work_us`` (end -
    begin), ``prologue_us`` (ready - begin: the norm; in B the wait for the head's q|k|v), ``first_wait_us``
    (first tile in - ready; in B this includes loading q|k|v), ``first_us`` (mid - ready: attention / gate|up),
    ``second_wait_us`` (first tile after mid - mid), ``second_us`` (end - mid: o projection / down)."""
    t = trace.double().cpu()
    n_st = layers * PER_LAYER + 1
    t = t[:, :1 + NSTAMP * n_st] - t[:, :1].min()
    begin, ready, tile1, mid, tile2, end = (t[:, 1 + k::NSTAMP] for k in range(NSTAMP))   # [blocks, stages]
    release = begin.min(dim=0).values
    arrive = end.max(dim=0).values
    out: dict[str, Any] = {"total_us": round(float(end[:, -1].max()) / 1e3, 2),
                           "start_skew_us": round(float(t[:, 0].max() - t[:, 0].min()) / 1e3, 2)}
    for k, name in enumerate(STAGES):
        idx = list(range(k, layers * PER_LAYER, PER_LAYER)) if k < PER_LAYER else [layers * PER_LAYER]
        rows = slice(0, 128) if name != "head" else slice(None)
        span = sum(float(arrive[i] - release[i]) for i in idx)
        bar = [float(release[i + 1] - arrive[i]) for i in idx if i + 1 < begin.shape[1]]

        def mean(a: Any, b: Any, rows: Any = rows, idx: list[int] = idx) -> float:
            return round(float((a[rows][:, idx] - b[rows][:, idx]).mean()) / 1e3, 3)

        out[name] = {"span_us": round(span / 1e3, 2), "barrier_us": round(sum(bar) / max(len(bar), 1) / 1e3, 3),
                     "work_us": mean(end, begin), "prologue_us": mean(ready, begin),
                     "first_wait_us": mean(tile1, ready), "first_us": mean(mid, ready),
                     "second_wait_us": mean(tile2, mid), "second_us": mean(end, mid)}
    return out


def build(out: Path, defines: tuple[str, ...] = (), variants: bool = True) -> None:
    """Compile the library (and its timing variants) and record ptxas's register / spill report.  ``defines``:
    ``NAME=VALUE`` compile flags of the kernel (e.g. ``PDEC_MMA=1``) for the library and every variant."""
    extra = tuple(f"-D{d}" for d in defines)
    lib, report = P.build_library(out, extra=extra)
    info: dict[str, Any] = {"library": lib.name, "bytes": lib.stat().st_size, "ptxas": P.ptxas_report(report),
                            "defines": list(defines), "variants": {}}
    (out / "ptxas.txt").write_text(report)
    for name, flags in VARIANTS.items() if variants else ():
        vlib, vrep = P.build_library(out, extra=(*extra, *flags), name=f"libctc_pdec_{name}.so")
        info["variants"][name] = {"library": vlib.name, "flags": flags, "ptxas": P.ptxas_report(vrep)}
    (out / "build.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


def make_weights(cfg: dict[str, Any], layers: int, seed: int = SEED) -> tuple[dict[str, Any], dict[str, Any]]:
    """Seeded random weights on the GPU: the kernel's packed int4 tensors and the float32 dequantized ones."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    h, f, hd, nq, nkv, v = cfg["hidden"], cfg["ffn"], cfg["head_dim"], cfg["heads"], cfg["kv_heads"], cfg["vocab"]

    def lin(n: int, k: int) -> Any:
        return torch.randn(n, k, generator=g, device="cuda") * 0.02

    packed: dict[str, list[Any]] = {k: [] for k in ("wqkv", "sqkv", "wo", "so", "wgu", "sgu", "wd", "sd")}
    w32: dict[str, Any] = {}
    for layer in range(layers):
        for name, (n, k) in {"qkv": ((nq + 2 * nkv) * hd, h), "o": (h, h), "gu": (2 * f, h), "d": (h, f)}.items():
            q, s = P.rtn_int4(lin(n, k))
            key = {"qkv": "qkv", "o": "o", "gu": "gu", "d": "down"}[name]
            w32[f"{key}.{layer}"] = P.dequant_int4(q, s)
            packed["w" + name].append(q)
            packed["s" + name].append(s)
    out: dict[str, Any] = {k: torch.stack(vv).contiguous() for k, vv in packed.items()}
    out["attn_norm"] = (1 + 0.1 * torch.randn(layers, h, generator=g, device="cuda")).half()
    out["mlp_norm"] = (1 + 0.1 * torch.randn(layers, h, generator=g, device="cuda")).half()
    out["final_norm"] = (1 + 0.1 * torch.randn(h, generator=g, device="cuda")).half()
    out["emb"] = (torch.randn(v, h, generator=g, device="cuda") * 0.02).half()
    out["whead"], out["shead"] = P.rtn_int4(out["emb"].float())
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    out["inv_freq"] = inv.cuda()
    for layer in range(layers):
        w32[f"attn_norm.{layer}"] = out["attn_norm"][layer].float()
        w32[f"mlp_norm.{layer}"] = out["mlp_norm"][layer].float()
    w32["final_norm"] = out["final_norm"].float()
    w32["emb"] = out["emb"]
    w32["head"] = P.dequant_int4(out["whead"], out["shead"])
    return out, w32


def weight_bytes(packed: dict[str, Any]) -> int:
    """int4 codes + f32 scales read by one step (norms and the one embedding row left out: < 0.1 MB)."""
    return sum(packed[k].numel() * packed[k].element_size()
               for k in ("wqkv", "sqkv", "wo", "so", "wgu", "sgu", "wd", "sd", "whead", "shead"))


def _err(got: Any, ref: Any) -> dict[str, float]:
    d = (got.float() - ref.float()).abs()
    return {"max_abs": round(float(d.max()), 5), "ref_max_abs": round(float(ref.abs().max()), 4),
            "rel_l2": round(float(d.norm() / ref.float().norm().clamp_min(1e-30)), 6)}


def _events(fn: Any, repeat: int) -> dict[str, float]:
    """Median / min of ``repeat`` CUDA-event timings and back-to-back ms: :func:`cuda_decode._events_ms`'s protocol."""
    from cuda_decode import _events_ms

    return _events_ms(fn, repeat)


def check(dec: P.PersistentDecoder, w32: dict[str, Any], cfg: dict[str, Any], layers: int, kc: Any, vc: Any,
          positions: tuple[int, ...]) -> list[dict[str, Any]]:
    """Kernel vs the float32 reference on the same weights and caches, at each position."""
    import torch

    rows = []
    c = {**cfg, "layers": layers}
    k0, v0 = kc.clone(), vc.clone()
    for pos in positions:
        token = (1000 + 7 * pos) % cfg["vocab"]
        kc.copy_(k0)
        vc.copy_(v0)
        kc[:, :, pos:] = 0
        vc[:, :, pos:] = 0
        dec.set(token, pos)
        dec.step(layers=layers)
        torch.cuda.synchronize()
        flag = dec.aborted()
        got = dec.logits.clone()
        mine = dec.intermediates()
        dec.step(layers=layers)  # again on the same inputs (the row it writes is the same): f32 atomics reorder sums
        torch.cuda.synchronize()
        rerun = float((dec.logits - got).abs().max())
        ref, inter = P.reference_step(w32, token, pos, kc, vc, c)
        # the cache row this step wrote (last layer, after RoPE) vs the reference key (rounded to fp16 there)
        row = {"layers": layers, "pos": pos, "token": token, "aborted": flag, "logits": _err(got, ref),
               "argmax_equal": int(got.argmax()) == int(ref.argmax()), "rerun_max_abs": rerun,
               "top5_overlap": len(set(got.topk(5).indices.tolist()) & set(ref.topk(5).indices.tolist())),
               **{k: _err(mine[k], inter[k]) for k in ("qkv", "attn", "h", "x")}}
        # the new k/v row of the last layer, as written by the kernel, against the reference's RoPE'd key
        hd, nq, nkv = cfg["head_dim"], cfg["heads"], cfg["kv_heads"]
        inv = w32.get("_inv")
        if inv is not None:
            ang = float(pos) * inv
            cos, sin = torch.cat([ang, ang]).cos(), torch.cat([ang, ang]).sin()
            k = inter["qkv"][nq * hd:(nq + nkv) * hd].view(nkv, hd)
            kr = k * cos + torch.cat([-k[:, hd // 2:], k[:, :hd // 2]], dim=-1) * sin
            row["k_row"] = _err(kc[layers - 1, :, pos].float(), kr)
            row["v_row"] = _err(vc[layers - 1, :, pos].float(), inter["qkv"][(nq + nkv) * hd:].view(nkv, hd))
        rows.append(row)
        print(json.dumps(row), flush=True)
    kc.copy_(k0)
    vc.copy_(v0)
    return rows


def run(out: Path, repeat: int, results: Path, quick: bool = False) -> dict[str, Any]:
    """Check and time the kernel on this machine's GPU (see the module docstring)."""
    import torch
    from cuda_decode import copy_bandwidth

    cfg = dict(P.LLAMA_1B)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "repeat": repeat, "rows": [], "checks": [], "errors": []}

    def save() -> None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(res, indent=1))

    res["copy_tb_s_start"] = round(copy_bandwidth(), 3)
    print(f"copy bandwidth {res['copy_tb_s_start']} TB/s", flush=True)
    t0 = time.perf_counter()
    packed, w32 = make_weights(cfg, cfg["layers"])
    w32["_inv"] = packed["inv_freq"]
    res["weights_s"] = round(time.perf_counter() - t0, 1)
    res["weight_bytes"] = weight_bytes(packed)
    g = torch.Generator(device="cuda").manual_seed(SEED + 1)
    shape = (cfg["layers"], cfg["kv_heads"], MAX_LEN, cfg["head_dim"])
    kc = torch.randn(shape, generator=g, device="cuda").half()
    vc = torch.randn(shape, generator=g, device="cuda").half()
    dec = P.PersistentDecoder(out / "libctc_pdec.so", packed, kc, vc, eps=cfg["eps"])
    res.update(grid=dec.grid, smem=dec.smem, threads=dec.threads)
    print(f"grid {dec.grid} x {dec.threads} threads, {dec.smem} B shared; weights {res['weight_bytes'] / 1e6:.1f} MB "
          f"made in {res['weights_s']} s", flush=True)
    save()

    # barrier cost: n barriers in one launch, two n, the difference per barrier
    try:
        if quick:
            raise RuntimeError("skipped (--quick)")
        t81 = _events(lambda: dec.barrier_bench(81), repeat)
        t810 = _events(lambda: dec.barrier_bench(810), max(repeat // 4, 20))
        res["barrier"] = {"81": t81, "810": t810,
                          "us_per_barrier": round((t810["median_ms"] - t81["median_ms"]) / 729 * 1e3, 3),
                          "aborted": dec.aborted()}
        print("barrier", json.dumps(res["barrier"]), flush=True)
    except Exception as e:  # noqa: BLE001
        res["errors"].append(f"barrier: {type(e).__name__}: {e}")
        traceback.print_exc()
    save()

    if quick:  # one layer, two positions: a short run for compute-sanitizer
        res["checks"] += check(dec, w32, cfg, 1, kc, vc, (5, 128))
        save()
        return res
    for layers, positions in ((1, (5, 128, 1024)), (cfg["layers"], CHECK_POS)):
        try:
            res["checks"] += check(dec, w32, cfg, layers, kc, vc, positions)
        except Exception as e:  # noqa: BLE001
            res["errors"].append(f"check {layers}: {type(e).__name__}: {e}")
            traceback.print_exc()
        save()
    dec.args.layers = cfg["layers"]

    wb = res["weight_bytes"]
    for pos in TIME_POS:
        row: dict[str, Any] = {"pos": pos}
        try:
            dec.set(1000, pos)
            row["launch"] = _events(dec.step, repeat)
            row["aborted_launch"] = dec.aborted()
            for mode, name in ((1, "no_barriers"), (2, "no_arithmetic"), (3, "stream_only")):
                row[name] = _events(lambda mode=mode: dec.step(mode=mode), repeat)
                row[f"aborted_{name}"] = dec.aborted()
            dec.step()
            torch.cuda.synchronize()
            graph = None
            for coop in (1, 0):
                try:
                    dec.coop = coop
                    s = torch.cuda.Stream()
                    s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s):
                        dec.step()
                    torch.cuda.current_stream().wait_stream(s)
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        dec.step()
                    row["graph_coop"] = coop
                    break
                except Exception as e:  # noqa: BLE001
                    row[f"graph_error_coop{coop}"] = f"{type(e).__name__}: {e}"[:300]
                    graph = None
            dec.coop = 1
            if graph is not None:
                row["graph"] = _events(graph.replay, repeat)
                row["aborted_graph"] = dec.aborted()
            kv = 2 * cfg["layers"] * cfg["kv_heads"] * pos * cfg["head_dim"] * 2
            row["kv_bytes"] = kv
            copy = res["copy_tb_s_start"]
            for key in ("launch", "graph", "no_barriers", "stream_only"):
                if key in row:
                    for stat in ("median_ms", "min_ms", "back_to_back_ms"):
                        tbs = wb / (row[key][stat] * 1e-3) / 1e12
                        row[key][f"weights_tb_s_{stat[:-3]}"] = round(tbs, 3)
                        row[key][f"pct_copy_{stat[:-3]}"] = round(100 * tbs / copy, 1)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:400]
            traceback.print_exc()
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()
    # attention chunk span (run-time): fewer, longer chunks; one chunk a kv head skips the merge
    res["spans"] = {}
    for span in SPANS:
        try:
            dec.args.att_span = span
            sp: dict[str, Any] = {"check": check(dec, w32, cfg, cfg["layers"], kc, vc, (128, 1024))}
            sp["check"] = [{k: c[k] for k in ("pos", "aborted", "logits", "argmax_equal")} for c in sp["check"]]
            for pos in TIME_POS:
                dec.set(1000, pos)
                sp[f"launch_{pos}"] = _events(dec.step, repeat)
            res["spans"][span] = sp
            print(f"span {span}", json.dumps(sp), flush=True)
        except Exception as e:  # noqa: BLE001
            res["errors"].append(f"span {span}: {type(e).__name__}: {e}")
            traceback.print_exc()
        dec.args.att_span = 0
    save()
    # one traced step per timed position: where the time goes
    try:
        dec.enable_trace()
        for pos in TIME_POS:
            dec.set(1000, pos)
            for _ in range(3):
                dec.step()
            torch.cuda.synchronize()
            res[f"trace_{pos}"] = trace_breakdown(dec.trace, cfg["layers"])
            print(f"trace {pos}", json.dumps(res[f"trace_{pos}"]), flush=True)
        dec.enable_trace(False)
    except Exception as e:  # noqa: BLE001
        res["errors"].append(f"trace: {type(e).__name__}: {e}")
        traceback.print_exc()
    # diagnostics: where the per-block chain goes when the weights are L2-resident or not copied at all
    try:
        dec.set(1000, 128)
        rows128 = kc[:, :, 128].clone(), vc[:, :, 128].clone()  # mode 8 writes non-finite rows at 128
        vocab = dec.args.vocab
        dec.args.vocab = DIAG_VOCAB
        small = wb - packed["whead"].numel() - packed["shead"].numel() * 4 + DIAG_VOCAB * (1024 + 64)
        diag: dict[str, Any] = {"bytes": small, "vocab": DIAG_VOCAB}
        for name, mode in DIAG.items():
            diag[name] = _events(lambda mode=mode: dec.step(mode=mode), repeat)
            diag[name]["weights_tb_s_back_to_back"] = round(small / (diag[name]["back_to_back_ms"] * 1e-3) / 1e12, 3)
            diag[f"aborted_{name}"] = dec.aborted()
        dec.enable_trace()
        for name in ("l2_weights", "no_copies"):
            for _ in range(3):
                dec.step(mode=DIAG[name])
            torch.cuda.synchronize()
            diag[f"trace_{name}"] = trace_breakdown(dec.trace, cfg["layers"])
        dec.enable_trace(False)
        dec.args.vocab = vocab
        dec.ws.zero_()  # mode 8 left non-finite values in the residual buffers
        kc[:, :, 128], vc[:, :, 128] = rows128
        res["diag"] = diag
        print("diag", json.dumps(diag), flush=True)
    except Exception as e:  # noqa: BLE001
        res["errors"].append(f"diag: {type(e).__name__}: {e}")
        traceback.print_exc()
    save()
    # the logits after all the timing runs still match (the caches were rewritten at the timed positions only)
    try:
        res["checks"] += check(dec, w32, cfg, cfg["layers"], kc, vc, (1024,))
    except Exception as e:  # noqa: BLE001
        res["errors"].append(f"recheck: {type(e).__name__}: {e}")
    save()
    res["variants"] = {}
    for name in VARIANTS:
        path = out / f"libctc_pdec_{name}.so"
        if not path.exists():
            continue
        v: dict[str, Any] = {}
        try:
            vd = P.PersistentDecoder(path, packed, kc, vc, eps=cfg["eps"])
            v["check"] = check(vd, w32, cfg, cfg["layers"], kc, vc, (1024,))[0]["logits"]
            for pos in TIME_POS:
                vd.set(1000, pos)
                v[f"launch_{pos}"] = _events(vd.step, repeat)
                v[f"aborted_{pos}"] = vd.aborted()
            v["barrier_us"] = round((_events(lambda vd=vd: vd.barrier_bench(810), 20)["median_ms"]
                                     - _events(lambda vd=vd: vd.barrier_bench(81), 20)["median_ms"]) / 729 * 1e3, 3)
        except Exception as e:  # noqa: BLE001
            v["error"] = f"{type(e).__name__}: {e}"[:300]
        res["variants"][name] = v
        print(name, json.dumps(v), flush=True)
        save()
    res["copy_tb_s_end"] = round(copy_bandwidth(), 3)
    save()
    return res


def profile(out: Path, modes: tuple[int, ...]) -> None:
    """One step at KV 128 per mode between cudaProfilerStart / Stop, for ``ncu --profile-from-start off``."""
    import torch

    cfg = dict(P.LLAMA_1B)
    packed, _ = make_weights(cfg, cfg["layers"])
    g = torch.Generator(device="cuda").manual_seed(SEED + 1)
    shape = (cfg["layers"], cfg["kv_heads"], MAX_LEN, cfg["head_dim"])
    kc = torch.randn(shape, generator=g, device="cuda").half()
    vc = torch.randn(shape, generator=g, device="cuda").half()
    dec = P.PersistentDecoder(out / "libctc_pdec.so", packed, kc, vc, eps=cfg["eps"])
    dec.set(1000, 128)
    for mode in modes:
        dec.step(mode=mode)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for mode in modes:
        dec.step(mode=mode)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled modes", modes, "aborted", dec.aborted(), flush=True)


def table(res: dict[str, Any]) -> str:
    """A short text summary of :func:`run`'s results."""
    lines = [f"{res['device']}, torch {res['torch']} (CUDA {res['cuda']}), copy {res.get('copy_tb_s_start')} / "
             f"{res.get('copy_tb_s_end')} TB/s, grid {res.get('grid')}, "
             f"weights {res.get('weight_bytes', 0) / 1e6:.1f} MB"]
    if "barrier" in res:
        lines.append(f"grid barrier: {res['barrier']['us_per_barrier']} us each")
    for c in res["checks"]:
        lines.append(f"check L{c['layers']} pos {c['pos']}: logits max abs {c['logits']['max_abs']} (ref max "
                     f"{c['logits']['ref_max_abs']}), argmax {'=' if c['argmax_equal'] else '!='}, "
                     f"top5 {c['top5_overlap']}/5, x {c['x']['max_abs']}, attn {c['attn']['max_abs']}, "
                     f"h {c['h']['max_abs']}, rerun diff {c.get('rerun_max_abs')}, aborted {c['aborted']}")
    for r in res["rows"]:
        for key in ("launch", "graph", "no_barriers", "no_arithmetic", "stream_only"):
            if key in r:
                t = r[key]
                lines.append(f"pos {r['pos']} {key:14s} median {t['median_ms']:.4f} min {t['min_ms']:.4f} b2b "
                             f"{t['back_to_back_ms']:.4f} ms  " +
                             (f"{t.get('pct_copy_median', '')}% / {t.get('pct_copy_back_to_back', '')}% of copy"
                              if "pct_copy_median" in t else ""))
    for pos in TIME_POS:
        tr = res.get(f"trace_{pos}")
        if tr:
            lines.append(f"trace pos {pos}: total {tr['total_us']} us; " + "; ".join(
                f"{k} span {tr[k]['span_us']} barrier {tr[k]['barrier_us']} work {tr[k]['work_us']} prologue "
                f"{tr[k]['prologue_us']} first {tr[k]['first_us']} (tile wait {tr[k]['first_wait_us']}) second "
                f"{tr[k]['second_us']} (tile wait {tr[k]['second_wait_us']})" for k in STAGES))
    d = res.get("diag")
    if d:
        head = f"diagnostics at KV 128, LM head cut to {d['vocab']} rows ({d['bytes'] / 1e6:.1f} MB): "
        lines.append(head + "; ".join(
            f"{k} {d[k]['median_ms']} / b2b {d[k]['back_to_back_ms']} ms ({d[k]['weights_tb_s_back_to_back']} TB/s)"
            for k in DIAG if k in d))
        for name in ("l2_weights", "no_copies"):
            tr = d.get(f"trace_{name}")
            if tr:
                lines.append(f"trace {name}: total {tr['total_us']} us; " + "; ".join(
                    f"{k} span {tr[k]['span_us']} barrier {tr[k]['barrier_us']} prologue {tr[k]['prologue_us']} "
                    f"first {tr[k]['first_us']} second {tr[k]['second_us']}" for k in STAGES))
    for span, sp in res.get("spans", {}).items():
        lines.append(f"span {span}: " + ", ".join(
            f"pos {p} median {sp[f'launch_{p}']['median_ms']} b2b {sp[f'launch_{p}']['back_to_back_ms']} ms"
            for p in TIME_POS if f"launch_{p}" in sp) + " max abs " +
            " / ".join(str(c["logits"]["max_abs"]) for c in sp.get("check", [])))
    for name, v in res.get("variants", {}).items():
        lines.append(f"variant {name}: " + ", ".join(
            f"pos {p} median {v[f'launch_{p}']['median_ms']} b2b {v[f'launch_{p}']['back_to_back_ms']} ms"
            for p in TIME_POS if f"launch_{p}" in v) + f" {v.get('error', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``build OUT`` here, ``run OUT`` on the GPU machine."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the kernel library (nvcc; no GPU needed)")
    b.add_argument("out", type=Path)
    b.add_argument("-D", "--define", action="append", default=[], metavar="NAME=VALUE",
                   help="a compile flag of the kernel, e.g. PDEC_MMA=1 (repeatable)")
    b.add_argument("--no-variants", action="store_true", help="build the main library only")
    r = sub.add_parser("run", help="check and time it on the GPU")
    r.add_argument("out", type=Path)
    r.add_argument("--repeat", type=int, default=100)
    r.add_argument("--quick", action="store_true", help="only a 1-layer check (for compute-sanitizer)")
    r.add_argument("--results", type=Path, default=Path(os.environ.get("OUT", ".")) / "persistent_decode.json")
    f = sub.add_parser("profile", help="one step per mode inside cudaProfilerStart/Stop (for ncu)")
    f.add_argument("out", type=Path)
    f.add_argument("--modes", type=int, nargs="+", default=[0])
    args = p.parse_args(argv)
    if args.cmd == "profile":
        profile(args.out, tuple(args.modes))
        return 0
    if args.cmd == "build":
        build(args.out, tuple(args.define), not args.no_variants)
        return 0
    res = run(args.out, args.repeat, args.results, args.quick)
    print(table(res))
    bad = [c for c in res["checks"] if c["aborted"] or c["logits"]["max_abs"] > 0.5] or not res["checks"]
    print("CHECKS FAILED" if bad else "CHECKS OK", flush=True)
    return 3 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
