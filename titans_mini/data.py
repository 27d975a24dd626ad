"""Text data for the course: tokenizers, corpora and batching that keeps documents contiguous.

Lessons: 07 trains a one-layer memory model on the bundled Shakespeare text with these; lesson 11
(coming) trains the language model on them.

Three pieces, each usable on its own::

    corpus = load_corpus("shakespeare")          # bundled; or a .txt file / folder; or "tinystories"
    tok = ByteTokenizer()                         # vocab 256 (default); or BPETokenizer.train(...)
    data = TextData(corpus, tok)                  # token arrays per document
    batches = data.batcher("train", batch_size=16, seq_len=256, segments=4, seed=0)
    batch = batches.batch(step)                   # a pure function of the step: easy to resume

**Documents stay whole.** The validation split holds out whole documents (for Shakespeare: whole
plays), and every training row is a contiguous excerpt of *one* document. With ``segments=K``
an excerpt of ``K·seq_len`` tokens is served as K consecutive batches; a model may carry its
state (memory, attention cache) from one to the next, and ``batch.doc_start`` says when a new
excerpt begins and the state must be reset. All rows of a batch start new excerpts together, so
a whole-batch reset (``state=None``) is always correct.

Nothing here downloads at import or test time. The Hugging Face sources (TinyStories, a
FineWeb-Edu sample, PG-19) are optional, for Colab; offline or without ``datasets`` they fail at
once with a message that says what to do.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import socket
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "ByteTokenizer",
    "BPETokenizer",
    "make_tokenizer",
    "save_tokenizer",
    "load_tokenizer",
    "Document",
    "Corpus",
    "CorpusUnavailableError",
    "hf_reachable",
    "load_corpus",
    "CORPORA",
    "SHAKESPEARE_VAL_WORKS",
    "LMBatch",
    "TextData",
    "DocumentBatcher",
    "bits_per_byte",
]


# ============================================================================================
# Tokenizers
# ============================================================================================


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no training, nothing to save, lossless for any text."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """``str`` -> list of byte values."""
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """``str`` -> ``uint8`` numpy array (fast path for whole documents)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode whole documents."""
        return [self.encode_array(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text (invalid UTF-8 from a model sample becomes U+FFFD)."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """Bytes per token id (all 1): used for bits per byte."""
        return np.ones(256, dtype=np.int64)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


class BPETokenizer:
    """A byte-level BPE (the GPT-2 scheme) trained locally with Hugging Face ``tokenizers``.

    Byte-level means every text round-trips and there is no unknown token. Train it on the
    *training* split only (so validation text is never seen), save it next to the run, and load
    it from there when resuming or sampling::

        tok = BPETokenizer.train(corpus.train_texts(), vocab_size=4096)
        tok.save(run_dir); tok = BPETokenizer.load(run_dir)

    Vocabularies of 2k-8k suit the course's small models (the embedding stays small).
    """

    kind = "bpe"
    FILENAME = "tokenizer.json"

    def __init__(self, tokenizer):
        self._tk = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @staticmethod
    def _require():
        try:
            import tokenizers
        except ImportError as err:  # pragma: no cover - tokenizers is in the course/dev extras
            raise ImportError(
                "BPE needs the `tokenizers` package: pip install tokenizers "
                "(or pip install 'titans_mini[course]'), or use the byte tokenizer."
            ) from err
        return tokenizers

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 4096, *, min_frequency: int = 2
    ) -> BPETokenizer:
        """Learn merges from ``texts`` until the vocabulary has ``vocab_size`` entries."""
        if not isinstance(vocab_size, int) or not 257 <= vocab_size <= 65536:
            raise ValueError(
                f"BPE vocab_size must be an integer in 257..65536 (2k-8k suits the course), "
                f"got {vocab_size!r}"
            )
        tk = cls._require()
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(list(texts), trainer=trainer)
        return cls(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text).ids

    def encode_array(self, text: str) -> np.ndarray:
        return self.encode_many([text])[0]

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode whole documents (in pieces of 200 lines, one parallel batch for all)."""
        pieces, owner = [], []
        for i, text in enumerate(texts):
            lines = text.splitlines(keepends=True)
            for j in range(0, max(len(lines), 1), 200):
                pieces.append("".join(lines[j : j + 200]))
                owner.append(i)
        encoded = self._tk.encode_batch(pieces)
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        for i, enc in zip(owner, encoded):
            parts[i].append(np.asarray(enc.ids, dtype=np.int64))
        dtype = np.uint16 if self.vocab_size <= 65536 else np.int32
        return [np.concatenate(p).astype(dtype) for p in parts]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tk.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        """Bytes per token id: a byte-level token string has one character per byte."""
        return np.array(
            [len(self._tk.id_to_token(i) or "") for i in range(self.vocab_size)], dtype=np.int64
        )

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` into ``folder``; returns its path."""
        path = Path(folder) / self.FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tk.save(str(path))
        return path

    @classmethod
    def load(cls, folder_or_file: str | os.PathLike) -> BPETokenizer:
        """Load from a run folder (its ``tokenizer.json``) or the file itself."""
        path = Path(folder_or_file)
        if path.is_dir():
            path = path / cls.FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"no BPE tokenizer at {path}")
        tk = cls._require()
        return cls(tk.Tokenizer.from_file(str(path)))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


_TOKENIZER_META = "tokenizer_meta.json"


def make_tokenizer(
    kind: str = "byte", train_texts: Iterable[str] | None = None, vocab_size: int = 4096
) -> ByteTokenizer | BPETokenizer:
    """``"byte"`` (default) or ``"bpe"`` (trained on ``train_texts``, the training split)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if train_texts is None:
            raise ValueError("a BPE tokenizer needs train_texts (the corpus' training split)")
        return BPETokenizer.train(train_texts, vocab_size)
    raise ValueError(f"unknown tokenizer {kind!r}; use 'byte' or 'bpe'")


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """Record the tokenizer in a run folder (BPE: its ``tokenizer.json`` as well)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size}
    if isinstance(tokenizer, BPETokenizer):
        tokenizer.save(folder)
    (folder / _TOKENIZER_META).write_text(json.dumps(meta))


def load_tokenizer(folder: str | os.PathLike) -> ByteTokenizer | BPETokenizer:
    """The tokenizer a run folder was trained with."""
    meta_path = Path(folder) / _TOKENIZER_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: not a run folder with a saved tokenizer")
    kind = json.loads(meta_path.read_text())["kind"]
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.load(folder)
    raise ValueError(f"unknown tokenizer kind {kind!r} in {meta_path}")


# ============================================================================================
# Corpora
# ============================================================================================


@dataclass
class Document:
    """One document (a play, a book, a story, a file)."""

    name: str
    text: str


@dataclass
class Corpus:
    """Training and validation documents; no document is in both."""

    name: str
    train: list[Document]
    val: list[Document]
    description: str = ""

    def train_texts(self) -> list[str]:
        return [d.text for d in self.train]

    def val_texts(self) -> list[str]:
        return [d.text for d in self.val]

    def __repr__(self) -> str:
        chars = lambda docs: sum(len(d.text) for d in docs)
        return (
            f"Corpus({self.name!r}: {len(self.train)} train docs / {chars(self.train):,} chars, "
            f"{len(self.val)} val docs / {chars(self.val):,} chars)"
        )


class CorpusUnavailableError(RuntimeError):
    """An optional corpus cannot be loaded here (no ``datasets`` package, or offline)."""


SHAKESPEARE_VAL_WORKS = ("macbeth", "twelfth_night", "richard_ii", "tempest")
"""Whole plays held out for validation (a tragedy, a comedy, a history, a romance; ≈ 9 %)."""


def _load_shakespeare(val_works: Sequence[str] = SHAKESPEARE_VAL_WORKS) -> Corpus:
    path = resources.files("titans_mini") / "data" / "shakespeare.jsonl.gz"
    with path.open("rb") as fh, gzip.open(fh, "rt", encoding="utf-8") as lines:
        records = [json.loads(line) for line in lines if line.strip()]
    names = {r["work"] for r in records}
    unknown = sorted(set(val_works) - names)
    if unknown:
        raise ValueError(
            f"unknown Shakespeare work(s) {unknown}; known: {', '.join(sorted(names))}"
        )
    train = [Document(r["work"], r["text"]) for r in records if r["work"] not in val_works]
    val = [Document(r["work"], r["text"]) for r in records if r["work"] in val_works]
    return Corpus(
        "shakespeare",
        train,
        val,
        "Shakespeare's 42 works (public domain; see titans_mini/data/PROVENANCE.md); "
        f"validation = whole works {', '.join(val_works)}",
    )


def _split_single_text(name: str, text: str, val_fraction: float) -> tuple[list, list]:
    """One text: the last ``val_fraction`` (cut at a line break) is validation."""
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.rfind("\n", 0, cut)
    if newline > len(text) // 2:
        cut = newline + 1
    return [Document(f"{name}[train]", text[:cut])], [Document(f"{name}[val]", text[cut:])]


_TEXT_SUFFIXES = (".txt", ".md", ".text")


def _read_text(path: Path) -> str:
    """A local text file as UTF-8 (bytes that are not UTF-8 become U+FFFD, newlines become
    ``\\n``), with a warning that gives the fraction of replaced characters when there are any,
    and says when the file looks binary (NUL bytes, or more than 10 % replaced)."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode())  # not the file's own U+FFFD
    nul = raw.count(b"\0")
    if replaced > 0 or nul:
        fraction = replaced / max(len(text), 1)
        what = (
            f"{fraction:.1%} of its {len(text):,} characters are not valid UTF-8 (replaced by "
            "U+FFFD)"
        )
        if nul:
            what += f" and it holds {nul:,} NUL bytes"
        if nul or fraction > 0.1:
            advice = "it looks like a binary file, not text: train on a UTF-8 text file"
        else:
            advice = (
                "if it is text in another encoding, save it as UTF-8 "
                "(e.g. iconv -f latin1 -t utf-8)"
            )
        warnings.warn(f"data file {path}: {what}; {advice}", UserWarning, stacklevel=4)
    return text


def _load_local(path: Path, val_fraction: float, seed: int) -> Corpus:
    if path.is_file():
        text = _read_text(path)
        if not text.strip():
            raise ValueError(f"{path} is empty")
        train, val = _split_single_text(path.name, text, val_fraction)
        return Corpus(path.name, train, val, f"{path} (last {val_fraction:.0%} = validation)")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES)
    docs = [
        Document(str(p.relative_to(path)), _read_text(p))
        for p in files
    ]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"no non-empty text files ({', '.join(_TEXT_SUFFIXES)}) under {path}")
    if len(docs) == 1:
        train, val = _split_single_text(docs[0].name, docs[0].text, val_fraction)
        return Corpus(
            path.name, train, val, f"{path}: one file, last {val_fraction:.0%} = validation"
        )
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    order = np.random.default_rng(seed).permutation(len(docs))
    val_ids = set(order[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return Corpus(path.name, train, val, f"{path}: {len(docs)} files, {n_val} held out whole")


# Hugging Face sources: name -> (dataset id, config, train split, val split or None, text field,
# default number of train documents). Without a val split, every 10th document is held out.
_HF_SOURCES = {
    "tinystories": ("roneneldan/TinyStories", None, "train", "validation", "text", 20000),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", None, "text", 4000),
    "pg19": ("emozilla/pg19", None, "train", "validation", "text", 100),
}


def hf_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub answers on port 443 (one short connection attempt)."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hf(name: str, max_docs: int | None) -> Corpus:
    repo, config, train_split, val_split, text_field, default_docs = _HF_SOURCES[name]
    try:
        import datasets
    except ImportError as err:
        raise CorpusUnavailableError(
            f"corpus {name!r} comes from the Hugging Face hub and needs the `datasets` package: "
            "`pip install datasets` (on Colab it is preinstalled). Offline, use the bundled "
            "corpus ('shakespeare') or a local text file/folder."
        ) from err
    offline_vars = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    if any(
        os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"} for v in offline_vars
    ):
        raise CorpusUnavailableError(
            f"corpus {name!r} must be downloaded, but Hugging Face offline mode is on "
            f"({' / '.join(offline_vars)}). Unset it, or use 'shakespeare' or a local path."
        )
    if not hf_reachable():
        raise CorpusUnavailableError(
            f"corpus {name!r} must be downloaded from huggingface.co, which is not reachable. "
            "Connect to the internet (e.g. on Colab), or use 'shakespeare' or a local path."
        )
    n_train = default_docs if max_docs is None else int(max_docs)
    n_val = max(1, n_train // 10)

    def take(split: str, n: int) -> list[str]:
        stream = datasets.load_dataset(repo, config, split=split, streaming=True)
        out = []
        for row in stream:
            out.append(row[text_field])
            if len(out) >= n:
                break
        return out

    if val_split is not None:
        train_texts, val_texts = take(train_split, n_train), take(val_split, n_val)
    else:
        texts = take(train_split, n_train + n_val)
        val_texts = texts[::11][:n_val]
        held = set(range(0, len(texts), 11)[:n_val])
        train_texts = [t for i, t in enumerate(texts) if i not in held]
    train = [Document(f"{name}/train/{i}", t) for i, t in enumerate(train_texts)]
    val = [Document(f"{name}/val/{i}", t) for i, t in enumerate(val_texts)]
    return Corpus(name, train, val, f"{repo} ({config or 'default'}), first documents, streamed")


CORPORA = ("shakespeare", *_HF_SOURCES)
"""Corpus names ``load_corpus`` knows; anything else must be a local path."""


def load_corpus(
    name_or_path: str | os.PathLike = "shakespeare",
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_docs: int | None = None,
) -> Corpus:
    """Load a corpus, split into training and validation *documents*.

    Args:
        name_or_path: ``"shakespeare"`` (bundled, default); a local ``.txt`` file (its last
            ``val_fraction``, cut at a line break, is validation) or a folder of text files
            (``val_fraction`` of the files held out whole, chosen by ``seed``); or, with internet
            and the ``datasets`` package, ``"tinystories"``, ``"fineweb-edu"`` (a sample) or
            ``"pg19"``.
        val_fraction: share of a local corpus held out.
        seed: which files of a local folder are held out.
        max_docs: number of training documents to stream from a Hugging Face source.

    Raises:
        ValueError: unknown name, empty file/folder, bad ``val_fraction``.
        FileNotFoundError: a path that does not exist.
        CorpusUnavailableError: a Hugging Face source without ``datasets`` or internet.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    key = str(name_or_path)
    if key.lower() in CORPORA and not Path(key).exists():
        key = key.lower()
        return _load_shakespeare() if key == "shakespeare" else _load_hf(key, max_docs)
    path = Path(key).expanduser()
    if path.exists():
        return _load_local(path, val_fraction, seed)
    if os.sep in key or "/" in key or path.suffix:
        raise FileNotFoundError(f"corpus path {key!r} does not exist")
    raise ValueError(
        f"unknown corpus {key!r}: use one of {', '.join(CORPORA)} or the path of a text file "
        "or folder"
    )


# ============================================================================================
# Batching
# ============================================================================================


@dataclass
class LMBatch:
    """One training or evaluation batch.

    Attributes:
        inputs: ``(B, T)`` int64 token ids.
        targets: ``(B, T)`` int64 next tokens (``inputs`` shifted by one).
        doc_start: ``(B,)`` bool, True where the row begins a new document excerpt; a model's
            carried state must be reset there (all rows agree, so ``state=None`` does it).
        segment: index of this batch inside its excerpt (0 .. segments − 1).
        weights: ``(B, T)`` float per-token loss weights, or None for a plain mean (the trainer
            then minimises sum(weights · loss) / sum(weights); ``task_stream.RecallMix``).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    doc_start: torch.Tensor
    segment: int = 0
    weights: torch.Tensor | None = None

    @property
    def reset(self) -> bool:
        """True when the carried state must be dropped before this batch."""
        return bool(self.doc_start.any())

    def to(self, device) -> LMBatch:
        weights = None if self.weights is None else self.weights.to(device)
        return LMBatch(
            self.inputs.to(device), self.targets.to(device), self.doc_start, self.segment, weights
        )


def _pack(docs: list[np.ndarray], min_len: int, sep: np.ndarray) -> list[np.ndarray]:
    """Join consecutive documents shorter than ``min_len`` (with ``sep`` between) so that every
    result has at least ``min_len`` tokens where possible."""
    out, pending = [], []
    for d in docs:
        if len(d) >= min_len and not pending:
            out.append(d)
            continue
        pending.append(d)
        joined = sum(len(p) for p in pending) + len(sep) * (len(pending) - 1)
        if joined >= min_len:
            out.append(np.concatenate([x for p in pending for x in (p, sep)][:-1]))
            pending = []
    if pending:
        tail = np.concatenate([x for p in pending for x in (p, sep)][:-1])
        if out:
            out[-1] = np.concatenate([out[-1], sep, tail])
        else:
            out.append(tail)
    return out


class DocumentBatcher:
    """Serves ``(B, seq_len)`` batches cut from contiguous excerpts of single documents.

    An excerpt (one row) is ``segments·seq_len + 1`` consecutive tokens of one document; it is
    served as ``segments`` consecutive batches, so ``batch(step)`` for steps ``w·K .. w·K+K−1``
    continue the same rows (``doc_start`` True only at ``w·K``).

    * ``split="train"``: excerpt starts are uniform over all valid (document, offset) pairs,
      drawn from a generator seeded by ``(seed, rank, w)``: ``batch(step)`` is a pure function of
      ``step``, so resuming needs only the step, and each DDP rank sees different rows.
    * ``split="val"``: excerpt starts spread over all validation documents by a low-discrepancy
      (golden-ratio) sequence, the same every time (``eval_batches``), so any number of eval
      batches covers every held-out document roughly evenly.

    Documents shorter than one excerpt are joined with their neighbours (blank line between).
    """

    def __init__(
        self,
        docs: list[np.ndarray],
        batch_size: int,
        seq_len: int,
        segments: int = 1,
        *,
        seed: int = 0,
        rank: int = 0,
        separator: np.ndarray | None = None,
        split: str = "train",
    ):
        if batch_size < 1 or seq_len < 1 or segments < 1:
            raise ValueError(
                f"batch_size, seq_len and segments must be >= 1, got {batch_size}, {seq_len}, {segments}"
            )
        self.batch_size, self.seq_len, self.segments = batch_size, seq_len, segments
        self.seed, self.rank, self.split = seed, rank, split
        self.window = segments * seq_len + 1
        sep = np.array([10, 10]) if separator is None else np.asarray(separator)
        docs = _pack([np.asarray(d) for d in docs if len(d)], self.window, sep.astype(np.int64))
        self.docs = [d for d in docs if len(d) >= self.window]
        if not self.docs:
            longest = max((len(d) for d in docs), default=0)
            raise ValueError(
                f"the {split} split has only {longest} tokens in a row, fewer than one excerpt of "
                f"segments·seq_len + 1 = {self.window}; use a smaller seq_len or segments"
            )
        # valid start offsets per document and their running total
        self._starts = np.array([len(d) - self.window + 1 for d in self.docs], dtype=np.int64)
        self._cum = np.cumsum(self._starts)
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def num_tokens(self) -> int:
        return int(sum(len(d) for d in self.docs))

    def _locate(self, flat: np.ndarray) -> list[tuple[int, int]]:
        doc = np.searchsorted(self._cum, flat, side="right")
        prev = np.where(doc > 0, self._cum[np.maximum(doc - 1, 0)], 0)
        return list(zip(doc.tolist(), (flat - prev).tolist()))

    def _excerpts(self, w: int) -> np.ndarray:
        """``(B, window)`` tokens of excerpt group ``w``."""
        if self._cache is not None and self._cache[0] == w:
            return self._cache[1]
        total = int(self._cum[-1])
        if self.split == "train":
            rng = np.random.default_rng([self.seed, self.rank, w])
            flat = rng.integers(0, total, size=self.batch_size)
        else:  # golden-ratio sequence: deterministic, evenly spread; group w takes the next B
            flat = (np.arange(self.batch_size) + w * self.batch_size) * 0.6180339887 % 1.0
            flat = (flat * total).astype(np.int64)
        rows = np.stack([self.docs[d][o : o + self.window] for d, o in self._locate(flat)])
        rows = rows.astype(np.int64)
        self._cache = (w, rows)
        return rows

    def batch(self, step: int) -> LMBatch:
        """The batch served at ``step`` (0-based)."""
        w, s = divmod(int(step), self.segments)
        rows = self._excerpts(w)
        chunk = torch.from_numpy(rows[:, s * self.seq_len : (s + 1) * self.seq_len + 1])
        return LMBatch(
            inputs=chunk[:, :-1].contiguous(),
            targets=chunk[:, 1:].contiguous(),
            doc_start=torch.full((self.batch_size,), s == 0),
            segment=s,
        )

    def __iter__(self):
        step = 0
        while True:
            yield self.batch(step)
            step += 1

    def eval_batches(self, n_excerpt_groups: int = 1) -> list[LMBatch]:
        """``n_excerpt_groups · segments`` batches in order (segments of one group consecutive)."""
        return [self.batch(i) for i in range(n_excerpt_groups * self.segments)]


class TextData:
    """A corpus tokenized once: token arrays per document, and batchers over them.

    ``TextData(corpus, tokenizer)``; ``data.batcher("train" | "val", batch_size, seq_len,
    segments=1, seed=0, rank=0)``.
    """

    def __init__(self, corpus: Corpus, tokenizer=None):
        self.corpus = corpus
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.train_docs = self.tokenizer.encode_many(corpus.train_texts())
        self.val_docs = self.tokenizer.encode_many(corpus.val_texts())
        self.separator = np.asarray(self.tokenizer.encode("\n\n"), dtype=np.int64)
        self.token_bytes = self.tokenizer.token_bytes()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def batcher(
        self,
        split: str,
        batch_size: int,
        seq_len: int,
        segments: int = 1,
        *,
        seed: int = 0,
        rank: int = 0,
    ) -> DocumentBatcher:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        docs = self.train_docs if split == "train" else self.val_docs
        return DocumentBatcher(
            docs, batch_size, seq_len, segments, seed=seed, rank=rank,
            separator=self.separator, split=split,
        )  # fmt: skip

    def __repr__(self) -> str:
        n = lambda docs: sum(len(d) for d in docs)
        return (
            f"TextData({self.corpus.name!r}, {self.tokenizer!r}: {n(self.train_docs):,} train "
            f"tokens, {n(self.val_docs):,} val tokens)"
        )


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """Summed next-token loss (nats) over a text -> bits per byte of that text.

    For the byte tokenizer this is loss / ln 2; for BPE the count of bytes the scored target
    tokens stand for replaces the token count, so numbers compare across tokenizers.
    """
    if total_bytes <= 0:
        raise ValueError("total_bytes must be positive")
    return total_nats / (math.log(2) * total_bytes)
