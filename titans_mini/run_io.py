"""The trainer's run folder: what it writes, how it reads it back, and the RNG state it saves.

The trainer (``titans_mini.trainer.Trainer``; lessons 08–12, coming, train their models with it)
keeps a run in one folder:

* ``config.json`` (:func:`run_info`, :func:`start_run_folder`): the model and training configs
  and where the run ran;
* ``metrics.jsonl`` (:func:`append_metrics`, :func:`read_metrics`, :func:`truncate_metrics`):
  one JSON object per logged step;
* ``checkpoint.pt`` (:func:`save_checkpoint`, :func:`load_checkpoint`): written to a temporary
  file, then renamed, so an interrupted write leaves the previous checkpoint intact; with it the
  RNG states (:func:`rng_state`, :func:`set_rng_state`) and, under torchrun, each other rank's
  carried state (:func:`save_carried_state`, :func:`load_carried_state`);
* ``sample.txt`` and the tokenizer (``titans_mini.data.save_tokenizer``).

:func:`check_out_dir` proves a folder writable before any work starts, and
:func:`load_for_resume` refuses to resume a checkpoint of another model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CHECKPOINT",
    "METRICS",
    "CONFIG",
    "SAMPLE",
    "check_out_dir",
    "save_checkpoint",
    "load_checkpoint",
    "save_carried_state",
    "load_carried_state",
    "load_for_resume",
    "rng_state",
    "set_rng_state",
    "config_dict",
    "run_info",
    "start_run_folder",
    "read_metrics",
    "append_metrics",
    "truncate_metrics",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
SAMPLE = "sample.txt"

# model config fields that change only speed and memory use (and are absent from older
# checkpoints): a run may resume with other values
RUNTIME_ONLY_FIELDS = ("compile_chunks", "checkpoint_chunks")


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


# ---------------------------------------------------------------------------------- checkpoints
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


def save_carried_state(out_dir: Path, rank: int, step: int, state) -> None:
    """Under torchrun, rank ``rank`` (> 0) keeps its own carried state (its rows differ)."""
    save_checkpoint({"step": step, "carried_state": state}, _carried_state_path(out_dir, rank))


def load_carried_state(out_dir: Path, rank: int, step: int, map_location=None):
    """Rank ``rank``'s own carried state, if it was saved at ``step`` (else None)."""
    path = _carried_state_path(out_dir, rank)
    if path.is_file():
        saved = load_checkpoint(path, map_location=map_location)
        if saved["step"] == step:
            return saved["carried_state"]
    return None


def _carried_state_path(out_dir: Path, rank: int) -> Path:
    return out_dir / f"carried_state.rank{rank}.pt"


def load_for_resume(
    path: Path, model_config, steps: int, map_location=None, *, warn: bool = True
) -> dict:
    """The checkpoint at ``path``, checked against the resuming run: ``ValueError`` if it was
    written for another model config (fields that change only speed and memory use may
    differ); a warning (when ``warn``) if the number of steps differs."""
    ckpt = load_checkpoint(path, map_location=map_location)
    saved, now = ckpt.get("model_config"), config_dict(model_config)
    if saved is not None and now is not None:
        diff = sorted(k for k in now if k not in RUNTIME_ONLY_FIELDS and now[k] != saved.get(k))
        if diff:
            raise ValueError(
                f"cannot resume {path}: the model config differs in {diff} "
                "(resume with the same preset, variant and overrides)"
            )
    if ckpt["train_config"].get("steps") != steps and warn:
        warnings.warn(
            "resuming with a different number of steps changes the learning-rate schedule",
            stacklevel=4,  # the caller of Trainer(...)
        )
    return ckpt


def rng_state() -> dict:
    """The torch, numpy, Python (and CUDA) random states, for a checkpoint."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the random states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ------------------------------------------------------------------------- config and metrics
def config_dict(config) -> dict | None:
    """A dataclass config as a dict (None for anything else, e.g. a module without one)."""
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None


def run_info(trainer, data) -> dict:
    """What ``config.json`` records about a ``Trainer``'s run (``data`` as it was given)."""
    return {
        "model": config_dict(trainer.model_config),
        "train": dataclasses.asdict(trainer.cfg),
        "data": str(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__,
        "task": trainer.task.name if trainer.task is not None else None,
        "tokenizer": None if trainer.tokenizer is None else trainer.tokenizer.kind,
        "seq_len": trainer.seq_len,
        "world_size": trainer.world_size,
        "device": str(trainer.device),
        "precision": trainer.precision.name,
        "num_params": sum(p.numel() for p in trainer.raw_model.parameters()),
        "torch": torch.__version__,
    }


def start_run_folder(out_dir: Path, info: dict) -> None:
    """A fresh run: an empty ``metrics.jsonl`` and ``info`` in ``config.json`` (values JSON
    cannot hold become strings)."""
    (out_dir / METRICS).write_text("")
    (out_dir / CONFIG).write_text(json.dumps(info, indent=2, default=str))


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file ([] when there is none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_metrics(path: Path, row: dict) -> None:
    """Append one row to a ``metrics.jsonl`` file."""
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def truncate_metrics(path: Path, step: int) -> list[dict]:
    """Drop the rows logged after ``step`` (a resumed run logs them again); return the rest."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return rows
