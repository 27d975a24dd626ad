"""How to train: ``TrainConfig``, the per-preset defaults and the learning-rate schedule.

The trainer (``titans_mini.trainer.Trainer``; lessons 08–12, coming, train their models with it)
and its command line (``titans_mini.train``)
read these; the model's shape lives in ``titans_mini.models.TitansConfig``.

* ``TrainConfig``: steps, batch, optimiser, schedule, evaluation, logging, checkpoints, device,
  precision, tokenizer and sampling settings, with ``validate()``;
* ``TRAIN_DEFAULTS``: the command line's training defaults per model preset;
* ``lr_lambda``: linear warm-up, then cosine decay to ``min_lr_ratio · lr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["TrainConfig", "TRAIN_DEFAULTS", "lr_lambda"]


@dataclass
class TrainConfig:
    """Everything about *how* to train (the model's shape lives in ``TitansConfig``).

    steps:          optimizer steps in total (the cosine schedule spans them)
    batch_size:     rows per step on each process
    seq_len:        tokens per row and step (None: the model config's ``seq_len``)
    segments:       consecutive segments per document excerpt; state carried across them
    lr:             peak learning rate; warm-up from 0, cosine down to ``min_lr_ratio · lr``
    warmup_steps:   None: min(100, steps // 10)
    weight_decay:   AdamW decay on weight matrices (not on norms, biases)
    betas:          AdamW betas
    grad_clip:      max global gradient norm (0 = off)
    eval_every:     evaluate every this many steps (0: only at the end)
    eval_batches:   excerpt groups (text) or batches (tasks) per evaluation
    log_every:      write a metrics row every this many steps
    ckpt_every:     checkpoint every this many steps (None: at each evaluation; 0: only at the end)
    seed:           model initialisation, data order, sampling
    device:         "cpu", "cuda", "mps" or None (auto)
    precision:      "fp32", "bf16", "fp16" or None (auto from the device)
    compile:        wrap the model in ``torch.compile``
    tokenizer:      "byte" (vocab 256) or "bpe" (trained on the training split, saved with the run)
    bpe_vocab:      BPE vocabulary size (2k-8k suits the course)
    sample_tokens:  length of the text sample after training (0: none)
    progress:       show a tqdm progress bar
    recall_rows:    rows of every text batch replaced by S-NIAH-lite facts in corpus text
                    (``task_stream.RecallMix``; lesson 11); 0: plain text
    recall_digits:  digits of those facts' numbers
    """

    steps: int = 200
    batch_size: int = 16
    seq_len: int | None = None
    segments: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    ckpt_every: int | None = None
    seed: int = 0
    device: str | None = None
    precision: str | None = None
    compile: bool = False
    tokenizer: str = "byte"
    bpe_vocab: int = 4096
    sample_tokens: int = 200
    progress: bool = True
    recall_rows: int = 0
    recall_digits: int = 4

    def validate(self) -> None:
        """Raise ``ValueError`` for any impossible setting (before any work starts)."""
        positive = ("steps", "batch_size", "segments", "log_every", "eval_batches")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "sample_tokens", "recall_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.ckpt_every is not None and self.ckpt_every < 0:
            raise ValueError(f"ckpt_every must be >= 0 or None, got {self.ckpt_every}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.precision not in (None, "fp32", "bf16", "fp16"):
            raise ValueError(
                f"precision must be 'fp32', 'bf16', 'fp16' or None, got {self.precision!r}"
            )
        if self.recall_rows and not 0 < self.recall_rows < self.batch_size:
            raise ValueError(
                f"recall_rows must be below batch_size ({self.batch_size}) so that some rows stay "
                f"text, got {self.recall_rows}"
            )
        if self.recall_rows and self.segments != 1:
            raise ValueError("recall_rows needs segments=1 (a fact row is one segment)")
        if self.tokenizer not in ("byte", "bpe"):
            raise ValueError(f"tokenizer must be 'byte' or 'bpe', got {self.tokenizer!r}")

    @property
    def warmup(self) -> int:
        """Warm-up steps: ``warmup_steps``, or min(100, steps // 10) when that is None."""
        return min(100, self.steps // 10) if self.warmup_steps is None else self.warmup_steps


TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(batch_size=8, lr=3e-3, eval_every=20, log_every=5, sample_tokens=64),
    "cpu-demo": dict(batch_size=16, lr=2e-3, eval_every=100, log_every=10),
    "colab-t4": dict(batch_size=32, lr=1e-3, eval_every=250, log_every=25, eval_batches=8),
    "cpu-lm": dict(batch_size=16, lr=2e-3, eval_every=100, log_every=10),
    "t4-lm": dict(batch_size=32, lr=2e-3, eval_every=100, log_every=10, eval_batches=8),
}
"""Training defaults per model preset (command line); ``TrainConfig``'s defaults otherwise."""


def lr_lambda(step: int, *, steps: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine to
    ``min_ratio`` at ``steps``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
