"""``kv-cache-quant``: store a decode step's KV cache as int8 (or int4) with per-head, per-token scales.

What it rewrites: in a static decode step (``model ... decode=N``; ``ctc.frontends.decode``), every
selected attention whose keys and values are ``cache_write`` results over cache *inputs* of the
module.  Each such cache input ``cache_k_i f32 [B, Hkv, N, D]`` becomes an integer buffer of the
same name (``i8 [B, Hkv, N, D]``, or ``u8 [B, Hkv, N, D/2]`` at 4 bits) plus a scale buffer
``cache_k_i_scale f32 [B, Hkv, N, G]`` (``G = D / group_size``, 1 by default: one scale per
head and token); ``cache_write`` becomes ``quant_cache_write`` (the new rows are quantized when
they are written, symmetric, round half to even) and the attention a ``quant_kv_attention`` that
reads the integers and scales.  The step's outputs follow: each written cache, then its scales.

Why per head and token (KIVI-style per-token grouping for both K and V): the scale is computed when
the row is written, from that row alone, so no calibration is needed and a row never changes once
written; ``group_size`` (a divisor of the head dim) gives finer groups for 4 bits.

The CPU backend lowers ``quant_cache_write`` in place and ``quant_kv_attention`` (one query row) to
one kernel per step and layer that reads the int8 / int4 codes (``ctc.backends.tvm.kv_cache``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ctc.ir import quant as Q
from ctc.ir.graph import Module, Node, Value
from ctc.ir.types import TensorType
from ctc.passes.base import Pass, PassContext, PassError, PassOptions, Selector, option, register_pass

__all__ = ["KvCacheQuantPass"]


def _cache_of(v: Value, module: Module) -> tuple[Node, Value] | None:
    """(cache_write node, cache input) when ``v`` is a cache_write over a module input on axis 2."""
    w = v.producer
    if w is None or w.op != "cache_write":
        return None
    cache = w.operand("cache")
    if cache.producer is not None or cache not in module.inputs or len(cache.users) != 1:
        return None
    if w.attr("axis") % cache.type.rank != 2 or cache.type.rank != 4:
        return None
    return w, cache


NO_CACHE = ("kv-cache-quant found no attention over a preallocated KV cache: it quantizes the cache of a static "
            "decode step (model ... decode=N)")


def _over_cache(n: Node, module: Module) -> bool:
    """Whether attention node ``n`` reads its keys and values from cache_write results over cache inputs."""
    return _cache_of(n.operand("k"), module) is not None and _cache_of(n.operand("v"), module) is not None


@register_pass
class KvCacheQuantPass(Pass):
    """Quantized KV cache for decode steps: int8/int4 storage with per-head, per-token (group) scales."""

    name = "kv-cache-quant"

    @dataclass(frozen=True)
    class Options(PassOptions):
        """Options of ``kv-cache-quant``."""

        bits: int = option(8, "bits per cached value: 8 (int8) or 4 (two per byte)", choices=(4, 8))
        group_size: int = option(-1, "head-dim channels per scale; -1 = one scale per head and token", min=-1)

        def validate(self) -> None:
            if self.group_size == 0:
                raise PassError("option group_size=0: use -1 (one scale per head and token) or a divisor of the "
                                "head dim")

    @classmethod
    def check_module(cls, options: PassOptions, module: Module, selector: Selector) -> list[tuple[str | None, str]]:
        over = [n for n in module.nodes
                if n.op == "scaled_dot_product_attention" and selector.matches(n) and _over_cache(n, module)]
        if not over:
            return [(None, NO_CACHE)]
        low = sorted({n.operand("q").type.dtype for n in over} - {"f32"})
        if len(low) == len({n.operand("q").type.dtype for n in over}):  # no f32 attention to quantize the cache of
            return [(None, f"kv-cache-quant: the quantized cache kernels take f32 attention, and this decode step's "
                           f"is {', '.join(low)}: load the model with dtype=f32")]
        return []

    def run(self, module: Module, ctx: PassContext) -> Module:
        o = self.options
        plans = []
        skipped: list[str] = []
        for n in module.nodes:
            if n.op != "scaled_dot_product_attention" or not ctx.selected(n):
                continue
            k, v = _cache_of(n.operand("k"), module), _cache_of(n.operand("v"), module)
            q = n.operand("q")
            why = None
            if not _over_cache(n, module):
                why = "keys/values are not cache_write results over cache inputs (capture with decode=N)"
            elif n.attr("is_causal"):
                why = "causal attention without a mask (not a decode step)"
            elif q.type.rank != 4 or not isinstance(q.type.shape[3], int):
                why = f"q {q.type} is not [batch, heads, len, static head dim]"
            elif q.type.dtype != "f32":
                why = f"{q.type.dtype} attention (the quantized cache kernels take f32)"
            else:
                try:
                    Q.kv_groups(int(q.type.shape[3]), o.group_size)
                except ValueError as e:
                    raise PassError(f"kv-cache-quant at {n.scope}: {e}") from None
                if o.bits == 4 and int(q.type.shape[3]) % 2:
                    why = "4-bit storage needs an even head dim"
            if why is not None:
                skipped.append(f"{n.scope or '<root>'}: {why}")
                continue
            plans.append((n, k, v))
        if not plans:
            raise PassError(NO_CACHE + (f"; {skipped[0]}" if skipped else ""))
        rw = ctx.rewriter(module)
        attrs = {"bits": o.bits, "group_size": o.group_size}
        replaced: dict[int, tuple[Value, Value]] = {}  # id(cache_write result) -> (integer cache, scales)
        old_writes = []
        for n, (wk, ck), (wv, cv) in plans:
            written = []
            for w, cache in ((wk, ck), (wv, cv)):
                qc, sc = self._integer_inputs(module, cache, o.bits, o.group_size)
                qw = rw.create("quant_cache_write", {"cache": qc, "scale": sc, "update": w.operand("update"),
                                                     "position": w.operand("position")}, attrs, before=w)
                written.append(qw)
                replaced[id(w.output)] = (qw.outputs[0], qw.outputs[1])
                old_writes.append(w)
            at = rw.create("quant_kv_attention",
                           {"q": n.operand("q"), "k_cache": written[0].outputs[0], "k_scale": written[0].outputs[1],
                            "v_cache": written[1].outputs[0], "v_scale": written[1].outputs[1],
                            "mask": n.operand("mask")},
                           {**attrs, "scale": n.attr("scale")}, before=n)
            rw.replace(n, at.output)
        # the step returns each written integer cache followed by its scales, as its inputs list them
        outs, names = [], []
        for val, name in zip(module.outputs, module.output_names, strict=True):
            if id(val) in replaced:
                qc, sc = replaced[id(val)]
                outs += [qc, sc]
                names += [name, f"{name}_scale"]
            else:
                outs.append(val)
                names.append(name)
        module.set_outputs(outs, names)
        for w in old_writes:
            if not w.output.users and not module.is_output(w.output):
                rw.erase(w)
        for line in skipped:
            rw.note(f"kv-cache-quant: left float at {line}")
        rw.note(f"kv-cache-quant: {len(plans)} attentions read an int{o.bits} KV cache "
                f"({'one scale per head and token' if o.group_size == -1 else f'groups of {o.group_size}'})")
        ctx.metrics.update({"quantized_kv_attentions": len(plans)})
        return module

    @staticmethod
    def _integer_inputs(module: Module, cache: Value, bits: int, group_size: int) -> tuple[Value, Value]:
        """Replace the float cache input by its integer buffer (same name, same position) and add its scales."""
        b, h, n, d = cache.type.shape
        qv = Value(cache.name, TensorType((b, h, n, Q.kv_storage_dim(int(d), bits)), "i8" if bits == 8 else "u8"))
        sv = Value(module.unique_name(f"{cache.name}_scale"), TensorType((b, h, n, Q.kv_groups(int(d), group_size)),
                                                                         "f32"))
        i = module.inputs.index(cache)
        module.inputs[i:i + 1] = [qv, sv]
        return qv, sv
