"""FPGA boards the ``fpga`` target knows: DSP slices, on-chip memory, clock, off-chip bandwidth, widths.

Why: the resource and latency model (:mod:`.perf`) and the tuner (:mod:`.tune`) need the budget
of a real part.  Two presets are shipped, with numbers from the vendors' data sheets:

* ``zc706`` -- Xilinx ZC706 evaluation board, Zynq-7000 XC7Z045-2 (data sheet DS190, board guide
  UG954): 900 DSP48E1 slices (25x18 multipliers, UG479), 545 block RAMs of 36 Kb (19.2 Mb), no
  UltraRAM; the programmable logic's DDR3 SODIMM is 64 bits wide at 1600 MT/s (12.8 GB/s peak);
  200 MHz, the board's fabric reference clock.
* ``u280`` -- Xilinx Alveo U280, XCU280 (Virtex UltraScale+ HBM; card data sheet DS963): 9,024
  DSP48E2 slices (27x18 multipliers, UG579), 2,016 block RAMs of 36 Kb (70.9 Mb) and 960
  UltraRAMs of 288 Kb (270 Mb); 8 GB HBM2 at 460 GB/s peak (32 pseudo channels x 14.375 GB/s,
  UG1393); 300 MHz, the default kernel clock of the card's Vitis platform.

Integer widths: the multiplier operand widths the ctc MAC engine implements (4, 8 and 16 bit
weights or activations).  A DSP48E2 packs two products of operands of at most 8 bits that share
one operand (the INT8 packing of white paper WP486); a DSP48E1 takes one product per slice.
Recipes override any number: ``target fpga board=u280 clock_mhz=250 bandwidth_gbps=38.4``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["BOARDS", "Board", "board_from_options"]

BRAM36_BYTES = 36 * 1024 // 8  # 36 Kb block RAM (data + parity bits)
URAM_BYTES = 288 * 1024 // 8  # 288 Kb UltraRAM


@dataclass(frozen=True)
class Board:
    """One FPGA part on its board: the budget a design must fit and the clock/bandwidth it runs at."""

    name: str
    part: str
    family: str  # "7series" (DSP48E1) or "ultrascale+" (DSP48E2)
    dsps: int
    bram36: int
    uram: int
    clock_mhz: float
    bandwidth_gbps: float  # off-chip, peak, GB/s (1e9 bytes)
    widths: tuple[int, ...]
    memory: str  # what the off-chip bandwidth is
    source: str  # where the numbers come from

    @property
    def onchip_bytes(self) -> int:
        """Block RAM plus UltraRAM bytes."""
        return self.bram36 * BRAM36_BYTES + self.uram * URAM_BYTES

    @property
    def bytes_per_cycle(self) -> float:
        """Off-chip bytes one kernel clock cycle can move at peak bandwidth."""
        return self.bandwidth_gbps * 1e9 / (self.clock_mhz * 1e6)

    def products_per_dsp(self, a_bits: int, b_bits: int) -> int:
        """Integer products one DSP slice computes per cycle for operands of these widths."""
        if self.family == "ultrascale+" and a_bits <= 8 and b_bits <= 8:
            return 2  # WP486: two INT8 products sharing one operand per DSP48E2
        return 1

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["onchip_bytes"] = self.onchip_bytes
        return d


BOARDS: dict[str, Board] = {
    "zc706": Board("zc706", "xc7z045ffg900-2", "7series", dsps=900, bram36=545, uram=0, clock_mhz=200.0,
                   bandwidth_gbps=12.8, widths=(4, 8, 16), memory="PL DDR3 SODIMM, 64 bit at 1600 MT/s",
                   source="DS190 (Zynq-7000), UG954 (ZC706), UG479 (DSP48E1)"),
    "u280": Board("u280", "xcu280-fsvh2892-2L-e", "ultrascale+", dsps=9024, bram36=2016, uram=960, clock_mhz=300.0,
                  bandwidth_gbps=460.0, widths=(4, 8, 16), memory="HBM2 8 GB, 32 pseudo channels x 14.375 GB/s",
                  source="DS963 (Alveo U280), UG1393 (HBM), UG579 (DSP48E2), WP486 (INT8 packing)"),
}


def board_from_options(options: Any) -> Board:
    """The preset named by ``options.board`` with the recipe's overrides applied (options already validated)."""
    base = BOARDS[options.board]
    over: dict[str, Any] = {}
    for opt, field in (("clock_mhz", "clock_mhz"), ("bandwidth_gbps", "bandwidth_gbps"), ("dsps", "dsps")):
        v = getattr(options, opt, None)
        if v is not None:
            over[field] = v
    widths = getattr(options, "widths", None)
    if widths:
        over["widths"] = tuple(sorted(set(int(w) for w in widths)))
    return dataclasses.replace(base, **over) if over else base
