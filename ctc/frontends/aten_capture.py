"""Capture a PyTorch model into a ctc :class:`~ctc.ir.graph.Module`.

The main path is ``torch.export`` (non-strict) followed by ``run_decompositions({})``: an
empty table inlines higher-order ops (HF's rotary ``no_grad`` region) and functionalizes,
while keeping ``linear``, ``layer_norm`` and ``scaled_dot_product_attention`` whole.  Each
ATen node is then mapped through :mod:`ctc.frontends.aten_map`.  When ``torch.export``
itself fails (data-dependent Python control flow it cannot trace, unsupported Python
constructs), the fallback traces the model with ``torch.fx``'s ``make_fx`` at the example
shapes (pre-dispatch, module stack recorded): every dim is then static, which
``module.meta["capture_path"] = "fx"`` records.

Parameters keep their state-dict names and are shared, not copied; tied tensors become one
parameter read by several ``param`` nodes.  GPT-2-style ``Conv1D`` weights (``[in, out]``,
used through ``addmm``) are stored transposed so they become ordinary ``linear`` weights
(their names are listed in ``meta["transposed_params"]``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ctc.frontends import aten_map
from ctc.ir.graph import Module, Value
from ctc.ir.ops import OpError
from ctc.ir.symbolic import dim_add, normalize_dim
from ctc.ir.types import Dim, TensorType, dtype_name

BIG = 1 << 62  # slice ends at or beyond this mean "to the end"


class CaptureError(Exception):
    """The model could not be captured; the message lists every problem with its module scope."""


@dataclass(frozen=True)
class Problem:
    """One node capture could not translate: the op, why, where (module scope) and the model's source line."""

    op: str
    why: str
    scope: str
    source: str


class _Poisoned(Exception):
    """An operand comes from a node that already failed (reported there, not again)."""


_FAILED = object()  # env value of a node that could not be translated


def source_of(node: fx.Node) -> str:
    """``file.py:123 `code``` of the model line that produced ``node`` (from export's stack trace)."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)', trace)
    if not frames:
        return ""
    f, line, code = frames[-1]
    return f"{Path(f).name}:{line} `{code.strip()}`"


def format_problems(problems: Sequence[Problem], what: str) -> str:
    """One message listing every problem, grouped by op and reason, with counts, scopes and a source line."""
    groups: dict[tuple[str, str], list[Problem]] = {}
    for p in problems:
        groups.setdefault((p.op, p.why), []).append(p)
    lines = []
    for (op, why), ps in sorted(groups.items()):
        scopes = sorted({p.scope or "<root>" for p in ps})
        where = ", ".join(scopes[:4]) + (f" (+{len(scopes) - 4} more)" if len(scopes) > 4 else "")
        src = next((p.source for p in ps if p.source), "")
        lines.append(f"  - {op} ({len(ps)}x) at {where}{f' [{src}]' if src else ''}: {why}")
    ops = len({op for op, _ in groups})
    return (f"{ops} unsupported ATen op(s) / construct(s) in {what} ({len(problems)} node(s)); nothing was "
            "captured:\n" + "\n".join(lines))


# --------------------------------------------------------------------------- block detection
_LAYER_NAMES = ("layers", "layer", "h", "blocks", "block")


def find_block_list(model: nn.Module) -> tuple[str, int] | None:
    """The model's repeated layer stack: (module path, length) of the longest homogeneous ModuleList.

    Lists named like ``layers``/``layer``/``h``/``blocks`` win ties; None when there is none.
    """
    best: tuple[int, int, str] | None = None
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(c) for c in mod}
        if len(kinds) != 1:
            continue
        named = int(path.rsplit(".", 1)[-1] in _LAYER_NAMES)
        key = (len(mod), named, path)
        if best is None or key[:2] > best[:2]:
            best = key
    return (best[2], best[0]) if best else None


def blocks_from_scopes(nodes: list[fx.Node]) -> tuple[str, int] | None:
    """Repeated stack inferred from module paths alone (``X.0``, ``X.1``, ...): the longest run."""
    import re

    seen: dict[str, set[int]] = {}
    for n in nodes:
        s = scope_of(n)
        for mo in re.finditer(r"(?:^|\.)(\d+)(?=\.|$)", s):
            seen.setdefault(s[:mo.start(1)].rstrip("."), set()).add(int(mo.group(1)))
    best = None
    for prefix, idx in seen.items():
        k = 0
        while k in idx:
            k += 1
        if prefix and k and (best is None or k > best[1]):
            best = (prefix, k)
    return best


def scope_of(node: fx.Node, strip: str = "") -> str:
    """Innermost module path from ``nn_module_stack`` (``encoder.layer.3.attention.self.query``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = _clean_path(path)
    if strip and (path == strip[:-1] or path.startswith(strip)):
        path = path[len(strip):]
    return path


def _clean_path(path: str) -> str:
    # Strict-mode stacks look like "L['self'].encoder.layer[0]"; normalise to dotted form.
    for pre in ("L['self'].", "L['self']", "L__self__.", "L__self__"):
        if path.startswith(pre):
            path = path[len(pre):]
    return path.replace("[", ".").replace("]", "").replace("'", "")


def block_of(scope: str, prefix: str | None) -> int | None:
    if not prefix or not scope.startswith(prefix + "."):
        return None
    head = scope[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


# --------------------------------------------------------------------------- translator
class Translator:
    """Maps the nodes of one exported ATen graph onto a ctc module (see :mod:`aten_map`)."""

    def __init__(self, gm: fx.GraphModule, m: Module, *, params: dict[str, torch.Tensor],
                 param_nodes: dict[fx.Node, str], input_nodes: dict[fx.Node, str],
                 sym_names: dict[Any, str], block_prefix: str | None, strip: str = ""):
        self.gm = gm
        self.m = m
        self.params = params  # canonical name -> tensor (only registered in m when read)
        self.param_nodes = param_nodes  # placeholder -> canonical parameter name
        self.sym_names = sym_names
        self.block_prefix = block_prefix
        self.strip = strip
        self.env: dict[fx.Node, Any] = {}
        self.scope = ""
        self.block: int | None = None
        self.node: fx.Node | None = None
        self.transposed: set[str] = set()
        self.problems: list[Problem] = []
        self._views: set[str] = set()
        self._param_cache: dict[tuple[int, str], Value] = {}
        for ph, name in input_nodes.items():
            val = ph.meta["val"]
            t = TensorType(tuple(self.dim(d) for d in val.shape), dtype_name(val.dtype))
            self.env[ph] = m.add_input(name, t)

    # ------------------------------------------------------------------ errors
    def unsupported(self, node: fx.Node, why: str) -> Exception:
        """The error a handler raises for a node it cannot translate (collected, reported together)."""
        return aten_map.CaptureUnsupported(why)

    def problem(self, node: fx.Node, op: str, why: str) -> None:
        self.problems.append(Problem(op, why, self.scope, source_of(node)))

    # ------------------------------------------------------------------ values
    def emit(self, op: str, inputs: Sequence[Value], attrs: dict[str, Any] | None = None) -> Value:
        return self.m.create_node(op, list(inputs), attrs or {}, scope=self.scope, block=self.block).output

    def t(self, arg: Any) -> Value:
        """The ctc value of a tensor argument (parameters are read through a param node)."""
        if not isinstance(arg, fx.Node):
            raise CaptureError(f"expected a tensor argument at {self.scope or '<root>'}, got {arg!r}")
        if arg in self.param_nodes:
            return self._read_param(self.param_nodes[arg])
        v = self.env.get(arg)
        if isinstance(v, Value):
            return v
        if v is _FAILED:
            raise _Poisoned()
        raise CaptureError(f"value {arg.name} used at {self.scope or '<root>'} was not translated to a tensor")

    def _read_param(self, name: str) -> Value:
        key = (id(self.node), name)
        if key not in self._param_cache:
            if name not in self.m.params:
                self.m.add_param(name, self.params[name])
            self._param_cache[key] = self.m.param(name, scope=self.scope, block=self.block)
        return self._param_cache[key]

    def param_view(self, arg: Any, dim: Any, index: Any) -> Value | None:
        """``w.select(dim, index)`` of a parameter as a parameter of its own (``name.index``), so that a
        stacked weight (mixture-of-experts ``gate_up_proj[e]``) reaches passes as ordinary weights."""
        if not isinstance(arg, fx.Node) or arg not in self.param_nodes or not isinstance(index, int) \
                or not isinstance(dim, int):
            return None
        name = self.param_nodes[arg]
        t = self.params[name]
        ax = dim % t.dim()
        i = index % t.shape[ax]
        vname = f"{name}.{i}" if ax == 0 else f"{name}.{ax}.{i}"
        if vname in self.params and vname not in self._views:
            vname = f"{name}[{ax}:{i}]"
        if vname not in self.params:
            self.params[vname] = t.select(ax, i).clone()  # its own storage (safetensors refuses shared views)
            self._views.add(vname)
        return self._read_param(vname)

    def transposed_param(self, arg: Any) -> Value | None:
        """For a parameter used only as the right operand of addmm/mm: read it stored transposed."""
        if not isinstance(arg, fx.Node) or arg not in self.param_nodes:
            return None
        name = self.param_nodes[arg]
        if name in self.m.params and name not in self.transposed:
            return None
        for ph, n in self.param_nodes.items():
            if n != name:
                continue
            for user in ph.users:
                t = str(user.target)
                if not ((t == "aten.addmm.default" and user.args[2] is ph and user.args[1] is not ph)
                        or (t == "aten.mm.default" and user.args[1] is ph and user.args[0] is not ph)):
                    return None
        if self.params[name].dim() != 2:
            return None
        if name not in self.transposed:
            self.params[name] = self.params[name].t().contiguous()
            self.transposed.add(name)
        return self._read_param(name)

    def cast_to(self, v: Value, dtype: str) -> Value:
        if v.type.dtype == dtype:
            return v
        return self.emit("cast", [v], {"dtype": dtype})

    def out_dtype(self, node: fx.Node) -> str:
        val = node.meta["val"]
        if isinstance(val, (list, tuple)):
            val = val[0]
        return dtype_name(val.dtype)

    def out_shape(self, node: fx.Node) -> tuple[Dim, ...]:
        return tuple(self.dim(d) for d in node.meta["val"].shape)

    # ------------------------------------------------------------------ scalars and dims
    def dim(self, d: Any) -> Dim:
        """An int, SymInt or size-valued fx node as a ctc dim (symbols renamed: ``seq``, ``batch``)."""
        if isinstance(d, fx.Node):
            d = d.meta.get("val")
        if isinstance(d, bool):
            raise CaptureError(f"a bool where a size was expected at {self.scope or '<root>'}")
        if isinstance(d, int):
            return d
        if isinstance(d, torch.SymInt):
            expr = _resolve_extrema(d.node.expr, getattr(d.node, "shape_env", None))
            if expr.is_number:
                return int(expr)
            return normalize_dim(self._expr(expr))
        raise CaptureError(f"cannot use {d!r} as a size at {self.scope or '<root>'}")

    def _expr(self, e: Any) -> str:
        import sympy
        from torch.utils._sympy.functions import FloorDiv, Mod, PythonMod

        if isinstance(e, sympy.Integer):
            return str(int(e))
        if isinstance(e, sympy.Symbol):
            if e not in self.sym_names:
                raise CaptureError(f"symbolic size {e} at {self.scope or '<root>'} is not derived from an input "
                                   "dim (data-dependent shape); capture with static shapes instead")
            return self.sym_names[e]
        if isinstance(e, sympy.Add):
            return " + ".join(f"({self._expr(a)})" for a in e.args)
        if isinstance(e, sympy.Mul):
            return " * ".join(f"({self._expr(a)})" for a in e.args)
        if isinstance(e, FloorDiv):
            return f"({self._expr(e.args[0])}) // ({self._expr(e.args[1])})"
        if isinstance(e, (PythonMod, Mod, sympy.Mod)):
            return f"({self._expr(e.args[0])}) % ({self._expr(e.args[1])})"
        if type(e).__name__ in ("Max", "Min"):  # sympy's or torch's own (torch.utils._sympy.functions)
            f = type(e).__name__.lower()
            args = [self._expr(a) for a in e.args]
            out = args[0]
            for a in args[1:]:
                out = f"{f}({out}, {a})"
            return out
        if isinstance(e, sympy.Pow) and e.args[1].is_Integer and int(e.args[1]) >= 1:
            return " * ".join([f"({self._expr(e.args[0])})"] * int(e.args[1]))
        raise CaptureError(f"symbolic size expression {e} at {self.scope or '<root>'} is not supported "
                           "(only + - * // %, max and min of input dims)")

    def axis(self, a: Any, rank: int) -> int:
        a = int(a)
        r = a + rank if a < 0 else a
        if not 0 <= r < max(rank, 1):
            raise CaptureError(f"axis {a} out of range for rank {rank} at {self.scope or '<root>'}")
        return r

    def scalar(self, v: Any, node: fx.Node) -> float | int | bool:
        if isinstance(v, (bool, int, float)):
            return v
        raise self.unsupported(node, f"non-constant scalar operand {v!r}")

    def scalar_tensor(self, v: Any, node: fx.Node) -> Value:
        """A 0-d i64 tensor holding a symbolic size (``arange(s, s+1)`` reshaped to ``[]``)."""
        d = self.dim(v)
        r = self.emit("arange", [], {"start": (d,), "end": (dim_add(d, 1),), "dtype": "i64"})
        return self.emit("reshape", [r], {"shape": ()})

    # ------------------------------------------------------------------ composite helpers
    def binary(self, op: str, a: Any, b: Any, node: fx.Node, *, compare: bool = False) -> Value:
        out = self.out_dtype(node)
        if isinstance(b, tuple) and b and b[0] == "scaled":
            _, b0, alpha = b
            b = self.emit("mul", [self.t(b0)], {"scalar": float(alpha)}) if isinstance(b0, fx.Node) else b0 * alpha
        ta = isinstance(a, Value) or (isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor))
        tb = isinstance(b, Value) or (isinstance(b, fx.Node) and isinstance(b.meta.get("val"), torch.Tensor))

        def val(x: Any) -> Value:
            return x if isinstance(x, Value) else self.t(x)

        if not ta and isinstance(a, (fx.Node, torch.SymInt)):
            a, ta = self.scalar_tensor(a, node), True
        if not tb and isinstance(b, (fx.Node, torch.SymInt)):
            b, tb = self.scalar_tensor(b, node), True
        if ta and tb:
            va, vb = val(a), val(b)
            if compare:
                common = dtype_name(torch.promote_types(_td(va.type.dtype), _td(vb.type.dtype)))
                va, vb = self.cast_to(va, common), self.cast_to(vb, common)
            else:
                va, vb = self.cast_to(va, out), self.cast_to(vb, out)
            return self.emit(op, [va, vb])
        if not ta and not tb:
            raise self.unsupported(node, "both operands are Python scalars")
        reverse = not ta
        tensor, s = (val(a), b) if ta else (val(b), a)
        s = self.scalar(s, node)
        if compare:
            if tensor.type.dtype not in ("f32", "f16", "bf16", "f64") and isinstance(s, float) and s != int(s):
                tensor = self.cast_to(tensor, "f32")
        else:
            tensor = self.cast_to(tensor, out)
        return self.emit(op, [tensor], {"scalar": float(s), "reverse": reverse})

    def slice_bounds(self, x: Value, axis: int, start: Any, end: Any) -> tuple[Dim, Dim]:
        """torch's slice bounds (negative, past the end, symbolic) as canonical ``0 <= start <= end <= dim``."""
        dim = x.type.shape[axis]

        def canon(v: Any, default: Dim) -> Dim:
            if v is None:
                return default
            if isinstance(v, int):
                if v >= BIG:
                    return dim
                if v < 0:
                    if isinstance(dim, int):
                        return max(dim + v, 0)
                    return normalize_dim(f"({dim}) - {-v}")
                if isinstance(dim, int):
                    return min(v, dim)
                return v
            return self.dim(v)

        s, e = canon(start, 0), canon(end, dim)
        if isinstance(s, int) and isinstance(e, int) and e < s:
            e = s
        return s, e

    def slice(self, x: Value, axis: int, start: Any, end: Any, step: Any, node: fx.Node) -> Value:
        step = int(step or 1)
        s, e = self.slice_bounds(x, axis, start, end)
        if s == 0 and normalize_dim(e) == x.type.shape[axis] and step == 1:
            return x
        return self.emit("slice", [x], {"axis": axis, "start": (s,), "end": (e,), "step": step})

    # ------------------------------------------------------------------ driver
    def run(self, live: list[fx.Node], outer_scope: str | None = None) -> None:
        for node in live:
            self.node = node
            self.scope = scope_of(node, self.strip)
            if not self.scope and outer_scope is not None:
                self.scope = outer_scope
            self.block = block_of(self.scope, self.block_prefix)
            name = aten_map.target_name(node)
            if name in aten_map.IGNORED or is_size_arith(node):
                continue
            if name in aten_map.REGION_OPS:
                self.env[node] = self._inline_region(node)
                continue
            handler = aten_map.TABLE.get(name)
            if handler is None and name not in aten_map.IDENTITY:
                self.problem(node, name, hint_for(name))
                self.env[node] = _FAILED
                continue
            try:
                res = self.t(node.args[0]) if handler is None else handler(self, node)
                self.env[node] = self._fix_types(node, res)
            except _Poisoned:
                self.env[node] = _FAILED
            except aten_map.CaptureUnsupported as e:
                self.problem(node, e.op or name, str(e))
                self.env[node] = _FAILED
            except (CaptureError, OpError) as e:
                self.problem(node, name, str(e))
                self.env[node] = _FAILED
            except Exception as e:  # noqa: BLE001 - a handler bug: reported with the others, not a traceback
                self.problem(node, name, f"internal error translating it ({type(e).__name__}: {e}); please report "
                                         "this with the model")
                self.env[node] = _FAILED

    def _inline_region(self, node: fx.Node) -> list[Value]:
        """Inline a higher-order region (``with torch.no_grad()`` / autocast block): its ops run as usual."""
        sub_node, operands = region_parts(node)
        sub = getattr(self.gm, str(sub_node.target))
        phs = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if len(phs) != len(operands):
            raise CaptureError(f"internal: region {sub_node.target} takes {len(phs)} operands, got {len(operands)}")
        for ph, a in zip(phs, operands, strict=True):
            if isinstance(a, fx.Node) and a in self.param_nodes:
                self.param_nodes[ph] = self.param_nodes[a]
            elif isinstance(a, fx.Node) and (isinstance(self.env.get(a), Value) or self.env.get(a) is _FAILED):
                self.env[ph] = self.env[a]
        scope = self.scope
        outer_gm, self.gm = self.gm, sub
        try:
            self.run([n for n in sub.graph.nodes if n.op == "call_function"], outer_scope=scope)
        finally:
            self.gm = outer_gm
        out = next(n for n in sub.graph.nodes if n.op == "output").args[0]
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        vals: list[Any] = []
        for o in out:
            try:
                vals.append(self.t(o) if isinstance(o, fx.Node) else o)
            except (_Poisoned, CaptureError):
                vals.append(_FAILED)
        return vals

    def _fix_types(self, node: fx.Node, res: Any) -> Any:
        val = node.meta.get("val")
        if isinstance(res, Value) and isinstance(val, torch.Tensor):
            want = dtype_name(val.dtype)
            if res.type.rank != val.dim():
                raise CaptureError(f"internal: {aten_map.target_name(node)} at {self.scope or '<root>'} gave "
                                   f"{res.type}, torch gives shape {tuple(val.shape)}")
            return self.cast_to(res, want)
        return res


def _resolve_extrema(expr: Any, shape_env: Any) -> Any:
    """``Max``/``Min`` of a size expression decided by the value ranges export recorded for its
    symbols (MPT's ``64 - Max(0, 64 - seq)`` is ``seq`` where ``seq <= 64``); undecided ones stay."""
    if shape_env is None or not hasattr(expr, "atoms"):
        return expr
    import sympy

    def decide(e: Any) -> Any:
        name = type(e).__name__
        if name not in ("Max", "Min"):
            return e
        args = list(e.args)
        for a in args:
            others = [b for b in args if b is not a]
            rel = sympy.Ge if name == "Max" else sympy.Le
            try:
                ok = all(shape_env._maybe_evaluate_static(rel(a, b)) is sympy.true for b in others)
            except Exception:  # noqa: BLE001 - undecidable here: keep the extremum
                ok = False
            if ok:
                return a
        return e

    try:
        return expr.replace(lambda e: type(e).__name__ in ("Max", "Min"), decide)
    except Exception:  # noqa: BLE001
        return expr


def is_size_arith(node: fx.Node) -> bool:
    """Arithmetic on symbolic sizes (``s - 1``): no tensor; users read its value from metadata."""
    val = node.meta.get("val")
    return isinstance(val, (torch.SymInt, torch.SymBool, torch.SymFloat)) and \
        aten_map.target_name(node) not in aten_map.TABLE


def _td(name: str) -> torch.dtype:
    from ctc.ir.types import torch_dtype

    return torch_dtype(name)


# --------------------------------------------------------------------------- graph walking
def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []

    def visit(a: Any) -> None:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)

    visit(list(node.args))
    visit(dict(node.kwargs))
    return out


def live_nodes(graph: fx.Graph, outputs: list[fx.Node]) -> list[fx.Node]:
    """call_function nodes the selected outputs depend on, in graph order."""
    live: set[fx.Node] = set()
    stack = list(outputs)
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        stack.extend(_tensor_args(n))
    return [n for n in graph.nodes if n in live and n.op == "call_function"]


def hint_for(name: str) -> str:
    """Why ``name`` has no mapping and what to do (keyed on the ops export really produces)."""
    from ctc.frontends.core_aten import NOT_SUPPORTED

    return aten_map.HINTS.get(name) or NOT_SUPPORTED.get(name) or (
        "no ctc mapping (and no Core ATen decomposition); add a handler to ctc/frontends/core_aten.py")


def unmapped_ops(gm: fx.GraphModule) -> set[str]:
    """Ops in ``gm`` (regions included) that no handler maps."""
    return {aten_map.target_name(n) for n in _all_call_nodes(gm)
            if not aten_map.supported(aten_map.target_name(n)) and not is_size_arith(n)}


def to_core_aten(ep: Any) -> Any:
    """Decompose an exported program to Core ATen where it holds ops no handler maps (ctc's own ops,
    sdpa, linear, convolutions... stay whole), and functionalize in-place ops."""
    if unmapped_ops(ep.graph_module):
        from ctc.frontends.core_aten import decomposition_table

        return ep.run_decompositions(decomposition_table())
    if _needs_functionalization(ep.graph_module):
        return ep.run_decompositions({})  # in-place ops present: functionalize them (slower)
    return ep


def _dedupe_params(named: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Map every state name to a canonical name; tensors sharing storage, shape and strides share one."""
    seen: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for name, t in named.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.numel() else ("empty", name)
        out[name] = seen.setdefault(key, name)
    return out


# --------------------------------------------------------------------------- export path
def _export(model: nn.Module, inputs: dict[str, torch.Tensor], dyn: dict[str, dict[int, str]], *,
            guessed: bool = False) -> Any:
    """``torch.export`` with ``dyn``'s axes dynamic; ``guessed`` (``dynamic=True``, axis 1 taken for the sequence
    without the caller naming it) lets export keep an axis static where the model fixes its size (an MLP's
    features, a CNN's channels) instead of failing on it."""
    kind = torch.export.Dim.AUTO if guessed else torch.export.Dim.DYNAMIC
    dims: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    for k, v in inputs.items():
        spec = dyn.get(k)
        if not isinstance(v, torch.Tensor) or not spec:
            shapes[k] = None
            continue
        d = {}
        for axis, sym in spec.items():
            if sym not in dims:
                dims[sym] = kind
            d[axis] = dims[sym]
        shapes[k] = d
    ep = torch.export.export(model, (), kwargs=dict(inputs), dynamic_shapes=shapes, strict=False)
    return to_core_aten(ep)


def region_parts(node: fx.Node) -> tuple[fx.Node, list[Any]]:
    """The submodule and operands of a higher-order region node (wrap_with_set_grad_enabled/autocast)."""
    for i, a in enumerate(node.args):
        if isinstance(a, fx.Node) and a.op == "get_attr":
            return a, list(node.args[i + 1:])
    raise CaptureError(f"internal: region node {node.name} has no subgraph")


def _all_call_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    out: list[fx.Node] = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            out.append(n)
            if aten_map.target_name(n) in aten_map.REGION_OPS:
                out.extend(_all_call_nodes(getattr(gm, str(region_parts(n)[0].target))))
    return out


def _needs_functionalization(gm: fx.GraphModule) -> bool:
    for n in _all_call_nodes(gm):
        schema = getattr(n.target, "_schema", None)
        if schema is not None and (schema.is_mutable or schema.name.endswith("_") and
                                   not schema.name.split("::")[-1].startswith("_")):
            return True
        if aten_map.target_name(n) in aten_map.REGION_OPS - {"wrap_with_set_grad_enabled", "wrap_with_autocast"}:
            return True
    return False


def normalize_dynamic(dynamic: bool | Mapping[str, Mapping[int, str]] | Sequence[str],
                      inputs: Mapping[str, Any]) -> dict[str, dict[int, str]]:
    """``True`` -> axis 1 of every rank >= 2 input is the symbol ``seq``; a list of names picks the
    symbols (``["batch", "seq"]`` for axes 0 and 1); a dict gives ``{input: {axis: symbol}}``."""
    if dynamic is False or dynamic is None:
        return {}
    if dynamic is True:
        dynamic = ["_", "seq"]
    if isinstance(dynamic, (str, bytes)) or not isinstance(dynamic, (Mapping, Sequence)):
        raise CaptureError(f"dynamic={dynamic!r}: give True, a list of axis names (['batch', 'seq']: None or '_' for "
                           "a static axis), a dict {input: {axis: name}}, or False")
    if isinstance(dynamic, Mapping):
        return {k: dict(v) for k, v in dynamic.items()}
    names = list(dynamic)
    out: dict[str, dict[int, str]] = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            out[k] = {i: s for i, s in enumerate(names) if s not in ("_", None) and i < v.dim()}
    return out


def capture(
    model: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    *,
    dynamic: bool | Mapping[str, Mapping[int, str]] | Sequence[str] = True,
    name: str | None = None,
    output: str | int | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Module:
    """Capture ``model(**example_inputs)`` into a ctc Module.

    ``dynamic``: see :func:`normalize_dynamic` (default: sequence length is the symbol ``seq``).
    ``output``: which output to keep when the model returns several (a ModelOutput key such
    as ``"logits"``/``"last_hidden_state"``, or a leaf index); default: all tensor outputs.
    Non-tensor example inputs (``use_cache=False``) are passed through as constants.
    Raises :class:`CaptureError` naming every unsupported op and where it came from.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, Mapping):
        raise CaptureError(f"example_inputs must map forward's parameter names to tensors ({{'x': x}}), got "
                           f"{type(example_inputs).__name__}")
    _check_input_names(model, example_inputs)
    modes = {mod: mod.training for mod in model.modules()}  # the caller's model is given back as it came
    model.eval()
    try:
        dyn = normalize_dynamic(dynamic, example_inputs)
        path = "export"
        from ctc.frontends.adapters import capture_forms

        with torch.no_grad(), capture_forms(model):  # MoE layers dispatch densely, SSM scans are one op
            try:
                ep = _export(model, dict(example_inputs), dyn, guessed=dynamic is True)
            except Exception as e:  # noqa: BLE001 - any export failure selects the fallback
                export_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                shapes = {k: tuple(v.shape) for k, v in example_inputs.items() if isinstance(v, torch.Tensor)}
                small = [f"{sym!r} (input {k!r} axis {ax}) is {shapes[k][ax]}" for k, axes in dyn.items()
                         for ax, sym in axes.items() if k in shapes and 0 <= ax < len(shapes[k]) and shapes[k][ax] < 2]
                if small:  # the usual cause: export specializes sizes 0 and 1, so such an axis cannot stay dynamic
                    export_error += (f"; in the example, dynamic axis {', '.join(small)}: give examples of size >= 2 "
                                     "on dynamic axes")
                ep = None
                path = "fx"
            if ep is None:
                from ctc.frontends.fx_trace import capture_fx

                m = capture_fx(model, example_inputs, output=output, name=name, why=export_error)
                warnings.warn(m.meta["capture_warning"], UserWarning, stacklevel=2)  # said only in meta before
        if ep is not None:
            m = _from_exported(ep, model, dyn, output=output, name=name, guessed=dynamic is True)
            if dynamic is True:
                _warn_static_guesses(m, dyn)
        m.meta["capture_path"] = path
        if meta:
            m.meta.update(meta)
        from ctc.frontends.patterns import fuse_patterns

        fuse_patterns(m)
        return m
    finally:
        for mod, training in modes.items():
            mod.training = training


def _warn_static_guesses(m: Module, dyn: Mapping[str, Mapping[int, str]]) -> None:
    """``dynamic=True`` axes that came out static because the example had size 0 or 1 there (export specializes
    those): say so, since the model may well allow other sizes; an axis the model fixes stays static silently."""
    types = {v.name: v.type for v in m.inputs}
    small = [f"input {k!r} axis {ax} ({sym!r}) is {types[k].shape[ax]}" for k, axes in dyn.items() if k in types
             for ax, sym in axes.items() if ax < len(types[k].shape) and isinstance(types[k].shape[ax], int)
             and types[k].shape[ax] < 2]
    if small:
        warnings.warn(f"captured with static shapes where dynamic=True asked for a dynamic axis: in the example, "
                      f"{', '.join(small)}; give examples of size >= 2 on dynamic axes", UserWarning, stacklevel=3)


def _check_input_names(model: nn.Module, inputs: Mapping[str, Any]) -> None:
    """Example inputs go to ``forward`` by name: say what it takes when a name does not fit."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    bad = [k for k in inputs if k not in params]
    if bad:
        raise CaptureError(f"{type(model).__name__}.forward takes ({', '.join(params)}); got {', '.join(bad)}. "
                           "Name the example inputs after the forward's parameters.")


def capture_exported(ep: Any, *, name: str | None = None, output: str | int | None = None,
                     meta: Mapping[str, Any] | None = None) -> Module:
    """Capture an already exported program (e.g. from :func:`ctc.frontends.load_pt2`)."""
    ep = to_core_aten(ep)
    m = _from_exported(ep, None, {}, output=output, name=name)
    m.meta["capture_path"] = "export"
    if meta:
        m.meta.update(meta)
    from ctc.frontends.patterns import fuse_patterns

    fuse_patterns(m)
    return m


def _select_outputs(out_nodes: list[Any], spec: Any, output: str | int | None) -> tuple[list[fx.Node], list[str]]:
    import torch.utils._pytree as pytree

    names = [f"out{i}" for i in range(len(out_nodes))]
    if spec is not None:
        try:
            paths = [pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(
                pytree.tree_unflatten(list(range(len(out_nodes))), spec))[0]]
            names = [p.strip("[]'.\"") or f"out{i}" for i, p in enumerate(paths)]
        except Exception:  # noqa: BLE001 - names are cosmetic
            pass
    pairs = [(n, nm) for n, nm in zip(out_nodes, names, strict=True)
             if isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)]
    if output is None:
        return [p[0] for p in pairs], [p[1] for p in pairs]
    if isinstance(output, int):
        if not 0 <= output < len(pairs):
            raise CaptureError(f"output index {output} out of range: the model has {len(pairs)} tensor outputs")
        return [pairs[output][0]], [pairs[output][1]]
    for n, nm in pairs:
        if nm == output:
            return [n], [nm]
    raise CaptureError(f"the model has no output {output!r} (outputs: {[p[1] for p in pairs]})")


def _from_exported(ep: Any, model: nn.Module | None, dyn: Mapping[str, Mapping[int, str]], *, output: str | int | None,
                   name: str | None, strip: str = "", guessed: bool = False) -> Module:
    gm = ep.graph_module
    sig = ep.graph_signature
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    state: dict[str, torch.Tensor] = {}
    for spec in sig.input_specs:
        if spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            t = ep.state_dict.get(spec.target) if spec.target in ep.state_dict else ep.constants[spec.target]
            state[spec.target[len(strip):] if strip and spec.target.startswith(strip) else spec.target] = t.detach()
    canon = _dedupe_params(state)
    by_name = {n.name: n for n in placeholders}
    param_nodes: dict[fx.Node, str] = {}
    input_nodes: dict[fx.Node, str] = {}
    for spec in sig.input_specs:
        node = by_name[spec.arg.name]
        if spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            tgt = spec.target[len(strip):] if strip and spec.target.startswith(strip) else spec.target
            param_nodes[node] = canon[tgt]
        elif spec.kind.name == "USER_INPUT" and isinstance(node.meta.get("val"), torch.Tensor):
            input_nodes[node] = spec.arg.name
        elif spec.kind.name == "USER_INPUT":
            continue
        else:
            raise CaptureError(f"unsupported exported-program input kind {spec.kind.name} ({spec.target})")
    return _translate(gm, model, params={canon[k]: v for k, v in state.items() if canon[k] == k},
                      param_nodes=param_nodes, input_nodes=input_nodes,
                      out_spec=ep.module_call_graph[0].signature.out_spec if ep.module_call_graph else None,
                      output=output, name=name, strip=strip, dyn=dyn, guessed=guessed)


def _translate(gm: fx.GraphModule, model: nn.Module | None, *, params: dict[str, torch.Tensor],
               param_nodes: dict[fx.Node, str], input_nodes: dict[fx.Node, str], out_spec: Any,
               output: str | int | None, name: str | None, strip: str = "",
               dyn: Mapping[str, Mapping[int, str]] | None = None, guessed: bool = False) -> Module:
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs = out_node.args[0]
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    sel, out_names = _select_outputs(outs, out_spec, output)
    if not sel:
        raise CaptureError("the model returns no tensor output")
    live = live_nodes(gm.graph, sel)

    # Symbols: name input dims after the user's spec (seq, batch, ...), else d0, d1, ...
    import sympy

    sym_names: dict[Any, str] = {}
    for ph, in_name in input_nodes.items():
        for axis, d in enumerate(ph.meta["val"].shape):
            if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol) and d.node.expr not in sym_names:
                want = (dyn or {}).get(in_name, {}).get(axis)
                # Dims given the same name (input_ids and attention_mask "batch") are one symbol, even where the
                # model never relates them (Falcon's alibi reads only the mask's batch). A guessed name
                # (dynamic=True: axis 1 of every input) is not the caller's word: sizes export found independent
                # (inputs of unrelated lengths) keep apart names, or the IR would bind them ('seq bound to 3 and 4').
                sym = base = want or f"d{len(sym_names)}"  # not `name`: that is the module's
                while guessed and sym in sym_names.values():
                    sym = f"{base}_{sum(1 for v in sym_names.values() if v.startswith(base))}"
                sym_names[d.node.expr] = sym
    blocks = find_block_list(model) if model is not None else blocks_from_scopes(live)
    prefix = blocks[0] if blocks else None
    if prefix and strip and prefix.startswith(strip):
        prefix = prefix[len(strip):]
    m = Module(name or (type(model).__name__ if model is not None else "main"))
    tr = Translator(gm, m, params=params, param_nodes=param_nodes, input_nodes=input_nodes, sym_names=sym_names,
                    block_prefix=prefix, strip=strip)
    tr.run(live)
    if tr.problems:
        raise CaptureError(format_problems(tr.problems, m.name))
    m.set_outputs([tr.t(n) for n in sel], out_names)
    m.meta.update({
        "block_prefix": prefix or "",
        "num_blocks": blocks[1] if blocks else 0,
        "inputs": [v.name for v in m.inputs],
        "outputs": out_names,
        "transposed_params": sorted(tr.transposed),
    })
    return m


__all__ = ["CaptureError", "Problem", "Translator", "block_of", "capture", "find_block_list", "format_problems",
           "live_nodes", "scope_of", "source_of", "to_core_aten"]
