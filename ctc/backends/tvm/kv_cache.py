"""CPU kernels (TVM TIR) for the quantized KV cache: ``quant_cache_write`` and one-query ``quant_kv_attention``.

Why: an int8 cache only pays if nothing expands it back to fp32 in memory.  Two hand-written
kernels per shape:

* ``kv_write`` quantizes a step's new rows (per head, token and group: ``s = max|x| / qmax``,
  ``q = round(x / s)``, as :func:`ctc.ir.quant.quantize_kv`) and writes them, with their
  scales, into the cache buffers in place (``call_tir_inplace``: the buffers are the step's
  inputs, so nothing else moves);
* ``kv_attend`` is the decode step's attention (one query row), :mod:`.decode_attention`'s kernel
  reading the int8 or int4 codes: parallel over (batch, kv head, chunk of keys); the query heads
  that share a kv head are scored together, so each key is loaded and converted once for all of
  them (``score = scale * s_k * sum_d q_d k_d``; on AVX-512 16 keys per vector), then the chunk's
  softmax terms and the weighted sum of the value rows (``acc_d += p_j s_v,j v_jd``), the chunks
  combined at the end.

int8 and int4 storage run these kernels.  Groups that are not a multiple of 16 channels and query
rows other than 1 (a prefill over the cache) are lowered by expanding the cache to fp32 inside the
step (correct, not faster) and the lowering says so in its notes.
"""

from __future__ import annotations

import functools
import math
from typing import Any

__all__ = ["lower_quant_cache_write", "lower_quant_kv_attention", "write_func"]


def _i(v: int) -> str:
    return f"T.int64({int(v)})"


_RNE = 'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.roundeven"), {v}, dtype="float32")'


@functools.lru_cache(maxsize=64)
def write_func(b: int, h: int, n: int, t: int, d: int, bits: int, group: int) -> Any:
    """``(cache, scale, update [b, h, t, d], position [t])``: quantize and write in place (nothing returned)."""
    import tvm

    qmax = (1 << (bits - 1)) - 1
    g_n = 1 if group == -1 else d // group
    dg = d // g_n
    ds = d if bits == 8 else d // 2
    cdt = "int8" if bits == 8 else "uint8"
    L = ["@T.prim_func(private=True, s_tir=True)",
         f'def kv_write(cache: T.Buffer(({_i(b)}, {_i(h)}, {_i(n)}, {_i(ds)}), "{cdt}"), '
         f'scale: T.Buffer(({_i(b)}, {_i(h)}, {_i(n)}, {_i(g_n)}), "float32"), '
         f'update: T.Buffer(({_i(b)}, {_i(h)}, {_i(t)}, {_i(d)}), "float32"), '
         f'position: T.Buffer(({_i(t)},), "int64")):',
         '    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})',
         '    with T.sblock("root"):',
         f"        for bi, hi, ti in T.grid({_i(b)}, {_i(h)}, {_i(t)}):",
         '            mx = T.decl_buffer((T.int64(1),), "float32", scope="local")',
         '            qv = T.decl_buffer((' + _i(d) + ',), "int32", scope="local")',
         "            p = position[ti]",
         f"            for g in range({_i(g_n)}):",
         "                mx[0] = T.float32(0)",
         f"                for i in range({_i(dg)}):",
         f"                    mx[0] = T.max(mx[0], T.fabs(update[bi, hi, ti, g * {_i(dg)} + i]))",
         f"                mx[0] = mx[0] / T.float32({qmax})",
         "                mx[0] = T.Select(mx[0] > T.float32(0), mx[0], T.float32(1))",
         "                scale[bi, hi, p, g] = mx[0]",
         f"                for i in range({_i(dg)}):",
         f"                    qv[g * {_i(dg)} + i] = T.Cast(\"int32\", T.max(T.min("
         + _RNE.format(v=f"update[bi, hi, ti, g * {_i(dg)} + i] / mx[0]")
         + f", T.float32({qmax})), T.float32({-qmax})))"]
    if bits == 8:
        L += [f"            for i in range({_i(d)}):",
              '                cache[bi, hi, p, i] = T.Cast("int8", qv[i])']
    else:
        L += [f"            for i in range({_i(ds)}):",
              '                cache[bi, hi, p, i] = T.Cast("uint8", qv[i * T.int64(2)] + 8) | '
              '(T.Cast("uint8", qv[i * T.int64(2) + T.int64(1)] + 8) << T.uint8(4))']
    return tvm.script.from_source("\n".join(L) + "\n")


# ----------------------------------------------------------------------------- lowering
def _owned(ctx: Any, v: Any) -> bool:
    return v.producer is None and len(v.users) == 1 and ctx.param_name(v) is None


def lower_quant_cache_write(ctx: Any, node: Any) -> Any:
    """``quant_cache_write`` in place when both buffers are module inputs read only here (else into copies)."""
    from ctc.backends.tvm.int_kernels import add_prim_func
    from ctc.backends.tvm.lower import _copy_te

    relax = ctx.relax
    cv, sv, uv = node.operand("cache"), node.operand("scale"), node.operand("update")
    from ctc.backends.tvm.lower import _static_int

    shape = [_static_int(ctx, x) for x in uv.type.shape]
    if None in shape:
        from ctc.backends.tvm.lower import LoweringError

        raise LoweringError(f"quant_cache_write at {node.scope or '<root>'}: needs static shapes, got {uv.type}")
    b, h, t, d = (int(x) for x in shape)  # type: ignore[arg-type]
    n = int(cv.type.shape[2])
    bits, group = int(node.attr("bits")), int(node.attr("group_size"))
    cache, scale = ctx.val(cv), ctx.val(sv)
    if _owned(ctx, cv) and _owned(ctx, sv):
        ctx.inplace_inputs.update({cv.name, sv.name})
    else:
        cache = ctx.te(_copy_te, cache, name="cache_copy")
        scale = ctx.te(_copy_te, scale, name="cache_copy")
        ctx.notes.append(f"quant_cache_write at {node.scope or '<root>'}: the cache is read elsewhere or not a module "
                         "input; written into a copy")
    upd = ctx.val(uv)
    if uv.type.dtype != "f32":
        upd = ctx.emit(relax.op.astype(upd, "float32"))
    gv = add_prim_func(ctx.bb, write_func(b, h, n, t, d, bits, group), f"kv_write_{b}_{h}_{n}_{t}_{d}_{bits}_{group}")
    res = ctx.emit(relax.call_tir_inplace(
        gv, [cache, scale, upd, ctx.val(node.operand("position"))], [0, 1],
        [relax.TensorType(ctx.shape_of(node.outputs[0]), "int8" if bits == 8 else "uint8"),
         relax.TensorType(ctx.shape_of(node.outputs[1]), "float32")]))
    return [ctx.emit(relax.TupleGetItem(res, 0)), ctx.emit(relax.TupleGetItem(res, 1))]


def _dequant_te(bits: int, group: int, d: int) -> Any:
    from ctc.backends.tvm.lower import stored_int_te

    def f(c: Any, s: Any) -> Any:
        from tvm import te

        gn = 1 if group == -1 else d // group
        dg = d // gn

        def value(bi: Any, hi: Any, j: Any, k: Any) -> Any:
            return stored_int_te(c, (bi, hi, j), k, bits) * s[bi, hi, j, k // dg]

        return te.compute([c.shape[0], c.shape[1], c.shape[2], d], value, name="kv_dequant")
    return f


def lower_quant_kv_attention(ctx: Any, node: Any) -> Any:
    """One-query attention over int8 caches in one kernel; other shapes expand the caches to fp32 first."""
    from ctc.backends.tvm import decode_attention as DA
    from ctc.backends.tvm.lower import _static_int

    relax = ctx.relax
    qt = node.operand("q").type
    kt = node.operand("k_cache").type
    bits, group = int(node.attr("bits")), int(node.attr("group_size"))
    dims = [_static_int(ctx, x) for x in (*qt.shape, kt.shape[1], kt.shape[2])]
    d = int(qt.shape[3])
    scale = node.attr("scale") if node.attr("scale") is not None else 1.0 / math.sqrt(d)
    args = [ctx.val(node.operand(nm)) for nm in ("q", "k_cache", "k_scale", "v_cache", "v_scale")]
    why = "symbolic shapes" if None in dims else None
    spec = None
    mask_v = node.operand("mask")
    if why is None:
        b, hq, lq, _, hk, n = (int(x) for x in dims)  # type: ignore[arg-type]
        if lq != 1:
            why = f"{lq} query rows (the kernel covers decode steps)"
        mask, mb, mh = "none", 1, 1
        if why is None and mask_v is not None:
            got = DA.mask_operand(ctx, mask_v, b, hq, n)
            if isinstance(got, str):
                why = got
            else:
                mask, mb, mh, m = got
                args.append(m)
        if why is None:
            splits = DA.key_splits(b * hk, n, DA.target_threads(ctx.target))
            cache = "int8" if bits == 8 else "int4"
            spec = DA.AttendSpec(b, hq, hk, n, d, group, float(scale), mask, mb, mh, cache=cache, splits=splits,
                                 key_lanes=DA.key_lanes_supported(ctx.target, cache, group))
            why = DA.attend_supported(spec, bits)
    if why is None and spec is not None:
        if qt.dtype != "f32":
            args[0] = ctx.emit(relax.op.astype(args[0], "float32"))
        return DA.emit_decode_attention(ctx, spec, args)
    ctx.notes.append(f"quant_kv_attention at {node.scope or '<root>'}: caches expanded to fp32 in the step ({why})")
    op = relax.op
    k = ctx.te(_dequant_te(bits, group, d), args[1], args[2], name="kv_dequant")
    v = ctx.te(_dequant_te(bits, group, d), args[3], args[4], name="kv_dequant")
    hq_, hk_ = qt.shape[1], kt.shape[1]
    if isinstance(hq_, int) and isinstance(hk_, int) and hq_ != hk_:
        k = ctx.emit(op.repeat(k, hq_ // hk_, axis=1))
        v = ctx.emit(op.repeat(v, hq_ // hk_, axis=1))
    q = args[0] if qt.dtype == "f32" else ctx.emit(op.astype(args[0], "float32"))
    lg = ctx.emit(op.multiply(ctx.emit(op.matmul(q, ctx.emit(op.permute_dims(k, [0, 1, 3, 2])))),
                              ctx.const(float(scale), "f32")))
    if mask_v is not None:
        m = ctx.val(mask_v)
        if mask_v.type.dtype == "bool":
            lg = ctx.emit(op.where(m, lg, ctx.const(-math.inf, "f32")))
        else:
            lg = ctx.emit(op.add(lg, m if mask_v.type.dtype == "f32" else ctx.emit(op.astype(m, "float32"))))
    p = ctx.emit(op.nn.softmax(lg, axis=-1))
    y = ctx.emit(op.matmul(p, v))
    return y if qt.dtype == "f32" else op.astype(y, "float16" if qt.dtype == "f16" else "bfloat16")
