"""Quantized tensors of a GGUF file (llama.cpp's format) as ``quant_linear`` weights, without a float round trip.

Why: models are shipped quantized (the bundled SmolLM2 is a Q4_1 GGUF).  Loading them through
Hugging Face de-quantizes every weight to fp32; re-quantizing those floats is a second, lossy
step.  Here the integer codes and block scales of ``Q4_0``, ``Q4_1`` and ``Q8_0`` tensors are
re-laid into ctc's storage convention (:mod:`ctc.ir.quant`) directly:

* **Q8_0** (blocks of 32: f16 ``d``, 32 int8): ``w = d q`` -- 8-bit symmetric weights, groups of 32;
* **Q4_0** (f16 ``d``, 16 bytes): ``w = d (u - 8)`` with nibbles ``u`` -- 4-bit symmetric, groups of 32;
* **Q4_1** (f16 ``d``, f16 ``m``, 16 bytes): ``w = d u + m`` -- 4-bit with a float zero point
  ``z = -8 - m / d`` per group (``w = (q - z) d`` for the signed code ``q = u - 8``), which a
  weight-only ``quant_linear`` accepts as an f32 ``w_zero``.

GGML packs the 32 values of a 4-bit block as byte ``j`` = value ``j`` (low nibble) | value
``j + 16`` (high); ctc stores value ``2j`` low and ``2j + 1`` high, so the nibbles are moved,
never re-rounded.  llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` for its
rotary layout; :func:`read_llama_linears` undoes that permutation (rows only: the quantization
blocks run along the input channels, so permuting rows keeps every block intact).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctc.ir import quant as Q

__all__ = ["GGUF_QUANT_TYPES", "GgufError", "GgufLinear", "read_llama_linears", "read_tensor"]

GGUF_QUANT_TYPES = ("Q4_0", "Q4_1", "Q8_0")
BLOCK = 32


class GgufError(Exception):
    """A GGUF file or tensor ctc cannot read (names the file, the tensor and why)."""


@dataclass(frozen=True)
class GgufLinear:
    """One quantized weight ``[N, K]`` in ``quant_linear`` storage form, and where it came from."""

    name: str  # GGUF tensor name
    kind: str  # Q4_0 / Q4_1 / Q8_0
    weight: Q.QuantizedWeight


def _blocks(data: np.ndarray, n: int, k: int, nbytes: int, name: str) -> np.ndarray:
    """The raw tensor data as ``[N, K/32, nbytes]`` blocks."""
    if k % BLOCK:
        raise GgufError(f"{name}: {k} input channels are not whole blocks of {BLOCK}")
    b = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    want = n * (k // BLOCK) * nbytes
    if b.size != want:
        raise GgufError(f"{name}: {b.size} bytes of data, expected {want} for [{n}, {k}]")
    return b.reshape(n, k // BLOCK, nbytes)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]


def _ggml_nibbles_to_signed(qs: np.ndarray) -> np.ndarray:
    """``[N, B, 16]`` GGML 4-bit bytes -> ``[N, B * 32]`` unsigned codes in element order."""
    lo, hi = qs & 0x0F, qs >> 4
    return np.concatenate([lo, hi], axis=-1).reshape(qs.shape[0], -1)


def read_tensor(kind: str, data: np.ndarray, n: int, k: int, name: str = "tensor") -> Q.QuantizedWeight:
    """A ``[N, K]`` GGUF tensor of ``kind`` (raw block bytes) as a :class:`ctc.ir.quant.QuantizedWeight`."""
    if kind == "Q8_0":
        blk = _blocks(data, n, k, 34, name)
        d = _f16(blk[..., 0:2])
        q = blk[..., 2:].copy().view(np.int8).reshape(n, k)
        return Q.QuantizedWeight(torch.from_numpy(q.copy()), torch.from_numpy(d), torch.zeros(n, k // BLOCK,
                                 dtype=torch.int8), 8, BLOCK, True, k)
    if kind in ("Q4_0", "Q4_1"):
        head = 2 if kind == "Q4_0" else 4
        blk = _blocks(data, n, k, head + 16, name)
        d = _f16(blk[..., 0:2])
        u = _ggml_nibbles_to_signed(blk[..., head:])  # unsigned codes 0..15, [N, K]
        if kind == "Q4_0":
            zero = torch.zeros(n, k // BLOCK, dtype=torch.int8)
            sym = True
        else:
            m = _f16(blk[..., 2:4])
            dead = d == 0  # a constant block: all codes 0, the minimum carried by the zero point
            d = np.where(dead, np.float32(1.0), d)
            u = np.where(np.repeat(dead, BLOCK, axis=1), 0, u)
            zero = torch.from_numpy((-8.0 - m / d).astype(np.float32))
            sym = False
        packed = Q.pack_int4(torch.from_numpy(u.astype(np.int8) - 8))
        return Q.QuantizedWeight(packed, torch.from_numpy(d.astype(np.float32)), zero, 4, BLOCK, sym, k)
    raise GgufError(f"{name}: GGUF type {kind} is not read into quant_linear (readable: {', '.join(GGUF_QUANT_TYPES)})")


_LLAMA_LINEARS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _unpermute_rows(w: Q.QuantizedWeight, heads: int) -> Q.QuantizedWeight:
    """Undo llama.cpp's q/k row permutation (``reshape(heads, 2, hd/2, K).swapaxes(1, 2)``) on every
    row-indexed array of ``w``."""
    n = w.qweight.shape[0]
    hd = n // heads

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(heads, hd // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()

    return Q.QuantizedWeight(rows(w.qweight), rows(w.scale), rows(w.zero), w.bits, w.group_size, w.symmetric, w.k)


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.parts[f.data[0]].tolist()[0] if f.data else None


def read_llama_linears(path: str | Path) -> dict[str, GgufLinear]:
    """Every Q4_0/Q4_1/Q8_0 linear weight of a llama-architecture GGUF, keyed by its Hugging Face parameter
    name (``model.layers.3.mlp.up_proj.weight``; ``token_embd`` as ``lm_head.weight``, the tied head);
    other tensor types are left out (the caller keeps those layers' float weights)."""
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency of the bundled model's loader
        raise GgufError("reading GGUF needs the `gguf` package (pip install gguf)") from e
    p = Path(path)
    if not p.is_file():
        raise GgufError(f"GGUF file {p} does not exist")
    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as e:  # noqa: BLE001 - a broken file
        raise GgufError(f"{p} is not a readable GGUF file: {type(e).__name__}: {e}") from None
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode() if "general.architecture" in reader.fields \
        else "?"
    if arch != "llama":
        raise GgufError(f"{p}: architecture {arch!r}; read_llama_linears reads llama-architecture files")
    heads = int(_field(reader, "llama.attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv") or heads)
    out: dict[str, GgufLinear] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in GGUF_QUANT_TYPES:
            continue
        k, n = (int(x) for x in t.shape[:2])  # GGUF lists dims innermost first
        parts = t.name.split(".")
        if t.name == "token_embd.weight" or t.name == "output.weight":
            hf = "lm_head.weight"
            if t.name == "token_embd.weight" and any(x.name == "output.weight" for x in reader.tensors):
                continue  # an untied head has its own tensor
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in _LLAMA_LINEARS:
            hf = f"model.layers.{parts[1]}.{_LLAMA_LINEARS[parts[2]]}.weight"
        else:
            continue
        w = read_tensor(kind, t.data, n, k, t.name)
        if parts[-2] == "attn_q":
            w = _unpermute_rows(w, heads)
        elif parts[-2] == "attn_k":
            w = _unpermute_rows(w, kv_heads)
        out[hf] = GgufLinear(t.name, kind, w)
    return out
