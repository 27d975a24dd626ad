"""A synthetic task (``titans_mini.tasks``) as a stream of training batches for the trainer.

The trainer (``titans_mini.trainer.Trainer``; lessons 08–12, coming, train their models with it)
takes ``data="mqar"``, ``"sniah_lite"`` or
``"selective_copy"``; this module turns that name into batches:

* ``TASK_NAMES``: the ``data`` names that select a task, aliases included;
* ``TaskData``: the task with sizes that follow the model, where batch ``step`` is a pure function
  of ``(seed, rank, step)`` (so resuming needs only the step count) and evaluation batches use
  seeds that training never draws;
* ``RecallMix``: corpus text with S-NIAH-lite facts mixed into every batch (lesson 11;
  ``TrainConfig.recall_rows``), with per-token loss weights.
"""

from __future__ import annotations

import numpy as np
import torch

from titans_mini import tasks as tasks_mod
from titans_mini.data import DocumentBatcher

__all__ = ["TASK_NAMES", "TaskData", "RecallMix", "sniah_rows", "sniah_in_text"]

TASK_NAMES = {
    "mqar": "mqar",
    "sniah_lite": "sniah_lite",
    "sniah": "sniah_lite",
    "s-niah-lite": "sniah_lite",
    "selective_copy": "selective_copy",
    "selective-copy": "selective_copy",
}
"""``data`` names that select a synthetic task (aliases included)."""


def _seed_of(*parts: int) -> int:
    """One 32-bit seed from several integers (numpy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class TaskData:
    """A synthetic task as a stream of batches: ``batch(step)`` is a pure function of the step.

    Parameters follow the model: ``length = seq_len`` and, for MQAR, ``vocab_size`` = the
    model's and ``num_pairs = seq_len // 16`` (Zoology's CPU config: V 256, L 64, N 4);
    S-NIAH-lite uses bytes and a needle at a random RULER depth per row; selective copying uses
    ``seq_len // 8`` tokens from a vocabulary of 16. Override any of them with ``task_kwargs``.
    Evaluation batches use seeds that training never draws.
    """

    def __init__(
        self,
        name: str,
        vocab_size: int,
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        **task_kwargs,
    ):
        if name not in TASK_NAMES:
            raise ValueError(
                f"unknown task {name!r}; tasks: {', '.join(sorted(set(TASK_NAMES.values())))}"
            )
        self.name = TASK_NAMES[name]
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.seed, self.rank = seed, rank
        self.fn = tasks_mod.TASKS[self.name]
        if self.name == "mqar":
            self.kwargs = dict(
                vocab_size=vocab_size, num_pairs=max(1, seq_len // 16), length=seq_len
            )
        elif self.name == "sniah_lite":
            if vocab_size < 256:
                raise ValueError(
                    f"sniah_lite is byte text: needs vocab_size >= 256, got {vocab_size}"
                )
            self.kwargs = dict(length=seq_len)
        else:
            self.kwargs = dict(
                length=seq_len, num_tokens=max(1, seq_len // 8), vocab_size=min(16, vocab_size)
            )
        self.kwargs.update(task_kwargs)
        if self.name == "sniah_lite":  # every row, not only the first: keys differ in length
            need = tasks_mod.sniah_lite_min_length(
                self.kwargs.get("num_digits", 7), self.kwargs.get("tokenizer")
            )
            if self.kwargs.get("length", seq_len) < need:
                raise ValueError(
                    f"sniah_lite: seq_len {self.kwargs.get('length', seq_len)} is too short for "
                    f"some rows (the longest needle, question and answer need {need} tokens): "
                    f"use --seq-len {need} or more"
                )
        self._make(0, 1)  # fail now, with the task's own message, if the sizes do not fit

    def _make(self, seed: int, batch_size: int) -> tasks_mod.TaskBatch:
        kwargs = dict(self.kwargs)
        if self.name == "sniah_lite" and "depth" not in kwargs:
            rng = np.random.default_rng(seed)
            kwargs["depth"] = rng.choice(tasks_mod.RULER_DEPTHS, size=batch_size).tolist()
        return self.fn(batch_size, seed=seed, **kwargs)

    def batch(self, step: int) -> tasks_mod.TaskBatch:
        """The training batch of ``step`` (this process's rows under torchrun)."""
        return self._make(_seed_of(self.seed, self.rank, step), self.batch_size)

    def eval_batches(self, n: int) -> list[tasks_mod.TaskBatch]:
        """``n`` held-out batches, the same on every rank and in every run with this seed."""
        return [self._make(_seed_of(self.seed, 2**31 - 1, i), self.batch_size) for i in range(n)]


class RecallMix:
    """Corpus text with S-NIAH-lite facts mixed in: the training stream of lesson 11.

    Plain text rarely rewards a small model for remembering anything further back than its
    attention reaches, so the outer training loop never teaches the memory's projections to write
    and read. ``RecallMix`` replaces the last ``recall_rows`` rows of every text batch by an
    S-NIAH-lite row (``tasks.sniah_lite``) whose haystack is corpus text from the same split:

        [text ...] One of the special magic numbers for {key} is: {digits}. [text ...]
        What is the special magic number for {key}? Answer: {digits}

    with the needle at a depth drawn uniformly from [0, ``max_depth``] (far from the question).
    ``batch(step)`` returns the text batcher's ``LMBatch`` with ``weights`` (B, T): 1 on the text
    rows, ``haystack_weight`` on the recall rows' haystack, and on the answer tokens together the
    same total weight as all the rest (the training loss is then the mean of "text" and "answer"
    cross-entropies, so four answer bytes are not drowned by thousands of text bytes).
    Like every batcher here, ``batch(step)`` is a pure function of ``(seed, rank, step)``.
    """

    def __init__(self, text, batcher, recall_rows: int, *, num_digits: int = 4,
                 max_depth: float = 0.6, haystack_weight: float = 0.5, seed: int = 0,
                 rank: int = 0):
        if not 0 < recall_rows < batcher.batch_size:
            raise ValueError(
                f"recall_rows must be between 1 and batch_size - 1 = {batcher.batch_size - 1} "
                f"(some rows stay text), got {recall_rows}"
            )
        if batcher.segments != 1:
            raise ValueError("a recall mix trains on single segments: use segments=1")
        need = tasks_mod.sniah_lite_min_length(num_digits, text.tokenizer)
        if batcher.seq_len < need + 16:
            raise ValueError(
                f"seq_len {batcher.seq_len} is too short for a recall row (needle, question and "
                f"answer take {need} tokens): use seq_len >= {need + 16}"
            )
        if not 0.0 <= max_depth <= 1.0:
            raise ValueError(f"max_depth must lie in [0, 1], got {max_depth}")
        self.text, self.batcher, self.recall_rows = text, batcher, recall_rows
        self.num_digits, self.max_depth, self.haystack_weight = num_digits, max_depth, haystack_weight
        self.seed, self.rank = seed, rank
        self.batch_size, self.seq_len, self.segments = batcher.batch_size, batcher.seq_len, 1
        # haystacks: excerpts of the same split, 4 rows long so that a needle rarely wraps
        self._hay = type(batcher)(batcher.docs, recall_rows, 4 * batcher.seq_len, split="train",
                                  seed=_seed_of(seed, 7), rank=rank)

    def recall_batch(self, step: int) -> tasks_mod.TaskBatch:
        """The S-NIAH-lite rows of ``step``."""
        rng = np.random.default_rng(_seed_of(self.seed, self.rank, step, 1))
        return sniah_rows(self._hay.batch(step).inputs, self.seq_len, self.text.tokenizer, rng,
                          max_depth=self.max_depth, num_digits=self.num_digits)

    def batch(self, step: int):
        b = self.batcher.batch(step)
        r = self.recall_batch(step)
        k = self.recall_rows
        inputs, targets = b.inputs.clone(), b.targets.clone()
        inputs[-k:] = r.inputs
        # recall rows: next-token targets on the haystack too (it is text), the answer as scored
        targets[-k:, :-1] = r.inputs[:, 1:]
        targets[-k:][r.score_mask] = r.targets[r.score_mask]
        weights = torch.ones(targets.shape)
        weights[-k:] = self.haystack_weight
        answer = torch.zeros(targets.shape, dtype=torch.bool)
        answer[-k:] = r.score_mask
        weights[answer] = 0.0
        weights[answer] = weights.sum() / answer.sum()
        b.inputs, b.targets, b.weights = inputs, targets, weights
        return b


def sniah_rows(haystacks: torch.Tensor, length: int, tokenizer, rng: np.random.Generator, *,
               distance: int | None = None, max_depth: float = 0.6,
               num_digits: int = 4) -> tasks_mod.TaskBatch:
    """One S-NIAH-lite row of ``length`` tokens per haystack row (token ids, (n, L')): the
    needle at ``distance`` tokens before the answer, or at a depth drawn from [0, max_depth]."""
    rows = []
    for hay in haystacks:
        place = (dict(distance=distance) if distance is not None
                 else dict(depth=float(rng.uniform(0, max_depth))))
        rows.append(tasks_mod.sniah_lite(
            1, length, seed=int(rng.integers(2**31)), haystack=hay.tolist(),
            tokenizer=tokenizer, num_digits=num_digits, **place,
        ))  # fmt: skip
    return tasks_mod.TaskBatch(
        torch.cat([r.inputs for r in rows]), torch.cat([r.targets for r in rows]),
        torch.cat([r.score_mask for r in rows]), "sniah_lite",
        {"answers": [a for r in rows for a in r.info["answers"]],
         "distance": torch.cat([r.info["distance"] for r in rows])},
        rows[0].metric,
    )  # fmt: skip


def sniah_in_text(text, n: int, distance: int, *, split: str = "val", num_digits: int = 4,
                  seed: int = 0) -> tasks_mod.TaskBatch:
    """``n`` S-NIAH-lite rows in the corpus's ``split`` text (lesson 11's recall probe): the
    number is asked ``distance`` tokens after the needle; each row is just long enough
    (``distance`` + the question, the answer and a little text before the needle)."""
    need = tasks_mod.sniah_lite_min_length(num_digits, text.tokenizer)
    length = distance + need
    docs = text.val_docs if split == "val" else text.train_docs
    hay = DocumentBatcher(docs, n, 4 * length, split="train", seed=seed,
                          separator=text.separator).batch(0).inputs
    return sniah_rows(hay, length, text.tokenizer, np.random.default_rng(seed),
                      distance=distance, num_digits=num_digits)
