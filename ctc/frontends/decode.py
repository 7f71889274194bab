"""One decode step of a Hugging Face causal LM as a module over plain tensors.

Why: generation runs one token at a time against a KV cache, and that step is what a deployed
decoder executes thousands of times.  HF models keep the cache in a ``Cache`` object, which a
graph cannot take as an input; :func:`decode_step` wraps the model so the step's inputs are
``input_ids [B, T]``, ``attention_mask [B, P + T]`` and one ``past_k_i`` / ``past_v_i``
tensor ``[B, kv_heads, P, head_dim]`` per layer, and its outputs are the logits followed by the
grown caches (``[B, kv_heads, P + T, head_dim]``, same order).  ``capture(decode_step(model),
decode_inputs(model, past=P))`` then gives a ctc module of that step.

:func:`static_decode_step` is the form a deployed decoder runs: the caches are preallocated
``[B, kv_heads, max_len, head_dim]`` buffers and a ``position [T]`` input says where the new
tokens go.  Each layer's cache update is one ``cache_write`` op (torch op ``ctc::cache_write``
while tracing), attention reads the whole buffer under a mask ``key <= position``, and the
outputs are the logits and the written caches.  Shapes never change from step to step, so a
backend can update the buffers in place and replay a step (a CUDA graph, say);
:mod:`ctc.generate` runs the generation loop over such a step.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

__all__ = ["DecodeStep", "StaticDecodeStep", "cache_names", "decode_inputs", "decode_step", "kv_cache_shape",
           "prefilled_inputs", "static_cache_names", "static_decode_inputs", "static_decode_step",
           "static_prefilled_inputs", "step_float_outputs", "step_inputs"]


def _layers(config: Any) -> int:
    return int(config.num_hidden_layers)


def _kv_heads(config: Any) -> int:
    """Key/value heads: ``num_key_value_heads``; else Falcon's spelling (``multi_query`` on its original
    architecture is one kv head, ``num_kv_heads`` on the new one); else one per attention head."""
    kv = getattr(config, "num_key_value_heads", None)
    if kv:
        return int(kv)
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        return 1
    return int(getattr(config, "num_kv_heads", None) or config.num_attention_heads)


def kv_cache_shape(config: Any, past: int, batch: int = 1) -> tuple[int, int, int, int]:
    """``[batch, kv_heads, past, head_dim]`` of one layer's cached keys (and values)."""
    heads = int(config.num_attention_heads)
    kv_heads = _kv_heads(config)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return (batch, kv_heads, past, head_dim)


def cache_names(config: Any) -> list[str]:
    """Input names of the cache tensors, in order: past_k_0, past_v_0, past_k_1, ..."""
    return [f"past_{t}_{i}" for i in range(_layers(config)) for t in "kv"]


class DecodeStep(nn.Module):
    """``forward(input_ids, attention_mask, past_k_0, past_v_0, ...) -> (logits, k_0, v_0, ...)``.

    The past tensors are put into an HF ``DynamicCache``; the outputs are the logits of the new
    tokens and every layer's keys and values with the new tokens appended.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not hasattr(model, "config") or not hasattr(model.config, "num_hidden_layers"):
            raise TypeError(f"decode_step needs a Hugging Face causal LM (got {type(model).__name__} with no "
                            "config.num_hidden_layers)")
        self.model = model
        self.n_layers = _layers(model.config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        if len(past) != 2 * self.n_layers:
            raise TypeError(f"decode step takes {2 * self.n_layers} cache tensors (k and v for "
                            f"{self.n_layers} layers), got {len(past)}")
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)],
                             config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        res = [out.logits]
        for layer in out.past_key_values.layers:
            res += [layer.keys, layer.values]
        return tuple(res)


def _with_named_forward(step: nn.Module, names: list[str], label: str) -> Any:
    """``step`` with a ``forward`` whose signature names every input (``torch.export`` and
    :func:`ctc.frontends.capture` bind inputs by parameter name); calls the class's positional forward."""
    base = type(step).forward
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ["self", *names]]
    sig = inspect.Signature(params)

    def forward(self: nn.Module, *args: torch.Tensor, **kwargs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        bound = sig.bind(self, *args, **kwargs)
        vals = [bound.arguments[n] for n in names]
        return base(self, vals[0], vals[1], *vals[2:])

    forward.__signature__ = sig  # type: ignore[attr-defined]
    step.__class__ = type(f"{type(step.model).__name__}{label}", (type(step),), {"forward": forward})
    return step


def decode_step(model: nn.Module) -> DecodeStep:
    """``model`` wrapped as a :class:`DecodeStep` whose ``forward`` signature names every cache tensor."""
    return _with_named_forward(DecodeStep(model).eval(), ["input_ids", "attention_mask", *cache_names(model.config)],
                               "DecodeStep")


def decode_inputs(model_or_config: Any, past: int, *, batch: int = 1, new_tokens: int = 1,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Example inputs of one step: random token ids, an all-ones mask over ``past + new_tokens``
    positions and random caches of ``past`` positions (fixed ``seed``)."""
    config = getattr(model_or_config, "config", model_or_config)
    if past < 1 or new_tokens < 1 or batch < 1:
        raise ValueError(f"decode_inputs: past, new_tokens and batch must be >= 1 (got {past}, {new_tokens}, "
                         f"{batch})")
    g = torch.Generator().manual_seed(seed)
    ins = {"input_ids": torch.randint(0, int(config.vocab_size), (batch, new_tokens), generator=g),
           "attention_mask": torch.ones(batch, past + new_tokens, dtype=torch.long)}
    shape = kv_cache_shape(config, past, batch)
    for name in cache_names(config):
        ins[name] = torch.randn(*shape, generator=g)
    return ins


@torch.no_grad()
def prefilled_inputs(model: nn.Module, token_ids: torch.Tensor, past: int) -> dict[str, torch.Tensor]:
    """Real inputs of one step: the model prefills ``token_ids[:, :past]`` and the step decodes
    ``token_ids[:, past]`` on that cache.  For calibrating and evaluating a captured step on
    text (random caches, as :func:`decode_inputs` makes, have the wrong activation ranges)."""
    if token_ids.dim() != 2 or token_ids.shape[1] < past + 1 or past < 1:
        raise ValueError(f"prefilled_inputs: need token ids [B, >= past + 1] with past >= 1, got "
                         f"{tuple(token_ids.shape)} and past={past}")
    cache = model(token_ids[:, :past], use_cache=True).past_key_values
    b = token_ids.shape[0]
    ins = {"input_ids": token_ids[:, past:past + 1],
           "attention_mask": torch.ones(b, past + 1, dtype=torch.long)}
    for i, layer in enumerate(cache.layers):
        ins[f"past_k_{i}"] = layer.keys
        ins[f"past_v_{i}"] = layer.values
    return ins


# ----------------------------------------------------------------------------- preallocated caches
@torch.library.custom_op("ctc::cache_write", mutates_args=())
def _cache_write(cache: torch.Tensor, update: torch.Tensor, position: torch.Tensor, axis: int) -> torch.Tensor:
    """Traced stand-in of the ctc ``cache_write`` op (functional: returns the written cache)."""
    return cache.index_copy(axis, position, update)


@_cache_write.register_fake
def _cache_write_fake(cache: torch.Tensor, update: torch.Tensor, position: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.empty_like(cache)


def static_cache_names(config: Any) -> list[str]:
    """Input names of the preallocated cache buffers: cache_k_0, cache_v_0, cache_k_1, ..."""
    return [f"cache_{t}_{i}" for i in range(_layers(config)) for t in "kv"]


def _position_cache(tensors: list[torch.Tensor], position: torch.Tensor, config: Any) -> Any:
    """An HF cache whose ``update`` writes the new keys/values into the given buffers at ``position``."""
    from transformers import DynamicCache

    class PositionCache(DynamicCache):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            k = torch.ops.ctc.cache_write(tensors[2 * layer_idx], key_states, position, 2)
            v = torch.ops.ctc.cache_write(tensors[2 * layer_idx + 1], value_states, position, 2)
            tensors[2 * layer_idx], tensors[2 * layer_idx + 1] = k, v
            return k, v

    return PositionCache(config=config)


class StaticDecodeStep(nn.Module):
    """``forward(input_ids [B, T], position i64 [T], cache_k_0, cache_v_0, ...) -> (logits, cache_k_0', ...)``.

    The caches are ``[B, kv_heads, max_len, head_dim]``; the new tokens' keys and values are
    written at ``position`` and attention sees the keys at positions ``<= position[t]`` (rows
    beyond hold stale or zero values and are masked).  Sequences of a batch share positions.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not hasattr(model, "config") or not hasattr(model.config, "num_hidden_layers"):
            raise TypeError(f"static_decode_step needs a Hugging Face causal LM (got {type(model).__name__} with no "
                            "config.num_hidden_layers)")
        self.model = model
        self.n_layers = _layers(model.config)

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor, *caches: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        if len(caches) != 2 * self.n_layers:
            raise TypeError(f"static decode step takes {2 * self.n_layers} cache buffers (k and v for "
                            f"{self.n_layers} layers), got {len(caches)}")
        max_len = caches[0].shape[2]
        keys = torch.arange(max_len, device=position.device)
        mask = (keys.unsqueeze(0) <= position.unsqueeze(1)).unsqueeze(0).unsqueeze(0)  # [1, 1, T, max_len]
        tensors = list(caches)
        cache = _position_cache(tensors, position, self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position.unsqueeze(0),
                         past_key_values=cache, use_cache=True)
        return (out.logits, *tensors)


def static_decode_step(model: nn.Module) -> StaticDecodeStep:
    """``model`` wrapped as a :class:`StaticDecodeStep` whose ``forward`` names every input (input_ids,
    position, cache_k_0, cache_v_0, ...), as ``torch.export`` binds them."""
    return _with_named_forward(StaticDecodeStep(model).eval(),
                               ["input_ids", "position", *static_cache_names(model.config)], "StaticDecodeStep")


def static_decode_inputs(model_or_config: Any, max_len: int, *, position: int = 0, batch: int = 1,
                         new_tokens: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32,
                         random_cache: bool = True) -> dict[str, torch.Tensor]:
    """Example inputs of one static step: random token ids, ``position = [position, ...]`` for
    ``new_tokens`` tokens, and ``max_len``-long cache buffers (random, or zeros)."""
    config = getattr(model_or_config, "config", model_or_config)
    if max_len < 1 or batch < 1 or new_tokens < 1 or not 0 <= position <= max_len - new_tokens:
        raise ValueError(f"static_decode_inputs: need max_len, batch, new_tokens >= 1 and 0 <= position <= "
                         f"max_len - new_tokens (got max_len={max_len}, batch={batch}, new_tokens={new_tokens}, "
                         f"position={position})")
    g = torch.Generator().manual_seed(seed)
    ins = {"input_ids": torch.randint(0, int(config.vocab_size), (batch, new_tokens), generator=g),
           "position": torch.arange(position, position + new_tokens, dtype=torch.long)}
    shape = kv_cache_shape(config, max_len, batch)
    for name in static_cache_names(config):
        ins[name] = (torch.randn(*shape, generator=g) if random_cache else torch.zeros(*shape)).to(dtype)
    return ins


@torch.no_grad()
def static_prefilled_inputs(model: nn.Module, token_ids: torch.Tensor, max_len: int) -> dict[str, torch.Tensor]:
    """Real inputs of one static step: the model prefills ``token_ids[:, :-1]`` into ``max_len``-long
    cache buffers (zeros beyond) and the step decodes the last token at its position.  For
    calibrating and evaluating a captured static step on text."""
    if token_ids.dim() != 2 or token_ids.shape[1] < 2:
        raise ValueError(f"static_prefilled_inputs: need token ids [B, >= 2], got {tuple(token_ids.shape)}")
    past = token_ids.shape[1] - 1
    if past >= max_len:
        raise ValueError(f"static_prefilled_inputs: {token_ids.shape[1]} tokens need {past + 1} cache positions; "
                         f"the step holds {max_len} (use a shorter seq_len or a longer decode cache)")
    ins = prefilled_inputs(model, token_ids, past)
    dtype = next(model.parameters()).dtype
    out = {"input_ids": ins["input_ids"], "position": torch.tensor([past], dtype=torch.long)}
    for i in range(_layers(model.config)):
        for t in "kv":
            c = ins[f"past_{t}_{i}"]
            buf = torch.zeros(*c.shape[:2], max_len, c.shape[3], dtype=dtype)
            buf[:, :, :past] = c.to(dtype)
            out[f"cache_{t}_{i}"] = buf
    return out


def step_inputs(module: Any, batch: Any) -> Any:
    """``batch`` as ``module`` takes it.  Batches of a decode step carry float caches
    (:func:`static_prefilled_inputs`); after ``kv-cache-quant`` the step reads each cache as integers
    plus scales.  A float cache given for such an input is stored the way the step's
    ``quant_cache_write`` stores rows (:func:`ctc.ir.quant.quantize_kv`, row by row, so exactly what
    the step would have written); anything else is returned as given."""
    from ctc.ir import quant as Q

    if not hasattr(batch, "get"):
        return batch
    out = None
    for n in module.nodes:
        if n.op != "quant_cache_write":
            continue
        cache, scale = n.operand("cache"), n.operand("scale")
        given = batch.get(cache.name)
        if (cache.producer is not None or scale.producer is not None or scale.name in batch
                or not isinstance(given, torch.Tensor) or not given.is_floating_point()):
            continue
        out = dict(batch) if out is None else out
        out[cache.name], out[scale.name] = Q.quantize_kv(given, int(n.attr("bits")), int(n.attr("group_size")))
    return batch if out is None else out


def step_float_outputs(module: Any, outputs: list[Any]) -> list[Any]:
    """``module``'s outputs with each written integer cache and its scales (``kv-cache-quant``) read back as
    one float cache, so they line up with the float step's outputs."""
    from ctc.ir import quant as Q

    out: list[Any] = []
    vals = list(module.outputs)
    i = 0
    while i < len(outputs):
        p = vals[i].producer if i < len(vals) else None
        if (p is not None and p.op == "quant_cache_write" and vals[i] is p.outputs[0] and i + 1 < len(vals)
                and vals[i + 1] is p.outputs[1]):
            out.append(Q.dequantize_kv(outputs[i], outputs[i + 1], int(p.attr("bits")), int(p.attr("group_size"))))
            i += 2
        else:
            out.append(outputs[i])
            i += 1
    return out
