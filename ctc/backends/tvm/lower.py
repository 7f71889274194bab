"""Lower a ctc :class:`~ctc.ir.graph.Module` to a Relax ``IRModule`` by walking its nodes.

Why: the backend compiles what the passes produced (compressed ops included), not a
re-export of the original torch model.  Each ctc op has one lowering rule in :data:`RULES`
(``relax.op.*``, or a TE expression through ``emit_te`` where TVM's own op would be slow or
would differ from the reference semantics).  The rules read the reference implementations in
``ctc/ir/ops/*.py`` as the spec; tests compare every rule with the interpreter.

Choices made here:

* Parameters are bound as constants (default) or passed as function inputs
  (``params="input"``; :class:`Lowered` then lists the arrays to pass, in order).  Linear
  weights enter pre-transposed to ``[K, N]`` (vectorizable along N by the matmul schedule);
  ``quant_linear`` weights enter pre-packed for the integer kernels.
* Symbolic dims become ``tirx.Var`` shape variables (dynamic sequence length), or are
  specialised to integers (``static_dims``) when the caller wants static-shape code.
* ``fast_math`` (default on) computes ``exp``/``erf``/``tanh`` of f32 with TVM's vectorizable
  approximations (``topi.fast_*``, relative error <= 5e-6) instead of scalar libm calls,
  which otherwise dominate GELU and softmax time.  ``pow`` by 2 or 3 is rewritten to
  multiplications (a scalar ``powf`` per element otherwise).
* ``quant_linear`` with quantized activations lowers to the integer kernels of
  :mod:`ctc.backends.tvm.int_kernels` (u8 x s8 -> i32, VNNI where available) when its weight
  operands are parameters; otherwise (computed weights) to a fake-quant float expression
  with identical semantics, and :attr:`Lowered.notes` says so.
* Ops without a rule are collected and reported together in one :class:`LoweringError`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ctc.ir.graph import Module, Node, Value
from ctc.ir.symbolic import SymbolicError, fold_dim
from ctc.ir.types import TensorType

__all__ = ["DTYPE_MAP", "PARAM_DERIVATIONS", "LoweringError", "Lowered", "RULES", "derive_param", "lower",
           "supported_ops"]

DTYPE_MAP = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64", "i64": "int64",
             "i32": "int32", "i16": "int16", "i8": "int8", "u8": "uint8", "bool": "bool"}


class LoweringError(Exception):
    """The module cannot be lowered (unsupported ops, bad options); the message lists every problem."""


@dataclass
class Lowered:
    """Result of :func:`lower`: the Relax module and how to call its ``main``."""

    mod: Any
    input_names: list[str]
    output_names: list[str]
    param_inputs: list[tuple[str, np.ndarray]] = field(default_factory=list)
    # how each bound array derives from the module's parameters (replayable without TVM,
    # :func:`derive_param`), or None where only the array itself can say (stored beside the library)
    param_sources: list[dict[str, Any] | None] = field(default_factory=list)
    symbols: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    int_kernels: int = 0
    amx_kernels: int = 0  # of which on AMX tiles (a library with any needs the OS's tile permission to run)
    # bytes the AMX-BF16 weight pieces take beyond the f32 weights they replace (bf16x6: 1.5x, plus padding)
    amx_f32_added_bytes: int = 0
    fp32_matmul: str = "strict"  # how f32 linears ran: "strict" (f32 FMAs; also: none ran on AMX) or an amx_f32 mode
    inplace_inputs: list[str] = field(default_factory=list)
    # cuda: blocks of the persistent decode step's launch (cuda_decode_stack), 0 where the library has none: a GPU
    # with another multiprocessor count must not run it (its grid barrier needs every block resident)
    persistent_grid: int = 0


# ----------------------------------------------------------------------------- parameter layouts
def _concat0(*ts: torch.Tensor) -> torch.Tensor:
    return torch.cat(ts, dim=0)


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``t`` ([N, K]) with ``rows`` zero rows and ``cols`` zero columns appended."""
    out = t.new_zeros(t.shape[0] + rows, t.shape[1] + cols)
    out[:t.shape[0], :t.shape[1]] = t
    return out


# Layout changes the lowering applies to parameters, replayable on any machine with torch alone:
# a library's weights can then be bound from the module's parameters (one copy on disk), or
# from weights made elsewhere (the GPU benchmark binds seeded random weights this way).
def _panels_torch(width: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.T.reshape(t.shape[1], t.shape[0] // width, width).permute(1, 0, 2)


def _gate_up_order(features: int) -> np.ndarray:
    from ctc.backends.tvm.cuda_gemm import gate_up_order

    return gate_up_order(features)


PARAM_DERIVATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "identity": lambda t: t,
    "transpose": lambda t: t.T,
    "concat0": _concat0,
    **{f"panels{w}": _panels_torch(w) for w in (8, 16, 32, 64, 128)},
    # sibling linears' weights side by side (q|k|v), then in column panels: one GEMM over all of them
    **{f"concat0_panels{w}": (lambda p: lambda *ts: p(_concat0(*ts)))(_panels_torch(w)) for w in (8, 16, 32, 64, 128)},
    "pad": _pad,
    "pad_transpose": lambda t, rows, cols: _pad(t, rows, cols).T,
    "pad_end": lambda t, extra: torch.nn.functional.pad(t, (0, extra)),
    "amx_bf16_pieces": lambda t, pieces: _amx_pieces_torch(t, pieces),
    "gate_up8": lambda g, u: _concat0(g, u)[torch.from_numpy(_gate_up_order(g.shape[0]))],
    # the persistent decode step (cuda_decode_stack): per-layer weights stacked over layers, its workspace
    "stack_layers": lambda *ts, parts=1, pack="", layout="": _stack_layers(*ts, parts=parts, pack=pack, layout=layout),
    "astype": lambda t, dtype: t.to(getattr(torch, dtype)),
    "zeros": lambda shape, dtype: torch.zeros(shape, dtype=getattr(torch, dtype)),
}


def _stack_layers(*ts: torch.Tensor, parts: int, pack: str, layout: str) -> torch.Tensor:
    from ctc.backends.tvm.cuda_decode_stack import stack_layers

    return stack_layers(*ts, parts=parts, pack=pack, layout=layout)


def _amx_pieces_torch(t: torch.Tensor, pieces: int) -> torch.Tensor:
    """``[N, K]`` f32 -> the bf16 pieces ``amx_f32.prepack`` binds (uint16 bits in AMX's B-tile layout)."""
    from ctc.backends.tvm.amx_f32 import AmxF32Spec, prepack

    w = t.detach().to(torch.float32).cpu().numpy()
    return torch.from_numpy(prepack(AmxF32Spec(w.shape[1], w.shape[0], pieces), w))


def derive_param(source: Mapping[str, Any], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The array described by ``source`` (a :attr:`Lowered.param_sources` entry) from module ``params``."""
    op = PARAM_DERIVATIONS.get(str(source.get("op")))
    if op is None:
        raise LoweringError(f"unknown parameter derivation {source.get('op')!r} (known: {sorted(PARAM_DERIVATIONS)})")
    missing = [n for n in source["from"] if n not in params]
    if missing:
        raise LoweringError(f"parameters {missing} needed to derive a bound weight are missing")
    return op(*(params[n] for n in source["from"]), **source.get("args", {})).contiguous()


# ----------------------------------------------------------------------------- helpers
def _np_of(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        raise LoweringError("bf16 parameters are not supported by the TVM CPU backend yet; cast the model to f32")
    return np.ascontiguousarray(t.numpy())


class _DimParser:
    """Symbolic dim strings -> TIR expressions over one ``tirx.Var`` per symbol (no eval)."""

    def __init__(self, static: Mapping[str, int]):
        from tvm import tirx

        self._tirx = tirx
        self.static = dict(static)
        self.vars: dict[str, Any] = {}

    def var(self, name: str) -> Any:
        if name not in self.vars:
            self.vars[name] = self._tirx.Var(name, "int64")
        return self.vars[name]

    def __call__(self, d: int | str) -> Any:
        if isinstance(d, int):
            return d
        tirx = self._tirx

        def leaf(x: int | str) -> Any:
            if isinstance(x, int):
                return tirx.IntImm("int64", x)
            if x in self.static:
                return tirx.IntImm("int64", int(self.static[x]))
            return self.var(x)

        try:
            return fold_dim(d, leaf, tirx.floordiv, tirx.floormod, tirx.max, tirx.min)
        except SymbolicError as e:
            raise LoweringError(str(e)) from None

    def shape(self, t: TensorType) -> list[Any]:
        return [self(d) for d in t.shape]


@dataclass
class _ParamRef:
    """A ``param`` node's value, materialised lazily so rules can ask for transformed layouts."""

    name: str


class Ctx:
    """What a lowering rule sees: the block builder, operand access and option flags."""

    def __init__(self, module: Module, *, params: str, fast_math: bool, static_dims: Mapping[str, int],
                 target: Any, use_int_kernels: bool, use_amx: bool = True, fp32_matmul: str = "strict",
                 attention_bits: int = 32):  # resolved by lower(): 8 or 32
        from tvm import relax

        self.relax = relax
        self.module = module
        self.bb = relax.BlockBuilder()
        self.params_mode = params
        self.fast_math = fast_math
        self.dims = _DimParser(static_dims)
        self.target = target
        self.gpu = target is not None and getattr(getattr(target, "kind", None), "name", "") == "cuda"
        self.use_int_kernels = use_int_kernels
        self.amx = use_amx and not self.gpu
        self.fp32_matmul = fp32_matmul  # resolved by lower(): "strict" or an amx_f32.MODES key
        self.amx_f32_linears = 0  # f32 linears lowered to the AMX-BF16 kernels
        self.amx_f32_added_bytes = 0
        self._amx_f32_weights: set[str] = set()
        self.fused_attention = True  # f32 prefill attention as one kernel (attention_kernels.py)
        self.attention_bits = attention_bits  # 8: that kernel's products in int8 on VNNI (_attention_bits)
        self.int8_attentions = 0
        self.amx_kernels = 0
        self.env: dict[int, Any] = {}
        self._pcache: dict[str, Any] = {}
        self.param_inputs: list[tuple[str, Any, np.ndarray]] = []
        self.param_sources: list[dict[str, Any] | None] = []
        self.notes: list[str] = []
        self.int_kernels = 0
        self.inplace_inputs: set[str] = set()  # module inputs whose buffers the compiled code writes
        self.memo: dict[Any, Any] = {}  # lowered values shared between rules (keyed by rule and ctc Value)
        self._transposed: set[str] | None = None
        self.rules: Mapping[str, Rule] = RULES  # the rules this lowering uses (a target may replace some)
        # results a rule computed on behalf of later nodes (an epilogue fused into a convolution):
        # id(ctc Value) -> Relax value; those nodes are not lowered again
        self.absorbed: dict[int, Any] = {}

    # ------------------------------------------------------------------ values
    def emit(self, expr: Any) -> Any:
        return self.bb.emit(expr)

    def val(self, v: Value) -> Any:
        x = self.env[id(v)]
        if isinstance(x, _ParamRef):
            return self.param(x.name)
        return x

    def param_name(self, v: Value) -> str | None:
        x = self.env.get(id(v))
        return x.name if isinstance(x, _ParamRef) else None

    def param_array(self, name: str) -> np.ndarray:
        return _np_of(self.module.params[name])

    def param(self, name: str, key: str = "", fn: Callable[[np.ndarray], np.ndarray] | None = None,
              array: np.ndarray | None = None, source: dict[str, Any] | None = None) -> Any:
        """The parameter ``name`` (optionally transformed by ``fn``, cached under ``key``) as a
        Relax constant or function input.  ``source`` says how the array derives from module
        parameters (``{"op": "transpose", "from": [name]}``, see :data:`PARAM_DERIVATIONS`); the
        untransformed parameter is its own source."""
        ck = f"{name}::{key}" if key else name
        if source is None and fn is None and array is None:
            source = {"op": "identity", "from": [name]}
        if ck in self._pcache:
            return self._pcache[ck]
        arr = array if array is not None else self.param_array(name)
        if fn is not None:
            arr = np.ascontiguousarray(fn(arr))
        if self.params_mode == "const":
            expr = self.relax.const(arr, str(arr.dtype) if arr.dtype != np.bool_ else "bool")
        else:
            vname = "p_" + "".join(c if c.isalnum() else "_" for c in ck)
            expr = self.relax.Var(vname, self.relax.TensorType(list(arr.shape), str(arr.dtype)))
            self.param_inputs.append((ck, expr, arr))
            self.param_sources.append(source)
        self._pcache[ck] = expr
        return expr

    def transposed_params(self) -> set[str]:
        """Parameters this lowering's own linear rules read in the ``[K, N]`` layout (bound as ``"T"``).

        A parameter also read by a linear lowered by a target's replacement kernel (whose layout
        this module does not know) is left out, so a reader of the raw layout never adds a copy."""
        if self._transposed is None:
            wants: set[str] = set()
            foreign: set[str] = set()
            for n in self.module.nodes:
                if n.op not in ("linear", "lowrank_linear"):
                    continue
                x = n.operand("x")
                for w in (n.operands("weight") if n.op == "linear" else n.operands("u") + n.operands("v")):
                    p = w.producer
                    if p is None or p.op != "param" or x is None:
                        continue
                    if self.rules.get(n.op) is not RULES.get(n.op):
                        foreign.add(p.attrs["name"])
                    elif _reads_transposed(self, x, w):
                        wants.add(p.attrs["name"])
            self._transposed = wants - foreign
        return self._transposed

    def const(self, value: float | int | bool, dtype: str) -> Any:
        return self.relax.const(value, DTYPE_MAP.get(dtype, dtype))

    def te(self, fn: Callable[..., Any], *args: Any, name: str = "te_op", **kw: Any) -> Any:
        return self.bb.emit_te(fn, *args, primfunc_name_hint=name, **kw)

    def shape_of(self, v: Value) -> list[Any]:
        return self.dims.shape(v.type)

    def shape_of_type(self, t: TensorType) -> list[Any]:
        return self.dims.shape(t)


class Operands:
    """A rule's operands by their declared names, lowered on first access.

    ``a["x"]`` is the lowered operand (an error when absent), ``a.get("bias")`` the same or
    None, ``a.all("xs")`` every value of a variadic operand; ``a.value(name)`` and
    ``a.type(name)`` give the ctc value and type.  Lowering on first access means a rule
    that reads a parameter in another layout (``ctx.param(name, key, fn)``) never binds the
    raw array too.
    """

    def __init__(self, ctx: Ctx, node: Node):
        self._ctx = ctx
        self._node = node
        self._slots = node.slots()
        self._cache: dict[int, Any] = {}

    def _slot(self, name: str) -> Any:
        try:
            return self._slots[name]
        except KeyError:
            raise LoweringError(f"{self._node.op} has no operand {name!r} (operands: "
                                f"{', '.join(self._node.opdef.inputs)})") from None

    def _lowered(self, i: int) -> Any:
        if i not in self._cache:
            self._cache[i] = self._ctx.val(self._node.inputs[i])
        return self._cache[i]

    def __contains__(self, name: object) -> bool:
        """Whether operand ``name`` is present as a tensor (``"bias" in a``)."""
        return isinstance(name, str) and self.value(name) is not None

    def value(self, name: str) -> Value | None:
        """The ctc value of operand ``name`` (None when absent or a scalar attribute)."""
        s = self._slot(name)
        return self._node.inputs[s] if isinstance(s, int) else None

    def type(self, name: str) -> TensorType:
        v = self.value(name)
        if v is None:
            raise LoweringError(f"{self._node.op} at {self._node.scope or '<root>'}: operand {name!r} is absent")
        return v.type

    def get(self, name: str) -> Any | None:
        """The lowered operand ``name``, or None when it is absent (or given by a scalar attribute)."""
        s = self._slot(name)
        return self._lowered(s) if isinstance(s, int) else None

    def __getitem__(self, name: str) -> Any:
        if not isinstance(name, str):
            raise TypeError(f"rule for {self._node.op}: read operands by name (a['x']), not by position {name!r}")
        x = self.get(name)
        if x is None:
            raise LoweringError(f"{self._node.op} at {self._node.scope or '<root>'}: operand {name!r} is absent")
        return x

    def all(self, name: str) -> list[Any]:
        """Every lowered value of a variadic operand (``concat``'s ``xs``)."""
        s = self._slot(name)
        if isinstance(s, slice):
            return [self._lowered(i) for i in range(s.start, s.stop)]
        return [self._lowered(s)] if isinstance(s, int) else []


def _operand_type(node: Node, name: str) -> TensorType:
    v = node.operand(name)
    if v is None:
        raise LoweringError(f"{node.op} at {node.scope or '<root>'}: operand {name!r} is absent")
    return v.type


def _dt(t: TensorType | str) -> str:
    return DTYPE_MAP[t if isinstance(t, str) else t.dtype]


def _axis(a: int, rank: int) -> int:
    return a % rank if rank else 0


# ----------------------------------------------------------------------------- rules
Rule = Callable[[Ctx, Node, Operands], Any]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn

    return deco


def supported_ops() -> list[str]:
    """Ops this backend lowers (``param`` included)."""
    return sorted([*RULES, "param"])


# --- elementwise unary -------------------------------------------------------
def _fast_ok(ctx: Ctx, node: Node) -> bool:
    return ctx.fast_math and node.operand("x").type.dtype == "f32"


@rule("neg", "abs", "log", "sqrt", "rsqrt", "sin", "cos", "relu", "reciprocal", "logical_not")
def _simple_unary(ctx: Ctx, node: Node, a: Operands) -> Any:
    op = ctx.relax.op
    x = a["x"]
    dt = a.type("x").dtype
    f = {"neg": op.negative, "abs": op.abs, "log": op.log, "sqrt": op.sqrt, "rsqrt": op.rsqrt, "sin": op.sin,
         "cos": op.cos, "relu": op.nn.relu}.get(node.op)
    if f is not None:
        return f(x)
    if node.op == "reciprocal":
        return op.divide(ctx.const(1.0, dt), x)
    # logical_not: non-zero is true
    if dt != "bool":
        x = ctx.emit(op.not_equal(x, ctx.const(0, dt)))
    return op.logical_not(x)


@rule("exp", "erf", "tanh", "sigmoid", "silu", "gelu")
def _transcendental(ctx: Ctx, node: Node, a: Operands) -> Any:
    from tvm import topi

    op = ctx.relax.op
    x = a["x"]
    if not _fast_ok(ctx, node):
        if node.op == "gelu":
            return op.nn.gelu_tanh(x) if node.attrs["approximate"] == "tanh" else op.nn.gelu(x)
        return {"exp": op.exp, "erf": op.erf, "tanh": op.tanh, "sigmoid": op.sigmoid, "silu": op.nn.silu}[node.op](x)

    name = node.op
    if name == "exp":
        return ctx.te(topi.fast_exp, x, name="fast_exp")
    if name == "erf":
        return ctx.te(topi.fast_erf, x, name="fast_erf")
    if name == "tanh":
        return ctx.te(topi.fast_tanh, x, name="fast_tanh")
    if name in ("sigmoid", "silu"):
        def f(t: Any, silu: bool = name == "silu") -> Any:
            e = topi.fast_exp(topi.negative(t))
            s = topi.divide(topi.full_like(t, 1.0), topi.add(e, 1.0))
            return topi.multiply(t, s) if silu else s

        return ctx.te(f, x, name=name)
    if node.attrs["approximate"] == "tanh":
        def g(t: Any) -> Any:
            inner = topi.multiply(topi.add(t, topi.multiply(topi.multiply(topi.multiply(t, t), t), 0.044715)),
                                  math.sqrt(2.0 / math.pi))
            return topi.multiply(topi.multiply(t, 0.5), topi.add(topi.fast_tanh(inner), 1.0))

        return ctx.te(g, x, name="gelu_tanh")

    def h(t: Any) -> Any:
        e = topi.fast_erf(topi.multiply(t, 1.0 / math.sqrt(2.0)))
        return topi.multiply(topi.multiply(t, 0.5), topi.add(e, 1.0))

    return ctx.te(h, x, name="gelu")


@rule("cast")
def _cast(ctx: Ctx, node: Node, a: Operands) -> Any:
    op = ctx.relax.op
    src, dst = a.type("x").dtype, node.attrs["dtype"]
    if dst == "bool" and src != "bool":
        return op.not_equal(a["x"], ctx.const(0, src))
    return op.astype(a["x"], _dt(dst))


# --- elementwise binary ------------------------------------------------------
_BIN = {"add": "add", "sub": "subtract", "mul": "multiply", "div": "divide", "pow": "power",
        "maximum": "maximum", "minimum": "minimum", "eq": "equal", "ne": "not_equal", "lt": "less",
        "le": "less_equal", "gt": "greater", "ge": "greater_equal", "logical_and": "logical_and",
        "logical_or": "logical_or"}


def _scalar_value(dtype: str, s: float) -> float | int | bool:
    if dtype == "bool":
        return bool(s)
    if dtype in ("f32", "f16", "bf16", "f64"):
        return float(s)
    return int(s)


@rule(*_BIN)
def _binary(ctx: Ctx, node: Node, a: Operands) -> Any:
    op = ctx.relax.op
    name = node.op
    tensor = a.value("a") or a.value("b")  # the tensor side (the other may be the scalar attribute)
    assert tensor is not None
    dt = tensor.type.dtype
    s = node.scalar("b")
    if name == "pow" and s in (1.0, 2.0, 3.0, 0.5, -1.0):
        x = a["a"]
        if s == 1.0:
            return x
        if s == 0.5:
            return op.sqrt(x)
        if s == -1.0:
            return op.divide(ctx.const(1.0, dt), x)
        sq = ctx.emit(op.multiply(x, x))
        return sq if s == 2.0 else op.multiply(sq, x)
    sides = []
    for k in ("a", "b"):
        v = a.value(k)
        sc = node.scalar(k)
        if name in ("logical_and", "logical_or"):  # non-zero is true
            if v is None:
                sides.append(ctx.const(bool(sc), "bool"))
            elif v.type.dtype == "bool":
                sides.append(a[k])
            else:
                sides.append(ctx.emit(op.not_equal(a[k], ctx.const(0, v.type.dtype))))
        else:
            sides.append(a[k] if v is not None else ctx.const(_scalar_value(dt, sc), dt))  # type: ignore[arg-type]
    return getattr(op, _BIN[name])(*sides)


@rule("where")
def _where(ctx: Ctx, node: Node, a: Operands) -> Any:
    dt = node.outputs[0].type.dtype
    x, y = (a[k] if a.value(k) is not None else ctx.const(_scalar_value(dt, node.scalar(k)), dt)  # type: ignore[arg-type]
            for k in ("a", "b"))
    return ctx.relax.op.where(a["cond"], x, y)


@rule("masked_fill")
def _masked_fill(ctx: Ctx, node: Node, a: Operands) -> Any:
    dt = a.type("x").dtype
    return ctx.relax.op.where(a["mask"], ctx.const(_scalar_value(dt, node.attrs["value"]), dt), a["x"])


# --- reductions --------------------------------------------------------------
@rule("sum", "mean", "amax", "amin", "argmax")
def _reduce(ctx: Ctx, node: Node, a: Operands) -> Any:
    op = ctx.relax.op
    x = a["x"]
    t = a.type("x")
    axes = [_axis(i, t.rank) for i in node.attrs["axes"]]
    keep = node.attrs["keepdim"]
    if node.op == "argmax":
        return op.argmax(x, axis=axes[0], keepdims=keep)
    if node.op == "sum" and t.dtype in ("i32", "i16", "i8", "u8", "bool"):
        x = ctx.emit(op.astype(x, "int64"))
    f = {"sum": op.sum, "mean": op.mean, "amax": op.max, "amin": op.min}[node.op]
    return f(x, axis=axes, keepdims=keep)


def _softmax_te(log: bool, fast: bool) -> Callable[..., Any]:
    from tvm import te, tirx, topi

    def f(x: Any, axis: int) -> Any:
        m = topi.max(x, axis=axis, keepdims=True)
        d = topi.subtract(x, m)
        # fast_exp gives ~1e-38 for masked (-inf) logits; exact zeros keep p v off denormals
        if fast:
            fe = topi.fast_exp(d)
            zero, lim = tirx.const(0.0, d.dtype), tirx.const(-87.0, d.dtype)
            e = te.compute(d.shape, lambda *i: tirx.Select(d(*i) < lim, zero, fe(*i)), name="fast_exp_flush")
        else:
            e = topi.exp(d)
        s = topi.sum(e, axis=axis, keepdims=True)
        if log:
            return topi.subtract(d, topi.log(s))
        return topi.divide(e, s)

    return f


# Rows at least this long (or of symbolic length) use the hand-written row kernel; the scheduled
# TE softmax is a little faster on short fixed rows (MiniLM seq 128: 0.15 vs 0.18 ms per call)
# and 2x slower at seq 384 (1.86 vs 0.88 ms), 10x with a symbolic length (8.4 ms).
ROW_KERNEL_MIN_LEN = 256


def _softmax_rows(ctx: Ctx, x: Any, shape: list[Any], dtype: str, log: bool, fast: bool) -> Any:
    """Softmax (or log-softmax) over the last axis of ``x`` (ctc dims ``shape``; TIR expressions allowed)."""
    from ctc.backends.tvm.int_kernels import add_prim_func
    from ctc.backends.tvm.row_kernels import row_softmax

    n = _static_int(ctx, shape[-1]) if isinstance(shape[-1], (int, str)) else None
    if dtype != "f32" or (n is not None and n < ROW_KERNEL_MIN_LEN) or ctx.gpu:  # the row kernel is CPU code
        return ctx.te(_softmax_te(log, fast), x, len(shape) - 1, name="log_softmax" if log else "softmax")
    relax = ctx.relax
    dims = [ctx.dims(d) if isinstance(d, (int, str)) else d for d in shape]
    rows: Any = 1
    for d in dims[:-1]:
        rows = rows * d
    x2 = ctx.emit(relax.op.reshape(x, [rows, dims[-1]]))
    name = f"row_{'log_' if log else ''}softmax{'_fast' if fast else ''}"
    gv = add_prim_func(ctx.bb, row_softmax(log, fast), name)
    y = ctx.emit(relax.call_tir(gv, [x2], relax.TensorType([rows, dims[-1]], "float32")))
    return ctx.emit(relax.op.reshape(y, dims))


@rule("softmax", "log_softmax")
def _softmax(ctx: Ctx, node: Node, a: Operands) -> Any:
    t = a.type("x")
    ax = _axis(node.attrs["axis"], t.rank)
    log, fast = node.op == "log_softmax", _fast_ok(ctx, node)
    if ax == t.rank - 1:
        return _softmax_rows(ctx, a["x"], list(t.shape), t.dtype, log, fast)
    return ctx.te(_softmax_te(log, fast), a["x"], ax, name=node.op)


@rule("cumsum")
def _cumsum(ctx: Ctx, node: Node, a: Operands) -> Any:
    dt = node.outputs[0].type.dtype
    x = a["x"]
    if a.type("x").dtype != dt:
        x = ctx.emit(ctx.relax.op.astype(x, _dt(dt)))
    return ctx.relax.op.cumsum(x, axis=node.attrs["axis"], dtype=_dt(dt))


# --- shape ---------------------------------------------------------------------
@rule("reshape")
def _reshape(ctx: Ctx, node: Node, a: Operands) -> Any:
    return ctx.relax.op.reshape(a["x"], ctx.dims.shape(node.outputs[0].type))


def _is_view_permutation(ctx: Ctx, shape: Sequence[int | str], perm: Sequence[int]) -> bool:
    """True when permuting ``shape`` by ``perm`` keeps the memory order: only size-1 dims move
    (``[B, 1, H, D] -> [B, H, 1, D]`` in a decode step).  Such a permutation is a reshape, which the
    VM does without a kernel."""
    moved = [i for i in range(len(perm)) if _static_int(ctx, shape[i]) != 1]
    return [p for p in perm if p in moved] == moved


def _permute_or_view(ctx: Ctx, node: Node, x: Any, perm: list[int]) -> Any:
    if _is_view_permutation(ctx, _operand_type(node, "x").shape, perm):
        return ctx.relax.op.reshape(x, ctx.dims.shape(node.outputs[0].type))
    return ctx.relax.op.permute_dims(x, perm)


def _permutation(node: Node, rank: int) -> list[int]:
    """The axis order a ``permute`` or ``transpose`` node gives its input of ``rank`` axes."""
    if node.op == "permute":
        return [_axis(p, rank) for p in node.attrs["perm"]]
    perm = list(range(rank))
    i, j = _axis(node.attrs["dim0"], rank), _axis(node.attrs["dim1"], rank)
    perm[i], perm[j] = perm[j], perm[i]
    return perm


@rule("permute", "transpose")
def _permute(ctx: Ctx, node: Node, a: Operands) -> Any:
    perm = _permutation(node, a.type("x").rank)
    if perm == HEADS_SWAP:  # the head merge after an attention kernel that wrote [B, S, H, D]: its output as is
        src = ctx.memo.get(("heads_last", id(node.inputs[0])))
        if src is not None:
            return src
    return _permute_or_view(ctx, node, a["x"], perm)


HEADS_SWAP = [0, 2, 1, 3]  # [B, H, S, D] <-> [B, S, H, D]


def _heads_swapped(v: Value) -> Value | None:
    """``x`` where ``v`` is ``x`` ([B, S, H, D]) with axes 1 and 2 swapped (a transpose or permute node), else None."""
    p = v.producer
    if p is None or p.op not in ("permute", "transpose") or v.type.rank != 4:
        return None
    return p.inputs[0] if _permutation(p, 4) == HEADS_SWAP else None


@rule("expand")
def _expand(ctx: Ctx, node: Node, a: Operands) -> Any:
    return ctx.relax.op.broadcast_to(a["x"], ctx.dims.shape(node.outputs[0].type))


@rule("unsqueeze")
def _unsqueeze(ctx: Ctx, node: Node, a: Operands) -> Any:
    return ctx.relax.op.expand_dims(a["x"], _axis(node.attrs["axis"], a.type("x").rank + 1))


@rule("squeeze")
def _squeeze(ctx: Ctx, node: Node, a: Operands) -> Any:
    r = a.type("x").rank
    axes = [_axis(i, r) for i in node.attrs["axes"]]
    if not axes:
        return a["x"]
    return ctx.relax.op.squeeze(a["x"], axis=axes)


@rule("slice")
def _slice(ctx: Ctx, node: Node, a: Operands) -> Any:
    r = a.type("x").rank
    ax = _axis(node.attrs["axis"], r)
    st, en = ctx.dims(node.attrs["start"][0]), ctx.dims(node.attrs["end"][0])
    return ctx.relax.op.strided_slice(a["x"], axes=[ax], begin=[st], end=[en], strides=[node.attrs["step"]],
                                      assume_inbound=True)


@rule("concat")
def _concat(ctx: Ctx, node: Node, a: Operands) -> Any:
    r = node.outputs[0].type.rank
    return ctx.relax.op.concat(a.all("xs"), axis=_axis(node.attrs["axis"], r))


@rule("gather")
def _gather(ctx: Ctx, node: Node, a: Operands) -> Any:
    return ctx.relax.op.gather_elements(a["x"], a["index"], axis=_axis(node.attrs["axis"], a.type("x").rank))


@rule("index_select", "channel_permute")
def _index_select(ctx: Ctx, node: Node, a: Operands) -> Any:
    # "clip": an out-of-range index must not read outside the buffer (TVM's "fast" mode segfaults)
    idx = a["index"] if node.op == "index_select" else a["perm"]
    return ctx.relax.op.take(a["x"], idx, axis=_axis(node.attrs["axis"], a.type("x").rank), mode="clip")


@rule("index")
def _index(ctx: Ctx, node: Node, a: Operands) -> Any:
    from tvm import topi

    def f(x: Any, *idx: Any) -> Any:
        return topi.adv_index(x, list(idx))

    return ctx.te(f, a["x"], *a.all("indices"), name="adv_index")


@rule("embedding")
def _embedding(ctx: Ctx, node: Node, a: Operands) -> Any:
    """Rows of the ``[V, D]`` table; a table that a multi-row linear also reads (a tied LM head) is bound
    once, in the ``[D, V]`` layout that linear needs, and gathered by columns (seq x D reads: cheap)."""
    op = ctx.relax.op
    name = ctx.param_name(node.operand("weight"))  # type: ignore[arg-type]
    if name is not None and name in ctx.transposed_params():
        ids_rank = node.operand("ids").type.rank  # type: ignore[union-attr]
        cols = ctx.emit(op.take(ctx.param(name, "T", _transpose), a["ids"], axis=1, mode="clip"))  # [D, *ids]
        return op.permute_dims(cols, [*range(1, ids_rank + 1), 0])
    return op.take(a["weight"], a["ids"], axis=0, mode="clip")


@rule("arange")
def _arange(ctx: Ctx, node: Node, a: Operands) -> Any:
    st, en = ctx.dims(node.attrs["start"][0]), ctx.dims(node.attrs["end"][0])
    return ctx.relax.op.arange(st, en, node.attrs["step"], dtype=_dt(node.attrs["dtype"]))


@rule("triu", "tril")
def _tri(ctx: Ctx, node: Node, a: Operands) -> Any:
    f = ctx.relax.op.triu if node.op == "triu" else ctx.relax.op.tril
    return f(a["x"], node.attrs["diagonal"])


@rule("full")
def _full(ctx: Ctx, node: Node, a: Operands) -> Any:
    t = node.outputs[0].type
    return ctx.relax.op.full(ctx.dims.shape(t), ctx.const(_scalar_value(t.dtype, node.attrs["value"]), t.dtype),
                             _dt(t.dtype))


# --- nn --------------------------------------------------------------------------
def _weight_t(ctx: Ctx, v: Value, value: Callable[[], Any], pad: tuple[int, int] = (0, 0)) -> Any:
    """``weight^T`` ([K, N]) of a ``[N, K]`` weight: transposed at lowering time for parameters (whose
    ``[N, K]`` array is then never bound; ``pad`` appends zero rows/columns first, see :func:`_padded`),
    a ``permute_dims`` of ``value()`` otherwise."""
    name = ctx.param_name(v)
    if name is not None:
        if pad != (0, 0):
            return _padded(ctx, name, pad, transpose=True)
        return ctx.param(name, "T", _transpose, source={"op": "transpose", "from": [name]})
    return ctx.emit(ctx.relax.op.permute_dims(value(), [1, 0]))


def _transpose(w: np.ndarray) -> np.ndarray:
    """The ``"T"`` layout of a ``[N, K]`` weight (one function, so every reader binds the same array)."""
    return w.T


def _panel_width(ctx: Ctx, x_value: Value, w_value: Value, name: str | None = None) -> int | None:
    """Column-panel width for a CPU linear's parameter weight (see :func:`_linear_panels`), or None to
    keep the ``[K, N]`` layout: not a CPU (llvm) build, not an f32 parameter, N not whole panels, or the
    parameter also read by something other than a linear (a tied embedding reads ``"T"``: one copy is
    bound, not two).  Symbolic rows (an any-length build) get panels too: :func:`_linear_panels` then
    computes whole row tiles itself, so the matmul schedule never pads (``pad_einsum`` cannot read panels)."""
    target = ctx.target
    if target is None or ctx.gpu or getattr(getattr(target, "kind", None), "name", "") != "llvm":
        return None
    name = name or ctx.param_name(w_value)  # given: a parameter whose node the walk has not reached yet
    if name is None or w_value.type.dtype != "f32" or x_value.type.dtype != "f32" or w_value.type.rank != 2:
        return None
    if x_value.type.rank < 2:
        return None
    from ctc.backends.tvm.schedules import MatmulRule, vector_lanes

    width = vector_lanes(target, 32) * MatmulRule().nb
    n = _static_int(ctx, w_value.type.shape[0])
    if n is None or n % width or f"panels{width}" not in PARAM_DERIVATIONS:
        return None
    if name in _params_read_elsewhere(ctx):
        return None
    return width


def _params_read_elsewhere(ctx: Ctx) -> set[str]:
    """Parameters some node reads other than as a ``linear``'s weight (computed once per lowering)."""
    key = "params_read_elsewhere"
    if key not in ctx.memo:
        out: set[str] = set()
        for node in ctx.module.nodes:
            for v in node.inputs:
                p = v.producer
                if p is not None and p.op == "param" and (node.op != "linear" or node.operand("weight") is not v):
                    out.add(p.attrs["name"])
        ctx.memo[key] = out
    return ctx.memo[key]


def _linear_panels(width: int, row_tile: int | None = None) -> Callable[[Any, Any], Any]:
    """``y[..., n] = sum_k x[..., k] * wp[n // width, k, n % width]`` over a weight packed in column
    panels ``[N / width, K, width]``: the panel a register tile reads (K rows of ``width`` columns) is
    contiguous, where the ``[K, N]`` layout strides it by N.  Measured single-thread on the MiniLM
    shapes (one core, CPU time): 128x384x1536 1.25 -> 1.03 ms, 128x1536x384 1.11 -> 0.99 ms.

    ``row_tile`` (symbolic rows ``M`` of an any-length build, or a fixed ``M`` that is not whole tiles): the
    product is computed for ``M`` rounded up to whole tiles of ``row_tile`` rows, the rows past ``M`` reading
    row ``M - 1`` again (a clamped index, no padded copy of ``x``), and only rows ``< M`` are kept: the matmul
    schedule then sees whole tiles and needs no bounds predicate in its register tile."""
    def f(x: Any, wp: Any) -> Any:
        from tvm import te, tirx

        k = te.reduce_axis((0, wp.shape[1]), "k")
        shape = [*x.shape[:-1], wp.shape[0] * width]
        if row_tile is None:
            return te.compute(shape, lambda *i: te.sum(x[(*i[:-1], k)] * wp[i[-1] // width, k, i[-1] % width],
                                                       axis=k), name="matmul_panels")
        rows = x.shape[-2]
        whole = tirx.floordiv(rows + (row_tile - 1), row_tile) * row_tile
        y = te.compute([*shape[:-2], whole, shape[-1]],
                       lambda *i: te.sum(x[(*i[:-2], tirx.min(i[-2], rows - 1), k)]
                                         * wp[i[-1] // width, k, i[-1] % width], axis=k), name="matmul_panels")
        return te.compute(shape, lambda *i: y(*i), name="matmul_rows")
    return f


def _linear_panel_parts(width: int, parts: int, row_tile: int | None) -> Callable[[Any, Any], Any]:
    """Sibling linears side by side in one panel GEMM (:func:`_linear_panels` over ``x [M, K]``), written
    part-major: ``y[p, m, j] = sum_k x[m, k] * wp[p * N_p / width + j // width, k, j % width]`` (``N_p`` a part's
    channels).  Each part is then a contiguous ``[M, N_p]`` block that its reader gathers heads from with the
    rows ``N_p`` apart, as from the linear's own output (``[M, parts * N_p]`` rows cross a 4 KB page per read
    there: the hardware prefetcher stops, MiniLM's head transposes took 1.3-2x as long at seq 384).
    ``row_tile``: as in :func:`_linear_panels` (whole tiles of rows, the last clamped, then cropped)."""
    def f(x: Any, wp: Any) -> Any:
        from tvm import te, tirx

        k = te.reduce_axis((0, wp.shape[1]), "k")
        per = wp.shape[0] // parts  # panels per part
        rows = x.shape[0]
        whole = rows if row_tile is None else tirx.floordiv(rows + (row_tile - 1), row_tile) * row_tile
        row = (lambda m: m) if row_tile is None else (lambda m: tirx.min(m, rows - 1))
        y = te.compute([parts, whole, per * width], lambda p, m, j: te.sum(
            x[row(m), k] * wp[p * per + j // width, k, j % width], axis=k), name="matmul_panels")
        if row_tile is None:
            return y
        return te.compute([parts, rows, per * width], lambda *i: y(*i), name="matmul_rows")
    return f


def _bias(ctx: Ctx, y: Any, bias: Any | None) -> Any:
    return y if bias is None else ctx.relax.op.add(ctx.emit(y), bias)


def _static_int(ctx: Ctx, d: int | str) -> int | None:
    """The value of dim ``d`` when it is static (or bound by ``static_dims``), else None."""
    v = ctx.dims(d)
    if isinstance(v, int):
        return v
    return int(v.value) if hasattr(v, "value") else None


def _one_row(ctx: Ctx, x: Value) -> bool:
    """True when every leading dim of ``x`` is statically 1 (a decode step's ``[1, 1, K]``)."""
    return all(_static_int(ctx, d) == 1 for d in x.type.shape[:-1])


def _matvec_nk(x: Any, w: Any) -> Any:
    """``y[..., n] = sum_k x[..., k] * w[n, k]`` reading the ``[N, K]`` weight as stored.

    Half-precision operands are accumulated in f32 and the sum rounded once to x's dtype
    (summing 576 f16 products in f16 doubled the decode step's error)."""
    from tvm import te

    k = te.reduce_axis((0, w.shape[1]), "k")
    shape = [*x.shape[:-1], w.shape[0]]
    if x.dtype == "float32" and w.dtype == "float32":
        return te.compute(shape, lambda *i: te.sum(x[(*i[:-1], k)] * w[i[-1], k], axis=k), name="matvec")
    acc = te.compute(shape, lambda *i: te.sum(x[(*i[:-1], k)].astype("float32") * w[i[-1], k].astype("float32"),
                                               axis=k), name="matvec")
    return te.compute(shape, lambda *i: acc(*i).astype(x.dtype), name="matvec_round")


def _linear_product(ctx: Ctx, x_value: Value, w_value: Value, x: Any, w: Callable[[], Any],
                    pad: tuple[int, int] = (0, 0)) -> Any:
    """``x @ w.T`` for a ``[N, K]`` weight ``w``, in the layout that suits the row count.

    Several rows: ``matmul`` with the weight transposed to ``[K, N]`` (vectorized along N by
    :class:`~ctc.backends.tvm.schedules.MatmulRule`).  One row (a decode step): a dot product per
    output over the ``[N, K]`` weight as stored, so each core streams contiguous weight rows
    (:class:`~ctc.backends.tvm.schedules.GemvRule`); a matrix-vector product is bound by memory
    bandwidth, and the ``[K, N]`` layout reads it in strided panels.  ``pad``: zero rows/columns a
    parameter weight gets at lowering time (``w()`` must then return the padded weight).
    """
    if not _reads_transposed(ctx, x_value, w_value):
        return ctx.te(_matvec_nk, x, w(), name="matvec")
    width = _panel_width(ctx, x_value, w_value) if pad == (0, 0) else None
    if width is not None:
        name = ctx.param_name(w_value)
        assert name is not None
        wp = _panels(ctx, [name], width)
        from ctc.backends.tvm.schedules import MatmulRule

        rows = _static_int(ctx, x_value.type.shape[-2])
        tile = MatmulRule().row_tile(rows, ctx.target)
        # rows that are not whole register tiles (symbolic, or a fixed 100) are computed in whole tiles here:
        # the schedule's pad_einsum cannot read panels (the kernel was left unscheduled, ~80x slower)
        whole = rows is None or rows % tile != 0
        # a matmul to FuseOps (op_pattern 4, out-elementwise fusable): bias, GELU and the residual fuse after it
        return ctx.te(_linear_panels(width, tile if whole else None), x, wp, name="matmul",
                      primfunc_attrs={"op_pattern": 4})
    return ctx.emit(ctx.relax.op.matmul(x, _weight_t(ctx, w_value, w, pad)))


def _reads_transposed(ctx: Ctx, x_value: Value, w_value: Value) -> bool:
    """Whether :func:`_linear_product` reads the weight in the ``[K, N]`` (``"T"``) layout.  A one-row product
    reads it as stored (any float dtype, f32 sums); so does every product on a GPU (dlight's GEMV and
    tensor-core matmul rules take either layout), so a GPU binds each weight once, in one layout."""
    same = x_value.type.dtype == w_value.type.dtype
    return not (same and (_one_row(ctx, x_value) or ctx.gpu))


def _linear_amx_f32(ctx: Ctx, node: Node, a: Operands) -> Any | None:
    """An f32 linear with a parameter weight and several rows on AMX-BF16 tiles, the operands split into bf16
    pieces (``ctx.fp32_matmul``: ``bf16x6`` as accurate as f32, ``bf16x3`` faster; :mod:`.amx_f32`); None
    where that does not apply (strict mode, one row, a weight that is not a parameter or is also read by
    something other than a linear, a non-f32 operand).
    The bias and a GELU that is the product's only reader run in the kernel's epilogue."""
    from ctc.backends.tvm import amx_f32

    pieces = amx_f32.MODES.get(ctx.fp32_matmul)
    x_value, w_value = a.value("x"), a.value("weight")
    if pieces is None or x_value is None or w_value is None:
        return None
    wname = ctx.param_name(w_value)
    b_value = a.value("bias")
    bname = ctx.param_name(b_value) if b_value is not None else None
    if (wname is None or w_value.type.rank != 2 or x_value.type.dtype != "f32" or w_value.type.dtype != "f32"
            or _one_row(ctx, x_value) or (b_value is not None and (bname is None or b_value.type.dtype != "f32"))
            or wname in _params_read_elsewhere(ctx)):  # a tied embedding: the table stays bound once
        return None
    n, k = (_static_int(ctx, d) for d in w_value.type.shape)
    if n is None or k is None:
        return None
    spec = amx_f32.AmxF32Spec(k, n, pieces)
    gelu = _gelu_reader(ctx, node)
    kernel = amx_f32.plan(amx_f32.with_gelu(spec) if gelu is not None else spec, ctx.target)
    wpack = ctx.param(wname, f"bf16p{pieces}", fn=lambda w: amx_f32.prepack(spec, w),
                      source={"op": "amx_bf16_pieces", "from": [wname], "args": {"pieces": pieces}})
    if bname is not None:
        bias = ctx.param(bname, f"pad{spec.np_}", fn=lambda b: amx_f32.padded_bias(spec, b),
                         source={"op": "pad_end", "from": [bname], "args": {"extra": spec.np_ - n}})
    else:
        bias = ctx.relax.const(amx_f32.padded_bias(spec, None))
    y = amx_f32.emit_linear(ctx.bb, a["x"], wpack, bias, kernel, memo=ctx.memo)
    ctx.amx_kernels += 1
    ctx.amx_f32_linears += 1
    if wname not in ctx._amx_f32_weights:  # a weight read by several linears is bound once
        ctx._amx_f32_weights.add(wname)
        ctx.amx_f32_added_bytes += 2 * pieces * spec.np_ * spec.kp - 4 * n * k
    if gelu is not None:  # the FFN's activation in the matmul's epilogue
        ctx.absorbed[id(gelu.outputs[0])] = y
    return y


def _panels(ctx: Ctx, names: list[str], width: int) -> Any:
    """The ``[N, K]`` weights ``names`` side by side along N (one, or sibling linears'), bound in column panels
    ``[N / width, K, width]`` whose source replays the layout from the module's parameters."""
    if len(names) == 1:
        return ctx.param(names[0], f"P{width}", lambda a: a.T.reshape(a.shape[1], a.shape[0] // width, width)
                         .transpose(1, 0, 2), source={"op": f"panels{width}", "from": names})
    w = np.concatenate([ctx.param_array(n) for n in names], axis=0)
    arr = np.ascontiguousarray(w.T.reshape(w.shape[1], w.shape[0] // width, width).transpose(1, 0, 2))
    return ctx.param(names[0], f"P{width}:" + "+".join(names[1:]), array=arr,
                     source={"op": f"concat0_panels{width}", "from": names})


def _f32_siblings(ctx: Ctx, node: Node) -> list[tuple[Node, str, str | None]]:
    """``node`` and the f32 linears not lowered yet that read its input, each with its weight and bias parameter,
    when every one of them runs as a column-panel GEMM (:func:`_linear_product`) with a parameter bias or none
    alike: q, k and v, computed as one GEMM over their weights side by side.  Empty when there are no others."""
    from ctc.backends.tvm import amx_f32
    from ctc.backends.tvm.siblings import sibling_linears

    if amx_f32.MODES.get(ctx.fp32_matmul) is not None:
        return []

    def form(u: Node) -> tuple[Node, str, str | None] | None:
        x_value, w_value, b_value = u.operand("x"), u.operand("weight"), u.operand("bias")
        if x_value is None or w_value is None or not _reads_transposed(ctx, x_value, w_value):
            return None
        wname = _later_param_name(ctx, w_value)
        bname = _later_param_name(ctx, b_value) if b_value is not None else None
        if wname is None or _panel_width(ctx, x_value, w_value, wname) is None:
            return None
        if b_value is not None and (bname is None or b_value.type.dtype != "f32" or b_value.type.rank != 1):
            return None
        return u, wname, bname

    first = form(node)
    if first is None:
        return []
    forms: dict[int, tuple[Node, str, str | None]] = {}

    def accept(u: Node) -> bool:
        if u.op != "linear" or id(u.outputs[0]) in ctx.env or id(u.outputs[0]) in ctx.absorbed:
            return False
        f = form(u)
        if f is None or (f[2] is None) != (first[2] is None) or u.outputs[0].type != node.outputs[0].type:
            return False  # each part the same shape: one part-major result
        forms[id(u)] = f
        return True

    sibs = sibling_linears(node, accept)
    return [first, *(forms[id(u)] for u in sibs)] if sibs else []


def _merged_f32_linear(ctx: Ctx, node: Node, a: Operands) -> Any | None:
    """q|k|v (see :func:`_f32_siblings`) as one column-panel GEMM plus bias, its result sliced into each one's
    output; None when ``node`` has no such siblings."""
    group = _f32_siblings(ctx, node)
    if not group:
        return None
    x_value = node.operand("x")
    assert x_value is not None
    width = _panel_width(ctx, x_value, node.operand("weight"), group[0][1])  # type: ignore[arg-type]
    assert width is not None
    wp = _panels(ctx, [g[1] for g in group], width)
    from ctc.backends.tvm.schedules import MatmulRule, divisible

    lead = ctx.dims.shape(x_value.type)[:-1]
    rows: Any = math.prod(lead) if all(isinstance(d, int) for d in lead) else None
    if rows is None:
        rows = 1
        for d in lead:
            rows = rows * d
    tile = MatmulRule().row_tile(rows, ctx.target)
    whole = rows % tile != 0 if isinstance(rows, int) else not divisible(rows, tile)
    k = int(x_value.type.shape[-1])
    x2 = ctx.emit(ctx.relax.op.reshape(a["x"], [rows, k]))
    y = ctx.te(_linear_panel_parts(width, len(group), tile if whole else None), x2, wp, name="matmul",
               primfunc_attrs={"op_pattern": 4})
    bnames = [g[2] for g in group]
    if bnames[0] is not None:
        srcs = [str(b) for b in bnames]
        bias = ctx.param(srcs[0], "concat0:" + "+".join(srcs[1:]),
                         array=np.concatenate([ctx.param_array(b) for b in srcs], axis=0),
                         source={"op": "concat0", "from": srcs})
        n = int(node.outputs[0].type.shape[-1])
        y = ctx.relax.op.add(ctx.emit(y), ctx.emit(ctx.relax.op.reshape(bias, [len(group), 1, n])))
    return _split_siblings(ctx, ctx.emit(y), [g[0] for g in group])


@rule("linear")
def _linear(ctx: Ctx, node: Node, a: Operands) -> Any:
    y = _linear_amx_f32(ctx, node, a)
    if y is not None:
        return y
    y = _merged_f32_linear(ctx, node, a)
    if y is not None:
        return y
    y = _linear_product(ctx, a.value("x"), a.value("weight"), a["x"], lambda: a["weight"])  # type: ignore[arg-type]
    return _bias(ctx, y, a.get("bias"))


@rule("matmul")
def _matmul(ctx: Ctx, node: Node, a: Operands) -> Any:
    return ctx.relax.op.matmul(a["a"], a["b"])


def _lanes(ctx: Ctx) -> int:
    """f32 SIMD lanes of the build target (16 without one: AVX-512)."""
    if ctx.target is None:
        return 16
    from ctc.backends.tvm.schedules import vector_lanes

    return vector_lanes(ctx.target, 32)


def _padded(ctx: Ctx, name: str, pad: tuple[int, int], transpose: bool = False) -> Any:
    """Parameter ``name`` with ``pad = (rows, cols)`` zero rows and columns appended (then transposed
    if asked), bound under its own key with a replayable source (:data:`PARAM_DERIVATIONS`)."""
    rows, cols = pad

    def fn(w: np.ndarray) -> np.ndarray:
        p = np.pad(w, ((0, rows), (0, cols)))
        return p.T if transpose else p

    op = "pad_transpose" if transpose else "pad"
    return ctx.param(name, f"pad{rows}x{cols}" + ("T" if transpose else ""), fn,
                     source={"op": op, "from": [name], "args": {"rows": rows, "cols": cols}})


@rule("lowrank_linear")
def _lowrank(ctx: Ctx, node: Node, a: Operands) -> Any:
    """Two products, ``(x @ v^T) @ u^T``, never the dense ``u @ v``.

    When both factors are parameters, the rank is padded with zero columns of ``u`` and zero rows
    of ``v`` up to whole SIMD vectors (exact): the matmul and GEMV schedules vectorize whole
    vectors only, and an odd rank fell off their fast path (measured on SmolLM2 shapes: a rank-230
    pair of a 576x576 weight ran as slowly as the dense weight, rank 224 25% faster).
    """
    x, u, v = a.value("x"), a.value("u"), a.value("v")
    assert x is not None and u is not None and v is not None
    r = int(node.attrs["rank"])
    lanes = _lanes(ctx)
    extra = -(-r // lanes) * lanes - r
    un, vn = ctx.param_name(u), ctx.param_name(v)
    if extra and un is not None and vn is not None:
        h = _linear_product(ctx, x, v, a["x"], lambda: _padded(ctx, vn, (extra, 0)), (extra, 0))
        y = _linear_product(ctx, x, u, h, lambda: _padded(ctx, un, (0, extra)), (0, extra))
    else:
        h = _linear_product(ctx, x, v, a["x"], lambda: a["v"])
        y = _linear_product(ctx, x, u, h, lambda: a["u"])
    return _bias(ctx, y, a.get("bias"))


def _residual_operands(ctx: Ctx, x: Value) -> tuple[Any, Any] | None:
    """``(a, b)`` lowered when ``x`` is ``add(a, b)`` of two f32 tensors of x's own shape (a residual
    sum), else None."""
    p = x.producer
    if p is None or p.op != "add" or p.attrs.get("scalar") is not None:
        return None
    ops = [p.operand("a"), p.operand("b")]
    if any(o is None or o.type.shape != x.type.shape or o.type.dtype != "f32" for o in ops):
        return None
    return ctx.val(ops[0]), ctx.val(ops[1])  # type: ignore[arg-type]


def _layer_norm_rows(ctx: Ctx, node: Node, a: Operands) -> Any | None:
    """f32 layer norm over one static last axis on a CPU: the row kernel of :mod:`.row_kernels`, reading
    a residual ``add`` before it directly (the add's own kernel is then dead code); None otherwise."""
    from ctc.backends.tvm.int_kernels import add_prim_func
    from ctc.backends.tvm.row_kernels import row_layer_norm

    t = a.type("x")
    width = _static_int(ctx, t.shape[-1])
    if ctx.gpu or node.attrs["normalized_ndim"] != 1 or t.dtype != "f32" or width is None:
        return None
    if any(a.value(n) is not None and a.type(n).dtype != "f32" for n in ("weight", "bias")):
        return None
    relax = ctx.relax
    dims = ctx.dims.shape(t)
    rows: Any = 1
    for d in dims[:-1]:
        rows = rows * d
    res = _residual_operands(ctx, node.operand("x"))  # type: ignore[arg-type]
    xs = list(res) if res is not None else [a["x"]]
    xs = [ctx.emit(relax.op.reshape(v, [rows, width])) for v in xs]
    w = a.get("weight")
    b = a.get("bias")
    w = w if w is not None else relax.const(np.ones(width, np.float32))
    b = b if b is not None else relax.const(np.zeros(width, np.float32))
    eps = float(node.attrs["eps"])
    sizes = [_static_int(ctx, d) for d in t.shape[:-1]]
    static_rows = math.prod(sizes) if all(n is not None for n in sizes) else None  # type: ignore[arg-type]
    name = (f"row_layer_norm_{width}_{'res_' if res is not None else ''}{eps!r}_{static_rows or 'n'}"
            .replace(".", "p").replace("-", "m"))
    codes = _ln_codes(ctx, node, width)
    if codes is not None:  # the next linear's u8 codes too, from each row while it is in L1
        from ctc.backends.tvm.int_kernels import layer_norm_codes_func

        kernel, tables, key = codes
        gv = add_prim_func(ctx.bb, layer_norm_codes_func(width, eps, res is not None, static_rows, kernel),
                           f"{name}_codes_{kernel.names[0][len('ctc_qact_'):]}")
        both = ctx.emit(relax.call_tir(gv, [*xs, w, b, *tables], [
            relax.TensorType([rows, width], "float32"), relax.TensorType([kernel.xq_rows(rows), kernel.spec.kp],
                                                                         "uint8")]))
        y = ctx.emit(relax.TupleGetItem(both, 0))
        ctx.memo[key] = ctx.emit(relax.TupleGetItem(both, 1))
        return relax.op.reshape(y, dims)
    gv = add_prim_func(ctx.bb, row_layer_norm(width, eps, res is not None, static_rows), name)
    y = ctx.emit(relax.call_tir(gv, [*xs, w, b], relax.TensorType([rows, width], "float32")))
    return relax.op.reshape(y, dims)


def _ln_codes(ctx: Ctx, node: Node, width: int) -> tuple[Any, list[Any], tuple[Any, ...]] | None:
    """When the layer norm's output is read, through RPTQ's reorder (a ``channel_permute``), by integer linears
    whose quantizer permutes codes (static ranges, symmetric weights, VBMI): ``(that quantizer's kernel, its
    bound tables, the memo key under which the linear finds the codes)`` for the first of them (its siblings
    share its quantizer); None otherwise.  The norm's row kernel then writes the codes (the quantizer's own kernel
    goes); its f32 output stays for the other readers (the residual)."""
    if not ctx.use_int_kernels or ctx.gpu:
        return None
    out = node.outputs[0]
    order = {id(n): i for i, n in enumerate(ctx.module.nodes)}
    readers = [q for p in out.users if p.op == "channel_permute" for q in p.outputs[0].users
               if q.op == "quant_linear" and q.operand("x") is p.outputs[0]]
    if not readers:
        return None
    first = min(readers, key=lambda n: order[id(n)])
    if first.attrs.get("a_bits") in (None, 16) or first.attrs.get("act_dynamic", False):
        return None
    pnames = {n: _later_param_name(ctx, v) for n, v in first.named_operands().items()}  # type: ignore[arg-type]
    if any(pnames[n] is None for n in pnames if n != "x"):
        return None
    from ctc.backends.tvm.block_gemv import block_layout
    from ctc.backends.tvm.int_kernels import target_has_vnni

    k = int(first.operand("x").type.shape[-1])  # type: ignore[union-attr]
    n = int(ctx.param_array(pnames["qweight"]).shape[0])  # type: ignore[arg-type]
    if block_layout(first.attrs, k, n) is None and target_has_vnni(ctx.target):
        return None  # activations per block of 32: block_gemv's own quantizer
    try:
        from ctc.backends.tvm import int_kernels as IK

        plan = _int_plan(ctx, first, pnames, IK)
    except ValueError:
        return None
    src = _gathered_source(ctx, first)
    if (src is None or src[0] is not out or not plan.kernel.permute or plan.spec.dynamic or not plan.spec.w_symmetric
            or plan.spec.k != width):
        return None
    tabs = IK.permute_tables(plan.spec, ctx.param_array(src[1]), plan.packed["act_scale"], plan.packed["act_zero"])
    tag = f"ln_codes_{plan.kernel.names[0]}_" + "_".join(str(plan.pnames[nm]) for nm in ("act_scale", "act_zero"))
    tables = [ctx.param(src[1], f"{tag}_{nm}", array=tabs[nm]) for nm in IK.PERMUTE_NAMES]
    return plan.kernel, tables, ("ln_codes", id(out), plan.kernel.names[0], plan.share)


@rule("layer_norm")
def _layer_norm(ctx: Ctx, node: Node, a: Operands) -> Any:
    rows = _layer_norm_rows(ctx, node, a)
    if rows is not None:
        return rows
    t = a.type("x")
    nd = node.attrs["normalized_ndim"]
    axes = list(range(t.rank - nd, t.rank))
    nshape = ctx.dims.shape(t)[t.rank - nd:]
    dt = _dt(t)
    w = a.get("weight")
    b = a.get("bias")
    w = w if w is not None else ctx.relax.op.ones(nshape, dt)
    b = b if b is not None else ctx.relax.op.zeros(nshape, dt)
    return ctx.relax.op.nn.layer_norm(a["x"], w, b, axes=axes, epsilon=node.attrs["eps"])


def _rms_norm_te(eps: float, x_dtype: str, out_dtype: str) -> Callable[[Any, Any], Any]:
    """The reference's RMSNorm (``weight * (x.f32 * rsqrt(mean(x.f32^2) + eps)).to(x.dtype)``) in TE,
    the mean of squares accumulated in f32."""
    def f(x: Any, w: Any) -> Any:
        from tvm import te, tirx

        n = x.shape[-1]
        k = te.reduce_axis((0, n), "k")
        ss = te.compute(x.shape[:-1], lambda *i: te.sum(x[(*i, k)].astype("float32") * x[(*i, k)].astype("float32"),
                                                        axis=k), name="sum_sq")

        def out(*i: Any) -> Any:
            r = tirx.rsqrt(ss(*i[:-1]) / tirx.Cast("float32", n) + tirx.const(eps, "float32"))
            h = (x(*i).astype("float32") * r).astype(x_dtype).astype(out_dtype)
            return w[i[-1]].astype(out_dtype) * h

        return te.compute(x.shape, out, name="rms_norm")
    return f


@rule("rms_norm")
def _rms_norm(ctx: Ctx, node: Node, a: Operands) -> Any:
    op = ctx.relax.op
    xt, wt, ot = a.type("x"), a.type("weight"), node.outputs[0].type
    if xt.dtype == wt.dtype == "f32" and not ctx.gpu:
        return op.nn.rms_norm(a["x"], a["weight"], axes=[-1], epsilon=node.attrs["eps"])
    # one reduction + one elementwise stage: fuses into a single kernel (a row reduction with its
    # epilogue), where the op-by-op form made three
    return ctx.te(_rms_norm_te(float(node.attrs["eps"]), _dt(xt), _dt(ot)), a["x"], a["weight"], name="rms_norm")


@rule("rotary_embedding")
def _rotary(ctx: Ctx, node: Node, a: Operands) -> Any:
    op = ctx.relax.op
    x, cos, sin = a["x"], a["cos"], a["sin"]
    t = a.type("x")
    d = t.shape[-1]
    if not isinstance(d, int) or d % 2:
        raise LoweringError(f"rotary_embedding at {node.scope}: last dim must be a static even size, got {t}")
    h = d // 2
    r = t.rank
    x1 = ctx.emit(op.strided_slice(x, axes=[r - 1], begin=[0], end=[h]))
    x2 = ctx.emit(op.strided_slice(x, axes=[r - 1], begin=[h], end=[d]))
    rot = ctx.emit(op.concat([ctx.emit(op.negative(x2)), x1], axis=r - 1))
    return op.add(ctx.emit(op.multiply(x, cos)), ctx.emit(op.multiply(rot, sin)))


# --- attention -------------------------------------------------------------------
def _repeat_kv(ctx: Ctx, k: Any, hq: Any, hk: Any, axis: int) -> Any:
    if isinstance(hq, int) and isinstance(hk, int) and hq != hk:
        return ctx.emit(ctx.relax.op.repeat(k, hq // hk, axis=axis))
    return k


def _one_query_group(ctx: Ctx, node: Node) -> int | None:
    """For ``q [B, H, 1, D]`` against ``k``/``v`` ``[B, Hk, S, D]`` (one decode step, any float dtype):
    the number of query heads per kv head (1 without GQA); None for any other shape."""
    qt, kt, vt = (_operand_type(node, k) for k in ("q", "k", "v"))
    if not (qt.rank == kt.rank == vt.rank == 4 and qt.dtype == kt.dtype == vt.dtype):
        return None
    if _static_int(ctx, qt.shape[2]) != 1 or qt.shape[0] != kt.shape[0] or kt.shape[0] != vt.shape[0]:
        return None
    hq, hk = _static_int(ctx, qt.shape[1]), _static_int(ctx, kt.shape[1])
    if hq is None or hk is None or hk != _static_int(ctx, vt.shape[1]) or hq % hk:
        return None
    if hq != hk and not node.attrs.get("enable_gqa", False):
        return None
    return hq // hk


def _scores_by_group(group: int) -> Callable[[Any, Any], Any]:
    """``s[b, h, i, j] = sum_d q[b, h, i, d] * k[b, h // group, j, d]`` in f32: ``q k^T`` reading the keys
    as stored ([S, D] per kv head), no transpose or GQA repeat materialized."""
    def f(q: Any, k: Any) -> Any:
        from tvm import te

        d = te.reduce_axis((0, q.shape[3]), "d")
        return te.compute([q.shape[0], q.shape[1], q.shape[2], k.shape[2]],
                          lambda b, h, i, j: te.sum(q[b, h, i, d].astype("float32")
                                                    * k[b, h // group, j, d].astype("float32"), axis=d),
                          name="scores")
    return f


def _weighted_values_by_group(group: int) -> Callable[[Any, Any], Any]:
    """``o[b, h, i, d] = sum_j p[b, h, i, j] * v[b, h // group, j, d]`` (values as stored, f32 sums,
    the result in v's dtype)."""
    def f(p: Any, v: Any) -> Any:
        from tvm import te

        j = te.reduce_axis((0, v.shape[2]), "j")
        shape = [p.shape[0], p.shape[1], p.shape[2], v.shape[3]]
        acc = te.compute(shape, lambda b, h, i, d: te.sum(p[b, h, i, j] * v[b, h // group, j, d].astype("float32"),
                                                          axis=j), name="pv")
        if v.dtype == "float32":
            return acc
        return te.compute(shape, lambda *i: acc(*i).astype(v.dtype), name="pv_round")
    return f


def _logits_shape(node: Node) -> list[int | str]:
    """Shape of an attention node's logits: its output's (the broadcast batch of q and k) with the
    key length in place of the value dim."""
    return [*node.outputs[0].type.shape[:-1], _operand_type(node, "k").shape[-2]]


KEY_TILE = 32  # MatmulRule's column panel (2 x 16 f32 lanes): padded key lengths are whole panels


def _padded_key_length(ctx: Ctx, node: Node) -> Any | None:
    """For f32 attention whose key length is symbolic (an any-length build): that length rounded up
    to whole ``KEY_TILE`` panels, as a TIR expression; None otherwise.

    Why: with a symbolic key length the ``q k^T`` tile writes its scale/mask epilogue through a
    bounds predicate, which scalarizes it (2.3 vs 1.3 ms per call at seq 384).  Padded keys
    (zeros, masked to -inf) make the columns whole panels; only the row edge stays predicated."""
    qt, kt = _operand_type(node, "q"), _operand_type(node, "k")
    if qt.rank != 4 or qt.dtype != "f32" or kt.dtype != "f32" or _static_int(ctx, kt.shape[-2]) is not None:
        return None
    from tvm import tirx

    s = ctx.dims(kt.shape[-2])
    return tirx.floordiv(s + (KEY_TILE - 1), KEY_TILE) * KEY_TILE


def _pad_keys(total: Any, fill: float) -> Callable[[Any], Any]:
    """Pad axis -2 (the key axis of ``[B, H, S, D]``) to ``total`` with ``fill``."""
    def f(x: Any) -> Any:
        from tvm import te, tirx

        ax = len(x.shape) - 2
        return te.compute([*x.shape[:ax], total, x.shape[-1]],
                          lambda *i: tirx.if_then_else(i[ax] < x.shape[ax], x(*i), tirx.const(fill, x.dtype)),
                          name="key_pad")
    return f


def _pad_last(total: Any, fill: bool | float) -> Callable[[Any], Any]:
    """Pad the last axis to ``total`` with ``fill`` (a mask's key axis)."""
    def f(x: Any) -> Any:
        from tvm import te, tirx

        return te.compute([*x.shape[:-1], total],
                          lambda *i: tirx.if_then_else(i[-1] < x.shape[-1], x(*i), tirx.const(fill, x.dtype)),
                          name="mask_pad")
    return f


def _mask_padded_keys(lg: Any, keys: Any) -> Any:
    """Logits of padded key columns (``j >=`` the unpadded key length) to -inf.  ``keys`` (the
    unpadded keys) is passed only so the kernel's signature binds the symbolic key length."""
    from tvm import te, tirx

    length = keys.shape[-2]
    return te.compute(lg.shape, lambda *i: tirx.Select(i[-1] < length, lg(*i), tirx.const(-math.inf, "float32")),
                      name="key_valid")


def _attention_logits(ctx: Ctx, q: Any, k: Any, qt: TensorType, kt: TensorType, scale: float | None,
                      mask: Any | None, mt: TensorType | None, is_causal: bool, group: int | None = None) -> Any:
    """fp32 logits ``q k^T * scale`` with causal (top-left) / bool / additive masks applied (-inf).

    ``group`` (one-query attention, see :func:`_one_query_group`): the keys are read as stored by
    a matrix-vector kernel per head, ``k`` not repeated for GQA."""
    from tvm import te, tirx

    op = ctx.relax.op
    r = qt.rank
    d = qt.shape[-1]
    sc = scale if scale is not None else 1.0 / math.sqrt(int(d))
    if group is not None:  # f32 scores
        logits = ctx.te(_scores_by_group(group), q, k, name="scores")
        logits = ctx.emit(op.multiply(logits, ctx.const(sc, "f32")))
    else:
        kT = ctx.emit(op.permute_dims(k, [*range(r - 2), r - 1, r - 2]))
        # f32 sums whatever the input dtype (an f16 sum over a long head dim loses digits)
        logits = ctx.emit(op.matmul(q, kT, out_dtype="float32"))
        logits = ctx.emit(op.multiply(logits, ctx.const(sc, "f32")))
    ninf = ctx.const(-math.inf, "f32")
    if is_causal:
        def causal(lg: Any) -> Any:
            return te.compute(lg.shape, lambda *i: tirx.Select(i[-1] > i[-2], tirx.const(-math.inf, "float32"),
                                                                 lg(*i)), name="causal")

        logits = ctx.te(causal, logits, name="causal_mask")
    if mask is not None:
        assert mt is not None
        if mt.dtype == "bool" and ctx.gpu:
            logits = ctx.emit(op.add(logits, _additive_mask(ctx, mask, mt)))
        elif mt.dtype == "bool":
            logits = ctx.emit(op.where(mask, logits, ninf))
        else:
            mf = mask if mt.dtype == "f32" else ctx.emit(op.astype(mask, "float32"))
            logits = ctx.emit(op.add(logits, mf))
    return logits


def _probs_times_values(ctx: Ctx, p: Any, v: Any, qt: TensorType) -> Any:
    """``p @ v`` for f32 probabilities ``p``: in f32, or with ``p`` in the input dtype and f32 sums
    (an f16 sum over hundreds of keys loses digits) cast back to it."""
    op = ctx.relax.op
    if qt.dtype == "f32":
        return op.matmul(p, v)
    p = ctx.emit(op.astype(p, _dt(qt)))
    return op.astype(ctx.emit(op.matmul(p, v, out_dtype="float32")), _dt(qt))


def _additive_mask(ctx: Ctx, mask: Any, mt: TensorType) -> Any:
    """A bool attention mask as an f32 one (0 kept, -inf masked), made once per mask in a kernel of its own.

    Why: TVM's CUDA code generator loads two bools as one ``ushort2`` (4 bytes at a 2-byte offset), which
    reads the wrong bytes and faults with "misaligned address" (the Llama prefill's fused ``q k^T``
    kernel did); an f32 mask is read as aligned ``float2``.  Opaque (op_pattern 8), so fusion does not
    pull the bool read back into the attention kernels."""
    from tvm import te, tirx

    key = ("additive_mask", mask)
    if key not in ctx.memo:
        def additive(m: Any) -> Any:
            return te.compute(m.shape, lambda *i: tirx.Select(m(*i), tirx.const(0.0, "float32"),
                                                                tirx.const(-math.inf, "float32")), name="additive")

        ctx.memo[key] = ctx.te(additive, mask, name="additive_mask", primfunc_attrs={"op_pattern": 8})
    return ctx.memo[key]


@rule("scaled_dot_product_attention")
def _sdpa(ctx: Ctx, node: Node, a: Operands) -> Any:
    q, k, v = a["q"], a["k"], a["v"]
    qt, kt, vt = a.type("q"), a.type("k"), a.type("v")
    mask = a.get("mask")
    mt = a.type("mask") if mask is not None else None
    group = _one_query_group(ctx, node)
    if group is not None and ctx.gpu:
        fused = _gpu_decode_attention(ctx, node, a)
        if fused is not None:
            return fused
    if group is None and ctx.gpu and _mma_gpu(ctx):
        fused = _gpu_flash_attention(ctx, node, a)
        if fused is not None:
            return fused
    if group is None and not ctx.gpu and ctx.fused_attention:
        fused = _fused_attention(ctx, node, a)
        if fused is not None:
            return fused
    if group is not None and not ctx.gpu and ctx.fused_attention:
        fused = _cpu_decode_attention(ctx, node, a)
        if fused is not None:
            return fused
    if group is None and node.attrs["enable_gqa"] and qt.rank >= 3:
        k = _repeat_kv(ctx, k, qt.shape[-3], kt.shape[-3], kt.rank - 3)
        v = _repeat_kv(ctx, v, qt.shape[-3], vt.shape[-3], vt.rank - 3)
    padded = _padded_key_length(ctx, node) if group is None else None
    lshape: list[Any] = _logits_shape(node)
    k_unpadded = k
    if padded is not None:  # any key length: pad keys/values (and the mask) to whole vector tiles
        k = ctx.te(_pad_keys(padded, 0.0), k, name="key_pad")
        v = ctx.te(_pad_keys(padded, 0.0), v, name="value_pad")
        if mask is not None and mt is not None and _static_int(ctx, mt.shape[-1]) != 1:
            key = ("mask_pad", a.value("mask"), str(kt.shape[-2]))  # every layer shares the model's mask: pad it once
            if key not in ctx.memo:
                # opaque (op_pattern 8): fused into the only attention reading it (a model with one dense
                # layer, e.g. the others made sparse), FuseTIR fails on its symbolic padded length
                ctx.memo[key] = ctx.te(_pad_last(padded, False if mt.dtype == "bool" else -math.inf), mask,
                                       name="mask_pad", primfunc_attrs={"op_pattern": 8})
            mask = ctx.memo[key]
        lshape = [*lshape[:-1], padded]
    logits = _attention_logits(ctx, q, k, qt, kt, node.attrs["scale"], mask, mt, node.attrs["is_causal"], group)
    if padded is not None:
        logits = ctx.te(_mask_padded_keys, logits, k_unpadded, name="key_valid")
    p = _softmax_rows(ctx, logits, lshape, "f32", False, ctx.fast_math)
    if group is not None:  # one query (a decode step): values read as stored, per kv head
        return ctx.te(_weighted_values_by_group(group), p, v, name="attn_values")
    return _probs_times_values(ctx, p, v, qt)


def _cpu_decode_attention(ctx: Ctx, node: Node, a: Operands) -> Any | None:
    """f32 one-query attention as one CPU kernel over the keys in parallel chunks (:mod:`.decode_attention`),
    or None where it does not apply (symbolic sizes, another dtype or mask form: the op-by-op path)."""
    from ctc.backends.tvm import decode_attention as DA

    qt, kt, vt = a.type("q"), a.type("k"), a.type("v")
    if not qt.dtype == kt.dtype == vt.dtype == "f32" or node.attrs["is_causal"]:
        return None
    dims = [_static_int(ctx, x) for x in (*qt.shape, kt.shape[1], kt.shape[2])]
    if None in dims or kt.shape != vt.shape:
        return None
    b, hq, _, d, hk, n = (int(x) for x in dims)  # type: ignore[arg-type]
    args = [a["q"], a["k"], a["v"]]
    mask, mb, mh = "none", 1, 1
    mask_v = node.operand("mask")
    if mask_v is not None:
        got = DA.mask_operand(ctx, mask_v, b, hq, n)
        if isinstance(got, str):
            return None
        mask, mb, mh, m = got
        args.append(m)
    scale = node.attrs["scale"] if node.attrs["scale"] is not None else 1.0 / math.sqrt(d)
    spec = DA.AttendSpec(b, hq, hk, n, d, -1, float(scale), mask, mb, mh, cache="float32",
                         splits=DA.key_splits(b * hk, n, DA.target_threads(ctx.target)))
    if DA.attend_supported(spec, None) is not None:
        return None
    return DA.emit_decode_attention(ctx, spec, args)


def _fused_mask_dims(ctx: Ctx, qt: TensorType, mt: TensorType, keys: int | str) -> tuple[bool, bool, bool] | None:
    """Which of the mask's (batch, head, row) axes are full size (not broadcast), for a mask the fused
    kernel can read: rank <= 4, each of those axes 1 or q's, the last one the key length; else None."""
    shape = [1] * (4 - mt.rank) + list(mt.shape)
    if mt.rank > 4 or shape[-1] != keys:
        return None
    full = []
    for i in range(3):
        if _static_int(ctx, shape[i]) == 1:
            full.append(False)
        elif shape[i] == qt.shape[i]:
            full.append(True)
        else:
            return None
    return full[0], full[1], full[2]


def _fused_attention(ctx: Ctx, node: Node, a: Operands) -> Any | None:
    """f32 prefill attention as one kernel (:mod:`.attention_kernels`), or None where it does not apply
    (other dtypes or ranks, a head dim that is not whole vectors, a mask it cannot broadcast)."""
    from ctc.backends.tvm.attention_kernels import KEY_BLOCK, AttentionSpec, attention_kernel, attention_rows
    from ctc.backends.tvm.int_kernels import add_prim_func

    qt, kt, vt = a.type("q"), a.type("k"), a.type("v")
    if not (qt.rank == kt.rank == vt.rank == 4 and qt.dtype == kt.dtype == vt.dtype == "f32"):
        return None
    heads, kv_heads, dim = (_static_int(ctx, d) for d in (qt.shape[1], kt.shape[1], qt.shape[3]))
    if heads is None or kv_heads is None or dim is None or kt.shape[-2] != vt.shape[-2] or vt.shape[-1] != qt.shape[-1]:
        return None
    if kt.shape[0] != qt.shape[0] or vt.shape[0] != qt.shape[0] or kt.shape[1] != vt.shape[1]:
        return None
    if heads != kv_heads and (not node.attrs.get("enable_gqa", False) or heads % kv_heads):
        return None
    mask = a.get("mask")
    mt = a.type("mask") if mask is not None else None
    mdims = (False, False, False)
    if mt is not None:
        if mt.dtype not in ("bool", "f32"):
            return None
        got = _fused_mask_dims(ctx, qt, mt, kt.shape[-2])
        if got is None:
            return None
        mdims = got
    keys = _static_int(ctx, kt.shape[-2])
    scale = node.attrs["scale"] if node.attrs["scale"] is not None else 1.0 / math.sqrt(dim)
    padded_keys = None if keys is not None and keys % KEY_BLOCK == 0 else (
        -(-keys // KEY_BLOCK) * KEY_BLOCK if keys is not None
        else _padded_key_length(ctx, node))
    spec = AttentionSpec(heads=heads, kv_heads=kv_heads, dim=dim, scale=float(scale),
                         causal=bool(node.attrs["is_causal"]), mask=None if mt is None else
                         ("bool" if mt.dtype == "bool" else "float"), mask_dims=mdims,
                         padded=padded_keys is not None, batch=_static_int(ctx, qt.shape[0]),
                         seq=_static_int(ctx, qt.shape[2]),
                         keys=(keys if padded_keys is None else padded_keys if isinstance(padded_keys, int) else None),
                         bits=_attention_bits(ctx), rows=attention_rows(_lanes(ctx)))
    qkv_args: list[Any] = [a["q"], a["k"], a["v"]]
    if spec.bits == 8:
        layout, args = _attention_operands(ctx, node, qkv_args)
        wanted = dataclasses.replace(spec, layout=layout)
        try:
            wanted.validate()
            spec, qkv_args = wanted, args
        except ValueError:  # shapes that layout does not take: the operands as they are
            pass
    try:
        kernel = attention_kernel(spec)
    except ValueError:
        return None
    op = ctx.relax.op
    q, k, v = a["q"], a["k"], a["v"]
    if padded_keys is not None and spec.bits == 32:  # the values are read unpadded: p v stops at the true length
        k = ctx.te(_pad_keys(padded_keys, 0.0), k, name="key_pad")
    if mask is not None and mt is not None:
        if mt.rank < 4:
            mask = ctx.emit(op.reshape(mask, [1] * (4 - mt.rank) + ctx.dims.shape(mt)))
        if padded_keys is not None:
            key = ("fused_mask_pad", a.value("mask"), str(kt.shape[-2]))  # the model's one mask: padded once
            if key not in ctx.memo:
                ctx.memo[key] = ctx.te(_pad_last(padded_keys, False if mt.dtype == "bool" else -math.inf), mask,
                                       name="mask_pad", primfunc_attrs={"op_pattern": 8})
            mask = ctx.memo[key]
    gv = add_prim_func(ctx.bb, kernel, spec.name)
    qs = ctx.dims.shape(qt)
    if spec.bits == 8:  # keys and values read as stored, quantized in the kernel
        ctx.int8_attentions += 1
        if spec.layout == "bhsd":
            return ctx.emit(ctx.relax.call_tir(gv, qkv_args + ([mask] if mask is not None else []),
                                               ctx.relax.TensorType(qs, "float32")))
        out = ctx.emit(ctx.relax.call_tir(gv, qkv_args + ([mask] if mask is not None else []),
                                          ctx.relax.TensorType([qs[0], qs[2], qs[1], qs[3]], "float32")))
        ctx.memo[("heads_last", id(node.outputs[0]))] = out  # the head merge after it reads this (no transpose)
        return op.permute_dims(out, HEADS_SWAP)  # what the node computes: dead code where only the merge reads it
    kT = ctx.emit(op.permute_dims(k, [0, 1, 3, 2]))
    args = [q, kT, v] + ([mask] if mask is not None else [])
    lp = padded_keys if padded_keys is not None else ctx.dims(kt.shape[-2])
    res = ctx.emit(ctx.relax.call_tir(gv, args, [ctx.relax.TensorType(qs, "float32"),
                                                 ctx.relax.TensorType([*qs[:3], lp], "float32")]))
    return ctx.relax.TupleGetItem(res, 0)


def _attention_operands(ctx: Ctx, node: Node, qkv: list[Any]) -> tuple[str, list[Any]]:
    """``(layout, operands)`` of the int8 attention kernel (``attention_kernels.LAYOUTS``).  Where q, k and v are
    the heads of linears' outputs swapped to ``[B, H, S, D]``, the kernel reads them unswapped (``"bshd"``), or all
    three straight from a merged q|k|v linear's part-major output (``"qkv"``): the head transposes (and the split
    of the parts) are then computed by nobody."""
    srcs = [_heads_swapped(node.operand(n)) for n in ("q", "k", "v")]  # type: ignore[arg-type]
    if any(s is None for s in srcs):
        return "bhsd", qkv
    parts = [ctx.memo.get(("qkv_part", id(s))) for s in srcs]
    if all(p is not None for p in parts) and all(p[0].same_as(parts[0][0]) for p in parts) and \
            [p[1] for p in parts] == [0, 1, 2]:  # type: ignore[index]
        return "qkv", [parts[0][0]]  # type: ignore[index]
    return "bshd", [ctx.val(s) for s in srcs]  # type: ignore[arg-type]


def _attention_bits(ctx: Ctx) -> int:
    """Bits of the fused CPU attention's products: ``ctx.attention_bits`` (8 runs them on VNNI), 32 where the
    target has no AVX512-VNNI (the build notes say so once)."""
    if ctx.attention_bits == 8:
        from ctc.backends.tvm.int_kernels import target_has_vnni

        if target_has_vnni(ctx.target):
            return 8
        key = ("attention_bits_note",)
        if key not in ctx.memo:
            ctx.memo[key] = True
            ctx.notes.append("attention_bits=8: the target has no AVX512-VNNI; attention runs in f32")
    return 32


def _step_options(ctx: Ctx) -> Any:
    """The persistent decode step's default options for ``ctx``'s cuda target: enabled, on the multiprocessors
    :func:`.targets.default_cuda_sms` gives (what ``target cuda`` without ``sms=`` gives)."""
    from ctc.backends.tvm.cuda_decode_stack import StepOptions
    from ctc.backends.tvm.targets import default_cuda_sms

    arch = str(ctx.target.attrs.get("arch", "")) if ctx.target is not None else ""
    return StepOptions(True, default_cuda_sms(arch), arch)


def _mma_gpu(ctx: Ctx) -> bool:
    """Whether the CUDA target has ``mma.sync`` m16n8k16, ``ldmatrix`` and ``cp.async`` (sm_80 on): the
    tensor-core kernels of :mod:`.cuda_mma`."""
    arch = str(ctx.target.attrs.get("arch", "")) if ctx.gpu and ctx.target is not None else ""
    digits = arch[3:].rstrip("af")  # sm_90a / sm_100f: the arch-specific and family targets of sm_90 / sm_100
    return arch.startswith("sm_") and digits.isdigit() and int(digits) >= 80


def wgmma_gpu(ctx: Ctx) -> bool:
    """Whether the CUDA target is Hopper's arch-specific ``sm_90a``, where the prefill GEMM uses warpgroup MMA
    (:mod:`.cuda_wgmma`; plain ``sm_90`` has no ``wgmma``)."""
    return ctx.gpu and ctx.target is not None and str(ctx.target.attrs.get("arch", "")) == "sm_90a"


def _gpu_flash_attention(ctx: Ctx, node: Node, a: Operands) -> Any | None:
    """Many-query (prefill) attention as one flash-attention kernel (:mod:`.cuda_flash`), or None where it
    does not apply (f32, another head dim, a mask that is not ``[1|B, 1|HQ, 1|S, T]``: op by op)."""
    from ctc.backends.tvm import cuda_flash as CF
    from ctc.backends.tvm.int_kernels import add_prim_func

    qt, kt, vt = (node.operand(n).type for n in ("q", "k", "v"))
    if qt.rank != 4 or kt.rank != 4 or vt.rank != 4 or not (qt.dtype == kt.dtype == vt.dtype):
        return None
    d, hq, hk = (_static_int(ctx, x) for x in (qt.shape[3], qt.shape[1], kt.shape[1]))
    if d is None or hq is None or hk is None or kt.shape[3] != qt.shape[3] or vt.shape != kt.shape:
        return None
    if hq != hk and not node.attrs["enable_gqa"]:
        return None
    scale = node.attrs["scale"] if node.attrs["scale"] is not None else 1.0 / math.sqrt(int(d))
    args = [ctx.val(node.operand(n)) for n in ("q", "k", "v")]
    mask_v = node.operand("mask")
    if mask_v is not None:
        mt = mask_v.type
        full = [1] * (4 - mt.rank) + list(mt.shape)
        if mt.rank > 4 or full[3] != kt.shape[2] or full[2] not in (1, qt.shape[2]) or full[1] not in (1, hq) \
                or full[0] not in (1, qt.shape[0]):
            return None
        m = ctx.val(mask_v)
        if mt.dtype == "bool":
            m = _additive_mask(ctx, m, mt)
        elif mt.dtype != "f32":
            key = ("mask_f32", m)
            if key not in ctx.memo:
                ctx.memo[key] = ctx.emit(ctx.relax.op.astype(m, "float32"))
            m = ctx.memo[key]
        args.append(ctx.emit(ctx.relax.op.reshape(m, ctx.dims.shape(TensorType(tuple(full), "f32")))))
    spec = CF.FlashSpec(int(hq), int(hk), int(d), _dt(qt), float(scale), mask_v is not None,
                        bool(node.attrs["is_causal"]))
    if CF.flash_supported(spec) is not None:
        return None
    gv = add_prim_func(ctx.bb, CF.flash_func(spec), f"flash_attention_{spec.tag}")
    return ctx.relax.call_tir(gv, args, ctx.relax.TensorType(ctx.dims.shape(qt), _dt(qt)))


def _gpu_decode_attention(ctx: Ctx, node: Node, a: Operands) -> Any | None:
    """One-query attention as one CUDA kernel (:mod:`.cuda_kernels`), or None when the shape is not
    static or the kernel does not cover it (the op-by-op lowering then runs)."""
    from ctc.backends.tvm import cuda_kernels as CK
    from ctc.backends.tvm.int_kernels import add_prim_func

    qt, kt = node.operand("q").type, node.operand("k").type
    dims = [_static_int(ctx, d) for d in (*qt.shape, kt.shape[1], kt.shape[2])]
    if any(d is None for d in dims):
        return None
    b, hq, _, d, hk, s = (int(x) for x in dims)  # type: ignore[arg-type]
    scale = node.attrs["scale"] if node.attrs["scale"] is not None else 1.0 / math.sqrt(d)
    mask = "none"
    mb = mh = 1
    mdt = "bool"
    args = [ctx.val(node.operand(n)) for n in ("q", "k", "v")]
    mask_v = node.operand("mask")
    if mask_v is not None:
        mt = mask_v.type
        full = [1] * (4 - mt.rank) + [_static_int(ctx, x) for x in mt.shape]
        if None in full or full[2] != 1 or full[3] != s or full[0] not in (1, b) or full[1] not in (1, hq):
            return None
        mb, mh = int(full[0]), int(full[1])  # type: ignore[arg-type]
        mask, mdt = ("bool", "bool") if mt.dtype == "bool" else ("add", _dt(mt))
        args.append(ctx.emit(ctx.relax.op.reshape(ctx.val(mask_v), [mb, mh, s])))
    spec = CK.AttentionSpec(b, hq, hk, s, d, _dt(qt), float(scale), mask, mb, mh, mdt)
    if CK.decode_attention_supported(spec) is not None:
        return None
    gv = add_prim_func(ctx.bb, CK.decode_attention_func(spec), f"decode_attention_{spec.tag}")
    out = ctx.relax.TensorType([b, hq, 1, d], _dt(qt))
    if spec.key_chunks == 1:
        return ctx.relax.call_tir(gv, args, out)
    c = spec.key_chunks
    parts = ctx.emit(ctx.relax.call_tir(gv, args, [ctx.relax.TensorType([b, hq, c, d], "float32"),
                                                    ctx.relax.TensorType([b, hq, c, 2], "float32")]))
    comb = add_prim_func(ctx.bb, CK.decode_attention_combine_func(spec), f"decode_attention_combine_{spec.tag}")
    po, pm = (ctx.emit(ctx.relax.TupleGetItem(parts, i)) for i in (0, 1))
    return ctx.relax.call_tir(comb, [po, pm], out)


@rule("cache_write")
def _cache_write(ctx: Ctx, node: Node, a: Operands) -> Any:
    """Write the new rows into the cache buffer in place (:mod:`.cache_kernels`) when the cache is a
    module input read by nothing else; otherwise into a copy (the reference's semantics either way)."""
    from ctc.backends.tvm.cache_kernels import cache_write_func
    from ctc.backends.tvm.int_kernels import add_prim_func

    cache_v = node.operand("cache")
    t = cache_v.type
    ax = node.attr("axis") % t.rank
    dt = _dt(t)
    cache = ctx.val(cache_v)
    owned = cache_v.producer is None and len(cache_v.users) == 1 and not ctx.module.is_output(cache_v) \
        and ctx.param_name(cache_v) is None
    if not owned:
        cache = ctx.te(_copy_te, cache, name="cache_copy")
        ctx.notes.append(f"cache_write at {node.scope or '<root>'}: the cache is read elsewhere or not a module input; "
                         "written into a copy")
    else:
        ctx.inplace_inputs.add(cache_v.name)
    serial = not ctx.gpu  # a few KB: a parallel launch costs more on a CPU
    gv = add_prim_func(ctx.bb, cache_write_func(t.rank, ax, dt, serial),
                       f"cache_write_r{t.rank}_a{ax}_{dt}{'_serial' if serial else ''}")
    return ctx.relax.call_tir_inplace(gv, [cache, ctx.val(node.operand("update")), ctx.val(node.operand("position"))],
                                      [0],
                                      ctx.relax.TensorType(ctx.shape_of(node.outputs[0]), dt))


@rule("quant_cache_write")
def _quant_cache_write(ctx: Ctx, node: Node, a: Operands) -> Any:
    """Quantize the new KV rows and write them, with their scales, into the cache buffers in place."""
    from ctc.backends.tvm.kv_cache import lower_quant_cache_write

    return lower_quant_cache_write(ctx, node)


@rule("quant_kv_attention")
def _quant_kv_attention(ctx: Ctx, node: Node, a: Operands) -> Any:
    """Decode attention reading the int8 KV cache (:mod:`.kv_cache`)."""
    from ctc.backends.tvm.kv_cache import lower_quant_kv_attention

    return lower_quant_kv_attention(ctx, node)


def _copy_te(c: Any) -> Any:
    from tvm import te

    return te.compute(c.shape, lambda *i: c(*i), name="copy")


def _heads_rep(ctx: Ctx, node: Node) -> tuple[Any, Any, TensorType, TensorType]:
    """k and v of an attention node, repeated to q's heads (grouped-query attention)."""
    qv, kv, vv = (node.operand(n) for n in ("q", "k", "v"))
    qt, kt, vt = qv.type, kv.type, vv.type
    k = _repeat_kv(ctx, ctx.val(kv), qt.shape[1], kt.shape[1], 1)
    v = _repeat_kv(ctx, ctx.val(vv), qt.shape[1], vt.shape[1], 1)
    return k, v, qt, kt


@rule("calibrated_attention")
def _calibrated(ctx: Ctx, node: Node, a: Operands) -> Any:
    """Attention, then ACT's calibration of the selected heads' rows (sinks found per row or, with
    ``detect="column"``, per key over all queries, after softmax), as the op's reference."""
    from tvm import te, tirx

    q = ctx.val(node.operand("q"))
    k, v, qt, kt = _heads_rep(ctx, node)
    mv = node.operand("mask")
    mask, mt = (ctx.val(mv), mv.type) if mv is not None else (None, None)
    logits = _attention_logits(ctx, q, k, qt, kt, node.attrs["scale"], mask, mt, node.attrs["is_causal"])
    p = _softmax_rows(ctx, logits, _logits_shape(node), "f32", False, ctx.fast_math)
    heads, beta = tuple(node.attrs["heads"]), float(node.attrs["beta"])
    thr, keep_first = float(node.attrs["threshold"]), bool(node.attrs["keep_first"])
    column = node.attrs.get("detect", "row") == "column"
    if heads and beta != 1.0:
        def calib(pa: Any, lg: Any) -> Any:
            f32, lk = "float32", pa.shape[3]
            ninf = tirx.const(-math.inf, f32)

            def is_head(h: Any) -> Any:
                c = tirx.const(False, "bool")
                for h_ in heads:
                    c = tirx.Or(c, h == h_)
                return c

            j = te.reduce_axis((0, lk), "j")
            one, zero = tirx.const(1.0, f32), tirx.const(0.0, f32)
            nal = te.compute(pa.shape[:3], lambda b, h, i: te.sum(
                tirx.Select(lg[b, h, i, j] > ninf, one, zero), axis=j), name="n_allowed")
            j1 = te.reduce_axis((0, lk), "j1")
            first = te.compute(pa.shape[:3], lambda b, h, i: te.min(
                tirx.Select(lg[b, h, i, j1] > ninf, tirx.Cast("int64", j1), tirx.Cast("int64", lk)), axis=j1),
                name="first_allowed")

            if column:  # ACT's statistic: a key's relative attention summed over the queries that see it
                lq = pa.shape[2]
                i1 = te.reduce_axis((0, lq), "i1")
                rel = te.compute((pa.shape[0], pa.shape[1], lk), lambda b, h, jj: te.sum(
                    tirx.Select(lg[b, h, i1, jj] > ninf, pa[b, h, i1, jj] * nal[b, h, i1], zero), axis=i1),
                    name="key_relative_attention")
                i2 = te.reduce_axis((0, lq), "i2")
                seen = te.compute((pa.shape[0], pa.shape[1], lk), lambda b, h, jj: te.sum(
                    tirx.Select(lg[b, h, i2, jj] > ninf, one, zero), axis=i2), name="key_observers")

            def sink(b: Any, h: Any, i: Any, jj: Any) -> Any:
                big = (rel[b, h, jj] > tirx.const(thr, f32) * seen[b, h, jj] if column
                       else pa[b, h, i, jj] * nal[b, h, i] > tirx.const(thr, f32))
                c = tirx.And(lg[b, h, i, jj] > ninf, big)
                return tirx.And(c, tirx.Cast("int64", jj) != first[b, h, i]) if keep_first else c

            j2 = te.reduce_axis((0, lk), "j2")
            smass = te.compute(pa.shape[:3], lambda b, h, i: te.sum(
                tirx.Select(sink(b, h, i, j2), pa[b, h, i, j2], tirx.const(0.0, f32)), axis=j2), name="sink_mass")

            j3 = te.reduce_axis((0, lk), "j3")
            rmass = te.compute(pa.shape[:3], lambda b, h, i: te.sum(
                tirx.Select(sink(b, h, i, j3), zero, pa[b, h, i, j3]), axis=j3), name="rest_mass")

            def out(b: Any, h: Any, i: Any, jj: Any) -> Any:
                s, rest, x = smass[b, h, i], rmass[b, h, i], pa[b, h, i, jj]
                ok = tirx.And(tirx.And(is_head(h), s > zero), rest > tirx.const(1e-12, f32))
                gain = (s + rest - tirx.const(beta, f32) * s) / tirx.Select(ok, rest, one)
                return tirx.Select(ok, tirx.Select(sink(b, h, i, jj), x * tirx.const(beta, f32), x * gain), x)

            return te.compute(pa.shape, out, name="calibrated")

        p = ctx.te(calib, p, logits, name="attn_calibrate")
    return _probs_times_values(ctx, p, v, qt)


@rule("sparse_attention")
def _sparse(ctx: Ctx, node: Node, a: Operands) -> Any:
    """Energon's filtered attention: the CPU kernels of :mod:`ctc.backends.tvm.sparse_attention`
    (low-bit VNNI scoring, per-row selection, exact attention over the kept keys only)."""
    from ctc.backends.tvm.sparse_attention import lower_sparse_attention

    return lower_sparse_attention(ctx, node)


# --- quantization ------------------------------------------------------------------
def _expand_qparam(ctx: Ctx, p: Any, pt: TensorType, xt: TensorType, axis: int | None, group_size: int) -> Any:
    op = ctx.relax.op
    if axis is None:
        return ctx.emit(op.reshape(p, []))
    ax = axis % xt.rank
    if group_size == -1:
        view = [1] * xt.rank
        view[ax] = ctx.dims(xt.shape[ax])
        return ctx.emit(op.reshape(p, view))
    rep = ctx.emit(op.repeat(p, group_size, axis=ax))
    return ctx.emit(op.strided_slice(rep, axes=[ax], begin=[0], end=[ctx.dims(xt.shape[ax])]))


@rule("quantize")
def _quantize(ctx: Ctx, node: Node, a: Operands) -> Any:
    from ctc.ir import quant as Q

    op = ctx.relax.op
    x, s, z = a["x"], a["scale"], a["zero"]
    xt = a.type("x")
    ax, gs = node.attrs["axis"], node.attrs["group_size"]
    lo, hi = Q.qrange(node.attrs["bits"], node.attrs["signed"])
    s = _expand_qparam(ctx, ctx.emit(op.astype(s, "float32")), a.type("scale"), xt, ax, gs)
    z = _expand_qparam(ctx, ctx.emit(op.astype(z, "float32")), a.type("zero"), xt, ax, gs)
    xf = x if xt.dtype == "f32" else ctx.emit(op.astype(x, "float32"))
    y = ctx.emit(op.add(ctx.emit(op.round(ctx.emit(op.divide(xf, s)))), z))
    y = ctx.emit(op.clip(y, lo, hi))
    return op.astype(y, _dt(node.attrs["dtype"]))


@rule("dequantize")
def _dequantize(ctx: Ctx, node: Node, a: Operands) -> Any:
    op = ctx.relax.op
    q, s, z = a["q"], a["scale"], a["zero"]
    qt = a.type("q")
    ax, gs = node.attrs["axis"], node.attrs["group_size"]
    s = _expand_qparam(ctx, ctx.emit(op.astype(s, "float32")), a.type("scale"), qt, ax, gs)
    z = _expand_qparam(ctx, ctx.emit(op.astype(z, "float32")), a.type("zero"), qt, ax, gs)
    y = ctx.emit(op.multiply(ctx.emit(op.subtract(ctx.emit(op.astype(q, "float32")), z)), s))
    return op.astype(y, _dt(node.attrs["dtype"]))


def _dequant_weight_np(qweight: np.ndarray, w_scale: np.ndarray, w_zero: np.ndarray, attrs: Mapping[str, Any],
                       k: int) -> np.ndarray:
    from ctc.ir import quant as Q

    w = Q.dequantize_weight(torch.from_numpy(qweight), torch.from_numpy(w_scale), torch.from_numpy(w_zero),
                            attrs["w_bits"], attrs["group_size"], k)
    return w.to(torch.float32).numpy()


@rule("quant_linear")
def _quant_linear(ctx: Ctx, node: Node, a: Operands) -> Any:
    op = ctx.relax.op
    attrs = node.attrs
    xt = a.type("x")
    k = int(xt.shape[-1])
    a_q = attrs["a_bits"] is not None and attrs["a_bits"] != 16
    pnames = {n: ctx.param_name(v) for n, v in node.named_operands().items()}  # type: ignore[arg-type]
    consts = all(pnames[n] is not None for n in pnames if n != "x")
    if ctx.gpu and consts:
        return _quant_linear_gpu(ctx, node, a, pnames)
    if a_q and consts and ctx.use_int_kernels:
        from ctc.backends.tvm.block_gemv import lower_block_linear

        y = lower_block_linear(ctx, node, a, pnames)  # activations per block of 32 (Q8_1's form) on VNNI
        if y is not None:
            return y
        try:
            from ctc.backends.tvm import int_kernels as IK
        except ImportError:  # pragma: no cover - colleague's module absent
            IK = None  # type: ignore[assignment]
        if IK is not None:
            return _int_linear(ctx, node, a, pnames, IK)
    if not a_q and consts and not ctx.gpu:
        from ctc.backends.tvm.weight_only import lower_weight_only

        y = lower_weight_only(ctx, node, a, pnames)
        if y is not None:
            return y
    # Fallback: the same semantics in float (dequantised weights; fake-quantised activations).
    if a_q:
        ctx.notes.append(f"quant_linear at {node.scope or '<root>'}: float fallback (integer kernels need parameter "
                         "weights/scales" + ("" if ctx.use_int_kernels else "; int kernels disabled") + ")")
    if all(pnames[n] is not None for n in ("qweight", "w_scale", "w_zero")):
        wq = ctx.param_array(pnames["qweight"])  # type: ignore[arg-type]
        ws = ctx.param_array(pnames["w_scale"])  # type: ignore[arg-type]
        wz = ctx.param_array(pnames["w_zero"])  # type: ignore[arg-type]
        wt = ctx.param(pnames["qweight"], "dqT", array=_dequant_weight_np(wq, ws, wz, attrs, k).T)  # type: ignore[arg-type]
    else:
        raise LoweringError(f"quant_linear at {node.scope or '<root>'}: weights must be parameters for the TVM backend")
    x = a["x"]
    xf = x if xt.dtype == "f32" else ctx.emit(op.astype(x, "float32"))
    if a_q:
        xf = _fake_quant_act_node(ctx, node, xf, a, k)
    y = ctx.emit(op.matmul(xf, wt))
    if a.value("bias") is not None:
        y = ctx.emit(op.add(y, ctx.emit(op.astype(a["bias"], "float32"))))
    return y if xt.dtype == "f32" else op.astype(y, _dt(xt))


@dataclasses.dataclass
class _IntPlan:
    """What the integer kernels of one ``quant_linear`` (with its merged siblings) are, before anything is bound."""

    pnames: dict[str, str | None]
    vals: dict[str, np.ndarray]
    sibs: _Siblings
    spec: Any
    kernel: Any
    perm: str | None  # the permutation parameter of RPTQ's reorder the quantizer gathers through
    gelu: Node | None
    nxt: tuple[Any, ...] | None
    packed: dict[str, np.ndarray]

    @property
    def share(self) -> tuple[Any, ...]:
        """What the quantized activation depends on besides the input and the quantizer's kernel."""
        return (self.perm, *(self.packed[n].tobytes() for n in ("act_scale", "act_zero")
                             if n in self.packed and not self.spec.dynamic))


def _int_plan(ctx: Ctx, node: Node, pnames: dict[str, str | None], IK: Any, merge: bool = True) -> _IntPlan:
    """Plan the integer kernels of ``node`` (parameter names ``pnames``): also ahead of the walk, by a layer norm
    that writes this linear's codes (:func:`_ln_codes`).  Its siblings (q, k, v) join it in one GEMM with a
    part-major result where the kernel can write one (``merge``), else it is planned alone."""
    vals = {n: ctx.param_array(pnames[n]) for n in pnames if n != "x"}  # type: ignore[arg-type]
    sibs = _int_siblings(ctx, node, vals) if merge else []
    if sibs:
        try:
            return _int_plan_of(ctx, node, *_merged_int_operands(ctx, pnames, vals, sibs), sibs, IK)
        except ValueError:  # no kernel writes this part-major result: each linear alone
            pass
    return _int_plan_of(ctx, node, pnames, vals, [], IK)


def _int_plan_of(ctx: Ctx, node: Node, pnames: dict[str, str | None], vals: dict[str, np.ndarray], sibs: _Siblings,
                 IK: Any) -> _IntPlan:
    """:func:`_int_plan` for given (merged) operands."""
    xt = node.operand("x").type  # type: ignore[union-attr]
    k = int(xt.shape[-1])
    spec = IK.QLinearSpec.from_attrs(node.attrs, k, vals["qweight"].shape[0],
                                     w_zero_float=vals["w_zero"].dtype.kind == "f")
    if sibs:  # q, k, v: one GEMM over their weights side by side, written part-major
        spec = dataclasses.replace(spec, parts=len(sibs) + 1)
    gathered = _gathered_source(ctx, node)
    if gathered is not None:  # RPTQ's explicit reorder: the quantizer gathers as it loads
        spec = dataclasses.replace(spec, gather=True)
    one_row = _one_row(ctx, node.operand("x"))  # type: ignore[arg-type]
    if ctx.amx and not spec.w_zero_float:  # several rows on a CPU with AMX: the tile kernel
        spec = IK.with_amx(spec, ctx.target, rows=1 if one_row else None)
    gelu = _gelu_reader(ctx, node) if xt.dtype == "f32" else None
    if gelu is not None:  # the FFN's activation in the matmul's epilogue
        spec = dataclasses.replace(spec, gelu=True)
    # one row (a decode step): a 1-row tile streams each weight once (the 8-row tile wastes 7/8)
    tile = IK.gemv_tile(spec) if one_row else None
    kernel = IK.plan_quant_linear(spec, ctx.target, tile=tile)
    nxt = _codes_reader(ctx, gelu, spec, kernel, IK) if gelu is not None and not one_row else None
    if nxt is not None:
        spec, kernel = nxt[1], nxt[2]
    cvals = nxt[4] if nxt is not None else {}
    packed = (IK.prepack_codes(spec, nxt[0].spec, vals["qweight"], vals["w_scale"], vals["w_zero"], vals.get("bias"),
                               vals.get("act_scale"), vals.get("act_zero"), cvals["act_scale"], cvals["act_zero"])
              if nxt is not None else
              IK.prepack_weights(spec, vals["qweight"], vals["w_scale"], vals["w_zero"], vals.get("bias"),
                                 vals.get("act_scale"), vals.get("act_zero")))
    return _IntPlan(pnames, vals, sibs, spec, kernel, gathered[1] if gathered is not None else None, gelu, nxt,
                    packed)


def _int_linear(ctx: Ctx, node: Node, a: Operands, pnames: dict[str, str | None], IK: Any) -> Any:
    """A ``quant_linear`` with quantized activations and parameter operands on the integer kernels
    (qact + qmm); an FFN's up projection whose gelu feeds only the down projection writes that one's u8
    codes itself (:func:`_codes_reader`): no f32 gelu output, no quantizer kernel of its own; nor has a linear
    whose input a layer norm quantized as it wrote it (:func:`_ln_codes`)."""
    plan = _int_plan(ctx, node, pnames, IK)
    pnames, sibs, spec, kernel, gelu, nxt, packed = (plan.pnames, plan.sibs, plan.spec, plan.kernel, plan.gelu,
                                                      plan.nxt, plan.packed)
    cvals = nxt[4] if nxt is not None else {}
    src = _gathered_source(ctx, node)
    xq = ctx.memo.get(("ln_codes", id(src[0]), kernel.names[0], plan.share)) if src is not None else None
    # the code tables depend on the next linear's ranges too
    extra = "" if nxt is None else "_" + "_".join(str(nxt[3][n]) for n in ("act_scale", "act_zero"))
    key, rel = _bind_packed(ctx, pnames, spec, packed, extra)
    ctx.int_kernels += 1
    ctx.amx_kernels += int(spec.amx)
    x_in = a["x"] if src is None else ctx.val(src[0])
    if src is not None and xq is None and kernel.permute:  # qact quantizes in channel order, permutes the codes
        tabs = IK.permute_tables(spec, ctx.param_array(src[1]), packed["act_scale"], packed["act_zero"])
        rel.update({nm: ctx.param(src[1], f"{key}_{nm}", array=arr) for nm, arr in tabs.items()})
    elif src is not None and xq is None:
        rel["perm"] = ctx.param(src[1], "int32", fn=lambda p: p.astype(np.int32))
    # linears reading one activation with equal ranges (q, k, v) quantize it once
    y = IK.emit_quant_linear_packed(ctx.bb, x_in, rel, kernel, share=plan.share, memo=ctx.memo, xq=xq)
    if sibs:
        return _split_siblings(ctx, y, [node, *(u for u, _ in sibs)])
    if nxt is None:
        if gelu is not None:
            ctx.absorbed[id(gelu.outputs[0])] = y  # the gelu node is computed: its reader gets y
        return y
    # y is the down projection's quantized input: its matmul follows here
    ckernel, cpn = nxt[0], nxt[3]
    cspec = ckernel.spec
    cpacked = IK.prepack_weights(cspec, cvals["qweight"], cvals["w_scale"], cvals["w_zero"], cvals.get("bias"),
                                 cvals["act_scale"], cvals["act_zero"])
    _, crel = _bind_packed(ctx, cpn, cspec, cpacked)
    ctx.int_kernels += 1
    assert gelu is not None
    down = gelu.outputs[0].users[0]
    ctx.absorbed[id(gelu.outputs[0])] = None  # never materialized: its one reader is the down projection
    ctx.absorbed[id(down.outputs[0])] = IK.emit_quant_linear_packed(ctx.bb, x_in, crel, ckernel, xq=y)
    return y  # bound to this node's output, which only the (absorbed) gelu reads


_Siblings = list[tuple[Node, dict[str, str]]]  # linears with their operands' parameter names
_INT_SIBLING_ATTRS = ("w_bits", "group_size", "w_symmetric", "a_bits", "act_clusters", "has_bias", "act_dynamic")


def _int_siblings(ctx: Ctx, node: Node, vals: Mapping[str, np.ndarray]) -> _Siblings:
    """The integer ``quant_linear`` nodes not lowered yet that read ``node``'s input with the same attributes, the
    same activation ranges (so one quantizer serves all) and parameter operands, neither of them feeding a fused
    GELU: q, k and v of an attention, each with its parameter names.  Empty when there are none."""
    from ctc.backends.tvm.siblings import sibling_linears

    if _gelu_reader(ctx, node) is not None:
        return []
    names: dict[int, dict[str, str]] = {}

    def accept(u: Node) -> bool:
        if u.op != "quant_linear" or id(u.outputs[0]) in ctx.env or id(u.outputs[0]) in ctx.absorbed:
            return False
        if any(u.attrs.get(nm) != node.attrs.get(nm) for nm in _INT_SIBLING_ATTRS) or _gelu_reader(ctx, u):
            return False
        if u.outputs[0].type.dtype != node.outputs[0].type.dtype:
            return False
        pn = {n: _later_param_name(ctx, v) for n, v in u.named_operands().items() if n != "x"}  # type: ignore[arg-type]
        if set(pn) != set(vals) or any(v is None for v in pn.values()):
            return False
        for nm in vals:
            arr = ctx.param_array(pn[nm])  # type: ignore[arg-type]
            if arr.dtype != vals[nm].dtype or arr.shape != vals[nm].shape:
                return False  # each part the same shape: one part-major result
            if nm in ("act_scale", "act_zero") and not np.array_equal(arr, vals[nm]):
                return False
        names[id(u)] = pn  # type: ignore[assignment]
        return True

    return [(u, names[id(u)]) for u in sibling_linears(node, accept)]


def _merged_int_operands(ctx: Ctx, pnames: Mapping[str, str | None], vals: Mapping[str, np.ndarray],
                         sibs: _Siblings) -> tuple[dict[str, str | None], dict[str, np.ndarray]]:
    """``(names, values)`` of one ``quant_linear`` over ``node``'s and its siblings' weights, scales, zero points
    and biases concatenated along the output axis (activation ranges: the shared ones); each name joins the
    parameters it concatenates, so the packed arrays bound from them are keyed by all of them."""
    out_names: dict[str, str | None] = {"x": pnames.get("x")}
    out_vals: dict[str, np.ndarray] = {}
    for nm, arr in vals.items():
        if nm in ("act_scale", "act_zero"):
            out_names[nm], out_vals[nm] = pnames[nm], arr
            continue
        out_names[nm] = "+".join([str(pnames[nm]), *(pn[nm] for _, pn in sibs)])
        out_vals[nm] = np.concatenate([arr, *(ctx.param_array(pn[nm]) for _, pn in sibs)], axis=0)
    return out_names, out_vals


def _split_siblings(ctx: Ctx, y: Any, group: list[Node]) -> Any:
    """Hand each merged linear its part of the part-major ``y`` ``[parts, rows, N]``: the first one's is returned,
    the others' go to the walk (``ctx.absorbed``).  A part whose one reader is a ``reshape`` splitting its last
    axis (the heads of q, k, v) is gathered in that reshape's shape by one compute, which fuses into the kernel
    reading it (attention's head transposes): no copy of its own (a Relax reshape over a symbolic batch does not
    fuse).  Any other part is sliced out and reshaped."""
    op = ctx.relax.op
    parts: list[Any] = []
    shape = ctx.dims.shape(group[0].outputs[0].type)
    yl = ctx.emit(op.reshape(y, [len(group), *shape]))  # a view: the rows' own dims, no symbolic index arithmetic
    for i, u in enumerate(group):
        out = u.outputs[0]
        view = _heads_view(ctx, out)
        if view is None:
            part = ctx.emit(op.strided_slice(yl, axes=[0], begin=[i], end=[i + 1]))
            parts.append(ctx.emit(op.reshape(part, shape)))
        else:
            ctx.absorbed[id(view.outputs[0])] = ctx.te(_part_as(i, out.type.rank - 1), yl,
                                                      ctx.dims.shape(view.outputs[0].type), name="split_heads")
            if view.outputs[0].type.rank == 4 and len(group) == 3:  # q|k|v as [B, S, H, D]: the int8 attention
                ctx.memo[("qkv_part", id(view.outputs[0]))] = (yl, i)  # may read all three from yl itself
            parts.append(None)  # its one reader, the reshape, is computed
    for u, part in zip(group[1:], parts[1:], strict=True):
        ctx.absorbed[id(u.outputs[0])] = part
    return parts[0] if parts[0] is not None else y  # y: bound to a value nothing reads


def _heads_view(ctx: Ctx, v: Value) -> Node | None:
    """The ``reshape`` that is the only reader of ``v`` (not a module output) and splits only its last axis;
    else None."""
    users = v.users
    if len(users) != 1 or users[0].op != "reshape" or ctx.module.is_output(v):
        return None
    r = users[0].outputs[0].type
    lead = v.type.rank - 1
    tail = r.shape[lead:]
    if r.shape[:lead] != v.type.shape[:lead] or not all(isinstance(d, int) for d in tail):
        return None
    return users[0] if math.prod(tail) == v.type.shape[-1] else None  # type: ignore[arg-type]


def _part_as(part: int, lead: int) -> Callable[[Any, list[Any]], Any]:
    """``out[*l, *i] = y[part, *l, flat(i)]``: part ``part`` of the part-major ``y [parts, *lead dims, N]`` in the
    shape ``out_shape`` (the ``lead`` dims, then static dims that split ``N``)."""
    def f(y: Any, out_shape: list[Any]) -> Any:
        from tvm import te

        def at(*i: Any) -> Any:
            v: Any = 0
            for j, d in zip(i[lead:], out_shape[lead:], strict=True):
                v = v * int(d) + j
            return y[(part, *i[:lead], v)]

        return te.compute(out_shape, at, name="split_heads")
    return f


def _bind_packed(ctx: Ctx, pnames: Mapping[str, str | None], spec: Any, packed: Mapping[str, np.ndarray],
                 extra: str = "") -> tuple[str, dict[str, Any]]:
    """``(cache key, Relax operands)`` of an integer linear's packed arrays.  The packed weight depends on
    the integer weight and its layout only, so a shared weight is bound once; scales, corrections and bias
    depend on every operand (per reader; ``extra`` names more of what they depend on)."""
    key = "pack_" + "_".join(str(pnames[n]) for n in sorted(pnames) if n != "x") + "_" + spec.tag + extra
    layout = dataclasses.replace(spec, gather=False, gelu=False, codes=0, codes_bits=8).tag  # same wpack
    rel = {nm: ctx.param(pnames["qweight"], f"pack_{layout}_wpack" if nm == "wpack" else f"{key}_{nm}",
                         array=arr)  # type: ignore[arg-type]
           for nm, arr in packed.items()}
    return key, rel


def _codes_reader(ctx: Ctx, gelu: Node, spec: Any, kernel: Any, IK: Any) -> tuple[Any, ...] | None:
    """When ``gelu`` (fused into a linear of ``spec``/``kernel``) is read only by another integer
    ``quant_linear`` that the VNNI or AVX2 kernels run with static ranges and symmetric weights (MiniLM's FFN down
    projection): ``(its kernel, the codes-writing spec and kernel, its parameter names, their values)``;
    None otherwise.  The up projection then writes the down projection's u8 codes in its epilogue."""
    from ctc.backends.tvm.block_gemv import block_layout

    out = gelu.outputs[0]
    if (len(out.users) != 1 or kernel.spec.amx or kernel.tile.mt == 1 or not kernel.hand_written or spec.int4
            or spec.dynamic or not spec.w_symmetric or any(o is out for o in ctx.module.outputs)):
        return None
    down = out.users[0]
    if down.op != "quant_linear" or down.operand("x") is not out or down.attrs.get("act_dynamic", False):
        return None
    if down.attrs.get("a_bits") in (None, 16) or not down.attrs.get("w_symmetric", True):
        return None
    cpn = {n: _later_param_name(ctx, v) for n, v in down.named_operands().items()}  # type: ignore[arg-type]
    if any(cpn[n] is None for n in cpn if n != "x") or not {"act_scale", "act_zero"} <= set(cpn):
        return None
    cvals = {n: ctx.param_array(cpn[n]) for n in cpn if n != "x"}  # type: ignore[arg-type]
    n = int(cvals["qweight"].shape[0])
    if cvals["w_zero"].dtype.kind == "f" or block_layout(down.attrs, spec.n, n) is None:
        return None  # float zero points, or activations per block of 32 (block_gemv's kernels)
    try:
        cspec = IK.QLinearSpec.from_attrs(down.attrs, spec.n, n)
        cons = IK.plan_quant_linear(cspec, ctx.target)
        fspec = IK.codes_spec(spec, cspec)
        fused = IK.plan_quant_linear(fspec, ctx.target, tile=kernel.tile)
    except ValueError:  # a form these kernels do not fuse: the two linears run as they are
        return None
    if cons.tile.mt != fused.tile.mt or cons.permute:
        return None  # the codes must have the rows the down projection's tile reads
    return cons, fspec, fused, cpn, cvals


def _later_param_name(ctx: Ctx, v: Value | None) -> str | None:
    """The parameter ``v`` is, also when its ``param`` node comes after the node being lowered; else None."""
    p = v.producer if v is not None else None
    if p is not None and p.op == "param" and p.attrs["name"] in ctx.module.params:
        return str(p.attrs["name"])
    return ctx.param_name(v) if v is not None else None


def _gelu_reader(ctx: Ctx, node: Node) -> Node | None:
    """The ``gelu`` (erf form, f32, fast math) that is the only reader of ``node``'s output, which is not
    a module output; None otherwise.  The matmul (AMX-BF16, AMX-INT8 or VNNI) then applies it in its
    epilogue: the FFN's 128 x 1536 activation of MiniLM is not written and read back by a kernel of its own."""
    out = node.outputs[0]
    users = out.users
    if len(users) != 1 or any(o is out for o in ctx.module.outputs):
        return None
    u = users[0]
    if u.op != "gelu" or u.attrs.get("approximate", "none") != "none" or not _fast_ok(ctx, u):
        return None
    return u


def _gathered_source(ctx: Ctx, node: Node) -> tuple[Value, str] | None:
    """``(source, perm parameter)`` when ``node``'s input ``x`` is a ``channel_permute`` of its last axis
    by a parameter (RPTQ's explicit reorder), else None (also ahead of the walk: ``source`` is the ctc value).

    The integer kernel's activation quantizer then reads ``source[:, perm[k]]`` itself: the gather
    costs no kernel and no pass over memory of its own (18 of them took 0.56 ms of MiniLM W8A8's
    14.9 ms, one thread).  The ``take`` the permute lowers to is left unread and removed by
    Relax's dead-code elimination when every reader gathers this way."""
    xv = node.operand("x")
    p = xv.producer if xv is not None else None
    if p is None or p.op != "channel_permute" or _axis(p.attrs["axis"], xv.type.rank) != xv.type.rank - 1:
        return None
    perm_name = _later_param_name(ctx, p.operand("perm"))
    src = p.operand("x")
    if perm_name is None or src is None or src.type.shape != xv.type.shape:
        return None
    return src, perm_name


def stored_int_te(buf: Any, lead: tuple[Any, ...], kk: Any, bits: int) -> Any:
    """The signed integer at ``buf[*lead, kk]`` as f32, read from the storage form of :mod:`ctc.ir.quant`
    (bits <= 4: two offset-binary nibbles per byte along the last axis, low first; else int8 as is).
    The one place the TE kernels decode that form (weights here, the KV cache in :mod:`.kv_cache`)."""
    from tvm import tirx

    if bits > 4:
        return tirx.Cast("float32", buf[(*lead, kk)])
    byte = buf[(*lead, kk // 2)]
    nib = (byte >> (tirx.Cast("uint8", kk % 2) * tirx.const(4, "uint8"))) & tirx.const(15, "uint8")
    return tirx.Cast("float32", nib) - tirx.const(8.0, "float32")


def _dequant_te(bits: int, group_size: int, k: int) -> Callable[[Any, Any, Any], Any]:
    """``w[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]`` in f32 from the storage form of :mod:`ctc.ir.quant`
    (int4: two offset-binary nibbles per byte, low first; int8 as is)."""
    def f(q: Any, s: Any, z: Any) -> Any:
        from tvm import te, tirx

        def value(n: Any, kk: Any) -> Any:
            qv = stored_int_te(q, (n,), kk, bits)
            g = kk // group_size if group_size != -1 else 0
            return (qv - tirx.Cast("float32", z[n, g])) * s[n, g].astype("float32")

        return te.compute([q.shape[0], k], value, name="dequant")
    return f


def _quant_matvec_te(bits: int, group_size: int, k: int) -> Callable[..., Any]:
    """``y = x W^T`` with W dequantized on the fly (a spatial stage the GEMV/matmul schedules inline),
    f32 sums, the result in x's dtype: the weights stream as stored (4 or 8 bits)."""
    deq = _dequant_te(bits, group_size, k)

    def f(x: Any, q: Any, s: Any, z: Any) -> Any:
        from tvm import te

        w = deq(q, s, z)
        r = te.reduce_axis((0, k), "k")
        shape = [*x.shape[:-1], w.shape[0]]
        acc = te.compute(shape, lambda *i: te.sum(x[(*i[:-1], r)].astype("float32") * w[i[-1], r], axis=r),
                         name="quant_matvec")
        if x.dtype == "float32":
            return acc
        return te.compute(shape, lambda *i: acc(*i).astype(x.dtype), name="quant_matvec_round")
    return f


def _quant_linear_gpu(ctx: Ctx, node: Node, ops_: Operands, pnames: dict[str, str | None]) -> Any:
    """GPU ``quant_linear``: the packed integer weights, scales and zero points are bound as stored and
    dequantized inside the GEMV/GEMM kernel (int4 streams half a byte per weight); quantized activations
    are applied in float (fake-quant with the op's scales, the reference's semantics)."""
    op = ctx.relax.op
    attrs = node.attrs
    xt = _operand_type(node, "x")
    k = int(xt.shape[-1])
    x = ops_["x"]
    a_q = attrs["a_bits"] is not None and attrs["a_bits"] != 16
    if a_q:
        xf = x if xt.dtype == "f32" else ctx.emit(op.astype(x, "float32"))
        xf = _fake_quant_act_node(ctx, node, xf, ops_, k)
        x = xf if xt.dtype == "f32" else ctx.emit(op.astype(xf, _dt(xt)))
    q, s, z = (ctx.param(pnames[n]) for n in ("qweight", "w_scale", "w_zero"))  # type: ignore[arg-type]
    y = ctx.te(_quant_matvec_te(int(attrs["w_bits"]), int(attrs["group_size"]), k), x, q, s, z,
               name="quant_matvec")
    if "bias" in ops_:
        y = ctx.emit(op.add(y, ctx.emit(op.astype(ops_["bias"], _dt(xt)))))
    return y


def _fake_quant_act_node(ctx: Ctx, node: Node, x: Any, ops_: Operands, k: int) -> Any:
    """The activation fake-quant of a ``quant_linear`` in float: calibrated (scale, zero) per cluster, or
    (``act_dynamic``) each row's own per cluster, as the reference computes them."""
    attrs = node.attrs
    bits, clusters = int(attrs["a_bits"]), tuple(attrs["act_clusters"])
    if attrs.get("act_dynamic"):
        return _fake_quant_act_dynamic(ctx, x, bits, clusters, k)
    return _fake_quant_act(ctx, x, ops_["act_scale"], ops_["act_zero"], bits, clusters, k)


def _fake_quant_act_dynamic(ctx: Ctx, x: Any, bits: int, clusters: tuple[int, ...], k: int) -> Any:
    """Per-row, per-cluster min/max fake-quant (``ctc.ir.quant.fake_quant_act_dynamic``) with Relax ops."""
    op = ctx.relax.op
    qmax = float((1 << bits) - 1)
    bounds = list(clusters) or [k]
    parts = []
    for a, b in zip([0, *bounds[:-1]], bounds, strict=True):
        xc = ctx.emit(op.strided_slice(x, axes=[-1], begin=[a], end=[b])) if (a, b) != (0, k) else x
        lo = ctx.emit(op.minimum(ctx.emit(op.min(xc, axis=[-1], keepdims=True)), ctx.const(0.0, "f32")))
        hi = ctx.emit(op.maximum(ctx.emit(op.max(xc, axis=[-1], keepdims=True)), ctx.const(0.0, "f32")))
        sc = ctx.emit(op.divide(ctx.emit(op.subtract(hi, lo)), ctx.const(qmax, "f32")))
        sc = ctx.emit(op.where(ctx.emit(op.greater(sc, ctx.const(0.0, "f32"))), sc, ctx.const(1.0, "f32")))
        zr = ctx.emit(op.clip(ctx.emit(op.round(ctx.emit(op.divide(ctx.emit(op.negative(lo)), sc)))), 0, qmax))
        qa = ctx.emit(op.clip(ctx.emit(op.add(ctx.emit(op.round(ctx.emit(op.divide(xc, sc)))), zr)), 0, qmax))
        parts.append(ctx.emit(op.multiply(ctx.emit(op.subtract(qa, zr)), sc)))
    return parts[0] if len(parts) == 1 else ctx.emit(op.concat(parts, axis=-1))


def _fake_quant_act(ctx: Ctx, x: Any, s: Any, z: Any, bits: int, clusters: tuple[int, ...], k: int) -> Any:
    from ctc.ir import quant as Q

    op = ctx.relax.op
    idx = Q.cluster_index(clusters, k).numpy().astype("int64")
    ci = ctx.relax.const(idx, "int64")
    sv = ctx.emit(op.take(ctx.emit(op.astype(s, "float32")), ci, axis=0, mode="clip"))
    zv = ctx.emit(op.take(ctx.emit(op.astype(z, "float32")), ci, axis=0, mode="clip"))
    qa = ctx.emit(op.clip(ctx.emit(op.add(ctx.emit(op.round(ctx.emit(op.divide(x, sv)))), zv)), 0, (1 << bits) - 1))
    return ctx.emit(op.multiply(ctx.emit(op.subtract(qa, zv)), sv))


# ----------------------------------------------------------------------------- driver
def _lower_node(ctx: Ctx, node: Node, rules: Mapping[str, Rule]) -> None:
    """Lower one node through its rule and bind its outputs."""
    relax = ctx.relax
    args = Operands(ctx, node)
    try:
        res = rules[node.op](ctx, node, args)
    except LoweringError:
        raise
    except Exception as e:
        raise LoweringError(f"lowering {node.op} at scope {node.scope or '<root>'} (inputs "
                            f"{[str(v.type) for v in node.inputs]}) failed: {type(e).__name__}: {e}") from e
    outs = res if isinstance(res, (list, tuple)) else [res]
    for v, r in zip(node.outputs, outs, strict=True):
        if not isinstance(r, relax.Var):
            r = ctx.bb.emit(r)
        ctx.env[id(v)] = r


def lower(module: Module, *, params: str = "const", fast_math: bool = True,
          static_dims: Mapping[str, int] | None = None, target: Any = None,
          use_int_kernels: bool = True, use_amx: bool = True, func_name: str = "main",
          kernels: Mapping[str, Rule] | None = None, fp32_matmul: str = "strict",
          attention_bits: int = 0, persistent: Any = None) -> Lowered:
    """Lower ``module`` to a Relax IRModule with one function ``func_name``.

    ``params``: ``"const"`` binds parameters as constants; ``"input"`` makes them trailing
    function inputs (listed in :attr:`Lowered.param_inputs`, in order).  ``static_dims``
    specialises symbolic dims to integers.  ``target`` (a TVM target) selects the integer
    kernel variant (AMX tiles, VNNI or neither; ``use_amx=False`` leaves AMX out) for
    ``quant_linear``.  ``fp32_matmul`` says how f32 linears with parameter weights run
    (:func:`resolve_fp32_matmul`: ``"auto"``, ``"strict"``, ``"bf16x3"``, ``"bf16x6"``).  ``attention_bits``:
    32, or 8 for CPU prefill attention on integer kernels (:mod:`.attention_kernels`), or 0: 8 for a module
    with integer activations (a ``quant_linear`` with ``a_bits`` 4..8), else 32.  ``kernels``
    replaces the rules of the ops it names with a target's own kernels (same rule signature): the fpga
    target's exact, tiled kernels
    (:mod:`ctc.backends.hls.kernels`); every other op keeps its rule here.  ``persistent``: for a cuda target,
    whether and on how many multiprocessors a matching decode step runs as one persistent kernel
    (:class:`.cuda_decode_stack.StepOptions`; None = enabled, the arch's common multiprocessor count).
    """
    if params not in ("const", "input"):
        raise LoweringError(f"lower: params must be 'const' or 'input', got {params!r}")
    rules = {**RULES, **(kernels or {})}
    missing = sorted({n.op for n in module.nodes if n.op != "param" and n.op not in rules})
    if missing:
        where = {op: sorted({n.scope or "<root>" for n in module.nodes if n.op == op})[:3] for op in missing}
        lines = "\n".join(f"  - {op} (at {', '.join(where[op])})" for op in missing)
        raise LoweringError(f"the TVM backend cannot lower {len(missing)} op(s) of module {module.name}:\n{lines}\n"
                            f"supported: {', '.join(supported_ops())}")
    mode = resolve_fp32_matmul(fp32_matmul, target, use_amx=use_amx)
    if attention_bits not in (0, 8, 32):
        raise LoweringError(f"attention_bits={attention_bits!r}: expected 32 (f32 attention), 8 (integer q k^T and "
                            "p v on VNNI) or 0 (auto: 8 for a model with integer activations)")
    if attention_bits == 0:
        attention_bits = 8 if any(n.op == "quant_linear" and n.attrs.get("a_bits") not in (None, 16)
                                  for n in module.nodes) else 32
    ctx = Ctx(module, params=params, fast_math=fast_math, static_dims=static_dims or {}, target=target,
              use_int_kernels=use_int_kernels, use_amx=use_amx, fp32_matmul=mode, attention_bits=attention_bits)
    if fp32_matmul == "auto" and mode == "strict" and not ctx.gpu and any(n.op == "linear" for n in module.nodes):
        ctx.notes.append("fp32_matmul=auto: f32 linears run in AVX-512/AVX2 f32 (strict): the target has no "
                         "AMX-BF16 tiles" + (" (amx=false)" if not use_amx else ""))
    ctx.rules = rules
    relax = ctx.relax
    inputs = [relax.Var(v.name, relax.TensorType(ctx.dims.shape(v.type), _dt(v.type))) for v in module.inputs]
    for v, rv in zip(module.inputs, inputs, strict=True):
        ctx.env[id(v)] = rv
    bb = ctx.bb
    fusion = None
    if ctx.gpu:  # multi-node GPU kernels (decode attention inputs), see cuda_fusion
        from ctc.backends.tvm import cuda_fusion

        fusion = cuda_fusion.plan(module, gemm=_mma_gpu(ctx), persistent=persistent or _step_options(ctx))
        ctx.notes += fusion.notes
    order = {id(n): i for i, n in enumerate(module.nodes)}
    with bb.function(func_name):
        with bb.dataflow():
            for node in module.nodes:
                if node.op == "param":
                    if node.attrs["name"] not in module.params:
                        raise LoweringError(f"parameter {node.attrs['name']!r} read at {node.scope} is missing")
                    ctx.env[id(node.outputs[0])] = _ParamRef(node.attrs["name"])
                    continue
                if id(node.outputs[0]) in ctx.absorbed:  # computed by an earlier rule (a conv's fused epilogue)
                    for v in node.outputs:
                        ctx.env[id(v)] = ctx.absorbed.pop(id(v))
                    continue
                if fusion is not None and id(node) in fusion.absorbed:
                    continue  # an RMSNorm computed inside the GEMVs that read it
                if fusion is not None and id(node) in fusion.groups:
                    group = fusion.last.get(id(node))
                    if group is not None and not cuda_fusion.emit(ctx, group):
                        # shapes the fused kernels do not cover: op by op (an absorbed norm first)
                        if group.norm is not None and id(group.norm.outputs[0]) not in ctx.env:
                            _lower_node(ctx, group.norm, rules)
                        for member in sorted(group.members, key=lambda n: order[id(n)]):
                            _lower_node(ctx, member, rules)
                    continue
                _lower_node(ctx, node, rules)
            outs = [ctx.val(v) for v in module.outputs]
            outs = [o if isinstance(o, relax.Var) else bb.emit(o) for o in outs]
            result = bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
        bb.emit_func_output(result, params=inputs + [e for _, e, _ in ctx.param_inputs])
    mod = bb.get()
    syms = sorted(ctx.dims.vars)
    if ctx.int8_attentions:
        ctx.notes.append(f"attention_bits=8: {ctx.int8_attentions} attention(s) on VNNI (int8 q k^T, int16 x int8 "
                         "p v), softmax in f32")
    return Lowered(mod=mod, input_names=[v.name for v in module.inputs], output_names=list(module.output_names),
                   param_inputs=[(n, arr) for n, _, arr in ctx.param_inputs], param_sources=ctx.param_sources,
                   symbols=syms, notes=ctx.notes,
                   int_kernels=ctx.int_kernels, amx_kernels=ctx.amx_kernels,
                   fp32_matmul=mode if ctx.amx_f32_linears else "strict", amx_f32_added_bytes=ctx.amx_f32_added_bytes,
                   inplace_inputs=[v.name for v in module.inputs if v.name in ctx.inplace_inputs],
                   persistent_grid=fusion.persistent_grid if fusion is not None else 0)


FP32_MATMUL_MODES = ("auto", "strict", "bf16x3", "bf16x6")


def resolve_fp32_matmul(mode: str, target: Any, *, use_amx: bool = True) -> str:
    """How f32 linears run for ``target``: ``"strict"`` (f32 FMAs) or an :data:`amx_f32.MODES` key.

    ``"auto"`` is ``"bf16x6"`` (as accurate as f32) on a CPU target with AMX-BF16 tiles that this process
    may use (and ``use_amx``), else ``"strict"``.  Asking for a bf16 mode where it cannot run is an error
    naming the option: no silent fallback."""
    if mode not in FP32_MATMUL_MODES:
        raise LoweringError(f"fp32_matmul={mode!r}: expected one of {', '.join(FP32_MATMUL_MODES)}")
    if mode == "strict":
        return mode
    kind = getattr(getattr(target, "kind", None), "name", "")
    has = False
    if kind == "llvm" and use_amx:
        from ctc.backends.tvm.amx_f32 import target_has_amx_bf16

        has = target_has_amx_bf16(target)
    if mode == "auto":
        return "bf16x6" if has else "strict"
    if not has:
        why = ("amx=false turns AMX off" if not use_amx else
               f"target {kind or 'none'} has no AMX-BF16 tiles (or this process was refused the tile registers)"
               if kind == "llvm" or not kind else f"target {kind} is not a CPU")
        raise LoweringError(f"fp32_matmul={mode!r} runs f32 linears on AMX-BF16 tiles, but {why}; use "
                            "fp32_matmul=strict (or auto: the AMX kernels where the CPU has them)")
    return mode


# Rules of the Core ATen breadth and vision ops live in their own modules; importing them
# registers them in RULES.
from ctc.backends.tvm import lower_math as _lower_math  # noqa: E402,F401
from ctc.backends.tvm import lower_vision as _lower_vision  # noqa: E402,F401
