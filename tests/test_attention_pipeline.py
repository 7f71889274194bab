"""The attention passes in one pipeline with block sharing (structural), quantization and clean-up
passes, compiled with TVM for the CPU, on a tiny captured Llama (the MiniLM recipe version is a slow
test in test_compile_e2e.py)."""

from __future__ import annotations

import torch
from hf_configs import captured, hf_inputs

from ctc.backends.tvm.build import BuildOptions, compile_module
from ctc.ir import interpret
from ctc.passes import Selector, get_pass
from ctc.passes.manager import PassManager, Step


def test_act_sparse_and_rptq_compose_and_compile():
    _, m = captured("llama")
    calib = [hf_inputs(2, 12, seed=s) for s in (1, 2)]
    steps = [Step(get_pass("cse")()),
             Step(get_pass("share-blocks")({"groups": [[0, 1]]})),  # structural: both blocks read one weight set
             Step(get_pass("calibrate-attention")({"task": "lm", "threshold": 1.0, "budget": 3}),
                  Selector(blocks=((0, 1),))),
             Step(get_pass("sparse-attention")({"rounds": [4, 8], "keep": [0.75, 0.5], "min_keep": 2}),
                  Selector(blocks=((1, 2),))),
             Step(get_pass("rptq")({"w_bits": 8, "a_bits": 8, "clusters": 2})),
             Step(get_pass("dce")())]
    out, report = PassManager(steps, calibration=calib, progress=False).run(m)
    ops = out.op_counts()
    assert ops.get("sparse_attention") == 1 and ops.get("quant_linear", 0) > 0
    act = report.records[2].metrics
    assert act["heads_evaluated"] == 3
    assert ops.get("calibrated_attention", 0) == (1 if act["heads"] else 0)
    import tvm
    from tvm import relax

    comp = compile_module(out, options=BuildOptions())
    vm = relax.VirtualMachine(comp.executable, tvm.cpu())
    feed = hf_inputs(1, 10, seed=7)
    got = vm["main"](*[tvm.runtime.tensor(feed[v.name].numpy()) for v in out.inputs])
    got = got.numpy() if hasattr(got, "numpy") else got[0].numpy()
    ref = interpret(out, feed)[0]
    assert torch.nn.functional.cosine_similarity(torch.from_numpy(got).flatten(), ref.flatten(), dim=0) > 0.999
