"""The lm-eval task made of `ctc eval`'s windows (``ctc eval ART --write-lm-eval-task DIR``), and its loader and metric.

Each window `ctc eval` scores becomes one ``loglikelihood`` request: context its first token, continuation
the rest, so the model sees the window alone and every token but the first is scored from the tokens
before it (`ctc eval`'s rule).  The metric ``token_perplexity`` aggregates with lm-eval's
``weighted_perplexity``: ``exp(-sum log p / tokens scored)``.  Run it with the ``ctc`` model
(:mod:`ctc.eval.lm_eval_adapter`).  Writing the task needs no lm-eval; loading it needs ``datasets``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ctc.errors import UsageError
from ctc.tasks import TASK_CAUSAL_LM

__all__ = ["WINDOW_TASK", "window_dataset", "window_process_results", "write_window_task"]

WINDOW_TASK = "ctc_windows"
WINDOWS_FILE = "windows.jsonl"


def _round_trips(tokenizer: Any, ids: list[int]) -> tuple[str, str] | None:
    """(context, continuation) texts that the request encoding (``CtcLM._encode_pair``, no special tokens)
    turns back into exactly ``ids[:1]`` and ``ids[1:]``; None when the tokenizer cannot."""
    ctx, cont = tokenizer.decode(ids[:1]), tokenizer.decode(ids[1:])
    # lm-eval moves a context's trailing whitespace into the continuation; CtcLM keeps an all-blank one
    moved = len(ctx) - len(ctx.rstrip()) if ctx.strip() else 0
    c, k = (ctx[:-moved], ctx[-moved:] + cont) if moved else (ctx, cont)
    whole = tokenizer.encode(c + k, add_special_tokens=False)
    head = tokenizer.encode(c, add_special_tokens=False)
    return (ctx, cont) if head == ids[:1] and whole == ids else None


def write_window_task(art: Any, out_dir: str | Path, *, name: str = WINDOW_TASK, data: str | None = None,
                      samples: int | None = None, seq_len: int | None = None, skip: int | None = None,
                      limit: int | None = None) -> dict[str, Any]:
    """Write the lm-eval task ``name`` over the windows `ctc eval` measures ``art`` on (same flags) into ``out_dir``.

    Files: ``NAME.yaml`` (the task), ``windows.jsonl`` (one window a line: context, continuation,
    tokens scored) and ``NAME_data.py`` (the loader and metric, from this module).  Returns the
    protocol.  A window the tokenizer cannot give back from its text is an error naming it.
    """
    from ctc.evaluate import evaluation_windows_of
    from ctc.output_dir import check_output_folder

    out = check_output_folder(out_dir, flag="--write-lm-eval-task")
    if str(art.module.meta.get("task")) != TASK_CAUSAL_LM:
        raise UsageError(f"--write-lm-eval-task: {art.path} is not a full-sequence causal LM (ctc eval measures "
                         "perplexity on those)")
    if not name.isidentifier():
        raise UsageError(f"--write-lm-eval-task: task name {name!r} must be a Python identifier")
    files = [out / f"{name}_{WINDOWS_FILE}", out / f"{name}_data.py", out / f"{name}.yaml"]
    if any(f.exists() and not _written_by_ctc(f) for f in files):
        raise UsageError(f"--write-lm-eval-task {out}: holds {', '.join(f.name for f in files if f.exists())}, "
                         "which ctc did not write; ctc does not overwrite files it did not write: choose another "
                         "folder")
    batches, proto, _ = evaluation_windows_of(art, data=data, samples=samples, seq_len=seq_len, skip=skip,
                                              limit=limit)
    from ctc.eval.data import _specials

    tok = art.tokenizer()
    body = int(proto["seq_len"]) - sum(map(len, _specials(tok)))
    rows = []
    for b in batches:
        for ids, mask in zip(b["input_ids"].tolist(), b["attention_mask"].tolist(), strict=True):
            ids = [t for t, m in zip(ids, mask, strict=True) if m]
            pair = _round_trips(tok, ids)
            if pair is None:
                raise UsageError(f"--write-lm-eval-task: window {len(rows) + 1} does not survive the text round trip "
                                 f"through tokenizer {proto['tokenizer']} (lm-eval requests are text); its first "
                                 f"tokens are {ids[:4]}. Try other windows (--skip) or a byte-level BPE tokenizer")
            rows.append({"window": len(rows), "context": pair[0], "continuation": pair[1], "scored": len(ids) - 1})
    out.mkdir(parents=True, exist_ok=True)
    windows_file = files[0]
    # each file whole or not at all (an interrupted run leaves nothing half-written under a task's names)
    _write_text(windows_file, "".join(json.dumps(r) + "\n" for r in rows))
    protocol = {"text": proto["text"], "split": proto["split"], "tokenizer": proto["tokenizer"],
                "windows": len(rows), "seq_len": proto["seq_len"], "stride": body,
                "selection": proto["selection"], "tokens_scored": sum(r["scored"] for r in rows),
                "scoring": "each window alone, every token but its first, from the tokens before it"}
    if proto.get("token_range"):
        protocol["token_range"] = proto["token_range"]
    _write_text(out / f"{name}_data.py",
        f'"""lm-eval task {name}: written by ctc (ctc.eval.lm_eval_task.write_window_task)."""\n\n'
        "from pathlib import Path\n\n"
        "from ctc.eval.lm_eval_task import window_dataset, window_process_results\n\n\n"
        "def dataset(**kwargs):\n"
        f'    return window_dataset(Path(__file__).with_name("{windows_file.name}"))\n\n\n'
        "def process_results(doc, results):\n"
        "    return window_process_results(doc, results)\n")
    _write_text(out / f"{name}.yaml",
        "# lm-eval task written by ctc: the windows `ctc eval` scores.\n"
        + "".join(f"# {k}: {v}\n" for k, v in protocol.items())
        + f"task: {name}\n"
        f"custom_dataset: !function {name}_data.dataset\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        "doc_to_text: context\n"
        "doc_to_target: continuation\n"
        'target_delimiter: ""\n'
        'fewshot_delimiter: ""\n'
        f"process_results: !function {name}_data.process_results\n"
        "metric_list:\n"
        "  - metric: token_perplexity\n"
        "    aggregation: weighted_perplexity\n"
        "    higher_is_better: false\n"
        "metadata:\n"
        "  version: 1.0\n")
    return protocol


def _written_by_ctc(path: Path) -> bool:
    """Whether ``path`` is one of the task files this module writes: the task yaml and the dataset module say so on
    their first line; the windows file's first line is a window record."""
    try:
        with path.open("rb") as f:
            first = f.readline()
    except OSError:
        return False
    if path.suffix == ".yaml":
        return first.startswith(b"# lm-eval task written by ctc")
    if path.suffix == ".py":
        return first.startswith(b'"""lm-eval task ') and b"written by ctc" in first
    try:
        row = json.loads(first)
    except ValueError:
        return False
    return isinstance(row, dict) and set(row) == {"window", "context", "continuation", "scored"}


def _write_text(path: Path, text: str) -> None:
    """``path`` written whole or not at all (:func:`ctc.output_dir.write_file_atomically`)."""
    from ctc.output_dir import write_file_atomically

    write_file_atomically(path, lambda tmp: tmp.write_text(text))


def window_dataset(path: str | Path) -> Any:
    """The window task's documents (a ``datasets.DatasetDict`` with a ``test`` split), read from ``path``."""
    import datasets

    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def window_process_results(doc: dict[str, Any], results: list[Any]) -> dict[str, tuple[float, int]]:
    """``token_perplexity`` item of one window: (log-likelihood of its scored tokens, how many)."""
    ll = results[0][0] if isinstance(results[0], (tuple, list)) else results[0]
    return {"token_perplexity": (float(ll), int(doc["scored"]))}
