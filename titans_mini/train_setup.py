"""How the trainer gets ready to train, one named step per function.

``titans_mini.trainer.Trainer`` (lessons 08–12, coming, train their models with it) calls these in this order when it is built:

0. :func:`check_arguments`: every argument checked before any work starts;
1. :func:`world`: rank and world size under ``torchrun`` (one process without it);
2. :func:`device_and_precision`: the device, the precision (bf16 / fp16 + gradient scaler /
   fp32, chosen by ``titans_mini.device``) and, under ``torchrun``, the process group;
3. :func:`run_folder`: the run folder, checked writable, and whether the run resumes;
4. :func:`load_data`: the text corpus and its tokenizer (:func:`make_tokenizer`), or a synthetic
   task (``titans_mini.task_stream``); :func:`check_data` fails fast on a bad name or path;
5. :func:`build_model`: a ``TitansLM`` from a config (its vocabulary follows the tokenizer) or a
   ready ``nn.Module``; then :func:`text_batches` for a corpus;
6. :func:`build_optimizer`: AdamW (weight decay on matrices only) with the warm-up + cosine
   schedule of ``titans_mini.train_config.lr_lambda``;
7. :func:`wrap_model`: ``DistributedDataParallel`` under ``torchrun``, then ``torch.compile``
   when asked (refused for a Titans variant where ``titans_mini.device.compile_supported()`` is
   False).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from titans_mini import data as data_mod
from titans_mini import device as device_mod
from titans_mini import run_io
from titans_mini.models import TitansConfig, TitansLM
from titans_mini.task_stream import TASK_NAMES, RecallMix, TaskData
from titans_mini.train_config import TrainConfig, lr_lambda

__all__ = [
    "world",
    "is_model_config",
    "module_vocab",
    "memory_layers",
    "check_data",
    "check_arguments",
    "device_and_precision",
    "run_folder",
    "make_tokenizer",
    "load_data",
    "build_model",
    "text_batches",
    "build_optimizer",
    "wrap_model",
]

PRECISIONS = {"fp32": device_mod.FP32, "bf16": device_mod.BF16, "fp16": device_mod.FP16}


# ------------------------------------------------------------------------------------ helpers
def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (1 process without it)."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )


def is_model_config(model) -> bool:
    """True for a ``TitansConfig`` (the trainer builds the model), False for anything else."""
    return isinstance(model, TitansConfig)


def module_vocab(model: nn.Module) -> int:
    """The vocabulary size of a ready model: ``model.cfg.vocab_size`` or its first embedding's."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "vocab_size"):
        return int(cfg.vocab_size)
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if emb is None:
        raise ValueError(
            "cannot tell the model's vocabulary size (no cfg.vocab_size, no nn.Embedding)"
        )
    return emb.num_embeddings


def memory_layers(model: nn.Module) -> list[nn.Module]:
    """The model's Titans memory layers (the modules with a ``checkpoint_chunks`` setting)."""
    return [m for m in model.modules() if hasattr(m, "checkpoint_chunks")]


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


# --------------------------------------------------------------------------------- the steps
def check_arguments(cfg: TrainConfig, model, data, out_dir, resume, overwrite=False) -> None:
    """Fail fast on a bad ``Trainer(...)`` argument, before any work starts."""
    cfg.validate()
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
    if resume and out_dir is None:
        raise ValueError("resume needs out_dir (the run folder holding checkpoint.pt)")
    if overwrite not in (True, False):
        raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
    if overwrite and resume is True:
        raise ValueError(
            "resume=True (--resume) continues the run and overwrite=True (--overwrite) deletes "
            "it: choose one"
        )
    if not (is_model_config(model) or isinstance(model, nn.Module)):
        raise TypeError(f"model must be a TitansConfig or an nn.Module, got {type(model).__name__}")
    check_data(data)


def device_and_precision(
    cfg: TrainConfig, local_rank: int, world_size: int
) -> tuple[torch.device, device_mod.Precision]:
    """The device and precision; under torchrun one GPU per process and the process group."""
    device = device_mod.pick_device(cfg.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    precision = device_mod.pick_precision(device)
    if cfg.precision is not None:
        precision = PRECISIONS[cfg.precision]
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, precision


def run_folder(
    out_dir, resume: bool | str, overwrite: bool = False, is_main: bool = True
) -> tuple[Path | None, bool]:
    """The run folder (None: nothing is written) and whether the run resumes from it.

    A new run refuses (``FileExistsError``) a folder that holds an earlier run's checkpoint or
    metrics unless ``overwrite``, which deletes them (rank 0). Rank 0 also removes the
    temporary files that a process killed mid-write left behind."""
    if out_dir is None:
        return None, False
    path = run_io.check_out_dir(out_dir)
    ckpt_path = path / run_io.CHECKPOINT
    if resume is True and not ckpt_path.is_file():
        raise FileNotFoundError(f"cannot resume: no {run_io.CHECKPOINT} in {path}")
    resuming = bool(resume) and ckpt_path.is_file()
    earlier = None if resuming else run_io.existing_run(path)
    if earlier is not None and not overwrite:
        raise FileExistsError(
            f"run folder {path} already holds a run ({earlier}): continue it with --resume "
            "(Trainer(..., resume=True)), start over with --overwrite (overwrite=True; deletes "
            "that run's files), or choose another folder"
        )
    if is_main:
        if earlier is not None:
            run_io.clear_run_folder(path)
        run_io.remove_stale_temporaries(path)
    return path, resuming


def make_tokenizer(
    corpus: data_mod.Corpus, cfg: TrainConfig, out_dir: Path | None, *, resuming: bool,
    is_main: bool,
):
    """The run's saved tokenizer when resuming; else a new byte or BPE tokenizer, which rank 0
    saves in the run folder."""
    if out_dir is not None and resuming:
        return data_mod.load_tokenizer(out_dir)
    if cfg.tokenizer == "byte":
        tok = data_mod.ByteTokenizer()
    else:
        tok = data_mod.BPETokenizer.train(corpus.train_texts(), cfg.bpe_vocab)
    if out_dir is not None and is_main:  # every rank trains the same BPE; rank 0 records it
        data_mod.save_tokenizer(tok, out_dir)
    return tok


def load_data(
    data, model, cfg: TrainConfig, *, rank: int, out_dir: Path | None, resuming: bool,
    is_main: bool,
) -> tuple[data_mod.TextData | None, TaskData | None]:
    """``(text, None)`` for a corpus (tokenized), ``(None, task)`` for a synthetic task."""
    torch.manual_seed(cfg.seed)
    if isinstance(data, (str, os.PathLike)) and str(data).lower() in TASK_NAMES:
        vocab = model.vocab_size if is_model_config(model) else module_vocab(model)
        seq = cfg.seq_len or (model.seq_len if is_model_config(model) else 256)
        task = TaskData(str(data).lower(), vocab, seq, cfg.batch_size, seed=cfg.seed, rank=rank)
        return None, task
    if isinstance(data, TaskData):
        return None, data
    if isinstance(data, data_mod.TextData):
        return data, None
    corpus = data if isinstance(data, data_mod.Corpus) else data_mod.load_corpus(data)
    tok = make_tokenizer(corpus, cfg, out_dir, resuming=resuming, is_main=is_main)
    return data_mod.TextData(corpus, tok), None


def build_model(model, cfg: TrainConfig, text: data_mod.TextData | None, device: torch.device):
    """``(module on device, its config)``: a seeded ``TitansLM`` for a ``TitansConfig`` (the
    vocabulary follows the tokenizer), or a ready module checked against the tokenizer."""
    if is_model_config(model):
        model_cfg = model
        if text is not None and model_cfg.vocab_size != text.vocab_size:
            model_cfg = model_cfg.replace(vocab_size=text.vocab_size)
        torch.manual_seed(cfg.seed)
        model = TitansLM(model_cfg)
    else:
        model_cfg = getattr(model, "cfg", None)
        if text is not None and module_vocab(model) < text.vocab_size:
            raise ValueError(
                f"the model's vocabulary ({module_vocab(model)}) is smaller than the "
                f"tokenizer's ({text.vocab_size})"
            )
    return model.to(device), model_cfg


def text_batches(text: data_mod.TextData, cfg: TrainConfig, seq_len: int, rank: int):
    """``(train, val)`` document batchers: this rank's training rows (with S-NIAH-lite facts mixed
    in when ``cfg.recall_rows``), the shared validation (always plain text)."""
    train = text.batcher("train", cfg.batch_size, seq_len, cfg.segments, seed=cfg.seed, rank=rank)
    if cfg.recall_rows:
        train = RecallMix(text, train, cfg.recall_rows, num_digits=cfg.recall_digits,
                          seed=cfg.seed, rank=rank)
    return train, text.batcher("val", cfg.batch_size, seq_len, cfg.segments)


def build_optimizer(model: nn.Module, cfg: TrainConfig):
    """``(AdamW, LambdaLR)``: weight decay on matrices only; warm-up, then cosine decay."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=cfg.betas,
    )
    schedule = dict(steps=cfg.steps, warmup=cfg.warmup, min_ratio=cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, **schedule))
    return optimizer, scheduler


def wrap_model(model: nn.Module, cfg: TrainConfig, device: torch.device, world_size: int):
    """The module the training step calls: ``DistributedDataParallel`` under torchrun, then
    ``torch.compile`` when ``cfg.compile``."""
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        # with a carried state some parameters (e.g. the memory's initial weights M₀,
        # persistent tokens written at sequence start) get no gradient on later segments
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=cfg.segments > 1
        )
    if cfg.compile:
        if memory_layers(model) and not device_mod.compile_supported():
            need = ".".join(map(str, device_mod.MIN_TORCH_FOR_COMPILE))
            raise ValueError(
                f"compile=True with a Titans variant needs torch >= {need} (found "
                f"{torch.__version__}): the compiled memory update's gradients are only "
                "verified from that version on. Train without --compile, or upgrade torch."
            )
        model = torch.compile(model)
    return model
