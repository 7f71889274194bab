"""The IR verifier: checks every structural invariant of a module and lists every problem.

The pass manager runs it after each pass, so a broken rewrite is caught where it
happened.  Checked: SSA (each value defined once, before its uses, nodes in
topological order), exact use lists, producer/index back-links, defined outputs with
unique names, attributes valid per the op schema, operand counts that fit the layout the
attributes describe (``quant_linear``'s bias iff ``has_bias``, ...), recorded types equal re-inferred ones
(symbolic-aware), ``param`` nodes naming existing parameters of the recorded type, and
unique value names.  Unused parameters and symbols no input binds are warnings.
"""

from __future__ import annotations

from collections import Counter

from ctc.ir.graph import IRError, Module, Node, Value
from ctc.ir.ops import OpError, get_op
from ctc.ir.symbolic import dims_equal
from ctc.ir.types import TensorType

__all__ = ["VerifyError", "verify"]


class VerifyError(IRError):
    """The module violates IR invariants; ``errors`` lists every problem found."""

    def __init__(self, module_name: str, errors: list[str]):
        self.errors = list(errors)
        shown = "\n".join(f"  - {e}" for e in errors[:50])
        more = f"\n  ... and {len(errors) - 50} more" if len(errors) > 50 else ""
        super().__init__(f"module {module_name} failed verification ({len(errors)} problem(s)):\n{shown}{more}")


def _where(i: int, node: Node) -> str:
    return f"node {i} ({node.op} at {node.scope or '<root>'}, block {node.block})"


def types_equal(a: TensorType, b: TensorType) -> bool:
    """Equal dtypes and ranks, and dims equal as symbolic expressions."""
    return a.dtype == b.dtype and a.rank == b.rank and all(dims_equal(x, y) for x, y in zip(a.shape, b.shape,
                                                                                              strict=True))


def verify(module: Module, *, check_types: bool = True) -> list[str]:
    """Check ``module``; raise :class:`VerifyError` listing every problem, else return warnings."""
    errors: list[str] = []
    warnings: list[str] = []

    # ---- definitions: each value defined once; names unique
    defined_at: dict[int, int] = {}  # id(value) -> position (-1 for inputs)
    owner: dict[int, Value] = {}
    names = Counter(v.name for v in module.values())
    for name, k in names.items():
        if k > 1:
            errors.append(f"value name %{name} is used by {k} values (names must be unique)")
    for v in module.inputs:
        if id(v) in defined_at:
            errors.append(f"input %{v.name} is listed twice")
        if v.producer is not None:
            errors.append(f"input %{v.name} claims producer {v.producer!r}")
        defined_at[id(v)] = -1
        owner[id(v)] = v
    node_ids = set()
    for i, n in enumerate(module.nodes):
        if id(n) in node_ids:
            errors.append(f"{_where(i, n)} appears twice in the node list")
        node_ids.add(id(n))
        if n.module is not module:
            errors.append(f"{_where(i, n)}: node.module does not point at this module")
        for j, v in enumerate(n.outputs):
            if id(v) in defined_at:
                errors.append(f"{_where(i, n)}: output %{v.name} is already defined "
                              f"{'as an input' if defined_at[id(v)] < 0 else f'by node {defined_at[id(v)]}'}")
            defined_at.setdefault(id(v), i)
            owner[id(v)] = v
            if v.producer is not n or v.index != j:
                errors.append(f"{_where(i, n)}: output %{v.name} has producer/index {v.producer!r}/{v.index}, "
                              f"expected this node/{j}")

    # ---- uses: defined before use (topological order), exact use lists
    expected_uses: dict[int, Counter] = {id(v): Counter() for v in owner.values()}
    for i, n in enumerate(module.nodes):
        for j, v in enumerate(n.inputs):
            pos = defined_at.get(id(v))
            if pos is None:
                errors.append(f"{_where(i, n)}: operand {j} %{v.name} is not defined in this module")
                continue
            if pos >= i:
                errors.append(f"{_where(i, n)}: operand {j} %{v.name} is defined later, by node {pos} "
                              "(nodes must be in topological order)")
            expected_uses[id(v)][(id(n), j)] += 1
    for vid, v in owner.items():
        actual = Counter((id(n), j) for n, j in v.uses)
        want = expected_uses[vid]
        if actual != want:
            missing = want - actual
            stale = actual - want
            if missing:
                errors.append(f"use list of %{v.name} misses {sum(missing.values())} use(s) "
                              f"(operands {[j for (_, j) in missing]})")
            if stale:
                bad = [f"{n.op}#{j}" for n, j in v.uses if (id(n), j) in stale]
                errors.append(f"use list of %{v.name} has {sum(stale.values())} stale use(s): {bad}")

    # ---- outputs
    if len(module.outputs) != len(module.output_names):
        errors.append(f"{len(module.outputs)} outputs but {len(module.output_names)} output names")
    for k, v in enumerate(module.outputs):
        if id(v) not in defined_at:
            errors.append(f"output {k} %{v.name} is not defined in this module")
    for name, k in Counter(module.output_names).items():
        if k > 1:
            errors.append(f"output name {name!r} is used {k} times")

    # ---- attributes and types
    read_params: set[str] = set()
    for i, n in enumerate(module.nodes):
        where = _where(i, n)
        try:
            opdef = get_op(n.op)
        except OpError as e:
            errors.append(f"{where}: {e}")
            continue
        try:
            opdef.check_arity(len(n.inputs), where)
        except OpError as e:
            errors.append(str(e))
            continue
        if len(n.outputs) != opdef.num_outputs:
            errors.append(f"{where}: has {len(n.outputs)} outputs, op {n.op} declares {opdef.num_outputs}")
            continue
        missing = [k for k in opdef.attrs if k not in n.attrs]
        if missing:
            errors.append(f"{where}: attributes {missing} are missing (create nodes with Module.create_node)")
        try:
            checked = opdef.check_attrs({k: v for k, v in n.attrs.items()}, where=where)
        except OpError as e:
            errors.append(str(e))
            continue
        try:
            opdef.slots(len(n.inputs), checked, where=where)  # the operand layout its attributes describe
        except OpError as e:
            errors.append(str(e))
            continue
        if n.op == "param":
            name = n.attrs["name"]
            read_params.add(name)
            if name not in module.params:
                errors.append(f"{where}: reads parameter {name!r} which does not exist")
            else:
                pt = TensorType.of(module.params[name])
                if pt != n.outputs[0].type:
                    errors.append(f"{where}: %{n.outputs[0].name} is typed {n.outputs[0].type} "
                                  f"but parameter {name!r} is {pt}")
            continue
        if not check_types or missing:
            continue
        try:
            inferred = opdef.infer_types([v.type for v in n.inputs], checked)
        except OpError as e:
            errors.append(f"{where}: type inference fails: {e}")
            continue
        for v, t in zip(n.outputs, inferred, strict=True):
            if not types_equal(v.type, t):
                errors.append(f"{where}: %{v.name} is recorded as {v.type} but infers as {t}")

    # ---- warnings
    for name in module.params:
        if name not in read_params:
            warnings.append(f"parameter {name!r} is never read (the dce pass drops it)")
    bound: set[str] = set()
    for v in module.inputs:
        bound |= {d for d in v.type.shape if isinstance(d, str)}
    unbound: dict[str, str] = {}
    for v in module.values():
        for sym in sorted(v.type.symbols - bound):
            unbound.setdefault(sym, v.name)
    for sym, first in unbound.items():
        warnings.append(f"symbol {sym} (first in the type of %{first}) is bound by no input")

    if errors:
        raise VerifyError(module.name, errors)
    return warnings
