"""Real text for calibration and evaluation, from files that ship in installed packages (nothing downloaded).

Sources:

* ``wiki``: English Wikipedia articles from gensim's test data (a shortened 2017 dump), cleaned
  with gensim's ``extract_pages`` + ``filter_wiki``; redirects and pages under 500 characters are
  dropped; articles are split deterministically into a calibration part and an evaluation part
  that never overlap.  The cleaned articles are cached as JSON (extraction takes seconds).
* ``lee``: the Lee news corpus (300 background documents for calibration, the 50 test documents
  for evaluation) and its 50x50 matrix of human similarity judgements.
* ``pang_lee``: 200 labelled movie-review sentences.
* a user's own ``text`` file or ``.jsonl`` file (one JSON object per line, text in a named field).

:func:`calibration_batches` turns any of them into tokenised model inputs, deterministic in the seed.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ctc.cache import default_cache_dir

__all__ = [
    "WIKI_FILE",
    "SPLITS",
    "WikiArticle",
    "gensim_test_data_dir",
    "wiki_articles",
    "split_articles",
    "wiki_split",
    "wiki_text",
    "lee_background",
    "lee_test",
    "lee_similarities",
    "lee_similarity_pairs",
    "pang_lee_polarity",
    "read_text_file",
    "read_jsonl",
    "load_texts",
    "token_stream",
    "calibration_batches",
    "evaluation_windows",
    "model_batches",
    "model_inputs",
    "describe_source",
]

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SPLITS = ("calibration", "evaluation")
WIKI_MIN_CHARS = 500
WIKI_EVAL_FRACTION = 0.3
_WIKI_CACHE_FORMAT = 1
_SPLIT_SALT = "ctc-wiki-split-v1"


# --------------------------------------------------------------------------- package files
def gensim_test_data_dir() -> Path:
    """gensim's ``test/test_data`` folder (located without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locs:
        raise FileNotFoundError("the bundled texts ship in the gensim wheel, which is not installed; "
                                "install it with `pip install gensim==4.4.0`")
    d = Path(locs[0]) / "test" / "test_data"
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is missing: this gensim install has no test data; "
                                "reinstall it with `pip install --force-reinstall gensim==4.4.0`")
    return d


def _data_file(name: str) -> Path:
    p = gensim_test_data_dir() / name
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing from the gensim install; reinstall gensim==4.4.0")
    return p


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling + rename (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------- wikipedia
@dataclass(frozen=True)
class WikiArticle:
    """One cleaned Wikipedia article."""

    title: str
    page_id: str
    text: str


def _extract_wiki(path: Path, min_chars: int) -> list[WikiArticle]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    out: list[WikiArticle] = []
    with bz2.open(path, "rb") as f:
        for title, text, page_id in extract_pages(f):
            if not text or text.lstrip()[:9].lower() == "#redirect":
                continue
            clean = filter_wiki(text).strip()
            if len(clean) >= min_chars:
                out.append(WikiArticle(title, str(page_id), clean))
    return out


def wiki_articles(cache_dir: str | Path | None = None, *, refresh: bool = False) -> list[WikiArticle]:
    """All cleaned Wikipedia articles (>= 500 characters, no redirects), in dump order.

    The first call extracts them from the gensim dump (~4 s) and caches them as JSON under
    ``cache_dir`` (default: ctc's cache folder); later calls read the cache (keyed on the dump's
    size and mtime, so a changed gensim install re-extracts).
    """
    src = _data_file(WIKI_FILE)
    st = src.stat()
    key = {"format": _WIKI_CACHE_FORMAT, "file": WIKI_FILE, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
           "min_chars": WIKI_MIN_CHARS}
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "wiki-articles.json"
    if not refresh and cache.is_file():
        try:
            blob = json.loads(cache.read_text(encoding="utf-8"))
            if blob.get("key") == key:
                return [WikiArticle(**a) for a in blob["articles"]]
        except (OSError, ValueError, TypeError, KeyError):
            pass  # unreadable or stale cache entry: rebuild it below
    t0 = time.perf_counter()
    arts = _extract_wiki(src, WIKI_MIN_CHARS)
    secs = time.perf_counter() - t0
    _write_atomic(cache, json.dumps({"key": key, "extract_seconds": secs, "articles": [asdict(a) for a in arts]}))
    return arts


def _split_rank(title: str) -> str:
    return hashlib.sha256(f"{_SPLIT_SALT}:{title}".encode()).hexdigest()


def split_articles(articles: Sequence[WikiArticle], eval_fraction: float = WIKI_EVAL_FRACTION
                   ) -> dict[str, list[WikiArticle]]:
    """Split articles into ``calibration`` and ``evaluation`` parts by article, deterministically.

    Articles are ranked by a salted SHA-256 of their title (independent of order, seed and
    machine); the first ``ceil(n * eval_fraction)`` form the evaluation part.  Each part keeps
    dump order.  The parts never share an article.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"split_articles: eval_fraction must be in (0, 1), got {eval_fraction}")
    titles = [a.title for a in articles]
    if len(set(titles)) != len(titles):
        raise ValueError("split_articles: duplicate article titles; the split is keyed on titles")
    n_eval = math.ceil(len(articles) * eval_fraction)
    eval_titles = set(sorted(titles, key=_split_rank)[:n_eval])
    return {"calibration": [a for a in articles if a.title not in eval_titles],
            "evaluation": [a for a in articles if a.title in eval_titles]}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def wiki_split(split: str, cache_dir: str | Path | None = None) -> list[WikiArticle]:
    """The ``calibration`` or ``evaluation`` articles of the bundled Wikipedia text."""
    _check_split(split)
    return split_articles(wiki_articles(cache_dir))[split]


def wiki_text(split: str, cache_dir: str | Path | None = None) -> str:
    """One split's articles joined with blank lines (the text perplexity is measured on)."""
    return "\n\n".join(a.text for a in wiki_split(split, cache_dir))


# --------------------------------------------------------------------------- lee / pang-lee
def _lines(name: str, encoding: str) -> list[str]:
    with open(_data_file(name), encoding=encoding) as f:
        return [ln.strip() for ln in f if ln.strip()]


def lee_background() -> list[str]:
    """The 300 background documents of the Lee news corpus (``lee_background.cor``)."""
    return _lines("lee_background.cor", "latin-1")


def lee_test() -> list[str]:
    """The 50 Lee corpus documents that the human similarity judgements refer to (``lee.cor``)."""
    return _lines("lee.cor", "latin-1")


def lee_similarities() -> list[list[float]]:
    """The 50x50 human similarity matrix (``similarities0-1.txt``), as stored: upper triangle + diagonal."""
    rows = [[float(x) for x in ln.split()] for ln in _lines("similarities0-1.txt", "ascii")]
    if len(rows) != 50 or any(len(r) != 50 for r in rows):
        raise ValueError(f"{_data_file('similarities0-1.txt')}: expected a 50x50 matrix")
    return rows


def lee_similarity_pairs() -> list[tuple[int, int, float]]:
    """Every document pair ``(i, j, human_score)`` with ``i < j`` (1225 pairs)."""
    m = lee_similarities()
    return [(i, j, m[i][j]) for i in range(50) for j in range(i + 1, 50)]


def pang_lee_polarity() -> list[tuple[str, str]]:
    """200 movie-review sentences as ``(text, label)`` with label ``"pos"`` or ``"neg"`` (latin-1 file)."""
    out = []
    for i, ln in enumerate(_lines("pang_lee_polarity.cor", "latin-1"), 1):
        label, _, text = ln.partition(" ")
        if label not in ("__label__pos", "__label__neg"):
            raise ValueError(f"pang_lee_polarity.cor:{i}: unexpected label {label!r}")
        out.append((text, label.removeprefix("__label__")))
    return out


# --------------------------------------------------------------------------- user files
def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's contents (clear errors for a missing, empty or non-UTF-8 file)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {str(p)!r} not found" + (" (it is a folder)" if p.is_dir() else ""))
    text = _read_utf8(p)
    if not text.strip():
        raise ValueError(f"{p}: the file holds no text")
    return text


def _read_utf8(p: Path) -> str:
    """A UTF-8 file's text, without a leading byte-order mark (it would be tokenized as text); a UTF-16/32 file
    (its byte-order mark says so) or other bytes are a ValueError saying how to convert it."""
    raw = p.read_bytes()
    for bom, enc in ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xff\xfe", "utf-16"),
                     (b"\xfe\xff", "utf-16")):
        if raw.startswith(bom):
            raise ValueError(f"{p}: {enc.upper()} text (it starts with a {enc.upper()} byte-order mark), not UTF-8; "
                             f"convert it with `iconv -f {enc} -t utf-8`")
    nul = raw.find(b"\x00")
    if nul >= 0:  # valid UTF-8 as far as the codec goes, but no text file holds NUL (zero-filled or binary data)
        head = raw[:4096]
        for enc, zeros in (("utf-16le", head[1::2]), ("utf-16be", head[0::2])):
            if head.strip(b"\x00") and zeros.count(0) > 0.9 * len(zeros):  # ASCII in UTF-16 without a mark
                raise ValueError(f"{p}: looks like {enc.upper()} text without a byte-order mark, not UTF-8; convert "
                                 f"it with `iconv -f {enc} -t utf-8`")
        raise ValueError(f"{p}: a NUL byte at byte {nul}: this is binary data, not a text file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        at = e.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
        raise ValueError(f"{p}: not UTF-8 text at byte {at}; convert it with `iconv -f ENCODING -t utf-8` (e.g. "
                         "ENCODING latin1 or cp1252)") from None


def read_jsonl(path: str | Path, field: str = "text") -> list[str]:
    """The ``field`` strings of a JSON-lines file (one object per line; blank lines and blank values are skipped).

    Errors name the file and line: a line that is not JSON, not an object, lacks ``field``, or
    holds a non-string there.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"jsonl file {str(p)!r} not found" + (" (it is a folder)" if p.is_dir() else ""))
    out: list[str] = []
    for lineno, line in enumerate(_read_utf8(p).split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        if field not in obj:
            have = ", ".join(sorted(map(str, obj))) or "none"
            raise ValueError(f"{p}:{lineno}: no field {field!r} (fields: {have}); name the text field "
                             "(field=\"...\" in a recipe, --data jsonl:FILE:FIELD for ctc eval)")
        v = obj[field]
        if not isinstance(v, str):
            raise ValueError(f"{p}:{lineno}: field {field!r} holds {type(v).__name__}, expected a string")
        out.append(v)
    if not out:
        raise ValueError(f"{p}: no JSON lines in the file")
    texts = [v for v in out if v.strip()]  # a blank value adds only the separator between documents
    if not texts:
        raise ValueError(f"{p}: every line's {field!r} is empty or blank ({len(out)} lines): no text to use; "
                         "is the text in another field?")
    return texts


# --------------------------------------------------------------------------- sources -> texts
def load_texts(source: str, split: str = "calibration", *, path: str | Path | None = None,
               field: str | None = None, cache_dir: str | Path | None = None) -> list[str]:
    """Documents of a named source: ``wiki`` | ``lee`` (bundled, split-aware) or ``text`` | ``jsonl`` (``path``).

    ``lee``: calibration = the 300 background documents, evaluation = the 50 test documents.
    A user's file is used whole for either split.
    """
    _check_split(split)
    if source in ("text", "jsonl"):
        if path is None:
            raise ValueError(f"data source {source!r} needs a file path")
        if source == "text":
            return [read_text_file(path)]
        return read_jsonl(path, field or "text")
    if path is not None:
        raise ValueError(f"data source {source!r} is bundled and takes no file path")
    if source == "wiki":
        return [a.text for a in wiki_split(split, cache_dir)]
    if source == "lee":
        return lee_background() if split == "calibration" else lee_test()
    raise ValueError(f"unknown data source {source!r}; expected wiki, lee, text or jsonl")


def describe_source(source: str, split: str, path: str | Path | None = None) -> str:
    """One line naming the text a protocol used (a user's file by its name, size and content hash: comparable across
    machines, unlike its absolute path)."""
    if source == "wiki":
        return (f"gensim {WIKI_FILE} ({split} split: articles >= {WIKI_MIN_CHARS} chars, by salted title hash, "
                f"{int(WIKI_EVAL_FRACTION * 100)}% evaluation)")
    if source == "lee":
        return "gensim lee_background.cor (300 docs)" if split == "calibration" else "gensim lee.cor (50 docs)"
    if path is None:
        return f"{source} file"
    p = Path(path)
    try:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()[:12]
        return f"{source} file {p.name} ({p.stat().st_size:,} bytes, sha256 {digest})"
    except OSError:
        return f"{source} file {p.name}"


# --------------------------------------------------------------------------- tokenising
def _specials(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids the tokenizer puts before and after content (e.g. [CLS] ... [SEP]); empty for most LMs."""
    try:
        plain = list(tokenizer("hello world", add_special_tokens=False, verbose=False)["input_ids"])
        full = list(tokenizer("hello world", add_special_tokens=True, verbose=False)["input_ids"])
    except TypeError:
        return [], []
    n = len(plain)
    i = next((k for k in range(len(full) - n + 1) if full[k:k + n] == plain), None) if n else None
    if i is None:
        return [], []
    return full[:i], full[i + n:]


def token_stream(tokenizer: Any, texts: Sequence[str], separator: str = "\n\n") -> torch.Tensor:
    """Token ids of ``texts`` joined by ``separator`` (no special tokens), as a 1-D int64 tensor."""
    if isinstance(texts, str):
        raise TypeError("token_stream: pass a list of texts, not a single string")
    enc = tokenizer(separator.join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(enc, dtype=torch.long)


def _wrap(tokenizer: Any, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    pre, post = _specials(tokenizer)
    row = torch.cat([torch.tensor(pre, dtype=torch.long), ids, torch.tensor(post, dtype=torch.long)])
    return {"input_ids": row.unsqueeze(0), "attention_mask": torch.ones(1, row.numel(), dtype=torch.long)}


def _token_range(stream: torch.Tensor, skip: int, limit: int | None, what: str) -> torch.Tensor:
    """``stream[skip : skip + limit]`` with a clear error when ``skip`` leaves nothing."""
    if skip < 0 or (limit is not None and limit < 0):
        raise ValueError(f"{what}: skip and limit must be >= 0, got {skip}, {limit}")
    if skip >= stream.numel():
        raise ValueError(f"{what}: skip={skip} skips the whole text ({stream.numel()} tokens)")
    return stream[skip: skip + limit] if limit else stream[skip:]


def _too_short(whole: torch.Tensor, used: torch.Tensor, skip: int, limit: int | None, body: int) -> str:
    """Why no window of ``body`` text tokens fits: the text is short, or skip/limit leave too little of it."""
    if used.numel() == whole.numel():
        return (f"the text has {whole.numel()} tokens, fewer than one window of {body}; use more text or a smaller "
                "seq_len")
    given = " and ".join(f"{k}={v}" for k, v in (("skip", skip), ("limit", limit)) if v)
    return (f"{given} leave{'s' if ' and ' not in given else ''} {used.numel()} of the text's {whole.numel()} tokens, "
            f"fewer than one window of {body}; lower skip, raise limit, or use a smaller seq_len")


def calibration_batches(tokenizer: Any, source: str | Sequence[str], n_samples: int, seq_len: int, seed: int = 0,
                        *, split: str = "calibration", path: str | Path | None = None, field: str | None = None,
                        cache_dir: str | Path | None = None, skip: int = 0, limit: int | None = None
                        ) -> list[dict[str, torch.Tensor]]:
    """``n_samples`` windows of ``seq_len`` tokens drawn at random (by ``seed``) from a text source.

    ``source`` is a source name (see :func:`load_texts`) or a list of texts.  The source's
    documents are tokenised as one stream; each sample is a contiguous window starting at a
    position drawn with ``random.Random(seed)`` (the GPTQ calibration protocol).  Tokenizers that
    frame inputs with special tokens (BERT's [CLS] ... [SEP]) get them added, inside
    ``seq_len``.  ``skip``/``limit`` restrict the draw to tokens ``[skip, skip + limit)`` of the stream.
    Returns dicts of ``input_ids`` / ``attention_mask``, each ``[1, seq_len]`` int64.
    """
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"calibration_batches: need n_samples >= 1 and seq_len >= 2, got {n_samples}, {seq_len}")
    texts = load_texts(source, split, path=path, field=field, cache_dir=cache_dir) if isinstance(source, str) \
        else list(source)
    pre, post = _specials(tokenizer)
    body = seq_len - len(pre) - len(post)
    if body < 1:
        raise ValueError(f"calibration_batches: seq_len {seq_len} leaves no room beside the special tokens")
    whole = token_stream(tokenizer, texts)
    stream = _token_range(whole, skip, limit, "calibration_batches")
    if stream.numel() < body:
        raise ValueError(f"calibration_batches: {_too_short(whole, stream, skip, limit, body)}")
    rng = random.Random(seed)
    starts = [rng.randrange(stream.numel() - body + 1) for _ in range(n_samples)]
    return [_wrap(tokenizer, stream[s:s + body]) for s in starts]


def evaluation_windows(tokenizer: Any, source: str | Sequence[str], n_windows: int | None, seq_len: int,
                       *, split: str = "evaluation", path: str | Path | None = None, field: str | None = None,
                       cache_dir: str | Path | None = None, skip: int = 0, limit: int | None = None
                       ) -> list[dict[str, torch.Tensor]]:
    """The first ``n_windows`` consecutive, non-overlapping ``seq_len``-token windows of a source (all if None),
    starting ``skip`` tokens in and using at most ``limit`` tokens."""
    texts = load_texts(source, split, path=path, field=field, cache_dir=cache_dir) if isinstance(source, str) \
        else list(source)
    pre, post = _specials(tokenizer)
    body = seq_len - len(pre) - len(post)
    if body < 1:
        raise ValueError(f"evaluation_windows: seq_len {seq_len} leaves no room beside the special tokens")
    whole = token_stream(tokenizer, texts)
    stream = _token_range(whole, skip, limit, "evaluation_windows")
    total = stream.numel() // body
    if total == 0:
        raise ValueError(f"evaluation_windows: {_too_short(whole, stream, skip, limit, body)}")
    n = total if n_windows is None else min(n_windows, total)
    return [_wrap(tokenizer, stream[k * body:(k + 1) * body]) for k in range(n)]


def synthetic_batch(module: Any, *, batch: int = 1, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """:func:`synthetic_inputs` for a model with no text to feed (a CNN, a .pt2 program): its batch symbol
    (``batch``, or a .pt2 program's ``d0``) sized ``batch``, its sequence symbol ``seq_len`` when given; another
    dim left unsized is the same ValueError."""
    from ctc.analysis.roofline import input_symbols

    b_sym, s_sym, _ = input_symbols(module)
    return synthetic_inputs(module, {k: n for k, n in ((b_sym, batch), (s_sym, seq_len)) if k and n is not None})


def synthetic_inputs(module: Any, dims: Mapping[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic inputs of ``module``'s input shapes, its symbols sized by ``dims``: N(0, 1) for float inputs,
    token ids within the embedding table that reads them, ones for other integer inputs (masks).  A dim whose
    symbols ``dims`` does not size is a ValueError naming the input and the symbols."""
    from ctc.ir.symbolic import eval_dim, free_symbols
    from ctc.ir.types import torch_dtype

    g = torch.Generator().manual_seed(seed)
    out = {}
    for v in module.inputs:
        unsized = sorted({s for d in v.type.shape if not isinstance(d, int) for s in free_symbols(d)} - set(dims))
        if unsized:
            raise ValueError(f"input {v.name!r} has a dim {unsized[0]!r} that cannot be sized here (sized: "
                             f"{', '.join(dims) or 'none'})")
        shape = [d if isinstance(d, int) else int(eval_dim(d, dict(dims))) for d in v.type.shape]
        dtype = torch_dtype(v.type.dtype)
        if dtype.is_floating_point:
            out[v.name] = torch.randn(*shape, generator=g).to(dtype)
            continue
        vocab = next((int(u.operand("weight").type.shape[0]) for u in v.users
                      if u.op == "embedding" and u.operand("ids") is v), None)
        if vocab is not None:
            out[v.name] = torch.randint(0, vocab, shape, generator=g, dtype=torch.int64).to(dtype)
        else:
            out[v.name] = torch.ones(*shape, dtype=dtype)
    return out


def model_inputs(window: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Exactly the model inputs ``names`` for a tokenised window (token types and positions filled in)."""
    out: dict[str, torch.Tensor] = {}
    ids = window["input_ids"]
    for n in names:
        if n in window:
            out[n] = window[n]
        elif n == "token_type_ids":
            out[n] = torch.zeros_like(ids)
        elif n == "position_ids":
            out[n] = torch.arange(ids.shape[1], dtype=torch.long).expand_as(ids).contiguous()
        else:
            raise ValueError(f"the model takes an input {n!r} that text data cannot provide "
                             "(text gives input_ids, attention_mask, token_type_ids, position_ids)")
    return out


def tokenizer_label(tokenizer: Any) -> str:
    """A tokenizer named so that two reports can be compared: its folder or hub name (never an absolute install
    path), class and vocabulary size."""
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    if name and (Path(name).is_absolute() or Path(name).exists()):
        parts = Path(name).parts
        name = "/".join(parts[-2:]) if parts and parts[-1] in ("tokenizer", "model") and len(parts) > 1 \
            else Path(name).name
    try:
        vocab = len(tokenizer)
    except TypeError:
        vocab = None
    extra = ", ".join(x for x in (type(tokenizer).__name__, f"vocab {vocab}" if vocab else "") if x)
    return f"{name or 'unnamed'} ({extra})"


def protocol_line(protocol: Mapping[str, Any]) -> str:
    """The text and tokenizer of a :func:`model_batches` protocol in one line (prefixes metric protocols)."""
    parts = [str(protocol.get("text", ""))]
    if protocol.get("tokenizer"):
        parts.append(f"tokenizer {protocol['tokenizer']}")
    if protocol.get("token_range"):
        parts.append(str(protocol["token_range"]))
    return "; ".join(p for p in parts if p)


def model_batches(*, source: str, path: str | Path | None, field: str | None, split: str, tokenizer: Any,
                  input_names: Sequence[str], samples: int, seq_len: int, seed: int, batch_size: int = 1,
                  cache_dir: str | Path | None = None, skip: int = 0, limit: int | None = None
                  ) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """Model-input batches for a recipe's ``calibrate``/``evaluate`` statement, and the protocol that made them.

    Calibration: ``samples`` random windows (:func:`calibration_batches`).  Evaluation: the first
    ``samples`` consecutive windows of the evaluation split (:func:`evaluation_windows`).
    Windows are stacked ``batch_size`` at a time and given exactly the inputs in ``input_names``.
    """
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so text data cannot be turned into its inputs")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_split(split)
    t0 = time.perf_counter()
    if split == "calibration":
        wins = calibration_batches(tokenizer, source, samples, seq_len, seed, split=split, path=path, field=field,
                                   cache_dir=cache_dir, skip=skip, limit=limit)
    else:
        wins = evaluation_windows(tokenizer, source, samples, seq_len, split=split, path=path, field=field,
                                  cache_dir=cache_dir, skip=skip, limit=limit)
    warnings = _data_warnings(tokenizer, wins, split, samples, seq_len)
    batches = []
    for k in range(0, len(wins), batch_size):
        group = [model_inputs(w, input_names) for w in wins[k:k + batch_size]]
        batches.append({n: torch.cat([g[n] for g in group]) for n in input_names})
    protocol = {
        "source": source, "text": describe_source(source, split, path), "split": split,
        "tokenizer": tokenizer_label(tokenizer),
        "windows": len(wins), "seq_len": seq_len, "batch_size": batch_size,
        "selection": f"random windows, seed {seed}" if split == "calibration" else "first consecutive windows",
        "stride": "random starts" if split == "calibration" else
                  f"{seq_len - sum(map(len, _specials(tokenizer)))} text tokens (disjoint windows, no context carried)",
        "tokens": len(wins) * seq_len, "seconds": time.perf_counter() - t0,
    }
    if skip or limit:
        protocol["token_range"] = f"tokens {skip}..{skip + limit if limit else 'end'} of the text"
    if warnings:
        protocol["warnings"] = warnings
    return batches, protocol


UNKNOWN_TOKEN_WARN = 0.05  # share of unknown-token ids above which the windows are said to be mostly unreadable


def _data_warnings(tokenizer: Any, wins: Sequence[Mapping[str, torch.Tensor]], split: str, samples: int,
                   seq_len: int) -> list[str]:
    """What a user should know about windows made from their text: fewer evaluation windows than ``samples`` asked
    for (the text ran out), and a text the tokenizer mostly cannot represent (its unknown token)."""
    out = []
    if split == "evaluation" and len(wins) < samples:
        out.append(f"samples={samples} asked for more windows than the text holds: measured on the {len(wins)} "
                   f"consecutive windows of {seq_len} tokens it has")
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(unk, int) and wins:
        ids = torch.cat([w["input_ids"].reshape(-1) for w in wins])
        share = float((ids == unk).float().mean())
        if share > UNKNOWN_TOKEN_WARN:
            out.append(f"{share:.0%} of the {split} tokens are the tokenizer's unknown token "
                       f"{getattr(tokenizer, 'unk_token', unk)!r} (words longer than its limit, characters it lacks): "
                       "numbers measured on such text say little about real text")
    return out
