"""More tokens than the model has positions: a clear error before any kernel runs, not a read past the
position table (an any-length MiniLM library crashed the process on 513 tokens)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ctc.backends.tvm.build import CompiledModel
from ctc.errors import UsageError
from ctc.positions import config_positions


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
    model = SimpleNamespace(symbol_limits={"seq": (512, "max_position_embeddings in X/config.json")})
    CompiledModel._check_limits(model, {"seq": (512, "input_ids"), "batch": (4, "input_ids")})  # at the limit: fine
    with pytest.raises(UsageError, match=r"input 'input_ids' has seq = 513, but the model has 512 positions "
                                         r"\(max_position_embeddings in X/config.json\); cut the input to at most 512"):
        CompiledModel._check_limits(model, {"seq": (513, "input_ids")})
    CompiledModel._check_limits(SimpleNamespace(symbol_limits={}), {"seq": (10**6, "input_ids")})  # no limit known
