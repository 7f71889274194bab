"""Hand-written TIR kernels for row-wise ops: softmax and log-softmax (row length may be symbolic), layer norm.

Why: with a symbolic row length (``ctc compile`` builds for any sequence length by default), the
scheduled TE softmax keeps a bounds predicate inside its vector loops, LLVM scalarizes them, and
the intermediates become full-size buffers: MiniLM's attention softmax ran 5-6x slower than the
fixed-length build (8.4 vs 1.9 ms per call at seq 384).  These kernels split each row into whole
vectors and a scalar tail explicitly, keep max/sum in vector accumulators, and fuse the
exponential with the sum, so any length runs as fast as a fixed one (0.88 ms at seq 384).

``row_softmax(log, fast)`` returns a PrimFunc over ``[R, C]`` f32 (both symbolic); the lowering
reshapes the input's leading axes into ``R``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["RowEpilogue", "fast_exp_expr", "gelu_expr", "halving_lines", "row_layer_norm", "row_softmax"]

LANES = 16  # accumulator width; LLVM splits it into the target's vectors (16 f32 = one AVX-512 register)


def fast_exp_expr(x: Any) -> Any:
    """``exp(x)`` for f32 as a TIR expression: ``2^n * p(r)`` with ``x = n ln2 + r``, ``|r| <= ln2/2``,
    and ``p`` the degree-6 Taylor polynomial (relative error < 2e-7 on [-87, 88]; above, the input
    is clamped).  Below -87 the result is exactly 0, so ``exp(-inf) = 0``: TVM's ``topi.fast_exp``
    gives ~1e-38 there, and a masked softmax's ~1e-38 weights made the following ``p v`` product
    run on denormals (SmolLM2 causal attention, seq 256: 50 ms instead of 3 ms).
    Vectorizes, unlike the libm call ``T.exp`` becomes.  (``topi.fast_exp`` works on TE tensors
    only, hence this expression-level version for hand-written kernels.)"""
    from tvm import tirx

    f32 = "float32"
    x0 = x
    x = tirx.max(tirx.min(x, tirx.const(88.0, f32)), tirx.const(-87.0, f32))
    n = tirx.floor(x * tirx.const(1.4426950408889634, f32) + tirx.const(0.5, f32))
    r = x - n * tirx.const(0.6931471805599453, f32)
    p = tirx.const(1.0 / 720.0, f32)
    for c in (1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = p * r + tirx.const(c, f32)
    return tirx.Select(x0 < tirx.const(-87.0, f32), tirx.const(0.0, f32),
                       tirx.reinterpret(f32, (tirx.Cast("int32", n) + 127) << 23) * p)


def row_softmax(log: bool, fast: bool) -> Any:
    """A PrimFunc ``(X [R, C], Y [R, C])``: ``Y = softmax(X)`` (or ``log_softmax``) over each row."""
    from tvm.script import tirx as T

    ex = fast_exp_expr if fast else T.exp
    lanes = LANES

    @T.prim_func(private=True, s_tir=True)
    def kernel(x_h: T.handle, y_h: T.handle) -> None:
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})  # 8: opaque, never fused
        R = T.int64()
        C = T.int64()
        X = T.match_buffer(x_h, (R, C), "float32")
        Y = T.match_buffer(y_h, (R, C), "float32")
        with T.sblock("root"):  # Relax's op-pattern analysis wants a block at the top
            for r in T.parallel(R):
                acc = T.decl_buffer((lanes,), "float32", scope="local")
                mx = T.decl_buffer((1,), "float32", scope="local")
                sm = T.decl_buffer((1,), "float32", scope="local")
                nv = C // T.int64(lanes)
                # row max: whole vectors, then the lanes, then the tail
                for j1 in T.vectorized(lanes):
                    acc[j1] = T.float32(-3.4028234663852886e38)
                for j0 in range(nv):
                    for j1 in T.vectorized(lanes):
                        acc[j1] = T.max(acc[j1], X[r, j0 * T.int64(lanes) + j1])
                mx[0] = T.float32(-3.4028234663852886e38)
                for j1 in range(lanes):
                    mx[0] = T.max(mx[0], acc[j1])
                for j in range(nv * T.int64(lanes), C):
                    mx[0] = T.max(mx[0], X[r, j])
                # exponentials (kept in Y for softmax) and their sum
                for j1 in T.vectorized(lanes):
                    acc[j1] = T.float32(0)
                for j0 in range(nv):
                    for j1 in T.vectorized(lanes):
                        Y[r, j0 * T.int64(lanes) + j1] = ex(X[r, j0 * T.int64(lanes) + j1] - mx[0])
                        acc[j1] = acc[j1] + Y[r, j0 * T.int64(lanes) + j1]
                sm[0] = T.float32(0)
                for j1 in range(lanes):
                    sm[0] = sm[0] + acc[j1]
                for j in range(nv * T.int64(lanes), C):
                    Y[r, j] = ex(X[r, j] - mx[0])
                    sm[0] = sm[0] + Y[r, j]
                if log:
                    sm[0] = T.log(sm[0]) + mx[0]
                    for j0 in range(nv):
                        for j1 in T.vectorized(lanes):
                            Y[r, j0 * T.int64(lanes) + j1] = X[r, j0 * T.int64(lanes) + j1] - sm[0]
                    for j in range(nv * T.int64(lanes), C):
                        Y[r, j] = X[r, j] - sm[0]
                else:
                    sm[0] = T.float32(1) / sm[0]
                    for j0 in range(nv):
                        for j1 in T.vectorized(lanes):
                            Y[r, j0 * T.int64(lanes) + j1] = Y[r, j0 * T.int64(lanes) + j1] * sm[0]
                    for j in range(nv * T.int64(lanes), C):
                        Y[r, j] = Y[r, j] * sm[0]

    return kernel



@dataclass(frozen=True)
class RowEpilogue:
    """More work per row after a row kernel's output row ``Y[r, :]`` is written (TVMScript pieces): ``params``
    (operands after the kernel's own inputs), ``outputs`` (output handles after ``Y``), ``decls`` (their buffer
    declarations, function level) and ``body`` (lines inside the row loop, 12 spaces deep, ``r`` the row)."""

    params: str
    outputs: str
    decls: tuple[str, ...]
    body: tuple[str, ...]


def halving_lines(ind: str, at: str, op: str, lanes: int) -> list[str]:
    """TVMScript lines folding the ``lanes`` lanes ``at`` (a pattern of lane ``{c}``) by ``op`` in halves, down to
    lanes 0 and 1 (log2 vector steps, not a scalar chain over every lane); ``lanes`` a power of two >= 2."""
    if lanes < 2 or lanes & (lanes - 1):
        raise ValueError(f"halving_lines: {lanes} lanes; expected a power of two >= 2")
    L = []
    half = lanes // 2
    while half >= 2:
        L += [f"{ind}for c in T.vectorized(T.int64({half})):",
              f"{ind}    {at.format(c='c')} = {op}({at.format(c='c')}, {at.format(c=f'c + T.int64({half})')})"]
        half //= 2
    return L


def row_layer_norm(width: int, eps: float, residual: bool, rows: int | None = None,
                   epilogue: RowEpilogue | None = None) -> Any:
    """A PrimFunc ``(X [R, C], [Z [R, C],] W [C], B [C], Y [R, C])``: ``Y = layer_norm(X (+ Z)) * W + B`` over
    each row of a static width ``C``, rows parallel; ``epilogue`` adds operands, outputs and work per row (the
    next linear's u8 codes of the row, :func:`~.int_kernels.layer_norm_codes_func`).

    Why: dlight's reduction schedule ran MiniLM's 13 layer norms (128 x 384) at about 2 ns per
    element (1.35 ms of a 14.9 ms W8A8 run, one thread); a row here is three passes over 1.5 KB
    in L1 with 16-lane accumulators.  The mean is subtracted before the squares are summed (two
    passes, not ``E[x^2] - E[x]^2``), as torch does.  ``residual``: the row is ``X + Z`` (the
    residual ``add`` a post-LN transformer puts before each norm), so the sum is never stored.
    ``rows``: a static row count (one row, a decode step, runs serially: no thread-pool launch).
    """
    import tvm

    C, lanes = int(width), LANES
    R = "R" if rows is None else f"T.int64({int(rows)})"
    nv, tail = C // lanes, C // lanes * lanes

    def x(j: str) -> str:
        return f"(X[r, {j}] + Z[r, {j}])" if residual else f"X[r, {j}]"

    vj = f"j0 * T.int64({lanes}) + j1"
    zin = "z_h: T.handle, " if residual else ""
    src = [
        "@T.prim_func(private=True, s_tir=True)",
        f"def kernel(x_h: T.handle, {zin}w: T.Buffer((T.int64({C}),), \"float32\"), "
        f"b: T.Buffer((T.int64({C}),), \"float32\"), {epilogue.params + ', ' if epilogue else ''}y_h: T.handle"
        f"{', ' + epilogue.outputs if epilogue else ''}):",
        '    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})',
        *(["    R = T.int64()"] if rows is None else []),
        f'    X = T.match_buffer(x_h, ({R}, T.int64({C})), "float32")',
        *([f'    Z = T.match_buffer(z_h, ({R}, T.int64({C})), "float32")'] if residual else []),
        f'    Y = T.match_buffer(y_h, ({R}, T.int64({C})), "float32")',
        *(epilogue.decls if epilogue else ()),
        '    with T.sblock("root"):',
        f"        for r in T.parallel({R}):" if rows != 1 else f"        for r in range({R}):",
        f'            acc = T.decl_buffer((T.int64({lanes}),), "float32", scope="local")',
        '            st = T.decl_buffer((T.int64(2),), "float32", scope="local")',
    ]
    ind = "            "
    for i, term in ((0, x(vj)), (1, f"({x(vj)} - st[0]) * ({x(vj)} - st[0])")):
        tterm = x("j") if i == 0 else f"({x('j')} - st[0]) * ({x('j')} - st[0])"
        src += [f"{ind}for j1 in T.vectorized(T.int64({lanes})):",
                f"{ind}    acc[j1] = T.float32(0)",
                f"{ind}for j0 in range(T.int64({nv})):",
                f"{ind}    for j1 in T.vectorized(T.int64({lanes})):",
                f"{ind}        acc[j1] = acc[j1] + {term}",
                *halving_lines(ind, "acc[{c}]", "T.Add", lanes),
                f"{ind}st[{i}] = acc[T.int64(0)] + acc[T.int64(1)]",
                f"{ind}for j in range(T.int64({tail}), T.int64({C})):",
                f"{ind}    st[{i}] = st[{i}] + {tterm}"]
        src.append(f"{ind}st[0] = st[0] * T.float32({1.0 / C!r})" if i == 0 else
                   f"{ind}st[1] = T.float32(1) / T.sqrt(st[1] * T.float32({1.0 / C!r}) + T.float32({float(eps)!r}))")
    src += [f"{ind}for j0 in range(T.int64({nv})):",
            f"{ind}    for j1 in T.vectorized(T.int64({lanes})):",
            f"{ind}        Y[r, {vj}] = ({x(vj)} - st[0]) * st[1] * w[{vj}] + b[{vj}]",
            f"{ind}for j in range(T.int64({tail}), T.int64({C})):",
            f"{ind}    Y[r, j] = ({x('j')} - st[0]) * st[1] * w[j] + b[j]",
            *(epilogue.body if epilogue else ())]
    return tvm.script.from_source("\n".join(src) + "\n")


# erf(x / sqrt 2) = x P(x^2) / Q(x^2) for |x| <= 4 sqrt 2 (beyond, erf rounds to +-1 in f32): a rational fit of
# degree 5 / 5 in x^2, made for ctc (linearized least squares on Chebyshev nodes, Lawson-reweighted towards
# minimax).  Evaluated in f32 over [-12, 12]: |error| < 4.3e-7 on erf, < 1e-6 on gelu (< 2e-7 of |x| where |x| > 1).
ERF_P = (0.797884426, 0.06938494634, 0.009451833201, 0.0003538803171, 1.272978809e-05, 4.363767011e-08)
ERF_Q = (1.0, 0.2536267135, 0.02911923828, 0.001930566137, 7.602324664e-05, 1.171273514e-06)
ERF_CLAMP = 5.656854249492381  # 4 sqrt 2


def gelu_expr(x: Any) -> Any:
    """``gelu(x) = x / 2 (1 + erf(x / sqrt 2))`` (the exact form, not tanh's) as a vectorizable TIR expression for
    the epilogues of hand-written kernels (GELU after a matmul), where ``topi.fast_erf`` (TE tensors only) cannot
    go: erf by the rational :data:`ERF_P` / :data:`ERF_Q` on the clamped input (19 operations, one division).

    Why not Abramowitz & Stegun 7.1.26 (``1 - t p(t) exp(-z^2)``, ``t = 1 / (1 + a z)``), used before: a
    division and an exp, ~37 operations; the FFN-up kernel of a W8A8 MiniLM spent a fifth of its time in it."""
    from tvm import tirx

    f32 = "float32"
    xc = tirx.max(tirx.min(x, tirx.const(ERF_CLAMP, f32)), tirx.const(-ERF_CLAMP, f32))
    t = xc * xc
    p, q = tirx.const(ERF_P[-1], f32), tirx.const(ERF_Q[-1], f32)
    for c in reversed(ERF_P[:-1]):
        p = p * t + tirx.const(c, f32)
    for c in reversed(ERF_Q[:-1]):
        q = q * t + tirx.const(c, f32)
    half = x * tirx.const(0.5, f32)
    # |erf| held to 1: at the clamp the fit is 1 + 4e-7, which times a huge negative x would leave a visible residue
    erf = tirx.max(tirx.min(xc * p / q, tirx.const(1.0, f32)), tirx.const(-1.0, f32))
    return half + half * erf
