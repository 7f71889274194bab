"""Imports every pass module so each registers itself (one line per pass module)."""
import ctc.passes.asvd  # noqa: F401
import ctc.passes.calibrate_attention  # noqa: F401
import ctc.passes.canonicalize  # noqa: F401
import ctc.passes.constant_fold  # noqa: F401
import ctc.passes.cse  # noqa: F401
import ctc.passes.dce  # noqa: F401
import ctc.passes.fold_batch_norm  # noqa: F401
import ctc.passes.gguf_weights  # noqa: F401
import ctc.passes.kv_cache_quant  # noqa: F401
import ctc.passes.quantize  # noqa: F401
import ctc.passes.recursive  # noqa: F401
import ctc.passes.remove_blocks  # noqa: F401
import ctc.passes.rptq  # noqa: F401
import ctc.passes.share_blocks  # noqa: F401
import ctc.passes.sparse_attention  # noqa: F401
