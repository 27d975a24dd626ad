"""The ``Trainer``: one training loop for the notebooks and the command line.

Lessons 08–12 (coming) train their models with it (lesson 07 writes its own ten-line loop, to
show every step);
``python -m titans_mini.train`` (``titans_mini.train``) is its command line. What lives here:

* ``Trainer``: built in the named steps of ``titans_mini.train_setup``; then ``train_step`` (one
  optimiser step, the model's state carried across the segments of an excerpt and detached
  between steps), ``evaluate``, ``fit`` (the loop: log, evaluate, checkpoint, and a text sample
  at the end), ``save`` and resume, ``sample``;
* ``TrainingDiverged``: raised when a step's loss or gradient is not finite, before the step
  changes the model (the last checkpoint is left as it was);
* the out-of-memory fallback (``_recover_from_out_of_memory``): a Titans variant that runs out
  of GPU memory recomputes its memory chunks in the backward (``checkpoint_chunks``) and repeats
  the step; anything else gets an error that says what to lower.

How to train is ``titans_mini.train_config.TrainConfig``; the run folder's files are written and
read by ``titans_mini.run_io``; synthetic tasks are streamed by ``titans_mini.task_stream``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from titans_mini import data as data_mod
from titans_mini import run_io
from titans_mini import tasks as tasks_mod
from titans_mini import train_setup as setup
from titans_mini.train_config import TrainConfig

__all__ = ["Trainer", "TrainConfig", "TrainingDiverged", "OOM_CHECKPOINT_CHUNKS"]

OOM_CHECKPOINT_CHUNKS = 8  # chunk-checkpointing group switched on after an out-of-memory error


class TrainingDiverged(FloatingPointError):
    """A training step produced a NaN or infinite loss or gradient: the run stopped before that
    step changed the model, and the last checkpoint was left as it was."""


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
            there is none); ``"auto"`` resumes when a checkpoint exists; ``False`` starts a new
            run. Only the settings in ``run_io.SAFE_ON_RESUME`` (learning rate, steps,
            clipping, logging, evaluation, checkpoints, device) may change on resume: they are
            applied and recorded in ``config.json`` under ``"resumes"``; any other difference
            (batch size, sequence length, data, seed, ...) is refused with the list.
        overwrite: a new run (not resuming) in an ``out_dir`` that holds an earlier run's
            checkpoint or metrics raises ``FileExistsError`` unless ``overwrite=True``, which
            deletes that run's files first.
        **overrides: fields of ``TrainConfig``.

    A step whose loss or gradient is NaN or infinite stops the run with ``TrainingDiverged``
    (naming the step, the loss and what to lower) before it changes the model: the checkpoint
    on disk stays the last good one, and ``metrics.jsonl`` stays strict JSON.
    """

    def __init__(
        self,
        model,
        data="shakespeare",
        config: TrainConfig | None = None,
        out_dir: str | os.PathLike | None = None,
        *,
        resume: bool | str = False,
        overwrite: bool = False,
        **overrides,
    ):
        self.cfg = cfg = dataclasses.replace(config or TrainConfig(), **overrides)
        setup.check_arguments(cfg, model, data, out_dir, resume, overwrite)
        # the set-up steps, in order (each is a function of titans_mini.train_setup)
        self.rank, self.local_rank, self.world_size = setup.world()
        self.is_main = self.rank == 0
        self.device, self.precision = setup.device_and_precision(
            cfg, self.local_rank, self.world_size
        )
        self.out_dir, resuming = setup.run_folder(out_dir, resume, overwrite, self.is_main)
        self.text, self.task = setup.load_data(
            data, model, cfg, rank=self.rank, out_dir=self.out_dir, resuming=resuming,
            is_main=self.is_main,
        )  # fmt: skip
        self.tokenizer = None if self.text is None else self.text.tokenizer
        self.raw_model, self.model_config = setup.build_model(model, cfg, self.text, self.device)
        self.seq_len = cfg.seq_len or getattr(self.model_config, "seq_len", None) or 256
        if self.text is not None:
            self.train_batches, self.val_batches = setup.text_batches(
                self.text, cfg, self.seq_len, self.rank
            )
        self.optimizer, self.scheduler = setup.build_optimizer(self.raw_model, cfg)
        self.scaler = self.precision.grad_scaler(self.device)
        self.model = setup.wrap_model(self.raw_model, cfg, self.device, self.world_size)
        # progress
        self.step = 0
        self.state = None  # carried model state (segments > 1)
        self.history: list[dict] = []
        self.sample_text: str | None = None
        if resuming:
            self._restore(self.out_dir / run_io.CHECKPOINT, data)
        elif self.out_dir is not None and self.is_main:
            run_io.start_run_folder(self.out_dir, run_io.run_info(self, data))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything a resumed run needs."""
        return {
            "step": self.step,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": run_io.rng_state(),
            "carried_state": self.state,
            "train_config": asdict(self.cfg),
            "model_config": run_io.config_dict(self.model_config),
        }

    def save(self) -> Path | None:
        """Write ``checkpoint.pt`` atomically (rank 0; no-op without ``out_dir``).

        Under DDP with a carried state, every other rank writes its own carried state (its rows
        differ) to ``carried_state.rank{r}.pt`` so that it too resumes mid-excerpt exactly.
        """
        if self.out_dir is None:
            return None
        _check_finite_weights(self.raw_model, self.step)
        if not self.is_main:
            if self.state is not None:
                run_io.save_carried_state(self.out_dir, self.rank, self.step, self.state)
            return None
        path = self.out_dir / run_io.CHECKPOINT
        run_io.save_checkpoint(self.state_dict(), path)
        return path

    def _restore(self, path: Path, data) -> None:
        """Continue from the checkpoint at ``path`` (and drop the metrics logged after it); apply
        and record the settings that changed (only those of ``run_io.SAFE_ON_RESUME`` pass)."""
        ckpt = run_io.load_for_resume(
            path, self.model_config, self.cfg, self.device, data=data, warn=self.is_main
        )
        self.raw_model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:  # empty when saved without a gradient scaler (fp32, bf16)
            self.scaler.load_state_dict(ckpt["scaler"])
        run_io.set_rng_state(ckpt["rng"])
        self.step = int(ckpt["step"])
        changed = run_io.settings_changed(ckpt["train_config"], self.cfg)
        if "lr" in changed or "steps" in changed:
            # the restored scheduler holds the old peak: the schedule continues from this step
            # with the new peak learning rate and length
            sched = self.scheduler
            sched.base_lrs = [self.cfg.lr for _ in self.optimizer.param_groups]
            for group, lam in zip(self.optimizer.param_groups, sched.lr_lambdas):
                group["lr"] = self.cfg.lr * lam(sched.last_epoch)
            sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if self.is_main:
            self.state = ckpt.get("carried_state")
            # the metrics logged after the checkpoint will be produced again
            self.history = run_io.truncate_metrics(self.out_dir / run_io.METRICS, self.step)
            if changed:
                run_io.record_resume(self.out_dir, self.step, asdict(self.cfg), changed)
        else:
            self.state = run_io.load_carried_state(self.out_dir, self.rank, self.step, self.device)

    # ------------------------------------------------------------------ one step
    def _forward(self, model, inputs, state):
        with self.precision.autocast(self.device):
            out = model(inputs, state) if state is not None else model(inputs)
        if isinstance(out, tuple):
            return out[0], out[1]
        return out, None

    def _next_batch(self):
        """(inputs, targets, reset, per-token loss weights or None) for the current step."""
        if self.task is not None:
            b = self.task.batch(self.step)
            return b.inputs, b.targets, True, None
        b = self.train_batches.batch(self.step)
        return b.inputs, b.targets, b.reset, b.weights

    def train_step(self) -> float:
        """One optimizer step; returns the training loss.

        If the device runs out of memory in the forward or backward of a Titans variant, the
        memory layers switch to chunk checkpointing (``checkpoint_chunks``; the same values and
        gradients, recomputed in the backward: about 3× less memory, about 40 % slower on a GPU)
        and the step is repeated. Otherwise the error says what to lower."""
        cfg = self.cfg
        self.model.train()
        inputs, targets, reset, weights = self._next_batch()
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        if reset:
            self.state = None
        try:
            logits, new_state = self._forward(self.model, inputs, self.state)
            loss = _training_loss(logits, targets, weights)
            self.scaler.scale(loss).backward()
        except torch.cuda.OutOfMemoryError as err:
            # the traceback holds the step's activations: leave the except block before retrying
            outcome = _recover_from_out_of_memory(self, err, inputs.shape)
        else:
            outcome = None
        if outcome is not None:
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if isinstance(outcome, Exception):
                raise outcome
            return self.train_step()  # the same step: batches depend only on the step number
        if cfg.grad_clip > 0 or not self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
            # the norm of all gradients (clipped to grad_clip; not clipped when it is 0)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)
        else:
            grad_norm = None  # fp16 without clipping: the gradient scaler skips inf/NaN steps
        self._stop_if_diverged(loss, grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state = _detach(new_state) if (cfg.segments > 1 and self.task is None) else None
        self.step += 1
        return loss.item()

    def _stop_if_diverged(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """``TrainingDiverged`` if the loss or the gradient norm is NaN or infinite (one
        host-device sync, which ``loss.item()`` would cost anyway), before the optimiser step.

        Under fp16 the gradient scaler expects an infinite gradient now and then (it skips that
        step and lowers its scale), so only the loss is checked there."""
        values = loss.detach().float().reshape(1)
        if grad_norm is not None and not self.scaler.is_enabled():
            values = torch.cat([values, grad_norm.detach().float().reshape(1).to(values.device)])
        if bool(torch.isfinite(values).all()):
            return
        self.optimizer.zero_grad(set_to_none=True)
        step, lr = self.step + 1, self.scheduler.get_last_lr()[0]
        grad = "" if grad_norm is None else f", gradient norm {grad_norm.item():.4g}"
        ckpt = None if self.out_dir is None else self.out_dir / run_io.CHECKPOINT
        kept = (
            f"The last checkpoint ({ckpt}) is left as it was. "
            if ckpt is not None and ckpt.is_file() else ""
        )  # fmt: skip
        tips = f"lower the learning rate (now {self.cfg.lr:g}, e.g. --lr {self.cfg.lr / 10:g})"
        if self.cfg.grad_clip <= 0:
            tips += ", turn gradient clipping on (grad_clip=1.0)"
        if setup.memory_layers(self.raw_model):
            tips += ", or a smaller memory step size (--set theta_max=...)"
        then = "resume from it (--resume) or start over" if kept else "start over"
        raise TrainingDiverged(
            f"training diverged at step {step}: loss {loss.item():.4g}{grad}, learning rate "
            f"{lr:.4g}. The run stopped before this step changed the model. {kept}To go on, "
            f"{tips}; then {then} (--overwrite)."
        )

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats per token) and bits per byte for text; loss and accuracy on
        held-out batches for tasks. Uses the unwrapped model; restores train mode after."""
        n = self.cfg.eval_batches
        with _eval_mode(self.raw_model) as model:
            if self.task is not None:
                return _task_metrics(model, self.task.eval_batches(n), self._forward, self.device)
            return _text_metrics(
                model, self.val_batches.eval_batches(n), self.text.token_bytes, self._forward,
                self.device,
            )  # fmt: skip

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
            bar = tqdm(total=end, initial=self.step, desc="train", dynamic_ncols=True)
        losses: list[float] = []
        tick, n_timed = time.perf_counter(), 0
        speed = "?"  # tokens per second of the last logging interval, shown in the bar
        while self.step < end:
            loss = self.train_step()
            losses.append(loss)
            n_timed += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=speed)
            at_end = self.step == cfg.steps
            do_eval = at_end or (cfg.eval_every > 0 and self.step % cfg.eval_every == 0)
            do_log = do_eval or self.step % cfg.log_every == 0 or self.step == end
            if do_log:
                elapsed = time.perf_counter() - tick
                mean_loss = float(np.mean(losses))
                train_loss = _mean_across_ranks(mean_loss, self.world_size, self.device)
                row = {
                    "step": self.step,
                    "train_loss": train_loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens_per_step * n_timed / max(elapsed, 1e-9),
                }
                losses = []
                speed = f"{row['tokens_per_s']:,.0f}"
                if do_eval:
                    row.update(self.evaluate())
                self._log(row)
                if bar is not None and "val_loss" in row:
                    bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row['val_loss']:.3f}",
                                    tok_s=speed)
                tick, n_timed = time.perf_counter(), 0
            if at_end or self.step == end or (ckpt_every > 0 and self.step % ckpt_every == 0):
                self.save()
        if bar is not None:
            bar.close()
        if self.step == cfg.steps and cfg.sample_tokens > 0 and self.text is not None:
            self._final_sample()
        return self.history

    def _final_sample(self) -> None:
        """Rank 0: a text sample after the last step, kept in ``sample_text`` and ``sample.txt``."""
        if not self.is_main:
            return
        self.sample_text = self.sample(max_new_tokens=self.cfg.sample_tokens)
        if self.out_dir is not None:
            (self.out_dir / run_io.SAMPLE).write_text(self.sample_text)
        if self.cfg.progress:
            print(f"--- sample after {self.step} steps ---\n{self.sample_text}\n---")

    @torch.no_grad()
    def sample(
        self,
        prompt: str | None = None,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
    ) -> str:
        """Generate text after ``prompt`` (default: the opening of a held-out document) with the
        model's ``generate``, seeded by ``config.seed``."""
        if self.text is None:
            raise ValueError("sampling needs a text corpus (this run trains on a task)")
        if prompt is None:
            prompt = self.text.corpus.val[0].text[:64] if self.text.corpus.val else "\n"
        ids = torch.tensor([self.tokenizer.encode(prompt)], device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        with _eval_mode(self.raw_model) as model, self.precision.autocast(self.device):
            out = model.generate(
                ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen
            )
        return self.tokenizer.decode(out[0].tolist())

    def _log(self, row: dict) -> None:
        if not self.is_main:
            return
        row = run_io.strict_json_row(row)  # NaN / inf -> None, as in metrics.jsonl
        self.history.append(row)
        if self.out_dir is not None:
            run_io.append_metrics(self.out_dir / run_io.METRICS, row)

    def close(self) -> None:
        """Tear down the process group (torchrun)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


# ============================================================================================
# Out of memory in a training step
# ============================================================================================


def _recover_from_out_of_memory(trainer: Trainer, err: Exception, shape) -> bool | Exception:
    """After an out-of-memory error in a training step: True when the memory layers were switched
    to chunk checkpointing (repeat the step), else the error to raise, with advice."""
    layers = setup.memory_layers(trainer.raw_model)
    group = OOM_CHECKPOINT_CHUNKS
    if trainer.world_size == 1 and layers and all(m.checkpoint_chunks == 0 for m in layers):
        for m in layers:
            m.checkpoint_chunks = group
        config = trainer.model_config
        if dataclasses.is_dataclass(config) and hasattr(config, "checkpoint_chunks"):
            trainer.model_config = dataclasses.replace(config, checkpoint_chunks=group)
        warnings.warn(
            f"out of memory at batch {tuple(shape)}: the memory layers now recompute their "
            f"chunks in groups of {group} during the backward (checkpoint_chunks={group}; "
            "same results, less memory, slower). Set it yourself to skip this retry, e.g. "
            f"--set checkpoint_chunks={group}.",
            stacklevel=3,  # the caller of train_step
        )
        return True
    tips = [f"lower --batch-size (now {shape[0]}) or --seq-len (now {shape[1]})"]
    if layers and all(m.checkpoint_chunks == 0 for m in layers):
        tips.append(f"--set checkpoint_chunks={group} (less memory, same results, slower)")
    elif layers:
        tips.append("a checkpoint_chunks group near √(chunks per row), which keeps the least")
    error = torch.cuda.OutOfMemoryError(
        f"{trainer.device.type} ran out of memory in a training step at batch "
        f"{tuple(shape)}: {'; or '.join(tips)}. Original error: {str(err).splitlines()[0]}"
    )
    error.__cause__ = err
    return error


# ============================================================================================
# Helpers of the step and the evaluation
# ============================================================================================


def _training_loss(logits, targets, weights=None):
    """Mean next-token cross-entropy (positions with ``IGNORE_INDEX`` left out), or
    sum(weights · loss) / sum(weights) with per-token ``weights`` (B, T)."""
    flat = logits.float().flatten(0, 1)
    if weights is None:
        return F.cross_entropy(flat, targets.flatten(), ignore_index=tasks_mod.IGNORE_INDEX)
    per_token = F.cross_entropy(flat, targets.flatten(), ignore_index=tasks_mod.IGNORE_INDEX,
                                reduction="none")
    weights = weights.to(per_token.device).flatten()
    return (per_token * weights).sum() / weights.sum()


def _check_finite_weights(model: nn.Module, step: int) -> None:
    """``TrainingDiverged`` instead of a checkpoint of NaN or infinite weights (one sync)."""
    params = [p.detach().float().sum() for p in model.parameters()]
    if params and not bool(torch.isfinite(torch.stack(params).sum())):
        raise TrainingDiverged(
            f"the model's weights hold NaN or infinite values at step {step}: not saved, the "
            "last checkpoint is left as it was. Lower the learning rate and resume from it."
        )


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


def _mean_across_ranks(value: float, world_size: int, device: torch.device) -> float:
    """The mean of ``value`` over the torchrun processes (``value`` itself in one process)."""
    if world_size > 1 and dist.is_initialized():
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / world_size
    return value


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """``model`` in eval mode inside the block; back in the mode it was in after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _task_metrics(model, batches, forward, device) -> dict[str, float]:
    """Loss per scored position and the task's accuracy on held-out task batches."""
    total, count, accs = 0.0, 0, []
    for b in batches:
        b = b.to(device)
        logits, _ = forward(model, b.inputs, None)
        logits = logits.float()
        total += F.cross_entropy(
            logits.flatten(0, 1), b.targets.flatten(),
            ignore_index=tasks_mod.IGNORE_INDEX, reduction="sum",
        ).item()  # fmt: skip
        count += int(b.score_mask.sum())
        accs.append(b.accuracy(logits))
    return {"val_loss": total / max(count, 1), "val_acc": float(np.mean(accs))}


def _text_metrics(model, batches, token_bytes, forward, device) -> dict[str, float]:
    """Loss per token and bits per byte on validation excerpts (state carried within each)."""
    total, count, n_bytes = 0.0, 0, 0
    token_bytes = torch.as_tensor(token_bytes)
    state = None
    for b in batches:
        if b.reset:
            state = None
        logits, state = forward(model, b.inputs.to(device), state)
        total += F.cross_entropy(
            logits.float().flatten(0, 1),
            b.targets.to(device).flatten(),
            reduction="sum",
        ).item()
        count += b.targets.numel()
        n_bytes += int(token_bytes[b.targets].sum())
    return {"val_loss": total / count, "val_bpb": data_mod.bits_per_byte(total, n_bytes)}
