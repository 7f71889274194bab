"""All ctc ops.  Importing this package registers every op declaration."""

# Op declaration modules: importing them registers their ops.
from ctc.ir.ops import (
    attention,  # noqa: F401,E402
    compress,  # noqa: F401,E402
    compress_attention,  # noqa: F401,E402
    core,  # noqa: F401,E402
    elementwise,  # noqa: F401,E402
    kv_cache,  # noqa: F401,E402
    math,  # noqa: F401,E402
    nn,  # noqa: F401,E402
    reductions,  # noqa: F401,E402
    scatter,  # noqa: F401,E402
    shape,  # noqa: F401,E402
    ssm,  # noqa: F401,E402
    vision,  # noqa: F401,E402
)
from ctc.ir.ops.registry import (  # noqa: E402
    REQUIRED,
    Attr,
    OpDef,
    OpError,
    Scalar,
    all_ops,
    get_op,
    register_op,
)

__all__ = ["REQUIRED", "Attr", "OpDef", "OpError", "Scalar", "all_ops", "get_op", "register_op"]
