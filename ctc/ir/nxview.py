"""networkx views of a ctc module, and the graph analyses passes build on.

:func:`to_digraph` gives a :class:`networkx.DiGraph` whose nodes are the IR
:class:`~ctc.ir.graph.Node` objects and whose edges are value flow: an edge
``producer -> consumer`` carries ``value`` (the first value flowing along it) and
``ports`` (every ``(output index, operand index)`` pair, since a consumer may read
several outputs of a producer, or one value twice).  Views are snapshots: build a new
one after rewriting the module.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import networkx as nx

from ctc.ir.graph import Module, Node, Value

__all__ = ["block_subgraph", "consumers_closure", "dominates", "dominators", "isomorphic_blocks", "live_ranges",
           "post_dominators", "to_digraph"]

ENTRY = "<entry>"
EXIT = "<exit>"


def to_digraph(module: Module, *, include_io: bool = False) -> nx.DiGraph:
    """The value-flow graph of ``module``.

    Node attributes: ``op``, ``scope``, ``block``, ``attrs``.  With ``include_io``, module
    inputs appear as nodes ``("input", name)`` and outputs as ``("output", name)``.
    """
    g = nx.DiGraph(name=module.name)
    for n in module.nodes:
        g.add_node(n, op=n.op, scope=n.scope, block=n.block, attrs=n.attrs)
    if include_io:
        for v in module.inputs:
            g.add_node(("input", v.name), op="<input>", scope="", block=None, attrs={})
    for n in module.nodes:
        for j, v in enumerate(n.inputs):
            src: Any = v.producer if v.producer is not None else (("input", v.name) if include_io else None)
            if src is None:
                continue
            if g.has_edge(src, n):
                g.edges[src, n]["ports"].append((v.index, j))
            else:
                g.add_edge(src, n, value=v, ports=[(v.index, j)])
    if include_io:
        for k, (v, name) in enumerate(zip(module.outputs, module.output_names, strict=True)):
            out = ("output", name)
            g.add_node(out, op="<output>", scope="", block=None, attrs={})
            src = v.producer if v.producer is not None else ("input", v.name)
            g.add_edge(src, out, value=v, ports=[(v.index, k)])
    return g


def consumers_closure(value: Value, *, stop: Callable[[Node], bool] | None = None) -> list[Node]:
    """Every node that (transitively) reads ``value``, in module order.

    ``stop(node)`` marks nodes that are included but not looked through, e.g. the linear
    layers that absorb a channel permutation: the closure then lists the boundary a
    rewrite must reach.
    """
    seen: dict[int, Node] = {}
    work = list(value.users)
    while work:
        n = work.pop()
        if id(n) in seen:
            continue
        seen[id(n)] = n
        if stop is not None and stop(n):
            continue
        for v in n.outputs:
            work.extend(v.users)
    nodes = list(seen.values())
    mod = value.producer.module if value.producer is not None else (nodes[0].module if nodes else None)
    if mod is not None:
        order = {id(n): i for i, n in enumerate(mod.nodes)}
        nodes.sort(key=lambda n: order.get(id(n), len(order)))
    return nodes


def dominators(module: Module, *, include_constants: bool = False) -> dict[Node, Node | None]:
    """Immediate dominator of every node over value flow from a virtual entry.

    The entry feeds the readers of the module inputs, so a node dominates another when
    every path of activations from the inputs to it passes through it.  Nodes that depend
    on no input (``param`` reads, constants and what is computed from them alone) are left
    out, and edges from them ignored, unless ``include_constants``: then the entry also
    feeds every node without operands.  A node whose idom is the entry maps to ``None``.
    """
    g = to_digraph(module)
    g.add_node(ENTRY)
    for n in module.nodes:
        if any(v.producer is None for v in n.inputs) or (include_constants and not n.inputs):
            g.add_edge(ENTRY, n)
    idom = nx.immediate_dominators(g, ENTRY)
    return {n: (None if idom[n] == ENTRY else idom[n]) for n in module.nodes if n in idom}


def post_dominators(module: Module) -> dict[Node, Node | None]:
    """Immediate post-dominator of every node toward a virtual exit fed by the outputs.

    Nodes that do not reach an output (dead code) are left out.
    """
    g = to_digraph(module).reverse(copy=True)
    g.add_node(EXIT)
    for v in module.outputs:
        if v.producer is not None:
            g.add_edge(EXIT, v.producer)
    ipdom = nx.immediate_dominators(g, EXIT)
    return {n: (None if ipdom[n] == EXIT else ipdom[n]) for n in module.nodes if n in ipdom}


def dominates(idom: dict[Node, Node | None], a: Node, b: Node) -> bool:
    """Whether ``a`` dominates ``b`` given an immediate-dominator map (every node dominates itself)."""
    cur: Node | None = b
    while cur is not None:
        if cur is a:
            return True
        cur = idom.get(cur)
    return False


def block_subgraph(module: Module, block: int, graph: nx.DiGraph | None = None) -> nx.DiGraph:
    """The induced subgraph of the nodes of one block (a view of ``graph`` or a new value-flow graph)."""
    g = graph if graph is not None else to_digraph(module)
    return g.subgraph([n for n in module.nodes if n.block == block])


def _label(n: Node) -> str:
    attrs = {k: v for k, v in n.attrs.items() if not (n.op == "param" and k == "name")}
    return f"{n.op}{sorted(attrs.items(), key=lambda kv: kv[0])!r}"


def _typed_label(n: Node) -> str:
    return _label(n) + "|" + ",".join(str(v.type) for v in n.outputs)


def isomorphic_blocks(module: Module, *, types: bool = True, blocks: Iterable[int] | None = None) -> list[list[int]]:
    """Groups of blocks with the same structure, each group sorted, groups by first block.

    Two blocks match when their value-flow subgraphs are isomorphic with equal op names,
    attributes (ignoring which parameter a ``param`` node names), operand ports and, with
    ``types``, output types.  Edges leaving or entering the block are not compared.
    """
    g = to_digraph(module)
    label = _typed_label if types else _label
    wanted = module.blocks() if blocks is None else sorted(set(blocks))
    subs: dict[int, nx.DiGraph] = {}
    for b in wanted:
        sg = nx.DiGraph(block_subgraph(module, b, g))
        for n in sg.nodes:
            sg.nodes[n]["label"] = label(n)
        for u, v in sg.edges:
            sg.edges[u, v]["label"] = repr(sorted(sg.edges[u, v]["ports"]))
        subs[b] = sg
    buckets: dict[str, list[int]] = {}
    for b, sg in subs.items():
        with warnings.catch_warnings():  # networkx 3.5 notes its directed-hash change: irrelevant here
            warnings.simplefilter("ignore", UserWarning)
            h = nx.weisfeiler_lehman_graph_hash(sg, node_attr="label", edge_attr="label")
        buckets.setdefault(f"{h}/{sg.number_of_nodes()}/{sg.number_of_edges()}", []).append(b)
    groups: list[list[int]] = []
    node_match = nx.algorithms.isomorphism.categorical_node_match("label", None)
    edge_match = nx.algorithms.isomorphism.categorical_edge_match("label", None)
    for members in buckets.values():
        classes: list[list[int]] = []
        for b in members:
            for cls in classes:
                if nx.is_isomorphic(subs[cls[0]], subs[b], node_match=node_match, edge_match=edge_match):
                    cls.append(b)
                    break
            else:
                classes.append([b])
        groups.extend(classes)
    return sorted((sorted(c) for c in groups), key=lambda c: c[0])


def live_ranges(module: Module) -> dict[Value, tuple[int, int]]:
    """For every value, ``(defined at, last read at)`` as node positions (memory planning).

    Module inputs are defined at ``-1``; module outputs stay live to ``len(module.nodes)``;
    a value nobody reads dies where it is defined.
    """
    out: dict[Value, tuple[int, int]] = {v: (-1, -1) for v in module.inputs}
    for i, n in enumerate(module.nodes):
        for v in n.inputs:
            if v in out:
                out[v] = (out[v][0], i)
        for v in n.outputs:
            out[v] = (i, i)
    end = len(module.nodes)
    for v in module.outputs:
        if v in out:
            out[v] = (out[v][0], end)
    return out
