"""fpga target: integer model, HLS C emission, gcc C simulation (bit-exact), resource/latency model, tuning."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from tiny_transformers import outlier_inputs, tiny_transformer

from ctc.backends.hls import exact as E
from ctc.backends.hls.boards import BOARDS
from ctc.backends.hls.perf import DRAM_LATENCY, LATENCY, LOOP_OVERHEAD, kernel_cost
from ctc.backends.hls.qlinear import QLinearShape, Tiling, qlinear_cost, qlinear_primfunc
from ctc.ir import Module, TensorType
from ctc.ir.interpreter import interpret
from ctc.passes.base import PassContext, get_pass
from ctc.targets import FpgaOptions, TargetConfig, build_target

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="C simulation needs gcc")


def _lowered(shape: QLinearShape, t: Tiling):
    import tvm

    from ctc.backends.hls.cgen import lower_tir

    return lower_tir(tvm.IRModule({"q": qlinear_primfunc(shape, t, "q")}))["q"]


# ----------------------------------------------------------------------------- model
def test_gemm_cycles_equal_the_closed_form() -> None:
    """A 64x256x128 int8 GEMM, tiles 32x64x64, 16 MAC lanes, 4 epilogue lanes: count it by hand."""
    L, OV = LATENCY, LOOP_OVERHEAD
    M, K, N, TM, TN, TK, PN, PE = 64, 256, 128, 32, 64, 64, 16, 4
    d_mac = L["iadd"] + L["imul"] + L["load"] + L["store"]  # acc += xq * wt
    d_epi = L["fadd"] + L["fmul"] + max(L["fmul"] + L["load"], L["fcvt"] + L["iadd"] + L["imul"] + L["load"]) \
        + L["store"]  # yt += (s_a * s_w) * f32(acc - z_a * wsum)
    acc_init = TM * ((TN // PN - 1) + L["store"] + OV)
    mac = (K // TK) * (TK * ((TN // PN) * ((TM - 1) + d_mac + OV) + OV) + OV)
    epilogue = TM * ((TN // PE - 1) + d_epi + OV)
    cycles = (M // TM) * ((N // TN) * (acc_init + mac + epilogue + OV) + OV)
    assert cycles == 165782
    # off-chip: x with its scale and zero point per element once per row block; per column block the bias,
    # the weights, per output element the epilogue's four scalars, and y
    nbytes = (M // TM) * (TM * K * 12 + (N // TN) * (TM * TN * 4 + TN * K + TM * TN * 16 + TM * TN * 4))
    shape, t = QLinearShape(M, K, N, 8, 8, -1, True, ()), Tiling(TM, TN, TK, PN, PE)
    board = BOARDS["u280"]
    got = kernel_cost("q", _lowered(shape, t), board)
    assert (got.compute_cycles, got.offchip_bytes) == (cycles, nbytes)
    assert got.latency_cycles == max(cycles, math.ceil(nbytes / board.bytes_per_cycle)) + DRAM_LATENCY
    assert got.bound == "compute"
    assert got.dsps == math.ceil(PN / 2 + PE * (3 + 3 + 2 + 0.5))  # WP486 packing halves the int8 multipliers


@pytest.mark.parametrize("shape,t", [
    (QLinearShape(16, 40, 32, 8, 8, -1, True, (7, 40)), Tiling(8, 16, 16, 8, 2)),
    (QLinearShape(16, 40, 32, 4, 8, 16, False, (7, 40)), Tiling(16, 32, 8, 16, 1)),
    (QLinearShape(16, 40, 32, 8, 8, -1, False, ()), Tiling(4, 8, 64, 8, 8)),
])
@pytest.mark.parametrize("board", ["zc706", "u280"])
def test_tuner_closed_form_equals_the_tir_walk(shape: QLinearShape, t: Tiling, board: str) -> None:
    walk = kernel_cost("q", _lowered(shape, t), BOARDS[board]).to_json()
    closed = qlinear_cost(shape, t, BOARDS[board], "q").to_json()
    walk.pop("ops")
    closed.pop("ops")
    assert walk == closed


def test_float_accumulation_pipelines_at_the_adder_latency() -> None:
    """A row sum in the integer model's fixed order cannot start a new addition every cycle."""
    m = Module("rowsum")
    x = m.add_input("x", TensorType((4, 64), "f32"))
    m.set_outputs([m.create_node("softmax", [x], {"axis": 1}).output])
    from ctc.backends.hls.design import lower_design

    d = lower_design(m, {}, {})
    c = kernel_cost("softmax", d.kernels()["softmax"], BOARDS["zc706"])
    assert c.compute_cycles > 3 * 4 * 64  # three passes over 4 rows of 64, each at II >= 4 for the sums
    assert c.ops_by_kind["fadd"] > 0


# ----------------------------------------------------------------------------- integer model
def test_polynomial_exp_and_erf_are_accurate() -> None:
    x = torch.linspace(-86, 88, 100001)
    rel = ((E.exp_poly(x).double() - torch.exp(x.double())).abs() / torch.exp(x.double())).max()
    assert float(rel) < 2e-7
    assert float(E.exp_poly(torch.tensor([-math.inf, -100.0])).abs().max()) == 0.0
    x = torch.linspace(-6, 6, 100001)
    assert float((E.erf_poly(x).double() - torch.erf(x.double())).abs().max()) < 1e-6


def _quantized(kind: str, w_bits: int, seed: int = 1):
    m = tiny_transformer(kind, batch=1, seq=8, layers=2, seed=seed)
    cal = outlier_inputs(m, 2, seed=seed)
    q = get_pass("rptq")({"w_bits": w_bits, "a_bits": 8, "clusters": 3}).run(m, PassContext(calibration=cal))
    return q, cal


def test_integer_model_is_close_to_the_ir_semantics() -> None:
    q, cal = _quantized("bert", 8)
    for b in cal:
        got, ref = E.interpret_exact(q, b)[0], interpret(q, b)[0]
        assert float((got - ref).abs().max()) < 1e-4 * max(1.0, float(ref.abs().max()))


# ----------------------------------------------------------------------------- C simulation
def _all_ops_module() -> tuple[Module, list[dict[str, torch.Tensor]]]:
    """Every float-island kernel and both integer engines side by side (one gcc build)."""
    g = torch.Generator().manual_seed(3)
    m = Module("ops")
    x = m.add_input("x", TensorType((8, 64), "f32"))
    q = m.add_input("q", TensorType((1, 4, 8, 16), "f32"))
    k = m.add_input("k", TensorType((1, 2, 8, 16), "f32"))
    v = m.add_input("v", TensorType((1, 2, 8, 16), "f32"))
    for name, shape in (("w", (64,)), ("b", (64,)), ("fc", (32, 64)), ("fc_b", (32,))):
        m.add_param(name, torch.randn(*shape, generator=g))
    outs = [m.create_node(op, [x], attrs).output for op, attrs in
            (("gelu", {}), ("silu", {}), ("exp", {}), ("sigmoid", {}), ("softmax", {"axis": 1}),
             ("div", {"scalar": 3.0, "reverse": False}))]
    outs.append(m.create_node("layer_norm", [x, m.param("w"), m.param("b")], {"eps": 1e-12}).output)
    outs.append(m.create_node("rms_norm", [x, m.param("w")], {"eps": 1e-6}).output)
    outs.append(m.create_node("scaled_dot_product_attention", [q, k, v],
                              {"is_causal": True, "enable_gqa": True}).output)
    lin = m.create_node("linear", [x, m.param("fc"), m.param("fc_b")], {}).output
    outs.append(m.create_node("relu", [lin], {}).output)
    m.set_outputs(outs)

    def batch(s: float) -> dict[str, torch.Tensor]:
        return {"x": torch.randn(8, 64, generator=g) * s, "q": torch.randn(1, 4, 8, 16, generator=g) * s,
                "k": torch.randn(1, 2, 8, 16, generator=g) * s, "v": torch.randn(1, 2, 8, 16, generator=g)}

    cal = [batch(3.0), batch(3.0)]
    mq = get_pass("quantize")({"w_bits": 4, "a_bits": 8, "sym": False, "w_granularity": "group", "group_size": 16,
                               "blocks_only": False}).run(m, PassContext(calibration=cal))
    assert mq.op_counts()["quant_linear"] == 1
    return mq, [batch(s) for s in (0.5, 4.0, 30.0)]


def test_every_kernel_c_simulates_bit_exactly(tmp_path: Path) -> None:
    from ctc.backends.hls import csim
    from ctc.backends.hls.design import lower_design, write_design

    m, batches = _all_ops_module()
    prog = write_design(lower_design(m, {}, {}), m, tmp_path / "hls")
    csim.compile_csim(tmp_path / "hls")
    for i, b in enumerate(batches):
        ordered = [b[v.name] for v in m.inputs]
        expected = E.interpret_exact(m, ordered)
        d = csim.write_inputs(tmp_path / "hls", [t.numpy() for t in ordered], [e.numpy() for e in expected],
                              tag=str(i))
        res = csim.run_csim(tmp_path / "hls", d, prog.outputs)
        assert res.passed, res.stdout
    src = (tmp_path / "hls" / "ctc_top.c").read_text()
    assert "k_qlinear_" in src and "#pragma HLS" in next((tmp_path / "hls" / "kernels").glob("qlinear_*.c")).read_text()


@pytest.mark.parametrize("kind,w_bits,board", [("bert", 8, "zc706"), ("llama", 4, "u280")])
def test_tiny_model_end_to_end(kind: str, w_bits: int, board: str, tmp_path: Path) -> None:
    """rptq -> fpga target: tuned tilings, per-layer resources within the board, C-sim bit-exact, report."""
    q, cal = _quantized(kind, w_bits)
    t = TargetConfig("fpga", FpgaOptions.from_dict({"board": board, "tuning_dir": str(tmp_path / "db")}))
    s = build_target(q, t, tmp_path / "fpga", example_inputs=cal[0])
    assert s["csim"]["bit_exact"] is True
    rep = json.loads((tmp_path / "fpga" / "report.json").read_text())
    b = BOARDS[board]
    assert all(row["dsps"] <= 0.8 * b.dsps and row["onchip_bytes"] <= 0.8 * b.onchip_bytes for row in rep["layers"])
    assert {r["bound"] for r in rep["layers"]} <= {"compute", "memory"}
    assert rep["tuned_vs_default"]["gemm_speedup"] > 1.0
    assert (tmp_path / "fpga" / "roofline.png").exists() and (tmp_path / "fpga" / "roofline.svg").exists()
    qrows = [r for r in rep["layers"] if r["kernel"].startswith("qlinear")]
    assert len(qrows) == q.op_counts()["quant_linear"] and all("tiling" in r for r in qrows)
    from ctc.backends.hls import load

    runner = load(tmp_path / "fpga", q)
    y = runner(cal[1])[0]
    assert runner.last_bit_exact is True and y.shape == E.interpret_exact(q, cal[1])[0].shape
    assert runner.static_dims == rep["static_dims"]  # what `ctc run --text` pads a text to
    from ctc.errors import UsageError

    given = list(cal[1].values()) if isinstance(cal[1], dict) else list(cal[1])
    with pytest.raises(UsageError, match="the fpga design takes"):  # wrong inputs: named, not a traceback
        runner([*given, given[0]])
    with pytest.raises(UsageError, match="built for .* values"):
        runner([x[..., :1] for x in given])
    # the database answers the second build: nothing searched
    again = build_target(q, TargetConfig("fpga", FpgaOptions.from_dict(
        {"board": board, "tuning_dir": str(tmp_path / "db"), "csim": False})), tmp_path / "fpga2",
        example_inputs=cal[0])
    assert again["latency_ms"] == s["latency_ms"]
    assert json.loads((tmp_path / "fpga2" / "report.json").read_text())["tuning"]["searched"] == 0


def test_a_design_no_tiling_fits_is_a_lowering_error_naming_the_layer(tmp_path: Path) -> None:
    """`target fpga dsps=1` (tuned) ended in 'internal error: TuneError' with a traceback; with tune=false the same
    board was already a LoweringError, which ctc compile reports at the recipe's target line."""
    from ctc.backends.tvm.lower import LoweringError

    q, cal = _quantized("bert", 8)
    for tune in (True, False):
        t = TargetConfig("fpga", FpgaOptions.from_dict({"board": "zc706", "dsps": 1, "csim": False, "tune": tune,
                                                        "tuning_dir": str(tmp_path / "db")}))
        with pytest.raises(LoweringError, match=r"(?s)(do not fit board|fits 80% of board) zc706.*pick a larger board"):
            build_target(q, t, tmp_path / f"x{tune}", example_inputs=cal[0])


def test_a_width_the_design_lacks_is_an_error(tmp_path: Path) -> None:
    from ctc.backends.tvm.lower import LoweringError

    q, cal = _quantized("llama", 4)
    t = TargetConfig("fpga", FpgaOptions.from_dict({"board": "zc706", "widths": [8, 16], "csim": False}))
    with pytest.raises(LoweringError, match="w_bits=4.*widths are 8, 16"):
        build_target(q, t, tmp_path / "x", example_inputs=cal[0])


def test_ops_without_an_integer_model_are_listed(tmp_path: Path) -> None:
    from ctc.backends.tvm.lower import LoweringError

    m = Module("trig")
    x = m.add_input("x", TensorType((2, 4), "f32"))
    m.set_outputs([m.create_node("sin", [x], {}).output])
    with pytest.raises(LoweringError, match=r"(?s)no integer-model kernel.*sin"):
        build_target(m, TargetConfig("fpga", FpgaOptions()), tmp_path / "x")


def test_a_recipe_with_ops_the_fpga_lacks_names_them_on_its_target_line(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A CNN's `target fpga` printed the op list with its line breaks escaped into the message ('main:\\x0a  -
    conv ...'): each op now reads as one item of the located error."""
    from ctc.cli import EXIT_USAGE, main

    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sin(x) + torch.cos(x)

    torch.export.save(torch.export.export(Net(), (torch.randn(2, 4),)), str(tmp_path / "trig.pt2"))
    (tmp_path / "r.ctc").write_text('model pt2 "trig.pt2"\npipeline {\n    dce\n}\ntarget fpga csim=false\n')
    assert main(["compile", str(tmp_path / "r.ctc"), "--out", str(tmp_path / "out"), "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "r.ctc:5:1: error: target fpga:" in err and "\\x0a" not in err, err
    assert "no integer-model kernel for 2 op(s) of module main: cos (at <root>); sin (at <root>)" in err, err


def test_a_pt2_batch_symbol_is_built_for_batch_one(tmp_path: Path) -> None:
    """A .pt2 program exported with a dynamic batch and sequence names them d0, d1: the design bound both to
    seq_len (static_dims {'d0': 128, 'd1': 128}), a 128-row batch modelled at 122x the latency of batch 1,
    where the documented static shape is batch 1."""
    m = Module("dyn")
    x = m.add_input("x", TensorType(("d0", "d1", 8), "f32"))
    m.set_outputs([m.create_node("softmax", [x], {"axis": 2}).output])
    out = build_target(m, TargetConfig("fpga", FpgaOptions.from_dict({"csim": False, "tune": False})), tmp_path / "d")
    assert out["static_dims"] == {"d0": 1, "d1": 128}


def test_a_pt2_without_data_is_measured_on_synthetic_inputs_or_says_why_not(tmp_path: Path) -> None:
    """Without calibrate/evaluate data the targets are checked on synthetic inputs sized by batch 1 only; a .pt2
    program's batch symbol is d0, not 'batch', so a program exported with a dynamic batch was not checked at all,
    and neither ctc compile nor ctc show said so (`target fpga: targets/fpga`, nothing else)."""
    from ctc.cli import EXIT_OK, main

    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x * 2.0, dim=-1)

    b, s = torch.export.Dim("b"), torch.export.Dim("s")
    for name, shapes in (("batch", {"x": {0: b}}), ("batch_seq", {"x": {0: b, 1: s}})):
        ep = torch.export.export(Net(), (torch.randn(2, 5, 8),), dynamic_shapes=shapes)
        torch.export.save(ep, str(tmp_path / f"{name}.pt2"))
        (tmp_path / f"{name}.ctc").write_text(f'model pt2 "{name}.pt2"\ntarget fpga tune=false\n')
        assert main(["compile", str(tmp_path / f"{name}.ctc"), "--out", str(tmp_path / name), "-q"]) == EXIT_OK
    measured = [json.loads((tmp_path / n / "report.json").read_text())["targets"][0]["measured"]
                for n in ("batch", "batch_seq")]
    assert measured[0]["bit_exact_vs_integer_model"] is True and "synthetic" in measured[0]["protocol"]
    assert measured[1]["skipped"].startswith("no calibrate or evaluate data to size the inputs with")


def test_a_csim_false_build_compiles_and_is_reported_unmeasured(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`target fpga csim=false` in a recipe built the design, then ctc compile tried to C-simulate it to measure it:
    'internal error: CSimError: no C-simulation build ... (build with `target fpga csim=true`)', a traceback and
    no artifact. The build is now reported as not measured, saying why."""
    from ctc.cli import EXIT_OK, main

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x))

    torch.export.save(torch.export.export(Net().eval(), (torch.randn(2, 8),)), str(tmp_path / "mlp.pt2"))
    (tmp_path / "r.ctc").write_text('model pt2 "mlp.pt2"\npipeline {\n    dce\n}\ntarget fpga csim=false tune=false\n')
    out = tmp_path / "out"
    assert main(["compile", str(tmp_path / "r.ctc"), "--out", str(out), "-q"]) == EXIT_OK, capsys.readouterr().err
    t = json.loads((out / "report.json").read_text())["targets"][0]
    assert t["csim"] == {"run": False} and "not_runnable" not in t
    assert t["measured"]["skipped"].startswith("built with csim=false")
    assert (out / "targets" / "fpga" / "hls" / "ctc_top.c").is_file()


# ----------------------------------------------------------------------------- real model (slow)
@pytest.mark.slow
def test_minilm_w8a8_recipe_compiles_for_the_fpga(tmp_path: Path) -> None:
    """examples/minilm_w8a8_fpga.ctc: real MiniLM, RPTQ W8A8, U280; C-sim bit-exact on the evaluation batch."""
    from ctc.cli import main

    recipe = Path(__file__).parents[1] / "examples" / "minilm_w8a8_fpga.ctc"
    out = tmp_path / "art"
    assert main(["compile", str(recipe), "--out", str(out), "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    t = next(t for t in rep["targets"] if t["kind"] == "fpga")
    assert t["csim"]["bit_exact"] is True and t["measured"]["bit_exact_vs_integer_model"] is True
    assert t["measured"]["vs_ir"]["cosine"] > 0.999
    fr = json.loads((out / "targets" / "fpga" / "report.json").read_text())
    b = fr["board"]
    assert all(r["dsps"] <= b["dsps"] and r["onchip_bytes"] <= b["onchip_bytes"] for r in fr["layers"])
    assert fr["tuned_vs_default"]["model_speedup"] > 1.0


def test_tuning_database_reuses_current_records_and_searches_stale_ones(tmp_path: Path) -> None:
    from ctc.backends.hls.tune import SEARCH_VERSION, tune_plan, tuning_db_path

    layers = {"y": QLinearShape(16, 64, 32, 8, 8, -1, True, (20, 64))}
    board = BOARDS["zc706"]
    plan, info = tune_plan(layers, board, 0.8, cache_dir=tmp_path)
    assert info["searched"] == 1 and isinstance(plan["y"], Tiling)
    assert qlinear_cost(layers["y"], plan["y"], board).fits(board, 0.8) is None
    assert tune_plan(layers, board, 0.8, cache_dir=tmp_path)[1]["searched"] == 0
    path = tuning_db_path(board, 0.8, tmp_path)
    db = json.loads(path.read_text())
    db[layers["y"].key]["version"] = SEARCH_VERSION - 1
    path.write_text(json.dumps(db))
    assert tune_plan(layers, board, 0.8, cache_dir=tmp_path)[1]["searched"] == 1


def test_a_damaged_tuning_database_is_searched_again_not_a_traceback(tmp_path: Path) -> None:
    """A truncated or hand-edited hls_tilings.json failed the build with json.decoder.JSONDecodeError (a
    traceback), and a record edited to a tiling that does not divide the layer was used as it was; the file or the
    record is searched again, the log says why, and the database is rewritten."""
    from ctc.backends.hls.tune import tune_plan, tuning_db_path

    layers = {"y": QLinearShape(16, 64, 32, 8, 8, -1, True, (20, 64))}
    board = BOARDS["zc706"]
    plan, _ = tune_plan(layers, board, 0.8, cache_dir=tmp_path)
    path = tuning_db_path(board, 0.8, tmp_path)
    good = json.loads(path.read_text())
    key = layers["y"].key
    for damage, said in (('{"broken', "cannot be read"), ("[1, 2]", "cannot be read"),
                         (json.dumps({key: {**good[key], "tiling": [3, 64, 32, 8, 8]}}), "is unusable (tiles 3x64"),
                         (json.dumps({key: {**good[key], "tiling": [0, 64, 32, 8, 8]}}), "is unusable (tiling"),
                         (json.dumps({key: {**good[key], "tiling": "16x16"}}), "is unusable (malformed")):
        path.write_text(damage)
        lines: list[str] = []
        again, info = tune_plan(layers, board, 0.8, cache_dir=tmp_path, log=lines.append)
        assert info["searched"] == 1 and again == plan, damage
        assert any(said in ln for ln in lines), (damage, lines)
        assert json.loads(path.read_text())[key]["tiling"] == good[key]["tiling"]


def test_a_design_without_data_fits_the_models_positions(tmp_path: Path) -> None:
    """`target fpga` on a 64-position BERT with no calibrate/evaluate data was built for 128 tokens and died in TVM
    ('broadcast_to ... 128 ... 64'); it is built for the model's 64, and a seq_len past them is a LoweringError."""
    from hf_configs import captured

    from ctc.backends.tvm.lower import LoweringError

    _, m = captured("bert")  # max_position_embeddings 64
    opts = {"board": "zc706", "csim": False, "tune": False}
    s = build_target(m, TargetConfig("fpga", FpgaOptions.from_dict(opts)), tmp_path / "a", example_inputs=None)
    assert s["static_dims"] == {"batch": 1, "seq": 64}
    with pytest.raises(LoweringError, match=r"seq_len=100, but the model takes at most 64 positions .*seq_len <= 64"):
        build_target(m, TargetConfig("fpga", FpgaOptions.from_dict({**opts, "seq_len": 100})), tmp_path / "b",
                     example_inputs=None)
