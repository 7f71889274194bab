"""Resource and latency model of the fpga target's kernels, read off the lowered TIR that is printed as C.

Why from the TIR: the model and the emitted C then describe the same loop nest, tiling and pragmas.
For one kernel on one board it estimates:

* **compute cycles** -- a pipelined loop of ``T`` iterations costs ``(T - 1) * II + D`` (``D``: the
  body's critical path, from the operator latencies in :data:`LATENCY`); loops inside it are
  unrolled; ``II`` is 1 unless the body carries a recurrence (it reads and writes the same element
  every iteration, e.g. a float accumulator: ``II`` is then the adder's latency, since the integer
  model fixes the summation order).  A plain loop costs ``T * (body + 1)``; a loop unrolled ``U``
  times outside a pipeline ``ceil(T / U) * body``; sequential statements add up.  Loops that only
  move data across the chip boundary (every store writes on-chip memory from off-chip data or the
  other way round: tile loads and stores) are DMA bursts: they count as traffic, not compute;
* **off-chip bytes** -- every load from or store to a kernel argument (DDR/HBM), times its trip
  count; **memory cycles** = bytes / (bandwidth / clock);
* **latency** = ``max(compute, memory) + DRAM_LATENCY``: tiles are double buffered, so transfers
  overlap compute (the overlap from pipelining) and only one DRAM round trip is exposed; the
  **bound** is whichever of compute and memory is larger;
* **DSPs** -- operators in pipelined bodies (times their unrolled copies) at :data:`DSP_COST` each;
  integer multipliers by operand width (two 8-bit products per DSP48E2, one per DSP48E1, see
  :class:`~.boards.Board`); sequential loops do not share operators;
* **on-chip bytes** -- the kernel's local arrays (tiles, accumulators, row statistics); block RAMs
  counted per partition bank (arrays under :data:`LUTRAM_BYTES` per bank go to LUTs/registers).

Operator latencies follow Vitis HLS's defaults for fp32 cores near 200-300 MHz; DSP costs of fp32
operators are the Floating-Point Operator's full-DSP configurations (PG060): add 2, multiply 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ctc.backends.hls.boards import BRAM36_BYTES, Board
from ctc.backends.hls.cgen import _annot, is_pipelined, root_name, storage

__all__ = ["DRAM_LATENCY", "DSP_COST", "KernelCost", "LATENCY", "LOOP_OVERHEAD", "kernel_cost"]

LATENCY = {"fadd": 4, "fmul": 3, "fdiv": 12, "fsqrt": 12, "fcmp": 1, "fcvt": 4, "imul": 3, "iadd": 1, "icmp": 1,
           "load": 2, "store": 1, "other": 1}
"""Operator latencies in cycles (fp32 add/sub 4, mul 3, div and sqrt 12, int->float 4; BRAM read 2)."""
DSP_COST = {"fadd": 2.0, "fmul": 3.0}
"""DSP slices per fp32 operator instance (PG060 full-DSP cores); integer multipliers: see Board."""
LOOP_OVERHEAD = 1
"""Cycles a non-pipelined loop adds per iteration (exit test and index update)."""
DRAM_LATENCY = 64
"""Cycles of one exposed off-chip round trip per kernel call (first tile in, last tile out)."""
LUTRAM_BYTES = 512
"""Per-bank size below which an array is built from LUTs/registers rather than block RAM."""

COUNTED = ("fadd", "fmul", "fdiv", "fsqrt", "imul", "iadd", "fcmp", "fcvt")
DT_BYTES = {"float32": 4, "float64": 8, "int8": 1, "uint8": 1, "int16": 2, "int32": 4, "int64": 8, "bool": 1,
            "uint32": 4}


@dataclass
class KernelCost:
    """The model's estimate for one kernel (one call) on one board."""

    name: str
    compute_cycles: int
    memory_cycles: int
    offchip_bytes: int
    ops: int
    dsps: int
    onchip_bytes: int
    bram36: int
    latency_cycles: int
    bound: str
    ops_by_kind: dict[str, int] = field(default_factory=dict)

    def latency_s(self, board: Board) -> float:
        return self.latency_cycles / (board.clock_mhz * 1e6)

    def fits(self, board: Board, utilization: float = 1.0) -> str | None:
        """None when one instance fits ``utilization`` of the board, else what overflows."""
        if self.dsps > utilization * board.dsps:
            return f"{self.dsps} DSPs > {utilization:.0%} of {board.dsps}"
        if self.onchip_bytes > utilization * board.onchip_bytes:
            return f"{self.onchip_bytes} on-chip bytes > {utilization:.0%} of {board.onchip_bytes}"
        return None

    def to_json(self) -> dict[str, Any]:
        return {"kernel": self.name, "compute_cycles": self.compute_cycles, "memory_cycles": self.memory_cycles,
                "offchip_bytes": self.offchip_bytes, "ops": self.ops, "dsps": self.dsps,
                "onchip_bytes": self.onchip_bytes, "bram36": self.bram36, "latency_cycles": self.latency_cycles,
                "bound": self.bound}


def _dtype(e: Any) -> str:
    ty = getattr(e, "ty", None)
    return str(getattr(ty, "dtype", "")) if ty is not None else str(getattr(e, "dtype", ""))


class _Walker:
    def __init__(self, func: Any, board: Board):
        self.board = board
        self.params = {root_name(p) for p in func.params}
        self.local_bytes: dict[str, int] = {}
        self.local_bram = 0
        self.offchip = 0
        self.ops = 0
        self.kinds: dict[str, int] = {}
        self.dsp = 0.0
        part = dict(func.attrs["hls.partition"]) if func.attrs is not None and "hls.partition" in func.attrs else {}
        self.partition = {str(k): int(v[1]) for k, v in part.items()}
        bits = func.attrs["hls.operand_bits"] if func.attrs is not None and "hls.operand_bits" in func.attrs else None
        self.operand_bits = (int(bits[0]), int(bits[1])) if bits is not None else None

    # ------------------------------------------------------------------ expressions
    def _op_kind(self, e: Any) -> str | None:
        t = type(e).__name__
        f = "float" in _dtype(e)
        if t in ("Add", "Sub"):
            return "fadd" if f else "iadd"
        if t == "Mul":
            return "fmul" if f else "imul"
        if t in ("Div", "FloorDiv", "FloorMod", "Mod"):
            return "fdiv" if f else "other"
        if t in ("Min", "Max", "LT", "LE", "GT", "GE", "EQ", "NE", "Select"):
            return "fcmp" if f or any("float" in _dtype(x) for x in (getattr(e, "a", None),) if x is not None) \
                else "icmp"
        if t == "Cast":
            return "fcvt" if ("float" in _dtype(e)) != ("float" in _dtype(e.value)) else None
        if t == "Call":
            name = str(getattr(e.op, "name", "")).split(".")[-1]
            return {"sqrt": "fsqrt", "floor": "other", "nearbyint": "other"}.get(name, "other")
        return None

    def _children(self, e: Any) -> list[Any]:
        t = type(e).__name__
        if t in ("BufferLoad", "TensorLoad"):
            return list(e.indices)
        if t == "Select":
            return [e.condition, e.true_value, e.false_value]
        if t == "Cast":
            return [e.value]
        if t == "Call":
            return list(e.args)
        if t in ("Not", "BitwiseNot"):
            return [e.a]
        if hasattr(e, "a") and hasattr(e, "b"):
            return [e.a, e.b]
        return []

    def depth(self, e: Any) -> int:
        t = type(e).__name__
        own = LATENCY["load"] if t in ("BufferLoad", "TensorLoad") else \
            0 if _is_index(e) else LATENCY.get(self._op_kind(e) or "", 0)
        if t in ("BufferLoad", "TensorLoad"):
            return own  # index arithmetic is address logic, in parallel with the access
        kids = self._children(e)
        return own + (max(self.depth(k) for k in kids) if kids else 0)

    def count(self, e: Any, times: int, copies: int, pipelined: bool) -> tuple[int, int]:
        """Tally operators of ``e``; returns (off-chip reads, on-chip reads) of one evaluation."""
        t = type(e).__name__
        off = on = 0
        if t in ("BufferLoad", "TensorLoad"):
            src = e.buffer if t == "BufferLoad" else e.source
            if root_name(src) in self.params:
                off += 1
                self.offchip += times * DT_BYTES.get(_dtype(e), 4)
            else:
                on += 1
            return off, on
        k = self._op_kind(e)
        if k in COUNTED and not _is_index(e):
            self.ops += times
            self.kinds[k] = self.kinds.get(k, 0) + times
            if pipelined or copies > 1:
                self.dsp += copies * self._dsp(e, k)
        for c in self._children(e):
            a, b = self.count(c, times, copies, pipelined)
            off, on = off + a, on + b
        return off, on

    def _dsp(self, e: Any, kind: str) -> float:
        if kind == "imul":
            a, b = self.operand_bits or (_width(e.a), _width(e.b))
            return 1.0 / self.board.products_per_dsp(a, b)
        return DSP_COST.get(kind, 0.0)

    # ------------------------------------------------------------------ statements
    def stmt(self, s: Any, times: int, in_pipe: bool, copies: int) -> int:  # noqa: C901 - one branch per kind
        t = type(s).__name__
        if t == "SeqStmt":
            return sum(self.stmt(c, times, in_pipe, copies) for c in s.seq)
        if t == "For":
            ext = int(s.extent)
            if in_pipe:  # unrolled inside the pipeline: parallel copies of the body, its depth once
                return self.stmt(s.body, times * ext, True, copies * ext)
            if is_pipelined(s, False):
                dma = _is_dma(s, self.params)
                body_depth = self.stmt(s.body, times * ext, True, copies) if not dma else \
                    self._dma(s.body, times * ext)
                if dma:
                    return 0
                ii = max(_annot(s, "hls.pipeline") or 1, self._recurrence(s))
                return (ext - 1) * ii + body_depth
            u = _annot(s, "hls.unroll")
            if _is_dma(s, self.params):
                self._dma(s.body, times * ext)
                return 0
            if u:
                return math.ceil(ext / u) * self.stmt(s.body, times * ext, False, copies * u)
            return ext * (self.stmt(s.body, times * ext, False, copies) + LOOP_OVERHEAD)
        if t == "BufferStore":
            self._store(s, times)
            self.count(s.value, times, copies, in_pipe)
            return self.depth(s.value) + LATENCY["store"]
        if t == "Bind":
            self.count(s.value, times, copies, in_pipe)
            return self.depth(s.value)
        if t == "IfThenElse":
            a = self.stmt(s.then_case, times, in_pipe, copies)
            b = self.stmt(s.else_case, times, in_pipe, copies) if s.else_case is not None else 0
            return max(a, b)
        if t == "AllocBuffer":
            b = s.buffer
            n = int(math.prod(int(x) for x in b.shape)) * DT_BYTES.get(str(b.dtype), 4)
            self.local_bytes[storage(b)] = n
            banks = max(1, self.partition.get(str(b.name), 1))
            per = n / banks
            self.local_bram += 0 if per <= LUTRAM_BYTES else banks * math.ceil(per / BRAM36_BYTES)
            return 0
        if t in ("DeclBuffer", "Evaluate"):
            return 0
        if t == "AttrStmt":
            return self.stmt(s.body, times, in_pipe, copies)
        raise ValueError(f"perf model: TIR statement {t} not modelled")

    def _store(self, s: Any, times: int) -> None:
        if root_name(s.buffer) in self.params:
            self.offchip += times * DT_BYTES.get(str(s.buffer.dtype), 4)

    def _dma(self, body: Any, times: int) -> int:
        """Tally the traffic of a boundary-crossing loop nest (no compute cycles, no operators)."""
        saved = (self.ops, dict(self.kinds), self.dsp)
        self.stmt(body, times, True, 1)
        self.ops, self.kinds, self.dsp = saved
        return 0

    def _recurrence(self, loop: Any) -> int:
        """II forced by a loop-carried dependence: a store whose value reads the same element (at an index
        that does not depend on the pipelined loop's variable): the latency from that read to the write."""
        var = str(loop.loop_var.name)
        binds: dict[str, set[str]] = {}
        for b in _binds(loop.body):  # CSE'd index variables: what they depend on
            deps = _var_names(b.value)
            binds[str(b.var.name)] = set().union(deps, *(binds.get(d, set()) for d in deps))
        worst = 1
        for st in _stores(loop.body):
            idx = st.indices[0]
            names = _var_names(idx)
            if var in set().union(names, *(binds.get(n, set()) for n in names)):
                continue
            chain = self._chain(st.value, storage(st.buffer), str(idx))
            if chain is not None:
                worst = max(worst, chain + LATENCY["store"])
        return worst

    def _chain(self, e: Any, key: str, idx: str) -> int | None:
        """Latency from the load of ``key[idx]`` inside ``e`` to ``e``'s result (None: not read)."""
        t = type(e).__name__
        if t in ("BufferLoad", "TensorLoad"):
            src = e.buffer if t == "BufferLoad" else e.source
            return 0 if storage(src) == key and str(e.indices[0]) == idx else None
        found = [c for c in (self._chain(k, key, idx) for k in self._children(e)) if c is not None]
        if not found:
            return None
        return max(found) + (0 if _is_index(e) else LATENCY.get(self._op_kind(e) or "", 0))


def _is_index(e: Any) -> bool:
    return _dtype(e) in ("int64",)


def _width(e: Any) -> int:
    """Operand width of a multiplier input: the narrowest integer it was cast from (8 for u8/i8 data)."""
    t = type(e).__name__
    if t == "Cast":
        return _width(e.value)
    if t in ("BufferLoad", "TensorLoad"):
        return 8 * DT_BYTES.get(_dtype(e), 4)
    return 32


def _walk(s: Any, out: list[Any], kinds: tuple[str, ...]) -> None:
    t = type(s).__name__
    if t in kinds:
        out.append(s)
    for attr in ("seq",):
        if hasattr(s, attr) and t == "SeqStmt":
            for c in s.seq:
                _walk(c, out, kinds)
            return
    for attr in ("body", "then_case", "else_case", "value", "condition", "true_value", "false_value", "a", "b"):
        c = getattr(s, attr, None)
        if c is not None and not isinstance(c, (int, float, str)):
            _walk(c, out, kinds)
    if t in ("Call",):
        for c in s.args:
            _walk(c, out, kinds)
    if t in ("BufferLoad", "TensorLoad", "BufferStore"):
        for c in s.indices:
            _walk(c, out, kinds)


def _stores(s: Any) -> list[Any]:
    out: list[Any] = []
    _walk(s, out, ("BufferStore",))
    return out


def _binds(s: Any) -> list[Any]:
    out: list[Any] = []
    _walk(s, out, ("Bind",))
    return out


def _loads(e: Any) -> list[Any]:
    out: list[Any] = []
    _walk(e, out, ("BufferLoad", "TensorLoad"))
    return out


def _var_names(e: Any) -> set[str]:
    out: list[Any] = []
    _walk(e, out, ("Var",))
    return {str(v.name) for v in out} | ({str(e.name)} if type(e).__name__ == "Var" else set())


def _is_dma(loop: Any, params: set[str]) -> bool:
    """Every store of the nest crosses the chip boundary (on-chip <- off-chip only, or the reverse)."""
    stores = _stores(loop.body)
    if not stores:
        return False
    for st in stores:
        dst_off = root_name(st.buffer) in params
        srcs = {root_name(ld.buffer if type(ld).__name__ == "BufferLoad" else ld.source) in params
                for ld in _loads(st.value)}
        if not srcs or srcs != {not dst_off}:
            return False
    return True


def kernel_cost(name: str, func: Any, board: Board) -> KernelCost:
    """The model's estimate for one call of the lowered PrimFunc ``func`` on ``board``."""
    w = _Walker(func, board)
    compute = w.stmt(func.body, 1, False, 1)
    mem = math.ceil(w.offchip / board.bytes_per_cycle)
    latency = max(compute, mem) + DRAM_LATENCY
    return KernelCost(name, int(compute), int(mem), int(w.offchip), int(w.ops), int(math.ceil(w.dsp)),
                      int(sum(w.local_bytes.values())), int(w.local_bram), int(latency),
                      "compute" if compute >= mem else "memory", dict(w.kinds))
