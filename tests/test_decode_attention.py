"""The one-query decode attention kernel (``decode_attention.py``) against the reference interpreter at
tiny sizes: fp32, int8 and int4 caches (per-row and grouped scales), key counts that leave a tail after
the blocks of 16 keys scored side by side (and chunks shorter than one block), a valid prefix that ends
inside a block, GQA ratios 1 and 3."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from ctc.backends.tvm.build import BuildOptions, compile_module  # noqa: E402
from ctc.backends.tvm.decode_attention import key_lanes_supported  # noqa: E402
from ctc.backends.tvm.lower import lower  # noqa: E402
from ctc.backends.tvm.targets import resolve  # noqa: E402
from ctc.ir import Module, TensorType  # noqa: E402
from ctc.ir import quant as Q  # noqa: E402
from ctc.ir.interpreter import interpret  # noqa: E402

D = 32


def _module(cache: str, hq: int, hk: int, n: int, mask: str, group: int = -1) -> Module:
    m = Module(f"attend_{cache}")
    q = m.add_input("q", TensorType([1, hq, 1, D], "f32"))
    mk = (TensorType([1, 1, 1, n], "bool") if mask == "bool" else TensorType([1, hq, 1, n], "f32"))
    if cache in ("int8", "int4"):
        bits = 8 if cache == "int8" else 4
        ins = [q]
        for nm in ("k", "v"):
            store = TensorType([1, hk, n, Q.kv_storage_dim(D, bits)], "i8" if bits == 8 else "u8")
            ins += [m.add_input(f"{nm}c", store),
                    m.add_input(f"{nm}s", TensorType([1, hk, n, Q.kv_groups(D, group)], "f32"))]
        ins.append(m.add_input("mask", mk))
        y = m.create_node("quant_kv_attention", ins, {"bits": bits, "group_size": group}).output
    else:
        ins = [q, m.add_input("k", TensorType([1, hk, n, D], "f32")),
               m.add_input("v", TensorType([1, hk, n, D], "f32")), m.add_input("mask", mk)]
        y = m.create_node("scaled_dot_product_attention", ins, {"enable_gqa": hq != hk}).output
    m.set_outputs([y])
    return m


def _feed(cache: str, hq: int, hk: int, n: int, mask: str, valid: int, group: int = -1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(hq * 100 + n)
    q = torch.randn(1, hq, 1, D, generator=g)
    k, v = torch.randn(1, hk, n, D, generator=g), torch.randn(1, hk, n, D, generator=g) * 2
    if mask == "bool":  # a preallocated cache: the first `valid` positions hold tokens
        mk = (torch.arange(n) < valid).reshape(1, 1, 1, n)
    else:
        mk = torch.randn(1, hq, 1, n, generator=g)
    if cache in ("int8", "int4"):
        bits = 8 if cache == "int8" else 4
        k = k * torch.linspace(0.2, 3, D)  # channels of unlike ranges: grouped scales differ
        kc, ks = Q.quantize_kv(k, bits, group)
        vc, vs = Q.quantize_kv(v, bits, group)
        return [q, kc, ks, vc, vs, mk]
    return [q, k, v, mk]


@pytest.mark.parametrize(("cache", "hq", "hk", "n", "mask", "valid", "group"), [
    # GQA 3; 2 chunks of 51/50 keys: 3 blocks and a tail each; the valid prefix ends inside a block
    ("int8", 6, 2, 101, "bool", 37, -1),
    ("int8", 2, 2, 53, "add", 53, -1),  # GQA 1, one chunk of 3 blocks and 5 keys
    ("int8", 3, 1, 11, "bool", 9, -1),  # fewer keys than one block: the row-at-a-time path only
    ("int8", 6, 2, 101, "bool", 37, 16),  # one scale per 16 channels (2 groups)
    ("int4", 6, 2, 101, "bool", 37, 16),  # two codes per byte
    ("int4", 2, 2, 53, "add", 53, -1),
    ("float32", 6, 2, 101, "bool", 37, -1),
    ("float32", 2, 2, 53, "add", 53, -1),
])
def test_decode_attention_matches_interpreter(cache: str, hq: int, hk: int, n: int, mask: str, valid: int,
                                              group: int) -> None:
    import tvm
    from tvm import relax

    m = _module(cache, hq, hk, n, mask, group)
    feed = _feed(cache, hq, hk, n, mask, valid, group)
    tgt = resolve("cpu").target()
    low = lower(m, params="const", fast_math=True, static_dims={}, target=tgt, use_int_kernels=True)
    kernels = [gv.name_hint for gv in low.mod.functions if gv.name_hint.startswith(f"kv_attend_{cache}")]
    lanes = key_lanes_supported(tgt, cache, group)
    assert len(kernels) == 1 and kernels[0].endswith("_kl") == lanes, kernels
    comp = compile_module(m, options=BuildOptions())
    assert comp.meta["notes"] == []
    vm = relax.VirtualMachine(comp.executable, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x.numpy())) for x in feed])
    got = torch.from_numpy(out.numpy())
    torch.testing.assert_close(got, interpret(m, feed)[0], rtol=1e-4, atol=2e-5)


def test_key_lanes_only_for_int8_on_avx512() -> None:
    import tvm

    tgt = resolve("cpu").target()
    has = bool(tvm.target.codegen.target_has_features(["avx512f"], tgt))
    assert key_lanes_supported(tgt, "int8", -1) == has
    assert key_lanes_supported(tgt, "int8", 16) == has and key_lanes_supported(tgt, "int4", 32) == has
    assert not key_lanes_supported(tgt, "float32", -1)
    assert not key_lanes_supported(tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"}), "int8", -1)
