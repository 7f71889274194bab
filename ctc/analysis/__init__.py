"""Why a compiled model is fast or slow: per-op FLOPs and bytes, target roofs, and the roofline (`ctc analyze`).

``costs`` counts each op's arithmetic and memory traffic at concrete shapes, ``peaks`` gives a target's
roofs (measured for the host CPU, data sheets for GPUs and FPGA boards), ``roofline`` combines them by
phase (prefill, decode) and places measured kernel times beside the bounds.
"""
