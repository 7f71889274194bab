"""Integer CPU kernels for ``quant_linear`` (RPTQ activations x int8/int4 weights) in TVM TIR.

Why: the ``quant_linear`` op must run as real integer arithmetic (u8 x s8 -> i32, VNNI
``vpdpbusd`` on x86), not as dequantize-then-fp32 matmul.  This module generates, schedules
and tensorizes two PrimFuncs per layer shape and emits them into a Relax function:

1. ``qact``: activations ``x [M, K]`` f32 -> ``xq [M, Kp]`` u8, quantized per activation
   cluster exactly like :func:`ctc.ir.quant.quantize_act` (``round`` half to even of
   ``x / s_c`` in fp32, ``+ z_c``, clamp to ``[0, 2^a_bits - 1]``), laid out in *segments*
   (see below) each padded with zeros to a multiple of 4 (8 for int4 weights).  With
   asymmetric weights it also writes ``xsum [M, S]``, the per-segment row sums of ``xq``.
   ``xq`` has whole register tiles of rows (:meth:`QLinearKernel.xq_rows`); rows ``>= M`` are
   not written.  A gathered input (RPTQ's reorder) is quantized in channel order and its codes
   permuted with byte shuffles (:func:`permute_tables`) where the CPU has AVX512-VBMI.
2. ``qmm``: for every tile of ``MT`` rows x ``16 * NB`` output channels, and every segment,
   an int32 accumulation ``acc = sum_k xq * qw`` (one ``vpdpbusd`` per row, 16 channels and 4
   bytes of K, the accumulators in zmm registers; tensorized with :data:`VNNI_INTRIN` for int4
   weights), started at minus the exact integer zero-point correction, then the segment's
   scale: ``y += alpha_s[n] * f32(acc - corr_s[n] - wzero_s[n] * xsum_s[m])``, plus bias.

A *segment* is a maximal K-range on which both the activation cluster and the weight group
are constant, so each segment's int32 sum is scaled once (``alpha_s[n] = s_c * w_scale[n, g]``);
``corr_s[n] = z_c * rowsum_s(qw)[n] - len_s * z_c * w_zero[n, g]`` comes from the precomputed
per-segment weight row sums.  ``acc - corr - w_zero * xsum`` equals
``sum_k (qa - z_c)(qw - w_zero)`` exactly (the ``quant_linear_int`` form of the op).
Float weight zero points (GGUF Q4_1's block minima, ``w_zero`` f32, dynamic activations only)
keep the integer dot product and move the zero point's term to the float epilogue:
``(acc - z_c * rowsum_s) - w_zero * (xsum_s - len_s * z_c)`` -- llama.cpp's Q4_1 x Q8_1 form
(``d_w d_x q_w . q_x + m_w d_x sum(q_x)``) with per-block asymmetric u8 activations.

Weights are pre-packed (:func:`prepack_weights`) as ``[Np/16, Kp/4, 16, 4]`` int8 (the
``vpdpbusd`` B operand is one 64-byte row); int4 weights as ``[Np/16, Kp/8, 16, 4]`` bytes
holding two's-complement nibbles (k-group ``2j`` low, ``2j+1`` high), sign-extended in
registers by shifts inside the kernel before the same VNNI step.

On a CPU without ``avx512vnni`` the same loop nest is built without tensorization (plain
int32 multiply-add, still integer arithmetic).  The sequence length ``M`` is symbolic.

Use from the Relax lowering (inside ``bb.function``/``bb.dataflow``)::

    y = emit_quant_linear(bb, x, {"qweight": qw, "w_scale": ws, "w_zero": wz, "bias": b,
                                  "act_scale": s, "act_zero": z}, node.attrs, target)

(operand *values*; the packed weights become constants), or, with parameters bound at load
time: ``spec = QLinearSpec.from_attrs(attrs, K, N)``, ``kernel = plan_quant_linear(spec,
target)``, ``packed = prepack_weights(spec, ...)`` when loading the params, and
``emit_quant_linear_packed(bb, x, {name: relax_var}, kernel)``.  The PrimFuncs are named
``ctc_qact_*`` / ``ctc_qmm_*`` and carry ``tirx.is_scheduled`` (leave them out of tuning and
default scheduling).  Note TVM's CPU thread pool defaults to half the logical CPUs on x86
(one thread on a 2-vCPU machine): set ``TVM_NUM_THREADS`` before the runtime starts.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "VNNI_INTRIN",
    "QLinearKernel",
    "QLinearSpec",
    "Segment",
    "emit_quant_linear",
    "emit_quant_linear_packed",
    "gemv_tile",
    "amx_permission",
    "host_target",
    "plan_quant_linear",
    "prepack_weights",
    "register_vnni_intrinsics",
    "run_quant_linear",
    "target_has_amx",
    "target_has_avx2",
    "target_has_int8_gemm",
    "target_has_vnni",
    "with_amx",
]

VNNI_INTRIN = "ctc_dot_16x4_u8i8i32_vnni"
"""Base name of the re-registered VNNI intrinsic (one per buffer-scope variant, see below)."""

AMX_K = 64  # bytes of K one AMX tile row holds (64 u8 activations / 16 x 4 s8 weights)
AMX_BLOCK = 32  # rows and output channels of the AMX micro-kernel: 2 x 2 tiles of 16 x 16 int32

PACKED_NAMES = ("act_scale", "act_zero", "wpack", "alpha", "corr", "wzero", "bias")


# ----------------------------------------------------------------------------- layout plan
@dataclass(frozen=True)
class Segment:
    """A K-range ``[k0, k0 + length)`` with constant activation cluster and weight group.

    ``poff`` is its offset in the padded layout (a multiple of ``pad``), ``plen`` its padded
    length.
    """

    k0: int
    length: int
    cluster: int
    group: int
    poff: int
    plen: int


@dataclass(frozen=True)
class QLinearSpec:
    """Everything static about one ``quant_linear``: sizes and the op's attributes."""

    k: int
    n: int
    w_bits: int
    group_size: int
    w_symmetric: bool
    a_bits: int
    clusters: tuple[int, ...]
    dynamic: bool = False  # activation (scale, zero) per row and cluster, computed by qact at run time
    amx: bool = False  # AMX tile layout: segments padded to 64 bytes, N to 32, rows to 32 (see _qmm_amx_source)
    gather: bool = False  # qact reads x through a channel permutation (RPTQ's reorder): x[:, perm[k]]
    gelu: bool = False  # the matmul applies gelu (erf form) to its output (the FFN's activation, fused)
    w_zero_float: bool = False  # f32 weight zero points (GGUF Q4_1's block minima): a float epilogue term
    codes: int = 0  # > 0: the output is the next linear's u8 codes, ``codes`` columns (its padded layout), not f32
    codes_bits: int = 8  # those codes' bits (the next linear's a_bits)
    parts: int = 1  # > 1: N is that many linears side by side (q|k|v), written part-major [parts, m, N / parts]

    @staticmethod
    def from_attrs(attrs: Mapping[str, Any], k: int, n: int, *, w_zero_float: bool = False) -> QLinearSpec:
        """Build from the ``quant_linear`` attributes (see ``ctc/ir/ops/compress.py``); ``w_zero_float``:
        the node's ``w_zero`` operand is f32 (float zero points), not i8."""
        a_bits = attrs.get("a_bits")
        if a_bits is None or a_bits == 16:
            raise ValueError("int_kernels: quant_linear with float activations (a_bits None/16) has no integer "
                             "kernel here; lower it as a weight-only linear instead")
        spec = QLinearSpec(k=int(k), n=int(n), w_bits=int(attrs["w_bits"]), group_size=int(attrs.get("group_size", -1)),
                           w_symmetric=bool(attrs.get("w_symmetric", True)), a_bits=int(a_bits),
                           clusters=tuple(int(c) for c in attrs.get("act_clusters", ())),
                           dynamic=bool(attrs.get("act_dynamic", False)), w_zero_float=bool(w_zero_float))
        spec.validate()
        return spec

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the fix for unsupported values."""
        if self.k <= 0 or self.n <= 0:
            raise ValueError(f"int_kernels: K={self.k}, N={self.n} must be positive")
        if not 2 <= self.w_bits <= 8:
            raise ValueError(f"int_kernels: w_bits={self.w_bits} must be 2..8")
        if not 1 <= self.a_bits <= 8:
            raise ValueError(f"int_kernels: a_bits={self.a_bits} must be 1..8 for u8 activations")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"int_kernels: group_size={self.group_size} must be -1 or positive")
        bounds = list(self.clusters) or [self.k]
        if bounds[-1] != self.k or any(b <= a for a, b in zip([0, *bounds[:-1]], bounds, strict=True)):
            raise ValueError(f"int_kernels: act_clusters {list(self.clusters)} must be strictly increasing end "
                             f"boundaries ending at K={self.k}")
        if self.amx and self.int4:
            raise ValueError(f"int_kernels: the AMX kernel takes 8-bit weight storage, not w_bits={self.w_bits} "
                             "(packed nibbles); leave amx=False for int4 weights")
        if self.w_zero_float and (self.w_symmetric or not self.dynamic):
            raise ValueError("int_kernels: float weight zero points need asymmetric weights (w_symmetric=False) "
                             "and dynamic activations (act_dynamic=True)")
        if self.w_zero_float and self.amx:
            raise ValueError("int_kernels: the AMX kernel takes integer weight zero points; leave amx=False for "
                             "float zero points")
        if self.parts < 1 or self.n % self.parts or (self.parts > 1 and (self.n // self.parts % 16 or self.codes)):
            raise ValueError(f"int_kernels: parts={self.parts} must divide N={self.n} into whole 16-channel vectors "
                             "(and the output be f32, codes=0); leave parts=1 for one linear")
        if self.codes and (self.int4 or self.amx or self.dynamic or not self.w_symmetric or self.codes < self.n
                           or not 1 <= self.codes_bits <= 8):
            raise ValueError(f"int_kernels: codes={self.codes} (the next linear's u8 codes as output) needs 8-bit "
                             "symmetric weights, static ranges, no AMX, codes >= N and codes_bits 1..8; leave "
                             "codes=0 for an f32 output")

    @property
    def int4(self) -> bool:
        """Whether weights are stored packed two per byte (``w_bits <= 4``)."""
        return self.w_bits <= 4

    @property
    def pad(self) -> int:
        """Segment padding granularity along K: 4 (one VNNI step), 8 for packed int4, 64 (one AMX tile row)."""
        return AMX_K if self.amx else 8 if self.int4 else 4

    @functools.cached_property
    def segments(self) -> tuple[Segment, ...]:
        """The K-segments with constant (cluster, group), in order, with padded offsets."""
        cuts = {0, self.k, *self.clusters}
        if self.group_size != -1:
            cuts.update(range(0, self.k, self.group_size))
        cuts_l = sorted(cuts)
        bounds = list(self.clusters) or [self.k]
        segs: list[Segment] = []
        poff = 0
        for a, b in zip(cuts_l[:-1], cuts_l[1:], strict=True):
            cluster = next(i for i, e in enumerate(bounds) if a < e)
            group = 0 if self.group_size == -1 else a // self.group_size
            plen = -(-(b - a) // self.pad) * self.pad
            segs.append(Segment(a, b - a, cluster, group, poff, plen))
            poff += plen
        return tuple(segs)

    @property
    def kp(self) -> int:
        """Padded K (sum of padded segment lengths)."""
        s = self.segments[-1]
        return s.poff + s.plen

    @property
    def np_(self) -> int:
        """N padded to a multiple of 16 (one VNNI output vector), of 32 for AMX (two tile columns)."""
        w = AMX_BLOCK if self.amx else 16
        return -(-self.n // w) * w

    @property
    def num_clusters(self) -> int:
        return len(self.clusters) or 1

    @property
    def num_groups(self) -> int:
        return 1 if self.group_size == -1 else -(-self.k // self.group_size)

    @property
    def tag(self) -> str:
        """A short stable name for the PrimFuncs of this spec."""
        h = abs(hash((self.clusters, self.group_size))) % (1 << 32)
        return (f"k{self.k}_n{self.n}_w{self.w_bits}{'s' if self.w_symmetric else 'a'}_a{self.a_bits}"
                f"{'d' if self.dynamic else ''}{'x' if self.amx else ''}{'p' if self.gather else ''}"
                f"{'G' if self.gelu else ''}{'f' if self.w_zero_float else ''}"
                f"{f'Q{self.codes}b{self.codes_bits}' if self.codes else ''}"
                f"{f'P{self.parts}' if self.parts > 1 else ''}"
                f"_g{self.group_size if self.group_size > 0 else 0}"
                f"_c{self.num_clusters}_{h:08x}")


# ----------------------------------------------------------------------------- target helpers
def host_target() -> Any:
    """The llvm target of this machine: its real ``-mcpu`` (LLVM's host detection), the features that
    name leaves out (AMX on a virtual machine, :func:`ctc.backends.tvm.targets.host_mattr`) and core count."""
    import tvm
    from ctc.backends.tvm.targets import native_target

    return tvm.target.Target(native_target(len(os.sched_getaffinity(0))))


def _as_target(target: Any) -> Any:
    import tvm

    if target is None:
        return host_target()
    if isinstance(target, tvm.target.Target):
        return target
    return tvm.target.Target(target)


def target_has_avx2(target: Any = None) -> bool:
    """Whether ``target`` (default: this host) is an x86 llvm target with AVX2."""
    import tvm

    t = _as_target(target)
    return t.kind.name == "llvm" and bool(tvm.target.codegen.target_has_features(["avx2"], t))


def target_has_int8_gemm(target: Any = None) -> bool:
    """Whether ``target`` runs the hand-written 8-bit integer GEMM (VNNI or AVX2): the kernel that can write the
    next linear's codes and part-major results."""
    return target_has_vnni(target) or target_has_avx2(target)


def target_has_vnni(target: Any = None) -> bool:
    """Whether ``target`` (default: this host) has AVX512-VNNI (``vpdpbusd`` on zmm)."""
    import tvm

    t = _as_target(target)
    if t.kind.name != "llvm":
        return False
    return bool(tvm.target.codegen.target_has_features(["avx512vnni", "avx512bw"], t))


_ARCH_REQ_XCOMP_PERM = 0x1023  # arch_prctl: ask the kernel for an XSAVE state component
_XFEATURE_XTILEDATA = 18  # the AMX tile registers' state component
_SYS_ARCH_PRCTL = 158  # x86-64


@functools.cache
def amx_permission() -> bool:
    """Ask Linux for this process's permission to use the AMX tile registers; True when granted.

    Linux keeps AMX's 8 KB of tile state off until a process requests it (``arch_prctl
    ARCH_REQ_XCOMP_PERM``); the first tile instruction of a process that did not ask dies with
    SIGILL.  The permission is per process, for all its threads, so once before running AMX
    kernels is enough: the library loader and :func:`run_quant_linear` call this.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def target_has_amx(target: Any = None, unit: str = "amx-int8") -> bool:
    """Whether ``target`` (default: this host) has AMX tiles with ``unit`` (LLVM's feature: ``amx-int8``,
    ``amx-bf16``), and this process may use them.

    The kernels built for the target are run on this host (the target is the host's CPU), so the
    operating system's permission is part of the answer: without it the library could not run.
    """
    import tvm

    t = _as_target(target)
    if t.kind.name != "llvm":
        return False
    if not tvm.target.codegen.target_has_features([unit, "amx-tile", "avx512bw"], t):
        return False
    return amx_permission()


def amx_rows(m: Any) -> Any:
    """Rows of the AMX kernel's ``xq``: ``m`` (an int or a TIR expression) rounded up to whole blocks."""
    return (m + AMX_BLOCK - 1) // AMX_BLOCK * AMX_BLOCK


def with_amx(spec: QLinearSpec, target: Any = None, *, rows: int | None = None) -> QLinearSpec:
    """``spec`` in the AMX layout when the target has AMX and the shape suits it, else ``spec``.

    AMX runs 16 x 16 x 64 products per instruction, so it pays for prefill-shaped inputs; one
    row (``rows == 1``: a decode step) keeps the VNNI GEMV tile, int4 storage keeps VNNI too
    (its nibbles are unpacked in registers, which the tile loads cannot do), and so do float weight
    zero points (their epilogue term is the VNNI kernel's only).
    """
    import dataclasses

    if spec.amx or spec.int4 or spec.w_zero_float or rows == 1 or not target_has_amx(target):
        return spec
    return dataclasses.replace(spec, amx=True)


# ----------------------------------------------------------------------------- VNNI intrinsic
def _vnni_intrin(a_scope: str, b_scope: str, c_scope: str) -> tuple[Any, Any]:
    """Desc/impl PrimFuncs of ``C[16] += A[4] (u8) . B[16, 4] (s8)`` for the given buffer scopes.

    The built-in ``dot_16x4_vnni`` passes ``int32x16`` operands to ``llvm.x86.avx512.vpdpbusd.512``,
    which LLVM 22 declares with ``<64 x i8>`` operands (the module then fails verification).
    Here A (broadcast) and B are reinterpreted as ``uint8x64`` / ``int8x64``.  Loop and index
    types are int64 to match the kernels' int64 (Relax shape) arithmetic.
    """
    from tvm.script import tirx as T

    i0, i4, i16 = T.int64(0), T.int64(4), T.int64(16)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (i4,), "uint8", offset_factor=1, scope=a_scope)
        B = T.match_buffer(b, (i16, i4), "int8", offset_factor=1, scope=b_scope)
        C = T.match_buffer(c, (i16,), "int32", offset_factor=1, scope=c_scope)
        with T.sblock("root"):
            T.reads(C[i0:i16], A[i0:i4], B[i0:i16, i0:i4])
            T.writes(C[i0:i16])
            for i in T.serial(i16):
                for k in T.serial(i4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (i4,), "uint8", offset_factor=1, scope=a_scope)
        B = T.match_buffer(b, (i16, i4), "int8", offset_factor=1, scope=b_scope)
        C = T.match_buffer(c, (i16,), "int32", offset_factor=1, scope=c_scope)
        with T.sblock("root"):
            T.reads(C[i0:i16], A[i0:i4], B[i0:i16, i0:i4])
            T.writes(C[i0:i16])
            a_i32 = T.reinterpret(A.vload([i0], "uint8x4"), dtype="int32")
            a_u8x64 = T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64")
            b_i8x64 = B.vload([i0, i0], dtype="int8x64")
            C[T.ramp(i0, 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([i0], dtype="int32x16"), a_u8x64, b_i8x64, dtype="int32x16")

    return desc, impl


def _intrin_name(b_scope: str) -> str:
    return f"{VNNI_INTRIN}_b{b_scope}"


@functools.cache
def register_vnni_intrinsics() -> tuple[str, ...]:
    """Register the fixed VNNI intrinsic (B operand in global or local memory); returns the names.

    Registration is per process (the tensor-intrin table is global); call it in any process
    that schedules these kernels, including a meta-schedule builder's initializer.
    """
    from tvm import s_tir

    names = []
    for b_scope in ("global", "local"):
        desc, impl = _vnni_intrin("global", b_scope, "local")
        name = _intrin_name(b_scope)
        s_tir.TensorIntrin.register(name, desc, impl, override=True)
        names.append(name)
    return tuple(names)


# ----------------------------------------------------------------------------- kernel text
def _i(v: int) -> str:
    return f"T.int64({int(v)})"


def _quotient(v: str, s: str, r: str | None = None) -> str:
    """TVMScript of ``v / s`` in f32, correctly rounded (bit-identical to the division) without a vector division.

    Why: ``vdivps`` retires 16 quotients per ~10 cycles, which made it the bound of the activation
    quantizer (0.22 ns per element, ~0.6 cycles).  Markstein's correction step gives the same bits: with
    ``r = RN(1/s)`` and ``q = RN(v r)`` (within 1 ulp of ``v/s``), the remainder ``e = v - q s`` is exact
    in one FMA and ``RN(q + e r)`` is ``RN(v/s)`` (Cornea, Golliver, Markstein 1999, Theorem 1; finite
    operands without underflow of ``e``, which only tiny ``v`` reach: those quantize to the zero point
    either way).  ``q`` is held within +-2^30 first, so a quotient that overflows f32 gives +-inf (clamped
    by the caller like the division's), not ``inf - inf``; any quotient that large saturates anyway.
    ``1/s`` is loop-invariant (a scale per cluster or per row) and leaves the inner loop."""
    fma = 'T.call_llvm_pure_intrin("float32", "llvm.fma", {}, {}, {})'
    r = r or f"(T.float32(1) / {s})"  # or ``r``: that reciprocal, read from a table
    q = f"T.max(T.min({v} * {r}, T.float32(1073741824.0)), T.float32(-1073741824.0))"
    return fma.format(fma.format(f"(T.float32(0) - {q})", s, v), r, q)


def _xload(spec: QLinearSpec, row: str, col: str) -> str:
    """qact's read of activation ``(row, col)``: through ``perm`` when the input is gathered."""
    return f'x[{row}, T.Cast("int64", perm[{col}])]' if spec.gather else f"x[{row}, {col}]"


def _perm_param(spec: QLinearSpec) -> str:
    """qact's permutation operand (int32 ``[K]``, after ``x``) when the input is gathered."""
    return f'perm: T.Buffer(({_i(spec.k)},), "int32"), ' if spec.gather else ""


def _xq_rows(spec: QLinearSpec) -> list[str]:
    """The ``xq`` buffer declaration of qact: ``mp`` rows, ``m`` rounded up to whole row tiles by the
    caller (:meth:`QLinearKernel.xq_rows`: AMX row blocks, or the VNNI kernel's register tile, whose
    row addresses are then affine in the tile's row, without clamping).  qact writes rows ``< m``
    only: the products of the rows beyond are computed and dropped."""
    return ["    mp = T.int64()", f'    xq = T.match_buffer(var_xq, (mp, {_i(spec.kp)}), "uint8")']


def _qact_source(spec: QLinearSpec) -> str:
    """TVMScript of the activation-quantization PrimFunc (per segment, vectorizable loops)."""
    S, K, C = len(spec.segments), spec.k, spec.num_clusters
    qmax = (1 << spec.a_bits) - 1
    xsum = not spec.w_symmetric
    L = [
        "@T.prim_func(s_tir=True)",
        f'def qact(var_x: T.handle, {_perm_param(spec)}act_scale: T.Buffer(({_i(C)},), "float32"), '
        f'act_zero: T.Buffer(({_i(C)},), "int32"), var_xq: T.handle{", var_xsum: T.handle" if xsum else ""}):',
        '    T.func_attr({"tirx.noalias": True})',
        "    m = T.int64()",
        f'    x = T.match_buffer(var_x, (m, {_i(K)}), "float32")',
        *_xq_rows(spec),
    ]
    if xsum:
        L.append(f'    xsum = T.match_buffer(var_xsum, (m, {_i(S)}), "int32")')
    L.append("    for r in T.parallel(m):")

    def qexpr(seg: Segment, j: str) -> str:
        # llvm.roundeven: round half to even like torch.round (TVM does not vectorize T.nearbyint)
        c = _i(seg.cluster)
        v = _quotient(_xload(spec, "vr", f"{_i(seg.k0)} + {j}"), f"act_scale[{c}]")
        rne = f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.roundeven"), {v}, dtype="float32")'
        return (f'T.Cast("uint8", T.max(T.min({rne} + T.Cast("float32", act_zero[{c}]), T.float32({qmax})),'
                f" T.float32(0)))")

    for si, seg in enumerate(spec.segments):
        main, tail, npad = seg.length // 16 * 16, seg.length % 16, seg.plen - seg.length
        if main:
            L += [f"        for jo, ji in T.grid({_i(main // 16)}, {_i(16)}):",
                  f'            with T.sblock("q{si}"):',
                  "                vr = T.axis.spatial(m, r)",
                  f"                vj = T.axis.spatial({_i(main)}, jo * {_i(16)} + ji)",
                  f"                xq[vr, {_i(seg.poff)} + vj] = {qexpr(seg, 'vj')}"]
        if tail:
            L += [f"        for j in T.serial({_i(tail)}):",
                  f'            with T.sblock("qt{si}"):',
                  "                vr = T.axis.spatial(m, r)",
                  f"                vj = T.axis.spatial({_i(tail)}, j)",
                  f"                xq[vr, {_i(seg.poff + main)} + vj] = {qexpr(seg, f'{_i(main)} + vj')}"]
        if npad:
            L += [f"        for j in T.serial({_i(npad)}):",
                  f'            with T.sblock("qp{si}"):',
                  "                vr = T.axis.spatial(m, r)",
                  f"                vj = T.axis.spatial({_i(npad)}, j)",
                  f"                xq[vr, {_i(seg.poff + seg.length)} + vj] = T.uint8(0)"]
        if xsum:
            L += [f"        for j in T.serial({_i(seg.plen)}):",
                  f'            with T.sblock("xs{si}"):',
                  "                vr = T.axis.spatial(m, r)",
                  f"                vj = T.axis.reduce({_i(seg.plen)}, j)",
                  "                with T.init():",
                  f"                    xsum[vr, {_i(si)}] = 0",
                  f"                xsum[vr, {_i(si)}] = xsum[vr, {_i(si)}]"
                  f' + T.Cast("int32", xq[vr, {_i(seg.poff)} + vj])']
    return "\n".join(L) + "\n"


PERMUTE_NAMES = ("ch_scale", "ch_rcp", "ch_zero", "pidx", "psel")
"""Operands of the byte-permuting quantizer (:func:`permute_tables`), in its parameter order."""
PERMUTE_MAX_K = 2048  # the permuting quantizer's code grows as K^2 / 8192 byte shuffles per row


def _permute_dims(spec: QLinearSpec) -> tuple[int, int]:
    """(pairs of 64-byte registers holding one row's codes in channel order, 64-byte chunks of a row of xq)."""
    return -(-spec.k // 128), -(-spec.kp // 64)


def permute_tables(spec: QLinearSpec, perm: Any, act_scale: Any, act_zero: Any) -> dict[str, np.ndarray]:
    """The byte-permuting quantizer's operands for a gathering ``spec`` (``x[:, perm]`` is quantized).

    Per input channel ``k`` (channel order): its cluster's scale ``ch_scale``, the scale's reciprocal
    ``ch_rcp`` (f32, correctly rounded like the kernel's own ``1 / s``) and zero point ``ch_zero`` (f32);
    per byte ``p`` of an ``xq`` row (whole 64-byte chunks): the channel it holds, as the pair of code
    registers ``psel[p]`` (255: a segment's padding, zero) and the byte in that pair ``pidx[p]``."""
    perm_a = _np(perm).astype(np.int64).reshape(-1)
    if sorted(perm_a.tolist()) != list(range(spec.k)):
        raise ValueError(f"int_kernels.permute_tables: perm must be a permutation of range({spec.k})")
    a_s = _np(act_scale, np.float32).reshape(-1)
    a_z = _np(act_zero, np.int64).reshape(-1)
    if a_s.shape != (spec.num_clusters,) or a_z.shape != (spec.num_clusters,):
        raise ValueError(f"int_kernels.permute_tables: act_scale/act_zero must have {spec.num_clusters} entries")
    pos_cluster = np.zeros(spec.k, np.int64)
    _, chunks = _permute_dims(spec)
    pidx = np.zeros(chunks * 64, np.uint8)
    psel = np.full(chunks * 64, 255, np.uint8)
    for seg in spec.segments:
        pos_cluster[seg.k0: seg.k0 + seg.length] = seg.cluster
        src = perm_a[seg.k0: seg.k0 + seg.length]
        pidx[seg.poff: seg.poff + seg.length] = src % 128
        psel[seg.poff: seg.poff + seg.length] = src // 128
    ch_cluster = np.empty(spec.k, np.int64)
    ch_cluster[perm_a] = pos_cluster
    ch_scale = a_s[ch_cluster].astype(np.float32)
    return {"ch_scale": ch_scale, "ch_rcp": (np.float32(1) / ch_scale).astype(np.float32),
            "ch_zero": a_z[ch_cluster].astype(np.float32), "pidx": pidx, "psel": psel}


def _qact_permute_source(spec: QLinearSpec) -> str:
    """TVMScript of the gathering static quantizer that quantizes in channel order and permutes the codes.

    Why: reading ``x[r, perm[j]]`` makes TVM gather f32 lanes one at a time (3-4x the ungathered
    quantizer; AVX-512 gathers are barely faster here).  Each channel's code only depends on its cluster's
    (scale, zero), so the row is quantized in channel order with per-channel tables (contiguous vectors,
    the same arithmetic: :func:`_quotient`), kept as u8 in registers, and every 64-byte chunk of the
    ``xq`` row is picked from them with ``vpermi2b`` (AVX512-VBMI: any byte of two registers) per register
    pair and a blend by ``psel`` (:func:`permute_tables`); padding bytes select nothing and stay zero."""
    K, S = spec.k, len(spec.segments)
    xsum = not spec.w_symmetric
    L = ["@T.prim_func(s_tir=True)",
         f"def qact(var_x: T.handle, {permute_params(spec)}, var_xq: T.handle"
         f'{", var_xsum: T.handle" if xsum else ""}):',
         '    T.func_attr({"tirx.noalias": True})',
         "    m = T.int64()",
         f'    x = T.match_buffer(var_x, (m, {_i(K)}), "float32")',
         *_xq_rows(spec)]
    if xsum:
        L.append(f'    xsum = T.match_buffer(var_xsum, (m, {_i(S)}), "int32")')
    L += ['    with T.sblock("root"):',
          "        for r in T.parallel(m):",
          *permute_code_lines(spec, "x", " " * 12)]
    return "\n".join(L) + "\n"


def permute_params(spec: QLinearSpec) -> str:
    """The byte-permuting quantizer's table parameters (:data:`PERMUTE_NAMES`) as TVMScript, in order."""
    K = spec.k
    _, chunks = _permute_dims(spec)
    return (f'ch_scale: T.Buffer(({_i(K)},), "float32"), ch_rcp: T.Buffer(({_i(K)},), "float32"), '
            f'ch_zero: T.Buffer(({_i(K)},), "float32"), pidx: T.Buffer(({_i(chunks * 64)},), "uint8"), '
            f'psel: T.Buffer(({_i(chunks * 64)},), "uint8")')


def permute_code_lines(spec: QLinearSpec, src: str, ind: str) -> list[str]:
    """TVMScript lines (indented by ``ind``, inside a loop over rows ``r``) writing row ``r`` of ``xq`` (and
    ``xsum``) from the f32 row ``src[r, :]``: the body of :func:`_qact_permute_source`, also run by a kernel that
    has just computed the row (a layer norm writing the next linear's codes, :func:`layer_norm_codes_func`)."""
    K, KP = spec.k, spec.kp
    qmax = (1 << spec.a_bits) - 1
    pairs, chunks = _permute_dims(spec)
    tb = pairs * 128
    rne = 'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.roundeven"), {v}, dtype="float32")'

    def code(k: str) -> str:
        v = _quotient(f"{src}[r, {k}]", f"ch_scale[{k}]", f"ch_rcp[{k}]")
        return f'T.Cast("uint8", T.max(T.min({rne.format(v=v)} + ch_zero[{k}], T.float32({qmax})), T.float32(0)))'

    L = [f'{ind}t = T.decl_buffer(({_i(tb)},), "uint8", scope="local")',
         f'{ind}o = T.decl_buffer((T.int64(64),), "uint8", scope="local")']
    main = K // 16 * 16
    if main:
        L += [f"{ind}for jo in range({_i(main // 16)}):",
              f"{ind}    for ji in T.vectorized(T.int64(16)):",
              f"{ind}        t[jo * T.int64(16) + ji] = {code('jo * T.int64(16) + ji')}"]
    if K > main:
        L += [f"{ind}for j in range({_i(main)}, {_i(K)}):", f"{ind}    t[j] = {code('j')}"]
    if tb > K:
        L += [f"{ind}for j in T.vectorized({_i(tb - K)}):", f"{ind}    t[{_i(K)} + j] = T.uint8(0)"]
    for oc in range(chunks):
        sel = f'psel.vload([{_i(oc * 64)}], "uint8x64")'
        idx = f'pidx.vload([{_i(oc * 64)}], "uint8x64")'
        expr = "T.broadcast(T.uint8(0), 64)"
        for pr in reversed(range(pairs)):
            pick = (f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpermi2var.qi.512"), '
                    f't.vload([{_i(pr * 128)}], "uint8x64"), {idx}, t.vload([{_i(pr * 128 + 64)}], "uint8x64"), '
                    'dtype="uint8x64")')
            expr = f"T.Select({sel} == T.broadcast(T.uint8({pr}), 64), {pick}, {expr})"
        width = min(64, KP - oc * 64)
        if width == 64:
            L.append(f"{ind}xq[r, T.ramp({_i(oc * 64)}, 1, 64)] = {expr}")
        else:  # the row's last, partial chunk: only its bytes are stored (the next row follows)
            L += [f"{ind}o[T.ramp(T.int64(0), 1, 64)] = {expr}",
                  f"{ind}for j in T.vectorized({_i(width)}):",
                  f"{ind}    xq[r, {_i(oc * 64)} + j] = o[j]"]
    if not spec.w_symmetric:
        for si, seg in enumerate(spec.segments):
            L += [f"{ind}xsum[r, {_i(si)}] = 0",
                  f"{ind}for j in range({_i(seg.plen)}):",
                  f'{ind}    xsum[r, {_i(si)}] = xsum[r, {_i(si)}] + T.Cast("int32", xq[r, {_i(seg.poff)} + j])']
    return L


def layer_norm_codes_func(width: int, eps: float, residual: bool, rows: int | None, kernel: QLinearKernel) -> Any:
    """The row layer norm (:func:`~.row_kernels.row_layer_norm`) that also writes the u8 codes of the next
    linear's input (``kernel``: a gathering static quantizer that permutes codes, ``kernel.permute``) from
    each output row while it is in L1: operands ``(X, [Z,] W, B, *PERMUTE_NAMES tables)``, outputs ``(Y, xq)``,
    ``xq`` with :meth:`QLinearKernel.xq_rows` rows.  The codes are those ``kernel.qact`` writes from ``Y``
    (the same arithmetic), so the quantizer's own kernel and its pass over ``Y`` go."""
    from ctc.backends.tvm.row_kernels import RowEpilogue, row_layer_norm

    spec = kernel.spec
    if not kernel.permute or spec.k != width or not spec.w_symmetric:
        raise ValueError("int_kernels.layer_norm_codes_func: needs a permuting static quantizer over the norm's "
                         f"width (K={spec.k}, width {width}) and symmetric weights (no row sums)")
    epi = RowEpilogue(permute_params(spec), "var_xq: T.handle", tuple(_xq_rows(spec)),
                      tuple(permute_code_lines(spec, "Y", " " * 12)))
    return row_layer_norm(width, eps, residual, rows, epi)


def _qact_dynamic_source(spec: QLinearSpec) -> str:
    """TVMScript of the dynamic activation quantizer: per row, each cluster's min/max (16-lane vector
    accumulators, range always holding 0), its (scale, zero) exactly as ``ctc.ir.quant.act_qparams``,
    then the row quantized like the static kernel (padded segments, optional segment sums)."""
    S, K, C = len(spec.segments), spec.k, spec.num_clusters
    qmax = (1 << spec.a_bits) - 1
    xsum = not spec.w_symmetric
    rne = 'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.roundeven"), {v}, dtype="float32")'
    L = ["@T.prim_func(s_tir=True)",
         f"def qact(var_x: T.handle, {_perm_param(spec)}var_xq: T.handle, var_as: T.handle, var_az: T.handle"
         + (", var_xsum: T.handle" if xsum else "") + "):",
         '    T.func_attr({"tirx.noalias": True})',
         "    m = T.int64()",
         f'    x = T.match_buffer(var_x, (m, {_i(K)}), "float32")',
         *_xq_rows(spec),
         f'    ascale = T.match_buffer(var_as, (m, {_i(C)}), "float32")',
         f'    azero = T.match_buffer(var_az, (m, {_i(C)}), "int32")']
    if xsum:
        L.append(f'    xsum = T.match_buffer(var_xsum, (m, {_i(S)}), "int32")')
    L += ['    with T.sblock("root"):',
          "        for r in T.parallel(m):",
          f'            lo = T.decl_buffer(({_i(C)},), "float32", scope="local")',
          f'            hi = T.decl_buffer(({_i(C)},), "float32", scope="local")',
          '            vlo = T.decl_buffer((T.int64(16),), "float32", scope="local")',
          '            vhi = T.decl_buffer((T.int64(16),), "float32", scope="local")',
          '            sz = T.decl_buffer((T.int64(2),), "float32", scope="local")',
          f"            for c in range({_i(C)}):",
          "                lo[c] = T.float32(0)",
          "                hi[c] = T.float32(0)"]
    ind = "            "
    for seg in spec.segments:
        c = _i(seg.cluster)
        main, k0 = seg.length // 16 * 16, seg.k0
        if main:
            L += [f"{ind}for l in T.vectorized(T.int64(16)):",
                  f"{ind}    vlo[l] = T.float32(0)",
                  f"{ind}    vhi[l] = T.float32(0)",
                  f"{ind}for j in range({_i(main // 16)}):",
                  f"{ind}    for l in T.vectorized(T.int64(16)):",
                  f"{ind}        vlo[l] = T.min(vlo[l], {_xload(spec, 'r', f'{_i(k0)} + j * T.int64(16) + l')})",
                  f"{ind}        vhi[l] = T.max(vhi[l], {_xload(spec, 'r', f'{_i(k0)} + j * T.int64(16) + l')})",
                  f"{ind}for l in range(T.int64(16)):",
                  f"{ind}    lo[{c}] = T.min(lo[{c}], vlo[l])",
                  f"{ind}    hi[{c}] = T.max(hi[{c}], vhi[l])"]
        if seg.length > main:
            L += [f"{ind}for j in range({_i(k0 + main)}, {_i(k0 + seg.length)}):",
                  f"{ind}    lo[{c}] = T.min(lo[{c}], {_xload(spec, 'r', 'j')})",
                  f"{ind}    hi[{c}] = T.max(hi[{c}], {_xload(spec, 'r', 'j')})"]
    L += [f"{ind}for c in range({_i(C)}):",
          f"{ind}    sz[0] = (hi[c] - lo[c]) / T.float32({qmax})",
          f"{ind}    sz[0] = T.Select(sz[0] > T.float32(0), sz[0], T.float32(1))",
          f"{ind}    sz[1] = T.max(T.min({rne.format(v='(T.float32(0) - lo[c]) / sz[0]')}, T.float32({qmax})), "
          "T.float32(0))",
          f"{ind}    ascale[r, c] = sz[0]",
          f'{ind}    azero[r, c] = T.Cast("int32", sz[1])']
    for si, seg in enumerate(spec.segments):
        c = _i(seg.cluster)
        v = _quotient(_xload(spec, "r", f"{_i(seg.k0)} + j"), f"ascale[r, {c}]")
        q = (f'T.Cast("uint8", T.max(T.min({rne.format(v=v)} + '
             f'T.Cast("float32", azero[r, {c}]), T.float32({qmax})), T.float32(0)))')
        L += [f"{ind}for j in T.vectorized({_i(seg.length)}):",
              f"{ind}    xq[r, {_i(seg.poff)} + j] = {q}"]
        if seg.plen > seg.length:
            L += [f"{ind}for j in range({_i(seg.plen - seg.length)}):",
                  f"{ind}    xq[r, {_i(seg.poff + seg.length)} + j] = T.uint8(0)"]
        if xsum:
            L += [f"{ind}xsum[r, {_i(si)}] = 0",
                  f"{ind}for j in range({_i(seg.plen)}):",
                  f'{ind}    xsum[r, {_i(si)}] = xsum[r, {_i(si)}] + T.Cast("int32", xq[r, {_i(seg.poff)} + j])']
    return "\n".join(L) + "\n"


@dataclass(frozen=True)
class TileConfig:
    """Register tile of the matmul: ``mt`` rows x ``nb`` 16-lane output vectors."""

    mt: int
    nb: int


def default_tile(spec: QLinearSpec) -> TileConfig:
    """A register tile that fits the 32 zmm registers and divides N: 8x32 when possible."""
    nblk = spec.np_ // 16
    if nblk % 2 == 0:
        return TileConfig(8, 2)
    return TileConfig(12, 1)


def avx2_tile(spec: QLinearSpec, one_row: bool = False) -> TileConfig:
    """The AVX2 kernel's register tile: 4 rows x 16 channels (16 ymm accumulators, two int32 lanes per channel; LLVM
    keeps 6-7 of them on the stack, yet the kernel stays bound by ``vpmaddwd``'s one ymm per cycle: the stack
    loads and stores use other ports); on one Zen 4 core with AVX-512 masked,
    MiniLM's shapes at 128 rows ran 88-93 G integer ops/s against 85-90 for 3 rows and 72 for 2 x 32, and a
    ``vpmaddwd`` + ``vpaddd`` loop peaks at 47 G multiply-adds/s: 94 GOP/s); for one row (a decode step) 1 x 32
    channels where N has whole blocks of 32."""
    if one_row:
        return TileConfig(1, 2 if spec.np_ // 16 % 2 == 0 else 1)
    return TileConfig(4, 1)


def gemv_tile(spec: QLinearSpec) -> TileConfig:
    """The register tile for one activation row (a decode step): 1 x 64 output channels when N allows
    (measured fastest on SmolLM2's shapes), else 1 x 32 or 1 x 16."""
    nblk = spec.np_ // 16
    return TileConfig(1, next(nb for nb in (4, 2, 1) if nblk % nb == 0))


def _qmm_header(spec: QLinearSpec, wshape: str) -> list[str]:
    """The signature and buffer declarations both matmul kernels share (``wshape``: the packed
    weight's shape); the AMX kernel's ``xq`` has ``mp`` rows (whole blocks), the VNNI one's ``m``."""
    S, KP, N, NP, C = len(spec.segments), spec.kp, spec.n, spec.np_, spec.num_clusters
    asym, dyn = not spec.w_symmetric, spec.dynamic
    params = ["var_xq: T.handle"]
    if asym:
        params.append("var_xsum: T.handle")
    if dyn:
        params += ["var_ascale: T.handle", "var_azero: T.handle"]
    params += [f'wpack: T.Buffer({wshape}, "int8")',
               f'alpha: T.Buffer(({_i(S)}, {_i(NP)}), "float32")',
               f'corr: T.Buffer(({_i(S)}, {_i(NP)}), "int32")']
    if asym:
        params.append(f'wzero: T.Buffer(({_i(S)}, {_i(NP)}), "{"float32" if spec.w_zero_float else "int32"}")')
    params.append(f'bias: T.Buffer(({_i(NP)},), "float32")')
    if spec.codes:  # the next linear's per-channel (scale, 1 / scale, zero), channels in its padded layout
        params += [f'{nm}: T.Buffer(({_i(NP)},), "{"int32" if nm == "code_pos" else "float32"}")' for nm in CODE_NAMES]
    params.append("var_y: T.handle")
    L = ["@T.prim_func(s_tir=True)",
         f"def qmm({', '.join(params)}):",
         '    T.func_attr({"tirx.noalias": True})',
         "    m = T.int64()",
         "    mp = T.int64()",
         f'    xq = T.match_buffer(var_xq, (mp, {_i(KP)}), "uint8")',
         f'    y = T.match_buffer(var_y, ({_i(spec.parts)}, m, {_i(N // spec.parts)}), "float32")'
         if spec.parts > 1 else
         f'    y = T.match_buffer(var_y, (m, {_i(N)}), "float32")' if not spec.codes else
         f'    y = T.match_buffer(var_y, (m, {_i(spec.codes)}), "uint8")']  # m: whole row tiles (the next xq)
    if asym:
        L.append(f'    xsum = T.match_buffer(var_xsum, (m, {_i(S)}), "int32")')
    if dyn:
        L += [f'    ascale = T.match_buffer(var_ascale, (m, {_i(C)}), "float32")',
              f'    azero = T.match_buffer(var_azero, (m, {_i(C)}), "int32")']
    return L


def _segment_exprs(spec: QLinearSpec, si: int, row: str, vn: str, acc: str) -> tuple[str, str]:
    """TVMScript of segment ``si``'s integer correction and scaled term for output ``(row, vn)``.

    The accumulator ``acc`` starts at minus the correction (``corr``, the dynamic row's zero point times
    it, plus the weight zero points' share of the row sum), so it ends at the corrected sum (the same
    int32 value, wrapping alike) and the epilogue only converts and scales it: ``term``."""
    seg = spec.segments[si]
    c, s_ = _i(seg.cluster), _i(si)
    dyn = spec.dynamic
    sub = f"azero[{row}, {c}] * corr[{s_}, {vn}]" if dyn else f"corr[{s_}, {vn}]"
    if not spec.w_symmetric and not (dyn and spec.w_zero_float):
        sub += f" + wzero[{s_}, {vn}] * xsum[{row}, {s_}]"
    if dyn and spec.w_zero_float:
        # float zero z: sum (qa - za)(q - z) = [acc - za * rowsum] - z * (xsum - len * za); corr = rowsum
        term = (f'ascale[{row}, {c}] * alpha[{s_}, {vn}] * (T.Cast("float32", {acc})'
                f' - wzero[{s_}, {vn}] * T.Cast("float32", xsum[{row}, {s_}] - {_i(seg.length)} * azero[{row}, {c}]))')
    elif dyn:  # alpha = the weight scale; the row's scale applied here
        term = f'ascale[{row}, {c}] * alpha[{s_}, {vn}] * T.Cast("float32", {acc})'
    else:
        term = f'alpha[{s_}, {vn}] * T.Cast("float32", {acc})'
    return sub, term


def _qmm_source(spec: QLinearSpec, tile: TileConfig) -> str:
    """TVMScript of the tiled integer matmul + per-segment epilogue (the loop nest is the schedule): packed int4
    weights on VNNI, and the plain integer kernel without VNNI (8-bit weights on VNNI: :func:`_qmm_vnni_source`)."""
    S, KP, N, NP = len(spec.segments), spec.kp, spec.n, spec.np_
    MT, NB = tile.mt, tile.nb
    NT = 16 * NB
    nmt = f"((m + {_i(MT - 1)}) // {_i(MT)})"
    wshape = (f"({_i(NP // 16)}, {_i(KP // 8)}, {_i(16)}, {_i(4)})" if spec.int4
              else f"({_i(NP // 16)}, {_i(KP // 4)}, {_i(16)}, {_i(4)})")
    L = _qmm_header(spec, wshape)
    # Tile buffers are allocated once (outside the parallel loop) with one [MT, NT] slice per
    # output-column block `no`, the parallel axis: threads never share a slice, and each tile's
    # working set stays a few KB.  (Blocks nested under a per-tile block lose the outer loop
    # offsets in blockize, so the buffers cannot simply be declared inside the loop.)
    NO = NP // NT
    for si in range(S):
        L.append(f'    acc{si} = T.alloc_buffer(({_i(NO)}, {_i(MT)}, {_i(NT)}), "int32", scope="local")')
    for si in range(S - 1):  # one buffer per partial sum keeps every epilogue block complete (vectorizable)
        L.append(f'    out{si} = T.alloc_buffer(({_i(NO)}, {_i(MT)}, {_i(NT)}), "float32", scope="local")')
    if spec.int4:  # unpacked int8 weights of one 8-wide K step: [N/16, 2 halves, 16, 4]
        for si in range(S):
            wshape_l = f"{_i(NP // 16)}, {_i(2)}, {_i(16)}, {_i(4)}"
            L.append(f'    wl{si} = T.alloc_buffer(({wshape_l}), "int8", scope="local")')
    L += [f"    for no in T.parallel({_i(NO)}):",
          f"        for mo in T.serial({nmt}):"]
    ind = "            "
    vm = f"T.axis.spatial({nmt} * {_i(MT)}, mo * {_i(MT)} + mi)"
    row = "T.min(vm, m - T.int64(1))"
    loc = f"vn // {_i(NT)}, vm % {_i(MT)}, vn % {_i(NT)}"
    # the tensorized blocks keep the 16 lanes in their own iter var (blockize needs it free of outer loops)
    cloc = f"vnb // {_i(NB)}, vm % {_i(MT)}, vnb % {_i(NB)} * {_i(16)} + vn16"
    for si, seg in enumerate(spec.segments):
        acc = f"acc{si}"
        sub, term = _segment_exprs(spec, si, row, "vn", f"{acc}[{loc}]")
        L += [f"{ind}for mi, nt in T.grid({_i(MT)}, {_i(NT)}):",
              f'{ind}    with T.sblock("init{si}"):',
              f"{ind}        vm = {vm}",
              f"{ind}        vn = T.axis.spatial({_i(NP)}, no * {_i(NT)} + nt)",
              f"{ind}        {acc}[{loc}] = T.int32(0) - ({sub})"]
        if not spec.int4:
            grid = f"{_i(seg.plen // 4)}, {_i(NB)}, {_i(MT)}, {_i(16)}, {_i(4)}"
            L += [f"{ind}for ko, nb, mi, n16, k4 in T.grid({grid}):",
                  f'{ind}    with T.sblock("C{si}"):',
                  f"{ind}        vm = {vm}",
                  f"{ind}        vnb = T.axis.spatial({_i(NP // 16)}, no * {_i(NB)} + nb)",
                  f"{ind}        vn16 = T.axis.spatial({_i(16)}, n16)",
                  f"{ind}        vko = T.axis.reduce({_i(seg.plen // 4)}, ko)",
                  f"{ind}        vk4 = T.axis.reduce({_i(4)}, k4)",
                  f'{ind}        {acc}[{cloc}] = {acc}[{cloc}]'
                  f' + T.Cast("int32", xq[vm, {_i(seg.poff)} + vko * {_i(4)} + vk4])'
                  f' * T.Cast("int32", wpack[vnb, {_i(seg.poff // 4)} + vko, vn16, vk4])']
        else:
            L.append(f"{ind}for ko in T.serial({_i(seg.plen // 8)}):")
            for h in (0, 1):
                src = f"wpack[vb, {_i(seg.poff // 8)} + vko, vi, vj]"
                val = (f"T.shift_right(T.shift_left({src}, T.int8(4)), T.int8(4))" if h == 0
                       else f"T.shift_right({src}, T.int8(4))")
                L += [f"{ind}    for nb, n16, k4 in T.grid({_i(NB)}, {_i(16)}, {_i(4)}):",
                      f'{ind}        with T.sblock("U{si}_{h}"):',
                      f"{ind}            vb = T.axis.spatial({_i(NP // 16)}, no * {_i(NB)} + nb)",
                      f"{ind}            vko = T.axis.spatial({_i(seg.plen // 8)}, ko)",
                      f"{ind}            vi = T.axis.spatial({_i(16)}, n16)",
                      f"{ind}            vj = T.axis.spatial({_i(4)}, k4)",
                      f"{ind}            wl{si}[vb, {_i(h)}, vi, vj] = {val}",
                      f"{ind}    for nb, mi, n16, k4 in T.grid({_i(NB)}, {_i(MT)}, {_i(16)}, {_i(4)}):",
                      f'{ind}        with T.sblock("C{si}_{h}"):',
                      f"{ind}            vm = {vm}",
                      f"{ind}            vnb = T.axis.spatial({_i(NP // 16)}, no * {_i(NB)} + nb)",
                      f"{ind}            vn16 = T.axis.spatial({_i(16)}, n16)",
                      f"{ind}            vko = T.axis.reduce({_i(seg.plen // 8)}, ko)",
                      f"{ind}            vk4 = T.axis.reduce({_i(4)}, k4)",
                      f'{ind}            {acc}[{cloc}] = {acc}[{cloc}] + T.Cast("int32", xq[vm, '
                      f"{_i(seg.poff + 4 * h)} + vko * {_i(8)} + vk4])"
                      f' * T.Cast("int32", wl{si}[vnb, {_i(h)}, vn16, vk4])']
        last = si == S - 1
        lhs = "y[vm, vn]" if last else f"out{si}[{loc}]"
        rhs = f"bias[vn] + {term}" if si == 0 else f"out{si - 1}[{loc}] + {term}"
        if last and spec.gelu:  # the FFN's activation on the finished sum, in registers (vectorized like the rest)
            rhs = f"GELU({rhs})"
        L += [f"{ind}for mi, nt in T.grid({_i(MT)}, {_i(NT)}):",
              f'{ind}    with T.sblock("E{si}"):',
              f"{ind}        vm = {vm}",
              f"{ind}        vn = T.axis.spatial({_i(NP)}, no * {_i(NT)} + nt)"]
        if last:
            L.append(f"{ind}        T.where(mo * {_i(MT)} + mi < m and no * {_i(NT)} + nt < {_i(N)})")
        L.append(f"{ind}        {lhs} = {rhs}")
    return "\n".join(L) + "\n"


def _vnni_step(acc: str, a: str, b: str) -> str:
    """TVMScript of one ``vpdpbusd``: ``acc (int32x16) + a (u8x64) . b (s8x64)`` (see :func:`_vnni_intrin`)."""
    return (f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), {acc}, {a}, {b},'
            ' dtype="int32x16")')


def _avx2_step(acc: str, a: str, b: str) -> str:
    """TVMScript of one ``vpmaddwd`` on ymm plus the add: ``acc (int32x8) + a (i16x16) . b (i16x16)`` pairwise."""
    return (f'{acc} + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), {a}, {b},'
            ' dtype="int32x8")')


PREFETCH_TILES = 8  # row tiles over which a task prefetches the next task's weight panel


def _next_panel_prefetch(tasks: int, nb: int, ko: int) -> list[str]:
    """TVMScript lines (in the row-tile loop ``mo`` of task ``no``) prefetching into L2 the next task's weight panel
    (``nb`` blocks of ``ko`` 64-byte lines of ``wpack``), spread over the first :data:`PREFETCH_TILES` row tiles (with
    fewer row tiles, only part of it; the last task prefetches its own panel again, harmlessly).

    Why: in a model the weights come from L3 or memory, and the first row tile of each task waited on them: a
    MiniLM FFN-up kernel (128 x 384 x 1536) ran 10% slower with its weights rotated out of L2 than with them in
    L2, 3% with this prefetch (one thread, Zen 4), at no cost with warm weights."""
    lines = nb * ko
    per = -(-lines // PREFETCH_TILES)
    at = f"mo * {_i(per)} + pf"
    addr = (f"T.address_of(wpack[T.min(no + T.int64(1), {_i(tasks - 1)}) * {_i(nb)} + ({at}) // {_i(ko)}, "
            f"({at}) % {_i(ko)}, T.int64(0), T.int64(0)])")
    return [f"                if mo < {_i(PREFETCH_TILES)}:",
            f"                    for pf in range({_i(per)}):",
            f"                        if {at} < {_i(lines)}:",
            f'                            T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", {addr}, '
            "T.int32(0), T.int32(2), T.int32(1)))"]


def _qmm_vnni_source(spec: QLinearSpec, tile: TileConfig, isa: str = "vnni") -> str:
    """TVMScript of the hand-written integer matmul (8-bit weights) as the loop nest it runs, with the operands
    and results of :func:`_qmm_source`: ``isa`` ``"vnni"`` (AVX512-VNNI) or ``"avx2"``.

    Parallel over blocks of ``16 * NB`` output channels; per tile of ``MT`` rows the tile's accumulators
    (a local buffer indexed by constants only, which LLVM keeps in registers) take, per row, 16 channels and 4
    bytes of K: on VNNI one ``vpdpbusd`` (the row's 4 bytes broadcast, the weights' 64-byte row shared by the
    tile's rows) into accumulators that start at minus each segment's integer correction.  On AVX2 (no
    ``vpdpbusd``; ``vpmaddubsw`` would saturate) the same packed bytes are widened to int16 and multiplied
    exactly by ``vpmaddwd``: 4 channels x 4 bytes per ymm, the row's 4 codes zero-extended and broadcast, each
    channel's sum in two int32 lanes that the epilogue adds (the correction subtracted there: the same
    wrapping int32 value).  The segment's scale adds the sums into the float outputs (bias first).  ``xq`` has
    whole tiles of rows (:meth:`QLinearKernel.xq_rows`), so a row's address is the tile's plus a constant; only
    rows ``< m`` (and channels ``< N``) are written, through ``gelu`` when ``spec.gelu``.
    """
    KP, N, NP = spec.kp, spec.n, spec.np_
    MT, NB = tile.mt, tile.nb
    NT = 16 * NB
    lanes_per = 2 if isa == "avx2" else 1  # int32 lanes per output channel in the accumulators
    L = _qmm_header(spec, f"({_i(NP // 16)}, {_i(KP // 4)}, {_i(16)}, {_i(4)})")
    L += ['    with T.sblock("root"):',
          f"        for no in T.parallel({_i(NP // NT)}):",
          f'            acc = T.decl_buffer(({_i(MT * NT * lanes_per)},), "int32", scope="local")',
          f'            out = T.decl_buffer(({_i(MT * NT)},), "float32", scope="local")',
          *([f'            ob = T.decl_buffer(({_i(NT)},), "uint8", scope="local")'] if spec.codes else []),
          f"            for mo in range((m + {_i(MT - 1)}) // {_i(MT)}):"]
    if MT > 1:
        L += _next_panel_prefetch(NP // NT, NB, KP // 4)
    ind = " " * 16
    row = f"T.min(mo * {_i(MT)} + i, m - T.int64(1))"  # per-row operands (xsum, dynamic ranges): clamped
    vn = f"no * {_i(NT)} + j"
    at = f"i * {_i(NT)} + j"
    xrow = f"xq.vload([mo * {_i(MT)} + i, {{}} + ko * {_i(4)}], \"uint8x4\")"
    for si, seg in enumerate(spec.segments):
        if isa == "avx2":
            sub, _ = _segment_exprs(spec, si, row, vn, "")
            pair = f"acc[i * {_i(2 * NT)} + j * {_i(2)}] + acc[i * {_i(2 * NT)} + j * {_i(2)} + {_i(1)}]"
            _, term = _segment_exprs(spec, si, row, vn, f"({pair} - ({sub}))")
            L += [f"{ind}for j in T.vectorized({_i(MT * NT * 2)}):",
                  f"{ind}    acc[j] = T.int32(0)"]
        else:
            sub, term = _segment_exprs(spec, si, row, vn, f"acc[{at}]")
            L += [f"{ind}for i in T.unroll({_i(MT)}):",
                  f"{ind}    for j in T.vectorized({_i(NT)}):",
                  f"{ind}        acc[{at}] = T.int32(0) - ({sub})"]
        L += [f"{ind}for ko in range({_i(seg.plen // 4)}):",
              f"{ind}    for i in T.unroll({_i(MT)}):",
              f"{ind}        for b in T.unroll({_i(NB)}):"]
        xa = xrow.format(_i(seg.poff))
        if isa == "avx2":
            a_vec = (f'T.reinterpret(T.broadcast(T.reinterpret(T.Cast("int16x4", {xa}), dtype="int64"), 4),'
                     ' dtype="int16x16")')
            b_vec = (f'T.Cast("int16x16", wpack.vload([no * {_i(NB)} + b, {_i(seg.poff // 4)} + ko, q * {_i(4)},'
                     ' T.int64(0)], "int8x16"))')
            lanes = f"((i * {_i(NB)} + b) * {_i(4)} + q) * {_i(8)}"
            L += [f"{ind}            for q in T.unroll({_i(4)}):",
                  f"{ind}                acc[T.ramp({lanes}, 1, 8)] = "
                  + _avx2_step(f'acc.vload([{lanes}], "int32x8")', a_vec, b_vec)]
        else:
            a_vec = f'T.reinterpret(T.broadcast(T.reinterpret({xa}, dtype="int32"), 16), dtype="uint8x64")'
            b_vec = f'wpack.vload([no * {_i(NB)} + b, {_i(seg.poff // 4)} + ko, T.int64(0), T.int64(0)], "int8x64")'
            lanes = f"(i * {_i(NB)} + b) * {_i(16)}"
            L.append(f"{ind}            acc[T.ramp({lanes}, 1, 16)] = "
                     + _vnni_step(f'acc.vload([{lanes}], "int32x16")', a_vec, b_vec))
        first = f"bias[{vn}]" if si == 0 else f"out[{at}]"
        L += [f"{ind}for i in T.unroll({_i(MT)}):",
              f"{ind}    for j in T.vectorized({_i(NT)}):",
              f"{ind}        out[{at}] = {first} + {term}"]
    res = f"out[r * {_i(NT)} + c]"
    res = f"GELU({res})" if spec.gelu else res
    if spec.codes:
        L += _code_write_lines(ind, spec, res, MT, NT)
    else:
        L += amx_write_lines(ind, N, res, MT, "mo", cols=NT, cblock="no", unroll=True,
                             part_blocks=N // spec.parts // NT if spec.parts > 1 else 0)
    return "\n".join(L) + "\n"


CODE_NAMES = ("code_scale", "code_rcp", "code_zero", "code_pos")
"""Operands of a matmul that writes the next linear's codes (``spec.codes``), per output channel: its cluster's
scale, the scale's reciprocal, zero point (f32) and its column in the next linear's padded layout (int32, -1
past N)."""


def _code_expr(v: str, c: str, bits: int) -> str:
    """TVMScript of the u8 code of ``v`` for channel ``c`` by the code tables: qact's arithmetic (same bits)."""
    q = _quotient(v, f"code_scale[{c}]", f"code_rcp[{c}]")
    rne = f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.roundeven"), {q}, dtype="float32")'
    return (f'T.Cast("uint8", T.max(T.min({rne} + code_zero[{c}], T.float32({(1 << bits) - 1})), '
            "T.float32(0)))")


def _code_write_lines(ind: str, spec: QLinearSpec, res: str, rows: int, cols: int) -> list[str]:
    """TVMScript lines writing the u8 codes of ``res`` (of ``r``, ``c``) for channels ``no * cols + c`` to their
    columns ``code_pos`` of ``y``'s rows ``mo * rows + r``: one vector per row where the block's columns are
    contiguous (inside one segment of the next linear), else through the local ``ob``, byte by byte (the blocks
    that straddle a segment's padding, or reach past N).  Padding columns are not written: the next linear's
    weights there are zero."""
    row, col = f"mo * {_i(rows)} + r", f"no * {_i(cols)} + c"
    first = f"code_pos[no * {_i(cols)}]"
    code = _code_expr(res, col, spec.codes_bits)
    return [f"{ind}if code_pos[no * {_i(cols)} + {_i(cols - 1)}] - {first} == {cols - 1}:",
            f"{ind}    for r in T.unroll({_i(rows)}):",
            f"{ind}        if {row} < m:",
            f"{ind}            for c in T.vectorized({_i(cols)}):",
            f'{ind}                y[{row}, T.Cast("int64", {first}) + c] = {code}',
            f"{ind}else:",
            f"{ind}    for r in T.unroll({_i(rows)}):",
            f"{ind}        if {row} < m:",
            f"{ind}            for c in T.vectorized({_i(cols)}):",
            f"{ind}                ob[c] = {code}",
            f"{ind}            for c in range({_i(cols)}):",
            f"{ind}                if {col} < {_i(spec.n)}:",
            f'{ind}                    y[{row}, T.Cast("int64", code_pos[{col}])] = ob[c]']


def _amx(name: str, *args: str) -> str:
    """One AMX instruction as a TVMScript statement (the tile-number forms of LLVM's intrinsics)."""
    return f'T.evaluate(T.call_llvm_intrin("void", "llvm.x86.{name}", {", ".join(args)}))'


def amx_config_lines(ind: str) -> list[str]:
    """TVMScript lines (indented by ``ind``) that declare a tile configuration and load it: palette 1, all
    eight tiles 16 rows x 64 bytes (the layout of every AMX kernel here)."""
    return [f'{ind}cfg = T.decl_buffer((T.int64(64),), "uint8", scope="local")',
            f"{ind}for i in range(T.int64(64)):",
            f"{ind}    cfg[i] = T.uint8(0)",
            f"{ind}cfg[T.int64(0)] = T.uint8(1)",  # palette 1
            f"{ind}for t in range(T.int64(8)):",  # every tile: 16 rows of 64 bytes
            f"{ind}    cfg[T.int64(16) + t * T.int64(2)] = T.uint8(64)",
            f"{ind}    cfg[T.int64(48) + t] = T.uint8(16)",
            f"{ind}{_amx('ldtilecfg', 'T.address_of(cfg[T.int64(0)])')}"]


def amx_store_lines(ind: str) -> list[str]:
    """TVMScript lines storing accumulator tiles 0-3 (2 x 2 of 16 x 16 4-byte sums) into the 32 x 32 buffer
    ``acc``."""
    return [f"{ind}" + _amx("tilestored64", f"T.uint8({2 * a + b})", f"T.address_of(acc[{_i(16 * a)}, {_i(16 * b)}])",
                            _i(4 * AMX_BLOCK)) for a in (0, 1) for b in (0, 1)]


def amx_write_lines(ind: str, n: int, res: str, rows: int = AMX_BLOCK, block: str = "mb", *, cols: int = AMX_BLOCK,
                    cblock: str = "nb", unroll: bool = False, part_blocks: int = 0) -> list[str]:
    """TVMScript lines writing ``res`` (an expression of ``r``, ``c``) to ``y[block * rows + r, cblock * cols + c]``
    for the block's rows below ``m`` and channels below ``n`` (``block``/``cblock``: the row and channel block).
    ``unroll``: the rows as an unrolled loop with a test each (``r`` a constant in ``res``: a tile held in
    registers stays there).  ``part_blocks``: ``y`` is part-major ``[parts, m, n / parts]``, each part that many
    channel blocks."""
    row = f"{block} * {_i(rows)} + r"
    if unroll:
        L = [f"{ind}for r in T.unroll({_i(rows)}):", f"{ind}    if {row} < m:"]
        ind += "    "
    else:
        L = [f"{ind}for r in range(T.min({_i(rows)}, m - {block} * {_i(rows)})):"]
    col = f"{cblock} * {_i(cols)} + c"
    if part_blocks:  # part-major [parts, m, n / parts], each part whole channel blocks
        pb = _i(part_blocks)
        L += [f"{ind}    for c in T.vectorized({_i(cols)}):",
              f"{ind}        y[{cblock} // {pb}, {row}, {cblock} % {pb} * {_i(cols)} + c] = {res}"]
    elif n % cols == 0:
        L += [f"{ind}    for c in T.vectorized({_i(cols)}):",
              f"{ind}        y[{row}, {col}] = {res}"]
    else:  # the last block's padded channels are not written
        L += [f"{ind}    for c in range({_i(cols)}):",
              f"{ind}        if {col} < {_i(n)}:",
              f"{ind}            y[{row}, {col}] = {res}"]
    return L


def _qmm_amx_source(spec: QLinearSpec) -> str:
    """TVMScript of the integer matmul on AMX tiles, with the same operands and epilogue as the VNNI one.

    Parallel over blocks of 32 output channels; per block the tiles are configured once (all eight
    16 rows x 64 bytes), then for every block of 32 rows and every segment: tiles 0-3 accumulate
    the 2 x 2 16 x 16 int32 products (``tdpbusd``: u8 activations in tiles 4-5 read from ``xq``,
    s8 weights in tiles 6-7 read from ``wpack``, whose ``[N/16, K/4, 16, 4]`` layout is already
    the tile's), are stored to a 32 x 32 int32 buffer, and the segment's exact integer correction
    and scale are added into a float 32 x 32 buffer (vectorized).  The float buffer starts at the
    bias and is written to ``y`` at the end (through ``gelu`` when ``spec.gelu``), rows ``< m``
    only (``xq`` has ``mp`` >= m rows, whole blocks, so the tile loads never leave it).  Segments
    are padded to whole 64-byte tile rows.
    """
    KP, N, NP = spec.kp, spec.n, spec.np_
    B = AMX_BLOCK
    asym, dyn = not spec.w_symmetric, spec.dynamic
    L = _qmm_header(spec, f"({_i(NP // 16)}, {_i(KP // 4)}, {_i(16)}, {_i(4)})")
    ind = "            "
    L += ['    with T.sblock("root"):',
          f"        for nb in T.parallel({_i(NP // B)}):",
          f'            acc = T.decl_buffer(({_i(B)}, {_i(B)}), "int32", scope="local")',
          f'            out = T.decl_buffer(({_i(B)}, {_i(B)}), "float32", scope="local")',
          *amx_config_lines(ind),
          f"{ind}for mb in range(mp // {_i(B)}):",
          f"{ind}    for r in range({_i(B)}):",
          f"{ind}        for c in T.vectorized({_i(B)}):",
          f"{ind}            out[r, c] = bias[nb * {_i(B)} + c]"]
    ind2 = ind + "    "
    for si, seg in enumerate(spec.segments):
        L += [f"{ind2}{_amx('tilezero', f'T.uint8({t})')}" for t in range(4)]
        L += [f"{ind2}for ks in range({_i(seg.plen // AMX_K)}):",
              f"{ind2}    k = {_i(seg.poff)} + ks * {_i(AMX_K)}"]
        for h in (0, 1):
            L.append(f"{ind2}    " + _amx("tileloadd64", f"T.uint8({4 + h})",
                                          f"T.address_of(xq[mb * {_i(B)} + {_i(16 * h)}, k])", _i(KP)))
            w_at = f"wpack[nb * {_i(2)} + {_i(h)}, k // {_i(4)}, T.int64(0), T.int64(0)]"
            L.append(f"{ind2}    " + _amx("tileloadd64", f"T.uint8({6 + h})", f"T.address_of({w_at})", _i(64)))
        for a in (0, 1):
            for b in (0, 1):
                L.append(f"{ind2}    " + _amx("tdpbusd", f"T.uint8({2 * a + b})", f"T.uint8({4 + a})",
                                              f"T.uint8({6 + b})"))
        L += amx_store_lines(ind2)
        c_ = _i(seg.cluster)
        row = f"T.min(mb * {_i(B)} + r, m - T.int64(1))"
        n = f"nb * {_i(B)} + c"
        if dyn:
            term = (f'ascale[{row}, {c_}] * alpha[{_i(si)}, {n}] * T.Cast("float32", acc[r, c] - azero[{row}, {c_}]'
                    f" * corr[{_i(si)}, {n}]")
        else:
            term = f'alpha[{_i(si)}, {n}] * T.Cast("float32", acc[r, c] - corr[{_i(si)}, {n}]'
        term += f" - wzero[{_i(si)}, {n}] * xsum[{row}, {_i(si)}])" if asym else ")"
        L += [f"{ind2}for r in range({_i(B)}):",
              f"{ind2}    for c in T.vectorized({_i(B)}):",
              f"{ind2}        out[r, c] = out[r, c] + {term}"]
    L += amx_write_lines(ind2, N, "GELU(out[r, c])" if spec.gelu else "out[r, c]")
    L.append(f"{ind}{_amx('tilerelease')}")
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- scheduling
def _schedule_qact(func: Any) -> Any:
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    for rv in _blocks(sch):
        if sch.get(rv).name_hint.startswith("q"):  # q*, qt*, qp*: elementwise; xs*: reductions stay serial
            sch.vectorize(sch.get_loops(rv)[-1])
    return sch.mod["main"]


def _blocks(sch: Any) -> list[Any]:
    """All sblock RVs of the function below the root, in pre-order."""
    out: list[Any] = []
    todo = list(sch.get_child_blocks(sch.get_sblock("root")))
    while todo:
        rv = todo.pop(0)
        out.append(rv)
        todo[:0] = list(sch.get_child_blocks(rv))
    return out


def _schedule_qmm(func: Any, spec: QLinearSpec, vnni: bool) -> Any:
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    for rv in _blocks(sch):
        name = sch.get(rv).name_hint
        loops = sch.get_loops(rv)
        if name.startswith("C"):
            n16, k4 = loops[-2], loops[-1]
            nb, mi = loops[-4], loops[-3]
            if vnni:  # unroll before tensorize: the accumulators then live in zmm registers
                sch.unroll(mi)
                sch.unroll(nb)
                sch.tensorize(n16, _intrin_name("local" if spec.int4 else "global"))
            else:  # plain int32 multiply-add; LLVM's loop vectorizer handles the 16 lanes
                sch.reorder(k4, n16)
        elif name.startswith("U"):
            nb, n16, k4 = loops[-3:]
            sch.vectorize(sch.fuse(n16, k4))
            sch.unroll(nb)
        elif name.startswith(("init", "E")):
            sch.unroll(loops[-2])
            sch.vectorize(loops[-1])
    return sch.mod["main"]


@dataclass(frozen=True)
class QLinearKernel:
    """The scheduled PrimFuncs of one ``quant_linear`` shape/attribute set for one target."""

    spec: QLinearSpec
    tile: TileConfig
    isa: str  # "vnni", "avx2" (the hand-written several-row kernels) or "int" (plain integer loop nest)
    qact: Any
    qmm: Any
    permute: bool = False  # qact quantizes in channel order and permutes the codes (operands PERMUTE_NAMES)

    @property
    def vnni(self) -> bool:
        """Whether the matmul runs on AVX512-VNNI."""
        return self.isa == "vnni"

    @property
    def hand_written(self) -> bool:
        """Whether the matmul is the hand-written kernel (VNNI or AVX2) that can write codes or part-major results."""
        return self.isa in ("vnni", "avx2")

    def xq_rows(self, m: Any) -> Any:
        """Rows of the quantized activations ``xq`` for ``m`` rows (an int or a TIR expression): whole AMX
        row blocks, or whole register tiles of the VNNI kernel; qact writes rows ``< m`` only."""
        if self.spec.amx:
            return amx_rows(m)
        mt = self.tile.mt
        return m if mt == 1 else (m + mt - 1) // mt * mt

    @property
    def names(self) -> tuple[str, str]:
        """Global names the PrimFuncs get in a Relax module."""
        how = "amx" if self.spec.amx else f"{self.isa}_{self.tile.mt}x{self.tile.nb}"
        how += "_pb" if self.permute else ""
        suffix = f"{self.spec.tag}_{how}"
        return f"ctc_qact_{suffix}", f"ctc_qmm_{suffix}"


@functools.lru_cache(maxsize=256)
def _plan(spec: QLinearSpec, isa: str, tile: TileConfig, permute: bool = False) -> QLinearKernel:
    import tvm

    vnni = isa == "vnni"
    hand = isa in ("vnni", "avx2") and not spec.int4
    if vnni:
        register_vnni_intrinsics()
    if spec.dynamic:  # hand-scheduled already (vector min/max, vectorized quantization)
        qact = tvm.script.from_source(_qact_dynamic_source(spec))
    elif permute:  # written as the loop nest it runs
        qact = tvm.script.from_source(_qact_permute_source(spec))
    else:
        qact = _schedule_qact(tvm.script.from_source(_qact_source(spec)))
    from ctc.backends.tvm.row_kernels import gelu_expr
    from tvm.script import tirx as T

    gelu = {"T": T, "GELU": gelu_expr}
    if spec.codes and not (hand and tile.mt > 1):
        raise ValueError("int_kernels: a matmul writing the next linear's codes (codes > 0) runs on the VNNI or AVX2 "
                         "kernel with a tile of several rows; leave codes=0 on this target or for one row")
    if spec.parts > 1 and not (hand and not spec.amx and 16 * tile.nb <= spec.n // spec.parts
                               and spec.n // spec.parts % (16 * tile.nb) == 0):
        raise ValueError("int_kernels: a part-major output (parts > 1) is written by the VNNI/AVX2 kernel over 8-bit "
                         "weights, each part whole tiles of channels; leave parts=1 on this target")
    if spec.amx:  # written as the loop nest it runs: no schedule
        qmm = tvm.script.from_source(_qmm_amx_source(spec), extra_vars=gelu)
    elif hand:  # 8-bit weights on VNNI or AVX2: written as the loop nest it runs
        qmm = tvm.script.from_source(_qmm_vnni_source(spec, tile, isa), extra_vars=gelu)
    else:
        qmm = _schedule_qmm(tvm.script.from_source(_qmm_source(spec, tile), extra_vars=gelu), spec, vnni)
    qact = qact.with_attr("tirx.is_scheduled", True)
    qmm = qmm.with_attr("tirx.is_scheduled", True)
    return QLinearKernel(spec, tile, isa if hand or vnni else "int", qact, qmm, permute)


def plan_quant_linear(spec: QLinearSpec, target: Any = None, *, use_vnni: bool | None = None,
                      tile: TileConfig | None = None, isa: str | None = None) -> QLinearKernel:
    """Generate and schedule the kernels for ``spec`` on ``target`` (default: this host).

    ``isa`` picks the matmul: ``"vnni"`` (AVX512-VNNI), ``"avx2"`` (exact int16 products on AVX2 for 8-bit
    weights; int4 storage keeps the plain kernel there) or ``"int"`` (the plain integer loop nest); None takes
    the best the target has.  ``use_vnni``
    is the older switch: ``False`` forces ``"int"``, ``True`` ``"vnni"``.  Asking for an instruction set the
    target lacks is an error.  A gathering static quantizer permutes its codes with AVX512-VBMI where the
    target has it (``kernel.permute``: operands :func:`permute_tables` instead of ``perm``).
    """
    import tvm

    t = _as_target(target)
    kind = t.kind.name
    if kind != "llvm":
        raise ValueError(f"int_kernels.plan_quant_linear: these are CPU kernels and need an llvm target, got {kind!r}")
    if spec.amx and not target_has_amx(target):
        raise ValueError(f"int_kernels: an AMX spec for target {t}, which lacks amx-int8 (or this "
                         "process was refused the tile registers); make the spec with with_amx(spec, target)")
    if isa is None and use_vnni is not None:
        isa = "vnni" if use_vnni else "int"
    has = {"vnni": target_has_vnni(t), "avx2": target_has_avx2(t), "int": True}
    if isa is None:
        isa = "vnni" if has["vnni"] else "avx2" if has["avx2"] and not spec.int4 else "int"
    if isa not in has:
        raise ValueError(f"int_kernels: isa must be one of {sorted(has)}, got {isa!r}")
    if not has[isa]:
        need = "avx512vnni" if isa == "vnni" else isa
        raise ValueError(f"int_kernels: isa={isa!r} but target {t} lacks {need}; pass isa=None for the best it has")
    permute = (spec.gather and not spec.dynamic and spec.k <= PERMUTE_MAX_K
               and bool(tvm.target.codegen.target_has_features(["avx512vbmi", "avx512bw"], t)))
    if isa == "avx2" and not spec.int4:  # 16 ymm registers: 4 accumulators per row and 16 channels
        tile = avx2_tile(spec, one_row=tile is not None and tile.mt == 1)
    return _plan(spec, isa, tile or default_tile(spec), permute)


# ----------------------------------------------------------------------------- weight packing
def _np(t: Any, dtype: Any = None) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu().numpy()
    a = np.asarray(t)
    return a.astype(dtype) if dtype is not None else a


def _unpack_qweight(spec: QLinearSpec, qweight: Any) -> np.ndarray:
    """Signed integer weights ``[N, K]`` (int32) from the op's storage form (``ctc.ir.quant``)."""
    q = _np(qweight)
    if spec.int4:
        want = (spec.n, (spec.k + 1) // 2)
        if q.dtype != np.uint8 or q.shape != want:
            raise ValueError(f"int_kernels.prepack_weights: {spec.w_bits}-bit qweight must be uint8 {list(want)} "
                             f"(two offset-binary nibbles per byte), got {q.dtype} {list(q.shape)}")
        lo = (q & 0x0F).astype(np.int32) - 8
        hi = (q >> 4).astype(np.int32) - 8
        return np.stack([lo, hi], axis=-1).reshape(spec.n, -1)[:, : spec.k]
    if q.dtype != np.int8 or q.shape != (spec.n, spec.k):
        raise ValueError(f"int_kernels.prepack_weights: {spec.w_bits}-bit qweight must be int8 [{spec.n}, {spec.k}], "
                         f"got {q.dtype} {list(q.shape)}")
    return q.astype(np.int32)


def prepack_weights(spec: QLinearSpec, qweight: Any, w_scale: Any, w_zero: Any, bias: Any | None,
                    act_scale: Any | None, act_zero: Any | None) -> dict[str, np.ndarray]:
    """The kernel's constant operands from the ``quant_linear`` operand values (numpy or torch).

    Returns ``act_scale f32 [C]``, ``act_zero i32 [C]``, ``wpack`` (VNNI layout, see module
    doc), ``alpha f32 [S, Np]``, ``corr i32 [S, Np]``, ``wzero i32 [S, Np]`` (f32 with ``w_zero_float``; asymmetric
    weights only) and ``bias f32 [Np]``; padded channels are zero.
    """
    q = _unpack_qweight(spec, qweight)  # [N, K] int32
    G, C, S, N, NP, KP = spec.num_groups, spec.num_clusters, len(spec.segments), spec.n, spec.np_, spec.kp
    ws = _np(w_scale, np.float32).reshape(N, -1)
    wz_raw = _np(w_zero)
    if wz_raw.dtype.kind == "f" and not spec.w_zero_float and np.any(wz_raw != np.round(wz_raw)):
        raise ValueError("int_kernels.prepack_weights: w_zero holds non-integer (float) zero points but the spec "
                         "has w_zero_float=False (build it with QLinearSpec.from_attrs(..., w_zero_float=True))")
    wz = wz_raw.astype(np.float32 if spec.w_zero_float else np.int32).reshape(N, -1)
    if ws.shape != (N, G) or wz.shape != (N, G):
        raise ValueError(f"int_kernels.prepack_weights: w_scale/w_zero must be [{N}, {G}], got "
                         f"{list(ws.shape)} / {list(wz.shape)}")
    if spec.w_symmetric and np.any(wz != 0):
        raise ValueError("int_kernels.prepack_weights: w_symmetric=True but w_zero has non-zero entries")
    if spec.dynamic:  # no calibrated ranges: the kernel's epilogue applies each row's (scale, zero)
        a_s, a_z = np.ones((C,), np.float32), np.zeros((C,), np.int64)
    else:
        a_s = _np(act_scale, np.float32).reshape(-1)
        a_z = _np(act_zero, np.int64).reshape(-1)
    if a_s.shape != (C,) or a_z.shape != (C,):
        raise ValueError(f"int_kernels.prepack_weights: act_scale/act_zero must have {C} entries (one per cluster), "
                         f"got {a_s.shape[0]} / {a_z.shape[0]}")
    qp = np.zeros((NP, KP), np.int32)
    for seg in spec.segments:
        qp[:N, seg.poff: seg.poff + seg.length] = q[:, seg.k0: seg.k0 + seg.length]
    if spec.int4:
        nib = (qp & 0xF).astype(np.uint8).reshape(NP // 16, 16, KP // 8, 2, 4)  # [nb, n16, k8, half, k4]
        byte = nib[:, :, :, 0, :] | (nib[:, :, :, 1, :] << 4)
        wpack = byte.transpose(0, 2, 1, 3).astype(np.uint8).view(np.int8).copy()
    else:
        wpack = qp.astype(np.int8).reshape(NP // 16, 16, KP // 4, 4).transpose(0, 2, 1, 3).copy()
    alpha = np.zeros((S, NP), np.float32)
    corr = np.zeros((S, NP), np.int64)
    wzero = np.zeros((S, NP), np.float32 if spec.w_zero_float else np.int32)
    for si, seg in enumerate(spec.segments):
        zc = int(a_z[seg.cluster])
        rows = q[:, seg.k0: seg.k0 + seg.length].astype(np.int64).sum(axis=1)
        if spec.w_zero_float:  # the zero point's terms are applied in float by the epilogue
            alpha[si, :N] = ws[:, seg.group]
            corr[si, :N] = rows
            wzero[si, :N] = wz[:, seg.group]
            continue
        zg = wz[:, seg.group].astype(np.int64)
        if spec.dynamic:
            alpha[si, :N] = ws[:, seg.group]
            corr[si, :N] = rows - seg.length * zg
        else:
            alpha[si, :N] = (np.float32(a_s[seg.cluster]) * ws[:, seg.group]).astype(np.float32)
            corr[si, :N] = zc * rows - seg.length * zc * zg
        wzero[si, :N] = zg
    if np.abs(corr).max(initial=0) >= 2**31:
        raise ValueError("int_kernels.prepack_weights: zero-point correction overflows int32 (K too large)")
    b = np.zeros((NP,), np.float32)
    if bias is not None:
        bb = _np(bias, np.float32).reshape(-1)
        if bb.shape != (N,):
            raise ValueError(f"int_kernels.prepack_weights: bias must be [{N}], got {list(bb.shape)}")
        b[:N] = bb
    out = {"act_scale": a_s, "act_zero": a_z.astype(np.int32), "wpack": wpack, "alpha": alpha,
           "corr": corr.astype(np.int32), "bias": b}
    if not spec.w_symmetric:
        out["wzero"] = wzero
    return out


def code_layout(cons: QLinearSpec) -> np.ndarray:
    """Per column of ``cons``'s quantized input (its padded layout, ``cons.kp`` bytes): the input channel it
    holds, -1 for a segment's padding."""
    src = np.full(cons.kp, -1, np.int64)
    for seg in cons.segments:
        src[seg.poff: seg.poff + seg.length] = np.arange(seg.k0, seg.k0 + seg.length)
    return src


def codes_spec(spec: QLinearSpec, cons: QLinearSpec) -> QLinearSpec:
    """``spec`` (whose N is ``cons``'s K) made to write ``cons``'s u8 codes (``cons.kp`` columns) as output."""
    if spec.n != cons.k:
        raise ValueError(f"int_kernels.codes_spec: the linear's N={spec.n} is not the next linear's K={cons.k}")
    if cons.dynamic or not cons.w_symmetric or cons.amx or cons.gather:
        raise ValueError("int_kernels.codes_spec: the next linear needs static activation ranges, symmetric "
                         "weights, no AMX and an ungathered input (its quantizer must not compute per-row ranges "
                         "or sums, nor permute)")
    out = dataclasses.replace(spec, codes=cons.kp, codes_bits=cons.a_bits)
    out.validate()
    return out


def prepack_codes(spec: QLinearSpec, cons: QLinearSpec, qweight: Any, w_scale: Any, w_zero: Any, bias: Any | None,
                  act_scale: Any, act_zero: Any, code_scale: Any, code_zero: Any) -> dict[str, np.ndarray]:
    """:func:`prepack_weights` for a ``codes_spec`` kernel, plus its code tables (:data:`CODE_NAMES`) from
    ``cons``'s ranges ``code_scale``/``code_zero`` (one per cluster)."""
    if not spec.codes or spec.codes != cons.kp or spec.n != cons.k:
        raise ValueError("int_kernels.prepack_codes: spec must be codes_spec(linear's spec, cons)")
    out = prepack_weights(spec, qweight, w_scale, w_zero, bias, act_scale, act_zero)
    c_s = _np(code_scale, np.float32).reshape(-1)
    c_z = _np(code_zero, np.int64).reshape(-1)
    if c_s.shape != (cons.num_clusters,) or c_z.shape != (cons.num_clusters,):
        raise ValueError(f"int_kernels.prepack_codes: the next linear's act_scale/act_zero must have "
                         f"{cons.num_clusters} entries")
    scale = np.ones(spec.np_, np.float32)
    zero = np.zeros(spec.np_, np.float32)
    pos = np.full(spec.np_, -1, np.int32)
    for seg in cons.segments:
        ch = slice(seg.k0, seg.k0 + seg.length)
        scale[ch], zero[ch] = c_s[seg.cluster], np.float32(c_z[seg.cluster])
        pos[ch] = np.arange(seg.poff, seg.poff + seg.length)
    out.update(code_scale=scale, code_rcp=(np.float32(1) / scale).astype(np.float32), code_zero=zero, code_pos=pos)
    return out


# ----------------------------------------------------------------------------- Relax emission
def emit_quant_linear_packed(bb: Any, x: Any, packed: Mapping[str, Any], kernel: QLinearKernel, *,
                             share: Any = None, memo: dict[Any, Any] | None = None, xq: Any = None) -> Any:
    """Emit ``qact`` + ``qmm`` calls for ``x [..., K]`` with already packed operands.

    ``packed`` maps the names of :func:`prepack_weights` to Relax expressions (constants or
    function parameters) or numpy arrays (bound as constants).  Leading dims of ``x`` may be
    symbolic; the result has x's leading dims, N channels and x's dtype.  ``share`` (a hashable
    saying what the quantized activation depends on besides ``x`` and the kernel: the values of
    the activation ranges and the permutation) with a ``memo`` dict lets linears reading one
    activation alike (q, k, v) run ``qact`` once.  ``xq``: the quantized input already written by the
    previous linear (:func:`codes_spec`; ``x`` then only gives the leading dims), so no ``qact`` runs.  A
    ``spec.codes`` kernel returns the next linear's ``xq`` (``[xq_rows(m), codes]`` u8) instead of ``y``.
    """
    from tvm import relax

    spec = kernel.spec
    gather_ops = list(PERMUTE_NAMES) if kernel.permute else ["perm"] if spec.gather else []
    if xq is not None and (spec.dynamic or not spec.w_symmetric):
        raise ValueError("int_kernels.emit_quant_linear_packed: a quantized input from the previous linear (xq) "
                         "needs static ranges and symmetric weights (no per-row ranges or sums)")
    if xq is not None:  # no quantizer runs: its operands are not needed
        gather_ops = []
    need = [n for n in PACKED_NAMES if (n != "wzero" or not spec.w_symmetric)
            and (n not in ("act_scale", "act_zero") or not (spec.dynamic or kernel.permute or xq is not None))]
    need += gather_ops
    need += list(CODE_NAMES) if spec.codes else []
    missing = [n for n in need if n not in packed]
    if missing:
        raise ValueError(f"int_kernels.emit_quant_linear_packed: packed operands {missing} missing "
                         "(make them with prepack_weights; `perm`, int32 [K], is the gathered input's permutation, "
                         "permute_tables makes the rest of a gathering quantizer's)")
    ops = {n: (relax.const(packed[n]) if isinstance(packed[n], np.ndarray) else packed[n]) for n in need}
    ty = x.ty if hasattr(x, "ty") else x.struct_info
    shape = list(ty.shape)
    if int(shape[-1]) != spec.k and xq is None:
        raise ValueError(f"int_kernels.emit_quant_linear_packed: x has {shape[-1]} input channels, kernel expects "
                         f"{spec.k}")
    lead = shape[:-1]
    m = functools.reduce(lambda a, b: a * b, lead) if lead else 1
    xin = x
    if ty.dtype != "float32" and xq is None:
        xin = bb.emit(relax.op.astype(xin, "float32"))
    if len(lead) != 1 and xq is None:
        xin = bb.emit(relax.op.reshape(xin, [m, spec.k]))
    name_a, name_m = kernel.names
    gv_a = add_prim_func(bb, kernel.qact, name_a)
    gv_m = add_prim_func(bb, kernel.qmm, name_m)
    S = len(spec.segments)
    C = spec.num_clusters
    outs = [relax.TensorType([kernel.xq_rows(m), spec.kp], "uint8")]
    if spec.dynamic:
        outs += [relax.TensorType([m, C], "float32"), relax.TensorType([m, C], "int32")]
    if not spec.w_symmetric:
        outs.append(relax.TensorType([m, S], "int32"))
    qin = [xin, *(ops[n] for n in gather_ops)]
    qin += [] if spec.dynamic or kernel.permute or xq is not None else [ops["act_scale"], ops["act_zero"]]
    key = None if share is None or memo is None or xq is not None else ("qact", name_a, x, share)
    if xq is not None:
        args = [xq]
    elif key is not None and key in memo:
        args = list(memo[key])
    elif len(outs) == 1:
        args = [bb.emit(relax.call_tir(gv_a, qin, outs[0]))]
    else:
        qs = bb.emit(relax.call_tir(gv_a, qin, outs))
        got = [bb.emit(relax.TupleGetItem(qs, i)) for i in range(len(outs))]
        # qmm's order: xq, xsum (asymmetric weights), ascale, azero (dynamic)
        args = [got[0]] + ([got[-1]] if not spec.w_symmetric else []) + (got[1:3] if spec.dynamic else [])
    if key is not None:
        memo[key] = tuple(args)
    args += [ops["wpack"], ops["alpha"], ops["corr"]]
    if not spec.w_symmetric:
        args.append(ops["wzero"])
    args.append(ops["bias"])
    if spec.codes:
        args += [ops[n] for n in CODE_NAMES]
        return bb.emit(relax.call_tir(gv_m, args, relax.TensorType([kernel.xq_rows(m), spec.codes], "uint8")))
    if spec.parts > 1:  # part-major, rows flattened: the caller hands each part on
        y = bb.emit(relax.call_tir(gv_m, args, relax.TensorType([spec.parts, m, spec.n // spec.parts], "float32")))
        return y if ty.dtype == "float32" else bb.emit(relax.op.astype(y, ty.dtype))
    y = bb.emit(relax.call_tir(gv_m, args, relax.TensorType([m, spec.n], "float32")))
    if len(lead) != 1:
        y = bb.emit(relax.op.reshape(y, [*lead, spec.n]))
    if ty.dtype != "float32":
        y = bb.emit(relax.op.astype(y, ty.dtype))
    return y


def add_prim_func(bb: Any, func: Any, name: str) -> Any:
    """Add a hand-written PrimFunc to the block builder's module once (by name); its GlobalVar."""
    mod = bb.get()
    for gv in mod.get_global_vars():
        if getattr(gv, "name_hint", None) == name:
            return gv
    return bb.add_func(func.with_attr("global_symbol", name), name)


def emit_quant_linear(bb: Any, x: Any, operands: Mapping[str, Any], attrs: Mapping[str, Any],
                      target: Any = None, *, use_vnni: bool | None = None, amx: bool = False) -> Any:
    """Lower one ``quant_linear`` node: prepack its operand *values* and emit the integer kernels.

    ``operands`` maps the op's operand names (``qweight``, ``w_scale``, ``w_zero``, ``bias``
    (optional), ``act_scale``, ``act_zero``) to their values (torch/numpy); ``attrs`` is the
    node's attribute dict.  The packed weights become Relax constants.  For parameters bound
    at load time instead, call :func:`prepack_weights` on the values and
    :func:`emit_quant_linear_packed` with Relax vars.  ``amx=True`` uses the AMX tile kernel
    where the target has it (:func:`with_amx`).
    """
    ty = x.ty if hasattr(x, "ty") else x.struct_info
    k = int(ty.shape[-1])
    qw = operands["qweight"]
    spec = QLinearSpec.from_attrs(attrs, k, int(_np(qw).shape[0]),
                                  w_zero_float=_np(operands["w_zero"]).dtype.kind == "f")
    if amx:
        spec = with_amx(spec, target)
    kernel = plan_quant_linear(spec, target, use_vnni=use_vnni)
    packed = prepack_weights(spec, qw, operands["w_scale"], operands["w_zero"], operands.get("bias"),
                             operands.get("act_scale"), operands.get("act_zero"))
    return emit_quant_linear_packed(bb, x, packed, kernel)


# ----------------------------------------------------------------------------- direct execution
_BUILT: dict[tuple[QLinearKernel, str], tuple[Any, Any]] = {}


def build_kernel(kernel: QLinearKernel, target: Any = None) -> tuple[Any, Any]:
    """Compile ``kernel``'s two PrimFuncs for ``target`` (cached per process)."""
    import tvm

    tgt = _as_target(target)
    key = (kernel, str(tgt))
    if key not in _BUILT:
        fa = tvm.compile(tvm.IRModule({"main": kernel.qact}), target=tgt)
        fm = tvm.compile(tvm.IRModule({"main": kernel.qmm}), target=tgt)
        _BUILT[key] = (fa, fm)
    return _BUILT[key]


def run_quant_linear(kernel: QLinearKernel, x: Any, packed: Mapping[str, np.ndarray], target: Any = None,
                     *, return_intermediates: bool = False) -> Any:
    """Compile (cached) and run the two kernels on ``x [M, K]`` f32 (tests, benchmarks); a gathering
    kernel (``spec.gather``) reads ``x[:, packed["perm"]]``; a ``spec.codes`` kernel returns the codes."""
    import tvm

    fa, fm = build_kernel(kernel, target)
    spec = kernel.spec
    xa = np.ascontiguousarray(_np(x, np.float32))
    if xa.ndim != 2 or xa.shape[1] != spec.k:
        raise ValueError(f"int_kernels.run_quant_linear: x must be [M, {spec.k}], got {list(xa.shape)}")
    m = xa.shape[0]
    dev = tvm.cpu()
    t = lambda a: tvm.runtime.tensor(np.ascontiguousarray(a), dev)  # noqa: E731
    if spec.amx and not amx_permission():
        raise RuntimeError("int_kernels.run_quant_linear: this process may not use the AMX tile registers")
    xq = t(np.zeros((kernel.xq_rows(m), spec.kp), np.uint8))
    xs = None
    dyn: list[Any] = []
    perm = [t(np.asarray(packed["perm"], np.int32))] if spec.gather else []
    if spec.dynamic:
        dyn = [t(np.zeros((m, spec.num_clusters), np.float32)), t(np.zeros((m, spec.num_clusters), np.int32))]
        qargs: list[Any] = [t(xa), *perm, xq, *dyn]
    elif kernel.permute:
        tabs = permute_tables(spec, packed["perm"], packed["act_scale"], packed["act_zero"])
        qargs = [t(xa), *(t(tabs[n]) for n in PERMUTE_NAMES), xq]
    else:
        qargs = [t(xa), *perm, t(packed["act_scale"]), t(packed["act_zero"]), xq]
    if not spec.w_symmetric:
        xs = t(np.zeros((m, len(spec.segments)), np.int32))
        qargs.append(xs)
    fa["main"](*qargs)
    y = t(np.zeros((kernel.xq_rows(m), spec.codes), np.uint8) if spec.codes else np.zeros((m, spec.n), np.float32))
    margs: list[Any] = [xq] + ([xs] if xs is not None else []) + dyn
    margs += [t(packed["wpack"]), t(packed["alpha"]), t(packed["corr"])]
    if not spec.w_symmetric:
        margs.append(t(packed["wzero"]))
    margs += [t(packed["bias"]), *(t(packed[n]) for n in (CODE_NAMES if spec.codes else ())), y]
    fm["main"](*margs)
    if spec.codes:  # the next linear's quantized input, the rows below m
        return y.numpy()[:m]
    if return_intermediates:
        return y.numpy(), xq.numpy()[:m], (xs.numpy() if xs is not None else None)  # the rows qact writes
    return y.numpy()


def segment_bounds(spec: QLinearSpec) -> Sequence[tuple[int, int]]:
    """``(k0, k1)`` of every segment (for tests and reports)."""
    return [(s.k0, s.k0 + s.length) for s in spec.segments]
