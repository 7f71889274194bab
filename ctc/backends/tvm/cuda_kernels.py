"""Hand-scheduled CUDA kernels (TIR with explicit threads) for what dlight schedules poorly.

Why: a decode step is hundreds of tiny kernels; on a GPU each launch costs more than the work
of most of them.  One-query attention lowered op by op is a batched GEMV for the scores, a
masked softmax and a vector-matrix product, each its own kernel, with the GQA key/value heads
repeated first.  :func:`decode_attention_func` does the whole thing in one kernel per step and
layer, reading the KV cache as stored (query head ``h`` reads kv head ``h // group``), and skips
the key rows its mask excludes, so a step at position 128 of a 2048-long cache reads 129 rows,
not 2048.

The kernels are written for CUDA thread blocks (``threadIdx``/``blockIdx``, shared memory);
the lowering chooses them only for ``target cuda`` and only for shapes they cover
(:func:`decode_attention_supported`), the op-by-op lowering stays the fallback.  The results
are checked against the reference interpreter on the GPU machine (``gpu``-marked tests,
``benchmarks/cuda_decode.py``); here they are built and inspected structurally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["AttentionSpec", "decode_attention_func", "decode_attention_supported"]

SHARED_SCORE_LIMIT = 8192  # keys whose scores fit the block's shared memory (32 KB of f32)


@dataclass(frozen=True)
class AttentionSpec:
    """One-query attention ``o[b, h] = softmax(q[b, h] k[b, h // group]^T * scale + mask) v[b, h // group]``.

    ``mask``: ``"none"``, ``"bool"`` (keep where true) or ``"add"`` (added to the logits), stored
    ``[MB, MH, S]`` with ``MB`` in ``(1, batch)`` and ``MH`` in ``(1, q_heads)`` (broadcast)."""

    batch: int
    q_heads: int
    kv_heads: int
    keys: int
    head_dim: int
    dtype: str
    scale: float
    mask: str = "none"
    mask_batch: int = 1
    mask_heads: int = 1
    mask_dtype: str = "bool"

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def threads(self) -> int:
        return max(128, self.head_dim)

    @property
    def tag(self) -> str:
        m = "" if self.mask == "none" else f"_m{self.mask}{self.mask_batch}x{self.mask_heads}"
        return (f"b{self.batch}_h{self.q_heads}x{self.kv_heads}_s{self.keys}_d{self.head_dim}_{self.dtype}"
                f"{m}_{abs(hash(self.scale)) % 10**6}")


def decode_attention_supported(spec: AttentionSpec) -> str | None:
    """None when :func:`decode_attention_func` covers ``spec``; else why not (the op-by-op path runs)."""
    if spec.dtype not in ("float16", "bfloat16", "float32"):
        return f"dtype {spec.dtype}"
    if spec.q_heads % spec.kv_heads:
        return "query heads not a multiple of kv heads"
    if spec.head_dim % 8 or spec.threads % spec.head_dim or spec.head_dim > 256:
        return f"head dim {spec.head_dim} (needs a multiple of 8 dividing the block, at most 256)"
    if spec.keys > SHARED_SCORE_LIMIT:
        return f"{spec.keys} keys (the scores of at most {SHARED_SCORE_LIMIT} fit shared memory)"
    if spec.mask not in ("none", "bool", "add"):
        return f"mask kind {spec.mask}"
    return None


def decode_attention_func(spec: AttentionSpec) -> Any:
    """The PrimFunc ``(q [B, H, 1, D], k [B, Hk, S, D], v [B, Hk, S, D][, mask [MB, MH, S]], o [B, H, 1, D])``.

    One thread block per (batch, query head), ``max(128, D)`` threads.  Scores: one key per thread,
    the key row read in 16-byte vectors, f32 dot products; masked keys are not read.  Softmax:
    block max and sum through shared memory.  Output: thread ``t`` accumulates dim ``t % D`` over
    every ``NT / D``-th key, in f32, partial sums combined in shared memory.
    """
    import tvm

    why = decode_attention_supported(spec)
    if why is not None:
        raise ValueError(f"decode_attention_func: unsupported shape ({why})")
    return tvm.script.from_source(_source(spec))


def _source(spec: AttentionSpec) -> str:
    B, H, HK, S, D, dt = spec.batch, spec.q_heads, spec.kv_heads, spec.keys, spec.head_dim, spec.dtype
    NT, G = spec.threads, spec.group
    parts = NT // D
    vec = 8 if dt != "float32" else 4
    nvec = D // vec
    steps = int(math.log2(NT))
    has_mask = spec.mask != "none"
    mb = "b" if spec.mask_batch > 1 else "0"
    mh = "h" if spec.mask_heads > 1 else "0"
    sig = "q_h: T.handle, k_h: T.handle, v_h: T.handle, " + ("m_h: T.handle, " if has_mask else "") + "o_h: T.handle"
    L = [
        "@T.prim_func(private=True)",
        f"def decode_attention({sig}):",
        '    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})',
        f'    Q = T.match_buffer(q_h, ({B}, {H}, 1, {D}), "{dt}")',
        f'    K = T.match_buffer(k_h, ({B}, {HK}, {S}, {D}), "{dt}")',
        f'    V = T.match_buffer(v_h, ({B}, {HK}, {S}, {D}), "{dt}")',
        f'    O = T.match_buffer(o_h, ({B}, {H}, 1, {D}), "{dt}")',
    ]
    if has_mask:
        L.append(f'    M = T.match_buffer(m_h, ({spec.mask_batch}, {spec.mask_heads}, {S}), "{spec.mask_dtype}")')
    SP = ((S + NT - 1) // NT) * NT  # scores padded to whole blocks: every shared store is unconditional
    NB = (S + NT - 1) // NT
    L += [
        f'    bx = T.launch_thread("blockIdx.x", {B * H})',
        f'    tx = T.launch_thread("threadIdx.x", {NT})',
        f'    sc = T.decl_buffer(({SP},), "float32", scope="shared")',
        f'    red = T.decl_buffer(({2 * NT},), "float32", scope="shared")',
        f'    ql = T.decl_buffer(({D},), "float32", scope="local")',
        f'    kl = T.decl_buffer(({vec},), "{dt}", scope="local")',
        '    acc = T.decl_buffer((1,), "float32", scope="local")',
        '    mx = T.decl_buffer((1,), "float32", scope="local")',
        '    tot = T.decl_buffer((1,), "float32", scope="local")',
        '    pj = T.decl_buffer((1,), "float32", scope="local")',
        f"    b = bx // {H}",
        f"    h = bx % {H}",
        f"    g = h // {G}",
        f"    for d in T.unroll({D}):",
        '        ql[d] = T.Cast("float32", Q[b, h, 0, d])',
        "    mx[0] = T.float32(-3.4028234663852886e38)",
        f"    for j0 in range({NB}):",
        f"        j = j0 * {NT} + tx",
        "        pj[0] = T.float32(-3.4028234663852886e38)",
        f"        if j < {S}:",
    ]
    keep = {"none": "True", "bool": f"M[{mb}, {mh}, j]", "add": "True"}[spec.mask]
    L += [
        f"            if {keep}:",
        "                acc[0] = T.float32(0)",
        f"                for c in range({nvec}):",
        f"                    for e in T.vectorized({vec}):",
        f"                        kl[e] = K[b, g, j, c * {vec} + e]",
        f"                    for e in T.unroll({vec}):",
        f'                        acc[0] = acc[0] + ql[c * {vec} + e] * T.Cast("float32", kl[e])',
        f"                pj[0] = acc[0] * T.float32({spec.scale!r})",
    ]
    if spec.mask == "add":
        L.append(f'                pj[0] = pj[0] + T.Cast("float32", M[{mb}, {mh}, j])')
    L += [
        "        sc[j] = pj[0]",
        "        mx[0] = T.max(mx[0], pj[0])",
    ]
    L += _block_reduce("mx", "T.max", NT, steps)
    L += [
        # exponentials and their sum (masked and padding keys: 0)
        "    tot[0] = T.float32(0)",
        f"    for j0 in range({NB}):",
        f"        j = j0 * {NT} + tx",
        "        pj[0] = sc[j]",
        "        pj[0] = T.Select(pj[0] > T.float32(-3.0e38), T.exp(pj[0] - mx[0]), T.float32(0))",
        "        sc[j] = pj[0]",
        "        tot[0] = tot[0] + pj[0]",
    ]
    L += _block_reduce("tot", "T.add", NT, steps)
    L += [
        # weighted values: thread tx -> dim tx % D, keys tx // D, + parts, ...
        "    acc[0] = T.float32(0)",
        f"    for j0 in range({(S + parts - 1) // parts}):",
        f"        j = j0 * {parts} + tx // {D}",
        "        pj[0] = sc[j]",
        "        if pj[0] > T.float32(0):",
        f'            acc[0] = acc[0] + pj[0] * T.Cast("float32", V[b, g, j, tx % {D}])',
        "    red[tx] = acc[0]",
        '    T.tvm_storage_sync("shared")',
        f"    if tx < {D}:",
        "        acc[0] = T.float32(0)",
        f"        for p in T.unroll({parts}):",
        f"            acc[0] = acc[0] + red[p * {D} + tx]",
        f'        O[b, h, 0, tx] = T.Cast("{dt}", acc[0] / tot[0])',
    ]
    return "\n".join(L)


def _block_reduce(var: str, op: str, nt: int, steps: int) -> list[str]:
    """Lines that reduce each thread's ``var[0]`` over the block with ``op`` (a tree in shared memory:
    read the partner, sync, combine, sync; the upper half of ``red`` only pads the reads) and leave
    the result in every thread's ``var[0]``."""
    lines = [f"    red[tx] = {var}[0]", '    T.tvm_storage_sync("shared")']
    for s in range(steps - 1, -1, -1):
        w = 1 << s
        lines += [f"    pj[0] = red[tx + {w}]", '    T.tvm_storage_sync("shared")',
                  f"    red[tx] = {op}(red[tx], pj[0])" if op != "T.add" else "    red[tx] = red[tx] + pj[0]",
                  '    T.tvm_storage_sync("shared")']
    lines += [f"    {var}[0] = red[0]", '    T.tvm_storage_sync("shared")']
    return lines
