"""Saved ``torch.export`` programs (``.pt2`` files) as a model source, loaded without running code.

Why this is more than ``torch.export.load``: torch's loader (2.13) unpickles arbitrary Python
objects in several places, and an unpickled object can run any code.  Read in
``torch/export/pt2_archive/_package.py`` and ``torch/_export/serde/serialize.py``:

* ``_load_state_dict`` / ``_load_constants``: a weight or tensor constant whose payload config
  says ``use_pickle`` is read with ``torch.load(..., weights_only=False)``;
* ``_load_constants``: ``custom_obj_*`` constants go through ``torch._C._pickle_load_obj``
  (TorchScript objects) and ``opaque_obj_*`` constants through plain ``pickle.loads``;
* ``deserialize_torch_artifact`` (the example inputs ``data/sample_inputs/*.pt``, and the
  state dict and constants of legacy archives) tries ``weights_only=True`` and on *any* failure
  falls back to ``torch.load(..., weights_only=False)``;
* ``load_pt2`` loads ``data/aotinductor/`` entries as compiled shared libraries;
* ``torch.utils._pytree`` imports a module named in the program's JSON (``defaultdict``
  factories, enum classes).

ctc reads the file once, checks the archive's layout and payload configs before torch sees it,
and refuses a file that needs any of the above with a message naming the entry and why.  It
then loads from the checked bytes with those paths shut (``torch.load`` forced to
``weights_only=True``; pickle, TorchScript-object unpickling, AOTInductor loading and new module
imports refused), so a gap in the scan still cannot run code.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from ctc.frontends.hf import ModelLoadError

__all__ = ["UnsafeModelFile", "load_pt2", "no_unpickling", "scan_pt2"]


class UnsafeModelFile(ModelLoadError):
    """A model file that loading would have to unpickle arbitrary objects (or load native code) for."""


_SAVE_HINT = ("ctc loads only archives whose weights, constants and example inputs are plain tensors, "
              "as torch.export.save writes them for ordinary models")


def _refuse(path: str, entry: str, why: str) -> UnsafeModelFile:
    return UnsafeModelFile(f"refusing to load {path!r}: {entry} {why}; ctc never unpickles arbitrary Python "
                           f"objects from a model file (they can run code). {_SAVE_HINT}.")


def _safe_tensors(data: bytes) -> str | None:
    """None if ``data`` (a torch.save payload) loads with ``weights_only=True``, else the reason."""
    import torch

    try:
        torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - the unpickler's refusal names the offending global
        text = str(e).strip().splitlines()
        reason = next((ln.strip() for ln in text if "Unsupported global" in ln or "GLOBAL" in ln), None)
        return reason or (text[0][:200] if text else type(e).__name__)
    return None


def scan_pt2(data: bytes, path: str = "<pt2>") -> None:
    """Check a ``.pt2`` archive's bytes; raise :class:`UnsafeModelFile` (or ModelLoadError for a file
    that is not an archive) naming the entry that would need unpickling or native code."""
    from torch.export.pt2_archive import constants as C

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load exported program {path!r}: not a torch.export archive ({e})") from None
    tops = {PurePosixPath(n).parts[0] for n in names if n and not n.startswith("/")}
    if len(tops) != 1 or any(n.startswith("/") or ".." in PurePosixPath(n).parts for n in names):
        raise ModelLoadError(f"cannot load exported program {path!r}: the archive does not have the layout "
                             "torch.export.save writes (one top-level folder)")
    top = tops.pop()
    inner = {n[len(top) + 1:]: n for n in names if n.startswith(top + "/")}

    def read(name: str) -> bytes:
        return zf.read(inner[name])

    if C.ARCHIVE_FORMAT_PATH not in inner:
        # the torch <= 2.7 layout: state dict, constants and example inputs are torch.save payloads
        for name in sorted(inner):
            if name.endswith(".pt") or name.startswith("serialized_") and not name.endswith(".json"):
                why = _safe_tensors(read(name))
                if why:
                    raise _refuse(path, f"entry {name!r}", f"holds objects other than tensors ({why})")
        return
    for name in sorted(inner):
        if name.startswith(C.AOTINDUCTOR_DIR) or name.startswith(C.EXECUTORCH_DIR) or name.startswith(C.MTIA_DIR):
            raise _refuse(path, f"entry {name!r}", "is compiled native code (AOTInductor/ExecuTorch), which "
                                                    "loading would execute")
        if name.startswith(C.WEIGHTS_DIR) and name.endswith(".pt") or (
                name.startswith(C.CONSTANTS_DIR) and name.endswith(".pt")):
            why = _safe_tensors(read(name))  # legacy weights/constants: torch falls back to weights_only=False
            if why:
                raise _refuse(path, f"entry {name!r}", f"holds objects other than tensors ({why})")
        if name.startswith(C.SAMPLE_INPUTS_DIR):
            why = _safe_tensors(read(name))  # torch falls back to weights_only=False when this fails
            if why:
                raise _refuse(path, f"example inputs {name!r}", f"hold objects other than tensors ({why})")
        if name.startswith(C.XL_MODEL_WEIGHTS_DIR):
            raise _refuse(path, f"entry {name!r}", "uses the external-weights layout, which ctc does not read")
        if name.endswith("_weights_config.json") or name.endswith("_constants_config.json"):
            try:
                config = json.loads(read(name)).get("config", {})
            except (ValueError, AttributeError) as e:
                raise ModelLoadError(f"cannot load exported program {path!r}: {name} is not valid JSON ({e})") from None
            for fqn, meta in (config.items() if isinstance(config, dict) else []):
                meta = meta if isinstance(meta, dict) else {}
                kind = "weight" if "weights" in name else "constant"
                if meta.get("use_pickle"):
                    raise _refuse(path, f"{kind} {fqn!r}", "is stored as a pickled object (use_pickle), which "
                                                           "torch.export.load reads with weights_only=False")
                stored = str(meta.get("path_name", ""))
                if stored.startswith(C.CUSTOM_OBJ_FILENAME_PREFIX):
                    raise _refuse(path, f"{kind} {fqn!r}", "is a TorchScript object, which loading would unpickle")
                if stored.startswith(C.OPAQUE_OBJ_FILENAME_PREFIX):
                    raise _refuse(path, f"{kind} {fqn!r}", "is an opaque Python object, which torch.export.load "
                                                           "reads with pickle.loads")


class _Refused(Exception):
    """Raised inside :func:`no_unpickling` where torch would have unpickled or executed something."""


@contextlib.contextmanager
def no_unpickling() -> Iterator[None]:
    """While active, the torch.export loader cannot unpickle arbitrary objects, load compiled
    code or import modules: ``torch.load`` is forced to ``weights_only=True``; ``pickle.loads``
    in the archive reader, ``torch._C._pickle_load_obj`` and AOTInductor loading raise; pytree
    may only import modules that are already imported."""
    import importlib

    import torch
    import torch.export.pt2_archive._package as package
    import torch.utils._pytree as pytree

    real_load = torch.load

    def weights_only_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(f, *args, **kwargs)

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise _Refused("the archive needs an arbitrary Python object unpickled (or compiled code loaded)")

    class _NoPickle:
        loads = staticmethod(refuse)
        load = staticmethod(refuse)

    class _LoadedOnly:
        @staticmethod
        def import_module(name: str, package_name: str | None = None) -> Any:
            if name in sys.modules:
                return sys.modules[name]
            raise _Refused(f"the archive names module {name!r}, which loading would import")

        def __getattr__(self, attr: str) -> Any:
            return getattr(importlib, attr)

    saved = [(torch, "load", torch.load), (package, "pickle", package.pickle),
             (package, "_load_aoti", package._load_aoti), (torch._C, "_pickle_load_obj", torch._C._pickle_load_obj),
             (pytree, "importlib", pytree.importlib)]
    torch.load = weights_only_load  # type: ignore[assignment]
    package.pickle = _NoPickle()  # type: ignore[assignment]
    package._load_aoti = refuse  # type: ignore[assignment]
    torch._C._pickle_load_obj = refuse  # type: ignore[attr-defined]
    pytree.importlib = _LoadedOnly()  # type: ignore[assignment]
    try:
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


def load_pt2(path: str | Path) -> Any:
    """Load an ``ExportedProgram`` saved with ``torch.export.save`` (capture it with ``capture_loaded``),
    refusing archives that need arbitrary unpickling or native code (:class:`UnsafeModelFile`)."""
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelLoadError(f"cannot load exported program {str(path)!r}: no such file. Save one with "
                             "torch.export.save(torch.export.export(model, args), 'model.pt2').")
    try:
        data = p.read_bytes()  # read once: what is checked is what is loaded
    except OSError as e:
        raise ModelLoadError(f"cannot read exported program {str(path)!r}: {e.strerror}") from None
    scan_pt2(data, str(path))
    try:
        with no_unpickling():
            return torch.export.load(io.BytesIO(data))
    except _Refused as e:
        raise _refuse(str(path), "the archive", f"could not be loaded safely: {e}") from None
    except Exception as e:  # noqa: BLE001 - one paragraph instead of a traceback
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, (_Refused, pickle.UnpicklingError)):
            cause = cause.__context__  # torch retries some failures another way; find the first refusal
        if cause is not None:
            raise _refuse(str(path), "the archive", f"could not be loaded without unpickling arbitrary objects "
                                                    f"({str(cause).strip().splitlines()[0][:200]})") from None
        raise ModelLoadError(f"cannot load exported program {str(path)!r}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}. Is it a file written by "
                             "torch.export.save with this torch version?") from None
