"""The whole batch-1 decode step as one persistent CUDA kernel (:mod:`.cuda_persistent`), when the step is exactly
what that kernel computes.

Why: a Llama decode step through the per-operator kernels is ~118 launches in one CUDA graph; at batch 1 most
are a few microseconds long, so launch gaps and each kernel's ramp-up and tail set the step time.
:mod:`.cuda_persistent` computes the whole step in one launch (one block per multiprocessor, grid-wide barriers,
a bulk-copy weight ring): built by ``ctc compile``, 0.360 vs 0.632 ms a step (CUDA graph, back to back) for the
Llama-3.2-1B int4 shape on the H200 (benchmarks/results/cuda_h200.md, 2026-12-04).  That kernel is compiled for one
shape and one set of numerics, so it may only replace a step that computes exactly the same thing.  This module
decides that and emits it:

* :func:`match` recognises a static decode step (:func:`ctc.frontends.decode.static_decode_step`: ``input_ids
  [1, 1]``, ``position [1]``, per-layer k/v caches) as embedding -> L x [RMSNorm -> q|k|v int4 ``quant_linear``
  -> RoPE (cos/sin of ``position`` x the model's ``inv_freq``, Hugging Face's ``rotate_half`` form) -> cache
  writes -> GQA one-query attention under the mask ``key <= position`` -> o ``quant_linear`` + residual ->
  RMSNorm -> gate/up ``quant_linear``, SiLU(gate) * up -> down ``quant_linear`` + residual] -> RMSNorm -> int4
  LM head -> logits.  Structure first (any shape), then the dims against the kernel's compiled constants; each
  refusal is a sentence that the build notes carry ("persistent decode step: not used (...)").
* :func:`emit` binds the weights stacked over layers (``stack_layers`` derivations: q|k|v and gate|up
  concatenated per layer, as the fused GEMV groups bind them; W_qkv, W_o, W_down laid out by the kernel's own
  packing functions), the caches in place, a zeroed workspace that the kernel leaves zeroed, and launches
  :func:`device_source`'s entry through :func:`.cuda_mma.launcher` with grid = the target's multiprocessor count;
  a second small kernel writes the logits in the module's dtype (NaN where the step could not run: a grid
  barrier that timed out, a token or position out of range).

The kernel body is :data:`.cuda_persistent.CUDA_SOURCE`, used as text: :func:`device_source` turns its
``__global__ decode_step`` into a ``__device__`` function that TVM's launch calls, and its one cache pointer per
k and v into a per-layer lookup (ctc's caches are one buffer per layer), each by a substitution that must match
exactly once (else the build fails, naming the pattern).
"""

from __future__ import annotations

import ast
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ctc.ir.graph import Module, Node, Value

__all__ = ["ENTRY", "FINISH", "MARKER", "DecodeStack", "NoMatch", "StepOptions", "check_dims", "check_packings",
           "device_source", "emit", "finish_func", "kernel_constants", "layout_tag", "match", "plan_note",
           "shared_bytes", "stack_layers", "step_func"]

MARKER = "ctc_pdec_ext::"  # what the TIR launchers call: the library source is injected where it appears
ENTRY = "ctc_pdec_ext::step"
FINISH = "ctc_pdec_ext::finish"
FINISH_THREADS = 256
ARCHES = ("sm_90", "sm_90a")  # bulk copies with mbarrier completion, L2 cache hints: Hopper


@dataclass(frozen=True)
class StepOptions:
    """Whether the lowering may use the persistent step, and the grid it launches (the target's SM count)."""

    enabled: bool = True
    sms: int = 0
    arch: str = ""


# ----------------------------------------------------------------------------------------------- kernel source
def _source() -> str:
    from ctc.backends.tvm import cuda_persistent

    return cuda_persistent.CUDA_SOURCE


def _strip_comments(src: str) -> str:
    return re.sub(r"//[^\n]*", "", src)


def _eval_int(expr: str, names: dict[str, int]) -> int | None:
    """An integer C constant expression over ``names`` (+ - * / % and parentheses), or None."""
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        return None

    def ev(n: ast.AST) -> int:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.Name):
            return names[n.id]
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        if isinstance(n, ast.BinOp):
            a, b = ev(n.left), ev(n.right)
            ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                   ast.Div: lambda: (abs(a) // abs(b)) * (1 if (a >= 0) == (b >= 0) else -1),  # C: toward 0
                   ast.Mod: lambda: a - b * ((abs(a) // abs(b)) * (1 if (a >= 0) == (b >= 0) else -1))}  # C
            for k, f in ops.items():
                if isinstance(n.op, k):
                    return f()
        raise KeyError(type(n).__name__)

    try:
        return ev(tree)
    except (KeyError, ZeroDivisionError):
        return None


_SCALARS = {"int": 4, "unsigned": 4, "float": 4, "short": 2, "char": 1, "half": 2, "double": 8, "size_t": 8,
            "long": 8}


def _struct_sizes(text: str) -> dict[str, int]:
    """``sizeof`` of the plain structs in ``text`` (fields: pointers, scalars, arrays of those or of earlier
    structs; natural alignment); a struct with any other field is left out."""
    out: dict[str, int] = {}
    for m in re.finditer(r"struct\s+(\w+)\s*\{([^{}]*)\};", text):
        size = align = 0
        ok = True
        for decl in (d.strip() for d in m.group(2).split(";") if d.strip()):
            dm = re.fullmatch(r"(?:const\s+)?([\w ]+?)\s*(\*?)\s*(\w+(?:\s*\[\s*\d+\s*\])?(?:\s*,\s*\w+)*)", decl)
            if dm is None:
                ok = False
                break
            base, ptr = dm.group(1).replace("unsigned long long", "size_t").split()[-1], dm.group(2)
            one = 8 if ptr else _SCALARS.get(base, out.get(base, 0))
            al = 8 if ptr else min(8, one) if base in _SCALARS else 8
            if not one:
                ok = False
                break
            for var in dm.group(3).split(","):
                n = re.search(r"\[\s*(\d+)\s*\]", var)
                size = -(-size // al) * al + one * (int(n.group(1)) if n else 1)
                align = max(align, al)
        if ok and align:
            out[m.group(1)] = -(-size // align) * align
    return out


@functools.lru_cache(maxsize=4)
def _constexprs(src: str) -> dict[str, int]:
    """The integer ``constexpr`` constants of the kernel's namespace (and its ``#define`` defaults), evaluated."""
    text = _strip_comments(src)
    for name, size in _struct_sizes(text).items():
        text = re.sub(rf"\(int\)\s*sizeof\(\s*{name}\s*\)|sizeof\(\s*{name}\s*\)", str(size), text)
    names: dict[str, int] = {}
    for m in re.finditer(r"#define\s+(\w+)\s+(-?\d+)\s*$", text, re.M):
        names.setdefault(m.group(1), int(m.group(2)))
    for m in re.finditer(r"constexpr\s+(?:int|unsigned)\s+([^;]*);", text, re.S):
        for part in m.group(1).split(","):
            if "=" not in part:
                continue
            name, expr = part.split("=", 1)
            v = _eval_int(expr, names)
            if v is not None:
                names[name.strip()] = v
    return names


def kernel_constants() -> dict[str, int]:
    """The shape the kernel is compiled for: ``hidden``, ``heads``, ``kv_heads``, ``head_dim``, ``ffn``, ``group``,
    ``smem`` (its dynamic shared memory), ``ws_floats`` (its workspace), ``threads`` (a block's) and ``min_blocks``
    (the grid it needs), read from the source and checked against :data:`.cuda_persistent.LLAMA_1B` /
    ``WS_FLOATS``."""
    from ctc.backends.tvm import cuda_persistent as P

    c = _constexprs(_source())
    names = {"hidden": "H", "heads": "NQ", "kv_heads": "NKV", "head_dim": "HD", "ffn": "FF", "group": "GS",
             "smem": "SMEM", "ws_ctl": "WS_CTL", "threads": "NT", "attention_blocks": "NOB", "ffn_slices": "FSL"}
    missing = [v for v in names.values() if v not in c]
    if missing:
        raise RuntimeError(f"cuda_persistent.CUDA_SOURCE: constants {missing} not found (or not evaluable) in the "
                           "kernel source; cuda_decode_stack reads the kernel's shape from them")
    out = {k: c[v] for k, v in names.items()}
    out["ws_floats"] = out.pop("ws_ctl") + 64
    # blocks the phases need co-resident (the attention + W_o blocks, the FFN slices), at least one per kv head
    out["min_blocks"] = max(out.pop("attention_blocks"), out.pop("ffn_slices"), out["kv_heads"])
    for k in ("hidden", "heads", "kv_heads", "head_dim", "ffn", "group"):
        if P.LLAMA_1B[k] != out[k]:
            raise RuntimeError(f"cuda_persistent: LLAMA_1B[{k!r}] = {P.LLAMA_1B[k]} but the kernel source says "
                               f"{out[k]}")
    if P.WS_FLOATS != out["ws_floats"]:
        raise RuntimeError(f"cuda_persistent: WS_FLOATS = {P.WS_FLOATS} but the kernel source's workspace is "
                           f"{out['ws_floats']} floats")
    check_packings()
    return out


def _table_offset(smem: int) -> int:
    return -(-smem // 16) * 16


def shared_bytes(layers: int) -> int:
    """Dynamic shared memory of one block: the kernel's, then the per-layer cache pointer table."""
    return _table_offset(kernel_constants()["smem"]) + 2 * layers * 8


def _sub_once(src: str, pattern: str, repl: str, what: str) -> str:
    out, n = re.subn(pattern, repl, src)
    if n != 1:
        raise RuntimeError(f"cuda_decode_stack: the persistent kernel's source changed: {what} (pattern {pattern!r}) "
                           f"matched {n} times, expected once; update cuda_decode_stack.device_source")
    return out


_PRELUDE = r"""
// ---- ctc: persistent decode step as a device function for TVM's launch (ctc/backends/tvm/cuda_decode_stack.py)
#include <math.h>
namespace ctc_pdec_ext {
// One cache per layer (ctc's layout) seen through the kernel's single-buffer addressing: flat offset
// ((l * kv_heads + h) * max_len + t) * head_dim -> layer l's buffer (a table in shared memory) + the rest.
struct CacheRef {
  half* const* tab;
  unsigned long long per_layer;
  int which;  // 0: keys, 1: values
  __device__ __forceinline__ half* operator+(unsigned long long off) const {
    const unsigned long long l = off / per_layer;
    return tab[2 * l + which] + (off - l * per_layer);
  }
  __device__ __forceinline__ half& operator[](unsigned long long i) const { return *(*this + i); }
};
}  // namespace ctc_pdec_ext
"""

_ENTRY = r"""
namespace ctc_pdec_ext {
static_assert(ctc_pdec::SMEM == %(smem)d, "cuda_decode_stack read another shared memory size from the source");
static_assert(ctc_pdec::WS_CTL + 64 == %(ws_floats)d, "cuda_decode_stack read another workspace size");
static_assert(%(table)d %% 16 == 0 && %(table)d >= ctc_pdec::SMEM, "cache table offset");
struct ArgsMirror {  // ctc_pdec::Args as this entry fills it: a field added there must be filled here too
  const void* p0[14]; CacheRef k, v; const void* p1[6]; int i0[4]; float f0; int i1;
};
static_assert(sizeof(ctc_pdec::Args) == sizeof(ArgsMirror), "ctc_pdec::Args changed: update cuda_decode_stack");

// One decode step.  Every block: token and position in range (else nothing runs and finish() writes NaN),
// thread 0 puts the 2L cache pointers into shared memory past the kernel's layout, then the kernel body.
template <class... C>
__device__ __forceinline__ void step(const void* token, const void* pos, const void* wqkv, const void* sqkv,
                                     const void* wo, const void* so, const void* wgu, const void* sgu,
                                     const void* wd, const void* sd, const void* attn_norm, const void* mlp_norm,
                                     const void* final_norm, const void* emb, const void* whead, const void* shead,
                                     const void* inv_freq, void* ws, void* logits, void* smem, float eps, int vocab,
                                     int max_len, C... caches) {
  const long long tok = *static_cast<const long long*>(token), p = *static_cast<const long long*>(pos);
  if (tok < 0 || tok >= vocab || p < 0 || p >= max_len) return;
  half** tab = reinterpret_cast<half**>(static_cast<unsigned char*>(smem) + %(table)d);
  if (threadIdx.x == 0) {
    int i = 0;
    ((tab[i++] = static_cast<half*>(caches)), ...);
  }
  ctc_pdec::Args a{};
  a.wqkv = static_cast<const unsigned char*>(wqkv); a.sqkv = static_cast<const float*>(sqkv);
  a.wo = static_cast<const unsigned char*>(wo); a.so = static_cast<const float*>(so);
  a.wgu = static_cast<const unsigned char*>(wgu); a.sgu = static_cast<const float*>(sgu);
  a.wd = static_cast<const unsigned char*>(wd); a.sd = static_cast<const float*>(sd);
  a.attn_norm = static_cast<const half*>(attn_norm); a.mlp_norm = static_cast<const half*>(mlp_norm);
  a.final_norm = static_cast<const half*>(final_norm); a.emb = static_cast<const half*>(emb);
  a.whead = static_cast<const unsigned char*>(whead); a.shead = static_cast<const float*>(shead);
  const unsigned long long per_layer = (unsigned long long)ctc_pdec::NKV * max_len * ctc_pdec::HD;
  a.kcache = CacheRef{tab, per_layer, 0};
  a.vcache = CacheRef{tab, per_layer, 1};
  a.inv_freq = static_cast<const float*>(inv_freq);
  a.token = static_cast<const int*>(token);  // the low word of the int64 id (checked in range above)
  a.pos = static_cast<const int*>(pos);
  a.ws = static_cast<float*>(ws); a.logits = static_cast<float*>(logits); a.trace = nullptr;
  a.layers = (int)(sizeof...(C) / 2); a.vocab = vocab; a.max_len = max_len; a.mode = 0; a.eps = eps;
  a.att_span = 0;
  ctc_pdec::decode_step(a);
}

__device__ __forceinline__ void store(half* o, float v) { *o = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* o, float v) { *o = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(float* o, float v) { *o = v; }

// The logits in the module's dtype; NaN when the step did not run (token / position out of range) or gave up
// (the workspace's abort flag: a grid barrier or ring wait timed out; it stays set, so every later step says so).
template <class T>
__device__ __forceinline__ void finish(const void* logits, const void* ws, const void* token, const void* pos,
                                       T* out, int vocab, int max_len, int bx, int tx) {
  const int i = bx * %(finish_threads)d + tx;
  if (i >= vocab) return;
  const long long tok = *static_cast<const long long*>(token), p = *static_cast<const long long*>(pos);
  const unsigned abort = static_cast<const unsigned*>(ws)[ctc_pdec::WS_CTL + ctc_pdec::CTL_ABORT];
  const bool bad = abort != 0u || tok < 0 || tok >= vocab || p < 0 || p >= max_len;
  store(out + i, bad ? __int_as_float(0x7fc00000) : static_cast<const float*>(logits)[i]);
}
}  // namespace ctc_pdec_ext
// ---- end ctc ----
"""


@functools.lru_cache(maxsize=4)
def _device_source(src: str) -> str:
    end = "}  // namespace ctc_pdec"
    if src.count(end) != 1:
        raise RuntimeError(f"cuda_decode_stack: the persistent kernel's source has {src.count(end)} lines "
                           f"{end!r}, expected one (the device code ends there, host launch code follows)")
    body = src[:src.index(end) + len(end)] + "\n"
    body = _sub_once(body, r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?decode_step\(\s*const\s+"
                           r"__grid_constant__\s+Args\s+a\s*\)",
                     "__device__ __forceinline__ void decode_step(const Args& a)", "the kernel's entry decode_step")
    body = _sub_once(body, r"half\*\s+kcache;\s*half\*\s+vcache;",
                     "::ctc_pdec_ext::CacheRef kcache; ::ctc_pdec_ext::CacheRef vcache;",
                     "the Args fields kcache, vcache")
    c = kernel_constants()
    entry = _ENTRY % {"smem": c["smem"], "ws_floats": c["ws_floats"], "table": _table_offset(c["smem"]),
                      "finish_threads": FINISH_THREADS}
    return _PRELUDE + body + entry


def device_source() -> str:
    """The kernel of :data:`.cuda_persistent.CUDA_SOURCE` as device functions TVM's launchers call: ``step`` (the
    kernel body behind a ``__device__`` entry taking per-layer caches) and ``finish`` (logits in the module's
    dtype).  Needs :data:`.cuda_gemv.CUDA_SOURCE` in front (the library puts it there)."""
    return _device_source(_source())


# ----------------------------------------------------------------------------------------------- TIR launchers
_WEIGHTS = ("WQKV", "SQKV", "WO", "SO", "WGU", "SGU", "WD", "SD", "AN", "MN", "FN", "EMB", "WH", "SH", "INV")


def step_func(layers: int, vocab: int, max_len: int, sms: int, eps: float,
              weights: list[tuple[tuple[int, ...], str]]) -> Any:
    """The PrimFunc launching one step on ``sms`` blocks: ``(ids, position, wqkv, sqkv, wo, so, wgu, sgu, wd, sd,
    attn_norm, mlp_norm, final_norm, emb, whead, shead, inv_freq, ws, k_0, v_0, ..., logits)``; ``weights``: the
    ``(shape, dtype)`` of the fifteen weight arrays from ``wqkv`` to ``inv_freq``, as bound."""
    from ctc.backends.tvm.cuda_mma import launcher

    c = kernel_constants()
    if len(weights) != len(_WEIGHTS):
        raise ValueError(f"step_func: {len(weights)} weight arrays, expected {len(_WEIGHTS)}")
    bufs = [("TOK", "1, 1", "int64"), ("POS", "1", "int64"),
            *((n, ", ".join(map(str, shape)), dt) for n, (shape, dt) in zip(_WEIGHTS, weights, strict=True)),
            ("WS", f"{c['ws_floats']}", "float32")]
    caches = [(f"{t}{i}", f"1, {c['kv_heads']}, {max_len}, {c['head_dim']}", "float16")
              for i in range(layers) for t in "KV"]
    bufs += caches + [("LOG", f"{vocab}", "float32")]
    args = [f"{b[0]}.data" for b in bufs[:18]] + ["LOG.data", "S.data", f"T.float32({float(eps)!r})",
                                                  f"T.int32({vocab})", f"T.int32({max_len})"]
    args += [f"{b[0]}.data" for b in caches]
    return launcher("ctc_pdec_step", bufs, [], (str(sms), "1"), c["threads"], shared_bytes(layers), ENTRY, args,
                    with_ids=False)


def finish_func(vocab: int, max_len: int, dtype: str) -> Any:
    """The PrimFunc writing the logits ``[1, 1, vocab]`` in ``dtype`` from the step's f32 ones (NaN where the step
    did not run)."""
    from ctc.backends.tvm.cuda_mma import launcher

    ws = kernel_constants()["ws_floats"]
    bufs = [("LG", f"{vocab}", "float32"), ("WS", f"{ws}", "float32"), ("TOK", "1, 1", "int64"),
            ("POS", "1", "int64"), ("OUT", f"1, 1, {vocab}", dtype)]
    args = ["LG.data", "WS.data", "TOK.data", "POS.data", "OUT.data", f"T.int32({vocab})", f"T.int32({max_len})"]
    return launcher("ctc_pdec_finish", bufs, [], (str(-(-vocab // FINISH_THREADS)), "1"), FINISH_THREADS, 0,
                    FINISH, args, with_by=False)


# ----------------------------------------------------------------------------------------------- matcher
class NoMatch(Exception):
    """Why the step is not what the kernel computes (one sentence)."""


_VIEWS = ("reshape", "unsqueeze", "squeeze", "transpose", "permute", "expand")


@dataclass
class Layer:
    """One decoder layer's nodes and parameter names."""

    attn_norm: str
    mlp_norm: str
    q: Node
    k: Node
    v: Node
    o: Node
    gate: Node
    up: Node
    down: Node
    k_write: Node
    v_write: Node


@dataclass
class DecodeStack:
    """A matched decode step: every node of the module is a member (the group is the whole step)."""

    ids: Value
    position: Value
    embedding: str
    layers: list[Layer]
    final_norm: str
    head: Node
    logits: Value
    inv_freq: str
    eps: float
    dims: dict[str, int]
    members: list[Node] = field(default_factory=list)
    norm: Node | None = None  # the lowering's group protocol (no RMSNorm absorbed from outside)
    sms: int = 0  # the grid: the target's multiprocessors

    def last(self, order: dict[int, int]) -> Node:
        """The member at which the walk emits the group: its last node."""
        return max(self.members, key=lambda n: order[id(n)])


def _param(v: Value | None) -> str | None:
    p = v.producer if v is not None else None
    return str(p.attrs["name"]) if p is not None and p.op == "param" else None


def _one_user(v: Value, m: Module, what: str) -> Node:
    us = v.users
    if len(us) != 1 or m.is_output(v):
        raise NoMatch(f"{what} is read {len(us)} times{' and is an output' if m.is_output(v) else ''} (the kernel "
                      "keeps it internal)")
    return us[0]


class _Walk:
    """The structural match, recording every node it accepts."""

    def __init__(self, m: Module):
        self.m = m
        self.seen: dict[int, Node] = {}
        self.eps: float | None = None
        self.group: int | None = None
        self.angles: Value | None = None  # position x inv_freq, concatenated: one table for every layer
        self.inv_freq: str | None = None

    def take(self, *ns: Node) -> None:
        for n in ns:
            self.seen[id(n)] = n

    def back(self, v: Value, ops: tuple[str, ...] = _VIEWS) -> Value:
        """Through view ops (recorded) to the first value that is not a view's result."""
        while v.producer is not None and v.producer.op in ops:
            self.take(v.producer)
            v = v.producer.inputs[0]
        return v

    # ------------------------------------------------------------------ pieces
    def norm(self, n: Node, where: str) -> str:
        if n.op != "rms_norm":
            raise NoMatch(f"{where}: {n.op} where the kernel computes an RMSNorm")
        g = n.operand("weight")
        name = _param(g)
        if name is None or g.type.dtype != "f16" or n.outputs[0].type.dtype != "f16":
            raise NoMatch(f"{where}: RMSNorm weight is not an f16 parameter (or its output is not f16)")
        eps = float(n.attr("eps"))
        if self.eps is None:
            self.eps = eps
        elif not math.isclose(eps, self.eps, rel_tol=1e-6):
            raise NoMatch(f"{where}: RMSNorm eps {eps} differs from {self.eps} (the kernel takes one eps)")
        self.take(n)
        return name

    def linear(self, n: Node, where: str) -> Node:
        if n.op == "linear":
            raise NoMatch(f"{where} is a float linear (the kernel takes int4 quant_linear weights: quantize with "
                          "w_bits=4, blocks_only=false for the LM head)")
        if n.op != "quant_linear":
            raise NoMatch(f"{where}: {n.op} where the kernel computes a linear")
        if n.attr("has_bias") or n.has_operand("bias"):
            raise NoMatch(f"{where} has a bias (the kernel's linears have none)")
        if n.attr("w_bits") != 4:
            raise NoMatch(f"{where} has {n.attr('w_bits')}-bit weights (the kernel takes int4)")
        if not n.attr("w_symmetric"):
            raise NoMatch(f"{where} has asymmetric weights (the kernel reads no zero points)")
        if n.attr("a_bits") not in (None, 16) or n.attr("act_dynamic"):
            raise NoMatch(f"{where} quantizes its activations (the kernel is weight-only)")
        gs = int(n.attr("group_size"))
        if self.group is None:
            self.group = gs
        elif gs != self.group:
            raise NoMatch(f"{where} has group size {gs}, others {self.group} (the kernel takes one)")
        qw, sc, zr = n.operand("qweight"), n.operand("w_scale"), n.operand("w_zero")
        if None in (_param(qw), _param(sc), _param(zr)):
            raise NoMatch(f"{where}: weights computed in the graph (the kernel streams parameters)")
        if qw.type.dtype != "u8" or sc.type.dtype != "f32":
            raise NoMatch(f"{where}: weights {qw.type.dtype} / scales {sc.type.dtype} (the kernel takes u8 codes and "
                          "f32 scales)")
        x, y = n.operand("x").type, n.outputs[0].type
        if x.dtype != "f16" or y.dtype != "f16":
            raise NoMatch(f"{where} computes in {y.dtype} (the kernel's activations are f16)")
        k, nn = x.shape[-1], y.shape[-1]
        if (not isinstance(k, int) or not isinstance(nn, int) or gs < 1 or k % gs
                or tuple(qw.type.shape) != (nn, k // 2) or tuple(sc.type.shape) != (nn, k // gs)):
            raise NoMatch(f"{where}: weight storage {qw.type.shape} / scales {sc.type.shape} is not [N, K/2] / "
                          f"[N, K/{gs}] for K = {k}")
        zero = self.m.params.get(str(_param(zr)))
        if zero is not None and bool(zero.any()):
            raise NoMatch(f"{where}: zero points are not all 0 (the kernel reads none)")
        self.take(n)
        return n

    def head_split(self, v: Value, where: str) -> tuple[Node, int, int]:
        """``[1, H, 1, D]`` made from a linear's ``[1, 1, H*D]`` by reshape ``[1, 1, H, D]`` and transpose(1, 2)."""
        t = v.producer
        if t is None or not _swaps_1_2(t):
            raise NoMatch(f"{where}: the heads are not split by reshape [1, 1, H, D] + transpose(1, 2)")
        r = t.inputs[0].producer
        if r is None or r.op != "reshape" or len(r.outputs[0].type.shape) != 4:
            raise NoMatch(f"{where}: the heads are not split by reshape [1, 1, H, D] + transpose(1, 2)")
        _, _, h, d = r.outputs[0].type.shape
        lin = r.inputs[0].producer
        if lin is None or not isinstance(h, int) or not isinstance(d, int):
            raise NoMatch(f"{where}: the heads are not split from a linear's output")
        for x in (r.outputs[0], t.outputs[0], lin.outputs[0]):
            _one_user(x, self.m, where)
        self.take(t, r)
        return lin, h, d

    def rope(self, rot: Node, position: Value, where: str) -> None:
        """cos/sin of the rotary op: views of cast(mul(cos|sin(concat(f, f)), 1.0)) with f = position * inv_freq."""
        cos_sin = (rot.operand("cos"), rot.operand("sin"))
        found = []
        for t, fn in zip(cos_sin, ("cos", "sin"), strict=True):
            v = self.back(t, ("unsqueeze", "reshape", "cast"))
            p = v.producer
            if p is not None and p.op == "mul" and p.scalar("b") is not None:
                if p.scalar("b") != 1.0:
                    raise NoMatch(f"{where}: RoPE tables are scaled by {p.scalar('b')} (the kernel's are not)")
                self.take(p)
                v = p.inputs[0]
                v = self.back(v, ("cast",))
                p = v.producer
            if p is None or p.op != fn:
                raise NoMatch(f"{where}: RoPE {fn} table is not {fn}(angles) (got {p.op if p else 'an input'})")
            self.take(p)
            found.append(p.inputs[0])
        if found[0] is not found[1]:
            raise NoMatch(f"{where}: RoPE cos and sin take different angles")
        if self.angles is not None:
            if found[0] is not self.angles:
                raise NoMatch(f"{where}: RoPE angles differ from the first layer's (the kernel computes one table)")
            self.take(rot)
            return
        cat = found[0].producer
        if (cat is None or cat.op != "concat" or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1]
                or cat.attr("axis") not in (-1, len(cat.outputs[0].type.shape) - 1)):
            raise NoMatch(f"{where}: RoPE angles are not concat(f, f) along the last axis (Hugging Face's "
                          "rotate_half form)")
        mul = cat.inputs[0].producer
        if mul is None or mul.op != "mul" or len(mul.inputs) != 2 or mul.outputs[0].type.dtype != "f32":
            raise NoMatch(f"{where}: RoPE angles are not position x inv_freq in f32")
        self.take(cat, mul)
        sides = [self.back(x, ("unsqueeze", "reshape", "cast")) for x in mul.inputs]
        inv = [s for s in sides if _param(s) is not None]
        pos = [s for s in sides if s is position]
        if len(inv) != 1 or len(pos) != 1:
            raise NoMatch(f"{where}: RoPE angles are not the position input x an inv_freq parameter")
        if len(inv[0].type.shape) != 1 or inv[0].type.dtype not in ("f16", "f32", "bf16"):
            raise NoMatch(f"{where}: inv_freq is {inv[0].type}, not a vector")
        self.inv_freq = _param(inv[0])
        self.angles = found[0]
        self.take(rot)

    def mask(self, v: Value, position: Value, where: str) -> int:
        """``key <= position`` as bool over the cache's length (views of ``le(arange(S), position)``); its S."""
        le = self.back(v).producer
        if le is None or le.op not in ("le", "ge") or v.type.dtype != "bool":
            raise NoMatch(f"{where}: the attention mask is not key <= position")
        a, b = (self.back(x) for x in le.inputs[:2])
        keys, pos = (a, b) if le.op == "le" else (b, a)
        ar = keys.producer
        if (ar is None or ar.op != "arange" or pos is not position or list(ar.attr("start")) != [0]
                or ar.attr("step") != 1):
            raise NoMatch(f"{where}: the attention mask is not arange(max_len) <= position")
        self.take(le, ar)
        return int(ar.attr("end")[0])


def _swaps_1_2(n: Node) -> bool:
    if n.op == "transpose":
        return {n.attr("dim0") % 4, n.attr("dim1") % 4} == {1, 2} and len(n.outputs[0].type.shape) == 4
    if n.op == "permute":
        return list(n.attr("dims")) == [0, 2, 1, 3]
    return False


def match(m: Module) -> DecodeStack:
    """The module as :class:`DecodeStack`, shape-generic; raises :class:`NoMatch` with the reason otherwise."""
    w = _Walk(m)
    writes = [n for n in m.nodes if n.op == "cache_write"]
    if not writes:
        raise NoMatch("no cache_write: not a static decode step")
    position = writes[0].operand("position")
    if position.producer is not None or any(n.operand("position") is not position for n in writes):
        raise NoMatch("the cache writes do not all take the position input")
    if tuple(position.type.shape) != (1,):
        raise NoMatch(f"position is {position.type} (the kernel writes one token a step)")
    embs = [n for n in m.nodes if n.op == "embedding"]
    if len(embs) != 1:
        raise NoMatch(f"{len(embs)} embedding lookups (the kernel starts from one)")
    emb = embs[0]
    ids = emb.operand("ids")
    emb_w = emb.operand("weight")
    if ids.producer is not None or ids.type.dtype != "i64" or position.type.dtype != "i64":
        raise NoMatch("input_ids / position are not i64 module inputs")
    if tuple(ids.type.shape) != (1, 1):
        raise NoMatch(f"input_ids is {list(ids.type.shape)}: the kernel runs batch 1, one token a step")
    if _param(emb_w) is None or emb_w.type.dtype != "f16":
        raise NoMatch(f"the embedding table is not an f16 parameter ({emb_w.type})")
    w.take(emb)
    x = emb.outputs[0]
    layers: list[Layer] = []
    max_len = None
    dims: dict[str, int] = {}
    while True:
        where = f"layer {len(layers)}"
        us = x.users
        norms = [u for u in us if u.op == "rms_norm" and u.operand("x") is x]
        if len(norms) != 1:
            raise NoMatch(f"{where}: the residual stream is not read by one RMSNorm")
        if len(us) == 1:  # the final norm
            break
        if len(us) != 2 or m.is_output(x):
            raise NoMatch(f"{where}: the residual stream has {len(us)} readers (an RMSNorm and a residual add)")
        attn_norm = w.norm(norms[0], f"{where} attention norm")
        hn = norms[0].outputs[0]
        lins = hn.users
        if len(lins) != 3 or m.is_output(hn):
            raise NoMatch(f"{where}: the attention norm feeds {len(lins)} ops (q, k and v projections)")
        # each projection: reshape -> transpose -> [rotary ->] the attention (q) or a cache write (k, v)
        found: list[tuple[Node, Node | None, Node]] = []
        for lin in lins:
            if lin.op not in ("linear", "quant_linear"):
                raise NoMatch(f"{where}: the attention norm feeds a {lin.op}")
            nxt = lin
            for _ in range(3):
                nxt = _one_user(nxt.outputs[0], m, f"{where} projection")
            rot = nxt if nxt.op == "rotary_embedding" else None
            end = _one_user(rot.outputs[0], m, f"{where} rotary output") if rot is not None else nxt
            if end.op not in ("scaled_dot_product_attention", "cache_write"):
                raise NoMatch(f"{where}: a projection of the attention norm feeds a {end.op}, not the attention or a "
                              "cache write")
            found.append((lin, rot, end))
        qs = [f for f in found if f[2].op == "scaled_dot_product_attention"]
        if len(qs) != 1:
            raise NoMatch(f"{where}: {len(qs)} projections feed the attention directly (q only)")
        q_lin, q_rot, sdpa = qs[0]
        by_operand = {}
        for lin, rot, cw in (f for f in found if f[2].op == "cache_write"):
            out = cw.outputs[0]
            role = "k" if sdpa.operand("k") is out else "v" if sdpa.operand("v") is out else "?"
            by_operand[role] = (lin, rot, cw)
        if set(by_operand) != {"k", "v"}:
            raise NoMatch(f"{where}: the attention does not read the two written caches as k and v")
        k_lin, k_rot, kw = by_operand["k"]
        v_lin, v_rot, vw = by_operand["v"]
        if q_rot is None or k_rot is None:
            raise NoMatch(f"{where}: no rotary embedding on {'q' if q_rot is None else 'k'} (the kernel applies RoPE "
                          "to q and k)")
        if v_rot is not None:
            raise NoMatch(f"{where}: a rotary embedding on v (the kernel rotates q and k only)")
        for name, lin in (("q_proj", q_lin), ("k_proj", k_lin), ("v_proj", v_lin)):
            w.linear(lin, f"{where} {name}")
        _, nq, hd = w.head_split(q_rot.operand("x"), f"{where} q")
        _, nkv, hd_k = w.head_split(k_rot.operand("x"), f"{where} k")
        _, nkv_v, hd_v = w.head_split(vw.operand("update"), f"{where} v")
        if (nkv, hd) != (nkv_v, hd_v) or hd != hd_k:
            raise NoMatch(f"{where}: k and v heads differ")
        w.rope(q_rot, position, f"{where} q")
        w.rope(k_rot, position, f"{where} k")
        for cw, t in ((kw, "k"), (vw, "v")):
            cache = cw.operand("cache")
            if (cache.producer is not None or cache.type.dtype != "f16" or len(cache.type.shape) != 4
                    or cw.attr("axis") % 4 != 2 or len(cache.users) != 1 or m.is_output(cache)):
                raise NoMatch(f"{where}: {t} cache is not an f16 [1, kv_heads, max_len, head_dim] input written once "
                              "at axis 2")
            b, hk, s, d = cache.type.shape
            if (b, hk, d) != (1, nkv, hd) or not isinstance(s, int):
                raise NoMatch(f"{where}: {t} cache is {list(cache.type.shape)}, not [1, {nkv}, max_len, {hd}]")
            if max_len is None:
                max_len = s
            elif s != max_len:
                raise NoMatch(f"{where}: {t} cache holds {s} positions, others {max_len}")
            out = cw.outputs[0]
            if not m.is_output(out) or [u for u in out.users] != [sdpa]:
                raise NoMatch(f"{where}: the written {t} cache is read by more than the attention")
            w.take(cw)
        if sdpa.operand("q") is not q_rot.outputs[0] or sdpa.operand("k") is not kw.outputs[0] \
                or sdpa.operand("v") is not vw.outputs[0]:
            raise NoMatch(f"{where}: the attention does not read the rotated q and the written caches")
        if sdpa.attr("is_causal") or sdpa.operand("mask") is None:
            raise NoMatch(f"{where}: the attention has no position mask")
        scale = sdpa.attr("scale")
        if scale is not None and not math.isclose(float(scale), hd ** -0.5, rel_tol=1e-6):
            raise NoMatch(f"{where}: attention scale {scale} (the kernel scales by 1/sqrt(head_dim))")
        if nq % nkv or (nq != nkv and not sdpa.attr("enable_gqa")):
            raise NoMatch(f"{where}: {nq} query heads over {nkv} kv heads without grouped-query attention")
        if w.mask(sdpa.operand("mask"), position, f"{where}") != max_len:
            raise NoMatch(f"{where}: the mask's length differs from the caches'")
        w.take(sdpa)
        # attention output -> transpose(1, 2) -> reshape [1, 1, H*D] -> o_proj -> + residual
        t = _one_user(sdpa.outputs[0], m, f"{where} attention output")
        r = _one_user(t.outputs[0], m, f"{where} attention output") if _swaps_1_2(t) else None
        if r is None or r.op != "reshape" or tuple(r.outputs[0].type.shape) != (1, 1, nq * hd):
            raise NoMatch(f"{where}: the attention output is not merged by transpose(1, 2) + reshape [1, 1, H*D]")
        w.take(t, r)
        o = w.linear(_one_user(r.outputs[0], m, f"{where} attention output"), f"{where} o_proj")
        h = _residual(w, o, x, f"{where} o_proj")
        # MLP: RMSNorm -> gate, up -> silu(gate) * up -> down -> + residual
        hus = h.users
        n2 = [u for u in hus if u.op == "rms_norm" and u.operand("x") is h]
        if len(hus) != 2 or len(n2) != 1 or m.is_output(h):
            raise NoMatch(f"{where}: the residual after attention is not read by an RMSNorm and a residual add")
        mlp_norm = w.norm(n2[0], f"{where} MLP norm")
        gu = n2[0].outputs[0].users
        if len(gu) != 2 or m.is_output(n2[0].outputs[0]):
            raise NoMatch(f"{where}: the MLP norm feeds {len(gu)} ops (gate and up projections)")
        first = [_one_user(lin.outputs[0], m, f"{where} MLP projection") for lin in gu]
        acts = [u for u in first if u.op != "mul"]
        if len(acts) != 1 or acts[0].op != "silu":
            got = ", ".join(u.op for u in acts) or "none"
            raise NoMatch(f"{where}: MLP activation is {got} (the kernel computes SiLU(gate) * up)")
        act = acts[0]
        gate, up = (gu[0], gu[1]) if first[0] is act else (gu[1], gu[0])
        mul = _one_user(act.outputs[0], m, f"{where} SiLU")
        if mul.op != "mul" or len(mul.inputs) != 2 or {id(v) for v in mul.inputs} != {id(act.outputs[0]),
                                                                                       id(up.outputs[0])}:
            raise NoMatch(f"{where}: the MLP is not SiLU(gate) * up")
        for lin, name in ((gate, "gate_proj"), (up, "up_proj")):
            w.linear(lin, f"{where} {name}")
        w.take(act, mul)
        down = w.linear(_one_user(mul.outputs[0], m, f"{where} SwiGLU"), f"{where} down_proj")
        x_next = _residual(w, down, h, f"{where} down_proj")
        dims_l = {"hidden": int(x.type.shape[-1]), "heads": nq, "kv_heads": nkv, "head_dim": hd,
                  "ffn": int(gate.outputs[0].type.shape[-1])}
        if dims and dims_l != dims:
            raise NoMatch(f"{where}: dims {dims_l} differ from layer 0's {dims}")
        dims = dims_l
        layers.append(Layer(attn_norm, mlp_norm, q_lin, k_lin, v_lin, o, gate, up, down, kw, vw))
        x = x_next
    if not layers:
        raise NoMatch("no decoder layer before the final norm")
    final = w.norm(norms[0], "final norm")
    head = w.linear(_one_user(norms[0].outputs[0], m, "final norm"), "LM head")
    logits = head.outputs[0]
    outs = list(m.outputs)
    caches = [c for lay in layers for c in (lay.k_write.outputs[0], lay.v_write.outputs[0])]
    if not outs or outs[0] is not logits or {id(v) for v in outs[1:]} != {id(v) for v in caches} \
            or len(outs) != 1 + len(caches):
        raise NoMatch("the outputs are not the logits followed by the written caches")
    if logits.users:
        raise NoMatch("the logits are read inside the step")
    ins = {id(v) for v in m.inputs}
    if ins != {id(ids), id(position)} | {id(lay.k_write.operand("cache")) for lay in layers} \
            | {id(lay.v_write.operand("cache")) for lay in layers}:
        raise NoMatch("the step has inputs besides input_ids, position and the caches")
    extra = [n for n in m.nodes if n.op != "param" and id(n) not in w.seen]
    if extra:
        n = extra[0]
        raise NoMatch(f"the step also computes {len(extra)} op(s) the kernel does not (first: {n.op} at "
                      f"{n.scope or '<root>'})")
    dims.update(group=int(w.group or 0), vocab=int(emb_w.type.shape[0]), layers=len(layers), max_len=int(max_len or 0))
    if tuple(logits.type.shape) != (1, 1, dims["vocab"]) or int(head.outputs[0].type.shape[-1]) != dims["vocab"]:
        raise NoMatch(f"the LM head's {head.outputs[0].type.shape[-1]} outputs differ from the {dims['vocab']} rows "
                      "of the embedding table")
    assert w.inv_freq is not None and w.eps is not None
    g = DecodeStack(ids, position, str(_param(emb_w)), layers, final, head, logits, w.inv_freq, w.eps, dims)
    g.members = [n for n in m.nodes if id(n) in w.seen]
    return g


def _residual(w: _Walk, lin: Node, x: Value, where: str) -> Value:
    add = _one_user(lin.outputs[0], w.m, where)
    if add.op != "add" or {id(v) for v in add.inputs} != {id(x), id(lin.outputs[0])} or len(add.inputs) != 2:
        raise NoMatch(f"{where} is not added to the residual stream")
    w.take(add)
    return add.outputs[0]


def check_dims(g: DecodeStack, opts: StepOptions) -> str | None:
    """Why the kernel's compiled shape or the target cannot run ``g``, or None."""
    c = kernel_constants()
    d = g.dims
    want = {k: c[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "ffn", "group")}
    got = {k: d[k] for k in want}
    if got != want:
        return (f"hidden {got['hidden']}, {got['heads']}/{got['kv_heads']} heads of {got['head_dim']}, FFN "
                f"{got['ffn']}, int4 group {got['group']}: the kernel is compiled for hidden {want['hidden']}, "
                f"{want['heads']}/{want['kv_heads']} heads of {want['head_dim']}, FFN {want['ffn']}, group "
                f"{want['group']}")
    if opts.arch not in ARCHES:
        return f"arch {opts.arch or '?'}: the kernel needs Hopper bulk copies (target cuda arch=\"sm_90a\")"
    if opts.sms < c["min_blocks"]:
        return (f"sms={opts.sms}: the kernel needs at least {c['min_blocks']} co-resident blocks, one per "
                "multiprocessor")
    if shared_bytes(d["layers"]) > 232448:
        return f"{d['layers']} layers: the cache table does not fit the block's shared memory"
    return None


def plan_note(m: Module, opts: StepOptions) -> tuple[DecodeStack | None, str | None]:
    """``(group, note)``: the matched step when the kernel runs it, and the build note saying whether it does
    (None for a module that is no static decode step)."""
    if not any(n.op == "cache_write" for n in m.nodes):
        return None, None
    if not opts.enabled:
        return None, "persistent decode step: not used (disabled: target cuda persistent=false)"
    try:
        g = match(m)
    except NoMatch as e:
        return None, f"persistent decode step: not used ({e})"
    why = check_dims(g, opts)
    if why is not None:
        return None, f"persistent decode step: not used (recognised, but {why})"
    d = g.dims
    g.sms = opts.sms
    return g, (f"persistent decode step: used (one launch of {opts.sms} blocks a step: {d['layers']} layers, vocab "
               f"{d['vocab']}, {d['max_len']} cache positions)")


# ----------------------------------------------------------------------------------------------- emit
# The kernel's own layouts of some stacked weights: field -> (the cuda_persistent function that makes it, the fields
# it takes, in order).  Its fields' ctc layouts are [L, N, K/2] codes and [L, N, K/group] scales.
_PACKINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{f: ("pack_qkv", ("wqkv", "sqkv")) for f in ("wqkv", "sqkv")},
    **{f: ("pack_o_down", ("wo", "so", "wd", "sd")) for f in ("wo", "so", "wd", "sd")},
}


def check_packings() -> None:
    """Fail unless :mod:`.cuda_persistent`'s weight layouts (its public ``pack_*`` functions) are exactly the ones
    :func:`stack_layers` applies: a new one would change what the kernel reads, and the step would be wrong."""
    from ctc.backends.tvm import cuda_persistent as P

    have = {n for n in getattr(P, "__all__", dir(P)) if n.startswith("pack_")}
    known = {fn for fn, _ in _PACKINGS.values()}
    if have != known:
        raise RuntimeError(f"cuda_persistent lays weights out with {sorted(have)}, cuda_decode_stack applies "
                           f"{sorted(known)}: update cuda_decode_stack._PACKINGS (and its tests) to the kernel's "
                           "layouts")


def layout_tag() -> str:
    """A fingerprint of the kernel (its CUDA source) and of its weight layouts (the packing functions' source): the
    packed weights of a library are derived only by the code its kernel was built with."""
    import hashlib
    import inspect

    from ctc.backends.tvm import cuda_persistent as P

    fns = sorted({fn for fn, _ in _PACKINGS.values()} | {"qkv_head_rows"})
    text = _source() + "".join(inspect.getsource(getattr(P, fn)) for fn in fns if hasattr(P, fn))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _unpacked_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    c = kernel_constants()
    h, ff, gs = c["hidden"], c["ffn"], c["group"]
    qkv = (c["heads"] + 2 * c["kv_heads"]) * c["head_dim"]
    return {"wqkv": (layers, qkv, h // 2), "sqkv": (layers, qkv, h // gs), "wo": (layers, h, h // 2),
            "so": (layers, h, h // gs), "wd": (layers, h, ff // 2), "sd": (layers, h, ff // gs)}


def stack_layers(*ts: Any, parts: int = 1, pack: str = "", layout: str = "") -> Any:
    """Per-layer tensors stacked over layers (``[L, ...]``): each group of ``parts`` consecutive ones concatenated
    along rows first (q|k|v, gate|up); ``pack`` (a kernel field: ``wqkv sqkv wo so wd sd``) then lays the stack out
    as the kernel reads it, through :mod:`.cuda_persistent`'s own packing function, refused unless ``layout`` (the
    library's :func:`layout_tag`) is this code's.  The replayable derivation of the step's bound weights."""
    import torch

    if len(ts) % parts:
        raise ValueError(f"stack_layers: {len(ts)} tensors do not split into groups of {parts}")
    out = torch.stack([torch.cat(ts[i:i + parts], dim=0) for i in range(0, len(ts), parts)])
    if not pack:
        return out
    from ctc.backends.tvm import cuda_persistent as P

    if pack not in _PACKINGS:
        raise ValueError(f"stack_layers: pack={pack!r}, expected one of {sorted(_PACKINGS)}")
    check_packings()
    if layout != layout_tag():
        raise ValueError(f"stack_layers: the library's persistent decode step was built with kernel {layout or '?'}, "
                         f"this ctc has {layout_tag()} (its weight layouts may differ): rebuild the library")
    fn, fields = _PACKINGS[pack]
    shapes = _unpacked_shapes(out.shape[0])
    if tuple(out.shape) != shapes[pack]:
        raise ValueError(f"stack_layers: {pack} is {tuple(out.shape)}, the kernel takes {shapes[pack]}")
    # the function lays out all its fields at once: the others get uninitialised bytes (not meta tensors: an index
    # made on a meta tensor's device does not index a real one)
    args = [out if f == pack else torch.empty(shapes[f], dtype=torch.uint8, device=out.device) for f in fields]
    return getattr(P, fn)(*args)[fields.index(pack)].contiguous()


def emit(ctx: Any, g: DecodeStack) -> None:
    """Lower the whole step: weights stacked over layers, caches in place, the step and its finishing kernel."""
    from ctc.backends.tvm import lower as Lw
    from ctc.backends.tvm.int_kernels import add_prim_func

    relax = ctx.relax
    d = g.dims
    L = d["layers"]

    shapes: list[tuple[tuple[int, ...], str]] = []  # of the bound weights, in the launch's order

    def bind(key: str, source: dict[str, Any], name: str = "") -> Any:
        arr = Lw._np_of(Lw.derive_param(source, ctx.module.params))
        shapes.append((tuple(arr.shape), str(arr.dtype)))
        return ctx.param(name or source["from"][0], key, array=arr, source=source)

    def plain(name: str) -> Any:
        return bind("", {"op": "identity", "from": [name]})

    def stacked(parts: tuple[str, ...], leaf: str, pack: str = "") -> Any:
        names = [str(_param(getattr(lay, p).operand(leaf))) for lay in g.layers for p in parts]
        args: dict[str, Any] = {"parts": len(parts), **({"pack": pack, "layout": layout_tag()} if pack else {})}
        return bind(f"pdec_{'_'.join(parts)}_{leaf}", {"op": "stack_layers", "from": names, "args": args})

    def norms(attr: str) -> Any:
        names = [getattr(lay, attr) for lay in g.layers]
        return bind(f"pdec_{attr}", {"op": "stack_layers", "from": names, "args": {"parts": 1}})

    wsf = kernel_constants()["ws_floats"]
    head_w, head_s = (str(_param(g.head.operand(k))) for k in ("qweight", "w_scale"))
    args = [ctx.val(g.ids), ctx.val(g.position),
            stacked(("q", "k", "v"), "qweight", "wqkv"), stacked(("q", "k", "v"), "w_scale", "sqkv"),
            stacked(("o",), "qweight", "wo"), stacked(("o",), "w_scale", "so"),
            stacked(("gate", "up"), "qweight"), stacked(("gate", "up"), "w_scale"),
            stacked(("down",), "qweight", "wd"), stacked(("down",), "w_scale", "sd"),
            norms("attn_norm"), norms("mlp_norm"), plain(g.final_norm), plain(g.embedding), plain(head_w),
            plain(head_s),
            bind("f32", {"op": "astype", "from": [g.inv_freq], "args": {"dtype": "float32"}}),
            bind("zeros", {"op": "zeros", "from": [], "args": {"shape": [wsf], "dtype": "float32"}},
                 name="ctc_pdec_workspace")]
    writes = [cw for lay in g.layers for cw in (lay.k_write, lay.v_write)]
    args += [ctx.val(cw.operand("cache")) for cw in writes]
    step = add_prim_func(ctx.bb, step_func(L, d["vocab"], d["max_len"], g.sms, g.eps, shapes[:15]),
                         f"pdec_step_l{L}")
    cache_ty = relax.TensorType([1, d["kv_heads"], d["max_len"], d["head_dim"]], "float16")
    n_fixed = 18  # the arguments before the caches; the workspace is the last of them
    res = ctx.emit(relax.call_tir_inplace(
        step, args, [n_fixed - 1, *range(n_fixed, n_fixed + 2 * L), -1],
        [relax.TensorType([wsf], "float32"), *([cache_ty] * (2 * L)), relax.TensorType([d["vocab"]], "float32")]))
    for i, cw in enumerate(writes):
        ctx.env[id(cw.outputs[0])] = ctx.emit(relax.TupleGetItem(res, 1 + i))
    ctx.inplace_inputs.update(cw.operand("cache").name for cw in writes)
    ws_after = ctx.emit(relax.TupleGetItem(res, 0))
    logits32 = ctx.emit(relax.TupleGetItem(res, 1 + 2 * L))
    dt = Lw._dt(g.logits.type)
    fin = add_prim_func(ctx.bb, finish_func(d["vocab"], d["max_len"], dt), f"pdec_finish_{dt}")
    ctx.env[id(g.logits)] = ctx.emit(relax.call_tir(fin, [logits32, ws_after, ctx.val(g.ids), ctx.val(g.position)],
                                                    relax.TensorType([1, 1, d["vocab"]], dt)))


NOT_RUN = ("the persistent decode step returned NaN logits, its sign that it did not run: its token or position was "
           "out of range, or a grid barrier timed out (another kernel sharing the GPU; the library then stays "
           "stopped): reload the library, keep the GPU to this model, or build with `target cuda persistent=false`")


def check_logits(logits: Any) -> None:
    """Raise :class:`~ctc.errors.ComputeError` when ``logits`` (a torch tensor) are all NaN: what the persistent
    step writes when it did not run (a real step's logits are never all NaN)."""
    import torch

    from ctc.errors import ComputeError

    if logits.numel() and bool(torch.isnan(logits).all()):
        raise ComputeError(NOT_RUN)
