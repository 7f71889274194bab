"""CPU kernels (TVM TIR) for the quantized KV cache: ``quant_cache_write`` and one-query ``quant_kv_attention``.

Why: an int8 cache only pays if nothing expands it back to fp32 in memory.  Two hand-written
kernels per shape:

* ``kv_write`` quantizes a step's new rows (per head, token and group: ``s = max|x| / qmax``,
  ``q = round(x / s)``, as :func:`ctc.ir.quant.quantize_kv`) and writes them, with their
  scales, into the cache buffers in place (``call_tir_inplace``: the buffers are the step's
  inputs, so nothing else moves);
* ``kv_attend`` is the decode step's attention (one query row): parallel over (batch, kv head);
  the query heads that share a kv head are scored together, so each int8 key row is loaded and
  converted once for all of them (``score = scale * s_k * sum_d q_d k_d``, 16-lane fp32 partial
  sums), then a row softmax (the vectorizable exp of :mod:`.row_kernels`) and the weighted sum
  of the int8 value rows (``acc_d += p_j s_v,j v_jd``, vectorized along d).

int8 storage runs these kernels.  4-bit storage, groups that are not a multiple of 16 channels,
and query rows other than 1 (a prefill over the cache) are lowered by expanding the cache to fp32
inside the step (correct, not faster) and the lowering says so in its notes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["AttendSpec", "attend_func", "lower_quant_cache_write", "lower_quant_kv_attention", "write_func"]

LANES = 16


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


@dataclass(frozen=True)
class AttendSpec:
    """Static shape of one decode-step attention over an int8 cache."""

    b: int
    hq: int
    hk: int
    n: int  # cache length
    d: int
    group: int  # -1 or a multiple of 16 dividing d
    scale: float
    mask: str  # "none" | "bool" | "add"
    mb: int  # mask batch extent (1 or b)
    mh: int  # mask head extent (1 or hq)

    @property
    def groups(self) -> int:
        return 1 if self.group == -1 else self.d // self.group


def attend_supported(spec: AttendSpec, bits: int) -> str | None:
    """None when :func:`attend_func` covers ``spec``; else why not."""
    if bits != 8:
        return "4-bit cache storage"
    if spec.d % LANES:
        return f"head dim {spec.d} is not a multiple of {LANES}"
    if spec.group != -1 and spec.group % LANES:
        return f"group_size {spec.group} is not a multiple of {LANES}"
    if spec.hq % spec.hk:
        return f"{spec.hq} query heads are not a multiple of {spec.hk} kv heads"
    return None


@functools.lru_cache(maxsize=64)
def attend_func(spec: AttendSpec) -> Any:
    """``(q [b, hq, 1, d], kc, ks, vc, vs[, mask [mb, mh, 1, n]], out [b, hq, 1, d])`` for int8 caches."""
    import tvm
    from ctc.backends.tvm.row_kernels import fast_exp_expr

    b, hq, hk, n, d = spec.b, spec.hq, spec.hk, spec.n, spec.d
    r = hq // hk
    gn = spec.groups
    dg = d // gn
    chunks = d // LANES
    params = [f'q: T.Buffer(({_i(b)}, {_i(hq)}, T.int64(1), {_i(d)}), "float32")',
              f'kc: T.Buffer(({_i(b)}, {_i(hk)}, {_i(n)}, {_i(d)}), "int8")',
              f'ks: T.Buffer(({_i(b)}, {_i(hk)}, {_i(n)}, {_i(gn)}), "float32")',
              f'vc: T.Buffer(({_i(b)}, {_i(hk)}, {_i(n)}, {_i(d)}), "int8")',
              f'vs: T.Buffer(({_i(b)}, {_i(hk)}, {_i(n)}, {_i(gn)}), "float32")']
    if spec.mask != "none":
        params.append(f'mask: T.Buffer(({_i(spec.mb)}, {_i(spec.mh)}, T.int64(1), {_i(n)}), '
                      f'"{"bool" if spec.mask == "bool" else "float32"}")')
    params.append(f'out: T.Buffer(({_i(b)}, {_i(hq)}, T.int64(1), {_i(d)}), "float32")')
    neg = "T.float32(-3.4028234663852886e38)"
    L = ["@T.prim_func(private=True, s_tir=True)",
         f"def kv_attend({', '.join(params)}):",
         '    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})',
         '    with T.sblock("root"):',
         f"        for t in T.parallel({_i(b * hk)}):",
         f'            sc = T.decl_buffer(({_i(r * n)},), "float32")',
         f'            qs = T.decl_buffer(({_i(r * d)},), "float32", scope="local")',
         f'            acc = T.decl_buffer(({_i(r * d)},), "float32", scope="local")',
         f'            part = T.decl_buffer(({_i(LANES)},), "float32", scope="local")',
         f'            kf = T.decl_buffer(({_i(d)},), "float32", scope="local")',
         f'            st = T.decl_buffer(({_i(2 * r)},), "float32", scope="local")',
         f"            bi = t // {_i(hk)}",
         f"            hi = t % {_i(hk)}",
         # the logit scale folded into q once
         f"            for ri in range({_i(r)}):",
         f"                for l in T.vectorized({_i(d)}):",
         f"                    qs[ri * {_i(d)} + l] = q[bi, hi * {_i(r)} + ri, T.int64(0), l] * "
         f"T.float32({spec.scale!r})",
         f"            for j in range({_i(n)}):",
         f"                for l in T.vectorized({_i(d)}):",
         '                    kf[l] = T.Cast("float32", kc[bi, hi, j, l])']
    if gn > 1:  # per-group key scales applied to the converted row
        L += [f"                for l in T.vectorized({_i(d)}):",
              f"                    kf[l] = kf[l] * ks[bi, hi, j, l // {_i(dg)}]"]
    L += [f"                for ri in range({_i(r)}):",
          f"                    for l in T.vectorized({_i(LANES)}):",
          "                        part[l] = T.float32(0)",
          f"                    for c in range({_i(chunks)}):",
          f"                        for l in T.vectorized({_i(LANES)}):",
          f"                            part[l] = part[l] + qs[ri * {_i(d)} + c * {_i(LANES)} + l] * "
          f"kf[c * {_i(LANES)} + l]",
          "                    st[0] = T.float32(0)",
          f"                    for l in range({_i(LANES)}):",
          "                        st[0] = st[0] + part[l]"]
    score = "st[0]" if gn > 1 else "st[0] * ks[bi, hi, j, T.int64(0)]"
    mb = "bi" if spec.mb > 1 else "T.int64(0)"
    mh = f"hi * {_i(r)} + ri" if spec.mh > 1 else "T.int64(0)"
    if spec.mask == "bool":
        score = f"T.Select(mask[{mb}, {mh}, T.int64(0), j], {score}, {neg})"
    elif spec.mask == "add":
        score = f"{score} + mask[{mb}, {mh}, T.int64(0), j]"
    L += [f"                    sc[ri * {_i(n)} + j] = {score}"]
    # softmax per query head (max, then the vectorizable exp and its sum), then the weighted int8 value rows
    nv = n // LANES * LANES
    L += [f"            for ri in range({_i(r)}):",
          f"                st[ri * T.int64(2)] = {neg}",
          f"                for j in range({_i(n)}):",
          f"                    st[ri * T.int64(2)] = T.max(st[ri * T.int64(2)], sc[ri * {_i(n)} + j])",
          f"                for l in T.vectorized({_i(LANES)}):",
          "                    part[l] = T.float32(0)"]
    if nv:
        L += [f"                for j0 in range({_i(nv // LANES)}):",
              f"                    for l in T.vectorized({_i(LANES)}):",
              f"                        sc[ri * {_i(n)} + j0 * {_i(LANES)} + l] = "
              f"EXP(sc[ri * {_i(n)} + j0 * {_i(LANES)} + l] - st[ri * T.int64(2)])",
              f"                        part[l] = part[l] + sc[ri * {_i(n)} + j0 * {_i(LANES)} + l]"]
    L += ["                st[ri * T.int64(2) + T.int64(1)] = T.float32(0)",
          f"                for l in range({_i(LANES)}):",
          "                    st[ri * T.int64(2) + T.int64(1)] = st[ri * T.int64(2) + T.int64(1)] + part[l]"]
    if n > nv:
        L += [f"                for j in range({_i(nv)}, {_i(n)}):",
              f"                    sc[ri * {_i(n)} + j] = EXP(sc[ri * {_i(n)} + j] - st[ri * T.int64(2)])",
              "                    st[ri * T.int64(2) + T.int64(1)] = st[ri * T.int64(2) + T.int64(1)] + "
              f"sc[ri * {_i(n)} + j]"]
    L += ["                st[ri * T.int64(2) + T.int64(1)] = T.float32(1) / st[ri * T.int64(2) + T.int64(1)]",
          f"                for l in T.vectorized({_i(d)}):",
          f"                    acc[ri * {_i(d)} + l] = T.float32(0)",
          f"            for j in range({_i(n)}):",
          f"                for l in T.vectorized({_i(d)}):",
          '                    kf[l] = T.Cast("float32", vc[bi, hi, j, l])'
          + (f" * vs[bi, hi, j, l // {_i(dg)}]" if gn > 1 else " * vs[bi, hi, j, T.int64(0)]"),
          f"                for ri in range({_i(r)}):",
          f"                    for l in T.vectorized({_i(d)}):",
          f"                        acc[ri * {_i(d)} + l] = acc[ri * {_i(d)} + l] + sc[ri * {_i(n)} + j] * kf[l]",
          f"            for ri in range({_i(r)}):",
          f"                for l in T.vectorized({_i(d)}):",
          f"                    out[bi, hi * {_i(r)} + ri, T.int64(0), l] = acc[ri * {_i(d)} + l] * "
          "st[ri * T.int64(2) + T.int64(1)]"]
    from tvm.script import tirx as T

    return tvm.script.from_source("\n".join(L) + "\n", extra_vars={"T": T, "EXP": fast_exp_expr})


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
    from ctc.backends.tvm.int_kernels import add_prim_func
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
            full = [1] * (4 - mask_v.type.rank) + [_static_int(ctx, x) for x in mask_v.type.shape]
            if None in full or full[2] != 1 or full[3] != n or full[0] not in (1, b) or full[1] not in (1, hq):
                why = f"mask {mask_v.type}"
            else:
                mb, mh = int(full[0]), int(full[1])  # type: ignore[arg-type]
                mask = "bool" if mask_v.type.dtype == "bool" else "add"
                m = ctx.val(mask_v)
                if mask == "add" and mask_v.type.dtype != "f32":
                    m = ctx.emit(relax.op.astype(m, "float32"))
                args.append(ctx.emit(relax.op.reshape(m, [mb, mh, 1, n])))
        if why is None:
            spec = AttendSpec(b, hq, hk, n, d, group, float(scale), mask, mb, mh)
            why = attend_supported(spec, bits)
    if why is None and spec is not None:
        if qt.dtype != "f32":
            args[0] = ctx.emit(relax.op.astype(args[0], "float32"))
        gv = add_prim_func(ctx.bb, attend_func(spec),
                           f"kv_attend_{spec.b}_{spec.hq}_{spec.hk}_{spec.n}_{spec.d}_{spec.group}_{spec.mask}"
                           f"{spec.mb}{spec.mh}")
        return relax.call_tir(gv, args[:5] + args[5:], relax.TensorType([spec.b, spec.hq, 1, spec.d], "float32"))
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
