"""`ctc eval`: measure an artifact on real text, next to its original model on the same windows.

Why: a number alone (perplexity 23.8, cosine 0.995) says little; the original model's number on
the very same windows does.  `ctc eval` always measures (it never repeats what the compile-time
report recorded): it re-loads the original model named by the artifact's own recipe (bundled, a
Hugging Face directory or a .pt2 file, paths as the recipe gave them), runs both through the
reference interpreter on the evaluation windows and reports, with the compile's definitions
(:func:`ctc.driver.measure`):

* causal LMs: perplexity of both, the increase, next-token KL, output fidelity;
* encoders: output fidelity (cosine per token) and the largest output difference; with
  ``--human-similarity`` the Lee human-similarity correlation of both.

When the original cannot be loaded (moved files), the artifact is still measured alone and the
result says why there is no baseline; an encoder then needs ``--human-similarity``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctc.errors import UsageError
from ctc.tasks import TASK_CAUSAL_LM, TASK_DECODE_STEP, TASK_ENCODER

LEE_DOCS = 50  # documents of the Lee corpus (lee.cor) that --human-similarity correlates

__all__ = ["evaluate_artifact", "evaluation_windows_of", "human_similarity", "parse_data_flag"]


def parse_data_flag(data: str) -> tuple[str, str | None, str | None]:
    """``wiki`` | ``lee`` | ``text:FILE`` | ``jsonl:FILE:FIELD`` -> (source, path, field)."""
    kind, _, rest = data.partition(":")
    if kind in ("wiki", "lee") and not rest:
        return kind, None, None
    if kind == "text" and rest:
        return "text", rest, None
    if kind == "jsonl" and rest:
        path, _, fld = rest.rpartition(":") if rest.count(":") else (rest, "", "text")
        return "jsonl", path or rest, fld or "text"
    raise UsageError(f"--data {data!r}: expected wiki, lee, text:FILE or jsonl:FILE:FIELD")


HUMAN_MAX_TOKENS = 256  # --human-similarity truncates each Lee document here


def human_similarity(run: Callable[[dict[str, Any]], Any], tokenizer: Any, input_names: list[str], *,
                     docs: int | None = None, pad_to: int | None = None) -> dict[str, Any]:
    """Encoders: Pearson/Spearman of embedding cosine (``run`` gives the hidden states) against human
    similarity judgements on the Lee corpus (50 documents; ``docs`` takes the first N), mean-pooled,
    truncated at 256 tokens.  ``pad_to``: ``run`` takes only that many tokens (a fixed-length build, at least
    256): each document is padded to it, its attention mask 0 there, and the hidden states cut back."""
    import torch
    import torch.nn.functional as F

    from ctc.eval.data import lee_similarities, lee_test
    from ctc.eval.fidelity import human_correlation, sentence_embeddings

    texts = lee_test()
    human = lee_similarities()
    n = len(texts) if docs is None else docs
    if not 3 <= n <= len(texts):
        raise UsageError(f"--docs must be 3 to {len(texts)} (the Lee corpus has {len(texts)} documents), got {n}")

    def hidden(ids: Any, mask: Any) -> Any:
        length = ids.shape[1]
        if pad_to is not None and length < pad_to:
            ids, mask = (F.pad(t, (0, pad_to - length)) for t in (ids, mask))
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        return run({k: feed[k] for k in input_names})[0][:, :length]

    emb = sentence_embeddings(hidden, tokenizer, texts[:n], max_length=HUMAN_MAX_TOKENS, batch_size=1)
    agree = human_correlation(emb, [row[:n] for row in human[:n]])
    return {"pearson": round(agree.pearson, 4), "spearman": round(agree.spearman, 4), "pairs": agree.pairs,
            "protocol": f"gensim lee.cor, first {n} of 50 documents, mean pooling, 256-token truncation, "
                        "cosine vs human similarity (upper triangle)"}


def _artifact_recipe(art: Any) -> Any:
    """The artifact's own recipe (verified), its relative paths starting where the original recipe was."""
    from ctc.dsl.parser import parse

    if art.manifest is not None and "recipe.ctc" in art.manifest:
        text = art.manifest.read_text("recipe.ctc")
    else:
        f = art.path / "recipe.ctc"
        text = f.read_text() if f.is_file() else None
    if text is None:
        return None
    recipe = parse(text, str(art.path / "recipe.ctc"))
    base = art.report.get("recipe_dir")
    if base is None and art.report.get("recipe_file"):
        base = str(Path(str(art.report["recipe_file"])).parent)
    recipe.base_dir = base
    return recipe


def _original(recipe: Any, progress: Any) -> tuple[Any, str]:
    """The original model (a LoadedModel) of ``recipe``, or None and why it is not available."""
    from ctc.driver import load_model
    from ctc.errors import ModelError

    if recipe is None or recipe.model is None:
        return None, "the artifact holds no recipe naming its model"
    m = recipe.model
    try:
        with progress.stage(f"load the original model {m.kind} {m.ref!r}"):
            return load_model(recipe, progress), f"original model {m.kind} {m.ref!r}, same windows"
    except ModelError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"unavailable: {first}"


def evaluation_windows_of(art: Any, *, data: str | None = None, samples: int | None = None,
                          seq_len: int | None = None, skip: int | None = None, limit: int | None = None
                          ) -> tuple[list[dict[str, Any]], dict[str, Any], Any]:
    """``(batches, protocol, recipe)``: the evaluation windows `ctc eval` measures ``art`` on.

    Defaults come from the artifact's own ``evaluate`` statement (else the bundled Wikipedia text
    for causal LMs, Lee for encoders); the flags override them.  The lm-eval window task
    (:mod:`ctc.eval.lm_eval_adapter`) is made from exactly these windows.
    """
    from ctc.eval.data import model_batches

    for flag, value, least in (("--samples", samples, 1), ("--seq-len", seq_len, 1), ("--skip", skip, 0),
                               ("--limit", limit, 0)):
        if value is not None and value < least:  # 0 is a value given, never "use the recipe's"
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    recipe = _artifact_recipe(art)
    ev = recipe.evaluate if recipe is not None else None
    task = str(art.module.meta.get("task", "unknown"))
    if data is not None:
        source, path, fld = parse_data_flag(data)
    elif ev is not None:
        from ctc.dsl.check import resolve_path

        source, path, fld = ev.source, ev.path, ev.options.get("field")
        path = str(resolve_path(recipe, path)) if path is not None else None
    else:
        source, path, fld = ("wiki" if task in (TASK_CAUSAL_LM, TASK_DECODE_STEP) else "lee"), None, None
    opts = ev.options if ev is not None and data is None else {}
    n = samples if samples is not None else int(opts.get("samples", 8))
    decode_len = int(art.module.meta["decode"]["max_len"]) if task == TASK_DECODE_STEP else 0
    default_len = min(256, decode_len) if decode_len else 256 if task == TASK_CAUSAL_LM else 128
    positions = art.seq_limit() if not decode_len else None
    if positions is not None:  # the default window fits the model (a 128-position model got 256-token windows)
        default_len = min(default_len, positions[0])
    length = seq_len if seq_len is not None else int(opts.get("seq_len", default_len))
    if decode_len and length > decode_len:
        raise UsageError(f"--seq-len {length} does not fit this decode step's cache of {decode_len} positions "
                         f"(decode={decode_len} in its recipe): give --seq-len {decode_len} or less")
    if positions is not None and length > positions[0]:  # past them the model computes nothing it was trained for
        given = f"--seq-len {length}" if seq_len is not None else f"seq_len={length} on the recipe's evaluate line"
        raise UsageError(f"{given} is longer than the model's {positions[0]} positions ({positions[1]}): give "
                         f"--seq-len {positions[0]} or less")
    skip = int(opts.get("skip", 0)) if skip is None else skip
    limit = int(opts.get("limit", 0)) if limit is None else limit
    if min(n, length) < 1 or skip < 0 or limit < 0:
        raise UsageError("--samples and --seq-len must be >= 1, --skip and --limit >= 0")
    same = _calibration_text(recipe, source, path, fld, n, length, skip, limit)
    try:
        batches, proto = model_batches(source=source, path=path, field=fld, split="evaluation",
                                       tokenizer=art.tokenizer(), input_names=["input_ids"] if decode_len else
                                       [v.name for v in art.module.inputs],
                                       samples=n, seq_len=length, seed=0, skip=skip, limit=limit or None)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read evaluation data: {e}") from e
    if same is not None:
        proto["warnings"] = [*proto.get("warnings", []), same]
    return batches, proto, recipe


def _calibration_text(recipe: Any, source: str, path: str | None, field: str | None, samples: int, seq_len: int,
                      skip: int, limit: int) -> str | None:
    """A warning when the evaluation windows read tokens the artifact was calibrated on (its recipe's ``calibrate``
    line: same file, overlapping token range), else None."""
    from types import SimpleNamespace

    from ctc.dsl.check import DatasetOptions, resolve_path, same_text_tokens

    cal = recipe.calibrate if recipe is not None else None
    if cal is None or cal.path is None or path is None:
        return None
    try:
        co = DatasetOptions.from_dict(cal.options)
    except ValueError:  # the compile checked these options: an edited recipe is not ours to judge here
        return None
    eo = SimpleNamespace(samples=samples, seq_len=seq_len, skip=skip, limit=limit, field=field)
    what = same_text_tokens((cal.source, resolve_path(recipe, cal.path), co), (source, Path(path), eo))
    if what is None:
        return None
    fix = (f"skip them with --skip {co.skip + co.limit}, or evaluate on another file" if co.limit else
           "the recipe calibrated on the whole file: evaluate on another file")
    return (f"the evaluation windows read text the artifact was calibrated on ({Path(path).name}, {what}): accuracy "
            f"measured on calibration text is optimistic; {fix} (--data text:FILE or jsonl:FILE:FIELD)")


def evaluate_artifact(art: Any, *, data: str | None = None, samples: int | None = None, seq_len: int | None = None,
                      skip: int | None = None, limit: int | None = None, progress: bool = True, human: bool = False,
                      docs: int | None = None, target: str | None = None, baseline: bool = True,
                      perplexity: bool = False) -> dict[str, Any]:
    """Measure ``art`` (a loaded artifact) on evaluation text, next to its original model (``baseline``).

    ``perplexity``: decode-step artifacts' perplexity too, each window fed through the step one token at a time
    (causal LMs' is always measured)."""
    from ctc.driver import Progress, _module_perplexity, measure
    from ctc.eval.data import protocol_line

    bar = Progress(progress)
    task = str(art.module.meta.get("task", "unknown"))
    if docs is not None and not human:
        raise UsageError("--docs applies to --human-similarity (how many Lee documents it correlates)")
    if target is not None and not human:
        raise UsageError(f"--target applies to --human-similarity; fidelity and perplexity are measured on the IR "
                         f"(the compile measured the {target} library against the IR: `ctc show`), so leave "
                         "--target out or add --human-similarity")
    if docs is not None and not 3 <= docs <= LEE_DOCS:
        raise UsageError(f"--docs must be 3 to {LEE_DOCS} (the Lee corpus has {LEE_DOCS} documents), got {docs}")
    if perplexity and task != TASK_DECODE_STEP:
        raise UsageError("--perplexity applies to decode-step artifacts (`model ... decode=LEN`); "
                         + ("a causal LM's perplexity is always measured: leave it out" if task == TASK_CAUSAL_LM
                            else f"this model is {task}, which has none"))
    if human and task != TASK_ENCODER:
        raise UsageError(f"--human-similarity applies to sentence encoders; this model is {task}")
    fixed = art.fixed_seq_len(target) if human and target is not None else None
    if fixed is not None and fixed < HUMAN_MAX_TOKENS:
        raise UsageError(f"--human-similarity embeds each Lee document at up to {HUMAN_MAX_TOKENS} tokens, but this "
                         f"{target} library was built for {fixed} tokens (`seq_len=` on its target line): build the "
                         f"target with seq_len={HUMAN_MAX_TOKENS} (cpu: or no seq_len, any length), or leave --target "
                         "out")
    if fixed is not None and "attention_mask" not in [v.name for v in art.module.inputs]:
        raise UsageError(f"--human-similarity pads each Lee document to the {fixed} tokens this {target} library was "
                         "built for, and the model takes no attention mask to hide the padding with: build the target "
                         "for any length (cpu: no seq_len), or leave --target out")
    batches, proto, recipe = evaluation_windows_of(art, data=data, samples=samples, seq_len=seq_len, skip=skip,
                                                   limit=limit)
    length = int(proto["seq_len"])

    res: dict[str, Any] = {"task": task, "data": proto["text"], "windows": proto["windows"], "seq_len": length}
    if proto.get("token_range"):
        res["token_range"] = proto["token_range"]
    if proto.get("warnings"):
        res["warnings"] = proto["warnings"]
    original, why = _original(recipe, bar) if baseline else (None, "not requested (--no-baseline)")
    res["baseline"] = why
    windows = batches
    if task == TASK_DECODE_STEP and original is None and perplexity:
        res["protocol"] = "no fidelity without the original model"
    elif task == TASK_DECODE_STEP:  # each window's prefix goes into the caches through the original's eager model
        if original is None:
            raise UsageError(f"a decode-step artifact is measured one step after each window's prefix, on caches its "
                             f"original model fills, and the original is {why.removeprefix('unavailable: ')}: "
                             "`ctc show` has the fidelity the compile measured")
        from ctc.driver import decode_step_batches

        batches, proto = decode_step_batches(original, batches, proto)
        res["protocol"] = proto["decode_step"]
    if original is not None:
        metrics = {"fidelity", "max_error"} | ({"ppl"} if task == TASK_CAUSAL_LM else set())
        with bar.stage("measure (original and artifact)"):
            m = measure(original.module, art.module, original, batches, metrics, bar, protocol_line(proto))
        res["fidelity"] = round(m["fidelity"]["compressed"], 6)
        res["max_abs_error"] = m["max_error"]["compressed"]
        if task == TASK_CAUSAL_LM:
            res.update(ppl=round(m["ppl"]["compressed"], 4), ppl_original=round(m["ppl"]["original"], 4),
                       ppl_increase=round(m["ppl_increase"]["compressed"], 4), kl=m["kl"]["compressed"],
                       protocol=m["ppl"]["protocol"])
    elif task == TASK_CAUSAL_LM:
        with bar.stage("measure (artifact)"):
            p = _module_perplexity(art.module, batches, bar, protocol_line(proto))
        res.update(ppl=round(p.ppl, 4), tokens_scored=p.n_tokens, protocol=p.protocol)
    elif not human and not perplexity:
        raise UsageError(f"nothing to measure: the original model is {why.removeprefix('unavailable: ')}, so "
                         "output fidelity cannot be computed; pass --human-similarity to measure the encoder "
                         "against human judgements")
    if perplexity:
        with bar.stage("perplexity, one token per step"):
            dec = _decode_perplexity(art.module, original.module if original is not None else None, windows)
            if dec.get("left_out"):
                res["warnings"] = [*res.get("warnings", []), dec.pop("left_out")]
            res.update(dec)
        res["protocol"] = f"{res.get('protocol', '')}; {res.pop('ppl_protocol')}".lstrip("; ")
    bar.close_bar()
    if human:
        names = [v.name for v in art.module.inputs]
        res["human"] = human_similarity(lambda feed: art.run(feed, target=target), art.tokenizer(), names, docs=docs,
                                        pad_to=fixed)
        if original is not None:
            from ctc.artifact import torch_runner

            run = torch_runner(original.module)
            res["human_original"] = human_similarity(lambda feed: list(_as_list(run(feed))), original.tokenizer,
                                                     [v.name for v in original.module.inputs], docs=docs)
    return res


def _decode_perplexity(step: Any, original: Any, windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Perplexity of a decode step (and of the original's, when given) on the windows, each fed one token per call
    from position 0 with fresh caches (teacher forcing: the deployed step writes and reads its own cache), scoring
    every token but each window's first, as a causal LM's perplexity does."""
    import math

    import torch

    from ctc.generate import teacher_forced_nll
    from ctc.ir.interpreter import interpret

    ids = torch.cat([w["input_ids"] for w in windows])

    def ppl(module: Any) -> tuple[float, int]:
        specs = module.input_specs()
        rows = int(specs[0]["shape"][0])
        if ids.shape[0] < rows:
            raise UsageError(f"this decode step runs {rows} sequences at once; --samples {ids.shape[0]} gives fewer "
                             f"windows: give --samples {rows} or more")
        total, count = 0.0, 0
        for k in range(0, ids.shape[0] - rows + 1, rows):
            nll, n = teacher_forced_nll(lambda feed: interpret(module, feed), ids[k:k + rows], 0, input_specs=specs)
            total, count = total + nll, count + n
        return math.exp(total / count), count

    got, scored = ppl(step)
    out: dict[str, Any] = {"ppl": round(got, 4), "tokens_scored": scored,
                           "ppl_protocol": f"perplexity: each window fed one token per step from position 0 "
                                           f"(teacher forcing), {scored} tokens scored (all but each window's first)"}
    rows = int(step.inputs[0].type.shape[0])
    left = ids.shape[0] % rows
    if left:  # the step runs `rows` windows a call: a last, partial group of windows is not scored
        out["left_out"] = (f"perplexity: this decode step runs {rows} sequences at once, so the last {left} of the "
                           f"{ids.shape[0]} windows were not scored; give --samples {ids.shape[0] - left} or "
                           f"{ids.shape[0] - left + rows} to score every window")
        out["ppl_protocol"] += f"; {ids.shape[0] - left} of {ids.shape[0]} windows (groups of {rows})"
    if original is not None:
        base, _ = ppl(original)
        out.update(ppl_original=round(base, 4), ppl_increase=round(got - base, 4))
    return out


def _as_list(out: Any) -> list[Any]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def format_result(res: dict[str, Any]) -> str:
    """`ctc eval`'s lines: the artifact's numbers beside the original's."""
    lines = [f"{'task':>16}: {res['task']}", f"{'data':>16}: {res['data']}",
             f"{'windows':>16}: {res['windows']} x {res['seq_len']} tokens"
             + (f" ({res['token_range']})" if res.get("token_range") else ""),
             f"{'baseline':>16}: {res['baseline']}"]
    if "ppl" in res:
        orig = f"   (original {res['ppl_original']}, {res['ppl_increase']:+})" if "ppl_original" in res else ""
        lines.append(f"{'perplexity':>16}: {res['ppl']}{orig}")
    if "kl" in res:
        lines.append(f"{'KL vs original':>16}: {res['kl']:.6g}")
    if "fidelity" in res:
        lines.append(f"{'fidelity':>16}: {res['fidelity']} cosine vs original (max abs error "
                     f"{res['max_abs_error']:.4g})")
    if "human" in res:
        h, o = res["human"], res.get("human_original")
        extra = f"   (original {o['pearson']} / {o['spearman']})" if o else ""
        lines.append(f"{'human sim.':>16}: Pearson {h['pearson']} / Spearman {h['spearman']}{extra}")
    if res.get("protocol"):
        lines.append(f"{'protocol':>16}: {res['protocol']}")
    lines.extend(f"{'warning':>16}: {w}" for w in res.get("warnings", []))
    return "\n".join(lines)
