"""The repeated blocks of a module as a residual stream: what each block reads and hands on.

Capture tags every node of a transformer layer with its ``block`` index.  Seen from outside,
a block is a function of the residual stream: it reads one value that nothing else inside the
stack reads (the hidden state handed on by the previous block, or the embedding for the first)
plus values shared by every block (rotary tables, the attention mask), and hands exactly one
value on (its residual output).  :func:`block_layout` finds that interface and proves it on the
graph; block-level passes (removal, reordering, sharing) plan on it, and it raises
:class:`BlockLayoutError` naming the offending value when a module does not have this shape
(a decode step whose blocks also write KV caches, a block read by a later one, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from ctc.ir.graph import IRError, Module, Node, Value

__all__ = ["BlockInfo", "BlockLayout", "BlockLayoutError", "block_layout"]


class BlockLayoutError(IRError):
    """The module's blocks do not form a residual chain (one value in, one value out, in order)."""


@dataclass
class BlockInfo:
    """One block: its nodes (module order), span of positions, and residual interface.

    ``first``/``last`` are positions in ``module.nodes`` of its first and last node; ``shared``
    lists the other values it reads from outside itself (read by other blocks too).
    """

    index: int
    nodes: list[Node]
    first: int
    last: int
    residual_in: Value
    residual_out: Value
    shared: list[Value]


@dataclass
class BlockLayout:
    """Every block in order; ``blocks[k].index`` is the block number (usually ``k``)."""

    blocks: list[BlockInfo]

    def __len__(self) -> int:
        return len(self.blocks)

    def by_index(self, index: int) -> BlockInfo:
        for b in self.blocks:
            if b.index == index:
                return b
        raise KeyError(f"no block {index} (blocks: {[b.index for b in self.blocks]})")

    def indices(self) -> list[int]:
        return [b.index for b in self.blocks]


def _reader(v: Value, module: Module) -> str:
    users = v.users
    if users:
        u = users[0]
        return f"{u.op} at {u.scope or '<root>'} (block {u.block})"
    return "the module output" if module.is_output(v) else "nothing"


def block_layout(module: Module) -> BlockLayout:
    """The residual interface of every block of ``module``, checked.

    Raises :class:`BlockLayoutError` when the module has no blocks, a block hands on other
    than one value, its residual input is ambiguous, or the blocks do not chain in order.
    """
    members: dict[int, list[tuple[int, Node]]] = {}
    for i, n in enumerate(module.nodes):
        if n.block is not None:
            members.setdefault(n.block, []).append((i, n))
    if not members:
        raise BlockLayoutError(f"module {module.name} has no repeated blocks (no node carries a block index); "
                               "block-level passes need a model captured with its layer stack")
    order = sorted(members)
    owner = {id(n): b for b, items in members.items() for _, n in items}
    # Which blocks read each value produced outside them.
    readers: dict[int, set[int]] = {}
    for b, items in members.items():
        for _, n in items:
            for v in n.inputs:
                if v.producer is None or owner.get(id(v.producer)) != b:
                    readers.setdefault(id(v), set()).add(b)
    infos: list[BlockInfo] = []
    prev_out: Value | None = None
    for b in order:
        items = members[b]
        nodes = [n for _, n in items]
        ids = {id(n) for n in nodes}
        exported: list[Value] = []
        for n in nodes:
            for v in n.outputs:
                if module.is_output(v) or any(id(u) not in ids for u in v.users):
                    exported.append(v)
        if len(exported) != 1:
            what = ", ".join(f"%{v.name} (read by {_reader(v, module)})" for v in exported[:4]) or "nothing"
            raise BlockLayoutError(
                f"block {b} hands on {len(exported)} values ({what}); a residual block hands on exactly one. "
                "Decode-step graphs whose blocks also write KV caches are not supported by block-level passes")
        out = exported[0]
        incoming: list[Value] = []
        seen: set[int] = set()
        for n in nodes:
            for v in n.inputs:
                if (v.producer is None or id(v.producer) not in ids) and id(v) not in seen:
                    seen.add(id(v))
                    incoming.append(v)
        same_type = [v for v in incoming if v.type == out.type]
        if prev_out is not None:
            if not any(v is prev_out for v in incoming):
                raise BlockLayoutError(
                    f"block {b} does not read %{prev_out.name}, the residual output of block {infos[-1].index}; "
                    "the blocks do not form a chain")
            res_in = prev_out
        else:
            own = [v for v in same_type if readers.get(id(v)) == {b}]
            if len(own) != 1:
                names = ", ".join(f"%{v.name}" for v in (own or same_type)[:4]) or "none"
                raise BlockLayoutError(
                    f"block {b}: cannot tell its residual input ({len(own)} candidate(s) of type {out.type} read "
                    f"by this block only: {names})")
            res_in = own[0]
        if res_in.type != out.type:
            raise BlockLayoutError(f"block {b} reads %{res_in.name} : {res_in.type} but hands on %{out.name} : "
                                   f"{out.type}; a residual block keeps the stream's type")
        for v in incoming:
            if v is res_in:
                continue
            p = v.producer
            if p is not None and p.block is not None:
                raise BlockLayoutError(f"block {b} reads %{v.name} from inside block {p.block} besides its "
                                       f"residual input; block-level passes need blocks that only share values "
                                       "computed outside the stack")
        infos.append(BlockInfo(b, nodes, items[0][0], items[-1][0], res_in, out,
                               [v for v in incoming if v is not res_in]))
        prev_out = out
    return BlockLayout(infos)
