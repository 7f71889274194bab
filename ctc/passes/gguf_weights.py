"""``gguf-weights``: the linears of a model loaded from a GGUF file read its quantized tensors as ``quant_linear``.

What it does: for every selected ``linear`` whose weight is a Hugging Face parameter that the
GGUF file holds as ``Q4_0``, ``Q4_1`` or ``Q8_0`` (``ctc.frontends.gguf``), the linear becomes a
weight-only ``quant_linear`` carrying the file's own integer codes and block scales (groups of
32; Q4_1's float minima as f32 zero points).  No float weight is re-quantized: the result
computes exactly what llama.cpp's de-quantized weights compute, with the weights stored and
streamed as 4 (or 8) bits by the CPU kernels (``ctc.backends.tvm.weight_only``).  The tied LM
head reads ``token_embd`` (``lm_head=true``, the default); the embedding lookup stays float.
With ``a_bits=8`` the activations are quantized too, per row and block of 32 input channels at
run time (llama.cpp's Q8_1 idea, asymmetric u8 here): the CPU backend then runs the file's codes
through the integer VNNI kernels (``ctc.backends.tvm.int_kernels``, float block minima in the
epilogue) instead of expanding them to fp32; this rounding changes the result (a little).

Why a pass: the captured graph (with its blocks, scopes and decode-step wrapper) comes from the
Hugging Face model; only the weights come from the GGUF.  Which file: ``file=`` (relative to the
working directory), or, for a bundled GGUF model (``model bundled "smollm2"``), the file it was
loaded from.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctc.frontends.gguf import GgufError, read_llama_linears
from ctc.ir import quant as Q
from ctc.ir.graph import Module, Node
from ctc.passes.base import Pass, PassContext, PassError, PassOptions, Selector, option, register_pass
from ctc.passes.quantize import param_tensor

__all__ = ["GgufWeightsPass"]

_NO_FILE = ("gguf-weights: give file=\"model.gguf\" (this model was not loaded from a GGUF file: `model bundled "
            "\"smollm2\"` or `model hf DIR gguf=FILE` is)")


def _hf_name(module: Module, lin: Node, names: set[str]) -> str | None:
    """The GGUF-side (Hugging Face) name of ``lin``'s weight: its parameter name with any wrapper prefix
    removed, or ``lm_head.weight`` for the linear producing the logits."""
    if lin.block is None and any(module.is_output(v) for v in lin.outputs):
        return "lm_head.weight" if "lm_head.weight" in names else None
    p = lin.operand("weight").producer
    if p is None or p.op != "param":
        return None
    pname = str(p.attrs["name"])
    return next((n for n in names if pname == n or pname.endswith("." + n)), None)


@register_pass
class GgufWeightsPass(Pass):
    """Weights from a GGUF file's Q4_0/Q4_1/Q8_0 tensors, as quant_linear (no float round trip)."""

    name = "gguf-weights"

    @dataclass(frozen=True)
    class Options(PassOptions):
        """Options of ``gguf-weights``."""

        file: str = option("", "the GGUF file; empty = the file a bundled GGUF model was loaded from")
        lm_head: bool = option(True, "the LM head too (a tied head reads token_embd)")
        a_bits: int = option(16, "activations: 16 = float (weight-only, exact); 8 = each row quantized at run time "
                                 "per block of 32 input channels (llama.cpp's Q8_1 idea), so the integer kernels "
                                 "multiply the file's codes on VNNI; changes the result slightly", choices=(8, 16))

    @classmethod
    def check_module(cls, options: PassOptions, module: Module, selector: Selector) -> list[tuple[str | None, str]]:
        """No file to read: said at the recipe's step before any work (it was an exit-4 pass failure)."""
        if not options.file and not module.meta.get("gguf"):  # type: ignore[attr-defined]
            return [(None, _NO_FILE)]
        return []

    def run(self, module: Module, ctx: PassContext) -> Module:
        o = self.options
        path = o.file or module.meta.get("gguf", "")
        if not path:
            raise PassError(_NO_FILE)
        try:
            tensors = read_llama_linears(path)
        except GgufError as e:
            raise PassError(f"gguf-weights: {e}") from None
        names = set(tensors)
        rw = ctx.rewriter(module)
        kinds: dict[str, int] = {}
        done = 0
        for lin in [n for n in module.nodes if n.op == "linear" and ctx.selected(n)]:
            hf = _hf_name(module, lin, names)
            if hf is None or (hf == "lm_head.weight" and not o.lm_head):
                continue
            g = tensors[hf]
            w = param_tensor(lin.operand("weight"))
            if w is None or tuple(w.shape) != (g.weight.qweight.shape[0], g.weight.k):
                raise PassError(f"gguf-weights: {lin.scope}: weight {None if w is None else tuple(w.shape)} does not "
                                f"match GGUF tensor {g.name} ([{g.weight.qweight.shape[0]}, {g.weight.k}])")
            qw = g.weight
            base = lin.scope or hf
            ops = {"x": lin.operand("x"),
                   "qweight": rw.new_param(f"{base}.qweight", qw.qweight, before=lin),
                   "w_scale": rw.new_param(f"{base}.w_scale", qw.scale, before=lin),
                   "w_zero": rw.new_param(f"{base}.w_zero", qw.zero, before=lin),
                   "bias": lin.operand("bias")}
            act = ({"a_bits": 8, "act_dynamic": True, "act_clusters": Q.act_block_clusters(qw.k)}
                   if o.a_bits == 8 else {"a_bits": None})
            q = rw.create("quant_linear", ops, {"w_bits": qw.bits, "group_size": qw.group_size,
                                                "w_symmetric": qw.symmetric, **act,
                                                "has_bias": lin.operand("bias") is not None}, before=lin)
            rw.replace(lin, q.output)
            kinds[g.kind] = kinds.get(g.kind, 0) + 1
            done += 1
        if not done:
            raise PassError(f"gguf-weights: no selected linear matches a quantized tensor of {path}")
        rw.note(f"gguf-weights: {done} linears read {', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))} "
                f"tensors of {path}" + ("; activations 8-bit per token and block of 32" if o.a_bits == 8 else ""))
        ctx.metrics.update({"gguf_linears": done, "gguf_types": kinds})
        return module
