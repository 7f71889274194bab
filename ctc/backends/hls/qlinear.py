"""The integer GEMM engine of ``quant_linear`` for the fpga target: a tiled TIR kernel per layer.

Why a template: the tile loop nest *is* the HLS schedule (on-chip buffers sized by the tiles,
which loop is pipelined, how many MAC lanes are unrolled), so it is written out as TVMScript
with the tiling as parameters, like :mod:`ctc.backends.tvm.int_kernels` does for the CPU.  The
PrimFunc joins the Relax module built by the shared lowering (:mod:`ctc.backends.tvm.lower`)
and is printed to C by :mod:`.cgen`.

Loop nest (``M`` rows, ``K`` inputs, ``N`` outputs; tiling ``TM, TN, TK`` and lanes ``PN, PE``)::

    for m0 < M/TM:                               # row block
      xq[TM][K] <- quantize(x rows)              # u8 activations on chip, per-segment row sums
      for n0 < N/TN:                             # output column block
        yt[TM][TN] = bias                        # PE lanes
        for each K-segment s (constant activation cluster and weight group):
          acc[TM][TN] = 0                        # PN lanes
          for each k tile (TK wide, the segment's last one shorter):
            wt[TK][TN] <- weights                # burst from off-chip
            for k < TK: for m < TM (PIPELINE II=1): for n < TN (UNROLL PN): acc += xq * wt
          yt += (s_c * w_scale[n, g]) * f32(acc - z_c * wsum_s[n] - zw[n, g] * (xsum_s[m] - len_s * z_c))
        y[rows, cols] <- yt                      # PE lanes

which is the integer model of :mod:`.exact`.  The tiling must divide ``M`` and ``N``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctc.backends.hls.exact import qlinear_segments

__all__ = ["QLinearShape", "Tiling", "candidate_tilings", "default_tiling", "prepack", "qlinear_cost", "qlinear_cycles",
           "qlinear_primfunc", "qlinear_source"]


@dataclass(frozen=True)
class QLinearShape:
    """Everything static about one quant_linear layer of a build."""

    m: int
    k: int
    n: int
    w_bits: int
    a_bits: int
    group_size: int
    w_symmetric: bool
    clusters: tuple[int, ...]

    @property
    def segments(self) -> list[tuple[int, int, int, int]]:
        return qlinear_segments(self.k, self.group_size, self.clusters)

    @property
    def groups(self) -> int:
        return 1 if self.group_size == -1 else -(-self.k // self.group_size)

    @property
    def num_clusters(self) -> int:
        return len(self.clusters) or 1

    @property
    def packed_k(self) -> int:
        return (self.k + 1) // 2 if self.w_bits <= 4 else self.k

    @property
    def macs(self) -> int:
        return self.m * self.k * self.n

    @property
    def key(self) -> str:
        """Workload key of the tuning database: shape, widths and the segment layout."""
        seg = ",".join(str(ln) for _, ln, _, _ in self.segments)
        return (f"qlinear:m{self.m}:k{self.k}:n{self.n}:w{self.w_bits}{'s' if self.w_symmetric else 'a'}"
                f":a{self.a_bits}:g{self.group_size}:seg{seg}")


@dataclass(frozen=True)
class Tiling:
    """Tile sizes and parallel lanes of the engine (see the module doc)."""

    tm: int
    tn: int
    tk: int
    pn: int
    pe: int

    def valid_for(self, s: QLinearShape) -> str | None:
        """None when this tiling applies to ``s``, else why not."""
        if s.m % self.tm or s.n % self.tn:
            return f"tiles {self.tm}x{self.tn} must divide M={s.m}, N={s.n}"
        if self.tn % self.pn or self.tn % self.pe:
            return f"lanes PN={self.pn}, PE={self.pe} must divide TN={self.tn}"
        if self.tk < 1:
            return "TK must be positive"
        return None

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.tm, self.tn, self.tk, self.pn, self.pe)


def _divisors(v: int, cap: int) -> list[int]:
    return [d for d in range(1, min(v, cap) + 1) if v % d == 0]


def default_tiling(s: QLinearShape) -> Tiling:
    """The untuned engine: 16-wide tiles with 16 MAC lanes (what a user gets without tuning)."""
    tm = max(d for d in _divisors(s.m, 16))
    tn = max(d for d in _divisors(s.n, 16))
    return Tiling(tm, tn, min(16, s.k), tn, 1)


def candidate_tilings(s: QLinearShape) -> list[Tiling]:
    """The search space: power-of-two-ish tiles that divide M and N, lanes dividing TN."""
    def pick(v: int, cap: int) -> list[int]:
        ds = _divisors(v, cap)
        return sorted({d for d in ds if d & (d - 1) == 0} | {max(ds)})

    out = []
    for tm in [v for v in pick(s.m, 512) if v >= min(8, s.m)]:
        for tn in [v for v in pick(s.n, 1024) if v >= min(16, s.n)]:
            for tk in sorted({t for t in (16, 32, 64, 128, 256, 512) if t <= max(16, s.k)} | {min(s.k, 16)}):
                for pn in sorted({p for p in (8, 16, 32, 64, 128, 256, 512, 1024) if p <= tn and tn % p == 0} | {tn}):
                    for pe in [p for p in (1, 2, 4, 8, 16) if p <= tn and tn % p == 0]:
                        out.append(Tiling(tm, tn, tk, pn, pe))
    return out


# --------------------------------------------------------------------------- constants
def prepack(s: QLinearShape, qweight: np.ndarray, w_zero: np.ndarray) -> np.ndarray:
    """``wsum [S, N]`` int32: each segment's sum of the stored integer weights per output channel."""
    import torch

    from ctc.ir import quant as Q

    q = Q.unpack_weight(torch.from_numpy(np.ascontiguousarray(qweight)), s.w_bits, s.k).to(torch.int64).numpy()
    out = np.zeros((len(s.segments), s.n), np.int64)
    for i, (k0, ln, _, _) in enumerate(s.segments):
        out[i] = q[:, k0:k0 + ln].sum(axis=1)
    del w_zero
    return out.astype(np.int32)


# --------------------------------------------------------------------------- TVMScript
def _i(v: int) -> str:
    return f"T.int64({int(v)})"


def qlinear_source(s: QLinearShape, t: Tiling, name: str = "qlinear") -> str:
    """TVMScript of the engine for layer ``s`` with tiling ``t`` (constants baked in)."""
    why = t.valid_for(s)
    if why:
        raise ValueError(f"qlinear tiling {t}: {why}")
    M, K, N, S = s.m, s.k, s.n, len(s.segments)
    TM, TN, TK, PN, PE = t.as_tuple()
    qmax = (1 << s.a_bits) - 1
    wdt = "uint8" if s.w_bits <= 4 else "int8"
    asym = not s.w_symmetric
    pipe = '{"hls.pipeline": 1}'
    L = [
        "@T.prim_func(s_tir=True)",
        f'def {name}(x: T.Buffer(({_i(M)}, {_i(K)}), "float32"), qw: T.Buffer(({_i(N)}, {_i(s.packed_k)}), "{wdt}"), '
        f'w_scale: T.Buffer(({_i(N)}, {_i(s.groups)}), "float32"), '
        f'w_zero: T.Buffer(({_i(N)}, {_i(s.groups)}), "int8"), '
        f'bias: T.Buffer(({_i(N)},), "float32"), act_scale: T.Buffer(({_i(s.num_clusters)},), "float32"), '
        f'act_zero: T.Buffer(({_i(s.num_clusters)},), "int32"), wsum: T.Buffer(({_i(S)}, {_i(N)}), "int32"), '
        f'y: T.Buffer(({_i(M)}, {_i(N)}), "float32")):',
        '    T.func_attr({"tirx.noalias": True, "hls.kernel": "qlinear", '
        f'"hls.tiling": [{TM}, {TN}, {TK}, {PN}, {PE}], "hls.operand_bits": [{s.a_bits}, {s.w_bits}], '
        f'"hls.partition": {{"wt": [1, {PN}], "acc": [1, {max(PN, PE)}], "yt": [1, {PE}]}}}})',
        f'    xq = T.alloc_buffer(({_i(TM)}, {_i(K)}), "uint8", scope="local")',
        f'    wt = T.alloc_buffer(({_i(TK)}, {_i(TN)}), "int8", scope="local")',
        f'    acc = T.alloc_buffer(({_i(TM)}, {_i(TN)}), "int32", scope="local")',
        f'    yt = T.alloc_buffer(({_i(TM)}, {_i(TN)}), "float32", scope="local")',
    ]
    if asym:
        L.append(f'    xsum = T.alloc_buffer(({_i(S)}, {_i(TM)}), "int32", scope="local")')
    L.append(f"    for m0 in T.serial({_i(M // TM)}):")
    ind = "        "
    # quantize the row block once: per segment, so each gets its cluster's (scale, zero)
    for si, (k0, ln, c, _g) in enumerate(s.segments):
        if asym:
            L += [f"{ind}for m in T.serial({_i(TM)}, annotations={pipe}):",
                  f"{ind}    xsum[{_i(si)}, m] = 0"]
        rne = f"T.nearbyint(x[m0 * {_i(TM)} + m, {_i(k0)} + k] / act_scale[{_i(c)}])"
        q = (f'T.Cast("uint8", T.min(T.max({rne} + T.Cast("float32", act_zero[{_i(c)}]), T.float32(0)), '
             f'T.float32({qmax})))')
        L += [f"{ind}for m in T.serial({_i(TM)}):",
              f"{ind}    for k in T.serial({_i(ln)}, annotations={pipe}):",
              f"{ind}        xq[m, {_i(k0)} + k] = {q}"]
        if asym:
            L.append(f'{ind}        xsum[{_i(si)}, m] = xsum[{_i(si)}, m] + T.Cast("int32", xq[m, {_i(k0)} + k])')
    L.append(f"{ind}for n0 in T.serial({_i(N // TN)}):")
    ind2 = ind + "    "
    L += [f"{ind2}for m in T.serial({_i(TM)}):",
          f"{ind2}    for n1 in T.serial({_i(TN // PE)}, annotations={pipe}):",
          f'{ind2}        for n2 in T.serial({_i(PE)}, annotations={{"hls.unroll": {PE}}}):',
          f"{ind2}            yt[m, n1 * {_i(PE)} + n2] = bias[n0 * {_i(TN)} + n1 * {_i(PE)} + n2]"]
    for si, (k0, ln, c, g) in enumerate(s.segments):
        L += [f"{ind2}for m in T.serial({_i(TM)}):",
              f"{ind2}    for n1 in T.serial({_i(TN // PN)}, annotations={pipe}):",
              f'{ind2}        for n2 in T.serial({_i(PN)}, annotations={{"hls.unroll": {PN}}}):',
              f"{ind2}            acc[m, n1 * {_i(PN)} + n2] = 0"]
        full, tail = divmod(ln, TK)
        tiles: list[tuple[str, int, str]] = []
        if full:
            tiles.append((f"for kt in T.serial({_i(full)}):", TK, f"{_i(k0)} + kt * {_i(TK)}"))
        if tail:
            tiles.append(("", tail, _i(k0 + full * TK)))
        for head, tk, kb in tiles:
            ind3 = ind2 + ("    " if head else "")
            if head:
                L.append(f"{ind2}{head}")
            if s.w_bits <= 4:
                kk = f"{kb} + k"
                byte = f'T.Cast("int32", qw[n0 * {_i(TN)} + n, T.floordiv({kk}, {_i(2)})])'
                wv = (f'T.Cast("int8", T.bitwise_and(T.shift_right({byte}, T.Cast("int32", T.floormod({kk}, '
                      f'{_i(2)})) * 4), 15) - 8)')
            else:
                wv = f"qw[n0 * {_i(TN)} + n, {kb} + k]"
            L += [f"{ind3}for k in T.serial({_i(tk)}):",
                  f"{ind3}    for n in T.serial({_i(TN)}, annotations={pipe}):",
                  f"{ind3}        wt[k, n] = {wv}",
                  f"{ind3}for k in T.serial({_i(tk)}):",
                  f"{ind3}    for n1 in T.serial({_i(TN // PN)}):",
                  f"{ind3}        for m in T.serial({_i(TM)}, annotations={pipe}):",
                  f'{ind3}            for n2 in T.serial({_i(PN)}, annotations={{"hls.unroll": {PN}}}):',
                  f"{ind3}                acc[m, n1 * {_i(PN)} + n2] = acc[m, n1 * {_i(PN)} + n2] + "
                  f'T.Cast("int32", xq[m, {kb} + k]) * T.Cast("int32", wt[k, n1 * {_i(PN)} + n2])']
        col = f"n0 * {_i(TN)} + n1 * {_i(PE)} + n2"
        corr = f"acc[m, n1 * {_i(PE)} + n2] - act_zero[{_i(c)}] * wsum[{_i(si)}, {col}]"
        if asym:
            corr += (f' - T.Cast("int32", w_zero[{col}, {_i(g)}]) * (xsum[{_i(si)}, m] - T.int32({ln}) * '
                     f'act_zero[{_i(c)}])')
        L += [f"{ind2}for m in T.serial({_i(TM)}):",
              f"{ind2}    for n1 in T.serial({_i(TN // PE)}, annotations={pipe}):",
              f'{ind2}        for n2 in T.serial({_i(PE)}, annotations={{"hls.unroll": {PE}}}):',
              f"{ind2}            yt[m, n1 * {_i(PE)} + n2] = yt[m, n1 * {_i(PE)} + n2] + "
              f'(act_scale[{_i(c)}] * w_scale[{col}, {_i(g)}]) * T.Cast("float32", {corr})']
    L += [f"{ind2}for m in T.serial({_i(TM)}):",
          f"{ind2}    for n1 in T.serial({_i(TN // PE)}, annotations={pipe}):",
          f'{ind2}        for n2 in T.serial({_i(PE)}, annotations={{"hls.unroll": {PE}}}):',
          f"{ind2}            y[m0 * {_i(TM)} + m, n0 * {_i(TN)} + n1 * {_i(PE)} + n2] = yt[m, n1 * {_i(PE)} + n2]"]
    return "\n".join(L) + "\n"


def qlinear_primfunc(s: QLinearShape, t: Tiling, name: str = "qlinear") -> Any:
    """The parsed PrimFunc of :func:`qlinear_source`."""
    import tvm

    return tvm.script.from_source(qlinear_source(s, t, name))



# --------------------------------------------------------------------------- closed-form model
def qlinear_cycles(s: QLinearShape, t: Tiling) -> dict[str, int]:
    """The engine's compute cycles and off-chip bytes in closed form: the rules of :mod:`.perf` applied
    to the loop nest of :func:`qlinear_source` (the tuner evaluates thousands of tilings with it; a
    test checks it against the model's walk of the printed TIR)."""
    from ctc.backends.hls.perf import LATENCY as L
    from ctc.backends.hls.perf import LOOP_OVERHEAD as O

    TM, TN, TK, PN, PE = t.as_tuple()
    asym = not s.w_symmetric
    d_mac = L["iadd"] + L["imul"] + L["load"] + L["store"]
    corr = L["iadd"] + L["imul"] + L["load"]  # acc - z_c * wsum
    if asym:  # ... - zw * (xsum - len * z_c)
        corr = L["iadd"] + max(corr, L["imul"] + L["iadd"] + L["imul"] + L["load"])
    d_epi = L["fadd"] + L["fmul"] + max(L["fmul"] + L["load"], L["fcvt"] + corr) + L["store"]
    def loop(ext: int, body: int) -> int:  # a plain loop; TVM drops loops of one iteration
        return body if ext == 1 else ext * (body + O)

    per_m0 = 0
    if asym:
        d_q = (L["fcvt"] + 2 * L["fcmp"] + L["fadd"] + L["other"] + L["fdiv"] + L["load"] + L["store"]
               + L["iadd"] + L["load"] + L["store"])
        ii_q = L["iadd"] + L["store"]
        for _, ln, _, _ in s.segments:
            per_m0 += TM  # xsum[s, :] = 0, pipelined, depth = one store
            per_m0 += loop(TM, (ln - 1) * ii_q + d_q)
    per_n0 = 0
    for _, ln, _, _ in s.segments:
        per_n0 += loop(TM, (TN // PN - 1) + L["store"])  # acc = 0
        full, tail = divmod(ln, TK)
        mac = loop(TN // PN, (TM - 1) + d_mac)  # one k: TN/PN passes of a TM-deep pipeline, PN lanes each
        if full:
            per_n0 += loop(full, loop(TK, mac))
        if tail:
            per_n0 += loop(tail, mac)
        per_n0 += loop(TM, (TN // PE - 1) + d_epi)  # epilogue
    per_m0 += loop(s.n // TN, per_n0)
    cycles = loop(s.m // TM, per_m0)
    epi = 4 * 4 + (1 + 4 if asym else 0)  # per output element and segment: s_c, w_scale, z_c, wsum (+ zw, z_c)
    per_n0_bytes = TM * TN * 4 + TN * s.k + len(s.segments) * TM * TN * epi + TM * TN * 4
    offchip = (s.m // TM) * (TM * s.k * 12 + (s.n // TN) * per_n0_bytes)
    return {"compute_cycles": cycles, "offchip_bytes": offchip}


def qlinear_cost(s: QLinearShape, t: Tiling, board: Any, name: str = "qlinear") -> Any:
    """:class:`~.perf.KernelCost` of the engine in closed form (cycles, bytes, DSPs, on-chip memory)."""
    from ctc.backends.hls.boards import BRAM36_BYTES
    from ctc.backends.hls.perf import DRAM_LATENCY, DSP_COST, LUTRAM_BYTES, KernelCost

    TM, TN, TK, PN, PE = t.as_tuple()
    asym = not s.w_symmetric
    S = len(s.segments)
    c = qlinear_cycles(s, t)
    per_mul = 1.0 / board.products_per_dsp(s.a_bits, s.w_bits)
    macs = sum((ln >= TK) + (ln % TK > 0) for _, ln, _, _ in s.segments)  # MAC loop nests (no sharing)
    epi = 2 * DSP_COST["fmul"] + DSP_COST["fadd"] + (3 if asym else 1) * per_mul
    dsp = macs * PN * per_mul + S * PE * epi + (S * DSP_COST["fadd"] if asym else 0)
    tk_used = max(min(TK, ln) for _, ln, _, _ in s.segments)  # TVM compacts the tile to what is used
    bufs = [(TM * s.k, 1), (tk_used * TN, PN), (TM * TN * 4, max(PN, PE)), (TM * TN * 4, PE)]
    if asym:
        bufs.append((S * TM * 4, 1))
    onchip = sum(b for b, _ in bufs)
    bram = sum(0 if b / k <= LUTRAM_BYTES else k * -(-int(b / k) // BRAM36_BYTES) for b, k in bufs)
    mem_c = math.ceil(c["offchip_bytes"] / board.bytes_per_cycle)
    ops = 2 * s.macs
    lat = max(c["compute_cycles"], mem_c) + DRAM_LATENCY
    return KernelCost(name, c["compute_cycles"], mem_c, c["offchip_bytes"], ops, int(-(-dsp // 1)), onchip, bram, lat,
                      "compute" if c["compute_cycles"] >= mem_c else "memory")
