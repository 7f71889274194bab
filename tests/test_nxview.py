"""networkx views of modules: value-flow edges, consumer closures, dominators, repeated blocks."""

from __future__ import annotations

import torch

from ctc.ir import Module, TensorType
from ctc.ir.nxview import (
    block_subgraph,
    consumers_closure,
    dominates,
    dominators,
    isomorphic_blocks,
    live_ranges,
    post_dominators,
    to_digraph,
)


def _stack(ranks: list[int]) -> Module:
    """One block per entry: lowrank_linear(rank) -> channel_permute, chained; the rank varies the structure."""
    m = Module("stack")
    h = m.add_input("x", TensorType((1, "s0", 8), "f32"))
    for b, r in enumerate(ranks):
        sc = f"layers.{b}"
        m.add_param(f"{sc}.u", torch.randn(8, r))
        m.add_param(f"{sc}.v", torch.randn(r, 8))
        m.add_param(f"{sc}.perm", torch.randperm(8))
        u = m.param(f"{sc}.u", scope=sc, block=b)
        v = m.param(f"{sc}.v", scope=sc, block=b)
        y = m.create_node("lowrank_linear", [h, u, v], {"rank": r}, scope=sc, block=b).output
        h = m.create_node("channel_permute", [y, m.param(f"{sc}.perm", scope=sc, block=b)], scope=sc, block=b).output
    m.set_outputs([h], ["h"])
    return m


def test_digraph_edges_carry_values_and_ports():
    m = _stack([2, 2])
    g = to_digraph(m)
    assert set(g.nodes) == set(m.nodes)
    lr = m.find("lowrank_linear")[1]
    perm0 = m.find("channel_permute")[0]
    assert g.has_edge(perm0, lr)
    assert g.edges[perm0, lr]["value"] is perm0.output
    assert g.edges[perm0, lr]["ports"] == [(0, 0)]
    assert g.nodes[lr]["op"] == "lowrank_linear" and g.nodes[lr]["block"] == 1
    gio = to_digraph(m, include_io=True)
    assert gio.has_edge(("input", "x"), m.find("lowrank_linear")[0])
    assert gio.has_edge(m.find("channel_permute")[1], ("output", "h"))


def test_digraph_records_repeated_operands_as_ports():
    m2 = Module("twice")
    x2 = m2.add_input("x", TensorType((4,), "f32"))
    m2.add_param("perm", torch.arange(4))
    n = m2.create_node("channel_permute", [x2, m2.param("perm")])
    m2.add_param("w", torch.randn(4, 4))
    w = m2.param("w")
    last = m2.create_node("lowrank_linear", [n.output, w, w], {"rank": 4})
    m2.set_outputs([last.output])
    g2 = to_digraph(m2)
    assert g2.edges[w.producer, last]["ports"] == [(0, 1), (0, 2)]


def test_consumers_closure_with_and_without_stop():
    m = _stack([2, 2, 2])
    x = m.inputs[0]
    everything = consumers_closure(x)
    assert [n.op for n in everything] == ["lowrank_linear", "channel_permute"] * 3
    assert everything == sorted(everything, key=m.index_of)
    first = consumers_closure(x, stop=lambda n: n.op == "lowrank_linear")
    assert first == [m.find("lowrank_linear")[0]]
    assert consumers_closure(m.outputs[0]) == []


def test_dominators_and_post_dominators():
    m = _stack([2, 2])
    idom = dominators(m)
    lr0, lr1 = m.find("lowrank_linear")
    p0, p1 = m.find("channel_permute")
    assert idom[lr0] is None  # reads the input directly
    assert idom[lr1] is p0 and dominates(idom, p0, lr1) and dominates(idom, lr0, p1)
    assert not dominates(idom, lr1, p0)
    assert all(n.op != "param" for n in idom)  # constants are not on activation paths
    with_consts = dominators(m, include_constants=True)
    assert with_consts[lr1] is None  # now also reachable through its weights
    assert len(with_consts) == len(m.nodes)
    ipdom = post_dominators(m)
    assert dominates(ipdom, p1, lr0)  # every path from lr0 to the output goes through the last permute
    assert dominates(ipdom, lr1, p0)


def test_block_subgraph_selects_one_block():
    m = _stack([2, 3])
    sg = block_subgraph(m, 1)
    assert {n.block for n in sg.nodes} == {1}
    assert sg.number_of_nodes() == 5 and sg.number_of_edges() == 4


def test_isomorphic_blocks_groups_equal_structures_ignoring_param_names():
    m = _stack([2, 2, 3, 2, 3])
    assert isomorphic_blocks(m) == [[0, 1, 3], [2, 4]]
    assert isomorphic_blocks(m, blocks=[0, 1]) == [[0, 1]]
    # types=False still separates them: rank is an attribute
    assert isomorphic_blocks(m, types=False) == [[0, 1, 3], [2, 4]]


def test_isomorphic_blocks_sees_operand_order():
    m = _stack([2, 2])
    # swap the operands of block 1's permute: same nodes and edges, different ports
    p1 = m.find("channel_permute")[1]
    y, perm = p1.inputs
    p1.set_input(0, perm)
    p1.set_input(1, y)
    assert isomorphic_blocks(m, types=False) == [[0], [1]]


def test_live_ranges():
    m = _stack([2])
    lr = live_ranges(m)
    x = m.inputs[0]
    lin = m.find("lowrank_linear")[0]
    assert lr[x] == (-1, m.index_of(lin))
    assert lr[lin.output] == (m.index_of(lin), m.index_of(m.find("channel_permute")[0]))
    assert lr[m.outputs[0]][1] == len(m.nodes)
    assert set(lr) == set(m.values())
