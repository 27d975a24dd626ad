"""A synthetic task (``titans_mini.tasks``) as a stream of training batches for the trainer.

The trainer (``titans_mini.trainer.Trainer``; lessons 08–12, coming, train their models with it)
takes ``data="mqar"``, ``"sniah_lite"`` or
``"selective_copy"``; this module turns that name into batches:

* ``TASK_NAMES``: the ``data`` names that select a task, aliases included;
* ``TaskData``: the task with sizes that follow the model, where batch ``step`` is a pure function
  of ``(seed, rank, step)`` (so resuming needs only the step count) and evaluation batches use
  seeds that training never draws.
"""

from __future__ import annotations

import numpy as np

from titans_mini import tasks as tasks_mod

__all__ = ["TASK_NAMES", "TaskData"]

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
