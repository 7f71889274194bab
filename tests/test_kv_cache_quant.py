"""``kv-cache-quant`` and its ops: an int8/int4 KV cache of a static decode step, written at the step and
read by attention; the CPU kernels match the reference interpreter and update the buffers in place."""

from __future__ import annotations

import tempfile

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ctc.frontends import capture
from ctc.frontends.decode import static_decode_inputs, static_decode_step
from ctc.generate import greedy_generate
from ctc.ir import quant as Q
from ctc.ir.interpreter import interpret
from ctc.passes.base import get_pass
from ctc.passes.manager import PassManager, PipelineError


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def step_module():
    m = _llama()
    return m, capture(static_decode_step(m), static_decode_inputs(m, 32, position=8, random_cache=False),
                      dynamic=False)


def _run(module, options):  # noqa: ANN001, ANN202
    return PassManager([get_pass("kv-cache-quant")(options)], progress=False, fidelity=False).run(module)[0]


def _specs(m):  # noqa: ANN001, ANN202
    return m.input_specs()


def test_quantize_kv_round_trip_error_is_half_a_step() -> None:
    x = torch.randn(2, 3, 5, 64) * torch.linspace(0.1, 3, 64)
    for bits, gs in ((8, -1), (8, 16), (4, 32)):
        q, s = Q.quantize_kv(x, bits, gs)
        assert q.dtype == (torch.int8 if bits == 8 else torch.uint8) and s.shape[-1] == Q.kv_groups(64, gs)
        err = (Q.dequantize_kv(q, s, bits, gs) - x).abs().reshape(2, 3, 5, s.shape[-1], -1)
        assert bool((err <= s.unsqueeze(-1) / 2 + 1e-6).all())


def test_pass_rewrites_inputs_outputs_and_ops(step_module) -> None:
    _, mod = step_module
    q = _run(mod, {"bits": 8})
    names = [(v.name, v.type.dtype) for v in q.inputs]
    assert names[:6] == [("input_ids", "i64"), ("position", "i64"), ("cache_k_0", "i8"), ("cache_k_0_scale", "f32"),
                         ("cache_v_0", "i8"), ("cache_v_0_scale", "f32")]
    ops = q.op_counts()
    assert ops.get("quant_cache_write") == 4 and ops.get("quant_kv_attention") == 2
    assert "cache_write" not in ops and "scaled_dot_product_attention" not in ops
    assert len(q.outputs) == 1 + 8 and q.output_names[1:3] == ["1", "1_scale"]


def test_generation_with_an_int8_cache_follows_fp32(step_module) -> None:
    model, mod = step_module
    q = _run(mod, {"bits": 8})
    prompt = torch.tensor([[3, 5, 7, 9, 11]])
    g0 = greedy_generate(lambda ins: interpret(mod, ins), prompt, 6, input_specs=_specs(mod))
    g1 = greedy_generate(lambda ins: interpret(q, ins), prompt, 6, input_specs=_specs(q))
    assert torch.equal(g0.tokens, g1.tokens)


def test_non_decode_modules_are_refused() -> None:
    from ctc.ir import Module, TensorType

    m = Module("plain")
    x = m.add_input("x", TensorType((1, 2, 4, 16), "f32"))
    y = m.create_node("scaled_dot_product_attention", [x, x, x], {"is_causal": True})
    m.set_outputs([y.output])
    with pytest.raises(PipelineError, match="static decode step"):
        _run(m, {"bits": 8})


@pytest.mark.parametrize("bits,gs", [(8, -1), (8, 16), (4, -1)])
def test_cpu_kernels_match_interpreter_in_place(step_module, bits: int, gs: int) -> None:
    pytest.importorskip("tvm")
    from ctc.backends.tvm.build import BuildOptions, compile_module, load_compiled

    _, mod = step_module
    q = _run(mod, {"bits": bits, "group_size": gs})
    comp = compile_module(q, options=BuildOptions())
    # int8 and int4 caches are read by the decode attention kernel: no fallback note (a host without AMX-BF16
    # adds one about its f32 linears, which is not about the cache)
    assert [n for n in comp.meta["notes"] if not n.startswith("fp32_matmul=")] == []
    d = tempfile.mkdtemp()
    comp.export(d)
    lib = load_compiled(d)
    g = torch.Generator().manual_seed(0)
    ins = {}
    for v in q.inputs:
        shape = tuple(v.type.shape)
        if v.name == "input_ids":
            ins[v.name] = torch.tensor([[5]])
        elif v.name == "position":
            ins[v.name] = torch.tensor([20])
        elif v.type.dtype == "i8":
            ins[v.name] = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
        elif v.type.dtype == "u8":
            ins[v.name] = torch.randint(0, 256, shape, generator=g).to(torch.uint8)
        else:
            ins[v.name] = torch.rand(shape, generator=g) * 0.05
    ref = interpret(q, ins)
    got = lib(*[ins[v.name] for v in q.inputs])
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(got[1:], ref[1:], strict=True):
        assert torch.equal(a, b) if not a.dtype.is_floating_point else torch.allclose(a, b, rtol=1e-6, atol=0)
    # through device buffers the library writes the new rows into the caches themselves
    if bits == 8:
        args = [lib.device_tensor(ins[v.name]) for v in q.inputs]
        lib.call_device([a[0] for a in args])
        after = args[2][1]
        assert torch.equal(after, ref[1]) and not torch.equal(after, ins["cache_k_0"])


@torch.no_grad()
def test_teacher_forced_nll_matches_the_full_sequence_model(step_module) -> None:
    """Scoring a text one token per decode step gives the full-sequence model's NLL (fp32 cache), and an
    int8 cache stays within a small margin of it."""
    from ctc.generate import teacher_forced_nll

    model, mod = step_module
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    lp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    want = -float(lp[5:11].gather(-1, ids[0, 6:12, None]).sum())
    nll, count = teacher_forced_nll(lambda ins: interpret(mod, ins), ids, 5, input_specs=_specs(mod))
    assert count == 6 and abs(nll - want) < 1e-3 * abs(want)
    q = _run(mod, {"bits": 8})
    nll8, _ = teacher_forced_nll(lambda ins: interpret(q, ins), ids, 5, input_specs=_specs(q))
    assert nll8 != nll and abs(nll8 - nll) < 0.02 * abs(nll)
    with pytest.raises(ValueError, match="first=11"):
        teacher_forced_nll(lambda ins: interpret(mod, ins), ids, 11, input_specs=_specs(mod))


@pytest.mark.parametrize("bits", [8, 4])
def test_positions_past_a_quantized_cache_are_refused(step_module, bits: int) -> None:
    """The step writes its quantized cache in place at ``position``: one past the cache is refused by name, by the
    artifact's checker and by the compiled CPU runner, before anything is written (it wrote past the buffer)."""
    from ctc.artifact import InputChecker
    from ctc.backends.tvm.build import compile_module, load
    from ctc.errors import UsageError
    from ctc.positions import index_bounds

    model, mod = step_module
    q = _run(mod, {"bits": bits})
    assert index_bounds(q)["position"] == (32, "cache positions")
    dtypes = {"i64": torch.int64, "i8": torch.int8, "u8": torch.uint8, "f32": torch.float32}
    ins = {v.name: torch.zeros([int(d) for d in v.type.shape], dtype=dtypes[v.type.dtype]) for v in q.inputs}
    ins["position"] = torch.tensor([8])
    InputChecker(q)(ins)  # in range: fine
    bad = {**ins, "position": torch.tensor([32])}
    with pytest.raises(UsageError, match=r"input 'position' holds cache positions in \[32, 32\]; the cache has 32"):
        InputChecker(q)(bad)
    with tempfile.TemporaryDirectory() as d:
        compile_module(q).export(d)
        lib = load(d, q)
        with pytest.raises(UsageError, match=r"input 'position' holds cache positions in \[32, 32\]"):
            lib(bad)



def test_a_pipeline_with_data_measures_the_quantized_cache_step(step_module) -> None:
    """Calibration and evaluation batches of a decode step carry float caches (the eager model prefills them);
    after kv-cache-quant the step reads integer caches and scales.  The pass manager's fidelity and the
    compile's measurements feed it those batches: they ran into 'missing inputs cache_k_0_scale' (exit 4)."""
    from ctc.driver import LoadedModel, Progress, measure
    from ctc.frontends.decode import static_prefilled_inputs
    from ctc.tasks import TASK_DECODE_STEP

    model, mod = step_module
    batches = [static_prefilled_inputs(model, torch.tensor([[3, 5, 7, 9, 11, 13]]), 32)]
    q, report = PassManager([get_pass("kv-cache-quant")({"bits": 8})], calibration=batches, progress=False).run(mod)
    fid = report.records[-1].fidelity
    assert fid is not None and fid.error is None and fid.cosine > 0.99
    got = measure(mod, q, LoadedModel(mod, TASK_DECODE_STEP), batches, {"fidelity", "max_error"}, Progress(False))
    assert got["fidelity"]["compressed"] > 0.99


def test_a_calibrating_pass_after_kv_cache_quant_gets_batches_the_step_takes(step_module) -> None:
    """Passes after kv-cache-quant calibrate on the step as it now is: its caches integer with scales."""
    from ctc.frontends.decode import static_prefilled_inputs

    model, mod = step_module
    batches = [static_prefilled_inputs(model, torch.tensor([[3, 5, 7, 9, 11, 13]]), 32)]
    steps = [get_pass("kv-cache-quant")({"bits": 8}), get_pass("rptq")({"w_bits": 8, "a_bits": 16})]
    q, report = PassManager(steps, calibration=batches, progress=False).run(mod)
    assert q.op_counts().get("quant_linear") and report.records[-1].fidelity.cosine > 0.99


def test_a_bf16_decode_step_is_refused_at_the_recipe_step() -> None:
    """`model hf DIR decode=N dtype=bf16` + kv-cache-quant failed after loading data with exit 4 ('found no
    attention over a preallocated KV cache ... bf16 attention'): it is a located check now, saying what to do."""
    from ctc.passes.base import Selector

    m = _llama().to(torch.bfloat16)
    step = capture(static_decode_step(m), static_decode_inputs(m, 16, position=4, random_cache=False,
                                                         dtype=torch.bfloat16), dynamic=False)
    cls = type(get_pass("kv-cache-quant")())
    ((where, msg),) = cls.check_module(cls.Options.from_dict({}), step, Selector())
    assert where is None and "take f32 attention" in msg and "bf16" in msg and "dtype=f32" in msg
