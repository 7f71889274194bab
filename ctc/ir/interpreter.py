"""Reference interpreter: runs a ctc module with each op's torch reference implementation.

This defines the semantics of the IR.  Symbolic dims are bound from the concrete
input shapes; ``dims``-kind attributes are evaluated under that binding before the
reference implementation sees them.  An optional ``observer`` sees every node's
concrete outputs (calibration statistics use it) without keeping them alive.  An
:class:`Execution` can stop between nodes, fork, and finish with nodes computed differently
(searches that try variants of one node resume there).
A run can also leave :class:`Checkpoint` s behind and be resumed from one with other parameters,
skipped nodes and rewired values (:func:`resume`; the structural passes' calibration replay).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from ctc.ir.graph import IRError, Module, Node, Value
from ctc.ir.ops import get_op
from ctc.ir.symbolic import bind_symbols, eval_dim
from ctc.ir.types import FLOAT_DTYPES

Observer = Callable[[Node, list[torch.Tensor], list[torch.Tensor]], None]


class InterpretError(RuntimeError):
    """A node failed while interpreting; names the node, its scope and input shapes."""


def _resolve_dims(node: Node, env: dict[str, int]) -> dict:
    opdef = get_op(node.op)
    attrs = dict(node.attrs)
    for k, spec in opdef.attrs.items():
        if spec.kind == "dims" and attrs.get(k) is not None:
            attrs[k] = tuple(eval_dim(d, env) for d in attrs[k])
    return attrs


def _call_op(node: Node, args: list[torch.Tensor], env: dict[str, int],
             refs: Mapping[str, Callable[..., object]] | None,
             override: Callable[[list[torch.Tensor]], object] | None = None) -> list[torch.Tensor]:
    """Run one non-param node (its override, a replacement reference, or the op's own) and list its outputs;
    any failure is re-raised as an InterpretError naming the node's op, scope, block and input shapes."""
    try:
        if override is not None:
            res = override(args)
        else:
            ref = refs[node.op] if refs is not None and node.op in refs else get_op(node.op).ref
            res = ref(*args, **_resolve_dims(node, env))
    except Exception as e:  # noqa: BLE001 - re-raised with the node's location
        shapes = [tuple(a.shape) for a in args]
        raise InterpretError(
            f"{node.op} at scope {node.scope or '<root>'} (block {node.block}) failed on "
            f"inputs {shapes}: {type(e).__name__}: {e}") from e
    return list(res) if isinstance(res, (tuple, list)) else [res]


def bind_inputs(module: Module, inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
                ) -> tuple[list[torch.Tensor], dict[str, int]]:
    """Order inputs like ``module.inputs`` and bind symbolic dims from their shapes."""
    if isinstance(inputs, Mapping):
        missing = [v.name for v in module.inputs if v.name not in inputs]
        if missing:
            raise IRError(f"missing inputs {missing} (module takes {[v.name for v in module.inputs]})")
        extra = set(inputs) - {v.name for v in module.inputs}
        if extra:
            raise IRError(f"unknown inputs {sorted(extra)} (module takes {[v.name for v in module.inputs]})")
        ordered = [inputs[v.name] for v in module.inputs]
    else:
        ordered = list(inputs)
        if len(ordered) != len(module.inputs):
            raise IRError(f"module takes {len(module.inputs)} inputs, got {len(ordered)}")
    env: dict[str, int] = {}
    for v, t in zip(module.inputs, ordered, strict=True):
        if not isinstance(t, torch.Tensor):
            raise IRError(f"input %{v.name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.is_floating_point() != (v.type.dtype in FLOAT_DTYPES):  # e.g. token ids as floats: ops fail deep inside
            raise IRError(f"input %{v.name} is {v.type.dtype}, got a {t.dtype} tensor: convert it "
                          f"({'x.float()' if v.type.dtype in FLOAT_DTYPES else 'x.long()'}) if that is meant")
        bind_symbols(v.type.shape, tuple(t.shape), env, where=f"input %{v.name}: ")
    return ordered, env


class Execution:
    """A run of a module that can stop between nodes, be forked, and finish with some nodes
    computed differently.

    ``run_to(i)`` executes the nodes before position ``i``; ``fork()`` copies the run's state
    (the live values are shared, never written in place); ``finish(overrides)`` executes the rest
    and returns the outputs, computing each node in ``overrides`` as ``fn(args) -> outputs``
    instead of its reference.  A search that tries variants of one node resumes from there
    instead of re-running the module from the start.  ``interpret`` is ``Execution(...).finish()``.
    """

    def __init__(self, module: Module, inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor], *,
                 observer: Observer | None = None, params: Mapping[str, torch.Tensor] | None = None,
                 refs: Mapping[str, Callable[..., object]] | None = None):
        self.module = module
        self.params = module.params if params is None else params
        self.refs = refs
        self.observer = observer
        ordered, self.env = bind_inputs(module, inputs)
        self.live: dict[int, torch.Tensor] = {id(v): t for v, t in zip(module.inputs, ordered, strict=True)}
        # Last position at which each value is read; outputs are kept to the end.
        self.last_use: dict[int, int] = {}
        for i, n in enumerate(module.nodes):
            for v in n.inputs:
                self.last_use[id(v)] = i
        self.keep = {id(v) for v in module.outputs}
        self.position = 0

    def fork(self) -> Execution:
        """An independent copy of this run at the same position (tensors shared)."""
        other = object.__new__(Execution)
        other.__dict__.update(self.__dict__)
        other.live = dict(self.live)
        return other

    def run_to(self, stop: int, overrides: Mapping[Node, Callable[[list[torch.Tensor]], list[torch.Tensor]]]
               | None = None) -> None:
        """Execute the nodes at positions ``[position, stop)``."""
        if stop < self.position:
            raise IRError(f"run_to({stop}): this run is already at node {self.position}")
        with torch.no_grad():
            for i in range(self.position, stop):
                self._step(i, self.module.nodes[i], overrides)
        self.position = stop

    def finish(self, overrides: Mapping[Node, Callable[[list[torch.Tensor]], list[torch.Tensor]]] | None = None
               ) -> list[torch.Tensor]:
        """Execute the remaining nodes; the module's outputs in order."""
        self.run_to(len(self.module.nodes), overrides)
        return [self.live[id(v)] for v in self.module.outputs]

    def _step(self, i: int, node: Node, overrides: Mapping[Node, Callable[..., list[torch.Tensor]]] | None) -> None:
        live = self.live
        try:
            args = [live[id(v)] for v in node.inputs]
        except KeyError:
            raise InterpretError(f"{node!r} reads a value that is not defined before it") from None
        if node.op == "param":
            name = node.attrs["name"]
            if name not in self.params:
                raise InterpretError(f"parameter {name!r} missing (read at {node.scope or '<root>'})")
            outs = [self.params[name]]
        else:
            override = overrides.get(node) if overrides is not None else None
            outs = _call_op(node, args, self.env, self.refs, override)
        if self.observer is not None:
            self.observer(node, args, outs)
        for v, t in zip(node.outputs, outs, strict=True):
            live[id(v)] = t
        for v in node.inputs:
            if self.last_use.get(id(v)) == i and id(v) not in self.keep:
                live.pop(id(v), None)


def interpret(
    module: Module,
    inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    *,
    observer: Observer | None = None,
    params: Mapping[str, torch.Tensor] | None = None,
    refs: Mapping[str, Callable[..., object]] | None = None,
) -> list[torch.Tensor]:
    """Run ``module`` on concrete inputs; returns the outputs in order.

    ``refs`` replaces the reference implementation of the ops it names (same signature): a
    backend's stricter semantics, e.g. the fpga target's integer model
    (:mod:`ctc.backends.hls.exact`), run by the same interpreter.

    Values are freed after their last use so memory stays bounded by the live set.
    """
    return Execution(module, inputs, observer=observer, params=params, refs=refs).finish()


@dataclass
class Checkpoint:
    """A run paused just before node ``index``: the values live there (by value id) and the dim binding.

    :func:`resume` continues from it, so a caller that re-runs the tail of a module many
    times (with other parameters, or with some nodes skipped) pays only for the tail.
    The tensors are shared with the run that made it (ops never write their inputs).
    """

    index: int
    values: dict[int, torch.Tensor]
    env: dict[str, int]


def interpret_with_checkpoints(
    module: Module,
    inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    at: Sequence[int],
    *,
    observer: Observer | None = None,
    params: Mapping[str, torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], list[Checkpoint]]:
    """Run ``module`` like :func:`interpret` and also return a :class:`Checkpoint` before each node index in ``at``."""
    bad = [i for i in at if not 0 <= i <= len(module.nodes)]
    if bad:
        raise IRError(f"checkpoint index {bad[0]} is outside 0..{len(module.nodes)}")
    ordered, env = bind_inputs(module, inputs)
    live: dict[int, torch.Tensor] = {id(v): t for v, t in zip(module.inputs, ordered, strict=True)}
    cps: list[Checkpoint] = []
    outs = _execute(module, 0, live, env, params=params, observer=observer, checkpoints=sorted(set(at)),
                    saved=cps)
    return outs, cps


def resume(
    module: Module,
    checkpoint: Checkpoint,
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    skip: Collection[Node] = (),
    alias: Mapping[Value, Value] | None = None,
    observer: Observer | None = None,
) -> list[torch.Tensor]:
    """Continue a run from ``checkpoint`` to the module outputs.

    ``params`` replaces the parameters (a mapping with the same names); ``skip`` lists nodes
    not to run, and ``alias`` makes every read of a key value (by later nodes and the outputs)
    read the mapped value instead.  Together they run the module as if an edit had removed
    those nodes and rewired their results, without copying the graph; a read of a value that
    is neither computed nor aliased is an :class:`InterpretError`.
    """
    live = dict(checkpoint.values)
    amap = {id(k): v for k, v in (alias or {}).items()}
    return _execute(module, checkpoint.index, live, dict(checkpoint.env), params=params, observer=observer,
                    skip={id(n) for n in skip}, alias=amap)


def _execute(module: Module, start: int, live: dict[int, torch.Tensor], env: dict[str, int], *,
             params: Mapping[str, torch.Tensor] | None, observer: Observer | None,
             refs: Mapping[str, Callable[..., object]] | None = None,
             skip: Collection[int] = (), alias: Mapping[int, Value] | None = None,
             checkpoints: Sequence[int] = (), saved: list[Checkpoint] | None = None) -> list[torch.Tensor]:
    """Run nodes ``start..`` over ``live`` (value id -> tensor), freeing each value after its last read."""
    params = module.params if params is None else params
    amap = alias or {}

    def src(v: Value) -> int:
        w = amap.get(id(v))
        return id(v) if w is None else id(w)

    nodes = module.nodes
    order = [(i, n) for i, n in enumerate(nodes) if i >= start and id(n) not in skip]
    # Last position at which each value is read; outputs are kept to the end.
    last_use: dict[int, int] = {}
    for i, n in order:
        for v in n.inputs:
            last_use[src(v)] = i
    keep = {src(v) for v in module.outputs}
    pending = list(checkpoints)
    k = 0

    with torch.no_grad():
        for i, node in order:
            while saved is not None and k < len(pending) and pending[k] <= i:
                saved.append(Checkpoint(pending[k], dict(live), dict(env)))
                k += 1
            try:
                args = [live[src(v)] for v in node.inputs]
            except KeyError:
                raise InterpretError(f"{node!r} reads a value that is not defined before it") from None
            if node.op == "param":
                name = node.attrs["name"]
                if name not in params:
                    raise InterpretError(f"parameter {name!r} missing (read at {node.scope or '<root>'})")
                outs = [params[name]]
            else:
                outs = _call_op(node, args, env, refs)
            if observer is not None:
                observer(node, args, outs)
            for v, t in zip(node.outputs, outs, strict=True):
                live[id(v)] = t
            for v in node.inputs:
                s = src(v)
                if last_use.get(s) == i and s not in keep:
                    live.pop(s, None)
        while saved is not None and k < len(pending):
            saved.append(Checkpoint(pending[k], dict(live), dict(env)))
            k += 1
    try:
        return [live[src(v)] for v in module.outputs]
    except KeyError:
        raise InterpretError("a module output is neither computed nor aliased in this run") from None


def value_env(module: Module, inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run and return every value by name (for debugging and tests; keeps everything)."""
    out: dict[str, torch.Tensor] = {}

    def obs(node: Node, args: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        for v, t in zip(node.outputs, outs, strict=True):
            out[v.name] = t

    ordered, _ = bind_inputs(module, inputs)
    for v, t in zip(module.inputs, ordered, strict=True):
        out[v.name] = t
    interpret(module, inputs, observer=obs)
    return out

