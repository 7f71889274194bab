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

from dataclasses import dataclass
from typing import Any

__all__ = ["AttentionSpec", "RopeWriteSpec", "decode_attention_combine_func", "decode_attention_func",
           "decode_attention_supported", "rope_write_func"]

SHARED_SCORE_LIMIT = 8192  # keys whose scores fit the block's shared memory (32 KB of f32)


@dataclass(frozen=True)
class _HeadsSpec:
    """The attention shape a decode kernel is built for: batch, query and kv heads, cache length, head dim."""

    batch: int
    q_heads: int
    kv_heads: int
    keys: int
    head_dim: int
    dtype: str


@dataclass(frozen=True)
class AttentionSpec(_HeadsSpec):
    """One-query attention ``o[b, h] = softmax(q[b, h] k[b, h // group]^T * scale + mask) v[b, h // group]``.

    ``mask``: ``"none"``, ``"bool"`` (keep where true) or ``"add"`` (added to the logits), stored
    ``[MB, MH, S]`` with ``MB`` in ``(1, batch)`` and ``MH`` in ``(1, q_heads)`` (broadcast)."""

    scale: float
    mask: str = "none"
    mask_batch: int = 1
    mask_heads: int = 1
    mask_dtype: str = "bool"
    chunks: int = 0  # key chunks attended by separate blocks, then combined (flash-decoding); 0: from the shape

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def key_chunks(self) -> int:
        """Key chunks: when one block per (batch, head) leaves most of a large GPU idle (< 132 blocks, the
        SMs of an H100/H200), enough chunks of >= 128 keys for >= 264 blocks; else 1 (one block per head
        over all keys).  Measured on the H200 (Llama-1B shape, cache 1088): 32 heads 172 -> 112 us per
        step at 1024 cached tokens with 8 chunks; 256 heads (batch 8) slower with 2 chunks than with 1."""
        if self.chunks:
            return max(1, min(self.chunks, self.keys))
        blocks = self.batch * self.q_heads
        if blocks >= 132:
            return 1
        return max(1, min(-(-264 // blocks), self.keys // 128))

    @property
    def chunk_keys(self) -> int:
        return -(-self.keys // self.key_chunks)

    @property
    def threads(self) -> int:
        """Block size: enough threads for one key of the chunk each in a pass (at most 512, at least 128)."""
        n = 128
        while n < min(self.chunk_keys, 512):
            n *= 2
        return max(n, self.head_dim)

    @property
    def tag(self) -> str:
        m = "" if self.mask == "none" else f"_m{self.mask}{self.mask_batch}x{self.mask_heads}"
        return (f"b{self.batch}_h{self.q_heads}x{self.kv_heads}_s{self.keys}_d{self.head_dim}_{self.dtype}"
                f"{m}_c{self.key_chunks}_{abs(hash(self.scale)) % 10**6}")


def decode_attention_supported(spec: AttentionSpec) -> str | None:
    """None when :func:`decode_attention_func` covers ``spec``; else why not (the op-by-op path runs)."""
    if spec.dtype not in ("float16", "bfloat16", "float32"):
        return f"dtype {spec.dtype}"
    if spec.q_heads % spec.kv_heads:
        return "query heads not a multiple of kv heads"
    if spec.head_dim % 8 or spec.head_dim > 256 or spec.threads % (spec.head_dim // 8):
        return f"head dim {spec.head_dim} (needs a multiple of 8, at most 256)"
    if spec.keys > SHARED_SCORE_LIMIT:
        return f"{spec.keys} keys (the scores of at most {SHARED_SCORE_LIMIT} fit shared memory)"
    if spec.mask not in ("none", "bool", "add"):
        return f"mask kind {spec.mask}"
    return None


def decode_attention_func(spec: AttentionSpec) -> Any:
    """The PrimFunc ``(q [B, H, 1, D], k [B, Hk, S, D], v [B, Hk, S, D][, mask [MB, MH, S]], out)``.

    One thread block per (batch, query head, key chunk), :attr:`AttentionSpec.threads` threads (up to
    512: a block is one chunk's whole softmax, so it must keep many loads in flight by itself).
    Scores: one key per thread at a time, the whole key row loaded as 16-byte vectors before use,
    f32 dot products with q (kept in shared memory); keys the mask excludes are not read.
    Softmax: warp shuffles, then one shared-memory step across warps.  Output: each thread owns 8
    dims of a strided subset of the keys (16-byte value loads, four in flight, up to the last
    unmasked key), then the partial sums are added in shared memory.  With one chunk the output is
    ``o [B, H, 1, D]``; with several the chunks' partial results, ``po [B, H, C, D]`` f32 (unnormalised
    sums of values) and ``pm [B, H, C, 2]`` f32 (the chunk's max logit, its sum of exponentials), which
    :func:`decode_attention_combine_func` turns into ``o`` (flash-decoding's split over keys).
    """
    import tvm

    why = decode_attention_supported(spec)
    if why is not None:
        raise ValueError(f"decode_attention_func: unsupported shape ({why})")
    return tvm.script.from_source(_source(spec))


def decode_attention_combine_func(spec: AttentionSpec) -> Any:
    """The PrimFunc ``(po [B, H, C, D] f32, pm [B, H, C, 2] f32, o [B, H, 1, D])``: the chunks' partial
    softmax results (unnormalised value sums; max logit and sum of exponentials) rescaled to the largest
    chunk max and summed (one block per (batch, head), one thread per dim)."""
    import tvm

    B, H, D, C, dt = spec.batch, spec.q_heads, spec.head_dim, spec.key_chunks, spec.dtype
    L = [
        "@T.prim_func(private=True)",
        "def decode_attention_combine(po_h: T.handle, pm_h: T.handle, o_h: T.handle):",
        '    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})',
        f'    PO = T.match_buffer(po_h, ({B}, {H}, {C}, {D}), "float32")',
        f'    PM = T.match_buffer(pm_h, ({B}, {H}, {C}, 2), "float32")',
        f'    O = T.match_buffer(o_h, ({B}, {H}, 1, {D}), "{dt}")',
        f'    bx = T.launch_thread("blockIdx.x", {B * H})',
        f'    tx = T.launch_thread("threadIdx.x", {D})',
        '    mx = T.decl_buffer((1,), "float32", scope="local")',
        '    tot = T.decl_buffer((1,), "float32", scope="local")',
        '    acc = T.decl_buffer((1,), "float32", scope="local")',
        '    w = T.decl_buffer((1,), "float32", scope="local")',
        f"    b = bx // {H}",
        f"    h = bx % {H}",
        "    mx[0] = PM[b, h, 0, 0]",
        f"    for c in range(1, {C}):",
        "        mx[0] = T.max(mx[0], PM[b, h, c, 0])",
        "    tot[0] = T.float32(0)",
        "    acc[0] = T.float32(0)",
        f"    for c in range({C}):",
        "        w[0] = T.exp(PM[b, h, c, 0] - mx[0])",
        "        tot[0] = tot[0] + w[0] * PM[b, h, c, 1]",
        "        acc[0] = acc[0] + w[0] * PO[b, h, c, tx]",
        f'    O[b, h, 0, tx] = T.Cast("{dt}", acc[0] / tot[0])',
    ]
    return tvm.script.from_source("\n".join(L))


def _source(spec: AttentionSpec) -> str:
    B, H, HK, S, D, dt = spec.batch, spec.q_heads, spec.kv_heads, spec.keys, spec.head_dim, spec.dtype
    NT, G, C, CS = spec.threads, spec.group, spec.key_chunks, spec.chunk_keys
    vec = 8 if dt != "float32" else 4
    nvec = D // vec              # vectors per key row
    KG = NT // nvec              # key groups in the output phase
    W = NT // 32                 # warps
    NB = (CS + NT - 1) // NT     # score passes over the chunk
    SP = NB * NT                 # scores padded to whole passes: every shared store is unconditional
    JB = (CS + KG - 1) // KG     # output iterations per thread (at most)
    UN = 4                       # output loads in flight per thread
    has_mask = spec.mask != "none"
    mb = "b" if spec.mask_batch > 1 else "0"
    mh = "h" if spec.mask_heads > 1 else "0"
    ninf = "T.float32(-3.4028234663852886e38)"
    sig = "q_h: T.handle, k_h: T.handle, v_h: T.handle, " + ("m_h: T.handle, " if has_mask else "") + \
        ("o_h: T.handle" if C == 1 else "o_h: T.handle, pm_h: T.handle")
    out = f'T.match_buffer(o_h, ({B}, {H}, 1, {D}), "{dt}")' if C == 1 else \
        f'T.match_buffer(o_h, ({B}, {H}, {C}, {D}), "float32")'
    L = [
        "@T.prim_func(private=True)",
        f"def decode_attention({sig}):",
        '    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})',
        f'    Q = T.match_buffer(q_h, ({B}, {H}, 1, {D}), "{dt}")',
        f'    K = T.match_buffer(k_h, ({B}, {HK}, {S}, {D}), "{dt}")',
        f'    V = T.match_buffer(v_h, ({B}, {HK}, {S}, {D}), "{dt}")',
        f"    O = {out}",
    ]
    if C > 1:
        L.append(f'    PM = T.match_buffer(pm_h, ({B}, {H}, {C}, 2), "float32")')
    if has_mask:
        L.append(f'    M = T.match_buffer(m_h, ({spec.mask_batch}, {spec.mask_heads}, {S}), "{spec.mask_dtype}")')
    L += [
        f'    bx = T.launch_thread("blockIdx.x", {B * H * C})',
        f'    tx = T.launch_thread("threadIdx.x", {NT})',
        f'    sc = T.decl_buffer(({SP},), "float32", scope="shared")',
        f'    qs = T.decl_buffer(({D},), "float32", scope="shared")',
        f'    wred = T.decl_buffer(({W},), "float32", scope="shared")',
        f'    part = T.decl_buffer(({NT * vec},), "float32", scope="shared")',
        f'    kl = T.decl_buffer(({D},), "{dt}", scope="local")',
        f'    vl = T.decl_buffer(({UN * vec},), "{dt}", scope="local")',
        f'    acc = T.decl_buffer(({vec},), "float32", scope="local")',
        '    dot = T.decl_buffer((1,), "float32", scope="local")',
        '    mx = T.decl_buffer((1,), "float32", scope="local")',
        '    tot = T.decl_buffer((1,), "float32", scope="local")',
        '    last = T.decl_buffer((1,), "float32", scope="local")',
        '    pj = T.decl_buffer((1,), "float32", scope="local")',
        f"    b = bx // {H * C}",
        f"    h = bx // {C} % {H}",
        f"    c0 = bx % {C} * {CS}",  # the chunk's first key; keys of the chunk are indexed from it below
        f"    g = h // {G}",
        f"    if tx < {D}:",
        '        qs[tx] = T.Cast("float32", Q[b, h, 0, tx])',
        '    T.tvm_storage_sync("shared")',
        f"    mx[0] = {ninf}",
        "    last[0] = T.float32(0)",
        f"    for j0 in range({NB}):",
        f"        j = j0 * {NT} + tx",
        f"        pj[0] = {ninf}",
        f"        if j < {CS} and c0 + j < {S}:",
    ]
    keep = {"none": "True", "bool": f"M[{mb}, {mh}, c0 + j]", "add": "True"}[spec.mask]
    L += [
        f"            if {keep}:",
        f"                for c in T.unroll({nvec}):",  # the whole row first: every load in flight at once
        f"                    for e in T.vectorized({vec}):",
        f"                        kl[c * {vec} + e] = K[b, g, c0 + j, c * {vec} + e]",
        "                dot[0] = T.float32(0)",
        f"                for e in T.unroll({D}):",
        '                    dot[0] = dot[0] + qs[e] * T.Cast("float32", kl[e])',
        f"                pj[0] = dot[0] * T.float32({spec.scale!r})",
    ]
    if spec.mask == "add":
        L.append(f'                pj[0] = pj[0] + T.Cast("float32", M[{mb}, {mh}, c0 + j])')
    L += [
        '                last[0] = T.Cast("float32", j + 1)',
        "        sc[j] = pj[0]",
        "        mx[0] = T.max(mx[0], pj[0])",
    ]
    L += _block_reduce_lines("mx", "max", W)
    L += _block_reduce_lines("last", "max", W)
    L += [
        "    tot[0] = T.float32(0)",
        f"    for j0 in range({NB}):",
        f"        j = j0 * {NT} + tx",
        "        pj[0] = sc[j]",
        "        pj[0] = T.Select(pj[0] > T.float32(-3.0e38), T.exp(pj[0] - mx[0]), T.float32(0))",
        "        sc[j] = pj[0]",
        "        tot[0] = tot[0] + pj[0]",
    ]
    L += _block_reduce_lines("tot", "sum", W)
    L += [
        f"    for e in T.unroll({vec}):",
        "        acc[e] = T.float32(0)",
        f"    for j0 in range({(JB + UN - 1) // UN}):",
        f"        for u in T.unroll({UN}):",
        f"            if T.Cast(\"float32\", (j0 * {UN} + u) * {KG} + tx // {nvec}) < last[0]:",
        f"                for e in T.vectorized({vec}):",
        f"                    vl[u * {vec} + e] = V[b, g, c0 + (j0 * {UN} + u) * {KG} + tx // {nvec}, "
        f"(tx % {nvec}) * {vec} + e]",
        f"        for u in T.unroll({UN}):",
        f"            if T.Cast(\"float32\", (j0 * {UN} + u) * {KG} + tx // {nvec}) < last[0]:",
        f"                pj[0] = sc[(j0 * {UN} + u) * {KG} + tx // {nvec}]",
        f"                for e in T.unroll({vec}):",
        f'                    acc[e] = acc[e] + pj[0] * T.Cast("float32", vl[u * {vec} + e])',
        # partial sums of the key groups: part[kg, dim]; then dims summed over groups
        f"    for e in T.unroll({vec}):",
        f"        part[(tx // {nvec}) * {D} + (tx % {nvec}) * {vec} + e] = acc[e]",
        '    T.tvm_storage_sync("shared")',
        f"    if tx < {D}:",
        "        dot[0] = T.float32(0)",
        f"        for p in range({KG}):",
        f"            dot[0] = dot[0] + part[p * {D} + tx]",
    ]
    if C == 1:
        L.append(f'        O[b, h, 0, tx] = T.Cast("{dt}", dot[0] / tot[0])')
    else:
        L += [f"        O[b, h, bx % {C}, tx] = dot[0]",
              "    if tx == 0:",
              f"        PM[b, h, bx % {C}, 0] = mx[0]",
              f"        PM[b, h, bx % {C}, 1] = tot[0]"]
    return "\n".join(L)


def _block_reduce_lines(var: str, op: str, warps: int) -> list[str]:
    """Reduce each thread's ``var[0]`` over the block (``op`` max or sum): shuffles within each warp, the
    warp results through shared memory, read back by every thread (``var[0]`` holds the result)."""
    comb = (lambda a, b: f"T.max({a}, {b})") if op == "max" else (lambda a, b: f"{a} + {b}")
    lines = []
    for off in (16, 8, 4, 2, 1):
        shfl = f"T.tvm_warp_shuffle_down(T.uint32(4294967295), {var}[0], {off}, 32, 32)"
        lines.append(f"    {var}[0] = {comb(f'{var}[0]', shfl)}")
    lines += ["    if tx % 32 == 0:", f"        wred[tx // 32] = {var}[0]", '    T.tvm_storage_sync("shared")',
              f"    {var}[0] = wred[0]", f"    for w in range(1, {warps}):",
              f"        {var}[0] = {comb(f'{var}[0]', 'wred[w]')}", '    T.tvm_storage_sync("shared")']
    return lines


@dataclass(frozen=True)
class RopeWriteSpec(_HeadsSpec):
    """Split a decode step's merged ``q|k|v`` projection row, rotate q and k (HF ``rotate_half``) and write
    k and v into the caches at ``position``: ``y [B, (Hq + 2 Hk) D]``, ``cos``/``sin [CB, D]``
    (``CB`` 1 or B), caches ``[B, Hk, S, D]``, result ``q [B, Hq, 1, D]``."""

    cos_batch: int = 1

    @property
    def tag(self) -> str:
        return (f"b{self.batch}_h{self.q_heads}x{self.kv_heads}_s{self.keys}_d{self.head_dim}_{self.dtype}"
                f"_c{self.cos_batch}")


def rope_write_func(spec: RopeWriteSpec) -> Any:
    """The PrimFunc ``(y, cos, sin, position, k_cache, v_cache, q)``: one block per (batch, head) of
    q, k and v, one thread per element of the head.  Rotation rounds like the reference (each
    product to the dtype, then the sum); the caches are written in place."""
    import tvm

    B, HQ, HK, S, D, dt = spec.batch, spec.q_heads, spec.kv_heads, spec.keys, spec.head_dim, spec.dtype
    if D % 2 or D > 1024:
        raise ValueError(f"rope_write_func: head dim {D} must be even and at most 1024")
    HT, N, h2 = HQ + 2 * HK, (HQ + 2 * HK) * D, D // 2
    cb = "b" if spec.cos_batch > 1 else "0"

    def rnd(e: str) -> str:  # round a float32 expression to the dtype and back (the reference's rounding)
        return e if dt == "float32" else f'T.Cast("float32", T.Cast("{dt}", {e}))'

    x = f'T.Cast("float32", Y[b, h * {D} + tx])'
    r = (f'T.Select(tx < {h2}, T.float32(0) - T.Cast("float32", Y[b, h * {D} + tx + {h2}]), '
         f'T.Cast("float32", Y[b, h * {D} + tx - {h2}]))')
    c = f'T.Cast("float32", COS[{cb}, tx])'
    s = f'T.Cast("float32", SIN[{cb}, tx])'
    rot = f'T.Cast("{dt}", {rnd(f"{x} * {c}")} + {rnd(f"({r}) * {s}")})'
    src = [
        "@T.prim_func(private=True)",
        "def rope_write(y_h: T.handle, cos_h: T.handle, sin_h: T.handle, p_h: T.handle, kc_h: T.handle, "
        "vc_h: T.handle, q_h: T.handle):",
        '    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})',
        f'    Y = T.match_buffer(y_h, ({B}, {N}), "{dt}")',
        f'    COS = T.match_buffer(cos_h, ({spec.cos_batch}, {D}), "{dt}")',
        f'    SIN = T.match_buffer(sin_h, ({spec.cos_batch}, {D}), "{dt}")',
        '    P = T.match_buffer(p_h, (1,), "int64")',
        f'    KC = T.match_buffer(kc_h, ({B}, {HK}, {S}, {D}), "{dt}")',
        f'    VC = T.match_buffer(vc_h, ({B}, {HK}, {S}, {D}), "{dt}")',
        f'    Q = T.match_buffer(q_h, ({B}, {HQ}, 1, {D}), "{dt}")',
        f'    bx = T.launch_thread("blockIdx.x", {B * HT})',
        f'    tx = T.launch_thread("threadIdx.x", {D})',
        f"    b = bx // {HT}",
        f"    h = bx % {HT}",
        f"    if h < {HQ}:",
        f"        Q[b, h, 0, tx] = {rot}",
        f"    elif h < {HQ + HK}:",
        f"        KC[b, h - {HQ}, P[0], tx] = {rot}",
        "    else:",
        f"        VC[b, h - {HQ + HK}, P[0], tx] = Y[b, h * {D} + tx]",
    ]
    return tvm.script.from_source("\n".join(src))


@dataclass(frozen=True)
class GemvSpec:
    """``out[m, :] = epilogue(prologue(x[m]) @ W^T)`` for a few rows ``m`` (a decode step's batch).

    ``weight``: ``"dense"`` (W ``[NW, K]`` in the activation dtype), ``"int4"`` (``[NW, K/2]`` packed
    nibbles, :mod:`ctc.ir.quant`) or ``"int8"`` (``[NW, K]``), the integer forms with f32 ``scale`` and
    i8 ``zero`` ``[NW, G]`` per ``group`` input channels.  ``prologue``: ``"none"`` or ``"rms"``
    (RMSNorm of x with ``gamma [K]`` and ``eps``, rounded as the reference rounds).  ``epilogue``:
    ``"none"``, ``"residual"`` (``+ r [M, N]``) or ``"silu_mul"`` (W holds gate rows then up rows,
    ``NW = 2N``; ``out = silu(gate) * up``).  Sums are f32; each stage rounds to the dtype where the
    reference does."""

    rows: int
    k: int
    n: int
    dtype: str
    weight: str = "dense"
    group: int = -1
    prologue: str = "none"
    eps: float = 1e-6
    epilogue: str = "none"
    warp_rows: int = 0                 # output rows per warp; 0: chosen from the shape (rows_per_warp)
    x_in_shared: bool | None = None    # stage x in shared memory; None: when it fits (always with "rms")
    impl: str = ""                     # "tir", or "half2" (:mod:`.cuda_gemv`: int4, float16); "": half2 where it covers

    @property
    def weight_rows(self) -> int:
        return 2 * self.n if self.epilogue == "silu_mul" else self.n

    @property
    def groups(self) -> int:
        return 1 if self.group == -1 else -(-self.k // self.group)

    @property
    def per_load(self) -> int:
        """Input channels one lane reads per 16-byte weight load."""
        return {"dense": 16 // _BYTES[self.dtype], "int8": 16, "int4": 32}[self.weight]

    @property
    def rows_per_warp(self) -> int:
        """Output rows per warp: a few rows share each x slice (loaded and widened once), fewer where the
        grid would drop under 256 blocks.  Picked from `cuda_kernel_check.py --sweep` timings on the H200."""
        if self.warp_rows:
            return self.warp_rows
        if self.weight == "dense":  # 2 rows at batch 4-8: the fp16 batch-8 down projection 19.4 -> 14.5 us (H200)
            r = 2 if 4 <= self.rows <= 8 else 1
        elif self.impl != "tir" and self.weight == "int4" and self.dtype == "float16" and self.rows <= 2 \
                and self.n >= 32768:
            r = 8  # a large int4 head (half2 kernel): Llama-1B's LM head 52.6 -> 46.2 us at 8 rows (H200)
        else:
            r = 4 if self.rows <= 2 else 2 if self.rows <= 8 else 1
        while r > 1 and -(-self.n // (GEMV_WARPS * r)) < 256:  # keep >= 256 blocks: ~2 per SM of a large GPU
            r //= 2
        return r

    @property
    def tag(self) -> str:
        w = self.weight if self.weight == "dense" else f"{self.weight}g{self.group}"
        knobs = (f"_r{self.warp_rows}" if self.warp_rows else "") + \
            ("" if self.x_in_shared is None else f"_xs{int(self.x_in_shared)}") + (f"_{self.impl}" if self.impl else "")
        return (f"m{self.rows}_k{self.k}_n{self.n}_{self.dtype}_{w}_{self.prologue}_{self.epilogue}"
                f"{'_e' + format(self.eps, '.0e') if self.prologue == 'rms' else ''}{knobs}").replace("-", "m")


_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
GEMV_WARPS = 4


def gemv_supported(spec: GemvSpec) -> str | None:
    """None when :func:`gemv_func` covers ``spec``; else why not."""
    if spec.dtype not in _BYTES:
        return f"dtype {spec.dtype}"
    if spec.weight not in ("dense", "int4", "int8") or spec.prologue not in ("none", "rms") \
            or spec.epilogue not in ("none", "residual", "silu_mul"):
        return "unknown weight/prologue/epilogue kind"
    if spec.k % spec.per_load:
        return f"K={spec.k} not a multiple of {spec.per_load}"
    if spec.weight != "dense" and spec.group != -1 and spec.group % spec.per_load:
        return f"group size {spec.group} not a multiple of {spec.per_load}"
    if spec.rows > 16:
        return f"{spec.rows} rows (at most 16)"
    if spec.warp_rows < 0 or spec.warp_rows * spec.rows > 64:
        return f"{spec.warp_rows} rows per warp at batch {spec.rows} (at most 64 sums per lane)"
    if spec.impl not in ("", "tir", "half2"):
        return f"GEMV implementation {spec.impl!r} (tir or half2)"
    if spec.prologue == "rms" and spec.x_in_shared is False:
        return "an RMSNorm prologue stages the normalized x in shared memory (x_in_shared=False refused)"
    if spec.prologue == "rms" and not _gemv_stages_x(spec):
        return f"the normalized {spec.rows} x {spec.k} input does not fit shared memory"
    return None


def _gemv_stages_x(spec: GemvSpec) -> bool:
    """Whether the input rows are staged in shared memory (else read through L1 from global memory)."""
    fits = spec.rows * spec.k * _BYTES[spec.dtype] <= 32 * 1024
    return fits if spec.x_in_shared is None else spec.x_in_shared and fits


def gemv_func(spec: GemvSpec) -> Any:
    """The PrimFunc ``(x [M, K][, gamma [K]], W...[, r [M, N]], out [M, N])``.

    x (normalized when asked) is staged in shared memory in the dtype; each warp then computes whole
    output rows: every lane reads 16 bytes of the weight row per step (all steps issued before the
    sums), the lanes' partial sums meet through warp shuffles, and lane 0 applies the epilogue.
    ``GEMV_WARPS`` warps per block, one output row (two for ``silu_mul``) per warp.  int4 weights with
    float16 activations go to :mod:`.cuda_gemv`'s half2 kernel (same signature) unless ``impl="tir"``."""
    import tvm
    from ctc.backends.tvm import cuda_gemv

    why = gemv_supported(spec)
    if why is not None:
        raise ValueError(f"gemv_func: unsupported ({why})")
    if spec.impl == "half2" or (spec.impl == "" and cuda_gemv.gemv_i4_supported(spec) is None):
        return cuda_gemv.gemv_i4_func(spec)  # raises where "half2" was asked for and does not cover spec
    return tvm.script.from_source(_gemv_source(spec))


def _gemv_source(spec: GemvSpec) -> str:
    M, K, N, dt = spec.rows, spec.k, spec.n, spec.dtype
    NW, G, PL, R = spec.weight_rows, spec.groups, spec.per_load, spec.rows_per_warp
    NT = 32 * GEMV_WARPS
    steps = -(-K // (32 * PL))                     # weight loads per lane
    quant = spec.weight != "dense"
    pair = spec.epilogue == "silu_mul"
    P = 2 if pair else 1
    WR = R * P                                      # weight rows per warp
    xv = 16 // _BYTES[dt]                           # x values per 16-byte load

    def rnd(e: str) -> str:
        return e if dt == "float32" else f'T.Cast("float32", T.Cast("{dt}", {e}))'

    args = ["x_h: T.handle"]
    if spec.prologue == "rms":
        args.append("g_h: T.handle")
    args.append("w_h: T.handle")
    if quant:
        args += ["s_h: T.handle", "z_h: T.handle"]
    if spec.epilogue == "residual":
        args.append("r_h: T.handle")
    args.append("o_h: T.handle")
    kb = K // 2 if spec.weight == "int4" else K     # weight row length in storage elements
    wdt = {"dense": dt, "int8": "int8", "int4": "uint8"}[spec.weight]
    L = [
        "@T.prim_func(private=True)",
        f"def gemv({', '.join(args)}):",
        '    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})',
        f'    X = T.match_buffer(x_h, ({M}, {K}), "{dt}")',
        f'    Wt = T.match_buffer(w_h, ({NW}, {kb}), "{wdt}")',
        f'    O = T.match_buffer(o_h, ({M}, {N}), "{dt}")',
    ]
    if spec.prologue == "rms":
        L.append(f'    GAM = T.match_buffer(g_h, ({K},), "{dt}")')
    if quant:  # the packed rows read as 32-bit words: one word is 8 nibbles (int4) or 4 bytes (int8)
        L += [f'    SC = T.match_buffer(s_h, ({NW}, {G}), "float32")',
              f'    ZP = T.match_buffer(z_h, ({NW}, {G}), "int8")']
    if spec.epilogue == "residual":
        L.append(f'    R = T.match_buffer(r_h, ({M}, {N}), "{dt}")')
    if quant:
        L.append(f'    Wu = T.decl_buffer(({NW}, {kb // 4}), "uint32", data=Wt.data)')
    stage = _gemv_stages_x(spec)
    ve = 4 if quant else 16 // _BYTES[dt]           # storage elements (words for integer weights) per 16-byte load
    ldt = "uint32" if quant else wdt
    prefetch = steps * WR <= 8  # the whole weight slice fits registers: load it before the prologue
    L += [
        f'    bx = T.launch_thread("blockIdx.x", {-(-N // (GEMV_WARPS * R))})',
        f'    tx = T.launch_thread("threadIdx.x", {NT})',
        f'    wred = T.decl_buffer(({GEMV_WARPS * M},), "float32", scope="shared")',
        f'    wl = T.decl_buffer(({steps * ve * WR},), "{ldt}", scope="local")',
        f'    wf = T.decl_buffer(({PL},), "float32", scope="local")',
        f'    xl = T.decl_buffer(({M * (32 // (4 if spec.weight == "int4" else 8) if quant else PL)},), "{dt}", '
        'scope="local")',
        f'    acc = T.decl_buffer(({M * WR},), "float32", scope="local")',
        '    ss = T.decl_buffer((1,), "float32", scope="local")',
        '    tmp = T.decl_buffer((1,), "float32", scope="local")',
        "    lane = tx % 32",
        f"    n0 = (bx * {GEMV_WARPS} + tx // 32) * {R}",
    ]
    if quant:
        L += [f'    part = T.decl_buffer(({M * WR},), "float32", scope="local")',
              f'    cz = T.decl_buffer(({WR},), "float32", scope="local")',
              f'    sg = T.decl_buffer(({WR},), "float32", scope="local")']
    if stage:
        L.insert(L.index(f'    wred = T.decl_buffer(({GEMV_WARPS * M},), "float32", scope="shared")'),
                 f'    xs = T.decl_buffer(({M * K},), "{dt}", scope="shared")')

    def wrow(wr: int) -> str:
        """Weight row of the warp's ``wr``-th slot (rows past N clamped: loaded, never written)."""
        r, pi = divmod(wr, P)
        return f"T.min(n0 + {r}, {N - 1})" + (f" + {pi * N}" if pi else "")

    def weight_loads(indent: str) -> list[str]:
        src = "Wu" if quant else "Wt"
        out = [f"{indent}if n0 < {N}:"]
        for wr in range(WR):
            base = f"{wr} * {steps * ve}"
            out += [f"{indent}    for s in T.unroll({steps}):",
                    f"{indent}        if (s * 32 + lane) * {PL} < {K}:",
                    f"{indent}            for e in T.vectorized({ve}):",
                    f"{indent}                wl[{base} + s * {ve} + e] = "
                    f"{src}[{wrow(wr)}, (s * 32 + lane) * {ve} + e]"]
        return out

    if prefetch:  # weights first: their latency overlaps the norm and the staging of x
        L += weight_loads("    ")
    # ---- stage x (normalized) in shared memory
    if spec.prologue == "rms":
        xk = f'T.Cast("float32", X[m, k0 * {NT} + tx]) * ss[0]'
        L += [f"    for m in range({M}):",
              "        ss[0] = T.float32(0)",
              f"        for k0 in range({-(-K // NT)}):",
              f"            if k0 * {NT} + tx < {K}:",
              f'                tmp[0] = T.Cast("float32", X[m, k0 * {NT} + tx])',
              "                ss[0] = ss[0] + tmp[0] * tmp[0]"]
        L += ["        " + ln for ln in _reduce_sum_lines("ss", GEMV_WARPS)]
        L += [f"        ss[0] = T.rsqrt(ss[0] / T.float32({K}.0) + T.float32({spec.eps!r}))",
              f"        for k0 in range({-(-K // NT)}):",
              f"            if k0 * {NT} + tx < {K}:",
              f"                tmp[0] = {rnd(xk)}",
              f'                xs[m * {K} + k0 * {NT} + tx] = '
              f'T.Cast("{dt}", T.Cast("float32", GAM[k0 * {NT} + tx]) * tmp[0])']
    elif stage:
        L += [f"    for i0 in range({-(-(M * K) // NT)}):",
              f"        if i0 * {NT} + tx < {M * K}:",
              f"            xs[i0 * {NT} + tx] = X[(i0 * {NT} + tx) // {K}, (i0 * {NT} + tx) % {K}]"]
    if stage:
        L.append('    T.tvm_storage_sync("shared")')
    if not prefetch:
        L += weight_loads("    ")
    src = (lambda i: f"xs[m * {K} + {i}]") if stage else (lambda i: f"X[m, {i}]")
    L += [f"    if n0 < {N}:", f"        for a in T.unroll({M * WR}):", "            acc[a] = T.float32(0)",
          f"        for s in T.unroll({steps}):",
          f"            if (s * 32 + lane) * {PL} < {K}:"]
    if not quant:  # ---- per step, the rows' x slices (16-byte loads), then the lane's weights as f32
        L += [f"                for m in T.unroll({M}):",
              f"                    for c in T.unroll({PL // xv}):",
              f"                        for e in T.vectorized({xv}):",
              f"                            xl[m * {PL} + c * {xv} + e] = "
              f"{src(f'(s * 32 + lane) * {PL} + c * {xv} + e')}"]
        for wr in range(WR):
            base = f"{wr} * {steps * ve}"
            L += [f"                for e in T.unroll({PL}):",
                  f'                    wf[e] = T.Cast("float32", wl[{base} + s * {ve} + e])',
                  f"                for m in T.unroll({M}):",
                  f"                    for e in T.unroll({PL}):",
                  f"                        acc[{wr * M} + m] = acc[{wr * M} + m] + wf[e] * "
                  f'T.Cast("float32", xl[m * {PL} + e])']
    else:
        # ---- per step and 32-bit word: the rows' x values under the word (loaded once for the warp's
        # ---- weight rows), then each weight row's codes.  Codes become f32 without a conversion
        # ---- instruction: OR-ing a code c < 2^23 into the mantissa of 2^23 gives the float 2^23 + c
        # ---- exactly; subtracting 2^23 + offset + zero (one constant per group) leaves the centred
        # ---- code, and the group's scale is applied once per load.
        gi = "0" if spec.group == -1 else f"((s * 32 + lane) * {PL}) // {spec.group}"
        bits, offset = (4, 8) if spec.weight == "int4" else (8, 128)
        pw = 32 // bits                                   # codes per word
        L += [f"                for a in T.unroll({M * WR}):", "                    part[a] = T.float32(0)"]
        for wr in range(WR):
            L += [f"                sg[{wr}] = SC[{wrow(wr)}, {gi}]",
                  f'                cz[{wr}] = T.float32({float(1 << 23) + offset!r}) + '
                  f'T.Cast("float32", ZP[{wrow(wr)}, {gi}])']
        L += ["                for c in T.unroll(4):",
              f"                    for m in T.unroll({M}):",
              f"                        for e in T.vectorized({pw}):",
              f"                            xl[m * {pw} + e] = {src(f'(s * 32 + lane) * {PL} + c * {pw} + e')}"]
        for wr in range(WR):
            word = f"wl[{wr * steps * ve} + s * {ve} + c]"
            if spec.weight == "int8":  # a signed byte b, read unsigned with its top bit flipped, is b + 128
                word = f"T.bitwise_xor({word}, T.uint32(0x80808080))"
            code = (f'T.bitwise_and(T.shift_right({word}, T.Cast("uint32", e * {bits})), '
                    f"T.uint32({(1 << bits) - 1}))")
            L += [f"                    for e in T.unroll({pw}):",
                  f'                        wf[e] = T.reinterpret("float32", T.bitwise_or({code}, '
                  f"T.uint32(0x4B000000))) - cz[{wr}]",
                  f"                    for m in T.unroll({M}):",
                  f"                        for e in T.unroll({pw}):",
                  f"                            part[{wr * M} + m] = part[{wr * M} + m] + wf[e] * "
                  f'T.Cast("float32", xl[m * {pw} + e])']
        L += [f"                for wr in T.unroll({WR}):",
              f"                    for m in T.unroll({M}):",
              f"                        acc[wr * {M} + m] = acc[wr * {M} + m] + sg[wr] * part[wr * {M} + m]"]
    # ---- warp sums and the epilogue (lane 0 writes)
    L += [f"        for a in T.unroll({M * WR}):"]
    for off in (16, 8, 4, 2, 1):
        L.append(f"            acc[a] = acc[a] + T.tvm_warp_shuffle_down(T.uint32(4294967295), acc[a], {off}, 32, 32)")
    L += ["        if lane == 0:"]
    for r in range(R):
        L += [f"            if n0 + {r} < {N}:", f"                for m in T.unroll({M}):"]
        y = rnd(f"acc[{r * P * M} + m]")
        at = f"O[m, n0 + {r}]"
        if spec.epilogue == "none":
            L.append(f'                    {at} = T.Cast("{dt}", acc[{r * P * M} + m])')
        elif spec.epilogue == "residual":
            L.append(f'                    {at} = T.Cast("{dt}", {y} + T.Cast("float32", R[m, n0 + {r}]))')
        else:
            up = rnd(f"acc[{(r * P + 1) * M} + m]")
            silu = rnd(f"{y} / (T.float32(1) + T.exp(T.float32(0) - {y}))")
            L.append(f'                    {at} = T.Cast("{dt}", {silu} * {up})')
    return "\n".join(L)


def _reduce_sum_lines(var: str, warps: int) -> list[str]:
    """Block sum of ``var[0]`` (shuffles, then the warps' sums through shared ``wred``), every thread gets it."""
    lines = [f"{var}[0] = {var}[0] + T.tvm_warp_shuffle_down(T.uint32(4294967295), {var}[0], {off}, 32, 32)"
             for off in (16, 8, 4, 2, 1)]
    lines += ['T.tvm_storage_sync("shared")', "if tx % 32 == 0:", f"    wred[tx // 32] = {var}[0]",
              'T.tvm_storage_sync("shared")', f"{var}[0] = wred[0]", f"for w in range(1, {warps}):",
              f"    {var}[0] = {var}[0] + wred[w]"]
    return lines
