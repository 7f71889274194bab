"""The persistent decode step in ctc's CUDA lowering (:mod:`ctc.backends.tvm.cuda_decode_stack`).

The matcher on tiny Llama steps (recognised structurally, refused for their dims; one changed structural fact
refused with that reason), the kernel source turned into device functions, the weight derivations, the SM-count
check of the runner, and (nvcc here) a CUDA library of a Llama-1B-shaped step of 1-2 layers: two kernels, the
persistent step and the logits' cast.  Running it needs an H200-class GPU (``gpu`` marker)."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ctc.backends.tvm import cuda_decode_stack as D
from ctc.frontends import capture
from ctc.frontends.decode import static_decode_inputs, static_decode_step

INT4 = {"w_bits": 4, "a_bits": 16, "w_granularity": "group", "group_size": 128, "sym": True, "blocks_only": False}
H200 = D.StepOptions(True, 132, "sm_90a")
TINY = dict(vocab_size=256, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=512, max_position_embeddings=64)
LLAMA_1B = dict(vocab_size=512, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                intermediate_size=8192, max_position_embeddings=256, rope_theta=500000.0, rms_norm_eps=1e-5)


def _step(cfg: dict, max_len: int = 32, quant: dict | None = INT4, patch: object = None):  # noqa: ANN202
    """A captured static decode step of a seeded fp16 Llama, int4-quantized with ctc's pass (``quant``)."""
    from ctc.passes.manager import PassManager
    from ctc.passes.quantize import QuantizeOptions, QuantizePass

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{"tie_word_embeddings": True, **cfg})).eval().to(torch.float16)
    ins = static_decode_inputs(model, max_len, position=5, seed=1, dtype=torch.float16)
    m = capture(static_decode_step(model), ins, dynamic=False)
    if quant is not None:
        m, _ = PassManager([QuantizePass(QuantizeOptions(**quant))], calibration=[ins], fidelity=False,
                           progress=False).run(m)
    return m, ins


@functools.lru_cache(maxsize=1)
def _tiny():  # noqa: ANN202
    return _step(TINY)


def _reason(m) -> str:  # noqa: ANN001
    with pytest.raises(D.NoMatch) as e:
        D.match(m)
    return str(e.value)


# ----------------------------------------------------------------------------------------------- matcher
def test_tiny_llama_is_recognised_but_refused_for_its_dims() -> None:
    m, _ = _tiny()
    g = D.match(m)  # structurally the kernel's step
    assert len(g.layers) == 2 and g.dims == {"hidden": 256, "heads": 4, "kv_heads": 2, "head_dim": 64, "ffn": 512,
                                             "group": 128, "vocab": 256, "layers": 2, "max_len": 32}
    assert g.inv_freq.endswith("inv_freq") and g.eps == pytest.approx(1e-6)
    assert len(g.members) == sum(1 for n in m.nodes if n.op != "param")  # the group is the whole step
    stack, note = D.plan_note(m, H200)
    assert stack is None
    assert note.startswith("persistent decode step: not used (recognised, but hidden 256, 4/2 heads of 64, FFN 512")
    assert "compiled for hidden 2048, 32/8 heads of 64, FFN 8192" in note


def test_untied_head_is_recognised() -> None:
    assert D.match(_step({**TINY, "num_hidden_layers": 1, "tie_word_embeddings": False})[0]).dims["layers"] == 1


@pytest.mark.parametrize(("change", "reason"), [
    ({"attention_bias": True}, "layer 0 q_proj has a bias"),
    ({"hidden_act": "gelu"}, "layer 0: MLP activation is gelu (the kernel computes SiLU(gate) * up)"),
    ({"mlp_bias": True}, "layer 0 gate_proj has a bias"),
])
def test_one_changed_fact_is_refused_with_its_reason(change: dict, reason: str) -> None:
    assert reason in _reason(_step({**TINY, "num_hidden_layers": 1, **change})[0])


def test_a_step_without_rope_is_refused() -> None:
    import transformers.models.llama.modeling_llama as hf

    def no_rope(q, k, cos, sin, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202, ARG001
        return q, k

    saved = hf.apply_rotary_pos_emb
    hf.apply_rotary_pos_emb = no_rope
    try:
        m, _ = _step({**TINY, "num_hidden_layers": 1})
    finally:
        hf.apply_rotary_pos_emb = saved
    assert "layer 0: no rotary embedding on q (the kernel applies RoPE to q and k)" in _reason(m)


def test_float_weights_and_a_float_head_are_refused() -> None:
    assert "layer 0 q_proj is a float linear" in _reason(_step({**TINY, "num_hidden_layers": 1}, quant=None)[0])
    m, _ = _step({**TINY, "num_hidden_layers": 1}, quant={**INT4, "blocks_only": True})
    assert "LM head is a float linear" in _reason(m)


def test_other_group_size_and_asymmetric_weights_are_refused() -> None:
    m, _ = _step({**TINY, "num_hidden_layers": 1}, quant={**INT4, "group_size": 64})
    assert "int4 group 64" in D.plan_note(m, H200)[1]
    m, _ = _step({**TINY, "num_hidden_layers": 1}, quant={**INT4, "sym": False})
    assert "q_proj has asymmetric weights" in _reason(m)


def test_disabled_and_non_decode_modules() -> None:
    m, _ = _tiny()
    assert D.plan_note(m, D.StepOptions(False, 132, "sm_90a")) == (
        None, "persistent decode step: not used (disabled: target cuda persistent=false)")
    from ctc.frontends.hf import capture_hf_model

    torch.manual_seed(0)
    prefill = capture_hf_model(LlamaForCausalLM(LlamaConfig(**TINY)).eval(), task="causal_lm", batch=1, seq_len=8,
                               dynamic=False)
    assert D.plan_note(prefill, H200) == (None, None)  # no cache writes: not a decode step, no note


@functools.lru_cache(maxsize=2)
def _llama_1b_step(layers: int):  # noqa: ANN202
    return _step({**LLAMA_1B, "num_hidden_layers": layers}, max_len=64)


def test_llama_1b_shape_is_used_where_the_target_fits() -> None:
    m, _ = _llama_1b_step(1)
    g, note = D.plan_note(m, H200)
    assert g is not None and g.sms == 132
    assert note == "persistent decode step: used (one launch of 132 blocks a step: 1 layers, vocab 512, 64 cache " \
                   "positions)"
    assert "arch sm_80: the kernel needs Hopper" in D.plan_note(m, D.StepOptions(True, 108, "sm_80"))[1]
    assert "sms=100: the kernel needs at least 128 co-resident blocks" in \
        D.plan_note(m, D.StepOptions(True, 100, "sm_90"))[1]


# ----------------------------------------------------------------------------------------------- kernel source
def test_kernel_source_becomes_device_functions() -> None:
    from ctc.backends.tvm import cuda_persistent as P

    c = D.kernel_constants()
    assert {k: c[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "ffn", "group")} == \
        {k: P.LLAMA_1B[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "ffn", "group")}
    assert c["ws_floats"] == P.WS_FLOATS and c["threads"] == 544 and 128 * 1024 < c["smem"] <= 227 * 1024
    src = D.device_source()
    assert "__device__ __forceinline__ void decode_step(const Args& a)" in src
    assert "__global__ void __launch_bounds__(NT, 1) decode_step" not in src
    assert "::ctc_pdec_ext::CacheRef kcache; ::ctc_pdec_ext::CacheRef vcache;" in src
    assert "cudaLaunchKernelExC" not in src  # the host launch code is cut off
    assert D.shared_bytes(16) == -(-c["smem"] // 16) * 16 + 256


def test_a_new_weight_layout_of_the_kernel_fails_loudly(monkeypatch) -> None:
    from ctc.backends.tvm import cuda_persistent as P

    monkeypatch.setattr(P, "__all__", [*P.__all__, "pack_gate_up"])
    with pytest.raises(RuntimeError, match=r"lays weights out with .*'pack_gate_up'.*update cuda_decode_stack"):
        D.check_packings()


def test_a_changed_kernel_source_fails_loudly(monkeypatch) -> None:
    src = D._source()
    broken = src.replace("decode_step(const __grid_constant__ Args a)", "decode_step(Args a, int extra)")
    monkeypatch.setattr(D, "_source", lambda: broken)
    with pytest.raises(RuntimeError, match="the kernel's entry decode_step .* matched 0 times, expected once"):
        D.device_source()
    monkeypatch.setattr(D, "_source", lambda: src.replace("half* kcache; half* vcache;", "half* kcache, *vcache;"))
    with pytest.raises(RuntimeError, match="the Args fields kcache, vcache"):
        D.device_source()


def test_stacked_weights_replay_as_the_kernel_reads_them() -> None:
    from ctc.backends.tvm import cuda_persistent as P
    from ctc.backends.tvm.lower import derive_param

    g = torch.Generator().manual_seed(0)
    params = {f"w{i}": torch.randint(0, 255, (2048, 1024), dtype=torch.uint8, generator=g) for i in range(2)}
    params |= {f"s{i}": torch.rand(2048, 16, generator=g) for i in range(2)}
    tag = D.layout_tag()
    wo = derive_param({"op": "stack_layers", "from": ["w0", "w1"], "args": {"parts": 1, "pack": "wo", "layout": tag}},
                      params)
    so = derive_param({"op": "stack_layers", "from": ["s0", "s1"], "args": {"parts": 1, "pack": "so", "layout": tag}},
                      params)
    want = P.pack_o_down(torch.stack([params["w0"], params["w1"]]), torch.stack([params["s0"], params["s1"]]),
                         torch.zeros(2, 2048, 4096, dtype=torch.uint8), torch.zeros(2, 2048, 64))
    assert torch.equal(wo, want[0]) and torch.equal(so, want[1])
    gu = derive_param({"op": "stack_layers", "from": ["s0", "s1", "s0", "s1"], "args": {"parts": 2}}, params)
    assert gu.shape == (2, 4096, 16) and torch.equal(gu[1, 2048:], params["s1"])
    qkv = {f"q{i}": torch.rand(n, 16, generator=g) for i, n in enumerate((2048, 512, 512))}
    sqkv = derive_param({"op": "stack_layers", "from": ["q0", "q1", "q2"],
                         "args": {"parts": 3, "pack": "sqkv", "layout": tag}}, qkv)
    want = P.pack_qkv(torch.zeros(1, 3072, 1024, dtype=torch.uint8), torch.cat(list(qkv.values()))[None])
    assert torch.equal(sqkv, want[1])
    with pytest.raises(ValueError, match="built with kernel 0123456789ab, this ctc has .*rebuild the library"):
        derive_param({"op": "stack_layers", "from": ["s0"], "args": {"pack": "so", "layout": "0123456789ab"}}, params)
    assert derive_param({"op": "zeros", "from": [], "args": {"shape": [7], "dtype": "float32"}}, {}).sum() == 0
    inv = derive_param({"op": "astype", "from": ["s0"], "args": {"dtype": "float16"}}, params)
    assert inv.dtype == torch.float16


# ----------------------------------------------------------------------------------------------- runner check
def test_runner_refuses_a_gpu_with_another_sm_count(tmp_path) -> None:
    from ctc.backends.tvm.build import _check_persistent_grid

    class Ffi:
        def __init__(self, sms: int):
            self.sms = sms

        def get_global_func(self, name: str):  # noqa: ANN202
            assert name == "runtime.GetDeviceAttr"
            return lambda dev_type, dev_id, attr: self.sms if (dev_type, dev_id, attr) == (2, 0, 7) else None

    _check_persistent_grid(Ffi(132), tmp_path / "model.so", 132)
    with pytest.raises(RuntimeError, match=r"launches 132 blocks.*this GPU has 114; rebuild it with `target cuda "
                                           r"sms=114` \(or `persistent=false`"):
        _check_persistent_grid(Ffi(114), tmp_path / "model.so", 132)


def test_target_options_reach_the_build(monkeypatch) -> None:
    from ctc.backends.tvm import targets as T

    monkeypatch.setattr(T, "detect_cuda_arch", lambda: None)
    info = T.resolve("cuda", type("Opts", (), {"arch": "sm_90a"})())
    assert (info.sms, info.persistent) == (132, True)
    info = T.resolve("cuda", type("Opts", (), {"arch": "sm_90", "sms": 114, "persistent": False})())
    assert (info.sms, info.persistent) == (114, False)
    # built on an H100 PCIe (sm_90, 114 SMs) for sm_90a: the visible GPU's count, not the arch's common one
    monkeypatch.setattr(T, "detect_cuda_arch", lambda: "sm_90")
    monkeypatch.setattr(T, "detect_cuda_sms", lambda: 114)
    assert T.resolve("cuda", type("Opts", (), {"arch": "sm_90a"})()).sms == 114
    assert T.resolve("cuda", type("Opts", (), {"arch": "sm_80"})()).sms != 114  # another GPU's arch: not this one
    from ctc.options import OptionError
    from ctc.targets import CudaOptions

    assert CudaOptions(sms=132, persistent=False).persistent is False
    with pytest.raises(OptionError):
        CudaOptions(sms=-1)


# ----------------------------------------------------------------------------------------------- CUDA library
def _build(m, persistent: bool = True):  # noqa: ANN001, ANN202
    from ctc.backends.tvm import targets as T
    from ctc.backends.tvm.build import BuildOptions, compile_module
    from ctc.backends.tvm.cuda_toolchain import find_nvcc

    if find_nvcc() is None:
        pytest.skip("nvcc (CUDA toolkit) is not installed: CUDA libraries cannot be built here")
    info = T.resolve("cuda", type("Opts", (), {"arch": "sm_90a", "sms": 132, "persistent": persistent})())
    return compile_module(m, target=info, options=BuildOptions(params="input"))


@functools.lru_cache(maxsize=1)
def _built_2_layers():  # noqa: ANN202
    m, ins = _llama_1b_step(2)
    return m, ins, _build(m)


def test_llama_1b_step_builds_as_one_persistent_kernel(tmp_path) -> None:
    import struct

    m, _, comp = _built_2_layers()
    meta = comp.meta
    assert meta["kernels"] == {"pdec_step_l2": 1, "pdec_finish_float16": 1} and meta["kernels_per_call"] == 2
    assert meta["persistent_grid"] == 132
    assert "persistent decode step: used (one launch of 132 blocks a step: 2 layers" in meta["notes"][0]
    assert meta["inplace_inputs"] == [v.name for v in m.inputs if v.name.startswith("cache_")]
    lib = comp.export(tmp_path, weights="derived")
    assert lib.read_bytes().count(struct.pack("<I", 0xBA55ED50)) >= 1, "no fatbin: the library carries CUDA source"
    ops = {p["source"]["op"] for p in meta["params"]}
    assert ops == {"stack_layers", "identity", "astype", "zeros"}
    # every weight bound once (stacked), inv_freq as f32, the workspace; zero points not at all (symmetric)
    bound = sum(a.nbytes for a in comp.param_arrays)
    used = {n.attrs["name"] for n in m.nodes if n.op == "param"}
    zeros = [p for p in meta["params"] if p["source"]["op"] == "zeros"][0]["shape"][0] * 4
    w_zero = sum(m.params[n].numel() for n in used if n.endswith("w_zero"))
    inv = [m.params[n] for n in used if n.endswith("inv_freq")][0]
    assert bound == sum(m.params[n].numel() * m.params[n].element_size() for n in used) - w_zero + zeros \
        + inv.numel() * (4 - inv.element_size())


def test_disabled_persistent_step_builds_the_per_operator_kernels() -> None:
    m, _ = _llama_1b_step(1)
    comp = _build(m, persistent=False)
    assert "persistent_grid" not in comp.meta and comp.meta["kernels_per_call"] > 2
    assert not any(k.startswith("pdec") for k in comp.meta["kernels"])
    assert "persistent decode step: not used (disabled: target cuda persistent=false)" in comp.meta["notes"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with 132 multiprocessors (H100 SXM, H200)")
def test_persistent_step_matches_the_interpreter_on_the_gpu(tmp_path) -> None:
    from ctc.backends.tvm.build import load_compiled
    from ctc.ir.interpreter import interpret

    if torch.cuda.get_device_properties(0).multi_processor_count != 132:
        pytest.skip("the library is built for 132 multiprocessors")
    m, ins, comp = _built_2_layers()
    comp.export(tmp_path, weights="derived")
    model = load_compiled(tmp_path, module_params=m.params)
    ref = interpret(m, ins)
    got = model(ins)
    err = (got[0].float() - ref[0].float()).abs().max().item()
    assert err <= 2e-2 * ref[0].float().abs().max().item() + 2e-2, err
    for g, r in zip(got[1:], ref[1:], strict=True):  # the new rows written, the rest untouched
        torch.testing.assert_close(g, r, atol=2e-2, rtol=2e-2)


def test_ctc_compile_says_which_decode_path_it_built(tmp_path) -> None:
    """`ctc compile` of a decoder for target cuda prints the build's note on the persistent step."""
    import subprocess
    import sys

    from hf_configs import tiny_llama_with_smollm2_tokenizer

    from ctc.backends.tvm.cuda_toolchain import find_nvcc

    if find_nvcc() is None:
        pytest.skip("nvcc (CUDA toolkit) is not installed: CUDA libraries cannot be built here")
    tiny_llama_with_smollm2_tokenizer(tmp_path / "model")
    (tmp_path / "dec.ctc").write_text('model hf "model" decode=16\ncalibrate wiki samples=1 seq_len=8\n'
                                      "pipeline {\n    quantize w_bits=8 a_bits=16\n}\n"
                                      'target cuda arch="sm_90a"\n')
    res = subprocess.run([sys.executable, "-m", "ctc", "compile", str(tmp_path / "dec.ctc"), "--out",
                          str(tmp_path / "art")], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    note = [ln.strip() for ln in res.stdout.splitlines() if "persistent decode step" in ln]
    assert note == ["note: persistent decode step: not used (the embedding table is not an f16 parameter "
                    "(f32[49152, 32]))"]
