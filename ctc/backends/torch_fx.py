"""Torch backend: a ctc Module becomes an executable ``torch.fx.GraphModule``.

This is the way back out to PyTorch (run it eagerly, ``torch.compile`` it, or
``torch.export`` it).  Every ctc node becomes one ``call_function`` of the op's reference
implementation, so the result computes exactly what the interpreter computes.  Parameters
are registered as buffers of the GraphModule (shared tensors, names with ``.`` replaced
by ``__``; :attr:`CtcGraphModule.param_names` maps them back).  Symbolic dims are read
from the inputs' shapes at run time and dims-kind attributes are evaluated from them
(no shape is baked in).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ctc.ir.graph import Module, Value
from ctc.ir.ops import get_op
from ctc.ir.symbolic import eval_dim, free_symbols

__all__ = ["CtcGraphModule", "TorchBackendError", "resolve_dims", "to_fx", "to_graph_module"]


class TorchBackendError(Exception):
    """The module cannot be turned into a GraphModule (names the node and why)."""


def resolve_dims(dims: tuple[Any, ...], env: dict[str, int]) -> tuple[int, ...]:
    """Evaluate a dims attribute under the run-time symbol binding."""
    return tuple(eval_dim(d, env) for d in dims)


def _sym_env(**syms: Any) -> dict[str, int]:
    return {k: int(v) for k, v in syms.items()}


def _safe(name: str) -> str:
    return name.replace(".", "__")


def to_fx(module: Module, *, check_shapes: bool = True, impls: Mapping[str, Callable[..., Any]] | None = None,
          params_as_inputs: bool = False) -> fx.GraphModule:
    """Build a GraphModule computing ``module``; call it with the inputs positionally or by name.

    It returns a tuple of the outputs (in ``module.outputs`` order).  With ``check_shapes``,
    each call checks the inputs against the declared types (rank, static dims, consistent
    symbols) and fails with the input's name.  ``impls`` replaces the implementation of named
    ops (same signature and semantics as the op's reference: an exporter's friendlier form).
    With ``params_as_inputs`` the parameters the graph reads are placeholders after the inputs
    (safe names, in first-read order: :attr:`CtcGraphModule.param_inputs`) instead of buffers.
    """
    root = nn.Module()
    names: dict[str, str] = {}
    for name, t in module.params.items():
        safe = _safe(name)
        if safe in names.values():
            raise TorchBackendError(f"parameter names {name!r} and another collide after replacing '.' by '__'")
        if not params_as_inputs:
            root.register_buffer(safe, t, persistent=True)
        names[name] = safe

    g = fx.Graph()
    env: dict[int, fx.Node] = {}
    sym_nodes: dict[str, fx.Node] = {}
    for v in module.inputs:
        ph = g.placeholder(v.name)
        ph.meta["ctc_type"] = v.type
        env[id(v)] = ph
    param_nodes: dict[str, fx.Node] = {}
    if params_as_inputs:
        for n in module.nodes:
            pname = n.attrs["name"] if n.op == "param" else None
            if pname is not None and pname not in param_nodes:
                param_nodes[pname] = g.placeholder(names[pname])
    # Bind every symbol from the first input dim that is exactly that symbol.
    for v in module.inputs:
        for i, d in enumerate(v.type.shape):
            if isinstance(d, str) and d.isidentifier() and d not in sym_nodes:
                sym_nodes[d] = g.call_function(operator.getitem, (g.call_method("size", (env[id(v)],)), i))
    if check_shapes:
        g.call_function(_check_inputs, (tuple(str(v.type) for v in module.inputs),
                                        tuple(tuple(v.type.shape) for v in module.inputs),
                                        tuple(env[id(v)] for v in module.inputs),
                                        tuple(v.name for v in module.inputs)))
    sym_env_node: fx.Node | None = None

    def sym_env() -> fx.Node:
        nonlocal sym_env_node
        if sym_env_node is None:
            sym_env_node = g.call_function(_sym_env, (), dict(sym_nodes))
        return sym_env_node

    for n in module.nodes:
        if n.op == "param":
            pname = n.attrs["name"]
            env[id(n.output)] = param_nodes[pname] if params_as_inputs else g.get_attr(names[pname])
            continue
        opdef = get_op(n.op)
        kwargs: dict[str, Any] = {}
        for k, spec in opdef.attrs.items():
            val = n.attrs.get(k)
            if spec.kind == "dims" and val is not None and any(isinstance(d, str) for d in val):
                missing = set().union(*(free_symbols(d) for d in val if isinstance(d, str))) - set(sym_nodes)
                if missing:
                    raise TorchBackendError(f"{n.op} at {n.scope or '<root>'}: symbols {sorted(missing)} of "
                                            f"{k}={list(val)} are not bound by any input dim")
                kwargs[k] = g.call_function(resolve_dims, (tuple(val), sym_env()))
            else:
                kwargs[k] = val
        try:
            args = tuple(env[id(v)] for v in n.inputs)
        except KeyError:
            raise TorchBackendError(f"{n!r} reads a value defined after it (run the verifier)") from None
        call = g.call_function((impls or {}).get(n.op, opdef.ref), args, kwargs)
        call.meta["ctc_scope"] = n.scope
        call.meta["ctc_op"] = n.op
        if len(n.outputs) == 1:
            env[id(n.output)] = call
        else:
            for i, out in enumerate(n.outputs):
                env[id(out)] = g.call_function(operator.getitem, (call, i))
    outs: list[Value] = module.outputs
    g.output(tuple(env[id(v)] for v in outs))
    gm = CtcGraphModule(root, g, module)
    gm.param_names = dict(names)
    gm.param_inputs = list(param_nodes)
    return gm


def _check_inputs(types: tuple[str, ...], shapes: tuple[tuple[Any, ...], ...], xs: tuple[torch.Tensor, ...],
                  names: tuple[str, ...]) -> None:
    """Run-time input check: rank, static dims and consistent symbol bindings."""
    from ctc.ir.symbolic import bind_symbols

    env: dict[str, int] = {}
    for t, shape, x, name in zip(types, shapes, xs, names, strict=True):
        try:
            bind_symbols(shape, tuple(x.shape), env, where=f"input {name} ({t}): ")
        except Exception as e:  # noqa: BLE001 - re-raised as a clear input error
            raise TorchBackendError(str(e)) from None


to_graph_module = to_fx  # the name ctc.artifact looks for


class CtcGraphModule(fx.GraphModule):
    """A GraphModule built from a ctc Module; accepts inputs by position or by name."""

    param_names: dict[str, str]
    param_inputs: list[str]  # with params_as_inputs: the ctc names of the parameter placeholders, in order

    def __init__(self, root: nn.Module, graph: fx.Graph, module: Module):
        super().__init__(root, graph, class_name="CtcGraphModule")
        self.input_names = [v.name for v in module.inputs]
        self.output_names = list(module.output_names)

    def run(self, inputs: dict[str, torch.Tensor] | list[torch.Tensor]) -> list[torch.Tensor]:
        """Call with a dict keyed by input name (or a list); returns the outputs as a list."""
        if isinstance(inputs, dict):
            missing = [n for n in self.input_names if n not in inputs]
            if missing:
                raise TorchBackendError(f"missing inputs {missing} (the module takes {self.input_names})")
            args = [inputs[n] for n in self.input_names]
        else:
            args = list(inputs)
        with torch.no_grad():
            return list(self(*args))
