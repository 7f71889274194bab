"""The ctc graph IR: SSA values with use-def chains, nodes with scopes, and modules.

A :class:`Module` is one function: typed inputs, a topologically ordered list of
:class:`Node`, outputs, and named parameters.  Parameters live in ``Module.params``
and enter the graph through ``param`` nodes that name them, so several nodes may
share one parameter.  Every node carries a ``scope`` (the module path it came from,
e.g. ``encoder.layer.3.attention.self.query``) and a ``block`` index (the repeated
layer it belongs to, or ``None`` outside the repeated stack).

Operands are read by name (``node.operand("bias")``), through the one layout decoder of
the op registry (:meth:`ctc.ir.ops.OpDef.slots`).  Passes change a module through a
:class:`ctc.ir.rewrite.Rewriter`, which is built on the primitives here
(``create_node``, ``replace_all_uses_with``, ``erase``) that keep use lists exact; the
verifier (:mod:`ctc.ir.verify`) checks them.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ctc.ir.types import TensorType

_NAME_OK = re.compile(r"[^A-Za-z0-9_.]")
# Gap between the order keys of consecutive nodes (see Module.index_of).
_ORDER_GAP = 1 << 16

# Named operands given to create_node: a value, a list (variadic), or None (absent).
NamedOperands = Mapping[str, "Value | Sequence[Value] | None"]


class IRError(Exception):
    """A malformed IR construction or rewrite."""


class Value:
    """An SSA value: produced once (by a node, or as a module input), used many times."""

    __slots__ = ("name", "type", "producer", "index", "uses")

    def __init__(self, name: str, type: TensorType, producer: Node | None = None, index: int = 0):
        self.name = name
        self.type = type
        self.producer = producer
        self.index = index
        self.uses: list[tuple[Node, int]] = []

    @property
    def users(self) -> list[Node]:
        """Distinct nodes that read this value, in use order."""
        seen: dict[int, Node] = {}
        for node, _ in self.uses:
            seen.setdefault(id(node), node)
        return list(seen.values())

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    """One operation: ``outputs = op(inputs) {attrs}`` at a scope and block."""

    __slots__ = ("op", "inputs", "outputs", "attrs", "scope", "block", "module", "_order")

    def __init__(
        self,
        op: str,
        inputs: Sequence[Value],
        attrs: dict[str, Any],
        scope: str = "",
        block: int | None = None,
    ):
        self.op = op
        self.inputs: list[Value] = list(inputs)
        self.outputs: list[Value] = []
        self.attrs = dict(attrs)
        self.scope = scope
        self.block = block
        self.module: Module | None = None
        self._order = -1

    @property
    def output(self) -> Value:
        """The single output (error for multi-output nodes)."""
        if len(self.outputs) != 1:
            raise IRError(f"node {self.op} has {len(self.outputs)} outputs; use .outputs")
        return self.outputs[0]

    @property
    def opdef(self):  # -> OpDef (import cycle)
        from ctc.ir.ops import get_op

        return get_op(self.op)

    def set_input(self, i: int, v: Value) -> None:
        """Replace operand ``i`` keeping both values' use lists exact (passes: ``Rewriter.set_operand``)."""
        old = self.inputs[i]
        old.uses.remove((self, i))
        self.inputs[i] = v
        v.uses.append((self, i))

    # ----------------------------------------------------------------- named operands and attributes
    def slots(self) -> dict[str, Any]:
        """Where each declared operand is: an index into ``inputs``, a slice (variadic),
        a :class:`~ctc.ir.ops.Scalar` (given by an attribute), or None (absent)."""
        return self.opdef.slots(len(self.inputs), self.attrs, where=self._where())

    def _slot(self, name: str) -> Any:
        opdef = self.opdef
        if name not in opdef.operand_names:
            from ctc.ir.ops.registry import did_you_mean

            raise IRError(f"{self._where()}: op {self.op} has no operand {name!r}"
                          f"{did_you_mean(name, opdef.operand_names)} (operands: {', '.join(opdef.inputs) or 'none'})")
        return opdef.slots(len(self.inputs), self.attrs, where=self._where())[name]

    def operand(self, name: str) -> Value | None:
        """The operand called ``name`` in the op's declaration; None when it is absent or given
        by a scalar attribute (see :meth:`scalar`).  Unknown names raise, suggesting the nearest."""
        s = self._slot(name)
        if isinstance(s, slice):
            raise IRError(f"{self._where()}: operand {name!r} of {self.op} is variadic; use node.operands({name!r})")
        return self.inputs[s] if isinstance(s, int) else None

    def operands(self, name: str) -> list[Value]:
        """The values of operand ``name``: all of a variadic operand, ``[v]`` or ``[]`` otherwise."""
        s = self._slot(name)
        if isinstance(s, slice):
            return self.inputs[s]
        return [self.inputs[s]] if isinstance(s, int) else []

    def has_operand(self, name: str) -> bool:
        """Whether operand ``name`` is present as a tensor."""
        s = self._slot(name)
        return isinstance(s, (int, slice))

    def operand_index(self, name: str) -> int | None:
        """Position of operand ``name`` in ``inputs`` (None when absent or a scalar attribute)."""
        s = self._slot(name)
        if isinstance(s, slice):
            raise IRError(f"{self._where()}: operand {name!r} of {self.op} is variadic; it has no single index")
        return s if isinstance(s, int) else None

    def scalar(self, name: str) -> float | None:
        """The value of operand ``name`` when a scalar attribute gives it (``mul(x) {scalar=2}``)."""
        from ctc.ir.ops import Scalar

        s = self._slot(name)
        return s.value if isinstance(s, Scalar) else None

    def named_operands(self) -> dict[str, Value | list[Value]]:
        """Present tensor operands by name (a list for a variadic operand), in declared order."""
        out: dict[str, Value | list[Value]] = {}
        for k, s in self.slots().items():
            if isinstance(s, slice):
                out[k] = self.inputs[s]
            elif isinstance(s, int):
                out[k] = self.inputs[s]
        return out

    def operand_name(self, i: int) -> str:
        """The declared name of ``inputs[i]`` (``xs`` for every value of a variadic ``*xs``)."""
        for k, s in self.slots().items():
            if s == i or (isinstance(s, slice) and s.start <= i < s.stop):
                return k
        raise IRError(f"{self._where()}: {self.op} has no operand {i}")

    def attr(self, name: str) -> Any:
        """Attribute ``name``; an unknown name raises, suggesting the nearest."""
        try:
            return self.attrs[name]
        except KeyError:
            from ctc.ir.ops.registry import did_you_mean

            known = sorted(self.opdef.attrs)
            raise IRError(f"{self._where()}: op {self.op} has no attribute {name!r}{did_you_mean(name, known)} "
                          f"(attributes: {', '.join(known) or 'none'})") from None

    def _where(self) -> str:
        return f"{self.op} at {self.scope or '<root>'}"

    def __repr__(self) -> str:
        ins = ", ".join("%" + v.name for v in self.inputs)
        outs = ", ".join("%" + v.name for v in self.outputs)
        return f"<{outs} = {self.op}({ins}) @{self.scope or '-'}>"


def param_tensor(v: Value) -> torch.Tensor | None:
    """The parameter tensor ``v`` reads when ``v`` is a ``param`` node's result, else None."""
    p = v.producer
    if p is None or p.op != "param" or p.module is None:
        return None
    return p.module.params.get(p.attrs["name"])


def param_name(v: Value) -> str | None:
    """The name of the parameter ``v`` reads when ``v`` is a ``param`` node's result, else None."""
    p = v.producer
    return str(p.attrs["name"]) if p is not None and p.op == "param" else None


def _order_key(n: Node) -> int:
    return n._order


class Module:
    """A ctc program: one SSA function plus its named parameters and metadata."""

    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.output_names: list[str] = []
        self.nodes: list[Node] = []
        self.params: dict[str, torch.Tensor] = {}
        # Free-form, printable metadata: architecture, block prefix, task, tokenizer dir...
        self.meta: dict[str, Any] = {}
        self._names: set[str] = set()
        self._counter = itertools.count()

    # ----------------------------------------------------------------- names
    def unique_name(self, base: str) -> str:
        """A value name not yet used in this module, derived from ``base``."""
        base = _NAME_OK.sub("_", base) or "v"
        if base[0].isdigit():
            base = "v" + base
        name = base
        while name in self._names:
            name = f"{base}_{next(self._counter)}"
        self._names.add(name)
        return name

    # ----------------------------------------------------------------- building
    def add_input(self, name: str, type: TensorType) -> Value:
        v = Value(self.unique_name(name), type)
        self.inputs.append(v)
        return v

    def set_outputs(self, values: Sequence[Value], names: Sequence[str] | None = None) -> None:
        self.outputs = list(values)
        self.output_names = list(names) if names is not None else [f"out{i}" for i in range(len(values))]
        if len(self.output_names) != len(self.outputs):
            raise IRError("set_outputs: names and values differ in length")

    def add_param(self, name: str, tensor: torch.Tensor) -> str:
        """Register a parameter tensor under ``name`` (must be new)."""
        if name in self.params:
            raise IRError(f"parameter {name!r} already exists")
        self.params[name] = tensor
        return name

    def fresh_param_name(self, base: str) -> str:
        name = base
        while name in self.params:
            name = f"{base}_{next(self._counter)}"
        return name

    def param(self, name: str, *, scope: str = "", block: int | None = None, before: Node | None = None) -> Value:
        """A ``param`` node reading parameter ``name``; returns its value."""
        if name not in self.params:
            raise IRError(f"parameter {name!r} does not exist")
        t = self.params[name]
        return self.create_node(
            "param", [], {"name": name}, scope=scope, block=block, before=before,
            types=[TensorType.of(t)], names=[name],
        ).output

    def create_node(
        self,
        op: str,
        inputs: Sequence[Value] | NamedOperands,
        attrs: dict[str, Any] | None = None,
        *,
        scope: str = "",
        block: int | None = None,
        before: Node | None = None,
        after: Node | None = None,
        types: Sequence[TensorType] | None = None,
        names: Sequence[str] | None = None,
    ) -> Node:
        """Create, type and insert a node (at the end, or before/after an anchor).

        ``inputs`` are positional, or named by the op's declaration (``{"x": x, "weight": w,
        "bias": None}``; a list for a variadic operand; None or a missing key = absent), which
        are laid out by the op's layout decoder and checked against the attributes.
        Attributes are validated and defaulted from the op's schema; output types are
        inferred by the op unless ``types`` is given.
        """
        from ctc.ir.ops import get_op

        opdef = get_op(op)
        where = f"{op} at {scope or '<root>'}"
        full_attrs = opdef.check_attrs(attrs or {}, where=where)
        if isinstance(inputs, Mapping):
            inputs = opdef.pack(inputs, full_attrs, where=where)
        node = Node(op, inputs, full_attrs, scope, block)
        if types is None:
            types = opdef.infer_types([v.type for v in inputs], full_attrs)
        stem = (scope.rsplit(".", 1)[-1] if scope else op) or op
        for i, t in enumerate(types):
            base = names[i] if names is not None else (stem if stem == op else f"{stem}_{op}")
            node.outputs.append(Value(self.unique_name(base), t, node, i))
        for i, v in enumerate(node.inputs):
            v.uses.append((node, i))
        self._insert(node, before=before, after=after)
        return node

    def _insert(self, node: Node, *, before: Node | None, after: Node | None) -> None:
        node.module = self
        if before is not None and after is not None:
            raise IRError("give at most one of before/after")
        if before is not None:
            i = self.index_of(before)
        elif after is not None:
            i = self.index_of(after) + 1
        else:
            i = len(self.nodes)
        lo = self.nodes[i - 1]._order if i > 0 else -_ORDER_GAP
        hi = self.nodes[i]._order if i < len(self.nodes) else lo + 2 * _ORDER_GAP
        self.nodes.insert(i, node)
        if hi - lo >= 2:
            node._order = (lo + hi) // 2
        else:
            self._renumber()

    def _renumber(self) -> None:
        for k, n in enumerate(self.nodes):
            n._order = k * _ORDER_GAP

    def index_of(self, node: Node) -> int:
        """Position of ``node`` in ``nodes``.

        Nodes carry order keys (spaced integers, renumbered when an insertion finds no room),
        so this is a binary search, not a scan; a node list edited behind the module's back
        (tests building broken IR) is renumbered on first use.
        """
        nodes = self.nodes
        if node.module is self:
            for _ in range(2):
                i = bisect.bisect_left(nodes, node._order, key=_order_key)
                if i < len(nodes) and nodes[i] is node:
                    return i
                self._renumber()
        for i, n in enumerate(nodes):
            if n is node:
                return i
        raise IRError(f"{node!r} is not in module {self.name}")

    def precedes(self, a: Node, b: Node) -> bool:
        """Whether node ``a`` comes before node ``b`` (both in this module)."""
        return self.index_of(a) < self.index_of(b)

    # ----------------------------------------------------------------- rewriting
    def replace_all_uses_with(self, old: Value, new: Value) -> None:
        """Make every reader of ``old`` (nodes and module outputs) read ``new``."""
        if old is new:
            return
        for node, i in list(old.uses):
            node.inputs[i] = new
            new.uses.append((node, i))
        old.uses.clear()
        self.outputs = [new if o is old else o for o in self.outputs]

    def erase(self, node: Node) -> None:
        """Remove a node whose outputs are unused."""
        for v in node.outputs:
            if v.uses or any(o is v for o in self.outputs):
                raise IRError(f"cannot erase {node!r}: output %{v.name} still used")
        for i, v in enumerate(node.inputs):
            v.uses.remove((node, i))
        del self.nodes[self.index_of(node)]
        node.module = None
        node._order = -1

    def is_output(self, v: Value) -> bool:
        return any(o is v for o in self.outputs)

    # ----------------------------------------------------------------- queries
    def __iter__(self) -> Iterator[Node]:
        return iter(list(self.nodes))

    def values(self) -> Iterable[Value]:
        yield from self.inputs
        for n in self.nodes:
            yield from n.outputs

    def find(self, op: str | None = None, scope_prefix: str | None = None) -> list[Node]:
        return [
            n for n in self.nodes
            if (op is None or n.op == op) and (scope_prefix is None or n.scope.startswith(scope_prefix))
        ]

    def op_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            out[n.op] = out.get(n.op, 0) + 1
        return dict(sorted(out.items()))

    def param_count(self) -> int:
        return sum(int(t.numel()) for t in self.params.values())

    def input_specs(self) -> list[dict[str, Any]]:
        """The inputs as JSON-able ``{name, shape, dtype}`` dicts: a compiled library's signature, the decode loop's
        and the input checker's description of what the module takes (shapes may hold symbolic dims)."""
        return [{"name": v.name, "shape": list(v.type.shape), "dtype": v.type.dtype} for v in self.inputs]

    def param_bytes(self) -> int:
        """Bytes of the parameters, each stored tensor once (what an artifact holds)."""
        return sum(int(t.numel()) * t.element_size() for t in self.params.values())

    def read_param_bytes(self) -> int:
        """Parameter bytes counted once per ``param`` node that reads them: what the module would hold
        if no tensor were shared (equal to :meth:`param_bytes` when nothing is read twice)."""
        return sum(int(self.params[n.attrs["name"]].numel()) * self.params[n.attrs["name"]].element_size()
                   for n in self.nodes if n.op == "param" and n.attrs["name"] in self.params)

    def blocks(self) -> list[int]:
        return sorted({n.block for n in self.nodes if n.block is not None})

    # ----------------------------------------------------------------- copying
    def clone(self, *, copy_params: bool = False) -> Module:
        """A structurally independent copy.  Parameter tensors are shared unless
        ``copy_params``: passes must replace parameters, never mutate them in place."""
        m = Module(self.name)
        m.meta = copy.deepcopy(self.meta)
        m.params = {k: (t.clone() if copy_params else t) for k, t in self.params.items()}
        vmap: dict[int, Value] = {}
        for v in self.inputs:
            nv = Value(v.name, v.type)
            m.inputs.append(nv)
            m._names.add(v.name)
            vmap[id(v)] = nv
        for n in self.nodes:
            nn_ = Node(n.op, [vmap[id(v)] for v in n.inputs], copy.deepcopy(n.attrs), n.scope, n.block)
            nn_.module = m
            nn_._order = len(m.nodes) * _ORDER_GAP
            for i, v in enumerate(nn_.inputs):
                v.uses.append((nn_, i))
            for v in n.outputs:
                nv = Value(v.name, v.type, nn_, v.index)
                nn_.outputs.append(nv)
                m._names.add(v.name)
                vmap[id(v)] = nv
            m.nodes.append(nn_)
        m.outputs = [vmap[id(v)] for v in self.outputs]
        m.output_names = list(self.output_names)
        return m

    def __repr__(self) -> str:
        return (f"<ctc Module {self.name}: {len(self.inputs)} inputs, {len(self.nodes)} nodes, "
                f"{len(self.params)} params>")
