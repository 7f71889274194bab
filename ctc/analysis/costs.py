"""Per-op arithmetic and memory traffic of a ctc module at concrete shapes (the roofline's inputs).

The model (as LLM-Viewer's): every op runs as its own kernel, reading its operands from memory and
writing its result, with no fusion and no cache reuse across ops; views (``reshape``, ``squeeze``,
``unsqueeze``, ``expand``) move nothing.  Ops that read only part of an operand count what they read:
an ``embedding`` reads the rows it gathers, ``slice``/``gather``/``index*`` read what they return,
``cache_write`` writes the new positions in place.  Weights count at their stored size (an int4
``quant_linear`` weight is half a byte a value), once per op that reads them.

Operations (``flops``: multiply and add count one each):

* ``linear`` / ``quant_linear``: ``2·M·N·K`` (+ ``M·N`` for a bias), ``M`` rows of ``K`` inputs, ``N`` outputs;
  ``lowrank_linear``: ``2·M·r·(K + N)`` (+ bias); ``matmul``: ``2·K`` per output element;
  ``conv``: ``2·(C_in/groups)·prod(kernel)`` per output element (+ bias);
* attention (``scaled_dot_product_attention``, ``calibrated_attention``, ``sparse_attention``,
  ``quant_kv_attention``) with ``q [B, H, Sq, D]``, keys ``Sk``, values of width ``Dv``:
  ``2·B·H·Sq·Sk·D`` (scores) + ``ATTN_SCORE_FLOPS·B·H·Sq·Sk`` (scale, mask, softmax) + ``2·B·H·Sq·Sk·Dv``
  (weighted sum); every score is counted (a causal mask is applied, not skipped; sparse attention at its
  dense cost);
* normalisation per element: ``layer_norm`` 7, ``rms_norm`` 4, ``group_norm``/``batch_norm`` 7 / 2,
  ``softmax``/``log_softmax`` 5, ``rotary_embedding`` 3; reductions one per input element;
  element-wise ops one per output element (transcendentals included); data movement none.

Decode of a full-sequence causal LM (what one generated token costs with a KV cache of ``context``
positions) is the same graph at sequence length 1, with each attention op reading ``context`` cached
keys and values instead of its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ctc.ir.graph import Module, Node, Value
from ctc.ir.symbolic import eval_dim
from ctc.ir.types import DTYPES

__all__ = ["ATTN_SCORE_FLOPS", "OpCost", "CostError", "module_costs", "op_class"]

ATTN_SCORE_FLOPS = 6
"""Per attention score: scale 1, mask 1, softmax 4 (max, subtract-and-exp, sum, divide)."""

PER_ELEMENT = {"layer_norm": 7, "rms_norm": 4, "group_norm": 7, "batch_norm": 2, "softmax": 5, "log_softmax": 5,
               "rotary_embedding": 3}
VIEWS = frozenset({"reshape", "squeeze", "unsqueeze", "expand"})
CONSTANTS = frozenset({"param", "full", "arange"})
READS_WHAT_IT_RETURNS = {"embedding": "weight", "slice": "x", "gather": "x", "index": "x", "index_select": "x"}
"""Ops that read only the part of one operand (named here) that they return."""
IN_PLACE_WRITES = frozenset({"cache_write", "quant_cache_write"})
ATTENTION = frozenset({"scaled_dot_product_attention", "calibrated_attention", "sparse_attention",
                       "quant_kv_attention"})
REDUCTIONS = frozenset({"sum", "mean", "amax", "amin", "prod", "all", "any", "argmax", "argmin", "cumsum", "cumprod"})
_BYTES = {name: DTYPES[name].itemsize for name in DTYPES}


class CostError(ValueError):
    """Shapes of a module cannot be made concrete (a symbol has no value), or an op cannot be counted."""


@dataclass
class OpCost:
    """One op's arithmetic and memory traffic at concrete shapes."""

    node: str  # "op@scope" for reading
    op: str
    scope: str
    block: int | None
    op_class: str  # gemm | attention | norm | elementwise | data
    compute: str  # dtype class of the arithmetic: f32 | f16 | int8
    flops: float
    bytes_read: float
    bytes_written: float
    weight_bytes: float = 0.0  # part of bytes_read that is parameters
    notes: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved (inf for an op that moves nothing)."""
        return self.flops / self.bytes if self.bytes else math.inf


def op_class(op: str) -> str:
    """The roofline group of an op kind (measured kernel times are matched to groups, see ctc.analysis.measured)."""
    if op in ("linear", "quant_linear", "lowrank_linear", "matmul", "conv"):
        return "gemm"
    if op in ATTENTION:
        return "attention"
    if op in PER_ELEMENT or op in REDUCTIONS:
        return "norm" if op != "rotary_embedding" else "elementwise"
    from ctc.ir.ops import get_op

    return "elementwise" if get_op(op).category == "elementwise" else "data"


class _Shapes:
    """Concrete shapes of values under a symbol binding (one place for the 'which symbol is missing' error)."""

    def __init__(self, env: Mapping[str, int]) -> None:
        self.env = dict(env)

    def shape(self, v: Value) -> tuple[int, ...]:
        try:
            return tuple(int(eval_dim(d, self.env)) for d in v.type.shape)
        except Exception as e:  # noqa: BLE001 - symbolic evaluation raises several kinds
            missing = sorted(v.type.symbols - set(self.env))
            why = f"no value for {', '.join(missing)}" if missing else str(e)
            raise CostError(f"value %{v.name} {v.type}: shape cannot be made concrete ({why})") from None

    def numel(self, v: Value) -> int:
        return math.prod(self.shape(v))

    def nbytes(self, v: Value) -> float:
        return float(self.numel(v) * _BYTES[v.type.dtype])


def _is_param(v: Value) -> bool:
    return v.producer is not None and v.producer.op == "param"


def _compute_dtype(node: Node) -> str:
    if node.op == "quant_linear" and node.attrs.get("a_bits") not in (None, 16):
        return "int8"
    if node.op == "quant_kv_attention":
        return "f32"
    dt = node.outputs[0].type.dtype if node.outputs else "f32"
    return "f16" if dt in ("f16", "bf16") else "f32"


def _attention_flops(node: Node, s: _Shapes, context: int | None) -> tuple[float, int]:
    q = s.shape(node.operand("q"))  # type: ignore[arg-type]
    kname = "k_cache" if node.op == "quant_kv_attention" else "k"
    vname = "v_cache" if node.op == "quant_kv_attention" else "v"
    k, v = s.shape(node.operand(kname)), s.shape(node.operand(vname))  # type: ignore[arg-type]
    sk = context if context is not None else k[-2]
    rows = math.prod(q[:-1])  # B * H * Sq
    dv = q[-1] if node.op == "quant_kv_attention" else v[-1]  # an int4 cache packs two values a byte
    return float(rows * sk * (2 * q[-1] + ATTN_SCORE_FLOPS + 2 * dv)), sk


def _gemm_flops(node: Node, s: _Shapes) -> float:
    out = s.shape(node.outputs[0])
    m_n = math.prod(out)
    if node.op in ("linear", "quant_linear"):
        k = s.shape(node.operand("x"))[-1]  # type: ignore[arg-type]
        bias = node.has_operand("bias")
        return float(2 * m_n * k + (m_n if bias else 0))
    if node.op == "lowrank_linear":
        x = s.shape(node.operand("x"))  # type: ignore[arg-type]
        r = int(node.attrs["rank"])
        m = math.prod(x[:-1])
        return float(2 * m * r * (x[-1] + out[-1]) + (m_n if node.has_operand("bias") else 0))
    if node.op == "matmul":
        return float(2 * m_n * s.shape(node.operand("a"))[-1])  # type: ignore[arg-type]
    w = s.shape(node.operand("weight"))  # type: ignore[arg-type]  # conv: [C_out, C_in/groups, *kernel]
    return float(2 * m_n * math.prod(w[1:]) + (m_n if node.has_operand("bias") else 0))


def node_cost(node: Node, s: _Shapes, *, context: int | None = None) -> OpCost | None:
    """The cost of one node (None for constants and parameters, which are read by the ops that use them)."""
    if node.op in CONSTANTS:
        return None
    cls = op_class(node.op)
    out_bytes = sum(s.nbytes(v) for v in node.outputs)
    ins = list(node.inputs)
    weight = sum(s.nbytes(v) for v in ins if _is_param(v))
    read = sum(s.nbytes(v) for v in ins)
    notes: list[str] = []
    flops = 0.0
    if node.op in VIEWS:
        read = out_bytes = weight = 0.0
    elif node.op in READS_WHAT_IT_RETURNS:
        src = node.operand(READS_WHAT_IT_RETURNS[node.op])
        read = out_bytes + sum(s.nbytes(v) for v in ins if v is not src)  # indices / ids are read whole
        weight = out_bytes if src is not None and _is_param(src) else 0.0
    elif node.op in IN_PLACE_WRITES:
        upd = node.operand("update")
        assert upd is not None
        read = sum(s.nbytes(v) for v in ins if v is not ins[0])
        out_bytes = s.nbytes(upd)
        notes.append("writes the new positions in place")
    elif cls == "gemm":
        flops = _gemm_flops(node, s)
    elif cls == "attention":
        flops, sk = _attention_flops(node, s, context)
        if context is not None:
            kname = "k_cache" if node.op == "quant_kv_attention" else "k"
            vname = "v_cache" if node.op == "quant_kv_attention" else "v"
            kv = [node.operand(kname), node.operand(vname)]
            own = sum(s.nbytes(v) for v in kv if v is not None)
            cached = sum(s.nbytes(v) / max(1, s.shape(v)[-2]) * sk for v in kv if v is not None)
            mask = node.operand("mask")
            read += cached - own + (s.nbytes(mask) * (sk - 1) if mask is not None else 0.0)
            notes.append(f"decode: reads {sk} cached key/value positions")
        if node.op == "sparse_attention":
            notes.append("counted at its dense cost (the kept share is decided at run time)")
    elif node.op in PER_ELEMENT:
        flops = float(PER_ELEMENT[node.op] * s.numel(node.outputs[0]))
    elif node.op in REDUCTIONS:
        flops = float(s.numel(node.inputs[0]))
    elif cls == "elementwise":
        flops = float(sum(s.numel(v) for v in node.outputs))
    return OpCost(node=f"{node.op}@{node.scope or '-'}", op=node.op, scope=node.scope, block=node.block,
                  op_class=cls, compute=_compute_dtype(node), flops=flops, bytes_read=read, bytes_written=out_bytes,
                  weight_bytes=weight, notes=notes)


def module_costs(module: Module, env: Mapping[str, int], *, context: int | None = None) -> list[OpCost]:
    """Cost of every node of ``module`` with its symbols bound by ``env`` (``context``: attention reads that many
    cached positions instead of its own keys, the decode of a full-sequence graph run at length 1)."""
    s = _Shapes(env)
    out = []
    for node in module.nodes:
        try:
            c = node_cost(node, s, context=context)
        except CostError:
            raise  # a shape that cannot be made concrete names its value already
        except Exception as e:  # noqa: BLE001 - an op whose operands do not fit the formulas: name it
            raise CostError(f"{node.op} at {node.scope or 'top level'}: cannot count its cost ({e})") from None
        if c is not None:
            out.append(c)
    return out
