"""The in-place KV-cache write of a decode step (``cache_write``), as a TIR PrimFunc.

Why: a deployed decoder keeps its KV cache in preallocated buffers and writes each step's new
rows into them.  Lowered as an ordinary Relax op, ``cache_write`` would copy the whole cache
every step (a decode step of SmolLM2 at 1024 positions would move 47 MB of cache to write
92 KB).  This kernel writes only the new rows, into the cache buffer itself: the lowering calls
it with ``call_tir_inplace`` (the output *is* the input buffer), so a step's buffers never move
and the whole step can be replayed (a CUDA graph).  The function is one spatial block over the
update's elements; dlight's GPU fallback binds it to threads on CUDA.  On a CPU it is built
serial (``serial=True``: marked scheduled, so the default rules, which parallelize spatial loops of
symbolic size, leave it alone): it writes a few KB, and a parallel launch of the thread pool cost
more than that (two per layer of a decode step).
"""

from __future__ import annotations

from typing import Any

__all__ = ["cache_write_func"]


def cache_write_func(rank: int, axis: int, dtype: str, serial: bool = False) -> Any:
    """A PrimFunc ``(cache, update, position)``: ``cache[..., position[t], ...] = update[..., t, ...]``
    along ``axis`` (all dims symbolic; the cache is written in place, nothing returned); ``serial``: left
    unscheduled (one thread)."""
    import tvm

    if not 0 <= axis < rank:
        raise ValueError(f"cache_write_func: axis {axis} out of range for rank {rank}")
    dims = [f"d{i}" for i in range(rank)]
    udims = [d if i != axis else "t" for i, d in enumerate(dims)]
    loops = [f"i{i}" for i in range(rank)]
    vs = [f"v{i}" for i in range(rank)]
    dst = [v if i != axis else f"position[{vs[axis]}]" for i, v in enumerate(vs)]
    src = [
        "@T.prim_func(private=True, s_tir=True)",
        "def cache_write(cache_h: T.handle, update_h: T.handle, position_h: T.handle):",
        # opaque: FuseOps leaves it alone
        '    T.func_attr({"tirx.noalias": True, "op_pattern": 8' + (', "tirx.is_scheduled": True' if serial else '')
        + '})',
        *[f"    {d} = T.int64()" for d in dims],
        "    t = T.int64()",
        f'    cache = T.match_buffer(cache_h, ({", ".join(dims)}), "{dtype}")',
        f'    update = T.match_buffer(update_h, ({", ".join(udims)}), "{dtype}")',
        '    position = T.match_buffer(position_h, (t,), "int64")',
        f"    for {', '.join(loops)} in T.grid({', '.join(udims)}):",
        '        with T.sblock("cache_write"):',
        f"            {', '.join(vs)} = T.axis.remap(\"{'S' * rank}\", [{', '.join(loops)}])",
        f"            T.reads(update[{', '.join(vs)}], position[{vs[axis]}])",
        f"            T.writes(cache[{', '.join(dst)}])",
        f"            cache[{', '.join(dst)}] = update[{', '.join(vs)}]",
    ]
    return tvm.script.from_source("\n".join(src))
