"""`.pt2` model files never run code: malicious archives are refused with a reason, and nothing runs.

Each malicious archive is a real ``torch.export.save`` file edited the way an attacker would: a
payload whose unpickling creates a marker directory (``os.mkdir``), placed where torch 2.13's
loader would unpickle it with ``weights_only=False`` or ``pickle.loads``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ctc.cli import EXIT_MODEL, main
from ctc.frontends.hf import ModelLoadError
from ctc.frontends.pt2 import UnsafeModelFile, load_pt2, no_unpickling


class _Payload:
    """Unpickling this calls ``os.mkdir(marker)``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.marker,))


class _M(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.register_buffer("b", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.b + torch.tensor([1.0, 2.0, 3.0, 4.0])


def _good(path: Path) -> Path:
    torch.export.save(torch.export.export(_M().eval(), (torch.randn(1, 4),)), str(path))
    return path


def _rewrite(src: Path, dst: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
    """Copy the archive with ``edit`` applied to {name inside the top folder: bytes}."""
    with zipfile.ZipFile(src) as z:
        names = z.namelist()
        top = names[0].split("/")[0]
        files = {n[len(top) + 1:]: z.read(n) for n in names}
    edit(files)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for n, data in files.items():
            z.writestr(f"{top}/{n}", data)
    return dst


def _torch_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _pickled_weight(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(files: dict[str, bytes]) -> None:
        cfg_name = "data/weights/model_weights_config.json"
        cfg = json.loads(files[cfg_name])
        meta = cfg["config"]["fc.weight"]
        meta["use_pickle"] = True
        files["data/weights/" + meta["path_name"]] = _torch_pickle(_Payload(marker))
        files[cfg_name] = json.dumps(cfg).encode()
    return edit


def _opaque_constant(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(files: dict[str, bytes]) -> None:
        cfg_name = "data/constants/model_constants_config.json"
        cfg = json.loads(files[cfg_name])
        meta = next(iter(cfg["config"].values()))
        meta["path_name"] = "opaque_obj_0"
        payload = pickle.dumps(_Payload(marker))
        # pickle ignores bytes after STOP: pad to whole float32 elements so torch's tensor pre-read accepts it
        files["data/constants/opaque_obj_0"] = payload + b"\0" * (-len(payload) % 4)
        files[cfg_name] = json.dumps(cfg).encode()
    return edit


def _sample_inputs(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(files: dict[str, bytes]) -> None:  # torch retries these with weights_only=False
        files["data/sample_inputs/model.pt"] = _torch_pickle(((_Payload(marker),), {}))
    return edit


def _aoti(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(files: dict[str, bytes]) -> None:
        files["data/aotinductor/model/model.so"] = b"\x7fELF not really"
    return edit


MALICIOUS = {"pickled_weight": (_pickled_weight, "weight 'fc.weight' is stored as a pickled object"),
             "opaque_constant": (_opaque_constant, "is an opaque Python object"),
             "sample_inputs": (_sample_inputs, "example inputs 'data/sample_inputs/model.pt' hold objects other "
                                               "than tensors"),
             "aoti": (_aoti, "is compiled native code")}


def test_a_plain_archive_loads(tmp_path: Path) -> None:
    ep = load_pt2(_good(tmp_path / "ok.pt2"))
    x = torch.randn(1, 4)
    assert torch.allclose(ep.module()(x), ep.module()(x)) and ep.module()(x).shape == (1, 4)


@pytest.mark.parametrize("kind", sorted(MALICIOUS))
def test_malicious_archive_is_refused_and_runs_nothing(kind: str, tmp_path: Path) -> None:
    make, needle = MALICIOUS[kind]
    marker = tmp_path / "PWNED"
    evil = _rewrite(_good(tmp_path / "ok.pt2"), tmp_path / "evil.pt2", make(marker))
    with pytest.raises(UnsafeModelFile, match="never unpickles arbitrary Python objects") as e:
        load_pt2(evil)
    assert needle in str(e.value)
    assert not marker.exists(), "the archive's payload ran"


GUARDED = ["pickled_weight", "opaque_constant", "sample_inputs"]


@pytest.mark.parametrize("kind", GUARDED)
def test_loader_guard_alone_stops_the_payload(kind: str, tmp_path: Path) -> None:
    """Even without ctc's scan, torch.export.load under no_unpickling() cannot run the payload."""
    marker = tmp_path / "PWNED"
    evil = _rewrite(_good(tmp_path / "ok.pt2"), tmp_path / "evil.pt2", MALICIOUS[kind][0](marker))
    with pytest.raises(Exception), no_unpickling():  # noqa: B017 - any refusal will do; the point is no side effect
        torch.export.load(str(evil))
    assert not marker.exists()
    assert torch.load is not None and torch.load.__name__ == "load", "torch.load was not restored"


@pytest.mark.parametrize("kind", GUARDED)
def test_unguarded_torch_would_run_it(kind: str, tmp_path: Path) -> None:
    """The threat is real: torch.export.load on its own runs each payload (so the tests above mean something)."""
    marker = tmp_path / "PWNED"
    evil = _rewrite(_good(tmp_path / "ok.pt2"), tmp_path / "evil.pt2", MALICIOUS[kind][0](marker))
    logging.disable(logging.CRITICAL)  # torch's own fallback warning has a broken format string
    try:
        torch.export.load(str(evil))
    except Exception:  # noqa: BLE001, S110 - what happens after the payload ran does not matter
        pass
    finally:
        logging.disable(logging.NOTSET)
    assert marker.exists()


def test_compile_refuses_with_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "PWNED"
    _rewrite(_good(tmp_path / "ok.pt2"), tmp_path / "evil.pt2", _pickled_weight(marker))
    recipe = tmp_path / "r.ctc"
    recipe.write_text('model pt2 "evil.pt2"\npipeline {\n    dce\n}\n')
    rc = main(["compile", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == EXIT_MODEL, err
    assert f"{recipe}:1:1: error:" in err and "use_pickle" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "x.pt2").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="not a torch.export archive"):
        load_pt2(tmp_path / "x.pt2")


def test_hf_directory_with_a_malicious_bin_is_refused_without_the_unsafe_advice(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Hugging Face directory whose only weights are a pickle holding code: refused before anything runs, and
    the message does not pass on torch's suggestion to retry with weights_only=False."""
    import transformers as T

    cfg = T.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=32)
    model_dir = tmp_path / "bert_pickle"
    model_dir.mkdir()
    cfg.save_pretrained(model_dir)
    marker = tmp_path / "PWNED"
    state = {**T.BertModel(cfg).state_dict(), "payload": _Payload(marker)}
    torch.save(state, model_dir / "pytorch_model.bin")
    recipe = tmp_path / "r.ctc"
    recipe.write_text('model hf "bert_pickle"\npipeline {\n    dce\n}\n')
    rc = main(["compile", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == EXIT_MODEL, err
    assert "arbitrary code" in err and "safetensors" in err and "weights_only" not in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()
