"""The one way passes change the IR: a Rewriter, rewrite patterns, and the drivers that apply them.

A :class:`Rewriter` wraps a module.  Through it a pass inserts nodes (:meth:`Rewriter.create`,
:meth:`Rewriter.new_param`), replaces a node's results (:meth:`Rewriter.replace`), redirects
one operand (:meth:`Rewriter.set_operand`), changes attributes, and erases nodes.  It keeps
the accounting (a :class:`RewriteLog`: ops created and erased, parameters added and
removed, patterns fired, notes) and cleans up after every rewrite, by one rule:

    **Cleanup erases exactly what the rewrite orphaned.**  A node is erased when it is
    pure, nothing reads its results (no node, no module output), and it lost its last
    reader through this rewriter: a replaced or erased node's operands, an operand
    redirected away, a node the rewriter created that ended unused, and, transitively, the
    operands of every node so erased.  A parameter is dropped when its last ``param``
    read was erased that way (or it was created by the rewriter and never read).  Dead code
    that was already dead, or that no rewrite touched, is never removed (that is ``dce``'s
    job), so a step restricted by a selector leaves the rest of the module as it was.

The selector of a pipeline step restricts where *patterns fire* (the roots a driver
visits); cleanup follows the rule above wherever the orphaned nodes are, since they only
existed to feed the rewritten ones.

Rewrite patterns (in the manner of xDSL's ``RewritePattern.match_and_rewrite``) are either
subclasses of :class:`RewritePattern` or, usually, a :class:`ctc.ir.patterns.Pattern` plus a
function, made with the :func:`rule` decorator (tinygrad's ``(UPat, fn)`` table entries)::

    @rule(op("mul", var("x"), unit(), commutative=True))
    def mul_one(rw, m):
        return m["x"] if same_type(m["x"], m.root.output) else None   # None: no rewrite

:func:`apply_patterns` applies a set of patterns greedily to a fixpoint with a worklist
(nodes whose neighbourhood changed are revisited), with a cap on sweeps and rewrites and
an error naming the patterns that kept firing when it does not converge; :func:`apply_once`
visits every node once (no revisits), for transforms that plan first and then apply.  A
global transform (a reordering, a block removal) plans on the unmodified module, applies
its plan through a Rewriter, and calls :meth:`Rewriter.finish`, which cleans up and runs
the verifier on the result.
"""

from __future__ import annotations

import contextlib
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ctc.ir.graph import IRError, Module, NamedOperands, Node, Value, param_tensor
from ctc.ir.ops import OpError, get_op
from ctc.ir.patterns import Match, Pattern
from ctc.ir.types import TensorType

__all__ = ["NotConverged", "RewriteError", "RewriteLog", "RewritePattern", "Rewriter", "Rule", "apply_once",
           "apply_patterns", "rule"]

_INHERIT: Any = object()


class RewriteError(IRError):
    """A rewrite that would break the IR (a type change, erasing a used node, no insertion point)."""


class NotConverged(RewriteError):
    """Greedy rewriting did not reach a fixpoint within its caps; names the patterns that kept firing."""


# --------------------------------------------------------------------------- accounting
@dataclass
class RewriteLog:
    """What a rewriter changed: ops created/erased, roots replaced, patterns fired, parameters, notes."""

    created: Counter[str] = field(default_factory=Counter)
    erased: Counter[str] = field(default_factory=Counter)
    replaced: Counter[str] = field(default_factory=Counter)
    fired: Counter[str] = field(default_factory=Counter)
    params_added: list[str] = field(default_factory=list)
    params_removed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.erased or self.params_added or self.params_removed or self.fired)

    def op_diff(self) -> dict[str, int]:
        """Net node count change per op."""
        keys = sorted(set(self.created) | set(self.erased))
        return {k: self.created[k] - self.erased[k] for k in keys if self.created[k] != self.erased[k]}

    def summary(self) -> str:
        """One line: replaced roots, patterns fired, nodes and parameters added/removed."""
        parts = []
        if self.fired:
            parts.append("fired " + ", ".join(f"{k} x{v}" for k, v in sorted(self.fired.items())))
        elif self.replaced:
            parts.append("replaced " + ", ".join(f"{k} x{v}" for k, v in sorted(self.replaced.items())))
        diff = self.op_diff()
        if diff:
            parts.append("ops " + " ".join(f"{k}{v:+d}" for k, v in diff.items()))
        if self.params_added or self.params_removed:
            parts.append(f"params +{len(self.params_added)} -{len(self.params_removed)}")
        return "; ".join(parts) or "no change"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready counts (parameter names are counted, not listed)."""
        return {"created": dict(sorted(self.created.items())), "erased": dict(sorted(self.erased.items())),
                "replaced": dict(sorted(self.replaced.items())), "patterns": dict(sorted(self.fired.items())),
                "params_added": len(self.params_added), "params_removed": len(self.params_removed)}

    def merge(self, other: RewriteLog) -> None:
        self.created.update(other.created)
        self.erased.update(other.erased)
        self.replaced.update(other.replaced)
        self.fired.update(other.fired)
        self.params_added += other.params_added
        self.params_removed += other.params_removed
        self.notes += other.notes


# --------------------------------------------------------------------------- the rewriter
class Rewriter:
    """Changes one module and accounts for it; see the module doc for the cleanup rule.

    ``selector(node) -> bool`` is the pipeline step's selection (drivers only fire patterns
    on selected roots; :meth:`selected` asks it).  ``prune_params``: drop parameters whose
    last reader the cleanup erased.  ``notes``: a list that :meth:`note` also appends to
    (the pass context's notes).
    """

    def __init__(self, module: Module, *, selector: Callable[[Node], bool] | None = None,
                 prune_params: bool = True, notes: list[str] | None = None):
        self.module = module
        self.selector = selector
        self.prune_params = prune_params
        self.log = RewriteLog()
        self._notes_sink = notes
        self.anchor: Node | None = None
        self.version = 0  # bumped by every change (drivers detect rules that rewrote by hand)
        self._orphans: dict[int, Node] = {}
        self._param_candidates: set[str] = set()
        # param nodes per parameter name, kept exact by every change made through the rewriter
        self._readers: Counter[str] = Counter(n.attrs["name"] for n in module.nodes if n.op == "param")
        self._listeners: list[Callable[[Node], None]] = []

    # ----------------------------------------------------------------- queries
    def selected(self, node: Node) -> bool:
        """Whether the step's selector admits ``node`` (True without a selector)."""
        return self.selector is None or self.selector(node)

    def param_tensor(self, v: Value) -> torch.Tensor | None:
        """The parameter tensor ``v`` reads, when ``v`` is a ``param`` node's result (of this module)."""
        if v.producer is None or v.producer.module is not self.module:
            return None
        return param_tensor(v)

    def readers_of_param(self, name: str) -> int:
        """How many ``param`` nodes read parameter ``name``."""
        return self._param_readers()[name]

    def unread_params(self) -> list[str]:
        """Parameters no ``param`` node reads (in ``module.params`` order)."""
        r = self._param_readers()
        return [k for k in self.module.params if r[k] == 0]

    def note(self, line: str) -> None:
        """A line for the pass report."""
        self.log.notes.append(line)
        if self._notes_sink is not None:
            self._notes_sink.append(line)

    @contextlib.contextmanager
    def at(self, node: Node) -> Iterator[Rewriter]:
        """Make ``node`` the anchor: new nodes go before it and take its scope and block."""
        prev, self.anchor = self.anchor, node
        try:
            yield self
        finally:
            self.anchor = prev

    # ----------------------------------------------------------------- inserting
    def create(self, op: str, operands: Sequence[Value] | NamedOperands, attrs: dict[str, Any] | None = None, *,
               before: Node | None = None, after: Node | None = None, scope: str | None = None,
               block: int | None = _INHERIT, names: Sequence[str] | None = None,
               types: Sequence[TensorType] | None = None) -> Node:
        """Insert a new node; operands named (``{"x": x, "weight": w}``) or positional.

        Position: ``before``/``after`` a node, else before the anchor (the matched root inside
        a pattern).  Scope and block come from that position node unless given.
        """
        ref = before or after
        if ref is None:
            if self.anchor is None or self.anchor.module is not self.module:
                raise RewriteError(f"Rewriter.create({op!r}): no insertion point; give before= or after= "
                                   "(inside a pattern, new nodes go before the matched root)")
            ref = before = self.anchor
        node = self.module.create_node(op, operands, attrs, before=before, after=after,
                                       scope=ref.scope if scope is None else scope,
                                       block=ref.block if block is _INHERIT else block, names=names, types=types)
        self.version += 1
        self.log.created[op] += 1
        self._orphans[id(node)] = node  # erased again at cleanup if it ends unused
        if op == "param":
            self._param_readers()[node.attrs["name"]] += 1
        self._touch(node)
        return node

    def add_param(self, base: str, tensor: torch.Tensor) -> str:
        """Register ``tensor`` under a fresh name derived from ``base``; returns the name."""
        name = self.module.add_param(self.module.fresh_param_name(base), tensor)
        self.log.params_added.append(name)
        self._param_candidates.add(name)  # dropped at cleanup if nothing ends up reading it
        self.version += 1
        return name

    def read_param(self, name: str, *, before: Node | None = None, after: Node | None = None,
                   scope: str | None = None, block: int | None = _INHERIT) -> Value:
        """A new ``param`` node reading parameter ``name`` (positioned like :meth:`create`)."""
        if name not in self.module.params:
            raise RewriteError(f"parameter {name!r} does not exist")
        t = self.module.params[name]
        return self.create("param", [], {"name": name}, before=before, after=after, scope=scope, block=block,
                           types=[TensorType.of(t)], names=[name]).output

    def new_param(self, base: str, tensor: torch.Tensor, *, before: Node | None = None, after: Node | None = None,
                  scope: str | None = None, block: int | None = _INHERIT) -> Value:
        """Register ``tensor`` as a new parameter (fresh name from ``base``) and read it."""
        return self.read_param(self.add_param(base, tensor), before=before, after=after, scope=scope, block=block)

    # ----------------------------------------------------------------- changing
    def replace(self, node: Node, new: Value | Sequence[Value]) -> None:
        """Make every reader of ``node``'s results read ``new`` instead, then erase ``node``.

        Each replacement must have exactly its result's type (symbolic dims compared as
        expressions); what the node read and nothing else reads goes at cleanup.
        """
        vals = [new] if isinstance(new, Value) else list(new)
        self._own(node, "replace")
        if len(vals) != len(node.outputs):
            raise RewriteError(f"replace {node._where()}: {len(vals)} value(s) for {len(node.outputs)} result(s)")
        for old, v in zip(node.outputs, vals, strict=True):
            self._check_replacement(old, v)
        for old, v in zip(node.outputs, vals, strict=True):
            self.module.replace_all_uses_with(old, v)
            for u in v.users:
                self._touch(u)
            if v.producer is not None:
                self._touch(v.producer)
        self.log.replaced[node.op] += 1
        self._erase(node)

    def replace_value(self, old: Value, new: Value) -> None:
        """Make every reader of ``old`` (nodes and module outputs) read ``new``."""
        self._check_replacement(old, new)
        self.module.replace_all_uses_with(old, new)
        self.version += 1
        for u in new.users:
            self._touch(u)
        if old.producer is not None:
            self._orphans[id(old.producer)] = old.producer

    def set_operand(self, node: Node, name: str, value: Value, index: int | None = None) -> None:
        """Make ``node`` read ``value`` as operand ``name`` (``index`` picks one of a variadic operand).

        The node's result types must stay what they were (else replace the node).
        """
        self._own(node, "set_operand")
        slot = node._slot(name)
        if isinstance(slot, slice):
            if index is None or not 0 <= index < slot.stop - slot.start:
                raise RewriteError(f"set_operand {node._where()}: operand {name!r} is variadic; give index= "
                                   f"(0..{slot.stop - slot.start - 1})")
            i = slot.start + index
        elif isinstance(slot, int):
            i = slot
        else:
            raise RewriteError(f"set_operand {node._where()}: operand {name!r} is not present (it is "
                               f"{'a scalar attribute' if slot is not None else 'absent'}); build a new node instead")
        old = node.inputs[i]
        if old is value:
            return
        node.set_input(i, value)
        try:
            self._check_types_kept(node)
        except RewriteError:
            node.set_input(i, old)
            raise
        self.version += 1
        if old.producer is not None:
            self._orphans[id(old.producer)] = old.producer
            self._touch(old.producer)
        self._touch(node)

    def set_attrs(self, node: Node, **changes: Any) -> None:
        """Change attributes of ``node`` (validated; result types must stay what they were)."""
        self._own(node, "set_attrs")
        opdef = node.opdef
        where = node._where()
        merged = opdef.check_attrs({**node.attrs, **changes}, where=where)
        try:
            opdef.slots(len(node.inputs), merged, where=where)
        except OpError as e:
            raise RewriteError(str(e)) from None
        old = node.attrs
        if node.op == "param":
            name = merged["name"]
            if name not in self.module.params or TensorType.of(self.module.params[name]) != node.output.type:
                raise RewriteError(f"set_attrs {where}: parameter {name!r} is missing or of another type than "
                                   f"{node.output.type}")
            readers = self._param_readers()
            readers[old["name"]] -= 1
            readers[name] += 1
            self._param_candidates.add(old["name"])
        node.attrs = merged
        try:
            if node.op != "param":
                self._check_types_kept(node)
        except RewriteError:
            node.attrs = old
            raise
        self.version += 1
        self._touch(node)

    def erase(self, node: Node) -> None:
        """Erase ``node``, whose results nothing may read any more (use :meth:`replace` otherwise)."""
        self._own(node, "erase")
        for v in node.outputs:
            if v.uses or self.module.is_output(v):
                readers = ", ".join(u._where() for u in v.users) or "a module output"
                raise RewriteError(f"erase {node._where()}: its result %{v.name} is still read by {readers}; "
                                   "replace it instead")
        self._erase(node)

    # ----------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        """Erase what the rewrites so far orphaned, then drop parameters left unread (module doc)."""
        module = self.module
        while self._orphans:
            _, n = self._orphans.popitem()
            if n.module is not module or not get_op(n.op).pure:
                continue
            if any(v.uses or module.is_output(v) for v in n.outputs):
                continue
            self._erase(n)
        if self._param_candidates:
            readers = self._param_readers()
            for name in sorted(self._param_candidates):
                if readers[name] == 0 and name in module.params and self.prune_params:
                    del module.params[name]
                    self.version += 1
                    if name in self.log.params_added:
                        self.log.params_added.remove(name)
                    else:
                        self.log.params_removed.append(name)
            self._param_candidates.clear()

    def erase_dead(self, where: Callable[[Node], bool] | None = None) -> int:
        """Erase every pure node whose results nothing reads (among those ``where`` admits), then
        what that orphans (the cleanup rule).  This is dead-code elimination; returns the count erased."""
        n0 = sum(self.log.erased.values())
        module = self.module
        for node in reversed(list(module.nodes)):  # readers come after what they read
            if node.module is not module or not get_op(node.op).pure or (where is not None and not where(node)):
                continue
            if any(v.uses or module.is_output(v) for v in node.outputs):
                continue
            self._erase(node)
        self.cleanup()
        return sum(self.log.erased.values()) - n0

    def prune_unread_params(self) -> list[str]:
        """Drop every parameter no ``param`` node reads (not only those a rewrite orphaned)."""
        dead = self.unread_params()
        for k in dead:
            self.remove_param(k)
        return dead

    def remove_param(self, name: str) -> None:
        """Drop parameter ``name``, which no ``param`` node may read."""
        if self._param_readers()[name]:
            raise RewriteError(f"remove_param: parameter {name!r} is still read by "
                               f"{self._param_readers()[name]} param node(s)")
        del self.module.params[name]
        self.log.params_removed.append(name)
        self.version += 1

    def finish(self, *, verify: bool = True) -> RewriteLog:
        """Clean up; with ``verify``, run the IR verifier on the module (a global transform proving
        itself).  Returns the log.  The pass manager finishes every rewriter a pass created."""
        self.cleanup()
        if verify:
            from ctc.ir.verify import verify as run_verify

            run_verify(self.module)
        return self.log

    # ----------------------------------------------------------------- internals
    def _own(self, node: Node, what: str) -> None:
        if node.module is not self.module:
            raise RewriteError(f"{what}: {node!r} is not in module {self.module.name} (erased already?)")

    def _check_replacement(self, old: Value, new: Value) -> None:
        from ctc.ir.verify import types_equal

        if old is new:
            raise RewriteError(f"replacing %{old.name} by itself")
        if new.producer is not None and new.producer is old.producer:
            raise RewriteError(f"replacing %{old.name} by another result of the same node")
        if not types_equal(old.type, new.type):
            raise RewriteError(f"replacing %{old.name} ({old.type}) by %{new.name} ({new.type}): the types differ; "
                               "a replacement must have exactly the replaced result's type")

    def _check_types_kept(self, node: Node) -> None:
        from ctc.ir.verify import types_equal

        try:
            now = node.opdef.infer_types([v.type for v in node.inputs], node.attrs)
        except OpError as e:
            raise RewriteError(f"{node._where()}: the change makes the node invalid: {e}") from None
        for v, t in zip(node.outputs, now, strict=True):
            if not types_equal(v.type, t):
                raise RewriteError(f"{node._where()}: the change would retype %{v.name} from {v.type} to {t}; "
                                   "build a new node and replace this one instead")

    def _erase(self, node: Node) -> None:
        for v in node.inputs:
            if v.producer is not None:
                self._orphans[id(v.producer)] = v.producer
        if node.op == "param":
            name = node.attrs["name"]
            self._param_readers()[name] -= 1
            self._param_candidates.add(name)
        self._orphans.pop(id(node), None)
        self.module.erase(node)
        self.version += 1
        self.log.erased[node.op] += 1
        for v in node.inputs:
            if v.producer is not None:
                self._touch(v.producer)

    def _param_readers(self) -> Counter[str]:
        return self._readers

    def _touch(self, node: Node) -> None:
        for f in self._listeners:
            f(node)


# --------------------------------------------------------------------------- patterns
class RewritePattern:
    """A local rewrite: ``match_and_rewrite(node, rw)`` returns True when it changed the module.

    ``name`` appears in reports and non-convergence errors; ``benefit`` orders patterns
    on the same root (higher first); :meth:`root_ops` lets drivers dispatch by op.
    """

    name: str = ""
    benefit: int = 1

    def root_ops(self) -> frozenset[str] | None:
        return None

    def match_and_rewrite(self, node: Node, rw: Rewriter) -> bool:
        raise NotImplementedError(f"{type(self).__name__}.match_and_rewrite")

    def label(self) -> str:
        return self.name or type(self).__name__


RuleFn = Callable[[Rewriter, Match], "Value | Sequence[Value] | bool | None"]


class Rule(RewritePattern):
    """A pattern and the function that rewrites its matches.

    ``fn(rw, m)`` returns the value(s) replacing the root's results, or None/False for no
    rewrite, or True after rewriting through ``rw`` itself.
    """

    def __init__(self, pattern: Pattern, fn: RuleFn, *, name: str = "", benefit: int = 1):
        self.pattern = pattern
        self.fn = fn
        self.name = name or fn.__name__.replace("_", "-")
        self.benefit = benefit

    def root_ops(self) -> frozenset[str] | None:
        return self.pattern.root_ops()

    def match_and_rewrite(self, node: Node, rw: Rewriter) -> bool:
        m = self.pattern.match(node)
        if m is None:
            return False
        v0 = rw.version
        out = self.fn(rw, m)
        if out is None or out is False:
            if rw.version != v0:
                raise RewriteError(f"rule {self.name!r} changed the module but returned {out!r}; return True "
                                   "(or the replacement values) when it rewrites")
            return False
        if out is True:
            return True
        rw.replace(node, out)
        return True

    def __repr__(self) -> str:
        return f"<Rule {self.name}: {self.pattern!r}>"


def rule(pattern: Pattern, *, name: str = "", benefit: int = 1) -> Callable[[RuleFn], Rule]:
    """Decorator: ``@rule(pattern)`` on ``fn(rw, m)`` makes a :class:`Rule` (named after ``fn``)."""

    def deco(fn: RuleFn) -> Rule:
        return Rule(pattern, fn, name=name, benefit=benefit)

    return deco


# --------------------------------------------------------------------------- drivers
def _dispatch(patterns: Sequence[RewritePattern]) -> tuple[dict[str, list[RewritePattern]], list[RewritePattern]]:
    ordered = sorted(patterns, key=lambda p: -p.benefit)
    by_op: dict[str, list[RewritePattern]] = {}
    generic: list[RewritePattern] = []
    for p in ordered:
        ops = p.root_ops()
        if ops is None:
            generic.append(p)
        else:
            for o in ops:
                by_op.setdefault(o, []).append(p)
    return by_op, generic


def _as_rewriter(target: Module | Rewriter) -> tuple[Rewriter, bool]:
    return (target, False) if isinstance(target, Rewriter) else (Rewriter(target), True)


def _try(node: Node, rw: Rewriter, by_op: dict[str, list[RewritePattern]], generic: list[RewritePattern]
         ) -> RewritePattern | None:
    for p in (*by_op.get(node.op, ()), *generic):
        with rw.at(node):
            fired = p.match_and_rewrite(node, rw)
        if fired:
            rw.log.fired[p.label()] += 1
            rw.cleanup()
            return p
    return None


def apply_patterns(target: Module | Rewriter, patterns: Sequence[RewritePattern], *, max_iterations: int = 10,
                   max_rewrites: int | None = None) -> RewriteLog:
    """Apply ``patterns`` greedily until none fires (a fixpoint); returns the rewriter's log.

    Every node (selected by the rewriter's selector) is visited in module order; after a
    rewrite, the nodes around it (readers of the new values, the new nodes, producers of
    operands that lost a reader, a modified node) are visited again.  A sweep that fires
    nothing ends it; ``max_iterations`` sweeps, or ``max_rewrites`` rewrites in one sweep
    (default ``10 * nodes + 100``), raise :class:`NotConverged` naming the patterns that kept
    firing.  Given a module (not a rewriter), the result is also verified.
    """
    rw, own = _as_rewriter(target)
    by_op, generic = _dispatch(patterns)
    module = rw.module
    names = ", ".join(p.label() for p in patterns)
    for sweep in range(max_iterations):
        work = _Worklist(lambda n: bool(generic) or n.op in by_op)
        for n in module.nodes:
            work.push(n)
        rw._listeners.append(work.push)
        fired: Counter[str] = Counter()
        cap = max_rewrites if max_rewrites is not None else 10 * len(module.nodes) + 100
        try:
            while (n := work.pop()) is not None:
                if n.module is not module or not rw.selected(n):
                    continue
                p = _try(n, rw, by_op, generic)
                if p is not None:
                    fired[p.label()] += 1
                    if sum(fired.values()) > cap:
                        raise NotConverged(
                            f"patterns did not converge: {cap} rewrites in one sweep (of {len(module.nodes)} nodes); "
                            f"still firing: {_top(fired)}. Two rules probably undo each other (patterns: {names})")
        finally:
            rw._listeners.remove(work.push)
        if not fired:
            if own:
                rw.finish()
            return rw.log
        if sweep == max_iterations - 1:
            raise NotConverged(f"patterns did not converge in {max_iterations} sweeps; the last sweep still fired "
                               f"{_top(fired)} (patterns: {names})")
    raise AssertionError("unreachable")


class _Worklist:
    """FIFO of nodes to visit, each queued at most once; ``wanted`` filters nodes no pattern roots at."""

    def __init__(self, wanted: Callable[[Node], bool]):
        self.wanted = wanted
        self.queue: deque[Node] = deque()
        self.queued: set[int] = set()

    def push(self, n: Node) -> None:
        if id(n) not in self.queued and self.wanted(n):
            self.queued.add(id(n))
            self.queue.append(n)

    def pop(self) -> Node | None:
        if not self.queue:
            return None
        n = self.queue.popleft()
        self.queued.discard(id(n))
        return n


def apply_once(target: Module | Rewriter, patterns: Sequence[RewritePattern], *, reverse: bool = False
               ) -> RewriteLog:
    """Try ``patterns`` on every selected node once, in module order (or reversed); no revisits.

    For transforms whose rewrites must not feed each other.  Given a module, the result
    is verified.
    """
    rw, own = _as_rewriter(target)
    by_op, generic = _dispatch(patterns)
    nodes = list(rw.module.nodes)
    for n in reversed(nodes) if reverse else nodes:
        if n.module is rw.module and rw.selected(n):
            _try(n, rw, by_op, generic)
    if own:
        rw.finish()
    return rw.log


def _top(c: Counter[str]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in c.most_common(5))
