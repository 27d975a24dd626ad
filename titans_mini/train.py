"""The trainer's command line, ``python -m titans_mini.train`` / ``titans-train``.

One trainer for the notebooks and the command line, from a laptop CPU to Colab and torchrun.
Lessons 08–12 (coming) train their models with it; lesson 11's language model is trained from
this command line on a GPU.

In a notebook::

    from titans_mini.models import TitansConfig
    from titans_mini.trainer import Trainer, TrainConfig   # or: from titans_mini.train import ...

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
  state and the data position: a resumed run matches an uninterrupted one. Only the settings in
  ``titans_mini.run_io.SAFE_ON_RESUME`` may change on resume (recorded in ``config.json``); any
  other difference is refused with the list. A folder that already holds a run needs
  ``--resume`` or ``--overwrite``.
* **Divergence**: a NaN or infinite loss or gradient stops the run before that step changes the
  model (``titans_mini.trainer.TrainingDiverged``), with the step, the loss and what to lower;
  the last checkpoint stays as it was.
* **DDP**: under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
  ``DistributedDataParallel`` (gloo on the CPU, NCCL on CUDA); each rank reads different rows;
  only rank 0 logs, checkpoints and samples.

Where it lives: this module is only the command line (argument parsing, the checks that need no
real work, and a call into the ``Trainer``); it re-exports the names it has always offered.
``titans_mini.trainer`` holds the ``Trainer`` (the loop, evaluation, resume, the out-of-memory
fallback), ``titans_mini.train_setup`` its set-up steps, ``titans_mini.train_config`` the
``TrainConfig``, ``titans_mini.run_io`` the run folder's files, and ``titans_mini.task_stream``
the synthetic tasks as training data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from titans_mini import data as data_mod
from titans_mini.device import pick_device
from titans_mini.models import PRESETS, VARIANTS, TitansConfig
from titans_mini.run_io import (
    CHECKPOINT,
    DiskFullError,
    check_out_dir,
    load_checkpoint,
    save_checkpoint,
)
from titans_mini.task_stream import TASK_NAMES, TaskData
from titans_mini.train_config import TRAIN_DEFAULTS, TrainConfig
from titans_mini.train_setup import check_data
from titans_mini.trainer import Trainer, TrainingDiverged

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m titans_mini.train",
        description="Train a Titans variant or a baseline on a corpus or a synthetic task.",
    )
    p.add_argument("--preset", required=True, help="model size: " + ", ".join(PRESETS))
    p.add_argument("--variant", required=True, help="mac, mag, mal, lmm, transformer or swa")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps in total")
    p.add_argument("--out", required=True, help="run folder (metrics, config, checkpoint)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt; of the settings only --steps, --lr, the logging, "
        "evaluation and checkpoint intervals, --device, --precision and --compile may change "
        "(recorded in OUT/config.json)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in OUT even though it holds one (deletes that run's files)",
    )
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
    g.add_argument("--recall-rows", type=int,
                   help="rows per batch replaced by S-NIAH-lite facts in corpus text (lesson 11)")
    g.add_argument("--recall-digits", type=int, help="digits of those facts' numbers")
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
    errors = (ValueError, FileNotFoundError, FileExistsError, data_mod.CorpusUnavailableError)
    try:
        model_cfg, train_cfg = configs_from_args(args)
    except errors as err:
        parser.error(str(err))  # the usage, then the error
    try:
        trainer = Trainer(
            model_cfg, data=args.data, config=train_cfg, out_dir=args.out, resume=args.resume,
            overwrite=args.overwrite,
        )  # fmt: skip
    except errors as err:  # the run folder, its checkpoint, the data: the error alone
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    try:
        if trainer.is_main:
            n = sum(p.numel() for p in trainer.raw_model.parameters())
            print(
                f"{args.variant} ({args.preset}, {n / 1e6:.2f}M params) on {trainer.device} "
                f"[{trainer.precision.name}], world size {trainer.world_size}, "
                f"step {trainer.step} -> {train_cfg.steps}, run folder {trainer.out_dir}",
                flush=True,
            )
        try:
            trainer.fit(stop_at=args.stop_at)
        except (TrainingDiverged, DiskFullError) as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 1
        if trainer.is_main and trainer.history:
            last = trainer.history[-1]
            summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float))
            print(f"step {last['step']}: {summary}", flush=True)
    finally:
        trainer.close()
    return 0


def configs_from_args(args: argparse.Namespace) -> tuple[TitansConfig, TrainConfig]:
    """The model and training configs the parsed arguments ask for, after every check that
    needs no real work (``ValueError``, ``FileNotFoundError``, ``CorpusUnavailableError``)."""
    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; valid presets: {', '.join(PRESETS)}")
    if args.variant not in VARIANTS:
        raise ValueError(
            f"unknown variant {args.variant!r}; valid variants: {', '.join(VARIANTS)}"
        )
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    model_cfg = TitansConfig.preset(args.preset, variant=args.variant, **_parse_overrides(args.set))
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
        {k: v for k, v in vars(args).items() if k in fields and v is not None and k != "compile"}
    )
    values.update(steps=args.steps, device=args.device, compile=args.compile)
    if args.no_progress:
        values["progress"] = False
    train_cfg = TrainConfig(**values)
    train_cfg.validate()
    return model_cfg, train_cfg


def _check_hf_available(name: str) -> None:
    """Raise ``CorpusUnavailableError`` now if a Hugging Face corpus cannot be fetched."""
    try:  # imported here: an optional dependency, needed only for these corpora
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
