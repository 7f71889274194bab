"""Decode steps over preallocated KV caches (``static_decode_step``) through the TVM backend.

The step writes its new keys/values into the cache buffers in place (``cache_write`` lowered
with ``call_tir_inplace``); through :class:`CompiledModel.__call__` the caller's tensors still
never change (in-place inputs are copied), through ``call_device`` the buffers are updated.
CPU runs here; the CUDA build is checked structurally (fatbin inside, kernels per step) and
executed only where a GPU is present (``gpu`` marker).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ctc.backends.tvm.build import BuildOptions, compile_module
from ctc.frontends import capture
from ctc.frontends.decode import static_cache_names, static_decode_inputs, static_decode_step
from ctc.ir.interpreter import interpret


def _llama(dtype: torch.dtype = torch.float32, tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval().to(dtype)


@pytest.fixture(scope="module")
def llama_step():
    model = _llama()
    step = static_decode_step(model)
    ins = static_decode_inputs(model, 16, position=5, seed=1)
    return model, step, ins, capture(step, ins, dynamic=False)


@torch.no_grad()
def test_static_step_continues_a_prefill(llama_step) -> None:
    model, step, _, _ = llama_step
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    full = model(ids, use_cache=False).logits
    caches = [torch.zeros(1, 2, 16, 16) for _ in static_cache_names(model.config)]
    for t in range(6):
        out = step(ids[:, t:t + 1], torch.tensor([t]), *caches)
        caches = list(out[1:])
        torch.testing.assert_close(out[0][0, -1], full[0, t], rtol=1e-4, atol=1e-5)


def test_capture_has_one_cache_write_per_cache(llama_step) -> None:
    model, _, ins, m = llama_step
    assert [v.name for v in m.inputs] == list(ins)
    assert m.op_counts()["cache_write"] == 2 * model.config.num_hidden_layers
    assert m.op_counts()["rms_norm"] == 2 * model.config.num_hidden_layers + 1


def test_cpu_step_matches_interpreter_and_updates_in_place(llama_step) -> None:
    _, _, ins, m = llama_step
    comp = compile_module(m, options=BuildOptions(params="input"))
    assert comp.meta["inplace_inputs"] == [n for n in ins if n.startswith("cache_")]
    ref = interpret(m, ins)
    import tempfile

    from ctc.backends.tvm.build import load_compiled

    with tempfile.TemporaryDirectory() as d:
        comp.export(d)
        model = load_compiled(d)
        before = {k: v.clone() for k, v in ins.items()}
        got = model(ins)
        for g, r in zip(got, ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
        for k, v in ins.items():  # the functional call never touches the caller's tensors
            assert torch.equal(v, before[k]), k
        # device-resident buffers: the step writes the new rows into them
        bufs = [model.device_tensor(ins[n]) for n in model.input_names]
        outs = model.call_device([b[0] for b in bufs])
        k0 = bufs[2][1]
        assert k0.data_ptr() == outs[1].data_ptr()  # the returned cache is the input buffer
        torch.testing.assert_close(k0, ref[1], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_half_precision_step_matches_interpreter() -> None:
    model = _llama(torch.float16)
    step = static_decode_step(model)
    ins = static_decode_inputs(model, 16, position=9, seed=4, dtype=torch.float16)
    m = capture(step, ins, dynamic=False)
    assert "cast" not in {n.op for n in m.nodes if n.op == "rms_norm"}
    ref32 = interpret(m, ins)
    comp = compile_module(m, options=BuildOptions(params="input"))
    import tempfile

    from ctc.backends.tvm.build import load_compiled

    with tempfile.TemporaryDirectory() as d:
        comp.export(d)
        got = load_compiled(d)(ins)
    err = (got[0].float() - ref32[0].float()).abs().max().item()
    scale = ref32[0].float().abs().max().item()
    assert err <= 2e-3 * scale + 2e-3, f"fp16 logits off by {err} (scale {scale})"
    torch.testing.assert_close(got[1], ref32[1])  # the written cache rows are copied exactly


# ----------------------------------------------------------------------------- CUDA
def _cuda_build(m, arch: str = "sm_90"):  # noqa: ANN001, ANN202
    from ctc.backends.tvm import targets as T
    from ctc.backends.tvm.cuda_toolchain import find_nvcc

    if find_nvcc() is None:
        pytest.skip("nvcc (CUDA toolkit) is not installed: CUDA libraries cannot be built here")
    info = T.resolve("cuda", type("Opts", (), {"arch": arch})())
    return compile_module(m, target=info, options=BuildOptions(params="input"))


@pytest.fixture(scope="module")
def cuda_half_step():
    model = _llama(torch.float16)
    step = static_decode_step(model)
    ins = static_decode_inputs(model, 32, position=7, seed=5, dtype=torch.float16)
    m = capture(step, ins, dynamic=False)
    return m, ins, _cuda_build(m)


def test_cuda_library_embeds_a_fatbin_and_counts_its_kernels(cuda_half_step, tmp_path) -> None:
    import struct

    m, _, comp = cuda_half_step
    lib = comp.export(tmp_path)
    blob = lib.read_bytes()
    assert blob.count(struct.pack("<I", 0xBA55ED50)) >= 1, "no fatbin: the library carries CUDA source"
    meta = comp.meta
    assert meta["device"] == "cuda" and meta["target"]["arch"] == "sm_90"
    assert meta["target"]["max_shared_memory_per_block"] == 232448  # Hopper's opt-in limit, not TVM's 48 KB guess
    layers = 2
    kernels = meta["kernels"]

    def count(prefix: str) -> int:
        return sum(v for k, v in kernels.items() if k.startswith(prefix))

    # per layer: norm+qkv GEMV, rope+cache write, attention, o+residual, norm+gate/up+SwiGLU, down+residual
    assert count("decode_attention") == layers and count("rope_write") == layers
    assert count("gemv") == 4 * layers + 1  # + final norm and LM head
    assert not count("rms_norm") and not count("cache_write")  # absorbed into the GEMVs / rope_write
    assert meta["kernels_per_call"] == sum(kernels.values()) <= 6 * layers + 8
    assert meta["inplace_inputs"] == [v.name for v in m.inputs if v.name.startswith("cache_")]


def test_every_parameter_is_bound_once(cuda_half_step) -> None:
    """The tied LM head (the embedding table) is one array in the library, as in the module."""
    m, _, comp = cuda_half_step
    bound = sum(a.nbytes for a in comp.param_arrays)
    unique = sum(t.numel() * t.element_size() for t in m.params.values())
    used = {n.attrs["name"] for n in m.nodes if n.op == "param"}
    unique_used = sum(m.params[n].numel() * m.params[n].element_size() for n in used)
    assert bound <= unique and bound == unique_used
    cpu = compile_module(m, options=BuildOptions(params="input"))
    assert sum(a.nbytes for a in cpu.param_arrays) == unique_used


def test_cuda_target_needs_an_arch_without_a_gpu(monkeypatch) -> None:
    from ctc.backends.tvm import targets as T

    monkeypatch.setattr(T, "detect_cuda_arch", lambda: None)
    with pytest.raises(T.UnsupportedTarget, match='arch="sm_90"'):
        T.resolve("cuda", type("Opts", (), {"arch": ""})())
    with pytest.raises(T.UnsupportedTarget, match="must look like sm_90"):
        T.resolve("cuda", type("Opts", (), {"arch": "hopper"})())
    assert T.target_key(T.resolve("cuda", type("Opts", (), {"arch": "sm_90"})())).startswith("cuda-sm_90-")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_matches_interpreter_on_the_gpu(cuda_half_step, tmp_path) -> None:
    from ctc.backends.tvm.build import load_compiled

    m, ins, comp = cuda_half_step
    comp.export(tmp_path)
    ref = interpret(m, ins)
    got = load_compiled(tmp_path)(ins)
    err = (got[0].float() - ref[0].float()).abs().max().item()
    assert err <= 2e-3 * ref[0].float().abs().max().item() + 2e-3
    torch.testing.assert_close(got[1], ref[1])


# ----------------------------------------------------------------------------- generation loop
@torch.no_grad()
def test_generation_loop_matches_hf_greedy_on_cpu(llama_step, tmp_path) -> None:
    from ctc.backends.tvm.build import load_compiled
    from ctc.generate import greedy_generate

    model, _, _, m = llama_step
    prompt = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(7))
    want = model.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8, pad_token_id=0)[:, 4:]
    compile_module(m, options=BuildOptions(params="input")).export(tmp_path)
    gen = greedy_generate(load_compiled(tmp_path), prompt, 8)
    assert torch.equal(gen.tokens, want)
    assert gen.tokens_per_s > 0 and gen.step_ms > 0
    # the same loop over the reference semantics (functional caches)
    ref = greedy_generate(lambda feed: interpret(m, feed), prompt, 8,
                          input_specs=m.input_specs())
    assert torch.equal(ref.tokens, want)


def test_generation_rejects_what_does_not_fit(llama_step, tmp_path) -> None:
    from ctc.generate import greedy_generate

    _, _, _, m = llama_step
    specs = m.input_specs()
    with pytest.raises(ValueError, match="cache positions"):
        greedy_generate(lambda f: None, torch.zeros(1, 10, dtype=torch.long), 10, input_specs=specs)
    with pytest.raises(ValueError, match="not a static decode step"):
        greedy_generate(lambda f: None, torch.zeros(1, 2, dtype=torch.long), 1, input_specs=specs[2:])


def test_cuda_prefill_kernels_read_no_bool_vectors(tmp_path, monkeypatch) -> None:
    """A half-precision prefill with a bool attention mask: no kernel loads bools as a vector.

    TVM's CUDA code generator loads two bools as one ``ushort2`` (4 bytes at a 2-byte offset: wrong bytes
    and a "misaligned address" fault on the GPU, seen in the Llama-1B prefill); the lowering hands the GPU
    an f32 additive mask instead.  Checked on the generated CUDA source (TVM_KERNEL_DUMP)."""
    import re

    from ctc.frontends.hf import capture_hf_model

    monkeypatch.setenv("TVM_KERNEL_DUMP", str(tmp_path))
    m = capture_hf_model(_llama(torch.float16), task="causal_lm", batch=1, seq_len=16, dynamic=False)
    assert any(v.type.dtype == "bool" for n in m.nodes for v in n.outputs), "the test needs a bool mask"
    _cuda_build(m)
    src = (tmp_path / "tvm_kernels.cu").read_text()
    bools = set(re.findall(r"bool\* __restrict__ (\w+)", src))
    vector_reads = re.findall(r"\*\((?:u?short|u?char|u?int|float|half)\d\*\)\((\w+) \+", src)
    assert not bools & set(vector_reads), f"bool buffers loaded as vectors: {sorted(bools & set(vector_reads))}"
    # q k^T and p v sum in f32: no half accumulators left in the matmul kernels
    assert "half2 matmul_intermediate" not in src and "half matmul_intermediate" not in src
