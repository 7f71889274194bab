"""A ctc module back in its Hugging Face layout: which tensor fills each key of the HF model's state dict.

Captured modules keep the Hugging Face module paths as node scopes (``model.layers.3.mlp.up_proj``),
so every weight-reading node knows its HF home: a ``linear`` / ``quant_linear`` /
``lowrank_linear`` at scope ``S`` fills ``S.weight`` (and ``S.bias``), a norm or an embedding
fills its ``weight``/``bias`` operands by name.  What compression changed is undone or carried
over where the HF layout can hold it:

* an RPTQ channel reorder before a linear is folded back into its input columns;
* a low-rank linear ``u @ v`` becomes its dense weight (HF layers are dense);
* parameters shared by several blocks are written once per reader (HF has no cross-layer sharing);
* removed blocks: the remaining blocks are renumbered and the config's layer count updated.

Writers decide what a quantized linear becomes (dense weights for a plain directory,
compressed-tensors' integer tensors for that format) through :class:`LinearHome`.  A layer the
HF architecture cannot express shows up as a mismatch in the writer's load-back check.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ctc.exports import ExportError

__all__ = ["HfLayout", "LinearHome", "hf_layout", "layer_check", "load_back", "write_hf_dir"]

LINEAR_OPS = ("linear", "quant_linear", "lowrank_linear")
_NOT_COPIED = {"config.json", "model.safetensors", "model.safetensors.index.json"}


@dataclass
class LinearHome:
    """The nodes standing for one HF linear module and the module they fill.

    ``node`` is the scope's main linear-like node; ``perm`` the input-channel reorder folded in front of it
    (``x[..., perm]`` is what the node reads), None when it reads the HF input as is.  ``extra`` are the other
    nodes of the same scope between the module's input and output (a FoldGPT per-channel coefficient, a
    recursive LoRA delta added to a shared weight's output): when there are any, the dense weight is that
    whole sub-graph's affine map (:func:`affine_map`)."""

    node: Any
    key: str  # HF module path after block renumbering (keys are key + ".weight", key + ".bias")
    perm: torch.Tensor | None
    extra: list[Any] = field(default_factory=list)
    entry: Any = None  # the activation the scope reads (the HF module's input, before any folded reorder)
    exit: Any = None  # the value the scope gives the rest of the graph (the HF module's output)


@dataclass
class HfLayout:
    """What a writer needs: the HF class and config, the tensors already placed, and the linears to place."""

    cls: type
    config: dict[str, Any]
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    linears: list[LinearHome] = field(default_factory=list)
    transposed: set[str] = field(default_factory=set)  # HF modules storing their weight [in, out] (Conv1D)
    notes: list[str] = field(default_factory=list)
    tied_head: bool = False  # the LM head is the input embedding (HF ties them; lm_head.weight is not written)


def _hf_class(module: Any, config: Mapping[str, Any]) -> type:
    import transformers

    name = module.meta.get("hf_class") or (config.get("architectures") or [None])[0]
    cls = getattr(transformers, str(name), None) if name else None
    if cls is None:
        raise ExportError(f"{module.name}: the Hugging Face class of this model is unknown (captured as "
                          f"{name or 'no HF class'}); only models captured from Hugging Face can be written as one")
    return cls


def _expected(cls: type, config: Mapping[str, Any]) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], set[str]]:
    """Every state-dict key of ``cls`` built from ``config`` (on the meta device: no memory, no weights), and
    the module paths whose weight is stored ``[in, out]`` (GPT-2's ``Conv1D``)."""
    from transformers import AutoConfig
    from transformers.pytorch_utils import Conv1D

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "transformers_version"})
    with torch.device("meta"):
        model = cls(cfg)
    transposed = {name for name, m in model.named_modules() if isinstance(m, Conv1D)}
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}, transposed


def constant_value(module: Any, v: Any, memo: dict[int, torch.Tensor | None] | None = None) -> torch.Tensor | None:
    """The value of ``v`` when it depends on parameters only (a param read, or pure ops over them), else None."""
    from ctc.ir.ops import get_op

    memo = {} if memo is None else memo
    if id(v) in memo:
        return memo[id(v)]
    node = v.producer
    out: torch.Tensor | None = None
    if node is not None:
        if node.op == "param":
            out = module.params[node.attrs["name"]]
        elif get_op(node.op).pure and node.inputs:
            ins = [constant_value(module, x, memo) for x in node.inputs]
            if all(t is not None for t in ins) and not any(isinstance(d, str) for t in node.outputs
                                                            for d in t.type.shape):
                res = get_op(node.op).ref(*ins, **node.attrs)
                res = list(res) if isinstance(res, (list, tuple)) else [res]
                out = res[v.index]
    memo[id(v)] = out
    return out


def _blocks(module: Any) -> tuple[str | None, list[int], int | None]:
    """(block prefix, block indices still present, original block count).

    ``remove-blocks`` leaves ``meta["num_blocks"]`` at the blocks kept and lists the others in
    ``meta["removed_blocks"]``: the original count is their sum (read as the count alone, a removed last block
    went unnoticed and the written config kept a layer the weights do not fill)."""
    prefix = module.meta.get("block_prefix")
    present = sorted({n.block for n in module.nodes if n.block is not None})
    total = module.meta.get("num_blocks")
    removed = module.meta.get("removed_blocks") or []
    return prefix, present, int(total) + len(removed) if total is not None else None


def _renumber(module: Any, config: dict[str, Any], notes: list[str]) -> Callable[[str], str]:
    """Key renaming for removed blocks (``layers.5`` -> ``layers.4`` ...) with the config updated to match."""
    prefix, present, total = _blocks(module)
    if not prefix or total is None or present == list(range(total)) or not present:
        return lambda k: k
    count_key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if config.get(k) == total), None)
    if count_key is None:
        raise ExportError(f"{module.name}: blocks were removed ({total} -> {len(present)}) but the config names no "
                          "layer count to update")
    config[count_key] = len(present)
    for k, v in list(config.items()):
        if isinstance(v, list) and len(v) == total:
            config[k] = [v[i] for i in present]
    new = {old: i for i, old in enumerate(present)}
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)(\.|$)")
    notes.append(f"blocks {sorted(set(range(total)) - set(present))} were removed: the {len(present)} remaining "
                 f"blocks are renumbered and {count_key}={len(present)}")

    def rename(key: str) -> str:
        m = pat.match(key)
        if m is None or int(m.group(1)) not in new:
            return key
        return f"{prefix}.{new[int(m.group(1))]}{key[m.end(1):]}"
    return rename


def hf_layout(module: Any, config: Mapping[str, Any]) -> HfLayout:
    """Place every tensor the module's weight-reading nodes hold into the HF layout of its source model."""
    cfg = json.loads(json.dumps(dict(config)))
    notes: list[str] = []
    rename = _renumber(module, cfg, notes)
    cls = _hf_class(module, cfg)
    expected, transposed = _expected(cls, cfg)
    layout = HfLayout(cls, cfg, expected, transposed=transposed, notes=notes)
    memo: dict[int, torch.Tensor | None] = {}
    embedding_key = None
    homes: dict[str, LinearHome] = {}
    for n in module.nodes:
        if n.op in LINEAR_OPS:
            if not n.scope:
                raise ExportError(f"{module.name}: a {n.op} has no module scope (the model was captured without "
                                  "module paths, e.g. by the torch.fx fallback), so its Hugging Face weight is "
                                  "unknown; capture it with torch.export")
            if n.scope in homes:
                if homes[n.scope].node.op == "lowrank_linear" and n.op != "lowrank_linear":
                    homes[n.scope].node = n  # the main weight; the low-rank delta is an extra
                continue
            key = rename(n.scope)
            if f"{key}.weight" not in expected:
                raise ExportError(f"{module.name}: the {n.op} at {n.scope} has no {cls.__name__} weight "
                                  f"{key}.weight to fill")
            homes[n.scope] = LinearHome(n, key, None)
            continue
        if n.op == "param" or n.op == "channel_permute":
            continue
        for slot, val in n.named_operands().items():
            if isinstance(val, list) or val.producer is None or slot in ("x", "input"):
                continue
            key = f"{rename(n.scope)}.{slot}"
            if key not in expected:
                continue
            t = constant_value(module, val, memo)
            perm = _gathered_input(module, n, memo)
            if t is not None and perm is not None and t.shape[-1:] == perm.shape:
                t = unpermute_columns(t, perm)  # RPTQ's norm route: the norm's weight/bias follow its input gather
            if t is not None:
                layout.tensors[key] = t
                if n.op == "embedding" and embedding_key is None:
                    embedding_key = key
    for home in homes.values():
        _settle_scope(module, home, memo)
        layout.linears.append(home)
    _settle_tied_head(layout, module, embedding_key)
    return layout


def _settle_scope(module: Any, home: LinearHome, memo: dict[int, torch.Tensor | None]) -> None:
    """Find what the HF module's scope reads and gives, its folded reorder and the nodes besides the main one."""
    scope = home.node.scope
    inside = [n for n in module.nodes if n.scope == scope and n.op not in ("param", "channel_permute")
              and not all(constant_value(module, v, memo) is not None for v in n.outputs)]
    made = {id(v) for n in inside for v in n.outputs}
    reads = {id(v): v for n in inside for v in n.inputs
             if id(v) not in made and constant_value(module, v, memo) is None}
    if len(reads) != 1:
        raise ExportError(f"{module.name}: the nodes at {scope} read {len(reads)} activations; a Hugging Face "
                          "linear reads one")
    entry = next(iter(reads.values()))
    p = entry.producer
    if p is not None and p.op == "channel_permute" and constant_value(module, p.operand("perm"), memo) is not None:
        home.perm = constant_value(module, p.operand("perm"), memo).to(torch.int64)  # a reorder folded in front
        entry = p.operand("x")
    elif p is not None and p.op not in LINEAR_OPS:
        home.perm = _gathered_input(module, p, memo)  # a reorder folded into the norm before it (RPTQ's norm route)
    outs = {id(v) for v in module.outputs}
    inside_ids = {id(n) for n in inside}
    exits = [v for n in inside for v in n.outputs
             if id(v) in outs or any(id(u) not in inside_ids for u in v.users)]
    if len(exits) != 1:
        raise ExportError(f"{module.name}: the nodes at {scope} give {len(exits)} values to the rest of the model; "
                          "a Hugging Face linear gives one")
    home.entry, home.exit = entry, exits[0]
    home.extra = [n for n in inside if n is not home.node]


def _gathered_input(module: Any, n: Any, memo: dict[int, torch.Tensor | None]) -> torch.Tensor | None:
    """The reorder RPTQ's norm route folded into norm ``n`` (its input gathered by a constant ``channel_permute``,
    its weight and bias permuted alike, so its output is in the permuted order), else None."""
    if n.op not in ("layer_norm", "rms_norm") or not n.has_operand("x"):
        return None
    p = n.operand("x").producer
    if p is None or p.op != "channel_permute":
        return None
    perm = constant_value(module, p.operand("perm"), memo)
    return None if perm is None else perm.to(torch.int64)


def _settle_tied_head(layout: HfLayout, module: Any, embedding_key: str | None) -> None:
    """Keep ``tie_word_embeddings`` only while the LM head still computes with the embedding's own tensor."""
    head = next((h for h in layout.linears if h.key == "lm_head"), None)
    if head is None or not layout.config.get("tie_word_embeddings"):
        return
    emb = layout.tensors.get(embedding_key) if embedding_key else None
    w = constant_value(module, head.node.operand("weight")) if head.node.op == "linear" else None
    if emb is not None and w is not None and head.perm is None and w.shape == emb.shape and torch.equal(w, emb):
        layout.tied_head = True
        return
    layout.config["tie_word_embeddings"] = False
    layout.notes.append(f"the LM head ({head.node.op}) no longer equals the input embedding: "
                        "written apart with tie_word_embeddings=false")


def dense_weight(module: Any, home: LinearHome) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float ``[N, K]`` weight and bias a linear-like node computes with, in the HF input order
    (writers transpose it for HF modules in :attr:`HfLayout.transposed`)."""
    from ctc.ir import quant as Q

    if home.extra:
        return affine_map(module, home)
    n = home.node
    memo: dict[int, torch.Tensor | None] = {}
    val = lambda slot: constant_value(module, n.operand(slot), memo) if n.has_operand(slot) else None  # noqa: E731
    if n.op == "linear":
        w = val("weight")
    elif n.op == "lowrank_linear":
        w = val("u") @ val("v")
    else:
        k = int(n.operand("x").type.shape[-1])
        w = Q.dequantize_weight(val("qweight"), val("w_scale"), val("w_zero"), int(n.attrs["w_bits"]),
                                int(n.attrs["group_size"]), k)
    if w is None:
        raise ExportError(f"{module.name}: the weight of the {n.op} at {n.scope} is computed from activations; "
                          "a Hugging Face layer cannot hold it")
    bias = val("bias")
    if home.perm is not None:
        w = unpermute_columns(w, home.perm)
    return w, bias


def run_scope(module: Any, home: LinearHome, x: torch.Tensor) -> torch.Tensor:
    """What the scope's nodes compute from ``x`` given as its entry activation (reference semantics); symbolic
    dims in attributes (GPT-2's Conv1D rows ``reshape [batch*seq, in]``) are bound from ``x``'s shape."""
    from ctc.ir.interpreter import _resolve_dims
    from ctc.ir.ops import get_op
    from ctc.ir.symbolic import bind_symbols

    sizes: dict[str, int] = {}
    bind_symbols(home.entry.type.shape, tuple(x.shape), sizes, where=f"{home.node.scope}: ")
    memo: dict[int, torch.Tensor | None] = {}
    nodes = [home.node, *home.extra]
    if home.perm is not None:
        p = home.node.operand("x").producer
        if p is not None and p.op == "channel_permute":
            nodes.append(p)  # the scope's own gather
        else:
            x = x.index_select(-1, home.perm)  # gathered inside the norm before the scope (RPTQ's norm route)
    env = {id(home.entry): x}
    with torch.no_grad():
        for n in sorted(nodes, key=module.nodes.index):
            args = [env[id(v)] if id(v) in env else constant_value(module, v, memo) for v in n.inputs]
            if any(a is None for a in args):
                raise ExportError(f"{module.name}: a {n.op} at {n.scope} reads a value from outside the layer")
            res = get_op(n.op).ref(*args, **_resolve_dims(n, sizes))
            for v, t in zip(n.outputs, res if isinstance(res, (list, tuple)) else [res], strict=True):
                env[id(v)] = t
    return env[id(home.exit)]


def affine_map(module: Any, home: LinearHome, tolerance: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[N, K]`` weight and ``[N]`` bias of the scope's sub-graph, read off its outputs on the zero vector and
    the unit vectors, then checked on random inputs: a sub-graph that is not affine (activations quantized, a
    non-linearity) is an :class:`ExportError`, never a silently different layer."""
    k = int(home.entry.type.shape[-1])
    basis = torch.cat([torch.zeros(1, k), torch.eye(k)]).to(torch.float32)
    lead = (1,) * (len(home.entry.type.shape) - 2)
    y = run_scope(module, home, basis.reshape(*lead, k + 1, k)).reshape(k + 1, -1).to(torch.float32)
    bias, weight = y[0], (y[1:] - y[0]).T.contiguous()
    probe = torch.randn(3, k, generator=torch.Generator().manual_seed(0)) * 3
    got = run_scope(module, home, probe.reshape(*lead, 3, k)).reshape(3, -1).to(torch.float32)
    want = probe @ weight.T + bias
    err = float((got - want).abs().max()) / max(float(got.abs().max()), 1e-12)
    if err > tolerance:
        ops = ", ".join(sorted({n.op for n in [home.node, *home.extra]}))
        raise ExportError(f"{module.name}: the layer at {home.node.scope} ({ops}) is not an affine map of its input "
                          f"(relative deviation {err:.3g}); a Hugging Face linear cannot hold it")
    return weight, bias


def unpermute_columns(w: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``w`` multiplies ``x[..., perm]``; the same weight for ``x`` itself has column ``perm[i]`` = ``w``'s column i."""
    out = torch.empty_like(w)
    out[..., perm] = w
    return out


def complete(layout: HfLayout, tensors: dict[str, torch.Tensor], name: str, source_dir: Path | None,
             stored_otherwise: set[str] | frozenset[str] = frozenset()) -> None:
    """Fill the float keys of the HF model the module does not read (a pooler its outputs skip) from the source
    checkpoint, with a note; any other gap is an error (buffers HF recomputes may be left).  ``stored_otherwise``
    are keys a writer holds in another form (a compressed-tensors linear's ``weight`` is ``weight_packed``)."""
    filled = set(tensors) | set(stored_otherwise) | ({"lm_head.weight"} if layout.tied_head else set())
    missing = [k for k, (_, dt) in layout.expected.items() if k not in filled and dt.is_floating_point]
    original = _source_checkpoint(source_dir) if missing else {}
    carried = [k for k in missing if k in original and tuple(original[k].shape) == layout.expected[k][0]]
    for k in carried:
        tensors[k] = original[k]
    if carried:
        layout.notes.append(f"{len(carried)} tensors the compressed module never reads (e.g. {carried[0]}) are "
                            "copied unchanged from the source checkpoint")
    missing = [k for k in missing if k not in carried]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        where = (f"nor does the source checkpoint in {source_dir}" if source_dir is not None else
                 "and the source model's checkpoint is not at hand (write the export from the recipe with "
                 "`emit FORMAT`, or keep the model directory where the recipe named it)")
        raise ExportError(f"{name}: nothing in the module fills {layout.cls.__name__}'s {shown}, {where}")


def _source_checkpoint(source_dir: Path | None) -> dict[str, torch.Tensor]:
    """The source model's safetensors weights (the folder its tokenizer and config came from), if there."""
    if source_dir is None:
        return {}
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(source_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def write_hf_dir(layout: HfLayout, out_dir: Path, tensors: Mapping[str, torch.Tensor], tokenizer_dir: Path | None,
                 extra_config: Mapping[str, Any] | None = None) -> list[str]:
    """Write ``config.json`` + ``model.safetensors`` (+ the tokenizer files); returns the files written."""
    from safetensors.torch import save_file

    config = {**layout.config, **(extra_config or {})}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    blobs = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    save_file(blobs, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    files = ["config.json", "model.safetensors"]
    if tokenizer_dir is not None:
        for p in sorted(Path(tokenizer_dir).iterdir()):
            if p.is_file() and p.name not in _NOT_COPIED and not p.name.startswith("ctc-"):
                shutil.copy2(p, out_dir / p.name)
                files.append(p.name)
    return files


def load_back(out_dir: Path, cls: type, example: Mapping[str, torch.Tensor], output_names: list[str]
              ) -> tuple[Any, list[torch.Tensor]]:
    """Load ``out_dir`` with transformers (``cls.from_pretrained``, offline) and run it on ``example``: the model
    and its outputs."""
    import os

    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # the load report is checked below instead of printed
    try:
        model, info = cls.from_pretrained(str(out_dir), local_files_only=True, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - transformers' (or a quantization library's) own failure, named
        raise ExportError(f"{cls.__name__}.from_pretrained cannot load the written directory ({type(e).__name__}: "
                          f"{e}); nothing was written. The format needs support for this model in transformers "
                          "(and its quantization library): write another (`emit hf` for float or weight-only "
                          "models, `emit gguf` for Llama-family ones)") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        shown = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:4]))}" + (f" and {len(v) - 4} more"
                                                                                  if len(v) > 4 else "")
                          for k, v in problems.items())
        raise ExportError(f"{cls.__name__}.from_pretrained does not take the written directory as it is ({shown}); "
                          "nothing was written")
    kwargs = dict(example)
    if "use_cache" in cls.forward.__code__.co_varnames:
        kwargs["use_cache"] = False
    with torch.no_grad():
        out = model(**kwargs)
    got = []
    for i, name in enumerate(output_names):
        val = getattr(out, name, None) if not isinstance(out, (tuple, list)) else out[i]
        if val is None:
            raise ExportError(f"{cls.__name__} gives no output {name!r}")
        got.append(val)
    return model, got


def layer_check(module: Any, layout: HfLayout, model: Any, example: Mapping[str, torch.Tensor],
                max_mismatch: float) -> dict[str, Any]:
    """Each linear of the loaded model run on the ctc module's own input to that layer (teacher forcing), its
    output compared with the module's: a wrong weight, scale or zero point changes the outputs of every token,
    an activation rounded the other way at a float tie those of one token.  A layer whose fraction of tokens
    with an output off by more than 1e-5 of its largest magnitude exceeds ``max_mismatch`` is an
    :class:`ExportError`."""
    from ctc.ir.interpreter import value_env

    env = value_env(module, dict(example))
    mods = dict(model.named_modules())
    rows = []
    with torch.no_grad():
        for home in layout.linears:
            mod = mods.get(home.key)
            if mod is None or home.entry is None:
                continue
            ref = env[home.exit.name].to(torch.float32)
            got = mod(env[home.entry.name]).to(torch.float32).reshape(ref.shape)
            scale = max(float(ref.abs().max()), 1e-12)
            off = ((got - ref).abs() > 1e-5 * scale).reshape(-1, ref.shape[-1]).any(dim=-1)  # per token
            rows.append({"layer": home.key, "mismatch": float(off.float().mean()),
                         "relative": float((got - ref).abs().max()) / scale})
    worst = max(rows, key=lambda r: r["mismatch"]) if rows else None
    if worst is not None and worst["mismatch"] > max_mismatch:
        raise ExportError(f"the reloaded {worst['layer']} does not compute the module's layer: "
                          f"{worst['mismatch']:.2%} of the tokens get different outputs from the module's own "
                          f"inputs (allowed "
                          f"{max_mismatch:.2%}, relative error {worst['relative']:.3g}); nothing was written")
    flipped = sum(r["mismatch"] > 0 for r in rows)
    return {"layers": len(rows), "layers_with_differences": flipped,
            "worst_mismatch": worst["mismatch"] if worst else 0.0, "worst_layer": worst["layer"] if worst else None}
