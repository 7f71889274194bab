"""lm-evaluation-harness on ctc artifacts: the ``ctc`` model of ``lm_eval`` and a task made of `ctc eval`'s windows.

Why: users compare compressed models with lm-eval's numbers; a ctc artifact should answer lm-eval's
requests itself (its quantized, pruned or shared layers, through the torch backend or a compiled
target), not a Hugging Face model re-loaded beside it.

* :class:`CtcLM` (registered as ``ctc``) loads an artifact and answers ``loglikelihood``,
  ``loglikelihood_rolling`` and greedy ``generate_until``.  Model args: ``artifact=DIR`` (required),
  ``target=cpu|cuda`` (default: the torch backend), ``max_length=N`` (default: the compiled
  target's fixed sequence length or decode cache, else the artifact's evaluation window),
  ``add_bos_token=true|false`` and ``prefix_token_id=N`` (as for lm-eval's ``hf`` model).  Full-sequence
  causal LMs run one forward per request; decode-step artifacts (``model ... decode=LEN``) are fed
  one token per call through their KV caches.  Rolling log-likelihoods use lm-eval's own windows
  (``get_rolling_token_windows``: the prefix token, then disjoint windows of ``max_length``
  predicted tokens), so they are comparable with lm-eval's ``hf`` model on the same weights.
* :func:`ctc.eval.lm_eval_task.write_window_task` writes a local task whose documents are exactly the windows
  `ctc eval` scores (same text, split, tokenizer, window length, stride and skip/limit): each window is one
  ``loglikelihood`` request (context: its first token, continuation: the rest) and the metric
  ``token_perplexity`` is ``exp(-sum log p / tokens scored)`` -- the perplexity `ctc eval` prints.

Running lm-eval from the shell: ``python -m ctc.eval.lm_eval_adapter`` is lm-eval's own command line
with the ``ctc`` model registered (lm-eval has no plugin entry point for models)::

    ctc eval out/art --write-lm-eval-task tasks/
    python -m ctc.eval.lm_eval_adapter run --model ctc --model_args artifact=out/art \\
        --tasks ctc_windows --include_path tasks/
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - the lm-eval extra is not installed
    raise ImportError(f"ctc's lm-eval model needs lm-evaluation-harness: pip install \"ctc[lm-eval]\" ({e})") from e

from ctc.errors import UsageError
from ctc.tasks import TASK_CAUSAL_LM, TASK_DECODE_STEP

__all__ = ["CtcLM"]

def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise UsageError(f"ctc lm-eval model: {name}={value!r} is not a boolean (true or false)")


class _Logits:
    """Float log-probabilities ``[L, V]`` at every position of a token list, through one backend of an artifact."""

    def __init__(self, art: Any, target: str | None) -> None:
        self.art, self.target = art, target
        self.task = str(art.module.meta.get("task", "unknown"))
        if self.task not in (TASK_CAUSAL_LM, TASK_DECODE_STEP):
            raise UsageError(f"ctc lm-eval model: {art.path} is a {self.task} model; lm-eval scores causal LMs "
                             "(compile a causal LM, or a decode step with `model ... decode=LEN`)")
        self.specs = art.module.input_specs()
        self.runner: Any = art.runner(target) if target is not None else None
        self.fixed_len = self._fixed_len()

    def _fixed_len(self) -> int | None:
        """The sequence length every call must have (a decode step's cache, a fixed-shape build), or None."""
        if self.task == TASK_DECODE_STEP:
            from ctc.generate import static_step_signature

            return static_step_signature(self.specs)[1]
        return self.art.fixed_seq_len(self.target)

    def __call__(self, tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor([tokens], dtype=torch.long)
        if self.task == TASK_DECODE_STEP:
            from ctc.generate import step_logits

            step = self.runner if self.runner is not None else (lambda feed: self.art.run(feed))
            logits = step_logits(step, ids, input_specs=self.specs)[0]
        else:
            logits = self._full(ids)
        return torch.log_softmax(logits.double(), dim=-1)

    def _full(self, ids: torch.Tensor) -> torch.Tensor:
        from ctc.eval.data import model_inputs

        n = ids.shape[1]
        mask = torch.ones_like(ids)
        if self.fixed_len is not None and n < self.fixed_len:
            # causal attention: right padding changes none of the first n positions' logits
            pad = self.fixed_len - n
            ids = torch.cat([ids, torch.zeros(1, pad, dtype=torch.long)], dim=1)
            mask = torch.cat([mask, torch.zeros(1, pad, dtype=torch.long)], dim=1)
        feed = model_inputs({"input_ids": ids, "attention_mask": mask}, [s["name"] for s in self.specs])
        out = self.art.run(feed, target=self.target)[0]
        return out[0, :n].float().cpu()


class CtcLM(TemplateLM):
    """A ctc artifact as an lm-eval model (loglikelihood, rolling loglikelihood, greedy generation)."""

    def __init__(self, artifact: str | None = None, target: str | None = None, max_length: int | str | None = None,
                 add_bos_token: bool | str | None = None, prefix_token_id: int | str | None = None,
                 batch_size: int | str | None = 1, **ignored: Any) -> None:
        super().__init__()
        from ctc.artifact import load

        if not artifact:
            raise UsageError("ctc lm-eval model: give the artifact directory, --model_args artifact=DIR")
        unknown = sorted(k for k in ignored if k not in ("device", "max_batch_size"))
        if unknown:
            raise UsageError(f"ctc lm-eval model: unknown model args {', '.join(unknown)} (known: artifact, target, "
                             "max_length, add_bos_token, prefix_token_id)")
        self.art = load(artifact)
        self.tokenizer = self.art.tokenizer()
        self.logprobs = _Logits(self.art, target or None)
        self.add_bos_token = None if add_bos_token is None else _flag(add_bos_token, "add_bos_token")
        self.custom_prefix = None if prefix_token_id is None else int(prefix_token_id)
        self._max_length = self._pick_max_length(None if max_length is None else int(max_length))
        self.batch_size = batch_size  # requests run one at a time (the torch backend and CPU targets use all threads)

    def _pick_max_length(self, asked: int | None) -> int:
        fixed = self.logprobs.fixed_len
        if asked is not None:
            if asked < 2 or (fixed is not None and asked > fixed):
                raise UsageError(f"ctc lm-eval model: max_length={asked} must be >= 2"
                                 + (f" and <= {fixed} (this artifact's fixed sequence length)" if fixed else ""))
            return asked
        if fixed is not None:
            return fixed
        evaluate = (self.art.report.get("protocol") or {}).get("evaluate") or {}
        return int(evaluate.get("seq_len") or 2048)

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise UsageError("ctc lm-eval model: the artifact's tokenizer has no end-of-text token")
        return int(eos)

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix is not None:
            return self.custom_prefix
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        flag = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            flag = False  # the text carries its BOS already (as lm-eval's hf model decides)
        kw = {} if flag is None else {"add_special_tokens": flag}
        return list(self.tokenizer.encode(string, **kw))

    def tok_decode(self, tokens: Iterable[int]) -> str:
        return str(self.tokenizer.decode(list(tokens)))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split (encode the whole, cut at the context's length), except that a context of only
        whitespace stays the context: lm-eval would move it into the continuation and be left with none
        (a window of text that starts with a newline token)."""
        if context and not context.strip():
            whole, head = self.tok_encode(context + continuation), self.tok_encode(context)
            return head, whole[len(head):]
        return super()._encode_pair(context, continuation)

    # ------------------------------------------------------------------ scoring
    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(log p(continuation | context), whether it is the greedy continuation), left-truncated to max_length."""
        if not continuation:
            return 0.0, True
        whole = (context + continuation)[-(self.max_length + 1):]
        inp = whole[:-1]
        if not inp:
            raise UsageError("ctc lm-eval model: a request with no context token (lm-eval normally gives the prefix "
                             "token)")
        logp = self.logprobs(inp)
        n = len(continuation)
        rows = logp[-n:] if n <= len(inp) else logp
        target = torch.tensor(continuation[-rows.shape[0]:])
        ll = float(rows.gather(-1, target.unsqueeze(-1)).sum())
        return ll, bool(torch.equal(rows.argmax(-1), target))

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        from tqdm import tqdm

        out = []
        for key, ctx, cont in tqdm(requests, desc="ctc loglikelihood", disable=disable_tqdm):
            res = self._score(list(ctx), list(cont))
            if key is not None and getattr(self, "cache_hook", None) is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
            out.append(res)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """lm-eval's rolling protocol: the prefix token, then disjoint windows of ``max_length`` predicted tokens."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        from tqdm import tqdm

        out = []
        for req in tqdm(requests, desc="ctc loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            total = sum(self._score(ctx, cont)[0] for ctx, cont in windows)
            if getattr(self, "cache_hook", None) is not None:
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy generation until a stop string or ``max_gen_toks`` (sampling is refused: ctc decodes greedily)."""
        from lm_eval.models.utils import handle_stop_sequences
        from tqdm import tqdm

        out = []
        for req in tqdm(requests, desc="ctc generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            if kw.get("do_sample") or float(kw.get("temperature", 0.0) or 0.0) > 0.0:
                raise UsageError("ctc lm-eval model: generation is greedy; the task asks for sampling "
                                 "(do_sample/temperature > 0)")
            until = handle_stop_sequences(kw.get("until"), eos=self.tok_decode([self.eot_token_id]))
            new = int(kw.get("max_gen_toks", 256))
            text = self._greedy(self.tok_encode(context), new, until)
            if getattr(self, "cache_hook", None) is not None:
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def _greedy(self, prompt: list[int], new: int, until: list[str]) -> str:
        room = self.max_length - 1
        tokens = list(prompt[-max(1, room - new + 1):]) if prompt else [self.prefix_token_id]
        start = len(tokens)
        for _ in range(new):
            if len(tokens) > room:
                break
            nxt = int(self.logprobs(tokens)[-1].argmax())
            tokens.append(nxt)
            text = self.tok_decode(tokens[start:])
            if nxt == self.eot_token_id or any(s and s in text for s in until):
                break
        text = self.tok_decode(t for t in tokens[start:] if t != self.eot_token_id)
        for s in until:
            if s:
                text = text.split(s)[0]
        return text


if __name__ != "__main__":  # under `python -m`, the import in the main block below registers the module's class
    register_model("ctc")(CtcLM)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line (``lm_eval ...``) with the ``ctc`` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    from ctc.eval.lm_eval_adapter import main as _main  # the importable module, which registers `ctc`

    _main()
