"""What the pipeline did to each block (the report's per-block view): bits, ranks, removal, sharing, and by which pass.

Read off the original and the final module (not from pass notes, which differ per pass): per block,
its parameter bytes before and after, its quantized linears grouped by scheme (``W4A8 g128 ×7``),
its low-rank linears with their ranks, special compressed ops (sparse or calibrated attention,
quantized KV cache), whether the block is gone, and which other blocks read the same parameter
tensors (shared blocks, loops).  Passes are attributed by what they introduced: a pass whose record
adds an op kind is named on every block holding that kind; ``remove-blocks`` names the blocks it
removed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ctc.ir.graph import Module

__all__ = ["block_view", "per_block_bytes"]

COMPRESSED_OPS = ("quant_linear", "lowrank_linear", "sparse_attention", "calibrated_attention",
                  "quant_kv_attention", "quant_cache_write", "channel_permute")


def _scheme(attrs: Mapping[str, Any]) -> str:
    a = attrs.get("a_bits")
    text = f"W{attrs.get('w_bits')}A{16 if a in (None, 16) else a}"
    gs = int(attrs.get("group_size", -1) or -1)
    if gs > 0:
        text += f" g{gs}"
    if attrs.get("act_dynamic"):
        text += " dyn"
    elif len(attrs.get("act_clusters") or ()) > 1:
        text += f" {len(attrs['act_clusters'])} clusters"
    return text


def _param_readers(module: Module) -> dict[str, set[int]]:
    """Parameter name -> blocks whose nodes read it."""
    out: dict[str, set[int]] = {}
    for n in module.nodes:
        if n.block is None:
            continue
        for v in n.inputs:
            p = v.producer
            if p is not None and p.op == "param":
                out.setdefault(str(p.attrs["name"]), set()).add(n.block)
    return out


def per_block_bytes(module: Module) -> dict[int, int]:
    """Parameter bytes read by each block's nodes (a parameter counts once, in its first block)."""
    seen: set[str] = set()
    out: dict[int, int] = {}
    for n in module.nodes:
        if n.op == "param" and n.block is not None and n.attrs["name"] not in seen:
            seen.add(n.attrs["name"])
            t = module.params[n.attrs["name"]]
            out[n.block] = out.get(n.block, 0) + int(t.numel()) * t.element_size()
    return out


def _introduced_by(pass_rows: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Op kind -> names of the passes whose records add it."""
    out: dict[str, list[str]] = {}
    for p in pass_rows:
        for op, delta in (p.get("ops_diff") or {}).items():
            if delta > 0 and op in COMPRESSED_OPS and p.get("name") not in out.setdefault(op, []):
                out[op].append(str(p.get("name")))
    return out


def block_view(original: Module, module: Module, pass_rows: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """One row per block of either module (see the module docstring)."""
    before, after = per_block_bytes(original), per_block_bytes(module)
    blocks = sorted(set(original.blocks()) | set(module.blocks()))
    readers = _param_readers(module)
    by_op = _introduced_by(pass_rows)
    removed_by: dict[int, list[str]] = {}
    for p in pass_rows:
        for b in (p.get("metrics") or {}).get("removed_blocks") or []:
            removed_by.setdefault(int(b), []).append(str(p.get("name")))
    rows = []
    for b in blocks:
        nodes = [n for n in module.nodes if n.block == b]
        schemes: dict[str, int] = {}
        ranks: list[int] = []
        special: dict[str, int] = {}
        for n in nodes:
            if n.op == "quant_linear":
                s = _scheme(n.attrs)
                schemes[s] = schemes.get(s, 0) + 1
            elif n.op == "lowrank_linear":
                ranks.append(int(n.attrs["rank"]))
            elif n.op in COMPRESSED_OPS:
                special[n.op] = special.get(n.op, 0) + 1
        shared = sorted({o for name, bs in readers.items() if b in bs for o in bs if o != b})
        passes = [p for op in {n.op for n in nodes} for p in by_op.get(op, [])]
        if not nodes:
            passes += removed_by.get(b, [])
        rows.append({
            "block": b, "bytes_before": before.get(b, 0), "bytes_after": after.get(b, 0),
            "quantized": ", ".join(f"{s} ×{k}" for s, k in sorted(schemes.items())),
            "low_rank": (f"r {min(ranks)}" if len(set(ranks)) == 1 else f"r {min(ranks)}–{max(ranks)}") +
                        f" ×{len(ranks)}" if ranks else "",
            "other": ", ".join(f"{op} ×{k}" for op, k in sorted(special.items())),
            "removed": not nodes and b in original.blocks(),
            "shares_with": shared,
            "passes": sorted(dict.fromkeys(passes)),
        })
    return rows
