"""The inspect.stack speed-up used while tuning is scoped: the process sees the original afterwards."""

from __future__ import annotations

import inspect

import pytest

from ctc.backends.tvm import tuning


def test_fast_inspect_stack_is_restored_after_the_block_and_on_errors():
    original = inspect.stack
    with tuning.fast_inspect_stack():
        assert inspect.stack is not original
        frames = inspect.stack()
        assert frames[0].function == "test_fast_inspect_stack_is_restored_after_the_block_and_on_errors"
    assert inspect.stack is original
    with pytest.raises(RuntimeError), tuning.fast_inspect_stack():
        raise RuntimeError("tuning failed")
    assert inspect.stack is original


def test_tuning_databases_live_under_the_one_cache_dir(monkeypatch, tmp_path):
    from ctc.backends.tvm import targets
    from ctc.cache import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(targets, "target_key", lambda info: "llvm-test-1c")
    assert tuning.tuning_dir(object()) == default_cache_dir() / "tuning" / "llvm-test-1c"
    assert default_cache_dir() == tmp_path / "ctc"
    assert tuning.tuning_dir(object(), tmp_path / "db") == tmp_path / "db" / "llvm-test-1c"
