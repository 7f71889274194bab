"""More tokens than the model has positions: a clear error before any kernel runs, not a read past the
position table (an any-length MiniLM library crashed the process on 513 tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ctc.errors import UsageError
from ctc.positions import check_symbol_limits, config_positions


def test_positions_are_read_from_the_config(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    assert config_positions(cfg) is None  # no file
    cfg.write_text(json.dumps({"n_positions": 1024, "hidden_size": 8}))
    assert config_positions(cfg) == (1024, f"n_positions in {cfg}")
    cfg.write_text(json.dumps({"max_position_embeddings": 512, "n_positions": 9}))  # the first key wins
    assert config_positions(cfg)[0] == 512
    for broken in ("{not json", json.dumps({"max_position_embeddings": True}), json.dumps([512])):
        cfg.write_text(broken)
        assert config_positions(cfg) is None


def test_a_sequence_over_the_limit_is_refused_by_name() -> None:
    limits = {"seq": (512, "max_position_embeddings in X/config.json")}
    check_symbol_limits(limits, {"seq": (512, "input_ids"), "batch": (4, "input_ids")})  # at the limit: fine
    with pytest.raises(UsageError, match=r"input 'input_ids' has seq = 513, but the model has 512 positions "
                                         r"\(max_position_embeddings in X/config.json\); cut the input to at most 512"):
        check_symbol_limits(limits, {"seq": (513, "input_ids")})
    check_symbol_limits({}, {"seq": (10**6, "input_ids")})  # no limit known


class _LearnedPositions(torch.nn.Module):
    """GPT-2's form: a learned table read at ``arange(seq)``."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(50, 8)
        self.pos = torch.nn.Embedding(12, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1]))


class _SlicedPositions(torch.nn.Module):
    """BERT's form: a ``position_ids`` buffer sliced to the sequence length, then looked up."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(50, 8)
        self.pos = torch.nn.Embedding(20, 8)
        self.register_buffer("position_ids", torch.arange(20).unsqueeze(0), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok(input_ids) + self.pos(self.position_ids[:, : input_ids.shape[1]])


@pytest.mark.parametrize(("net", "limit", "why"), [(_LearnedPositions, 12, "12 rows, at positions"),
                                                   (_SlicedPositions, 20, "slices axis 1 of")])
def test_the_ir_gives_the_limit_when_no_config_does(tmp_path: Path, net: type, limit: int, why: str) -> None:
    """A model without a Hugging Face config (a user's own module): the position table's size comes from the IR,
    and an any-length library refuses a longer input instead of reading past the table."""
    from ctc.backends.tvm.build import compile_module, load, load_compiled
    from ctc.frontends.aten_capture import capture
    from ctc.positions import ir_symbol_limits

    torch.manual_seed(0)
    model = net().eval()
    m = capture(model, {"input_ids": torch.randint(0, 50, (1, 6))})
    (sym, (got, text)), = ir_symbol_limits(m).items()
    assert (sym, got) == ("seq", limit) and why in text
    compile_module(m).export(tmp_path / "lib")
    lib = load(tmp_path / "lib", m)
    ids = torch.randint(0, 50, (1, limit))
    torch.testing.assert_close(lib({"input_ids": ids})[0], model(ids))  # the whole table: fine
    with pytest.raises(UsageError, match=rf"has seq = {limit + 1}, but the model has {limit} positions"):
        lib({"input_ids": torch.randint(0, 50, (1, limit + 1))})
    # the compiled runner also keeps token ids inside the embedding (it would read past the table) and names
    # what is missing
    with pytest.raises(UsageError, match=r"input 'input_ids' holds token ids in \[3, 50\]; the embedding has 50 rows"):
        lib({"input_ids": torch.tensor([[3, 50]])})
    with pytest.raises(UsageError, match=r"missing input 'input_ids': the compiled model takes input_ids"):
        lib({"ids": ids})
    with pytest.raises(UsageError, match=r"the compiled model takes 1 inputs \(input_ids\), got 2"):
        lib(ids, ids)
    # the library carries its bounds (model.json): loaded directly, without the IR, it refuses the same inputs
    direct = load_compiled(tmp_path / "lib")
    with pytest.raises(UsageError, match=rf"has seq = {limit + 1}, but the model has {limit} positions"):
        direct({"input_ids": torch.randint(0, 50, (1, limit + 1))})
    with pytest.raises(UsageError, match=r"holds token ids in \[3, 50\]"):
        direct({"input_ids": torch.tensor([[3, 50]])})
    # a library written before model.json carried them: the artifact's IR gives them at load
    meta_file = tmp_path / "lib" / "model.json"
    meta = json.loads(meta_file.read_text())
    del meta["index_bounds"], meta["symbol_limits"]
    meta_file.write_text(json.dumps(meta))
    assert load_compiled(tmp_path / "lib")._index_checks == []
    old = load(tmp_path / "lib", m)
    with pytest.raises(UsageError, match=rf"has seq = {limit + 1}, but the model has {limit} positions"):
        old({"input_ids": torch.randint(0, 50, (1, limit + 1))})
    with pytest.raises(UsageError, match=r"holds token ids in \[3, 50\]"):
        old({"input_ids": torch.tensor([[3, 50]])})


def test_limits_need_one_symbol_with_a_positive_coefficient() -> None:
    from ctc.positions import _affine

    assert _affine("seq") == ("seq", 1, 0)
    assert _affine("2*seq + 3") == ("seq", 2, 3)
    assert _affine("past + seq") is None and _affine("-seq + 9") is None and _affine(7) is None


def test_real_gpt2_positions_are_bounded_without_a_config() -> None:
    """transformers' GPT-2 looks its learned positions up at ``arange(seq) + past`` (0): the IR still bounds seq."""
    from transformers import GPT2Config, GPT2Model

    from ctc.frontends.aten_capture import capture
    from ctc.positions import index_bounds, ir_symbol_limits

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=50, n_positions=24, n_embd=16, n_layer=1, n_head=2, use_cache=False,
                                 bos_token_id=0, eos_token_id=0)).eval()
    m = capture(model, {"input_ids": torch.randint(0, 50, (1, 6))}, output="last_hidden_state")
    assert ir_symbol_limits(m)["seq"][0] == 24
    assert index_bounds(m) == {"input_ids": (50, "token ids")}


def test_nan_logits_of_a_persistent_step_are_an_error_not_tokens() -> None:
    """The persistent CUDA step writes NaN logits when it could not run: the runner raises, naming the fix."""
    from ctc.backends.tvm.cuda_decode_stack import check_logits
    from ctc.errors import ComputeError

    check_logits(torch.tensor([[0.5, float("nan"), 1.0]]))  # a NaN among real logits is not the step's sign
    with pytest.raises(ComputeError, match=r"did not run.*persistent=false"):
        check_logits(torch.full((1, 1, 8), float("nan")))
