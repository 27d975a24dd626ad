"""The trainer's run folder: what it writes, how it reads it back, and the RNG state it saves.

The trainer (``titans_mini.trainer.Trainer``; lessons 08–12, coming, train their models with it)
keeps a run in one folder:

* ``config.json`` (:func:`run_info`, :func:`start_run_folder`): the model and training configs
  and where the run ran;
* ``metrics.jsonl`` (:func:`append_metrics`, :func:`read_metrics`, :func:`truncate_metrics`):
  one strict-JSON object per logged step (NaN/inf become ``null``, :func:`strict_json_row`); a
  damaged last line left by a kill is dropped with a warning, a damaged earlier line is an error
  that names the file and line;
* ``checkpoint.pt`` (:func:`save_checkpoint`, :func:`load_checkpoint`): written to a temporary
  file, then renamed, so an interrupted write leaves the previous checkpoint intact; with it the
  RNG states (:func:`rng_state`, :func:`set_rng_state`) and, under torchrun, each other rank's
  carried state (:func:`save_carried_state`, :func:`load_carried_state`). A checkpoint that is
  truncated, empty or not a checkpoint raises :class:`CheckpointError` (what to do included); a
  disk too full to save raises :class:`DiskFullError` before writing (the previous checkpoint is
  kept); temporaries left by a killed writer are removed (:func:`remove_stale_temporaries`);
* ``sample.txt`` and the tokenizer (``titans_mini.data.save_tokenizer``).

:func:`check_out_dir` proves a folder writable before any work starts; :func:`existing_run`
finds a run already in a folder (a new run there is refused unless it resumes or overwrites it,
:func:`clear_run_folder`); :func:`load_for_resume` refuses to resume a checkpoint of another model,
and :func:`settings_changed` lists what differs from the saved settings: only the names in
``SAFE_ON_RESUME`` may change, and :func:`record_resume` writes those changes into ``config.json``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import pickle
import random
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from titans_mini.data import CORPORA
from titans_mini.task_stream import TASK_NAMES

__all__ = [
    "CHECKPOINT",
    "METRICS",
    "CONFIG",
    "SAMPLE",
    "SAFE_ON_RESUME",
    "CheckpointError",
    "DiskFullError",
    "check_out_dir",
    "existing_run",
    "clear_run_folder",
    "remove_stale_temporaries",
    "save_checkpoint",
    "load_checkpoint",
    "save_carried_state",
    "load_carried_state",
    "load_for_resume",
    "settings_changed",
    "record_resume",
    "rng_state",
    "set_rng_state",
    "config_dict",
    "run_info",
    "start_run_folder",
    "read_metrics",
    "append_metrics",
    "truncate_metrics",
    "strict_json_row",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
SAMPLE = "sample.txt"

# model config fields that change only speed and memory use (and are absent from older
# checkpoints): a run may resume with other values
RUNTIME_ONLY_FIELDS = ("compile_chunks", "checkpoint_chunks")

# training settings a run may change when it resumes (recorded in config.json under "resumes"):
# the learning rate (the schedule keeps its shape, scaled to the new peak), the number of steps
# (the cosine schedule stretches), clipping, and when / how it logs, evaluates, checkpoints and
# where it runs. Every other setting changes the data stream or the optimiser's meaning: a
# resume with another value is refused.
SAFE_ON_RESUME = (
    "steps", "lr", "grad_clip", "eval_every", "eval_batches", "log_every", "ckpt_every",
    "device", "precision", "compile", "sample_tokens", "progress",
)  # fmt: skip

# the files a run writes in its folder (a new run with overwrite=True removes them)
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, SAMPLE, "tokenizer.json", "tokenizer_meta.json")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, empty, not a checkpoint)."""


class DiskFullError(OSError):
    """Not enough free space to write a checkpoint (errno ``ENOSPC``)."""


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


def existing_run(out_dir: Path) -> str | None:
    """What earlier run ``out_dir`` holds, in words (None when there is none: no checkpoint and
    no logged metrics; a ``config.json`` alone is a run that never trained)."""
    ckpt, metrics = out_dir / CHECKPOINT, out_dir / METRICS
    rows = metrics.read_text(errors="replace").splitlines() if metrics.is_file() else []
    rows = [r for r in rows if r.strip()]
    if not ckpt.is_file() and not rows:
        return None
    parts = [CHECKPOINT] if ckpt.is_file() else []
    if rows:
        try:
            last = json.loads(rows[-1]).get("step", "?")
        except (json.JSONDecodeError, AttributeError):
            last = "?"
        parts.append(f"{METRICS} with {len(rows)} rows up to step {last}")
    return " and ".join(parts)


def clear_run_folder(out_dir: Path) -> None:
    """Remove the files of an earlier run from ``out_dir`` (other files are left alone)."""
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for path in out_dir.glob("carried_state.rank*.pt"):
        path.unlink()


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove the temporary files (``.checkpoint.pt.tmp-<pid>`` and the like) that a process
    killed mid-write left in ``out_dir``, unless process ``<pid>`` still runs here; return
    them. Call it before this run writes."""
    stale = []
    for path in out_dir.glob(".*.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if path.is_file() and not (pid.isdigit() and _process_alive(int(pid))):
            path.unlink(missing_ok=True)
            stale.append(path)
    return stale


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill would end the process there: take the file as stale
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (another user's), or we cannot tell: keep the file
    return True


# ---------------------------------------------------------------------------------- checkpoints
def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``.

    The rename is atomic, so a crash or interrupt mid-write leaves the previous checkpoint at
    ``path`` intact (and the temporary file is removed). ``DiskFullError`` before writing when
    the folder has less free space than the tensors need, and instead of torch's own error when
    the disk fills up during the write.
    """
    path = Path(path)
    need = _tensor_bytes(obj)
    if _free_bytes(path.parent) < need:
        raise _disk_full(path, need, None)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        no_space = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
        if no_space or _free_bytes(path.parent) < need:
            raise _disk_full(path, need, err) from err
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def _tensor_bytes(obj) -> int:
    """Bytes held by the tensors inside a (nested) checkpoint dict: a lower bound of its size."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(_tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _disk_full(path: Path, need: int, err: Exception | None) -> DiskFullError:
    free = _free_bytes(path.parent)
    detail = "" if err is None else f" (the write failed: {str(err).splitlines()[0]})"
    return DiskFullError(
        errno.ENOSPC,
        f"disk full: writing {path.name} needs about {need / 2**20:.1f} MiB but {path.parent} "
        f"has {free / 2**20:.1f} MiB free{detail}. The previous {path.name} is intact. Free some "
        "space (old run folders, caches), or train into a folder on another disk (--out)",
    )


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (our own files: full unpickling).

    ``CheckpointError`` (a ``ValueError``) when the file is empty, truncated or not a
    checkpoint, saying what to do; ``FileNotFoundError`` when there is none."""
    path = Path(path)
    size = path.stat().st_size  # FileNotFoundError as usual when it is missing
    why = "it is empty (0 bytes)" if size == 0 else None
    if why is None:
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
                ValueError, TypeError, AttributeError, ImportError) as err:  # fmt: skip
            detail = str(err).split(". ")[0].splitlines()[0] if str(err) else "no detail"
            why = f"it is truncated or not a checkpoint ({type(err).__name__}: {detail})"
        else:
            if isinstance(ckpt, dict) and "step" in ckpt:
                return ckpt
            why = f"it holds a {type(ckpt).__name__}, not a checkpoint of this trainer"
    raise CheckpointError(
        f"checkpoint {path} is damaged and cannot be loaded: {why}. The trainer writes "
        "checkpoints atomically, so it was changed after it was written (an interrupted copy, "
        "a full disk, another program). Restore a good copy, or start the run over "
        "(--overwrite / Trainer(..., overwrite=True), or another --out)"
    )


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
    path: Path, model_config, train_config, map_location=None, *, data=None, warn: bool = True
) -> dict:
    """The checkpoint at ``path``, checked against the resuming run.

    ``ValueError`` if it was written for another model config (fields that change only speed
    and memory use may differ), with training settings that differ outside ``SAFE_ON_RESUME``,
    or (when ``data`` is given) for other data than the run folder's ``config.json`` names: the
    message lists every difference. A warning (when ``warn``) lists the safe changes, which the
    resumed run applies (:func:`settings_changed`, :func:`record_resume`)."""
    ckpt = load_checkpoint(path, map_location=map_location)
    saved, now = ckpt.get("model_config"), config_dict(model_config)
    if saved is not None and now is not None:
        diff = sorted(k for k in now if k not in RUNTIME_ONLY_FIELDS and now[k] != saved.get(k))
        if diff:
            raise ValueError(
                f"cannot resume {path}: the model config differs in {diff} "
                "(resume with the same preset, variant and overrides)"
            )
    changed = settings_changed(ckpt.get("train_config", {}), train_config)
    refused = {k: v for k, v in changed.items() if k not in SAFE_ON_RESUME}
    ran_on = _saved_data(path.parent)
    if (
        isinstance(data, (str, os.PathLike))
        and ran_on not in (None, *_DATA_OBJECTS)
        and _data_key(ran_on) != _data_key(data)
    ):
        refused["data"] = (ran_on, str(data))
    if refused:
        listed = "; ".join(f"{k}: {old!r} in the run, {new!r} now" for k, (old, new) in
                           refused.items())  # fmt: skip
        raise ValueError(
            f"cannot resume {path} with other settings: {listed}. Resume with the run's values "
            f"(see {CONFIG}), or start a new run (another --out, or --overwrite). Settings that "
            f"may change on resume: {', '.join(SAFE_ON_RESUME)}"
        )
    if changed and warn:
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        extra = " (the learning-rate schedule follows the new steps)" if "steps" in changed else ""
        warnings.warn(
            f"resuming at step {ckpt['step']} with changed settings: {listed}{extra}; "
            f"recorded in {CONFIG} under 'resumes'",
            stacklevel=4,  # the caller of Trainer(...)
        )
    return ckpt


def settings_changed(saved: dict, train_config) -> dict[str, tuple]:
    """``{field: (saved value, new value)}`` for the training settings of ``train_config`` that
    differ from a checkpoint's ``saved`` ones (tuples and lists compare equal)."""
    now = dataclasses.asdict(train_config)
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return {
        k: (saved[k], v) for k, v in now.items() if k in saved and norm(saved[k]) != norm(v)
    }


_DATA_OBJECTS = ("Corpus", "TextData", "TaskData")  # what config.json says for data objects


def _saved_data(out_dir: Path) -> str | None:
    """The ``data`` a run folder's ``config.json`` names (None when unknown)."""
    try:
        data = json.loads((out_dir / CONFIG).read_text()).get("data")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return data if isinstance(data, str) else None


def _data_key(data) -> str:
    """A name for comparing data specs: task aliases and corpus names lower-cased and merged,
    paths resolved."""
    key = str(data)
    if key.lower() in TASK_NAMES:
        return "task:" + TASK_NAMES[key.lower()]
    if key.lower() in CORPORA and not Path(key).exists():
        return "corpus:" + key.lower()
    return "path:" + str(Path(key).expanduser().resolve())


def record_resume(out_dir: Path, step: int, train: dict, changed: dict[str, tuple]) -> None:
    """On a resume with changed settings: ``config.json`` gets the run's training settings as
    they are now (``train``) and, under ``"resumes"``, the step and what changed."""
    path = out_dir / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        config = {}
    config["train"] = train
    config.setdefault("resumes", []).append(
        {"step": step, "changed": {k: {"was": old, "now": new} for k, (old, new) in
                                   changed.items()}}  # fmt: skip
    )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2, default=str))
    os.replace(tmp, path)


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
    """The rows of a ``metrics.jsonl`` file ([] when there is none).

    A damaged *last* line (a process killed mid-write) is dropped with a warning; a damaged
    line before it raises ``ValueError`` naming the file and the line."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a {type(row).__name__}, not an object")
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            if not any(rest.strip() for rest in lines[i + 1 :]):
                warnings.warn(
                    f"{path}: dropped its damaged last line {i + 1} ({line[:60]!r}), most likely "
                    "cut off when the run was stopped",
                    stacklevel=2,
                )
                break
            raise ValueError(
                f"{path}, line {i + 1} is not a JSON object ({err}): repair or delete that line, "
                "or start the run over (--overwrite)"
            ) from err
        rows.append(row)
    return rows


def strict_json_row(row: dict) -> dict:
    """``row`` with every NaN or infinite float replaced by None (``null``): ``metrics.jsonl``
    stays strict JSON that any reader accepts."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()}  # fmt: skip


def append_metrics(path: Path, row: dict) -> None:
    """Append one row (strict JSON: see :func:`strict_json_row`) to a ``metrics.jsonl`` file."""
    with open(path, "a") as fh:
        fh.write(json.dumps(strict_json_row(row), allow_nan=False) + "\n")


def truncate_metrics(path: Path, step: int) -> list[dict]:
    """Drop the rows logged after ``step`` (a resumed run logs them again); return the rest."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return rows
