"""The ``calibrate-attention`` pass (ACT): head search on a tiny captured Llama, its report, the
module it leaves, options and errors; and the interpreter's resumable ``Execution`` it runs on."""

from __future__ import annotations

import pytest
import torch
from hf_configs import captured, hf_inputs

from ctc.eval.objectives import lm_objective
from ctc.ir import interpret
from ctc.ir.graph import IRError
from ctc.ir.interpreter import Execution
from ctc.passes import PassError, get_pass
from ctc.passes.manager import PassManager, Step


def _run(module, options, calibration=None):
    pm = PassManager([Step(get_pass("calibrate-attention")(options))], calibration=calibration or [],
                     progress=False, fidelity=False)
    out, report = pm.run(module)
    return out, report.records[0]


def _calibration():
    return [hf_inputs(2, 12, seed=s) for s in (1, 2)]


def test_execution_resumes_forks_and_overrides():
    _, m = captured("llama")
    feed = hf_inputs(1, 7, seed=3)
    ref = interpret(m, feed)[0]
    attn = [n for n in m.nodes if n.op == "scaled_dot_product_attention"]
    idx = m.nodes.index(attn[1])
    run = Execution(m, feed)
    run.run_to(idx)
    a, b = run.fork(), run.fork()
    torch.testing.assert_close(a.finish()[0], ref, rtol=0, atol=0)
    zeroed = b.finish({attn[1]: lambda args: [torch.zeros_like(args[0])]})[0]
    assert not torch.allclose(zeroed, ref)
    torch.testing.assert_close(run.finish()[0], ref, rtol=0, atol=0)  # forks leave the original untouched
    late = Execution(m, feed)
    late.run_to(5)
    with pytest.raises(IRError, match="already at node 5"):
        late.run_to(3)


def test_head_search_chooses_heads_that_lower_the_loss():
    _, m = captured("llama")
    calib = _calibration()
    out, rec = _run(m, {"task": "lm", "threshold": 1.0, "budget": 6}, calib)
    met = rec.metrics
    assert met["task"] == "lm" and met["heads_evaluated"] == 6
    assert len({c["loss_alone"] for c in met["candidates"]}) > 1  # the trials really change the model
    assert met["heads"], "the search should find a head that helps on its own calibration data"
    base, after = met["loss_before"], met["loss_after"]
    assert after <= base
    obj = lm_objective(calib)
    # the reported losses are the module's: before on the input module, after on the output module
    assert obj.loss([interpret(m, b)[0] for b in calib]) == pytest.approx(base, rel=1e-9)
    assert obj.loss([interpret(out, b)[0] for b in calib]) == pytest.approx(after, rel=1e-5)
    cal = [n for n in out.nodes if n.op == "calibrated_attention"]
    chosen = {(h["scope"], h["head"]) for h in met["heads"]}
    assert {(n.scope, h) for n in cal for h in n.attrs["heads"]} == chosen
    for h in met["heads"]:
        assert h["loss_alone"] < base and h["loss_added"] < base
    for n in cal:
        assert n.attrs["beta"] == 0.4 and n.attrs["threshold"] == 1.0 and n.attrs["keep_first"]
    # candidates are ranked by the sink mass calibration moves, most first
    masses = [c["sink_mass"] for c in met["candidates"]]
    assert masses == sorted(masses, reverse=True) and all(x > 0 for x in masses)
    assert any("chose" in line for line in rec.notes)


def test_search_without_confirm_and_with_a_high_bar():
    _, m = captured("llama")
    out, rec = _run(m, {"task": "lm", "threshold": 1.0, "budget": 4, "confirm": False}, _calibration())
    assert rec.metrics["heads"] and all(h["loss_added"] is None for h in rec.metrics["heads"])
    out2, rec2 = _run(m, {"task": "lm", "threshold": 1.0, "budget": 4, "min_gain": 0.5}, _calibration())
    assert rec2.metrics["heads"] == [] and not any(n.op == "calibrated_attention" for n in out2.nodes)


def test_a_threshold_no_row_reaches_changes_nothing():
    _, m = captured("llama")
    out, rec = _run(m, {"task": "lm", "threshold": 1000.0}, _calibration())
    assert rec.metrics["heads_evaluated"] == 0 and rec.metrics["heads"] == []
    assert not any(n.op == "calibrated_attention" for n in out.nodes)


@pytest.mark.parametrize("options,calibration,msg", [
    ({"task": "lm"}, None, "add a `calibrate wiki"),
    ({"task": "polarity"}, None, "names no tokenizer folder"),
])
def test_missing_data_is_a_clear_error(options, calibration, msg):
    _, m = captured("llama")
    m = m.clone()
    m.meta.pop("tokenizer_dir", None)
    m.meta.pop("source", None)
    with pytest.raises(Exception, match=msg):
        _run(m, options, calibration)


@pytest.mark.parametrize("options,msg", [
    ({"beta": 1.5}, "above its maximum"),
    ({"threshold": 0.5}, "below its minimum"),
    ({"task": "sst2"}, "must be one of"),
    ({"budget": 0}, "below its minimum"),
    ({"betta": 0.4}, "did you mean 'beta'"),
])
def test_bad_options(options, msg):
    with pytest.raises(PassError, match=msg):
        get_pass("calibrate-attention")(options)


def test_similarity_documents_are_cut_to_the_models_positions(tmp_path):
    """task=similarity tokenizes Lee documents up to 256 tokens; an encoder with fewer positions (here 64) failed
    inside the interpreter ('expand ... 106 must match 64', exit 4).  They are cut to the model's positions."""
    import shutil

    from transformers import BertConfig, BertModel

    from ctc.bundled import bundled_model_dir
    from ctc.cli import main

    torch.manual_seed(0)
    BertModel(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64)).save_pretrained(tmp_path / "bert")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(bundled_model_dir("minilm") / f, tmp_path / "bert")
    recipe = tmp_path / "act.ctc"
    recipe.write_text('model hf "bert"\npipeline {\n    calibrate-attention task=similarity samples=6 budget=1\n}\n')
    assert main(["compile", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0


def test_encoders_find_sinks_by_acts_column_statistic_and_decoders_by_row(monkeypatch):
    """ACT's sink statistic is a key's attention averaged over the queries that see it; the pass uses it
    wherever attention is not causal (detect=auto), and each query's own row on a causal LM, where the
    column would let a token's output depend on later tokens (asking for it there is an error)."""
    from ctc.eval.objectives import Objective
    from ctc.ir.ops.compress_attention import calibrate_rows, masked_logits
    from ctc.passes.calibrate_attention import CalibrateAttentionPass

    _, bert = captured("bert")
    feeds = [{k: v for k, v in hf_inputs(2, 7, seed=s).items() if k in {x.name for x in bert.inputs}}
             for s in (1, 2)]
    ref = [interpret(bert, f)[0] for f in feeds]
    # a loss any change of the output lowers: the search then keeps every head that changes something
    obj = Objective("test", "1 - distance from the original output", feeds,
                    lambda outs: 1.0 - sum(float((o - r).square().sum()) for o, r in zip(outs, ref, strict=True)),
                    lambda outs: {})
    monkeypatch.setattr(CalibrateAttentionPass, "_objective", lambda self, module, ctx: obj)
    out, rec = _run(bert, {"threshold": 1.0, "budget": 4, "confirm": False})  # tiny random attention: near uniform
    assert rec.metrics["detect"] == ["column"]
    cal = [n for n in out.nodes if n.op == "calibrated_attention"]
    assert cal and all(n.attrs["detect"] == "column" for n in cal)
    # the reported sink mass is the column rule's, not each row's own
    node = next(n for n in bert.nodes if n.op == "scaled_dot_product_attention" and n.scope == cal[0].scope)
    masses = {"column": 0.0, "row": 0.0}
    rows = 0
    seen: list[list[torch.Tensor]] = []
    for feed in feeds:  # the search's statistic over its inputs, by each rule
        interpret(bert, feed, observer=lambda n, args, outs: seen.append(args) if n is node else None)
        args = seen[-1]
        logits, allowed, _, _ = masked_logits(args[0], args[1], args[3] if len(args) > 3 else None,
                                              node.attrs["is_causal"], node.attrs["scale"])
        a = torch.softmax(logits, -1).nan_to_num(0.0)
        col = (a - calibrate_rows(a, allowed, 0.4, 1.0, True, "column")).clamp_min(0).sum(-1)
        row = (a - calibrate_rows(a, allowed, 0.4, 1.0, True, "row")).clamp_min(0).sum(-1)
        assert not torch.allclose(col, row)
        valid = allowed.any(-1)
        h = cal[0].attrs["heads"][0]
        masses["column"] += float(col[:, h].double().mul(valid[:, h]).sum())
        masses["row"] += float(row[:, h].double().mul(valid[:, h]).sum())
        rows += int(valid[:, 0].sum())
    reported = next(c["sink_mass"] for c in rec.metrics["candidates"]
                    if c["scope"] == cal[0].scope and c["head"] == cal[0].attrs["heads"][0])
    assert reported == pytest.approx(masses["column"] / rows, rel=1e-5)
    assert reported != pytest.approx(masses["row"] / rows, rel=1e-3)

    # the same non-causal attention in a model that generates (a seq2seq decoder's cross-attention): row
    gen = bert.clone()
    gen.meta["task"] = "seq2seq_lm"
    p = get_pass("calibrate-attention")({})
    assert p._detect(gen, next(n for n in gen.nodes if n.op == "scaled_dot_product_attention")) == "row"

    monkeypatch.undo()
    _, llama = captured("llama")
    out2, rec2 = _run(llama, {"task": "lm", "threshold": 1.0, "budget": 2}, _calibration())
    assert rec2.metrics["detect"] == ["row"]
    assert all(n.attrs["detect"] == "row" for n in out2.nodes if n.op == "calibrated_attention")
    with pytest.raises(Exception, match="detect=\"column\" on the causal attention"):
        _run(llama, {"task": "lm", "detect": "column"}, _calibration())
