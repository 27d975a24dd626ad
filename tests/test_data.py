"""Corpus, tokenizers and document-contiguous batching."""

from __future__ import annotations

import gzip
import json
import math
import sys
import types
import warnings
from importlib import resources

import numpy as np
import pytest
import torch

from titans_mini import data
from titans_mini.data import (
    BPETokenizer,
    ByteTokenizer,
    CorpusUnavailableError,
    DocumentBatcher,
    TextData,
    load_corpus,
)


@pytest.fixture(scope="module")
def shakespeare():
    return load_corpus("shakespeare")


# ---------------------------------------------------------------- bundled corpus
def test_bundled_corpus_is_shipped_with_provenance():
    folder = resources.files("titans_mini") / "data"
    gz = folder / "shakespeare.jsonl.gz"
    note = (folder / "PROVENANCE.md").read_text()
    assert "public domain" in note.lower() and "shakespeare" in note.lower()
    with gz.open("rb") as fh, gzip.open(fh, "rt") as lines:
        works = [json.loads(line)["work"] for line in lines]
    assert len(works) == 42 and len(set(works)) == 42


def test_shakespeare_split_by_work(shakespeare):
    train = {d.name for d in shakespeare.train}
    val = {d.name for d in shakespeare.val}
    assert not train & val  # no work in both splits
    assert val == set(data.SHAKESPEARE_VAL_WORKS)
    assert len(train) + len(val) == 42
    # no validation text hides inside a training document either
    val_line = next(
        line
        for line in shakespeare.val[0].text.splitlines()
        if len(line) > 60 and "Exit" not in line
    )
    assert all(val_line not in d.text for d in shakespeare.train)
    n_val = sum(len(d.text) for d in shakespeare.val)
    n_all = n_val + sum(len(d.text) for d in shakespeare.train)
    assert 0.05 < n_val / n_all < 0.15
    assert "HAMLET" in next(d.text for d in shakespeare.train if d.name == "hamlet")[:200]


# ---------------------------------------------------------------- local corpora and errors
def test_local_file_and_folder(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("".join(f"line {i} of the book\n" for i in range(1000)))
    c = load_corpus(f)
    assert len(c.train) == len(c.val) == 1
    assert c.train[0].text + c.val[0].text == f.read_text()
    assert c.val[0].text.startswith("line ")  # cut at a line break
    assert 0.05 < len(c.val[0].text) / len(f.read_text()) < 0.15

    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(10):
        (folder / f"doc{i}.txt").write_text(f"document {i} " * 50)
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    c = load_corpus(folder)
    train, val = {d.name for d in c.train}, {d.name for d in c.val}
    assert len(train) == 9 and len(val) == 1 and not train & val
    assert load_corpus(folder).val[0].name == c.val[0].name  # deterministic
    assert load_corpus(str(folder), seed=3).val[0].name in train | val


def test_load_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus("shakespear")
    with pytest.raises(FileNotFoundError):
        load_corpus(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError):
        load_corpus("no/such/folder")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no non-empty text files"):
        load_corpus(tmp_path / "nothing")
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus("shakespeare", val_fraction=1.0)


@pytest.mark.parametrize("name", ["tinystories", "fineweb-edu", "pg19"])
def test_hf_sources_fail_fast_without_datasets_or_network(name, monkeypatch):
    """Never downloads in tests: either `datasets` is missing, or we are offline."""
    import builtins

    real_import = builtins.__import__

    def no_datasets(mod, *args, **kwargs):
        if mod == "datasets":
            raise ImportError("no datasets")
        return real_import(mod, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(CorpusUnavailableError, match="pip install datasets"):
        load_corpus(name)
    monkeypatch.setattr(builtins, "__import__", real_import)

    # a stand-in `datasets` module: the offline checks must fire before any download
    monkeypatch.setitem(sys.modules, "datasets", types.ModuleType("datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CorpusUnavailableError, match="offline"):
        load_corpus(name)
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(data, "hf_reachable", lambda *a, **k: False)
    with pytest.raises(CorpusUnavailableError, match="not reachable"):
        load_corpus(name)


# ---------------------------------------------------------------- tokenizers
def test_byte_tokenizer_roundtrip_and_save(tmp_path):
    tok = ByteTokenizer()
    text = "Thou art more lovely — and more temperate. ✓"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < 256 and tok.vocab_size == 256
    assert tok.encode_array(text).tolist() == tok.encode(text)
    data.save_tokenizer(tok, tmp_path)
    assert isinstance(data.load_tokenizer(tmp_path), ByteTokenizer)


def test_bpe_train_save_reload(tmp_path, shakespeare):
    train_texts = [d.text[:40_000] for d in shakespeare.train[:6]]
    tok = data.make_tokenizer("bpe", train_texts, vocab_size=600)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 600
    text = shakespeare.val[0].text[:2000]  # unseen text still round-trips (byte level)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < 0.6 * len(text.encode())  # it compresses
    # bytes per token: sums to the byte length of the text
    assert tok.token_bytes()[ids].sum() == len(text.encode())
    data.save_tokenizer(tok, tmp_path)
    again = data.load_tokenizer(tmp_path)
    assert isinstance(again, BPETokenizer) and again.encode(text) == ids
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(train_texts, vocab_size=100)
    with pytest.raises(ValueError, match="train_texts"):
        data.make_tokenizer("bpe")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        data.make_tokenizer("wordpiece")
    with pytest.raises(FileNotFoundError):
        data.load_tokenizer(tmp_path / "nowhere")


# ---------------------------------------------------------------- batching
def _docs():
    # documents whose tokens encode (doc id, position) so contiguity can be checked
    return [np.arange(n) + 1000 * (i + 1) for i, n in enumerate([500, 120, 900, 70, 300])]


def test_batches_are_contiguous_excerpts_of_one_document():
    docs = _docs()
    b = DocumentBatcher(docs, batch_size=6, seq_len=16, segments=4, seed=1)
    for w in range(5):
        batches = [b.batch(w * 4 + s) for s in range(4)]
        assert batches[0].doc_start.all() and batches[0].reset
        assert not any(x.doc_start.any() for x in batches[1:])
        rows = torch.cat([x.inputs for x in batches], dim=1)  # (B, 64)
        for x in batches:
            assert torch.equal(x.targets[:, :-1], x.inputs[:, 1:])
        # consecutive segments continue the same excerpt
        for s in range(3):
            assert torch.equal(batches[s].targets[:, -1], batches[s + 1].inputs[:, 0])
        # every excerpt lies inside one document: consecutive positions of one doc id
        diffs = rows[:, 1:] - rows[:, :-1]
        assert (diffs == 1).all()
        assert ((rows // 1000) == (rows[:, :1] // 1000)).all()


def test_batches_pure_function_of_step_and_rank():
    docs = _docs()
    a = DocumentBatcher(docs, 4, 16, 2, seed=0)
    b = DocumentBatcher(docs, 4, 16, 2, seed=0)
    steps = [7, 3, 0, 7, 12]
    for s in steps:  # any order, any instance
        assert torch.equal(a.batch(s).inputs, b.batch(s).inputs)
    r1 = DocumentBatcher(docs, 4, 16, 2, seed=0, rank=1)
    assert not torch.equal(a.batch(0).inputs, r1.batch(0).inputs)
    c = DocumentBatcher(docs, 4, 16, 2, seed=1)
    assert not torch.equal(a.batch(0).inputs, c.batch(0).inputs)


def test_short_documents_are_packed_and_too_short_corpora_rejected():
    short = [np.full(10, i) for i in range(1, 30)]
    b = DocumentBatcher(short, 2, 16, 2, separator=np.array([0]))
    assert all(len(d) >= 33 for d in b.docs)
    assert sum(int((d != 0).sum()) for d in b.docs) == 29 * 10  # every token kept
    joined = np.concatenate(b.docs)
    assert ((joined[1:] == 0) <= (joined[:-1] != 0)).all()  # one separator at a time
    with pytest.raises(ValueError, match="fewer than one excerpt"):
        DocumentBatcher([np.arange(20)], 2, 16, 2)
    with pytest.raises(ValueError):
        DocumentBatcher(_docs(), 0, 16)


def test_val_batches_deterministic_and_cover_every_document(shakespeare):
    td = TextData(shakespeare)
    b = td.batcher("val", 8, 64, segments=2)
    first = b.eval_batches(4)
    again = td.batcher("val", 8, 64, segments=2).eval_batches(4)
    assert all(torch.equal(x.inputs, y.inputs) for x, y in zip(first, again))
    assert len(first) == 8 and [x.segment for x in first] == [0, 1] * 4
    # the 32 excerpts come from all held-out plays
    texts = [td.tokenizer.decode(x.inputs[r]) for x in first[::2] for r in range(8)]
    hits = {d.name for d in shakespeare.val for t in texts if t in d.text}
    assert hits == set(data.SHAKESPEARE_VAL_WORKS)
    with pytest.raises(ValueError, match="split"):
        td.batcher("test", 8, 64)


def test_bits_per_byte():
    assert data.bits_per_byte(math.log(2) * 100, 100) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        data.bits_per_byte(1.0, 0)


def test_data_file_that_is_not_utf8_warns_with_the_fraction(tmp_path):
    binary = tmp_path / "noise.txt"
    binary.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    with pytest.warns(UserWarning, match=r"noise.txt: [0-9.]+% of its .* not valid UTF-8.*"
                                         r"looks like a binary file"):
        load_corpus(binary)
    latin1 = tmp_path / "old.txt"
    latin1.write_bytes(("Le caf\xe9 est chaud, la soupe est froide. " * 100).encode("latin-1"))
    with pytest.warns(UserWarning, match=r"old.txt: 2\.5% of its 4,000 characters .* save it as"):
        load_corpus(latin1)
    clean = tmp_path / "clean.txt"  # valid UTF-8, even with its own U+FFFD: no warning
    clean.write_text("Caf\u00e9 \ufffd r\u00e9sum\u00e9.\r\n" * 100, encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        corpus = load_corpus(clean)
    assert "\r" not in corpus.train[0].text  # newlines as before (universal newlines)
