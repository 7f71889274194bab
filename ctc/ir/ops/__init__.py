"""All ctc ops.  Importing this package registers every op declaration."""

from ctc.ir.ops.registry import REQUIRED, Attr, OpDef, OpError, all_ops, get_op, register_op

# Op declaration modules: importing them registers their ops.
from ctc.ir.ops import core  # noqa: F401,E402
from ctc.ir.ops import compress  # noqa: F401,E402

__all__ = ["REQUIRED", "Attr", "OpDef", "OpError", "all_ops", "get_op", "register_op"]
