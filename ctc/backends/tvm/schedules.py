"""Default (untuned) CPU schedules for the PrimFuncs a lowered ctc module produces.

Why: TVM 0.27's dlight has no CPU matmul rule, and an unscheduled matmul runs ~85x slower
than ONNX Runtime.  These rules give every fused PrimFunc a reasonable schedule without
tuning:

* :class:`MatmulRule` -- a fused PrimFunc with one matmul-like reduction block
  (``C[..., m, n] += A[..., m, k] * B[..., k, n]``, optionally followed by elementwise
  epilogue blocks such as bias add, GELU, residual add): register-tiled ``MT x (NB*V)``
  micro-kernel (V = SIMD lanes), vectorized over ``n``, ``k`` innermost-but-three, the
  accumulator tile in a local buffer, the epilogue computed per tile, outer tiles in parallel.
  Works with a symbolic ``m`` (dynamic sequence length).
* :class:`GemvRule` -- one-row products over an ``[N, K]`` weight (decode steps), also batched
  (one query's heads against their keys): weight rows streamed contiguously, vector partial
  sums per row, parallel over outputs.
* :class:`VecMatRule` -- a batched vector times a ``[K, N]`` matrix with no row axis (one
  query's attention weights times its values).
* :class:`RowReductionRule` -- dlight's CPU ``Reduction`` rule (softmax, layer norm) with the
  one-row case fixed; dlight's ``GEMV`` for the remaining matrix-vector shapes.
* :class:`ElementwiseRule` -- the remaining spatial-only PrimFuncs: parallel outer loop,
  vectorized inner loop.

They are applied with ``dlight.ApplyDefaultSchedule`` after legalization and fusion; functions
already scheduled (meta-schedule database hits, the integer kernels) are skipped.
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir, tirx
from tvm.error import InternalError
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import get_sblock_info, normalize_prim_func
from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr
from tvm.target import Target

__all__ = ["ElementwiseRule", "GemvRule", "MatmulRule", "RowReductionRule", "VecMatRule", "default_rules",
           "divisible", "vector_lanes"]


def vector_lanes(target: Target, bits: int = 32) -> int:
    """SIMD lanes of ``bits``-wide elements on ``target``: 16 f32 lanes with AVX-512, 8 with AVX/AVX2.  x86 is read
    off the target's features (LLVM's own ``llvm_get_vector_width`` answers 512 for every x86 CPU, haswell included,
    and register tiles sized for 32 zmm then spill half their accumulators on AVX2's 16 ymm)."""
    from tvm.target.codegen import llvm_get_vector_width, target_has_features

    width = 0
    try:
        if target.kind.name == "llvm":
            for feature, bits_wide in (("avx512f", 512), ("avx", 256), ("sse2", 128)):
                if target_has_features([feature], target):
                    width = bits_wide
                    break
        if not width:
            width = int(llvm_get_vector_width(target))
    except Exception:  # noqa: BLE001 - non-llvm targets
        width = 128
    if width <= 0:
        width = 128
    return max(width // bits, 1)


def _extent(sch: s_tir.Schedule, loop: Any) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def divisible(expr: Any, factor: int) -> bool:
    """Whether TVM's analyzer proves ``expr % factor == 0`` (for symbolic extents)."""
    from tvm.sym.analyzer import Analyzer

    return bool(Analyzer().can_prove(tirx.floormod(expr, factor) == 0))


def _buffer_var_set(region: Any) -> list[set[Any]]:
    """For each index of a buffer region, the set of block iter vars it uses."""
    out = []
    for r in region.region:
        out.append(set(collect_vars_used_in_prim_expr(r.min)))
    return out


class _CpuRule(dl.ScheduleRule):
    """A rule for llvm/c targets whose ``_apply`` builds one schedule, or gives the function up
    (``None``, or a ``ScheduleError`` for a shape it cannot handle) to the rules after it."""

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name in ("llvm", "c")

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            return self._apply(func, target)
        except s_tir.ScheduleError:
            return None

    def _apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        raise NotImplementedError


class MatmulRule(_CpuRule):
    """Register-tiled, vectorized, parallel schedule for (batched) matmul PrimFuncs + epilogue."""

    def __init__(self, mt: int | None = None, nb: int = 2, k_unroll: int = 4, vecmat_max_n: int = 128):
        self.mt = mt
        self.nb = nb
        self.k_unroll = k_unroll
        self.vecmat_max_n = vecmat_max_n

    def tile_rows(self, target: Target | None) -> int:
        """Rows of the register tile on ``target`` (``mt`` when given): ``mt x nb`` accumulators plus ``nb`` weight
        vectors and a broadcast must fit the vector registers, so 8 rows with AVX-512's 32 zmm but 6 with AVX2's
        16 ymm (8 spilled: MiniLM fp32 on a Zen 4 guest without AVX-512 ran 1.7x ONNX Runtime's time)."""
        if self.mt is not None:
            return self.mt
        return 6 if target is not None and vector_lanes(target, 32) == 8 else 8

    def row_tile(self, rows: Any, target: Target | None = None) -> int:
        """Rows of the register tile for ``rows`` rows (an int, a symbolic extent, or None: unknown) on ``target``;
        rows that are not whole tiles are padded.  A symbolic extent gets a smaller tile that provably divides it
        (``batch * 128`` rows: 4 on AVX2, whose 6 would need a padded copy that a symbolic batch cannot inline)."""
        mt = self.tile_rows(target)
        if rows is not None and not isinstance(rows, int):
            return next((t for t in (mt, 4) if t <= mt and divisible(rows, t)), mt)
        if rows is None or rows % mt == 0:
            return mt
        if rows < mt:
            return max(rows, 1)
        # a row count of 7s, 6s or 4s (a 7x7 or 14x14 plane, channels-last; 16 rows on AVX2's 6-row tile): a tile
        # that divides it rather than rows padded and computed for nothing
        return next((t for t in (7, 6, 4) if t < mt and rows % t == 0), mt)

    @staticmethod
    def _symbolic_row_tiles(sch: s_tir.Schedule, batch: list[Any], mo: Any, no: Any) -> tuple[Any, Any]:
        """(parallel loop, tile loop) of a GEMM whose row-tile loop ``mo`` has a symbolic extent; the loops are
        ordered ``*batch, no, mo`` (N panels outermost) when called."""
        par = _static_size(sch, [*batch, no])
        if par is None or par >= PARALLEL_PANELS:
            return sch.fuse(*batch, no), mo
        # few panels (a narrow output): row tiles outermost keep every core busy; the divisions of the
        # fused index are then by static extents only
        sch.reorder(mo, *batch, no)
        fused = sch.fuse(mo, *batch, no)
        return fused, fused

    def _apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:  # noqa: C901
        found = single_reduction(func)
        if found is None:
            return None
        sch, infos, ri = found
        red = infos[ri]
        kinds = red.dom_kind()
        if kinds.count("R") != 1 or not kinds.endswith("R") or kinds.count("S") < 2:
            return None
        block = sch.get(red.block_rv)
        if len(block.reads) < 2 or len(block.writes) != 1:
            return None
        iters = [iv.var for iv in block.iter_vars]
        m_var, n_var, k_var = iters[-3], iters[-2], iters[-1]
        # Matmul shape check: one read uses (m, k) but not n, one uses (k, n) but not m; write uses m, n.
        reads = [(_buffer_var_set(r), r) for r in block.reads]
        a_ok = any(any(m_var in s for s in v) and any(k_var in s for s in v) and not any(n_var in s for s in v)
                   for v, _ in reads)
        b_ok = False
        for v, _r in reads:
            if any(k_var in s for s in v) and not any(m_var in s for s in v) and v and n_var in v[-1]:
                b_ok = True
        if not (a_ok and b_ok):
            return None
        # Producers (injective blocks before the reduction) stay as separate materialised stages;
        # epilogue blocks after it are inlined into the last one, which is computed per tile.
        epis = [b for b in infos[ri + 1:]]
        if any(not e.is_injective() for e in epis):
            return None
        for e in epis[:-1]:
            try:
                sch.compute_inline(e.block_rv)
            except Exception:  # noqa: BLE001 - keep it as a separate stage
                return None
        lanes = vector_lanes(target, 32)
        rb = red.block_rv
        loops = sch.get_loops(rb)
        if len(loops) != len(iters):
            return None
        *batch, lm, ln, lk = loops
        n_ext = _extent(sch, ln)
        nb = self.nb
        # a symbolic N that is provably whole panels (attention's padded key length) needs no padding
        whole_n = n_ext is None and divisible(sch.get(ln).extent, lanes * nb)
        pad_n = (n_ext is None and not whole_n) or (n_ext is not None and n_ext % lanes != 0)
        if n_ext is not None:
            if n_ext <= lanes:
                nb = 1
            while nb > 1 and n_ext % (lanes * nb) != 0 and not pad_n:
                nb -= 1
        m_ext = _extent(sch, lm)
        mt = self.row_tile(m_ext if m_ext is not None else sch.get(lm).extent, target)
        # symbolic rows provably in whole tiles (a panel linear of an any-length build computes them so)
        pad_m = (m_ext is None and not divisible(sch.get(lm).extent, mt)) or (m_ext is not None and m_ext % mt != 0)
        if m_ext is None and pad_m and not pad_n and n_ext is not None and n_ext <= self.vecmat_max_n \
                and len(sch.get(rb).reads) == 2 and ri == 0:
            # Symbolic rows and a narrow output (attention's p v, head_dim columns): padding would copy
            # the whole [rows, K] operand; VecMatRule streams it in place, row by row.
            return None
        writer = None
        if pad_m or pad_n:
            # Symbolic or ragged extents: pad rows to the tile and columns to whole vectors (padded
            # copies of the operands, result copied back) so the register tile carries no bounds
            # predicate (a predicate there keeps the accumulators out of registers).
            sch.pad_einsum(rb, [1] * len(batch) + [mt if pad_m else 1, nb * lanes if pad_n else 1, 1])
            copy = sch.get_consumers(rb)[0]
            if epis:
                sch.compute_inline(copy)
            else:
                writer = copy
            *batch, lm, ln, lk = sch.get_loops(rb)
        producers = list(sch.get_producers(rb))
        k_ext = _extent(sch, lk)
        mo, mi = sch.split(lm, [None, mt])
        no, nj, nv = sch.split(ln, [None, nb, lanes])
        short_conv = block.name_hint == "conv_mm" and k_ext is not None and n_ext is not None \
            and k_ext <= 64 and k_ext * n_ext * 4 <= 1 << 20 and m_ext is not None and m_ext >= 2 * mt
        if m_ext is not None and n_ext is not None and k_ext is not None and (m_ext > n_ext or short_conv):
            # A (M x K) is the larger operand (a convolution's weight against a small feature map):
            # row tiles outermost, so each A tile streams once and B (K x N) stays in cache.
            sch.reorder(*batch, mo, no, lk, mi, nj, nv)
            outer = tile = sch.fuse(*batch, mo, no)
        else:
            # N-panels outermost: one B panel (K x NB*V) stays in cache while all row tiles use it.
            sch.reorder(*batch, no, mo, lk, mi, nj, nv)
            if m_ext is None:
                # Symbolic rows: fused into the parallel loop, a tile's row became a division by the symbolic tile
                # count, which TVM could not bound, so the accumulator tile stayed an indexed stack array (a load and
                # a store per FMA: the merged q|k|v GEMM of an any-length MiniLM 2.6x slower than the fixed build's).
                # The row tiles stay their own serial loop inside the parallel panels, or outermost where panels
                # are too few.
                outer, tile = self._symbolic_row_tiles(sch, batch, mo, no)
            else:
                outer = tile = sch.fuse(*batch, no, mo)
        # The accumulator tile: a "global" buffer, kept on the stack even at 1-2 KB (the encoders' 8 x 32 is exactly
        # 1 KB) by `build.stack_small_buffers`, and in registers after LLVM's SROA: measured 5-6% faster than the
        # workspace pool's alloc/memset/free per tile.
        acc = "global"
        sch.parallel(outer)
        sch.unroll(mi)
        sch.unroll(nj)
        sch.vectorize(nv)
        if self.k_unroll > 1:
            sch.annotate(lk, "pragma_auto_unroll_max_step", self.k_unroll)
            sch.annotate(lk, "pragma_unroll_explicit", 1)
        if epis:
            last = epis[-1].block_rv
            sch.reverse_compute_at(last, tile, preserve_unit_loops=True)
            sch.set_scope(rb, 0, acc)
            _vectorize_last(sch, last, lanes)
        elif writer is not None:
            sch.reverse_compute_at(writer, tile, preserve_unit_loops=True)
            sch.set_scope(rb, 0, acc)
            _vectorize_last(sch, writer, lanes)
        else:
            cw = sch.cache_write(rb, 0, acc)
            sch.reverse_compute_at(cw, tile, preserve_unit_loops=True)
            _vectorize_last(sch, cw, lanes)
        init = sch.decompose_reduction(rb, lk)
        iloops = sch.get_loops(init)
        sch.vectorize(iloops[-1])
        # Producer stages (and the padded copy of A): parallel + vectorize like elementwise blocks.
        for p in producers:
            if "R" not in get_sblock_info(sch, p).dom_kind():
                _schedule_spatial(sch, p, lanes)
        return sch


def single_reduction(func: tirx.PrimFunc) -> tuple[s_tir.Schedule, list[Any], int] | None:
    """(schedule, normalized block infos, index of the reduction block) when ``func`` has exactly one
    reduction block among injective ones; else None."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    reds = [i for i, b in enumerate(infos) if not b.is_injective()]
    if len(reds) != 1:
        return None
    return sch, infos, reds[0]


def _product_then_epilogue(func: tirx.PrimFunc) -> tuple[s_tir.Schedule, list[Any], Any] | None:
    """(schedule, block infos, reduction block) when ``func`` is one two-operand product reduced over
    its innermost axis (``..SR``), followed only by elementwise blocks; else None."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None or [i for i, b in enumerate(infos) if not b.is_injective()] != [0]:
        return None
    kinds = infos[0].dom_kind()
    if not kinds.endswith("SR") or kinds.count("R") != 1:
        return None
    block = sch.get(infos[0].block_rv)
    if len(block.reads) != 2 or len(block.writes) != 1:
        return None
    return sch, infos, block


class GemvRule(_CpuRule):
    """Matrix-vector product over an ``[N, K]`` weight (one-row linears of a decode step).

    ``y[..., n] = sum_k x[..., k] * w[n, k]`` with every leading extent 1: outputs in chunks of
    ``rows`` per parallel task; for each chunk the weight rows stream contiguously, ``lanes``
    partial sums per row in vector registers (``rfactor`` over the vector lane of ``k``), then a
    horizontal sum and the epilogue (bias, activation) per chunk.  Bound by memory bandwidth,
    which is the point: the weight is read once, in order.  ``rows=1`` is the default because
    it measured fastest with weights coming from DRAM (25-35 GB/s on 2 Zen4 cores, against
    21-24 GB/s with chunks of 2 or 4 rows, which only win when the weight is in cache).
    """

    def __init__(self, rows: int = 1):
        self.rows = rows

    def _apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        found = _product_then_epilogue(func)
        if found is None:
            return None
        sch, infos, block = found
        red = infos[0]
        iters = [iv.var for iv in block.iter_vars]
        n_var, k_var = iters[-2], iters[-1]
        # One read is the vector (uses k, not n); the other is the weight, indexed [.., n, k].
        weight_vars: set[Any] | None = None
        vector = False
        for r in block.reads:
            v = _buffer_var_set(r)
            uses_n = any(n_var in x for x in v)
            if len(v) >= 2 and n_var in v[-2] and k_var in v[-1] and not any(n_var in x for x in v[-1:]) \
                    and not any(k_var in x for x in v[:-1]):
                weight_vars = set().union(*v)
            elif not uses_n and v and k_var in v[-1]:
                vector = True
        if weight_vars is None or not vector:
            return None
        # Leading axes: extent 1, or a batch with its own weight matrix (one query's heads against
        # their KV cache).  A leading axis the weight does not depend on is a row axis: a matmul.
        for iv in block.iter_vars[:-2]:
            ext = iv.dom.extent
            if not (isinstance(ext, tirx.IntImm) and int(ext) == 1) and iv.var not in weight_vars:
                return None
        lanes = vector_lanes(target, 32)
        *lead_loops, ln, lk = sch.get_loops(red.block_rv)
        k_ext, n_ext = _extent(sch, lk), _extent(sch, ln)
        if k_ext is None or k_ext % lanes != 0:
            return None
        rows = next((r for r in (self.rows, 2, 1) if n_ext is not None and n_ext % r == 0), 1)
        epis = infos[1:]  # elementwise (checked by _product_then_epilogue)
        for e in epis[:-1]:
            sch.compute_inline(e.block_rv)
        rb = red.block_rv
        _ko, kv = sch.split(lk, [None, lanes])
        rf = sch.rfactor(kv, 0)
        *rlead, rn, rko, rkv = sch.get_loops(rf)
        no, ni = sch.split(rn, [None, rows])
        sch.reorder(no, rko, ni, rkv)
        outer = sch.fuse(*rlead, no) if rlead else no
        sch.parallel(outer)
        sch.unroll(ni)
        sch.vectorize(rkv)
        sch.set_scope(rf, 0, "local")
        sch.reverse_compute_at(rb, outer)
        floops = list(sch.get_loops(rb))
        depth = next(i for i, lp in enumerate(floops) if sch.get(lp).same_as(sch.get(outer)))
        inner = floops[depth + 1:]
        f_lane = inner[0]
        if len(inner) == 2:
            sch.reorder(inner[1], f_lane)  # per output row: sum its partial-sum lanes
        sch.decompose_reduction(rf, rko)
        sch.decompose_reduction(rb, f_lane)
        if epis:
            last = epis[-1].block_rv
            sch.reverse_compute_at(last, outer)
        return sch


class VecMatRule(_CpuRule):
    """Batched vector x ``[K, N]`` matrix with no row axis: ``o[b.., n] = sum_k a[b.., k] * m[b.., k, n]``
    (a single query's attention weights times its values ``[S, head_dim]``).

    Per batch (parallel): accumulate the matrix rows scaled by ``a[k]`` into ``N`` accumulators in
    vector registers (``N`` static, a multiple of the vector width, at most ``max_n``), then the
    epilogue.  dlight has no rule for this outer-reduction shape and ``MatmulRule`` needs a row axis.
    """

    def __init__(self, max_n: int = 256):
        self.max_n = max_n

    def _apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        found = _product_then_epilogue(func)
        if found is None:
            return None
        sch, infos, block = found
        rb = infos[0].block_rv
        iters = [iv.var for iv in block.iter_vars]
        if len(iters) < 3:
            return None
        n_var, k_var = iters[-2], iters[-1]
        vector = matrix = False
        for r in block.reads:
            v = _buffer_var_set(r)
            if len(v) >= 2 and n_var in v[-1] and k_var in v[-2] and not any(n_var in x for x in v[:-1]):
                matrix = True
            elif v and k_var in v[-1] and not any(n_var in x for x in v):
                vector = True
        lanes = vector_lanes(target, 32)
        *lead, ln, lk = sch.get_loops(rb)
        n_ext = _extent(sch, ln)
        if not (matrix and vector) or n_ext is None or n_ext % lanes or n_ext > self.max_n or not lead:
            return None
        epis = infos[1:]  # elementwise (checked by _product_then_epilogue)
        for e in epis[:-1]:
            sch.compute_inline(e.block_rv)
        sch.reorder(*lead, lk, ln)
        outer = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        sch.parallel(outer)
        chunks, vec = sch.split(ln, [None, lanes])
        sch.unroll(chunks)
        sch.vectorize(vec)
        if epis:
            sch.set_scope(rb, 0, "local")
            last = epis[-1].block_rv
            sch.reverse_compute_at(last, outer)
            _vectorize_last(sch, last, lanes)
        else:
            cw = sch.cache_write(rb, 0, "local")
            sch.reverse_compute_at(cw, outer)
            _vectorize_last(sch, cw, lanes)
        init = sch.decompose_reduction(rb, lk)
        sch.vectorize(sch.get_loops(init)[-1])
        return sch


class RowReductionRule(dl.cpu.Reduction):
    """dlight's CPU ``Reduction`` rule (softmax, layer norm: parallel over rows), plus the one-row case.

    With a single row (a decode step's ``[1, 1, 768]`` layer norm) the rows disappear when the
    PrimFunc is normalized, and dlight then parallelizes over the *output elements*, recomputing
    the row's mean and variance for each of them (768x the work).  A single row is a few hundred
    elements: it is scheduled serially here, reductions unrolled by vector-width chunks and the
    elementwise blocks vectorized.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or len(infos) < 2 or all(b.is_injective() for b in infos):
            return None
        if not infos[-1].is_injective():
            return None
        one_row = True
        for b in infos:
            if b.is_injective():
                continue
            for iv in sch.get(b.block_rv).iter_vars:
                ext = iv.dom.extent
                if iv.iter_type == tirx.IterVar.DataPar and not (isinstance(ext, tirx.IntImm) and int(ext) == 1):
                    one_row = False
        if not one_row:
            try:
                return super().apply(func, target, tunable)
            except s_tir.ScheduleError:
                return None
        lanes = vector_lanes(target, 32)
        for b in infos:
            if b.is_injective():
                self._vectorize_inner(sch, b.block_rv, lanes)
            else:
                self._unroll_reduction_inner(sch, b.block_rv, lanes)
        return sch


def _vectorize_last(sch: s_tir.Schedule, block: Any, lanes: int) -> None:
    loops = sch.get_loops(block)
    ext = _extent(sch, loops[-1])
    if ext is not None and ext % lanes == 0:
        _, v = sch.split(loops[-1], [None, lanes])
        sch.vectorize(v)


PARALLEL_PANELS = 32  # a parallel loop over at least this many panel tasks balances on up to 16 cores
SERIAL_ELEMENTS = 8192  # an elementwise kernel with at most this many (static) outputs runs on the calling thread


def _static_size(sch: s_tir.Schedule, loops: list[Any]) -> int | None:
    size = 1
    for lp in loops:
        ext = _extent(sch, lp)
        if ext is None:
            return None
        size *= ext
    return size


def _whole_tiles(extent: Any, lanes: int) -> bool:
    """True when ``extent`` is whole tiles of ``lanes``: static and more than one, or symbolic and provably so."""
    if isinstance(extent, int):
        return extent % lanes == 0 and extent > lanes
    return divisible(extent, lanes)


def _transpose_tiles(sch: s_tir.Schedule, block: Any, lanes: int, par: bool) -> bool:
    """Schedule a transpose of the last two axes in tiles of ``lanes`` output columns; True when it applies.

    The output's last axis reads an input with a stride and its second-to-last axis is that input's
    contiguous one (attention's ``k^T``: ``[B, H, D, L]`` from the linear's ``[B, L, H * D]``).  Vectorized
    along the whole last axis, every output row gathered ``L`` input rows again (the K transpose 0.19 ms
    per layer at L = 384, one thread); in column tiles the ``lanes`` input rows stay in L1 for all of
    ``D``: 0.062 ms.  A symbolic last axis qualifies when it is provably whole tiles (an any-length
    build's keys padded to whole panels, ``(L + 31) // 32 * 32``: 189 -> 39 us per layer at L = 384)."""
    iters = get_sblock_info(sch, block).iters
    if len(iters) < 2 or not isinstance(iters[-2].dom, int) or iters[-2].dom < 2 \
            or not _whole_tiles(iters[-1].dom, lanes):
        return False
    last, second = iters[-1].var, iters[-2].var

    def uses(e: Any, v: Any) -> bool:
        return any(u.same_as(v) for u in collect_vars_used_in_prim_expr(e))

    for r in sch.get(block).reads:
        idx = [rg.min for rg in r.region]
        if idx and uses(idx[-1], second) and not uses(idx[-1], last) and any(uses(i, last) for i in idx[:-1]):
            lo, li = sch.split(iters[-1].loop_rv, [None, lanes])
            sch.reorder(lo, iters[-2].loop_rv)
            # a symbolic tile count stays its own loop: fused in, every index divides by a symbolic
            # extent, and LLVM then scalarizes the tile (an idiv per element: 660 us instead of 39)
            fused = sch.get_loops(block)[:-2 if isinstance(iters[-1].dom, int) else -3]
            outer = sch.fuse(*fused) if fused else lo
            if par:
                sch.parallel(outer)
            sch.vectorize(li)
            return True
    return False


def _schedule_spatial(sch: s_tir.Schedule, block: Any, lanes: int, *, fuse: bool = True) -> None:
    """Parallel outer loop, vectorized inner loop; serial when the whole kernel is small (a decode step's
    one-row residual add, rotary, SwiGLU: a parallel launch costs more than their few KB of work)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    size = _static_size(sch, loops)
    par = size is None or size > SERIAL_ELEMENTS
    if fuse and _transpose_tiles(sch, block, lanes, par):
        return
    if len(loops) > 1:
        outer = sch.fuse(*loops[:-1]) if fuse else loops[0]
        if par:
            sch.parallel(outer)
        inner = loops[-1]
    else:
        inner = loops[0]
    ext = _extent(sch, inner)
    if ext is None and len(loops) > 1:
        # a symbolic inner extent stays a plain loop for LLVM's vectorizer (whole vectors, then a scalar tail):
        # split into vectors here it needs a predicate, and TVM runs a predicated vector loop lane by lane
        # (an any-length BERT mask [B, 1, S, S]: 0.83 ms at S = 384, as a plain loop 0.004 ms)
        return
    if ext is None or ext > lanes:
        o, v = sch.split(inner, [None, lanes])
        sch.vectorize(v)
        if len(loops) == 1 and par:
            sch.parallel(o)
    elif ext >= 2:
        sch.vectorize(inner)


class ElementwiseRule(_CpuRule):
    """Spatial-only PrimFuncs: inline chains, then parallel outer loops, vectorized inner loop."""

    def _apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        try:
            return self._schedule(func, target, fuse=True)
        except InternalError:
            # TVM's iter-map check cannot always fuse loops whose symbolic extents are equal but written
            # differently (wav2vec2's ((samples // 4 + 1) // 2) against (samples + 4) // 8): parallel
            # over the outermost loop alone then
            return self._schedule(func, target, fuse=False)

    def _schedule(self, func: tirx.PrimFunc, target: Target, *, fuse: bool) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or not infos or any(not b.is_injective() for b in infos):
            return None
        lanes = vector_lanes(target, 32)
        blocks = [b.block_rv for b in infos]
        for b in blocks[:-1]:
            try:
                sch.compute_inline(b)
            except Exception:  # noqa: BLE001 - stays a separate stage
                _schedule_spatial(sch, b, lanes, fuse=fuse)
        _schedule_spatial(sch, blocks[-1], lanes, fuse=fuse)
        return sch


def default_rules() -> list[dl.ScheduleRule]:
    """The rule list applied by ``build(..., tuning off)``: most specific first."""
    from ctc.backends.tvm.conv_kernels import DepthwiseConvRule

    return [GemvRule(), MatmulRule(), VecMatRule(), DepthwiseConvRule(), dl.cpu.GEMV(), RowReductionRule(),
            ElementwiseRule()]
