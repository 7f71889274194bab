"""Symbolic dims: small integer expressions over named symbols, never ``eval``-ed.

A symbolic dim is stored as a canonical string (``"s0"``, ``"s0 + 1"``, ``"2*s0*s1"``).
Expressions are parsed with :mod:`ast` and walked by hand; only integer literals,
names, ``+``, ``-``, ``*``, ``//``, ``%``, ``max(a, b)``, ``min(a, b)`` and parentheses are
accepted.  Sums of products are normalised to a polynomial so that ``"1 + s0"`` and ``"s0+1"``
compare equal.  Symbols stand for sizes (positive integers), so a quotient cancels the factors
its numerator and denominator share (``(4*batch)//batch`` is ``4``, ``(2*s + 4)//2`` is ``s + 2``);
what does not cancel stays an opaque atom (``(s0 + 1)//2``, ``max(0, 1 - s)``).
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable
from functools import lru_cache
from typing import TypeVar, Union

Dim = Union[int, str]
T = TypeVar("T")

# A polynomial: monomial (sorted tuple of atom names, with repeats) -> coefficient.
Poly = dict[tuple[str, ...], int]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EXTREMA = ("max", "min")
_IDENT = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\b(?!\s*\()")  # names, not the max/min of a call


class SymbolicError(ValueError):
    """A symbolic dim expression that is malformed or cannot be evaluated."""


def _poly_const(c: int) -> Poly:
    return {(): c} if c else {}


def _poly_add(a: Poly, b: Poly, sign: int = 1) -> Poly:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + sign * v
        if out[k] == 0:
            del out[k]
    return out


def _poly_mul(a: Poly, b: Poly) -> Poly:
    out: Poly = {}
    for ka, va in a.items():
        for kb, vb in b.items():
            k = tuple(sorted(ka + kb))
            out[k] = out.get(k, 0) + va * vb
            if out[k] == 0:
                del out[k]
    return out


def _poly_str(p: Poly) -> str:
    if not p:
        return "0"
    terms = []
    # Higher-degree monomials first, then by name, constant last.
    for mono in sorted(p, key=lambda m: (-len(m), m)):
        c = p[mono]
        body = "*".join(mono)
        if not mono:
            terms.append((c, str(abs(c))))
        elif abs(c) == 1:
            terms.append((c, body))
        else:
            terms.append((c, f"{abs(c)}*{body}"))
    out = ("-" if terms[0][0] < 0 else "") + terms[0][1]
    for c, t in terms[1:]:
        out += (" - " if c < 0 else " + ") + t
    return out


def _mono_common(monos: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The multiset intersection of monomials (the symbol factor every term shares)."""
    from collections import Counter

    common = Counter(monos[0])
    for m in monos[1:]:
        common &= Counter(m)
    return tuple(sorted(common.elements()))


def _mono_div(m: tuple[str, ...], d: tuple[str, ...]) -> tuple[str, ...]:
    rest = list(m)
    for a in d:
        rest.remove(a)
    return tuple(rest)


def _poly_floordiv(a: Poly, b: Poly) -> Poly:
    """``a // b`` with shared factors cancelled: integer gcd of all coefficients and the symbols every
    term of both shares (sizes are positive, so ``(x*A)//(x*B) == A//B``); exact when ``b`` then divides
    every coefficient of ``a``; otherwise an opaque atom."""
    import math

    if not b:
        raise SymbolicError("symbolic dim divides by zero")
    if set(a) <= {()} and set(b) <= {()}:
        return _poly_const(a.get((), 0) // b[()])
    if not a:
        return {}
    terms = list(a.items()) + list(b.items())
    g = 0
    for _, c in terms:
        g = math.gcd(g, abs(c))
    common = _mono_common([m for m, _ in terms])
    if g > 1 or common:
        a = {_mono_div(m, common): c // g for m, c in a.items()}
        b = {_mono_div(m, common): c // g for m, c in b.items()}
    if set(b) == {()}:
        c = b[()]
        if c == 1:
            return a
        if c > 0:  # floor((c*A + R) / c) = A + floor(R / c) for integer A: pull out what c divides
            exact = {m: v // c for m, v in a.items() if m and v % c == 0}
            rest = {m: v for m, v in a.items() if m and v % c != 0}
            k0 = a.get((), 0)
            exact = _poly_add(exact, _poly_const(k0 // c))
            if k0 % c:
                rest[()] = k0 % c
            if not rest:
                return exact
            if exact:
                return _poly_add(exact, _poly_floordiv(rest, b))
    if len(a) == len(b) and set(a) == set(b):  # a == k * b exactly
        m0 = next(iter(b))
        if a[m0] % b[m0] == 0:
            k = a[m0] // b[m0]
            if all(a[m] == k * b[m] for m in b):
                return _poly_const(k)
    return {(f"({_poly_str(a)})//({_poly_str(b)})",): 1}


def _poly_mod(a: Poly, b: Poly) -> Poly:
    """``a % b`` (Python floor semantics): folded for constants and exact multiples, else an atom."""
    if not b:
        raise SymbolicError("symbolic dim modulo zero")
    if set(a) <= {()} and set(b) <= {()}:
        return _poly_const(a.get((), 0) % b[()])
    if not a:
        return {}
    if set(b) == {()} and all(v % b[()] == 0 for v in a.values()):
        return {}
    if not _poly_add(a, _poly_mul(_poly_floordiv(a, b), b), -1):  # exact quotient (an opaque one never is)
        return {}
    return {(f"({_poly_str(a)})%({_poly_str(b)})",): 1}


def _poly_extremum(name: str, args: list[Poly]) -> Poly:
    """``max``/``min`` of several polynomials: folded when all are constant or equal, else an atom
    with its arguments in canonical (sorted) order."""
    if all(set(p) <= {()} for p in args):
        vals = [p.get((), 0) for p in args]
        return _poly_const(max(vals) if name == "max" else min(vals))
    strs = sorted({_poly_str(p) for p in args})
    if len(strs) == 1:
        return args[0]
    return {(f"{name}({', '.join(strs)})",): 1}


def _to_poly(node: ast.AST, src: str) -> Poly:
    if isinstance(node, ast.Expression):
        return _to_poly(node.body, src)
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return _poly_const(node.value)
    if isinstance(node, ast.Name):
        return {(node.id,): 1}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return _poly_mul(_poly_const(-1), _to_poly(node.operand, src))
    if isinstance(node, ast.BinOp):
        a, b = _to_poly(node.left, src), _to_poly(node.right, src)
        if isinstance(node.op, ast.Add):
            return _poly_add(a, b)
        if isinstance(node.op, ast.Sub):
            return _poly_add(a, b, -1)
        if isinstance(node.op, ast.Mult):
            return _poly_mul(a, b)
        if isinstance(node.op, ast.FloorDiv):
            return _poly_floordiv(a, b)
        if isinstance(node.op, ast.Mod):
            return _poly_mod(a, b)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _EXTREMA
            and len(node.args) >= 2 and not node.keywords):
        return _poly_extremum(node.func.id, [_to_poly(x, src) for x in node.args])
    raise SymbolicError(f"unsupported symbolic dim expression {src!r}: only ints, names, + - * // %, max(), min() "
                        "are allowed")


@lru_cache(maxsize=4096)
def _parse(src: str) -> tuple[tuple[tuple[str, ...], int], ...]:
    try:
        tree = ast.parse(src.strip(), mode="eval")
    except SyntaxError as e:
        raise SymbolicError(f"malformed symbolic dim {src!r}: {e.msg}") from None
    return tuple(sorted(_to_poly(tree, src).items()))


def normalize_dim(d: Dim) -> Dim:
    """Canonical form of a dim: ``int`` when constant, else the canonical expression string."""
    if isinstance(d, bool):
        raise SymbolicError(f"a dim cannot be a bool ({d!r})")
    if isinstance(d, int):
        return d
    if not isinstance(d, str):
        try:  # torch.SymInt / sympy expressions print as expressions
            return normalize_dim(int(d))
        except (TypeError, ValueError):
            return normalize_dim(str(d))
    poly = dict(_parse(d))
    if set(poly) <= {()}:
        return poly.get((), 0)
    return _poly_str(poly)


def free_symbols(d: Dim) -> set[str]:
    """Names a dim depends on (atoms of opaque quotients are reported whole)."""
    if isinstance(d, int):
        return set()
    out: set[str] = set()
    for mono, _ in _parse(d):
        for atom in mono:
            if _NAME.match(atom):
                out.add(atom)
            else:
                out |= {t for t in _IDENT.findall(atom) if t not in _EXTREMA}
    return out


def fold_dim(d: str, leaf: Callable[[int | str], T], floordiv: Callable[[T, T], T] = operator.floordiv,
             mod: Callable[[T, T], T] = operator.mod, maximum: Callable[[T, T], T] = max,
             minimum: Callable[[T, T], T] = min) -> T:
    """Fold a symbolic dim expression bottom-up: ``leaf`` maps integer literals and symbol names to
    values of the caller's domain (ints, TIR expressions...), combined with ``+ - *``, ``floordiv``,
    ``mod`` (floor semantics) and ``maximum``/``minimum``.

    The one walker over the dim grammar; raises :class:`SymbolicError` on anything else.
    """

    def walk(node: ast.AST) -> T:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return leaf(node.value)
        if isinstance(node, ast.Name):
            return leaf(node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)  # type: ignore[operator]
        if isinstance(node, ast.BinOp):
            x, y = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Add):
                return x + y  # type: ignore[operator]
            if isinstance(node.op, ast.Sub):
                return x - y  # type: ignore[operator]
            if isinstance(node.op, ast.Mult):
                return x * y  # type: ignore[operator]
            if isinstance(node.op, ast.FloorDiv):
                return floordiv(x, y)
            if isinstance(node.op, ast.Mod):
                return mod(x, y)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _EXTREMA
                and len(node.args) >= 2 and not node.keywords):
            f = maximum if node.func.id == "max" else minimum
            vals = [walk(a) for a in node.args]
            out = vals[0]
            for v in vals[1:]:
                out = f(out, v)
            return out
        raise SymbolicError(f"unsupported symbolic dim expression {d!r}: only ints, names, + - * // %, max(), min() "
                            "are allowed")

    try:
        tree = ast.parse(d.strip(), mode="eval")
    except SyntaxError as e:
        raise SymbolicError(f"malformed symbolic dim {d!r}: {e.msg}") from None
    return walk(tree)


def eval_dim(d: Dim, env: dict[str, int]) -> int:
    """Concrete value of a dim under a binding of its symbols."""
    if isinstance(d, int):
        return d

    def leaf(x: int | str) -> int:
        if isinstance(x, int):
            return x
        if x not in env:
            raise SymbolicError(f"symbol {x!r} of dim {d!r} is unbound (bound: {sorted(env)})")
        return int(env[x])

    return fold_dim(d, leaf)


def dim_add(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    return normalize_dim(f"({a}) + ({b})")


def dim_sub(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a - b
    return normalize_dim(f"({a}) - ({b})")


def dim_mul(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    return normalize_dim(f"({a}) * ({b})")


def dim_floordiv(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    return normalize_dim(f"({a}) // ({b})")


def dim_max(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    return normalize_dim(f"max({a}, {b})")


def dim_min(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return normalize_dim(f"min({a}, {b})")


def dims_equal(a: Dim, b: Dim) -> bool:
    return normalize_dim(a) == normalize_dim(b)


def bind_symbols(dims: tuple[Dim, ...], shape: tuple[int, ...], env: dict[str, int], where: str = "") -> None:
    """Bind bare-symbol dims of a declared shape to a concrete shape; check the rest.

    Raises :class:`SymbolicError` on a rank mismatch or an inconsistent binding.
    """
    if len(dims) != len(shape):
        raise SymbolicError(f"{where}rank mismatch: declared {list(dims)}, got {list(shape)}")
    for d, n in zip(dims, shape, strict=True):
        if isinstance(d, str) and _NAME.match(d):
            if d in env and env[d] != n:
                raise SymbolicError(f"{where}symbol {d} bound to {env[d]} and {n}")
            env[d] = n
    for axis, (d, n) in enumerate(zip(dims, shape, strict=True)):
        if isinstance(d, int) or not _NAME.match(d):
            try:
                want = eval_dim(d, env)
            except SymbolicError:
                continue
            if want != n:  # the axis by position ('dim 2 should be 2, got 3' named the size, not the axis)
                what = f"axis {axis}" if isinstance(d, int) else f"axis {axis} ({d})"
                raise SymbolicError(f"{where}{what} should be {want}, got {n} (shape {list(shape)}, declared "
                                    f"{list(dims)})")
