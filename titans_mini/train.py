"""One trainer for the notebooks and the command line, from a laptop CPU to Colab and torchrun.

In a notebook::

    from titans_mini.models import TitansConfig
    from titans_mini.train import Trainer, TrainConfig

    trainer = Trainer(TitansConfig.preset("cpu-demo", variant="mag"), data="shakespeare",
                      config=TrainConfig(steps=300, batch_size=16))
    trainer.fit()                       # progress bar, periodic validation, a text sample
    trainer.history                     # the rows of metrics.jsonl, as dicts

On the command line (the same code)::

    python -m titans_mini.train --preset colab-t4 --variant mag --steps 2000 --out runs/mag
    python -m titans_mini.train ... --out runs/mag --resume          # continue where it stopped
    torchrun --nproc_per_node=2 -m titans_mini.train ...             # DistributedDataParallel

What it does, step by step:

* **Optimisation**: AdamW (weight decay on matrices only), linear warm-up then cosine decay to
  ``min_lr_ratio · lr``, gradient clipping, mixed precision chosen by ``titans_mini.device``
  (bf16 on compute capability ≥ 8.0, fp16 + gradient scaler on a T4, fp32 on the CPU), and
  optionally ``torch.compile``. A Titans variant that runs out of GPU memory switches its memory
  layers to chunk checkpointing (exact, slower) and repeats the step.
* **Data**: a text corpus (``titans_mini.data``) or a synthetic task (``titans_mini.tasks``:
  ``mqar``, ``sniah_lite``, ``selective_copy``). Batch ``step`` is a pure function of the step,
  so resuming needs only the step count. With ``segments = K > 1`` each row is a document
  excerpt of K consecutive segments and the model's state (memory, attention cache) is carried
  across them, detached between steps (truncated back-propagation through time).
* **Run folder** (optional in notebooks): ``config.json``, ``metrics.jsonl`` (one JSON object per
  log step: ``step``, ``train_loss``, ``lr``, ``tokens_per_s``, and ``val_loss`` /
  ``val_bpb`` / ``val_acc`` when evaluated), the tokenizer, ``checkpoint.pt`` (written to a
  temporary file, then renamed: an interrupted write leaves the previous checkpoint intact) and
  ``sample.txt``.
* **Resume**: restores model, optimiser, scheduler, gradient scaler, RNG states, the carried
  state and the data position: a resumed run matches an uninterrupted one.
* **DDP**: under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
  ``DistributedDataParallel`` (gloo on the CPU, NCCL on CUDA); each rank reads different rows;
  only rank 0 logs, checkpoints and samples.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from titans_mini import data as data_mod
from titans_mini import tasks as tasks_mod
from titans_mini.device import BF16, FP16, FP32, pick_device, pick_precision

__all__ = [
    "TrainConfig",
    "Trainer",
    "TaskData",
    "TRAIN_DEFAULTS",
    "TASK_NAMES",
    "save_checkpoint",
    "load_checkpoint",
    "build_parser",
    "main",
]

CHECKPOINT = "checkpoint.pt"
OOM_CHECKPOINT_CHUNKS = 8  # chunk-checkpointing group switched on after an out-of-memory error
METRICS = "metrics.jsonl"
CONFIG = "config.json"
SAMPLE = "sample.txt"


# ============================================================================================
# Configuration
# ============================================================================================


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

    def validate(self) -> None:
        """Raise ``ValueError`` for any impossible setting (before any work starts)."""
        positive = ("steps", "batch_size", "segments", "log_every", "eval_batches")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "sample_tokens"):
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
        if self.tokenizer not in ("byte", "bpe"):
            raise ValueError(f"tokenizer must be 'byte' or 'bpe', got {self.tokenizer!r}")

    @property
    def warmup(self) -> int:
        return min(100, self.steps // 10) if self.warmup_steps is None else self.warmup_steps


TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(batch_size=8, lr=3e-3, eval_every=20, log_every=5, sample_tokens=64),
    "cpu-demo": dict(batch_size=16, lr=2e-3, eval_every=100, log_every=10),
    "colab-t4": dict(batch_size=32, lr=1e-3, eval_every=250, log_every=25, eval_batches=8),
}
"""Training defaults per model preset (command line); ``TrainConfig``'s defaults otherwise."""


def lr_lambda(step: int, *, steps: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine to
    ``min_ratio`` at ``steps``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ============================================================================================
# Synthetic tasks as training data
# ============================================================================================

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
        self._make(0, 1)  # fail now, with the task's own message, if the sizes do not fit

    def _make(self, seed: int, batch_size: int) -> tasks_mod.TaskBatch:
        kwargs = dict(self.kwargs)
        if self.name == "sniah_lite" and "depth" not in kwargs:
            rng = np.random.default_rng(seed)
            kwargs["depth"] = rng.choice(tasks_mod.RULER_DEPTHS, size=batch_size).tolist()
        return self.fn(batch_size, seed=seed, **kwargs)

    def batch(self, step: int) -> tasks_mod.TaskBatch:
        return self._make(_seed_of(self.seed, self.rank, step), self.batch_size)

    def eval_batches(self, n: int) -> list[tasks_mod.TaskBatch]:
        return [self._make(_seed_of(self.seed, 2**31 - 1, i), self.batch_size) for i in range(n)]


# ============================================================================================
# Checkpoints
# ============================================================================================


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``.

    The rename is atomic, so a crash or interrupt mid-write leaves the previous checkpoint at
    ``path`` intact (and the temporary file is removed).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (our own files: full unpickling)."""
    return torch.load(path, map_location=map_location, weights_only=False)


def _detach(obj):
    """Detach every tensor inside a (nested) model state: tensors, lists, tuples, dicts,
    dataclasses. Used between steps so back-propagation stops at the segment boundary."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, list):
        return [_detach(x) for x in obj]
    if isinstance(obj, tuple):
        items = [_detach(x) for x in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        new = copy.copy(obj)
        for f in dataclasses.fields(obj):
            object.__setattr__(new, f.name, _detach(getattr(obj, f.name)))
        return new
    return obj


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ============================================================================================
# The trainer
# ============================================================================================


def _world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (1 process without it)."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` if needed and prove it is writable; ``ValueError`` otherwise."""
    path = Path(out_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"output folder {str(path)!r} is not writable: {err}") from err
    return path


def check_data(spec) -> None:
    """Fail fast (``ValueError`` / ``FileNotFoundError``) for a data name or path that cannot
    work, without loading anything large."""
    if not isinstance(spec, (str, os.PathLike)):
        return
    key = str(spec)
    if (
        key.lower() in TASK_NAMES
        or key.lower() in data_mod.CORPORA
        or Path(key).expanduser().exists()
    ):
        return
    known = ", ".join([*data_mod.CORPORA, *sorted(set(TASK_NAMES.values()))])
    if os.sep in key or "/" in key or Path(key).suffix:
        raise FileNotFoundError(f"data path {key!r} does not exist")
    raise ValueError(f"unknown data {key!r}: use one of {known}, or a text file or folder")


class Trainer:
    """Train a language model on a corpus or a synthetic task.

    Args:
        model: a ``TitansConfig`` (the model is built with ``TitansLM``, seeded by
            ``config.seed``; its ``vocab_size`` follows the tokenizer) or a ready ``nn.Module``
            whose ``forward(tokens, state=None)`` returns ``(logits, state)`` (or just logits).
        data: a corpus name or path (``titans_mini.data.load_corpus``), a task name
            (``"mqar"``, ``"sniah_lite"``, ``"selective_copy"``), a ``Corpus``, ``TextData`` or
            ``TaskData``.
        config: a ``TrainConfig`` (keyword overrides below win).
        out_dir: run folder (None: keep everything in memory; nothing is written).
        resume: ``True`` continues from ``out_dir/checkpoint.pt`` (``FileNotFoundError`` if
            there is none); ``"auto"`` resumes when a checkpoint exists; ``False`` starts over.
        **overrides: fields of ``TrainConfig``.
    """

    def __init__(
        self,
        model,
        data="shakespeare",
        config: TrainConfig | None = None,
        out_dir: str | os.PathLike | None = None,
        *,
        resume: bool | str = False,
        **overrides,
    ):
        cfg = dataclasses.replace(config or TrainConfig(), **overrides)
        cfg.validate()
        if resume not in (True, False, "auto"):
            raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
        if resume and out_dir is None:
            raise ValueError("resume needs out_dir (the run folder holding checkpoint.pt)")
        if not (_is_config(model) or isinstance(model, nn.Module)):
            raise TypeError(
                f"model must be a TitansConfig or an nn.Module, got {type(model).__name__}"
            )
        check_data(data)
        self.cfg = cfg
        self.rank, self.local_rank, self.world_size = _world()
        self.is_main = self.rank == 0

        # ---- device, precision, distributed
        device = pick_device(cfg.device)
        if device.type == "cuda" and self.world_size > 1:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        self.precision = pick_precision(device)
        if cfg.precision is not None:
            self.precision = {"fp32": FP32, "bf16": BF16, "fp16": FP16}[cfg.precision]
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

        # ---- run folder
        self.out_dir = check_out_dir(out_dir) if out_dir is not None else None
        ckpt_path = self.out_dir / CHECKPOINT if self.out_dir is not None else None
        if resume is True and not ckpt_path.is_file():
            raise FileNotFoundError(f"cannot resume: no {CHECKPOINT} in {self.out_dir}")
        resuming = bool(resume) and ckpt_path is not None and ckpt_path.is_file()

        # ---- data (the tokenizer decides the vocabulary)
        torch.manual_seed(cfg.seed)
        self.tokenizer = None
        self.text: data_mod.TextData | None = None
        self.task: TaskData | None = None
        if isinstance(data, (str, os.PathLike)) and str(data).lower() in TASK_NAMES:
            vocab = model.vocab_size if _is_config(model) else _module_vocab(model)
            seq = cfg.seq_len or (model.seq_len if _is_config(model) else 256)
            self.task = TaskData(
                str(data).lower(), vocab, seq, cfg.batch_size, seed=cfg.seed, rank=self.rank
            )
        elif isinstance(data, TaskData):
            self.task = data
        elif isinstance(data, data_mod.TextData):
            self.text = data
        else:
            corpus = data if isinstance(data, data_mod.Corpus) else data_mod.load_corpus(data)
            tok = self._tokenizer(corpus, resuming)
            self.text = data_mod.TextData(corpus, tok)
        if self.text is not None:
            self.tokenizer = self.text.tokenizer

        # ---- model
        if _is_config(model):
            from titans_mini.models import TitansLM

            model_cfg = model
            if self.text is not None and model_cfg.vocab_size != self.text.vocab_size:
                model_cfg = model_cfg.replace(vocab_size=self.text.vocab_size)
            self.model_config = model_cfg
            torch.manual_seed(cfg.seed)
            model = TitansLM(model_cfg)
        else:
            self.model_config = getattr(model, "cfg", None)
            if self.text is not None and _module_vocab(model) < self.text.vocab_size:
                raise ValueError(
                    f"the model's vocabulary ({_module_vocab(model)}) is smaller than the "
                    f"tokenizer's ({self.text.vocab_size})"
                )
        self.seq_len = cfg.seq_len or getattr(self.model_config, "seq_len", None) or 256
        self.raw_model = model.to(self.device)

        # ---- batches
        if self.text is not None:
            self.train_batches = self.text.batcher(
                "train", cfg.batch_size, self.seq_len, cfg.segments, seed=cfg.seed, rank=self.rank
            )
            self.val_batches = self.text.batcher("val", cfg.batch_size, self.seq_len, cfg.segments)

        # ---- optimisation
        decay = [p for p in self.raw_model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.raw_model.parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=cfg.betas,
        )
        schedule = dict(steps=cfg.steps, warmup=cfg.warmup, min_ratio=cfg.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, **schedule)
        )
        self.scaler = self.precision.grad_scaler(self.device)
        self.model: nn.Module = self.raw_model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # with a carried state some parameters (e.g. the memory's initial weights M₀,
            # persistent tokens written at sequence start) get no gradient on later segments
            self.model = nn.parallel.DistributedDataParallel(
                self.raw_model, device_ids=ids, find_unused_parameters=cfg.segments > 1
            )
        if cfg.compile:
            from titans_mini import memory as memory_mod

            if self._memory_layers() and (
                memory_mod._torch_version() < memory_mod.MIN_TORCH_FOR_COMPILE
            ):
                need = ".".join(map(str, memory_mod.MIN_TORCH_FOR_COMPILE))
                raise ValueError(
                    f"compile=True with a Titans variant needs torch >= {need} (found "
                    f"{torch.__version__}): the compiled memory update's gradients are only "
                    "verified from that version on. Train without --compile, or upgrade torch."
                )
            self.model = torch.compile(self.model)

        # ---- progress
        self.step = 0
        self.state = None  # carried model state (segments > 1)
        self.history: list[dict] = []
        self.sample_text: str | None = None
        if resuming:
            self._restore(ckpt_path)
        elif self.out_dir is not None and self.is_main:
            (self.out_dir / METRICS).write_text("")
            self._write_config(data)

    # ------------------------------------------------------------------ set-up helpers
    def _tokenizer(self, corpus, resuming: bool):
        cfg = self.cfg
        if self.out_dir is not None and resuming:
            return data_mod.load_tokenizer(self.out_dir)
        if cfg.tokenizer == "byte":
            tok = data_mod.ByteTokenizer()
        else:
            tok = data_mod.BPETokenizer.train(corpus.train_texts(), cfg.bpe_vocab)
        if self.out_dir is not None:
            if self.is_main:  # every rank trains the same BPE; rank 0 records it
                data_mod.save_tokenizer(tok, self.out_dir)
        return tok

    def _write_config(self, data) -> None:
        model_cfg = (
            asdict(self.model_config) if dataclasses.is_dataclass(self.model_config) else None
        )
        info = {
            "model": model_cfg,
            "train": asdict(self.cfg),
            "data": str(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__,
            "task": self.task.name if self.task is not None else None,
            "tokenizer": None if self.tokenizer is None else self.tokenizer.kind,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "device": str(self.device),
            "precision": self.precision.name,
            "num_params": sum(p.numel() for p in self.raw_model.parameters()),
            "torch": torch.__version__,
        }
        (self.out_dir / CONFIG).write_text(json.dumps(info, indent=2, default=str))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything a resumed run needs."""
        return {
            "step": self.step,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "carried_state": self.state,
            "train_config": asdict(self.cfg),
            "model_config": asdict(self.model_config)
            if dataclasses.is_dataclass(self.model_config)
            else None,
        }

    def save(self) -> Path | None:
        """Write ``checkpoint.pt`` atomically (rank 0; no-op without ``out_dir``).

        Under DDP with a carried state, every other rank writes its own carried state (its rows
        differ) to ``carried_state.rank{r}.pt`` so that it too resumes mid-excerpt exactly.
        """
        if self.out_dir is None:
            return None
        if not self.is_main:
            if self.state is not None:
                extra = {"step": self.step, "carried_state": self.state}
                save_checkpoint(extra, self.out_dir / f"carried_state.rank{self.rank}.pt")
            return None
        path = self.out_dir / CHECKPOINT
        save_checkpoint(self.state_dict(), path)
        return path

    def _restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        saved_model = ckpt.get("model_config")
        if saved_model is not None and dataclasses.is_dataclass(self.model_config):
            now = asdict(self.model_config)
            # compile/checkpoint_chunks only change speed and memory use (and are absent from
            # older checkpoints)
            runtime_only = ("compile_chunks", "checkpoint_chunks")
            diff = sorted(k for k in now
                          if k not in runtime_only and now[k] != saved_model.get(k))
            if diff:
                raise ValueError(
                    f"cannot resume {path}: the model config differs in {diff} "
                    "(resume with the same preset, variant and overrides)"
                )
        if ckpt["train_config"].get("steps") != self.cfg.steps and self.is_main:
            warnings.warn(
                "resuming with a different number of steps changes the learning-rate schedule",
                stacklevel=3,
            )
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        self.step = int(ckpt["step"])
        self.state = ckpt.get("carried_state")
        if not self.is_main:
            self.state = None
            own = self.out_dir / f"carried_state.rank{self.rank}.pt"
            if own.is_file():
                extra = load_checkpoint(own, map_location=self.device)
                if extra["step"] == self.step:
                    self.state = extra["carried_state"]
        if self.out_dir is not None and self.is_main:
            # drop metrics logged after the checkpoint: they will be produced again
            rows = _read_metrics(self.out_dir / METRICS)
            self.history = [r for r in rows if r.get("step", 0) <= self.step]
            _write_metrics(self.out_dir / METRICS, self.history)

    # ------------------------------------------------------------------ one step
    def _forward(self, model, inputs, state):
        with self.precision.autocast(self.device):
            out = model(inputs, state) if state is not None else model(inputs)
        if isinstance(out, tuple):
            return out[0], out[1]
        return out, None

    def _next_batch(self):
        """(inputs, targets, reset) for the current step."""
        if self.task is not None:
            b = self.task.batch(self.step)
            return b.inputs, b.targets, True
        b = self.train_batches.batch(self.step)
        return b.inputs, b.targets, b.reset

    def train_step(self) -> float:
        """One optimizer step; returns the training loss.

        If the device runs out of memory in the forward or backward of a Titans variant, the
        memory layers switch to chunk checkpointing (``checkpoint_chunks``; the same values and
        gradients, recomputed in the backward: about 3× less memory, about 40 % slower on a GPU)
        and the step is repeated. Otherwise the error says what to lower."""
        cfg = self.cfg
        self.model.train()
        inputs, targets, reset = self._next_batch()
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        if reset:
            self.state = None
        try:
            logits, new_state = self._forward(self.model, inputs, self.state)
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(),
                ignore_index=tasks_mod.IGNORE_INDEX,
            )  # fmt: skip
            self.scaler.scale(loss).backward()
        except torch.cuda.OutOfMemoryError as err:
            # the traceback holds the step's activations: leave the except block before retrying
            outcome = self._out_of_memory(err, inputs.shape)
        else:
            outcome = None
        if outcome is not None:
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if isinstance(outcome, Exception):
                raise outcome
            return self.train_step()  # the same step: batches depend only on the step number
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state = _detach(new_state) if (cfg.segments > 1 and self.task is None) else None
        self.step += 1
        return loss.item()

    def _memory_layers(self) -> list[nn.Module]:
        return [m for m in self.raw_model.modules() if hasattr(m, "checkpoint_chunks")]

    def _out_of_memory(self, err: Exception, shape) -> bool | Exception:
        """After an out-of-memory error in a training step: True when chunk checkpointing was
        switched on (repeat the step), else the error to raise, with advice."""
        layers = self._memory_layers()
        group = OOM_CHECKPOINT_CHUNKS
        if self.world_size == 1 and layers and all(m.checkpoint_chunks == 0 for m in layers):
            for m in layers:
                m.checkpoint_chunks = group
            if dataclasses.is_dataclass(self.model_config) and hasattr(
                self.model_config, "checkpoint_chunks"
            ):
                self.model_config = dataclasses.replace(
                    self.model_config, checkpoint_chunks=group
                )
            warnings.warn(
                f"out of memory at batch {tuple(shape)}: the memory layers now recompute their "
                f"chunks in groups of {group} during the backward (checkpoint_chunks={group}; "
                "same results, less memory, slower). Set it yourself to skip this retry, e.g. "
                f"--set checkpoint_chunks={group}.",
                stacklevel=3,
            )
            return True
        tips = [f"lower --batch-size (now {shape[0]}) or --seq-len (now {shape[1]})"]
        if layers and all(m.checkpoint_chunks == 0 for m in layers):
            tips.append(f"--set checkpoint_chunks={group} (less memory, same results, slower)")
        elif layers:
            tips.append("a checkpoint_chunks group near √(chunks per row), which keeps the least")
        error = torch.cuda.OutOfMemoryError(
            f"{self.device.type} ran out of memory in a training step at batch "
            f"{tuple(shape)}: {'; or '.join(tips)}. Original error: {str(err).splitlines()[0]}"
        )
        error.__cause__ = err
        return error

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats per token) and bits per byte for text; loss and accuracy on
        held-out batches for tasks. Uses the unwrapped model; restores train mode after."""
        model = self.raw_model
        was_training = model.training
        model.eval()
        try:
            if self.task is not None:
                total, count, accs = 0.0, 0, []
                for b in self.task.eval_batches(self.cfg.eval_batches):
                    b = b.to(self.device)
                    logits, _ = self._forward(model, b.inputs, None)
                    logits = logits.float()
                    total += F.cross_entropy(
                        logits.flatten(0, 1), b.targets.flatten(),
                        ignore_index=tasks_mod.IGNORE_INDEX, reduction="sum",
                    ).item()  # fmt: skip
                    count += int(b.score_mask.sum())
                    accs.append(b.accuracy(logits))
                return {"val_loss": total / max(count, 1), "val_acc": float(np.mean(accs))}
            total, count, n_bytes = 0.0, 0, 0
            token_bytes = torch.as_tensor(self.text.token_bytes)
            state = None
            for b in self.val_batches.eval_batches(self.cfg.eval_batches):
                if b.reset:
                    state = None
                logits, state = self._forward(model, b.inputs.to(self.device), state)
                total += F.cross_entropy(
                    logits.float().flatten(0, 1),
                    b.targets.to(self.device).flatten(),
                    reduction="sum",
                ).item()
                count += b.targets.numel()
                n_bytes += int(token_bytes[b.targets].sum())
            return {
                "val_loss": total / count,
                "val_bpb": data_mod.bits_per_byte(total, n_bytes),
            }
        finally:
            model.train(was_training)

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_at: int | None = None) -> list[dict]:
        """Train until ``config.steps`` (or ``stop_at``, to simulate an interruption), evaluating,
        logging and checkpointing on the way; then a final evaluation, checkpoint and a text
        sample. Returns ``history`` (the metrics rows)."""
        cfg = self.cfg
        end = cfg.steps if stop_at is None else min(int(stop_at), cfg.steps)
        ckpt_every = cfg.eval_every if cfg.ckpt_every is None else cfg.ckpt_every
        tokens_per_step = cfg.batch_size * self.seq_len * self.world_size
        bar = None
        if cfg.progress and self.is_main and self.step < end:
            from tqdm.auto import tqdm

            bar = tqdm(total=end, initial=self.step, desc="train", dynamic_ncols=True)
        losses: list[float] = []
        tick, n_timed = time.perf_counter(), 0
        while self.step < end:
            loss = self.train_step()
            losses.append(loss)
            n_timed += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
            at_end = self.step == cfg.steps
            do_eval = at_end or (cfg.eval_every > 0 and self.step % cfg.eval_every == 0)
            do_log = do_eval or self.step % cfg.log_every == 0 or self.step == end
            if do_log:
                elapsed = time.perf_counter() - tick
                row = {
                    "step": self.step,
                    "train_loss": self._mean_across_ranks(float(np.mean(losses))),
                    "lr": self.scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens_per_step * n_timed / max(elapsed, 1e-9),
                }
                losses = []
                if do_eval:
                    row.update(self.evaluate())
                self._log(row)
                if bar is not None and "val_loss" in row:
                    bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row['val_loss']:.3f}")
                tick, n_timed = time.perf_counter(), 0
            if at_end or self.step == end or (ckpt_every > 0 and self.step % ckpt_every == 0):
                self.save()
        if bar is not None:
            bar.close()
        if (
            self.step == cfg.steps
            and cfg.sample_tokens > 0
            and self.text is not None
            and self.is_main
        ):
            self.sample_text = self.sample(max_new_tokens=cfg.sample_tokens)
            if self.out_dir is not None:
                (self.out_dir / SAMPLE).write_text(self.sample_text)
            if cfg.progress:
                print(f"--- sample after {self.step} steps ---\n{self.sample_text}\n---")
        return self.history

    @torch.no_grad()
    def sample(
        self,
        prompt: str | None = None,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
    ) -> str:
        """Generate text after ``prompt`` (default: the opening of a held-out document)."""
        if self.text is None:
            raise ValueError("sampling needs a text corpus (this run trains on a task)")
        if prompt is None:
            prompt = self.text.corpus.val[0].text[:64] if self.text.corpus.val else "\n"
        ids = torch.tensor([self.tokenizer.encode(prompt)], device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        model = self.raw_model
        was_training = model.training
        model.eval()
        try:
            with self.precision.autocast(self.device):
                out = model.generate(
                    ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen
                )
        finally:
            model.train(was_training)
        return self.tokenizer.decode(out[0].tolist())

    def _mean_across_ranks(self, value: float) -> float:
        if self.world_size > 1 and dist.is_initialized():
            t = torch.tensor([value], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            return float(t.item()) / self.world_size
        return value

    def _log(self, row: dict) -> None:
        if not self.is_main:
            return
        self.history.append(row)
        if self.out_dir is not None:
            with open(self.out_dir / METRICS, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def close(self) -> None:
        """Tear down the process group (torchrun)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _is_config(model) -> bool:
    return type(model).__name__ == "TitansConfig" and dataclasses.is_dataclass(model)


def _module_vocab(model: nn.Module) -> int:
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "vocab_size"):
        return int(cfg.vocab_size)
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is None:
        raise ValueError(
            "cannot tell the model's vocabulary size (no cfg.vocab_size, no nn.Embedding)"
        )
    return emb.num_embeddings


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_metrics(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


# ============================================================================================
# Command line
# ============================================================================================


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m titans_mini.train",
        description="Train a Titans variant or a baseline on a corpus or a synthetic task.",
    )
    p.add_argument("--preset", required=True, help="model size: tiny, cpu-demo, colab-t4")
    p.add_argument("--variant", required=True, help="mac, mag, mal, lmm, transformer or swa")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps in total")
    p.add_argument("--out", required=True, help="run folder (metrics, config, checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument(
        "--data",
        default="shakespeare",
        help="corpus name (shakespeare, tinystories, fineweb-edu, pg19), a text file or folder, "
        "or a task (mqar, sniah_lite, selective_copy)",
    )
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], default=None)
    p.add_argument("--compile", action="store_true", help="use torch.compile")
    g = p.add_argument_group("training (defaults depend on the preset)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--seq-len", type=int)
    g.add_argument("--segments", type=int, help="segments per excerpt, state carried across")
    g.add_argument("--lr", type=float)
    g.add_argument("--warmup", type=int, dest="warmup_steps")
    g.add_argument("--eval-every", type=int)
    g.add_argument("--eval-batches", type=int)
    g.add_argument("--log-every", type=int)
    g.add_argument("--ckpt-every", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    g.add_argument("--tokenizer", choices=["byte", "bpe"])
    g.add_argument("--bpe-vocab", type=int)
    g.add_argument("--sample-tokens", type=int)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--stop-at", type=int, default=None, help="stop after this step (simulates an interruption)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a model config field, e.g. --set dim=64 (repeatable)",
    )
    return p


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m titans_mini.train`` and ``titans-train``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # ---- every check that needs no real work, before any work
    from titans_mini.models import PRESETS, VARIANTS, TitansConfig

    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; valid presets: {', '.join(PRESETS)}")
    if args.variant not in VARIANTS:
        parser.error(f"unknown variant {args.variant!r}; valid variants: {', '.join(VARIANTS)}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    try:
        model_cfg = TitansConfig.preset(
            args.preset, variant=args.variant, **_parse_overrides(args.set)
        )
        check_data(args.data)
        key = str(args.data).lower()
        if key in data_mod.CORPORA and key != "shakespeare" and not Path(args.data).exists():
            _check_hf_available(key)
        pick_device(args.device)
        check_out_dir(args.out)
        if args.resume and not (Path(args.out) / CHECKPOINT).is_file():
            raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {args.out}")
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        values = dict(TRAIN_DEFAULTS.get(args.preset, {}))
        values.update(
            {
                k: v
                for k, v in vars(args).items()
                if k in fields and v is not None and k != "compile"
            }
        )
        values.update(steps=args.steps, device=args.device, compile=args.compile)
        if args.no_progress:
            values["progress"] = False
        train_cfg = TrainConfig(**values)
        train_cfg.validate()
    except (ValueError, FileNotFoundError, data_mod.CorpusUnavailableError) as err:
        parser.error(str(err))

    try:
        trainer = Trainer(
            model_cfg, data=args.data, config=train_cfg, out_dir=args.out, resume=args.resume
        )
    except (ValueError, FileNotFoundError, data_mod.CorpusUnavailableError) as err:
        parser.error(str(err))
    try:
        if trainer.is_main:
            n = sum(p.numel() for p in trainer.raw_model.parameters())
            print(
                f"{args.variant} ({args.preset}, {n / 1e6:.2f}M params) on {trainer.device} "
                f"[{trainer.precision.name}], world size {trainer.world_size}, "
                f"step {trainer.step} -> {train_cfg.steps}, run folder {trainer.out_dir}",
                flush=True,
            )
        trainer.fit(stop_at=args.stop_at)
        if trainer.is_main and trainer.history:
            last = trainer.history[-1]
            summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float))
            print(f"step {last['step']}: {summary}", flush=True)
    finally:
        trainer.close()
    return 0


def _check_hf_available(name: str) -> None:
    """Raise ``CorpusUnavailableError`` now if a Hugging Face corpus cannot be fetched."""
    try:
        import datasets  # noqa: F401
    except ImportError as err:
        raise data_mod.CorpusUnavailableError(
            f"corpus {name!r} needs the `datasets` package: pip install datasets "
            "(or use 'shakespeare' or a local path)"
        ) from err
    if not data_mod.hf_reachable():
        raise data_mod.CorpusUnavailableError(
            f"corpus {name!r} must be downloaded from huggingface.co, which is not reachable"
        )


if __name__ == "__main__":
    sys.exit(main())
