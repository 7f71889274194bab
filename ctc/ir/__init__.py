"""The ctc graph IR: types, values, nodes, modules, ops and the reference interpreter."""

from ctc.ir.graph import IRError, Module, Node, Value
from ctc.ir.interpreter import interpret
from ctc.ir.ops import Attr, OpError, all_ops, get_op, register_op
from ctc.ir.types import Dim, TensorType

__all__ = ["Attr", "Dim", "IRError", "Module", "Node", "OpError", "TensorType", "Value",
           "all_ops", "get_op", "interpret", "register_op"]
