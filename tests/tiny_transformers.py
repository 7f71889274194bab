"""Tiny random transformer modules built directly in ctc IR, for quantization pass tests.

``bert``: post-LN encoder blocks (the LN output is also the residual stream, so it has a
non-linear reader); ``llama``: pre-RMSNorm decoder blocks with grouped kv heads and a SwiGLU
MLP.  Activations get a few outlier channels (scaled embedding columns) so per-channel
ranges differ, as in real LLMs.  Shapes are static: inputs ``x f32[B, S, D]``.
"""

from __future__ import annotations

import torch

from ctc.ir import Module, TensorType, Value


def tiny_transformer(kind: str = "llama", *, d: int = 32, heads: int = 4, kv_heads: int = 2, ff: int = 48,
                     layers: int = 2, batch: int = 2, seq: int = 6, seed: int = 0) -> Module:
    """A random ``kind`` ("bert" or "llama") transformer stack on an input ``x [batch, seq, d]``."""
    if kind not in ("bert", "llama"):
        raise ValueError(f"kind must be bert or llama, got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    m = Module(f"tiny_{kind}")
    dh = d // heads
    kvh = heads if kind == "bert" else kv_heads

    def p(name: str, *shape: int, scale: float = 1.0, base: float = 0.0) -> Value:
        t = torch.randn(*shape, generator=g) * scale + base
        m.add_param(name, t)
        blk = int(name.split(".")[1]) if name.startswith("layers.") else None
        return m.param(name, scope=name.rsplit(".", 1)[0], block=blk)

    def lin(x: Value, name: str, n_out: int, block: int | None, bias: bool) -> Value:
        k = x.type.shape[-1]
        ins = [x, p(f"{name}.weight", n_out, k, scale=k ** -0.5)]
        if bias:
            ins.append(p(f"{name}.bias", n_out, scale=0.1))
        return m.create_node("linear", ins, scope=name, block=block).output

    def node(op: str, ins: list[Value], attrs: dict | None = None, scope: str = "", block: int | None = None) -> Value:
        return m.create_node(op, ins, attrs or {}, scope=scope, block=block).output

    x = m.add_input("x", TensorType((batch, seq, d), "f32"))
    h = x
    if kind == "bert":
        h = node("layer_norm", [h, p("emb.ln.weight", d, scale=0.2, base=1.0), p("emb.ln.bias", d, scale=0.1)],
                 {"eps": 1e-12}, scope="emb.ln")
    for i in range(layers):
        s = f"layers.{i}"

        def split(v: Value, nh: int, sc: str, i: int = i) -> Value:
            r = node("reshape", [v], {"shape": (batch, seq, nh, dh)}, sc, i)
            return node("transpose", [r], {"dim0": 1, "dim1": 2}, sc, i)

        if kind == "bert":
            a_in = h
        else:
            a_in = node("rms_norm", [h, p(f"{s}.ln1.weight", d, scale=0.3, base=1.0)], {"eps": 1e-6}, f"{s}.ln1", i)
        bias = kind == "bert"
        q = split(lin(a_in, f"{s}.attn.q", heads * dh, i, bias), heads, f"{s}.attn")
        k = split(lin(a_in, f"{s}.attn.k", kvh * dh, i, bias), kvh, f"{s}.attn")
        v = split(lin(a_in, f"{s}.attn.v", kvh * dh, i, bias), kvh, f"{s}.attn")
        att = node("scaled_dot_product_attention", [q, k, v],
                   {"is_causal": kind == "llama", "enable_gqa": kvh != heads}, f"{s}.attn", i)
        t = node("transpose", [att], {"dim0": 1, "dim1": 2}, f"{s}.attn", i)
        merged = node("reshape", [t], {"shape": (batch, seq, heads * dh)}, f"{s}.attn", i)
        o = lin(merged, f"{s}.attn.o", d, i, bias)
        h = node("add", [h, o], scope=f"{s}.attn", block=i)
        if kind == "bert":
            h = node("layer_norm", [h, p(f"{s}.ln1.weight", d, scale=0.2, base=1.0), p(f"{s}.ln1.bias", d, scale=0.1)],
                     {"eps": 1e-12}, f"{s}.ln1", i)
            f1 = node("gelu", [lin(h, f"{s}.mlp.fc1", ff, i, True)], {}, f"{s}.mlp", i)
            f2 = lin(f1, f"{s}.mlp.fc2", d, i, True)
            h = node("add", [h, f2], scope=f"{s}.mlp", block=i)
            h = node("layer_norm", [h, p(f"{s}.ln2.weight", d, scale=0.2, base=1.0), p(f"{s}.ln2.bias", d, scale=0.1)],
                     {"eps": 1e-12}, f"{s}.ln2", i)
        else:
            n2 = node("rms_norm", [h, p(f"{s}.ln2.weight", d, scale=0.3, base=1.0)], {"eps": 1e-6}, f"{s}.ln2", i)
            gate = node("silu", [lin(n2, f"{s}.mlp.gate", ff, i, False)], {}, f"{s}.mlp", i)
            up = lin(n2, f"{s}.mlp.up", ff, i, False)
            f2 = lin(node("mul", [gate, up], {}, f"{s}.mlp", i), f"{s}.mlp.down", d, i, False)
            h = node("add", [h, f2], scope=f"{s}.mlp", block=i)
    if kind == "llama":
        h = node("rms_norm", [h, p("final.ln.weight", d, scale=0.1, base=1.0)], {"eps": 1e-6}, "final.ln")
        h = lin(h, "lm_head", 40, None, False)
    m.set_outputs([h], ["y"])
    return m


def outlier_inputs(module: Module, n: int, seed: int = 1, outliers: int = 3, gain: float = 12.0
                   ) -> list[dict[str, torch.Tensor]]:
    """``n`` input batches whose first ``outliers`` channels are ``gain`` times larger."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(module.inputs[0].type.shape)
    out = []
    for _ in range(n):
        x = torch.randn(*shape, generator=g)
        x[..., :outliers] *= gain
        out.append({"x": x})
    return out
