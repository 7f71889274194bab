"""ctc.eval.data: real bundled text (wiki split, Lee, Pang-Lee), user files, calibration batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ctc.bundled import bundled_model_dir
from ctc.eval import data


@pytest.fixture(scope="session")
def wiki_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache folder holding one real extraction of the gensim Wikipedia dump."""
    d = tmp_path_factory.mktemp("ctc-cache")
    data.wiki_articles(d)
    return d


@pytest.fixture(scope="session")
def bert_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_model_dir("minilm"), local_files_only=True)


class WordTokenizer:
    """A whitespace tokenizer without special tokens (like most causal-LM tokenizers)."""

    name_or_path = "words"

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}


# --------------------------------------------------------------------------- wiki
def test_wiki_articles_are_clean_real_articles(wiki_cache: Path):
    arts = data.wiki_articles(wiki_cache)
    assert 90 <= len(arts) <= 120
    assert all(len(a.text) >= data.WIKI_MIN_CHARS for a in arts)
    assert not any(a.text.lower().startswith("#redirect") for a in arts)
    assert not any("[[" in a.text or "{{" in a.text for a in arts)  # wiki markup removed
    words = sum(len(a.text.split()) for a in arts)
    assert 400_000 < words < 560_000
    assert "Anarchism" in {a.title for a in arts}


def test_wiki_split_is_disjoint_complete_and_deterministic(wiki_cache: Path):
    arts = data.wiki_articles(wiki_cache)
    cal, ev = data.wiki_split("calibration", wiki_cache), data.wiki_split("evaluation", wiki_cache)
    ct, et = {a.title for a in cal}, {a.title for a in ev}
    assert ct.isdisjoint(et)
    assert ct | et == {a.title for a in arts}
    assert len(ev) == -(-len(arts) * 3 // 10)  # ceil(30 %)
    # no evaluation paragraph appears in the calibration text
    cal_text = data.wiki_text("calibration", wiki_cache)
    for a in ev:
        para = max(a.text.split("\n"), key=len)
        assert para not in cal_text
    # independent of article order
    again = data.split_articles(list(reversed(arts)))
    assert {a.title for a in again["evaluation"]} == et


def test_split_articles_rejects_bad_fraction_and_duplicates():
    a = data.WikiArticle("T", "1", "x" * 600)
    with pytest.raises(ValueError, match="eval_fraction"):
        data.split_articles([a], 1.0)
    with pytest.raises(ValueError, match="duplicate"):
        data.split_articles([a, a])
    with pytest.raises(ValueError, match="unknown split 'test'"):
        data.wiki_split("test")


def test_wiki_cache_is_read_keyed_and_rebuilt(tmp_path: Path, wiki_cache: Path, monkeypatch: pytest.MonkeyPatch):
    cache = wiki_cache / "wiki-articles.json"
    blob = json.loads(cache.read_text())
    assert blob["extract_seconds"] > 0
    # a valid cache entry is what gets returned (no re-extraction)
    blob["articles"] = [{"title": "Only", "page_id": "7", "text": "cached " * 100}]
    (tmp_path / "wiki-articles.json").write_text(json.dumps(blob))
    assert [a.title for a in data.wiki_articles(tmp_path)] == ["Only"]
    # a stale key or a corrupt file is rebuilt, atomically, leaving no temporary files
    calls = []
    fake = [data.WikiArticle("Fresh", "1", "y" * 600)]
    monkeypatch.setattr(data, "_extract_wiki", lambda path, n: calls.append(path) or fake)
    blob["key"]["size"] += 1
    (tmp_path / "wiki-articles.json").write_text(json.dumps(blob))
    assert [a.title for a in data.wiki_articles(tmp_path)] == ["Fresh"]
    (tmp_path / "wiki-articles.json").write_text("{not json")
    assert [a.title for a in data.wiki_articles(tmp_path)] == ["Fresh"]
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wiki-articles.json"]
    assert [a.title for a in data.wiki_articles(tmp_path)] == ["Fresh"] and len(calls) == 2


# --------------------------------------------------------------------------- lee / pang-lee
def test_lee_corpus_and_human_similarities():
    bg, test = data.lee_background(), data.lee_test()
    assert len(bg) == 300 and len(test) == 50
    assert test[0].startswith("The national executive of the strife-torn Democrats")
    m = data.lee_similarities()
    assert len(m) == 50 and all(len(r) == 50 for r in m)
    assert all(m[i][i] == 1.0 for i in range(50))
    pairs = data.lee_similarity_pairs()
    assert len(pairs) == 1225 and all(i < j and 0.0 <= s <= 1.0 for i, j, s in pairs)
    assert pairs[0] == (0, 1, 0.3)


def test_pang_lee_polarity():
    rows = data.pang_lee_polarity()
    assert len(rows) == 200
    assert {lab for _, lab in rows} == {"pos", "neg"}
    assert rows[0] == ("simplistic , silly and tedious .", "neg")


# --------------------------------------------------------------------------- user files
def test_read_jsonl_and_its_errors(tmp_path: Path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n')
    assert data.read_jsonl(p) == ["one", "two"]
    p.write_text('{"body": "a"}\n')
    assert data.read_jsonl(p, "body") == ["a"]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        data.read_jsonl(tmp_path / "missing.jsonl")
    p.write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: invalid JSON"):
        data.read_jsonl(p)
    p.write_text('{"text": "ok"}\n{"text": "ok"}\n{"body": "x", "id": 3}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3: no field 'text' \(fields: body, id\)"):
        data.read_jsonl(p)
    p.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:1: expected a JSON object, got list"):
        data.read_jsonl(p)
    p.write_text('{"text": 5}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:1: field 'text' holds int"):
        data.read_jsonl(p)
    p.write_text("\n\n")
    with pytest.raises(ValueError, match="no JSON lines"):
        data.read_jsonl(p)
    p.write_bytes(b'{"text": "ok"}\n\xff\xfe{"text": "x"}\n')  # the error named neither the file nor the fix
    with pytest.raises(ValueError,
                       match=r"d\.jsonl: not UTF-8 text at byte 15; convert it with `iconv -f ENCODING -t utf-8`"):
        data.read_jsonl(p)


def test_read_text_file_errors(tmp_path: Path):
    p = tmp_path / "t.txt"
    p.write_text("hello world\n")
    assert data.read_text_file(p) == "hello world\n"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.read_text_file(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="it is a folder"):
        data.read_text_file(tmp_path)
    p.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8 text at byte 3"):
        data.read_text_file(p)
    p.write_text("  \n")
    with pytest.raises(ValueError, match="holds no text"):
        data.read_text_file(p)


def test_load_texts_sources(tmp_path: Path):
    assert data.load_texts("lee", "calibration") == data.lee_background()
    assert data.load_texts("lee", "evaluation") == data.lee_test()
    f = tmp_path / "x.jsonl"
    f.write_text('{"t": "a b"}\n')
    assert data.load_texts("jsonl", path=f, field="t") == ["a b"]
    with pytest.raises(ValueError, match="needs a file path"):
        data.load_texts("text")
    with pytest.raises(ValueError, match="takes no file path"):
        data.load_texts("lee", path=f)
    with pytest.raises(ValueError, match="unknown data source 'wikii'"):
        data.load_texts("wikii")


# --------------------------------------------------------------------------- batches
def test_calibration_batches_deterministic_and_shaped():
    tok = WordTokenizer()
    texts = [" ".join(f"w{i}" for i in range(1000))]
    a = data.calibration_batches(tok, texts, 6, 16, seed=3)
    b = data.calibration_batches(tok, texts, 6, 16, seed=3)
    c = data.calibration_batches(tok, texts, 6, 16, seed=4)
    assert len(a) == 6
    for x in a:
        assert x["input_ids"].shape == (1, 16) and x["input_ids"].dtype == torch.long
        assert torch.equal(x["attention_mask"], torch.ones(1, 16, dtype=torch.long))
        ids = x["input_ids"][0]
        assert torch.equal(ids, torch.arange(int(ids[0]), int(ids[0]) + 16))  # a contiguous window of the text
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c, strict=True))
    with pytest.raises(ValueError, match="fewer than one window"):
        data.calibration_batches(tok, ["a b c"], 1, 16)


def test_calibration_batches_bert_frames_with_special_tokens(bert_tok):
    b = data.calibration_batches(bert_tok, "lee", 3, 32, seed=0)
    for x in b:
        ids = x["input_ids"][0].tolist()
        assert len(ids) == 32
        assert ids[0] == bert_tok.cls_token_id and ids[-1] == bert_tok.sep_token_id
        assert bert_tok.cls_token_id not in ids[1:-1]


def test_evaluation_windows_and_model_batches(bert_tok):
    wins = data.evaluation_windows(bert_tok, "lee", 5, 24)
    assert len(wins) == 5
    stream = data.token_stream(bert_tok, data.lee_test())
    assert wins[1]["input_ids"][0, 1:-1].tolist() == stream[22:44].tolist()  # consecutive, 22 body tokens each
    batches, proto = data.model_batches(source="lee", path=None, field=None, split="evaluation", tokenizer=bert_tok,
                                        input_names=["input_ids", "attention_mask", "token_type_ids"], samples=5,
                                        seq_len=24, seed=0, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert torch.equal(batches[0]["input_ids"][1], wins[1]["input_ids"][0])
    assert torch.equal(batches[2]["token_type_ids"], torch.zeros(1, 24, dtype=torch.long))
    assert proto["windows"] == 5 and proto["seq_len"] == 24 and "lee.cor" in proto["text"]
    with pytest.raises(ValueError, match="input 'pixel_values'"):
        data.model_batches(source="lee", path=None, field=None, split="calibration", tokenizer=bert_tok,
                           input_names=["pixel_values"], samples=1, seq_len=16, seed=0)
