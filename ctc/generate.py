"""Greedy generation over a static decode step (preallocated KV caches), for any backend.

Why: a decoder artifact captured with :func:`ctc.frontends.decode.static_decode_step` runs one token
per call with fixed shapes: ``(input_ids [B, 1], position [1], cache_k_0, cache_v_0, ...) ->
(logits, cache_k_0', ...)``.  The loop here owns the cache buffers and feeds each step's argmax
back as the next token.  It is target-neutral:

* a compiled TVM library (:class:`ctc.backends.tvm.build.CompiledModel`, CPU or CUDA) keeps every
  input in a device buffer that the library updates in place; token id and position are written
  into their buffers between steps, so on CUDA the whole step can be captured once as a CUDA graph
  and replayed (``cuda_graph=True``);
* any other runner is a function ``inputs dict -> outputs`` with the reference's functional
  semantics (the torch backend, the interpreter): the returned caches replace the old ones.

The prompt goes through the same step one token at a time (prefill as decode: simple and exact;
a chunked prefill library is the faster path for long prompts).  Sequences of a batch share
positions (no padding).  Integer (int8/int4) decode on a CPU plugs in as another library with
this signature.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["Generation", "TextGeneration", "generate_text", "greedy_generate", "static_step_signature",
           "step_logits", "teacher_forced_nll"]


@dataclass
class Generation:
    """Generated token ids ``[B, new]`` and how long the decode steps after the prompt took."""

    tokens: torch.Tensor
    prompt_s: float
    decode_s: float

    @property
    def step_ms(self) -> float:
        n = self.tokens.shape[1]
        return 1e3 * self.decode_s / max(n - 1, 1)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (all sequences) per second of decoding after the prompt."""
        n = self.tokens.shape[1]
        return self.tokens.shape[0] * max(n - 1, 1) / self.decode_s if self.decode_s > 0 else float("inf")


_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "i8": torch.int8, "u8": torch.uint8}


def static_step_signature(inputs: Sequence[Mapping[str, Any]]) -> tuple[int, int, list[tuple[str, list[int], str]]]:
    """``(batch, max_len, caches)`` of a static decode step from its input specs (``{"name", "shape",
    "dtype"}``); raises ValueError naming what is missing when it is not one."""
    names = [i["name"] for i in inputs]
    if names[:2] != ["input_ids", "position"] or len(names) < 4 or not all(n.startswith("cache_") for n in names[2:]):
        raise ValueError(f"not a static decode step (inputs input_ids, position, cache_k_0, ...): got {names[:5]}"
                         " -- capture the model with ctc.frontends.decode.static_decode_step")
    shape = list(inputs[0]["shape"])
    if len(shape) != 2 or shape[1] != 1 or not all(isinstance(d, int) for d in shape):
        raise ValueError(f"a decode step takes input_ids [B, 1] with static B, got {shape}")
    caches = [(i["name"], list(i["shape"]), i["dtype"]) for i in inputs[2:]]
    return int(shape[0]), int(caches[0][1][2]), caches


def _signature(step: Any, input_specs: Sequence[Mapping[str, Any]] | None, who: str
               ) -> tuple[int, int, list[tuple[str, list[int], str]]]:
    specs = input_specs if input_specs is not None else getattr(step, "meta", {}).get("inputs")
    if specs is None:
        raise ValueError(f"{who}: give input_specs for a functional step")
    return static_step_signature(specs)


def _token_ids(ids: Any, batch: int, least: int, what: str, length: str) -> torch.Tensor:
    """``ids`` (a tensor, array or nested list) as integer token ids ``[batch, L >= least]``, else a ValueError
    starting with ``what``."""
    if not isinstance(ids, torch.Tensor):
        try:
            arr = np.asarray(ids)
        except (TypeError, ValueError):  # ragged lists
            arr = None
        if arr is None or arr.dtype.kind not in "biuf":
            raise ValueError(f"{what}: token ids must be a tensor, array or nested list of integers")
        ids = torch.from_numpy(arr)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{what}: token ids must be integers, got {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] != batch or ids.shape[1] < least:
        raise ValueError(f"{what} must be [{batch}, {length}>={least}] token ids, got {tuple(ids.shape)}")
    return ids


def greedy_generate(step: Any, prompt_ids: torch.Tensor, max_new_tokens: int, *, cuda_graph: bool = False,
                    input_specs: Sequence[Mapping[str, Any]] | None = None,
                    eos_token_id: int | Sequence[int] | None = None) -> Generation:
    """Greedy decoding of ``max_new_tokens`` after ``prompt_ids [B, P]`` through a static decode ``step``.

    ``step`` is a compiled library (``CompiledModel``: buffers kept on its device, updated in place)
    or a functional ``inputs -> outputs`` callable, then with ``input_specs`` (the module's inputs).
    ``eos_token_id`` (one id or several): stop once every sequence has produced one (the end-of-sequence
    token is kept; a sequence that ended earlier is filled with it); None generates all ``max_new_tokens``.
    """
    batch, max_len, caches = _signature(step, input_specs, "greedy_generate")
    prompt_ids = _token_ids(prompt_ids, batch, 1, "greedy_generate: prompt", "P")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"greedy_generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)  # a numpy integer too
    eos = _eos_ids(eos_token_id)
    total = prompt_ids.shape[1] + max_new_tokens - 1
    if total > max_len:
        raise ValueError(f"greedy_generate: prompt ({prompt_ids.shape[1]}) + {max_new_tokens} new tokens need "
                         f"{total} cache positions (the last new token is not fed back); this step holds {max_len}")
    if cuda_graph and not hasattr(step, "call_device"):
        raise ValueError("greedy_generate: cuda_graph needs a compiled CUDA library")
    write, run, sync = _stepper(step, prompt_ids, caches, cuda_graph)
    return _run_loop(prompt_ids, max_new_tokens, write, run, sync, eos)


@dataclass
class TextGeneration:
    """What :func:`generate_text` made: the new text (without the prompt and without an end-of-sequence token it
    stopped at), the token ids generated (that token included), whether it stopped there, and the timings."""

    text: str
    generation: Generation
    stopped_at_eos: bool
    prompt_tokens: int


def tokenizer_eos_ids(tok: Any) -> list[int] | None:
    """A tokenizer's end-of-sequence token ids (generation stops at one), or None when it names none."""
    eos = getattr(tok, "eos_token_id", None)
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return [int(i) for i in ids] or None


def generate_text(art: Any, prompt: str, max_new_tokens: int, *, target: str | None = None,
                  stop_at_eos: bool = True, count_flag: str | None = None) -> TextGeneration:
    """Greedy continuation of ``prompt`` by a decoder artifact (``model ... decode=LEN``): tokenized with the
    artifact's tokenizer, run through its decode step (``target``'s compiled library, else the torch backend; a
    CUDA library replays the step as a CUDA graph), stopping at the tokenizer's end-of-sequence token unless
    ``stop_at_eos`` is False.  What cannot work (not a decode step, no text, more tokens than the cache holds) is a
    :class:`~ctc.errors.UsageError` saying what to change (``count_flag``: how the caller's user gives the count,
    e.g. ``--generate``; else ``max_new_tokens=``)."""
    def count(n: int) -> str:
        return f"{count_flag} {n}" if count_flag else f"max_new_tokens={n}"

    from ctc.errors import UsageError
    from ctc.tasks import TASK_DECODE_STEP

    if art.module.meta.get("task") != TASK_DECODE_STEP:
        raise UsageError("generation needs a decoder artifact: compile the model with `model ... decode=LEN` "
                         "(one generation step over preallocated KV caches)")
    if not isinstance(prompt, str):
        raise UsageError(f"the prompt is text (a str), got {type(prompt).__name__}: for token ids call "
                         "ctc.generate.greedy_generate")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise UsageError(f"the number of tokens to generate must be an int >= 1, got {max_new_tokens!r}")
    tok = art.tokenizer()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[-1] == 0:
        raise UsageError(f"the prompt {prompt!r} gives no tokens, and generation continues a prompt of at least one "
                         "token: give some text")
    eos = tokenizer_eos_ids(tok) if stop_at_eos else None
    cache = int(art.module.meta.get("decode", {}).get("max_len", 0))
    need = ids.shape[-1] + max_new_tokens - 1
    if cache and need > cache:
        room, fits = cache - ids.shape[-1] + 1, cache - max_new_tokens + 1
        fix = [f"{count(room)} or less" if room >= 1 else "",
               f"a prompt of at most {fits} tokens" if fits >= 1 else ""]
        raise UsageError(f"the prompt is {ids.shape[-1]} tokens and {count(max_new_tokens)} needs {need} cache "
                         f"positions in all, but this decode step holds {cache} (decode={cache} in its recipe): "
                         f"use {', '.join(f for f in fix if f) or 'fewer tokens'}, or compile the model with a "
                         "larger decode=LEN")
    specs = art.module.input_specs()
    if target is not None:
        step = art.runner(target)
        cuda_graph = getattr(step, "device", "cpu") == "cuda"
    else:
        step, cuda_graph = (lambda feed: art.run(feed)), False
    try:
        gen = greedy_generate(step, ids, max_new_tokens, cuda_graph=cuda_graph, input_specs=specs, eos_token_id=eos)
    except ValueError as e:
        raise UsageError(str(e)) from None
    new = gen.tokens[0].tolist()
    stopped = eos is not None and bool(new) and new[-1] in eos
    return TextGeneration(tok.decode(new[:-1] if stopped else new), gen, stopped, int(ids.shape[-1]))


def _eos_ids(eos: int | Sequence[int] | None) -> torch.Tensor | None:
    """``eos_token_id`` as a 1-D int64 tensor (None: no stopping); anything but integer ids is a ValueError."""
    if eos is None:
        return None
    ids = [eos] if isinstance(eos, numbers.Integral) else list(eos) if isinstance(eos, Sequence) else None
    if not ids or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0 for i in ids):
        raise ValueError(f"greedy_generate: eos_token_id must be a token id or a list of them, got {eos!r}")
    return torch.tensor([int(i) for i in ids], dtype=torch.long)


def teacher_forced_nll(step: Any, ids: torch.Tensor, first: int, *,
                       input_specs: Sequence[Mapping[str, Any]] | None = None) -> tuple[float, int]:
    """``(sum of -log p(ids[:, j+1] | ids[:, :j+1]), count)`` over ``first <= j < L - 1``, feeding the
    given tokens ``ids [B, L]`` one per call through a static decode ``step`` (from position 0, fresh
    caches).

    Why: the perplexity of a *deployed* decode step -- its real kernels, its quantized weights and
    its quantized KV cache as written and read step by step -- rather than of a full-sequence graph
    that only simulates the cache.  ``first`` skips the context-only prefix (llama.cpp's perplexity
    scores the second half of each window: ``first = L // 2``)."""
    batch, max_len, caches = _signature(step, input_specs, "teacher_forced_nll")
    ids = _token_ids(ids, batch, 2, "teacher_forced_nll: ids", "L")
    if ids.shape[1] > max_len:
        raise ValueError(f"teacher_forced_nll: {ids.shape[1]} tokens need as many cache positions; "
                         f"this step holds {max_len}")
    if not 0 <= first < ids.shape[1] - 1:
        raise ValueError(f"teacher_forced_nll: first={first} must lie in [0, {ids.shape[1] - 1})")
    write, run, sync = _stepper(step, ids, caches, False)
    nll, count = 0.0, 0
    for t in range(ids.shape[1] - 1):
        write(ids[:, t:t + 1], t)
        logits = run()
        if t >= first:
            lp = torch.log_softmax(logits[:, -1].float().cpu(), dim=-1)
            nll -= float(lp.gather(-1, ids[:, t + 1:t + 2].cpu()).sum())
            count += batch
    sync()
    return nll, count


def step_logits(step: Any, ids: torch.Tensor, *, input_specs: Sequence[Mapping[str, Any]] | None = None
                ) -> torch.Tensor:
    """Float logits ``[B, L, V]`` at every position of ``ids [B, L]``, fed one token per call through a static
    decode ``step`` from position 0 with fresh caches (what the deployed step computes for each prefix)."""
    batch, max_len, caches = _signature(step, input_specs, "step_logits")
    ids = _token_ids(ids, batch, 1, "step_logits: ids", "L")
    if ids.shape[1] > max_len:
        raise ValueError(f"step_logits: {ids.shape[1]} tokens need as many cache positions; this step holds {max_len}")
    write, run, sync = _stepper(step, ids, caches, False)
    rows = []
    for t in range(ids.shape[1]):
        write(ids[:, t:t + 1], t)
        rows.append(run()[:, -1].float().cpu().clone())
    sync()
    return torch.stack(rows, dim=1)


_Stepper = tuple[Callable[[torch.Tensor, int], None], Callable[[], torch.Tensor], Callable[[], None]]


def _stepper(step: Any, prompt: torch.Tensor, caches: list[tuple[str, list[int], str]], cuda_graph: bool
             ) -> _Stepper:
    """``(write(token, position), run() -> logits, sync())`` over fresh caches for ``step``."""
    if hasattr(step, "call_device"):
        return _compiled_stepper(step, prompt, caches, cuda_graph)
    return _functional_stepper(step, caches)


def _run_loop(prompt: torch.Tensor, new: int, write: Callable[[torch.Tensor, int], None],
              run: Callable[[], torch.Tensor], sync: Callable[[], None], eos: torch.Tensor | None = None
              ) -> Generation:
    p = prompt.shape[1]
    out = []
    done = torch.zeros(prompt.shape[0], 1, dtype=torch.bool)
    ended = torch.zeros(prompt.shape[0], 1, dtype=torch.long)
    t0 = time.perf_counter()
    tok = prompt[:, :1]
    t_prompt = 0.0
    for t in range(p + new - 1):
        write(tok, t)
        logits = run()
        if t + 1 < p:
            tok = prompt[:, t + 1:t + 2]
            continue
        if t + 1 == p:
            sync()
            t_prompt = time.perf_counter()
        tok = logits[:, -1].argmax(-1, keepdim=True)
        if eos is not None:  # a finished sequence keeps repeating its own end token; all finished: stop
            tok = torch.where(done.to(tok.device), ended.to(tok.device), tok)
            ended = torch.where(done, ended, tok.cpu())
            done |= torch.isin(ended, eos)
        out.append(tok)
        if eos is not None and bool(done.all()):
            break
    sync()
    t_end = time.perf_counter()
    if bool(torch.isnan(logits[:, -1]).all()):  # a step that could not run (the persistent CUDA step's sign)
        from ctc.errors import ComputeError

        raise ComputeError("generation: the last step's logits are all NaN, so the tokens are not the model's (a "
                           "persistent CUDA decode step writes NaN when it could not run: reload the library, keep "
                           "the GPU to this model, or build with `target cuda persistent=false`)")
    if t_prompt == 0.0:  # one new token: the prompt's last step produced it
        t_prompt = t_end
    tokens = torch.cat(out, dim=1).cpu()
    return Generation(tokens, t_prompt - t0, t_end - t_prompt)


def _compiled_stepper(model: Any, prompt: torch.Tensor, caches: list[tuple[str, list[int], str]],
                      cuda_graph: bool) -> _Stepper:
    cuda = getattr(model, "device", "cpu") == "cuda"
    dev = "cuda" if cuda else "cpu"
    bufs = [model.device_tensor(torch.zeros(prompt.shape[0], 1, dtype=torch.long)),
            model.device_tensor(torch.zeros(1, dtype=torch.long))]
    bufs += [model.device_tensor(torch.zeros(shape, dtype=_DTYPES[dt])) for _, shape, dt in caches]
    args = [b[0] for b in bufs]
    ids_buf, pos_buf = bufs[0][1], bufs[1][1]
    def write(tok: torch.Tensor, t: int) -> None:
        ids_buf.copy_(tok.to(dev))
        pos_buf.fill_(t)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if cuda_graph:
        if not cuda:
            raise ValueError("greedy_generate: cuda_graph needs a CUDA library")
        import tvm_ffi

        write(prompt[:, :1].to(dev), 0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), tvm_ffi.use_torch_stream():
            for _ in range(2):  # warm-up: the VM's pooled allocations settle before capture
                model.call_device(args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), tvm_ffi.use_torch_stream():
            outs = model.call_device(args)
        logits = outs[0]

        def run() -> torch.Tensor:
            graph.replay()
            return logits
    else:
        def run() -> torch.Tensor:
            return model.call_device(args)[0]

    return write, run, sync


def _functional_stepper(fn: Callable[[dict[str, Any]], Sequence[torch.Tensor]],
                        caches: list[tuple[str, list[int], str]]) -> _Stepper:
    state = {name: torch.zeros(shape, dtype=_DTYPES[dt]) for name, shape, dt in caches}
    feed: dict[str, Any] = {}

    def write(tok: torch.Tensor, t: int) -> None:
        feed["input_ids"] = tok.cpu()
        feed["position"] = torch.tensor([t])

    def run() -> torch.Tensor:
        outs = list(fn({**feed, **state}))
        for (name, _, _), v in zip(caches, outs[1:], strict=True):
            state[name] = v
        return outs[0]

    return write, run, lambda: None
