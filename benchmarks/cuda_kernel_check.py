"""Check ctc's hand-scheduled CUDA kernels one by one against PyTorch, on the GPU machine.

``build OUT`` (here, nvcc, no GPU) compiles each kernel of :mod:`ctc.backends.tvm.cuda_kernels` for a
list of shapes into ``OUT/<name>.so`` (plain TIR modules, no Relax) with ``OUT/kernels.json``;
``run OUT`` (the GPU machine: torch, tvm_ffi, ``$CTC_TVM_LIBDIR``) calls each on random inputs and
compares with a float32 PyTorch computation of the same function, poisoning outputs first so an
unwritten element fails.  A model-level check (``cuda_decode.py``) says *whether* the kernels are
right together; this says *which* one is not.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from pathlib import Path
from typing import Any

GEMVS = [  # rows, K, N, dtype, weight, group, prologue, eps, epilogue
    (1, 576, 960, "float16", "dense", -1, "rms", 1e-5, "none"),
    (1, 576, 1536, "float16", "dense", -1, "rms", 1e-5, "silu_mul"),
    (1, 1536, 576, "float16", "dense", -1, "none", 1e-5, "residual"),
    (8, 2048, 2048, "float16", "int4", 128, "none", 1e-5, "residual"),
    (1, 576, 1536, "float16", "int4", 128, "rms", 1e-5, "silu_mul"),
    (2, 256, 64, "float16", "int8", -1, "none", 1e-5, "none"),
    (1, 576, 960, "float16", "int8", 64, "rms", 1e-5, "none"),
    (3, 1536, 200, "float16", "int4", 32, "none", 1e-5, "residual"),     # rows past N in the last block
    # the Llama-3.2-1B decode step's four GEMVs with int4 weights (groups of 128), batch 1 and 8 (timed with --time)
    (1, 2048, 3072, "float16", "int4", 128, "rms", 1e-5, "none"),
    (1, 2048, 2048, "float16", "int4", 128, "none", 1e-5, "residual"),
    (1, 2048, 8192, "float16", "int4", 128, "rms", 1e-5, "silu_mul"),
    (1, 8192, 2048, "float16", "int4", 128, "none", 1e-5, "residual"),
    (8, 2048, 8192, "float16", "int4", 128, "rms", 1e-5, "silu_mul"),
    (8, 8192, 2048, "float16", "int4", 128, "none", 1e-5, "residual"),
    (1, 2048, 128256, "float16", "int4", 128, "rms", 1e-5, "none"),      # the final norm + int4 LM head
    (8, 2048, 128256, "float16", "int4", 128, "rms", 1e-5, "none"),      # batch 8
    (1, 2048, 8192, "float16", "dense", -1, "rms", 1e-5, "silu_mul"),
    (8, 2048, 8192, "float16", "dense", -1, "rms", 1e-5, "silu_mul"),     # the fp16 batch-8 step's
    (8, 8192, 2048, "float16", "dense", -1, "none", 1e-5, "residual"),
]
ATTENTION = [  # batch, q heads, kv heads, keys, head dim, mask kind
    (1, 9, 3, 1088, 64, "bool"),
    (8, 32, 8, 1088, 64, "bool"),
    (1, 4, 4, 100, 64, "none"),
    (1, 9, 3, 1088, 64, "none"),      # every chunk full
    (1, 32, 8, 1088, 64, "bool"),     # the Llama-1B decode step's
]
ROPE = [(1, 9, 3, 1088, 64), (8, 32, 8, 1088, 64)]
GEMMS = [  # rows, K, N (weight rows), dtype, epilogue: the Llama-3.2-1B prefill-512 linears, then odd shapes
    (512, 2048, 3072, "float16", "none"),        # q|k|v
    (512, 2048, 2048, "float16", "residual"),    # o + residual
    (512, 2048, 16384, "float16", "silu_mul"),   # gate|up + SwiGLU
    (512, 8192, 2048, "float16", "residual"),    # down + residual
    (512, 2048, 128256, "float16", "none"),      # LM head
    (77, 576, 960, "float16", "none"),           # rows not a multiple of the tile (SmolLM2 q|k|v)
    (77, 576, 3072, "float16", "silu_mul"),
    (100, 1536, 576, "bfloat16", "residual"),
]
QGEMMS = [  # rows, K, N, dtype, epilogue, bits, group: weight expansion + GEMM, the int4 Llama-1B prefill's linears
    (512, 2048, 3072, "float16", "none", 4, 128),
    (512, 2048, 2048, "float16", "residual", 4, 128),
    (512, 2048, 16384, "float16", "silu_mul", 4, 128),
    (512, 8192, 2048, "float16", "residual", 4, 128),
    (512, 2048, 128256, "float16", "none", 4, 128),
    (77, 576, 960, "float16", "none", 8, -1),
    (100, 1536, 576, "bfloat16", "residual", 4, 32),
]
FLASH = [  # batch, q heads, kv heads, queries, keys, head dim, dtype, mask ("none" | "bool" | "add"), causal
    (1, 32, 8, 512, 512, 64, "float16", "bool", False),    # the Llama-3.2-1B prefill-512 attention
    (2, 9, 3, 77, 77, 64, "float16", "add", False),
    (1, 4, 4, 100, 130, 128, "bfloat16", "none", True),
    (1, 32, 8, 512, 512, 64, "float16", "none", True),
]
GEMM_SWEEP = [((128, 128, 64, 32, 4), 1), ((64, 64, 32, 32, 4), 1), ((128, 128, 64, 32, 4), 2),
              ((128, 128, 64, 32, 4), 4), ((128, 128, 64, 32, 4), 8), ((64, 64, 32, 32, 4), 2)]
WGMMA_SWEEP = [  # warpgroup-MMA variants (sm_90a): (128, BN, 64, BN, stages), K splits, products in flight, staged
    ((128, 256, 64, 256, 4), 1, 1, None), ((128, 256, 64, 256, 3), 1, 1, None), ((128, 128, 64, 128, 4), 1, 1, None),
    ((128, 128, 64, 128, 6), 1, 1, None), ((128, 64, 64, 64, 4), 1, 1, None), ((128, 128, 64, 128, 4), 2, 1, None),
    ((128, 128, 64, 128, 4), 4, 1, None), ((128, 256, 64, 256, 4), 2, 1, None)]
WGMMA_KNOBS = [(0, False), (1, True), (1, False), (0, True)]  # (in flight, staged) on the picked tile, --wgmma-sweep


def build(out: Path, sweep: bool = False, only: list[str] | None = None, wg_sweep: bool = False) -> None:
    from ctc.backends.tvm import cuda_flash as CF
    from ctc.backends.tvm import cuda_gemm as G
    from ctc.backends.tvm import cuda_kernels as CK
    from ctc.backends.tvm.cuda_toolchain import nvcc_compile_mode, prepare_cuda_build
    from ctc.backends.tvm.targets import cuda_target

    prepare_cuda_build()
    import tvm

    tgt = tvm.target.Target(cuda_target("sm_90"))
    tgt_a = tvm.target.Target(cuda_target("sm_90a"))  # the warpgroup-MMA GEMM's (wgmma is sm_90a only)
    out.mkdir(parents=True, exist_ok=True)
    cases: list[dict[str, Any]] = []

    def add(kind: str, spec: Any, func: Any, combine: Any = None, dequant: Any = None, **more: Any) -> None:
        if only and kind not in only:
            return
        target = tgt_a if getattr(spec, "wgmma", False) else tgt
        name = f"{kind}{'_wg' if target is tgt_a else ''}_{len(cases)}"
        funcs = {"kernel": func.with_attr("global_symbol", "kernel")}
        if dequant is not None:  # the integer weight's expansion, run before the kernel
            funcs["dequant"] = dequant.with_attr("global_symbol", "dequant")
        if combine is not None:  # a second kernel that runs after the first on its f32 partial results
            funcs["combine"] = combine.with_attr("global_symbol", "combine")
        with nvcc_compile_mode(), target:
            tvm.compile(tvm.IRModule(funcs), target).export_library(str(out / f"{name}.so"))
        extra = {"key_chunks": spec.key_chunks} if kind == "attention" else dict(more)
        if kind.startswith("gemm"):
            extra["tiles"] = spec.tiles
        cases.append({"name": name, "kind": kind, "spec": {**spec.__dict__, **extra}})
        print("built", name, spec, flush=True)

    for g in GEMVS:
        spec = CK.GemvSpec(*g)
        add("gemv", spec, CK.gemv_func(spec))
        if spec.weight == "int4" and spec.dtype == "float16":  # the TIR kernel the half2 one replaced, for scale
            add("gemv", CK.GemvSpec(*g, impl="tir"), CK.gemv_func(CK.GemvSpec(*g, impl="tir")))
        if sweep and (spec.weight != "dense" or spec.rows >= 4) and spec.k * spec.n >= 2048 * 2048:  # layout knobs
            for rows in (r for r in (1, 2, 4, 8) if r * spec.rows <= 16):  # registers: rows x batch sums
                for shared in ((None,) if spec.prologue == "rms" else (None, False)):
                    if (rows, shared) != (spec.rows_per_warp, None):
                        v = CK.GemvSpec(*g, warp_rows=rows, x_in_shared=shared)
                        add("gemv", v, CK.gemv_func(v))
    for b, h, hk, s, d, mask in ATTENTION:
        for chunks in (0, 1):  # chunks from the shape (split over keys where it pays), and one block per head
            spec = CK.AttentionSpec(b, h, hk, s, d, "float16", 1.0 / d ** 0.5, mask, chunks=chunks)
            if chunks and spec.key_chunks == CK.AttentionSpec(b, h, hk, s, d, "float16", 1.0, mask).key_chunks:
                continue
            add("attention", spec, CK.decode_attention_func(spec),
                CK.decode_attention_combine_func(spec) if spec.key_chunks > 1 else None)
    for b, h, hk, s, d in ROPE:
        spec = CK.RopeWriteSpec(b, h, hk, s, d, "float16", 1)
        add("rope", spec, CK.rope_write_func(spec))
    for b, hq, hk, sq, sk, d, dt, mask, causal in FLASH:
        fspec = CF.FlashSpec(hq, hk, d, dt, 1.0 / d ** 0.5, mask != "none", causal)
        add("flash", fspec, CF.flash_func(fspec), batch=b, queries=sq, keys=sk, mask_kind=mask)
    for rows, k, n, dt, epi in GEMMS:
        variants = [G.GemmSpec(k, n, dt, epi, rows_hint=rows)]
        if rows == 512 and n < 100000:  # dlight's wmma schedule of the same product (no epilogue), for scale
            add("gemm_dlight", variants[0], _dlight_matmul(rows, k, n, dt, tgt), rows=rows)
        for tile, splits in GEMM_SWEEP if sweep and rows == 512 else ():
            v = G.GemmSpec(k, n, dt, epi, rows_hint=rows, tile=tile, splits=splits)
            if (v.tiles, v.k_splits) != (variants[0].tiles, variants[0].k_splits) and G.gemm_supported(v) is None:
                variants.append(v)
        wg = G.GemmSpec(k, n, dt, epi, rows_hint=rows, wgmma=True)  # sm_90a: the tile the lowering picks
        variants += [wg] if G.gemm_supported(wg) is None else []
        for tile, splits, fl, staged in WGMMA_SWEEP if (sweep or wg_sweep) and rows == 512 else ():
            v = G.GemmSpec(k, n, dt, epi, rows_hint=rows, tile=tile, splits=splits, wgmma=True, wg_inflight=fl,
                           wg_staged=staged)
            if v.tag != wg.tag and G.gemm_supported(v) is None:
                variants.append(v)
        if (sweep or wg_sweep) and rows != 512:  # the staged epilogue past the last row, bf16, residual, SwiGLU
            variants.append(G.GemmSpec(k, n, dt, epi, rows_hint=rows, tile=wg.tiles, splits=1, wgmma=True,
                                       wg_staged=True))
        for fl, staged in WGMMA_KNOBS if (sweep or wg_sweep) and rows == 512 else ():
            v = G.GemmSpec(k, n, dt, epi, rows_hint=rows, tile=wg.tiles, splits=wg.k_splits, wgmma=True,
                           wg_inflight=fl, wg_staged=staged)
            if G.gemm_supported(v) is None and v.tag != wg.tag and (not staged or v.k_splits == 1):
                variants.append(v)
            if v.tiles[1] == 256 and not staged and fl == 0:  # in flight 0 frees a stage: 3 of them, 2 per SM?
                v3 = G.GemmSpec(k, n, dt, epi, rows_hint=rows, tile=(128, 256, 64, 256, 3), splits=1, wgmma=True,
                                wg_inflight=0)
                variants.append(v3)
        for v in variants:
            add("gemm", v, G.gemm_func(v), G.splitk_reduce_func(v) if v.k_splits > 1 else None, rows=rows,
                k_splits=v.k_splits)
    for rows, k, n, dt, epi, bits, group in QGEMMS:
        dq = G.DequantSpec(n, k, bits, group, dt)
        for wgmma in (False, True):
            v = G.GemmSpec(k, n, dt, epi, rows_hint=rows, wgmma=wgmma)
            if G.gemm_supported(v) is None:
                add("gemm_q", v, G.gemm_func(v), G.splitk_reduce_func(v) if v.k_splits > 1 else None,
                    G.dequant_func(dq), rows=rows, k_splits=v.k_splits, bits=bits, group=group)
    (out / "kernels.json").write_text(json.dumps(cases, indent=1))


def _dlight_matmul(rows: int, k: int, n: int, dt: str, tgt: Any) -> Any:
    """``C = A @ W^T`` (f32 sums, rounded to ``dt``) scheduled by dlight's GPU ``Matmul`` rule, as the op-by-op
    lowering builds a prefill linear."""
    import tvm
    from tvm import te
    from tvm.s_tir import dlight as dl

    a = te.placeholder((rows, k), dt, name="A")
    w = te.placeholder((n, k), dt, name="W")
    r = te.reduce_axis((0, k), name="r")
    acc = te.compute((rows, n), lambda i, j: te.sum(a[i, r].astype("float32") * w[j, r].astype("float32"), axis=r),
                     name="acc")
    c = te.compute((rows, n), lambda i, j: acc[i, j].astype(dt), name="C")
    mod = tvm.IRModule({"main": te.create_prim_func([a, w, c])})
    with tgt:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul())(mod)
    return mod["main"]


# ---------------------------------------------------------------------------- references (torch, f32)
def _gemv_case(spec: dict[str, Any], dev: str) -> tuple[list[Any], Any, Any]:
    import torch

    from ctc.ir import quant as Q

    m, k, n = spec["rows"], spec["k"], spec["n"]
    nw = 2 * n if spec["epilogue"] == "silu_mul" else n
    x = torch.randn(m, k, device=dev).half()
    w = (torch.randn(nw, k, device=dev) * 0.05)
    args: list[Any] = [x]
    h = x.float()
    if spec["prologue"] == "rms":
        gam = (1 + 0.1 * torch.randn(k, device=dev)).half()
        args.append(gam)
        r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + spec["eps"])
        h = (gam.float() * (h * r).half().float()).half().float()
    if spec["weight"] == "dense":
        w = w.half()
        args.append(w)
        wf = w.float()
    else:
        qw = Q.quantize_weight(w.cpu(), 4 if spec["weight"] == "int4" else 8, spec["group"], True)
        args += [qw.qweight.to(dev), qw.scale.to(dev), qw.zero.to(dev)]
        wf = Q.dequantize_weight(qw.qweight, qw.scale, qw.zero, qw.bits, qw.group_size, k).to(dev)
    y = (h @ wf.T).half().float()
    if spec["epilogue"] == "residual":
        res = torch.randn(m, n, device=dev).half()
        args.append(res)
        y = y + res.float()
    elif spec["epilogue"] == "silu_mul":
        y = torch.nn.functional.silu(y[:, :n].half()).float() * y[:, n:]
    out = torch.full((m, n), float("nan"), device=dev, dtype=torch.float16)
    return args, out, y


def _attention_case(spec: dict[str, Any], dev: str) -> tuple[list[Any], Any, Any]:
    import torch

    b, h, hk, s, d = spec["batch"], spec["q_heads"], spec["kv_heads"], spec["keys"], spec["head_dim"]
    q = torch.randn(b, h, 1, d, device=dev).half()
    k = torch.randn(b, hk, s, d, device=dev).half()
    v = torch.randn(b, hk, s, d, device=dev).half()
    args = [q, k, v]
    mask = None
    if spec["mask"] == "bool":
        valid = min(s, 129)
        mask = torch.arange(s, device=dev) < valid
        args.append(mask.reshape(1, 1, s))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(h // hk, 1), v.float().repeat_interleave(h // hk, 1),
        attn_mask=mask.reshape(1, 1, 1, s) if mask is not None else None, scale=spec["scale"])
    out = torch.full((b, h, 1, d), float("nan"), device=dev, dtype=torch.float16)
    return args, out, ref


def _rope_case(spec: dict[str, Any], dev: str) -> tuple[list[Any], Any, Any]:
    import torch

    from ctc.ir.ops.attention import rotary_embedding

    b, h, hk, s, d = spec["batch"], spec["q_heads"], spec["kv_heads"], spec["keys"], spec["head_dim"]
    y = torch.randn(b, (h + 2 * hk) * d, device=dev).half()
    ang = torch.rand(1, d // 2, device=dev) * 6
    cos, sin = torch.cat([ang, ang], -1).cos().half(), torch.cat([ang, ang], -1).sin().half()
    pos = torch.tensor([77], device=dev)
    kc, vc = torch.randn(b, hk, s, d, device=dev).half(), torch.randn(b, hk, s, d, device=dev).half()
    q_ref = rotary_embedding(y[:, :h * d].reshape(b, h, 1, d), cos, sin)
    k_ref = rotary_embedding(y[:, h * d:(h + hk) * d].reshape(b, hk, 1, d), cos, sin)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    kc_ref[:, :, 77] = k_ref[:, :, 0]
    vc_ref[:, :, 77] = y[:, (h + hk) * d:].reshape(b, hk, d)
    out = torch.full((b, h, 1, d), float("nan"), device=dev, dtype=torch.float16)
    return [y, cos, sin, pos, kc, vc], out, (q_ref.float(), kc_ref, vc_ref)


def _gemm_case(spec: dict[str, Any], dev: str) -> tuple[list[Any], Any, Any]:
    import torch

    dt = torch.float16 if spec["dtype"] == "float16" else torch.bfloat16
    w = (torch.randn(spec["n"], spec["k"], device=dev) * 0.05).to(dt)
    return _gemm_finish(spec, dev, w.float(), [w])


def _gemm_q_case(spec: dict[str, Any], dev: str) -> tuple[list[Any], Any, Any]:
    """An integer weight (ctc's quantizer, symmetric): the reference multiplies by its f32 dequantized form."""
    import torch

    from ctc.ir import quant as Q

    w = torch.randn(spec["n"], spec["k"]) * 0.05
    qw = Q.quantize_weight(w, spec["bits"], spec["group"], True)
    wf = Q.dequantize_weight(qw.qweight, qw.scale, qw.zero, qw.bits, qw.group_size, spec["k"]).to(dev)
    return _gemm_finish(spec, dev, wf, [qw.qweight.to(dev), qw.scale.to(dev), qw.zero.to(dev)])


def _gemm_finish(spec: dict[str, Any], dev: str, wf: Any, weights: list[Any]) -> tuple[list[Any], Any, Any]:
    """Args ``[A, *weights[, R]]``, the poisoned output and the f32 reference of ``A wf^T`` with the epilogue;
    for SwiGLU the weight operands' rows are interleaved as the kernel reads them (gate and up by 8)."""
    import torch

    from ctc.backends.tvm.cuda_gemm import gate_up_order

    m, k, n, epi = spec["rows"], spec["k"], spec["n"], spec["epilogue"]
    dt = torch.float16 if spec["dtype"] == "float16" else torch.bfloat16
    a = torch.randn(m, k, device=dev).to(dt)
    y = (a.float() @ wf.T).to(dt).float()
    args: list[Any] = [a, *weights]
    n_out = n
    if epi == "residual":
        res = torch.randn(m, n, device=dev).to(dt)
        args.append(res)
        y = (y + res.float()).to(dt).float()
    elif epi == "silu_mul":
        n_out = n // 2
        gate, up = y[:, :n_out], y[:, n_out:]
        y = (torch.nn.functional.silu(gate.to(dt)).float() * up).to(dt).float()
        order = torch.from_numpy(gate_up_order(n_out)).to(dev)
        args[1:1 + len(weights)] = [t[order].contiguous() for t in weights]
    out = torch.full((m, n_out), float("nan"), device=dev, dtype=dt)
    return args, out, y


def _flash_case(spec: dict[str, Any], dev: str) -> tuple[list[Any], Any, Any]:
    import torch

    b, hq, hk, d = spec["batch"], spec["q_heads"], spec["kv_heads"], spec["head_dim"]
    sq, sk = spec["queries"], spec["keys"]
    dt = torch.float16 if spec["dtype"] == "float16" else torch.bfloat16
    shapes = ((hq, sq), (hk, sk), (hk, sk))
    q, k, v = (torch.randn(b, h, n, d, device=dev).to(dt) for h, n in shapes)
    args: list[Any] = [q, k, v]
    add = None
    if spec["mask_kind"] != "none":  # causal-like with a few extra holes; every row keeps key 0
        keep = torch.ones(sq, sk, device=dev, dtype=torch.bool).tril(sk - sq)
        keep[:, 1::7] = False
        keep[:, 0] = True
        add = torch.zeros(sq, sk, device=dev).masked_fill(~keep, float("-inf"))
        if spec["mask_kind"] == "add":
            add = add + torch.randn(sq, sk, device=dev).clamp(-2, 2) * keep
        args.append(add.reshape(1, 1, sq, sk))  # the lowering hands the kernel an f32 additive mask
    g = hq // hk
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1),
        attn_mask=None if add is None else add.reshape(1, 1, sq, sk), is_causal=spec["causal"] and add is None,
        scale=spec["scale"])
    if spec["causal"] and add is not None:
        raise ValueError("flash cases take a mask or the causal rule, not both")
    out = torch.full((b, hq, sq, d), float("nan"), device=dev, dtype=dt)
    return args, out, ref


def _gemm_dlight_case(spec: dict[str, Any], dev: str) -> tuple[list[Any], Any, Any]:
    return _gemm_case({**spec, "epilogue": "none"}, dev)


def _weight_bytes(spec: dict[str, Any]) -> int:
    """Bytes of weights, scales and zero points one call reads (what a GEMV streams)."""
    nw = 2 * spec["n"] if spec["epilogue"] == "silu_mul" else spec["n"]
    if spec["weight"] == "dense":
        return nw * spec["k"] * 2
    groups = 1 if spec["group"] == -1 else -(-spec["k"] // spec["group"])
    return nw * spec["k"] * (1 if spec["weight"] == "int8" else 0.5) + nw * groups * 5


def _time_us(call: Any, reps: int = 100, rounds: int = 7, graph: bool = True) -> tuple[float, float]:
    """(median, min) microseconds per call: CUDA events around ``reps`` back-to-back calls, ``rounds`` times.

    ``graph``: the calls are captured in one CUDA graph and replayed (device time, as in a decode step
    replayed as a graph; a host loop of small kernels measures the ~7 us per call of the host instead)."""
    import torch
    import tvm_ffi

    for _ in range(5):
        call()
    run = call
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), tvm_ffi.use_torch_stream():
            call()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g), tvm_ffi.use_torch_stream():
            for _ in range(reps):
                call()
        run = g.replay
    per = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        if graph:
            run()
        else:
            for _ in range(reps):
                run()
        b.record()
        torch.cuda.synchronize()
        per.append(a.elapsed_time(b) * 1e3 / reps)
    per.sort()
    return per[len(per) // 2], per[0]


def _probe(mod: Any, case: dict[str, Any], probed: list[str]) -> None:
    """For a wrong GEMM (no split, no epilogue; at most two): the kernel on coded operands, saved to
    ``$OUT/probe_<name>.pt``, so a fragment or descriptor mix-up reads off the output.  Probe ``wt``: A one-hot
    (``A[i, i] = 1``), ``W[n, k] = 64 (n % 32) + k % 64``, so ``C[i, n]`` should be ``64 (n % 32) + i % 64``;
    probe ``at``: the roles swapped (``C[m, n]`` should be ``64 (m % 32) + n % 64``)."""
    import os

    import torch
    import tvm_ffi

    sp = case["spec"]
    if len(probed) >= 2 or sp["epilogue"] != "none" or sp["k_splits"] > 1 or "OUT" not in os.environ:
        return
    m, k, n = sp["rows"], sp["k"], sp["n"]
    dt = torch.float16 if sp["dtype"] == "float16" else torch.bfloat16
    eye = lambda r, c: torch.eye(r, c, device="cuda", dtype=dt)  # noqa: E731
    code = lambda r, c: ((torch.arange(r, device="cuda")[:, None] % 32) * 64  # noqa: E731
                         + torch.arange(c, device="cuda")[None, :] % 64).to(dt)
    got = {}
    for tag, a, w in (("wt", eye(m, k), code(n, k)), ("at", code(m, k), eye(n, k))):
        c = torch.full((m, n), float("nan"), device="cuda", dtype=dt)
        mod["kernel"](*(tvm_ffi.from_dlpack(t) for t in (a, w, c)))
        torch.cuda.synchronize()
        got[tag] = c[:128, :256].float().cpu()
    torch.save({"spec": sp, **got}, Path(os.environ["OUT"]) / f"probe_{case['name']}.pt")
    probed.append(case["name"])
    print(f"    probe saved: probe_{case['name']}.pt", flush=True)


def _caller(mod: Any, args: list[Any], part: Any) -> Any:
    """One call of the case's kernel(s): with ``part`` the key-chunked attention, then its combine kernel."""
    if part is None:
        return lambda: mod["kernel"](*args)

    def call() -> None:
        mod["kernel"](*args[:-1], *part)
        mod["combine"](*part, args[-1])
    return call


def _split_caller(mod: Any, args: list[Any], part: list[Any]) -> Any:
    """A split-K GEMM: the partial-sum kernel on (A, W), then the reduce on (partials[, R], C)."""
    def call() -> None:
        mod["kernel"](args[0], args[1], part[0])
        mod["combine"](part[0], *(args[2:] if len(args) > 3 else [args[0], args[-1]]))
    return call


def _q_caller(mod: Any, args: list[Any], wbuf: Any, part: list[Any] | None) -> Any:
    """An integer-weight GEMM: the expansion of (Q, S, Z) into ``wbuf``, then the GEMM (and the split-K sum)."""
    a, q, s, z, *rest = args  # rest: [R,] C

    def call() -> None:
        mod["dequant"](q, s, z, wbuf)
        if part is None:
            mod["kernel"](a, wbuf, *rest)
        else:
            mod["kernel"](a, wbuf, part[0])
            mod["combine"](part[0], *(rest if len(rest) > 1 else [a, rest[-1]]))
    return call


def run(out: Path, timed: bool = False, match: str | None = None) -> int:
    import torch
    import tvm_ffi

    from ctc.backends.tvm.build import _load_runtime

    _load_runtime("cuda")
    torch.manual_seed(0)
    if timed:  # the device's copy rate in this run: read + write bytes of a 1 GiB device-to-device copy
        src = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
        dst_buf = torch.empty_like(src)
        med, low = _time_us(lambda: dst_buf.copy_(src), reps=20, rounds=5, graph=False)
        print(f"device copy: {2 * src.numel() * 2 / med / 1e6:.2f} TB/s (read + write, median)", flush=True)
        del src, dst_buf
    bad = 0
    probed: list[str] = []
    for case in json.loads((out / "kernels.json").read_text()):
        if match and not re.search(match, case["name"]):
            continue
        mod = tvm_ffi.load_module(str(out / f"{case['name']}.so"))
        make = {"gemv": _gemv_case, "attention": _attention_case, "rope": _rope_case, "gemm": _gemm_case,
                "gemm_dlight": _gemm_dlight_case, "flash": _flash_case, "gemm_q": _gemm_q_case}[case["kind"]]
        args, dst, ref = make(case["spec"], "cuda")
        ffi_args = [tvm_ffi.from_dlpack(a) for a in (*args, dst)]
        part = None
        if case["kind"] == "gemm" and case["spec"]["k_splits"] > 1:  # f32 partial sums, then the reduce kernel
            sp = case["spec"]
            part = [tvm_ffi.from_dlpack(torch.full((sp["k_splits"], sp["rows"], sp["n"]), float("nan"),
                                                   device="cuda"))]
            call = _split_caller(mod, ffi_args, part)
        if case["kind"] == "attention" and case["spec"]["key_chunks"] > 1:
            sp = case["spec"]
            shape = (sp["batch"], sp["q_heads"], sp["key_chunks"])
            part = [tvm_ffi.from_dlpack(torch.full((*shape, n), float("nan"), device="cuda"))
                    for n in (sp["head_dim"], 2)]
        if case["kind"] == "gemm_q":
            sp = case["spec"]
            wbuf = tvm_ffi.from_dlpack(torch.empty(sp["n"], sp["k"], device="cuda", dtype=args[0].dtype))
            part = [tvm_ffi.from_dlpack(torch.full((sp["k_splits"], sp["rows"], sp["n"]), float("nan"), device="cuda"))
                    ] if sp["k_splits"] > 1 else None
            call = _q_caller(mod, ffi_args, wbuf, part)
            expand = functools.partial(mod["dequant"], *ffi_args[1:4], wbuf)
        elif not (case["kind"] == "gemm" and part):
            call = _caller(mod, ffi_args, part)
        try:
            call()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a launch refused (shared memory, ...): the next case may still run
            bad += 1
            print(f"ERR {case['name']:<14} {type(e).__name__}: {str(e)[:300]}  {case['spec']}", flush=True)
            continue
        if case["kind"] == "rope":
            q_ref, kc_ref, vc_ref = ref
            errs = [float((dst.float() - q_ref).abs().max()), float((args[4].float() - kc_ref.float()).abs().max()),
                    float((args[5].float() - vc_ref.float()).abs().max())]
            err, scale = max(errs), 1.0
        else:
            err, scale = float((dst.float() - ref).abs().max()), float(ref.abs().max())
        ok = bool(err == err) and err <= 2e-2 * scale + 2e-3  # NaN (an unwritten output) fails
        bad += not ok
        if not ok and case["kind"] == "gemm":
            rows_bad = ((dst.float() - ref).abs().nan_to_num(1e9).amax(1) > 2e-2 * scale + 2e-3).nonzero().flatten()
            print(f"    {case['name']}: {len(rows_bad)} wrong rows, first {rows_bad[:8].tolist()}", flush=True)
            _probe(mod, case, probed)
        timing = ""
        if timed and case["kind"] == "gemv":
            med, low = _time_us(call)
            timing = f"  {med:7.1f} us median {low:7.1f} min  {_weight_bytes(case['spec']) / med / 1e6:5.2f} TB/s"
        elif timed and case["kind"].startswith("gemm"):
            med, low = _time_us(call, reps=20, rounds=7)
            flop = 2 * case["spec"]["rows"] * case["spec"]["k"] * case["spec"]["n"]
            timing = f"  {med:7.1f} us median {low:7.1f} min  {flop / med / 1e6:6.1f} TFLOP/s"
            if case["kind"] == "gemm_q":  # the expansion alone: packed bytes read + the f16 weight written
                emed, _ = _time_us(expand, reps=20, rounds=7)
                sp = case["spec"]
                moved = sp["n"] * sp["k"] * (2 + sp["bits"] / 8)
                timing += f"  (expansion {emed:6.1f} us, {moved / emed / 1e6:4.2f} TB/s)"
        elif timed and case["kind"] == "flash":
            med, low = _time_us(call, reps=20, rounds=7)
            sp = case["spec"]
            flop = 4 * sp["batch"] * sp["q_heads"] * sp["queries"] * sp["keys"] * sp["head_dim"]
            timing = f"  {med:7.1f} us median {low:7.1f} min  {flop / med / 1e6:6.1f} TFLOP/s (dense count)"
        elif timed and case["kind"] == "attention":
            med, low = _time_us(call)
            timing = f"  {med:7.1f} us median {low:7.1f} min"
        print(f"{'ok ' if ok else 'BAD'} {case['name']:<14} max err {err:.3g} (scale {scale:.3g}){timing}  "
              f"{case['spec']}", flush=True)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["build", "run"])
    p.add_argument("out", type=Path)
    p.add_argument("--time", action="store_true",
                   help="run: also time each GEMV (back-to-back calls, CUDA events) and print its weight bytes/s")
    p.add_argument("--sweep", action="store_true",
                   help="build: also each large integer GEMV with other rows per warp and x read from global memory")
    p.add_argument("--only", nargs="*", default=None, help="build: only these kinds (gemv, attention, rope, flash, "
                   "gemm, gemm_dlight, gemm_q)")
    p.add_argument("--wgmma-sweep", action="store_true",
                   help="build: also the 512-row GEMMs with other warpgroup-MMA tiles (sm_90a), not the other sweeps")
    p.add_argument("--match", default=None,
                   help="run: only cases whose name this regex finds (e.g. _wg_: the sm_90a GEMMs)")
    a = p.parse_args(argv)
    if a.cmd == "build":
        build(a.out, a.sweep, a.only, a.wgmma_sweep)
        return 0
    return run(a.out, a.time, a.match)


if __name__ == "__main__":
    sys.exit(main())
